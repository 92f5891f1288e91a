//! Linking a device (SPEC.md §15.1): the one-time code a device shows, and the
//! encrypted channel over which it hands the account to the device that types it.
//!
//! The code carries a 16-byte secret, the addresses the showing device listens on, and
//! (for devices on different networks) a relay both can reach, where two queues named
//! by the secret carry the same messages.
//! Both ends make a pre-shared key of the secret and run Noise `NNpsk0`: whoever does
//! not hold the code cannot complete the handshake, cannot read what follows, and
//! cannot pass for either end, even on the same network. What goes over the channel
//! after that (the account's records, then a two-message commit) is the client's; this
//! module only gives the code, the handshake and the sealing of each message, and does
//! no I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use multiaddr::{Multiaddr, Protocol};
use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer, hash};
use crate::queue::{ReadKey, WriteKey};

/// What every link code starts with.
pub const LINK_PREFIX: &str = "kkd1";
/// Version byte of the code's contents.
pub const LINK_VERSION: u8 = 1;
/// Bytes of the code's secret.
pub const LINK_SECRET_LEN: usize = 16;
/// Places a code lists at most (addresses, and the relay).
pub const MAX_LINK_ADDRS: usize = 8;
/// The longest relay address in a code, in bytes (a multiaddr ending in `/p2p/`).
pub const MAX_LINK_RELAY_LEN: usize = 128;
/// Bytes of the stream id that tells relayed link messages of one joining device apart.
pub const LINK_STREAM_LEN: usize = 16;
/// The most bytes of the channel one relayed envelope carries: an envelope's largest
/// payload less the stream id and sequence number.
pub const MAX_LINK_RELAYED: usize = crate::envelope::MAX_PAYLOAD_LEN - LINK_STREAM_LEN - 4;
/// Address family of an IPv4 address in a code.
const FAMILY_V4: u8 = 4;
/// Address family of an IPv6 address in a code.
const FAMILY_V6: u8 = 6;
/// Address family of the relay in a code.
const FAMILY_RELAY: u8 = b'r';
/// The longest code accepted, in characters; checked before decoding.
pub const MAX_LINK_CODE_LEN: usize = LINK_PREFIX.len() + MAX_LINK_BYTES * 14 / 10 + 8;
/// The Noise protocol of the channel.
pub const LINK_NOISE: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// The channel's Noise prologue.
pub const LINK_PROLOGUE: &[u8] = b"kkachi/link/v1";
/// The longest message on the channel (a Noise message), in bytes.
pub const MAX_LINK_MESSAGE: usize = 65_535;
/// The most plaintext one channel message carries (a message less its tag).
pub const MAX_LINK_CHUNK: usize = MAX_LINK_MESSAGE - 16;
/// The length of the first handshake message: an ephemeral key, and the commitment to
/// the joining device's nonce under its tag. Anything else is refused before it is read.
pub const LINK_FIRST_LEN: usize = 32 + 32 + 16;
/// The length of the answer: an ephemeral key and the tag of an empty payload.
pub const LINK_ANSWER_LEN: usize = 32 + 16;
/// The joining device's nonce, committed to in the first message, revealed in the
/// hello.
const NONCE_LEN: usize = 16;
/// The first channel message, from the joining device: `0x00 ‖ nonce`, sealed.
const HELLO: u8 = 0;
/// The length of the sealed hello.
pub const LINK_HELLO_LEN: usize = 1 + NONCE_LEN + 16;
const CHECKSUM_LEN: usize = 4;
const MAX_LINK_BYTES: usize =
    1 + LINK_SECRET_LEN + 1 + MAX_LINK_ADDRS * 19 + 2 + MAX_LINK_RELAY_LEN + CHECKSUM_LEN;

