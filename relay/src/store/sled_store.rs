//! The durable store on sled 0.34, with group commit.
//!
//! One tree, three key families, written together in one atomic batch per put:
//!
//! ```text
//! 'm' ‖ mailbox(32) ‖ cursor(8)      → encoded envelope
//! 'i' ‖ envelope_id(32)              → mailbox(32) ‖ cursor(8) ‖ expires_at(8)
//! 'e' ‖ expires_at(8) ‖ mailbox(32) ‖ cursor(8) → envelope_id(32)
//! ```
//!
//! Cursors come from sled's persistent monotonic id generator, so they keep increasing
//! across restarts and crashes. sled's own periodic flush is off: durability comes only
//! from [`GroupCommit`], which runs one `flush` for every put waiting when it starts.
//! No task outlives the store, so dropping it releases the database (and its lock).

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kkachi_protocol::wire::StoredEnvelope;
use kkachi_protocol::{Envelope, EnvelopeId, MailboxId};
use parking_lot::Mutex;
use tokio::sync::watch;

use super::{Fetched, MailboxStore, PutResult, Quota, StoreError, StoreStats, Usage};

const MAIL: u8 = b'm';
const INDEX: u8 = b'i';
const EXPIRY: u8 = b'e';

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
    quota: Quota,
    /// Serialises check-and-insert so concurrent puts of one envelope store it once,
    /// and keeps per-mailbox usage.
    usage: Arc<Mutex<Usage>>,
    commit: Arc<GroupCommit>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("quota", &self.quota)
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

fn mail_key(mailbox: &MailboxId, cursor: u64) -> [u8; 41] {
    let mut k = [0u8; 41];
    k[0] = MAIL;
    k[1..33].copy_from_slice(&mailbox.0);
    k[33..].copy_from_slice(&cursor.to_be_bytes());
    k
}

fn index_key(id: &EnvelopeId) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = INDEX;
    k[1..].copy_from_slice(&id.0);
    k
}

fn expiry_key(expires_at: u64, mailbox: &MailboxId, cursor: u64) -> [u8; 49] {
    let mut k = [0u8; 49];
    k[0] = EXPIRY;
    k[1..9].copy_from_slice(&expires_at.to_be_bytes());
    k[9..41].copy_from_slice(&mailbox.0);
    k[41..].copy_from_slice(&cursor.to_be_bytes());
    k
}

/// The value under an index key.
struct Located {
    mailbox: MailboxId,
    cursor: u64,
    expires_at: u64,
}

impl Located {
    fn encode(&self) -> [u8; 48] {
        let mut v = [0u8; 48];
        v[..32].copy_from_slice(&self.mailbox.0);
        v[32..40].copy_from_slice(&self.cursor.to_be_bytes());
        v[40..].copy_from_slice(&self.expires_at.to_be_bytes());
        v
    }

    fn decode(v: &[u8]) -> Result<Self, StoreError> {
        let v: &[u8; 48] = v
            .try_into()
            .map_err(|_| StoreError::Corrupt("index entry has the wrong length".into()))?;
        Ok(Self {
            mailbox: MailboxId(v[..32].try_into().expect("32 bytes")),
            cursor: u64::from_be_bytes(v[32..40].try_into().expect("8 bytes")),
            expires_at: u64::from_be_bytes(v[40..].try_into().expect("8 bytes")),
        })
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. Must be called inside a tokio runtime:
    /// it starts the group-commit task.
    pub fn open(
        dir: &Path,
        quota: Quota,
        cache_bytes: u64,
        on_flush: Option<FlushObserver>,
    ) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(None)
            .open()
            .map_err(io)?;
        let tree = db.open_tree("mailboxes").map_err(io)?;
        let mut usage = Usage::default();
        for item in tree.scan_prefix([MAIL]) {
            let (key, value) = item.map_err(io)?;
            let mailbox = MailboxId(
                key.get(1..33)
                    .and_then(|m| m.try_into().ok())
                    .ok_or_else(|| StoreError::Corrupt("mail key has the wrong length".into()))?,
            );
            usage.add_existing(mailbox, value.len() as u64);
        }
        let commit = GroupCommit::new(db.clone(), on_flush);
        Ok(Self {
            failed: Arc::default(),
            db,
            tree,
            quota,
            usage: Arc::new(Mutex::new(usage)),
            commit,
        })
    }

    fn insert(&self, envelopes: &[Envelope]) -> Result<Vec<PutResult>, StoreError> {
        let mut usage = self.usage.lock();
        let mut batch = sled::Batch::default();
        let mut results = Vec::with_capacity(envelopes.len());
        let mut in_batch = Vec::new();
        for envelope in envelopes {
            let id = envelope.id();
            let ikey = index_key(&id);
            if in_batch.contains(&id) || self.tree.contains_key(ikey).map_err(io)? {
                results.push(PutResult::Duplicate);
                continue;
            }
            let bytes = envelope.encode();
            if !usage.try_add(envelope.mailbox, bytes.len() as u64, self.quota) {
                results.push(PutResult::QuotaExceeded);
                continue;
            }
            // Cursor 0 means "from the start", so stored cursors begin at 1.
            let cursor = self.db.generate_id().map_err(io)? + 1;
            let located = Located {
                mailbox: envelope.mailbox,
                cursor,
                expires_at: envelope.expires_at,
            };
            batch.insert(mail_key(&envelope.mailbox, cursor).as_slice(), bytes);
            batch.insert(ikey.as_slice(), located.encode().as_slice());
            batch.insert(
                expiry_key(envelope.expires_at, &envelope.mailbox, cursor).as_slice(),
                id.0.as_slice(),
            );
            in_batch.push(id);
            results.push(PutResult::Stored { cursor });
        }
        if let Err(e) = self.tree.apply_batch(batch) {
            // Undo the usage reserved for what did not get written.
            for (envelope, result) in envelopes.iter().zip(&results) {
                if matches!(result, PutResult::Stored { .. }) {
                    usage.remove(&envelope.mailbox, envelope.encoded_len() as u64);
                }
            }
            return Err(io(e));
        }
        Ok(results)
    }

