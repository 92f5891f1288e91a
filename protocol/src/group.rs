//! Group membership as a signed, mergeable log (SPEC §14).
//!
//! A group is the set of operations its members signed: create, add, remove (and leave),
//! role change, rename and mode change. Each carries its author's sequence number and a
//! hybrid logical clock. [`Roster::merge`] replays a set of operations in one total order
//! (clock, then the more restrictive kind last, then author, then hash) and applies an
//! operation only if its author holds the right to it at that point of the replay, so
//! every member that holds the same operations computes the same roster, whatever order
//! they arrived in and however often. Ties go to the more restrictive outcome: at equal
//! clocks a removal is applied after an add and a demotion after a promotion.
//!
//! A removal or demotion names how many of its target's operations the acting admin had
//! seen (`cut`). Once it takes effect, every operation of the target numbered after the
//! cut and dated before the removal is void: an admin cannot undo their removal by
//! dating new operations into the past, and what they did concurrently with it does not
//! count.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use multiaddr::{Multiaddr, Protocol};

use crate::card::{MAX_ADDR_LEN, NameError, check_name};
use crate::codec::{DecodeError, Reader, Writer, hash};
use crate::identity::{Identity, IdentityError, PublicIdentity, verify_raw};

/// Version byte of a signed group operation.
pub const GROUP_OP_VERSION: u8 = 1;
/// Label of the signature over an operation.
pub const GROUP_OP_LABEL: &str = "kkachi/group-op/v1";
/// Most members a group may hold.
pub const MAX_MEMBERS: usize = 1000;
/// Most members of a group whose messages are sealed to each member over pairwise
/// sessions (the small tier).
pub const SMALL_GROUP_MAX: usize = 32;
/// Most operations a client keeps for one group; further ones are refused.
pub const MAX_LOG_OPS: usize = 4096;
/// Most operations of one author a client keeps for one group.
pub const MAX_OPS_PER_AUTHOR: usize = 512;
/// Most rounds of finding which removals stand (SPEC §14.2).
pub const MAX_VOID_ROUNDS: usize = 64;
/// Longest encoded operation.
pub const MAX_OP_LEN: usize = 1 + 32 + 32 + 8 + 8 + 4 + 1 + 2 + MAX_OP_BODY_LEN + 64;
const MAX_OP_BODY_LEN: usize = 800;

const KIND_CREATE: u8 = 1;
const KIND_ADD: u8 = 2;
const KIND_REMOVE: u8 = 3;
const KIND_ROLE: u8 = 4;
const KIND_RENAME: u8 = 5;
const KIND_MODE: u8 = 6;
const KIND_TIMER: u8 = 7;
const KIND_RELAYS: u8 = 8;
/// Most group relays a group names (SPEC §14.5).
pub const MAX_GROUP_RELAYS: usize = 8;

pub mod large;

/// A group's id: `H("kkachi/group-id/v1", its create operation)`, so it commits to the
/// creator and nobody can write another creation for it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub [u8; 32]);

impl GroupId {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`GroupId::to_hex`] output.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }
}

impl std::fmt::Debug for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GroupId({})", self.to_hex())
    }
}

/// A hybrid logical clock reading: wall milliseconds, then a counter that orders
/// readings within one millisecond (or while the wall clock lags one seen from a peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch, as the clock's owner last saw them.
    pub ms: u64,
    /// Orders readings with the same `ms`.
    pub count: u32,
}

impl Hlc {
    /// The next reading after `self` at wall time `now_ms`: later than every reading
    /// seen so far, and on the wall clock when that is ahead.
    pub fn tick(self, now_ms: u64) -> Hlc {
        if now_ms > self.ms {
            Hlc {
                ms: now_ms,
                count: 0,
            }
        } else {
            Hlc {
                ms: self.ms,
                count: self.count.saturating_add(1),
            }
        }
    }

