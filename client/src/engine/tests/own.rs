//! An account's own devices (SPEC §15.2): each shows what the others sent, changed and
//! read, and their device set converges whatever order its edits take.

use super::devices::{names, second_device, set_of, texts, waiting_for, with_a_phone};
use super::*;

/// `user`'s copy of message `id` with `to`.
fn message(user: &User, to: &User, id: MessageId) -> MessageRecord {
    user.messages(to)
        .into_iter()
        .find(|m| m.id == id.0)
        .expect("the message is here")
}

#[tokio::test]
async fn what_one_device_sends_reads_and_changes_shows_on_the_other_within_one_round_trip() {
    let net = FakeNet::default();
    let (laptop, phone, bob, alice_c, _) = with_a_phone(&net).await;
    laptop.regrant().await;
    let bob_at_laptop = laptop.contact_of(&bob.peer()).unwrap();
    let bob_at_phone = phone.contact_of(&bob.peer()).unwrap();

    // Sent on the laptop: one read of the phone's relays shows it there, as hers.
    let (sent, _) = laptop.send(&bob_at_laptop, "from the laptop").await;
    let shown = phone.sync().await;
    assert_eq!(texts(&shown), ["from the laptop"], "one round trip");
    assert_eq!(shown[0].message.direction, Direction::Out);
    assert_eq!(shown[0].message.id, sent.id.0, "the same message");
    assert_eq!(
        message(&phone, &bob, sent.id).state,
        MessageState::SentElsewhere
    );
    // Bob gets it once; his receipt reaches both of her devices.
    assert_eq!(texts(&bob.sync().await), ["from the laptop"]);
    bob.engine.settle().await.unwrap();
    laptop.sync().await;
    phone.sync().await;
    assert_eq!(
        message(&laptop, &bob, sent.id).state,
        MessageState::Delivered
    );
    assert_eq!(
        message(&phone, &bob, sent.id).state,
        MessageState::Delivered
    );

    // The other way: sent on the phone, shown on the laptop.
    let (from_phone, _) = phone.send(&bob_at_phone, "from the phone").await;
    let shown = laptop.sync().await;
    assert_eq!(texts(&shown), ["from the phone"]);
    assert_eq!(shown[0].message.direction, Direction::Out);
    assert_eq!(texts(&bob.sync().await), ["from the phone"]);

    // Read on the laptop: read on the phone (with no receipt at Bob's twice).
    bob.send(&alice_c, "read me").await;
    assert_eq!(texts(&laptop.sync().await), ["read me"]);
    assert_eq!(texts(&phone.sync().await), ["read me"]);
    laptop.engine.mark_read(bob.peer()).await.unwrap();
    laptop.engine.settle().await.unwrap();
    phone.sync().await;
    let read_me = |user: &User| {
        user.messages(&bob)
            .into_iter()
            .find(|m| m.text == "read me")
            .unwrap()
            .state
    };
    assert_eq!(read_me(&laptop), MessageState::Read);
    assert_eq!(read_me(&phone), MessageState::Read, "read on the laptop");

    // Edited on the phone (its own message), deleted on the laptop (the laptop's):
    // each shows on the other.
    phone
        .engine
        .revise(
            bob.peer(),
            from_phone.id,
            Some("from the phone, edited".into()),
        )
        .await
        .unwrap();
    laptop
        .engine
        .revise(bob.peer(), sent.id, None)
        .await
        .unwrap();
    phone.engine.settle().await.unwrap();
    laptop.engine.settle().await.unwrap();
    laptop.sync().await;
    phone.sync().await;
    assert_eq!(
        message(&laptop, &bob, from_phone.id).text,
        "from the phone, edited"
    );
    assert!(message(&laptop, &bob, from_phone.id).edited);
    assert!(message(&phone, &bob, sent.id).deleted);
    // A timer set on one is set on the other.
    phone.engine.set_timer(bob.peer(), 3600).await.unwrap();
    phone.engine.settle().await.unwrap();
    laptop.sync().await;
    assert_eq!(
        laptop
            .engine
            .store()
            .conversation(&bob.peer())
            .unwrap()
            .timer_secs,
        3600
    );

    // Nothing twice, on either device or at Bob's.
    bob.sync().await;
    assert!(laptop.sync().await.is_empty());
    assert!(phone.sync().await.is_empty());
    let at_bob = bob.messages(&laptop);
    for id in [sent.id, from_phone.id] {
        assert_eq!(
            at_bob.iter().filter(|m| m.id == id.0).count(),
            1,
            "once at Bob's"
        );
    }
    assert_eq!(
        message(&bob, &laptop, from_phone.id).text,
        "from the phone, edited"
    );
    assert!(message(&bob, &laptop, sent.id).deleted);
    let on = |user: &User| {
        user.messages(&bob)
            .into_iter()
            .filter(|m| m.direction == Direction::Out)
            .count()
    };
    assert_eq!(
        on(&laptop),
        on(&phone),
        "both devices hold what the account sent"
    );
    println!(
        "the laptop and the phone each hold {} messages the account sent Bob; each copy came within one read of the relays",
        on(&laptop)
    );
}

