//! Crash safety: kill -9 a relay process while writers put, restart it on the same data
//! directory, and check that every envelope it acknowledged is still there. Repeated
//! many times (more with KKACHI_SOAK=1).

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kkachi_protocol::wire::{Addressed, PutOutcome};
use kkachi_protocol::{
    Envelope, EnvelopeId, Multiaddr, QueueKind, ReadKey, RelayToClient, WriteKey,
};
use kkachi_relay::client::MailboxClient;
use libp2p::identity::Keypair;
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

struct RelayProcess {
    child: Child,
    addr: Multiaddr,
}

async fn spawn_relay(dir: &std::path::Path) -> RelayProcess {
    // Limits high enough that only the kill interrupts the writers.
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        "[limits]\nqueue_max_envelopes = 10000000\nqueue_max_bytes = 10000000000\n\
         capability_max_envelopes = 10000000\ncapability_max_bytes = 10000000000\n\
         puts_per_sec = 1000000\nput_burst = 1000000\n\
         puts_per_sec_per_address = 1000000\nput_burst_per_address = 1000000\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kkachi-relay"))
        .args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--metrics",
            "off",
            "--config",
        ])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("relay binary runs");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("relay printed its address in time")
        .unwrap()
        .expect("a listening line");
    let addr = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    RelayProcess { child, addr }
}

fn iterations() -> usize {
    if std::env::var_os("KKACHI_SOAK").is_some() {
        60
    } else {
        6
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_envelopes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (key, write) = (ReadKey(rand::random()), WriteKey(rand::random()));
    let expires_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let acknowledged: Arc<Mutex<HashSet<EnvelopeId>>> = Arc::default();
    let mut total_acked_before_kill = Vec::new();
    let mut seq = 0u64;
    for iteration in 0..iterations() {
        let relay = spawn_relay(dir.path()).await;
        let writer = MailboxClient::connect(Keypair::generate_ed25519(), relay.addr.clone())
            .await
            .unwrap();
        let granted = writer
            .grant(&key, QueueKind::Inbox, vec![write.id()])
            .await
            .unwrap();
        assert!(matches!(granted, RelayToClient::Granted { grants: 1 }));
        // Four writers put batches of up to 4 envelopes as fast as they are acknowledged.
        let mut writers = Vec::new();
        for w in 0..4u64 {
            let writer = writer.clone();
            let acknowledged = acknowledged.clone();
            let base = seq + w * 1_000_000;
            writers.push(tokio::spawn(async move {
                for i in 0.. {
                    let batch: Vec<Addressed> = (0..1 + (i % 4))
                        .map(|k| Addressed {
                            write,
                            envelope: Envelope {
                                expires_at,
                                payload: format!("{base}-{i}-{k}").into_bytes(),
                            },
                        })
                        .collect();
                    let outcomes = match writer.put(batch.clone()).await {
                        Ok(RelayToClient::Stored { outcomes, .. }) => outcomes,
                        Ok(other) => panic!("unexpected answer {other:?}"),
                        Err(_) => break, // the relay died
                    };
                    let mut acked = acknowledged.lock();
                    for (e, o) in batch.iter().zip(outcomes) {
                        if matches!(o, PutOutcome::Stored | PutOutcome::Duplicate) {
                            acked.insert(e.envelope.id());
                        }
                    }
                }
            }));
        }
        seq += 10_000_000;
        // Kill at a moment that varies with the iteration: 150..=850 ms in.
        let delay = 150 + (iteration as u64 * 137) % 700;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let mut relay = relay;
        relay.child.start_kill().unwrap(); // SIGKILL
        relay.child.wait().await.unwrap();
        for w in writers {
            let _ = w.await;
        }
        let acked_now = acknowledged.lock().len();
        total_acked_before_kill.push(acked_now);

        // Restart on the same directory and read everything back as the owner.
        let mut restarted = spawn_relay(dir.path()).await;
        let reader = MailboxClient::connect(Keypair::generate_ed25519(), restarted.addr.clone())
            .await
            .unwrap();
        let mut present = HashSet::new();
        let mut after = 0;
        loop {
            let RelayToClient::Batch { items, next, more } =
                reader.fetch(&key, after, 256).await.unwrap()
            else {
                panic!("batch expected");
            };
            present.extend(items.iter().map(|i| i.envelope.id()));
            after = next;
            if !more {
                break;
            }
        }
        let missing: Vec<_> = acknowledged
            .lock()
            .iter()
            .filter(|id| !present.contains(id))
            .copied()
            .collect();
        assert!(
            missing.is_empty(),
            "iteration {iteration}: {} acknowledged envelopes lost after kill -9 (of {acked_now})",
            missing.len()
        );
        restarted.child.start_kill().unwrap();
        restarted.child.wait().await.unwrap();
    }
    let total = *total_acked_before_kill.last().unwrap();
    println!(
        "crash test: {} kill -9 iterations, {total} acknowledged envelopes, 0 lost",
        iterations()
    );
    assert!(
        total > 100,
        "the writers must actually have written ({total})"
    );
}
