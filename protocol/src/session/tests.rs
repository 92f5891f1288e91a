//! Session tests: the happy path, then thousands of messages through a hostile network
//! (duplication, reordering, loss), replays, tampering, restarts and rekeying.

use std::collections::{BTreeMap, HashSet};

use rand_core::RngCore;

use super::*;
use crate::session::SESSION_TAG_LEN;
use crate::{TestRng, test_rng};

const T0: u64 = 1_750_000_000;

struct Peer {
    me: Identity,
    card: Card,
    session: Session,
}

fn card_of(me: &Identity) -> Card {
    Card::new(me, "Peer", vec![], 1).unwrap()
}

impl Peer {
    fn pair(seed: u64) -> (Peer, Peer) {
        let a = Identity::generate_with(&mut test_rng(seed));
        let b = Identity::generate_with(&mut test_rng(seed + 1));
        let sa = Session::with_instance(b.x25519_public(), seed.to_be_bytes());
        let sb = Session::with_instance(a.x25519_public(), (seed + 1).to_be_bytes());
        (
            Peer {
                card: card_of(&a),
                me: a,
                session: sa,
            },
            Peer {
                card: card_of(&b),
                me: b,
                session: sb,
            },
        )
    }

    fn seal(&mut self, body: &[u8], now: u64, rng: &mut TestRng) -> Vec<u8> {
        self.session
            .seal(&self.me, &self.card, body, now, rng)
            .unwrap()
    }

    fn open(&mut self, packet: &[u8], now: u64) -> Result<Opened, SessionError> {
        match open(&self.me, packet)? {
            Incoming::Init(init) => {
                assert_eq!(init.remote_static(), self.session.remote());
                self.session.accept_init(&self.me, init, now)
            }
            Incoming::Transport(t) => self
                .session
                .open_transport(&self.me, &t, now)
                .unwrap_or(Err(SessionError::Crypto)),
        }
    }

    /// Simulates a restart: the stored state is all that survives.
    fn restart(&mut self) {
        let bytes = self.session.encode();
        self.session = Session::decode(&bytes).unwrap();
    }
}

const KIND_INIT: u8 = 1;
const KIND_TRANSPORT: u8 = 2;

/// What `packet` is to its recipient `to`: nobody else can tell.
fn kind(to: &Identity, packet: &[u8]) -> u8 {
    match open(to, packet).unwrap() {
        Incoming::Init(_) => KIND_INIT,
        Incoming::Transport(_) => KIND_TRANSPORT,
    }
}

#[test]
fn first_message_then_reply_then_transport_both_ways() {
    let (mut a, mut b) = Peer::pair(10);
    let mut rng = test_rng(1);
    let p1 = a.seal(b"hello bob", T0, &mut rng);
    assert_eq!(kind(&b.me, &p1), KIND_INIT);
    assert_eq!(b.open(&p1, T0).unwrap().body, b"hello bob");
    assert!(
        !b.session.is_established(),
        "responder waits for confirmation"
    );

    let p2 = b.seal(b"hi alice", T0 + 1, &mut rng);
    assert_eq!(
        kind(&a.me, &p2),
        KIND_INIT,
        "bob has no confirmed session yet"
    );
    assert_eq!(a.open(&p2, T0 + 1).unwrap().body, b"hi alice");
    assert!(a.session.is_established(), "alice read bob's answer");

    let p3 = a.seal(b"now with forward secrecy", T0 + 2, &mut rng);
    assert_eq!(kind(&b.me, &p3), KIND_TRANSPORT);
    assert_eq!(
        b.open(&p3, T0 + 2).unwrap().body,
        b"now with forward secrecy"
    );
    assert!(b.session.is_established());

    // Bob's own first message was answered too, so one more round settles both sides
    // on the highest-ranked session.
    let p4 = b.seal(b"transport back", T0 + 3, &mut rng);
    assert_eq!(kind(&a.me, &p4), KIND_TRANSPORT);
    assert_eq!(a.open(&p4, T0 + 3).unwrap().body, b"transport back");
    assert_eq!(a.session.current_id(), b.session.current_id());
    let p5 = a.seal(b"settled", T0 + 4, &mut rng);
    assert_eq!(b.open(&p5, T0 + 4).unwrap().body, b"settled");
    assert_eq!(a.session.current_id(), b.session.current_id());
}