#[tokio::test]
async fn device_sets_edited_on_two_devices_at_once_converge() {
    let net = FakeNet::default();
    let (laptop, phone, bob, _, phone_key) = with_a_phone(&net).await;
    laptop.regrant().await;
    let bob_at_laptop = laptop.contact_of(&bob.peer()).unwrap();
    // The two devices hold sessions with each other.
    laptop.send(&bob_at_laptop, "hello").await;
    phone.sync().await;
    phone.engine.settle().await.unwrap();
    laptop.sync().await;

    // Apart, each renames itself and the laptop links a tablet.
    laptop
        .engine
        .rename_device("work laptop".into())
        .await
        .unwrap();
    phone
        .engine
        .rename_device("old phone".into())
        .await
        .unwrap();
    let tablet = second_device(&net, &laptop, "tablet");
    let tablet_key = tablet.engine.identity().x25519_public();
    // Their next upkeeps send each other (and Bob) the set; each merges the other's.
    for _ in 0..3 {
        for device in [&laptop, &phone] {
            device.engine.housekeeping().await.unwrap();
            device.engine.settle().await.unwrap();
            device.sync().await;
        }
    }
    let own = |user: &User| {
        user.engine
            .store()
            .own_devices(user.engine.identity())
            .unwrap()
            .unwrap()
    };
    let (on_laptop, on_phone) = (own(&laptop), own(&phone));
    assert_eq!(
        on_laptop.encode(),
        on_phone.encode(),
        "the same set on both"
    );
    let mut listed = names(&on_laptop);
    listed.sort();
    assert_eq!(listed, ["old phone", "tablet", "work laptop"]);
    assert!(on_phone.device(&tablet_key).is_some());
    assert!(on_phone.device(&phone_key).is_some());
    // And Bob holds it too.
    bob.sync().await;
    let mut at_bob = names(&set_of(&bob, &laptop).unwrap());
    at_bob.sort();
    assert_eq!(at_bob, listed);
    println!(
        "after edits apart on two devices, both hold the same set of {} devices, as does Bob",
        listed.len()
    );
}

