//! Message content: what travels inside an end-to-end session.
//!
//! Every content record carries the sender's message id (for deduplication across
//! relays and retries), a per-conversation sequence number and the hash of the sender's
//! previous record in that conversation (so the recipient can tell a dropped message from
//! one that is merely late), a timestamp, and a typed body. Bodies are tagged with a
//! kind and length-prefixed, so a kind this version does not know is kept verbatim as
//! [`Body::Unknown`] rather than failing the whole record.

use thiserror::Error;

use crate::card::{Card, CardError};
use crate::codec::{DecodeError, Reader, Writer, hash};
use crate::device::MAX_DEVICE_SET_LEN;
use crate::group::{GroupError, GroupId, Hlc, SignedOp, decode_ops, encode_ops};

/// Version byte of the content encoding.
pub const CONTENT_VERSION: u8 = 1;
/// Longest text body, in UTF-8 bytes.
pub const MAX_TEXT_LEN: usize = 32 * 1024;
/// Largest body of any kind, in bytes (fits a sealed payload with headroom).
pub const MAX_BODY_LEN: usize = 60 * 1024;
/// Most message ids one receipt may acknowledge.
pub const MAX_RECEIPT_IDS: usize = 512;
/// Most cards one group record introduces (so the largest cards still fit one body).
pub const MAX_GROUP_CARDS: usize = 16;
/// Fixed header: version, id, seq, prev, sent_at, kind, body length.
pub const CONTENT_HEADER_LEN: usize = 1 + 16 + 8 + 32 + 8 + 2 + 4;

const KIND_TEXT: u16 = 1;
const KIND_RECEIPT: u16 = 2;
const KIND_CARD: u16 = 3;
const KIND_TIMER: u16 = 4;
const KIND_TIMED_TEXT: u16 = 5;
const KIND_EDIT: u16 = 6;
const KIND_DELETE: u16 = 7;
const KIND_REPLY: u16 = 8;
const KIND_REACTION: u16 = 9;
const KIND_FILE: u16 = 10;
const KIND_GROUP: u16 = 11;
const KIND_DEVICES: u16 = 12;
const KIND_SENT: u16 = 13;
const KIND_ACCOUNT: u16 = 14;
/// Longest peer id a copy for our other devices names (an Ed25519 one is 38 bytes).
const MAX_PEER_ID_LEN: usize = 64;

/// Longest reaction, in UTF-8 bytes (an emoji of several code points fits; empty takes
/// a reaction back).
pub const MAX_REACTION_LEN: usize = 64;

/// Checks a reaction: empty, or emoji and symbols only, at most [`MAX_REACTION_LEN`]
/// bytes. Only the blocks emoji and symbols live in, and what emoji are built from
/// (joiners, variation selectors, keycaps, tags): no letters of any script, digits,
/// spaces, punctuation or controls (a reaction cannot spell a word, such as "me"), and
/// nothing that hides or reorders text.
pub fn check_reaction(emoji: &str) -> Result<(), ContentError> {
    if emoji.len() > MAX_REACTION_LEN {
        return Err(ContentError::ReactionTooLong(emoji.len()));
    }
    let allowed = |c: char| {
        matches!(c,
            '\u{00A9}' | '\u{00AE}'               // © ®
            | '\u{203C}' | '\u{2049}'             // ‼ ⁉
            | '\u{20E3}'                          // combining keycap
            | '\u{2100}'..='\u{2BFF}'             // letterlike symbols to misc. symbols and arrows
            | '\u{200D}'                          // zero-width joiner (emoji sequences)
            | '\u{3030}' | '\u{303D}' | '\u{3297}' | '\u{3299}'
            | '\u{FE00}'..='\u{FE0F}'             // variation selectors
            | '\u{1F000}'..='\u{1FAFF}'           // emoji and pictographs
            | '\u{E0020}'..='\u{E007F}') // tags (subdivision flags)
    };
    match emoji.chars().find(|&c| !allowed(c)) {
        Some(c) => Err(ContentError::NotAReaction(u32::from(c))),
        None => Ok(()),
    }
}

/// The longest a disappearing-message timer may be: a year (0 turns it off).
pub const MAX_TIMER_SECS: u32 = 365 * 24 * 3600;

/// A sender-chosen 16-byte message id, random per message.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// Lower-case hex, as shown in JSON output and logs.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`MessageId::to_hex`] output.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }
}

impl std::fmt::Debug for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MessageId({})", self.to_hex())
    }
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

const GROUP_OPS: u8 = 1;
const GROUP_MESSAGE: u8 = 2;
const GROUP_FILE: u8 = 3;
const GROUP_CARDS: u8 = 4;
const GROUP_KEY: u8 = 5;

/// What a group record carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBody {
    /// Operations of the group's membership log (unsequenced).
    Ops {
        /// Every operation the sender holds (else only new ones).
        all: bool,
        /// The sender's [`crate::group::have_digest`] after these.
        have: [u8; 16],
        /// The operations.
        ops: Vec<SignedOp>,
    },
    /// A message to the group (sequenced in the pairwise conversation).
    Message {
        /// The author's group clock: members show messages in this order.
        hlc: Hlc,
        /// The author's [`crate::group::have_digest`]: a member holding other
        /// operations sends theirs.
        have: [u8; 16],
        /// Its disappearing-message timer (seconds; 0: it stays).
        secs: u32,
        /// The message.
        text: String,
    },
    /// A file sent to the group (sequenced in the pairwise conversation, as a
    /// message is): its chunks were put into each member's queues.
    File {
        /// The author's group clock, as for a message.
        hlc: Hlc,
        /// The author's digest, as for a message.
        have: [u8; 16],
        /// Its disappearing-message timer (seconds; 0: it stays).
        secs: u32,
        /// What it takes to fetch and open it (SPEC §13).
        file: Box<crate::file::FileRef>,
    },
    /// Members' own signed cards, passed on so members who are not each other's
    /// contacts can reach each other (unsequenced, as operations are).
    Cards {
        /// At most [`MAX_GROUP_CARDS`], at least one.
        cards: Vec<Card>,
    },
    /// A large group's epoch key record (SPEC §14.5), handed over a pairwise session
    /// to a member who cannot read the group queue yet (unsequenced, as operations
    /// are).
    Key {
        /// The record; its group is the record's.
        record: Box<crate::group::large::KeyRecord>,
    },
}

const ACCOUNT_CONTACT_ADDED: u8 = 1;
const ACCOUNT_CONTACT_REMOVED: u8 = 2;
const ACCOUNT_BLOCKED: u8 = 3;
const ACCOUNT_UNBLOCKED: u8 = 4;
const ACCOUNT_DELETED_FOR_ME: u8 = 5;
const ACCOUNT_GROUP_KEY: u8 = 6;

/// A change one device of an account made to the account's own records, for its other
/// devices only (SPEC §15.2): they make the same change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountRecord {
    /// A contact added (or accepted), under the name given them here.
    ContactAdded {
        /// Their card, as added.
        card: Box<Card>,
        /// The name shown for them (the rules for names, SPEC §2).
        name: String,
    },
    /// A contact removed, with everything kept about them.
    ContactRemoved {
        /// Who.
        peer: libp2p_identity::PeerId,
    },
    /// Someone blocked.
    Blocked {
        /// Who.
        peer: libp2p_identity::PeerId,
    },
    /// Someone unblocked.
    Unblocked {
        /// Who.
        peer: libp2p_identity::PeerId,
    },
    /// A message of the conversation with `peer` deleted on this device only.
    DeletedForMe {
        /// The contact.
        peer: libp2p_identity::PeerId,
        /// The message.
        id: MessageId,
    },
    /// The key of an epoch of a large group this device holds, with one part of the
    /// epoch's key record (its group, number, clock and maker, signed): the account's
    /// other devices, for whose keys no admin wrapped it, read the group too.
    GroupKey {
        /// The epoch's key (it hashes to the record's epoch id).
        key: crate::group::large::EpochKey,
        /// One part of the epoch's key record.
        record: Box<crate::group::large::KeyRecord>,
    },
}

