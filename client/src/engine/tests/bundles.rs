//! Bundles taken in: what is ours shows once whichever copy comes first; what is
//! someone else's is carried on within bounds; a stranger cannot use one to skip the
//! relays' request queue.

use kkachi_protocol::WriteKey;
use kkachi_protocol::bundle::{Item, Target as BundleTarget};

use super::*;
use crate::store::OutboxKind;

fn carried(user: &User) -> Vec<crate::store::OutboxEntry> {
    user.engine
        .store()
        .outbox()
        .unwrap()
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| e.kind == OutboxKind::Forward)
        .collect()
}

/// A relay somewhere on the internet (a documentation address).
fn relay(port: u16) -> Multiaddr {
    format!("/ip4/203.0.113.7/tcp/{port}/p2p/{}", PeerId::random())
        .parse()
        .unwrap()
}

fn junk(expires_at: u64, targets: Vec<BundleTarget>) -> Item {
    let mut payload = vec![0u8; kkachi_protocol::session::SIZE_CLASSES[0]];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut payload);
    Item {
        envelope: Envelope {
            expires_at,
            payload,
        },
        targets,
    }
}

fn to(relay: &Multiaddr) -> BundleTarget {
    BundleTarget {
        relay: relay.clone(),
        write: WriteKey(rand::random()),
        request: None,
    }
}

#[tokio::test]
async fn a_message_from_a_bundle_shows_once_whichever_copy_comes_first() {
    let net = FakeNet::default();
    let (alice, bob, bob_c, _) = pair(&net).await;
    for r in &bob.relays {
        net.set_up(r, false);
    }
    let (queued, _) = alice.queue(&bob_c, "by hand").await;
    alice.engine.settle().await.unwrap();
    let items = export_items(alice.engine.store(), Some(&bob.peer()), now_ms() / 1000).unwrap();
    assert!(!items.is_empty());
    let imported = bob.engine.import_bundle(items.clone()).await.unwrap();
    assert_eq!(imported.shown, 1, "{imported:?}");
    assert_eq!(imported.forwarding, 0, "{imported:?}");
    assert_eq!(bob.messages(&alice).len(), 1);
    // Again: nothing new.
    let again = bob.engine.import_bundle(items).await.unwrap();
    assert_eq!(
        (again.shown, again.already_had),
        (0, again.envelopes),
        "{again:?}"
    );
    // The relays come back: alice's own copies arrive too, and show nothing; bob's
    // receipt reaches alice.
    for r in &bob.relays {
        net.set_up(r, true);
    }
    alice.engine.deliver_now().await.unwrap();
    assert!(bob.sync().await.is_empty());
    assert_eq!(bob.messages(&alice).len(), 1);
    bob.engine.deliver_now().await.unwrap();
    alice.sync().await;
    let sent = alice.messages(&bob);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].id, queued.id.0);
    assert_eq!(sent[0].state, MessageState::Delivered);
}

#[tokio::test]
async fn a_hostile_bundle_is_carried_within_bounds() {
    let net = FakeNet::default();
    let carol = User::started(&net, "carol", 1).await;
    let now = now_ms() / 1000;
    let twice = relay(1);
    let mut items = vec![
        junk(now + 3600, vec![to(&twice), to(&twice)]),
        junk(u64::MAX, vec![to(&relay(2))]),
        junk(now.saturating_sub(10), vec![to(&relay(3))]),
        junk(
            now + 3600,
            vec![BundleTarget {
                relay: "/ip4/203.0.113.7/tcp/4".parse().unwrap(),
                write: WriteKey([1; 32]),
                request: None,
            }],
        ),
        // On this machine or its network, and no relay of ours or our contacts'.
        junk(
            now + 3600,
            vec![
                to(&format!("/ip4/127.0.0.1/tcp/22/p2p/{}", PeerId::random())
                    .parse()
                    .unwrap()),
                to(&format!("/ip4/192.168.1.1/tcp/80/p2p/{}", PeerId::random())
                    .parse()
                    .unwrap()),
            ],
        ),
    ];
    // One new relay each: more than may be carried to.
    items.extend((0..70).map(|i| junk(now + 3600, vec![to(&relay(100 + i))])));
    let report = carol.engine.import_bundle(items).await.unwrap();
    assert_eq!(report.envelopes, 75);
    assert_eq!(
        report.expired, 2,
        "expired, or expiring beyond any relay's: {report:?}"
    );
    assert_eq!(
        report.no_relay, 2,
        "an address with no peer id, and local ones nobody we know uses: {report:?}"
    );
    assert_eq!(report.forwarding, MAX_CARRIED_RELAYS, "{report:?}");
    assert_eq!(report.over_limit, 71 - MAX_CARRIED_RELAYS, "{report:?}");
    let held = carried(&carol);
    assert_eq!(held.len(), MAX_CARRIED_RELAYS);
    let first = held
        .iter()
        .find(|e| e.targets.iter().any(|t| t.addr == twice.to_string()))
        .unwrap();
    assert_eq!(first.targets.len(), 1, "a relay named twice is kept once");
    assert!(carol.engine.store().requests().unwrap().is_empty());
}

#[tokio::test]
async fn a_strangers_first_message_in_a_bundle_goes_through_the_request_queue() {
    let net = FakeNet::default();
    let bob = User::started(&net, "bob", 2).await;
    let dave = User::started(&net, "dave", 1).await;
    // Dave has bob's card; bob does not know dave.
    let bob_at_dave = dave.add_contact(&bob);
    for r in &bob.relays {
        net.set_up(r, false);
    }
    dave.queue(&bob_at_dave, "hello, it is dave").await;
    dave.engine.settle().await.unwrap();
    let items = export_items(dave.engine.store(), Some(&bob.peer()), now_ms() / 1000).unwrap();
    let report = bob.engine.import_bundle(items).await.unwrap();
    assert_eq!(report.for_us, 0, "not held from the file: {report:?}");
    assert!(bob.engine.store().requests().unwrap().is_empty());
    assert!(report.forwarding >= 1, "{report:?}");
    // It goes into bob's own request queue, and is held from there as usual.
    for r in &bob.relays {
        net.set_up(r, true);
    }
    bob.engine.deliver_now().await.unwrap();
    assert!(carried(&bob).is_empty(), "every relay took it");
    bob.sync().await;
    let requests = bob.engine.store().requests().unwrap();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].peer, dave.peer());
}
