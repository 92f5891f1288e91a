//! What no honest client sends: hostile contacts, strangers, forged cards, floods.
//! Each test holds the victim to the promise: it never crashes, keeps receiving
//! everyone else, shows nothing twice and loses nothing honest.

use kkachi_protocol::fuzzing::forged_card;
use kkachi_protocol::{Card, ReceiptStatus};
use proptest::prelude::*;

use super::*;
use crate::engine::ContactError;
use crate::store::{MAX_STORED_PER_CONTACT, TreeId};

/// Alice (honest), Mallory (a contact turned hostile) and Carol, who has both.
pub(super) struct Cast {
    pub(super) net: FakeNet,
    pub(super) alice: User,
    pub(super) mallory: User,
    pub(super) carol: User,
    pub(super) carol_at_alice: Contact,
    pub(super) carol_at_mallory: Contact,
}

pub(super) async fn cast() -> Cast {
    let net = FakeNet::default();
    let alice = User::started(&net, "Alice", 2).await;
    let mallory = User::started(&net, "Mallory", 2).await;
    let carol = User::started(&net, "Carol", 2).await;
    let carol_at_alice = alice.add_contact(&carol);
    let carol_at_mallory = mallory.add_contact(&carol);
    carol.add_contact(&alice);
    carol.add_contact(&mallory);
    for user in [&alice, &mallory, &carol] {
        user.regrant().await;
    }
    Cast {
        net,
        alice,
        mallory,
        carol,
        carol_at_alice,
        carol_at_mallory,
    }
}

pub(super) fn texts(user: &User, from: &User) -> Vec<String> {
    user.messages(from).into_iter().map(|m| m.text).collect()
}

#[tokio::test]
async fn a_huge_sequence_number_is_one_bounded_gap_and_silences_no_one() {
    let c = cast().await;
    let _ = c.mallory.send(&c.carol_at_mallory, "hi").await;
    c.mallory
        .send_raw(
            &c.carol_at_mallory,
            &raw_text(1 << 40, [7; 32], "far ahead"),
        )
        .await;
    c.mallory
        .send_raw(
            &c.carol_at_mallory,
            &raw_text(u64::MAX, [7; 32], "at the end"),
        )
        .await;
    c.mallory
        .send_raw(&c.carol_at_mallory, &raw_text(3, [9; 32], "back again"))
        .await;
    let _ = c.alice.send(&c.carol_at_alice, "are you safe?").await;
    c.carol.sync().await;
    assert_eq!(texts(&c.carol, &c.alice), ["are you safe?"]);
    assert_eq!(
        texts(&c.carol, &c.mallory).len(),
        4,
        "each of mallory's messages once"
    );
    let conv = c
        .carol
        .engine
        .store()
        .conversation(&c.mallory.peer())
        .unwrap();
    assert!(conv.gaps.ranges().len() <= crate::sequence::MAX_GAP_RANGES);
    assert_eq!(conv.gaps.missing(), u64::MAX - 4);
    let stored = postcard::to_stdvec(&conv).unwrap().len();
    assert!(
        stored < 4096,
        "the conversation record stays small: {stored} bytes"
    );
    // Nothing is left at the relays to come back and hurt again.
    for r in &c.carol.relays {
        let mailbox = c.carol.inbox(r);
        assert!(
            c.net
                .relay_store(r)
                .fetch(&mailbox, 0, 10, usize::MAX)
                .unwrap()
                .items
                .is_empty()
        );
    }
    // And the next sync goes on as usual.
    let _ = c.alice.send(&c.carol_at_alice, "still here").await;
    assert_eq!(c.carol.sync().await.len(), 1);
}

