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

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use kkachi_protocol::session::MAX_UNSAVED_SEALS;
use kkachi_protocol::{MessageId, PeerId};

use super::RelayError;
use crate::backoff::Backoff;
use crate::store::{MessageState, OutboxEntry, OutboxKind};

/// Waits between attempts on one path after failures: from half a second, doubling,
/// up to 15 s (a relay that comes back is retried at once, when we connect to it for
/// another reason). Our relays' long polls back off alike.
pub const RETRY: Backoff = Backoff {
    first: Duration::from_millis(500),
    max: Duration::from_secs(15),
};
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
    /// Where to.
    pub path: Path,
    /// Whose it is.
    pub contact: PeerId,
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

/// What an answer changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The entry as it is now (to be written), or `None`: done, to be removed (also
    /// `None` if it was gone already, see `known`).
    pub entry: Option<OutboxEntry>,
    /// False if the entry was gone when the answer came (a receipt removed it).
    pub known: bool,
    /// The state its message moves to, if any.
    pub state: Option<MessageState>,
    /// It was handed to the contact directly (it is delivered).
    pub handed_over: bool,
    /// What the answer says of the relay asked: up, or down with why.
    pub relay: Option<(String, Result<(), RelayError>)>,
    /// How far the delivery got (None once done).
    pub progress: Option<Progress>,
}

/// The outbox's entries and the attempts in flight for them.
#[derive(Debug, Default)]
pub struct Deliveries {
    entries: BTreeMap<u64, OutboxEntry>,
    in_flight: HashSet<(u64, Path)>,
    /// Entries whose latest write is not durable yet: nothing of them leaves until it is.
    held: HashSet<u64>,
    /// Contacts reachable directly now.
    direct: HashSet<PeerId>,
}

impl Deliveries {
    /// An entry as the store holds it (new, or changed by someone else).
    pub fn upsert(&mut self, key: u64, entry: OutboxEntry) {
        self.entries.insert(key, entry);
    }

    /// An entry gone from the store.
    pub fn remove(&mut self, key: u64) {
        self.entries.remove(&key);
        self.held.remove(&key);
    }

    /// Entry `key` may not leave until [`Deliveries::release`]: its latest write (the
    /// session state that sealed it, say) is not durable yet.
    pub fn hold(&mut self, key: u64) {
        self.held.insert(key);
    }

    /// Entry `key` may leave again.
    pub fn release(&mut self, key: u64) {
        self.held.remove(&key);
    }

    /// The entry `key`, if waiting.
    pub fn get(&self, key: u64) -> Option<&OutboxEntry> {
        self.entries.get(&key)
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
        self.in_flight.len()
    }

    /// Who is reachable directly now.
    pub fn set_direct(&mut self, peers: HashSet<PeerId>) {
        self.direct = peers;
    }

    /// How far entry `key` got (None once it is gone).
    pub fn progress(&self, key: u64) -> Option<Progress> {
        self.entries.get(&key).map(Progress::of)
    }

    /// Up to `limit` attempts due at `now`, oldest entries first and each entry's direct
    /// path before its relays (when the contact is connected, that is the path that
    /// shows the message). Each is in flight until [`Deliveries::handle_result`].
    pub fn poll_attempts(&mut self, now: u64, limit: usize) -> Vec<Attempt> {
        let mut out = Vec::new();
        for (key, entry) in &self.entries {
            if out.len() >= limit {
                break;
            }
            if self.held.contains(key) {
                continue;
            }
            let Ok(contact) = PeerId::from_bytes(&entry.contact) else {
                continue;
            };
            let direct =
                (!entry.direct_acked && self.direct.contains(&contact)).then_some(Path::Direct);
            let relays = entry
                .targets
                .iter()
                .filter(|t| !t.acked && t.next_try_ms <= now)
                .map(|t| Path::Relay(t.addr.clone()));
            for path in direct.into_iter().chain(relays) {
                if out.len() >= limit {
                    break;
                }
                if self.in_flight.contains(&(*key, path.clone())) {
                    continue;
                }
                out.push(Attempt {
                    key: *key,
                    path,
                    contact,
                    message: (entry.kind == OutboxKind::Message)
                        .then_some(MessageId(entry.message_id)),
                    envelope: entry.envelope.clone(),
                });
            }
        }
        for a in &out {
            self.in_flight.insert((a.key, a.path.clone()));
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
        self.in_flight.remove(&(attempt.key, attempt.path.clone()));
        let relay = match (&attempt.path, &outcome) {
            (Path::Relay(addr), Outcome::Unreachable(why)) => {
                Some((addr.clone(), Err(RelayError::Unreachable(why.clone()))))
            }
            (Path::Relay(addr), _) => Some((addr.clone(), Ok(()))),
            (Path::Direct, _) => None,
        };
        let acked = outcome == Outcome::Acked;
        let handed_over = acked && attempt.path == Path::Direct;
        let Some(entry) = self.entries.get_mut(&attempt.key) else {
            // Done meanwhile (a receipt came): nothing to keep.
            return Recorded {
                entry: None,
                known: false,
                state: None,
                handed_over: handed_over && attempt.message.is_some(),
                relay,
                progress: None,
            };
        };
        let before = entry.acked_count();
        match &attempt.path {
            Path::Direct => entry.direct_acked |= acked,
            Path::Relay(addr) => {
                if let Some(t) = entry.targets.iter_mut().find(|t| t.addr == *addr) {
                    if acked {
                        t.acked = true;
                    } else {
                        t.attempts = t.attempts.saturating_add(1);
                        t.next_try_ms = now + RETRY.wait_ms(t.attempts, jitter);
                    }
                }
            }
        }
        let is_message = entry.kind == OutboxKind::Message;
        let progress = Progress::of(entry);
        // A direct handover is answered only once the contact stored it durably: it is
        // delivered, nothing more needs sending. A receipt or card is done once every
        // relay (or the contact) has it; a message, once the contact confirms.
        let all_relays = entry.targets.iter().all(|t| t.acked);
        let done = entry.direct_acked || (!is_message && all_relays);
        let state = if is_message && entry.direct_acked {
            Some(MessageState::Delivered)
        } else if is_message && progress.acked > before {
            Some(MessageState::Relayed {
                relayed: progress.acked,
                total: progress.total,
            })
        } else {
            None
        };
        let entry = if done {
            self.entries.remove(&attempt.key);
            None
        } else {
            Some(entry.clone())
        };
        Recorded {
            progress: entry.as_ref().map(|_| progress),
            entry,
            known: true,
            state,
            handed_over: handed_over && is_message,
            relay,
        }
    }

    /// The contact confirmed messages `ids`: their entries are done. Returns their keys.
    pub fn handle_receipt(&mut self, contact: &PeerId, ids: &[MessageId]) -> Vec<u64> {
        let contact = contact.to_bytes();
        let done: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.kind == OutboxKind::Message
                    && e.contact == contact
                    && ids.contains(&MessageId(e.message_id))
            })
            .map(|(k, _)| *k)
            .collect();
        for key in &done {
            self.entries.remove(key);
        }
        done
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

