use kkachi_protocol::{MessageId, PeerId};

use super::writes::{JOURNAL_KEY, journal_entry};
use super::*;

#[test]
fn a_write_set_cut_short_is_completed_when_the_store_opens() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = WriteSet::default();
    w.put(TreeId::Seen, b"envelope".to_vec(), b"1".to_vec());
    w.put(TreeId::Messages, b"message".to_vec(), b"hello".to_vec());
    w.remove(TreeId::Outbox, b"sent".to_vec());
    {
        let store = LocalStore::open(dir.path()).unwrap();
        let mut sent = WriteSet::default();
        sent.put(TreeId::Outbox, b"sent".to_vec(), b"x".to_vec());
        store.apply(sent).unwrap();
        // What a crash after the set's first key leaves on disk.
        let mut copy = WriteSet::default();
        for (t, k, v) in w.ops() {
            match v {
                Some(v) => copy.put(*t, k.clone(), v.clone()),
                None => copy.remove(*t, k.clone()),
            }
        }
        let on_disk = store.disk_ops(copy.into_ops());
        store
            .journal
            .insert(JOURNAL_KEY, journal_entry(&on_disk))
            .unwrap();
        let (t, k, v) = &on_disk[0];
        store.trees[*t as usize]
            .insert(k, v.clone().unwrap())
            .unwrap();
        store.db.flush().unwrap();
    }
    let store = reopen(dir.path());
    let get = |t: TreeId, k: &[u8]| store.tree(t).get(k).unwrap().map(|v| v.to_vec());
    assert_eq!(get(TreeId::Messages, b"message"), Some(b"hello".to_vec()));
    assert_eq!(get(TreeId::Seen, b"envelope"), Some(b"1".to_vec()));
    assert_eq!(get(TreeId::Outbox, b"sent"), None);
    assert!(
        store.journal.is_empty(),
        "the journal is cleared once applied"
    );
    // And applying sets as usual leaves nothing in the journal.
    store.apply(w).unwrap();
    assert!(store.journal.is_empty());
}

/// The child side of the test below: writes sets of three keys, flushing all the
/// while, until it is killed.
fn write_sets_until_killed(home: &Path) -> ! {
    let store = LocalStore::open(home).unwrap();
    let flusher = store.db.clone();
    std::thread::spawn(move || {
        loop {
            let _ = flusher.flush();
        }
    });
    println!("writing");
    for i in 0u64.. {
        let mut w = WriteSet::default();
        w.put(TreeId::Seen, b"set".to_vec(), i.to_be_bytes().to_vec());
        w.put(TreeId::Messages, i.to_be_bytes().to_vec(), vec![7; 300]);
        w.put(TreeId::Outbox, b"set".to_vec(), i.to_be_bytes().to_vec());
        store.apply(w).unwrap();
    }
    unreachable!("written forever")
}

#[test]
fn write_sets_survive_kill_9_whole_or_not_at_all() {
    use std::io::BufRead;
    if let Some(home) = std::env::var_os("KKACHI_CRASH_CHILD") {
        write_sets_until_killed(Path::new(&home));
    }
    let exe = std::env::current_exe().unwrap();
    let mut checked = 0;
    for round in 0..12u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "store::tests::write_sets_survive_kill_9_whole_or_not_at_all",
            ])
            .args(["--nocapture", "--test-threads", "1"])
            .env("KKACHI_CRASH_CHILD", dir.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("writing") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "the child stopped");
        }
        std::thread::sleep(std::time::Duration::from_millis(30 + 17 * round));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let store = reopen(dir.path());
        let get = |t: TreeId, k: &[u8]| store.tree(t).get(k).unwrap().map(|v| v.to_vec());
        let seen = get(TreeId::Seen, b"set");
        assert_eq!(
            seen,
            get(TreeId::Outbox, b"set"),
            "round {round}: half a set"
        );
        if let Some(last) = seen {
            assert!(
                get(TreeId::Messages, &last).is_some(),
                "round {round}: half a set"
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no round left anything on disk to check");
}

#[test]
fn flush_goes_to_the_disk_only_when_something_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(store.flush()).unwrap();
    assert_eq!(store.disk_flushes(), 0, "nothing written yet");

    let relay: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
    assert!(store.add_relay(&relay).unwrap());
    rt.block_on(store.flush()).unwrap();
    assert_eq!(store.disk_flushes(), 1);
    rt.block_on(store.flush()).unwrap();
    assert_eq!(store.disk_flushes(), 1, "nothing new since the last flush");

    // A clone shares the record (the engine and the network task hold clones).
    let other = store.clone();
    assert!(other.remove_relay(&relay.to_string()).unwrap());
    rt.block_on(store.flush()).unwrap();
    assert_eq!(store.disk_flushes(), 2, "a removal is a write too");

    assert!(other.add_relay(&relay).unwrap());
    rt.block_on(other.flush()).unwrap();
    drop((store, other));
    let reopened = reopen(dir.path());
    assert_eq!(
        reopened.relays().unwrap().len(),
        1,
        "the flushed write is on disk"
    );
}

