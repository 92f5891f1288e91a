//! The large tier of groups (SPEC §14.5): one symmetric key per *epoch*, handed to every
//! member in one signed key record with a wrapped copy per member key, and a *group
//! queue* on each of the group's relays, named by the epoch key, that every member
//! reads.
//!
//! ```text
//! epoch_id    = H("kkachi/group-epoch/v1", group_id, epoch_key)
//! queue key   = H("kkachi/group-queue-key/v1", epoch_key, relay peer id)
//! item key    = H("kkachi/group-item/v1", epoch_key)
//! key record  = version(1)=1 ‖ group_id(32) ‖ author identity(128) ‖ number(8)
//!               ‖ hlc_ms(8) ‖ hlc_count(4) ‖ epoch_id(32) ‖ part(1) ‖ parts(1)
//!               ‖ u16 n ‖ n × (tag(8) ‖ wrapped(48)) ‖ signature(64)
//! wrap key_i  = H("kkachi/group-wrap/v1", X25519(s_author, X_i), group_id, epoch_id,
//!                 X_author, X_i)
//! wrapped_i   = ChaCha20-Poly1305(wrap key_i, nonce 0, epoch_key, ad = group_id ‖ epoch_id)
//! tag_i       = X_i[0..8]
//! post        = version(1)=2 ‖ group_id(32) ‖ epoch_id(32) ‖ author(32) ‖ device(8)
//!               ‖ seq(8) ‖ prev(16) ‖ hlc_ms(8) ‖ hlc_count(4) ‖ kind(1) ‖ u32 len
//!               ‖ body ‖ signature(64)
//! device      = the posting device's X25519 key[0..8]: each device of an account
//!               numbers its own posts (its own chain)
//! item        = version(1)=1 ‖ nonce(24)
//!               ‖ XChaCha20-Poly1305(item key, nonce, u32 len ‖ post ‖ zeros,
//!                                    ad = version ‖ epoch_id),
//!               len(item) = the smallest of the sealed packets' size classes that holds it
//! ```
//!
//! Messages are encrypted once for everyone and signed by their author, so any member
//! can put a message again (repair) without being able to forge one; the epoch key
//! commits to its id, so an admin cannot hand different members different keys under
//! one epoch.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, XChaCha20Poly1305, XNonce};
use libp2p_identity::PeerId;
use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroizing;

use super::{GroupError, GroupId, Hlc, SignedOp, decode_ops, encode_ops};
use crate::codec::{DecodeError, Reader, Writer, hash};
use crate::content::{MAX_TEXT_LEN, MAX_TIMER_SECS, MessageId};
use crate::file::FileRef;
use crate::identity::{Identity, PUBLIC_LEN, PublicIdentity, verify_raw};
use crate::queue::GroupKey;
use crate::session::SIZE_CLASSES;

/// Version byte of key records and items.
pub const LARGE_VERSION: u8 = 1;
/// Version byte of posts (2: each names the device that posted it).
pub const POST_VERSION: u8 = 2;
/// Label of a key record's signature.
pub const KEY_RECORD_LABEL: &str = "kkachi/group-key/v1";
/// Label of a post's signature, and of the hash that names a post.
pub const POST_LABEL: &str = "kkachi/group-post/v1";
/// Most wrapped keys in one key record; an epoch for more member keys spreads its
/// wraps over several parts.
pub const MAX_WRAPS: usize = 1024;
/// Most parts of one epoch's key record.
pub const MAX_KEY_PARTS: usize = 8;
/// Most chains (an author's device each) a have-vector names.
pub const MAX_HAVE_AUTHORS: usize = 1024;
/// What names one device of an author in posts and haves: its X25519 key's first bytes.
pub type DeviceTag = [u8; 8];

/// The tag of the device whose X25519 key is `x25519`.
pub fn device_tag(x25519: &[u8; 32]) -> DeviceTag {
    let mut tag = [0; 8];
    tag.copy_from_slice(&x25519[..8]);
    tag
}
/// How many of a group's epochs (the newest its admins made) members keep and read
/// (SPEC §14.5).
pub const EPOCHS_READ: usize = 6;
/// Most operations one post carries.
pub const MAX_POST_OPS: usize = 64;
/// Bytes of an item before its ciphertext: version, nonce.
const ITEM_HEADER_LEN: usize = 1 + 24;
const AEAD_TAG_LEN: usize = 16;
/// Longest post: what fits in the largest item.
pub const MAX_POST_LEN: usize =
    SIZE_CLASSES[SIZE_CLASSES.len() - 1] - ITEM_HEADER_LEN - AEAD_TAG_LEN - 4;
