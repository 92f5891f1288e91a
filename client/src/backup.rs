//! Backups (SPEC.md §11): the home's records in one stream, encrypted to a recovery key.
//!
//! The file is an age file (age-encryption.org/v1) to one X25519 recipient: the public
//! half of the recovery key, which the home keeps, so a backup needs no secret and can
//! run unattended; the secret half is shown once, when it is made. age authenticates
//! every 64 KiB chunk of the contents, so a damaged chunk is found where it is, and
//! everything before it can still be restored. Inside: `"kkachi-backup" ‖ version (1) ‖
//! made at (u64, Unix ms)`, then records `tree (1) ‖ key length (u16) ‖ value length (u32) ‖ key ‖ value`
//! (big-endian lengths), then `0xff ‖ records (u64)`, which says the stream is whole.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use age::secrecy::ExposeSecret;
use thiserror::Error;

use crate::store::{
    BackupRecord, LocalStore, MAX_BACKUP_KEY, MAX_BACKUP_VALUE, StoreError, TreeId,
};

const MAGIC: &[u8] = b"kkachi-backup";
/// The version written; a reader takes every one up to it (1 held no device sets).
const VERSION: u8 = 2;
const END: u8 = 0xff;
/// The contents are authenticated in chunks of this many bytes.
pub const CHUNK: u64 = 64 << 10;
/// Where a recovery key may come from without a terminal.
pub const RECOVERY_KEY_ENV: &str = "KKACHI_RECOVERY_KEY";

/// What went wrong with a backup.
#[derive(Debug, Error)]
pub enum BackupError {
    /// Not an age file, or not a kkachi backup inside.
    #[error("{0} is not a kkachi backup")]
    NotABackup(String),
    /// The recovery key does not open it.
    #[error(
        "this recovery key does not open {0}: it was made for another key (or its beginning is damaged)"
    )]
    WrongKey(String),
    /// Its header is damaged (it names its recipients and authenticates them).
    #[error("the beginning of {0} is damaged: nothing in it can be read")]
    Header(String),
    /// Made by a newer kkachi.
    #[error("{0} was made by a newer kkachi (backup version {1}): update kkachi to restore it")]
    Newer(String, u8),
    /// A recovery key that is not one.
    #[error("that is not a recovery key (they start with AGE-SECRET-KEY-1)")]
    BadKey,
    /// Reading or writing a file.
    #[error("{0}")]
    Io(String),
    /// Restoring more would leave the disk all but full.
    #[error(
        "{name} needs more room than this disk has: stopped after {records} records ({taken_mib} MiB), with {free_mib} MiB free when it began (kkachi keeps {reserve_mib} MiB free); nothing was kept: free some space and try again"
    )]
    NoRoom {
        /// Where the records came from.
        name: String,
        /// Records taken in before it stopped.
        records: u64,
        /// Their bytes.
        taken_mib: u64,
        /// What was free when the restore began.
        free_mib: u64,
        /// What is kept free.
        reserve_mib: u64,
    },
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a backup holds, as counted while it was written or read.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// When it was made (Unix ms), once read.
    pub made_ms: u64,
    /// Records of every kind.
    pub records: u64,
    /// Contacts.
    pub contacts: u64,
    /// Messages.
    pub messages: u64,
}

impl Counts {
    fn count(&mut self, tree: TreeId) {
        self.records += 1;
        match tree {
            TreeId::Contacts => self.contacts += 1,
            TreeId::Messages => self.messages += 1,
            _ => {}
        }
    }
}

/// A new recovery key: the secret half (shown once) and the public half (kept).
pub fn new_recovery_key() -> (String, String) {
    let key = age::x25519::Identity::generate();
    let public = key.to_public().to_string();
    (key.to_string().expose_secret().to_string(), public)
}

/// Reads a recovery key as the person wrote it down (spaces and line breaks dropped).
pub fn parse_recovery_key(text: &str) -> Result<age::x25519::Identity, BackupError> {
    let joined: String = text.split_whitespace().collect();
    joined
        .to_uppercase()
        .parse()
        .map_err(|_| BackupError::BadKey)
}

/// Bytes free to an unprivileged writer on the disk holding `path` (`None`: it cannot
/// tell, and nothing is stopped for it).
pub(crate) fn free_bytes(path: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |e| BackupError::Io(format!("{}: {e}", path.display()))
}

