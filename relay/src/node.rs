//! The libp2p node: one task owns the Swarm and runs the event loop.
//!
//! Requests go to the [`Service`]; answers that need the disk (puts) run as futures
//! polled by this loop, so the loop never blocks on a flush. Long polls wait here, keyed
//! by mailbox, and are answered as soon as a put lands in their mailbox, without waiting
//! for its flush.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use kkachi_protocol::{Multiaddr, PeerId, QueueId, RelayToClient};
use libp2p::connection_limits::{self, ConnectionLimits};
use libp2p::core::transport::ListenerId;
use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Swarm, identify, ping, relay};
use tokio::sync::{mpsc, oneshot, watch};

use crate::RelayError;
use crate::boxed::Boxed;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::service::{Action, Service, source_address};
use crate::session::{SessionReply, SessionRequest};
use crate::store::MailboxStore;

/// How often waiting long polls are checked for their deadline, and housekeeping runs.
const TICK: Duration = Duration::from_millis(250);
/// How often expired envelopes are swept.
const EXPIRY_EVERY: Duration = Duration::from_secs(30);
/// Most envelopes removed per sweep (keeps one sweep short).
const EXPIRY_BATCH: usize = 10_000;
/// Longest wait for in-flight puts at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The relay's libp2p behaviours.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    limits: connection_limits::Behaviour,
    addresses: crate::address_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    pub(crate) session: libp2p_stream::Behaviour,
    circuit: Toggle<relay::Behaviour>,
}

pub(crate) fn build_swarm(
    config: &Config,
    keypair: Keypair,
) -> Result<Swarm<Boxed<Behaviour>>, RelayError> {
    let l = &config.limits;
    let limits = ConnectionLimits::default()
        .with_max_established(Some(l.max_connections))
        .with_max_established_per_peer(Some(l.max_connections_per_peer))
        .with_max_pending_incoming(Some(l.max_pending_connections));
    let c = &config.circuit;
    let circuit_config = relay::Config {
        max_reservations: c.max_reservations,
        max_circuits: c.max_circuits,
        max_circuit_duration: Duration::from_secs(c.max_circuit_secs),
        max_circuit_bytes: c.max_circuit_bytes,
        ..Default::default()
    };
    let circuit_enabled = c.enabled;
    crate::transport::swarm(
        keypair,
        |key| {
            Boxed(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                addresses: crate::address_limits::Behaviour::new(
                    l.max_connections_per_address as usize,
                ),
                identify: identify::Behaviour::new(crate::transport::identify_config(
                    key.public(),
                    "kkachi-relay",
                )),
                ping: ping::Behaviour::default(),
                session: libp2p_stream::Behaviour::new(),
                circuit: circuit_enabled
                    .then(|| relay::Behaviour::new(key.public().to_peer_id(), circuit_config))
                    .into(),
            })
        },
        config.idle_timeout(),
    )
    .map_err(|e| RelayError::Transport(e.to_string()))
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where an answer goes: back over the session the request came on.
type Reply = SessionReply;

/// A parked long poll.
struct Waiter {
    peer: PeerId,
    after: u64,
    deadline: Instant,
    reply: Reply,
}

/// A put in progress: its answer, where to send it, and the queues with new envelopes
/// once it is done (whose long polls to answer then).
type PendingPut = BoxFuture<'static, (Reply, RelayToClient, Vec<QueueId>)>;

pub(crate) struct Node<S> {
    swarm: Swarm<Boxed<Behaviour>>,
    service: Arc<Service<S>>,
    metrics: Metrics,
    max_waiting_per_peer: usize,
    waiting: HashMap<QueueId, Vec<Waiter>>,
    waiting_per_peer: HashMap<PeerId, usize>,
    /// The address of each peer's latest direct connection: what its requests count
    /// under for rate limits (a session stream does not name its connection).
    peer_sources: HashMap<PeerId, IpAddr>,
    /// Requests read off session streams.
    sessions: mpsc::Receiver<SessionRequest>,
    puts: FuturesUnordered<PendingPut>,
    /// Puts were added since the node last let other tasks run: see [`Node::run`].
    fresh_puts: bool,
    addrs: watch::Sender<Vec<Multiaddr>>,
    listeners: Vec<ListenerId>,
    /// Set when the store failed: drain without a final flush, and report it.
    fatal: Option<String>,
}

impl<S: MailboxStore + Clone> Node<S> {
    pub(crate) fn new(
        swarm: Swarm<Boxed<Behaviour>>,
        service: Arc<Service<S>>,
        metrics: Metrics,
        config: &Config,
        addrs: watch::Sender<Vec<Multiaddr>>,
        listeners: Vec<ListenerId>,
        sessions: mpsc::Receiver<SessionRequest>,
    ) -> Self {
        Self {
            swarm,
            service,
            metrics,
            max_waiting_per_peer: config.limits.max_waiting_per_peer,
            waiting: HashMap::new(),
            waiting_per_peer: HashMap::new(),
            peer_sources: HashMap::new(),
            sessions,
            puts: FuturesUnordered::new(),
            fresh_puts: false,
            addrs,
            listeners,
            fatal: None,
        }
    }

