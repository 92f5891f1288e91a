//! Groups over the pairwise sessions: the membership log shared with every member,
//! messages to each member once, receipts counted per member, and messages that come
//! before their group's operations.

use kkachi_protocol::file::{FileKey, FileRef};
use kkachi_protocol::group::{GroupId, Roster};

use super::*;
use crate::engine::GroupChange;

/// Three users, each the other two's contact.
async fn three(net: &FakeNet) -> (User, User, User) {
    let alice = User::started(net, "alice", 3).await;
    let bob = User::started(net, "bob", 3).await;
    let carol = User::started(net, "carol", 3).await;
    for (a, b) in [(&alice, &bob), (&alice, &carol), (&bob, &carol)] {
        a.add_contact(b);
        b.add_contact(a);
    }
    for u in [&alice, &bob, &carol] {
        u.regrant().await;
    }
    (alice, bob, carol)
}

fn roster(u: &User, id: GroupId) -> Option<Roster> {
    u.engine.store().group(&id).unwrap()?.roster(id).unwrap()
}

/// (author's name in the group, text) of each message, in the order shown (not the
/// lines about changes to the group).
fn texts(u: &User, id: GroupId) -> Vec<(String, String)> {
    u.engine
        .store()
        .group_messages(&id)
        .unwrap()
        .into_iter()
        .filter(|m| !m.event)
        .map(|m| (m.name, m.message.text))
        .collect()
}

/// The lines about changes to the group, in order.
fn events(u: &User, id: GroupId) -> Vec<String> {
    u.engine
        .store()
        .group_messages(&id)
        .unwrap()
        .into_iter()
        .filter(|m| m.event)
        .map(|m| m.message.text)
        .collect()
}

/// What a sync showed that members wrote (not lines about changes to the group).
async fn said(u: &User) -> Vec<Received> {
    u.sync()
        .await
        .into_iter()
        .filter(|r| !r.group.as_ref().is_some_and(|g| g.event))
        .collect()
}

/// A group message's body as a modified client may make it: `text` to group `id`, dated
/// now, with no digest.
fn group_text(id: GroupId, text: &str) -> Body {
    Body::Group {
        group: id,
        what: kkachi_protocol::content::GroupBody::Message {
            hlc: kkachi_protocol::group::Hlc {
                ms: now_ms(),
                count: 0,
            },
            have: [0; 16],
            secs: 0,
            text: text.into(),
        },
    }
}

async fn family(alice: &User, bob: &User, carol: &User) -> GroupId {
    let id = alice.engine.create_group("Family".into()).await.unwrap();
    let changed = alice
        .engine
        .change_group(id, GroupChange::Add(vec![bob.peer(), carol.peer()]))
        .await
        .unwrap();
    assert_eq!(changed.changed.len(), 2);
    assert_eq!(changed.told, 2);
    bob.sync().await;
    carol.sync().await;
    id
}

#[tokio::test]
async fn every_member_gets_each_message_once_and_receipts_count_per_member() {
    let net = FakeNet::default();
    let (alice, bob, carol) = three(&net).await;
    let id = family(&alice, &bob, &carol).await;
    let theirs = roster(&alice, id).unwrap();
    assert_eq!(theirs.members.len(), 3);
    assert_eq!(roster(&bob, id).unwrap(), theirs);
    assert_eq!(roster(&carol, id).unwrap(), theirs);

    let sent = alice
        .engine
        .send_group(id, "dinner at 7".into())
        .await
        .unwrap();
    assert_eq!(sent.copies, 2);
    assert!(sent.unreachable.is_empty());
    for member in [&bob, &carol] {
        let got = said(member).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].message.text, "dinner at 7");
        assert_eq!(got[0].name, "alice");
        let tag = got[0]
            .group
            .as_ref()
            .expect("a group message says its group");
        assert_eq!((tag.id, tag.name.as_str()), (id, "Family"));
        // Nothing comes twice, and no 1:1 message appeared.
        assert!(member.sync().await.is_empty());
        assert!(member.messages(&alice).is_empty());
    }
    alice.sync().await;
    let ours = &alice
        .engine
        .store()
        .group_messages(&id)
        .unwrap()
        .into_iter()
        .find(|m| !m.event)
        .unwrap();
    assert_eq!(ours.tally(), (2, 0), "both copies delivered");
    assert_eq!(ours.message.state, MessageState::Delivered);

    bob.engine
        .send_group(id, "we'll bring cake".into())
        .await
        .unwrap();
    carol.sync().await;
    alice.sync().await;
    let want = vec![
        ("alice".to_string(), "dinner at 7".to_string()),
        ("bob".to_string(), "we'll bring cake".to_string()),
    ];
    assert_eq!(texts(&carol, id), want);
    assert_eq!(texts(&alice, id), want);
}

#[tokio::test]
async fn a_removed_member_gets_nothing_more_and_only_admins_change_the_group() {
    let net = FakeNet::default();
    let (alice, bob, carol) = three(&net).await;
    let id = family(&alice, &bob, &carol).await;

    // Bob is a member, not an admin.
    let refused = bob
        .engine
        .change_group(id, GroupChange::Remove(carol.peer()))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("admins"), "{refused}");

    alice
        .engine
        .change_group(id, GroupChange::Remove(carol.peer()))
        .await
        .unwrap();
    bob.sync().await;
    carol.sync().await;
    for u in [&alice, &bob, &carol] {
        let r = roster(u, id).unwrap();
        assert_eq!(r.members.len(), 2);
        assert!(
            r.former
                .contains(carol.engine.identity().public().ed25519())
        );
    }
    let refused = carol
        .engine
        .send_group(id, "still here?".into())
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("not a member"), "{refused}");
    let sent = alice.engine.send_group(id, "just us".into()).await.unwrap();
    assert_eq!(sent.copies, 1);
    assert!(said(&carol).await.is_empty());
    assert_eq!(said(&bob).await.len(), 1);

    // Bob leaves (his first operation in a group he did not found): Alice is alone.
    bob.engine
        .change_group(id, GroupChange::Leave)
        .await
        .unwrap();
    alice.sync().await;
    let r = roster(&alice, id).unwrap();
    assert_eq!(r.members.len(), 1);
    assert_eq!(roster(&bob, id).unwrap(), r);
    let refused = bob.engine.send_group(id, "bye".into()).await.unwrap_err();
    assert!(refused.to_string().contains("not a member"), "{refused}");

    // A message Carol's modified client seals anyway to Alice, still a member: it is
    // not shown; it waits (a re-add might be on its way) and expires unshown.
    let waiting_before = alice
        .engine
        .store()
        .group(&id)
        .unwrap()
        .unwrap()
        .waiting
        .len();
    let alice_at_carol = carol.contact_of(&alice.peer()).unwrap();
    let conv = carol.engine.store().conversation(&alice.peer()).unwrap();
    let content = Content {
        id: MessageId(rand::random()),
        seq: conv.next_seq.max(1),
        prev: conv.last_hash,
        sent_at_ms: now_ms(),
        body: group_text(id, "let me back in"),
    };
    carol.send_raw(&alice_at_carol, &content).await;
    assert!(said(&alice).await.is_empty());
    assert!(
        !texts(&alice, id).iter().any(|(_, t)| t == "let me back in"),
        "a removed member's message is not shown"
    );
    let held = alice.engine.store().group(&id).unwrap().unwrap();
    assert_eq!(held.waiting.len(), waiting_before + 1, "it waits, unshown");
}