/// Writes a backup of `store` to `to`, encrypted to `recipient` (an age X25519
/// recipient). The file appears whole or not at all.
pub fn create(
    store: &LocalStore,
    recipient: &str,
    to: &Path,
) -> Result<(Counts, u64), BackupError> {
    let recipient: age::x25519::Recipient = recipient
        .parse()
        .map_err(|e| BackupError::Io(format!("the stored recovery key is unusable: {e}")))?;
    let dir = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".kkachi-backup-")
        .tempfile_in(dir)
        .map_err(io(to))?;
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
            .map_err(|e| BackupError::Io(format!("cannot encrypt: {e}")))?;
    let mut out = encryptor
        .wrap_output(BufWriter::with_capacity(256 << 10, tmp.as_file()))
        .map_err(io(to))?;
    let counts = write_contents(store, &mut out, io(to))?;
    let mut buffered = out.finish().map_err(io(to))?;
    buffered.flush().map_err(io(to))?;
    drop(buffered);
    tmp.as_file().sync_all().map_err(io(to))?;
    let bytes = tmp.as_file().metadata().map_err(io(to))?.len();
    tmp.persist(to).map_err(|e| io(to)(e.error))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok((counts, bytes))
}

/// Writes what a backup holds inside its encryption (the same stream hands an account
/// to a linked device: SPEC §15.1) to `out`; `on_io` says what a failed write was.
pub(crate) fn write_contents(
    store: &LocalStore,
    out: &mut impl Write,
    on_io: impl Fn(std::io::Error) -> BackupError,
) -> Result<Counts, BackupError> {
    out.write_all(MAGIC)
        .and_then(|()| out.write_all(&[VERSION]))
        .and_then(|()| out.write_all(&crate::engine::now_ms().to_be_bytes()))
        .map_err(&on_io)?;
    let mut counts = Counts::default();
    store.backup_records(|tree, key, value| {
        counts.count(tree);
        out.write_all(&[tree as u8])?;
        out.write_all(&(key.len() as u16).to_be_bytes())?;
        out.write_all(&(value.len() as u32).to_be_bytes())?;
        out.write_all(key)?;
        out.write_all(value)
    })?;
    out.write_all(&[END])
        .and_then(|()| out.write_all(&counts.records.to_be_bytes()))
        .and_then(|()| out.flush())
        .map_err(&on_io)?;
    Ok(counts)
}

/// How a read ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Ending {
    /// Every record was read, and the stream says it is whole.
    Whole,
    /// Chunk `n` (from 0) does not authenticate: what came before it was read.
    Damaged {
        /// The chunk.
        chunk: u64,
    },
    /// The file ends early: what it holds was read.
    CutShort,
}

/// Counts the contents read, to tell which chunk failed.
struct Counting<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// Reads the backup `file` with `key`, giving each record to `sink` in order; how it
/// ended and what was read. A record cut by a damaged chunk is not given.
pub fn read(
    file: &Path,
    key: &age::x25519::Identity,
    sink: impl FnMut(BackupRecord) -> Result<(), BackupError>,
) -> Result<(Counts, Ending), BackupError> {
    let name = file.display().to_string();
    let input = std::fs::File::open(file).map_err(io(file))?;
    if !input.metadata().map_err(io(file))?.is_file() {
        return Err(BackupError::NotABackup(name));
    }
    let decryptor = match age::Decryptor::new(BufReader::with_capacity(256 << 10, input)) {
        Ok(d) => d,
        Err(age::DecryptError::Io(e)) => return Err(io(file)(e)),
        Err(_) => return Err(BackupError::NotABackup(name)),
    };
    let reader = match decryptor.decrypt(std::iter::once(key as &dyn age::Identity)) {
        Ok(r) => r,
        Err(age::DecryptError::NoMatchingKeys) => return Err(BackupError::WrongKey(name)),
        Err(age::DecryptError::Io(e)) => return Err(io(file)(e)),
        Err(_) => return Err(BackupError::Header(name)),
    };
    read_contents(BufReader::with_capacity(256 << 10, reader), &name, sink)
}

