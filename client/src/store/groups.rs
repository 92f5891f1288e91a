//! Groups: each group's membership log (its signed operations, SPEC §14) and our place
//! in it, and its messages from every member.
//!
//! Keys start with a group's local name, [`group_key`]: 38 bytes shaped like a peer id
//! (an identity multihash of 36 bytes), so the store hides it and keeps the order of what
//! follows exactly as it does for a contact's records.

use kkachi_protocol::PeerId;
use kkachi_protocol::group::{GroupError, GroupId, Hlc, Roster, SignedOp};
use serde::{Deserialize, Serialize};

use super::{LocalStore, MessageRecord, MessageState, StoreError, TreeId, WriteSet, decode};

/// Most messages kept per group that wait for the operations that let their authors
/// post (they arrived first, over another relay).
pub const MAX_WAITING_PER_GROUP: usize = 64;
/// Most groups we are not (yet) in that one contact can make us keep (their log came
/// in part, or messages came first); four times that in all.
pub const MAX_WAITING_GROUPS: usize = 16;

/// The local name of a group in keys: `0x00 ‖ 36 ‖ "grp\0" ‖ group id`.
pub fn group_key(id: &GroupId) -> Vec<u8> {
    let mut k = Vec::with_capacity(38 + 8);
    k.extend_from_slice(&[0x00, 36, b'g', b'r', b'p', 0]);
    k.extend_from_slice(&id.0);
    k
}

/// The group a key made by [`group_key`] (or [`group_member_key`]) names (`None` for
/// anything else, such as a contact's peer id).
pub fn group_of(key: &[u8]) -> Option<GroupId> {
    let rest = key.strip_prefix(&[0x00, 36, b'g', b'r', b'p', 0][..])?;
    Some(GroupId(rest.get(..32)?.try_into().ok()?))
}

/// A group's key followed by one member's peer id: names what that member sent in the
/// group (a file offered), so no other member can claim it.
pub fn group_member_key(id: &GroupId, member: &PeerId) -> Vec<u8> {
    let mut k = group_key(id);
    k.extend_from_slice(&member.to_bytes());
    k
}

/// The member a key made by [`group_member_key`] names.
pub fn member_of(key: &[u8]) -> Option<PeerId> {
    group_of(key)?;
    PeerId::from_bytes(key.get(38..).filter(|m| !m.is_empty())?).ok()
}

fn message_key(id: &GroupId, local: u64) -> Vec<u8> {
    let mut k = group_key(id);
    k.extend_from_slice(&local.to_be_bytes());
    k
}

fn index_key(peer: &PeerId, id: &[u8; 16]) -> Vec<u8> {
    let mut k = peer.to_bytes();
    k.extend_from_slice(id);
    k
}

/// A group as we hold it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupRecord {
    /// Its operations (verified when they arrived), in no order.
    pub ops: Vec<Vec<u8>>,
    /// The number of our next operation.
    pub next_seq: u64,
    /// Our clock for it: later than every operation and message of it we hold.
    pub clock: (u64, u32),
    /// Local order of its next message.
    pub next_local: u64,
    /// Messages that arrived before the operations that let their authors post: kept
    /// (at most [`MAX_WAITING_PER_GROUP`]) and shown once those arrive.
    pub waiting: Vec<Waiting>,
    /// Messages that could not wait (over the bound).
    pub dropped: u64,
    /// When we first heard of it (Unix ms).
    pub joined_ms: u64,
    /// For each member (peer id) whose digest differed from ours, our digest when we
    /// last sent them all our operations, and when (Unix ms).
    pub answered: Vec<(Vec<u8>, [u8; 16], u64)>,
    /// We are (or were) a member: the group is ours to list. Until then its record only
    /// holds what came before the rest of its log (operations, messages).
    pub joined: bool,
    /// The contact whose record made us keep it before we were a member.
    pub invited_by: Vec<u8>,
    /// Forgotten here: only `next_seq` is kept, so a later operation of ours in it
    /// never reuses a number.
    pub forgotten: bool,
    /// When its next message under a timer is due to go (Unix ms; 0: none).
    pub next_expiry_ms: u64,
    /// Cards members passed on of people who are not (yet) members here: kept (at most
    /// [`MAX_INTRODUCTIONS`]) until the operations adding them arrive.
    pub introductions: Vec<Vec<u8>>,
    /// The large tier's state (SPEC §14.5): empty while the group has no group relays.
    pub large: LargeState,
}

