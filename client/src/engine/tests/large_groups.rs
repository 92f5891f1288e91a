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

/// A network, an admin and `n` members (each only the admin's contact) in a group with
/// three group relays, every member holding its key.
async fn town(n: usize) -> (FakeNet, User, Vec<User>, Vec<Multiaddr>, GroupId) {
    let net = FakeNet::default();
    let (admin, members) = star(&net, n).await;
    let group_relays: Vec<Multiaddr> = (0..3).map(|_| net.add_relay()).collect();
    let id = large_group(&admin, &members, &group_relays).await;
    (net, admin, members, group_relays, id)
}

/// `u` sends `to` a file of `size` bytes named `name` (written into `dir`): its bytes,
/// its id, and what the upload did.
async fn send_file(
    u: &User,
    to: crate::files::To,
    dir: &std::path::Path,
    name: &str,
    size: u32,
) -> (
    Vec<u8>,
    crate::store::TransferId,
    crate::files::UploadReport,
) {
    let path = dir.join(name);
    let bytes: Vec<u8> = (0..size).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    let claim = crate::files::prepare(&u.engine, to, &path).await.unwrap();
    let id = claim.id;
    let report = crate::files::upload(&u.engine, claim).await.unwrap();
    (bytes, id, report)
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

/// The first message (not a line about a change) `u` holds in group `id`.
fn first_message(u: &User, id: GroupId) -> crate::store::GroupMessage {
    u.engine
        .store()
        .group_messages(&id)
        .unwrap()
        .into_iter()
        .find(|m| !m.event)
        .unwrap()
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
    let (net, admin, members, _group_relays, id) = town(4).await;
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
    let ours = first_message(&members[0], id);
    assert_eq!(ours.tally(), (4, 0), "delivered to all four others");
    assert_eq!(ours.audience(), 4);
    assert_eq!(ours.message.state, MessageState::Delivered);
    // Three of them read it (one with read receipts off): their haves say so.
    members[3].engine.set_read_receipts(false).await.unwrap();
    for reader in members[1..].iter().chain([&admin]) {
        assert_eq!(reader.engine.mark_group_read(id).await.unwrap(), 1);
        reader.engine.deliver_now().await.unwrap();
    }
    members[0].sync().await;
    let ours = first_message(&members[0], id);
    assert_eq!(
        ours.tally(),
        (4, 3),
        "read by three, the fourth keeps it to themself"
    );
    assert_eq!(ours.message.state, MessageState::Delivered);
}

#[tokio::test]
async fn losing_a_group_relay_loses_nothing() {
    let (net, admin, members, group_relays, id) = town(3).await;
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
    let (_net, admin, members, _group_relays, id) = town(3).await;
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
    let (net, admin, members, group_relays, id) = town(3).await;
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

/// The epoch a member writes under: the winner among those an admin of its merged
/// state made.
fn current_epoch(u: &User, id: GroupId) -> Option<[u8; 32]> {
    let record = u.engine.store().group(&id).unwrap()?;
    let roster = record.roster(id).unwrap()?;
    record
        .large
        .epochs
        .iter()
        .filter(|e| roster.role(&e.author) == Some(kkachi_protocol::group::Role::Admin))
        .max_by_key(|e| e.rank())
        .map(|e| e.id)
}

/// SPEC §14.5 under stress: 100 members (each a client of its own), three group relays
/// going down in turn, the network losing one put in ten (its sender tries again) and
/// delivering batches reversed with a copy, five admins adding and removing members
/// without hearing of each other, members writing meanwhile. Once the relays are back,
/// within two rounds of members writing (haves posted, queues read), every member holds
/// the same group and the same current key, wrapped for every member and for nobody
/// else; every message is shown once to every member who held the group's key when it
/// went; gaps in authors' chains were found and are all filled.
#[tokio::test]
async fn a_hundred_members_converge_under_relay_loss_and_concurrent_admins() {
    const USERS: usize = 100;
    const ADMINS: usize = 5;
    let started = std::time::Instant::now();
    let net = FakeNet::default();
    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(User::started(&net, &format!("u{i:03}"), 1).await);
    }
    // The admins know everyone; members know the admins only.
    for a in 0..ADMINS {
        for b in 0..USERS {
            if a != b {
                users[a].add_contact(&users[b]);
                if b >= ADMINS {
                    users[b].add_contact(&users[a]);
                }
            }
        }
    }
    for u in &users {
        u.regrant().await;
    }
    let group_relays: Vec<Multiaddr> = (0..3).map(|_| net.add_relay()).collect();
    let peer = |i: usize| users[i].peer();
    let id = users[0].engine.create_group("Town".into()).await.unwrap();
    users[0]
        .engine
        .change_group(id, GroupChange::Relays(group_relays.clone()))
        .await
        .unwrap();
    users[0]
        .engine
        .change_group(id, GroupChange::Add((1..90).map(peer).collect()))
        .await
        .unwrap();
    for a in 1..ADMINS {
        users[0]
            .engine
            .change_group(id, GroupChange::Admin(peer(a), true))
            .await
            .unwrap();
    }
    // Everyone delivers what waits, then reads, all at once (as members do).
    let everyone_syncs = || async {
        let t = std::time::Instant::now();
        futures::future::join_all(users.iter().map(|u| u.engine.deliver_now())).await;
        futures::future::join_all(users.iter().map(|u| u.sync())).await;
        t.elapsed()
    };
    everyone_syncs().await;
    everyone_syncs().await;
    let joined = (0..USERS)
        .filter(|&i| current_epoch(&users[i], id).is_some())
        .count();
    assert_eq!(joined, 90, "every member holds the group's key");

    // The outage: the network misbehaves, a group relay goes down, five admins act.
    net.chaos(true);
    net.set_up(&group_relays[0], false);
    let act = |i: usize, change: GroupChange| {
        let engine = users[i].engine.clone();
        async move { engine.change_group(id, change).await.unwrap() }
    };
    tokio::join!(
        act(0, GroupChange::Remove(peer(80))),
        act(1, GroupChange::Add(vec![peer(90), peer(91), peer(92)])),
        act(2, GroupChange::Remove(peer(81))),
        act(3, GroupChange::Add(vec![peer(93)])),
        act(4, GroupChange::Remove(peer(82))),
    );
    let mut during = Vec::new();
    for i in [5, 12, 25, 40, 55, 70] {
        let sent = users[i]
            .engine
            .send_group(id, format!("during the outage from u{i:03}"))
            .await
            .unwrap();
        during.push(sent.id);
    }
    // The first relay comes back, another goes down; members read what they can.
    net.set_up(&group_relays[0], true);
    net.set_up(&group_relays[2], false);
    everyone_syncs().await;
    net.set_up(&group_relays[2], true);

    // Healing: every member who may post writes, twice, and everyone reads.
    let mut sent = Vec::new();
    for round in 0..2 {
        for (i, u) in users.iter().enumerate() {
            let Some(epoch) = current_epoch(u, id) else {
                continue;
            };
            let record = u.engine.store().group(&id).unwrap().unwrap();
            let r = record.roster(id).unwrap().unwrap();
            if !r.may_post(u.engine.identity().public().ed25519()) {
                continue;
            }
            let s = u
                .engine
                .send_group(id, format!("round {round} from u{i:03}"))
                .await
                .unwrap();
            sent.push((i, s.id, epoch, s.copies > 0));
        }
        everyone_syncs().await;
        everyone_syncs().await;
    }
    let lost = net.chaos(false);
    // One more read for what the last round's haves said (and what they made
    // authors put again).
    let last = everyone_syncs().await;
    everyone_syncs().await;

    let founder = users[0]
        .engine
        .store()
        .group(&id)
        .unwrap()
        .unwrap()
        .roster(id)
        .unwrap()
        .unwrap();
    let members: Vec<usize> = (0..USERS)
        .filter(|&i| {
            founder
                .members
                .contains_key(users[i].engine.identity().public().ed25519())
        })
        .collect();
    let key = current_epoch(&users[0], id).unwrap();
    let mut filled = 0;
    for &i in &members {
        let record = users[i].engine.store().group(&id).unwrap().unwrap();
        let roster = record.roster(id).unwrap().unwrap();
        assert_eq!(
            roster.members, founder.members,
            "u{i:03} holds the same members"
        );
        assert_eq!(
            current_epoch(&users[i], id),
            Some(key),
            "u{i:03} holds the same key"
        );
        for chain in &record.large.chains {
            assert_eq!(chain.missing(), 0, "u{i:03}: a gap is left unfilled");
            filled += chain.filled;
        }
    }
    // The current key went to every member, and to nobody else.
    let epoch = users[0]
        .engine
        .store()
        .group(&id)
        .unwrap()
        .unwrap()
        .large
        .epochs
        .into_iter()
        .find(|e| e.id == key)
        .unwrap();
    for (i, user) in users.iter().enumerate() {
        let x = user.engine.identity().x25519_public();
        let wrapped = epoch.tags.iter().any(|t| t[..] == x[..8]);
        assert_eq!(wrapped, members.contains(&i), "u{i:03}");
    }
    // Removed members and those never added read nothing of the last round.
    let last_round: Vec<[u8; 16]> = sent
        .iter()
        .filter(|(_, _, e, went)| *e == key && *went)
        .map(|(_, m, _, _)| m.0)
        .collect();
    assert!(!last_round.is_empty());
    for i in (0..USERS).filter(|i| !members.contains(i)) {
        let theirs = users[i]
            .engine
            .store()
            .group_messages(&id)
            .unwrap_or_default();
        assert!(
            theirs.iter().all(|m| !last_round.contains(&m.message.id)),
            "u{i:03} is no member and read a message under the current key"
        );
    }
    // Every message that went under the current key is shown once to every member
    // other than its author.
    for &i in &members {
        let shown = users[i].engine.store().group_messages(&id).unwrap();
        for (author, message, _, _) in sent.iter().filter(|(_, m, _, _)| last_round.contains(&m.0))
        {
            if *author == i {
                continue;
            }
            let n = shown.iter().filter(|m| m.message.id == message.0).count();
            assert_eq!(n, 1, "u{i:03} shows u{author:03}'s message {n} times");
        }
    }
    println!(
        "{} members after five concurrent changes under relay loss ({lost} puts lost); {} messages in the last rounds, each shown once to every member; {filled} gaps found and filled; a round of everyone reading took {:.1} s; {:.1} s in all",
        members.len(),
        last_round.len(),
        last.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(lost > 0, "the network lost puts");
}

#[tokio::test]
async fn a_gap_in_an_authors_messages_is_shown_then_filled() {
    let (net, _admin, members, group_relays, id) = town(2).await;
    let (author, reader) = (&members[0], &members[1]);
    author.engine.send_group(id, "one".into()).await.unwrap();
    author.engine.deliver_now().await.unwrap();
    // The second waits in the author's outbox (every group relay is down)...
    for r in &group_relays {
        net.set_up(r, false);
    }
    author.engine.send_group(id, "two".into()).await.unwrap();
    author.engine.settle().await.unwrap();
    for r in &group_relays {
        net.set_up(r, true);
    }
    // ...while the third goes at once (the second waits out its backoff).
    author.engine.send_group(id, "three".into()).await.unwrap();
    author.engine.settle().await.unwrap();
    reader.sync().await;
    let chain = |u: &User| {
        let record = u.engine.store().group(&id).unwrap().unwrap();
        let key = *author.engine.identity().public().ed25519();
        record
            .large
            .chains
            .into_iter()
            .find(|c| c.author == key)
            .unwrap()
    };
    assert_eq!(shown_texts(reader, id), ["one", "three"]);
    assert_eq!(chain(reader).missing(), 1, "the gap is known");
    author.engine.deliver_now().await.unwrap();
    reader.sync().await;
    assert_eq!(
        shown_texts(reader, id),
        ["one", "two", "three"],
        "shown in order"
    );
    assert_eq!(chain(reader).missing(), 0);
    assert_eq!(chain(reader).filled, 1);
}

#[tokio::test]
async fn the_first_admin_changes_the_key_once_a_week() {
    let (_net, admin, members, _group_relays, id) = town(2).await;
    let before = current_epoch(&admin, id).unwrap();
    // The current epoch was made a week and a minute ago.
    let mut record = admin.engine.store().group(&id).unwrap().unwrap();
    for e in &mut record.large.epochs {
        e.hlc.0 -= 7 * 24 * 3600 * 1000 + 60_000;
    }
    let mut w = WriteSet::default();
    LocalStore::write_group(&mut w, &id, &record);
    admin.engine.store().apply(w).unwrap();
    // Any change to the group wakes the upkeep (a rename does not need a new key).
    admin
        .engine
        .change_group(id, GroupChange::Rename("Town square".into()))
        .await
        .unwrap();
    admin.engine.deliver_now().await.unwrap();
    let after = current_epoch(&admin, id).unwrap();
    assert_ne!(after, before, "a week-old key was replaced");
    members[0].sync().await;
    assert_eq!(current_epoch(&members[0], id), Some(after));
}

/// The file message `u` holds in group `id`, and its offered file record.
fn group_file(
    u: &User,
    id: GroupId,
) -> Option<(kkachi_protocol::file::FileRef, crate::store::Incoming)> {
    let m = u
        .engine
        .store()
        .group_messages(&id)
        .unwrap()
        .into_iter()
        .find(|m| m.message.file.is_some())?;
    let file = m.message.file.as_ref().unwrap().file().unwrap();
    let incoming = u.engine.store().incoming_file(&file.id()).unwrap()?;
    Some((file, incoming))
}

#[tokio::test]
async fn a_file_goes_once_into_the_group_queues_and_every_member_fetches_it() {
    use crate::files::{self, To};
    let (net, admin, members, group_relays, id) = town(4).await;
    let dir = tempfile::tempdir().unwrap();
    let sender = &members[0];
    let (bytes, _, report) = send_file(
        sender,
        To::Group(id),
        dir.path(),
        "shelter-map.bin",
        1_500_000,
    )
    .await;
    assert!(report.message_sent && report.group_sent.is_some());
    // Over 1 MiB: every chunk (6) and the manifest on two of the three group relays,
    // once for all four other members.
    assert_eq!((report.members, report.copies, report.relays), (4, 2, 3));
    let (group_chunks, all_chunks) = {
        let inner = net.inner.lock();
        let all: usize = inner.chunks.values().map(HashMap::len).sum();
        (inner.group_chunk_puts, all)
    };
    assert_eq!(group_chunks, 2 * (6 + 1), "one upload, not one per member");
    assert_eq!(all_chunks, group_chunks, "nothing in members' own queues");
    let outgoing = sender
        .engine
        .store()
        .file_transfers()
        .unwrap()
        .0
        .into_iter()
        .next()
        .unwrap()
        .1;
    assert_eq!(outgoing.epoch, Some(epochs(sender, id)[0]));
    // One group relay goes down: every member still fetches the file whole.
    net.set_up(&group_relays[0], false);
    for u in members[1..].iter().chain([&admin]) {
        u.sync().await;
        let (file, incoming) = group_file(u, id).expect("the file's message");
        assert_eq!(incoming.group(), Some(id));
        let offers = u.engine.store().file_offers(&file.id()).unwrap();
        assert_eq!(offers.len(), 1);
        let source = offers[0].source.as_ref().expect("not in our own queues");
        assert_eq!(source.queues.len(), 3, "every group relay's queue");
        let fetched = files::fetch(&u.engine, file.id()).await.unwrap();
        assert!(fetched.complete, "{}", u.card.name());
        let out = dir.path().join(format!("out-{}", u.peer()));
        let saved = files::export(u.engine.store(), &file.id(), &out).unwrap();
        assert_eq!(std::fs::read(saved).unwrap(), bytes);
        // A group queue's chunks are every member's: fetching deletes none.
        files::release(&u.engine, file.id()).await.unwrap();
        let held: usize = net.inner.lock().chunks.values().map(HashMap::len).sum();
        assert_eq!(held, all_chunks);
    }
}

#[tokio::test]
async fn a_file_goes_under_the_key_its_chunks_are_in_and_a_removed_member_gets_none() {
    use crate::files::{self, To};
    let (_net, admin, members, group_relays, id) = town(3).await;
    let before = epochs(&members[0], id)[0];
    let gone = &members[2];
    admin
        .engine
        .change_group(id, GroupChange::Remove(gone.peer()))
        .await
        .unwrap();
    admin.engine.deliver_now().await.unwrap();
    members[0].sync().await;
    let after = epochs(&members[0], id)[0];
    assert_ne!(after, before);
    // Chunks put under the old key (an upload that began before the removal) do not
    // go with a post under the new one: the upload goes again.
    let file = kkachi_protocol::file::FileRef {
        key: kkachi_protocol::file::FileKey([1; 32]),
        manifest: kkachi_protocol::file::ChunkId([2; 32]),
        size: 10,
        name: "a.txt".into(),
        mime: "text/plain".into(),
        thumbnail: Vec::new(),
    };
    let stale = members[0]
        .engine
        .send_group_file(
            id,
            file.clone(),
            Vec::new(),
            Some((before, group_relays.clone())),
            WriteSet::default(),
        )
        .await;
    assert!(matches!(stale, Err(EngineError::Changed(_))), "{stale:?}");
    // Nor with the group's relays changed since they went up.
    let elsewhere = members[0]
        .engine
        .send_group_file(
            id,
            file,
            Vec::new(),
            Some((after, group_relays[..2].to_vec())),
            WriteSet::default(),
        )
        .await;
    assert!(
        matches!(elsewhere, Err(EngineError::Changed(_))),
        "{elsewhere:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (_, _, report) = send_file(&members[0], To::Group(id), dir.path(), "roster.txt", 40).await;
    // A small file: on every group relay.
    assert_eq!((report.members, report.copies), (2, 3));
    members[0].engine.deliver_now().await.unwrap();
    members[1].sync().await;
    let (file, _) = group_file(&members[1], id).expect("the file's message");
    assert!(
        files::fetch(&members[1].engine, file.id())
            .await
            .unwrap()
            .complete
    );
    let offers = members[1].engine.store().file_offers(&file.id()).unwrap();
    let source = offers[0].source.clone().expect("in group queues");
    assert_eq!(source.epoch, after);
    let queues: Vec<[u8; 32]> = source.queues.iter().map(|q| q.1).collect();
    let new_key = kkachi_protocol::group::large::EpochKey::from_bytes(
        members[1]
            .engine
            .store()
            .group(&id)
            .unwrap()
            .unwrap()
            .large
            .epochs
            .iter()
            .find(|e| e.id == after)
            .unwrap()
            .key,
    );
    let expected: Vec<[u8; 32]> = group_relays
        .iter()
        .map(|r| new_key.queue_key(&crate::net::peer_of(r).unwrap()).0)
        .collect();
    assert_eq!(queues, expected, "in the new epoch's queues");
    // The removed member sees neither the message nor the file.
    gone.sync().await;
    gone.sync().await;
    assert!(group_file(gone, id).is_none());
    assert!(gone.engine.store().file_transfers().unwrap().1.is_empty());
}

#[tokio::test]
async fn a_file_passed_on_is_sealed_anew_per_conversation_and_not_put_twice() {
    use crate::files::{self, To};
    let (net, admin, members, _group_relays, id) = town(2).await;
    let (from, to) = (&members[0], &members[1]);
    // A member sends the admin a photo, 1:1.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dam.png");
    image::RgbImage::from_fn(600, 400, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 256) as u8])
    })
    .save(&path)
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let claim = files::prepare(&from.engine, To::Contact(admin.peer()), &path)
        .await
        .unwrap();
    files::upload(&from.engine, claim).await.unwrap();
    admin.sync().await;
    let (_, incoming) = admin.engine.store().file_transfers().unwrap();
    let (original_id, record) = incoming.into_iter().next().expect("offered");
    let original = record.file().unwrap();
    let chunks_before: std::collections::HashSet<ChunkId> = net
        .inner
        .lock()
        .chunks
        .values()
        .flat_map(|c| c.keys().map(|(_, id)| *id))
        .collect();
    // Not fetched yet: it cannot be passed on.
    let early = files::prepare_forward(&admin.engine, To::Contact(to.peer()), original_id).await;
    assert!(
        matches!(early, Err(files::FilesError::Refused(ref why)) if why.contains("fetch it first"))
    );
    assert!(
        files::fetch(&admin.engine, original_id)
            .await
            .unwrap()
            .complete
    );

    // Passed on to another contact: sealed anew, fetched whole there.
    let forward = |to: To| {
        let admin = &admin;
        async move {
            let claim = files::prepare_forward(&admin.engine, to, original_id)
                .await
                .unwrap();
            let sent = claim.id;
            (sent, files::upload(&admin.engine, claim).await.unwrap())
        }
    };
    let (sent, report) = forward(To::Contact(to.peer())).await;
    assert!(report.message_sent);
    assert!(report.bytes > bytes.len() as u64, "put once: {report:?}");
    assert_ne!(sent, original_id, "another file to the relays and to them");
    to.sync().await;
    let got = to
        .engine
        .store()
        .incoming_file(&sent)
        .unwrap()
        .expect("offered");
    let file = got.file().unwrap();
    assert_eq!((file.name.as_str(), file.size), ("dam.png", original.size));
    assert!(!original.thumbnail.is_empty(), "a photo has a preview");
    assert_eq!(
        file.thumbnail, original.thumbnail,
        "its preview goes with it"
    );
    assert!(files::fetch(&to.engine, sent).await.unwrap().complete);
    let out = dir.path().join("out");
    let saved = files::export(to.engine.store(), &sent, &out).unwrap();
    assert_eq!(std::fs::read(saved).unwrap(), bytes);
    // No chunk a relay holds for them is one it held for the first conversation.
    let chunks_after: std::collections::HashSet<ChunkId> = net
        .inner
        .lock()
        .chunks
        .values()
        .flat_map(|c| c.keys().map(|(_, id)| *id))
        .collect();
    let new: Vec<&ChunkId> = chunks_after.difference(&chunks_before).collect();
    let chunks = kkachi_protocol::file::chunk_count(bytes.len() as u64);
    assert_eq!(
        new.len(),
        chunks + 1,
        "every chunk and the manifest, all new"
    );

    // Passed on to them again: the relays hold it still, nothing is put.
    let (again, report) = forward(To::Contact(to.peer())).await;
    assert_eq!(again, sent, "the same chunks");
    assert!(report.message_sent);
    assert_eq!(report.bytes, 0, "nothing put twice");

    // Into the group with group relays: once, then again for nothing.
    let (in_group, report) = forward(To::Group(id)).await;
    assert!(report.message_sent && report.group_relays);
    assert!(report.bytes > 0);
    assert_ne!(in_group, sent);
    let (_, report) = forward(To::Group(id)).await;
    assert_eq!(report.bytes, 0, "the group queues hold it");
    from.sync().await;
    let (file, _) = group_file(from, id).expect("the file in the group");
    assert_eq!(file.id(), in_group);
    assert!(files::fetch(&from.engine, in_group).await.unwrap().complete);
}

