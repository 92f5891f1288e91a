//! The task that owns the libp2p Swarm: the network's one event loop. It runs commands
//! from [`super::Network`] handles (dial, keep relay reservations, seek a direct path to
//! a contact), answers pending dials as connections come up or fail, keeps track of who
//! is connected and how, and serves the session streams contacts open to hand us
//! envelopes directly.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kkachi_protocol::{ClientToRelay, ErrorCode, Multiaddr, PeerId, RelayToClient};
use kkachi_relay::framing::Request;
use kkachi_relay::session::{SESSION_PROTOCOL, SessionRequest};
use kkachi_relay::transport;
use libp2p::core::transport::ListenerId;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{Swarm, dcutr, identify, ping, relay};
use parking_lot::RwLock;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

use super::{DirectReply, NetConfig, NetError, NetEvent};
use crate::backoff::Backoff;

/// Waits before asking a relay that refused a reservation again.
const RESERVE_AGAIN: Backoff = Backoff {
    first: Duration::from_secs(2),
    max: Duration::from_secs(300),
};
/// Waits between attempts to reach a contact through its relays.
const SEEK_AGAIN: Backoff = Backoff {
    first: Duration::from_secs(1),
    max: Duration::from_secs(30),
};
/// How long a circuit we opened to a contact may stay up without hole punching having
/// made a direct connection: DCUtR makes its few attempts on a circuit within this
/// (each exchange may take up to 10 s), then none again on it, so the circuit is closed
/// and the next attempt opens another.
const HOLE_PUNCH_PATIENCE: Duration = Duration::from_secs(60);
/// A contact's session with us that has been quiet this long is closed.
const DIRECT_SESSION_IDLE: Duration = Duration::from_secs(120);
/// Requests from contacts' sessions waiting for this task.
const DIRECT_REQUESTS: usize = 256;

/// What a [`super::Network`] handle asks of the task.
pub(super) enum Command {
    /// Keep reservations at exactly these relays (ours) so contacts can reach us.
    ReserveAt(Vec<Multiaddr>),
    /// Connect to a contact through one of its relays (then DCUtR may go direct).
    SeekDirect {
        peer: PeerId,
        relays: Vec<Multiaddr>,
    },
    /// Connect to `peer` (at `addr` if given); answered once connected or failed.
    Dial {
        peer: PeerId,
        addr: Option<Multiaddr>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    /// Close every connection to `peer` (it stopped answering over them).
    Disconnect(PeerId),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::ReserveAt(relays) => write!(f, "ReserveAt({} relays)", relays.len()),
            Command::SeekDirect { peer, .. } => write!(f, "SeekDirect({peer})"),
            Command::Dial { peer, .. } => write!(f, "Dial({peer})"),
            Command::Disconnect(peer) => write!(f, "Disconnect({peer})"),
        }
    }
}

/// What the task shares with the handles.
#[derive(Debug, Default)]
pub(super) struct PeerState {
    pub(super) lan: HashSet<PeerId>,
    pub(super) listen: Vec<Multiaddr>,
    /// Open connections per connected peer, and whether each goes through a relay (a
    /// circuit).
    pub(super) links: HashMap<PeerId, Vec<(ConnectionId, bool)>>,
}

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    gate: super::gate::Behaviour,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
    session: libp2p_stream::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// A circuit relay reservation we keep at one of our relays. It is asked for only over
/// an established connection: asking while the connection is still being dialled (by
/// a mailbox request, say) makes the relay client's own dial fail and the listener
/// close at once. A reservation dies with its connection and is asked for again when
/// the relay is back.
#[derive(Debug)]
struct Reservation {
    addr: Multiaddr,
    listener: Option<ListenerId>,
    /// Consecutive refusals; reset once the relay grants one.
    refusals: u32,
    not_before: Instant,
}

