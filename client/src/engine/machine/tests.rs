//! The decisions with a fake clock: every time is a number of milliseconds.

use proptest::prelude::*;

use super::*;
use crate::store::Target;
use kkachi_protocol::session::MAX_UNSAVED_SEALS;

const T0: u64 = 1_000_000;

fn entry(kind: OutboxKind, contact: PeerId, relays: &[&str]) -> OutboxEntry {
    OutboxEntry {
        message_id: [7; 16],
        contact: contact.to_bytes(),
        device: None,
        envelope: vec![1, 2, 3],
        targets: relays
            .iter()
            .map(|a| Target {
                addr: a.to_string(),
                acked: false,
                attempts: 0,
                next_try_ms: 0,
                write: [1; 32],
                request: None,
                epoch: 0,
            })
            .collect(),
        direct_acked: false,
        kind,
        created_ms: T0,
        sealed_on: None,
        resealed_ms: 0,
        queued_ms: 0,
        content: Vec::new(),
    }
}

fn paths(attempts: &[Attempt]) -> Vec<(u64, Path)> {
    attempts.iter().map(|a| (a.key, a.path.clone())).collect()
}

#[test]
fn due_paths_are_handed_out_once_direct_first() {
    let bob = PeerId::random();
    let mut d = Deliveries::default();
    d.upsert(1, entry(OutboxKind::Message, bob, &["r1", "r2"]));
    d.upsert(2, entry(OutboxKind::Control, bob, &["r1"]));
    d.set_direct([(bob, None)].into());
    let first = d.poll_attempts(T0, 3);
    assert_eq!(
        paths(&first),
        [
            (1, Path::Direct),
            (1, Path::Relay("r1".into())),
            (1, Path::Relay("r2".into()))
        ]
    );
    assert_eq!(first[0].message, Some(MessageId([7; 16])));
    // The rest, and nothing twice while in flight.
    let second = d.poll_attempts(T0, 10);
    assert_eq!(
        paths(&second),
        [(2, Path::Direct), (2, Path::Relay("r1".into()))]
    );
    assert_eq!(
        second[0].message, None,
        "a control record carries no message"
    );
    assert!(d.poll_attempts(T0, 10).is_empty());
    assert_eq!(d.in_flight(), 5);
    assert_eq!(d.next_deadline(), None, "everything is in flight");
}

#[test]
fn acknowledgements_advance_the_message_and_finish_what_is_done() {
    let bob = PeerId::random();
    let mut d = Deliveries::default();
    d.upsert(1, entry(OutboxKind::Message, bob, &["r1", "r2"]));
    let a = d.poll_attempts(T0, 10);
    let r = d.handle_result(&a[0], Outcome::Acked, T0 + 5, 0);
    assert_eq!(
        r.state,
        Some(MessageState::Relayed {
            relayed: 1,
            total: 2
        })
    );
    assert_eq!(r.relay, Some(("r1".into(), Ok(()))));
    assert_eq!(r.progress.unwrap().acked, 1);
    assert!(
        matches!(r.change, Change::Write(_)),
        "a message waits for its receipt"
    );
    // Every relay has it: it waits for the contact, and nothing is due until the reput.
    let r = d.handle_result(&a[1], Outcome::Acked, T0 + 6, 0);
    assert!(matches!(r.change, Change::Write(_)));
    assert_eq!(d.next_deadline(), Some(T0 + REPUT_AFTER_MS + 1));
    // A receipt finishes it (the store removes it); a late answer changes nothing.
    d.remove(1);
    assert!(d.is_empty());
    let late = d.handle_result(&a[0], Outcome::Acked, T0 + 7, 0);
    assert!(late.gone && late.change == Change::Nothing && late.state.is_none());

    // A receipt is done once every relay has it.
    d.upsert(2, entry(OutboxKind::Control, bob, &["r1"]));
    let a = d.poll_attempts(T0, 10);
    let r = d.handle_result(&a[0], Outcome::Acked, T0, 0);
    assert!(r.gone && r.change == Change::Remove && r.state.is_none());
    assert!(d.is_empty());
}

