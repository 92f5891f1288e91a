//! Fetching a file a contact sent: its manifest, then its chunks from whichever of our
//! relays answer, each checked before it is written; then saving it where asked.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kkachi_protocol::file::{ChunkId, FileRef, Manifest, open_chunk};
use kkachi_protocol::group::GroupId;
use kkachi_protocol::wire::MAX_CHUNK_IDS;
use kkachi_protocol::{ClientToRelay, GroupKey, Multiaddr, ReadKey, RelayToClient};
use parking_lot::Mutex;

use super::{
    Answer, FilesError, MAX_FAILURES, PER_RELAY, Pick, backoff, bits_path, chunk_len, chunk_offset,
    disk, in_dir, manifest_path, part_path, private_dir, safe_name, sync_dir,
};
use crate::engine::Engine;
use crate::net::Transport;
use crate::store::{Incoming, IncomingState, LocalStore, TransferId, WriteSet};

/// Rounds of asking every relay for chunks none had, a few seconds apart, before a
/// fetch stops (it goes on later).
const ROUNDS: u32 = 3;

/// What a fetch did.
#[derive(Debug, Clone)]
pub struct FetchReport {
    /// Every chunk is here.
    pub complete: bool,
    /// Chunks of the file.
    pub chunks: usize,
    /// Chunks fetched by this run (a chunk fetched twice counts twice).
    pub fetched: usize,
    /// Chunks that came not matching their id (fetched again from another relay).
    pub bad: u64,
    /// Bytes fetched by this run.
    pub bytes: u64,
    /// How long this run took.
    pub elapsed: Duration,
}

/// Where a file's chunks are read: one of our relays and our inbox's read key there,
/// or a group relay and the key of the group queue there that holds them.
#[derive(Clone)]
struct Source {
    addr: Multiaddr,
    key: SourceKey,
}

#[derive(Clone)]
enum SourceKey {
    Inbox(ReadKey),
    Group(GroupKey),
}

impl Source {
    fn get(&self, id: ChunkId) -> ClientToRelay {
        match &self.key {
            SourceKey::Inbox(key) => ClientToRelay::GetChunk {
                key: key.clone(),
                id,
            },
            SourceKey::Group(key) => ClientToRelay::GetGroupChunk { key: *key, id },
        }
    }
}

/// Fetches the file `id` (waiting for a fetch of it already running here to end):
/// goes on from the chunks on disk, and marks it done once every one is.
pub async fn fetch<T: Transport>(
    engine: &Engine<T>,
    id: TransferId,
) -> Result<FetchReport, FilesError> {
    let claim = engine.transfers().claim_when_free(true, id).await;
    fetch_claimed(engine, claim).await
}