#[test]
fn a_transport_packet_names_its_session_to_its_recipient_alone() {
    let (mut a, mut b) = Peer::pair(12);
    let mut rng = test_rng(12);
    settle(&mut a, &mut b, T0, &mut rng);
    let tag = |p: &[u8]| -> [u8; SESSION_TAG_LEN] { p[1..1 + SESSION_TAG_LEN].try_into().unwrap() };
    let (p1, p2) = (a.seal(b"one", T0, &mut rng), a.seal(b"two", T0, &mut rng));
    assert_eq!(kind(&b.me, &p1), KIND_TRANSPORT);
    assert_ne!(tag(&p1), tag(&p2), "every packet carries its own tag");
    let expected = b.session.expected_tags(64);
    assert!(expected.contains(&tag(&p1)) && expected.contains(&tag(&p2)));
    // A third party holding neither key expects none of them.
    let (_, c) = Peer::pair(13);
    assert!(!c.session.expected_tags(64).contains(&tag(&p1)));
    // Received, a tag is no longer expected; the window moves on.
    b.open(&p1, T0).unwrap();
    b.open(&p2, T0).unwrap();
    let after = b.session.expected_tags(64);
    assert!(!after.contains(&tag(&p1)) && !after.contains(&tag(&p2)));
    let p3 = a.seal(b"three", T0, &mut rng);
    assert!(after.contains(&tag(&p3)));
    // Counters lost for good (a sender's crash skips some) do not hold the window back.
    for _ in 0..300 {
        a.seal(b"never delivered", T0, &mut rng);
    }
    let far = a.seal(b"far ahead of the gap", T0, &mut rng);
    assert!(!b.session.expected_tags(64).contains(&tag(&far)));
    let p4 = a.seal(b"just after it", T0, &mut rng);
    b.open(&far, T0).unwrap();
    assert!(b.session.expected_tags(64).contains(&tag(&p4)));
    // A tag changed in transit fails authentication.
    let mut bad = a.seal(b"four", T0, &mut rng);
    bad[2] ^= 1;
    assert!(b.open(&bad, T0).is_err());
}

/// Exchanges messages until both sides seal on the same session.
fn settle(a: &mut Peer, b: &mut Peer, now: u64, rng: &mut TestRng) {
    for _ in 0..4 {
        b.open(&a.seal(b"settle", now, rng), now).unwrap();
        a.open(&b.seal(b"settle", now, rng), now).unwrap();
    }
    assert!(a.session.is_established());
    assert_eq!(a.session.current_id(), b.session.current_id());
}

#[test]
fn packets_handed_out_before_their_state_was_saved_do_not_repeat_after_a_restart() {
    for resume in [true, false] {
        let (mut a, mut b) = Peer::pair(30);
        let mut rng = test_rng(3);
        settle(&mut a, &mut b, T0, &mut rng);
        // What was durable when Alice crashed...
        let saved = a.session.encode();
        // ...after which she handed out as many packets as she may without saving.
        for i in 0..MAX_UNSAVED_SEALS {
            let p = a.seal(format!("unsaved {i}").as_bytes(), T0 + 1, &mut rng);
            assert_eq!(
                b.open(&p, T0 + 1).unwrap().body,
                format!("unsaved {i}").as_bytes()
            );
        }
        a.session = Session::decode(&saved).unwrap();
        if resume {
            a.session.resume_after_restart();
        }
        let after = a.seal(b"after the crash", T0 + 2, &mut rng);
        assert_eq!(kind(&b.me, &after), KIND_TRANSPORT);
        let opened = b.open(&after, T0 + 2);
        if resume {
            assert_eq!(opened.unwrap().body, b"after the crash");
        } else {
            assert!(
                matches!(opened, Err(SessionError::Replay)),
                "without the skip the counter repeats and the message is refused"
            );
        }
    }
}

#[test]
fn resuming_near_the_counter_limit_falls_back_to_a_fresh_handshake() {
    let (mut a, mut b) = Peer::pair(40);
    let mut rng = test_rng(4);
    settle(&mut a, &mut b, T0, &mut rng);
    a.session.current.as_mut().unwrap().next_send = MAX_COUNTERS - 1;
    a.session.resume_after_restart();
    let p = a.seal(b"fresh", T0 + 1, &mut rng);
    assert_eq!(kind(&b.me, &p), KIND_INIT);
    assert_eq!(b.open(&p, T0 + 1).unwrap().body, b"fresh");
}

#[test]
fn duplicates_are_replays_and_tampering_fails() {
    let (mut a, mut b) = Peer::pair(20);
    let mut rng = test_rng(2);
    let p1 = a.seal(b"one", T0, &mut rng);
    b.open(&p1, T0).unwrap();
    assert!(matches!(b.open(&p1, T0), Err(SessionError::Replay)));
    let reply = b.seal(b"ack", T0, &mut rng);
    a.open(&reply, T0).unwrap();
    let p2 = a.seal(b"two", T0, &mut rng);
    assert_eq!(kind(&b.me, &p2), KIND_TRANSPORT);

    // Flip every byte position in turn: nothing opens, and the original still does.
    for i in 0..p2.len() {
        let mut t = p2.clone();
        t[i] ^= 0x40;
        assert!(b.open(&t, T0).is_err(), "tampered byte {i} accepted");
    }
    assert_eq!(b.open(&p2, T0).unwrap().body, b"two");
    assert!(matches!(b.open(&p2, T0), Err(SessionError::Replay)));

    // Tampered first messages fail too.
    let p3 = b.seal(b"x", T0, &mut rng);
    let mut init = a.seal(b"init", T0, &mut rng);
    let _ = p3;
    init.truncate(2);
    assert!(b.open(&init, T0).is_err());
}

