//! What the engine's owner task holds, and the changes it makes to it: sealing for a
//! contact, queueing a message or a control record into the outbox, read receipts,
//! card updates. Everything here runs on the owner task, one thing at a time, so no
//! lock is needed; everything writes to the store (applied, not yet flushed) and
//! leaves flushing, and telling anyone, to the owner.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use kkachi_protocol::device::DeviceSet;
use kkachi_protocol::envelope::DEFAULT_TTL_SECS;
use kkachi_protocol::file::FileRef;
use kkachi_protocol::session::SessionTag;
use kkachi_protocol::{
    Body, Card, Content, Envelope, Identity, MessageId, Multiaddr, PeerId, ReceiptStatus, Session,
    WriteKey,
};
use tokio::sync::broadcast;

use super::{AppEvent, ContactError, EngineError, Queued};
use crate::store::{
    Contact, Direction, FileNote, LocalStore, MessageRecord, MessageState, OutboxEntry, OutboxKind,
    PreviousKey, Quote, StoreError, Target, TreeId, WriteSet, message_key,
};

/// How many packets below and above the highest one received each session's tags
/// cover: a contact's packets arrive from each relay in the order sent, so the ones
/// further off are rare, and they are found by the bounded fallback below.
pub(crate) const TAG_WINDOW: u64 = 256;
/// How often, while our previous session key is read, contacts with no session under
/// the new one are sent our card again.
const ROTATED_CARD_EVERY_MS: u64 = 24 * 3600 * 1000;
/// Transport packets per minute whose tag no session expects that are still tried on
/// every contact's sessions (a packet far ahead of the rest, or a late one far behind;
/// anything more is junk, and dropped at the cost of one lookup).
const FALLBACKS_PER_MINUTE: u32 = 16;

/// A contact's indexed tags, and the session windows ([`Session::tag_windows`]) they
/// were made from.
type Indexed = (Vec<SessionTag>, Vec<(SessionTag, u64)>);

/// What our own set says, as read from its encoding `set` under our card of version
/// `card_version` (read again only when either changes).
#[derive(Debug, Clone)]
pub(crate) struct OwnPeer {
    pub(crate) set: Vec<u8>,
    pub(crate) card_version: u64,
    /// Our account's other devices as one peer (`None`: the set lists this device
    /// alone).
    pub(crate) contact: Option<Contact>,
    /// Every key the set lists or took out (ours among them).
    pub(crate) keys: Vec<[u8; 32]>,
    /// The other devices the set lists (not this one).
    pub(crate) listed: Vec<[u8; 32]>,
}

/// Which of a contact's devices: the one their card names (`None`), or another their
/// account lists, by its session key (SPEC §15).
pub(crate) type Device = Option<[u8; 32]>;

/// Everything sealed for a contact goes to each device of theirs we hold a session
/// with: the one their card names (`main`, which follows their changes of key) and
/// every other device of their account that proved its key to us (a first message
/// sealed with it) and that their account has not taken out. Derefs to `main`, which
/// answers whether a session is established, and the like.
#[derive(Debug)]
pub(crate) struct PeerSessions {
    main: Session,
    /// With each other device, by its session key.
    pub(crate) devices: std::collections::BTreeMap<[u8; 32], Session>,
    /// When their account took the device their card names out (Unix seconds, as
    /// the removal says), if it did: while another device of theirs is sealed to,
    /// that one is not, and what it sealed after is refused.
    pub(crate) card_removed_at: Option<u64>,
    /// Our own account's other devices (SPEC §15.2): `main` stands for this device,
    /// and is never sealed to nor written.
    pub(crate) own: bool,
}

impl std::ops::Deref for PeerSessions {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.main
    }
}

impl std::ops::DerefMut for PeerSessions {
    fn deref_mut(&mut self) -> &mut Session {
        &mut self.main
    }
}

impl PeerSessions {
    /// A session with the card's device alone (one never stored).
    pub(crate) fn alone(main: Session) -> Self {
        Self {
            main,
            devices: Default::default(),
            card_removed_at: None,
            own: false,
        }
    }

    /// The devices sealed to, and each one's session.
    pub(crate) fn sealing(&mut self) -> impl Iterator<Item = (Device, &mut Session)> {
        let skip_card = self.own || (self.card_removed_at.is_some() && !self.devices.is_empty());
        self.each()
            .filter(move |(d, _)| !(skip_card && d.is_none()))
    }

    /// The session with `device`, if we hold one.
    pub(crate) fn device(&mut self, device: &Device) -> Option<&mut Session> {
        match device {
            None => Some(&mut self.main),
            Some(key) => self.devices.get_mut(key),
        }
    }

    /// Each device's session, the card's first.
    pub(crate) fn each(&mut self) -> impl Iterator<Item = (Device, &mut Session)> {
        std::iter::once((None, &mut self.main))
            .chain(self.devices.iter_mut().map(|(k, s)| (Some(*k), s)))
    }

    /// Writes every session with `peer` into `w`.
    pub(crate) fn write(&self, w: &mut WriteSet, peer: &PeerId) {
        if !self.own {
            LocalStore::write_session(w, peer, &self.main);
        }
        for (key, session) in &self.devices {
            LocalStore::write_device_session(w, peer, key, session);
        }
    }
}

/// When `set` took the device whose session key is `key` out, if it did.
pub(crate) fn removed_at(set: &kkachi_protocol::device::DeviceSet, key: &[u8; 32]) -> Option<u64> {
    set.removals().find(|r| r.key() == key).map(|r| r.at())
}

/// Live end-to-end sessions by contact, written through to the store. Their
/// unanswered handshakes exist only here. An index of the tags each contact's sessions
/// expect finds the session of a transport packet at once, whatever the number of
/// contacts: no trial decryption across them.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    /// Our own account, whose other devices' sessions are kept under it.
    me: Option<PeerId>,
    /// Our set as the sessions with our other devices were last made from.
    own_set: Option<Vec<u8>>,
    live: HashMap<PeerId, PeerSessions>,
    /// Tag → contact and device, for every contact once `indexed`.
    by_tag: HashMap<SessionTag, (PeerId, Device)>,
    /// Each contact's indexed tags, and the windows they were made from.
    by_peer: HashMap<PeerId, Indexed>,
    indexed: bool,
    /// Fallbacks left in the current minute, and when it started (ms).
    fallbacks: (u32, u64),
}