#[test]
fn a_direct_handover_delivers_and_finishes() {
    let bob = PeerId::random();
    let mut d = Deliveries::default();
    d.upsert(1, entry(OutboxKind::Message, bob, &["r1"]));
    d.set_direct([(bob, None)].into());
    let a = d.poll_attempts(T0, 10);
    let r = d.handle_result(&a[0], Outcome::Acked, T0, 0);
    assert_eq!(r.state, Some(MessageState::Delivered));
    assert!(r.handed_over && r.change == Change::Remove && r.relay.is_none());
    // The relay's answer, after: the entry is gone, the handover stands.
    let late = d.handle_result(&a[1], Outcome::Acked, T0, 0);
    assert!(late.gone && late.change == Change::Nothing && !late.handed_over);
    // A refused direct handover is not a delivery.
    d.upsert(2, entry(OutboxKind::Message, bob, &[]));
    let a = d.poll_attempts(T0, 10);
    let r = d.handle_result(&a[0], Outcome::Refused("held".into()), T0, 0);
    assert!(!r.handed_over && r.state.is_none() && matches!(r.change, Change::Write(_)));
}

#[test]
fn failures_back_off_and_a_relay_that_returns_is_tried_at_once() {
    let bob = PeerId::random();
    let mut d = Deliveries::default();
    d.upsert(1, entry(OutboxKind::Message, bob, &["r1", "r2"]));
    let a = d.poll_attempts(T0, 10);
    let r = d.handle_result(&a[0], Outcome::Unreachable("refused".into()), T0, 0);
    assert_eq!(
        r.relay,
        Some(("r1".into(), Err(RelayError::Unreachable("refused".into()))))
    );
    let Change::Write(entry) = r.change else {
        panic!("the entry is kept")
    };
    let t = &entry.targets[0];
    assert_eq!(
        (t.attempts, t.next_try_ms),
        (1, T0 + RETRY.first.as_millis() as u64)
    );
    // Refused by a relay that answered: up, and still backing off.
    let r = d.handle_result(&a[1], Outcome::Refused("quota".into()), T0, 1);
    assert_eq!(r.relay, Some(("r2".into(), Ok(()))));
    assert_eq!(d.next_deadline(), Some(T0 + RETRY.first.as_millis() as u64));
    assert!(d.poll_attempts(T0 + 100, 10).is_empty(), "not due yet");
    // r1 is back: due now; r2 still waits.
    let changed = d.handle_relay_up(|a| a == "r1", T0 + 200);
    assert_eq!(changed.len(), 1);
    assert_eq!(
        paths(&d.poll_attempts(T0 + 200, 10)),
        [(1, Path::Relay("r1".into()))]
    );
    // And everything, when forced.
    assert_eq!(d.handle_force(T0 + 300).len(), 1);
    assert_eq!(
        paths(&d.poll_attempts(T0 + 300, 10)),
        [(1, Path::Relay("r2".into()))]
    );
}

#[test]
fn a_message_no_one_confirmed_is_put_again_after_an_hour() {
    let bob = PeerId::random();
    let mut d = Deliveries::default();
    d.upsert(1, entry(OutboxKind::Message, bob, &["r1"]));
    let a = d.poll_attempts(T0, 10);
    d.handle_result(&a[0], Outcome::Acked, T0, 0);
    assert!(d.poll_reputs(T0 + REPUT_AFTER_MS).is_empty());
    let again = d.poll_reputs(T0 + REPUT_AFTER_MS + 1);
    assert_eq!(again.len(), 1);
    assert!(!again[0].1.targets[0].acked);
    assert_eq!(d.poll_attempts(T0 + REPUT_AFTER_MS + 1, 10).len(), 1);
    // Held while its write is not durable: nothing leaves, nothing is due.
    d.hold(1);
    assert!(d.poll_attempts(u64::MAX, 10).is_empty());
    d.release(1);
    assert_eq!(d.waiting_contacts(), [bob].into());
    d.forget_contact(&bob);
    assert!(d.is_empty());
}

