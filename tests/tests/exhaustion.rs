//! One host against a relay: it opens connections under fresh identities, fills storage
//! through queues of its own, and streams frames announced as large and never finished,
//! while an honest client on another address puts and reads throughout. The caps must
//! hold, every refusal must carry its code, and the honest client must be served. The
//! attacker connects over 127.0.0.1 and the honest client over ::1, two addresses to
//! the relay; without IPv6 on loopback the scenario is skipped, saying so.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::prelude::*;
use kkachi_protocol::wire::{self, Addressed, PutOutcome};
use kkachi_protocol::{
    ClientToRelay, Envelope, ErrorCode, Multiaddr, QueueKind, ReadKey, RelayToClient, WriteKey,
};
use kkachi_relay::client::MailboxClient;
use kkachi_relay::session::SESSION_PROTOCOL;
use kkachi_tests::procs::bin;
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux};
use parking_lot::Mutex;

const CONNECTIONS_PER_ADDRESS: usize = 24;
/// What a thread's stack reserves (tokio's default, and its guard page), in KiB.
const THREAD_STACK_KIB: u64 = 2 * 1024 + 4;

struct Relay {
    child: Child,
    v4: Multiaddr,
    v6: Multiaddr,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    /// A line of the process's status, in KiB.
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// Memory reserved, touched or not: what an announced length alone would cost;
    /// less the stacks of the process's threads (new ones come and go with its work).
    fn virtual_kib(&self) -> u64 {
        let threads = self.status_kib("Threads:");
        self.status_kib("VmSize:")
            .saturating_sub(threads * THREAD_STACK_KIB)
    }
}

fn ipv6_loopback() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

fn start_relay(dir: &std::path::Path) -> Relay {
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[limits]\nmax_connections_per_address = {CONNECTIONS_PER_ADDRESS}\n\
             max_bytes = 8388608\nput_bytes_per_hour_per_address = 4194304\n\
             put_bytes_burst_per_address = 3145728\nqueues_per_hour_per_address = 20\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(bin("kkachi-relay"))
        .args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--listen",
            "/ip6/::1/tcp/0",
            "--metrics",
            "off",
            "--config",
        ])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("RUST_LOG", "warn")
        // One malloc arena: a thread's first allocation would otherwise reserve 64 MiB
        // of address space, drowning what the frames below reserve.
        .env("MALLOC_ARENA_MAX", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("relay starts");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addr = || -> Multiaddr {
        let line = lines.next().expect("a listening line").unwrap();
        line.strip_prefix("listening on ")
            .expect("listening line")
            .parse()
            .unwrap()
    };
    let (a, b) = (addr(), addr());
    let (v4, v6) = if a.to_string().starts_with("/ip4") {
        (a, b)
    } else {
        (b, a)
    };
    Relay { child, v4, v6 }
}

fn envelope(n: u64, size: usize) -> Envelope {
    Envelope {
        expires_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600,
        payload: [n.to_be_bytes().as_slice(), &vec![0xAB; size]].concat(),
    }
}

/// Tallies refusals by code.
#[derive(Default)]
struct Codes(Mutex<Vec<(ErrorCode, usize)>>);

impl Codes {
    fn note(&self, code: ErrorCode) {
        let mut v = self.0.lock();
        match v.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => v.push((code, 1)),
        }
    }

    fn count(&self, code: ErrorCode) -> usize {
        self.0
            .lock()
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(0, |(_, n)| *n)
    }
}

/// A raw connection to the relay with one session stream, for frames no client sends.
async fn raw_stream(addr: &Multiaddr) -> Option<libp2p::Stream> {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .ok()?
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .ok()?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    let relay = match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(p)) => p,
        _ => return None,
    };
    let mut control = swarm.behaviour().new_control();
    swarm.dial(addr.clone()).ok()?;
    let connected = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { .. } => return true,
                SwarmEvent::OutgoingConnectionError { .. } => return false,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    if !connected {
        return None;
    }
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    control.open_stream(relay, SESSION_PROTOCOL).await.ok()
}

