//! Queues: where relays keep envelopes, and the keys that open them.
//!
//! A relay holds envelopes in **queues**. A queue is named by a [`QueueId`], the hash of
//! its secret [`ReadKey`]: presenting the read key is how its owner reads and deletes,
//! and nothing else about the owner (no libp2p identity, no card) is involved. Puts need
//! a [`WriteKey`], a capability the owner grants on the relay by registering its hash
//! (a [`WriteId`]); each contact gets its own, different on every relay.
//!
//! Every key is derived, so nothing needs storing and a relay that lost its data can be
//! given the same queues again (SPEC.md §3):
//!
//! - the owner's inbox on a relay (one queue per relay, whatever the number of
//!   contacts): a read key from the owner's X25519 secret and the relay's peer id;
//! - its contact-request queue there: a read key and one write key from the same secret,
//!   the relay and an epoch (a new epoch retires every invite code given out before);
//!   the write key travels in the owner's card;
//! - the capability of contact W to put into owner O's inbox on relay R: a key from the
//!   X25519 agreement of O's and W's static keys, both public keys and R. Both O and W
//!   compute it; nobody else can.

use libp2p_identity::PeerId;
use zeroize::Zeroizing;

use crate::codec::hash;
use crate::envelope::short_hex;
use crate::identity::{Identity, PublicIdentity};

/// A queue's address on one relay: `H("kkachi/queue/v2", read_key)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub [u8; 32]);

/// The secret that reads and deletes from a queue.
#[derive(Clone, PartialEq, Eq)]
pub struct ReadKey(pub [u8; 32]);

/// The secret that puts into a queue (a capability).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct WriteKey(pub [u8; 32]);

/// The one secret of a group queue (SPEC §14.5): whoever holds it opens the queue, reads
/// it and puts into it; nobody deletes from it or grants anything on it. Its queue id is
/// `H("kkachi/group-queue/v1", key)`, a different name space from queues opened by a
/// grant, so no one can open a group's queue as another kind or bind its key elsewhere.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupKey(pub [u8; 32]);

impl GroupKey {
    /// The group queue this key names.
    pub fn queue(&self) -> QueueId {
        QueueId(hash("kkachi/group-queue/v1", &[&self.0]))
    }
}

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GroupKey(queue {})", self.queue())
    }
}

/// What a relay keeps of a write key: `H("kkachi/queue-write/v2", write_key)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WriteId(pub [u8; 32]);

/// What a write capability is for; the relay applies different limits to each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QueueKind {
    /// One contact's capability.
    Inbox,
    /// The contact-request capability, whose key is in the owner's card: shared by
    /// everyone holding the invite code, with a small quota, short lifetimes and a
    /// small allowance per source.
    Requests,
    /// A group queue (SPEC §14.5), opened by `OpenGroup` and never by a grant: every
    /// member of a large group reads it and puts into it with its [`GroupKey`]; nothing
    /// is deleted from it (its envelopes leave by expiry only, so no member can take
    /// another's message away). Not a wire value of `Grant`.
    Group,
}

impl QueueKind {
    /// The wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            Self::Inbox => 1,
            Self::Requests => 2,
            Self::Group => 3,
        }
    }

    /// From the wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Inbox),
            2 => Some(Self::Requests),
            3 => Some(Self::Group),
            _ => None,
        }
    }
}

impl ReadKey {
    /// The queue this key reads.
    pub fn queue(&self) -> QueueId {
        QueueId(hash("kkachi/queue/v2", &[&self.0]))
    }
}

impl WriteKey {
    /// What the relay registers for this key.
    pub fn id(&self) -> WriteId {
        WriteId(hash("kkachi/queue-write/v2", &[&self.0]))
    }
}

impl std::fmt::Debug for ReadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadKey(queue {})", self.queue())
    }
}

impl std::fmt::Debug for WriteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WriteKey(id {})", self.id())
    }
}

macro_rules! hex_display {
    ($t:ty, $name:literal) => {
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!($name, "({})"), short_hex(&self.0))
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&short_hex(&self.0))
            }
        }
    };
}
hex_display!(QueueId, "QueueId");
hex_display!(WriteId, "WriteId");

impl Identity {
    /// The read key of this user's inbox on `relay`.
    pub fn inbox_key(&self, relay: &PeerId) -> ReadKey {
        let secret = self.x25519_secret();
        ReadKey(hash(
            "kkachi/inbox-read/v2",
            &[secret.as_slice(), &relay.to_bytes()],
        ))
    }

    /// The read key of this user's contact-request queue on `relay` for `epoch`: what
    /// strangers holding the invite code put into is read apart from the inbox, so a
    /// flood of them never stands in front of a contact's message.
    pub fn request_read_key(&self, relay: &PeerId, epoch: u32) -> ReadKey {
        let secret = self.x25519_secret();
        ReadKey(hash(
            "kkachi/request-read/v2",
            &[secret.as_slice(), &relay.to_bytes(), &epoch.to_be_bytes()],
        ))
    }

    /// The contact-request capability into that queue: what this user's card carries
    /// for `relay`.
    pub fn request_write_key(&self, relay: &PeerId, epoch: u32) -> WriteKey {
        let secret = self.x25519_secret();
        WriteKey(hash(
            "kkachi/request-write/v2",
            &[secret.as_slice(), &relay.to_bytes(), &epoch.to_be_bytes()],
        ))
    }

    /// The read and write keys of this user's drill queue on `relay`: `kkachi drill`
    /// opens it, loops a test envelope through it and closes it again. Its own queue,
    /// so a drill never mixes with what contacts or strangers put.
    pub fn drill_keys(&self, relay: &PeerId) -> (ReadKey, WriteKey) {
        let secret = self.x25519_secret();
        let relay = relay.to_bytes();
        (
            ReadKey(hash("kkachi/drill-read/v2", &[secret.as_slice(), &relay])),
            WriteKey(hash("kkachi/drill-write/v2", &[secret.as_slice(), &relay])),
        )
    }

