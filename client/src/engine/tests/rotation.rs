//! A new session key for the same person (SPEC.md §1, §2): contacts take it from the
//! first message sealed with it, nothing sealed before or during the change is lost or
//! shown twice, the old key's queues are read while anything can still arrive there,
//! codes given out before reach nothing, and nobody can swap a contact's key any other
//! way.

use super::*;
use crate::store::Rotated;

impl User {
    /// What `kkachi rotate-key` does: the engine stops, the store gets a new session
    /// key, and a new engine tells our relays and sends every contact the new card.
    pub(super) async fn rotate(&mut self, net: &FakeNet) -> Rotated {
        self.engine.shutdown().await.unwrap();
        let store = self.engine.store().clone();
        let rotated = store
            .rotate_session_key(now_ms() / 1000, &mut rand_core::OsRng)
            .unwrap();
        self.card = store.own_card(&rotated.identity).unwrap();
        self.engine = engine(store, rotated.identity.clone(), net);
        self.engine.relays_changed(true).await.unwrap();
        self.engine.settle().await.unwrap();
        rotated
    }

    /// Texts from `other`, in order, as shown here.
    fn texts_from(&self, other: &User) -> Vec<String> {
        self.messages(other)
            .into_iter()
            .filter(|m| m.direction == Direction::In)
            .map(|m| m.text)
            .collect()
    }
}

/// Messages both ways until both sides seal on an established session, each text
/// marked with `tag` so that every round's texts differ.
async fn talk(alice: &User, bob: &User, bob_c: &Contact, alice_c: &Contact, tag: &str) {
    for round in 0..6 {
        let _ = alice.send(bob_c, &format!("{tag} a{round}")).await;
        bob.sync().await;
        let _ = bob.send(alice_c, &format!("{tag} b{round}")).await;
        alice.sync().await;
        bob.sync().await;
    }
}

/// The session key `bob` holds for `alice`.
pub(super) fn bob_c_key(bob: &User, alice: &User) -> [u8; 32] {
    *bob.contact_of(&alice.peer())
        .unwrap()
        .card
        .identity()
        .x25519()
}

/// A day after `alice` last sent her rotated card: her next upkeep sends it again
/// (with her set), and `bob` reads what came.
pub(super) async fn a_day_later(alice: &User, bob: &User) {
    let mut w = WriteSet::default();
    LocalStore::write_rotated_card_sent(&mut w, now_ms() - 25 * 3600 * 1000);
    alice.engine.store().apply(w).unwrap();
    alice.sync().await;
    alice.engine.settle().await.unwrap();
    bob.sync().await;
}

/// Each of `wanted` exactly once among `texts`.
fn once_each(texts: &[String], wanted: &[&str]) {
    for w in wanted {
        let n = texts.iter().filter(|t| t == w).count();
        assert_eq!(n, 1, "{w:?} shown {n} times in {texts:?}");
    }
}

