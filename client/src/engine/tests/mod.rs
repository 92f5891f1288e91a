//! Engine tests against an in-memory network: relays are the relay crate's
//! `MemoryStore`s that can be switched off; direct paths are in-memory queues.
//!
//! - `delivery`: sending, receiving, receipts, relays down, restarts, direct paths;
//! - `hostile`: contacts and strangers sending what no honest client would;
//! - `contacts`: message requests, blocking, removing and adding contacts again;
//! - `bundles`: bundles taken in, ours and others';
//! - `timers`: disappearing messages, read receipts turned off, edits and deletes;
//! - `replies`: replies, reactions, and changes arriving out of order;
//! - `files`: files sent, fetched, broken by their sender, fetched on their own.
//! - `groups`: membership shared, messages to every member once, waiting for operations.
//! - `large_groups`: groups with group relays: epochs, group queues, haves.
//! - `devices`: device sets kept, merged, refused; keys taken out never taken again.

mod bundles;
mod contacts;
mod delivery;
mod devices;
mod files;
mod groups;
mod hostile;
mod large_groups;
mod own;
mod replies;
mod rotation;
mod timers;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use kkachi_protocol::WriteId;
use kkachi_protocol::file::ChunkId;
use kkachi_protocol::wire::{Addressed, PutOutcome};
use kkachi_protocol::{
    Body, Card, ClientToRelay, Content, Envelope, MessageId, Multiaddr, PeerId, RelayToClient,
};
use kkachi_relay::store::{Granted, Limits, MailboxStore, MemoryStore, Placed, PutResult, Quota};
use parking_lot::Mutex;

use super::*;
use crate::net::{NetError, Transport};
use crate::store::{Contact, Direction, LocalStore, MessageRecord, MessageState, WriteSet};

/// The chunks one relay holds: by queue and id, with the capability that put each.
type RelayChunks = HashMap<(kkachi_protocol::QueueId, ChunkId), (WriteId, Vec<u8>)>;

