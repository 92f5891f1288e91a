//! Engine tests against an in-memory network: relays are the relay crate's
//! `MemoryStore`s that can be switched off; direct paths are in-memory queues.
//!
//! - `delivery`: sending, receiving, receipts, relays down, restarts, direct paths;
//! - `hostile`: contacts and strangers sending what no honest client would.

mod delivery;
mod hostile;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use kkachi_protocol::{Card, MailboxId};
use kkachi_relay::store::{MailboxStore, MemoryStore, PutResult, Quota};
use parking_lot::Mutex;

use super::*;
use crate::store::Contact;

#[derive(Default)]
struct FakeInner {
    relays: HashMap<String, (MemoryStore, bool)>,
    direct: HashSet<PeerId>,
    direct_inbox: HashMap<PeerId, Vec<Envelope>>,
    /// While set, puts wait for a permit (a slow network).
    gate: Option<Arc<tokio::sync::Semaphore>>,
    /// Puts that reached a relay.
    puts: usize,
    /// Contacts the engine asked a direct path to.
    sought: Vec<PeerId>,
}

#[derive(Clone, Default)]
struct FakeNet {
    inner: Arc<Mutex<FakeInner>>,
}

impl std::fmt::Debug for FakeNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeNet")
    }
}

impl FakeNet {
    fn add_relay(&self) -> Multiaddr {
        let peer = PeerId::random();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/1/p2p/{peer}").parse().unwrap();
        let quota = Quota {
            max_envelopes: 10_000,
            max_bytes: u64::MAX,
        };
        self.inner
            .lock()
            .relays
            .insert(addr.to_string(), (MemoryStore::new(quota), true));
        addr
    }

    fn set_up(&self, relay: &Multiaddr, up: bool) {
        self.inner
            .lock()
            .relays
            .get_mut(&relay.to_string())
            .unwrap()
            .1 = up;
    }

    fn relay_store(&self, relay: &Multiaddr) -> MemoryStore {
        self.inner.lock().relays[&relay.to_string()].0.clone()
    }
}

impl Transport for FakeNet {
    async fn request(
        &self,
        relay: &Multiaddr,
        request: ClientToRelay,
    ) -> Result<RelayToClient, NetError> {
        let store = {
            let inner = self.inner.lock();
            match inner.relays.get(&relay.to_string()) {
                Some((store, true)) => store.clone(),
                _ => return Err(NetError::Unreachable("connection refused".into())),
            }
        };
        Ok(match request {
            ClientToRelay::Put { envelopes } => {
                let gate = self.inner.lock().gate.clone();
                if let Some(gate) = gate {
                    drop(gate.acquire().await.unwrap());
                }
                self.inner.lock().puts += 1;
                let results = store.put(envelopes).await.unwrap();
                RelayToClient::Stored {
                    outcomes: results
                        .into_iter()
                        .map(|r| match r {
                            PutResult::Stored { .. } => PutOutcome::Stored,
                            PutResult::Duplicate => PutOutcome::Duplicate,
                            PutResult::QuotaExceeded => PutOutcome::Rejected {
                                code: kkachi_protocol::ErrorCode::QuotaExceeded,
                                message: "full".into(),
                            },
                        })
                        .collect(),
                }
            }
            ClientToRelay::Fetch {
                mailbox,
                after,
                limit,
            } => {
                let f = store
                    .fetch(&mailbox, after, usize::from(limit), usize::MAX)
                    .unwrap();
                RelayToClient::Batch {
                    items: f.items,
                    next: f.next,
                    more: f.more,
                }
            }
            ClientToRelay::Subscribe { mailbox, after, .. } => {
                let f = store.fetch(&mailbox, after, 256, usize::MAX).unwrap();
                RelayToClient::Batch {
                    items: f.items,
                    next: f.next,
                    more: f.more,
                }
            }
            ClientToRelay::Delete { mailbox, ids } => RelayToClient::Deleted {
                count: store.delete(&mailbox, &ids).unwrap(),
            },
            ClientToRelay::Info => {
                RelayToClient::error(kkachi_protocol::ErrorCode::Internal, "fake")
            }
        })
    }

    async fn direct_put(
        &self,
        peer: PeerId,
        envelopes: Vec<Envelope>,
    ) -> Result<RelayToClient, NetError> {
        let mut inner = self.inner.lock();
        if !inner.direct.contains(&peer) {
            return Err(NetError::Unreachable("not on the LAN".into()));
        }
        let n = envelopes.len();
        inner
            .direct_inbox
            .entry(peer)
            .or_default()
            .extend(envelopes);
        Ok(RelayToClient::Stored {
            outcomes: vec![PutOutcome::Stored; n],
        })
    }

