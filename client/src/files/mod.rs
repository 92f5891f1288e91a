//! Files and photos (SPEC §13): sealed once under a key of their own, cut into chunks,
//! put on the recipient's relays, and fetched from whichever of ours answer.
//!
//! Sending (`upload.rs`): the file is read once and sealed into a spool file beside the
//! database (`HOME/files/out/<id>`), and its record written, before anything is said to
//! be sent: from then on the send survives any crash, as a message in the outbox does.
//! The chunks go to the contact's relays, several at a time on each; a chunk that one
//! relay does not take goes to another. Small files go to every relay, larger ones to
//! two (any one relay can be lost). Once every chunk is on two relays (or on every relay
//! the contact has, when fewer), the message carrying the file's reference is queued, in
//! the same write that records it went, so it never goes twice. What each relay holds
//! is recorded as the upload goes and asked of the relay again when it goes on.
//!
//! Receiving (`download.rs`): the message's reference is stored with it. Fetching takes
//! the manifest, then the chunks, several at a time from each of our relays; each is
//! checked against its id before it is written, and one that does not match is fetched
//! from another relay. Chunks are written, still sealed, into `HOME/files/in/<id>.part`
//! at their places, and a bitfield beside it marks each once its bytes are written; on
//! going on, every marked chunk is checked again, so a torn write costs one chunk.
//! Saving (`get`) opens the chunks into the folder asked for. What is on disk under the
//! home stays sealed: the key is only in the (encrypted) database.

mod download;
mod live;
pub mod picture;
mod upload;

use std::path::{Path, PathBuf};

use kkachi_protocol::file::{FileRef, MAX_CHUNK};
use kkachi_protocol::wire::ErrorCode;
use kkachi_protocol::{PeerId, RelayToClient};
use thiserror::Error;

use crate::engine::{Engine, EngineError};
use crate::net::{NetError, Transport};
use crate::store::{IncomingState, StoreError, TransferId};

pub use download::{FetchReport, export, fetch, release};
pub use live::{Claim, Live, LiveProgress};
pub use upload::{LEAVE_OUT_AFTER_MS, To, UploadReport, prepare, prepare_forward, upload};

/// Files up to this size go to every relay of the recipient; larger ones to two.
pub const SMALL_FILE: u64 = 1 << 20;
/// Images up to this size are fetched as soon as their message arrives (by a running
/// daemon or UI); anything else when asked (`kkachi get`).
pub const AUTO_FETCH_MAX: u64 = 8 << 20;
/// Requests in flight to one relay at a time, per transfer.
pub const PER_RELAY: usize = 6;
/// Consecutive failures after which a relay is left out of a transfer until it is
/// tried again.
const MAX_FAILURES: u32 = 6;
/// How long chunks are kept on relays (as envelopes are): the recipient has this long
/// to fetch a file.
pub const CHUNK_TTL_SECS: u64 = kkachi_protocol::envelope::DEFAULT_TTL_SECS;

/// Why a file could not be sent or fetched.
#[derive(Debug, Error)]
pub enum FilesError {
    /// The request cannot be done as asked (the reason says what to do).
    #[error("{0}")]
    Refused(String),
    /// Reading the file to send failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Writing or reading the files kept beside the database failed.
    #[error("{path}: {source}")]
    Disk {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not now: no relay took (or held) what was needed. It is tried again.
    #[error("{0}")]
    Unavailable(String),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine refused or stopped.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

fn disk(path: &Path) -> impl FnOnce(std::io::Error) -> FilesError + '_ {
    move |source| FilesError::Disk {
        path: path.to_path_buf(),
        source,
    }
}

/// Lowercase hex of a transfer id.
pub fn hex(id: &TransferId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where files being sent are spooled.
pub fn out_dir(home: &Path) -> PathBuf {
    home.join("files").join("out")
}

/// Where files received are kept (sealed) as they arrive.
pub fn in_dir(home: &Path) -> PathBuf {
    home.join("files").join("in")
}

fn spool_path(home: &Path, id: &TransferId) -> PathBuf {
    out_dir(home).join(hex(id))
}

fn part_path(home: &Path, id: &TransferId) -> PathBuf {
    in_dir(home).join(format!("{}.part", hex(id)))
}

fn bits_path(home: &Path, id: &TransferId) -> PathBuf {
    in_dir(home).join(format!("{}.bits", hex(id)))
}

fn manifest_path(home: &Path, id: &TransferId) -> PathBuf {
    in_dir(home).join(format!("{}.manifest", hex(id)))
}

/// Creates `dir` (and its parents) readable by the user alone.
fn private_dir(dir: &Path) -> Result<(), FilesError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(disk(dir))
}

/// Makes a rename or a new file in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), FilesError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(disk(dir))
}

