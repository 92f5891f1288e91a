//! kkachi-tests: cross-process scenarios with the real binaries, fault injection, a
//! delivery checker, and benchmark tools.
//!
//! - [`procs`]: relay and user processes (start, kill -9, restart on the same port and
//!   data), daemons whose JSON output is read line by line.
//! - [`checker`]: records what was reported sent and what was shown, and reports lost,
//!   duplicated, reordered-without-notice, latency percentiles and the longest gap.
//! - [`netns`]: network namespaces and nftables rules for LAN and partition scenarios
//!   (root only; tests say why they skip otherwise).
//!
//! The binaries are found next to the test executable (`target/<profile>/`); `cargo
//! test --workspace` builds them.

pub mod checker;
pub mod netns;
pub mod procs;

/// True when long soak runs are asked for (`KKACHI_SOAK=1`).
pub fn soak() -> bool {
    std::env::var_os("KKACHI_SOAK").is_some_and(|v| v != "0")
}