proptest! {
    /// Whatever the answers, every path is eventually acknowledged or waits with a
    /// deadline; nothing is lost from the outbox but what is done.
    #[test]
    fn every_entry_is_done_or_has_a_deadline(answers in proptest::collection::vec(0u8..3, 1..60)) {
        let bob = PeerId::random();
        let mut d = Deliveries::default();
        d.upsert(1, entry(OutboxKind::Control, bob, &["r1", "r2", "r3"]));
        let mut now = T0;
        for (i, answer) in answers.into_iter().enumerate() {
            let due = d.poll_attempts(now, 10);
            for a in due {
                let outcome = match answer {
                    0 => Outcome::Acked,
                    1 => Outcome::Refused("no".into()),
                    _ => Outcome::Unreachable("down".into()),
                };
                d.handle_result(&a, outcome, now, i as u64);
            }
            if d.is_empty() {
                break;
            }
            prop_assert!(d.next_deadline().is_some(), "an entry waits with no deadline");
            now = d.next_deadline().unwrap().max(now);
        }
    }
}

#[test]
fn at_most_the_bound_of_sends_leave_before_they_are_durable() {
    let mut early = EarlySends::default();
    let not_yet = |_| false;
    for ticket in 0..MAX_UNSAVED_SEALS {
        assert!(early.claim(ticket, not_yet));
    }
    assert!(!early.claim(99, not_yet), "every place is taken");
    // Once the first writes are durable, their places are free again.
    for ticket in 100..104 {
        assert!(early.claim(ticket, |t| t < 4));
    }
    assert!(!early.claim(104, |t| t < 4));
}

#[test]
fn inbox_polls_back_off_when_relays_fail() {
    let mut i = Inboxes::default();
    i.set(["r1".to_string(), "r2".to_string()]);
    assert_eq!(i.poll(T0), ["r1", "r2"]);
    assert!(i.poll(T0).is_empty(), "under way");
    assert_eq!(i.next_deadline(), None);
    i.handle_answer("r1", Answer::Items, T0 + 10, 0);
    assert_eq!(
        i.next_deadline(),
        Some(T0 + 10),
        "answered: poll again at once"
    );
    i.handle_answer("r2", Answer::Failed, T0 + 10, 0);
    assert_eq!(i.poll(T0 + 10), ["r1"]);
    assert_eq!(
        i.next_deadline(),
        Some(T0 + 10 + RETRY.first.as_millis() as u64)
    );
    i.handle_relay_up("r2", T0 + 20);
    assert_eq!(i.poll(T0 + 20), ["r2"]);
    i.set(["r2".to_string()]);
    i.handle_answer("r1", Answer::Items, T0 + 30, 0);
    assert_eq!(
        i.next_deadline(),
        None,
        "r1 is no longer ours, r2 is under way"
    );
}

#[test]
fn a_relay_that_answers_empty_at_once_is_not_polled_in_a_loop() {
    let mut i = Inboxes::default();
    i.set(["r1".to_string()]);
    assert_eq!(i.poll(T0), ["r1"]);
    // A long poll that waited out its time: again at once.
    i.handle_answer("r1", Answer::Empty, T0 + 25_000, 0);
    assert_eq!(i.next_deadline(), Some(T0 + 25_000));
    assert_eq!(i.poll(T0 + 25_000), ["r1"]);
    // Empty within milliseconds: not before a second after it was asked.
    i.handle_answer("r1", Answer::Empty, T0 + 25_003, 0);
    assert_eq!(i.next_deadline(), Some(T0 + 25_000 + MIN_POLL_SPACING_MS));
    assert!(i.poll(T0 + 25_500).is_empty());
}

#[test]
fn a_paced_queue_is_read_a_batch_a_second_however_much_waits() {
    let mut i = Inboxes::default();
    i.set(["inbox".to_string(), "requests".to_string()]);
    assert_eq!(i.poll(T0), ["inbox", "requests"]);
    // Both brought a batch: the inbox is read again at once, the requests a second
    // after they were asked.
    i.handle_answer("inbox", Answer::Items, T0 + 5, 0);
    i.handle_answer("requests", Answer::Paced, T0 + 5, 0);
    assert_eq!(i.poll(T0 + 5), ["inbox"]);
    assert!(i.poll(T0 + 999).is_empty());
    assert_eq!(i.poll(T0 + MIN_POLL_SPACING_MS), ["requests"]);
}

