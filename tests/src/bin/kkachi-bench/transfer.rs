//! Files end to end: `kkachi send --file` through three relays and `kkachi get` on the
//! other side, beside a plain local copy of the same file; the same with one relay
//! killed -9 part-way through the upload; and the peak memory of the sending and
//! fetching processes, for a large file.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use kkachi_tests::data::{random_file as write_file, same_bytes};

use crate::common::{Relay, free_port};

fn client_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("exe dir")?.join("kkachi");
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release --workspace` first",
            bin.display()
        );
    }
    Ok(bin)
}

fn command(home: &Path) -> Result<Command> {
    let mut c = Command::new(client_bin()?);
    c.arg("--home")
        .arg(home)
        .env("RUST_LOG", "error")
        .env("KKACHI_LAN", "0")
        .env("KKACHI_LISTEN", "/ip4/127.0.0.1/tcp/0");
    Ok(c)
}

fn ok(home: &Path, args: &[&str]) -> Result<String> {
    let out = command(home)?.args(args).output()?;
    if !out.status.success() {
        bail!(
            "kkachi {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A process's peak resident memory so far, KiB.
fn peak_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A run of `kkachi`: how long it took, its stdout, and its peak memory (KiB).
struct Run {
    secs: f64,
    stdout: String,
    peak_kib: u64,
}

/// Runs `kkachi` at `home`; `fault`, if given, is asked every few milliseconds while it
/// runs, until it says it struck (a run it never struck in is an error).
fn run(home: &Path, args: &[&str], fault: Option<&mut dyn FnMut() -> bool>) -> Result<Run> {
    let started = Instant::now();
    let mut child = command(home)?
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut stdout = child.stdout.take().context("stdout")?;
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let mut peak = 0;
    let mut fault = fault;
    let mut said = Vec::new();
    loop {
        if let Some(p) = peak_kib(pid) {
            peak = peak.max(p);
        }
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("kkachi {args:?} failed: {}", said.join("\n"));
            }
            break;
        }
        said.extend(lines.try_iter());
        if fault.as_mut().is_some_and(|strike| strike()) {
            fault = None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if fault.is_some() {
        bail!("kkachi {args:?} ended before the fault could be injected");
    }
    Ok(Run {
        secs: started.elapsed().as_secs_f64(),
        stdout: out.join().unwrap_or_default(),
        peak_kib: peak,
    })
}

/// The newest file Bob received (after a sync), by id.
fn newest_file(bob: &Path) -> Result<String> {
    ok(bob, &["sync", "--timeout", "10"])?;
    let rows: serde_json::Value = serde_json::from_str(ok(bob, &["files", "--json"])?.trim())?;
    rows.as_array()
        .and_then(|r| r.iter().find(|f| f["direction"] == "in"))
        .and_then(|f| f["id"].as_str())
        .map(str::to_owned)
        .context("no file arrived")
}

/// Sends a file of `bytes` from Alice, fetches it at Bob; (upload, download) runs.
fn through(
    root: &Path,
    name: &str,
    bytes: u64,
    seed: u64,
    fault: Option<&mut dyn FnMut() -> bool>,
) -> Result<(Run, Run)> {
    let (alice, bob) = (root.join("alice"), root.join("bob"));
    let src = root.join(name);
    write_file(&src, bytes, seed)?;
    let src_arg = src.to_str().context("path")?;
    let up = run(&alice, &["send", "bob", "--file", src_arg, "--json"], fault)?;
    let sent: serde_json::Value = serde_json::from_str(up.stdout.trim())?;
    if sent["state"] == "queued" {
        bail!("the upload stopped short: {}", sent["why"]);
    }
    let id = newest_file(&bob)?;
    let saved = root.join("saved");
    let down = run(
        &bob,
        &[
            "get",
            &id,
            "--to",
            saved.to_str().context("path")?,
            "--json",
        ],
        None,
    )?;
    let got: serde_json::Value = serde_json::from_str(down.stdout.trim())?;
    let path = PathBuf::from(got["path"].as_str().context("saved path")?);
    if !same_bytes(&src, &path)? {
        bail!(
            "the file fetched ({id}) differs from the one sent: sent {}, fetched {}",
            up.stdout.trim(),
            down.stdout.trim()
        );
    }
    std::fs::remove_file(&path)?;
    std::fs::remove_file(&src)?;
    Ok((up, down))
}

/// Files end to end with `mib` MiB (and the memory of a `big_mib` MiB transfer, if
/// given).
pub(crate) fn transfer(root: &Path, mib: u64, big_mib: Option<u64>) -> Result<serde_json::Value> {
    let root = root.join("transfer");
    std::fs::create_dir_all(&root)?;
    let mut relays = (0..3)
        .map(|i| Relay::start(&root.join(format!("r{i}")), free_port()))
        .collect::<Result<Vec<_>>>()?;
    let (alice, bob) = (root.join("alice"), root.join("bob"));
    for (home, name) in [(&alice, "alice"), (&bob, "bob")] {
        ok(home, &["init", "--name", name])?;
        let mut args = vec!["relay", "add"];
        args.extend(relays.iter().map(|r| r.addr.as_str()));
        ok(home, &args)?;
    }
    let code = |home: &Path| -> Result<String> { Ok(ok(home, &["invite"])?.trim().to_owned()) };
    ok(&alice, &["contact", "add", &code(&bob)?])?;
    ok(&bob, &["contact", "add", &code(&alice)?])?;
    ok(&bob, &["sync", "--timeout", "10"])?;
    ok(&alice, &["sync", "--timeout", "10"])?;
    let bytes = mib << 20;
    let mb = bytes as f64 / 1e6;

    // Baseline: the same bytes copied on the same disk and synced.
    let src = root.join("plain.bin");
    write_file(&src, bytes, 3)?;
    let copy = root.join("plain-copy.bin");
    let started = Instant::now();
    std::fs::copy(&src, &copy)?;
    std::fs::File::open(&copy)?.sync_all()?;
    let copy_s = started.elapsed().as_secs_f64();
    std::fs::remove_file(&copy)?;
    std::fs::remove_file(&src)?;

    let (up, down) = through(&root, "clean.bin", bytes, 5, None)?;
    let clean_s = up.secs + down.secs;
    // Relay 0 is killed once it holds 30% of its share (two copies of every chunk over
    // three relays): watched on its disk, so the kill lands mid-upload however fast.
    let share = (bytes.div_ceil(256 << 10) * 2 / 3) as usize;
    let mut kill = || {
        let struck = relays[0].chunk_files() * 10 >= share * 3;
        if struck {
            relays[0].kill9();
        }
        struck
    };
    let (up_f, down_f) = through(&root, "faulty.bin", bytes, 7, Some(&mut kill))?;
    let faulty_s = up_f.secs + down_f.secs;
    relays[0].restart()?;

    let mut big = serde_json::Value::Null;
    if let Some(big_mib) = big_mib {
        let (up_b, down_b) = through(&root, "big.bin", big_mib << 20, 9, None)?;
        big = json!({
            "file_mib": big_mib,
            "send_peak_rss_mib": up_b.peak_kib as f64 / 1024.0,
            "get_peak_rss_mib": down_b.peak_kib as f64 / 1024.0,
            "mb_s": (big_mib << 20) as f64 / 1e6 / (up_b.secs + down_b.secs),
        });
    }
    let peak_mib = match &big {
        serde_json::Value::Null => up.peak_kib.max(down.peak_kib) as f64 / 1024.0,
        b => b["send_peak_rss_mib"]
            .as_f64()
            .unwrap_or(0.0)
            .max(b["get_peak_rss_mib"].as_f64().unwrap_or(0.0)),
    };
    Ok(json!({
        "file_mib": mib,
        "relays": 3,
        "upload_s": up.secs,
        "download_s": down.secs,
        "upload_mb_s": mb / up.secs,
        "download_mb_s": mb / down.secs,
        "mb_s": mb / clean_s,
        "copy_mb_s": mb / copy_s,
        "vs_copy": (mb / clean_s) / (mb / copy_s),
        "one_relay_killed_s": faulty_s,
        "one_relay_killed_upload_s": up_f.secs,
        "one_relay_killed_download_s": down_f.secs,
        "fault_ratio": faulty_s / clean_s,
        "peak_rss_mib": peak_mib,
        "peak_rss_file_mib": big_mib.unwrap_or(mib),
        "big": big,
    }))
}
