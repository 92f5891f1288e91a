//! Contact cards and invite codes.
//!
//! A [`Card`] says how to reach a user: display name, keys and inbox relays, with a
//! version counter and an Ed25519 signature by the user's identity key. The invite code
//! is the card as one line of text: `kk1` followed by base58 of the card bytes and a
//! four-byte BLAKE2s checksum, so a mistyped or truncated code is caught before the
//! signature is even checked. A card with a higher version from the same identity
//! replaces an older one; clients send new cards in-band when relays change.

use multiaddr::{Multiaddr, Protocol};
use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer, hash};
use crate::identity::{Identity, IdentityError, PublicIdentity};

/// Prefix of every invite code; the `1` is the format version.
pub const INVITE_PREFIX: &str = "kk1";
/// Version byte of the card encoding.
pub const CARD_VERSION: u8 = 1;
/// Longest display name, in UTF-8 bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Most inbox relays a card may list.
pub const MAX_RELAYS: usize = 8;
/// Longest encoded relay multiaddr, in bytes.
pub const MAX_ADDR_LEN: usize = 256;
/// Longest encoded card: version, identity, counter, name, relays, signature.
pub const MAX_CARD_LEN: usize = 1
    + crate::identity::PUBLIC_LEN
    + 8
    + 1
    + MAX_NAME_LEN
    + 1
    + MAX_RELAYS * (2 + MAX_ADDR_LEN)
    + 64;
/// Longest invite code accepted, in characters; checked before decoding.
pub const MAX_INVITE_LEN: usize = INVITE_PREFIX.len() + (MAX_CARD_LEN + CHECKSUM_LEN) * 14 / 10 + 8;
const CHECKSUM_LEN: usize = 4;
const SIGNATURE_CONTEXT: &str = "kkachi/card/v1";

