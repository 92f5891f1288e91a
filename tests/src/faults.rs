//! Fault injection: a TCP proxy that can blackhole, delay or reset a relay without
//! killing it, and a malicious relay store that tampers, duplicates, replays, reorders
//! and drops what it serves.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use kkachi_protocol::wire::StoredEnvelope;
use kkachi_protocol::{EnvelopeId, QueueId, QueueKind, WriteId};
use kkachi_relay::store::{
    Fetched, Granted, MailboxStore, MemoryStore, Placed, PutResult, StoreError, StoreStats,
};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ProxyMode {
    /// Forward everything.
    Pass = 0,
    /// Accept and hold connections, forward nothing (a silent partition).
    Blackhole = 1,
    /// Close every connection at once (connection reset).
    Reset = 2,
    /// Forward with 200 ms added each way.
    Delay = 3,
    /// Forward at about [`SLOW_BYTES_PER_SEC`] each way, per connection.
    Slow = 4,
}

/// The pace of [`ProxyMode::Slow`].
pub const SLOW_BYTES_PER_SEC: u64 = 2 << 20;

/// A TCP proxy in front of one relay, on loopback.
#[derive(Debug, Clone)]
pub struct Proxy {
    /// The port clients connect to.
    pub port: u16,
    mode: Arc<AtomicU8>,
    epoch: Arc<AtomicU64>,
}

impl Proxy {
    /// Starts forwarding 127.0.0.1:`port` (chosen) to 127.0.0.1:`upstream`.
    pub async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let proxy = Self {
            port,
            mode: Arc::new(AtomicU8::new(ProxyMode::Pass as u8)),
            epoch: Arc::new(AtomicU64::new(0)),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let p = p.clone();
                tokio::spawn(async move { p.serve(client, upstream).await });
            }
        });
        proxy
    }

    /// The current mode.
    pub fn mode(&self) -> ProxyMode {
        match self.mode.load(Ordering::SeqCst) {
            1 => ProxyMode::Blackhole,
            2 => ProxyMode::Reset,
            3 => ProxyMode::Delay,
            4 => ProxyMode::Slow,
            _ => ProxyMode::Pass,
        }
    }

    /// Switches mode; a cut (blackhole or reset) also ends the connections open now.
    pub fn set(&self, mode: ProxyMode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    async fn serve(&self, mut client: TcpStream, upstream: u16) {
        let epoch = self.epoch.load(Ordering::SeqCst);
        match self.mode() {
            ProxyMode::Reset => return,
            ProxyMode::Blackhole => {
                // Hold the connection open and swallow bytes until the mode changes.
                let mut sink = [0u8; 4096];
                while self.epoch.load(Ordering::SeqCst) == epoch {
                    match tokio::time::timeout(Duration::from_millis(100), client.read(&mut sink))
                        .await
                    {
                        Ok(Ok(0)) | Ok(Err(_)) => return,
                        _ => {}
                    }
                }
                return;
            }
            ProxyMode::Pass | ProxyMode::Delay | ProxyMode::Slow => {}
        }
        let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        tokio::select! {
            _ = self.pump(&mut cr, &mut sw, epoch) => {}
            _ = self.pump(&mut sr, &mut cw, epoch) => {}
        }
    }

    /// Copies one direction until either side closes or a cut ends the connection.
    async fn pump(
        &self,
        from: &mut (impl tokio::io::AsyncRead + Unpin),
        to: &mut (impl tokio::io::AsyncWrite + Unpin),
        epoch: u64,
    ) {
        let cut = || self.epoch.load(Ordering::SeqCst) != epoch && self.mode() != ProxyMode::Pass;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n =
                match tokio::time::timeout(Duration::from_millis(100), from.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(n)) => n,
                    Err(_) if cut() => return,
                    Err(_) => continue,
                };
            if cut() {
                return;
            }
            match self.mode() {
                ProxyMode::Delay => tokio::time::sleep(Duration::from_millis(200)).await,
                ProxyMode::Slow => {
                    tokio::time::sleep(Duration::from_micros(
                        n as u64 * 1_000_000 / SLOW_BYTES_PER_SEC,
                    ))
                    .await
                }
                _ => {}
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}

/// The misbehaviours of [`EvilStore`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Evil {
    /// Flip a bit in some envelopes served.
    pub tamper: bool,
    /// Serve some envelopes twice.
    pub duplicate: bool,
    /// Serve envelopes again after they were deleted.
    pub replay: bool,
    /// Shuffle each batch.
    pub reorder: bool,
    /// Acknowledge some puts, then never serve them. Every `drop_every`th stored
    /// envelope is dropped (0: none).
    pub drop_every: u64,
}

