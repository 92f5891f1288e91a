//! What the relay does with each request, independent of libp2p: validation, access
//! control, rate limits, and calls into the store. The node (`node.rs`) turns its
//! [`Action`]s into responses on streams.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Instant;

use futures::future::BoxFuture;
use governor::{DefaultKeyedRateLimiter, Quota as RateQuota, RateLimiter};
use kkachi_protocol::envelope::EnvelopeError;
use kkachi_protocol::wire::{
    MAX_BATCH_BYTES, MAX_BATCH_ITEMS, MAX_WAIT_MS, PROTOCOL_VERSION, PutOutcome,
};
use kkachi_protocol::{
    ClientToRelay, Envelope, ErrorCode, MailboxId, Multiaddr, PeerId, RelayInfo, RelayToClient,
};
use libp2p::multiaddr::Protocol;

use crate::config::Config;
use crate::framing::Request;
use crate::metrics::Metrics;
use crate::store::{MailboxStore, PutResult, StoreError};

/// What the node should do with a request.
pub(crate) enum Action {
    /// Answer now.
    Respond(RelayToClient),
    /// The put is stored (visible, not yet durable): answer when it is durable.
    Put {
        /// Resolves to the answer once the envelopes are flushed.
        done: BoxFuture<'static, RelayToClient>,
        /// Mailboxes that have new envelopes now: their long polls can be answered
        /// before the flush, since the sender's copy stays in its outbox until the
        /// acknowledgement and the recipient drops duplicates.
        mailboxes: Vec<MailboxId>,
    },
    /// Nothing yet: park the long poll until something arrives or `wait_ms` passes.
    Wait {
        mailbox: MailboxId,
        after: u64,
        wait_ms: u32,
    },
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Respond(r) => f.debug_tuple("Respond").field(r).finish(),
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
    puts: DefaultKeyedRateLimiter<PeerId>,
    /// The same, shared by every peer connecting from one address.
    puts_by_address: DefaultKeyedRateLimiter<IpAddr>,
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
        Self {
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
                mailbox_max_envelopes: l.mailbox_max_envelopes.min(u64::from(u32::MAX)) as u32,
                mailbox_max_bytes: l.mailbox_max_bytes,
                puts_per_sec: l.puts_per_sec,
            },
            max_payload: l.max_payload,
            max_ttl: l.max_ttl_secs,
            puts: RateLimiter::keyed(RateQuota::per_second(rate).allow_burst(burst)),
            puts_by_address: RateLimiter::keyed(
                RateQuota::per_second(address_rate).allow_burst(address_burst),
            ),
        }
    }

    pub(crate) fn store(&self) -> &S {
        &self.store
    }

    /// Forgets rate-limiter state of peers that have been quiet (bounds its memory).
    pub(crate) fn prune(&self) {
        self.puts.retain_recent();
        self.puts.shrink_to_fit();
        self.puts_by_address.retain_recent();
        self.puts_by_address.shrink_to_fit();
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
        };
        self.metrics
            .requests
            .get_or_create(&Metrics::kind(kind))
            .inc();
        match msg {
            ClientToRelay::Put { envelopes } => self.put(peer, source, envelopes, now),
            ClientToRelay::Info => Action::Respond(RelayToClient::Info(self.info.clone())),
            ClientToRelay::Fetch {
                mailbox,
                after,
                limit,
            } => {
                if let Some(refusal) = self.refuse_unless_owner(peer, &mailbox) {
                    return Action::Respond(refusal);
                }
                Action::Respond(self.fetch(&mailbox, after, usize::from(limit)))
            }
            ClientToRelay::Subscribe {
                mailbox,
                after,
                wait_ms,
            } => {
                if let Some(refusal) = self.refuse_unless_owner(peer, &mailbox) {
                    return Action::Respond(refusal);
                }
                let batch = self.fetch(&mailbox, after, MAX_BATCH_ITEMS);
                match batch {
                    RelayToClient::Batch { ref items, .. } if items.is_empty() && wait_ms > 0 => {
                        Action::Wait {
                            mailbox,
                            after,
                            wait_ms: wait_ms.min(MAX_WAIT_MS),
                        }
                    }
                    other => Action::Respond(other),
                }
            }
            ClientToRelay::Delete { mailbox, ids } => {
                if let Some(refusal) = self.refuse_unless_owner(peer, &mailbox) {
                    return Action::Respond(refusal);
                }
                Action::Respond(match self.store.delete(&mailbox, &ids) {
                    Ok(count) => RelayToClient::Deleted { count },
                    Err(e) => {
                        let (code, message) = store_refusal(&e);
                        refuse(&self.metrics, code, message)
                    }
                })
            }
        }
    }

    /// The refusal to send if `peer` does not own `mailbox`.
    fn refuse_unless_owner(&self, peer: &PeerId, mailbox: &MailboxId) -> Option<RelayToClient> {
        if MailboxId::for_peer(peer) == *mailbox {
            return None;
        }
        tracing::debug!(%peer, %mailbox, "refused access to another peer's mailbox");
        Some(refuse(
            &self.metrics,
            ErrorCode::NotOwner,
            "only the mailbox owner may read or delete; connect with the identity the mailbox belongs to",
        ))
    }

    /// A batch after `after`, or an error response.
    pub(crate) fn fetch(&self, mailbox: &MailboxId, after: u64, limit: usize) -> RelayToClient {
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

    fn put(
        &self,
        peer: &PeerId,
        source: Option<IpAddr>,
        envelopes: Vec<Envelope>,
        now: u64,
    ) -> Action {
        let n = NonZeroU32::new(envelopes.len() as u32).unwrap_or(NonZeroU32::MIN);
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
        let mut outcomes: Vec<Option<PutOutcome>> = Vec::with_capacity(envelopes.len());
        let mut valid = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            match envelope.validate(now, self.max_payload, self.max_ttl) {
                Ok(()) => {
                    outcomes.push(None);
                    valid.push(envelope);
                }
                Err(e) => {
                    let code = envelope_refusal(&e);
                    self.metrics
                        .rejections
                        .get_or_create(&Metrics::kind(code.as_str()))
                        .inc();
                    outcomes.push(Some(PutOutcome::Rejected {
                        code,
                        message: e.to_string(),
                    }));
                }
            }
        }
        // Inserted now, so long polls can be answered at once; acknowledged once durable.
        let stored = if valid.is_empty() {
            Ok(Vec::new())
        } else {
            self.store.insert(&valid)
        };
        let mut mailboxes: Vec<MailboxId> = match &stored {
            Ok(results) => valid
                .iter()
                .zip(results)
                .filter(|(_, r)| matches!(r, PutResult::Stored { .. }))
                .map(|(e, _)| e.mailbox)
                .collect(),
            Err(_) => Vec::new(),
        };
        mailboxes.sort();
        mailboxes.dedup();
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let done = Box::pin(async move {
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
                    RelayToClient::Stored { outcomes }
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
        });
        Action::Put { done, mailboxes }
    }
}