#[tokio::test]
async fn contacts_blocks_and_deletions_made_on_one_device_are_made_on_the_other() {
    let net = FakeNet::default();
    let (laptop, phone, bob, alice_c, _) = with_a_phone(&net).await;
    laptop.regrant().await;
    let carol = User::started(&net, "carol", 2).await;

    // On the phone, Bob goes by the name the laptop is about to give Carol.
    phone
        .engine
        .rename_contact(bob.peer(), "Carol (work)".into())
        .await
        .unwrap();
    // Carol added on the laptop: a contact on the phone too, under the laptop's name
    // for her, made unique there.
    laptop
        .engine
        .add_contact(carol.card.clone(), Some("Carol (work)".into()))
        .await
        .unwrap();
    laptop.engine.settle().await.unwrap();
    phone.sync().await;
    let carol_at_phone = phone.contact_of(&carol.peer()).expect("added on the phone");
    assert_eq!(carol_at_phone.name, "Carol (work) (2)");
    assert!(carol_at_phone.is_added());
    // The phone writes to her: she takes it as Alice's (her set comes first).
    carol.add_contact(&laptop);
    carol.regrant().await;
    phone.regrant().await;
    phone
        .send(&carol_at_phone, "carol, from alice's phone")
        .await;
    assert_eq!(texts(&carol.sync().await), ["carol, from alice's phone"]);

    // Bob blocked on the phone: blocked on the laptop, which drops what he sends.
    phone.engine.block(bob.peer(), "bob".into()).await.unwrap();
    phone.engine.settle().await.unwrap();
    laptop.sync().await;
    assert!(
        laptop
            .engine
            .store()
            .blocked(&bob.peer())
            .unwrap()
            .is_some()
    );
    bob.send(&alice_c, "while blocked").await;
    assert!(laptop.sync().await.is_empty(), "dropped unread");
    // Unblocked on the laptop: on the phone too.
    laptop.engine.unblock(bob.peer()).await.unwrap();
    laptop.engine.settle().await.unwrap();
    phone.sync().await;
    assert!(phone.engine.store().blocked(&bob.peer()).unwrap().is_none());

    // A message deleted for me on the laptop: gone from the phone, not from Bob's.
    let kept = |user: &User| {
        user.messages(&bob)
            .into_iter()
            .map(|m| MessageId(m.id))
            .collect::<Vec<_>>()
    };
    let target = kept(&laptop)[0];
    assert!(kept(&phone).contains(&target));
    laptop
        .engine
        .delete_for_me(bob.peer(), target)
        .await
        .unwrap();
    laptop.engine.settle().await.unwrap();
    phone.sync().await;
    assert!(!kept(&phone).contains(&target), "deleted on the phone");
    assert!(
        bob.messages(&laptop).iter().any(|m| m.id == target.0),
        "Bob keeps his copy"
    );

    // Carol removed on the phone: removed on the laptop.
    phone.engine.remove_contact(carol.peer()).await.unwrap();
    phone.engine.settle().await.unwrap();
    laptop.sync().await;
    assert!(laptop.contact_of(&carol.peer()).is_none());
    // Nothing went back and forth: neither device has anything more to read.
    assert!(laptop.sync().await.is_empty());
    assert!(phone.sync().await.is_empty());
    let waiting = |user: &User| {
        user.engine
            .store()
            .outbox()
            .unwrap()
            .iter()
            .filter(|(_, e)| e.contact == user.peer().to_bytes())
            .count()
    };
    laptop.engine.settle().await.unwrap();
    phone.engine.settle().await.unwrap();
    println!(
        "a contact added, a block, an unblock, a deletion and a removal each reached the other device; {} and {} copies left waiting",
        waiting(&laptop),
        waiting(&phone)
    );
}

#[tokio::test]
async fn a_change_of_key_on_one_device_and_a_card_naming_another_leave_them_in_sync() {
    let net = FakeNet::default();
    let (laptop, mut phone, bob, _, phone_key) = with_a_phone(&net).await;
    laptop.regrant().await;
    let bob_at_laptop = laptop.contact_of(&bob.peer()).unwrap();
    laptop.send(&bob_at_laptop, "before").await;
    assert_eq!(texts(&phone.sync().await), ["before"]);
    phone.engine.settle().await.unwrap();

    // Someone hands the laptop a card naming the phone's key: refused, as our own.
    let mallory = User::started(&net, "mallory", 1).await;
    let forged = kkachi_protocol::fuzzing::forged_card(
        mallory.engine.identity(),
        phone_key,
        "Alice's phone",
        mallory.relays.clone(),
        1,
    );
    let err = laptop.engine.add_contact(forged, None).await.unwrap_err();
    assert!(
        matches!(err, EngineError::Contact(ContactError::OwnKey)),
        "{err}"
    );

    // The phone changes key: its first words to the laptop carry the set that lists
    // the new key, under the old key's capability the laptop granted.
    let rotated = phone.rotate(&net).await;
    let new_key = rotated.identity.x25519_public();
    assert_ne!(new_key, phone_key);
    let bob_at_phone = phone.contact_of(&bob.peer()).unwrap();
    phone
        .send(&bob_at_phone, "from the phone under its new key")
        .await;
    assert_eq!(
        texts(&laptop.sync().await),
        ["from the phone under its new key"]
    );
    laptop.engine.settle().await.unwrap();
    laptop.regrant().await;
    let own = laptop
        .engine
        .store()
        .own_devices(laptop.engine.identity())
        .unwrap()
        .unwrap();
    assert!(own.device(&new_key).is_some() && own.is_removed(&phone_key));
    // And back: the laptop seals to the new key.
    laptop.send(&bob_at_laptop, "to the phone's new key").await;
    assert_eq!(texts(&phone.sync().await), ["to the phone's new key"]);
}

