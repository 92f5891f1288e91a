//! The durable store on sled 0.34, with group commit.
//!
//! Two trees. `queues` holds one key per envelope, in the order fetches read a queue;
//! `registry` holds the queues and the write capabilities granted to them:
//!
//! ```text
//! queues:   'm' ‖ queue(32) ‖ cursor(8)   → write_id(32) ‖ envelope_id(32) ‖ expires_at(8)
//!                                           ‖ body: segment(4) ‖ offset(4) ‖ length(4)
//! registry: 'q' ‖ queue(32)               → grants(4)
//!           'g' ‖ write_id(32)            → queue(32) ‖ kind(1)
//! ```
//!
//! The encoded envelopes themselves are in the segment files of [`Bodies`], beside the
//! database: sled replays everything written since its last start when it opens, so it
//! holds only these small records (a relay holding a million envelopes opens in well
//! under a second). The envelope id is the hash of the body, so a damaged body is found
//! when read, and its record removed.
//!
//! Finding an envelope by id (duplicates, deletes) and by expiry time goes through the
//! in-memory [`Index`], rebuilt from the records, so a put writes only its body and
//! its record. The
//! store serves as soon as sled has opened: a queue is indexed the first time a put or
//! delete names it, and a background walk indexes the others. Until the walk is done,
//! expiry covers the queues indexed so far and the relay-wide cap counts only them (the
//! free-space floor, which does not depend on the index, holds throughout). (The `mailboxes` tree of protocol version 1, keyed by mailboxes that
//! named their owner, is dropped on open: nothing in it can be read under version 2.)
//!
//! Every write is one key, inserted or removed alone: never a sled batch or transaction.
//! In sled 0.34 those take a process-wide lock that waits for any flush in progress (a
//! put would wait out the group commit's fsync) and seal the log buffer each time. No
//! write here needs several keys at once: a put partly written before a crash was not
//! acknowledged, and when its sender puts it again the written part comes back as
//! duplicates.
//!
//! Cursors come from sled's persistent monotonic id generator, so they keep increasing
//! across restarts and crashes. sled's own periodic flush is off: durability comes only
//! from [`GroupCommit`], which runs one `flush` for every put waiting when it starts.
//! No task outlives the store, so dropping it releases the database (and its lock).

use std::ops::Bound;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kkachi_protocol::wire::StoredEnvelope;
use kkachi_protocol::{Envelope, EnvelopeId, QueueId, QueueKind, WriteId};
use parking_lot::Mutex;
use tokio::sync::watch;

use super::bodies::{Bodies, BodyRef, ReadError};
use super::index::{Entry, Index};
use super::{Fetched, Granted, Limits, MailboxStore, Placed, PutResult, StoreError, StoreStats};

const MAIL: u8 = b'm';
const QUEUE: u8 = b'q';
const GRANT: u8 = b'g';
/// The store epoch's key in the registry (no queue or grant key is one byte long).
const EPOCH_KEY: &[u8] = b"e";
/// The tree of protocol version 1, dropped on open.
const OLD_TREE: &str = "mailboxes";
/// Where the body segments are, inside the store's directory.
const BODIES_DIR: &str = "bodies";
/// A body segment is finished at this size.
const SEGMENT_BYTES: u64 = 64 << 20;
/// A finished segment is rewritten once this share of it (percent) is dead...
const SPARSE_PCT: u64 = 50;
/// ... and at least this part of a segment's size (divisor).
const SPARSE_MIN_DEAD_DIV: u64 = 4;
/// How often reclaiming looks for empty segments, and how often at most it reads every
/// record to move live bodies out of sparse ones.
const RECLAIM_EVERY: Duration = Duration::from_secs(1);
const MOVE_EVERY: Duration = Duration::from_secs(10);

/// How a store runs its background work (tests turn parts off).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options {
    /// Index every queue in the background after opening.
    pub(crate) walk: bool,
    /// Reclaim body segments in the background.
    pub(crate) reclaim: bool,
    /// The size at which a body segment is finished.
    pub(crate) segment_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            walk: true,
            reclaim: true,
            segment_bytes: SEGMENT_BYTES,
        }
    }
}

/// Called with the duration of every flush (for metrics).
pub type FlushObserver = Arc<dyn Fn(Duration) + Send + Sync>;

