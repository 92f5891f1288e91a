//! Encryption at rest: how keys and values look on disk.
//!
//! Every value is sealed with XChaCha20-Poly1305 under the database key, with a random
//! nonce, and bound to its tree and its key on disk (the associated data), so a value
//! moved to another key or tree does not open. The parts of keys that name someone
//! (a contact's peer id, a relay's address, an envelope id a relay also knows) are
//! replaced on disk by a keyed hash: the files show how many records each unnamed
//! contact has, and nothing of who they are. The hidden part of a key travels inside its
//! sealed value, so the rest of the store reads and writes keys as they were; ordering
//! within one contact's records (messages by local order, a hash chain by sequence
//! number) is kept, because only the leading peer id is replaced.
//!
//! A sealed value: `nonce (24) ‖ AEAD(n (u16, big-endian) ‖ key[..n] ‖ value)`, where
//! `key[..n]` is the part of its logical key the key on disk does not show. Keys on
//! disk, by tree: as they are (identity and profile, the outbox's order numbers);
//! `tag(peer) ‖ rest` (messages by local order, hash chains by sequence number,
//! contacts, sessions, conversations, blocked senders); `tag(peer) ‖ tag'(key)` (message
//! ids: the message index, receipts due, held requests); `tag(key)` (relays, envelope
//! ids). Tags are keyed BLAKE2s, 16 bytes, keyed per tree.

use blake2::digest::Mac;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use super::{StoreError, TreeId};

/// Bytes of a key's tag on disk.
pub(super) const TAG_LEN: usize = 16;
/// Bytes of an Ed25519 peer id, the prefix of most keys: what is hidden of a key that
/// does not start with a well-formed one.
const PEER_LEN: usize = 38;
const NONCE_LEN: usize = 24;

/// Which part of a tree's keys is hidden.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Nothing (fixed names, local order numbers).
    Plain,
    /// The leading peer id; the rest (a local order, a sequence number) stays, so a
    /// contact's records keep their order.
    Peer,
    /// The leading peer id, and the rest (a message id, which its sender knows) as a
    /// second tag: a contact's records stay together, in no order.
    PeerThenHidden,
    /// The whole key (a relay's address; an envelope id).
    Whole,
}

fn shape(tree: TreeId) -> Shape {
    match tree {
        TreeId::Meta | TreeId::Outbox => Shape::Plain,
        TreeId::Relays | TreeId::Seen | TreeId::Transfers => Shape::Whole,
        // Sessions, conversations and hash chains: a contact's own, then one per other
        // device of theirs, under its key (hidden: it names the device).
        TreeId::MessageIndex
        | TreeId::ReceiptsDue
        | TreeId::Requests
        | TreeId::GroupIndex
        | TreeId::Sessions
        | TreeId::Conversations
        | TreeId::Chain => Shape::PeerThenHidden,
        TreeId::Contacts
        | TreeId::Messages
        | TreeId::Blocked
        | TreeId::Groups
        | TreeId::GroupMessages
        | TreeId::Devices => Shape::Peer,
    }
}

/// The length of the peer id `key` starts with: a multihash, `code ‖ length ‖ digest`
/// (varints), 38 bytes for an Ed25519 identity; `None` if it does not start with one.
fn peer_len(key: &[u8]) -> Option<usize> {
    fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
        let mut n = 0u64;
        for (i, b) in bytes.iter().take(9).enumerate() {
            n |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some((n, i + 1));
            }
        }
        None
    }
    let (_, a) = varint(key)?;
    let (len, b) = varint(&key[a..])?;
    let total = a.checked_add(b)?.checked_add(usize::try_from(len).ok()?)?;
    (total <= key.len()).then_some(total)
}

/// The peer id a key of `tree` starts with, as far as it is hidden.
fn peer_part(key: &[u8]) -> usize {
    peer_len(key).unwrap_or(key.len().min(PEER_LEN))
}

/// How many leading bytes of `key` in `tree` travel inside its sealed value.
fn hidden(tree: TreeId, key: &[u8]) -> usize {
    match shape(tree) {
        Shape::Plain => 0,
        Shape::Peer => peer_part(key),
        Shape::PeerThenHidden | Shape::Whole => key.len().min(usize::from(u16::MAX)),
    }
}

