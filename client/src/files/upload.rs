//! Sending a file: sealing it into the spool, putting its chunks on the contact's
//! relays, then queueing the message that carries it.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kkachi_protocol::file::{
    CHUNK_BYTES, ChunkId, FileKey, FileRef, MAX_FILE_BYTES, Manifest, chunk_count, seal_chunk,
};
use kkachi_protocol::group::GroupId;
use kkachi_protocol::wire::MAX_CHUNK_IDS;
use kkachi_protocol::{ClientToRelay, GroupKey, Multiaddr, PeerId, RelayToClient, WriteKey};
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::live::Claim;
use super::{
    Answer, CHUNK_TTL_SECS, FilesError, MAX_FAILURES, PER_RELAY, Pick, SMALL_FILE, backoff,
    chunk_len, chunk_offset, disk, human_size, media_type, out_dir, private_dir, safe_name,
    spool_path, sync_dir,
};
use crate::engine::{Engine, EngineError, GroupFilePlace, GroupFileRoute, Sending, now_ms};
use crate::net::Transport;
use crate::store::{Contact, LocalStore, Outgoing, StoreError, TransferId, WriteSet};

/// What an upload did.
#[derive(Debug)]
pub struct UploadReport {
    /// The message carrying the file, if this run queued it (to a contact).
    pub sending: Option<Sending>,
    /// The message carrying the file, if this run sent it to a group.
    pub group_sent: Option<crate::engine::GroupSent>,
    /// The message went (by this run or an earlier one).
    pub message_sent: bool,
    /// The fewest relays any chunk is on.
    pub copies: usize,
    /// The copies each chunk goes to in the end (every relay for a small file, else
    /// two): `copies` short of it are put later, once relays take them.
    pub wanted: usize,
    /// Recipients: the contact, or the members of a group it reached.
    pub members: usize,
    /// Members of a group the message did not go to: their relays took no file (or
    /// they have none).
    pub left_members: Vec<String>,
    /// A recipient with two relays or more holds only one copy of some chunk (the
    /// others refused or failed).
    pub degraded: bool,
    /// Relays the recipients have (a relay two members share counts twice); for a
    /// group with group relays, the group's.
    pub relays: usize,
    /// It went to a group with group relays (into the group queues of one epoch).
    pub group_relays: bool,
    /// Bytes put by this run.
    pub bytes: u64,
    /// How long this run took.
    pub elapsed: Duration,
    /// Relays that took nothing more in this run, and why.
    pub left_out: Vec<(String, String)>,
    /// Relays that failed or refused a put in this run (it went elsewhere, or again),
    /// and their last reason.
    pub refused: Vec<(String, String)>,
}

/// Whom a file goes to.
#[derive(Debug, Clone, Copy)]
pub enum To {
    /// A contact.
    Contact(PeerId),
    /// Every member of a group we reach (SPEC §14.4).
    Group(GroupId),
}

/// Seals the file at `path` for `to` into the spool and records it, durably: from then
/// on it is sent whatever happens to this process. Returns the claim to upload it (see
/// [`upload`]).
pub async fn prepare<T: Transport>(
    engine: &Engine<T>,
    to: To,
    path: &Path,
) -> Result<Claim, FilesError> {
    let recipient = recipient_of(engine, to).await?;
    let read = |source| FilesError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    if !meta.is_file() {
        return Err(FilesError::Refused(format!(
            "{} is not a file (send a folder as an archive)",
            path.display()
        )));
    }
    let size = meta.len();
    if size > MAX_FILE_BYTES {
        return Err(FilesError::Refused(format!(
            "{} is {}; files are at most 2 GiB ({} bytes)",
            path.display(),
            human_size(size),
            MAX_FILE_BYTES
        )));
    }
    let name = safe_name(
        &path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let key = FileKey(rand::random());
    let home = engine.store().home().to_path_buf();
    let src = path.to_path_buf();
    let sealing_key = key.clone();
    let sealed = tokio::task::spawn_blocking(move || -> Result<_, FilesError> {
        let input = File::open(&src).map_err(|e| FilesError::Read {
            path: src.clone(),
            source: e,
        })?;
        let modified = input.metadata().and_then(|m| m.modified()).ok();
        let changed = || {
            FilesError::Refused(format!(
                "{} changed while it was read; send it again once it is complete",
                src.display()
            ))
        };
        let fill = |i: usize, plain: &mut [u8]| {
            use std::os::unix::fs::FileExt;
            input
                .read_exact_at(plain, (i * CHUNK_BYTES) as u64)
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        changed()
                    } else {
                        FilesError::Read {
                            path: src.clone(),
                            source: e,
                        }
                    }
                })
        };
        let sealed = seal_into_spool(&home, &sealing_key, size, &fill)?;
        // Written to meanwhile (longer, shorter, or the same length changed in place).
        let after = input.metadata().map_err(|e| FilesError::Read {
            path: src.clone(),
            source: e,
        })?;
        if after.len() != size || after.modified().ok() != modified {
            return Err(changed());
        }
        Ok(sealed)
    })
    .await
    .map_err(|e| FilesError::Refused(format!("sealing the file failed: {e}")))??;
    // A photo carries a small preview, so it shows before it is fetched.
    let mime = media_type(&name).to_owned();
    let (from, kind) = (path.to_path_buf(), mime.clone());
    let thumbnail = tokio::task::spawn_blocking(move || super::picture::preview(&from, &kind))
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    record_sealed(engine, recipient, key, size, name, mime, thumbnail, sealed).await
}

