//! The network: one task owns the libp2p Swarm (`task.rs`); everything else talks to it
//! through [`Network`], a cheap handle sending commands on a bounded channel with oneshot
//! replies, and hears what happens as [`NetEvent`]s on another bounded channel (as in
//! rust-libp2p's file-sharing example).
//!
//! Every exchange, with a relay or a contact, goes over one long-lived session stream
//! per peer (`/kkachi/relay/2`, SPEC §6), opened on first use: the handle asks the task
//! to dial (pending dials are answered when the connection is up or has failed), then
//! opens the stream and writes each request straight to it from the caller's task. A
//! contact on the same network (found by its beacons) or connected directly hands envelopes for *our*
//! mailbox over a session to us, which we serve like a relay would, for puts into our
//! own mailbox only.

mod beacon;
mod gate;
mod task;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kkachi_protocol::lan::LanKey;
use kkachi_protocol::wire::Addressed;
use kkachi_protocol::{ClientToRelay, Envelope, Multiaddr, PeerId, RelayToClient};
use kkachi_relay::session::{Session, SessionError, SessionReply, SessionSlot};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use parking_lot::RwLock;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use task::{Command, NetworkTask, PeerState};

/// Capacity of the command channel into the network task.
const COMMANDS: usize = 256;
/// Capacity of the event channel out of it.
const EVENTS: usize = 1024;
/// Longest wait for a session stream to a connected peer to open.
const SESSION_OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// A request unanswered this long (beyond a long poll's own wait) makes us ask the
/// peer something small on the same session: a connection whose packets vanish (its
/// datacenter cut off) stays open for minutes, and TCP's retransmissions back off for
/// as long after the link is back.
const STALL: Duration = Duration::from_secs(3);
/// How long that small question may take before the connection is given up: closed,
/// so the next request dials afresh.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// The network could not be set up.
    #[error(transparent)]
    Setup(Arc<kkachi_relay::transport::TransportError>),
}

/// What the network reports.
#[derive(Debug)]
pub enum NetEvent {
    /// A peer handed us envelopes for our own mailbox directly. Answer on `reply` once
    /// they are durable (dropping it unanswered makes the sender retry).
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

/// The answer to a direct put, sent back over the session it came on.
#[derive(Debug)]
pub struct DirectReply(SessionReply);

impl DirectReply {
    /// Sends the answer to the peer.
    pub fn send(self, response: RelayToClient) {
        self.0.send(response);
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

    /// Sends one request to the relay at `relay` as the identity that reads our queues
    /// (a put included): for what concerns our own queues alone, so the relay learns
    /// nothing that ties that identity to the one putting into contacts' queues.
    fn request_as_reader(
        &self,
        relay: &Multiaddr,
        request: ClientToRelay,
    ) -> impl Future<Output = Result<RelayToClient, NetError>> + Send {
        self.request(relay, request)
    }

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

    /// Keep a circuit reservation at each of our `relays` (and at no other), so contacts
    /// can reach us through them and then go direct. Returns at once.
    fn reserve_at(&self, _relays: Vec<Multiaddr>) {}

    /// Our contacts are these (with the key each shares with us on the LAN): only they
    /// may connect to us, only they find us on the LAN, and only they count as on it.
    fn allow_only(&self, _contacts: Vec<(PeerId, LanKey)>) {}
}

/// Options for starting the network.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Addresses to listen on (for direct delivery from contacts).
    pub listen: Vec<Multiaddr>,
    /// Look for contacts on the local network (beacons only contacts recognise).
    pub lan: bool,
    /// Connect to contacts directly (LAN, hole punching) and take deliveries from them.
    /// Off: relays only. Contacts never learn our addresses, and nobody on the LAN sees
    /// us (no listening, no beacons, no circuit reservations).
    pub direct: bool,
    /// Also reach contacts through relays (a reservation at each of ours, circuits to
    /// theirs, then hole punching). Off by default: a reservation and a circuit name
    /// our network identity (the one in our card) to those relays, which otherwise
    /// only ever see a throwaway identity.
    pub circuits: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/0".parse().expect("valid"),
                "/ip4/0.0.0.0/udp/0/quic-v1".parse().expect("valid"),
            ],
            lan: true,
            direct: true,
            circuits: false,
        }
    }
}

