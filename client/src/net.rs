//! The network task: the only owner of the libp2p Swarm.
//!
//! Everything else talks to it through [`Network`], a cheap handle sending commands on a
//! bounded channel with oneshot replies; it reports what happens as [`NetEvent`]s on
//! another bounded channel (as in rust-libp2p's file-sharing example).
//!
//! Requests to a relay go over one long-lived session stream (`/kkachi/relay/2`), written
//! from the caller's task; a relay that does not speak it gets `/kkachi/relay/1`, one
//! stream per request through this task. The node also speaks `/kkachi/relay/1` inbound
//! from contacts on the same network, who hand envelopes for *our* mailbox straight to
//! us (a client accepts puts into its own mailbox only). mDNS finds those contacts with
//! no relay and no internet at all.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kkachi_protocol::{ClientToRelay, Envelope, Multiaddr, PeerId, RelayToClient};
use kkachi_relay::codec::{PROTOCOL, REQUEST_TIMEOUT, RelayCodec, Request};
use kkachi_relay::session::Session;
use libp2p::core::transport::ListenerId;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{Swarm, dcutr, identify, mdns, noise, ping, relay, tcp, yamux};
use parking_lot::RwLock;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

/// Capacity of the command channel into the network task.
const COMMANDS: usize = 256;
/// Capacity of the event channel out of it.
const EVENTS: usize = 1024;
/// After a relay refused a reservation, wait this long before asking again (doubling).
const RESERVE_BACKOFF: Duration = Duration::from_secs(2);
/// The longest wait between reservation attempts at a relay that keeps refusing.
const RESERVE_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// First wait between attempts to reach a contact through its relays (doubling).
const SEEK_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between those attempts.
const SEEK_MAX: Duration = Duration::from_secs(30);
/// Longest wait for a session stream to a connected relay to open.
const SESSION_OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a relay whose session closed before its first answer (it does not speak
/// `/kkachi/relay/2`) is spoken to with `/kkachi/relay/1` only.
const SESSION_FALLBACK: Duration = Duration::from_secs(600);

/// Why a network operation failed.
#[derive(Debug, Clone, Error)]
pub enum NetError {
    /// The address has no `/p2p/<peer id>`.
    #[error("address {0} must end with /p2p/<peer id>")]
    NoPeerId(String),
    /// The peer could not be reached, or the exchange failed.
    #[error("{0}")]
    Unreachable(String),
    /// The network task has stopped.
    #[error("the network task stopped")]
    Stopped,
}

/// What the network reports.
#[derive(Debug)]
pub enum NetEvent {
    /// A contact handed us envelopes directly. Answer on `reply` once they are durable
    /// (dropping it unanswered makes the sender retry).
    DirectPut {
        /// Who sent them.
        from: PeerId,
        /// The envelopes.
        envelopes: Vec<Envelope>,
        /// Where the answer goes.
        reply: DirectReply,
    },
    /// A peer was found on the local network (or lost).
    LanPeer {
        /// The peer.
        peer: PeerId,
        /// Found (true) or gone (false).
        up: bool,
    },
    /// A connection to a peer opened (or its last one closed).
    Connection {
        /// The peer.
        peer: PeerId,
        /// Open (true) or closed (false).
        up: bool,
    },
}

/// The answer to a direct put, routed back into the network task.
#[derive(Debug)]
pub struct DirectReply {
    channel: ResponseChannel<RelayToClient>,
    answers: mpsc::Sender<(ResponseChannel<RelayToClient>, RelayToClient)>,
}

impl DirectReply {
    /// Sends the answer to the peer.
    pub async fn send(self, response: RelayToClient) {
        let _ = self.answers.send((self.channel, response)).await;
    }
}

/// What the engine needs from a network: relay requests and direct handovers.
/// [`Network`] is the real one; tests use in-memory fakes.
pub trait Transport: Clone + Send + Sync + 'static {
    /// Sends one request to the relay at `relay` (ending in `/p2p/<id>`).
    fn request(
        &self,
        relay: &Multiaddr,
        request: ClientToRelay,
    ) -> impl Future<Output = Result<RelayToClient, NetError>> + Send;

    /// Hands envelopes to a contact directly.
    fn direct_put(
        &self,
        peer: PeerId,
        envelopes: Vec<Envelope>,
    ) -> impl Future<Output = Result<RelayToClient, NetError>> + Send;

    /// Peers reachable directly right now (on the LAN, connected).
    fn direct_peers(&self) -> HashSet<PeerId>;

    /// Peers with an open connection right now.
    fn connected(&self) -> HashSet<PeerId>;

    /// Try for a direct connection to `peer` through one of its `relays` (circuit relay,
    /// then hole punching). Returns at once; attempts to one peer back off.
    fn seek_direct(&self, _peer: PeerId, _relays: &[Multiaddr]) {}
}