/// Why a link code or the channel failed. Each message says what a person can do.
#[derive(Debug, Error)]
pub enum LinkError {
    /// The text does not start with `kkd1`.
    #[error(
        "not a device link code (it should start with \"{LINK_PREFIX}\"; `kkachi device link` on your other device shows one)"
    )]
    BadPrefix,
    /// An invite code (`kk1…`), not a link code.
    #[error(
        "that is an invite code, which adds a contact (`kkachi contact add`); a device link code starts with \"{LINK_PREFIX}\""
    )]
    InviteCode,
    /// Far longer than any code.
    #[error("the link code is too long ({0} characters); check that only one code was pasted")]
    TooLong(usize),
    /// Characters outside base58.
    #[error(
        "the link code contains characters that cannot appear in one; it may have been mistyped"
    )]
    BadCharacters,
    /// A typo or a code cut short.
    #[error("the link code's checksum does not match; it was probably mistyped or cut short")]
    BadChecksum,
    /// Made by a newer kkachi.
    #[error("the link code was made by a newer kkachi (version {0}): update kkachi on this device")]
    Newer(u8),
    /// The bytes do not form a code.
    #[error("the link code is malformed: {0}")]
    Decode(#[from] DecodeError),
    /// A code must list where to reach the device, and at most 8 places.
    #[error("a link code lists 1 to 8 places to reach the device; this one lists {0}")]
    Addresses(usize),
    /// A relay address that cannot be in a code.
    #[error(
        "the relay in a link code must be one address of at most {MAX_LINK_RELAY_LEN} bytes ending in /p2p/ and the relay's id"
    )]
    Relay,
    /// The other end does not hold the same code (or is not a kkachi device).
    #[error(
        "the other end does not hold this code: check it was typed as shown, and is the newest one"
    )]
    Handshake,
    /// A message on the channel does not open: altered, or out of order.
    #[error("a message from the other device does not open: the connection was tampered with")]
    Tampered,
    /// A message longer than a channel message may be.
    #[error("a message of {0} bytes is longer than the channel carries")]
    TooBig(usize),
}

/// A one-time link code: a secret, where the device that made it listens, and the
/// relay where it also waits, if any.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkCode {
    secret: [u8; LINK_SECRET_LEN],
    addrs: Vec<SocketAddr>,
    relay: Option<Multiaddr>,
}

/// The two relay queues of a code: the read and write keys of the queue to the old
/// device (which makes both queues and reads this one) and of the queue to the new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkQueues {
    /// What the new device sends: the old device reads it.
    pub to_old: (ReadKey, WriteKey),
    /// What the old device sends: the new device reads it.
    pub to_new: (ReadKey, WriteKey),
}

/// One message of the channel as a relay carries it, in an envelope's payload:
/// `stream(16) ‖ seq(4) ‖ bytes`. `stream` is the joining device's, drawn at random;
/// `seq` counts each direction's envelopes of one stream from 0; no bytes end the
/// stream (as closing a connection does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    /// The joining device's stream.
    pub stream: [u8; LINK_STREAM_LEN],
    /// The envelope's place in its direction of the stream.
    pub seq: u32,
    /// Bytes of the channel (its framed messages, cut anywhere), at most
    /// [`MAX_LINK_RELAYED`]; none: the sender ends the stream.
    pub bytes: Vec<u8>,
}

impl Relayed {
    /// The payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(LINK_STREAM_LEN + 4 + self.bytes.len());
        w.raw(&self.stream).u32(self.seq).raw(&self.bytes);
        w.finish()
    }

    /// Whether it ends its stream.
    pub fn is_end(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Reads a payload; one with too many bytes is refused.
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let stream = r.array::<LINK_STREAM_LEN>("stream")?;
        let seq = r.u32("sequence number")?;
        let bytes = r.rest();
        if bytes.len() > MAX_LINK_RELAYED {
            return Err(DecodeError::Invalid {
                field: "relayed bytes",
                reason: "longer than an envelope carries",
            });
        }
        Ok(Self {
            stream,
            seq,
            bytes: bytes.to_vec(),
        })
    }
}

impl std::fmt::Debug for LinkCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is the account: never in a log.
        f.debug_struct("LinkCode")
            .field("addrs", &self.addrs)
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

impl LinkCode {
    /// A code for `addrs` and `relay` (1 to [`MAX_LINK_ADDRS`] places in all) with a
    /// fresh secret from `rng`.
    pub fn generate(
        rng: &mut impl rand_core::CryptoRngCore,
        addrs: Vec<SocketAddr>,
        relay: Option<Multiaddr>,
    ) -> Result<Self, LinkError> {
        let mut secret = [0u8; LINK_SECRET_LEN];
        rng.fill_bytes(&mut secret);
        Self::new(secret, addrs, relay)
    }

