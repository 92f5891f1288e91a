//! Receiving: each envelope on its own, from opening to a durable outcome.
//!
//! Every byte of an envelope is someone else's choice, so each one is handled in
//! isolation, in its own write set: it is either applied (a message stored, a receipt
//! or card taken in), held (a first message from someone who is not a contact yet),
//! refused for good (the reason is logged), or skipped (already handled, expired, not
//! ours). Only the first three mark it seen, in the same write set as the outcome: an
//! envelope is never marked seen before what it led to is written, and a store failure
//! stops the batch without marking anything it did not finish. Nothing a sender chose
//! sizes an allocation unchecked ([`crate::sequence`] keeps gaps as bounded ranges), and
//! should reading one envelope still panic (a bug), that envelope alone is refused and
//! the rest of the batch goes on: one bad envelope never silences anyone.
//!
//! Delivery receipts are queued as markers in each message's write set and sealed once
//! per contact at the end of the batch; markers a crash left behind are sealed by the
//! next batch. Nothing is acknowledged (receipt, relay delete, direct answer) before it
//! is durable: the caller flushes first.

use std::borrow::Cow;
use std::panic::{AssertUnwindSafe, catch_unwind};

use kkachi_protocol::envelope::{CLOCK_SKEW_SECS, MAX_TTL_SECS};
use kkachi_protocol::session::{self, InitPacket, RETAIN_SECS};
use kkachi_protocol::{
    Body, Content, Envelope, MessageId, Opened, PeerId, ReceiptStatus, SessionError,
};

use super::state::{Device, PeerSessions, Sessions, State};
use super::{AppEvent, EngineError};
use crate::sequence::{ChainCheck, ChainLink, Gaps, note_break};
use crate::store::{
    Contact, Direction, FileNote, HeldMessage, LocalStore, MAX_HELD_PER_SENDER, MAX_HELD_TOTAL,
    MAX_STORED_PER_CONTACT, MessageRecord, MessageState, Quote, TreeId, WriteSet, message_key,
};

/// A message shown to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Who sent it.
    pub contact: PeerId,
    /// Their name.
    pub name: String,
    /// The message.
    pub message: MessageRecord,
    /// Their sequence numbers still missing after this one arrived.
    pub gaps: Gaps,
    /// `None` for a new message; otherwise `message` is an earlier one (theirs or
    /// ours), as this change of theirs left it.
    pub change: Option<Change>,
    /// The group it was sent to; `None` for a 1:1 message.
    pub group: Option<super::groups::GroupTag>,
}

/// A contact's change to a message already shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// They changed the text of their message.
    Edited,
    /// They deleted their message for everyone.
    Deleted,
    /// They reacted to it, or took their reaction back (an empty reaction).
    Reacted,
}

impl Change {
    /// Its name in JSON output.
    pub fn label(self) -> &'static str {
        match self {
            Change::Edited => "edited",
            Change::Deleted => "deleted",
            Change::Reacted => "reaction",
        }
    }
}

/// Where a batch of envelopes comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// A relay or a direct path: envelopes already handled are skipped.
    Network,
    /// A bundle carried by hand: like the network, except that a first message from
    /// someone who is not a contact is not held from it (it goes through the relay's
    /// contact-request queue, and its quota, instead).
    Bundle,
    /// Messages held from `PeerId` while they were not a contact, now accepted: they
    /// were marked seen when held, and each leaves the held ones as it is applied.
    Held(PeerId),
}

