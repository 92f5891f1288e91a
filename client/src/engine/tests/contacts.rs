//! Strangers and the contacts you control: first messages held as requests, accepted,
//! rejected or blocked; contacts blocked, removed and added again.

use super::hostile::{cast, texts};
use super::*;
use crate::engine::ContactError;
use crate::store::MAX_HELD_PER_SENDER;
use kkachi_protocol::Session;
use kkachi_protocol::card::CARD_LIFETIME_SECS;

async fn spam(spammer: &User, to: &Contact, i: usize) {
    spammer.send(to, &format!("buy now {i}")).await;
}

#[tokio::test]
async fn a_first_message_from_a_stranger_is_held_then_accepted_once() {
    let net = FakeNet::default();
    let frank = User::started(&net, "Frank", 2).await;
    let carol = User::started(&net, "Carol", 2).await;
    // Frank has Carol's code; Carol does not know Frank yet.
    let carol_at_frank = frank.add_contact(&carol);
    let (first, _) = frank
        .send(&carol_at_frank, "injured at the station, please add me")
        .await;
    let _ = frank.send(&carol_at_frank, "I am by the east exit").await;
    assert!(
        carol.sync().await.is_empty(),
        "nothing shown from a stranger"
    );
    let requests = carol.engine.store().requests().unwrap();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].card.name(), "Frank");
    assert_eq!(requests[0].messages.len(), 2);
    // Carol's client confirms nothing: Frank sees "relayed", never "delivered".
    carol.engine.settle().await.unwrap();
    frank.sync().await;
    assert!(matches!(
        frank.messages(&carol)[0].state,
        MessageState::Relayed { .. }
    ));
    // The relays no longer hold it; Carol's device does.
    for r in &carol.relays {
        let mailbox = carol.inbox(r);
        assert!(
            net.relay_store(r)
                .fetch(&mailbox, 0, 10, usize::MAX)
                .unwrap()
                .items
                .is_empty()
        );
    }
    // Accepting moves both into the conversation, in Frank's order, once.
    let done = carol
        .engine
        .accept_request(frank.peer(), None)
        .await
        .unwrap();
    assert!(done.added);
    assert_eq!(
        texts(&carol, &frank),
        [
            "injured at the station, please add me",
            "I am by the east exit"
        ]
    );
    assert!(carol.engine.store().requests().unwrap().is_empty());
    assert!(carol.sync().await.is_empty());
    // Now Frank sees them delivered.
    carol.engine.settle().await.unwrap();
    frank.sync().await;
    assert_eq!(frank.messages(&carol)[0].state, MessageState::Delivered);
    assert!(
        frank
            .engine
            .progress(first.outbox_key)
            .await
            .unwrap()
            .is_none(),
        "done"
    );
    // And the conversation goes on both ways.
    let frank_at_carol = carol.contact_of(&frank.peer()).unwrap();
    let _ = carol.send(&frank_at_carol, "coming").await;
    assert_eq!(frank.sync().await.len(), 1);
}

#[tokio::test]
async fn adding_a_strangers_code_accepts_what_they_sent() {
    let net = FakeNet::default();
    let frank = User::started(&net, "Frank", 1).await;
    let carol = User::started(&net, "Carol", 1).await;
    let carol_at_frank = frank.add_contact(&carol);
    let _ = frank.send(&carol_at_frank, "hello from the shelter").await;
    carol.sync().await;
    let done = carol
        .engine
        .add_contact(frank.card.clone(), None)
        .await
        .unwrap();
    assert_eq!(done.accepted.len(), 1);
    assert_eq!(texts(&carol, &frank), ["hello from the shelter"]);
}

