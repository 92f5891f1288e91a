//! Sending and receiving between honest users.

use super::*;

#[tokio::test]
async fn send_relay_receive_receipt_delivered() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    let queued = alice.engine.send_text(&bob_c, "hello bob").await.unwrap();
    assert_eq!(alice.messages(&bob)[0].state, MessageState::Queued);
    let progress = alice
        .engine
        .deliver(queued.outbox_key, true, ATTEMPT_TIMEOUT)
        .await
        .unwrap()
        .unwrap();
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

    // Three relays hold it; bob shows it once.
    let got = bob.sync().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.text, "hello bob");
    assert_eq!(bob.messages(&alice).len(), 1);
    // Deleted from bob's relays after it was stored.
    for r in &bob.relays {
        let mailbox = MailboxId::for_peer(&bob.peer());
        assert!(
            net.relay_store(r)
                .fetch(&mailbox, 0, 10, usize::MAX)
                .unwrap()
                .items
                .is_empty()
        );
    }
    // Bob's receipt travels back; alice sees "delivered" and her outbox empties.
    bob.engine.deliver_due().await.unwrap();
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
    let p = alice
        .engine
        .deliver(q.outbox_key, true, ATTEMPT_TIMEOUT)
        .await
        .unwrap()
        .unwrap();
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
    let (q, p) = alice.send(&bob_c, "wait for me").await;
    assert_eq!(p.acked, 0);
    assert_eq!(alice.messages(&bob)[0].state, MessageState::Queued);
    // Backoff is in place: the next attempt is scheduled in the future.
    let next = alice.engine.next_due_ms().unwrap().unwrap();
    assert!(next > now_ms());
    net.set_up(&bob.relays[2], true);
    alice
        .engine
        .deliver(q.outbox_key, true, ATTEMPT_TIMEOUT)
        .await
        .unwrap();
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
            alice.engine.deliver_due().await.unwrap();
            bob.engine.deliver_due().await.unwrap();
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
    let mut expected: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
    let mut sorted = texts.clone();
    sorted.sort_by_key(|t| t[1..].parse::<u32>().unwrap());
    expected.sort_by_key(|t| t[1..].parse::<u32>().unwrap());
    assert_eq!(sorted, expected, "every message exactly once");
    let alice_in = alice
        .messages(&bob)
        .iter()
        .filter(|m| m.direction == Direction::In)
        .count();
    assert_eq!(alice_in, 4);
    assert!(
        bob.engine
            .store()
            .conversation(&alice.peer())
            .unwrap()
            .gaps
            .missing()
            == 0
    );
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
    let (two, _) = alice.send(&bob_c, "two").await;
    for r in &bob.relays {
        net.set_up(r, true);
    }
    let _ = alice.send(&bob_c, "three").await;
    let got = bob.sync().await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].gaps.ranges(),
        &[(2, 2)],
        "the gap is reported, not hidden"
    );
    // The retry fills it.
    alice
        .engine
        .deliver(two.outbox_key, true, ATTEMPT_TIMEOUT)
        .await
        .unwrap();
    let got = bob.sync().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.text, "two");
    assert_eq!(got[0].gaps.missing(), 0);
}

#[tokio::test]
async fn direct_path_on_the_lan_without_relays() {
    let net = FakeNet::default();
    let alice = User::new(&net, "alice", 0);
    let bob = User::new(&net, "bob", 0);
    let bob_c = alice.add_contact(&bob);
    bob.add_contact(&alice);
    net.inner.lock().direct.insert(bob.peer());
    let (_, p) = alice.send(&bob_c, "no internet here").await;
    assert!(p.direct);
    let inbox = net.inner.lock().direct_inbox.remove(&bob.peer()).unwrap();
    let got = bob.engine.receive(inbox.clone()).await.unwrap();
    assert_eq!(got[0].message.text, "no internet here");
    // The same envelope again (another path) is not shown twice.
    assert!(bob.engine.receive(inbox).await.unwrap().is_empty());
}