#[test]
fn a_third_key_cannot_open_anything() {
    let (mut a, mut b) = Peer::pair(30);
    let eve = Identity::generate_with(&mut test_rng(99));
    let mut eve_session = Session::new(a.me.x25519_public());
    let mut rng = test_rng(3);
    let init = a.seal(b"secret", T0, &mut rng);
    let Incoming::Transport(not_for_eve) = open(&eve, &init).unwrap() else {
        panic!("eve opened a first message")
    };
    assert!(eve_session.open_transport(&eve, &not_for_eve, T0).is_none());
    b.open(&init, T0).unwrap();
    a.open(&b.seal(b"r", T0, &mut rng), T0).unwrap();
    let t = a.seal(b"secret 2", T0, &mut rng);
    let Incoming::Transport(t) = open(&eve, &t).unwrap() else {
        panic!("transport expected")
    };
    assert!(eve_session.open_transport(&eve, &t, T0).is_none());
}

#[test]
fn first_message_from_someone_else_is_wrong_peer() {
    let (mut a, _b) = Peer::pair(40);
    let (mut c, _) = Peer::pair(50);
    let mut rng = test_rng(4);
    // c seals to a; a's session is with b.
    c.session = Session::new(a.me.x25519_public());
    let p = c.seal(b"hi", T0, &mut rng);
    let Incoming::Init(init) = open(&a.me, &p).unwrap() else {
        panic!("init expected")
    };
    assert_eq!(init.remote_static(), &c.me.x25519_public());
    assert!(matches!(
        a.session.accept_init(&a.me, init, T0),
        Err(SessionError::WrongPeer)
    ));
}

#[test]
fn rekey_changes_keys_and_old_messages_still_open() {
    let (mut a, mut b) = Peer::pair(60);
    let mut rng = test_rng(5);
    settle(&mut a, &mut b, T0, &mut rng);
    let first = a.session.current_id().unwrap();
    let generation = a.session.generation();

    // A day later alice's next message carries a rekey offer.
    let later = T0 + REKEY_AFTER_SECS + 1;
    let offer_carrier = a.seal(b"4", later, &mut rng);
    let late_old = a.seal(b"late under old keys", later, &mut rng);
    b.open(&offer_carrier, later).unwrap();
    // Bob answers inside his next transport message; alice completes the rekey.
    a.open(&b.seal(b"5", later, &mut rng), later).unwrap();
    let second = a.session.current_id().unwrap();
    assert_ne!(first, second, "keys must change after a re-handshake");
    assert_eq!(a.session.generation(), generation + 1);
    // Alice now seals under the new keys; bob confirms on receipt.
    b.open(&a.seal(b"6", later, &mut rng), later).unwrap();
    assert_eq!(b.session.current_id(), Some(second));
    // A message sealed under the old keys and delivered late still opens.
    assert_eq!(
        b.open(&late_old, later).unwrap().body,
        b"late under old keys"
    );
    // The replaced sessions keep their receive keys only: no send key survives them.
    assert!(!a.session.retired.is_empty() && !b.session.retired.is_empty());
    for s in a.session.retired.iter().chain(&b.session.retired) {
        assert_eq!(*s.send_key, [0; 32], "a retired session kept its send key");
    }
    // Once nothing can still be in flight, the old keys are erased.
    let much_later = later + RETAIN_SECS + 10;
    b.open(&a.seal(b"7", much_later, &mut rng), much_later)
        .unwrap();
    assert!(
        b.session.retired.is_empty(),
        "old keys kept past their lifetime"
    );
}

#[test]
fn rekey_after_message_count() {
    let (mut a, mut b) = Peer::pair(70);
    let mut rng = test_rng(6);
    settle(&mut a, &mut b, T0, &mut rng);
    let first = a.session.current_id();
    for i in 0..REKEY_AFTER_MESSAGES + 5 {
        let p = a.seal(&i.to_be_bytes(), T0, &mut rng);
        b.open(&p, T0).unwrap();
        if i % 50 == 0 {
            a.open(&b.seal(b"ack", T0, &mut rng), T0).unwrap();
        }
    }
    a.open(&b.seal(b"ack", T0, &mut rng), T0).unwrap();
    assert_ne!(a.session.current_id(), first);
}

