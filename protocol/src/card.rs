//! Contact cards and invite codes.
//!
//! A [`Card`] says how to reach a user: display name, keys and inbox relays, with a
//! version counter and an Ed25519 signature by the user's identity key. The invite code
//! is the card as one line of text: `kk1` followed by base58 of the card bytes and a
//! four-byte BLAKE2s checksum, so a mistyped or truncated code is caught before the
//! signature is even checked. A card with a higher version from the same identity
//! replaces an older one; clients send new cards in-band when relays change.

use libp2p_identity::PeerId;
use multiaddr::{Multiaddr, Protocol};
use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer, hash};
use crate::identity::{Identity, IdentityError, PublicIdentity};
use crate::queue::WriteKey;

/// Prefix of every invite code; the `1` is the format version.
pub const INVITE_PREFIX: &str = "kk1";
/// Version byte of the card encoding.
pub const CARD_VERSION: u8 = 4;
/// How long a card (and the invite code made from it) is valid. When it runs out, its
/// owner's client makes a new one with a new request epoch, so the codes given out
/// before stop reaching it; nobody adds a contact from an expired card, and nobody takes
/// a message request sealed after the card in it expired.
pub const CARD_LIFETIME_SECS: u64 = 180 * 24 * 3600;
/// Longest display name, in characters (Unicode scalar values): 64 characters of any
/// script, so a name of 21 Hangul syllables fits even when typed decomposed.
pub const MAX_NAME_CHARS: usize = 64;
/// Longest display name, in UTF-8 bytes (what its one-byte length prefix can hold).
pub const MAX_NAME_LEN: usize = 255;
/// Most inbox relays a card may list.
pub const MAX_RELAYS: usize = 8;
/// Longest encoded relay multiaddr, in bytes.
pub const MAX_ADDR_LEN: usize = 256;
/// Longest encoded card: version, identity, counter, expiry, name, relays with their
/// contact-request write keys, signature.
pub const MAX_CARD_LEN: usize = 1
    + crate::identity::PUBLIC_LEN
    + 8
    + 8
    + 1
    + MAX_NAME_LEN
    + 1
    + MAX_RELAYS * (2 + MAX_ADDR_LEN + 32)
    + 64;
/// Longest invite code accepted, in characters; checked before decoding.
pub const MAX_INVITE_LEN: usize = INVITE_PREFIX.len() + (MAX_CARD_LEN + CHECKSUM_LEN) * 14 / 10 + 8;
const CHECKSUM_LEN: usize = 4;
/// Label of a card's signature ([`Identity::sign`]).
const SIGNATURE_LABEL: &str = "kkachi/card/v4";

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
    /// The display name breaks the rules of [`check_name`].
    #[error(transparent)]
    Name(#[from] NameError),
    /// The card ran out: its owner has made a new one since.
    #[error("this invite code expired {0}; ask for a new one")]
    Expired(String),
}

/// Why a display name was refused. Names are shown to other people, so they may not
/// hide characters or change how the text around them is drawn.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// Empty, or only spaces.
    #[error("the name is empty")]
    Empty,
    /// Starts or ends with a space.
    #[error("the name starts or ends with a space")]
    Padded,
    /// More than [`MAX_NAME_CHARS`] characters or [`MAX_NAME_LEN`] bytes.
    #[error("the name is {0} characters long; the limit is 64")]
    TooLong(usize),
    /// A control character (line breaks, escape sequences, ...).
    #[error("the name contains a control character (U+{0:04X})")]
    Control(u32),
    /// A character that is invisible or changes the direction of the text around it,
    /// which would let one name pass for another.
    #[error("the name contains an invisible or text-direction character (U+{0:04X})")]
    Invisible(u32),
    /// Begins with a tilde (or a character that looks like one): clients mark names
    /// nobody vouched for that way, so such a name could pass for one marked.
    #[error(
        "the name begins with a tilde (U+{0:04X}), which marks names of people who are not contacts"
    )]
    Tilde(u32),
}

/// Characters that look like a tilde, which may not begin a name.
const TILDES: [char; 6] = [
    '~', '\u{02DC}', '\u{2053}', '\u{223C}', '\u{301C}', '\u{FF5E}',
];

