//! Human-readable times in the user's local time zone.

use chrono::{Local, TimeZone};

/// "2026-11-22 14:03" for a Unix time in milliseconds.
pub fn format_ms(ms: u64) -> String {
    match Local.timestamp_millis_opt(ms as i64).single() {
        Some(t) => t.format("%Y-%m-%d %H:%M").to_string(),
        None => format!("@{ms}"),
    }
}

/// "14:03" for a Unix time in milliseconds (compact, for the chat view).
pub fn format_ms_short(ms: u64) -> String {
    match Local.timestamp_millis_opt(ms as i64).single() {
        Some(t) => t.format("%H:%M").to_string(),
        None => "--:--".into(),
    }
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
    }
}
