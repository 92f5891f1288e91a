//! One behavioural suite run against both stores, plus sled-only durability tests.

use std::sync::Arc;

use super::*;

const QUOTA: Limits = Limits {
    queue: Quota {
        max_envelopes: 5,
        max_bytes: 10_000,
    },
    capability: Quota {
        max_envelopes: 5,
        max_bytes: 10_000,
    },
    requests: Quota {
        max_envelopes: 2,
        max_bytes: 10_000,
    },
    total: Quota {
        max_envelopes: 1_000,
        max_bytes: 1 << 30,
    },
};

/// Envelope `n` for queue `mailbox`, put through the capability of the same number.
fn env(mailbox: u8, n: u32, expires_at: u64) -> Placed {
    Placed {
        queue: QueueId([mailbox; 32]),
        grant: WriteId([mailbox; 32]),
        kind: QueueKind::Inbox,
        envelope: envelope(n, expires_at),
    }
}

fn envelope(n: u32, expires_at: u64) -> Envelope {
    Envelope {
        expires_at,
        payload: n.to_be_bytes().repeat(4),
    }
}

/// Every envelope held in `mailbox`, in cursor order.
fn held<S: MailboxStore>(store: &S, mailbox: &QueueId) -> Vec<Envelope> {
    let page = store.fetch(mailbox, 0, usize::MAX, usize::MAX).unwrap();
    assert!(!page.more);
    page.items.into_iter().map(|i| i.envelope).collect()
}

async fn suite<S: MailboxStore>(store: S) {
    let m1 = QueueId([1; 32]);
    // put, dedup within and across batches
    let r = store
        .put(vec![env(1, 1, 100), env(1, 2, 200), env(1, 1, 100)])
        .await
        .unwrap();
    assert!(matches!(r[0], PutResult::Stored { .. }));
    assert!(matches!(r[1], PutResult::Stored { .. }));
    assert_eq!(r[2], PutResult::Duplicate);
    assert_eq!(
        store.put(vec![env(1, 2, 200)]).await.unwrap(),
        vec![PutResult::Duplicate]
    );
    assert_eq!(store.stats().envelopes, 2);
    assert_eq!(store.stats().mailboxes, 1);

    // fetch after cursor, in order, with limit and `more`
    let page = store.fetch(&m1, 0, 1, usize::MAX).unwrap();
    assert_eq!(page.items.len(), 1);
    assert!(page.more);
    assert_eq!(page.items[0].envelope, envelope(1, 100));
    let page2 = store.fetch(&m1, page.next, 10, usize::MAX).unwrap();
    assert_eq!(page2.items.len(), 1);
    assert!(!page2.more);
    assert_eq!(page2.items[0].envelope, envelope(2, 200));
    assert!(page2.next > page.next);
    let empty = store.fetch(&m1, page2.next, 10, usize::MAX).unwrap();
    assert!(empty.items.is_empty());
    assert_eq!(empty.next, page2.next);
    // other mailboxes are separate
    assert!(held(&store, &QueueId([2; 32])).is_empty());
    // the byte budget still returns at least one envelope
    assert_eq!(store.fetch(&m1, 0, 10, 1).unwrap().items.len(), 1);

    // delete only from the named mailbox
    let id1 = envelope(1, 100).id();
    assert_eq!(store.delete(&QueueId([2; 32]), &[id1]).unwrap(), 0);
    assert_eq!(store.delete(&m1, &[id1, EnvelopeId([7; 32])]).unwrap(), 1);
    assert_eq!(store.delete(&m1, &[id1]).unwrap(), 0);
    assert_eq!(store.stats().envelopes, 1);

    // quota: 5 envelopes per mailbox
    let r = store
        .put((10..16).map(|n| env(3, n, 500)).collect())
        .await
        .unwrap();
    assert_eq!(
        r.iter()
            .filter(|r| matches!(r, PutResult::Stored { .. }))
            .count(),
        5
    );
    assert_eq!(r[5], PutResult::QuotaExceeded);
    // another mailbox is unaffected
    assert!(matches!(
        store.put(vec![env(4, 1, 500)]).await.unwrap()[0],
        PutResult::Stored { .. }
    ));

    // expiry removes exactly what is due
    assert_eq!(store.expire(150, 100).unwrap(), 0);
    assert_eq!(store.expire(200, 100).unwrap(), 1);
    assert!(held(&store, &m1).is_empty());
    assert_eq!(store.expire(500, 2).unwrap(), 2, "max bounds one sweep");
    assert_eq!(store.expire(500, 100).unwrap(), 4);
    assert_eq!(store.stats(), StoreStats::default());
    // after expiry the envelope can be stored again
    assert!(matches!(
        store.put(vec![env(1, 2, 900)]).await.unwrap()[0],
        PutResult::Stored { .. }
    ));
    store.flush().await.unwrap();
}

