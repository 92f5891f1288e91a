//! What the relay does with each request, independent of libp2p: validation, access
//! control, rate limits, and calls into the store. The node (`node.rs`) turns its
//! [`Action`]s into responses on streams.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures::future::BoxFuture;
use governor::{DefaultKeyedRateLimiter, Quota as RateQuota, RateLimiter};
use kkachi_protocol::envelope::EnvelopeError;
use kkachi_protocol::wire::{
    Addressed, MAX_BATCH_BYTES, MAX_BATCH_ITEMS, MAX_FRAME_LEN, MAX_GRANT_IDS, MAX_WAIT_MS,
    PROTOCOL_VERSION, PutOutcome,
};
use kkachi_protocol::{
    ClientToRelay, ErrorCode, GroupKey, Multiaddr, PeerId, QueueId, QueueKind, RelayInfo,
    RelayToClient, WriteId,
};
use libp2p::multiaddr::Protocol;

use crate::config::{Config, OpenPolicy};
use crate::framing::Request;
use crate::metrics::Metrics;
use crate::store::chunks::{ChunkPut, Chunks};
use crate::store::{Granted, MailboxStore, Placed, PutResult, StoreError};

/// What the node should do with a request.
pub(crate) enum Action {
    /// Answer now.
    Respond(RelayToClient),
    /// Answer once this resolves (a change that must be durable first).
    Later(BoxFuture<'static, RelayToClient>),
    /// The put is stored (visible, not yet durable): answer when it is durable.
    Put {
        /// Resolves to the answer once the envelopes are flushed.
        done: BoxFuture<'static, RelayToClient>,
        /// Mailboxes that have new envelopes now: their long polls can be answered
        /// before the flush, since the sender's copy stays in its outbox until the
        /// acknowledgement and the recipient drops duplicates.
        mailboxes: Vec<QueueId>,
    },
    /// A put or delete naming a queue the store has not indexed since it started: the
    /// queue is read off the node's loop, then the request is carried out. Resolves to
    /// the answer and the queues with new envelopes (whose long polls to answer).
    Deferred(BoxFuture<'static, (RelayToClient, Vec<QueueId>)>),
    /// Nothing yet: park the long poll until something arrives or `wait_ms` passes.
    Wait {
        mailbox: QueueId,
        after: u64,
        wait_ms: u32,
    },
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Respond(r) => f.debug_tuple("Respond").field(r).finish(),
            Action::Later(_) => f.write_str("Later"),
            Action::Deferred(_) => f.write_str("Deferred"),
            Action::Put { mailboxes, .. } => {
                f.debug_struct("Put").field("mailboxes", mailboxes).finish()
            }
            Action::Wait {
                mailbox,
                after,
                wait_ms,
            } => f
                .debug_struct("Wait")
                .field("mailbox", mailbox)
                .field("after", after)
                .field("wait_ms", wait_ms)
                .finish(),
        }
    }
}

/// The relay's request logic over a store.
pub(crate) struct Service<S> {
    store: S,
    metrics: Metrics,
    info: RelayInfo,
    max_payload: usize,
    max_ttl: u64,
    request_max_ttl: u64,
    grants_per_queue: u32,
    open_policy: OpenPolicy,
    tokens: Vec<Vec<u8>>,
    puts: DefaultKeyedRateLimiter<PeerId>,
    /// The same, shared by every peer connecting from one address.
    puts_by_address: DefaultKeyedRateLimiter<IpAddr>,
    /// Requests of every kind, per connection's peer.
    requests: DefaultKeyedRateLimiter<PeerId>,
    /// New queues, per source.
    new_queues: DefaultKeyedRateLimiter<Source>,
    /// Write ids granted, per source: what one address adds to the registry.
    grant_ids: DefaultKeyedRateLimiter<Source>,
    /// Envelope KiB put, per source: its share of the storage over time.
    put_kib: DefaultKeyedRateLimiter<Source>,
    max_queues: u64,
    /// Free bytes on the data directory's disk as last measured, less twice what was
    /// stored since (the store writes each envelope more than once); puts and grants
    /// are refused below `min_free`, reads and deletes go on.
    disk_free: Arc<AtomicU64>,
    min_free: u64,
    /// Puts into contact-request queues, per source address (per peer for relayed
    /// connections): strangers holding an invite get a small allowance each.
    requests_by_source: DefaultKeyedRateLimiter<Source>,
    /// Where chunks of files go (`None`: this relay stores no files).
    chunks: Option<Arc<dyn Chunks>>,
}

/// What names the queue a chunk request puts into: a write capability granted by the
/// queue's owner, or a group queue's key.
enum ChunkCap {
    Write(kkachi_protocol::WriteKey),
    Group(GroupKey),
}

/// Who a request-queue allowance is counted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    Address(IpAddr),
    Peer(PeerId),
}

impl Source {
    /// The connection's address (see [`source_address`]), or its peer when relayed.
    fn of(peer: &PeerId, address: Option<IpAddr>) -> Self {
        address.map_or(Self::Peer(*peer), Self::Address)
    }
}