/// Seals the file `id`, received and fetched here, for `to` into the spool and records
/// it, as [`prepare`] does a file on disk: passed on without being written out in the
/// clear. Its key ([`forward_key`](kkachi_protocol::file::forward_key)) is derived
/// from a secret of ours, the file and `to`, so passing the same file to the same
/// conversation again within the week makes the same chunks (the relays' `has` finds
/// what they still hold, and nothing is put twice), while no two conversations, and
/// nobody else, can match its chunks to the file's.
pub async fn prepare_forward<T: Transport>(
    engine: &Engine<T>,
    to: To,
    id: TransferId,
) -> Result<Claim, FilesError> {
    let recipient = recipient_of(engine, to).await?;
    let store = engine.store().clone();
    let Some(record) = store.incoming_file(&id)? else {
        return Err(FilesError::Refused(
            "no such file received here (`kkachi files` lists them)".into(),
        ));
    };
    if record.state != crate::store::IncomingState::Done {
        return Err(FilesError::Refused(format!(
            "it is not fetched yet: fetch it first (`kkachi get {}`)",
            &super::hex(&id)[..12]
        )));
    }
    let original = record.file()?;
    let home = store.home().to_path_buf();
    let manifest_file = super::manifest_path(&home, &id);
    let sealed = std::fs::read(&manifest_file).map_err(disk(&manifest_file))?;
    let manifest = Manifest::open(&original.key, &original.manifest, &sealed)
        .map_err(|e| FilesError::Refused(format!("its list of chunks here is damaged: {e}")))?;
    if manifest.size != original.size {
        return Err(FilesError::Refused(
            "its list of chunks here does not match its size".into(),
        ));
    }
    let key = kkachi_protocol::file::forward_key(
        &original,
        &recipient,
        engine.identity(),
        now_ms() / 1000,
    );
    let (sealing_key, size) = (key.clone(), original.size);
    let opening_key = original.key.clone();
    let sealed = tokio::task::spawn_blocking(move || -> Result<_, FilesError> {
        let part_file = super::part_path(&home, &id);
        let part = File::open(&part_file).map_err(disk(&part_file))?;
        let fill = |i: usize, plain: &mut [u8]| {
            use std::os::unix::fs::FileExt;
            let mut sealed = vec![0u8; chunk_len(size, i)];
            part.read_exact_at(&mut sealed, chunk_offset(i))
                .map_err(disk(&part_file))?;
            let opened = kkachi_protocol::file::open_chunk(
                &opening_key,
                &manifest.chunks[i],
                i,
                size,
                &sealed,
            )
            .map_err(|e| {
                FilesError::Refused(format!("chunk {i} of the file here is damaged: {e}"))
            })?;
            if opened.len() != plain.len() {
                return Err(FilesError::Refused(format!(
                    "chunk {i} of the file here is damaged"
                )));
            }
            plain.copy_from_slice(&opened);
            Ok(())
        };
        seal_into_spool(&home, &sealing_key, size, &fill)
    })
    .await
    .map_err(|e| FilesError::Refused(format!("sealing the file failed: {e}")))??;
    record_sealed(
        engine,
        recipient,
        key,
        size,
        original.name,
        original.mime,
        original.thumbnail,
        sealed,
    )
    .await
}

/// What a file is recorded as sent to: a contact's peer id, or a group's key; refused
/// if it cannot go there.
async fn recipient_of<T: Transport>(engine: &Engine<T>, to: To) -> Result<Vec<u8>, FilesError> {
    let store = engine.store();
    Ok(match to {
        To::Contact(contact) => {
            let Some(c) = store.added_contact(&contact)? else {
                return Err(FilesError::Refused(format!("{contact} is not a contact")));
            };
            if store.blocked(&contact)?.is_some() {
                return Err(FilesError::Refused(format!(
                    "{} is blocked; unblock them first",
                    crate::sanitize::for_terminal(&c.name)
                )));
            }
            contact.to_bytes()
        }
        To::Group(group) => {
            // Only where we may post, and someone is there to get it.
            if let GroupFileRoute::Members(members) = engine.group_file_route(group).await?
                && members.is_empty()
            {
                return Err(FilesError::Refused(
                    "no other member of the group can be reached (members get files from \
                     their contacts only)"
                        .into(),
                ));
            }
            crate::store::group_key(&group)
        }
    })
}

/// The spool file of a file just sealed (to be named by its id), every chunk id (the
/// manifest's last) and the sealed manifest's length.
type Sealed = (tempfile::NamedTempFile, Vec<[u8; 32]>, u32);

/// What gives chunk `i`'s plaintext to [`seal_into_spool`], into a buffer its length.
type Fill<'a> = dyn Fn(usize, &mut [u8]) -> Result<(), FilesError> + Sync + 'a;

/// Records a file sealed into the spool for `recipient`, durably, and claims it.
#[allow(clippy::too_many_arguments)]
async fn record_sealed<T: Transport>(
    engine: &Engine<T>,
    recipient: Vec<u8>,
    key: FileKey,
    size: u64,
    name: String,
    mime: String,
    thumbnail: Vec<u8>,
    (spool, chunks, manifest_len): Sealed,
) -> Result<Claim, FilesError> {
    let store = engine.store().clone();
    let file = FileRef {
        key,
        manifest: ChunkId(*chunks.last().expect("the manifest's id is last")),
        size,
        mime,
        name,
        thumbnail,
    };
    file.check()
        .map_err(|e| FilesError::Refused(e.to_string()))?;
    let id = file.id();
    // The same file passed on to the same conversation again (the same id): once the
    // first has gone, it goes again (the relays' `has` says what they still hold).
    let Some(claim) = engine.transfers().claim(false, id) else {
        return Err(FilesError::Refused(
            "that file is being sent there now; `kkachi files` shows how far".into(),
        ));
    };
    if store.outgoing_file(&id)?.is_some_and(|o| !o.finished) {
        return Err(FilesError::Refused(
            "that file is on its way there already; `kkachi files` shows how far".into(),
        ));
    }
    let home = store.home().to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<(), FilesError> {
        let path = spool_path(&home, &id);
        spool.persist(&path).map_err(|e| disk(&path)(e.error))?;
        sync_dir(&out_dir(&home))
    })
    .await
    .map_err(|e| FilesError::Refused(format!("keeping the sealed file failed: {e}")))??;
    let record = Outgoing {
        contact: recipient,
        reference: file.encode(),
        chunks,
        manifest_len,
        relays: Vec::new(),
        message_sent: false,
        message: None,
        finished: false,
        created_ms: now_ms(),
        last_error: None,
        attempts: 0,
        retry_at_ms: 0,
        members: Vec::new(),
        epoch: None,
    };
    let mut w = WriteSet::default();
    LocalStore::write_outgoing_file(&mut w, &id, &record);
    store.apply(w)?;
    store.flush().await?;
    Ok(claim)
}

