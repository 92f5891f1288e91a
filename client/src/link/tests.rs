//! Handing an account over: what goes, what the old device becomes, and what a
//! transfer broken, tampered with or guessed at leaves behind.

use std::sync::mpsc;

use kkachi_protocol::{Card, Identity, Multiaddr};

use super::*;
use crate::store::{Conversation, Direction, MessageRecord, MessageState, WriteSet, message_key};

pub(super) const MESSAGES: u64 = 1500;

/// A home holding an account with a contact and [`MESSAGES`] messages (some hundreds
/// of KiB: the stream spans many channel messages).
pub(super) fn account(home: &Path) -> (LocalStore, Identity, kkachi_protocol::PeerId) {
    let relay: Multiaddr =
        "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
            .parse()
            .unwrap();
    let (store, me, _) =
        LocalStore::provision(home, "Alice", std::slice::from_ref(&relay)).unwrap();
    let minji = Identity::generate();
    let card = Card::new(&minji, "Minji", vec![relay], 1).unwrap();
    let peer = store.add_card(&card).unwrap().peer;
    let mut w = WriteSet::default();
    for i in 0..MESSAGES {
        let record = MessageRecord {
            id: rand::random(),
            direction: if i % 2 == 0 {
                Direction::In
            } else {
                Direction::Out
            },
            text: format!("message {i}: {}", "가".repeat(80)),
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
        LocalStore::write_message(&mut w, &peer, message_key(&peer, i), &record);
    }
    LocalStore::write_conversation(&mut w, &peer, &Conversation::default());
    store.apply(w).unwrap();
    (store, me, peer)
}

/// Joins with `code` into `home`, showing nothing and never cancelled.
pub(super) fn join_quietly(home: &Path, code: &LinkCode) -> Result<Joined, LinkFailure> {
    join(home, code, "phone", |_, _| {}, &JoinState::default())
}

fn loopback() -> Vec<SocketAddr> {
    vec!["127.0.0.1:0".parse().unwrap()]
}

/// Offers the account in `store` on loopback for a minute, on a thread: the code, the
/// offer's result, and what it saw, as they come.
fn offered(
    store: &LocalStore,
) -> (
    LinkCode,
    std::thread::JoinHandle<Result<Handed, LinkFailure>>,
    mpsc::Receiver<Seen>,
) {
    let offer = Offer::new(&loopback(), &[]).unwrap();
    let code = offer.code().clone();
    let (tx, rx) = mpsc::channel();
    let store = store.clone();
    let handle = std::thread::spawn(move || {
        offer.serve(
            &store,
            Duration::from_secs(60),
            |_, _| true,
            |seen| {
                let _ = tx.send(seen);
            },
        )
    });
    (code, handle, rx)
}

#[test]
fn the_device_with_the_code_joins_the_account_beside_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let (store, me, peer) = account(&dir.path().join("old"));
    let (code, server, seen) = offered(&store);
    let new_home = dir.path().join("new");
    let started = Instant::now();
    let joined = join_quietly(&new_home, &code).expect("joins");
    let took = started.elapsed();
    let handed = server.join().unwrap().expect("lists it");
    println!(
        "{MESSAGES} messages went to the new device in {} ms ({} records)",
        took.as_millis(),
        joined.restored.counts.records
    );
    assert!(matches!(seen.try_recv(), Ok(Seen::Sending(_))));
    assert!(handed.confirmed, "the new home said it is in place");
    assert_eq!(joined.restored.name, "Alice");
    assert_eq!(joined.restored.peer, me.peer_id());
    assert_eq!(joined.restored.counts.messages, MESSAGES);
    let counted = |c: &Counts| (c.records, c.contacts, c.messages);
    assert_eq!(counted(&joined.restored.counts), counted(&handed.counts));
    assert!(joined.restored.new_key);
    // The new device: the same account, a key of its own, listed beside the old one
    // under the name it gave, on both.
    let new = LocalStore::open(&new_home).unwrap();
    let them = new.identity().unwrap().unwrap();
    assert_eq!(them.peer_id(), me.peer_id());
    assert_ne!(them.x25519_public(), me.x25519_public());
    assert_eq!(them.x25519_public(), handed.to);
    assert_eq!(joined.restored.session_key, handed.to);
    assert_eq!(handed.name, "phone");
    let set = new.own_devices(&them).unwrap().expect("a device set");
    assert_eq!(set.device(&handed.to).map(|d| d.name()), Some("phone"));
    assert!(set.device(&me.x25519_public()).is_some());
    let old_set = store.own_devices(&me).unwrap().expect("a device set");
    assert_eq!(old_set.device(&handed.to).map(|d| d.name()), Some("phone"));
    assert!(old_set.device(&me.x25519_public()).is_some());
    let messages = new.messages(&peer).unwrap();
    assert_eq!(messages.len() as u64, MESSAGES);
    assert!(messages[7].text.starts_with("message 7: 가"));
    assert_eq!(
        new.acting_identity().unwrap().unwrap().peer_id(),
        me.peer_id()
    );
    // The old device still acts for the account: both do.
    assert_eq!(store.handed_over().unwrap(), None);
    assert_eq!(
        store.acting_identity().unwrap().unwrap().x25519_public(),
        me.x25519_public()
    );
    assert_eq!(new.handed_over().unwrap(), None);
}

