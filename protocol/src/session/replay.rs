//! Replay protection: a per-session bitmap of received transport counters, and a
//! time-bounded cache of handshake references for first messages.

use std::collections::BTreeMap;

use crate::codec::{DecodeError, Reader, Writer};

/// Counters a session may use: a sender never seals counter `MAX_COUNTERS` or above
/// (it falls back to a fresh handshake message instead), so the bitmap below covers a
/// session's whole life and never has to reject a late message as "too old".
pub const MAX_COUNTERS: u64 = 4096;
const WORDS: usize = (MAX_COUNTERS / 64) as usize;

/// Which transport counters of one session have been received.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ReplayWindow {
    bits: Box<[u64; WORDS]>,
}

impl std::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seen: u32 = self.bits.iter().map(|w| w.count_ones()).sum();
        write!(f, "ReplayWindow({seen} seen)")
    }
}

impl ReplayWindow {
    pub(crate) fn new() -> Self {
        Self {
            bits: Box::new([0; WORDS]),
        }
    }

    /// True if `counter` is usable and was not seen before. Does not record it.
    pub(crate) fn is_fresh(&self, counter: u64) -> bool {
        counter < MAX_COUNTERS && self.bits[(counter / 64) as usize] & (1 << (counter % 64)) == 0
    }

    /// The lowest counter not yet received ([`MAX_COUNTERS`] once all were).
    pub(crate) fn lowest_unseen(&self) -> u64 {
        for (i, word) in self.bits.iter().enumerate() {
            if *word != u64::MAX {
                return i as u64 * 64 + u64::from(word.trailing_ones());
            }
        }
        MAX_COUNTERS
    }

    /// One past the highest counter received (0 if none was).
    pub(crate) fn next_after_highest(&self) -> u64 {
        for (i, word) in self.bits.iter().enumerate().rev() {
            if *word != 0 {
                return i as u64 * 64 + 64 - u64::from(word.leading_zeros());
            }
        }
        0
    }

    /// Records `counter` (which must have passed [`ReplayWindow::is_fresh`]).
    pub(crate) fn mark(&mut self, counter: u64) {
        self.bits[(counter / 64) as usize] |= 1 << (counter % 64);
    }

    pub(crate) fn write(&self, w: &mut Writer) {
        for word in self.bits.iter() {
            w.u64(*word);
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut window = Self::new();
        for word in window.bits.iter_mut() {
            *word = r.u64("replay window")?;
        }
        Ok(window)
    }
}

/// Handshake references of first messages already accepted, with the sender's
/// timestamps. Entries older than `max_age` are forgotten; so that the cache stays
/// bounded even then, it keeps at most `capacity` entries and, when it must drop one,
/// raises a floor below which every first message is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SeenInits {
    floor: u64,
    entries: BTreeMap<[u8; 16], u64>,
}

/// Why a first message was refused as a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InitReplay {
    /// Seen before.
    Duplicate,
    /// Older than anything that can still be in flight.
    TooOld,
    /// At or below the floor: not remembered either way. It was not recorded.
    BelowFloor,
}

impl SeenInits {
    pub(crate) const CAPACITY: usize = 4096;

    pub(crate) fn new() -> Self {
        Self {
            floor: 0,
            entries: BTreeMap::new(),
        }
    }