/// Where chunk `index` starts in a spool or partial file: every chunk but the last is
/// [`MAX_CHUNK`] bytes, so each has a fixed place.
fn chunk_offset(index: usize) -> u64 {
    (index * MAX_CHUNK) as u64
}

/// The sealed length of chunk `index` of a file of `size` bytes.
fn chunk_len(size: u64, index: usize) -> usize {
    kkachi_protocol::file::padded_len(size, index) + kkachi_protocol::file::TAG_BYTES
}

/// A file name as it may be written to disk: no path, no control or invisible
/// characters, not hidden, not empty, at most 255 bytes.
pub fn safe_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let mut clean: String = last
        .chars()
        .filter(|c| !c.is_control() && !kkachi_protocol::card::is_invisible(*c))
        .collect();
    clean = clean.trim().trim_start_matches('.').trim().to_owned();
    if clean.is_empty() {
        clean = "file".into();
    }
    while clean.len() > kkachi_protocol::file::MAX_NAME_BYTES {
        clean.pop();
    }
    clean
}

/// The media type of a file, by its name's extension (empty if unknown).
pub fn media_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "bmp" => "image/bmp",
        "heic" => "image/heic",
        "svg" => "image/svg+xml",
        "pdf" => "application/pdf",
        "txt" | "md" | "log" => "text/plain",
        "csv" => "text/csv",
        "json" => "application/json",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "mp3" => "audio/mpeg",
        "ogg" | "opus" => "audio/ogg",
        "m4a" => "audio/mp4",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        "mov" => "video/quicktime",
        "webm" => "video/webm",
        "doc" | "docx" => "application/msword",
        "odt" => "application/vnd.oasis.opendocument.text",
        _ => "",
    }
}

/// A size for people: `812 B`, `3.4 MB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