pub(super) struct NetworkTask {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    state: Arc<RwLock<PeerState>>,
    /// Dials waiting for their connection, by peer.
    dialing: HashMap<PeerId, Vec<oneshot::Sender<Result<(), NetError>>>>,
    /// Requests read off the session streams contacts opened to us (none without
    /// [`NetConfig::direct`]).
    direct: Option<mpsc::Receiver<SessionRequest>>,
    /// Reservations wanted at our own relays, by relay peer id.
    reservations: HashMap<PeerId, Reservation>,
    /// Contacts we are trying to reach through their relays: attempts so far and when
    /// the next may start. Forgotten once connected directly.
    seeking: HashMap<PeerId, (u32, Instant)>,
    /// When each connection we opened through a relay (a circuit we dialled) opened.
    /// Circuits contacts opened to us are theirs to give up.
    relayed_at: HashMap<ConnectionId, Instant>,
    /// Contacts found (and lost) on the local network by their beacons (none without
    /// [`NetConfig::lan`]).
    lan: Option<mpsc::Receiver<super::beacon::Seen>>,
    /// Where contacts found on the LAN listen, for dials that name no address.
    lan_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// What the beacons carry: our ports are kept up to date here.
    beacon: Arc<RwLock<super::beacon::Shared>>,
}

impl NetworkTask {
    /// Builds the Swarm as `keypair`, listening as `config` says; returns the task (to
    /// be spawned) and the control that opens session streams.
    pub(super) fn new(
        keypair: Keypair,
        config: &NetConfig,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<NetEvent>,
        state: Arc<RwLock<PeerState>>,
        allowed: super::gate::Allowed,
        beacon: Arc<RwLock<super::beacon::Shared>>,
    ) -> Result<(Self, libp2p_stream::Control), NetError> {
        let local = keypair.public().to_peer_id();
        let setup =
            |e: &dyn std::fmt::Display| NetError::Unreachable(format!("network setup failed: {e}"));
        let lan = (config.lan && config.direct).then(|| {
            let (tx, rx) = mpsc::channel(64);
            let shared = beacon.clone();
            tokio::spawn(async move {
                if let Err(e) = super::beacon::run(local, shared, tx).await {
                    tracing::warn!(error = %e, "cannot look for contacts on the local network");
                }
            });
            rx
        });
        let mut swarm = transport::swarm_with_relay_client(
            keypair,
            |key, relay_client| Behaviour {
                gate: super::gate::Behaviour::new(allowed),
                relay_client,
                dcutr: dcutr::Behaviour::new(key.public().to_peer_id()),
                session: libp2p_stream::Behaviour::new(),
                identify: identify::Behaviour::new(transport::identify_config(
                    key.public(),
                    "kkachi",
                )),
                ping: ping::Behaviour::default(),
            },
            // A dialer proposing one protocol sends its first message with the proposal
            // instead of waiting for the confirmation: one round trip fewer per stream.
            |c| {
                c.with_idle_connection_timeout(Duration::from_secs(60))
                    .with_substream_upgrade_protocol_override(
                        libp2p::core::upgrade::Version::V1Lazy,
                    )
            },
        )
        .map_err(|e| NetError::Setup(Arc::new(e)))?;
        for addr in config.listen.iter().filter(|_| config.direct) {
            swarm.listen_on(addr.clone()).map_err(|e| setup(&e))?;
        }
        let mut control = swarm.behaviour().session.new_control();
        let direct = if config.direct {
            let incoming = control.accept(SESSION_PROTOCOL).map_err(|e| setup(&e))?;
            let (tx, rx) = mpsc::channel(DIRECT_REQUESTS);
            tokio::spawn(kkachi_relay::session::accept(
                incoming,
                tx,
                DIRECT_SESSION_IDLE,
            ));
            Some(rx)
        } else {
            None
        };
        let task = Self {
            swarm,
            commands,
            events,
            state,
            dialing: HashMap::new(),
            direct,
            reservations: HashMap::new(),
            seeking: HashMap::new(),
            relayed_at: HashMap::new(),
            lan,
            lan_addrs: HashMap::new(),
            beacon,
        };
        Ok((task, control))
    }