/// Most epochs whose keys one group keeps (the current one, then admins' newest):
/// older ones are forgotten, and what is still sealed under them can no longer be read.
pub const MAX_EPOCHS_KEPT: usize = kkachi_protocol::group::large::EPOCHS_READ;
/// Most epochs of one maker one group keeps.
pub const MAX_EPOCHS_PER_MAKER: usize = 2;
/// Most of our posts held back while no epoch may carry them.
pub const MAX_HELD_POSTS: usize = 256;

/// A large group's epochs, chains and acknowledgements, as we hold them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LargeState {
    /// Epochs whose key we hold, at most [`MAX_EPOCHS_KEPT`].
    pub epochs: Vec<HeldEpoch>,
    /// The number of our next message or file in the group (from 1), in the chain of
    /// the device `device` names: this device's (SPEC §14.5), started again from 1
    /// when it is another (a new session key, or a device restored from another).
    pub next_seq: u64,
    /// The device whose chain `next_seq` and `last_id` count.
    pub device: [u8; 8],
    /// The id of our last numbered post (zeros before the first).
    pub last_id: [u8; 16],
    /// Each author's chain of numbered posts, as far as we hold it.
    pub chains: Vec<Chain>,
    /// Our signed posts waiting for an epoch that may carry them (one whose key went to
    /// no one who is not a member), with where their message is: sealed and put once
    /// one arrives.
    pub held: Vec<(Vec<u8>, u64)>,
    /// For each member (identity key), the highest of our numbers they hold with nothing
    /// missing below it, the highest they read, and the clock of the have that said so
    /// (older ones change nothing).
    pub acks: Vec<Ack>,
    /// Since when (Unix ms) the current epoch was found unsound (0: it is sound), for
    /// admins who wait before making another (SPEC §14.5).
    pub unsound_since_ms: u64,
    /// Something new arrived since we last posted our have.
    pub have_due: bool,
    /// The epochs (by id) whose keys our other devices were sent (SPEC §15.2), with
    /// how many parts of each record went...
    pub told_own: Vec<([u8; 32], u8)>,
    /// ...while our set listed these other devices (once it lists others, every
    /// epoch is sent again).
    pub told_own_to: Vec<[u8; 32]>,
    /// Epoch keys another device of ours sent before this one was in the group (the
    /// key, and a part of its record): taken once its log makes us a member.
    pub own_keys: Vec<([u8; 32], Vec<u8>)>,
    /// When we last posted our have (Unix ms).
    pub have_sent_ms: u64,
    /// Key records sealed to us before the group's log made us a member: taken once it
    /// does (at most [`MAX_EPOCHS_KEPT`]).
    pub pending_keys: Vec<Vec<u8>>,
    /// When we last posted our whole log for a have whose digest differed (Unix ms).
    pub log_posted_ms: u64,
    /// When we last put again messages of ours a member's have said they lack (Unix
    /// ms).
    pub repaired_ms: u64,
}

/// A member's acknowledgement of our messages in a large group: (their identity key,
/// the highest of our numbers they hold with nothing missing below it, the highest
/// they read, the clock of their have).
pub(crate) type Ack = ([u8; 32], u64, u64, (u64, u32));