/// Why a card or invite code was refused. Each message says what a person can do.
#[derive(Debug, Error)]
pub enum CardError {
    /// The text does not start with `kk1`.
    #[error("not a kkachi invite code (it should start with \"{INVITE_PREFIX}\")")]
    BadPrefix,
    /// The text is far longer than any valid invite.
    #[error("invite code is too long ({0} characters); check that only one code was pasted")]
    TooLong(usize),
    /// The text contains characters outside base58.
    #[error("invite code contains characters that cannot appear in one; it may have been mistyped")]
    BadCharacters,
    /// The checksum does not match: a typo or a truncated copy.
    #[error("invite code checksum does not match; it was probably mistyped or cut short")]
    BadChecksum,
    /// The bytes do not form a card.
    #[error("invite code is malformed: {0}")]
    Decode(#[from] DecodeError),
    /// The keys inside are invalid.
    #[error("invite code carries invalid keys: {0}")]
    Identity(#[from] IdentityError),
    /// The signature does not verify: the card was altered.
    #[error("invite code signature is invalid; the card was altered")]
    BadSignature,
    /// A field is out of range.
    #[error("invalid card: {0}")]
    Invalid(&'static str),
}

/// A signed contact card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    identity: PublicIdentity,
    version: u64,
    name: String,
    relays: Vec<Multiaddr>,
    signature: [u8; 64],
}

impl Card {
    /// Creates and signs a card for `identity`.
    pub fn new(
        identity: &Identity,
        name: &str,
        relays: Vec<Multiaddr>,
        version: u64,
    ) -> Result<Self, CardError> {
        check_name(name)?;
        check_relays(&relays)?;
        let mut card = Self {
            identity: identity.public(),
            version,
            name: name.to_owned(),
            relays,
            signature: [0; 64],
        };
        card.signature = identity.sign(&card.signed_message());
        Ok(card)
    }

    /// The card owner's public keys.
    pub fn identity(&self) -> &PublicIdentity {
        &self.identity
    }

    /// The version counter: higher replaces lower.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The display name the owner chose.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The owner's inbox relays, each ending in `/p2p/<relay peer id>`.
    pub fn relays(&self) -> &[Multiaddr] {
        &self.relays
    }

    /// True if `self` is a newer card of the same identity than `other`.
    pub fn supersedes(&self, other: &Card) -> bool {
        self.identity == other.identity && self.version > other.version
    }

    fn write_unsigned(&self, w: &mut Writer) {
        w.u8(CARD_VERSION);
        self.identity.write(w);
        w.u64(self.version)
            .bytes8(self.name.as_bytes())
            .u8(self.relays.len() as u8);
        for addr in &self.relays {
            w.bytes16(&addr.to_vec());
        }
    }

    fn signed_message(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(MAX_CARD_LEN);
        self.write_unsigned(&mut w);
        let body = w.finish();
        hash(SIGNATURE_CONTEXT, &[&body]).to_vec()
    }

    /// The binary encoding (see SPEC.md, "Card").
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(MAX_CARD_LEN);
        self.write_unsigned(&mut w);
        w.raw(&self.signature);
        w.finish()
    }

    /// Decodes and verifies a card: keys, binding, field limits and signature.
    pub fn decode(bytes: &[u8]) -> Result<Self, CardError> {
        if bytes.len() > MAX_CARD_LEN {
            return Err(DecodeError::TooLong {
                field: "card",
                len: bytes.len() as u64,
                max: MAX_CARD_LEN as u64,
            }
            .into());
        }
        let mut r = Reader::new(bytes);
        let version = r.u8("card version")?;
        if version != CARD_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "card",
                version,
            }
            .into());
        }
        let identity = PublicIdentity::read(&mut r)?;
        let card_version = r.u64("card counter")?;
        let name = r.str8(MAX_NAME_LEN, "display name")?.to_owned();
        let count = usize::from(r.u8("relay count")?);
        if count > MAX_RELAYS {
            return Err(DecodeError::TooLong {
                field: "relays",
                len: count as u64,
                max: MAX_RELAYS as u64,
            }
            .into());
        }
        let mut relays = Vec::with_capacity(count);
        for _ in 0..count {
            let raw = r.bytes16(MAX_ADDR_LEN, "relay address")?;
            let addr = Multiaddr::try_from(raw.to_vec()).map_err(|_| DecodeError::Invalid {
                field: "relay address",
                reason: "not a multiaddr",
            })?;
            relays.push(addr);
        }
        let signature = r.array::<64>("card signature")?;
        r.finish()?;
        check_name(&name)?;
        check_relays(&relays)?;
        let card = Self {
            identity,
            version: card_version,
            name,
            relays,
            signature,
        };
        if !card
            .identity
            .verify(&card.signed_message(), &card.signature)
        {
            return Err(CardError::BadSignature);
        }
        Ok(card)
    }

    /// The one-line invite code: `kk1` ‖ base58(card ‖ checksum).
    pub fn to_invite(&self) -> String {
        let mut bytes = self.encode();
        let sum = hash("kkachi/invite-checksum/v1", &[&bytes]);
        bytes.extend_from_slice(&sum[..CHECKSUM_LEN]);
        format!("{INVITE_PREFIX}{}", bs58::encode(bytes).into_string())
    }

    /// Parses an invite code. Surrounding whitespace is ignored.
    pub fn from_invite(code: &str) -> Result<Self, CardError> {
        let code = code.trim();
        if code.len() > MAX_INVITE_LEN {
            return Err(CardError::TooLong(code.len()));
        }
        let body = code
            .strip_prefix(INVITE_PREFIX)
            .ok_or(CardError::BadPrefix)?;
        let bytes = bs58::decode(body)
            .into_vec()
            .map_err(|_| CardError::BadCharacters)?;
        if bytes.len() < CHECKSUM_LEN {
            return Err(CardError::BadChecksum);
        }
        let (card, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if hash("kkachi/invite-checksum/v1", &[card])[..CHECKSUM_LEN] != *sum {
            return Err(CardError::BadChecksum);
        }
        Self::decode(card)
    }
}