#[tokio::test]
async fn outbox_survives_restart_and_delivers_after() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    for r in &bob.relays {
        net.set_up(r, false);
    }
    alice
        .engine
        .send_text(&bob_c, "survive a restart")
        .await
        .unwrap();
    // Restart: drop the engine and reopen the store from disk.
    let User {
        engine,
        card,
        relays,
        _dir,
    } = alice;
    let me = engine.identity().clone();
    drop(engine);
    let store = crate::store::reopen(_dir.path());
    assert_eq!(store.outbox_len(), 1);
    let alice = User {
        engine: Engine::new(store, me, net.clone()),
        card,
        relays,
        _dir,
    };
    for r in &bob.relays {
        net.set_up(r, true);
    }
    let key = alice.engine.store().outbox().unwrap()[0].0;
    alice
        .engine
        .deliver(key, true, ATTEMPT_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(bob.sync().await[0].message.text, "survive a restart");
}

#[tokio::test]
async fn contact_that_lost_its_state_still_gets_every_message() {
    let net = FakeNet::default();
    let (alice, mut bob, bob_c, alice_c) = pair(&net).await;
    // Exchange until both sides seal on an established session.
    converse(&alice, &bob, &bob_c, &alice_c).await;
    assert!(
        alice
            .engine
            .store()
            .session(&bob_c)
            .unwrap()
            .is_established()
    );
    assert!(
        bob.engine
            .store()
            .session(&alice_c)
            .unwrap()
            .is_established()
    );
    // Alice seals on the established session; then bob loses his session states.
    let q = alice
        .engine
        .send_text(&bob_c, "sealed before bob's reset")
        .await
        .unwrap();
    bob.engine
        .store()
        .apply({
            let mut w = WriteSet::default();
            w.remove(TreeId::Sessions, alice.peer().to_bytes());
            w
        })
        .unwrap();
    bob.engine = Engine::new(
        bob.engine.store().clone(),
        bob.engine.identity().clone(),
        net.clone(),
    );
    alice
        .engine
        .deliver(q.outbox_key, true, ATTEMPT_TIMEOUT)
        .await
        .unwrap();
    assert!(bob.sync().await.is_empty(), "bob cannot open it");
    // Bob writes; alice learns of the reset and seals again; bob gets it.
    let (q, _) = bob.send(&alice_c, "I reinstalled").await;
    alice.sync().await;
    alice.engine.deliver_due().await.unwrap();
    let key = alice
        .engine
        .store()
        .outbox()
        .unwrap()
        .into_iter()
        .find(|(_, e)| e.message_id == q.id.0 || e.kind == OutboxKind::Message)
        .map(|(k, _)| k);
    if let Some(key) = key {
        alice
            .engine
            .deliver(key, true, ATTEMPT_TIMEOUT)
            .await
            .unwrap();
    }
    let got = bob.sync().await;
    assert!(
        got.iter()
            .any(|r| r.message.text == "sealed before bob's reset"),
        "{got:?}"
    );
}

#[tokio::test]
async fn an_outbox_pass_leaves_deliveries_in_flight_alone() {
    let net = FakeNet::default();
    let (alice, _bob, bob_c, _) = pair(&net).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    net.inner.lock().gate = Some(gate.clone());
    let q = alice
        .engine
        .send_text(&bob_c, "slow network")
        .await
        .unwrap();
    let sending = {
        let engine = alice.engine.clone();
        tokio::spawn(async move { engine.deliver(q.outbox_key, true, ATTEMPT_TIMEOUT).await })
    };
    tokio::task::yield_now().await;
    // The sender's delivery is waiting on the network: a pass must not start another.
    assert_eq!(alice.engine.deliver_due().await.unwrap(), 0);
    gate.add_permits(100);
    let progress = sending.await.unwrap().unwrap().unwrap();
    assert_eq!(progress.acked, 3);
    assert_eq!(net.inner.lock().puts, 3, "one put per relay, not two");
    // Once it is done, nothing is left claimed: a later pass may pick the entry up.
    assert!(alice.engine.in_flight.lock().is_empty());
}

