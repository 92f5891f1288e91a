//! Contacts the user controls: adding (which accepts what they sent before), message
//! requests, blocking, removing, renaming.
//!
//! Every change runs on the engine's owner task, one at a time, as receiving does: a
//! card update being received cannot write back a name the user just changed, and a
//! contact removed cannot have its session written again by a message arriving at that
//! moment. Each writes (applied, not flushed); the owner flushes before it answers.

use kkachi_protocol::card::{CardError, NameError, check_new_name};
use kkachi_protocol::content::AccountRecord;
use kkachi_protocol::envelope::CLOCK_SKEW_SECS;
use kkachi_protocol::{Body, Card, Envelope, PeerId, Session};
use thiserror::Error;

use super::receive::Source;
use super::state::{PeerSessions, Sessions, State};
use super::{AppEvent, EngineError, Received, now_ms};
use crate::store::{Blocked, Contact, LocalStore, WriteSet};

/// Why a change to contacts was refused. Each message says what to do.
#[derive(Debug, Error)]
pub enum ContactError {
    /// The card is the user's own.
    #[error("that is your own invite code")]
    Own,
    /// The card pairs someone's identity with the user's own session key.
    #[error(
        "this card carries your own session key: someone made it from your invite code. Do not add it"
    )]
    OwnKey,
    /// Another contact holds the card's session key: one of the two cards is forged.
    #[error(
        "this card's session key belongs to your contact {holder}: one of the two cards is forged. \
         Check with {holder} in person; `kkachi contact remove` removes the wrong one"
    )]
    KeyTaken {
        /// The contact holding it.
        holder: String,
    },
    /// The card names a session key its account took out (SPEC §15).
    #[error(
        "this code names a device {0} took out of their account: it is an old code, or a copy of a device they removed. Ask {0} for their code now (`kkachi invite`)"
    )]
    RemovedDevice(String),
    /// The name is taken by another contact.
    #[error("you already have a contact named {0}; choose another name")]
    NameTaken(String),
    /// The name breaks the rules for names.
    #[error("that name cannot be used: {0}")]
    Name(#[from] NameError),
    /// Not a contact.
    #[error("{0} is not one of your contacts; `kkachi contact list` shows them")]
    NotContact(String),
    /// The contact is blocked: nothing is sent to them.
    #[error("{0} is blocked; unblock them first (`kkachi contact unblock`)")]
    Blocked(String),
    /// A name that reads as a peer id would take over addressing by id.
    #[error("a name may not look like a peer id")]
    NameIsPeerId,
    /// A name ending as kkachi marks people who are not contacts.
    #[error("a name may not end with \"{NOT_A_CONTACT}\": that marks people who are not contacts")]
    NameLooksMarked,
    /// Nothing is held from that sender.
    #[error("no message request from {0}; `kkachi request list` shows them")]
    NoRequest(String),
    /// The card of someone not yet a contact has run out.
    #[error("{name}'s invite code expired {when}; ask them for a new one (`kkachi invite`)")]
    Expired {
        /// The name on the card.
        name: String,
        /// How long ago, in words.
        when: String,
    },
}

/// What a change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactOutcome {
    /// The contact as it is now (None once removed).
    pub contact: Option<Contact>,
    /// True if the contact is new.
    pub added: bool,
    /// True if a newer card of theirs was taken.
    pub updated: bool,
    /// True if they were blocked before.
    pub unblocked: bool,
    /// Messages they sent before they were a contact, now in the conversation.
    pub accepted: Vec<Received>,
    /// Messages removed with a removed contact.
    pub removed_messages: usize,
}

impl ContactOutcome {
    fn of(contact: Option<Contact>) -> Self {
        Self {
            contact,
            added: false,
            updated: false,
            unblocked: false,
            accepted: Vec::new(),
            removed_messages: 0,
        }
    }
}