const POST_HEADER_LEN: usize = 1 + 32 + 32 + 32 + 8 + 8 + 16 + 8 + 4 + 1 + 4;
/// Longest body of a post.
pub const MAX_POST_BODY: usize = MAX_POST_LEN - POST_HEADER_LEN - 64;
const WRAP_LEN: usize = 8 + 32 + AEAD_TAG_LEN;
const KEY_HEADER_LEN: usize = 1 + 32 + PUBLIC_LEN + 8 + 8 + 4 + 32 + 1 + 1 + 2;
/// Longest key record.
pub const MAX_KEY_RECORD_LEN: usize = KEY_HEADER_LEN + MAX_WRAPS * WRAP_LEN + 64;

const POST_MESSAGE: u8 = 1;
const POST_FILE: u8 = 2;
const POST_OPS: u8 = 3;
const POST_KEY: u8 = 4;
const POST_HAVE: u8 = 5;

/// One epoch's secret: everything of the epoch derives from it.
#[derive(Clone, PartialEq, Eq)]
pub struct EpochKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EpochKey(..)")
    }
}

/// Names an epoch of a group: it commits to the group and the epoch's key (32 bytes, so
/// finding two keys with one id is out of reach).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EpochId(pub [u8; 32]);

impl EpochKey {
    /// A fresh random key.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(key.as_mut());
        Self(key)
    }

    /// From its bytes (the client's sealed store).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Its bytes, to keep in the client's sealed store.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        self.0.clone()
    }

    /// The epoch this key opens in `group`.
    pub fn id(&self, group: &GroupId) -> EpochId {
        EpochId(hash(
            "kkachi/group-epoch/v1",
            &[&group.0, self.0.as_slice()],
        ))
    }

    /// The key of the epoch's group queue on `relay`: every member opens, reads and
    /// puts with it.
    pub fn queue_key(&self, relay: &PeerId) -> GroupKey {
        GroupKey(hash(
            "kkachi/group-queue-key/v1",
            &[self.0.as_slice(), &relay.to_bytes()],
        ))
    }

    fn item_key(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(hash("kkachi/group-item/v1", &[self.0.as_slice()]))
    }
}

fn wrap_key(
    dh: &[u8; 32],
    group: &GroupId,
    epoch: &EpochId,
    author_x: &[u8; 32],
    member_x: &[u8; 32],
) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(hash(
        "kkachi/group-wrap/v1",
        &[dh, &group.0, &epoch.0, author_x, member_x],
    ))
}

fn wrap_ad(group: &GroupId, epoch: &EpochId) -> [u8; 64] {
    let mut ad = [0; 64];
    ad[..32].copy_from_slice(&group.0);
    ad[32..].copy_from_slice(&epoch.0);
    ad
}

/// The X25519 agreement of our key and `public`; `None` for a key of low order, whose
/// agreement anyone could compute.
fn diffie_hellman(identity: &Identity, public: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
    let secret = x25519_dalek::StaticSecret::from(*identity.x25519_secret());
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*public));
    shared
        .was_contributory()
        .then(|| Zeroizing::new(shared.to_bytes()))
}

/// Whether an X25519 public key can be given a key: not of low order (whose agreement
/// with anyone is public).
pub fn usable_key(x25519: &[u8; 32]) -> bool {
    let probe = x25519_dalek::StaticSecret::from([7u8; 32]);
    probe
        .diffie_hellman(&x25519_dalek::PublicKey::from(*x25519))
        .was_contributory()
}

/// A signed record handing an epoch's key to members: one part of an epoch's wraps.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRecord {
    group: GroupId,
    author: PublicIdentity,
    number: u64,
    hlc: Hlc,
    epoch: EpochId,
    part: u8,
    parts: u8,
    wraps: Vec<([u8; 8], [u8; 48])>,
    encoded: Vec<u8>,
}

impl std::fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRecord")
            .field("number", &self.number)
            .field("epoch", &self.epoch)
            .field("part", &self.part)
            .field("parts", &self.parts)
            .field("wraps", &self.wraps.len())
            .finish()
    }
}

