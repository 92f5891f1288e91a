//! The local database (sled 0.34) in the user's home directory.
//!
//! Everything the client knows lives here: identity, profile, own relays, contacts and
//! their cards, end-to-end session states, conversations, messages with their states,
//! the outbox, per-relay cursors and seen envelope ids. Related changes are collected
//! in a [`WriteSet`] and applied all or nothing, then flushed: a message is in the
//! outbox, with the session state that sealed it, before anyone is told it was sent.
//!
//! All or nothing without sled's batches or transactions. In sled 0.34 each of those
//! seals the log buffer twice and hands both to sled's I/O pool, which wakes every idle
//! thread of the pool: about 0.45 ms of a message's way to the screen on two cores.
//! Writes are taken in turn instead; a set of several is first stored whole under one
//! journal key, then written key by key, then the journal key is removed. sled
//! recovers its log up to the first tear, so after a crash the disk holds a prefix of
//! these writes: if it holds any of a set's keys it holds the journal entry too, and
//! opening the store applies that entry again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kkachi_protocol::{Card, EnvelopeId, Identity, MessageId, Multiaddr, PeerId, Session};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::sequence::{ChainLink, Gaps};

mod requests;

pub use requests::{Blocked, HeldMessage, MAX_HELD_PER_SENDER, MAX_HELD_TOTAL, Request};

/// Local store failures.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Another kkachi process has the database open.
    #[error(
        "another kkachi process (daemon or tui) is using {0}; stop it, or run this command while it runs \
         (commands are forwarded to it)"
    )]
    Locked(PathBuf),
    /// sled failed.
    #[error("local database error: {0}")]
    Db(String),
    /// A record does not decode (a newer version wrote it, or corruption).
    #[error("local database record {0} is unreadable")]
    Corrupt(&'static str),
    /// The name or relays do not make a valid card.
    #[error("invalid card: {0}")]
    InvalidCard(String),
}

fn db(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// The user's own profile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Profile {
    /// Display name.
    pub name: String,
    /// Version counter of the user's own card; bumped when relays change.
    pub card_version: u64,
}

/// What the client knows about one of its own inbox relays.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayRecord {
    /// Full address, ending in `/p2p/<peer id>`.
    pub addr: String,
    /// Name from the relay's info, once fetched.
    pub name: String,
    /// Failure-domain label from the relay's info, once fetched.
    pub failure_domain: String,
    /// Mailbox cursor: everything up to here has been received.
    pub cursor: u64,
    /// Unix ms of the last successful exchange.
    pub last_ok_ms: Option<u64>,
    /// The last error, if the last exchange failed.
    pub last_error: Option<String>,
}

/// A contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    /// The contact's user id.
    pub peer: PeerId,
    /// The name shown locally (their card name unless the user chose another).
    pub name: String,
    /// Their latest signed card.
    pub card: Card,
}

#[derive(Serialize, Deserialize)]
struct ContactRecord {
    name: String,
    card: Vec<u8>,
}

/// Per-contact conversation bookkeeping.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Conversation {
    /// Sequence number of our next sequenced message to them.
    pub next_seq: u64,
    /// Hash of our last sequenced message to them.
    pub last_hash: [u8; 32],
    /// Which of their sequence numbers are missing: shown as gaps.
    pub gaps: Gaps,
    /// Their sequence numbers where the hash chain breaks: a message there does not
    /// follow the one before it (altered, replaced, or sent from a restored copy).
    pub chain_breaks: Vec<u64>,
    /// Their messages that claimed a sequence number another of theirs holds.
    pub conflicts: u64,
    /// Bytes of their messages stored, for [`MAX_STORED_PER_CONTACT`].
    pub received_bytes: u64,
    /// Their messages refused because of [`MAX_STORED_PER_CONTACT`].
    pub refused: u64,
    /// Local order counter for message keys.
    pub next_local: u64,
}

/// Most bytes of one contact's messages kept: past this, what they send is refused (and
/// counted), so a hostile contact cannot fill the disk. About two million short messages.
pub const MAX_STORED_PER_CONTACT: u64 = 256 << 20;

/// Which way a message went.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Direction {
    /// Received from the contact.
    In,
    /// Sent by us.
    Out,
}

/// Where an outgoing message is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum MessageState {
    /// Durable locally; no relay has it yet.
    Queued,
    /// Stored by `relayed` of `total` relays (or handed over directly).
    Relayed {
        /// Relays (and direct paths) that acknowledged.
        relayed: u8,
        /// Relays the contact has.
        total: u8,
    },
    /// The contact's device has it.
    Delivered,
    /// The contact has seen it.
    Read,
    /// An incoming message.
    Received,
}

impl MessageState {
    /// The word shown to users and in JSON.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Relayed { .. } => "relayed",
            Self::Delivered => "delivered",
            Self::Read => "read",
            Self::Received => "received",
        }
    }

    /// Rank for never moving a state backwards.
    fn rank(&self) -> u8 {
        match self {
            Self::Queued => 0,
            Self::Relayed { .. } => 1,
            Self::Received => 1,
            Self::Delivered => 2,
            Self::Read => 3,
        }
    }

    /// True if `next` would move this state forward (or add relays).
    pub fn advances_to(&self, next: &MessageState) -> bool {
        match (self, next) {
            (Self::Relayed { relayed: a, .. }, Self::Relayed { relayed: b, .. }) => b > a,
            _ => next.rank() > self.rank(),
        }
    }
}

/// One message in a conversation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageRecord {
    /// The sender's id for it.
    pub id: [u8; 16],
    /// In or out.
    pub direction: Direction,
    /// The text.
    pub text: String,
    /// Delivery state.
    pub state: MessageState,
    /// Sender's clock, Unix ms.
    pub sent_at_ms: u64,
    /// Our clock when stored, Unix ms.
    pub stored_at_ms: u64,
    /// The sender's sequence number.
    pub seq: u64,
    /// Hash of the sender's previous sequenced record (kept to seal again if needed).
    pub prev: [u8; 32],
}

