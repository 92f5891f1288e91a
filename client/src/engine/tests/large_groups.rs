//! Groups with group relays (SPEC §14.5): one queue per epoch on each group relay that
//! every member reads, messages put once per relay whatever the number of members,
//! epochs made on adds and removals, haves counting deliveries.

use kkachi_protocol::group::GroupId;

use super::*;
use crate::engine::GroupChange;

/// An admin and `n` members, each only the admin's contact (not each other's).
async fn star(net: &FakeNet, n: usize) -> (User, Vec<User>) {
    let admin = User::started(net, "admin", 1).await;
    let mut members = Vec::new();
    for i in 0..n {
        let m = User::started(net, &format!("member{i}"), 1).await;
        admin.add_contact(&m);
        m.add_contact(&admin);
        m.regrant().await;
        members.push(m);
    }
    admin.regrant().await;
    (admin, members)
}

/// A group of `admin` with group relays `relays` and every one of `members` in it,
/// each having taken what the admin sealed to them and read the group's queue.
async fn large_group(admin: &User, members: &[User], relays: &[Multiaddr]) -> GroupId {
    let id = admin.engine.create_group("Town".into()).await.unwrap();
    admin
        .engine
        .change_group(id, GroupChange::Relays(relays.to_vec()))
        .await
        .unwrap();
    let peers = members.iter().map(User::peer).collect();
    let added = admin
        .engine
        .change_group(id, GroupChange::Add(peers))
        .await
        .unwrap();
    assert_eq!(added.changed.len(), members.len());
    admin.engine.deliver_now().await.unwrap();
    for m in members {
        m.sync().await;
    }
    id
}

fn shown_texts(u: &User, id: GroupId) -> Vec<String> {
    u.engine
        .store()
        .group_messages(&id)
        .unwrap()
        .into_iter()
        .filter(|m| !m.event)
        .map(|m| m.message.text)
        .collect()
}