/// One network task, as the handle reaches it.
#[derive(Clone)]
struct Side {
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    /// The session with each peer spoken to, opened on first use.
    sessions: Arc<parking_lot::Mutex<HashMap<PeerId, Arc<SessionSlot>>>>,
}

impl Side {
    fn offline() -> Self {
        Self {
            commands: mpsc::channel(1).0,
            control: libp2p_stream::Behaviour::new().new_control(),
            sessions: Arc::default(),
        }
    }
}

/// Handle to the network tasks: two speak to relays, each as a throwaway identity made
/// at every start, one reading our queues and one putting into contacts' (so a relay
/// both use cannot tie the reader of a queue to the queues it writes into by identity);
/// relays never see the identity in our card. The third, as that identity, speaks to
/// contacts (on the LAN, or directly).
#[derive(Clone)]
pub struct Network {
    /// To contacts, as `local`.
    contacts: Side,
    /// To relays, reading and granting, as a throwaway identity.
    readers: Side,
    /// To relays, putting, as another.
    writers: Side,
    state: Arc<RwLock<PeerState>>,
    local: PeerId,
    /// [`NetConfig::direct`].
    direct: bool,
    /// [`NetConfig::circuits`] (and direct).
    circuits: bool,
    /// Who may connect to us (see `gate`).
    allowed: gate::Allowed,
    /// The direct path to contacts is cut (the demo's switch): nothing goes to them
    /// directly, and connections to them do not count.
    cut: Arc<std::sync::atomic::AtomicBool>,
    /// What our LAN beacons carry.
    beacon: Arc<RwLock<beacon::Shared>>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("local", &self.local)
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

/// The peer id at the end of a multiaddr.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

impl Network {
    /// Starts the network tasks, towards contacts as `keypair`; returns the handle and
    /// the event stream.
    pub fn start(
        keypair: Keypair,
        config: NetConfig,
    ) -> Result<(Self, mpsc::Receiver<NetEvent>), NetError> {
        let local = keypair.public().to_peer_id();
        let (events_tx, events) = mpsc::channel(EVENTS);
        let state = Arc::new(RwLock::new(PeerState::default()));
        let allowed = gate::Allowed::default();
        let beacon = Arc::<RwLock<beacon::Shared>>::default();
        let side = |keypair, config: &NetConfig, events_tx| -> Result<Side, NetError> {
            let (commands, commands_rx) = mpsc::channel(COMMANDS);
            let (task, control) = NetworkTask::new(
                keypair,
                config,
                commands_rx,
                events_tx,
                state.clone(),
                allowed.clone(),
                beacon.clone(),
            )?;
            tokio::spawn(task.run());
            Ok(Side {
                commands,
                control,
                sessions: Arc::default(),
            })
        };
        let contacts = side(keypair, &config, events_tx.clone())?;
        let relays_only = NetConfig {
            listen: Vec::new(),
            lan: false,
            direct: false,
            circuits: false,
        };
        let readers = side(Keypair::generate_ed25519(), &relays_only, events_tx.clone())?;
        let writers = side(Keypair::generate_ed25519(), &relays_only, events_tx)?;
        Ok((
            Self {
                contacts,
                readers,
                writers,
                state,
                local,
                direct: config.direct,
                circuits: config.direct && config.circuits,
                allowed,
                cut: Arc::default(),
                beacon,
            },
            events,
        ))
    }

    /// A handle with no network behind it: every request fails at once. For an engine
    /// that only changes local state (contacts) in a process that needs no network.
    pub fn offline(local: PeerId) -> Self {
        Self {
            contacts: Side::offline(),
            readers: Side::offline(),
            writers: Side::offline(),
            state: Arc::default(),
            local,
            direct: false,
            circuits: false,
            allowed: gate::Allowed::default(),
            cut: Arc::default(),
            beacon: Arc::default(),
        }
    }

