//! Envelope bodies in append-only segment files beside the sled database.
//!
//! sled 0.34 replays its whole log since the last start when it opens (it writes its
//! snapshot only while recovering), so every byte written into it is read again on the
//! next start: with the bodies in it, a relay holding a million 2 KiB envelopes took
//! 1.3 s to open. Here sled keeps only each envelope's small record, and the bodies go
//! into segment files:
//!
//! ```text
//! DIR/bodies/00000001.seg, 00000002.seg, ...   bodies back to back, nothing else
//! ```
//!
//! A record names its body by segment, offset and length, and carries the envelope id,
//! which is the hash of the body: a damaged body is caught when read.
//!
//! - **Durability.** [`Bodies::sync`] makes every body appended so far durable (the
//!   segments written since the last sync, and the directory when a segment was
//!   created); syncs run one at a time, and once one fails every later one fails too
//!   (after a failed fsync the kernel may have dropped the pages: the store stops and
//!   is opened again). The group commit syncs the bodies before sled's flush, so what
//!   was acknowledged has its body on disk. sled writes its log before flushing, so
//!   after a power loss a record that was never acknowledged may be there without its
//!   body: such a body fails its id check when read, and a put of the same envelope
//!   again replaces it (see the store). A body written whose record was not (a crash
//!   between the two, a failed insert) is dead space, reclaimed like a deleted one.
//! - **A new segment on every open.** Appends never continue a file a crash may have
//!   cut short.
//! - **Reclaiming.** What each segment holds alive is counted from the records (the
//!   index walk adds every record it finds, puts add theirs, deletes and expiry
//!   subtract). A finished segment with nothing alive is removed; one mostly dead has
//!   its live bodies copied to the end of the log and their records pointed there, and
//!   is removed once those records are durable. Nothing is reclaimed until the walk
//!   has counted every record; a record is counted once its queue is indexed, and
//!   released only from an indexed queue.
//! - **Readers.** A segment's open file stays readable by whoever took it before the
//!   segment was removed; a reader that finds its segment gone reads the record again
//!   (it was moved).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::StoreError;

/// Where a body is: segment, offset, length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BodyRef {
    pub(crate) segment: u32,
    pub(crate) offset: u32,
    pub(crate) len: u32,
}

impl BodyRef {
    pub(crate) const LEN: usize = 12;

    pub(crate) fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&self.segment.to_be_bytes());
        out[4..8].copy_from_slice(&self.offset.to_be_bytes());
        out[8..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    pub(crate) fn decode(b: &[u8; Self::LEN]) -> Self {
        let n = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Self {
            segment: n(0),
            offset: n(4),
            len: n(8),
        }
    }
}

/// Why a body could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// Its segment was removed (the body moved: read the record again), or never
    /// existed (a damaged record).
    Gone,
    Io(std::io::Error),
}

/// One segment: its file, how far it is written, and how much of that is alive.
#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    written: u64,
    live: u64,
}

#[derive(Debug)]
struct State {
    segments: BTreeMap<u32, Segment>,
    /// The segment appends go to (the highest number).
    active: u32,
    /// Segments written to since the last sync.
    dirty: Vec<Arc<File>>,
    /// A segment was created or removed since the directory was last synced.
    dir_dirty: bool,
}

/// The body log of one store.
#[derive(Debug)]
pub(crate) struct Bodies {
    dir: PathBuf,
    /// A segment is finished once appending a body would take it past this.
    segment_bytes: u64,
    state: Mutex<State>,
    /// Held through a whole sync: a second one waits for the first, so none returns
    /// before what was appended before it started is durable.
    syncing: Mutex<()>,
    /// A sync failed: every later one fails.
    sync_failed: AtomicBool,
}

/// What [`Bodies::plan`] found to reclaim.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Finished segments with nothing alive: removed at once.
    pub(crate) empty: Vec<u32>,
    /// Finished segments mostly dead: their live bodies are to be moved first.
    pub(crate) sparse: Vec<u32>,
}

fn io(e: std::io::Error) -> StoreError {
    if e.raw_os_error() == Some(28) {
        StoreError::Full
    } else {
        StoreError::Io(e.to_string())
    }
}

fn segment_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{n:08}.seg"))
}

fn create_segment(dir: &Path, n: u32) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(segment_path(dir, n))
        .map_err(io)
}