#[tokio::test]
async fn receipts_wake_the_outbox_instead_of_waiting_for_a_pass() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    alice.send(&bob_c, "hello").await;
    assert_eq!(bob.sync().await.len(), 1);
    // Bob queued a receipt; whoever runs the outbox hears of it at once.
    tokio::time::timeout(Duration::from_secs(1), bob.engine.outbox_queued())
        .await
        .expect("the outbox was woken");
    assert_eq!(bob.engine.deliver_due().await.unwrap(), 1);
    alice.sync().await;
    assert_eq!(alice.messages(&bob)[0].state, MessageState::Delivered);
    // Receiving nothing new wakes nobody.
    bob.sync().await;
    assert!(
        tokio::time::timeout(Duration::from_millis(50), bob.engine.outbox_queued())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn waiting_messages_ask_for_a_direct_path_unless_there_is_one() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    for r in &bob.relays {
        net.set_up(r, false);
    }
    alice.send(&bob_c, "are you there?").await;
    net.inner.lock().sought.clear();
    alice.engine.deliver_due().await.unwrap();
    assert_eq!(net.inner.lock().sought, vec![bob.peer()]);
    // On the LAN: handed over directly, nothing left waiting, nobody sought.
    net.inner.lock().direct.insert(bob.peer());
    net.inner.lock().sought.clear();
    alice.engine.deliver_due().await.unwrap();
    assert!(net.inner.lock().sought.is_empty());
    assert_eq!(alice.messages(&bob)[0].state, MessageState::Delivered);
}

#[tokio::test]
async fn send_and_deliver_reports_progress_and_leaves_the_message_durable() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    let store = alice.engine.store();
    let before = store.write_ticket();
    let (queued, delivery) = alice
        .engine
        .send_text_and_deliver(&bob_c, "hello", ATTEMPT_TIMEOUT)
        .await
        .unwrap();
    // The message's own write is the first after `before`.
    assert!(
        store.is_durable(before + 1),
        "returned before the message was durable"
    );
    assert_eq!(alice.messages(&bob)[0].id, queued.id.0);
    let progress = delivery.await.unwrap().unwrap().unwrap();
    assert_eq!(progress.acked, 3);
    assert_eq!(bob.sync().await[0].message.text, "hello");
}

#[tokio::test]
async fn at_most_the_bound_of_messages_leave_before_they_are_durable() {
    let net = FakeNet::default();
    let (alice, _bob, _, _) = pair(&net).await;
    let store = alice.engine.store();
    let mut w = WriteSet::default();
    w.put(TreeId::Contacts, b"x".to_vec(), b"y".to_vec());
    store.apply(w).unwrap();
    let ticket = store.write_ticket();
    assert!(!store.is_durable(ticket));
    for _ in 0..MAX_UNSAVED_SEALS {
        assert!(alice.engine.claim_unsaved());
        alice.engine.settle_unsaved(ticket);
    }
    assert!(
        !alice.engine.claim_unsaved(),
        "one more would be past what a restart skips"
    );
    store.flush().await.unwrap();
    assert!(store.is_durable(ticket));
    // A place claimed for a message sealed but not written yet stays taken through any
    // flush until its write is named.
    assert!(alice.engine.claim_unsaved(), "places free once durable");
    store.flush().await.unwrap();
    for _ in 1..MAX_UNSAVED_SEALS {
        assert!(alice.engine.claim_unsaved());
    }
    assert!(
        !alice.engine.claim_unsaved(),
        "the unwritten message's place was given away"
    );
}

