//! A relay that speaks only `/kkachi/relay/1` (one stream per request) still gets every
//! request: the client's session attempt fails before any answer, and it falls back.

use std::time::Duration;

use futures::StreamExt;
use kkachi_client::net::{NetConfig, Network, Transport};
use kkachi_protocol::{ClientToRelay, Multiaddr, RelayToClient};
use kkachi_relay::codec::{PROTOCOL, RelayCodec, Request};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux};

/// A server of `/kkachi/relay/1` alone that answers every request with `Deleted { count }`
/// counting the requests so far.
async fn old_relay() -> Multiaddr {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                RelayCodec,
                [(PROTOCOL, ProtocolSupport::Inbound)],
                request_response::Config::default(),
            )
        })
        .unwrap()
        .build();
    swarm
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    let peer = *swarm.local_peer_id();
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    tokio::spawn(async move {
        let mut count = 0;
        loop {
            if let SwarmEvent::Behaviour(request_response::Event::Message {
                message:
                    request_response::Message::Request {
                        request: Request::Message(_),
                        channel,
                        ..
                    },
                ..
            }) = swarm.select_next_some().await
            {
                count += 1;
                let _ = swarm
                    .behaviour_mut()
                    .send_response(channel, RelayToClient::Deleted { count });
            }
        }
    });
    addr.with(libp2p::multiaddr::Protocol::P2p(peer))
}

#[tokio::test]
async fn a_relay_without_sessions_gets_every_request_the_old_way() {
    let relay = old_relay().await;
    let config = NetConfig {
        listen: vec![],
        mdns: false,
        direct: false,
    };
    let (net, _events) =
        Network::start(libp2p::identity::Keypair::generate_ed25519(), config).unwrap();
    for expected in 1..=3 {
        let answer = tokio::time::timeout(
            Duration::from_secs(20),
            net.request(&relay, ClientToRelay::Info),
        )
        .await
        .expect("answered in time")
        .expect("answered");
        assert_eq!(answer, RelayToClient::Deleted { count: expected });
    }
}
