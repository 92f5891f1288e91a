//! Writing: sets of changes applied all or nothing across a crash (see the module
//! docs of [`super`]), and which of them are durable.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::{LocalStore, StoreError, db, decode};

/// Trees of the database, for [`WriteSet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeId {
    /// Identity and profile.
    Meta = 0,
    /// Own relays.
    Relays,
    /// Contacts.
    Contacts,
    /// Session states.
    Sessions,
    /// Conversations.
    Conversations,
    /// Messages by (contact, local order).
    Messages,
    /// Message id → message key.
    MessageIndex,
    /// Outbox by order.
    Outbox,
    /// Seen envelope ids.
    Seen,
    /// Messages held from people who are not contacts, by sender and message id.
    Requests,
    /// Blocked senders.
    Blocked,
    /// Each contact's received sequenced records, by sequence number: their hash chain.
    Chain,
    /// Received messages whose delivery receipt is not sealed yet.
    ReceiptsDue,
    /// File transfers, each way, by direction and manifest id.
    Transfers,
    /// Groups: membership logs and our place in them.
    Groups,
    /// Group messages by (group, local order).
    GroupMessages,
    /// Our group messages by (member, message id): where each member's copy is counted.
    GroupIndex,
    /// Contacts' device sets.
    Devices,
}

pub(super) const TREES: [&str; 18] = [
    "meta",
    "relays",
    "contacts",
    "sessions",
    "conversations",
    "messages",
    "message_index",
    "outbox",
    "seen",
    "requests",
    "blocked",
    "chain",
    "receipts_due",
    "transfers",
    "groups",
    "group_messages",
    "group_index",
    "devices",
];

/// Changes to apply atomically.
#[derive(Debug, Default)]
pub struct WriteSet {
    ops: Vec<Op>,
}

/// Sets a key of a tree to a value, or (`None`) removes it.
pub(super) type Op = (TreeId, Vec<u8>, Option<Vec<u8>>);

impl WriteSet {
    /// Sets `key` to `value` in `tree`.
    pub fn put(&mut self, tree: TreeId, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((tree, key.into(), Some(value.into())));
    }

    /// Sets `key` to a serialised record.
    pub fn put_record<T: Serialize>(&mut self, tree: TreeId, key: impl Into<Vec<u8>>, value: &T) {
        let bytes = postcard::to_stdvec(value).expect("records serialise");
        self.put(tree, key, bytes);
    }

    /// What this set writes to `key` of `tree` last, if it writes it: `Some(None)` for
    /// a removal.
    pub fn pending(&self, tree: TreeId, key: &[u8]) -> Option<Option<&[u8]>> {
        self.ops
            .iter()
            .rev()
            .find(|(t, k, _)| *t == tree && k == key)
            .map(|(_, _, v)| v.as_deref())
    }

    /// Removes `key` from `tree`.
    pub fn remove(&mut self, tree: TreeId, key: impl Into<Vec<u8>>) {
        self.ops.push((tree, key.into(), None));
    }

    #[cfg(test)]
    pub(super) fn ops(&self) -> &[Op] {
        &self.ops
    }

    #[cfg(test)]
    pub(super) fn into_ops(self) -> Vec<Op> {
        self.ops
    }

    /// Changes in the set.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True if nothing is to be written.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Appends another set's changes.
    pub fn extend(&mut self, other: WriteSet) {
        self.ops.extend(other.ops);
    }
}

#[derive(Debug, Default)]
pub(super) struct Writer {
    /// Held while a write is applied.
    pub(super) turn: parking_lot::Mutex<()>,
    /// A write failed part-way: none is taken until the journal has completed it.
    broken: std::sync::atomic::AtomicBool,
}

/// The tree holding the write set in progress, under [`JOURNAL_KEY`].
pub(super) const JOURNAL_TREE: &str = "journal";
pub(super) const JOURNAL_KEY: &[u8] = b"in-progress";

/// Sets or (with `None`) removes one key.
fn write_one(tree: &sled::Tree, key: &[u8], value: Option<&[u8]>) -> Result<(), StoreError> {
    match value {
        Some(v) => tree.insert(key, v).map(drop),
        None => tree.remove(key).map(drop),
    }
    .map_err(db)
}

/// An [`Op`] as the journal holds it: the tree by number.
type JournalOp<'a> = (u8, &'a [u8], Option<&'a [u8]>);

/// A write set as the journal holds it.
pub(super) fn journal_entry(ops: &[Op]) -> Vec<u8> {
    let entry: Vec<JournalOp<'_>> = ops
        .iter()
        .map(|(t, k, v)| (*t as u8, k.as_slice(), v.as_deref()))
        .collect();
    postcard::to_stdvec(&entry).expect("journal entries serialise")
}

/// Completes a write set that a crash interrupted: applies it again from the journal
/// (each of its writes sets a key to a fixed value, so applying one twice is harmless)
/// and makes that durable.
pub(super) fn complete_journaled(
    db: &sled::Db,
    trees: &[sled::Tree],
    journal: &sled::Tree,
) -> Result<(), StoreError> {
    let Some(bytes) = journal.get(JOURNAL_KEY).map_err(self::db)? else {
        return Ok(());
    };
    let ops: Vec<(u8, Vec<u8>, Option<Vec<u8>>)> = decode(&bytes, "journal")?;
    for (tree, key, value) in &ops {
        let tree = trees
            .get(usize::from(*tree))
            .ok_or(StoreError::Corrupt("journal"))?;
        write_one(tree, key, value.as_deref())?;
    }
    journal.remove(JOURNAL_KEY).map_err(self::db)?;
    db.flush().map_err(self::db)?;
    tracing::info!(
        writes = ops.len(),
        "completed a write interrupted by a crash"
    );
    Ok(())
}