#[tokio::test]
async fn a_panic_reading_one_envelope_refuses_that_one_only() {
    let c = cast().await;
    let _ = c.mallory.send(&c.carol_at_mallory, PANIC_TEXT).await;
    let _ = c.alice.send(&c.carol_at_alice, "after the bad one").await;
    let got = c.carol.sync().await;
    assert_eq!(
        got.iter()
            .map(|r| r.message.text.as_str())
            .collect::<Vec<_>>(),
        ["after the bad one"]
    );
    assert_eq!(c.carol.engine.faults(), 1);
    // It was marked seen and deleted: the next sync does not meet it again.
    assert!(c.carol.sync().await.is_empty());
    let _ = c.mallory.send(&c.carol_at_mallory, "a normal one").await;
    assert_eq!(
        c.carol.sync().await.len(),
        1,
        "mallory's session still works"
    );
}

#[tokio::test]
async fn a_forged_card_takes_no_credit_for_someone_elses_messages() {
    let net = FakeNet::default();
    let alice = User::started(&net, "Alice", 1).await;
    let carol = User::started(&net, "Carol", 1).await;
    let mallory = User::started(&net, "Mallory", 1).await;
    // Mallory pairs her identity with Alice's session key and her own relays.
    let forged = forged_card(
        mallory.engine.identity(),
        *alice.card.identity().x25519(),
        "Aid Station",
        mallory.relays.clone(),
        1,
    );
    carol
        .engine
        .add_contact(forged.clone(), None)
        .await
        .unwrap();
    let carol_at_alice = alice.add_contact(&carol);
    let _ = alice
        .send(&carol_at_alice, "I am at the shelter on 5th street")
        .await;
    carol.sync().await;
    assert!(
        carol.messages(&mallory).is_empty(),
        "nothing is shown as from the forged card"
    );
    let requests = carol.engine.store().requests().unwrap();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].peer,
        alice.peer(),
        "held as Alice's, by her identity key"
    );
    // Accepting Alice while the forgery holds her key is refused, naming it.
    let err = carol
        .engine
        .accept_request(alice.peer(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::Contact(ContactError::KeyTaken { holder }) if holder == "Aid Station"),
        "{err}"
    );
    // Nothing Mallory can read reached her relays: no receipt of Alice's message, and
    // what Carol sealed for "Aid Station" (her card, on adding it) is sealed to Alice's
    // key, which Mallory does not hold.
    carol.engine.settle().await.unwrap();
    for r in &mallory.relays {
        let mailbox = mallory.inbox(r);
        for item in net
            .relay_store(r)
            .fetch(&mailbox, 0, 100, usize::MAX)
            .unwrap()
            .items
        {
            assert!(
                kkachi_protocol::session::open(mallory.engine.identity(), &item.envelope.payload)
                    .is_err(),
                "mallory opened something meant for the forged card"
            );
        }
    }
    // With the forgery removed, Alice's message arrives as hers.
    carol.engine.remove_contact(mallory.peer()).await.unwrap();
    carol
        .engine
        .accept_request(alice.peer(), None)
        .await
        .unwrap();
    assert_eq!(texts(&carol, &alice), ["I am at the shelter on 5th street"]);
    // And the other order: Alice first, then the forgery is refused.
    let err = carol
        .engine
        .add_contact(forged.clone(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, EngineError::Contact(ContactError::KeyTaken { .. })),
        "{err}"
    );
    let own = forged_card(
        mallory.engine.identity(),
        carol.engine.identity().x25519_public(),
        "Carol 2",
        vec![],
        1,
    );
    let err = carol
        .engine
        .add_contact(own.clone(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, EngineError::Contact(ContactError::OwnKey)),
        "{err}"
    );
}