    /// Cuts the direct path to contacts (`true`) or restores it: while cut, envelopes
    /// go to contacts through relays only, and connections to contacts do not count as
    /// reaching them (the demo's switch, as a network between two people failing).
    pub fn set_direct_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::Relaxed);
    }

    /// Connects to contact `peer` directly at `addr` (where it is known to listen, as
    /// two users of one machine are); returns once connected, or why not.
    pub async fn connect_contact(&self, peer: PeerId, addr: Multiaddr) -> Result<(), NetError> {
        self.contacts.dial(peer, Some(addr)).await
    }

    fn is_cut(&self) -> bool {
        self.cut.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Our own peer id.
    pub fn local_peer(&self) -> PeerId {
        self.local
    }

    /// Open connections to `peer`: how many are direct, and how many go through a relay.
    pub fn links(&self, peer: &PeerId) -> (usize, usize) {
        self.state.read().links.get(peer).map_or((0, 0), |links| {
            let relayed = links.iter().filter(|(_, relayed)| *relayed).count();
            (links.len() - relayed, relayed)
        })
    }

    /// Contacts found on the local network (by their beacons) and not yet gone (anyone found,
    /// until the engine has said who our contacts are).
    pub fn lan_peers(&self) -> HashSet<PeerId> {
        let lan = self.state.read().lan.clone();
        match &*self.allowed.read() {
            Some(contacts) => lan.intersection(contacts).copied().collect(),
            None => lan,
        }
    }

    /// Addresses we listen on.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.state.read().listen.clone()
    }
}

impl Side {
    /// Connects to `peer` (at `addr`, or wherever it is known to be); returns once the
    /// connection is up, or why it could not be made.
    async fn dial(&self, peer: PeerId, addr: Option<Multiaddr>) -> Result<(), NetError> {
        let (reply, done) = oneshot::channel();
        self.commands
            .send(Command::Dial { peer, addr, reply })
            .await
            .map_err(|_| NetError::Stopped)?;
        done.await.map_err(|_| NetError::Stopped)?
    }

    /// The open session with `peer`, dialling and opening one if need be.
    async fn session(
        &self,
        peer: PeerId,
        addr: Option<&Multiaddr>,
    ) -> Result<Arc<Session>, NetError> {
        let slot = self.sessions.lock().entry(peer).or_default().clone();
        slot.get_or_open(|| async {
            self.dial(peer, addr.cloned()).await?;
            Session::open(&mut self.control.clone(), peer, SESSION_OPEN_TIMEOUT)
                .await
                .map_err(|e| NetError::Unreachable(format!("{peer}: {e}")))
        })
        .await
    }

    /// One request to `peer` over its session. Every request is idempotent, so one
    /// whose session closed under it goes again, once, on a new session. A relay's
    /// session is watched for stalls ([`Side::watched`]); a contact's is not (a direct
    /// hand-over only adds a path, and a slow contact is no dead datacenter).
    async fn exchange(
        &self,
        peer: PeerId,
        addr: Option<&Multiaddr>,
        request: &ClientToRelay,
        relay: bool,
    ) -> Result<RelayToClient, NetError> {
        let mut again = true;
        loop {
            let session = self.session(peer, addr).await?;
            let answer = if relay {
                self.watched(peer, &session, request).await
            } else {
                session.request(request).await
            };
            match answer {
                Ok(answer) => return Ok(answer),
                Err(SessionError::Closed(_)) if again => again = false,
                Err(e) => return Err(NetError::Unreachable(format!("{peer}: {e}"))),
            }
        }
    }

    /// `request` over `session`. While it waits, the session must show its peer is
    /// there: once nothing has come in (and no write has gone out) for [`STALL`] past
    /// the request's own patience, a small question on the same session tells a quiet
    /// peer from a dead connection; with no answer to it, and still nothing heard, the
    /// connection is closed (the request fails as closed, and goes again on a new one).
    async fn watched(
        &self,
        peer: PeerId,
        session: &Session,
        request: &ClientToRelay,
    ) -> Result<RelayToClient, SessionError> {
        let patience = match request {
            ClientToRelay::Subscribe { wait_ms, .. } => {
                STALL + Duration::from_millis(u64::from(*wait_ms))
            }
            _ => STALL,
        };
        let answer = session.request(request);
        tokio::pin!(answer);
        let mut check = tokio::time::Instant::now() + patience;
        loop {
            tokio::select! {
                biased;
                result = &mut answer => return result,
                () = tokio::time::sleep_until(check) => {}
            }
            let quiet = session.quiet_for();
            if quiet < STALL {
                check = tokio::time::Instant::now() + (STALL - quiet);
                continue;
            }
            let probe = tokio::time::timeout(PROBE_TIMEOUT, session.request(&ClientToRelay::Info));
            tokio::pin!(probe);
            let silent = tokio::select! {
                biased;
                result = &mut answer => return result,
                probed = &mut probe => probed.is_err() && session.quiet_for() >= PROBE_TIMEOUT,
            };
            if silent {
                tracing::info!(%peer, "no answer over the connection; it is closed and dialled again");
                session.abandon("the peer stopped answering");
                let _ = self.commands.try_send(Command::Disconnect(peer));
                return answer.await;
            }
            check = tokio::time::Instant::now() + STALL;
        }
    }
}