#[tokio::test]
async fn a_message_that_comes_before_its_group_waits_and_is_shown_once() {
    let net = FakeNet::default();
    let (alice, bob, carol) = three(&net).await;
    let id = alice.engine.create_group("Family".into()).await.unwrap();
    alice
        .engine
        .change_group(id, GroupChange::Add(vec![bob.peer()]))
        .await
        .unwrap();
    bob.sync().await;
    // Carol's relays are down while Alice adds her: Bob hears of it, Carol does not.
    for r in &carol.relays {
        net.set_up(r, false);
    }
    alice
        .engine
        .change_group(id, GroupChange::Add(vec![carol.peer()]))
        .await
        .unwrap();
    for r in &carol.relays {
        net.set_up(r, true);
    }
    bob.sync().await;
    assert_eq!(roster(&bob, id).unwrap().members.len(), 3);
    let sent = bob.engine.send_group(id, "early".into()).await.unwrap();
    assert_eq!(sent.copies, 2);
    // Bob's message reaches Carol first: it waits for the group.
    assert!(carol.sync().await.is_empty());
    let waiting = carol.engine.store().group(&id).unwrap().unwrap();
    assert_eq!(waiting.waiting.len(), 1);
    assert!(roster(&carol, id).is_none());
    // Alice's operations arrive: the message is shown, once, with a line saying who
    // added Carol.
    alice.engine.deliver_now().await.unwrap();
    let got = said(&carol).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].message.text, "early");
    assert_eq!(got[0].group.as_ref().unwrap().name, "Family");
    assert!(carol.sync().await.is_empty());
    assert_eq!(texts(&carol, id), vec![("bob".into(), "early".into())]);
    assert_eq!(
        events(&carol, id),
        vec!["alice added you to Family; members: you, alice, bob".to_string()]
    );
    assert!(
        carol
            .engine
            .store()
            .group(&id)
            .unwrap()
            .unwrap()
            .waiting
            .is_empty()
    );
}

#[tokio::test]
async fn outsiders_cannot_change_a_group_and_their_messages_wait_within_bounds() {
    let net = FakeNet::default();
    let (alice, bob, carol) = three(&net).await;
    let id = family(&alice, &bob, &carol).await;
    // Mallory is Carol's contact, not in the group.
    let mallory = User::started(&net, "mallory", 3).await;
    let carol_at_mallory = mallory.add_contact(&carol);
    carol.add_contact(&mallory);
    mallory.regrant().await;
    carol.regrant().await;
    let mut seq = 1;
    let mut prev = [0; 32];
    let mut record = |body: Body| {
        let c = Content {
            id: MessageId(rand::random()),
            seq: if body.is_sequenced() { seq } else { 0 },
            prev: if body.is_sequenced() { prev } else { [0; 32] },
            sent_at_ms: now_ms(),
            body,
        };
        if c.body.is_sequenced() {
            seq += 1;
            prev = c.hash();
        }
        c
    };
    // A rename Mallory signs for Alice's group: refused, the name stays.
    let rename = kkachi_protocol::group::SignedOp::sign(
        mallory.engine.identity(),
        id,
        1,
        kkachi_protocol::group::Hlc {
            ms: now_ms(),
            count: 0,
        },
        kkachi_protocol::group::Op::Rename {
            name: "Pwned".into(),
        },
    );
    let ops = record(Body::Group {
        group: id,
        what: kkachi_protocol::content::GroupBody::Ops {
            all: false,
            have: [0; 16],
            ops: vec![rename],
        },
    });
    mallory.send_raw(&carol_at_mallory, &ops).await;
    carol.sync().await;
    assert_eq!(roster(&carol, id).unwrap().name, "Family");
    assert_eq!(
        carol.engine.store().group(&id).unwrap().unwrap().ops.len(),
        3
    );
    // Messages "to" the group: they wait (Mallory might be added by an operation not
    // here yet), at most a quarter of the waiting room each; none is shown.
    for i in 0..20 {
        let m = record(group_text(id, &format!("spam {i}")));
        mallory.send_raw(&carol_at_mallory, &m).await;
    }
    assert!(carol.sync().await.is_empty());
    let held = carol.engine.store().group(&id).unwrap().unwrap();
    assert_eq!(held.waiting.len(), crate::store::MAX_WAITING_PER_GROUP / 4);
    assert_eq!(held.dropped, 4);
    // The members' own messages are untouched.
    alice
        .engine
        .send_group(id, "still fine".into())
        .await
        .unwrap();
    let got = said(&carol).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.text, "still fine");
    // Mallory's pairwise numbers were all taken: no false gap in their 1:1 chat.
    assert_eq!(
        carol
            .engine
            .store()
            .conversation(&mallory.peer())
            .unwrap()
            .gaps
            .missing(),
        0
    );
}

