//! A minimal client for one relay: a task owning a small Swarm, and a handle that sends
//! requests and awaits answers. Used by the relay's tests, the benchmarks and tools;
//! the messenger itself (`kkachi`) has its own network task that speaks to many relays.
//!
//! Like the messenger, it speaks the session protocol (`/kkachi/relay/2`: one long-lived
//! stream, requests written from the caller's task) unless asked for `/kkachi/relay/1`
//! (a stream per request, sent by the swarm's task).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kkachi_protocol::{ClientToRelay, Envelope, MailboxId, Multiaddr, PeerId, RelayToClient};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Swarm, noise, tcp, yamux};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::codec::{PROTOCOL, REQUEST_TIMEOUT, RelayCodec, Request};
use crate::session::Session;

/// Why a request did not get an answer.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The relay could not be dialled.
    #[error("cannot reach relay {addr}: {message}")]
    Dial {
        /// The address dialled.
        addr: Multiaddr,
        /// Why.
        message: String,
    },
    /// The address lacks `/p2p/<peer id>`.
    #[error("relay address {0} must end with /p2p/<peer id>")]
    NoPeerId(Multiaddr),
    /// The request failed in transit (connection lost, timeout, bad frame).
    #[error("request failed: {0}")]
    Request(String),
    /// The client task has stopped.
    #[error("client stopped")]
    Stopped,
    /// Transport setup failed.
    #[error("transport: {0}")]
    Transport(String),
}

enum Command {
    Request {
        request: ClientToRelay,
        reply: oneshot::Sender<Result<RelayToClient, ClientError>>,
    },
}

/// Which of the relay's protocols a [`MailboxClient`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `/kkachi/relay/2`: one long-lived session stream carries every request.
    Session,
    /// `/kkachi/relay/1`: one stream per request.
    PerRequest,
}

/// A connection to one relay.
#[derive(Debug, Clone)]
pub struct MailboxClient {
    relay: PeerId,
    me: PeerId,
    /// To the swarm's task, which stops once every clone of this handle is gone.
    commands: mpsc::Sender<Command>,
    /// `Some` when speaking [`Protocol::Session`].
    session: Option<Arc<SessionPlace>>,
}

/// The current session, and what opens the next one: relays close sessions that stay
/// idle, and the connection may go and come back.
struct SessionPlace {
    control: libp2p_stream::Control,
    /// The latest session; a closed one stays until its successor is open.
    current: parking_lot::Mutex<Arc<Session>>,
    reopening: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for SessionPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPlace").finish_non_exhaustive()
    }
}

impl SessionPlace {
    /// The session, if it is open.
    fn open(&self) -> Option<Arc<Session>> {
        Some(self.current.lock().clone()).filter(|s| s.is_open())
    }

    /// Opens a new session in the background, unless that is already under way.
    fn reopen(self: &Arc<Self>, relay: PeerId) {
        use std::sync::atomic::Ordering;
        if self.reopening.swap(true, Ordering::AcqRel) {
            return;
        }
        let place = self.clone();
        tokio::spawn(async move {
            match Session::open(&mut place.control.clone(), relay, SESSION_OPEN_TIMEOUT).await {
                Ok(session) => *place.current.lock() = session,
                Err(e) => tracing::debug!(%relay, error = %e, "no session yet"),
            }
            place.reopening.store(false, Ordering::Release);
        });
    }
}

/// How long opening a session may take.
const SESSION_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(NetworkBehaviour)]
struct Behaviour {
    mailbox: request_response::Behaviour<RelayCodec>,
    session: libp2p_stream::Behaviour,
}