impl Bodies {
    /// Opens the segments in `dir` (created if missing) and starts a new one for
    /// appends. Every existing segment counts as holding nothing alive until records
    /// naming it are [`counted`](Self::count).
    pub(crate) fn open(dir: &Path, segment_bytes: u64) -> Result<Self, StoreError> {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io)?;
            if let Some(parent) = dir.parent() {
                File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
            }
        }
        let mut segments = BTreeMap::new();
        for item in std::fs::read_dir(dir).map_err(io)? {
            let item = item.map_err(io)?;
            let name = item.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_suffix(".seg"))
                .filter(|s| s.len() == 8)
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let file = OpenOptions::new()
                .read(true)
                .open(item.path())
                .map_err(io)?;
            let written = file.metadata().map_err(io)?.len();
            segments.insert(
                n,
                Segment {
                    file: Arc::new(file),
                    written,
                    live: 0,
                },
            );
        }
        let active = segments
            .last_key_value()
            .map_or(1, |(n, _)| n.saturating_add(1));
        if active == u32::MAX {
            return Err(StoreError::Corrupt(
                "body segments are numbered up to the last".into(),
            ));
        }
        let file = Arc::new(create_segment(dir, active)?);
        segments.insert(
            active,
            Segment {
                file,
                written: 0,
                live: 0,
            },
        );
        Ok(Self {
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes.max(1),
            state: Mutex::new(State {
                segments,
                active,
                dirty: Vec::new(),
                dir_dirty: true,
            }),
            syncing: Mutex::new(()),
            sync_failed: AtomicBool::new(false),
        })
    }

    /// Appends `body` to the active segment (starting a new one when it is full) and
    /// counts it alive. The caller writes the record naming it, or calls
    /// [`release`](Self::release) if it cannot.
    pub(crate) fn append(&self, body: &[u8]) -> Result<BodyRef, StoreError> {
        let len = u32::try_from(body.len())
            .map_err(|_| StoreError::Io("an envelope body over 4 GiB".into()))?;
        let mut state = self.state.lock();
        let active = state.active;
        let full = {
            let seg = &state.segments[&active];
            seg.written > 0 && seg.written + u64::from(len) > self.segment_bytes
        };
        if full {
            let next = active
                .checked_add(1)
                .filter(|n| *n < u32::MAX)
                .ok_or_else(|| {
                    StoreError::Corrupt("body segments are numbered up to the last".into())
                })?;
            let file = Arc::new(create_segment(&self.dir, next)?);
            state.segments.insert(
                next,
                Segment {
                    file,
                    written: 0,
                    live: 0,
                },
            );
            state.active = next;
            state.dir_dirty = true;
        }
        let active = state.active;
        let seg = state.segments.get_mut(&active).expect("the active segment");
        let offset = u32::try_from(seg.written)
            .map_err(|_| StoreError::Io("a body segment over 4 GiB".into()))?;
        // On a failure nothing is counted: the bytes past `written` are written over.
        seg.file.write_all_at(body, seg.written).map_err(io)?;
        seg.written += u64::from(len);
        seg.live += u64::from(len);
        let file = Arc::clone(&seg.file);
        if !state.dirty.iter().any(|f| Arc::ptr_eq(f, &file)) {
            state.dirty.push(file);
        }
        Ok(BodyRef {
            segment: active,
            offset,
            len,
        })
    }

    /// Reads a body. [`ReadError::Gone`] when its segment is not here (any more).
    pub(crate) fn read(&self, at: BodyRef) -> Result<Vec<u8>, ReadError> {
        let file = {
            let state = self.state.lock();
            match state.segments.get(&at.segment) {
                Some(seg) if u64::from(at.offset) + u64::from(at.len) <= seg.written => {
                    Arc::clone(&seg.file)
                }
                _ => return Err(ReadError::Gone),
            }
        };
        let mut body = vec![0u8; at.len as usize];
        file.read_exact_at(&mut body, u64::from(at.offset))
            .map_err(ReadError::Io)?;
        Ok(body)
    }

    /// Counts a body found in a record as alive (the index walk, once per record).
    pub(crate) fn count(&self, at: BodyRef) {
        if let Some(seg) = self.state.lock().segments.get_mut(&at.segment) {
            seg.live += u64::from(at.len);
        }
    }

    /// Counts a body as dead: its record was removed, or never written.
    pub(crate) fn release(&self, at: BodyRef) {
        if let Some(seg) = self.state.lock().segments.get_mut(&at.segment) {
            seg.live = seg.live.saturating_sub(u64::from(at.len));
        }
    }

    /// Makes every body appended so far durable.
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.syncing.lock();
        if self.sync_failed.load(Ordering::SeqCst) {
            return Err(StoreError::Io(
                "an earlier sync of the envelope bodies failed".into(),
            ));
        }
        let (files, dir) = {
            let mut state = self.state.lock();
            let dir = std::mem::take(&mut state.dir_dirty);
            (std::mem::take(&mut state.dirty), dir)
        };
        let synced = (|| {
            for file in &files {
                file.sync_data()?;
            }
            if dir {
                File::open(&self.dir)?.sync_all()?;
            }
            Ok(())
        })();
        if let Err(e) = synced {
            self.sync_failed.store(true, Ordering::SeqCst);
            return Err(io(e));
        }
        Ok(())
    }

    /// The finished segments worth reclaiming: those with nothing alive, and those at
    /// least `sparse_pct`% dead and holding at least `min_dead` dead bytes.
    pub(crate) fn plan(&self, sparse_pct: u64, min_dead: u64) -> Plan {
        let state = self.state.lock();
        let mut plan = Plan::default();
        for (&n, seg) in &state.segments {
            if n == state.active {
                continue;
            }
            let dead = seg.written.saturating_sub(seg.live);
            if seg.live == 0 {
                plan.empty.push(n);
            } else if dead >= min_dead && dead * 100 >= seg.written * sparse_pct {
                plan.sparse.push(n);
            }
        }
        plan
    }

    /// Removes finished segments that hold nothing alive (any of `segments` still
    /// holding something is kept); returns how many went and the bytes freed. The
    /// caller has made durable every record moved out of them. A file that cannot be
    /// removed is logged and left (it is not opened again until the next start).
    pub(crate) fn remove_empty(&self, segments: &[u32]) -> (u64, u64) {
        let (mut count, mut freed) = (0, 0);
        for n in segments {
            let removed = {
                let mut state = self.state.lock();
                match state.segments.get(n) {
                    Some(seg) if *n != state.active && seg.live == 0 => {
                        state.dir_dirty = true;
                        state.segments.remove(n)
                    }
                    _ => None,
                }
            };
            if let Some(seg) = removed {
                match std::fs::remove_file(segment_path(&self.dir, *n)) {
                    Ok(()) => {
                        count += 1;
                        freed += seg.written;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::error!(segment = n, error = %e, "a body segment could not be removed");
                    }
                }
            }
        }
        (count, freed)
    }

    /// The size at which a segment is finished.
    pub(crate) fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// Bytes in segment files, and of those alive.
    pub(crate) fn usage(&self) -> (u64, u64) {
        let state = self.state.lock();
        state
            .segments
            .values()
            .fold((0, 0), |(w, l), s| (w + s.written, l + s.live))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_read_back_across_segments_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let bodies = Bodies::open(dir.path(), 100).unwrap();
        let refs: Vec<_> = (0..10u8)
            .map(|i| bodies.append(&[i; 40]).unwrap())
            .collect();
        // Two bodies of 40 fit a segment of 100.
        assert_eq!(refs[0].segment, refs[1].segment);
        assert_ne!(refs[1].segment, refs[2].segment);
        bodies.sync().unwrap();
        for (i, r) in refs.iter().enumerate() {
            assert_eq!(bodies.read(*r).unwrap(), vec![i as u8; 40]);
        }
        drop(bodies);
        let again = Bodies::open(dir.path(), 100).unwrap();
        for (i, r) in refs.iter().enumerate() {
            assert_eq!(again.read(*r).unwrap(), vec![i as u8; 40]);
        }
        // A new segment for appends, after the others.
        let next = again.append(b"x").unwrap();
        assert!(next.segment > refs[9].segment);
        // Nothing counted alive yet: every old segment may go.
        assert_eq!(again.plan(50, 0).empty.len(), 5);
    }

    #[test]
    fn only_finished_segments_with_nothing_alive_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let bodies = Bodies::open(dir.path(), 100).unwrap();
        let a = bodies.append(&[1; 60]).unwrap();
        let b = bodies.append(&[2; 60]).unwrap();
        let c = bodies.append(&[3; 60]).unwrap();
        assert_eq!(bodies.plan(50, 0), Plan::default());
        bodies.release(a);
        bodies.release(c);
        // c's segment is the active one: kept although empty.
        assert_eq!(
            bodies.plan(50, 0),
            Plan {
                empty: vec![a.segment],
                sparse: vec![]
            }
        );
        assert_eq!(bodies.remove_empty(&[a.segment, b.segment]), (1, 60));
        assert!(matches!(bodies.read(a), Err(ReadError::Gone)));
        assert_eq!(bodies.read(b).unwrap(), vec![2; 60]);
        assert!(!segment_path(dir.path(), a.segment).exists());
        assert!(segment_path(dir.path(), b.segment).exists());
        // A read past what was written is refused, not attempted.
        let past = BodyRef { len: 61, ..b };
        assert!(matches!(bodies.read(past), Err(ReadError::Gone)));
    }

    #[test]
    fn a_mostly_dead_segment_is_planned_for_moving() {
        let dir = tempfile::tempdir().unwrap();
        let bodies = Bodies::open(dir.path(), 100).unwrap();
        let refs: Vec<_> = (0..5).map(|_| bodies.append(&[0; 20]).unwrap()).collect();
        bodies.append(&[0; 20]).unwrap(); // the next segment: the first is finished
        for r in &refs[..3] {
            bodies.release(*r);
        }
        assert_eq!(bodies.plan(50, 0).sparse, vec![refs[0].segment]);
        // Under the dead minimum it waits.
        assert_eq!(bodies.plan(50, 61).sparse, Vec::<u32>::new());
        assert_eq!(bodies.usage(), (120, 60));
    }
}