/// Seals a file of `size` bytes into a new spool file, chunk by chunk (`fill` gives
/// chunk `i`'s plaintext, as long as the buffer it is handed), then its manifest; the
/// spool is synced before this returns.
fn seal_into_spool(
    home: &Path,
    key: &FileKey,
    size: u64,
    fill: &Fill<'_>,
) -> Result<Sealed, FilesError> {
    let dir = out_dir(home);
    private_dir(&dir)?;
    let tmp = tempfile::Builder::new()
        .prefix(".sealing-")
        .tempfile_in(&dir)
        .map_err(disk(&dir))?;
    let n = chunk_count(size);
    // Chunks are sealed on every core at once: each has its fixed place in the spool
    // (see `chunk_offset`), read from its own place in the source.
    let workers = std::thread::available_parallelism()
        .map_or(1, |p| p.get())
        .clamp(1, 4)
        .min(n);
    let mut ids = vec![[0u8; 32]; n];
    let (spool, spool_path) = (tmp.as_file(), tmp.path());
    // One worker failing stops the others.
    let stop = std::sync::atomic::AtomicBool::new(false);
    // Each worker's chunks: their indexes and ids.
    type Done = Vec<(usize, [u8; 32])>;
    let results: Vec<Result<Done, FilesError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let stop = &stop;
                scope.spawn(move || {
                    use std::os::unix::fs::FileExt;
                    use std::sync::atomic::Ordering;
                    let mut plain = vec![0u8; CHUNK_BYTES];
                    let mut done = Vec::new();
                    for i in (w..n).step_by(workers) {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let at = (i * CHUNK_BYTES) as u64;
                        let want = (size - at).min(CHUNK_BYTES as u64) as usize;
                        let sealed = fill(i, &mut plain[..want])
                            .and_then(|()| {
                                let sealed = seal_chunk(key, i, n, &plain[..want], size);
                                spool
                                    .write_all_at(&sealed, chunk_offset(i))
                                    .map_err(disk(spool_path))?;
                                Ok(sealed)
                            })
                            .inspect_err(|_| stop.store(true, Ordering::Relaxed))?;
                        done.push((i, ChunkId::of(&sealed).0));
                    }
                    Ok(done)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sealing does not panic"))
            .collect()
    });
    for result in results {
        for (i, id) in result? {
            ids[i] = id;
        }
    }
    let manifest = Manifest {
        size,
        chunks: ids.iter().copied().map(ChunkId).collect(),
    };
    let (id, sealed) = manifest
        .seal(key)
        .map_err(|e| FilesError::Refused(e.to_string()))?;
    let after = chunk_offset(n - 1) + chunk_len(size, n - 1) as u64;
    std::os::unix::fs::FileExt::write_all_at(spool, &sealed, after).map_err(disk(tmp.path()))?;
    spool.sync_all().map_err(disk(tmp.path()))?;
    ids.push(id.0);
    Ok((tmp, ids, sealed.len() as u32))
}

/// What names the queue chunks go into on a relay.
#[derive(Clone)]
enum Cap {
    /// Our capability into a contact's (or member's) inbox queue.
    Write(WriteKey),
    /// A group queue's key (a group with group relays).
    Group(GroupKey),
}

impl Cap {
    fn put(&self, expires_at: u64, id: ChunkId, data: Vec<u8>) -> ClientToRelay {
        match self {
            Cap::Write(write) => ClientToRelay::PutChunk {
                write: *write,
                expires_at,
                id,
                data,
            },
            Cap::Group(key) => ClientToRelay::PutGroupChunk {
                key: *key,
                expires_at,
                id,
                data,
            },
        }
    }

    fn has(&self, ids: Vec<ChunkId>) -> ClientToRelay {
        match self {
            Cap::Write(write) => ClientToRelay::HasChunks { write: *write, ids },
            Cap::Group(key) => ClientToRelay::HasGroupChunks { key: *key, ids },
        }
    }
}

/// One relay of a recipient's, and our capability into their queue there.
#[derive(Clone)]
struct Target {
    addr: Multiaddr,
    key: Cap,
    /// Whose relay it is: an index into the recipients (one for a contact, each member
    /// reached for a group).
    member: usize,
    /// How the record names it: the address, and for a group the member too (two
    /// members may share a relay, each with a queue of their own there).
    name: String,
}

impl Target {
    /// How a report names it: a group relay by its address (one queue per epoch there
    /// is the group's, not a person's).
    fn shown(&self) -> String {
        match self.key {
            Cap::Group(_) => self.addr.to_string(),
            Cap::Write(_) => self.name.clone(),
        }
    }
}

/// Every relay of every recipient, with our capability into their queue there.
fn targets_of<T: Transport>(
    engine: &Engine<T>,
    recipients: &[Contact],
    group: bool,
) -> Vec<Target> {
    recipients
        .iter()
        .enumerate()
        .flat_map(|(member, contact)| {
            contact.card.relays().iter().filter_map(move |addr| {
                let relay = crate::net::peer_of(addr)?;
                Some(Target {
                    addr: addr.clone(),
                    key: Cap::Write(
                        engine
                            .identity()
                            .write_key_for(contact.card.identity(), &relay),
                    ),
                    member,
                    name: if group {
                        format!("{addr} {}", contact.peer)
                    } else {
                        addr.to_string()
                    },
                })
            })
        })
        .collect()
}

