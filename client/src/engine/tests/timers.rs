//! Disappearing messages: a timer set on one side holds on both; texts sent under it
//! carry it and go on both sides once it runs out, whatever order things arrive in; a
//! copy of a deleted text does not bring it back; turning the timer off keeps what comes
//! after.

use super::*;

fn texts(u: &User, with: &User) -> Vec<String> {
    u.messages(with).into_iter().map(|m| m.text).collect()
}

/// Waits until `u` stores `n` messages with `with` (deleted by its engine when due).
async fn stored(u: &User, with: &User, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while u.engine.store().stored_message_count(&with.peer()) != n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} still stores {} messages",
            u.peer(),
            u.engine.store().stored_message_count(&with.peer())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_timer_set_by_one_side_deletes_messages_on_both_and_off_keeps_them() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, alice_c) = pair(&net).await;
    let _ = alice.send(&bob_c, "before the timer").await;
    bob.sync().await;

    // Too short a timer is refused.
    assert!(alice.engine.set_timer(bob_c.peer, 1).await.is_err());
    // Alice sets the shortest; Bob takes it with the next sync.
    let secs = crate::store::MIN_TIMER_SECS;
    alice.engine.set_timer(bob_c.peer, secs).await.unwrap();
    alice.engine.settle().await.unwrap();
    bob.sync().await;
    let at_bob = bob.engine.store().conversation(&alice_c.peer).unwrap();
    assert_eq!(at_bob.timer_secs, secs, "Bob's side holds Alice's timer");

    let (sent, _) = alice.send(&bob_c, "gone soon").await;
    bob.sync().await;
    let _ = bob.send(&alice_c, "gone soon too").await;
    alice.sync().await;
    assert_eq!(
        texts(&bob, &alice),
        ["before the timer", "gone soon", "gone soon too"]
    );
    assert_eq!(
        texts(&alice, &bob),
        ["before the timer", "gone soon", "gone soon too"]
    );
    assert!(
        alice.messages(&bob)[1..]
            .iter()
            .all(|m| m.timer_secs == secs)
    );

    // Once run out: not shown, and deleted by each side's engine on its own.
    stored(&alice, &bob, 1).await;
    stored(&bob, &alice, 1).await;
    assert_eq!(texts(&alice, &bob), ["before the timer"]);
    assert_eq!(
        bob.engine.expire_messages().await.unwrap(),
        0,
        "nothing left to delete"
    );

    // A copy of the deleted text (sealed again, another path) does not bring it back.
    let gone = alice.engine.store().conversation(&bob_c.peer).unwrap();
    let copy = Content {
        id: sent.id,
        seq: gone.next_seq - 1,
        prev: [0; 32],
        sent_at_ms: 0,
        body: Body::TimedText {
            secs,
            text: "gone soon".into(),
        },
    };
    alice.send_raw(&bob_c, &copy).await;
    bob.sync().await;
    assert_eq!(texts(&bob, &alice), ["before the timer"]);

    // Bob turns it off: what comes after stays, on both sides.
    bob.engine.set_timer(alice_c.peer, 0).await.unwrap();
    bob.engine.settle().await.unwrap();
    alice.sync().await;
    assert_eq!(
        alice
            .engine
            .store()
            .conversation(&bob_c.peer)
            .unwrap()
            .timer_secs,
        0
    );
    let _ = alice.send(&bob_c, "kept").await;
    bob.sync().await;
    assert_eq!(texts(&bob, &alice), ["before the timer", "kept"]);
    assert!(bob.messages(&alice).iter().all(|m| m.timer_secs == 0));
}

#[tokio::test]
async fn a_timed_text_arriving_before_its_setting_still_goes() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, alice_c) = pair(&net).await;
    // A timed text, with no timer setting at Bob's at all (it was lost, or comes later).
    let timed = Content {
        id: MessageId(rand::random()),
        seq: 1,
        prev: [0; 32],
        sent_at_ms: crate::engine::now_ms(),
        body: Body::TimedText {
            secs: 1,
            text: "read me fast".into(),
        },
    };
    alice.send_raw(&bob_c, &timed).await;
    bob.sync().await;
    let got = bob.messages(&alice);
    assert_eq!(got.len(), 1);
    // A contact's shorter timer counts as the shortest we keep.
    assert_eq!(got[0].timer_secs, crate::store::MIN_TIMER_SECS);
    assert_eq!(
        bob.engine
            .store()
            .conversation(&alice_c.peer)
            .unwrap()
            .timer_secs,
        0
    );
    stored(&bob, &alice, 0).await;
}

#[tokio::test]
async fn an_older_or_future_timer_setting_does_not_hold_the_conversation() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, alice_c) = pair(&net).await;
    bob.engine.set_timer(alice_c.peer, 3600).await.unwrap();
    let mut old = raw_text(0, [0; 32], "");
    old.body = Body::Timer { secs: 60 };
    old.sent_at_ms = 1_000;
    // Alice's client sends an old setting (its clock far behind): Bob keeps his own.
    alice.send_raw(&bob_c, &old).await;
    bob.sync().await;
    assert_eq!(
        bob.engine
            .store()
            .conversation(&alice_c.peer)
            .unwrap()
            .timer_secs,
        3600
    );
    // One from far ahead is taken, as of now...
    let mut future = raw_text(0, [0; 32], "");
    future.id = MessageId(rand::random());
    future.body = Body::Timer { secs: 60 };
    future.sent_at_ms = u64::MAX;
    alice.send_raw(&bob_c, &future).await;
    bob.sync().await;
    assert_eq!(
        bob.engine
            .store()
            .conversation(&alice_c.peer)
            .unwrap()
            .timer_secs,
        60
    );
    // ...and Bob can still change it after.
    bob.engine.set_timer(alice_c.peer, 0).await.unwrap();
    assert_eq!(
        bob.engine
            .store()
            .conversation(&alice_c.peer)
            .unwrap()
            .timer_secs,
        0
    );
}