#[tokio::test]
async fn a_broken_hash_chain_and_a_reused_number_are_shown_not_hidden() {
    let c = cast().await;
    let first = raw_text(1, [0; 32], "one");
    c.mallory.send_raw(&c.carol_at_mallory, &first).await;
    // Number 2 names a predecessor that is not the one Carol holds.
    c.mallory
        .send_raw(&c.carol_at_mallory, &raw_text(2, [5; 32], "two"))
        .await;
    // Another message claims number 1.
    c.mallory
        .send_raw(&c.carol_at_mallory, &raw_text(1, [0; 32], "one again"))
        .await;
    let got = c.carol.sync().await;
    assert_eq!(got.len(), 3, "all shown");
    let conv = c
        .carol
        .engine
        .store()
        .conversation(&c.mallory.peer())
        .unwrap();
    assert_eq!(conv.chain_breaks, vec![2]);
    assert_eq!(conv.conflicts, 1);
    let notices = crate::commands::notices(&conv, "Mallory");
    assert!(
        notices.iter().any(|n| n.contains("do not follow")),
        "{notices:?}"
    );
    // An honest chain raises nothing.
    let _ = c.alice.send(&c.carol_at_alice, "a").await;
    let _ = c.alice.send(&c.carol_at_alice, "b").await;
    c.carol.sync().await;
    let conv = c
        .carol
        .engine
        .store()
        .conversation(&c.alice.peer())
        .unwrap();
    assert!(conv.chain_breaks.is_empty() && conv.conflicts == 0);
    // The same message id with another text: the first stays, shown once.
    let mut twin = raw_text(3, first.hash(), "first text");
    c.mallory.send_raw(&c.carol_at_mallory, &twin).await;
    twin.body = Body::Text("second text".into());
    c.mallory.send_raw(&c.carol_at_mallory, &twin).await;
    c.carol.sync().await;
    let all = texts(&c.carol, &c.mallory);
    assert!(all.contains(&"first text".to_string()) && !all.contains(&"second text".to_string()));
}

#[tokio::test]
async fn a_contact_past_the_storage_limit_is_refused_and_counted() {
    let c = cast().await;
    let mut conv = c
        .carol
        .engine
        .store()
        .conversation(&c.mallory.peer())
        .unwrap();
    conv.received_bytes = MAX_STORED_PER_CONTACT - 3;
    let mut w = WriteSet::default();
    LocalStore::write_conversation(&mut w, &c.mallory.peer(), &conv);
    c.carol.engine.store().apply(w).unwrap();
    let _ = c.mallory.send(&c.carol_at_mallory, "one more").await;
    let _ = c.alice.send(&c.carol_at_alice, "fine").await;
    let got = c.carol.sync().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.text, "fine");
    let conv = c
        .carol
        .engine
        .store()
        .conversation(&c.mallory.peer())
        .unwrap();
    assert_eq!(conv.refused, 1);
}

#[tokio::test]
async fn expired_envelopes_are_forgotten_by_housekeeping() {
    let c = cast().await;
    let _ = c.alice.send(&c.carol_at_alice, "one").await;
    c.carol.sync().await;
    let store = c.carol.engine.store();
    assert_eq!(store.seen_len(), 1);
    // An id whose envelope expired long ago.
    let mut w = WriteSet::default();
    w.put(TreeId::Seen, vec![1; 32], 1_000u64.to_be_bytes().to_vec());
    store.apply(w).unwrap();
    assert_eq!(store.seen_len(), 2);
    c.carol.engine.housekeeping().await.unwrap();
    assert_eq!(
        store.seen_len(),
        1,
        "the live one stays, the expired one goes"
    );
}

#[tokio::test]
async fn a_direct_handover_from_a_stranger_is_not_delivered() {
    // The network refuses it (runtime); here: without a direct path, a stranger's
    // message is held, and the stranger's copy stays unconfirmed.
    let net = FakeNet::default();
    let frank = User::started(&net, "Frank", 1).await;
    let carol = User::started(&net, "Carol", 1).await;
    let carol_at_frank = frank.add_contact(&carol);
    let (q, p) = frank.send(&carol_at_frank, "hi").await;
    assert!(!p.direct);
    carol.sync().await;
    carol.engine.settle().await.unwrap();
    frank.sync().await;
    assert!(
        frank.engine.progress(q.outbox_key).await.unwrap().is_some(),
        "still waiting"
    );
}