impl AccountRecord {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        // Peer ids longer than any are refused by `check`; a length never wraps.
        let peer = |w: &mut Writer, p: &libp2p_identity::PeerId| {
            let bytes = p.to_bytes();
            w.bytes8(&bytes[..bytes.len().min(usize::from(u8::MAX))]);
        };
        match self {
            AccountRecord::ContactAdded { card, name } => {
                w.u8(ACCOUNT_CONTACT_ADDED).bytes16(&card.encode());
                w.bytes8(&name.as_bytes()[..name.len().min(usize::from(u8::MAX))]);
            }
            AccountRecord::ContactRemoved { peer: p } => peer(w.u8(ACCOUNT_CONTACT_REMOVED), p),
            AccountRecord::Blocked { peer: p } => peer(w.u8(ACCOUNT_BLOCKED), p),
            AccountRecord::Unblocked { peer: p } => peer(w.u8(ACCOUNT_UNBLOCKED), p),
            AccountRecord::DeletedForMe { peer: p, id } => {
                peer(w.u8(ACCOUNT_DELETED_FOR_ME), p);
                w.raw(&id.0);
            }
            AccountRecord::GroupKey { key, record } => {
                w.u8(ACCOUNT_GROUP_KEY)
                    .raw(key.to_bytes().as_slice())
                    .raw(record.encode());
            }
        }
        w.finish()
    }

    fn decode(data: &[u8]) -> Result<Self, ContentError> {
        let mut r = Reader::new(data);
        let peer = |r: &mut Reader<'_>| -> Result<libp2p_identity::PeerId, ContentError> {
            let bytes = r.bytes8(MAX_PEER_ID_LEN, "account record's peer")?;
            libp2p_identity::PeerId::from_bytes(bytes).map_err(|_| {
                DecodeError::Invalid {
                    field: "account record's peer",
                    reason: "not a peer id",
                }
                .into()
            })
        };
        let record = match r.u8("account record")? {
            ACCOUNT_CONTACT_ADDED => {
                let card = Card::decode(r.bytes16(crate::card::MAX_CARD_LEN, "added card")?)?;
                let name = r.str8(crate::card::MAX_NAME_LEN, "contact name")?;
                crate::card::check_name(name).map_err(CardError::from)?;
                AccountRecord::ContactAdded {
                    card: Box::new(card),
                    name: name.to_owned(),
                }
            }
            ACCOUNT_CONTACT_REMOVED => AccountRecord::ContactRemoved {
                peer: peer(&mut r)?,
            },
            ACCOUNT_BLOCKED => AccountRecord::Blocked {
                peer: peer(&mut r)?,
            },
            ACCOUNT_UNBLOCKED => AccountRecord::Unblocked {
                peer: peer(&mut r)?,
            },
            ACCOUNT_DELETED_FOR_ME => AccountRecord::DeletedForMe {
                peer: peer(&mut r)?,
                id: MessageId(r.array("message id")?),
            },
            ACCOUNT_GROUP_KEY => {
                let key = crate::group::large::EpochKey::from_bytes(r.array("epoch key")?);
                // The rest is the record (whose decoding leaves nothing after it).
                let record = crate::group::large::KeyRecord::decode(r.rest())?;
                if key.id(&record.group()) != record.epoch() {
                    return Err(DecodeError::Invalid {
                        field: "account record's epoch key",
                        reason: "not the key of the record's epoch",
                    }
                    .into());
                }
                return Ok(AccountRecord::GroupKey {
                    key,
                    record: Box::new(record),
                });
            }
            tag => {
                return Err(DecodeError::UnknownTag {
                    field: "account record",
                    tag: tag.into(),
                }
                .into());
            }
        };
        r.finish()?;
        Ok(record)
    }
}

/// What a receipt reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReceiptStatus {
    /// Stored on the recipient's device.
    Delivered,
    /// Shown to the recipient.
    Read,
}

/// The typed part of a content record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// A chat message.
    Text(String),
    /// Delivery or read receipts for earlier messages.
    Receipt {
        /// Delivered or read.
        status: ReceiptStatus,
        /// The acknowledged message ids.
        ids: Vec<MessageId>,
    },
    /// A newer signed contact card of the sender (for example after a relay change).
    CardUpdate(Box<Card>),
    /// A chat message that disappears: deleted this many seconds after it is stored,
    /// by the sender and the recipient alike.
    TimedText {
        /// Seconds, 1 to [`MAX_TIMER_SECS`].
        secs: u32,
        /// The message.
        text: String,
    },
    /// A new text for one of the sender's own earlier messages.
    Edit {
        /// The message edited.
        target: MessageId,
        /// Its new text.
        text: String,
    },
    /// One of the sender's own earlier messages, deleted for everyone.
    Delete {
        /// The message deleted.
        target: MessageId,
    },
    /// A chat message answering an earlier message of the conversation. It carries no
    /// copy of what it answers: each side shows its own copy, so a reply cannot put
    /// words in anyone's mouth.
    Reply {
        /// The message answered.
        target: MessageId,
        /// Whether the sender of the reply also sent the message answered (otherwise
        /// the recipient did): ids are chosen by senders, so this says whose to look up.
        own: bool,
        /// Its disappearing-message timer (seconds; 0: it stays), as a timed text's.
        secs: u32,
        /// The message.
        text: String,
    },
    /// The sender's reaction to a message of the conversation, replacing any earlier
    /// one of theirs on it; an empty `emoji` takes it back.
    Reaction {
        /// The message reacted to.
        target: MessageId,
        /// Whether the sender of the reaction sent that message (as in `Reply`).
        own: bool,
        /// An emoji (any text up to [`MAX_REACTION_LEN`] bytes), or empty.
        emoji: String,
    },
    /// A file or photo (SPEC §13): how to fetch and open it, and what to show before.
    File {
        /// Its disappearing-message timer (seconds; 0: it stays), as a timed text's.
        secs: u32,
        /// The reference: key, manifest id, size, name, type, thumbnail.
        file: Box<crate::file::FileRef>,
    },
    /// The conversation's disappearing-message timer, as the sender set it (what the
    /// texts both sides send from then on carry); 0 turns it off. The setting sent last
    /// (by `sent_at_ms`) wins.
    Timer {
        /// Seconds, at most [`MAX_TIMER_SECS`]; 0 is off.
        secs: u32,
    },
    /// A record of a group (SPEC §14.4): its operations, or a message to it.
    Group {
        /// The group.
        group: GroupId,
        /// What it carries.
        what: GroupBody,
    },
    /// The device set of the sender's account (SPEC §15), as encoded. It is read
    /// against the sender's identity key, which only its recipient knows: decoding
    /// checks its length alone ([`crate::device::MAX_DEVICE_SET_LEN`]).
    Devices(Vec<u8>),
    /// For the sender's own other devices only (SPEC §15.2): a copy of a record it
    /// sealed to contact `to`, exactly as sealed (id, numbers, time and body), so
    /// each device of an account shows what the others sent and read. Never a copy
    /// of a copy.
    Sent {
        /// The contact the record went to.
        to: libp2p_identity::PeerId,
        /// The record.
        content: Box<Content>,
    },
    /// For the sender's own other devices only (SPEC §15.2): a change it made to the
    /// account's own records (contacts, blocks, deletions for this device).
    Account(AccountRecord),
    /// A kind this version does not understand, kept verbatim.
    Unknown {
        /// The kind tag.
        kind: u16,
        /// The raw body.
        data: Vec<u8>,
    },
}

impl Body {
    /// Only texts are part of the conversation sequence. Receipts and card updates are
    /// control records: losing one only delays a state change, so they carry `seq = 0`
    /// and never cause a gap notice.
    pub fn is_sequenced(&self) -> bool {
        matches!(
            self,
            Body::Text(_)
                | Body::TimedText { .. }
                | Body::Edit { .. }
                | Body::Delete { .. }
                | Body::Reply { .. }
                | Body::Reaction { .. }
                | Body::File { .. }
                | Body::Group {
                    what: GroupBody::Message { .. } | GroupBody::File { .. },
                    ..
                }
        )
    }