/// What an outbox entry carries.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum OutboxKind {
    /// A conversation message: kept until the contact's delivery receipt.
    Message,
    /// A receipt or card update: kept until every relay (or the contact) has it.
    Control,
}

/// One relay an outbox entry must reach.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Target {
    /// The relay address.
    pub addr: String,
    /// It acknowledged (durably stored) the envelope.
    pub acked: bool,
    /// Attempts so far.
    pub attempts: u32,
    /// Not before this Unix ms.
    pub next_try_ms: u64,
}

/// An envelope waiting to be delivered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The message it carries.
    pub message_id: [u8; 16],
    /// The recipient.
    pub contact: Vec<u8>,
    /// The encoded envelope.
    pub envelope: Vec<u8>,
    /// The recipient's relays.
    pub targets: Vec<Target>,
    /// Handed to the contact directly (LAN).
    pub direct_acked: bool,
    /// What it is.
    pub kind: OutboxKind,
    /// Unix ms when queued.
    pub created_ms: u64,
}

impl OutboxEntry {
    /// Relays plus direct handovers that acknowledged.
    pub fn acked_count(&self) -> u8 {
        let relays = self.targets.iter().filter(|t| t.acked).count();
        (relays + usize::from(self.direct_acked)).min(usize::from(u8::MAX)) as u8
    }
}

/// Trees of the database, for [`WriteSet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeId {
    /// Identity and profile.
    Meta = 0,
    /// Own relays.
    Relays,
    /// Contacts.
    Contacts,
    /// Session states.
    Sessions,
    /// Conversations.
    Conversations,
    /// Messages by (contact, local order).
    Messages,
    /// Message id → message key.
    MessageIndex,
    /// Outbox by order.
    Outbox,
    /// Seen envelope ids.
    Seen,
    /// Messages held from people who are not contacts, by sender and message id.
    Requests,
    /// Blocked senders.
    Blocked,
    /// Each contact's received sequenced records, by sequence number: their hash chain.
    Chain,
    /// Received messages whose delivery receipt is not sealed yet.
    ReceiptsDue,
}

const TREES: [&str; 13] = [
    "meta",
    "relays",
    "contacts",
    "sessions",
    "conversations",
    "messages",
    "message_index",
    "outbox",
    "seen",
    "requests",
    "blocked",
    "chain",
    "receipts_due",
];

/// Changes to apply atomically.
#[derive(Debug, Default)]
pub struct WriteSet {
    ops: Vec<Op>,
}

/// Sets a key of a tree to a value, or (`None`) removes it.
type Op = (TreeId, Vec<u8>, Option<Vec<u8>>);

impl WriteSet {
    /// Sets `key` to `value` in `tree`.
    pub fn put(&mut self, tree: TreeId, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((tree, key.into(), Some(value.into())));
    }

    /// Sets `key` to a serialised record.
    pub fn put_record<T: Serialize>(&mut self, tree: TreeId, key: impl Into<Vec<u8>>, value: &T) {
        let bytes = postcard::to_stdvec(value).expect("records serialise");
        self.put(tree, key, bytes);
    }

    /// Removes `key` from `tree`.
    pub fn remove(&mut self, tree: TreeId, key: impl Into<Vec<u8>>) {
        self.ops.push((tree, key.into(), None));
    }

    /// True if nothing is to be written.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Appends another set's changes.
    pub fn extend(&mut self, other: WriteSet) {
        self.ops.extend(other.ops);
    }
}

/// Key of a message: contact peer bytes ‖ local order (big-endian).
pub fn message_key(contact: &PeerId, local: u64) -> Vec<u8> {
    let mut k = contact.to_bytes();
    k.extend_from_slice(&local.to_be_bytes());
    k
}

/// The local database.
#[derive(Debug, Clone)]
pub struct LocalStore {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    /// The write set being applied (see [`LocalStore::apply`]).
    journal: sled::Tree,
    writer: Arc<Writer>,
    path: PathBuf,
    contacts: Arc<ContactCache>,
    durability: Arc<Durability>,
    /// Outbox keys written since [`LocalStore::take_outbox_changes`] last took them: how
    /// the engine's scheduler learns of every change to the outbox, whoever made it.
    outbox_changes: Arc<parking_lot::Mutex<Vec<u64>>>,
}

/// Takes writes in turn.
#[derive(Debug, Default)]
struct Writer {
    /// Held while a write is applied.
    turn: parking_lot::Mutex<()>,
    /// A write failed part-way: none is taken until the journal has completed it.
    broken: std::sync::atomic::AtomicBool,
}

/// The tree holding the write set in progress, under [`JOURNAL_KEY`].
const JOURNAL_TREE: &str = "journal";
const JOURNAL_KEY: &[u8] = b"in-progress";

/// Sets or (with `None`) removes one key.
fn write_one(tree: &sled::Tree, key: &[u8], value: Option<&[u8]>) -> Result<(), StoreError> {
    match value {
        Some(v) => tree.insert(key, v).map(drop),
        None => tree.remove(key).map(drop),
    }
    .map_err(db)
}

/// An [`Op`] as the journal holds it: the tree by number.
type JournalOp<'a> = (u8, &'a [u8], Option<&'a [u8]>);

/// A write set as the journal holds it.
fn journal_entry(ops: &[Op]) -> Vec<u8> {
    let entry: Vec<JournalOp<'_>> = ops
        .iter()
        .map(|(t, k, v)| (*t as u8, k.as_slice(), v.as_deref()))
        .collect();
    postcard::to_stdvec(&entry).expect("journal entries serialise")
}

