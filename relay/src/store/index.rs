//! What a store keeps in memory about the envelopes it holds: where each is in its
//! queue, what expires when, and usage per queue, per write capability and in all.
//!
//! Both stores use it. For the sled store it is what lets each put write one key per
//! envelope (the envelope itself, under its queue and cursor): finding duplicates,
//! deleting by id and expiring by time need no records on disk, because the index is
//! rebuilt from the envelopes. It costs memory per held envelope (one hash-map entry
//! and one B-tree entry: about 200 bytes, measured with a million), which the README's
//! sizing notes count.
//!
//! The sled store rebuilds it queue by queue after it opens: a queue is loaded the
//! first time a put or delete names it, and a background walk loads the rest (see
//! [`Index::loading`]). Envelope ids are unique per queue, so a queue can be loaded
//! alone.

use std::collections::{BTreeMap, HashMap, HashSet};

use kkachi_protocol::{EnvelopeId, QueueId, WriteId};

use super::{Quota, StoreStats, Usage};

/// Where a held envelope is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    /// Its arrival cursor; with the queue named in a request, its key in the store.
    pub(crate) cursor: u64,
    pub(crate) expires_at: u64,
}

/// The in-memory index of held envelopes.
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// The envelopes of each queue holding any, by id.
    queues: HashMap<QueueId, HashMap<EnvelopeId, Slot>>,
    /// While the index is being rebuilt: the queues loaded so far (with envelopes or
    /// without). `None` once every queue is.
    loading: Option<HashSet<QueueId>>,
    /// (expires_at, cursor) → queue: the order expiry works through.
    expiry: BTreeMap<(u64, u64), QueueId>,
    usage: Usage,
}

/// A held envelope whose time is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Due {
    pub(crate) mailbox: QueueId,
    pub(crate) cursor: u64,
    pub(crate) expires_at: u64,
}

/// An envelope being added to the index.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub(crate) id: EnvelopeId,
    pub(crate) mailbox: QueueId,
    /// The write capability it came through.
    pub(crate) grant: WriteId,
    pub(crate) cursor: u64,
    pub(crate) expires_at: u64,
    /// Its encoded size, counted against the queue's and the capability's quotas.
    pub(crate) bytes: u64,
}

impl Index {
    /// An index to be rebuilt queue by queue: no queue counts as loaded until
    /// [`load`](Self::load) is called for it, or [`loaded_all`](Self::loaded_all).
    pub(crate) fn rebuilding() -> Self {
        Self {
            loading: Some(HashSet::new()),
            ..Self::default()
        }
    }

    /// Whether `queue`'s envelopes are in the index. Until they are, nothing may change
    /// them: a put or delete loads the queue first.
    pub(crate) fn is_loaded(&self, queue: &QueueId) -> bool {
        self.loading
            .as_ref()
            .is_none_or(|loaded| loaded.contains(queue))
    }

    /// Adds the envelopes found in `queue` (no quota check: they were admitted before)
    /// and marks it loaded. A second copy of an id (which puts never write) is indexed
    /// and counted once; the cursors of such copies are returned for the caller to drop.
    /// The caller has checked that `queue` is not loaded yet.
    pub(crate) fn load(&mut self, queue: QueueId, found: &[Entry]) -> Vec<u64> {
        let mut extra = Vec::new();
        for entry in found {
            debug_assert_eq!(entry.mailbox, queue);
            if self.locate(&queue, &entry.id).is_some() {
                extra.push(entry.cursor);
                continue;
            }
            self.usage
                .add_existing(entry.mailbox, entry.grant, entry.bytes);
            self.insert(*entry);
        }
        if let Some(loaded) = &mut self.loading {
            loaded.insert(queue);
        }
        extra
    }

    /// Marks every queue loaded (the walk over the store is done).
    pub(crate) fn loaded_all(&mut self) {
        self.loading = None;
    }