    /// Accepts `reference` sent at `sent_at` once; refuses repeats and anything older
    /// than `max_age` or at or below the floor.
    pub(crate) fn accept(
        &mut self,
        reference: [u8; 16],
        sent_at: u64,
        now: u64,
        max_age: u64,
    ) -> Result<(), InitReplay> {
        self.prune(now, max_age);
        if sent_at.saturating_add(max_age) < now {
            return Err(InitReplay::TooOld);
        }
        if self.floor > 0 && sent_at <= self.floor {
            return Err(InitReplay::BelowFloor);
        }
        if self.entries.contains_key(&reference) {
            return Err(InitReplay::Duplicate);
        }
        self.entries.insert(reference, sent_at);
        if self.entries.len() > Self::CAPACITY {
            let (oldest_ref, oldest_at) = self
                .entries
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(r, at)| (*r, *at))
                .expect("non-empty");
            self.entries.remove(&oldest_ref);
            self.floor = self.floor.max(oldest_at);
        }
        Ok(())
    }

    /// Raises the floor as `CAPACITY` first messages would (tests).
    #[cfg(test)]
    pub(crate) fn raise_floor(&mut self, floor: u64) {
        self.floor = self.floor.max(floor);
    }

    fn prune(&mut self, now: u64, max_age: u64) {
        self.entries
            .retain(|_, at| at.saturating_add(max_age) >= now);
    }

    pub(crate) fn write(&self, w: &mut Writer) {
        w.u64(self.floor).u16(self.entries.len() as u16);
        for (reference, at) in &self.entries {
            w.raw(reference).u64(*at);
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let floor = r.u64("init floor")?;
        let n = r.count16(Self::CAPACITY, 24, "seen inits")?;
        let mut entries = BTreeMap::new();
        for _ in 0..n {
            entries.insert(r.array("init reference")?, r.u64("init time")?);
        }
        Ok(Self { floor, entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_knows_its_lowest_gap_and_its_highest() {
        let mut w = ReplayWindow::new();
        assert_eq!((w.lowest_unseen(), w.next_after_highest()), (0, 0));
        for c in [0, 1, 2, 5, 70] {
            w.mark(c);
        }
        assert_eq!((w.lowest_unseen(), w.next_after_highest()), (3, 71));
        w.mark(MAX_COUNTERS - 1);
        assert_eq!(w.next_after_highest(), MAX_COUNTERS);
    }

    #[test]
    fn window_accepts_each_counter_once_in_any_order() {
        let mut w = ReplayWindow::new();
        for c in [5, 0, 4095, 63, 64, 1000] {
            assert!(w.is_fresh(c));
            w.mark(c);
            assert!(!w.is_fresh(c));
        }
        assert!(!w.is_fresh(MAX_COUNTERS));
        assert!(w.is_fresh(6));
    }

    #[test]
    fn window_round_trips() {
        let mut w = ReplayWindow::new();
        w.mark(7);
        w.mark(4000);
        let mut out = Writer::default();
        w.write(&mut out);
        let bytes = out.finish();
        let back = ReplayWindow::read(&mut Reader::new(&bytes)).unwrap();
        assert_eq!(back, w);
    }

    #[test]
    fn seen_inits_refuse_duplicates_and_stale() {
        let mut s = SeenInits::new();
        assert_eq!(s.accept([1; 16], 100, 150, 1000), Ok(()));
        assert_eq!(
            s.accept([1; 16], 100, 151, 1000),
            Err(InitReplay::Duplicate)
        );
        assert_eq!(s.accept([2; 16], 100, 2000, 1000), Err(InitReplay::TooOld));
        // Once the entry ages out, a replay would be refused as too old, not accepted.
        assert_eq!(s.accept([1; 16], 100, 5000, 1000), Err(InitReplay::TooOld));
    }

    #[test]
    fn seen_inits_stay_bounded_and_raise_the_floor() {
        let mut s = SeenInits::new();
        for i in 0..(SeenInits::CAPACITY as u64 + 10) {
            let mut r = [0u8; 16];
            r[..8].copy_from_slice(&i.to_be_bytes());
            s.accept(r, 1000 + i, 2000, 1_000_000).unwrap();
        }
        assert_eq!(s.entries.len(), SeenInits::CAPACITY);
        assert_eq!(s.floor, 1009);
        // A replay of an evicted entry is below the floor.
        let mut r = [0u8; 16];
        r[..8].copy_from_slice(&0u64.to_be_bytes());
        assert_eq!(
            s.accept(r, 1000, 2000, 1_000_000),
            Err(InitReplay::BelowFloor)
        );
    }
}