#[tokio::test]
async fn messages_out_before_a_crash_lost_their_write_do_not_block_later_ones() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, alice_c) = pair(&net).await;
    // Both sides on an established session, so messages carry transport counters.
    converse(&alice, &bob, &bob_c, &alice_c).await;
    let at_crash = alice.engine.store().session(&bob_c).unwrap();
    assert!(at_crash.is_established());
    // As many as may leave before their write is durable reach bob...
    for i in 0..MAX_UNSAVED_SEALS {
        let (_, delivery) = alice
            .engine
            .send_text_and_deliver(&bob_c, &format!("out {i}"), ATTEMPT_TIMEOUT)
            .await
            .unwrap();
        delivery.await.unwrap().unwrap();
    }
    assert_eq!(bob.sync().await.len() as u64, MAX_UNSAVED_SEALS);
    // ...then alice crashes and her session state on disk is the one from before them.
    let mut w = WriteSet::default();
    LocalStore::write_session(&mut w, &bob.peer(), &at_crash);
    alice.engine.store().apply(w).unwrap();
    let restarted = Engine::new(
        alice.engine.store().clone(),
        alice.engine.identity().clone(),
        net.clone(),
    );
    let q = restarted
        .send_text(&bob_c, "after the crash")
        .await
        .unwrap();
    restarted
        .deliver(q.outbox_key, true, ATTEMPT_TIMEOUT)
        .await
        .unwrap();
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
    net.inner.lock().direct.insert(bob.peer());
    // What bob's subscribers see, and whether the store was durable at that moment
    // (this runtime has one thread: the subscriber runs while `receive` waits).
    let mut events = bob.engine.subscribe();
    let store = bob.engine.store().clone();
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        // The write that stored the message: every write so far when it is announced.
        let mut stored = None;
        while let Ok(event) = events.recv().await {
            match event {
                AppEvent::Incoming(r) => {
                    let ticket = *stored.insert(store.write_ticket());
                    seen.push(("incoming", r.message.text, store.is_durable(ticket)));
                }
                AppEvent::Message(r) => {
                    let durable = stored.is_some_and(|t| store.is_durable(t));
                    seen.push(("message", r.message.text, durable));
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
    let inbox = net.inner.lock().direct_inbox.remove(&bob.peer()).unwrap();
    assert_eq!(bob.engine.receive(inbox).await.unwrap().len(), 1);
    assert!(bob.sync().await.is_empty());
    let engine = bob.engine.clone();
    drop(bob);
    drop(engine);
    let seen = seen.await.unwrap();
    assert_eq!(
        seen,
        [
            ("incoming", "once".to_owned(), false),
            ("message", "once".to_owned(), true)
        ],
        "shown from the store before the disk has it, announced durable once"
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
async fn a_direct_handover_is_announced_whoever_delivered_it() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    let mut rx = alice.engine.subscribe();
    // Through the relays only: stored, not handed over.
    let (relayed, p) = alice.send(&bob_c, "via relays").await;
    assert_eq!((p.acked, p.direct), (3, false));
    assert!(handed_over(&mut rx).is_empty());
    // Bob comes onto the LAN with a message waiting; the outbox pass (not the sender)
    // hands over both (the relayed one has no receipt yet), and whoever waits on one
    // learns so from the event, since its entry is gone.
    for r in &bob.relays {
        net.set_up(r, false);
    }
    let waiting = alice.engine.send_text(&bob_c, "on the LAN").await.unwrap();
    net.inner.lock().direct.insert(bob.peer());
    alice.engine.deliver_due().await.unwrap();
    assert_eq!(alice.engine.progress(waiting.outbox_key).unwrap(), None);
    let mut got = handed_over(&mut rx);
    got.sort_by_key(|id| id.0);
    let mut want = vec![relayed.id, waiting.id];
    want.sort_by_key(|id| id.0);
    assert_eq!(got, want);
    // Once each: a later pass finds nothing to hand over.
    alice.engine.deliver_due().await.unwrap();
    assert!(handed_over(&mut rx).is_empty());
}