/// Durable mailbox store in a sled database directory.
///
/// sled 0.34 cannot continue after a failed write to its log (a full disk, an I/O
/// error): later operations fail or block. The store then reports itself failed
/// ([`MailboxStore::fatal`]) so the relay stops cleanly and its supervisor restarts it;
/// on open, sled recovers everything that was ever flushed, which is everything that
/// was acknowledged.
#[derive(Clone)]
pub struct SledStore {
    /// The first storage failure, once one happened.
    failed: Arc<Mutex<Option<String>>>,
    db: sled::Db,
    tree: sled::Tree,
    registry: sled::Tree,
    limits: Limits,
    /// Queues open (records in `registry`).
    queues: Arc<AtomicU64>,
    /// Held envelopes by id and expiry, and per-mailbox usage. Every change to the tree
    /// happens under this lock, so concurrent puts of one envelope store it once and
    /// the index always matches the tree.
    index: Arc<Mutex<Index>>,
    /// The envelopes' bodies.
    bodies: Arc<Bodies>,
    commit: Arc<GroupCommit>,
    /// Chosen when the database was created ([`MailboxStore::epoch`]).
    epoch: u64,
    /// True once every queue is indexed.
    indexed: Arc<watch::Sender<bool>>,
    /// The background walk indexing the queues (stopped and joined with the last clone).
    _walk: Arc<Background>,
    /// The background thread reclaiming body segments (likewise).
    _reclaim: Arc<Background>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("limits", &self.limits)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn io(e: impl std::fmt::Display) -> StoreError {
    let text = e.to_string();
    // ENOSPC surfaces from sled as an io::Error whose text names it.
    if text.contains("No space left") || text.contains("os error 28") {
        StoreError::Full
    } else {
        StoreError::Io(text)
    }
}

fn mail_key(mailbox: &QueueId, cursor: u64) -> [u8; 41] {
    let mut k = [0u8; 41];
    k[0] = MAIL;
    k[1..33].copy_from_slice(&mailbox.0);
    k[33..].copy_from_slice(&cursor.to_be_bytes());
    k
}

/// The mailbox and cursor in a mail key.
fn parse_mail_key(key: &[u8]) -> Result<(QueueId, u64), StoreError> {
    let key: &[u8; 41] = key
        .try_into()
        .map_err(|_| StoreError::Corrupt("mail key has the wrong length".into()))?;
    Ok((
        QueueId(key[1..33].try_into().expect("32 bytes")),
        u64::from_be_bytes(key[33..].try_into().expect("8 bytes")),
    ))
}

/// What is wrong with a body.
#[derive(Debug)]
enum Damage {
    /// Its segment is not there (the body may have moved).
    Gone,
    /// It does not match its id, or cannot be read.
    Wrong(String),
}

/// An envelope's record in the `queues` tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    grant: WriteId,
    id: EnvelopeId,
    expires_at: u64,
    body: BodyRef,
}

impl Record {
    const LEN: usize = 32 + 32 + 8 + BodyRef::LEN;

    fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..32].copy_from_slice(&self.grant.0);
        out[32..64].copy_from_slice(&self.id.0);
        out[64..72].copy_from_slice(&self.expires_at.to_be_bytes());
        out[72..].copy_from_slice(&self.body.encode());
        out
    }

    fn decode(v: &[u8]) -> Result<Self, StoreError> {
        let v: &[u8; Self::LEN] = v
            .try_into()
            .map_err(|_| StoreError::Corrupt("an envelope record has the wrong length".into()))?;
        Ok(Self {
            grant: WriteId(v[..32].try_into().expect("32 bytes")),
            id: EnvelopeId(v[32..64].try_into().expect("32 bytes")),
            expires_at: u64::from_be_bytes(v[64..72].try_into().expect("8 bytes")),
            body: BodyRef::decode(v[72..].try_into().expect("12 bytes")),
        })
    }

    fn entry(&self, mailbox: QueueId, cursor: u64) -> Entry {
        Entry {
            id: self.id,
            mailbox,
            grant: self.grant,
            cursor,
            expires_at: self.expires_at,
            bytes: u64::from(self.body.len),
        }
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. Must be called inside a tokio runtime:
    /// it starts the group-commit task.
    pub fn open(
        dir: &Path,
        limits: Limits,
        cache_bytes: u64,
        on_flush: Option<FlushObserver>,
    ) -> Result<Self, StoreError> {
        Self::open_with(dir, limits, cache_bytes, on_flush, Options::default())
    }

    /// [`open`](Self::open), with the background walk and reclaiming on or off (off,
    /// queues are indexed only when a put or delete names them, and segments are
    /// reclaimed only by [`reclaim`](Self::reclaim): for tests), and segments of
    /// `segment_bytes`.
    pub(crate) fn open_with(
        dir: &Path,
        limits: Limits,
        cache_bytes: u64,
        on_flush: Option<FlushObserver>,
        options: Options,
    ) -> Result<Self, StoreError> {
        let Options {
            walk,
            reclaim,
            segment_bytes,
        } = options;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(None)
            .open()
            .map_err(io)?;
        if db.tree_names().iter().any(|n| n == OLD_TREE.as_bytes()) {
            db.drop_tree(OLD_TREE).map_err(io)?;
            db.flush().map_err(io)?;
            tracing::info!("dropped the mailboxes of protocol version 1");
        }
        let tree = db.open_tree("queues").map_err(io)?;
        let bodies = Arc::new(Bodies::open(&dir.join(BODIES_DIR), segment_bytes)?);
        let registry = db.open_tree("registry").map_err(io)?;
        let epoch = match registry.get(EPOCH_KEY).map_err(io)? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("store epoch has the wrong length".into()))?,
            ),
            None => {
                // A new database (or one from before epochs): a new epoch, durable
                // before anything is acknowledged.
                let epoch = rand::random::<u64>() | 1;
                registry
                    .insert(EPOCH_KEY, &epoch.to_be_bytes())
                    .map_err(io)?;
                db.flush().map_err(io)?;
                epoch
            }
        };
        let queues = registry.scan_prefix([QUEUE]).count() as u64;
        let index = Arc::new(Mutex::new(Index::rebuilding()));
        let failed = Arc::default();
        let indexed = Arc::new(watch::channel(false).0);
        let commit = GroupCommit::new(db.clone(), Arc::clone(&bodies), on_flush);
        let store = Self {
            failed,
            db,
            tree,
            registry,
            limits,
            queues: Arc::new(AtomicU64::new(queues)),
            index,
            bodies,
            commit,
            epoch,
            indexed,
            _walk: Arc::new(Background::default()),
            _reclaim: Arc::new(Background::default()),
        };
        let walker = store.clone();
        let reclaimer = store.clone();
        Ok(Self {
            _walk: Arc::new(if walk {
                Background::start("kkachi-index", move |stop| walker.walk_all(stop))
            } else {
                Background::default()
            }),
            _reclaim: Arc::new(if reclaim {
                Background::start("kkachi-reclaim", move |stop| reclaimer.reclaim_loop(stop))
            } else {
                Background::default()
            }),
            ..store
        })
    }

    /// Whether every queue held is indexed (expiry and the relay-wide cap cover
    /// everything).
    pub fn indexed(&self) -> bool {
        *self.indexed.borrow()
    }

    /// Waits until every queue held is indexed, or the walk stopped on a storage failure
    /// (then returns that failure).
    pub async fn wait_indexed(&self) -> Result<(), StoreError> {
        let mut rx = self.indexed.subscribe();
        loop {
            if *rx.borrow_and_update() {
                return Ok(());
            }
            if let Some(why) = self.fatal() {
                return Err(StoreError::Io(why));
            }
            // The walk also wakes us when it stops on a failure.
            if rx.changed().await.is_err() {
                return Err(StoreError::Io("the store was closed".into()));
            }
        }
    }

    /// Indexes `queue` if it is not yet: reads its envelopes without holding the index
    /// lock (a queue's keys change only once it is indexed, so what is read stays
    /// true), then adds them unless someone else did meanwhile.
    fn ensure_indexed(&self, queue: &QueueId) -> Result<(), StoreError> {
        if self.index.lock().is_loaded(queue) {
            return Ok(());
        }
        let found = read_queue(&self.tree, queue, &AtomicBool::new(false))?;
        self.add_queue(queue, found)
    }

    /// Adds what [`read_queue`] found in `queue` to the index and counts its bodies
    /// alive, unless the queue was indexed meanwhile. A second copy of an id (which puts
    /// never write) and damaged records are removed.
    fn add_queue(&self, queue: &QueueId, found: Found) -> Result<(), StoreError> {
        let mut index = self.index.lock();
        if index.is_loaded(queue) {
            return Ok(());
        }
        for key in &found.corrupt {
            self.tree.remove(key).map_err(io)?;
        }
        let entries: Vec<Entry> = found
            .records
            .iter()
            .map(|(c, r)| r.entry(*queue, *c))
            .collect();
        let extra = index.load(*queue, &entries);
        for (_, record) in &found.records {
            self.bodies.count(record.body);
        }
        if !extra.is_empty() {
            tracing::warn!(
                envelopes = extra.len(),
                "removing second copies of stored envelopes"
            );
            for cursor in extra {
                if let Some(v) = self.tree.remove(mail_key(queue, cursor)).map_err(io)? {
                    self.bodies.release(Record::decode(&v)?.body);
                }
            }
        }
        Ok(())
    }

    /// Removes the record at `cursor` in `queue` if it still names `body`: its body is
    /// damaged or missing. Indexes the queue first, so what it holds stays counted
    /// right. Returns whether it was removed.
    fn drop_damaged(
        &self,
        queue: &QueueId,
        cursor: u64,
        body: BodyRef,
    ) -> Result<bool, StoreError> {
        self.ensure_indexed(queue)?;
        let mut index = self.index.lock();
        self.drop_locked(&mut index, queue, cursor, body)
    }

    /// [`drop_damaged`](Self::drop_damaged) with the index lock held and the queue
    /// indexed.
    fn drop_locked(
        &self,
        index: &mut Index,
        queue: &QueueId,
        cursor: u64,
        body: BodyRef,
    ) -> Result<bool, StoreError> {
        let key = mail_key(queue, cursor);
        let Some(value) = self.tree.get(key).map_err(io)? else {
            return Ok(false);
        };
        let record = Record::decode(&value)?;
        if record.body != body {
            return Ok(false);
        }
        self.tree.remove(key).map_err(io)?;
        self.bodies.release(body);
        index.remove(&record.id, queue, &record.grant, u64::from(body.len));
        Ok(true)
    }

    /// The body a record names, checked against its id; what is wrong with it
    /// otherwise. A read error counts as damage: one bad body must not fail every
    /// fetch of its queue.
    fn checked_body(&self, record: &Record) -> Result<Vec<u8>, Damage> {
        match self.bodies.read(record.body) {
            Ok(bytes) if EnvelopeId::of_encoding(&bytes) == record.id => Ok(bytes),
            Ok(_) => Err(Damage::Wrong("does not match its id".into())),
            Err(ReadError::Gone) => Err(Damage::Gone),
            Err(ReadError::Io(e)) => Err(Damage::Wrong(format!("cannot be read: {e}"))),
        }
    }

    /// The envelope a record names, read from its segment and checked against its id:
    /// `None` when its body is damaged or gone (the record is then removed), or when
    /// the record moved meanwhile and is gone too.
    fn read_body(
        &self,
        queue: &QueueId,
        cursor: u64,
        mut record: Record,
    ) -> Result<Option<Envelope>, StoreError> {
        // A body moved by reclaiming: its old segment may be gone by the time it is
        // read; the record then names the new place. Twice is enough: a segment is
        // only reclaimed after everything moved out of it is durable.
        for _ in 0..3 {
            let problem = match self.checked_body(&record) {
                Ok(bytes) => match Envelope::decode(&bytes) {
                    Ok(envelope) => return Ok(Some(envelope)),
                    Err(e) => format!("does not decode: {e}"),
                },
                Err(Damage::Wrong(problem)) => problem,
                Err(Damage::Gone) => {
                    match self.tree.get(mail_key(queue, cursor)).map_err(io)? {
                        None => return Ok(None),
                        Some(v) => {
                            let now = Record::decode(&v)?;
                            if now.body != record.body {
                                record = now;
                                continue;
                            }
                        }
                    }
                    "is missing".to_string()
                }
            };
            tracing::error!(
                cursor,
                problem,
                "a stored envelope's body is damaged; it is removed"
            );
            self.drop_damaged(queue, cursor, record.body)?;
            return Ok(None);
        }
        Ok(None)
    }

    /// Whether the envelope `id` held in `queue` at `cursor` is whole. One that is not
    /// (a record that reached the disk without its body in a power loss, before it was
    /// acknowledged) is removed, so a put of it again stores it.
    fn held_whole(
        &self,
        index: &mut Index,
        queue: &QueueId,
        cursor: u64,
    ) -> Result<bool, StoreError> {
        let Some(value) = self.tree.get(mail_key(queue, cursor)).map_err(io)? else {
            return Ok(true);
        };
        let record = Record::decode(&value)?;
        match self.checked_body(&record) {
            Ok(_) => Ok(true),
            Err(damage) => {
                tracing::error!(
                    cursor,
                    ?damage,
                    "a stored envelope put again has a damaged body; it is stored again"
                );
                self.drop_locked(index, queue, cursor, record.body)?;
                Ok(false)
            }
        }
    }

    fn insert_envelopes(&self, envelopes: &[Placed]) -> Result<Vec<PutResult>, StoreError> {
        let mut index = self.index.lock();
        let mut results = Vec::with_capacity(envelopes.len());
        for placed in envelopes {
            let envelope = &placed.envelope;
            let bytes = envelope.encode();
            let id = EnvelopeId::of_encoding(&bytes);
            if let Some(slot) = index.locate(&placed.queue, &id)
                && self.held_whole(&mut index, &placed.queue, slot.cursor)?
            {
                results.push(PutResult::Duplicate);
                continue;
            }
            // Cursor 0 means "from the start", so stored cursors begin at 1.
            let cursor = self.db.generate_id().map_err(io)? + 1;
            let entry = Entry {
                id,
                mailbox: placed.queue,
                grant: placed.grant,
                cursor,
                expires_at: envelope.expires_at,
                bytes: bytes.len() as u64,
            };
            if !index.fits_total(entry.bytes, self.limits.total) {
                results.push(PutResult::RelayFull);
                continue;
            }
            if !index.try_add(entry, self.limits.of(placed.kind)) {
                results.push(PutResult::QuotaExceeded);
                continue;
            }
            let body = match self.bodies.append(&bytes) {
                Ok(body) => body,
                Err(e) => {
                    index.remove(&entry.id, &entry.mailbox, &entry.grant, entry.bytes);
                    return Err(e);
                }
            };
            let record = Record {
                grant: placed.grant,
                id,
                expires_at: envelope.expires_at,
                body,
            };
            // One key at a time, never a batch (see the module docs). Those written
            // before a failure stay, and the index keeps them.
            if let Err(e) = self
                .tree
                .insert(mail_key(&placed.queue, cursor), &record.encode()[..])
            {
                index.remove(&entry.id, &entry.mailbox, &entry.grant, entry.bytes);
                self.bodies.release(body);
                return Err(io(e));
            }
            results.push(PutResult::Stored { cursor });
        }
        Ok(results)
    }
}

