//! Sending and receiving between honest users.

use kkachi_protocol::session::MAX_UNSAVED_SEALS;

use super::*;
use crate::store::{OutboxKind, TreeId};

#[tokio::test]
async fn send_relay_receive_receipt_delivered() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    let (queued, progress) = alice.send(&bob_c, "hello bob").await;
    assert_eq!(
        progress,
        Progress {
            acked: 3,
            total: 3,
            direct: false
        }
    );
    assert_eq!(
        alice.messages(&bob)[0].state,
        MessageState::Relayed {
            relayed: 3,
            total: 3
        }
    );
    assert_eq!(alice.messages(&bob)[0].id, queued.id.0);

    // Three relays hold it; bob shows it once.
    let got = bob.sync().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.text, "hello bob");
    assert_eq!(bob.messages(&alice).len(), 1);
    // Deleted from bob's relays after it was stored.
    for r in &bob.relays {
        let mailbox = bob.inbox(r);
        assert!(
            net.relay_store(r)
                .fetch(&mailbox, 0, 10, usize::MAX)
                .unwrap()
                .items
                .is_empty()
        );
    }
    // Bob's receipt went out with his sync; alice sees "delivered", her outbox empty.
    assert!(
        alice.sync().await.is_empty(),
        "receipts are not shown as messages"
    );
    assert_eq!(alice.messages(&bob)[0].state, MessageState::Delivered);
    assert_eq!(alice.engine.store().outbox_len(), 0);
    // A second sync shows nothing new.
    assert!(bob.sync().await.is_empty());
}

#[tokio::test]
async fn one_relay_down_loses_nothing_and_catches_up_later() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    net.set_up(&bob.relays[1], false);
    let (q, p) = alice.send(&bob_c, "through two of three").await;
    assert_eq!((p.acked, p.total), (2, 3));
    let got = bob.sync().await;
    assert_eq!(got.len(), 1);
    net.set_up(&bob.relays[1], true);
    // Bob's receipt has not reached alice: the entry waits, and the revived relay
    // gets its copy.
    let p = alice.deliver(q.outbox_key).await.unwrap();
    assert_eq!((p.acked, p.total), (3, 3));
    // The late copy on the revived relay is recognised and not shown again.
    assert!(bob.sync().await.is_empty());
    assert_eq!(bob.messages(&alice).len(), 1);
}

#[tokio::test]
async fn all_relays_down_queues_then_delivers_when_one_returns() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    for r in &bob.relays {
        net.set_up(r, false);
    }
    let (_, p) = alice.send(&bob_c, "wait for me").await;
    assert_eq!(p.acked, 0);
    assert_eq!(alice.messages(&bob)[0].state, MessageState::Queued);
    // Backoff is in place: each relay's next attempt is scheduled in the future.
    let entry = alice.engine.store().outbox().unwrap().remove(0).1;
    assert!(
        entry
            .targets
            .iter()
            .all(|t| t.next_try_ms > now_ms() && t.attempts == 1)
    );
    net.set_up(&bob.relays[2], true);
    alice.engine.deliver_now().await.unwrap();
    let got = bob.sync().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.text, "wait for me");
}

#[tokio::test]
async fn replies_and_many_messages_exactly_once_in_order() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, alice_c) = pair(&net).await;
    for i in 0..20 {
        let _ = alice.send(&bob_c, &format!("a{i}")).await;
        if i % 5 == 0 {
            let _ = bob.send(&alice_c, &format!("b{i}")).await;
        }
        if i % 3 == 0 {
            bob.sync().await;
            alice.sync().await;
        }
    }
    bob.sync().await;
    alice.sync().await;
    let texts: Vec<String> = bob
        .messages(&alice)
        .iter()
        .filter(|m| m.direction == Direction::In)
        .map(|m| m.text.clone())
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
    assert_eq!(texts, expected, "every message exactly once, in order");
    let alice_in = alice
        .messages(&bob)
        .iter()
        .filter(|m| m.direction == Direction::In)
        .count();
    assert_eq!(alice_in, 4);
    let conv = bob.engine.store().conversation(&alice.peer()).unwrap();
    assert_eq!(conv.gaps.missing(), 0);
    assert!(conv.chain_breaks.is_empty());
}