#[tokio::test]
async fn members_who_hold_different_operations_notice_and_converge() {
    let net = FakeNet::default();
    let (alice, bob, carol) = three(&net).await;
    let id = alice.engine.create_group("Family".into()).await.unwrap();
    alice
        .engine
        .change_group(id, GroupChange::Add(vec![bob.peer()]))
        .await
        .unwrap();
    alice
        .engine
        .change_group(id, GroupChange::Admin(bob.peer(), true))
        .await
        .unwrap();
    bob.sync().await;
    // Bob adds Carol: he is the only one who passes on what others do to her.
    bob.engine
        .change_group(id, GroupChange::Add(vec![carol.peer()]))
        .await
        .unwrap();
    alice.sync().await;
    carol.sync().await;
    assert_eq!(roster(&carol, id), roster(&alice, id));
    // Bob renames the group while Carol's relays are down, then is gone for good.
    for r in &carol.relays {
        net.set_up(r, false);
    }
    bob.engine
        .change_group(id, GroupChange::Rename("Family 2026".into()))
        .await
        .unwrap();
    bob.engine.shutdown().await.unwrap();
    for r in &carol.relays {
        net.set_up(r, true);
    }
    alice.sync().await;
    assert_eq!(roster(&alice, id).unwrap().name, "Family 2026");
    assert_eq!(roster(&carol, id).unwrap().name, "Family");
    // Alice writes: her digest differs from Carol's. Carol sends her operations, Alice
    // sees Carol lacks some and sends hers: Carol catches up.
    alice
        .engine
        .send_group(id, "new name, same family".into())
        .await
        .unwrap();
    assert_eq!(said(&carol).await.len(), 1);
    alice.sync().await;
    carol.sync().await;
    assert_eq!(roster(&carol, id).unwrap().name, "Family 2026");
    assert_eq!(
        events(&carol, id).last().map(String::as_str),
        Some("bob renamed the group to Family 2026")
    );
    assert_eq!(roster(&carol, id), roster(&alice, id));
    // And they stop there: nothing more goes back and forth.
    alice.sync().await;
    carol.sync().await;
    let outbox = |u: &User| {
        u.engine
            .store()
            .outbox_keys_of(
                &(if u.peer() == alice.peer() {
                    carol.peer()
                } else {
                    alice.peer()
                }),
            )
            .len()
    };
    assert_eq!(outbox(&alice), 0);
    assert_eq!(outbox(&carol), 0);
}

#[tokio::test]
async fn a_log_too_long_for_one_record_still_brings_a_new_member_in() {
    let net = FakeNet::default();
    let (alice, bob, _carol) = three(&net).await;
    let id = alice.engine.create_group("Club".into()).await.unwrap();
    for i in 0..300 {
        alice
            .engine
            .change_group(
                id,
                GroupChange::Rename(format!("Club {i:03} {}", "x".repeat(54))),
            )
            .await
            .unwrap();
    }
    alice
        .engine
        .change_group(id, GroupChange::Add(vec![bob.peer()]))
        .await
        .unwrap();
    let log = alice.engine.store().group(&id).unwrap().unwrap();
    let bytes: usize = log.ops.iter().map(|o| o.len() + 2).sum();
    assert!(
        bytes > 60 * 1024,
        "the log ({bytes} bytes) needs several records"
    );
    bob.sync().await;
    let r = roster(&bob, id).expect("Bob joined from a log in several records");
    assert_eq!(r, roster(&alice, id).unwrap());
    assert_eq!(r.name, format!("Club 299 {}", "x".repeat(54)));
}

#[tokio::test]
async fn operations_of_unknown_keys_or_dated_ahead_are_not_kept() {
    let net = FakeNet::default();
    let (alice, bob, carol) = three(&net).await;
    let id = family(&alice, &bob, &carol).await;
    let held = carol.engine.store().group(&id).unwrap().unwrap().ops.len();
    // Bob, a member, sends operations signed by keys nobody added, and one of his own
    // dated two days ahead.
    let stranger = kkachi_protocol::Identity::generate();
    let at = |ms| kkachi_protocol::group::Hlc { ms, count: 0 };
    let mut junk: Vec<kkachi_protocol::group::SignedOp> = (1..=50)
        .map(|seq| {
            kkachi_protocol::group::SignedOp::sign(
                &stranger,
                id,
                seq,
                at(now_ms()),
                kkachi_protocol::group::Op::Rename {
                    name: format!("junk {seq}"),
                },
            )
        })
        .collect();
    junk.push(kkachi_protocol::group::SignedOp::sign(
        bob.engine.identity(),
        id,
        1,
        at(now_ms() + 2 * 24 * 3600 * 1000),
        kkachi_protocol::group::Op::Remove {
            member: *bob.engine.identity().public().ed25519(),
            cut: 0,
        },
    ));
    let carol_at_bob = bob.contact_of(&carol.peer()).unwrap();
    let content = Content {
        id: MessageId(rand::random()),
        seq: 0,
        prev: [0; 32],
        sent_at_ms: now_ms(),
        body: Body::Group {
            group: id,
            what: kkachi_protocol::content::GroupBody::Ops {
                all: false,
                have: [0; 16],
                ops: junk,
            },
        },
    };
    bob.send_raw(&carol_at_bob, &content).await;
    carol.sync().await;
    let after = carol.engine.store().group(&id).unwrap().unwrap();
    assert_eq!(after.ops.len(), held, "nothing of it was kept");
    assert_eq!(roster(&carol, id).unwrap().members.len(), 3);
}