    /// Where the envelope `id` is in `queue`, if held there.
    pub(crate) fn locate(&self, queue: &QueueId, id: &EnvelopeId) -> Option<Slot> {
        self.queues.get(queue)?.get(id).copied()
    }

    /// Whether an envelope of `bytes` fits under the relay's `total`. While the index
    /// is being rebuilt this counts only the queues loaded so far.
    pub(crate) fn fits_total(&self, bytes: u64, total: Quota) -> bool {
        self.usage.fits_total(bytes, total)
    }

    /// Adds a new envelope if its queue has room; false (and nothing changed) if not.
    /// The caller has loaded the queue and checked that `entry.id` is not held in it.
    pub(crate) fn try_add(&mut self, entry: Entry, quotas: (Quota, Quota)) -> bool {
        debug_assert!(self.is_loaded(&entry.mailbox));
        if !self
            .usage
            .try_add(entry.mailbox, entry.grant, entry.bytes, quotas)
        {
            return false;
        }
        self.insert(entry);
        true
    }

    fn insert(&mut self, entry: Entry) {
        let slot = Slot {
            cursor: entry.cursor,
            expires_at: entry.expires_at,
        };
        self.queues
            .entry(entry.mailbox)
            .or_default()
            .insert(entry.id, slot);
        self.expiry
            .insert((entry.expires_at, entry.cursor), entry.mailbox);
    }

    /// Forgets a held envelope of `bytes` in `mailbox`, put through `grant`. Returns
    /// false if `id` was not held there.
    pub(crate) fn remove(
        &mut self,
        id: &EnvelopeId,
        mailbox: &QueueId,
        grant: &WriteId,
        bytes: u64,
    ) -> bool {
        let Some(held) = self.queues.get_mut(mailbox) else {
            return false;
        };
        let Some(slot) = held.remove(id) else {
            return false;
        };
        if held.is_empty() {
            self.queues.remove(mailbox);
        }
        self.expiry.remove(&(slot.expires_at, slot.cursor));
        self.usage.remove(mailbox, grant, bytes);
        true
    }

    /// Up to `max` held envelopes that expired at or before `now`, soonest first (of
    /// the queues loaded so far, while the index is being rebuilt).
    pub(crate) fn due(&self, now: u64, max: usize) -> Vec<Due> {
        self.expiry
            .range(..=(now, u64::MAX))
            .take(max)
            .map(|(&(expires_at, cursor), &mailbox)| Due {
                mailbox,
                cursor,
                expires_at,
            })
            .collect()
    }

    /// Forgets an expiry entry whose envelope is not in the store. Defensive: the index
    /// and the store change together, under one lock, so this finds nothing to do
    /// unless they disagree, and then keeps one stale entry from holding up expiry.
    pub(crate) fn forget_expiry(&mut self, due: &Due) {
        self.expiry.remove(&(due.expires_at, due.cursor));
    }

