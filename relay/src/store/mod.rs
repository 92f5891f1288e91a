//! Mailbox storage: envelopes by (mailbox, arrival cursor), deduplicated by envelope id,
//! with expiry and per-mailbox quotas.
//!
//! [`MailboxStore`] is the seam between the relay service and storage. [`SledStore`] is
//! the durable implementation (a put resolves only after its data is flushed, with one
//! flush shared by every put waiting at that moment); [`MemoryStore`] keeps everything
//! in memory for tests and throwaway relays.

mod index;
mod memory;
mod sled_store;

use std::collections::HashMap;
use std::future::Future;

use kkachi_protocol::wire::StoredEnvelope;
use kkachi_protocol::{Envelope, EnvelopeId, MailboxId};
use thiserror::Error;

pub use memory::MemoryStore;
pub use sled_store::{FlushObserver, SledStore};

/// Per-mailbox limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Most envelopes held for one mailbox.
    pub max_envelopes: u64,
    /// Most encoded envelope bytes held for one mailbox.
    pub max_bytes: u64,
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
}

impl PutResult {
    /// True if the answer must wait for a flush: a stored envelope, or a duplicate
    /// (its earlier copy may not be flushed yet).
    pub fn needs_flush(&self) -> bool {
        !matches!(self, PutResult::QuotaExceeded)
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
    fn insert(&self, envelopes: &[Envelope]) -> Result<Vec<PutResult>, StoreError>;

    /// Stores envelopes (already validated). Resolves only once every `Stored` and
    /// `Duplicate` envelope is durable.
    fn put(
        &self,
        envelopes: Vec<Envelope>,
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
        mailbox: &MailboxId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Fetched, StoreError>;

    /// Deletes those of `ids` that are in `mailbox`; returns how many were.
    fn delete(&self, mailbox: &MailboxId, ids: &[EnvelopeId]) -> Result<u32, StoreError>;

    /// Removes up to `max` envelopes that expired at or before `now`.
    fn expire(&self, now: u64, max: usize) -> Result<usize, StoreError>;

    /// Current totals.
    fn stats(&self) -> StoreStats;

    /// Makes everything written so far durable.
    fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A failure the store cannot continue after (the relay then stops, to be
    /// restarted by its supervisor). `None` while healthy.
    fn fatal(&self) -> Option<String> {
        None
    }
}

/// Per-mailbox usage, kept in memory and checked against the quota on every put.
#[derive(Debug, Default)]
pub(crate) struct Usage {
    by_mailbox: HashMap<MailboxId, (u64, u64)>,
    totals: StoreStats,
}

impl Usage {
    /// Reserves room for an envelope of `bytes`, or says the quota is reached.
    pub(crate) fn try_add(&mut self, mailbox: MailboxId, bytes: u64, quota: Quota) -> bool {
        let (count, used) = self.by_mailbox.get(&mailbox).copied().unwrap_or_default();
        if count >= quota.max_envelopes || used.saturating_add(bytes) > quota.max_bytes {
            return false;
        }
        self.add_existing(mailbox, bytes);
        true
    }

    /// Counts an envelope found on disk at start-up (no quota check).
    pub(crate) fn add_existing(&mut self, mailbox: MailboxId, bytes: u64) {
        let entry = self.by_mailbox.entry(mailbox).or_default();
        if entry.0 == 0 {
            self.totals.mailboxes += 1;
        }
        entry.0 += 1;
        entry.1 += bytes;
        self.totals.envelopes += 1;
        self.totals.bytes += bytes;
    }

    pub(crate) fn remove(&mut self, mailbox: &MailboxId, bytes: u64) {
        if let Some(entry) = self.by_mailbox.get_mut(mailbox) {
            entry.0 = entry.0.saturating_sub(1);
            entry.1 = entry.1.saturating_sub(bytes);
            self.totals.envelopes = self.totals.envelopes.saturating_sub(1);
            self.totals.bytes = self.totals.bytes.saturating_sub(bytes);
            if entry.0 == 0 {
                self.by_mailbox.remove(mailbox);
                self.totals.mailboxes = self.totals.mailboxes.saturating_sub(1);
            }
        }
    }

    pub(crate) fn totals(&self) -> StoreStats {
        self.totals
    }
}

#[cfg(test)]
mod tests;