#[tokio::test]
async fn a_reference_sent_on_first_by_someone_else_neither_hides_the_file_nor_takes_it_away() {
    use crate::files::{self, To};
    let (_net, admin, members, _group_relays, id) = town(2).await;
    let (author, victim) = (&members[0], &members[1]);
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _, _) = send_file(author, To::Group(id), dir.path(), "levels.csv", 300_000).await;
    // The admin reads the reference in the group and sends it, unchanged, 1:1 to the
    // victim: a message saying the chunks are in the victim's own queues (they are
    // not), which may well be taken in before the group's.
    admin.sync().await;
    let (file, _) = group_file(&admin, id).expect("the admin has it");
    let decoy = admin
        .engine
        .send_file(victim.peer(), file.clone(), WriteSet::default())
        .await
        .unwrap();
    admin.engine.deliver_now().await.unwrap();
    victim.sync().await;
    let record = victim
        .engine
        .store()
        .incoming_file(&file.id())
        .unwrap()
        .unwrap();
    assert_eq!(
        record.contact(),
        Some(admin.peer()),
        "the admin's came first"
    );
    let offers = victim.engine.store().file_offers(&file.id()).unwrap();
    assert_eq!(offers.len(), 2, "both messages are noted: {offers:?}");
    assert!(offers[0].source.is_none(), "one said our own queues");
    assert!(offers[1].source.is_some(), "the other the group's");
    // Fetched from the group's queues, whichever came first.
    assert!(
        files::fetch(&victim.engine, file.id())
            .await
            .unwrap()
            .complete
    );
    // The decoy deleted: the file stays, named by the group's message.
    victim
        .engine
        .delete_for_me(admin.peer(), decoy.queued.id)
        .await
        .unwrap();
    files::sweep(victim.engine.store()).unwrap();
    let kept = victim
        .engine
        .store()
        .incoming_file(&file.id())
        .unwrap()
        .expect("kept for the group's message");
    assert_eq!(kept.group(), Some(id));
    let out = dir.path().join("out");
    let saved = files::export(victim.engine.store(), &file.id(), &out).unwrap();
    assert_eq!(std::fs::read(saved).unwrap(), bytes);
}