#[test]
fn identity_profile_relays_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    assert!(store.identity().unwrap().is_none());
    let id = Identity::generate();
    let profile = Profile::new("Jiwoo");
    store.init_identity(&id, &profile).unwrap();
    let a: Multiaddr = format!("/ip4/127.0.0.1/tcp/1/p2p/{}", PeerId::random())
        .parse()
        .unwrap();
    let b: Multiaddr = format!("/ip4/127.0.0.1/tcp/2/p2p/{}", PeerId::random())
        .parse()
        .unwrap();
    assert!(store.add_relay(&b).unwrap());
    assert!(store.add_relay(&a).unwrap());
    assert!(!store.add_relay(&a).unwrap(), "duplicate add");
    store
        .update_relay(&a.to_string(), |r| r.last_ok_ms = Some(42))
        .unwrap();
    drop(store);
    let store = reopen(dir.path());
    assert_eq!(store.identity().unwrap().unwrap().peer_id(), id.peer_id());
    assert_eq!(store.profile().unwrap(), Some(profile));
    let relays = store.relays().unwrap();
    assert_eq!(
        relays.iter().map(|r| r.addr.clone()).collect::<Vec<_>>(),
        vec![b.to_string(), a.to_string()]
    );
    assert_eq!(relays[1].last_ok_ms, Some(42));
    assert!(store.remove_relay(&b.to_string()).unwrap());
    assert_eq!(store.relays().unwrap().len(), 1);
}

#[test]
fn second_open_reports_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _first = LocalStore::open(dir.path()).unwrap();
    assert!(matches!(
        LocalStore::open(dir.path()),
        Err(StoreError::Locked(_))
    ));
}

#[test]
fn write_sets_apply_across_trees() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let peer = PeerId::random();
    let mut w = WriteSet::default();
    let msg = MessageRecord {
        id: [1; 16],
        direction: Direction::Out,
        text: "hi".into(),
        state: MessageState::Queued,
        sent_at_ms: 1,
        stored_at_ms: 1,
        seq: 1,
        prev: [0; 32],
        timer_secs: 0,
        edited: false,
        deleted: false,
        revised_seq: 0,
        reply_to: None,
        reactions: Default::default(),
        file: None,
    };
    LocalStore::write_message(&mut w, &peer, message_key(&peer, 0), &msg);
    LocalStore::write_conversation(
        &mut w,
        &peer,
        &Conversation {
            next_seq: 2,
            ..Default::default()
        },
    );
    store.apply(w).unwrap();
    assert_eq!(store.messages(&peer).unwrap(), vec![msg.clone()]);
    assert_eq!(
        store
            .message(&peer, &MessageId([1; 16]))
            .unwrap()
            .unwrap()
            .1,
        msg
    );
    assert_eq!(store.conversation(&peer).unwrap().next_seq, 2);
}