/// Thirty-two users, a group of up to 27 of them (within the small tier's 32), five
/// admins changing it at the same time while eight members' relays are down and the
/// network fails one put in ten (its sender tries again) and delivers batches reversed
/// and duplicated, members writing meanwhile; then the relays come back. Within two rounds of every member writing, every member holds the same
/// group, and every message is held once by every member it was sent to.
#[tokio::test]
async fn concurrent_changes_under_relay_loss_converge_within_two_rounds() {
    const USERS: usize = 32;
    let net = FakeNet::default();
    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(User::started(&net, &format!("u{i:02}"), 2).await);
    }
    for a in 0..USERS {
        for b in 0..USERS {
            if a != b {
                users[a].add_contact(&users[b]);
            }
        }
    }
    for u in &users {
        u.regrant().await;
    }
    let peer = |i: usize| users[i].peer();
    let id = users[0]
        .engine
        .create_group("Village".into())
        .await
        .unwrap();
    users[0]
        .engine
        .change_group(id, GroupChange::Add((1..24).map(peer).collect()))
        .await
        .unwrap();
    for admin in 1..5 {
        users[0]
            .engine
            .change_group(id, GroupChange::Admin(peer(admin), true))
            .await
            .unwrap();
    }
    for u in &users {
        u.sync().await;
    }

    // Relays of eight members go down, the network starts losing, reordering and
    // duplicating; five admins act without hearing of each other.
    for u in &users[5..13] {
        net.set_up(&u.relays[0], false);
        net.set_up(&u.relays[1], false);
    }
    net.chaos(true);
    let act = |i: usize, change: GroupChange| {
        let engine = users[i].engine.clone();
        async move { engine.change_group(id, change).await.unwrap() }
    };
    tokio::join!(
        act(0, GroupChange::Remove(peer(11))),
        act(1, GroupChange::Add(vec![peer(24), peer(25)])),
        act(2, GroupChange::Remove(peer(5))),
        act(3, GroupChange::Rename("Village, evacuation".into())),
        act(4, GroupChange::Admin(peer(6), true)),
    );
    act(2, GroupChange::Add(vec![peer(26)])).await;
    for i in [0, 4, 6, 8, 20] {
        users[i]
            .engine
            .send_group(id, format!("during the outage from u{i:02}"))
            .await
            .unwrap();
    }
    // They come back (the network still misbehaving).
    for u in &users[5..13] {
        net.set_up(&u.relays[0], true);
        net.set_up(&u.relays[1], true);
    }
    let everyone_syncs = || async {
        for u in &users {
            u.engine.deliver_now().await.unwrap();
        }
        for u in &users {
            u.sync().await;
        }
    };
    everyone_syncs().await;
    let mut sent = Vec::new();
    for round in 0..2 {
        for (i, u) in users.iter().enumerate() {
            let Some(r) = roster(u, id) else { continue };
            if r.may_post(u.engine.identity().public().ed25519()) {
                let s = u
                    .engine
                    .send_group(id, format!("round {round} from u{i:02}"))
                    .await
                    .unwrap();
                // Whom it was sent to: the members its sender knew of then.
                let to: HashSet<[u8; 32]> = r.members.keys().copied().collect();
                sent.push((round, i, s.id, to));
            }
        }
        everyone_syncs().await;
        everyone_syncs().await;
    }
    // Every member holds the same group.
    let founder = roster(&users[0], id).unwrap();
    let members: Vec<usize> = (0..USERS)
        .filter(|&i| {
            founder
                .members
                .contains_key(users[i].engine.identity().public().ed25519())
        })
        .collect();
    let lost = net.chaos(false);
    println!(
        "{} members after five concurrent changes under relay loss, {lost} puts lost; name {:?}",
        members.len(),
        founder.name
    );
    assert!(lost > 0, "the network lost puts");
    for &i in &members {
        assert_eq!(
            roster(&users[i], id).as_ref(),
            Some(&founder),
            "u{i:02} differs"
        );
    }
    assert_eq!(founder.name, "Village, evacuation");
    for gone in [5, 11] {
        assert!(!members.contains(&gone));
    }
    assert_eq!(
        founder.role(users[6].engine.identity().public().ed25519()),
        Some(kkachi_protocol::group::Role::Admin)
    );
    for new in [24, 25, 26] {
        assert!(members.contains(&new), "u{new} was added");
    }
    // Each message of both rounds is held exactly once by every other member.
    for &i in &members {
        let held: Vec<[u8; 16]> = users[i]
            .engine
            .store()
            .group_messages(&id)
            .unwrap()
            .into_iter()
            .filter(|m| !m.event)
            .map(|m| m.message.id)
            .collect();
        let unique: HashSet<[u8; 16]> = held.iter().copied().collect();
        assert_eq!(unique.len(), held.len(), "u{i:02} holds a message twice");
        let key = *users[i].engine.identity().public().ed25519();
        for (_, from, id, to) in &sent {
            if *from != i && to.contains(&key) {
                assert!(
                    unique.contains(&id.0),
                    "u{i:02} lacks a message of the rounds from u{from:02}"
                );
            }
        }
        // By the last round every member knew every other.
        for (round, from, _, to) in &sent {
            if *round == 1 && members.contains(from) {
                assert!(
                    to.contains(&key),
                    "u{from:02} did not know u{i:02} by the last round"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_group_message_without_its_number_is_refused_and_a_forgotten_group_keeps_our_numbers() {
    let net = FakeNet::default();
    let (alice, bob, carol) = three(&net).await;
    let id = family(&alice, &bob, &carol).await;
    // Numbered 0, it could not be told from its copies: refused, not shown.
    let carol_at_bob = bob.contact_of(&carol.peer()).unwrap();
    let unnumbered = Content {
        id: MessageId(rand::random()),
        seq: 0,
        prev: [0; 32],
        sent_at_ms: now_ms(),
        body: group_text(id, "twice?"),
    };
    bob.send_raw(&carol_at_bob, &unnumbered).await;
    bob.send_raw(&carol_at_bob, &unnumbered).await;
    assert!(said(&carol).await.is_empty());
    // Carol leaves and forgets the group; added again, her next operation is numbered
    // after the ones she made before, so her chain holds and her second leave counts.
    carol
        .engine
        .change_group(id, GroupChange::Leave)
        .await
        .unwrap();
    carol.engine.forget_group(id).await.unwrap();
    assert!(roster(&carol, id).is_none());
    let kept = carol.engine.store().group(&id).unwrap().unwrap();
    assert!(kept.forgotten && kept.ops.is_empty());
    assert_eq!(kept.next_seq, 2, "the number of her next operation is kept");
    alice.sync().await;
    alice
        .engine
        .change_group(id, GroupChange::Add(vec![carol.peer()]))
        .await
        .unwrap();
    carol.sync().await;
    assert!(roster(&carol, id).unwrap().members.len() == 3);
    carol
        .engine
        .change_group(id, GroupChange::Leave)
        .await
        .unwrap();
    alice.sync().await;
    let r = roster(&alice, id).unwrap();
    assert_eq!(r.members.len(), 2, "her second leave counts");
    assert_eq!(r.seen(carol.engine.identity().public().ed25519()), 2);
}

#[tokio::test]
async fn a_groups_timer_makes_its_messages_disappear_on_every_device() {
    let net = FakeNet::default();
    let (alice, bob, carol) = three(&net).await;
    let id = family(&alice, &bob, &carol).await;
    alice
        .engine
        .change_group(id, GroupChange::Timer(10))
        .await
        .unwrap();
    // Bob is a member, not an admin: he cannot turn it off.
    assert!(
        bob.engine
            .change_group(id, GroupChange::Timer(0))
            .await
            .is_err()
    );
    bob.sync().await;
    assert_eq!(roster(&bob, id).unwrap().timer_secs, 10);
    assert_eq!(
        events(&bob, id).last().map(String::as_str),
        Some("alice set messages to disappear 10 seconds after they arrive")
    );
    let sent = alice
        .engine
        .send_group(id, "meet at the gym".into())
        .await
        .unwrap();
    let got = said(&bob).await;
    assert_eq!(got[0].message.timer_secs, 10);
    let copy = |u: &User| {
        u.engine
            .store()
            .group_copy(&bob.peer(), &sent.id.0)
            .unwrap()
    };
    assert!(copy(&alice).is_some(), "where Bob's copy is counted");
    let indexed = alice.engine.store().group_index_len();
    assert_eq!(texts(&bob, id).len(), 1);
    // Eleven seconds on, on both sides: gone from the store, lines about the group kept.
    for u in [&alice, &bob] {
        let gone = u
            .engine
            .change(|state, now| state.expire_messages(now + 11_000))
            .await
            .unwrap();
        assert!(gone >= 1, "{gone}");
        assert!(texts(u, id).is_empty());
        assert!(!events(u, id).is_empty());
        let record = u.engine.store().group(&id).unwrap().unwrap();
        assert_eq!(record.next_expiry_ms, 0, "nothing else is due");
    }
    // Nothing points at it any more: where Bob's and Carol's copies were counted went
    // with it.
    assert_eq!(alice.engine.store().group_index_len(), indexed - 2);
    assert!(copy(&alice).is_none());
}

#[tokio::test]
async fn a_group_file_that_went_with_one_copy_to_a_member_gets_the_second_when_their_relays_return()
{
    use crate::files::{self, To};
    let net = FakeNet::default();
    let (alice, bob, carol) = three(&net).await;
    let id = family(&alice, &bob, &carol).await;
    // Two of Bob's three relays lost everything (Alice's grant too): they refuse her puts.
    net.wipe_relay(&bob.relays[0]);
    net.wipe_relay(&bob.relays[1]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shelter-list.bin");
    let bytes: Vec<u8> = (0..1_500_000u32).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    let claim = files::prepare(&alice.engine, To::Group(id), &path)
        .await
        .unwrap();
    let fid = claim.id;
    let report = files::upload(&alice.engine, claim).await.unwrap();
    // It went to both, Bob's chunks on the one relay he has left, and is not done with.
    assert!(report.message_sent && report.degraded, "{report:?}");
    assert_eq!(report.copies, 1);
    let record = alice.engine.store().outgoing_file(&fid).unwrap().unwrap();
    assert!(!record.finished);
    assert_eq!(record.members.len(), 2, "whom its message went to is kept");
    let copies = || -> usize { net.inner.lock().chunks.values().map(HashMap::len).sum() };
    assert_eq!(copies(), (2 + 1) * (6 + 1));
    // Bob's relays take puts again: the next run puts his second copies, and is done;
    // the message does not go again.
    bob.regrant().await;
    let claim = alice.engine.transfers().claim(false, fid).unwrap();
    let report = files::upload(&alice.engine, claim).await.unwrap();
    assert_eq!(report.copies, 2);
    let record = alice.engine.store().outgoing_file(&fid).unwrap().unwrap();
    assert!(record.finished);
    assert_eq!(copies(), 2 * 2 * (6 + 1));
    for u in [&bob, &carol] {
        let files_shown = said(u)
            .await
            .iter()
            .filter(|r| r.message.file.is_some())
            .count();
        assert_eq!(files_shown, 1);
    }
}

#[tokio::test]
async fn a_file_to_the_group_reaches_each_member_on_their_own_relays_and_not_the_removed() {
    use crate::files::{self, To};
    let net = FakeNet::default();
    let (alice, bob, carol) = three(&net).await;
    let id = family(&alice, &bob, &carol).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evacuation-map.bin");
    let bytes: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    let claim = files::prepare(&alice.engine, To::Group(id), &path)
        .await
        .unwrap();
    let report = files::upload(&alice.engine, claim).await.unwrap();
    assert!(report.message_sent && report.group_sent.is_some());
    // Over 1 MiB: every chunk (6) and the manifest on two of each member's three relays,
    // in that member's queues.
    assert_eq!((report.members, report.copies, report.relays), (2, 2, 6));
    let copies: usize = net.inner.lock().chunks.values().map(HashMap::len).sum();
    assert_eq!(copies, 2 * 2 * (6 + 1));
    for u in [&bob, &carol] {
        let shown = said(u).await;
        assert_eq!(shown.len(), 1, "{shown:?}");
        let m = u
            .engine
            .store()
            .group_messages(&id)
            .unwrap()
            .into_iter()
            .find(|m| m.message.file.is_some())
            .expect("the file's message");
        assert_eq!(m.name, "alice");
        let file = m.message.file.as_ref().unwrap().file().unwrap();
        // Offered, and counted against the group.
        let incoming = u.engine.store().incoming_file(&file.id()).unwrap().unwrap();
        assert_eq!((incoming.group(), incoming.contact()), (Some(id), None));
        // Fetched from their own relays, whole.
        let fetched = files::fetch(&u.engine, file.id()).await.unwrap();
        assert!(fetched.complete);
        let out = dir.path().join(format!("out-{}", u.peer()));
        let saved = files::export(u.engine.store(), &file.id(), &out).unwrap();
        assert_eq!(std::fs::read(saved).unwrap(), bytes);
        // The sweep keeps a group's file while its message is there.
        files::sweep(u.engine.store()).unwrap();
        assert!(
            u.engine
                .store()
                .incoming_file(&file.id())
                .unwrap()
                .is_some()
        );
    }
    // Carol reuses the id of Alice's message for a file of her own: Bob keeps Alice's
    // file, named as hers, and takes Carol's as Carol's.
    let alice_file = bob
        .engine
        .store()
        .file_transfers()
        .unwrap()
        .1
        .into_iter()
        .find(|(_, r)| r.group() == Some(id))
        .unwrap();
    assert_eq!(alice_file.1.member(), Some(alice.peer()));
    let bob_at_carol = carol.contact_of(&bob.peer()).unwrap();
    let conv = carol.engine.store().conversation(&bob.peer()).unwrap();
    let forged = FileRef {
        key: FileKey([9; 32]),
        manifest: kkachi_protocol::file::ChunkId([9; 32]),
        size: 10,
        name: "not-the-map.bin".into(),
        mime: String::new(),
        thumbnail: Vec::new(),
    };
    let content = Content {
        id: MessageId(alice_file.1.message),
        seq: conv.next_seq.max(1),
        prev: conv.last_hash,
        sent_at_ms: now_ms(),
        body: Body::Group {
            group: id,
            what: kkachi_protocol::content::GroupBody::File {
                hlc: kkachi_protocol::group::Hlc {
                    ms: now_ms(),
                    count: 0,
                },
                have: [0; 16],
                secs: 0,
                file: Box::new(forged.clone()),
            },
        },
    };
    carol.send_raw(&bob_at_carol, &content).await;
    assert_eq!(said(&bob).await.len(), 1);
    files::sweep(bob.engine.store()).unwrap();
    let kept = bob.engine.store().incoming_file(&alice_file.0).unwrap();
    assert_eq!(kept.map(|r| r.member()), Some(Some(alice.peer())));
    let theirs = bob.engine.store().incoming_file(&forged.id()).unwrap();
    assert_eq!(theirs.map(|r| r.member()), Some(Some(carol.peer())));
    // A sender blocked: their files go from the device, group or not.
    let first = carol
        .engine
        .store()
        .file_transfers()
        .unwrap()
        .1
        .into_iter()
        .map(|(id, _)| id)
        .next()
        .unwrap();
    carol
        .engine
        .block(alice.peer(), "alice".into())
        .await
        .unwrap();
    files::sweep(carol.engine.store()).unwrap();
    assert!(
        carol
            .engine
            .store()
            .incoming_file(&first)
            .unwrap()
            .is_none()
    );
    carol.engine.unblock(alice.peer()).await.unwrap();
    // Both members' receipts count on our copy.
    alice.sync().await;
    let ours = alice
        .engine
        .store()
        .group_messages(&id)
        .unwrap()
        .into_iter()
        .find(|m| m.message.file.is_some())
        .unwrap();
    assert_eq!(ours.tally().0, 2);

    // Carol is removed; the next file goes to Bob only (nothing in Carol's queues).
    alice
        .engine
        .change_group(id, GroupChange::Remove(carol.peer()))
        .await
        .unwrap();
    bob.sync().await;
    carol.sync().await;
    let before = net.inner.lock().chunks.clone();
    let small = dir.path().join("note.txt");
    std::fs::write(&small, b"meet at the school gym").unwrap();
    let claim = files::prepare(&alice.engine, To::Group(id), &small)
        .await
        .unwrap();
    let report = files::upload(&alice.engine, claim).await.unwrap();
    // A small file goes to every relay of the one member left.
    assert_eq!((report.members, report.copies, report.relays), (1, 3, 3));
    let after = net.inner.lock().chunks.clone();
    let new: usize = after.values().map(HashMap::len).sum::<usize>()
        - before.values().map(HashMap::len).sum::<usize>();
    assert_eq!(new, 3 * 2);
    assert_eq!(said(&bob).await.len(), 1);
    assert!(said(&carol).await.is_empty());
    // A group we are not in takes no file.
    let err = files::prepare(&carol.engine, To::Group(id), &small)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a member"), "{err}");
}

#[tokio::test]
async fn a_member_whose_relays_refuse_a_file_holds_it_back_only_for_a_while() {
    use crate::files::{self, FilesError, To};
    let net = FakeNet::default();
    let (alice, bob, carol) = three(&net).await;
    let id = family(&alice, &bob, &carol).await;
    // Carol's relays lost everything (her grants too): they refuse Alice's puts.
    for relay in &carol.relays {
        net.wipe_relay(relay);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shelter.txt");
    std::fs::write(&path, b"the school gym has water and blankets").unwrap();
    let claim = files::prepare(&alice.engine, To::Group(id), &path)
        .await
        .unwrap();
    let file_id = claim.id;
    // At first the file waits for her: nothing is sent to anyone.
    let err = files::upload(&alice.engine, claim).await.unwrap_err();
    assert!(matches!(err, FilesError::Unavailable(_)), "{err}");
    assert!(said(&bob).await.is_empty());
    // Ten minutes on, it goes to Bob without her, and says so.
    let store = alice.engine.store();
    let mut record = store.outgoing_file(&file_id).unwrap().unwrap();
    record.created_ms -= crate::files::LEAVE_OUT_AFTER_MS;
    let mut w = WriteSet::default();
    LocalStore::write_outgoing_file(&mut w, &file_id, &record);
    store.apply(w).unwrap();
    let claim = alice.engine.transfers().claim(false, file_id).unwrap();
    let report = files::upload(&alice.engine, claim).await.unwrap();
    assert!(report.message_sent);
    assert_eq!(report.left_members, vec!["carol".to_string()]);
    assert_eq!(report.group_sent.as_ref().map(|s| s.copies), Some(1));
    let got = said(&bob).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].message.file.is_some());
    // Carol never gets a message whose chunks are not on her relays.
    for relay in &carol.relays {
        net.set_up(relay, true);
    }
    assert!(said(&carol).await.is_empty());
}

/// Alice knows Bob and Carol; Bob and Carol do not know each other.
async fn strangers(net: &FakeNet) -> (User, User, User) {
    let alice = User::started(net, "alice", 3).await;
    let bob = User::started(net, "bob", 3).await;
    let carol = User::started(net, "carol", 3).await;
    for other in [&bob, &carol] {
        alice.add_contact(other);
        other.add_contact(&alice);
    }
    for u in [&alice, &bob, &carol] {
        u.regrant().await;
    }
    (alice, bob, carol)
}

/// Whether `u` holds `other` as a member met in a group (not as a contact).
fn met(u: &User, other: &User) -> bool {
    u.contact_of(&other.peer()).is_some_and(|c| c.through_group)
}

#[tokio::test]
async fn members_who_are_not_each_others_contacts_reach_each_other_through_the_group() {
    let net = FakeNet::default();
    let (alice, bob, carol) = strangers(&net).await;
    let id = family(&alice, &bob, &carol).await;
    // Alice passed each the other's card: each holds the other as a member met in the
    // group, never listed or named as a contact.
    for (u, other) in [(&bob, &carol), (&carol, &bob)] {
        assert!(met(u, other), "{} met {}", u.card.name(), other.card.name());
        let store = u.engine.store();
        assert!(store.added_contact(&other.peer()).unwrap().is_none());
        assert_eq!(
            store.added_contacts().unwrap().len(),
            1,
            "only Alice is a contact"
        );
        u.regrant().await;
    }

    let sent = bob.engine.send_group(id, "hi all".into()).await.unwrap();
    assert_eq!((sent.copies, sent.unreachable.len()), (2, 0));
    let got = said(&carol).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].message.text, "hi all");
    // A name nobody vouched for is marked, so Bob cannot pass for one of Carol's contacts.
    assert_eq!(got[0].name, "~bob");
    let sent = carol.engine.send_group(id, "hi bob".into()).await.unwrap();
    assert_eq!((sent.copies, sent.unreachable.len()), (2, 0));
    let got = said(&bob).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].message.text, "hi bob");
    alice.sync().await;
    bob.sync().await;
    let want = vec![
        ("bob".to_string(), "hi all".to_string()),
        ("carol".to_string(), "hi bob".to_string()),
    ];
    for u in [&alice, &bob, &carol] {
        assert_eq!(texts(u, id), want, "{}", u.card.name());
    }
    // Both copies of Bob's message confirmed: Carol's receipt came over the group's way.
    let ours = bob
        .engine
        .store()
        .group_messages(&id)
        .unwrap()
        .into_iter()
        .find(|m| !m.event && m.from.is_empty())
        .unwrap();
    assert_eq!(ours.tally().0, 2, "delivered to both");

    // A 1:1 message from a member who is not a contact is a message request, as a
    // stranger's is; accepted, it is shown once.
    let carol_at_bob = bob.contact_of(&carol.peer()).unwrap();
    let content = Content {
        id: MessageId(rand::random()),
        seq: 0,
        prev: [0; 32],
        sent_at_ms: now_ms(),
        body: Body::Reaction {
            target: MessageId([1; 16]),
            own: false,
            emoji: "👍".into(),
        },
    };
    bob.send_raw(&carol_at_bob, &content).await;
    bob.engine
        .add_contact(carol.card.clone(), None)
        .await
        .unwrap();
    assert!(!met(&bob, &carol), "added by code: a contact now");
    let (_, progress) = bob.send(&carol_at_bob, "just you and me").await;
    assert!(progress.acked > 0);
    assert!(said(&carol).await.is_empty(), "held, not shown");
    let requests = carol.engine.store().requests().unwrap();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].peer, bob.peer());
    let held: Vec<_> = requests[0]
        .messages
        .iter()
        .map(|m| m.text.clone())
        .collect();
    assert_eq!(
        held,
        vec![Some("just you and me".to_string())],
        "the reaction is refused"
    );
    let accepted = carol.engine.accept_request(bob.peer(), None).await.unwrap();
    assert_eq!(accepted.accepted.len(), 1);
    assert_eq!(accepted.accepted[0].message.text, "just you and me");
    assert!(!met(&carol, &bob));
    assert!(carol.engine.store().requests().unwrap().is_empty());
    assert_eq!(carol.messages(&bob).len(), 1);
    assert!(said(&carol).await.is_empty(), "nothing twice");
    bob.sync().await;
    assert_eq!(
        bob.messages(&carol)[0].state,
        MessageState::Delivered,
        "confirmed once taken in"
    );
}

