//! Our account's other devices (SPEC §15.2): what this device seals to a contact goes
//! to them as a copy (content kind 13), and what they sealed comes here the same way,
//! so every device shows the conversations as the account had them: the messages each
//! sent, edits, deletions and reactions, timers, what was read, posts to groups and
//! each group's log. Changes to the account's records (contacts, blocks, deletions on
//! one device) go as account records (kind 14). They also send each other the
//! account's device set whenever it changes, merged here as a contact's is.
//!
//! They are read as one more peer, under our own peer id ([`State::own_contact`]), with
//! a session per device ([`super::state::Sessions`]); never stored or shown as a
//! contact. A copy names the contact it went to: one this device does not hold is
//! dropped (contacts are added on each device).

use kkachi_protocol::content::{AccountRecord, GroupBody};
use kkachi_protocol::device::DeviceSet;
use kkachi_protocol::{Body, Content, MessageId, PeerId, ReceiptStatus};

use super::groups::Posting;
use super::receive::{Outcome, Received};
use super::state::{Sessions, State};
use super::{AppEvent, EngineError};
use crate::store::{
    Contact, Direction, LocalStore, MessageRecord, MessageState, OutboxKind, TreeId, WriteSet,
    message_key,
};

impl<T> State<T> {
    /// Seals a copy of `content`, as just sealed to contact `to`, for each of our other
    /// devices, into `w` (with what it copies, so both are durable together). Nothing
    /// while our set lists this device alone. A copy too large for one record (a file
    /// reference near the bound) is left out, and logged.
    pub(crate) fn copy_to_own(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        to: &PeerId,
        content: &Content,
        now: u64,
    ) -> Result<(), EngineError> {
        let Some((own, session)) = self.own_sessions(sessions)? else {
            return Ok(());
        };
        let copy = super::state::control(
            Body::Sent {
                to: *to,
                content: Box::new(content.clone()),
            },
            now,
        );
        if let Err(e) = copy.check() {
            tracing::warn!(error = %e, "a record too large to copy to our other devices");
            return Ok(());
        }
        self.seal_into(w, &own, session, &copy, OutboxKind::Control, now)?;
        Ok(())
    }