    /// Takes in a reading seen from a peer, so the next tick is after it. A reading more
    /// than `max_ahead_ms` ahead of `now_ms` is taken as `now_ms + max_ahead_ms`: a peer
    /// with a clock far ahead cannot drag everyone's clocks along.
    pub fn observe(self, seen: Hlc, now_ms: u64, max_ahead_ms: u64) -> Hlc {
        let limit = Hlc {
            ms: now_ms.saturating_add(max_ahead_ms),
            count: 0,
        };
        self.max(seen.min(limit))
    }
}

/// A member's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Reads and (unless the group is an announcement channel) posts.
    Member,
    /// Also adds and removes members, changes roles, the name and the mode.
    Admin,
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Member => 1,
            Role::Admin => 2,
        }
    }

    fn from_code(code: u8) -> Result<Self, DecodeError> {
        match code {
            1 => Ok(Role::Member),
            2 => Ok(Role::Admin),
            tag => Err(DecodeError::UnknownTag {
                field: "group role",
                tag: tag.into(),
            }),
        }
    }
}

/// Who may post.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// Every member posts.
    #[default]
    Chat,
    /// Only admins post; members acknowledge (an announcement channel).
    Announcement,
}

impl Mode {
    fn code(self) -> u8 {
        match self {
            Mode::Chat => 0,
            Mode::Announcement => 1,
        }
    }

    fn from_code(code: u8) -> Result<Self, DecodeError> {
        match code {
            0 => Ok(Mode::Chat),
            1 => Ok(Mode::Announcement),
            tag => Err(DecodeError::UnknownTag {
                field: "group mode",
                tag: tag.into(),
            }),
        }
    }
}

/// What an operation does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Founds the group; its author is its first admin.
    Create {
        /// Random, so one person's groups of the same name differ.
        nonce: [u8; 16],
        /// The group's name.
        name: String,
        /// Who may post.
        mode: Mode,
        /// The author's identity (its Ed25519 key is the author's).
        founder: PublicIdentity,
        /// The author's name in the group.
        founder_name: String,
    },
    /// Adds a member (or changes the name and role of one).
    Add {
        /// Their identity (the key that signs their operations, and their session key).
        member: PublicIdentity,
        /// The name they go by in the group (their own card's name, as the adder had it).
        name: String,
        /// Their role.
        role: Role,
    },
    /// Removes a member; a member removing themselves leaves.
    Remove {
        /// Their Ed25519 identity key.
        member: [u8; 32],
        /// How many of their operations the author had seen.
        cut: u64,
    },
    /// Changes a member's role.
    SetRole {
        /// Their Ed25519 identity key.
        member: [u8; 32],
        /// The new role.
        role: Role,
        /// How many of their operations the author had seen.
        cut: u64,
    },
    /// Renames the group.
    Rename {
        /// The new name.
        name: String,
    },
    /// Changes who may post.
    SetMode {
        /// The new mode.
        mode: Mode,
    },
    /// Sets the group's disappearing-message timer: members' messages from then on are
    /// deleted this long after each member stored them.
    SetTimer {
        /// Seconds, at most [`crate::content::MAX_TIMER_SECS`]; 0 is off.
        secs: u32,
    },
    /// Sets the group's relays: where the large tier keeps its group queues (none: the
    /// small tier).
    SetRelays {
        /// Each ending in `/p2p/<relay peer id>`.
        relays: Vec<Multiaddr>,
    },
}

impl Op {
    fn kind(&self) -> u8 {
        match self {
            Op::Create { .. } => KIND_CREATE,
            Op::Add { .. } => KIND_ADD,
            Op::Remove { .. } => KIND_REMOVE,
            Op::SetRole { .. } => KIND_ROLE,
            Op::Rename { .. } => KIND_RENAME,
            Op::SetMode { .. } => KIND_MODE,
            Op::SetTimer { .. } => KIND_TIMER,
            Op::SetRelays { .. } => KIND_RELAYS,
        }
    }