impl Sessions {
    /// No session yet, for the account `me`.
    pub(crate) fn of(me: PeerId) -> Self {
        Self {
            me: Some(me),
            ..Self::default()
        }
    }

    /// The live session with `contact`, loaded from the store the first time.
    pub(crate) fn get(
        &mut self,
        store: &LocalStore,
        contact: &Contact,
    ) -> Result<&mut PeerSessions, StoreError> {
        if self.me == Some(contact.peer) {
            return self.own(store, contact);
        }
        Ok(match self.live.entry(contact.peer) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                // What is on disk may lag packets already handed out (a send leaves
                // before its write is durable): skip past them.
                let mut main = store.session(contact)?;
                main.resume_after_restart();
                let key = *contact.card.identity().x25519();
                if *main.remote() != key {
                    // Their card (a code added by hand) names a newer session key
                    // than the one the state was made for: handshakes go to it.
                    main.peer_rotated(key, super::now_ms() / 1000);
                }
                let mut devices = std::collections::BTreeMap::new();
                for other in store.device_sessions_of(contact)? {
                    let mut session = store.device_session(&contact.peer, &other)?;
                    session.resume_after_restart();
                    devices.insert(other, session);
                }
                let card_removed_at = store
                    .contact_devices(&contact.peer, contact.card.identity().ed25519())?
                    .and_then(|set| removed_at(&set, &key));
                v.insert(PeerSessions {
                    main,
                    devices,
                    card_removed_at,
                    own: false,
                })
            }
        })
    }

    /// The sessions with our account's other devices (`me`, from
    /// [`State::own_contact`]): one with each device our set lists, not taken out,
    /// but this one. Followed as the set changes: a session kept live stays as it is
    /// (it may be ahead of the store), one with a device no longer listed goes.
    fn own(&mut self, store: &LocalStore, me: &Contact) -> Result<&mut PeerSessions, StoreError> {
        let raw = store.own_devices_bytes()?;
        if self.own_set == raw && self.live.contains_key(&me.peer) {
            return Ok(self.live.get_mut(&me.peer).expect("just looked"));
        }
        let this = *me.card.identity().x25519();
        let listed: Vec<[u8; 32]> = match &raw {
            None => Vec::new(),
            Some(bytes) => DeviceSet::decode(me.card.identity().ed25519(), bytes)
                .map_err(|_| StoreError::Corrupt("device set"))?
                .devices()
                .map(|d| *d.key())
                .filter(|k| *k != this)
                .collect(),
        };
        self.own_set = raw;
        let entry = self.live.entry(me.peer).or_insert_with(|| PeerSessions {
            main: Session::new(this),
            devices: Default::default(),
            card_removed_at: None,
            own: true,
        });
        entry.devices.retain(|k, _| listed.contains(k));
        for key in listed {
            if let std::collections::btree_map::Entry::Vacant(v) = entry.devices.entry(key) {
                let mut session = store.device_session(&me.peer, &key)?;
                session.resume_after_restart();
                v.insert(session);
            }
        }
        Ok(entry)
    }

    /// Forgets in-memory state after a failed write, so memory never runs ahead of disk.
    pub(crate) fn reset(&mut self) {
        // (`me` stays.)
        self.live.clear();
        self.by_tag.clear();
        self.by_peer.clear();
        self.indexed = false;
    }

    /// Forgets the live session with `peer` (removed: its state is gone from the store).
    pub(crate) fn forget(&mut self, peer: &PeerId) {
        self.live.remove(peer);
        self.unindex(peer);
    }

    fn unindex(&mut self, peer: &PeerId) {
        for tag in self.by_peer.remove(peer).unwrap_or_default().0 {
            if self.by_tag.get(&tag).is_some_and(|(p, _)| p == peer) {
                self.by_tag.remove(&tag);
            }
        }
    }

    /// Indexes every contact's sessions, the first time.
    pub(crate) fn index_all(
        &mut self,
        store: &LocalStore,
        contacts: &[Contact],
        own: Option<&Contact>,
    ) -> Result<(), StoreError> {
        if self.indexed {
            return Ok(());
        }
        for contact in contacts.iter().chain(own) {
            self.get(store, contact)?;
            self.reindex(&contact.peer);
        }
        self.indexed = true;
        Ok(())
    }

    /// Indexes anew what `peer`'s live session expects, if that changed enough: a new
    /// set of sessions, or one whose highest counter received moved a quarter of the
    /// window (until then the index holds a few tags already received, which only lead
    /// to the session that refuses them as replays).
    pub(crate) fn reindex(&mut self, peer: &PeerId) {
        let Some(sessions) = self.live.get_mut(peer) else {
            self.unindex(peer);
            return;
        };
        let windows: Vec<(SessionTag, u64)> =
            sessions.each().flat_map(|(_, s)| s.tag_windows()).collect();
        if let Some((_, old)) = self.by_peer.get(peer)
            && old.len() == windows.len()
            && old
                .iter()
                .zip(&windows)
                .all(|((id, from), (now_id, now_from))| {
                    id == now_id && now_from.saturating_sub(*from) < TAG_WINDOW / 4
                })
        {
            return;
        }
        let tags: Vec<(SessionTag, Device)> = sessions
            .each()
            .flat_map(|(device, s)| {
                s.expected_tags(TAG_WINDOW)
                    .into_iter()
                    .map(move |t| (t, device))
            })
            .collect();
        self.unindex(peer);
        for (tag, device) in &tags {
            self.by_tag.insert(*tag, (*peer, *device));
        }
        self.by_peer
            .insert(*peer, (tags.into_iter().map(|(t, _)| t).collect(), windows));
    }

    /// The contact, and which device of theirs, whose session expects a packet tagged
    /// `tag`.
    pub(crate) fn owner_of(&self, tag: &SessionTag) -> Option<(PeerId, Device)> {
        self.by_tag.get(tag).copied()
    }

    /// Whether a packet no session expects may still be tried on every contact now.
    pub(crate) fn take_fallback(&mut self, now_ms: u64) -> bool {
        let (left, since) = &mut self.fallbacks;
        if now_ms.saturating_sub(*since) >= 60_000 {
            *left = FALLBACKS_PER_MINUTE;
            *since = now_ms;
        }
        if *left == 0 {
            return false;
        }
        *left -= 1;
        true
    }
}

