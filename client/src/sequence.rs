//! What a contact's sequence numbers say about what is missing, in bounded space.
//!
//! Each sequenced record a contact sends carries `seq` (1, 2, 3, ...) and the hash of
//! the record before it (SPEC §5). Every number is chosen by the sender, so nothing
//! here is sized by one: a jump from 7 to 2^40 is one missing range, not a list of a
//! trillion numbers, and at most [`MAX_GAP_RANGES`] ranges are kept (the oldest are
//! forgotten, and counted). Pure bookkeeping: no store, no clock.

use serde::{Deserialize, Serialize};

/// Most separate missing ranges remembered per contact.
pub const MAX_GAP_RANGES: usize = 64;
/// Most hash-chain breaks remembered per contact (the newest).
pub const MAX_CHAIN_BREAKS: usize = 64;

/// The missing sequence numbers of one contact.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Gaps {
    /// Highest sequence number received.
    max_seen: u64,
    /// Missing numbers below `max_seen`: inclusive ranges, ascending, disjoint.
    ranges: Vec<(u64, u64)>,
    /// Numbers that were missing when their range was forgotten to stay bounded.
    forgotten: u64,
}

/// What an arrival did to the gaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The next number, or one past it (opening a gap).
    Ahead,
    /// It filled (part of) a gap.
    Filled,
    /// Not missing: a number already received, or older than the gaps remembered.
    NotMissing,
    /// Unsequenced (0): nothing to record.
    Unsequenced,
}

impl Gaps {
    /// Records that `seq` arrived.
    pub fn arrived(&mut self, seq: u64) -> Arrival {
        if seq == 0 {
            return Arrival::Unsequenced;
        }
        if seq > self.max_seen {
            if seq > self.max_seen + 1 {
                self.ranges.push((self.max_seen + 1, seq - 1));
                self.trim();
            }
            self.max_seen = seq;
            return Arrival::Ahead;
        }
        let Some(i) = self.ranges.iter().position(|&(a, b)| a <= seq && seq <= b) else {
            return Arrival::NotMissing;
        };
        let (a, b) = self.ranges[i];
        match (seq == a, seq == b) {
            (true, true) => {
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i].0 = seq + 1,
            (false, true) => self.ranges[i].1 = seq - 1,
            (false, false) => {
                self.ranges[i].1 = seq - 1;
                self.ranges.insert(i + 1, (seq + 1, b));
                self.trim();
            }
        }
        Arrival::Filled
    }

    /// Takes `seq` as where the numbers start, if none arrived yet: nothing below it
    /// counts as missing. (Another device of a contact's is met partway through its
    /// numbers: after a change of its key, say.)
    pub fn start_at(&mut self, seq: u64) {
        if self.max_seen == 0 && self.ranges.is_empty() {
            self.max_seen = seq.saturating_sub(1);
        }
    }

    /// Forgets the oldest ranges past [`MAX_GAP_RANGES`].
    fn trim(&mut self) {
        while self.ranges.len() > MAX_GAP_RANGES {
            let (a, b) = self.ranges.remove(0);
            self.forgotten = self.forgotten.saturating_add(b - a + 1);
        }
    }

    /// How many numbers are missing (saturating: a sender may claim any number).
    pub fn missing(&self) -> u64 {
        self.ranges
            .iter()
            .fold(0u64, |n, (a, b)| n.saturating_add(b - a + 1))
    }

    /// The missing ranges, inclusive, oldest first.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Numbers given up on to keep the ranges bounded.
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// The highest number received.
    pub fn max_seen(&self) -> u64 {
        self.max_seen
    }

    /// "2, 4–9" (at most a few ranges, then "…").
    pub fn describe(&self) -> String {
        const SHOWN: usize = 4;
        let mut parts: Vec<String> = self
            .ranges
            .iter()
            .take(SHOWN)
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}–{b}")
                }
            })
            .collect();
        if self.ranges.len() > SHOWN {
            parts.push("…".into());
        }
        parts.join(", ")
    }
}

/// One received sequenced record, as its neighbours are checked against it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChainLink {
    /// Its message id.
    pub id: [u8; 16],
    /// The hash of the record (what the next one's `prev` must be).
    pub hash: [u8; 32],
    /// Its `prev`: the hash the record before it must have.
    pub prev: [u8; 32],
}

/// What checking a new record against the records next to it found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChainCheck {
    /// Another message already holds this sequence number.
    pub conflict: bool,
    /// This record's `prev` is not the hash of the one held before it (or, for the
    /// first, not zeros): the number where the chain breaks.
    pub break_before: Option<u64>,
    /// The record held after it names another `prev` than this one's hash.
    pub break_after: Option<u64>,
}

impl ChainCheck {
    /// Checks `new`, arriving as number `seq`, against what is held at `seq` and around it.
    pub fn of(
        seq: u64,
        new: &ChainLink,
        same: Option<&ChainLink>,
        before: Option<&ChainLink>,
        after: Option<&ChainLink>,
    ) -> Self {
        let break_before = match (seq, before) {
            (1, _) if new.prev != [0; 32] => Some(1),
            (_, Some(b)) if b.hash != new.prev => Some(seq),
            _ => None,
        };
        Self {
            conflict: same.is_some_and(|s| s.id != new.id),
            break_before,
            break_after: after
                .filter(|a| a.prev != new.hash)
                .map(|_| seq.saturating_add(1)),
        }
    }

    /// True if the chain is whole around this record.
    pub fn is_clean(&self) -> bool {
        *self == Self::default()
    }
}

