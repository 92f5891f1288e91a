//! Bundles: sealed envelopes carried on a drive (SPEC.md §10).
//!
//! A bundle holds what a client would have put into relays: each envelope with the
//! relays and write keys it goes to. Whoever imports it either reads the envelopes
//! meant for them or puts the others into the relays named, later, like a relay
//! forwarding. It holds nothing a relay on the way does not see, and ends with a hash
//! of everything before it, so a damaged copy is refused whole rather than half read.
//!
//! ```text
//! bundle = "KKBUNDLE" ‖ version(1) ‖ u32 count ‖ count × item ‖ check(32)
//! item   = u32 len ‖ envelope(len) ‖ u8 n ‖ n × target
//! target = u16 len ‖ relay address (UTF-8) ‖ write key(32) ‖ 0 | 1 ‖ request key(32)
//! check  = H("kkachi/bundle/v1", everything before it)
//! ```

use multiaddr::Multiaddr;
use thiserror::Error;

use crate::card::MAX_RELAYS;
use crate::codec::{DecodeError, Reader, Writer, hash};
use crate::envelope::{Envelope, MAX_ENVELOPE_LEN};
use crate::queue::WriteKey;

/// The first bytes of every bundle.
pub const MAGIC: &[u8; 8] = b"KKBUNDLE";
/// The format version this implementation writes and reads.
pub const VERSION: u8 = 1;
/// The largest bundle read or written: 256 MiB.
pub const MAX_BUNDLE_LEN: usize = 256 << 20;
/// The most envelopes in one bundle.
pub const MAX_ITEMS: usize = 100_000;
/// The most relays one envelope goes to: a card's relays, and as many again (a
/// contact's relays change while an envelope waits).
pub const MAX_TARGETS: usize = 2 * MAX_RELAYS;
/// The longest relay address.
pub const MAX_ADDR_LEN: usize = 512;

const CHECK_LABEL: &str = "kkachi/bundle/v1";
const CHECK_LEN: usize = 32;
/// Magic, version and count.
const HEADER_LEN: usize = MAGIC.len() + 1 + 4;
/// The smallest item: a length, an empty envelope, no targets.
const MIN_ITEM_LEN: usize = 4 + 1;

/// One relay an envelope goes to, and the key it is put with there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The relay (ending in `/p2p/<peer id>`).
    pub relay: Multiaddr,
    /// The write key the sender puts with.
    pub write: WriteKey,
    /// The recipient's contact-request key there, used if the relay has no queue for
    /// `write` (the recipient has not granted it yet).
    pub request: Option<WriteKey>,
}

/// One sealed envelope and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The envelope, as relays hold it.
    pub envelope: Envelope,
    /// Its relays.
    pub targets: Vec<Target>,
}

impl Item {
    /// Its encoded length inside a bundle.
    pub fn encoded_len(&self) -> usize {
        4 + self.envelope.encoded_len()
            + 1
            + self
                .targets
                .iter()
                .map(|t| {
                    2 + t.relay.to_string().len()
                        + 32
                        + 1
                        + if t.request.is_some() { 32 } else { 0 }
                })
                .sum::<usize>()
    }
}

/// Why a file is not a bundle that can be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BundleError {
    /// It does not start like a bundle.
    #[error("this is not a kkachi bundle")]
    NotABundle,
    /// A later kkachi wrote it.
    #[error("this bundle is of version {0}, newer than this kkachi reads (1): update kkachi")]
    NewerVersion(u8),
    /// It is larger than any bundle may be.
    #[error("this bundle is {len} bytes, more than the {max} a bundle may have")]
    TooLarge {
        /// Its length.
        len: u64,
        /// The largest allowed.
        max: u64,
    },
    /// Its hash does not match: it was damaged (or cut short) on the way.
    #[error("this bundle is damaged (its check does not match): copy it again")]
    Damaged,
    /// Its hash matches but its contents do not decode (it was made wrongly).
    #[error("this bundle is malformed: {0}")]
    Malformed(DecodeError),
    /// Too many items or targets for this writer.
    #[error("a bundle holds at most {MAX_ITEMS} envelopes of at most {MAX_TARGETS} relays each")]
    Overfull,
}