impl KeyRecord {
    /// Wraps `key` for every X25519 key of `members` (the author's own included if
    /// listed), signed by `author`: as many parts as [`MAX_WRAPS`] requires. `number`
    /// is the epoch's number: one more than the epoch it replaces.
    pub fn make(
        author: &Identity,
        group: GroupId,
        number: u64,
        hlc: Hlc,
        key: &EpochKey,
        members: &[[u8; 32]],
    ) -> Result<Vec<KeyRecord>, GroupError> {
        let epoch = key.id(&group);
        let author_x = author.x25519_public();
        let mut sorted = members.to_vec();
        sorted.sort();
        sorted.dedup();
        let chunks: Vec<&[[u8; 32]]> = if sorted.is_empty() {
            vec![&[]]
        } else {
            sorted.chunks(MAX_WRAPS).collect()
        };
        if chunks.len() > MAX_KEY_PARTS {
            return Err(DecodeError::TooLong {
                field: "epoch key wraps",
                len: sorted.len() as u64,
                max: (MAX_WRAPS * MAX_KEY_PARTS) as u64,
            }
            .into());
        }
        let parts = chunks.len() as u8;
        let ad = wrap_ad(&group, &epoch);
        let mut out = Vec::with_capacity(chunks.len());
        for (part, chunk) in chunks.into_iter().enumerate() {
            let mut w = Writer::with_capacity(KEY_HEADER_LEN + chunk.len() * WRAP_LEN + 64);
            w.u8(LARGE_VERSION).raw(&group.0);
            author.public().write(&mut w);
            w.u64(number)
                .u64(hlc.ms)
                .u32(hlc.count)
                .raw(&epoch.0)
                .u8(part as u8)
                .u8(parts)
                .u16(chunk.len() as u16);
            for member in chunk {
                let dh = diffie_hellman(author, member).ok_or(GroupError::Key(
                    "a member's session key is of low order; no key can be wrapped for it",
                ))?;
                let k = wrap_key(&dh, &group, &epoch, &author_x, member);
                let sealed = ChaCha20Poly1305::new(Key::from_slice(k.as_slice()))
                    .encrypt(
                        Nonce::from_slice(&[0; 12]),
                        Payload {
                            msg: key.0.as_slice(),
                            aad: &ad,
                        },
                    )
                    .expect("sealing 32 bytes cannot fail");
                w.raw(&member[..8]).raw(&sealed);
            }
            let mut bytes = w.finish();
            let sig = author.sign(KEY_RECORD_LABEL, &bytes);
            bytes.extend_from_slice(&sig);
            out.push(Self::decode(&bytes)?);
        }
        Ok(out)
    }

