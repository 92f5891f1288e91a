//! End-to-end sessions between two users, built on Noise IK (snow).
//!
//! Messages reach a recipient through several relays and a direct path, so they arrive
//! duplicated, reordered, late or not at all, and the two sides are seldom online at the
//! same time. The construction (normative text in SPEC.md, "Sessions"):
//!
//! 1. **First messages.** With no session to send on, every message rides a fresh Noise
//!    `IK` message 1 (`Noise_IK_25519_ChaChaPoly_BLAKE2s`), which the recipient can open
//!    with nothing but its static key: no state to lose, any order works. It reveals the
//!    sender's static key to the recipient only, inside the encryption, and carries the
//!    sender's signed card, whose X25519 key must be that static key: the card's owner
//!    signed the key, and only the key's holder could have sealed the message, so the
//!    recipient knows the sender's identity both ways (and can hold a message from
//!    someone it has not added yet as a request). Each one is also an *offer* to start a
//!    session.
//! 2. **Answers.** The recipient answers an offer with IK message 2 (payload: the
//!    session's generation), attached to whatever it sends next (receipts included).
//!    The initiator, on reading it, holds the session; the responder holds it as soon as
//!    it wrote the answer but sends on it only once the initiator has used it
//!    (*confirmation*), since the initiator may never have read the answer.
//! 3. **Transport.** Keys come from Noise's `Split()` of the completed handshake.
//!    Each message is XChaCha20-Poly1305 with a random 24-byte nonce; an explicit counter
//!    inside the ciphertext feeds a replay bitmap covering the session's whole life. No
//!    session id travels in clear, so a relay cannot link two messages of a session.
//! 4. **Rekey.** After a day or 1024 messages the sender attaches an offer (IK message 1
//!    with an empty payload) to its transport messages; the answered handshake becomes
//!    the new session, and the old one turns receive-only: erased an hour after the
//!    peer first sent on its successor ([`RETIRED_GRACE_SECS`]; the sender seals again
//!    what the peer has not confirmed when it switches), at the latest once nothing
//!    sealed under it can still be in flight ([`RETAIN_SECS`]).
//! 5. **Choosing a session.** Sessions are ranked by (generation, "initiator has the
//!    lower static key"). Both sides switch to the highest-ranked session they both
//!    hold, so simultaneous offers converge on one session without coordination.
//! 6. **Lost state.** Each [`Session`] has a random instance id, sent with every offer
//!    and answer. A first message from a different instance than the one we share our
//!    current session with means the peer lost its state: we stop sealing on that
//!    session (the peer could not open it) and report [`Opened::peer_reset`], so the
//!    caller can re-seal what the peer has not acknowledged.
//!
//! All functions take `now` (Unix seconds) and return bytes; nothing here reads a clock
//! or touches the network.

mod packet;
mod persist;
mod rekey;
mod replay;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand_core::{CryptoRng, RngCore};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::card::{Card, CardError};
use crate::codec::DecodeError;
use crate::envelope::{CLOCK_SKEW_SECS, MAX_TTL_SECS};
use crate::identity::Identity;
use packet::{
    Answer, EPHEMERAL_LEN, HEADER_LEN, InitFrame, NONCE_LEN, Outer, TAG_LEN, TransportFrame, pad,
};
pub use packet::{MAX_SEALED_BODY, PACKET_VERSION, SESSION_TAG_LEN, SIZE_CLASSES};
use rekey::Proposal;
pub use replay::MAX_COUNTERS;

