//! The delivery engine's decisions, sans I/O: pure functions of state, input and `now`
//! (Unix ms). No store, no network, no clock, no tasks; the engine's owner task feeds
//! them what happened and does what they say, so every rule here is tested with a fake
//! clock.
//!
//! - [`Deliveries`]: the outbox's copies in flight. Which path of which entry is due
//!   ([`Deliveries::poll_attempts`]), what an answer does to an entry and its message's
//!   state ([`Deliveries::handle_result`]), relays coming back
//!   ([`Deliveries::handle_relay_up`]), messages every relay holds but the contact never
//!   confirmed ([`Deliveries::poll_reputs`]), and when anything is due next
//!   ([`Deliveries::next_deadline`]).
//! - [`Inboxes`]: the long polls on our own relays, with backoff for those that fail.
//! - [`EarlySends`]: how many sends may leave before their write is durable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use kkachi_protocol::session::MAX_UNSAVED_SEALS;
use kkachi_protocol::{MessageId, PeerId};

use super::RelayError;
use super::state::Device;
use crate::backoff::Backoff;
use crate::store::{MessageState, OutboxEntry, OutboxKind, Target};

/// Waits between attempts on one path after failures: from half a second, doubling,
/// up to 15 s (a relay that comes back is retried at once, when we connect to it for
/// another reason). Our relays' long polls back off alike.
pub const RETRY: Backoff = Backoff {
    first: Duration::from_millis(500),
    max: Duration::from_secs(15),
};
/// Waits between attempts to put an envelope carried for someone else (from a
/// bundle): nobody waits for it on screen, and its relays are whoever the bundle named.
pub const RETRY_CARRIED: Backoff = Backoff {
    first: Duration::from_secs(5),
    max: Duration::from_secs(600),
};
/// Attempts under way to one relay at once: a relay that stopped answering (its
/// datacenter cut off, its packets vanishing) holds at most this many until they time
/// out, and the other relays' deliveries go on.
pub const MAX_PER_RELAY: usize = 4;
/// Attempts under way at once for envelopes carried for others: the user's own
/// messages always have room.
pub const MAX_CARRIED: usize = 2;
/// Attempts under way at once for one contact: a contact whose relays all swallow
/// traffic holds at most this many, and messages to everyone else go on.
pub const MAX_PER_CONTACT: usize = 12;
/// How long after every relay acknowledged a message, with no receipt from the contact,
/// it is put again (a relay may have lost it).
pub const REPUT_AFTER_MS: u64 = 3_600_000;

/// A way a copy of an outbox entry travels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Path {
    /// Straight to the contact, connected now.
    Direct,
    /// To one of the contact's relays (its address).
    Relay(String),
}

/// An attempt for the owner to make: put entry `key`'s envelope on `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The outbox entry.
    pub key: u64,
    /// Which version of the entry it carries: an answer for an entry sealed again
    /// since changes nothing of it.
    pub version: u64,
    /// Where to.
    pub path: Path,
    /// Whose it is.
    /// The contact it is for (`None`: an envelope carried for someone else).
    pub contact: Option<PeerId>,
    /// The message it carries, if it is a conversation message (not a receipt or card).
    pub message: Option<MessageId>,
    /// The encoded envelope.
    pub envelope: Vec<u8>,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored (or already held) by the relay, or taken in by the contact.
    Acked,
    /// The relay or contact answered, and refused (with its reason): it is up.
    Refused(String),
    /// No answer (down, unreachable, timed out).
    Unreachable(String),
}

/// How far a delivery got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Paths (relays, direct) that acknowledged.
    pub acked: u8,
    /// The contact's relays.
    pub total: u8,
    /// Handed to the contact directly.
    pub direct: bool,
}

impl Progress {
    fn of(entry: &OutboxEntry) -> Self {
        Self {
            acked: entry.acked_count(),
            total: entry.targets.len().min(usize::from(u8::MAX)) as u8,
            direct: entry.direct_acked,
        }
    }
}

