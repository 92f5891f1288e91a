//! What relays learn, and what strangers holding an invite can do, against the real
//! binaries: a conversation through three relays that log everything, after which
//! their logs and databases are searched for the two users' identities and compared
//! for shared queue names; and strangers flooding every relay of a user through her
//! invite code while a contact keeps writing to her. Each scenario prints its figures.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kkachi_protocol::wire::{Addressed, PutOutcome};
use kkachi_protocol::{Card, Envelope, ErrorCode, PeerId, RelayToClient};
use kkachi_relay::client::MailboxClient;
use kkachi_tests::checker::Checker;
use kkachi_tests::procs::{RelayProc, User};

fn add_relays(user: &User, relays: &[RelayProc]) {
    let mut args = vec!["relay", "add"];
    args.extend(relays.iter().map(|r| r.addr.as_str()));
    user.ok(&args);
}

fn peer_of(user: &User) -> PeerId {
    Card::from_invite(&user.invite())
        .expect("own invite decodes")
        .identity()
        .peer_id()
}

/// The reasons the relays gave for refusing a send (`send --json`'s `refused`).
fn refusals(v: &serde_json::Value) -> Vec<&str> {
    v["refused"]
        .as_array()
        .map(|rs| rs.iter().filter_map(|r| r["reason"].as_str()).collect())
        .unwrap_or_default()
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The queue ids and write ids a stopped relay's database holds.
fn registry(dir: &Path) -> (HashSet<Vec<u8>>, HashSet<Vec<u8>>) {
    let db = sled::open(dir.join("db")).expect("relay database opens");
    let tree = db.open_tree("registry").unwrap();
    let (mut queues, mut writes) = (HashSet::new(), HashSet::new());
    for item in tree.iter() {
        let (key, _) = item.unwrap();
        match key[0] {
            b'q' => queues.insert(key[1..].to_vec()),
            b'g' => writes.insert(key[1..].to_vec()),
            _ => false,
        };
    }
    (queues, writes)
}

#[test]
fn relays_learn_neither_user_and_share_no_queue_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut relays: Vec<RelayProc> = (0..3)
        .map(|i| {
            RelayProc::start_logged(
                &dir.path().join(format!("relay{i}")),
                &["--failure-domain", &format!("test/dc{i}")],
                &dir.path().join(format!("relay{i}.log")),
            )
        })
        .collect();
    let alice = User::new(dir.path(), "alice");
    let bob = User::new(dir.path(), "bob");
    add_relays(&alice, &relays);
    add_relays(&bob, &relays);
    User::introduce(&alice, &bob);
    // A conversation both ways, a few times over.
    let mut said = 0;
    for round in 0..3 {
        alice
            .send("bob", &format!("alice {round}"), 5.0)
            .expect("alice sends");
        bob.ok(&["sync"]);
        bob.send("alice", &format!("bob {round}"), 5.0)
            .expect("bob sends");
        alice.ok(&["sync"]);
        said += 2;
    }
    bob.ok(&["sync"]);
    assert_eq!(
        bob.history_texts("alice").len(),
        said,
        "the conversation went through"
    );
    for r in &mut relays {
        r.stop();
    }

    let users = [("alice", peer_of(&alice)), ("bob", peer_of(&bob))];
    let mut searched = 0usize;
    for (i, relay) in relays.iter().enumerate() {
        let log = dir.path().join(format!("relay{i}.log"));
        let mut places = files(&relay.dir);
        places.push(log.clone());
        for path in places {
            let bytes = std::fs::read(&path).unwrap_or_default();
            searched += bytes.len();
            for (name, peer) in &users {
                assert!(
                    !contains(&bytes, peer.to_string().as_bytes())
                        && !contains(&bytes, &peer.to_bytes()),
                    "relay {i} knows {name}'s identity: found in {}",
                    path.display()
                );
            }
        }
        let lines = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count();
        assert!(lines > 3, "relay {i} logged almost nothing ({lines} lines)");
    }
    let registries: Vec<_> = relays.iter().map(|r| registry(&r.dir)).collect();
    for (i, (queues, writes)) in registries.iter().enumerate() {
        assert!(
            !queues.is_empty() && !writes.is_empty(),
            "relay {i} holds no queue"
        );
        for (j, (other_queues, other_writes)) in registries.iter().enumerate().skip(i + 1) {
            assert!(
                queues.is_disjoint(other_queues),
                "relays {i} and {j} share a queue id"
            );
            assert!(
                writes.is_disjoint(other_writes),
                "relays {i} and {j} share a write id"
            );
        }
    }
    println!(
        "privacy: {said} messages through 3 relays; {} KiB of their logs and databases hold \
         neither user's identity; queues per relay {:?}, write ids per relay {:?}, none shared",
        searched / 1024,
        registries.iter().map(|(q, _)| q.len()).collect::<Vec<_>>(),
        registries.iter().map(|(_, w)| w.len()).collect::<Vec<_>>(),
    );
}