#[test]
fn a_wrong_code_gets_nothing_and_the_right_one_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = account(&dir.path().join("old"));
    let (code, server, seen) = offered(&store);
    // Same address, another secret: a guess, or a stale code.
    let guess = LinkCode::generate(&mut rand_core::OsRng, code.addrs().to_vec(), None).unwrap();
    let new_home = dir.path().join("new");
    let err = join_quietly(&new_home, &guess).unwrap_err();
    assert!(
        matches!(err, LinkFailure::Code(LinkError::Handshake)),
        "{err}"
    );
    assert!(!new_home.exists(), "a failed join leaves no home");
    assert!(matches!(
        seen.recv_timeout(Duration::from_secs(10)),
        Ok(Seen::WrongCode(_))
    ));
    assert_eq!(store.handed_over().unwrap(), None);
    // Junk, and a connection that closes at once: dropped, the offer goes on.
    let mut junk = TcpStream::connect(code.addrs()[0]).unwrap();
    junk.write_all(&[0, LINK_FIRST_LEN as u8]).unwrap();
    junk.write_all(&[0x41; LINK_FIRST_LEN]).unwrap();
    assert!(matches!(
        seen.recv_timeout(Duration::from_secs(10)),
        Ok(Seen::WrongCode(_))
    ));
    drop(TcpStream::connect(code.addrs()[0]).unwrap());
    join_quietly(&new_home, &code).expect("the right code still works");
    server.join().unwrap().expect("hands over");
}

/// A connection to `to` from the loopback address `from` (127.0.0.0/8).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect(&to.into()).unwrap();
    socket.into()
}