/// True for characters a name may not contain although they are not control
/// characters: they are invisible or reorder the text around them, so a name holding
/// them can look like another (bidirectional overrides, zero-width characters, Hangul
/// fillers, tag characters, ...).
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'                      // soft hyphen
            | '\u{034F}'                // combining grapheme joiner
            | '\u{061C}'                // Arabic letter mark
            | '\u{115F}' | '\u{1160}'    // Hangul choseong / jungseong fillers
            | '\u{17B4}' | '\u{17B5}'
            | '\u{180B}'..='\u{180F}'    // Mongolian selectors and vowel separator
            | '\u{200B}'..='\u{200F}'    // zero-width space, joiners, LRM, RLM
            | '\u{2028}'..='\u{202E}'    // line/paragraph separators, bidi embeddings
            | '\u{2060}'..='\u{206F}'    // word joiner, invisible operators, bidi isolates
            | '\u{3164}'                // Hangul filler
            | '\u{FE00}'..='\u{FE0F}'    // variation selectors
            | '\u{FEFF}'                // zero-width no-break space
            | '\u{FFA0}'                // halfwidth Hangul filler
            | '\u{FFF9}'..='\u{FFFB}'    // interlinear annotation
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}' // tags and variation selectors supplement
    )
}

/// [`check_name`], for a name a client makes (its user's, or one it gives a contact):
/// it may not begin with a tilde or a look-alike either. Cards and operations that
/// carry one are still valid (SPEC §2): only making one is refused.
pub fn check_new_name(name: &str) -> Result<(), NameError> {
    check_name(name)?;
    match name.chars().next().filter(|c| TILDES.contains(c)) {
        Some(c) => Err(NameError::Tilde(c.into())),
        None => Ok(()),
    }
}

/// Checks a display name: not blank, no leading or trailing space, at most
/// [`MAX_NAME_CHARS`] characters, no control, invisible or text-direction characters.
/// Cards are checked with it, and clients check the names users give contacts.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(NameError::Control(c.into()));
    }
    if let Some(c) = name.chars().find(|c| is_invisible(*c)) {
        return Err(NameError::Invisible(c.into()));
    }
    if name.trim().is_empty() {
        return Err(NameError::Empty);
    }
    if name.trim() != name {
        return Err(NameError::Padded);
    }
    let chars = name.chars().count();
    if chars > MAX_NAME_CHARS || name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(chars));
    }
    Ok(())
}

/// A signed contact card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    identity: PublicIdentity,
    version: u64,
    /// Unix seconds after which nobody should add its owner from it.
    expires_at: u64,
    name: String,
    relays: Vec<Multiaddr>,
    /// The write key of the owner's contact-request queue on each relay, in order.
    requests: Vec<WriteKey>,
    signature: [u8; 64],
}

impl Card {
    /// Creates and signs a card for `identity`, with request queues of epoch 0, that
    /// never expires (tests; clients use [`Card::new_at_epoch`]).
    pub fn new(
        identity: &Identity,
        name: &str,
        relays: Vec<Multiaddr>,
        version: u64,
    ) -> Result<Self, CardError> {
        Self::new_at_epoch(identity, name, relays, version, 0, u64::MAX)
    }

    /// Creates and signs a card whose request queues are those of `epoch`: cards of an
    /// earlier epoch (and the invite codes made from them) reach nobody once the owner
    /// stops reading those queues.
    /// It expires at `expires_at` (Unix seconds).
    pub fn new_at_epoch(
        identity: &Identity,
        name: &str,
        relays: Vec<Multiaddr>,
        version: u64,
        epoch: u32,
        expires_at: u64,
    ) -> Result<Self, CardError> {
        Self::signed_at(
            identity.public(),
            identity,
            (name, relays),
            version,
            epoch,
            expires_at,
        )
    }

    /// A card for `public`, signed by `signer`. Only tests build one where the two
    /// differ: a forged card, which every decoder must refuse or see through.
    pub(crate) fn signed(
        public: PublicIdentity,
        signer: &Identity,
        name: &str,
        relays: Vec<Multiaddr>,
        version: u64,
    ) -> Result<Self, CardError> {
        Self::signed_at(public, signer, (name, relays), version, 0, u64::MAX)
    }