/// Most packets a caller may hand out sealed by a state it has not yet made durable
/// (SPEC 4.3): a state loaded at start-up skips this many counters and offer numbers
/// ([`Session::resume_after_restart`]), so none handed out before a crash repeats.
pub const MAX_UNSAVED_SEALS: u64 = 16;
use replay::{InitReplay, ReplayWindow, SeenInits};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE: &[u8] = b"kkachi/session/v4";
/// What IK message 1 adds around its payload: ephemeral key, encrypted static key and
/// its tag, and the payload's tag.
const IK_MSG1_OVERHEAD: usize = EPHEMERAL_LEN + 32 + TAG_LEN + TAG_LEN;
/// A sender offers a new session once its current one is this old...
pub const REKEY_AFTER_SECS: u64 = 24 * 3600;
/// ...or has sealed this many messages.
pub const REKEY_AFTER_MESSAGES: u64 = 1024;
/// How long a replaced session still opens late messages, and how long an unconfirmed
/// offer or a seen first message is remembered: the longest an envelope can live.
pub const RETAIN_SECS: u64 = MAX_TTL_SECS + CLOCK_SKEW_SECS;
/// How long a replaced session still opens packets once the peer has sent on the
/// session that replaced it. The peer seals nothing new on the old one after that; what
/// it sealed before and the recipient has not confirmed, a sender seals again under the
/// new session when it switches (the reference client does), so only copies already on
/// the way can still need the old keys.
pub const RETIRED_GRACE_SECS: u64 = 3600;
/// Unanswered handshakes kept in memory per contact (newest win).
pub const MAX_PENDING: usize = 8;
/// Answered-but-unconfirmed sessions kept per contact (newest win).
pub const MAX_OFFERED: usize = MAX_PENDING;
/// Receive-only sessions kept per contact (newest win).
pub const MAX_RETIRED: usize = 8;
/// Highest generation a first offer may propose to a state that holds no session. An
/// honest peer proposes one more than its current generation, which only grows by one
/// per rekey; this bound and [`MAX_GENERATION_STEP`] keep a hostile peer from driving
/// generations to `u32::MAX`, where no new session could outrank the current one and
/// rekeying would stop.
pub const MAX_FIRST_GENERATION: u32 = 1 << 20;
/// Most an offer may propose above the highest generation this state holds.
pub const MAX_GENERATION_STEP: u32 = 16;

/// Why a packet could not be sealed or opened.
#[derive(Debug, Error)]
pub enum SessionError {
    /// The packet or a frame inside it is malformed.
    #[error("malformed packet: {0}")]
    Decode(#[from] DecodeError),
    /// Decryption or the handshake failed: tampered, or not meant for us.
    #[error("packet failed authentication")]
    Crypto,
    /// Already received: a duplicate or a replay. Safe to ignore.
    #[error("duplicate or replayed packet")]
    Replay,
    /// A transport packet whose session tag does not name its counter.
    #[error("the packet's session tag does not match its counter")]
    BadTag,
    /// A first message older than anything that can still be in flight.
    #[error("first message is too old to accept")]
    TooOld,
    /// The packet came from someone other than this session's contact.
    #[error("packet is from a different sender than this session's contact")]
    WrongPeer,
    /// The body exceeds [`MAX_SEALED_BODY`].
    #[error("message body is {0} bytes; the limit is {MAX_SEALED_BODY}")]
    BodyTooLarge(usize),
    /// The card inside a first message does not decode or verify.
    #[error("the sender's card in a first message is invalid: {0}")]
    SenderCard(#[from] CardError),
    /// The card inside a first message binds another X25519 key than the one the
    /// message was sealed with: someone presents a card that is not theirs.
    #[error("the sender's card names another session key than the one it sealed with")]
    CardMismatch,
}

impl From<snow::Error> for SessionError {
    fn from(_: snow::Error) -> Self {
        SessionError::Crypto
    }
}

/// Order of sessions: higher wins. `initiator_lower` breaks ties between sessions of
/// one generation started by each side at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    generation: u32,
    initiator_lower: bool,
}

/// Transport keys and counters of one completed handshake.
#[derive(Debug, Clone)]
struct Established {
    /// The final handshake hash; a local name, never sent.
    id: [u8; 32],
    rank: Rank,
    /// The peer's [`Session`] instance that holds the other half.
    peer_instance: [u8; 8],
    send_key: Zeroizing<[u8; 32]>,
    recv_key: Zeroizing<[u8; 32]>,
    next_send: u64,
    window: ReplayWindow,
    created_at: u64,
    retired_at: Option<u64>,
    /// When the peer first sent on this session: from then on it seals nothing on the
    /// sessions this one replaced.
    first_received_at: Option<u64>,
}

impl Established {
    fn from_handshake(
        state: &mut snow::HandshakeState,
        rank: Rank,
        peer_instance: [u8; 8],
        now: u64,
    ) -> Self {
        let (k1, k2) = state.dangerously_get_raw_split();
        let (send, recv) = if state.is_initiator() {
            (k1, k2)
        } else {
            (k2, k1)
        };
        let mut id = [0u8; 32];
        id.copy_from_slice(&state.get_handshake_hash()[..32]);
        Self {
            id,
            rank,
            peer_instance,
            send_key: Zeroizing::new(send),
            recv_key: Zeroizing::new(recv),
            next_send: 0,
            window: ReplayWindow::new(),
            created_at: now,
            retired_at: None,
            first_received_at: None,
        }
    }