#[test]
fn state_survives_restart_mid_conversation() {
    let (mut a, mut b) = Peer::pair(80);
    let mut rng = test_rng(7);
    b.open(&a.seal(b"1", T0, &mut rng), T0).unwrap();
    a.restart(); // pending handshake lost: alice cannot read bob's answer...
    b.restart();
    let r = b.seal(b"2", T0, &mut rng);
    assert_eq!(
        a.open(&r, T0).unwrap().body,
        b"2",
        "...but still reads the message"
    );
    // ...and the next exchange establishes a session all the same.
    b.open(&a.seal(b"3", T0, &mut rng), T0).unwrap();
    a.open(&b.seal(b"4", T0, &mut rng), T0).unwrap();
    assert!(a.session.is_established());
    a.restart();
    let p = a.seal(b"5", T0, &mut rng);
    assert_eq!(kind(&b.me, &p), KIND_TRANSPORT);
    b.restart();
    assert_eq!(b.open(&p, T0).unwrap().body, b"5");
    assert!(
        matches!(b.open(&p, T0), Err(SessionError::Replay)),
        "replay window persisted"
    );
    b.restart();
    assert!(matches!(b.open(&p, T0), Err(SessionError::Replay)));
}

#[test]
fn simultaneous_first_messages_converge_on_one_session() {
    for seed in 0..20 {
        let (mut a, mut b) = Peer::pair(100 + seed * 2);
        let mut rng = test_rng(seed);
        let pa = a.seal(b"a1", T0, &mut rng);
        let pb = b.seal(b"b1", T0, &mut rng);
        a.open(&pb, T0).unwrap();
        b.open(&pa, T0).unwrap();
        for round in 0..4 {
            let pa = a.seal(format!("a{round}").as_bytes(), T0, &mut rng);
            let pb = b.seal(format!("b{round}").as_bytes(), T0, &mut rng);
            a.open(&pb, T0).unwrap();
            b.open(&pa, T0).unwrap();
        }
        assert!(a.session.is_established() && b.session.is_established());
        assert_eq!(
            a.session.current_id(),
            b.session.current_id(),
            "seed {seed}"
        );
    }
}

#[test]
fn peer_that_lost_its_state_gets_a_fresh_session() {
    let (mut a, mut b) = Peer::pair(90);
    let mut rng = test_rng(8);
    settle(&mut a, &mut b, T0, &mut rng);
    let old = b.session.current_id();
    // Bob seals on the session both hold; then alice reinstalls from an identity
    // backup and her session with bob is gone, so she cannot open it.
    let sealed_before_reset = b.seal(b"sealed before the reset", T0, &mut rng);
    a.session = Session::new(b.me.x25519_public());
    assert!(a.open(&sealed_before_reset, T0).is_err());
    // Her first message tells bob: he stops sealing on the old session...
    let opened = b.open(&a.seal(b"fresh", T0, &mut rng), T0).unwrap();
    assert!(
        opened.peer_reset,
        "bob must learn that alice lost her state"
    );
    // ...so what he seals now (his answer inside) alice can open, and a new session forms.
    let resealed = b.seal(b"sealed again", T0, &mut rng);
    assert_eq!(a.open(&resealed, T0).unwrap().body, b"sealed again");
    settle(&mut a, &mut b, T0, &mut rng);
    assert_ne!(b.session.current_id(), old);
}

#[test]
fn a_peer_that_rotated_its_static_key_gets_a_fresh_session_under_the_new_key() {
    let (mut a, mut b) = Peer::pair(95);
    let mut rng = test_rng(9);
    settle(&mut a, &mut b, T0, &mut rng);
    let old = b.session.current_id();
    let old_key = a.me.x25519_public();
    // Bob seals on the old session; alice rotates: a new static key, a new card, and
    // every session state of hers dropped.
    let in_flight = b.seal(b"sealed before the rotation", T0, &mut rng);
    a.me = a.me.with_new_session_key(&mut rng);
    let new_card = Card::new(&a.me, "Peer", vec![], 2).unwrap();
    assert!(new_card.rotates(&a.card) && !new_card.supersedes(&a.card));
    a.card = new_card;
    a.session = Session::new(b.me.x25519_public());
    assert!(a.open(&in_flight, T0).is_err(), "her old session is gone");
    // Her first message is sealed with the new key: bob learns it from the card it
    // carries, takes it, and the message opens as from a peer that lost its state.
    let first = a.seal(b"my new key", T0, &mut rng);
    let Incoming::Init(init) = open(&b.me, &first).unwrap() else {
        panic!("a first message");
    };
    assert_ne!(init.remote_static(), &old_key);
    assert_eq!(init.remote_static(), a.card.identity().x25519());
    // Before bob takes the new key, the message is not his contact's.
    assert!(matches!(
        b.session.accept_init(&b.me, init, T0),
        Err(SessionError::WrongPeer)
    ));
    let Incoming::Init(init) = open(&b.me, &first).unwrap() else {
        panic!("a first message");
    };
    b.session.peer_rotated(*init.remote_static(), T0);
    assert!(
        !b.session.is_established(),
        "bob stops sealing on the old session"
    );
    let opened = b.session.accept_init(&b.me, init, T0).unwrap();
    assert_eq!(opened.body, b"my new key");
    // What bob seals now opens at alice's, and a new session forms under her new key.
    let again = b.seal(b"sealed again", T0, &mut rng);
    assert_eq!(a.open(&again, T0).unwrap().body, b"sealed again");
    settle(&mut a, &mut b, T0, &mut rng);
    assert!(a.session.is_established() && b.session.is_established());
    assert_ne!(b.session.current_id(), old);
    let later = b.seal(b"after", T0 + 1, &mut rng);
    assert_eq!(a.open(&later, T0 + 1).unwrap().body, b"after");
}