enum Command {
    /// Keep reservations at exactly these relays (ours) so contacts can reach us.
    ReserveAt(Vec<Multiaddr>),
    /// Connect to a contact through one of its relays (then DCUtR may go direct).
    SeekDirect {
        peer: PeerId,
        relays: Vec<Multiaddr>,
    },
    Request {
        peer: PeerId,
        addr: Option<Multiaddr>,
        request: ClientToRelay,
        reply: oneshot::Sender<Result<RelayToClient, NetError>>,
    },
}

/// Handle to the network task.
#[derive(Clone)]
pub struct Network {
    commands: mpsc::Sender<Command>,
    state: Arc<RwLock<PeerState>>,
    local: PeerId,
    /// [`NetConfig::direct`].
    direct: bool,
    control: libp2p_stream::Control,
    /// The session with each relay spoken to, opened on first use.
    sessions: Arc<parking_lot::Mutex<HashMap<PeerId, Arc<tokio::sync::Mutex<SessionSlot>>>>>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("local", &self.local)
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

/// What is known of the session with one relay.
#[derive(Debug, Default)]
enum SessionSlot {
    /// None open.
    #[default]
    Closed,
    /// Open.
    Open(Arc<Session>),
    /// The relay speaks `/kkachi/relay/1` only (asked again after this instant).
    OneOnly(Instant),
}

#[derive(Debug, Default)]
struct PeerState {
    lan: HashSet<PeerId>,
    listen: Vec<Multiaddr>,
    /// Open connections per connected peer, and whether each goes through a relay (a
    /// circuit).
    links: HashMap<PeerId, Vec<(ConnectionId, bool)>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Request { peer, .. } => write!(f, "Request({peer})"),
            Command::ReserveAt(relays) => write!(f, "ReserveAt({} relays)", relays.len()),
            Command::SeekDirect { peer, .. } => write!(f, "SeekDirect({peer})"),
        }
    }
}

/// Options for starting the network.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Addresses to listen on (for direct delivery from contacts).
    pub listen: Vec<Multiaddr>,
    /// Look for contacts on the local network with mDNS.
    pub mdns: bool,
    /// Connect to contacts directly (LAN, hole punching) and take deliveries from them.
    /// Off: relays only. Contacts never learn our addresses, and nobody on the LAN sees
    /// us (no listening, no mDNS, no circuit reservations).
    pub direct: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/0".parse().expect("valid"),
                "/ip4/0.0.0.0/udp/0/quic-v1".parse().expect("valid"),
            ],
            mdns: true,
            direct: true,
        }
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
    mailbox: request_response::Behaviour<RelayCodec>,
    session: libp2p_stream::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// The peer id at the end of a multiaddr.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

impl Network {
    /// Open connections to `peer`: how many are direct, and how many go through a relay.
    pub fn links(&self, peer: &PeerId) -> (usize, usize) {
        self.state.read().links.get(peer).map_or((0, 0), |links| {
            let relayed = links.iter().filter(|(_, relayed)| *relayed).count();
            (links.len() - relayed, relayed)
        })
    }