#[tokio::test]
async fn held_messages_are_bounded_per_sender_and_can_be_rejected_or_blocked() {
    let net = FakeNet::default();
    let spammer = User::started(&net, "Spammer", 1).await;
    let carol = User::started(&net, "Carol", 1).await;
    let carol_at_spammer = spammer.add_contact(&carol);
    for i in 0..MAX_HELD_PER_SENDER + 5 {
        spam(&spammer, &carol_at_spammer, i).await;
    }
    carol.sync().await;
    assert_eq!(
        carol.engine.store().held_counts(&spammer.peer()).unwrap(),
        (MAX_HELD_PER_SENDER, MAX_HELD_PER_SENDER)
    );
    assert_eq!(
        carol.engine.reject_request(spammer.peer()).await.unwrap(),
        MAX_HELD_PER_SENDER
    );
    spam(&spammer, &carol_at_spammer, 99).await;
    carol.sync().await;
    assert_eq!(
        carol.engine.store().held_counts(&spammer.peer()).unwrap().0,
        1,
        "may ask again"
    );
    carol
        .engine
        .block(spammer.peer(), "Spammer".into())
        .await
        .unwrap();
    assert_eq!(
        carol.engine.store().held_counts(&spammer.peer()).unwrap().0,
        0
    );
    spam(&spammer, &carol_at_spammer, 100).await;
    carol.sync().await;
    assert_eq!(
        carol.engine.store().held_counts(&spammer.peer()).unwrap().0,
        0,
        "blocked: dropped unread"
    );
}

#[tokio::test]
async fn a_blocked_contact_is_dropped_unread_until_unblocked() {
    let c = cast().await;
    let _ = c.mallory.send(&c.carol_at_mallory, "one").await;
    c.carol.sync().await;
    c.carol.engine.settle().await.unwrap();
    c.mallory.sync().await;
    c.carol
        .engine
        .block(c.mallory.peer(), "Mallory".into())
        .await
        .unwrap();
    // Transport packets (their session is established) and first messages alike.
    let _ = c.mallory.send(&c.carol_at_mallory, "two").await;
    c.mallory
        .send_raw(&c.carol_at_mallory, &raw_text(9, [0; 32], "three"))
        .await;
    let _ = c.alice.send(&c.carol_at_alice, "alice goes on").await;
    let got = c.carol.sync().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.text, "alice goes on");
    assert_eq!(
        texts(&c.carol, &c.mallory),
        ["one"],
        "the conversation is kept"
    );
    assert!(c.carol.engine.unblock(c.mallory.peer()).await.unwrap());
    let _ = c.mallory.send(&c.carol_at_mallory, "four").await;
    c.carol.sync().await;
    assert!(texts(&c.carol, &c.mallory).contains(&"four".to_string()));
}

#[tokio::test]
async fn a_removed_contact_leaves_nothing_and_writes_as_a_stranger() {
    let c = cast().await;
    let _ = c.mallory.send(&c.carol_at_mallory, "one").await;
    c.carol.sync().await;
    let done = c
        .carol
        .engine
        .remove_contact(c.mallory.peer())
        .await
        .unwrap();
    assert_eq!(done.removed_messages, 1);
    assert!(c.carol.contact_of(&c.mallory.peer()).is_none());
    assert!(c.carol.messages(&c.mallory).is_empty());
    // Renaming and name rules.
    let err = c
        .carol
        .engine
        .rename_contact(c.alice.peer(), "Al\u{202e}ice".into())
        .await
        .unwrap_err();
    assert!(
        matches!(err, EngineError::Contact(ContactError::Name(_))),
        "{err}"
    );
    c.carol
        .engine
        .rename_contact(c.alice.peer(), "앨리스".into())
        .await
        .unwrap();
    assert_eq!(c.carol.contact_of(&c.alice.peer()).unwrap().name, "앨리스");
}

#[tokio::test]
async fn a_contact_removed_and_added_again_gets_what_they_sent_meanwhile() {
    let c = cast().await;
    let mallory_at_carol = c.carol.contact_of(&c.mallory.peer()).unwrap();
    converse(&c.mallory, &c.carol, &c.carol_at_mallory, &mallory_at_carol).await;
    c.carol
        .engine
        .remove_contact(c.mallory.peer())
        .await
        .unwrap();
    // Mallory still holds the session: this is a transport packet Carol cannot open.
    let _ = c
        .mallory
        .send(&c.carol_at_mallory, "did you get this?")
        .await;
    assert!(c.carol.sync().await.is_empty());
    c.carol
        .engine
        .add_contact(c.mallory.card.clone(), None)
        .await
        .unwrap();
    // Carol's card goes out under a fresh session; Mallory's client sees Carol's state
    // is new and seals again what Carol never confirmed.
    c.carol.engine.settle().await.unwrap();
    c.mallory.sync().await;
    c.mallory.engine.settle().await.unwrap();
    let got = c.carol.sync().await;
    assert_eq!(
        got.iter()
            .map(|r| r.message.text.as_str())
            .collect::<Vec<_>>(),
        ["did you get this?"]
    );
    assert!(c.carol.sync().await.is_empty());
}