#[test]
fn wrong_codes_silent_and_trickling_connections_neither_stop_nor_hold_up_the_offer() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = account(&dir.path().join("old"));
    let (code, server, seen) = offered(&store);
    for _ in 0..20 {
        let guess = LinkCode::generate(&mut rand_core::OsRng, code.addrs().to_vec(), None).unwrap();
        let _ = join_quietly(&dir.path().join("new"), &guess);
    }
    // From other hosts: connections that say nothing, more than one address may hold
    // at once, and one that trickles a message in a byte at a time.
    let silent: Vec<TcpStream> = (0..MAX_CHECKING_PER_ADDRESS + 3)
        .map(|_| connect_from("127.0.0.2", code.addrs()[0]))
        .collect();
    let mut trickle = connect_from("127.0.0.3", code.addrs()[0]);
    trickle.write_all(&[0, LINK_FIRST_LEN as u8, 1]).unwrap();
    // A recorded first message sent again, with no hello it could seal after it.
    let (_, recorded) = code.join(&mut rand_core::OsRng);
    let mut replay = connect_from("127.0.0.4", code.addrs()[0]);
    let mut conn = Conn::new(replay.try_clone().unwrap()).unwrap();
    conn.write(&recorded).unwrap();
    let answer = conn.read(Duration::from_secs(5)).unwrap();
    assert_eq!(answer.len(), LINK_ANSWER_LEN);
    conn.write(&[0x5a; LINK_HELLO_LEN]).unwrap();
    // Were it queued behind them, its own handshake would run out first and fail.
    let started = Instant::now();
    join_quietly(&dir.path().join("new"), &code).expect("the right code still works");
    let took = started.elapsed();
    let handed = server.join().unwrap().expect("hands over");
    let seen: Vec<Seen> = seen.try_iter().collect();
    let wrong = seen
        .iter()
        .filter(|s| matches!(s, Seen::WrongCode(_)))
        .count();
    let sending = seen
        .iter()
        .filter(|s| matches!(s, Seen::Sending(_)))
        .count();
    println!(
        "{wrong} connections without the code; the device with it took the account in {} ms",
        took.as_millis()
    );
    // The 20 guesses, the replay and the silent ones past the limit were dropped; only
    // the device with the code was sent anything.
    assert!(wrong >= 20 + 1 + 3, "{seen:?}");
    assert_eq!(sending, 1, "{seen:?}");
    assert!(handed.confirmed);
    // The replayed handshake got nothing after its answer.
    replay
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = replay.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{} bytes sent to a replay", rest.len());
    drop((silent, trickle));
}

#[test]
fn a_joiner_gone_after_it_was_listed_leaves_it_listed_but_unconfirmed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = account(&dir.path().join("old"));
    let (code, server, _seen) = offered(&store);
    let (conn, channel, _) = connect(&code, &JoinState::default()).unwrap();
    let mut input = Opening::new(conn, channel);
    crate::backup::read_contents(&mut input, "test", |_| Ok(())).unwrap();
    let key = Identity::generate().x25519_public();
    let mut ready = vec![READY];
    ready.extend_from_slice(&key);
    ready.push(6);
    ready.extend_from_slice(b"tablet");
    let msg = input.channel.seal(&ready).unwrap();
    input.conn.write(&msg).unwrap();
    let done = input.conn.read(Duration::from_secs(10)).unwrap();
    assert_eq!(input.channel.open(&done).unwrap(), [DONE]);
    drop(input);
    let handed = server.join().unwrap().expect("listed");
    assert_eq!(handed.to, key);
    assert!(!handed.confirmed, "the new home never said it is in place");
    // Listed (its user takes it out if it holds nothing), and the old device acts on.
    let me = store.acting_identity().unwrap().unwrap();
    let set = store.own_devices(&me).unwrap().unwrap();
    assert_eq!(set.device(&key).map(|d| d.name()), Some("tablet"));
    assert_eq!(store.handed_over().unwrap(), None);
}

#[test]
fn a_code_nobody_uses_runs_out_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = account(&dir.path().join("old"));
    let offer = Offer::new(&loopback(), &[]).unwrap();
    let err = offer
        .serve(&store, Duration::from_millis(200), |_, _| true, |_| {})
        .unwrap_err();
    assert!(matches!(err, LinkFailure::TimedOut(_)), "{err}");
    assert!(store.acting_identity().unwrap().is_some());
}

