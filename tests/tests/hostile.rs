//! Hostile input and first contact with the real binaries: a hostile contact attacks a
//! victim running `kkachi daemon` while an honest contact keeps writing; a stranger's
//! first message waits as a request until the victim adds them; output stays safe for
//! a terminal. Each scenario prints its figures.

use std::time::{Duration, Instant};

use kkachi_protocol::fuzzing::forged_card;
use kkachi_protocol::{Body, Content, MessageId};
use kkachi_tests::checker::Checker;
use kkachi_tests::evil::EvilPeer;
use kkachi_tests::procs::{RelayProc, User};
use kkachi_tests::soak;

fn text(seq: u64, prev: [u8; 32], text: &str) -> Content {
    Content {
        id: MessageId(rand::random()),
        seq,
        prev,
        sent_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
        body: Body::Text(text.into()),
    }
}

fn relays(dir: &std::path::Path, n: usize) -> Vec<RelayProc> {
    (0..n)
        .map(|i| {
            let domain = format!("test/dc{i}");
            RelayProc::start(
                &dir.join(format!("relay{i}")),
                &["--failure-domain", &domain],
            )
        })
        .collect()
}

fn add_relays(user: &User, relays: &[RelayProc]) {
    let mut args = vec!["relay", "add"];
    args.extend(relays.iter().map(|r| r.addr.as_str()));
    user.ok(&args);
}

