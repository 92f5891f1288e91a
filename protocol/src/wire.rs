//! The client↔relay protocol, `/kkachi/relay/2`.
//!
//! Requests and answers over one long-lived libp2p stream (a session): the client sends
//! [`ClientToRelay`] messages, each tagged with its id, and the relay answers each with a
//! [`RelayToClient`] under the same id, in any order. Every frame is a u32 big-endian
//! length followed by the body; the length is checked against [`MAX_FRAME_LEN`] before
//! the body is read. Contacts hand envelopes to each other directly the same way.
//!
//! Flow for a recipient: `Subscribe { after }` is a long poll that returns a `Batch` as
//! soon as anything newer than the cursor is stored (or an empty batch after `wait_ms`);
//! the client makes the messages durable locally, then `Delete`s them and subscribes
//! again from `next`. A sender only ever `Put`s; the relay answers `Stored` after the
//! envelopes are flushed to disk.

use crate::codec::{DecodeError, Reader, Writer};
use crate::envelope::{ENVELOPE_HEADER_LEN, Envelope, EnvelopeId, MAX_ENVELOPE_LEN};
use crate::file::ChunkId;
use crate::queue::{GroupKey, QueueKind, ReadKey, WriteId, WriteKey};

/// The session protocol, the only one relays speak: one long-lived stream carries many
/// requests, each frame tagged with its request id, answered in any order (SPEC.md §6).
pub const SESSION_PROTOCOL_NAME: &str = "/kkachi/relay/2";
/// Most requests a session may have unanswered; a relay reads no further request
/// from the stream until one is answered.
pub const MAX_IN_FLIGHT: usize = 64;
/// Version number reported in [`RelayInfo`]: the protocol version of SPEC.md.
pub const PROTOCOL_VERSION: u16 = 2;
/// Most envelopes in one `Put`.
pub const MAX_PUT_BATCH: usize = 32;
/// Most envelopes in one `Batch`.
pub const MAX_BATCH_ITEMS: usize = 256;
/// Most ids in one `Delete`.
pub const MAX_DELETE_IDS: usize = 1024;
/// Longest long-poll wait a client may ask for.
pub const MAX_WAIT_MS: u32 = 60_000;
/// Longest error message or info string.
pub const MAX_TEXT_LEN: usize = 512;
/// Most write ids in one `Grant` or `Revoke`.
pub const MAX_GRANT_IDS: usize = 1024;
/// Longest access token in a `Grant`.
pub const MAX_TOKEN_LEN: usize = 64;
/// Most chunk ids in one `HasChunks` or `DeleteChunks`.
pub const MAX_CHUNK_IDS: usize = 1024;
/// Largest frame body: a full `Put` batch plus headroom.
pub const MAX_FRAME_LEN: usize = MAX_PUT_BATCH * (32 + MAX_ENVELOPE_LEN + 4) + 1024;
/// Budget for envelope bytes in one `Batch`, so it always fits a frame.
pub const MAX_BATCH_BYTES: usize = MAX_FRAME_LEN - 1024 - MAX_BATCH_ITEMS * 12;

/// Requests, client to relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientToRelay {
    /// Store envelopes, each into the queue its write key was granted for.
    Put {
        /// One to [`MAX_PUT_BATCH`] envelopes.
        items: Vec<Addressed>,
    },
    /// Read a queue after a cursor, without waiting.
    Fetch {
        /// The queue's read key.
        key: ReadKey,
        /// Return envelopes stored after this cursor (0 = from the start).
        after: u64,
        /// At most this many (capped at [`MAX_BATCH_ITEMS`]).
        limit: u16,
    },
    /// Long poll: like `Fetch`, but if nothing is newer than `after`, wait up to
    /// `wait_ms` for something to arrive.
    Subscribe {
        /// The queue's read key.
        key: ReadKey,
        /// Return envelopes stored after this cursor.
        after: u64,
        /// How long to wait when there is nothing yet (capped at [`MAX_WAIT_MS`]).
        wait_ms: u32,
    },
    /// Delete envelopes the caller has stored durably.
    Delete {
        /// The queue's read key.
        key: ReadKey,
        /// Up to [`MAX_DELETE_IDS`] envelope ids.
        ids: Vec<EnvelopeId>,
    },
    /// Ask for [`RelayInfo`].
    Info,
    /// Open the queue of `key` if it does not exist, and let holders of the write keys
    /// whose ids are listed put into it.
    Grant {
        /// The queue's read key.
        key: ReadKey,
        /// What these capabilities are for (which limits apply to their puts).
        kind: QueueKind,
        /// An access token, for relays that open queues only for token holders
        /// (empty otherwise).
        token: Vec<u8>,
        /// Up to [`MAX_GRANT_IDS`] write ids.
        write_ids: Vec<WriteId>,
    },
    /// Withdraw write capabilities from the queue of `key`.
    Revoke {
        /// The queue's read key.
        key: ReadKey,
        /// Up to [`MAX_GRANT_IDS`] write ids.
        write_ids: Vec<WriteId>,
    },
    /// Store a chunk of a file (SPEC §13) in the queue `write` was granted for; the
    /// relay checks that `data` hashes to `id`. Answered with `Stored` (one outcome).
    PutChunk {
        /// The capability naming the queue.
        write: WriteKey,
        /// Unix seconds after which the relay may drop it.
        expires_at: u64,
        /// BLAKE3 of `data`.
        id: ChunkId,
        /// The chunk, at most [`file::MAX_CHUNK`](crate::file::MAX_CHUNK) bytes.
        data: Vec<u8>,
    },
    /// Read a chunk of the queue of `key`: answered with `Chunk`, or `NotFound`.
    GetChunk {
        /// The queue's read key.
        key: ReadKey,
        /// The chunk.
        id: ChunkId,
    },
    /// Which of these chunks the queue `write` was granted for holds (so an upload goes
    /// on where it stopped, and a file passed on is not uploaded again): `ChunksHeld`.
    HasChunks {
        /// The capability naming the queue.
        write: WriteKey,
        /// Up to [`MAX_CHUNK_IDS`] ids.
        ids: Vec<ChunkId>,
    },
    /// Delete chunks of the queue of `key` (fetched and kept): `Deleted`.
    DeleteChunks {
        /// The queue's read key.
        key: ReadKey,
        /// Up to [`MAX_CHUNK_IDS`] ids.
        ids: Vec<ChunkId>,
    },
    /// Open the group queue of `key` if it does not exist (SPEC §14.5): `Granted` (0).
    OpenGroup {
        /// The group queue's key.
        key: GroupKey,
        /// An access token, as for `Grant`.
        token: Vec<u8>,
    },
    /// Store envelopes, each into the open group queue of its key (the `write` of each
    /// item is a [`GroupKey`]'s bytes): `Stored`.
    PutGroup {
        /// One to [`MAX_PUT_BATCH`] envelopes.
        items: Vec<Addressed>,
    },
    /// Read a group queue after a cursor; with `wait_ms` > 0, a long poll as
    /// `Subscribe`: `Batch`.
    ReadGroup {
        /// The group queue's key.
        key: GroupKey,
        /// Return envelopes stored after this cursor.
        after: u64,
        /// At most this many (capped at [`MAX_BATCH_ITEMS`]).
        limit: u16,
        /// How long to wait when there is nothing yet (0: answer at once; capped at
        /// [`MAX_WAIT_MS`]).
        wait_ms: u32,
    },
    /// Store a chunk of a file in the open group queue of `key` (SPEC §14.5), as
    /// `PutChunk` does in a queue a write key was granted for: `Stored` (one outcome).
    PutGroupChunk {
        /// The group queue's key.
        key: GroupKey,
        /// Unix seconds after which the relay may drop it.
        expires_at: u64,
        /// BLAKE3 of `data`.
        id: ChunkId,
        /// The chunk, at most [`file::MAX_CHUNK`](crate::file::MAX_CHUNK) bytes.
        data: Vec<u8>,
    },
    /// Read a chunk of the group queue of `key`: `Chunk`, or `NotFound`.
    GetGroupChunk {
        /// The group queue's key.
        key: GroupKey,
        /// The chunk.
        id: ChunkId,
    },
    /// Which of these chunks the group queue of `key` holds: `ChunksHeld`.
    HasGroupChunks {
        /// The group queue's key.
        key: GroupKey,
        /// Up to [`MAX_CHUNK_IDS`] ids.
        ids: Vec<ChunkId>,
    },
}

