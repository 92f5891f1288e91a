//! Identities: who a user is, and the keys other people need to reach them.
//!
//! A user is named by an Ed25519 key (the libp2p keypair; its [`PeerId`] is the user's
//! id on the network). End-to-end sessions use a separate X25519 static key, bound to the
//! identity by an Ed25519 signature over the X25519 public key, so a contact who trusts
//! the identity key also trusts the session key. The other direction (the holder of the
//! X25519 key names its identity key) is carried inside the session handshake: every
//! first message carries the sender's card, and only the holder of the X25519 secret can
//! produce a first message under that key (see `session`).
//!
//! Every signature made with an identity key names what it is for: the signed bytes are
//! `u8 len(label) ‖ label ‖ message` ([`Identity::sign`]), so a signature made for one
//! purpose can never be read as one made for another.
//!
//! Each device of an account has a key of its own: an Ed25519 key that is its transport
//! identity on the network (its libp2p keypair, [`Identity::transport_keypair`]), whose
//! Montgomery form is its X25519 session key. Anyone who knows a device's session key
//! (from a card or a device set) so knows the peer id it listens and dials as
//! ([`transport_peer`]), and nothing else need be published for it.

use libp2p_identity::{Keypair, PeerId, PublicKey, ed25519};
use rand_core::{CryptoRng, RngCore};
use thiserror::Error;
use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use crate::codec::{DecodeError, Reader, Writer};

/// Label of the signature binding the X25519 key to the identity.
const BINDING_LABEL: &str = "kkachi/x25519-binding/v2";
/// Version byte of the secret identity encoding.
const SECRET_VERSION: u8 = 2;
/// Label of the hash that makes a device's Ed25519 seed from its stored secret.
const DEVICE_SEED_LABEL: &str = "kkachi/device-seed/v1";
/// Seeds tried for a device key whose public key has sign bit 0 (each has one chance in
/// two; 64 failures in a row do not happen).
const DEVICE_SEED_TRIES: u8 = 64;
/// Length of [`Identity::to_secret_bytes`].
pub const SECRET_LEN: usize = 1 + 32 + 32;
/// Length of an encoded [`PublicIdentity`].
pub const PUBLIC_LEN: usize = 32 + 32 + 64;

/// Errors about identities.
#[derive(Debug, Error)]
pub enum IdentityError {
    /// The bytes are not a valid encoding.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The X25519 key is not signed by the identity key.
    #[error("the session key is not signed by the identity key")]
    BadBinding,
    /// The Ed25519 key bytes are not a valid key.
    #[error("invalid identity key")]
    BadKey,
    /// No device key comes from the stored device secret.
    #[error("the stored device secret gives no device key")]
    NoDeviceKey,
}

/// A user's own secret keys. Never leaves the device.
#[derive(Clone)]
pub struct Identity {
    keypair: ed25519::Keypair,
    /// The device's key: its transport identity, and its session key in Montgomery form.
    device: ed25519::Keypair,
    /// What the device key is made from (kept as stored).
    device_secret: Zeroizing<[u8; 32]>,
    x25519: StaticSecret,
}

/// The device key made from `device_secret`: the first Ed25519 seed
/// `H("kkachi/device-seed/v1", device_secret, u8 i)` whose public key has sign bit 0 (so
/// the X25519 key names exactly one Ed25519 key), with its X25519 secret (the Ed25519
/// secret scalar, whose public key is the Montgomery form of the Ed25519 one).
fn device_key(device_secret: &[u8; 32]) -> Option<(ed25519::Keypair, StaticSecret)> {
    (0..DEVICE_SEED_TRIES).find_map(|i| {
        let seed = Zeroizing::new(crate::codec::hash(
            DEVICE_SEED_LABEL,
            &[device_secret, &[i]],
        ));
        let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
        if signing.verifying_key().as_bytes()[31] & 0x80 != 0 {
            return None;
        }
        let scalar = Zeroizing::new(signing.to_scalar_bytes());
        let mut seed = seed;
        let secret = ed25519::SecretKey::try_from_bytes(seed.as_mut())
            .expect("any 32 bytes are an Ed25519 secret key");
        Some((ed25519::Keypair::from(secret), StaticSecret::from(*scalar)))
    })
}

