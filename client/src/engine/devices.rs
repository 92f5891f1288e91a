//! Device sets (SPEC §15): ours, sent to every contact whenever it changes, and each
//! contact's, taken in from what their devices send (content kind 12) and merged over
//! what they sent before.
//!
//! It keeps and shows the sets, and refuses a contact's move to a session key their
//! account took out: whoever copied a device's key before its removal cannot have
//! contacts seal to it again. Every other device of a contact's account that proved its
//! key is sealed to as well (see [`super::state::PeerSessions`]); one the set takes out
//! is sealed nothing more.

use kkachi_protocol::device::DeviceSet;
use kkachi_protocol::{Body, Card};

use super::receive::Outcome;
use super::state::{OwnPeer, PeerSessions, Sessions, State};
use super::{AppEvent, EngineError};
use crate::store::{Contact, DEFAULT_DEVICE_NAME, LocalStore, WriteSet, devices_digest};

/// What our account's other devices are called where one name is wanted (logs).
const OWN_DEVICES: &str = "your other devices";

impl<T> State<T> {
    /// Our account's device set; this device alone in a new one, written into `w`, for
    /// a home from before sets.
    pub(crate) fn own_devices(&self, w: &mut WriteSet, now: u64) -> Result<DeviceSet, EngineError> {
        if let Some(set) = self.store.own_devices(&self.me)? {
            return Ok(set);
        }
        let set = DeviceSet::new(&self.me, DEFAULT_DEVICE_NAME, now / 1000)
            .map_err(|e| EngineError::Invalid(format!("cannot list this device: {e}")))?;
        LocalStore::write_own_devices(w, &set);
        Ok(set)
    }

    /// Our account's other devices as one peer to seal to and read from (SPEC §15.2):
    /// our own peer id and card, with a session per device our set lists beside this
    /// one ([`super::state::Sessions`]); `None` while it lists this device alone. Never
    /// a contact: it is not stored, listed or shown as one.
    pub(crate) fn own_contact(&self) -> Result<Option<Contact>, EngineError> {
        self.with_own(|own| own.contact.clone())
    }

    /// `f` of what our set says ([`OwnPeer`]), decoded (and its signatures checked)
    /// only when the set or our card changed since it last was.
    pub(super) fn with_own<R>(&self, f: impl FnOnce(&OwnPeer) -> R) -> Result<R, EngineError> {
        let raw = self.store.own_devices_bytes()?.unwrap_or_default();
        let card = self.own_card()?;
        let mut cached = self.own.lock();
        if let Some(own) = cached.as_ref()
            && own.set == raw
            && own.card_version == card.version()
        {
            return Ok(f(own));
        }
        let me = self.me.x25519_public();
        let mut keys = vec![me];
        let mut listed = Vec::new();
        if !raw.is_empty() {
            let set = DeviceSet::decode(self.me.public().ed25519(), &raw)
                .map_err(|_| crate::store::StoreError::Corrupt("device set"))?;
            listed.extend(set.devices().map(|d| *d.key()).filter(|k| *k != me));
            keys.extend(&listed);
            keys.extend(set.removals().map(|r| *r.key()).filter(|k| *k != me));
        }
        let others = !listed.is_empty();
        let own = OwnPeer {
            set: raw,
            card_version: card.version(),
            contact: others.then(|| Contact {
                peer: self.me.peer_id(),
                name: OWN_DEVICES.into(),
                card,
                through_group: false,
            }),
            keys,
            listed,
        };
        Ok(f(cached.insert(own)))
    }