#[tokio::test]
async fn memory_store_behaves() {
    suite(MemoryStore::new(QUOTA)).await;
}

#[tokio::test]
async fn sled_store_behaves() {
    let dir = tempfile::tempdir().unwrap();
    suite(SledStore::open(dir.path(), QUOTA, 16 << 20, None).unwrap()).await;
}

/// Flushes run on a thread of their own at a lower CPU priority than the threads that
/// serve peers (its nice value, read back from the kernel).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn flushes_run_on_a_thread_of_lower_priority() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), QUOTA, 16 << 20, None).unwrap();
    // Acknowledged once a flush has run.
    store.put(vec![env(1, 1, 100)]).await.unwrap();
    let mut niceness = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = task.unwrap().path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if name.trim() != "relay-flush" {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue; // a thread of another test's store, just gone
        };
        // Fields after the name in parentheses, from the third on; the nice value is
        // the nineteenth.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        niceness.push(fields[16].parse::<i32>().unwrap());
    }
    assert!(!niceness.is_empty(), "no flushing thread runs");
    assert!(
        niceness
            .iter()
            .any(|n| *n >= super::sled_store::FLUSH_NICENESS),
        "flushing threads' nice values: {niceness:?}"
    );
}

#[tokio::test]
async fn sled_store_survives_reopen_with_cursors_increasing() {
    let dir = tempfile::tempdir().unwrap();
    let m = QueueId([1; 32]);
    let last = {
        let store = reopen(dir.path());
        store
            .put(vec![env(1, 1, 100), env(1, 2, 100)])
            .await
            .unwrap();
        store.fetch(&m, 0, 10, usize::MAX).unwrap().next
    };
    let store = reopen(dir.path());
    assert_eq!(store.stats().envelopes, 2, "usage rebuilt from disk");
    assert_eq!(
        store.put(vec![env(1, 1, 100)]).await.unwrap(),
        vec![PutResult::Duplicate]
    );
    let PutResult::Stored { cursor } = store.put(vec![env(1, 3, 100)]).await.unwrap()[0] else {
        panic!("not stored");
    };
    assert!(cursor > last, "cursors keep increasing across restarts");
}