/// Adds `seq` to a bounded list of chain breaks (newest kept, no repeats).
pub fn note_break(breaks: &mut Vec<u64>, seq: u64) {
    if !breaks.contains(&seq) {
        breaks.push(seq);
        if breaks.len() > MAX_CHAIN_BREAKS {
            breaks.remove(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn gaps_are_recorded_and_filled() {
        let mut g = Gaps::default();
        assert_eq!(g.arrived(1), Arrival::Ahead);
        assert_eq!(g.arrived(4), Arrival::Ahead);
        assert_eq!(g.ranges(), &[(2, 3)]);
        assert_eq!(g.arrived(3), Arrival::Filled);
        assert_eq!(g.ranges(), &[(2, 2)]);
        assert_eq!(g.arrived(2), Arrival::Filled);
        assert_eq!(g.missing(), 0);
        assert_eq!(g.arrived(5), Arrival::Ahead);
        assert_eq!(
            g.arrived(0),
            Arrival::Unsequenced,
            "receipts never cause gaps"
        );
        assert_eq!(g.arrived(5), Arrival::NotMissing);
        assert_eq!(g.arrived(10), Arrival::Ahead);
        assert_eq!(g.arrived(7), Arrival::Filled);
        assert_eq!(g.ranges(), &[(6, 6), (8, 9)]);
        assert_eq!(g.describe(), "6, 8–9");
    }

    #[test]
    fn a_huge_jump_is_one_range_not_a_list() {
        let mut g = Gaps::default();
        g.arrived(1);
        g.arrived(1 << 40);
        assert_eq!(g.ranges(), &[(2, (1 << 40) - 1)]);
        assert_eq!(g.missing(), (1 << 40) - 2);
        g.arrived(u64::MAX);
        assert_eq!(g.ranges().len(), 2);
        assert_eq!(g.missing(), u64::MAX - 3);
        // Splitting the widest range in the middle, and at the very end of the range.
        assert_eq!(g.arrived(1 << 50), Arrival::Filled);
        assert_eq!(g.arrived(u64::MAX - 1), Arrival::Filled);
        assert_eq!(g.ranges().len(), 3);
        assert_eq!(g.arrived(u64::MAX), Arrival::NotMissing);
    }

    #[test]
    fn ranges_stay_bounded_and_the_forgotten_are_counted() {
        let mut g = Gaps::default();
        for i in 1..=1000u64 {
            g.arrived(2 * i);
        }
        assert_eq!(g.ranges().len(), MAX_GAP_RANGES);
        assert_eq!(g.missing(), MAX_GAP_RANGES as u64);
        assert_eq!(g.forgotten(), 1000 - MAX_GAP_RANGES as u64);
        // A forgotten number that arrives now is simply not missing.
        assert_eq!(g.arrived(1), Arrival::NotMissing);
    }

    proptest! {
        /// Against a plain set of missing numbers (small numbers only, where one fits):
        /// the ranges say exactly what is missing, in bounded space.
        #[test]
        fn ranges_match_a_set(arrivals in proptest::collection::vec(0u64..300, 0..200)) {
            let mut g = Gaps::default();
            let mut received = std::collections::BTreeSet::new();
            for seq in arrivals {
                g.arrived(seq);
                if seq > 0 {
                    received.insert(seq);
                }
                let max = received.iter().next_back().copied().unwrap_or(0);
                let missing: Vec<u64> = (1..max).filter(|s| !received.contains(s)).collect();
                let from_ranges: Vec<u64> = g.ranges().iter().flat_map(|&(a, b)| a..=b).collect();
                if g.forgotten() == 0 {
                    prop_assert_eq!(&from_ranges, &missing);
                } else {
                    prop_assert!(from_ranges.iter().all(|s| missing.contains(s)));
                }
                prop_assert!(g.ranges().len() <= MAX_GAP_RANGES);
                prop_assert_eq!(g.max_seen(), max);
            }
        }
    }

    fn link(id: u8, hash: u8, prev: u8) -> ChainLink {
        ChainLink {
            id: [id; 16],
            hash: [hash; 32],
            prev: [prev; 32],
        }
    }

    #[test]
    fn chain_checks_find_breaks_and_conflicts() {
        let first = ChainLink {
            prev: [0; 32],
            ..link(1, 1, 0)
        };
        assert!(ChainCheck::of(1, &first, None, None, None).is_clean());
        let second = link(2, 2, 1);
        assert!(ChainCheck::of(2, &second, None, Some(&first), None).is_clean());
        // Arrived before its predecessor: checked from the other side.
        assert!(ChainCheck::of(1, &first, None, None, Some(&second)).is_clean());
        let altered = link(3, 3, 9);
        assert_eq!(
            ChainCheck::of(2, &altered, Some(&second), Some(&first), None),
            ChainCheck {
                conflict: true,
                break_before: Some(2),
                break_after: None
            }
        );
        let wrong_first = link(4, 4, 7);
        assert_eq!(
            ChainCheck::of(1, &wrong_first, None, None, Some(&second)).break_before,
            Some(1)
        );
        assert_eq!(
            ChainCheck::of(1, &wrong_first, None, None, Some(&second)).break_after,
            Some(2)
        );
        let mut breaks = Vec::new();
        for s in 0..100 {
            note_break(&mut breaks, s);
            note_break(&mut breaks, s);
        }
        assert_eq!(breaks.len(), MAX_CHAIN_BREAKS);
        assert_eq!(breaks[0], 100 - MAX_CHAIN_BREAKS as u64);
    }
}