/// Reads what a backup holds inside its encryption from `input` (`name` says where it
/// comes from in errors), giving each record to `sink` in order. A read failing as
/// `InvalidData` is a chunk that does not authenticate; one ending early, a stream cut
/// short.
pub(crate) fn read_contents(
    input: impl Read,
    name: &str,
    mut sink: impl FnMut(BackupRecord) -> Result<(), BackupError>,
) -> Result<(Counts, Ending), BackupError> {
    let name = name.to_owned();
    let mut r = Counting {
        inner: input,
        read: 0,
    };
    let mut head = [0u8; MAGIC.len() + 1 + 8];
    if let Err(e) = r.read_exact(&mut head) {
        // The first chunk itself fails (nothing in the file can be read), or the file
        // ends before its header does, or reading it fails.
        return Err(match e.kind() {
            std::io::ErrorKind::InvalidData => BackupError::Header(name),
            std::io::ErrorKind::UnexpectedEof => BackupError::NotABackup(name),
            _ => BackupError::Io(format!("{name}: {e}")),
        });
    }
    if &head[..MAGIC.len()] != MAGIC {
        return Err(BackupError::NotABackup(name));
    }
    if !(1..=VERSION).contains(&head[MAGIC.len()]) {
        return Err(BackupError::Newer(name, head[MAGIC.len()]));
    }
    let made_ms = u64::from_be_bytes(head[MAGIC.len() + 1..].try_into().expect("8 bytes"));
    let mut counts = Counts {
        made_ms,
        ..Counts::default()
    };
    let ended = |e: std::io::Error, at: u64| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Ok(Ending::CutShort),
        std::io::ErrorKind::InvalidData => Ok(Ending::Damaged { chunk: at / CHUNK }),
        _ => Err(BackupError::Io(format!("{name}: {e}"))),
    };
    loop {
        let start = r.read;
        let mut frame = [0u8; 7];
        if let Err(e) = r.read_exact(&mut frame[..1]) {
            return ended(e, r.read).map(|end| (counts, end));
        }
        if frame[0] == END {
            let mut n = [0u8; 8];
            if let Err(e) = r.read_exact(&mut n) {
                return ended(e, r.read).map(|end| (counts, end));
            }
            if u64::from_be_bytes(n) != counts.records {
                return Ok((
                    counts,
                    Ending::Damaged {
                        chunk: start / CHUNK,
                    },
                ));
            }
            return Ok((counts, Ending::Whole));
        }
        if let Err(e) = r.read_exact(&mut frame[1..]) {
            return ended(e, r.read).map(|end| (counts, end));
        }
        let tree = TreeId::from_backup(frame[0]);
        let key_len = usize::from(u16::from_be_bytes([frame[1], frame[2]]));
        let value_len = u32::from_be_bytes([frame[3], frame[4], frame[5], frame[6]]) as usize;
        let (Some(tree), true, true) = (
            tree,
            key_len <= MAX_BACKUP_KEY,
            value_len <= MAX_BACKUP_VALUE,
        ) else {
            // Authenticated, yet not a record this version writes: not ours to guess.
            return Err(BackupError::NotABackup(format!(
                "{name} (an unknown record)"
            )));
        };
        let mut key = vec![0; key_len];
        let mut value = vec![0; value_len];
        if let Err(e) = r
            .read_exact(&mut key)
            .and_then(|()| r.read_exact(&mut value))
        {
            return ended(e, r.read).map(|end| (counts, end));
        }
        // Who we are comes first (for every reader: verify says so as restore would).
        if counts.records < 2 {
            let expected: &[u8] = if counts.records == 0 {
                b"identity"
            } else {
                b"profile"
            };
            if tree != TreeId::Meta || key != expected {
                return Err(BackupError::NotABackup(name));
            }
        }
        counts.count(tree);
        sink((tree, key, value))?;
    }
}

/// What a restore brought back, and how the backup ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// What was restored.
    pub counts: Counts,
    /// Whole, or where it stopped.
    pub ending: Ending,
    /// Our messages not confirmed as delivered, sealed again at the next start.
    pub resend: usize,
    /// Whether the restored device has a session key of its own (false only for an
    /// account whose devices signed every record they may: it keeps the backup's).
    pub new_key: bool,
    /// The restored device's session key (X25519 public).
    pub session_key: [u8; 32],
    /// The account restored: its user id.
    pub peer: kkachi_protocol::PeerId,
    /// The account's name, as its card gives it.
    pub name: String,
}