/// What an answer does to the stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing (the entry is gone, or was sealed again since the attempt left).
    Nothing,
    /// Write the entry as it is now.
    Write(Box<OutboxEntry>),
    /// It is done: remove it.
    Remove,
}

/// What an answer changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// What to write.
    pub change: Change,
    /// The entry is no longer in the outbox (done now, or gone before the answer came).
    pub gone: bool,
    /// The state its message moves to, if any.
    pub state: Option<MessageState>,
    /// It was handed to the contact directly (it is delivered).
    pub handed_over: bool,
    /// What the answer says of the relay asked: up, or down with why.
    pub relay: Option<(String, Result<(), RelayError>)>,
    /// How far the delivery got, if that changed.
    pub progress: Option<Progress>,
}

/// One outbox entry as scheduled.
#[derive(Debug)]
struct Scheduled {
    entry: OutboxEntry,
    /// `None` for an envelope carried for someone else ([`OutboxKind::Forward`]).
    contact: Option<PeerId>,
    version: u64,
    /// Failed direct hand-overs in a row, and when the next may go.
    direct_failures: u32,
    direct_next_ms: u64,
    /// Paths with an attempt under way.
    in_flight: Vec<Path>,
}

impl Scheduled {
    fn busy(&self, path: &Path) -> bool {
        self.in_flight.contains(path)
    }

    fn relay_busy(&self, addr: &str) -> bool {
        self.in_flight
            .iter()
            .any(|p| matches!(p, Path::Relay(a) if a == addr))
    }

    /// The direct path, if it is wanted at all: the device it is sealed to is
    /// reachable directly (each device is a peer of its own on the network, SPEC §1)
    /// and has not taken it yet.
    fn wants_direct(&self, direct: &HashSet<(PeerId, Device)>) -> bool {
        !self.entry.direct_acked
            && self
                .contact
                .is_some_and(|c| direct.contains(&(c, self.entry.device)))
    }

    /// Every relay holds it and the contact never confirmed: when to put it again.
    fn reput_at(&self) -> Option<u64> {
        let e = &self.entry;
        (e.kind == OutboxKind::Message
            && !e.targets.is_empty()
            && e.targets.iter().all(|t| t.acked))
        .then(|| e.created_ms.saturating_add(REPUT_AFTER_MS + 1))
    }
}

/// The outbox's entries and the attempts in flight for them.
#[derive(Debug, Default)]
pub struct Deliveries {
    entries: BTreeMap<u64, Scheduled>,
    /// Attempts under way, over all entries (also those removed while it ran).
    in_flight: usize,
    /// Entries whose latest write is not durable yet: nothing of them leaves until it is.
    held: HashSet<u64>,
    /// Devices reachable directly now: each contact's (and each of our own account's).
    direct: HashSet<(PeerId, Device)>,
    versions: u64,
    /// The next deadline, while nothing changed since it was worked out.
    deadline: std::cell::Cell<Option<Option<u64>>>,
    /// When each relay last had its acknowledgements undone for a new store epoch: a
    /// relay that names a new one in every answer gets that at most every
    /// [`EPOCH_RESET_EVERY_MS`].
    epoch_resets: HashMap<String, u64>,
    /// The store epoch each relay named last in this run: an answer naming the same
    /// one needs no look at the outbox.
    epochs: HashMap<String, u64>,
    /// Attempts under way per relay (at most [`MAX_PER_RELAY`]).
    per_relay: HashMap<String, usize>,
    /// Attempts under way for carried envelopes (at most [`MAX_CARRIED`]).
    carried: usize,
    /// Attempts under way per contact (at most [`MAX_PER_CONTACT`]).
    per_contact: HashMap<PeerId, usize>,
}

/// A relay's acknowledgements are undone for a new store epoch at most this often.
pub const EPOCH_RESET_EVERY_MS: u64 = 10 * 60 * 1000;

impl Deliveries {
    fn changed(&mut self) {
        self.deadline.set(None);
    }