    fn usable_for_sending(&self) -> bool {
        self.next_send < MAX_COUNTERS
    }

    fn due_for_rekey(&self, now: u64) -> bool {
        self.next_send >= REKEY_AFTER_MESSAGES
            || now >= self.created_at.saturating_add(REKEY_AFTER_SECS)
    }

    fn try_decrypt(&self, packet: &Packet) -> Option<Vec<u8>> {
        let (nonce, ciphertext) = packet.rest.split_at(NONCE_LEN);
        XChaCha20Poly1305::new(Key::from_slice(self.recv_key.as_ref()))
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &transport_aad(&packet.lead),
                },
            )
            .ok()
    }

    /// The tags of the packets this session can still receive around the highest it
    /// received: the counters not yet received among the `window` below it (late ones)
    /// and the `window` above it. A counter further below was lost for good more often
    /// than not (a sender's crash skips some), and must not hold the window back.
    fn expected_tags(&self, window: u64, out: &mut Vec<SessionTag>) {
        let next = self.window.next_after_highest();
        let from = next.saturating_sub(window).max(self.window.lowest_unseen());
        let to = next.saturating_add(window).min(MAX_COUNTERS);
        out.extend(
            (from..to)
                .filter(|c| self.window.is_fresh(*c))
                .map(|c| session_tag(&self.recv_key, c)),
        );
    }
}

/// The first bytes of a transport packet, authenticated with it.
fn transport_aad(tag: &SessionTag) -> [u8; HEADER_LEN] {
    let mut aad = [0u8; HEADER_LEN];
    aad[0] = PACKET_VERSION;
    aad[1..].copy_from_slice(tag);
    aad
}

/// XORs a first message's ephemeral key with a mask only holders of the recipient's
/// card can compute, so that the key (a curve point, which random bytes mostly are
/// not) does not set first messages apart from transport packets. Its own inverse.
fn mask_ephemeral(msg1: &mut [u8], recipient: &[u8; 32], lead: &[u8; SESSION_TAG_LEN]) {
    let mask = crate::codec::hash("kkachi/first-mask/v4", &[recipient, lead]);
    for (b, m) in msg1.iter_mut().zip(mask.iter()) {
        *b ^= m;
    }
}

/// Names the session and counter of a transport packet to whoever holds its key, and
/// to nobody else: no two packets carry the same one.
pub type SessionTag = [u8; SESSION_TAG_LEN];

/// The tag of counter `counter` under `key` (the sender's send key, the receiver's
/// receive key).
fn session_tag(key: &[u8; 32], counter: u64) -> SessionTag {
    let h = crate::codec::hash("kkachi/session-tag/v4", &[key, &counter.to_be_bytes()]);
    h[..SESSION_TAG_LEN].try_into().expect("8 bytes")
}

/// A session we answered and can decrypt, waiting for the initiator to use it.
#[derive(Debug, Clone)]
struct Offered {
    reference: [u8; 16],
    /// The initiator's offer sequence number: the offers kept are the highest ones.
    seq: u64,
    answer: Vec<u8>,
    created_at: u64,
    session: Established,
}

/// A handshake we started and the peer has not answered yet. Held in memory only:
/// losing it (a restart) costs one more round trip, never a message.
#[derive(Debug)]
struct Pending {
    reference: [u8; 16],
    generation: u32,
    seq: u64,
    state: snow::HandshakeState,
    /// The offer bytes, for handshakes that ride transport messages (rekey).
    offer: Option<Vec<u8>>,
    created_at: u64,
}

/// A first message opened with our static key, not yet matched to a session.
#[derive(Debug)]
pub struct InitPacket {
    remote: [u8; 32],
    reference: [u8; 16],
    state: snow::HandshakeState,
    frame: InitFrame,
    card: Card,
}

impl InitPacket {
    /// The sender's X25519 static key, authenticated by the handshake.
    pub fn remote_static(&self) -> &[u8; 32] {
        &self.remote
    }

    /// The sender's card, verified and bound to [`InitPacket::remote_static`]: find the
    /// contact with this card's identity (both keys), then call
    /// [`Session::accept_init`]; from someone not yet a contact, the card says who asks.
    pub fn sender_card(&self) -> &Card {
        &self.card
    }

    /// The body, read without any session: for holding a message from someone who is
    /// not a contact yet. The packet itself can be opened again later (with the same
    /// static key) to accept it into a session.
    pub fn body(&self) -> &[u8] {
        &self.frame.body
    }