    /// Place among operations with the same clock: the more restrictive later, so it
    /// is the one that stands.
    fn rank(&self) -> u8 {
        match self {
            Op::Create { .. } => 0,
            Op::Add {
                role: Role::Admin, ..
            } => 1,
            Op::Add {
                role: Role::Member, ..
            } => 2,
            Op::SetRole {
                role: Role::Admin, ..
            } => 3,
            Op::SetRole {
                role: Role::Member, ..
            } => 4,
            Op::Rename { .. } | Op::SetTimer { .. } | Op::SetRelays { .. } => 5,
            Op::SetMode { mode: Mode::Chat } => 6,
            Op::SetMode {
                mode: Mode::Announcement,
            } => 7,
            Op::Remove { .. } => 8,
        }
    }

    fn write_body(&self, w: &mut Writer) {
        match self {
            Op::Create {
                nonce,
                name,
                mode,
                founder,
                founder_name,
            } => {
                w.raw(nonce).bytes8(name.as_bytes()).u8(mode.code());
                founder.write(w);
                w.bytes8(founder_name.as_bytes());
            }
            Op::Add { member, name, role } => {
                member.write(w);
                w.bytes8(name.as_bytes()).u8(role.code());
            }
            Op::Remove { member, cut } => {
                w.raw(member).u64(*cut);
            }
            Op::SetRole { member, role, cut } => {
                w.raw(member).u8(role.code()).u64(*cut);
            }
            Op::Rename { name } => {
                w.bytes8(name.as_bytes());
            }
            Op::SetMode { mode } => {
                w.u8(mode.code());
            }
            Op::SetTimer { secs } => {
                w.u32(*secs);
            }
            Op::SetRelays { relays } => {
                w.u8(relays.len() as u8);
                for addr in relays {
                    w.bytes16(&addr.to_vec());
                }
            }
        }
    }

    fn read_body(kind: u8, r: &mut Reader<'_>) -> Result<Op, GroupError> {
        let name = |r: &mut Reader<'_>| -> Result<String, GroupError> {
            let name = r.str8(255, "group name")?;
            check_name(name)?;
            Ok(name.to_owned())
        };
        Ok(match kind {
            KIND_CREATE => Op::Create {
                nonce: r.array("group nonce")?,
                name: name(r)?,
                mode: Mode::from_code(r.u8("group mode")?)?,
                founder: PublicIdentity::read(r)?,
                founder_name: name(r)?,
            },
            KIND_ADD => Op::Add {
                member: PublicIdentity::read(r)?,
                name: name(r)?,
                role: Role::from_code(r.u8("group role")?)?,
            },
            KIND_REMOVE => Op::Remove {
                member: r.array("group member")?,
                cut: r.u64("group cut")?,
            },
            KIND_ROLE => Op::SetRole {
                member: r.array("group member")?,
                role: Role::from_code(r.u8("group role")?)?,
                cut: r.u64("group cut")?,
            },
            KIND_RENAME => Op::Rename { name: name(r)? },
            KIND_MODE => Op::SetMode {
                mode: Mode::from_code(r.u8("group mode")?)?,
            },
            KIND_TIMER => {
                let secs = r.u32("group timer")?;
                if secs > crate::content::MAX_TIMER_SECS {
                    return Err(DecodeError::Invalid {
                        field: "group timer",
                        reason: "longer than a year",
                    }
                    .into());
                }
                Op::SetTimer { secs }
            }
            KIND_RELAYS => {
                let n = usize::from(r.u8("group relay count")?);
                if n > MAX_GROUP_RELAYS {
                    return Err(DecodeError::TooLong {
                        field: "group relays",
                        len: n as u64,
                        max: MAX_GROUP_RELAYS as u64,
                    }
                    .into());
                }
                let mut relays = Vec::with_capacity(n);
                for _ in 0..n {
                    let raw = r.bytes16(MAX_ADDR_LEN, "group relay")?;
                    relays.push(Multiaddr::try_from(raw.to_vec()).map_err(|_| {
                        DecodeError::Invalid {
                            field: "group relay",
                            reason: "not a multiaddr",
                        }
                    })?);
                }
                check_group_relays(&relays)?;
                Op::SetRelays { relays }
            }
            tag => {
                return Err(DecodeError::UnknownTag {
                    field: "group operation",
                    tag: tag.into(),
                }
                .into());
            }
        })
    }
}

