//! Queue storage: envelopes by (queue, arrival cursor), deduplicated by envelope id,
//! with expiry and quotas per queue and per write capability; and the registry of which
//! write capability puts into which queue. (The code calls a queue's envelopes its
//! mailbox.)
//!
//! [`MailboxStore`] is the seam between the relay service and storage. [`SledStore`] is
//! the durable implementation (a put resolves only after its data is flushed, with one
//! flush shared by every put waiting at that moment); [`MemoryStore`] keeps everything
//! in memory for tests and throwaway relays.

mod bodies;
pub mod chunks;
mod index;
mod memory;
mod sled_store;

use std::collections::HashMap;
use std::future::Future;

use kkachi_protocol::wire::StoredEnvelope;
use kkachi_protocol::{Envelope, EnvelopeId, QueueId, QueueKind, WriteId};
use thiserror::Error;

pub use memory::MemoryStore;
#[cfg(test)]
pub(crate) use sled_store::Options;
pub use sled_store::{FlushObserver, SledStore};

/// A limit on what is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Most envelopes held.
    pub max_envelopes: u64,
    /// Most encoded envelope bytes held.
    pub max_bytes: u64,
}

/// The quotas a store enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// One inbox queue, all its write capabilities together.
    pub queue: Quota,
    /// One write capability of an inbox (one contact's puts).
    pub capability: Quota,
    /// One contact-request capability (whose write key is in an invite code).
    pub requests: Quota,
    /// Everything the relay holds, whoever it is for.
    pub total: Quota,
}

impl Limits {
    /// The same quota everywhere (tests).
    pub fn uniform(quota: Quota) -> Self {
        Self {
            queue: quota,
            capability: quota,
            requests: quota,
            total: Quota {
                max_envelopes: u64::MAX,
                max_bytes: u64::MAX,
            },
        }
    }

    /// (queue quota, capability quota) for a put through a capability of `kind`.
    pub(crate) fn of(&self, kind: QueueKind) -> (Quota, Quota) {
        match kind {
            QueueKind::Inbox => (self.queue, self.capability),
            QueueKind::Requests => (self.queue, self.requests),
            // One capability for every member: the queue's whole quota.
            QueueKind::Group => (self.queue, self.queue),
        }
    }
}

/// An envelope headed for a queue through one of its write capabilities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The queue.
    pub queue: QueueId,
    /// The capability it was put with (charged for it).
    pub grant: WriteId,
    /// What the capability is for (which quotas apply).
    pub kind: QueueKind,
    /// The envelope.
    pub envelope: Envelope,
}

/// The outcome of a `Grant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granted {
    /// The queue now grants this many write capabilities.
    Held(u32),
    /// The queue would grant more than allowed; nothing changed. Holds the current count.
    Full(u32),
    /// One of the ids is granted to another queue; nothing changed. Whoever holds a
    /// write key can bind its id first (an invite holder, the request capability), so
    /// the owner must hear of it rather than believe its queue takes those puts.
    Conflict,
    /// The queue is a group queue and the grant is not of that kind, or the other way
    /// round; nothing changed.
    OtherKind,
}

/// What happened to one envelope of a put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutResult {
    /// Stored at this cursor and durable.
    Stored {
        /// Arrival position in the mailbox.
        cursor: u64,
    },
    /// An envelope with the same id is already held (and durable).
    Duplicate,
    /// The mailbox is at its quota; nothing stored.
    QuotaExceeded,
    /// The relay holds all it may in all (its operator's cap); nothing stored.
    RelayFull,
}

impl PutResult {
    /// True if the answer must wait for a flush: a stored envelope, or a duplicate
    /// (its earlier copy may not be flushed yet).
    pub fn needs_flush(&self) -> bool {
        !matches!(self, PutResult::QuotaExceeded | PutResult::RelayFull)
    }
}

