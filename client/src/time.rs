//! Human-readable times in the user's local time zone.

use std::sync::LazyLock;

use chrono::format::{Item, StrftimeItems};
use chrono::{Local, TimeZone};

// Parsed once: `history` formats one timestamp per line, possibly 100,000 of them.
static LONG: LazyLock<Vec<Item<'static>>> =
    LazyLock::new(|| StrftimeItems::new("%Y-%m-%d %H:%M").collect());
static SHORT: LazyLock<Vec<Item<'static>>> =
    LazyLock::new(|| StrftimeItems::new("%H:%M").collect());

fn format_with(ms: u64, items: &[Item<'static>], fallback: impl FnOnce() -> String) -> String {
    match Local.timestamp_millis_opt(ms as i64).single() {
        Some(t) => t.format_with_items(items.iter()).to_string(),
        None => fallback(),
    }
}

/// "2026-11-22 14:03" for a Unix time in milliseconds.
pub fn format_ms(ms: u64) -> String {
    format_with(ms, &LONG, || format!("@{ms}"))
}

/// "14:03" for a Unix time in milliseconds (compact, for the chat view).
pub fn format_ms_short(ms: u64) -> String {
    format_with(ms, &SHORT, || "--:--".into())
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
