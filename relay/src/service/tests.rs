use super::*;
use crate::store::{Fetched, Limits, MemoryStore, Quota, StoreStats};
use kkachi_protocol::{Envelope, EnvelopeId, ReadKey, WriteKey};
use std::sync::Arc;
use std::time::Duration;

const NOW: u64 = 1_750_000_000;

fn service(config: &Config) -> Service<MemoryStore> {
    Service::new(
        config,
        MemoryStore::new(crate::server::limits(config)),
        Metrics::new(),
    )
}

/// A queue in a test: its read key and one write key.
struct Queue {
    key: ReadKey,
    write: WriteKey,
}

fn queue(n: u8) -> Queue {
    Queue {
        key: ReadKey([n; 32]),
        write: WriteKey([n.wrapping_add(100); 32]),
    }
}

fn envelope(n: u8) -> Envelope {
    Envelope {
        expires_at: NOW + 3600,
        payload: vec![n; 10],
    }
}

fn to(q: &Queue, n: u8) -> Addressed {
    Addressed {
        write: q.write,
        envelope: envelope(n),
    }
}

/// Opens `q` as `kind` with its one write key granted.
async fn open(s: &Service<MemoryStore>, q: &Queue, kind: QueueKind) {
    let grant = ClientToRelay::Grant {
        key: q.key.clone(),
        kind,
        token: Vec::new(),
        write_ids: vec![q.write.id()],
    };
    assert!(matches!(
        run(s, &PeerId::random(), grant).await,
        RelayToClient::Granted { grants: 1 }
    ));
}

async fn run(s: &Service<MemoryStore>, peer: &PeerId, msg: ClientToRelay) -> RelayToClient {
    run_from(s, peer, None, msg).await
}

async fn run_from<S: MailboxStore + Clone>(
    s: &Service<S>,
    peer: &PeerId,
    source: Option<IpAddr>,
    msg: ClientToRelay,
) -> RelayToClient {
    match s.handle(peer, source, Request::Message(msg), NOW) {
        Action::Respond(r) => r,
        Action::Later(done) | Action::Put { done, .. } => done.await,
        Action::Deferred(done) => done.await.0,
        Action::Wait { .. } => RelayToClient::Batch {
            items: vec![],
            next: 0,
            more: false,
        },
    }
}

