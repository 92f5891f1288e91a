//! `kkachi history` of a long conversation, with the real binary.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kkachi_client::store::{Contact, LocalStore, Profile, WriteSet};
use kkachi_protocol::{Card, Identity};
use serde_json::json;

/// `kkachi history` on a conversation of `n` messages: the whole history, and the last
/// 50, each the median of three runs of the real binary.
pub(crate) fn history_bench(root: &Path, n: usize) -> Result<serde_json::Value> {
    let home = root.join("history");
    long_conversation(&home, n)?;
    let bin = kkachi_bin()?;
    history_times(&bin, &home, n)
}

/// A home at `home` holding one conversation of `n` messages with "Minji".
pub(crate) fn long_conversation(home: &Path, n: usize) -> Result<()> {
    use kkachi_client::store::{Direction, MessageRecord, MessageState, message_key};
    let store = LocalStore::open(home)?;
    let me = Identity::generate();
    store.init_identity(&me, &Profile::new("me"))?;
    let other = Identity::generate();
    let card = Card::new(&other, "Minji", vec![], 1)?;
    let peer = card.identity().peer_id();
    let mut w = WriteSet::default();
    LocalStore::write_contact(&mut w, &Contact::new(peer, "Minji".into(), card));
    store.apply(w)?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut w = WriteSet::default();
        for &i in chunk {
            let record = MessageRecord {
                id: (i as u128).to_be_bytes(),
                direction: if i % 2 == 0 {
                    Direction::Out
                } else {
                    Direction::In
                },
                text: format!("message number {i}, about as long as a chat line usually is"),
                state: if i % 2 == 0 {
                    MessageState::Delivered
                } else {
                    MessageState::Received
                },
                sent_at_ms: 1_700_000_000_000 + i as u64 * 1000,
                stored_at_ms: 0,
                seq: i as u64 / 2 + 1,
                prev: [0; 32],
                timer_secs: 0,
                edited: false,
                deleted: false,
                revised_seq: 0,
                reply_to: None,
                reactions: Default::default(),
                file: None,
            };
            LocalStore::write_message(&mut w, &peer, message_key(&peer, i as u64), &record);
        }
        store.apply(w)?;
    }
    let mut conv = store.conversation(&peer)?;
    conv.next_local = n as u64;
    let mut w = WriteSet::default();
    LocalStore::write_conversation(&mut w, &peer, &conv);
    store.apply(w)?;
    Ok(())
}

/// The `kkachi` binary beside this one.
pub(crate) fn kkachi_bin() -> Result<std::path::PathBuf> {
    let bin = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("kkachi");
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release --workspace` first",
            bin.display()
        );
    }
    Ok(bin)
}

fn history_times(bin: &Path, home: &Path, n: usize) -> Result<serde_json::Value> {
    let time = |args: &[&str]| -> Result<(Duration, usize)> {
        let mut runs = Vec::new();
        let mut lines = 0;
        for _ in 0..3 {
            let t = Instant::now();
            let out = Command::new(bin)
                .arg("--home")
                .arg(home)
                .args(args)
                .output()?;
            runs.push(t.elapsed());
            if !out.status.success() {
                bail!("history failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            lines = out.stdout.iter().filter(|b| **b == b'\n').count();
        }
        runs.sort();
        Ok((runs[1], lines))
    };
    let (all, all_lines) = time(&["history", "Minji"])?;
    let (last, _) = time(&["history", "Minji", "--last", "50"])?;
    Ok(
        json!({ "messages": n, "history_all_ms": all.as_secs_f64() * 1e3, "lines": all_lines,
               "history_last50_ms": last.as_secs_f64() * 1e3 }),
    )
}