    /// An entry as the store holds it (new, or changed by someone else). False (and
    /// not scheduled) if its contact is unreadable.
    pub fn upsert(&mut self, key: u64, entry: OutboxEntry) -> bool {
        let contact = match (entry.kind, PeerId::from_bytes(&entry.contact)) {
            (OutboxKind::Forward, _) => None,
            (_, Ok(contact)) => Some(contact),
            (_, Err(_)) => return false,
        };
        self.changed();
        self.versions += 1;
        let version = self.versions;
        match self.entries.get_mut(&key) {
            Some(s) => {
                s.entry = entry;
                s.contact = contact;
                s.version = version;
            }
            None => {
                self.entries.insert(
                    key,
                    Scheduled {
                        entry,
                        contact,
                        version,
                        direct_failures: 0,
                        direct_next_ms: 0,
                        in_flight: Vec::new(),
                    },
                );
            }
        }
        true
    }

    /// An entry gone from the store.
    pub fn remove(&mut self, key: u64) {
        self.changed();
        self.entries.remove(&key);
        self.held.remove(&key);
    }

    /// Entry `key` may not leave until [`Deliveries::release`]: its latest write (the
    /// session state that sealed it, say) is not durable yet.
    pub fn hold(&mut self, key: u64) {
        self.changed();
        self.held.insert(key);
    }

    /// Entry `key` may leave again.
    pub fn release(&mut self, key: u64) {
        self.changed();
        self.held.remove(&key);
    }

