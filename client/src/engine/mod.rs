//! The delivery engine: everything between "the user pressed send" and "the contact's
//! device has it", and the way back.
//!
//! Sending: a message is sealed, wrapped in an envelope, and written to the local
//! store *with* the session state that sealed it, in one write set, then flushed;
//! only then does `send` return. Delivery writes the envelope to every inbox relay of
//! the recipient concurrently (and directly when connected, that request first) and
//! retries each path that has not acknowledged, with exponential backoff and jitter,
//! until the contact's delivery receipt arrives. The terminal UI's sends start
//! delivering as soon as they are sealed (a bounded number ahead of the disk). States:
//! queued → relayed n/N → delivered → read.
//!
//! Receiving (`receive.rs`): each envelope from any relay or path, on its own, is
//! deduplicated by envelope id and message id, opened and stored; a view of the store
//! may show it then. Once durable it is answered with a receipt, and only then deleted
//! from the relay. Sequence gaps and breaks in a contact's hash chain are recorded and
//! shown. First messages from people who are not contacts are held as requests.
//!
//! Contacts (`contacts.rs`): adding, accepting a request (its held messages then go
//! through the receive path), blocking, removing, renaming; all under the engine's
//! lock, like everything that touches sessions.

mod contacts;
mod receive;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use kkachi_protocol::envelope::DEFAULT_TTL_SECS;
use kkachi_protocol::session::MAX_UNSAVED_SEALS;
use kkachi_protocol::wire::PutOutcome;
use kkachi_protocol::{
    Body, ClientToRelay, Content, Envelope, Identity, MailboxId, MessageId, Multiaddr, PeerId,
    RelayToClient,
};
use rand::Rng;
use thiserror::Error;
use tokio::sync::{Mutex, broadcast};
use tokio::task::JoinHandle;

use crate::net::{NetError, Transport};
use crate::store::{
    Contact, Direction, LocalStore, MessageRecord, MessageState, OutboxEntry, OutboxKind,
    StoreError, Target, TreeId, WriteSet, message_key,
};

pub use contacts::{ContactError, ContactOutcome};
pub use receive::{Received, Verdict};

/// How long one delivery attempt to one relay may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry delay after a failed attempt; doubles up to [`MAX_BACKOFF_MS`].
pub const MIN_BACKOFF_MS: u64 = 500;
/// Longest wait between attempts to one relay (a relay that comes back is retried
/// within this, or at once when we connect to it for another reason).
pub const MAX_BACKOFF_MS: u64 = 15_000;
/// How often a message every relay acknowledged, but the contact has not, is put again
/// (a relay may have lost it).
pub const REPUT_AFTER_MS: u64 = 3_600_000;
/// Deliveries attempted at once.
const PARALLEL_DELIVERIES: usize = 16;
/// Capacity of the application event channel.
const EVENT_CAPACITY: usize = 1024;

/// Failures the user can act on.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The message is invalid (too long, ...).
    #[error("{0}")]
    Invalid(String),
    /// Encryption failed.
    #[error("encryption failed: {0}")]
    Session(#[from] kkachi_protocol::SessionError),
    /// A change to contacts was refused.
    #[error(transparent)]
    Contact(#[from] ContactError),
}

/// Something the user interface may want to show.
#[derive(Debug, Clone)]
pub enum AppEvent {
    /// A new message is in the store, not yet on disk: a view of the store (the
    /// terminal UI) may show it now. If the process dies before the disk has it, it was
    /// never acknowledged, so it arrives again after a restart and is stored once.
    /// [`AppEvent::Message`] follows once it is durable.
    Incoming(Received),
    /// A new message is durable. Sent exactly once per message, even across a crash:
    /// for output that cannot be taken back (the daemon's stream of messages).
    Message(Received),
    /// An outgoing message changed state.
    State {
        /// The contact.
        contact: PeerId,
        /// The message.
        id: MessageId,
        /// Its new state.
        state: MessageState,
    },
    /// An outgoing message was handed to the contact's device directly (it is
    /// [`MessageState::Delivered`]), by whichever delivery did it (two racing
    /// deliveries may both announce it).
    HandedOver {
        /// The contact.
        contact: PeerId,
        /// The message.
        id: MessageId,
    },
    /// A contact was added, changed (new relays or name), blocked or removed.
    ContactUpdated(PeerId),
    /// Someone who is not a contact sent a message; it is held as a request.
    Request(PeerId),
    /// A relay answered (true) or failed (false).
    Relay {
        /// Its address.
        addr: String,
        /// Reachable.
        up: bool,
    },
}

/// A message made durable by [`Engine::send_text`].
#[derive(Debug, Clone, Copy)]
pub struct Queued {
    /// The message id.
    pub id: MessageId,
    /// Its outbox key.
    pub outbox_key: u64,
}

/// How far a delivery got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Paths (relays, direct) that acknowledged.
    pub acked: u8,
    /// The contact's relays.
    pub total: u8,
    /// Handed to the contact directly.
    pub direct: bool,
}

