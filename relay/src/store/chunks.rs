//! Chunks of files (SPEC §13), one file each on disk, under the queue they were put
//! into:
//!
//! ```text
//! DIR/<queue hex>/<chunk id hex>   magic "kkc1" ‖ expires_at(8) ‖ write_id(32) ‖ ciphertext
//! ```
//!
//! A chunk is named by BLAKE3 of its ciphertext, checked when it is put and again when it
//! is read (a damaged file is removed, not served). A put is durable before it is
//! answered: written to a temporary file, synced, renamed into place, and the directory
//! synced. What each queue, each write capability and the whole store hold is counted in
//! memory, rebuilt from the files' headers: a queue's the first time a request names it,
//! the rest by a walk in the background ([`ChunkStore::index_all`]), after which expiry
//! covers every chunk.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kkachi_protocol::file::{self, ChunkId, MAX_CHUNK};
use kkachi_protocol::{QueueId, WriteId};
use parking_lot::Mutex;

use super::StoreError;

const MAGIC: &[u8; 4] = b"kkc1";
const HEADER: usize = 4 + 8 + 32;

/// What the chunk store may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLimits {
    /// Bytes held for one write capability (one contact's uploads into a queue).
    pub per_capability: u64,
    /// Bytes held in one queue.
    pub per_queue: u64,
    /// Bytes held in all.
    pub total: u64,
}

/// What became of a chunk put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkPut {
    /// Stored, durably.
    Stored,
    /// Held already (by id, in this queue): nothing written.
    Duplicate,
    /// Its bytes do not hash to its id.
    WrongId,
    /// Not the length of a sealed chunk (a size class and its tag, SPEC §13): a store
    /// of tiny chunks would hold millions of files for a few megabytes.
    WrongSize,
    /// Over the capability's or the queue's share.
    QuotaExceeded,
    /// Over what the store holds in all.
    Full,
}

/// Bytes and chunks held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkStats {
    /// Chunks held.
    pub chunks: u64,
    /// Their bytes (ciphertext).
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    expires_at: u64,
    grant: WriteId,
    bytes: u64,
}

#[derive(Debug, Default)]
struct Index {
    queues: HashMap<QueueId, HashMap<ChunkId, Held>>,
    /// Queues read from disk so far; `None` once every queue is.
    loaded: Option<HashSet<QueueId>>,
    expiry: BTreeSet<(u64, QueueId, ChunkId)>,
    per_grant: HashMap<WriteId, u64>,
    per_queue: HashMap<QueueId, u64>,
    total: ChunkStats,
}

impl Index {
    fn is_loaded(&self, queue: &QueueId) -> bool {
        self.loaded.as_ref().is_none_or(|l| l.contains(queue))
    }

    fn add(&mut self, queue: QueueId, id: ChunkId, held: Held) {
        self.expiry.insert((held.expires_at, queue, id));
        *self.per_grant.entry(held.grant).or_default() += held.bytes;
        *self.per_queue.entry(queue).or_default() += held.bytes;
        self.total.chunks += 1;
        self.total.bytes += held.bytes;
        self.queues.entry(queue).or_default().insert(id, held);
    }

    fn remove(&mut self, queue: &QueueId, id: &ChunkId) -> Option<Held> {
        let chunks = self.queues.get_mut(queue)?;
        let held = chunks.remove(id)?;
        if chunks.is_empty() {
            self.queues.remove(queue);
        }
        self.expiry.remove(&(held.expires_at, *queue, *id));
        let down = |m: &mut u64| *m = m.saturating_sub(held.bytes);
        if let Some(g) = self.per_grant.get_mut(&held.grant) {
            down(g);
            if *g == 0 {
                self.per_grant.remove(&held.grant);
            }
        }
        if let Some(q) = self.per_queue.get_mut(queue) {
            down(q);
            if *q == 0 {
                self.per_queue.remove(queue);
            }
        }
        self.total.chunks = self.total.chunks.saturating_sub(1);
        down(&mut self.total.bytes);
        Some(held)
    }
}