/// What became of one envelope.
#[derive(Debug)]
pub(super) enum Outcome {
    /// A new message to show.
    Shown(Box<Received>),
    /// New messages to show: a group's, which waited for its operations.
    ShownSeveral(Vec<Received>),
    /// Taken in: a receipt, a card, a copy of something stored, an unknown kind.
    Applied(&'static str),
    /// Held: a first message from someone who is not a contact.
    Held(PeerId),
    /// Held without being a message request: a group record from someone not yet
    /// known as a member of that group.
    HeldQuietly,
    /// Refused for good, and remembered as handled (it opened, so copies of it are
    /// recognised without opening them again).
    Refused(Cow<'static, str>),
    /// Not for us to read: it does not open, or is not an envelope we may take. Not
    /// remembered (nothing of it is kept), so nobody can make the list of handled
    /// envelopes grow with bytes that mean nothing.
    Dropped(Cow<'static, str>),
    /// Not handled now, and not marked: already seen, expired, not ours.
    Skipped(&'static str),
}

/// How a held message is kept: the envelope as it came (a first message, opened
/// again on accepting), or the content (opened on the session of a member met in a
/// group, which cannot open it twice).
enum Held {
    Sealed(Vec<u8>),
    Opened(Vec<u8>),
}

/// Why a key change is not taken: for good, or not yet.
enum Wait {
    Never(&'static str),
    Later(&'static str),
}

/// What became of one envelope, as a direct sender is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Taken in (shown, or nothing more to do).
    Taken,
    /// Held as a message request: not confirmed to its sender.
    Held,
    /// Handled before.
    Duplicate,
    /// Refused, or cannot be read.
    Refused,
}

/// Why an envelope is skipped when it was handled before.
const SEEN: &str = "already handled";

/// An outbox entry is sealed again on a new session at most this often (10 minutes).
pub(crate) const RESEAL_EVERY_MS: u64 = 10 * 60 * 1000;
/// A contact's session key is taken to change at most once in this long: each change
/// costs our relays a withdrawal and a grant. One sooner is left unmarked, so the copy
/// its sender puts again later is taken.
pub(crate) const ROTATION_EVERY_MS: u64 = 10 * 60 * 1000;

/// A transport packet opened by a contact's session, or why it is refused.
type TransportResult = Result<(Contact, Device, Opened), &'static str>;

/// What a contact's new session key is, as their device set says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NewKey {
    /// Another device of their account.
    Device,
    /// The card's device under a new key.
    CardChange,
    /// The set does not say; whether it lists other devices than the card's.
    Unknown { several: bool },
}

/// How a batch went, for the caller.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// New texts, in the order they were applied.
    pub(crate) shown: Vec<Received>,
    /// Senders of new message requests.
    pub(crate) held: Vec<PeerId>,
    /// What became of each envelope, in order.
    pub(crate) verdicts: Vec<Verdict>,
    /// Receipts were sealed into the outbox.
    pub(crate) receipts: bool,
}

fn refused(reason: impl Into<Cow<'static, str>>) -> Result<Outcome, EngineError> {
    Ok(Outcome::Refused(reason.into()))
}

fn dropped(reason: impl Into<Cow<'static, str>>) -> Result<Outcome, EngineError> {
    Ok(Outcome::Dropped(reason.into()))
}

/// What a stored record costs beyond its text, for [`MAX_STORED_PER_CONTACT`]: the
/// record, its index entries and its hash-chain link.
const RECORD_OVERHEAD: u64 = crate::store::RECORD_CHARGE;

impl<T> State<T> {
    /// Reads `envelopes`, each in its own write set, applied (not yet flushed), then
    /// seals the receipts due. New texts are announced as [`AppEvent::Incoming`] as they
    /// are applied; the caller announces them durable once it has flushed. An `Err` is a
    /// failure of the local store: what was not finished is not marked, so it comes
    /// again.
    pub(crate) fn receive(
        &mut self,
        envelopes: &[Envelope],
        source: Source,
        now: u64,
    ) -> Result<Tally, EngineError> {
        let mut tally = Tally::default();
        let result = self.with_sessions(|this, sessions| {
            for envelope in envelopes {
                this.receive_envelope(sessions, envelope, source, now, &mut tally)?;
            }
            tally.receipts = this.seal_due_receipts(sessions, now)?;
            Ok(())
        });
        // What was applied is announced durable once flushed, even if a later envelope
        // failed: it is in the store.
        self.announced.extend(tally.shown.iter().cloned());
        self.requests.extend(tally.held.iter().copied());
        result?;
        self.after_groups_changed(now, &mut tally)?;
        Ok(tally)
    }

    /// After a batch (whose outcome is in the store already: nothing here fails it):
    /// what members met in it sent before we knew them is taken in, what we wrote to
    /// their groups meanwhile goes to them, and members met in groups we no longer
    /// share are forgotten. Taking in what they sent receives again, and may meet more
    /// people: they are handled in the same loop, not by a nested one.
    fn after_groups_changed(&mut self, now: u64, tally: &mut Tally) -> Result<(), EngineError> {
        use std::sync::atomic::Ordering;
        if self.meeting.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        loop {
            let met = std::mem::take(&mut *self.newly_met.lock());
            if met.is_empty() {
                break;
            }
            for peer in met {
                match self.adopt_held_from(&peer, now) {
                    Ok(shown) => tally.shown.extend(shown),
                    Err(e) => {
                        tracing::warn!(member = %peer, error = %e, "could not take in what a member sent before we met")
                    }
                }
                // (Also at upkeep, for a run that stopped before this.)
                if let Err(e) = self.catch_up(&peer, now) {
                    tracing::warn!(member = %peer, error = %e, "could not seal what a member missed");
                }
            }
        }
        self.meeting.store(false, Ordering::SeqCst);
        if self.members_left.swap(false, Ordering::SeqCst)
            && let Err(e) = self.forget_former_members(now)
        {
            tracing::warn!(error = %e, "could not forget members of groups we left");
        }
        Ok(())
    }

    /// Takes in what was held from `peer` opened already (1:1 messages of a member met
    /// in a group, a contact now), in the sender's order.
    pub(crate) fn receive_opened(
        &mut self,
        peer: &PeerId,
        held: Vec<HeldMessage>,
        now: u64,
    ) -> Result<Vec<Received>, EngineError> {
        let Some(contact) = self.store.added_contact(peer)? else {
            return Ok(Vec::new());
        };
        let mut shown = Vec::new();
        let result = self.with_sessions(|this, sessions| {
            for m in held {
                let mut w = WriteSet::default();
                LocalStore::release_held_id(&mut w, peer, &m.message_id);
                let outcome = match Content::decode(&m.opened) {
                    Ok(content) => {
                        this.apply_content(&mut w, sessions, &contact, None, content, now)?
                    }
                    Err(e) => Outcome::Refused(format!("unreadable held message: {e}").into()),
                };
                this.apply_or_reset(sessions, w)?;
                match outcome {
                    Outcome::Shown(r) => shown.push(*r),
                    Outcome::ShownSeveral(rs) => shown.extend(rs),
                    other => tracing::debug!(?other, "a held message taken in"),
                }
            }
            this.seal_due_receipts(sessions, now)?;
            Ok(())
        });
        for r in &shown {
            self.emit(AppEvent::Incoming(r.clone()));
        }
        self.announced.extend(shown.iter().cloned());
        result?;
        Ok(shown)
    }

    /// One envelope, in isolation: a panic while reading it refuses it alone.
    fn receive_envelope(
        &self,
        sessions: &mut Sessions,
        envelope: &Envelope,
        source: Source,
        now: u64,
        tally: &mut Tally,
    ) -> Result<(), EngineError> {
        let id = envelope.id();
        let attempt = catch_unwind(AssertUnwindSafe(|| {
            let mut w = WriteSet::default();
            self.receive_one(&mut w, sessions, envelope, source, now)
                .map(|outcome| (outcome, w))
        }));
        let (outcome, mut w) = match attempt {
            Ok(done) => done?,
            Err(_) => {
                // Memory may be half-changed: take the sessions again from the store,
                // which holds what the envelopes before this one left.
                sessions.reset();
                self.faults
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(envelope = %id, "reading an envelope panicked; it is refused");
                let outcome = Outcome::Refused("reading it failed (a bug in kkachi)".into());
                (outcome, WriteSet::default())
            }
        };
        let handled = !matches!(outcome, Outcome::Skipped(_) | Outcome::Dropped(_));
        if handled {
            // Remembered until it expires (receive_one refused expiries further ahead
            // than any envelope may have).
            LocalStore::write_seen(&mut w, &id, envelope.expires_at);
        }
        if let Source::Held(peer) = source
            && !matches!(outcome, Outcome::Skipped(_))
        {
            self.store.release_held(&mut w, &peer, envelope)?;
        }
        self.apply_or_reset(sessions, w)?;
        self.note_outcome(&id, outcome, tally);
        Ok(())
    }

    fn note_outcome(&self, id: &kkachi_protocol::EnvelopeId, outcome: Outcome, tally: &mut Tally) {
        let verdict = match outcome {
            Outcome::Shown(r) => {
                // In the store now: a view of it may show it while it goes to the disk.
                self.emit(AppEvent::Incoming((*r).clone()));
                tally.shown.push(*r);
                Verdict::Taken
            }
            Outcome::ShownSeveral(shown) => {
                for r in shown {
                    self.emit(AppEvent::Incoming(r.clone()));
                    tally.shown.push(r);
                }
                Verdict::Taken
            }
            Outcome::Applied(what) => {
                tracing::debug!(envelope = %id, what, "applied");
                Verdict::Taken
            }
            Outcome::HeldQuietly => {
                tracing::info!(envelope = %id, "held a group record from someone not yet known as a member");
                Verdict::Held
            }
            Outcome::Held(peer) => {
                tracing::info!(envelope = %id, from = %peer, "held a message from someone who is not a contact");
                if !tally.held.contains(&peer) {
                    tally.held.push(peer);
                }
                Verdict::Held
            }
            Outcome::Refused(reason) | Outcome::Dropped(reason) => {
                tracing::info!(envelope = %id, %reason, "envelope refused");
                Verdict::Refused
            }
            Outcome::Skipped(why) => {
                tracing::trace!(envelope = %id, why, "skipped");
                if why == SEEN {
                    Verdict::Duplicate
                } else {
                    Verdict::Refused
                }
            }
        };
        tally.verdicts.push(verdict);
    }

    /// Opens one envelope and writes what it leads to into `w` (the caller marks it
    /// seen there). `Err` only for a failure of the local store.
    fn receive_one(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        envelope: &Envelope,
        source: Source,
        now: u64,
    ) -> Result<Outcome, EngineError> {
        if matches!(source, Source::Network | Source::Bundle) && self.store.seen(&envelope.id())? {
            return Ok(Outcome::Skipped(SEEN));
        }
        let now_s = now / 1000;
        if envelope.expires_at.saturating_add(CLOCK_SKEW_SECS) < now_s {
            return Ok(Outcome::Skipped("expired"));
        }
        // What a relay may not accept, a client does not either: an expiry this far
        // ahead would keep its id remembered (and a request held) for ever.
        if envelope.expires_at > now_s + MAX_TTL_SECS + CLOCK_SKEW_SECS {
            return Ok(Outcome::Skipped(
                "expires further ahead than any envelope may",
            ));
        }
        let packet = match session::parse(&envelope.payload) {
            Ok(p) => p,
            Err(e) => return dropped(format!("unreadable: {e}")),
        };
        // Nothing outside tells a first message from a transport packet: the session
        // tag is looked up first (no cryptography), then the packet is tried as a first
        // message to us (one handshake), and only then, within a small allowance, on
        // every session.
        let contacts = self.store.contacts()?;
        // Our account's other devices are read as one more peer.
        let own = self.own_contact()?;
        let everyone = (&contacts[..], own.as_ref());
        sessions.index_all(&self.store, &contacts, own.as_ref())?;
        let owner = sessions.owner_of(packet.tag());
        if owner.is_some()
            && let Some(found) = self.open_transport(w, sessions, everyone, &packet, owner, now)?
        {
            return match found {
                Ok((contact, device, opened)) => {
                    self.after_opening(w, sessions, contact, device, opened, now)
                }
                Err(reason) => refused(reason),
            };
        }
        let first = match session::open_first(&self.me, &packet) {
            // Sealed to our session key before its last rotation, while that can
            // still arrive: two more Diffie–Hellman operations for a packet no session
            // expects.
            Err(SessionError::Crypto) if let Some(previous) = &self.previous => {
                session::open_first(&previous.identity, &packet).map(|init| (init, true))
            }
            other => other.map(|init| (init, false)),
        };
        let (contact, device, opened) = match first {
            Ok((init, under_old_key)) => {
                match self.open_first(w, sessions, envelope, init, source, under_old_key, now)? {
                    Ok(x) => x,
                    Err(outcome) => return Ok(outcome),
                }
            }
            Err(SessionError::Crypto) => {
                if owner.is_some() || !sessions.take_fallback(now) {
                    return dropped("no session of ours expects it");
                }
                match self.open_transport(w, sessions, everyone, &packet, None, now)? {
                    Some(Ok(x)) => x,
                    Some(Err(reason)) => return refused(reason),
                    None => return dropped("no session of ours opens it"),
                }
            }
            Err(e) => return dropped(format!("unreadable first message: {e}")),
        };
        self.after_opening(w, sessions, contact, device, opened, now)
    }

    /// Tries a transport packet on the sessions of `owner`, the contact and which
    /// device of theirs (every device of everyone when `None`). The result says whose
    /// it was, or why an opened one is refused.
    /// `None` if none opens it; the inner `Err` says why an opened one is refused.
    fn open_transport(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        (contacts, own): (&[Contact], Option<&Contact>),
        packet: &session::Packet,
        owner: Option<(PeerId, Device)>,
        now: u64,
    ) -> Result<Option<TransportResult>, EngineError> {
        for contact in contacts
            .iter()
            .chain(own)
            .filter(|c| owner.is_none_or(|(peer, _)| c.peer == peer))
        {
            let peer_sessions = sessions.get(&self.store, contact)?;
            let mut found = None;
            for (device, session) in peer_sessions.each() {
                if owner.is_some_and(|(_, d)| d != device) {
                    continue;
                }
                if let Some(result) = session.open_transport(&self.me, packet, now / 1000) {
                    found = Some((device, result));
                    break;
                }
            }
            let Some((device, result)) = found else {
                continue;
            };
            // Whatever it did to the session is kept with the outcome.
            peer_sessions.write(w, &contact.peer);
            return Ok(Some(match result {
                // Opened only to know whose it is: dropped unread.
                Ok(_) if self.store.blocked(&contact.peer)?.is_some() => {
                    Err("from a blocked contact")
                }
                Ok(opened) => Ok((contact.clone(), device, opened)),
                Err(SessionError::Replay) => Err("a copy of a message already read"),
                Err(_) => Err("it opened but its frame is malformed"),
            }));
        }
        Ok(None)
    }

    /// What follows an opened packet from `device` of `contact`: the session's
    /// changes, then its content.
    fn after_opening(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        contact: Contact,
        device: Device,
        opened: Opened,
        now: u64,
    ) -> Result<Outcome, EngineError> {
        // What opening it changed (a counter received, a session confirmed, offered or
        // retired) changes what the contact's sessions expect next.
        sessions.reindex(&contact.peer);
        if device.is_none()
            && sessions
                .get(&self.store, &contact)?
                .card_removed_at
                .is_some()
        {
            // Sealed on a session with the device their account took out (when, only
            // its sender says): whoever still holds its keys does not speak for them.
            return refused("from a device their account took out");
        }
        let switched = opened.peer_reset || opened.switched;
        if switched || self.stale.lock().contains(&contact.peer) {
            // The peer lost its state (it cannot open what we sealed before), or we
            // seal on a new session now (the old one will soon open nothing): what the
            // peer has not confirmed is sealed again on the session we use now.
            let why = if opened.peer_reset {
                "the contact lost its session"
            } else {
                "a new session replaced the old one"
            };
            let session = sessions.get(&self.store, &contact)?;
            // A failure to seal again must not refuse the message that led to it.
            let mut again = WriteSet::default();
            let resealed = self
                .reseal_stale(&mut again, &contact, session, why, now)
                .and_then(|_| {
                    // A card update sent on the old session may sit unread on a relay
                    // until the old keys are gone, and is not kept for sealing again:
                    // the card goes once more (only if it ever changed).
                    if !switched {
                        return Ok(());
                    }
                    let card = self.own_card()?;
                    let mut resent = self.card_resent.lock();
                    let recently = resent
                        .get(&contact.peer)
                        .is_some_and(|t| now.saturating_sub(*t) < RESEAL_EVERY_MS);
                    // (Our own devices know our card and set.)
                    if !recently && contact.peer != self.me.peer_id() {
                        resent.insert(contact.peer, now);
                        if card.version() > 1 {
                            let body = Body::CardUpdate(Box::new(card));
                            self.queue_control(&mut again, &contact, session, body, now)?;
                        }
                        // Our device set, likewise (it was sent once, when we met).
                        if let Some(set) = self.store.own_devices(&self.me)? {
                            self.queue_devices(&mut again, &contact, session, &set, now)?;
                        }
                    }
                    Ok(())
                });
            match resealed {
                Ok(()) => w.extend(again),
                Err(e) => {
                    tracing::warn!(contact = %contact.peer, error = %e, "could not seal again")
                }
            }
            session.write(w, &contact.peer);
        }
        let content = match Content::decode(&opened.body) {
            Ok(c) => c,
            Err(e) => return refused(format!("unreadable content from {}: {e}", contact.peer)),
        };
        self.apply_content(w, sessions, &contact, device, content, now)
    }

    /// A first message: from a contact (by both keys) it is accepted into their
    /// session; from anyone else not blocked it is held as a request. The inner `Err`
    /// is an outcome that ends the envelope here. One sealed to our session key before
    /// its rotation (`under_old_key`) is only opened: our sessions are all under the
    /// new key, so it changes none of them (the contact learns the new key from what
    /// we send).
    #[allow(clippy::too_many_arguments)]
    fn open_first(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        envelope: &Envelope,
        init: Box<InitPacket>,
        source: Source,
        under_old_key: bool,
        now: u64,
    ) -> Result<Result<(Contact, Device, Opened), Outcome>, EngineError> {
        let card = init.sender_card().clone();
        let peer = card.identity().peer_id();
        let end = |reason: &'static str| Ok(Err(Outcome::Refused(reason.into())));
        if peer == self.me.peer_id() {
            // Another device of our account (SPEC §15.2), if our set lists its key.
            let key = *init.remote_static();
            let listed = match self.own_contact()? {
                Some(own)
                    if sessions.get(&self.store, &own)?.devices.contains_key(&key)
                        || self.own_set_carried_lists(&init, &key)? =>
                {
                    own
                }
                _ => return end("a first message that claims to be from ourselves"),
            };
            return self.open_from_device(w, sessions, &listed, init, under_old_key, now);
        }
        if self.store.blocked(&peer)?.is_some() {
            return end("from a blocked sender");
        }
        let contacts = self.store.contacts()?;
        let met;
        let contact = match contacts.iter().find(|c| c.peer == peer) {
            Some(c) => c,
            // A member of a group we are in, whose card has not reached us yet (the
            // first message carries it, and its sealing proves the key is theirs).
            None if source == Source::Network
                && self.in_a_group_with(card.identity())?
                && let Some(c) = self.meet(w, &card, true, now)? =>
            {
                met = c;
                &met
            }
            None if source == Source::Bundle => {
                return Ok(Err(Outcome::Dropped(
                    "a message request from a bundle (it is put into our request queue instead)"
                        .into(),
                )));
            }
            // Being accepted, yet not a contact (removed meanwhile): it stays held.
            None if source != Source::Network => {
                return Ok(Err(Outcome::Skipped("the sender is not a contact")));
            }
            None => return self.hold(w, envelope, &init, now).map(Err),
        };
        let key = *init.remote_static();
        let new_key = if key == *contact.card.identity().x25519() {
            None
        } else {
            Some(self.new_key_is(contact, &init, sessions)?)
        };
        if new_key == Some(NewKey::Device) {
            return self.open_from_device(w, sessions, contact, init, under_old_key, now);
        }
        if key == *contact.card.identity().x25519()
            && sessions
                .get(&self.store, contact)?
                .card_removed_at
                .is_some()
        {
            // Whoever still holds the keys of a device their account took out does not
            // speak for them (what that device sent and we did not confirm, it sends
            // again under its new key, if it changed key).
            return end("from a device their account took out");
        }
        // A newer card binding another session key, in a message sealed with that key
        // (which proves its sender holds it): the contact rotated its key.
        let mut rotated = card.rotates(&contact.card);
        if rotated
            && let Some(NewKey::Unknown { several }) = new_key
            && (several || !sessions.get(&self.store, contact)?.devices.is_empty())
        {
            // An account with several devices: a new key is a change of the card's,
            // or another device, as the set that comes with it says; until it has
            // come, the message waits (its sender puts it again).
            return Ok(Err(Outcome::Skipped(
                "a new key of an account with several devices, before its set",
            )));
        }
        if contact.card.identity().x25519() != init.remote_static() && !rotated {
            return end("a first message under a session key their card does not carry");
        }
        let now_s = now / 1000;
        if rotated && self.names_removed_device(&card)? {
            // Whoever kept a copy of a device their account took out does not get
            // sealed to again, whatever card they sign.
            return end("a change to a session key their account took out");
        }
        if rotated {
            match self.may_rotate(contact, &card, &init, under_old_key, now) {
                Ok(()) => {}
                Err(Wait::Later(why)) => return Ok(Err(Outcome::Skipped(why))),
                Err(Wait::Never(why)) => return end(why),
            }
            if let Some(other) = contacts
                .iter()
                .find(|c| c.peer != peer && c.card.identity().x25519() == card.identity().x25519())
            {
                // The first message proves who holds the key; a card that merely
                // names it (an invite code needs no proof) loses.
                tracing::warn!(contact = %other.peer, holder = %peer, "a contact's card names a session key another contact proved holding: that card is forged");
            }
        }
        let session = sessions.get(&self.store, contact)?;
        let old_remote = *session.remote();
        if rotated {
            // Their handshakes under the old key can no longer complete; the first
            // message itself retires the session they dropped (a new instance).
            session.peer_rotated(*card.identity().x25519(), now_s);
        }
        let result = if under_old_key {
            // Sealed to our key before its rotation: not under any session of ours.
            opened_late(&init, now_s)
        } else {
            session.accept_init(&self.me, init, now_s)
        };
        if rotated && !matches!(&result, Ok(o) if !o.late) {
            // Only a message taken as new may change their key.
            // (The session it retired stays retired: what waits goes again on a new
            // one, as after lost state.)
            session.peer_rotated(old_remote, now_s);
            self.stale.lock().insert(contact.peer);
            rotated = false;
        }
        if rotated {
            self.take_rotation(w, contact, now)?;
            // The card's device is under a key their account did not take out (that
            // was checked), and is no longer another device of theirs as well.
            let new = *card.identity().x25519();
            session.card_removed_at = None;
            if session.devices.remove(&new).is_some() {
                LocalStore::remove_device_session(w, &contact.peer, &new);
                for key in self.store.outbox_keys_of_device(&contact.peer, &Some(new)) {
                    w.remove(TreeId::Outbox, key.to_be_bytes().to_vec());
                }
            }
        }
        session.write(w, &contact.peer);
        let mut contact = contact.clone();
        if card.supersedes(&contact.card) || rotated {
            // Their newest card rides every first message: take it like a card update
            // (signed, and newer, whatever became of the message; a new key goes with
            // the session that now expects it).
            contact.name =
                super::contacts::name_with_card(&self.store.added_contacts()?, &contact, &card);
            contact.card = card;
            LocalStore::write_contact(w, &contact);
            self.emit(AppEvent::ContactUpdated(contact.peer));
        }
        let opened = match result {
            Ok(opened) => opened,
            Err(SessionError::Replay) => return end("a copy of a message already read"),
            Err(SessionError::TooOld) => return end("a first message older than any envelope"),
            Err(_) => return end("a first message that does not fit their session"),
        };
        Ok(Ok((contact, None, opened)))
    }

    /// What a first message `init` from `contact`, sealed with another session key
    /// than their card's, is (SPEC §15), as their device set says: the set we keep,
    /// with the one this message carries if it carries one (as a device's first words
    /// do). Another device of theirs if we hold a session with it already, or the set
    /// lists it while it still lists the card's device; a change of the card's key if
    /// the set lists it and took the card's key out (one edit does both); `Unknown`
    /// if the set does not list it.
    fn new_key_is(
        &self,
        contact: &Contact,
        init: &InitPacket,
        sessions: &mut Sessions,
    ) -> Result<NewKey, EngineError> {
        let key = init.remote_static();
        if sessions
            .get(&self.store, contact)?
            .devices
            .contains_key(key)
        {
            return Ok(NewKey::Device);
        }
        let account = contact.card.identity().ed25519();
        let card = contact.card.identity().x25519();
        let says = |set: &kkachi_protocol::device::DeviceSet| match set.device(key) {
            None => NewKey::Unknown {
                several: set.devices().nth(1).is_some(),
            },
            Some(_) if set.device(card).is_some() => NewKey::Device,
            Some(_) => NewKey::CardChange,
        };
        let mut set = self.store.contact_devices(&contact.peer, account)?;
        if let Some(kept) = &set
            && says(kept) == NewKey::Device
        {
            return Ok(NewKey::Device);
        }
        if let Ok(Content {
            body: Body::Devices(bytes),
            ..
        }) = Content::decode(init.body())
            && let Ok(carried) = kkachi_protocol::device::DeviceSet::decode(account, &bytes)
        {
            match &mut set {
                Some(kept) => {
                    if kept.merge(&carried).is_err() {
                        // A merge refused for the bound keeps what was kept; what the
                        // carried set says of this key still says what it is.
                        return Ok(says(&carried));
                    }
                }
                None => set = Some(carried),
            }
        }
        Ok(set
            .as_ref()
            .map_or(NewKey::Unknown { several: false }, says))
    }

    /// A first message from another device of `contact`'s account: opened into our
    /// session with that device, which starts with it (its first message proves it
    /// holds the key). Their card stays the one we keep: the card names the device
    /// it came with, and every device of theirs is sealed to from now on.
    fn open_from_device(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        contact: &Contact,
        init: Box<InitPacket>,
        under_old_key: bool,
        now: u64,
    ) -> Result<Result<(Contact, Device, Opened), Outcome>, EngineError> {
        let end = |reason: &'static str| Ok(Err(Outcome::Refused(reason.into())));
        let key = *init.remote_static();
        let now_s = now / 1000;
        if key == self.me.x25519_public() {
            return end("a device of theirs under our own session key");
        }
        let card = init.sender_card();
        if card.check_fresh(now_s).is_err() {
            return end("a first message from a device of theirs with an out-of-date card");
        }
        if self
            .previous
            .as_ref()
            .is_some_and(|p| p.identity.x25519_public() == key)
        {
            return end("a device of theirs under our previous session key");
        }
        // One key, one person (2): a key another contact's card names is not also a
        // device of this one's. (Our own devices are known by our signed set, which
        // no contact's card can overrule.)
        if contact.peer != self.me.peer_id()
            && let Some(other) = self
                .store
                .contacts()?
                .iter()
                .find(|c| c.peer != contact.peer && *c.card.identity().x25519() == key)
        {
            tracing::warn!(contact = %contact.peer, holder = %other.peer, "a contact's device proved a key another contact's card names: that card is forged");
            return end("a device under a key another contact's card names");
        }
        let peer_sessions = sessions.get(&self.store, contact)?;
        let known = peer_sessions.devices.contains_key(&key);
        if !known && peer_sessions.devices.len() + 1 >= kkachi_protocol::device::MAX_DEVICES {
            return end("a device beyond the most an account lists");
        }
        let result = if under_old_key {
            // Sealed to our key before its rotation: opened, no session of ours changes.
            opened_late(&init, now_s)
        } else {
            let mut fresh = None;
            let session = match peer_sessions.devices.get_mut(&key) {
                Some(s) => s,
                None => fresh.insert(kkachi_protocol::Session::new(key)),
            };
            let result = session.accept_init(&self.me, init, now_s);
            if let Some(session) = fresh
                && result.is_ok()
            {
                peer_sessions.devices.insert(key, session);
                // Our relays grant the new device's capability too.
                self.grants_changed();
                tracing::info!(contact = %contact.peer, "a contact's other device wrote for the first time");
            }
            result
        };
        peer_sessions.write(w, &contact.peer);
        match result {
            Ok(opened) => Ok(Ok((contact.clone(), Some(key), opened))),
            Err(SessionError::Replay) => end("a copy of a message already read"),
            Err(SessionError::TooOld) => end("a first message older than any envelope"),
            Err(_) => end("a first message that does not fit their session"),
        }
    }

    /// Whether `contact` may rotate its session key to the one `card` binds, in the
    /// first message `init`: never to ours, from a card that has run out, in a message
    /// sealed to our previous key or older than any envelope, or twice within
    /// [`ROTATION_EVERY_MS`] (each change makes our relays withdraw a capability and
    /// grant another).
    fn may_rotate(
        &self,
        contact: &Contact,
        card: &kkachi_protocol::Card,
        init: &InitPacket,
        under_old_key: bool,
        now: u64,
    ) -> Result<(), Wait> {
        let now_s = now / 1000;
        if *card.identity().x25519() == self.me.x25519_public() {
            return Err(Wait::Never("a new session key that is ours"));
        }
        if card.check_fresh(now_s).is_err() || init.sent_at().saturating_add(RETAIN_SECS) < now_s {
            return Err(Wait::Never(
                "a change of session key in an out-of-date card or message",
            ));
        }
        if under_old_key {
            return Err(Wait::Never(
                "a change of session key sealed to our previous key",
            ));
        }
        let last = self.rotations.lock().get(&contact.peer).copied();
        if last.is_some_and(|t| now.saturating_sub(t) < ROTATION_EVERY_MS) {
            return Err(Wait::Later(
                "a second change of session key within ten minutes (taken when put again)",
            ));
        }
        Ok(())
    }

    /// `contact` rotated its session key (taken from a first message sealed with the
    /// new one): our relays withdraw the capability of the old key and grant the new
    /// one's, and what waits for them sealed to the old key goes again, to the new one
    /// (marked in `w`, so a restart before that still does it).
    pub(crate) fn take_rotation(
        &self,
        w: &mut WriteSet,
        contact: &Contact,
        now: u64,
    ) -> Result<(), EngineError> {
        self.rotations.lock().insert(contact.peer, now);
        // Sealed again soon, whether or not they send anything first.
        let mut due = self.stale_due.lock();
        *due = Some(due.map_or(now, |d| d.min(now)));
        drop(due);
        // Withdrawn, and every grant told again (the new key's among them).
        self.revoked.lock().push(*contact.card.identity().x25519());
        // What waits for them sealed to the old key, first messages too, is marked to
        // go again on the new one (soon: `stale_due` above).
        for key in self.store.outbox_keys_of_device(&contact.peer, &None) {
            if let Some(mut entry) = self.store.outbox_entry(key)?
                && entry.sealed_on.is_none()
            {
                entry.sealed_on = Some(crate::store::SEALED_UNDER_AN_OLD_KEY);
                LocalStore::write_outbox(w, key, &entry);
            }
        }
        self.stale.lock().insert(contact.peer);
        tracing::info!(contact = %contact.peer, "a contact rotated its session key");
        Ok(())
    }

    /// Holds a first message from someone who is not a contact, within the bounds.
    fn hold(
        &self,
        w: &mut WriteSet,
        envelope: &Envelope,
        init: &InitPacket,
        now: u64,
    ) -> Result<Outcome, EngineError> {
        let content = match Content::decode(init.body()) {
            Ok(c) => c,
            Err(e) => return refused(format!("unreadable content from a stranger: {e}")),
        };
        let held = Held::Sealed(envelope.encode());
        self.hold_message(
            w,
            init.sender_card(),
            &content,
            held,
            envelope.expires_at,
            now,
        )
    }

    /// A message of a 1:1 chat from a member met in a group, who is not a contact:
    /// held as a message request (opened already, so it is kept opened), as a
    /// stranger's would be. Anything else of a 1:1 chat from them is refused. Either
    /// way its number counts as arrived: it is no gap in what they send the group.
    fn hold_opened(
        &self,
        w: &mut WriteSet,
        contact: &Contact,
        device: &Device,
        content: &Content,
        now: u64,
    ) -> Result<Outcome, EngineError> {
        let expires_at = (now / 1000).saturating_add(kkachi_protocol::envelope::DEFAULT_TTL_SECS);
        let held = Held::Opened(content.encode());
        let text = matches!(content.body, Body::Text(_) | Body::TimedText { .. });
        let outcome = self.hold_message(w, &contact.card, content, held, expires_at, now)?;
        // Its number counts as arrived once it is held, or refused for its kind: a
        // text refused only for lack of room is a gap (it may come again).
        if content.seq > 0 && (!text || !matches!(outcome, Outcome::Refused(_))) {
            let peer = &contact.peer;
            match device {
                None => {
                    let mut conv = self.store.conversation(peer)?;
                    conv.gaps.arrived(content.seq);
                    LocalStore::write_conversation(w, peer, &conv);
                }
                Some(key) => {
                    let mut numbers = self.store.device_numbers(peer, key)?;
                    numbers.gaps.start_at(content.seq);
                    numbers.gaps.arrived(content.seq);
                    LocalStore::write_device_numbers(w, peer, key, &numbers);
                }
            }
        }
        Ok(outcome)
    }

    /// Holds `content` from the sender `card` names, within the bounds.
    fn hold_message(
        &self,
        w: &mut WriteSet,
        card: &kkachi_protocol::Card,
        content: &Content,
        held: Held,
        expires_at: u64,
        now: u64,
    ) -> Result<Outcome, EngineError> {
        let peer = card.identity().peer_id();
        // A first message carrying a record of a group we are in: its sender may be a
        // member whose add has not reached us yet. Held (unseen) until they are met.
        let group = matches!(&held, Held::Sealed(_))
            && matches!(&content.body, Body::Group { group, .. }
                if self.store.group(group)?.is_some_and(|g| g.joined && !g.forgotten));
        let text = match &content.body {
            Body::Text(text) | Body::TimedText { text, .. } => Some(text.clone()),
            Body::Unknown { .. } => None,
            Body::Group { .. } if group => None,
            Body::Receipt { .. }
            | Body::CardUpdate(_)
            | Body::Devices(_)
            | Body::Sent { .. }
            | Body::Account(_)
            | Body::Timer { .. }
            | Body::Edit { .. }
            | Body::Delete { .. }
            | Body::Reply { .. }
            | Body::Reaction { .. }
            | Body::File { .. }
            | Body::Group { .. } => {
                return refused(
                    "a receipt, card, device set, timer, edit, delete, reply, reaction, file or group record from someone who is not a contact",
                );
            }
        };
        if self.store.is_held(&peer, &content.id.0)? {
            return Ok(Outcome::Applied("a copy of a held message"));
        }
        let (mine, total) = self.store.held_counts(&peer)?;
        if mine >= MAX_HELD_PER_SENDER {
            self.store.count_request_dropped(w)?;
            return refused("this sender already has the most messages held");
        }
        if total >= MAX_HELD_TOTAL {
            // Full: the sender holding the most gives up one, if that leaves them still
            // holding more than this one would. A flood from one identity only ever
            // makes room for others; many identities can still fill it (counted and
            // shown, never silent).
            match self.store.largest_request()? {
                Some((largest, n, key)) if largest != peer && n > mine + 1 => {
                    w.remove(TreeId::Requests, key);
                }
                _ => {
                    self.store.count_request_dropped(w)?;
                    return refused("message requests are full");
                }
            }
            self.store.count_request_dropped(w)?;
        }
        let (envelope, opened) = match held {
            Held::Sealed(envelope) => (envelope, Vec::new()),
            Held::Opened(content) => (Vec::new(), content),
        };
        let held = HeldMessage {
            envelope,
            opened,
            group,
            card: card.encode(),
            message_id: content.id.0,
            seq: content.seq,
            sent_at_ms: content.sent_at_ms,
            text,
            received_ms: now,
            expires_at,
        };
        LocalStore::write_held(w, &peer, &held);
        Ok(match group {
            // Not a message request: nothing to tell the user of.
            true => Outcome::HeldQuietly,
            false => Outcome::Held(peer),
        })
    }

    /// Takes in one content record from `device` of `contact`.
    fn apply_content(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        contact: &Contact,
        device: Device,
        content: Content,
        now: u64,
    ) -> Result<Outcome, EngineError> {
        let peer = contact.peer;
        if peer == self.me.peer_id() {
            return self.apply_from_own(w, sessions, content, now);
        }
        if contact.through_group
            && !matches!(
                content.body,
                Body::Group { .. }
                    | Body::Receipt { .. }
                    | Body::CardUpdate(_)
                    | Body::Devices(_)
                    | Body::Unknown { .. }
            )
        {
            return self.hold_opened(w, contact, &device, &content, now);
        }
        match content.body {
            Body::Text(_) | Body::TimedText { .. } | Body::Reply { .. } | Body::File { .. }
                if self.already_have(&peer, &device, &content)? =>
            {
                // A copy (another path, or sealed again): confirm it again, in case the
                // first receipt was lost.
                LocalStore::write_receipt_due(w, &peer, &content.id);
                Ok(Outcome::Applied("a copy of a message already stored"))
            }
            Body::Text(_) | Body::TimedText { .. } | Body::Reply { .. } | Body::File { .. } => {
                let size = match &content.body {
                    Body::File { file, .. } => file.encode().len(),
                    body => body.text().map_or(0, |(text, _)| text.len()),
                };
                #[cfg(test)]
                if content
                    .body
                    .text()
                    .is_some_and(|(t, _)| t == super::tests::PANIC_TEXT)
                {
                    panic!("a bug while reading an envelope");
                }
                let mut conv = self.store.conversation(&peer)?;
                if !charge(&mut conv, size as u64) {
                    LocalStore::write_conversation(w, &peer, &conv);
                    return refused("over the storage limit for one contact");
                }
                self.take_number(w, &peer, &device, &mut conv, &content)?;
                let local = conv.next_local;
                conv.next_local += 1;
                // Their own message, or ours: whose copy a reply shows.
                let (text, secs, reply_to, file) =
                    message_parts(content.body, false).expect("matched above");
                // Ours lasts at least the shortest timer we keep.
                let timer_secs = crate::store::kept_timer(secs);
                let mut record = MessageRecord {
                    id: content.id.0,
                    direction: Direction::In,
                    text,
                    state: MessageState::Received,
                    sent_at_ms: content.sent_at_ms,
                    stored_at_ms: now,
                    seq: content.seq,
                    prev: content.prev,
                    timer_secs,
                    edited: false,
                    deleted: false,
                    revised_seq: 0,
                    reply_to,
                    reactions: Default::default(),
                    file,
                };
                conv.apply_held_revision(&mut record);
                conv.note_expiry(record.expires_at());
                self.note_expiry_due(record.expires_at());
                LocalStore::write_message(w, &peer, message_key(&peer, local), &record);
                if let Some(file) = record.file.as_ref().and_then(|f| f.file()) {
                    // What to fetch, when asked (or at once, by the auto-download rule).
                    self.store.offer_incoming_file(
                        w,
                        &file,
                        peer.to_bytes(),
                        record.id,
                        now,
                        None,
                    )?;
                }
                LocalStore::write_conversation(w, &peer, &conv);
                LocalStore::write_receipt_due(w, &peer, &content.id);
                Ok(Outcome::Shown(Box::new(Received {
                    contact: peer,
                    name: contact.name.clone(),
                    message: record,
                    gaps: conv.gaps,
                    change: None,
                    group: None,
                })))
            }
            Body::Receipt { status, ids } => {
                let state = match status {
                    ReceiptStatus::Delivered => MessageState::Delivered,
                    ReceiptStatus::Read => MessageState::Read,
                };
                for id in &ids {
                    self.advance_state(w, &peer, id, state)?;
                }
                // Delivered: the outbox entries of those messages for the device that
                // says so are done (each other device of theirs confirms its own).
                let done = self.store.outbox_keys_for(&peer, &ids, &device);
                for key in &done {
                    w.remove(TreeId::Outbox, key.to_be_bytes().to_vec());
                }
                // The account has them: each other device's copy is done once every
                // relay holds it (that device reads it there when it comes back), so a
                // device gone for good, or one that never answers, holds nothing up.
                for key in self.store.outbox_keys_of_messages(&peer, &ids) {
                    if done.contains(&key) {
                        continue;
                    }
                    let Some(mut entry) = self.store.outbox_entry(key)? else {
                        continue;
                    };
                    if entry.targets.iter().all(|t| t.acked) {
                        w.remove(TreeId::Outbox, key.to_be_bytes().to_vec());
                    } else {
                        entry.kind = crate::store::OutboxKind::Control;
                        LocalStore::write_outbox(w, key, &entry);
                    }
                }
                Ok(Outcome::Applied("a receipt"))
            }
            Body::CardUpdate(card) => {
                if card.supersedes(&contact.card) {
                    // Their new name, unless we named them ourselves or it could be
                    // taken for another contact.
                    let name = super::contacts::name_with_card(
                        &self.store.added_contacts()?,
                        contact,
                        &card,
                    );
                    let updated = Contact {
                        peer,
                        name,
                        card: *card,
                        through_group: contact.through_group,
                    };
                    LocalStore::write_contact(w, &updated);
                    self.emit(AppEvent::ContactUpdated(peer));
                }
                Ok(Outcome::Applied("a card update"))
            }
            Body::Devices(bytes) => self.take_devices(w, sessions, contact, &bytes),
            Body::Timer { secs } => {
                self.take_timer(w, &peer, secs, content.sent_at_ms, now)?;
                Ok(Outcome::Applied("a disappearing-message timer"))
            }
            Body::Edit { .. } | Body::Delete { .. } | Body::Reaction { .. } if content.seq == 0 => {
                refused("an edit, delete or reaction outside the sender's numbers")
            }
            Body::Edit { .. } | Body::Delete { .. } => {
                if self.is_copy(&peer, &device, &content)? {
                    LocalStore::write_receipt_due(w, &peer, &content.id);
                    return Ok(Outcome::Applied("a copy of an edit"));
                }
                let len = match &content.body {
                    Body::Edit { text, .. } => text.len() as u64,
                    _ => 0,
                };
                let Some(mut conv) = self.take_numbered(w, &peer, &device, &content, len)? else {
                    return refused("over the storage limit for one contact");
                };
                let target = match &content.body {
                    Body::Edit { target, .. } | Body::Delete { target } => *target,
                    _ => unreachable!("matched above"),
                };
                // Only a message of theirs, and not one deleted already; one not here
                // (gone with its timer, or not arrived yet) stays as it is.
                let (change, kind) = match content.body {
                    Body::Edit { text, .. } => (Some(text), Change::Edited),
                    _ => (None, Change::Deleted),
                };
                // The later of two changes by their sequence wins, whatever order
                // they arrive in; a delete is final.
                match self.store.message(&peer, &target)? {
                    Some((key, mut record)) if record.direction == Direction::In => {
                        if record.revise_at(content.seq, change) {
                            w.put_record(TreeId::Messages, key, &record);
                            LocalStore::write_receipt_due(w, &peer, &content.id);
                            return Ok(Outcome::Shown(Box::new(Received {
                                contact: peer,
                                name: contact.name.clone(),
                                message: record,
                                gaps: conv.gaps,
                                change: Some(kind),
                                group: None,
                            })));
                        }
                    }
                    Some(_) => {} // ours
                    None => {
                        // Not here yet (another relay, or sealed again later): applied
                        // when it arrives, so the change is never lost to the order.
                        conv.hold_revision(target.0, content.seq, change, false);
                        LocalStore::write_conversation(w, &peer, &conv);
                    }
                }
                LocalStore::write_receipt_due(w, &peer, &content.id);
                Ok(Outcome::Applied("an edit or delete"))
            }
            Body::Reaction { target, own, .. } if !self.is_copy(&peer, &device, &content)? => {
                let Some(conv) = self.take_numbered(w, &peer, &device, &content, 0)? else {
                    return refused("over the storage limit for one contact");
                };
                let Body::Reaction { emoji, .. } = content.body else {
                    unreachable!("matched above");
                };
                // On their own message or on ours, as they say; the later of two by
                // their sequence wins. A message not here (gone with its timer, deleted
                // here) takes none.
                let direction = if own { Direction::In } else { Direction::Out };
                match self.store.message(&peer, &target)? {
                    Some((key, mut record))
                        if record.direction == direction
                            && !record.deleted
                            && content.seq > record.reactions.theirs_seq =>
                    {
                        record.reactions.theirs = emoji;
                        record.reactions.theirs_seq = content.seq;
                        w.put_record(TreeId::Messages, key, &record);
                        LocalStore::write_receipt_due(w, &peer, &content.id);
                        return Ok(Outcome::Shown(Box::new(Received {
                            contact: peer,
                            name: contact.name.clone(),
                            message: record,
                            gaps: conv.gaps,
                            change: Some(Change::Reacted),
                            group: None,
                        })));
                    }
                    _ => tracing::debug!(from = %peer, "a reaction to a message not here"),
                }
                LocalStore::write_receipt_due(w, &peer, &content.id);
                Ok(Outcome::Applied("a reaction"))
            }
            Body::Reaction { .. } => {
                LocalStore::write_receipt_due(w, &peer, &content.id);
                Ok(Outcome::Applied("a copy of a reaction"))
            }
            Body::Group { .. } => self.apply_group(w, sessions, contact, &device, &content, now),
            // Only an account's own devices copy to each other.
            Body::Sent { .. } | Body::Account(_) => {
                refused("a record for the other devices of someone else's account")
            }
            Body::Unknown { kind, .. } => {
                // A kind from a newer version: it still takes its place in their
                // sequence, so it causes no false gap.
                if content.seq > 0
                    && self
                        .take_numbered(w, &peer, &device, &content, 0)?
                        .is_none()
                {
                    return refused("over the storage limit for one contact");
                }
                tracing::debug!(kind, from = %peer, "ignoring content of an unknown kind");
                Ok(Outcome::Applied("a kind this version does not know"))
            }
        }
    }

    /// A setting of the conversation with `peer`'s timer (`secs`, 0: off) made at
    /// `at_ms`, by them or on another device of ours: the setting made last wins; at the
    /// same moment, the shorter one. A clock ahead of ours counts as now, so it cannot
    /// hold the setting.
    pub(super) fn take_timer(
        &self,
        w: &mut WriteSet,
        peer: &PeerId,
        secs: u32,
        at_ms: u64,
        now: u64,
    ) -> Result<(), EngineError> {
        let at = at_ms.min(now.saturating_add(kkachi_protocol::envelope::CLOCK_SKEW_SECS * 1000));
        let secs = crate::store::kept_timer(secs);
        let mut conv = self.store.conversation(peer)?;
        if (at, std::cmp::Reverse(secs)) > (conv.timer_set_ms, std::cmp::Reverse(conv.timer_secs)) {
            conv.timer_secs = secs;
            conv.timer_set_ms = at;
            LocalStore::write_conversation(w, peer, &conv);
            self.emit(AppEvent::ContactUpdated(*peer));
        }
        Ok(())
    }

    /// Takes `peer`'s sequenced record `content`, which keeps `len` bytes, into their
    /// numbers: charged against what one contact may make us keep, checked against
    /// their chain, its number no longer missing; the conversation as it is now, or
    /// `None` when over the limit (then only the refusal is counted).
    pub(super) fn take_numbered(
        &self,
        w: &mut WriteSet,
        peer: &PeerId,
        device: &Device,
        content: &Content,
        len: u64,
    ) -> Result<Option<crate::store::Conversation>, EngineError> {
        let mut conv = self.store.conversation(peer)?;
        if !charge(&mut conv, len) {
            LocalStore::write_conversation(w, peer, &conv);
            return Ok(None);
        }
        self.take_number(w, peer, device, &mut conv, content)?;
        LocalStore::write_conversation(w, peer, &conv);
        Ok(Some(conv))
    }

    /// True if this sequenced control record (an edit, a delete, a reaction) of
    /// `device` of `peer` was taken in already: the hash-chain link at its number is
    /// its own.
    pub(super) fn is_copy(
        &self,
        peer: &PeerId,
        device: &Device,
        content: &Content,
    ) -> Result<bool, EngineError> {
        Ok(content.seq > 0
            && self
                .store
                .chain_link(peer, device, content.seq)?
                .is_some_and(|link| link.id == content.id.0))
    }

    /// True if this text of `peer`'s is one we hold or held: by its id, or (once its
    /// timer deleted it) by the hash-chain link that stays at its number.
    fn already_have(
        &self,
        peer: &PeerId,
        device: &Device,
        content: &Content,
    ) -> Result<bool, EngineError> {
        if self.store.message(peer, &content.id)?.is_some() {
            return Ok(true);
        }
        self.is_copy(peer, device, content)
    }

    /// Takes a sequenced record into the numbers of the device of `peer` that sealed
    /// it (SPEC §5): the device their card names numbers in the conversation (`conv`),
    /// each other device of theirs apart. Its number is no longer missing, and it is
    /// checked against the records next to it; what does not fit is noted and shown.
    fn take_number(
        &self,
        w: &mut WriteSet,
        peer: &PeerId,
        device: &Device,
        conv: &mut crate::store::Conversation,
        content: &Content,
    ) -> Result<(), EngineError> {
        match device {
            None => {
                let (conflicts, breaks) = (&mut conv.conflicts, &mut conv.chain_breaks);
                self.check_chain(w, peer, device, content, conflicts, breaks)?;
                conv.gaps.arrived(content.seq);
            }
            Some(key) => {
                let mut numbers = self.store.device_numbers(peer, key)?;
                let (conflicts, breaks) = (&mut numbers.conflicts, &mut numbers.chain_breaks);
                self.check_chain(w, peer, device, content, conflicts, breaks)?;
                // Known from the first record of it that arrives.
                numbers.gaps.start_at(content.seq);
                numbers.gaps.arrived(content.seq);
                LocalStore::write_device_numbers(w, peer, key, &numbers);
            }
        }
        Ok(())
    }

    /// Checks a sequenced record against the same device's records next to it (SPEC
    /// §5) and records it; a conflict or break is counted in `conflicts` and `breaks`.
    fn check_chain(
        &self,
        w: &mut WriteSet,
        peer: &PeerId,
        device: &Device,
        content: &Content,
        conflicts: &mut u64,
        breaks: &mut Vec<u64>,
    ) -> Result<(), EngineError> {
        let seq = content.seq;
        if seq == 0 {
            return Ok(());
        }
        let link = ChainLink {
            id: content.id.0,
            hash: content.hash(),
            prev: content.prev,
        };
        let same = self.store.chain_link(peer, device, seq)?;
        let before = match seq {
            1 => None,
            _ => self.store.chain_link(peer, device, seq - 1)?,
        };
        let after = match seq {
            u64::MAX => None,
            _ => self.store.chain_link(peer, device, seq + 1)?,
        };
        let check = ChainCheck::of(seq, &link, same.as_ref(), before.as_ref(), after.as_ref());
        if check.conflict {
            *conflicts = conflicts.saturating_add(1);
            tracing::warn!(from = %peer, seq, "two messages claim one sequence number");
        }
        for at in check.break_before.into_iter().chain(check.break_after) {
            note_break(breaks, at);
            tracing::warn!(from = %peer, seq = at, "a message does not follow the one before it");
        }
        if same.is_none() {
            LocalStore::write_chain_link(w, peer, device, seq, &link);
        }
        Ok(())
    }

    /// Seals the delivery receipts due (one per contact, for every message whose
    /// marker is waiting) into the outbox. True if any were sealed.
    fn seal_due_receipts(&self, sessions: &mut Sessions, now: u64) -> Result<bool, EngineError> {
        let due = self.store.receipts_due()?;
        if due.is_empty() {
            return Ok(false);
        }
        let mut w = WriteSet::default();
        let mut sealed = false;
        for (peer, ids) in due {
            let contact = match self.store.contact(&peer)? {
                Some(c) if self.store.blocked(&peer)?.is_none() => Some(c),
                _ => None, // removed or blocked meanwhile: nothing to confirm
            };
            let mut theirs = WriteSet::default();
            for id in &ids {
                LocalStore::clear_receipt_due(&mut theirs, &peer, id);
            }
            if let Some(contact) = contact {
                let session = sessions.get(&self.store, &contact)?;
                let receipts = ids
                    .chunks(kkachi_protocol::content::MAX_RECEIPT_IDS)
                    .try_for_each(|chunk| {
                        let receipt = Body::Receipt {
                            status: ReceiptStatus::Delivered,
                            ids: chunk.to_vec(),
                        };
                        self.queue_control(&mut theirs, &contact, session, receipt, now)
                            .map(drop)
                    });
                if let Err(e) = receipts {
                    // One contact's trouble stays theirs: the markers stay for later.
                    tracing::warn!(contact = %peer, error = %e, "could not seal receipts");
                    sessions.reset();
                    continue;
                }
                sealed = true;
                session.write(&mut theirs, &contact.peer);
            }
            w.extend(theirs);
        }
        if let Err(e) = self.store.apply(w) {
            sessions.reset();
            return Err(e.into());
        }
        Ok(sealed)
    }

    /// Seals again, on the session we seal on now, what `contact` has not confirmed
    /// and is sealed on another session (one replaced, or one the contact lost with its
    /// state): the old keys soon open nothing. Same message ids, so nothing shows
    /// twice. An entry is sealed again at most once per [`RESEAL_EVERY_MS`] (a hostile
    /// contact switching sessions over and over gets no more); one held back is looked
    /// at again with the contact's next packet, and at the next start.
    pub(crate) fn reseal_stale(
        &self,
        w: &mut WriteSet,
        contact: &Contact,
        sessions: &mut PeerSessions,
        why: &'static str,
        now: u64,
    ) -> Result<usize, EngineError> {
        let mut count = 0usize;
        let mut held_back = false;
        let mut due: Option<u64> = None;
        for key in self.store.outbox_keys_of(&contact.peer) {
            let Some(mut entry) = self.store.outbox_entry(key)? else {
                continue;
            };
            // Each device's entries go again on the session with that device; one
            // taken out since keeps what it has (it is no longer sealed to).
            let Some(session) = sessions.device(&entry.device) else {
                continue;
            };
            if entry.sealed_on.is_none() || entry.sealed_on == session.sealing_session() {
                // A first message opens whatever happens (one sealed to a contact's
                // key before they rotated it is marked otherwise), or still current.
                continue;
            }
            if now.saturating_sub(entry.resealed_ms) < RESEAL_EVERY_MS {
                held_back = true;
                let at = entry.resealed_ms + RESEAL_EVERY_MS;
                due = Some(due.map_or(at, |d| d.min(at)));
                continue;
            }
            // The content as it was sealed (a text since edited or deleted goes as it
            // was: its change follows it); from the message itself for older entries.
            let content = match Content::decode(&entry.content) {
                Ok(content) if !entry.content.is_empty() => content,
                _ => match self
                    .store
                    .message(&contact.peer, &MessageId(entry.message_id))?
                {
                    Some((_, record)) => crate::store::outgoing_content(&record),
                    None => continue, // a receipt or card: a newer one goes out on its own
                },
            };
            // Same message id, sealed anew, with a fresh lifetime.
            entry.sealed_on = session.sealing_session();
            entry.envelope = self
                .seal_envelope(contact, session, &content, now)?
                .encode();
            entry.resealed_ms = now;
            // Where it goes as the contact's card and our key say now: after a change
            // of either key, the old queues are no longer read.
            entry.targets = self.targets(&contact.card, &entry.device, session.is_established());
            entry.direct_acked = false;
            LocalStore::write_outbox(w, key, &entry);
            count += 1;
        }
        let mut stale = self.stale.lock();
        if held_back {
            stale.insert(contact.peer);
            // Looked at again then, even if the contact stays silent.
            let mut at = self.stale_due.lock();
            *at = Some(at.map_or(due.unwrap_or(now), |a| a.min(due.unwrap_or(now))));
        } else {
            stale.remove(&contact.peer);
        }
        if count > 0 {
            tracing::info!(contact = %contact.peer, count, why, "unconfirmed messages sealed again");
        }
        Ok(count)
    }

    /// At start: what a crash left sealed on a replaced session is sealed again.
    pub(crate) fn reseal_stale_everywhere(&mut self, now: u64) -> Result<usize, EngineError> {
        self.with_sessions(|this, sessions| {
            let mut w = WriteSet::default();
            let mut n = 0;
            // Our own other devices too (SPEC §15.2).
            let own = this.own_contact()?;
            for contact in this.store.contacts()?.iter().chain(own.as_ref()) {
                if this.store.outbox_keys_of(&contact.peer).is_empty()
                    || this.store.blocked(&contact.peer)?.is_some()
                {
                    continue;
                }
                let session = sessions.get(&this.store, contact)?;
                n += this.reseal_stale(
                    &mut w,
                    contact,
                    session,
                    "sealed on a replaced session",
                    now,
                )?;
                session.write(&mut w, &contact.peer);
            }
            this.apply_or_reset(sessions, w)?;
            Ok(n)
        })
    }
}

/// A first message sealed to our session key before its rotation, opened without any
/// session of ours (all are under the new key): refused once older than any envelope,
/// else taken as late (SPEC §4.4).
fn opened_late(init: &InitPacket, now_s: u64) -> Result<Opened, SessionError> {
    if init.sent_at().saturating_add(RETAIN_SECS) < now_s {
        return Err(SessionError::TooOld);
    }
    Ok(Opened {
        body: init.body().to_vec(),
        sent_at: init.sent_at(),
        peer_reset: false,
        switched: false,
        late: true,
    })
}

/// What a message record keeps of a message's `body` (text, timer, what it answers,
/// the file it carries), sealed by us (`ours`, a copy from another device of ours) or
/// by the contact; `None` for a body that is no message. A reply's `own` says whether
/// its sender sent what it answers.
pub(super) fn message_parts(
    body: Body,
    ours: bool,
) -> Option<(String, u32, Option<Quote>, Option<FileNote>)> {
    Some(match body {
        Body::Text(text) => (text, 0, None, None),
        Body::TimedText { secs, text } => (text, secs, None, None),
        Body::File { secs, file } => (String::new(), secs, None, Some(FileNote::of(&file))),
        Body::Reply {
            target,
            own,
            secs,
            text,
        } => (
            text,
            secs,
            Some(Quote {
                id: target.0,
                ours: own == ours,
            }),
            None,
        ),
        _ => return None,
    })
}

/// Counts a record of `len` bytes against [`MAX_STORED_PER_CONTACT`]; false (and the
/// refusal counted) if it would pass it.
fn charge(conv: &mut crate::store::Conversation, len: u64) -> bool {
    let size = len.saturating_add(RECORD_OVERHEAD);
    if conv.received_bytes.saturating_add(size) > MAX_STORED_PER_CONTACT {
        conv.refused = conv.refused.saturating_add(1);
        return false;
    }
    conv.received_bytes += size;
    true
}