/// The address a connection's puts are counted under: its IPv4 address, or the /64 of
/// its IPv6 address (one host usually has a whole /64). None for relayed connections.
pub(crate) fn source_address(remote: &Multiaddr) -> Option<IpAddr> {
    if remote.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return None;
    }
    remote.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => {
            let prefix = u128::from(ip) & !((1u128 << 64) - 1);
            Some(IpAddr::V6(prefix.into()))
        }
        _ => None,
    })
}

/// `bytes` in KiB, rounded up (the unit of the byte allowances).
fn kib(bytes: u64) -> u32 {
    bytes.div_ceil(1024).min(u64::from(u32::MAX)) as u32
}

fn refuse(metrics: &Metrics, code: ErrorCode, message: impl Into<String>) -> RelayToClient {
    metrics
        .rejections
        .get_or_create(&Metrics::kind(code.as_str()))
        .inc();
    RelayToClient::error(code, message)
}

fn envelope_refusal(e: &EnvelopeError) -> ErrorCode {
    match e {
        EnvelopeError::Decode(_) | EnvelopeError::Empty => ErrorCode::Malformed,
        EnvelopeError::TooLarge { .. } => ErrorCode::TooLarge,
        EnvelopeError::Expired { .. } => ErrorCode::Expired,
        EnvelopeError::ExpiryTooFar { .. } => ErrorCode::ExpiryTooFar,
    }
}

fn store_refusal(e: &StoreError) -> (ErrorCode, String) {
    match e {
        StoreError::Full => (
            ErrorCode::StorageFull,
            "this relay's disk is full; nothing was stored, try another relay".into(),
        ),
        other => (
            ErrorCode::Internal,
            format!("this relay could not store the envelopes ({other}); nothing was acknowledged"),
        ),
    }
}