/// Completes a write set that a crash interrupted: applies it again from the journal
/// (each of its writes sets a key to a fixed value, so applying one twice is harmless)
/// and makes that durable.
fn complete_journaled(
    db: &sled::Db,
    trees: &[sled::Tree],
    journal: &sled::Tree,
) -> Result<(), StoreError> {
    let Some(bytes) = journal.get(JOURNAL_KEY).map_err(self::db)? else {
        return Ok(());
    };
    let ops: Vec<(u8, Vec<u8>, Option<Vec<u8>>)> = decode(&bytes, "journal")?;
    for (tree, key, value) in &ops {
        let tree = trees
            .get(usize::from(*tree))
            .ok_or(StoreError::Corrupt("journal"))?;
        write_one(tree, key, value.as_deref())?;
    }
    journal.remove(JOURNAL_KEY).map_err(self::db)?;
    db.flush().map_err(self::db)?;
    tracing::info!(
        writes = ops.len(),
        "completed a write interrupted by a crash"
    );
    Ok(())
}

/// Which writes are on disk. Each write takes the next number; a flush makes every
/// number taken before it started durable. So a flush with nothing new to write (a
/// receive of copies already stored, say) returns at once instead of waiting on the disk.
#[derive(Debug, Default)]
struct Durability {
    /// Writes applied so far.
    written: AtomicU64,
    /// All writes up to this number are durable.
    durable: AtomicU64,
    /// Flushes that went to the disk.
    flushes: AtomicU64,
}

/// Decoded contacts. Decoding checks each card's signatures, which costs more than
/// the rest of receiving a message, and contacts are read on every one.
#[derive(Debug, Default)]
struct ContactCache {
    /// Bumped after every write to the contacts tree.
    generation: AtomicU64,
    /// The contacts as of `.0`, a generation.
    cached: parking_lot::RwLock<Option<(u64, Arc<Vec<Contact>>)>>,
}

const IDENTITY_KEY: &[u8] = b"identity";
const PROFILE_KEY: &[u8] = b"profile";

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt(what))
}

impl LocalStore {
    /// Opens (or creates) the database under `home`.
    pub fn open(home: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(home).map_err(db)?;
        let path = home.join("db");
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(64 << 20)
            .flush_every_ms(Some(1000))
            .open()
            .map_err(|e| {
                if e.to_string().contains("could not acquire lock") {
                    StoreError::Locked(home.to_path_buf())
                } else {
                    db(e)
                }
            })?;
        let trees: Vec<sled::Tree> = TREES
            .iter()
            .map(|name| db.open_tree(name).map_err(self::db))
            .collect::<Result<_, _>>()?;
        let journal = db.open_tree(JOURNAL_TREE).map_err(self::db)?;
        complete_journaled(&db, &trees, &journal)?;
        Ok(Self {
            db,
            trees,
            journal,
            writer: Arc::default(),
            path: home.to_path_buf(),
            contacts: Arc::default(),
            durability: Arc::default(),
            outbox_changes: Arc::default(),
        })
    }

    /// The home directory.
    pub fn home(&self) -> &Path {
        &self.path
    }

    fn tree(&self, id: TreeId) -> &sled::Tree {
        &self.trees[id as usize]
    }

    /// Applies `writes` all or nothing, across a crash (see the module docs). Readers
    /// in between may see part of a set, as they would see one set before the next.
    /// Call [`LocalStore::flush`] before telling anyone about them.
    pub fn apply(&self, writes: WriteSet) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let contacts_changed = writes.ops.iter().any(|(t, _, _)| *t == TreeId::Contacts);
        let outbox: Vec<u64> = writes
            .ops
            .iter()
            .filter(|(t, _, _)| *t == TreeId::Outbox)
            .filter_map(|(_, k, _)| {
                <[u8; 8]>::try_from(k.as_slice())
                    .ok()
                    .map(u64::from_be_bytes)
            })
            .collect();
        if !outbox.is_empty() {
            self.outbox_changes.lock().extend(outbox);
        }
        let result = self.apply_ops(writes);
        if contacts_changed {
            // After the write, so a reader that loaded the old contacts cannot keep them.
            self.contacts.generation.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    fn apply_ops(&self, writes: WriteSet) -> Result<(), StoreError> {
        // One write at a time: the journal holds one set, and a set must not be
        // replayed over a later write.
        let _turn = self.writer.turn.lock();
        if self.writer.broken.load(Ordering::SeqCst) {
            return Err(StoreError::Db(
                "an earlier write failed part-way; restart kkachi to complete it".into(),
            ));
        }
        let ops = writes.ops;
        // One key is atomic by itself.
        let journaled = ops.len() > 1;
        if journaled {
            self.journal
                .insert(JOURNAL_KEY, journal_entry(&ops))
                .map_err(db)?;
        }
        let result = ops
            .iter()
            .try_for_each(|(t, k, v)| write_one(self.tree(*t), k, v.as_deref()))
            .and_then(|()| {
                if journaled {
                    self.journal.remove(JOURNAL_KEY).map_err(db)?;
                }
                Ok(())
            });
        if result.is_err() && journaled {
            // Part of the set may be in; the journal completes it on the next open.
            self.writer.broken.store(true, Ordering::SeqCst);
        }
        // Counted even if it failed (at worst a flush that finds nothing to write), and
        // in turn: a flush that counts writes waits for the one in progress, whose keys
        // a reader may have seen already.
        self.wrote();
        result
    }

    /// Counts a write to the database, so the next flush goes to the disk. Called after
    /// the write, in its turn.
    fn wrote(&self) {
        self.durability.written.fetch_add(1, Ordering::SeqCst);
    }

    /// The outbox keys written (set or removed) since the last call, in order, each once.
    pub fn take_outbox_changes(&self) -> Vec<u64> {
        let mut keys = std::mem::take(&mut *self.outbox_changes.lock());
        let mut seen = std::collections::HashSet::new();
        keys.retain(|k| seen.insert(*k));
        keys
    }

    /// Makes everything applied so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let d = &self.durability;
        // Taken before the flush starts, so every write it counts is in that flush; and
        // between writes, so it counts any write whose keys a caller may have read.
        let target = {
            let _turn = self.writer.turn.lock();
            d.written.load(Ordering::SeqCst)
        };
        if d.durable.load(Ordering::SeqCst) >= target {
            return Ok(());
        }
        // Not sled's `flush_async`: it hands the flush to sled's own pool, which wakes
        // every idle thread of the pool for each job; the runtime's blocking pool wakes one.
        let handle = self.db.clone();
        tokio::task::spawn_blocking(move || handle.flush())
            .await
            .map_err(|e| StoreError::Db(format!("flush stopped: {e}")))?
            .map_err(db)?;
        d.flushes.fetch_add(1, Ordering::Relaxed);
        d.durable.fetch_max(target, Ordering::SeqCst);
        Ok(())
    }

