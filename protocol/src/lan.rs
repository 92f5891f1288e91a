//! Finding contacts on the local network without telling anyone else who we are.
//!
//! A client sends a **beacon** to a multicast group every few seconds: its listening
//! ports and, for each of its contacts, a short tag only that contact can recognise.
//! The tag is a keyed hash of a key only the two of them can compute (a static
//! Diffie–Hellman of their X25519 keys), of the sender's peer id and of the current
//! ten-minute slot, so it changes every slot and differs for every contact. A stranger
//! on the network, even one holding the sender's invite code, sees random bytes that
//! name nobody and link to nothing from one slot to the next; a contact computes the
//! tags it expects from each of its contacts and dials the one it sees at the address
//! the beacon came from. (SPEC.md, "Local network".)
//!
//! ```text
//! beacon = "kkb2" ‖ tcp_port(2) ‖ quic_port(2) ‖ u16 count ‖ count × tag(8)
//! lan_key(A, B) = H("kkachi/lan-key/v2", X25519(s_A, X_B), min(X_A, X_B), max(X_A, X_B))
//! tag(A → B, slot) = H("kkachi/lan-beacon/v2", lan_key(A, B), peer_id(A), u64(slot))[0..8]
//! slot = unix_seconds / BEACON_SLOT_SECS
//! ```

use libp2p_identity::PeerId;
use zeroize::Zeroizing;

use crate::codec::{DecodeError, Reader, Writer, hash};
use crate::identity::{Identity, PublicIdentity};

/// Magic and version at the start of every beacon.
pub const BEACON_MAGIC: &[u8; 4] = b"kkb2";
/// Length of one contact's tag in a beacon.
pub const BEACON_TAG_LEN: usize = 8;
/// Most tags one beacon datagram carries; a client with more contacts sends several.
pub const MAX_BEACON_TAGS: usize = 128;
/// Tags are padded with random ones to a multiple of this, so a beacon's size tells
/// only roughly how many contacts its sender has.
pub const BEACON_TAG_BUCKET: usize = 16;
/// How long one set of tags lasts: a tag seen in one slot says nothing about the next.
pub const BEACON_SLOT_SECS: u64 = 600;
/// The largest beacon datagram.
pub const MAX_BEACON_LEN: usize = 4 + 2 + 2 + 2 + MAX_BEACON_TAGS * BEACON_TAG_LEN;

/// One contact's tag in a beacon.
pub type BeaconTag = [u8; BEACON_TAG_LEN];

/// The key two contacts share for recognising each other on the LAN.
#[derive(Clone, PartialEq, Eq)]
pub struct LanKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for LanKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LanKey(..)")
    }
}

impl LanKey {
    /// The tag `from` puts in its beacons for the holder of this key during `slot`.
    pub fn tag(&self, from: &PeerId, slot: u64) -> BeaconTag {
        let h = hash(
            "kkachi/lan-beacon/v2",
            &[self.0.as_slice(), &from.to_bytes(), &slot.to_be_bytes()],
        );
        h[..BEACON_TAG_LEN].try_into().expect("8 bytes")
    }
}

impl Identity {
    /// The key this user and `contact` share for recognising each other on the LAN:
    /// both compute the same one, nobody else can.
    pub fn lan_key_for(&self, contact: &PublicIdentity) -> LanKey {
        let secret = x25519_dalek::StaticSecret::from(*self.x25519_secret());
        let shared = Zeroizing::new(
            secret
                .diffie_hellman(&x25519_dalek::PublicKey::from(*contact.x25519()))
                .to_bytes(),
        );
        let (mine, theirs) = (self.x25519_public(), *contact.x25519());
        let (lo, hi) = if mine <= theirs {
            (mine, theirs)
        } else {
            (theirs, mine)
        };
        LanKey(Zeroizing::new(hash(
            "kkachi/lan-key/v2",
            &[shared.as_slice(), &lo, &hi],
        )))
    }
}

/// The slot a Unix time (seconds) falls in.
pub fn beacon_slot(unix_secs: u64) -> u64 {
    unix_secs / BEACON_SLOT_SECS
}

/// One beacon datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beacon {
    /// The TCP port the sender listens on for contacts (0: none).
    pub tcp_port: u16,
    /// The UDP port of its QUIC listener (0: none).
    pub quic_port: u16,
    /// One tag per contact (and random padding), at most [`MAX_BEACON_TAGS`].
    pub tags: Vec<BeaconTag>,
}

impl Beacon {
    /// The datagram.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(10 + self.tags.len() * BEACON_TAG_LEN);
        w.raw(BEACON_MAGIC)
            .u16(self.tcp_port)
            .u16(self.quic_port)
            .u16(self.tags.len() as u16);
        for tag in &self.tags {
            w.raw(tag);
        }
        w.finish()
    }

    /// Reads a datagram from anyone on the network: bounded, never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_BEACON_LEN {
            return Err(DecodeError::TooLong {
                field: "beacon",
                len: bytes.len() as u64,
                max: MAX_BEACON_LEN as u64,
            });
        }
        let mut r = Reader::new(bytes);
        let magic: [u8; 4] = r.array("beacon magic")?;
        if &magic != BEACON_MAGIC {
            return Err(DecodeError::Invalid {
                field: "beacon",
                reason: "not a kkachi beacon of this version",
            });
        }
        let tcp_port = r.u16("tcp port")?;
        let quic_port = r.u16("quic port")?;
        let count = usize::from(r.u16("tag count")?);
        if count > MAX_BEACON_TAGS {
            return Err(DecodeError::TooLong {
                field: "beacon tags",
                len: count as u64,
                max: MAX_BEACON_TAGS as u64,
            });
        }
        let tags = (0..count)
            .map(|_| r.array("beacon tag"))
            .collect::<Result<Vec<_>, _>>()?;
        r.finish()?;
        Ok(Self {
            tcp_port,
            quic_port,
            tags,
        })
    }
}