    /// The entry `key`, if waiting.
    pub fn get(&self, key: u64) -> Option<&OutboxEntry> {
        self.entries.get(&key).map(|s| &s.entry)
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Attempts under way.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Which devices are reachable directly now.
    pub fn set_direct(&mut self, peers: HashSet<(PeerId, Device)>) {
        if peers != self.direct {
            self.changed();
            self.direct = peers;
        }
    }

    /// How far entry `key` got (None once it is gone).
    pub fn progress(&self, key: u64) -> Option<Progress> {
        self.entries.get(&key).map(|s| Progress::of(&s.entry))
    }

    /// Up to `limit` attempts due at `now`, oldest entries first and each entry's direct
    /// path before its relays (when the contact is connected, that is the path that
    /// shows the message). Each is in flight until [`Deliveries::handle_result`].
    pub fn poll_attempts(&mut self, now: u64, limit: usize) -> Vec<Attempt> {
        let mut out = Vec::new();
        if limit == 0 || self.next_deadline().is_none_or(|d| d > now) {
            return out;
        }
        // The user's own entries first; carried ones with what room is left.
        for carried in [false, true] {
            for (key, s) in &mut self.entries {
                if out.len() >= limit {
                    break;
                }
                if self.held.contains(key) || (s.entry.kind == OutboxKind::Forward) != carried {
                    continue;
                }
                let direct = (s.wants_direct(&self.direct)
                    && s.direct_next_ms <= now
                    && !s.busy(&Path::Direct))
                .then_some(Path::Direct);
                let relays: Vec<Path> = s
                    .entry
                    .targets
                    .iter()
                    .filter(|t| !t.acked && t.next_try_ms <= now && !s.relay_busy(&t.addr))
                    .map(|t| Path::Relay(t.addr.clone()))
                    .collect();
                for path in direct.into_iter().chain(relays) {
                    if out.len() >= limit || (carried && self.carried >= MAX_CARRIED) {
                        break;
                    }
                    if let Some(contact) = s.contact
                        && self.per_contact.get(&contact).copied().unwrap_or(0) >= MAX_PER_CONTACT
                    {
                        break;
                    }
                    if s.in_flight.contains(&path) {
                        // The same relay named twice.
                        continue;
                    }
                    if let Path::Relay(addr) = &path {
                        let busy = self.per_relay.entry(addr.clone()).or_default();
                        if *busy >= MAX_PER_RELAY {
                            continue;
                        }
                        *busy += 1;
                    }
                    if carried {
                        self.carried += 1;
                    }
                    if let Some(contact) = s.contact {
                        *self.per_contact.entry(contact).or_default() += 1;
                    }
                    s.in_flight.push(path.clone());
                    out.push(Attempt {
                        key: *key,
                        version: s.version,
                        path,
                        contact: s.contact,
                        message: matches!(s.entry.kind, OutboxKind::Message | OutboxKind::Group)
                            .then_some(MessageId(s.entry.message_id)),
                        envelope: s.entry.envelope.clone(),
                    });
                }
            }
        }
        if !out.is_empty() {
            self.in_flight += out.len();
            self.changed();
        }
        out
    }

    /// Records how `attempt` ended at `now`; `jitter` places the next try of a path
    /// that failed (see [`RETRY`]).
    pub fn handle_result(
        &mut self,
        attempt: &Attempt,
        outcome: Outcome,
        now: u64,
        jitter: u64,
    ) -> Recorded {
        self.changed();
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Path::Relay(addr) = &attempt.path
            && let Some(busy) = self.per_relay.get_mut(addr)
        {
            *busy = busy.saturating_sub(1);
            if *busy == 0 {
                self.per_relay.remove(addr);
            }
        }
        match attempt.contact {
            None => self.carried = self.carried.saturating_sub(1),
            Some(contact) => {
                if let Some(busy) = self.per_contact.get_mut(&contact) {
                    *busy = busy.saturating_sub(1);
                    if *busy == 0 {
                        self.per_contact.remove(&contact);
                    }
                }
            }
        }
        let relay = match (&attempt.path, &outcome) {
            (Path::Relay(addr), Outcome::Unreachable(why)) => {
                Some((addr.clone(), Err(RelayError::Unreachable(why.clone()))))
            }
            (Path::Relay(addr), _) => Some((addr.clone(), Ok(()))),
            (Path::Direct, _) => None,
        };
        let acked = outcome == Outcome::Acked;
        let handed_over = acked && attempt.path == Path::Direct && attempt.message.is_some();
        let unchanged = |gone| Recorded {
            change: Change::Nothing,
            gone,
            state: None,
            handed_over: false,
            relay: relay.clone(),
            progress: None,
        };
        let Some(s) = self.entries.get_mut(&attempt.key) else {
            // Done meanwhile (a receipt came): nothing to keep, but a hand-over stands.
            return Recorded {
                handed_over,
                ..unchanged(true)
            };
        };
        if let Some(i) = s.in_flight.iter().position(|p| *p == attempt.path) {
            s.in_flight.swap_remove(i);
        }
        if s.version != attempt.version {
            // Sealed again since: the answer is for an envelope that is no longer ours
            // to deliver, except that a hand-over of it still delivered the message.
            if handed_over {
                return self.finish(attempt.key, handed_over, relay);
            }
            return unchanged(false);
        }
        let entry = &mut s.entry;
        let before = Progress::of(entry);
        match &attempt.path {
            Path::Direct if acked => entry.direct_acked = true,
            Path::Direct => {
                s.direct_failures = s.direct_failures.saturating_add(1);
                s.direct_next_ms = now + RETRY.wait_ms(s.direct_failures, jitter);
            }
            Path::Relay(addr) => {
                let backoff = if entry.kind == OutboxKind::Forward {
                    RETRY_CARRIED
                } else {
                    RETRY
                };
                // Every target at that address (a card or bundle naming a relay twice
                // must not leave a copy due for ever).
                for t in entry.targets.iter_mut().filter(|t| t.addr == *addr) {
                    if acked {
                        t.acked = true;
                    } else {
                        t.attempts = t.attempts.saturating_add(1);
                        t.next_try_ms = now + backoff.wait_ms(t.attempts, jitter);
                    }
                }
            }
        }
        let is_message = entry.kind == OutboxKind::Message;
        let progress = Progress::of(entry);
        // A message, and a post of ours in a large group, count the relays that have it.
        let state = ((is_message || entry.kind == OutboxKind::Group)
            && progress.acked > before.acked)
            .then_some(MessageState::Relayed {
                relayed: progress.acked,
                total: progress.total,
            });
        // A direct handover is answered only once the contact stored it durably: it is
        // delivered, nothing more needs sending. A receipt, card or group post is done
        // once every relay (or the contact) has it; a message, once the contact confirms.
        let all_relays = entry.targets.iter().all(|t| t.acked);
        if entry.direct_acked || (!is_message && all_relays) {
            let mut done = self.finish(attempt.key, handed_over, relay);
            done.state = done.state.or(state);
            return done;
        }
        Recorded {
            change: Change::Write(Box::new(entry.clone())),
            gone: false,
            state,
            handed_over: false,
            relay,
            progress: (progress != before).then_some(progress),
        }
    }

    /// Entry `key` is done by an answer: removed.
    fn finish(
        &mut self,
        key: u64,
        handed_over: bool,
        relay: Option<(String, Result<(), RelayError>)>,
    ) -> Recorded {
        self.entries.remove(&key);
        self.held.remove(&key);
        Recorded {
            change: Change::Remove,
            gone: true,
            state: handed_over.then_some(MessageState::Delivered),
            handed_over,
            relay,
            progress: None,
        }
    }

    /// A relay (`matches` its address) is reachable again: what waits for it is due now.
    /// Returns the entries changed, to be written.
    pub fn handle_relay_up(
        &mut self,
        matches: impl Fn(&str) -> bool,
        now: u64,
    ) -> Vec<(u64, OutboxEntry)> {
        self.make_due(|addr| matches(addr), now)
    }

    /// Relay `addr` answered a put of entry `key` with store epoch `epoch`: that entry's
    /// target there records it, and every other entry that relay acknowledged under
    /// another epoch is due there again (the relay lost its data: what it had
    /// acknowledged and the contact has not confirmed is gone from it). Returns the
    /// other entries changed, to be written.
    pub fn handle_epoch(
        &mut self,
        key: u64,
        addr: &str,
        epoch: u64,
        now: u64,
    ) -> Vec<(u64, OutboxEntry)> {
        if epoch == 0 {
            return Vec::new();
        }
        let same = self.epochs.insert(addr.to_owned(), epoch) == Some(epoch);
        if let Some(t) = self
            .entries
            .get_mut(&key)
            .and_then(|s| s.entry.targets.iter_mut().find(|t| t.addr == addr))
        {
            t.epoch = epoch;
        }
        // A relay lying about its epoch in every answer would have everything put
        // there again and again: at most once a period (what was acknowledged under the
        // old epoch keeps it, so the next answer after the period catches it).
        if same
            || self
                .epoch_resets
                .get(addr)
                .is_some_and(|t| now.saturating_sub(*t) < EPOCH_RESET_EVERY_MS)
        {
            return Vec::new();
        }
        let changed = self.update_targets(|t| {
            let lost = t.addr == addr && t.acked && t.epoch != 0 && t.epoch != epoch;
            if lost {
                t.acked = false;
                t.epoch = 0;
                t.next_try_ms = now;
            }
            lost
        });
        if !changed.is_empty() {
            self.epoch_resets.insert(addr.to_owned(), now);
            tracing::info!(
                relay = addr,
                entries = changed.len(),
                "a relay lost its data: what it had acknowledged goes there again"
            );
        }
        changed
    }

    /// Every path not yet acknowledged is due now (the user asked to send everything).
    pub fn handle_force(&mut self, now: u64) -> Vec<(u64, OutboxEntry)> {
        for s in self.entries.values_mut() {
            s.direct_next_ms = s.direct_next_ms.min(now);
        }
        self.make_due(|_| true, now)
    }

    fn make_due(&mut self, matches: impl Fn(&str) -> bool, now: u64) -> Vec<(u64, OutboxEntry)> {
        self.changed();
        self.update_targets(|t| {
            let due = !t.acked && t.next_try_ms > now && matches(&t.addr);
            if due {
                t.next_try_ms = now;
            }
            due
        })
    }

    /// Applies `change` to every relay target of every entry (it says whether it
    /// changed the target); returns the entries changed, to be written.
    fn update_targets(
        &mut self,
        mut change: impl FnMut(&mut Target) -> bool,
    ) -> Vec<(u64, OutboxEntry)> {
        let mut changed = Vec::new();
        for (key, s) in &mut self.entries {
            let mut touched = false;
            for t in &mut s.entry.targets {
                touched |= change(t);
            }
            if touched {
                changed.push((*key, s.entry.clone()));
            }
        }
        if !changed.is_empty() {
            self.changed();
        }
        changed
    }

    /// Messages every relay acknowledged more than [`REPUT_AFTER_MS`] ago without a
    /// receipt from the contact: every relay is marked not acknowledged again, so they
    /// are put again. Returns the entries changed, to be written.
    pub fn poll_reputs(&mut self, now: u64) -> Vec<(u64, OutboxEntry)> {
        if self.next_deadline().is_none_or(|d| d > now) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (key, s) in &mut self.entries {
            let stale = s.reput_at().is_some_and(|at| at <= now) && s.in_flight.is_empty();
            if stale {
                for t in &mut s.entry.targets {
                    t.acked = false;
                    t.attempts = 0;
                    t.next_try_ms = now;
                }
                s.entry.created_ms = now;
                out.push((*key, s.entry.clone()));
            }
        }
        if !out.is_empty() {
            self.changed();
        }
        out
    }

    /// When something is due next (Unix ms), if anything waits that is not in flight:
    /// a relay path's next try, a direct hand-over, or a message's time to be put
    /// again. Worked out again only after a change.
    pub fn next_deadline(&self) -> Option<u64> {
        if let Some(known) = self.deadline.get() {
            return known;
        }
        let next = self
            .entries
            .iter()
            .filter(|(key, _)| !self.held.contains(key))
            .flat_map(|(_, s)| {
                // A relay, a contact or the carried entries with every slot of theirs
                // taken are due again when an answer frees one (an answer is a change).
                let share_full = (s.entry.kind == OutboxKind::Forward
                    && self.carried >= MAX_CARRIED)
                    || s.contact.is_some_and(|c| {
                        self.per_contact.get(&c).copied().unwrap_or(0) >= MAX_PER_CONTACT
                    });
                let relays = s
                    .entry
                    .targets
                    .iter()
                    .filter(move |t| {
                        !t.acked
                            && !s.relay_busy(&t.addr)
                            && !share_full
                            && self
                                .per_relay
                                .get(&t.addr)
                                .is_none_or(|n| *n < MAX_PER_RELAY)
                    })
                    .map(|t| t.next_try_ms);
                let direct =
                    (s.wants_direct(&self.direct) && !s.busy(&Path::Direct) && !share_full)
                        .then_some(s.direct_next_ms);
                // Put again only once nothing of it is under way (as `poll_reputs` does).
                let reput = s.reput_at().filter(|_| s.in_flight.is_empty());
                relays.chain(direct).chain(reput)
            })
            .min();
        self.deadline.set(Some(next));
        next
    }

    /// Contacts with messages waiting whose card's device is not reachable directly:
    /// worth a try for a direct path.
    pub fn waiting_contacts(&self) -> HashSet<PeerId> {
        self.entries
            .values()
            .filter(|s| s.entry.kind == OutboxKind::Message)
            .filter_map(|s| s.contact)
            .filter(|p| !self.direct.contains(&(*p, None)))
            .collect()
    }

    /// Drops everything for `contact` (removed or blocked).
    pub fn forget_contact(&mut self, contact: &PeerId) {
        self.changed();
        self.entries.retain(|_, s| s.contact != Some(*contact));
    }
}

/// Sends handed to the network before their write is durable: at most
/// [`MAX_UNSAVED_SEALS`] at once, which is how many counters a session skips when it is
/// loaded after a crash, so none handed out before one repeats.
#[derive(Debug, Default)]
pub struct EarlySends {
    tickets: Vec<u64>,
}

impl EarlySends {
    /// Takes a place for a send whose write is `ticket`; false if every place is held
    /// by a write not durable yet (`durable` says which are).
    pub fn claim(&mut self, ticket: u64, durable: impl Fn(u64) -> bool) -> bool {
        self.tickets.retain(|t| !durable(*t));
        let free = (self.tickets.len() as u64) < MAX_UNSAVED_SEALS;
        if free {
            self.tickets.push(ticket);
        }
        free
    }
}

/// The long polls on our own relays.
#[derive(Debug, Default)]
pub struct Inboxes {
    relays: BTreeMap<String, Inbox>,
}

#[derive(Debug, Default)]
struct Inbox {
    failures: u32,
    next_ms: u64,
    polling: bool,
    /// When the poll under way (or the last) was asked.
    asked_ms: u64,
}

/// How a poll of one of our relays ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// It brought envelopes: poll again at once.
    Items,
    /// Nothing: a long poll that waited out its time, so poll again at once; but not
    /// more often than [`MIN_POLL_SPACING_MS`], for a relay that answers at once.
    Empty,
    /// It brought envelopes, from a queue read at a steady pace (the contact-request
    /// queue: strangers' first messages are not urgent, and a flood of them must not
    /// cost the recipient more than one batch per [`MIN_POLL_SPACING_MS`]).
    Paced,
    /// No answer, or a refusal: back off.
    Failed,
}