    /// Queues our device set for every contact not blocked who was not sent it as it
    /// is (met since, or it changed) and who has written to us (an established session,
    /// or a message of theirs): one who has not may not have added us, and a set would
    /// spend their relays' allowance for strangers on a record they refuse. Records it
    /// as sent in the same write. Returns for how many.
    pub(crate) fn announce_devices_if_due(&mut self, now: u64) -> Result<usize, EngineError> {
        let mut w = WriteSet::default();
        let set = self.own_devices(&mut w, now)?;
        let digest = devices_digest(&set);
        let mut behind = Vec::new();
        for contact in self.store.contacts()?.iter() {
            if self.store.blocked(&contact.peer)?.is_some() {
                continue;
            }
            match self.store.devices_sent_to(&contact.peer, &digest)? {
                Some(true) => {}
                sent => behind.push((contact.clone(), sent.is_some())),
            }
        }
        // Our other devices get every change, to merge into theirs (SPEC §15.2).
        let own = match self.own_contact()? {
            Some(own) if self.store.devices_sent_to(&own.peer, &digest)?.is_none() => Some(own),
            _ => None,
        };
        if behind.is_empty() && own.is_none() {
            // The usual case at every upkeep.
            self.store.apply(w)?;
            return Ok(0);
        }
        self.with_sessions(|this, sessions| {
            let mut n = 0;
            if let Some(own) = &own {
                let devices = sessions.get(&this.store, own)?;
                if !devices.devices.is_empty() {
                    this.queue_devices(&mut w, own, devices, &set, now)?;
                    n += 1;
                }
            }
            for (contact, sent_unanswered) in &behind {
                let theirs = sessions.get(&this.store, contact)?;
                // Established, or another device of theirs wrote to us (it proved its key).
                let answered = theirs.is_established() || !theirs.devices.is_empty();
                // Sent as a first message already: once more when they answer (a first
                // message can be set aside, as during a change of our key).
                let due = if *sent_unanswered {
                    answered
                } else {
                    answered || this.store.conversation(&contact.peer)?.gaps.max_seen() > 0
                };
                if due {
                    let session = sessions.get(&this.store, contact)?;
                    this.queue_devices(&mut w, contact, session, &set, now)?;
                    n += 1;
                }
            }
            this.apply_or_reset(sessions, w)?;
            Ok(n)
        })
    }

    /// Gives this device a new name, which contacts see. Returns the set as it is now;
    /// it goes to contacts with [`State::announce_devices_if_due`].
    pub(crate) fn rename_device(&mut self, name: &str, now: u64) -> Result<DeviceSet, EngineError> {
        let mut w = WriteSet::default();
        let mut set = self.own_devices(&mut w, now)?;
        let key = self.me.x25519_public();
        let name = name.trim();
        if set.device(&key).is_some_and(|d| d.name() == name) {
            self.store.apply(w)?;
            return Ok(set);
        }
        set.add(&self.me, key, name, now / 1000)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        LocalStore::write_own_devices(&mut w, &set);
        self.store.apply(w)?;
        Ok(set)
    }

    /// Takes the device named by `which` (its name, or the start of its key's
    /// fingerprint or hex) out of our account: contacts seal nothing more to it once
    /// the set reaches them (it goes with [`State::announce_devices_if_due`]). Never
    /// this device (it would stop acting for the account by its own hand), nor one
    /// `which` does not name alone. Returns the set as it is now and the key taken out.
    pub(crate) fn remove_device(
        &mut self,
        which: &str,
        now: u64,
    ) -> Result<(DeviceSet, [u8; 32]), EngineError> {
        let mut w = WriteSet::default();
        let mut set = self.own_devices(&mut w, now)?;
        let wanted = which.trim().to_lowercase().replace(' ', "");
        if wanted.is_empty() {
            return Err(EngineError::Invalid("name the device to remove".into()));
        }
        let named: Vec<[u8; 32]> = set
            .devices()
            .filter(|d| {
                d.name().to_lowercase() == which.trim().to_lowercase()
                    || d.key()
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                        .starts_with(&wanted)
            })
            .map(|d| *d.key())
            .collect();
        let key = match named.as_slice() {
            [key] => *key,
            [] => {
                return Err(EngineError::Invalid(format!(
                    "no device of this account is named {}: `kkachi device list` shows them",
                    crate::sanitize::for_terminal(which)
                )));
            }
            _ => {
                return Err(EngineError::Invalid(format!(
                    "{} names more than one device: give more of its key",
                    crate::sanitize::for_terminal(which)
                )));
            }
        };
        if key == self.me.x25519_public() {
            return Err(EngineError::Invalid(
                "that is this device: remove it from another device of the account".into(),
            ));
        }
        let before = set.clone();
        set.remove(&self.me, &key, now / 1000)
            .map_err(|e| EngineError::Invalid(format!("cannot remove that device: {e}")))?;
        LocalStore::write_own_devices(&mut w, &set);
        // Nothing more goes to it from here, not even what waits.
        self.drop_own_taken_out(&mut w, &before, &set);
        self.store.apply(w)?;
        Ok((set, key))
    }