#[test]
fn a_joiner_that_never_says_it_holds_the_account_takes_nothing_from_the_old_device() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = account(&dir.path().join("old"));
    let (code, server, seen) = offered(&store);
    // It reads the whole account, then hangs up (or says something else).
    // A name the rules refuse (a control character), or none, lists nothing either.
    let mut bad_name = vec![READY];
    bad_name.extend_from_slice(&[7; 32]);
    bad_name.extend_from_slice(&[2, b'a', 0x07]);
    let mut no_name = vec![READY];
    no_name.extend_from_slice(&[7; 32]);
    // Nor a key the account holds already (this device's).
    let mut ours = vec![READY];
    ours.extend_from_slice(&store.identity().unwrap().unwrap().x25519_public());
    ours.extend_from_slice(&[5, b'p', b'h', b'o', b'n', b'e']);
    for last in [
        None,
        Some(vec![READY, 1, 2, 3]),
        Some(vec![DONE]),
        Some(bad_name),
        Some(no_name),
        Some(ours),
    ] {
        let (conn, channel, _) = connect(&code, &JoinState::default()).unwrap();
        let mut input = Opening::new(conn, channel);
        let (counts, ending) =
            crate::backup::read_contents(&mut input, "test", |_| Ok(())).unwrap();
        assert_eq!(ending, Ending::Whole);
        assert_eq!(counts.messages, MESSAGES);
        if let Some(last) = last {
            let msg = input.channel.seal(&last).unwrap();
            input.conn.write(&msg).unwrap();
        }
        drop(input);
        match seen.recv_timeout(Duration::from_secs(10)) {
            Ok(Seen::Sending(_)) => {}
            other => panic!("{other:?}"),
        }
        match seen.recv_timeout(Duration::from_secs(10)) {
            Ok(Seen::BrokeOff(_, why)) => println!("the old device saw: {why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(store.handed_over().unwrap(), None);
        let me = store.acting_identity().unwrap().unwrap();
        assert!(
            store
                .own_devices(&me)
                .unwrap()
                .is_none_or(|set| set.device(&[7; 32]).is_none()),
            "nothing listed"
        );
    }
    // The code still holds.
    join_quietly(&dir.path().join("new"), &code).expect("joins");
    server.join().unwrap().expect("hands over");
}

/// Plays the old device for `code` with `send` (called with the channel and the
/// connection once the handshake is done), on a thread.
fn fake_linker(
    code: &LinkCode,
    send: impl FnOnce(&mut Channel, &mut Conn) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let listener = TcpListener::bind(code.addrs()[0]).unwrap();
    let code = code.clone();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut conn = Conn::new(stream).unwrap();
        let first = conn.read(Duration::from_secs(10)).unwrap();
        let (answered, answer) = code.answer(&first).unwrap();
        conn.write(&answer).unwrap();
        let hello = conn.read(Duration::from_secs(10)).unwrap();
        let mut channel = answered.hello(&hello).unwrap();
        send(&mut channel, &mut conn);
    })
}

/// A free loopback address for a code.
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// What `dir` holds besides the old device's home: what a join left behind.
fn beside_old(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "old")
        .collect()
}

/// The whole stream of the account in `home`, as the old device would send it.
fn stream_of(store: &LocalStore) -> Vec<u8> {
    let mut bytes = Vec::new();
    crate::backup::write_contents(store, &mut bytes, |e| BackupError::Io(e.to_string())).unwrap();
    bytes
}