/// The extensions `/open` hands to the desktop, and how each such file starts: pictures,
/// recordings, PDFs and plain text, never what a desktop might run or render as a page
/// (no SVG, HTML, Markdown, spreadsheets).
const OPENABLE: &[(&str, &[&[u8]])] = &[
    ("png", &[b"\x89PNG\r\n\x1a\n"]),
    ("jpg", &[b"\xff\xd8\xff"]),
    ("jpeg", &[b"\xff\xd8\xff"]),
    ("gif", &[b"GIF87a", b"GIF89a"]),
    ("webp", &[b"RIFF"]),
    ("pdf", &[b"%PDF-"]),
    ("mp3", &[b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"]),
    ("ogg", &[b"OggS"]),
    ("opus", &[b"OggS"]),
    ("wav", &[b"RIFF"]),
    ("m4a", &[]),
    ("mp4", &[]),
    ("mov", &[]),
    ("txt", &[]),
];

/// Whether a file named `name` (as it is saved) is one `/open` may hand to the desktop:
/// by the saved name's own extension, never the type its sender claimed.
pub fn opens_safely(name: &str) -> bool {
    let name = safe_name(name);
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    OPENABLE.iter().any(|(e, _)| *e == ext)
}

/// Whether the saved file at `path` is what its extension says (its first bytes), so
/// the desktop, which may judge by content, opens it as that: a "photo" that is really
/// a web page is not opened. Text must be UTF-8 with nothing that makes it a script, a
/// page or a launcher.
pub fn content_matches(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    let Some((_, magics)) = OPENABLE.iter().find(|(e, _)| *e == ext) else {
        return false;
    };
    let mut head = vec![0u8; 4096];
    let n = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .unwrap_or(0);
    let head = &head[..n];
    match ext.as_str() {
        // ISO media: a box size, then "ftyp".
        "m4a" | "mp4" | "mov" => head.get(4..8) == Some(b"ftyp".as_slice()),
        "txt" => {
            let text = String::from_utf8_lossy(head);
            !head.contains(&0)
                && std::str::from_utf8(head).is_ok_or_truncated()
                && !["#!", "<", "[Desktop"]
                    .iter()
                    .any(|p| text.trim_start().starts_with(p))
        }
        _ => magics.iter().any(|m| head.starts_with(m)),
    }
}

/// UTF-8 whose only fault may be a character cut at the end of what was read.
trait Utf8Prefix {
    fn is_ok_or_truncated(&self) -> bool;
}

impl Utf8Prefix for Result<&str, std::str::Utf8Error> {
    fn is_ok_or_truncated(&self) -> bool {
        match self {
            Ok(_) => true,
            Err(e) => e.error_len().is_none(),
        }
    }
}

/// Whether a file of this type and size is fetched as soon as its message arrives.
pub fn fetched_at_once(file: &FileRef) -> bool {
    file.mime.starts_with("image/") && file.size <= AUTO_FETCH_MAX
}

/// How a relay's answer or failure counts for a transfer.
#[derive(Debug)]
enum Answer {
    /// Done as asked.
    Ok(RelayToClient),
    /// Not held there (a get).
    NotFound,
    /// Not now: unreachable, rate limited, full, shutting down. Tried again later.
    Transient(String),
    /// This relay will not do it for this transfer (no files here, too large...).
    Refused(String),
}

fn classify(result: Result<RelayToClient, NetError>) -> Answer {
    let refusal = |code: ErrorCode, message: String| {
        let reason = format!("{}: {}", code.as_str(), message);
        match code {
            ErrorCode::NotFound => Answer::NotFound,
            ErrorCode::RateLimited
            | ErrorCode::StorageFull
            | ErrorCode::Internal
            | ErrorCode::ShuttingDown
            | ErrorCode::QuotaExceeded
            | ErrorCode::NoQueue => Answer::Transient(reason),
            _ => Answer::Refused(reason),
        }
    };
    match result {
        Err(e) => Answer::Transient(e.to_string()),
        Ok(RelayToClient::Error { code, message }) => refusal(code, message),
        Ok(RelayToClient::Stored { mut outcomes, .. }) if outcomes.len() == 1 => {
            match outcomes.remove(0) {
                kkachi_protocol::wire::PutOutcome::Rejected { code, message } => {
                    refusal(code, message)
                }
                outcome => Answer::Ok(RelayToClient::Stored {
                    outcomes: vec![outcome],
                    epoch: 0,
                }),
            }
        }
        Ok(answer) => Answer::Ok(answer),
    }
}

/// What a worker of a transfer does next.
enum Pick {
    /// Move this chunk.
    Item(usize),
    /// Nothing now: others are under way that may fail.
    Wait,
    /// Nothing left for this relay.
    Done,
}

/// Sends `request` to the relay at `addr` (as the identity that reads our own queues if
/// `reader`, else as the one that writes into contacts'), within the time one attempt
/// may take, and says how the answer counts.
async fn ask<T: Transport>(
    net: &T,
    addr: &kkachi_protocol::Multiaddr,
    request: kkachi_protocol::ClientToRelay,
    reader: bool,
) -> Answer {
    let exchange = async {
        if reader {
            net.request_as_reader(addr, request).await
        } else {
            net.request(addr, request).await
        }
    };
    classify(
        tokio::time::timeout(crate::engine::ATTEMPT_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(NetError::Unreachable("no answer in time".into()))),
    )
}

/// The wait before trying a relay again after `failures` failures in a row.
fn backoff(failures: u32) -> std::time::Duration {
    std::time::Duration::from_millis((250u64 << failures.min(5)).min(5_000))
}

/// The wait before a transfer that stopped short is tried again on its own, after
/// `attempts` such stops in a row: 20 s, doubling, at most half an hour.
pub fn retry_after(attempts: u32) -> std::time::Duration {
    std::time::Duration::from_secs((20u64 << attempts.min(7).saturating_sub(1)).min(1800))
}

/// How far back a contact's messages are searched for another message carrying a file
/// whose message went.
const SWEEP_LOOKBACK: usize = 10_000;

/// Transfers run on their own at once, at most (others wait for the next round).
pub const MAX_RUNNING: usize = 4;
/// Bytes of files fetched on their own (without being asked) kept per contact, and in
/// all: past these, images wait to be asked for like any file, so a contact sending
/// picture after picture cannot fill the disk.
pub const AUTO_FETCH_PER_CONTACT: u64 = 64 << 20;
/// See [`AUTO_FETCH_PER_CONTACT`].
pub const AUTO_FETCH_TOTAL: u64 = 512 << 20;

/// Removes what no longer belongs here: files of messages gone (deleted, run out) and
/// of people removed or blocked, with what was fetched of them; files being sent to
/// people removed or blocked, with their sealed copies. Returns how many.
pub fn sweep(store: &crate::store::LocalStore) -> Result<usize, FilesError> {
    let _turn = store.files_turn();
    let home = store.home().to_path_buf();
    let (outgoing, incoming) = store.file_transfers()?;
    let mut w = crate::store::WriteSet::default();
    let mut gone = Vec::new();
    let wanted = |peer: Option<PeerId>| -> Result<Option<PeerId>, FilesError> {
        let Some(peer) = peer else { return Ok(None) };
        Ok((store.contact(&peer)?.is_some() && store.blocked(&peer)?.is_none()).then_some(peer))
    };
    let carries = |m: &crate::store::MessageRecord, id: &TransferId| {
        !m.deleted
            && m.file
                .as_ref()
                .and_then(|f| f.file())
                .is_some_and(|f| f.id() == *id)
    };
    // A group's file stays while the group is here, and so is its message, from a
    // sender not blocked.
    let group_here = |group: &kkachi_protocol::group::GroupId| -> Result<bool, FilesError> {
        Ok(store.group(group)?.is_some_and(|g| !g.forgotten))
    };
    // Whether the message `r` names (its sender and its id) is here, from someone not
    // removed or blocked, and carries file `id`.
    let offered = |r: &crate::store::Incoming, id: &TransferId| -> Result<bool, FilesError> {
        Ok(match (r.group(), wanted(r.contact())?) {
            (Some(group), _) => match r.member() {
                Some(from) => {
                    group_here(&group)?
                        && store.blocked(&from)?.is_none()
                        && store
                            .group_message_by_id(&group, &from, &r.message)?
                            .is_some_and(|m| carries(&m.message, id))
                }
                None => false,
            },
            (None, Some(peer)) => store
                .message(&peer, &kkachi_protocol::MessageId(r.message))?
                .is_some_and(|(_, m)| carries(&m, id)),
            (None, None) => false,
        })
    };
    for (id, r) in &incoming {
        // The messages that offered it and are still here (one offered before offers
        // were kept counts as its own).
        let stored = store.file_offers(id)?;
        let mut offers = stored.clone();
        if offers.is_empty() {
            offers.push(crate::store::Offer {
                from: r.contact.clone(),
                message: r.message,
                source: None,
                at_ms: r.created_ms,
            });
        }
        let mut here = Vec::with_capacity(offers.len());
        for o in offers {
            let mut probe = r.clone();
            probe.contact.clone_from(&o.from);
            probe.message = o.message;
            if offered(&probe, id)? {
                here.push(o);
            }
        }
        // Its contact's message is gone, but the same file is in another message of
        // theirs (sent again): it stays, offered by that one.
        if here.is_empty()
            && r.group().is_none()
            && let Some(peer) = wanted(r.contact())?
            && let Some(m) = store
                .recent_messages(&peer, SWEEP_LOOKBACK)?
                .into_iter()
                .rev()
                .find(|m| carries(m, id))
        {
            here.push(crate::store::Offer {
                from: r.contact.clone(),
                message: m.id,
                source: None,
                at_ms: r.created_ms,
            });
        }
        let Some(first) = here.first() else {
            crate::store::LocalStore::remove_file_record(&mut w, id, true);
            gone.push(vec![
                part_path(&home, id),
                bits_path(&home, id),
                manifest_path(&home, id),
            ]);
            continue;
        };
        // Named by a message still here; offered by those still here only (where the
        // others said it is is asked no more).
        if !here
            .iter()
            .any(|o| o.from == r.contact && o.message == r.message)
        {
            let mut moved = r.clone();
            moved.contact.clone_from(&first.from);
            moved.message = first.message;
            crate::store::LocalStore::write_incoming_file(&mut w, id, &moved);
        }
        if here != stored {
            crate::store::LocalStore::write_file_offers(&mut w, id, &here);
        }
    }
    for id in store.orphan_file_offers()? {
        crate::store::LocalStore::remove_file_record(&mut w, &id, true);
    }
    for (id, r) in &outgoing {
        let gone_away = match r.group() {
            // Still going out while we are in the group (the upload checks that we may
            // post); once sent, the record stays as the group's does.
            Some(group) => !group_here(&group)?,
            None => wanted(r.contact())?.is_none(),
        };
        if gone_away {
            crate::store::LocalStore::remove_file_record(&mut w, id, false);
            gone.push(vec![spool_path(&home, id)]);
        }
    }
    let n = gone.len();
    #[cfg(test)]
    sweep_pause(&home);
    store.apply(w)?;
    for paths in gone {
        for p in paths {
            let _ = std::fs::remove_file(p);
        }
    }
    // Sealing left part-way by a process that died: an hour old is no one's any more.
    if let Ok(entries) = std::fs::read_dir(out_dir(&home)) {
        for entry in entries.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(3600));
            if stale && entry.file_name().to_string_lossy().starts_with(".sealing-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(n)
}

/// What a sweep of the home named runs between reading and writing (tests only: what
/// another writes meanwhile, if it can, lands in between).
#[cfg(test)]
pub(crate) type SweepPause = (std::path::PathBuf, std::sync::Arc<dyn Fn() + Send + Sync>);
/// See [`SweepPause`].
#[cfg(test)]
pub(crate) static SWEEP_PAUSE: parking_lot::Mutex<Option<SweepPause>> =
    parking_lot::Mutex::new(None);

#[cfg(test)]
fn sweep_pause(home: &std::path::Path) {
    let pause = SWEEP_PAUSE
        .lock()
        .as_ref()
        .filter(|(of, _)| of == home)
        .map(|(_, pause)| pause.clone());
    if let Some(pause) = pause {
        pause();
    }
}

/// Goes on with transfers left part-way: files being sent, files asked for, and (with
/// `auto`) images fetched on their own within [`AUTO_FETCH_PER_CONTACT`] and
/// [`AUTO_FETCH_TOTAL`]. Each runs on its own task, at most [`MAX_RUNNING`] at once;
/// those already running, and those waiting to be tried again, are left alone.
pub fn resume<T: Transport>(
    engine: &Engine<T>,
    auto: bool,
) -> Result<Vec<tokio::task::JoinHandle<()>>, FilesError> {
    sweep(engine.store())?;
    let (outgoing, incoming) = engine.store().file_transfers()?;
    let now = crate::engine::now_ms();
    let live = engine.transfers();
    let mut started = Vec::new();
    let room = |started: &Vec<_>| live.count() < MAX_RUNNING && started.len() < MAX_RUNNING;
    for (id, record) in outgoing {
        if record.finished || record.retry_at_ms > now || !room(&started) {
            continue;
        }
        let Some(claim) = live.claim(false, id) else {
            continue;
        };
        let engine = engine.clone();
        started.push(tokio::spawn(async move {
            if let Err(e) = upload(&engine, claim).await {
                tracing::info!(file = %hex(&id), error = %e, "a file upload stopped short; it goes on later");
            }
        }));
    }
    // Whom a picture fetched on its own counts against: its contact; for a group's,
    // the group and the member who sent it.
    let owners = |r: &crate::store::Incoming| -> Vec<Vec<u8>> {
        match (r.group(), r.member()) {
            (Some(group), Some(from)) => vec![crate::store::group_key(&group), from.to_bytes()],
            _ => vec![r.contact.clone()],
        }
    };
    // What each contact's (and group's) pictures fetched on their own hold already.
    let mut auto_bytes: std::collections::HashMap<Vec<u8>, u64> = Default::default();
    let mut auto_total = 0;
    for (_, r) in &incoming {
        if r.auto && matches!(r.state, IncomingState::Fetching | IncomingState::Done) {
            let size = r.file().map_or(0, |f| f.size);
            for owner in owners(r) {
                *auto_bytes.entry(owner).or_default() += size;
            }
            auto_total += size;
        }
    }
    for (id, record) in incoming {
        if record.retry_at_ms > now || !room(&started) {
            continue;
        }
        match &record.state {
            IncomingState::Fetching => {}
            IncomingState::Offered if auto => {
                let Ok(file) = record.file() else { continue };
                let owners = owners(&record);
                let over = owners.iter().any(|o| {
                    auto_bytes.get(o).copied().unwrap_or(0) + file.size > AUTO_FETCH_PER_CONTACT
                });
                if !fetched_at_once(&file) || over || auto_total + file.size > AUTO_FETCH_TOTAL {
                    continue;
                }
                for owner in owners {
                    *auto_bytes.entry(owner).or_default() += file.size;
                }
                auto_total += file.size;
                // As it is now: still offered (not asked for, moved or gone meanwhile),
                // and no fetch of it still stopping (one cancelled a moment ago would
                // take the mark as its own and go on).
                let store = engine.store();
                let _turn = store.files_turn();
                let Some(mut current) = store
                    .incoming_file(&id)?
                    .filter(|r| r.state == IncomingState::Offered && !live.busy(true, &id))
                else {
                    continue;
                };
                current.auto = true;
                current.state = IncomingState::Fetching;
                let mut w = crate::store::WriteSet::default();
                crate::store::LocalStore::write_incoming_file(&mut w, &id, &current);
                store.apply(w)?;
            }
            _ => continue,
        }
        let Some(claim) = live.claim(true, id) else {
            continue;
        };
        let engine = engine.clone();
        started.push(tokio::spawn(async move {
            match download::fetch_claimed(&engine, claim).await {
                Ok(_) => {
                    if let Err(e) = release(&engine, id).await {
                        tracing::info!(file = %hex(&id), error = %e, "relays not told to let a file go");
                    }
                }
                Err(e) => {
                    tracing::info!(file = %hex(&id), error = %e, "a file download stopped short; it goes on later")
                }
            }
        }));
    }
    Ok(started)
}

/// Keeps transfers going in a running daemon or UI: what arrives that is fetched at
/// once, and what stopped part-way, tried again every `every`.
pub fn keep_going<T: Transport>(
    engine: Engine<T>,
    every: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut events = engine.subscribe();
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                event = events.recv() => match event {
                    Ok(crate::engine::AppEvent::Message(r))
                        if r.message.file.is_some()
                            || r.change == Some(crate::engine::Change::Deleted) => {}
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
            if let Err(e) = resume(&engine, true) {
                tracing::warn!(error = %e, "cannot go on with file transfers");
            }
        }
    })
}

/// A transfer named by the start of its id (the file's id, as `history --json` and
/// `files` show it) or of the id of the message that carried it: (incoming, id).
pub fn find_transfer(
    store: &crate::store::LocalStore,
    spec: &str,
) -> Result<(bool, TransferId), FilesError> {
    let spec = spec.trim().to_ascii_lowercase();
    if spec.len() < 6 || !spec.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FilesError::Refused(format!(
            "{spec:?} is not a file id: give the id `kkachi files` shows (6 characters or more)"
        )));
    }
    let (outgoing, incoming) = store.file_transfers()?;
    let message_hex = |m: &[u8; 16]| m.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut found: Vec<(bool, TransferId)> = Vec::new();
    for (id, r) in &incoming {
        // By any message that offered it, not only the one it is named by.
        let by_message = message_hex(&r.message).starts_with(&spec)
            || store
                .file_offers(id)?
                .iter()
                .any(|o| message_hex(&o.message).starts_with(&spec));
        if hex(id).starts_with(&spec) || by_message {
            found.push((true, *id));
        }
    }
    for (id, r) in &outgoing {
        let by_message = r
            .message
            .is_some_and(|m| message_hex(&m).starts_with(&spec));
        if hex(id).starts_with(&spec) || by_message {
            found.push((false, *id));
        }
    }
    match found.len() {
        0 => Err(FilesError::Refused(format!(
            "no file has an id starting with {spec}; `kkachi files` lists them"
        ))),
        1 => Ok(found[0]),
        _ => Err(FilesError::Refused(format!(
            "several files have ids starting with {spec}; give more of it"
        ))),
    }
}

