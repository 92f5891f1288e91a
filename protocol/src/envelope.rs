//! Envelopes: all a relay ever sees of a message.
//!
//! An envelope is an expiry and an opaque sealed payload (an end-to-end encrypted
//! packet, see [`crate::session`]); the queue it goes into travels beside it in a put
//! ([`crate::wire`]), so nothing in it names a recipient. Its id is a hash of its
//! encoding, computed by whoever holds it and never trusted from the wire, so the same
//! envelope delivered through three relays deduplicates to one.

use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer, hash};

/// Version byte of the envelope encoding.
pub const ENVELOPE_VERSION: u8 = 2;
/// Largest sealed payload, in bytes.
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024;
/// Fixed part of an encoded envelope: version, expiry, payload length.
pub const ENVELOPE_HEADER_LEN: usize = 1 + 8 + 4;
/// Largest encoded envelope.
pub const MAX_ENVELOPE_LEN: usize = ENVELOPE_HEADER_LEN + MAX_PAYLOAD_LEN;
/// Lifetime clients give envelopes unless configured otherwise: 14 days.
pub const DEFAULT_TTL_SECS: u64 = 14 * 24 * 3600;
/// Longest lifetime a relay must accept: 30 days.
pub const MAX_TTL_SECS: u64 = 30 * 24 * 3600;
/// Clock difference tolerated between a sender and a relay.
pub const CLOCK_SKEW_SECS: u64 = 300;

/// A 32-byte envelope id: BLAKE2s of the envelope's encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EnvelopeId(pub [u8; 32]);

impl EnvelopeId {
    /// The id of the envelope whose encoding ([`Envelope::encode`]) is `bytes`, without
    /// decoding it.
    pub fn of_encoding(bytes: &[u8]) -> Self {
        Self(hash("kkachi/envelope/v2", &[bytes]))
    }
}

impl std::fmt::Debug for EnvelopeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EnvelopeId({})", short_hex(&self.0))
    }
}

impl std::fmt::Display for EnvelopeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&short_hex(&self.0))
    }
}