/// A set written while restoring holds at most this many records, or bytes.
const RESTORE_BATCH: usize = 2048;
/// A restore stops rather than leave less than this free on the disk it writes to:
/// whatever a backup or a linked device sends (a hostile one sends without end) never
/// fills the disk under the rest of the system.
pub(crate) const DISK_RESERVE: u64 = 64 << 20;

#[cfg(test)]
thread_local! {
    /// What restores on this thread keep free: a test sets it just under what the disk
    /// has, to see a restore stop without filling the disk first.
    pub(crate) static TEST_RESERVE: std::cell::Cell<u64> = const { std::cell::Cell::new(DISK_RESERVE) };
}

fn reserve() -> u64 {
    #[cfg(test)]
    return TEST_RESERVE.with(|r| r.get());
    #[cfg(not(test))]
    DISK_RESERVE
}
const RESTORE_BATCH_BYTES: usize = 8 << 20;

/// Restores the backup `file` into `home`, which must not exist yet (or be an empty
/// directory): as much as reads, up to a damaged chunk. The home is made beside it and
/// moved into place once whole, so an interrupted restore leaves no half home behind.
/// It gets its own new database key and a new session key (the backup's is taken out
/// of the account's devices); no session is restored (contacts are sent the card at
/// the next start, on new sessions, and what they had not confirmed goes again).
pub fn restore(
    home: &Path,
    file: &Path,
    key: &age::x25519::Identity,
) -> Result<Restored, BackupError> {
    restore_with(home, |staging| {
        restore_into(staging, &file.display().to_string(), None, |sink| {
            read(file, key, sink)
        })
    })
}

/// Makes a home at `home` (which must not exist yet, or hold no identity) with
/// `stage`, which fills a staging directory beside it: once it returns `Ok`, the
/// staging directory takes the home's place; if it fails, nothing is left behind (and
/// what a process killed meanwhile left is removed by the next restore of that home).
pub(crate) fn restore_with<T, E: From<BackupError>>(
    home: &Path,
    stage: impl FnOnce(&Path) -> Result<T, E>,
) -> Result<T, E> {
    let parent = parent_of(home);
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    // One restore or join of a home at a time: another's staging is no leftover.
    let lock = lock_home(home, parent)?;
    let fresh_db = check_new_home(home)?;
    let prefix = staging_prefix(home);
    // A restore of this home cut off by a kill left its staging behind: it holds the
    // account, so it goes.
    remove_staging(home);
    let staging = tempfile::Builder::new()
        .prefix(&prefix)
        .rand_bytes(STAGING_RANDOM)
        .tempdir_in(parent)
        .map_err(io(parent))?;
    let restored = stage(staging.path())?;
    place(home, parent, staging, fresh_db)?;
    drop(lock);
    Ok(restored)
}