    /// The text of a chat message, and its timer (0: it stays); `None` for control
    /// records.
    pub fn text(&self) -> Option<(&str, u32)> {
        match self {
            Body::Text(text) => Some((text, 0)),
            Body::TimedText { secs, text } | Body::Reply { secs, text, .. } => Some((text, *secs)),
            _ => None,
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Body::Text(_) => KIND_TEXT,
            Body::Receipt { .. } => KIND_RECEIPT,
            Body::CardUpdate(_) => KIND_CARD,
            Body::TimedText { .. } => KIND_TIMED_TEXT,
            Body::Edit { .. } => KIND_EDIT,
            Body::Delete { .. } => KIND_DELETE,
            Body::Timer { .. } => KIND_TIMER,
            Body::Reply { .. } => KIND_REPLY,
            Body::Reaction { .. } => KIND_REACTION,
            Body::File { .. } => KIND_FILE,
            Body::Group { .. } => KIND_GROUP,
            Body::Devices(_) => KIND_DEVICES,
            Body::Sent { .. } => KIND_SENT,
            Body::Account(_) => KIND_ACCOUNT,
            Body::Unknown { kind, .. } => *kind,
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Body::Text(text) => text.as_bytes().to_vec(),
            Body::Receipt { status, ids } => {
                let mut w = Writer::with_capacity(3 + 16 * ids.len());
                w.u8(match status {
                    ReceiptStatus::Delivered => 1,
                    ReceiptStatus::Read => 2,
                })
                .u16(ids.len() as u16);
                for id in ids {
                    w.raw(&id.0);
                }
                w.finish()
            }
            Body::CardUpdate(card) => card.encode(),
            Body::TimedText { secs, text } => {
                let mut out = secs.to_be_bytes().to_vec();
                out.extend_from_slice(text.as_bytes());
                out
            }
            Body::Edit { target, text } => {
                let mut out = target.0.to_vec();
                out.extend_from_slice(text.as_bytes());
                out
            }
            Body::Delete { target } => target.0.to_vec(),
            Body::Timer { secs } => secs.to_be_bytes().to_vec(),
            Body::Reply {
                target,
                own,
                secs,
                text,
            } => {
                let mut out = target.0.to_vec();
                out.push(u8::from(*own));
                out.extend_from_slice(&secs.to_be_bytes());
                out.extend_from_slice(text.as_bytes());
                out
            }
            Body::Reaction { target, own, emoji } => {
                let mut out = target.0.to_vec();
                out.push(u8::from(*own));
                out.extend_from_slice(emoji.as_bytes());
                out
            }
            Body::File { secs, file } => {
                let mut out = secs.to_be_bytes().to_vec();
                out.extend_from_slice(&file.encode());
                out
            }
            Body::Group { group, what } => {
                let mut out = group.0.to_vec();
                match what {
                    GroupBody::Ops { all, have, ops } => {
                        out.push(GROUP_OPS);
                        out.push(u8::from(*all));
                        out.extend_from_slice(have);
                        out.extend_from_slice(&encode_ops(ops));
                    }
                    GroupBody::Message {
                        hlc,
                        have,
                        secs,
                        text,
                    } => {
                        out.push(GROUP_MESSAGE);
                        posting_head_into(&mut out, hlc, have, *secs);
                        out.extend_from_slice(text.as_bytes());
                    }
                    GroupBody::File {
                        hlc,
                        have,
                        secs,
                        file,
                    } => {
                        out.push(GROUP_FILE);
                        posting_head_into(&mut out, hlc, have, *secs);
                        out.extend_from_slice(&file.encode());
                    }
                    GroupBody::Cards { cards } => {
                        out.push(GROUP_CARDS);
                        let mut w = Writer::with_capacity(1 + cards.len() * 600);
                        // More than fit a count are refused by `check`; the count never wraps.
                        w.u8(u8::try_from(cards.len()).unwrap_or(u8::MAX));
                        for card in cards.iter().take(usize::from(u8::MAX)) {
                            w.bytes16(&card.encode());
                        }
                        out.extend_from_slice(&w.finish());
                    }
                    GroupBody::Key { record } => {
                        out.push(GROUP_KEY);
                        out.extend_from_slice(record.encode());
                    }
                }
                out
            }
            Body::Sent { to, content } => {
                let to = to.to_bytes();
                let content = content.encode();
                let mut w = Writer::with_capacity(1 + to.len() + content.len());
                // A peer id longer than any is refused by `check`; the length never wraps.
                w.bytes8(&to[..to.len().min(usize::from(u8::MAX))])
                    .raw(&content);
                w.finish()
            }
            Body::Account(record) => record.encode(),
            Body::Devices(set) | Body::Unknown { data: set, .. } => set.clone(),
        }
    }