    /// A code of this secret, these addresses and this relay.
    pub fn new(
        secret: [u8; LINK_SECRET_LEN],
        addrs: Vec<SocketAddr>,
        relay: Option<Multiaddr>,
    ) -> Result<Self, LinkError> {
        let places = addrs.len() + usize::from(relay.is_some());
        if places == 0 || places > MAX_LINK_ADDRS {
            return Err(LinkError::Addresses(places));
        }
        if let Some(relay) = &relay {
            check_relay(relay)?;
        }
        Ok(Self {
            secret,
            addrs,
            relay,
        })
    }

    /// Where the device that made it listens, in the order to try.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The same code (the same secret) with `relay` in place of the one it names.
    pub fn with_relay(&self, relay: Option<Multiaddr>) -> Result<Self, LinkError> {
        Self::new(self.secret, self.addrs.clone(), relay)
    }

    /// The relay where the device that made it also waits (after the addresses).
    pub fn relay(&self) -> Option<&Multiaddr> {
        self.relay.as_ref()
    }

    /// The keys of the code's two queues on its relay.
    pub fn queues(&self) -> LinkQueues {
        let key = |label: &str, to: u8| hash(label, &[&self.secret, &[to]]);
        let pair = |to: u8| {
            (
                ReadKey(key("kkachi/link-read/v1", to)),
                WriteKey(key("kkachi/link-write/v1", to)),
            )
        };
        LinkQueues {
            to_old: pair(0),
            to_new: pair(1),
        }
    }

    /// The code as one line: `kkd1` ‖ base58(contents ‖ checksum).
    pub fn encode(&self) -> String {
        let mut w = Writer::with_capacity(MAX_LINK_BYTES);
        w.u8(LINK_VERSION)
            .raw(&self.secret)
            .u8((self.addrs.len() + usize::from(self.relay.is_some())) as u8);
        for addr in &self.addrs {
            match addr.ip() {
                IpAddr::V4(ip) => w.u8(FAMILY_V4).raw(&ip.octets()),
                IpAddr::V6(ip) => w.u8(FAMILY_V6).raw(&ip.octets()),
            };
            w.u16(addr.port());
        }
        if let Some(relay) = &self.relay {
            w.u8(FAMILY_RELAY).bytes8(&relay.to_vec());
        }
        let mut bytes = w.finish();
        let sum = hash("kkachi/link-checksum/v1", &[&bytes]);
        bytes.extend_from_slice(&sum[..CHECKSUM_LEN]);
        format!("{LINK_PREFIX}{}", bs58::encode(bytes).into_string())
    }