impl<T> State<T> {
    /// Adds `card`'s owner as a contact, named `name` (else as before, else as the card
    /// says), or takes a newer card of theirs. A card whose session key is ours or
    /// another contact's is refused: one of the two is forged. Adding someone blocked
    /// unblocks them. Messages they sent before they were a contact (held as a request)
    /// then go into the conversation, in their order, and are confirmed to them.
    pub(crate) fn add_contact(
        &mut self,
        card: &Card,
        name: Option<&str>,
        now: u64,
    ) -> Result<ContactOutcome, EngineError> {
        let peer = card.identity().peer_id();
        // An invite code off an old poster or out of a chat log: its owner has moved on
        // to another (a few minutes' clock skew allowed). Cards of contacts are replaced
        // in-band, and a requester's card came with its request, so only new codes are
        // checked.
        if self.store.contact(&peer)?.is_none()
            && let Err(CardError::Expired(when)) =
                card.check_fresh((now / 1000).saturating_sub(CLOCK_SKEW_SECS))
        {
            return Err(ContactError::Expired {
                name: card.name().to_owned(),
                when,
            }
            .into());
        }
        self.add_card(card, name, now)
    }

    /// Adds (or updates) the contact of `card`, and takes in what it had sent while not
    /// a contact.
    fn add_card(
        &mut self,
        card: &Card,
        name: Option<&str>,
        now: u64,
    ) -> Result<ContactOutcome, EngineError> {
        let peer = card.identity().peer_id();
        let mut outcome =
            self.with_sessions(|this, sessions| this.write_contact(sessions, card, name, now))?;
        outcome.accepted = self.adopt_held_from(&peer, now)?;
        self.emit(AppEvent::ContactUpdated(peer));
        Ok(outcome)
    }

    fn write_contact(
        &self,
        sessions: &mut Sessions,
        card: &Card,
        name: Option<&str>,
        now: u64,
    ) -> Result<ContactOutcome, EngineError> {
        let peer = card.identity().peer_id();
        if peer == self.me.peer_id() {
            return Err(ContactError::Own.into());
        }
        if self.is_own_device_key(card.identity().x25519())? {
            return Err(ContactError::OwnKey.into());
        }
        let contacts = self.store.contacts()?;
        let existing = contacts.iter().find(|c| c.peer == peer);
        // A key their account took out is never taken again, from a code either (asked
        // before anything else changes).
        let changes_key =
            existing.is_none_or(|c| c.card.identity().x25519() != card.identity().x25519());
        if changes_key && self.names_removed_device(card)? {
            let who = existing.map_or(card.name(), |c| c.name.as_str());
            return Err(ContactError::RemovedDevice(who.to_owned()).into());
        }
        let mut w = WriteSet::default();
        if let Some(holder) = contacts
            .iter()
            .find(|c| c.peer != peer && c.card.identity().x25519() == card.identity().x25519())
        {
            if holder.is_added() {
                return Err(ContactError::KeyTaken {
                    holder: holder.name.clone(),
                }
                .into());
            }
            // A member met in a group whose card names this key: one of the two cards is
            // forged, and the user vouches for this one (as for a code: SPEC §2).
            tracing::warn!(member = %holder.peer, contact = %peer, "a card a member passed on names the session key of a contact being added: forgotten");
            self.store.forget_contact(&mut w, &holder.peer)?;
            sessions.forget(&holder.peer);
            self.revoked.lock().push(*holder.card.identity().x25519());
        }
        let name = match (name, existing) {
            (Some(n), _) => n.trim().to_owned(),
            (None, Some(c)) if card.supersedes(&c.card) || card.rotates(&c.card) => {
                name_with_card(&contacts, c, card)
            }
            (None, Some(c)) => c.name.clone(),
            (None, None) => card.name().to_owned(),
        };
        // Members met in a group chose their names themselves: no contact's name is
        // refused for theirs.
        let added: Vec<Contact> = contacts.iter().filter(|c| c.is_added()).cloned().collect();
        check_contact_name(&name, &peer, &added)?;
        let (card, updated) = match existing {
            // Their newer code with a new session key, given to us by hand: taken (it
            // is signed by their identity key; whose key it is was checked above), and
            // the session and what waits for them follow it.
            Some(old) if card.rotates(&old.card) => {
                self.take_rotation(&mut w, old, now)?;
                sessions.forget(&peer);
                (card.clone(), true)
            }
            Some(old) if !card.supersedes(&old.card) => (old.card.clone(), false),
            Some(_) => (card.clone(), true),
            None => (card.clone(), false),
        };
        // Adding a member met in a group makes them a contact.
        let contact = Contact::new(peer, name, card);
        LocalStore::write_contact(&mut w, &contact);
        if existing.is_none() {
            // Our card goes to a new contact: it says where we are, and if they still
            // hold a session with an earlier us (we removed them), our fresh session
            // tells them to seal again what we never confirmed.
            let session = sessions.get(&self.store, &contact)?;
            let card = Box::new(self.own_card()?);
            self.queue_control(&mut w, &contact, session, Body::CardUpdate(card), now)?;
        }
        let unblocked = self.store.blocked(&peer)?.is_some();
        if unblocked {
            LocalStore::write_unblocked(&mut w, &peer);
        }
        if existing.is_none_or(|c| c.through_group) {
            // Our other devices add them too (SPEC §15.2).
            let record = AccountRecord::ContactAdded {
                card: Box::new(contact.card.clone()),
                name: contact.name.clone(),
            };
            self.tell_own(&mut w, sessions, record, now)?;
        }
        self.apply_or_reset(sessions, w)?;
        Ok(ContactOutcome {
            // A member met in a group becomes a contact: added, as far as the user knows.
            added: existing.is_none_or(|c| c.through_group),
            updated,
            unblocked,
            ..ContactOutcome::of(Some(contact))
        })
    }

