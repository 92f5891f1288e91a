//! Protocol conversations with a real relay over libp2p on loopback (port 0):
//! grant → put → fetch → delete, live long polls, capabilities, errors over the wire,
//! restarts, and hostile input that must not disturb anyone else.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::prelude::*;
use kkachi_protocol::wire::{self, Addressed, PutOutcome};
use kkachi_protocol::{
    ClientToRelay, Envelope, ErrorCode, Multiaddr, QueueKind, ReadKey, RelayToClient, WriteKey,
};
use kkachi_relay::client::MailboxClient;
use kkachi_relay::config::Config;
use kkachi_relay::{RelayHandle, start};
use libp2p::identity::Keypair;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn config(dir: &std::path::Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        ..Config::default()
    }
}

async fn relay(c: Config) -> (RelayHandle, Multiaddr) {
    let mut r = start(c).await.expect("relay starts");
    let addr = r.wait_listening(1).await.remove(0);
    (r, addr)
}

/// One expiry for the whole run, so the same (to, n) always gives the same envelope id.
fn expiry() -> u64 {
    static EXPIRY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *EXPIRY.get_or_init(|| now() + 3600)
}

fn envelope(n: u32) -> Envelope {
    Envelope {
        expires_at: expiry(),
        payload: n.to_be_bytes().repeat(8),
    }
}

/// A queue: its read key and the one write key granted to it.
#[derive(Clone)]
struct Queue {
    key: ReadKey,
    write: WriteKey,
}

impl Queue {
    fn random() -> Self {
        Self {
            key: ReadKey(rand::random()),
            write: WriteKey(rand::random()),
        }
    }

    /// Envelope `n` put into this queue.
    fn put(&self, n: u32) -> Addressed {
        Addressed {
            write: self.write,
            envelope: envelope(n),
        }
    }

    async fn open(&self, client: &MailboxClient) {
        let answer = client
            .grant(&self.key, QueueKind::Inbox, vec![self.write.id()])
            .await
            .unwrap();
        assert_eq!(answer, RelayToClient::Granted { grants: 1 });
    }
}

fn batch(r: RelayToClient) -> (Vec<Envelope>, u64) {
    match r {
        RelayToClient::Batch { items, next, .. } => {
            (items.into_iter().map(|i| i.envelope).collect(), next)
        }
        other => panic!("batch expected, got {other:?}"),
    }
}