/// Why an operation or a roster was refused.
#[derive(Debug, Error)]
pub enum GroupError {
    /// The bytes are malformed.
    #[error("malformed group operation: {0}")]
    Decode(#[from] DecodeError),
    /// A name breaks the display-name rules.
    #[error("bad group or member name: {0}")]
    Name(#[from] NameError),
    /// A member identity does not verify.
    #[error("bad member identity: {0}")]
    Identity(#[from] IdentityError),
    /// The signature does not verify.
    #[error("the group operation's signature does not verify")]
    BadSignature,
    /// An operation names another group.
    #[error("the operation belongs to another group")]
    WrongGroup,
    /// The operations hold no creation of the group.
    #[error("the group's creation is missing")]
    NoCreate,
    /// The author of a post is not one the reader takes posts from.
    #[error("the post's author is not a member")]
    NotMember,
    /// A key cannot be used (of low order: anyone could compute what it agrees).
    #[error("unusable key: {0}")]
    Key(&'static str),
    /// The group relays break a rule of [`check_group_relays`].
    #[error("bad group relays: {0}")]
    Relays(&'static str),
    /// More operations than [`MAX_LOG_OPS`].
    #[error("the group has too many operations ({0} > {MAX_LOG_OPS})")]
    TooManyOps(usize),
}

/// Checks a group's relays as an operation setting them must hold them: at most
/// [`MAX_GROUP_RELAYS`], each ending in `/p2p/<peer id>`, no relay twice, and all of them
/// within an operation's body.
pub fn check_group_relays(relays: &[Multiaddr]) -> Result<(), GroupError> {
    if relays.len() > MAX_GROUP_RELAYS {
        return Err(GroupError::Relays("a group has at most 8 relays"));
    }
    let mut peers = Vec::with_capacity(relays.len());
    let mut len = 1;
    for addr in relays {
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            return Err(GroupError::Relays(
                "a relay address must end in /p2p/<relay peer id>",
            ));
        };
        if peers.contains(&peer) {
            return Err(GroupError::Relays("a relay is named twice"));
        }
        peers.push(peer);
        len += 2 + addr.to_vec().len();
    }
    if len > MAX_OP_BODY_LEN {
        return Err(GroupError::Relays(
            "the relays' addresses take more than 800 bytes together",
        ));
    }
    Ok(())
}

/// An operation with its author, number, clock and signature.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedOp {
    group: GroupId,
    author: [u8; 32],
    seq: u64,
    hlc: Hlc,
    op: Op,
    encoded: Vec<u8>,
    hash: [u8; 32],
}

impl std::fmt::Debug for SignedOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedOp")
            .field("author", &hex8(&self.author))
            .field("seq", &self.seq)
            .field("hlc", &self.hlc)
            .field("op", &self.op)
            .finish()
    }
}

fn hex8(bytes: &[u8]) -> String {
    bytes.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

impl SignedOp {
    /// Founds a group: the creation operation (number 1 of its author), whose hash is
    /// the group's id.
    pub fn create(
        identity: &Identity,
        own_name: &str,
        nonce: [u8; 16],
        name: &str,
        mode: Mode,
        hlc: Hlc,
    ) -> Self {
        Self::sign_raw(
            identity,
            GroupId([0; 32]),
            1,
            hlc,
            Op::Create {
                nonce,
                name: name.to_owned(),
                mode,
                founder: identity.public(),
                founder_name: own_name.to_owned(),
            },
        )
    }

    /// Signs operation number `seq` of `identity` in `group`. `op` must not be a
    /// creation (use [`SignedOp::create`]).
    pub fn sign(identity: &Identity, group: GroupId, seq: u64, hlc: Hlc, op: Op) -> Self {
        assert!(
            !matches!(op, Op::Create { .. }),
            "a creation is made with SignedOp::create"
        );
        Self::sign_raw(identity, group, seq, hlc, op)
    }

    fn sign_raw(identity: &Identity, group: GroupId, seq: u64, hlc: Hlc, op: Op) -> Self {
        let author = *identity.public().ed25519();
        let signed = signed_part(&group, &author, seq, hlc, &op);
        let sig = identity.sign(GROUP_OP_LABEL, &signed);
        let mut encoded = signed;
        encoded.extend_from_slice(&sig);
        Self::decode(&encoded).expect("an operation this implementation signed decodes")
    }

    /// Decodes an operation and verifies its signature and names.
    pub fn decode(bytes: &[u8]) -> Result<Self, GroupError> {
        Self::decode_checked(bytes, true)
    }

    /// Decodes an operation this client verified with [`SignedOp::decode`] before it
    /// kept it (in its own sealed store): everything is checked but the signature, the
    /// costly part, so a group's log is read back quickly.
    pub fn decode_verified(bytes: &[u8]) -> Result<Self, GroupError> {
        Self::decode_checked(bytes, false)
    }

    fn decode_checked(bytes: &[u8], verify: bool) -> Result<Self, GroupError> {
        if bytes.len() > MAX_OP_LEN {
            return Err(DecodeError::TooLong {
                field: "group operation",
                len: bytes.len() as u64,
                max: MAX_OP_LEN as u64,
            }
            .into());
        }
        let mut r = Reader::new(bytes);
        let version = r.u8("group operation version")?;
        if version != GROUP_OP_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "group operation",
                version,
            }
            .into());
        }
        let group = GroupId(r.array("group id")?);
        let author: [u8; 32] = r.array("group author")?;
        let seq = r.u64("group op seq")?;
        let hlc = Hlc {
            ms: r.u64("group op clock")?,
            count: r.u32("group op clock")?,
        };
        let kind = r.u8("group op kind")?;
        let body = r.bytes16(MAX_OP_BODY_LEN, "group op body")?;
        let signed_len = bytes.len() - r.remaining();
        let sig: [u8; 64] = r.array("group op signature")?;
        r.finish()?;
        let mut br = Reader::new(body);
        let op = Op::read_body(kind, &mut br)?;
        br.finish()?;
        if seq == 0 {
            return Err(DecodeError::Invalid {
                field: "group op seq",
                reason: "numbers start at 1",
            }
            .into());
        }
        let is_create = matches!(op, Op::Create { .. });
        if let Op::Create { founder, .. } = &op
            && *founder.ed25519() != author
        {
            return Err(DecodeError::Invalid {
                field: "group founder",
                reason: "not the author",
            }
            .into());
        }
        if is_create != (group.0 == [0; 32]) {
            return Err(DecodeError::Invalid {
                field: "group id",
                reason: "zero in a creation and only there",
            }
            .into());
        }
        if verify && !verify_raw(&author, GROUP_OP_LABEL, &bytes[..signed_len], &sig) {
            return Err(GroupError::BadSignature);
        }
        let group = if is_create {
            GroupId(hash("kkachi/group-id/v1", &[bytes]))
        } else {
            group
        };
        Ok(Self {
            group,
            author,
            seq,
            hlc,
            op,
            encoded: bytes.to_vec(),
            hash: hash("kkachi/group-op/v1", &[bytes]),
        })
    }

    /// The signed encoding.
    pub fn encode(&self) -> &[u8] {
        &self.encoded
    }

    /// The group it belongs to (for a creation, the id it founds).
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The author's Ed25519 identity key.
    pub fn author(&self) -> &[u8; 32] {
        &self.author
    }

    /// The author's number for it (from 1).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Its clock.
    pub fn hlc(&self) -> Hlc {
        self.hlc
    }

    /// What it does.
    pub fn op(&self) -> &Op {
        &self.op
    }

    /// `H("kkachi/group-op/v1", encoding)`: names it in logs and deduplicates copies.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    fn order(&self) -> (Hlc, u8, [u8; 32], [u8; 32]) {
        (self.hlc, self.op.rank(), self.author, self.hash)
    }
}