/// Junk put through the contact-request capability of `victim`'s card at every one of
/// its relays, as fast as the relays answer, until `stop`. Returns (stored, refused
/// by code).
async fn flood(
    victim: Card,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (usize, Vec<(ErrorCode, usize)>) {
    let mut tasks = Vec::new();
    for relay in victim.relays() {
        let peer = match relay.iter().last() {
            Some(kkachi_protocol::multiaddr::Protocol::P2p(p)) => p,
            _ => panic!("relay without peer id"),
        };
        let write = *victim
            .request_key_at(&peer)
            .expect("request key in the card");
        let relay = relay.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            // A new identity for every connection, as a flooder would.
            let client =
                MailboxClient::connect(libp2p::identity::Keypair::generate_ed25519(), relay)
                    .await
                    .expect("relay reachable");
            let mut stored = 0;
            let mut refused: Vec<(ErrorCode, usize)> = Vec::new();
            let mut n = 0u64;
            while !*stop.borrow() {
                let items = (0..8)
                    .map(|i| Addressed {
                        write,
                        envelope: Envelope {
                            expires_at: std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .unwrap()
                                .as_secs()
                                + 3600,
                            payload: [n.to_be_bytes().as_slice(), &[i; 4000]].concat(),
                        },
                    })
                    .collect();
                n += 1;
                let codes: Vec<Option<ErrorCode>> = match client.put(items).await {
                    Ok(RelayToClient::Stored { outcomes, .. }) => outcomes
                        .into_iter()
                        .map(|o| match o {
                            PutOutcome::Rejected { code, .. } => Some(code),
                            _ => None,
                        })
                        .collect(),
                    Ok(RelayToClient::Error { code, .. }) => vec![Some(code)],
                    _ => vec![Some(ErrorCode::Internal)],
                };
                for code in codes {
                    match code {
                        None => stored += 1,
                        Some(code) => match refused.iter_mut().find(|(c, _)| *c == code) {
                            Some((_, k)) => *k += 1,
                            None => refused.push((code, 1)),
                        },
                    }
                }
            }
            (stored, refused)
        }));
    }
    let mut stored = 0;
    let mut refused: Vec<(ErrorCode, usize)> = Vec::new();
    for t in tasks {
        let (s, r) = t.await.unwrap();
        stored += s;
        for (code, k) in r {
            match refused.iter_mut().find(|(c, _)| *c == code) {
                Some((_, n)) => *n += k,
                None => refused.push((code, k)),
            }
        }
    }
    (stored, refused)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Sends `n` messages from `alice` to carol; returns each one's send→shown time.
fn converse(
    alice: &User,
    daemon: &kkachi_tests::procs::Daemon,
    checker: &mut Checker,
    label: &str,
    n: usize,
) -> Vec<Duration> {
    let mut ids = Vec::new();
    for i in 0..n {
        let at = Instant::now();
        let v = alice
            .send("carol", &format!("{label} {i}"), 5.0)
            .expect("alice sends");
        let id = v["id"].as_str().unwrap().to_owned();
        checker.sent(&id, at);
        ids.push((id, at));
    }
    let shown = daemon.collect(Duration::from_secs(30), |seen| {
        ids.iter()
            .all(|(id, _)| seen.iter().any(|(_, v)| v["id"] == id.as_str()))
    });
    ids.iter()
        .filter_map(|(id, at)| {
            shown
                .iter()
                .find(|(_, v)| v["id"] == id.as_str())
                .map(|(when, v)| {
                    checker.shown(*when, v);
                    when.saturating_duration_since(*at)
                })
        })
        .collect()
}