fn outcome(metrics: &Metrics, result: Option<PutResult>) -> PutOutcome {
    let (kind, outcome) = match result {
        Some(PutResult::Stored { .. }) => ("stored", PutOutcome::Stored),
        Some(PutResult::Duplicate) => ("duplicate", PutOutcome::Duplicate),
        Some(PutResult::QuotaExceeded) => {
            metrics
                .rejections
                .get_or_create(&Metrics::kind(ErrorCode::QuotaExceeded.as_str()))
                .inc();
            (
                "rejected",
                PutOutcome::Rejected {
                    code: ErrorCode::QuotaExceeded,
                    message: "the recipient's mailbox on this relay is full; it drains as they come online"
                        .into(),
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
mod tests {
    use super::*;
    use crate::store::{MemoryStore, Quota};
    use kkachi_protocol::EnvelopeId;
    use std::sync::Arc;
    use std::time::Duration;

    const NOW: u64 = 1_750_000_000;

    fn service(config: &Config) -> Service<MemoryStore> {
        let quota = Quota {
            max_envelopes: config.limits.mailbox_max_envelopes,
            max_bytes: config.limits.mailbox_max_bytes,
        };
        Service::new(config, MemoryStore::new(quota), Metrics::new())
    }

    fn envelope(to: &PeerId, n: u8) -> Envelope {
        Envelope {
            mailbox: MailboxId::for_peer(to),
            expires_at: NOW + 3600,
            payload: vec![n; 10],
        }
    }

    async fn run(s: &Service<MemoryStore>, peer: &PeerId, msg: ClientToRelay) -> RelayToClient {
        run_from(s, peer, None, msg).await
    }

    async fn run_from(
        s: &Service<MemoryStore>,
        peer: &PeerId,
        source: Option<IpAddr>,
        msg: ClientToRelay,
    ) -> RelayToClient {
        match s.handle(peer, source, Request::Message(msg), NOW) {
            Action::Respond(r) => r,
            Action::Put { done, .. } => done.await,
            Action::Wait { .. } => RelayToClient::Batch {
                items: vec![],
                next: 0,
                more: false,
            },
        }
    }

    #[tokio::test]
    async fn put_fetch_delete_conversation() {
        let s = service(&Config::default());
        let sender = PeerId::random();
        let owner = PeerId::random();
        let mailbox = MailboxId::for_peer(&owner);
        let put = ClientToRelay::Put {
            envelopes: vec![
                envelope(&owner, 1),
                envelope(&owner, 2),
                envelope(&owner, 1),
            ],
        };
        assert_eq!(
            run(&s, &sender, put).await,
            RelayToClient::Stored {
                outcomes: vec![
                    PutOutcome::Stored,
                    PutOutcome::Stored,
                    PutOutcome::Duplicate
                ]
            }
        );
        let RelayToClient::Batch { items, next, more } = run(
            &s,
            &owner,
            ClientToRelay::Fetch {
                mailbox,
                after: 0,
                limit: 10,
            },
        )
        .await
        else {
            panic!("batch expected")
        };
        assert_eq!(items.len(), 2);
        assert!(!more);
        let ids: Vec<EnvelopeId> = items.iter().map(|i| i.envelope.id()).collect();
        assert_eq!(
            run(&s, &owner, ClientToRelay::Delete { mailbox, ids }).await,
            RelayToClient::Deleted { count: 2 }
        );
        let RelayToClient::Batch { items, .. } = run(
            &s,
            &owner,
            ClientToRelay::Fetch {
                mailbox,
                after: next,
                limit: 10,
            },
        )
        .await
        else {
            panic!("batch expected")
        };
        assert!(items.is_empty());
    }

    #[tokio::test]
    async fn only_the_owner_reads_or_deletes() {
        let s = service(&Config::default());
        let owner = PeerId::random();
        let stranger = PeerId::random();
        let mailbox = MailboxId::for_peer(&owner);
        for msg in [
            ClientToRelay::Fetch {
                mailbox,
                after: 0,
                limit: 10,
            },
            ClientToRelay::Subscribe {
                mailbox,
                after: 0,
                wait_ms: 1000,
            },
            ClientToRelay::Delete {
                mailbox,
                ids: vec![],
            },
        ] {
            assert!(matches!(
                run(&s, &stranger, msg).await,
                RelayToClient::Error {
                    code: ErrorCode::NotOwner,
                    ..
                }
            ));
        }
    }

    #[tokio::test]
    async fn bad_envelopes_are_refused_individually() {
        let s = service(&Config::default());
        let to = PeerId::random();
        let mut expired = envelope(&to, 1);
        expired.expires_at = NOW - 1;
        let mut far = envelope(&to, 2);
        far.expires_at = NOW + 365 * 24 * 3600;
        let mut big = envelope(&to, 3);
        big.payload = vec![0; 70_000];
        let put = ClientToRelay::Put {
            envelopes: vec![expired, far, big, envelope(&to, 4)],
        };
        let RelayToClient::Stored { outcomes } = run(&s, &PeerId::random(), put).await else {
            panic!("stored expected")
        };
        let codes: Vec<_> = outcomes
            .iter()
            .map(|o| match o {
                PutOutcome::Rejected { code, .. } => Some(*code),
                _ => None,
            })
            .collect();
        assert_eq!(
            codes,
            vec![
                Some(ErrorCode::Expired),
                Some(ErrorCode::ExpiryTooFar),
                Some(ErrorCode::TooLarge),
                None
            ]
        );
    }

    #[tokio::test]
    async fn quota_and_rate_limit_answer_with_errors() {
        let mut config = Config::default();
        config.limits.mailbox_max_envelopes = 2;
        config.limits.puts_per_sec = 1;
        config.limits.put_burst = 4;
        let s = service(&config);
        let to = PeerId::random();
        let sender = PeerId::random();
        let put = ClientToRelay::Put {
            envelopes: (0..3).map(|n| envelope(&to, n)).collect(),
        };
        let RelayToClient::Stored { outcomes } = run(&s, &sender, put).await else {
            panic!("stored expected")
        };
        assert!(matches!(
            outcomes[2],
            PutOutcome::Rejected {
                code: ErrorCode::QuotaExceeded,
                ..
            }
        ));
        // 3 of the burst of 4 are used; 2 more exceed it.
        let put = ClientToRelay::Put {
            envelopes: (5..7).map(|n| envelope(&to, n)).collect(),
        };
        assert!(matches!(
            run(&s, &sender, put).await,
            RelayToClient::Error {
                code: ErrorCode::RateLimited,
                ..
            }
        ));
        // Another peer is not affected by this one's rate.
        let put = ClientToRelay::Put {
            envelopes: vec![envelope(&PeerId::random(), 9)],
        };
        assert!(matches!(
            run(&s, &PeerId::random(), put).await,
            RelayToClient::Stored { .. }
        ));
    }

    #[tokio::test]
    async fn made_up_identities_share_their_address_limit() {
        let mut config = Config::default();
        config.limits.puts_per_sec = 1;
        config.limits.put_burst = 4;
        config.limits.puts_per_sec_per_address = 1;
        config.limits.put_burst_per_address = 10;
        let s = service(&config);
        let flooder: Option<IpAddr> = Some("192.0.2.7".parse().unwrap());
        let put = || ClientToRelay::Put {
            envelopes: vec![envelope(&PeerId::random(), 1)],
        };
        // Ten fresh identities from one address each stay within their own limit,
        // and together use up the address's burst.
        for _ in 0..10 {
            let answer = run_from(&s, &PeerId::random(), flooder, put()).await;
            assert!(matches!(answer, RelayToClient::Stored { .. }), "{answer:?}");
        }
        let RelayToClient::Error { code, message } =
            run_from(&s, &PeerId::random(), flooder, put()).await
        else {
            panic!("the eleventh fresh identity must be refused");
        };
        assert_eq!(code, ErrorCode::RateLimited);
        assert!(message.contains("network address"), "{message}");
        // Someone else, elsewhere, is served.
        let other: Option<IpAddr> = Some("198.51.100.1".parse().unwrap());
        assert!(matches!(
            run_from(&s, &PeerId::random(), other, put()).await,
            RelayToClient::Stored { .. }
        ));
    }

    #[test]
    fn puts_count_under_the_ipv4_address_or_the_ipv6_64() {
        let addr = |s: &str| s.parse::<Multiaddr>().unwrap();
        assert_eq!(
            source_address(&addr("/ip4/203.0.113.9/tcp/4001")),
            Some("203.0.113.9".parse().unwrap())
        );
        assert_eq!(
            source_address(&addr("/ip6/2001:db8:1:2:aaaa:bbbb:cccc:dddd/udp/1/quic-v1")),
            Some("2001:db8:1:2::".parse().unwrap())
        );
        assert_eq!(
            source_address(&addr("/ip6/2001:db8:1:2::9/tcp/1")),
            source_address(&addr("/ip6/2001:db8:1:2:ffff::1/tcp/2")),
        );
        let relayed = format!(
            "/ip4/203.0.113.9/tcp/4001/p2p/{}/p2p-circuit",
            PeerId::random()
        );
        assert_eq!(source_address(&addr(&relayed)), None);
    }

    #[tokio::test]
    async fn malformed_requests_get_an_error_and_a_metric() {
        let metrics = Metrics::new();
        let s = Service::new(
            &Config::default(),
            MemoryStore::new(Quota {
                max_envelopes: 10,
                max_bytes: 1000,
            }),
            metrics.clone(),
        );
        let decode_error = kkachi_protocol::DecodeError::TrailingBytes(3);
        let Action::Respond(RelayToClient::Error { code, message }) = s.handle(
            &PeerId::random(),
            None,
            Request::Malformed(decode_error),
            NOW,
        ) else {
            panic!("error expected")
        };
        assert_eq!(code, ErrorCode::Malformed);
        assert!(message.contains("trailing"));
        assert!(
            metrics
                .render()
                .contains("kkachi_rejections_total{kind=\"malformed\"} 1")
        );
    }

    #[tokio::test]
    async fn empty_subscribe_waits_and_nonempty_answers() {
        let s = service(&Config::default());
        let owner = PeerId::random();
        let mailbox = MailboxId::for_peer(&owner);
        let sub = ClientToRelay::Subscribe {
            mailbox,
            after: 0,
            wait_ms: 120_000,
        };
        assert!(matches!(
            s.handle(&owner, None, Request::Message(sub.clone()), NOW),
            Action::Wait {
                wait_ms: MAX_WAIT_MS,
                ..
            }
        ));
        run(
            &s,
            &PeerId::random(),
            ClientToRelay::Put {
                envelopes: vec![envelope(&owner, 1)],
            },
        )
        .await;
        assert!(matches!(
            s.handle(&owner, None, Request::Message(sub), NOW),
            Action::Respond(RelayToClient::Batch { .. })
        ));
    }

    /// A memory store whose flushes wait until the test opens the gate.
    #[derive(Clone)]
    struct GatedStore {
        inner: MemoryStore,
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl MailboxStore for GatedStore {
        fn insert(&self, envelopes: &[Envelope]) -> Result<Vec<PutResult>, StoreError> {
            self.inner.insert(envelopes)
        }
        fn fetch(
            &self,
            mailbox: &MailboxId,
            after: u64,
            limit: usize,
            max_bytes: usize,
        ) -> Result<crate::store::Fetched, StoreError> {
            self.inner.fetch(mailbox, after, limit, max_bytes)
        }
        fn delete(&self, mailbox: &MailboxId, ids: &[EnvelopeId]) -> Result<u32, StoreError> {
            self.inner.delete(mailbox, ids)
        }
        fn expire(&self, now: u64, max: usize) -> Result<usize, StoreError> {
            self.inner.expire(now, max)
        }
        fn stats(&self) -> crate::store::StoreStats {
            self.inner.stats()
        }
        async fn flush(&self) -> Result<(), StoreError> {
            // One permit per flush: used up, not handed back.
            self.gate.acquire().await.expect("gate open").forget();
            Ok(())
        }
    }

    #[tokio::test]
    async fn long_polls_see_a_put_before_it_is_durable_and_the_ack_waits_for_the_flush() {
        let quota = Quota {
            max_envelopes: 10,
            max_bytes: 1 << 20,
        };
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let store = GatedStore {
            inner: MemoryStore::new(quota),
            gate: gate.clone(),
        };
        let s = Service::new(&Config::default(), store, Metrics::new());
        let (alice, bob) = (PeerId::random(), PeerId::random());
        let put = |envelopes| Request::Message(ClientToRelay::Put { envelopes });
        let Action::Put { done, mailboxes } = s.handle(
            &PeerId::random(),
            None,
            put(vec![
                envelope(&alice, 1),
                envelope(&bob, 2),
                envelope(&alice, 3),
            ]),
            NOW,
        ) else {
            panic!("a put expected")
        };
        let mut expected = vec![MailboxId::for_peer(&alice), MailboxId::for_peer(&bob)];
        expected.sort();
        assert_eq!(mailboxes, expected, "each mailbox with something new, once");
        // Readable before the flush...
        let RelayToClient::Batch { items, .. } = s.fetch(&MailboxId::for_peer(&alice), 0, 10)
        else {
            panic!("a batch expected")
        };
        assert_eq!(items.len(), 2);
        // ...but not acknowledged before it.
        let RelayToClient::Stored { outcomes } = answer_after_one_flush(done, &gate).await else {
            panic!("stored expected")
        };
        assert_eq!(outcomes, vec![PutOutcome::Stored; 3]);

        // A duplicate wakes nobody (nothing new) but still waits for a flush.
        let Action::Put { done, mailboxes } =
            s.handle(&PeerId::random(), None, put(vec![envelope(&bob, 2)]), NOW)
        else {
            panic!("a put expected")
        };
        assert!(mailboxes.is_empty());
        assert!(matches!(
            answer_after_one_flush(done, &gate).await,
            RelayToClient::Stored { .. }
        ));
    }

    /// The answer of a put, checking it does not come before the gated store lets one
    /// flush through.
    async fn answer_after_one_flush(
        done: BoxFuture<'static, RelayToClient>,
        gate: &tokio::sync::Semaphore,
    ) -> RelayToClient {
        let mut done = std::pin::pin!(done);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), done.as_mut())
                .await
                .is_err(),
            "acknowledged before the flush"
        );
        gate.add_permits(1);
        done.await
    }
}