    fn decode(kind: u16, data: &[u8]) -> Result<Self, ContentError> {
        Ok(match kind {
            KIND_TEXT => {
                let text = text_of(data)?;
                Body::Text(text)
            }
            KIND_RECEIPT => {
                let mut r = Reader::new(data);
                let status = match r.u8("receipt status")? {
                    1 => ReceiptStatus::Delivered,
                    2 => ReceiptStatus::Read,
                    tag => {
                        return Err(DecodeError::UnknownTag {
                            field: "receipt status",
                            tag: tag.into(),
                        }
                        .into());
                    }
                };
                let n = r.count16(MAX_RECEIPT_IDS, 16, "receipt ids")?;
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n {
                    ids.push(MessageId(r.array("receipt id")?));
                }
                r.finish()?;
                Body::Receipt { status, ids }
            }
            KIND_CARD => Body::CardUpdate(Box::new(Card::decode(data)?)),
            KIND_DEVICES if data.len() > MAX_DEVICE_SET_LEN => {
                return Err(ContentError::DevicesTooLong(data.len()));
            }
            KIND_DEVICES => Body::Devices(data.to_vec()),
            KIND_ACCOUNT => Body::Account(AccountRecord::decode(data)?),
            KIND_SENT => {
                let mut r = Reader::new(data);
                let to = r.bytes8(MAX_PEER_ID_LEN, "copy's contact")?;
                let to =
                    libp2p_identity::PeerId::from_bytes(to).map_err(|_| DecodeError::Invalid {
                        field: "copy's contact",
                        reason: "not a peer id",
                    })?;
                // The outer body is bounded, so the copy is; and a copy holds no copy,
                // so decoding never nests deeper than this.
                let content = Content::decode(r.rest())?;
                if matches!(content.body, Body::Sent { .. }) {
                    return Err(DecodeError::Invalid {
                        field: "copy",
                        reason: "a copy of a copy",
                    }
                    .into());
                }
                Body::Sent {
                    to,
                    content: Box::new(content),
                }
            }
            KIND_TIMED_TEXT => {
                let (secs, text) = data
                    .split_first_chunk::<4>()
                    .ok_or(DecodeError::Truncated {
                        field: "timed text",
                    })?;
                let secs = u32::from_be_bytes(*secs);
                if secs == 0 || secs > MAX_TIMER_SECS {
                    return Err(ContentError::TimerTooLong(secs));
                }
                let text = text_of(text)?;
                Body::TimedText { secs, text }
            }
            KIND_EDIT => {
                let (target, text) = data
                    .split_first_chunk::<16>()
                    .ok_or(DecodeError::Truncated { field: "edit" })?;
                let text = text_of(text)?;
                Body::Edit {
                    target: MessageId(*target),
                    text,
                }
            }
            KIND_DELETE => {
                let target: [u8; 16] = data
                    .try_into()
                    .map_err(|_| DecodeError::Truncated { field: "delete" })?;
                Body::Delete {
                    target: MessageId(target),
                }
            }
            KIND_TIMER => {
                let mut r = Reader::new(data);
                let secs = r.u32("timer")?;
                r.finish()?;
                if secs > MAX_TIMER_SECS {
                    return Err(ContentError::TimerTooLong(secs));
                }
                Body::Timer { secs }
            }
            KIND_REPLY => {
                let (target, own, rest) = target_and_own(data, "reply")?;
                let (secs, text) = rest
                    .split_first_chunk::<4>()
                    .ok_or(DecodeError::Truncated { field: "reply" })?;
                let secs = u32::from_be_bytes(*secs);
                if secs > MAX_TIMER_SECS {
                    return Err(ContentError::TimerTooLong(secs));
                }
                let text = text_of(text)?;
                Body::Reply {
                    target,
                    own,
                    secs,
                    text,
                }
            }
            KIND_REACTION => {
                let (target, own, emoji) = target_and_own(data, "reaction")?;
                if emoji.len() > MAX_REACTION_LEN {
                    return Err(ContentError::ReactionTooLong(emoji.len()));
                }
                let emoji = std::str::from_utf8(emoji)
                    .map_err(|_| DecodeError::InvalidUtf8 { field: "reaction" })?;
                check_reaction(emoji)?;
                Body::Reaction {
                    target,
                    own,
                    emoji: emoji.to_owned(),
                }
            }
            KIND_FILE => {
                let (secs, rest) = data
                    .split_first_chunk::<4>()
                    .ok_or(DecodeError::Truncated { field: "file" })?;
                let secs = u32::from_be_bytes(*secs);
                if secs > MAX_TIMER_SECS {
                    return Err(ContentError::TimerTooLong(secs));
                }
                let file = crate::file::FileRef::decode(rest)?;
                Body::File {
                    secs,
                    file: Box::new(file),
                }
            }
            KIND_GROUP => {
                let mut r = Reader::new(data);
                let group = GroupId(r.array("group id")?);
                let what = match r.u8("group record")? {
                    GROUP_OPS => {
                        let all = r.bool("group operations")?;
                        let have = r.array("group have")?;
                        let ops = decode_ops(r.rest(), MAX_BODY_LEN / 2)?;
                        if ops.is_empty() {
                            return Err(DecodeError::Invalid {
                                field: "group operations",
                                reason: "a record carries at least one",
                            }
                            .into());
                        }
                        if ops.iter().any(|op| op.group() != group) {
                            return Err(ContentError::Group(GroupError::WrongGroup));
                        }
                        GroupBody::Ops { all, have, ops }
                    }
                    GROUP_MESSAGE => {
                        let (hlc, have, secs) = posting_head(&mut r)?;
                        let text = text_of(r.rest())?;
                        GroupBody::Message {
                            hlc,
                            have,
                            secs,
                            text,
                        }
                    }
                    GROUP_FILE => {
                        let (hlc, have, secs) = posting_head(&mut r)?;
                        let file = crate::file::FileRef::decode(r.rest())?;
                        GroupBody::File {
                            hlc,
                            have,
                            secs,
                            file: Box::new(file),
                        }
                    }
                    GROUP_CARDS => {
                        let count = usize::from(r.u8("group cards")?);
                        if count == 0 || count > MAX_GROUP_CARDS {
                            return Err(DecodeError::Invalid {
                                field: "group cards",
                                reason: "a record carries 1 to MAX_GROUP_CARDS",
                            }
                            .into());
                        }
                        let mut cards = Vec::with_capacity(count);
                        for _ in 0..count {
                            let bytes = r.bytes16(crate::card::MAX_CARD_LEN, "group card")?;
                            cards.push(Card::decode(bytes)?);
                        }
                        r.finish()?;
                        GroupBody::Cards { cards }
                    }
                    GROUP_KEY => {
                        let record = crate::group::large::KeyRecord::decode(r.rest())?;
                        if record.group() != group {
                            return Err(ContentError::Group(GroupError::WrongGroup));
                        }
                        GroupBody::Key {
                            record: Box::new(record),
                        }
                    }
                    tag => {
                        return Err(DecodeError::UnknownTag {
                            field: "group record",
                            tag: tag.into(),
                        }
                        .into());
                    }
                };
                Body::Group { group, what }
            }
            kind => Body::Unknown {
                kind,
                data: data.to_vec(),
            },
        })
    }
}

/// What a group message and a group file begin with: the author's clock, digest and
/// timer (at most [`MAX_TIMER_SECS`]).
fn posting_head(r: &mut Reader<'_>) -> Result<(Hlc, [u8; 16], u32), ContentError> {
    let hlc = Hlc {
        ms: r.u64("group clock")?,
        count: r.u32("group clock")?,
    };
    let have = r.array("group have")?;
    let secs = r.u32("group timer")?;
    if secs > MAX_TIMER_SECS {
        return Err(ContentError::TimerTooLong(secs));
    }
    Ok((hlc, have, secs))
}

/// Encodes what [`posting_head`] reads.
fn posting_head_into(out: &mut Vec<u8>, hlc: &Hlc, have: &[u8; 16], secs: u32) {
    out.extend_from_slice(&hlc.ms.to_be_bytes());
    out.extend_from_slice(&hlc.count.to_be_bytes());
    out.extend_from_slice(have);
    out.extend_from_slice(&secs.to_be_bytes());
}

/// A chat text from its bytes: at most [`MAX_TEXT_LEN`] bytes of UTF-8.
fn text_of(bytes: &[u8]) -> Result<String, ContentError> {
    if bytes.len() > MAX_TEXT_LEN {
        return Err(ContentError::TextTooLong(bytes.len()));
    }
    let text =
        std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { field: "text" })?;
    Ok(text.to_owned())
}

/// A character as quoted in an error: itself if it can be seen, else nothing.
fn shown(c: u32) -> String {
    match char::from_u32(c) {
        Some(c) if !c.is_control() && !c.is_whitespace() && !crate::card::is_invisible(c) => {
            format!("'{c}'")
        }
        _ => "a character that cannot be seen".into(),
    }
}

/// The target message id and the `own` flag at the start of a reply or reaction, and
/// what follows them.
fn target_and_own<'a>(
    data: &'a [u8],
    field: &'static str,
) -> Result<(MessageId, bool, &'a [u8]), ContentError> {
    let (target, rest) = data
        .split_first_chunk::<16>()
        .ok_or(DecodeError::Truncated { field })?;
    let (own, rest) = rest.split_first().ok_or(DecodeError::Truncated { field })?;
    let own = match own {
        0 => false,
        1 => true,
        tag => {
            return Err(DecodeError::UnknownTag {
                field,
                tag: (*tag).into(),
            }
            .into());
        }
    };
    Ok((MessageId(*target), own, rest))
}