#[tokio::test]
async fn a_new_session_key_reaches_contacts_and_nothing_is_lost_or_shown_twice() {
    let net = FakeNet::default();
    let (mut alice, bob, bob_c, alice_c) = pair(&net).await;
    talk(&alice, &bob, &bob_c, &alice_c, "before").await;
    let old_key = alice.engine.identity().x25519_public();
    // On its way when Alice changes her key: Bob's message waits in her inbox, sealed on
    // the session she is about to drop; hers waits in her outbox (Bob's relays are down).
    let _ = bob.send(&alice_c, "sealed on the old session").await;
    for relay in &bob.relays {
        net.set_up(relay, false);
    }
    let _ = alice.send(&bob_c, "queued before the change").await;
    for relay in &bob.relays {
        net.set_up(relay, true);
    }
    let rotated = alice.rotate(&net).await;
    let new_key = alice.engine.identity().x25519_public();
    assert_ne!(new_key, old_key);
    assert_eq!(rotated.resealed, 1, "her waiting message goes again");
    // Bob takes the new key from the first message sealed with it (it reaches him
    // through his request queue: he has not granted her new capability yet).
    bob.sync().await;
    let card = bob.contact_of(&alice.peer()).unwrap().card;
    assert_eq!(card.identity().x25519(), &new_key);
    assert_eq!(card.version(), rotated.card_version);
    assert!(
        bob.engine.store().requests().unwrap().is_empty(),
        "a contact's new key is no stranger's request"
    );
    // Both sides go on; everything sealed before or during the change arrives once.
    for _ in 0..2 {
        alice.sync().await;
        bob.sync().await;
        alice.engine.deliver_now().await.unwrap();
        bob.engine.deliver_now().await.unwrap();
    }
    talk(&alice, &bob, &bob_c, &alice_c, "after").await;
    once_each(
        &bob.texts_from(&alice),
        &[
            "queued before the change",
            "before a5",
            "after a0",
            "after a5",
        ],
    );
    once_each(
        &alice.texts_from(&bob),
        &[
            "sealed on the old session",
            "before b5",
            "after b0",
            "after b5",
        ],
    );
    assert_eq!(bob.texts_from(&alice).len(), 13, "6 + 1 + 6 texts");
    assert_eq!(alice.texts_from(&bob).len(), 13, "6 + 1 + 6 texts");
    // Nothing waits: every message was confirmed under the new key.
    alice.engine.deliver_now().await.unwrap();
    bob.sync().await;
    alice.sync().await;
    assert_eq!(alice.engine.store().outbox_len(), 0);
    assert_eq!(bob.engine.store().outbox_len(), 0);
    let session = bob
        .engine
        .store()
        .session(&bob.contact_of(&alice.peer()).unwrap())
        .unwrap();
    assert_eq!(session.remote(), &new_key);
    assert!(session.is_established());
    // Bob's relays now grant his capability into Alice's new inbox: his messages no
    // longer need her request queue.
    for relay in &alice.relays {
        let peer = crate::engine::state::relay_peer(relay).unwrap();
        let write = bob
            .engine
            .identity()
            .write_key_for(alice.card.identity(), &peer);
        assert!(net.relay_store(relay).route(&write.id()).unwrap().is_some());
    }
}

#[tokio::test]
async fn what_contacts_seal_to_the_old_key_is_still_read_and_old_codes_reach_nothing() {
    let net = FakeNet::default();
    let mut alice = User::started(&net, "alice", 2).await;
    let carol = User::started(&net, "carol", 2).await;
    let alice_at_carol = carol.add_contact(&alice);
    let carol_at_alice = alice.add_contact(&carol);
    alice.regrant().await;
    carol.regrant().await;
    let old_card = alice.card.clone();
    let rotated = alice.rotate(&net).await;
    // Carol has not heard of the new key: her first message is sealed to the old
    // one, into the old inbox, which Alice still reads and opens.
    let _ = carol.send(&alice_at_carol, "to your old key").await;
    let got = alice.sync().await;
    assert!(
        got.iter().any(|r| r.message.text == "to your old key"),
        "{got:?}"
    );
    once_each(&alice.texts_from(&carol), &["to your old key"]);
    // Then she reads Alice's new card and changes key too; the two carry on.
    carol.sync().await;
    assert_eq!(
        carol.contact_of(&alice.peer()).unwrap().card.version(),
        rotated.card_version
    );
    talk(&alice, &carol, &carol_at_alice, &alice_at_carol, "after").await;
    once_each(
        &alice.texts_from(&carol),
        &["to your old key", "after b0", "after b5"],
    );
    // A stranger holding the code given out before the change reaches nothing; the
    // new code works.
    let dave = User::started(&net, "dave", 1).await;
    let old_alice = Contact::new(alice.peer(), "alice".into(), old_card);
    let mut w = WriteSet::default();
    LocalStore::write_contact(&mut w, &old_alice);
    dave.engine.store().apply(w).unwrap();
    let (_, progress) = dave.send(&old_alice, "with the old code").await;
    assert_eq!(progress.acked, 0, "the old code's capability is withdrawn");
    let erin = User::started(&net, "erin", 1).await;
    let new_alice = erin.add_contact(&alice);
    let (_, progress) = erin.send(&new_alice, "with the new code").await;
    assert_eq!(progress.acked, 2);
    alice.sync().await;
    let requests = alice.engine.store().requests().unwrap();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(
        requests[0].messages[0].text.as_deref(),
        Some("with the new code")
    );
}