    /// The sender's clock when it sealed the packet, Unix seconds.
    pub fn sent_at(&self) -> u64 {
        self.frame.sent_at
    }
}

/// A sealed packet split at its header: look its lead up among the session tags
/// expected ([`Session::expected_tags`]) and open it with that session
/// ([`Session::open_transport`]); if no session expects it, it may be a first message
/// ([`open_first`]).
#[derive(Debug, Clone)]
pub struct Packet {
    lead: SessionTag,
    rest: Vec<u8>,
}

impl Packet {
    /// Its lead: the session tag of a transport packet (random bytes in a first message).
    pub fn tag(&self) -> &SessionTag {
        &self.lead
    }
}

/// Checks a sealed packet's version and length and splits it (no cryptography yet).
pub fn parse(sealed: &[u8]) -> Result<Packet, SessionError> {
    let outer = Outer::parse(sealed)?;
    Ok(Packet {
        lead: *outer.lead,
        rest: outer.rest.to_vec(),
    })
}

/// Opens `packet` as a first message to us: the responder side of the handshake with
/// our static key. [`SessionError::Crypto`] if it is not one (a transport packet, or
/// junk).
pub fn open_first(me: &Identity, packet: &Packet) -> Result<Box<InitPacket>, SessionError> {
    let mut msg1 = packet.rest.clone();
    mask_ephemeral(&mut msg1, &me.x25519_public(), &packet.lead);
    let secret = me.x25519_secret();
    let mut state = builder(&secret)?.build_responder()?;
    let mut payload = vec![0u8; msg1.len()];
    let n = state.read_message(&msg1, &mut payload)?;
    let frame = InitFrame::decode(&payload[..n])?;
    let remote = remote_static(&state)?;
    let card = Card::decode(&frame.card)?;
    if *card.identity().x25519() != remote {
        return Err(SessionError::CardMismatch);
    }
    Ok(Box::new(InitPacket {
        remote,
        reference: reference(&state),
        state,
        frame,
        card,
    }))
}

/// The two kinds of incoming packet.
#[derive(Debug)]
pub enum Incoming {
    /// A first message: the sender is known from the packet.
    Init(Box<InitPacket>),
    /// Not a first message to us: try [`Session::open_transport`] on each session.
    Transport(Packet),
}

/// A decrypted body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The plaintext body (a content record).
    pub body: Vec<u8>,
    /// The sender's clock when it sealed the packet, Unix seconds.
    pub sent_at: u64,
    /// The peer has lost its session state (for example a reinstall): anything sealed
    /// for it on the old session and not yet acknowledged should be sealed again.
    pub peer_reset: bool,
    /// Opening it changed the session we seal on (a rekey completed or was confirmed):
    /// the peer seals nothing more on the one replaced, which opens packets for
    /// [`RETIRED_GRACE_SECS`] more only. Anything sealed on it that the peer has not
    /// confirmed should be sealed again.
    pub switched: bool,
    /// A first message older than the floor of the seen-message cache (more than
    /// `SeenInits::CAPACITY` first messages came after it): it may be a late copy or a
    /// replay, so it changed no session state, but its body is returned so that a late
    /// message is not lost. The caller deduplicates it by message id like any other.
    pub late: bool,
}

/// Parses a sealed packet and tries it as a first message to us, else hands it back
/// for the sessions to try: the simple way in, for a recipient with few sessions. A
/// recipient with many first looks the packet's tag up ([`parse`], [`Packet::tag`]), so
/// that a transport packet costs no handshake.
pub fn open(me: &Identity, sealed: &[u8]) -> Result<Incoming, SessionError> {
    let packet = parse(sealed)?;
    match open_first(me, &packet) {
        Ok(init) => Ok(Incoming::Init(init)),
        Err(SessionError::Crypto) => Ok(Incoming::Transport(packet)),
        Err(e) => Err(e),
    }
}

fn builder(secret: &[u8; 32]) -> Result<snow::Builder<'_>, SessionError> {
    let params = NOISE_PARAMS.parse().expect("valid Noise parameters");
    Ok(snow::Builder::new(params)
        .local_private_key(secret)?
        .prologue(PROLOGUE)?)
}

fn remote_static(state: &snow::HandshakeState) -> Result<[u8; 32], SessionError> {
    state
        .get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or(SessionError::Crypto)
}

/// The handshake hash after message 1 names the handshake on both sides.
fn reference(state: &snow::HandshakeState) -> [u8; 16] {
    let mut r = [0u8; 16];
    r.copy_from_slice(&state.get_handshake_hash()[..16]);
    r
}