/// The engine's state, owned by its task.
#[derive(Debug)]
pub(crate) struct State<T> {
    pub(crate) store: LocalStore,
    pub(crate) me: Identity,
    /// Our session key before the last rotation, while what was sealed to it or put
    /// into its queues can still arrive.
    pub(crate) previous: Option<PreviousKey>,
    pub(crate) net: T,
    pub(crate) sessions: Sessions,
    pub(crate) events: broadcast::Sender<AppEvent>,
    /// Our own card as of its version: every first message carries it.
    card: parking_lot::Mutex<Option<Card>>,
    /// Our write capability into each contact's queue at each relay (a Diffie–Hellman
    /// each, so kept rather than worked out for every message), by (contact's X25519
    /// key, relay).
    write_keys: parking_lot::Mutex<HashMap<([u8; 32], PeerId), WriteKey>>,
    /// Envelopes refused because reading them panicked (a bug), shared with handles.
    pub(crate) faults: Arc<AtomicU64>,
    /// New messages taken in, to announce durable once flushed (by the owner).
    pub(crate) announced: Vec<super::Received>,
    /// Senders of new message requests, likewise.
    pub(crate) requests: Vec<PeerId>,
    /// People removed or blocked, and contacts' keys replaced by a rotation, since the
    /// owner last withdrew their write capabilities from our relays.
    pub(crate) revoked: parking_lot::Mutex<Vec<[u8; 32]>>,
    /// Members met in a group were written since the owner last told our relays what
    /// to grant: their capabilities are granted too.
    pub(crate) met: std::sync::atomic::AtomicBool,
    /// Members met in a group since the last batch of envelopes ended: what they sent
    /// before we knew them (held) is taken in then.
    pub(crate) newly_met: parking_lot::Mutex<Vec<PeerId>>,
    /// Set while what newly met members sent is taken in (which receives again).
    pub(crate) meeting: std::sync::atomic::AtomicBool,
    /// A group lost members (or us) in this batch: members met in groups we no longer
    /// share are forgotten when it ends.
    pub(crate) members_left: std::sync::atomic::AtomicBool,
    /// A large group's epochs or relays changed: the owner reads (and opens) its group
    /// queues anew.
    pub(crate) group_queues_changed: std::sync::atomic::AtomicBool,
    /// When each contact last rotated its session key (in this run): one more within
    /// [`super::receive::ROTATION_EVERY_MS`] is not taken.
    pub(crate) rotations: parking_lot::Mutex<HashMap<PeerId, u64>>,
    /// Contacts with outbox entries held back from being sealed again
    /// ([`State::reseal_stale`]).
    pub(crate) stale: parking_lot::Mutex<std::collections::HashSet<PeerId>>,
    /// When the first of those entries may be sealed again (Unix ms).
    pub(crate) stale_due: parking_lot::Mutex<Option<u64>>,
    /// When the next stored message disappears (its conversation's timer), if any is
    /// known: the owner deletes what ran out then.
    pub(crate) expiry_due: parking_lot::Mutex<Option<u64>>,
    /// When our card last went again to each contact after a switch of sessions.
    pub(crate) card_resent: parking_lot::Mutex<HashMap<PeerId, u64>>,
    /// Our account's other devices, as one peer to seal to ([`State::own_contact`]),
    /// for our set's encoding and our card's version it was made from.
    pub(crate) own: parking_lot::Mutex<Option<OwnPeer>>,
    /// Each group's merged state and digest, for the log it was computed from: a group
    /// message is checked against its group without merging the whole log again.
    pub(crate) rosters: parking_lot::Mutex<HashMap<[u8; 32], super::groups::Merged>>,
}

/// Our session key before its last rotation, while it is still read: only another key
/// of this identity (a restore brings its own).
pub(crate) fn previous_key(store: &LocalStore, me: &Identity) -> Option<PreviousKey> {
    match store.previous_key(super::now_ms() / 1000) {
        Ok(p) => p.filter(|p| {
            p.identity.same_identity_key(me) && p.identity.x25519_public() != me.x25519_public()
        }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read our previous session key");
            None
        }
    }
}

/// A control record (unsequenced: a receipt, a card, a set, a copy for our other
/// devices) carrying `body`, made at `at` (Unix ms), under a fresh id.
pub(crate) fn control(body: Body, at: u64) -> Content {
    Content {
        id: MessageId(rand::random()),
        seq: 0,
        prev: [0; 32],
        sent_at_ms: at,
        body,
    }
}