#[tokio::test]
async fn a_group_file_short_of_copies_is_done_once_the_key_changes() {
    use crate::files::{self, To};
    let (net, admin, members, group_relays, id) = town(3).await;
    net.set_up(&group_relays[0], false);
    let dir = tempfile::tempdir().unwrap();
    let sender = &members[0];
    let (_, file_id, report) = send_file(sender, To::Group(id), dir.path(), "note.txt", 16).await;
    // A small file goes to every group relay: one is down, so it went short.
    assert!(report.message_sent);
    assert_eq!(report.copies, 2);
    let outgoing = |u: &User| u.engine.store().outgoing_file(&file_id).unwrap().unwrap();
    assert!(!outgoing(sender).finished);
    let spool = sender
        .engine
        .store()
        .home()
        .join("files/out")
        .join(crate::files::hex(&file_id));
    assert!(spool.exists(), "kept to put the missing copies");
    // A removal makes a new key: copies under the old one are no longer topped up,
    // and the file is done (nothing tried again, the sealed copy gone).
    admin
        .engine
        .change_group(id, GroupChange::Remove(members[2].peer()))
        .await
        .unwrap();
    admin.engine.deliver_now().await.unwrap();
    sender.sync().await;
    net.set_up(&group_relays[0], true);
    let claim = sender.engine.transfers().claim(false, file_id).unwrap();
    let again = files::upload(&sender.engine, claim).await.unwrap();
    assert_eq!(again.bytes, 0);
    assert!(outgoing(sender).finished, "saved as done");
    assert!(!spool.exists());
}