/// What a queue holds, read from the tree.
#[derive(Default)]
struct Found {
    /// Cursor and record of each envelope.
    records: Vec<(u64, Record)>,
    /// Keys of records that do not decode (damaged on disk): they are removed, since
    /// no fetch could return them.
    corrupt: Vec<sled::IVec>,
}

/// Every envelope of `queue` in the tree, as index entries. Gives up (with what it has)
/// when `stop` is set.
fn read_queue(tree: &sled::Tree, queue: &QueueId, stop: &AtomicBool) -> Result<Found, StoreError> {
    let mut found = Found::default();
    let mut prefix = [0u8; 33];
    prefix[0] = MAIL;
    prefix[1..].copy_from_slice(&queue.0);
    for (n, item) in tree.scan_prefix(prefix).enumerate() {
        if n % 1024 == 1023 && stop.load(Ordering::Relaxed) {
            break;
        }
        let (key, value) = item.map_err(io)?;
        let decoded =
            parse_mail_key(&key).and_then(|(_, cursor)| Ok((cursor, Record::decode(&value)?)));
        match decoded {
            Ok(d) => found.records.push(d),
            Err(e) => {
                tracing::error!(error = %e, "a stored envelope record is damaged; it is removed");
                found.corrupt.push(key);
            }
        }
    }
    Ok(found)
}

/// A background thread of the store, stopped and joined when dropped.
#[derive(Default)]
struct Background {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Background {
    fn start(name: &str, run: impl FnOnce(&AtomicBool) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || run(&stop)
            })
            .expect("spawn a store thread");
        Self {
            stop,
            thread: Mutex::new(Some(thread)),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.lock().take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// What one round of reclaiming did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reclaimed {
    /// Whether every record was read to move bodies out of sparse segments.
    pub(crate) scanned: bool,
    /// Live bodies moved out of sparse segments.
    pub(crate) moved: u64,
    /// Segments removed.
    pub(crate) segments: u64,
    /// Bytes of segment files removed.
    pub(crate) bytes: u64,
}

impl SledStore {
    /// The background walk: indexes every queue after the store opens.
    fn walk_all(&self, stop: &AtomicBool) {
        let started = Instant::now();
        let walked =
            std::panic::catch_unwind(AssertUnwindSafe(|| self.walk(stop))).unwrap_or_else(|_| {
                Err(StoreError::Io(
                    "indexing the stored envelopes panicked".into(),
                ))
            });
        match walked {
            Ok(true) => {
                let totals = {
                    let mut index = self.index.lock();
                    index.loaded_all();
                    index.totals()
                };
                tracing::info!(
                    envelopes = totals.envelopes,
                    queues = totals.mailboxes,
                    ms = started.elapsed().as_millis() as u64,
                    "indexed the stored envelopes"
                );
                self.indexed.send_replace(true);
            }
            Ok(false) => {}
            Err(e) => {
                self.note(e);
                // Wakes anyone waiting for the index, to see the failure.
                self.indexed.send_replace(false);
            }
        }
    }