/// An epoch of a large group whose key we hold.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeldEpoch {
    /// Its id.
    pub id: [u8; 32],
    /// Its number, clock and author: which epoch wins (SPEC §14.5).
    pub number: u64,
    /// Its clock.
    pub hlc: (u64, u32),
    /// The admin who made it (identity key).
    pub author: [u8; 32],
    /// The key.
    pub key: [u8; 32],
    /// Its key record's parts we hold (verified when they came): passed on to members
    /// added, who cannot read the group queue yet.
    pub records: Vec<Vec<u8>>,
    /// The first 8 bytes of every member key its parts we hold wrap the key for.
    pub tags: Vec<[u8; 8]>,
    /// How many parts the record has.
    pub parts: u8,
}

impl HeldEpoch {
    /// The order in which epochs win: number, clock, id.
    pub fn rank(&self) -> (u64, (u64, u32), [u8; 32]) {
        (self.number, self.hlc, self.id)
    }
}

/// One author's numbered posts in a large group, as far as we hold them: runs of
/// numbers, so a member added late (who starts at whatever number the author had
/// reached) and one who missed some hold a few runs, not a list of every number.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Chain {
    /// The author (identity key).
    pub author: [u8; 32],
    /// Which of the author's devices (each numbers its own posts).
    pub device: [u8; 8],
    /// The numbers held, as inclusive runs in ascending order, apart from each other
    /// (at most [`MAX_RUNS`]).
    pub runs: Vec<(u64, u64)>,
    /// Gaps that were filled (a number came after a later one).
    pub filled: u64,
    /// The highest of their numbers we read (what our haves say, unless read receipts
    /// are off).
    pub read: u64,
}

/// Most runs of numbers kept per author (so at most one less gap).
pub(crate) const MAX_RUNS: usize = 64;

impl Chain {
    /// Whether number `seq` is held.
    pub fn holds(&self, seq: u64) -> bool {
        self.runs.iter().any(|(a, b)| *a <= seq && seq <= *b)
    }

    /// Takes number `seq` in; false if it was held already.
    pub fn take(&mut self, seq: u64) -> bool {
        if seq == 0 || self.holds(seq) {
            return false;
        }
        if self.runs.last().is_some_and(|(_, b)| seq < *b) {
            self.filled += 1;
        }
        self.runs.push((seq, seq));
        self.runs.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.runs.len());
        for (a, b) in self.runs.drain(..) {
            match merged.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        while merged.len() > MAX_RUNS {
            // The oldest gap is given up on.
            let second = merged.remove(1);
            // What was missing in it counts as held from then on.
            merged[0].1 = second.1;
        }
        self.runs = merged;
        true
    }

    /// The highest number held with nothing missing below it since the first held
    /// (what a have says).
    pub fn head(&self) -> u64 {
        self.runs.first().map_or(0, |(_, b)| *b)
    }

    /// How many numbers between the first held and the last are missing.
    pub fn missing(&self) -> u64 {
        self.runs
            .windows(2)
            .map(|w| w[1].0.saturating_sub(w[0].1).saturating_sub(1))
            .sum()
    }
}

/// Most cards of people not (yet) members one group keeps.
pub const MAX_INTRODUCTIONS: usize = 64;

/// A message waiting for its author's right to post.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Waiting {
    /// Who sent it (a contact).
    pub from: Vec<u8>,
    /// Their identity key, as the group names members.
    pub key: [u8; 32],
    /// The message as it will be shown.
    pub message: GroupMessage,
    /// Where its file is, for a file posted to a group with group relays.
    pub source: Option<super::GroupSource>,
}

impl GroupRecord {
    /// Its operations, decoded. They were verified when they arrived and the store is
    /// ours (sealed, each value authenticated), so their signatures are not checked
    /// again.
    pub fn signed_ops(&self) -> Result<Vec<SignedOp>, StoreError> {
        self.ops
            .iter()
            .map(|b| {
                SignedOp::decode_verified(b).map_err(|_| StoreError::Corrupt("group operation"))
            })
            .collect()
    }

    /// The group's state from its operations; `None` until we are a member (what is
    /// held arrived before the rest of the group's log).
    pub fn roster(&self, id: GroupId) -> Result<Option<Roster>, StoreError> {
        if self.ops.is_empty() || !self.joined {
            return Ok(None);
        }
        match Roster::merge(id, &self.signed_ops()?) {
            Ok(r) => Ok(Some(r)),
            Err(GroupError::NoCreate) => Ok(None),
            Err(_) => Err(StoreError::Corrupt("group operations")),
        }
    }