/// The relay an address names (its final `/p2p/…`).
pub(crate) fn relay_peer(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(kkachi_protocol::multiaddr::Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

impl<T> State<T> {
    pub(crate) fn new(
        store: LocalStore,
        me: Identity,
        previous: Option<PreviousKey>,
        net: T,
        events: broadcast::Sender<AppEvent>,
        faults: Arc<AtomicU64>,
    ) -> Self {
        let sessions = Sessions::of(me.peer_id());
        Self {
            store,
            me,
            previous,
            net,
            sessions,
            own: parking_lot::Mutex::default(),
            events,
            card: parking_lot::Mutex::default(),
            write_keys: parking_lot::Mutex::default(),
            faults,
            announced: Vec::new(),
            requests: Vec::new(),
            revoked: parking_lot::Mutex::default(),
            met: std::sync::atomic::AtomicBool::new(false),
            newly_met: parking_lot::Mutex::default(),
            meeting: std::sync::atomic::AtomicBool::new(false),
            members_left: std::sync::atomic::AtomicBool::new(false),
            group_queues_changed: std::sync::atomic::AtomicBool::new(true),
            rotations: parking_lot::Mutex::default(),
            stale: parking_lot::Mutex::default(),
            stale_due: parking_lot::Mutex::default(),
            expiry_due: parking_lot::Mutex::default(),
            card_resent: parking_lot::Mutex::default(),
            rosters: parking_lot::Mutex::default(),
        }
    }

    /// Our capability into `owner`'s queue at `relay`.
    fn write_key(&self, owner: &[u8; 32], relay: PeerId) -> WriteKey {
        let mut keys = self.write_keys.lock();
        if keys.len() > 65_536 {
            keys.clear();
        }
        *keys
            .entry((*owner, relay))
            .or_insert_with(|| self.me.write_key_to_device(owner, &relay))
    }

    /// The session keys of every device of `contact` we seal to: their card's, then
    /// each other device's that wrote to us.
    pub(crate) fn device_keys(&self, contact: &Contact) -> Result<Vec<[u8; 32]>, EngineError> {
        let card = contact.card.identity();
        let mut keys = self.store.device_sessions_of(contact)?;
        // Not the card's, once their account took that device out.
        if !self
            .store
            .contact_devices(&contact.peer, card.ed25519())?
            .is_some_and(|set| set.is_removed(card.x25519()))
        {
            keys.insert(0, *card.x25519());
        }
        Ok(keys)
    }

    /// What our relays grant changed (a contact's device, a member met): they are
    /// told again.
    pub(crate) fn grants_changed(&self) {
        self.met.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn emit(&self, event: AppEvent) {
        // No subscribers is fine; lagging ones miss old events and re-read the store.
        let _ = self.events.send(event);
    }

    /// Runs `f` with the live sessions taken out of the state, so it can use both; on
    /// failure the sessions are forgotten, as they may have run ahead of the store.
    pub(crate) fn with_sessions<R>(
        &mut self,
        f: impl FnOnce(&Self, &mut Sessions) -> Result<R, EngineError>,
    ) -> Result<R, EngineError> {
        // Whatever is taken in here may offer files (see `LocalStore::files_turn`).
        let _files = self.store.files_turn();
        let mut sessions = std::mem::take(&mut self.sessions);
        let result = f(self, &mut sessions);
        if result.is_err() {
            sessions.reset();
        }
        self.sessions = sessions;
        result
    }

    /// Applies `w`; on failure forgets live sessions, which may have run ahead of it.
    pub(crate) fn apply_or_reset(
        &self,
        sessions: &mut Sessions,
        w: WriteSet,
    ) -> Result<(), EngineError> {
        self.store.apply(w).map_err(|e| {
            sessions.reset();
            e.into()
        })
    }

    /// Renews our card if it has run out: a new version and request epoch (the codes
    /// given out before stop reaching us once the relays have been told). The caller
    /// grants again and sends contacts the new card ([`State::announce_card_if_due`]).
    /// Returns whether it did.
    pub(crate) fn renew_card_if_due(&self, now: u64) -> Result<bool, EngineError> {
        let Some(mut profile) = self.store.profile()? else {
            return Ok(false);
        };
        if !profile.renew_card_if_due(now / 1000) {
            return Ok(false);
        }
        let mut w = WriteSet::default();
        LocalStore::write_profile(&mut w, &profile);
        self.store.apply(w)?;
        tracing::info!(
            version = profile.card_version,
            epoch = profile.request_epoch,
            "our card expired: renewed, and earlier invite codes retired"
        );
        Ok(true)
    }

    /// While our previous session key is still read, every contact (not blocked) with
    /// whom no session under the new key has formed yet is sent our card once more,
    /// once a day: one who was away longer than an envelope lives still learns the new
    /// key, and seals again to it what we never confirmed. Returns how many were sent.
    pub(crate) fn resend_rotated_card(&mut self, now: u64) -> Result<usize, EngineError> {
        if self.previous.is_none() {
            return Ok(0);
        }
        let last = self.store.rotated_card_sent_ms()?;
        if last.is_some_and(|t| now.saturating_sub(t) < ROTATED_CARD_EVERY_MS) {
            return Ok(0);
        }
        let card = self.own_card()?;
        let devices = self.store.own_devices(&self.me)?;
        self.with_sessions(|this, sessions| {
            let mut w = WriteSet::default();
            LocalStore::write_rotated_card_sent(&mut w, now);
            let mut n = 0;
            for contact in this.store.contacts()?.iter() {
                if this.store.blocked(&contact.peer)?.is_some() {
                    continue;
                }
                let session = sessions.get(&this.store, contact)?;
                if session.is_established() {
                    continue;
                }
                let body = Body::CardUpdate(Box::new(card.clone()));
                this.queue_control(&mut w, contact, session, body, now)?;
                // And our set, which takes the old key out: sent once, it may have
                // expired unread, as the card did.
                if let Some(set) = &devices {
                    this.queue_devices(&mut w, contact, session, set, now)?;
                }
                n += 1;
            }
            this.apply_or_reset(sessions, w)?;
            Ok(n)
        })
    }

    /// Our card as it stands, signed once per version of it (relays change its version).
    pub(crate) fn own_card(&self) -> Result<Card, EngineError> {
        let version = self
            .store
            .profile()?
            .map(|p| p.card_version)
            .ok_or(StoreError::Corrupt("profile"))?;
        let mut cached = self.card.lock();
        if let Some(card) = cached.as_ref().filter(|c| c.version() == version) {
            return Ok(card.clone());
        }
        let card = self.store.own_card(&self.me)?;
        *cached = Some(card.clone());
        Ok(card)
    }

    /// Seals `content` for `contact` into a fresh envelope (default lifetime from `now`).
    pub(crate) fn seal_envelope(
        &self,
        contact: &Contact,
        session: &mut Session,
        content: &Content,
        now: u64,
    ) -> Result<Envelope, EngineError> {
        let card = self.own_card()?;
        let packet = session.seal(
            &self.me,
            &card,
            &content.encode(),
            now / 1000,
            &mut rand_core::OsRng,
        )?;
        let _ = contact;
        Ok(Envelope {
            expires_at: now / 1000 + DEFAULT_TTL_SECS,
            payload: packet,
        })
    }

    /// Where an envelope for the owner of `card` goes: each of its relays, with our
    /// capability there and, should that reach no queue, the card's request capability.
    /// While we keep a previous session key and have no session under the new one with
    /// them (`established`), the capability is the old key's: they grant it until they
    /// take our new card, and their request allowance is not spent on our change.
    ///
    /// For another `device` of the account than the card's, the relays are the card's
    /// (an account's devices share its relays), the capability that device's, and
    /// there is no request capability (the card's reaches the card's device): that
    /// device granted ours before it wrote to us, which is how we know it.
    pub(crate) fn targets(&self, card: &Card, device: &Device, established: bool) -> Vec<Target> {
        let previous = self.previous.as_ref().filter(|_| !established);
        let owner = device.as_ref().unwrap_or(card.identity().x25519());
        card.relays()
            .iter()
            .filter_map(|addr| {
                let relay = relay_peer(addr)?;
                let write = match previous {
                    Some(p) => p.identity.write_key_to_device(owner, &relay),
                    None => self.write_key(owner, relay),
                };
                Some(Target {
                    addr: addr.to_string(),
                    acked: false,
                    attempts: 0,
                    next_try_ms: 0,
                    write: write.0,
                    request: match device {
                        None => card.request_key_at(&relay).map(|k| k.0),
                        Some(_) => None,
                    },
                    epoch: 0,
                })
            })
            .collect()
    }

    /// Seals `content` for each device of `contact` we hold a session with (SPEC §15)
    /// and adds the envelopes to `w` as outbox entries, one per device, with the
    /// session states that sealed them: all become durable together. Returns the key
    /// of the entry for the device their card names.
    pub(crate) fn seal_into(
        &self,
        w: &mut WriteSet,
        contact: &Contact,
        sessions: &mut PeerSessions,
        content: &Content,
        kind: OutboxKind,
        now: u64,
    ) -> Result<u64, EngineError> {
        if !matches!(content.body, Body::Devices(_)) && !sessions.is_established() {
            self.devices_first(w, contact, sessions, now)?;
        }
        let encoded = content.encode();
        let mut first = None;
        for (device, session) in sessions.sealing() {
            let sealed_on = session.sealing_session();
            let sealed = self.seal_envelope(contact, session, content, now);
            match device {
                None => LocalStore::write_session(w, &contact.peer, session),
                Some(key) => LocalStore::write_device_session(w, &contact.peer, &key, session),
            }
            let envelope = sealed?;
            let targets = self.targets(&contact.card, &device, session.is_established());
            let key = self.store.next_outbox_seq()?;
            let entry = OutboxEntry {
                message_id: content.id.0,
                contact: contact.peer.to_bytes(),
                kind,
                device,
                envelope: envelope.encode(),
                targets,
                direct_acked: false,
                created_ms: now,
                sealed_on,
                resealed_ms: 0,
                queued_ms: now,
                // Messages, group records (a member who misses an operation would see
                // another group) and device sets (no other goes until ours changes) are
                // sealed again on a new session, as they were.
                content: if kind == OutboxKind::Message
                    || matches!(
                        content.body,
                        Body::Group { .. }
                            | Body::Devices(_)
                            | Body::Sent { .. }
                            | Body::Account(_)
                    ) {
                    encoded.clone()
                } else {
                    Vec::new()
                },
            };
            LocalStore::write_outbox(w, key, &entry);
            first.get_or_insert(key);
        }
        Ok(first.expect("some device is always sealed to"))
    }

    /// Queues a control record (receipt, card update) for `contact` into `w`, sealed
    /// with `session`.
    pub(crate) fn queue_control(
        &self,
        w: &mut WriteSet,
        contact: &Contact,
        session: &mut PeerSessions,
        body: Body,
        now: u64,
    ) -> Result<u64, EngineError> {
        let content = control(body, now);
        self.seal_into(w, contact, session, &content, OutboxKind::Control, now)
    }

    /// Seals `text` for `contact` (a reply to `reply_to`, if given) into the outbox and
    /// the conversation, applied but not yet durable.
    pub(crate) fn queue_text(
        &mut self,
        contact: &Contact,
        text: &str,
        reply_to: Option<MessageId>,
        now: u64,
    ) -> Result<Queued, EngineError> {
        if text.trim().is_empty() {
            return Err(EngineError::Invalid("the message is empty".into()));
        }
        if self.store.blocked(&contact.peer)?.is_some() {
            return Err(ContactError::Blocked(contact.name.clone()).into());
        }
        let quote = match reply_to {
            None => None,
            Some(target) => Some(self.quotable(&contact.peer, target)?),
        };
        let conv = self.store.conversation(&contact.peer)?;
        // Under a timer, the text carries it: the contact deletes it as we do, whatever
        // order the setting and the text arrive in.
        let body = crate::store::text_body(quote, conv.timer_secs, text.to_owned());
        self.queue_message(contact, conv, body, WriteSet::default(), now)
    }

    /// Seals a message carrying `file` for `contact` into the outbox and the
    /// conversation, applied but not yet durable.
    pub(crate) fn queue_file(
        &mut self,
        contact: &Contact,
        file: FileRef,
        with: WriteSet,
        now: u64,
    ) -> Result<Queued, EngineError> {
        if self.store.blocked(&contact.peer)?.is_some() {
            return Err(ContactError::Blocked(contact.name.clone()).into());
        }
        let conv = self.store.conversation(&contact.peer)?;
        let body = Body::File {
            secs: conv.timer_secs,
            file: Box::new(file),
        };
        self.queue_message(contact, conv, body, with, now)
    }

    fn queue_message(
        &mut self,
        contact: &Contact,
        conv: crate::store::Conversation,
        body: Body,
        with: WriteSet,
        now: u64,
    ) -> Result<Queued, EngineError> {
        let content = Content {
            id: MessageId(rand::random()),
            seq: conv.next_seq.max(1),
            prev: conv.last_hash,
            sent_at_ms: now,
            body,
        };
        content
            .check()
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        self.with_sessions(|this, sessions| {
            this.write_text(sessions, contact, conv, content, with, now)
        })
    }

    /// The message `target` with `peer`, to reply or react to: it must be here and not
    /// deleted.
    fn quotable(&self, peer: &PeerId, target: MessageId) -> Result<Quote, EngineError> {
        match self.store.message(peer, &target)? {
            Some((_, record)) if record.deleted => {
                Err(EngineError::Invalid("that message was deleted".into()))
            }
            Some((_, record)) => Ok(Quote {
                id: target.0,
                ours: record.direction == Direction::Out,
            }),
            None => Err(EngineError::Invalid(
                "no such message in this conversation".into(),
            )),
        }
    }

    fn write_text(
        &self,
        sessions: &mut Sessions,
        contact: &Contact,
        mut conv: crate::store::Conversation,
        content: Content,
        with: WriteSet,
        now: u64,
    ) -> Result<Queued, EngineError> {
        let (text, timer_secs, file) = match &content.body {
            Body::File { secs, file } => ("", *secs, Some(FileNote::of(file))),
            body => {
                let (text, secs) = body.text().expect("a text or a file");
                (text, secs, None)
            }
        };
        let seq = content.seq;
        let mut w = with;
        let session = sessions.get(&self.store, contact)?;
        let outbox_key =
            self.seal_into(&mut w, contact, session, &content, OutboxKind::Message, now)?;
        self.copy_to_own(&mut w, sessions, &contact.peer, &content, now)?;
        conv.next_seq = seq + 1;
        conv.last_hash = content.hash();
        let local = conv.next_local;
        conv.next_local += 1;
        let record = MessageRecord {
            id: content.id.0,
            direction: Direction::Out,
            text: text.to_owned(),
            state: MessageState::Queued,
            sent_at_ms: now,
            stored_at_ms: now,
            seq,
            prev: content.prev,
            timer_secs,
            edited: false,
            deleted: false,
            revised_seq: 0,
            reply_to: match content.body {
                Body::Reply { target, own, .. } => Some(Quote {
                    id: target.0,
                    ours: own,
                }),
                _ => None,
            },
            reactions: Default::default(),
            file,
        };
        conv.note_expiry(record.expires_at());
        self.note_expiry_due(record.expires_at());
        LocalStore::write_conversation(&mut w, &contact.peer, &conv);
        LocalStore::write_message(
            &mut w,
            &contact.peer,
            message_key(&contact.peer, local),
            &record,
        );
        self.apply_or_reset(sessions, w)?;
        Ok(Queued {
            id: content.id,
            outbox_key,
        })
    }

    /// Marks the incoming messages of `peer` as read and queues read receipts; false if
    /// there was nothing to mark.
    pub(crate) fn mark_read(&mut self, peer: &PeerId, now: u64) -> Result<bool, EngineError> {
        let Some(contact) = self.store.contact(peer)? else {
            return Ok(false);
        };
        if self.store.blocked(peer)?.is_some() {
            return Ok(false); // they learn nothing, read receipts included
        }
        let mut w = WriteSet::default();
        let mut ids = Vec::new();
        for m in self.store.recent_messages(peer, 500)? {
            if m.direction != Direction::In || m.state != MessageState::Received {
                continue;
            }
            if let Some((key, mut record)) = self.store.message(peer, &MessageId(m.id))? {
                record.state = MessageState::Read;
                w.put_record(TreeId::Messages, key, &record);
                ids.push(MessageId(m.id));
            }
        }
        if ids.is_empty() {
            return Ok(false);
        }
        let receipts_off = self.store.profile()?.is_some_and(|p| p.read_receipts_off);
        self.with_sessions(|this, sessions| {
            for chunk in ids.chunks(kkachi_protocol::content::MAX_RECEIPT_IDS) {
                let receipt = control(
                    Body::Receipt {
                        status: ReceiptStatus::Read,
                        ids: chunk.to_vec(),
                    },
                    now,
                );
                // Without read receipts, read here (and on our other devices); they
                // are not told.
                if !receipts_off {
                    let session = sessions.get(&this.store, &contact)?;
                    this.seal_into(
                        &mut w,
                        &contact,
                        session,
                        &receipt,
                        OutboxKind::Control,
                        now,
                    )?;
                }
                this.copy_to_own(&mut w, sessions, peer, &receipt, now)?;
            }
            this.apply_or_reset(sessions, w)?;
            Ok(true)
        })
    }

    /// Queues our card for every contact if it is newer than the one they were last
    /// sent (a renewal, or a change of relays, that a crash interrupted). Returns how
    /// many contacts it was queued for.
    pub(crate) fn announce_card_if_due(&mut self, now: u64) -> Result<usize, EngineError> {
        match self.store.profile()? {
            Some(p) if p.card_version > p.card_announced => self.queue_card_updates(now),
            _ => Ok(0),
        }
    }

    /// A message stored now disappears at `expires_ms` (0: never): the owner's next
    /// deletion comes no later.
    pub(crate) fn note_expiry_due(&self, expires_ms: u64) {
        if expires_ms == 0 {
            return;
        }
        let mut due = self.expiry_due.lock();
        if due.is_none_or(|d| expires_ms < d) {
            *due = Some(expires_ms);
        }
    }

    /// Sets the conversation's disappearing-message timer (`secs`, 0: off) and tells
    /// the contact. Messages stored from now on disappear that long after, on both sides.
    pub(crate) fn set_timer(
        &mut self,
        peer: &PeerId,
        secs: u32,
        now: u64,
    ) -> Result<(), EngineError> {
        if secs > kkachi_protocol::content::MAX_TIMER_SECS {
            return Err(EngineError::Invalid("a timer may be at most a year".into()));
        }
        if secs != 0 && secs < crate::store::MIN_TIMER_SECS {
            return Err(EngineError::Invalid(format!(
                "the shortest timer is {} seconds",
                crate::store::MIN_TIMER_SECS
            )));
        }
        // Members only met in a group are not written to outside it.
        let Some(contact) = self.store.added_contact(peer)? else {
            return Err(EngineError::Invalid("no such contact".into()));
        };
        let mut conv = self.store.conversation(peer)?;
        conv.timer_secs = secs;
        // Later than any setting taken before, even one from a clock ahead of ours.
        conv.timer_set_ms = now.max(conv.timer_set_ms.saturating_add(1));
        self.with_sessions(|this, sessions| {
            let mut w = WriteSet::default();
            LocalStore::write_conversation(&mut w, peer, &conv);
            let session = sessions.get(&this.store, &contact)?;
            // Dated as the setting is, so the contact orders it as we do.
            let at = conv.timer_set_ms;
            this.queue_control(&mut w, &contact, session, Body::Timer { secs }, at)?;
            let setting = control(Body::Timer { secs }, at);
            this.copy_to_own(&mut w, sessions, peer, &setting, now)?;
            this.apply_or_reset(sessions, w)
        })?;
        self.emit(AppEvent::ContactUpdated(*peer));
        Ok(())
    }

    /// Changes (`Some(text)`) or deletes for everyone (`None`) our message `target` to
    /// `peer`: here at once, and at theirs once the record arrives (SPEC 5).
    pub(crate) fn revise(
        &mut self,
        peer: &PeerId,
        target: MessageId,
        text: Option<String>,
        now: u64,
    ) -> Result<(), EngineError> {
        // Members only met in a group are not written to outside it.
        let Some(contact) = self.store.added_contact(peer)? else {
            return Err(EngineError::Invalid("no such contact".into()));
        };
        let Some((key, mut record)) = self.store.message(peer, &target)? else {
            return Err(EngineError::Invalid(
                "no such message in this conversation".into(),
            ));
        };
        if record.direction != Direction::Out {
            return Err(EngineError::Invalid(
                "only your own messages can be edited or deleted".into(),
            ));
        }
        if record.deleted {
            return Err(EngineError::Invalid(
                "that message is deleted already".into(),
            ));
        }
        let body = match &text {
            Some(text) if text.trim().is_empty() => {
                return Err(EngineError::Invalid("the new text is empty".into()));
            }
            Some(text) => Body::Edit {
                target,
                text: text.clone(),
            },
            None => Body::Delete { target },
        };
        record.revise(text);
        self.send_change(&contact, body, key, &record, now)
    }

    /// Sends `body` (an edit, a delete, a reaction) as our next sequenced record to
    /// `contact`, kept until they confirm it and sealed again on a new session, as a
    /// text is; and writes `record` (the message it changes, as changed here) with it.
    fn send_change(
        &mut self,
        contact: &Contact,
        body: Body,
        key: Vec<u8>,
        record: &MessageRecord,
        now: u64,
    ) -> Result<(), EngineError> {
        let peer = &contact.peer;
        let mut conv = self.store.conversation(peer)?;
        let seq = conv.next_seq.max(1);
        let content = Content {
            id: MessageId(rand::random()),
            seq,
            prev: conv.last_hash,
            sent_at_ms: now,
            body,
        };
        content
            .check()
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        self.with_sessions(|this, sessions| {
            let mut w = WriteSet::default();
            let session = sessions.get(&this.store, contact)?;
            this.seal_into(&mut w, contact, session, &content, OutboxKind::Message, now)?;
            this.copy_to_own(&mut w, sessions, peer, &content, now)?;
            conv.next_seq = seq + 1;
            conv.last_hash = content.hash();
            LocalStore::write_conversation(&mut w, peer, &conv);
            w.put_record(TreeId::Messages, key, record);
            this.apply_or_reset(sessions, w)
        })?;
        self.emit(AppEvent::ContactUpdated(*peer));
        Ok(())
    }

    /// Reacts to message `target` with `peer` (ours or theirs) with `emoji`, replacing
    /// our earlier reaction to it; an empty `emoji` takes ours back. Kept until they
    /// confirm it, like a text.
    pub(crate) fn react(
        &mut self,
        peer: &PeerId,
        target: MessageId,
        emoji: String,
        now: u64,
    ) -> Result<(), EngineError> {
        let emoji = emoji.trim().to_string();
        // Members only met in a group are not written to outside it.
        let Some(contact) = self.store.added_contact(peer)? else {
            return Err(EngineError::Invalid("no such contact".into()));
        };
        if self.store.blocked(peer)?.is_some() {
            return Err(ContactError::Blocked(contact.name.clone()).into());
        }
        let quote = self.quotable(peer, target)?;
        let Some((key, mut record)) = self.store.message(peer, &target)? else {
            unreachable!("quotable found it");
        };
        let body = Body::Reaction {
            target,
            own: quote.ours,
            emoji: emoji.clone(),
        };
        // Checked before anything changes here.
        kkachi_protocol::content::check_reaction(&emoji)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        record.reactions.ours = emoji;
        self.send_change(&contact, body, key, &record, now)
    }

    /// Deletes our copy of message `target` with `peer` only: they keep theirs.
    pub(crate) fn delete_for_me(
        &mut self,
        peer: &PeerId,
        target: MessageId,
    ) -> Result<(), EngineError> {
        let Some((key, _)) = self.store.message(peer, &target)? else {
            return Err(EngineError::Invalid(
                "no such message in this conversation".into(),
            ));
        };
        let mut w = WriteSet::default();
        w.remove(TreeId::Messages, key);
        self.with_sessions(|this, sessions| {
            let told = kkachi_protocol::content::AccountRecord::DeletedForMe {
                peer: *peer,
                id: target,
            };
            this.tell_own(&mut w, sessions, told, super::now_ms())?;
            this.apply_or_reset(sessions, w)
        })?;
        self.sweep_files();
        self.emit(AppEvent::ContactUpdated(*peer));
        Ok(())
    }

    /// Removes the files of messages gone and of people removed or blocked (see
    /// [`crate::files::sweep`]).
    pub(crate) fn sweep_files(&self) {
        if let Err(e) = crate::files::sweep(&self.store) {
            tracing::warn!(error = %e, "cannot remove the files of messages gone");
        }
    }

    /// Sends read receipts (`on`) or not: contacts see their messages read, or only
    /// delivered.
    pub(crate) fn set_read_receipts(&mut self, on: bool) -> Result<(), EngineError> {
        let mut profile = self
            .store
            .profile()?
            .ok_or(StoreError::Corrupt("profile"))?;
        profile.read_receipts_off = !on;
        let mut w = WriteSet::default();
        LocalStore::write_profile(&mut w, &profile);
        self.store.apply(w)?;
        Ok(())
    }

    /// Mutes (or unmutes) the conversation with `peer`: its messages do not ring or
    /// notify.
    pub(crate) fn set_muted(&mut self, peer: &PeerId, muted: bool) -> Result<(), EngineError> {
        if self.store.contact(peer)?.is_none() {
            return Err(EngineError::Invalid("no such contact".into()));
        }
        let mut conv = self.store.conversation(peer)?;
        conv.muted = muted;
        let mut w = WriteSet::default();
        LocalStore::write_conversation(&mut w, peer, &conv);
        self.store.apply(w)?;
        self.emit(AppEvent::ContactUpdated(*peer));
        Ok(())
    }

    /// Deletes the messages whose timer ran out by `now`, in every conversation where
    /// one is due, and notes when the next one is. Returns how many went.
    pub(crate) fn expire_messages(&mut self, now: u64) -> Result<usize, EngineError> {
        let mut gone = 0;
        let mut next: Option<u64> = None;
        for contact in self.store.contacts()?.iter() {
            let conv = self.store.conversation(&contact.peer)?;
            if conv.next_expiry_ms == 0 {
                continue;
            }
            let mut at = conv.next_expiry_ms;
            if at <= now {
                let (n, later) = self.store.delete_expired(&contact.peer, now)?;
                gone += n;
                at = later;
                if n > 0 {
                    self.emit(AppEvent::ContactUpdated(contact.peer));
                }
            }
            if at != 0 && next.is_none_or(|x| at < x) {
                next = Some(at);
            }
        }
        let (in_groups, group_next) = self.expire_group_messages(now)?;
        gone += in_groups;
        if group_next != 0 && next.is_none_or(|x| group_next < x) {
            next = Some(group_next);
        }
        *self.expiry_due.lock() = next;
        if gone > 0 {
            tracing::info!(messages = gone, "disappearing messages deleted");
            self.sweep_files();
        }
        Ok(gone)
    }

    /// Seals again, on the sessions we have now, our messages a restore found not
    /// confirmed as delivered (the backup held no outbox): the same content, so a contact
    /// who has one already recognises it. Returns how many.
    pub(crate) fn resend_restored(&mut self, now: u64) -> Result<usize, EngineError> {
        let pending = self.store.pending_resends()?;
        if pending.is_empty() {
            return Ok(0);
        }
        self.with_sessions(|this, sessions| {
            let mut w = WriteSet::default();
            let mut n = 0;
            for (peer, key, mut record) in pending {
                let Some(contact) = this.store.contact(&peer)? else {
                    continue;
                };
                if this.store.blocked(&peer)?.is_some() {
                    continue;
                }
                let content = crate::store::outgoing_content(&record);
                let session = sessions.get(&this.store, &contact)?;
                this.seal_into(
                    &mut w,
                    &contact,
                    session,
                    &content,
                    OutboxKind::Message,
                    now,
                )?;
                record.state = MessageState::Queued;
                w.put_record(TreeId::Messages, key, &record);
                n += 1;
            }
            LocalStore::clear_resends(&mut w);
            this.apply_or_reset(sessions, w)?;
            Ok(n)
        })
    }

    /// Queues our current card for every contact not blocked (after a relay change),
    /// and records it as announced in the same write.
    pub(crate) fn queue_card_updates(&mut self, now: u64) -> Result<usize, EngineError> {
        let card = self.own_card()?;
        let mut profile = self
            .store
            .profile()?
            .ok_or(StoreError::Corrupt("profile"))?;
        profile.card_announced = profile.card_version;
        self.with_sessions(|this, sessions| {
            let mut w = WriteSet::default();
            LocalStore::write_profile(&mut w, &profile);
            let mut n = 0;
            for contact in this.store.contacts()?.iter() {
                // Someone blocked does not learn where we moved.
                if this.store.blocked(&contact.peer)?.is_some() {
                    continue;
                }
                let session = sessions.get(&this.store, contact)?;
                let body = Body::CardUpdate(Box::new(card.clone()));
                this.queue_control(&mut w, contact, session, body, now)?;
                n += 1;
            }
            this.apply_or_reset(sessions, w)?;
            Ok(n)
        })
    }

    /// Moves a stored message's state forward (never back) and tells the UI.
    pub(crate) fn advance_state(
        &self,
        w: &mut WriteSet,
        contact: &PeerId,
        id: &MessageId,
        state: MessageState,
    ) -> Result<bool, EngineError> {
        let Some((key, mut record)) = self.store.message(contact, id)? else {
            return self.advance_group_copy(w, contact, id, state);
        };
        // Receipts are about what we sent: one naming their own messages changes nothing.
        if record.direction != Direction::Out || !record.state.advances_to(&state) {
            return Ok(false);
        }
        record.state = state;
        w.put_record(TreeId::Messages, key, &record);
        self.emit(AppEvent::State {
            contact: *contact,
            id: *id,
            state,
        });
        Ok(true)
    }

    /// Records a relay's health and tells the UI.
    pub(crate) fn note_relay(&self, addr: &str, result: Result<(), super::RelayError>) {
        let up = result.is_ok();
        // Our own relays (the only ones with a record): a change is logged, so the log
        // tells an outage's story (the UI's log file, a daemon's standard error).
        let _ = self.store.update_relay(addr, |r| {
            let was_down = r.last_error.is_some();
            match result {
                Ok(()) => {
                    if was_down {
                        tracing::info!(relay = %addr, "our relay answers again");
                    }
                    r.last_ok_ms = Some(super::now_ms());
                    r.last_error = None;
                }
                Err(e) => {
                    if !was_down {
                        tracing::warn!(relay = %addr, error = %e, "our relay does not answer; the others carry our messages meanwhile");
                    }
                    r.last_error = Some(e.to_string());
                }
            }
        });
        self.emit(AppEvent::Relay {
            addr: addr.to_owned(),
            up,
        });
    }
}