#[test]
fn a_transfer_cut_short_altered_or_unconfirmed_leaves_no_home() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = account(&dir.path().join("old"));
    let stream = stream_of(&store);
    assert!(stream.len() > 4 * MAX_LINK_CHUNK, "{} bytes", stream.len());
    type Play = Box<dyn FnOnce(&mut Channel, &mut Conn, Vec<u8>) + Send>;
    let plays: Vec<(&str, Play)> = vec![
        (
            "closed after",
            Box::new(|ch, conn, s| {
                for chunk in s[..s.len() / 2].chunks(MAX_LINK_CHUNK) {
                    conn.write(&ch.seal(chunk).unwrap()).unwrap();
                }
            }),
        ),
        (
            "tampered with",
            Box::new(|ch, conn, s| {
                for (i, chunk) in s.chunks(MAX_LINK_CHUNK).enumerate() {
                    let mut msg = ch.seal(chunk).unwrap();
                    if i == 2 {
                        msg[100] ^= 1;
                    }
                    conn.write(&msg).unwrap();
                }
            }),
        ),
        (
            "not a kkachi account",
            Box::new(|ch, conn, _| {
                conn.write(&ch.seal(&[]).unwrap()).unwrap();
            }),
        ),
        (
            "not a kkachi account",
            Box::new(|ch, conn, _| {
                conn.write(
                    &ch.seal(b"kkachi-backup\x02\0\0\0\0\0\0\0\0\x05\0\0\0\0\0\0\0")
                        .unwrap(),
                )
                .unwrap();
            }),
        ),
        (
            "did not confirm it handed the account over (the other device closed",
            Box::new(|ch, conn, s| {
                for chunk in s.chunks(MAX_LINK_CHUNK) {
                    conn.write(&ch.seal(chunk).unwrap()).unwrap();
                }
                let ready = ch
                    .open(&conn.read(Duration::from_secs(10)).unwrap())
                    .unwrap();
                assert_eq!(ready[0], READY);
                // Hangs up instead of confirming.
            }),
        ),
        (
            "did not confirm it handed the account over",
            Box::new(|ch, conn, s| {
                for chunk in s.chunks(MAX_LINK_CHUNK) {
                    conn.write(&ch.seal(chunk).unwrap()).unwrap();
                }
                let _ = conn.read(Duration::from_secs(10)).unwrap();
                conn.write(&ch.seal(&[DONE, 0]).unwrap()).unwrap();
            }),
        ),
    ];
    for (what, play) in plays {
        let code = LinkCode::generate(&mut rand_core::OsRng, vec![free_addr()], None).unwrap();
        let bytes = stream.clone();
        let linker = fake_linker(&code, move |ch, conn| play(ch, conn, bytes));
        let home = dir.path().join("new");
        let err = join_quietly(&home, &code).unwrap_err().to_string();
        assert!(err.contains(what), "expected {what:?}: {err}");
        assert!(!home.exists(), "{what}: no home is left behind");
        assert_eq!(beside_old(dir.path()), Vec::<String>::new(), "{what}");
        linker.join().unwrap();
    }
}

#[test]
fn a_device_that_sends_without_end_is_stopped_before_the_disk_fills() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = account(&dir.path().join("old"));
    let mut stream = stream_of(&store);
    // Everything but the end record, then messages without end.
    stream.truncate(stream.len() - 9);
    let code = LinkCode::generate(&mut rand_core::OsRng, vec![free_addr()], None).unwrap();
    let linker = fake_linker(&code, move |ch, conn| {
        for chunk in stream.chunks(MAX_LINK_CHUNK) {
            conn.write(&ch.seal(chunk).unwrap()).unwrap();
        }
        let value = vec![7u8; 60_000];
        for i in 0u64.. {
            let mut record = vec![5u8];
            record.extend_from_slice(&16u16.to_be_bytes());
            record.extend_from_slice(&(value.len() as u32).to_be_bytes());
            record.extend_from_slice(&[i.to_be_bytes(), i.to_be_bytes()].concat());
            record.extend_from_slice(&value);
            let sent = ch
                .seal(&record)
                .map_err(std::io::Error::other)
                .and_then(|msg| conn.write(&msg));
            if sent.is_err() {
                // The joiner hung up.
                return;
            }
        }
    });
    // This disk keeps what it has now, less 40 MiB, free: the joiner stops past that.
    let free = crate::backup::free_bytes(dir.path()).expect("the disk says what is free");
    let reserve = free.saturating_sub(40 << 20);
    crate::backup::TEST_RESERVE.with(|r| r.set(reserve));
    let home = dir.path().join("new");
    let err = join_quietly(&home, &code).unwrap_err().to_string();
    crate::backup::TEST_RESERVE.with(|r| r.set(crate::backup::DISK_RESERVE));
    println!("a device sending without end, with 40 MiB to spare: {err}");
    assert!(err.contains("needs more room than this disk has"), "{err}");
    let taken: u64 = err
        .split(" records (")
        .nth(1)
        .and_then(|s| s.split(" MiB").next()?.parse().ok())
        .expect("the error says how much came");
    // Stopped within a set (8 MiB) of half the room there was, counted as it came.
    assert!(taken <= 28, "{taken} MiB taken in: {err}");
    assert!(!home.exists(), "no home is left behind");
    linker.join().unwrap();
    // What the stopped join wrote is gone again.
    assert_eq!(beside_old(dir.path()), Vec::<String>::new());
}

