//! Send → shown latency between two clients in separate processes, through relays
//! (and directly), and the pause when a relay dies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kkachi_client::engine::{AppEvent, Engine, Mode, SendEvent};
use kkachi_client::net::{NetConfig, Network};
use kkachi_client::store::LocalStore;
use kkachi_protocol::Card;
use kkachi_protocol::wire::Addressed;
use kkachi_relay::client::MailboxClient;
use libp2p::identity::Keypair;
use parking_lot::Mutex;
use serde_json::json;

use crate::common::{Relay, envelope, free_port, mono_us, open_queue, pct};

pub(crate) struct User {
    pub(crate) engine: Engine<Network>,
    pub(crate) card: Card,
    _dir: tempfile::TempDir,
}

/// With `direct`, contacts reach each other through relay circuits and hole punching
/// (opt-in, `KKACHI_CIRCUITS=1`: a reservation names the user to the relay): off a LAN,
/// the only way a direct connection forms.
fn net_config(direct: bool) -> Result<NetConfig> {
    Ok(NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        lan: false,
        direct,
        circuits: direct,
    })
}

/// A new home at `home`: sealed, or (to measure what sealing costs) in the clear.
pub(crate) fn provision(
    home: &Path,
    name: &str,
    relays: &[kkachi_protocol::Multiaddr],
    sealed: bool,
) -> Result<(LocalStore, kkachi_protocol::Identity, Card)> {
    Ok(if sealed {
        LocalStore::provision(home, name, relays)?
    } else {
        LocalStore::provision_clear(home, name, relays)?
    })
}

/// A client online at `relays`; with `direct`, it also connects to contacts directly.
pub(crate) fn user(name: &str, relays: &[String], direct: bool, sealed: bool) -> Result<User> {
    let dir = tempfile::tempdir()?;
    let addrs: Vec<kkachi_protocol::Multiaddr> =
        relays.iter().map(|r| r.parse()).collect::<Result<_, _>>()?;
    let (store, me, card) = provision(dir.path(), name, &addrs, sealed)?;
    let engine = kkachi_client::runtime::start_engine(store, me, net_config(direct)?, Mode::ONLINE)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(User {
        engine,
        card,
        _dir: dir,
    })
}

/// The recipient of the latency runs, in its own process as it would be on its own
/// device (clients in one process would share sled's process-wide write lock and one
/// runtime). Prints `ready`, then `shown <id> <µs>` when a message is in the store (what
/// the terminal UI shows) and `durable <id> <µs>` once it is on disk, until its
/// standard input closes.
pub(crate) async fn recipient(home: PathBuf, direct: bool) -> Result<()> {
    use std::io::Write;
    let store = LocalStore::open(&home)?;
    let me = store
        .identity()?
        .context("the recipient's home has no identity")?;
    let engine = kkachi_client::runtime::start_engine(store, me, net_config(direct)?, Mode::ONLINE)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut events = engine.subscribe();
    let printer = tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            let (what, r) = match e {
                AppEvent::Incoming(r) => ("shown", r),
                AppEvent::Message(r) => ("durable", r),
                _ => continue,
            };
            let at = mono_us();
            let id = u128::from_be_bytes(r.message.id);
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{what} {id:032x} {at}");
            let _ = out.flush();
        }
    });
    println!("ready");
    let (closed_tx, closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        drop(closed_tx);
    });
    let _ = closed.await;
    engine.shutdown().await?;
    printer.abort();
    Ok(())
}

/// What the recipient process reported: µs timestamps by message id.
#[derive(Default)]
pub(crate) struct Seen {
    pub(crate) shown: HashMap<[u8; 16], Vec<u64>>,
    pub(crate) durable: HashMap<[u8; 16], Vec<u64>>,
}