/// The sled database in `dir`, opened directly, once the store has let go of it.
fn raw_sled(dir: &std::path::Path) -> sled::Db {
    loop {
        match sled::open(dir) {
            Ok(db) => break db,
            Err(e) => {
                assert!(e.to_string().contains("lock"), "{e}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// Opens the store in `dir` and waits until it has indexed what it holds.
fn reopen(dir: &std::path::Path) -> SledStore {
    let store = reopen_with(dir, true);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !store.indexed() {
        assert!(std::time::Instant::now() < deadline, "indexing took 10 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    store
}

/// Opens the store in `dir` (with its background index walk on or off), waiting for
/// sled to let go of a database just dropped (its file lock outlives the drop while its
/// shared I/O threads are busy).
fn reopen_with(dir: &std::path::Path, walk: bool) -> SledStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let options = Options {
            walk,
            ..Options::default()
        };
        match SledStore::open_with(dir, QUOTA, 16 << 20, None, options) {
            Err(StoreError::Io(e)) if std::time::Instant::now() < deadline => {
                assert!(e.contains("lock"), "{e}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other.unwrap(),
        }
    }
}

/// Fills queues 1..=`queues` with envelopes 0..`each` (expiring at 100 + n) and closes
/// the store.
async fn filled(dir: &std::path::Path, queues: u8, each: u32) {
    let store = reopen(dir);
    for q in 1..=queues {
        let all = (0..each).map(|n| env(q, n, 100 + u64::from(n))).collect();
        let stored = store.put(all).await.unwrap();
        assert!(stored.iter().all(|r| matches!(r, PutResult::Stored { .. })));
    }
}

#[tokio::test]
async fn a_reopened_store_serves_before_it_has_indexed_everything() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path(), 3, 5).await;
    // No walk: queues are indexed only when named.
    let store = reopen_with(dir.path(), false);
    assert!(!store.indexed());
    assert_eq!(store.stats().envelopes, 0, "nothing indexed yet");
    // Fetches need no index.
    assert_eq!(held(&store, &QueueId([1; 32])).len(), 5);
    // A put indexes its queue first: the duplicate is found, the quota (5) holds.
    let r = store
        .put(vec![env(1, 0, 100), env(1, 9, 100)])
        .await
        .unwrap();
    assert_eq!(r, [PutResult::Duplicate, PutResult::QuotaExceeded]);
    assert_eq!(store.stats().envelopes, 5, "queue 1 indexed");
    // A delete does too.
    assert_eq!(
        store
            .delete(&QueueId([2; 32]), &[envelope(3, 103).id()])
            .unwrap(),
        1
    );
    assert_eq!(store.stats().envelopes, 9);
    // Expiry covers what is indexed: queue 3 waits for the walk.
    assert_eq!(store.expire(1_000, 100).unwrap(), 9);
    assert_eq!(held(&store, &QueueId([3; 32])).len(), 5);
    drop(store);
    // With the walk, everything is indexed and expires.
    let store = reopen(dir.path());
    assert!(store.indexed());
    assert_eq!(store.stats().envelopes, 5);
    assert_eq!(store.stats().mailboxes, 1);
    assert_eq!(store.expire(1_000, 100).unwrap(), 5);
    assert_eq!(store.stats(), StoreStats::default());
}

#[tokio::test]
async fn puts_and_deletes_racing_the_index_walk_are_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path(), 200, 4).await;
    let store = reopen_with(dir.path(), true);
    let mut tasks = Vec::new();
    for q in 1..=200u8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            // one duplicate, one new envelope, one deletion per queue
            let r = store
                .put(vec![env(q, 1, 101), env(q, 7, 500)])
                .await
                .unwrap();
            assert_eq!(r[0], PutResult::Duplicate);
            assert!(matches!(r[1], PutResult::Stored { .. }));
            let id = envelope(0, 100).id();
            assert_eq!(store.delete(&QueueId([q; 32]), &[id]).unwrap(), 1);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    store.wait_indexed().await.unwrap();
    let stats = store.stats();
    assert_eq!(stats.envelopes, 200 * 4);
    assert_eq!(stats.mailboxes, 200);
    assert_eq!(stats.bytes, 200 * 4 * envelope(0, 0).encoded_len() as u64);
    assert_eq!(store.expire(1_000, 10_000).unwrap(), 200 * 4);
    assert_eq!(store.stats(), StoreStats::default());
}

#[tokio::test]
async fn sled_store_finds_by_id_and_expiry_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (m1, m2) = (QueueId([1; 32]), QueueId([2; 32]));
    {
        let store = reopen(dir.path());
        let all = vec![
            env(1, 1, 100),
            env(1, 2, 300),
            env(2, 3, 100),
            env(2, 4, 300),
        ];
        store.put(all).await.unwrap();
    }
    let store = reopen(dir.path());
    assert_eq!(store.stats().envelopes, 4);
    assert_eq!(store.stats().mailboxes, 2);
    // by id, only in its own mailbox
    assert_eq!(store.delete(&m2, &[envelope(2, 300).id()]).unwrap(), 0);
    assert_eq!(store.delete(&m1, &[envelope(2, 300).id()]).unwrap(), 1);
    // by expiry
    assert_eq!(store.expire(200, 100).unwrap(), 2);
    assert_eq!(store.stats().envelopes, 1);
    assert_eq!(held(&store, &m2), vec![envelope(4, 300)]);
    assert!(held(&store, &m1).is_empty());
    // what was removed can be stored again; what is held is still a duplicate
    let again = store
        .put(vec![env(1, 1, 900), env(2, 4, 300)])
        .await
        .unwrap();
    assert!(matches!(again[0], PutResult::Stored { .. }));
    assert_eq!(again[1], PutResult::Duplicate);
    drop(store);
    // and the removals were written, not only forgotten
    let store = reopen(dir.path());
    assert_eq!(store.stats().envelopes, 2);
}

#[tokio::test]
async fn sled_store_drops_the_mailboxes_of_protocol_version_1() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("mailboxes").unwrap();
        tree.insert(b"m-old", b"an envelope of version 1".to_vec())
            .unwrap();
        db.flush().unwrap();
    }
    let store = reopen(dir.path());
    assert_eq!(store.stats().envelopes, 0);
    assert!(matches!(
        store.put(vec![env(1, 1, 100)]).await.unwrap()[0],
        PutResult::Stored { .. }
    ));
    drop(store);
    let store = reopen(dir.path());
    assert_eq!(store.stats().envelopes, 1);
    drop(store);
    let db = raw_sled(dir.path());
    assert!(!db.tree_names().iter().any(|n| n == b"mailboxes".as_slice()));
}