#[test]
fn long_conversations_read_in_order_across_batches_and_stop_on_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let (peer, other) = (PeerId::random(), PeerId::random());
    let record = |i: u64| MessageRecord {
        id: u128::from(i).to_be_bytes(),
        direction: Direction::In,
        text: format!("m{i}"),
        state: MessageState::Received,
        sent_at_ms: i,
        stored_at_ms: i,
        seq: i + 1,
        prev: [0; 32],
        timer_secs: 0,
        edited: false,
        deleted: false,
        revised_seq: 0,
        reply_to: None,
        reactions: Default::default(),
        file: None,
    };
    let mut w = WriteSet::default();
    for i in 0..1300 {
        LocalStore::write_message(&mut w, &peer, message_key(&peer, i), &record(i));
        LocalStore::write_message(&mut w, &other, message_key(&other, i), &record(i + 5000));
    }
    store.apply(w).unwrap();
    let mut seen = Vec::new();
    store
        .for_each_message(&peer, |m| seen.push(m.sent_at_ms))
        .unwrap();
    assert_eq!(seen, (0..1300).collect::<Vec<u64>>());
    assert_eq!(
        store.recent_messages(&peer, 2).unwrap(),
        vec![record(1298), record(1299)]
    );

    // A damaged record in the middle: an error, and nothing after it.
    store.trees[TreeId::Messages as usize]
        .insert(
            store
                .vault
                .disk_key(TreeId::Messages, &message_key(&peer, 700)),
            &[0xff; 40][..],
        )
        .unwrap();
    let mut count = 0;
    let result = store.for_each_message(&peer, |_| count += 1);
    assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
    assert_eq!(count, 700);
}

#[test]
fn contacts_read_after_a_change_are_the_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let other = store.clone();
    let soyeon = Identity::generate();
    let card = Card::new(&soyeon, "Soyeon", vec![], 1).unwrap();
    assert!(store.contacts().unwrap().is_empty());
    store.add_card(&card).unwrap();
    // Seen through another handle of the same store too.
    assert_eq!(other.contacts().unwrap()[0].name, "Soyeon");
    let mut renamed = other.contact(&soyeon.peer_id()).unwrap().unwrap();
    renamed.name = "Soyeon (work)".into();
    let mut w = WriteSet::default();
    LocalStore::write_contact(&mut w, &renamed);
    // A write that spans trees goes through the journal: still seen.
    LocalStore::write_conversation(&mut w, &soyeon.peer_id(), &Conversation::default());
    other.apply(w).unwrap();
    assert_eq!(store.contacts().unwrap()[0].name, "Soyeon (work)");
    assert_eq!(
        store.contact(&soyeon.peer_id()).unwrap().unwrap().name,
        "Soyeon (work)"
    );
    assert!(store.contact(&PeerId::random()).unwrap().is_none());
}

#[test]
fn states_only_move_forward() {
    let r1 = MessageState::Relayed {
        relayed: 1,
        total: 3,
    };
    let r2 = MessageState::Relayed {
        relayed: 2,
        total: 3,
    };
    assert!(MessageState::Queued.advances_to(&r1));
    assert!(r1.advances_to(&r2));
    assert!(!r2.advances_to(&r1));
    assert!(r2.advances_to(&MessageState::Delivered));
    assert!(!MessageState::Read.advances_to(&MessageState::Delivered));
}

#[test]
fn the_outbox_index_finds_messages_by_contact_and_id_across_a_reopen() {
    use crate::store::{OutboxEntry, OutboxKind};
    let dir = tempfile::tempdir().unwrap();
    let (bob, carol) = (PeerId::random(), PeerId::random());
    let entry = |to: &PeerId, id: u8, kind| OutboxEntry {
        message_id: [id; 16],
        contact: to.to_bytes(),
        kind,
        device: None,
        envelope: vec![0; 64],
        targets: Vec::new(),
        direct_acked: false,
        created_ms: 0,
        sealed_on: None,
        resealed_ms: 0,
        queued_ms: 0,
        content: Vec::new(),
    };
    {
        let store = LocalStore::open(dir.path()).unwrap();
        let mut w = WriteSet::default();
        LocalStore::write_outbox(&mut w, 1, &entry(&bob, 1, OutboxKind::Message));
        LocalStore::write_outbox(&mut w, 2, &entry(&bob, 2, OutboxKind::Message));
        LocalStore::write_outbox(&mut w, 3, &entry(&carol, 1, OutboxKind::Message));
        LocalStore::write_outbox(&mut w, 4, &entry(&bob, 3, OutboxKind::Control));
        store.apply(w).unwrap();
        let ids = [MessageId([1; 16]), MessageId([3; 16]), MessageId([9; 16])];
        assert_eq!(
            store.outbox_keys_for(&bob, &ids, &None),
            [1],
            "messages only, bob's only"
        );
        assert_eq!(store.outbox_keys_of(&bob), [1, 2]);
        let mut w = WriteSet::default();
        w.remove(TreeId::Outbox, 1u64.to_be_bytes().to_vec());
        store.apply(w).unwrap();
        assert!(store.outbox_keys_for(&bob, &ids, &None).is_empty());
        assert_eq!(store.outbox_keys_of(&bob), [2]);
    }
    let store = reopen(dir.path());
    assert_eq!(store.outbox_keys_of(&bob), [2]);
    assert_eq!(store.outbox_keys_of(&carol), [3]);
    assert_eq!(
        store.outbox_keys_for(&carol, &[MessageId([1; 16])], &None),
        [3]
    );
}

