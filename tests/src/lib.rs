//! kkachi-tests: cross-process scenarios with the real binaries, fault injection, a
//! delivery checker, and benchmark tools.
//!
//! - [`procs`]: relay and user processes (start, kill -9, restart on the same port and
//!   data), daemons whose JSON output is read line by line.
//! - [`checker`]: records what was reported sent and what was shown, and reports lost,
//!   duplicated, reordered-without-notice, latency percentiles and the longest gap.
//! - [`faults`]: a fault-injecting TCP proxy (blackhole, delay, reset) and a malicious
//!   relay store (tamper, duplicate, replay, reorder, drop); [`inproc`] runs relays
//!   with such stores inside the test process.
//! - [`echo`]: a plain libp2p request/response exchange, the benchmark's baseline.
//! - [`evil`]: a hostile contact with a real session, sending what no honest client
//!   would.
//! - [`netns`]: network namespaces and nftables rules for LAN and partition scenarios
//!   (root only; tests say why they skip otherwise).
//!
//! The binaries are found next to the test executable (`target/<profile>/`); `cargo
//! test --workspace` builds them.

pub mod checker;
pub mod echo;
pub mod evil;
pub mod faults;
pub mod netns;
pub mod procs;

/// True when long soak runs are asked for (`KKACHI_SOAK=1`).
pub fn soak() -> bool {
    std::env::var_os("KKACHI_SOAK").is_some_and(|v| v != "0")
}

pub mod inproc {
    //! A relay with a chosen store, run on its own runtime thread inside the test.

    use kkachi_relay::config::Config;
    use kkachi_relay::store::MailboxStore;
    use libp2p::identity::Keypair;

    /// A relay running inside this process.
    #[derive(Debug)]
    pub struct InProcessRelay {
        /// Its address, ending in `/p2p/<id>`.
        pub addr: String,
        stop: Option<std::sync::mpsc::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl InProcessRelay {
        /// Starts a relay over `store` on loopback (circuit relaying off), storing no
        /// files.
        pub fn start<S: MailboxStore + Clone>(store: S) -> Self {
            Self::start_with_chunks(store, None)
        }

        /// Starts a relay over `store`, keeping chunks of files in `chunks`.
        pub fn start_with_chunks<S: MailboxStore + Clone>(
            store: S,
            chunks: Option<std::sync::Arc<dyn kkachi_relay::store::chunks::Chunks>>,
        ) -> Self {
            let (addr_tx, addr_rx) = std::sync::mpsc::channel();
            let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let mut config = Config {
                        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid")],
                        ..Config::default()
                    };
                    // Only a store under test here: no circuits, so no direct path between
                    // its users can hide what the store does.
                    config.circuit.enabled = false;
                    let mut relay = kkachi_relay::start_with_chunks(
                        config,
                        Keypair::generate_ed25519(),
                        store,
                        kkachi_relay::Metrics::new(),
                        chunks,
                    )
                    .await
                    .expect("relay starts");
                    let addr = relay.wait_listening(1).await.remove(0);
                    addr_tx.send(addr.to_string()).expect("report address");
                    let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
                    let _ = relay.shutdown().await;
                });
            });
            let addr = addr_rx.recv().expect("relay address");
            Self {
                addr,
                stop: Some(stop),
                thread: Some(thread),
            }
        }
    }

    impl Drop for InProcessRelay {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

pub mod data {
    //! Test files: bytes that never repeat, and comparing two files.

    use std::io::{Read, Write};
    use std::path::Path;

    /// Writes `size` bytes that do not repeat (so no chunk of a file equals another) to
    /// `path`; `seed` picks which.
    pub fn random_file(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut x = seed | 1;
        let mut left = size;
        let mut block = vec![0u8; 1 << 16];
        while left > 0 {
            for b in block.chunks_mut(8) {
                // xorshift64
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            let n = left.min(block.len() as u64) as usize;
            f.write_all(&block[..n])?;
            left -= n as u64;
        }
        f.flush()
    }

    /// Whether two files hold the same bytes (read a block at a time).
    pub fn same_bytes(a: &Path, b: &Path) -> std::io::Result<bool> {
        let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
        if fa.metadata()?.len() != fb.metadata()?.len() {
            return Ok(false);
        }
        let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        loop {
            let n = fa.read(&mut ba)?;
            if n == 0 {
                return Ok(true);
            }
            fb.read_exact(&mut bb[..n])?;
            if ba[..n] != bb[..n] {
                return Ok(false);
            }
        }
    }
}