    fn signed_at(
        public: PublicIdentity,
        signer: &Identity,
        (name, relays): (&str, Vec<Multiaddr>),
        version: u64,
        epoch: u32,
        expires_at: u64,
    ) -> Result<Self, CardError> {
        check_new_name(name)?;
        check_relays(&relays)?;
        let requests = relays
            .iter()
            .map(|addr| signer.request_write_key(&relay_peer(addr), epoch))
            .collect();
        let mut card = Self {
            identity: public,
            version,
            expires_at,
            name: name.to_owned(),
            relays,
            requests,
            signature: [0; 64],
        };
        card.signature = signer.sign(SIGNATURE_LABEL, &card.unsigned());
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

    /// When the card runs out (Unix seconds; `u64::MAX`: never).
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// Whether the card has run out at `now` (Unix seconds): a client adds nobody from
    /// an expired card ([`Card::check_fresh`]).
    pub fn is_expired(&self, now: u64) -> bool {
        now >= self.expires_at
    }

    /// [`CardError::Expired`] if the card has run out at `now`, naming how long ago.
    pub fn check_fresh(&self, now: u64) -> Result<(), CardError> {
        if !self.is_expired(now) {
            return Ok(());
        }
        let days = (now - self.expires_at) / 86_400;
        Err(CardError::Expired(match days {
            0 => "today".to_owned(),
            1 => "yesterday".to_owned(),
            d => format!("{d} days ago"),
        }))
    }

    /// The display name the owner chose.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The owner's inbox relays, each ending in `/p2p/<relay peer id>`.
    pub fn relays(&self) -> &[Multiaddr] {
        &self.relays
    }

    /// The write key of the owner's contact-request queue at `relays()[i]`.
    pub fn request_key(&self, i: usize) -> Option<&WriteKey> {
        self.requests.get(i)
    }

    /// The request queue's write key at the relay `relay` (its peer id), if listed.
    pub fn request_key_at(&self, relay: &PeerId) -> Option<&WriteKey> {
        self.relays
            .iter()
            .position(|a| relay_peer(a) == *relay)
            .and_then(|i| self.requests.get(i))
    }

    /// True if `self` is a newer card of the same identity than `other`.
    pub fn supersedes(&self, other: &Card) -> bool {
        self.identity == other.identity && self.version > other.version
    }

    /// True if `self` is a newer card of the same identity key as `other` that binds
    /// another session key: its owner rotated it (SPEC.md §2). Only a first message
    /// sealed with the new key, which proves its sender holds it, may carry it in.
    pub fn rotates(&self, other: &Card) -> bool {
        self.identity.ed25519() == other.identity.ed25519()
            && self.identity.x25519() != other.identity.x25519()
            && self.version > other.version
    }

    fn write_unsigned(&self, w: &mut Writer) {
        w.u8(CARD_VERSION);
        self.identity.write(w);
        w.u64(self.version)
            .u64(self.expires_at)
            .bytes8(self.name.as_bytes())
            .u8(self.relays.len() as u8);
        for (addr, key) in self.relays.iter().zip(&self.requests) {
            w.bytes16(&addr.to_vec()).raw(&key.0);
        }
    }

    fn unsigned(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(MAX_CARD_LEN);
        self.write_unsigned(&mut w);
        w.finish()
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
        let expires_at = r.u64("card expiry")?;
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
        let mut requests = Vec::with_capacity(count);
        for _ in 0..count {
            let raw = r.bytes16(MAX_ADDR_LEN, "relay address")?;
            let addr = Multiaddr::try_from(raw.to_vec()).map_err(|_| DecodeError::Invalid {
                field: "relay address",
                reason: "not a multiaddr",
            })?;
            relays.push(addr);
            requests.push(WriteKey(r.array("request write key")?));
        }
        let signature = r.array::<64>("card signature")?;
        r.finish()?;
        check_name(&name)?;
        check_relays(&relays)?;
        let card = Self {
            identity,
            version: card_version,
            expires_at,
            name,
            relays,
            requests,
            signature,
        };
        if !card
            .identity
            .verify(SIGNATURE_LABEL, &card.unsigned(), &card.signature)
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

/// The peer id an address ends with (checked by [`check_relays`] for every card), or a
/// placeholder that names no relay.
fn relay_peer(addr: &Multiaddr) -> PeerId {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => peer,
        _ => PeerId::from_bytes(&[0, 0]).expect("the empty identity multihash"),
    }
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
    fn a_newer_card_with_another_session_key_rotates_and_nothing_else_does() {
        let (id, old) = sample(1);
        let rotated = id.with_new_session_key(&mut test_rng(7));
        let new = Card::new(&rotated, "Jiwoo", vec![relay_addr(5000, 3)], 2).unwrap();
        assert!(new.rotates(&old));
        assert!(
            !new.supersedes(&old),
            "a key change is never a plain update"
        );
        assert!(!old.rotates(&new), "an older card never rotates back");
        let same_key = Card::new(&id, "Jiwoo", vec![], 3).unwrap();
        assert!(!same_key.rotates(&old));
        let stranger = Card::new(
            &Identity::generate_with(&mut test_rng(11)),
            "Jiwoo",
            vec![],
            5,
        )
        .unwrap();
        assert!(
            !stranger.rotates(&old),
            "another identity key rotates nothing"
        );
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
    fn a_card_runs_out_at_its_signed_expiry() {
        let id = Identity::generate_with(&mut test_rng(43));
        let t = 1_800_000_000;
        let card = Card::new_at_epoch(&id, "Jiwoo", vec![relay_addr(4001, 1)], 2, 1, t).unwrap();
        let back = Card::from_invite(&card.to_invite()).unwrap();
        assert_eq!(back.expires_at(), t);
        assert!(back.check_fresh(t - 1).is_ok());
        for (now, words) in [
            (t, "today"),
            (t + 86_400, "yesterday"),
            (t + 3 * 86_400 + 5, "3 days ago"),
        ] {
            assert!(back.is_expired(now));
            let err = back.check_fresh(now).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("this invite code expired {words}; ask for a new one")
            );
        }
        // The expiry is signed: moving it (bytes 137..145) breaks the signature.
        let mut bytes = card.encode();
        bytes[137] ^= 0x80;
        assert!(matches!(Card::decode(&bytes), Err(CardError::BadSignature)));
        assert_eq!(
            Card::new(&id, "Jiwoo", vec![], 1).unwrap().expires_at(),
            u64::MAX,
            "test cards never run out"
        );
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
        // The longest name in bytes: 63 four-byte characters.
        let card = Card::new(&id, &"😀".repeat(MAX_NAME_LEN / 4), relays, u64::MAX).unwrap();
        let code = card.to_invite();
        assert!(
            code.len() <= MAX_INVITE_LEN,
            "{} > {}",
            code.len(),
            MAX_INVITE_LEN
        );
        assert_eq!(Card::from_invite(&code).unwrap(), card);
    }

    #[test]
    fn names_that_hide_or_reorder_text_are_refused() {
        // 21 Hangul syllables fit, composed or decomposed (what some keyboards send).
        let composed = "가나다라마바사아자차카타파하거너더러머버서";
        assert_eq!(composed.chars().count(), 21);
        assert_eq!(check_name(composed), Ok(()));
        let decomposed: String = composed
            .chars()
            .flat_map(|c| {
                // Unicode's Hangul decomposition: L, V (every syllable here has no T).
                let s = u32::from(c) - 0xAC00;
                [0x1100 + s / 588, 0x1161 + (s % 588) / 28].map(|u| char::from_u32(u).unwrap())
            })
            .collect();
        assert_eq!(decomposed.chars().count(), 42);
        assert_eq!(check_name(&decomposed), Ok(()));
        assert_eq!(check_name("Jiwoo 지우 🐦"), Ok(()));
        assert_eq!(check_name(&"가".repeat(64)), Ok(()));
        assert_eq!(check_name(&"가".repeat(65)), Err(NameError::TooLong(65)));
        assert_eq!(check_name("   "), Err(NameError::Empty));
        assert_eq!(check_name(" Alice"), Err(NameError::Padded));
        // A leading tilde (or a look-alike) would pass for the mark of a name nobody
        // vouched for; one inside a name is fine.
        assert_eq!(check_new_name("~Bob"), Err(NameError::Tilde(0x7E)));
        assert_eq!(check_new_name("\u{FF5E}Bob"), Err(NameError::Tilde(0xFF5E)));
        assert_eq!(check_new_name("Bob~"), Ok(()));
        // Made elsewhere, such a name still decodes: refusing it would lose the card.
        assert_eq!(check_name("~Bob"), Ok(()));
        assert_eq!(check_name("Al\x1b[2Jice"), Err(NameError::Control(0x1b)));
        assert_eq!(check_name("Alice\nBob"), Err(NameError::Control(0x0a)));
        assert_eq!(check_name("A\u{85}"), Err(NameError::Control(0x85)));
        // Lookalikes: a right-to-left override, zero-width joiners, a Hangul filler.
        assert_eq!(
            check_name("Ali\u{202E}ecb"),
            Err(NameError::Invisible(0x202E))
        );
        assert_eq!(
            check_name("Al\u{200B}ice"),
            Err(NameError::Invisible(0x200B))
        );
        assert_eq!(
            check_name("Alice\u{2066}"),
            Err(NameError::Invisible(0x2066))
        );
        assert_eq!(
            check_name("지\u{3164}우"),
            Err(NameError::Invisible(0x3164))
        );
        assert_eq!(
            check_name("Bob\u{E0041}"),
            Err(NameError::Invisible(0xE0041))
        );
        let id = Identity::generate_with(&mut test_rng(7));
        assert!(matches!(
            Card::new(&id, "Ali\u{202E}ecb", vec![], 1),
            Err(CardError::Name(NameError::Invisible(0x202E)))
        ));
    }

    #[test]
    fn a_card_signature_covers_only_cards() {
        // The card's signature is made for the card label: the same key's signature
        // over the same bytes for another purpose does not make a valid card.
        let (id, card) = sample(1);
        let mut bytes = card.encode();
        let unsigned = card.unsigned();
        let other_purpose = id.sign("kkachi/x25519-binding/v2", &unsigned);
        let n = bytes.len();
        bytes[n - 64..].copy_from_slice(&other_purpose);
        assert!(matches!(Card::decode(&bytes), Err(CardError::BadSignature)));
    }
}