    /// Accepts the request of `peer`: adds them from the newest card they sent, named
    /// `name` if given, and takes in what they sent.
    pub(crate) fn accept_request(
        &mut self,
        peer: &PeerId,
        name: Option<&str>,
        now: u64,
    ) -> Result<ContactOutcome, EngineError> {
        let request = self
            .store
            .request(peer)?
            .ok_or_else(|| ContactError::NoRequest(peer.to_string()))?;
        self.add_card(&request.card, name, now)
    }

    /// Drops what `peer` sent as a request; they may ask again.
    pub(crate) fn reject_request(&mut self, peer: &PeerId) -> Result<usize, EngineError> {
        let mut w = WriteSet::default();
        let n = self.store.remove_request(&mut w, peer)?;
        if n == 0 {
            return Err(ContactError::NoRequest(peer.to_string()).into());
        }
        self.store.apply(w)?;
        Ok(n)
    }

    /// Blocks `peer` (a contact or a sender of a request): what they send is dropped
    /// unread (opened only as far as needed to know it is theirs), what waits for them
    /// in the outbox goes, and anything held from them. A contact stays listed (as
    /// blocked) with the conversation and session, so unblocking resumes both.
    pub(crate) fn block(
        &mut self,
        peer: &PeerId,
        name: &str,
    ) -> Result<ContactOutcome, EngineError> {
        let mut w = WriteSet::default();
        let record = Blocked {
            name: name.to_owned(),
            at_ms: now_ms(),
        };
        LocalStore::write_blocked(&mut w, peer, &record);
        self.store.forget_outbox(&mut w, peer)?;
        self.store.remove_request(&mut w, peer)?;
        self.with_sessions(|this, sessions| {
            let told = AccountRecord::Blocked { peer: *peer };
            this.tell_own(&mut w, sessions, told, record.at_ms)?;
            this.apply_or_reset(sessions, w)
        })?;
        self.sweep_files();
        if let Some(contact) = self.store.contact(peer)? {
            // Our relays stop taking their puts, from every device of theirs.
            let keys = self.device_keys(&contact)?;
            self.revoked.lock().extend(keys);
        }
        self.emit(AppEvent::ContactUpdated(*peer));
        Ok(ContactOutcome::of(self.store.contact(peer)?))
    }

    /// Unblocks `peer`; false if they were not blocked.
    pub(crate) fn unblock(&mut self, peer: &PeerId) -> Result<bool, EngineError> {
        if self.store.blocked(peer)?.is_none() {
            return Ok(false);
        }
        let mut w = WriteSet::default();
        LocalStore::write_unblocked(&mut w, peer);
        self.with_sessions(|this, sessions| {
            let told = AccountRecord::Unblocked { peer: *peer };
            this.tell_own(&mut w, sessions, told, now_ms())?;
            this.apply_or_reset(sessions, w)
        })?;
        self.emit(AppEvent::ContactUpdated(*peer));
        Ok(true)
    }