fn signed_part(group: &GroupId, author: &[u8; 32], seq: u64, hlc: Hlc, op: &Op) -> Vec<u8> {
    let mut body = Writer::with_capacity(256);
    op.write_body(&mut body);
    let body = body.finish();
    let mut w = Writer::with_capacity(1 + 32 + 32 + 8 + 12 + 1 + 2 + body.len() + 64);
    w.u8(GROUP_OP_VERSION)
        .raw(&group.0)
        .raw(author)
        .u64(seq)
        .u64(hlc.ms)
        .u32(hlc.count)
        .u8(op.kind())
        .bytes16(&body);
    w.finish()
}

/// A member as the merged log has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Their identity.
    pub identity: PublicIdentity,
    /// Their name in the group, as the add that stands gave it.
    pub name: String,
    /// Their role.
    pub role: Role,
}

/// A group's state: what every member holding the same operations agrees on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roster {
    /// The group.
    pub id: GroupId,
    /// Its name.
    pub name: String,
    /// Who may post.
    pub mode: Mode,
    /// Its disappearing-message timer, seconds (0: off).
    pub timer_secs: u32,
    /// Its group relays: empty in the small tier (SPEC §14.5).
    pub relays: Vec<Multiaddr>,
    /// Its members, by Ed25519 identity key.
    pub members: BTreeMap<[u8; 32], Member>,
    /// Everyone who was a member once and is not now.
    pub former: BTreeSet<[u8; 32]>,
    /// The clock of the latest operation (so a new one is dated after it).
    pub latest: Hlc,
    /// Operations whose authors did not have the right to them where they fall.
    pub ignored: usize,
    /// Operations voided by a removal or demotion of their author, or off their
    /// author's unbroken chain.
    pub voided: usize,
    /// For each author, how many of their operations count (see [`Roster::seen`]).
    pub heads: BTreeMap<[u8; 32], u64>,
}