#[tokio::test]
async fn a_dropped_message_shows_as_a_gap_until_it_arrives() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    let _ = alice.send(&bob_c, "one").await;
    bob.sync().await;
    // "two" is sealed but reaches no relay yet; "three" does.
    for r in &bob.relays {
        net.set_up(r, false);
    }
    let _ = alice.send(&bob_c, "two").await;
    for r in &bob.relays {
        net.set_up(r, true);
    }
    // "three" only: "two" waits out its backoff.
    let _ = alice.send(&bob_c, "three").await;
    let got = bob.sync().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.text, "three");
    assert_eq!(
        got[0].gaps.ranges(),
        &[(2, 2)],
        "the gap is reported, not hidden"
    );
    // The retry fills it.
    alice.engine.deliver_now().await.unwrap();
    let got = bob.sync().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.text, "two");
    assert_eq!(got[0].gaps.missing(), 0);
}

#[tokio::test]
async fn direct_path_on_the_lan_without_relays() {
    let net = FakeNet::default();
    let alice = User::started(&net, "alice", 0).await;
    let bob = User::started(&net, "bob", 0).await;
    let bob_c = alice.add_contact_live(&bob).await;
    bob.add_contact(&alice);
    net.inner.lock().direct.insert(bob.device());
    let (_, p) = alice.send(&bob_c, "no internet here").await;
    assert!(p.direct);
    let inbox = net.inner.lock().direct_inbox.remove(&bob.device()).unwrap();
    let got = bob.engine.receive(inbox.clone()).await.unwrap();
    assert_eq!(got[0].message.text, "no internet here");
    // The same envelope again (another path) is not shown twice.
    assert!(bob.engine.receive(inbox).await.unwrap().is_empty());
}

#[tokio::test]
async fn outbox_survives_restart_and_delivers_after() {
    let net = FakeNet::default();
    let (mut alice, bob, bob_c, _) = pair(&net).await;
    for r in &bob.relays {
        net.set_up(r, false);
    }
    alice.queue(&bob_c, "survive a restart").await;
    // Restart: the engine stops; a new one reads the outbox from the store.
    alice.restart(&net).await;
    assert_eq!(alice.engine.store().outbox_len(), 1);
    for r in &bob.relays {
        net.set_up(r, true);
    }
    alice.engine.deliver_now().await.unwrap();
    assert_eq!(bob.sync().await[0].message.text, "survive a restart");
}

#[tokio::test]
async fn contact_that_lost_its_state_still_gets_every_message() {
    let net = FakeNet::default();
    let (alice, mut bob, bob_c, alice_c) = pair(&net).await;
    // Exchange until both sides seal on an established session.
    converse(&alice, &bob, &bob_c, &alice_c).await;
    let established = |u: &User, c: &Contact| u.engine.store().session(c).unwrap().is_established();
    assert!(established(&alice, &bob_c) && established(&bob, &alice_c));
    // Bob loses his session states (a reinstall), then alice seals on the session he
    // no longer has.
    bob.engine.shutdown().await.unwrap();
    let mut w = WriteSet::default();
    w.remove(TreeId::Sessions, alice.peer().to_bytes());
    bob.engine.store().apply(w).unwrap();
    bob.restart(&net).await;
    let _ = alice.send(&bob_c, "sealed before bob's reset").await;
    assert!(bob.sync().await.is_empty(), "bob cannot open it");
    // Bob writes; alice learns of the reset and seals again; bob gets it.
    let _ = bob.send(&alice_c, "I reinstalled").await;
    alice.sync().await;
    alice.engine.deliver_now().await.unwrap();
    let got = bob.sync().await;
    assert!(
        got.iter()
            .any(|r| r.message.text == "sealed before bob's reset"),
        "{got:?}"
    );
}

#[tokio::test]
async fn one_put_per_relay_while_the_network_is_slow() {
    let net = FakeNet::default();
    let (alice, _bob, bob_c, _) = pair(&net).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    net.inner.lock().gate = Some(gate.clone());
    let (q, mut events) = alice.queue(&bob_c, "slow network").await;
    // Waiting on the network, the entry is tried no more than once per relay, however
    // often anyone asks for what is due.
    for _ in 0..3 {
        let _ = tokio::time::timeout(Duration::from_millis(20), alice.engine.settle()).await;
    }
    gate.add_permits(100);
    alice.engine.settle().await.unwrap();
    assert_eq!(net.inner.lock().puts, 3, "one put per relay, not more");
    let mut last = None;
    while let Ok(SendEvent::Progress(p)) = events.try_recv() {
        last = Some(p);
    }
    assert_eq!(last.map(|p| p.acked), Some(3));
    assert_eq!(
        alice
            .engine
            .progress(q.outbox_key)
            .await
            .unwrap()
            .unwrap()
            .acked,
        3
    );
}