/// What each relay holds and is being sent, shared by the workers.
struct Plan {
    held: Vec<Vec<bool>>,
    inflight: Vec<Vec<bool>>,
    failures: Vec<u32>,
    out: Vec<Option<String>>,
    trouble: Vec<Option<String>>,
    /// Whose relay each is (see [`Target::member`]).
    member: Vec<usize>,
    /// Copies of every item each recipient gets.
    need: Vec<usize>,
    /// Copies of each item on each recipient's relays (what `held` says, counted).
    count: Vec<Vec<u16>>,
    bytes: u64,
    /// A share full for us frees as the recipients fetch (their own queues); a group
    /// queue's frees only as its files expire.
    quota_frees: bool,
}

impl Plan {
    /// Counts anew what `held` says.
    fn recount(&mut self) {
        self.count = vec![vec![0; self.need.len()]; self.held[0].len()];
        for (r, held) in self.held.iter().enumerate() {
            for (item, _) in held.iter().enumerate().filter(|(_, h)| **h) {
                self.count[item][self.member[r]] += 1;
            }
        }
    }

    /// Relay `r` holds `item`.
    fn hold(&mut self, r: usize, item: usize) {
        if !self.held[r][item] {
            self.held[r][item] = true;
            self.count[item][self.member[r]] += 1;
        }
    }

    /// Copies of `item` on recipient `m`'s relays.
    fn copies(&self, item: usize, m: usize) -> usize {
        usize::from(self.count[item][m])
    }

    /// Whether recipient `m` holds at least `n` copies of every item.
    fn covered(&self, m: usize, n: usize) -> bool {
        self.count.iter().all(|c| usize::from(c[m]) >= n)
    }

    /// The copies recipient `m` can get in this run: `n`, or fewer when so many of its
    /// relays are out that fewer are left (at least one): a recipient with two relays,
    /// one of them down, still gets the file (on the other) rather than nothing.
    fn within_reach(&self, m: usize, n: usize) -> usize {
        let left = (0..self.out.len())
            .filter(|&r| self.member[r] == m && !self.gone(r))
            .count();
        n.min(left).max(1)
    }

    /// Whether every relay of recipient `m` is gone from this run (or it has none).
    fn unavailable(&self, m: usize) -> bool {
        (0..self.out.len())
            .filter(|&r| self.member[r] == m)
            .all(|r| self.gone(r))
    }

    /// Whether relay `r` is out of this run for good: refused or failing. Out because
    /// our share there is full is no outage (it frees as they fetch): waited for.
    fn gone(&self, r: usize) -> bool {
        self.out[r]
            .as_ref()
            .is_some_and(|why| !(self.quota_frees && why.starts_with("quota_exceeded")))
    }

    /// Puts of `item` under way to recipient `m`'s relays that have not failed lately:
    /// one under way to a relay that has may never end, and must not hold the others
    /// back.
    fn in_flight(&self, item: usize, m: usize) -> usize {
        (0..self.inflight.len())
            .filter(|&r| self.member[r] == m && self.inflight[r][item] && self.failures[r] == 0)
            .count()
    }

    /// Items every recipient `m` holds at least `copies[m]` copies of.
    fn on_at_least(&self, copies: &[usize]) -> usize {
        self.count
            .iter()
            .filter(|c| {
                c.iter()
                    .zip(copies)
                    .all(|(have, n)| usize::from(*have) >= *n)
            })
            .count()
    }

    fn everywhere(&self, copies: &[usize]) -> bool {
        self.on_at_least(copies) == self.held[0].len()
    }

    /// The fewest copies of any item on the relays of any recipient in `among`.
    fn fewest(&self, among: &[usize]) -> usize {
        self.count
            .iter()
            .flat_map(|c| among.iter().map(|&m| usize::from(c[m])))
            .min()
            .unwrap_or(0)
    }

    /// What a worker for relay `r` does next.
    fn pick(&mut self, r: usize) -> Pick {
        if self.out[r].is_some() {
            return Pick::Done;
        }
        let (m, need) = (self.member[r], self.need[self.member[r]]);
        let mut waiting = false;
        for item in 0..self.held[r].len() {
            if self.held[r][item] || self.copies(item, m) >= need {
                continue;
            }
            if self.inflight[r][item] || self.copies(item, m) + self.in_flight(item, m) >= need {
                waiting = true;
                continue;
            }
            self.inflight[r][item] = true;
            return Pick::Item(item);
        }
        if waiting { Pick::Wait } else { Pick::Done }
    }
}

fn bitmap(held: &[bool]) -> Vec<u8> {
    let mut bits = vec![0u8; held.len().div_ceil(8)];
    for (i, _) in held.iter().enumerate().filter(|(_, h)| **h) {
        bits[i / 8] |= 1 << (i % 8);
    }
    bits
}