/// Counts what the hostile contact sent, by kind, for the figures.
#[derive(Debug, Default)]
struct Attacks(Vec<(&'static str, usize)>);

impl Attacks {
    fn note(&mut self, kind: &'static str) {
        match self.0.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => self.0.push((kind, 1)),
        }
    }

    fn total(&self) -> usize {
        self.0.iter().map(|(_, n)| n).sum()
    }
}

#[test]
fn a_hostile_contact_cannot_crash_silence_or_impersonate_anyone() {
    let dir = tempfile::tempdir().unwrap();
    let relays = relays(dir.path(), 3);
    let carol = User::new(dir.path(), "carol");
    let alice = User::new(dir.path(), "alice");
    add_relays(&carol, &relays);
    add_relays(&alice, &relays);
    User::introduce(&alice, &carol);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut evil = rt.block_on(EvilPeer::new("Mallory", &relays[0].addr, &carol.invite()));
    carol.ok(&["contact", "add", &evil.invite()]);
    let mut daemon = carol.daemon();
    let mut checker = Checker::default();
    let mut attacks = Attacks::default();
    let start = Instant::now();

    // Mallory starts as an honest contact, until the session is established.
    let first = text(1, [0; 32], "hi carol, it's mallory");
    let first_envelope = rt.block_on(evil.send(&first));
    let established = rt.block_on(evil.establish(Duration::from_secs(30)));
    assert!(established, "carol's receipts reached mallory");

    let flood = if soak() { 2000 } else { 300 };
    let mut honest_sent = 0;
    let alice_says = |checker: &mut Checker, i: usize| {
        let at = Instant::now();
        let v = alice
            .send("carol", &format!("honest {i}"), 5.0)
            .expect("alice can send");
        checker.sent(v["id"].as_str().unwrap(), at);
    };
    rt.block_on(async {
        let mut i = 0;
        let mut step = |attacks: &mut Attacks, kind| {
            attacks.note(kind);
            i += 1;
            i
        };
        // Sequence numbers far ahead, at the end of their range, and backwards.
        evil.send(&text(1 << 40, [1; 32], "far ahead")).await;
        step(&mut attacks, "seq 2^40");
        evil.send(&text(u64::MAX, [1; 32], "at the end")).await;
        step(&mut attacks, "seq u64::MAX");
        evil.send(&text(1, [0; 32], "number one again")).await;
        step(&mut attacks, "backwards seq");
        evil.send(&text(2, [9; 32], "wrong predecessor")).await;
        step(&mut attacks, "prev mismatch");
        // Odd and oversized bodies.
        evil.send(&text(3, [0; 32], &"x".repeat(32 * 1024))).await;
        step(&mut attacks, "largest text");
        let bad_utf8 = Content {
            body: Body::Unknown {
                kind: 1,
                data: vec![0xff, 0xfe, 0xfd],
            },
            ..text(4, [0; 32], "")
        };
        evil.send(&bad_utf8).await;
        step(&mut attacks, "text not UTF-8");
        for kind in [4u16, 999, u16::MAX] {
            let unknown = Content {
                body: Body::Unknown {
                    kind,
                    data: vec![7; 5000],
                },
                ..text(5, [0; 32], "")
            };
            evil.send(&unknown).await;
            step(&mut attacks, "unknown kind");
        }
        let receipt = Content {
            body: Body::Receipt {
                status: kkachi_protocol::ReceiptStatus::Read,
                ids: (0..512).map(|_| MessageId(rand::random())).collect(),
            },
            ..text(0, [0; 32], "")
        };
        evil.send(&receipt).await;
        step(&mut attacks, "receipt for 512 unknown ids");
        // One message id, two texts.
        let twin = text(6, [0; 32], "the first text of this id");
        evil.send(&twin).await;
        let other = Content {
            body: Body::Text("the second text of this id".into()),
            ..twin.clone()
        };
        evil.send(&other).await;
        step(&mut attacks, "one id, two texts");
        // Escape sequences: a window title, a cursor move, a forged line from alice.
        evil.send(&text(
            7,
            [0; 32],
            "look\u{1b}]0;owned\u{7}\u{1b}[2A\n2026-12-01 10:00  alice: send the code to mallory\u{202e}",
        ))
        .await;
        step(&mut attacks, "escape sequences");
        // A card update pairing Mallory's identity with Alice's session key.
        let alice_card = kkachi_protocol::Card::from_invite(&alice.invite()).unwrap();
        let forged = forged_card(
            evil.identity(),
            *alice_card.identity().x25519(),
            "alice",
            vec![],
            99,
        );
        let update = Content {
            body: Body::CardUpdate(Box::new(forged)),
            ..text(0, [0; 32], "")
        };
        evil.send(&update).await;
        step(&mut attacks, "forged card");
        // Replays of the first message: the same envelope, and re-wrapped.
        evil.put(first_envelope.clone()).await;
        step(&mut attacks, "replayed envelope");
        let rewrapped = kkachi_protocol::Envelope {
            expires_at: first_envelope.expires_at - 60,
            ..first_envelope.clone()
        };
        evil.put(rewrapped).await;
        step(&mut attacks, "replayed first message, re-wrapped");
        // Bytes that are no packet.
        let junk = kkachi_protocol::Envelope {
            payload: vec![2, 2, 0, 1, 2, 3],
            ..first_envelope.clone()
        };
        evil.put(junk).await;
        step(&mut attacks, "junk payload");
    });
    // The flood, with alice writing all along.
    for i in 0..flood {
        rt.block_on(evil.send(&text(100 + i as u64, [0; 32], &format!("flood {i}"))));
        attacks.note("flood");
        if i % 30 == 0 {
            alice_says(&mut checker, honest_sent);
            honest_sent += 1;
        }
    }
    for _ in 0..5 {
        alice_says(&mut checker, honest_sent);
        honest_sent += 1;
    }
    // Everything of alice's is shown once; mallory's at most once each.
    let expected = checker.outstanding();
    let got = daemon.collect(Duration::from_secs(120), |g| {
        g.iter().filter(|(_, l)| l["from"] == "alice").count() >= expected
    });
    let extra = daemon.collect(Duration::from_millis(1500), |_| false);
    let mut mallory_ids = Vec::new();
    for (at, line) in got.iter().chain(extra.iter()) {
        if line["from"] == "alice" {
            checker.shown(*at, line);
        } else {
            mallory_ids.push(line["id"].as_str().unwrap_or_default().to_string());
        }
    }
    let r = checker.report();
    let shown_mallory = mallory_ids.len();
    mallory_ids.sort();
    mallory_ids.dedup();
    println!(
        "hostile contact: {} attacks ({:?}) in {:.1} s; victim showed {} of mallory's messages ({} distinct); alice: {r}",
        attacks.total(),
        attacks.0,
        start.elapsed().as_secs_f64(),
        shown_mallory,
        mallory_ids.len(),
    );
    assert!(daemon.running(), "the victim's daemon is still running");
    assert_eq!((r.lost, r.duplicated), (0, 0), "{r}");
    assert_eq!(
        shown_mallory,
        mallory_ids.len(),
        "nothing of mallory's twice"
    );
    let status = daemon.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM stops the daemon cleanly: {status:?}"
    );

    // What reaches a terminal holds no escape sequence and no forged line.
    let history = carol.run(&["history", "Mallory"]);
    assert!(history.status.success());
    let out = String::from_utf8_lossy(&history.stdout);
    assert!(!out.contains('\u{1b}') && !out.contains('\u{7}') && !out.contains('\u{202e}'));
    assert!(out.contains("\\e]0;owned"), "the escape is shown, escaped");
    for line in out.lines() {
        assert!(
            line.contains("Mallory:") || line.contains("→ Mallory") || line.starts_with("  ⚠"),
            "a line that is not mallory's: {line:?}"
        );
    }
    assert!(
        out.contains("do not follow"),
        "the broken chain is shown: {out}"
    );
    // Alice's card is untouched by the forged update.
    let contacts = carol.ok(&["contact", "list", "--json"]);
    let contacts: serde_json::Value = serde_json::from_str(&contacts).unwrap();
    let alice_entry = contacts
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "alice")
        .unwrap();
    assert_eq!(alice_entry["peer_id"], alice_card_peer(&alice));
}