/// The peer id a device with X25519 session key `x25519` has on the network: the
/// Ed25519 key of sign bit 0 whose Montgomery form it is. `None` for a key that is no
/// point of the curve (no device has it).
pub fn transport_peer(x25519: &[u8; 32]) -> Option<PeerId> {
    let point = curve25519_dalek::montgomery::MontgomeryPoint(*x25519).to_edwards(0)?;
    let key = ed25519::PublicKey::try_from_bytes(point.compress().as_bytes()).ok()?;
    Some(PeerId::from_public_key(&PublicKey::from(key)))
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh identity from the operating system's random source.
    pub fn generate() -> Self {
        Self::generate_with(&mut rand_core::OsRng)
    }

    /// A fresh identity from the given random source (deterministic in tests).
    pub fn generate_with<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut ed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(ed.as_mut());
        let secret = ed25519::SecretKey::try_from_bytes(ed.as_mut())
            .expect("any 32 bytes are an Ed25519 secret key");
        Self::with_device(ed25519::Keypair::from(secret), rng)
    }

    /// `keypair` with a fresh device key from `rng`.
    fn with_device<R: RngCore + CryptoRng>(keypair: ed25519::Keypair, rng: &mut R) -> Self {
        loop {
            let mut device_secret = Zeroizing::new([0u8; 32]);
            rng.fill_bytes(device_secret.as_mut());
            if let Ok(id) = Self::from_parts(keypair.clone(), device_secret) {
                return id;
            }
        }
    }

    fn from_parts(
        keypair: ed25519::Keypair,
        device_secret: Zeroizing<[u8; 32]>,
    ) -> Result<Self, IdentityError> {
        let (device, x25519) = device_key(&device_secret).ok_or(IdentityError::NoDeviceKey)?;
        Ok(Self {
            keypair,
            device,
            device_secret,
            x25519,
        })
    }

    /// The account's identity key as a libp2p keypair (what signs for the account).
    pub fn keypair(&self) -> Keypair {
        Keypair::from(self.keypair.clone())
    }

    /// This device's transport identity on the network: the key whose Montgomery form is
    /// its session key, so its peer id is [`transport_peer`] of [`Identity::x25519_public`].
    pub fn transport_keypair(&self) -> Keypair {
        Keypair::from(self.device.clone())
    }

    /// The user's id on the network.
    pub fn peer_id(&self) -> PeerId {
        PeerId::from_public_key(&PublicKey::from(self.keypair.public()))
    }

    /// The public half, with the signature binding the X25519 key.
    pub fn public(&self) -> PublicIdentity {
        let x25519 = self.x25519_public();
        let sig = self.sign(BINDING_LABEL, &x25519);
        PublicIdentity {
            ed25519: self.keypair.public().to_bytes(),
            x25519,
            binding: sig,
        }
    }

    /// A public identity pairing this identity key with another X25519 key, bound by
    /// this key's signature: what anyone can make from someone else's public card, and
    /// what the protocol must see through (tests only).
    pub(crate) fn public_with_foreign_x25519(&self, x25519: [u8; 32]) -> PublicIdentity {
        PublicIdentity {
            ed25519: self.keypair.public().to_bytes(),
            x25519,
            binding: self.sign(BINDING_LABEL, &x25519),
        }
    }

    /// The X25519 public key used in end-to-end sessions.
    pub fn x25519_public(&self) -> [u8; 32] {
        x25519_dalek::PublicKey::from(&self.x25519).to_bytes()
    }

    /// The same identity key with a fresh X25519 session key (a key rotation, SPEC.md
    /// §1): every queue and capability derived from the session key changes with it.
    pub fn with_new_session_key<R: RngCore + CryptoRng>(&self, rng: &mut R) -> Self {
        Self::with_device(self.keypair.clone(), rng)
    }

    /// Whether `other` is the same identity key (whatever its session key).
    pub fn same_identity_key(&self, other: &Identity) -> bool {
        self.keypair.public() == other.keypair.public()
    }

    /// A secret only this identity derives, for the purpose `context` names (a
    /// `kkachi/…/vN` string): BLAKE3 derive_key(context, Ed25519 secret), the same
    /// whatever the session key.
    pub(crate) fn derived_secret(&self, context: &str) -> Zeroizing<[u8; 32]> {
        let ed = self.keypair.secret();
        Zeroizing::new(blake3::derive_key(context, ed.as_ref()))
    }

    /// The X25519 secret key used in end-to-end sessions.
    pub(crate) fn x25519_secret(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.x25519.to_bytes())
    }

    /// An Ed25519 signature over `msg` for the purpose named by `label` (a
    /// `kkachi/…/vN` string of at most 255 bytes): the signed bytes are
    /// `u8 len(label) ‖ label ‖ msg`.
    pub fn sign(&self, label: &str, msg: &[u8]) -> [u8; 64] {
        let sig = self.keypair.sign(&labelled(label, msg));
        let mut out = [0u8; 64];
        out.copy_from_slice(&sig);
        out
    }

    /// Serialises the secret keys for the local store. Layout: version (1) = 2 ‖ Ed25519
    /// secret (32) ‖ device secret (32), from which the device key is made.
    pub fn to_secret_bytes(&self) -> Zeroizing<Vec<u8>> {
        let ed_secret = self.keypair.secret();
        let mut w = Writer::with_capacity(SECRET_LEN);
        w.u8(SECRET_VERSION)
            .raw(ed_secret.as_ref())
            .raw(self.device_secret.as_slice());
        Zeroizing::new(w.finish())
    }

    /// Reads what [`Identity::to_secret_bytes`] wrote.
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self, IdentityError> {
        let mut r = Reader::new(bytes);
        let version = r.u8("identity version")?;
        if version != SECRET_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "identity",
                version,
            }
            .into());
        }
        let mut ed = Zeroizing::new(r.array::<32>("ed25519 secret")?);
        let device = Zeroizing::new(r.array::<32>("device secret")?);
        r.finish()?;
        let secret = ed25519::SecretKey::try_from_bytes(ed.as_mut())
            .expect("any 32 bytes are an Ed25519 secret key");
        Self::from_parts(ed25519::Keypair::from(secret), device)
    }
}