    /// Our other devices as one peer, and our sessions with them; `None` while our set
    /// lists this device alone.
    fn own_sessions<'a>(
        &self,
        sessions: &'a mut Sessions,
    ) -> Result<Option<(Contact, &'a mut super::state::PeerSessions)>, EngineError> {
        let Some(own) = self.own_contact()? else {
            return Ok(None);
        };
        let session = sessions.get(&self.store, &own)?;
        Ok((!session.devices.is_empty()).then_some((own, session)))
    }

    /// What one of our other devices sealed to us: a copy of what it sent a contact,
    /// or our set. Anything else is for contacts only, and dropped.
    pub(super) fn apply_from_own(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        content: Content,
        now: u64,
    ) -> Result<Outcome, EngineError> {
        match content.body {
            Body::Sent { to, content } => self.apply_sent(w, sessions, &to, *content, now),
            Body::Devices(bytes) => self.take_own_devices(w, &bytes, now),
            Body::Account(record) => self.take_account(w, sessions, record, now),
            _ => Ok(Outcome::Dropped(
                "a record from another device of ours that only contacts send".into(),
            )),
        }
    }

    /// Seals `record` (a change to our own records just made here) for each of our
    /// other devices, into `w` with the change itself. Nothing while our set lists this
    /// device alone.
    pub(crate) fn tell_own(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        record: AccountRecord,
        now: u64,
    ) -> Result<(), EngineError> {
        if let Some((own, session)) = self.own_sessions(sessions)? {
            self.queue_control(w, &own, session, Body::Account(record), now)?;
        }
        Ok(())
    }

    /// A change another device of ours made to our records: made here too, as far as it
    /// changes anything (a contact added who is one here already stays as they are, so
    /// nothing goes back and forth). Never a contact under our own account or key.
    fn take_account(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        record: AccountRecord,
        now: u64,
    ) -> Result<Outcome, EngineError> {
        let me = self.me.peer_id();
        match record {
            AccountRecord::ContactAdded { card, name } => {
                let peer = card.identity().peer_id();
                if peer == me || self.is_own_device_key(card.identity().x25519())? {
                    return Ok(Outcome::Refused(
                        "a contact under our own account, from another device of ours".into(),
                    ));
                }
                let contacts = self.store.contacts()?;
                let existing = contacts.iter().find(|c| c.peer == peer);
                if existing.is_some_and(Contact::is_added) {
                    return Ok(Outcome::Applied("a contact added here already"));
                }
                // As a code added by hand would be: never a key their account took
                // out, nor one another contact holds.
                if self.names_removed_device(&card)?
                    || contacts.iter().any(|c| {
                        c.peer != peer && c.card.identity().x25519() == card.identity().x25519()
                    })
                {
                    return Ok(Outcome::Refused(
                        "a contact added on another device of ours whose key cannot be theirs here"
                            .into(),
                    ));
                }
                // Their name there, if it passes here (no other contact has it, and
                // the rules of names we give); else the first of "name (2)", "name
                // (3)"… that does.
                let added: Vec<Contact> =
                    contacts.iter().filter(|c| c.is_added()).cloned().collect();
                let Some(name) = std::iter::once(name.clone())
                    .chain((2..=9).map(|n| format!("{name} ({n})")))
                    .find(|n| super::contacts::check_contact_name(n, &peer, &added).is_ok())
                else {
                    return Ok(Outcome::Refused(
                        "a contact added on another device of ours under a name no contact may have here"
                            .into(),
                    ));
                };
                // A member met in a group keeps the card we hold (a change of their key
                // is taken from their first message only).
                let card = existing.map_or(*card, |c| c.card.clone());
                let contact = Contact::new(peer, name, card);
                LocalStore::write_contact(w, &contact);
                if self.store.blocked(&peer)?.is_some() {
                    LocalStore::write_unblocked(w, &peer);
                }
                // What they sent while not a contact here is taken in once this batch
                // ends, and our relays grant them.
                self.newly_met.lock().push(peer);
                self.grants_changed();
                self.emit(AppEvent::ContactUpdated(peer));
                Ok(Outcome::Applied(
                    "a contact added on another device of ours",
                ))
            }
            AccountRecord::ContactRemoved { peer } => {
                let Some(contact) = self.store.contact(&peer)?.filter(Contact::is_added) else {
                    return Ok(Outcome::Applied("a contact removed here already"));
                };
                let keys = self.device_keys(&contact)?;
                self.store.forget_contact(w, &peer)?;
                sessions.forget(&peer);
                self.revoked.lock().extend(keys);
                self.emit(AppEvent::ContactUpdated(peer));
                Ok(Outcome::Applied(
                    "a contact removed on another device of ours",
                ))
            }
            AccountRecord::Blocked { peer } => {
                if peer == me || self.store.blocked(&peer)?.is_some() {
                    return Ok(Outcome::Applied("blocked here already"));
                }
                let contact = self.store.contact(&peer)?;
                let name = contact
                    .as_ref()
                    .map_or_else(|| peer.to_string(), |c| c.name.clone());
                LocalStore::write_blocked(w, &peer, &crate::store::Blocked { name, at_ms: now });
                self.store.forget_outbox(w, &peer)?;
                self.store.remove_request(w, &peer)?;
                if let Some(contact) = contact {
                    let keys = self.device_keys(&contact)?;
                    self.revoked.lock().extend(keys);
                }
                self.emit(AppEvent::ContactUpdated(peer));
                Ok(Outcome::Applied("blocked on another device of ours"))
            }
            AccountRecord::Unblocked { peer } => {
                if self.store.blocked(&peer)?.is_some() {
                    LocalStore::write_unblocked(w, &peer);
                    self.grants_changed();
                    self.emit(AppEvent::ContactUpdated(peer));
                }
                Ok(Outcome::Applied("unblocked on another device of ours"))
            }
            AccountRecord::GroupKey { key, record } => {
                self.take_own_epoch(w, &key, &record, now)?;
                Ok(Outcome::Applied(
                    "an epoch key of a large group, from another device of ours",
                ))
            }
            AccountRecord::DeletedForMe { peer, id } => {
                if let Some((key, _)) = self.store.message(&peer, &id)? {
                    w.remove(TreeId::Messages, key);
                    self.emit(AppEvent::ContactUpdated(peer));
                }
                Ok(Outcome::Applied(
                    "a message deleted on another device of ours",
                ))
            }
        }
    }

    /// Whether first message `init`, sealed with `key` by another device of our
    /// account, carries our set (as a device's first words are) listing `key`, which
    /// the set we keep did not take out: a device of ours under a key we did not hold
    /// yet (one that changed key, or joined elsewhere).
    pub(super) fn own_set_carried_lists(
        &self,
        init: &kkachi_protocol::session::InitPacket,
        key: &[u8; 32],
    ) -> Result<bool, EngineError> {
        let Ok(Content {
            body: Body::Devices(bytes),
            ..
        }) = Content::decode(init.body())
        else {
            return Ok(false);
        };
        let Ok(carried) = DeviceSet::decode(self.me.public().ed25519(), &bytes) else {
            return Ok(false);
        };
        let kept_out = self
            .store
            .own_devices(&self.me)?
            .is_some_and(|set| set.is_removed(key));
        Ok(carried.device(key).is_some() && !kept_out && *key != self.me.x25519_public())
    }

    /// Whether `key` is, or was, a device of our account (our set lists it, or took it
    /// out): no contact's card may name it.
    pub(crate) fn is_own_device_key(&self, key: &[u8; 32]) -> Result<bool, EngineError> {
        self.with_own(|own| own.keys.contains(key))
    }

    /// What a change of our set from `before` to `after` takes out (SPEC §15.2): our
    /// sessions with those devices, and what waits for them, go in `w`.
    pub(crate) fn drop_own_taken_out(
        &self,
        w: &mut WriteSet,
        before: &DeviceSet,
        after: &DeviceSet,
    ) {
        let me = self.me.peer_id();
        for removal in after.removals() {
            let key = *removal.key();
            if before.is_removed(&key) {
                continue;
            }
            LocalStore::remove_device_session(w, &me, &key);
            for entry in self.store.outbox_keys_of_device(&me, &Some(key)) {
                w.remove(TreeId::Outbox, entry.to_be_bytes().to_vec());
            }
        }
    }

    /// Merges the set another device of ours sent over ours. A set that does not
    /// hold, or whose merge would pass the bound, is refused whole.
    fn take_own_devices(
        &self,
        w: &mut WriteSet,
        bytes: &[u8],
        now: u64,
    ) -> Result<Outcome, EngineError> {
        let Ok(theirs) = DeviceSet::decode(self.me.public().ed25519(), bytes) else {
            return Ok(Outcome::Refused(
                "a device set from another device of ours that does not hold".into(),
            ));
        };
        let mut set = self.own_devices(w, now)?;
        let kept = set.clone();
        let before = set.encode();
        if set.merge(&theirs).is_err() {
            return Ok(Outcome::Refused(
                "a device set from another device of ours past the bound".into(),
            ));
        }
        if set.encode() == before {
            return Ok(Outcome::Applied("our device set, as we hold it"));
        }
        if set.is_removed(&self.me.x25519_public()) {
            tracing::warn!(
                "another device of this account took this one out: contacts seal nothing more to it once they have the set"
            );
        }
        LocalStore::write_own_devices(w, &set);
        self.drop_own_taken_out(w, &kept, &set);
        // The sessions with our other devices follow the set (once it is applied), as
        // do our relays' grants; contacts and our other devices get the merged set at
        // the next upkeep.
        self.grants_changed();
        tracing::info!(
            devices = set.devices().count(),
            "our device set changed on another device of ours"
        );
        Ok(Outcome::Applied("our device set, merged"))
    }

    /// A copy of what another device of ours sealed to contact `to`.
    fn apply_sent(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        to: &PeerId,
        content: Content,
        now: u64,
    ) -> Result<Outcome, EngineError> {
        if *to == self.me.peer_id() {
            return Ok(Outcome::Refused("a copy of a record to ourselves".into()));
        }
        // A post of ours to a small group: the group says where it goes, whoever of
        // its members the copy names.
        if let Body::Group { group, what } = &content.body {
            let (hlc, secs, posting) = match what {
                GroupBody::Message {
                    hlc, secs, text, ..
                } => (*hlc, *secs, Posting::Text(text.clone())),
                GroupBody::File {
                    hlc, secs, file, ..
                } => (*hlc, *secs, Posting::File(file.clone())),
                // The group's log, as this account signed it on another device.
                GroupBody::Ops { ops, .. } => {
                    let me = (*self.me.public().ed25519(), self.me.peer_id());
                    return self.take_ops_from(w, sessions, me, *group, ops.clone(), now);
                }
                _ => {
                    return Ok(Outcome::Dropped(
                        "a copy of a group record our devices do not share".into(),
                    ));
                }
            };
            return self.take_own_post(w, *group, &content, hlc, secs, posting, now);
        }
        let Some(contact) = self.store.added_contact(to)? else {
            return Ok(Outcome::Dropped(
                "a copy of what another device of ours sent someone this one does not hold".into(),
            ));
        };
        match content.body {
            Body::Text(_) | Body::TimedText { .. } | Body::Reply { .. } | Body::File { .. } => {
                self.take_sent_message(w, &contact, content, now)
            }
            Body::Edit { .. } | Body::Delete { .. } => {
                let (target, change) = match content.body {
                    Body::Edit { target, text } => (target, Some(text)),
                    Body::Delete { target } => (target, None),
                    _ => unreachable!("matched above"),
                };
                // Applied by its number, as a contact's are: the later of two wins. One
                // that comes before its message (through another relay) is held, as
                // ours, and applied when the message comes: a contact's held change
                // never touches ours, nor ours theirs.
                let seq = content.seq;
                match self.store.message(to, &target)? {
                    Some((key, mut record))
                        if record.direction == Direction::Out && !record.deleted =>
                    {
                        if record.revise_at(seq, change) {
                            w.put_record(TreeId::Messages, key, &record);
                            self.emit(AppEvent::ContactUpdated(*to));
                        }
                        Ok(Outcome::Applied("a change made on another device of ours"))
                    }
                    Some(_) => Ok(Outcome::Applied(
                        "a change made on another device of ours to a message it cannot change",
                    )),
                    None => {
                        let mut conv = self.store.conversation(to)?;
                        conv.hold_revision(target.0, seq, change, true);
                        LocalStore::write_conversation(w, to, &conv);
                        Ok(Outcome::Applied(
                            "a change made on another device of ours, held until its message comes",
                        ))
                    }
                }
            }
            Body::Reaction { target, own, emoji } => {
                let direction = if own { Direction::Out } else { Direction::In };
                self.take_own_change(w, to, target, direction, |r| r.reactions.ours = emoji)
            }
            Body::Timer { secs } => {
                // As a contact's setting: the one made last wins.
                self.take_timer(w, to, secs, content.sent_at_ms, now)?;
                Ok(Outcome::Applied("a timer set on another device of ours"))
            }
            Body::Receipt {
                status: ReceiptStatus::Read,
                ids,
            } => {
                // Read there: read here, and the contact was told (or not) from there.
                let mut any = false;
                for id in &ids {
                    if let Some((key, mut record)) = self.store.message(to, id)?
                        && record.direction == Direction::In
                        && record.state == MessageState::Received
                    {
                        record.state = MessageState::Read;
                        w.put_record(TreeId::Messages, key, &record);
                        any = true;
                    }
                }
                if any {
                    self.emit(AppEvent::ContactUpdated(*to));
                }
                Ok(Outcome::Applied("messages read on another device of ours"))
            }
            _ => Ok(Outcome::Dropped(
                "a copy of a kind our devices do not share".into(),
            )),
        }
    }

    /// A message another device of ours sent `contact`: shown here as ours, once.
    fn take_sent_message(
        &self,
        w: &mut WriteSet,
        contact: &Contact,
        content: Content,
        now: u64,
    ) -> Result<Outcome, EngineError> {
        let peer = contact.peer;
        if self.store.message(&peer, &content.id)?.is_some() {
            return Ok(Outcome::Applied("a copy of a message of ours already here"));
        }
        let mut conv = self.store.conversation(&peer)?;
        let local = conv.next_local;
        conv.next_local += 1;
        if let Some((_, secs)) = content.body.text()
            && secs > 0
            && content.sent_at_ms.saturating_add(u64::from(secs) * 1000) < now
        {
            // A timed message whose time ran out (a copy sealed again late): gone here
            // as everywhere.
            return Ok(Outcome::Applied("a copy of a message of ours that ran out"));
        }
        // (A file's chunks went into the contact's queues: this device shows what was
        // sent, and cannot fetch it.)
        let (text, secs, reply_to, file) =
            super::receive::message_parts(content.body, true).expect("a message");
        let mut record = MessageRecord {
            id: content.id.0,
            direction: Direction::Out,
            text,
            // The contact's receipts reach every device of ours.
            state: MessageState::SentElsewhere,
            sent_at_ms: content.sent_at_ms,
            stored_at_ms: now,
            seq: content.seq,
            prev: content.prev,
            timer_secs: crate::store::kept_timer(secs),
            edited: false,
            deleted: false,
            revised_seq: 0,
            reply_to,
            reactions: Default::default(),
            file,
        };
        // An edit or delete of it that came first (another relay) applies now.
        conv.apply_held_revision(&mut record);
        conv.note_expiry(record.expires_at());
        self.note_expiry_due(record.expires_at());
        LocalStore::write_conversation(w, &peer, &conv);
        LocalStore::write_message(w, &peer, message_key(&peer, local), &record);
        Ok(Outcome::Shown(Box::new(Received {
            contact: peer,
            name: contact.name.clone(),
            message: record,
            gaps: Default::default(),
            change: None,
            group: None,
        })))
    }

    /// An edit, delete or reaction another device of ours made to message `target`
    /// with `peer` (sent by `direction`): applied to ours if it is here and not
    /// deleted; a message not here takes none.
    fn take_own_change(
        &self,
        w: &mut WriteSet,
        peer: &PeerId,
        target: MessageId,
        direction: Direction,
        change: impl FnOnce(&mut MessageRecord),
    ) -> Result<Outcome, EngineError> {
        match self.store.message(peer, &target)? {
            Some((key, mut record)) if record.direction == direction && !record.deleted => {
                change(&mut record);
                w.put_record(TreeId::Messages, key, &record);
                self.emit(AppEvent::ContactUpdated(*peer));
                Ok(Outcome::Applied("a change made on another device of ours"))
            }
            _ => Ok(Outcome::Applied(
                "a change made on another device of ours to a message not here",
            )),
        }
    }
}