#[tokio::test]
async fn receipts_go_out_without_being_asked() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    alice.send(&bob_c, "hello").await;
    // A daemon-like bob takes it in from his relays; his receipt leaves on its own.
    let received = bob.engine.receive(relay_copy(&net, &bob)).await.unwrap();
    assert_eq!(received.len(), 1);
    bob.engine.settle().await.unwrap();
    alice.sync().await;
    assert_eq!(alice.messages(&bob)[0].state, MessageState::Delivered);
    // Receiving nothing new sends nothing.
    let puts = net.inner.lock().puts;
    bob.engine.receive(Vec::new()).await.unwrap();
    bob.engine.settle().await.unwrap();
    assert_eq!(net.inner.lock().puts, puts);
}

/// What waits for `user` at its first relay (left there).
fn relay_copy(net: &FakeNet, user: &User) -> Vec<Envelope> {
    let mailbox = user.inbox(&user.relays[0]);
    net.relay_store(&user.relays[0])
        .fetch(&mailbox, 0, 256, usize::MAX)
        .unwrap()
        .items
        .into_iter()
        .map(|i| i.envelope)
        .collect()
}

#[tokio::test]
async fn waiting_messages_ask_for_a_direct_path_unless_there_is_one() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    for r in &bob.relays {
        net.set_up(r, false);
    }
    net.inner.lock().sought.clear();
    alice.send(&bob_c, "are you there?").await;
    assert_eq!(net.inner.lock().sought, vec![bob.device()]);
    // On the LAN: handed over directly, nothing left waiting.
    net.inner.lock().direct.insert(bob.device());
    alice.engine.settle().await.unwrap();
    assert_eq!(alice.messages(&bob)[0].state, MessageState::Delivered);
    assert_eq!(alice.engine.store().outbox_len(), 0);
}

#[tokio::test]
async fn a_send_returns_sealed_and_says_when_it_is_durable() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    let store = alice.engine.store().clone();
    let mut sending = alice.engine.send(bob_c.peer, "hello".into()).await.unwrap();
    assert_eq!(alice.messages(&bob)[0].id, sending.queued.id.0);
    assert!(matches!(
        sending.events.recv().await,
        Some(SendEvent::Durable)
    ));
    assert!(store.is_durable(store.write_ticket()) || store.outbox_len() <= 1);
    alice.engine.settle().await.unwrap();
    assert_eq!(bob.sync().await[0].message.text, "hello");
    // A message the engine refuses never reaches the outbox.
    let err = alice
        .engine
        .send(bob_c.peer, "   ".into())
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Invalid(_)), "{err}");
}

#[tokio::test]
async fn messages_out_before_a_crash_lost_their_write_do_not_block_later_ones() {
    let net = FakeNet::default();
    let (mut alice, bob, bob_c, alice_c) = pair(&net).await;
    // Both sides on an established session, so messages carry transport counters.
    converse(&alice, &bob, &bob_c, &alice_c).await;
    let at_crash = alice.engine.store().session(&bob_c).unwrap();
    assert!(at_crash.is_established());
    // As many as may leave before their write is durable reach bob...
    for i in 0..MAX_UNSAVED_SEALS {
        alice.send(&bob_c, &format!("out {i}")).await;
    }
    assert_eq!(bob.sync().await.len() as u64, MAX_UNSAVED_SEALS);
    // ...then alice crashes and her session state on disk is the one from before them.
    alice.engine.shutdown().await.unwrap();
    let mut w = WriteSet::default();
    LocalStore::write_session(&mut w, &bob.peer(), &at_crash);
    alice.engine.store().apply(w).unwrap();
    alice.restart(&net).await;
    alice.send(&bob_c, "after the crash").await;
    let shown = bob.sync().await;
    assert_eq!(
        shown
            .iter()
            .map(|r| r.message.text.as_str())
            .collect::<Vec<_>>(),
        ["after the crash"],
        "refused as a replay if its counter repeated"
    );
}