fn check_name(name: &str) -> Result<(), CardError> {
    if name.trim().is_empty() {
        return Err(CardError::Invalid("the display name is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(CardError::Invalid(
            "the display name is longer than 64 bytes",
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(CardError::Invalid(
            "the display name contains control characters",
        ));
    }
    Ok(())
}

fn check_relays(relays: &[Multiaddr]) -> Result<(), CardError> {
    if relays.len() > MAX_RELAYS {
        return Err(CardError::Invalid("a card lists at most 8 relays"));
    }
    for addr in relays {
        if addr.to_vec().len() > MAX_ADDR_LEN {
            return Err(CardError::Invalid(
                "a relay address is longer than 256 bytes",
            ));
        }
        if !matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
            return Err(CardError::Invalid(
                "a relay address must end with /p2p/<peer id>",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng;

    fn relay_addr(port: u16, seed: u8) -> Multiaddr {
        let peer = Identity::generate_with(&mut test_rng(u64::from(seed) + 1000)).peer_id();
        format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}")
            .parse()
            .unwrap()
    }

    fn sample(version: u64) -> (Identity, Card) {
        let id = Identity::generate_with(&mut test_rng(42));
        let relays = vec![relay_addr(4001, 1), relay_addr(4002, 2)];
        let card = Card::new(&id, "Jiwoo 지우", relays, version).unwrap();
        (id, card)
    }

    #[test]
    fn invite_round_trip() {
        let (id, card) = sample(3);
        let code = card.to_invite();
        assert!(code.starts_with("kk1"));
        assert!(!code.contains(char::is_whitespace));
        let back = Card::from_invite(&format!("  {code}\n")).unwrap();
        assert_eq!(back, card);
        assert_eq!(back.identity().peer_id(), id.peer_id());
        assert_eq!(back.name(), "Jiwoo 지우");
        assert_eq!(back.relays().len(), 2);
    }

    #[test]
    fn newer_card_supersedes_older() {
        let (id, old) = sample(1);
        let new = Card::new(&id, "Jiwoo", vec![relay_addr(5000, 3)], 2).unwrap();
        assert!(new.supersedes(&old));
        assert!(!old.supersedes(&new));
        assert!(!old.supersedes(&old));
        let (_, other) = (0, Card::new(&Identity::generate(), "X", vec![], 9).unwrap());
        assert!(
            !other.supersedes(&old),
            "a different identity never supersedes"
        );
    }

    #[test]
    fn every_single_character_typo_is_caught() {
        let (_, card) = sample(1);
        let code = card.to_invite();
        let alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
        for (i, c) in code.char_indices().skip(3).step_by(7) {
            let replacement = alphabet.chars().find(|&a| a != c).unwrap();
            let mut typo = code.clone();
            typo.replace_range(i..i + 1, &replacement.to_string());
            assert!(Card::from_invite(&typo).is_err(), "typo at {i} accepted");
        }
    }

    #[test]
    fn truncated_and_foreign_codes_get_clear_errors() {
        let (_, card) = sample(1);
        let code = card.to_invite();
        assert!(matches!(
            Card::from_invite(&code[..code.len() - 5]),
            Err(CardError::BadChecksum | CardError::Decode(_))
        ));
        assert!(matches!(
            Card::from_invite("hello"),
            Err(CardError::BadPrefix)
        ));
        assert!(matches!(
            Card::from_invite("kk10OIl"),
            Err(CardError::BadCharacters)
        ));
        let long = format!("kk1{}", "2".repeat(MAX_INVITE_LEN));
        assert!(matches!(
            Card::from_invite(&long),
            Err(CardError::TooLong(_))
        ));
    }

    #[test]
    fn altered_card_with_valid_checksum_fails_signature() {
        let (_, card) = sample(1);
        let mut bytes = card.encode();
        // Bump the version counter (bytes 129..137) without re-signing.
        bytes[136] ^= 1;
        assert!(matches!(Card::decode(&bytes), Err(CardError::BadSignature)));
    }

    #[test]
    fn relay_without_peer_id_is_refused() {
        let id = Identity::generate_with(&mut test_rng(5));
        let bare: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        assert!(matches!(
            Card::new(&id, "A", vec![bare], 1),
            Err(CardError::Invalid(_))
        ));
        assert!(Card::new(&id, "", vec![], 1).is_err());
        assert!(Card::new(&id, "a\u{7}b", vec![], 1).is_err());
        assert!(Card::new(&id, &"x".repeat(65), vec![], 1).is_err());
        let too_many = (0..9).map(|i| relay_addr(4000 + i, i as u8)).collect();
        assert!(Card::new(&id, "A", too_many, 1).is_err());
    }

    #[test]
    fn max_invite_len_covers_the_largest_card() {
        let id = Identity::generate_with(&mut test_rng(6));
        let peer = id.peer_id();
        // The longest realistic addresses: dns names near the limit.
        let host = "r".repeat(180);
        let relays = (0..MAX_RELAYS)
            .map(|i| {
                format!("/dns4/{host}/tcp/{}/p2p/{peer}", 4000 + i)
                    .parse()
                    .unwrap()
            })
            .collect();
        let card = Card::new(&id, &"n".repeat(MAX_NAME_LEN), relays, u64::MAX).unwrap();
        let code = card.to_invite();
        assert!(
            code.len() <= MAX_INVITE_LEN,
            "{} > {}",
            code.len(),
            MAX_INVITE_LEN
        );
        assert_eq!(Card::from_invite(&code).unwrap(), card);
    }
}