/// An envelope and the write key it is put with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressed {
    /// The capability naming the queue (all zeros on a direct handover, where the
    /// contact's session says whose it is).
    pub write: WriteKey,
    /// The envelope.
    pub envelope: Envelope,
}

impl Addressed {
    /// An envelope handed straight to a contact, with no queue named.
    pub fn direct(envelope: Envelope) -> Self {
        Self {
            write: WriteKey([0; 32]),
            envelope,
        }
    }
}

/// Outcome of one envelope of a `Put`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// Newly stored and flushed.
    Stored,
    /// Already held (same envelope id); nothing written.
    Duplicate,
    /// Refused; nothing stored.
    Rejected {
        /// Why.
        code: ErrorCode,
        /// A sentence a person can act on.
        message: String,
    },
}

/// An envelope as returned by `Fetch`/`Subscribe`, with its position in the mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEnvelope {
    /// Arrival cursor within the mailbox; strictly increasing.
    pub cursor: u64,
    /// The envelope.
    pub envelope: Envelope,
}

/// What a relay says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayInfo {
    /// [`PROTOCOL_VERSION`] of the relay.
    pub protocol_version: u16,
    /// Software name and version, e.g. `kkachi-relay/0.1.0`.
    pub software: String,
    /// Operator-chosen name.
    pub name: String,
    /// How to reach the operator.
    pub operator: String,
    /// Failure-domain label, e.g. `hetzner/fsn1`; relays sharing a label can fail together.
    pub failure_domain: String,
    /// Largest payload accepted.
    pub max_payload: u32,
    /// Longest envelope lifetime kept, seconds.
    pub max_ttl_secs: u64,
    /// Most envelopes held for one write capability (one contact's puts into a queue).
    pub capability_max_envelopes: u32,
    /// Most bytes held for one write capability.
    pub capability_max_bytes: u64,
    /// Puts accepted per second per connection (sustained).
    pub puts_per_sec: u32,
    /// Who may open queues: 0 anyone, 1 holders of an access token from the operator.
    pub open_policy: u8,
    /// Most write capabilities one queue may grant.
    pub grants_per_queue: u32,
    /// Most envelopes a contact-request queue holds.
    pub request_max_envelopes: u32,
    /// Longest time a contact-request queue keeps an envelope, seconds.
    pub request_max_ttl_secs: u64,
    /// The relay's clock when it answered, Unix seconds: clients compare it with theirs
    /// (an envelope is refused beyond `CLOCK_SKEW_SECS` of skew).
    pub now_secs: u64,
    /// Chosen at random when the relay's database was created: a new one means what it
    /// held before is gone.
    pub store_epoch: u64,
}

/// Reasons a relay refuses a request or an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame could not be decoded.
    Malformed,
    /// Payload or request larger than the relay accepts.
    TooLarge,
    /// The envelope had already expired.
    Expired,
    /// The expiry is further ahead than the relay's TTL.
    ExpiryTooFar,
    /// Only the mailbox owner may do this.
    NotOwner,
    /// The recipient's mailbox is full.
    QuotaExceeded,
    /// Too many requests from this peer; retry later.
    RateLimited,
    /// The relay's disk is full.
    StorageFull,
    /// An internal failure on the relay.
    Internal,
    /// The relay is shutting down; retry elsewhere.
    ShuttingDown,
    /// No queue here takes this write key (never granted, or revoked).
    NoQueue,
    /// This relay opens queues only for holders of an access token from its operator.
    NotAllowed,
    /// Nothing with that id is held here (a chunk never put, deleted, or expired).
    NotFound,
    /// A code this version does not know.
    Other(u16),
}