#[tokio::test]
async fn a_member_whose_card_was_lost_is_met_by_their_first_message_and_forgotten_after_leaving() {
    let net = FakeNet::default();
    let (alice, bob, carol) = strangers(&net).await;
    let id = family(&alice, &bob, &carol).await;
    // Carol lost Bob's card (as if the record passing it on never came).
    let bob_id = bob.peer();
    carol
        .engine
        .change(move |state, _| {
            state.with_sessions(|this, sessions| {
                let mut w = WriteSet::default();
                this.store.forget_contact(&mut w, &bob_id)?;
                sessions.forget(&bob_id);
                this.apply_or_reset(sessions, w)
            })
        })
        .await
        .unwrap();
    assert!(carol.contact_of(&bob.peer()).is_none());
    carol.regrant().await;
    // Bob's first message to her carries his card and proves his key: she meets him.
    bob.engine
        .send_group(id, "am I here?".into())
        .await
        .unwrap();
    bob.engine.settle().await.unwrap();
    let got = said(&carol).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].message.text, "am I here?");
    assert!(met(&carol, &bob));
    assert!(carol.engine.store().requests().unwrap().is_empty());

    // A stranger to every group of hers is still only a request.
    let dave = User::started(&net, "dave", 1).await;
    let carol_at_dave = dave.add_contact(&carol);
    dave.send(&carol_at_dave, "hello?").await;
    assert!(said(&carol).await.is_empty());
    assert_eq!(carol.engine.store().requests().unwrap().len(), 1);
    assert!(carol.contact_of(&dave.peer()).is_none());

    // Alice removes Carol: once each has nothing left for the other, Bob and Carol
    // forget each other, and their relays take nothing more from the other.
    alice
        .engine
        .change_group(id, GroupChange::Remove(carol.peer()))
        .await
        .unwrap();
    for _ in 0..3 {
        for u in [&alice, &bob, &carol] {
            u.sync().await;
        }
    }
    for (u, other) in [(&bob, &carol), (&carol, &bob)] {
        u.engine.housekeeping().await.unwrap();
        u.engine.settle().await.unwrap();
        assert!(
            u.contact_of(&other.peer()).is_none(),
            "{} forgot",
            u.card.name()
        );
    }
    let sent = bob.engine.send_group(id, "just us".into()).await.unwrap();
    assert_eq!(sent.copies, 1);
    assert!(said(&carol).await.is_empty());
}

