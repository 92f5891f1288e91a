//! Groups (SPEC §14): membership changes signed into the group's log and shared with its
//! members over the pairwise sessions, and messages sealed to each member as a 1:1
//! record (the small tier), so a group survives relay loss as 1:1 chats do.

use std::collections::BTreeMap;

use kkachi_protocol::Card;
use kkachi_protocol::card::check_name;
use kkachi_protocol::content::{Body, Content, GroupBody, MAX_BODY_LEN, MAX_GROUP_CARDS};
use kkachi_protocol::envelope::CLOCK_SKEW_SECS;
use kkachi_protocol::file::FileRef;
use kkachi_protocol::group::{
    GroupId, Hlc, MAX_LOG_OPS, MAX_OPS_PER_AUTHOR, Mode, Op, Role, Roster, SMALL_GROUP_MAX,
    SignedOp, have_digest,
};
use kkachi_protocol::{MessageId, PeerId, PublicIdentity};

use super::EngineError;
use super::receive::{Outcome, Received};

mod large;
use super::state::{Sessions, State};
use crate::store::{
    Contact, Direction, FileNote, GroupMessage, GroupRecord, LocalStore, MAX_INTRODUCTIONS,
    MAX_WAITING_GROUPS, MAX_WAITING_PER_GROUP, MessageRecord, MessageState, OutboxKind, Waiting,
    WriteSet,
};
pub(crate) use large::{GroupQueue, group_poll_name, group_poll_relay, large_status};

/// Most of our messages of one group sealed again for a member we could not reach
/// when they went (the newest).
const CATCH_UP_MAX: usize = 50;
/// How many of a group's newest messages are looked at for what a member missed.
const CATCH_UP_SCAN: usize = 4 * CATCH_UP_MAX;
/// Most members met in groups (not contacts) one client keeps.
pub(crate) const MAX_MET: usize = 1024;
/// How long what waits for a member met in a group we no longer share with them keeps
/// them known (Unix ms): then it goes, and so do they.
const FORMER_MEMBER_GRACE_MS: u64 = 7 * 24 * 3600 * 1000;

/// How far ahead of our clock a peer's group clock may pull ours.
const MAX_AHEAD_MS: u64 = CLOCK_SKEW_SECS * 1000;
/// Bytes of operations per record: a record's body stays under [`MAX_BODY_LEN`].
const OPS_RECORD_BYTES: usize = MAX_BODY_LEN - 4 * 1024;
/// Most groups one contact can add us to.
pub(crate) const MAX_GROUPS_FROM_ONE: usize = 64;
/// How far ahead of our clock an operation may be dated and still be taken.
const FAR_AHEAD_MS: u64 = 24 * 3600 * 1000;
/// How long a message waits for the operations that let its author post.
const MAX_WAIT_MS: u64 = 7 * 24 * 3600 * 1000;
/// How often, at most, one member is sent our whole log while our digest stays the same.
const ANSWER_EVERY_MS: u64 = 10 * 60 * 1000;

/// A change to a group, as its user asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupChange {
    /// Adds contacts as members.
    Add(Vec<PeerId>),
    /// Removes a member.
    Remove(PeerId),
    /// We leave.
    Leave,
    /// Renames the group.
    Rename(String),
    /// Makes a member an admin (true) or a member again (false).
    Admin(PeerId, bool),
    /// Changes who may post.
    Mode(Mode),
    /// Sets the disappearing-message timer (seconds; 0: off).
    Timer(u32),
    /// Sets the group relays (none: the small tier; SPEC §14.5).
    Relays(Vec<kkachi_protocol::Multiaddr>),
}

/// What a change did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupChanged {
    /// Members it changed, by name (for an add: those added; a member already in is
    /// not added again).
    pub changed: Vec<String>,
    /// Members told of it.
    pub told: usize,
    /// Members who could not be told: no card of theirs has reached us (they are not
    /// contacts, and no member passed it on yet), or blocked (their names in the group).
    pub unreachable: Vec<String>,
    /// What was asked that is so already, said for the user.
    pub skipped: Vec<String>,
}

/// A message sealed to a group's members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSent {
    /// Its id (the same in every member's copy).
    pub id: MessageId,
    /// Members it was sealed to.
    pub copies: usize,
    /// Members it could not be sealed to: no card of theirs has reached us (they are
    /// not contacts, and no member passed it on yet), or blocked.
    pub unreachable: Vec<String>,
}

/// The epoch a group file's chunks went under, and the group relays they went to.
pub type GroupFilePlace = ([u8; 32], Vec<kkachi_protocol::Multiaddr>);

/// Where a file for a group goes (SPEC §14.4, §14.5).
#[derive(Debug, Clone)]
pub enum GroupFileRoute {
    /// No group relays: into each member's own queues, for the members we reach.
    Members(Vec<Contact>),
    /// Into the group queues of `epoch` on each group relay, once for every member.
    Relays {
        /// The epoch we may write under, whose queues take the chunks.
        epoch: [u8; 32],
        /// Each group relay, and the epoch's group queue key there.
        queues: Vec<(kkachi_protocol::Multiaddr, kkachi_protocol::GroupKey)>,
        /// Members other than us.
        members: usize,
    },
    /// Group relays, but no key we may write under yet (an admin hands one out).
    Waiting,
}

/// A group in a shown message: which one, and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupTag {
    /// The group.
    pub id: GroupId,
    /// Its name.
    pub name: String,
    /// The message is a line about the group (who joined, left, renamed it), not a
    /// member's text.
    pub event: bool,
}

/// A group's merged state, for the log it was computed from.
#[derive(Debug, Clone)]
pub(crate) struct Merged {
    /// How many operations the log held, and a hash of the last one (the log only
    /// grows, so these name it).
    stamp: (usize, [u8; 32]),
    /// `None` until we are a member.
    roster: Option<Roster>,
    /// Our digest of the log.
    have: [u8; 16],
}

/// What names a group's log: whether we are in it, and a hash of every operation in
/// order (cheap beside decoding them: a few hundred bytes each).
fn stamp(record: &GroupRecord) -> (usize, [u8; 32]) {
    use blake2::Digest as _;
    let mut h = blake2::Blake2s256::new();
    h.update([u8::from(record.joined)]);
    for op in &record.ops {
        h.update((op.len() as u32).to_be_bytes());
        h.update(op);
    }
    (record.ops.len(), h.finalize().into())
}

fn no_group() -> EngineError {
    EngineError::Invalid("no such group".into())
}

fn key_of(peer: &PeerId, roster: &Roster) -> Option<[u8; 32]> {
    roster
        .members
        .iter()
        .find(|(_, m)| m.identity.peer_id() == *peer)
        .map(|(k, _)| *k)
}

impl<T> State<T> {
    /// Group `id`'s state and our digest of its log, merged once per log.
    fn merged(&self, id: GroupId, record: &GroupRecord) -> Result<Merged, EngineError> {
        let now = stamp(record);
        if let Some(m) = self.rosters.lock().get(&id.0)
            && m.stamp == now
        {
            return Ok(m.clone());
        }
        let ops = record.signed_ops()?;
        let merged = Merged {
            stamp: now,
            roster: record.roster(id)?,
            have: have_digest(&ops),
        };
        let mut cache = self.rosters.lock();
        if cache.len() > 256 {
            cache.clear();
        }
        cache.insert(id.0, merged.clone());
        Ok(merged)
    }

    fn own_key(&self) -> [u8; 32] {
        *self.me.public().ed25519()
    }

    /// This device, as large groups' posts and haves name it (SPEC §14.5).
    fn own_device(&self) -> kkachi_protocol::group::large::DeviceTag {
        kkachi_protocol::group::large::device_tag(&self.me.x25519_public())
    }

    /// Founds a group with us as its only member and admin.
    pub(crate) fn create_group(&mut self, name: &str, now: u64) -> Result<GroupId, EngineError> {
        check_name(name).map_err(|e| EngineError::Invalid(format!("group name: {e}")))?;
        let own_name = self.own_card()?.name().to_owned();
        let hlc = Hlc::default().tick(now);
        let create = SignedOp::create(&self.me, &own_name, rand::random(), name, Mode::Chat, hlc);
        let id = create.group();
        let mut record = GroupRecord {
            ops: vec![create.encode().to_vec()],
            next_seq: 2,
            joined_ms: now,
            joined: true,
            ..GroupRecord::default()
        };
        record.set_hlc(hlc);
        let mut w = WriteSet::default();
        LocalStore::write_group(&mut w, &id, &record);
        self.store.apply(w)?;
        Ok(id)
    }