#[tokio::test]
async fn put_fetch_delete_and_live_subscribe() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, addr) = relay(config(dir.path())).await;
    let sender = MailboxClient::connect(Keypair::generate_ed25519(), addr.clone())
        .await
        .unwrap();
    let owner = MailboxClient::connect(Keypair::generate_ed25519(), addr.clone())
        .await
        .unwrap();
    let q = Queue::random();
    q.open(&owner).await;

    let stored = sender.put(vec![q.put(1), q.put(2)]).await.unwrap();
    assert!(
        matches!(&stored, RelayToClient::Stored { outcomes, epoch }
            if outcomes == &[PutOutcome::Stored, PutOutcome::Stored] && *epoch != 0),
        "{stored:?}"
    );
    let again = sender.put(vec![q.put(1)]).await.unwrap();
    assert!(
        matches!(&again, RelayToClient::Stored { outcomes, .. } if outcomes == &[PutOutcome::Stored]),
        "a copy still held is answered like a new one: no online oracle: {again:?}"
    );

    let (items, next) = batch(owner.fetch(&q.key, 0, 100).await.unwrap());
    assert_eq!(items, vec![envelope(1), envelope(2)]);

    // A long poll with nothing new waits, and is answered as soon as a put lands.
    let waiting = {
        let owner = owner.clone();
        let key = q.key.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            (
                owner.subscribe(&key, next, 20_000).await.unwrap(),
                t.elapsed(),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    sender.put(vec![q.put(3)]).await.unwrap();
    let (pushed, waited) = waiting.await.unwrap();
    let (items3, next3) = batch(pushed);
    assert_eq!(items3, vec![envelope(3)]);
    assert!(
        waited < Duration::from_secs(10),
        "push took {waited:?}: it waited for the deadline"
    );
    assert!(next3 > next);

    // Delete what was read; the queue is then empty.
    let ids = [1, 2, 3].map(|n| envelope(n).id()).to_vec();
    let deleted = owner
        .request(ClientToRelay::Delete {
            key: q.key.clone(),
            ids,
        })
        .await
        .unwrap();
    assert_eq!(deleted, RelayToClient::Deleted { count: 3 });
    assert!(
        batch(owner.fetch(&q.key, 0, 100).await.unwrap())
            .0
            .is_empty()
    );

    // An empty long poll ends with an empty batch after its wait.
    let (items, _) = batch(owner.subscribe(&q.key, next3, 300).await.unwrap());
    assert!(items.is_empty());
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn only_granted_keys_put_and_a_put_answer_says_nothing_about_the_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, addr) = relay(config(dir.path())).await;
    let owner = MailboxClient::connect(Keypair::generate_ed25519(), addr.clone())
        .await
        .unwrap();
    let q = Queue::random();
    q.open(&owner).await;
    let mallory = MailboxClient::connect(Keypair::generate_ed25519(), addr)
        .await
        .unwrap();
    // A made-up write key reaches no queue.
    let guess = Queue {
        key: q.key.clone(),
        write: WriteKey(rand::random()),
    };
    let RelayToClient::Stored { outcomes, .. } = mallory.put(vec![guess.put(1)]).await.unwrap()
    else {
        panic!("stored expected")
    };
    assert!(
        matches!(
            outcomes[0],
            PutOutcome::Rejected {
                code: ErrorCode::NoQueue,
                ..
            }
        ),
        "{outcomes:?}"
    );
    // Re-putting an envelope the owner has (or has not) fetched answers the same.
    mallory.put(vec![q.put(2)]).await.unwrap();
    let before = mallory.put(vec![q.put(2)]).await.unwrap();
    let (items, _) = batch(owner.fetch(&q.key, 0, 10).await.unwrap());
    owner
        .request(ClientToRelay::Delete {
            key: q.key.clone(),
            ids: items.iter().map(Envelope::id).collect(),
        })
        .await
        .unwrap();
    let after = mallory.put(vec![q.put(2)]).await.unwrap();
    assert_eq!(before, after);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn restart_keeps_envelopes_and_peer_id() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::random();
    let (relay1, addr1) = relay(config(dir.path())).await;
    let first_id = relay1.peer_id();
    let sender = MailboxClient::connect(Keypair::generate_ed25519(), addr1)
        .await
        .unwrap();
    q.open(&sender).await;
    sender.put(vec![q.put(7)]).await.unwrap();
    relay1.shutdown().await.unwrap();

    let (relay2, addr2) = relay(config(dir.path())).await;
    assert_eq!(relay2.peer_id(), first_id, "PeerId must survive restarts");
    let owner = MailboxClient::connect(Keypair::generate_ed25519(), addr2)
        .await
        .unwrap();
    let (items, _) = batch(owner.fetch(&q.key, 0, 10).await.unwrap());
    assert_eq!(items, vec![envelope(7)]);
    let RelayToClient::Stored { outcomes, .. } = owner.put(vec![q.put(8)]).await.unwrap() else {
        panic!("stored expected")
    };
    assert_eq!(
        outcomes,
        vec![PutOutcome::Stored],
        "grants survive restarts"
    );
    relay2.shutdown().await.unwrap();
}