impl<S: MailboxStore + Clone> Service<S> {
    pub(crate) fn new(config: &Config, store: S, metrics: Metrics) -> Self {
        let l = &config.limits;
        let rate = NonZeroU32::new(l.puts_per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(l.put_burst).unwrap_or(NonZeroU32::MIN);
        let address_rate = NonZeroU32::new(l.puts_per_sec_per_address).unwrap_or(NonZeroU32::MIN);
        let address_burst = NonZeroU32::new(l.put_burst_per_address).unwrap_or(NonZeroU32::MIN);
        let request_rate =
            NonZeroU32::new(l.request_puts_per_hour_per_address).unwrap_or(NonZeroU32::MIN);
        let request_burst =
            NonZeroU32::new(l.request_put_burst_per_address).unwrap_or(NonZeroU32::MIN);
        let request_quota = RateQuota::per_hour(request_rate).allow_burst(request_burst);
        let any_rate = NonZeroU32::new(l.requests_per_sec).unwrap_or(NonZeroU32::MIN);
        let any_burst = NonZeroU32::new(l.request_burst).unwrap_or(NonZeroU32::MIN);
        let queue_rate = NonZeroU32::new(l.queues_per_hour_per_address).unwrap_or(NonZeroU32::MIN);
        Self {
            requests: RateLimiter::keyed(RateQuota::per_second(any_rate).allow_burst(any_burst)),
            new_queues: RateLimiter::keyed(RateQuota::per_hour(queue_rate)),
            put_kib: RateLimiter::keyed(
                RateQuota::per_hour(
                    NonZeroU32::new(kib(l.put_bytes_per_hour_per_address))
                        .unwrap_or(NonZeroU32::MIN),
                )
                .allow_burst(
                    NonZeroU32::new(
                        kib(l.put_bytes_burst_per_address).max(kib(MAX_FRAME_LEN as u64)),
                    )
                    .unwrap_or(NonZeroU32::MIN),
                ),
            ),
            grant_ids: RateLimiter::keyed(
                RateQuota::per_hour(
                    NonZeroU32::new(l.grants_per_hour_per_address).unwrap_or(NonZeroU32::MIN),
                )
                .allow_burst(
                    NonZeroU32::new(l.grants_per_hour_per_address.max(4 * MAX_GRANT_IDS as u32))
                        .unwrap_or(NonZeroU32::MIN),
                ),
            ),
            max_queues: l.max_queues,
            disk_free: Arc::new(AtomicU64::new(u64::MAX)),
            min_free: l.min_free_disk_bytes,
            store,
            metrics,
            info: RelayInfo {
                protocol_version: PROTOCOL_VERSION,
                software: format!("kkachi-relay/{}", env!("CARGO_PKG_VERSION")),
                name: config.info.name.clone(),
                operator: config.info.operator.clone(),
                failure_domain: config.info.failure_domain.clone(),
                max_payload: l.max_payload as u32,
                max_ttl_secs: l.max_ttl_secs,
                capability_max_envelopes: l.capability_max_envelopes.min(u64::from(u32::MAX))
                    as u32,
                capability_max_bytes: l.capability_max_bytes,
                puts_per_sec: l.puts_per_sec,
                open_policy: match config.access.open {
                    OpenPolicy::Anyone => 0,
                    OpenPolicy::Token => 1,
                },
                grants_per_queue: l.grants_per_queue,
                request_max_envelopes: l.request_max_envelopes.min(u64::from(u32::MAX)) as u32,
                request_max_ttl_secs: l.request_max_ttl_secs,
                now_secs: 0,
                store_epoch: 0,
            },
            max_payload: l.max_payload,
            max_ttl: l.max_ttl_secs,
            request_max_ttl: l.request_max_ttl_secs.min(l.max_ttl_secs),
            grants_per_queue: l.grants_per_queue,
            open_policy: config.access.open,
            tokens: config
                .access
                .tokens
                .iter()
                .map(|t| t.as_bytes().to_vec())
                .collect(),
            requests_by_source: RateLimiter::keyed(request_quota),
            puts: RateLimiter::keyed(RateQuota::per_second(rate).allow_burst(burst)),
            puts_by_address: RateLimiter::keyed(
                RateQuota::per_second(address_rate).allow_burst(address_burst),
            ),
            chunks: None,
        }
    }

    /// The same, storing chunks of files in `chunks`.
    pub(crate) fn with_chunks(mut self, chunks: Arc<dyn Chunks>) -> Self {
        self.chunks = Some(chunks);
        self
    }

    /// Where chunks of files go, if this relay stores them.
    pub(crate) fn chunks(&self) -> Option<&Arc<dyn Chunks>> {
        self.chunks.as_ref()
    }

    pub(crate) fn store(&self) -> &S {
        &self.store
    }

    /// What a disk watcher keeps up to date with the free space it measures.
    pub(crate) fn disk_free(&self) -> Arc<AtomicU64> {
        self.disk_free.clone()
    }

    fn disk_low(&self) -> bool {
        self.disk_free.load(Ordering::Relaxed) < self.min_free
    }

    /// Forgets rate-limiter state of peers that have been quiet (bounds its memory).
    pub(crate) fn prune(&self) {
        self.puts.retain_recent();
        self.puts.shrink_to_fit();
        self.puts_by_address.retain_recent();
        self.puts_by_address.shrink_to_fit();
        self.requests_by_source.retain_recent();
        self.requests_by_source.shrink_to_fit();
        self.requests.retain_recent();
        self.requests.shrink_to_fit();
        self.new_queues.retain_recent();
        self.new_queues.shrink_to_fit();
        self.grant_ids.retain_recent();
        self.grant_ids.shrink_to_fit();
        self.put_kib.retain_recent();
        self.put_kib.shrink_to_fit();
    }

    /// Decides what to do with one request from `peer`, connected from `source` (see
    /// [`source_address`]), at Unix time `now`.
    pub(crate) fn handle(
        &self,
        peer: &PeerId,
        source: Option<IpAddr>,
        request: Request,
        now: u64,
    ) -> Action {
        let msg = match request {
            Request::Message(msg) => msg,
            Request::Malformed(e) => {
                tracing::debug!(%peer, error = %e, "malformed request");
                return Action::Respond(refuse(
                    &self.metrics,
                    ErrorCode::Malformed,
                    format!("request could not be decoded: {e}"),
                ));
            }
        };
        let kind = match &msg {
            ClientToRelay::Put { .. } => "put",
            ClientToRelay::Fetch { .. } => "fetch",
            ClientToRelay::Subscribe { .. } => "subscribe",
            ClientToRelay::Delete { .. } => "delete",
            ClientToRelay::Info => "info",
            ClientToRelay::Grant { .. } => "grant",
            ClientToRelay::Revoke { .. } => "revoke",
            ClientToRelay::PutChunk { .. } => "put_chunk",
            ClientToRelay::GetChunk { .. } => "get_chunk",
            ClientToRelay::HasChunks { .. } => "has_chunks",
            ClientToRelay::DeleteChunks { .. } => "delete_chunks",
            ClientToRelay::OpenGroup { .. } => "open_group",
            ClientToRelay::PutGroup { .. } => "put_group",
            ClientToRelay::ReadGroup { .. } => "read_group",
            ClientToRelay::PutGroupChunk { .. } => "put_group_chunk",
            ClientToRelay::GetGroupChunk { .. } => "get_group_chunk",
            ClientToRelay::HasGroupChunks { .. } => "has_group_chunks",
        };
        self.metrics
            .requests
            .get_or_create(&Metrics::kind(kind))
            .inc();
        if !matches!(self.requests.check_key(peer), Ok(())) {
            return Action::Respond(refuse(
                &self.metrics,
                ErrorCode::RateLimited,
                "too many requests on this connection; slow down and retry in a few seconds",
            ));
        }
        // Holding a queue's read key is what owning it means: the relay checks nothing
        // else, and learns nothing about who the owner is.
        match msg {
            ClientToRelay::Put { items } => self.put(peer, source, items, false, now),
            ClientToRelay::PutGroup { items } => self.put(peer, source, items, true, now),
            ClientToRelay::OpenGroup { key, token } => {
                let requester = Source::of(peer, source);
                self.grant(requester, &key.queue(), QueueKind::Group, &token, &[])
            }
            ClientToRelay::ReadGroup {
                key,
                after,
                limit,
                wait_ms,
            } => self.read(key.queue(), after, usize::from(limit), wait_ms),
            ClientToRelay::Info => Action::Respond(RelayToClient::Info(RelayInfo {
                now_secs: crate::node::unix_now(),
                store_epoch: self.store.epoch(),
                ..self.info.clone()
            })),
            ClientToRelay::Fetch { key, after, limit } => {
                self.read(key.queue(), after, usize::from(limit), 0)
            }
            ClientToRelay::Subscribe {
                key,
                after,
                wait_ms,
            } => self.read(key.queue(), after, MAX_BATCH_ITEMS, wait_ms),
            ClientToRelay::Delete { key, ids } => {
                let queue = key.queue();
                let (store, metrics) = (self.store.clone(), self.metrics.clone());
                let failed = metrics.clone();
                // Indexing the queue first is nothing once it is indexed.
                let delete = move || match store
                    .index_queue(&queue)
                    .and_then(|()| store.delete(&queue, &ids))
                {
                    Ok(count) => RelayToClient::Deleted { count },
                    Err(e) => {
                        let (code, message) = store_refusal(&e);
                        refuse(&metrics, code, message)
                    }
                };
                if self.store.is_indexed(&queue) {
                    return Action::Respond(delete());
                }
                // Reading the queue may take a while: not on the node's loop.
                Action::Deferred(Box::pin(async move {
                    let answer = tokio::task::spawn_blocking(delete)
                        .await
                        .unwrap_or_else(|_| {
                            refuse(
                                &failed,
                                ErrorCode::Internal,
                                "the relay failed reading the queue; retry",
                            )
                        });
                    (answer, Vec::new())
                }))
            }
            ClientToRelay::Grant {
                key,
                kind,
                token,
                write_ids,
            } => {
                let requester = Source::of(peer, source);
                if kind == QueueKind::Group {
                    // Not a wire value; a group queue is opened by OpenGroup only.
                    return Action::Respond(refuse(
                        &self.metrics,
                        ErrorCode::Malformed,
                        "group queues are opened with OpenGroup, not granted",
                    ));
                }
                self.grant(requester, &key.queue(), kind, &token, &write_ids)
            }
            ClientToRelay::Revoke { key, write_ids } => {
                match self.store.revoke(&key.queue(), &write_ids) {
                    Ok(grants) => self.once_durable(RelayToClient::Granted { grants }),
                    Err(e) => {
                        let (code, message) = store_refusal(&e);
                        Action::Respond(refuse(&self.metrics, code, message))
                    }
                }
            }
            ClientToRelay::PutChunk {
                write,
                expires_at,
                id,
                data,
            } => self.put_chunk(
                peer,
                source,
                ChunkCap::Write(write),
                expires_at,
                id,
                data,
                now,
            ),
            ClientToRelay::PutGroupChunk {
                key,
                expires_at,
                id,
                data,
            } => self.put_chunk(
                peer,
                source,
                ChunkCap::Group(key),
                expires_at,
                id,
                data,
                now,
            ),
            ClientToRelay::GetChunk { key, id } => self.get_chunk(key.queue(), id),
            // A group queue's id is in a name space of its own: no read key reaches it.
            ClientToRelay::GetGroupChunk { key, id } => self.get_chunk(key.queue(), id),
            ClientToRelay::HasChunks { write, ids } => self.has_chunks(ChunkCap::Write(write), ids),
            ClientToRelay::HasGroupChunks { key, ids } => {
                self.has_chunks(ChunkCap::Group(key), ids)
            }
            ClientToRelay::DeleteChunks { key, ids } => {
                let queue = key.queue();
                self.with_chunk_store(move |chunks, metrics| match chunks.delete(&queue, &ids) {
                    Ok(count) => RelayToClient::Deleted { count },
                    Err(e) => {
                        let (code, message) = store_refusal(&e);
                        refuse(metrics, code, message)
                    }
                })
            }
        }
    }

    /// A chunk of `queue`: `Chunk`, or refused as not found.
    fn get_chunk(&self, queue: QueueId, id: kkachi_protocol::file::ChunkId) -> Action {
        self.with_chunk_store(move |chunks, metrics| match chunks.get(&queue, &id) {
            Ok(Some(data)) => {
                metrics.chunk_bytes_served.inc_by(data.len() as u64);
                RelayToClient::Chunk { data }
            }
            Ok(None) => refuse(
                metrics,
                ErrorCode::NotFound,
                "no such chunk here: never put, deleted, or expired; try another relay",
            ),
            Err(e) => {
                let (code, message) = store_refusal(&e);
                refuse(metrics, code, message)
            }
        })
    }

    /// Which of `ids` the queue `cap` puts into holds as put through it.
    fn has_chunks(&self, cap: ChunkCap, ids: Vec<kkachi_protocol::file::ChunkId>) -> Action {
        let (route, grant) = match self.route_chunks(&cap) {
            Ok(route) => route,
            Err(refusal) => return Action::Respond(refusal),
        };
        self.with_chunk_store(
            move |chunks, metrics| match chunks.has_from(&route, &grant, &ids) {
                Ok(held) => RelayToClient::ChunksHeld { held },
                Err(e) => {
                    let (code, message) = store_refusal(&e);
                    refuse(metrics, code, message)
                }
            },
        )
    }

    /// Runs `work` on the chunk store off the node's loop (it reads and writes files);
    /// refused at once when this relay stores no files.
    fn with_chunk_store(
        &self,
        work: impl FnOnce(&dyn Chunks, &Metrics) -> RelayToClient + Send + 'static,
    ) -> Action {
        let Some(chunks) = self.chunks.clone() else {
            return self.no_files();
        };
        let metrics = self.metrics.clone();
        Action::Deferred(Box::pin(async move {
            let failed = metrics.clone();
            let answer = tokio::task::spawn_blocking(move || {
                let answer = work(&*chunks, &metrics);
                metrics.set_chunks(chunks.stats());
                answer
            })
            .await
            .unwrap_or_else(|_| {
                refuse(
                    &failed,
                    ErrorCode::Internal,
                    "the relay failed handling the file; retry",
                )
            });
            (answer, Vec::new())
        }))
    }

    /// The answer of a relay that stores no files.
    fn no_files(&self) -> Action {
        Action::Respond(refuse(
            &self.metrics,
            ErrorCode::NotAllowed,
            "this relay stores no files; send them through another of the recipient's relays",
        ))
    }

    /// The queue `cap` puts chunks into, and the capability they are counted under:
    /// contacts' write capabilities only (strangers holding an invite send no files),
    /// or the key of an open group queue (counted under the queue's own id, as its
    /// envelopes are).
    #[allow(clippy::result_large_err)] // the refusal, as answered
    fn route_chunks(&self, cap: &ChunkCap) -> Result<(QueueId, WriteId), RelayToClient> {
        let route = match cap {
            ChunkCap::Write(write) => self
                .store
                .route(&write.id())
                .map(|r| r.map(|(queue, kind)| (queue, kind, write.id()))),
            ChunkCap::Group(key) => {
                let queue = key.queue();
                self.store
                    .is_group_queue(&queue)
                    .map(|open| open.then_some((queue, QueueKind::Group, WriteId(queue.0))))
            }
        };
        let refused = |code, message| Err(refuse(&self.metrics, code, message));
        match (cap, route) {
            (ChunkCap::Write(_), Ok(Some((queue, QueueKind::Inbox, grant))))
            | (ChunkCap::Group(_), Ok(Some((queue, QueueKind::Group, grant)))) => {
                Ok((queue, grant))
            }
            (_, Ok(Some((_, QueueKind::Requests, _)))) => refused(
                ErrorCode::NotAllowed,
                "files go only to contacts: become one first",
            ),
            // No grant is of this kind: group queues have none.
            (_, Ok(Some(_))) => {
                refused(ErrorCode::NotAllowed, "chunks do not go into group queues")
            }
            (ChunkCap::Group(_), Ok(None)) => refused(
                ErrorCode::NoQueue,
                "no group queue here for this key; open it (OpenGroup) and put again",
            ),
            (ChunkCap::Write(_), Ok(None)) => refused(
                ErrorCode::NoQueue,
                "no queue on this relay takes this write key; the recipient has not granted it here, or withdrew it",
            ),
            (_, Err(e)) => {
                let (code, message) = store_refusal(&e);
                refused(code, &message)
            }
        }
    }

    /// Stores a chunk of a file, within the same allowances as envelopes (the put
    /// rates, and the bytes one address may put) and the chunk store's shares.
    #[allow(clippy::too_many_arguments)]
    fn put_chunk(
        &self,
        peer: &PeerId,
        source: Option<IpAddr>,
        cap: ChunkCap,
        expires_at: u64,
        id: kkachi_protocol::file::ChunkId,
        data: Vec<u8>,
        now: u64,
    ) -> Action {
        let rejected = |metrics: &Metrics, code: ErrorCode, message: &str| {
            metrics
                .rejections
                .get_or_create(&Metrics::kind(code.as_str()))
                .inc();
            Action::Respond(RelayToClient::Stored {
                outcomes: vec![PutOutcome::Rejected {
                    code,
                    message: message.into(),
                }],
                epoch: self.store.epoch(),
            })
        };
        if self.chunks.is_none() {
            return self.no_files();
        }
        let incoming = data.len() as u64 + 64;
        if let Some(refusal) = self.refuse_bytes(peer, source, incoming) {
            return refusal;
        }
        if !matches!(self.puts.check_key(peer), Ok(()))
            || source.is_some_and(|a| !matches!(self.puts_by_address.check_key(&a), Ok(())))
        {
            return Action::Respond(refuse(
                &self.metrics,
                ErrorCode::RateLimited,
                "too many puts; slow down and retry in a few seconds",
            ));
        }
        let (queue, grant) = match self.route_chunks(&cap) {
            Ok(route) => route,
            Err(RelayToClient::Error { code, message }) => {
                return rejected(&self.metrics, code, &message);
            }
            Err(other) => return Action::Respond(other),
        };
        if expires_at <= now {
            return rejected(
                &self.metrics,
                ErrorCode::Expired,
                "the chunk has expired already",
            );
        }
        if expires_at > now + self.max_ttl + kkachi_protocol::envelope::CLOCK_SKEW_SECS {
            return rejected(
                &self.metrics,
                ErrorCode::ExpiryTooFar,
                "the chunk's expiry is further ahead than this relay keeps anything",
            );
        }
        let _ = self
            .disk_free
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                Some(f.saturating_sub(incoming))
            });
        let epoch = self.store.epoch();
        let share_full = match cap {
            ChunkCap::Write(_) => {
                "the recipient's share of this relay's file storage is full for you; it drains as they fetch"
            }
            ChunkCap::Group(_) => {
                "the group's share of this relay's file storage is full; it drains as files expire"
            }
        };
        self.with_chunk_store(move |chunks, metrics| {
            let outcome = match chunks.put(&queue, &grant, &id, expires_at, &data) {
                // A chunk held already is answered like a new one: whether a copy is
                // still there would tell whether its recipient has fetched it.
                Ok(ChunkPut::Stored | ChunkPut::Duplicate) => PutOutcome::Stored,
                Ok(ChunkPut::WrongId) => PutOutcome::Rejected {
                    code: ErrorCode::Malformed,
                    message: "the chunk does not hash to its id".into(),
                },
                Ok(ChunkPut::WrongSize) => PutOutcome::Rejected {
                    code: ErrorCode::Malformed,
                    message: "a chunk is 4, 16, 64 or 256 KiB and its 16-byte tag".into(),
                },
                Ok(ChunkPut::QuotaExceeded) => PutOutcome::Rejected {
                    code: ErrorCode::QuotaExceeded,
                    message: share_full.into(),
                },
                Ok(ChunkPut::Full) => PutOutcome::Rejected {
                    code: ErrorCode::StorageFull,
                    message: "this relay's file storage is full; try another relay".into(),
                },
                Err(e) => {
                    let (code, message) = store_refusal(&e);
                    PutOutcome::Rejected { code, message }
                }
            };
            if let PutOutcome::Rejected { code, .. } = &outcome {
                metrics
                    .rejections
                    .get_or_create(&Metrics::kind(code.as_str()))
                    .inc();
            }
            RelayToClient::Stored {
                outcomes: vec![outcome],
                epoch,
            }
        })
    }

    /// Opens a queue (subject to the relay's policy) and grants it write capabilities.
    /// Opens `queue` if new and grants it `ids` as capabilities of `kind` (a group
    /// queue is opened with no capability: its key is its only one).
    fn grant(
        &self,
        requester: Source,
        queue: &QueueId,
        kind: QueueKind,
        token: &[u8],
        ids: &[WriteId],
    ) -> Action {
        let queue = *queue;
        if self.disk_low() {
            return Action::Respond(refuse(
                &self.metrics,
                ErrorCode::StorageFull,
                "this relay's disk is nearly full; it takes nothing new for now, try another relay",
            ));
        }
        // Only opening and granting needs the token: puts through a granted key never
        // do, so members stay reachable from outside.
        if self.open_policy == OpenPolicy::Token && !self.tokens.iter().any(|t| t == token) {
            return Action::Respond(refuse(
                &self.metrics,
                ErrorCode::NotAllowed,
                "this relay opens queues only for holders of an access token from its operator",
            ));
        }
        match self.store.has_queue(&queue) {
            Ok(true) => {}
            Ok(false) => {
                if self.store.queue_count() >= self.max_queues {
                    return Action::Respond(refuse(
                        &self.metrics,
                        ErrorCode::StorageFull,
                        "this relay keeps as many queues as its operator allows; use another relay",
                    ));
                }
                if !matches!(self.new_queues.check_key(&requester), Ok(())) {
                    return Action::Respond(refuse(
                        &self.metrics,
                        ErrorCode::RateLimited,
                        "too many new queues from your network address; retry within the hour",
                    ));
                }
            }
            Err(e) => {
                let (code, message) = store_refusal(&e);
                return Action::Respond(refuse(&self.metrics, code, message));
            }
        }
        if let Some(n) = NonZeroU32::new(ids.len() as u32)
            && !matches!(self.grant_ids.check_key_n(&requester, n), Ok(Ok(())))
        {
            return Action::Respond(refuse(
                &self.metrics,
                ErrorCode::RateLimited,
                "too many write keys granted from your network address; retry within the hour",
            ));
        }
        let max = self.grants_per_queue;
        match self.store.grant(&queue, kind, ids, max) {
            Ok(Granted::Held(grants)) => self.once_durable(RelayToClient::Granted { grants }),
            Ok(Granted::Conflict) => Action::Respond(refuse(
                &self.metrics,
                ErrorCode::NotAllowed,
                "one of these write keys is granted to another queue here; choose new keys",
            )),
            Ok(Granted::OtherKind) => Action::Respond(refuse(
                &self.metrics,
                ErrorCode::NotAllowed,
                "this queue is of another kind; choose new keys",
            )),
            Ok(Granted::Full(grants)) => Action::Respond(refuse(
                &self.metrics,
                ErrorCode::QuotaExceeded,
                format!(
                    "this queue already grants {grants} write keys; the relay allows {max}; revoke some first"
                ),
            )),
            Err(e) => {
                let (code, message) = store_refusal(&e);
                Action::Respond(refuse(&self.metrics, code, message))
            }
        }
    }

    /// Answers `response` once everything written so far is durable.
    fn once_durable(&self, response: RelayToClient) -> Action {
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        Action::Later(Box::pin(async move {
            match store.flush().await {
                Ok(()) => response,
                Err(e) => {
                    let (code, message) = store_refusal(&e);
                    refuse(&metrics, code, message)
                }
            }
        }))
    }

    /// A batch after `after`, or an error response.
    pub(crate) fn fetch(&self, mailbox: &QueueId, after: u64, limit: usize) -> RelayToClient {
        let limit = limit.clamp(1, MAX_BATCH_ITEMS);
        match self.store.fetch(mailbox, after, limit, MAX_BATCH_BYTES) {
            Ok(f) => RelayToClient::Batch {
                items: f.items,
                next: f.next,
                more: f.more,
            },
            Err(e) => {
                tracing::error!(error = %e, "fetch failed");
                let (code, message) = store_refusal(&e);
                refuse(&self.metrics, code, message)
            }
        }
    }

    /// The refusal of `incoming` bytes put by `peer` (from `source`), if they may not be
    /// stored at all: the disk is nearly full, or the address has put its share for now.
    /// Envelopes and chunks alike.
    fn refuse_bytes(&self, peer: &PeerId, source: Option<IpAddr>, incoming: u64) -> Option<Action> {
        if self.disk_low() {
            return Some(Action::Respond(refuse(
                &self.metrics,
                ErrorCode::StorageFull,
                "this relay's disk is nearly full; nothing was stored, try another relay",
            )));
        }
        let requester = Source::of(peer, source);
        if let Some(n) = NonZeroU32::new(kib(incoming))
            && !matches!(self.put_kib.check_key_n(&requester, n), Ok(Ok(())))
        {
            return Some(Action::Respond(refuse(
                &self.metrics,
                ErrorCode::RateLimited,
                "your network address has put its share of this relay's storage for now; retry later",
            )));
        }
        None
    }

    /// A Fetch (`wait_ms` 0) or a long poll of `queue`.
    fn read(&self, queue: QueueId, after: u64, limit: usize, wait_ms: u32) -> Action {
        let batch = self.fetch(&queue, after, limit);
        match batch {
            RelayToClient::Batch { ref items, .. } if items.is_empty() && wait_ms > 0 => {
                Action::Wait {
                    mailbox: queue,
                    after,
                    wait_ms: wait_ms.min(MAX_WAIT_MS),
                }
            }
            other => Action::Respond(other),
        }
    }

    /// A Put, or with `group` a PutGroup (each item's key a group queue's).
    fn put(
        &self,
        peer: &PeerId,
        source: Option<IpAddr>,
        items: Vec<Addressed>,
        group: bool,
        now: u64,
    ) -> Action {
        let incoming: u64 = items
            .iter()
            .map(|i| i.envelope.encoded_len() as u64 + 64)
            .sum();
        if let Some(refusal) = self.refuse_bytes(peer, source, incoming) {
            return refusal;
        }
        let requester = Source::of(peer, source);
        let _ = self
            .disk_free
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                Some(f.saturating_sub(2 * incoming))
            });
        let n = NonZeroU32::new(items.len() as u32).unwrap_or(NonZeroU32::MIN);
        if !matches!(self.puts.check_key_n(peer, n), Ok(Ok(()))) {
            tracing::debug!(%peer, "put rate limited");
            return Action::Respond(refuse(
                &self.metrics,
                ErrorCode::RateLimited,
                "too many envelopes from this peer; slow down and retry in a few seconds",
            ));
        }
        if let Some(address) = source
            && !matches!(self.puts_by_address.check_key_n(&address, n), Ok(Ok(())))
        {
            tracing::debug!(%peer, %address, "put rate limited for its address");
            return Action::Respond(refuse(
                &self.metrics,
                ErrorCode::RateLimited,
                "too many envelopes from your network address; slow down and retry in a few seconds",
            ));
        }
        let started = Instant::now();
        let mut outcomes: Vec<Option<PutOutcome>> = Vec::with_capacity(items.len());
        let mut valid = Vec::with_capacity(items.len());
        for item in items {
            match self.admit(requester, item, group, now) {
                Ok(placed) => {
                    outcomes.push(None);
                    valid.push(placed);
                }
                Err((code, message)) => {
                    self.metrics
                        .rejections
                        .get_or_create(&Metrics::kind(code.as_str()))
                        .inc();
                    outcomes.push(Some(PutOutcome::Rejected { code, message }));
                }
            }
        }
        let mut unindexed: Vec<QueueId> = valid
            .iter()
            .map(|p| p.queue)
            .filter(|q| !self.store.is_indexed(q))
            .collect();
        unindexed.sort();
        unindexed.dedup();
        let (store, metrics) = (self.store.clone(), self.metrics.clone());
        if !unindexed.is_empty() {
            // Reading a queue may take a while: not on the node's loop.
            return Action::Deferred(Box::pin(async move {
                let indexed = tokio::task::spawn_blocking({
                    let store = store.clone();
                    move || unindexed.iter().try_for_each(|q| store.index_queue(q))
                })
                .await
                .unwrap_or_else(|_| Err(StoreError::Io("reading a queue failed".into())));
                let stored = indexed.and_then(|()| {
                    if valid.is_empty() {
                        Ok(Vec::new())
                    } else {
                        store.insert(&valid)
                    }
                });
                let mailboxes = with_new_envelopes(&valid, &stored);
                let answer = finish_put(store, metrics, outcomes, stored, started).await;
                (answer, mailboxes)
            }));
        }
        // Inserted now, so long polls can be answered at once; acknowledged once durable.
        let stored = if valid.is_empty() {
            Ok(Vec::new())
        } else {
            self.store.insert(&valid)
        };
        let mailboxes = with_new_envelopes(&valid, &stored);
        let done = Box::pin(finish_put(store, metrics, outcomes, stored, started));
        Action::Put { done, mailboxes }
    }
}