/// The part of a key on disk that is the logical key's tail (not a tag).
fn visible(tree: TreeId, disk_key: &[u8]) -> Option<&[u8]> {
    match shape(tree) {
        Shape::Plain => Some(disk_key),
        Shape::Peer => disk_key.get(TAG_LEN..),
        Shape::PeerThenHidden | Shape::Whole => Some(&[]),
    }
}

/// The database key's two uses.
struct Keys {
    values: XChaCha20Poly1305,
    tags: Zeroizing<[u8; 32]>,
}

/// Seals and opens the store's records.
pub(super) struct Vault {
    /// `None` only for a store opened in the clear, which exists to measure what
    /// encryption costs (see [`super::keyfile`]).
    keys: Option<Keys>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("sealed", &self.keys.is_some())
            .finish()
    }
}

/// `BLAKE2s-MAC(key, label)`: one of the keys derived from the database key.
fn derive(key: &[u8; 32], label: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut mac =
        <blake2::Blake2sMac256 as Mac>::new_from_slice(key).expect("32-byte keys are valid");
    mac.update(label);
    Zeroizing::new(mac.finalize().into_bytes().into())
}

impl Vault {
    /// Records sealed under `key` (the database key).
    pub(super) fn sealed(key: &[u8; 32]) -> Self {
        let values = derive(key, b"kkachi store values v1");
        Self {
            keys: Some(Keys {
                values: XChaCha20Poly1305::new((&*values).into()),
                tags: derive(key, b"kkachi store key tags v1"),
            }),
        }
    }

    /// Records as they are: only for measuring what sealing costs.
    pub(super) fn clear() -> Self {
        Self { keys: None }
    }

    /// A keyed hash of `bytes`, for one tree (`label`: its number, with the top bit set
    /// for a key's second tag).
    fn tag(keys: &Keys, label: u8, bytes: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = <blake2::Blake2sMac256 as Mac>::new_from_slice(keys.tags.as_ref())
            .expect("32-byte keys");
        mac.update(&[label]);
        mac.update(bytes);
        let full = mac.finalize().into_bytes();
        full[..TAG_LEN].try_into().expect("16 of 32 bytes")
    }

    /// The key on disk for the logical `key` of `tree`.
    pub(super) fn disk_key(&self, tree: TreeId, key: &[u8]) -> Vec<u8> {
        let Some(keys) = &self.keys else {
            return key.to_vec();
        };
        let mut out = Vec::with_capacity(2 * TAG_LEN + key.len());
        match shape(tree) {
            Shape::Plain => out.extend_from_slice(key),
            Shape::Whole => out.extend_from_slice(&Self::tag(keys, tree as u8, key)),
            Shape::Peer => {
                let n = peer_part(key);
                out.extend_from_slice(&Self::tag(keys, tree as u8, &key[..n]));
                out.extend_from_slice(&key[n..]);
            }
            Shape::PeerThenHidden => {
                let n = peer_part(key);
                out.extend_from_slice(&Self::tag(keys, tree as u8, &key[..n]));
                if n < key.len() {
                    out.extend_from_slice(&Self::tag(keys, tree as u8 | 0x80, key));
                }
            }
        }
        out
    }

    /// The prefix on disk of the logical keys of `tree` that start with `prefix`, if
    /// a prefix scan on disk finds exactly them (else every key must be read).
    pub(super) fn disk_prefix(&self, tree: TreeId, prefix: &[u8]) -> Option<Vec<u8>> {
        if self.keys.is_none() || prefix.is_empty() {
            return Some(prefix.to_vec());
        }
        match shape(tree) {
            Shape::Plain => Some(prefix.to_vec()),
            Shape::Peer if peer_len(prefix).is_some() => Some(self.disk_key(tree, prefix)),
            Shape::PeerThenHidden if peer_len(prefix) == Some(prefix.len()) => {
                Some(self.disk_key(tree, prefix))
            }
            _ => None,
        }
    }