    /// Reads a code as typed or pasted: whitespace anywhere is ignored (a code read out
    /// or copied across a line break).
    pub fn parse(text: &str) -> Result<Self, LinkError> {
        let text: String = text.split_whitespace().collect();
        let Some(body) = text.strip_prefix(LINK_PREFIX) else {
            return Err(if text.starts_with(crate::card::INVITE_PREFIX) {
                LinkError::InviteCode
            } else {
                LinkError::BadPrefix
            });
        };
        if text.len() > MAX_LINK_CODE_LEN {
            return Err(LinkError::TooLong(text.len()));
        }
        let bytes = bs58::decode(body)
            .into_vec()
            .map_err(|_| LinkError::BadCharacters)?;
        if bytes.len() < CHECKSUM_LEN {
            return Err(LinkError::BadChecksum);
        }
        let (contents, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if hash("kkachi/link-checksum/v1", &[contents])[..CHECKSUM_LEN] != *sum {
            return Err(LinkError::BadChecksum);
        }
        let mut r = Reader::new(contents);
        let version = r.u8("version")?;
        if version != LINK_VERSION {
            return Err(LinkError::Newer(version));
        }
        let secret = r.array::<LINK_SECRET_LEN>("secret")?;
        let count = usize::from(r.u8("address count")?);
        if count == 0 || count > MAX_LINK_ADDRS {
            return Err(LinkError::Addresses(count));
        }
        let mut addrs = Vec::with_capacity(count);
        let mut relay = None;
        for _ in 0..count {
            let ip = match r.u8("address family")? {
                FAMILY_V4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>("IPv4 address")?)),
                FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>("IPv6 address")?)),
                FAMILY_RELAY if relay.is_none() => {
                    let raw = r.bytes8(MAX_LINK_RELAY_LEN, "relay address")?;
                    relay = Some(Multiaddr::try_from(raw.to_vec()).map_err(|_| LinkError::Relay)?);
                    continue;
                }
                // One relay: the code names where the old device waits, not a list.
                FAMILY_RELAY => return Err(LinkError::Relay),
                tag => {
                    return Err(DecodeError::UnknownTag {
                        field: "address family",
                        tag: u64::from(tag),
                    }
                    .into());
                }
            };
            addrs.push(SocketAddr::new(ip, r.u16("port")?));
        }
        r.finish()?;
        Self::new(secret, addrs, relay)
    }

    /// The Noise pre-shared key both ends make of the secret.
    pub fn psk(&self) -> [u8; 32] {
        hash("kkachi/link-psk/v1", &[&self.secret])
    }

    /// A fresh handshake state under this code's key, for the joining device
    /// (`initiator`) or the linking one.
    fn state(&self, initiator: bool) -> snow::HandshakeState {
        // Never fails: the parameters are fixed and supported, the key 32 bytes.
        let psk = self.psk();
        let builder = snow::Builder::new(LINK_NOISE.parse().expect("valid Noise parameters"))
            .prologue(LINK_PROLOGUE)
            .and_then(|b| b.psk(0, &psk))
            .expect("a supported Noise pattern");
        if initiator {
            builder.build_initiator()
        } else {
            builder.build_responder()
        }
        .expect("a supported Noise pattern")
    }

    /// The joining device's end: its first handshake message, which commits to a
    /// random nonce (revealed in the hello, after the answer), and the state that reads
    /// the answer.
    pub fn join(&self, rng: &mut impl rand_core::CryptoRngCore) -> (Joining, Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let mut state = self.state(true);
        let mut msg = vec![0u8; LINK_FIRST_LEN];
        let n = state
            .write_message(&commitment(&nonce), &mut msg)
            .expect("the first message fits");
        msg.truncate(n);
        (Joining { state, nonce }, msg)
    }

    /// The linking device's end: reads the joining device's first message and answers
    /// it. A wrong code fails here, before anything is sent.
    pub fn answer(&self, first: &[u8]) -> Result<(Answered, Vec<u8>), LinkError> {
        if first.len() != LINK_FIRST_LEN {
            return Err(LinkError::Handshake);
        }
        let mut state = self.state(false);
        let mut payload = [0u8; LINK_FIRST_LEN];
        let n = state
            .read_message(first, &mut payload)
            .map_err(|_| LinkError::Handshake)?;
        let commit: [u8; 32] = payload[..n].try_into().map_err(|_| LinkError::Handshake)?;
        let mut msg = vec![0u8; LINK_ANSWER_LEN];
        let n = state
            .write_message(&[], &mut msg)
            .map_err(|_| LinkError::Handshake)?;
        msg.truncate(n);
        let handshake = handshake_hash(&state);
        let transport = state
            .into_transport_mode()
            .map_err(|_| LinkError::Handshake)?;
        Ok((
            Answered {
                transport,
                handshake,
                commit,
            },
            msg,
        ))
    }
}

/// Whether a code can name `relay`: an address of at most [`MAX_LINK_RELAY_LEN`] bytes
/// ending in `/p2p/` and the relay's id.
pub fn check_relay(relay: &Multiaddr) -> Result<(), LinkError> {
    if relay.to_vec().len() > MAX_LINK_RELAY_LEN
        || !matches!(relay.iter().last(), Some(Protocol::P2p(_)))
    {
        return Err(LinkError::Relay);
    }
    Ok(())
}

/// What the first message commits to.
fn commitment(nonce: &[u8; NONCE_LEN]) -> [u8; 32] {
    hash("kkachi/link-commit/v1", &[nonce])
}

fn handshake_hash(state: &snow::HandshakeState) -> [u8; 32] {
    let mut h = [0u8; 32];
    h.copy_from_slice(&state.get_handshake_hash()[..32]);
    h
}

/// The joining device's handshake, waiting for the answer.
pub struct Joining {
    state: snow::HandshakeState,
    nonce: [u8; NONCE_LEN],
}

impl std::fmt::Debug for Joining {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joining").finish_non_exhaustive()
    }
}

