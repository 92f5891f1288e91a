//! Fuzz-target bodies, one per decoder of untrusted bytes.
//!
//! The cargo-fuzz targets in `protocol/fuzz/` call these, and so does the corpus test
//! (`protocol/tests/corpus.rs`) under plain `cargo test`, so every committed corpus
//! entry is checked on every run. Each body must never panic on any input, and checks
//! that whatever decodes re-encodes to something that decodes to the same value.

use crate::card::Card;
use crate::content::Content;
use crate::envelope::Envelope;
use crate::identity::Identity;
use crate::session::{self, Incoming, Session};
use crate::wire::{ClientToRelay, RelayToClient};

/// A fuzz target body.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, as used for the corpus directories.
pub const TARGETS: &[(&str, Target)] = &[
    ("invite", invite),
    ("envelope", envelope),
    ("wire_request", wire_request),
    ("wire_response", wire_response),
    ("content", content),
    ("session_packet", session_packet),
    ("session_state", session_state),
    ("lan_beacon", lan_beacon),
    ("bundle", bundle),
    ("file", file),
    ("group", group),
    ("group_large", group_large),
    ("device_set", device_set),
];

/// The key of the manifests in the `file` corpus (public, so seeds can be real).
pub const FUZZ_FILE_KEY: crate::file::FileKey = crate::file::FileKey([7; 32]);

/// What a chat message says about a file (first byte 0), and sealed manifests (first
/// byte 1, under [`FUZZ_FILE_KEY`]): both come from contacts.
pub fn file(data: &[u8]) {
    use crate::file::{ChunkId, FileRef, Manifest};
    match data.split_first() {
        Some((0, rest)) => {
            if let Ok(f) = FileRef::decode(rest) {
                assert_eq!(f.encode(), rest, "file references are canonical");
            }
        }
        Some((1, rest)) => {
            if let Ok(m) = Manifest::open(&FUZZ_FILE_KEY, &ChunkId::of(rest), rest) {
                let (_, sealed) = m.seal(&FUZZ_FILE_KEY).expect("what opened seals");
                assert_eq!(sealed, rest, "manifests are canonical");
            }
        }
        _ => {}
    }
}

/// Group operations as a member shares them (any member may be hostile): each decodes
/// to what it was signed as, and merging whatever verified never panics.
pub fn group(data: &[u8]) {
    use crate::group::{MAX_LOG_OPS, Roster, decode_ops, encode_ops};
    if let Ok(ops) = decode_ops(data, MAX_LOG_OPS) {
        assert_eq!(encode_ops(&ops), data, "group operations are canonical");
        if let Some(first) = ops.first() {
            let id = first.group();
            let _ = Roster::merge(id, ops.iter().filter(|op| op.group() == id));
        }
    }
}

/// An account's device sets, which its own devices and its contacts take in (SPEC
/// §15), under the identity key of [`fuzz_sender`]: one set (first byte 0), or two
/// (first byte 1, then the first's length as a u16), merged both ways round.
pub fn device_set(data: &[u8]) {
    use crate::device::DeviceSet;
    let account = *fuzz_sender().public().ed25519();
    let decoded = |bytes: &[u8]| {
        let set = DeviceSet::decode(&account, bytes).ok()?;
        assert_eq!(set.encode(), bytes, "device sets are canonical");
        Some(set)
    };
    match data.split_first() {
        Some((0, rest)) => {
            if let Some(mut set) = decoded(rest) {
                let same = set.clone();
                assert!(
                    set.merge(&same)
                        .expect("a set merges with itself")
                        .is_empty()
                );
            }
        }
        Some((1, rest)) if rest.len() >= 2 => {
            let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
            let rest = &rest[2..];
            let (a, b) = rest.split_at(len.min(rest.len()));
            if let (Some(a), Some(b)) = (decoded(a), decoded(b)) {
                let (mut ab, mut ba) = (a.clone(), b.clone());
                if ab.merge(&b).is_ok() {
                    ba.merge(&a)
                        .expect("a merge that fits one way fits the other");
                    assert_eq!(ab, ba, "merging commutes");
                }
            }
        }
        _ => {}
    }
}

/// The epoch key of the items in the `group_large` corpus (public, so seeds can be real).
pub const FUZZ_EPOCH_KEY: [u8; 32] = [5; 32];
/// The group of the items in the `group_large` corpus.
pub const FUZZ_GROUP: crate::group::GroupId = crate::group::GroupId([6; 32]);