#[tokio::test]
async fn a_contact_listing_another_contacts_device_in_its_set_takes_nothing_of_it() {
    // Mallory signs a device set that lists Bob's device key as one of his: on the
    // network Bob's device stays Bob's (let in as Bob, handed what is sealed to Bob).
    let net = FakeNet::default();
    let alice = User::started(&net, "alice", 0).await;
    let bob = User::started(&net, "bob", 0).await;
    let mallory = User::started(&net, "mallory", 0).await;
    let bob_c = alice.add_contact_live(&bob).await;
    bob.add_contact(&alice);
    let bob_key = *bob.card.identity().x25519();
    let me = mallory.engine.identity();
    let mut set = kkachi_protocol::device::DeviceSet::new(me, "phone", 1_000).unwrap();
    set.add(me, bob_key, "laptop", 1_001).unwrap();
    let mallory_c = alice.add_contact(&mallory);
    let mut w = WriteSet::default();
    LocalStore::write_contact_devices(&mut w, &mallory_c.peer, &set);
    alice.engine.store().apply(w).unwrap();
    // (Told as a user's change tells it: the network is told whom to let in again.)
    alice
        .engine
        .add_contact(mallory.card.clone(), None)
        .await
        .unwrap();
    net.inner.lock().direct.insert(bob.device());
    let (_, p) = alice.send(&bob_c, "for bob only").await;
    assert!(p.direct, "handed to Bob's device directly, as Bob's");
    let inbox = net.inner.lock().direct_inbox.remove(&bob.device()).unwrap();
    let got = bob.engine.receive(inbox).await.unwrap();
    assert_eq!(got[0].message.text, "for bob only");
}

/// One thing a hostile contact does, for the property test below.
#[derive(Debug, Clone)]
enum Act {
    /// A text with any sequence number, a right or wrong `prev`, any length, maybe the
    /// id of an earlier one.
    Text {
        seq: u64,
        good_prev: bool,
        len: usize,
        reuse: Option<usize>,
        escapes: bool,
    },
    /// A kind this version does not know.
    Unknown { kind: u16, seq: u64, len: usize },
    /// A receipt for ids that may or may not exist.
    Receipt { n: usize, read: bool },
    /// A card of theirs with any version, or a forged one.
    Card { version: u64, forged: bool },
    /// Bytes that are no packet at all, in an envelope for Carol.
    Junk { len: usize },
    /// An earlier envelope of theirs again, re-wrapped with another expiry.
    Replay(usize),
    /// Alice, honest, writes.
    Honest,
}

fn act() -> impl Strategy<Value = Act> {
    let seq = prop_oneof![0u64..8, Just(1 << 40), Just(u64::MAX), any::<u64>()];
    prop_oneof![
        4 => (seq.clone(), any::<bool>(), 0usize..3000, proptest::option::of(0usize..8), any::<bool>())
            .prop_map(|(seq, good_prev, len, reuse, escapes)| Act::Text { seq, good_prev, len, reuse, escapes }),
        1 => (4u16..=u16::MAX, seq, 0usize..2000).prop_map(|(kind, seq, len)| Act::Unknown { kind, seq, len }),
        1 => (0usize..600, any::<bool>()).prop_map(|(n, read)| Act::Receipt { n, read }),
        1 => (any::<u64>(), any::<bool>()).prop_map(|(version, forged)| Act::Card { version, forged }),
        1 => (0usize..3000).prop_map(|len| Act::Junk { len }),
        1 => (0usize..8).prop_map(Act::Replay),
        3 => Just(Act::Honest),
    ]
}