async fn registry_suite<S: MailboxStore>(store: S) {
    let (q1, q2) = (QueueId([1; 32]), QueueId([2; 32]));
    let (w1, w2, w3) = (WriteId([11; 32]), WriteId([12; 32]), WriteId([13; 32]));
    assert_eq!(store.route(&w1).unwrap(), None);
    assert_eq!(
        store
            .grant(&q1, QueueKind::Inbox, &[w1, w2, w1], 4)
            .unwrap(),
        Granted::Held(2)
    );
    assert_eq!(store.route(&w1).unwrap(), Some((q1, QueueKind::Inbox)));
    // granting again changes nothing; an id granted elsewhere is not taken over
    assert_eq!(
        store.grant(&q1, QueueKind::Inbox, &[w1], 4).unwrap(),
        Granted::Held(2)
    );
    assert_eq!(
        store.grant(&q2, QueueKind::Inbox, &[w1, w3], 4).unwrap(),
        Granted::Conflict,
        "an id granted to another queue refuses the request"
    );
    assert_eq!(
        store.grant(&q2, QueueKind::Inbox, &[w3], 4).unwrap(),
        Granted::Held(1)
    );
    assert_eq!(store.route(&w1).unwrap(), Some((q1, QueueKind::Inbox)));
    // capabilities of another kind into the same queue; the count is bounded
    let wr = WriteId([14; 32]);
    assert_eq!(
        store.grant(&q1, QueueKind::Requests, &[wr], 4).unwrap(),
        Granted::Held(3)
    );
    assert_eq!(store.route(&wr).unwrap(), Some((q1, QueueKind::Requests)));
    assert_eq!(
        store
            .grant(
                &q2,
                QueueKind::Inbox,
                &[
                    WriteId([20; 32]),
                    WriteId([21; 32]),
                    WriteId([22; 32]),
                    WriteId([23; 32])
                ],
                4
            )
            .unwrap(),
        Granted::Full(1)
    );
    // revoking: only this queue's, and the route is gone
    assert_eq!(store.revoke(&q2, &[w1, w3]).unwrap(), 0);
    assert_eq!(store.route(&w1).unwrap(), Some((q1, QueueKind::Inbox)));
    assert_eq!(store.route(&w3).unwrap(), None);
    assert_eq!(store.revoke(&q1, &[w2]).unwrap(), 2);
    assert_eq!(store.route(&w2).unwrap(), None);
    // a group queue takes group capabilities only, and no other queue takes one
    let (gq, wg) = (QueueId([3; 32]), WriteId([30; 32]));
    assert_eq!(
        store.grant(&gq, QueueKind::Group, &[wg], 4).unwrap(),
        Granted::Held(1)
    );
    assert!(store.is_group_queue(&gq).unwrap());
    assert!(!store.is_group_queue(&q1).unwrap());
    assert!(!store.is_group_queue(&QueueId([99; 32])).unwrap());
    assert_eq!(
        store
            .grant(&gq, QueueKind::Inbox, &[WriteId([31; 32])], 4)
            .unwrap(),
        Granted::OtherKind
    );
    assert_eq!(
        store
            .grant(&q1, QueueKind::Group, &[WriteId([31; 32])], 4)
            .unwrap(),
        Granted::OtherKind
    );
    assert_eq!(store.route(&wg).unwrap(), Some((gq, QueueKind::Group)));
    // a request capability has its own, smaller quota
    let rq = QueueId([5; 32]);
    let through_request = |n: u32| Placed {
        queue: rq,
        grant: WriteId([5; 32]),
        kind: QueueKind::Requests,
        envelope: envelope(n, 500),
    };
    let r = store
        .put((0..3).map(through_request).collect())
        .await
        .unwrap();
    assert!(matches!(r[1], PutResult::Stored { .. }));
    assert_eq!(r[2], PutResult::QuotaExceeded);
    // a capability at its quota leaves the queue open to another capability
    let through = |grant: u8, n: u32| Placed {
        grant: WriteId([grant; 32]),
        ..env(6, n, 500)
    };
    let quota = QUOTA.capability.max_envelopes as u32;
    let r = store
        .put((0..=quota).map(|n| through(7, 100 + n)).collect())
        .await
        .unwrap();
    assert_eq!(r[quota as usize], PutResult::QuotaExceeded);
}