#[test]
fn oversized_body_is_refused() {
    let (mut a, _) = Peer::pair(110);
    let err = a
        .session
        .seal(
            &a.me,
            &a.card,
            &vec![0; MAX_SEALED_BODY + 1],
            T0,
            &mut test_rng(9),
        )
        .unwrap_err();
    assert!(matches!(err, SessionError::BodyTooLarge(_)));
}

#[test]
fn first_message_too_old_is_refused() {
    let (mut a, mut b) = Peer::pair(120);
    let p = a.seal(b"old", T0, &mut test_rng(10));
    assert!(matches!(
        b.open(&p, T0 + RETAIN_SECS + 1),
        Err(SessionError::TooOld)
    ));
}

/// One direction of a lossy, duplicating, reordering network.
struct Link {
    in_flight: Vec<(u64, Vec<u8>)>,
}

/// Thousands of messages both ways through duplication, reordering and loss, with
/// restarts and clock steps that force rekeys: every packet that arrives opens exactly
/// once, duplicates are reported as replays, and nothing that arrives fails to open
/// but a packet under a session its receiver erased after the grace, which the sender
/// then seals again (as the client does for what the peer has not confirmed).
#[test]
fn hostile_network_exactly_once() {
    let expired: u64 = (0..6u64).map(|seed| run_hostile(seed, 3000)).sum();
    assert!(
        expired > 0,
        "the runs must outlive some retired session's grace"
    );
}

/// Runs one hostile exchange; returns how many packets arrived after their session was
/// erased.
fn run_hostile(seed: u64, messages: u64) -> u64 {
    let (mut a, mut b) = Peer::pair(1000 + seed * 2);
    let mut rng = test_rng(seed);
    let mut links = [Link { in_flight: vec![] }, Link { in_flight: vec![] }];
    let mut sent = 0u64;
    let mut opened: [HashSet<u64>; 2] = [HashSet::new(), HashSet::new()];
    let mut lost: [HashSet<u64>; 2] = [HashSet::new(), HashSet::new()];
    let mut duplicates_seen = 0;
    let mut now = T0;
    let mut next_id = 0u64;
    let mut ids_by_packet: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    // The session each packet was sealed under (None: a first message).
    let mut sealed_under: BTreeMap<Vec<u8>, Option<[u8; 32]>> = BTreeMap::new();
    let mut expired = 0;
    type Under = BTreeMap<Vec<u8>, Option<[u8; 32]>>;
    let seal = |peer: &mut Peer, id: u64, now: u64, rng: &mut TestRng, under_map: &mut Under| {
        let sendable = peer
            .session
            .current
            .as_ref()
            .is_some_and(Established::usable_for_sending);
        let under = sendable.then(|| peer.session.current_id().unwrap());
        let packet = peer.seal(&id.to_be_bytes(), now, rng);
        under_map.insert(packet.clone(), under);
        packet
    };
    while sent < messages || links.iter().any(|l| !l.in_flight.is_empty()) {
        let roll = rng.next_u32() % 100;
        let dir = (rng.next_u32() % 2) as usize;
        if roll < 35 && sent < messages {
            let peer = if dir == 0 { &mut a } else { &mut b };
            let id = next_id;
            next_id += 1;
            let packet = seal(peer, id, now, &mut rng, &mut sealed_under);
            ids_by_packet.insert(packet.clone(), id);
            links[dir].in_flight.push((id, packet));
            sent += 1;
        } else if roll < 38 {
            // Loss (only while traffic continues, so answers eventually get through).
            if sent < messages && !links[dir].in_flight.is_empty() {
                let i = rng.next_u32() as usize % links[dir].in_flight.len();
                let (id, _) = links[dir].in_flight.swap_remove(i);
                lost[dir].insert(id);
            }
        } else if roll < 39 {
            let peer = if dir == 0 { &mut a } else { &mut b };
            peer.restart();
        } else if roll < 40 {
            now += REKEY_AFTER_SECS / 3;
        } else if !links[dir].in_flight.is_empty() {
            // Deliver a random in-flight packet (reordering); sometimes keep a copy.
            let i = rng.next_u32() as usize % links[dir].in_flight.len();
            let (id, packet) = if rng.next_u32().is_multiple_of(10) {
                links[dir].in_flight[i].clone()
            } else {
                links[dir].in_flight.swap_remove(i)
            };
            let receiver = if dir == 0 { &mut b } else { &mut a };
            match receiver.open(&packet, now) {
                Ok(o) => {
                    assert_eq!(o.body, id.to_be_bytes(), "seed {seed}: wrong body");
                    assert!(
                        opened[dir].insert(id),
                        "seed {seed}: message {id} opened twice"
                    );
                }
                Err(SessionError::Replay) => {
                    assert!(
                        opened[dir].contains(&id),
                        "seed {seed}: replay of unseen {id}"
                    );
                    duplicates_seen += 1;
                }
                Err(SessionError::Crypto)
                    if sealed_under[&packet].is_some_and(|s| !receiver.session.holds(&s)) =>
                {
                    // Its session was erased: sealed again (only if it is still
                    // unconfirmed; a copy of one already opened is just dropped).
                    expired += 1;
                    if !opened[dir].contains(&id) {
                        let sender = if dir == 0 { &mut a } else { &mut b };
                        let again = seal(sender, id, now, &mut rng, &mut sealed_under);
                        ids_by_packet.insert(again.clone(), id);
                        links[dir].in_flight.push((id, again));
                    }
                }
                Err(e) => panic!("seed {seed}: message {id} failed to open: {e}"),
            }
        }
    }

    for id in 0..next_id {
        let dir = usize::from(opened[1].contains(&id) || lost[1].contains(&id));
        assert!(
            opened[dir].contains(&id) || lost[dir].contains(&id),
            "seed {seed}: message {id} neither delivered nor dropped by the network"
        );
    }
    assert!(duplicates_seen > 0, "the test must exercise duplicates");
    assert!(a.session.is_established() && b.session.is_established());
    assert!(
        a.session.generation() > 1,
        "seed {seed}: the run must exercise rekeying"
    );
    assert!(
        ids_by_packet.len() as u64 >= sent,
        "every packet is distinct"
    );
    expired
}

