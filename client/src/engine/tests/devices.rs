//! Device sets (SPEC §15): a contact keeps the set their account sends, merged over
//! what came before, refuses one that is not theirs, and never again takes a session
//! key their account took out.

use kkachi_protocol::device::DeviceSet;

use super::rotation::{a_day_later, bob_c_key};
use super::*;
use crate::store::Profile;

/// The device set `bob` keeps for `alice`.
pub(super) fn set_of(bob: &User, alice: &User) -> Option<DeviceSet> {
    bob.engine
        .store()
        .contact_devices(&alice.peer(), alice.engine.identity().public().ed25519())
        .unwrap()
}

/// The names of the devices of `set`.
pub(super) fn names(set: &DeviceSet) -> Vec<String> {
    set.devices().map(|d| d.name().to_owned()).collect()
}

fn devices_record(set: Vec<u8>) -> Content {
    Content {
        id: MessageId(rand::random()),
        seq: 0,
        prev: [0; 32],
        sent_at_ms: now_ms(),
        body: Body::Devices(set),
    }
}

/// Alice and Bob as [`pair`] makes them, once they talked and her next upkeep (any
/// sync) has sent Bob her set and he has read it; with Bob as Alice knows him.
pub(super) async fn pair_with_sets(net: &FakeNet) -> (User, User, Contact) {
    let (alice, bob, bob_c, alice_c) = pair(net).await;
    // Before Bob writes to her, nothing goes: he may not have added her.
    alice.sync().await;
    alice.engine.settle().await.unwrap();
    bob.sync().await;
    assert!(set_of(&bob, &alice).is_none());
    converse(&alice, &bob, &bob_c, &alice_c).await;
    alice.sync().await;
    alice.engine.settle().await.unwrap();
    bob.sync().await;
    (alice, bob, bob_c)
}

