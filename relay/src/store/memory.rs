//! An in-memory store with the same semantics as the sled one, minus durability: for
//! tests and for relays whose data may vanish on restart (`--data-dir` unset in demos).

use std::collections::BTreeMap;
use std::sync::Arc;

use kkachi_protocol::wire::StoredEnvelope;
use kkachi_protocol::{Envelope, EnvelopeId, MailboxId};
use parking_lot::Mutex;

use super::index::{Entry, Index};
use super::{Fetched, MailboxStore, PutResult, Quota, StoreError, StoreStats};

#[derive(Debug, Default)]
struct Inner {
    mail: BTreeMap<(MailboxId, u64), Envelope>,
    index: Index,
    next_cursor: u64,
}

impl Inner {
    /// Removes the envelope `id` if it is held in `mailbox`.
    fn remove(&mut self, mailbox: &MailboxId, id: &EnvelopeId) -> bool {
        let Some(slot) = self.index.locate(id) else {
            return false;
        };
        let Some(envelope) = self.mail.remove(&(*mailbox, slot.cursor)) else {
            return false;
        };
        self.index
            .remove(id, mailbox, envelope.encoded_len() as u64)
    }
}

/// Mailboxes held in memory only.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    quota: Quota,
    inner: Arc<Mutex<Inner>>,
}

impl MemoryStore {
    /// An empty store with the given per-mailbox quota.
    pub fn new(quota: Quota) -> Self {
        Self {
            quota,
            inner: Arc::default(),
        }
    }
}

impl MailboxStore for MemoryStore {
    fn insert(&self, envelopes: &[Envelope]) -> Result<Vec<PutResult>, StoreError> {
        let mut inner = self.inner.lock();
        let mut results = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            let id = envelope.id();
            if inner.index.locate(&id).is_some() {
                results.push(PutResult::Duplicate);
                continue;
            }
            let entry = Entry {
                id,
                mailbox: envelope.mailbox,
                cursor: inner.next_cursor + 1,
                expires_at: envelope.expires_at,
                bytes: envelope.encoded_len() as u64,
            };
            if !inner.index.try_add(entry, self.quota) {
                results.push(PutResult::QuotaExceeded);
                continue;
            }
            inner.next_cursor = entry.cursor;
            let cursor = entry.cursor;
            inner
                .mail
                .insert((envelope.mailbox, cursor), envelope.clone());
            results.push(PutResult::Stored { cursor });
        }
        Ok(results)
    }

    fn fetch(
        &self,
        mailbox: &MailboxId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Fetched, StoreError> {
        let inner = self.inner.lock();
        let mut items = Vec::new();
        let mut bytes = 0;
        let mut more = false;
        let range = (*mailbox, after.saturating_add(1))..=(*mailbox, u64::MAX);
        for ((_, cursor), envelope) in inner.mail.range(range) {
            let len = envelope.encoded_len();
            if items.len() >= limit || (!items.is_empty() && bytes + len > max_bytes) {
                more = true;
                break;
            }
            bytes += len;
            items.push(StoredEnvelope {
                cursor: *cursor,
                envelope: envelope.clone(),
            });
        }
        let next = items.last().map_or(after, |i| i.cursor);
        Ok(Fetched { items, next, more })
    }

    fn delete(&self, mailbox: &MailboxId, ids: &[EnvelopeId]) -> Result<u32, StoreError> {
        let mut inner = self.inner.lock();
        let mut count = 0;
        for id in ids {
            if inner.remove(mailbox, id) {
                count += 1;
            }
        }
        Ok(count)
    }

    fn expire(&self, now: u64, max: usize) -> Result<usize, StoreError> {
        let mut inner = self.inner.lock();
        let mut count = 0;
        for due in inner.index.due(now, max) {
            match inner.mail.get(&(due.mailbox, due.cursor)).map(Envelope::id) {
                Some(id) if inner.remove(&due.mailbox, &id) => count += 1,
                _ => inner.index.forget_expiry(&due),
            }
        }
        Ok(count)
    }

    fn stats(&self) -> StoreStats {
        self.inner.lock().index.totals()
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