    /// The capability for `writer` to put into this user's inbox on `relay`: what this
    /// user grants there for that contact.
    pub fn grant_for(&self, writer: &PublicIdentity, relay: &PeerId) -> WriteKey {
        self.grant_for_device(writer.x25519(), relay)
    }

    /// The capability for the device whose session key is `writer` (one of a
    /// contact's devices, 15) to put into this user's inbox on `relay`.
    pub fn grant_for_device(&self, writer: &[u8; 32], relay: &PeerId) -> WriteKey {
        self.pair_write_key(writer, &self.x25519_public(), writer, relay)
    }

    /// The capability this user puts with into `owner`'s inbox on `relay`.
    pub fn write_key_for(&self, owner: &PublicIdentity, relay: &PeerId) -> WriteKey {
        self.write_key_to_device(owner.x25519(), relay)
    }

    /// The capability this user puts with into the inbox on `relay` of the device
    /// whose session key is `owner`.
    pub fn write_key_to_device(&self, owner: &[u8; 32], relay: &PeerId) -> WriteKey {
        self.pair_write_key(owner, owner, &self.x25519_public(), relay)
    }

    fn pair_write_key(
        &self,
        peer: &[u8; 32],
        owner: &[u8; 32],
        writer: &[u8; 32],
        relay: &PeerId,
    ) -> WriteKey {
        let secret = x25519_dalek::StaticSecret::from(*self.x25519_secret());
        let shared = Zeroizing::new(
            secret
                .diffie_hellman(&x25519_dalek::PublicKey::from(*peer))
                .to_bytes(),
        );
        WriteKey(hash(
            "kkachi/pair-write/v2",
            &[shared.as_slice(), owner, writer, &relay.to_bytes()],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng;

    fn ids() -> (Identity, Identity, PeerId, PeerId) {
        let a = Identity::generate_with(&mut test_rng(1));
        let b = Identity::generate_with(&mut test_rng(2));
        let r1 = Identity::generate_with(&mut test_rng(3)).peer_id();
        let r2 = Identity::generate_with(&mut test_rng(4)).peer_id();
        (a, b, r1, r2)
    }

    #[test]
    fn both_sides_derive_the_same_capability_and_nobody_else_does() {
        let (a, b, r1, r2) = ids();
        let c = Identity::generate_with(&mut test_rng(5));
        // a grants b; b writes with it
        assert_eq!(
            a.grant_for(&b.public(), &r1),
            b.write_key_for(&a.public(), &r1)
        );
        // different per relay, per direction and per contact
        assert_ne!(a.grant_for(&b.public(), &r1), a.grant_for(&b.public(), &r2));
        assert_ne!(a.grant_for(&b.public(), &r1), b.grant_for(&a.public(), &r1));
        assert_ne!(a.grant_for(&b.public(), &r1), a.grant_for(&c.public(), &r1));
        // a third party holding both public keys derives something else
        assert_ne!(
            c.write_key_for(&a.public(), &r1),
            a.grant_for(&b.public(), &r1)
        );
    }

    #[test]
    fn queues_differ_per_relay_and_epoch_and_do_not_name_the_owner() {
        let (a, b, r1, r2) = ids();
        assert_ne!(a.inbox_key(&r1).queue(), a.inbox_key(&r2).queue());
        assert_ne!(a.inbox_key(&r1).queue(), b.inbox_key(&r1).queue());
        assert_ne!(a.request_write_key(&r1, 0), a.request_write_key(&r1, 1));
        assert_ne!(
            a.request_read_key(&r1, 0).queue(),
            a.inbox_key(&r1).queue(),
            "requests are read apart from the inbox"
        );
        assert_ne!(
            a.request_read_key(&r1, 0).queue(),
            a.request_read_key(&r1, 1).queue()
        );
        assert_ne!(a.request_write_key(&r1, 0), a.request_write_key(&r2, 0));
        assert_ne!(
            a.inbox_key(&r1).0,
            a.request_write_key(&r1, 0).0,
            "the card's write key does not read the queue"
        );
        let peer = a.peer_id().to_bytes();
        let q = a.inbox_key(&r1).queue().0;
        assert!(!q.windows(8).any(|w| peer.windows(8).any(|p| p == w)));
    }

    #[test]
    fn known_answer_derivations() {
        let (a, b, r1, _) = ids();
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(&a.inbox_key(&r1).queue().0),
            "a17c1553d9084466806198d38e8cd7294d36b4b89b10630354730268054125ab"
        );
        assert_eq!(
            hex(&a.request_write_key(&r1, 0).id().0),
            "87e0331c37a7d8154ee1c3908e19169c6e3fa75257b5e00145f93448eaed326a"
        );
        assert_eq!(
            hex(&a.grant_for(&b.public(), &r1).id().0),
            "7d5aa5278e57b2be2409fd6a06ce7dcf9263cc30ad3a9da0fc310b10bcc9e9e3"
        );
        let (read, write) = a.drill_keys(&r1);
        assert_eq!(
            hex(&read.queue().0),
            "4c496887c583e1c3d54f49238db8f210b78aa389785a292dd96d4140f31a4335"
        );
        assert_eq!(
            hex(&write.id().0),
            "511edb965624d6718b193a50cc081ea0040cc3f15710520e0df620621335fcfe"
        );
        assert_ne!(read.queue(), a.inbox_key(&r1).queue(), "a queue of its own");
    }
}