/// The beacons `me` sends during `slot` to be found by `contacts` (their LAN keys):
/// each contact's tag, padded with `random` tags to a multiple of
/// [`BEACON_TAG_BUCKET`], in shuffled order, split into datagrams of at most
/// [`MAX_BEACON_TAGS`].
pub fn beacons<R: rand_core::RngCore>(
    me: &PeerId,
    contacts: &[LanKey],
    slot: u64,
    (tcp_port, quic_port): (u16, u16),
    rng: &mut R,
) -> Vec<Beacon> {
    let mut tags: Vec<BeaconTag> = contacts.iter().map(|k| k.tag(me, slot)).collect();
    let padded = tags.len().div_ceil(BEACON_TAG_BUCKET).max(1) * BEACON_TAG_BUCKET;
    while tags.len() < padded {
        let mut t = [0u8; BEACON_TAG_LEN];
        rng.fill_bytes(&mut t);
        tags.push(t);
    }
    // Fisher–Yates: the position of a tag says nothing about which contact it is for.
    for i in (1..tags.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        tags.swap(i, j);
    }
    tags.chunks(MAX_BEACON_TAGS)
        .map(|chunk| Beacon {
            tcp_port,
            quic_port,
            tags: chunk.to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng;

    #[test]
    fn contacts_recognise_each_other_and_nobody_else_does() {
        let a = Identity::generate_with(&mut test_rng(1));
        let b = Identity::generate_with(&mut test_rng(2));
        let stranger = Identity::generate_with(&mut test_rng(3));
        let key_ab = a.lan_key_for(&b.public());
        assert_eq!(key_ab, b.lan_key_for(&a.public()), "both sides agree");
        // What a sends in one slot, b finds; a stranger holding a's card does not.
        let sent = beacons(
            &a.peer_id(),
            std::slice::from_ref(&key_ab),
            7,
            (4001, 4002),
            &mut test_rng(9),
        );
        let tags = &sent[0].tags;
        assert_eq!(tags.len(), BEACON_TAG_BUCKET, "padded");
        let expected = b.lan_key_for(&a.public()).tag(&a.peer_id(), 7);
        assert!(tags.contains(&expected));
        let guess = stranger.lan_key_for(&a.public()).tag(&a.peer_id(), 7);
        assert!(!tags.contains(&guess));
        // Tags differ by direction and by slot.
        assert_ne!(expected, key_ab.tag(&b.peer_id(), 7));
        assert_ne!(expected, key_ab.tag(&a.peer_id(), 8));
        // The datagram names no one: no peer id or key bytes in it.
        let bytes = sent[0].encode();
        for needle in [a.peer_id().to_bytes(), a.x25519_public().to_vec()] {
            assert!(!bytes.windows(8).any(|w| needle.windows(8).any(|n| n == w)));
        }
        assert_eq!(Beacon::decode(&bytes).unwrap(), sent[0]);
    }

    #[test]
    fn many_contacts_take_several_datagrams_and_bad_ones_are_refused() {
        let a = Identity::generate_with(&mut test_rng(4));
        let keys: Vec<LanKey> = (0..300)
            .map(|i| a.lan_key_for(&Identity::generate_with(&mut test_rng(100 + i)).public()))
            .collect();
        let sent = beacons(&a.peer_id(), &keys, 1, (1, 2), &mut test_rng(5));
        assert_eq!(sent.iter().map(|b| b.tags.len()).sum::<usize>(), 304);
        assert!(sent.iter().all(|b| b.encode().len() <= MAX_BEACON_LEN));
        let good = sent[0].encode();
        assert!(Beacon::decode(&good[..good.len() - 1]).is_err());
        let mut foreign = good.clone();
        foreign[0] = b'x';
        assert!(Beacon::decode(&foreign).is_err());
        let mut too_many = good[..8].to_vec();
        too_many.extend_from_slice(&(MAX_BEACON_TAGS as u16 + 1).to_be_bytes());
        assert!(matches!(
            Beacon::decode(&too_many),
            Err(DecodeError::TooLong { .. })
        ));
        assert!(Beacon::decode(&vec![0; MAX_BEACON_LEN + 1]).is_err());
    }

    #[test]
    fn known_answer_lan_key_and_tag() {
        let a = Identity::generate_with(&mut test_rng(1));
        let b = Identity::generate_with(&mut test_rng(2));
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let key = a.lan_key_for(&b.public());
        assert_eq!(
            hex(key.0.as_slice()),
            "d79fbb00d2620780692c02b46cc6e07df530501af7c5b65022ff25d5cad25689"
        );
        assert_eq!(hex(&key.tag(&a.peer_id(), 1)), "471370b5fad1d9b0");
    }
}