    /// Starts the network task as `keypair`; returns the handle and the event stream.
    pub fn start(
        keypair: Keypair,
        config: NetConfig,
    ) -> Result<(Self, mpsc::Receiver<NetEvent>), NetError> {
        let local = keypair.public().to_peer_id();
        let transport_err =
            |e: &dyn std::fmt::Display| NetError::Unreachable(format!("network setup failed: {e}"));
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| transport_err(&e))?
            .with_quic()
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| transport_err(&e))?
            .with_behaviour(
                |key,
                 relay_client|
                 -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
                    let mdns = if config.mdns && config.direct {
                        Some(mdns::tokio::Behaviour::new(
                            mdns::Config {
                                query_interval: Duration::from_secs(5),
                                ..Default::default()
                            },
                            key.public().to_peer_id(),
                        )?)
                    } else {
                        None
                    };
                    Ok(Behaviour {
                        relay_client,
                        dcutr: dcutr::Behaviour::new(key.public().to_peer_id()),
                        mailbox: request_response::Behaviour::with_codec(
                            RelayCodec,
                            [(PROTOCOL, ProtocolSupport::Full)],
                            request_response::Config::default()
                                .with_request_timeout(REQUEST_TIMEOUT)
                                .with_max_concurrent_streams(256),
                        ),
                        session: libp2p_stream::Behaviour::new(),
                        identify: identify::Behaviour::new(
                            identify::Config::new("/kkachi/id/1".into(), key.public())
                                .with_agent_version(format!(
                                    "kkachi/{}",
                                    env!("CARGO_PKG_VERSION")
                                )),
                        ),
                        ping: ping::Behaviour::default(),
                        mdns: mdns.into(),
                    })
                },
            )
            .map_err(|e| transport_err(&e))?
            // A dialer proposing one protocol sends its first request with the proposal
            // instead of waiting for the confirmation: one round trip fewer per request.
            .with_swarm_config(|c| {
                c.with_idle_connection_timeout(Duration::from_secs(60))
                    .with_substream_upgrade_protocol_override(
                        libp2p::core::upgrade::Version::V1Lazy,
                    )
            })
            .build();
        for addr in config.listen.iter().filter(|_| config.direct) {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| transport_err(&e))?;
        }
        let control = swarm.behaviour().session.new_control();
        let (commands, commands_rx) = mpsc::channel(COMMANDS);
        let (events_tx, events) = mpsc::channel(EVENTS);
        let (answers_tx, answers) = mpsc::channel(COMMANDS);
        let state = Arc::new(RwLock::new(PeerState::default()));
        let task = NetworkTask {
            swarm,
            commands: commands_rx,
            events: events_tx,
            state: state.clone(),
            pending: HashMap::new(),
            local,
            answers,
            answers_tx,
            reservations: HashMap::new(),
            seeking: HashMap::new(),
            direct: config.direct,
        };
        tokio::spawn(task.run());
        Ok((
            Self {
                commands,
                state,
                local,
                direct: config.direct,
                control,
                sessions: Arc::default(),
            },
            events,
        ))
    }

    /// A handle with no network behind it: every request fails at once. For an engine
    /// that only changes local state (contacts) in a process that needs no network.
    pub fn offline(local: PeerId) -> Self {
        let (commands, _) = mpsc::channel(1);
        Self {
            commands,
            state: Arc::default(),
            local,
            direct: false,
            control: libp2p_stream::Behaviour::new().new_control(),
            sessions: Arc::default(),
        }
    }

    /// Our own peer id.
    pub fn local_peer(&self) -> PeerId {
        self.local
    }

    /// Peers found on the local network (mDNS) and not yet expired.
    pub fn lan_peers(&self) -> HashSet<PeerId> {
        self.state.read().lan.clone()
    }

    /// Addresses we listen on.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.state.read().listen.clone()
    }

    /// Keeps a circuit reservation at each of `relays` (ours, each ending in
    /// `/p2p/<id>`) and at no other, so contacts can connect to us through them and
    /// then upgrade to a direct connection (DCUtR). Call it again whenever convenient:
    /// it is idempotent, and a relay that refused is asked again only after a backoff.
    pub async fn reserve_at(&self, relays: Vec<Multiaddr>) {
        // Relays only: a reservation is how contacts would reach us directly.
        let relays = if self.direct { relays } else { Vec::new() };
        let _ = self.commands.send(Command::ReserveAt(relays)).await;
    }

    async fn send(
        &self,
        peer: PeerId,
        addr: Option<Multiaddr>,
        request: ClientToRelay,
    ) -> Result<RelayToClient, NetError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Request {
                peer,
                addr,
                request,
                reply,
            })
            .await
            .map_err(|_| NetError::Stopped)?;
        answer.await.map_err(|_| NetError::Stopped)?
    }
}

impl Network {
    /// Sends `request` over the session with `relay`, opening it if need be. `None`:
    /// send it with `/kkachi/relay/1`, because the relay speaks only that, or because
    /// there is no connection yet (a session is opened only over an open connection;
    /// the request/response path dials, and reports a relay that is down at once).
    async fn session_request(
        &self,
        peer: PeerId,
        request: &ClientToRelay,
    ) -> Option<Result<RelayToClient, NetError>> {
        let slot = self.sessions.lock().entry(peer).or_default().clone();
        let session = {
            let mut slot = slot.lock().await;
            match &*slot {
                SessionSlot::Open(session) if session.is_open() => session.clone(),
                SessionSlot::OneOnly(until) if Instant::now() < *until => return None,
                _ if !self.state.read().links.contains_key(&peer) => return None,
                _ => match self.open_session(peer).await {
                    Ok(session) => {
                        *slot = SessionSlot::Open(session.clone());
                        session
                    }
                    Err(e) => return Some(Err(e)),
                },
            }
        };
        match session.request(request).await {
            Ok(answer) => Some(Ok(answer)),
            Err(e) if !session.was_answered() => {
                // Closed before any answer: most likely a relay that does not speak the
                // session protocol. Every request is idempotent, so it goes again the
                // old way.
                tracing::debug!(relay = %peer, error = %e, "no session; using /kkachi/relay/1");
                let mut slot = slot.lock().await;
                if matches!(&*slot, SessionSlot::Open(s) if Arc::ptr_eq(s, &session)) {
                    *slot = SessionSlot::OneOnly(Instant::now() + SESSION_FALLBACK);
                }
                None
            }
            Err(e) => Some(Err(NetError::Unreachable(format!("{peer}: {e}")))),
        }
    }