#[test]
fn burst_of_late_first_messages_never_strands_the_used_session() {
    // Alice sends many first messages before any answer; bob answers them in a
    // scrambled order; alice's transport must always open at bob.
    for seed in 0..30u64 {
        let (mut a, mut b) = Peer::pair(5000 + seed * 2);
        let mut rng = test_rng(seed);
        let mut inits: Vec<Vec<u8>> = (0..20u8).map(|i| a.seal(&[i], T0, &mut rng)).collect();
        // Bob sees a few of the newest, answers, alice completes one.
        let k = (seed % 5) as usize + 1;
        for p in inits.split_off(inits.len() - k) {
            b.open(&p, T0).unwrap();
        }
        a.open(&b.seal(b"answer", T0, &mut rng), T0).unwrap();
        let t = a.seal(b"transport", T0, &mut rng);
        assert_eq!(
            kind(&b.me, &t),
            KIND_TRANSPORT,
            "seed {seed}: alice completed the handshake"
        );
        // The remaining first messages arrive late, in scrambled order.
        while !inits.is_empty() {
            let i = rng.next_u32() as usize % inits.len();
            b.open(&inits.swap_remove(i), T0).unwrap();
        }
        assert_eq!(b.open(&t, T0).unwrap().body, b"transport", "seed {seed}");
    }
}

/// A first message from `p` proposing `generation`, with `card` as the sender's card.
fn init_with(p: &mut Peer, generation: u32, card: &Card, body: &[u8], now: u64) -> Vec<u8> {
    let frame = InitFrame {
        generation,
        seq: p.session.next_offer_seq,
        instance: p.session.instance,
        sent_at: now,
        answer: None,
        card: card.encode(),
        body: body.to_vec(),
    };
    p.session
        .seal_init_frame(&p.me, &frame, now, &mut test_rng(now))
        .unwrap()
}

#[test]
fn a_first_message_names_its_sender_both_ways() {
    let (mut a, b) = Peer::pair(600);
    let mut rng = test_rng(60);
    let p = a.seal(b"hello", T0, &mut rng);
    let Incoming::Init(init) = open(&b.me, &p).unwrap() else {
        panic!("init expected")
    };
    assert_eq!(init.sender_card(), &a.card);
    assert_eq!(init.sender_card().identity().peer_id(), a.me.peer_id());
    assert_eq!(init.body(), b"hello");

    // Mallory pairs her identity key with alice's X25519 key in a card she signs:
    // valid on its own, but she cannot seal with alice's key, and alice's messages
    // carry alice's card.
    let mallory = Identity::generate_with(&mut test_rng(61));
    let forged =
        crate::fuzzing::forged_card(&mallory, a.me.x25519_public(), "Aid Station", vec![], 1);
    assert!(
        Card::decode(&forged.encode()).is_ok(),
        "the forgery verifies alone"
    );
    // Alice presenting someone else's card (or anyone presenting a card whose key is
    // not the one they seal with) is refused.
    let other = card_of(&Identity::generate_with(&mut test_rng(62)));
    let p = init_with(&mut a, 1, &other, b"who am I", T0);
    assert!(matches!(open(&b.me, &p), Err(SessionError::CardMismatch)));
    // Sealing with a card that is not ours is refused before anything leaves.
    let mut fresh = Session::new(b.me.x25519_public());
    assert!(matches!(
        fresh.seal(&a.me, &forged, b"x", T0, &mut rng),
        Err(SessionError::CardMismatch)
    ));
}

