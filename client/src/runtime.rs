//! Running online: the network and engine together, the pump for network events, and
//! the daemon loop (inbox subscriptions on every own relay, outbox delivery, LAN).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kkachi_protocol::wire::PutOutcome;
use kkachi_protocol::{Identity, Multiaddr, PeerId, RelayToClient};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::commands::UserError;
use crate::engine::{Engine, Verdict, now_ms};
use crate::net::{NetConfig, NetEvent, Network, peer_of};
use crate::store::LocalStore;

/// Long-poll wait on each relay.
pub const SUBSCRIBE_WAIT_MS: u32 = 25_000;
/// How often the daemon checks for relays added or removed.
const RELAY_RESCAN: Duration = Duration::from_secs(2);
/// Longest pause between outbox passes.
const DELIVERY_TICK: Duration = Duration::from_millis(500);
/// Most outbox passes started for fresh receipts at once. Past this, receipts wait for
/// a pass already running or the next tick, instead of each starting a full pass.
const RECEIPT_PASSES: usize = 4;
/// How often the daemon forgets expired envelopes and held messages.
const HOUSEKEEPING: Duration = Duration::from_secs(6 * 3600);

/// Network options from the environment: `KKACHI_LISTEN` (comma-separated
/// multiaddrs), `KKACHI_MDNS=0` to turn LAN discovery off and `KKACHI_DIRECT=0` for
/// relays only (no direct connections to contacts at all).
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
    if off("KKACHI_MDNS") {
        config.mdns = false;
    }
    if off("KKACHI_DIRECT") {
        config.direct = false;
    }
    config
}

/// Starts the network as `me` and an engine over `store`, and the task that feeds
/// network events (direct deliveries, peers appearing) to the engine.
pub fn start_engine(
    store: LocalStore,
    me: Identity,
    config: NetConfig,
) -> Result<Arc<Engine<Network>>, UserError> {
    let (net, events) = Network::start(me.keypair(), config)?;
    let engine = Engine::new(store, me, net);
    let wake = Arc::new(Notify::new());
    tokio::spawn(pump(engine.clone(), events, wake));
    Ok(engine)
}

/// Handles what the network reports, for as long as the network runs.
async fn pump(
    engine: Arc<Engine<Network>>,
    mut events: mpsc::Receiver<NetEvent>,
    wake: Arc<Notify>,
) {
    while let Some(event) = events.recv().await {
        match event {
            NetEvent::DirectPut {
                from,
                envelopes,
                reply,
            } => {
                // A direct handover tells the sender "delivered": only a contact who is
                // not blocked may make one. Anyone else goes through the relays, where
                // a first message is held as a request and stays "relayed".
                let store = engine.store();
                let contact = matches!(store.contact(&from), Ok(Some(_)))
                    && matches!(store.blocked(&from), Ok(None));
                if !contact {
                    let refusal = RelayToClient::error(
                        kkachi_protocol::ErrorCode::NotOwner,
                        "this client takes direct deliveries from its contacts only",
                    );
                    reply.send(refusal);
                    continue;
                }
                let engine = engine.clone();
                tokio::spawn(async move {
                    let response = match engine.receive_direct(envelopes).await {
                        // Durable now: each envelope's answer says what became of it, so
                        // the sender counts as delivered only what was taken in.
                        Ok(verdicts) => RelayToClient::Stored {
                            outcomes: verdicts.into_iter().map(direct_outcome).collect(),
                        },
                        Err(e) => {
                            tracing::warn!(%from, error = %e, "could not store a direct delivery");
                            RelayToClient::error(
                                kkachi_protocol::ErrorCode::Internal,
                                "the recipient could not store it",
                            )
                        }
                    };
                    reply.send(response);
                });
            }
            NetEvent::LanPeer { peer, up: true } => {
                tracing::debug!(%peer, "LAN peer: trying direct delivery");
                wake.notify_one();
                let engine = engine.clone();
                tokio::spawn(async move {
                    let _ = engine.deliver_due().await;
                });
            }
            NetEvent::Connection { peer, up: true } => {
                // A relay we failed to reach is back: retry what waits for it now,
                // instead of when its backoff ends.
                let engine = engine.clone();
                tokio::spawn(async move {
                    if engine.expedite_relay(&peer).await.unwrap_or(false) {
                        let _ = engine.deliver_due().await;
                    }
                });
            }
            NetEvent::LanPeer { .. } | NetEvent::Connection { .. } => {}
        }
    }
}