    /// A ticket for every write applied so far: [`LocalStore::is_durable`] says when
    /// they are all on disk.
    pub fn write_ticket(&self) -> u64 {
        self.durability.written.load(Ordering::SeqCst)
    }

    /// True once every write counted by `ticket` is durable.
    pub fn is_durable(&self, ticket: u64) -> bool {
        self.durability.durable.load(Ordering::SeqCst) >= ticket
    }

    /// Flushes that went to the disk so far.
    pub fn disk_flushes(&self) -> u64 {
        self.durability.flushes.load(Ordering::Relaxed)
    }

    fn get_record<T: DeserializeOwned>(
        &self,
        tree: TreeId,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        match self.tree(tree).get(key).map_err(db)? {
            Some(v) => decode(&v, what).map(Some),
            None => Ok(None),
        }
    }

    fn records<T: DeserializeOwned>(
        &self,
        tree: TreeId,
        what: &'static str,
    ) -> Result<Vec<(sled::IVec, T)>, StoreError> {
        self.tree(tree)
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(db)?;
                Ok((k, decode(&v, what)?))
            })
            .collect()
    }

    // --- identity and profile ---

    /// The user's identity, if `init` has run.
    pub fn identity(&self) -> Result<Option<Identity>, StoreError> {
        match self.tree(TreeId::Meta).get(IDENTITY_KEY).map_err(db)? {
            Some(bytes) => Identity::from_secret_bytes(&bytes)
                .map(Some)
                .map_err(|_| StoreError::Corrupt("identity")),
            None => Ok(None),
        }
    }

    /// A new home at `home` with a fresh identity named `name` and these inbox relays
    /// (what `init` and `relay add` do); returns it with the identity and signed card.
    pub fn provision(
        home: &Path,
        name: &str,
        relays: &[Multiaddr],
    ) -> Result<(Self, Identity, Card), StoreError> {
        let store = Self::open(home)?;
        let me = Identity::generate();
        let card = Card::new(&me, name, relays.to_vec(), 1)
            .map_err(|e| StoreError::InvalidCard(e.to_string()))?;
        store.init_identity(
            &me,
            &Profile {
                name: name.to_owned(),
                card_version: 1,
            },
        )?;
        for r in relays {
            store.add_relay(r)?;
        }
        Ok((store, me, card))
    }

    /// The user's own card as it stands (profile name, relays, card version).
    pub fn own_card(&self, me: &Identity) -> Result<Card, StoreError> {
        let profile = self.profile()?.ok_or(StoreError::Corrupt("profile"))?;
        let relays = self
            .relays()?
            .iter()
            .filter_map(|r| r.addr.parse().ok())
            .collect();
        Card::new(me, &profile.name, relays, profile.card_version)
            .map_err(|e| StoreError::InvalidCard(e.to_string()))
    }

    /// Adds `card`'s owner as a contact under the card's name.
    pub fn add_card(&self, card: &Card) -> Result<Contact, StoreError> {
        let contact = Contact {
            peer: card.identity().peer_id(),
            name: card.name().to_owned(),
            card: card.clone(),
        };
        let mut w = WriteSet::default();
        Self::write_contact(&mut w, &contact);
        self.apply(w)?;
        Ok(contact)
    }

    /// Writes the identity and profile (once, at `init`).
    pub fn init_identity(&self, identity: &Identity, profile: &Profile) -> Result<(), StoreError> {
        let mut w = WriteSet::default();
        w.put(
            TreeId::Meta,
            IDENTITY_KEY,
            identity.to_secret_bytes().to_vec(),
        );
        w.put_record(TreeId::Meta, PROFILE_KEY, profile);
        self.apply(w)
    }

    /// The user's profile.
    pub fn profile(&self) -> Result<Option<Profile>, StoreError> {
        self.get_record(TreeId::Meta, PROFILE_KEY, "profile")
    }

    /// Next outbox order number (read-modify-write inside the caller's WriteSet).
    pub fn next_outbox_seq(&self) -> Result<u64, StoreError> {
        let id = self.db.generate_id().map_err(db)?;
        Ok(id)
    }

    // --- relays ---

    /// Own inbox relays, in the order added.
    pub fn relays(&self) -> Result<Vec<RelayRecord>, StoreError> {
        let mut relays: Vec<(u64, RelayRecord)> = self
            .records::<(u64, RelayRecord)>(TreeId::Relays, "relay")?
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        relays.sort_by_key(|(order, _)| *order);
        Ok(relays.into_iter().map(|(_, r)| r).collect())
    }

    /// Adds a relay; false if it was already there.
    pub fn add_relay(&self, addr: &Multiaddr) -> Result<bool, StoreError> {
        let key = addr.to_string();
        if self.tree(TreeId::Relays).contains_key(&key).map_err(db)? {
            return Ok(false);
        }
        let order = self.db.generate_id().map_err(db)?;
        let record = RelayRecord {
            addr: key.clone(),
            name: String::new(),
            failure_domain: String::new(),
            cursor: 0,
            last_ok_ms: None,
            last_error: None,
        };
        let mut w = WriteSet::default();
        w.put_record(TreeId::Relays, key, &(order, record));
        self.apply(w)?;
        Ok(true)
    }

    /// Removes a relay; false if it was not there.
    pub fn remove_relay(&self, addr: &str) -> Result<bool, StoreError> {
        if self.tree(TreeId::Relays).get(addr).map_err(db)?.is_none() {
            return Ok(false);
        }
        let mut w = WriteSet::default();
        w.remove(TreeId::Relays, addr.as_bytes().to_vec());
        self.apply(w)?;
        Ok(true)
    }

    /// Updates a relay's record in place (no-op if it was removed meanwhile).
    pub fn update_relay(
        &self,
        addr: &str,
        f: impl FnOnce(&mut RelayRecord),
    ) -> Result<(), StoreError> {
        let Some((order, mut record)) =
            self.get_record::<(u64, RelayRecord)>(TreeId::Relays, addr.as_bytes(), "relay")?
        else {
            return Ok(());
        };
        f(&mut record);
        let mut w = WriteSet::default();
        w.put_record(TreeId::Relays, addr, &(order, record));
        self.apply(w)
    }

    // --- contacts ---

    /// All contacts, by name. Decoded once per change of the contacts tree and shared.
    pub fn contacts(&self) -> Result<Arc<Vec<Contact>>, StoreError> {
        let generation = self.contacts.generation.load(Ordering::SeqCst);
        if let Some((g, contacts)) = self.contacts.cached.read().as_ref()
            && *g == generation
        {
            return Ok(contacts.clone());
        }
        let mut out = Vec::new();
        for item in self.tree(TreeId::Contacts).iter() {
            let (k, v) = item.map_err(db)?;
            out.push(contact_from(&k, &v)?);
        }
        out.sort_by_key(|c| c.name.to_lowercase());
        let out = Arc::new(out);
        *self.contacts.cached.write() = Some((generation, out.clone()));
        Ok(out)
    }

    /// One contact.
    pub fn contact(&self, peer: &PeerId) -> Result<Option<Contact>, StoreError> {
        Ok(self.contacts()?.iter().find(|c| c.peer == *peer).cloned())
    }

    /// Adds or replaces a contact (in a WriteSet).
    pub fn write_contact(w: &mut WriteSet, contact: &Contact) {
        let record = ContactRecord {
            name: contact.name.clone(),
            card: contact.card.encode(),
        };
        w.put_record(TreeId::Contacts, contact.peer.to_bytes(), &record);
    }

    // --- sessions and conversations ---

    /// The session with `contact` (a fresh one if none is stored).
    pub fn session(&self, contact: &Contact) -> Result<Session, StoreError> {
        match self
            .tree(TreeId::Sessions)
            .get(contact.peer.to_bytes())
            .map_err(db)?
        {
            Some(bytes) => Session::decode(&bytes).map_err(|_| StoreError::Corrupt("session")),
            None => Ok(Session::new(*contact.card.identity().x25519())),
        }
    }

    /// Writes a session state (in a WriteSet).
    pub fn write_session(w: &mut WriteSet, peer: &PeerId, session: &Session) {
        w.put(TreeId::Sessions, peer.to_bytes(), session.encode().to_vec());
    }

    /// The conversation with `peer`.
    pub fn conversation(&self, peer: &PeerId) -> Result<Conversation, StoreError> {
        Ok(self
            .get_record(TreeId::Conversations, &peer.to_bytes(), "conversation")?
            .unwrap_or_default())
    }

    /// Writes a conversation (in a WriteSet).
    pub fn write_conversation(w: &mut WriteSet, peer: &PeerId, conv: &Conversation) {
        w.put_record(TreeId::Conversations, peer.to_bytes(), conv);
    }

    // --- messages ---

    /// Messages with `peer`, oldest first.
    pub fn messages(&self, peer: &PeerId) -> Result<Vec<MessageRecord>, StoreError> {
        let mut out = Vec::new();
        self.for_each_message(peer, |m| out.push(m))?;
        Ok(out)
    }

    /// Calls `f` with every message with `peer`, oldest first, without holding them
    /// all. Reading pages of a store just opened is most of the cost of a long history,
    /// so a helper thread reads ahead while this one decodes and `f` works.
    pub fn for_each_message(
        &self,
        peer: &PeerId,
        mut f: impl FnMut(MessageRecord),
    ) -> Result<(), StoreError> {
        const BATCH: usize = 512;
        let tree = self.tree(TreeId::Messages);
        let prefix = peer.to_bytes();
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<sled::IVec>, StoreError>>(8);
            scope.spawn(move || {
                let mut batch = Vec::with_capacity(BATCH);
                for item in tree.scan_prefix(prefix) {
                    match item {
                        Ok((_, v)) => batch.push(v),
                        Err(e) => {
                            let _ = tx.send(Err(db(e)));
                            return;
                        }
                    }
                    if batch.len() == BATCH
                        && tx
                            .send(Ok(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))))
                            .is_err()
                    {
                        return; // the reader gave up
                    }
                }
                let _ = tx.send(Ok(batch));
            });
            // Dropping `rx` on an error stops the helper at its next batch.
            for batch in rx {
                for v in batch? {
                    f(decode(&v, "message")?);
                }
            }
            Ok(())
        })
    }

    /// The most recent `n` messages with `peer`, oldest first.
    pub fn recent_messages(
        &self,
        peer: &PeerId,
        n: usize,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        let mut out: Vec<MessageRecord> = self
            .tree(TreeId::Messages)
            .scan_prefix(peer.to_bytes())
            .rev()
            .take(n)
            .map(|item| {
                let (_, v) = item.map_err(db)?;
                decode(&v, "message")
            })
            .collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// A message by its sender's id within a conversation: (key, record).
    pub fn message(
        &self,
        peer: &PeerId,
        id: &MessageId,
    ) -> Result<Option<(Vec<u8>, MessageRecord)>, StoreError> {
        let Some(key) = self
            .tree(TreeId::MessageIndex)
            .get(index_key(peer, id))
            .map_err(db)?
        else {
            return Ok(None);
        };
        Ok(self
            .get_record(TreeId::Messages, &key, "message")?
            .map(|m| (key.to_vec(), m)))
    }

    /// Writes a new message and its index entry (in a WriteSet).
    pub fn write_message(w: &mut WriteSet, peer: &PeerId, key: Vec<u8>, message: &MessageRecord) {
        w.put(
            TreeId::MessageIndex,
            index_key(peer, &MessageId(message.id)),
            key.clone(),
        );
        w.put_record(TreeId::Messages, key, message);
    }

    // --- receipts due ---

    /// Notes that message `id` of `peer` is to be confirmed (in a WriteSet).
    pub fn write_receipt_due(w: &mut WriteSet, peer: &PeerId, id: &MessageId) {
        w.put(TreeId::ReceiptsDue, index_key(peer, id), Vec::new());
    }

    /// Clears the note of [`LocalStore::write_receipt_due`] (in a WriteSet).
    pub fn clear_receipt_due(w: &mut WriteSet, peer: &PeerId, id: &MessageId) {
        w.remove(TreeId::ReceiptsDue, index_key(peer, id));
    }

    /// Messages to confirm, by contact.
    pub fn receipts_due(&self) -> Result<Vec<(PeerId, Vec<MessageId>)>, StoreError> {
        let mut out: Vec<(PeerId, Vec<MessageId>)> = Vec::new();
        for item in self.tree(TreeId::ReceiptsDue).iter() {
            let (k, _) = item.map_err(db)?;
            let split = k
                .len()
                .checked_sub(16)
                .ok_or(StoreError::Corrupt("receipt due"))?;
            let peer =
                PeerId::from_bytes(&k[..split]).map_err(|_| StoreError::Corrupt("receipt due"))?;
            let id = MessageId(k[split..].try_into().expect("16 bytes"));
            match out.last_mut() {
                Some((p, ids)) if *p == peer => ids.push(id),
                _ => out.push((peer, vec![id])),
            }
        }
        Ok(out)
    }

    // --- hash chains ---

    /// The record of `peer` held at sequence number `seq`, if any.
    pub fn chain_link(&self, peer: &PeerId, seq: u64) -> Result<Option<ChainLink>, StoreError> {
        self.get_record(TreeId::Chain, &chain_key(peer, seq), "chain link")
    }

    /// Records the record of `peer` at `seq` (in a WriteSet).
    pub fn write_chain_link(w: &mut WriteSet, peer: &PeerId, seq: u64, link: &ChainLink) {
        w.put_record(TreeId::Chain, chain_key(peer, seq), link);
    }

    /// Everything kept about `peer` goes (in a WriteSet): contact, session,
    /// conversation, messages, chain and outbox entries. Returns how many messages.
    pub fn forget_contact(&self, w: &mut WriteSet, peer: &PeerId) -> Result<usize, StoreError> {
        let prefix = peer.to_bytes();
        w.remove(TreeId::Contacts, prefix.clone());
        w.remove(TreeId::Sessions, prefix.clone());
        w.remove(TreeId::Conversations, prefix.clone());
        let mut messages = 0;
        for tree in [TreeId::Messages, TreeId::MessageIndex, TreeId::Chain] {
            for item in self.tree(tree).scan_prefix(&prefix) {
                let (k, _) = item.map_err(db)?;
                w.remove(tree, k.to_vec());
                messages += usize::from(tree == TreeId::Messages);
            }
        }
        self.forget_outbox(w, peer)?;
        Ok(messages)
    }

    /// Drops every outbox entry for `peer` (in a WriteSet).
    pub fn forget_outbox(&self, w: &mut WriteSet, peer: &PeerId) -> Result<(), StoreError> {
        let contact = peer.to_bytes();
        for (key, entry) in self.outbox()? {
            if entry.contact == contact {
                w.remove(TreeId::Outbox, key.to_be_bytes().to_vec());
            }
        }
        Ok(())
    }

    // --- outbox ---

    /// Every outbox entry, oldest first, with its key.
    pub fn outbox(&self) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        self.records::<OutboxEntry>(TreeId::Outbox, "outbox entry")
            .map(|v| {
                v.into_iter()
                    .map(|(k, e)| {
                        (
                            u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8])),
                            e,
                        )
                    })
                    .collect()
            })
    }

    /// One outbox entry.
    pub fn outbox_entry(&self, key: u64) -> Result<Option<OutboxEntry>, StoreError> {
        self.get_record(TreeId::Outbox, &key.to_be_bytes(), "outbox entry")
    }

    /// Number of entries waiting.
    pub fn outbox_len(&self) -> usize {
        self.tree(TreeId::Outbox).len()
    }

    /// Writes an outbox entry (in a WriteSet).
    pub fn write_outbox(w: &mut WriteSet, key: u64, entry: &OutboxEntry) {
        w.put_record(TreeId::Outbox, key.to_be_bytes().to_vec(), entry);
    }

    // --- seen envelopes ---

    /// True if this envelope was already processed.
    pub fn seen(&self, id: &EnvelopeId) -> Result<bool, StoreError> {
        self.tree(TreeId::Seen).contains_key(id.0).map_err(db)
    }

    /// Records an envelope as handled for good (in a WriteSet), until it expires
    /// (`expires_at`, Unix seconds): after that no relay may hand it out again, and
    /// [`LocalStore::prune_seen`] forgets it.
    pub fn write_seen(w: &mut WriteSet, id: &EnvelopeId, expires_at: u64) {
        w.put(
            TreeId::Seen,
            id.0.to_vec(),
            expires_at.to_be_bytes().to_vec(),
        );
    }

    /// Forgets the ids of envelopes that expired before `before` (Unix seconds; pass
    /// now minus the tolerated clock skew): the receive path refuses expired envelopes
    /// before it looks them up. Returns how many were forgotten.
    pub fn prune_seen(&self, before: u64) -> Result<usize, StoreError> {
        let mut w = WriteSet::default();
        let mut n = 0;
        for item in self.tree(TreeId::Seen).iter() {
            let (k, v) = item.map_err(db)?;
            let expires = <[u8; 8]>::try_from(v.as_ref()).map_or(0, u64::from_be_bytes);
            if expires < before {
                w.remove(TreeId::Seen, k.to_vec());
                n += 1;
            }
            // In bounded sets: each is one journaled write.
            if w.ops.len() >= 1024 {
                self.apply(std::mem::take(&mut w))?;
            }
        }
        self.apply(w)?;
        Ok(n)
    }

    /// Envelope ids remembered as handled.
    pub fn seen_len(&self) -> usize {
        self.tree(TreeId::Seen).len()
    }
}