impl ErrorCode {
    fn to_u16(self) -> u16 {
        match self {
            Self::Malformed => 1,
            Self::TooLarge => 2,
            Self::Expired => 3,
            Self::ExpiryTooFar => 4,
            Self::NotOwner => 5,
            Self::QuotaExceeded => 6,
            Self::RateLimited => 7,
            Self::StorageFull => 8,
            Self::Internal => 9,
            Self::ShuttingDown => 10,
            Self::NoQueue => 11,
            Self::NotAllowed => 12,
            Self::NotFound => 13,
            Self::Other(n) => n,
        }
    }

    fn from_u16(n: u16) -> Self {
        match n {
            1 => Self::Malformed,
            2 => Self::TooLarge,
            3 => Self::Expired,
            4 => Self::ExpiryTooFar,
            5 => Self::NotOwner,
            6 => Self::QuotaExceeded,
            7 => Self::RateLimited,
            8 => Self::StorageFull,
            9 => Self::Internal,
            10 => Self::ShuttingDown,
            11 => Self::NoQueue,
            12 => Self::NotAllowed,
            13 => Self::NotFound,
            n => Self::Other(n),
        }
    }

    /// True if the same request may succeed later or at another relay.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::QuotaExceeded
                | Self::RateLimited
                | Self::StorageFull
                | Self::Internal
                | Self::ShuttingDown
        )
    }

    /// Short stable name used in metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::TooLarge => "too_large",
            Self::Expired => "expired",
            Self::ExpiryTooFar => "expiry_too_far",
            Self::NotOwner => "not_owner",
            Self::QuotaExceeded => "quota_exceeded",
            Self::RateLimited => "rate_limited",
            Self::StorageFull => "storage_full",
            Self::Internal => "internal",
            Self::ShuttingDown => "shutting_down",
            Self::NoQueue => "no_queue",
            Self::NotAllowed => "not_allowed",
            Self::NotFound => "not_found",
            Self::Other(_) => "other",
        }
    }
}

/// Responses, relay to client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayToClient {
    /// Answer to `Put`: one outcome per envelope, in order. Sent only after every
    /// `Stored` envelope is durable.
    Stored {
        /// Outcomes, same order as the request.
        outcomes: Vec<PutOutcome>,
        /// The relay's store epoch ([`RelayInfo::store_epoch`]; 0 from a contact's
        /// direct hand-over, which has none).
        epoch: u64,
    },
    /// Answer to `Fetch`/`Subscribe`.
    Batch {
        /// Envelopes in cursor order.
        items: Vec<StoredEnvelope>,
        /// The cursor to ask after next time.
        next: u64,
        /// True if more were available than returned.
        more: bool,
    },
    /// Answer to `Delete`.
    Deleted {
        /// How many of the ids were present and are now gone.
        count: u32,
    },
    /// Answer to `Info`.
    Info(RelayInfo),
    /// Answer to `Grant` and `Revoke`: the queue now grants this many write keys.
    Granted {
        /// Write capabilities the queue holds after the request.
        grants: u32,
    },
    /// Answer to `GetChunk`.
    Chunk {
        /// The chunk's bytes, as put.
        data: Vec<u8>,
    },
    /// Answer to `HasChunks`: whether each id asked about is held, in order.
    ChunksHeld {
        /// One flag per id.
        held: Vec<bool>,
    },
    /// The request as a whole was refused.
    Error {
        /// Why.
        code: ErrorCode,
        /// A sentence a person can act on.
        message: String,
    },
}

/// Truncates to [`MAX_TEXT_LEN`] bytes on a character boundary.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_TEXT_LEN {
        return s;
    }
    let mut end = MAX_TEXT_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn write_text(w: &mut Writer, s: &str) {
    w.bytes16(clip(s).as_bytes());
}

fn read_text(r: &mut Reader<'_>, field: &'static str) -> Result<String, DecodeError> {
    Ok(r.str16(MAX_TEXT_LEN, field)?.to_owned())
}

fn read_tag(r: &mut Reader<'_>) -> Result<u8, DecodeError> {
    r.u8("message tag")
}

fn write_ids_to(w: &mut Writer, ids: &[WriteId]) {
    w.u16(ids.len() as u16);
    for id in ids {
        w.raw(&id.0);
    }
}

fn chunk_ids_to(w: &mut Writer, ids: &[ChunkId]) {
    w.u16(ids.len() as u16);
    for id in ids {
        w.raw(&id.0);
    }
}

fn read_chunk_ids(r: &mut Reader<'_>) -> Result<Vec<ChunkId>, DecodeError> {
    let n = r.count16(MAX_CHUNK_IDS, 32, "chunk ids")?;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(ChunkId(r.array("chunk id")?));
    }
    Ok(ids)
}

fn read_write_ids(r: &mut Reader<'_>) -> Result<Vec<WriteId>, DecodeError> {
    let n = r.count16(MAX_GRANT_IDS, 32, "write ids")?;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(WriteId(r.array("write id")?));
    }
    Ok(ids)
}

/// The envelopes of a `Put` or `PutGroup`, each with its key.
fn read_put_items(r: &mut Reader<'_>) -> Result<Vec<Addressed>, DecodeError> {
    let n = r.count16(MAX_PUT_BATCH, 32 + ENVELOPE_HEADER_LEN, "put envelopes")?;
    if n == 0 {
        return Err(DecodeError::Invalid {
            field: "put envelopes",
            reason: "a put needs at least one envelope",
        });
    }
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        let write = WriteKey(r.array("write key")?);
        items.push(Addressed {
            write,
            envelope: Envelope::read(r)?,
        });
    }
    Ok(items)
}