impl Transport for Network {
    async fn request(
        &self,
        relay: &Multiaddr,
        request: ClientToRelay,
    ) -> Result<RelayToClient, NetError> {
        let peer = peer_of(relay).ok_or_else(|| NetError::NoPeerId(relay.to_string()))?;
        let side = match request {
            // What is put into contacts' queues goes as the identity that writes.
            ClientToRelay::Put { .. }
            | ClientToRelay::PutChunk { .. }
            | ClientToRelay::HasChunks { .. } => &self.writers,
            _ => &self.readers,
        };
        side.exchange(peer, Some(relay), &request, true).await
    }

    async fn request_as_reader(
        &self,
        relay: &Multiaddr,
        request: ClientToRelay,
    ) -> Result<RelayToClient, NetError> {
        let peer = peer_of(relay).ok_or_else(|| NetError::NoPeerId(relay.to_string()))?;
        self.readers
            .exchange(peer, Some(relay), &request, true)
            .await
    }

    async fn direct_put(
        &self,
        peer: PeerId,
        envelopes: Vec<Envelope>,
    ) -> Result<RelayToClient, NetError> {
        if self.is_cut() {
            let _ = self.contacts.commands.try_send(Command::Disconnect(peer));
            return Err(NetError::Unreachable("the direct path is cut".into()));
        }
        let items = envelopes.into_iter().map(Addressed::direct).collect();
        self.contacts
            .exchange(peer, None, &ClientToRelay::Put { items }, false)
            .await
    }

    fn direct_peers(&self) -> HashSet<PeerId> {
        if !self.direct || self.is_cut() {
            return HashSet::new();
        }
        let links: Vec<PeerId> = self.state.read().links.keys().copied().collect();
        self.lan_peers().into_iter().chain(links).collect()
    }

    fn connected(&self) -> HashSet<PeerId> {
        let state = self.state.read();
        let links = state.links.keys().copied();
        if !self.is_cut() {
            return links.collect();
        }
        // Relays still count; contacts do not.
        let allowed = self.allowed.read();
        links
            .filter(|p| {
                allowed
                    .as_ref()
                    .is_none_or(|contacts| !contacts.contains(p))
            })
            .collect()
    }

    fn seek_direct(&self, peer: PeerId, relays: &[Multiaddr]) {
        // Connected directly: nothing to seek. Through a relay only, the task closes a
        // circuit on which hole punching is over, then tries again.
        let direct = self
            .state
            .read()
            .links
            .get(&peer)
            .is_some_and(|links| links.iter().any(|(_, relayed)| !relayed));
        if !self.circuits || relays.is_empty() || direct {
            return;
        }
        let relays = relays.to_vec();
        // Best effort: a full command queue means the task is busy; the next call retries.
        let _ = self
            .contacts
            .commands
            .try_send(Command::SeekDirect { peer, relays });
    }

    fn allow_only(&self, contacts: Vec<(PeerId, LanKey)>) {
        *self.allowed.write() = Some(contacts.iter().map(|(p, _)| *p).collect());
        let mut beacon = self.beacon.write();
        beacon.contacts = contacts;
        beacon.generation += 1;
    }

    /// Idempotent, and a relay that refused is asked again only after a backoff.
    fn reserve_at(&self, relays: Vec<Multiaddr>) {
        // A reservation is how contacts would reach us through a relay; it names us
        // to the relay, so only with circuits on.
        let relays = if self.circuits { relays } else { Vec::new() };
        let _ = self.contacts.commands.try_send(Command::ReserveAt(relays));
    }
}