    /// Decodes a key record and verifies its author's signature and key binding.
    pub fn decode(bytes: &[u8]) -> Result<Self, GroupError> {
        if bytes.len() > MAX_KEY_RECORD_LEN {
            return Err(DecodeError::TooLong {
                field: "group key record",
                len: bytes.len() as u64,
                max: MAX_KEY_RECORD_LEN as u64,
            }
            .into());
        }
        let mut r = Reader::new(bytes);
        let version = r.u8("group key record version")?;
        if version != LARGE_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "group key record",
                version,
            }
            .into());
        }
        let group = GroupId(r.array("group id")?);
        let author = PublicIdentity::read(&mut r)?;
        let number = r.u64("epoch number")?;
        let hlc = Hlc {
            ms: r.u64("epoch clock")?,
            count: r.u32("epoch clock")?,
        };
        let epoch = EpochId(r.array("epoch id")?);
        let part = r.u8("key record part")?;
        let parts = r.u8("key record parts")?;
        if parts == 0 || usize::from(parts) > MAX_KEY_PARTS || part >= parts {
            return Err(DecodeError::Invalid {
                field: "key record part",
                reason: "not a part of at most 8",
            }
            .into());
        }
        if number == 0 {
            return Err(DecodeError::Invalid {
                field: "epoch number",
                reason: "numbers start at 1",
            }
            .into());
        }
        let n = r.count16(MAX_WRAPS, WRAP_LEN, "epoch key wraps")?;
        let mut wraps = Vec::with_capacity(n);
        for _ in 0..n {
            wraps.push((r.array("wrap tag")?, r.array("wrapped key")?));
        }
        let signed_len = bytes.len() - r.remaining();
        let sig: [u8; 64] = r.array("key record signature")?;
        r.finish()?;
        if !verify_raw(
            author.ed25519(),
            KEY_RECORD_LABEL,
            &bytes[..signed_len],
            &sig,
        ) {
            return Err(GroupError::BadSignature);
        }
        Ok(Self {
            group,
            author,
            number,
            hlc,
            epoch,
            part,
            parts,
            wraps,
            encoded: bytes.to_vec(),
        })
    }

    /// The signed encoding.
    pub fn encode(&self) -> &[u8] {
        &self.encoded
    }

    /// The group.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// Who made it (an admin, if it is to count).
    pub fn author(&self) -> &PublicIdentity {
        &self.author
    }

    /// The epoch's number.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// When it was made.
    pub fn hlc(&self) -> Hlc {
        self.hlc
    }

    /// The epoch it hands out.
    pub fn epoch(&self) -> EpochId {
        self.epoch
    }

    /// Which part of the epoch's wraps, and of how many.
    pub fn part(&self) -> (u8, u8) {
        (self.part, self.parts)
    }

    /// The first 8 bytes of each X25519 key it wraps the epoch key for.
    pub fn tags(&self) -> impl Iterator<Item = &[u8; 8]> {
        self.wraps.iter().map(|(tag, _)| tag)
    }

    /// Whether it holds a wrap for the X25519 key `x25519`, by its tag.
    pub fn names(&self, x25519: &[u8; 32]) -> bool {
        self.wraps.iter().any(|(tag, _)| tag[..] == x25519[..8])
    }

    /// Which epoch wins among concurrent ones: the higher number, then the later clock,
    /// then the higher id. Every member picks the same.
    pub fn rank(&self) -> (u64, Hlc, EpochId) {
        (self.number, self.hlc, self.epoch)
    }

    /// The epoch key, if this record wraps it for `me` (a key that does not hash to
    /// the record's epoch id is refused as no key).
    pub fn unwrap(&self, me: &Identity) -> Option<EpochKey> {
        let own = me.x25519_public();
        let author_x = self.author.x25519();
        let dh = diffie_hellman(me, author_x)?;
        let k = wrap_key(&dh, &self.group, &self.epoch, author_x, &own);
        let ad = wrap_ad(&self.group, &self.epoch);
        let cipher = ChaCha20Poly1305::new(Key::from_slice(k.as_slice()));
        self.wraps
            .iter()
            .filter(|(tag, _)| tag[..] == own[..8])
            .find_map(|(_, sealed)| {
                let plain = Zeroizing::new(
                    cipher
                        .decrypt(
                            Nonce::from_slice(&[0; 12]),
                            Payload {
                                msg: sealed,
                                aad: &ad,
                            },
                        )
                        .ok()?,
                );
                let key = EpochKey::from_bytes(plain.as_slice().try_into().ok()?);
                (key.id(&self.group) == self.epoch).then_some(key)
            })
    }
}

/// Highest message number held of each author, the highest read, and the sender's
/// digest of operations: what members exchange to find and repair what is missing, and
/// to count deliveries and reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Have {
    /// (author, their device, highest number of that device's held with nothing
    /// missing below it, highest of them read: 0 with read receipts off), ascending by
    /// author and device.
    pub heads: Vec<([u8; 32], DeviceTag, u64, u64)>,
    /// The sender's operations digest (SPEC §14.4).
    pub ops: [u8; 16],
}

/// What a post carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostBody {
    /// A text message, with the group's timer as its author held it.
    Message {
        /// Seconds until members delete it (0: kept).
        seconds: u32,
        /// The text.
        text: String,
    },
    /// A file (SPEC §13), with the timer.
    File {
        /// Seconds until members delete it (0: kept).
        seconds: u32,
        /// The file's key, manifest and description.
        file: Box<FileRef>,
    },
    /// Operations of the group's log.
    Ops(Vec<SignedOp>),
    /// An epoch's key record (its author is the post's).
    Key(Box<KeyRecord>),
    /// What the author holds.
    Have(Have),
}

impl PostBody {
    fn kind(&self) -> u8 {
        match self {
            PostBody::Message { .. } => POST_MESSAGE,
            PostBody::File { .. } => POST_FILE,
            PostBody::Ops(_) => POST_OPS,
            PostBody::Key(_) => POST_KEY,
            PostBody::Have(_) => POST_HAVE,
        }
    }

