//! What every part of the bench uses: relay processes, ports, envelopes, clocks and
//! percentiles.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use kkachi_protocol::wire::Addressed;
use kkachi_protocol::{Envelope, QueueKind, ReadKey, RelayToClient, WriteKey};
use kkachi_relay::client::MailboxClient;

pub(crate) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub(crate) fn pct<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub(crate) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A relay process from the release build.
pub(crate) struct Relay {
    child: Option<Child>,
    pub(crate) addr: String,
    port: u16,
    dir: PathBuf,
}

pub(crate) fn relay_bin() -> Result<PathBuf> {
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
    pub(crate) fn start(dir: &Path, port: u16) -> Result<Self> {
        let config = dir.join("bench.toml");
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            &config,
            "[limits]\nqueue_max_envelopes = 100000000\nqueue_max_bytes = 100000000000\n\
             capability_max_envelopes = 100000000\ncapability_max_bytes = 100000000000\n\
             puts_per_sec = 10000000\nput_burst = 10000000\nputs_per_sec_per_address = 10000000\n\
             put_burst_per_address = 10000000\nmax_connections = 100000\n\
             max_pending_connections = 100000\nmax_waiting_per_peer = 64\n\
             max_connections_per_address = 100000\nrequests_per_sec = 10000000\n\
             request_burst = 10000000\nput_bytes_per_hour_per_address = 1000000000000000\n\
             put_bytes_burst_per_address = 1000000000000\nqueues_per_hour_per_address = 1000000\n\
             grants_per_hour_per_address = 100000000\nchunk_bytes_per_capability = 4294967296\n\
             chunk_bytes_per_queue = 8589934592\n",
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

    pub(crate) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn restart(&mut self) -> Result<()> {
        self.kill9();
        let mut fresh = Relay::start(&self.dir, self.port)?;
        self.child = fresh.child.take();
        Ok(())
    }

    /// Chunks of files it holds on disk (one file each under `chunks/<queue>/`).
    pub(crate) fn chunk_files(&self) -> usize {
        let Ok(queues) = std::fs::read_dir(self.dir.join("chunks")) else {
            return 0;
        };
        queues
            .filter_map(Result::ok)
            .filter_map(|q| std::fs::read_dir(q.path()).ok())
            .map(|files| files.count())
            .sum()
    }

    pub(crate) fn rss_kib(&self) -> u64 {
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

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Envelope `n` of `size` bytes, put through the write key `to`.
pub(crate) fn envelope(to: &WriteKey, n: u64, size: usize) -> Addressed {
    let mut payload = vec![0u8; size];
    payload[..8].copy_from_slice(&n.to_be_bytes());
    Addressed {
        write: *to,
        envelope: Envelope {
            expires_at: now_s() + 3600,
            payload,
        },
    }
}

/// Opens a fresh queue through `client` and returns the one write key it grants.
pub(crate) async fn open_queue(client: &MailboxClient) -> Result<WriteKey> {
    let key = ReadKey(rand::random());
    let write = WriteKey(rand::random());
    match client
        .grant(&key, QueueKind::Inbox, vec![write.id()])
        .await?
    {
        RelayToClient::Granted { .. } => Ok(write),
        other => anyhow::bail!("the relay did not open a queue: {other:?}"),
    }
}

/// Microseconds on the machine's monotonic clock, which every process reads alike: the
/// sender here and the recipient in its own process time one message with it.
pub(crate) fn mono_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}