/// A page of a mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Envelopes in cursor order.
    pub items: Vec<StoredEnvelope>,
    /// The cursor to fetch after next time.
    pub next: u64,
    /// True if more envelopes follow.
    pub more: bool,
}

/// Totals across all mailboxes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Envelopes held.
    pub envelopes: u64,
    /// Encoded bytes held.
    pub bytes: u64,
    /// Mailboxes with at least one envelope.
    pub mailboxes: u64,
}

/// Storage failures. Nothing reported as stored is affected by one.
#[derive(Debug, Clone, Error)]
pub enum StoreError {
    /// The disk is full; puts fail until space returns.
    #[error("the relay's disk is full")]
    Full,
    /// Any other I/O failure.
    #[error("storage error: {0}")]
    Io(String),
    /// A record on disk does not decode.
    #[error("corrupt record in the store: {0}")]
    Corrupt(String),
}

/// Mailbox storage as the relay service needs it.
pub trait MailboxStore: Send + Sync + 'static {
    /// Stores envelopes (already validated), visible to [`fetch`](Self::fetch) when this
    /// returns but not yet durable: [`flush`](Self::flush) before acknowledging them.
    fn insert(&self, envelopes: &[Placed]) -> Result<Vec<PutResult>, StoreError>;

    /// Stores envelopes (already validated). Resolves only once every `Stored` and
    /// `Duplicate` envelope is durable.
    fn put(
        &self,
        envelopes: Vec<Placed>,
    ) -> impl Future<Output = Result<Vec<PutResult>, StoreError>> + Send {
        async move {
            let results = self.insert(&envelopes)?;
            if results.iter().any(PutResult::needs_flush) {
                self.flush().await?;
            }
            Ok(results)
        }
    }

    /// Up to `limit` envelopes and about `max_bytes` (at least one envelope if any)
    /// stored in `mailbox` after cursor `after`.
    fn fetch(
        &self,
        mailbox: &QueueId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Fetched, StoreError>;

    /// Deletes those of `ids` that are in `mailbox`; returns how many were.
    fn delete(&self, mailbox: &QueueId, ids: &[EnvelopeId]) -> Result<u32, StoreError>;

    /// Removes up to `max` envelopes that expired at or before `now`.
    fn expire(&self, now: u64, max: usize) -> Result<usize, StoreError>;

    /// Current totals.
    fn stats(&self) -> StoreStats;

    /// A random number chosen when this store's data was created: a new one means
    /// everything held before is gone (clients then put again what this relay had
    /// acknowledged and nobody has confirmed).
    fn epoch(&self) -> u64;

    /// The queue a write capability puts into, and the capability's kind.
    fn route(&self, write: &WriteId) -> Result<Option<(QueueId, QueueKind)>, StoreError>;

    /// Opens `queue` if new, and grants it `ids` as capabilities of `kind` (ids it
    /// grants already are skipped; one granted to another queue refuses the whole
    /// request), as long as it grants at most `max` in all. Durable after the next
    /// [`flush`](Self::flush).
    fn grant(
        &self,
        queue: &QueueId,
        kind: QueueKind,
        ids: &[WriteId],
        max: u32,
    ) -> Result<Granted, StoreError>;

    /// Withdraws those of `ids` granted to `queue`; returns how many it still grants.
    fn revoke(&self, queue: &QueueId, ids: &[WriteId]) -> Result<u32, StoreError>;

    /// Whether `queue` was opened (by a grant).
    fn has_queue(&self, queue: &QueueId) -> Result<bool, StoreError>;

    /// Whether `queue` is a group queue (opened by a grant of [`QueueKind::Group`]).
    fn is_group_queue(&self, queue: &QueueId) -> Result<bool, StoreError>;

    /// How many queues are open.
    fn queue_count(&self) -> u64;

    /// Makes everything written so far durable.
    fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Whether puts and deletes naming `queue` can be carried out without first
    /// reading the queue from disk (see [`index_queue`](Self::index_queue)).
    fn is_indexed(&self, _queue: &QueueId) -> bool {
        true
    }

    /// Reads `queue` from disk into the store's index, if it is not there yet. Blocks
    /// (a large queue takes a while): call it off the node's loop.
    fn index_queue(&self, _queue: &QueueId) -> Result<(), StoreError> {
        Ok(())
    }

    /// A failure the store cannot continue after (the relay then stops, to be
    /// restarted by its supervisor). `None` while healthy.
    fn fatal(&self) -> Option<String> {
        None
    }
}