#[test]
fn a_home_that_holds_an_account_is_not_joined_into() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = account(&dir.path().join("old"));
    let (_other, _, _) = account(&dir.path().join("taken"));
    drop(_other);
    let (code, server, seen) = offered(&store);
    // The store just closed may hold its lock a moment longer (its flusher lets go in
    // the background): a home held is refused too, but the case here is the identity.
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        let err = join_quietly(&dir.path().join("taken"), &code)
            .unwrap_err()
            .to_string();
        if !err.contains("does not open") || Instant::now() > deadline {
            break err;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(err.contains("already holds an identity"), "{err}");
    // Refused before connecting: the old device saw no one.
    assert!(seen.recv_timeout(Duration::from_millis(300)).is_err());
    join_quietly(&dir.path().join("new"), &code).expect("joins");
    server.join().unwrap().expect("hands over");
}

#[test]
fn a_code_lists_the_lan_first_and_never_loopback_unless_alone() {
    let ips: Vec<IpAddr> = [
        "203.0.113.9",
        "127.0.0.1",
        "169.254.3.4",
        "192.168.7.20",
        "fe80::1",
        "fd00::7",
        "192.168.7.20",
        "::1",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let want: Vec<IpAddr> = ["192.168.7.20", "169.254.3.4", "203.0.113.9", "fd00::7"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(ordered(&ips), want);
    // An unspecified address is listened on as given, and named by the interfaces.
    let offer = Offer::new(&["0.0.0.0:0".parse().unwrap()], &ips).unwrap();
    let addrs = offer.code().addrs();
    let v4: Vec<IpAddr> = addrs.iter().map(|a| a.ip()).collect();
    assert_eq!(v4, &want[..3]);
    assert!(addrs.iter().all(|a| a.port() != 0));
    assert!(!offer.loopback_only());
    // Loopback named: this machine only.
    let offer = Offer::new(&loopback(), &ips).unwrap();
    assert!(offer.loopback_only());
    // No network: this machine only, and it says so.
    let offer = Offer::new(&["0.0.0.0:0".parse().unwrap()], &[]).unwrap();
    assert!(offer.code().addrs()[0].ip().is_loopback());
    assert!(offer.loopback_only());
    let offer = Offer::new(&[], &[]).unwrap();
    assert!(offer.loopback_only());
}

#[test]
fn a_device_its_user_does_not_confirm_gets_nothing_and_both_ends_show_one_number() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = account(&dir.path().join("old"));
    let offer = Offer::new(&loopback(), &[]).unwrap();
    let code = offer.code().clone();
    let (asked_tx, asked) = mpsc::channel::<String>();
    let (seen_tx, seen) = mpsc::channel();
    let served = store.clone();
    // The user declines the first device, then confirms the next.
    let mut answers = [false, true].into_iter();
    let server = std::thread::spawn(move || {
        offer.serve(
            &served,
            Duration::from_secs(60),
            |_, number| {
                let _ = asked_tx.send(number.to_string());
                answers.next().unwrap()
            },
            |s| {
                let _ = seen_tx.send(s);
            },
        )
    });
    let home = dir.path().join("new");
    let mut shown = String::new();
    let err = join(
        &home,
        &code,
        "phone",
        |_, number| shown = number.to_string(),
        &JoinState::default(),
    )
    .unwrap_err();
    assert!(matches!(err, LinkFailure::NotAccepted), "{err}");
    assert_eq!(asked.recv().unwrap(), shown, "both ends show one number");
    assert!(!home.exists());
    assert!(matches!(
        seen.recv_timeout(Duration::from_secs(10)),
        Ok(Seen::Declined(_))
    ));
    assert_eq!(store.handed_over().unwrap(), None);
    let mut second = String::new();
    join(
        &home,
        &code,
        "phone",
        |_, number| second = number.to_string(),
        &JoinState::default(),
    )
    .expect("joins");
    assert_eq!(asked.recv().unwrap(), second);
    assert_ne!(second, shown, "another handshake, another number");
    server.join().unwrap().expect("hands over");
}

#[test]
fn what_a_cut_off_join_staged_goes_and_only_that_homes() {
    let dir = tempfile::tempdir().unwrap();
    let make = |name: &str| {
        let path = dir.path().join(name);
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("key"), b"secret").unwrap();
        path
    };
    let ours = make(".kkachi-restoring-a-Xy3k9QzA");
    let other_home = make(".kkachi-restoring-a-b-Xy3k9QzA");
    let longer = make(".kkachi-restoring-a-Xy3k9QzAb");
    crate::backup::remove_staging(&dir.path().join("a"));
    assert!(!ours.exists(), "the staging of home a goes");
    assert!(other_home.exists(), "home a-b's stays");
    assert!(longer.exists(), "a name that only starts like it stays");
}