async fn play(acts: Vec<Act>) {
    let c = cast().await;
    let mut honest = Vec::new();
    let mut sent: Vec<Content> = Vec::new();
    let mut envelopes: Vec<Envelope> = Vec::new();
    let mut last_hash = [0u8; 32];
    for (i, a) in acts.into_iter().enumerate() {
        let content = match a {
            Act::Honest => {
                let text = format!("honest {i}");
                let _ = c.alice.send(&c.carol_at_alice, &text).await;
                honest.push(text);
                continue;
            }
            Act::Junk { len } => {
                let junk = Envelope {
                    expires_at: now_ms() / 1000 + 3600,
                    payload: (0..len)
                        .map(|b| (b * 31 + i) as u8)
                        .collect::<Vec<u8>>()
                        .into_iter()
                        .chain([1])
                        .collect(),
                };
                c.mallory.put_raw(&c.carol_at_mallory, junk).await;
                continue;
            }
            Act::Replay(k) => {
                if let Some(e) = envelopes.get(k) {
                    let again = Envelope {
                        expires_at: e.expires_at + 1,
                        ..e.clone()
                    };
                    c.mallory.put_raw(&c.carol_at_mallory, again).await;
                }
                continue;
            }
            Act::Text {
                seq,
                good_prev,
                len,
                reuse,
                escapes,
            } => {
                let mut text: String = "x".repeat(len);
                if escapes {
                    text.push_str("\u{1b}]0;owned\u{7}\n2026-12-01 10:00  Alice: fake\u{202e}");
                }
                let mut content = raw_text(seq, if good_prev { last_hash } else { [3; 32] }, &text);
                if let Some(earlier) = reuse.and_then(|k| sent.get(k)) {
                    content.id = earlier.id;
                }
                content
            }
            Act::Unknown { kind, seq, len } => Content {
                body: Body::Unknown {
                    kind,
                    data: vec![7; len],
                },
                ..raw_text(seq, last_hash, "")
            },
            Act::Receipt { n, read } => Content {
                body: Body::Receipt {
                    status: if read {
                        ReceiptStatus::Read
                    } else {
                        ReceiptStatus::Delivered
                    },
                    ids: (0..n.min(kkachi_protocol::content::MAX_RECEIPT_IDS))
                        .map(|_| MessageId(rand::random()))
                        .collect(),
                },
                ..raw_text(0, [0; 32], "")
            },
            Act::Card { version, forged } => {
                let card = if forged {
                    forged_card(
                        c.mallory.engine.identity(),
                        *c.alice.card.identity().x25519(),
                        "Alice",
                        vec![],
                        version,
                    )
                } else {
                    Card::new(
                        c.mallory.engine.identity(),
                        "Mallory 2",
                        c.mallory.relays.clone(),
                        version,
                    )
                    .unwrap()
                };
                Content {
                    body: Body::CardUpdate(Box::new(card)),
                    ..raw_text(0, [0; 32], "")
                }
            }
        };
        last_hash = content.hash();
        envelopes.push(c.mallory.send_raw(&c.carol_at_mallory, &content).await);
        sent.push(content);
        // Now and then Carol reads and answers, so sessions form and transport packets
        // carry the rest.
        if i % 5 == 4 {
            c.carol.sync().await;
            c.carol.engine.settle().await.unwrap();
            c.mallory.sync().await;
        }
    }
    c.carol.sync().await;
    assert_eq!(
        c.carol.engine.faults(),
        0,
        "nothing a contact sends makes reading panic"
    );
    let mut got = texts(&c.carol, &c.alice);
    got.sort();
    honest.sort();
    assert_eq!(got, honest, "every honest message exactly once");
    let ids: Vec<[u8; 16]> = c.carol.messages(&c.mallory).iter().map(|m| m.id).collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(ids.len(), unique.len(), "nothing of theirs twice");
    let conv = c
        .carol
        .engine
        .store()
        .conversation(&c.mallory.peer())
        .unwrap();
    assert!(conv.gaps.ranges().len() <= crate::sequence::MAX_GAP_RANGES);
    assert!(conv.chain_breaks.len() <= crate::sequence::MAX_CHAIN_BREAKS);
    let mallory_now = c.carol.contact_of(&c.mallory.peer()).unwrap();
    assert_eq!(
        mallory_now.card.identity(),
        c.mallory.card.identity(),
        "no card took another's key"
    );
    // Alice is still reachable both ways.
    let alice_at_carol = c.carol.contact_of(&c.alice.peer()).unwrap();
    let _ = c.carol.send(&alice_at_carol, "still with you").await;
    assert!(
        c.alice
            .sync()
            .await
            .iter()
            .any(|r| r.message.text == "still with you")
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Authenticated but hostile content, in any order, through the real receive path.
    #[test]
    fn a_hostile_contact_never_harms_anyone_else(acts in proptest::collection::vec(act(), 1..30)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(play(acts));
    }
}
