//! A minimal client for one relay: a task owning a small Swarm, and a handle that sends
//! requests and awaits answers. Used by the relay's tests, the benchmarks and tools;
//! the messenger itself (`kkachi`) has its own network task that speaks to many relays.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use kkachi_protocol::{ClientToRelay, Envelope, MailboxId, Multiaddr, PeerId, RelayToClient};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Swarm, noise, tcp, yamux};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::codec::{PROTOCOL, REQUEST_TIMEOUT, RelayCodec, Request};

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

/// A connection to one relay.
#[derive(Debug, Clone)]
pub struct MailboxClient {
    relay: PeerId,
    me: PeerId,
    commands: mpsc::Sender<Command>,
}

type Behaviour = request_response::Behaviour<RelayCodec>;

fn relay_peer(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

impl MailboxClient {
    /// Connects to the relay at `addr` (which ends in `/p2p/<peer id>`) as `keypair`.
    pub async fn connect(keypair: Keypair, addr: Multiaddr) -> Result<Self, ClientError> {
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
            .with_behaviour(|_| {
                request_response::Behaviour::with_codec(
                    RelayCodec,
                    [(PROTOCOL, ProtocolSupport::Outbound)],
                    request_response::Config::default()
                        .with_request_timeout(REQUEST_TIMEOUT)
                        .with_max_concurrent_streams(1024),
                )
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
        swarm.add_peer_address(relay, addr);
        let (commands, rx) = mpsc::channel(256);
        tokio::spawn(run(swarm, relay, rx));
        Ok(Self {
            relay,
            me,
            commands,
        })
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
                    let id = swarm.behaviour_mut().send_request(&relay, Request::Message(request));
                    pending.insert(id, reply);
                }
                // Every handle is gone.
                None => break,
            },
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { request_id, response },
                    ..
                }) => {
                    if let Some(reply) = pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure { request_id, error, .. }) => {
                    if let Some(reply) = pending.remove(&request_id) {
                        let _ = reply.send(Err(ClientError::Request(error.to_string())));
                    }
                }
                _ => {}
            },
        }
    }
}