fn epochs(u: &User, id: GroupId) -> Vec<[u8; 32]> {
    u.engine
        .store()
        .group(&id)
        .unwrap()
        .map(|g| g.large.epochs.iter().map(|e| e.id).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_message_is_put_once_per_group_relay_and_read_once_by_every_member() {
    let net = FakeNet::default();
    let (admin, members) = star(&net, 4).await;
    let group_relays: Vec<Multiaddr> = (0..3).map(|_| net.add_relay()).collect();
    let id = large_group(&admin, &members, &group_relays).await;
    // Every member holds the admin's newest epoch: the one made for all of them.
    let newest = epochs(&admin, id)[0];
    for m in &members {
        assert_eq!(epochs(m, id).first(), Some(&newest), "{}", m.card.name());
    }

    let puts = net.inner.lock().group_puts;
    let sent = members[0]
        .engine
        .send_group(id, "the bridge is out".into())
        .await
        .unwrap();
    assert_eq!(sent.copies, 4, "for every other member");
    members[0].engine.deliver_now().await.unwrap();
    let message_puts = net.inner.lock().group_puts - puts;
    assert_eq!(
        message_puts, 3,
        "one put per group relay, not one per member"
    );
    for reader in members[1..].iter().chain([&admin]) {
        let reads = net.inner.lock().group_reads;
        let got = reader.sync().await;
        assert!(
            net.inner.lock().group_reads > reads,
            "a sync reads the group's queues"
        );
        let texts: Vec<&str> = got
            .iter()
            .filter(|r| r.group.as_ref().is_some_and(|g| !g.event))
            .map(|r| r.message.text.as_str())
            .collect();
        assert_eq!(texts, ["the bridge is out"], "{}", reader.card.name());
        // Three relays hold it; it is shown once, and never again.
        assert!(reader.sync().await.is_empty());
        assert_eq!(shown_texts(reader, id), ["the bridge is out"]);
    }
    // Members who took it post their haves; the author counts them.
    for reader in members[1..].iter().chain([&admin]) {
        reader.engine.housekeeping().await.unwrap();
        reader.engine.deliver_now().await.unwrap();
    }
    members[0].sync().await;
    let ours = members[0]
        .engine
        .store()
        .group_messages(&id)
        .unwrap()
        .into_iter()
        .find(|m| !m.event)
        .unwrap();
    assert_eq!(ours.tally(), (4, 0), "delivered to all four others");
    assert_eq!(ours.audience(), 4);
    assert_eq!(ours.message.state, MessageState::Delivered);
}

#[tokio::test]
async fn losing_a_group_relay_loses_nothing() {
    let net = FakeNet::default();
    let (admin, members) = star(&net, 3).await;
    let group_relays: Vec<Multiaddr> = (0..3).map(|_| net.add_relay()).collect();
    let id = large_group(&admin, &members, &group_relays).await;
    net.set_up(&group_relays[1], false);
    for (i, m) in members.iter().enumerate() {
        m.engine
            .send_group(id, format!("report {i}"))
            .await
            .unwrap();
        m.engine.settle().await.unwrap();
    }
    admin.sync().await;
    let mut got = shown_texts(&admin, id);
    got.sort();
    assert_eq!(got, ["report 0", "report 1", "report 2"]);
    // The relay comes back: what it missed reaches it, and nobody sees anything twice.
    net.set_up(&group_relays[1], true);
    for m in &members {
        m.engine.deliver_now().await.unwrap();
    }
    assert!(admin.sync().await.is_empty());
    assert_eq!(shown_texts(&admin, id).len(), 3);
}

#[tokio::test]
async fn a_removed_member_reads_nothing_sent_after_the_removal() {
    let net = FakeNet::default();
    let (admin, members) = star(&net, 3).await;
    let group_relays: Vec<Multiaddr> = (0..3).map(|_| net.add_relay()).collect();
    let id = large_group(&admin, &members, &group_relays).await;
    let before = epochs(&admin, id)[0];
    let gone = &members[2];
    admin
        .engine
        .change_group(id, GroupChange::Remove(gone.peer()))
        .await
        .unwrap();
    admin.engine.deliver_now().await.unwrap();
    let after = epochs(&admin, id)[0];
    assert_ne!(after, before, "the removal made a new epoch");
    // A member who saw the removal writes under the new epoch only.
    members[0].sync().await;
    assert_eq!(epochs(&members[0], id)[0], after);
    members[0]
        .engine
        .send_group(id, "meet at the school".into())
        .await
        .unwrap();
    members[0].engine.deliver_now().await.unwrap();
    members[1].sync().await;
    assert_eq!(shown_texts(&members[1], id), ["meet at the school"]);
    // The removed member learns of the removal, and gets neither the key nor the text.
    gone.sync().await;
    gone.sync().await;
    assert!(!epochs(gone, id).contains(&after));
    assert!(shown_texts(gone, id).is_empty());
    let roster = gone
        .engine
        .store()
        .group(&id)
        .unwrap()
        .unwrap()
        .roster(id)
        .unwrap()
        .unwrap();
    assert!(
        !roster
            .members
            .contains_key(gone.engine.identity().public().ed25519())
    );
}

#[tokio::test]
async fn a_member_who_has_not_seen_a_removal_holds_their_message_until_a_new_key() {
    // The admin removes someone while offline from members' view: a member who wrote
    // before hearing of it wrote under the old epoch, which the removed member can
    // read. One who has heard of the removal but not yet of the new epoch holds the
    // message back instead of writing under a key a non-member holds.
    let net = FakeNet::default();
    let (admin, members) = star(&net, 3).await;
    let group_relays: Vec<Multiaddr> = (0..3).map(|_| net.add_relay()).collect();
    let id = large_group(&admin, &members, &group_relays).await;
    let gone = members[2].peer();
    // The removal's operations reach member 0, but the new epoch's record does not
    // (its relays are down while the admin posts it).
    for r in &group_relays {
        net.set_up(r, false);
    }
    admin
        .engine
        .change_group(id, GroupChange::Remove(gone))
        .await
        .unwrap();
    admin.engine.settle().await.unwrap();
    // Member 0 learns the new roster from the operations put in its own queues... it
    // is the admin's contact, so the removal reaches it over their session.
    members[0].sync().await;
    let sent = members[0]
        .engine
        .send_group(id, "held".into())
        .await
        .unwrap();
    assert_eq!(sent.copies, 0, "not sent under a key a non-member holds");
    assert!(!sent.unreachable.is_empty());
    // The relays come back: the new epoch's record arrives, and the message goes.
    for r in &group_relays {
        net.set_up(r, true);
    }
    admin.engine.deliver_now().await.unwrap();
    members[0].sync().await;
    members[0].engine.housekeeping().await.unwrap();
    members[0].engine.deliver_now().await.unwrap();
    members[1].sync().await;
    assert_eq!(shown_texts(&members[1], id), ["held"]);
    members[2].sync().await;
    members[2].sync().await;
    assert!(shown_texts(&members[2], id).is_empty());
}