/// The large tier's records, which any member may write (SPEC §14.5): key records
/// (first byte 0), posts (1) and items of a group queue under [`FUZZ_EPOCH_KEY`] (2).
pub fn group_large(data: &[u8]) {
    use crate::group::large::{EpochKey, KeyRecord, Post, open_item};
    match data.split_first() {
        Some((0, rest)) => {
            if let Ok(record) = KeyRecord::decode(rest) {
                assert_eq!(record.encode(), rest, "key records are canonical");
                let _ = record.unwrap(&fuzz_recipient());
            }
        }
        Some((1, rest)) => {
            if let Ok(post) = Post::decode(rest) {
                assert_eq!(post.encode(), rest, "posts are canonical");
            }
        }
        Some((2, rest)) => {
            let key = EpochKey::from_bytes(FUZZ_EPOCH_KEY);
            if let Ok(post) = open_item(&FUZZ_GROUP, &key, rest, |_| true) {
                assert_eq!(Post::decode(post.encode()).expect("opened"), post);
            }
        }
        _ => {}
    }
}

/// Bundles: files carried from anyone, read whole.
pub fn bundle(data: &[u8]) {
    if let Ok(items) = crate::bundle::decode(data) {
        let again = crate::bundle::encode(&items).expect("what decoded encodes");
        assert_eq!(crate::bundle::decode(&again).expect("re-encoded"), items);
    }
}

/// LAN beacons: anyone on the network sends them.
pub fn lan_beacon(data: &[u8]) {
    if let Ok(b) = crate::lan::Beacon::decode(data) {
        assert_eq!(b.encode(), data, "beacons are canonical");
    }
}

/// Invite codes (text).
pub fn invite(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(card) = Card::from_invite(&text) {
        let again = Card::from_invite(&card.to_invite()).expect("re-encoded invite decodes");
        assert_eq!(again, card);
    }
}

/// Envelopes: canonical, so bytes must round-trip exactly.
pub fn envelope(data: &[u8]) {
    if let Ok(e) = Envelope::decode(data) {
        assert_eq!(e.encode(), data);
    }
}

/// Client→relay frame bodies.
pub fn wire_request(data: &[u8]) {
    if let Ok(m) = ClientToRelay::decode(data) {
        assert_eq!(ClientToRelay::decode(&m.encode()).expect("re-encoded"), m);
    }
}

/// Relay→client frame bodies.
pub fn wire_response(data: &[u8]) {
    if let Ok(m) = RelayToClient::decode(data) {
        assert_eq!(RelayToClient::decode(&m.encode()).expect("re-encoded"), m);
    }
}

/// Content records.
pub fn content(data: &[u8]) {
    if let Ok(c) = Content::decode(data) {
        assert_eq!(Content::decode(&c.encode()).expect("re-encoded"), c);
    }
}

/// The fixed recipient used by [`session_packet`]; its secret is public knowledge, so
/// seeds in the corpus can be real packets sealed to it.
pub fn fuzz_recipient() -> Identity {
    let mut secret = vec![2u8];
    secret.extend_from_slice(&[0x5a; 32]);
    secret.extend_from_slice(&[0xa5; 32]);
    Identity::from_secret_bytes(&secret).expect("valid fixed identity")
}

/// The fixed sender used to make seed packets for [`session_packet`].
pub fn fuzz_sender() -> Identity {
    let mut secret = vec![2u8];
    secret.extend_from_slice(&[0x11; 32]);
    secret.extend_from_slice(&[0x22; 32]);
    Identity::from_secret_bytes(&secret).expect("valid fixed identity")
}

/// Sealed packets: opened by a fixed recipient, first messages accepted into a fresh
/// session, transport messages tried against it.
pub fn session_packet(data: &[u8]) {
    let me = fuzz_recipient();
    let now = 1_750_000_000;
    match session::open(&me, data) {
        Ok(Incoming::Init(init)) => {
            let mut s = Session::with_instance(*init.remote_static(), [0; 8]);
            let _ = s.accept_init(&me, init, now);
            let _ = Session::decode(&s.encode()).expect("state round-trips");
        }
        Ok(Incoming::Transport(t)) => {
            let mut s = Session::with_instance(fuzz_sender().x25519_public(), [0; 8]);
            assert!(
                s.open_transport(&me, &t, now).is_none(),
                "no keys, nothing opens"
            );
        }
        Err(_) => {}
    }
}

/// A card pairing `signer`'s identity key with someone else's X25519 key (`x25519`,
/// copied from that person's public card), signed by `signer`: a forgery anyone can
/// make. Every check must see through it (tests use it to prove they do).
pub fn forged_card(
    signer: &Identity,
    x25519: [u8; 32],
    name: &str,
    relays: Vec<multiaddr::Multiaddr>,
    version: u64,
) -> Card {
    Card::signed(
        signer.public_with_foreign_x25519(x25519),
        signer,
        name,
        relays,
        version,
    )
    .expect("valid name and relays")
}

/// Stored session state (read back from the local database, which may be corrupt).
pub fn session_state(data: &[u8]) {
    if let Ok(s) = Session::decode(data) {
        let bytes = s.encode();
        let again = Session::decode(&bytes).expect("re-encoded state decodes");
        assert_eq!(*again.encode(), *bytes);
    }
}