/// The chunk store in one directory.
#[derive(Debug)]
pub struct ChunkStore {
    dir: PathBuf,
    limits: ChunkLimits,
    /// Every change to the files happens under this lock, so the index matches them.
    index: Mutex<Index>,
}

fn io(e: std::io::Error) -> StoreError {
    if e.raw_os_error() == Some(28) {
        StoreError::Full
    } else {
        StoreError::Io(e.to_string())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

/// Where a relay keeps chunks of files: [`ChunkStore`] (one file each on disk), or
/// another keeping (a test's, one that misbehaves on purpose).
pub trait Chunks: Send + Sync + 'static {
    /// Stores a chunk put through capability `grant` into `queue`, durably, if it fits.
    fn put(
        &self,
        queue: &QueueId,
        grant: &WriteId,
        id: &ChunkId,
        expires_at: u64,
        data: &[u8],
    ) -> Result<ChunkPut, StoreError>;
    /// A chunk of `queue`, if held and undamaged.
    fn get(&self, queue: &QueueId, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError>;
    /// Which of `ids` `queue` holds as put through `grant`.
    fn has_from(
        &self,
        queue: &QueueId,
        grant: &WriteId,
        ids: &[ChunkId],
    ) -> Result<Vec<bool>, StoreError>;
    /// Deletes chunks of `queue`; returns how many were there.
    fn delete(&self, queue: &QueueId, ids: &[ChunkId]) -> Result<u32, StoreError>;
    /// Removes up to `max` chunks whose time is up at `now`; returns how many.
    fn expire(&self, now: u64, max: usize) -> Result<usize, StoreError>;
    /// What is held.
    fn stats(&self) -> ChunkStats;
}

impl Chunks for ChunkStore {
    fn put(
        &self,
        queue: &QueueId,
        grant: &WriteId,
        id: &ChunkId,
        expires_at: u64,
        data: &[u8],
    ) -> Result<ChunkPut, StoreError> {
        ChunkStore::put(self, queue, grant, id, expires_at, data)
    }
    fn get(&self, queue: &QueueId, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        ChunkStore::get(self, queue, id)
    }
    fn has_from(
        &self,
        queue: &QueueId,
        grant: &WriteId,
        ids: &[ChunkId],
    ) -> Result<Vec<bool>, StoreError> {
        ChunkStore::has_from(self, queue, grant, ids)
    }
    fn delete(&self, queue: &QueueId, ids: &[ChunkId]) -> Result<u32, StoreError> {
        ChunkStore::delete(self, queue, ids)
    }
    fn expire(&self, now: u64, max: usize) -> Result<usize, StoreError> {
        ChunkStore::expire(self, now, max)
    }
    fn stats(&self) -> ChunkStats {
        ChunkStore::stats(self)
    }
}

impl ChunkStore {
    /// Opens (or creates) the store in `dir`. Queues are indexed when first named, and
    /// all of them by [`index_all`](Self::index_all).
    pub fn open(dir: &Path, limits: ChunkLimits) -> Result<Self, StoreError> {
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io)?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            limits,
            index: Mutex::new(Index {
                loaded: Some(HashSet::new()),
                ..Index::default()
            }),
        })
    }

    fn queue_dir(&self, queue: &QueueId) -> PathBuf {
        self.dir.join(hex(&queue.0))
    }

    fn chunk_path(&self, queue: &QueueId, id: &ChunkId) -> PathBuf {
        self.queue_dir(queue).join(id.to_hex())
    }

    /// Reads the headers of `queue`'s chunks into the index, unless it is there.
    /// Files that are not chunks (left from a crash, damaged) are removed.
    fn ensure_indexed(&self, index: &mut Index, queue: &QueueId) -> Result<(), StoreError> {
        if index.is_loaded(queue) {
            return Ok(());
        }
        let dir = self.queue_dir(queue);
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries {
                let entry = entry.map_err(io)?;
                let name = entry.file_name();
                let parsed = name
                    .to_str()
                    .and_then(unhex::<32>)
                    .map(ChunkId)
                    .and_then(|id| read_header(&entry.path()).map(|h| (id, h)));
                match parsed {
                    Some((id, held)) => index.add(*queue, id, held),
                    None => {
                        tracing::warn!(file = ?name, "removing a file in the chunk store that is no chunk");
                        let _ = fs::remove_file(entry.path());
                    }
                }
            }
        }
        if let Some(loaded) = &mut index.loaded {
            loaded.insert(*queue);
        }
        Ok(())
    }

    /// Indexes every queue (after which expiry and the total cover everything).
    pub fn index_all(&self) -> Result<(), StoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => return Err(io(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io)?;
            if let Some(queue) = entry.file_name().to_str().and_then(unhex::<32>) {
                let mut index = self.index.lock();
                self.ensure_indexed(&mut index, &QueueId(queue))?;
            }
        }
        self.index.lock().loaded = None;
        Ok(())
    }

    /// Stores a chunk put through capability `grant` into `queue`, durably, if it fits.
    pub fn put(
        &self,
        queue: &QueueId,
        grant: &WriteId,
        id: &ChunkId,
        expires_at: u64,
        data: &[u8],
    ) -> Result<ChunkPut, StoreError> {
        if !file::is_sealed_len(data.len()) {
            return Ok(ChunkPut::WrongSize);
        }
        if ChunkId::of(data) != *id {
            return Ok(ChunkPut::WrongId);
        }
        let bytes = data.len() as u64;
        let checked = |index: &Index| {
            if index.queues.get(queue).is_some_and(|q| q.contains_key(id)) {
                return Some(ChunkPut::Duplicate);
            }
            if index.total.bytes + bytes > self.limits.total {
                return Some(ChunkPut::Full);
            }
            let by_grant = index.per_grant.get(grant).copied().unwrap_or(0);
            let by_queue = index.per_queue.get(queue).copied().unwrap_or(0);
            (by_grant + bytes > self.limits.per_capability
                || by_queue + bytes > self.limits.per_queue)
                .then_some(ChunkPut::QuotaExceeded)
        };
        {
            let mut index = self.index.lock();
            self.ensure_indexed(&mut index, queue)?;
            if let Some(refused) = checked(&index) {
                return Ok(refused);
            }
        }
        // Written and synced without the lock (other puts go on meanwhile), then checked
        // again and put in place under it.
        let dir = self.queue_dir(queue);
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(io)?;
            sync_dir(&self.dir)?;
        }
        let tmp = dir.join(format!(".tmp-{}", hex(&rand::random::<[u8; 8]>())));
        let written = (|| {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(&expires_at.to_be_bytes())?;
            f.write_all(&grant.0)?;
            f.write_all(data)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io(e));
        }
        let mut index = self.index.lock();
        if let Some(refused) = checked(&index) {
            let _ = fs::remove_file(&tmp);
            return Ok(refused);
        }
        if let Err(e) = fs::rename(&tmp, self.chunk_path(queue, id)) {
            let _ = fs::remove_file(&tmp);
            return Err(io(e));
        }
        sync_dir(&dir)?;
        index.add(
            *queue,
            *id,
            Held {
                expires_at,
                grant: *grant,
                bytes,
            },
        );
        Ok(ChunkPut::Stored)
    }

    /// A chunk of `queue`, checked against its id; a damaged one is removed and `None`.
    pub fn get(&self, queue: &QueueId, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        let mut index = self.index.lock();
        self.ensure_indexed(&mut index, queue)?;
        if !index.queues.get(queue).is_some_and(|q| q.contains_key(id)) {
            return Ok(None);
        }
        let path = self.chunk_path(queue, id);
        let read = (|| {
            let mut f = File::open(&path)?;
            let mut all = Vec::new();
            f.read_to_end(&mut all)?;
            Ok::<_, std::io::Error>(all)
        })();
        match read {
            Ok(all) if all.len() >= HEADER && ChunkId::of(&all[HEADER..]) == *id => {
                Ok(Some(all[HEADER..].to_vec()))
            }
            _ => {
                tracing::error!(chunk = ?id, "a stored chunk is damaged or missing; it is removed");
                index.remove(queue, id);
                let _ = fs::remove_file(&path);
                Ok(None)
            }
        }
    }

    /// Which of `ids` `queue` holds.
    pub fn has(&self, queue: &QueueId, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        self.held(queue, ids, None)
    }

    /// Which of `ids` `queue` holds as put through `grant`: a capability learns nothing
    /// of what others put.
    pub fn has_from(
        &self,
        queue: &QueueId,
        grant: &WriteId,
        ids: &[ChunkId],
    ) -> Result<Vec<bool>, StoreError> {
        self.held(queue, ids, Some(grant))
    }

    fn held(
        &self,
        queue: &QueueId,
        ids: &[ChunkId],
        grant: Option<&WriteId>,
    ) -> Result<Vec<bool>, StoreError> {
        let mut index = self.index.lock();
        self.ensure_indexed(&mut index, queue)?;
        let held = index.queues.get(queue);
        Ok(ids
            .iter()
            .map(|id| {
                held.and_then(|q| q.get(id))
                    .is_some_and(|h| grant.is_none_or(|g| h.grant == *g))
            })
            .collect())
    }

    /// Deletes chunks of `queue`; returns how many were there.
    pub fn delete(&self, queue: &QueueId, ids: &[ChunkId]) -> Result<u32, StoreError> {
        let mut index = self.index.lock();
        self.ensure_indexed(&mut index, queue)?;
        let mut removed = 0;
        for id in ids {
            if index.remove(queue, id).is_some() {
                match fs::remove_file(self.chunk_path(queue, id)) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => removed += 1,
                    Err(e) => return Err(io(e)),
                }
            }
        }
        // An emptied queue's directory stays: a put may be writing into it.
        Ok(removed)
    }

    /// Removes up to `max` chunks whose time is up at `now`; returns how many.
    pub fn expire(&self, now: u64, max: usize) -> Result<usize, StoreError> {
        let due: Vec<(u64, QueueId, ChunkId)> = {
            let index = self.index.lock();
            index
                .expiry
                .iter()
                .take_while(|(at, _, _)| *at <= now)
                .take(max)
                .copied()
                .collect()
        };
        let mut gone = 0;
        for (_, queue, id) in due {
            gone += self.delete(&queue, &[id])? as usize;
        }
        Ok(gone)
    }

    /// What is held (in the queues indexed so far).
    pub fn stats(&self) -> ChunkStats {
        self.index.lock().total
    }
}