#[tokio::test]
async fn many_added_at_once_are_one_line() {
    let (net, admin, members, _group_relays, id) = town(1).await;
    let mut newcomers = Vec::new();
    for i in 0..6 {
        let m = User::started(&net, &format!("n{i}"), 1).await;
        admin.add_contact(&m);
        m.add_contact(&admin);
        m.regrant().await;
        newcomers.push(m);
    }
    admin.regrant().await;
    let peers = newcomers.iter().map(User::peer).collect();
    admin
        .engine
        .change_group(id, GroupChange::Add(peers))
        .await
        .unwrap();
    admin.engine.deliver_now().await.unwrap();
    members[0].sync().await;
    let lines: Vec<String> = members[0]
        .engine
        .store()
        .group_messages(&id)
        .unwrap()
        .into_iter()
        .filter(|m| m.event && m.message.text.starts_with("admin added n"))
        .map(|m| m.message.text)
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].ends_with(
            "added n0 (not a contact), n1 (not a contact), n2 (not a contact) and 3 more"
        ),
        "{lines:?}"
    );
}

#[tokio::test]
async fn every_device_of_a_member_reads_the_group_and_posts_in_it_under_numbers_of_its_own() {
    let (net, admin, members, _, id) = town(2).await;
    let (laptop, bob) = (&members[0], &members[1]);
    // Her phone joins her account after she joined the group: it holds what her laptop
    // held then. No admin wraps a key for it.
    let phone = super::devices::second_device(&net, laptop, "phone");
    phone.regrant().await;
    laptop.regrant().await;

    // A new epoch (Carol added), wrapped for her laptop's key only: the laptop sends its
    // key to the phone, which reads the group under it.
    let carol = User::started(&net, "carol", 1).await;
    admin.add_contact(&carol);
    carol.add_contact(&admin);
    carol.regrant().await;
    admin.regrant().await;
    admin
        .engine
        .change_group(id, GroupChange::Add(vec![carol.peer()]))
        .await
        .unwrap();
    admin.engine.deliver_now().await.unwrap();
    let newest = epochs(&admin, id)[0];
    laptop.sync().await;
    assert_eq!(epochs(laptop, id).first(), Some(&newest));
    laptop.engine.settle().await.unwrap();
    phone.sync().await;
    assert_eq!(
        epochs(&phone, id).first(),
        Some(&newest),
        "the phone holds the epoch no admin wrapped for it"
    );
    bob.sync().await;
    carol.sync().await;

    // Both of her devices post before either hears of the other's post: each numbers
    // its own, so neither takes the other's place anywhere.
    laptop
        .engine
        .send_group(id, "from her laptop".into())
        .await
        .unwrap();
    phone
        .engine
        .send_group(id, "from her phone".into())
        .await
        .unwrap();
    laptop.engine.deliver_now().await.unwrap();
    phone.engine.deliver_now().await.unwrap();
    let both = ["from her laptop", "from her phone"];
    for reader in [bob, &carol, &admin] {
        reader.sync().await;
        let texts = shown_texts(reader, id);
        for text in both {
            assert_eq!(
                texts.iter().filter(|t| *t == text).count(),
                1,
                "{text:?} once at {}: {texts:?}",
                reader.card.name()
            );
        }
        // Two chains of hers, each whole.
        let record = reader.engine.store().group(&id).unwrap().unwrap();
        let hers: Vec<_> = record
            .large
            .chains
            .iter()
            .filter(|c| c.author == *laptop.card.identity().ed25519())
            .collect();
        assert_eq!(hers.len(), 2, "one chain per device");
        assert!(hers.iter().all(|c| c.head() == 1 && c.missing() == 0));
    }
    // Each of her devices shows the other's post as hers, once.
    laptop.sync().await;
    phone.sync().await;
    for (device, other) in [(laptop, "from her phone"), (&phone, "from her laptop")] {
        let ours: Vec<_> = device
            .engine
            .store()
            .group_messages(&id)
            .unwrap()
            .into_iter()
            .filter(|m| !m.event && m.message.text == other)
            .collect();
        assert_eq!(ours.len(), 1, "{other:?} once");
        assert!(ours[0].author().is_none(), "shown as hers");
        assert_eq!(ours[0].message.state, MessageState::SentElsewhere);
    }
    println!(
        "a large group on two devices: both read it under an epoch wrapped for one; two posts at once, one per device chain, each shown once at every member"
    );
}