impl Evil {
    /// Every misbehaviour at once: tampers, duplicates, replays, reorders, and drops
    /// every `drop_every`th envelope.
    pub fn all(drop_every: u64) -> Self {
        Self {
            tamper: true,
            duplicate: true,
            replay: true,
            reorder: true,
            drop_every,
        }
    }
}

/// A relay store that misbehaves in every way a relay can, for tests.
#[derive(Debug, Clone)]
pub struct EvilStore {
    inner: MemoryStore,
    evil: Evil,
    seen: Arc<Mutex<Vec<(QueueId, StoredEnvelope)>>>,
    dropped: Arc<Mutex<Vec<EnvelopeId>>>,
    counter: Arc<AtomicU64>,
}

impl EvilStore {
    /// Wraps an in-memory store.
    pub fn new(inner: MemoryStore, evil: Evil) -> Self {
        Self {
            inner,
            evil,
            seen: Arc::default(),
            dropped: Arc::default(),
            counter: Arc::default(),
        }
    }

    /// Envelope ids it acknowledged and then dropped.
    pub fn dropped(&self) -> Vec<EnvelopeId> {
        self.dropped.lock().clone()
    }

    fn tick(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::SeqCst)
    }
}

impl MailboxStore for EvilStore {
    fn insert(&self, envelopes: &[Placed]) -> Result<Vec<PutResult>, StoreError> {
        let ids: Vec<EnvelopeId> = envelopes.iter().map(|p| p.envelope.id()).collect();
        let results = self.inner.insert(envelopes)?;
        if self.evil.drop_every > 0 {
            for (i, (id, r)) in ids.iter().zip(&results).enumerate() {
                if matches!(r, PutResult::Stored { .. })
                    && self.tick() % self.evil.drop_every == self.evil.drop_every - 1
                {
                    let _ = self.inner.delete(&envelopes[i].queue, &[*id]);
                    self.dropped.lock().push(*id);
                }
            }
        }
        Ok(results)
    }

    fn fetch(
        &self,
        mailbox: &QueueId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Fetched, StoreError> {
        let mut f = self.inner.fetch(mailbox, after, limit, max_bytes)?;
        {
            let mut seen = self.seen.lock();
            for item in &f.items {
                if !seen.iter().any(|(_, s)| s.cursor == item.cursor) {
                    seen.push((*mailbox, item.clone()));
                }
            }
        }
        let mut out = Vec::new();
        for item in f.items.drain(..) {
            if self.evil.tamper && self.tick().is_multiple_of(3) {
                let mut bad = item.clone();
                let at = (self.tick() as usize) % bad.envelope.payload.len();
                bad.envelope.payload[at] ^= 0x20;
                out.push(bad);
            }
            out.push(item.clone());
            if self.evil.duplicate && self.tick().is_multiple_of(2) {
                out.push(item);
            }
        }
        if self.evil.replay {
            let seen = self.seen.lock();
            out.extend(
                seen.iter()
                    .filter(|(queue, _)| queue == mailbox)
                    .take(3)
                    .map(|(_, s)| s.clone()),
            );
        }
        if self.evil.reorder && out.len() > 1 {
            let n = out.len();
            let r = self.tick() as usize;
            out.rotate_left(r % n);
            out.reverse();
        }
        f.items = out;
        Ok(f)
    }

    fn delete(&self, mailbox: &QueueId, ids: &[EnvelopeId]) -> Result<u32, StoreError> {
        self.inner.delete(mailbox, ids)
    }

    fn expire(&self, now: u64, max: usize) -> Result<usize, StoreError> {
        self.inner.expire(now, max)
    }

    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }

