//! Finding contacts on the local network without telling anyone else who we are.
//!
//! A client sends a **beacon** to a multicast group every few seconds, on each of its
//! interfaces: for each of its contacts, an entry only that contact can read. An
//! entry's tag is a keyed hash of a key only the two of them can compute (a static
//! Diffie–Hellman of their X25519 keys), of the sender's peer id and of the current
//! ten-minute slot, so it changes every slot and differs for every contact; the ports
//! the sender listens on follow, masked under the same key, and a MAC binds tag and
//! ports to the address the beacon is sent from. A stranger on the network, even one
//! holding the sender's invite code, sees random bytes that name nobody and link to
//! nothing from one slot to the next; a replay from another address, or with other
//! ports, fails the MAC, so nobody can make a contact dial them. (SPEC.md, "Local
//! network".)
//!
//! ```text
//! beacon  = "kkb2" ‖ u16 count ‖ count × entry            entry = tag(8) ‖ ports(4) ‖ mac(8)
//! lan_key(A, B) = H("kkachi/lan-key/v2", X25519(s_A, X_B), min(X_A, X_B), max(X_A, X_B))
//! tag     = H("kkachi/lan-beacon/v2", lan_key, peer_id(A), u64(slot))[0..8]
//! ports   = (u16 tcp ‖ u16 quic) XOR H("kkachi/lan-ports/v2", lan_key, peer_id(A), u64(slot))[0..4]
//! mac     = H("kkachi/lan-where/v2", lan_key, peer_id(A), u64(slot), ip(16), u16 tcp, u16 quic)[0..8]
//! slot    = unix_seconds / BEACON_SLOT_SECS;  ip = the sender's address, IPv4 mapped to IPv6
//! ```

use std::net::IpAddr;

use libp2p_identity::PeerId;
use zeroize::Zeroizing;

use crate::codec::{DecodeError, Reader, Writer, hash};
use crate::identity::{Identity, PublicIdentity};

/// Magic and version at the start of every beacon.
pub const BEACON_MAGIC: &[u8; 4] = b"kkb2";
/// Length of one contact's tag in a beacon entry.
pub const BEACON_TAG_LEN: usize = 8;
/// Length of one entry: tag, masked ports, MAC.
pub const BEACON_ENTRY_LEN: usize = BEACON_TAG_LEN + 4 + 8;
/// Most entries one beacon datagram carries; a client with more contacts sends several.
pub const MAX_BEACON_ENTRIES: usize = 64;
/// Entries are padded with random ones to a multiple of this, so a beacon's size tells
/// only roughly how many contacts its sender has.
pub const BEACON_ENTRY_BUCKET: usize = 16;
/// How long one set of tags lasts: a tag seen in one slot says nothing about the next.
pub const BEACON_SLOT_SECS: u64 = 600;
/// The largest beacon datagram.
pub const MAX_BEACON_LEN: usize = 4 + 2 + MAX_BEACON_ENTRIES * BEACON_ENTRY_LEN;

/// One contact's tag in a beacon.
pub type BeaconTag = [u8; BEACON_TAG_LEN];
/// One entry of a beacon.
pub type BeaconEntry = [u8; BEACON_ENTRY_LEN];

/// The key two contacts share for recognising each other on the LAN.
#[derive(Clone, PartialEq, Eq)]
pub struct LanKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for LanKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LanKey(..)")
    }
}

fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
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

    fn ports_mask(&self, from: &PeerId, slot: u64) -> [u8; 4] {
        let h = hash(
            "kkachi/lan-ports/v2",
            &[self.0.as_slice(), &from.to_bytes(), &slot.to_be_bytes()],
        );
        h[..4].try_into().expect("4 bytes")
    }

    fn mac(&self, from: &PeerId, slot: u64, ip: IpAddr, ports: [u8; 4]) -> [u8; 8] {
        let h = hash(
            "kkachi/lan-where/v2",
            &[
                self.0.as_slice(),
                &from.to_bytes(),
                &slot.to_be_bytes(),
                &ip_bytes(ip),
                &ports,
            ],
        );
        h[..8].try_into().expect("8 bytes")
    }

    /// The entry `from`, sending from `ip` and listening on `(tcp, quic)`, puts in its
    /// beacons for the holder of this key during `slot`.
    pub fn entry(
        &self,
        from: &PeerId,
        slot: u64,
        ip: IpAddr,
        (tcp, quic): (u16, u16),
    ) -> BeaconEntry {
        let mut ports = [0u8; 4];
        ports[..2].copy_from_slice(&tcp.to_be_bytes());
        ports[2..].copy_from_slice(&quic.to_be_bytes());
        let mut entry = [0u8; BEACON_ENTRY_LEN];
        entry[..BEACON_TAG_LEN].copy_from_slice(&self.tag(from, slot));
        let mask = self.ports_mask(from, slot);
        for (i, b) in ports.iter().enumerate() {
            entry[BEACON_TAG_LEN + i] = b ^ mask[i];
        }
        entry[BEACON_TAG_LEN + 4..].copy_from_slice(&self.mac(from, slot, ip, ports));
        entry
    }

    /// Reads an entry whose tag is `from`'s for this key in `slot`, from a beacon that
    /// came from `ip`: the ports it names, if its MAC holds (a replay from another
    /// address, or with other ports, fails it).
    pub fn open(
        &self,
        entry: &BeaconEntry,
        from: &PeerId,
        slot: u64,
        ip: IpAddr,
    ) -> Option<(u16, u16)> {
        let mask = self.ports_mask(from, slot);
        let mut ports = [0u8; 4];
        for (i, p) in ports.iter_mut().enumerate() {
            *p = entry[BEACON_TAG_LEN + i] ^ mask[i];
        }
        let mac = self.mac(from, slot, ip, ports);
        if mac[..] != entry[BEACON_TAG_LEN + 4..] {
            return None;
        }
        Some((
            u16::from_be_bytes([ports[0], ports[1]]),
            u16::from_be_bytes([ports[2], ports[3]]),
        ))
    }
}

