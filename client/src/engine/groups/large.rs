//! The large tier of groups (SPEC §14.5): one key per epoch, handed to members in key
//! records, and a group queue per epoch on each group relay that every member reads.
//! A message is signed by its author, sealed once per relay under the epoch's key and
//! put there: one envelope per relay, whatever the number of members.
//!
//! What stays as in the small tier: the membership log and its merge, how operations
//! reach the members the author reaches over sessions, and how messages are shown and
//! wait for their author's right to post.

use std::collections::BTreeMap;

use kkachi_protocol::content::GroupBody;
use kkachi_protocol::envelope::{DEFAULT_TTL_SECS, Envelope};
use kkachi_protocol::group::large::{
    DeviceTag, EPOCHS_READ, EpochId, EpochKey, Have, KeyRecord, MAX_HAVE_AUTHORS, MAX_POST_OPS,
    Post, PostBody, open_item, usable_key,
};
use kkachi_protocol::group::{GroupId, Hlc, Role, Roster, SignedOp, have_digest};
use kkachi_protocol::{GroupKey, MessageId, Multiaddr, PeerId};

use super::super::EngineError;
use super::super::receive::Received;
use super::super::state::{Sessions, State, relay_peer};
use super::{FAR_AHEAD_MS, MAX_AHEAD_MS, Posting, new_record};
use crate::store::{
    Chain, Direction, FileNote, GroupMessage, GroupRecord, HeldEpoch, LargeState, LocalStore,
    MAX_EPOCHS_KEPT, MAX_EPOCHS_PER_MAKER, MAX_HELD_POSTS, MessageState, OutboxEntry, OutboxKind,
    Target, WriteSet, group_key,
};

/// How often, at most, we post our have in one group while something new arrives.
pub(crate) const HAVE_EVERY_MS: u64 = 30_000;
/// How often, at most, we post our whole log in one group for a have whose digest
/// differs from ours.
const LOG_EVERY_MS: u64 = 10 * 60 * 1000;
/// How long an admin who neither made a change nor is the group's first admin waits,
/// with the current epoch unsound, before making a new one itself: the first admin
/// (lowest identity key) does it at once, so several admins do not all rotate.
const ROTATE_GRACE_MS: u64 = 60_000;
/// How often, at most, we put again in one group messages of ours that a member's
/// have says they lack, and how many at a time.
const REPAIR_EVERY_MS: u64 = 30_000;
const REPAIR_MAX: usize = 16;
/// How old the current epoch may grow before the group's first admin makes a new one
/// (keys change now and then even when nobody comes or goes).
const ROTATE_EVERY_MS: u64 = 7 * 24 * 3600 * 1000;
/// How far past the highest epoch held an epoch's number may be.
const MAX_EPOCH_JUMP: u64 = 64;
/// Members' X25519 keys, each member's every known one.
type MemberKeys = BTreeMap<[u8; 32], Vec<[u8; 32]>>;

/// A group queue we read and put into: one epoch's, on one group relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupQueue {
    /// How the owner's polls name it: `ADDR#group-<epoch id>`.
    pub(crate) name: String,
    /// The group relay's address.
    pub(crate) relay: String,
    /// Its group.
    pub(crate) group: GroupId,
    /// Its epoch.
    pub(crate) epoch: [u8; 32],
    /// Its key (opens, reads and puts).
    pub(crate) key: GroupKey,
}

/// The poll name of epoch `epoch`'s group queue on `relay` (a multiaddr has no `#`).
pub(crate) fn group_poll_name(relay: &str, epoch: &[u8; 32]) -> String {
    let hex: String = epoch.iter().map(|b| format!("{b:02x}")).collect();
    format!("{relay}#group-{hex}")
}

/// The relay a poll name made by [`group_poll_name`] names, if it is one.
pub(crate) fn group_poll_relay(name: &str) -> Option<&str> {
    name.split_once("#group-").map(|(relay, _)| relay)
}

/// The peer id of the Ed25519 identity key `key`.
fn peer_of_key(key: &[u8; 32]) -> Option<PeerId> {
    let ed = kkachi_protocol::libp2p_identity::ed25519::PublicKey::try_from_bytes(key).ok()?;
    Some(kkachi_protocol::libp2p_identity::PublicKey::from(ed).to_peer_id())
}

/// The epoch members write under: the winner among those an admin made.
fn current<'a>(large: &'a LargeState, roster: &Roster) -> Option<&'a HeldEpoch> {
    large
        .epochs
        .iter()
        .filter(|e| roster.role(&e.author) == Some(Role::Admin))
        .max_by_key(|e| e.rank())
}

/// The epochs members may be reading: every one an admin made that they keep (at
/// most [`EPOCHS_READ`]), so two who hold any epoch in common hear of each other's
/// new ones.
fn readable_epochs(large: &LargeState, roster: &Roster) -> Vec<HeldEpoch> {
    let mut epochs: Vec<&HeldEpoch> = large
        .epochs
        .iter()
        .filter(|e| roster.role(&e.author) == Some(Role::Admin))
        .collect();
    epochs.sort_by_key(|e| std::cmp::Reverse(e.rank()));
    epochs.into_iter().take(EPOCHS_READ).cloned().collect()
}

/// Whether `epoch` gave its key to a key no member holds.
fn names_outsider(epoch: &HeldEpoch, keys: &MemberKeys) -> bool {
    epoch
        .tags
        .iter()
        .any(|t| !keys.values().flatten().any(|x| x[..8] == t[..]))
}

/// Whether `epoch`, every part held, misses a member (with a usable key, none of whose
/// keys it wraps).
fn misses_member(epoch: &HeldEpoch, keys: &MemberKeys) -> bool {
    epoch.records.len() == usize::from(epoch.parts)
        && keys.values().any(|xs| {
            !xs.is_empty()
                && !xs
                    .iter()
                    .any(|x| epoch.tags.iter().any(|t| t[..] == x[..8]))
        })
}

/// Keeps `epoch` among `epochs` (merging the parts of one we hold): the current one,
/// then admins' by rank, then others'; at most [`MAX_EPOCHS_PER_MAKER`] of one maker
/// and [`MAX_EPOCHS_KEPT`] in all, so no maker can push the current epoch out.
fn keep_epoch(epochs: &mut Vec<HeldEpoch>, epoch: HeldEpoch, roster: &Roster) {
    match epochs.iter_mut().find(|e| e.id == epoch.id) {
        Some(held) => {
            for r in epoch.records {
                if !held.records.contains(&r) {
                    held.records.push(r);
                }
            }
            for t in epoch.tags {
                if !held.tags.contains(&t) {
                    held.tags.push(t);
                }
            }
        }
        None => epochs.push(epoch),
    }
    let admin = |e: &HeldEpoch| roster.role(&e.author) == Some(Role::Admin);
    epochs.sort_by_key(|e| std::cmp::Reverse((admin(e), e.rank())));
    let mut per_maker: BTreeMap<[u8; 32], usize> = BTreeMap::new();
    let mut first = true;
    epochs.retain(|e| {
        let n = per_maker.entry(e.author).or_default();
        *n += 1;
        // The first is the current one (or the best there is): always kept.
        std::mem::take(&mut first) || *n <= MAX_EPOCHS_PER_MAKER
    });
    epochs.truncate(MAX_EPOCHS_KEPT);
}

/// Epoch `epoch`'s group queue on each of the group's relays, and its key there.
fn epoch_queues(epoch: &HeldEpoch, roster: &Roster) -> Vec<(Multiaddr, GroupKey)> {
    let key = EpochKey::from_bytes(epoch.key);
    roster
        .relays
        .iter()
        .filter_map(|addr| Some((addr.clone(), key.queue_key(&relay_peer(addr)?))))
        .collect()
}

/// Most chains one author's posts may open (one per device: an account lists at most 8
/// at once, and a device under a new key numbers afresh). Posts of a device beyond are
/// dropped: a member making up devices harms only their own posts.
const MAX_CHAINS_PER_AUTHOR: usize = 16;