    /// Runs until `shutdown` fires, then drains gracefully.
    pub(crate) async fn run(
        mut self,
        mut shutdown: oneshot::Receiver<()>,
    ) -> Result<(), RelayError> {
        let mut tick = tokio::time::interval(TICK);
        let mut last_expiry = Instant::now();
        self.metrics.set_ready(true);
        loop {
            // A new put's first poll starts the store's flush, which wakes a blocking
            // thread and sled's I/O pool. Let the long polls it answered be written out
            // first: on a busy machine the woken threads can take the core from the
            // tasks that carry the message on.
            if std::mem::take(&mut self.fresh_puts) {
                tokio::task::yield_now().await;
            }
            tokio::select! {
                // Shutdown first, then finished puts (they release clients), then new
                // network events, then housekeeping.
                biased;
                _ = &mut shutdown => break,
                Some((reply, response, mailboxes)) = self.puts.next(), if !self.puts.is_empty() => {
                    self.respond(reply, response);
                    for mailbox in mailboxes {
                        self.wake(&mailbox);
                    }
                }
                Some(r) = self.sessions.recv() => {
                    let source = self.peer_sources.get(&r.peer).copied();
                    self.on_request(r.peer, source, r.request, r.reply);
                }
                event = self.swarm.select_next_some() => self.on_event(event),
                _ = tick.tick() => {
                    if let Some(why) = self.service.store().fatal() {
                        self.fatal = Some(why);
                        break;
                    }
                    self.expire_waiters(Instant::now());
                    if last_expiry.elapsed() >= EXPIRY_EVERY {
                        last_expiry = Instant::now();
                        self.sweep_expired();
                    }
                }
            }
        }
        self.drain().await
    }

    fn respond(&mut self, reply: Reply, response: RelayToClient) {
        // Fails only if the peer went away; nothing to do then.
        reply.send(response);
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                // A relay is a server: what it listens on is where clients reach it.
                // Circuit relaying is only offered for confirmed external addresses.
                self.swarm.add_external_address(address.clone());
                self.addrs.send_modify(|a| a.push(address));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.addrs.send_modify(|a| a.retain(|x| *x != address));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                self.metrics.connections.inc();
                if let Some(source) = source_address(endpoint.get_remote_address()) {
                    self.peer_sources.insert(peer_id, source);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => {
                self.metrics.connections.dec();
                if num_established == 0 {
                    self.peer_sources.remove(&peer_id);
                }
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                tracing::debug!(%error, "incoming connection failed");
            }
            SwarmEvent::ListenerError { error, .. } => tracing::warn!(%error, "listener error"),
            _ => {}
        }
    }

    /// One request.
    fn on_request(
        &mut self,
        peer: PeerId,
        source: Option<IpAddr>,
        request: crate::framing::Request,
        reply: Reply,
    ) {
        match self.service.handle(&peer, source, request, unix_now()) {
            Action::Respond(response) => self.respond(reply, response),
            Action::Later(done) => {
                self.puts
                    .push(Box::pin(async move { (reply, done.await, Vec::new()) }));
                self.fresh_puts = true;
            }
            Action::Deferred(done) => {
                self.puts.push(Box::pin(async move {
                    let (response, mailboxes) = done.await;
                    (reply, response, mailboxes)
                }));
                self.fresh_puts = true;
            }
            Action::Put { done, mailboxes } => {
                self.puts
                    .push(Box::pin(async move { (reply, done.await, Vec::new()) }));
                self.fresh_puts = true;
                for mailbox in mailboxes {
                    self.wake(&mailbox);
                }
            }
            Action::Wait {
                mailbox,
                after,
                wait_ms,
            } => self.park(peer, mailbox, after, wait_ms, reply),
        }
    }

    fn park(&mut self, peer: PeerId, mailbox: QueueId, after: u64, wait_ms: u32, reply: Reply) {
        let count = self.waiting_per_peer.entry(peer).or_default();
        if *count >= self.max_waiting_per_peer {
            // Answer at once (empty) rather than hold more streams for this peer.
            let empty = RelayToClient::Batch {
                items: vec![],
                next: after,
                more: false,
            };
            self.respond(reply, empty);
            return;
        }
        *count += 1;
        self.metrics.waiting.inc();
        let deadline = Instant::now() + Duration::from_millis(u64::from(wait_ms));
        // Most mailboxes have one waiter (their owner's long poll): room for one, not
        // the four a first push would make.
        self.waiting
            .entry(mailbox)
            .or_insert_with(|| Vec::with_capacity(1))
            .push(Waiter {
                peer,
                after,
                deadline,
                reply,
            });
    }

    fn unpark(&mut self, waiter: &Waiter) {
        self.metrics.waiting.dec();
        if let Some(count) = self.waiting_per_peer.get_mut(&waiter.peer) {
            *count -= 1;
            if *count == 0 {
                self.waiting_per_peer.remove(&waiter.peer);
            }
        }
    }