fn chain_key(peer: &PeerId, seq: u64) -> Vec<u8> {
    let mut k = peer.to_bytes();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn index_key(peer: &PeerId, id: &MessageId) -> Vec<u8> {
    let mut k = peer.to_bytes();
    k.extend_from_slice(&id.0);
    k
}

fn contact_from(key: &[u8], value: &[u8]) -> Result<Contact, StoreError> {
    let record: ContactRecord = decode(value, "contact")?;
    let peer = PeerId::from_bytes(key).map_err(|_| StoreError::Corrupt("contact key"))?;
    let card = Card::decode(&record.card).map_err(|_| StoreError::Corrupt("contact card"))?;
    Ok(Contact {
        peer,
        name: record.name,
        card,
    })
}

/// Opens a store just closed in this process. sled lets go of its file lock only once
/// the jobs it queued on its shared I/O threads have run, which can lag the drop while
/// other stores keep those threads busy (tests run in parallel).
#[cfg(test)]
pub(crate) fn reopen(home: &Path) -> LocalStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match LocalStore::open(home) {
            Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other.expect("store reopens"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_set_cut_short_is_completed_when_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WriteSet::default();
        w.put(TreeId::Seen, b"envelope".to_vec(), b"1".to_vec());
        w.put(TreeId::Messages, b"message".to_vec(), b"hello".to_vec());
        w.remove(TreeId::Outbox, b"sent".to_vec());
        {
            let store = LocalStore::open(dir.path()).unwrap();
            store
                .tree(TreeId::Outbox)
                .insert(b"sent", &b"x"[..])
                .unwrap();
            // What a crash after the set's first key leaves on disk.
            store
                .journal
                .insert(JOURNAL_KEY, journal_entry(&w.ops))
                .unwrap();
            store
                .tree(TreeId::Seen)
                .insert(b"envelope", &b"1"[..])
                .unwrap();
            store.db.flush().unwrap();
        }
        let store = reopen(dir.path());
        let get = |t: TreeId, k: &[u8]| store.tree(t).get(k).unwrap().map(|v| v.to_vec());
        assert_eq!(get(TreeId::Messages, b"message"), Some(b"hello".to_vec()));
        assert_eq!(get(TreeId::Seen, b"envelope"), Some(b"1".to_vec()));
        assert_eq!(get(TreeId::Outbox, b"sent"), None);
        assert!(
            store.journal.is_empty(),
            "the journal is cleared once applied"
        );
        // And applying sets as usual leaves nothing in the journal.
        store.apply(w).unwrap();
        assert!(store.journal.is_empty());
    }

    /// The child side of the test below: writes sets of three keys, flushing all the
    /// while, until it is killed.
    fn write_sets_until_killed(home: &Path) -> ! {
        let store = LocalStore::open(home).unwrap();
        let flusher = store.db.clone();
        std::thread::spawn(move || {
            loop {
                let _ = flusher.flush();
            }
        });
        println!("writing");
        for i in 0u64.. {
            let mut w = WriteSet::default();
            w.put(TreeId::Seen, b"set".to_vec(), i.to_be_bytes().to_vec());
            w.put(TreeId::Messages, i.to_be_bytes().to_vec(), vec![7; 300]);
            w.put(TreeId::Outbox, b"set".to_vec(), i.to_be_bytes().to_vec());
            store.apply(w).unwrap();
        }
        unreachable!("written forever")
    }

    #[test]
    fn write_sets_survive_kill_9_whole_or_not_at_all() {
        use std::io::BufRead;
        if let Some(home) = std::env::var_os("KKACHI_CRASH_CHILD") {
            write_sets_until_killed(Path::new(&home));
        }
        let exe = std::env::current_exe().unwrap();
        let mut checked = 0;
        for round in 0..12u64 {
            let dir = tempfile::tempdir().unwrap();
            let mut child = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "store::tests::write_sets_survive_kill_9_whole_or_not_at_all",
                ])
                .args(["--nocapture", "--test-threads", "1"])
                .env("KKACHI_CRASH_CHILD", dir.path())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            while !line.contains("writing") {
                line.clear();
                assert!(out.read_line(&mut line).unwrap() > 0, "the child stopped");
            }
            std::thread::sleep(std::time::Duration::from_millis(30 + 17 * round));
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            let store = reopen(dir.path());
            let get = |t: TreeId, k: &[u8]| store.tree(t).get(k).unwrap().map(|v| v.to_vec());
            let seen = get(TreeId::Seen, b"set");
            assert_eq!(
                seen,
                get(TreeId::Outbox, b"set"),
                "round {round}: half a set"
            );
            if let Some(last) = seen {
                assert!(
                    get(TreeId::Messages, &last).is_some(),
                    "round {round}: half a set"
                );
                checked += 1;
            }
        }
        assert!(checked > 0, "no round left anything on disk to check");
    }

    #[test]
    fn flush_goes_to_the_disk_only_when_something_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(store.flush()).unwrap();
        assert_eq!(store.disk_flushes(), 0, "nothing written yet");

        let relay: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        assert!(store.add_relay(&relay).unwrap());
        rt.block_on(store.flush()).unwrap();
        assert_eq!(store.disk_flushes(), 1);
        rt.block_on(store.flush()).unwrap();
        assert_eq!(store.disk_flushes(), 1, "nothing new since the last flush");

        // A clone shares the record (the engine and the network task hold clones).
        let other = store.clone();
        assert!(other.remove_relay(&relay.to_string()).unwrap());
        rt.block_on(store.flush()).unwrap();
        assert_eq!(store.disk_flushes(), 2, "a removal is a write too");

        assert!(other.add_relay(&relay).unwrap());
        rt.block_on(other.flush()).unwrap();
        drop((store, other));
        let reopened = reopen(dir.path());
        assert_eq!(
            reopened.relays().unwrap().len(),
            1,
            "the flushed write is on disk"
        );
    }

    #[test]
    fn identity_profile_relays_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        assert!(store.identity().unwrap().is_none());
        let id = Identity::generate();
        let profile = Profile {
            name: "Jiwoo".into(),
            card_version: 1,
        };
        store.init_identity(&id, &profile).unwrap();
        let a: Multiaddr = format!("/ip4/127.0.0.1/tcp/1/p2p/{}", PeerId::random())
            .parse()
            .unwrap();
        let b: Multiaddr = format!("/ip4/127.0.0.1/tcp/2/p2p/{}", PeerId::random())
            .parse()
            .unwrap();
        assert!(store.add_relay(&b).unwrap());
        assert!(store.add_relay(&a).unwrap());
        assert!(!store.add_relay(&a).unwrap(), "duplicate add");
        store
            .update_relay(&a.to_string(), |r| r.cursor = 42)
            .unwrap();
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(store.identity().unwrap().unwrap().peer_id(), id.peer_id());
        assert_eq!(store.profile().unwrap(), Some(profile));
        let relays = store.relays().unwrap();
        assert_eq!(
            relays.iter().map(|r| r.addr.clone()).collect::<Vec<_>>(),
            vec![b.to_string(), a.to_string()]
        );
        assert_eq!(relays[1].cursor, 42);
        assert!(store.remove_relay(&b.to_string()).unwrap());
        assert_eq!(store.relays().unwrap().len(), 1);
    }

    #[test]
    fn second_open_reports_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _first = LocalStore::open(dir.path()).unwrap();
        assert!(matches!(
            LocalStore::open(dir.path()),
            Err(StoreError::Locked(_))
        ));
    }

    #[test]
    fn write_sets_apply_across_trees() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let peer = PeerId::random();
        let mut w = WriteSet::default();
        let msg = MessageRecord {
            id: [1; 16],
            direction: Direction::Out,
            text: "hi".into(),
            state: MessageState::Queued,
            sent_at_ms: 1,
            stored_at_ms: 1,
            seq: 1,
            prev: [0; 32],
        };
        LocalStore::write_message(&mut w, &peer, message_key(&peer, 0), &msg);
        LocalStore::write_conversation(
            &mut w,
            &peer,
            &Conversation {
                next_seq: 2,
                ..Default::default()
            },
        );
        store.apply(w).unwrap();
        assert_eq!(store.messages(&peer).unwrap(), vec![msg.clone()]);
        assert_eq!(
            store
                .message(&peer, &MessageId([1; 16]))
                .unwrap()
                .unwrap()
                .1,
            msg
        );
        assert_eq!(store.conversation(&peer).unwrap().next_seq, 2);
    }

    #[test]
    fn long_conversations_read_in_order_across_batches_and_stop_on_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let (peer, other) = (PeerId::random(), PeerId::random());
        let record = |i: u64| MessageRecord {
            id: u128::from(i).to_be_bytes(),
            direction: Direction::In,
            text: format!("m{i}"),
            state: MessageState::Received,
            sent_at_ms: i,
            stored_at_ms: i,
            seq: i + 1,
            prev: [0; 32],
        };
        let mut w = WriteSet::default();
        for i in 0..1300 {
            LocalStore::write_message(&mut w, &peer, message_key(&peer, i), &record(i));
            LocalStore::write_message(&mut w, &other, message_key(&other, i), &record(i + 5000));
        }
        store.apply(w).unwrap();
        let mut seen = Vec::new();
        store
            .for_each_message(&peer, |m| seen.push(m.sent_at_ms))
            .unwrap();
        assert_eq!(seen, (0..1300).collect::<Vec<u64>>());
        assert_eq!(
            store.recent_messages(&peer, 2).unwrap(),
            vec![record(1298), record(1299)]
        );

        // A damaged record in the middle: an error, and nothing after it.
        store
            .tree(TreeId::Messages)
            .insert(message_key(&peer, 700), &[0xff; 3][..])
            .unwrap();
        let mut count = 0;
        let result = store.for_each_message(&peer, |_| count += 1);
        assert!(
            matches!(result, Err(StoreError::Corrupt("message"))),
            "{result:?}"
        );
        assert_eq!(count, 700);
    }

    #[test]
    fn contacts_read_after_a_change_are_the_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let other = store.clone();
        let soyeon = Identity::generate();
        let card = Card::new(&soyeon, "Soyeon", vec![], 1).unwrap();
        assert!(store.contacts().unwrap().is_empty());
        store.add_card(&card).unwrap();
        // Seen through another handle of the same store too.
        assert_eq!(other.contacts().unwrap()[0].name, "Soyeon");
        let mut renamed = other.contact(&soyeon.peer_id()).unwrap().unwrap();
        renamed.name = "Soyeon (work)".into();
        let mut w = WriteSet::default();
        LocalStore::write_contact(&mut w, &renamed);
        // A write that spans trees goes through the journal: still seen.
        LocalStore::write_conversation(&mut w, &soyeon.peer_id(), &Conversation::default());
        other.apply(w).unwrap();
        assert_eq!(store.contacts().unwrap()[0].name, "Soyeon (work)");
        assert_eq!(
            store.contact(&soyeon.peer_id()).unwrap().unwrap().name,
            "Soyeon (work)"
        );
        assert!(store.contact(&PeerId::random()).unwrap().is_none());
    }

    #[test]
    fn states_only_move_forward() {
        let r1 = MessageState::Relayed {
            relayed: 1,
            total: 3,
        };
        let r2 = MessageState::Relayed {
            relayed: 2,
            total: 3,
        };
        assert!(MessageState::Queued.advances_to(&r1));
        assert!(r1.advances_to(&r2));
        assert!(!r2.advances_to(&r1));
        assert!(r2.advances_to(&MessageState::Delivered));
        assert!(!MessageState::Read.advances_to(&MessageState::Delivered));
    }
}