#[test]
fn one_host_cannot_exhaust_a_relay_and_an_honest_client_is_served_throughout() {
    if !ipv6_loopback() {
        println!(
            "SKIPPED one_host_cannot_exhaust_a_relay…: no IPv6 on loopback, so the attacker and the honest client cannot come from two addresses"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let base_rss = relay.rss_kib();

    // The honest client, over ::1: a queue of its own, a put and a read every 50 ms.
    let honest = rt
        .block_on(MailboxClient::connect(
            Keypair::generate_ed25519(),
            relay.v6.clone(),
        ))
        .expect("honest client connects");
    let key = ReadKey(rand::random());
    let write = WriteKey(rand::random());
    assert!(matches!(
        rt.block_on(honest.grant(&key, QueueKind::Inbox, vec![write.id()])),
        Ok(RelayToClient::Granted { grants: 1 })
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let honest_task = {
        let (stop, served, failures, slowest) = (
            stop.clone(),
            served.clone(),
            failures.clone(),
            slowest.clone(),
        );
        rt.spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let at = Instant::now();
                let item = Addressed {
                    write,
                    envelope: envelope(n, 200),
                };
                let put = honest.put(vec![item]).await;
                let read = honest.fetch(&key, 0, 1).await;
                let ok = matches!(&put, Ok(RelayToClient::Stored { outcomes, .. }) if outcomes == &[PutOutcome::Stored])
                    && matches!(&read, Ok(RelayToClient::Batch { .. }));
                if ok {
                    served.fetch_add(1, Ordering::Relaxed);
                    let took = at.elapsed();
                    let mut s = slowest.lock();
                    *s = (*s).max(took);
                } else {
                    failures.lock().push(format!("{put:?} / {read:?}"));
                }
                // Keeps its own queue from filling: what it read is deleted.
                if let Ok(RelayToClient::Batch { items, .. }) = honest.fetch(&key, 0, 256).await {
                    let ids = items.iter().map(|i| i.envelope.id()).collect();
                    let _ = honest
                        .request(ClientToRelay::Delete {
                            key: key.clone(),
                            ids,
                        })
                        .await;
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // 1. Connections: 100 fresh identities from 127.0.0.1.
    let attempts = 100;
    let connections: Vec<MailboxClient> = rt.block_on(
        futures::stream::iter(0..attempts)
            .map(|_| {
                let addr = relay.v4.clone();
                async move {
                    let c = MailboxClient::connect(Keypair::generate_ed25519(), addr).await;
                    match c {
                        Ok(c) => c.request(ClientToRelay::Info).await.ok().map(|_| c),
                        Err(_) => None,
                    }
                }
            })
            .buffer_unordered(16)
            .filter_map(|c| async move { c })
            .collect(),
    );
    let connected = connections.len();

    // 2. Storage: queues of its own, filled with 60 KB envelopes until refused.
    let codes = Codes::default();
    let mut stored_bytes = 0usize;
    rt.block_on(async {
        let Some(attacker) = connections.first() else {
            return;
        };
        'fill: for q in 0..40u64 {
            let key = ReadKey(rand::random());
            let write = WriteKey(rand::random());
            match attacker
                .grant(&key, QueueKind::Inbox, vec![write.id()])
                .await
            {
                Ok(RelayToClient::Granted { .. }) => {}
                Ok(RelayToClient::Error { code, .. }) => {
                    codes.note(code);
                    continue;
                }
                other => panic!("unexpected answer {other:?}"),
            }
            for i in 0..40u64 {
                let item = Addressed {
                    write,
                    envelope: envelope(q * 1000 + i, 60_000),
                };
                match attacker.put(vec![item]).await {
                    Ok(RelayToClient::Stored { outcomes, .. }) => match &outcomes[0] {
                        PutOutcome::Stored => stored_bytes += 60_000,
                        PutOutcome::Rejected { code, .. } => codes.note(*code),
                        PutOutcome::Duplicate => {}
                    },
                    Ok(RelayToClient::Error { code, .. }) => {
                        codes.note(code);
                        if codes.count(ErrorCode::RateLimited) > 50 {
                            break 'fill;
                        }
                    }
                    other => panic!("unexpected answer {other:?}"),
                }
            }
        }
    });

    // 3. Frames announced at the largest allowed length, never finished, on 20 streams;
    //    and one announced over the limit. (The connections above go first: the cap
    //    would refuse these.)
    drop(connections);
    std::thread::sleep(Duration::from_millis(500));
    let reserved_before_frames = relay.virtual_kib();
    let held: Vec<libp2p::Stream> = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..20 {
            if let Some(mut s) = raw_stream(&relay.v4).await {
                let prefix = (wire::MAX_FRAME_LEN as u32).to_be_bytes();
                if s.write_all(&prefix).await.is_ok() && s.write_all(&[0u8; 1000]).await.is_ok() {
                    let _ = s.flush().await;
                    held.push(s);
                }
            }
        }
        held
    });
    let oversized_closed = rt.block_on(async {
        let Some(mut s) = raw_stream(&relay.v4).await else {
            return false;
        };
        let _ = s
            .write_all(&((wire::MAX_FRAME_LEN + 1) as u32).to_be_bytes())
            .await;
        let _ = s.flush().await;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.is_ok()
    });
    std::thread::sleep(Duration::from_millis(500));
    let reserved_with_frames = relay.virtual_kib();
    let frames_held = held.len();

    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    rt.block_on(honest_task).unwrap();
    drop(held);

    let failures = failures.lock().clone();
    let served = served.load(Ordering::Relaxed);
    let frames_kib = reserved_with_frames.saturating_sub(reserved_before_frames);
    println!(
        "one host against a relay: {connected} of {attempts} connections from one address \
         accepted (cap {CONNECTIONS_PER_ADDRESS}); {} KiB stored before refusals {:?}; 20 \
         frames announced at {} KiB each made the relay reserve {frames_kib} KiB; relay RSS {} → {} KiB; \
         honest client served {served} times, {} failures, slowest {:?}",
        stored_bytes / 1024,
        codes.0.lock(),
        wire::MAX_FRAME_LEN / 1024,
        base_rss,
        relay.rss_kib(),
        failures.len(),
        *slowest.lock(),
    );
    assert!(
        connected <= CONNECTIONS_PER_ADDRESS,
        "the per-address cap did not hold: {connected} connections"
    );
    assert!(
        stored_bytes <= 4 << 20,
        "one address stored more than its share: {stored_bytes} bytes"
    );
    assert!(
        codes.count(ErrorCode::RateLimited) + codes.count(ErrorCode::StorageFull) > 0,
        "the storage fill was never refused: {:?}",
        codes.0.lock()
    );
    assert_eq!(
        frames_held, 20,
        "the half-sent frames did not all get through"
    );
    assert!(
        frames_kib < 20 * 1024,
        "half-sent frames reserved their announced size: {frames_kib} KiB"
    );
    assert!(oversized_closed, "an oversized frame got no answer");
    assert!(
        failures.is_empty(),
        "the honest client was refused: {failures:?}"
    );
    assert!(
        served > 10,
        "the honest client was barely served ({served})"
    );
}