    /// Indexes every queue in key order; false if stopped first.
    fn walk(&self, stop: &AtomicBool) -> Result<bool, StoreError> {
        let mut from = Bound::Included(vec![MAIL]);
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let Some(item) = self
                .tree
                .range::<Vec<u8>, _>((from, Bound::Unbounded))
                .next()
            else {
                return Ok(true);
            };
            let (key, _) = item.map_err(io)?;
            if key.first() != Some(&MAIL) {
                return Ok(true);
            }
            let (queue, _) = parse_mail_key(&key)?;
            if !self.index.lock().is_loaded(&queue) {
                let found = read_queue(&self.tree, &queue, stop)?;
                if stop.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                self.add_queue(&queue, found)?;
            }
            from = Bound::Excluded(mail_key(&queue, u64::MAX).to_vec());
        }
    }

    /// The background reclaiming: every [`RECLAIM_EVERY`] once the store is indexed,
    /// moving bodies at most every [`MOVE_EVERY`]. Stops on a storage failure (which
    /// stops the relay).
    fn reclaim_loop(&self, stop: &AtomicBool) {
        let mut last_move: Option<Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            std::thread::park_timeout(RECLAIM_EVERY);
            if stop.load(Ordering::Relaxed) || !self.indexed() || self.fatal().is_some() {
                continue;
            }
            let may_move = last_move.is_none_or(|t| t.elapsed() >= MOVE_EVERY);
            match std::panic::catch_unwind(AssertUnwindSafe(|| self.reclaim_round(may_move))) {
                Ok(Ok(done)) => {
                    if done.scanned {
                        last_move = Some(Instant::now());
                    }
                    if done.segments > 0 {
                        let (on_disk, live) = self.bodies.usage();
                        tracing::info!(
                            segments = done.segments,
                            freed = done.bytes,
                            moved = done.moved,
                            on_disk,
                            live,
                            "reclaimed body segments"
                        );
                    }
                }
                Ok(Err(e)) => {
                    self.note(e);
                    return;
                }
                Err(_) => {
                    self.note(StoreError::Io("reclaiming body segments panicked".into()));
                    return;
                }
            }
        }
    }

    /// Bytes in body segment files, and of those alive.
    #[cfg(test)]
    pub(crate) fn body_usage(&self) -> (u64, u64) {
        self.bodies.usage()
    }

    /// Reclaims what can be now: removes finished segments holding nothing alive and,
    /// when `move_bodies`, moves the live bodies out of mostly dead ones and removes
    /// those too. Does nothing until every queue is indexed (what is alive is counted
    /// from the records).
    pub(crate) fn reclaim_round(&self, move_bodies: bool) -> Result<Reclaimed, StoreError> {
        let mut done = Reclaimed::default();
        if !self.indexed() {
            return Ok(done);
        }
        let plan = self.bodies.plan(
            SPARSE_PCT,
            self.bodies.segment_bytes() / SPARSE_MIN_DEAD_DIV,
        );
        let mut segments = plan.empty;
        // One sparse segment a round: the space a move takes first stays small.
        if move_bodies && let Some(&sparse) = plan.sparse.first() {
            done.scanned = true;
            done.moved = self.move_bodies_out(sparse)?;
            segments.push(sparse);
        }
        if segments.is_empty() {
            return Ok(done);
        }
        // What was moved, and the removal of every record that named these segments,
        // must be durable before they go: after a crash, no record names them. A
        // segment still holding something (a move cut short) stays.
        self.bodies.sync()?;
        self.db.flush().map_err(io)?;
        (done.segments, done.bytes) = self.bodies.remove_empty(&segments);
        Ok(done)
    }

    /// Copies every live body in `segment` to the end of the log, makes the copies
    /// durable, then points their records there; returns how many moved. A damaged
    /// body's record is removed. If the disk fills meanwhile, nothing is moved (the
    /// copies are dead space) and the store goes on.
    fn move_bodies_out(&self, segment: u32) -> Result<u64, StoreError> {
        let mut candidates = Vec::new();
        for item in self.tree.scan_prefix([MAIL]) {
            let (key, value) = item.map_err(io)?;
            let Ok(record) = Record::decode(&value) else {
                continue;
            };
            if record.body.segment == segment {
                candidates.push((parse_mail_key(&key)?, record));
            }
        }
        let mut copies = Vec::with_capacity(candidates.len());
        for ((queue, cursor), record) in candidates {
            let bytes = match self.checked_body(&record) {
                Ok(bytes) => bytes,
                Err(damage) => {
                    tracing::error!(
                        cursor,
                        ?damage,
                        "a stored envelope's body is damaged; it is removed"
                    );
                    self.drop_damaged(&queue, cursor, record.body)?;
                    continue;
                }
            };
            match self.bodies.append(&bytes) {
                Ok(copy) => copies.push((queue, cursor, record, copy)),
                Err(e) => {
                    tracing::warn!(error = %e, "moving envelope bodies stopped; the segment stays");
                    for (_, _, _, copy) in copies {
                        self.bodies.release(copy);
                    }
                    return Ok(0);
                }
            }
        }
        // The copies are on disk before any record names them.
        self.bodies.sync()?;
        let mut moved = 0;
        for (queue, cursor, record, copy) in copies {
            // Under the index lock, as every change to the tree: the record is moved
            // only if it is still there, unchanged.
            let _index = self.index.lock();
            let key = mail_key(&queue, cursor);
            match self.tree.get(key).map_err(io)? {
                Some(v) if Record::decode(&v)? == record => {}
                _ => {
                    self.bodies.release(copy);
                    continue;
                }
            }
            let now = Record {
                body: copy,
                ..record
            };
            if let Err(e) = self.tree.insert(key, &now.encode()[..]) {
                self.bodies.release(copy);
                return Err(io(e));
            }
            self.bodies.release(record.body);
            moved += 1;
        }
        Ok(moved)
    }
}