pub(crate) fn short_hex(bytes: &[u8]) -> String {
    bytes[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a relay (or client) refuses an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EnvelopeError {
    /// The bytes are not an envelope.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The payload is empty.
    #[error("envelope payload is empty")]
    Empty,
    /// The payload exceeds the limit.
    #[error("envelope payload is {len} bytes; the limit is {max}")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// The limit applied.
        max: usize,
    },
    /// The envelope has expired.
    #[error("envelope expired at {expires_at} (now {now})")]
    Expired {
        /// Its expiry.
        expires_at: u64,
        /// The time of the check.
        now: u64,
    },
    /// The expiry is further ahead than the relay keeps anything.
    #[error("envelope expiry {expires_at} is more than {max_ttl} s ahead of {now}")]
    ExpiryTooFar {
        /// Its expiry.
        expires_at: u64,
        /// The time of the check.
        now: u64,
        /// The longest lifetime accepted.
        max_ttl: u64,
    },
}

/// An envelope as stored and forwarded by relays.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unix time (seconds) after which relays drop it.
    pub expires_at: u64,
    /// The sealed end-to-end packet.
    pub payload: Vec<u8>,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("expires_at", &self.expires_at)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl Envelope {
    /// The encoded length.
    pub fn encoded_len(&self) -> usize {
        ENVELOPE_HEADER_LEN + self.payload.len()
    }

    /// The envelope id: BLAKE2s over the encoding.
    pub fn id(&self) -> EnvelopeId {
        EnvelopeId::of_encoding(&self.encode())
    }

    pub(crate) fn write(&self, w: &mut Writer) {
        w.u8(ENVELOPE_VERSION)
            .u64(self.expires_at)
            .bytes32(&self.payload);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let version = r.u8("envelope version")?;
        if version != ENVELOPE_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "envelope",
                version,
            });
        }
        let expires_at = r.u64("expiry")?;
        let payload = r.bytes32(MAX_PAYLOAD_LEN, "payload")?.to_vec();
        Ok(Self {
            expires_at,
            payload,
        })
    }

    /// The binary encoding (see SPEC.md, "Envelope").
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(self.encoded_len());
        self.write(&mut w);
        w.finish()
    }

    /// Decodes one envelope occupying all of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let mut r = Reader::new(bytes);
        let env = Self::read(&mut r)?;
        r.finish()?;
        Ok(env)
    }

    /// Checks size and lifetime limits at time `now` (Unix seconds). `max_payload` lets
    /// a relay configure a limit below [`MAX_PAYLOAD_LEN`]; `max_ttl` is the longest
    /// lifetime it keeps anything.
    pub fn validate(
        &self,
        now: u64,
        max_payload: usize,
        max_ttl: u64,
    ) -> Result<(), EnvelopeError> {
        if self.payload.is_empty() {
            return Err(EnvelopeError::Empty);
        }
        let max = max_payload.min(MAX_PAYLOAD_LEN);
        if self.payload.len() > max {
            return Err(EnvelopeError::TooLarge {
                len: self.payload.len(),
                max,
            });
        }
        if self.expires_at <= now {
            return Err(EnvelopeError::Expired {
                expires_at: self.expires_at,
                now,
            });
        }
        if self.expires_at > now.saturating_add(max_ttl).saturating_add(CLOCK_SKEW_SECS) {
            return Err(EnvelopeError::ExpiryTooFar {
                expires_at: self.expires_at,
                now,
                max_ttl,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn env(payload: Vec<u8>, expires_at: u64) -> Envelope {
        Envelope {
            expires_at,
            payload,
        }
    }

    proptest! {
        #[test]
        fn round_trip(expires_at in any::<u64>(),
                      payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let e = Envelope { expires_at, payload };
            let bytes = e.encode();
            prop_assert_eq!(bytes.len(), e.encoded_len());
            prop_assert_eq!(Envelope::decode(&bytes).unwrap(), e);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Envelope::decode(&bytes);
        }
    }

    #[test]
    fn id_is_stable_and_sensitive() {
        let a = env(b"hello".to_vec(), 100);
        assert_eq!(a.id(), a.clone().id());
        assert_eq!(EnvelopeId::of_encoding(&a.encode()), a.id());
        assert_ne!(a.id(), env(b"hellp".to_vec(), 100).id());
        assert_ne!(a.id(), env(b"hello".to_vec(), 101).id());
    }

    #[test]
    fn known_answer_encoding() {
        let e = env(vec![0xAA, 0xBB], 0x0102030405060708);
        let hex = hex::encode(e.encode());
        assert_eq!(hex, concat!("02", "0102030405060708", "00000002", "aabb"));
        assert_eq!(
            hex::encode(e.id().0),
            "6cdf43bdca1caa476fd4ec6567e3f1ac84417e850cebd5d63098385fca02273a",
            "envelope id derivation changed"
        );
    }

    #[test]
    fn validation_limits() {
        let now = 1_000_000;
        assert_eq!(
            env(vec![], now + 10).validate(now, MAX_PAYLOAD_LEN, MAX_TTL_SECS),
            Err(EnvelopeError::Empty)
        );
        assert!(matches!(
            env(vec![1; 101], now + 10).validate(now, 100, MAX_TTL_SECS),
            Err(EnvelopeError::TooLarge { len: 101, max: 100 })
        ));
        assert!(matches!(
            env(vec![1], now).validate(now, 100, MAX_TTL_SECS),
            Err(EnvelopeError::Expired { .. })
        ));
        assert!(matches!(
            env(vec![1], now + 3600 + CLOCK_SKEW_SECS + 1).validate(now, 100, 3600),
            Err(EnvelopeError::ExpiryTooFar { .. })
        ));
        assert_eq!(env(vec![1], now + 3600).validate(now, 100, 3600), Ok(()));
        assert_eq!(
            env(vec![1], u64::MAX).validate(u64::MAX - 1, 100, u64::MAX),
            Ok(())
        );
    }

    #[test]
    fn oversized_and_hostile_inputs_are_typed_errors() {
        // Length prefix of 1 GiB.
        let mut bytes = env(vec![1], 5).encode();
        bytes[9..13].copy_from_slice(&(1u32 << 30).to_be_bytes());
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(EnvelopeError::Decode(DecodeError::TooLong { .. }))
        ));
        let mut bytes = env(vec![1], 5).encode();
        bytes[0] = 1;
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(EnvelopeError::Decode(DecodeError::UnsupportedVersion {
                version: 1,
                ..
            }))
        ));
        let mut bytes = env(vec![1], 5).encode();
        bytes.push(0);
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(EnvelopeError::Decode(DecodeError::TrailingBytes(1)))
        ));
    }
}