/// The least time between two polls of one relay that both came back empty.
pub const MIN_POLL_SPACING_MS: u64 = 1_000;

impl Inboxes {
    /// Our relays are now `addrs`: new ones are polled at once, removed ones dropped.
    pub fn set(&mut self, addrs: impl IntoIterator<Item = String>) {
        let wanted: HashSet<String> = addrs.into_iter().collect();
        self.relays.retain(|a, _| wanted.contains(a));
        for addr in wanted {
            self.relays.entry(addr).or_default();
        }
    }

    /// Relays whose poll is due at `now` and not under way; each is under way until
    /// [`Inboxes::handle_answer`].
    pub fn poll(&mut self, now: u64) -> Vec<String> {
        let mut out = Vec::new();
        for (addr, inbox) in &mut self.relays {
            if !inbox.polling && inbox.next_ms <= now {
                inbox.polling = true;
                inbox.asked_ms = now;
                out.push(addr.clone());
            }
        }
        out
    }

    /// A poll of `relay` ended (see [`Answer`]).
    pub fn handle_answer(&mut self, relay: &str, answer: Answer, now: u64, jitter: u64) {
        let Some(inbox) = self.relays.get_mut(relay) else {
            return; // no longer ours
        };
        inbox.polling = false;
        match answer {
            Answer::Items => {
                inbox.failures = 0;
                inbox.next_ms = now;
            }
            Answer::Empty | Answer::Paced => {
                inbox.failures = 0;
                inbox.next_ms = now.max(inbox.asked_ms + MIN_POLL_SPACING_MS);
            }
            Answer::Failed => {
                inbox.failures = inbox.failures.saturating_add(1);
                inbox.next_ms = now + RETRY.wait_ms(inbox.failures, jitter);
            }
        }
    }

    /// `relay` is reachable again: if its poll was waiting out a backoff, it is due now.
    pub fn handle_relay_up(&mut self, relay: &str, now: u64) {
        if let Some(inbox) = self.relays.get_mut(relay)
            && !inbox.polling
        {
            inbox.next_ms = inbox.next_ms.min(now);
        }
    }

    /// When a poll is due next, if one waits.
    pub fn next_deadline(&self) -> Option<u64> {
        self.relays
            .values()
            .filter(|i| !i.polling)
            .map(|i| i.next_ms)
            .min()
    }
}

#[cfg(test)]
mod tests;
