//! The transport every kkachi node builds its Swarm on, in one place: TCP (without
//! Nagle's delay: requests are small and waiting for more costs a round trip) and QUIC,
//! Noise, Yamux, on Tokio; and identify's configuration.

use std::time::Duration;

use libp2p::identity::{Keypair, PublicKey};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{Swarm, identify, noise, relay, tcp, yamux};
use thiserror::Error;

/// A Swarm could not be built.
#[derive(Debug, Error)]
#[error("network setup failed: {0}")]
pub struct TransportError(String);

fn setup(e: impl std::fmt::Display) -> TransportError {
    TransportError(e.to_string())
}

/// What every node says about itself through identify; `agent` names the program.
pub fn identify_config(key: PublicKey, agent: &str) -> identify::Config {
    identify::Config::new("/kkachi/id/1".into(), key)
        .with_agent_version(format!("{agent}/{}", env!("CARGO_PKG_VERSION")))
}

/// A Swarm for `keypair` over TCP and QUIC running `behaviour`, closing connections idle
/// for `idle`.
pub fn swarm<B: NetworkBehaviour>(
    keypair: Keypair,
    behaviour: impl FnOnce(&Keypair) -> B,
    idle: Duration,
) -> Result<Swarm<B>, TransportError> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(setup)?
        .with_quic()
        .with_behaviour(behaviour)
        .map_err(setup)?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build())
}

/// [`swarm`], and able to reach peers through relays (circuit relay v2): `behaviour` is
/// given the relay client to include. `configure` adjusts the Swarm's settings.
pub fn swarm_with_relay_client<B: NetworkBehaviour>(
    keypair: Keypair,
    behaviour: impl FnOnce(&Keypair, relay::client::Behaviour) -> B,
    configure: impl FnOnce(libp2p::swarm::Config) -> libp2p::swarm::Config,
) -> Result<Swarm<B>, TransportError> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(setup)?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(setup)?
        .with_behaviour(behaviour)
        .map_err(setup)?
        .with_swarm_config(configure)
        .build())
}