    /// Whether it is numbered in its author's chain (what members show).
    pub fn is_numbered(&self) -> bool {
        matches!(self, PostBody::Message { .. } | PostBody::File { .. })
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(256);
        match self {
            PostBody::Message { seconds, text } => {
                w.u32(*seconds).raw(text.as_bytes());
            }
            PostBody::File { seconds, file } => {
                w.u32(*seconds).raw(&file.encode());
            }
            PostBody::Ops(ops) => {
                w.raw(&encode_ops(ops));
            }
            PostBody::Key(record) => {
                w.raw(record.encode());
            }
            PostBody::Have(have) => {
                w.u16(have.heads.len() as u16);
                for (author, device, seq, read) in &have.heads {
                    w.raw(author).raw(device).u64(*seq).u64(*read);
                }
                w.raw(&have.ops);
            }
        }
        w.finish()
    }

    fn decode(kind: u8, bytes: &[u8]) -> Result<Self, GroupError> {
        let timer = |r: &mut Reader<'_>| -> Result<u32, GroupError> {
            let seconds = r.u32("post timer")?;
            if seconds > MAX_TIMER_SECS {
                return Err(DecodeError::Invalid {
                    field: "post timer",
                    reason: "longer than a year",
                }
                .into());
            }
            Ok(seconds)
        };
        let mut r = Reader::new(bytes);
        Ok(match kind {
            POST_MESSAGE => {
                let seconds = timer(&mut r)?;
                let text = r.rest();
                if text.is_empty() || text.len() > MAX_TEXT_LEN {
                    return Err(DecodeError::Invalid {
                        field: "post text",
                        reason: "empty or longer than 32 KiB",
                    }
                    .into());
                }
                let text = std::str::from_utf8(text)
                    .map_err(|_| DecodeError::InvalidUtf8 { field: "post text" })?;
                PostBody::Message {
                    seconds,
                    text: text.to_owned(),
                }
            }
            POST_FILE => {
                let seconds = timer(&mut r)?;
                let file = FileRef::decode(r.rest()).map_err(|_| DecodeError::Invalid {
                    field: "post file",
                    reason: "not a file reference",
                })?;
                PostBody::File {
                    seconds,
                    file: Box::new(file),
                }
            }
            POST_OPS => {
                let ops = decode_ops(bytes, MAX_POST_OPS)?;
                if ops.is_empty() {
                    return Err(DecodeError::Invalid {
                        field: "post operations",
                        reason: "none",
                    }
                    .into());
                }
                PostBody::Ops(ops)
            }
            POST_KEY => PostBody::Key(Box::new(KeyRecord::decode(bytes)?)),
            POST_HAVE => {
                let n = r.count16(MAX_HAVE_AUTHORS, 56, "have-vector")?;
                let mut heads = Vec::with_capacity(n);
                for _ in 0..n {
                    heads.push((
                        r.array("have author")?,
                        r.array("have device")?,
                        r.u64("have number")?,
                        r.u64("have read")?,
                    ));
                }
                let ops = r.array("have digest")?;
                r.finish()?;
                if heads
                    .windows(2)
                    .any(|w| (w[0].0, w[0].1) >= (w[1].0, w[1].1))
                {
                    return Err(DecodeError::Invalid {
                        field: "have-vector",
                        reason: "chains not in ascending order",
                    }
                    .into());
                }
                PostBody::Have(Have { heads, ops })
            }
            tag => {
                return Err(DecodeError::UnknownTag {
                    field: "post kind",
                    tag: tag.into(),
                }
                .into());
            }
        })
    }
}

/// A member's signed post to a large group.
#[derive(Clone, PartialEq, Eq)]
pub struct Post {
    group: GroupId,
    epoch: EpochId,
    author: [u8; 32],
    device: DeviceTag,
    seq: u64,
    prev: [u8; 16],
    hlc: Hlc,
    body: PostBody,
    encoded: Vec<u8>,
}

impl std::fmt::Debug for Post {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Post")
            .field("seq", &self.seq)
            .field("hlc", &self.hlc)
            .field("body", &self.body)
            .finish()
    }
}