#[tokio::test]
async fn a_member_making_up_devices_gets_no_more_chains_than_an_account_has() {
    use kkachi_protocol::group::Hlc;
    use kkachi_protocol::group::large::{EpochId, EpochKey, Post, PostBody};
    let (net, admin, members, group_relays, id) = town(2).await;
    let (mallory, reader) = (&members[0], &members[1]);
    let held = reader.engine.store().group(&id).unwrap().unwrap();
    let epoch = &held.large.epochs[0];
    let key = EpochKey::from_bytes(epoch.key);
    // Mallory signs posts as her account from twenty devices of her own making (each a
    // session key of her identity), and puts them into the group queue herself.
    let mut rng = rand_core::OsRng;
    for i in 0..20u64 {
        let device = mallory.engine.identity().with_new_session_key(&mut rng);
        let post = Post::sign(
            &device,
            id,
            EpochId(epoch.id),
            1,
            MessageId([0; 16]),
            Hlc {
                ms: now_ms(),
                count: 0,
            },
            PostBody::Message {
                seconds: 0,
                text: format!("device {i}"),
            },
        )
        .unwrap();
        for relay in &group_relays {
            let queue = key.queue_key(&crate::net::peer_of(relay).unwrap());
            let envelope = Envelope {
                expires_at: now_ms() / 1000 + 3600,
                payload: post.seal(&key, &mut rng),
            };
            let put = ClientToRelay::PutGroup {
                items: vec![kkachi_protocol::wire::Addressed {
                    write: kkachi_protocol::WriteKey(queue.0),
                    envelope,
                }],
            };
            net.request(relay, put).await.unwrap();
        }
    }
    reader.sync().await;
    let shown = shown_texts(reader, id);
    assert_eq!(
        shown.len(),
        16,
        "sixteen devices' posts, no more: {shown:?}"
    );
    let record = reader.engine.store().group(&id).unwrap().unwrap();
    let hers = record
        .large
        .chains
        .iter()
        .filter(|c| c.author == *mallory.card.identity().ed25519())
        .count();
    assert_eq!(hers, 16);
    // Everyone else still gets through.
    admin
        .engine
        .send_group(id, "still here".into())
        .await
        .unwrap();
    admin.engine.deliver_now().await.unwrap();
    reader.sync().await;
    assert!(shown_texts(reader, id).iter().any(|t| t == "still here"));
}