    fn epoch(&self) -> u64 {
        self.inner.epoch()
    }

    fn route(&self, write: &WriteId) -> Result<Option<(QueueId, QueueKind)>, StoreError> {
        self.inner.route(write)
    }

    fn grant(
        &self,
        queue: &QueueId,
        kind: QueueKind,
        ids: &[WriteId],
        max: u32,
    ) -> Result<Granted, StoreError> {
        self.inner.grant(queue, kind, ids, max)
    }

    fn revoke(&self, queue: &QueueId, ids: &[WriteId]) -> Result<u32, StoreError> {
        self.inner.revoke(queue, ids)
    }

    fn has_queue(&self, queue: &QueueId) -> Result<bool, StoreError> {
        self.inner.has_queue(queue)
    }

    fn is_group_queue(&self, queue: &QueueId) -> Result<bool, StoreError> {
        self.inner.is_group_queue(queue)
    }

    fn queue_count(&self) -> u64 {
        self.inner.queue_count()
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A relay's chunk store that serves every chunk with one byte flipped (while `lying`
/// is set): what a malicious or broken relay does to a file. Everything else is the
/// real store's.
#[derive(Debug)]
pub struct FlippingChunks {
    inner: kkachi_relay::store::chunks::ChunkStore,
    /// Flip a byte of every chunk served.
    pub lying: std::sync::atomic::AtomicBool,
    /// Chunks served flipped.
    pub flipped: AtomicU64,
}

impl FlippingChunks {
    /// Over a real store in `dir`, lying from the start.
    pub fn open(dir: &std::path::Path) -> Self {
        let inner = kkachi_relay::store::chunks::ChunkStore::open(
            dir,
            kkachi_relay::store::chunks::ChunkLimits {
                per_capability: 1 << 30,
                per_queue: 1 << 30,
                total: 1 << 32,
            },
        )
        .expect("chunk store opens");
        Self {
            inner,
            lying: std::sync::atomic::AtomicBool::new(true),
            flipped: AtomicU64::new(0),
        }
    }
}

impl kkachi_relay::store::chunks::Chunks for FlippingChunks {
    fn put(
        &self,
        queue: &QueueId,
        grant: &WriteId,
        id: &kkachi_protocol::file::ChunkId,
        expires_at: u64,
        data: &[u8],
    ) -> Result<kkachi_relay::store::chunks::ChunkPut, StoreError> {
        self.inner.put(queue, grant, id, expires_at, data)
    }
    fn get(
        &self,
        queue: &QueueId,
        id: &kkachi_protocol::file::ChunkId,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut data = self.inner.get(queue, id)?;
        if self.lying.load(Ordering::Relaxed)
            && let Some(d) = data.as_mut()
        {
            let at = d.len() / 2;
            d[at] ^= 0x40;
            self.flipped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(data)
    }
    fn has_from(
        &self,
        queue: &QueueId,
        grant: &WriteId,
        ids: &[kkachi_protocol::file::ChunkId],
    ) -> Result<Vec<bool>, StoreError> {
        self.inner.has_from(queue, grant, ids)
    }
    fn delete(
        &self,
        queue: &QueueId,
        ids: &[kkachi_protocol::file::ChunkId],
    ) -> Result<u32, StoreError> {
        self.inner.delete(queue, ids)
    }
    fn expire(&self, now: u64, max: usize) -> Result<usize, StoreError> {
        self.inner.expire(now, max)
    }
    fn stats(&self) -> kkachi_relay::store::chunks::ChunkStats {
        self.inner.stats()
    }
}
