//! kkachi-bench: headline performance figures, each beside a baseline measured in the
//! same run on the same machine.
//!
//! Build everything in release mode first (the relays run as separate processes, and so
//! does the receiving client of the latency runs: this binary again, with `--recipient`):
//!
//! ```sh
//! cargo build --release --workspace && target/release/kkachi-bench [--quick] [--json]
//! ```
//!
//! `--only latency,history` (say) runs just those parts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures::StreamExt;
use kkachi_client::engine::{AppEvent, Engine, Mode, SendEvent};
use kkachi_client::net::{NetConfig, Network};
use kkachi_client::store::{Contact, LocalStore, Profile, WriteSet};
use kkachi_protocol::{
    Card, ClientToRelay, Envelope, Identity, MailboxId, PutOutcome, RelayToClient,
};
use kkachi_relay::client::MailboxClient;
use libp2p::identity::Keypair;
use parking_lot::Mutex;
use serde_json::json;

/// Measures kkachi against the limits of this machine.
#[derive(Debug, Parser)]
struct Args {
    /// A short run (under a minute) for smoke testing.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Clients for the reconnect measurement (default 1,000; 50 with --quick).
    #[arg(long)]
    clients: Option<usize>,
    /// Run only these parts (comma-separated); the baselines always run. Figures of
    /// the parts left out are null in the JSON and missing from the table.
    #[arg(long, value_delimiter = ',', value_parser = ["ingest", "latency", "history", "reconnect", "idle"])]
    only: Vec<String>,
    /// Internal: run as the recipient of the latency runs, on this client home.
    #[arg(long, hide = true)]
    recipient: Option<PathBuf>,
    /// Internal: the recipient takes deliveries through its relays only.
    #[arg(long, hide = true)]
    relays_only: bool,
    /// Internal: serve the round-trip baseline's echoes and print the address.
    #[arg(long, hide = true)]
    echo: bool,
}