#[test]
fn changes_held_for_messages_not_here_yet_stay_small() {
    let mut conv = Conversation::default();
    for i in 0..10u8 {
        conv.hold_revision([i; 16], u64::from(i) + 1, Some("x".repeat(32 << 10)), false);
    }
    let bytes: usize = conv
        .pending_revisions
        .iter()
        .map(|p| p.change.as_ref().map_or(0, String::len))
        .sum();
    assert!(bytes <= MAX_PENDING_REVISION_BYTES, "{bytes}");
    assert_eq!(
        conv.pending_revisions.last().unwrap().id,
        [9; 16],
        "the newest is kept"
    );
    for i in 0..100u8 {
        conv.hold_revision([i; 16], 200 + u64::from(i), None, false);
    }
    assert_eq!(conv.pending_revisions.len(), MAX_PENDING_REVISIONS);
}

#[test]
fn of_two_changes_held_for_one_message_the_later_by_number_stays_and_a_delete_is_final() {
    let mut conv = Conversation::default();
    let id = [7; 16];
    conv.hold_revision(id, 5, Some("newer".into()), false);
    conv.hold_revision(id, 4, Some("older, arrived later".into()), false);
    assert_eq!(conv.pending_revisions.len(), 1);
    assert_eq!(conv.pending_revisions[0].change.as_deref(), Some("newer"));
    conv.hold_revision(id, 3, None, false);
    conv.hold_revision(
        id,
        6,
        Some("later by number, yet after a delete".into()),
        false,
    );
    assert_eq!(conv.pending_revisions[0].change, None, "a delete is final");
    // Applied to the message when it comes, and an older edit after that changes nothing.
    let mut m = MessageRecord {
        id,
        direction: Direction::In,
        text: "first".into(),
        state: MessageState::Received,
        sent_at_ms: 1,
        stored_at_ms: 1,
        seq: 2,
        prev: [0; 32],
        timer_secs: 0,
        edited: false,
        deleted: false,
        revised_seq: 0,
        reply_to: None,
        reactions: Default::default(),
        file: None,
    };
    let mut other = Conversation::default();
    other.hold_revision(id, 9, Some("nine".into()), false);
    other.apply_held_revision(&mut m);
    assert_eq!(
        (m.text.as_str(), m.edited, m.revised_seq),
        ("nine", true, 9)
    );
    assert!(!m.revise_at(8, Some("eight".into())));
    assert_eq!(m.text, "nine");
    assert!(m.revise_at(3, None), "a delete applies whatever its number");
    assert!(!m.revise_at(11, Some("too late".into())));
    assert!(m.deleted && m.text.is_empty());
}