fn codes(answer: RelayToClient) -> Vec<Option<ErrorCode>> {
    let RelayToClient::Stored { outcomes, .. } = answer else {
        panic!("stored expected, got {answer:?}")
    };
    outcomes
        .iter()
        .map(|o| match o {
            PutOutcome::Rejected { code, .. } => Some(*code),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn put_fetch_delete_conversation() {
    let s = service(&Config::default());
    let q = queue(1);
    open(&s, &q, QueueKind::Inbox).await;
    let (sender, owner) = (PeerId::random(), PeerId::random());
    let put = ClientToRelay::Put {
        items: vec![to(&q, 1), to(&q, 2), to(&q, 1)],
    };
    assert_eq!(
        run(&s, &sender, put).await,
        RelayToClient::Stored {
            outcomes: vec![PutOutcome::Stored; 3],
            epoch: s.store().epoch(),
        },
        "a copy already held is answered like a new one"
    );
    let fetch = |after| ClientToRelay::Fetch {
        key: q.key.clone(),
        after,
        limit: 10,
    };
    let RelayToClient::Batch { items, next, more } = run(&s, &owner, fetch(0)).await else {
        panic!("batch expected")
    };
    assert_eq!(items.len(), 2);
    assert!(!more);
    let ids: Vec<EnvelopeId> = items.iter().map(|i| i.envelope.id()).collect();
    let delete = ClientToRelay::Delete {
        key: q.key.clone(),
        ids,
    };
    assert_eq!(
        run(&s, &owner, delete).await,
        RelayToClient::Deleted { count: 2 }
    );
    let RelayToClient::Batch { items, .. } = run(&s, &owner, fetch(next)).await else {
        panic!("batch expected")
    };
    assert!(items.is_empty());
}

#[tokio::test]
async fn only_granted_write_keys_put_and_only_the_read_key_reads() {
    let s = service(&Config::default());
    let q = queue(1);
    open(&s, &q, QueueKind::Inbox).await;
    let stranger = queue(2);
    let put = ClientToRelay::Put {
        items: vec![to(&stranger, 1), to(&q, 2)],
    };
    assert_eq!(
        codes(run(&s, &PeerId::random(), put).await),
        vec![Some(ErrorCode::NoQueue), None]
    );
    // Another key reads another (empty) queue; the relay never asks who is reading.
    let RelayToClient::Batch { items, .. } = run(
        &s,
        &PeerId::random(),
        ClientToRelay::Fetch {
            key: stranger.key.clone(),
            after: 0,
            limit: 10,
        },
    )
    .await
    else {
        panic!("batch expected")
    };
    assert!(items.is_empty());
    // A revoked key puts no more.
    let revoke = ClientToRelay::Revoke {
        key: q.key.clone(),
        write_ids: vec![q.write.id()],
    };
    assert_eq!(
        run(&s, &PeerId::random(), revoke).await,
        RelayToClient::Granted { grants: 0 }
    );
    let put = ClientToRelay::Put {
        items: vec![to(&q, 3)],
    };
    assert_eq!(
        codes(run(&s, &PeerId::random(), put).await),
        vec![Some(ErrorCode::NoQueue)]
    );
}

#[tokio::test]
async fn bad_envelopes_are_refused_individually() {
    let s = service(&Config::default());
    let q = queue(1);
    open(&s, &q, QueueKind::Inbox).await;
    let mut expired = to(&q, 1);
    expired.envelope.expires_at = NOW - 1;
    let mut far = to(&q, 2);
    far.envelope.expires_at = NOW + 365 * 24 * 3600;
    let mut big = to(&q, 3);
    big.envelope.payload = vec![0; 70_000];
    let put = ClientToRelay::Put {
        items: vec![expired, far, big, to(&q, 4)],
    };
    assert_eq!(
        codes(run(&s, &PeerId::random(), put).await),
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
    config.limits.capability_max_envelopes = 2;
    config.limits.puts_per_sec = 1;
    config.limits.put_burst = 4;
    let s = service(&config);
    let q = queue(1);
    open(&s, &q, QueueKind::Inbox).await;
    let sender = PeerId::random();
    let put = ClientToRelay::Put {
        items: (0..3).map(|n| to(&q, n)).collect(),
    };
    assert_eq!(
        codes(run(&s, &sender, put).await),
        vec![None, None, Some(ErrorCode::QuotaExceeded)]
    );
    // 3 of the burst of 4 are used; 2 more exceed it.
    let put = ClientToRelay::Put {
        items: (5..7).map(|n| to(&q, n)).collect(),
    };
    assert!(matches!(
        run(&s, &sender, put).await,
        RelayToClient::Error {
            code: ErrorCode::RateLimited,
            ..
        }
    ));
    // Another contact of the same queue is not affected by this one's quota.
    let other = Queue {
        key: q.key.clone(),
        write: WriteKey([77; 32]),
    };
    let grant = ClientToRelay::Grant {
        key: q.key.clone(),
        kind: QueueKind::Inbox,
        token: vec![],
        write_ids: vec![other.write.id()],
    };
    assert!(matches!(
        run(&s, &PeerId::random(), grant).await,
        RelayToClient::Granted { grants: 2 }
    ));
    let put = ClientToRelay::Put {
        items: vec![to(&other, 9)],
    };
    assert_eq!(codes(run(&s, &PeerId::random(), put).await), vec![None]);
}

#[tokio::test]
async fn strangers_holding_an_invite_get_a_small_allowance_and_never_touch_a_contacts_room() {
    let mut config = Config::default();
    config.limits.request_put_burst_per_address = 3;
    config.limits.request_max_envelopes = 5;
    config.limits.grants_per_queue = 2;
    config.limits.request_max_ttl_secs = 3600;
    let s = service(&config);
    // One queue: the request capability from the owner's card, and a contact's.
    let requests = queue(1);
    let inbox = Queue {
        key: requests.key.clone(),
        write: WriteKey([2; 32]),
    };
    open(&s, &requests, QueueKind::Requests).await;
    let grant = ClientToRelay::Grant {
        key: inbox.key.clone(),
        kind: QueueKind::Inbox,
        token: vec![],
        write_ids: vec![inbox.write.id()],
    };
    assert!(matches!(
        run(&s, &PeerId::random(), grant).await,
        RelayToClient::Granted { grants: 2 }
    ));
    let address = |n: u8| Some(IpAddr::from([192, 0, 2, n]));
    let put = |items| ClientToRelay::Put { items };
    // One address: three requests, then refused, with a reason.
    let answer = run_from(
        &s,
        &PeerId::random(),
        address(1),
        put((0..4).map(|n| to(&requests, n)).collect()),
    )
    .await;
    assert_eq!(
        codes(answer),
        vec![None, None, None, Some(ErrorCode::RateLimited)]
    );
    // Others fill the request capability's room; it holds five.
    let answer = run_from(
        &s,
        &PeerId::random(),
        address(2),
        put((10..13).map(|n| to(&requests, n)).collect()),
    )
    .await;
    assert_eq!(
        codes(answer),
        vec![None, None, Some(ErrorCode::QuotaExceeded)]
    );
    // A request may not live longer than the request queue keeps anything.
    let mut long = to(&requests, 20);
    long.envelope.expires_at = NOW + 2 * 3600 + CLOCK_SKEW;
    let answer = run_from(&s, &PeerId::random(), address(3), put(vec![long])).await;
    assert_eq!(codes(answer), vec![Some(ErrorCode::ExpiryTooFar)]);
    // The contact's capability is untouched by all of it, from the same address too.
    let answer = run_from(
        &s,
        &PeerId::random(),
        address(1),
        put((30..40).map(|n| to(&inbox, n)).collect()),
    )
    .await;
    assert_eq!(codes(answer), vec![None; 10]);
}

const CLOCK_SKEW: u64 = kkachi_protocol::envelope::CLOCK_SKEW_SECS;

#[tokio::test]
async fn a_relay_for_token_holders_opens_queues_only_for_them_but_takes_puts_from_anyone() {
    let mut config = Config::default();
    config.access.open = OpenPolicy::Token;
    config.access.tokens = vec!["member-7".into()];
    let s = service(&config);
    let q = queue(1);
    let grant = |token: &[u8]| ClientToRelay::Grant {
        key: q.key.clone(),
        kind: QueueKind::Inbox,
        token: token.to_vec(),
        write_ids: vec![q.write.id()],
    };
    let RelayToClient::Error { code, message } = run(&s, &PeerId::random(), grant(b"guess")).await
    else {
        panic!("refusal expected")
    };
    assert_eq!(code, ErrorCode::NotAllowed);
    assert!(message.contains("token"), "{message}");
    assert!(matches!(
        run(&s, &PeerId::random(), grant(b"member-7")).await,
        RelayToClient::Granted { grants: 1 }
    ));
    let put = ClientToRelay::Put {
        items: vec![to(&q, 1)],
    };
    assert_eq!(codes(run(&s, &PeerId::random(), put).await), vec![None]);
}

#[tokio::test]
async fn made_up_identities_share_their_address_limit() {
    let mut config = Config::default();
    config.limits.puts_per_sec = 1;
    config.limits.put_burst = 4;
    config.limits.puts_per_sec_per_address = 1;
    config.limits.put_burst_per_address = 10;
    let s = service(&config);
    let q = queue(1);
    open(&s, &q, QueueKind::Inbox).await;
    let flooder: Option<IpAddr> = Some("192.0.2.7".parse().unwrap());
    let put = |n| ClientToRelay::Put {
        items: vec![to(&q, n)],
    };
    // Ten fresh identities from one address each stay within their own limit,
    // and together use up the address's burst.
    for n in 0..10 {
        let answer = run_from(&s, &PeerId::random(), flooder, put(n)).await;
        assert!(matches!(answer, RelayToClient::Stored { .. }), "{answer:?}");
    }
    let RelayToClient::Error { code, message } =
        run_from(&s, &PeerId::random(), flooder, put(10)).await
    else {
        panic!("the eleventh fresh identity must be refused");
    };
    assert_eq!(code, ErrorCode::RateLimited);
    assert!(message.contains("network address"), "{message}");
    // Someone else, elsewhere, is served.
    let other: Option<IpAddr> = Some("198.51.100.1".parse().unwrap());
    assert!(matches!(
        run_from(&s, &PeerId::random(), other, put(11)).await,
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
        MemoryStore::new(Limits::uniform(Quota {
            max_envelopes: 10,
            max_bytes: 1000,
        })),
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
    let q = queue(1);
    open(&s, &q, QueueKind::Inbox).await;
    let sub = ClientToRelay::Subscribe {
        key: q.key.clone(),
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
            items: vec![to(&q, 1)],
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
    fn insert(&self, envelopes: &[Placed]) -> Result<Vec<PutResult>, StoreError> {
        self.inner.insert(envelopes)
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
    fn fetch(
        &self,
        mailbox: &QueueId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Fetched, StoreError> {
        self.inner.fetch(mailbox, after, limit, max_bytes)
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
        inner: MemoryStore::new(Limits::uniform(quota)),
        gate: gate.clone(),
    };
    let s = Service::new(&Config::default(), store, Metrics::new());
    let (alice, bob) = (queue(1), queue(2));
    for q in [&alice, &bob] {
        let grant = ClientToRelay::Grant {
            key: q.key.clone(),
            kind: QueueKind::Inbox,
            token: vec![],
            write_ids: vec![q.write.id()],
        };
        let peer = PeerId::random();
        gate.add_permits(1);
        assert!(matches!(
            run_from(&s, &peer, None, grant).await,
            RelayToClient::Granted { grants: 1 }
        ));
    }
    let put = |items| Request::Message(ClientToRelay::Put { items });
    let Action::Put { done, mailboxes } = s.handle(
        &PeerId::random(),
        None,
        put(vec![to(&alice, 1), to(&bob, 2), to(&alice, 3)]),
        NOW,
    ) else {
        panic!("a put expected")
    };
    let mut expected = vec![alice.key.queue(), bob.key.queue()];
    expected.sort();
    assert_eq!(mailboxes, expected, "each queue with something new, once");
    // Readable before the flush...
    let RelayToClient::Batch { items, .. } = s.fetch(&alice.key.queue(), 0, 10) else {
        panic!("a batch expected")
    };
    assert_eq!(items.len(), 2);
    // ...but not acknowledged before it.
    let RelayToClient::Stored { outcomes, .. } = answer_after_one_flush(done, &gate).await else {
        panic!("stored expected")
    };
    assert_eq!(outcomes, vec![PutOutcome::Stored; 3]);

    // A duplicate wakes nobody (nothing new) but still waits for a flush.
    let Action::Put { done, mailboxes } =
        s.handle(&PeerId::random(), None, put(vec![to(&bob, 2)]), NOW)
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

#[tokio::test]
async fn puts_and_deletes_naming_a_queue_not_yet_indexed_are_read_off_the_loop() {
    use crate::store::SledStore;
    let dir = tempfile::tempdir().unwrap();
    let config = Config::default();
    let limits = crate::server::limits(&config);
    let (q, env) = (queue(1), envelope(1));
    {
        let store = SledStore::open(dir.path(), limits, 16 << 20, None).unwrap();
        let s = Service::new(&config, store, Metrics::new());
        let grant = ClientToRelay::Grant {
            key: q.key.clone(),
            kind: QueueKind::Inbox,
            token: Vec::new(),
            write_ids: vec![q.write.id()],
        };
        run_from(&s, &PeerId::random(), None, grant).await;
        let put = ClientToRelay::Put {
            items: vec![to(&q, 1)],
        };
        run_from(&s, &PeerId::random(), None, put).await;
    }
    // Reopened with no background walk: the queue is indexed when first named.
    let store = loop {
        let options = crate::store::Options {
            walk: false,
            ..Default::default()
        };
        match SledStore::open_with(dir.path(), limits, 16 << 20, None, options) {
            Ok(store) => break store,
            Err(e) => {
                assert!(e.to_string().contains("lock"), "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let s = Service::new(&config, store.clone(), Metrics::new());
    let peer = PeerId::random();
    let put = ClientToRelay::Put {
        items: vec![to(&q, 1), to(&q, 2)],
    };
    let Action::Deferred(done) = s.handle(&peer, None, Request::Message(put), NOW) else {
        panic!("a put into a queue not indexed yet is carried out off the loop");
    };
    let (answer, woken) = done.await;
    assert!(matches!(answer, RelayToClient::Stored { .. }), "{answer:?}");
    assert_eq!(
        woken,
        vec![q.key.queue()],
        "the new envelope's long polls are answered"
    );
    assert_eq!(
        store.stats().envelopes,
        2,
        "the one held before, found; one new"
    );
    // Indexed now: the next put is answered on the loop.
    let put = ClientToRelay::Put {
        items: vec![to(&q, 3)],
    };
    assert!(matches!(
        s.handle(&peer, None, Request::Message(put), NOW),
        Action::Put { .. }
    ));
    // A delete naming another queue not indexed yet is deferred too.
    let other = queue(2);
    let delete = ClientToRelay::Delete {
        key: other.key.clone(),
        ids: vec![env.id()],
    };
    let Action::Deferred(done) = s.handle(&peer, None, Request::Message(delete), NOW) else {
        panic!("a delete naming a queue not indexed yet is carried out off the loop");
    };
    assert!(matches!(done.await.0, RelayToClient::Deleted { count: 0 }));
    let delete = ClientToRelay::Delete {
        key: q.key.clone(),
        ids: vec![env.id()],
    };
    assert!(matches!(
        run_from(&s, &peer, None, delete).await,
        RelayToClient::Deleted { count: 1 }
    ));
}

mod files {
    use super::*;
    use crate::store::chunks::{ChunkLimits, ChunkStore};
    use kkachi_protocol::file::ChunkId;

    fn with_chunks(dir: &std::path::Path, per_capability: u64) -> Service<MemoryStore> {
        let chunks = ChunkStore::open(
            dir,
            ChunkLimits {
                per_capability,
                per_queue: 1 << 30,
                total: 1 << 30,
            },
        )
        .unwrap();
        service(&Config::default()).with_chunks(Arc::new(chunks))
    }

    fn put_chunk(q: &Queue, data: &[u8], expires_at: u64) -> ClientToRelay {
        ClientToRelay::PutChunk {
            write: q.write,
            expires_at,
            id: ChunkId::of(data),
            data: data.to_vec(),
        }
    }

    #[tokio::test]
    async fn a_contact_puts_a_chunk_the_owner_reads_and_deletes_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = with_chunks(dir.path(), 1 << 20);
        let (q, peer) = (queue(1), PeerId::random());
        open(&s, &q, QueueKind::Inbox).await;
        let data = vec![7u8; 4096 + 16];
        let id = ChunkId::of(&data);
        assert_eq!(
            codes(run(&s, &peer, put_chunk(&q, &data, NOW + 60)).await),
            [None]
        );
        // Again: answered the same, whether held or not.
        assert_eq!(
            codes(run(&s, &peer, put_chunk(&q, &data, NOW + 60)).await),
            [None]
        );
        let has = ClientToRelay::HasChunks {
            write: q.write,
            ids: vec![id, ChunkId([0; 32])],
        };
        assert_eq!(
            run(&s, &peer, has.clone()).await,
            RelayToClient::ChunksHeld {
                held: vec![true, false]
            }
        );
        let get = ClientToRelay::GetChunk {
            key: q.key.clone(),
            id,
        };
        assert_eq!(
            run(&s, &peer, get.clone()).await,
            RelayToClient::Chunk { data: data.clone() }
        );
        let delete = ClientToRelay::DeleteChunks {
            key: q.key.clone(),
            ids: vec![id],
        };
        assert_eq!(
            run(&s, &peer, delete).await,
            RelayToClient::Deleted { count: 1 }
        );
        assert!(matches!(
            run(&s, &peer, get).await,
            RelayToClient::Error {
                code: ErrorCode::NotFound,
                ..
            }
        ));
        assert_eq!(
            s.metrics.chunk_bytes_served.get(),
            data.len() as u64,
            "served bytes are counted"
        );
    }

    #[tokio::test]
    async fn chunks_are_refused_from_strangers_with_wrong_ids_over_quota_or_out_of_time() {
        let dir = tempfile::tempdir().unwrap();
        let s = with_chunks(dir.path(), 8192);
        let peer = PeerId::random();
        let (contact, stranger) = (queue(1), queue(2));
        open(&s, &contact, QueueKind::Inbox).await;
        open(&s, &stranger, QueueKind::Requests).await;
        let data = vec![1u8; 4096 + 16];
        let rejected = |answer: RelayToClient| codes(answer)[0];
        assert_eq!(
            rejected(run(&s, &peer, put_chunk(&stranger, &data, NOW + 60)).await),
            Some(ErrorCode::NotAllowed),
            "strangers holding an invite send no files"
        );
        let mut wrong = put_chunk(&contact, &data, NOW + 60);
        if let ClientToRelay::PutChunk { id, .. } = &mut wrong {
            *id = ChunkId([9; 32]);
        }
        assert_eq!(
            rejected(run(&s, &peer, wrong).await),
            Some(ErrorCode::Malformed)
        );
        assert_eq!(
            rejected(run(&s, &peer, put_chunk(&contact, &data, NOW)).await),
            Some(ErrorCode::Expired)
        );
        assert_eq!(
            rejected(run(&s, &peer, put_chunk(&contact, &data, NOW + 365 * 86_400)).await),
            Some(ErrorCode::ExpiryTooFar)
        );
        for n in 2..4u8 {
            let d = vec![n; 4096 + 16];
            let answer = run(&s, &peer, put_chunk(&contact, &d, NOW + 60)).await;
            let expected = if n == 2 {
                None
            } else {
                Some(ErrorCode::QuotaExceeded)
            };
            assert_eq!(rejected(answer), expected, "chunk {n}");
        }
        // Another capability's chunks are not its to know of.
        let other = Queue {
            key: contact.key.clone(),
            write: WriteKey([77; 32]),
        };
        let grant = ClientToRelay::Grant {
            key: contact.key.clone(),
            kind: QueueKind::Inbox,
            token: Vec::new(),
            write_ids: vec![other.write.id()],
        };
        run(&s, &peer, grant).await;
        let has = ClientToRelay::HasChunks {
            write: other.write,
            ids: vec![ChunkId::of(&vec![2u8; 4096 + 16])],
        };
        assert_eq!(
            run(&s, &peer, has).await,
            RelayToClient::ChunksHeld { held: vec![false] }
        );
    }

    #[tokio::test]
    async fn a_group_queue_takes_chunks_by_its_key_alone_and_no_read_or_write_key_reaches_them() {
        use kkachi_protocol::GroupKey;
        let dir = tempfile::tempdir().unwrap();
        let s = with_chunks(dir.path(), 8192);
        let key = GroupKey([5; 32]);
        let (alice, bob) = (PeerId::random(), PeerId::random());
        let data = vec![3u8; 4096 + 16];
        let id = ChunkId::of(&data);
        let put = |data: &[u8], expires_at| ClientToRelay::PutGroupChunk {
            key,
            expires_at,
            id: ChunkId::of(data),
            data: data.to_vec(),
        };
        let rejected = |answer: RelayToClient| codes(answer)[0];
        // Nothing goes into a group queue nobody opened.
        assert_eq!(
            rejected(run(&s, &alice, put(&data, NOW + 60)).await),
            Some(ErrorCode::NoQueue)
        );
        let open = ClientToRelay::OpenGroup {
            key,
            token: Vec::new(),
        };
        run(&s, &alice, open).await;
        assert_eq!(rejected(run(&s, &alice, put(&data, NOW + 60)).await), None);
        assert_eq!(
            rejected(run(&s, &alice, put(&data, NOW + 365 * 86_400)).await),
            Some(ErrorCode::ExpiryTooFar)
        );
        // Every member holds the key: any of them reads it, and asks what is held.
        let has = ClientToRelay::HasGroupChunks {
            key,
            ids: vec![id, ChunkId([0; 32])],
        };
        assert_eq!(
            run(&s, &bob, has).await,
            RelayToClient::ChunksHeld {
                held: vec![true, false]
            }
        );
        let get = ClientToRelay::GetGroupChunk { key, id };
        assert_eq!(
            run(&s, &bob, get.clone()).await,
            RelayToClient::Chunk { data: data.clone() }
        );
        // The key as a read key names another queue: it neither reads nor deletes the
        // group's chunks, and as a write key it puts nothing.
        let as_read = ReadKey(key.0);
        assert!(matches!(
            run(
                &s,
                &bob,
                ClientToRelay::GetChunk {
                    key: as_read.clone(),
                    id
                }
            )
            .await,
            RelayToClient::Error {
                code: ErrorCode::NotFound,
                ..
            }
        ));
        assert_eq!(
            run(
                &s,
                &bob,
                ClientToRelay::DeleteChunks {
                    key: as_read,
                    ids: vec![id]
                }
            )
            .await,
            RelayToClient::Deleted { count: 0 }
        );
        let as_write = Queue {
            key: ReadKey([6; 32]),
            write: WriteKey(key.0),
        };
        assert_eq!(
            rejected(run(&s, &bob, put_chunk(&as_write, &data, NOW + 60)).await),
            Some(ErrorCode::NoQueue)
        );
        assert_eq!(
            run(&s, &alice, get).await,
            RelayToClient::Chunk { data: data.clone() },
            "still there for every member"
        );
        // The group's share is the queue's, whoever puts.
        let more = vec![4u8; 4096 + 16];
        let answer = run(&s, &bob, put(&more, NOW + 60)).await;
        assert!(
            matches!(&answer, RelayToClient::Stored { outcomes, .. } if matches!(&outcomes[0], PutOutcome::Rejected { code: ErrorCode::QuotaExceeded, message } if message.contains("group"))),
            "{answer:?}"
        );
    }

    #[tokio::test]
    async fn a_relay_that_stores_no_files_says_so() {
        let s = service(&Config::default());
        let q = queue(1);
        open(&s, &q, QueueKind::Inbox).await;
        let answer = run(&s, &PeerId::random(), put_chunk(&q, b"x", NOW + 60)).await;
        assert!(
            matches!(answer, RelayToClient::Error { code: ErrorCode::NotAllowed, ref message } if message.contains("stores no files")),
            "{answer:?}"
        );
    }
}

#[tokio::test]
async fn a_group_queue_is_opened_read_and_put_by_its_key_alone_and_emptied_by_none() {
    use kkachi_protocol::GroupKey;
    let s = service(&Config::default());
    let key = GroupKey([7; 32]);
    let (alice, bob) = (PeerId::random(), PeerId::random());
    let put = |n: u8| ClientToRelay::PutGroup {
        items: vec![Addressed {
            write: WriteKey(key.0),
            envelope: envelope(n),
        }],
    };
    // Nothing goes into a group queue nobody opened.
    assert_eq!(
        codes(run(&s, &alice, put(1)).await),
        vec![Some(ErrorCode::NoQueue)]
    );
    let open = ClientToRelay::OpenGroup {
        key,
        token: Vec::new(),
    };
    assert!(matches!(
        run(&s, &alice, open.clone()).await,
        RelayToClient::Granted { grants: 0 }
    ));
    // Opening it again is harmless (every member may).
    assert!(matches!(
        run(&s, &bob, open).await,
        RelayToClient::Granted { grants: 0 }
    ));
    assert_eq!(codes(run(&s, &alice, put(1)).await), vec![None]);
    assert_eq!(codes(run(&s, &bob, put(2)).await), vec![None]);
    let read = |wait_ms| ClientToRelay::ReadGroup {
        key,
        after: 0,
        limit: 10,
        wait_ms,
    };
    let RelayToClient::Batch { items, .. } = run(&s, &bob, read(0)).await else {
        panic!("batch expected")
    };
    assert_eq!(items.len(), 2);
    let ids: Vec<EnvelopeId> = items.iter().map(|i| i.envelope.id()).collect();
    // The group key, taken as a read or write key, reaches nothing: no one can delete
    // from the group queue, revoke anything on it, open it as another kind, or put
    // into it through a grant.
    let as_read = ReadKey(key.0);
    let delete = ClientToRelay::Delete {
        key: as_read.clone(),
        ids: ids.clone(),
    };
    assert_eq!(
        run(&s, &bob, delete).await,
        RelayToClient::Deleted { count: 0 }
    );
    let hijack = ClientToRelay::Grant {
        key: as_read.clone(),
        kind: QueueKind::Inbox,
        token: Vec::new(),
        write_ids: vec![WriteKey(key.0).id()],
    };
    assert!(matches!(
        run(&s, &bob, hijack).await,
        RelayToClient::Granted { grants: 1 }
    ));
    // That grant opened some other queue: the group's puts still land in the group's.
    assert_eq!(codes(run(&s, &alice, put(3)).await), vec![None]);
    let RelayToClient::Batch { items, .. } = run(&s, &alice, read(0)).await else {
        panic!("batch expected")
    };
    assert_eq!(items.len(), 3, "nothing was taken away or diverted");
    // A grant of the group kind is no request at all.
    let group_grant = ClientToRelay::Grant {
        key: ReadKey([8; 32]),
        kind: QueueKind::Group,
        token: Vec::new(),
        write_ids: vec![],
    };
    assert!(matches!(
        run(&s, &bob, group_grant).await,
        RelayToClient::Error {
            code: ErrorCode::Malformed,
            ..
        }
    ));
    // A long poll of the group queue waits like a Subscribe.
    let after = ClientToRelay::ReadGroup {
        key,
        after: u64::MAX - 1,
        limit: 10,
        wait_ms: 1_000,
    };
    assert!(matches!(
        s.handle(&bob, None, Request::Message(after), NOW),
        Action::Wait { .. }
    ));
}

#[tokio::test]
async fn a_relay_for_token_holders_opens_group_queues_only_for_them() {
    use kkachi_protocol::GroupKey;
    let mut config = Config::default();
    config.access.open = OpenPolicy::Token;
    config.access.tokens = vec!["member-token".into()];
    let s = service(&config);
    let open = |token: &str| ClientToRelay::OpenGroup {
        key: GroupKey([9; 32]),
        token: token.as_bytes().to_vec(),
    };
    assert!(matches!(
        run(&s, &PeerId::random(), open("")).await,
        RelayToClient::Error {
            code: ErrorCode::NotAllowed,
            ..
        }
    ));
    assert!(matches!(
        run(&s, &PeerId::random(), open("member-token")).await,
        RelayToClient::Granted { grants: 0 }
    ));
}
