//! A plain libp2p request/response exchange, a few bytes each way and a stream per
//! request: the machine's round trip that the benchmark's latencies are compared with.

use std::io;
use std::time::{Duration, Instant};

use futures::prelude::*;
use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol};

/// The echo protocol.
const ECHO: StreamProtocol = StreamProtocol::new("/kkachi-bench/echo/1");
/// Longest message either way.
const MAX: usize = 64 * 1024;

/// Length-prefixed bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct EchoCodec;

async fn read<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut prefix = [0u8; 4];
    io.read_exact(&mut prefix).await?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "too long"));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    Ok(body)
}

async fn write<T: AsyncWrite + Unpin + Send>(io: &mut T, body: &[u8]) -> io::Result<()> {
    io.write_all(&(body.len() as u32).to_be_bytes()).await?;
    io.write_all(body).await?;
    io.close().await
}

impl request_response::Codec for EchoCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read(io).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read(io).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        write(io, &req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()> {
        write(io, &res).await
    }
}

type Behaviour = request_response::Behaviour<EchoCodec>;

fn swarm(support: ProtocolSupport) -> anyhow::Result<libp2p::Swarm<Behaviour>> {
    Ok(kkachi_relay::transport::swarm(
        Keypair::generate_ed25519(),
        |_| {
            request_response::Behaviour::with_codec(
                EchoCodec,
                [(ECHO, support)],
                request_response::Config::default(),
            )
        },
        Duration::from_secs(60),
    )?)
}

/// Serves echoes on 127.0.0.1 for ever; `ready` gets the address (with `/p2p/`).
pub async fn serve(ready: impl FnOnce(Multiaddr)) -> anyhow::Result<()> {
    let mut swarm = swarm(ProtocolSupport::Inbound)?;
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    let me = *swarm.local_peer_id();
    let mut ready = Some(ready);
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::NewListenAddr { address, .. } => {
                if let Some(ready) = ready.take() {
                    ready(address.with(libp2p::multiaddr::Protocol::P2p(me)));
                }
            }
            SwarmEvent::Behaviour(request_response::Event::Message {
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            }) => {
                let _ = swarm.behaviour_mut().send_response(channel, request);
            }
            _ => {}
        }
    }
}

/// `rounds` echoes of 16 bytes from this process to the server at `addr`, one at a
/// time; how long each took.
pub async fn round_trips(addr: Multiaddr, rounds: usize) -> anyhow::Result<Vec<Duration>> {
    let server = addr
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
            _ => None,
        })
        .ok_or_else(|| anyhow::anyhow!("{addr} has no /p2p/"))?;
    let mut swarm = swarm(ProtocolSupport::Outbound)?;
    swarm.add_peer_address(server, addr);
    let mut times = Vec::with_capacity(rounds);
    // One to connect, not counted.
    for round in 0..=rounds {
        let started = Instant::now();
        swarm.behaviour_mut().send_request(&server, vec![7; 16]);
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { .. },
                    ..
                }) => break,
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                    error, ..
                }) => anyhow::bail!("echo failed: {error}"),
                _ => {}
            }
        }
        if round > 0 {
            times.push(started.elapsed());
        }
    }
    Ok(times)
}