/// How a direct sender is told what became of one envelope.
fn direct_outcome(verdict: Verdict) -> PutOutcome {
    let rejected = |code, message: &str| PutOutcome::Rejected {
        code,
        message: message.into(),
    };
    match verdict {
        Verdict::Taken => PutOutcome::Stored,
        Verdict::Duplicate => PutOutcome::Duplicate,
        Verdict::Held => rejected(
            kkachi_protocol::ErrorCode::NotOwner,
            "held as a message request until the recipient accepts you",
        ),
        Verdict::Refused => rejected(
            kkachi_protocol::ErrorCode::Malformed,
            "the recipient could not take it in",
        ),
    }
}

/// Runs the daemon until `stop` resolves: subscribed to every own relay, delivering the
/// outbox, accepting direct deliveries. `on_message` sees every new message.
pub async fn run_online(engine: Arc<Engine<Network>>, stop: impl std::future::Future<Output = ()>) {
    let mut inboxes: HashMap<String, JoinHandle<()>> = HashMap::new();
    let mut rescan = tokio::time::interval(RELAY_RESCAN);
    let mut deliver = tokio::time::interval(DELIVERY_TICK);
    deliver.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let receipt_passes = Arc::new(tokio::sync::Semaphore::new(RECEIPT_PASSES));
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = housekeeping.tick() => {
                if let Err(e) = engine.housekeeping().await {
                    tracing::warn!(error = %e, "housekeeping failed");
                }
            }
            _ = rescan.tick() => supervise_inboxes(&engine, &mut inboxes).await,
            _ = deliver.tick() => {
                if let Err(e) = engine.deliver_due().await {
                    tracing::warn!(error = %e, "outbox pass failed");
                }
            }
            _ = engine.outbox_queued() => {
                // Receipts just queued: send them now, without waiting for the pass in
                // flight (a slow relay must not hold them up).
                let Ok(permit) = receipt_passes.clone().try_acquire_owned() else {
                    continue;
                };
                let engine = engine.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = engine.deliver_due().await {
                        tracing::warn!(error = %e, "outbox pass failed");
                    }
                });
            }
        }
    }
    for (_, task) in inboxes {
        task.abort();
    }
    let _ = engine.store().flush().await;
}

/// Keeps one inbox task per own relay (starts new ones, stops removed ones) and a
/// circuit reservation at each, so contacts can reach us through it and go direct.
async fn supervise_inboxes(
    engine: &Arc<Engine<Network>>,
    inboxes: &mut HashMap<String, JoinHandle<()>>,
) {
    let Ok(relays) = engine.store().relays() else {
        return;
    };
    let wanted: Vec<String> = relays.into_iter().map(|r| r.addr).collect();
    inboxes.retain(|addr, task| {
        let keep = wanted.contains(addr) && !task.is_finished();
        if !keep {
            task.abort();
        }
        keep
    });
    for addr in wanted {
        if inboxes.contains_key(&addr) {
            continue;
        }
        let Ok(relay) = addr.parse::<Multiaddr>() else {
            continue;
        };
        inboxes.insert(addr, tokio::spawn(inbox_loop(engine.clone(), relay)));
    }
    let relays = inboxes.keys().filter_map(|a| a.parse().ok()).collect();
    engine.net().reserve_at(relays).await;
}

/// Long-polls one relay forever: catch up from the stored cursor, then wait for more.
async fn inbox_loop(engine: Arc<Engine<Network>>, relay: Multiaddr) {
    let mut failures: u32 = 0;
    loop {
        match engine.sync_relay(&relay, SUBSCRIBE_WAIT_MS).await {
            Ok(_) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                let delay = crate::engine::backoff_delay(failures);
                tracing::debug!(%relay, error = %e, ?delay, "inbox: relay unavailable");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

impl Engine<Network> {
    /// Makes every outbox path to relay `peer` due now; true if any was waiting.
    pub async fn expedite_relay(&self, peer: &PeerId) -> Result<bool, crate::engine::EngineError> {
        self.expedite(
            |addr| addr.parse::<Multiaddr>().ok().and_then(|a| peer_of(&a)) == Some(*peer),
            now_ms(),
        )
        .await
    }
}