fn unbitmap(bits: &[u8], n: usize) -> Vec<bool> {
    (0..n)
        .map(|i| bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
        .collect()
}

/// Uploads the file `claim` names to its contact's relays (or its group's), and queues
/// its message once every chunk is on enough of them. Goes on from where an earlier run
/// stopped.
pub async fn upload<T: Transport>(
    engine: &Engine<T>,
    claim: Claim,
) -> Result<UploadReport, FilesError> {
    let claim = Arc::new(claim);
    // A group's key may change while its chunks go up: they go again, into the new
    // epoch's queues, before the message goes (a few times at most; then later).
    let mut tries = 0;
    loop {
        match upload_once(engine, &claim).await {
            Err(FilesError::Engine(EngineError::Changed(why))) if tries < 3 => {
                tries += 1;
                tracing::info!(%why, "the file goes again");
            }
            done => return done,
        }
    }
}

/// Whom an upload's chunks are for.
enum Route {
    /// Contacts (one, or the members of a group without group relays), each into
    /// their own queues.
    Contacts(Vec<Contact>),
    /// The group queues of one epoch of a group with group relays.
    Group {
        epoch: [u8; 32],
        queues: Vec<(Multiaddr, GroupKey)>,
        members: usize,
    },
}

/// One run of [`upload`].
async fn upload_once<T: Transport>(
    engine: &Engine<T>,
    claim: &Arc<Claim>,
) -> Result<UploadReport, FilesError> {
    let id = claim.id;
    let store = engine.store().clone();
    let home = store.home().to_path_buf();
    let started = Instant::now();
    let Some(mut record) = store.outgoing_file(&id)? else {
        return Err(FilesError::Refused("no such file is being sent".into()));
    };
    let file = record.file()?;
    let group = record.group();
    // Who gets it: the contact, or the members of the group we reach now, or the
    // group's relays.
    let route = match group {
        Some(group) => match engine.group_file_route(group).await {
            Ok(GroupFileRoute::Members(members)) if !members.is_empty() => Route::Contacts(
                members
                    .into_iter()
                    // Once its message went, only the members it went to still get
                    // copies.
                    .filter(|m| !record.message_sent || record.members.contains(&m.peer.to_bytes()))
                    .collect(),
            ),
            Ok(GroupFileRoute::Members(_)) => {
                forget(&store, &home, &id).await?;
                return Err(FilesError::Refused(
                    "no other member of the group can be reached: the file goes no further".into(),
                ));
            }
            Ok(GroupFileRoute::Relays {
                epoch,
                queues,
                members,
            }) => Route::Group {
                epoch,
                queues,
                members,
            },
            // Its message went under a key since replaced: no more copies go.
            Ok(GroupFileRoute::Waiting) if record.message_sent => {
                finish(&store, &home, &id, &mut record).await?;
                return Ok(finished_report(&record));
            }
            Ok(GroupFileRoute::Waiting) => {
                let why = "the group has no key you may write under yet; the file goes once an admin hands one out";
                record.last_error = Some(why.into());
                record.attempts = record.attempts.saturating_add(1);
                record.retry_at_ms =
                    now_ms() + super::retry_after(record.attempts).as_millis() as u64;
                save(&store, &id, &record)?;
                store.flush().await?;
                return Err(FilesError::Unavailable(why.into()));
            }
            // Not a member any more, or the group is gone: it goes nowhere.
            Err(EngineError::Invalid(why)) => {
                forget(&store, &home, &id).await?;
                return Err(FilesError::Refused(format!(
                    "the file goes no further: {why}"
                )));
            }
            // Stopping, or the store failed: it goes on later.
            Err(e) => return Err(e.into()),
        },
        None => {
            let peer = record
                .contact()
                .ok_or(StoreError::Corrupt("outgoing file"))?;
            match store.contact(&peer)? {
                Some(c) if store.blocked(&peer)?.is_none() => Route::Contacts(vec![c]),
                // Removed or blocked meanwhile: nothing goes to them any more.
                _ => {
                    forget(&store, &home, &id).await?;
                    return Err(FilesError::Refused(
                        "they are no longer a contact, or are blocked: the file goes no further"
                            .into(),
                    ));
                }
            }
        }
    };
    // A group's file whose message went under one epoch is topped up in that epoch's
    // queues only; once the group's key or tier changed, it is not topped up.
    if record.message_sent
        && group.is_some()
        && match &route {
            Route::Group { epoch, .. } => record.epoch != Some(*epoch),
            Route::Contacts(_) => record.epoch.is_some(),
        }
    {
        finish(&store, &home, &id, &mut record).await?;
        return Ok(finished_report(&record));
    }
    let (targets, names, recipients, place, members) = match route {
        Route::Contacts(recipients) => {
            let names = recipients.iter().map(|c| c.name.clone()).collect();
            let members = recipients.len();
            (
                targets_of(engine, &recipients, group.is_some()),
                names,
                recipients,
                None,
                members,
            )
        }
        Route::Group {
            epoch,
            queues,
            members,
        } => {
            let relays = queues.iter().map(|(addr, _)| addr.clone()).collect();
            let targets = queues
                .into_iter()
                .map(|(addr, key)| Target {
                    name: crate::engine::group_poll_name(&addr.to_string(), &epoch),
                    addr,
                    key: Cap::Group(key),
                    member: 0,
                })
                .collect();
            (
                targets,
                vec!["the group's relays".to_owned()],
                Vec::new(),
                Some((epoch, relays)),
                members,
            )
        }
    };
    // Each recipient's relays: two copies of every chunk are enough to send the
    // message; a small file goes to every relay.
    let relays_of = |m: usize| targets.iter().filter(|t| t.member == m).count();
    let enough: Vec<usize> = (0..names.len()).map(|m| relays_of(m).min(2)).collect();
    let need: Vec<usize> = (0..names.len())
        .map(|m| {
            if file.size <= SMALL_FILE {
                relays_of(m)
            } else {
                enough[m]
            }
        })
        .collect();
    let mut report = UploadReport {
        sending: None,
        group_sent: None,
        left_members: Vec::new(),
        degraded: false,
        message_sent: record.message_sent,
        copies: 0,
        wanted: need.iter().copied().min().unwrap_or(0),
        members,
        relays: targets.len(),
        group_relays: place.is_some(),
        bytes: 0,
        elapsed: Duration::ZERO,
        left_out: Vec::new(),
        refused: Vec::new(),
    };
    if record.finished {
        report.copies = enough.iter().copied().min().unwrap_or(0);
        return Ok(report);
    }
    // A member whose card names no relay cannot take a file: left out at once (the
    // others do not wait for them). A contact without relays is told.
    let with_relays: Vec<usize> = (0..names.len()).filter(|&m| relays_of(m) > 0).collect();
    if with_relays.len() < names.len() && (group.is_none() || with_relays.is_empty()) {
        let m = (0..names.len()).find(|&m| relays_of(m) == 0).unwrap_or(0);
        return Err(FilesError::Unavailable(format!(
            "{} has no relays to take the file",
            crate::sanitize::for_terminal(&names[m])
        )));
    }
    let spool_file = spool_path(&home, &id);
    let spool = match File::open(&spool_file) {
        Ok(f) => Arc::new(f),
        // Removed by hand: nothing can be put any more. Said once, not tried forever.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            forget(&store, &home, &id).await?;
            return Err(FilesError::Refused(format!(
                "the sealed copy of {} is gone from this device; send the file again",
                super::safe_name(&file.name)
            )));
        }
        Err(e) => return Err(disk(&spool_file)(e)),
    };
    let ids = record.ids();
    let items = ids.len();
    let n = items - 1;
    // Where each item is in the spool: the chunks at their places, the manifest after.
    let mut places: Vec<(u64, usize)> = (0..n)
        .map(|i| (chunk_offset(i), chunk_len(file.size, i)))
        .collect();
    let (last_at, last_len) = places[n - 1];
    places.push((last_at + last_len as u64, record.manifest_len as usize));
    let mut plan = Plan {
        held: vec![vec![false; items]; targets.len()],
        inflight: vec![vec![false; items]; targets.len()],
        failures: vec![0; targets.len()],
        out: vec![None; targets.len()],
        trouble: vec![None; targets.len()],
        member: targets.iter().map(|t| t.member).collect(),
        need: need.clone(),
        count: Vec::new(),
        bytes: 0,
        quota_frees: place.is_none(),
    };
    for (r, t) in targets.iter().enumerate() {
        if let Some((_, bits)) = record.relays.iter().find(|(a, _)| *a == t.name) {
            plan.held[r] = unbitmap(bits, items);
        }
    }
    // A group queue is opened by whoever puts first (every member may).
    futures::future::join_all(targets.iter().map(|t| open_group(engine.net(), t))).await;
    // What each relay holds now: the record may be behind (a crash) or ahead (expired).
    let asked =
        futures::future::join_all(targets.iter().map(|t| holds(engine.net(), t, &ids))).await;
    for (r, held) in asked.into_iter().enumerate() {
        if let Some(held) = held {
            plan.held[r] = held;
        }
    }
    plan.recount();
    let plan = Arc::new(Mutex::new(plan));
    let claim = claim.clone();
    // Progress counts the file's chunks (the manifest, a chunk of its own, is not
    // the file's).
    claim.update(|p| {
        p.total = n;
        p.done = plan.lock().on_at_least(&enough).min(n);
        p.doing = "uploading";
    });
    let notify = Arc::new(Notify::new());
    let ids = Arc::new(ids);
    let places = Arc::new(places);
    let shared_enough = Arc::new(enough.clone());
    // As many puts under way as for a contact's relays in all, however many members
    // share them (each holds a chunk in memory), and at least one per relay.
    let per_target = (PER_RELAY * 4 / targets.len()).clamp(1, PER_RELAY);
    let mut workers = tokio::task::JoinSet::new();
    for (r, target) in targets.iter().enumerate() {
        for _ in 0..per_target {
            workers.spawn(put_worker(
                engine.net().clone(),
                target.clone(),
                r,
                Worker {
                    plan: plan.clone(),
                    spool: spool.clone(),
                    ids: ids.clone(),
                    places: places.clone(),
                    notify: notify.clone(),
                    claim: claim.clone(),
                    enough: shared_enough.clone(),
                },
            ));
        }
    }
    // The group its message goes to, and the epoch it goes under (with group relays).
    let to_group = group.map(|g| (g, place.clone()));
    // Whom the message went to (all who have relays, unless some are left out).
    let mut sent_to = with_relays.clone();
    let mut saved = Instant::now();
    loop {
        let all_done = tokio::select! {
            joined = workers.join_next() => joined.is_none(),
            _ = notify.notified() => false,
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
        };
        let (ready, complete, held) = {
            let p = plan.lock();
            let ready = with_relays
                .iter()
                .all(|&m| p.covered(m, p.within_reach(m, enough[m])));
            (ready, p.everywhere(&need), p.held.clone())
        };
        // Everything is where it goes: workers left are waiting out a failed relay's
        // backoff, or on a put that is no longer needed.
        let all_done = all_done || complete;
        record.relays = targets
            .iter()
            .zip(&held)
            .map(|(t, h)| (t.name.clone(), bitmap(h)))
            .collect();
        if ready && !record.message_sent {
            let to: Vec<&Contact> = with_relays
                .iter()
                .filter_map(|&m| recipients.get(m))
                .collect();
            if let Err(e) = send_message(
                engine,
                &id,
                &mut record,
                &mut report,
                to_group.clone(),
                &file,
                &to,
            )
            .await
            {
                workers.abort_all();
                return Err(e);
            }
            saved = Instant::now();
        } else if all_done || saved.elapsed() >= Duration::from_secs(1) {
            save(&store, &id, &record)?;
            saved = Instant::now();
        }
        if all_done {
            workers.abort_all();
            break;
        }
    }
    // A group's file that waited long enough for members whose every relay failed or
    // refused it goes to the others: one member's relays never hold it back for all.
    if !record.message_sent
        && group.is_some()
        && now_ms().saturating_sub(record.created_ms) >= LEAVE_OUT_AFTER_MS
    {
        let (to, stuck) = {
            let p = plan.lock();
            let (to, left): (Vec<usize>, Vec<usize>) = with_relays
                .iter()
                .partition(|&&m| p.covered(m, p.within_reach(m, enough[m])));
            (to, left.iter().all(|&m| p.unavailable(m)))
        };
        if !to.is_empty() && stuck {
            let contacts: Vec<&Contact> = to.iter().filter_map(|&m| recipients.get(m)).collect();
            send_message(
                engine,
                &id,
                &mut record,
                &mut report,
                to_group.clone(),
                &file,
                &contacts,
            )
            .await?;
            sent_to = to;
        }
    }
    // Members the message of this run did not go to.
    if report.group_sent.is_some() {
        report.left_members = (0..names.len())
            .filter(|m| !sent_to.contains(m))
            .map(|m| names[m].clone())
            .collect();
    }
    {
        let p = plan.lock();
        report.copies = p.fewest(&sent_to);
        report.degraded = record.message_sent
            && sent_to
                .iter()
                .any(|&m| relays_of(m) >= 2 && p.fewest(&[m]) < 2);
        report.bytes = p.bytes;
        report.left_out = targets
            .iter()
            .zip(&p.out)
            .filter_map(|(t, why)| why.clone().map(|w| (t.shown(), w)))
            .collect();
        report.refused = targets
            .iter()
            .zip(&p.trouble)
            .filter_map(|(t, why)| why.clone().map(|w| (t.shown(), w)))
            .collect();
    }
    report.elapsed = started.elapsed();
    // A file that went with fewer copies than it goes to (a relay of the contact, or
    // of a member it went to, was out) keeps its sealed copy: later runs put what is
    // missing, until relays would have dropped the chunks anyway.
    let short = record.message_sent
        && !plan.lock().everywhere(&need)
        && now_ms().saturating_sub(record.created_ms) < CHUNK_TTL_SECS * 1000;
    if short {
        let whose = if place.is_some() {
            "the group's"
        } else {
            "their"
        };
        record.last_error = Some(format!(
            "each chunk on {} of {whose} {} relays so far; the other copies go once those relays take them",
            report.copies, report.relays
        ));
        record.attempts = record.attempts.saturating_add(1);
        record.retry_at_ms = now_ms() + super::retry_after(record.attempts).as_millis() as u64;
        save(&store, &id, &record)?;
        store.flush().await?;
        return Ok(report);
    }
    if record.message_sent {
        finish(&store, &home, &id, &mut record).await?;
        return Ok(report);
    }
    let why: Vec<String> = report
        .left_out
        .iter()
        .map(|(relay, why)| {
            format!(
                "{}: {}",
                crate::sanitize::for_terminal(relay),
                crate::sanitize::for_terminal(why)
            )
        })
        .collect();
    let why = if why.is_empty() {
        "no relay of theirs took it".to_owned()
    } else {
        why.join("; ")
    };
    record.last_error = Some(why.clone());
    record.attempts = record.attempts.saturating_add(1);
    record.retry_at_ms = now_ms() + super::retry_after(record.attempts).as_millis() as u64;
    save(&store, &id, &record)?;
    store.flush().await?;
    Err(FilesError::Unavailable(format!(
        "the file is on {} of {} relays so far ({why}); it is sent once enough of them take it",
        report.copies, report.relays
    )))
}