/// The queues that have new envelopes after a put.
fn with_new_envelopes(
    valid: &[Placed],
    stored: &Result<Vec<PutResult>, StoreError>,
) -> Vec<QueueId> {
    let mut mailboxes: Vec<QueueId> = match stored {
        Ok(results) => valid
            .iter()
            .zip(results)
            .filter(|(_, r)| matches!(r, PutResult::Stored { .. }))
            .map(|(e, _)| e.queue)
            .collect(),
        Err(_) => Vec::new(),
    };
    mailboxes.sort();
    mailboxes.dedup();
    mailboxes
}

/// A put's answer, once what it stored is durable.
async fn finish_put<S: MailboxStore>(
    store: S,
    metrics: Metrics,
    outcomes: Vec<Option<PutOutcome>>,
    stored: Result<Vec<PutResult>, StoreError>,
    started: Instant,
) -> RelayToClient {
    let stored = match stored {
        Ok(results) if results.iter().any(PutResult::needs_flush) => {
            store.flush().await.map(|()| results)
        }
        other => other,
    };
    let response = match stored {
        Ok(results) => {
            let mut results = results.into_iter();
            let outcomes = outcomes
                .into_iter()
                .map(|o| o.unwrap_or_else(|| outcome(&metrics, results.next())))
                .collect();
            RelayToClient::Stored {
                outcomes,
                epoch: store.epoch(),
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "put failed");
            let (code, message) = store_refusal(&e);
            refuse(&metrics, code, message)
        }
    };
    metrics
        .put_ack_seconds
        .observe(started.elapsed().as_secs_f64());
    response
}