    fn direct_peers(&self) -> HashSet<PeerId> {
        self.inner.lock().direct.clone()
    }

    fn connected(&self) -> HashSet<PeerId> {
        HashSet::new()
    }

    fn seek_direct(&self, peer: PeerId, relays: &[Multiaddr]) {
        // Like the real network: no relay of theirs, no way to reach them through one.
        if !relays.is_empty() {
            self.inner.lock().sought.push(peer);
        }
    }
}

struct User {
    engine: Arc<Engine<FakeNet>>,
    card: Card,
    relays: Vec<Multiaddr>,
    _dir: tempfile::TempDir,
}

impl User {
    fn new(net: &FakeNet, name: &str, relays: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let relays: Vec<Multiaddr> = (0..relays).map(|_| net.add_relay()).collect();
        let (store, me, card) = LocalStore::provision(dir.path(), name, &relays).unwrap();
        Self {
            engine: Engine::new(store, me, net.clone()),
            card,
            relays,
            _dir: dir,
        }
    }

    fn peer(&self) -> PeerId {
        self.engine.identity().peer_id()
    }

    fn add_contact(&self, other: &User) -> Contact {
        let contact = Contact {
            peer: other.peer(),
            name: other.card.name().into(),
            card: other.card.clone(),
        };
        let mut w = WriteSet::default();
        LocalStore::write_contact(&mut w, &contact);
        self.engine.store().apply(w).unwrap();
        contact
    }

    async fn sync(&self) -> Vec<Received> {
        let mut out = Vec::new();
        for r in &self.relays {
            if let Ok(mut got) = self.engine.sync_relay(r, 0).await {
                out.append(&mut got);
            }
        }
        out
    }

    /// Sends `text` to `to` and tries every path once.
    async fn send(&self, to: &Contact, text: &str) -> (Queued, Progress) {
        let q = self.engine.send_text(to, text).await.unwrap();
        let p = self
            .engine
            .deliver(q.outbox_key, true, ATTEMPT_TIMEOUT)
            .await
            .unwrap()
            .unwrap();
        (q, p)
    }

    fn messages(&self, with: &User) -> Vec<MessageRecord> {
        self.engine.store().messages(&with.peer()).unwrap()
    }

    /// Seals `content` exactly as given (any seq, prev, body) for `to` through our
    /// session with them, as a modified client could, and puts it on their relays.
    async fn send_raw(&self, to: &Contact, content: &Content) -> Envelope {
        let now = now_ms();
        let envelope = {
            let mut sessions = self.engine.lock.lock().await;
            let session = sessions.get(self.engine.store(), to).unwrap();
            let envelope = self
                .engine
                .seal_envelope(to, session, content, now)
                .unwrap();
            let mut w = WriteSet::default();
            LocalStore::write_session(&mut w, &to.peer, session);
            self.engine.store().apply(w).unwrap();
            envelope
        };
        self.put_raw(to, envelope.clone()).await;
        envelope
    }

    /// Puts `envelope` on `to`'s relays as it is.
    async fn put_raw(&self, to: &Contact, envelope: Envelope) {
        for relay in to.card.relays() {
            let put = ClientToRelay::Put {
                envelopes: vec![envelope.clone()],
            };
            let _ = self.engine.net().request(relay, put).await;
        }
    }

    fn contact_of(&self, peer: &PeerId) -> Option<Contact> {
        self.engine.store().contact(peer).unwrap()
    }
}

/// A text whose reading panics, as a bug would: the receive path must refuse that
/// envelope alone.
pub(super) const PANIC_TEXT: &str = "\u{1f41b} a text whose reading panics in tests";

/// A text record as a modified client may make it.
fn raw_text(seq: u64, prev: [u8; 32], text: &str) -> Content {
    Content {
        id: MessageId(rand::random()),
        seq,
        prev,
        sent_at_ms: now_ms(),
        body: Body::Text(text.into()),
    }
}

/// Messages both ways, with receipts, until both sides seal on an established session.
async fn converse(alice: &User, bob: &User, bob_c: &Contact, alice_c: &Contact) {
    for round in 0..6 {
        let _ = alice.send(bob_c, &format!("a{round}")).await;
        bob.sync().await;
        bob.engine.deliver_due().await.unwrap();
        let _ = bob.send(alice_c, &format!("b{round}")).await;
        alice.sync().await;
        alice.engine.deliver_due().await.unwrap();
        bob.sync().await;
    }
}

async fn pair(net: &FakeNet) -> (User, User, Contact, Contact) {
    let alice = User::new(net, "alice", 3);
    let bob = User::new(net, "bob", 3);
    let bob_at_alice = alice.add_contact(&bob);
    let alice_at_bob = bob.add_contact(&alice);
    (alice, bob, bob_at_alice, alice_at_bob)
}