    /// Before anything else goes to `contact` on a new session: our set, if it lists
    /// other devices and they were never sent it. A device's first words to a contact
    /// must say it is one of the account's devices, or its card would be taken for a
    /// change of key (SPEC §15).
    pub(crate) fn devices_first(
        &self,
        w: &mut WriteSet,
        contact: &Contact,
        session: &mut PeerSessions,
        now: u64,
    ) -> Result<(), EngineError> {
        let Some(set) = self.store.own_devices(&self.me)? else {
            return Ok(());
        };
        if set.devices().nth(1).is_none()
            || self
                .store
                .devices_sent_to(&contact.peer, &devices_digest(&set))?
                .is_some()
        {
            return Ok(());
        }
        self.queue_devices(w, contact, session, &set, now)
    }

    /// Queues `set` (ours) for `contact`, recorded as sent to them.
    pub(super) fn queue_devices(
        &self,
        w: &mut WriteSet,
        contact: &Contact,
        session: &mut PeerSessions,
        set: &DeviceSet,
        now: u64,
    ) -> Result<(), EngineError> {
        let answered = session.is_established();
        self.queue_control(w, contact, session, Body::Devices(set.encode()), now)?;
        LocalStore::write_devices_sent_to(w, &contact.peer, &devices_digest(set), answered);
        Ok(())
    }

    /// Takes in the device set `contact` sent: read against their identity key, merged
    /// over the one kept. A set that does not hold, or whose merge would pass the bound
    /// on records, is refused whole and changes nothing.
    ///
    /// A device the set takes out is sealed nothing more from here: our session with
    /// it goes, with what waits for it in the outbox, and our relays stop taking its
    /// puts.
    pub(super) fn take_devices(
        &self,
        w: &mut WriteSet,
        sessions: &mut Sessions,
        contact: &Contact,
        bytes: &[u8],
    ) -> Result<Outcome, EngineError> {
        let account = *contact.card.identity().ed25519();
        let stored = self.store.contact_devices_bytes(&contact.peer)?;
        if stored.as_deref() == Some(bytes) {
            // The usual case (the set came again): nothing to check or write.
            return Ok(Outcome::Applied("a device set kept already"));
        }
        let theirs = match DeviceSet::decode(&account, bytes) {
            Ok(set) => set,
            Err(e) => {
                return Ok(Outcome::Refused(
                    format!("a device set that does not hold: {e}").into(),
                ));
            }
        };
        // Read from the bytes at hand (checked when they came), not read again.
        let kept = match &stored {
            None => None,
            Some(bytes) => Some(
                DeviceSet::decode(&account, bytes)
                    .map_err(|_| crate::store::StoreError::Corrupt("device set"))?,
            ),
        };
        let (merged, change) = match kept {
            None => (theirs, None),
            Some(mut set) => match set.merge(&theirs) {
                Ok(change) => (set, Some(change)),
                Err(e) => {
                    return Ok(Outcome::Refused(
                        format!("a device set that cannot be merged: {e}").into(),
                    ));
                }
            },
        };
        // A key that speaks for them now, or no longer does, is told (not renames).
        if let Some(change) = change.filter(|c| !c.added.is_empty() || !c.removed.is_empty()) {
            let added = change
                .added
                .iter()
                .filter_map(|k| merged.device(k))
                .map(|d| (d.name().to_owned(), *d.key()))
                .collect();
            self.emit(AppEvent::DevicesChanged {
                contact: contact.peer,
                name: contact.name.clone(),
                added,
                removed: change.removed,
            });
        }
        if merged.is_removed(contact.card.identity().x25519()) {
            tracing::warn!(contact = %contact.peer, "a contact's account took out the device their card names");
        }
        let peer_sessions = sessions.get(&self.store, contact)?;
        let gone: Vec<[u8; 32]> = peer_sessions
            .devices
            .keys()
            .filter(|k| merged.is_removed(k))
            .copied()
            .collect();
        for key in &gone {
            peer_sessions.devices.remove(key);
            LocalStore::remove_device_session(w, &contact.peer, key);
            LocalStore::forget_device_numbers(w, &contact.peer, key);
            for entry in self.store.outbox_keys_of_device(&contact.peer, &Some(*key)) {
                w.remove(crate::store::TreeId::Outbox, entry.to_be_bytes().to_vec());
            }
            tracing::info!(contact = %contact.peer, "a contact's account took out a device of theirs: nothing more is sealed to it");
        }
        let card_key = contact.card.identity().x25519();
        let card_removed_at = super::state::removed_at(&merged, card_key);
        if card_removed_at.is_some() && peer_sessions.card_removed_at.is_none() {
            // The card's device likewise: our relays stop taking its puts, and while
            // another device of theirs is there, what waits for it goes.
            if !peer_sessions.devices.is_empty() {
                for entry in self.store.outbox_keys_of_device(&contact.peer, &None) {
                    w.remove(crate::store::TreeId::Outbox, entry.to_be_bytes().to_vec());
                }
            }
            self.revoked.lock().push(*card_key);
        }
        peer_sessions.card_removed_at = card_removed_at;
        if !gone.is_empty() {
            sessions.reindex(&contact.peer);
            self.revoked.lock().extend(gone);
        }
        // A set that adds nothing (an older one, come late) writes nothing.
        let merged_bytes = merged.encode();
        if stored.as_deref() != Some(merged_bytes.as_slice()) {
            LocalStore::write_contact_devices(w, &contact.peer, &merged);
            self.emit(AppEvent::ContactUpdated(contact.peer));
            // The devices it lists are let in on the network (and on the LAN).
            self.grants_changed();
        }
        Ok(Outcome::Applied("a device set"))
    }