/// Everything one user keeps about end-to-end encryption with one contact.
#[derive(Debug)]
pub struct Session {
    remote: [u8; 32],
    current: Option<Established>,
    retired: Vec<Established>,
    offered: Vec<Offered>,
    pending: Vec<Pending>,
    seen_inits: SeenInits,
    /// Random id of this session object, so the peer can tell a restart (same state)
    /// from lost state (a new instance).
    instance: [u8; 8],
    /// Sequence number of our next offer. Offers are kept by highest sequence on both
    /// sides, so the handshake we complete (always among our newest [`MAX_PENDING`]) is
    /// always among the answers the peer keeps ([`MAX_OFFERED`] ≥ [`MAX_PENDING`]).
    next_offer_seq: u64,
}

impl Session {
    /// A session with the contact whose X25519 static key is `remote` (from their card).
    pub fn new(remote: [u8; 32]) -> Self {
        let mut instance = [0u8; 8];
        rand_core::OsRng.fill_bytes(&mut instance);
        Self::with_instance(remote, instance)
    }

    /// Like [`Session::new`] with a chosen instance id (deterministic tests).
    pub fn with_instance(remote: [u8; 32], instance: [u8; 8]) -> Self {
        Self {
            instance,
            remote,
            current: None,
            retired: Vec::new(),
            offered: Vec::new(),
            pending: Vec::new(),
            seen_inits: SeenInits::new(),
            next_offer_seq: 0,
        }
    }

    /// Call on a state just loaded from storage, before sealing with it: skips the
    /// [`MAX_UNSAVED_SEALS`] transport counters and offer numbers that the previous run
    /// may have handed out before its state was durable. The peer's replay bitmap takes
    /// the jump in its stride; a counter past [`MAX_COUNTERS`] only means the next
    /// message opens a fresh handshake.
    pub fn resume_after_restart(&mut self) {
        self.next_offer_seq = self.next_offer_seq.saturating_add(MAX_UNSAVED_SEALS);
        let sessions = self
            .current
            .iter_mut()
            .chain(self.retired.iter_mut())
            .chain(self.offered.iter_mut().map(|o| &mut o.session));
        for s in sessions {
            s.next_send = s
                .next_send
                .saturating_add(MAX_UNSAVED_SEALS)
                .min(MAX_COUNTERS);
        }
    }

    /// The contact's X25519 static key.
    pub fn remote(&self) -> &[u8; 32] {
        &self.remote
    }

    /// The contact rotated its static key to `remote` (SPEC.md §2). It discarded its
    /// session state with the old key, so the current session is retired (nothing more
    /// is sealed on it: the contact cannot open it) and handshakes we started or
    /// answered under the old key are dropped (none can complete). Established
    /// sessions stay receive paths for what the contact sealed before. The caller seals
    /// again what the contact has not confirmed, as after lost state (§4.4 step 2).
    pub fn peer_rotated(&mut self, remote: [u8; 32], now: u64) {
        self.remote = remote;
        self.pending.clear();
        self.offered.clear();
        if let Some(current) = self.current.take() {
            self.retire(current, now);
        }
    }

    /// True once a handshake has completed and confirmed: messages now have forward
    /// secrecy.
    pub fn is_established(&self) -> bool {
        self.current.is_some()
    }

    /// A local name for the session messages are sealed on (changes on rekey).
    pub fn current_id(&self) -> Option<[u8; 32]> {
        self.current.as_ref().map(|c| c.id)
    }

    /// The generation of the current session (0 before the first).
    pub fn generation(&self) -> u32 {
        self.current.as_ref().map_or(0, |c| c.rank.generation)
    }

    fn rank(&self, me: &Identity, generation: u32, i_initiated: bool) -> Rank {
        let mine = me.x25519_public();
        let initiator_lower = if i_initiated {
            mine < self.remote
        } else {
            self.remote < mine
        };
        Rank {
            generation,
            initiator_lower,
        }
    }