impl Roster {
    /// Merges a group's operations (any order, copies allowed) into its state.
    /// Operations of other groups are refused; the creation must be among them.
    pub fn merge<'a>(
        id: GroupId,
        ops: impl IntoIterator<Item = &'a SignedOp>,
    ) -> Result<Roster, GroupError> {
        let mut unique: BTreeMap<[u8; 32], &SignedOp> = BTreeMap::new();
        for op in ops {
            if op.group != id {
                return Err(GroupError::WrongGroup);
            }
            unique.insert(op.hash, op);
            if unique.len() > MAX_LOG_OPS {
                return Err(GroupError::TooManyOps(unique.len()));
            }
        }
        // Each author's operations count as an unbroken chain: numbers 1, 2, 3… with
        // clocks that never go back. From the first gap, repeated number (two operations
        // signed with one number) or clock going back, nothing more of theirs counts: a
        // number is a claim the author cannot take back, so a cut (which names numbers)
        // cannot be sidestepped by reusing one, withholding one, or jumping ahead.
        // The creation is its founder's number 1 whatever else they signed: the group's
        // id names it.
        let create = unique
            .values()
            .find(|op| matches!(op.op, Op::Create { .. }))
            .copied()
            .ok_or(GroupError::NoCreate)?;
        let mut by_author: BTreeMap<[u8; 32], Vec<&SignedOp>> = BTreeMap::new();
        for op in unique.values() {
            if op.hash != create.hash {
                by_author.entry(op.author).or_default().push(op);
            }
        }
        by_author.entry(create.author).or_default();
        let mut heads = BTreeMap::new();
        let mut sorted: Vec<&SignedOp> = Vec::with_capacity(unique.len());
        sorted.push(create);
        let mut broken = 0;
        for (author, mut theirs) in by_author {
            theirs.sort_by_key(|op| (op.seq, op.hash));
            let (mut head, mut last) = if author == create.author {
                (1, create.hlc)
            } else {
                (0, Hlc::default())
            };
            for (i, op) in theirs.iter().enumerate() {
                let repeated = theirs.get(i + 1).is_some_and(|next| next.seq == op.seq);
                if op.seq != head + 1 || repeated || op.hlc < last {
                    broken += theirs.len() - i;
                    break;
                }
                head = op.seq;
                last = op.hlc;
                sorted.push(op);
            }
            heads.insert(author, head);
        }
        // The creation opens the replay whatever its clock says: nothing before it counts.
        sorted[1..].sort_by_key(|op| op.order());

        // Which operations removals and demotions void depends on which of those stand,
        // which depends on what is void. Start from every removal or demotion whose author
        // was an admin at some point before it (what a replay that lowers nobody finds),
        // then drop voids whose removal did not stand, until nothing changes (at most
        // MAX_VOID_ROUNDS times). Starting from nothing would let a removed admin, by
        // dating a removal of their remover before their own removal, win the race
        // they lost.
        let everything = vec![false; sorted.len()];
        let (_, possible) = replay(id, &sorted, &everything, true);
        let mut void = voided_by(&sorted, &possible);
        let mut rounds = 0;
        loop {
            let (mut roster, lowerings) = replay(id, &sorted, &void, false);
            let still = voided_by(&sorted, &lowerings);
            let next: Vec<bool> = void.iter().zip(&still).map(|(a, b)| *a && *b).collect();
            rounds += 1;
            if next == void || rounds == MAX_VOID_ROUNDS {
                roster.heads = heads;
                roster.voided += broken;
                return Ok(roster);
            }
            void = next;
        }
    }

    /// How many of `key`'s operations count (the unbroken chain from 1): what a removal
    /// or demotion of them names as its cut.
    pub fn seen(&self, key: &[u8; 32]) -> u64 {
        self.heads.get(key).copied().unwrap_or(0)
    }

    /// The member's role, if they are one.
    pub fn role(&self, key: &[u8; 32]) -> Option<Role> {
        self.members.get(key).map(|m| m.role)
    }

    /// Whether `key` may post: a member, and an admin in an announcement channel.
    pub fn may_post(&self, key: &[u8; 32]) -> bool {
        matches!(
            (self.role(key), self.mode),
            (Some(Role::Admin), _) | (Some(Role::Member), Mode::Chat)
        )
    }

    /// The admins' keys.
    pub fn admins(&self) -> impl Iterator<Item = &[u8; 32]> {
        self.members
            .iter()
            .filter(|(_, m)| m.role == Role::Admin)
            .map(|(k, _)| k)
    }
}