    /// Every path not yet acknowledged is due now (the user asked to send everything).
    pub fn handle_force(&mut self, now: u64) -> Vec<(u64, OutboxEntry)> {
        self.make_due(|_| true, now)
    }

    fn make_due(&mut self, matches: impl Fn(&str) -> bool, now: u64) -> Vec<(u64, OutboxEntry)> {
        let mut changed = Vec::new();
        for (key, entry) in &mut self.entries {
            let mut touched = false;
            for t in entry
                .targets
                .iter_mut()
                .filter(|t| !t.acked && t.next_try_ms > now && matches(&t.addr))
            {
                t.next_try_ms = now;
                touched = true;
            }
            if touched {
                changed.push((*key, entry.clone()));
            }
        }
        changed
    }

    /// Messages every relay acknowledged more than [`REPUT_AFTER_MS`] ago without a
    /// receipt from the contact: every relay is marked not acknowledged again, so they
    /// are put once more (a relay may have lost them). Returns them, to be written.
    pub fn poll_reputs(&mut self, now: u64) -> Vec<(u64, OutboxEntry)> {
        let in_flight = &self.in_flight;
        let mut out = Vec::new();
        for (key, entry) in &mut self.entries {
            let stale = entry.kind == OutboxKind::Message
                && !entry.targets.is_empty()
                && entry.targets.iter().all(|t| t.acked)
                && now.saturating_sub(entry.created_ms) > REPUT_AFTER_MS
                && !in_flight.iter().any(|(k, _)| k == key);
            if stale {
                for t in &mut entry.targets {
                    t.acked = false;
                    t.attempts = 0;
                    t.next_try_ms = now;
                }
                entry.created_ms = now;
                out.push((*key, entry.clone()));
            }
        }
        out
    }

    /// When something is due next (Unix ms), if anything waits that is not in flight:
    /// a relay path's next try, or a message's time to be put again.
    pub fn next_deadline(&self) -> Option<u64> {
        self.entries
            .iter()
            .filter(|(key, _)| !self.held.contains(key))
            .flat_map(|(key, e)| {
                let paths = e
                    .targets
                    .iter()
                    .filter(move |t| {
                        !t.acked
                            && !self
                                .in_flight
                                .contains(&(*key, Path::Relay(t.addr.clone())))
                    })
                    .map(|t| t.next_try_ms);
                let reput = (e.kind == OutboxKind::Message
                    && !e.targets.is_empty()
                    && e.targets.iter().all(|t| t.acked))
                .then(|| e.created_ms.saturating_add(REPUT_AFTER_MS + 1));
                paths.chain(reput)
            })
            .min()
    }

    /// Contacts with messages waiting who are not reachable directly: worth a try for a
    /// direct path.
    pub fn waiting_contacts(&self) -> HashSet<PeerId> {
        self.entries
            .values()
            .filter(|e| e.kind == OutboxKind::Message)
            .filter_map(|e| PeerId::from_bytes(&e.contact).ok())
            .filter(|p| !self.direct.contains(p))
            .collect()
    }

    /// Drops everything for `contact` (removed or blocked).
    pub fn forget_contact(&mut self, contact: &PeerId) {
        let contact = contact.to_bytes();
        self.entries.retain(|_, e| e.contact != contact);
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
}

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
                out.push(addr.clone());
            }
        }
        out
    }

    /// A poll of `relay` ended: answered (poll again at once) or failed (back off).
    pub fn handle_answer(&mut self, relay: &str, answered: bool, now: u64, jitter: u64) {
        let Some(inbox) = self.relays.get_mut(relay) else {
            return; // no longer ours
        };
        inbox.polling = false;
        if answered {
            inbox.failures = 0;
            inbox.next_ms = now;
        } else {
            inbox.failures = inbox.failures.saturating_add(1);
            inbox.next_ms = now + RETRY.wait_ms(inbox.failures, jitter);
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
