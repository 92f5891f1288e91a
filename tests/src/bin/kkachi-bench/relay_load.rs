//! A relay with many clients: reconnecting after a restart, new connections per
//! second, and memory per idle connection.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use kkachi_protocol::{ClientToRelay, RelayToClient};
use kkachi_relay::client::MailboxClient;
use libp2p::identity::Keypair;
use serde_json::json;

use crate::common::{Relay, free_port};

/// Clients reconnecting after a relay restart, and new connections per second.
pub(crate) async fn reconnect_and_handshakes(
    root: &Path,
    clients: usize,
) -> Result<serde_json::Value> {
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
pub(crate) async fn idle_memory(root: &Path, connections: usize) -> Result<serde_json::Value> {
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
            let key = kkachi_protocol::ReadKey(rand::random());
            tokio::spawn(async move {
                loop {
                    if c.subscribe(&key, 0, kkachi_protocol::wire::MAX_WAIT_MS)
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