#[test]
fn proposals_at_the_end_of_the_generation_range_are_not_answered() {
    let (mut a, mut b) = Peer::pair(610);
    let mut rng = test_rng(61);
    // Mallory-as-alice proposes the last generation: the message opens, no session.
    let card = a.card.clone();
    let p = init_with(&mut a, u32::MAX, &card, b"pushy", T0);
    assert_eq!(b.open(&p, T0).unwrap().body, b"pushy");
    assert!(b.session.offered.is_empty(), "not answered");
    let p = init_with(&mut a, MAX_FIRST_GENERATION + 1, &card, b"still pushy", T0);
    assert_eq!(b.open(&p, T0).unwrap().body, b"still pushy");
    assert!(b.session.offered.is_empty(), "not answered");
    // Honest proposals still are, and the sessions they start rekey as usual.
    settle(&mut a, &mut b, T0, &mut rng);
    let g = b.session.generation();
    assert!((1..=2).contains(&g), "generation {g}");
    let p = init_with(&mut a, g + MAX_GENERATION_STEP + 1, &card, b"jump", T0 + 1);
    assert_eq!(b.open(&p, T0 + 1).unwrap().body, b"jump");
    assert!(
        b.session
            .offered
            .iter()
            .all(|o| o.session.rank.generation <= g + MAX_GENERATION_STEP),
        "a jump past the step is not answered"
    );
    let later = T0 + REKEY_AFTER_SECS + 10;
    settle(&mut a, &mut b, later, &mut rng);
    settle(&mut b, &mut a, later + 1, &mut rng);
    assert!(b.session.generation() > g, "rekeying moved on");
}

#[test]
fn a_first_message_below_the_floor_is_opened_late_without_touching_the_session() {
    let (mut a, mut b) = Peer::pair(620);
    let mut rng = test_rng(62);
    let old = a.seal(b"waited a long time", T0, &mut rng);
    // Thousands of newer first messages have raised the floor past it.
    b.session.seen_inits.raise_floor(T0 + 5);
    let opened = b.open(&old, T0 + 10).unwrap();
    assert_eq!(opened.body, b"waited a long time");
    assert!(opened.late && !opened.peer_reset);
    assert!(
        b.session.offered.is_empty(),
        "a late message is not answered"
    );
    // Expired for good is still refused.
    let (mut c, mut d) = Peer::pair(630);
    let p = c.seal(b"ancient", T0, &mut rng);
    assert!(matches!(
        d.open(&p, T0 + RETAIN_SECS + 1),
        Err(SessionError::TooOld)
    ));
}

#[test]
fn the_largest_first_message_fits_an_envelope() {
    use crate::card::MAX_NAME_LEN;
    use crate::envelope::MAX_PAYLOAD_LEN;
    let (mut a, mut b) = Peer::pair(640);
    let peer = a.me.peer_id();
    let host = "r".repeat(200);
    let relays = (0..crate::card::MAX_RELAYS)
        .map(|i| {
            format!("/dns4/{host}/tcp/{}/p2p/{peer}", 4000 + i)
                .parse()
                .unwrap()
        })
        .collect();
    a.card = Card::new(&a.me, &"😀".repeat(MAX_NAME_LEN / 4), relays, u64::MAX).unwrap();
    // The largest first message also carries an answer: b wrote first.
    let mut rng = test_rng(64);
    a.open(&b.seal(b"x", T0, &mut rng), T0).unwrap();
    let big = a.seal(&vec![7; MAX_SEALED_BODY], T0, &mut rng);
    assert_eq!(kind(&b.me, &big), KIND_INIT);
    assert!(
        big.len() <= MAX_PAYLOAD_LEN,
        "{} > {MAX_PAYLOAD_LEN}",
        big.len()
    );
    assert_eq!(b.open(&big, T0).unwrap().body.len(), MAX_SEALED_BODY);
}