impl Identity {
    /// The key this user and `contact` share for recognising each other on the LAN:
    /// both compute the same one, nobody else can. `None` for a key whose
    /// Diffie–Hellman gives nothing secret (a low-order point: no honest card has one).
    pub fn lan_key_for(&self, contact: &PublicIdentity) -> Option<LanKey> {
        self.lan_key_with(contact.x25519())
    }

    /// The key this device shares for the LAN with the device whose session key is
    /// `device` (a contact's, or another of our own account's).
    pub fn lan_key_with(&self, device: &[u8; 32]) -> Option<LanKey> {
        let secret = x25519_dalek::StaticSecret::from(*self.x25519_secret());
        let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*device));
        if !shared.was_contributory() {
            return None;
        }
        let shared = Zeroizing::new(shared.to_bytes());
        let (mine, theirs) = (self.x25519_public(), *device);
        let (lo, hi) = if mine <= theirs {
            (mine, theirs)
        } else {
            (theirs, mine)
        };
        Some(LanKey(Zeroizing::new(hash(
            "kkachi/lan-key/v2",
            &[shared.as_slice(), &lo, &hi],
        ))))
    }
}

/// The slot a Unix time (seconds) falls in.
pub fn beacon_slot(unix_secs: u64) -> u64 {
    unix_secs / BEACON_SLOT_SECS
}

/// One beacon datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beacon {
    /// One entry per contact (and random padding), at most [`MAX_BEACON_ENTRIES`].
    pub entries: Vec<BeaconEntry>,
}

impl Beacon {
    /// The datagram.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(6 + self.entries.len() * BEACON_ENTRY_LEN);
        w.raw(BEACON_MAGIC).u16(self.entries.len() as u16);
        for e in &self.entries {
            w.raw(e);
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
        let count = usize::from(r.u16("entry count")?);
        if count > MAX_BEACON_ENTRIES {
            return Err(DecodeError::TooLong {
                field: "beacon entries",
                len: count as u64,
                max: MAX_BEACON_ENTRIES as u64,
            });
        }
        let entries = (0..count)
            .map(|_| r.array("beacon entry"))
            .collect::<Result<Vec<_>, _>>()?;
        r.finish()?;
        Ok(Self { entries })
    }
}