    /// The value on disk for `value` under the logical `key` of `tree`.
    pub(super) fn seal(&self, tree: TreeId, key: &[u8], disk_key: &[u8], value: &[u8]) -> Vec<u8> {
        let Some(keys) = &self.keys else {
            return value.to_vec();
        };
        let n = hidden(tree, key);
        let mut plain = Zeroizing::new(Vec::with_capacity(2 + n + value.len()));
        plain.extend_from_slice(&(n as u16).to_be_bytes());
        plain.extend_from_slice(&key[..n]);
        plain.extend_from_slice(value);
        let nonce: [u8; NONCE_LEN] = rand::random();
        let sealed = keys
            .values
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &associated(tree, disk_key),
                },
            )
            .expect("sealing in memory does not fail");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// The logical key and value of a record on disk.
    pub(super) fn open(
        &self,
        tree: TreeId,
        disk_key: &[u8],
        disk_value: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
        let Some(keys) = &self.keys else {
            return Ok((disk_key.to_vec(), disk_value.to_vec()));
        };
        let corrupt = || StoreError::Corrupt(tree_name(tree));
        if disk_value.len() < NONCE_LEN {
            return Err(corrupt());
        }
        let (nonce, sealed) = disk_value.split_at(NONCE_LEN);
        let plain = Zeroizing::new(
            keys.values
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: sealed,
                        aad: &associated(tree, disk_key),
                    },
                )
                .map_err(|_| corrupt())?,
        );
        let n = plain
            .get(..2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            .ok_or_else(corrupt)?;
        let hidden = plain.get(2..2 + n).ok_or_else(corrupt)?;
        let rest = visible(tree, disk_key).ok_or_else(corrupt)?;
        let mut key = Vec::with_capacity(n + rest.len());
        key.extend_from_slice(hidden);
        key.extend_from_slice(rest);
        Ok((key, plain[2 + n..].to_vec()))
    }
}

fn associated(tree: TreeId, disk_key: &[u8]) -> Vec<u8> {
    let mut ad = Vec::with_capacity(1 + disk_key.len());
    ad.push(tree as u8);
    ad.extend_from_slice(disk_key);
    ad
}

fn tree_name(tree: TreeId) -> &'static str {
    super::writes::TREES[tree as usize]
}

/// One tree of the store, read through the vault: keys and values as the rest of the
/// store knows them.
#[derive(Clone, Copy)]
pub(super) struct Tree<'a> {
    pub(super) raw: &'a sled::Tree,
    pub(super) id: TreeId,
    pub(super) vault: &'a Vault,
}

/// A record as read: its logical key and value.
pub(super) type Record = (Vec<u8>, Vec<u8>);

impl<'a> Tree<'a> {
    /// The value of `key`.
    pub(super) fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, StoreError> {
        let disk = self.vault.disk_key(self.id, key.as_ref());
        match self.raw.get(&disk).map_err(super::db)? {
            Some(v) => Ok(Some(self.vault.open(self.id, &disk, &v)?.1)),
            None => Ok(None),
        }
    }

    /// True if `key` is set.
    pub(super) fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool, StoreError> {
        let disk = self.vault.disk_key(self.id, key.as_ref());
        self.raw.contains_key(disk).map_err(super::db)
    }

    /// Records on disk.
    pub(super) fn len(&self) -> usize {
        self.raw.len()
    }

    fn opened(
        self,
        items: sled::Iter,
    ) -> impl DoubleEndedIterator<Item = Result<Record, StoreError>> + 'a {
        items.map(move |item| {
            let (k, v) = item.map_err(super::db)?;
            self.vault.open(self.id, &k, &v)
        })
    }

    /// Every record, in the order on disk (for a tree whose keys start with a peer id,
    /// each contact's records are together and in order, the contacts in no order).
    pub(super) fn iter(self) -> impl DoubleEndedIterator<Item = Result<Record, StoreError>> + 'a {
        self.opened(self.raw.iter())
    }

    /// The records whose logical key starts with `prefix`, in order.
    pub(super) fn scan_prefix(
        self,
        prefix: impl AsRef<[u8]>,
    ) -> impl DoubleEndedIterator<Item = Result<Record, StoreError>> + 'a {
        let prefix = prefix.as_ref().to_vec();
        let (items, filter) = match self.vault.disk_prefix(self.id, &prefix) {
            Some(disk) => (self.raw.scan_prefix(disk), None),
            None => (self.raw.iter(), Some(prefix)),
        };
        self.opened(items)
            .filter(move |item| match (&filter, item) {
                (Some(p), Ok((k, _))) => k.starts_with(p),
                _ => true,
            })
    }
}