/// The bytes a signature for `label` covers.
/// Checks a labelled signature (see [`Identity::sign`]) against a raw Ed25519 public key
/// that need not belong to a [`PublicIdentity`] (a group member named by its key alone).
pub(crate) fn verify_raw(key: &[u8; 32], label: &str, msg: &[u8], sig: &[u8; 64]) -> bool {
    ed25519::PublicKey::try_from_bytes(key).is_ok_and(|k| k.verify(&labelled(label, msg), sig))
}

fn labelled(label: &str, msg: &[u8]) -> Vec<u8> {
    let label = label.as_bytes();
    assert!(label.len() <= 255, "signature labels are short constants");
    let mut out = Vec::with_capacity(1 + label.len() + msg.len());
    out.push(label.len() as u8);
    out.extend_from_slice(label);
    out.extend_from_slice(msg);
    out
}

/// What others know of a user: the identity key, the session key and the signature
/// that binds them. Construct only through [`PublicIdentity::decode`] or
/// [`Identity::public`], both of which guarantee the binding verifies.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicIdentity {
    ed25519: [u8; 32],
    x25519: [u8; 32],
    binding: [u8; 64],
}

impl std::fmt::Debug for PublicIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicIdentity")
            .field("peer_id", &self.peer_id())
            .finish()
    }
}

impl PublicIdentity {
    /// The user's id on the network.
    pub fn peer_id(&self) -> PeerId {
        PeerId::from_public_key(&PublicKey::from(self.ed25519_key()))
    }

    /// The raw Ed25519 public key.
    pub fn ed25519(&self) -> &[u8; 32] {
        &self.ed25519
    }

    /// The X25519 public key used in end-to-end sessions.
    pub fn x25519(&self) -> &[u8; 32] {
        &self.x25519
    }

    /// The peer id of the device this identity's session key names ([`transport_peer`]).
    pub fn transport_peer(&self) -> Option<PeerId> {
        transport_peer(&self.x25519)
    }

    fn ed25519_key(&self) -> ed25519::PublicKey {
        ed25519::PublicKey::try_from_bytes(&self.ed25519)
            .expect("validated when the PublicIdentity was built")
    }

    /// Checks an Ed25519 signature made by this identity with [`Identity::sign`] for
    /// the purpose `label`.
    pub fn verify(&self, label: &str, msg: &[u8], sig: &[u8; 64]) -> bool {
        self.ed25519_key().verify(&labelled(label, msg), sig)
    }

    pub(crate) fn write(&self, w: &mut Writer) {
        w.raw(&self.ed25519).raw(&self.x25519).raw(&self.binding);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, IdentityError> {
        let ed25519 = r.array::<32>("ed25519 public key")?;
        let x25519 = r.array::<32>("x25519 public key")?;
        let binding = r.array::<64>("key binding signature")?;
        let key =
            ed25519::PublicKey::try_from_bytes(&ed25519).map_err(|_| IdentityError::BadKey)?;
        if !key.verify(&labelled(BINDING_LABEL, &x25519), &binding) {
            return Err(IdentityError::BadBinding);
        }
        Ok(Self {
            ed25519,
            x25519,
            binding,
        })
    }

    /// The 128-byte encoding: Ed25519 key ‖ X25519 key ‖ binding signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(PUBLIC_LEN);
        self.write(&mut w);
        w.finish()
    }

