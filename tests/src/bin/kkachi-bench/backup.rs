//! Backup and restore of a long conversation, with the real binary.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::history::{kkachi_bin, long_conversation};

/// `kkachi backup create`, `verify` and `restore` of a home holding `n` messages, each
/// the median of three runs. The baseline is `verify`: reading the same backup through
/// (decrypting and checking every chunk) without writing anything. Then each restored
/// home is joined by a new device over loopback (`device link`, `device join`): the
/// join, from start to its home in place; and that one by another through a relay on
/// loopback (`device link --relay-only`), whose baseline is the direct link.
pub(crate) fn backup_bench(root: &Path, n: usize) -> Result<serde_json::Value> {
    let home = root.join("backup-home");
    long_conversation(&home, n)?;
    let bin = kkachi_bin()?;
    let file = root.join("backup-file");
    let run = |args: &[&str], home: &Path, key: Option<&str>| -> Result<(Duration, String)> {
        let mut cmd = Command::new(&bin);
        cmd.arg("--home").arg(home).args(args);
        if let Some(key) = key {
            cmd.env("KKACHI_RECOVERY_KEY", key);
        }
        let t = Instant::now();
        let out = cmd.output()?;
        let took = t.elapsed();
        if !out.status.success() {
            bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    let file_arg = file.to_str().context("path")?;
    let (_, made) = run(
        &["backup", "create", "--to", file_arg, "--new-key", "--json"],
        &home,
        None,
    )?;
    let made: serde_json::Value = serde_json::from_str(made.trim())?;
    let key = made["recovery_key"]
        .as_str()
        .context("the first backup shows its key")?
        .to_string();
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (mut create, mut verify, mut restore) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..3 {
        create.push(run(&["backup", "create", "--to", file_arg], &home, None)?.0);
        verify.push(run(&["backup", "verify", file_arg], &home, Some(&key))?.0);
        let target = root.join(format!("backup-restored-{i}"));
        let (took, _) = run(&["backup", "restore", file_arg], &target, Some(&key))?;
        restore.push(took);
    }
    let mut link = Vec::new();
    for i in 0..3 {
        let old = root.join(format!("backup-restored-{i}"));
        link.push(link_once(
            &bin,
            &old,
            &root.join(format!("linked-{i}")),
            false,
        )?);
    }
    let relay = crate::common::Relay::start(&root.join("link-relay"), crate::common::free_port())?;
    let mut relayed = Vec::new();
    for i in 0..3 {
        let old = root.join(format!("linked-{i}"));
        run(&["relay", "add", &relay.addr], &old, None)?;
        relayed.push(link_once(
            &bin,
            &old,
            &root.join(format!("relayed-{i}")),
            true,
        )?);
    }
    drop(relay);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(
        json!({ "messages": n, "bytes": std::fs::metadata(&file)?.len(),
               "create_ms": ms(median(create)), "verify_ms": ms(median(verify)),
               "restore_ms": ms(median(restore)), "link_ms": ms(median(link)),
               "relay_link_ms": ms(median(relayed)) }),
    )
}

/// Joins a new home `new` to the account in `old` over loopback, or (`relayed`)
/// through the account's relay alone; how long the join took.
fn link_once(bin: &Path, old: &Path, new: &Path, relayed: bool) -> Result<Duration> {
    use std::io::{BufRead, BufReader};
    let mut args = vec!["device", "link", "--wait", "1m", "--yes", "--json"];
    if relayed {
        args.push("--relay-only");
    } else {
        args.extend(["--listen", "127.0.0.1:0", "--no-relay"]);
    }
    let mut link = Command::new(bin)
        .arg("--home")
        .arg(old)
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut lines = BufReader::new(link.stdout.take().context("stdout")?).lines();
    let offer: serde_json::Value = serde_json::from_str(&lines.next().context("a code")??)?;
    let code = offer["code"].as_str().context("a code")?;
    let t = Instant::now();
    let out = Command::new(bin)
        .arg("--home")
        .arg(new)
        .args(["device", "join", code])
        .output()?;
    let took = t.elapsed();
    let linked = link.wait()?;
    if !out.status.success() || !linked.success() {
        bail!(
            "device join failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}