#[tokio::test]
async fn read_receipts_go_unless_turned_off() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, alice_c) = pair(&net).await;
    let state_at_alice = |alice: &User, bob: &User, text: &str| {
        alice
            .messages(bob)
            .into_iter()
            .find(|m| m.text == text)
            .map(|m| m.state)
    };
    // Off: Bob reads, Alice sees it delivered only.
    bob.engine.set_read_receipts(false).await.unwrap();
    let _ = alice.send(&bob_c, "quietly read").await;
    bob.sync().await;
    bob.engine.mark_read(alice_c.peer).await.unwrap();
    bob.engine.settle().await.unwrap();
    alice.sync().await;
    assert_eq!(
        bob.messages(&alice)[0].state,
        MessageState::Read,
        "read on Bob's side"
    );
    assert_eq!(
        state_at_alice(&alice, &bob, "quietly read"),
        Some(MessageState::Delivered)
    );
    // On again: the next one read shows read.
    bob.engine.set_read_receipts(true).await.unwrap();
    let _ = alice.send(&bob_c, "openly read").await;
    bob.sync().await;
    bob.engine.mark_read(alice_c.peer).await.unwrap();
    bob.engine.settle().await.unwrap();
    alice.sync().await;
    assert_eq!(
        state_at_alice(&alice, &bob, "openly read"),
        Some(MessageState::Read)
    );
}

#[tokio::test]
async fn edits_and_deletes_reach_the_contact_and_only_for_ones_own_messages() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, alice_c) = pair(&net).await;
    let (first, _) = alice.send(&bob_c, "meet at 6").await;
    let (second, _) = alice.send(&bob_c, "bring water").await;
    bob.sync().await;
    let (bobs, _) = bob.send(&alice_c, "ok").await;
    alice.sync().await;

    alice
        .engine
        .revise(bob_c.peer, first.id, Some("meet at 7".into()))
        .await
        .unwrap();
    alice
        .engine
        .revise(bob_c.peer, second.id, None)
        .await
        .unwrap();
    alice.engine.settle().await.unwrap();
    bob.sync().await;
    let at_bob = bob.messages(&alice);
    assert_eq!(at_bob[0].text, "meet at 7");
    assert!(at_bob[0].edited && !at_bob[0].deleted);
    assert!(at_bob[1].deleted && at_bob[1].text.is_empty());
    // The same on Alice's side, and nothing counts as missing at Bob's.
    let at_alice = alice.messages(&bob);
    assert_eq!(
        (at_alice[0].text.as_str(), at_alice[1].deleted),
        ("meet at 7", true)
    );
    assert_eq!(
        bob.engine
            .store()
            .conversation(&alice_c.peer)
            .unwrap()
            .gaps
            .missing(),
        0
    );

    // Nobody changes another's message: not Alice through the engine...
    assert!(
        alice
            .engine
            .revise(bob_c.peer, bobs.id, None)
            .await
            .is_err()
    );
    // ...nor Bob's client sending an edit of Alice's message to her.
    let forged = Content {
        id: MessageId(rand::random()),
        seq: 2,
        prev: [0; 32],
        sent_at_ms: 0,
        body: Body::Edit {
            target: first.id,
            text: "meet at midnight".into(),
        },
    };
    bob.send_raw(&alice_c, &forged).await;
    alice.sync().await;
    assert_eq!(alice.messages(&bob)[0].text, "meet at 7");

    // Deleted for me only: gone here, still at Bob's.
    alice
        .engine
        .delete_for_me(bob_c.peer, first.id)
        .await
        .unwrap();
    assert!(alice.messages(&bob).iter().all(|m| m.id != first.id.0));
    assert_eq!(bob.messages(&alice)[0].text, "meet at 7");
}

#[tokio::test]
async fn a_delete_arriving_before_its_message_still_deletes_it() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _alice_c) = pair(&net).await;
    let id = MessageId(rand::random());
    let text = raw_text(1, [0; 32], "sent by mistake");
    let text = Content { id, ..text };
    let delete = Content {
        id: MessageId(rand::random()),
        seq: 2,
        prev: text.hash(),
        sent_at_ms: text.sent_at_ms,
        body: Body::Delete { target: id },
    };
    // The delete first (another relay was faster), then the text.
    alice.send_raw(&bob_c, &delete).await;
    bob.sync().await;
    alice.send_raw(&bob_c, &text).await;
    bob.sync().await;
    let got = bob.messages(&alice);
    assert_eq!(got.len(), 1);
    assert!(got[0].deleted && got[0].text.is_empty(), "{got:?}");
}
