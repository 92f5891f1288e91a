//! The delivery checker, after Jepsen/Maelstrom's broadcast checker: every message the
//! app reported as sent must be shown exactly once; order problems must come with a
//! gap notice.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

/// What a scenario observed.
#[derive(Debug, Default)]
pub struct Checker {
    sent: HashMap<String, Instant>,
    order: Vec<String>,
    shown: HashMap<String, Vec<Instant>>,
    /// (seq, missing-at-that-time) in arrival order, per sender.
    arrivals: HashMap<String, Vec<Arrival>>,
    /// Never printed by the recipient's daemon but in its history: it was killed
    /// between storing a message and printing it, and shows it from its store.
    unprinted: std::collections::HashSet<String>,
}

/// The verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Messages reported sent.
    pub sent: usize,
    /// Shown at least once.
    pub delivered: usize,
    /// Reported sent, never shown.
    pub lost: usize,
    /// Extra showings of messages already shown.
    pub duplicated: usize,
    /// Shown after a later message of the same sender with no gap notice for it.
    pub reordered_without_notice: usize,
    /// Send-to-shown latency percentiles.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Longest visible pause: a message waited and nothing at all was shown.
    pub longest_gap: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "messages {} delivered {} lost {} duplicated {} reordered-without-notice {} latency p50 {:.1} ms p99 {:.1} ms longest gap {:.0} ms",
            self.sent,
            self.delivered,
            self.lost,
            self.duplicated,
            self.reordered_without_notice,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.longest_gap.as_secs_f64() * 1e3
        )
    }
}

/// One message shown: its sequence number and the missing ranges announced with it.
type Arrival = (u64, Vec<(u64, u64)>);

impl Checker {
    /// Records a message the app reported as sent (its id), at `at`.
    pub fn sent(&mut self, id: &str, at: Instant) {
        self.sent.insert(id.to_string(), at);
        self.order.push(id.to_string());
    }

    /// Records a daemon output line (JSON object with id, from, seq, and the missing
    /// ranges as `gaps`: `[[first, last], …]`).
    pub fn shown(&mut self, at: Instant, line: &serde_json::Value) {
        let Some(id) = line["id"].as_str() else {
            return;
        };
        self.shown.entry(id.to_string()).or_default().push(at);
        let from = line["peer_id"].as_str().unwrap_or_default().to_string();
        let seq = line["seq"].as_u64().unwrap_or(0);
        self.arrivals
            .entry(from)
            .or_default()
            .push((seq, gap_ranges(line)));
    }

    /// Every id reported sent, in order.
    pub fn sent_ids(&self) -> Vec<String> {
        self.order.clone()
    }

    /// Ids reported sent but not shown yet.
    pub fn outstanding(&self) -> usize {
        self.sent
            .keys()
            .filter(|id| !self.shown.contains_key(*id) && !self.unprinted.contains(*id))
            .count()
    }

    /// Takes the recipient's history (`kkachi history --json`): a message sent and
    /// never printed, but stored, was stored just before the recipient was killed (the
    /// daemon prints once a message is durable, and a restarted one does not print it
    /// again): it is shown from the store, so it is delivered, not lost. Returns how
    /// many such messages there were.
    pub fn stored(&mut self, history: &serde_json::Value) -> usize {
        let ids = history
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str());
        let mut n = 0;
        for id in ids {
            if self.sent.contains_key(id) && !self.shown.contains_key(id) {
                n += usize::from(self.unprinted.insert(id.to_string()));
            }
        }
        n
    }

    pub fn report(&self) -> Report {
        let lost = self.outstanding();
        let duplicated = self.shown.values().map(|v| v.len().saturating_sub(1)).sum();
        let mut latencies: Vec<Duration> = self
            .sent
            .iter()
            .filter_map(|(id, at)| {
                self.shown
                    .get(id)
                    .map(|s| s[0].saturating_duration_since(*at))
            })
            .collect();
        latencies.sort();
        let pct = |p: f64| {
            if latencies.is_empty() {
                Duration::ZERO
            } else {
                latencies[((latencies.len() - 1) as f64 * p).round() as usize]
            }
        };
        let mut reordered = 0;
        for arrivals in self.arrivals.values() {
            let mut max_seq = 0;
            let mut announced: Vec<(u64, u64)> = Vec::new();
            for (seq, gaps) in arrivals {
                if *seq < max_seq && !announced.iter().any(|(a, b)| a <= seq && seq <= b) {
                    reordered += 1;
                }
                announced.extend(gaps);
                max_seq = max_seq.max(*seq);
            }
        }
        // A visible pause: a message was waiting and nothing at all was shown. For each
        // message, the time from max(its send, the previous showing) to its showing.
        let mut times: Vec<Instant> = self.shown.values().flatten().copied().collect();
        times.sort();
        let longest_gap = self
            .sent
            .iter()
            .filter_map(|(id, sent)| {
                let shown = *self.shown.get(id)?.first()?;
                let previous = times.iter().rev().find(|t| **t < shown).copied();
                let start = previous.map_or(*sent, |p| p.max(*sent));
                Some(shown.saturating_duration_since(start))
            })
            .max()
            .unwrap_or_default();
        Report {
            sent: self.sent.len(),
            delivered: self
                .sent
                .keys()
                .filter(|id| self.shown.contains_key(*id) || self.unprinted.contains(*id))
                .count(),
            lost,
            duplicated,
            reordered_without_notice: reordered,
            p50: pct(0.5),
            p99: pct(0.99),
            longest_gap,
        }
    }
}

/// The missing ranges a daemon line announces (`"gaps": [[first, last], …]`).
pub fn gap_ranges(line: &serde_json::Value) -> Vec<(u64, u64)> {
    line["gaps"]
        .as_array()
        .map(|gaps| {
            gaps.iter()
                .filter_map(|g| Some((g[0].as_u64()?, g[1].as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_lost_duplicated_and_reordered() {
        let t0 = Instant::now();
        let mut c = Checker::default();
        for id in ["a", "b", "c", "d"] {
            c.sent(id, t0);
        }
        let line = |id: &str, seq: u64, gaps: Vec<(u64, u64)>| json!({"id": id, "peer_id": "p", "seq": seq, "gaps": gaps});
        c.shown(t0 + Duration::from_millis(10), &line("a", 1, vec![]));
        c.shown(t0 + Duration::from_millis(20), &line("c", 3, vec![(2, 2)]));
        c.shown(t0 + Duration::from_millis(30), &line("b", 2, vec![]));
        c.shown(t0 + Duration::from_millis(40), &line("b", 2, vec![]));
        let r = c.report();
        assert_eq!((r.sent, r.delivered, r.lost, r.duplicated), (4, 3, 1, 1));
        assert_eq!(r.reordered_without_notice, 0, "b's gap was announced");
        let mut c2 = Checker::default();
        c2.sent("x", t0);
        c2.sent("y", t0);
        c2.shown(t0, &line("y", 2, vec![]));
        c2.shown(t0, &line("x", 1, vec![]));
        assert_eq!(c2.report().reordered_without_notice, 1);
    }
}