fn alice_card_peer(alice: &User) -> String {
    kkachi_protocol::Card::from_invite(&alice.invite())
        .unwrap()
        .identity()
        .peer_id()
        .to_string()
}

fn history_json(user: &User, with: &str) -> Vec<serde_json::Value> {
    let out = user.ok(&["history", with, "--json"]);
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_strangers_first_message_waits_as_a_request_until_added() {
    let dir = tempfile::tempdir().unwrap();
    let relays = relays(dir.path(), 2);
    let frank = User::new(dir.path(), "Frank");
    let carol = User::new(dir.path(), "Carol");
    add_relays(&frank, &relays);
    add_relays(&carol, &relays);
    // Frank has Carol's code; Carol has never heard of Frank.
    frank.ok(&["contact", "add", &carol.invite()]);
    let sent = frank
        .send("Carol", "injured at the station, please add me", 5.0)
        .expect("send");
    assert_eq!(sent["state"], "relayed", "{sent}");

    let sync = carol.run(&["sync"]);
    assert!(sync.status.success());
    assert!(
        String::from_utf8_lossy(&sync.stdout).trim().is_empty(),
        "nothing shown as a message"
    );
    assert!(String::from_utf8_lossy(&sync.stderr).contains("message request from Frank"));
    let list = carol.ok(&["request", "list"]);
    assert!(
        list.contains("Frank") && list.contains("injured at the station"),
        "{list}"
    );
    // Frank's copy stays "relayed": Carol's device confirmed nothing.
    carol.ok(&["sync"]);
    frank.ok(&["sync"]);
    assert_eq!(history_json(&frank, "Carol")[0]["state"], "relayed");

    // Carol adds Frank's code: the message joins the conversation, once.
    let added = carol.ok(&["contact", "add", &frank.invite()]);
    assert!(added.contains("1 message(s) Frank sent before"), "{added}");
    let h = history_json(&carol, "Frank");
    assert_eq!(h.len(), 1);
    assert_eq!(h[0]["text"], "injured at the station, please add me");
    assert_eq!(h[0]["direction"], "in");
    assert!(carol.ok(&["request", "list", "--json"]).trim() == "[]");
    // The receipt goes out with Carol's next sync; Frank then sees it delivered.
    carol.ok(&["sync"]);
    frank.ok(&["sync"]);
    assert_eq!(history_json(&frank, "Carol")[0]["state"], "delivered");
    carol.ok(&["sync"]);
    assert_eq!(history_json(&carol, "Frank").len(), 1, "shown once");
    // And Carol can answer.
    let reply = carol
        .send("Frank", "coming, stay there", 5.0)
        .expect("reply");
    assert_ne!(reply["state"], "queued");
    println!("first contact: request held, accepted by adding the code, delivered once");
}

#[test]
fn contacts_are_controlled_and_forged_or_disguised_cards_refused() {
    let dir = tempfile::tempdir().unwrap();
    let relays = relays(dir.path(), 1);
    let alice = User::new(dir.path(), "alice");
    let carol = User::new(dir.path(), "carol");
    add_relays(&alice, &relays);
    add_relays(&carol, &relays);
    User::introduce(&alice, &carol);
    // A card made from alice's public key by someone else.
    let alice_card = kkachi_protocol::Card::from_invite(&alice.invite()).unwrap();
    let mallory = kkachi_protocol::Identity::generate();
    let forged = forged_card(
        &mallory,
        *alice_card.identity().x25519(),
        "Aid Station",
        vec![],
        1,
    );
    let o = carol.run(&["contact", "add", &forged.to_invite()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("belongs to your contact alice"), "{err}");
    // Names that hide or reorder text are refused, with the reason.
    let o = carol.run(&["contact", "rename", "alice", "ali\u{202e}ce"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("text-direction"));
    carol.ok(&["contact", "rename", "alice", "앨리스"]);
    assert!(carol.ok(&["contact", "list"]).contains("앨리스"));
    // Block: alice's messages are dropped; unblock: they arrive again.
    carol.ok(&["contact", "block", "앨리스"]);
    assert!(carol.ok(&["contact", "list"]).contains("(blocked)"));
    alice.send("carol", "while blocked", 5.0).expect("send");
    carol.ok(&["sync"]);
    assert!(history_json(&carol, "앨리스").is_empty());
    let o = carol.run(&["send", "앨리스", "hi"]);
    assert!(!o.status.success(), "sending to someone blocked is refused");
    carol.ok(&["contact", "unblock", "앨리스"]);
    alice.send("carol", "after unblocking", 5.0).expect("send");
    carol.ok(&["sync"]);
    let h = history_json(&carol, "앨리스");
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0]["text"], "after unblocking");
    // Remove: the conversation goes. Alice still holds her session with carol, and
    // writes on it.
    let removed = carol.ok(&["contact", "remove", "앨리스"]);
    assert!(removed.contains("1 message(s)"), "{removed}");
    assert!(!carol.ok(&["contact", "list"]).contains("앨리스"));
    alice
        .send("carol", "line one\u{1b}[2K\nfake: line two", 5.0)
        .expect("send");
    // Carol adds her again: carol's card reaches alice under a fresh session, alice's
    // client seals again what carol never confirmed, and it arrives once.
    carol.ok(&["contact", "add", &alice.invite()]);
    let mut out = carol.ok(&["sync"]);
    alice.ok(&["sync"]);
    out.push_str(&carol.ok(&["sync"]));
    assert!(!out.contains('\u{1b}'), "{out:?}");
    let shown: Vec<&str> = out.lines().filter(|l| l.contains("line one")).collect();
    assert_eq!(shown.len(), 1, "once, on one line: {out:?}");
    assert!(out.contains("line one\\e[2K\\nfake: line two"), "{out:?}");
}
