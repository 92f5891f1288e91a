//! The session protocol `/kkachi/relay/2` against a real relay on loopback: many
//! requests on one stream answered in any order, bad frames answered without harming
//! the session or anyone else, and idle sessions closed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::prelude::*;
use kkachi_protocol::wire::{self, Addressed, ClientToRelay, ErrorCode, RelayToClient};
use kkachi_protocol::{Envelope, Multiaddr, PeerId, QueueKind, ReadKey, WriteKey};
use kkachi_relay::config::Config;
use kkachi_relay::session::{SESSION_PROTOCOL, Session};
use kkachi_relay::{RelayHandle, start};
use libp2p::swarm::SwarmEvent;
use libp2p::{Stream, noise, tcp, yamux};

async fn relay(idle_secs: u64) -> (RelayHandle, Multiaddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        ..Config::default()
    };
    config.limits.idle_timeout_secs = idle_secs;
    let mut r = start(config).await.expect("relay starts");
    let addr = r.wait_listening(1).await.remove(0);
    (r, addr, dir)
}

/// A client swarm connected to `addr`, and a raw session stream to it.
async fn open(addr: &Multiaddr) -> (PeerId, Stream) {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let me = *swarm.local_peer_id();
    let relay = match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(p)) => p,
        _ => panic!("address without peer id"),
    };
    let mut control = swarm.behaviour().new_control();
    swarm.dial(addr.clone()).unwrap();
    loop {
        if let SwarmEvent::ConnectionEstablished { .. } = swarm.select_next_some().await {
            break;
        }
    }
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let stream = control.open_stream(relay, SESSION_PROTOCOL).await.unwrap();
    (me, stream)
}

async fn read_answer(stream: &mut Stream) -> std::io::Result<(u32, RelayToClient)> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await?;
    let mut body = vec![0u8; wire::frame_len(prefix).unwrap()];
    stream.read_exact(&mut body).await?;
    let (id, message) = wire::session_split(&body).unwrap();
    Ok((id, RelayToClient::decode(message).unwrap()))
}

async fn write(stream: &mut Stream, bytes: &[u8]) {
    stream.write_all(bytes).await.unwrap();
    stream.flush().await.unwrap();
}

/// The test envelope: an hour to live from the start of this process (the same
/// envelope each time it is made, whenever that is).
fn envelope() -> Envelope {
    static EXPIRES_AT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let expires_at = *EXPIRES_AT.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600
    });
    Envelope {
        expires_at,
        payload: b"session".repeat(4),
    }
}

/// A queue opened on the relay through `session`, with one write key granted.
async fn queue(session: &Session) -> (ReadKey, WriteKey) {
    let (key, write) = (ReadKey(rand::random()), WriteKey(rand::random()));
    let answer = session
        .request(&ClientToRelay::Grant {
            key: key.clone(),
            kind: QueueKind::Inbox,
            token: vec![],
            write_ids: vec![write.id()],
        })
        .await
        .unwrap();
    assert_eq!(answer, RelayToClient::Granted { grants: 1 });
    (key, write)
}

fn put(write: WriteKey) -> ClientToRelay {
    ClientToRelay::Put {
        items: vec![Addressed {
            write,
            envelope: envelope(),
        }],
    }
}