    fn remove_located(
        &self,
        batch: &mut sled::Batch,
        usage: &mut Usage,
        id: &EnvelopeId,
        at: &Located,
    ) -> Result<(), StoreError> {
        let mkey = mail_key(&at.mailbox, at.cursor);
        if let Some(v) = self.tree.get(mkey).map_err(io)? {
            usage.remove(&at.mailbox, v.len() as u64);
        }
        batch.remove(mkey.as_slice());
        batch.remove(index_key(id).as_slice());
        batch.remove(expiry_key(at.expires_at, &at.mailbox, at.cursor).as_slice());
        Ok(())
    }
}

impl SledStore {
    /// Records a storage failure (the first one wins) and passes the error on.
    fn note(&self, e: StoreError) -> StoreError {
        let mut failed = self.failed.lock();
        if failed.is_none() {
            tracing::error!(error = %e, "storage failed; the relay stops so it can be restarted cleanly");
            *failed = Some(e.to_string());
        }
        e
    }
}

impl MailboxStore for SledStore {
    async fn put(&self, envelopes: Vec<Envelope>) -> Result<Vec<PutResult>, StoreError> {
        if let Some(why) = self.failed.lock().clone() {
            return Err(if why.contains("full") {
                StoreError::Full
            } else {
                StoreError::Io(why)
            });
        }
        let results = self.insert(&envelopes).map_err(|e| self.note(e))?;
        if results
            .iter()
            .any(|r| !matches!(r, PutResult::QuotaExceeded))
        {
            // Duplicates wait too: the earlier copy may not be flushed yet.
            self.commit.wait_durable().await.map_err(|e| self.note(e))?;
        }
        Ok(results)
    }

    fn fatal(&self) -> Option<String> {
        self.failed.lock().clone()
    }

    fn fetch(
        &self,
        mailbox: &MailboxId,
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
            if items.len() >= limit || (!items.is_empty() && bytes + value.len() > max_bytes) {
                more = true;
                break;
            }
            let cursor = u64::from_be_bytes(
                key[33..41]
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("mail key".into()))?,
            );
            let envelope =
                Envelope::decode(&value).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            bytes += value.len();
            items.push(StoredEnvelope { cursor, envelope });
        }
        let next = items.last().map_or(after, |i| i.cursor);
        Ok(Fetched { items, next, more })
    }

    fn delete(&self, mailbox: &MailboxId, ids: &[EnvelopeId]) -> Result<u32, StoreError> {
        let mut usage = self.usage.lock();
        let mut batch = sled::Batch::default();
        let mut count = 0;
        for id in ids {
            let Some(v) = self.tree.get(index_key(id)).map_err(io)? else {
                continue;
            };
            let at = Located::decode(&v)?;
            if at.mailbox != *mailbox {
                continue;
            }
            self.remove_located(&mut batch, &mut usage, id, &at)?;
            count += 1;
        }
        self.tree.apply_batch(batch).map_err(io)?;
        Ok(count)
    }

    fn expire(&self, now: u64, max: usize) -> Result<usize, StoreError> {
        let mut usage = self.usage.lock();
        let mut batch = sled::Batch::default();
        let mut count = 0;
        let start = [EXPIRY];
        let end = expiry_key(now, &MailboxId([0xff; 32]), u64::MAX);
        for item in self.tree.range(start.as_slice()..=end.as_slice()).take(max) {
            let (_, id) = item.map_err(io)?;
            let id = EnvelopeId(
                id.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("expiry entry".into()))?,
            );
            let Some(v) = self.tree.get(index_key(&id)).map_err(io)? else {
                continue;
            };
            let at = Located::decode(&v)?;
            self.remove_located(&mut batch, &mut usage, &id, &at)?;
            count += 1;
        }
        self.tree.apply_batch(batch).map_err(io)?;
        Ok(count)
    }

    fn stats(&self) -> StoreStats {
        self.usage.lock().totals()
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.commit.wait_durable().await
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
    issued: AtomicU64,
    state: Arc<watch::Sender<FlushState>>,
    on_flush: Option<FlushObserver>,
}

impl GroupCommit {
    fn new(db: sled::Db, on_flush: Option<FlushObserver>) -> Arc<Self> {
        Arc::new(Self {
            db,
            issued: AtomicU64::new(0),
            state: Arc::new(watch::channel(FlushState::default()).0),
            on_flush,
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
        let state = Arc::clone(&self.state);
        let on_flush = self.on_flush.clone();
        // The blocking thread flushes and wakes the waiters itself: one thread hop
        // fewer on every acknowledgement than flushing from a task. It lets go of the
        // database before waking anyone, so a store closed right after its last put
        // can be opened again at once. A panicking flush still wakes them, as failed.
        tokio::task::spawn_blocking(move || {
            let began = Instant::now();
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| db.flush()));
            drop(db);
            if let Some(observe) = &on_flush {
                observe(began.elapsed());
            }
            let outcome = match result {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "flush failed; puts are refused until one succeeds");
                    Err(matches!(io(&e), StoreError::Full))
                }
                Err(_) => {
                    tracing::error!("flush panicked; puts are refused until one succeeds");
                    Err(false)
                }
            };
            finish_flush(&state, target, outcome);
        });
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