fn relay_peer(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

impl MailboxClient {
    /// Connects to the relay at `addr` (which ends in `/p2p/<peer id>`) as `keypair`, and
    /// opens a session ([`Protocol::Session`]).
    pub async fn connect(keypair: Keypair, addr: Multiaddr) -> Result<Self, ClientError> {
        Self::connect_with(keypair, addr, Protocol::Session).await
    }

    /// [`MailboxClient::connect`], speaking `protocol`.
    pub async fn connect_with(
        keypair: Keypair,
        addr: Multiaddr,
        protocol: Protocol,
    ) -> Result<Self, ClientError> {
        let relay = relay_peer(&addr).ok_or_else(|| ClientError::NoPeerId(addr.clone()))?;
        let me = keypair.public().to_peer_id();
        let mut swarm: Swarm<Behaviour> = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| ClientError::Transport(e.to_string()))?
            .with_quic()
            .with_behaviour(|_| Behaviour {
                mailbox: request_response::Behaviour::with_codec(
                    RelayCodec,
                    [(PROTOCOL, ProtocolSupport::Outbound)],
                    request_response::Config::default()
                        .with_request_timeout(REQUEST_TIMEOUT)
                        .with_max_concurrent_streams(1024),
                ),
                session: libp2p_stream::Behaviour::new(),
            })
            .map_err(|e| ClientError::Transport(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        swarm.dial(addr.clone()).map_err(|e| ClientError::Dial {
            addr: addr.clone(),
            message: e.to_string(),
        })?;
        // Wait for the connection so `connect` reports an unreachable relay.
        loop {
            match tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some()).await {
                Ok(SwarmEvent::ConnectionEstablished { peer_id, .. }) if peer_id == relay => break,
                Ok(SwarmEvent::OutgoingConnectionError { error, .. }) => {
                    return Err(ClientError::Dial {
                        addr,
                        message: error.to_string(),
                    });
                }
                Ok(_) => {}
                Err(_) => {
                    return Err(ClientError::Dial {
                        addr,
                        message: "timed out".into(),
                    });
                }
            }
        }
        swarm.add_peer_address(relay, addr.clone());
        let mut control = swarm.behaviour().session.new_control();
        let (commands, rx) = mpsc::channel(256);
        tokio::spawn(run(swarm, relay, rx));
        let session = match protocol {
            Protocol::PerRequest => None,
            Protocol::Session => {
                let session = Session::open(&mut control, relay, SESSION_OPEN_TIMEOUT)
                    .await
                    .map_err(|e| ClientError::Dial {
                        addr,
                        message: e.to_string(),
                    })?;
                Some(Arc::new(SessionPlace {
                    control,
                    current: parking_lot::Mutex::new(session),
                    reopening: false.into(),
                }))
            }
        };
        Ok(Self {
            relay,
            me,
            commands,
            session,
        })
    }

    /// Whether requests go over an open session now (a closed one is reopened in the
    /// background; until then requests use `/kkachi/relay/1`).
    pub fn has_session(&self) -> bool {
        self.session.as_ref().is_some_and(|p| p.open().is_some())
    }

    /// The relay's PeerId.
    pub fn relay(&self) -> PeerId {
        self.relay
    }

    /// This client's mailbox on any relay.
    pub fn mailbox(&self) -> MailboxId {
        MailboxId::for_peer(&self.me)
    }

    /// Sends one request and waits for the answer.
    pub async fn request(&self, request: ClientToRelay) -> Result<RelayToClient, ClientError> {
        if let Some(place) = &self.session {
            match place.open() {
                Some(session) => {
                    return session
                        .request(&request)
                        .await
                        .map_err(|e| ClientError::Request(e.to_string()));
                }
                // Closed (the relay closes idle sessions, or the connection went): this
                // request goes the first way, which dials if need be, as the messenger's
                // do; the next ones use the new session once it is open.
                None => place.reopen(self.relay),
            }
        }
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Request { request, reply })
            .await
            .map_err(|_| ClientError::Stopped)?;
        answer.await.map_err(|_| ClientError::Stopped)?
    }

    /// Puts envelopes; the answer comes once they are durable.
    pub async fn put(&self, envelopes: Vec<Envelope>) -> Result<RelayToClient, ClientError> {
        self.request(ClientToRelay::Put { envelopes }).await
    }

    /// Fetches this client's own mailbox after `after`.
    pub async fn fetch(&self, after: u64, limit: u16) -> Result<RelayToClient, ClientError> {
        let mailbox = self.mailbox();
        self.request(ClientToRelay::Fetch {
            mailbox,
            after,
            limit,
        })
        .await
    }

    /// Long-polls this client's own mailbox after `after`.
    pub async fn subscribe(&self, after: u64, wait_ms: u32) -> Result<RelayToClient, ClientError> {
        let mailbox = self.mailbox();
        self.request(ClientToRelay::Subscribe {
            mailbox,
            after,
            wait_ms,
        })
        .await
    }
}

async fn run(mut swarm: Swarm<Behaviour>, relay: PeerId, mut commands: mpsc::Receiver<Command>) {
    let mut pending: HashMap<
        OutboundRequestId,
        oneshot::Sender<Result<RelayToClient, ClientError>>,
    > = HashMap::new();
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Request { request, reply }) => {
                    let id = swarm.behaviour_mut().mailbox.send_request(&relay, Request::Message(request));
                    pending.insert(id, reply);
                }
                // Every handle is gone.
                None => break,
            },
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(BehaviourEvent::Mailbox(request_response::Event::Message {
                    message: request_response::Message::Response { request_id, response },
                    ..
                })) => {
                    if let Some(reply) = pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Mailbox(request_response::Event::OutboundFailure { request_id, error, .. })) => {
                    if let Some(reply) = pending.remove(&request_id) {
                        let _ = reply.send(Err(ClientError::Request(error.to_string())));
                    }
                }
                _ => {}
            },
        }
    }
}