    /// Decodes and verifies the binding signature.
    pub fn decode(bytes: &[u8]) -> Result<Self, IdentityError> {
        let mut r = Reader::new(bytes);
        let id = Self::read(&mut r)?;
        r.finish()?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng;

    #[test]
    fn secret_bytes_round_trip() {
        let id = Identity::generate_with(&mut test_rng(1));
        let bytes = id.to_secret_bytes();
        assert_eq!(bytes.len(), SECRET_LEN);
        let back = Identity::from_secret_bytes(&bytes).unwrap();
        assert_eq!(back.peer_id(), id.peer_id());
        assert_eq!(back.x25519_public(), id.x25519_public());
    }

    #[test]
    fn public_identity_round_trips_and_verifies() {
        let id = Identity::generate();
        let public = id.public();
        let back = PublicIdentity::decode(&public.encode()).unwrap();
        assert_eq!(back, public);
        assert_eq!(back.peer_id(), id.peer_id());
        let sig = id.sign("kkachi/test/v1", b"hello");
        assert!(back.verify("kkachi/test/v1", b"hello", &sig));
        assert!(!back.verify("kkachi/test/v1", b"hellp", &sig));
        // The same bytes signed for another purpose do not verify for this one, nor
        // does moving bytes between label and message.
        assert!(!back.verify("kkachi/test/v2", b"hello", &sig));
        assert!(!back.verify("kkachi/test/v1h", b"ello", &sig));
    }

    #[test]
    fn swapped_session_key_is_rejected() {
        let alice = Identity::generate_with(&mut test_rng(2));
        let mallory = Identity::generate_with(&mut test_rng(3));
        let mut bytes = alice.public().encode();
        bytes[32..64].copy_from_slice(&mallory.x25519_public());
        assert!(matches!(
            PublicIdentity::decode(&bytes),
            Err(IdentityError::BadBinding)
        ));
    }

    #[test]
    fn unknown_secret_version_is_rejected() {
        let id = Identity::generate_with(&mut test_rng(4));
        let mut bytes = id.to_secret_bytes().to_vec();
        bytes[0] = 9;
        assert!(matches!(
            Identity::from_secret_bytes(&bytes),
            Err(IdentityError::Decode(DecodeError::UnsupportedVersion {
                version: 9,
                ..
            }))
        ));
        assert!(Identity::from_secret_bytes(&bytes[..10]).is_err());
    }

    #[test]
    fn known_answer_peer_id() {
        // Fixed secret bytes -> fixed PeerId and X25519 key: catches silent drift in
        // how identities are derived from stored secrets.
        let mut secret = vec![SECRET_VERSION];
        secret.extend_from_slice(&[7u8; 32]);
        secret.extend_from_slice(&[9u8; 32]);
        let id = Identity::from_secret_bytes(&secret).unwrap();
        assert_eq!(
            id.peer_id().to_base58(),
            "12D3KooWRawPbxPtP1eZaJpumGnyWX2DcUyd3RQnydr3eAto4Az7"
        );
        assert_eq!(
            hex::encode(id.x25519_public()),
            "5945e9bb8c4a819e6354e95e58425d9bbb08ec358367f8a98d04ed6c0223e428"
        );
        assert_eq!(
            id.transport_keypair().public().to_peer_id().to_base58(),
            "12D3KooWC79ck26Lob8yW29o3TqR7SEFqQzd7ctA14guFCuTiepk"
        );
    }

    #[test]
    fn a_device_key_is_its_transport_identity_and_anyone_finds_one_from_the_other() {
        let mut rng = test_rng(5);
        for _ in 0..64 {
            let id = Identity::generate_with(&mut rng);
            let transport = id.transport_keypair().public().to_peer_id();
            // Its session key names its transport identity, for anyone holding its card.
            assert_eq!(transport_peer(&id.x25519_public()), Some(transport));
            assert_eq!(id.public().transport_peer(), Some(transport));
            assert_ne!(transport, id.peer_id(), "the account key is not a device's");
            // The X25519 secret agrees with the public key others see.
            let other = Identity::generate_with(&mut rng);
            let a = x25519_dalek::StaticSecret::from(*id.x25519_secret())
                .diffie_hellman(&x25519_dalek::PublicKey::from(other.x25519_public()));
            let b = x25519_dalek::StaticSecret::from(*other.x25519_secret())
                .diffie_hellman(&x25519_dalek::PublicKey::from(id.x25519_public()));
            assert_eq!(a.as_bytes(), b.as_bytes());
            // A new session key is a new device key, under the same account.
            let rotated = id.with_new_session_key(&mut rng);
            assert_eq!(rotated.peer_id(), id.peer_id());
            let moved = rotated.transport_keypair().public().to_peer_id();
            assert_ne!(moved, transport);
            assert_eq!(transport_peer(&rotated.x25519_public()), Some(moved));
            // And it survives the store.
            let back = Identity::from_secret_bytes(&rotated.to_secret_bytes()).unwrap();
            assert_eq!(back.transport_keypair().public().to_peer_id(), moved);
        }
        // A key off the curve names no device.
        let twist = (0u8..=255)
            .map(|b| [b; 32])
            .find(|x| transport_peer(x).is_none());
        assert!(twist.is_some(), "some u-coordinate is on the twist");
    }
}
