//! Durable puts into one relay: how many per second, and how long each waits for its
//! acknowledgement.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use kkachi_protocol::wire::Addressed;
use kkachi_protocol::{PutOutcome, RelayToClient};
use kkachi_relay::client::MailboxClient;
use libp2p::identity::Keypair;
use parking_lot::Mutex;
use serde_json::json;

use crate::common::{Relay, envelope, free_port, open_queue, pct, us};

/// Durable 512-byte puts from many senders to one relay.
pub(crate) async fn ingest(
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
    let to = open_queue(&clients[0]).await?;
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
                    let envs: Vec<Addressed> = (0..batch)
                        .map(|i| envelope(&to, n + i as u64, 512))
                        .collect();
                    n += batch as u64;
                    let t = Instant::now();
                    if let Ok(RelayToClient::Stored { outcomes, .. }) = client.put(envs).await {
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