/// Why content could not be encoded or decoded.
#[derive(Debug, Error)]
pub enum ContentError {
    /// Malformed bytes.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A card update whose card is invalid.
    #[error("card update rejected: {0}")]
    Card(#[from] CardError),
    /// The text exceeds [`MAX_TEXT_LEN`].
    #[error("message text is {0} bytes; the limit is 32768")]
    TextTooLong(usize),
    /// A receipt lists more than [`MAX_RECEIPT_IDS`] ids.
    #[error("receipt lists {0} ids; the limit is 512")]
    TooManyReceiptIds(usize),
    /// A group record of cards carries none or more than [`MAX_GROUP_CARDS`].
    #[error("a group record of {0} cards; it carries 1 to 16")]
    TooManyCards(usize),
    /// A timer longer than [`MAX_TIMER_SECS`] (or a timed text's of 0).
    #[error("a disappearing-message timer of {0} s; it must be at most a year")]
    TimerTooLong(u32),
    /// A reaction longer than [`MAX_REACTION_LEN`].
    #[error("a reaction of {0} bytes; the limit is 64")]
    ReactionTooLong(usize),
    /// A reaction holding a character no reaction may (see [`check_reaction`]).
    #[error("a reaction is emoji and symbols only: {shown} (U+{code:04X}) cannot be in one", shown = shown(*.0), code = .0)]
    NotAReaction(u32),
    /// A file reference over a bound or malformed.
    #[error("file reference rejected: {0}")]
    File(#[from] crate::file::FileError),
    /// A group record whose operations are malformed, forged or of another group.
    #[error("group record rejected: {0}")]
    Group(#[from] GroupError),
    /// An unknown body exceeds [`MAX_BODY_LEN`].
    #[error("message body is {0} bytes; the limit is 61440")]
    BodyTooLarge(usize),
    /// A copy for our other devices (kind 13) that holds a copy.
    #[error("a copy for the other devices cannot hold another copy")]
    CopyOfACopy,
    /// A device set longer than any (SPEC §15).
    #[error("a device set of {0} bytes; the limit is 23043")]
    DevicesTooLong(usize),
}

/// One content record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    /// The sender's id for this message.
    pub id: MessageId,
    /// Position in the sender's half of the conversation, from 1; 0 for unsequenced
    /// bodies (receipts, card updates).
    pub seq: u64,
    /// [`Content::hash`] of the sender's previous sequenced record in this conversation,
    /// all zeros for the first.
    pub prev: [u8; 32],
    /// Sender's clock, Unix milliseconds.
    pub sent_at_ms: u64,
    /// The payload.
    pub body: Body,
}

impl Content {
    /// Checks the limits that [`Content::decode`] enforces, so a sender learns of them
    /// before anything is sealed.
    pub fn check(&self) -> Result<(), ContentError> {
        match &self.body {
            Body::Text(t)
            | Body::TimedText { text: t, .. }
            | Body::Edit { text: t, .. }
            | Body::Reply { text: t, .. }
                if t.len() > MAX_TEXT_LEN =>
            {
                Err(ContentError::TextTooLong(t.len()))
            }
            Body::TimedText { secs, .. } | Body::Reply { secs, .. } | Body::Timer { secs }
                if *secs > MAX_TIMER_SECS =>
            {
                Err(ContentError::TimerTooLong(*secs))
            }
            Body::Reaction { emoji, .. } => check_reaction(emoji),
            Body::File { secs, .. } if *secs > MAX_TIMER_SECS => {
                Err(ContentError::TimerTooLong(*secs))
            }
            Body::File { file, .. } => file.check().map_err(ContentError::from),
            Body::Receipt { ids, .. } if ids.len() > MAX_RECEIPT_IDS => {
                Err(ContentError::TooManyReceiptIds(ids.len()))
            }
            Body::Group {
                what: GroupBody::Message { text, .. },
                ..
            } if text.len() > MAX_TEXT_LEN => Err(ContentError::TextTooLong(text.len())),
            Body::Group {
                what: GroupBody::Message { secs, .. } | GroupBody::File { secs, .. },
                ..
            } if *secs > MAX_TIMER_SECS => Err(ContentError::TimerTooLong(*secs)),
            Body::Group {
                what: GroupBody::File { file, .. },
                ..
            } => file.check().map_err(ContentError::from),
            Body::Group {
                what: GroupBody::Cards { cards },
                ..
            } if cards.is_empty() || cards.len() > MAX_GROUP_CARDS => {
                Err(ContentError::TooManyCards(cards.len()))
            }
            Body::Group {
                what: GroupBody::Ops { ops, .. },
                ..
            } if ops.is_empty()
                || ops.iter().map(|o| 2 + o.encode().len()).sum::<usize>() > MAX_BODY_LEN - 64 =>
            {
                Err(ContentError::BodyTooLarge(
                    ops.iter().map(|o| 2 + o.encode().len()).sum(),
                ))
            }
            Body::Devices(set) if set.len() > MAX_DEVICE_SET_LEN => {
                Err(ContentError::DevicesTooLong(set.len()))
            }
            Body::Unknown { data, .. } if data.len() > MAX_BODY_LEN => {
                Err(ContentError::BodyTooLarge(data.len()))
            }
            Body::Account(AccountRecord::ContactAdded { name, .. }) => {
                crate::card::check_name(name).map_err(|e| ContentError::Card(CardError::from(e)))
            }
            Body::Sent { content, .. } if matches!(content.body, Body::Sent { .. }) => {
                Err(ContentError::CopyOfACopy)
            }
            Body::Sent { to, content } => {
                content.check()?;
                let len =
                    1 + to.to_bytes().len() + CONTENT_HEADER_LEN + content.body.encode().len();
                if to.to_bytes().len() > MAX_PEER_ID_LEN || len > MAX_BODY_LEN {
                    return Err(ContentError::BodyTooLarge(len));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The binary encoding (see SPEC.md, "Content"). Call [`Content::check`] first for
    /// values not produced by [`Content::decode`].
    pub fn encode(&self) -> Vec<u8> {
        let body = self.body.encode();
        let mut w = Writer::with_capacity(CONTENT_HEADER_LEN + body.len());
        w.u8(CONTENT_VERSION)
            .raw(&self.id.0)
            .u64(self.seq)
            .raw(&self.prev)
            .u64(self.sent_at_ms)
            .u16(self.body.kind())
            .bytes32(&body);
        w.finish()
    }

    /// Decodes one record occupying all of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, ContentError> {
        let mut r = Reader::new(bytes);
        let version = r.u8("content version")?;
        if version != CONTENT_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "content",
                version,
            }
            .into());
        }
        let id = MessageId(r.array("message id")?);
        let seq = r.u64("sequence number")?;
        let prev = r.array("previous hash")?;
        let sent_at_ms = r.u64("timestamp")?;
        let kind = r.u16("body kind")?;
        let data = r.bytes32(MAX_BODY_LEN, "body")?;
        r.finish()?;
        Ok(Self {
            id,
            seq,
            prev,
            sent_at_ms,
            body: Body::decode(kind, data)?,
        })
    }

    /// The hash the sender's next sequenced record names as `prev`.
    pub fn hash(&self) -> [u8; 32] {
        hash("kkachi/content/v1", &[&self.encode()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;
    use proptest::prelude::*;

    fn arb_body() -> impl Strategy<Value = Body> {
        prop_oneof![
            ".{0,200}".prop_map(Body::Text),
            (
                any::<bool>(),
                proptest::collection::vec(any::<[u8; 16]>(), 0..20)
            )
                .prop_map(|(read, ids)| Body::Receipt {
                    status: if read {
                        ReceiptStatus::Read
                    } else {
                        ReceiptStatus::Delivered
                    },
                    ids: ids.into_iter().map(MessageId).collect(),
                }),
            (
                any::<[u8; 16]>(),
                any::<bool>(),
                0..=MAX_TIMER_SECS,
                ".{0,100}"
            )
                .prop_map(|(target, own, secs, text)| Body::Reply {
                    target: MessageId(target),
                    own,
                    secs,
                    text
                }),
            (any::<[u8; 16]>(), any::<bool>(), "[👍❤🎉😂😮😢🙏🔥]{0,4}").prop_map(
                |(target, own, emoji)| {
                    Body::Reaction {
                        target: MessageId(target),
                        own,
                        emoji,
                    }
                }
            ),
            (
                0..=MAX_TIMER_SECS,
                any::<[u8; 32]>(),
                any::<[u8; 32]>(),
                0..=crate::file::MAX_FILE_BYTES,
                "[a-z0-9 ._-]{0,40}[a-z]",
                "(image/(png|jpeg))?",
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(secs, key, manifest, size, name, mime, thumbnail)| {
                    Body::File {
                        secs,
                        file: Box::new(crate::file::FileRef {
                            key: crate::file::FileKey(key),
                            manifest: crate::file::ChunkId(manifest),
                            size,
                            name,
                            mime,
                            thumbnail,
                        }),
                    }
                }),
            (
                any::<[u8; 32]>(),
                any::<u64>(),
                any::<u32>(),
                0..=MAX_TIMER_SECS,
                ".{0,100}"
            )
                .prop_map(|(group, ms, count, secs, text)| Body::Group {
                    group: GroupId(group),
                    what: GroupBody::Message {
                        hlc: Hlc { ms, count },
                        have: [count as u8; 16],
                        secs,
                        text,
                    },
                }),
            (
                any::<[u8; 32]>(),
                any::<u64>(),
                0..=MAX_TIMER_SECS,
                1u64..=crate::file::MAX_FILE_BYTES,
                "[a-z]{1,40}",
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(group, ms, secs, size, name, thumbnail)| Body::Group {
                    group: GroupId(group),
                    what: GroupBody::File {
                        hlc: Hlc { ms, count: 0 },
                        have: [1; 16],
                        secs,
                        file: Box::new(crate::file::FileRef {
                            key: crate::file::FileKey(group),
                            manifest: crate::file::ChunkId([2; 32]),
                            size,
                            name,
                            mime: "image/png".into(),
                            thumbnail,
                        }),
                    },
                }),
            proptest::collection::vec(any::<u8>(), 0..100).prop_map(Body::Devices),
            (13u16.., proptest::collection::vec(any::<u8>(), 0..100))
                .prop_map(|(kind, data)| Body::Unknown { kind, data }),
        ]
    }

    #[test]
    fn group_records_carry_verified_operations_of_their_group_only() {
        use crate::group::{Mode, SignedOp};
        let alice = Identity::generate();
        let at = |ms| Hlc { ms, count: 0 };
        let create = SignedOp::create(&alice, "Alice", [1; 16], "Family", Mode::Chat, at(1));
        let other = SignedOp::create(&alice, "Alice", [2; 16], "Work", Mode::Chat, at(1));
        let record = |group: GroupId, ops: Vec<SignedOp>| Content {
            id: MessageId([1; 16]),
            seq: 0,
            prev: [0; 32],
            sent_at_ms: 5,
            body: Body::Group {
                group,
                what: GroupBody::Ops {
                    all: true,
                    have: [3; 16],
                    ops,
                },
            },
        };
        let good = record(create.group(), vec![create.clone()]);
        assert!(good.check().is_ok());
        assert_eq!(Content::decode(&good.encode()).unwrap(), good);
        assert!(!good.body.is_sequenced());
        // An operation of another group inside: the record is refused whole.
        let mixed = record(create.group(), vec![create.clone(), other]);
        assert!(matches!(
            Content::decode(&mixed.encode()),
            Err(ContentError::Group(GroupError::WrongGroup))
        ));
        // No operations at all: refused before and after sealing.
        let empty = record(create.group(), vec![]);
        assert!(empty.check().is_err());
        assert!(Content::decode(&empty.encode()).is_err());
        // A forged operation (one flipped byte of the signature) is refused.
        let mut bytes = good.encode();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            Content::decode(&bytes),
            Err(ContentError::Group(GroupError::BadSignature))
        ));
        let message = Content {
            seq: 1,
            body: Body::Group {
                group: create.group(),
                what: GroupBody::Message {
                    hlc: at(9),
                    have: [4; 16],
                    secs: 0,
                    text: "hi all".into(),
                },
            },
            ..good
        };
        assert!(message.body.is_sequenced());
        assert_eq!(Content::decode(&message.encode()).unwrap(), message);
        // A file to the group: sequenced like a message, its reference checked whole.
        let file = crate::file::FileRef {
            key: crate::file::FileKey([7; 32]),
            manifest: crate::file::ChunkId([8; 32]),
            size: 300_000,
            name: "flooded-street.jpg".into(),
            mime: "image/jpeg".into(),
            thumbnail: vec![0xff; 40],
        };
        let with_file = |file: crate::file::FileRef| Content {
            seq: 2,
            body: Body::Group {
                group: create.group(),
                what: GroupBody::File {
                    hlc: at(10),
                    have: [4; 16],
                    secs: 3600,
                    file: Box::new(file),
                },
            },
            ..message.clone()
        };
        let sent = with_file(file.clone());
        assert!(sent.check().is_ok() && sent.body.is_sequenced());
        assert_eq!(Content::decode(&sent.encode()).unwrap(), sent);
        let nameless = with_file(crate::file::FileRef {
            name: String::new(),
            ..file
        });
        assert!(nameless.check().is_err());
        assert!(Content::decode(&nameless.encode()).is_err());
        // Cut short, the reference does not decode.
        let bytes = sent.encode();
        assert!(Content::decode(&bytes[..bytes.len() - 3]).is_err());
        // Members' cards, passed on: unsequenced, each card verified, 1 to 16.
        let bob = Identity::generate();
        let card = Card::new(&bob, "Bob", vec![], 2).unwrap();
        let cards = |cards: Vec<Card>| Content {
            seq: 0,
            body: Body::Group {
                group: create.group(),
                what: GroupBody::Cards { cards },
            },
            ..message.clone()
        };
        let two = cards(vec![card.clone(), card.clone()]);
        assert!(two.check().is_ok() && !two.body.is_sequenced());
        assert_eq!(Content::decode(&two.encode()).unwrap(), two);
        for wrong in [vec![], vec![card.clone(); MAX_GROUP_CARDS + 1]] {
            let c = cards(wrong);
            assert!(matches!(c.check(), Err(ContentError::TooManyCards(_))));
            assert!(Content::decode(&c.encode()).is_err());
        }
        assert!(cards(vec![card.clone(); MAX_GROUP_CARDS]).check().is_ok());
        // An altered card (its last signature byte) is refused with the record.
        let mut bytes = two.encode();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            Content::decode(&bytes),
            Err(ContentError::Card(_))
        ));
        // Trailing bytes after the last card are refused.
        let mut long = two.encode();
        long.push(0);
        let body_len = long.len() - CONTENT_HEADER_LEN;
        long[CONTENT_HEADER_LEN - 4..CONTENT_HEADER_LEN]
            .copy_from_slice(&(body_len as u32).to_be_bytes());
        assert!(Content::decode(&long).is_err());
    }

    #[test]
    fn a_device_set_goes_as_kind_12_verbatim_and_an_overlong_one_is_refused() {
        use crate::device::{DeviceSet, MAX_DEVICE_SET_LEN};
        let alice = Identity::generate();
        let set = DeviceSet::new(&alice, "laptop", 1_700_000_000)
            .unwrap()
            .encode();
        let c = Content {
            body: Body::Devices(set.clone()),
            ..text(0, "")
        };
        let bytes = c.encode();
        assert_eq!(
            &bytes[CONTENT_HEADER_LEN - 6..CONTENT_HEADER_LEN - 4],
            &[0, 12]
        );
        assert_eq!(&bytes[CONTENT_HEADER_LEN..], set.as_slice());
        assert_eq!(Content::decode(&bytes).unwrap(), c);
        assert!(!c.body.is_sequenced());
        // One byte over the largest set: refused before it is kept.
        let long = Content {
            body: Body::Devices(vec![1; MAX_DEVICE_SET_LEN + 1]),
            ..text(0, "")
        };
        assert!(matches!(
            long.check(),
            Err(ContentError::DevicesTooLong(n)) if n == MAX_DEVICE_SET_LEN + 1
        ));
        let mut bytes = c.encode();
        bytes.truncate(CONTENT_HEADER_LEN - 4);
        bytes.extend_from_slice(&((MAX_DEVICE_SET_LEN + 1) as u32).to_be_bytes());
        bytes.extend(std::iter::repeat_n(1u8, MAX_DEVICE_SET_LEN + 1));
        assert!(matches!(
            Content::decode(&bytes),
            Err(ContentError::DevicesTooLong(_))
        ));
    }

    #[test]
    fn known_answer_group_cards() {
        // The head of a cards record: group id, what 4, count, then each card's length.
        let alice = Identity::generate();
        let card = Card::new(&alice, "Alice", vec![], 3).unwrap();
        let c = Content {
            body: Body::Group {
                group: GroupId([9; 32]),
                what: GroupBody::Cards {
                    cards: vec![card.clone()],
                },
            },
            ..text(0, "")
        };
        let body = &c.encode()[CONTENT_HEADER_LEN..];
        let len = card.encode().len() as u16;
        let mut head = vec![9u8; 32];
        head.extend_from_slice(&[4, 1]);
        head.extend_from_slice(&len.to_be_bytes());
        assert_eq!(hex::encode(&body[..36]), hex::encode(&head));
        assert_eq!(&body[36..], card.encode().as_slice());
        assert_eq!(c.body.kind(), 11);
    }

    proptest! {
        #[test]
        fn round_trip(id in any::<[u8; 16]>(), seq in any::<u64>(), prev in any::<[u8; 32]>(),
                      sent_at_ms in any::<u64>(), body in arb_body()) {
            let c = Content { id: MessageId(id), seq, prev, sent_at_ms, body };
            prop_assert!(c.check().is_ok());
            prop_assert_eq!(Content::decode(&c.encode()).unwrap(), c);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Content::decode(&bytes);
        }
    }

    fn text(seq: u64, s: &str) -> Content {
        Content {
            id: MessageId([seq as u8; 16]),
            seq,
            prev: [0; 32],
            sent_at_ms: 1_700_000_000_000,
            body: Body::Text(s.into()),
        }
    }

    /// The peer id of a fixed Ed25519 key (for known answers).
    fn fixed_peer() -> libp2p_identity::PeerId {
        let secret = libp2p_identity::ed25519::SecretKey::try_from_bytes([7u8; 32]).unwrap();
        let keys = libp2p_identity::ed25519::Keypair::from(secret);
        libp2p_identity::PeerId::from_public_key(&keys.public().into())
    }

    #[test]
    fn a_copy_for_the_other_devices_carries_the_record_as_sealed_and_never_a_copy() {
        let copy = Content {
            id: MessageId([9; 16]),
            seq: 0,
            prev: [0; 32],
            sent_at_ms: 1_700_000_000_000,
            body: Body::Sent {
                to: fixed_peer(),
                content: Box::new(text(2, "안녕")),
            },
        };
        copy.check().unwrap();
        let bytes = copy.encode();
        assert_eq!(
            hex::encode(&bytes),
            concat!(
                "01",
                "09090909090909090909090909090909",
                "0000000000000000",
                "0000000000000000000000000000000000000000000000000000000000000000",
                "0000018bcfe56800",
                "000d",
                "00000074",
                // The contact's peer id, behind its length (38).
                "26",
                "002408011220ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c",
                // The record as sealed: the text of `known_answer_encoding`.
                "01",
                "02020202020202020202020202020202",
                "0000000000000002",
                "0000000000000000000000000000000000000000000000000000000000000000",
                "0000018bcfe56800",
                "0001",
                "00000006",
                "ec9588eb8595"
            )
        );
        assert_eq!(Content::decode(&bytes).unwrap(), copy);
        assert!(!copy.body.is_sequenced(), "a control record");
        assert!(copy.body.text().is_none());

        // A copy of a copy is refused, sealing and reading.
        let nested = Content {
            body: Body::Sent {
                to: fixed_peer(),
                content: Box::new(copy.clone()),
            },
            ..copy.clone()
        };
        assert!(matches!(nested.check(), Err(ContentError::CopyOfACopy)));
        assert!(Content::decode(&nested.encode()).is_err());
        // As is a contact that is no peer id, one cut short, and a record that does not
        // read.
        let mut wrong = bytes.clone();
        let at = CONTENT_HEADER_LEN + 1;
        wrong[at..at + 4].copy_from_slice(&[0xff; 4]);
        assert!(Content::decode(&wrong).is_err());
        for cut in [CONTENT_HEADER_LEN + 1, bytes.len() - 1] {
            let mut short = bytes[..cut].to_vec();
            let len = (cut - CONTENT_HEADER_LEN) as u32;
            short[CONTENT_HEADER_LEN - 4..CONTENT_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
            assert!(Content::decode(&short).is_err(), "cut at {cut}");
        }
        // A record whose copy would not fit one body is refused before sealing.
        let long = Content {
            body: Body::Sent {
                to: fixed_peer(),
                content: Box::new(Content {
                    body: Body::Unknown {
                        kind: 99,
                        data: vec![0; MAX_BODY_LEN],
                    },
                    ..text(3, "")
                }),
            },
            ..copy
        };
        assert!(matches!(long.check(), Err(ContentError::BodyTooLarge(_))));
    }

    #[test]
    fn account_records_round_trip_and_a_malformed_one_is_refused() {
        let id = Identity::generate();
        let card = Card::new(&id, "Minji", vec![], 1).unwrap();
        let records = [
            AccountRecord::ContactAdded {
                card: Box::new(card.clone()),
                name: "민지 (work)".into(),
            },
            AccountRecord::ContactRemoved { peer: fixed_peer() },
            AccountRecord::Blocked { peer: fixed_peer() },
            AccountRecord::Unblocked { peer: fixed_peer() },
            AccountRecord::DeletedForMe {
                peer: fixed_peer(),
                id: MessageId([5; 16]),
            },
            group_key(&id, [7; 32]),
        ];
        for record in records {
            let mut c = text(0, "");
            c.body = Body::Account(record);
            c.check().unwrap();
            let bytes = c.encode();
            assert_eq!(Content::decode(&bytes).unwrap(), c);
            assert!(!c.body.is_sequenced());
            // Cut short anywhere in the body: refused.
            let body_len = bytes.len() - CONTENT_HEADER_LEN;
            for cut in 0..body_len {
                let mut short = bytes[..CONTENT_HEADER_LEN + cut].to_vec();
                short[CONTENT_HEADER_LEN - 4..CONTENT_HEADER_LEN]
                    .copy_from_slice(&(cut as u32).to_be_bytes());
                assert!(Content::decode(&short).is_err(), "cut at {cut}");
            }
        }
        // A blocked peer, known answer: kind 14, tag 3, the peer id behind its length.
        let mut c = text(0, "");
        c.body = Body::Account(AccountRecord::Blocked { peer: fixed_peer() });
        assert!(hex::encode(c.encode()).ends_with(concat!(
            "000e",
            "00000028",
            "03",
            "26",
            "002408011220ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c"
        )));
        // A name the rules refuse, and an unknown tag: refused, sealing and reading.
        let mut bad = text(0, "");
        bad.body = Body::Account(AccountRecord::ContactAdded {
            card: Box::new(card),
            name: "a\u{202e}b".into(),
        });
        assert!(bad.check().is_err());
        assert!(Content::decode(&bad.encode()).is_err());
        let mut unknown = c.encode();
        unknown[CONTENT_HEADER_LEN] = 9;
        assert!(Content::decode(&unknown).is_err());
        // An epoch key that is not the record's epoch's: refused.
        let mut wrong = text(0, "");
        wrong.body = Body::Account(group_key(&id, [7; 32]));
        let mut bytes = wrong.encode();
        bytes[CONTENT_HEADER_LEN + 1] ^= 1;
        assert!(Content::decode(&bytes).is_err());
    }

    /// An epoch key of group `[9; 32]` (from `seed`), with its key record made by `admin`.
    fn group_key(admin: &Identity, seed: [u8; 32]) -> AccountRecord {
        use crate::group::large::{EpochKey, KeyRecord};
        let key = EpochKey::from_bytes(seed);
        let hlc = crate::group::Hlc { ms: 5, count: 0 };
        let record = KeyRecord::make(
            admin,
            GroupId([9; 32]),
            1,
            hlc,
            &key,
            &[admin.x25519_public()],
        )
        .unwrap()
        .remove(0);
        AccountRecord::GroupKey {
            key,
            record: Box::new(record),
        }
    }

    #[test]
    fn card_update_round_trips() {
        let id = Identity::generate();
        let card = Card::new(&id, "Minji", vec![], 4).unwrap();
        let c = Content {
            body: Body::CardUpdate(Box::new(card)),
            ..text(1, "")
        };
        assert_eq!(Content::decode(&c.encode()).unwrap(), c);
        assert!(
            !c.body.is_sequenced(),
            "card updates never cause gap notices"
        );
        assert!(Body::Text("x".into()).is_sequenced());
    }

    #[test]
    fn unknown_kind_is_kept_not_fatal() {
        let c = Content {
            body: Body::Unknown {
                kind: 77,
                data: b"future".to_vec(),
            },
            ..text(1, "")
        };
        let back = Content::decode(&c.encode()).unwrap();
        assert_eq!(
            back.body,
            Body::Unknown {
                kind: 77,
                data: b"future".to_vec()
            }
        );
    }

    #[test]
    fn limits_are_enforced_both_ways() {
        let long = text(1, &"a".repeat(MAX_TEXT_LEN + 1));
        assert!(matches!(long.check(), Err(ContentError::TextTooLong(_))));
        assert!(matches!(
            Content::decode(&long.encode()),
            Err(ContentError::TextTooLong(_))
        ));
        let receipt = Content {
            body: Body::Receipt {
                status: ReceiptStatus::Read,
                ids: vec![MessageId([0; 16]); MAX_RECEIPT_IDS + 1],
            },
            ..text(0, "")
        };
        assert!(matches!(
            receipt.check(),
            Err(ContentError::TooManyReceiptIds(_))
        ));
        assert!(Content::decode(&receipt.encode()).is_err());
    }

    #[test]
    fn hash_chains_detect_changes() {
        let a = text(1, "hi");
        let b = text(1, "hi!");
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash(), a.clone().hash());
    }

    #[test]
    fn message_id_hex_round_trip() {
        let id = MessageId(*b"0123456789abcdef");
        assert_eq!(MessageId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(MessageId::from_hex("zz"), None);
        assert_eq!(MessageId::from_hex(&"é".repeat(16)), None);
    }

    #[test]
    fn known_answer_encoding() {
        let c = text(2, "안녕");
        assert_eq!(
            hex::encode(c.encode()),
            concat!(
                "01",
                "02020202020202020202020202020202",
                "0000000000000002",
                "0000000000000000000000000000000000000000000000000000000000000000",
                "0000018bcfe56800",
                "0001",
                "00000006",
                "ec9588eb8595"
            )
        );
    }

    #[test]
    fn timers_round_trip_and_are_bounded() {
        let mut c = text(0, "");
        c.body = Body::Timer { secs: 86_400 };
        let bytes = c.encode();
        // Kind 4, four bytes of seconds.
        assert!(
            hex::encode(&bytes).ends_with("00040000000400015180"),
            "{}",
            hex::encode(&bytes)
        );
        assert_eq!(Content::decode(&bytes).unwrap(), c);
        assert!(!c.body.is_sequenced());
        c.body = Body::Timer {
            secs: MAX_TIMER_SECS + 1,
        };
        assert!(matches!(
            Content::decode(&c.encode()),
            Err(ContentError::TimerTooLong(_))
        ));
        // A body of another length is refused.
        let mut long = bytes.clone();
        let at = long.len() - 8;
        long[at..at + 4].copy_from_slice(&5u32.to_be_bytes());
        long.push(0);
        assert!(Content::decode(&long).is_err());
    }

    #[test]
    fn timed_texts_carry_their_timer() {
        let mut c = text(3, "");
        c.body = Body::TimedText {
            secs: 30,
            text: "보고 지워".into(),
        };
        let bytes = c.encode();
        assert!(
            hex::encode(&bytes).contains("0005000000110000001e"),
            "{}",
            hex::encode(&bytes)
        );
        assert_eq!(Content::decode(&bytes).unwrap(), c);
        assert!(c.body.is_sequenced());
        assert_eq!(c.body.text(), Some(("보고 지워", 30)));
        c.body = Body::TimedText {
            secs: 0,
            text: "x".into(),
        };
        assert!(
            Content::decode(&c.encode()).is_err(),
            "a timed text has a timer"
        );
    }

    #[test]
    fn edits_and_deletes_name_their_target() {
        let mut c = text(4, "");
        c.body = Body::Edit {
            target: MessageId([7; 16]),
            text: "fixed".into(),
        };
        let bytes = c.encode();
        assert!(
            hex::encode(&bytes).ends_with(
                "0006000000150707070707070707070707070707070766697865 64"
                    .replace(' ', "")
                    .as_str()
            ),
            "{}",
            hex::encode(&bytes)
        );
        assert_eq!(Content::decode(&bytes).unwrap(), c);
        assert!(c.body.is_sequenced());
        c.body = Body::Delete {
            target: MessageId([7; 16]),
        };
        assert_eq!(Content::decode(&c.encode()).unwrap(), c);
        // A delete of another length is refused.
        let mut long = c.encode();
        let at = long.len() - 20;
        long[at..at + 4].copy_from_slice(&17u32.to_be_bytes());
        long.push(0);
        assert!(Content::decode(&long).is_err());
    }

    #[test]
    fn replies_and_reactions_name_their_target_and_whose_it_is() {
        let mut c = text(5, "");
        c.body = Body::Reply {
            target: MessageId([7; 16]),
            own: false,
            secs: 0,
            text: "네".into(),
        };
        let bytes = c.encode();
        // Kind 8: the target, 0 (the recipient's message), no timer, the text.
        assert!(
            hex::encode(&bytes)
                .ends_with("000800000018070707070707070707070707070707070000000000eb84a4"),
            "{}",
            hex::encode(&bytes)
        );
        assert_eq!(Content::decode(&bytes).unwrap(), c);
        assert!(c.body.is_sequenced());
        assert_eq!(c.body.text(), Some(("네", 0)));
        c.body = Body::Reaction {
            target: MessageId([7; 16]),
            own: true,
            emoji: "👍".into(),
        };
        let bytes = c.encode();
        // Kind 9: the target, 1 (the sender's own message), the emoji.
        assert!(
            hex::encode(&bytes).ends_with(
                "00090000001507070707070707070707070707070707 01f09f918d"
                    .replace(' ', "")
                    .as_str()
            ),
            "{}",
            hex::encode(&bytes)
        );
        assert_eq!(Content::decode(&bytes).unwrap(), c);
        assert!(c.body.is_sequenced());
        assert_eq!(c.body.text(), None);
        // Whose it is must be 0 or 1.
        let mut bad = bytes.clone();
        let at = bad.len() - 5;
        bad[at] = 2;
        assert!(Content::decode(&bad).is_err());
        // Bounds, both ways.
        c.body = Body::Reaction {
            target: MessageId([7; 16]),
            own: true,
            emoji: "😂".repeat(MAX_REACTION_LEN / 4 + 1),
        };
        assert!(matches!(c.check(), Err(ContentError::ReactionTooLong(68))));
        assert!(Content::decode(&c.encode()).is_err());
        // Emoji only: words, spaces and what hides or reorders text are refused (a
        // reaction must not read as someone else's), what emoji are made of is not.
        for bad in [
            "👍 me",
            "me",
            "👍\u{202E}",
            "\u{200B}",
            "👍\n",
            "나",
            "👍ᄀ",
        ] {
            assert!(check_reaction(bad).is_err(), "{bad:?}");
            c.body = Body::Reaction {
                target: MessageId([7; 16]),
                own: true,
                emoji: bad.into(),
            };
            assert!(Content::decode(&c.encode()).is_err(), "{bad:?}");
        }
        for good in [
            "",
            "👍",
            "❤\u{FE0F}",
            "👨\u{200D}👩\u{200D}👧",
            "🏴\u{E0067}\u{E0062}\u{E007F}",
            "✅",
            "🇰🇷",
        ] {
            assert!(check_reaction(good).is_ok(), "{good:?}");
        }
        c.body = Body::Reply {
            target: MessageId([7; 16]),
            own: true,
            secs: MAX_TIMER_SECS + 1,
            text: String::new(),
        };
        assert!(c.check().is_err());
        assert!(Content::decode(&c.encode()).is_err());
        // Too short to name a target.
        c.body = Body::Unknown {
            kind: 9,
            data: vec![7; 16],
        };
        assert!(Content::decode(&c.encode()).is_err());
    }
}