#[test]
fn a_contact_refusing_direct_hand_overs_is_retried_with_backoff_not_in_a_loop() {
    let bob = PeerId::random();
    let mut d = Deliveries::default();
    d.upsert(1, entry(OutboxKind::Message, bob, &[]));
    d.set_direct([(bob, None)].into());
    let mut now = T0;
    let mut waits = Vec::new();
    for failures in 1..=6u32 {
        let a = d.poll_attempts(now, 10);
        assert_eq!(paths(&a), [(1, Path::Direct)], "try {failures}");
        let r = d.handle_result(&a[0], Outcome::Refused("not_owner".into()), now, 0);
        assert!(!r.handed_over && r.change != Change::Remove);
        let next = d.next_deadline().expect("a next try");
        assert!(next > now, "the next try waits");
        assert!(d.poll_attempts(now, 10).is_empty(), "nothing again at once");
        waits.push(next - now);
        now = next;
    }
    assert!(
        waits.windows(2).all(|w| w[1] >= w[0]),
        "waits grow: {waits:?}"
    );
    // Asked to send everything now, it goes at once.
    d.handle_force(now);
    assert_eq!(paths(&d.poll_attempts(now, 10)), [(1, Path::Direct)]);
}

#[test]
fn an_answer_for_an_entry_sealed_again_since_changes_nothing() {
    let bob = PeerId::random();
    let mut d = Deliveries::default();
    d.upsert(1, entry(OutboxKind::Message, bob, &["r1"]));
    let old = d.poll_attempts(T0, 10);
    // Sealed again while the old copy travels.
    let mut resealed = entry(OutboxKind::Message, bob, &["r1"]);
    resealed.envelope = vec![9, 9, 9];
    d.upsert(1, resealed);
    let r = d.handle_result(&old[0], Outcome::Acked, T0, 0);
    assert_eq!(r.change, Change::Nothing);
    assert!(!r.gone);
    let again = d.poll_attempts(T0, 10);
    assert_eq!(again.len(), 1, "the new envelope still goes to r1");
    assert_eq!(again[0].envelope, [9, 9, 9]);
}

#[test]
fn with_every_slot_taken_nothing_is_handed_out_and_an_answer_frees_one() {
    let bob = PeerId::random();
    let mut d = Deliveries::default();
    for key in 0..5 {
        d.upsert(key, entry(OutboxKind::Message, bob, &["r1"]));
    }
    let first = d.poll_attempts(T0, 3);
    assert_eq!(first.len(), 3);
    assert_eq!(d.in_flight(), 3);
    assert!(d.poll_attempts(T0, 0).is_empty());
    d.handle_result(&first[0], Outcome::Unreachable("down".into()), T0, 0);
    assert_eq!(d.in_flight(), 2);
    assert_eq!(d.poll_attempts(T0, 1).len(), 1);
}

#[test]
fn entries_naming_no_valid_contact_are_not_scheduled() {
    let mut d = Deliveries::default();
    let mut bad = entry(OutboxKind::Message, PeerId::random(), &["r1"]);
    bad.contact = vec![1, 2, 3];
    assert!(!d.upsert(1, bad));
    assert!(d.is_empty());
    assert_eq!(d.next_deadline(), None);
}

#[test]
fn a_new_store_epoch_makes_what_that_relay_acknowledged_due_again() {
    let peer = PeerId::random();
    let mut m = Deliveries::default();
    for key in 1..=3 {
        assert!(m.upsert(key, entry(OutboxKind::Message, peer, &["r1", "r2"])));
    }
    for a in m.poll_attempts(T0, 100) {
        if a.key == 3 {
            continue;
        }
        if let Path::Relay(relay) = &a.path {
            m.handle_epoch(a.key, relay, 5, T0);
        }
        m.handle_result(&a, Outcome::Acked, T0, 0);
    }
    // The same epoch again changes nothing.
    assert!(m.handle_epoch(3, "r1", 5, T0).is_empty());
    // Another one: entries 1 and 2 are due at r1 again (not at r2).
    let again = m.handle_epoch(3, "r1", 6, T0 + 1);
    let keys: Vec<u64> = again.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    for (_, e) in &again {
        let r1 = e.targets.iter().find(|t| t.addr == "r1").unwrap();
        let r2 = e.targets.iter().find(|t| t.addr == "r2").unwrap();
        assert!(!r1.acked && r1.next_try_ms == T0 + 1);
        assert!(r2.acked, "another relay's acknowledgement stands");
    }
    // No epoch named (a contact's hand-over): nothing.
    assert!(m.handle_epoch(3, "r1", 0, T0).is_empty());
}