#[tokio::test]
async fn a_members_message_that_comes_before_their_add_is_kept_unseen_until_they_are_met() {
    let net = FakeNet::default();
    let (alice, bob, carol) = strangers(&net).await;
    let id = alice.engine.create_group("Street".into()).await.unwrap();
    alice
        .engine
        .change_group(id, GroupChange::Add(vec![carol.peer()]))
        .await
        .unwrap();
    carol.sync().await;
    alice
        .engine
        .change_group(id, GroupChange::Add(vec![bob.peer()]))
        .await
        .unwrap();
    bob.sync().await;
    assert!(met(&bob, &carol));
    // Bob writes at once; his message reaches Carol before Alice's word that he is in.
    let carol_at_bob = bob.contact_of(&carol.peer()).unwrap();
    let content = Content {
        id: MessageId(rand::random()),
        seq: 1,
        prev: [0; 32],
        sent_at_ms: now_ms(),
        body: group_text(id, "made it"),
    };
    let envelope = bob.send_raw(&carol_at_bob, &content).await;
    let shown = carol.engine.receive(vec![envelope]).await.unwrap();
    assert!(shown.is_empty());
    let store = carol.engine.store();
    assert!(
        store.requests().unwrap().is_empty(),
        "no message request for it"
    );
    assert_eq!(store.all_requests().unwrap().len(), 1, "kept");
    // Alice's records come: Bob is met, and what he sent is shown, once.
    let got = said(&carol).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].message.text, "made it");
    assert!(met(&carol, &bob));
    assert!(store.all_requests().unwrap().is_empty());
    assert_eq!(
        texts(&carol, id),
        vec![("bob".to_string(), "made it".to_string())]
    );
    assert!(said(&carol).await.is_empty(), "nothing twice");
}