    async fn open_session(&self, peer: PeerId) -> Result<Arc<Session>, NetError> {
        Session::open(&mut self.control.clone(), peer, SESSION_OPEN_TIMEOUT)
            .await
            .map_err(|e| NetError::Unreachable(format!("{peer}: {e}")))
    }
}

impl Transport for Network {
    async fn request(
        &self,
        relay: &Multiaddr,
        request: ClientToRelay,
    ) -> Result<RelayToClient, NetError> {
        let peer = peer_of(relay).ok_or_else(|| NetError::NoPeerId(relay.to_string()))?;
        match self.session_request(peer, &request).await {
            Some(result) => result,
            None => self.send(peer, Some(relay.clone()), request).await,
        }
    }

    async fn direct_put(
        &self,
        peer: PeerId,
        envelopes: Vec<Envelope>,
    ) -> Result<RelayToClient, NetError> {
        self.send(peer, None, ClientToRelay::Put { envelopes })
            .await
    }

    fn direct_peers(&self) -> HashSet<PeerId> {
        if !self.direct {
            return HashSet::new();
        }
        let s = self.state.read();
        s.lan.iter().chain(s.links.keys()).copied().collect()
    }

    fn connected(&self) -> HashSet<PeerId> {
        self.state.read().links.keys().copied().collect()
    }

    fn seek_direct(&self, peer: PeerId, relays: &[Multiaddr]) {
        if !self.direct || relays.is_empty() || self.state.read().links.contains_key(&peer) {
            return;
        }
        let relays = relays.to_vec();
        // Best effort: a full command queue means the task is busy; the next call retries.
        let _ = self.commands.try_send(Command::SeekDirect { peer, relays });
    }
}

type Reply = oneshot::Sender<Result<RelayToClient, NetError>>;

struct NetworkTask {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    state: Arc<RwLock<PeerState>>,
    pending: HashMap<OutboundRequestId, Reply>,
    local: PeerId,
    /// Answers to direct puts, produced by the application.
    answers: mpsc::Receiver<(ResponseChannel<RelayToClient>, RelayToClient)>,
    answers_tx: mpsc::Sender<(ResponseChannel<RelayToClient>, RelayToClient)>,
    /// Reservations wanted at our own relays, by relay peer id.
    reservations: HashMap<PeerId, Reservation>,
    /// Contacts we are trying to reach through their relays: attempts so far and when
    /// the next may start. Forgotten once connected.
    seeking: HashMap<PeerId, (u32, Instant)>,
    /// [`NetConfig::direct`]: off, direct deliveries are refused.
    direct: bool,
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

impl NetworkTask {
    async fn run(mut self) {
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break, // every handle dropped
                },
                Some((channel, response)) = self.answers.recv() => {
                    let _ = self.swarm.behaviour_mut().mailbox.send_response(channel, response);
                }
                event = self.swarm.select_next_some() => self.on_event(event).await,
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ReserveAt(relays) => {
                let wanted: HashMap<PeerId, Multiaddr> = relays
                    .into_iter()
                    .filter_map(|a| peer_of(&a).map(|p| (p, a)))
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
            Command::Request {
                peer,
                addr,
                request,
                reply,
            } => {
                if let Some(addr) = addr {
                    let bare: Multiaddr = addr
                        .iter()
                        .filter(|p| !matches!(p, Protocol::P2p(_)))
                        .collect();
                    self.swarm.add_peer_address(peer, bare);
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .mailbox
                    .send_request(&peer, Request::Message(request));
                self.pending.insert(id, reply);
            }
        }
    }