#[tokio::test]
async fn what_a_removed_contact_sends_afterwards_arrives_as_a_request() {
    let c = cast().await;
    let mallory_at_carol = c.carol.contact_of(&c.mallory.peer()).unwrap();
    converse(&c.mallory, &c.carol, &c.carol_at_mallory, &mallory_at_carol).await;
    c.carol
        .engine
        .remove_contact(c.mallory.peer())
        .await
        .unwrap();
    let _ = c
        .mallory
        .send(&c.carol_at_mallory, "sorry, can we talk?")
        .await;
    assert!(c.carol.sync().await.is_empty());
    // Carol's card from a fresh session tells Mallory's client that Carol's state is
    // gone: it seals again what Carol never confirmed, as first messages.
    c.carol.engine.settle().await.unwrap();
    c.mallory.sync().await;
    c.mallory.engine.settle().await.unwrap();
    assert!(
        c.carol.sync().await.is_empty(),
        "not a contact: nothing shown"
    );
    let request = c.carol.engine.store().request(&c.mallory.peer()).unwrap();
    let texts: Vec<_> = request
        .unwrap()
        .messages
        .into_iter()
        .filter_map(|m| m.text)
        .collect();
    assert_eq!(texts, ["sorry, can we talk?"]);
}

/// A first message to `to` from `from` under `card` (any expiry), put on their relays.
async fn first_message_under(from: &User, to: &Contact, card: &Card, text: &str) {
    let now_s = now_ms() / 1000;
    let mut session = Session::new(*to.card.identity().x25519());
    let content = raw_text(1, [0; 32], text);
    let payload = session
        .seal(
            from.engine.identity(),
            card,
            &content.encode(),
            now_s,
            &mut rand_core::OsRng,
        )
        .unwrap();
    let envelope = Envelope {
        expires_at: now_s + 3600,
        payload,
    };
    from.put_raw(to, envelope).await;
}

#[tokio::test]
async fn an_expired_code_adds_nobody_but_an_expired_requester_can_be_accepted() {
    let net = FakeNet::default();
    let carol = User::started(&net, "Carol", 2).await;
    let now_s = now_ms() / 1000;
    let card_until = |u: &User, expires_at: u64| {
        Card::new_at_epoch(
            u.engine.identity(),
            "Someone",
            u.relays.clone(),
            1,
            0,
            expires_at,
        )
        .unwrap()
    };
    // A code off an old poster: refused, saying what to do.
    let frank = User::started(&net, "Frank", 2).await;
    let err = carol
        .engine
        .add_contact(card_until(&frank, now_s - 3 * 86_400 - 3600), None)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Someone's invite code expired 3 days ago; ask them for a new one (`kkachi invite`)"
    );
    assert!(carol.contact_of(&frank.peer()).is_none());
    // Within the clock skew it still counts.
    carol
        .engine
        .add_contact(card_until(&frank, now_s - 60), None)
        .await
        .unwrap();
    // Grace writes to Carol with a card that has since run out (her own, not the code
    // she used): the request is held, and Carol can still accept it.
    let grace = User::started(&net, "Grace", 2).await;
    let carol_at_grace = grace.add_contact(&carol);
    first_message_under(
        &grace,
        &carol_at_grace,
        &card_until(&grace, now_s - 1),
        "hello",
    )
    .await;
    carol.sync().await;
    assert_eq!(carol.engine.store().requests().unwrap().len(), 1);
    let done = carol
        .engine
        .accept_request(grace.peer(), Some("Grace".into()))
        .await
        .unwrap();
    assert!(done.added);
    assert_eq!(texts(&carol, &grace), ["hello"]);
}