#[tokio::test]
async fn a_message_is_announced_when_stored_then_once_durable_and_never_again() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    net.inner.lock().direct.insert(bob.device());
    // What bob's subscribers see, and whether the store was durable when they saw a
    // message announced durable. (Whether the flush is done by the time a subscriber
    // sees the first announcement depends on the disk: the owner task may take the
    // flush's completion before the subscriber runs.)
    let mut events = bob.engine.subscribe();
    let store = bob.engine.store().clone();
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        // The write that stored the message: every write so far when it is announced.
        let mut stored = None;
        while let Ok(event) = events.recv().await {
            match event {
                AppEvent::Incoming(r) => {
                    stored = Some(store.write_ticket());
                    seen.push(("incoming", r.message.text, None));
                }
                AppEvent::Message(r) => {
                    let durable = stored.is_some_and(|t| store.is_durable(t));
                    seen.push(("message", r.message.text, Some(durable)));
                }
                _ => {}
            }
        }
        seen
    });
    let (_, p) = alice.send(&bob_c, "once").await;
    assert!(p.direct);
    assert_eq!(net.inner.lock().puts, 3, "the relays carry it too");
    // The direct copy, then the three relays' copies.
    let inbox = net.inner.lock().direct_inbox.remove(&bob.device()).unwrap();
    assert_eq!(bob.engine.receive(inbox).await.unwrap().len(), 1);
    assert!(bob.sync().await.is_empty());
    bob.engine.shutdown().await.unwrap();
    drop(bob);
    let seen = seen.await.unwrap();
    assert_eq!(
        seen,
        [
            ("incoming", "once".to_owned(), None),
            ("message", "once".to_owned(), Some(true))
        ],
        "shown from the store, then announced once it is durable, once"
    );
}