#[tokio::test]
async fn a_device_taken_out_gets_nothing_of_what_waited_for_it() {
    let net = FakeNet::default();
    let (laptop, phone, bob, _, phone_key) = with_a_phone(&net).await;
    laptop.regrant().await;
    let bob_at_laptop = laptop.contact_of(&bob.peer()).unwrap();
    // The relays are out of reach: the copy for the phone waits here.
    for relay in &laptop.relays {
        net.set_up(relay, false);
    }
    laptop
        .queue(&bob_at_laptop, "while the relays are away")
        .await;
    let waited = waiting_for(&laptop, &laptop, Some(phone_key));
    assert!(waited >= 1, "the copy (and our set) wait for the phone");
    // The phone is lost: taken out, and what waited for it goes with it.
    laptop.engine.remove_device("phone".into()).await.unwrap();
    assert_eq!(waiting_for(&laptop, &laptop, Some(phone_key)), 0);
    assert!(
        laptop
            .engine
            .store()
            .device_sessions_of(&Contact::new(
                laptop.peer(),
                "me".into(),
                laptop.card.clone()
            ))
            .unwrap()
            .is_empty(),
        "no session with it kept"
    );
    for relay in &laptop.relays {
        net.set_up(relay, true);
    }
    laptop.engine.settle().await.unwrap();
    let seen = texts(&phone.sync().await);
    assert!(
        !seen.iter().any(|t| t == "while the relays are away"),
        "{seen:?}"
    );
    // Bob's copy went all the same.
    assert_eq!(texts(&bob.sync().await), ["while the relays are away"]);
}