/// The beacons `me` sends from `ip` during `slot` to be found by `contacts` (their LAN
/// keys), listening on `ports`: each contact's entry, padded with random ones to a
/// multiple of [`BEACON_ENTRY_BUCKET`], in shuffled order, split into datagrams of at
/// most [`MAX_BEACON_ENTRIES`].
pub fn beacons<R: rand_core::RngCore>(
    me: &PeerId,
    contacts: &[LanKey],
    slot: u64,
    (ip, ports): (IpAddr, (u16, u16)),
    rng: &mut R,
) -> Vec<Beacon> {
    let mut entries: Vec<BeaconEntry> = contacts
        .iter()
        .map(|k| k.entry(me, slot, ip, ports))
        .collect();
    let padded = entries.len().div_ceil(BEACON_ENTRY_BUCKET).max(1) * BEACON_ENTRY_BUCKET;
    while entries.len() < padded {
        let mut e = [0u8; BEACON_ENTRY_LEN];
        rng.fill_bytes(&mut e);
        entries.push(e);
    }
    // Fisher–Yates: the position of an entry says nothing about which contact it is for.
    for i in (1..entries.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        entries.swap(i, j);
    }
    entries
        .chunks(MAX_BEACON_ENTRIES)
        .map(|chunk| Beacon {
            entries: chunk.to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn contacts_recognise_each_other_and_nobody_else_does() {
        let a = Identity::generate_with(&mut test_rng(1));
        let b = Identity::generate_with(&mut test_rng(2));
        let stranger = Identity::generate_with(&mut test_rng(3));
        let key_ab = a.lan_key_for(&b.public()).unwrap();
        assert_eq!(
            key_ab,
            b.lan_key_for(&a.public()).unwrap(),
            "both sides agree"
        );
        let from = ip("192.0.2.7");
        // What a sends in one slot, b finds, with a's ports; a stranger holding a's
        // card does not.
        let sent = beacons(
            &a.peer_id(),
            std::slice::from_ref(&key_ab),
            7,
            (from, (4001, 4002)),
            &mut test_rng(9),
        );
        let entries = &sent[0].entries;
        assert_eq!(entries.len(), BEACON_ENTRY_BUCKET, "padded");
        let theirs = b.lan_key_for(&a.public()).unwrap();
        let tag = theirs.tag(&a.peer_id(), 7);
        let found = entries.iter().find(|e| e[..BEACON_TAG_LEN] == tag).unwrap();
        assert_eq!(
            theirs.open(found, &a.peer_id(), 7, from),
            Some((4001, 4002))
        );
        let guess = stranger
            .lan_key_for(&a.public())
            .unwrap()
            .tag(&a.peer_id(), 7);
        assert!(!entries.iter().any(|e| e[..BEACON_TAG_LEN] == guess));
        // Tags differ by direction and by slot.
        assert_ne!(tag, key_ab.tag(&b.peer_id(), 7));
        assert_ne!(tag, key_ab.tag(&a.peer_id(), 8));
        // The datagram names no one, not even the ports: no peer id, key or port bytes.
        let bytes = sent[0].encode();
        for needle in [a.peer_id().to_bytes(), a.x25519_public().to_vec()] {
            assert!(!bytes.windows(8).any(|w| needle.windows(8).any(|n| n == w)));
        }
        assert_eq!(Beacon::decode(&bytes).unwrap(), sent[0]);
    }

    #[test]
    fn a_replay_from_elsewhere_or_with_other_ports_opens_nothing() {
        let a = Identity::generate_with(&mut test_rng(11));
        let b = Identity::generate_with(&mut test_rng(12));
        let key = a.lan_key_for(&b.public()).unwrap();
        let entry = key.entry(&a.peer_id(), 5, ip("192.0.2.7"), (4001, 4002));
        assert!(key.open(&entry, &a.peer_id(), 5, ip("192.0.2.7")).is_some());
        assert_eq!(key.open(&entry, &a.peer_id(), 5, ip("192.0.2.66")), None);
        assert_eq!(key.open(&entry, &a.peer_id(), 6, ip("192.0.2.7")), None);
        let mut other_ports = entry;
        other_ports[BEACON_TAG_LEN] ^= 1;
        assert_eq!(
            key.open(&other_ports, &a.peer_id(), 5, ip("192.0.2.7")),
            None
        );
    }

    #[test]
    fn a_low_order_key_gives_no_lan_key() {
        let a = Identity::generate_with(&mut test_rng(13));
        let mallory = Identity::generate_with(&mut test_rng(14));
        // Zero is of low order: its Diffie–Hellman with anything is zero.
        let weak = mallory.public_with_foreign_x25519([0; 32]);
        assert!(a.lan_key_for(&weak).is_none());
        assert!(a.lan_key_for(&mallory.public()).is_some());
    }

    #[test]
    fn many_contacts_take_several_datagrams_and_bad_ones_are_refused() {
        let a = Identity::generate_with(&mut test_rng(4));
        let keys: Vec<LanKey> = (0..300)
            .map(|i| {
                a.lan_key_for(&Identity::generate_with(&mut test_rng(100 + i)).public())
                    .unwrap()
            })
            .collect();
        let sent = beacons(
            &a.peer_id(),
            &keys,
            1,
            (ip("10.0.0.1"), (1, 2)),
            &mut test_rng(5),
        );
        assert_eq!(sent.iter().map(|b| b.entries.len()).sum::<usize>(), 304);
        assert!(sent.iter().all(|b| b.encode().len() <= MAX_BEACON_LEN));
        let good = sent[0].encode();
        assert!(Beacon::decode(&good[..good.len() - 1]).is_err());
        let mut foreign = good.clone();
        foreign[0] = b'x';
        assert!(Beacon::decode(&foreign).is_err());
        let mut too_many = good[..4].to_vec();
        too_many.extend_from_slice(&(MAX_BEACON_ENTRIES as u16 + 1).to_be_bytes());
        assert!(matches!(
            Beacon::decode(&too_many),
            Err(DecodeError::TooLong { .. })
        ));
        assert!(Beacon::decode(&vec![0; MAX_BEACON_LEN + 1]).is_err());
    }

    #[test]
    fn known_answer_lan_key_and_entry() {
        let a = Identity::generate_with(&mut test_rng(1));
        let b = Identity::generate_with(&mut test_rng(2));
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let key = a.lan_key_for(&b.public()).unwrap();
        assert_eq!(
            hex(key.0.as_slice()),
            "98b88b2f57776f736966ef9cf1464a02056071ef1f9d4f5ccf12a6c5f7d916c4"
        );
        assert_eq!(hex(&key.tag(&a.peer_id(), 1)), "1afba6b15275ba1f");
        assert_eq!(
            hex(&key.entry(&a.peer_id(), 1, ip("10.0.0.1"), (4001, 4002))),
            "1afba6b15275ba1fce5854b38c07b44225187f00"
        );
    }
}