    /// Seals `body` for the contact. `card` is our own current card: a first message
    /// carries it, so the contact learns who we are (both keys) even before adding us.
    /// The caller must persist this session's new state ([`Session::encode`]) no later
    /// than it hands the packet to anyone, so a crash can never make it reuse a counter.
    pub fn seal<R: RngCore + CryptoRng>(
        &mut self,
        me: &Identity,
        card: &Card,
        body: &[u8],
        now: u64,
        rng: &mut R,
    ) -> Result<Vec<u8>, SessionError> {
        if body.len() > MAX_SEALED_BODY {
            return Err(SessionError::BodyTooLarge(body.len()));
        }
        self.expire(now);
        let answer = self.best_answer();
        let sendable = self
            .current
            .as_ref()
            .is_some_and(Established::usable_for_sending);
        if !sendable {
            return self.seal_init(me, card, body, answer, now, rng);
        }
        let offer = if self.current.as_ref().is_some_and(|c| c.due_for_rekey(now)) {
            Some(self.rekey_offer(me, now)?)
        } else {
            None
        };
        let current = self.current.as_mut().expect("checked above");
        let frame = TransportFrame {
            counter: current.next_send,
            sent_at: now,
            answer,
            offer,
            body: body.to_vec(),
        };
        current.next_send += 1;
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let aad = transport_aad(&session_tag(&current.send_key, frame.counter));
        let plaintext = pad(frame.encode(), HEADER_LEN + NONCE_LEN + TAG_LEN)
            .ok_or(SessionError::BodyTooLarge(body.len()))?;
        let ciphertext = XChaCha20Poly1305::new(Key::from_slice(current.send_key.as_ref()))
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| SessionError::Crypto)?;
        let mut packet = Vec::with_capacity(aad.len() + NONCE_LEN + ciphertext.len());
        packet.extend_from_slice(&aad);
        packet.extend_from_slice(&nonce);
        packet.extend_from_slice(&ciphertext);
        Ok(packet)
    }

    fn next_generation(&self) -> u32 {
        self.generation().saturating_add(1)
    }

    /// Starts a handshake: writes IK message 1 carrying `payload`.
    fn start_handshake(
        &mut self,
        me: &Identity,
        payload: &[u8],
        generation: u32,
        now: u64,
    ) -> Result<(Vec<u8>, [u8; 16]), SessionError> {
        let seq = self.next_offer_seq;
        self.next_offer_seq += 1;
        let secret = me.x25519_secret();
        let mut state = builder(&secret)?
            .remote_public_key(&self.remote)?
            .build_initiator()?;
        let mut msg1 = vec![0u8; payload.len() + 128];
        let n = state.write_message(payload, &mut msg1)?;
        msg1.truncate(n);
        let reference = reference(&state);
        self.pending.push(Pending {
            reference,
            generation,
            seq,
            state,
            offer: None,
            created_at: now,
        });
        if self.pending.len() > MAX_PENDING {
            self.pending.remove(0);
        }
        Ok((msg1, reference))
    }

    fn seal_init<R: RngCore + CryptoRng>(
        &mut self,
        me: &Identity,
        card: &Card,
        body: &[u8],
        answer: Option<Answer>,
        now: u64,
        rng: &mut R,
    ) -> Result<Vec<u8>, SessionError> {
        if *card.identity().x25519() != me.x25519_public()
            || card.identity().peer_id() != me.peer_id()
        {
            // Sealing would succeed, and the recipient would refuse every such message.
            return Err(SessionError::CardMismatch);
        }
        let generation = self.next_generation();
        let frame = InitFrame {
            generation,
            seq: self.next_offer_seq,
            instance: self.instance,
            sent_at: now,
            answer,
            card: card.encode(),
            body: body.to_vec(),
        };
        self.seal_init_frame(me, &frame, now, rng)
    }

    /// Writes `frame` as a first message: padded, in IK message 1, its ephemeral key
    /// masked.
    fn seal_init_frame<R: RngCore + CryptoRng>(
        &mut self,
        me: &Identity,
        frame: &InitFrame,
        now: u64,
        rng: &mut R,
    ) -> Result<Vec<u8>, SessionError> {
        let payload = pad(frame.encode(), HEADER_LEN + IK_MSG1_OVERHEAD)
            .ok_or(SessionError::BodyTooLarge(frame.body.len()))?;
        let (mut msg1, _) = self.start_handshake(me, &payload, frame.generation, now)?;
        let mut lead = [0u8; SESSION_TAG_LEN];
        rng.fill_bytes(&mut lead);
        mask_ephemeral(&mut msg1, &self.remote, &lead);
        let mut packet = Vec::with_capacity(HEADER_LEN + msg1.len());
        packet.push(PACKET_VERSION);
        packet.extend_from_slice(&lead);
        packet.extend_from_slice(&msg1);
        debug_assert!(SIZE_CLASSES.contains(&packet.len()));
        Ok(packet)
    }

    /// Opens a first message from this session's contact (see [`open`]).
    pub fn accept_init(
        &mut self,
        me: &Identity,
        init: Box<InitPacket>,
        now: u64,
    ) -> Result<Opened, SessionError> {
        let init = *init;
        if init.remote != self.remote {
            return Err(SessionError::WrongPeer);
        }
        self.expire(now);
        match self
            .seen_inits
            .accept(init.reference, init.frame.sent_at, now, RETAIN_SECS)
        {
            Ok(()) => {}
            Err(InitReplay::Duplicate) => return Err(SessionError::Replay),
            Err(InitReplay::TooOld) => return Err(SessionError::TooOld),
            Err(InitReplay::BelowFloor) => {
                // Possibly a replay we can no longer recognise, possibly an honest
                // message that waited while many newer ones came: its body, but no say
                // over the session (no lost-state detection, no answer).
                return Ok(Opened {
                    body: init.frame.body,
                    sent_at: init.frame.sent_at,
                    peer_reset: false,
                    switched: false,
                    late: true,
                });
            }
        }
        let before = self.current_id();
        let peer_reset = self
            .current
            .as_ref()
            .is_some_and(|c| c.peer_instance != init.frame.instance);
        if peer_reset {
            // The peer cannot open what we seal on this session any more.
            let old = self.current.take().expect("checked above");
            self.retire(old, now);
        }
        if let Some(answer) = &init.frame.answer {
            self.take_answer(me, answer, now);
        }
        let proposal = Proposal {
            reference: init.reference,
            generation: init.frame.generation,
            seq: init.frame.seq,
            instance: init.frame.instance,
        };
        // The first message is already recorded as seen: a failure to answer it must
        // not lose its body (the sender offers again with its next message).
        let _ = self.answer_offer(me, init.state, proposal, now);
        Ok(Opened {
            body: init.frame.body,
            sent_at: init.frame.sent_at,
            peer_reset,
            switched: self.switched_from(before),
            late: false,
        })
    }

    /// Tries to open a transport packet with this session's keys. `None` means the
    /// packet is not for this session (try the next); `Some(Err(Replay))` means it was
    /// already received.
    pub fn open_transport(
        &mut self,
        me: &Identity,
        packet: &Packet,
        now: u64,
    ) -> Option<Result<Opened, SessionError>> {
        self.expire(now);
        let (slot, plaintext) = self.find_key(packet)?;
        Some(self.accept_transport(me, slot, &plaintext, packet.lead, now))
    }

    /// The session the next [`Session::seal`] seals on, if it seals a transport packet
    /// (`None`: it writes a first message, which the peer opens with its static key
    /// whatever sessions come and go).
    pub fn sealing_session(&self) -> Option<[u8; 32]> {
        self.current
            .as_ref()
            .filter(|c| c.usable_for_sending())
            .map(|c| c.id)
    }

    /// Whether this state still holds the keys of the session named `id` (test use).
    #[cfg(test)]
    fn holds(&self, id: &[u8; 32]) -> bool {
        self.current
            .iter()
            .chain(self.offered.iter().map(|o| &o.session))
            .chain(self.retired.iter())
            .any(|s| s.id == *id)
    }

    /// The tags of the transport packets this state can still open within `window`
    /// below and above the highest counter each session received: a recipient indexes
    /// them to find the session of an incoming packet at once, with no trial
    /// decryption.
    pub fn expected_tags(&self, window: u64) -> Vec<SessionTag> {
        let mut out = Vec::new();
        for s in self
            .current
            .iter()
            .chain(self.offered.iter().map(|o| &o.session))
            .chain(self.retired.iter())
        {
            s.expected_tags(window, &mut out);
        }
        out
    }

    /// What [`Session::expected_tags`] depends on, cheaply: for each session, a tag that
    /// names it and one past the highest counter it received. While this stays the same
    /// (or the counters move only a little), an index of the expected tags need not be
    /// rebuilt.
    pub fn tag_windows(&self) -> Vec<(SessionTag, u64)> {
        self.current
            .iter()
            .chain(self.offered.iter().map(|o| &o.session))
            .chain(self.retired.iter())
            .map(|s| {
                (
                    session_tag(&s.recv_key, u64::MAX),
                    s.window.next_after_highest(),
                )
            })
            .collect()
    }

    fn find_key(&self, packet: &Packet) -> Option<(Slot, Vec<u8>)> {
        let try_one = |s: &Established| s.try_decrypt(packet);
        if let Some(p) = self.current.as_ref().and_then(try_one) {
            return Some((Slot::Current, p));
        }
        for (i, o) in self.offered.iter().enumerate() {
            if let Some(p) = try_one(&o.session) {
                return Some((Slot::Offered(i), p));
            }
        }
        for (i, s) in self.retired.iter().enumerate() {
            if let Some(p) = try_one(s) {
                return Some((Slot::Retired(i), p));
            }
        }
        None
    }

    fn slot_mut(&mut self, slot: Slot) -> &mut Established {
        match slot {
            Slot::Current => self.current.as_mut().expect("slot exists"),
            Slot::Offered(i) => &mut self.offered[i].session,
            Slot::Retired(i) => &mut self.retired[i],
        }
    }

    fn accept_transport(
        &mut self,
        me: &Identity,
        slot: Slot,
        plaintext: &[u8],
        packet_tag: SessionTag,
        now: u64,
    ) -> Result<Opened, SessionError> {
        let frame = TransportFrame::decode(plaintext)?;
        let before = self.current_id();
        let tag = packet_tag;
        let session = self.slot_mut(slot);
        if session_tag(&session.recv_key, frame.counter) != tag {
            // Authenticated, so the peer chose a tag that does not name its counter.
            return Err(SessionError::BadTag);
        }
        if !session.window.is_fresh(frame.counter) {
            return Err(SessionError::Replay);
        }
        session.window.mark(frame.counter);
        session.first_received_at.get_or_insert(now);
        if let Slot::Offered(i) = slot {
            // The initiator used the session: it holds the keys. Confirm it.
            let offered = self.offered.remove(i);
            let mut session = offered.session;
            session.created_at = now;
            self.install(session, now);
        }
        if let Some(answer) = &frame.answer {
            self.take_answer(me, answer, now);
        }
        if let Some(offer) = &frame.offer {
            // An offer we cannot answer is ignored like an unusable answer: never a
            // reason to lose the message it rode with (its counter is spent already).
            let _ = self.answer_rekey(me, offer, now);
        }
        self.expire(now);
        Ok(Opened {
            body: frame.body,
            sent_at: frame.sent_at,
            peer_reset: false,
            switched: self.switched_from(before),
            late: false,
        })
    }

    /// Whether the session we seal on is no longer the one named `before`.
    fn switched_from(&self, before: Option<[u8; 32]>) -> bool {
        before.is_some() && self.current_id() != before
    }

    /// Makes `session` current if it outranks the current one; otherwise keeps it
    /// receive-only.
    fn install(&mut self, session: Established, now: u64) {
        let better = self.current.as_ref().is_none_or(|c| session.rank > c.rank);
        if better {
            if let Some(old) = self.current.replace(session) {
                self.retire(old, now);
            }
        } else {
            self.retire(session, now);
        }
    }

    fn retire(&mut self, mut session: Established, now: u64) {
        session.retired_at = Some(now);
        // Receive-only from now on: its send key goes at once (whoever takes this state
        // later cannot seal as us under it).
        session.send_key = Zeroizing::new([0; 32]);
        self.retired.push(session);
        if self.retired.len() > MAX_RETIRED {
            self.retired.remove(0);
        }
    }

    /// Erases keys nothing can still need: a replaced session [`RETIRED_GRACE_SECS`]
    /// after the peer first sent on a session that outranks it, and anything
    /// [`RETAIN_SECS`] old.
    fn expire(&mut self, now: u64) {
        let live = |t: u64| t.saturating_add(RETAIN_SECS) >= now;
        // Only a successor shared with the same peer instance counts: after the peer
        // lost its state, its new sessions start again from generation 1, below the
        // old ones.
        let received: Vec<(Rank, [u8; 8], u64)> = self
            .current
            .iter()
            .chain(self.retired.iter())
            .filter_map(|s| Some((s.rank, s.peer_instance, s.first_received_at?)))
            .collect();
        self.retired.retain(|s| {
            let retired = s.retired_at.unwrap_or(now);
            let peer_switched = received
                .iter()
                .filter(|(rank, instance, _)| *rank > s.rank && *instance == s.peer_instance)
                .map(|(_, _, t)| *t)
                .min();
            live(retired)
                && peer_switched
                    .is_none_or(|t| t.max(retired).saturating_add(RETIRED_GRACE_SECS) >= now)
        });
        self.offered.retain(|o| live(o.created_at));
        self.pending.retain(|p| live(p.created_at));
    }
}

/// Where a session that opened a packet lives.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Current,
    Offered(usize),
    Retired(usize),
}

#[cfg(test)]
mod tests;