/// The body length a stored record names (0 for a damaged one), for fetch's byte limit.
fn record_len(value: &[u8]) -> usize {
    Record::decode(value).map_or(0, |r| r.body.len as usize)
}

fn registry_key(family: u8, id: &[u8; 32]) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = family;
    k[1..].copy_from_slice(id);
    k
}

/// A queue record: how many capabilities it grants.
/// A queue record: how many capabilities the queue grants, and a last byte 1 for a
/// group queue (absent for the others).
fn queue_record(count: u32, group: bool) -> Vec<u8> {
    let mut v = count.to_be_bytes().to_vec();
    if group {
        v.push(1);
    }
    v
}

fn parse_queue_record(v: &[u8]) -> Result<(u32, bool), StoreError> {
    let corrupt = || StoreError::Corrupt("queue record".into());
    let (count, group) = match v {
        [a, b, c, d] => ([*a, *b, *c, *d], false),
        [a, b, c, d, 1] => ([*a, *b, *c, *d], true),
        _ => return Err(corrupt()),
    };
    Ok((u32::from_be_bytes(count), group))
}

/// A grant record: the queue and the capability's kind.
fn grant_record(queue: &QueueId, kind: QueueKind) -> [u8; 33] {
    let mut v = [0u8; 33];
    v[..32].copy_from_slice(&queue.0);
    v[32] = kind.to_u8();
    v
}

fn parse_grant_record(v: &[u8]) -> Result<(QueueId, QueueKind), StoreError> {
    let corrupt = || StoreError::Corrupt("grant record".into());
    let v: &[u8; 33] = v.try_into().map_err(|_| corrupt())?;
    let kind = QueueKind::from_u8(v[32]).ok_or_else(corrupt)?;
    Ok((QueueId(v[..32].try_into().expect("32 bytes")), kind))
}

/// Records a storage failure (the first one wins) and passes the error on.
fn record_failure(failed: &Mutex<Option<String>>, e: StoreError) -> StoreError {
    let mut failed = failed.lock();
    if failed.is_none() {
        tracing::error!(error = %e, "storage failed; the relay stops so it can be restarted cleanly");
        *failed = Some(e.to_string());
    }
    e
}

impl SledStore {
    /// Records a storage failure (the first one wins) and passes the error on.
    fn note(&self, e: StoreError) -> StoreError {
        record_failure(&self.failed, e)
    }
}

impl MailboxStore for SledStore {
    fn insert(&self, envelopes: &[Placed]) -> Result<Vec<PutResult>, StoreError> {
        if let Some(why) = self.failed.lock().clone() {
            return Err(if why.contains("full") {
                StoreError::Full
            } else {
                StoreError::Io(why)
            });
        }
        for (i, placed) in envelopes.iter().enumerate() {
            if !envelopes[..i].iter().any(|p| p.queue == placed.queue) {
                self.ensure_indexed(&placed.queue)
                    .map_err(|e| self.note(e))?;
            }
        }
        self.insert_envelopes(envelopes).map_err(|e| self.note(e))
    }

    fn fatal(&self) -> Option<String> {
        self.failed.lock().clone()
    }