#[tokio::test]
async fn a_session_key_is_taken_only_from_a_message_sealed_with_it() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, alice_c) = pair(&net).await;
    talk(&alice, &bob, &bob_c, &alice_c, "before").await;
    // Alice's identity key signs a card binding a key she does not hold (Bob's, or
    // anyone's) and sends it on her session: the signature verifies, but nothing
    // proves she holds the key, so Bob keeps the one he has.
    let foreign = kkachi_protocol::Identity::generate().x25519_public();
    for key in [foreign, bob.engine.identity().x25519_public()] {
        let relays = alice.card.relays().to_vec();
        let claimed = kkachi_protocol::fuzzing::forged_card(
            alice.engine.identity(),
            key,
            "alice",
            relays,
            50,
        );
        let content = Content {
            id: MessageId(rand::random()),
            seq: 0,
            prev: [0; 32],
            sent_at_ms: now_ms(),
            body: Body::CardUpdate(Box::new(claimed)),
        };
        alice.send_raw(&bob_c, &content).await;
        bob.sync().await;
        let card = bob.contact_of(&alice.peer()).unwrap().card;
        assert_eq!(
            card.identity().x25519(),
            &alice.engine.identity().x25519_public()
        );
    }
    // And the two still talk on the session they had.
    talk(&alice, &bob, &bob_c, &alice_c, "after").await;
    once_each(&bob.texts_from(&alice), &["before a0", "after a5"]);
}

#[tokio::test]
async fn a_contact_changing_key_again_within_the_hour_is_not_followed_and_old_capabilities_go() {
    let net = FakeNet::default();
    let (mut alice, bob, bob_c, alice_c) = pair(&net).await;
    talk(&alice, &bob, &bob_c, &alice_c, "before").await;
    let first_identity = alice.engine.identity().clone();
    let first = alice.rotate(&net).await;
    bob.sync().await;
    bob.regrant().await;
    assert_eq!(
        bob.contact_of(&alice.peer()).unwrap().card.version(),
        first.card_version
    );
    // Bob's relays withdrew the capability of Alice's key before and granted the new
    // one's: a hostile contact changing keys over and over fills no queue with grants.
    for relay in &bob.relays {
        let peer = crate::engine::state::relay_peer(relay).unwrap();
        let store = net.relay_store(relay);
        let old = first_identity.write_key_for(bob.card.identity(), &peer);
        let new = alice
            .engine
            .identity()
            .write_key_for(bob.card.identity(), &peer);
        assert_eq!(
            store.route(&old.id()).unwrap(),
            None,
            "old capability withdrawn"
        );
        assert!(store.route(&new.id()).unwrap().is_some(), "new one granted");
    }
    // A second change within the hour is not taken.
    let second = alice.rotate(&net).await;
    bob.sync().await;
    let card = bob.contact_of(&alice.peer()).unwrap().card;
    assert_eq!(card.version(), first.card_version);
    assert_ne!(
        card.identity().x25519(),
        &second.identity.x25519_public(),
        "still the first new key"
    );
}