#[tokio::test]
async fn memory_registry_behaves() {
    registry_suite(MemoryStore::new(QUOTA)).await;
}

#[tokio::test]
async fn sled_registry_behaves_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    registry_suite(reopen(dir.path())).await;
    let store = reopen(dir.path());
    assert_eq!(
        store.route(&WriteId([11; 32])).unwrap(),
        Some((QueueId([1; 32]), QueueKind::Inbox))
    );
    assert_eq!(store.route(&WriteId([12; 32])).unwrap(), None);
    assert!(store.is_group_queue(&QueueId([3; 32])).unwrap());
    assert!(!store.is_group_queue(&QueueId([1; 32])).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_share_flushes() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let flushes = Arc::new(AtomicU64::new(0));
    let counter = flushes.clone();
    let observer: FlushObserver = Arc::new(move |_| {
        counter.fetch_add(1, Ordering::Relaxed);
    });
    let quota = Quota {
        max_envelopes: 100_000,
        max_bytes: u64::MAX,
    };
    let store =
        SledStore::open(dir.path(), Limits::uniform(quota), 16 << 20, Some(observer)).unwrap();
    let puts = 400u32;
    let tasks: Vec<_> = (0..puts)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { store.put(vec![env(9, n, 1000)]).await.unwrap() })
        })
        .collect();
    for t in tasks {
        assert!(matches!(t.await.unwrap()[0], PutResult::Stored { .. }));
    }
    let n = flushes.load(Ordering::Relaxed);
    assert!(n >= 1);
    assert!(
        n < u64::from(puts),
        "{n} flushes for {puts} puts: no group commit"
    );
    assert_eq!(store.stats().envelopes, u64::from(puts));
}