    fn fetch(
        &self,
        mailbox: &QueueId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Fetched, StoreError> {
        let start = mail_key(mailbox, after.saturating_add(1));
        let end = mail_key(mailbox, u64::MAX);
        let mut items = Vec::new();
        let mut bytes = 0usize;
        let mut more = false;
        for item in self.tree.range(start..=end) {
            let (key, value) = item.map_err(io)?;
            if items.len() >= limit || (!items.is_empty() && bytes + record_len(&value) > max_bytes)
            {
                more = true;
                break;
            }
            let (_, cursor) = parse_mail_key(&key)?;
            let record = match Record::decode(&value) {
                Ok(record) => record,
                Err(e) => {
                    tracing::error!(error = %e, cursor, "a stored envelope record is damaged; it is skipped");
                    continue;
                }
            };
            let Some(envelope) = self.read_body(mailbox, cursor, record)? else {
                continue;
            };
            bytes += record.body.len as usize;
            items.push(StoredEnvelope { cursor, envelope });
        }
        let next = items.last().map_or(after, |i| i.cursor);
        Ok(Fetched { items, next, more })
    }

    fn delete(&self, mailbox: &QueueId, ids: &[EnvelopeId]) -> Result<u32, StoreError> {
        self.ensure_indexed(mailbox).map_err(|e| self.note(e))?;
        let mut index = self.index.lock();
        let mut removed = 0;
        for id in ids {
            let Some(slot) = index.locate(mailbox, id) else {
                continue;
            };
            let key = mail_key(mailbox, slot.cursor);
            let Some(value) = self.tree.remove(key).map_err(io)? else {
                continue;
            };
            let record = Record::decode(&value)?;
            self.bodies.release(record.body);
            index.remove(id, mailbox, &record.grant, u64::from(record.body.len));
            removed += 1;
        }
        Ok(removed)
    }

    fn expire(&self, now: u64, max: usize) -> Result<usize, StoreError> {
        let mut index = self.index.lock();
        let mut removed = 0;
        for due in index.due(now, max) {
            let key = mail_key(&due.mailbox, due.cursor);
            match self.tree.remove(key).map_err(io)? {
                Some(value) => {
                    let record = Record::decode(&value)?;
                    self.bodies.release(record.body);
                    let bytes = u64::from(record.body.len);
                    if !index.remove(&record.id, &due.mailbox, &record.grant, bytes) {
                        index.forget_expiry(&due);
                    }
                    removed += 1;
                }
                None => index.forget_expiry(&due),
            }
        }
        Ok(removed)
    }

    fn stats(&self) -> StoreStats {
        self.index.lock().totals()
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn route(&self, write: &WriteId) -> Result<Option<(QueueId, QueueKind)>, StoreError> {
        self.registry
            .get(registry_key(GRANT, &write.0))
            .map_err(io)?
            .map(|v| parse_grant_record(&v))
            .transpose()
    }

    fn grant(
        &self,
        queue: &QueueId,
        kind: QueueKind,
        ids: &[WriteId],
        max: u32,
    ) -> Result<Granted, StoreError> {
        // The index lock serialises every change to the registry as well.
        let _guard = self.index.lock();
        let qkey = registry_key(QUEUE, &queue.0);
        let ((count, group), new_queue) = match self.registry.get(qkey).map_err(io)? {
            Some(v) => (parse_queue_record(&v)?, false),
            None => ((0, kind == QueueKind::Group), true),
        };
        if group != (kind == QueueKind::Group) {
            return Ok(Granted::OtherKind);
        }
        let mut new = Vec::new();
        for id in ids {
            match self.registry.get(registry_key(GRANT, &id.0)).map_err(io)? {
                Some(v) if parse_grant_record(&v)?.0 != *queue => return Ok(Granted::Conflict),
                Some(_) => {}
                None if !new.contains(id) => new.push(*id),
                None => {}
            }
        }
        let total = count.saturating_add(new.len() as u32);
        if total > max {
            return Ok(Granted::Full(count));
        }
        // The grants first and the count last: a write that fails between them leaves
        // the count low (a few more grants allowed), never high (a queue refusing
        // grants it has room for).
        for id in new {
            self.registry
                .insert(registry_key(GRANT, &id.0), &grant_record(queue, kind)[..])
                .map_err(|e| self.note(io(e)))?;
        }
        self.registry
            .insert(qkey, queue_record(total, group))
            .map_err(|e| self.note(io(e)))?;
        if new_queue {
            self.queues.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Granted::Held(total))
    }

    fn revoke(&self, queue: &QueueId, ids: &[WriteId]) -> Result<u32, StoreError> {
        let _guard = self.index.lock();
        let qkey = registry_key(QUEUE, &queue.0);
        let Some(record) = self.registry.get(qkey).map_err(io)? else {
            return Ok(0);
        };
        let (count, group) = parse_queue_record(&record)?;
        let mut removed = 0u32;
        for id in ids {
            let key = registry_key(GRANT, &id.0);
            let Some(v) = self.registry.get(key).map_err(io)? else {
                continue;
            };
            if parse_grant_record(&v)?.0 == *queue {
                self.registry.remove(key).map_err(|e| self.note(io(e)))?;
                removed += 1;
            }
        }
        let count = count.saturating_sub(removed);
        self.registry
            .insert(qkey, queue_record(count, group))
            .map_err(|e| self.note(io(e)))?;
        Ok(count)
    }

    fn has_queue(&self, queue: &QueueId) -> Result<bool, StoreError> {
        self.registry
            .contains_key(registry_key(QUEUE, &queue.0))
            .map_err(io)
    }

    fn is_group_queue(&self, queue: &QueueId) -> Result<bool, StoreError> {
        match self
            .registry
            .get(registry_key(QUEUE, &queue.0))
            .map_err(io)?
        {
            Some(v) => Ok(parse_queue_record(&v)?.1),
            None => Ok(false),
        }
    }

    fn queue_count(&self) -> u64 {
        self.queues.load(Ordering::Relaxed)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.commit.wait_durable().await.map_err(|e| self.note(e))
    }

    fn is_indexed(&self, queue: &QueueId) -> bool {
        self.index.lock().is_loaded(queue)
    }

    fn index_queue(&self, queue: &QueueId) -> Result<(), StoreError> {
        self.ensure_indexed(queue).map_err(|e| self.note(e))
    }
}

/// Progress of flushes: every ticket at or below `durable` is on disk; tickets above
/// it and at or below `failed` belong to a flush that failed.
#[derive(Debug, Clone, Copy, Default)]
struct FlushState {
    durable: u64,
    failed: u64,
    failed_full: bool,
    flushing: bool,
}

/// Records the end of the flush that covered tickets up to `target`.
fn finish_flush(state: &watch::Sender<FlushState>, target: u64, outcome: Result<(), bool>) {
    state.send_modify(|s| {
        s.flushing = false;
        match outcome {
            Ok(()) => s.durable = s.durable.max(target),
            Err(full) => {
                s.failed = s.failed.max(target);
                s.failed_full = full;
            }
        }
    });
}

/// Group commit without a background task: a caller takes a ticket after writing; if
/// no flush is running it starts one covering every ticket issued so far, otherwise it
/// waits for the running one and, if that started before its ticket, for the next.
struct GroupCommit {
    db: sled::Db,
    /// Synced before every flush: no durable record names a body that is not.
    bodies: Arc<Bodies>,
    issued: AtomicU64,
    state: Arc<watch::Sender<FlushState>>,
    on_flush: Option<FlushObserver>,
    /// Where flushes run (see [`flusher`]); `None` if its thread could not start, and
    /// then on the runtime's blocking threads.
    flusher: Option<std::sync::mpsc::SyncSender<FlushJob>>,
}

/// One flush, as the flushing thread runs it.
type FlushJob = Box<dyn FnOnce() + Send>;

/// How much less CPU priority the flushing thread has than the threads that serve
/// (a nice value). Not less: at 10, a relay saturated with single-envelope puts
/// starved its flushes and acknowledged half as many.
pub(super) const FLUSH_NICENESS: i32 = 5;

/// Starts the thread that runs the store's flushes, one after the other, at a lower CPU
/// priority than the threads serving peers (as RocksDB lowers its background threads):
/// a sync's own work (writing the pages out, the file system's bookkeeping) then yields
/// the processor to answering long polls and taking puts, instead of competing with
/// them on a small machine; what waits on a flush waits for the disk either way. It
/// ends when the store is dropped.
fn flusher() -> Option<std::sync::mpsc::SyncSender<FlushJob>> {
    // One flush runs at a time (`FlushState::flushing`): room for one is enough.
    let (jobs, queue) = std::sync::mpsc::sync_channel::<FlushJob>(1);
    let started = std::thread::Builder::new()
        .name("relay-flush".into())
        .spawn(move || {
            // On Linux a thread id names the thread alone; where lowering fails
            // (a sandbox forbids it), flushes run at the usual priority.
            #[cfg(target_os = "linux")]
            {
                let me = rustix::thread::gettid();
                if let Err(e) = rustix::process::setpriority_process(Some(me), FLUSH_NICENESS) {
                    tracing::debug!(error = %e, "cannot lower the flushing thread's priority");
                }
            }
            while let Ok(job) = queue.recv() {
                job();
            }
        });
    match started {
        Ok(_) => Some(jobs),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the flushing thread; flushing on the blocking pool");
            None
        }
    }
}

impl GroupCommit {
    fn new(db: sled::Db, bodies: Arc<Bodies>, on_flush: Option<FlushObserver>) -> Arc<Self> {
        Arc::new(Self {
            db,
            bodies,
            issued: AtomicU64::new(0),
            state: Arc::new(watch::channel(FlushState::default()).0),
            on_flush,
            flusher: flusher(),
        })
    }

