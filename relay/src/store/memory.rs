//! An in-memory store with the same semantics as the sled one, minus durability: for
//! tests and for relays whose data may vanish on restart (`--data-dir` unset in demos).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use kkachi_protocol::wire::StoredEnvelope;
use kkachi_protocol::{Envelope, EnvelopeId, QueueId, QueueKind, WriteId};
use parking_lot::Mutex;

use super::index::{Entry, Index};
use super::{Fetched, Granted, Limits, MailboxStore, Placed, PutResult, StoreError, StoreStats};

#[derive(Debug, Default)]
struct Inner {
    mail: BTreeMap<(QueueId, u64), (WriteId, Envelope)>,
    index: Index,
    next_cursor: u64,
    /// Write capability → its queue and kind.
    grants: HashMap<WriteId, (QueueId, QueueKind)>,
    /// Queue → how many capabilities it grants.
    /// Each open queue: how many capabilities it grants, and whether it is a group queue.
    queues: HashMap<QueueId, (u32, bool)>,
}

impl Inner {
    /// Removes the envelope `id` if it is held in `mailbox`.
    fn remove(&mut self, mailbox: &QueueId, id: &EnvelopeId) -> bool {
        let Some(slot) = self.index.locate(mailbox, id) else {
            return false;
        };
        let Some((grant, envelope)) = self.mail.remove(&(*mailbox, slot.cursor)) else {
            return false;
        };
        self.index
            .remove(id, mailbox, &grant, envelope.encoded_len() as u64)
    }
}

/// Queues held in memory only.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    limits: Limits,
    inner: Arc<Mutex<Inner>>,
    epoch: u64,
}

impl MemoryStore {
    /// An empty store with the given quotas.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            inner: Arc::default(),
            epoch: rand::random::<u64>() | 1,
        }
    }
}

impl MailboxStore for MemoryStore {
    fn insert(&self, envelopes: &[Placed]) -> Result<Vec<PutResult>, StoreError> {
        let mut inner = self.inner.lock();
        let mut results = Vec::with_capacity(envelopes.len());
        for placed in envelopes {
            let envelope = &placed.envelope;
            let id = envelope.id();
            if inner.index.locate(&placed.queue, &id).is_some() {
                results.push(PutResult::Duplicate);
                continue;
            }
            let entry = Entry {
                id,
                mailbox: placed.queue,
                grant: placed.grant,
                cursor: inner.next_cursor + 1,
                expires_at: envelope.expires_at,
                bytes: envelope.encoded_len() as u64,
            };
            if !inner.index.fits_total(entry.bytes, self.limits.total) {
                results.push(PutResult::RelayFull);
                continue;
            }
            if !inner.index.try_add(entry, self.limits.of(placed.kind)) {
                results.push(PutResult::QuotaExceeded);
                continue;
            }
            inner.next_cursor = entry.cursor;
            let cursor = entry.cursor;
            inner
                .mail
                .insert((placed.queue, cursor), (placed.grant, envelope.clone()));
            results.push(PutResult::Stored { cursor });
        }
        Ok(results)
    }

    fn fetch(
        &self,
        mailbox: &QueueId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Fetched, StoreError> {
        let inner = self.inner.lock();
        let mut items = Vec::new();
        let mut bytes = 0;
        let mut more = false;
        let range = (*mailbox, after.saturating_add(1))..=(*mailbox, u64::MAX);
        for ((_, cursor), (_, envelope)) in inner.mail.range(range) {
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

    fn delete(&self, mailbox: &QueueId, ids: &[EnvelopeId]) -> Result<u32, StoreError> {
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
            match inner
                .mail
                .get(&(due.mailbox, due.cursor))
                .map(|(_, e)| e.id())
            {
                Some(id) if inner.remove(&due.mailbox, &id) => count += 1,
                _ => inner.index.forget_expiry(&due),
            }
        }
        Ok(count)
    }

    fn stats(&self) -> StoreStats {
        self.inner.lock().index.totals()
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn route(&self, write: &WriteId) -> Result<Option<(QueueId, QueueKind)>, StoreError> {
        Ok(self.inner.lock().grants.get(write).copied())
    }

    fn grant(
        &self,
        queue: &QueueId,
        kind: QueueKind,
        ids: &[WriteId],
        max: u32,
    ) -> Result<Granted, StoreError> {
        let mut inner = self.inner.lock();
        let (count, group) = inner
            .queues
            .get(queue)
            .copied()
            .unwrap_or((0, kind == QueueKind::Group));
        if group != (kind == QueueKind::Group) {
            return Ok(Granted::OtherKind);
        }
        if ids
            .iter()
            .any(|id| inner.grants.get(id).is_some_and(|(q, _)| q != queue))
        {
            return Ok(Granted::Conflict);
        }
        let mut new: Vec<WriteId> = ids
            .iter()
            .filter(|id| !inner.grants.contains_key(id))
            .copied()
            .collect();
        new.sort();
        new.dedup();
        let total = count.saturating_add(new.len() as u32);
        if total > max {
            return Ok(Granted::Full(count));
        }
        for id in new {
            inner.grants.insert(id, (*queue, kind));
        }
        inner.queues.insert(*queue, (total, group));
        Ok(Granted::Held(total))
    }

    fn revoke(&self, queue: &QueueId, ids: &[WriteId]) -> Result<u32, StoreError> {
        let mut inner = self.inner.lock();
        let mut removed = 0u32;
        for id in ids {
            if inner.grants.get(id).map(|(q, _)| q) == Some(queue) {
                inner.grants.remove(id);
                removed += 1;
            }
        }
        let Some((count, _)) = inner.queues.get_mut(queue) else {
            return Ok(0);
        };
        *count = count.saturating_sub(removed);
        Ok(*count)
    }

    fn has_queue(&self, queue: &QueueId) -> Result<bool, StoreError> {
        Ok(self.inner.lock().queues.contains_key(queue))
    }

    fn is_group_queue(&self, queue: &QueueId) -> Result<bool, StoreError> {
        Ok(self.inner.lock().queues.get(queue).is_some_and(|q| q.1))
    }

    fn queue_count(&self) -> u64 {
        self.inner.lock().queues.len() as u64
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