/// Encodes `items` as a bundle. Fails if there are too many items, an item has too
/// many targets, or the result would exceed [`MAX_BUNDLE_LEN`].
pub fn encode(items: &[Item]) -> Result<Vec<u8>, BundleError> {
    if items.len() > MAX_ITEMS || items.iter().any(|i| i.targets.len() > MAX_TARGETS) {
        return Err(BundleError::Overfull);
    }
    let len = HEADER_LEN + items.iter().map(Item::encoded_len).sum::<usize>() + CHECK_LEN;
    if len > MAX_BUNDLE_LEN {
        return Err(BundleError::TooLarge {
            len: len as u64,
            max: MAX_BUNDLE_LEN as u64,
        });
    }
    let mut w = Writer::with_capacity(len);
    w.raw(MAGIC).u8(VERSION).u32(items.len() as u32);
    for item in items {
        w.bytes32(&item.envelope.encode())
            .u8(item.targets.len() as u8);
        for t in &item.targets {
            let addr = t.relay.to_string();
            if addr.len() > MAX_ADDR_LEN {
                return Err(BundleError::Overfull);
            }
            w.bytes16(addr.as_bytes()).raw(&t.write.0);
            match &t.request {
                Some(r) => w.u8(1).raw(&r.0),
                None => w.u8(0),
            };
        }
    }
    let mut out = w.finish();
    let check = hash(CHECK_LABEL, &[&out]);
    out.extend_from_slice(&check);
    Ok(out)
}

/// Decodes a bundle, refusing it whole if anything in it is wrong.
pub fn decode(bytes: &[u8]) -> Result<Vec<Item>, BundleError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(BundleError::NotABundle);
    }
    if bytes.len() > MAX_BUNDLE_LEN {
        return Err(BundleError::TooLarge {
            len: bytes.len() as u64,
            max: MAX_BUNDLE_LEN as u64,
        });
    }
    match bytes.get(MAGIC.len()) {
        Some(&VERSION) => {}
        Some(&v) if v > VERSION => return Err(BundleError::NewerVersion(v)),
        _ => return Err(BundleError::Damaged),
    }
    if bytes.len() < HEADER_LEN + CHECK_LEN {
        return Err(BundleError::Damaged);
    }
    let (body, check) = bytes.split_at(bytes.len() - CHECK_LEN);
    if hash(CHECK_LABEL, &[body]) != check {
        return Err(BundleError::Damaged);
    }
    decode_body(&body[MAGIC.len() + 1..]).map_err(BundleError::Malformed)
}