#[test]
fn a_replaced_session_opens_packets_only_briefly_once_the_peer_sent_on_the_new_one() {
    let (mut a, mut b) = Peer::pair(700);
    let mut rng = test_rng(70);
    settle(&mut a, &mut b, T0, &mut rng);
    let old = a.session.current_id();
    // Sealed under the first session and still on their way.
    let late1 = a.seal(b"late 1", T0 + 1, &mut rng);
    let late2 = a.seal(b"late 2", T0 + 1, &mut rng);
    let from_b = b.seal(b"from bob, late", T0 + 1, &mut rng);
    // A day later alice offers a new session; bob answers; alice switches.
    let t1 = T0 + REKEY_AFTER_SECS + 1;
    let offered = b.open(&a.seal(b"offer", t1, &mut rng), t1).unwrap();
    assert!(!offered.switched, "an answered offer changes nothing yet");
    let answered = a.open(&b.seal(b"answer", t1, &mut rng), t1).unwrap();
    assert_ne!(a.session.current_id(), old, "alice switched");
    assert!(
        answered.switched,
        "and is told to seal again what bob has not confirmed"
    );
    // Bob has not sent on the new session: alice keeps the old one's keys past the
    // grace, since bob may still seal on it.
    let t2 = t1 + RETIRED_GRACE_SECS + 100;
    assert_eq!(a.open(&from_b, t2).unwrap().body, b"from bob, late");
    // Alice sends on the new session: bob switches, and from then on the old one
    // opens packets for the grace only.
    assert!(b.open(&a.seal(b"new", t2, &mut rng), t2).unwrap().switched);
    assert_ne!(b.session.current_id(), old, "bob switched");
    assert_eq!(
        b.open(&late1, t2 + RETIRED_GRACE_SECS - 1).unwrap().body,
        b"late 1"
    );
    assert!(matches!(
        b.open(&late2, t2 + RETIRED_GRACE_SECS + 1),
        Err(SessionError::Crypto)
    ));
    assert!(!b.session.holds(&old.unwrap()), "its keys are gone");
}

#[test]
fn first_messages_and_transport_packets_look_alike_from_outside() {
    let (mut a, mut b) = Peer::pair(710);
    let mut rng = test_rng(71);
    let firsts: Vec<Vec<u8>> = (0..200).map(|_| a.seal(b"hi", T0, &mut rng)).collect();
    settle(&mut a, &mut b, T0, &mut rng);
    let transports: Vec<Vec<u8>> = (0..200).map(|_| a.seal(b"hi", T0, &mut rng)).collect();
    assert_eq!(kind(&b.me, &firsts[0]), KIND_INIT);
    assert_eq!(kind(&b.me, &transports[0]), KIND_TRANSPORT);
    for p in firsts.iter().chain(&transports) {
        assert_eq!(p.len(), SIZE_CLASSES[0], "one size class for both");
        assert_eq!(p[0], PACKET_VERSION, "one version byte for both");
    }
    // An X25519 key in the clear has its top bit clear: masked, it is set in about
    // half the first messages, as in random bytes.
    let top_bit_set = |ps: &[Vec<u8>]| {
        ps.iter()
            .filter(|p| p[HEADER_LEN + EPHEMERAL_LEN - 1] & 0x80 != 0)
            .count()
    };
    for (what, ps) in [("first", &firsts), ("transport", &transports)] {
        let n = top_bit_set(ps);
        assert!((60..=140).contains(&n), "{what}: {n} of 200");
    }
}

#[test]
fn known_answer_session_tag_and_first_message_mask() {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(hex(&session_tag(&[7; 32], 5)), "1c04d6355d2e48c4");
    let mut msg1 = [0u8; 40];
    mask_ephemeral(&mut msg1, &[9; 32], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(
        hex(&msg1),
        "e4a35dfc62df9611a925a207f885eeeb765ee8de8ba29e0c799a21e79bcd692a0000000000000000"
    );
}

#[test]
fn after_a_peer_reset_old_sessions_do_not_cut_the_grace_of_new_ones() {
    let (mut a, mut b) = Peer::pair(720);
    let mut rng = test_rng(72);
    settle(&mut a, &mut b, T0, &mut rng);
    // Push the generation up, so the sessions before the reset outrank the new ones.
    for i in 0..3 {
        let t = T0 + (i + 1) * (REKEY_AFTER_SECS + 1);
        settle(&mut a, &mut b, t, &mut rng);
    }
    let old_generation = a.session.generation();
    assert!(old_generation >= 3, "{old_generation}");
    // Bob loses his state and writes again: alice retires the old sessions.
    let t0 = T0 + 10 * REKEY_AFTER_SECS;
    b.session = Session::new(a.me.x25519_public());
    let reset = b.seal(b"I lost everything", t0, &mut rng);
    assert!(a.open(&reset, t0).unwrap().peer_reset);
    settle(&mut a, &mut b, t0, &mut rng);
    assert!(a.session.generation() < old_generation);
    // Alice rekeys; bob has not sent on the new session and keeps sealing on the
    // one before, which alice must keep opening past the grace.
    let t1 = t0 + REKEY_AFTER_SECS + 1;
    b.open(&a.seal(b"offer", t1, &mut rng), t1).unwrap();
    a.open(&b.seal(b"answer", t1, &mut rng), t1).unwrap();
    let late = b.seal(b"still on the session before", t1, &mut rng);
    let t2 = t1 + RETIRED_GRACE_SECS + 100;
    assert_eq!(
        a.open(&late, t2).unwrap().body,
        b"still on the session before"
    );
}
