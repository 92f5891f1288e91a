//! Running a relay: its key, its handle, and starting it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use kkachi_protocol::{Multiaddr, PeerId};
use libp2p::identity::Keypair;
use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::config;
pub use crate::config::Config;
pub use crate::metrics::Metrics;
use crate::store::{self, Limits, MailboxStore, Quota, SledStore};
use crate::{node, service, session};

/// File name of the node key inside the data directory.
pub const KEY_FILE: &str = "relay.key";
/// Directory name of the mailbox database inside the data directory.
pub const DB_DIR: &str = "db";
/// Where chunks of files are kept, inside the data directory.
pub const CHUNKS_DIR: &str = "chunks";

/// Why a relay could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum RelayError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The node key could not be read or written.
    #[error("node key {path}: {message}")]
    Key {
        /// The key file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The store could not be opened or flushed.
    #[error("mailbox store: {0}")]
    Store(String),
    /// The network transport could not be set up.
    #[error("transport: {0}")]
    Transport(String),
    /// A listen address could not be used.
    #[error("cannot listen on {addr}: {message}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        message: String,
    },
    /// The metrics endpoint could not bind.
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Loads the node key from `data_dir`, creating it (mode 0600) on first use, so the
/// relay's PeerId survives restarts.
pub fn load_or_create_key(data_dir: &Path) -> Result<Keypair, RelayError> {
    let path = data_dir.join(KEY_FILE);
    let err = |message: String| RelayError::Key {
        path: path.display().to_string(),
        message,
    };
    match std::fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| {
            err(format!(
                "not a valid key file ({e}); restore it from backup"
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir)
                .map_err(|e| err(format!("cannot create directory: {e}")))?;
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            write_private(&path, &bytes).map_err(|e| err(format!("cannot write: {e}")))?;
            tracing::info!(path = %path.display(), "created a new node key");
            Ok(key)
        }
        Err(e) => Err(err(format!("cannot read: {e}"))),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reports a storage failure the relay cannot continue after.
type FatalProbe = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// A running relay.
pub struct RelayHandle {
    fatal: FatalProbe,
    peer_id: PeerId,
    addrs: watch::Receiver<Vec<Multiaddr>>,
    metrics: Metrics,
    metrics_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), RelayError>>,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle")
            .field("peer_id", &self.peer_id)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

impl RelayHandle {
    /// A storage failure the relay cannot continue after, if one happened: the relay
    /// is stopping, and should be restarted once the cause (a full disk) is fixed.
    pub fn fatal(&self) -> Option<String> {
        (self.fatal)()
    }

    /// True once the relay task has ended (after `shutdown` or a fatal failure).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// The relay's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Its metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Where `/metrics` is served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// A live view of the listen addresses (without `/p2p/`).
    pub fn addrs(&self) -> watch::Receiver<Vec<Multiaddr>> {
        self.addrs.clone()
    }

    /// Waits until the relay listens on at least `n` addresses and returns them, each
    /// ending in `/p2p/<peer id>` (ready for an invite code).
    pub async fn wait_listening(&mut self, n: usize) -> Vec<Multiaddr> {
        let peer = self.peer_id;
        let addrs = self
            .addrs
            .wait_for(|a| a.len() >= n)
            .await
            .map(|a| a.clone())
            .unwrap_or_default();
        addrs
            .into_iter()
            .map(|a| a.with(libp2p::multiaddr::Protocol::P2p(peer)))
            .collect()
    }

    /// Stops gracefully: stop accepting, finish in-flight puts, flush.
    pub async fn shutdown(mut self) -> Result<(), RelayError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.join().await
    }

    /// Waits for the relay task to end.
    pub async fn join(self) -> Result<(), RelayError> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(RelayError::Transport(format!("relay task failed: {e}"))),
        }
    }
}

/// Starts a relay with its durable store in `config.data_dir`.
pub async fn start(config: Config) -> Result<RelayHandle, RelayError> {
    config.validate()?;
    let key = load_or_create_key(&config.data_dir)?;
    let metrics = Metrics::new();
    let flush_metric = metrics.flush_seconds.clone();
    let observer: store::FlushObserver =
        Arc::new(move |d: std::time::Duration| flush_metric.observe(d.as_secs_f64()));
    let store = SledStore::open(
        &config.data_dir.join(DB_DIR),
        limits(&config),
        config.limits.cache_bytes,
        Some(observer),
    )
    .map_err(|e| RelayError::Store(e.to_string()))?;
    let chunks = open_chunks(&config)?;
    start_with_chunks(config, key, store, metrics, chunks).await
}

/// The chunk store for files in `config.data_dir/chunks`, unless files are off
/// (`chunk_bytes_total = 0`); its queues are indexed in the background.
fn open_chunks(config: &Config) -> Result<Option<Arc<dyn store::chunks::Chunks>>, RelayError> {
    let l = &config.limits;
    if l.chunk_bytes_total == 0 {
        return Ok(None);
    }
    let chunks = Arc::new(
        store::chunks::ChunkStore::open(
            &config.data_dir.join(CHUNKS_DIR),
            store::chunks::ChunkLimits {
                per_capability: l.chunk_bytes_per_capability,
                per_queue: l.chunk_bytes_per_queue,
                total: l.chunk_bytes_total,
            },
        )
        .map_err(|e| RelayError::Store(e.to_string()))?,
    );
    let walk = Arc::clone(&chunks);
    std::thread::Builder::new()
        .name("kkachi-chunks".into())
        .spawn(move || match walk.index_all() {
            Ok(()) => tracing::info!(chunks = walk.stats().chunks, bytes = walk.stats().bytes, "indexed the stored chunks"),
            Err(e) => tracing::error!(error = %e, "indexing the stored chunks failed; expiry covers the queues named since"),
        })
        .map_err(|e| RelayError::Store(e.to_string()))?;
    Ok(Some(chunks))
}