#[test]
fn a_relay_naming_a_new_epoch_in_every_answer_gets_everything_again_only_once_a_period() {
    let peer = PeerId::random();
    let mut m = Deliveries::default();
    for key in 1..=2 {
        assert!(m.upsert(key, entry(OutboxKind::Message, peer, &["r1"])));
    }
    for a in m.poll_attempts(T0, 100) {
        m.handle_epoch(a.key, "r1", 5, T0);
        m.handle_result(&a, Outcome::Acked, T0, 0);
    }
    // The answer to entry 1's put names epoch 6: entry 1 was acknowledged under it,
    // entry 2 goes there again.
    let first = m.handle_epoch(1, "r1", 6, T0 + 1);
    assert_eq!(first.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [2]);
    // Acknowledged again under epoch 6, then the relay names 7, 8, ...: nothing more
    // within the period, however often.
    for a in m.poll_attempts(T0 + 2, 100) {
        m.handle_epoch(a.key, "r1", 6, T0 + 2);
        m.handle_result(&a, Outcome::Acked, T0 + 2, 0);
    }
    for e in 7..100 {
        assert!(m.handle_epoch(1, "r1", e, T0 + 3 + e).is_empty());
    }
    // After it, once more.
    assert_eq!(
        m.handle_epoch(1, "r1", 100, T0 + 2 + EPOCH_RESET_EVERY_MS)
            .len(),
        1,
        "entry 2 (entry 1 took the latest epoch with each answer)"
    );
}

#[test]
fn an_envelope_carried_for_someone_else_goes_to_its_relays_only_and_is_done_when_all_have_it() {
    let bob = PeerId::random();
    let mut d = Deliveries::default();
    let mut carried = entry(OutboxKind::Forward, bob, &["r1", "r2"]);
    carried.contact = Vec::new();
    assert!(d.upsert(1, carried), "it names no contact, and needs none");
    // No direct path, whoever is reachable directly; no message state to move.
    d.set_direct([(bob, None)].into());
    let a = d.poll_attempts(T0, 10);
    assert_eq!(
        paths(&a),
        [(1, Path::Relay("r1".into())), (1, Path::Relay("r2".into()))]
    );
    assert!(a.iter().all(|a| a.contact.is_none() && a.message.is_none()));
    assert!(d.waiting_contacts().is_empty());
    // Removing a contact leaves it alone.
    d.forget_contact(&bob);
    assert_eq!(d.len(), 1);
    let r = d.handle_result(&a[0], Outcome::Acked, T0 + 5, 0);
    assert!(matches!(r.change, Change::Write(_)));
    assert_eq!(r.state, None);
    let r = d.handle_result(&a[1], Outcome::Unreachable("down".into()), T0 + 5, 0);
    assert!(!r.gone);
    let again = d.poll_attempts(T0 + 3_600_000, 10);
    assert_eq!(paths(&again), [(1, Path::Relay("r2".into()))]);
    let r = d.handle_result(&again[0], Outcome::Acked, T0 + 3_600_005, 0);
    assert_eq!(r.change, Change::Remove, "every relay has it: done");
    assert!(d.is_empty());
    // Never put again hourly: nobody's receipt is awaited.
    assert_eq!(d.next_deadline(), None);
}