impl<S: MailboxStore + Clone> Service<S> {
    /// Routes one envelope to its queue and checks it against that queue's rules.
    fn admit(
        &self,
        requester: Source,
        item: Addressed,
        group: bool,
        now: u64,
    ) -> Result<Placed, (ErrorCode, String)> {
        let Addressed { write, envelope } = item;
        let route = if group {
            // A group queue is named by its key; its one capability is the key itself,
            // counted under the queue's own id.
            let queue = GroupKey(write.0).queue();
            match self.store.is_group_queue(&queue) {
                Ok(true) => Ok(Some((queue, QueueKind::Group))),
                Ok(false) => Ok(None),
                Err(e) => Err(e),
            }
        } else {
            self.store.route(&write.id())
        };
        let (queue, kind) = match route {
            Ok(Some(route)) => route,
            Ok(None) if group => {
                return Err((
                    ErrorCode::NoQueue,
                    "no group queue here for this key; open it (OpenGroup) and put again".into(),
                ));
            }
            Ok(None) => {
                return Err((
                    ErrorCode::NoQueue,
                    "no queue on this relay takes this write key; the recipient has not granted it here, or withdrew it"
                        .into(),
                ));
            }
            Err(e) => return Err(store_refusal(&e)),
        };
        let max_ttl = match kind {
            QueueKind::Inbox | QueueKind::Group => self.max_ttl,
            QueueKind::Requests => self.request_max_ttl,
        };
        envelope
            .validate(now, self.max_payload, max_ttl)
            .map_err(|e| (envelope_refusal(&e), e.to_string()))?;
        if kind == QueueKind::Requests
            && !matches!(self.requests_by_source.check_key(&requester), Ok(()))
        {
            return Err((
                ErrorCode::RateLimited,
                "too many contact requests from your network address; wait an hour or ask for another way in"
                    .into(),
            ));
        }
        Ok(Placed {
            queue,
            grant: if group { WriteId(queue.0) } else { write.id() },
            kind,
            envelope,
        })
    }
}