    /// Removes contact `peer` with everything kept about them: conversation, session,
    /// outbox entries. They are sent our card once more, from a fresh session: their
    /// client then knows ours is gone, and seals what it sends from then on (and what we
    /// never confirmed) as first messages, which arrive here as a message request.
    pub(crate) fn remove_contact(
        &mut self,
        peer: &PeerId,
        now: u64,
    ) -> Result<ContactOutcome, EngineError> {
        let Some(contact) = self.store.contact(peer)? else {
            return Err(ContactError::NotContact(peer.to_string()).into());
        };
        let keys = self.device_keys(&contact)?;
        let removed = self.with_sessions(|this, sessions| {
            let mut w = WriteSet::default();
            let removed = this.store.forget_contact(&mut w, peer)?;
            sessions.forget(peer);
            if this.store.blocked(peer)?.is_none() {
                // Sealed on a session that is never stored: nothing of it stays here.
                let mut fresh =
                    PeerSessions::alone(Session::new(*contact.card.identity().x25519()));
                let card = Box::new(this.own_card()?);
                this.queue_control(&mut w, &contact, &mut fresh, Body::CardUpdate(card), now)?;
                // Sealing wrote it; it must not stay (one added again later starts
                // afresh, under the key their card then has).
                w.remove(crate::store::TreeId::Sessions, peer.to_bytes());
            }
            this.tell_own(
                &mut w,
                sessions,
                AccountRecord::ContactRemoved { peer: *peer },
                now,
            )?;
            this.apply_or_reset(sessions, w)?;
            Ok(removed)
        })?;
        self.revoked.lock().extend(keys);
        self.sweep_files();
        self.emit(AppEvent::ContactUpdated(*peer));
        Ok(ContactOutcome {
            removed_messages: removed,
            ..ContactOutcome::of(None)
        })
    }

    /// Gives contact `peer` the name `name` (shown only here).
    pub(crate) fn rename_contact(
        &mut self,
        peer: &PeerId,
        name: &str,
    ) -> Result<ContactOutcome, EngineError> {
        let contacts = self.store.added_contacts()?;
        let Some(mut contact) = contacts.iter().find(|c| c.peer == *peer).cloned() else {
            return Err(ContactError::NotContact(peer.to_string()).into());
        };
        let name = name.trim();
        check_contact_name(name, peer, &contacts)?;
        contact.name = name.to_owned();
        let mut w = WriteSet::default();
        LocalStore::write_contact(&mut w, &contact);
        self.store.apply(w)?;
        self.emit(AppEvent::ContactUpdated(*peer));
        Ok(ContactOutcome::of(Some(contact)))
    }

    /// Takes in what `peer` sent while not a contact (they are one now).
    pub(super) fn adopt_held_from(
        &mut self,
        peer: &PeerId,
        now: u64,
    ) -> Result<Vec<Received>, EngineError> {
        let Some(mut request) = self.store.request(peer)? else {
            return Ok(Vec::new());
        };
        // A member met in a group is not a contact: only the group records they sent
        // before we knew them are taken in; their message requests stay requests.
        if self.store.contact(peer)?.is_some_and(|c| c.through_group) {
            request.messages.retain(|m| m.group);
        }
        let envelopes: Vec<Envelope> = request
            .messages
            .iter()
            .filter(|m| m.opened.is_empty())
            .filter_map(|m| Envelope::decode(&m.envelope).ok())
            .collect();
        let mut shown = self.receive(&envelopes, Source::Held(*peer), now)?.shown;
        // What a member met in a group sent (opened on their session when it came).
        let opened: Vec<_> = request
            .messages
            .into_iter()
            .filter(|m| !m.opened.is_empty())
            .collect();
        if !opened.is_empty() {
            shown.extend(self.receive_opened(peer, opened, now)?);
        }
        Ok(shown)
    }