/// Starts the recipient process on `home` and collects what it reports.
pub(crate) async fn spawn_recipient(
    home: &Path,
    direct: bool,
) -> Result<(tokio::process::Child, Arc<Mutex<Seen>>)> {
    use tokio::io::AsyncBufReadExt;
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command.arg("--recipient").arg(home);
    if !direct {
        command.arg("--relays-only");
    }
    let mut child = command
        .env("RUST_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
        Ok(Ok(Some(line))) if line == "ready" => {}
        other => bail!("the recipient process did not start: {other:?}"),
    }
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut parts = line.split(' ');
            let (Some(what), Some(id), Some(at)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Ok(id), Ok(at)) = (u128::from_str_radix(id, 16), at.parse::<u64>()) else {
                continue;
            };
            let mut seen = sink.lock();
            let map = if what == "shown" {
                &mut seen.shown
            } else {
                &mut seen.durable
            };
            map.entry(id.to_be_bytes()).or_default().push(at);
        }
    });
    Ok((child, seen))
}

/// Send → shown latency through `relay_count` relays, with background load, and the
/// pause when one relay is killed with -9 under that load. The sender runs here, the
/// recipient in its own process. With `direct`, the two clients also connect to each
/// other directly (which then carries most messages first); without, everything goes
/// through the relays. Without `sealed`, both clients keep their stores in the clear.
pub(crate) async fn latency_and_failover(
    root: &Path,
    relay_count: usize,
    messages: usize,
    load_per_s: u64,
    kill: bool,
    direct: bool,
    sealed: bool,
) -> Result<(serde_json::Value, serde_json::Value)> {
    let mut relays: Vec<Relay> = (0..relay_count)
        .map(|i| {
            let dir = root.join(format!(
                "lat{relay_count}-{direct}-{sealed}-{i}-{}",
                mono_us()
            ));
            Relay::start(&dir, free_port())
        })
        .collect::<Result<_>>()?;
    let addrs: Vec<String> = relays.iter().map(|r| r.addr.clone()).collect();
    let alice = user("alice", &addrs, direct, sealed)?;
    // Bob's home is made here, then handed to his own process.
    let bob_home = tempfile::tempdir()?;
    let bob_at_alice = {
        let relays: Vec<kkachi_protocol::Multiaddr> =
            addrs.iter().map(|r| r.parse()).collect::<Result<_, _>>()?;
        let (store, _, card) = provision(bob_home.path(), "bob", &relays, sealed)?;
        store.add_card(&alice.card)?;
        store.flush().await?;
        alice.engine.add_contact(card.clone(), None).await?;
        card.identity().peer_id()
    };
    let (mut bob, seen) = spawn_recipient(bob_home.path(), direct).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Background load: a third party putting envelopes into other mailboxes.
    let loader =
        MailboxClient::connect(Keypair::generate_ed25519(), addrs[addrs.len() - 1].parse()?)
            .await?;
    let mut load_stopped = stop_rx.clone();
    let to = open_queue(&loader).await?;
    let load = tokio::spawn(async move {
        if load_per_s == 0 {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let per_tick = (load_per_s / 100).max(1);
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = load_stopped.changed() => break,
                _ = tick.tick() => {
                    let envs: Vec<Addressed> = (0..per_tick).map(|i| envelope(&to, n + i, 512)).collect();
                    n += per_tick;
                    let _ = loader.put(envs).await;
                }
            }
        }
    });
    // Warm up: sessions established, connections open.
    for _ in 0..5 {
        let mut sending = alice.engine.send(bob_at_alice, "warm-up".into()).await?;
        let delivered = async {
            while let Some(event) = sending.events.recv().await {
                if matches!(event, SendEvent::Delivered { .. }) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), delivered).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    *seen.lock() = Seen::default();
    let mut sent: Vec<([u8; 16], u64)> = Vec::new();
    let mut sendings = Vec::with_capacity(messages);
    let kill_at = if kill { messages / 2 } else { messages };
    let mut killed_at = None;
    for i in 0..messages {
        if i == kill_at {
            relays[0].kill9();
            killed_at = Some(mono_us());
        }
        let t = mono_us();
        // As the terminal UI sends: delivery starts while the message is made durable.
        let sending = alice
            .engine
            .send(bob_at_alice, format!("bench {i}"))
            .await?;
        sent.push((sending.queued.id.0, t));
        sendings.push(sending);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && sent
            .iter()
            .any(|(id, _)| !seen.lock().durable.contains_key(id))
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(true);
    let _ = load.await;
    // Closing its input stops the recipient; it flushes and exits.
    drop(bob.stdin.take());
    if tokio::time::timeout(Duration::from_secs(10), bob.wait())
        .await
        .is_err()
    {
        let _ = bob.kill().await;
    }
    // Which messages went over a direct connection (the rest through the relays only).
    let handed_over = sendings
        .iter_mut()
        .filter_map(|s| {
            std::iter::from_fn(|| s.events.try_recv().ok())
                .any(|e| matches!(e, SendEvent::Delivered { direct: true }))
                .then_some(())
        })
        .count();
    let Seen { shown, durable } = std::mem::take(&mut *seen.lock());
    let lost = sent
        .iter()
        .filter(|(id, _)| !durable.contains_key(id) || !shown.contains_key(id))
        .count();
    let duplicated: usize = [&shown, &durable]
        .iter()
        .flat_map(|m| m.values())
        .map(|v| v.len().saturating_sub(1))
        .sum();
    let mut before: Vec<u64> = Vec::new();
    let mut before_durable: Vec<u64> = Vec::new();
    let mut arrivals: Vec<(u64, u64)> = Vec::new();
    for (i, (id, t)) in sent.iter().enumerate() {
        if let Some(at) = shown.get(id).and_then(|v| v.first()) {
            arrivals.push((*t, *at));
            if i < kill_at {
                before.push(at.saturating_sub(*t));
            }
        }
        if let Some(at) = durable.get(id).and_then(|v| v.first())
            && i < kill_at
        {
            before_durable.push(at.saturating_sub(*t));
        }
    }
    before.sort();
    before_durable.sort();
    // Failover gap: the longest time any message waited while nothing was shown,
    // among messages sent after the kill.
    let mut shown_times: Vec<u64> = arrivals.iter().map(|(_, a)| *a).collect();
    shown_times.sort();
    let killed = killed_at.unwrap_or_else(mono_us);
    let gap_us = arrivals
        .iter()
        .filter(|(t, _)| *t >= killed)
        .map(|(t, a)| {
            let prev = shown_times
                .iter()
                .rev()
                .find(|x| **x < *a)
                .copied()
                .unwrap_or(*t);
            a.saturating_sub(prev.max(*t))
        })
        .max()
        .unwrap_or_default();
    Ok((
        json!({ "latency_p50_us": pct(&before, 0.5), "latency_p99_us": pct(&before, 0.99),
                "durable_p50_us": pct(&before_durable, 0.5),
                "durable_p99_us": pct(&before_durable, 0.99),
                "messages": kill_at, "background_puts_per_s": load_per_s,
                "handed_over_directly": handed_over }),
        json!({ "failover_gap_ms": gap_us as f64 / 1e3, "lost": lost, "duplicated": duplicated,
                "messages": messages }),
    ))
}

/// Send → shown through one relay with both stores sealed, and with both in the clear:
/// what encryption at rest costs. The two alternate (clear, sealed, sealed, clear, and
/// again with `rounds` 2), so a drift of the machine's load falls on both; each figure
/// is the mean of its p50s.
pub(crate) async fn at_rest_cost(
    root: &Path,
    messages: usize,
    rounds: usize,
) -> Result<serde_json::Value> {
    let p50 = |v: &serde_json::Value| v["latency_p50_us"].as_f64().unwrap_or(f64::NAN);
    let (mut clear, mut sealed) = (Vec::new(), Vec::new());
    let order = [false, true, true, false];
    for sealing in order.iter().copied().cycle().take(order.len() * rounds) {
        let (latency, _) =
            latency_and_failover(root, 1, messages, 0, false, false, sealing).await?;
        if sealing {
            sealed.push(p50(&latency));
        } else {
            clear.push(p50(&latency));
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (sealed, clear) = (mean(&sealed), mean(&clear));
    Ok(json!({ "sealed_p50_us": sealed, "clear_p50_us": clear,
               "ratio": sealed / clear, "messages": messages }))
}