#[tokio::test]
async fn the_store_epoch_lasts_with_the_data_and_changes_with_a_new_database() {
    let dir = tempfile::tempdir().unwrap();
    // `reopen`: sled lets go of a database a moment after the store is dropped.
    let first = reopen(dir.path()).epoch();
    assert_ne!(first, 0, "0 means none");
    let again = reopen(dir.path()).epoch();
    assert_eq!(first, again, "reopened: the same data, the same epoch");
    let other = tempfile::tempdir().unwrap();
    let fresh = reopen(other.path()).epoch();
    assert_ne!(first, fresh, "a new database: a new epoch");
    assert_ne!(
        MemoryStore::new(QUOTA).epoch(),
        MemoryStore::new(QUOTA).epoch()
    );
}

#[tokio::test]
async fn a_damaged_record_is_removed_and_the_rest_indexed() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path(), 2, 3).await;
    {
        let db = raw_sled(dir.path());
        let tree = db.open_tree("queues").unwrap();
        let (key, _) = tree.iter().next().unwrap().unwrap();
        tree.insert(key, vec![0xff; 40]).unwrap();
        db.flush().unwrap();
    }
    let store = reopen(dir.path());
    assert_eq!(
        store.fatal(),
        None,
        "one damaged record does not stop the relay"
    );
    assert_eq!(store.stats().envelopes, 5);
    assert_eq!(
        held(&store, &QueueId([1; 32])).len(),
        2,
        "fetches work again"
    );
    assert_eq!(held(&store, &QueueId([2; 32])).len(), 3);
}