    /// Upkeep, at start and now and then: forgets seen envelopes, held messages and
    /// envelopes carried for others that expired, and takes in what is held from senders who are contacts by now (a crash
    /// between adding one and taking it in). Returns what that took in.
    pub(crate) fn housekeeping(&mut self, now: u64) -> Result<Vec<Received>, EngineError> {
        let before = (now / 1000).saturating_sub(kkachi_protocol::envelope::CLOCK_SKEW_SECS);
        let pruned = self.store.prune_seen(before)?;
        let expired = self.store.prune_requests(before)?;
        let carried = self.drop_expired_forwards(now)?;
        // Also finds when the next disappearing message is due (after a start). A
        // record that does not read stops only this.
        if let Err(e) = self.expire_messages(now) {
            tracing::warn!(error = %e, "could not delete disappearing messages");
        }
        if pruned + expired + carried > 0 {
            tracing::info!(pruned, expired, carried, "forgot expired envelopes");
        }
        if let Err(e) = self.catch_up_everyone(now) {
            tracing::warn!(error = %e, "could not seal what members missed");
        }
        if let Err(e) = self.forget_former_members(now) {
            tracing::warn!(error = %e, "could not forget members of groups we left");
        }
        let contacts = self.store.contacts()?;
        let mut shown = Vec::new();
        for request in self.store.all_requests()? {
            if contacts.iter().any(|c| c.peer == request.peer) {
                shown.extend(self.adopt_held_from(&request.peer, now)?);
            }
        }
        // Nothing to receive, but receipts a crash left due are sealed.
        shown.extend(self.receive(&[], Source::Network, now)?.shown);
        Ok(shown)
    }
}

/// How names of group members who are not contacts are marked where a `~` would not do.
pub(crate) const NOT_A_CONTACT: &str = "(not a contact)";

/// Names follow the rules of names a client makes (nothing hidden or reordered, no
/// leading tilde, not an id, not marked as someone's who is not a contact), and no two
/// contacts share one (any case).
pub(super) fn check_contact_name(
    name: &str,
    peer: &PeerId,
    contacts: &[Contact],
) -> Result<(), ContactError> {
    check_new_name(name)?;
    if looks_like_peer_id(name) {
        return Err(ContactError::NameIsPeerId);
    }
    if name.to_lowercase().trim_end().ends_with(NOT_A_CONTACT) {
        return Err(ContactError::NameLooksMarked);
    }
    // Our own messages are shown as "me".
    if name.to_lowercase() == "me" {
        return Err(ContactError::NameTaken(name.to_owned()));
    }
    if contacts
        .iter()
        .any(|c| c.peer != *peer && c.name.to_lowercase() == name.to_lowercase())
    {
        return Err(ContactError::NameTaken(name.to_owned()));
    }
    Ok(())
}

/// The name to show for `contact` once their newer `card` is taken: the card's new
/// name if we did not name them ourselves (the name shown is their old card's), and if
/// that name could not be mistaken for someone else: it passes the checks a name we
/// give passes, and neither it nor another contact's name starts with the other (so a
/// name or its start that we type for one contact never comes to mean another).
/// Otherwise the name shown stays.
pub(crate) fn name_with_card(contacts: &[Contact], contact: &Contact, card: &Card) -> String {
    let new = card.name();
    let ours = contact.name != contact.card.name();
    let lower = new.to_lowercase();
    let clashes = contacts.iter().any(|c| {
        let other = c.name.to_lowercase();
        c.peer != contact.peer && (other.starts_with(&lower) || lower.starts_with(&other))
    });
    if ours || clashes || check_contact_name(new, &contact.peer, contacts).is_err() {
        contact.name.clone()
    } else {
        new.to_owned()
    }
}

/// True if `name` could be taken for a peer id (or the start of one), which commands
/// accept wherever they accept a name.
fn looks_like_peer_id(name: &str) -> bool {
    // Any case: a contact is found by name in any case, so a name in other letters
    // would still be taken for the start of a peer id.
    let lower = name.to_lowercase();
    name.parse::<PeerId>().is_ok()
        || ((lower.starts_with("12d3koo") || lower.starts_with("qm"))
            && name.chars().all(|c| c.is_ascii_alphanumeric()))
}