    /// Asks `relay` for a reservation if we want one, hold none, are connected to it
    /// and it has not refused us recently.
    fn reserve(&mut self, relay: PeerId) {
        let connected = self.swarm.is_connected(&relay);
        let Some(r) = self.reservations.get_mut(&relay) else {
            return;
        };
        if r.listener.is_some() || !connected || Instant::now() < r.not_before {
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
    /// The contact's reservation may not be in place yet, so attempts back off from
    /// `SEEK_FIRST` to `SEEK_MAX`.
    fn seek_direct(&mut self, peer: PeerId, relays: &[Multiaddr]) {
        if relays.is_empty() || self.swarm.is_connected(&peer) {
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
        let wait = SEEK_FIRST
            .saturating_mul(1 << attempts.min(10))
            .min(SEEK_MAX);
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
                let wait = RESERVE_BACKOFF
                    .saturating_mul(1 << r.refusals.min(10))
                    .min(RESERVE_BACKOFF_MAX);
                r.not_before = Instant::now() + wait;
                tracing::info!(%relay, %reason, ?wait, "relay refused a reservation");
            }
            None => {
                tracing::debug!(%relay, "reservation ended with its connection");
                self.reserve(relay);
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
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.state.write().listen.retain(|a| a != &address);
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
                self.link_up(peer_id, connection_id, endpoint.is_relayed());
                if num_established.get() == 1 {
                    self.reserve(peer_id);
                    self.seeking.remove(&peer_id);
                    let event = NetEvent::Connection {
                        peer: peer_id,
                        up: true,
                    };
                    Self::emit(&self.events, event).await;
                }
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
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                let mut new = Vec::new();
                for (peer, addr) in found {
                    if peer == self.local {
                        continue;
                    }
                    self.swarm.add_peer_address(peer, addr);
                    if self.state.write().lan.insert(peer) {
                        new.push(peer);
                    }
                }
                for peer in new {
                    tracing::info!(%peer, "found a peer on the local network");
                    Self::emit(&self.events, NetEvent::LanPeer { peer, up: true }).await;
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(gone))) => {
                let peers: HashSet<PeerId> = gone.into_iter().map(|(p, _)| p).collect();
                for peer in peers {
                    if self.state.write().lan.remove(&peer) {
                        Self::emit(&self.events, NetEvent::LanPeer { peer, up: false }).await;
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mailbox(event)) => self.on_mailbox(event).await,
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(event)) => match event.result {
                Ok(_) => {
                    tracing::info!(peer = %event.remote_peer_id, "direct connection through hole punching")
                }
                Err(e) => {
                    tracing::debug!(peer = %event.remote_peer_id, error = %e, "hole punching failed")
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

    fn link_down(&mut self, peer: PeerId, id: ConnectionId) {
        let mut state = self.state.write();
        if let Some(links) = state.links.get_mut(&peer) {
            links.retain(|(c, _)| *c != id);
            if links.is_empty() {
                state.links.remove(&peer);
            }
        }
    }

    async fn on_mailbox(&mut self, event: request_response::Event<Request, RelayToClient>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    self.on_direct_request(peer, request, channel).await;
                }
            },
            request_response::Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            } => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Unreachable(format!("{peer}: {error}"))));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// A peer speaks the relay protocol to us: we accept puts into our own mailbox.
    async fn on_direct_request(
        &mut self,
        from: PeerId,
        request: Request,
        channel: ResponseChannel<RelayToClient>,
    ) {
        use kkachi_protocol::ErrorCode;
        let mine = kkachi_protocol::MailboxId::for_peer(&self.local);
        let refusal = match request {
            Request::Message(ClientToRelay::Put { .. }) if !self.direct => RelayToClient::error(
                ErrorCode::NotOwner,
                "this client takes deliveries through its relays only",
            ),
            Request::Message(ClientToRelay::Put { envelopes })
                if envelopes.iter().all(|e| e.mailbox == mine) =>
            {
                let reply = DirectReply {
                    channel,
                    answers: self.answers_tx.clone(),
                };
                Self::emit(
                    &self.events,
                    NetEvent::DirectPut {
                        from,
                        envelopes,
                        reply,
                    },
                )
                .await;
                return;
            }
            Request::Message(ClientToRelay::Put { .. }) => RelayToClient::error(
                ErrorCode::NotOwner,
                "a client accepts envelopes for its own mailbox only",
            ),
            Request::Message(ClientToRelay::Info) => RelayToClient::error(
                ErrorCode::NotOwner,
                "this is a kkachi client, not a relay; it accepts direct puts for its own mailbox",
            ),
            Request::Message(_) => {
                RelayToClient::error(ErrorCode::NotOwner, "a client serves only direct puts")
            }
            Request::Malformed(e) => RelayToClient::error(
                ErrorCode::Malformed,
                format!("request could not be decoded: {e}"),
            ),
        };
        let _ = self
            .swarm
            .behaviour_mut()
            .mailbox
            .send_response(channel, refusal);
    }
}