#[derive(Default)]
struct FakeInner {
    relays: HashMap<String, (MemoryStore, bool)>,
    direct: HashSet<PeerId>,
    direct_inbox: HashMap<PeerId, Vec<Envelope>>,
    /// While set, puts wait for a permit (a slow network).
    gate: Option<Arc<tokio::sync::Semaphore>>,
    /// Puts that reached a relay.
    puts: usize,
    /// While set, the network misbehaves: one put in ten is lost on the way (its sender
    /// is told it failed, and tries again), and each batch fetched comes in reverse
    /// order with its first envelope twice.
    chaos: bool,
    /// Puts lost to `chaos`.
    lost: usize,
    /// Contacts the engine asked a direct path to.
    sought: Vec<PeerId>,
    /// Direct peers that refuse what is handed to them (they removed us), and how
    /// many hand-overs were tried.
    refusing: HashSet<PeerId>,
    direct_puts: usize,
    /// Chunks of files each relay holds: by queue and id, with the capability that put
    /// them.
    chunks: HashMap<String, RelayChunks>,
    /// Chunks served by all relays.
    chunks_served: usize,
    /// Reads of group queues.
    group_reads: usize,
    /// Puts into group queues.
    group_puts: usize,
    /// Chunks put into group queues.
    group_chunk_puts: usize,
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
        self.inner.lock().relays.insert(
            addr.to_string(),
            (MemoryStore::new(Limits::uniform(quota)), true),
        );
        addr
    }

    /// The relay loses everything it held (a new database: a new store epoch).
    fn wipe_relay(&self, relay: &Multiaddr) {
        let quota = Quota {
            max_envelopes: 10_000,
            max_bytes: u64::MAX,
        };
        self.inner
            .lock()
            .relays
            .get_mut(&relay.to_string())
            .unwrap()
            .0 = MemoryStore::new(Limits::uniform(quota));
    }

    fn set_up(&self, relay: &Multiaddr, up: bool) {
        self.inner
            .lock()
            .relays
            .get_mut(&relay.to_string())
            .unwrap()
            .1 = up;
    }

    /// Turns the misbehaving network on or off (see `FakeInner::chaos`); returns how many
    /// puts it lost so far.
    fn chaos(&self, on: bool) -> usize {
        let mut inner = self.inner.lock();
        inner.chaos = on;
        inner.lost
    }

    /// Chunk `id` of `queue` on `relay`, as a relay answers a read of it.
    fn serve_chunk(
        &self,
        relay: &Multiaddr,
        queue: kkachi_protocol::QueueId,
        id: ChunkId,
    ) -> RelayToClient {
        let mut inner = self.inner.lock();
        let held = inner
            .chunks
            .get(&relay.to_string())
            .and_then(|c| c.get(&(queue, id)))
            .map(|(_, data)| data.clone());
        match held {
            Some(data) => {
                inner.chunks_served += 1;
                RelayToClient::Chunk { data }
            }
            None => RelayToClient::error(kkachi_protocol::ErrorCode::NotFound, "no"),
        }
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
        let group = matches!(request, ClientToRelay::PutGroup { .. });
        Ok(match request {
            ClientToRelay::Put { items } | ClientToRelay::PutGroup { items } => {
                let gate = self.inner.lock().gate.clone();
                if let Some(gate) = gate {
                    drop(gate.acquire().await.unwrap());
                }
                {
                    let mut inner = self.inner.lock();
                    inner.puts += 1;
                    inner.group_puts += usize::from(group);
                    if inner.chaos && inner.puts.is_multiple_of(10) {
                        inner.lost += 1;
                        return Err(NetError::Unreachable("lost on the way".into()));
                    }
                }
                let mut outcomes = Vec::new();
                for item in items {
                    // As the relay does: a group queue by its key (opened, never
                    // granted), any other queue by a granted write key.
                    let route = if group {
                        let queue = kkachi_protocol::GroupKey(item.write.0).queue();
                        store
                            .is_group_queue(&queue)
                            .unwrap()
                            .then_some((queue, kkachi_protocol::QueueKind::Group))
                    } else {
                        store.route(&item.write.id()).unwrap()
                    };
                    let Some((queue, kind)) = route else {
                        outcomes.push(PutOutcome::Rejected {
                            code: kkachi_protocol::ErrorCode::NoQueue,
                            message: "no queue".into(),
                        });
                        continue;
                    };
                    let placed = Placed {
                        queue,
                        grant: if group {
                            WriteId(queue.0)
                        } else {
                            item.write.id()
                        },
                        kind,
                        envelope: item.envelope,
                    };
                    outcomes.push(match store.put(vec![placed]).await.unwrap()[0] {
                        PutResult::Stored { .. } => PutOutcome::Stored,
                        PutResult::Duplicate => PutOutcome::Duplicate,
                        PutResult::QuotaExceeded => PutOutcome::Rejected {
                            code: kkachi_protocol::ErrorCode::QuotaExceeded,
                            message: "full".into(),
                        },
                        PutResult::RelayFull => PutOutcome::Rejected {
                            code: kkachi_protocol::ErrorCode::StorageFull,
                            message: "relay full".into(),
                        },
                    });
                }
                RelayToClient::Stored {
                    outcomes,
                    epoch: store.epoch(),
                }
            }
            ClientToRelay::Grant {
                key,
                kind,
                write_ids,
                ..
            } => match store
                .grant(&key.queue(), kind, &write_ids, u32::MAX)
                .unwrap()
            {
                Granted::Held(grants) | Granted::Full(grants) => RelayToClient::Granted { grants },
                Granted::Conflict | Granted::OtherKind => RelayToClient::error(
                    kkachi_protocol::ErrorCode::NotAllowed,
                    "granted to another queue, or of another kind",
                ),
            },
            ClientToRelay::Revoke { key, write_ids } => RelayToClient::Granted {
                grants: store.revoke(&key.queue(), &write_ids).unwrap(),
            },
            ClientToRelay::PutChunk {
                write, id, data, ..
            } => {
                let outcome = match store.route(&write.id()).unwrap() {
                    None => PutOutcome::Rejected {
                        code: kkachi_protocol::ErrorCode::NoQueue,
                        message: "no queue".into(),
                    },
                    Some(_) if ChunkId::of(&data) != id => PutOutcome::Rejected {
                        code: kkachi_protocol::ErrorCode::Malformed,
                        message: "not its id".into(),
                    },
                    Some((queue, _)) => {
                        self.inner
                            .lock()
                            .chunks
                            .entry(relay.to_string())
                            .or_default()
                            .insert((queue, id), (write.id(), data));
                        PutOutcome::Stored
                    }
                };
                RelayToClient::Stored {
                    outcomes: vec![outcome],
                    epoch: store.epoch(),
                }
            }
            ClientToRelay::GetChunk { key, id } => self.serve_chunk(relay, key.queue(), id),
            ClientToRelay::GetGroupChunk { key, id } => self.serve_chunk(relay, key.queue(), id),
            ClientToRelay::HasChunks { write, ids } => {
                let queue = store.route(&write.id()).unwrap().map(|(q, _)| q);
                let inner = self.inner.lock();
                let held = inner.chunks.get(&relay.to_string());
                RelayToClient::ChunksHeld {
                    held: ids
                        .iter()
                        .map(|id| {
                            queue
                                .and_then(|q| held?.get(&(q, *id)))
                                .is_some_and(|(by, _)| *by == write.id())
                        })
                        .collect(),
                }
            }
            ClientToRelay::DeleteChunks { key, ids } => {
                let mut inner = self.inner.lock();
                let held = inner.chunks.entry(relay.to_string()).or_default();
                let count = ids
                    .iter()
                    .filter(|id| held.remove(&(key.queue(), **id)).is_some())
                    .count();
                RelayToClient::Deleted {
                    count: count as u32,
                }
            }
            ClientToRelay::Fetch { key, after, limit } => {
                let f = store
                    .fetch(&key.queue(), after, usize::from(limit), usize::MAX)
                    .unwrap();
                let mut items = f.items;
                if self.inner.lock().chaos && !items.is_empty() {
                    items.reverse();
                    items.push(items[0].clone());
                }
                RelayToClient::Batch {
                    items,
                    next: f.next,
                    more: f.more,
                }
            }
            ClientToRelay::Subscribe { key, after, .. } => {
                let f = store.fetch(&key.queue(), after, 256, usize::MAX).unwrap();
                RelayToClient::Batch {
                    items: f.items,
                    next: f.next,
                    more: f.more,
                }
            }
            ClientToRelay::Delete { key, ids } => RelayToClient::Deleted {
                count: store.delete(&key.queue(), &ids).unwrap(),
            },
            ClientToRelay::OpenGroup { key, .. } => {
                match store
                    .grant(
                        &key.queue(),
                        kkachi_protocol::QueueKind::Group,
                        &[],
                        u32::MAX,
                    )
                    .unwrap()
                {
                    Granted::Held(grants) => RelayToClient::Granted { grants },
                    _ => RelayToClient::error(kkachi_protocol::ErrorCode::NotAllowed, "taken"),
                }
            }
            ClientToRelay::ReadGroup {
                key, after, limit, ..
            } => {
                self.inner.lock().group_reads += 1;
                let f = store
                    .fetch(&key.queue(), after, usize::from(limit), usize::MAX)
                    .unwrap();
                let mut items = f.items;
                if self.inner.lock().chaos && !items.is_empty() {
                    items.reverse();
                    items.push(items[0].clone());
                }
                RelayToClient::Batch {
                    items,
                    next: f.next,
                    more: f.more,
                }
            }
            ClientToRelay::PutGroupChunk { key, id, data, .. } => {
                let queue = key.queue();
                let outcome = if !store.is_group_queue(&queue).unwrap() {
                    PutOutcome::Rejected {
                        code: kkachi_protocol::ErrorCode::NoQueue,
                        message: "no group queue here for this key; open it".into(),
                    }
                } else if ChunkId::of(&data) != id {
                    PutOutcome::Rejected {
                        code: kkachi_protocol::ErrorCode::Malformed,
                        message: "not its id".into(),
                    }
                } else {
                    let mut inner = self.inner.lock();
                    inner.group_chunk_puts += 1;
                    inner
                        .chunks
                        .entry(relay.to_string())
                        .or_default()
                        .insert((queue, id), (WriteId(queue.0), data));
                    PutOutcome::Stored
                };
                RelayToClient::Stored {
                    outcomes: vec![outcome],
                    epoch: store.epoch(),
                }
            }
            ClientToRelay::HasGroupChunks { key, ids } => {
                let inner = self.inner.lock();
                let held = inner.chunks.get(&relay.to_string());
                RelayToClient::ChunksHeld {
                    held: ids
                        .iter()
                        .map(|id| held.is_some_and(|h| h.contains_key(&(key.queue(), *id))))
                        .collect(),
                }
            }
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
        inner.direct_puts += 1;
        if inner.refusing.contains(&peer) {
            return Ok(RelayToClient::error(
                kkachi_protocol::ErrorCode::NotOwner,
                "this client takes direct deliveries from its contacts only",
            ));
        }
        let n = envelopes.len();
        inner
            .direct_inbox
            .entry(peer)
            .or_default()
            .extend(envelopes);
        Ok(RelayToClient::Stored {
            outcomes: vec![PutOutcome::Stored; n],
            epoch: 0,
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
    engine: Engine<FakeNet>,
    card: Card,
    relays: Vec<Multiaddr>,
    _dir: tempfile::TempDir,
}

/// An engine as a one-shot command runs it: delivering, receiving when asked.
fn engine(store: LocalStore, me: kkachi_protocol::Identity, net: &FakeNet) -> Engine<FakeNet> {
    Engine::start(store, me, net.clone(), None, Mode::ONE_SHOT)
}

impl User {
    fn new(net: &FakeNet, name: &str, relays: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let relays: Vec<Multiaddr> = (0..relays).map(|_| net.add_relay()).collect();
        let (store, me, card) = LocalStore::provision(dir.path(), name, &relays).unwrap();
        Self {
            engine: engine(store, me, net),
            card,
            relays,
            _dir: dir,
        }
    }

    /// A user whose engine has told its relays what to grant.
    async fn started(net: &FakeNet, name: &str, relays: usize) -> Self {
        let user = Self::new(net, name, relays);
        user.engine.settle().await.unwrap();
        user
    }

    /// Tells our relays again what to grant (contacts were written straight to the
    /// store), and waits until they have it.
    async fn regrant(&self) {
        self.engine.housekeeping().await.unwrap();
        self.engine.settle().await.unwrap();
    }

    fn peer(&self) -> PeerId {
        self.engine.identity().peer_id()
    }

    /// This device as the network knows it (its transport identity).
    fn device(&self) -> PeerId {
        self.engine
            .identity()
            .transport_keypair()
            .public()
            .to_peer_id()
    }

    /// Adds `other` as a user does: through the engine, so its network is told whose
    /// devices to let in.
    async fn add_contact_live(&self, other: &User) -> Contact {
        self.engine
            .add_contact(other.card.clone(), None)
            .await
            .unwrap();
        self.engine.store().contact(&other.peer()).unwrap().unwrap()
    }

    fn add_contact(&self, other: &User) -> Contact {
        let contact = Contact::new(other.peer(), other.card.name().into(), other.card.clone());
        let mut w = WriteSet::default();
        LocalStore::write_contact(&mut w, &contact);
        self.engine.store().apply(w).unwrap();
        contact
    }

    /// What waits at each of our relays, taken in (and its receipts sent).
    async fn sync(&self) -> Vec<Received> {
        self.engine
            .sync(Duration::from_secs(10))
            .await
            .unwrap()
            .shown
    }

    /// Seals `text` for `to`; returns once it is durable (its delivery under way).
    async fn queue(&self, to: &Contact, text: &str) -> (Queued, mpsc::Receiver<SendEvent>) {
        let mut sending = self.engine.send(to.peer, text.into()).await.unwrap();
        assert!(matches!(
            sending.events.recv().await,
            Some(SendEvent::Durable)
        ));
        (sending.queued, sending.events)
    }

    /// Queues a message carrying `file` for `to`; returns once it is durable.
    async fn queue_file(&self, to: &Contact, file: kkachi_protocol::file::FileRef) {
        let mut sending = self
            .engine
            .send_file(to.peer, file, WriteSet::default())
            .await
            .unwrap();
        assert!(matches!(
            sending.events.recv().await,
            Some(SendEvent::Durable)
        ));
    }

    /// Sends `text` to `to`, lets every path be tried once, and says how far it got.
    async fn send(&self, to: &Contact, text: &str) -> (Queued, Progress) {
        let (q, mut events) = self.queue(to, text).await;
        self.engine.settle().await.unwrap();
        let mut progress = Progress {
            acked: 0,
            total: to.card.relays().len() as u8,
            direct: false,
        };
        while let Ok(event) = events.try_recv() {
            match event {
                SendEvent::Progress(p) => progress = p,
                SendEvent::Delivered { direct } => progress.direct |= direct,
                _ => {}
            }
        }
        (q, progress)
    }

    /// Every path of every entry is tried now; how far entry `key` got (None: done).
    async fn deliver(&self, key: u64) -> Option<Progress> {
        self.engine.deliver_now().await.unwrap();
        self.engine.progress(key).await.unwrap()
    }

    fn messages(&self, with: &User) -> Vec<MessageRecord> {
        self.engine.store().messages(&with.peer()).unwrap()
    }

    /// Seals `content` exactly as given (any seq, prev, body) for `to` through our
    /// session with them, as a modified client could, and puts it on their relays.
    async fn send_raw(&self, to: &Contact, content: &Content) -> Envelope {
        let envelope = self.seal_raw(to, content).await;
        self.put_raw(to, envelope.clone()).await;
        envelope
    }

    /// Seals `content` exactly as given for `to` through our session with them (only
    /// the card's device of theirs), and hands the envelope back unsent.
    async fn seal_raw(&self, to: &Contact, content: &Content) -> Envelope {
        let (to, content) = (to.clone(), content.clone());
        self.engine
            .change(move |state, now| {
                state.with_sessions(|this, sessions| {
                    let session = sessions.get(&this.store, &to)?;
                    let envelope = this.seal_envelope(&to, session, &content, now)?;
                    let mut w = WriteSet::default();
                    session.write(&mut w, &to.peer);
                    this.apply_or_reset(sessions, w)?;
                    Ok(envelope)
                })
            })
            .await
            .unwrap()
    }

    /// Puts `envelope` on `to`'s relays as it is: with our capability there, or with
    /// the contact-request capability of their card where they granted us none.
    async fn put_raw(&self, to: &Contact, envelope: Envelope) {
        for relay in to.card.relays() {
            let peer = crate::engine::state::relay_peer(relay).unwrap();
            let ours = self
                .engine
                .identity()
                .write_key_for(to.card.identity(), &peer);
            let request = *to.card.request_key_at(&peer).unwrap();
            for write in [ours, request] {
                let put = ClientToRelay::Put {
                    items: vec![Addressed {
                        write,
                        envelope: envelope.clone(),
                    }],
                };
                let answer = self.engine.net().request(relay, put).await;
                if !matches!(&answer, Ok(RelayToClient::Stored { outcomes, .. })
                    if matches!(outcomes[0], PutOutcome::Rejected { code: kkachi_protocol::ErrorCode::NoQueue, .. }))
                {
                    break;
                }
            }
        }
    }

    /// This user's inbox queue at `relay`.
    fn inbox(&self, relay: &Multiaddr) -> kkachi_protocol::QueueId {
        let peer = crate::engine::state::relay_peer(relay).unwrap();
        self.engine.identity().inbox_key(&peer).queue()
    }

    fn contact_of(&self, peer: &PeerId) -> Option<Contact> {
        self.engine.store().contact(peer).unwrap()
    }

    /// Stops the engine and starts it again on the same store, as after a restart.
    async fn restart(&mut self, net: &FakeNet) {
        let me = self.engine.identity().clone();
        self.engine.shutdown().await.unwrap();
        let store = self.engine.store().clone();
        self.engine = engine(store, me, net);
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
        let _ = bob.send(alice_c, &format!("b{round}")).await;
        alice.sync().await;
        bob.sync().await;
    }
}

async fn pair(net: &FakeNet) -> (User, User, Contact, Contact) {
    let alice = User::started(net, "alice", 3).await;
    let bob = User::started(net, "bob", 3).await;
    let bob_at_alice = alice.add_contact(&bob);
    let alice_at_bob = bob.add_contact(&alice);
    alice.regrant().await;
    bob.regrant().await;
    (alice, bob, bob_at_alice, alice_at_bob)
}
