//! Disappearing messages: a timer set on one side holds on both, messages stored under
//! it go on both sides once it runs out, and turning it off keeps what comes after.

use super::*;

#[tokio::test]
async fn a_timer_set_by_one_side_deletes_messages_on_both_and_off_keeps_them() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, alice_c) = pair(&net).await;
    let _ = alice.send(&bob_c, "before the timer").await;
    bob.sync().await;

    // Alice sets one second; Bob takes it with the next sync.
    alice.engine.set_timer(bob_c.peer, 1).await.unwrap();
    alice.engine.settle().await.unwrap();
    bob.sync().await;
    let at_bob = bob.engine.store().conversation(&alice_c.peer).unwrap();
    assert_eq!(at_bob.timer_secs, 1, "Bob's side holds Alice's timer");

    let _ = alice.send(&bob_c, "gone soon").await;
    bob.sync().await;
    let _ = bob.send(&alice_c, "gone soon too").await;
    alice.sync().await;
    let texts = |u: &User, with: &User| -> Vec<String> {
        u.messages(with).into_iter().map(|m| m.text).collect()
    };
    assert_eq!(
        texts(&bob, &alice),
        ["before the timer", "gone soon", "gone soon too"]
    );
    assert_eq!(
        texts(&alice, &bob),
        ["before the timer", "gone soon", "gone soon too"]
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Not shown once run out, even before they are deleted...
    assert_eq!(texts(&alice, &bob), ["before the timer"]);
    // ...and deleted from the store by each side's engine on its own, when due.
    for (u, other) in [(&alice, &bob), (&bob, &alice)] {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while u.engine.store().stored_message_count(&other.peer()) != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "only the message from before the timer is stored"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            u.engine.expire_messages().await.unwrap(),
            0,
            "nothing left to delete"
        );
    }

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
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(alice.engine.expire_messages().await.unwrap(), 0);
    assert_eq!(bob.engine.expire_messages().await.unwrap(), 0);
    assert_eq!(texts(&bob, &alice), ["before the timer", "kept"]);
}

#[tokio::test]
async fn an_older_timer_setting_does_not_undo_a_newer_one() {
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
}
