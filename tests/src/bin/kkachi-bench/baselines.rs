//! The machine's own limits, measured in the same run: a libp2p round trip between two
//! processes, and sled's insert and flush.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::common::pct;

/// Baseline: a plain libp2p request/response round trip (16 bytes each way, a stream
/// per request) between this process and another on loopback.
pub(crate) async fn libp2p_rtt(rounds: usize) -> Result<Duration> {
    let mut server = Command::new(std::env::current_exe()?)
        .arg("--echo")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    let stdout = server.stdout.take().context("echo server output")?;
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    let addr: libp2p::Multiaddr = line
        .trim()
        .strip_prefix("listening on ")
        .context("echo server address")?
        .parse()?;
    let times = kkachi_tests::echo::round_trips(addr, rounds).await;
    let _ = server.kill();
    let _ = server.wait();
    let mut times = times?;
    times.sort();
    Ok(pct(&times, 0.5))
}

/// Baselines: raw sled inserts of 512 bytes with a flush after each, and without.
pub(crate) fn sled_baseline(n: usize) -> Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let db = sled::Config::new()
        .path(dir.path())
        .flush_every_ms(None)
        .open()?;
    let value = vec![7u8; 512];
    let t = Instant::now();
    for i in 0..n as u64 {
        db.insert(i.to_be_bytes(), value.as_slice())?;
        db.flush()?;
    }
    let with_flush = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in n as u64..(2 * n) as u64 {
        db.insert(i.to_be_bytes(), value.as_slice())?;
    }
    db.flush()?;
    let without = n as f64 / t.elapsed().as_secs_f64();
    Ok((with_flush, without))
}
