//! The records the store holds, as the rest of the client sees them.

use kkachi_protocol::card::CARD_LIFETIME_SECS;
use kkachi_protocol::file::FileRef;
use kkachi_protocol::{Card, PeerId};
use serde::{Deserialize, Serialize};

use crate::sequence::Gaps;

/// The user's own profile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Profile {
    /// Display name.
    pub name: String,
    /// Version counter of the user's own card; bumped when relays change.
    pub card_version: u64,
    /// Epoch of the contact-request queues in the card: a new one retires every invite
    /// code given out before (`kkachi invite --renew`).
    pub request_epoch: u32,
    /// When the card runs out (Unix seconds); it is renewed, with a new request epoch,
    /// before that.
    pub card_expires_at: u64,
    /// The card version last queued for every contact: one above it is still to be
    /// sent (a crash between a renewal and telling contacts is caught up at the next
    /// start).
    pub card_announced: u64,
    /// Contacts are not told when we read their messages (delivery is still confirmed).
    pub read_receipts_off: bool,
}

impl Profile {
    /// A new user's profile: card version 1, request epoch 0, a card valid for
    /// [`CARD_LIFETIME_SECS`] from now.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            card_version: 1,
            request_epoch: 0,
            card_expires_at: crate::engine::now_ms() / 1000 + CARD_LIFETIME_SECS,
            // Whoever holds our code holds version 1.
            card_announced: 1,
            read_receipts_off: false,
        }
    }

    /// Renews the card if it has run out at `now_s` (Unix seconds): a new version,
    /// valid for [`CARD_LIFETIME_SECS`], and a new request epoch, so the codes given out
    /// before stop reaching us. Returns whether it did.
    pub fn renew_card_if_due(&mut self, now_s: u64) -> bool {
        if now_s < self.card_expires_at {
            return false;
        }
        self.renew_card(now_s);
        true
    }

    /// A new card version and request epoch, valid for [`CARD_LIFETIME_SECS`].
    pub fn renew_card(&mut self, now_s: u64) {
        self.card_version += 1;
        self.request_epoch = self.request_epoch.saturating_add(1);
        self.card_expires_at = now_s + CARD_LIFETIME_SECS;
    }
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
    /// Unix ms of the last successful exchange.
    pub last_ok_ms: Option<u64>,
    /// The last error, if the last exchange failed.
    pub last_error: Option<String>,
    /// The access token its operator gave us, for relays that open queues only for
    /// token holders.
    pub token: Option<String>,
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
    /// Not added by the user: a member of a group we are in, known by the card a
    /// member passed on or sent in a first message (SPEC §14.4). Sealed to and read for
    /// group records, receipts and cards only; never listed, named or written to as a
    /// contact. Adding them by their code makes them a contact.
    pub through_group: bool,
}

impl Contact {
    /// Someone the user added (by code or by accepting their request).
    pub fn new(peer: PeerId, name: String, card: Card) -> Self {
        Self {
            peer,
            name,
            card,
            through_group: false,
        }
    }

    /// Whether the user added them (not only met in a group).
    pub fn is_added(&self) -> bool {
        !self.through_group
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct ContactRecord {
    pub(super) name: String,
    pub(super) card: Vec<u8>,
    pub(super) through_group: bool,
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
    /// The disappearing-message timer (seconds; 0: off): messages stored while it is set
    /// are deleted this long after, on both sides.
    pub timer_secs: u32,
    /// When the timer was set (the sender's clock, Unix ms): the later setting wins.
    pub timer_set_ms: u64,
    /// The earliest time a stored message of this conversation disappears (0: none).
    pub next_expiry_ms: u64,
    /// Muted: its messages do not ring or notify (the UI still counts them).
    pub muted: bool,
    /// Their edits (a new text) and deletes (`None`) of messages not here yet, applied
    /// when those arrive; at most [`MAX_PENDING_REVISIONS`] and [`MAX_PENDING_REVISION_BYTES`] of
    /// text, the oldest dropped.
    pub pending_revisions: Vec<PendingRevision>,
}

/// What a contact's device other than the one their card names numbered (SPEC §5:
/// each of those numbers its own records), kept apart from the conversation's.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceNumbers {
    /// Which of its numbers are missing.
    pub gaps: Gaps,
    /// Its numbers where the hash chain breaks.
    pub chain_breaks: Vec<u64>,
    /// Its records that claimed a number another of its records holds.
    pub conflicts: u64,
}

/// A change of theirs to a message not here yet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingRevision {
    /// The message.
    pub id: [u8; 16],
    /// Their sequence number of the change.
    pub seq: u64,
    /// A new text, or `None` for deleted.
    pub change: Option<String>,
    /// Made by another device of ours to a message of ours (a copy, SPEC §15.2), not
    /// by the contact: each applies only to messages of its own side.
    pub ours: bool,
}