    /// Our clock.
    pub fn hlc(&self) -> Hlc {
        Hlc {
            ms: self.clock.0,
            count: self.clock.1,
        }
    }

    /// Sets our clock.
    pub fn set_hlc(&mut self, hlc: Hlc) {
        self.clock = (hlc.ms, hlc.count);
    }
}

/// A message of a group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupMessage {
    /// Its author (a peer id); empty for ours.
    pub from: Vec<u8>,
    /// Its author's name in the group when it arrived.
    pub name: String,
    /// Its author's group clock: messages are shown in this order.
    pub hlc: (u64, u32),
    /// The message; for ours, `state` sums up the members' copies.
    pub message: MessageRecord,
    /// Ours: each member's copy (peer id) and how far it got.
    pub copies: Vec<(Vec<u8>, MessageState)>,
    /// A line about the group (who joined, left, renamed it), not a member's text:
    /// `from` is who did it (empty: we did, or it is not known).
    pub event: bool,
    /// Ours, sent after we had been removed (we learnt it later): members may not have
    /// been shown it.
    pub unseen: bool,
    /// Ours: members (peer ids) it could not be sealed to when it went because no card
    /// of theirs had reached us; it goes to each once they are met.
    pub missed: Vec<Vec<u8>>,
    /// In a large group: its number in its author's chain (0 in the small tier).
    pub post_seq: u64,
    /// In a large group: which of its author's devices posted it (whose chain
    /// `post_seq` counts).
    pub post_device: [u8; 8],
    /// Ours in a large group: how many other members there were when it went, how many
    /// hold it and how many read it, as their haves say (the small tier counts
    /// `copies` instead).
    pub reach: (u32, u32, u32),
}

impl GroupMessage {
    /// Its author, `None` for ours.
    pub fn author(&self) -> Option<PeerId> {
        PeerId::from_bytes(&self.from).ok()
    }

    /// How many members' copies reached their device, and were read.
    pub fn tally(&self) -> (usize, usize) {
        if self.post_seq != 0 {
            return (self.reach.1 as usize, self.reach.2 as usize);
        }
        let delivered = self
            .copies
            .iter()
            .filter(|(_, s)| matches!(s, MessageState::Delivered | MessageState::Read))
            .count();
        let read = self
            .copies
            .iter()
            .filter(|(_, s)| *s == MessageState::Read)
            .count();
        (delivered, read)
    }
}

impl GroupMessage {
    /// It carries no file.
    pub fn file_free(&self) -> bool {
        self.message.file.is_none()
    }

    /// How many other members it went to.
    pub fn audience(&self) -> usize {
        if self.post_seq != 0 {
            self.reach.0 as usize
        } else {
            self.copies.len()
        }
    }
}

impl LocalStore {
    /// The group `id`, if we hold it.
    pub fn group(&self, id: &GroupId) -> Result<Option<GroupRecord>, StoreError> {
        self.get_record(TreeId::Groups, &group_key(id), "group")
    }

    /// The group `id` as `w` leaves it, if `w` writes it.
    pub fn pending_group(w: &WriteSet, id: &GroupId) -> Option<GroupRecord> {
        match w.pending(TreeId::Groups, &group_key(id))? {
            Some(bytes) => decode(bytes, "group").ok(),
            None => None,
        }
    }

    /// Removes a group's record, and nothing else (in a WriteSet): for a group we never
    /// joined, which has no messages of its own.
    pub fn remove_group_record(w: &mut WriteSet, id: &GroupId) {
        w.remove(TreeId::Groups, group_key(id));
    }

    /// Writes a group's record (in a WriteSet).
    pub fn write_group(w: &mut WriteSet, id: &GroupId, record: &GroupRecord) {
        w.put_record(TreeId::Groups, group_key(id), record);
    }