#[tokio::test]
async fn info_reports_the_failure_domain_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.info.failure_domain = "provider-a/seoul".into();
    c.info.name = "seoul-1".into();
    let (relay, addr) = relay(c).await;
    let client = MailboxClient::connect(Keypair::generate_ed25519(), addr)
        .await
        .unwrap();
    let RelayToClient::Info(info) = client.request(ClientToRelay::Info).await.unwrap() else {
        panic!("info expected")
    };
    assert_eq!(info.failure_domain, "provider-a/seoul");
    assert_eq!(info.name, "seoul-1");
    assert_eq!(info.protocol_version, wire::PROTOCOL_VERSION);
    assert_eq!(info.max_payload, 65536);
    assert!(info.software.starts_with("kkachi-relay/"));
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn quota_and_flood_get_errors_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.limits.capability_max_envelopes = 3;
    c.limits.puts_per_sec = 5;
    c.limits.put_burst = 20;
    let (relay, addr) = relay(c).await;
    let flooder = MailboxClient::connect(Keypair::generate_ed25519(), addr.clone())
        .await
        .unwrap();
    let victim = Queue::random();
    victim.open(&flooder).await;
    let RelayToClient::Stored { outcomes, .. } = flooder
        .put((0..4).map(|n| victim.put(n)).collect())
        .await
        .unwrap()
    else {
        panic!("stored expected")
    };
    assert!(matches!(
        outcomes[3],
        PutOutcome::Rejected {
            code: ErrorCode::QuotaExceeded,
            ..
        }
    ));

    // Flood: 200 puts at once from one peer. Most are refused as rate limited.
    let answers = future::join_all((0..200).map(|n| {
        let flooder = flooder.clone();
        let victim = victim.clone();
        async move { flooder.put(vec![victim.put(100 + n)]).await.unwrap() }
    }))
    .await;
    let limited = answers
        .iter()
        .filter(|a| {
            matches!(
                a,
                RelayToClient::Error {
                    code: ErrorCode::RateLimited,
                    ..
                }
            )
        })
        .count();
    assert!(
        limited >= 150,
        "only {limited} of 200 flood puts were rate limited"
    );

    // Someone else is served normally meanwhile.
    let other = MailboxClient::connect(Keypair::generate_ed25519(), addr)
        .await
        .unwrap();
    let theirs = Queue::random();
    theirs.open(&other).await;
    let answer = other.put(vec![theirs.put(999)]).await.unwrap();
    assert!(
        matches!(&answer, RelayToClient::Stored { outcomes, .. } if outcomes == &[PutOutcome::Stored]),
        "{answer:?}"
    );
    let text = relay.metrics().render();
    assert!(
        text.contains("kkachi_rejections_total{kind=\"rate_limited\"}"),
        "{text}"
    );
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn fresh_identities_from_one_address_share_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.limits.puts_per_sec = 1000;
    c.limits.put_burst = 1000;
    c.limits.puts_per_sec_per_address = 1;
    c.limits.put_burst_per_address = 6;
    let (relay, addr) = relay(c).await;
    // Every client here connects from 127.0.0.1: six identities of two puts each, none
    // over its own limit, share the address's burst of 6 (plus 1 a second).
    let q = Queue::random();
    let started = Instant::now();
    let mut answers = Vec::new();
    for i in 0..6u32 {
        let client = MailboxClient::connect(Keypair::generate_ed25519(), addr.clone())
            .await
            .unwrap();
        if i == 0 {
            q.open(&client).await;
        }
        for n in 0..2 {
            answers.push(client.put(vec![q.put(i * 10 + n)]).await.unwrap());
        }
    }
    let refilled = started.elapsed().as_secs() as usize + 1;
    let stored = answers
        .iter()
        .filter(|a| matches!(a, RelayToClient::Stored { .. }))
        .count();
    assert!(
        (6..=6 + refilled).contains(&stored),
        "{stored} stored: {answers:?}"
    );
    assert!(stored < answers.len(), "nothing refused: {answers:?}");
    for refusal in answers
        .iter()
        .skip(6)
        .filter(|a| !matches!(a, RelayToClient::Stored { .. }))
    {
        let RelayToClient::Error { code, message } = refusal else {
            panic!("unexpected answer {refusal:?}");
        };
        assert_eq!(*code, ErrorCode::RateLimited);
        assert!(message.contains("network address"), "{message}");
    }
    relay.shutdown().await.unwrap();
}
