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
mod tests;