/// Measures the free space of the file system holding `dir` into `free` every 100 ms,
/// until `free` has no other holder (the relay stopped). Puts are refused while it is
/// under `min_free`, so the disk never fills up under the store, which could not go on
/// after a failed write; reads and deletes (which free space) go on.
async fn watch_disk(
    dir: std::path::PathBuf,
    min_free: u64,
    free_bytes: Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering;
    let mut was_low = false;
    while Arc::strong_count(&free_bytes) > 1 {
        let free = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || rustix::fs::statvfs(&dir).map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        })
        .await;
        if let Ok(Ok(free)) = free {
            let now_low = free < min_free;
            if now_low != was_low {
                if now_low {
                    tracing::warn!(
                        free,
                        min_free,
                        "disk nearly full: puts are refused until space returns"
                    );
                } else {
                    tracing::info!(free, "disk space is back: puts are taken again");
                }
                was_low = now_low;
            }
            free_bytes.store(free, Ordering::Relaxed);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Refuses a listen address whose port another process holds. libp2p binds with
/// `SO_REUSEPORT`, so a second relay on a port already in use would start without
/// complaint and take some of the first one's connections.
fn check_port_free(addr: &Multiaddr) -> Result<(), RelayError> {
    use libp2p::multiaddr::Protocol;
    use std::net::IpAddr;
    let (mut ip, mut tcp, mut udp) = (None, None, None);
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(IpAddr::V6(a)),
            Protocol::Tcp(port) if port != 0 => tcp = Some(port),
            Protocol::Udp(port) if port != 0 => udp = Some(port),
            _ => {}
        }
    }
    let Some(ip) = ip else {
        return Ok(());
    };
    let refused = |e: std::io::Error| RelayError::Listen {
        addr: addr.clone(),
        message: if e.kind() == std::io::ErrorKind::AddrInUse {
            "the port is in use by another process (another relay?): stop it, or choose another port".into()
        } else {
            e.to_string()
        },
    };
    if let Some(port) = tcp {
        std::net::TcpListener::bind((ip, port)).map_err(refused)?;
    }
    if let Some(port) = udp {
        std::net::UdpSocket::bind((ip, port)).map_err(refused)?;
    }
    Ok(())
}

/// The quotas a config asks for.
pub fn limits(config: &Config) -> Limits {
    let l = &config.limits;
    Limits {
        queue: Quota {
            max_envelopes: l.queue_max_envelopes,
            max_bytes: l.queue_max_bytes,
        },
        capability: Quota {
            max_envelopes: l.capability_max_envelopes,
            max_bytes: l.capability_max_bytes,
        },
        requests: Quota {
            max_envelopes: l.request_max_envelopes,
            max_bytes: l.request_max_bytes,
        },
        total: Quota {
            max_envelopes: l.max_envelopes,
            max_bytes: l.max_bytes,
        },
    }
}

/// Starts a relay with the given key and store (for example an in-memory store).
pub async fn start_with<S: MailboxStore + Clone>(
    config: Config,
    key: Keypair,
    store: S,
    metrics: Metrics,
) -> Result<RelayHandle, RelayError> {
    start_with_chunks(config, key, store, metrics, None).await
}

/// [`start_with`], storing chunks of files in `chunks` (`None`: no files here).
pub async fn start_with_chunks<S: MailboxStore + Clone>(
    config: Config,
    key: Keypair,
    store: S,
    metrics: Metrics,
    chunks: Option<Arc<dyn store::chunks::Chunks>>,
) -> Result<RelayHandle, RelayError> {
    config.validate()?;
    let peer_id = key.public().to_peer_id();
    metrics.set_store(store.stats());
    let metrics_addr = match config.metrics {
        config::MetricsListen::Off => None,
        config::MetricsListen::On(addr) => Some(
            metrics
                .serve(addr)
                .await
                .map_err(|source| RelayError::Metrics { addr, source })?,
        ),
    };
    for addr in &config.listen {
        check_port_free(addr)?;
    }
    let mut swarm = node::build_swarm(&config, key)?;
    let mut listeners = Vec::new();
    for addr in &config.listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| RelayError::Listen {
                addr: addr.clone(),
                message: e.to_string(),
            })?;
        listeners.push(id);
    }
    let probe_store = store.clone();
    let fatal: FatalProbe = Arc::new(move || probe_store.fatal());
    let mut service = service::Service::new(&config, store, metrics.clone());
    if let Some(chunks) = chunks {
        service = service.with_chunks(chunks);
    }
    let service = Arc::new(service);
    tokio::spawn(watch_disk(
        config.data_dir.clone(),
        config.limits.min_free_disk_bytes,
        service.disk_free(),
    ));
    let (addrs_tx, addrs) = watch::channel(Vec::new());
    let (shutdown, shutdown_rx) = oneshot::channel();
    let (sessions_tx, sessions) = tokio::sync::mpsc::channel(1024);
    let incoming = swarm
        .behaviour()
        .session
        .new_control()
        .accept(session::SESSION_PROTOCOL)
        .map_err(|e| RelayError::Transport(e.to_string()))?;
    tokio::spawn(session::accept(
        incoming,
        sessions_tx,
        config.idle_timeout(),
    ));
    let node = node::Node::new(
        swarm,
        service,
        metrics.clone(),
        &config,
        addrs_tx,
        listeners,
        sessions,
    );
    let task = tokio::spawn(node.run(shutdown_rx));
    tracing::info!(%peer_id, "relay started");
    Ok(RelayHandle {
        fatal,
        peer_id,
        addrs,
        metrics,
        metrics_addr,
        shutdown: Some(shutdown),
        task,
    })
}
