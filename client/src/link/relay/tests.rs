//! Linking through a relay (a real one, in this process): the account goes over with
//! the queues' quota forcing the sender to wait for the reader; junk, floods and
//! streams that stall from whoever else holds the code hold nothing up; a wrong code
//! finds nothing there; and the queues take nothing once the offer ended.

use std::path::PathBuf;

use kkachi_protocol::link::LinkCode;
use kkachi_relay::config::Config;
use kkachi_relay::store::{Limits, MemoryStore, Quota};
use kkachi_relay::{Metrics, RelayHandle};

use super::*;
use crate::link::tests::{account, join_quietly};
use crate::link::{Handed, JoinState, LinkFailure, Offer, Seen, Via, join};

/// A relay on loopback whose queues hold at most `envelopes` envelopes each.
async fn relay(envelopes: u64) -> (RelayHandle, Multiaddr) {
    let (handle, addr, _) = relay_counted(envelopes, Config::default().limits.max_payload).await;
    (handle, addr)
}

/// [`relay`], taking envelopes of at most `payload` bytes, with the metrics it counts
/// refusals in.
async fn relay_counted(envelopes: u64, payload: usize) -> (RelayHandle, Multiaddr, Metrics) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = Config {
        data_dir: PathBuf::new(),
        listen: vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()],
        ..Config::default()
    };
    config.limits.max_payload = payload;
    let store = MemoryStore::new(Limits::uniform(Quota {
        max_envelopes: envelopes,
        max_bytes: 1 << 30,
    }));
    let metrics = Metrics::new();
    let mut handle = kkachi_relay::start_with(
        config,
        libp2p::identity::Keypair::generate_ed25519(),
        store,
        metrics.clone(),
    )
    .await
    .unwrap();
    let addr = handle.wait_listening(1).await.remove(0);
    (handle, addr, metrics)
}