/// Opens a store in `dir` with body segments of `segment_bytes` and no background
/// reclaiming, and waits until it is indexed.
fn small_segments(dir: &std::path::Path, segment_bytes: u64) -> SledStore {
    let quota = Quota {
        max_envelopes: 10_000,
        max_bytes: u64::MAX,
    };
    let options = Options {
        reclaim: false,
        segment_bytes,
        ..Options::default()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let store = loop {
        match SledStore::open_with(dir, Limits::uniform(quota), 16 << 20, None, options) {
            Err(StoreError::Io(e)) if std::time::Instant::now() < deadline => {
                assert!(e.contains("lock"), "{e}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => break other.unwrap(),
        }
    };
    while !store.indexed() {
        assert!(std::time::Instant::now() < deadline, "indexing took 10 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    store
}

/// The body segment files in the store in `dir`.
fn segment_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("bodies"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".seg")
        })
        .count()
}

#[tokio::test]
async fn body_segments_are_reclaimed_once_dead_and_live_bodies_moved_out_of_sparse_ones() {
    let dir = tempfile::tempdir().unwrap();
    let each = envelope(0, 0).encoded_len() as u64;
    // Four bodies per segment.
    let store = small_segments(dir.path(), 4 * each);
    let (m1, m2) = (QueueId([1; 32]), QueueId([2; 32]));
    // Interleaved: segments hold both queues' bodies, and queue 1 alone fills the first.
    let mut puts: Vec<Placed> = (0..4).map(|n| env(1, n, 1000)).collect();
    for n in 4..20 {
        puts.push(env(if n % 2 == 0 { 1 } else { 2 }, n, 1000));
    }
    let stored = store.put(puts).await.unwrap();
    assert!(stored.iter().all(|r| matches!(r, PutResult::Stored { .. })));
    assert_eq!(segment_files(dir.path()), 5);
    assert_eq!(store.body_usage(), (20 * each, 20 * each));
    // Queue 1 read and deleted: the first segment is dead, the others half dead.
    let ids: Vec<EnvelopeId> = held(&store, &m1).iter().map(Envelope::id).collect();
    assert_eq!(ids.len(), 12);
    assert_eq!(store.delete(&m1, &ids).unwrap(), 12);
    store.flush().await.unwrap();
    let done = store.reclaim_round(false).unwrap();
    assert_eq!((done.segments, done.moved), (1, 0), "{done:?}");
    assert_eq!(segment_files(dir.path()), 4);
    // Moving, a segment a round: the half-dead segments go, their live bodies moved
    // (the fifth, active until the first copies, is finished by them).
    let (mut moved, mut removed) = (0, 0);
    loop {
        let done = store.reclaim_round(true).unwrap();
        if done.segments == 0 && done.moved == 0 {
            break;
        }
        assert_eq!((done.segments, done.moved), (1, 2), "{done:?}");
        moved += done.moved;
        removed += done.segments;
    }
    assert_eq!((moved, removed), (8, 4));
    assert_eq!(store.body_usage(), (8 * each, 8 * each));
    assert_eq!(segment_files(dir.path()), 2);
    let expected: Vec<Envelope> = (4..20)
        .filter(|n| n % 2 == 1)
        .map(|n| envelope(n, 1000))
        .collect();
    assert_eq!(held(&store, &m2), expected);
    assert!(held(&store, &m1).is_empty());
    drop(store);
    // After a restart the moved bodies are found where their records say, and what
    // was alive is counted again from the records.
    let store = small_segments(dir.path(), 4 * each);
    assert_eq!(held(&store, &m2), expected);
    assert_eq!(store.stats().envelopes, 8);
    assert_eq!(store.body_usage().1, 8 * each);
    assert_eq!(
        store.put(vec![env(2, 5, 1000)]).await.unwrap(),
        vec![PutResult::Duplicate]
    );
    // Nothing is lost by reclaiming again (the previous active segment is finished now).
    store.reclaim_round(true).unwrap();
    assert_eq!(held(&store, &m2), expected);
}

#[tokio::test]
async fn a_damaged_or_missing_body_is_removed_when_read_and_the_rest_served() {
    let dir = tempfile::tempdir().unwrap();
    let each = envelope(0, 0).encoded_len() as u64;
    {
        let store = small_segments(dir.path(), 2 * each);
        let stored = store
            .put((0..6).map(|n| env(1, n, 1000)).collect())
            .await
            .unwrap();
        assert!(stored.iter().all(|r| matches!(r, PutResult::Stored { .. })));
    }
    // Segments 1, 2, 3 hold two bodies each: one byte of the first body changed, and
    // the third segment lost.
    let bodies = dir.path().join("bodies");
    let first = bodies.join("00000001.seg");
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[3] ^= 0x55;
    std::fs::write(&first, bytes).unwrap();
    std::fs::remove_file(bodies.join("00000003.seg")).unwrap();
    let store = small_segments(dir.path(), 2 * each);
    assert_eq!(
        store.stats().envelopes,
        6,
        "records are indexed without their bodies"
    );
    // Put again, the envelope whose body is damaged is stored again, not a duplicate
    // (a record that reached the disk without its body before a power loss).
    let again = store.put(vec![env(1, 0, 1000)]).await.unwrap();
    assert!(matches!(again[0], PutResult::Stored { .. }), "{again:?}");
    let fine = store.put(vec![env(1, 1, 1000)]).await.unwrap();
    assert_eq!(fine, vec![PutResult::Duplicate]);
    let served = held(&store, &QueueId([1; 32]));
    assert_eq!(
        served,
        vec![
            envelope(1, 1000),
            envelope(2, 1000),
            envelope(3, 1000),
            envelope(0, 1000)
        ]
    );
    assert_eq!(store.fatal(), None, "damaged bodies do not stop the relay");
    assert_eq!(store.stats().envelopes, 4, "their records are removed");
    // Appends go on in a new segment (numbered after the highest found: a lost last
    // segment's number comes again, and the envelope ids tell its old records apart).
    assert!(matches!(
        store.put(vec![env(1, 9, 1000)]).await.unwrap()[0],
        PutResult::Stored { .. }
    ));
    let served = held(&store, &QueueId([1; 32]));
    assert_eq!(served.last(), Some(&envelope(9, 1000)));
    assert_eq!(served.len(), 5);
}