impl Post {
    /// Signs a post for epoch `epoch` of `group` (it is refused in any other), as
    /// `author`'s device. For a numbered body (a message or file) `seq` is that
    /// device's number for it in the group (from 1) and `prev` the id of its post
    /// numbered `seq − 1` (zeros for 1); other bodies carry 0 and zeros.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        author: &Identity,
        group: GroupId,
        epoch: EpochId,
        seq: u64,
        prev: MessageId,
        hlc: Hlc,
        body: PostBody,
    ) -> Result<Self, GroupError> {
        let encoded_body = body.encode();
        let mut w = Writer::with_capacity(POST_HEADER_LEN + encoded_body.len() + 64);
        w.u8(POST_VERSION)
            .raw(&group.0)
            .raw(&epoch.0)
            .raw(author.public().ed25519())
            .raw(&device_tag(&author.x25519_public()))
            .u64(seq)
            .raw(&prev.0)
            .u64(hlc.ms)
            .u32(hlc.count)
            .u8(body.kind())
            .bytes32(&encoded_body);
        let mut bytes = w.finish();
        let sig = author.sign(POST_LABEL, &bytes);
        bytes.extend_from_slice(&sig);
        Self::decode(&bytes)
    }

    /// Decodes a post and verifies its signature and every bound.
    pub fn decode(bytes: &[u8]) -> Result<Self, GroupError> {
        Self::decode_from(bytes, |_| true)
    }

    /// [`Post::decode`], refusing a post whose author `allowed` refuses once its
    /// signature is checked and before its body is decoded (which may verify many
    /// operations): a stranger's posts cost one signature check each.
    pub fn decode_from(
        bytes: &[u8],
        allowed: impl Fn(&[u8; 32]) -> bool,
    ) -> Result<Self, GroupError> {
        if bytes.len() > MAX_POST_LEN {
            return Err(DecodeError::TooLong {
                field: "group post",
                len: bytes.len() as u64,
                max: MAX_POST_LEN as u64,
            }
            .into());
        }
        let mut r = Reader::new(bytes);
        let version = r.u8("group post version")?;
        if version != POST_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "group post",
                version,
            }
            .into());
        }
        let group = GroupId(r.array("group id")?);
        let epoch = EpochId(r.array("post epoch")?);
        let author: [u8; 32] = r.array("post author")?;
        let device: DeviceTag = r.array("post device")?;
        let seq = r.u64("post number")?;
        let prev: [u8; 16] = r.array("post previous")?;
        let hlc = Hlc {
            ms: r.u64("post clock")?,
            count: r.u32("post clock")?,
        };
        let kind = r.u8("post kind")?;
        let body = r.bytes32(MAX_POST_BODY, "post body")?;
        let signed_len = bytes.len() - r.remaining();
        let sig: [u8; 64] = r.array("post signature")?;
        r.finish()?;
        if !verify_raw(&author, POST_LABEL, &bytes[..signed_len], &sig) {
            return Err(GroupError::BadSignature);
        }
        if !allowed(&author) {
            return Err(GroupError::NotMember);
        }
        let body = PostBody::decode(kind, body)?;
        let numbered = body.is_numbered();
        if numbered != (seq > 0) || (seq <= 1 && prev != [0; 16]) {
            return Err(DecodeError::Invalid {
                field: "post number",
                reason: "messages and files are numbered from 1, nothing else is",
            }
            .into());
        }
        match &body {
            PostBody::Key(record)
                if record.author.ed25519() != &author || record.group != group =>
            {
                return Err(GroupError::WrongGroup);
            }
            PostBody::Ops(ops) if ops.iter().any(|op| op.group() != group) => {
                return Err(GroupError::WrongGroup);
            }
            _ => {}
        }
        Ok(Self {
            group,
            epoch,
            author,
            device,
            seq,
            prev,
            hlc,
            body,
            encoded: bytes.to_vec(),
        })
    }

    /// The epoch it was written for.
    pub fn epoch(&self) -> EpochId {
        self.epoch
    }

    /// Names the post: `H("kkachi/group-post/v1", post)[0..16]`, the same for every
    /// copy and every member.
    pub fn id(&self) -> MessageId {
        let full = hash(POST_LABEL, &[&self.encoded]);
        let mut id = [0; 16];
        id.copy_from_slice(&full[..16]);
        MessageId(id)
    }

    /// The signed encoding.
    pub fn encode(&self) -> &[u8] {
        &self.encoded
    }

    /// The group.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The author's Ed25519 identity key.
    pub fn author(&self) -> &[u8; 32] {
        &self.author
    }

    /// The author's device that posted it (whose numbers `seq` counts).
    pub fn device(&self) -> DeviceTag {
        self.device
    }

    /// That device's number for it (0 for what is not numbered).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The id of the author's previous numbered post (zeros for the first).
    pub fn prev(&self) -> MessageId {
        MessageId(self.prev)
    }

    /// Its clock.
    pub fn hlc(&self) -> Hlc {
        self.hlc
    }

    /// What it carries.
    pub fn body(&self) -> &PostBody {
        &self.body
    }

    /// Encrypts the post under `key` (its epoch's) into an item for a group queue,
    /// padded to a size class. Sealed once per relay (a fresh nonce each), so relays
    /// comparing what they hold cannot tell that two items are one post.
    pub fn seal<R: RngCore + CryptoRng>(&self, key: &EpochKey, rng: &mut R) -> Vec<u8> {
        let epoch = key.id(&self.group);
        debug_assert_eq!(epoch, self.epoch, "a post is sealed under its own epoch");
        let total = item_len(self.encoded.len()).expect("a post is at most MAX_POST_LEN");
        let mut plain = Zeroizing::new(Vec::with_capacity(total - ITEM_HEADER_LEN));
        plain.extend_from_slice(&(self.encoded.len() as u32).to_be_bytes());
        plain.extend_from_slice(&self.encoded);
        plain.resize(total - ITEM_HEADER_LEN - AEAD_TAG_LEN, 0);
        let mut nonce = [0u8; 24];
        rng.fill_bytes(&mut nonce);
        let ad = item_ad(&epoch);
        let k = key.item_key();
        let sealed = XChaCha20Poly1305::new(Key::from_slice(k.as_slice()))
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &ad,
                },
            )
            .expect("sealing a bounded item cannot fail");
        let mut out = Vec::with_capacity(total);
        out.push(LARGE_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        debug_assert_eq!(out.len(), total);
        out
    }
}