/// Takes number `seq` of `author`'s device `device` in: false if it was held already,
/// or that device would be one chain too many of theirs.
fn take_number(large: &mut LargeState, author: [u8; 32], device: DeviceTag, seq: u64) -> bool {
    let known = large
        .chains
        .iter()
        .any(|c| c.author == author && c.device == device);
    if !known && large.chains.iter().filter(|c| c.author == author).count() >= MAX_CHAINS_PER_AUTHOR
    {
        tracing::debug!("a member's posts from more devices than any account has: dropped");
        return false;
    }
    chain_of(large, author, device).take(seq)
}

/// `author`'s device `device`'s chain of numbered posts (each device numbers its own).
fn chain_of(large: &mut LargeState, author: [u8; 32], device: DeviceTag) -> &mut Chain {
    let i = match large
        .chains
        .iter()
        .position(|c| c.author == author && c.device == device)
    {
        Some(i) => i,
        None => {
            large.chains.push(Chain {
                author,
                device,
                ..Chain::default()
            });
            large.chains.len() - 1
        }
    };
    &mut large.chains[i]
}

fn invalid(e: impl std::fmt::Display) -> EngineError {
    EngineError::Invalid(e.to_string())
}

impl<T> State<T> {
    /// The group queues of every large group we are in: the newest [`EPOCHS_READ`]
    /// epochs' on every group relay.
    pub(crate) fn group_queues(&self) -> Result<Vec<GroupQueue>, EngineError> {
        let mut out = Vec::new();
        for (id, record) in self.store.groups()? {
            if !record.joined || record.forgotten || record.large.epochs.is_empty() {
                continue;
            }
            let Some(roster) = self.merged(id, &record)?.roster else {
                continue;
            };
            if !roster.members.contains_key(&self.own_key()) {
                continue;
            }
            // The current epoch and the admins' newest: where members write.
            for e in readable_epochs(&record.large, &roster) {
                for (addr, key) in epoch_queues(&e, &roster) {
                    let relay = addr.to_string();
                    out.push(GroupQueue {
                        name: group_poll_name(&relay, &e.id),
                        relay,
                        group: id,
                        epoch: e.id,
                        key,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Each member's X25519 keys: the one their add named and, if we hold a card of
    /// theirs (a contact, or a member met in a group), its key. Every one is wrapped for
    /// and none counts as an outsider's, so admins and members who know different cards
    /// agree. Ours: this device's, the one our add named (unless our set took it out) and
    /// every other device's our set lists: none of them is an outsider's. Keys of low
    /// order are left out (no wrap is made for them, and they are missed by no one).
    fn member_keys(&self, roster: &Roster) -> Result<MemberKeys, EngineError> {
        self.member_keys_for(roster, false)
    }

    /// [`State::member_keys`], or (`wrapping`) the keys an epoch we make is wrapped for:
    /// the same but ours, which is the one our add named (every member knows it) unless
    /// our set took it out, then this device's. Our other devices, whose keys members
    /// may not know, get the epoch's key from the device that holds it (SPEC §15.2).
    fn member_keys_for(&self, roster: &Roster, wrapping: bool) -> Result<MemberKeys, EngineError> {
        let me = self.own_key();
        let this = self.me.x25519_public();
        let (listed, removed) = self.with_own(|own| {
            let removed: Vec<[u8; 32]> = own
                .keys
                .iter()
                .filter(|k| **k != this && !own.listed.contains(k))
                .copied()
                .collect();
            (own.listed.clone(), removed)
        })?;
        let mut out = BTreeMap::new();
        for (key, m) in &roster.members {
            let mut xs = Vec::with_capacity(2);
            if *key == me {
                let added = *m.identity.x25519();
                if wrapping {
                    // Never a key our set took out, which a copy of an old device holds.
                    xs.push(if removed.contains(&added) {
                        this
                    } else {
                        added
                    });
                } else {
                    // The add's key counts as ours even once taken out: every member
                    // wraps for it until a new add names another.
                    xs.push(this);
                    if added != this {
                        xs.push(added);
                    }
                    xs.extend(listed.iter().filter(|k| **k != this && **k != added));
                }
            } else {
                xs.push(*m.identity.x25519());
                if let Some(c) = self.store.contact(&m.identity.peer_id())?
                    && c.card.identity().ed25519() == key
                    && !xs.contains(c.card.identity().x25519())
                {
                    xs.push(*c.card.identity().x25519());
                }
            }
            xs.retain(usable_key);
            out.insert(*key, xs);
        }
        Ok(out)
    }

    /// Makes a new epoch of group `id` (we are an admin): its key wrapped for every
    /// member's key, held as ours, its queue opened by the owner, its record posted in
    /// the queue of the epoch it replaces and in its own, and sealed to the members we
    /// reach whom that epoch did not name (added since: they cannot read its queue).
    /// What of ours waited for an epoch goes under it.
    pub(super) fn new_epoch(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        id: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
        now: u64,
    ) -> Result<(), EngineError> {
        let me = self.own_key();
        let keys = self.member_keys(roster)?;
        let previous = current(&record.large, roster).cloned();
        let number = record
            .large
            .epochs
            .iter()
            .map(|e| e.number)
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        let cap = Hlc {
            ms: now.saturating_add(MAX_AHEAD_MS),
            count: 0,
        };
        let hlc = record.hlc().max(roster.latest.min(cap)).tick(now);
        record.set_hlc(hlc);
        let key = EpochKey::generate(&mut rand::rngs::OsRng);
        let wrapped: Vec<[u8; 32]> = self
            .member_keys_for(roster, true)?
            .values()
            .flatten()
            .copied()
            .collect();
        let parts = KeyRecord::make(&self.me, id, number, hlc, &key, &wrapped).map_err(invalid)?;
        let epoch = HeldEpoch {
            id: key.id(&id).0,
            number,
            hlc: (hlc.ms, hlc.count),
            author: me,
            key: *key.to_bytes(),
            records: parts.iter().map(|p| p.encode().to_vec()).collect(),
            tags: parts.iter().flat_map(|p| p.tags().copied()).collect(),
            parts: parts.len() as u8,
        };
        keep_epoch(&mut record.large.epochs, epoch.clone(), roster);
        record.large.unsound_since_ms = 0;
        // Posted in the queue of every epoch members may be reading (concurrent epochs
        // of other admins among them), and in its own.
        let readable = readable_epochs(&record.large, roster);
        for part in &parts {
            let body = PostBody::Key(Box::new(part.clone()));
            for under in &readable {
                self.post_under(w, id, record, roster, under, body.clone(), now)?;
            }
        }
        for (k, m) in &roster.members {
            let named_before = previous
                .as_ref()
                .is_some_and(|p| keys[k].iter().any(|x| p.tags.contains(&tag(x))));
            if *k == me || named_before {
                continue;
            }
            if let Some(contact) = self.reachable(&m.identity.peer_id())? {
                let session = sessions.get(&self.store, &contact)?;
                for part in &parts {
                    let what = GroupBody::Key {
                        record: Box::new(part.clone()),
                    };
                    self.queue_group_record(w, &contact, session, id, what, now)?;
                }
                session.write(w, &contact.peer);
            }
        }
        tracing::info!(group = %id.to_hex(), number, members = keys.len(), "new group epoch");
        self.release_held(w, id, record, roster, now)?;
        self.group_queues_changed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// A new epoch if we are an admin and the current one is missing, made by someone
    /// who is no admin, wrapped for a key no member holds, or missing a member's key:
    /// at once if we made the change (`acting`) or are the group's first admin (lowest
    /// identity key), else once it has stayed so for [`ROTATE_GRACE_MS`], so several
    /// admins seeing one change do not all make an epoch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn keep_epoch_sound(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        id: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
        acting: bool,
        now: u64,
    ) -> Result<bool, EngineError> {
        let me = self.own_key();
        if roster.relays.is_empty() || roster.role(&me) != Some(Role::Admin) || !record.joined {
            return Ok(false);
        }
        let keys = self.member_keys(roster)?;
        let sound = current(&record.large, roster)
            .is_some_and(|e| !names_outsider(e, &keys) && !misses_member(e, &keys));
        if sound {
            record.large.unsound_since_ms = 0;
            return Ok(false);
        }
        if record.large.unsound_since_ms == 0 {
            record.large.unsound_since_ms = now;
        }
        let first_admin = roster.admins().min() == Some(&me);
        let waited = now.saturating_sub(record.large.unsound_since_ms) >= ROTATE_GRACE_MS;
        if !(acting || first_admin || waited) {
            return Ok(false);
        }
        self.new_epoch(w, sessions, id, record, roster, now)?;
        Ok(true)
    }

    /// The epoch we may write under in group `record`: the current one, unless it gave
    /// its key to a key no member holds.
    fn usable_epoch(
        &self,
        record: &GroupRecord,
        roster: &Roster,
    ) -> Result<Option<HeldEpoch>, EngineError> {
        let keys = self.member_keys(roster)?;
        Ok(current(&record.large, roster)
            .filter(|e| !names_outsider(e, &keys))
            .cloned())
    }

    /// The group queues of epoch `epoch` of group `group` on its relays now (none if we
    /// do not hold that epoch, or the group).
    pub(crate) fn epoch_queues_of(
        &self,
        group: GroupId,
        epoch: [u8; 32],
    ) -> Result<Vec<(Multiaddr, GroupKey)>, EngineError> {
        let Some(record) = self.store.group(&group)? else {
            return Ok(Vec::new());
        };
        let Some(roster) = self.merged(group, &record)?.roster else {
            return Ok(Vec::new());
        };
        Ok(record
            .large
            .epochs
            .iter()
            .find(|e| e.id == epoch)
            .map(|e| epoch_queues(e, &roster))
            .unwrap_or_default())
    }

    /// Where a file for large group `record` goes: the group queues of the epoch we may
    /// write under, on every group relay.
    pub(super) fn large_file_route(
        &self,
        record: &GroupRecord,
        roster: &Roster,
    ) -> Result<super::GroupFileRoute, EngineError> {
        let Some(epoch) = self.usable_epoch(record, roster)? else {
            return Ok(super::GroupFileRoute::Waiting);
        };
        Ok(super::GroupFileRoute::Relays {
            epoch: epoch.id,
            queues: epoch_queues(&epoch, roster),
            members: roster.members.len().saturating_sub(1),
        })
    }

    /// Seals `post` under `epoch` once for each group relay and queues it there.
    fn queue_post(
        &self,
        w: &mut WriteSet,
        id: GroupId,
        roster: &Roster,
        epoch: &HeldEpoch,
        post: &Post,
        now: u64,
    ) -> Result<(), EngineError> {
        let key = EpochKey::from_bytes(epoch.key);
        let expires_at = now / 1000 + DEFAULT_TTL_SECS;
        for addr in &roster.relays {
            let Some(peer) = relay_peer(addr) else {
                continue;
            };
            // Each relay gets its own sealing: relays comparing what they hold cannot
            // tell the copies are one post.
            let envelope = Envelope {
                expires_at,
                payload: post.seal(&key, &mut rand::rngs::OsRng),
            };
            let queue = key.queue_key(&peer);
            let entry = OutboxEntry {
                message_id: post.id().0,
                contact: group_key(&id),
                kind: OutboxKind::Group,
                device: None,
                envelope: envelope.encode(),
                targets: vec![Target {
                    addr: addr.to_string(),
                    acked: false,
                    attempts: 0,
                    next_try_ms: 0,
                    write: queue.0,
                    request: None,
                    epoch: 0,
                }],
                direct_acked: false,
                created_ms: now,
                sealed_on: None,
                resealed_ms: 0,
                queued_ms: now,
                content: Vec::new(),
            };
            LocalStore::write_outbox(w, self.store.next_outbox_seq()?, &entry);
        }
        Ok(())
    }

    /// Posts `body` (not numbered) in group `id` under its current epoch, if one may
    /// carry it; false if none may (it is not posted).
    fn post_unnumbered(
        &self,
        w: &mut WriteSet,
        id: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
        body: PostBody,
        now: u64,
    ) -> Result<bool, EngineError> {
        let Some(epoch) = self.usable_epoch(record, roster)? else {
            return Ok(false);
        };
        self.post_under(w, id, record, roster, &epoch, body, now)?;
        Ok(true)
    }

    /// Posts `body` (not numbered) in group `id` under `epoch`.
    #[allow(clippy::too_many_arguments)]
    fn post_under(
        &self,
        w: &mut WriteSet,
        id: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
        epoch: &HeldEpoch,
        body: PostBody,
        now: u64,
    ) -> Result<(), EngineError> {
        let cap = Hlc {
            ms: now.saturating_add(MAX_AHEAD_MS),
            count: 0,
        };
        let hlc = record.hlc().max(roster.latest.min(cap)).tick(now);
        record.set_hlc(hlc);
        let post = Post::sign(
            &self.me,
            id,
            EpochId(epoch.id),
            0,
            MessageId([0; 16]),
            hlc,
            body,
        )
        .map_err(invalid)?;
        self.queue_post(w, id, roster, epoch, &post, now)
    }

    /// After a change we made in large group `id`: the epoch kept sound (a new one if
    /// someone left or came), and the change's operations posted under the epoch
    /// members held before (a removed member learns of it there) and under the current
    /// one.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn after_change_large(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        id: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
        ops: &[SignedOp],
        now: u64,
    ) -> Result<(), EngineError> {
        let before = current(&record.large, roster).cloned();
        self.keep_epoch_sound(w, sessions, id, record, roster, true, now)?;
        let after = current(&record.large, roster).cloned();
        let mut under = before.into_iter().collect::<Vec<_>>();
        if let Some(e) = after
            && !under.iter().any(|b| b.id == e.id)
        {
            under.push(e);
        }
        for epoch in &under {
            self.post_ops(w, id, record, roster, epoch, ops, now)?;
        }
        Ok(())
    }

    /// Posts `ops` of group `id` in the queue of `epoch` (as many posts as they need).
    /// Operations may go under an epoch a removed member holds: they learn of their
    /// removal, nothing more.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn post_ops(
        &self,
        w: &mut WriteSet,
        id: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
        epoch: &HeldEpoch,
        ops: &[SignedOp],
        now: u64,
    ) -> Result<(), EngineError> {
        let max_body = kkachi_protocol::group::large::MAX_POST_LEN - 1024;
        let mut start = 0;
        while start < ops.len() {
            let mut end = start;
            let mut bytes = 2;
            while end < ops.len()
                && end - start < MAX_POST_OPS
                && (end == start || bytes + 2 + ops[end].encode().len() <= max_body)
            {
                bytes += 2 + ops[end].encode().len();
                end += 1;
            }
            let body = PostBody::Ops(ops[start..end].to_vec());
            self.post_under(w, id, record, roster, epoch, body, now)?;
            start = end;
        }
        Ok(())
    }

    /// Our message in large group `id` (called by `post_to`): signed, numbered in our
    /// chain, sealed under the current epoch once per group relay; held back while no
    /// epoch may carry it (one whose key went to someone who is no member), unless we
    /// are an admin, who makes a new epoch first.
    pub(super) fn post_large(
        &mut self,
        id: GroupId,
        mut record: GroupRecord,
        roster: Roster,
        posting: Posting,
        with: WriteSet,
        now: u64,
    ) -> Result<super::GroupSent, EngineError> {
        let me = self.own_key();
        let cap = Hlc {
            ms: now.saturating_add(MAX_AHEAD_MS),
            count: 0,
        };
        let timer_secs = crate::store::kept_timer(roster.timer_secs);
        let (body, text, file) = match posting {
            Posting::Text(text) => (
                PostBody::Message {
                    seconds: roster.timer_secs,
                    text: text.clone(),
                },
                text,
                None,
            ),
            Posting::File(file) => {
                let note = FileNote::of(&file);
                (
                    PostBody::File {
                        seconds: roster.timer_secs,
                        file,
                    },
                    String::new(),
                    Some(note),
                )
            }
        };
        let own_name = roster.members[&me].name.clone();
        let others = roster.members.len().saturating_sub(1);
        self.with_sessions(|this, sessions| {
            let mut w = with;
            let keys = this.member_keys(&roster)?;
            let usable = |r: &GroupRecord| {
                current(&r.large, &roster)
                    .filter(|e| !names_outsider(e, &keys))
                    .cloned()
            };
            if usable(&record).is_none() && roster.role(&me) == Some(Role::Admin) {
                this.new_epoch(&mut w, sessions, id, &mut record, &roster, now)?;
            }
            let epoch = usable(&record);
            let hlc = record.hlc().max(roster.latest.min(cap)).tick(now);
            record.set_hlc(hlc);
            // This device's chain: started again from 1 if the numbers kept were
            // another device's (a new session key, or a home restored from another).
            let device = this.own_device();
            if record.large.device != device {
                record.large.device = device;
                record.large.next_seq = 1;
                record.large.last_id = [0; 16];
                // What members acknowledged was of the other chain.
                record.large.acks.clear();
                record.large.repaired_ms = 0;
            }
            let seq = record.large.next_seq.max(1);
            let prev = if seq == 1 {
                [0; 16]
            } else {
                record.large.last_id
            };
            // Signed for the epoch it goes under; one held back names the current one
            // and is signed again when an epoch may carry it.
            let epoch_id = epoch
                .as_ref()
                .or(current(&record.large, &roster))
                .map_or([0; 32], |e| e.id);
            let post = Post::sign(
                &this.me,
                id,
                EpochId(epoch_id),
                seq,
                MessageId(prev),
                hlc,
                body,
            )
            .map_err(invalid)?;
            record.large.next_seq = seq + 1;
            record.large.last_id = post.id().0;
            chain_of(&mut record.large, me, device).take(seq);
            match &epoch {
                Some(epoch) => this.queue_post(&mut w, id, &roster, epoch, &post, now)?,
                None => {
                    if record.large.held.len() >= MAX_HELD_POSTS {
                        return Err(EngineError::Invalid(
                            "too many messages wait for an admin to hand out this group's new key; try again later".into(),
                        ));
                    }
                    record
                        .large
                        .held
                        .push((post.encode().to_vec(), record.next_local));
                }
            }
            if timer_secs != 0 {
                let ends = now.saturating_add(u64::from(timer_secs) * 1000);
                record.next_expiry_ms = match record.next_expiry_ms {
                    0 => ends,
                    at => at.min(ends),
                };
                this.note_expiry_due(ends);
            }
            let local = record.next_local;
            record.next_local += 1;
            let mut ours = new_record(post.id(), Direction::Out, &text, now, now, timer_secs);
            ours.file = file;
            let message = GroupMessage {
                from: Vec::new(),
                name: own_name.clone(),
                hlc: (hlc.ms, hlc.count),
                message: ours,
                copies: Vec::new(),
                event: false,
                unseen: false,
                missed: Vec::new(),
                post_seq: seq,
                post_device: device,
                reach: (others as u32, 0, 0),
            };
            LocalStore::write_group_message(&mut w, &id, local, &message);
            // Found again by its id when the relays' answers come.
            if let Ok(pseudo) = PeerId::from_bytes(&group_key(&id)) {
                LocalStore::write_group_copy(&mut w, &pseudo, &post.id().0, &id, local);
            }
            LocalStore::write_group(&mut w, &id, &record);
            this.apply_or_reset(sessions, w)?;
            let unreachable = if epoch.is_some() {
                Vec::new()
            } else {
                vec!["everyone, until an admin hands out the group's new key".to_string()]
            };
            Ok(super::GroupSent {
                id: post.id(),
                copies: if epoch.is_some() { others } else { 0 },
                unreachable,
            })
        })
    }

    /// Our posts that waited for an epoch go under the current one, if it may carry
    /// them (signed again for it: a post names its epoch).
    fn release_held(
        &self,
        w: &mut WriteSet,
        id: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
        now: u64,
    ) -> Result<(), EngineError> {
        if record.large.held.is_empty() {
            return Ok(());
        }
        let Some(epoch) = self.usable_epoch(record, roster)? else {
            return Ok(());
        };
        let pseudo = PeerId::from_bytes(&group_key(&id)).ok();
        for (bytes, local) in std::mem::take(&mut record.large.held) {
            let Ok(old) = Post::decode(&bytes) else {
                continue;
            };
            // The same number, clock and body under the epoch it goes in (a post names
            // its epoch, so its id changes): our copy of the message takes the new id,
            // which is what members show and the relays' answers name.
            let post = Post::sign(
                &self.me,
                id,
                EpochId(epoch.id),
                old.seq(),
                old.prev(),
                old.hlc(),
                old.body().clone(),
            )
            .map_err(invalid)?;
            self.queue_post(w, id, roster, &epoch, &post, now)?;
            if let Some(pseudo) = pseudo
                && let Some((key, mut m)) = self.store.group_copy(&pseudo, &old.id().0)?
            {
                m.message.id = post.id().0;
                LocalStore::rewrite_group_message(w, key, &m);
                LocalStore::write_group_copy(w, &pseudo, &post.id().0, &id, local);
            }
            if record.large.last_id == old.id().0 {
                record.large.last_id = post.id().0;
            }
        }
        Ok(())
    }

    /// Takes in a key record of group `id` (from a post, or over a session): kept if
    /// it counts (SPEC §14.5) and wraps the key for us. Returns whether a new epoch
    /// came.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn take_key_record(
        &self,
        w: &mut WriteSet,
        id: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
        key_record: &KeyRecord,
        known: Option<&EpochKey>,
        now: u64,
    ) -> Result<bool, EngineError> {
        if key_record.group() != id
            || roster.role(key_record.author().ed25519()) != Some(Role::Admin)
            || key_record.hlc().ms > now.saturating_add(FAR_AHEAD_MS)
        {
            return Ok(false);
        }
        let (_, parts) = key_record.part();
        let epoch_id = key_record.epoch().0;
        if let Some(held) = record.large.epochs.iter_mut().find(|e| e.id == epoch_id) {
            // Another part of an epoch we hold: only one that agrees with it.
            let agrees = held.number == key_record.number()
                && held.hlc == (key_record.hlc().ms, key_record.hlc().count)
                && held.parts == parts
                && held.author == *key_record.author().ed25519();
            let bytes = key_record.encode().to_vec();
            if agrees && !held.records.contains(&bytes) && held.records.len() < usize::from(parts) {
                held.records.push(bytes);
                for t in key_record.tags() {
                    if !held.tags.contains(t) {
                        held.tags.push(*t);
                    }
                }
            }
            return Ok(false);
        }
        let highest = record.large.epochs.iter().map(|e| e.number).max();
        if highest.is_some_and(|h| key_record.number() > h.saturating_add(MAX_EPOCH_JUMP)) {
            // Numbered far past every epoch held: it would outrank every later one.
            return Ok(false);
        }
        // Wrapped for us, or sent by another device of ours (which holds it).
        let key = match known.filter(|k| k.id(&id) == key_record.epoch()) {
            Some(key) => key.clone(),
            None => match key_record.unwrap(&self.me) {
                Some(key) => key,
                None => return Ok(false),
            },
        };
        keep_epoch(
            &mut record.large.epochs,
            HeldEpoch {
                id: epoch_id,
                number: key_record.number(),
                hlc: (key_record.hlc().ms, key_record.hlc().count),
                author: *key_record.author().ed25519(),
                key: *key.to_bytes(),
                records: vec![key_record.encode().to_vec()],
                tags: key_record.tags().copied().collect(),
                parts,
            },
            roster,
        );
        tracing::info!(group = %id.to_hex(), number = key_record.number(), "took a group epoch");
        // An admin who holds a newer epoch tells the readers of this one about it: two
        // admins who made epochs at once each post in the queues they read, and members
        // who read only the other's would never learn theirs.
        if roster.role(&self.own_key()) == Some(Role::Admin)
            && let Some(newer) = current(&record.large, roster).cloned()
            && newer.id != epoch_id
            && newer.records.len() == usize::from(newer.parts)
            && let Some(learnt) = record
                .large
                .epochs
                .iter()
                .find(|e| e.id == epoch_id)
                .cloned()
        {
            for part in &newer.records {
                if let Ok(part) = KeyRecord::decode(part) {
                    let body = PostBody::Key(Box::new(part));
                    self.post_under(w, id, record, roster, &learnt, body, now)?;
                }
            }
        }
        self.release_held(w, id, record, roster, now)?;
        self.group_queues_changed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(true)
    }

    /// A key record sealed to us over a session by the admin who made it (we were
    /// added, and cannot read the group queue yet): taken if we are in the group, else
    /// kept with the group (one per epoch, the newest [`MAX_EPOCHS_KEPT`]) until its log
    /// makes us a member.
    pub(super) fn take_sealed_key(
        &self,
        w: &mut WriteSet,
        (sender, sender_peer): ([u8; 32], PeerId),
        id: GroupId,
        key_record: &KeyRecord,
        now: u64,
    ) -> Result<(), EngineError> {
        if key_record.author().ed25519() != &sender {
            // Only its maker seals an epoch's key to someone.
            return Ok(());
        }
        let existing = match LocalStore::pending_group(w, &id) {
            Some(g) => Some(g),
            None => self.store.group(&id)?,
        };
        let mut record = match existing {
            Some(r) => r,
            // The key came before the log (another relay was faster): kept with a
            // group that waits for it, within the bounds of such groups.
            None if self.may_hold_another(w, &sender_peer, now)? => GroupRecord {
                joined_ms: now,
                invited_by: sender_peer.to_bytes(),
                ..GroupRecord::default()
            },
            None => return Ok(()),
        };
        let roster = if record.joined {
            self.merged(id, &record)?.roster
        } else {
            None
        };
        match roster {
            Some(roster) if roster.members.contains_key(&self.own_key()) => {
                self.take_key_record(w, id, &mut record, &roster, key_record, None, now)?;
            }
            _ => {
                let bytes = key_record.encode().to_vec();
                let epoch = key_record.epoch();
                let pending = &mut record.large.pending_keys;
                if !pending.contains(&bytes) {
                    // One part per epoch and part; the oldest goes when full.
                    pending.retain(|b| {
                        KeyRecord::decode(b)
                            .is_ok_and(|k| k.epoch() != epoch || k.part() != key_record.part())
                    });
                    if pending.len() >= MAX_EPOCHS_KEPT {
                        pending.remove(0);
                    }
                    pending.push(bytes);
                }
            }
        }
        LocalStore::write_group(w, &id, &record);
        Ok(())
    }

    /// An epoch key another device of ours holds (SPEC §15.2), with a part of its
    /// record: taken as if it were wrapped for this device (no admin wraps for it),
    /// once we are in the group; kept with the group until its log makes us a member.
    pub(crate) fn take_own_epoch(
        &self,
        w: &mut WriteSet,
        key: &EpochKey,
        key_record: &KeyRecord,
        now: u64,
    ) -> Result<(), EngineError> {
        let id = key_record.group();
        let existing = match LocalStore::pending_group(w, &id) {
            Some(g) => Some(g),
            None => self.store.group(&id)?,
        };
        // The key may come before the group's log (another relay was faster).
        let mut record = existing.unwrap_or_else(|| GroupRecord {
            joined_ms: now,
            invited_by: self.me.peer_id().to_bytes(),
            ..GroupRecord::default()
        });
        if record.forgotten {
            return Ok(());
        }
        let roster = if record.joined {
            self.merged(id, &record)?.roster
        } else {
            None
        };
        match roster {
            Some(roster) if roster.members.contains_key(&self.own_key()) => {
                self.take_key_record(w, id, &mut record, &roster, key_record, Some(key), now)?;
                // It came from there: not sent back.
                let epoch = key_record.epoch().0;
                if !record.large.told_own.iter().any(|(id, _)| *id == epoch) {
                    let parts = record
                        .large
                        .epochs
                        .iter()
                        .find(|e| e.id == epoch)
                        .map_or(0, |e| e.records.len() as u8);
                    record.large.told_own.push((epoch, parts));
                }
            }
            _ => {
                let entry = (*key.to_bytes(), key_record.encode().to_vec());
                let own = &mut record.large.own_keys;
                if !own.contains(&entry) {
                    if own.len() >= MAX_EPOCHS_KEPT * kkachi_protocol::group::large::MAX_KEY_PARTS {
                        own.remove(0);
                    }
                    own.push(entry);
                }
            }
        }
        LocalStore::write_group(w, &id, &record);
        Ok(())
    }

    /// The epochs of group `record` we hold and the parts of their records that our
    /// other devices were not sent (all of them once our set lists another device):
    /// each key, with those parts, sealed to them (SPEC §15.2), for no admin wraps for
    /// their keys. Whether anything was sent.
    fn tell_own_epochs(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        record: &mut GroupRecord,
        listed: &[[u8; 32]],
        now: u64,
    ) -> Result<bool, EngineError> {
        if listed.is_empty() {
            // No other device (any we told was taken out, and a new epoch came).
            let told = !record.large.told_own_to.is_empty();
            record.large.told_own_to.clear();
            record.large.told_own.clear();
            return Ok(told);
        }
        let mut changed = false;
        if listed.iter().any(|k| !record.large.told_own_to.contains(k)) {
            record.large.told_own.clear();
            changed = true;
        }
        if record.large.told_own_to != listed {
            record.large.told_own_to = listed.to_vec();
            changed = true;
        }
        let large = &mut record.large;
        large
            .told_own
            .retain(|(id, _)| large.epochs.iter().any(|e| e.id == *id));
        let mut untold: Vec<(HeldEpoch, usize)> = Vec::new();
        for e in &large.epochs {
            let told = large
                .told_own
                .iter()
                .find(|(id, _)| *id == e.id)
                .map_or(0, |(_, n)| usize::from(*n));
            if told < e.records.len() {
                untold.push((e.clone(), told));
            }
        }
        for (epoch, told) in untold {
            let key = EpochKey::from_bytes(epoch.key);
            for part in &epoch.records[told..] {
                if let Ok(part) = KeyRecord::decode(part) {
                    let told = kkachi_protocol::content::AccountRecord::GroupKey {
                        key: key.clone(),
                        record: Box::new(part),
                    };
                    self.tell_own(w, sessions, told, now)?;
                }
            }
            let parts = epoch.records.len() as u8;
            match record
                .large
                .told_own
                .iter_mut()
                .find(|(id, _)| *id == epoch.id)
            {
                Some(told) => told.1 = parts,
                None => record.large.told_own.push((epoch.id, parts)),
            }
            changed = true;
        }
        Ok(changed)
    }

    /// Key records that came before the log made us a member are taken now.
    pub(super) fn take_pending_keys(
        &self,
        w: &mut WriteSet,
        id: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
        now: u64,
    ) -> Result<(), EngineError> {
        for bytes in std::mem::take(&mut record.large.pending_keys) {
            if let Ok(key_record) = KeyRecord::decode(&bytes) {
                self.take_key_record(w, id, record, roster, &key_record, None, now)?;
            }
        }
        for (key, bytes) in std::mem::take(&mut record.large.own_keys) {
            if let Ok(key_record) = KeyRecord::decode(&bytes) {
                let key = EpochKey::from_bytes(key);
                self.take_key_record(w, id, record, roster, &key_record, Some(&key), now)?;
            }
        }
        Ok(())
    }

    /// Takes in items read from a group queue of group `group` (one epoch's, on one
    /// relay), in one write: the group's record is read once and written once, and
    /// what members' haves acknowledge is counted once. An item refused harms none of
    /// the others. Returns what was shown.
    pub(crate) fn take_group_items(
        &mut self,
        group: GroupId,
        epoch: [u8; 32],
        envelopes: &[Envelope],
        now: u64,
    ) -> Result<Vec<Received>, EngineError> {
        let mut shown = Vec::new();
        let result = self.with_sessions(|this, sessions| {
            let Some(mut record) = this.store.group(&group)? else {
                return Ok(());
            };
            let mut w = WriteSet::default();
            let mut acked = Vec::new();
            for envelope in envelopes {
                match this.take_item(
                    &mut w,
                    sessions,
                    group,
                    epoch,
                    &mut record,
                    &mut acked,
                    &envelope.payload,
                    now,
                ) {
                    Ok(out) => shown.extend(out),
                    Err(e) => {
                        tracing::debug!(group = %group.to_hex(), error = %e, "a group item was not taken");
                    }
                }
            }
            this.count_acks(&mut w, group, &acked)?;
            LocalStore::write_group(&mut w, &group, &record);
            this.apply_or_reset(sessions, w)
        });
        for r in &shown {
            self.emit(super::super::AppEvent::Incoming(r.clone()));
        }
        self.announced.extend(shown.iter().cloned());
        result?;
        Ok(shown)
    }

    /// One item of a batch, into `record` (the caller writes it once the batch is
    /// taken); ranges of our numbers members now acknowledge are added to `acked`.
    #[allow(clippy::too_many_arguments)]
    fn take_item(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        group: GroupId,
        epoch: [u8; 32],
        record: &mut GroupRecord,
        acked: &mut Vec<(u64, u64, bool)>,
        item: &[u8],
        now: u64,
    ) -> Result<Vec<Received>, EngineError> {
        let Some(roster) = record
            .joined
            .then(|| self.merged(group, record))
            .transpose()?
            .and_then(|m| m.roster)
        else {
            return Ok(Vec::new());
        };
        let me = self.own_key();
        if !roster.members.contains_key(&me) {
            return Ok(Vec::new());
        }
        let Some(held) = record.large.epochs.iter().find(|e| e.id == epoch) else {
            return Ok(Vec::new());
        };
        let key = EpochKey::from_bytes(held.key);
        // Members and former members only (a former member's operations may still
        // count); a stranger's post costs one signature check.
        let known = |author: &[u8; 32]| {
            roster.members.contains_key(author) || roster.former.contains(author)
        };
        let post = match open_item(&group, &key, item, known) {
            Ok(post) => post,
            Err(e) => return Err(invalid(e)),
        };
        let author = *post.author();
        if author == me && post.device() == self.own_device() {
            // Ours, as put: nothing to take.
            return Ok(Vec::new());
        }
        match post.body() {
            // Another device of ours posted it: shown as ours (SPEC §15.2).
            PostBody::Message { .. } | PostBody::File { .. } if author == me => {
                self.take_own_large_post(w, group, record, &roster, &post, now)
            }
            PostBody::Message { .. } | PostBody::File { .. } => {
                self.take_large_message(w, group, record, &roster, &post, now)
            }
            PostBody::Ops(ops) => {
                let Some(peer) = peer_of_key(&author) else {
                    return Ok(Vec::new());
                };
                // Operations merge as over a session: through the record as written.
                LocalStore::write_group(w, &group, record);
                let outcome =
                    self.take_ops_from(w, sessions, (author, peer), group, ops.clone(), now)?;
                if let Some(merged) = LocalStore::pending_group(w, &group) {
                    *record = merged;
                }
                Ok(match outcome {
                    super::super::receive::Outcome::Shown(r) => vec![*r],
                    super::super::receive::Outcome::ShownSeveral(rs) => rs,
                    _ => Vec::new(),
                })
            }
            PostBody::Key(key_record) => {
                // A new epoch, if one is needed, is made at upkeep, once for the batch.
                self.take_key_record(w, group, record, &roster, key_record, None, now)?;
                Ok(Vec::new())
            }
            PostBody::Have(have) => {
                // (Another device of ours is no member whose copies we count.)
                if roster.members.contains_key(&author) && author != me {
                    let have_at = post.hlc();
                    self.take_have(w, group, record, &roster, author, have_at, have, acked, now)?;
                }
                Ok(Vec::new())
            }
        }
    }

    /// Counts, for each of our recent messages, the members whose haves in a batch
    /// newly cover it (`acked`: the ranges of our numbers each newly acknowledges as
    /// held, or with `true` as read).
    fn count_acks(
        &self,
        w: &mut WriteSet,
        group: GroupId,
        acked: &[(u64, u64, bool)],
    ) -> Result<(), EngineError> {
        if acked.is_empty() {
            return Ok(());
        }
        let device = self.own_device();
        for (key, mut m) in self
            .store
            .recent_group_messages_keyed(&group, super::CATCH_UP_SCAN)?
        {
            if m.author().is_some() || m.event || m.post_seq == 0 || m.post_device != device {
                continue;
            }
            let newly = |read: bool| {
                acked
                    .iter()
                    .filter(|(before, theirs, r)| {
                        *r == read && m.post_seq > *before && m.post_seq <= *theirs
                    })
                    .count() as u32
            };
            let (held, read) = (newly(false), newly(true));
            if held == 0 && read == 0 {
                continue;
            }
            m.reach.1 = m.reach.1.saturating_add(held).min(m.reach.0);
            m.reach.2 = m.reach.2.saturating_add(read).min(m.reach.0);
            let state = if m.reach.2 >= m.reach.0 {
                MessageState::Read
            } else if m.reach.1 >= m.reach.0 {
                MessageState::Delivered
            } else {
                m.message.state
            };
            if m.message.state.advances_to(&state) {
                m.message.state = state;
            }
            LocalStore::rewrite_group_message(w, key, &m);
        }
        Ok(())
    }

    /// A member's message or file from the group queue: shown once (each author's
    /// numbers find copies), if its author may post; else it waits, as in the small
    /// tier.
    fn take_large_message(
        &self,
        w: &mut WriteSet,
        group: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
        post: &Post,
        now: u64,
    ) -> Result<Vec<Received>, EngineError> {
        let author = *post.author();
        let Some(peer) = peer_of_key(&author) else {
            return Ok(Vec::new());
        };
        let Some((seconds, text, file)) = post_parts(post) else {
            return Ok(Vec::new());
        };
        // A copy (another relay's, or read again from the start) is not taken twice.
        if !take_number(&mut record.large, author, post.device(), post.seq()) {
            return Ok(Vec::new());
        }
        record.large.have_due = true;
        let timer_secs = crate::store::kept_timer(seconds);
        let hlc = post.hlc().min(Hlc {
            ms: now.saturating_add(MAX_AHEAD_MS),
            count: 0,
        });
        let mut message = GroupMessage {
            from: peer.to_bytes(),
            name: roster
                .members
                .get(&author)
                .map(|m| m.name.clone())
                .unwrap_or_default(),
            hlc: (hlc.ms, hlc.count),
            message: new_record(
                post.id(),
                Direction::In,
                &text,
                hlc.ms.min(now),
                now,
                timer_secs,
            ),
            copies: Vec::new(),
            event: false,
            unseen: false,
            missed: Vec::new(),
            post_seq: post.seq(),
            post_device: post.device(),
            reach: (0, 0, 0),
        };
        message.message.file = file;
        let source = file_source(group, record, roster, post, &message);
        if roster.may_post(&author) {
            self.note_group_expiry(record, &message);
            record.set_hlc(record.hlc().observe(hlc, now, MAX_AHEAD_MS));
            let local = record.next_local;
            record.next_local += 1;
            LocalStore::write_group_message(w, &group, local, &message);
            self.offer_group_file(w, group, local, &message, source, now)?;
            return Ok(vec![self.shown(peer, roster, message)]);
        }
        // Its author's add or promotion may be on its way: it waits, within bounds.
        super::hold_waiting(record, peer, author, message, source, now);
        Ok(Vec::new())
    }

    /// A message or file another device of ours posted in the group queue: shown as
    /// ours, sent from there (once: that device's numbers find copies). Its file's
    /// chunks are in the epoch's queues, which we read: fetched as a member's are.
    fn take_own_large_post(
        &self,
        w: &mut WriteSet,
        group: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
        post: &Post,
        now: u64,
    ) -> Result<Vec<Received>, EngineError> {
        let me = self.own_key();
        let Some(member) = roster.members.get(&me) else {
            return Ok(Vec::new());
        };
        // Only a device our set lists speaks for us here (not one taken out, which
        // still holds the identity key).
        let listed = self.with_own(|own| {
            own.listed
                .iter()
                .any(|k| kkachi_protocol::group::large::device_tag(k) == post.device())
        })?;
        if !listed {
            tracing::warn!(group = %group.to_hex(), "a post as ours from a device our set does not list: dropped");
            return Ok(Vec::new());
        }
        let Some((seconds, text, file)) = post_parts(post) else {
            return Ok(Vec::new());
        };
        if !take_number(&mut record.large, me, post.device(), post.seq()) {
            return Ok(Vec::new());
        }
        let posted = super::OwnPost {
            id: post.id(),
            text,
            file,
            sent_at_ms: post.hlc().ms.min(now),
            hlc: post.hlc(),
            secs: seconds,
            chain: (post.seq(), post.device()),
        };
        let (local, message) = self.take_own_group_post(record, &member.name, posted, now);
        let source = file_source(group, record, roster, post, &message);
        LocalStore::write_group_message(w, &group, local, &message);
        self.offer_group_file(w, group, local, &message, source, now)?;
        Ok(vec![self.shown_own(roster, message)])
    }

    /// A member's have (dated `hlc`; one no newer than their last changes nothing): how
    /// many of our messages they hold (counted as delivered to them), and, if we are an
    /// admin and their log differs from ours, our whole log posted (at most every ten
    /// minutes).
    #[allow(clippy::too_many_arguments)]
    fn take_have(
        &self,
        w: &mut WriteSet,
        group: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
        author: [u8; 32],
        hlc: Hlc,
        have: &Have,
        acked: &mut Vec<(u64, u64, bool)>,
        now: u64,
    ) -> Result<(), EngineError> {
        let me = self.own_key();
        let clock = (hlc.ms, hlc.count);
        let last = record
            .large
            .acks
            .iter()
            .find(|(a, ..)| *a == author)
            .copied();
        if last.is_some_and(|(.., seen)| seen >= clock) {
            return Ok(());
        }
        // Our numbers are this device's chain's (as long as it is the one counted).
        let device = self.own_device();
        let latest = if record.large.device == device {
            record.large.next_seq.saturating_sub(1)
        } else {
            0
        };
        let (theirs, theirs_read) = have
            .heads
            .iter()
            .find(|(a, d, ..)| *a == me && *d == device)
            .map_or((0, 0), |(_, _, s, r)| (*s, *r));
        let (theirs, theirs_read) = (theirs.min(latest), theirs_read.min(latest));
        let (before, before_read) = last.map_or((0, 0), |(_, s, r, _)| (s, r));
        let entry = (
            author,
            theirs.max(before),
            theirs_read.max(before_read),
            clock,
        );
        match record.large.acks.iter_mut().find(|(a, ..)| *a == author) {
            Some(ack) => *ack = entry,
            None => {
                // One per member: former members' go.
                record
                    .large
                    .acks
                    .retain(|(a, ..)| roster.members.contains_key(a));
                record.large.acks.push(entry);
            }
        }
        if theirs > before {
            acked.push((before, theirs, false));
        }
        if theirs_read > before_read {
            acked.push((before_read, theirs_read, true));
        }
        // They lack messages of ours after ones they hold (sealed under an epoch they
        // never got, or lost with a relay): put again under the current epoch, the
        // same numbers (who holds them takes them as copies).
        if theirs > 0
            && theirs < latest
            && now.saturating_sub(record.large.repaired_ms) >= REPAIR_EVERY_MS
        {
            record.large.repaired_ms = now;
            self.repair(w, group, record, roster, theirs, now)?;
        }
        // Admins answer a log that differs (members would all answer at once).
        let merged = self.merged(group, record)?;
        if have.ops != merged.have
            && roster.role(&me) == Some(Role::Admin)
            && now.saturating_sub(record.large.log_posted_ms) >= LOG_EVERY_MS
            && let Some(epoch) = self.usable_epoch(record, roster)?
        {
            record.large.log_posted_ms = now;
            let ops = record.signed_ops()?;
            self.post_ops(w, group, record, roster, &epoch, &ops, now)?;
        }
        Ok(())
    }

    /// Puts again, under the current epoch, our messages numbered after `after` (at
    /// most [`REPAIR_MAX`], texts only; what is gone from this device is not).
    fn repair(
        &self,
        w: &mut WriteSet,
        group: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
        after: u64,
        now: u64,
    ) -> Result<(), EngineError> {
        let Some(epoch) = self.usable_epoch(record, roster)? else {
            return Ok(());
        };
        let device = self.own_device();
        let ours: Vec<GroupMessage> = self
            .store
            .recent_group_messages(&group, super::CATCH_UP_SCAN)?
            .into_iter()
            .filter(|m| {
                m.author().is_none() && !m.event && m.post_seq != 0 && m.post_device == device
            })
            .collect();
        let prev_of = |seq: u64| {
            ours.iter()
                .find(|m| m.post_seq + 1 == seq)
                .map_or([0; 16], |m| m.message.id)
        };
        for m in ours
            .iter()
            .filter(|m| m.post_seq > after && m.file_free())
            .take(REPAIR_MAX)
        {
            if m.message.deleted || m.message.text.is_empty() {
                continue;
            }
            let post = Post::sign(
                &self.me,
                group,
                EpochId(epoch.id),
                m.post_seq,
                MessageId(prev_of(m.post_seq)),
                Hlc {
                    ms: m.hlc.0,
                    count: m.hlc.1,
                },
                PostBody::Message {
                    seconds: m.message.timer_secs,
                    text: m.message.text.clone(),
                },
            )
            .map_err(invalid)?;
            self.queue_post(w, group, roster, &epoch, &post, now)?;
        }
        Ok(())
    }

    /// Upkeep of large groups: our have posted where something new arrived (at most
    /// every [`HAVE_EVERY_MS`]), held posts released, epochs kept sound; each group on
    /// its own (one that fails is logged, the others go on). Returns whether anything
    /// was queued, and when the next have is due.
    pub(crate) fn large_upkeep(&mut self, now: u64) -> Result<(bool, Option<u64>), EngineError> {
        let mut queued = false;
        let mut next: Option<u64> = None;
        let groups = self.store.groups()?;
        self.with_sessions(|this, sessions| {
            for (id, record) in groups {
                if !record.joined || record.forgotten || record.large.epochs.is_empty() {
                    continue;
                }
                match this.upkeep_one(sessions, id, record, now) {
                    Ok((q, due)) => {
                        queued |= q;
                        next = match (next, due) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                    }
                    Err(e) => {
                        sessions.reset();
                        tracing::warn!(group = %id.to_hex(), error = %e, "a large group's upkeep failed");
                    }
                }
            }
            Ok(())
        })?;
        Ok((queued, next))
    }

    fn upkeep_one(
        &self,
        sessions: &mut Sessions,
        id: GroupId,
        mut record: GroupRecord,
        now: u64,
    ) -> Result<(bool, Option<u64>), EngineError> {
        let Some(roster) = self.merged(id, &record)?.roster else {
            return Ok((false, None));
        };
        if !roster.members.contains_key(&self.own_key()) || roster.relays.is_empty() {
            return Ok((false, None));
        }
        let mut w = WriteSet::default();
        let mut changed =
            self.keep_epoch_sound(&mut w, sessions, id, &mut record, &roster, false, now)?;
        // A device of ours that was sent this group's keys and was taken out since reads
        // no more than it was sent: if we are an admin, a new epoch at once (else the
        // group's next one).
        let listed = self.with_own(|own| own.listed.clone())?;
        if !changed
            && roster.role(&self.own_key()) == Some(Role::Admin)
            && record.large.told_own_to.iter().any(|k| !listed.contains(k))
        {
            self.new_epoch(&mut w, sessions, id, &mut record, &roster, now)?;
            changed = true;
        }
        // Our other devices read the group under the epochs we hold.
        changed |= self.tell_own_epochs(&mut w, sessions, &mut record, &listed, now)?;
        // Now and then a new key, by the group's first admin, even with nobody leaving.
        let me = self.own_key();
        if !changed
            && roster.admins().min() == Some(&me)
            && current(&record.large, &roster)
                .is_some_and(|e| now.saturating_sub(e.hlc.0) >= ROTATE_EVERY_MS)
        {
            self.new_epoch(&mut w, sessions, id, &mut record, &roster, now)?;
            changed = true;
        }
        if !record.large.held.is_empty() {
            let before = record.large.held.len();
            self.release_held(&mut w, id, &mut record, &roster, now)?;
            changed |= record.large.held.len() != before;
        }
        let mut due = None;
        if record.large.have_due {
            let at = record.large.have_sent_ms.saturating_add(HAVE_EVERY_MS);
            if at <= now {
                let reads = !self.store.profile()?.is_some_and(|p| p.read_receipts_off);
                let heads = have_heads(
                    &record.large.chains,
                    |a| roster.members.contains_key(a),
                    reads,
                );
                let ops = have_digest(&record.signed_ops()?);
                let body = PostBody::Have(Have { heads, ops });
                // Posted, or (no epoch may carry it yet) tried again after a while.
                if self.post_unnumbered(&mut w, id, &mut record, &roster, body, now)? {
                    record.large.have_due = false;
                } else {
                    due = Some(now.saturating_add(HAVE_EVERY_MS));
                }
                record.large.have_sent_ms = now;
                changed = true;
            } else {
                due = Some(at);
            }
        }
        if changed {
            LocalStore::write_group(&mut w, &id, &record);
            self.apply_or_reset(sessions, w)?;
        }
        Ok((changed, due))
    }

    /// A group relay took our post `post` in group `id` (each relay has its own
    /// outbox entry): the message counts one more relay holding it.
    pub(crate) fn advance_group_post(
        &self,
        w: &mut WriteSet,
        id: GroupId,
        post: &MessageId,
    ) -> Result<(), EngineError> {
        let Ok(pseudo) = PeerId::from_bytes(&group_key(&id)) else {
            return Ok(());
        };
        let Some((key, mut m)) = self.store.group_copy(&pseudo, &post.0)? else {
            return Ok(());
        };
        let total = match self.store.group(&id)? {
            Some(record) => self
                .merged(id, &record)?
                .roster
                .map_or(1, |r| r.relays.len().max(1)),
            None => 1,
        };
        let relayed = match m.message.state {
            MessageState::Relayed { relayed, .. } => relayed.saturating_add(1),
            _ => 1,
        }
        .min(total as u8);
        let state = MessageState::Relayed {
            relayed,
            total: total as u8,
        };
        if m.message.state.advances_to(&state) {
            m.message.state = state;
            LocalStore::rewrite_group_message(w, key, &m);
        }
        Ok(())
    }
}

/// What waits in a large group, said for its members: no key of it has reached us,
/// or messages of ours wait for an admin's new key. `None` when nothing waits (or in
/// the small tier).
pub(crate) fn large_status(record: &GroupRecord, roster: &Roster) -> Option<String> {
    if roster.relays.is_empty() {
        return None;
    }
    match current(&record.large, roster) {
        None => Some("no key of this group has reached you yet: an admin hands it out".into()),
        Some(_) if !record.large.held.is_empty() => Some(format!(
            "{} of your messages wait for an admin to hand out the group's new key",
            record.large.held.len()
        )),
        Some(_) => None,
    }
}

/// A numbered post's timer, text and file (none for other kinds).
fn post_parts(post: &Post) -> Option<(u32, String, Option<FileNote>)> {
    match post.body() {
        PostBody::Message { seconds, text } => Some((*seconds, text.clone(), None)),
        PostBody::File { seconds, file } => {
            Some((*seconds, String::new(), Some(FileNote::of(file))))
        }
        _ => None,
    }
}

/// Where the file of `message` (from `post`) is fetched from: the group queues of the
/// epoch its post names (it opened under that epoch's key, so we hold it).
fn file_source(
    group: GroupId,
    record: &GroupRecord,
    roster: &Roster,
    post: &Post,
    message: &GroupMessage,
) -> Option<crate::store::GroupSource> {
    message.message.file.as_ref()?;
    record
        .large
        .epochs
        .iter()
        .find(|e| e.id == post.epoch().0)
        .map(|e| crate::store::GroupSource {
            group: group.0,
            epoch: e.id,
            queues: epoch_queues(e, roster)
                .into_iter()
                .map(|(addr, key)| (addr.to_string(), key.0))
                .collect(),
        })
}

/// One entry of a have: an author's device, its head and what of it was read.
type Head = ([u8; 32], DeviceTag, u64, u64);

/// What our have lists of `chains` (those of authors `member` takes, with anything in
/// them; what was read only if `reads`): at most [`MAX_HAVE_AUTHORS`], every member's
/// longest chain first, then their others, so a member with many devices crowds no one
/// out; in the order the have is encoded in.
fn have_heads(chains: &[Chain], member: impl Fn(&[u8; 32]) -> bool, reads: bool) -> Vec<Head> {
    let mut heads: Vec<Head> = chains
        .iter()
        .filter(|c| member(&c.author) && c.head() > 0)
        .map(|c| (c.author, c.device, c.head(), if reads { c.read } else { 0 }))
        .collect();
    heads.sort_unstable_by_key(|h| (h.0, std::cmp::Reverse(h.2), h.1));
    // Each chain's rank among its author's: 0 for the longest.
    let mut ranked: Vec<(usize, Head)> = Vec::with_capacity(heads.len());
    for h in heads {
        let rank = match ranked.last() {
            Some((r, last)) if last.0 == h.0 => r + 1,
            _ => 0,
        };
        ranked.push((rank, h));
    }
    ranked.sort_by_key(|(r, h)| (*r, h.0, h.1));
    ranked.truncate(MAX_HAVE_AUTHORS);
    let mut heads: Vec<Head> = ranked.into_iter().map(|(_, h)| h).collect();
    heads.sort_unstable_by_key(|h| (h.0, h.1));
    heads
}

fn tag(x: &[u8; 32]) -> [u8; 8] {
    let mut t = [0; 8];
    t.copy_from_slice(&x[..8]);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_have_past_its_bound_keeps_every_members_longest_chain() {
        // 1,000 members with one device each, and one member with 200 more devices.
        let chain = |author: [u8; 32], device: u8, head: u64| Chain {
            author,
            device: [device; 8],
            runs: vec![(1, head)],
            ..Chain::default()
        };
        let author = |i: u16| {
            let mut a = [0; 32];
            a[..2].copy_from_slice(&i.to_be_bytes());
            a
        };
        let mut chains: Vec<Chain> = (0..1000).map(|i| chain(author(i), 0, 5)).collect();
        chains.extend((1..=200).map(|d| chain(author(7), d, u64::from(d) * 10)));
        let heads = have_heads(&chains, |_| true, true);
        assert_eq!(heads.len(), MAX_HAVE_AUTHORS);
        for i in 0..1000 {
            assert!(
                heads.iter().any(|h| h.0 == author(i)),
                "member {i} is in it"
            );
        }
        // The many-device member's longest chains are the ones kept.
        assert!(heads.iter().any(|h| h.0 == author(7) && h.2 == 2000));
        assert!(!heads.iter().any(|h| h.0 == author(7) && h.2 == 10));
        assert!(
            heads
                .windows(2)
                .all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1))
        );
    }
}