#[tokio::test]
async fn an_admin_cannot_make_members_meet_more_people_than_a_small_group_holds() {
    use kkachi_protocol::Card;
    use kkachi_protocol::content::GroupBody;
    use kkachi_protocol::group::{Mode, Op, Role, SMALL_GROUP_MAX, SignedOp};
    let net = FakeNet::default();
    let (alice, bob, _carol) = strangers(&net).await;
    // Alice's modified client writes a group of Alice, Bob and `extra` made-up people,
    // and passes Bob every one's card.
    let make = |extra: usize| {
        let me = alice.engine.identity().clone();
        let at = |ms: u64| kkachi_protocol::group::Hlc { ms, count: 0 };
        let t = now_ms();
        let create = SignedOp::create(&me, "alice", rand::random(), "Block", Mode::Chat, at(t));
        let id = create.group();
        let mut ops = vec![create];
        let mut cards = Vec::new();
        let people: Vec<kkachi_protocol::Identity> = (0..extra)
            .map(|_| kkachi_protocol::Identity::generate())
            .collect();
        for (i, who) in people.iter().chain([bob.engine.identity()]).enumerate() {
            let card = Card::new(who, &format!("p{i}"), vec![], 1).unwrap();
            let op = Op::Add {
                member: who.public(),
                name: format!("p{i}"),
                role: Role::Member,
            };
            ops.push(SignedOp::sign(
                &me,
                id,
                i as u64 + 2,
                at(t + i as u64 + 1),
                op,
            ));
            if i < extra {
                cards.push(card);
            }
        }
        (id, ops, cards)
    };
    let bob_at_alice = alice.contact_of(&bob.peer()).unwrap();
    // A group of the small tier's size: everyone met. One more: nobody more.
    for (extra, want) in [
        (SMALL_GROUP_MAX - 2, SMALL_GROUP_MAX - 2),
        (SMALL_GROUP_MAX - 1, SMALL_GROUP_MAX - 2),
    ] {
        let (id, ops, cards) = make(extra);
        let record = |what| Content {
            id: MessageId(rand::random()),
            seq: 0,
            prev: [0; 32],
            sent_at_ms: now_ms(),
            body: Body::Group { group: id, what },
        };
        alice
            .send_raw(
                &bob_at_alice,
                &record(GroupBody::Ops {
                    all: true,
                    have: [0; 16],
                    ops,
                }),
            )
            .await;
        for chunk in cards.chunks(kkachi_protocol::content::MAX_GROUP_CARDS) {
            let what = GroupBody::Cards {
                cards: chunk.to_vec(),
            };
            alice.send_raw(&bob_at_alice, &record(what)).await;
        }
        bob.sync().await;
        let members = roster(&bob, id).expect("Bob is in it").members.len();
        assert_eq!(members, extra + 2);
        let met_here = bob
            .engine
            .store()
            .contacts()
            .unwrap()
            .iter()
            .filter(|c| c.through_group)
            .count();
        assert_eq!(met_here, want, "{members} members");
    }
}