impl ClientToRelay {
    /// Encodes the body (without the frame length).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Self::Put { items } => {
                w.u8(1).u16(items.len() as u16);
                for item in items {
                    w.raw(&item.write.0);
                    item.envelope.write(&mut w);
                }
            }
            Self::Fetch { key, after, limit } => {
                w.u8(2).raw(&key.0).u64(*after).u16(*limit);
            }
            Self::Subscribe {
                key,
                after,
                wait_ms,
            } => {
                w.u8(3).raw(&key.0).u64(*after).u32(*wait_ms);
            }
            Self::Delete { key, ids } => {
                w.u8(4).raw(&key.0).u16(ids.len() as u16);
                for id in ids {
                    w.raw(&id.0);
                }
            }
            Self::Info => {
                w.u8(5);
            }
            Self::Grant {
                key,
                kind,
                token,
                write_ids,
            } => {
                w.u8(6).raw(&key.0).u8(kind.to_u8()).bytes8(token);
                write_ids_to(&mut w, write_ids);
            }
            Self::Revoke { key, write_ids } => {
                w.u8(7).raw(&key.0);
                write_ids_to(&mut w, write_ids);
            }
            Self::PutChunk {
                write,
                expires_at,
                id,
                data,
            } => {
                w.u8(8)
                    .raw(&write.0)
                    .u64(*expires_at)
                    .raw(&id.0)
                    .bytes32(data);
            }
            Self::GetChunk { key, id } => {
                w.u8(9).raw(&key.0).raw(&id.0);
            }
            Self::HasChunks { write, ids } => {
                w.u8(10).raw(&write.0);
                chunk_ids_to(&mut w, ids);
            }
            Self::DeleteChunks { key, ids } => {
                w.u8(11).raw(&key.0);
                chunk_ids_to(&mut w, ids);
            }
            Self::OpenGroup { key, token } => {
                w.u8(12).raw(&key.0).bytes8(token);
            }
            Self::PutGroup { items } => {
                w.u8(13).u16(items.len() as u16);
                for item in items {
                    w.raw(&item.write.0);
                    item.envelope.write(&mut w);
                }
            }
            Self::ReadGroup {
                key,
                after,
                limit,
                wait_ms,
            } => {
                w.u8(14).raw(&key.0).u64(*after).u16(*limit).u32(*wait_ms);
            }
            Self::PutGroupChunk {
                key,
                expires_at,
                id,
                data,
            } => {
                w.u8(15)
                    .raw(&key.0)
                    .u64(*expires_at)
                    .raw(&id.0)
                    .bytes32(data);
            }
            Self::GetGroupChunk { key, id } => {
                w.u8(16).raw(&key.0).raw(&id.0);
            }
            Self::HasGroupChunks { key, ids } => {
                w.u8(17).raw(&key.0);
                chunk_ids_to(&mut w, ids);
            }
        }
        w.finish()
    }

    /// Decodes a frame body.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        check_frame_len(bytes.len())?;
        let mut r = Reader::new(bytes);
        let msg = match read_tag(&mut r)? {
            1 => Self::Put {
                items: read_put_items(&mut r)?,
            },
            2 => Self::Fetch {
                key: ReadKey(r.array("read key")?),
                after: r.u64("cursor")?,
                limit: r.u16("limit")?,
            },
            3 => Self::Subscribe {
                key: ReadKey(r.array("read key")?),
                after: r.u64("cursor")?,
                wait_ms: r.u32("wait")?,
            },
            4 => {
                let key = ReadKey(r.array("read key")?);
                let n = r.count16(MAX_DELETE_IDS, 32, "delete ids")?;
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n {
                    ids.push(EnvelopeId(r.array("envelope id")?));
                }
                Self::Delete { key, ids }
            }
            5 => Self::Info,
            6 => {
                let key = ReadKey(r.array("read key")?);
                let kind = r.u8("queue kind")?;
                // Group queues are opened by OpenGroup, never granted.
                let kind = QueueKind::from_u8(kind)
                    .filter(|k| *k != QueueKind::Group)
                    .ok_or(DecodeError::UnknownTag {
                        field: "queue kind",
                        tag: kind.into(),
                    })?;
                let token = r.bytes8(MAX_TOKEN_LEN, "access token")?.to_vec();
                let write_ids = read_write_ids(&mut r)?;
                Self::Grant {
                    key,
                    kind,
                    token,
                    write_ids,
                }
            }
            7 => Self::Revoke {
                key: ReadKey(r.array("read key")?),
                write_ids: read_write_ids(&mut r)?,
            },
            8 => Self::PutChunk {
                write: WriteKey(r.array("write key")?),
                expires_at: r.u64("expiry")?,
                id: ChunkId(r.array("chunk id")?),
                data: r.bytes32(crate::file::MAX_CHUNK, "chunk")?.to_vec(),
            },
            9 => Self::GetChunk {
                key: ReadKey(r.array("read key")?),
                id: ChunkId(r.array("chunk id")?),
            },
            10 => Self::HasChunks {
                write: WriteKey(r.array("write key")?),
                ids: read_chunk_ids(&mut r)?,
            },
            11 => Self::DeleteChunks {
                key: ReadKey(r.array("read key")?),
                ids: read_chunk_ids(&mut r)?,
            },
            12 => Self::OpenGroup {
                key: GroupKey(r.array("group key")?),
                token: r.bytes8(MAX_TOKEN_LEN, "access token")?.to_vec(),
            },
            13 => Self::PutGroup {
                items: read_put_items(&mut r)?,
            },
            14 => Self::ReadGroup {
                key: GroupKey(r.array("group key")?),
                after: r.u64("cursor")?,
                limit: r.u16("limit")?,
                wait_ms: r.u32("wait")?,
            },
            15 => Self::PutGroupChunk {
                key: GroupKey(r.array("group key")?),
                expires_at: r.u64("expiry")?,
                id: ChunkId(r.array("chunk id")?),
                data: r.bytes32(crate::file::MAX_CHUNK, "chunk")?.to_vec(),
            },
            16 => Self::GetGroupChunk {
                key: GroupKey(r.array("group key")?),
                id: ChunkId(r.array("chunk id")?),
            },
            17 => Self::HasGroupChunks {
                key: GroupKey(r.array("group key")?),
                ids: read_chunk_ids(&mut r)?,
            },
            tag => {
                return Err(DecodeError::UnknownTag {
                    field: "request",
                    tag: tag.into(),
                });
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

impl RelayToClient {
    /// A refusal with a message.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            code,
            message: message.into(),
        }
    }

    /// Encodes the body (without the frame length).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Self::Stored { outcomes, epoch } => {
                w.u8(1).u16(outcomes.len() as u16);
                for o in outcomes {
                    match o {
                        PutOutcome::Stored => {
                            w.u8(0);
                        }
                        PutOutcome::Duplicate => {
                            w.u8(1);
                        }
                        PutOutcome::Rejected { code, message } => {
                            w.u8(2).u16(code.to_u16());
                            write_text(&mut w, message);
                        }
                    }
                }
                w.u64(*epoch);
            }
            Self::Batch { items, next, more } => {
                w.u8(2).u16(items.len() as u16);
                for item in items {
                    w.u64(item.cursor);
                    item.envelope.write(&mut w);
                }
                w.u64(*next).bool(*more);
            }
            Self::Deleted { count } => {
                w.u8(3).u32(*count);
            }
            Self::Info(info) => {
                w.u8(4).u16(info.protocol_version);
                for s in [
                    &info.software,
                    &info.name,
                    &info.operator,
                    &info.failure_domain,
                ] {
                    write_text(&mut w, s);
                }
                w.u32(info.max_payload)
                    .u64(info.max_ttl_secs)
                    .u32(info.capability_max_envelopes)
                    .u64(info.capability_max_bytes)
                    .u32(info.puts_per_sec)
                    .u8(info.open_policy)
                    .u32(info.grants_per_queue)
                    .u32(info.request_max_envelopes)
                    .u64(info.request_max_ttl_secs)
                    .u64(info.now_secs)
                    .u64(info.store_epoch);
            }
            Self::Granted { grants } => {
                w.u8(6).u32(*grants);
            }
            Self::Error { code, message } => {
                w.u8(5).u16(code.to_u16());
                write_text(&mut w, message);
            }
            Self::Chunk { data } => {
                w.u8(7).bytes32(data);
            }
            Self::ChunksHeld { held } => {
                // A bitmap, lowest bit first; bits past the count are zero.
                w.u8(8).u16(held.len() as u16);
                let mut bits = vec![0u8; held.len().div_ceil(8)];
                for (i, h) in held.iter().enumerate() {
                    if *h {
                        bits[i / 8] |= 1 << (i % 8);
                    }
                }
                w.raw(&bits);
            }
        }
        w.finish()
    }

    /// Decodes a frame body.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        check_frame_len(bytes.len())?;
        let mut r = Reader::new(bytes);
        let msg = match read_tag(&mut r)? {
            1 => {
                let n = r.count16(MAX_PUT_BATCH, 1, "put outcomes")?;
                let mut outcomes = Vec::with_capacity(n);
                for _ in 0..n {
                    outcomes.push(match r.u8("put outcome")? {
                        0 => PutOutcome::Stored,
                        1 => PutOutcome::Duplicate,
                        2 => PutOutcome::Rejected {
                            code: ErrorCode::from_u16(r.u16("error code")?),
                            message: read_text(&mut r, "error message")?,
                        },
                        tag => {
                            return Err(DecodeError::UnknownTag {
                                field: "put outcome",
                                tag: tag.into(),
                            });
                        }
                    });
                }
                Self::Stored {
                    outcomes,
                    epoch: r.u64("store epoch")?,
                }
            }
            2 => {
                let n = r.count16(MAX_BATCH_ITEMS, 8 + ENVELOPE_HEADER_LEN, "batch items")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let cursor = r.u64("cursor")?;
                    let envelope = Envelope::read(&mut r)?;
                    items.push(StoredEnvelope { cursor, envelope });
                }
                Self::Batch {
                    items,
                    next: r.u64("next cursor")?,
                    more: r.bool("more")?,
                }
            }
            3 => Self::Deleted {
                count: r.u32("deleted count")?,
            },
            4 => Self::Info(RelayInfo {
                protocol_version: r.u16("protocol version")?,
                software: read_text(&mut r, "software")?,
                name: read_text(&mut r, "relay name")?,
                operator: read_text(&mut r, "operator")?,
                failure_domain: read_text(&mut r, "failure domain")?,
                max_payload: r.u32("max payload")?,
                max_ttl_secs: r.u64("max ttl")?,
                capability_max_envelopes: r.u32("capability max envelopes")?,
                capability_max_bytes: r.u64("capability max bytes")?,
                puts_per_sec: r.u32("puts per second")?,
                open_policy: r.u8("open policy")?,
                grants_per_queue: r.u32("grants per queue")?,
                request_max_envelopes: r.u32("request queue max envelopes")?,
                request_max_ttl_secs: r.u64("request queue max ttl")?,
                now_secs: r.u64("relay clock")?,
                store_epoch: r.u64("store epoch")?,
            }),
            6 => Self::Granted {
                grants: r.u32("grants")?,
            },
            5 => Self::Error {
                code: ErrorCode::from_u16(r.u16("error code")?),
                message: read_text(&mut r, "error message")?,
            },
            7 => Self::Chunk {
                data: r.bytes32(crate::file::MAX_CHUNK, "chunk")?.to_vec(),
            },
            8 => {
                let n = usize::from(r.u16("held count")?);
                if n > MAX_CHUNK_IDS {
                    return Err(DecodeError::TooLong {
                        field: "held count",
                        len: n as u64,
                        max: MAX_CHUNK_IDS as u64,
                    });
                }
                let bits = r.take(n.div_ceil(8), "held bitmap")?;
                let held: Vec<bool> = (0..n).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect();
                if n % 8 != 0 && bits[n / 8] >> (n % 8) != 0 {
                    return Err(DecodeError::Invalid {
                        field: "held bitmap",
                        reason: "bits past the count are zero",
                    });
                }
                Self::ChunksHeld { held }
            }
            tag => {
                return Err(DecodeError::UnknownTag {
                    field: "response",
                    tag: tag.into(),
                });
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

fn check_frame_len(len: usize) -> Result<(), DecodeError> {
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::TooLong {
            field: "frame",
            len: len as u64,
            max: MAX_FRAME_LEN as u64,
        });
    }
    Ok(())
}