#[test]
fn a_relay_that_stopped_answering_holds_a_few_attempts_and_the_others_go_on() {
    let bob = PeerId::random();
    let mut d = Deliveries::default();
    for key in 0..10 {
        d.upsert(key, entry(OutboxKind::Message, bob, &["cut", "up"]));
    }
    let a = d.poll_attempts(T0, 64);
    let to = |relay: &str| {
        a.iter()
            .filter(|a| a.path == Path::Relay(relay.into()))
            .count()
    };
    assert_eq!(to("cut"), MAX_PER_RELAY, "the rest wait for an answer");
    assert_eq!(to("up"), MAX_PER_RELAY);
    // The live relay's answers free its slots at once; the cut one's never come.
    for attempt in a.iter().filter(|a| a.path == Path::Relay("up".into())) {
        d.handle_result(attempt, Outcome::Acked, T0 + 1, 0);
    }
    assert_eq!(d.next_deadline(), Some(0), "more is due for the live relay");
    let b = d.poll_attempts(T0 + 2, 64);
    assert!(!b.is_empty());
    assert!(
        b.iter().all(|a| a.path == Path::Relay("up".into())),
        "the cut relay's slots are still taken: {:?}",
        paths(&b)
    );
    // Nothing due that cannot start: the loop does not spin.
    let _ = d.poll_attempts(T0 + 3, 64);
    for attempt in b.iter() {
        d.handle_result(attempt, Outcome::Acked, T0 + 4, 0);
    }
    let c = d.poll_attempts(T0 + 5, 64);
    assert!(c.iter().all(|a| a.path == Path::Relay("up".into())));
    for attempt in c.iter() {
        d.handle_result(attempt, Outcome::Acked, T0 + 6, 0);
    }
    assert_eq!(
        d.next_deadline(),
        None,
        "only the cut relay's paths wait, on its slots"
    );
}

#[test]
fn carried_envelopes_wait_behind_our_own_and_a_relay_named_twice_is_tried_once() {
    let bob = PeerId::random();
    let mut d = Deliveries::default();
    for key in 0..4 {
        let mut carried = entry(OutboxKind::Forward, bob, &["r1", "r1"]);
        carried.contact = Vec::new();
        d.upsert(key, carried);
    }
    d.upsert(9, entry(OutboxKind::Message, bob, &["r2"]));
    let a = d.poll_attempts(T0, 64);
    assert_eq!(a[0].key, 9, "our own message first, though newer");
    assert_eq!(
        a.iter().filter(|a| a.contact.is_none()).count(),
        MAX_CARRIED,
        "carried ones get a few slots"
    );
    let first = a.iter().find(|a| a.key == 0).unwrap();
    assert_eq!(
        a.iter().filter(|a| a.key == 0).count(),
        1,
        "r1 is named twice, tried once"
    );
    let r = d.handle_result(first, Outcome::Unreachable("down".into()), T0 + 1, 0);
    let Change::Write(e) = r.change else {
        panic!("the failure is recorded")
    };
    assert!(
        e.targets.iter().all(|t| t.next_try_ms >= T0 + 1 + 2_500),
        "both copies wait, and a carried envelope waits longer than our own: {:?}",
        e.targets
    );
}

#[test]
fn a_contact_whose_relays_swallow_everything_holds_a_share_of_the_slots() {
    let (mallory, bob) = (PeerId::random(), PeerId::random());
    let mut d = Deliveries::default();
    let relays: Vec<String> = (0..8).map(|i| format!("dead{i}")).collect();
    let relays: Vec<&str> = relays.iter().map(String::as_str).collect();
    for key in 0..4 {
        d.upsert(key, entry(OutboxKind::Message, mallory, &relays));
    }
    d.upsert(10, entry(OutboxKind::Message, bob, &["up"]));
    let a = d.poll_attempts(T0, 64);
    let to = |who: PeerId| a.iter().filter(|a| a.contact == Some(who)).count();
    assert_eq!(to(mallory), MAX_PER_CONTACT);
    assert_eq!(to(bob), 1, "bob's message goes though mallory's came first");
    // With mallory's share taken, nothing of his is due: no busy loop.
    let r = d.handle_result(
        a.iter().find(|a| a.contact == Some(bob)).unwrap(),
        Outcome::Acked,
        T0 + 1,
        0,
    );
    assert!(matches!(r.change, Change::Write(_)));
    assert!(d.poll_attempts(T0 + 2, 64).is_empty());
    assert!(
        d.next_deadline().is_none_or(|t| t > T0 + 2),
        "nothing due while mallory's share is taken"
    );
}