fn item_ad(epoch: &EpochId) -> [u8; 33] {
    let mut ad = [0u8; 33];
    ad[0] = LARGE_VERSION;
    ad[1..].copy_from_slice(&epoch.0);
    ad
}

/// The smallest size class an item holding a post of `len` bytes takes.
fn item_len(len: usize) -> Option<usize> {
    SIZE_CLASSES
        .into_iter()
        .find(|c| *c >= ITEM_HEADER_LEN + 4 + len + AEAD_TAG_LEN)
}

/// Why an item of a group queue was refused.
#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    /// Not an item of this epoch, or altered.
    #[error("the group item does not open under this epoch's key")]
    Unreadable,
    /// It opens, but what it holds is not a valid post of the group and epoch.
    #[error(transparent)]
    Post(#[from] GroupError),
}

/// Opens an item read from the queue of epoch `key` of `group` and verifies the post
/// inside: its signature, its bounds, its group and epoch, and (before its body is
/// decoded) that `allowed` takes its author. Whether the author may post is the
/// caller's to check against the merged roster.
pub fn open_item(
    group: &GroupId,
    key: &EpochKey,
    item: &[u8],
    allowed: impl Fn(&[u8; 32]) -> bool,
) -> Result<Post, ItemError> {
    let epoch = key.id(group);
    if !SIZE_CLASSES.contains(&item.len()) || item.first() != Some(&LARGE_VERSION) {
        return Err(ItemError::Unreadable);
    }
    let nonce = &item[1..ITEM_HEADER_LEN];
    let k = key.item_key();
    let plain = Zeroizing::new(
        XChaCha20Poly1305::new(Key::from_slice(k.as_slice()))
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: &item[ITEM_HEADER_LEN..],
                    aad: &item_ad(&epoch),
                },
            )
            .map_err(|_| ItemError::Unreadable)?,
    );
    let mut r = Reader::new(&plain);
    let post = r
        .bytes32(MAX_POST_LEN, "group item post")
        .map_err(GroupError::from)?;
    if r.rest().iter().any(|b| *b != 0) || item_len(post.len()) != Some(item.len()) {
        return Err(GroupError::from(DecodeError::Invalid {
            field: "group item padding",
            reason: "not zeros, or more than the smallest size class needs",
        })
        .into());
    }
    let post = Post::decode_from(post, allowed)?;
    if post.group != *group || post.epoch != epoch {
        return Err(GroupError::WrongGroup.into());
    }
    Ok(post)
}

#[cfg(test)]
mod tests;