/// Reads a frame length prefix and checks it against [`MAX_FRAME_LEN`], before any
/// buffer for the body is allocated.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(prefix) as usize;
    check_frame_len(len)?;
    Ok(len)
}

/// A session frame: `u32 len ‖ u32 id ‖ message`, where the length counts the id too.
pub fn session_frame(id: u32, message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + message.len());
    out.extend_from_slice(&((4 + message.len()) as u32).to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Splits a session frame's body (after its length) into the request id and message.
pub fn session_split(body: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    if body.len() < 4 {
        return Err(DecodeError::Truncated {
            field: "request id",
        });
    }
    let (id, message) = body.split_at(4);
    Ok((u32::from_be_bytes(id.try_into().expect("4 bytes")), message))
}

/// Prefixes a body with its u32 length.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut w = Writer::with_capacity(4 + body.len());
    w.bytes32(body);
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn session_frames_carry_their_request_id() {
        let message = ClientToRelay::Info.encode();
        let framed = session_frame(0xdead_beef, &message);
        let len = frame_len(framed[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, framed.len() - 4);
        let (id, rest) = session_split(&framed[4..]).unwrap();
        assert_eq!(id, 0xdead_beef);
        assert_eq!(ClientToRelay::decode(rest).unwrap(), ClientToRelay::Info);
        assert!(matches!(
            session_split(&[1, 2, 3]),
            Err(DecodeError::Truncated { .. })
        ));
    }

    fn arb_envelope() -> impl Strategy<Value = Envelope> {
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64)).prop_map(
            |(expires_at, payload)| Envelope {
                expires_at,
                payload,
            },
        )
    }

    fn arb_addressed() -> impl Strategy<Value = Addressed> {
        (any::<[u8; 32]>(), arb_envelope()).prop_map(|(w, envelope)| Addressed {
            write: WriteKey(w),
            envelope,
        })
    }

    fn arb_ids() -> impl Strategy<Value = Vec<WriteId>> {
        proptest::collection::vec(any::<[u8; 32]>(), 0..20)
            .prop_map(|ids| ids.into_iter().map(WriteId).collect())
    }

    fn arb_code() -> impl Strategy<Value = ErrorCode> {
        any::<u16>().prop_map(ErrorCode::from_u16)
    }

    fn arb_request() -> impl Strategy<Value = ClientToRelay> {
        prop_oneof![
            proptest::collection::vec(arb_addressed(), 1..MAX_PUT_BATCH)
                .prop_map(|items| ClientToRelay::Put { items }),
            (any::<[u8; 32]>(), any::<u64>(), any::<u16>()).prop_map(|(m, after, limit)| {
                ClientToRelay::Fetch {
                    key: ReadKey(m),
                    after,
                    limit,
                }
            }),
            (any::<[u8; 32]>(), any::<u64>(), any::<u32>()).prop_map(|(m, after, wait_ms)| {
                ClientToRelay::Subscribe {
                    key: ReadKey(m),
                    after,
                    wait_ms,
                }
            }),
            (
                any::<[u8; 32]>(),
                proptest::collection::vec(any::<[u8; 32]>(), 0..40)
            )
                .prop_map(|(m, ids)| ClientToRelay::Delete {
                    key: ReadKey(m),
                    ids: ids.into_iter().map(EnvelopeId).collect(),
                }),
            Just(ClientToRelay::Info),
            (
                any::<[u8; 32]>(),
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..MAX_TOKEN_LEN),
                arb_ids()
            )
                .prop_map(|(m, requests, token, write_ids)| ClientToRelay::Grant {
                    key: ReadKey(m),
                    kind: if requests {
                        QueueKind::Requests
                    } else {
                        QueueKind::Inbox
                    },
                    token,
                    write_ids,
                }),
            (any::<[u8; 32]>(), arb_ids()).prop_map(|(m, write_ids)| ClientToRelay::Revoke {
                key: ReadKey(m),
                write_ids
            }),
            (
                any::<[u8; 32]>(),
                proptest::collection::vec(any::<u8>(), 0..MAX_TOKEN_LEN)
            )
                .prop_map(|(k, token)| ClientToRelay::OpenGroup {
                    key: GroupKey(k),
                    token
                }),
            proptest::collection::vec(arb_addressed(), 1..MAX_PUT_BATCH)
                .prop_map(|items| ClientToRelay::PutGroup { items }),
            (any::<[u8; 32]>(), any::<u64>(), any::<u16>(), any::<u32>()).prop_map(
                |(k, after, limit, wait_ms)| ClientToRelay::ReadGroup {
                    key: GroupKey(k),
                    after,
                    limit,
                    wait_ms,
                }
            ),
            (
                any::<[u8; 32]>(),
                any::<u64>(),
                any::<[u8; 32]>(),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(k, expires_at, id, data)| ClientToRelay::PutGroupChunk {
                    key: GroupKey(k),
                    expires_at,
                    id: ChunkId(id),
                    data
                }),
            (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(k, id)| {
                ClientToRelay::GetGroupChunk {
                    key: GroupKey(k),
                    id: ChunkId(id),
                }
            }),
            (
                any::<[u8; 32]>(),
                proptest::collection::vec(any::<[u8; 32]>(), 0..8)
            )
                .prop_map(|(k, ids)| ClientToRelay::HasGroupChunks {
                    key: GroupKey(k),
                    ids: ids.into_iter().map(ChunkId).collect()
                }),
            (
                any::<[u8; 32]>(),
                any::<u64>(),
                any::<[u8; 32]>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(w, expires_at, id, data)| ClientToRelay::PutChunk {
                    write: WriteKey(w),
                    expires_at,
                    id: ChunkId(id),
                    data
                }),
            (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(k, id)| ClientToRelay::GetChunk {
                key: ReadKey(k),
                id: ChunkId(id)
            }),
            (
                any::<[u8; 32]>(),
                proptest::collection::vec(any::<[u8; 32]>(), 0..20)
            )
                .prop_map(|(w, ids)| ClientToRelay::HasChunks {
                    write: WriteKey(w),
                    ids: ids.into_iter().map(ChunkId).collect()
                }),
            (
                any::<[u8; 32]>(),
                proptest::collection::vec(any::<[u8; 32]>(), 0..20)
            )
                .prop_map(|(k, ids)| ClientToRelay::DeleteChunks {
                    key: ReadKey(k),
                    ids: ids.into_iter().map(ChunkId).collect()
                }),
        ]
    }

    fn arb_response() -> impl Strategy<Value = RelayToClient> {
        let outcome = prop_oneof![
            Just(PutOutcome::Stored),
            Just(PutOutcome::Duplicate),
            (arb_code(), ".{0,40}")
                .prop_map(|(code, message)| PutOutcome::Rejected { code, message }),
        ];
        prop_oneof![
            proptest::collection::vec(outcome, 0..MAX_PUT_BATCH)
                .prop_map(|outcomes| RelayToClient::Stored { outcomes, epoch: 7 }),
            (
                proptest::collection::vec((any::<u64>(), arb_envelope()), 0..10),
                any::<u64>(),
                any::<bool>()
            )
                .prop_map(|(items, next, more)| RelayToClient::Batch {
                    items: items
                        .into_iter()
                        .map(|(cursor, envelope)| StoredEnvelope { cursor, envelope })
                        .collect(),
                    next,
                    more
                }),
            any::<u32>().prop_map(|count| RelayToClient::Deleted { count }),
            (".{0,30}", ".{0,30}", any::<u32>(), any::<u64>()).prop_map(|(name, fd, n, m)| {
                RelayToClient::Info(RelayInfo {
                    protocol_version: PROTOCOL_VERSION,
                    software: "kkachi-relay/0.1.0".into(),
                    name,
                    operator: "ops@example.org".into(),
                    failure_domain: fd,
                    max_payload: n,
                    max_ttl_secs: m,
                    capability_max_envelopes: n,
                    capability_max_bytes: m,
                    puts_per_sec: n,
                    open_policy: 1,
                    grants_per_queue: n,
                    request_max_envelopes: n,
                    request_max_ttl_secs: m,
                    now_secs: m,
                    store_epoch: m,
                })
            }),
            any::<u32>().prop_map(|grants| RelayToClient::Granted { grants }),
            proptest::collection::vec(any::<u8>(), 0..300)
                .prop_map(|data| RelayToClient::Chunk { data }),
            proptest::collection::vec(any::<bool>(), 0..40)
                .prop_map(|held| RelayToClient::ChunksHeld { held }),
            (arb_code(), ".{0,60}")
                .prop_map(|(code, message)| RelayToClient::Error { code, message }),
        ]
    }

    proptest! {
        #[test]
        fn request_round_trip(msg in arb_request()) {
            prop_assert_eq!(ClientToRelay::decode(&msg.encode()).unwrap(), msg);
        }

        #[test]
        fn response_round_trip(msg in arb_response()) {
            prop_assert_eq!(RelayToClient::decode(&msg.encode()).unwrap(), msg);
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ClientToRelay::decode(&bytes);
            let _ = RelayToClient::decode(&bytes);
        }
    }

    #[test]
    fn error_codes_round_trip_including_unknown() {
        for n in 0..20u16 {
            assert_eq!(ErrorCode::from_u16(n).to_u16(), n);
        }
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Other(999));
    }

    #[test]
    fn frame_length_is_bounded_before_reading() {
        assert!(frame_len((1u32 << 30).to_be_bytes()).is_err());
        assert!(frame_len(u32::MAX.to_be_bytes()).is_err());
        assert_eq!(frame_len(100u32.to_be_bytes()).unwrap(), 100);
        let f = frame(b"abc");
        assert_eq!(&f[..4], &3u32.to_be_bytes());
    }

    #[test]
    fn empty_and_oversized_puts_are_refused() {
        let empty = ClientToRelay::Put { items: vec![] }.encode();
        assert!(matches!(
            ClientToRelay::decode(&empty),
            Err(DecodeError::Invalid { .. })
        ));
        // A count of 33 envelopes, over the batch limit.
        let mut big = vec![1u8];
        big.extend_from_slice(&33u16.to_be_bytes());
        big.extend(std::iter::repeat_n(0u8, 33 * (32 + ENVELOPE_HEADER_LEN)));
        assert!(matches!(
            ClientToRelay::decode(&big),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn long_error_messages_are_clipped_on_char_boundary() {
        let msg = "가".repeat(400); // 1200 bytes
        let encoded = RelayToClient::error(ErrorCode::Internal, msg).encode();
        let RelayToClient::Error { message, .. } = RelayToClient::decode(&encoded).unwrap() else {
            panic!("not an error");
        };
        assert!(message.len() <= MAX_TEXT_LEN);
        assert!(message.chars().all(|c| c == '가'));
    }

    #[test]
    fn known_answer_fetch() {
        let msg = ClientToRelay::Fetch {
            key: ReadKey([0x11; 32]),
            after: 5,
            limit: 10,
        };
        assert_eq!(
            hex::encode(msg.encode()),
            "021111111111111111111111111111111111111111111111111111111111111111000000000000000500 0a"
                .replace(' ', "")
        );
    }

    #[test]
    fn known_answer_put_and_grant() {
        let put = ClientToRelay::Put {
            items: vec![Addressed {
                write: WriteKey([0x22; 32]),
                envelope: Envelope {
                    expires_at: 7,
                    payload: vec![0xAB],
                },
            }],
        };
        assert_eq!(
            hex::encode(put.encode()),
            concat!(
                "01",
                "0001",
                "2222222222222222222222222222222222222222222222222222222222222222",
                "02",
                "0000000000000007",
                "00000001",
                "ab"
            )
        );
        let grant = ClientToRelay::Grant {
            key: ReadKey([0x11; 32]),
            kind: QueueKind::Requests,
            token: b"t".to_vec(),
            write_ids: vec![WriteId([0x33; 32])],
        };
        assert_eq!(
            hex::encode(grant.encode()),
            concat!(
                "06",
                "1111111111111111111111111111111111111111111111111111111111111111",
                "02",
                "0174",
                "0001",
                "3333333333333333333333333333333333333333333333333333333333333333"
            )
        );
    }

    #[test]
    fn known_answer_chunks() {
        let put = ClientToRelay::PutChunk {
            write: WriteKey([0x22; 32]),
            expires_at: 7,
            id: ChunkId([0x44; 32]),
            data: vec![0xAB, 0xCD],
        };
        assert_eq!(
            hex::encode(put.encode()),
            concat!(
                "08",
                "2222222222222222222222222222222222222222222222222222222222222222",
                "0000000000000007",
                "4444444444444444444444444444444444444444444444444444444444444444",
                "00000002",
                "abcd"
            )
        );
        // Held: a bitmap, lowest bit first.
        let held = RelayToClient::ChunksHeld {
            held: vec![true, false, true, true, false, false, false, false, true],
        };
        assert_eq!(hex::encode(held.encode()), "0800090d01");
        // Bits past the count must be zero, and the count is bounded.
        assert!(RelayToClient::decode(&hex::decode("0800090d03").unwrap()).is_err());
        assert!(RelayToClient::decode(&hex::decode("0804010000").unwrap()).is_err());
        assert_eq!(ErrorCode::from_u16(13), ErrorCode::NotFound);
    }

    #[test]
    fn known_answer_group_queues() {
        let open = ClientToRelay::OpenGroup {
            key: GroupKey([0x55; 32]),
            token: b"t".to_vec(),
        };
        assert_eq!(
            hex::encode(open.encode()),
            concat!(
                "0c",
                "5555555555555555555555555555555555555555555555555555555555555555",
                "0174"
            )
        );
        let put = ClientToRelay::PutGroup {
            items: vec![Addressed {
                write: WriteKey([0x55; 32]),
                envelope: Envelope {
                    expires_at: 7,
                    payload: vec![0xAB],
                },
            }],
        };
        assert_eq!(
            hex::encode(put.encode()),
            concat!(
                "0d",
                "0001",
                "5555555555555555555555555555555555555555555555555555555555555555",
                "02",
                "0000000000000007",
                "00000001",
                "ab"
            )
        );
        let read = ClientToRelay::ReadGroup {
            key: GroupKey([0x55; 32]),
            after: 5,
            limit: 10,
            wait_ms: 25_000,
        };
        assert_eq!(
            hex::encode(read.encode()),
            concat!(
                "0e",
                "5555555555555555555555555555555555555555555555555555555555555555",
                "0000000000000005",
                "000a",
                "000061a8"
            )
        );
        // A grant never opens a group queue: kind 3 is no grant's.
        let mut grant = ClientToRelay::Grant {
            key: ReadKey([0x11; 32]),
            kind: QueueKind::Inbox,
            token: Vec::new(),
            write_ids: vec![],
        }
        .encode();
        grant[33] = 3;
        assert!(ClientToRelay::decode(&grant).is_err());
        // Files in group queues: the chunk requests' layouts, with a group key.
        let put = ClientToRelay::PutGroupChunk {
            key: GroupKey([0x55; 32]),
            expires_at: 9,
            id: ChunkId([0x44; 32]),
            data: vec![0xCD, 0xEF],
        };
        assert_eq!(
            hex::encode(put.encode()),
            concat!(
                "0f",
                "5555555555555555555555555555555555555555555555555555555555555555",
                "0000000000000009",
                "4444444444444444444444444444444444444444444444444444444444444444",
                "00000002",
                "cdef"
            )
        );
        let get = ClientToRelay::GetGroupChunk {
            key: GroupKey([0x55; 32]),
            id: ChunkId([0x44; 32]),
        };
        assert_eq!(
            hex::encode(get.encode()),
            concat!(
                "10",
                "5555555555555555555555555555555555555555555555555555555555555555",
                "4444444444444444444444444444444444444444444444444444444444444444"
            )
        );
        let has = ClientToRelay::HasGroupChunks {
            key: GroupKey([0x55; 32]),
            ids: vec![ChunkId([0x44; 32])],
        };
        assert_eq!(
            hex::encode(has.encode()),
            concat!(
                "11",
                "5555555555555555555555555555555555555555555555555555555555555555",
                "0001",
                "4444444444444444444444444444444444444444444444444444444444444444"
            )
        );
        for request in [put, get, has] {
            assert_eq!(ClientToRelay::decode(&request.encode()).unwrap(), request);
        }
        // Group queue ids are their own name space.
        assert_ne!(
            GroupKey([0x55; 32]).queue(),
            ReadKey([0x55; 32]).queue(),
            "a group key read as a read key names another queue"
        );
    }
}