/// Most edits and deletes kept for messages not arrived yet, per contact.
pub const MAX_PENDING_REVISIONS: usize = 64;
/// Most bytes of edited text kept so, per contact: the conversation record holding them
/// is written with each of their messages, so a contact must not make it large.
pub const MAX_PENDING_REVISION_BYTES: usize = 64 << 10;

impl Conversation {
    /// Keeps their change (made at their `seq`) to message `id`, which is not here yet:
    /// of two changes to one message, the later one by `seq` stays, and a delete
    /// stays whatever comes after it.
    pub fn hold_revision(&mut self, id: [u8; 16], seq: u64, change: Option<String>, ours: bool) {
        let same = |p: &PendingRevision| p.id == id && p.ours == ours;
        if let Some(held) = self.pending_revisions.iter().find(|p| same(p))
            && (held.change.is_none() || (change.is_some() && held.seq >= seq))
        {
            return;
        }
        self.pending_revisions.retain(|p| !same(p));
        self.pending_revisions.push(PendingRevision {
            id,
            seq,
            change,
            ours,
        });
        let bytes = |p: &[PendingRevision]| {
            p.iter()
                .map(|p| p.change.as_ref().map_or(0, String::len))
                .sum::<usize>()
        };
        while self.pending_revisions.len() > MAX_PENDING_REVISIONS
            || bytes(&self.pending_revisions) > MAX_PENDING_REVISION_BYTES
        {
            self.pending_revisions.remove(0);
        }
    }

    /// Applies to `record` (just arrived) a change that came before it: the contact's
    /// to a message of theirs, ours (from another device of ours) to one of ours.
    pub fn apply_held_revision(&mut self, record: &mut MessageRecord) {
        let ours = record.direction == Direction::Out;
        let Some(at) = self
            .pending_revisions
            .iter()
            .position(|p| p.id == record.id && p.ours == ours)
        else {
            return;
        };
        let held = self.pending_revisions.remove(at);
        record.revise_at(held.seq, held.change);
    }

    /// Notes a message stored to disappear at `expires_ms`.
    pub fn note_expiry(&mut self, expires_ms: u64) {
        if expires_ms != 0 && (self.next_expiry_ms == 0 || expires_ms < self.next_expiry_ms) {
            self.next_expiry_ms = expires_ms;
        }
    }
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
    /// Ours, sent from another device of our account (SPEC §15.2), which delivers it:
    /// no delivery receipt of the contact's has reached this device yet.
    SentElsewhere,
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
            Self::SentElsewhere => "sent",
        }
    }

    /// Rank for never moving a state backwards.
    fn rank(&self) -> u8 {
        match self {
            Self::Queued => 0,
            Self::Relayed { .. } => 1,
            Self::Received | Self::SentElsewhere => 1,
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
    /// Its disappearing-message timer (seconds; 0: it stays): it is deleted this long
    /// after `stored_at_ms`. Sent with it (a timed text), so both sides agree.
    pub timer_secs: u32,
    /// Its sender changed its text (the text is the latest).
    pub edited: bool,
    /// Its sender deleted it for everyone: the text is gone, the record stays in its
    /// place ("deleted").
    pub deleted: bool,
    /// The sequence number of its sender's latest edit applied (0: none): an older
    /// edit arriving later changes nothing.
    pub revised_seq: u64,
    /// The message it answers, if it is a reply.
    pub reply_to: Option<Quote>,
    /// Reactions to it.
    pub reactions: Reactions,
    /// The file it carries, if it is a file message (its `text` is then empty).
    pub file: Option<FileNote>,
}

/// The file a message carries: the reference as sent (SPEC §13), key included, so the
/// file can be fetched and opened whenever the user asks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileNote {
    /// The reference's encoding.
    pub reference: Vec<u8>,
}

impl FileNote {
    /// The note for `file`.
    pub fn of(file: &FileRef) -> Self {
        Self {
            reference: file.encode(),
        }
    }

    /// The reference (checked when it arrived; `None` only if the record was damaged).
    pub fn file(&self) -> Option<FileRef> {
        FileRef::decode(&self.reference).ok()
    }
}

/// The message a reply answers: shown from our own copy, never from the reply.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Quote {
    /// Its id.
    pub id: [u8; 16],
    /// Whether we sent it (otherwise the contact did).
    pub ours: bool,
}

/// The reactions to one message: each side's latest ("" for none).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reactions {
    /// Ours.
    pub ours: String,
    /// Theirs.
    pub theirs: String,
    /// The sequence number of their reaction shown: an older one arriving later
    /// changes nothing.
    pub theirs_seq: u64,
}

impl Reactions {
    /// Whether there is any.
    pub fn is_empty(&self) -> bool {
        self.ours.is_empty() && self.theirs.is_empty()
    }
}

