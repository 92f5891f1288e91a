//! A relay holding many envelopes, killed and started again: how soon it serves.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kkachi_protocol::wire::Addressed;
use kkachi_protocol::{PutOutcome, QueueKind, ReadKey, RelayToClient, WriteKey};
use kkachi_relay::client::MailboxClient;
use libp2p::identity::Keypair;
use serde_json::json;

use crate::common::{Relay, envelope, free_port};

/// The size of the smallest sealed packet (its size class): most envelopes are this.
const ENVELOPE_BYTES: usize = 2048;
/// Queues the envelopes are spread over.
const QUEUES: usize = 1000;

/// Fills a relay with `envelopes` envelopes over [`QUEUES`] queues, kills it (as a crash
/// would), and times how long after being started again it answers a fetch and a put
/// into a full queue; twice (the first start after the writes also replays sled's log),
/// beside the same for a relay holding nothing.
pub(crate) async fn restart(root: &Path, envelopes: u64) -> Result<serde_json::Value> {
    let empty = {
        let dir = root.join("restart-empty");
        let mut relay = Relay::start(&dir, free_port())?;
        let probe = Probe::open(&relay).await?;
        relay.kill9();
        probe.ready_after_start(&mut relay).await?
    };
    let dir = root.join("restart-full");
    let mut relay = Relay::start(&dir, free_port())?;
    let probe = Probe::open(&relay).await?;
    let filled = Instant::now();
    fill(&relay, &probe, envelopes).await?;
    let fill_s = filled.elapsed().as_secs_f64();
    eprintln!(
        "restart: {envelopes} envelopes stored in {fill_s:.0} s ({} MiB on disk)",
        dir_bytes(&dir) >> 20
    );
    relay.kill9();
    let first = probe.ready_after_start(&mut relay).await?;
    relay.kill9();
    let again = probe.ready_after_start(&mut relay).await?;
    Ok(json!({
        "envelopes": envelopes,
        "envelope_bytes": ENVELOPE_BYTES,
        "queues": QUEUES,
        "ready_s": first.as_secs_f64(),
        "ready_again_s": again.as_secs_f64(),
        "ready_empty_s": empty.as_secs_f64(),
        "fill_s": fill_s,
    }))
}

/// One queue the probe reads and writes.
struct Probe {
    client_key: Keypair,
    read: ReadKey,
    write: WriteKey,
}

impl Probe {
    async fn open(relay: &Relay) -> Result<Self> {
        let client_key = Keypair::generate_ed25519();
        let client = MailboxClient::connect(client_key.clone(), relay.addr.parse()?).await?;
        let read = ReadKey(rand::random());
        let write = WriteKey(rand::random());
        match client
            .grant(&read, QueueKind::Inbox, vec![write.id()])
            .await?
        {
            RelayToClient::Granted { .. } => Ok(Self {
                client_key,
                read,
                write,
            }),
            other => bail!("the relay did not open a queue: {other:?}"),
        }
    }

    /// Starts `relay` again and times until it has answered a put into the probe's
    /// queue (which indexes that queue) and a fetch of its first page.
    async fn ready_after_start(&self, relay: &mut Relay) -> Result<Duration> {
        let started = Instant::now();
        relay.restart()?;
        let deadline = started + Duration::from_secs(120);
        let client = loop {
            match MailboxClient::connect(self.client_key.clone(), relay.addr.parse()?).await {
                Ok(client) => break client,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(e).context("the relay did not come back"),
            }
        };
        let put = client
            .put(vec![envelope(&self.write, rand::random(), ENVELOPE_BYTES)])
            .await?;
        match put {
            RelayToClient::Stored { outcomes, .. }
                if matches!(outcomes.as_slice(), [PutOutcome::Stored]) => {}
            other => bail!("the put after the restart failed: {other:?}"),
        }
        match client.fetch(&self.read, 0, 32).await? {
            RelayToClient::Batch { items, .. } if !items.is_empty() => {}
            other => bail!("the fetch after the restart failed: {other:?}"),
        }
        Ok(started.elapsed())
    }
}

/// Puts `total` envelopes: one queue in [`QUEUES`] is the probe's, the others are new.
async fn fill(relay: &Relay, probe: &Probe, total: u64) -> Result<()> {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients
            .push(MailboxClient::connect(Keypair::generate_ed25519(), relay.addr.parse()?).await?);
    }
    let mut writes = vec![probe.write];
    while writes.len() < QUEUES {
        writes.push(crate::common::open_queue(&clients[writes.len() % 4]).await?);
    }
    let writes = Arc::new(writes);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        for _ in 0..8 {
            let (client, writes, next) = (client.clone(), writes.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let first = next.fetch_add(32, Ordering::Relaxed);
                    if first >= total {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let batch: Vec<Addressed> = (first..(first + 32).min(total))
                        .map(|n| {
                            let to = &writes[(n / 32) as usize % writes.len()];
                            envelope(to, n | (c as u64) << 56, ENVELOPE_BYTES)
                        })
                        .collect();
                    match client.put(batch).await? {
                        RelayToClient::Stored { outcomes, .. }
                            if outcomes.iter().all(|o| matches!(o, PutOutcome::Stored)) => {}
                        other => bail!("a put while filling failed: {other:?}"),
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
