//! kkachi-protocol: everything two kkachi programs must agree on, as pure functions.
//!
//! This crate does no I/O: no sockets, no files, no clock reads, no threads. Time is a
//! parameter (`now`, Unix seconds) and randomness a `rand_core` source where the caller
//! may want to fix it. That keeps every state machine deterministic under test.
//!
//! The map (SPEC.md is the normative description of every byte):
//!
//! - [`identity`]: a user's Ed25519 identity (its libp2p [`PeerId`](libp2p_identity::PeerId)
//!   names the user) and the X25519 session key bound to it by a signature.
//! - [`card`]: signed contact cards and their one-line invite codes (`kk1…`).
//! - [`envelope`]: the only thing a relay sees: mailbox, expiry, opaque sealed payload;
//!   its id is a hash, so copies through several relays deduplicate.
//! - [`session`]: end-to-end encryption between two users over Noise IK, tolerant of
//!   duplication, reordering, loss and restarts.
//! - [`content`]: what a session carries: message id, sequence and hash chain, body.
//! - [`device`]: the devices of one account, a set every device edits and all agree on.
//! - [`wire`]: the client↔relay protocol, `/kkachi/relay/2`: requests and answers over
//!   one long-lived stream.
//! - [`bundle`]: sealed envelopes and where they go, in a file carried on a drive.
//! - [`link`]: the one-time code that links a device, and the channel it opens.
//!
//! Sending a text, end to end: build a [`Content`], encode it, [`Session::seal`] it for
//! the contact, wrap the packet in an [`Envelope`] for the contact's [`MailboxId`], and
//! `Put` it to each of the contact's relays. Receiving runs the same steps backwards:
//! [`session::open`], then [`Session::accept_init`] or [`Session::open_transport`], then
//! [`Content::decode`].

pub mod bundle;
pub mod card;
mod codec;
pub mod content;
pub mod device;
pub mod envelope;
pub mod file;
#[doc(hidden)]
pub mod fuzzing;
pub mod group;
pub mod identity;
pub mod lan;
pub mod link;
pub mod queue;
pub mod session;
pub mod wire;

pub use card::{Card, CardError};
pub use codec::DecodeError;
pub use content::{Body, Content, ContentError, MessageId, ReceiptStatus};
pub use envelope::{Envelope, EnvelopeError, EnvelopeId};
pub use identity::{Identity, IdentityError, PublicIdentity};
pub use queue::{GroupKey, QueueId, QueueKind, ReadKey, WriteId, WriteKey};
pub use session::{Incoming, Opened, Session, SessionError};
pub use wire::{ClientToRelay, ErrorCode, PutOutcome, RelayInfo, RelayToClient, StoredEnvelope};

/// Re-exported so users of this crate name the same identity types as libp2p.
pub use libp2p_identity::{self, PeerId};
/// Re-exported so users of this crate name the same multiaddr type.
pub use multiaddr::{self, Multiaddr};

/// An identity from a fixed secret, the same in every run (tests): Ed25519 seed 32 bytes
/// of `n`, device secret 32 bytes of `n + 100`, as the known-answer scripts take them.
#[cfg(test)]
pub(crate) fn test_person(n: u8) -> Identity {
    let mut secret = vec![2u8];
    secret.extend_from_slice(&[n; 32]);
    secret.extend_from_slice(&[n.wrapping_add(100); 32]);
    Identity::from_secret_bytes(&secret).expect("a valid fixed identity")
}

/// A deterministic RNG for tests (ChaCha-free: a simple counter fed through BLAKE2s).
#[cfg(test)]
pub(crate) fn test_rng(seed: u64) -> TestRng {
    TestRng { seed, counter: 0 }
}

/// Deterministic randomness for tests only.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct TestRng {
    seed: u64,
    counter: u64,
}

#[cfg(test)]
impl rand_core::RngCore for TestRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(32) {
            let block = codec::hash(
                "test-rng",
                &[&self.seed.to_le_bytes(), &self.counter.to_le_bytes()],
            );
            self.counter += 1;
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

#[cfg(test)]
impl rand_core::CryptoRng for TestRng {}