/// The lock of restores and joins into one home: a file beside it, locked while this
/// lives, and removed (still locked) when it goes.
struct HomeLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl Drop for HomeLock {
    fn drop(&mut self) {
        // Whoever opened the file meanwhile finds, once it holds the lock, that it is
        // not the file at the path any more, and takes the lock again (`lock_home`).
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The lock file of restores and joins into `home`.
fn lock_path(home: &Path, parent: &Path) -> PathBuf {
    parent.join(format!(
        ".kkachi-restore-{}.lock",
        home.file_name()
            .map_or_else(|| "home".into(), |n| n.to_string_lossy())
    ))
}

/// Cancels this process's restore or join into `home` as it exits: what it staged
/// goes (tried again a few times: the restore's thread may still be writing there).
/// The lock goes with the process; its file, which locks nothing then, is left.
pub fn cancel_restore(home: &Path) {
    for _ in 0..5 {
        remove_staging(home);
        if stagings(home).is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Takes the lock of restores and joins into `home`, or says that another process
/// holds it.
fn lock_home(home: &Path, parent: &Path) -> Result<HomeLock, BackupError> {
    use std::os::unix::fs::MetadataExt;
    let path = lock_path(home, parent);
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(BackupError::Io(format!(
                    "another restore or join into {} is running: let it finish (or stop it) first",
                    home.display()
                )));
            }
            Err(e) => {
                return Err(BackupError::Io(format!(
                    "cannot lock {}: {e}",
                    path.display()
                )));
            }
        }
        // Locked: but if its holder removed it before we did, the lock is on a file
        // nobody else will open.
        let held = file.metadata().map_err(io(&path))?;
        if std::fs::metadata(&path)
            .is_ok_and(|now| now.ino() == held.ino() && now.dev() == held.dev())
        {
            return Ok(HomeLock { _file: file, path });
        }
    }
}

/// The prefix of the staging directories of a restore or join of `home`, beside it.
fn staging_prefix(home: &Path) -> String {
    format!(
        ".kkachi-restoring-{}-",
        home.file_name()
            .map_or_else(|| "home".into(), |n| n.to_string_lossy())
    )
}

/// The directory `home` is made in.
fn parent_of(home: &Path) -> &Path {
    home.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Removes what a restore or join of `home` staged beside it (one cut off, or being
/// cancelled).
pub fn remove_staging(home: &Path) {
    for staged in stagings(home) {
        let _ = std::fs::remove_dir_all(staged);
    }
}

/// What a restore or join of `home` staged beside it.
fn stagings(home: &Path) -> Vec<PathBuf> {
    let prefix = staging_prefix(home);
    let Ok(entries) = std::fs::read_dir(parent_of(home)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            // This home's alone: the prefix and exactly the random part after it (the
            // staging of a home `a-b` starts with the prefix of a home `a`).
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix(&prefix).is_some_and(|rest| {
                rest.len() == STAGING_RANDOM && rest.bytes().all(|b| b.is_ascii_alphanumeric())
            }) && entry.path().is_dir()
        })
        .map(|entry| entry.path())
        .collect()
}

/// Random characters after a staging directory's prefix.
const STAGING_RANDOM: usize = 8;

/// Whether `home` may become a restored or linked home: it does not exist, or holds no
/// identity (one kkachi opened before, as the UI on a new device does, made an empty
/// database and a key: then `Ok(true)`).
pub(crate) fn check_new_home(home: &Path) -> Result<bool, BackupError> {
    let fresh_db = home.join("db").exists() || crate::store::key_path(home).exists();
    if fresh_db {
        let store = LocalStore::open(home).map_err(|e| {
            BackupError::Io(format!(
                "{} holds a kkachi home that does not open ({e}): restore or join into a new --home, or move it aside",
                home.display()
            ))
        })?;
        if let Some(me) = store.identity()? {
            return Err(BackupError::Io(format!(
                "{} already holds an identity ({}): restore or join into a new --home, or move it aside",
                home.display(),
                me.peer_id()
            )));
        }
    }
    Ok(fresh_db)
}

/// Moves the whole `staging` home into place at `home`. If it cannot, the staging
/// directory stays where it is, and the error says where: it may be the account's only
/// copy now (a device that handed it over acts for it no more).
fn place(
    home: &Path,
    parent: &Path,
    staging: tempfile::TempDir,
    fresh_db: bool,
) -> Result<(), BackupError> {
    let staged = staging.keep();
    let placed = if std::fs::read_dir(home).map_or(true, |mut d| d.next().is_none()) {
        // Whole, into place at once.
        let _ = std::fs::remove_dir(home);
        std::fs::rename(&staged, home)
    } else {
        // Beside what the home holds already (a log, an empty database): the key first,
        // so a crash in between leaves a key with no database, which opens empty and
        // can take the restore again; never a database without its key.
        let replace = |name: &str| -> std::io::Result<()> {
            let target = home.join(name);
            if target.is_dir() {
                std::fs::remove_dir_all(&target)?;
            } else if target.exists() {
                std::fs::remove_file(&target)?;
            }
            std::fs::rename(staged.join(name), target)
        };
        if fresh_db {
            let _ = std::fs::remove_dir_all(home.join("db"));
        }
        replace(crate::store::KEY_FILE)
            .and_then(|()| replace("db"))
            .and_then(|()| std::fs::remove_dir_all(&staged))
    };
    placed.map_err(|e| {
        // Out of the way of the next restore's clean-up (it may be the account's only
        // copy now), under a name that says what it is.
        let kept = parent.join(format!(
            "{}.kkachi-new-home-{}",
            home.file_name()
                .map_or_else(|| "home".into(), |n| n.to_string_lossy()),
            crate::engine::now_ms()
        ));
        let kept = match std::fs::rename(&staged, &kept) {
            Ok(()) => kept,
            Err(_) => staged.clone(),
        };
        BackupError::Io(format!(
            "cannot move the new home into {} ({e}): it is at {}; move that directory there yourself",
            home.display(),
            kept.display()
        ))
    })?;
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Restores into the new home at `home` the records `read` gives its sink (see
/// [`read_contents`]; `name` says where they come from), then makes it a new device of
/// the account: in place of the device the records came from, or (`beside`: the new
/// device's name) beside it, as a linked device is (SPEC §15.1).
pub(crate) fn restore_into(
    home: &Path,
    name: &str,
    beside: Option<&str>,
    read: impl FnOnce(
        &mut dyn FnMut(BackupRecord) -> Result<(), BackupError>,
    ) -> Result<(Counts, Ending), BackupError>,
) -> Result<Restored, BackupError> {
    let reserve = reserve();
    let store = LocalStore::open(home)?;
    let mut batch: Vec<BackupRecord> = Vec::with_capacity(RESTORE_BATCH);
    let mut batch_bytes = 0usize;
    let mut head = 0usize;
    let mut taken = (0u64, 0u64);
    // Checked before each set is written, so never past the reserve by more than a
    // set: by what the disk says is free, and by what came since the start counted
    // twice (the store writes a log first; the disk counts written pages only once
    // they reach it).
    let at_start = free_bytes(home);
    let room = |(records, bytes): (u64, u64)| -> Result<(), BackupError> {
        let Some(start) = at_start else {
            return Ok(());
        };
        let free = free_bytes(home).unwrap_or(start);
        if free >= reserve && bytes.saturating_mul(2) <= start.saturating_sub(reserve) {
            return Ok(());
        }
        Err(BackupError::NoRoom {
            name: name.to_owned(),
            records,
            taken_mib: bytes >> 20,
            free_mib: start >> 20,
            reserve_mib: reserve >> 20,
        })
    };
    let (counts, ending) = read(&mut |record| {
        // `read` checked that who we are comes first.
        head = (head + 1).min(2);
        batch_bytes += record.1.len() + record.2.len();
        batch.push(record);
        if head == 2 && (batch.len() >= RESTORE_BATCH || batch_bytes >= RESTORE_BATCH_BYTES) {
            let next = (taken.0 + batch.len() as u64, taken.1 + batch_bytes as u64);
            room(next)?;
            taken = next;
            store.restore_records(std::mem::take(&mut batch))?;
            batch_bytes = 0;
        }
        Ok(())
    })?;
    if head < 2 {
        return Err(BackupError::NotABackup(name.to_owned()));
    }
    room((taken.0 + batch.len() as u64, taken.1 + batch_bytes as u64))?;
    store.restore_records(batch)?;
    let repaired = store.repair_after_restore()?;
    // A new device of the account (SPEC §11): a session key of its own, so nothing is
    // sealed to it under a key the lost device held, and that key is taken out of the
    // account's devices. What was sealed to the old key is still read for a while.
    // An account whose devices signed every record they may keeps the backup's key
    // (restored as before device sets), rather than no restore at all.
    // A device beside the one the records came from keeps that one listed, and what it
    // had not delivered is its own to deliver.
    let now_s = crate::engine::now_ms() / 1000;
    let made = match beside {
        None => store
            .rotate_session_key(now_s, &mut rand_core::OsRng)
            .map(drop),
        Some(device) => store
            .become_new_device(device, now_s, &mut rand_core::OsRng)
            .map(drop),
    };
    let new_key = match made {
        Ok(()) => true,
        Err(StoreError::Devices(why)) => {
            tracing::warn!(%why, "restored under the backup's session key");
            false
        }
        Err(e) => return Err(e.into()),
    };
    let resend = if beside.is_some() && new_key {
        store.forget_resends()?;
        0
    } else {
        repaired.resend
    };
    store.sync()?;
    let me = store.identity()?.ok_or(StoreError::Corrupt("identity"))?;
    let profile = store.profile()?.ok_or(StoreError::Corrupt("profile"))?;
    Ok(Restored {
        counts,
        ending,
        resend,
        new_key,
        session_key: me.x25519_public(),
        peer: me.peer_id(),
        name: profile.name,
    })
}