/// How long a group's file waits for members whose every relay fails or refuses it
/// before it goes to the others without them.
pub const LEAVE_OUT_AFTER_MS: u64 = 10 * 60 * 1000;

/// Queues the file's message for `to` (the recipients whose relays hold it; for a group
/// with group relays, the group, under the epoch whose queues hold it), in one write
/// with the record saying it went; a file cancelled meanwhile does not go.
async fn send_message<T: Transport>(
    engine: &Engine<T>,
    id: &TransferId,
    record: &mut Outgoing,
    report: &mut UploadReport,
    group: Option<(GroupId, Option<GroupFilePlace>)>,
    file: &FileRef,
    to: &[&Contact],
) -> Result<(), FilesError> {
    let store = engine.store();
    if store.outgoing_file(id)?.is_none() {
        return Err(FilesError::Refused("the file was cancelled".into()));
    }
    let mut went = record.clone();
    went.message_sent = true;
    if let Some((_, place)) = &group {
        went.members = to.iter().map(|c| c.peer.to_bytes()).collect();
        went.epoch = place.as_ref().map(|(epoch, _)| *epoch);
    }
    let mut with = WriteSet::default();
    LocalStore::write_outgoing_file(&mut with, id, &went);
    // Refused (a group's key changed meanwhile): nothing went, and the record stays
    // as it was.
    match (group, to.first()) {
        (Some((group, place)), _) => {
            let peers = to.iter().map(|c| c.peer).collect();
            let sent = engine
                .send_group_file(group, file.clone(), peers, place, with)
                .await?;
            went.message = Some(sent.id.0);
            report.group_sent = Some(sent);
        }
        (None, Some(contact)) => {
            let sent = engine.send_file(contact.peer, file.clone(), with).await?;
            went.message = Some(sent.queued.id.0);
            report.sending = Some(sent);
        }
        (None, None) => return Err(FilesError::Refused("the file has no recipient".into())),
    }
    *record = went;
    report.message_sent = true;
    save(store, id, record)?;
    Ok(())
}