#[tokio::test]
async fn contacts_still_on_the_old_key_get_the_card_again_each_day_and_resealed_messages_go_to_the_new_queues()
 {
    let net = FakeNet::default();
    let (mut alice, mut bob, bob_c, alice_c) = pair(&net).await;
    talk(&alice, &bob, &bob_c, &alice_c, "before").await;
    // Bob seals to Alice on their session; it is still unread when she changes key.
    let _ = bob.send(&alice_c, "unread when the key changes").await;
    alice.rotate(&net).await;
    // The card Alice sent is lost (Bob's relays lose what they held): a day later,
    // Bob, still with no session under her new key, gets it again.
    for relay in &bob.relays {
        net.wipe_relay(relay);
    }
    // (Started again, as after losing those relays: it reads them from the start.)
    bob.restart(&net).await;
    bob.regrant().await;
    let old_key = bob_c_key(&bob, &alice);
    // (A sync runs the upkeep that sends it.)
    alice.sync().await;
    alice.engine.settle().await.unwrap();
    bob.sync().await;
    assert_eq!(bob_c_key(&bob, &alice), old_key, "not again within the day");
    a_day_later(&alice, &bob).await;
    let card = bob.contact_of(&alice.peer()).unwrap().card;
    assert_eq!(
        card.identity().x25519(),
        &alice.engine.identity().x25519_public()
    );
    // What Bob seals again for Alice goes to her new queues, not to the old ones (a
    // receipt sealed on the old session is not sealed again: its message comes again).
    let resealed: Vec<_> = bob
        .engine
        .store()
        .outbox()
        .unwrap()
        .into_iter()
        .filter(|(_, e)| e.kind == crate::store::OutboxKind::Message)
        .collect();
    assert!(!resealed.is_empty());
    for (_, entry) in resealed {
        for target in &entry.targets {
            let addr: Multiaddr = target.addr.parse().unwrap();
            let relay = crate::engine::state::relay_peer(&addr).unwrap();
            let new = bob.engine.identity().write_key_for(card.identity(), &relay);
            assert_eq!(target.write, new.0, "to the new key's inbox");
        }
    }
    for _ in 0..2 {
        alice.sync().await;
        bob.sync().await;
    }
    once_each(&alice.texts_from(&bob), &["unread when the key changes"]);
}

#[tokio::test]
async fn a_new_code_added_by_hand_takes_the_new_key_whether_or_not_the_contact_was_removed_first() {
    let net = FakeNet::default();
    let (mut alice, bob, bob_c, alice_c) = pair(&net).await;
    let carol = User::started(&net, "carol", 1).await;
    let carol_c = alice.add_contact(&carol);
    let alice_at_carol = carol.add_contact(&alice);
    alice.regrant().await;
    carol.regrant().await;
    talk(&alice, &bob, &bob_c, &alice_c, "before").await;
    talk(&alice, &carol, &carol_c, &alice_at_carol, "before").await;
    // Alice rotates; her card update is lost to both (their relays lose everything).
    alice.rotate(&net).await;
    for relay in bob.relays.iter().chain(&carol.relays) {
        net.wipe_relay(relay);
    }
    bob.regrant().await;
    carol.regrant().await;
    // Bob adds her new code over the old one; Carol removes her and adds it again.
    let updated = bob
        .engine
        .add_contact(alice.card.clone(), None)
        .await
        .unwrap();
    assert!(updated.updated && !updated.added, "{updated:?}");
    carol.engine.remove_contact(alice.peer()).await.unwrap();
    let added = carol
        .engine
        .add_contact(alice.card.clone(), None)
        .await
        .unwrap();
    assert!(added.added);
    let new_key = alice.engine.identity().x25519_public();
    for u in [&bob, &carol] {
        assert_eq!(bob_c_key(u, &alice), new_key);
    }
    // What they send now is sealed to her new key, and reaches her.
    let alice_at_bob = bob.contact_of(&alice.peer()).unwrap();
    let _ = bob.send(&alice_at_bob, "bob after the new code").await;
    let alice_at_carol = carol.contact_of(&alice.peer()).unwrap();
    let _ = carol
        .send(&alice_at_carol, "carol after the new code")
        .await;
    alice.sync().await;
    once_each(&alice.texts_from(&bob), &["bob after the new code"]);
    once_each(&alice.texts_from(&carol), &["carol after the new code"]);
}