type Order = (Hlc, u8, [u8; 32], [u8; 32]);
type Lowering = ([u8; 32], u64, Order);

/// Marks the operations a set of removals and demotions voids: their target's, numbered
/// after the cut and ordered before the removal. The creation is never void.
fn voided_by(sorted: &[&SignedOp], lowerings: &[Lowering]) -> Vec<bool> {
    let mut by_target: BTreeMap<[u8; 32], Vec<(u64, Order)>> = BTreeMap::new();
    for (target, cut, at) in lowerings {
        by_target.entry(*target).or_default().push((*cut, *at));
    }
    sorted
        .iter()
        .enumerate()
        .map(|(i, op)| {
            i > 0
                && by_target
                    .get(&op.author)
                    .is_some_and(|ls| ls.iter().any(|(cut, at)| op.seq > *cut && op.order() < *at))
        })
        .collect()
}

/// Replays the operations not void in order, returning the roster and the removals and
/// demotions that stood. With `lower_nobody`, removals and demotions are only checked
/// (their author's right to them noted) and not applied.
fn replay(
    id: GroupId,
    sorted: &[&SignedOp],
    void: &[bool],
    lower_nobody: bool,
) -> (Roster, Vec<Lowering>) {
    let mut roster = Roster {
        id,
        name: String::new(),
        mode: Mode::Chat,
        timer_secs: 0,
        relays: Vec::new(),
        members: BTreeMap::new(),
        former: BTreeSet::new(),
        latest: Hlc::default(),
        ignored: 0,
        voided: 0,
        heads: BTreeMap::new(),
    };
    let mut lowerings = Vec::new();
    for (op, &void) in sorted.iter().zip(void) {
        if void {
            roster.voided += 1;
            continue;
        }
        let admin = roster.role(&op.author) == Some(Role::Admin);
        let member = roster.members.contains_key(&op.author);
        let applied_before = roster.ignored;
        match &op.op {
            Op::Create {
                name,
                mode,
                founder,
                founder_name,
                ..
            } => {
                if op.group != id || !roster.name.is_empty() {
                    roster.ignored += 1;
                    continue;
                }
                roster.name.clone_from(name);
                roster.mode = *mode;
                roster.members.insert(
                    op.author,
                    Member {
                        identity: *founder,
                        name: founder_name.clone(),
                        role: Role::Admin,
                    },
                );
            }
            // An add of someone already a member changes their name only: roles change
            // by role changes alone, which carry a cut.
            Op::Add {
                member: identity,
                name,
                role,
            } if admin => {
                let key = *identity.ed25519();
                if let Some(m) = roster.members.get_mut(&key) {
                    m.name.clone_from(name);
                } else if roster.members.len() < MAX_MEMBERS {
                    roster.former.remove(&key);
                    roster.members.insert(
                        key,
                        Member {
                            identity: *identity,
                            name: name.clone(),
                            role: *role,
                        },
                    );
                } else {
                    roster.ignored += 1;
                }
            }
            // Leaving: only a member leaves, and a leave voids nothing.
            Op::Remove { member: target, .. } if *target == op.author && member => {
                if !lower_nobody {
                    roster.members.remove(target);
                    roster.former.insert(*target);
                }
            }
            Op::Remove {
                member: target,
                cut,
            } if admin && *target != op.author => {
                lowerings.push((*target, *cut, op.order()));
                if !lower_nobody && roster.members.remove(target).is_some() {
                    roster.former.insert(*target);
                }
            }
            Op::SetRole {
                member: target,
                role,
                cut,
            } if admin => {
                let lowers = *role == Role::Member && *target != op.author;
                if lowers {
                    lowerings.push((*target, *cut, op.order()));
                }
                if !(lower_nobody && *role == Role::Member)
                    && let Some(m) = roster.members.get_mut(target)
                {
                    m.role = *role;
                }
            }
            Op::Rename { name } if admin => roster.name.clone_from(name),
            Op::SetMode { mode } if admin => roster.mode = *mode,
            Op::SetTimer { secs } if admin => roster.timer_secs = *secs,
            Op::SetRelays { relays } if admin => roster.relays.clone_from(relays),
            _ => roster.ignored += 1,
        }
        if roster.ignored == applied_before {
            roster.latest = roster.latest.max(op.hlc);
        }
    }
    (roster, lowerings)
}

