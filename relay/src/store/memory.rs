//! An in-memory store with the same semantics as the sled one, minus durability: for
//! tests and for relays whose data may vanish on restart (`--data-dir` unset in demos).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use kkachi_protocol::wire::StoredEnvelope;
use kkachi_protocol::{Envelope, EnvelopeId, MailboxId};
use parking_lot::Mutex;

use super::{Fetched, MailboxStore, PutResult, Quota, StoreError, StoreStats, Usage};

#[derive(Debug, Default)]
struct Inner {
    mail: BTreeMap<(MailboxId, u64), Envelope>,
    index: HashMap<EnvelopeId, (MailboxId, u64)>,
    expiry: BTreeSet<(u64, MailboxId, u64)>,
    next_cursor: u64,
    usage: Usage,
}

impl Inner {
    fn remove(&mut self, id: &EnvelopeId) -> bool {
        let Some((mailbox, cursor)) = self.index.remove(id) else {
            return false;
        };
        if let Some(env) = self.mail.remove(&(mailbox, cursor)) {
            self.expiry.remove(&(env.expires_at, mailbox, cursor));
            self.usage.remove(&mailbox, env.encoded_len() as u64);
        }
        true
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
    async fn put(&self, envelopes: Vec<Envelope>) -> Result<Vec<PutResult>, StoreError> {
        let mut inner = self.inner.lock();
        let mut results = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            let id = envelope.id();
            if inner.index.contains_key(&id) {
                results.push(PutResult::Duplicate);
                continue;
            }
            let bytes = envelope.encoded_len() as u64;
            if !inner.usage.try_add(envelope.mailbox, bytes, self.quota) {
                results.push(PutResult::QuotaExceeded);
                continue;
            }
            inner.next_cursor += 1;
            let cursor = inner.next_cursor;
            inner.index.insert(id, (envelope.mailbox, cursor));
            inner
                .expiry
                .insert((envelope.expires_at, envelope.mailbox, cursor));
            inner.mail.insert((envelope.mailbox, cursor), envelope);
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
            if inner.index.get(id).is_some_and(|(m, _)| m == mailbox) && inner.remove(id) {
                count += 1;
            }
        }
        Ok(count)
    }

    fn expire(&self, now: u64, max: usize) -> Result<usize, StoreError> {
        let mut inner = self.inner.lock();
        let due: Vec<EnvelopeId> = inner
            .expiry
            .iter()
            .take_while(|(at, _, _)| *at <= now)
            .take(max)
            .filter_map(|(_, m, c)| inner.mail.get(&(*m, *c)).map(Envelope::id))
            .collect();
        Ok(due.iter().filter(|id| inner.remove(id)).count())
    }

    fn stats(&self) -> StoreStats {
        self.inner.lock().usage.totals()
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