fn decode_body(body: &[u8]) -> Result<Vec<Item>, DecodeError> {
    let mut r = Reader::new(body);
    let count = r.u32("item count")? as usize;
    if count > MAX_ITEMS {
        return Err(DecodeError::TooLong {
            field: "item count",
            len: count as u64,
            max: MAX_ITEMS as u64,
        });
    }
    if count.saturating_mul(MIN_ITEM_LEN) > r.remaining() {
        return Err(DecodeError::Truncated {
            field: "item count",
        });
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        let envelope =
            Envelope::decode(r.bytes32(MAX_ENVELOPE_LEN, "envelope")?).map_err(|_| {
                DecodeError::Invalid {
                    field: "envelope",
                    reason: "not an envelope",
                }
            })?;
        let n = usize::from(r.u8("target count")?);
        if n > MAX_TARGETS {
            return Err(DecodeError::TooLong {
                field: "target count",
                len: n as u64,
                max: MAX_TARGETS as u64,
            });
        }
        let mut targets = Vec::with_capacity(n);
        for _ in 0..n {
            let relay = r
                .str16(MAX_ADDR_LEN, "relay address")?
                .parse::<Multiaddr>()
                .map_err(|_| DecodeError::Invalid {
                    field: "relay address",
                    reason: "not a multiaddr",
                })?;
            let write = WriteKey(r.array::<32>("write key")?);
            let request = match r.u8("request flag")? {
                0 => None,
                1 => Some(WriteKey(r.array::<32>("request key")?)),
                tag => {
                    return Err(DecodeError::UnknownTag {
                        field: "request flag",
                        tag: u64::from(tag),
                    });
                }
            };
            targets.push(Target {
                relay,
                write,
                request,
            });
        }
        items.push(Item { envelope, targets });
    }
    r.finish()?;
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: u8, targets: usize) -> Item {
        Item {
            envelope: Envelope {
                expires_at: 1_000 + u64::from(n),
                payload: vec![n; 2048],
            },
            targets: (0..targets)
                .map(|i| Target {
                    relay: format!(
                        "/ip4/127.0.0.1/tcp/{}/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
                        4000 + i
                    )
                    .parse()
                    .unwrap(),
                    write: WriteKey([n; 32]),
                    request: (i % 2 == 1).then_some(WriteKey([i as u8; 32])),
                })
                .collect(),
        }
    }

    #[test]
    fn a_bundle_round_trips_and_its_length_is_known_ahead() {
        let items = vec![item(1, 3), item(2, 0), item(3, 1)];
        let bytes = encode(&items).unwrap();
        assert_eq!(
            bytes.len(),
            HEADER_LEN + items.iter().map(Item::encoded_len).sum::<usize>() + CHECK_LEN
        );
        assert_eq!(decode(&bytes).unwrap(), items);
        assert_eq!(decode(&encode(&[]).unwrap()).unwrap(), []);
    }

    #[test]
    fn a_damaged_cut_or_foreign_file_is_refused_whole() {
        let bytes = encode(&[item(1, 2), item(2, 2)]).unwrap();
        for at in [9, 20, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            assert_eq!(decode(&bad), Err(BundleError::Damaged), "flipped at {at}");
        }
        assert_eq!(
            decode(&bytes[..bytes.len() - 100]),
            Err(BundleError::Damaged)
        );
        assert_eq!(decode(&bytes[..10]), Err(BundleError::Damaged));
        assert_eq!(
            decode(b"PK\x03\x04 a zip file"),
            Err(BundleError::NotABundle)
        );
        assert_eq!(decode(b""), Err(BundleError::NotABundle));
        let mut newer = bytes.clone();
        newer[8] = 2;
        assert_eq!(decode(&newer), Err(BundleError::NewerVersion(2)));
    }

    #[test]
    fn a_well_hashed_bundle_with_hostile_counts_is_refused_without_allocating() {
        // Count of u32::MAX behind a valid check: refused by the bound, not by memory.
        let mut body = MAGIC.to_vec();
        body.push(VERSION);
        body.extend_from_slice(&u32::MAX.to_be_bytes());
        let check = hash(CHECK_LABEL, &[&body]);
        body.extend_from_slice(&check);
        assert!(matches!(
            decode(&body),
            Err(BundleError::Malformed(DecodeError::TooLong { .. }))
        ));
        let mut body = MAGIC.to_vec();
        body.push(VERSION);
        body.extend_from_slice(&1000u32.to_be_bytes());
        let check = hash(CHECK_LABEL, &[&body]);
        body.extend_from_slice(&check);
        assert!(matches!(
            decode(&body),
            Err(BundleError::Malformed(DecodeError::Truncated { .. }))
        ));
    }

    #[test]
    fn too_many_targets_are_refused_when_writing() {
        assert_eq!(
            encode(&[item(1, MAX_TARGETS + 1)]),
            Err(BundleError::Overfull)
        );
    }
}
