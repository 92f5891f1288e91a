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
    EPOCHS_READ, EpochKey, Have, KeyRecord, MAX_HAVE_AUTHORS, MAX_POST_OPS, Post, PostBody,
    open_item,
};
use kkachi_protocol::group::{GroupId, Hlc, Role, Roster, SignedOp, have_digest};
use kkachi_protocol::multiaddr::Protocol;
use kkachi_protocol::{GroupKey, MessageId, Multiaddr, PeerId};

use super::super::EngineError;
use super::super::receive::Received;
use super::super::state::{Sessions, State};
use super::{FAR_AHEAD_MS, MAX_AHEAD_MS, MAX_WAIT_MS, Posting, new_record};
use crate::store::{
    Chain, Direction, FileNote, GroupMessage, GroupRecord, HeldEpoch, LargeState, LocalStore,
    MAX_EPOCHS_KEPT, MAX_HELD_POSTS, MAX_WAITING_PER_GROUP, MessageState, OutboxEntry, OutboxKind,
    Target, Waiting, WriteSet, group_key,
};

/// How often, at most, we post our have in one group while something new arrives.
pub(crate) const HAVE_EVERY_MS: u64 = 30_000;
/// How often, at most, we post our whole log in one group for a have whose digest
/// differs from ours.
const LOG_EVERY_MS: u64 = 10 * 60 * 1000;

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