#[test]
fn a_second_restore_or_join_into_one_home_waits_for_none_and_harms_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("new");
    let staged = crate::backup::restore_with(&home, |staging| -> Result<_, BackupError> {
        std::fs::write(staging.join("half"), b"half an account").unwrap();
        // Meanwhile another restore or join of the same home starts.
        let second = crate::backup::restore_with(&home, |_| -> Result<(), BackupError> {
            panic!("the second one must not stage anything")
        })
        .expect_err("refused while the first runs");
        assert!(
            second.to_string().contains("another restore or join"),
            "{second}"
        );
        assert!(
            staging.join("half").exists(),
            "the first's staging is untouched"
        );
        Ok(staging.to_path_buf())
    })
    .expect("the first one goes on and is placed");
    assert!(!staged.exists() && home.join("half").exists(), "placed");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        vec!["new".to_string()],
        "no lock file or staging left"
    );
}

#[test]
fn sources_are_counted_by_address_or_ipv6_64_and_the_oldest_is_cut_off_when_full() {
    let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
    let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
    let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
    assert_eq!(source(a), source(b), "one /64");
    assert_ne!(source(a), source(c));
    let v4: IpAddr = "192.168.1.7".parse().unwrap();
    assert_eq!(source(v4), v4);

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap();
    // Both ends of a fresh loopback connection: ours, and the other side's.
    let pair = || {
        let theirs = TcpStream::connect(to).unwrap();
        let (ours, _) = listener.accept().unwrap();
        (ours, theirs)
    };
    let checking = Checking::default();
    // One /64 may have only so many checked at once.
    let from_a = SocketAddr::new(a, 1);
    let from_b = SocketAddr::new(b, 2);
    let mut held = Vec::new();
    for _ in 0..MAX_CHECKING_PER_ADDRESS {
        let (ours, theirs) = pair();
        assert!(checking.admit(from_a, &ours).is_some());
        held.push((ours, theirs));
    }
    let (ours, _theirs) = pair();
    assert!(checking.admit(from_b, &ours).is_none(), "the same /64");
    // From many sources: past the most checked at once, the oldest is cut off.
    for i in 0..MAX_CHECKING - MAX_CHECKING_PER_ADDRESS {
        let (ours, theirs) = pair();
        let from = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 0, (i / 250) as u8, i as u8)),
            9,
        );
        assert!(checking.admit(from, &ours).is_some());
        held.push((ours, theirs));
    }
    let (ours, _theirs2) = pair();
    assert!(checking.admit(SocketAddr::new(c, 3), &ours).is_some());
    // The oldest (the first from `a`) was shut: its other side reads the end.
    let oldest_theirs = &mut held[0].1;
    oldest_theirs
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(oldest_theirs.read(&mut byte).unwrap(), 0, "cut off");
    // And a slot freed is taken again.
    checking.release(0, from_a);
    let (ours, _theirs3) = pair();
    assert!(
        checking.admit(from_b, &ours).is_some(),
        "a slot of the /64 freed"
    );
}