    /// Signs `change` into group `id`'s log and shares it with the members: the new
    /// operations to every member (a removed one included), the whole log to a member
    /// just added.
    pub(crate) fn change_group(
        &mut self,
        id: GroupId,
        change: GroupChange,
        now: u64,
    ) -> Result<GroupChanged, EngineError> {
        let mut record = self.store.group(&id)?.ok_or_else(no_group)?;
        let before = record.roster(id)?.ok_or_else(no_group)?;
        let me = self.own_key();
        match before.role(&me) {
            None => {
                return Err(EngineError::Invalid(
                    "you are not a member of this group".into(),
                ));
            }
            Some(Role::Member) if change != GroupChange::Leave => {
                let admins: Vec<String> = before
                    .admins()
                    .map(|k| self.call(k, &[&before]))
                    .collect::<Result<_, _>>()?;
                return Err(EngineError::Invalid(format!(
                    "only the group's admins can change it ({})",
                    if admins.is_empty() {
                        "it has none left".to_string()
                    } else {
                        admins.join(", ")
                    }
                )));
            }
            _ => {}
        }
        let mut skipped = Vec::new();
        let member = |peer: &PeerId| {
            key_of(peer, &before)
                .ok_or_else(|| EngineError::Invalid("they are not a member of this group".into()))
        };
        let mut planned: Vec<(Op, String)> = Vec::new();
        let mut added = Vec::new();
        match &change {
            GroupChange::Add(peers) => {
                for peer in peers {
                    let contact = self.store.added_contact(peer)?.ok_or_else(|| {
                        EngineError::Invalid(format!("{peer} is not one of your contacts"))
                    })?;
                    if self.store.blocked(peer)?.is_some() {
                        return Err(EngineError::Invalid(format!("{} is blocked", contact.name)));
                    }
                    let identity = *contact.card.identity();
                    if before.members.contains_key(identity.ed25519())
                        || added.contains(identity.ed25519())
                    {
                        skipped.push(format!("{} is a member already", contact.name));
                        continue;
                    }
                    added.push(*identity.ed25519());
                    planned.push((
                        Op::Add {
                            member: identity,
                            name: contact.card.name().to_owned(),
                            role: Role::Member,
                        },
                        contact.name.clone(),
                    ));
                }
                if before.relays.is_empty() && before.members.len() + added.len() > SMALL_GROUP_MAX
                {
                    return Err(EngineError::Invalid(format!(
                        "a group without group relays holds at most {SMALL_GROUP_MAX} members; give it three (`kkachi group relays GROUP ADDR…`) to grow it to {}",
                        kkachi_protocol::group::MAX_MEMBERS
                    )));
                }
                if before.members.len() + added.len() > kkachi_protocol::group::MAX_MEMBERS {
                    return Err(EngineError::Invalid(format!(
                        "a group holds at most {} members",
                        kkachi_protocol::group::MAX_MEMBERS
                    )));
                }
            }
            GroupChange::Remove(peer) => {
                let key = member(peer)?;
                planned.push((
                    Op::Remove {
                        member: key,
                        cut: before.seen(&key),
                    },
                    before.members[&key].name.clone(),
                ));
            }
            GroupChange::Leave => planned.push((
                Op::Remove {
                    member: me,
                    cut: before.seen(&me),
                },
                before.members[&me].name.clone(),
            )),
            GroupChange::Rename(name) if *name == before.name => {
                skipped.push(format!("it is called {name} already"));
            }
            GroupChange::Rename(name) => {
                check_name(name).map_err(|e| EngineError::Invalid(format!("group name: {e}")))?;
                planned.push((Op::Rename { name: name.clone() }, name.clone()));
            }
            GroupChange::Admin(peer, promote)
                if member(peer)
                    .is_ok_and(|k| (before.members[&k].role == Role::Admin) == *promote) =>
            {
                let k = member(peer)?;
                skipped.push(format!(
                    "{} is {} already",
                    self.call(&k, &[&before])?,
                    if *promote { "an admin" } else { "not an admin" }
                ));
            }
            GroupChange::Admin(peer, promote) => {
                let key = member(peer)?;
                planned.push((
                    Op::SetRole {
                        member: key,
                        role: if *promote { Role::Admin } else { Role::Member },
                        cut: if *promote { 0 } else { before.seen(&key) },
                    },
                    before.members[&key].name.clone(),
                ));
            }
            GroupChange::Mode(mode) if *mode == before.mode => skipped.push(match mode {
                Mode::Chat => "every member posts already".into(),
                Mode::Announcement => "it is an announcement channel already".into(),
            }),
            GroupChange::Mode(mode) => planned.push((
                Op::SetMode { mode: *mode },
                match mode {
                    Mode::Chat => "chat".into(),
                    Mode::Announcement => "announcement".into(),
                },
            )),
            GroupChange::Timer(secs) if *secs == before.timer_secs => {
                skipped.push("the timer is so already".into());
            }
            GroupChange::Timer(secs) => {
                if *secs > kkachi_protocol::content::MAX_TIMER_SECS {
                    return Err(EngineError::Invalid("a timer is at most a year".into()));
                }
                planned.push((Op::SetTimer { secs: *secs }, secs.to_string()));
            }
            GroupChange::Relays(relays) if *relays == before.relays => {
                skipped.push("the group has these relays already".into());
            }
            GroupChange::Relays(relays) => {
                kkachi_protocol::group::check_group_relays(relays)
                    .map_err(|e| EngineError::Invalid(e.to_string()))?;
                if relays.is_empty() && before.members.len() > SMALL_GROUP_MAX {
                    return Err(EngineError::Invalid(format!(
                        "a group of more than {SMALL_GROUP_MAX} members needs group relays"
                    )));
                }
                planned.push((
                    Op::SetRelays {
                        relays: relays.clone(),
                    },
                    format!("{} relays", relays.len()),
                ));
            }
        }
        if planned.is_empty() {
            return Ok(GroupChanged {
                skipped,
                ..GroupChanged::default()
            });
        }
        if record.ops.len() + planned.len() > MAX_LOG_OPS {
            return Err(EngineError::Invalid(
                "this group's log is full; start a new group".into(),
            ));
        }
        // Dated after everything in the log, but a change dated far ahead by someone else
        // does not pull ours along.
        let cap = Hlc {
            ms: now.saturating_add(MAX_AHEAD_MS),
            count: 0,
        };
        let mut hlc = record.hlc().max(before.latest.min(cap));
        // Our next number follows every operation of ours held (one who joined someone
        // else's group has none yet: 1).
        let ours = record
            .signed_ops()?
            .iter()
            .filter(|o| o.author() == &me)
            .map(SignedOp::seq)
            .max()
            .unwrap_or(0);
        record.next_seq = record.next_seq.max(ours + 1);
        if record.next_seq + planned.len() as u64 > MAX_OPS_PER_AUTHOR as u64 + 1 {
            return Err(EngineError::Invalid(format!(
                "you made {MAX_OPS_PER_AUTHOR} changes to this group already, as many as members keep from one person; start a new group"
            )));
        }
        let mut new_ops = Vec::new();
        let mut changed = Vec::new();
        for (op, label) in planned {
            hlc = hlc.tick(now);
            let signed = SignedOp::sign(&self.me, id, record.next_seq, hlc, op);
            record.next_seq += 1;
            record.ops.push(signed.encode().to_vec());
            new_ops.push(signed);
            changed.push(label);
        }
        record.set_hlc(hlc);
        let all = record.signed_ops()?;
        let after = Roster::merge(id, &all)
            .map_err(|e| EngineError::Invalid(format!("this change does not merge: {e}")))?;
        // Everyone who is a member now or was one before this change hears of it.
        let mut audience: BTreeMap<[u8; 32], (PublicIdentity, String)> = BTreeMap::new();
        for (key, m) in before.members.iter().chain(after.members.iter()) {
            if *key != me {
                audience.insert(*key, (m.identity, m.name.clone()));
            }
        }
        let have = have_digest(&all);
        let mut event_lines = Vec::new();
        for (hlc, author, text) in self.events(Some(&before), &after, &new_ops)? {
            let local = record.next_local;
            record.next_local += 1;
            event_lines.push((
                local,
                event_message(author.map(|p| p.to_bytes()), hlc, text, now),
            ));
        }
        let changed = self.with_sessions(|this, sessions| {
            let mut w = WriteSet::default();
            for (local, m) in &event_lines {
                LocalStore::write_group_message(&mut w, &id, *local, m);
            }
            LocalStore::write_group(&mut w, &id, &record);
            let mut told = 0;
            let mut unreachable = Vec::new();
            for (key, (identity, name)) in &audience {
                let (what, whole) = if added.contains(key) {
                    (&all, Some(&after))
                } else {
                    (&new_ops, None)
                };
                match this.reachable(&identity.peer_id())? {
                    Some(contact) => {
                        this.share_ops(&mut w, sessions, &contact, id, what, whole, have, now)?;
                        told += 1;
                    }
                    // In the large tier, the group queue tells them.
                    None if !after.relays.is_empty() && !added.contains(key) => told += 1,
                    None => unreachable.push(name.clone()),
                }
            }
            // Our other devices take the log (SPEC §15.2): a group made here after they
            // joined, too. The whole log while it is short (as a group starts: what
            // came since is then new operations only). (A copy names a member told.)
            if let Some((identity, _)) = audience.values().next() {
                let first = identity.peer_id();
                let (copied, whole) = if all.len() <= WHOLE_LOG_TO_OWN_OPS {
                    (&all, true)
                } else {
                    (&new_ops, false)
                };
                for what in ops_records(copied, whole, have) {
                    let body = Body::Group { group: id, what };
                    let record = super::state::control(body, now);
                    this.copy_to_own(&mut w, sessions, &first, &record, now)?;
                }
            }
            if !after.relays.is_empty() {
                // An epoch without anyone who left and with everyone added, and the
                // group queue telling every member (a removed one too, under the
                // epoch they held).
                let mut record = record.clone();
                this.after_change_large(&mut w, sessions, id, &mut record, &after, &new_ops, now)?;
                LocalStore::write_group(&mut w, &id, &record);
                this.group_queues_changed
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            this.apply_or_reset(sessions, w)?;
            Ok(GroupChanged {
                changed,
                skipped,
                told,
                unreachable,
            })
        })?;
        if matches!(change, GroupChange::Remove(_) | GroupChange::Leave)
            && let Err(e) = self.forget_former_members(now)
        {
            tracing::warn!(error = %e, "could not forget members of groups we left");
        }
        Ok(changed)
    }

    /// Whether `peer` may make us keep one more group: at most [`MAX_WAITING_GROUPS`]
    /// we are not (yet) in from one contact (four times that in all), and at most
    /// [`MAX_GROUPS_FROM_ONE`] they added us to.
    /// Groups we are not in that waited longer than [`MAX_WAIT_MS`] for the rest of
    /// their log go (in `w`), making room.
    fn may_hold_another(
        &self,
        w: &mut WriteSet,
        peer: &PeerId,
        now: u64,
    ) -> Result<bool, EngineError> {
        let who = peer.to_bytes();
        let all = self.store.groups()?;
        let mut pending = 0;
        let mut theirs = 0;
        let mut joined = 0;
        for (id, g) in &all {
            if g.joined {
                joined += usize::from(g.invited_by == who);
                continue;
            }
            if g.forgotten {
                continue;
            }
            if now.saturating_sub(g.joined_ms) > MAX_WAIT_MS {
                LocalStore::remove_group_record(w, id);
                continue;
            }
            pending += 1;
            theirs += usize::from(g.invited_by == who);
        }
        Ok(theirs < MAX_WAITING_GROUPS
            && pending < 4 * MAX_WAITING_GROUPS
            && joined < MAX_GROUPS_FROM_ONE)
    }

    /// A member we can seal to: a contact, not blocked.
    fn reachable(&self, peer: &PeerId) -> Result<Option<Contact>, EngineError> {
        match self.store.contact(peer)? {
            Some(c) if self.store.blocked(peer)?.is_none() => Ok(Some(c)),
            _ => Ok(None),
        }
    }

    /// Queues `ops` of group `id` for `contact`, in as many records as they need
    /// (`whole`: they are every operation we hold, whose state is that roster, said on
    /// the last record), with our digest `have`. The
    /// records are kept for sealing again on a new session, as messages are: a member
    /// who misses an operation would see another group.
    #[allow(clippy::too_many_arguments)]
    fn share_ops(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        contact: &Contact,
        id: GroupId,
        ops: &[SignedOp],
        whole: Option<&Roster>,
        have: [u8; 16],
        now: u64,
    ) -> Result<(), EngineError> {
        let session = sessions.get(&self.store, contact)?;
        for what in ops_records(ops, whole.is_some(), have) {
            self.queue_group_record(w, contact, session, id, what, now)?;
        }
        session.write(w, &contact.peer);
        self.pass_cards(w, sessions, contact, id, ops, whole, now)
    }

    /// Queues an unsequenced record of group `id` for `contact` on `session`: kept
    /// until the member confirms it, and sealed again on a new session, as a message
    /// is (a member who misses an operation or a card would see another group).
    fn queue_group_record(
        &self,
        w: &mut WriteSet,
        contact: &Contact,
        session: &mut super::state::PeerSessions,
        id: GroupId,
        what: GroupBody,
        now: u64,
    ) -> Result<(), EngineError> {
        let content = Content {
            id: MessageId(rand::random()),
            seq: 0,
            prev: [0; 32],
            sent_at_ms: now,
            body: Body::Group { group: id, what },
        };
        self.seal_into(w, contact, session, &content, OutboxKind::Message, now)
            .map(drop)
    }

    /// Passes `contact` the cards we hold of the members `ops` concern (every member of
    /// `whole`, with a whole log; else those the operations add), so members who are not each
    /// other's contacts reach each other (SPEC §14.4). Kept until confirmed, as the
    /// operations are.
    #[allow(clippy::too_many_arguments)]
    fn pass_cards(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        contact: &Contact,
        id: GroupId,
        ops: &[SignedOp],
        whole: Option<&Roster>,
        now: u64,
    ) -> Result<(), EngineError> {
        // With group relays, members reach each other through the group's queue: nobody
        // needs another's card (and nobody meets anyone above the small tier).
        let large = match whole {
            Some(roster) => !roster.relays.is_empty(),
            None => {
                let record = match LocalStore::pending_group(w, &id) {
                    Some(r) => Some(r),
                    None => self.store.group(&id)?,
                };
                record
                    .and_then(|r| self.merged(id, &r).ok()?.roster)
                    .is_some_and(|r| !r.relays.is_empty())
            }
        };
        if large {
            return Ok(());
        }
        let keys: Vec<[u8; 32]> = if let Some(roster) = whole {
            roster.members.keys().copied().collect()
        } else {
            ops.iter()
                .filter_map(|o| match o.op() {
                    Op::Add { member, .. } => Some(*member.ed25519()),
                    _ => None,
                })
                .collect()
        };
        let to = *contact.card.identity().ed25519();
        let me = self.own_key();
        let contacts = self.store.contacts()?;
        let mut cards: Vec<Card> = Vec::new();
        for key in keys {
            if key == me || key == to || cards.iter().any(|c| *c.identity().ed25519() == key) {
                continue;
            }
            if let Some(c) = contacts
                .iter()
                .find(|c| *c.card.identity().ed25519() == key)
                && self.store.blocked(&c.peer)?.is_none()
            {
                cards.push(c.card.clone());
            }
        }
        if cards.is_empty() {
            return Ok(());
        }
        let session = sessions.get(&self.store, contact)?;
        for chunk in cards.chunks(MAX_GROUP_CARDS) {
            let what = GroupBody::Cards {
                cards: chunk.to_vec(),
            };
            self.queue_group_record(w, contact, session, id, what, now)?;
        }
        session.write(w, &contact.peer);
        Ok(())
    }

    /// Cards a member passed on (a group record): kept for the people they name until
    /// those are members here, then met (see [`Self::meet`]).
    fn take_cards(
        &self,
        w: &mut WriteSet,
        contact: &Contact,
        id: GroupId,
        cards: &[Card],
        now: u64,
    ) -> Result<Outcome, EngineError> {
        let Some(mut record) = LocalStore::pending_group(w, &id).or(self.store.group(&id)?) else {
            return refused_ops("cards for a group we do not hold");
        };
        let sender = *contact.card.identity().ed25519();
        let me = self.own_key();
        let roster = match record.joined && !record.forgotten {
            true => self.merged(id, &record)?.roster,
            false => None,
        };
        // From someone the group knows: a member or former member, or (before we are
        // in) the one whose records brought it; and only while we are in it.
        let known = match &roster {
            Some(r) => {
                r.members.contains_key(&me)
                    && (r.members.contains_key(&sender) || r.former.contains(&sender))
            }
            None => {
                !record.joined && !record.forgotten && record.invited_by == contact.peer.to_bytes()
            }
        };
        if !known {
            return refused_ops("cards from someone outside the group, or of a group we left");
        }
        // One card per person (by identity key), the newest.
        let mut held: Vec<Card> = record
            .introductions
            .iter()
            .filter_map(|b| Card::decode(b).ok())
            .collect();
        for card in cards {
            let key = card.identity().ed25519();
            match held.iter().position(|c| c.identity().ed25519() == key) {
                Some(i) if held[i].version() >= card.version() => continue,
                Some(i) => {
                    held.remove(i);
                }
                None => {}
            }
            if held.len() >= MAX_INTRODUCTIONS {
                held.remove(0);
            }
            held.push(card.clone());
        }
        record.introductions = held.iter().map(Card::encode).collect();
        if let Some(roster) = &roster {
            self.introduce(w, &mut record, roster, now)?;
        }
        LocalStore::write_group(w, &id, &record);
        Ok(Outcome::Applied("members' cards"))
    }

    /// Meets the members of `roster` whose cards `record` holds; drops the cards of
    /// people who left or were removed, keeps the others for when they are added.
    fn introduce(
        &self,
        w: &mut WriteSet,
        record: &mut GroupRecord,
        roster: &Roster,
        now: u64,
    ) -> Result<(), EngineError> {
        let me = self.own_key();
        // Members are met in groups of the small tier only, and only while we are in
        // them: an admin cannot make us meet a thousand made-up people.
        if !roster.members.contains_key(&me) || roster.members.len() > SMALL_GROUP_MAX {
            return Ok(());
        }
        let mut kept = Vec::new();
        let mut due = Vec::new();
        for bytes in std::mem::take(&mut record.introductions) {
            let Ok(card) = Card::decode(&bytes) else {
                continue;
            };
            let key = *card.identity().ed25519();
            if key == me || roster.former.contains(&key) && !roster.members.contains_key(&key) {
                continue;
            }
            if !roster.members.contains_key(&key) {
                kept.push(bytes);
                continue;
            }
            due.push(card);
        }
        // Two people naming one session key: at least one card is forged, and nothing
        // here tells which (a first message from its holder will: see `meet`).
        for card in &due {
            let x = card.identity().x25519();
            if due.iter().filter(|c| c.identity().x25519() == x).count() > 1 {
                tracing::warn!(member = %card.identity().peer_id(), "two members' cards name one session key; neither is taken");
                continue;
            }
            self.meet(w, card, false, now)?;
        }
        record.introductions = kept;
        Ok(())
    }

    /// Makes the member `card` names reachable for the group's records: written as a
    /// member met in a group ([`Contact::through_group`]), granted at our relays like a
    /// contact. A contact the user added keeps their own card (they send it). Only a
    /// newer card with the same session key replaces a met member's (a rotation is
    /// taken from a first message only, as for contacts). A card naming a session key
    /// another contact holds is refused, unless `proven` (it came with a first message
    /// sealed with that key) and the other is only a member met in a group: that card
    /// is then forged (SPEC §1), and its holder forgotten. Returns the member written,
    /// if any.
    pub(super) fn meet(
        &self,
        w: &mut WriteSet,
        card: &Card,
        proven: bool,
        now: u64,
    ) -> Result<Option<Contact>, EngineError> {
        let peer = card.identity().peer_id();
        let x = card.identity().x25519();
        if peer == self.me.peer_id()
            || self.is_own_device_key(x)?
            || self.store.blocked(&peer)?.is_some()
            || card.check_fresh(now / 1000).is_err()
        {
            return Ok(None);
        }
        let contacts = self.store.contacts()?;
        let existing = contacts.iter().find(|c| c.peer == peer);
        match existing {
            Some(c) if c.is_added() || !card.supersedes(&c.card) || card.rotates(&c.card) => {
                return Ok(None);
            }
            None if contacts.iter().filter(|c| c.through_group).count() >= MAX_MET => {
                tracing::warn!(member = %peer, "too many members met in groups; not taken");
                return Ok(None);
            }
            // A key their account took out (a set kept from when they were a contact).
            None if self.names_removed_device(card)? => {
                tracing::warn!(member = %peer, "a member's card names a session key their account took out; not taken");
                return Ok(None);
            }
            _ => {}
        }
        if let Some(other) = contacts
            .iter()
            .find(|c| c.peer != peer && c.card.identity().x25519() == x)
        {
            if !proven || other.is_added() {
                tracing::warn!(member = %peer, holder = %other.peer, "a member's card names a session key a contact holds; not taken");
                return Ok(None);
            }
            tracing::warn!(member = %other.peer, holder = %peer, "a member met in a group named a session key another proved holding: that card is forged");
            self.store.forget_contact(w, &other.peer)?;
            self.revoked.lock().push(*other.card.identity().x25519());
        }
        let met = Contact {
            peer,
            name: card.name().to_owned(),
            card: card.clone(),
            through_group: true,
        };
        LocalStore::write_contact(w, &met);
        if existing.is_none() {
            // New: granted at our relays, and what they sent before we knew them is
            // taken in.
            self.met.store(true, std::sync::atomic::Ordering::SeqCst);
            self.newly_met.lock().push(peer);
            tracing::info!(member = %peer, "met a group member who is not a contact");
        }
        Ok(Some(met))
    }

    /// Our recent texts of the groups we share with `peer` that could not be sealed to
    /// them when they went (no card of theirs had reached us: [`GroupMessage::missed`]):
    /// sealed to them now, each once, as they went to the others (the same id, numbered
    /// in our conversation with them). Only from the last week, the newest
    /// [`CATCH_UP_MAX`] per group, and while they are still a member. Returns how many.
    pub(crate) fn catch_up(&mut self, peer: &PeerId, now: u64) -> Result<usize, EngineError> {
        let Some(contact) = self.reachable(peer)? else {
            return Ok(0);
        };
        let key = *contact.card.identity().ed25519();
        let me = self.own_key();
        let who = peer.to_bytes();
        let mut due: Vec<(GroupId, [u8; 16], Vec<u8>, GroupMessage)> = Vec::new();
        for (id, record) in self.store.groups()? {
            if !record.joined || record.forgotten {
                continue;
            }
            let merged = self.merged(id, &record)?;
            let Some(roster) = merged.roster else {
                continue;
            };
            if !roster.members.contains_key(&key) || !roster.may_post(&me) {
                continue;
            }
            // Among the recent ones only (those `catch_up_everyone` looks at too).
            let missed: Vec<(Vec<u8>, GroupMessage)> = self
                .store
                .recent_group_messages_keyed(&id, CATCH_UP_SCAN)?
                .into_iter()
                .filter(|(_, m)| {
                    m.missed.contains(&who)
                        && !m.message.deleted
                        && now.saturating_sub(m.message.stored_at_ms) < MAX_WAIT_MS
                        && !m.copies.iter().any(|(p, _)| *p == who)
                })
                .collect();
            let skip = missed.len().saturating_sub(CATCH_UP_MAX);
            due.extend(
                missed
                    .into_iter()
                    .skip(skip)
                    .map(|(k, m)| (id, merged.have, k, m)),
            );
        }
        if due.is_empty() {
            return Ok(0);
        }
        let n = due.len();
        self.with_sessions(|this, sessions| {
            let mut w = WriteSet::default();
            let mut conv = this.store.conversation(peer)?;
            for (id, have, store_key, mut m) in due {
                let body = Body::Group {
                    group: id,
                    what: GroupBody::Message {
                        hlc: Hlc {
                            ms: m.hlc.0,
                            count: m.hlc.1,
                        },
                        have,
                        secs: m.message.timer_secs,
                        text: m.message.text.clone(),
                    },
                };
                let id = MessageId(m.message.id);
                this.seal_numbered(&mut w, sessions, &contact, &mut conv, id, body, now)?;
                LocalStore::write_group_copy_at(&mut w, peer, &m.message.id, store_key.clone());
                m.missed.retain(|p| *p != who);
                m.copies.push((who.clone(), MessageState::Queued));
                LocalStore::rewrite_group_message(&mut w, store_key, &m);
            }
            LocalStore::write_conversation(&mut w, peer, &conv);
            this.apply_or_reset(sessions, w)
        })?;
        tracing::info!(member = %peer, messages = n, "sealed what a member we could not reach missed");
        Ok(n)
    }

    /// [`Self::catch_up`] for every member some recent message of ours missed who can be
    /// reached now (after a run that stopped before it was done). Returns how many
    /// messages went.
    pub(crate) fn catch_up_everyone(&mut self, now: u64) -> Result<usize, EngineError> {
        let mut peers = std::collections::BTreeSet::new();
        for (id, record) in self.store.groups()? {
            if !record.joined || record.forgotten {
                continue;
            }
            for m in self.store.recent_group_messages(&id, CATCH_UP_SCAN)? {
                if now.saturating_sub(m.message.stored_at_ms) < MAX_WAIT_MS {
                    peers.extend(m.missed.iter().filter_map(|p| PeerId::from_bytes(p).ok()));
                }
            }
        }
        let mut n = 0;
        for peer in peers {
            if self.reachable(&peer)?.is_some() {
                n += self.catch_up(&peer, now)?;
            }
        }
        Ok(n)
    }

    /// Members met in a group who share no group with us any more are forgotten, with
    /// what waits for them, once nothing queued for them in the last
    /// [`FORMER_MEMBER_GRACE_MS`] waits (the record telling them of their removal, say):
    /// our relays withdraw their capabilities. Returns how many.
    pub(crate) fn forget_former_members(&mut self, now: u64) -> Result<usize, EngineError> {
        let contacts = self.store.contacts()?;
        if contacts.iter().all(Contact::is_added) {
            return Ok(0);
        }
        let me = self.own_key();
        let mut shared = std::collections::BTreeSet::new();
        for (id, record) in self.store.groups()? {
            if !record.joined || record.forgotten {
                continue;
            }
            if let Some(roster) = self.merged(id, &record)?.roster
                && roster.members.contains_key(&me)
            {
                shared.extend(roster.members.keys().copied());
            }
        }
        let gone: Vec<Contact> = contacts
            .iter()
            .filter(|c| c.through_group && !shared.contains(c.card.identity().ed25519()))
            .filter(|c| {
                // Nothing recent waits for them (a member who never confirms does not
                // keep their place for ever).
                // (From when it was first queued: `created_ms` moves on with each put
                // again.)
                self.store.outbox_keys_of(&c.peer).into_iter().all(|key| {
                    matches!(self.store.outbox_entry(key), Ok(Some(e))
                        if now.saturating_sub(first_queued(&e)) > FORMER_MEMBER_GRACE_MS)
                })
            })
            .cloned()
            .collect();
        if gone.is_empty() {
            return Ok(0);
        }
        self.with_sessions(|this, sessions| {
            let mut w = WriteSet::default();
            for c in &gone {
                this.store.forget_outbox(&mut w, &c.peer)?;
                this.store.forget_contact(&mut w, &c.peer)?;
                sessions.forget(&c.peer);
            }
            this.apply_or_reset(sessions, w)
        })?;
        for c in &gone {
            self.revoked.lock().push(*c.card.identity().x25519());
            tracing::info!(member = %c.peer, "forgot a member met in a group we no longer share");
        }
        Ok(gone.len())
    }

    /// Whether `identity` is a member of a group we are in (for a first message from
    /// someone who is not a contact: a member we have no card of yet).
    pub(super) fn in_a_group_with(&self, identity: &PublicIdentity) -> Result<bool, EngineError> {
        let key = identity.ed25519();
        for (id, record) in self.store.groups()? {
            if !record.joined || record.forgotten {
                continue;
            }
            if let Some(roster) = self.merged(id, &record)?.roster
                && roster.members.len() <= SMALL_GROUP_MAX
                && roster.members.contains_key(&self.own_key())
                && roster.members.contains_key(key)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Marks group `id`'s messages read and tells their authors (read receipts, unless
    /// they are off): the author of an announcement sees who read it.
    pub(crate) fn mark_group_read(&mut self, id: GroupId, now: u64) -> Result<usize, EngineError> {
        let mut w = WriteSet::default();
        let mut by_author: BTreeMap<Vec<u8>, Vec<MessageId>> = BTreeMap::new();
        // In a large group: the highest number read of each author's device.
        let mut read_seqs: BTreeMap<(Vec<u8>, [u8; 8]), u64> = BTreeMap::new();
        for (key, mut m) in self.store.group_messages_keyed(&id)? {
            if m.event || m.from.is_empty() || m.message.state != MessageState::Received {
                continue;
            }
            m.message.state = MessageState::Read;
            if m.post_seq != 0 {
                let seq = read_seqs
                    .entry((m.from.clone(), m.post_device))
                    .or_default();
                *seq = (*seq).max(m.post_seq);
            }
            by_author
                .entry(m.from.clone())
                .or_default()
                .push(MessageId(m.message.id));
            LocalStore::rewrite_group_message(&mut w, key, &m);
        }
        let read: usize = by_author.values().map(Vec::len).sum();
        if read == 0 {
            return Ok(0);
        }
        // In a large group, our next have says what we read (unless receipts are off).
        if !read_seqs.is_empty()
            && let Some(mut record) = self.store.group(&id)?
            && let Some(roster) = self.merged(id, &record)?.roster
        {
            for ((from, device), seq) in &read_seqs {
                let Some(author) = roster
                    .members
                    .iter()
                    .find(|(_, x)| x.identity.peer_id().to_bytes() == *from)
                    .map(|(k, _)| *k)
                else {
                    continue;
                };
                if let Some(chain) = record
                    .large
                    .chains
                    .iter_mut()
                    .find(|c| c.author == author && c.device == *device)
                    && *seq > chain.read
                {
                    chain.read = *seq;
                    record.large.have_due = true;
                    // A read goes out at once, not after the half minute between haves.
                    record.large.have_sent_ms = 0;
                }
            }
            LocalStore::write_group(&mut w, &id, &record);
            self.group_queues_changed
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if self.store.profile()?.is_some_and(|p| p.read_receipts_off) {
            self.store.apply(w)?;
            return Ok(read);
        }
        self.with_sessions(|this, sessions| {
            for (author, ids) in &by_author {
                let Ok(peer) = PeerId::from_bytes(author) else {
                    continue;
                };
                let Some(contact) = this.reachable(&peer)? else {
                    continue;
                };
                let session = sessions.get(&this.store, &contact)?;
                for chunk in ids.chunks(kkachi_protocol::content::MAX_RECEIPT_IDS) {
                    let receipt = Body::Receipt {
                        status: kkachi_protocol::ReceiptStatus::Read,
                        ids: chunk.to_vec(),
                    };
                    this.queue_control(&mut w, &contact, session, receipt, now)?;
                }
            }
            this.apply_or_reset(sessions, w)?;
            Ok(read)
        })
    }

    /// Forgets group `id` here: its log and messages. Only a group we are not in (left
    /// or removed from): a member who forgot would not know what to send.
    pub(crate) fn forget_group(&mut self, id: GroupId) -> Result<usize, EngineError> {
        let record = self.store.group(&id)?.ok_or_else(no_group)?;
        if let Some(r) = record.roster(id)?
            && r.members.contains_key(&self.own_key())
        {
            return Err(EngineError::Invalid(
                "leave the group first (`kkachi group leave`)".into(),
            ));
        }
        let mut w = WriteSet::default();
        let n = self.store.forget_group(&mut w, &id)?;
        self.store.apply(w)?;
        self.rosters.lock().remove(&id.0);
        Ok(n)
    }

    /// Seals `text` to every member of group `id` we can reach, in one write: the same
    /// message id in each copy, each copy numbered in its pairwise conversation.
    pub(crate) fn send_group(
        &mut self,
        id: GroupId,
        text: &str,
        now: u64,
    ) -> Result<GroupSent, EngineError> {
        if text.trim().is_empty() {
            return Err(EngineError::Invalid("the message is empty".into()));
        }
        self.post(id, Posting::Text(text.to_owned()), WriteSet::default(), now)
    }

    /// Seals a message carrying `file` to the members `to` of group `id` (those whose
    /// relays took its chunks, and who are still members we reach), as
    /// [`Self::send_group`] does a text, in one write with `with` (the record saying
    /// it went).
    pub(crate) fn send_group_file(
        &mut self,
        id: GroupId,
        file: FileRef,
        to: Vec<PeerId>,
        put_in: Option<GroupFilePlace>,
        with: WriteSet,
        now: u64,
    ) -> Result<GroupSent, EngineError> {
        // Its chunks are in one epoch's group queues on the group's relays: posted under
        // that epoch while those are the relays, or not at all (members fetch from the
        // queues of the epoch a post names, on the relays they know).
        let route = self.group_file_route(id)?;
        let fits = match (&route, put_in) {
            (GroupFileRoute::Members(_), None) => true,
            (GroupFileRoute::Relays { epoch, queues, .. }, Some((put_epoch, put_relays))) => {
                *epoch == put_epoch && queues.iter().map(|(a, _)| a).eq(put_relays.iter())
            }
            _ => false,
        };
        if !fits {
            return Err(EngineError::Changed(
                "the group's key or relays changed during the upload; its chunks go again".into(),
            ));
        }
        self.post_to(id, Posting::File(Box::new(file)), Some(&to), with, now)
    }

    /// Where a file for group `id` goes now, and whether we may post there.
    pub(crate) fn group_file_route(&mut self, id: GroupId) -> Result<GroupFileRoute, EngineError> {
        let (record, _, roster) = self.where_we_post(id)?;
        if !roster.relays.is_empty() {
            return self.large_file_route(&record, &roster);
        }
        let me = self.own_key();
        let mut out = Vec::new();
        for (key, m) in &roster.members {
            if *key != me
                && let Some(c) = self.reachable(&m.identity.peer_id())?
            {
                out.push(c);
            }
        }
        Ok(GroupFileRoute::Members(out))
    }

    /// Seals `posting` to every member of group `id` we can reach, in one write (with
    /// `with`): the same message id in each copy, each copy numbered in its pairwise
    /// conversation.
    fn post(
        &mut self,
        id: GroupId,
        posting: Posting,
        with: WriteSet,
        now: u64,
    ) -> Result<GroupSent, EngineError> {
        self.post_to(id, posting, None, with, now)
    }

    /// Group `id` where we may post: its record, our digest of its log, and its
    /// members; why not, if we may not.
    fn where_we_post(&self, id: GroupId) -> Result<(GroupRecord, [u8; 16], Roster), EngineError> {
        let record = self.store.group(&id)?.ok_or_else(no_group)?;
        let merged = self.merged(id, &record)?;
        let roster = merged.roster.ok_or_else(no_group)?;
        let me = self.own_key();
        if !roster.may_post(&me) {
            return Err(EngineError::Invalid(match roster.role(&me) {
                None => "you are not a member of this group".into(),
                Some(_) => "only admins post in this announcement channel".into(),
            }));
        }
        Ok((record, merged.have, roster))
    }

    /// [`Self::post`], to the members among `only` if given (a member left out is
    /// counted unreachable).
    fn post_to(
        &mut self,
        id: GroupId,
        posting: Posting,
        only: Option<&[PeerId]>,
        with: WriteSet,
        now: u64,
    ) -> Result<GroupSent, EngineError> {
        let (mut record, have, roster) = self.where_we_post(id)?;
        if !roster.relays.is_empty() {
            return self.post_large(id, record, roster, posting, with, now);
        }
        let me = self.own_key();
        let cap = Hlc {
            ms: now.saturating_add(MAX_AHEAD_MS),
            count: 0,
        };
        let hlc = record.hlc().max(roster.latest.min(cap)).tick(now);
        record.set_hlc(hlc);
        let message_id = MessageId(rand::random());
        let local = record.next_local;
        record.next_local += 1;
        let (text, file) = match &posting {
            Posting::Text(text) => (text.as_str(), None),
            Posting::File(file) => ("", Some(FileNote::of(file))),
        };
        let body = Body::Group {
            group: id,
            what: match posting.clone() {
                Posting::Text(text) => GroupBody::Message {
                    hlc,
                    have,
                    secs: roster.timer_secs,
                    text,
                },
                Posting::File(file) => GroupBody::File {
                    hlc,
                    have,
                    secs: roster.timer_secs,
                    file,
                },
            },
        };
        Content {
            id: message_id,
            seq: 1,
            prev: [0; 32],
            sent_at_ms: now,
            body: body.clone(),
        }
        .check()
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
        let own_name = roster.members[&me].name.clone();
        let timer_secs = crate::store::kept_timer(roster.timer_secs);
        if timer_secs != 0 {
            let ends = now.saturating_add(u64::from(timer_secs) * 1000);
            record.next_expiry_ms = match record.next_expiry_ms {
                0 => ends,
                at => at.min(ends),
            };
            self.note_expiry_due(ends);
        }
        self.with_sessions(|this, sessions| {
            let mut w = with;
            let mut copies = Vec::new();
            let mut unreachable = Vec::new();
            let mut missed = Vec::new();
            for (key, m) in &roster.members {
                if *key == me {
                    continue;
                }
                let peer = m.identity.peer_id();
                let chosen = only.is_none_or(|only| only.contains(&peer));
                let Some(contact) = this.reachable(&peer)?.filter(|_| chosen) else {
                    unreachable.push(m.name.clone());
                    // No card of theirs yet (not blocked, not left out of a file): it
                    // goes to them once they are met.
                    if chosen && file.is_none() && this.store.contact(&peer)?.is_none() {
                        missed.push(peer.to_bytes());
                    }
                    continue;
                };
                let mut conv = this.store.conversation(&peer)?;
                let body = body.clone();
                this.seal_numbered(&mut w, sessions, &contact, &mut conv, message_id, body, now)?;
                LocalStore::write_conversation(&mut w, &peer, &conv);
                LocalStore::write_group_copy(&mut w, &peer, &message_id.0, &id, local);
                copies.push((peer.to_bytes(), MessageState::Queued));
            }
            // Our other devices show it too (a copy naming a member, reached or not).
            if let Some(first) = roster
                .members
                .iter()
                .find(|(k, _)| **k != me)
                .map(|(_, m)| m.identity.peer_id())
            {
                let sealed = Content {
                    id: message_id,
                    seq: 0,
                    prev: [0; 32],
                    sent_at_ms: now,
                    body: body.clone(),
                };
                this.copy_to_own(&mut w, sessions, &first, &sealed, now)?;
            }
            let mut ours = new_record(message_id, Direction::Out, text, now, now, timer_secs);
            ours.file = file;
            let message = GroupMessage {
                from: Vec::new(),
                name: own_name,
                hlc: (hlc.ms, hlc.count),
                message: ours,
                copies,
                event: false,
                unseen: false,
                missed,
                post_seq: 0,
                post_device: [0; 8],
                reach: (0, 0, 0),
            };
            LocalStore::write_group_message(&mut w, &id, local, &message);
            LocalStore::write_group(&mut w, &id, &record);
            this.apply_or_reset(sessions, w)?;
            Ok(GroupSent {
                id: message_id,
                copies: message.copies.len(),
                unreachable,
            })
        })
    }

    /// Seals `body` as message `id` for `contact`, numbered next in our conversation
    /// `conv` with them (which it advances; the caller writes it), kept in the outbox
    /// until confirmed.
    #[allow(clippy::too_many_arguments)]
    fn seal_numbered(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        contact: &Contact,
        conv: &mut crate::store::Conversation,
        id: MessageId,
        body: Body,
        now: u64,
    ) -> Result<(), EngineError> {
        let content = Content {
            id,
            seq: conv.next_seq.max(1),
            prev: conv.last_hash,
            sent_at_ms: now,
            body,
        };
        let session = sessions.get(&self.store, contact)?;
        self.seal_into(w, contact, session, &content, OutboxKind::Message, now)?;
        conv.next_seq = content.seq + 1;
        conv.last_hash = content.hash();
        Ok(())
    }

    /// A member's copy of our group message advanced (a relay has it, a receipt came):
    /// false if `id` is no group message of ours that went to `peer`.
    pub(crate) fn advance_group_copy(
        &self,
        w: &mut WriteSet,
        peer: &PeerId,
        id: &MessageId,
        state: MessageState,
    ) -> Result<bool, EngineError> {
        let Some((key, mut m)) = self.store.group_copy(peer, &id.0)? else {
            return Ok(false);
        };
        let who = peer.to_bytes();
        let Some(copy) = m.copies.iter_mut().find(|(p, _)| *p == who) else {
            return Ok(false);
        };
        if !copy.1.advances_to(&state) {
            return Ok(false);
        }
        copy.1 = state;
        // The message as a whole: delivered once every copy is, read once every one is.
        let all = |f: fn(&MessageState) -> bool| m.copies.iter().all(|(_, s)| f(s));
        if all(|s| *s == MessageState::Read) {
            m.message.state = MessageState::Read;
        } else if all(|s| matches!(s, MessageState::Delivered | MessageState::Read)) {
            m.message.state = MessageState::Delivered;
        }
        LocalStore::rewrite_group_message(w, key, &m);
        Ok(true)
    }

    /// Takes in a group record (content kind 11) from `contact`.
    pub(super) fn apply_group(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        contact: &Contact,
        device: &super::state::Device,
        content: &Content,
        now: u64,
    ) -> Result<Outcome, EngineError> {
        let Body::Group { group, what } = &content.body else {
            return refused_ops("not a group record");
        };
        let ours = match self.store.group(group)? {
            Some(g) if g.joined && !g.forgotten => self
                .merged(*group, &g)?
                .roster
                .is_some_and(|r| r.members.contains_key(&self.own_key())),
            _ => false,
        };
        if contact.through_group && !ours {
            // Someone we only know from a group cannot bring us into another one.
            LocalStore::write_receipt_due(w, &contact.peer, &content.id);
            return refused_ops("a record of another group from a member who is not a contact");
        }
        let outcome = match what {
            GroupBody::Ops { ops, .. } => {
                // Confirmed whatever becomes of them: handled, so not sent again.
                LocalStore::write_receipt_due(w, &contact.peer, &content.id);
                self.take_ops(w, sessions, contact, *group, ops.clone(), now)?
            }
            GroupBody::Message {
                hlc, secs, text, ..
            } => self.take_group_message(
                w,
                (contact, device),
                content,
                *group,
                *hlc,
                *secs,
                Posting::Text(text.clone()),
                now,
            )?,
            GroupBody::File {
                hlc, secs, file, ..
            } => self.take_group_message(
                w,
                (contact, device),
                content,
                *group,
                *hlc,
                *secs,
                Posting::File(file.clone()),
                now,
            )?,
            GroupBody::Cards { cards } => {
                // Confirmed whatever becomes of them, as operations are.
                LocalStore::write_receipt_due(w, &contact.peer, &content.id);
                self.take_cards(w, contact, *group, cards, now)?
            }
            GroupBody::Key { record } => {
                // Confirmed whatever becomes of it, as operations are.
                LocalStore::write_receipt_due(w, &contact.peer, &content.id);
                let sender = (*contact.card.identity().ed25519(), contact.peer);
                self.take_sealed_key(w, sender, *group, record, now)?;
                Outcome::Applied("a group's key")
            }
        };
        // A member who holds other operations than we do (their digest says so) gets
        // all of ours: they merge, and send theirs if we lack some. Once per pair of
        // digests, so two members never answer each other for ever.
        let (theirs, compare) = match what {
            GroupBody::Ops { all, have, .. } => (*have, *all),
            GroupBody::Message { have, .. } | GroupBody::File { have, .. } => (*have, true),
            GroupBody::Cards { .. } | GroupBody::Key { .. } => ([0; 16], false),
        };
        if compare {
            self.answer_digest(w, sessions, contact, *group, theirs, now)?;
        }
        Ok(outcome)
    }

    /// Sends `contact` every operation of group `id` we hold if their digest `theirs`
    /// differs from ours and we have not answered that pair of digests yet.
    fn answer_digest(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        contact: &Contact,
        id: GroupId,
        theirs: [u8; 16],
        now: u64,
    ) -> Result<(), EngineError> {
        // What this envelope's handling wrote so far is in `w`, not yet in the store:
        // the record as it will be.
        let Some(mut record) = LocalStore::pending_group(w, &id).or(self.store.group(&id)?) else {
            return Ok(());
        };
        let merged = self.merged(id, &record)?;
        let Some(roster) = merged.roster else {
            return Ok(());
        };
        let sender = *contact.card.identity().ed25519();
        let me = self.own_key();
        let ours = merged.have;
        if ours == theirs
            || !roster.members.contains_key(&sender)
            || !roster.members.contains_key(&me)
        {
            return Ok(());
        }
        let ops = record.signed_ops()?;
        let who = contact.peer.to_bytes();
        // At most once a while for each member, whatever digests they and we send (a
        // member whose digest changes with every record does not get our whole log each
        // time), and never while the last one is still unconfirmed.
        if record
            .answered
            .iter()
            .any(|(p, _, at)| *p == who && now.saturating_sub(*at) < ANSWER_EVERY_MS)
            || self.whole_log_waiting(&contact.peer, id)?
        {
            return Ok(());
        }
        let _ = theirs;
        record.answered.retain(|(p, _, _)| *p != who);
        record.answered.push((who, ours, now));
        LocalStore::write_group(w, &id, &record);
        tracing::info!(group = %id.to_hex(), member = %contact.peer, "a member holds other group operations; sending ours");
        self.share_ops(w, sessions, contact, id, &ops, Some(&roster), ours, now)
    }

    /// Whether our whole log of group `id` waits in the outbox for `peer` (not confirmed).
    fn whole_log_waiting(&self, peer: &PeerId, id: GroupId) -> Result<bool, EngineError> {
        for key in self.store.outbox_keys_of(peer) {
            let Some(entry) = self.store.outbox_entry(key)? else {
                continue;
            };
            if let Ok(content) = Content::decode(&entry.content)
                && let Body::Group {
                    group,
                    what: GroupBody::Ops { all: true, .. },
                } = content.body
                && group == id
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Operations from a member: merged into the log when they come from someone the
    /// group knows (a member, a former member, or the admin adding us); new ones are
    /// passed on to the members we added (who may have missed what others did at the
    /// same time); messages waiting for them are shown.
    fn take_ops(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        contact: &Contact,
        id: GroupId,
        ops: Vec<SignedOp>,
        now: u64,
    ) -> Result<Outcome, EngineError> {
        let sender = (*contact.card.identity().ed25519(), contact.peer);
        self.take_ops_from(w, sessions, sender, id, ops, now)
    }

    /// [`Self::take_ops`] from `sender` (their identity key and peer id): a contact, or
    /// a member whose post in a large group's queue carried them.
    pub(super) fn take_ops_from(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        (sender, sender_peer): ([u8; 32], PeerId),
        id: GroupId,
        ops: Vec<SignedOp>,
        now: u64,
    ) -> Result<Outcome, EngineError> {
        let me = self.own_key();
        let existing = match LocalStore::pending_group(w, &id) {
            Some(g) => Some(g),
            None => self.store.group(&id)?,
        };
        // (A log another device of ours signed is ours: not counted as a contact's.)
        let from_us = sender == me;
        if existing.is_none() && !from_us && !self.may_hold_another(w, &sender_peer, now)? {
            return refused_ops("too many groups from this contact wait to be complete");
        }
        let mut record = existing.unwrap_or_else(|| GroupRecord {
            joined_ms: now,
            invited_by: if from_us {
                Vec::new()
            } else {
                sender_peer.to_bytes()
            },
            ..GroupRecord::default()
        });
        let held = record.signed_ops()?;
        let known: std::collections::BTreeSet<[u8; 32]> = held.iter().map(|o| o.hash()).collect();
        // Bounds that depend on each operation alone (not on what came first), so every
        // member keeps the same ones: numbers up to MAX_OPS_PER_AUTHOR, dates at most a
        // day ahead (what is dated further is not taken now; a member's whole log brings
        // it again later), and two operations at most for one author and number (two
        // already break that author's chain).
        let limit = now.saturating_add(FAR_AHEAD_MS);
        let mut taken: BTreeMap<([u8; 32], u64), usize> = BTreeMap::new();
        for op in &held {
            *taken.entry((*op.author(), op.seq())).or_default() += 1;
        }
        let mut new: Vec<SignedOp> = Vec::new();
        for op in ops {
            if known.contains(&op.hash())
                || op.seq() > MAX_OPS_PER_AUTHOR as u64
                || op.hlc().ms > limit
                || new.iter().any(|o: &SignedOp| o.hash() == op.hash())
            {
                continue;
            }
            let n = taken.entry((*op.author(), op.seq())).or_default();
            if *n >= 2 {
                continue;
            }
            *n += 1;
            new.push(op);
        }
        // Only operations of people the group has (had) as members, once we are in it:
        // keys nobody added cannot fill the log. While the log is still coming in (we
        // are not in it yet), nothing can be told apart: kept within the log's bound,
        // and sorted out when we join.
        if record.joined
            && let Ok(merged) = Roster::merge(id, held.iter().chain(new.iter()))
        {
            new.retain(|o| {
                merged.members.contains_key(o.author()) || merged.former.contains(o.author())
            });
        }
        new.truncate(MAX_LOG_OPS.saturating_sub(held.len()));
        if new.is_empty() {
            return Ok(Outcome::Applied("no group operations new to us"));
        }
        let mut all: Vec<SignedOp> = held.iter().chain(new.iter()).cloned().collect();
        let after = match Roster::merge(id, &all) {
            Ok(after) if record.joined || after.members.contains_key(&me) => after,
            _ if !record.joined => {
                // Not complete yet (a whole log comes in several records, in any order):
                // kept, within bounds, until the creation and our add are here.
                record.ops.extend(new.iter().map(|o| o.encode().to_vec()));
                LocalStore::write_group(w, &id, &record);
                return Ok(Outcome::Applied("part of a group's log"));
            }
            _ => return refused_ops("operations without their group's creation"),
        };
        let before = if record.joined {
            self.merged(id, &record)?.roster
        } else {
            None
        };
        let sender_known =
            |r: &Roster| r.members.contains_key(&sender) || r.former.contains(&sender);
        if !sender_known(&after) && !before.as_ref().is_some_and(sender_known) {
            return refused_ops("group operations from someone outside the group");
        }
        let after = if record.joined {
            record.ops.extend(new.iter().map(|o| o.encode().to_vec()));
            after
        } else {
            // Joining: what came while the log was incomplete is sorted out now.
            all.retain(|o| {
                after.members.contains_key(o.author()) || after.former.contains(o.author())
            });
            record.ops = all.iter().map(|o| o.encode().to_vec()).collect();
            record.joined = true;
            record.forgotten = false;
            // Whatever a peer sent, it is refused here, never an error that would stop
            // the other envelopes of the batch.
            match Roster::merge(id, &all) {
                Ok(after) => after,
                Err(_) => return refused_ops("a group's log that does not merge"),
            }
        };
        if before
            .as_ref()
            .is_some_and(|b| b.members.keys().any(|k| !after.members.contains_key(k)))
        {
            self.members_left
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let latest = new.iter().map(SignedOp::hlc).max().unwrap_or_default();
        record.set_hlc(record.hlc().observe(latest, now, MAX_AHEAD_MS));
        // What changed, as lines in the group's history, said before the messages that
        // waited for it.
        let mut shown = Vec::new();
        for (hlc, author, text) in self.events(before.as_ref(), &after, &new)? {
            let local = record.next_local;
            record.next_local += 1;
            let m = event_message(author.map(|p| p.to_bytes()), hlc, text, now);
            LocalStore::write_group_message(w, &id, local, &m);
            shown.push(self.shown(author.unwrap_or(sender_peer), &after, m));
        }
        // Messages that waited for these operations.
        let mut waiting = std::mem::take(&mut record.waiting);
        let before_expiry = waiting.len();
        waiting.retain(|m| now.saturating_sub(m.message.message.stored_at_ms) < MAX_WAIT_MS);
        record.dropped += (before_expiry - waiting.len()) as u64;
        for waited in waiting {
            let from = PeerId::from_bytes(&waited.from).ok();
            match from {
                Some(peer) if after.may_post(&waited.key) => {
                    let mut m = waited.message;
                    m.name = after.members[&waited.key].name.clone();
                    self.note_group_expiry(&mut record, &m);
                    let local = record.next_local;
                    record.next_local += 1;
                    LocalStore::write_group_message(w, &id, local, &m);
                    self.offer_group_file(w, id, local, &m, waited.source, now)?;
                    shown.push(self.shown(peer, &after, m));
                }
                // Not (yet) allowed: a re-add or promotion may still be on its way. It
                // waits on, until it expires.
                _ => record.waiting.push(waited),
            }
        }
        // Removed: what we sent after the removal (not knowing) may not have been shown.
        if before.as_ref().is_some_and(|b| b.members.contains_key(&me))
            && !after.members.contains_key(&me)
        {
            let removed_at = all
                .iter()
                .filter(|o| matches!(o.op(), Op::Remove { member, .. } if *member == me))
                .map(SignedOp::hlc)
                .max()
                .unwrap_or_default();
            for (key, mut m) in self.store.group_messages_keyed(&id)? {
                if m.from.is_empty() && !m.event && m.hlc > (removed_at.ms, removed_at.count) {
                    m.unseen = true;
                    LocalStore::rewrite_group_message(w, key, &m);
                }
            }
        }
        // Members whose cards came before the operations adding them are met now.
        self.introduce(w, &mut record, &after, now)?;
        if !after.relays.is_empty() {
            // The large tier: key records that came before we were in are taken, and an
            // admin makes an epoch without those who left and with those added.
            // A new epoch, if one is needed, is made at upkeep, once for the batch.
            self.take_pending_keys(w, id, &mut record, &after, now)?;
        }
        if before.as_ref().map(|b| &b.relays) != Some(&after.relays) || !after.relays.is_empty() {
            self.group_queues_changed
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        LocalStore::write_group(w, &id, &record);
        // Pass new operations on to the members we added, except their authors and the
        // sender: they may have missed what others did at the same time.
        let ours: Vec<[u8; 32]> = all
            .iter()
            .filter(|o| o.author() == &me)
            .filter_map(|o| match o.op() {
                Op::Add { member, .. } => Some(*member.ed25519()),
                _ => None,
            })
            .collect();
        for key in ours {
            // (Our other device that made them shared them.)
            if key == sender || sender == me || new.iter().all(|o| o.author() == &key) {
                continue;
            }
            let Some(m) = after.members.get(&key) else {
                continue;
            };
            let passed: Vec<SignedOp> =
                new.iter().filter(|o| o.author() != &key).cloned().collect();
            if let Some(c) = self.reachable(&m.identity.peer_id())? {
                self.share_ops(w, sessions, &c, id, &passed, None, have_digest(&all), now)?;
            }
        }
        tracing::info!(group = %id.to_hex(), ops = new.len(), "group operations merged");
        Ok(match shown.len() {
            0 => Outcome::Applied("group operations"),
            _ => Outcome::ShownSeveral(shown),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn take_group_message(
        &self,
        w: &mut WriteSet,
        (contact, device): (&Contact, &super::state::Device),
        content: &Content,
        id: GroupId,
        hlc: Hlc,
        secs: u32,
        posting: Posting,
        now: u64,
    ) -> Result<Outcome, EngineError> {
        let peer = contact.peer;
        let (text, file, size) = match posting {
            Posting::Text(text) => {
                let size = text.len();
                (text, None, size)
            }
            Posting::File(file) => (
                String::new(),
                Some(FileNote::of(&file)),
                file.encode().len(),
            ),
        };
        if content.seq == 0 {
            // A group message takes a number in the pairwise conversation: without one it
            // could not be told from its copies.
            return refused_ops("a group message without its number");
        }
        if self.is_copy(&peer, device, content)? {
            LocalStore::write_receipt_due(w, &peer, &content.id);
            return Ok(Outcome::Applied("a copy of a group message"));
        }
        // Its number in the pairwise conversation is taken whatever becomes of it, so it
        // never looks like a missing message.
        if self
            .take_numbered(w, &peer, device, content, size as u64)?
            .is_none()
        {
            return refused_ops("over the storage limit for one contact");
        }
        LocalStore::write_receipt_due(w, &peer, &content.id);
        let timer_secs = crate::store::kept_timer(secs);
        // A clock far ahead would pin the message below every later one: it counts as
        // at most now plus the allowed skew.
        let hlc = hlc.min(Hlc {
            ms: now.saturating_add(MAX_AHEAD_MS),
            count: 0,
        });
        let mut message = GroupMessage {
            from: peer.to_bytes(),
            name: contact.card.name().to_owned(),
            hlc: (hlc.ms, hlc.count),
            message: new_record(
                content.id,
                Direction::In,
                &text,
                content.sent_at_ms,
                now,
                timer_secs,
            ),
            copies: Vec::new(),
            event: false,
            unseen: false,
            missed: Vec::new(),
            post_seq: 0,
            post_device: [0; 8],
            reach: (0, 0, 0),
        };
        message.message.seq = content.seq;
        message.message.prev = content.prev;
        message.message.file = file;
        let record = self.store.group(&id)?;
        let roster = match &record {
            Some(r) if r.joined => self.merged(id, r)?.roster,
            _ => None,
        };
        let sender = *contact.card.identity().ed25519();
        match (record, roster) {
            (Some(mut record), Some(roster)) if roster.may_post(&sender) => {
                message.name = roster.members[&sender].name.clone();
                self.note_group_expiry(&mut record, &message);
                record.set_hlc(record.hlc().observe(hlc, now, MAX_AHEAD_MS));
                let local = record.next_local;
                record.next_local += 1;
                LocalStore::write_group_message(w, &id, local, &message);
                self.offer_group_file(w, id, local, &message, None, now)?;
                LocalStore::write_group(w, &id, &record);
                Ok(Outcome::Shown(Box::new(self.shown(peer, &roster, message))))
            }
            (Some(_), Some(roster)) if !roster.members.contains_key(&self.own_key()) => {
                // A group we left, or were removed from.
                refused_ops("a group message for a group we are not in")
            }
            (record, _) => {
                // Its operations have not come yet (they travel on their own, perhaps
                // over another relay): it waits, within bounds.
                // Its author may also be a member whose re-add or promotion is not here
                // yet: it waits as well, and is dropped (counted) if the operations that
                // come do not let them post.
                let mut record = match record {
                    Some(r) => r,
                    None => {
                        if !self.may_hold_another(w, &peer, now)? {
                            return refused_ops("too many unknown groups from this contact");
                        }
                        GroupRecord {
                            joined_ms: now,
                            invited_by: peer.to_bytes(),
                            ..GroupRecord::default()
                        }
                    }
                };
                let held = hold_waiting(&mut record, peer, sender, message, None, now);
                LocalStore::write_group(w, &id, &record);
                if !held {
                    return refused_ops("too many group messages waiting for their group");
                }
                Ok(Outcome::Applied("a group message waiting for its group"))
            }
        }
    }

    /// The file a group message shown from a member carries is offered for fetching
    /// (at once, for a photo within the auto-download rule, counted against the group
    /// and its sender), its message noted where it is (`local`).
    fn offer_group_file(
        &self,
        w: &mut WriteSet,
        id: GroupId,
        local: u64,
        message: &GroupMessage,
        source: Option<crate::store::GroupSource>,
        now: u64,
    ) -> Result<(), EngineError> {
        let Some(file) = message.message.file.as_ref().and_then(|f| f.file()) else {
            return Ok(());
        };
        // A member's message: its author is known (ours are not offered).
        let Some(from) = message.author() else {
            return Ok(());
        };
        LocalStore::write_group_message_index(w, &id, &from, &message.message.id, local);
        let key = crate::store::group_member_key(&id, &from);
        Ok(self
            .store
            .offer_incoming_file(w, &file, key, message.message.id, now, source)?)
    }

    /// How a member is named in event lines: "you", the name we gave a contact, else
    /// their name in the group.
    fn call(&self, key: &[u8; 32], rosters: &[&Roster]) -> Result<String, EngineError> {
        if *key == self.own_key() {
            return Ok("you".into());
        }
        let member = rosters.iter().find_map(|r| r.members.get(key));
        let Some(member) = member else {
            return Ok("someone".into());
        };
        Ok(
            match self.store.added_contact(&member.identity.peer_id())? {
                Some(c) => c.name,
                // An admin names people we do not know: said so, so no one passes for a contact.
                None => format!("{} (not a contact)", member.name),
            },
        )
    }

    /// What `new` operations changed from `before` to `after`, as lines for the group's
    /// history: (clock, author, text), each naming who did it.
    fn events(
        &self,
        before: Option<&Roster>,
        after: &Roster,
        new: &[SignedOp],
    ) -> Result<Vec<(Hlc, Option<PeerId>, String)>, EngineError> {
        let me = self.own_key();
        let empty;
        let before = match before {
            Some(b) => b,
            None => {
                empty = Roster {
                    members: Default::default(),
                    former: Default::default(),
                    ..after.clone()
                };
                &empty
            }
        };
        let rosters = [after, before];
        let mut out = Vec::new();
        let author_of = |pred: &dyn Fn(&Op) -> bool| -> Option<&SignedOp> {
            new.iter().rev().find(|o| pred(o.op()))
        };
        let peer_of = |key: &[u8; 32]| {
            rosters
                .iter()
                .find_map(|r| r.members.get(key))
                .map(|m| m.identity.peer_id())
        };
        let mut push = |op: Option<&SignedOp>, text: String| {
            let (hlc, author) = match op {
                Some(o) => (o.hlc(), peer_of(o.author())),
                None => (after.latest, None),
            };
            out.push((hlc, author, text));
        };
        if before.members.is_empty() && after.members.contains_key(&me) {
            let by =
                author_of(&|op| matches!(op, Op::Add { member, .. } if *member.ed25519() == me));
            let who = match by {
                Some(o) => self.call(o.author(), &rosters)?,
                None => "someone".into(),
            };
            let mut others: Vec<String> = after
                .members
                .keys()
                .filter(|k| **k != me)
                .map(|k| self.call(k, &rosters))
                .collect::<Result<_, _>>()?;
            others.sort_by_key(|n| n.to_lowercase());
            let made_by_us = by.is_none()
                && author_of(&|op| matches!(op, Op::Create { .. }))
                    .is_some_and(|o| o.author() == &me);
            let text = if made_by_us {
                // Made on another device of ours: its log came from there.
                format!(
                    "you made {} on another device; members: you, {}",
                    after.name,
                    others.join(", ")
                )
            } else {
                format!(
                    "{who} added you to {}; members: you, {}",
                    after.name,
                    others.join(", ")
                )
            };
            push(by, text);
            return Ok(out);
        }
        // Who each admin added, said in one line per admin.
        let mut added: Vec<(String, Option<&SignedOp>, Vec<String>)> = Vec::new();
        for (key, m) in &after.members {
            if !before.members.contains_key(key) {
                let op = author_of(
                    &|op| matches!(op, Op::Add { member, .. } if member.ed25519() == key),
                );
                let by = op.map_or(Ok("someone".into()), |o| self.call(o.author(), &rosters))?;
                let who = self.call(key, &rosters)?;
                match added.iter_mut().find(|(b, _, _)| *b == by) {
                    Some((_, last, names)) => {
                        names.push(who);
                        if op.map(SignedOp::hlc) > last.map(SignedOp::hlc) {
                            *last = op;
                        }
                    }
                    None => added.push((by, op, vec![who])),
                }
            } else if before.members[key].role != m.role {
                let op = author_of(&|op| matches!(op, Op::SetRole { member, .. } if member == key));
                let by = op.map_or(Ok("someone".into()), |o| self.call(o.author(), &rosters))?;
                let who = self.call(key, &rosters)?;
                push(
                    op,
                    match m.role {
                        Role::Admin => format!("{by} made {who} an admin"),
                        Role::Member => format!("{by} made {who} a member (no longer an admin)"),
                    },
                );
            }
        }
        for (by, op, mut names) in added {
            names.sort_by_key(|n| n.to_lowercase());
            push(op, format!("{by} added {}", said_in_short(&names)));
        }
        for key in before.members.keys() {
            if after.members.contains_key(key) {
                continue;
            }
            let op = author_of(&|op| matches!(op, Op::Remove { member, .. } if member == key));
            let who = self.call(key, &rosters)?;
            let text = match op {
                Some(o) if o.author() == key => format!("{who} left"),
                Some(o) => format!("{} removed {who}", self.call(o.author(), &rosters)?),
                None => format!("{who} is no longer a member"),
            };
            push(op, text);
        }
        if before.name != after.name && !before.name.is_empty() {
            let op = author_of(&|op| matches!(op, Op::Rename { .. }));
            let by = op.map_or(Ok("someone".into()), |o| self.call(o.author(), &rosters))?;
            push(op, format!("{by} renamed the group to {}", after.name));
        }
        if before.timer_secs != after.timer_secs && !before.members.is_empty() {
            let op = author_of(&|op| matches!(op, Op::SetTimer { .. }));
            let by = op.map_or(Ok("someone".into()), |o| self.call(o.author(), &rosters))?;
            push(
                op,
                match after.timer_secs {
                    0 => format!("{by} turned disappearing messages off"),
                    secs => format!(
                        "{by} set messages to disappear {} after they arrive",
                        crate::commands::describe_duration(secs)
                    ),
                },
            );
        }
        if before.mode != after.mode {
            let op = author_of(&|op| matches!(op, Op::SetMode { .. }));
            let by = op.map_or(Ok("someone".into()), |o| self.call(o.author(), &rosters))?;
            push(
                op,
                match after.mode {
                    Mode::Announcement => {
                        format!("{by} made this an announcement channel: only admins post")
                    }
                    Mode::Chat => format!("{by} let every member post"),
                },
            );
        }
        Ok(out)
    }

    /// Notes when `m` (under a timer) is due to go, in its group's record and for the
    /// engine's next expiry pass.
    fn note_group_expiry(&self, record: &mut GroupRecord, m: &GroupMessage) {
        let ends = m.message.expires_at();
        if ends == 0 {
            return;
        }
        record.next_expiry_ms = match record.next_expiry_ms {
            0 => ends,
            at => at.min(ends),
        };
        self.note_expiry_due(ends);
    }

    /// Deletes the group messages whose timer ran out by `now`; returns how many, and
    /// when the next is due (0: none).
    pub(crate) fn expire_group_messages(&self, now: u64) -> Result<(usize, u64), EngineError> {
        let (mut gone, mut next) = (0, 0u64);
        for (id, mut record) in self.store.groups()? {
            if record.next_expiry_ms == 0 {
                continue;
            }
            if record.next_expiry_ms <= now {
                let mut w = WriteSet::default();
                let (n, later) = self.store.delete_expired_group(&mut w, &id, now)?;
                record.next_expiry_ms = later;
                LocalStore::write_group(&mut w, &id, &record);
                self.store.apply(w)?;
                gone += n;
            }
            let at = record.next_expiry_ms;
            if at != 0 {
                next = if next == 0 { at } else { next.min(at) };
            }
        }
        Ok((gone, next))
    }

    /// A copy of a post of ours to small group `id` (`content`, as sealed to its
    /// members) that another device of ours made (SPEC §15.2): shown here as ours,
    /// once, if this device is in the group.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn take_own_post(
        &self,
        w: &mut WriteSet,
        id: GroupId,
        content: &Content,
        hlc: Hlc,
        secs: u32,
        posting: Posting,
        now: u64,
    ) -> Result<Outcome, EngineError> {
        let me = self.me.peer_id();
        if self
            .store
            .own_group_post(&id, &me, &content.id.0)?
            .is_some()
        {
            return Ok(Outcome::Applied("a copy of a post of ours already here"));
        }
        let Some(mut record) = self.store.group(&id)?.filter(|r| r.joined && !r.forgotten) else {
            return Ok(Outcome::Dropped(
                "a copy of a post of ours to a group this device is not in".into(),
            ));
        };
        let Some(roster) = self.merged(id, &record)?.roster else {
            return Ok(Outcome::Dropped(
                "a copy of a post of ours to a group this device is not in".into(),
            ));
        };
        let Some(member) = roster.members.get(&self.own_key()) else {
            return Ok(Outcome::Dropped(
                "a copy of a post of ours to a group we are not in".into(),
            ));
        };
        let (text, file) = match posting {
            Posting::Text(text) => (text, None),
            // Its chunks went to the members: shown, not fetched.
            Posting::File(file) => (String::new(), Some(FileNote::of(&file))),
        };
        let posted = OwnPost {
            id: content.id,
            text,
            file,
            sent_at_ms: content.sent_at_ms,
            hlc,
            secs,
            chain: (0, [0; 8]),
        };
        let (local, message) = self.take_own_group_post(&mut record, &member.name, posted, now);
        LocalStore::write_group_message(w, &id, local, &message);
        LocalStore::write_group_message_index(w, &id, &me, &content.id.0, local);
        LocalStore::write_group(w, &id, &record);
        Ok(Outcome::Shown(Box::new(self.shown_own(&roster, message))))
    }

    /// A post of ours that another device of ours made (`posted`), as this device keeps
    /// it in `record`: ours, sent from there, under our name `name` in the group; its
    /// timer and clock noted, with the local number it takes.
    pub(super) fn take_own_group_post(
        &self,
        record: &mut GroupRecord,
        name: &str,
        posted: OwnPost,
        now: u64,
    ) -> (u64, GroupMessage) {
        let hlc = posted.hlc.min(Hlc {
            ms: now.saturating_add(MAX_AHEAD_MS),
            count: 0,
        });
        let mut ours = new_record(
            posted.id,
            Direction::Out,
            &posted.text,
            posted.sent_at_ms,
            now,
            crate::store::kept_timer(posted.secs),
        );
        ours.file = posted.file;
        ours.state = MessageState::SentElsewhere;
        let message = GroupMessage {
            from: Vec::new(),
            name: name.to_owned(),
            hlc: (hlc.ms, hlc.count),
            message: ours,
            copies: Vec::new(),
            event: false,
            unseen: false,
            missed: Vec::new(),
            post_seq: posted.chain.0,
            post_device: posted.chain.1,
            reach: (0, 0, 0),
        };
        self.note_group_expiry(record, &message);
        record.set_hlc(record.hlc().observe(hlc, now, MAX_AHEAD_MS));
        let local = record.next_local;
        record.next_local += 1;
        (local, message)
    }

    /// Our own `message` in the group of `roster`, to show.
    pub(super) fn shown_own(&self, roster: &Roster, message: GroupMessage) -> Received {
        Received {
            contact: self.me.peer_id(),
            name: message.name.clone(),
            message: message.message,
            gaps: Default::default(),
            change: None,
            group: Some(GroupTag {
                id: roster.id,
                name: roster.name.clone(),
                event: false,
            }),
        }
    }

    /// A group message to show, from `peer`: a contact by the name we gave them, a
    /// member we only know from the group by their own name marked with `~` (as
    /// messengers mark names nobody vouched for), so no one passes for a contact.
    fn shown(&self, peer: PeerId, roster: &Roster, message: GroupMessage) -> Received {
        let name = match self.store.added_contact(&peer) {
            Ok(Some(c)) => c.name,
            _ if message.event => message.name.clone(),
            _ => format!("~{}", message.name),
        };
        Received {
            contact: peer,
            name,
            message: message.message,
            gaps: self
                .store
                .conversation(&peer)
                .map(|c| c.gaps)
                .unwrap_or_default(),
            change: None,
            group: Some(GroupTag {
                id: roster.id,
                name: roster.name.clone(),
                event: message.event,
            }),
        }
    }
}

/// A post of ours another device of ours made, as it reached this one.
pub(super) struct OwnPost {
    pub(super) id: MessageId,
    pub(super) text: String,
    pub(super) file: Option<FileNote>,
    pub(super) sent_at_ms: u64,
    /// Its group clock.
    pub(super) hlc: Hlc,
    /// The group's timer it went with.
    pub(super) secs: u32,
    /// In a large group: its number and the device whose chain counts it (0s else).
    pub(super) chain: (u64, [u8; 8]),
}

/// Keeps `message` of `peer` (identity key `key`) in group `record` until operations
/// let its author post: what waited too long goes first (counted), and at most
/// [`MAX_WAITING_PER_GROUP`] wait, a quarter of them from one sender. False if it
/// could not wait (counted as dropped).
fn hold_waiting(
    record: &mut GroupRecord,
    peer: PeerId,
    key: [u8; 32],
    message: GroupMessage,
    source: Option<crate::store::GroupSource>,
    now: u64,
) -> bool {
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
        return false;
    }
    record.waiting.push(Waiting {
        from: peer.to_bytes(),
        key,
        message,
        source,
    });
    true
}

/// `names` as a line says them: all of up to five, else the first three and how many
/// more.
fn said_in_short(names: &[String]) -> String {
    const ALL_UP_TO: usize = 5;
    const SHOWN: usize = 3;
    if names.len() <= ALL_UP_TO {
        return names.join(", ");
    }
    format!(
        "{} and {} more",
        names[..SHOWN].join(", "),
        names.len() - SHOWN
    )
}

/// When an outbox entry was first queued (Unix ms).
fn first_queued(e: &crate::store::OutboxEntry) -> u64 {
    match e.queued_ms {
        0 => e.created_ms,
        t => t.min(e.created_ms),
    }
}

fn refused_ops(reason: &'static str) -> Result<Outcome, EngineError> {
    Ok(Outcome::Refused(reason.into()))
}

/// A line about a change to the group, as its history holds it.
fn event_message(from: Option<Vec<u8>>, hlc: Hlc, text: String, now: u64) -> GroupMessage {
    GroupMessage {
        from: from.unwrap_or_default(),
        name: String::new(),
        hlc: (hlc.ms, hlc.count),
        // Dated by the change's clock (at most now): the same on every member's device.
        message: new_record(
            MessageId(rand::random()),
            Direction::In,
            &text,
            hlc.ms.min(now),
            now,
            0,
        ),
        copies: Vec::new(),
        event: true,
        unseen: false,
        missed: Vec::new(),
        post_seq: 0,
        post_device: [0; 8],
        reach: (0, 0, 0),
    }
}

/// What a group message of ours or a member's carries.
#[derive(Debug, Clone)]
pub(crate) enum Posting {
    Text(String),
    File(Box<FileRef>),
}

/// A group's log up to this many operations goes whole to our other devices after each
/// change we sign; a longer one, only the new operations.
const WHOLE_LOG_TO_OWN_OPS: usize = 64;

/// `ops` cut into group records of at most [`OPS_RECORD_BYTES`] each (the last says
/// whether they are the `whole` log), with our digest `have`.
fn ops_records(ops: &[SignedOp], whole: bool, have: [u8; 16]) -> Vec<GroupBody> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < ops.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < ops.len()
            && (end == start || bytes + 2 + ops[end].encode().len() <= OPS_RECORD_BYTES)
        {
            bytes += 2 + ops[end].encode().len();
            end += 1;
        }
        out.push(GroupBody::Ops {
            all: whole && end == ops.len(),
            have,
            ops: ops[start..end].to_vec(),
        });
        start = end;
    }
    out
}

/// A message record as a group message holds it.
fn new_record(
    id: MessageId,
    direction: Direction,
    text: &str,
    sent_at_ms: u64,
    stored_at_ms: u64,
    timer_secs: u32,
) -> MessageRecord {
    MessageRecord {
        id: id.0,
        direction,
        text: text.to_owned(),
        state: match direction {
            Direction::Out => MessageState::Queued,
            Direction::In => MessageState::Received,
        },
        sent_at_ms,
        stored_at_ms,
        seq: 0,
        prev: [0; 32],
        timer_secs,
        edited: false,
        deleted: false,
        revised_seq: 0,
        reply_to: None,
        reactions: Default::default(),
        file: None,
    }
}