/// A chunk file's header, if it is one.
fn read_header(path: &Path) -> Option<Held> {
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut h = [0u8; HEADER];
    f.read_exact(&mut h).ok()?;
    if &h[..4] != MAGIC
        || len < HEADER as u64
        || len - HEADER as u64 > MAX_CHUNK as u64
        || !file::is_sealed_len((len - HEADER as u64) as usize)
    {
        return None;
    }
    Some(Held {
        expires_at: u64::from_be_bytes(h[4..12].try_into().expect("8 bytes")),
        grant: WriteId(h[12..44].try_into().expect("32 bytes")),
        bytes: len - HEADER as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest sealed chunk.
    const UNIT: usize = 4096 + 16;

    const LIMITS: ChunkLimits = ChunkLimits {
        per_capability: 3 * UNIT as u64,
        per_queue: 5 * UNIT as u64,
        total: 8 * UNIT as u64,
    };

    fn chunk(n: u8) -> (ChunkId, Vec<u8>) {
        let data = vec![n; UNIT];
        (ChunkId::of(&data), data)
    }

    #[test]
    fn chunks_are_stored_durably_served_checked_and_counted_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let (q, g) = (QueueId([1; 32]), WriteId([2; 32]));
        let (id, data) = chunk(1);
        {
            let store = ChunkStore::open(dir.path(), LIMITS).unwrap();
            assert_eq!(
                store.put(&q, &g, &id, 100, &data).unwrap(),
                ChunkPut::Stored
            );
            assert_eq!(
                store.put(&q, &g, &id, 100, &data).unwrap(),
                ChunkPut::Duplicate
            );
            // Bytes that are not what the id names are refused.
            let (other, _) = chunk(2);
            assert_eq!(
                store.put(&q, &g, &other, 100, &data).unwrap(),
                ChunkPut::WrongId
            );
            assert_eq!(
                store
                    .put(
                        &q,
                        &g,
                        &ChunkId::of(&vec![0; MAX_CHUNK + 1]),
                        100,
                        &vec![0; MAX_CHUNK + 1]
                    )
                    .unwrap(),
                ChunkPut::WrongSize
            );
            assert_eq!(
                store.put(&q, &g, &ChunkId::of(b"x"), 100, b"x").unwrap(),
                ChunkPut::WrongSize,
                "tiny chunks are refused"
            );
            assert_eq!(store.get(&q, &id).unwrap(), Some(data.clone()));
            // Only in the queue it was put into.
            assert_eq!(store.get(&QueueId([9; 32]), &id).unwrap(), None);
            assert_eq!(store.has(&q, &[id, other]).unwrap(), vec![true, false]);
        }
        let store = ChunkStore::open(dir.path(), LIMITS).unwrap();
        assert_eq!(store.stats(), ChunkStats::default(), "nothing indexed yet");
        store.index_all().unwrap();
        assert_eq!(
            store.stats(),
            ChunkStats {
                chunks: 1,
                bytes: UNIT as u64
            }
        );
        assert_eq!(store.get(&q, &id).unwrap(), Some(data));
    }

    #[test]
    fn shares_hold_per_capability_per_queue_and_in_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), LIMITS).unwrap();
        let (q1, q2) = (QueueId([1; 32]), QueueId([2; 32]));
        let (a, b) = (WriteId([3; 32]), WriteId([4; 32]));
        let put = |q: &QueueId, g: WriteId, n: u8| {
            let (id, data) = chunk(n);
            store.put(q, &g, &id, 100, &data).unwrap()
        };
        for n in 0..3 {
            assert_eq!(put(&q1, a, n), ChunkPut::Stored);
        }
        assert_eq!(
            put(&q1, a, 3),
            ChunkPut::QuotaExceeded,
            "capability a is full"
        );
        assert_eq!(put(&q1, b, 4), ChunkPut::Stored);
        assert_eq!(put(&q1, b, 5), ChunkPut::Stored);
        assert_eq!(put(&q1, b, 6), ChunkPut::QuotaExceeded, "queue 1 is full");
        for n in 7..10 {
            assert_eq!(put(&q2, WriteId([n; 32]), n), ChunkPut::Stored);
        }
        assert_eq!(
            put(&q2, WriteId([10; 32]), 10),
            ChunkPut::Full,
            "the store is full"
        );
        // Deleting makes room again.
        let (id, _) = chunk(0);
        assert_eq!(store.delete(&q1, &[id, id]).unwrap(), 1);
        assert_eq!(put(&q2, WriteId([10; 32]), 10), ChunkPut::Stored);
    }

    #[test]
    fn expired_damaged_and_stray_files_go() {
        let dir = tempfile::tempdir().unwrap();
        let (q, g) = (QueueId([1; 32]), WriteId([2; 32]));
        let store = ChunkStore::open(dir.path(), LIMITS).unwrap();
        let (soon, d1) = chunk(1);
        let (later, d2) = chunk(2);
        store.put(&q, &g, &soon, 100, &d1).unwrap();
        store.put(&q, &g, &later, 200, &d2).unwrap();
        assert_eq!(store.expire(150, 10).unwrap(), 1);
        assert_eq!(store.has(&q, &[soon, later]).unwrap(), vec![false, true]);
        // A byte flipped on disk: not served, and gone.
        let path = store.chunk_path(&q, &later);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert_eq!(store.get(&q, &later).unwrap(), None);
        assert_eq!(store.stats(), ChunkStats::default());
        assert!(!path.exists());
        drop(store);
        // A temporary file a crash left behind is removed when its queue is read.
        let stray = dir.path().join(hex(&q.0)).join(".tmp-0011223344556677");
        fs::create_dir_all(stray.parent().unwrap()).unwrap();
        fs::write(&stray, b"half").unwrap();
        let store = ChunkStore::open(dir.path(), LIMITS).unwrap();
        assert_eq!(store.has(&q, &[later]).unwrap(), vec![false]);
        assert!(!stray.exists());
    }
}