/// How many puts `metrics`' relay refused for a full queue.
fn refused_as_full(metrics: &Metrics) -> u64 {
    metrics
        .render()
        .lines()
        .find(|l| l.starts_with("kkachi_rejections_total{") && l.contains("\"quota_exceeded\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map_or(0, |n| n as u64)
}

/// Offers `store`'s account through `relay` alone, for `secs` seconds, on a thread
/// that confirms every device (or, without `confirm`, none): the code, the result, and
/// what it saw.
async fn offered(
    store: &crate::store::LocalStore,
    relay: &Multiaddr,
    secs: u64,
    confirm: bool,
) -> (
    LinkCode,
    tokio::task::JoinHandle<Result<Handed, LinkFailure>>,
    std::sync::mpsc::Receiver<Seen>,
) {
    let (offer, why) = Offer::through_relay(None, &[(relay.clone(), Vec::new())])
        .await
        .expect("the relay holds the offer");
    assert_eq!(why, None);
    let code = offer.code().clone();
    assert!(code.addrs().is_empty(), "no address of this device");
    assert_eq!(code.relay(), Some(relay));
    let (tx, seen) = std::sync::mpsc::channel();
    let store = store.clone();
    let served = tokio::task::spawn_blocking(move || {
        offer.serve(
            &store,
            Duration::from_secs(secs),
            move |_, _| confirm,
            |s| {
                let _ = tx.send(s);
            },
        )
    });
    (code, served, seen)
}

/// Puts `payload` into the code's queue to the old device, as anyone holding the code
/// can; whether the relay took it.
async fn put(net: &Network, relay: &Multiaddr, code: &LinkCode, payload: Vec<u8>) -> bool {
    let envelope = Envelope {
        expires_at: crate::engine::now_ms() / 1000 + 600,
        payload,
    };
    let request = ClientToRelay::Put {
        items: vec![Addressed {
            write: code.queues().to_old.1,
            envelope,
        }],
    };
    matches!(
        ask(net, relay, request).await,
        Ok(RelayToClient::Stored { outcomes, .. })
            if matches!(outcomes.first(), Some(PutOutcome::Stored | PutOutcome::Duplicate))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_goes_through_a_relay_and_others_with_the_code_hold_nothing_up() {
    let (_relay, addr) = relay(64).await;
    let dir = tempfile::tempdir().unwrap();
    let (store, me, _) = account(&dir.path().join("old"));
    let (code, served, seen) = offered(&store, &addr, 60, true).await;

    // Someone else with the code (or the relay) first: junk, a stream that skips a
    // number, a first message of the wrong length, and more streams that say a byte
    // and stall than are checked at once.
    let net = network().unwrap();
    assert!(put(&net, &addr, &code, b"not a relayed message".to_vec()).await);
    for (seq, bytes) in [(0u32, vec![0xff, 0xff]), (5, vec![1])] {
        let junk = Relayed {
            stream: rand::random(),
            seq,
            bytes,
        };
        assert!(put(&net, &addr, &code, junk.encode()).await);
    }
    for _ in 0..MAX_STREAMS + 2 {
        let stall = Relayed {
            stream: rand::random(),
            seq: 0,
            bytes: vec![0],
        };
        assert!(put(&net, &addr, &code, stall.encode()).await);
    }

    let new_home = dir.path().join("new");
    let started = Instant::now();
    let joining = code.clone();
    let (joined, took) = tokio::task::spawn_blocking(move || {
        let joined = join_quietly(&new_home, &joining);
        (joined, started.elapsed())
    })
    .await
    .unwrap();
    let joined = joined.expect("joins through the relay");
    let handed = served.await.unwrap().expect("hands over");
    println!(
        "{} messages handed over through a relay in {} ms",
        joined.restored.counts.messages,
        took.as_millis()
    );
    assert!(matches!(joined.from, Via::Relay(ref r) if *r == addr.to_string()));
    assert!(matches!(handed.from, Via::Relay(_)));
    assert!(handed.confirmed, "the new home said it is in place");
    assert_eq!(joined.restored.peer, me.peer_id());
    assert_eq!(
        joined.restored.counts.messages,
        crate::link::tests::MESSAGES
    );
    assert_eq!(handed.to, joined.restored.session_key);
    // The others were dropped as not holding the code, and never sent anything.
    let seen: Vec<Seen> = seen.try_iter().collect();
    assert!(
        seen.iter()
            .filter(|s| matches!(s, Seen::WrongCode(_)))
            .count()
            >= 2,
        "{seen:?}"
    );
    assert_eq!(
        seen.iter()
            .filter(|s| matches!(s, Seen::Sending(_)))
            .count(),
        1,
        "{seen:?}"
    );
    // The offer ended: its queues take nothing more, whoever holds the code.
    let late = Relayed {
        stream: rand::random(),
        seq: 0,
        bytes: vec![0],
    };
    assert!(!put(&net, &addr, &code, late.encode()).await, "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_that_holds_one_envelope_makes_the_old_device_wait_for_the_reader() {
    // The relay keeps one envelope per queue, of 16 KiB at most: each of the tens of
    // puts after the first waits until the other end took the one before.
    let (_relay, addr, metrics) = relay_counted(1, 16 << 10).await;
    let dir = tempfile::tempdir().unwrap();
    let (store, me, _) = account(&dir.path().join("old"));
    let (code, served, _) = offered(&store, &addr, 60, true).await;
    let new_home = dir.path().join("new");
    let started = Instant::now();
    let joined = tokio::task::spawn_blocking(move || join_quietly(&new_home, &code))
        .await
        .unwrap()
        .expect("joins through a relay that holds one envelope at a time");
    let took = started.elapsed();
    let handed = served.await.unwrap().expect("hands over");
    let full = refused_as_full(&metrics);
    println!(
        "{} messages through queues of one envelope in {} ms; {full} puts waited for a full queue",
        joined.restored.counts.messages,
        took.as_millis()
    );
    assert!(full > 0, "the queue was full at least once");
    assert_eq!(joined.restored.peer, me.peer_id());
    assert_eq!(
        joined.restored.counts.messages,
        crate::link::tests::MESSAGES
    );
    assert!(handed.confirmed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_ends_is_heard_at_once_and_what_it_left_on_the_relay_goes() {
    let (_relay, addr) = relay(64).await;
    let dir = tempfile::tempdir().unwrap();

    // A device its user does not confirm hears so at once, not when its wait runs out.
    let (store, _, _) = account(&dir.path().join("declining"));
    let (code, served, _) = offered(&store, &addr, 10, false).await;
    let home = dir.path().join("declined");
    let started = Instant::now();
    let declined = tokio::task::spawn_blocking(move || join_quietly(&home, &code))
        .await
        .unwrap();
    assert!(
        matches!(declined, Err(LinkFailure::NotAccepted)),
        "{declined:?}"
    );
    let heard = started.elapsed();
    println!(
        "a declined device heard so through the relay in {} ms",
        heard.as_millis()
    );
    assert!(heard < Duration::from_secs(8), "{heard:?}");
    assert!(matches!(
        served.await.unwrap(),
        Err(LinkFailure::TimedOut(_))
    ));

    // A device that goes after the handshake, while the account comes: the old device
    // hears it, takes back what it put there, and the code still holds.
    let (store, me, _) = account(&dir.path().join("old"));
    let (code, served, seen) = offered(&store, &addr, 60, true).await;
    let queues = code.queues();
    let gone = code.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn =
            crate::link::Conn::relay(connect(gone.relay().unwrap(), &gone.queues()).unwrap());
        let (joining, first) = gone.join(&mut rand_core::OsRng);
        conn.write(&first).unwrap();
        let answer = conn
            .read_until(Instant::now() + Duration::from_secs(20), 48)
            .unwrap();
        let (_channel, hello) = joining.finish(&answer).unwrap();
        conn.write(&hello).unwrap();
        conn.flush().unwrap();
        // The first of the account, then nothing more: it goes.
        conn.read(Duration::from_secs(20)).unwrap();
    })
    .await
    .unwrap();
    let heard = tokio::task::spawn_blocking(move || {
        loop {
            match seen.recv_timeout(Duration::from_secs(30)) {
                Ok(Seen::BrokeOff(..)) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap();
    assert!(heard, "the old device heard the transfer broke off");
    // What it put for the device that went is gone from the relay, but its end.
    let net = network().unwrap();
    let left = match ask(
        &net,
        &addr,
        ClientToRelay::Fetch {
            key: queues.to_new.0.clone(),
            after: 0,
            limit: 100,
        },
    )
    .await
    {
        Ok(RelayToClient::Batch { items, .. }) => items,
        other => panic!("{other:?}"),
    };
    let ends = left
        .iter()
        .filter(|s| Relayed::decode(&s.envelope.payload).is_ok_and(|r| r.is_end()))
        .count();
    assert_eq!(left.len() - ends, 0, "{} envelopes left", left.len());
    // The code still holds: the device with it takes the account.
    let new_home = dir.path().join("new");
    let joined = tokio::task::spawn_blocking(move || join_quietly(&new_home, &code))
        .await
        .unwrap()
        .expect("joins after the one that went");
    assert_eq!(joined.restored.peer, me.peer_id());
    assert!(served.await.unwrap().expect("hands over").confirmed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_cancelled_while_it_waits_stops_at_once_tells_the_old_device_and_leaves_nothing() {
    let (_relay, addr) = relay(64).await;
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = account(&dir.path().join("old"));
    let (offer, _) = Offer::through_relay(None, &[(addr.clone(), Vec::new())])
        .await
        .unwrap();
    let code = offer.code().clone();
    let stop = offer.stopper();
    let (tx, seen) = std::sync::mpsc::channel();
    let served = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            offer.serve(
                &store,
                Duration::from_secs(30),
                // Its user takes a while to confirm: the new device is cancelled meanwhile.
                |_, _| {
                    std::thread::sleep(Duration::from_secs(2));
                    true
                },
                |s| {
                    let _ = tx.send(s);
                },
            )
        })
    };
    let state = JoinState::default();
    let cancel = state.clone();
    let home = dir.path().join("new");
    let joining = {
        let home = home.clone();
        tokio::task::spawn_blocking(move || join(&home, &code, "phone", |_, _| {}, &state))
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let cancelled_at = Instant::now();
    assert!(cancel.cancel(), "not committing yet");
    let failed = joining.await.unwrap().expect_err("cancelled");
    let stopped = cancelled_at.elapsed();
    assert!(stopped < Duration::from_secs(2), "{stopped:?}: {failed}");
    // Nothing kept: no home, no staging, no lock.
    assert!(!home.exists());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["old".to_string()], "{left:?}");
    // The old device hears the new one went once its user confirmed, not minutes later,
    // and keeps the account.
    let heard = tokio::task::spawn_blocking(move || {
        loop {
            match seen.recv_timeout(Duration::from_secs(15)) {
                Ok(Seen::BrokeOff(..)) => return Some(cancelled_at.elapsed()),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    })
    .await
    .unwrap()
    .expect("the old device heard the new one went");
    println!(
        "a join cancelled: stopped in {} ms; the old device heard it {} ms after",
        stopped.as_millis(),
        heard.as_millis()
    );
    assert_eq!(store.handed_over().unwrap(), None);
    // Its user stops the offer: it ends at once.
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(served.await.unwrap(), Err(LinkFailure::Cancelled)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_nothing_waits_for_at_the_relay_is_named_as_such() {
    let (_relay, addr) = relay(64).await;
    let dir = tempfile::tempdir().unwrap();
    let code = LinkCode::generate(&mut rand_core::OsRng, Vec::new(), Some(addr.clone())).unwrap();
    let new_home = dir.path().join("new");
    let home = new_home.clone();
    let failed = tokio::task::spawn_blocking(move || join_quietly(&home, &code))
        .await
        .unwrap()
        .expect_err("nothing waits under that code");
    let why = failed.to_string();
    assert!(why.contains("nothing waits there under this code"), "{why}");
    assert!(why.contains(&addr.to_string()), "{why}");
    assert!(!new_home.exists());
}