#[test]
fn an_expired_message_not_delivered_yet_leaves_no_text_in_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let bob = PeerId::random();
    let record = MessageRecord {
        id: [4; 16],
        direction: Direction::Out,
        text: "the door code is 4521".into(),
        state: MessageState::Queued,
        sent_at_ms: 1_000,
        stored_at_ms: 1_000,
        seq: 1,
        prev: [0; 32],
        timer_secs: 10,
        edited: false,
        deleted: false,
        revised_seq: 0,
        reply_to: None,
        reactions: Default::default(),
        file: None,
    };
    let entry = OutboxEntry {
        message_id: [4; 16],
        contact: bob.to_bytes(),
        kind: OutboxKind::Message,
        device: None,
        envelope: vec![7; 64],
        targets: Vec::new(),
        direct_acked: false,
        created_ms: 1_000,
        sealed_on: None,
        resealed_ms: 0,
        queued_ms: 1_000,
        content: b"the door code is 4521".to_vec(),
    };
    let mut w = WriteSet::default();
    LocalStore::write_message(&mut w, &bob, message_key(&bob, 0), &record);
    LocalStore::write_outbox(&mut w, 9, &entry);
    store.apply(w).unwrap();
    assert_eq!(store.delete_expired(&bob, 5_000).unwrap().0, 0, "not yet");
    assert!(!store.outbox_entry(9).unwrap().unwrap().content.is_empty());
    assert_eq!(store.delete_expired(&bob, 11_000).unwrap().0, 1);
    let left = store.outbox_entry(9).unwrap().unwrap();
    assert!(left.content.is_empty(), "its text is gone with it");
    assert_eq!(left.envelope, vec![7; 64], "what is sealed still goes");
}

#[test]
fn a_file_offered_by_several_messages_keeps_each_senders_newest_within_a_bound() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let file = kkachi_protocol::file::FileRef {
        key: kkachi_protocol::file::FileKey([1; 32]),
        manifest: kkachi_protocol::file::ChunkId([2; 32]),
        size: 10,
        name: "a.txt".into(),
        mime: String::new(),
        thumbnail: Vec::new(),
    };
    let id = file.id();
    let in_group = GroupSource {
        group: [3; 32],
        epoch: [4; 32],
        queues: vec![("/ip4/127.0.0.1/tcp/1".into(), [5; 32])],
    };
    // Two offers in one write (one batch): both kept, the record named by the first.
    let mut w = WriteSet::default();
    let offer = |w: &mut WriteSet, from: &str, n: u8, at: u64, source: Option<GroupSource>| {
        store
            .offer_incoming_file(w, &file, from.as_bytes().to_vec(), [n; 16], at, source)
            .unwrap()
    };
    offer(&mut w, "mallory", 1, 10, None);
    offer(&mut w, "alice", 2, 20, Some(in_group.clone()));
    store.apply(w).unwrap();
    let record = store.incoming_file(&id).unwrap().unwrap();
    assert_eq!(
        (record.contact.as_slice(), record.message),
        (&b"mallory"[..], [1; 16])
    );
    let offers = store.file_offers(&id).unwrap();
    assert_eq!(offers.len(), 2);
    assert_eq!(offers[1].source, Some(in_group));
    // One sender holds one place, their newest, besides the message the record is
    // named by (never pushed out); past the bound the oldest other goes.
    let named = |offers: &[Offer]| {
        offers
            .iter()
            .any(|o| o.from == b"mallory" && o.message == [1; 16])
    };
    let mut w = WriteSet::default();
    offer(&mut w, "mallory", 1, 25, None);
    for n in 0..3 {
        offer(&mut w, "mallory", 10 + n, 30 + u64::from(n), None);
    }
    store.apply(w).unwrap();
    let offers = store.file_offers(&id).unwrap();
    assert_eq!(offers.len(), 3, "{offers:?}");
    assert!(named(&offers));
    assert_eq!(offers[2].message, [12; 16]);
    let mut w = WriteSet::default();
    for n in 0..MAX_FILE_OFFERS as u8 {
        offer(&mut w, &format!("m{n}"), 50 + n, 100, None);
    }
    store.apply(w).unwrap();
    let offers = store.file_offers(&id).unwrap();
    assert_eq!(offers.len(), MAX_FILE_OFFERS);
    assert!(named(&offers), "the record's own message stays: {offers:?}");
    assert!(offers.iter().all(|o| o.from != b"alice"), "the oldest went");
    // The record and its offers go together.
    let mut w = WriteSet::default();
    LocalStore::remove_file_record(&mut w, &id, true);
    store.apply(w).unwrap();
    assert!(store.file_offers(&id).unwrap().is_empty());
    // Offers left with no record (it went while a message offering it came) are found.
    assert!(store.orphan_file_offers().unwrap().is_empty());
    let mut w = WriteSet::default();
    LocalStore::write_file_offers(&mut w, &id, &offers);
    store.apply(w).unwrap();
    assert_eq!(store.orphan_file_offers().unwrap(), vec![id]);
}