impl Joining {
    /// Reads the linking device's answer: the channel, if it holds the same code, and
    /// the hello to send at once (it reveals the nonce the first message committed to).
    pub fn finish(mut self, answer: &[u8]) -> Result<(Channel, Vec<u8>), LinkError> {
        if answer.len() != LINK_ANSWER_LEN {
            return Err(LinkError::Handshake);
        }
        let mut payload = [0u8; LINK_ANSWER_LEN];
        if self
            .state
            .read_message(answer, &mut payload)
            .map_err(|_| LinkError::Handshake)?
            != 0
        {
            return Err(LinkError::Handshake);
        }
        let handshake = handshake_hash(&self.state);
        let transport = self
            .state
            .into_transport_mode()
            .map_err(|_| LinkError::Handshake)?;
        let mut channel = Channel {
            transport,
            safety: safety_number(&handshake, &self.nonce),
        };
        let mut hello = vec![HELLO];
        hello.extend_from_slice(&self.nonce);
        let hello = channel.seal(&hello)?;
        Ok((channel, hello))
    }
}

/// The linking device's handshake, answered, waiting for the hello.
pub struct Answered {
    transport: snow::TransportState,
    handshake: [u8; 32],
    commit: [u8; 32],
}

impl std::fmt::Debug for Answered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answered").finish_non_exhaustive()
    }
}

impl Answered {
    /// Opens the joining device's hello: the channel, if it opens (only the one who
    /// made the first message can seal it: a first message recorded and sent again
    /// gets no further) and reveals the nonce the first message committed to.
    pub fn hello(self, sealed: &[u8]) -> Result<Channel, LinkError> {
        if sealed.len() != LINK_HELLO_LEN {
            return Err(LinkError::Handshake);
        }
        let mut channel = Channel {
            transport: self.transport,
            safety: 0,
        };
        let hello = channel.open(sealed).map_err(|_| LinkError::Handshake)?;
        let nonce: [u8; NONCE_LEN] = match hello.split_first() {
            Some((&HELLO, nonce)) => nonce.try_into().map_err(|_| LinkError::Handshake)?,
            _ => return Err(LinkError::Handshake),
        };
        if commitment(&nonce) != self.commit {
            return Err(LinkError::Handshake);
        }
        channel.safety = safety_number(&self.handshake, &nonce);
        Ok(channel)
    }
}

/// The channel once both ends proved they hold the code: each message sealed in
/// order, each opened only once and only in order.
pub struct Channel {
    transport: snow::TransportState,
    safety: u32,
}

/// The safety number of a handshake of hash `handshake` whose first message committed
/// to `nonce`: both ends of one handshake show the same. Anyone else's handshake with
/// either end shows another, but for one chance in 10^8: the joining device's nonce
/// is unknown to whoever answers it until the answer is sent, and the linking
/// device's answer unknown to whoever committed, so neither side of someone in the
/// middle can steer the number towards the other's.
fn safety_number(handshake: &[u8; 32], nonce: &[u8; NONCE_LEN]) -> u32 {
    let h = hash("kkachi/link-safety/v1", &[handshake, nonce]);
    u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % 100_000_000
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").finish_non_exhaustive()
    }
}

impl Channel {
    /// The handshake's safety number, as people compare it: two groups of four digits
    /// ("0412 7730").
    pub fn safety_number(&self) -> String {
        format!("{:04} {:04}", self.safety / 10_000, self.safety % 10_000)
    }

    /// Seals `plaintext` (at most [`MAX_LINK_CHUNK`] bytes) as the next message.
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, LinkError> {
        if plaintext.len() > MAX_LINK_CHUNK {
            return Err(LinkError::TooBig(plaintext.len()));
        }
        let mut msg = vec![0u8; plaintext.len() + 16];
        let n = self
            .transport
            .write_message(plaintext, &mut msg)
            .map_err(|_| LinkError::TooBig(plaintext.len()))?;
        msg.truncate(n);
        Ok(msg)
    }

    /// Opens the next message from the other end.
    pub fn open(&mut self, msg: &[u8]) -> Result<Vec<u8>, LinkError> {
        if msg.len() > MAX_LINK_MESSAGE {
            return Err(LinkError::TooBig(msg.len()));
        }
        let mut plaintext = vec![0u8; msg.len()];
        let n = self
            .transport
            .read_message(msg, &mut plaintext)
            .map_err(|_| LinkError::Tampered)?;
        plaintext.truncate(n);
        Ok(plaintext)
    }
}

#[cfg(test)]
mod tests;