/// Live end-to-end sessions by contact, written through to the store.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    live: HashMap<PeerId, kkachi_protocol::Session>,
}

impl Sessions {
    /// The live session with `contact`, loaded from the store the first time.
    pub(crate) fn get(
        &mut self,
        store: &LocalStore,
        contact: &Contact,
    ) -> Result<&mut kkachi_protocol::Session, StoreError> {
        Ok(match self.live.entry(contact.peer) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                // What is on disk may lag packets already handed out (see
                // `Engine::send_text_and_deliver`): skip past them.
                let mut session = store.session(contact)?;
                session.resume_after_restart();
                v.insert(session)
            }
        })
    }

    /// Forgets in-memory state after a failed write, so memory never runs ahead of disk.
    pub(crate) fn reset(&mut self) {
        self.live.clear();
    }

    /// Forgets the live session with `peer` (removed, or blocked: its state is gone
    /// from the store too).
    pub(crate) fn forget(&mut self, peer: &PeerId) {
        self.live.remove(peer);
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The engine: local store, identity and a network.
#[derive(Debug)]
pub struct Engine<T> {
    store: LocalStore,
    me: Identity,
    net: T,
    /// Serialises read-modify-write of sessions, conversations and the outbox, and
    /// holds the live sessions: their unanswered handshakes exist only in memory.
    lock: Mutex<Sessions>,
    events: broadcast::Sender<AppEvent>,
    /// Outbox entries being delivered right now, so an outbox pass leaves them alone.
    in_flight: parking_lot::Mutex<HashSet<u64>>,
    /// Woken when something was queued that nobody is delivering yet (receipts).
    outbox_wake: tokio::sync::Notify,
    /// Write tickets of messages handed to the network before their write was durable;
    /// at most [`MAX_UNSAVED_SEALS`] at once.
    unsaved: parking_lot::Mutex<Vec<u64>>,
    /// Our own card as of its version: every first message carries it.
    card: parking_lot::Mutex<Option<kkachi_protocol::Card>>,
    /// Envelopes refused because reading them panicked (a bug) since start.
    faults: std::sync::atomic::AtomicU64,
}

/// Marks an outbox entry as being delivered until dropped.
struct InFlight<'a> {
    set: &'a parking_lot::Mutex<HashSet<u64>>,
    key: u64,
}

impl<'a> InFlight<'a> {
    /// Claims `key`, unless someone is delivering it already.
    fn claim(set: &'a parking_lot::Mutex<HashSet<u64>>, key: u64) -> Option<Self> {
        // Not `then_some`: a claim built and dropped for a key already taken would
        // release the other claimant's key (and lock the set while it is held).
        let fresh = set.lock().insert(key);
        fresh.then(|| Self { set, key })
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
    }
}

/// Marks the place [`Engine::claim_unsaved`] took for a message not yet written.
const UNSAVED_UNWRITTEN: u64 = u64::MAX;

/// One path's answer during a delivery.
enum Attempt {
    Relay(String, Result<RelayToClient, NetError>),
    Direct(bool),
}

fn is_ack(outcome: &PutOutcome) -> bool {
    matches!(outcome, PutOutcome::Stored | PutOutcome::Duplicate)
}

/// Exponential backoff with full jitter: up to min(max, min·2^attempts).
fn backoff_ms(attempts: u32) -> u64 {
    let cap = MIN_BACKOFF_MS
        .saturating_mul(1 << attempts.min(16))
        .min(MAX_BACKOFF_MS);
    rand::thread_rng().gen_range(cap / 2..=cap)
}