#[tokio::test]
async fn a_post_to_a_group_from_one_device_shows_on_the_other() {
    let net = FakeNet::default();
    let (laptop, bob, _) = super::devices::pair_with_sets(&net).await;
    // A group with Bob, made before the phone joined (it comes with the account).
    let id = laptop.engine.create_group("Hikers".into()).await.unwrap();
    laptop
        .engine
        .change_group(id, crate::engine::GroupChange::Add(vec![bob.peer()]))
        .await
        .unwrap();
    bob.sync().await;
    let phone = second_device(&net, &laptop, "phone");
    phone.regrant().await;
    laptop.regrant().await;
    let posts = |user: &User| -> Vec<(String, Direction)> {
        user.engine
            .store()
            .group_messages(&id)
            .unwrap()
            .into_iter()
            .filter(|m| !m.event)
            .map(|m| (m.message.text, m.message.direction))
            .collect()
    };

    // Posted on the laptop: Bob gets it, and the phone shows it as ours, once.
    laptop
        .engine
        .send_group(id, "meet at the trailhead".into())
        .await
        .unwrap();
    laptop.engine.settle().await.unwrap();
    let shown = phone.sync().await;
    assert_eq!(texts(&shown), ["meet at the trailhead"]);
    assert_eq!(shown[0].group.as_ref().map(|g| g.id), Some(id));
    assert_eq!(
        posts(&phone),
        [("meet at the trailhead".to_string(), Direction::Out)]
    );
    assert_eq!(texts(&bob.sync().await), ["meet at the trailhead"]);
    // The same copy again (as after a new session): not shown twice.
    let again = MessageId(shown[0].message.id);
    let shown_again = phone
        .engine
        .change(move |state, now| {
            let mut w = WriteSet::default();
            let copy = crate::engine::state::control(Body::Text(String::new()), now);
            let copy = Content { id: again, ..copy };
            let posting = crate::engine::groups::Posting::Text("meet at the trailhead".into());
            let hlc = kkachi_protocol::group::Hlc::default();
            let outcome = state.take_own_post(&mut w, id, &copy, hlc, 0, posting, now)?;
            state.store.apply(w)?;
            Ok(matches!(outcome, crate::engine::receive::Outcome::Shown(_)))
        })
        .await
        .unwrap();
    assert!(!shown_again, "once");
    assert_eq!(posts(&phone).len(), 1);
    // Posted on the phone: the laptop shows it as ours, and Bob gets it.
    phone
        .engine
        .send_group(id, "bringing water".into())
        .await
        .unwrap();
    phone.engine.settle().await.unwrap();
    assert_eq!(texts(&laptop.sync().await), ["bringing water"]);
    assert_eq!(texts(&bob.sync().await), ["bringing water"]);
    assert!(phone.sync().await.is_empty() && laptop.sync().await.is_empty());
    for user in [&laptop, &phone] {
        let mut all = posts(user);
        all.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            all,
            [
                ("bringing water".to_string(), Direction::Out),
                ("meet at the trailhead".to_string(), Direction::Out)
            ]
        );
    }
}

#[tokio::test]
async fn a_group_made_on_one_device_after_the_other_joined_reaches_it() {
    let net = FakeNet::default();
    let (laptop, phone, bob, _, _) = with_a_phone(&net).await;
    laptop.regrant().await;
    // The laptop makes a group with Bob: the phone takes its log, as ours.
    let id = laptop
        .engine
        .create_group("Night shift".into())
        .await
        .unwrap();
    laptop
        .engine
        .change_group(id, crate::engine::GroupChange::Add(vec![bob.peer()]))
        .await
        .unwrap();
    laptop.engine.settle().await.unwrap();
    bob.sync().await;
    phone.sync().await;
    let members = |user: &User| {
        let record = user
            .engine
            .store()
            .group(&id)
            .unwrap()
            .expect("the group is here");
        assert!(record.joined);
        let mut names: Vec<String> = record
            .roster(id)
            .unwrap()
            .unwrap()
            .members
            .values()
            .map(|m| m.name.clone())
            .collect();
        names.sort();
        names
    };
    assert_eq!(members(&phone), members(&laptop));
    assert_eq!(members(&phone).len(), 2);
    let said: Vec<String> = phone
        .engine
        .store()
        .group_messages(&id)
        .unwrap()
        .into_iter()
        .filter(|m| m.event)
        .map(|m| m.message.text)
        .collect();
    assert!(
        said.iter()
            .any(|t| t.starts_with("you made Night shift on another device")),
        "{said:?}"
    );
    // The phone posts in it: Bob gets it once, and the laptop shows it as ours.
    phone
        .engine
        .send_group(id, "I'll take the first watch".into())
        .await
        .unwrap();
    phone.engine.settle().await.unwrap();
    assert_eq!(texts(&bob.sync().await), ["I'll take the first watch"]);
    assert_eq!(texts(&laptop.sync().await), ["I'll take the first watch"]);
    assert!(bob.sync().await.is_empty(), "once");
}