/// [`fetch`], with the transfer claimed already.
pub(super) async fn fetch_claimed<T: Transport>(
    engine: &Engine<T>,
    claim: super::Claim,
) -> Result<FetchReport, FilesError> {
    let id = claim.id;
    let claim = Arc::new(claim);
    let store = engine.store().clone();
    let home = store.home().to_path_buf();
    let started = Instant::now();
    let Some(mut record) = store.incoming_file(&id)? else {
        return Err(FilesError::Refused("no such file here".into()));
    };
    let file = record.file()?;
    let n = kkachi_protocol::file::chunk_count(file.size);
    let mut report = FetchReport {
        complete: false,
        chunks: n,
        fetched: 0,
        bad: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
    };
    if record.state == IncomingState::Done && part_path(&home, &id).exists() {
        report.complete = true;
        return Ok(report);
    }
    // Only for a message still here, from a contact not blocked.
    super::sweep(&store)?;
    // As the sweep left it (it may name another message that offered it now).
    let Some(swept) = store.incoming_file(&id)? else {
        return Err(FilesError::Refused(
            "that file's message is gone, or its sender was removed or blocked".into(),
        ));
    };
    record = swept;
    let offers = store.file_offers(&id)?;
    if let IncomingState::Failed(why) = &record.state {
        return Err(FilesError::Refused(format!(
            "that file cannot be fetched: {}",
            crate::sanitize::for_terminal(why)
        )));
    }
    let late = record.created_ms / 1000 + super::CHUNK_TTL_SECS;
    if crate::engine::now_ms() / 1000 > late {
        return fail(
            &store,
            &id,
            &mut record,
            "too late: relays keep files two weeks, and it was not fetched in time".into(),
        )
        .await;
    }
    if record.state != IncomingState::Fetching {
        record.state = IncomingState::Fetching;
        write_back(&store, &id, &record)?;
        store.flush().await?;
    }
    // Wherever a message offering it said it is: our own relays, group queues.
    let inbox = in_inbox(&offers);
    let mut sources = if inbox {
        our_relays(engine)?
    } else {
        Vec::new()
    };
    sources.extend(group_queues(engine, &offers).await);
    if sources.is_empty() {
        return Err(FilesError::Unavailable(if inbox {
            "you have no relays to fetch it from; add one with `kkachi relay add`".into()
        } else {
            "the group has no relay to fetch it from".into()
        }));
    }
    private_dir(&in_dir(&home))?;
    claim.update(|p| p.doing = "fetching its list of chunks");
    let manifest = match manifest(engine.net(), &home, &id, &file, &sources, &mut report).await {
        Ok(m) => m,
        Err(ManifestError::Broken(why)) => return fail(&store, &id, &mut record, why).await,
        Err(ManifestError::NotNow(e)) => {
            record.bad_chunks += report.bad;
            return again(&store, &id, &mut record, e).await;
        }
    };
    if manifest.size != file.size {
        let why = format!(
            "the file is {} bytes, not the {} its message said",
            manifest.size, file.size
        );
        return fail(&store, &id, &mut record, why).await;
    }
    let part_file = part_path(&home, &id);
    let bits_file = bits_path(&home, &id);
    let open = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .map_err(disk(p))
    };
    let part = Arc::new(open(&part_file)?);
    let bits = Arc::new(open(&bits_file)?);
    sync_dir(&in_dir(&home))?;
    // What is here already, checked again: a mark may have reached the disk before its
    // chunk did.
    let mut marks = vec![0u8; n.div_ceil(8)];
    let got = bits.read_at(&mut marks, 0).unwrap_or(0);
    marks[got..].fill(0);
    let mut have = vec![false; n];
    let mut buf = Vec::new();
    for (i, has) in have.iter_mut().enumerate() {
        if marks[i / 8] & (1 << (i % 8)) == 0 {
            continue;
        }
        buf.resize(chunk_len(file.size, i), 0);
        *has = part.read_exact_at(&mut buf, chunk_offset(i)).is_ok()
            && ChunkId::of(&buf) == manifest.chunks[i];
        if !*has {
            marks[i / 8] &= !(1 << (i % 8));
        }
    }
    let plan = Arc::new(Mutex::new(Plan {
        done: have.iter().filter(|h| **h).count(),
        have,
        marks,
        inflight: vec![None; n],
        tried: vec![vec![false; n]; sources.len()],
        failures: vec![0; sources.len()],
        out: vec![None; sources.len()],
        bad: 0,
        fetched: 0,
        bytes: 0,
    }));
    let ids = Arc::new(manifest.chunks.clone());
    claim.update(|p| {
        p.total = n;
        p.done = plan.lock().done;
        p.doing = "fetching";
    });
    let mut round = 0;
    loop {
        let mut workers = tokio::task::JoinSet::new();
        for (r, source) in sources.iter().enumerate() {
            for _ in 0..PER_RELAY {
                workers.spawn(get_worker(
                    engine.net().clone(),
                    source.clone(),
                    r,
                    Worker {
                        plan: plan.clone(),
                        part: part.clone(),
                        bits: bits.clone(),
                        ids: ids.clone(),
                        size: file.size,
                        claim: claim.clone(),
                    },
                ));
            }
        }
        loop {
            tokio::select! {
                joined = workers.join_next() => if joined.is_none() { break },
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            // Every chunk here: the workers left wait out a failed relay's backoff.
            if plan.lock().done == n {
                workers.abort_all();
                break;
            }
        }
        {
            let mut p = plan.lock();
            if p.done == n || round + 1 >= ROUNDS || p.out.iter().all(Option::is_some) {
                break;
            }
            // Chunks none of them had: the sender may still be putting them. Ask again.
            round += 1;
            for t in &mut p.tried {
                t.fill(false);
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let (done, bad, fetched, bytes, out) = {
        let p = plan.lock();
        (p.done, p.bad, p.fetched, p.bytes, p.out.clone())
    };
    report.bad += bad;
    report.fetched += fetched;
    report.bytes += bytes;
    report.elapsed = started.elapsed();
    record.bad_chunks += report.bad;
    if done < n {
        let why: Vec<String> = sources
            .iter()
            .zip(&out)
            .filter_map(|(s, w)| {
                w.as_ref()
                    .map(|w| format!("{}: {}", shown(&s.addr), crate::sanitize::for_terminal(w)))
            })
            .collect();
        let e = FilesError::Unavailable(format!(
            "{} of {n} chunks are here; the others are on none of your relays that answered{}; it goes on later",
            done,
            if why.is_empty() {
                String::new()
            } else {
                format!(" ({})", why.join("; "))
            }
        ));
        return again(&store, &id, &mut record, e).await;
    }
    part.sync_data().map_err(disk(&part_file))?;
    bits.sync_data().map_err(disk(&bits_file))?;
    sync_dir(&in_dir(&home))?;
    record.state = IncomingState::Done;
    record.attempts = 0;
    save(&store, &id, &record)?;
    store.flush().await?;
    report.complete = true;
    Ok(report)
}

/// Tells our relays to let go of the chunks of file `id`, fetched and on disk here (all
/// relays at once; one that does not answer drops them when they expire).
pub async fn release<T: Transport>(engine: &Engine<T>, id: TransferId) -> Result<(), FilesError> {
    let store = engine.store();
    let Some(record) = store.incoming_file(&id)? else {
        return Ok(());
    };
    // Only from our own queues: a group queue's chunks are every member's, nobody
    // deletes them, they expire.
    if record.state != IncomingState::Done || !in_inbox(&store.file_offers(&id)?) {
        return Ok(());
    }
    let file = record.file()?;
    let path = manifest_path(store.home(), &id);
    let sealed = std::fs::read(&path).map_err(disk(&path))?;
    let Ok(manifest) = Manifest::open(&file.key, &file.manifest, &sealed) else {
        return Ok(());
    };
    let mut all = manifest.chunks;
    all.push(file.manifest);
    let sources = our_relays(engine)?;
    futures::future::join_all(sources.iter().map(|source| {
        let all = &all;
        async move {
            let SourceKey::Inbox(key) = &source.key else {
                return;
            };
            for batch in all.chunks(MAX_CHUNK_IDS) {
                let request = ClientToRelay::DeleteChunks {
                    key: key.clone(),
                    ids: batch.to_vec(),
                };
                let _ = super::ask(engine.net(), &source.addr, request, true).await;
            }
        }
    }))
    .await;
    Ok(())
}

/// Our relays, and our inbox's read key at each; after a rotation of our session key,
/// the old key's inbox at each too, last (chunks put before contacts had our new card).
fn our_relays<T: Transport>(engine: &Engine<T>) -> Result<Vec<Source>, FilesError> {
    let relays: Vec<(Multiaddr, kkachi_protocol::PeerId)> = engine
        .store()
        .relays()?
        .iter()
        .filter_map(|r| {
            let addr: Multiaddr = r.addr.parse().ok()?;
            let relay = crate::net::peer_of(&addr)?;
            Some((addr, relay))
        })
        .collect();
    Ok(std::iter::once(engine.identity())
        .chain(engine.previous_identity())
        .flat_map(|me| {
            relays.iter().map(|(addr, relay)| Source {
                key: SourceKey::Inbox(me.inbox_key(relay)),
                addr: addr.clone(),
            })
        })
        .collect())
}

/// A relay's address as words say it (a group's relays are named by its admins).
fn shown(addr: &Multiaddr) -> String {
    crate::sanitize::for_terminal(&addr.to_string()).into_owned()
}

/// Whether a message offered the file in our own queues (from a contact, or a group
/// without group relays); so is one offered before offers were kept.
fn in_inbox(offers: &[crate::store::Offer]) -> bool {
    offers.is_empty() || offers.iter().any(|o| o.source.is_none())
}

/// The group queues that hold a file posted to a group with group relays: on the
/// group's relays as they were when its post came, and as they are now (members who
/// saw the relays change at different times look in the same places).
async fn group_queues<T: Transport>(
    engine: &Engine<T>,
    offers: &[crate::store::Offer],
) -> Vec<Source> {
    let mut out: Vec<Source> = Vec::new();
    for source in offers.iter().filter_map(|o| o.source.as_ref()) {
        let now = engine
            .group_epoch_queues(GroupId(source.group), source.epoch)
            .await
            .unwrap_or_default();
        let recorded = source
            .queues
            .iter()
            .filter_map(|(addr, key)| Some((addr.parse().ok()?, GroupKey(*key))));
        for (addr, key) in recorded.chain(now) {
            if !out
                .iter()
                .any(|s| s.addr == addr && matches!(s.key, SourceKey::Group(k) if k == key))
            {
                out.push(Source {
                    addr,
                    key: SourceKey::Group(key),
                });
            }
        }
    }
    out
}

/// Marks the file as one that cannot be fetched (its sender's fault, or too late).
async fn fail(
    store: &LocalStore,
    id: &TransferId,
    record: &mut Incoming,
    why: String,
) -> Result<FetchReport, FilesError> {
    record.state = IncomingState::Failed(why.clone());
    save(store, id, record)?;
    store.flush().await?;
    Err(FilesError::Refused(format!(
        "that file cannot be fetched: {}",
        crate::sanitize::for_terminal(&why)
    )))
}

/// Notes a fetch that stopped short: it is tried again on its own later, less often
/// each time.
async fn again(
    store: &LocalStore,
    id: &TransferId,
    record: &mut Incoming,
    e: FilesError,
) -> Result<FetchReport, FilesError> {
    record.attempts = record.attempts.saturating_add(1);
    record.retry_at_ms =
        crate::engine::now_ms() + super::retry_after(record.attempts).as_millis() as u64;
    save(store, id, record)?;
    store.flush().await?;
    Err(e)
}

/// Why there is no manifest.
enum ManifestError {
    /// Not now: no relay had it, or none answered.
    NotNow(FilesError),
    /// The sender's: it is the one the message names, and it does not open.
    Broken(String),
}

/// The file's manifest: from disk, or from the first relay that has one that opens.
async fn manifest<T: Transport>(
    net: &T,
    home: &Path,
    id: &TransferId,
    file: &FileRef,
    sources: &[Source],
    report: &mut FetchReport,
) -> Result<Manifest, ManifestError> {
    let path = manifest_path(home, id);
    if let Ok(sealed) = std::fs::read(&path)
        && let Ok(m) = Manifest::open(&file.key, &file.manifest, &sealed)
    {
        return Ok(m);
    }
    let mut why = Vec::new();
    for source in sources {
        let request = source.get(file.manifest);
        match super::ask(net, &source.addr, request, true).await {
            Answer::Ok(RelayToClient::Chunk { data }) => {
                match Manifest::open(&file.key, &file.manifest, &data) {
                    Ok(m) => {
                        let written = (|| {
                            let mut f = File::create(&path)?;
                            f.write_all(&data)?;
                            f.sync_all()
                        })();
                        written.map_err(|e| ManifestError::NotNow(disk(&path)(e)))?;
                        return Ok(m);
                    }
                    // The right bytes, and they do not open: the sender's doing, the
                    // same on every relay.
                    Err(e) if ChunkId::of(&data) == file.manifest => {
                        return Err(ManifestError::Broken(format!(
                            "its list of chunks does not open ({e}): the sender sent a broken file"
                        )));
                    }
                    Err(e) => {
                        report.bad += 1;
                        why.push(format!("{}: {e}", shown(&source.addr)));
                    }
                }
            }
            Answer::Ok(_) => why.push(format!(
                "{}: an answer that is not a chunk",
                shown(&source.addr)
            )),
            Answer::NotFound => why.push(format!("{}: not there", shown(&source.addr))),
            Answer::Transient(w) | Answer::Refused(w) => why.push(format!(
                "{}: {}",
                shown(&source.addr),
                crate::sanitize::for_terminal(&w)
            )),
        }
    }
    Err(ManifestError::NotNow(FilesError::Unavailable(format!(
        "the file's list of chunks could not be fetched ({}); it goes on later",
        why.join("; ")
    ))))
}

/// Writes the record back, unless it was removed meanwhile (its message deleted, its
/// sender removed or blocked) or the fetch was cancelled (`files --cancel` set it back
/// to offered and removed what was here): then the fetch stops, and never marks as
/// fetched a file whose bytes are gone.
fn save(store: &LocalStore, id: &TransferId, record: &Incoming) -> Result<(), FilesError> {
    let _turn = store.files_turn();
    if store
        .incoming_file(id)?
        .is_some_and(|now| now.state == IncomingState::Offered)
        && record.state != IncomingState::Offered
    {
        return Err(FilesError::Refused(
            "the fetch was cancelled; `kkachi get` starts it again".into(),
        ));
    }
    write_back_in_turn(store, id, record)
}

/// Writes the record back, unless it was removed meanwhile: then the fetch stops.
fn write_back(store: &LocalStore, id: &TransferId, record: &Incoming) -> Result<(), FilesError> {
    let _turn = store.files_turn();
    write_back_in_turn(store, id, record)
}

/// [`write_back`], for a caller holding [`LocalStore::files_turn`].
fn write_back_in_turn(
    store: &LocalStore,
    id: &TransferId,
    record: &Incoming,
) -> Result<(), FilesError> {
    let Some(stored) = store.incoming_file(id)? else {
        return Err(FilesError::Refused(
            "its message is gone, or its sender was removed or blocked".into(),
        ));
    };
    // Named by the message the sweep left it with meanwhile.
    let mut record = record.clone();
    record.contact = stored.contact;
    record.message = stored.message;
    let mut w = WriteSet::default();
    LocalStore::write_incoming_file(&mut w, id, &record);
    store.apply(w)?;
    Ok(())
}

struct Plan {
    have: Vec<bool>,
    marks: Vec<u8>,
    /// The relay each chunk is being fetched from.
    inflight: Vec<Option<usize>>,
    tried: Vec<Vec<bool>>,
    failures: Vec<u32>,
    out: Vec<Option<String>>,
    done: usize,
    bad: u64,
    fetched: usize,
    bytes: u64,
}

impl Plan {
    fn pick(&mut self, r: usize) -> Pick {
        if self.out[r].is_some() {
            return Pick::Done;
        }
        let mut waiting = false;
        for i in 0..self.have.len() {
            if self.have[i] || self.tried[r][i] || self.inflight[i] == Some(r) {
                continue;
            }
            // Under way from a relay that has not failed lately: wait for it. From one
            // that has, it may never end: fetch it here too.
            if let Some(q) = self.inflight[i]
                && self.failures[q] == 0
            {
                waiting = true;
                continue;
            }
            self.inflight[i] = Some(r);
            return Pick::Item(i);
        }
        if waiting { Pick::Wait } else { Pick::Done }
    }
}

struct Worker {
    plan: Arc<Mutex<Plan>>,
    part: Arc<File>,
    bits: Arc<File>,
    ids: Arc<Vec<ChunkId>>,
    size: u64,
    claim: Arc<super::Claim>,
}

/// Fetches chunks from relay `r` until none is left that it may have.
async fn get_worker<T: Transport>(net: T, source: Source, r: usize, w: Worker) {
    loop {
        let pick = w.plan.lock().pick(r);
        let i = match pick {
            Pick::Done => return,
            Pick::Wait => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Pick::Item(i) => i,
        };
        let request = source.get(w.ids[i]);
        let answer = super::ask(&net, &source.addr, request, true).await;
        let mut wait = None;
        match answer {
            Answer::Ok(RelayToClient::Chunk { data })
                if data.len() == chunk_len(w.size, i) && ChunkId::of(&data) == w.ids[i] =>
            {
                // The bytes first, then the mark.
                let written = w.part.write_all_at(&data, chunk_offset(i));
                let mut p = w.plan.lock();
                if p.inflight[i] == Some(r) {
                    p.inflight[i] = None;
                }
                p.fetched += 1;
                p.bytes += data.len() as u64;
                p.failures[r] = 0;
                if let Err(e) = written {
                    p.out[r] = Some(format!("cannot write the file here: {e}"));
                    return;
                }
                // (Fetched from two relays: the same bytes, counted once.)
                if !p.have[i] {
                    p.have[i] = true;
                    p.marks[i / 8] |= 1 << (i % 8);
                    let _ = w.bits.write_all_at(&p.marks[i / 8..=i / 8], (i / 8) as u64);
                    p.done += 1;
                }
                let (done, bytes) = (p.done, p.bytes);
                w.claim.update(|l| {
                    l.done = done;
                    l.bytes = bytes;
                });
            }
            Answer::Ok(_) => {
                // Wrong bytes: counted, and fetched from another relay.
                let mut p = w.plan.lock();
                if p.inflight[i] == Some(r) {
                    p.inflight[i] = None;
                }
                p.bad += 1;
                p.tried[r][i] = true;
                tracing::warn!(relay = %source.addr, chunk = i, "a relay served a chunk that does not match its id; it is fetched elsewhere");
            }
            Answer::NotFound => {
                let mut p = w.plan.lock();
                if p.inflight[i] == Some(r) {
                    p.inflight[i] = None;
                }
                p.tried[r][i] = true;
            }
            Answer::Transient(why) => {
                let mut p = w.plan.lock();
                if p.inflight[i] == Some(r) {
                    p.inflight[i] = None;
                }
                p.failures[r] += 1;
                if p.failures[r] >= MAX_FAILURES {
                    p.out[r] = Some(why);
                } else {
                    wait = Some(backoff(p.failures[r]));
                }
            }
            Answer::Refused(why) => {
                let mut p = w.plan.lock();
                if p.inflight[i] == Some(r) {
                    p.inflight[i] = None;
                }
                p.out[r] = Some(why);
            }
        }
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Writes the fetched file `id` into `dir` under its own name (made safe, and made
/// unique with ` (1)`, ` (2)`… if taken), opening every chunk; returns the path. The
/// file appears whole or not at all.
pub fn export(store: &LocalStore, id: &TransferId, dir: &Path) -> Result<PathBuf, FilesError> {
    let home = store.home().to_path_buf();
    let Some(mut record) = store.incoming_file(id)? else {
        return Err(FilesError::Refused("no such file here".into()));
    };
    if record.state != IncomingState::Done {
        return Err(FilesError::Refused("that file is not fetched yet".into()));
    }
    let file = record.file()?;
    let path = manifest_path(&home, id);
    let sealed = std::fs::read(&path).map_err(disk(&path))?;
    let manifest = Manifest::open(&file.key, &file.manifest, &sealed).map_err(|e| {
        FilesError::Refused(format!("the file's list of chunks here is damaged: {e}"))
    })?;
    std::fs::create_dir_all(dir).map_err(disk(dir))?;
    let name = safe_name(&file.name);
    let tmp = tempfile::Builder::new()
        .prefix(".kkachi-saving-")
        .tempfile_in(dir)
        .map_err(disk(dir))?;
    let part_file = part_path(&home, id);
    let part = File::open(&part_file).map_err(disk(&part_file))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file());
    let mut buf = Vec::new();
    for (i, chunk) in manifest.chunks.iter().enumerate() {
        buf.resize(chunk_len(file.size, i), 0);
        part.read_exact_at(&mut buf, chunk_offset(i))
            .map_err(disk(&part_file))?;
        let plain = match open_chunk(&file.key, chunk, i, file.size, &buf) {
            Ok(plain) => plain,
            // The bytes its sender named, and they do not open: the sender's doing, the
            // same on every relay. It cannot be fetched.
            Err(e) if ChunkId::of(&buf) == *chunk => {
                let why = format!("chunk {i} does not open ({e}): the sender sent a broken file");
                record.state = IncomingState::Failed(why.clone());
                save(store, id, &record)?;
                return Err(FilesError::Refused(format!(
                    "that file cannot be saved: {why}"
                )));
            }
            Err(e) => {
                // Damaged here, on this disk: that chunk is fetched again.
                let bits = bits_path(&home, id);
                if let Ok(f) = OpenOptions::new().read(true).write(true).open(&bits) {
                    let mut byte = [0u8; 1];
                    if f.read_exact_at(&mut byte, (i / 8) as u64).is_ok() {
                        byte[0] &= !(1 << (i % 8));
                        let _ = f.write_all_at(&byte, (i / 8) as u64);
                        let _ = f.sync_data();
                    }
                }
                record.state = IncomingState::Fetching;
                save(store, id, &record)?;
                return Err(FilesError::Refused(format!(
                    "chunk {i} of the file is damaged on this disk ({e}); `kkachi get` again fetches it anew while your relays still hold it (two weeks from when it was sent)"
                )));
            }
        };
        out.write_all(&plain).map_err(disk(tmp.path()))?;
    }
    out.flush().map_err(disk(tmp.path()))?;
    drop(out);
    tmp.as_file().sync_all().map_err(disk(tmp.path()))?;
    // A free name; if another appears meanwhile, the next one.
    let mut tmp = tmp;
    let mut taken = 0;
    let target = loop {
        let target = unique(dir, &name, taken);
        match tmp.persist_noclobber(&target) {
            Ok(_) => break target,
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists && taken < 1000 => {
                tmp = e.file;
                taken += 1;
            }
            Err(e) => return Err(disk(&target)(e.error)),
        }
    };
    sync_dir(dir)?;
    record.saved.push(target.display().to_string());
    save(store, id, &record)?;
    Ok(target)
}

/// `dir/name`, or with ` (1)`, ` (2)`… before its extension if that is taken (by
/// anything, a dangling link included), starting past the first `skip` names free.
fn unique(dir: &Path, name: &str, skip: usize) -> PathBuf {
    let free = |p: &PathBuf| std::fs::symlink_metadata(p).is_err();
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() && e.len() <= 16 => (s, format!(".{e}")),
        _ => (name, String::new()),
    };
    // Room for " (1000)" within the 255 bytes a name may have.
    let mut stem = stem.to_owned();
    while stem.len() + ext.len() + 7 > kkachi_protocol::file::MAX_NAME_BYTES {
        stem.pop();
    }
    std::iter::once(dir.join(name))
        .chain((1..).map(|k| dir.join(format!("{stem} ({k}){ext}"))))
        .filter(free)
        .nth(skip)
        .expect("some name is free")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Incoming;

    /// A fetch cancelled while it runs (set back to offered, its bytes removed) stops
    /// at its next write, rather than marking fetched a file whose bytes are gone.
    #[test]
    fn a_fetch_cancelled_under_way_does_not_mark_the_file_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, _) = LocalStore::provision(dir.path(), "Me", &[]).unwrap();
        let id = [3; 32];
        let offered = Incoming {
            contact: Vec::new(),
            message: [1; 16],
            reference: Vec::new(),
            state: IncomingState::Offered,
            bad_chunks: 0,
            saved: Vec::new(),
            created_ms: 0,
            auto: false,
            attempts: 0,
            retry_at_ms: 0,
        };
        let mut w = WriteSet::default();
        LocalStore::write_incoming_file(&mut w, &id, &offered);
        store.apply(w).unwrap();
        // Starting from offered is allowed...
        let fetching = Incoming {
            state: IncomingState::Fetching,
            ..offered.clone()
        };
        write_back(&store, &id, &fetching).unwrap();
        save(&store, &id, &fetching).unwrap();
        // ...and once cancelled (back to offered), the fetch's next write is refused.
        let mut w = WriteSet::default();
        LocalStore::write_incoming_file(&mut w, &id, &offered);
        store.apply(w).unwrap();
        let done = Incoming {
            state: IncomingState::Done,
            ..offered
        };
        let e = save(&store, &id, &done).unwrap_err();
        assert!(
            matches!(&e, FilesError::Refused(why) if why.contains("cancelled")),
            "{e}"
        );
        assert_eq!(
            store.incoming_file(&id).unwrap().unwrap().state,
            IncomingState::Offered
        );
    }
}