/// Delay before retrying after `failures` consecutive failures.
pub fn backoff_delay(failures: u32) -> Duration {
    Duration::from_millis(backoff_ms(failures))
}

impl<T: Transport> Engine<T> {
    /// An engine over an opened store for `me`.
    pub fn new(store: LocalStore, me: Identity, net: T) -> Arc<Self> {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Arc::new(Self {
            store,
            me,
            net,
            lock: Mutex::new(Sessions::default()),
            events,
            in_flight: parking_lot::Mutex::default(),
            outbox_wake: tokio::sync::Notify::new(),
            unsaved: parking_lot::Mutex::default(),
            card: parking_lot::Mutex::default(),
            faults: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Our card as it stands, signed once per version of it (relays change its version).
    fn own_card(&self) -> Result<kkachi_protocol::Card, EngineError> {
        let version = self
            .store
            .profile()?
            .map(|p| p.card_version)
            .ok_or(StoreError::Corrupt("profile"))?;
        let mut cached = self.card.lock();
        if let Some(card) = cached.as_ref().filter(|c| c.version() == version) {
            return Ok(card.clone());
        }
        let card = self.store.own_card(&self.me)?;
        *cached = Some(card.clone());
        Ok(card)
    }

    /// Resolves when something was queued that nobody is delivering yet (receipts for
    /// messages just received): the daemon then runs an outbox pass at once instead of
    /// at its next tick, so receipts leave one by one instead of in bursts.
    pub async fn outbox_queued(&self) {
        self.outbox_wake.notified().await;
    }

    /// How many envelopes were refused since start because reading them panicked: a
    /// bug in kkachi, which the log names. The rest of their batch went on.
    pub fn faults(&self) -> u64 {
        self.faults.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The local store.
    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    /// The user's identity.
    pub fn identity(&self) -> &Identity {
        &self.me
    }

    /// The network.
    pub fn net(&self) -> &T {
        &self.net
    }

    /// Subscribes to application events.
    pub fn subscribe(&self) -> broadcast::Receiver<AppEvent> {
        self.events.subscribe()
    }

    fn emit(&self, event: AppEvent) {
        // No subscribers is fine; lagging ones miss old events and re-read the store.
        let _ = self.events.send(event);
    }

    /// Seals `content` for `contact` into a fresh envelope (default lifetime from `now`).
    fn seal_envelope(
        &self,
        contact: &Contact,
        session: &mut kkachi_protocol::Session,
        content: &Content,
        now: u64,
    ) -> Result<Envelope, EngineError> {
        let packet = session.seal(
            &self.me,
            &self.own_card()?,
            &content.encode(),
            now / 1000,
            &mut rand_core::OsRng,
        )?;
        Ok(Envelope {
            mailbox: MailboxId::for_peer(&contact.peer),
            expires_at: now / 1000 + DEFAULT_TTL_SECS,
            payload: packet,
        })
    }

    /// Seals `content` for `contact` with `session` and adds the envelope to `w` as an
    /// outbox entry. The caller holds the lock, writes `session` into `w` and applies
    /// it: the session state and the packet it sealed become durable together.
    fn seal_into(
        &self,
        w: &mut WriteSet,
        contact: &Contact,
        session: &mut kkachi_protocol::Session,
        content: &Content,
        kind: OutboxKind,
        now: u64,
    ) -> Result<(u64, OutboxEntry), EngineError> {
        let envelope = self.seal_envelope(contact, session, content, now)?;
        let targets = contact
            .card
            .relays()
            .iter()
            .map(|addr| Target {
                addr: addr.to_string(),
                acked: false,
                attempts: 0,
                next_try_ms: 0,
            })
            .collect();
        let key = self.store.next_outbox_seq()?;
        let entry = OutboxEntry {
            message_id: content.id.0,
            contact: contact.peer.to_bytes(),
            envelope: envelope.encode(),
            targets,
            direct_acked: false,
            kind,
            created_ms: now,
        };
        LocalStore::write_outbox(w, key, &entry);
        Ok((key, entry))
    }

    /// Makes a text message durable in the outbox. Returns once it is on disk; nothing
    /// has been sent yet (see [`Engine::deliver`]).
    pub async fn send_text(&self, contact: &Contact, text: &str) -> Result<Queued, EngineError> {
        let (queued, ()) = self.queue_text(contact, text, |_, _| ()).await?;
        self.store.flush().await?;
        // Talking to them: try for a direct path while the relays carry this one.
        self.net.seek_direct(contact.peer, contact.card.relays());
        Ok(queued)
    }

    /// [`Engine::send_text`], and delivers it in a task of its own (the handle says how
    /// far it got). The delivery starts as soon as the message is sealed, while it is
    /// written and made durable; this returns, like `send_text`, only once it is
    /// durable. A crash in between may let the message reach the contact while losing
    /// the sender's copy; at most [`MAX_UNSAVED_SEALS`] messages are ever out before
    /// their write is durable, which is what a session skips on loading, so no counter
    /// repeats.
    pub async fn send_text_and_deliver(
        self: &Arc<Self>,
        contact: &Contact,
        text: &str,
        attempt_timeout: Duration,
    ) -> Result<(Queued, JoinHandle<Result<Option<Progress>, EngineError>>), EngineError> {
        let start = |key: u64, entry: Option<OutboxEntry>| {
            let engine = self.clone();
            tokio::spawn(async move { engine.hand_over(key, entry, true, attempt_timeout).await })
        };
        let (queued, early) = self
            .queue_text(contact, text, |key, entry| {
                self.claim_unsaved().then(|| start(key, Some(entry)))
            })
            .await?;
        if let Err(e) = self.store.flush().await {
            if let Some(delivery) = early {
                delivery.abort();
            }
            return Err(e.into());
        }
        // Past the bound, it leaves now that it is durable.
        let delivery = early.unwrap_or_else(|| start(queued.outbox_key, None));
        self.net.seek_direct(contact.peer, contact.card.relays());
        Ok((queued, delivery))
    }

    /// Takes one of the [`MAX_UNSAVED_SEALS`] places for a message handed out before
    /// its write is durable; false if they are all taken. The place is held until the
    /// write that [`Engine::settle_unsaved`] then names is durable.
    fn claim_unsaved(&self) -> bool {
        let mut unsaved = self.unsaved.lock();
        unsaved.retain(|t| !self.store.is_durable(*t));
        let free = (unsaved.len() as u64) < MAX_UNSAVED_SEALS;
        if free {
            unsaved.push(UNSAVED_UNWRITTEN);
        }
        free
    }

    /// The place taken by the last [`Engine::claim_unsaved`] is held until `ticket` is
    /// durable (the caller held the session lock from the claim until its write).
    fn settle_unsaved(&self, ticket: u64) {
        if let Some(t) = self
            .unsaved
            .lock()
            .iter_mut()
            .find(|t| **t == UNSAVED_UNWRITTEN)
        {
            *t = ticket;
        }
    }

    /// Seals `text` for `contact` into the outbox and history, applied but not yet
    /// durable. `sealed` sees the outbox entry once it is sealed, before it is written
    /// (to start delivering it), with the session lock held.
    async fn queue_text<R>(
        &self,
        contact: &Contact,
        text: &str,
        sealed: impl FnOnce(u64, OutboxEntry) -> R,
    ) -> Result<(Queued, R), EngineError> {
        if text.trim().is_empty() {
            return Err(EngineError::Invalid("the message is empty".into()));
        }
        if self.store.blocked(&contact.peer)?.is_some() {
            return Err(ContactError::Blocked(contact.name.clone()).into());
        }
        let now = now_ms();
        let mut sessions = self.lock.lock().await;
        let mut conv = self.store.conversation(&contact.peer)?;
        let seq = conv.next_seq.max(1);
        let content = Content {
            id: MessageId(rand::random()),
            seq,
            prev: conv.last_hash,
            sent_at_ms: now,
            body: Body::Text(text.to_owned()),
        };
        content
            .check()
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        let mut w = WriteSet::default();
        let session = sessions.get(&self.store, contact)?;
        let (outbox_key, entry) =
            self.seal_into(&mut w, contact, session, &content, OutboxKind::Message, now)?;
        LocalStore::write_session(&mut w, &contact.peer, session);
        conv.next_seq = seq + 1;
        conv.last_hash = content.hash();
        let local = conv.next_local;
        conv.next_local += 1;
        LocalStore::write_conversation(&mut w, &contact.peer, &conv);
        let record = MessageRecord {
            id: content.id.0,
            direction: Direction::Out,
            text: text.to_owned(),
            state: MessageState::Queued,
            sent_at_ms: now,
            stored_at_ms: now,
            seq,
            prev: content.prev,
        };
        LocalStore::write_message(
            &mut w,
            &contact.peer,
            message_key(&contact.peer, local),
            &record,
        );
        let early = sealed(outbox_key, entry);
        // A task woken from here runs only once this one yields: let the delivery put
        // the packet on the wire before the write below.
        tokio::task::yield_now().await;
        let applied = self.store.apply(w);
        // Counted even if the write failed: what left must not be sealed again.
        self.settle_unsaved(self.store.write_ticket());
        if let Err(e) = applied {
            sessions.reset();
            return Err(e.into());
        }
        let queued = Queued {
            id: content.id,
            outbox_key,
        };
        Ok((queued, early))
    }

    /// Queues a control record (receipt, card update) for `contact` sealed with
    /// `session`. Caller holds the lock, writes the session and applies `w`.
    fn queue_control(
        &self,
        w: &mut WriteSet,
        contact: &Contact,
        session: &mut kkachi_protocol::Session,
        body: Body,
        now: u64,
    ) -> Result<(), EngineError> {
        let content = Content {
            id: MessageId(rand::random()),
            seq: 0,
            prev: [0; 32],
            sent_at_ms: now,
            body,
        };
        self.seal_into(w, contact, session, &content, OutboxKind::Control, now)?;
        Ok(())
    }

    /// Queues `card` for every contact (after a relay change), sealed and durable.
    pub async fn queue_card_updates(
        &self,
        card: &kkachi_protocol::Card,
    ) -> Result<(), EngineError> {
        let now = now_ms();
        let mut sessions = self.lock.lock().await;
        let mut w = WriteSet::default();
        for contact in self.store.contacts()?.iter() {
            // Someone blocked does not learn where we moved.
            if self.store.blocked(&contact.peer)?.is_some() {
                continue;
            }
            let session = sessions.get(&self.store, contact)?;
            self.queue_control(
                &mut w,
                contact,
                session,
                Body::CardUpdate(Box::new(card.clone())),
                now,
            )?;
            LocalStore::write_session(&mut w, &contact.peer, session);
        }
        if let Err(e) = self.store.apply(w) {
            sessions.reset();
            return Err(e.into());
        }
        self.store.flush().await?;
        Ok(())
    }

    /// Marks the incoming messages of `peer` as read and tells them (read receipts).
    pub async fn mark_read(&self, peer: &PeerId) -> Result<(), EngineError> {
        let Some(contact) = self.store.contact(peer)? else {
            return Ok(());
        };
        if self.store.blocked(peer)?.is_some() {
            return Ok(()); // they learn nothing, read receipts included
        }
        let now = now_ms();
        {
            let mut sessions = self.lock.lock().await;
            let unread: Vec<MessageRecord> = self
                .store
                .recent_messages(peer, 500)?
                .into_iter()
                .filter(|m| m.direction == Direction::In && m.state == MessageState::Received)
                .collect();
            if unread.is_empty() {
                return Ok(());
            }
            let mut w = WriteSet::default();
            let mut ids = Vec::new();
            for m in unread {
                if let Some((key, mut record)) = self.store.message(peer, &MessageId(m.id))? {
                    record.state = MessageState::Read;
                    w.put_record(TreeId::Messages, key, &record);
                    ids.push(MessageId(m.id));
                }
            }
            for chunk in ids.chunks(kkachi_protocol::content::MAX_RECEIPT_IDS) {
                let session = sessions.get(&self.store, &contact)?;
                let receipt = Body::Receipt {
                    status: kkachi_protocol::ReceiptStatus::Read,
                    ids: chunk.to_vec(),
                };
                self.queue_control(&mut w, &contact, session, receipt, now)?;
                LocalStore::write_session(&mut w, &contact.peer, session);
            }
            if let Err(e) = self.store.apply(w) {
                sessions.reset();
                return Err(e.into());
            }
        }
        self.store.flush().await?;
        self.deliver_due().await?;
        Ok(())
    }

    /// Tries every path of one outbox entry that has not acknowledged and is due (or all
    /// of them if `force`), concurrently, each bounded by `attempt_timeout`.
    pub async fn deliver(
        &self,
        key: u64,
        force: bool,
        attempt_timeout: Duration,
    ) -> Result<Option<Progress>, EngineError> {
        // Nothing leaves before the write that sealed it is durable (free when it is).
        self.store.flush().await?;
        self.hand_over(key, None, force, attempt_timeout).await
    }

    /// [`Engine::deliver`] without making sure the entry is durable first: sends outbox
    /// entry `key` on each due path. `sealed` is the entry as sealed and not yet written
    /// (None: read it). The direct path goes first: when the contact is connected, it is
    /// the one that shows the message. Results are recorded once the entry is written
    /// (under the session lock, which its writer holds until then).
    async fn hand_over(
        &self,
        key: u64,
        sealed: Option<OutboxEntry>,
        force: bool,
        attempt_timeout: Duration,
    ) -> Result<Option<Progress>, EngineError> {
        // Marked while it runs, unless an outbox pass claimed it (that pass releases it).
        let _in_flight = InFlight::claim(&self.in_flight, key);
        let entry = match sealed {
            Some(entry) => entry,
            None => match self.outbox_entry(key)? {
                Some(entry) => entry,
                None => return Ok(None),
            },
        };
        let now = now_ms();
        let envelope = Envelope::decode(&entry.envelope)
            .map_err(|e| EngineError::Invalid(format!("outbox envelope unreadable: {e}")))?;
        let contact_peer = PeerId::from_bytes(&entry.contact)
            .map_err(|_| StoreError::Corrupt("outbox contact"))?;
        let due: Vec<String> = entry
            .targets
            .iter()
            .filter(|t| !t.acked && (force || t.next_try_ms <= now))
            .map(|t| t.addr.clone())
            .collect();
        let direct = !entry.direct_acked && self.net.direct_peers().contains(&contact_peer);
        // Polled in the order pushed: the direct request is the first to leave.
        let mut attempts = futures::stream::FuturesUnordered::new();
        if direct {
            let envelope = envelope.clone();
            attempts.push(
                async move {
                    let r = tokio::time::timeout(attempt_timeout, self.net.direct_put(contact_peer, vec![envelope])).await;
                    Attempt::Direct(matches!(r, Ok(Ok(RelayToClient::Stored { ref outcomes })) if outcomes.first().is_some_and(is_ack)))
                }
                .boxed(),
            );
        }
        for addr in due {
            let envelope = envelope.clone();
            attempts.push(
                async move {
                    let result = match addr.parse::<Multiaddr>() {
                        Ok(relay) => {
                            let request = ClientToRelay::Put {
                                envelopes: vec![envelope],
                            };
                            match tokio::time::timeout(
                                attempt_timeout,
                                self.net.request(&relay, request),
                            )
                            .await
                            {
                                Ok(r) => r,
                                Err(_) => Err(NetError::Unreachable("timed out".into())),
                            }
                        }
                        Err(e) => Err(NetError::Unreachable(format!("bad relay address: {e}"))),
                    };
                    Attempt::Relay(addr, result)
                }
                .boxed(),
            );
        }
        // Record each path as it answers, so progress is visible before the slowest.
        let mut progress = None;
        while let Some(attempt) = attempts.next().await {
            let (results, direct_ok) = match attempt {
                Attempt::Relay(addr, result) => (vec![(addr, result)], false),
                Attempt::Direct(ok) => (vec![], ok),
            };
            // The contact has it durably, whatever becomes of the bookkeeping (its
            // receipt may even have removed the entry already). Told before the entry
            // goes, so whoever sees it gone has the event.
            if direct_ok && entry.kind == OutboxKind::Message {
                self.emit(AppEvent::HandedOver {
                    contact: contact_peer,
                    id: MessageId(entry.message_id),
                });
            }
            progress = self
                .record_attempts(key, &contact_peer, results, direct_ok)
                .await?
                .or(progress);
        }
        match progress {
            Some(p) => Ok(Some(p)),
            None => Ok(self.progress(key)?),
        }
    }

    /// How far an outbox entry has got (None once it is gone).
    pub fn progress(&self, key: u64) -> Result<Option<Progress>, EngineError> {
        Ok(self.outbox_entry(key)?.map(|e| Progress {
            acked: e.acked_count(),
            total: e.targets.len() as u8,
            direct: e.direct_acked,
        }))
    }

    fn outbox_entry(&self, key: u64) -> Result<Option<OutboxEntry>, EngineError> {
        Ok(self.store.outbox_entry(key)?)
    }

    /// Merges attempt results into the stored entry (it may have changed meanwhile).
    async fn record_attempts(
        &self,
        key: u64,
        contact: &PeerId,
        results: Vec<(String, Result<RelayToClient, NetError>)>,
        direct_ok: bool,
    ) -> Result<Option<Progress>, EngineError> {
        let _sessions = self.lock.lock().await;
        let Some(mut entry) = self.outbox_entry(key)? else {
            return Ok(None); // delivered and removed meanwhile
        };
        let now = now_ms();
        for (addr, result) in results {
            let Some(target) = entry.targets.iter_mut().find(|t| t.addr == addr) else {
                continue;
            };
            let acked = match &result {
                Ok(RelayToClient::Stored { outcomes }) => outcomes.first().is_some_and(is_ack),
                _ => false,
            };
            if acked {
                target.acked = true;
                self.note_relay(&addr, Ok(()));
            } else {
                target.attempts = target.attempts.saturating_add(1);
                target.next_try_ms = now + backoff_ms(target.attempts);
                match result {
                    // The relay answered but refused: it is up.
                    Ok(answer) => {
                        tracing::debug!(relay = %addr, ?answer, "relay refused the envelope")
                    }
                    Err(e) => {
                        tracing::debug!(relay = %addr, error = %e, "relay unreachable");
                        self.note_relay(&addr, Err(e.to_string()));
                    }
                }
            }
        }
        entry.direct_acked |= direct_ok;
        let progress = Progress {
            acked: entry.acked_count(),
            total: entry.targets.len() as u8,
            direct: entry.direct_acked,
        };
        let mut w = WriteSet::default();
        let all_paths_done = entry.targets.iter().all(|t| t.acked) || entry.direct_acked;
        // A direct handover is answered only after the contact stored it durably: it
        // is delivered, and nothing more needs sending.
        if (entry.kind == OutboxKind::Control && all_paths_done) || entry.direct_acked {
            w.remove(TreeId::Outbox, key.to_be_bytes().to_vec());
        } else {
            LocalStore::write_outbox(&mut w, key, &entry);
        }
        if entry.kind == OutboxKind::Message && entry.direct_acked {
            self.advance_state(
                &mut w,
                contact,
                &MessageId(entry.message_id),
                MessageState::Delivered,
            )?;
        } else if entry.kind == OutboxKind::Message && progress.acked > 0 {
            let state = MessageState::Relayed {
                relayed: progress.acked,
                total: progress.total,
            };
            self.advance_state(&mut w, contact, &MessageId(entry.message_id), state)?;
        }
        self.store.apply(w)?;
        Ok(Some(progress))
    }

    /// Moves a stored message's state forward (never back) and tells the UI.
    fn advance_state(
        &self,
        w: &mut WriteSet,
        contact: &PeerId,
        id: &MessageId,
        state: MessageState,
    ) -> Result<bool, EngineError> {
        let Some((key, mut record)) = self.store.message(contact, id)? else {
            return Ok(false);
        };
        // Receipts are about what we sent: one naming their own messages changes nothing.
        if record.direction != Direction::Out || !record.state.advances_to(&state) {
            return Ok(false);
        }
        record.state = state;
        w.put_record(TreeId::Messages, key, &record);
        self.emit(AppEvent::State {
            contact: *contact,
            id: *id,
            state,
        });
        Ok(true)
    }

    /// Delivers every outbox entry with a path that is due; returns how many entries
    /// were attempted. Contacts with messages waiting and no direct path are asked for
    /// one (through their relays; the network backs off per contact).
    pub async fn deliver_due(&self) -> Result<usize, EngineError> {
        let now = now_ms();
        let direct = self.net.direct_peers();
        let mut waiting: HashSet<PeerId> = HashSet::new();
        let due: Vec<(u64, bool)> = self
            .store
            .outbox()?
            .into_iter()
            .filter_map(|(key, e)| {
                let relay_due = e.targets.iter().any(|t| !t.acked && t.next_try_ms <= now);
                let peer = PeerId::from_bytes(&e.contact).ok();
                if let Some(p) =
                    peer.filter(|p| e.kind == OutboxKind::Message && !direct.contains(p))
                {
                    waiting.insert(p);
                }
                let direct_due = !e.direct_acked && peer.is_some_and(|p| direct.contains(&p));
                // Every relay has it but no receipt yet: put again now and then, in
                // case a relay lost it.
                let reput = e.kind == OutboxKind::Message
                    && !e.targets.is_empty()
                    && e.targets.iter().all(|t| t.acked)
                    && now.saturating_sub(e.created_ms) > REPUT_AFTER_MS
                    && e.targets.iter().all(|t| t.next_try_ms <= now);
                (relay_due || direct_due || reput).then_some((key, reput))
            })
            .collect();
        for peer in waiting {
            if let Some(contact) = self.store.contact(&peer)? {
                self.net.seek_direct(peer, contact.card.relays());
            }
        }
        // Claim them, leaving out what another pass or a sender is delivering already.
        let claimed: Vec<(u64, bool, InFlight<'_>)> = due
            .into_iter()
            .filter_map(|(key, reput)| {
                InFlight::claim(&self.in_flight, key).map(|claim| (key, reput, claim))
            })
            .collect();
        let n = claimed.len();
        // One flush for the whole pass (as in `deliver`): each delivery's bookkeeping
        // is a write, so flushing per entry would go to the disk again and again.
        if n > 0 {
            self.store.flush().await?;
        }
        futures::stream::iter(claimed)
            .for_each_concurrent(PARALLEL_DELIVERIES, |(key, reput, _claim)| async move {
                if reput {
                    let _ = self.reset_targets(key).await;
                }
                if let Err(e) = self.hand_over(key, None, false, ATTEMPT_TIMEOUT).await {
                    tracing::warn!(error = %e, "delivery failed");
                }
            })
            .await;
        Ok(n)
    }

    /// Marks every relay of an entry as not yet acknowledged (to put it again).
    async fn reset_targets(&self, key: u64) -> Result<(), EngineError> {
        let _sessions = self.lock.lock().await;
        let Some(mut entry) = self.outbox_entry(key)? else {
            return Ok(());
        };
        let next = now_ms() + REPUT_AFTER_MS;
        for t in &mut entry.targets {
            t.acked = false;
            t.next_try_ms = 0;
            t.attempts = 0;
        }
        entry.created_ms = next - REPUT_AFTER_MS;
        let mut w = WriteSet::default();
        LocalStore::write_outbox(&mut w, key, &entry);
        self.store.apply(w)?;
        Ok(())
    }

    /// Makes every unacknowledged outbox path whose relay address satisfies `matches`
    /// due at `now`; true if any was waiting.
    pub async fn expedite(
        &self,
        matches: impl Fn(&str) -> bool,
        now: u64,
    ) -> Result<bool, EngineError> {
        let _sessions = self.lock.lock().await;
        let mut w = WriteSet::default();
        let mut any = false;
        for (key, mut entry) in self.store.outbox()? {
            let mut changed = false;
            for t in entry
                .targets
                .iter_mut()
                .filter(|t| !t.acked && t.next_try_ms > now && matches(&t.addr))
            {
                t.next_try_ms = now;
                changed = true;
            }
            if changed {
                any = true;
                LocalStore::write_outbox(&mut w, key, &entry);
            }
        }
        self.store.apply(w)?;
        Ok(any)
    }

    /// The earliest time any outbox path is due, for the daemon's sleep.
    pub fn next_due_ms(&self) -> Result<Option<u64>, EngineError> {
        Ok(self
            .store
            .outbox()?
            .iter()
            .flat_map(|(_, e)| e.targets.iter().filter(|t| !t.acked).map(|t| t.next_try_ms))
            .min())
    }
}