#[tokio::test]
async fn every_device_of_an_account_is_reached_directly_on_the_lan_with_no_relay() {
    let net = FakeNet::default();
    let (laptop, phone, bob, _, phone_key) = with_a_phone(&net).await;
    laptop.regrant().await;
    // Every device is a peer of its own on the network: three of them, on one LAN.
    let devices = [laptop.device(), phone.device(), bob.device()];
    assert_ne!(
        devices[0], devices[1],
        "her devices are apart on the network"
    );
    assert!(
        devices
            .iter()
            .all(|d| *d != laptop.peer() && *d != bob.peer())
    );
    for r in laptop.relays.iter().chain(&bob.relays) {
        net.set_up(r, false);
    }
    net.inner.lock().direct.extend(devices);
    let inbox = |user: &User| {
        net.inner
            .lock()
            .direct_inbox
            .remove(&user.device())
            .unwrap_or_default()
    };

    // Bob's message goes to each of her devices directly: the phone too, not only the
    // one her card names.
    let alice_c = bob.contact_of(&laptop.peer()).unwrap();
    let (_, progress) = bob.send(&alice_c, "no internet here").await;
    assert!(progress.direct);
    bob.engine.settle().await.unwrap();
    assert_eq!(
        waiting_for(&bob, &laptop, Some(phone_key)),
        0,
        "the phone took it"
    );
    let at_phone = phone.engine.receive(inbox(&phone)).await.unwrap();
    assert_eq!(texts(&at_phone), ["no internet here"]);
    let at_laptop = laptop.engine.receive(inbox(&laptop)).await.unwrap();
    assert_eq!(texts(&at_laptop), ["no internet here"]);

    // The phone writes back: to Bob directly, and its copy to the laptop directly.
    let bob_at_phone = phone.contact_of(&bob.peer()).unwrap();
    let (sent, progress) = phone.send(&bob_at_phone, "me neither").await;
    assert!(progress.direct);
    phone.engine.settle().await.unwrap();
    let laptop_key = laptop.engine.identity().x25519_public();
    assert_eq!(
        waiting_for(&phone, &laptop, Some(laptop_key)),
        0,
        "the laptop took its copy"
    );
    let at_bob = bob.engine.receive(inbox(&bob)).await.unwrap();
    assert_eq!(texts(&at_bob), ["me neither"]);
    let copy = laptop.engine.receive(inbox(&laptop)).await.unwrap();
    assert_eq!(texts(&copy), ["me neither"]);
    assert_eq!(copy[0].message.direction, Direction::Out);
    assert_eq!(copy[0].message.id, sent.id.0);
    println!(
        "on one LAN with no relay: Bob reached both of Alice's devices directly, her phone reached Bob and her laptop"
    );
}

#[tokio::test]
async fn an_edit_or_delete_from_another_device_that_comes_before_its_message_is_applied_when_it_comes()
 {
    let net = FakeNet::default();
    let (laptop, phone, bob, _, _) = with_a_phone(&net).await;
    laptop.regrant().await;
    let bob_at_laptop = laptop.contact_of(&bob.peer()).unwrap();
    // The copies reach the phone directly here, so the test can hand them over in the
    // order another relay might have: each change before its message.
    for r in &laptop.relays {
        net.set_up(r, false);
    }
    net.inner.lock().direct.insert(phone.device());
    let (edited, _) = laptop.send(&bob_at_laptop, "draft").await;
    laptop
        .engine
        .revise(bob.peer(), edited.id, Some("final".into()))
        .await
        .unwrap();
    let (deleted, _) = laptop.send(&bob_at_laptop, "oops").await;
    laptop
        .engine
        .revise(bob.peer(), deleted.id, None)
        .await
        .unwrap();
    laptop.engine.settle().await.unwrap();
    let copies = net
        .inner
        .lock()
        .direct_inbox
        .remove(&phone.device())
        .unwrap_or_default();
    assert!(copies.len() >= 4, "two messages and two changes at least");
    for copy in copies.into_iter().rev() {
        phone.engine.receive(vec![copy]).await.unwrap();
    }
    let at_phone = |id: MessageId| message(&phone, &bob, id);
    assert_eq!(at_phone(edited.id).text, "final");
    assert!(at_phone(edited.id).edited);
    assert!(at_phone(deleted.id).deleted);
    assert_eq!(at_phone(deleted.id).text, "");
    // Nothing held is left over.
    let conv = phone.engine.store().conversation(&bob.peer()).unwrap();
    assert!(
        conv.pending_revisions.is_empty(),
        "{:?}",
        conv.pending_revisions
    );
}
