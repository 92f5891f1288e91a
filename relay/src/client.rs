//! A minimal client for one relay: a task driving a small Swarm, and a handle whose
//! requests go over a session stream (`/kkachi/relay/2`, the only protocol relays
//! speak), written from the caller's task. Used by the relay's tests, the benchmarks and
//! tools; the messenger itself (`kkachi`) has its own network task that speaks to many
//! relays and to contacts.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kkachi_protocol::wire::Addressed;
use kkachi_protocol::{
    ClientToRelay, Multiaddr, PeerId, QueueKind, ReadKey, RelayToClient, WriteId,
};
use libp2p::identity::Keypair;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::session::{Session, SessionError, SessionSlot};
use crate::transport;

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
    /// Transport setup failed.
    #[error("transport: {0}")]
    Transport(String),
}

/// A connection to one relay.
#[derive(Debug, Clone)]
pub struct MailboxClient {
    relay: PeerId,
    place: Arc<SessionPlace>,
}

/// The current session, and what opens the next one: relays close sessions that stay
/// idle, and the connection may go and come back.
struct SessionPlace {
    control: libp2p_stream::Control,
    current: SessionSlot,
    /// Asks the swarm's task to connect again; it stops once this is dropped (with the
    /// last handle).
    dial: mpsc::Sender<oneshot::Sender<Result<(), ClientError>>>,
}

impl std::fmt::Debug for SessionPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPlace").finish_non_exhaustive()
    }
}

/// How long opening a session may take (dialling again included).
const SESSION_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(NetworkBehaviour)]
struct Behaviour {
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
    /// opens a session.
    pub async fn connect(keypair: Keypair, addr: Multiaddr) -> Result<Self, ClientError> {
        let relay = relay_peer(&addr).ok_or_else(|| ClientError::NoPeerId(addr.clone()))?;
        let mut swarm = transport::swarm(
            keypair,
            |_| Behaviour {
                session: libp2p_stream::Behaviour::new(),
            },
            Duration::from_secs(60),
        )
        .map_err(|e| ClientError::Transport(e.to_string()))?;
        let dial_error = |message: String| ClientError::Dial {
            addr: addr.clone(),
            message,
        };
        swarm
            .dial(addr.clone())
            .map_err(|e| dial_error(e.to_string()))?;
        // Wait for the connection so `connect` reports an unreachable relay.
        loop {
            match tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some()).await {
                Ok(SwarmEvent::ConnectionEstablished { peer_id, .. }) if peer_id == relay => break,
                Ok(SwarmEvent::OutgoingConnectionError { error, .. }) => {
                    return Err(dial_error(error.to_string()));
                }
                Ok(_) => {}
                Err(_) => return Err(dial_error("timed out".into())),
            }
        }
        let mut control = swarm.behaviour().session.new_control();
        let (dial, dials) = mpsc::channel(16);
        tokio::spawn(drive(swarm, relay, addr.clone(), dials));
        let session = Session::open(&mut control, relay, SESSION_OPEN_TIMEOUT)
            .await
            .map_err(|e| dial_error(e.to_string()))?;
        Ok(Self {
            relay,
            place: Arc::new(SessionPlace {
                control,
                current: SessionSlot::holding(session),
                dial,
            }),
        })
    }

    /// Whether the session is open now (a closed one is opened again by the next
    /// request).
    pub fn has_session(&self) -> bool {
        self.place.current.open_session().is_some()
    }

    /// The relay's PeerId.
    pub fn relay(&self) -> PeerId {
        self.relay
    }

    /// The open session, or a new one if the relay closed the last (idle) or the
    /// connection went.
    async fn session(&self) -> Result<Arc<Session>, ClientError> {
        let place = &self.place;
        place
            .current
            .get_or_open(|| async {
                // Connected again first (the relay may have restarted), then a new session.
                let (reply, connected) = oneshot::channel();
                place
                    .dial
                    .send(reply)
                    .await
                    .map_err(|_| ClientError::Request("client stopped".into()))?;
                connected
                    .await
                    .map_err(|_| ClientError::Request("client stopped".into()))??;
                Session::open(&mut place.control.clone(), self.relay, SESSION_OPEN_TIMEOUT)
                    .await
                    .map_err(|e| ClientError::Request(e.to_string()))
            })
            .await
    }

    /// Sends one request and waits for the answer. Every request is idempotent: one
    /// whose session closed under it goes again, once, on a new session.
    pub async fn request(&self, request: ClientToRelay) -> Result<RelayToClient, ClientError> {
        let mut again = true;
        loop {
            match self.session().await?.request(&request).await {
                Ok(answer) => return Ok(answer),
                Err(SessionError::Closed(_)) if again => again = false,
                Err(e) => return Err(ClientError::Request(e.to_string())),
            }
        }
    }

    /// Puts envelopes; the answer comes once they are durable.
    pub async fn put(&self, items: Vec<Addressed>) -> Result<RelayToClient, ClientError> {
        self.request(ClientToRelay::Put { items }).await
    }

    /// Opens the queue of `key` as `kind` if new, and grants it `write_ids`.
    pub async fn grant(
        &self,
        key: &ReadKey,
        kind: QueueKind,
        write_ids: Vec<WriteId>,
    ) -> Result<RelayToClient, ClientError> {
        self.request(ClientToRelay::Grant {
            key: key.clone(),
            kind,
            token: Vec::new(),
            write_ids,
        })
        .await
    }

    /// Fetches the queue of `key` after `after`.
    pub async fn fetch(
        &self,
        key: &ReadKey,
        after: u64,
        limit: u16,
    ) -> Result<RelayToClient, ClientError> {
        self.request(ClientToRelay::Fetch {
            key: key.clone(),
            after,
            limit,
        })
        .await
    }

    /// Long-polls the queue of `key` after `after`.
    pub async fn subscribe(
        &self,
        key: &ReadKey,
        after: u64,
        wait_ms: u32,
    ) -> Result<RelayToClient, ClientError> {
        self.request(ClientToRelay::Subscribe {
            key: key.clone(),
            after,
            wait_ms,
        })
        .await
    }
}

/// Drives the swarm (connections, streams) until every handle is gone, connecting to
/// the relay again when asked (answered once connected, or with why not).
async fn drive(
    mut swarm: libp2p::Swarm<Behaviour>,
    relay: PeerId,
    addr: Multiaddr,
    mut dials: mpsc::Receiver<oneshot::Sender<Result<(), ClientError>>>,
) {
    let mut waiting: Vec<oneshot::Sender<Result<(), ClientError>>> = Vec::new();
    loop {
        tokio::select! {
            asked = dials.recv() => {
                let Some(reply) = asked else { break };
                if swarm.is_connected(&relay) {
                    let _ = reply.send(Ok(()));
                    continue;
                }
                if waiting.is_empty()
                    && let Err(e) = swarm.dial(addr.clone())
                {
                    let _ = reply.send(Err(ClientError::Dial { addr: addr.clone(), message: e.to_string() }));
                    continue;
                }
                waiting.push(reply);
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == relay => {
                    for reply in waiting.drain(..) {
                        let _ = reply.send(Ok(()));
                    }
                }
                SwarmEvent::OutgoingConnectionError { error, .. } if !swarm.is_connected(&relay) => {
                    for reply in waiting.drain(..) {
                        let _ = reply.send(Err(ClientError::Dial { addr: addr.clone(), message: error.to_string() }));
                    }
                }
                _ => {}
            },
        }
    }
}