    pub(crate) fn totals(&self) -> StoreStats {
        self.usage.totals()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: Quota = Quota {
        max_envelopes: 2,
        max_bytes: 1_000,
    };
    const QUOTA: (Quota, Quota) = (Q, Q);

    fn entry(id: u8, mailbox: u8, cursor: u64, expires_at: u64) -> Entry {
        Entry {
            id: EnvelopeId([id; 32]),
            mailbox: QueueId([mailbox; 32]),
            grant: WriteId([mailbox; 32]),
            cursor,
            expires_at,
            bytes: 100,
        }
    }

    #[test]
    fn adds_locates_expires_and_removes() {
        let mut index = Index::default();
        assert!(index.try_add(entry(1, 1, 1, 50), QUOTA));
        assert!(index.try_add(entry(2, 1, 2, 20), QUOTA));
        assert!(!index.try_add(entry(3, 1, 3, 10), QUOTA), "quota of 2");
        assert!(index.try_add(entry(3, 2, 3, 20), QUOTA), "other mailbox");
        assert_eq!(
            index.locate(&QueueId([1; 32]), &EnvelopeId([2; 32])),
            Some(Slot {
                cursor: 2,
                expires_at: 20
            })
        );
        assert_eq!(index.locate(&QueueId([2; 32]), &EnvelopeId([2; 32])), None);
        assert_eq!(index.locate(&QueueId([1; 32]), &EnvelopeId([9; 32])), None);
        // soonest first, ties by cursor, bounded by `max`
        let due = |at: &[Due]| {
            at.iter()
                .map(|d| (d.mailbox.0[0], d.cursor))
                .collect::<Vec<_>>()
        };
        assert_eq!(due(&index.due(20, 10)), [(1, 2), (2, 3)]);
        assert_eq!(due(&index.due(20, 1)), [(1, 2)]);
        assert_eq!(due(&index.due(19, 10)), []);

        let (q1, g1) = (QueueId([1; 32]), WriteId([1; 32]));
        assert!(index.remove(&EnvelopeId([2; 32]), &q1, &g1, 100));
        assert!(!index.remove(&EnvelopeId([2; 32]), &q1, &g1, 100));
        assert_eq!(due(&index.due(20, 10)), [(2, 3)]);
        let stale = index.due(20, 10)[0];
        index.forget_expiry(&stale);
        assert_eq!(due(&index.due(u64::MAX, 10)), [(1, 1)]);
        assert_eq!(index.totals().envelopes, 2);
        assert!(index.try_add(entry(4, 1, 4, 90), QUOTA), "room again");
    }

    #[test]
    fn a_capability_at_its_quota_leaves_the_queue_open_to_others() {
        let mut index = Index::default();
        let queue = Quota {
            max_envelopes: 10,
            max_bytes: 10_000,
        };
        let quotas = (queue, Q);
        let through = |id: u8, grant: u8| Entry {
            grant: WriteId([grant; 32]),
            ..entry(id, 1, u64::from(id), 50)
        };
        assert!(index.try_add(through(1, 7), quotas));
        assert!(index.try_add(through(2, 7), quotas));
        assert!(
            !index.try_add(through(3, 7), quotas),
            "capability 7 is full"
        );
        assert!(index.try_add(through(4, 8), quotas), "capability 8 is not");
        assert!(index.remove(
            &EnvelopeId([1; 32]),
            &QueueId([1; 32]),
            &WriteId([7; 32]),
            100
        ));
        assert!(index.try_add(through(5, 7), quotas), "room again for 7");
    }

    #[test]
    fn a_second_copy_found_on_load_is_counted_once() {
        let mut index = Index::rebuilding();
        let queue = QueueId([1; 32]);
        assert!(!index.is_loaded(&queue));
        let found = [entry(1, 1, 1, 50), entry(1, 1, 7, 50), entry(2, 1, 8, 60)];
        assert_eq!(index.load(queue, &found), [7]);
        assert!(index.is_loaded(&queue));
        assert!(!index.is_loaded(&QueueId([2; 32])), "other queues wait");
        assert_eq!(index.totals().envelopes, 2);
        let due = index.due(50, 10);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].cursor, 1);
        index.loaded_all();
        assert!(index.is_loaded(&QueueId([2; 32])));
    }

    #[test]
    fn the_same_envelope_may_be_held_in_two_queues() {
        let mut index = Index::default();
        assert!(index.try_add(entry(1, 1, 1, 50), QUOTA));
        let other = Entry {
            mailbox: QueueId([2; 32]),
            ..entry(1, 1, 2, 50)
        };
        assert_eq!(index.locate(&other.mailbox, &other.id), None);
        assert!(index.try_add(other, QUOTA));
        assert_eq!(index.totals().envelopes, 2);
        assert!(index.remove(&other.id, &other.mailbox, &other.grant, 100));
        assert_eq!(
            index.locate(&QueueId([1; 32]), &other.id).map(|s| s.cursor),
            Some(1)
        );
    }
}