#[tokio::test]
async fn what_went_to_the_group_before_a_member_could_be_reached_reaches_them_once_met() {
    let net = FakeNet::default();
    let (alice, bob, carol) = strangers(&net).await;
    let id = family(&alice, &bob, &carol).await;
    // Bob lost Carol's card (as if the record passing it on never came): what he
    // writes does not reach her.
    let carol_id = carol.peer();
    bob.engine
        .change(move |state, _| {
            state.with_sessions(|this, sessions| {
                let mut w = WriteSet::default();
                this.store.forget_contact(&mut w, &carol_id)?;
                sessions.forget(&carol_id);
                this.apply_or_reset(sessions, w)
            })
        })
        .await
        .unwrap();
    let sent = bob
        .engine
        .send_group(id, "is anyone there?".into())
        .await
        .unwrap();
    assert_eq!(sent.copies, 1);
    assert_eq!(sent.unreachable, vec!["carol".to_string()]);
    let before = bob.engine.send_group(id, "hello?".into()).await.unwrap();
    assert_eq!(before.copies, 1);
    bob.engine.settle().await.unwrap();
    assert!(said(&carol).await.is_empty());
    // Carol writes: her first message carries her card, and Bob meets her. What he
    // wrote to the group meanwhile goes to her then, once.
    carol.engine.send_group(id, "I am".into()).await.unwrap();
    carol.engine.settle().await.unwrap();
    let got = said(&bob).await;
    assert_eq!(got.len(), 1, "{got:?}");
    bob.engine.settle().await.unwrap();
    let got: Vec<String> = said(&carol)
        .await
        .into_iter()
        .map(|r| r.message.text)
        .collect();
    assert_eq!(
        got,
        vec!["is anyone there?".to_string(), "hello?".to_string()]
    );
    assert!(said(&carol).await.is_empty(), "nothing twice");
    alice.sync().await;
    let want = vec![
        ("bob".to_string(), "is anyone there?".to_string()),
        ("bob".to_string(), "hello?".to_string()),
        ("carol".to_string(), "I am".to_string()),
    ];
    assert_eq!(texts(&carol, id), want);
    assert_eq!(texts(&alice, id), want);
    // Both of Bob's messages are now delivered to both members; nothing more goes on
    // another meeting.
    bob.sync().await;
    for m in bob
        .engine
        .store()
        .group_messages(&id)
        .unwrap()
        .into_iter()
        .filter(|m| !m.event && m.from.is_empty())
    {
        assert_eq!(m.tally().0, 2, "{}", m.message.text);
    }
    let carol_now = carol.peer();
    let again = bob
        .engine
        .change(move |state, now| state.catch_up(&carol_now, now))
        .await
        .unwrap();
    assert_eq!(again, 0);
}

#[tokio::test]
async fn a_message_request_stays_a_request_when_its_sender_is_met_in_a_group() {
    let net = FakeNet::default();
    let (alice, bob, carol) = strangers(&net).await;
    // Bob has Carol's code and writes her: a message request.
    let carol_at_bob = bob.add_contact(&carol);
    bob.send(&carol_at_bob, "hello, it's Bob from the meeting")
        .await;
    assert!(said(&carol).await.is_empty());
    assert_eq!(carol.engine.store().requests().unwrap().len(), 1);
    // Then Alice puts them in one group: Carol meets Bob there, and his request stays
    // a request, shown, until she accepts it.
    family(&alice, &bob, &carol).await;
    assert!(met(&carol, &bob));
    let requests = carol.engine.store().requests().unwrap();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(
        requests[0].messages[0].text.as_deref(),
        Some("hello, it's Bob from the meeting")
    );
    carol.engine.housekeeping().await.unwrap();
    assert_eq!(
        carol.engine.store().requests().unwrap().len(),
        1,
        "not at upkeep either"
    );
    let accepted = carol.engine.accept_request(bob.peer(), None).await.unwrap();
    assert_eq!(accepted.accepted.len(), 1);
    assert_eq!(carol.messages(&bob).len(), 1);
}