/// What [`cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// A file being sent: it will not be sent; its sealed copy is gone.
    Upload,
    /// A file being fetched: what was here is gone; it can be fetched again.
    Fetch,
}

/// Stops transfer `id` (as [`find_transfer`] names it). A task running it stops at its
/// next step (its record is gone). A file whose message went already cannot be unsent.
pub fn cancel(
    store: &crate::store::LocalStore,
    incoming: bool,
    id: &TransferId,
) -> Result<Cancelled, FilesError> {
    let home = store.home().to_path_buf();
    let _turn = store.files_turn();
    let mut w = crate::store::WriteSet::default();
    if incoming {
        let Some(mut record) = store.incoming_file(id)? else {
            return Err(FilesError::Refused("no such file here".into()));
        };
        // Only a fetch under way (or one that failed) stops: a file fetched is here
        // (and its relays may have let it go), one never asked for has nothing to stop.
        match record.state {
            IncomingState::Done => {
                return Err(FilesError::Refused(
                    "it is fetched already: nothing to stop (`kkachi get` saves it)".into(),
                ));
            }
            IncomingState::Offered => {
                return Err(FilesError::Refused(
                    "it is not being fetched: nothing to stop".into(),
                ));
            }
            IncomingState::Fetching | IncomingState::Failed(_) => {}
        }
        record.state = IncomingState::Offered;
        record.attempts = 0;
        record.retry_at_ms = 0;
        crate::store::LocalStore::write_incoming_file(&mut w, id, &record);
        store.apply(w)?;
        for p in [
            part_path(&home, id),
            bits_path(&home, id),
            manifest_path(&home, id),
        ] {
            let _ = std::fs::remove_file(p);
        }
        return Ok(Cancelled::Fetch);
    }
    let Some(record) = store.outgoing_file(id)? else {
        return Err(FilesError::Refused("no such file being sent".into()));
    };
    if record.message_sent {
        return Err(FilesError::Refused(match record.group() {
            Some(_) => "its message went already: it cannot be unsent".into(),
            None => {
                "its message went already: it cannot be unsent (delete it for everyone instead)"
                    .into()
            }
        }));
    }
    crate::store::LocalStore::remove_file_record(&mut w, id, false);
    store.apply(w)?;
    let _ = std::fs::remove_file(spool_path(&home, id));
    Ok(Cancelled::Upload)
}