/// A digest of a set of operations: `H("kkachi/group-have/v1", their hashes in order)`,
/// 16 bytes. Members carry theirs in every group record, so two holding different
/// operations notice and send each other theirs.
pub fn have_digest<'a>(ops: impl IntoIterator<Item = &'a SignedOp>) -> [u8; 16] {
    let hashes: std::collections::BTreeSet<[u8; 32]> = ops.into_iter().map(|o| o.hash).collect();
    let joined: Vec<u8> = hashes.iter().flatten().copied().collect();
    let full = hash("kkachi/group-have/v1", &[&joined]);
    let mut out = [0; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// What a member shares of a group with another member: the operations, in the
/// encoding of a group-state record (SPEC §14.2): `u16 count ‖ count × (u16 len ‖ op)`.
pub fn encode_ops<'a>(ops: impl IntoIterator<Item = &'a SignedOp>) -> Vec<u8> {
    let ops: Vec<&SignedOp> = ops.into_iter().collect();
    let mut w = Writer::with_capacity(2 + ops.iter().map(|o| 2 + o.encoded.len()).sum::<usize>());
    w.u16(u16::try_from(ops.len()).expect("callers send at most u16::MAX operations"));
    for op in ops {
        w.bytes16(&op.encoded);
    }
    w.finish()
}

/// Decodes [`encode_ops`] output, verifying every operation; at most `max` of them.
pub fn decode_ops(bytes: &[u8], max: usize) -> Result<Vec<SignedOp>, GroupError> {
    let mut r = Reader::new(bytes);
    let n = r.count16(max, 2, "group operations")?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(SignedOp::decode(r.bytes16(MAX_OP_LEN, "group operation")?)?);
    }
    r.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests;