fn relay_peer(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
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

/// Whether `epoch` gave its key to a key no member holds.
fn names_outsider(epoch: &HeldEpoch, keys: &BTreeMap<[u8; 32], [u8; 32]>) -> bool {
    epoch
        .tags
        .iter()
        .any(|t| !keys.values().any(|x| x[..8] == t[..]))
}

/// Whether `epoch`, every part held, misses a member's key.
fn misses_member(epoch: &HeldEpoch, keys: &BTreeMap<[u8; 32], [u8; 32]>) -> bool {
    epoch.records.len() == usize::from(epoch.parts)
        && keys
            .values()
            .any(|x| !epoch.tags.iter().any(|t| t[..] == x[..8]))
}

/// Keeps `epoch` among `epochs` (merging the parts of one we hold), the newest
/// [`MAX_EPOCHS_KEPT`] only.
fn keep_epoch(epochs: &mut Vec<HeldEpoch>, epoch: HeldEpoch) {
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
    epochs.sort_by_key(|e| std::cmp::Reverse(e.rank()));
    epochs.truncate(MAX_EPOCHS_KEPT);
}

fn chain_of(large: &mut LargeState, author: [u8; 32]) -> &mut Chain {
    let i = match large.chains.iter().position(|c| c.author == author) {
        Some(i) => i,
        None => {
            large.chains.push(Chain {
                author,
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
            for e in record.large.epochs.iter().take(EPOCHS_READ) {
                let key = EpochKey::from_bytes(e.key);
                for addr in &roster.relays {
                    let Some(peer) = relay_peer(addr) else {
                        continue;
                    };
                    let relay = addr.to_string();
                    out.push(GroupQueue {
                        name: group_poll_name(&relay, &e.id),
                        relay,
                        group: id,
                        epoch: e.id,
                        key: key.queue_key(&peer),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Each member's X25519 key as we know it best: the card we hold of them (a contact,
    /// or a member met in a group) if it is theirs, else the one their add named.
    fn member_keys(&self, roster: &Roster) -> Result<BTreeMap<[u8; 32], [u8; 32]>, EngineError> {
        let me = self.own_key();
        let mut out = BTreeMap::new();
        for (key, m) in &roster.members {
            let x = if *key == me {
                self.me.x25519_public()
            } else {
                match self.store.contact(&m.identity.peer_id())? {
                    Some(c) if c.card.identity().ed25519() == key => *c.card.identity().x25519(),
                    _ => *m.identity.x25519(),
                }
            };
            out.insert(*key, x);
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
        let wrapped: Vec<[u8; 32]> = keys.values().copied().collect();
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
            learnt_ms: now,
        };
        keep_epoch(&mut record.large.epochs, epoch.clone());
        for part in &parts {
            let body = PostBody::Key(Box::new(part.clone()));
            for under in previous.iter().chain([&epoch]) {
                let post = Post::sign(
                    &self.me,
                    id,
                    kkachi_protocol::group::large::EpochId(under.id),
                    0,
                    MessageId([0; 16]),
                    hlc,
                    body.clone(),
                )
                .map_err(invalid)?;
                self.queue_post(w, id, roster, under, &post, now)?;
            }
        }
        for (k, m) in &roster.members {
            let x = keys[k];
            if *k == me || previous.as_ref().is_some_and(|p| p.tags.contains(&tag(&x))) {
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
                LocalStore::write_session(w, &contact.peer, session);
            }
        }
        tracing::info!(group = %id.to_hex(), number, members = keys.len(), "new group epoch");
        self.release_held(w, id, record, roster, now)?;
        self.group_queues_changed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// A new epoch if we are an admin and the current one is missing, made by someone
    /// who is no admin, wrapped for a key no member holds, or missing a member's key.
    pub(super) fn keep_epoch_sound(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        id: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
        now: u64,
    ) -> Result<bool, EngineError> {
        if roster.relays.is_empty()
            || roster.role(&self.own_key()) != Some(Role::Admin)
            || !record.joined
        {
            return Ok(false);
        }
        let keys = self.member_keys(roster)?;
        let sound = current(&record.large, roster)
            .is_some_and(|e| !names_outsider(e, &keys) && !misses_member(e, &keys));
        if sound {
            return Ok(false);
        }
        self.new_epoch(w, sessions, id, record, roster, now)?;
        Ok(true)
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
        let keys = self.member_keys(roster)?;
        let Some(epoch) = current(&record.large, roster)
            .filter(|e| !names_outsider(e, &keys))
            .cloned()
        else {
            return Ok(false);
        };
        let cap = Hlc {
            ms: now.saturating_add(MAX_AHEAD_MS),
            count: 0,
        };
        let hlc = record.hlc().max(roster.latest.min(cap)).tick(now);
        record.set_hlc(hlc);
        let post = Post::sign(
            &self.me,
            id,
            kkachi_protocol::group::large::EpochId(epoch.id),
            0,
            MessageId([0; 16]),
            hlc,
            body,
        )
        .map_err(invalid)?;
        self.queue_post(w, id, roster, &epoch, &post, now)?;
        Ok(true)
    }

    /// Posts `ops` of group `id` in its queue (as many posts as they need).
    pub(super) fn post_ops(
        &self,
        w: &mut WriteSet,
        id: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
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
            if !self.post_unnumbered(w, id, record, roster, body, now)? {
                // No epoch may carry them yet: the digests bring them later.
                return Ok(());
            }
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
        let timer_secs = if roster.timer_secs == 0 {
            0
        } else {
            roster.timer_secs.max(crate::store::MIN_TIMER_SECS)
        };
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
                kkachi_protocol::group::large::EpochId(epoch_id),
                seq,
                MessageId(prev),
                hlc,
                body,
            )
            .map_err(invalid)?;
            record.large.next_seq = seq + 1;
            record.large.last_id = post.id().0;
            chain_of(&mut record.large, me).take(seq);
            match &epoch {
                Some(epoch) => this.queue_post(&mut w, id, &roster, epoch, &post, now)?,
                None => {
                    if record.large.held.len() >= MAX_HELD_POSTS {
                        return Err(EngineError::Invalid(
                            "too many messages wait for an admin to hand out this group's new key; try again later".into(),
                        ));
                    }
                    record.large.held.push(post.encode().to_vec());
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
                reach: (others as u32, 0),
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
        let keys = self.member_keys(roster)?;
        let Some(epoch) = current(&record.large, roster)
            .filter(|e| !names_outsider(e, &keys))
            .cloned()
        else {
            return Ok(());
        };
        for bytes in std::mem::take(&mut record.large.held) {
            let Ok(old) = Post::decode(&bytes) else {
                continue;
            };
            // The same number, clock and body; the id changes with the epoch named, so
            // the message is found under its first id (it went nowhere under it).
            let post = Post::sign(
                &self.me,
                id,
                kkachi_protocol::group::large::EpochId(epoch.id),
                old.seq(),
                old.prev(),
                old.hlc(),
                old.body().clone(),
            )
            .map_err(invalid)?;
            self.queue_post(w, id, roster, &epoch, &post, now)?;
        }
        Ok(())
    }

    /// Takes in a key record of group `id` (from a post, or over a session): kept if
    /// it counts (SPEC §14.5) and wraps the key for us. Returns whether a new epoch
    /// came.
    pub(super) fn take_key_record(
        &self,
        w: &mut WriteSet,
        id: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
        key_record: &KeyRecord,
        now: u64,
    ) -> Result<bool, EngineError> {
        if key_record.group() != id
            || roster.role(key_record.author().ed25519()) != Some(Role::Admin)
            || key_record.hlc().ms > now.saturating_add(FAR_AHEAD_MS)
        {
            record.large.refused += 1;
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
        if highest.is_some_and(|h| key_record.number() > h.saturating_add(1)) {
            // Numbered past every later epoch: it would outrank them all.
            record.large.refused += 1;
            return Ok(false);
        }
        let Some(key) = key_record.unwrap(&self.me) else {
            return Ok(false);
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
                learnt_ms: now,
            },
        );
        tracing::info!(group = %id.to_hex(), number = key_record.number(), "took a group epoch");
        self.release_held(w, id, record, roster, now)?;
        self.group_queues_changed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(true)
    }

    /// A key record sealed to us over a session (we were added, and cannot read the
    /// group queue yet): taken if we are in the group, else kept with the group until
    /// its log makes us a member.
    pub(super) fn take_sealed_key(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        id: GroupId,
        key_record: &KeyRecord,
        now: u64,
    ) -> Result<(), EngineError> {
        let Some(mut record) = LocalStore::pending_group(w, &id).or(self.store.group(&id)?) else {
            return Ok(());
        };
        let roster = if record.joined {
            self.merged(id, &record)?.roster
        } else {
            None
        };
        match roster {
            Some(roster) if roster.members.contains_key(&self.own_key()) => {
                self.take_key_record(w, id, &mut record, &roster, key_record, now)?;
                self.keep_epoch_sound(w, sessions, id, &mut record, &roster, now)?;
            }
            _ => {
                let bytes = key_record.encode().to_vec();
                if record.large.pending_keys.len() < MAX_EPOCHS_KEPT
                    && !record.large.pending_keys.contains(&bytes)
                {
                    record.large.pending_keys.push(bytes);
                }
            }
        }
        LocalStore::write_group(w, &id, &record);
        Ok(())
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
                self.take_key_record(w, id, record, roster, &key_record, now)?;
            }
        }
        Ok(())
    }

    /// Takes in items read from a group queue of group `group` (one epoch's, on one
    /// relay): each on its own, so one that fails harms none of the others. Returns
    /// what was shown.
    pub(crate) fn take_group_items(
        &mut self,
        group: GroupId,
        epoch: [u8; 32],
        envelopes: &[Envelope],
        now: u64,
    ) -> Result<Vec<Received>, EngineError> {
        let mut shown = Vec::new();
        let result = self.with_sessions(|this, sessions| {
            for envelope in envelopes {
                let mut w = WriteSet::default();
                match this.take_item(&mut w, sessions, group, epoch, &envelope.payload, now) {
                    Ok(out) => {
                        this.apply_or_reset(sessions, w)?;
                        shown.extend(out);
                    }
                    Err(e) => {
                        tracing::debug!(group = %group.to_hex(), error = %e, "a group item was not taken");
                    }
                }
            }
            Ok(())
        });
        for r in &shown {
            self.emit(super::super::AppEvent::Incoming(r.clone()));
        }
        self.announced.extend(shown.iter().cloned());
        result?;
        Ok(shown)
    }

    fn take_item(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        group: GroupId,
        epoch: [u8; 32],
        item: &[u8],
        now: u64,
    ) -> Result<Vec<Received>, EngineError> {
        let Some(mut record) = self.store.group(&group)? else {
            return Ok(Vec::new());
        };
        let Some(roster) = record
            .joined
            .then(|| self.merged(group, &record))
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
            Err(e) => {
                record.large.refused += 1;
                LocalStore::write_group(w, &group, &record);
                return Err(invalid(e));
            }
        };
        let author = *post.author();
        if author == me {
            // Ours, as put: nothing to take.
            return Ok(Vec::new());
        }
        match post.body() {
            PostBody::Message { .. } | PostBody::File { .. } => {
                self.take_large_message(w, group, &mut record, &roster, &post, now)
            }
            PostBody::Ops(ops) => {
                let Some(peer) = peer_of_key(&author) else {
                    return Ok(Vec::new());
                };
                let outcome =
                    self.take_ops_from(w, sessions, (author, peer), group, ops.clone(), now)?;
                Ok(match outcome {
                    super::super::receive::Outcome::Shown(r) => vec![*r],
                    super::super::receive::Outcome::ShownSeveral(rs) => rs,
                    _ => Vec::new(),
                })
            }
            PostBody::Key(key_record) => {
                self.take_key_record(w, group, &mut record, &roster, key_record, now)?;
                self.keep_epoch_sound(w, sessions, group, &mut record, &roster, now)?;
                LocalStore::write_group(w, &group, &record);
                Ok(Vec::new())
            }
            PostBody::Have(have) => {
                if roster.members.contains_key(&author) {
                    self.take_have(w, group, &mut record, &roster, author, have, now)?;
                }
                Ok(Vec::new())
            }
        }
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
        let (seconds, text, file) = match post.body() {
            PostBody::Message { seconds, text } => (*seconds, text.clone(), None),
            PostBody::File { seconds, file } => (*seconds, String::new(), Some(FileNote::of(file))),
            _ => return Ok(Vec::new()),
        };
        // A copy (another relay's, or read again from the start) is not taken twice.
        if !chain_of(&mut record.large, author).take(post.seq()) {
            return Ok(Vec::new());
        }
        record.large.have_due = true;
        let timer_secs = if seconds == 0 {
            0
        } else {
            seconds.max(crate::store::MIN_TIMER_SECS)
        };
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
            reach: (0, 0),
        };
        message.message.file = file;
        if roster.may_post(&author) {
            self.note_group_expiry(record, &message);
            record.set_hlc(record.hlc().observe(hlc, now, MAX_AHEAD_MS));
            let local = record.next_local;
            record.next_local += 1;
            LocalStore::write_group_message(w, &group, local, &message);
            self.offer_group_file(w, group, local, &message, now)?;
            LocalStore::write_group(w, &group, record);
            return Ok(vec![self.shown(peer, roster, message)]);
        }
        // Its author's add or promotion may be on its way: it waits, within bounds.
        let before = record.waiting.len();
        record
            .waiting
            .retain(|m| now.saturating_sub(m.message.message.stored_at_ms) < MAX_WAIT_MS);
        record.dropped += (before - record.waiting.len()) as u64;
        let theirs = record
            .waiting
            .iter()
            .filter(|m| m.from == message.from)
            .count();
        if record.waiting.len() >= MAX_WAITING_PER_GROUP || theirs >= MAX_WAITING_PER_GROUP / 4 {
            record.dropped += 1;
        } else {
            record.waiting.push(Waiting {
                from: peer.to_bytes(),
                key: author,
                message,
            });
        }
        LocalStore::write_group(w, &group, record);
        Ok(Vec::new())
    }

    /// A member's have: how many of our messages they hold (counted as delivered to
    /// them), and, if their log differs from ours, our whole log posted (at most every
    /// ten minutes).
    #[allow(clippy::too_many_arguments)]
    fn take_have(
        &self,
        w: &mut WriteSet,
        group: GroupId,
        record: &mut GroupRecord,
        roster: &Roster,
        author: [u8; 32],
        have: &Have,
        now: u64,
    ) -> Result<(), EngineError> {
        let me = self.own_key();
        let theirs = have
            .heads
            .iter()
            .find(|(a, _)| *a == me)
            .map_or(0, |(_, s)| *s)
            .min(record.large.next_seq.saturating_sub(1));
        let before = record
            .large
            .acks
            .iter()
            .find(|(a, _)| *a == author)
            .map_or(0, |(_, s)| *s);
        if theirs > before {
            match record.large.acks.iter_mut().find(|(a, _)| *a == author) {
                Some(ack) => ack.1 = theirs,
                None => record.large.acks.push((author, theirs)),
            }
            for (key, mut m) in self
                .store
                .recent_group_messages_keyed(&group, super::CATCH_UP_SCAN)?
            {
                if m.author().is_none() && !m.event && m.post_seq > before && m.post_seq <= theirs {
                    m.reach.1 = m.reach.1.saturating_add(1).min(m.reach.0);
                    if m.reach.1 >= m.reach.0
                        && m.message.state.advances_to(&MessageState::Delivered)
                    {
                        m.message.state = MessageState::Delivered;
                    }
                    LocalStore::rewrite_group_message(w, key, &m);
                }
            }
        }
        let merged = self.merged(group, record)?;
        if have.ops != merged.have && now.saturating_sub(record.large.log_posted_ms) >= LOG_EVERY_MS
        {
            record.large.log_posted_ms = now;
            let ops = record.signed_ops()?;
            self.post_ops(w, group, record, roster, &ops, now)?;
        }
        LocalStore::write_group(w, &group, record);
        Ok(())
    }

    /// Upkeep of large groups: our have posted where something new arrived (at most
    /// every [`HAVE_EVERY_MS`]), held posts released, epochs kept sound. Returns
    /// whether anything was queued.
    pub(crate) fn large_upkeep(&mut self, now: u64) -> Result<bool, EngineError> {
        let mut queued = false;
        let groups = self.store.groups()?;
        self.with_sessions(|this, sessions| {
            for (id, mut record) in groups {
                if !record.joined || record.forgotten || record.large.epochs.is_empty() {
                    continue;
                }
                let Some(roster) = this.merged(id, &record)?.roster else {
                    continue;
                };
                if !roster.members.contains_key(&this.own_key()) || roster.relays.is_empty() {
                    continue;
                }
                let mut w = WriteSet::default();
                let mut changed =
                    this.keep_epoch_sound(&mut w, sessions, id, &mut record, &roster, now)?;
                if !record.large.held.is_empty() {
                    this.release_held(&mut w, id, &mut record, &roster, now)?;
                    changed = true;
                }
                if record.large.have_due
                    && now.saturating_sub(record.large.have_sent_ms) >= HAVE_EVERY_MS
                {
                    let mut heads: Vec<([u8; 32], u64)> = record
                        .large
                        .chains
                        .iter()
                        .filter(|c| roster.members.contains_key(&c.author) && c.head > 0)
                        .map(|c| (c.author, c.head))
                        .collect();
                    heads.sort();
                    heads.truncate(MAX_HAVE_AUTHORS);
                    let ops = have_digest(&record.signed_ops()?);
                    let body = PostBody::Have(Have { heads, ops });
                    if this.post_unnumbered(&mut w, id, &mut record, &roster, body, now)? {
                        record.large.have_due = false;
                        record.large.have_sent_ms = now;
                        changed = true;
                    }
                }
                if changed {
                    LocalStore::write_group(&mut w, &id, &record);
                    this.apply_or_reset(sessions, w)?;
                    queued = true;
                }
            }
            Ok(())
        })?;
        Ok(queued)
    }

    /// When the next have is due in some large group (Unix ms).
    pub(crate) fn next_have_due(&self) -> Option<u64> {
        let groups = self.store.groups().ok()?;
        groups
            .iter()
            .filter(|(_, g)| g.joined && !g.forgotten && g.large.have_due)
            .map(|(_, g)| g.large.have_sent_ms.saturating_add(HAVE_EVERY_MS))
            .min()
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

fn tag(x: &[u8; 32]) -> [u8; 8] {
    let mut t = [0; 8];
    t.copy_from_slice(&x[..8]);
    t
}
