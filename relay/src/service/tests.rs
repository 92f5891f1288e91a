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
    let RelayToClient::Batch { items, .. } = s.fetch(&MailboxId::for_peer(&alice), 0, 10) else {
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