/// Usage per queue and per write capability, kept in memory and checked against the
/// quotas on every put.
#[derive(Debug, Default)]
pub(crate) struct Usage {
    by_mailbox: HashMap<QueueId, (u64, u64)>,
    by_grant: HashMap<WriteId, (u64, u64)>,
    totals: StoreStats,
}

fn fits(used: Option<&(u64, u64)>, bytes: u64, quota: Quota) -> bool {
    let (count, held) = used.copied().unwrap_or_default();
    count < quota.max_envelopes && held.saturating_add(bytes) <= quota.max_bytes
}

/// Takes one envelope of `bytes` off `key`'s usage; true if that emptied it.
fn take<K: std::hash::Hash + Eq + Copy>(
    map: &mut HashMap<K, (u64, u64)>,
    key: K,
    bytes: u64,
) -> bool {
    match map.get_mut(&key) {
        Some(entry) => {
            entry.0 = entry.0.saturating_sub(1);
            entry.1 = entry.1.saturating_sub(bytes);
            if entry.0 == 0 {
                map.remove(&key);
                return true;
            }
            false
        }
        None => false,
    }
}

impl Usage {
    /// Reserves room for an envelope of `bytes` put into `mailbox` through `grant`, or
    /// says a quota is reached: the queue's (`quotas.0`) or the capability's
    /// (`quotas.1`).
    pub(crate) fn try_add(
        &mut self,
        mailbox: QueueId,
        grant: WriteId,
        bytes: u64,
        quotas: (Quota, Quota),
    ) -> bool {
        if !fits(self.by_mailbox.get(&mailbox), bytes, quotas.0)
            || !fits(self.by_grant.get(&grant), bytes, quotas.1)
        {
            return false;
        }
        self.add_existing(mailbox, grant, bytes);
        true
    }

    /// Whether an envelope of `bytes` fits under the relay's total.
    pub(crate) fn fits_total(&self, bytes: u64, total: Quota) -> bool {
        self.totals.envelopes < total.max_envelopes
            && self.totals.bytes.saturating_add(bytes) <= total.max_bytes
    }

    /// Counts an envelope found on disk at start-up (no quota check).
    pub(crate) fn add_existing(&mut self, mailbox: QueueId, grant: WriteId, bytes: u64) {
        let entry = self.by_mailbox.entry(mailbox).or_default();
        if entry.0 == 0 {
            self.totals.mailboxes += 1;
        }
        entry.0 += 1;
        entry.1 += bytes;
        let entry = self.by_grant.entry(grant).or_default();
        entry.0 += 1;
        entry.1 += bytes;
        self.totals.envelopes += 1;
        self.totals.bytes += bytes;
    }

    pub(crate) fn remove(&mut self, mailbox: &QueueId, grant: &WriteId, bytes: u64) {
        if !self.by_mailbox.contains_key(mailbox) {
            return;
        }
        if take(&mut self.by_mailbox, *mailbox, bytes) {
            self.totals.mailboxes = self.totals.mailboxes.saturating_sub(1);
        }
        take(&mut self.by_grant, *grant, bytes);
        self.totals.envelopes = self.totals.envelopes.saturating_sub(1);
        self.totals.bytes = self.totals.bytes.saturating_sub(bytes);
    }

    pub(crate) fn totals(&self) -> StoreStats {
        self.totals
    }
}

#[cfg(test)]
mod tests;