#[tokio::test]
async fn a_long_poll_waits_while_puts_on_the_same_session_are_answered() {
    let (_relay, addr, _dir) = relay(30).await;
    let (_, stream) = open(&addr).await;
    let session = Session::start(stream);
    let (key, write) = queue(&session).await;
    let poll = {
        let session = session.clone();
        tokio::spawn(async move {
            session
                .request(&ClientToRelay::Subscribe {
                    key,
                    after: 0,
                    wait_ms: 20_000,
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!poll.is_finished(), "the long poll waits for something new");
    let stored = session.request(&put(write)).await.unwrap();
    assert!(
        matches!(stored, RelayToClient::Stored { ref outcomes, .. } if outcomes.len() == 1),
        "{stored:?}"
    );
    let answer = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the long poll is answered once the put lands")
        .unwrap()
        .unwrap();
    match answer {
        RelayToClient::Batch { items, .. } => {
            assert_eq!(items.len(), 1);
            assert_eq!(items[0].envelope, envelope());
        }
        other => panic!("batch expected, got {other:?}"),
    }
    assert!(session.is_open());
}

#[tokio::test]
async fn a_malformed_request_is_answered_under_its_id_and_the_session_goes_on() {
    let (_relay, addr, _dir) = relay(30).await;
    let (_, mut stream) = open(&addr).await;
    write(&mut stream, &wire::session_frame(7, &[0xff, 1, 2])).await;
    match read_answer(&mut stream).await.unwrap() {
        (7, RelayToClient::Error { code, .. }) => assert_eq!(code, ErrorCode::Malformed),
        other => panic!("error for request 7 expected, got {other:?}"),
    }
    write(
        &mut stream,
        &wire::session_frame(8, &ClientToRelay::Info.encode()),
    )
    .await;
    assert!(matches!(
        read_answer(&mut stream).await.unwrap(),
        (8, RelayToClient::Info(_))
    ));
}

#[tokio::test]
async fn an_envelope_of_an_unknown_version_is_malformed() {
    let (_relay, addr, _dir) = relay(30).await;
    let (_, mut stream) = open(&addr).await;
    let mut put = put(WriteKey([1; 32])).encode();
    put[35] = 9; // the envelope's version byte, after the tag, the count and the key
    write(&mut stream, &wire::session_frame(3, &put)).await;
    match read_answer(&mut stream).await.unwrap() {
        (3, RelayToClient::Error { code, .. }) => assert_eq!(code, ErrorCode::Malformed),
        other => panic!("error for request 3 expected, got {other:?}"),
    }
}

/// Sessions that send the start of a frame and then nothing hold only themselves up.
#[tokio::test]
async fn half_sent_frames_on_many_sessions_hold_up_no_one_else() {
    let (relay, addr, _dir) = relay(30).await;
    let mut held = Vec::new();
    for _ in 0..100 {
        let (_, mut stream) = open(&addr).await;
        write(&mut stream, &100u32.to_be_bytes()).await;
        held.push(stream);
    }
    let normal = kkachi_relay::client::MailboxClient::connect(
        libp2p::identity::Keypair::generate_ed25519(),
        addr,
    )
    .await
    .unwrap();
    let (key, write) = (ReadKey(rand::random()), WriteKey(rand::random()));
    normal
        .grant(&key, QueueKind::Inbox, vec![write.id()])
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let answer = normal.request(put(write)).await.unwrap();
    assert!(
        matches!(answer, RelayToClient::Stored { ref outcomes, .. } if outcomes.len() == 1),
        "{answer:?}"
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "an ordinary client waited {took:?}"
    );
    drop(held);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_oversized_frame_closes_only_its_own_session_with_a_reason() {
    let (_relay, addr, _dir) = relay(30).await;
    let (_, mut bad) = open(&addr).await;
    let (_, good) = open(&addr).await;
    let good = Session::start(good);
    write(&mut bad, &(1u32 << 30).to_be_bytes()).await;
    match read_answer(&mut bad).await.unwrap() {
        (0, RelayToClient::Error { code, message }) => {
            assert_eq!(code, ErrorCode::TooLarge);
            assert!(message.contains("closing"), "{message}");
        }
        other => panic!("a refusal under id 0 expected, got {other:?}"),
    }
    let mut rest = Vec::new();
    bad.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "nothing follows the refusal");
    assert!(matches!(
        good.request(&ClientToRelay::Info).await.unwrap(),
        RelayToClient::Info(_)
    ));
}

#[tokio::test]
async fn pipelined_requests_are_all_answered_each_under_its_own_id() {
    let (_relay, addr, _dir) = relay(30).await;
    let (_, mut stream) = open(&addr).await;
    let mut frames = Vec::new();
    for id in 1..=100u32 {
        frames.extend(wire::session_frame(id, &ClientToRelay::Info.encode()));
    }
    write(&mut stream, &frames).await;
    let mut ids = Vec::new();
    for _ in 0..100 {
        let (id, answer) = read_answer(&mut stream).await.unwrap();
        assert!(matches!(answer, RelayToClient::Info(_)), "{answer:?}");
        ids.push(id);
    }
    ids.sort();
    assert_eq!(ids, (1..=100).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_idle_session_is_closed_by_the_relay() {
    let (_relay, addr, _dir) = relay(1).await;
    let (_, stream) = open(&addr).await;
    let session = Session::start(stream);
    assert!(matches!(
        session.request(&ClientToRelay::Info).await.unwrap(),
        RelayToClient::Info(_)
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while session.is_open() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !session.is_open(),
        "the relay closes a session idle past its timeout"
    );
}

/// A client that keeps its handle past the relay's idle timeout is still answered, and
/// has a session again soon after.
#[tokio::test]
async fn a_mailbox_client_reopens_a_session_the_relay_closed() {
    let (_relay, addr, _dir) = relay(1).await;
    let client = kkachi_relay::client::MailboxClient::connect(
        libp2p::identity::Keypair::generate_ed25519(),
        addr,
    )
    .await
    .unwrap();
    assert!(client.has_session());
    assert!(matches!(
        client.request(ClientToRelay::Info).await.unwrap(),
        RelayToClient::Info(_)
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while client.has_session() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!client.has_session(), "the relay closes an idle session");
    assert!(matches!(
        client.request(ClientToRelay::Info).await.unwrap(),
        RelayToClient::Info(_)
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !client.has_session() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(client.has_session(), "a new session is opened");
    assert!(matches!(
        client.request(ClientToRelay::Info).await.unwrap(),
        RelayToClient::Info(_)
    ));
}

/// A relay restarted on the same address: the client connects again by itself and its
/// next request is answered (while the relay is down, requests fail at once).
#[tokio::test]
async fn a_mailbox_client_comes_back_after_the_relay_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = || Config {
        data_dir: dir.path().to_path_buf(),
        listen: vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()],
        ..Config::default()
    };
    let mut relay = start(config()).await.unwrap();
    let addr = relay.wait_listening(1).await.remove(0);
    let client = kkachi_relay::client::MailboxClient::connect(
        libp2p::identity::Keypair::generate_ed25519(),
        addr,
    )
    .await
    .unwrap();
    assert!(matches!(
        client.request(ClientToRelay::Info).await.unwrap(),
        RelayToClient::Info(_)
    ));
    relay.shutdown().await.unwrap();
    let down = client.request(ClientToRelay::Info).await.unwrap_err();
    assert!(down.to_string().contains("cannot reach relay"), "{down}");
    let mut relay = start(config()).await.unwrap();
    relay.wait_listening(1).await;
    assert!(matches!(
        client.request(ClientToRelay::Info).await.unwrap(),
        RelayToClient::Info(_)
    ));
    relay.shutdown().await.unwrap();
}