/// Marks a file whose message went as done: nothing more is put. The chunk list (up to
/// 256 KiB) and what each relay holds are not kept, so listing transfers stays cheap,
/// and the sealed copy goes.
async fn finish(
    store: &LocalStore,
    home: &Path,
    id: &TransferId,
    record: &mut Outgoing,
) -> Result<(), FilesError> {
    record.finished = true;
    record.last_error = None;
    record.attempts = 0;
    record.chunks = Vec::new();
    record.relays = Vec::new();
    save(store, id, record)?;
    store.flush().await?;
    let _ = std::fs::remove_file(spool_path(home, id));
    Ok(())
}

/// What a run that found the file done reports.
fn finished_report(record: &Outgoing) -> UploadReport {
    UploadReport {
        sending: None,
        group_sent: None,
        message_sent: record.message_sent,
        copies: 0,
        wanted: 0,
        members: record.members.len(),
        left_members: Vec::new(),
        degraded: false,
        relays: 0,
        group_relays: record.epoch.is_some(),
        bytes: 0,
        elapsed: Duration::ZERO,
        left_out: Vec::new(),
        refused: Vec::new(),
    }
}

/// Writes the record back, unless it was removed meanwhile (its contact removed or
/// blocked): then the upload stops.
fn save(store: &LocalStore, id: &TransferId, record: &Outgoing) -> Result<(), FilesError> {
    let _turn = store.files_turn();
    if store.outgoing_file(id)?.is_none() {
        return Err(FilesError::Refused(
            "they were removed or blocked meanwhile: the file goes no further".into(),
        ));
    }
    let mut w = WriteSet::default();
    LocalStore::write_outgoing_file(&mut w, id, record);
    store.apply(w)?;
    Ok(())
}