#[tokio::test]
async fn a_request_sent_before_its_code_was_renewed_still_arrives() {
    let net = FakeNet::default();
    let mut carol = User::started(&net, "Carol", 2).await;
    let frank = User::started(&net, "Frank", 2).await;
    // Frank writes with Carol's code; Carol's client renews her card (at its next
    // start) before reading it.
    let carol_at_frank = frank.add_contact(&carol);
    let _ = frank.send(&carol_at_frank, "sent under the old code").await;
    let mut profile = carol.engine.store().profile().unwrap().unwrap();
    profile.card_expires_at = now_ms() / 1000 - 1;
    let mut w = WriteSet::default();
    LocalStore::write_profile(&mut w, &profile);
    carol.engine.store().apply(w).unwrap();
    carol.restart(&net).await;
    carol.engine.settle().await.unwrap();
    let after = carol.engine.store().profile().unwrap().unwrap();
    assert_eq!(after.request_epoch, profile.request_epoch + 1, "renewed");
    carol.sync().await;
    let requests = carol.engine.store().requests().unwrap();
    assert_eq!(requests.len(), 1, "read from the earlier request queue");
    // The old code reaches nothing new.
    let _ = frank.send(&carol_at_frank, "after the renewal").await;
    carol.sync().await;
    assert_eq!(
        carol.engine.store().requests().unwrap()[0].messages.len(),
        1
    );
}

#[tokio::test]
async fn an_expired_own_card_is_renewed_and_its_contacts_get_the_new_one() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _alice_c) = pair(&net).await;
    let before = alice.engine.store().profile().unwrap().unwrap();
    // Alice's card runs out.
    let mut profile = before.clone();
    profile.card_expires_at = now_ms() / 1000 - 1;
    let mut w = WriteSet::default();
    LocalStore::write_profile(&mut w, &profile);
    alice.engine.store().apply(w).unwrap();
    // Her next message goes under a new card: a new version and request epoch, valid
    // for the full lifetime again.
    let _ = alice.send(&bob_c, "still here").await;
    alice.sync().await;
    let after = alice.engine.store().profile().unwrap().unwrap();
    assert_eq!(after.request_epoch, before.request_epoch + 1);
    assert!(after.card_version > before.card_version);
    assert!(after.card_expires_at > now_ms() / 1000 + CARD_LIFETIME_SECS - 60);
    // Bob reads the message and holds the new card.
    alice.engine.deliver_now().await.unwrap();
    let got = bob.sync().await;
    assert!(
        got.iter().any(|r| r.message.text == "still here"),
        "{got:?}"
    );
    let card = bob.contact_of(&alice.peer()).unwrap().card;
    assert_eq!(card.version(), after.card_version);
    assert!(!card.is_expired(now_ms() / 1000));
    // The new request capability is granted and the old one withdrawn at her relays.
    for relay in &alice.relays {
        let peer = crate::engine::state::relay_peer(relay).unwrap();
        let old = alice
            .engine
            .identity()
            .request_write_key(&peer, before.request_epoch);
        let new = alice
            .engine
            .identity()
            .request_write_key(&peer, after.request_epoch);
        assert_eq!(card.request_key_at(&peer), Some(&new));
        let store = net.relay_store(relay);
        assert_eq!(store.route(&old.id()).unwrap(), None, "old epoch revoked");
        assert!(
            store.route(&new.id()).unwrap().is_some(),
            "new epoch granted"
        );
    }
}

#[test]
fn a_contact_who_renames_themselves_is_followed_unless_we_named_them_or_it_could_mean_another() {
    use crate::engine::contacts::name_with_card;
    let card = |id: &kkachi_protocol::Identity, name: &str, version: u64| {
        kkachi_protocol::Card::new(id, name, vec![], version).unwrap()
    };
    let (minji, other) = (
        kkachi_protocol::Identity::generate(),
        kkachi_protocol::Identity::generate(),
    );
    let contact = |id: &kkachi_protocol::Identity, name: &str, card_name: &str| {
        Contact::new(id.peer_id(), name.into(), card(id, card_name, 1))
    };
    let jiwoo = contact(&other, "Jiwoo", "Jiwoo");
    let as_card = contact(&minji, "Minji", "Minji");
    let all = vec![jiwoo.clone(), as_card.clone()];
    let renamed = |to: &str| name_with_card(&all, &as_card, &card(&minji, to, 2));
    assert_eq!(renamed("Minji Park"), "Minji Park", "followed");
    // Nothing that could be taken for someone else, or for us.
    for taken in ["Jiwoo", "jiwoo", "Ji", "Jiwoo Kim", "me", "12D3KooWabc"] {
        assert_eq!(renamed(taken), "Minji", "{taken:?}");
    }
    // A name we gave stays ours.
    let ours = contact(&minji, "Mom", "Minji");
    assert_eq!(
        name_with_card(
            &[jiwoo, ours.clone()],
            &ours,
            &card(&minji, "Minji Park", 2)
        ),
        "Mom"
    );
}
