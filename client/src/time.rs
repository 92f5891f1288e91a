//! Human-readable times in the user's local time zone.

use std::fmt::Write as _;

use chrono::{DateTime, Datelike, FixedOffset, Local, NaiveDateTime, TimeZone, Timelike};

/// Offsets are whole quarter hours, and zones change them on quarter-hour boundaries,
/// so one lookup of the zone serves every instant in the same quarter hour.
const OFFSET_BUCKET_MS: i64 = 15 * 60 * 1000;

/// Formats many timestamps in local time. Looking up the zone's offset is most of
/// the cost of formatting one (`history` formats one per line, possibly 100,000), so
/// the last offset is kept for its quarter hour.
#[derive(Debug)]
pub struct LocalTimes<Z = Local> {
    zone: Z,
    last: Option<(i64, FixedOffset)>,
}

impl Default for LocalTimes {
    fn default() -> Self {
        Self::in_zone(Local)
    }
}

impl<Z: TimeZone<Offset = FixedOffset>> LocalTimes<Z> {
    /// Times in `zone` rather than the user's.
    pub fn in_zone(zone: Z) -> Self {
        Self { zone, last: None }
    }

    fn local(&mut self, ms: u64) -> Option<NaiveDateTime> {
        let ms = i64::try_from(ms).ok()?;
        let utc = DateTime::from_timestamp_millis(ms)?.naive_utc();
        let bucket = ms.div_euclid(OFFSET_BUCKET_MS);
        let offset = match self.last {
            Some((b, offset)) if b == bucket => offset,
            _ => {
                let offset = self.zone.offset_from_utc_datetime(&utc);
                self.last = Some((bucket, offset));
                offset
            }
        };
        utc.checked_add_offset(offset)
    }

    /// Appends "2026-11-22 14:03" (or "@<ms>" for a time out of range).
    pub fn push_long(&mut self, out: &mut String, ms: u64) {
        match self.local(ms) {
            Some(t) => {
                let _ = write!(
                    out,
                    "{:04}-{:02}-{:02} {:02}:{:02}",
                    t.year(),
                    t.month(),
                    t.day(),
                    t.hour(),
                    t.minute()
                );
            }
            None => {
                let _ = write!(out, "@{ms}");
            }
        }
    }

    /// Appends "2026-11-22" (or "@<ms>" for a time out of range).
    pub fn push_day(&mut self, out: &mut String, ms: u64) {
        match self.local(ms) {
            Some(t) => {
                let _ = write!(out, "{:04}-{:02}-{:02}", t.year(), t.month(), t.day());
            }
            None => {
                let _ = write!(out, "@{ms}");
            }
        }
    }

    /// Appends "14:03" (or "--:--" for a time out of range).
    pub fn push_short(&mut self, out: &mut String, ms: u64) {
        match self.local(ms) {
            Some(t) => {
                let _ = write!(out, "{:02}:{:02}", t.hour(), t.minute());
            }
            None => out.push_str("--:--"),
        }
    }
}

/// "2026-11-22 14:03" for a Unix time in milliseconds.
pub fn format_ms(ms: u64) -> String {
    let mut s = String::with_capacity(16);
    LocalTimes::default().push_long(&mut s, ms);
    s
}

/// "2026-11-22" for a Unix time in milliseconds: the local day.
pub fn format_day(ms: u64) -> String {
    let mut s = String::with_capacity(10);
    LocalTimes::default().push_day(&mut s, ms);
    s
}

/// "14:03" for a Unix time in milliseconds (compact, for the chat view).
pub fn format_ms_short(ms: u64) -> String {
    let mut s = String::with_capacity(5);
    LocalTimes::default().push_short(&mut s, ms);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_have_the_expected_shape() {
        let s = format_ms(1_700_000_000_000);
        assert_eq!(s.len(), 16, "{s}");
        assert!(s.starts_with("2023-11-1"), "{s}");
        assert_eq!(format_ms_short(1_700_000_000_000).len(), 5);
        assert_eq!(format_ms(u64::MAX), format!("@{}", u64::MAX));
        assert_eq!(format_ms_short(u64::MAX), "--:--");
    }

    /// A zone with daylight saving like Newfoundland's (UTC-3:30, and -2:30 in
    /// summer), changing every 10 days at 05:30 UTC: a change inside an hour, on a
    /// quarter-hour boundary.
    #[derive(Debug, Clone, Copy)]
    struct Switching;

    impl Switching {
        fn offset_at(utc: &NaiveDateTime) -> FixedOffset {
            let since = utc.and_utc().timestamp() - 5 * 3600 - 1800;
            let summer = since.div_euclid(10 * 86_400) % 2 == 0;
            FixedOffset::west_opt(if summer { 9000 } else { 12_600 }).unwrap()
        }
    }

    impl TimeZone for Switching {
        type Offset = FixedOffset;
        fn from_offset(_: &FixedOffset) -> Self {
            Switching
        }
        fn offset_from_local_date(
            &self,
            _: &chrono::NaiveDate,
        ) -> chrono::MappedLocalTime<FixedOffset> {
            unreachable!("only UTC instants are converted")
        }
        fn offset_from_local_datetime(
            &self,
            _: &NaiveDateTime,
        ) -> chrono::MappedLocalTime<FixedOffset> {
            unreachable!("only UTC instants are converted")
        }
        fn offset_from_utc_date(&self, _: &chrono::NaiveDate) -> FixedOffset {
            unreachable!("only UTC instants are converted")
        }
        fn offset_from_utc_datetime(&self, utc: &NaiveDateTime) -> FixedOffset {
            Self::offset_at(utc)
        }
    }

    #[test]
    fn the_cached_offset_follows_every_change_of_the_zone() {
        // Every 7 minutes and 13 seconds over a year: many changes, and quarter-hour
        // buckets in every phase.
        let mut times = LocalTimes::in_zone(Switching);
        let start: u64 = 1_700_000_000_000;
        let step: u64 = (7 * 60 + 13) * 1000;
        let mut changes = 0;
        let mut last_offset = None;
        for i in 0..(365 * 24 * 60 / 7) {
            let ms = start + i * step;
            let utc = DateTime::from_timestamp_millis(ms as i64)
                .unwrap()
                .naive_utc();
            let offset = Switching::offset_at(&utc);
            changes += usize::from(last_offset.is_some_and(|o| o != offset));
            last_offset = Some(offset);
            let expected = (utc + offset).format("%Y-%m-%d %H:%M").to_string();
            let mut got = String::new();
            times.push_long(&mut got, ms);
            assert_eq!(got, expected, "at {ms}");
        }
        assert!(changes > 30, "the zone changed only {changes} times");
    }

    #[test]
    fn local_time_is_what_chrono_gives() {
        let mut times = LocalTimes::default();
        for ms in [0, 1_700_000_000_000, 1_790_000_123_456] {
            let mut got = String::new();
            times.push_long(&mut got, ms);
            let expected = Local
                .timestamp_millis_opt(ms as i64)
                .unwrap()
                .format("%Y-%m-%d %H:%M")
                .to_string();
            assert_eq!(got, expected);
        }
    }
}