/// How far a file a contact sent is here: chunks on disk, of how many (the manifest
/// not fetched yet: `None`).
pub fn fetched_chunks(home: &Path, id: &TransferId, file: &FileRef) -> Option<(usize, usize)> {
    let n = kkachi_protocol::file::chunk_count(file.size);
    let bits = std::fs::read(bits_path(home, id)).ok()?;
    let have = (0..n)
        .filter(|i| bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
        .count();
    Some((have, n))
}

/// The file of a message, for showing: its name, size and where it stands.
pub fn describe(file: &FileRef) -> String {
    let mut s = format!(
        "📎 {} ({})",
        crate::sanitize::for_terminal(&safe_name(&file.name)),
        human_size(file.size)
    );
    if !file.mime.is_empty() {
        s.push_str(&format!(" {}", file.mime));
    }
    s
}

/// Whom a transfer is with (a contact, or a group), and the reference, read from
/// either record.
pub fn transfer_file(
    store: &crate::store::LocalStore,
    incoming: bool,
    id: &TransferId,
) -> Result<(To, FileRef), FilesError> {
    let (peer, file) = if incoming {
        let r = store
            .incoming_file(id)?
            .ok_or_else(|| FilesError::Refused("that file is no longer here".into()))?;
        (
            r.group().map(To::Group).or(r.contact().map(To::Contact)),
            r.file()?,
        )
    } else {
        let r = store
            .outgoing_file(id)?
            .ok_or_else(|| FilesError::Refused("that file is no longer here".into()))?;
        (
            r.group().map(To::Group).or(r.contact().map(To::Contact)),
            r.file()?,
        )
    };
    let peer = peer.ok_or(StoreError::Corrupt("file transfer"))?;
    Ok((peer, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_documents_pictures_and_recordings_open() {
        for name in [
            "IMG_1.JPG",
            "map.png",
            "plan.pdf",
            "notes.txt",
            "call.m4a",
            "clip.mp4",
            "../../x.jpg",
        ] {
            assert!(opens_safely(name), "{name}");
        }
        for name in [
            "run.sh",
            "a.jpg.exe",
            "x.desktop",
            "page.html",
            "logo.svg",
            "noext",
            "app.AppImage",
        ] {
            assert!(!opens_safely(name), "{name}");
        }
    }

    #[test]
    fn only_files_that_are_what_their_names_say_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &[u8], bool); 10] = [
            ("a.png", b"\x89PNG\r\n\x1a\n....", true),
            ("b.png", b"<html><script>", false),
            ("c.jpg", b"\xff\xd8\xff\xe0 jfif", true),
            ("d.pdf", b"%PDF-1.7", true),
            ("e.txt", "지도: 학교 체육관".as_bytes(), true),
            ("f.txt", b"#!/bin/sh\nrm -rf ~", false),
            ("g.txt", b"[Desktop Entry]\nExec=x", false),
            ("h.txt", b"plain\0binary", false),
            ("i.mp4", b"\0\0\0\x18ftypmp42", true),
            ("j.md", b"# notes", false),
        ];
        for (name, bytes, opens) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            assert_eq!(content_matches(&path), opens, "{name}");
        }
    }

    #[test]
    fn names_are_made_safe_to_save() {
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("C:\\Users\\x\\..\\evil.txt"), "evil.txt");
        assert_eq!(safe_name(".bashrc"), "bashrc");
        assert_eq!(safe_name("a\u{202e}gnp.exe"), "agnp.exe");
        assert_eq!(safe_name("\u{1b}[31mred"), "[31mred");
        assert_eq!(safe_name(".."), "file");
        assert!(safe_name(&"가".repeat(200)).len() <= kkachi_protocol::file::MAX_NAME_BYTES);
    }
}