    pub(super) async fn run(mut self) {
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break, // every handle dropped
                },
                Some(request) = recv(&mut self.direct) => self.on_direct_request(request).await,
                Some(seen) = recv(&mut self.lan) => self.on_lan(seen).await,
                event = self.swarm.select_next_some() => self.on_event(event).await,
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ReserveAt(relays) => {
                let wanted: HashMap<PeerId, Multiaddr> = relays
                    .into_iter()
                    .filter_map(|a| super::peer_of(&a).map(|p| (p, a)))
                    .collect();
                let swarm = &mut self.swarm;
                self.reservations.retain(|peer, r| {
                    let keep = wanted.contains_key(peer);
                    if let (false, Some(listener)) = (keep, r.listener) {
                        swarm.remove_listener(listener);
                    }
                    keep
                });
                for (peer, addr) in wanted {
                    self.reservations.entry(peer).or_insert(Reservation {
                        addr,
                        listener: None,
                        refusals: 0,
                        not_before: Instant::now(),
                    });
                    self.reserve(peer);
                }
            }
            Command::SeekDirect { peer, relays } => self.seek_direct(peer, &relays),
            Command::Dial { peer, addr, reply } => self.dial(peer, addr, reply),
            Command::Disconnect(peer) => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }

    /// Connects to `peer`, answering `reply` once connected (at once if already) or
    /// failed. Dials to one peer share one attempt.
    fn dial(
        &mut self,
        peer: PeerId,
        addr: Option<Multiaddr>,
        reply: oneshot::Sender<Result<(), NetError>>,
    ) {
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(()));
            return;
        }
        let opts = match addr {
            Some(addr) => {
                let bare: Multiaddr = addr
                    .iter()
                    .filter(|p| !matches!(p, Protocol::P2p(_)))
                    .collect();
                // Kept, so a session opened after the connection went can dial again.
                self.swarm.add_peer_address(peer, bare.clone());
                DialOpts::peer_id(peer).addresses(vec![bare]).build()
            }
            None => match self.lan_addrs.get(&peer) {
                Some(addrs) => DialOpts::peer_id(peer).addresses(addrs.clone()).build(),
                None => DialOpts::peer_id(peer).build(),
            },
        };
        match self.swarm.dial(opts) {
            Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {
                self.dialing.entry(peer).or_default().push(reply);
            }
            Err(e) => {
                let _ = reply.send(Err(NetError::Unreachable(format!("{peer}: {e}"))));
            }
        }
    }

    /// Answers the dials waiting for `peer`.
    fn dialled(&mut self, peer: PeerId, result: Result<(), NetError>) {
        for reply in self.dialing.remove(&peer).unwrap_or_default() {
            let _ = reply.send(result.clone());
        }
    }

    /// Asks `relay` for a reservation if we want one, hold none, and it has not refused
    /// us recently; connects to it first (relay requests go over another identity, so
    /// this one is not connected to our relays otherwise).
    fn reserve(&mut self, relay: PeerId) {
        let connected = self.swarm.is_connected(&relay);
        let Some(r) = self.reservations.get_mut(&relay) else {
            return;
        };
        if r.listener.is_some() || Instant::now() < r.not_before {
            return;
        }
        if !connected {
            // Asked again once the connection is up.
            if let Err(e) = self.swarm.dial(r.addr.clone()) {
                tracing::debug!(%relay, error = %e, "cannot connect for a reservation");
            }
            return;
        }
        match self
            .swarm
            .listen_on(r.addr.clone().with(Protocol::P2pCircuit))
        {
            Ok(id) => r.listener = Some(id),
            Err(e) => tracing::debug!(%relay, error = %e, "cannot ask relay for a reservation"),
        }
    }

    /// Dials `peer` through one of its relays (taking them in turn), unless connected
    /// or an attempt was made too recently. DCUtR then tries for a direct connection.
    /// The contact's reservation may not be in place yet, so attempts back off
    /// ([`SEEK_AGAIN`]).
    fn seek_direct(&mut self, peer: PeerId, relays: &[Multiaddr]) {
        if relays.is_empty() {
            return;
        }
        if self.swarm.is_connected(&peer) {
            self.close_circuits(peer, HOLE_PUNCH_PATIENCE);
            return;
        }
        let (attempts, not_before) = self
            .seeking
            .get(&peer)
            .copied()
            .unwrap_or((0, Instant::now()));
        if Instant::now() < not_before {
            return;
        }
        let wait = SEEK_AGAIN.wait(attempts, rand::random());
        self.seeking
            .insert(peer, (attempts.saturating_add(1), Instant::now() + wait));
        let relay = &relays[attempts as usize % relays.len()];
        let addr = relay
            .clone()
            .with(Protocol::P2pCircuit)
            .with(Protocol::P2p(peer));
        tracing::debug!(%peer, via = %addr, "reaching a contact through its relay");
        if let Err(e) = self.swarm.dial(addr) {
            tracing::debug!(%peer, error = %e, "dial through relay failed");
        }
    }

    /// A circuit listener closed: its connection went away (ask again when it is back)
    /// or the relay refused (ask again later, backing off).
    fn on_listener_closed(&mut self, listener: ListenerId, refused: Option<String>) {
        let Some((relay, r)) = self
            .reservations
            .iter_mut()
            .find(|(_, r)| r.listener == Some(listener))
        else {
            return;
        };
        r.listener = None;
        let relay = *relay;
        match refused {
            Some(reason) => {
                r.refusals = r.refusals.saturating_add(1);
                let wait = RESERVE_AGAIN.wait(r.refusals, rand::random());
                r.not_before = Instant::now() + wait;
                tracing::info!(%relay, %reason, ?wait, "relay refused a reservation");
            }
            None => {
                tracing::debug!(%relay, "reservation ended with its connection");
                self.reserve(relay);
            }
        }
    }

    /// Our beacons carry the ports we listen on now.
    fn beacon_ports(&self) {
        let ports = super::beacon::ports_of(&self.state.read().listen);
        self.beacon.write().ports = ports;
    }

    /// A contact's beacon was seen (or its beacons stopped): it is reachable at the
    /// addresses it came from, and counts as on the LAN.
    async fn on_lan(&mut self, seen: super::beacon::Seen) {
        match seen {
            super::beacon::Seen::Found(peer, addrs) => {
                let bare: Vec<Multiaddr> = addrs
                    .iter()
                    .map(|a| {
                        a.iter()
                            .filter(|p| !matches!(p, Protocol::P2p(_)))
                            .collect()
                    })
                    .collect();
                for addr in &bare {
                    self.swarm.add_peer_address(peer, addr.clone());
                }
                self.lan_addrs.insert(peer, bare);
                if self.state.write().lan.insert(peer) {
                    tracing::info!(%peer, "found a contact on the local network");
                    Self::emit(&self.events, NetEvent::LanPeer { peer, up: true }).await;
                }
            }
            super::beacon::Seen::Gone(peer) => {
                self.lan_addrs.remove(&peer);
                if self.state.write().lan.remove(&peer) {
                    tracing::info!(%peer, "a contact left the local network");
                    Self::emit(&self.events, NetEvent::LanPeer { peer, up: false }).await;
                }
            }
        }
    }

    async fn emit(events: &mpsc::Sender<NetEvent>, event: NetEvent) {
        // Bounded: if the application falls behind, the network waits for it.
        let _ = events.send(event).await;
    }

    async fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr {
                address,
                listener_id,
            } => {
                if let Some(r) = self
                    .reservations
                    .values_mut()
                    .find(|r| r.listener == Some(listener_id))
                {
                    r.refusals = 0;
                }
                tracing::debug!(%address, "listening");
                self.state.write().listen.push(address);
                self.beacon_ports();
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.state.write().listen.retain(|a| a != &address);
                self.beacon_ports();
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                self.state.write().listen.retain(|a| !addresses.contains(a));
                let refused = reason.err().map(|e| e.to_string());
                self.on_listener_closed(listener_id, refused);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let relayed = endpoint.is_relayed();
                self.link_up(peer_id, connection_id, relayed);
                if relayed && endpoint.is_dialer() {
                    self.relayed_at.insert(connection_id, Instant::now());
                }
                self.dialled(peer_id, Ok(()));
                if !relayed {
                    // Reached directly: attempts start over if it is lost. Through a
                    // relay only, they keep backing off while hole punching fails.
                    self.seeking.remove(&peer_id);
                }
                if num_established.get() == 1 {
                    self.reserve(peer_id);
                    let event = NetEvent::Connection {
                        peer: peer_id,
                        up: true,
                    };
                    Self::emit(&self.events, event).await;
                }
            }
            // Those waiting hear of a failed dial unless another connection made it.
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } if !self.swarm.is_connected(&peer) => {
                self.dialled(peer, Err(NetError::Unreachable(format!("{peer}: {error}"))));
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.link_down(peer_id, connection_id);
                if num_established == 0 {
                    let event = NetEvent::Connection {
                        peer: peer_id,
                        up: false,
                    };
                    Self::emit(&self.events, event).await;
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(event)) => match event.result {
                Ok(_) => {
                    tracing::info!(peer = %event.remote_peer_id, "direct connection through hole punching")
                }
                Err(e) => {
                    tracing::debug!(peer = %event.remote_peer_id, error = %e, "hole punching failed");
                    // Not tried again on that circuit: the one we opened goes, and the
                    // next attempt (backing off) opens another.
                    self.close_circuits(event.remote_peer_id, Duration::ZERO);
                }
            },
            _ => {}
        }
    }

    /// Records a new connection. Once a peer is reachable directly, its relayed
    /// connections go: requests are spread over all of a peer's connections, so half
    /// would still take the long way through the relay, and each circuit holds one of
    /// the relay's few circuit slots.
    fn link_up(&mut self, peer: PeerId, id: ConnectionId, relayed: bool) {
        let redundant: Vec<ConnectionId> = {
            let mut state = self.state.write();
            let links = state.links.entry(peer).or_default();
            links.push((id, relayed));
            if links.iter().any(|(_, relayed)| !relayed) {
                links
                    .iter()
                    .filter(|(_, relayed)| *relayed)
                    .map(|(id, _)| *id)
                    .collect()
            } else {
                Vec::new()
            }
        };
        for id in redundant {
            tracing::debug!(%peer, "direct connection up: closing the relayed one");
            self.swarm.close_connection(id);
        }
    }

    /// Closes the circuits we opened to `peer` that have been up at least `patience`,
    /// if it has no direct connection: hole punching is over on them.
    fn close_circuits(&mut self, peer: PeerId, patience: Duration) {
        let stale: Vec<ConnectionId> = {
            let state = self.state.read();
            let Some(links) = state.links.get(&peer) else {
                return;
            };
            if links.iter().any(|(_, relayed)| !relayed) {
                return;
            }
            links
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| {
                    self.relayed_at
                        .get(id)
                        .is_some_and(|at| at.elapsed() >= patience)
                })
                .collect()
        };
        for id in stale {
            tracing::debug!(%peer, "no direct connection through this circuit: closing it");
            self.swarm.close_connection(id);
        }
    }

    fn link_down(&mut self, peer: PeerId, id: ConnectionId) {
        self.relayed_at.remove(&id);
        let mut state = self.state.write();
        if let Some(links) = state.links.get_mut(&peer) {
            links.retain(|(c, _)| *c != id);
            if links.is_empty() {
                state.links.remove(&peer);
            }
        }
    }

    /// A peer asks something of us over a session: we take puts meant for us (the
    /// engine decides whose; the write keys name no queue here), nothing else.
    async fn on_direct_request(&mut self, r: SessionRequest) {
        let refusal = match r.request {
            Request::Message(ClientToRelay::Put { items }) => {
                let event = NetEvent::DirectPut {
                    from: r.peer,
                    envelopes: items.into_iter().map(|i| i.envelope).collect(),
                    reply: DirectReply(r.reply),
                };
                Self::emit(&self.events, event).await;
                return;
            }
            Request::Message(_) => RelayToClient::error(
                ErrorCode::NotOwner,
                "this is a kkachi client, not a relay; it takes direct puts for its own mailbox only",
            ),
            Request::Malformed(e) => RelayToClient::error(
                ErrorCode::Malformed,
                format!("request could not be decoded: {e}"),
            ),
        };
        r.reply.send(refusal);
    }
}

/// The next request from contacts' sessions; never, without them.
async fn recv<T>(channel: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match channel {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