    /// Answers every long poll on `mailbox` that now has something newer.
    fn wake(&mut self, mailbox: &QueueId) {
        let Some(mut waiters) = self.waiting.remove(mailbox) else {
            return;
        };
        // In place, as in `expire_waiters`: those still waiting keep the list's allocation.
        let mut i = 0;
        while i < waiters.len() {
            let response = self.service.fetch(
                mailbox,
                waiters[i].after,
                kkachi_protocol::wire::MAX_BATCH_ITEMS,
            );
            let empty = matches!(&response, RelayToClient::Batch { items, .. } if items.is_empty());
            if empty {
                i += 1;
            } else {
                let w = waiters.swap_remove(i);
                self.unpark(&w);
                self.respond(w.reply, response);
            }
        }
        if !waiters.is_empty() {
            self.waiting.insert(*mailbox, waiters);
        }
    }

    /// Answers long polls whose time is up with an empty batch, and forgets those whose
    /// peer has gone.
    fn expire_waiters(&mut self, now: Instant) {
        let mut done = Vec::new();
        self.waiting.retain(|_, waiters| {
            // In place: a mailbox's list keeps its allocation (room for one waiter).
            done.extend(waiters.extract_if(.., |w| w.deadline <= now || !w.reply.is_open()));
            !waiters.is_empty()
        });
        for w in done {
            self.unpark(&w);
            let empty = RelayToClient::Batch {
                items: vec![],
                next: w.after,
                more: false,
            };
            self.respond(w.reply, empty);
        }
    }

    fn sweep_expired(&mut self) {
        if let Some(chunks) = self.service.chunks().cloned() {
            let metrics = self.metrics.clone();
            // Files are removed off the loop.
            tokio::task::spawn_blocking(move || {
                match chunks.expire(unix_now(), EXPIRY_BATCH) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "expired chunks removed"),
                    Err(e) => tracing::error!(error = %e, "chunk expiry failed"),
                }
                metrics.set_chunks(chunks.stats());
            });
        }
        match self.service.store().expire(unix_now(), EXPIRY_BATCH) {
            Ok(0) => {}
            Ok(n) => {
                self.metrics.expired.inc_by(n as u64);
                tracing::info!(removed = n, "expired envelopes removed");
            }
            Err(e) => tracing::error!(error = %e, "expiry sweep failed"),
        }
        self.metrics.set_store(self.service.store().stats());
        self.service.prune();
    }

    /// Graceful shutdown: stop accepting, answer long polls, finish in-flight puts
    /// (their clients get their acknowledgements), flush, and return.
    async fn drain(mut self) -> Result<(), RelayError> {
        self.metrics.set_ready(false);
        tracing::info!(
            in_flight = self.puts.len(),
            "shutting down: no longer accepting"
        );
        for id in std::mem::take(&mut self.listeners) {
            self.swarm.remove_listener(id);
        }
        self.expire_waiters(Instant::now() + Duration::from_secs(3600));
        let deadline = tokio::time::sleep(DRAIN_TIMEOUT);
        tokio::pin!(deadline);
        while !self.puts.is_empty() {
            tokio::select! {
                Some((reply, response, _)) = self.puts.next() => self.respond(reply, response),
                Some(r) = self.sessions.recv() => self.refuse(r.reply),
                _ = self.swarm.select_next_some() => {}
                _ = &mut deadline => {
                    tracing::warn!(left = self.puts.len(), "in-flight puts did not finish in time");
                    break;
                }
            }
        }
        // Give the last responses a moment to leave.
        let flush_out = tokio::time::sleep(Duration::from_millis(200));
        tokio::pin!(flush_out);
        loop {
            tokio::select! {
                Some(r) = self.sessions.recv() => self.refuse(r.reply),
                _ = self.swarm.select_next_some() => {}
                _ = &mut flush_out => break,
            }
        }
        if let Some(why) = self.fatal.take() {
            // The store cannot flush any more; everything acknowledged already was.
            return Err(RelayError::Store(format!(
                "{why}. Stopped; start the relay again once the disk has space (systemd and Docker restart it automatically)"
            )));
        }
        self.service
            .store()
            .flush()
            .await
            .map_err(|e| RelayError::Store(e.to_string()))?;
        tracing::info!("shutdown complete");
        Ok(())
    }

    /// During drain, new requests are refused so clients move to another relay at once.
    fn refuse(&mut self, reply: Reply) {
        let refusal = RelayToClient::error(
            kkachi_protocol::ErrorCode::ShuttingDown,
            "this relay is shutting down; retry with another relay",
        );
        self.respond(reply, refusal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::swarm::THandler;

    /// Every connection keeps the composed handler for its whole life, so its size is paid
    /// per idle connection. identify's used to be 3.4 KB, most of it an inline queue of
    /// pending events (relay/vendor/libp2p-identify/PATCHED.md).
    #[test]
    fn connection_handler_stays_small() {
        let identify = std::mem::size_of::<THandler<identify::Behaviour>>();
        let all = std::mem::size_of::<THandler<Behaviour>>();
        assert!(identify <= 1_536, "identify's handler is {identify} bytes");
        assert!(
            all <= 3_072,
            "the relay's connection handler is {all} bytes"
        );
    }
}