/// Which writes are on disk. Each write takes the next number; a flush makes every
/// number taken before it started durable. So a flush with nothing new to write (a
/// receive of copies already stored, say) returns at once instead of waiting on the disk.
#[derive(Debug, Default)]
pub(super) struct Durability {
    /// Writes applied so far.
    written: AtomicU64,
    /// All writes up to this number are durable.
    durable: AtomicU64,
    /// Flushes that went to the disk.
    flushes: AtomicU64,
}

impl LocalStore {
    /// Applies `writes` all or nothing, across a crash (see the module docs). Readers
    /// in between may see part of a set, as they would see one set before the next.
    /// Call [`LocalStore::flush`] before telling anyone about them.
    pub fn apply(&self, writes: WriteSet) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let contacts_changed = writes.ops.iter().any(|(t, _, _)| *t == TreeId::Contacts);
        let mut outbox = Vec::new();
        for (t, k, v) in &writes.ops {
            if *t == TreeId::Outbox
                && let Ok(key) = <[u8; 8]>::try_from(k.as_slice())
            {
                let key = u64::from_be_bytes(key);
                self.outbox_index.lock().note(key, v.as_deref());
                outbox.push(key);
            }
        }
        if !outbox.is_empty() {
            self.outbox_changes.lock().extend(outbox);
        }
        let result = self.apply_ops(writes);
        if contacts_changed {
            // After the write, so a reader that loaded the old contacts cannot keep them.
            self.contacts.generation.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    fn apply_ops(&self, writes: WriteSet) -> Result<(), StoreError> {
        // One write at a time: the journal holds one set, and a set must not be
        // replayed over a later write.
        let _turn = self.writer.turn.lock();
        if self.writer.broken.load(Ordering::SeqCst) {
            return Err(StoreError::Db(
                "an earlier write failed part-way; restart kkachi to complete it".into(),
            ));
        }
        // As they go to disk: keys tagged, values sealed (the journal holds them so).
        let ops = self.disk_ops(writes.ops);
        // One key is atomic by itself.
        let journaled = ops.len() > 1;
        if journaled {
            self.journal
                .insert(JOURNAL_KEY, journal_entry(&ops))
                .map_err(db)?;
        }
        let result = ops
            .iter()
            .try_for_each(|(t, k, v)| write_one(&self.trees[*t as usize], k, v.as_deref()))
            .and_then(|()| {
                if journaled {
                    self.journal.remove(JOURNAL_KEY).map_err(db)?;
                }
                Ok(())
            });
        if result.is_err() && journaled {
            // Part of the set may be in; the journal completes it on the next open.
            self.writer.broken.store(true, Ordering::SeqCst);
        }
        // Counted even if it failed (at worst a flush that finds nothing to write), and
        // in turn: a flush that counts writes waits for the one in progress, whose keys
        // a reader may have seen already.
        self.wrote();
        result
    }

    /// `ops` as they go to disk: keys tagged, values sealed.
    pub(super) fn disk_ops(&self, ops: Vec<Op>) -> Vec<Op> {
        ops.into_iter()
            .map(|(t, k, v)| {
                let disk = self.vault.disk_key(t, &k);
                let v = v.map(|v| self.vault.seal(t, &k, &disk, &v));
                (t, disk, v)
            })
            .collect()
    }

    /// Counts a write to the database, so the next flush goes to the disk. Called after
    /// the write, in its turn.
    fn wrote(&self) {
        self.durability.written.fetch_add(1, Ordering::SeqCst);
    }

    /// The outbox keys written (set or removed) since the last call, in order, each once.
    pub fn take_outbox_changes(&self) -> Vec<u64> {
        let mut keys = std::mem::take(&mut *self.outbox_changes.lock());
        let mut seen = std::collections::HashSet::new();
        keys.retain(|k| seen.insert(*k));
        keys
    }

    /// Makes everything applied so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let d = &self.durability;
        // Taken before the flush starts, so every write it counts is in that flush; and
        // between writes, so it counts any write whose keys a caller may have read.
        let target = {
            let _turn = self.writer.turn.lock();
            d.written.load(Ordering::SeqCst)
        };
        if d.durable.load(Ordering::SeqCst) >= target {
            return Ok(());
        }
        // Not sled's `flush_async`: it hands the flush to sled's own pool, which wakes
        // every idle thread of the pool for each job; the runtime's blocking pool wakes one.
        let handle = self.db.clone();
        tokio::task::spawn_blocking(move || handle.flush())
            .await
            .map_err(|e| StoreError::Db(format!("flush stopped: {e}")))?
            .map_err(db)?;
        d.flushes.fetch_add(1, Ordering::Relaxed);
        d.durable.fetch_max(target, Ordering::SeqCst);
        Ok(())
    }

    /// Makes everything applied so far durable, on this thread (for work outside the
    /// runtime: a restore).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(db)?;
        Ok(())
    }

    /// A ticket for every write applied so far: [`LocalStore::is_durable`] says when
    /// they are all on disk.
    pub fn write_ticket(&self) -> u64 {
        self.durability.written.load(Ordering::SeqCst)
    }

    /// True once every write counted by `ticket` is durable.
    pub fn is_durable(&self, ticket: u64) -> bool {
        self.durability.durable.load(Ordering::SeqCst) >= ticket
    }

    /// Flushes that went to the disk so far.
    pub fn disk_flushes(&self) -> u64 {
        self.durability.flushes.load(Ordering::Relaxed)
    }
}