#[tokio::test]
async fn a_device_taken_out_gets_no_key_of_a_large_group_made_after() {
    let (_net, admin, members, _, id) = town(2).await;
    let laptop = &members[0];
    // Her laptop is an admin; her phone reads the group under the keys it sends it.
    admin
        .engine
        .change_group(id, GroupChange::Admin(laptop.peer(), true))
        .await
        .unwrap();
    admin.engine.deliver_now().await.unwrap();
    laptop.sync().await;
    let phone = super::devices::second_device(&_net, laptop, "phone");
    phone.regrant().await;
    laptop.regrant().await;
    laptop.engine.housekeeping().await.unwrap();
    laptop.engine.settle().await.unwrap();
    phone.sync().await;
    let before = epochs(laptop, id)[0];
    assert!(epochs(&phone, id).contains(&before));

    // The phone is lost: taken out. The laptop, an admin, makes a new epoch at once,
    // sealed to no device of hers but itself.
    laptop.engine.remove_device("phone".into()).await.unwrap();
    laptop.engine.housekeeping().await.unwrap();
    laptop.engine.settle().await.unwrap();
    let after = epochs(laptop, id)[0];
    assert_ne!(
        after, before,
        "a new epoch once a device that held the keys left"
    );
    admin.sync().await;
    assert_eq!(epochs(&admin, id)[0], after, "the group takes it");
    phone.sync().await;
    phone.sync().await;
    assert!(
        !epochs(&phone, id).contains(&after),
        "the phone taken out holds no key made after"
    );
}