    /// Whether the account of `card` took the session key it names out (as far as the
    /// set kept for it says, kept even after they stopped being a contact): such a card
    /// is never taken.
    pub(super) fn names_removed_device(&self, card: &Card) -> Result<bool, EngineError> {
        let identity = card.identity();
        Ok(self
            .store
            .contact_devices(&identity.peer_id(), identity.ed25519())?
            .is_some_and(|set| set.is_removed(identity.x25519())))
    }
}

/// A device's key as people compare it: its first 8 bytes in hex, in four groups.
pub fn fingerprint(key: &[u8; 32]) -> String {
    key[..8]
        .chunks(2)
        .map(|pair| format!("{:02x}{:02x}", pair[0], pair[1]))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a change to the devices of `name` says, on one line (the names made safe to
/// print): "Minji's account lists tablet (key dc47 5c0f 7176 0ac1) and took out key
/// 9a0b 1c2d 3e4f 5a6b" (a change of key, or a restore, reads so).
pub fn device_change_line(
    name: &str,
    added: &[(String, [u8; 32])],
    removed: &[[u8; 32]],
) -> String {
    use crate::sanitize::for_terminal;
    let listed: Vec<String> = added
        .iter()
        .map(|(device, key)| format!("{} (key {})", for_terminal(device), fingerprint(key)))
        .collect();
    let out: Vec<String> = removed
        .iter()
        .map(|k| format!("key {}", fingerprint(k)))
        .collect();
    let said = match (listed.is_empty(), out.is_empty()) {
        (false, true) => format!("lists another device: {}", listed.join(", ")),
        (true, false) => format!("took out the device with {}", out.join(", ")),
        _ => format!(
            "lists {} and took out {}",
            listed.join(", "),
            out.join(", ")
        ),
    };
    format!("{}'s account {said}", for_terminal(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_of_devices_reads_as_one_safe_line() {
        let (a, b) = ([0xdc; 32], [0x9a; 32]);
        assert_eq!(fingerprint(&a), "dcdc dcdc dcdc dcdc");
        assert_eq!(
            device_change_line("Minji", &[("tablet".into(), a)], &[b]),
            "Minji's account lists tablet (key dcdc dcdc dcdc dcdc) and took out key 9a9a 9a9a 9a9a 9a9a"
        );
        assert_eq!(
            device_change_line("Minji", &[("tablet".into(), a)], &[]),
            "Minji's account lists another device: tablet (key dcdc dcdc dcdc dcdc)"
        );
        assert_eq!(
            device_change_line("Minji", &[], &[b]),
            "Minji's account took out the device with key 9a9a 9a9a 9a9a 9a9a"
        );
        // A name that would drive the terminal is shown defanged.
        let line = device_change_line("Min\u{1b}[2Jji", &[("x\u{7}".into(), a)], &[]);
        assert!(
            !line.contains('\u{1b}') && !line.contains('\u{7}'),
            "{line:?}"
        );
    }
}
