//! Starting the engine with a real network, and the network's settings from the
//! environment.

use kkachi_protocol::{Identity, Multiaddr};

use crate::engine::{Engine, Mode};
use crate::net::{NetConfig, NetError, Network};
use crate::store::LocalStore;

/// Network options from the environment: `KKACHI_LISTEN` (comma-separated
/// multiaddrs), `KKACHI_LAN=0` to stop looking for contacts on the local network (and
/// being found there; `KKACHI_MDNS=0`, its older name, too), `KKACHI_DIRECT=0` for
/// relays only (no direct connections to contacts at all), and `KKACHI_CIRCUITS=1` to
/// reach contacts through relays and hole punching (which names us to those relays).
pub fn net_config() -> NetConfig {
    let mut config = NetConfig::default();
    if let Ok(listen) = std::env::var("KKACHI_LISTEN") {
        let addrs: Vec<Multiaddr> = listen
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .filter_map(|s| match s.trim().parse() {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::warn!(addr = s, error = %e, "ignoring bad KKACHI_LISTEN address");
                    None
                }
            })
            .collect();
        config.listen = addrs;
    }
    let off =
        |name: &str| std::env::var(name).is_ok_and(|v| v == "0" || v.eq_ignore_ascii_case("off"));
    if off("KKACHI_LAN") || off("KKACHI_MDNS") {
        config.lan = false;
    }
    if off("KKACHI_DIRECT") {
        config.direct = false;
    }
    if std::env::var("KKACHI_CIRCUITS").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("on")) {
        config.circuits = true;
    }
    config
}

/// Starts the network as `me` and the engine over `store`, doing what `mode` says (the
/// daemon and the UI: [`Mode::ONLINE`]).
pub fn start_engine(
    store: LocalStore,
    me: Identity,
    config: NetConfig,
    mode: Mode,
) -> Result<Engine<Network>, NetError> {
    let (net, events) = Network::start(me.transport_keypair(), config)?;
    Ok(Engine::start(store, me, net, Some(events), mode))
}