impl MessageRecord {
    /// Its sender's change made at their sequence number `seq`: a new text (`Some`), or
    /// deleted for everyone (`None`: the text goes, the record stays in its place). An
    /// edit older than one applied already, or any change once deleted, is ignored;
    /// false then. A delete is final, whatever order it arrives in.
    pub fn revise_at(&mut self, seq: u64, change: Option<String>) -> bool {
        if self.deleted || (change.is_some() && seq <= self.revised_seq) {
            return false;
        }
        self.revised_seq = seq;
        self.revise(change);
        true
    }

    /// Its sender's change: a new text (`Some`), or deleted for everyone (`None`: the
    /// text goes, the record stays in its place).
    pub fn revise(&mut self, change: Option<String>) {
        match change {
            Some(text) => {
                self.text = text;
                self.edited = true;
            }
            None => {
                self.text.clear();
                self.deleted = true;
                self.reactions = Reactions::default();
                // The file's key goes too: what was fetched of it is removed.
                self.file = None;
            }
        }
    }

    /// When it disappears (Unix ms; 0: never).
    pub fn expires_at(&self) -> u64 {
        if self.timer_secs == 0 {
            return 0;
        }
        self.stored_at_ms
            .saturating_add(u64::from(self.timer_secs) * 1000)
    }

    /// True once its disappearing-message timer has run out at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.timer_secs != 0 && self.expires_at() <= now_ms
    }
}

/// What one stored record of a contact's is charged beyond its text, against
/// [`MAX_STORED_PER_CONTACT`].
pub const RECORD_CHARGE: u64 = 256;

/// The shortest disappearing-message timer kept: a contact's shorter one is taken as
/// this, so nothing vanishes before it can be read.
pub const MIN_TIMER_SECS: u32 = 5;

/// The timer kept for one of `secs` (0: none): at least [`MIN_TIMER_SECS`].
pub fn kept_timer(secs: u32) -> u32 {
    if secs == 0 {
        0
    } else {
        secs.max(MIN_TIMER_SECS)
    }
}

/// What an outbox entry carries.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum OutboxKind {
    /// A conversation message: kept until the contact's delivery receipt.
    Message,
    /// A receipt or card update: kept until every relay (or the contact) has it.
    Control,
    /// Someone else's envelope from a bundle, carried on to its relays: kept until
    /// every one has it, or it expires. It names no contact (`contact` is empty).
    Forward,
    /// A post of ours into a large group's queue on each group relay (SPEC §14.5): kept
    /// until every group relay has it. `contact` holds the group's local name
    /// ([`crate::store::group_key`], shaped like a peer id).
    Group,
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
    /// Our write capability into the recipient's queue there.
    pub write: [u8; 32],
    /// The contact-request capability of the recipient's card there, used while they
    /// grant us none (not yet accepted, or the relay lost their grants).
    pub request: Option<[u8; 32]>,
    /// The relay's store epoch when it acknowledged (0: unknown). Another one later
    /// means the relay lost what it held: the envelope is put there again.
    pub epoch: u64,
}

/// An envelope waiting to be delivered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The message it carries.
    pub message_id: [u8; 16],
    /// The recipient.
    pub contact: Vec<u8>,
    /// What it is.
    pub kind: OutboxKind,
    /// Which device of the recipient's account it is sealed to: the one their card
    /// names (`None`), or another, by its session key. (Before the envelope: the
    /// store's index reads the fields up to here without decoding the rest.)
    pub device: Option<[u8; 32]>,
    /// The encoded envelope.
    pub envelope: Vec<u8>,
    /// The recipient's relays.
    pub targets: Vec<Target>,
    /// Handed to the contact directly (LAN).
    pub direct_acked: bool,
    /// Unix ms when queued.
    pub created_ms: u64,
    /// The session its envelope is sealed on (`None`: a first message, which the
    /// contact can always open). Once that session is replaced, the envelope is sealed
    /// again on the new one: the old one soon opens nothing.
    pub sealed_on: Option<[u8; 32]>,
    /// Unix ms when it was last sealed again for that reason (0: never).
    pub resealed_ms: u64,
    /// Unix ms when it was first queued (`created_ms` moves on with each hourly put
    /// again): how long it has really waited.
    pub queued_ms: u64,
    /// The content sealed in it, for a message or a change to one (edit, delete): what
    /// is sealed again, the same, on a new session. Empty for other entries.
    pub content: Vec<u8>,
}

impl OutboxEntry {
    /// Relays plus direct handovers that acknowledged.
    pub fn acked_count(&self) -> u8 {
        let relays = self.targets.iter().filter(|t| t.acked).count();
        (relays + usize::from(self.direct_acked)).min(usize::from(u8::MAX)) as u8
    }
}

/// Key of a message: contact peer bytes ‖ local order (big-endian).
pub fn message_key(contact: &PeerId, local: u64) -> Vec<u8> {
    let mut k = contact.to_bytes();
    k.extend_from_slice(&local.to_be_bytes());
    k
}
