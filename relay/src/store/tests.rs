//! One behavioural suite run against both stores, plus sled-only durability tests.

use std::sync::Arc;

use super::*;

const QUOTA: Quota = Quota {
    max_envelopes: 5,
    max_bytes: 10_000,
};

fn env(mailbox: u8, n: u32, expires_at: u64) -> Envelope {
    Envelope {
        mailbox: MailboxId([mailbox; 32]),
        expires_at,
        payload: n.to_be_bytes().repeat(4),
    }
}

async fn suite<S: MailboxStore>(store: S) {
    let m1 = MailboxId([1; 32]);
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
    assert_eq!(page.items[0].envelope, env(1, 1, 100));
    let page2 = store.fetch(&m1, page.next, 10, usize::MAX).unwrap();
    assert_eq!(page2.items.len(), 1);
    assert!(!page2.more);
    assert_eq!(page2.items[0].envelope, env(1, 2, 200));
    assert!(page2.next > page.next);
    let empty = store.fetch(&m1, page2.next, 10, usize::MAX).unwrap();
    assert!(empty.items.is_empty());
    assert_eq!(empty.next, page2.next);
    // other mailboxes are separate
    assert!(
        store
            .fetch(&MailboxId([2; 32]), 0, 10, usize::MAX)
            .unwrap()
            .items
            .is_empty()
    );
    // the byte budget still returns at least one envelope
    assert_eq!(store.fetch(&m1, 0, 10, 1).unwrap().items.len(), 1);

    // delete only from the named mailbox
    let id1 = env(1, 1, 100).id();
    assert_eq!(store.delete(&MailboxId([2; 32]), &[id1]).unwrap(), 0);
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
    assert!(
        store
            .fetch(&m1, 0, 10, usize::MAX)
            .unwrap()
            .items
            .is_empty()
    );
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

#[tokio::test]
async fn sled_store_survives_reopen_with_cursors_increasing() {
    let dir = tempfile::tempdir().unwrap();
    let m = MailboxId([1; 32]);
    let last = {
        let store = SledStore::open(dir.path(), QUOTA, 16 << 20, None).unwrap();
        store
            .put(vec![env(1, 1, 100), env(1, 2, 100)])
            .await
            .unwrap();
        store.fetch(&m, 0, 10, usize::MAX).unwrap().next
    };
    let store = SledStore::open(dir.path(), QUOTA, 16 << 20, None).unwrap();
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
    let store = SledStore::open(dir.path(), quota, 16 << 20, Some(observer)).unwrap();
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