    /// Starts a flush covering every ticket issued so far, unless one is running. The
    /// flush runs in its own task, so a caller that gives up does not stall the others.
    fn maybe_start_flush(self: &Arc<Self>) {
        let mut started = false;
        self.state.send_if_modified(|s| {
            if s.flushing {
                return false;
            }
            s.flushing = true;
            started = true;
            true
        });
        if !started {
            return;
        }
        let target = self.issued.load(Ordering::SeqCst);
        let db = self.db.clone();
        let bodies = Arc::clone(&self.bodies);
        let state = Arc::clone(&self.state);
        let on_flush = self.on_flush.clone();
        // The flushing thread flushes and wakes the waiters itself: one thread hop
        // fewer on every acknowledgement than flushing from a task. It lets go of the
        // database before waking anyone, so a store closed right after its last put
        // can be opened again at once. A panicking flush still wakes them, as failed.
        let job: FlushJob = Box::new(move || {
            let began = Instant::now();
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                bodies.sync()?;
                db.flush().map_err(io)
            }));
            drop((db, bodies));
            if let Some(observe) = &on_flush {
                let elapsed = began.elapsed();
                // A panicking observer must not leave the flush unfinished: its waiters
                // would wait for ever.
                let _ = std::panic::catch_unwind(AssertUnwindSafe(|| observe(elapsed)));
            }
            let outcome = match result {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "flush failed; puts are refused until one succeeds");
                    Err(matches!(e, StoreError::Full))
                }
                Err(_) => {
                    tracing::error!("flush panicked; puts are refused until one succeeds");
                    Err(false)
                }
            };
            finish_flush(&state, target, outcome);
        });
        let job = match &self.flusher {
            Some(flusher) => match flusher.try_send(job) {
                Ok(()) => return,
                Err(
                    std::sync::mpsc::TrySendError::Full(job)
                    | std::sync::mpsc::TrySendError::Disconnected(job),
                ) => job,
            },
            None => job,
        };
        tokio::task::spawn_blocking(job);
    }

    async fn wait_durable(self: &Arc<Self>) -> Result<(), StoreError> {
        let ticket = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let mut rx = self.state.subscribe();
        loop {
            let s = *rx.borrow_and_update();
            if s.durable >= ticket {
                return Ok(());
            }
            if s.failed >= ticket {
                return Err(if s.failed_full {
                    StoreError::Full
                } else {
                    StoreError::Io("flush failed".into())
                });
            }
            if !s.flushing {
                self.maybe_start_flush();
            }
            rx.changed()
                .await
                .map_err(|_| StoreError::Io("the store was closed".into()))?;
        }
    }
}