impl Args {
    fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn pct<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A relay process from the release build.
struct Relay {
    child: Option<Child>,
    addr: String,
    port: u16,
    dir: PathBuf,
}

fn relay_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("exe dir")?.join("kkachi-relay");
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release --workspace` first",
            bin.display()
        );
    }
    Ok(bin)
}

impl Relay {
    fn start(dir: &Path, port: u16) -> Result<Self> {
        let config = dir.join("bench.toml");
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            &config,
            "[limits]\nmailbox_max_envelopes = 100000000\nmailbox_max_bytes = 100000000000\n\
             puts_per_sec = 10000000\nput_burst = 10000000\nputs_per_sec_per_address = 10000000\n\
             put_burst_per_address = 10000000\nmax_connections = 100000\n\
             max_pending_connections = 100000\nmax_waiting_per_peer = 64\n",
        )?;
        let mut child = Command::new(relay_bin()?)
            .args([
                "--listen",
                &format!("/ip4/127.0.0.1/tcp/{port}"),
                "--metrics",
                "off",
                "--config",
            ])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .context("relay did not start")?;
        let addr = line
            .strip_prefix("listening on ")
            .context("listening line")?
            .to_string();
        Ok(Self {
            child: Some(child),
            addr,
            port,
            dir: dir.to_path_buf(),
        })
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) -> Result<()> {
        self.kill9();
        let mut fresh = Relay::start(&self.dir, self.port)?;
        self.child = fresh.child.take();
        Ok(())
    }

    fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().map(|c| c.id()).unwrap_or(0);
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn envelope(to: &MailboxId, n: u64, size: usize) -> Envelope {
    let mut payload = vec![0u8; size];
    payload[..8].copy_from_slice(&n.to_be_bytes());
    Envelope {
        mailbox: *to,
        expires_at: now_s() + 3600,
        payload,
    }
}

/// Durable 512-byte puts from many senders to one relay.
async fn ingest(
    root: &Path,
    senders: usize,
    in_flight: usize,
    batch: usize,
    duration: Duration,
) -> Result<serde_json::Value> {
    let relay = Relay::start(&root.join(format!("ingest-{batch}")), free_port())?;
    let mut clients = Vec::new();
    for _ in 0..senders {
        clients
            .push(MailboxClient::connect(Keypair::generate_ed25519(), relay.addr.parse()?).await?);
    }
    let to = MailboxId::for_peer(&libp2p::PeerId::random());
    let acks: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let stored = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        for f in 0..in_flight {
            let client = client.clone();
            let acks = acks.clone();
            let stored = stored.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = ((c * 1000 + f) as u64) << 32;
                while Instant::now() < deadline {
                    let envs: Vec<Envelope> = (0..batch)
                        .map(|i| envelope(&to, n + i as u64, 512))
                        .collect();
                    n += batch as u64;
                    let t = Instant::now();
                    if let Ok(RelayToClient::Stored { outcomes }) = client.put(envs).await {
                        let ok = outcomes
                            .iter()
                            .filter(|o| matches!(o, PutOutcome::Stored))
                            .count();
                        stored.fetch_add(ok as u64, std::sync::atomic::Ordering::Relaxed);
                        acks.lock().push(t.elapsed());
                    }
                }
            }));
        }
    }
    let started = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed();
    let mut acks = acks.lock().clone();
    acks.sort();
    let total = stored.load(std::sync::atomic::Ordering::Relaxed);
    Ok(json!({
        "batch": batch,
        "senders": senders * in_flight,
        "msgs_per_s": total as f64 / elapsed.as_secs_f64(),
        "ack_p50_us": us(pct(&acks, 0.5)),
        "ack_p99_us": us(pct(&acks, 0.99)),
    }))
}

struct User {
    engine: Engine<Network>,
    card: Card,
    _dir: tempfile::TempDir,
}

fn net_config(direct: bool) -> Result<NetConfig> {
    Ok(NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        mdns: false,
        direct,
    })
}

/// A client online at `relays`; with `direct`, it also connects to contacts directly.
fn user(name: &str, relays: &[String], direct: bool) -> Result<User> {
    let dir = tempfile::tempdir()?;
    let addrs: Vec<kkachi_protocol::Multiaddr> =
        relays.iter().map(|r| r.parse()).collect::<Result<_, _>>()?;
    let (store, me, card) = LocalStore::provision(dir.path(), name, &addrs)?;
    let engine = kkachi_client::runtime::start_engine(store, me, net_config(direct)?, Mode::ONLINE)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(User {
        engine,
        card,
        _dir: dir,
    })
}

/// Microseconds on the machine's monotonic clock, which every process reads alike: the
/// sender here and the recipient in its own process time one message with it.
fn mono_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}

/// The recipient of the latency runs, in its own process as it would be on its own
/// device (clients in one process would share sled's process-wide write lock and one
/// runtime). Prints `ready`, then `shown <id> <µs>` when a message is in the store (what
/// the terminal UI shows) and `durable <id> <µs>` once it is on disk, until its
/// standard input closes.
async fn recipient(home: PathBuf, direct: bool) -> Result<()> {
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
    engine.shutdown().await;
    printer.abort();
    Ok(())
}

/// What the recipient process reported: µs timestamps by message id.
#[derive(Default)]
struct Seen {
    shown: HashMap<[u8; 16], Vec<u64>>,
    durable: HashMap<[u8; 16], Vec<u64>>,
}

/// Starts the recipient process on `home` and collects what it reports.
async fn spawn_recipient(
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
/// through the relays.
async fn latency_and_failover(
    root: &Path,
    relay_count: usize,
    messages: usize,
    load_per_s: u64,
    kill: bool,
    direct: bool,
) -> Result<(serde_json::Value, serde_json::Value)> {
    let mut relays: Vec<Relay> = (0..relay_count)
        .map(|i| {
            let dir = root.join(format!("lat{relay_count}-{direct}-{i}"));
            Relay::start(&dir, free_port())
        })
        .collect::<Result<_>>()?;
    let addrs: Vec<String> = relays.iter().map(|r| r.addr.clone()).collect();
    let alice = user("alice", &addrs, direct)?;
    // Bob's home is made here, then handed to his own process.
    let bob_home = tempfile::tempdir()?;
    let bob_at_alice = {
        let relays: Vec<kkachi_protocol::Multiaddr> =
            addrs.iter().map(|r| r.parse()).collect::<Result<_, _>>()?;
        let (store, _, card) = LocalStore::provision(bob_home.path(), "bob", &relays)?;
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
    let load = tokio::spawn(async move {
        if load_per_s == 0 {
            return;
        }
        let to = MailboxId::for_peer(&libp2p::PeerId::random());
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let per_tick = (load_per_s / 100).max(1);
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = load_stopped.changed() => break,
                _ = tick.tick() => {
                    let envs: Vec<Envelope> = (0..per_tick).map(|i| envelope(&to, n + i, 512)).collect();
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
                "messages": kill_at, "background_puts_per_s": load_per_s }),
        json!({ "failover_gap_ms": gap_us as f64 / 1e3, "lost": lost, "duplicated": duplicated,
                "messages": messages }),
    ))
}

/// `kkachi history` on a conversation of `n` messages: the whole history, and the last
/// 50, each the median of three runs of the real binary.
fn history_bench(root: &Path, n: usize) -> Result<serde_json::Value> {
    use kkachi_client::store::{Direction, MessageRecord, MessageState, message_key};
    let home = root.join("history");
    let store = LocalStore::open(&home)?;
    let me = Identity::generate();
    store.init_identity(
        &me,
        &Profile {
            name: "me".into(),
            card_version: 1,
        },
    )?;
    let other = Identity::generate();
    let card = Card::new(&other, "Minji", vec![], 1)?;
    let peer = card.identity().peer_id();
    let mut w = WriteSet::default();
    LocalStore::write_contact(
        &mut w,
        &Contact {
            peer,
            name: "Minji".into(),
            card,
        },
    );
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
    drop(store);
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
    let time = |args: &[&str]| -> Result<(Duration, usize)> {
        let mut runs = Vec::new();
        let mut lines = 0;
        for _ in 0..3 {
            let t = Instant::now();
            let out = Command::new(&bin)
                .arg("--home")
                .arg(&home)
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

/// Clients reconnecting after a relay restart, and new connections per second.
async fn reconnect_and_handshakes(root: &Path, clients: usize) -> Result<serde_json::Value> {
    let mut relay = Relay::start(&root.join("reconnect"), free_port())?;
    let mut connected = Vec::new();
    let started = Instant::now();
    let dials = futures::stream::iter(0..clients)
        .map(|_| {
            let addr = relay.addr.clone();
            async move {
                MailboxClient::connect(Keypair::generate_ed25519(), addr.parse().unwrap()).await
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let dial_time = started.elapsed();
    for d in dials {
        connected.push(d?);
    }
    let handshakes_per_s = clients as f64 / dial_time.as_secs_f64();
    let idle_rss = relay.rss_kib();
    relay.restart()?;
    let t = Instant::now();
    let back = futures::stream::iter(connected.iter().cloned())
        .map(|c| async move {
            // Each client retries until the relay answers again (libp2p redials).
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(RelayToClient::Info(_)) = c.request(ClientToRelay::Info).await {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        })
        .buffer_unordered(clients.max(1))
        .collect::<Vec<bool>>()
        .await;
    let reconnect = t.elapsed();
    let ok = back.iter().filter(|b| **b).count();
    Ok(
        json!({ "clients": clients, "reconnected": ok, "reconnect_s": reconnect.as_secs_f64(),
               "handshakes_per_s": handshakes_per_s, "relay_rss_kib_with_clients": idle_rss }),
    )
}

/// Relay memory per idle connection, as the messenger keeps one: a session open and a
/// long poll waiting on it. RSS with N such connections minus RSS with none.
async fn idle_memory(root: &Path, connections: usize) -> Result<serde_json::Value> {
    let (kib, n) = idle_rss_per_connection(&root.join("idle"), connections).await?;
    Ok(json!({ "connections": n, "idle_conn_kib": kib }))
}

async fn idle_rss_per_connection(dir: &Path, connections: usize) -> Result<(f64, usize)> {
    let relay = Relay::start(dir, free_port())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = relay.rss_kib();
    let clients: Vec<MailboxClient> = futures::stream::iter(0..connections)
        .map(|_| {
            let addr = relay.addr.clone();
            async move {
                MailboxClient::connect(Keypair::generate_ed25519(), addr.parse().unwrap()).await
            }
        })
        .buffer_unordered(64)
        .filter_map(|r| async move { r.ok() })
        .collect()
        .await;
    let polls: Vec<_> = clients
        .iter()
        .map(|c| {
            let c = c.clone();
            tokio::spawn(async move {
                loop {
                    if c.subscribe(0, kkachi_protocol::wire::MAX_WAIT_MS)
                        .await
                        .is_err()
                    {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = relay.rss_kib();
    for p in polls {
        p.abort();
    }
    let per = (loaded.saturating_sub(base)) as f64 / clients.len().max(1) as f64;
    Ok((per, clients.len()))
}

/// Baseline: a plain libp2p request/response round trip (16 bytes each way, a stream
/// per request) between this process and another on loopback.
async fn libp2p_rtt(rounds: usize) -> Result<Duration> {
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
fn sled_baseline(n: usize) -> Result<(f64, f64)> {
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

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    // On the runtime's workers, where the client's own tasks run (the thread blocked on
    // `main` is not one of them, and each wake-up from it is a thread hand-off).
    tokio::spawn(run(Args::parse())).await?
}

async fn run(args: Args) -> Result<()> {
    if let Some(home) = args.recipient {
        return recipient(home, !args.relays_only).await;
    }
    if args.echo {
        return kkachi_tests::echo::serve(|addr| println!("listening on {addr}")).await;
    }
    let root = tempfile::tempdir()?;
    let q = args.quick;
    eprintln!(
        "kkachi-bench ({}) on {} cores",
        if q { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let (sled_flush, sled_noflush) = sled_baseline(if q { 500 } else { 3000 })?;
    let rtt = libp2p_rtt(if q { 200 } else { 2000 }).await?;
    eprintln!("baselines done");
    let duration = Duration::from_secs(if q { 3 } else { 15 });
    let null = serde_json::Value::Null;
    let (single, moderate, batched, bounded) = if args.runs("ingest") {
        let single = ingest(root.path(), 8, 16, 1, duration).await?;
        // The same puts at a moderate load (8 senders, one request each in flight): the
        // acknowledgement time a client sees when the relay is not saturated.
        let moderate = ingest(root.path(), 8, 1, 1, duration).await?;
        let batched = ingest(root.path(), 8, 8, 16, duration).await?;
        // Batches with fewer in flight (6 × 16 envelopes): the rate that comes with a
        // short acknowledgement (at saturation the acknowledgement is mostly queueing).
        let bounded = ingest(root.path(), 6, 1, 16, duration).await?;
        eprintln!("ingest done");
        (single, moderate, batched, bounded)
    } else {
        (null.clone(), null.clone(), null.clone(), null.clone())
    };
    let (latency, failover, latency_one, latency_direct) = if args.runs("latency") {
        let load = if q { 500 } else { 2000 };
        let (latency, failover) =
            latency_and_failover(root.path(), 3, if q { 60 } else { 400 }, load, true, false)
                .await?;
        let (latency_one, _) =
            latency_and_failover(root.path(), 1, if q { 30 } else { 200 }, 0, false, false).await?;
        let (latency_direct, _) =
            latency_and_failover(root.path(), 3, if q { 30 } else { 200 }, load, false, true)
                .await?;
        eprintln!("latency and failover done");
        (latency, failover, latency_one, latency_direct)
    } else {
        (null.clone(), null.clone(), null.clone(), null.clone())
    };
    let history = if args.runs("history") {
        history_bench(root.path(), if q { 20_000 } else { 100_000 })?
    } else {
        null.clone()
    };
    let reconnect = if args.runs("reconnect") {
        let clients = args.clients.unwrap_or(if q { 50 } else { 1000 });
        let r = reconnect_and_handshakes(root.path(), clients).await?;
        eprintln!("reconnect done");
        r
    } else {
        null.clone()
    };
    let idle = if args.runs("idle") {
        idle_memory(root.path(), if q { 100 } else { 1000 }).await?
    } else {
        null
    };

    let ingest_rate = match (
        batched["msgs_per_s"].as_f64(),
        single["msgs_per_s"].as_f64(),
    ) {
        (Some(a), Some(b)) => json!(a.max(b)),
        _ => serde_json::Value::Null,
    };
    let report = json!({
        "mode": if q { "quick" } else { "full" },
        "ingest_msgs_per_s": ingest_rate,
        "ingest_single": single,
        "ingest_moderate": moderate,
        "put_ack_moderate_p50_us": moderate["ack_p50_us"],
        "put_ack_moderate_p99_us": moderate["ack_p99_us"],
        "ingest_batched": batched,
        "ingest_bounded": bounded,
        "put_ack_bounded_p50_us": bounded["ack_p50_us"],
        "put_ack_bounded_p99_us": bounded["ack_p99_us"],
        "put_ack_p50_us": single["ack_p50_us"],
        "put_ack_p99_us": single["ack_p99_us"],
        "latency_p50_us": latency["latency_p50_us"],
        "latency_p99_us": latency["latency_p99_us"],
        "latency": latency,
        "latency_one_relay_idle_p50_us": latency_one["latency_p50_us"],
        "latency_one_relay_idle_p99_us": latency_one["latency_p99_us"],
        "latency_direct_p50_us": latency_direct["latency_p50_us"],
        "latency_direct_p99_us": latency_direct["latency_p99_us"],
        "latency_direct": latency_direct,
        "history": history,
        "history_ms": history["history_all_ms"],
        "failover_gap_ms": failover["failover_gap_ms"],
        "lost": failover["lost"],
        "duplicated": failover["duplicated"],
        "reconnect": reconnect,
        "handshakes_per_s": reconnect["handshakes_per_s"],
        "idle_conn_kib": idle["idle_conn_kib"],
        "idle": idle,
        "baseline_libp2p_rtt_us": us(rtt),
        "baseline_sled_insert_flush_per_s": sled_flush,
        "baseline_sled_insert_per_s": sled_noflush,
    });
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "{:<44} {:>14}  as a ratio to this machine's limits",
        "figure", "value"
    );
    if args.runs("ingest") {
        println!(
            "{:<44} {:>14.0}  {:.1}x sled insert+flush per item ({:.0}/s)",
            "ingest, durable 512 B puts/s (best)",
            f(&ingest_rate),
            f(&ingest_rate) / sled_flush,
            sled_flush
        );
        println!(
            "{:<44} {:>14.0}  batch 1, {} in flight",
            "  single-envelope puts/s",
            f(&single["msgs_per_s"]),
            single["senders"]
        );
        println!(
            "{:<44} {:>14.0}  batch 16, {} in flight",
            "  batched puts/s",
            f(&batched["msgs_per_s"]),
            batched["senders"]
        );
        println!(
            "{:<44} {:>14.0}  batch 16, {} in flight: ack p50 {:.0} µs, p99 {:.0} µs",
            "  batched puts/s, fewer in flight",
            f(&bounded["msgs_per_s"]),
            bounded["senders"],
            f(&bounded["ack_p50_us"]),
            f(&bounded["ack_p99_us"])
        );
        println!(
            "{:<44} {:>14.0}  {:.1}x libp2p round trip",
            "put ack p50 (µs)",
            f(&single["ack_p50_us"]),
            f(&single["ack_p50_us"]) / us(rtt)
        );
        println!(
            "{:<44} {:>14.0}  at saturation (128 in flight)",
            "put ack p99 (µs)",
            f(&single["ack_p99_us"])
        );
        println!(
            "{:<44} {:>14.0}  p99 {:.0} µs; {:.0} puts/s, {} senders, 1 in flight each",
            "put ack p50 at moderate load (µs)",
            f(&moderate["ack_p50_us"]),
            f(&moderate["ack_p99_us"]),
            f(&moderate["msgs_per_s"]),
            moderate["senders"]
        );
    }
    if args.runs("latency") {
        println!(
            "{:<44} {:>14.0}  {:.1}x libp2p round trip",
            "send→shown p50 via 3 relays only (µs)",
            f(&latency["latency_p50_us"]),
            f(&latency["latency_p50_us"]) / us(rtt)
        );
        println!(
            "{:<44} {:>14.0}",
            "send→shown p99 (µs)",
            f(&latency["latency_p99_us"])
        );
        println!(
            "{:<44} {:>14.0}  p99 {:.0} µs (what `kkachi daemon` prints)",
            "send→durable at the recipient p50 (µs)",
            f(&latency["durable_p50_us"]),
            f(&latency["durable_p99_us"])
        );
        println!(
            "{:<44} {:>14.0}  p99 {:.0} µs",
            "send→shown p50, 1 relay, no other load (µs)",
            f(&latency_one["latency_p50_us"]),
            f(&latency_one["latency_p99_us"])
        );
        println!(
            "{:<44} {:>14.0}  p99 {:.0} µs; 3 relays as well, same load",
            "send→shown p50, connected directly (µs)",
            f(&latency_direct["latency_p50_us"]),
            f(&latency_direct["latency_p99_us"])
        );
    }
    if args.runs("history") {
        println!(
            "{:<44} {:>14.0}  {} lines; --last 50: {:.0} ms",
            "`kkachi history` of a long conversation (ms)",
            f(&history["history_all_ms"]),
            history["lines"],
            f(&history["history_last50_ms"])
        );
    }
    if args.runs("latency") {
        println!(
            "{:<44} {:>14.1}  lost {}, duplicated {}",
            "failover gap, 1 of 3 relays kill -9 (ms)",
            f(&failover["failover_gap_ms"]),
            failover["lost"],
            failover["duplicated"]
        );
    }
    if args.runs("reconnect") {
        println!(
            "{:<44} {:>14.2}  {} of {} clients",
            "reconnect after relay restart (s)",
            f(&reconnect["reconnect_s"]),
            reconnect["reconnected"],
            reconnect["clients"]
        );
        println!(
            "{:<44} {:>14.0}",
            "new connections (Noise handshakes)/s",
            f(&reconnect["handshakes_per_s"])
        );
    }
    if args.runs("idle") {
        println!(
            "{:<44} {:>14.1}  at {} connections, each with a session and a long poll waiting",
            "relay memory per idle connection (KiB)",
            f(&idle["idle_conn_kib"]),
            idle["connections"],
        );
    }
    println!(
        "{:<44} {:>14.0}",
        "baseline: libp2p request/response RTT (µs)",
        us(rtt)
    );
    println!(
        "{:<44} {:>14.0}",
        "baseline: sled insert+flush per item (/s)", sled_flush
    );
    println!(
        "{:<44} {:>14.0}",
        "baseline: sled insert without flush (/s)", sled_noflush
    );
    if args.json {
        println!("{report}");
    }
    Ok(())
}