#[tokio::test]
async fn a_contact_keeps_the_devices_sent_and_a_newer_name_wins_whatever_the_order() {
    let net = FakeNet::default();
    let (alice, bob, bob_c) = pair_with_sets(&net).await;
    let key = alice.engine.identity().x25519_public();
    let first = set_of(&bob, &alice).expect("Alice's set reached Bob");
    assert_eq!(names(&first), ["first device"]);
    assert_eq!(first.devices().next().unwrap().key(), &key);
    // A new name reaches him.
    let (renamed, sent) = alice.engine.rename_device("laptop".into()).await.unwrap();
    assert_eq!(sent, 1, "queued for Bob");
    alice.engine.settle().await.unwrap();
    bob.sync().await;
    assert_eq!(set_of(&bob, &alice).unwrap(), renamed);
    assert_eq!(names(&renamed), ["laptop"]);
    // The older set, arriving late (another relay, a bundle), does not bring the old
    // name back.
    alice
        .send_raw(&bob_c, &devices_record(first.encode()))
        .await;
    bob.sync().await;
    assert_eq!(names(&set_of(&bob, &alice).unwrap()), ["laptop"]);
    // The same name again changes nothing and is not sent again.
    let (_, sent) = alice.engine.rename_device("laptop".into()).await.unwrap();
    assert_eq!(sent, 0);
    // A name no card could carry is refused, saying why.
    let refused = alice
        .engine
        .rename_device("bad\u{202e}name".into())
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("the device name is not allowed"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_device_set_that_is_not_the_contacts_own_is_refused_and_harms_nothing_else() {
    let net = FakeNet::default();
    let (alice, bob, bob_c) = pair_with_sets(&net).await;
    let before = set_of(&bob, &alice).expect("Alice's own set came first");
    // Alice's session carries a set signed by someone else, one cut short, and one
    // whose signature was altered; then a text.
    let mallory = kkachi_protocol::Identity::generate();
    let foreign = DeviceSet::new(&mallory, "mallory's", now_ms() / 1000).unwrap();
    let mut cut = before.encode();
    cut.truncate(cut.len() - 1);
    let mut altered = before.encode();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    for bad in [foreign.encode(), cut, altered, vec![]] {
        alice.send_raw(&bob_c, &devices_record(bad)).await;
    }
    let _ = alice.send(&bob_c, "still here").await;
    let shown = bob.sync().await;
    assert!(
        shown.iter().any(|r| r.message.text == "still here"),
        "{shown:?}"
    );
    assert_eq!(
        set_of(&bob, &alice).unwrap(),
        before,
        "nothing of them was kept"
    );
}

#[tokio::test]
async fn a_session_key_the_account_took_out_is_never_taken_again() {
    let net = FakeNet::default();
    let (mut alice, mut bob, bob_c, alice_c) = pair(&net).await;
    converse(&alice, &bob, &bob_c, &alice_c).await;
    // Someone copies Alice's device (identity key and session key), then she changes
    // her session key: her set lists the new one and takes the old one out.
    let copied = alice.engine.identity().clone();
    let old_key = copied.x25519_public();
    let mut events = bob.engine.subscribe();
    let rotated = alice.rotate(&net).await;
    let own = alice
        .engine
        .store()
        .own_devices(alice.engine.identity())
        .unwrap()
        .unwrap();
    assert!(own.is_removed(&old_key));
    assert!(
        own.device(&alice.engine.identity().x25519_public())
            .is_some()
    );
    for _ in 0..2 {
        bob.sync().await;
        alice.sync().await;
        alice.engine.settle().await.unwrap();
    }
    let new_key = alice.engine.identity().x25519_public();
    assert_eq!(bob_c_key(&bob, &alice), new_key);
    let kept = set_of(&bob, &alice).unwrap();
    assert!(kept.is_removed(&old_key), "Bob keeps the removal");
    assert_eq!(names(&kept), ["first device"]);
    // And is told, once, on one line.
    let mut told = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let AppEvent::DevicesChanged {
            name,
            added,
            removed,
            ..
        } = event
        {
            told.push(crate::engine::device_change_line(&name, &added, &removed));
        }
    }
    assert_eq!(
        told,
        [format!(
            "alice's account lists first device (key {}) and took out key {}",
            crate::engine::fingerprint(&new_key),
            crate::engine::fingerprint(&old_key)
        )]
    );
    // (A restart forgets when Alice last changed key, so only the removal stands in
    // the way below.)
    bob.restart(&net).await;
    // The copy signs a newer card with the old key and writes to Bob as a first
    // message sealed with it: everything a real change of key has.
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let mut profile = Profile::new("alice");
    profile.card_version = rotated.card_version + 10;
    store.init_identity(&copied, &profile).unwrap();
    for relay in &alice.relays {
        store.add_relay(relay).unwrap();
    }
    let thief = User {
        card: store.own_card(&copied).unwrap(),
        engine: engine(store, copied, &net),
        relays: alice.relays.clone(),
        _dir: dir,
    };
    let bob_at_thief = thief.add_contact(&bob);
    thief.regrant().await;
    let _ = thief.send(&bob_at_thief, "it is me, with my old key").await;
    bob.sync().await;
    assert_eq!(
        bob_c_key(&bob, &alice),
        new_key,
        "Bob stays with the new key"
    );
    assert!(
        !bob.messages(&alice)
            .iter()
            .any(|m| m.text == "it is me, with my old key"),
        "nothing sealed with the key taken out is shown"
    );
    // Alice and Bob go on.
    let _ = alice.send(&bob_c, "after the copy tried").await;
    let shown = bob.sync().await;
    assert!(
        shown
            .iter()
            .any(|r| r.message.text == "after the copy tried"),
        "{shown:?}"
    );
    // The copy's card as an invite code is refused too, saying why, and changes
    // nothing; so it is once Bob has removed Alice (the removal outlives the contact),
    // while her own code still adds her.
    let refused = bob.engine.add_contact(thief.card.clone(), None).await;
    assert!(
        matches!(&refused, Err(EngineError::Contact(ContactError::RemovedDevice(n))) if n == "alice"),
        "{refused:?}"
    );
    assert_eq!(bob_c_key(&bob, &alice), new_key);
    bob.engine.remove_contact(alice.peer()).await.unwrap();
    assert!(bob.contact_of(&alice.peer()).is_none());
    let refused = bob.engine.add_contact(thief.card.clone(), None).await;
    assert!(
        matches!(
            &refused,
            Err(EngineError::Contact(ContactError::RemovedDevice(_)))
        ),
        "{refused:?}"
    );
    assert!(bob.contact_of(&alice.peer()).is_none());
    bob.engine
        .add_contact(alice.card.clone(), None)
        .await
        .unwrap();
    assert_eq!(bob_c_key(&bob, &alice), new_key);
}

#[tokio::test]
async fn a_set_lost_after_a_change_of_key_goes_again_with_the_card_each_day() {
    let net = FakeNet::default();
    let (mut alice, mut bob, bob_c, alice_c) = pair(&net).await;
    converse(&alice, &bob, &bob_c, &alice_c).await;
    let old_key = alice.engine.identity().x25519_public();
    alice.rotate(&net).await;
    // (Her next upkeep sends the set that takes the old key out.)
    alice.sync().await;
    alice.engine.settle().await.unwrap();
    // Bob's relays lose all of it: card and set.
    for relay in &bob.relays {
        net.wipe_relay(relay);
    }
    bob.restart(&net).await;
    bob.regrant().await;
    bob.sync().await;
    assert!(!set_of(&bob, &alice).unwrap().is_removed(&old_key));
    // A day later both go again, to contacts with no session under the new key.
    a_day_later(&alice, &bob).await;
    assert!(
        set_of(&bob, &alice).unwrap().is_removed(&old_key),
        "Bob learns the old key was taken out"
    );
}

#[tokio::test]
async fn a_set_a_contact_set_aside_goes_again_once_they_answer() {
    let net = FakeNet::default();
    let (mut alice, mut bob, bob_c, alice_c) = pair(&net).await;
    converse(&alice, &bob, &bob_c, &alice_c).await;
    // Two changes of key within minutes: Bob takes the first, and sets aside what
    // comes under the second (a contact changing keys over and over is not followed).
    alice.rotate(&net).await;
    for _ in 0..2 {
        alice.sync().await;
        alice.engine.settle().await.unwrap();
        bob.sync().await;
    }
    let first_new = alice.engine.identity().x25519_public();
    assert_eq!(bob_c_key(&bob, &alice), first_new);
    alice.rotate(&net).await;
    alice.sync().await;
    alice.engine.settle().await.unwrap();
    bob.sync().await;
    assert_eq!(
        bob_c_key(&bob, &alice),
        first_new,
        "the second is set aside"
    );
    assert!(!set_of(&bob, &alice).unwrap().is_removed(&first_new));
    // Later (Bob started again) her next message brings the new key, Bob answers, and
    // her set, sent once as a first message, goes again on the session he answered.
    bob.restart(&net).await;
    bob.regrant().await;
    let _ = alice.send(&bob_c, "still me").await;
    bob.sync().await;
    let second_new = alice.engine.identity().x25519_public();
    assert_eq!(bob_c_key(&bob, &alice), second_new);
    let _ = bob.send(&alice_c, "got it").await;
    // (Her upkeep runs as a sync starts: the one after she read his answer sends it.)
    for _ in 0..2 {
        alice.sync().await;
        alice.engine.settle().await.unwrap();
    }
    bob.sync().await;
    let kept = set_of(&bob, &alice).unwrap();
    assert!(
        kept.is_removed(&first_new),
        "Bob learns the first new key was taken out too"
    );
    assert!(kept.device(&second_new).is_some());
}

/// A second device of `user`'s account, as linking makes it: their records (none of
/// their sessions or outbox) in a home of its own, under a session key of its own,
/// listed beside theirs.
pub(super) fn second_device(net: &FakeNet, user: &User, name: &str) -> User {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = Vec::new();
    crate::backup::write_contents(user.engine.store(), &mut bytes, |e| {
        crate::backup::BackupError::Io(e.to_string())
    })
    .unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    crate::backup::read_contents(&bytes[..], "the other device", |record| {
        store.restore_records(vec![record]).map_err(Into::into)
    })
    .unwrap();
    store.repair_after_restore().unwrap();
    let me = store
        .become_new_device(name, now_ms() / 1000, &mut rand_core::OsRng)
        .unwrap();
    let card = store.own_card(&me).unwrap();
    // The device that linked it lists it too.
    user.engine
        .store()
        .list_device(me.x25519_public(), name, now_ms() / 1000)
        .unwrap();
    User {
        engine: engine(store, me, net),
        card,
        relays: user.relays.clone(),
        _dir: dir,
    }
}

/// How many of `user`'s outbox entries wait for `to`'s device `device`.
pub(super) fn waiting_for(user: &User, to: &User, device: Option<[u8; 32]>) -> usize {
    user.engine
        .store()
        .outbox()
        .unwrap()
        .iter()
        .filter(|(_, e)| e.contact == to.peer().to_bytes() && e.device == device)
        .count()
}

pub(super) fn texts(received: &[Received]) -> Vec<String> {
    received.iter().map(|r| r.message.text.clone()).collect()
}

/// Alice (her laptop) and Bob, who talked, and her phone, which joined her account
/// and told Bob so; with Alice as Bob knows her, and the phone's key.
pub(super) async fn with_a_phone(net: &FakeNet) -> (User, User, User, Contact, [u8; 32]) {
    let (alice, bob, _) = pair_with_sets(net).await;
    let alice_c = bob.contact_of(&alice.peer()).unwrap();
    // Its first words to Bob are her set, which lists it beside her laptop, sealed
    // with its own key.
    let phone = second_device(net, &alice, "phone");
    let phone_key = phone.engine.identity().x25519_public();
    assert_ne!(phone_key, alice.engine.identity().x25519_public());
    assert_eq!(phone.peer(), alice.peer(), "one account");
    phone.regrant().await;
    phone.sync().await;
    phone.engine.settle().await.unwrap();
    bob.sync().await;
    assert_eq!(
        bob.contact_of(&alice.peer()).unwrap().card,
        alice_c.card,
        "her phone is not taken for a change of her key"
    );
    let devices = bob.engine.store().device_sessions_of(&alice_c).unwrap();
    assert_eq!(devices, [phone_key], "Bob holds a session with her phone");
    let mut listed = names(&set_of(&bob, &alice).unwrap());
    listed.sort();
    assert_eq!(listed, ["first device", "phone"]);
    bob.regrant().await;
    (alice, phone, bob, alice_c, phone_key)
}

#[tokio::test]
async fn contacts_seal_to_every_device_and_either_one_alone_goes_on() {
    let net = FakeNet::default();
    let (alice, phone, bob, alice_c, phone_key) = with_a_phone(&net).await;

    // What Bob sends reaches both, once each, and is delivered when the first says so.
    let (sent, _) = bob.send(&alice_c, "to both of her devices").await;
    assert_eq!(waiting_for(&bob, &alice, None), 1);
    assert_eq!(waiting_for(&bob, &alice, Some(phone_key)), 1);
    assert_eq!(texts(&phone.sync().await), ["to both of her devices"]);
    phone.engine.settle().await.unwrap();
    bob.sync().await;
    let state = |bob: &User, id: MessageId| {
        bob.messages(&alice)
            .into_iter()
            .find(|m| m.id == id.0)
            .unwrap()
            .state
    };
    assert_eq!(
        state(&bob, sent.id),
        MessageState::Delivered,
        "the phone said so"
    );
    assert_eq!(
        waiting_for(&bob, &alice, Some(phone_key)),
        0,
        "the phone's copy is done"
    );
    // The laptop's copy too, as every relay holds it: the laptop reads it there.
    assert_eq!(waiting_for(&bob, &alice, None), 0);
    assert_eq!(texts(&alice.sync().await), ["to both of her devices"]);
    alice.engine.settle().await.unwrap();
    bob.sync().await;
    assert!(phone.sync().await.is_empty(), "nothing twice");
    assert!(alice.sync().await.is_empty(), "nothing twice");

    // Her laptop is gone for good: the phone alone sends and receives, nothing lost.
    alice.engine.shutdown().await.unwrap();
    let (sent, _) = bob.send(&alice_c, "while the laptop is gone").await;
    assert_eq!(texts(&phone.sync().await), ["while the laptop is gone"]);
    phone.engine.settle().await.unwrap();
    bob.sync().await;
    assert_eq!(state(&bob, sent.id), MessageState::Delivered);
    let phone_bob = phone.contact_of(&bob.peer()).unwrap();
    phone.send(&phone_bob, "from her phone").await;
    assert_eq!(texts(&bob.sync().await), ["from her phone"]);
    println!(
        "Bob sealed to {} devices of Alice's; each got each message once, and the phone alone went on",
        1 + bob
            .engine
            .store()
            .device_sessions_of(&alice_c)
            .unwrap()
            .len()
    );
}

#[tokio::test]
async fn a_device_taken_out_is_sealed_nothing_once_the_contact_holds_the_set() {
    // The laptop takes the phone out.
    let net = FakeNet::default();
    let (alice, phone, bob, alice_c, phone_key) = with_a_phone(&net).await;
    let (set, key, sent) = alice.engine.remove_device("phone".into()).await.unwrap();
    assert_eq!(key, phone_key);
    assert!(set.is_removed(&phone_key));
    assert_eq!(sent, 1, "queued for Bob");
    alice.engine.settle().await.unwrap();
    bob.sync().await;
    assert!(
        bob.engine
            .store()
            .device_sessions_of(&alice_c)
            .unwrap()
            .is_empty()
    );
    bob.send(&alice_c, "after the phone went").await;
    assert_eq!(waiting_for(&bob, &alice, Some(phone_key)), 0);
    assert!(phone.sync().await.is_empty(), "the phone gets nothing more");
    assert_eq!(texts(&alice.sync().await), ["after the phone went"]);
    // What the phone still sends is refused.
    let phone_bob = phone.contact_of(&bob.peer()).unwrap();
    phone.send(&phone_bob, "still here?").await;
    assert!(bob.sync().await.is_empty());
    // This device, or a name nobody has, is not taken out.
    for (which, why) in [
        ("first device", "that is this device"),
        ("tablet", "no device of this account is named tablet"),
    ] {
        let refused = alice.engine.remove_device(which.into()).await.unwrap_err();
        assert!(refused.to_string().contains(why), "{refused}");
    }

    // The phone takes the laptop out (the device her card names): Bob seals to the
    // phone alone from then on, and the laptop gets nothing more.
    let net = FakeNet::default();
    let (alice, phone, bob, alice_c, phone_key) = with_a_phone(&net).await;
    let laptop = alice.engine.identity().x25519_public();
    let fingerprint: String = laptop[..3].iter().map(|b| format!("{b:02x}")).collect();
    let (_, key, _) = phone.engine.remove_device(fingerprint).await.unwrap();
    assert_eq!(key, laptop);
    phone.engine.settle().await.unwrap();
    bob.sync().await;
    let (sent, _) = bob.send(&alice_c, "to the phone alone").await;
    assert_eq!(waiting_for(&bob, &alice, None), 0, "nothing for the laptop");
    assert_eq!(waiting_for(&bob, &alice, Some(phone_key)), 1);
    assert!(
        alice.sync().await.is_empty(),
        "the laptop gets nothing more"
    );
    // And what it sends (as a copy of its keys would) is refused.
    let laptop_bob = alice.contact_of(&bob.peer()).unwrap();
    alice.send(&laptop_bob, "from the laptop taken out").await;
    assert_eq!(texts(&phone.sync().await), ["to the phone alone"]);
    phone.engine.settle().await.unwrap();
    assert!(bob.sync().await.is_empty(), "nothing from the laptop");
    let state = bob
        .messages(&alice)
        .into_iter()
        .find(|m| m.id == sent.id.0)
        .unwrap()
        .state;
    assert_eq!(state, MessageState::Delivered);
}

#[tokio::test]
async fn a_device_that_changes_key_beside_another_is_followed_and_both_get_everything() {
    let net = FakeNet::default();
    let (mut alice, phone, bob, _, phone_key) = with_a_phone(&net).await;
    // The laptop changes its key: its set lists the new key, the phone, and takes the
    // old key out; its first messages under the new key carry its new card.
    let rotated = alice.rotate(&net).await;
    alice.sync().await;
    alice.engine.settle().await.unwrap();
    bob.sync().await;
    let alice_c = bob.contact_of(&alice.peer()).unwrap();
    assert_eq!(
        alice_c.card.identity().x25519(),
        &rotated.identity.x25519_public(),
        "Bob follows the laptop's new key"
    );
    assert_eq!(
        bob.engine.store().device_sessions_of(&alice_c).unwrap(),
        [phone_key],
        "and still seals to the phone"
    );
    bob.regrant().await;
    bob.send(&alice_c, "after the laptop's new key").await;
    assert_eq!(waiting_for(&bob, &alice, None), 1, "one for the laptop");
    assert_eq!(
        waiting_for(&bob, &alice, Some(phone_key)),
        1,
        "one for the phone"
    );
    assert_eq!(texts(&alice.sync().await), ["after the laptop's new key"]);
    assert_eq!(texts(&phone.sync().await), ["after the laptop's new key"]);
    // Both answer under their keys, and Bob takes both.
    let laptop_bob = alice.contact_of(&bob.peer()).unwrap();
    alice.send(&laptop_bob, "from the laptop, new key").await;
    assert_eq!(texts(&bob.sync().await), ["from the laptop, new key"]);
}

#[tokio::test]
async fn two_devices_sending_at_once_are_numbered_apart_and_nothing_looks_missing() {
    let net = FakeNet::default();
    let (alice, mut phone, bob, alice_c, phone_key) = with_a_phone(&net).await;
    let laptop_bob = alice.contact_of(&bob.peer()).unwrap();
    let phone_bob = phone.contact_of(&bob.peer()).unwrap();
    let mut sent = Vec::new();
    for round in 0..3 {
        let laptop = format!("laptop {round}");
        let phone_text = format!("phone {round}");
        alice.send(&laptop_bob, &laptop).await;
        phone.send(&phone_bob, &phone_text).await;
        sent.extend([laptop, phone_text]);
    }
    let mut shown = texts(&bob.sync().await);
    shown.sort();
    sent.sort();
    assert_eq!(shown, sent, "each once");
    let conv = bob.engine.store().conversation(&alice.peer()).unwrap();
    let phone_numbers = bob
        .engine
        .store()
        .device_numbers(&alice.peer(), &phone_key)
        .unwrap();
    println!(
        "the laptop's numbers went to {}, the phone's to {}: {} conflicts, {} breaks, {} missing",
        conv.gaps.max_seen(),
        phone_numbers.gaps.max_seen(),
        conv.conflicts + phone_numbers.conflicts,
        conv.chain_breaks.len() + phone_numbers.chain_breaks.len(),
        conv.gaps.missing() + phone_numbers.gaps.missing()
    );
    assert_eq!(
        phone_numbers.gaps.max_seen(),
        3,
        "the phone numbers its own from 1"
    );
    assert_eq!((conv.conflicts, phone_numbers.conflicts), (0, 0));
    assert!(conv.chain_breaks.is_empty() && phone_numbers.chain_breaks.is_empty());
    assert_eq!((conv.gaps.missing(), phone_numbers.gaps.missing()), (0, 0));

    // The phone changes its key: to Bob, a device of hers under a new key (not a change
    // of her card's), which goes on numbering where the phone was. Nothing looks
    // missing, and the old key is sealed nothing more.
    let rotated = phone.rotate(&net).await;
    let new_key = rotated.identity.x25519_public();
    phone.sync().await;
    phone.engine.settle().await.unwrap();
    phone.send(&phone_bob, "phone, new key").await;
    let mut shown = texts(&bob.sync().await);
    if shown.is_empty() {
        // Its card came before its set and waits: it is taken when put again.
        phone.engine.deliver_now().await.unwrap();
        shown = texts(&bob.sync().await);
    }
    assert_eq!(shown, ["phone, new key"]);
    let alice_now = bob.contact_of(&alice.peer()).unwrap();
    assert_eq!(
        alice_now.card, alice_c.card,
        "her card still names the laptop"
    );
    assert_eq!(
        bob.engine.store().device_sessions_of(&alice_now).unwrap(),
        [new_key]
    );
    let numbers = bob
        .engine
        .store()
        .device_numbers(&alice.peer(), &new_key)
        .unwrap();
    assert_eq!(numbers.gaps.max_seen(), 4);
    assert_eq!((numbers.gaps.missing(), numbers.conflicts), (0, 0));
}

#[tokio::test]
async fn a_new_key_of_an_account_with_several_devices_waits_for_the_set_that_says_what_it_is() {
    let net = FakeNet::default();
    let (alice, _phone, bob, alice_c, _) = with_a_phone(&net).await;
    // Her tablet joins; before its set, it writes to Bob (as a reordered relay would
    // bring it): its card, newer and under another key, is not taken as her change of
    // key, nor is its text shown.
    let tablet = second_device(&net, &alice, "tablet");
    let tablet_key = tablet.engine.identity().x25519_public();
    let tablet_bob = tablet.contact_of(&bob.peer()).unwrap();
    let first = tablet
        .seal_raw(&tablet_bob, &raw_text(1, [0; 32], "before the set"))
        .await;
    assert!(
        bob.engine.receive(vec![first]).await.unwrap().is_empty(),
        "it waits"
    );
    assert!(
        !bob.engine
            .store()
            .device_sessions_of(&alice_c)
            .unwrap()
            .contains(&tablet_key)
    );
    assert_eq!(
        bob.contact_of(&alice.peer()).unwrap().card,
        alice_c.card,
        "her card still names the laptop"
    );
    // Its set comes: it is a device of hers, and what it sends next is shown.
    tablet.regrant().await;
    tablet.sync().await;
    tablet.engine.settle().await.unwrap();
    bob.sync().await;
    let alice_now = bob.contact_of(&alice.peer()).unwrap();
    assert_eq!(alice_now.card, alice_c.card);
    assert!(
        bob.engine
            .store()
            .device_sessions_of(&alice_now)
            .unwrap()
            .contains(&tablet_key)
    );
    tablet.send(&tablet_bob, "after the set").await;
    assert_eq!(texts(&bob.sync().await), ["after the set"]);
}