/// Drops a file being sent, and its spool.
async fn forget(store: &LocalStore, home: &Path, id: &TransferId) -> Result<(), FilesError> {
    let mut w = WriteSet::default();
    LocalStore::remove_file_record(&mut w, id, false);
    store.apply(w)?;
    store.flush().await?;
    let _ = std::fs::remove_file(spool_path(home, id));
    Ok(())
}

/// Opens the group queue `target` puts into, if it is one (harmless when it is open;
/// a relay that lost it answers puts with `no_queue` until it is opened again).
async fn open_group<T: Transport>(net: &T, target: &Target) {
    if let Cap::Group(key) = &target.key {
        let open = ClientToRelay::OpenGroup {
            key: *key,
            token: Vec::new(),
        };
        let _ = super::ask(net, &target.addr, open, false).await;
    }
}

/// Which of `ids` the relay holds as put by us (`None` if it did not say).
async fn holds<T: Transport>(net: &T, target: &Target, ids: &[ChunkId]) -> Option<Vec<bool>> {
    let mut held = Vec::with_capacity(ids.len());
    for batch in ids.chunks(MAX_CHUNK_IDS) {
        let request = target.key.has(batch.to_vec());
        match super::ask(net, &target.addr, request, false).await {
            Answer::Ok(RelayToClient::ChunksHeld { held: h }) if h.len() == batch.len() => {
                held.extend(h)
            }
            _ => return None,
        }
    }
    Some(held)
}

/// What the workers of one upload share.
struct Worker {
    plan: Arc<Mutex<Plan>>,
    spool: Arc<File>,
    ids: Arc<Vec<ChunkId>>,
    places: Arc<Vec<(u64, usize)>>,
    notify: Arc<Notify>,
    claim: Arc<Claim>,
    enough: Arc<Vec<usize>>,
}

/// Puts chunks on relay `r` until it has all it should, or is left out.
async fn put_worker<T: Transport>(net: T, target: Target, r: usize, w: Worker) {
    loop {
        let pick = w.plan.lock().pick(r);
        let item = match pick {
            Pick::Done => return,
            Pick::Wait => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Pick::Item(item) => item,
        };
        let (at, len) = w.places[item];
        let mut data = vec![0u8; len];
        if let Err(e) = std::os::unix::fs::FileExt::read_exact_at(&*w.spool, &mut data, at) {
            let mut p = w.plan.lock();
            p.inflight[r][item] = false;
            p.out[r] = Some(format!("the sealed copy of the file cannot be read: {e}"));
            return;
        }
        let request = target
            .key
            .put(now_ms() / 1000 + CHUNK_TTL_SECS, w.ids[item], data);
        let answer = super::ask(&net, &target.addr, request, false).await;
        let mut reopen = false;
        let wait = {
            let mut p = w.plan.lock();
            p.inflight[r][item] = false;
            // Only a put's own answer counts as held.
            let answer = match answer {
                Answer::Ok(RelayToClient::Stored { .. }) => answer,
                Answer::Ok(other) => {
                    Answer::Transient(format!("an answer that is not a put's: {other:?}"))
                }
                other => other,
            };
            match answer {
                Answer::Ok(_) => {
                    p.hold(r, item);
                    p.failures[r] = 0;
                    p.bytes += len as u64;
                    let (done, bytes) = (p.on_at_least(&w.enough).min(w.ids.len() - 1), p.bytes);
                    w.claim.update(|l| {
                        l.done = done;
                        l.bytes = bytes;
                    });
                    w.notify.notify_one();
                    None
                }
                // Our share of its space for files to them is full: nothing more goes
                // there in this run (waiting seconds would not change it).
                Answer::Transient(why) if why.starts_with("quota_exceeded") => {
                    p.trouble[r] = Some(why.clone());
                    p.out[r] = Some(why);
                    None
                }
                Answer::Transient(why) => {
                    if why.starts_with("no_queue") {
                        reopen = true;
                    }
                    p.failures[r] += 1;
                    p.trouble[r] = Some(why.clone());
                    if p.failures[r] >= MAX_FAILURES {
                        p.out[r] = Some(why);
                        None
                    } else {
                        Some(backoff(p.failures[r]))
                    }
                }
                Answer::Refused(why) => {
                    p.trouble[r] = Some(why.clone());
                    p.out[r] = Some(why);
                    None
                }
                Answer::NotFound => {
                    p.out[r] = Some("it answered a put as if it were a read".into());
                    None
                }
            }
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
        if reopen {
            open_group(&net, &target).await;
        }
    }
}