#[test]
fn strangers_flooding_every_relay_through_an_invite_do_not_hold_up_a_contact() {
    let dir = tempfile::tempdir().unwrap();
    // Every stranger here connects from 127.0.0.1; a relay allows each address only a
    // few requests an hour, so to fill the request capability itself the relays are
    // told to let this one address behave like thousands.
    let relays: Vec<RelayProc> = (0..3)
        .map(|i| {
            let config = dir.path().join(format!("relay{i}.toml"));
            std::fs::write(
                &config,
                "[limits]\nrequest_puts_per_hour_per_address = 10000000\n\
                 request_put_burst_per_address = 10000000\n\
                 puts_per_sec_per_address = 1000000\nput_burst_per_address = 1000000\n\
                 puts_per_sec = 1000000\nput_burst = 1000000\n",
            )
            .unwrap();
            RelayProc::start(
                &dir.path().join(format!("relay{i}")),
                &["--config", config.to_str().unwrap()],
            )
        })
        .collect();
    let carol = User::new(dir.path(), "carol");
    let alice = User::new(dir.path(), "alice");
    add_relays(&carol, &relays);
    add_relays(&alice, &relays);
    User::introduce(&alice, &carol);
    let daemon = carol.daemon();
    let mut checker = Checker::default();
    // The contact's capability is in place once carol's daemon has granted it; one
    // exchange makes sure of that.
    let warm = converse(&alice, &daemon, &mut checker, "warm-up", 2);
    assert_eq!(warm.len(), 2, "alice reaches carol");
    let quiet = converse(&alice, &daemon, &mut checker, "quiet", 10);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let victim = Card::from_invite(&carol.invite()).unwrap();
    let flooding = rt.spawn(flood(victim, stop));
    // Let the flood fill the request capability's room on every relay first.
    std::thread::sleep(Duration::from_secs(3));
    let flooded = converse(&alice, &daemon, &mut checker, "under flood", 10);
    stop_tx.send(true).unwrap();
    let (stored, refused) = rt.block_on(flooding).unwrap();

    let report = checker.report();
    println!(
        "strangers' flood through the invite on 3 relays: {stored} junk envelopes stored, \
         refused {refused:?}; alice → carol send→shown median {:?} quiet, {:?} under flood; {report}",
        median(quiet.clone()),
        median(flooded.clone()),
    );
    assert_eq!(flooded.len(), 10, "every message of the contact arrived");
    assert_eq!((report.lost, report.duplicated), (0, 0), "{report}");
    let quota_refusals = refused
        .iter()
        .find(|(c, _)| *c == ErrorCode::QuotaExceeded)
        .map_or(0, |(_, n)| *n);
    assert!(
        quota_refusals > 0,
        "the flood never filled the request capability: {refused:?}"
    );
}

#[test]
fn a_stranger_past_the_request_allowance_is_told_which_relay_refused_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let relays: Vec<RelayProc> = (0..2)
        .map(|i| RelayProc::start(&dir.path().join(format!("relay{i}")), &[]))
        .collect();
    let carol = User::new(dir.path(), "carol");
    let frank = User::new(dir.path(), "frank");
    add_relays(&carol, &relays);
    add_relays(&frank, &relays);
    frank.ok(&["contact", "add", &carol.invite()]);
    // The relays let one address put 10 requests at once; Frank keeps asking.
    let mut refused = None;
    for i in 0..14 {
        let v = frank
            .send("carol", &format!("please add me ({i})"), 5.0)
            .expect("send exits 0 once the message is in the outbox");
        if v["state"] == "queued" {
            refused = Some((i, v));
            break;
        }
    }
    let (i, v) = refused.expect("the request allowance never ran out");
    let reasons = refusals(&v);
    assert_eq!(reasons.len(), 2, "both relays said why: {v}");
    assert!(reasons.iter().all(|r| r.starts_with("rate_limited")), "{v}");
    let o = frank.run(&["send", "carol", "one more"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("refused: rate_limited"), "{text}");
    println!("request allowance: message {i} was refused by both relays, and said so: {reasons:?}");
}

#[test]
fn a_renewed_invite_retires_every_earlier_code_and_leaves_contacts_alone() {
    let dir = tempfile::tempdir().unwrap();
    let relays: Vec<RelayProc> = (0..2)
        .map(|i| RelayProc::start(&dir.path().join(format!("relay{i}")), &[]))
        .collect();
    let carol = User::new(dir.path(), "carol");
    let alice = User::new(dir.path(), "alice");
    let frank = User::new(dir.path(), "frank");
    let gina = User::new(dir.path(), "gina");
    for u in [&carol, &alice, &frank, &gina] {
        add_relays(u, &relays);
    }
    User::introduce(&alice, &carol);
    let old_code = carol.invite();
    frank.ok(&["contact", "add", &old_code]);
    let renewed = carol.ok(&["invite", "--renew"]);
    let new_code = renewed.trim().lines().last().unwrap().to_string();
    assert_ne!(new_code, old_code);
    // The old code reaches nothing: both relays say so.
    let v = frank.send("carol", "with the old code", 5.0).expect("send");
    assert_eq!(v["state"], "queued", "{v}");
    let reasons = refusals(&v);
    assert!(
        reasons.len() == 2 && reasons.iter().all(|r| r.starts_with("no_queue")),
        "{v}"
    );
    // The new one does; a contact is not affected.
    gina.ok(&["contact", "add", &new_code]);
    let v = gina.send("carol", "with the new code", 5.0).expect("send");
    assert_eq!(v["state"], "relayed", "{v}");
    let v = alice
        .send("carol", "still your contact", 5.0)
        .expect("send");
    assert_ne!(v["state"], "queued", "{v}");
    carol.ok(&["sync"]);
    assert_eq!(carol.history_texts("alice"), ["still your contact"]);
    let requests = carol.ok(&["request", "list"]);
    assert!(requests.contains("with the new code"), "{requests}");
    assert!(!requests.contains("with the old code"), "{requests}");
    println!(
        "renewed invite: the old code was refused by both relays ({reasons:?}); the new one and contacts work"
    );
}