fn outcome(metrics: &Metrics, result: Option<PutResult>) -> PutOutcome {
    let (kind, outcome) = match result {
        Some(PutResult::Stored { .. }) => ("stored", PutOutcome::Stored),
        // Answered like a new envelope: whether a copy is still held would tell the
        // putter whether its recipient has been online.
        Some(PutResult::Duplicate) => ("duplicate", PutOutcome::Stored),
        Some(PutResult::QuotaExceeded) => {
            metrics
                .rejections
                .get_or_create(&Metrics::kind(ErrorCode::QuotaExceeded.as_str()))
                .inc();
            (
                "rejected",
                PutOutcome::Rejected {
                    code: ErrorCode::QuotaExceeded,
                    message: "the recipient's queue on this relay is full for you; it drains as they come online"
                        .into(),
                },
            )
        }
        Some(PutResult::RelayFull) => {
            metrics
                .rejections
                .get_or_create(&Metrics::kind(ErrorCode::StorageFull.as_str()))
                .inc();
            (
                "rejected",
                PutOutcome::Rejected {
                    code: ErrorCode::StorageFull,
                    message: "this relay holds all its operator allows; try another relay".into(),
                },
            )
        }
        None => (
            "rejected",
            PutOutcome::Rejected {
                code: ErrorCode::Internal,
                message: "the store returned fewer results than envelopes".into(),
            },
        ),
    };
    metrics.puts.get_or_create(&Metrics::kind(kind)).inc();
    outcome
}

#[cfg(test)]
mod tests;