/// The `HandedOver` events of `rx` so far.
fn handed_over(rx: &mut tokio::sync::broadcast::Receiver<AppEvent>) -> Vec<MessageId> {
    std::iter::from_fn(|| rx.try_recv().ok())
        .filter_map(|e| match e {
            AppEvent::HandedOver { id, .. } => Some(id),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_direct_handover_is_announced_once_whoever_waits() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    let mut rx = alice.engine.subscribe();
    // Through the relays only: stored, not handed over.
    let (relayed, p) = alice.send(&bob_c, "via relays").await;
    assert_eq!((p.acked, p.direct), (3, false));
    assert!(handed_over(&mut rx).is_empty());
    // Bob comes onto the LAN with a message waiting: both are handed over (the relayed
    // one has no receipt yet), and its sender hears it delivered.
    for r in &bob.relays {
        net.set_up(r, false);
    }
    let (waiting, mut events) = alice.queue(&bob_c, "on the LAN").await;
    alice.engine.settle().await.unwrap();
    net.inner.lock().direct.insert(bob.device());
    alice.engine.settle().await.unwrap();
    assert_eq!(
        alice.engine.progress(waiting.outbox_key).await.unwrap(),
        None
    );
    let mut got = handed_over(&mut rx);
    got.sort_by_key(|id| id.0);
    let mut want = vec![relayed.id, waiting.id];
    want.sort_by_key(|id| id.0);
    assert_eq!(got, want);
    let delivered = std::iter::from_fn(|| events.try_recv().ok())
        .any(|e| matches!(e, SendEvent::Delivered { direct: true }));
    assert!(delivered);
    // Once each: nothing more to hand over.
    alice.engine.settle().await.unwrap();
    assert!(handed_over(&mut rx).is_empty());
    assert!(
        alice
            .engine
            .store()
            .outbox()
            .unwrap()
            .iter()
            .all(|(_, e)| e.kind != OutboxKind::Message)
    );
}

#[tokio::test]
async fn a_contact_refusing_direct_hand_overs_is_not_asked_again_at_once() {
    // Bob removed alice: on the LAN, he refuses what she hands him. She tries again
    // only after a backoff (the relays carry it meanwhile), and settles.
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    {
        let mut inner = net.inner.lock();
        inner.direct.insert(bob.device());
        inner.refusing.insert(bob.device());
    }
    let (_, p) = tokio::time::timeout(Duration::from_secs(10), alice.send(&bob_c, "hello"))
        .await
        .expect("settles although the direct path refuses");
    assert_eq!((p.acked, p.direct), (3, false), "the relays have it");
    tokio::time::sleep(Duration::from_millis(200)).await;
    alice.engine.settle().await.unwrap();
    assert_eq!(net.inner.lock().direct_puts, 1, "not asked again at once");
}

#[tokio::test]
async fn a_send_to_a_contact_blocked_meanwhile_ends_withdrawn() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    for r in &bob.relays {
        net.set_up(r, false);
    }
    let (queued, mut events) = alice.queue(&bob_c, "never mind").await;
    alice.engine.settle().await.unwrap();
    alice.engine.block(bob.peer(), "bob".into()).await.unwrap();
    alice.engine.settle().await.unwrap();
    let told: Vec<SendEvent> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    assert!(
        matches!(told.last(), Some(SendEvent::Withdrawn)),
        "ends withdrawn: {told:?}"
    );
    assert!(
        !told
            .iter()
            .any(|e| matches!(e, SendEvent::Delivered { .. })),
        "never delivered: {told:?}"
    );
    assert_eq!(
        alice.engine.progress(queued.outbox_key).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn what_waits_on_a_replaced_session_is_sealed_again_at_most_every_ten_minutes() {
    use crate::engine::receive::RESEAL_EVERY_MS;
    let net = FakeNet::default();
    let (alice, bob, bob_c, alice_c) = pair(&net).await;
    converse(&alice, &bob, &bob_c, &alice_c).await;
    for r in &bob.relays {
        net.set_up(r, false);
    }
    let (q, _) = alice.queue(&bob_c, "waiting for bob's relays").await;
    alice.engine.settle().await.unwrap();
    let store = alice.engine.store().clone();
    let entry = store.outbox_entry(q.outbox_key).unwrap().unwrap();
    let current = entry.sealed_on.expect("sealed on the established session");
    // Pretend the session it is sealed on was replaced, and the entry was sealed again
    // a minute ago: it is held back.
    let reseal = |resealed_ms_ago: u64| {
        let (store, bob_c) = (store.clone(), bob_c.clone());
        let key = q.outbox_key;
        alice.engine.change(move |state, now| {
            let mut entry = store.outbox_entry(key)?.unwrap();
            entry.sealed_on = Some([9; 32]);
            entry.resealed_ms = now - resealed_ms_ago;
            let mut w = WriteSet::default();
            LocalStore::write_outbox(&mut w, key, &entry);
            store.apply(w)?;
            state.with_sessions(|this, sessions| {
                let session = sessions.get(&this.store, &bob_c)?;
                let mut w = WriteSet::default();
                let n = this.reseal_stale(&mut w, &bob_c, session, "test", now)?;
                LocalStore::write_session(&mut w, &bob_c.peer, session);
                this.apply_or_reset(sessions, w)?;
                Ok((n, this.stale.lock().contains(&bob_c.peer)))
            })
        })
    };
    assert_eq!(
        reseal(60_000).await.unwrap(),
        (0, true),
        "held back, remembered"
    );
    assert_eq!(
        reseal(RESEAL_EVERY_MS + 1).await.unwrap(),
        (1, false),
        "sealed again once the period is over"
    );
    let after = store.outbox_entry(q.outbox_key).unwrap().unwrap();
    assert_eq!(after.sealed_on, Some(current), "on the session used now");
    assert_ne!(after.envelope, entry.envelope);
    // Bob's relays come back: the message arrives once.
    for r in &bob.relays {
        net.set_up(r, true);
    }
    alice.engine.deliver_now().await.unwrap();
    let got = bob.sync().await;
    let n = got
        .iter()
        .filter(|r| r.message.text == "waiting for bob's relays")
        .count();
    assert_eq!(n, 1, "{got:?}");
}

#[tokio::test]
async fn a_relay_that_lost_its_data_gets_again_what_it_had_acknowledged() {
    let net = FakeNet::default();
    let alice = User::started(&net, "alice", 1).await;
    let bob = User::started(&net, "bob", 1).await;
    let bob_c = alice.add_contact(&bob);
    let _alice_c = bob.add_contact(&alice);
    alice.regrant().await;
    bob.regrant().await;
    // Bob's one relay acknowledges a message, then loses its data before bob reads it.
    let (first, progress) = alice
        .send(&bob_c, "held only by the relay that fails")
        .await;
    assert_eq!(progress.acked, 1);
    net.wipe_relay(&bob.relays[0]);
    bob.regrant().await; // bob's grants come back (he would grant again after a failed poll)
    // Alice's next put there learns the relay's new store epoch: the first message goes
    // there again, and bob gets both.
    let _ = alice.send(&bob_c, "after the loss").await;
    alice.engine.settle().await.unwrap();
    let got = bob.sync().await;
    let texts: Vec<&str> = got.iter().map(|r| r.message.text.as_str()).collect();
    assert!(
        texts.contains(&"held only by the relay that fails") && texts.contains(&"after the loss"),
        "{texts:?}"
    );
    alice.sync().await;
    assert!(
        alice
            .engine
            .progress(first.outbox_key)
            .await
            .unwrap()
            .is_none(),
        "delivered"
    );
}