    /// Every group we hold, including those only messages told us of.
    pub fn groups(&self) -> Result<Vec<(GroupId, GroupRecord)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree(TreeId::Groups).iter() {
            let (k, v) = item?;
            let id: [u8; 32] = k
                .get(6..)
                .and_then(|id| id.try_into().ok())
                .ok_or(StoreError::Corrupt("group key"))?;
            out.push((GroupId(id), decode(&v, "group")?));
        }
        Ok(out)
    }

    /// Writes a message of group `id` at local order `local` (in a WriteSet).
    pub fn write_group_message(w: &mut WriteSet, id: &GroupId, local: u64, m: &GroupMessage) {
        w.put_record(TreeId::GroupMessages, message_key(id, local), m);
    }

    /// Notes that our message `message` went to `member` as one of the copies of the
    /// group message at `local` (in a WriteSet): their receipt finds it.
    pub fn write_group_copy(
        w: &mut WriteSet,
        member: &PeerId,
        message: &[u8; 16],
        id: &GroupId,
        local: u64,
    ) {
        Self::write_group_copy_at(w, member, message, message_key(id, local));
    }

    /// [`LocalStore::write_group_copy`], for the message stored under `key`.
    pub fn write_group_copy_at(
        w: &mut WriteSet,
        member: &PeerId,
        message: &[u8; 16],
        key: Vec<u8>,
    ) {
        w.put(TreeId::GroupIndex, index_key(member, message), key);
    }

    /// Notes where member `from`'s message `message` in group `id` (carrying a file)
    /// is, so [`LocalStore::group_message_by_id`] finds it without reading the group.
    /// Keyed by its author too: a message id is the sender's choice, and another
    /// member reusing it names only their own message.
    pub fn write_group_message_index(
        w: &mut WriteSet,
        id: &GroupId,
        from: &PeerId,
        message: &[u8; 16],
        local: u64,
    ) {
        let mut key = group_member_key(id, from);
        key.extend_from_slice(message);
        w.put(TreeId::GroupIndex, key, message_key(id, local));
    }

    /// Member `from`'s message `message` in group `id`, noted by
    /// [`LocalStore::write_group_message_index`]; `None` if it is gone (expired,
    /// forgotten), was never noted, or is not theirs.
    pub fn group_message_by_id(
        &self,
        id: &GroupId,
        from: &PeerId,
        message: &[u8; 16],
    ) -> Result<Option<GroupMessage>, StoreError> {
        let mut key = group_member_key(id, from);
        key.extend_from_slice(message);
        let Some(at) = self.tree(TreeId::GroupIndex).get(key)? else {
            return Ok(None);
        };
        let now = crate::engine::now_ms();
        Ok(self
            .get_record::<GroupMessage>(TreeId::GroupMessages, &at, "group message")?
            .filter(|m| {
                m.message.id == *message && m.from == from.to_bytes() && !m.message.expired(now)
            }))
    }

    /// Our own post `message` in group `id` as another device of ours copied it here,
    /// noted by [`LocalStore::write_group_message_index`] under our peer id `me`.
    pub fn own_group_post(
        &self,
        id: &GroupId,
        me: &PeerId,
        message: &[u8; 16],
    ) -> Result<Option<GroupMessage>, StoreError> {
        let mut key = group_member_key(id, me);
        key.extend_from_slice(message);
        let Some(at) = self.tree(TreeId::GroupIndex).get(key)? else {
            return Ok(None);
        };
        Ok(self
            .get_record::<GroupMessage>(TreeId::GroupMessages, &at, "group message")?
            .filter(|m| m.message.id == *message && m.from.is_empty()))
    }

    /// Entries of the group index (tests: nothing is left behind).
    #[cfg(test)]
    pub(crate) fn group_index_len(&self) -> usize {
        self.tree(TreeId::GroupIndex).len()
    }

    /// Our group message whose copy `member` received as `message`: its key and record.
    pub fn group_copy(
        &self,
        member: &PeerId,
        message: &[u8; 16],
    ) -> Result<Option<(Vec<u8>, GroupMessage)>, StoreError> {
        let Some(key) = self
            .tree(TreeId::GroupIndex)
            .get(index_key(member, message))?
        else {
            return Ok(None);
        };
        Ok(self
            .get_record(TreeId::GroupMessages, &key, "group message")?
            .map(|m| (key.to_vec(), m)))
    }

    /// Rewrites a group message at its key (in a WriteSet).
    pub fn rewrite_group_message(w: &mut WriteSet, key: Vec<u8>, m: &GroupMessage) {
        w.put_record(TreeId::GroupMessages, key, m);
    }

    /// The messages of group `id` in the order members show them: by their authors'
    /// clocks, then by author, then as they arrived.
    pub fn group_messages(&self, id: &GroupId) -> Result<Vec<GroupMessage>, StoreError> {
        Ok(self
            .group_messages_keyed(id)?
            .into_iter()
            .map(|(_, m)| m)
            .collect())
    }

    /// The last `n` messages of group `id` to arrive, in the order members show them:
    /// what a view of the group needs, without reading its whole history.
    pub fn recent_group_messages(
        &self,
        id: &GroupId,
        n: usize,
    ) -> Result<Vec<GroupMessage>, StoreError> {
        Ok(self
            .recent_group_messages_keyed(id, n)?
            .into_iter()
            .map(|(_, m)| m)
            .collect())
    }

    /// [`LocalStore::recent_group_messages`] with each message's key.
    pub fn recent_group_messages_keyed(
        &self,
        id: &GroupId,
        n: usize,
    ) -> Result<Vec<(Vec<u8>, GroupMessage)>, StoreError> {
        let now = crate::engine::now_ms();
        let mut out = Vec::new();
        for item in self
            .tree(TreeId::GroupMessages)
            .scan_prefix(group_key(id))
            .rev()
        {
            let (k, v) = item?;
            let m: GroupMessage = decode(&v, "group message")?;
            if !m.message.expired(now) {
                out.push((k.to_vec(), m));
                if out.len() == n {
                    break;
                }
            }
        }
        out.sort_by(|(_, a), (_, b)| a.hlc.cmp(&b.hlc).then_with(|| a.from.cmp(&b.from)));
        Ok(out)
    }

    /// [`LocalStore::group_messages`] with each message's key.
    pub fn group_messages_keyed(
        &self,
        id: &GroupId,
    ) -> Result<Vec<(Vec<u8>, GroupMessage)>, StoreError> {
        let now = crate::engine::now_ms();
        let mut out = Vec::new();
        for item in self.tree(TreeId::GroupMessages).scan_prefix(group_key(id)) {
            let (k, v) = item?;
            let m: GroupMessage = decode(&v, "group message")?;
            if !m.message.expired(now) {
                out.push((k.to_vec(), m));
            }
        }
        // A stable sort keeps arrival order among equals.
        out.sort_by(|(_, a), (_, b)| a.hlc.cmp(&b.hlc).then_with(|| a.from.cmp(&b.from)));
        Ok(out)
    }

    /// Deletes group `id`'s messages whose timer ran out by `now` (in a WriteSet);
    /// returns how many, and when the next one is due (0: none).
    pub fn delete_expired_group(
        &self,
        w: &mut WriteSet,
        id: &GroupId,
        now: u64,
    ) -> Result<(usize, u64), StoreError> {
        let (mut gone, mut next) = (0, 0u64);
        for item in self.tree(TreeId::GroupMessages).scan_prefix(group_key(id)) {
            let (k, v) = item?;
            let m: GroupMessage = decode(&v, "group message")?;
            if m.message.expired(now) {
                w.remove(TreeId::GroupMessages, k.to_vec());
                // What pointed at it goes too: where each member's copy of ours is
                // counted, and where a member's file is found.
                for (member, _) in &m.copies {
                    if let Ok(member) = PeerId::from_bytes(member) {
                        w.remove(TreeId::GroupIndex, index_key(&member, &m.message.id));
                    }
                }
                if let Some(author) = m.author() {
                    let mut key = group_member_key(id, &author);
                    key.extend_from_slice(&m.message.id);
                    w.remove(TreeId::GroupIndex, key);
                }
                gone += 1;
            } else if m.message.timer_secs != 0 {
                let at = m.message.expires_at();
                next = if next == 0 { at } else { next.min(at) };
            }
        }
        Ok((gone, next))
    }

    /// Everything kept of group `id` goes (in a WriteSet): its log, its messages and
    /// where our copies were counted. Returns how many messages.
    pub fn forget_group(&self, w: &mut WriteSet, id: &GroupId) -> Result<usize, StoreError> {
        let mut n = 0;
        let prefix = group_key(id);
        for item in self.tree(TreeId::GroupMessages).scan_prefix(prefix.clone()) {
            let (k, _) = item?;
            w.remove(TreeId::GroupMessages, k.to_vec());
            n += 1;
        }
        for item in self.tree(TreeId::GroupIndex).iter() {
            let (k, v) = item?;
            if v.starts_with(&prefix) {
                w.remove(TreeId::GroupIndex, k.to_vec());
            }
        }
        let record = self.group(id)?.unwrap_or_default();
        let ours = record.next_seq;
        LocalStore::write_group(
            w,
            id,
            &GroupRecord {
                next_seq: ours,
                forgotten: true,
                ..GroupRecord::default()
            },
        );
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Direction, MessageRecord};

    fn said(from: u8, hlc: u64, text: &str) -> GroupMessage {
        GroupMessage {
            from: vec![from],
            name: String::new(),
            hlc: (hlc, 0),
            message: MessageRecord {
                id: [hlc as u8; 16],
                direction: Direction::In,
                text: text.into(),
                state: MessageState::Received,
                sent_at_ms: hlc,
                stored_at_ms: hlc,
                seq: 1,
                prev: [0; 32],
                timer_secs: 0,
                edited: false,
                deleted: false,
                revised_seq: 0,
                reply_to: None,
                reactions: Default::default(),
                file: None,
            },
            copies: Vec::new(),
            event: false,
            unseen: false,
            missed: Vec::new(),
            post_seq: 0,
            post_device: [0; 8],
            reach: (0, 0, 0),
        }
    }

    #[test]
    fn messages_show_by_clock_and_the_recent_ones_are_the_last_to_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, _) = LocalStore::provision(dir.path(), "Me", &[]).unwrap();
        let id = GroupId([4; 32]);
        let other = GroupId([5; 32]);
        let mut w = WriteSet::default();
        // Arrival order 0..5; clocks out of order (one came late, over another relay).
        for (local, (hlc, text)) in [(10, "a"), (30, "c"), (20, "b"), (50, "e"), (40, "d")]
            .into_iter()
            .enumerate()
        {
            LocalStore::write_group_message(&mut w, &id, local as u64, &said(1, hlc, text));
        }
        LocalStore::write_group_message(&mut w, &other, 0, &said(1, 1, "elsewhere"));
        store.apply(w).unwrap();
        let texts = |ms: Vec<GroupMessage>| -> Vec<String> {
            ms.into_iter().map(|m| m.message.text).collect()
        };
        assert_eq!(
            texts(store.group_messages(&id).unwrap()),
            ["a", "b", "c", "d", "e"]
        );
        // The last three to arrive (b, e, d), shown by their clocks.
        assert_eq!(
            texts(store.recent_group_messages(&id, 3).unwrap()),
            ["b", "d", "e"]
        );
        // Forgetting leaves the other group alone and keeps our next number.
        let mut w = WriteSet::default();
        assert_eq!(store.forget_group(&mut w, &id).unwrap(), 5);
        store.apply(w).unwrap();
        assert!(store.group_messages(&id).unwrap().is_empty());
        assert_eq!(store.group_messages(&other).unwrap().len(), 1);
        assert!(store.group(&id).unwrap().unwrap().forgotten);
    }
}
