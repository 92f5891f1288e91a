//! A new session key for the same identity (SPEC.md §1, §2): the X25519 key every
//! queue, capability and session derives from is replaced; the identity key, and so
//! who we are to contacts, stays. The key before is kept for as long as what was
//! sealed to it, or put into the queues derived from it, can still arrive.

use kkachi_protocol::session::RETAIN_SECS;
use kkachi_protocol::{Identity, PeerId};
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};

use super::{IDENTITY_KEY, LocalStore, OutboxKind, StoreError, TreeId, WriteSet};

const PREVIOUS_IDENTITY_KEY: &[u8] = b"previous-identity";
/// When (Unix ms) contacts with no session under the new key were last sent our card.
const ROTATED_CARD_SENT_KEY: &[u8] = b"rotated-card-sent";

/// Stands in an outbox entry's `sealed_on` for "sealed before our session key
/// changed": no session has this id, so the entry is sealed again on the new one,
/// even one that went as a first message (which contacts no longer take from the old
/// key once they hold the new one).
pub const SEALED_UNDER_AN_OLD_KEY: [u8; 32] = [0xff; 32];

#[derive(Serialize, Deserialize)]
struct PreviousRecord {
    /// The identity with the session key before the last rotation
    /// ([`Identity::to_secret_bytes`]).
    secret: Vec<u8>,
    /// Unix seconds until which what was sealed to it can arrive.
    until: u64,
    /// The request epoch of the card that carried it: its request queue is read, and
    /// its capability withdrawn.
    epoch: u32,
}

impl Drop for PreviousRecord {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

/// The session key before the last rotation, while it is still read.
#[derive(Clone, Debug)]
pub struct PreviousKey {
    /// Our identity as it was, with that session key.
    pub identity: Identity,
    /// Unix seconds until which what was sealed to it, or put into its queues, can
    /// still arrive (then it is forgotten).
    pub until: u64,
    /// The request epoch of the last card that carried it.
    pub epoch: u32,
}

/// What a rotation did.
#[derive(Debug)]
pub struct Rotated {
    /// Our identity with its new session key.
    pub identity: Identity,
    /// The new card version, which every contact is sent.
    pub card_version: u64,
    /// Until when (Unix seconds) the old key's queues are read.
    pub old_key_until: u64,
    /// Our messages not yet confirmed, sealed again on the new key at the next start.
    pub resealed: usize,
}

impl LocalStore {
    /// The session key before the last rotation, if it is still read at `now_s`.
    pub fn previous_key(&self, now_s: u64) -> Result<Option<PreviousKey>, StoreError> {
        let Some(record) = self.get_record::<PreviousRecord>(
            TreeId::Meta,
            PREVIOUS_IDENTITY_KEY,
            "previous session key",
        )?
        else {
            return Ok(None);
        };
        if record.until <= now_s {
            return Ok(None);
        }
        let identity = Identity::from_secret_bytes(&record.secret)
            .map_err(|_| StoreError::Corrupt("previous session key"))?;
        Ok(Some(PreviousKey {
            identity,
            until: record.until,
            epoch: record.epoch,
        }))
    }

    /// Erases the session key before the last rotation once nothing sealed to it can
    /// arrive (at `now_s`); true if it did.
    pub fn forget_expired_previous_key(&self, now_s: u64) -> Result<bool, StoreError> {
        let expired = self
            .get_record::<PreviousRecord>(
                TreeId::Meta,
                PREVIOUS_IDENTITY_KEY,
                "previous session key",
            )?
            .is_some_and(|r| r.until <= now_s);
        if expired {
            let mut w = WriteSet::default();
            w.remove(TreeId::Meta, PREVIOUS_IDENTITY_KEY);
            w.remove(TreeId::Meta, ROTATED_CARD_SENT_KEY);
            self.apply(w)?;
        }
        Ok(expired)
    }

    /// When contacts with no session under our new key were last sent our card again.
    pub fn rotated_card_sent_ms(&self) -> Result<Option<u64>, StoreError> {
        self.get_record(
            TreeId::Meta,
            ROTATED_CARD_SENT_KEY,
            "card sent after rotation",
        )
    }

    /// Notes that they were sent it at `at_ms` (in a write set).
    pub fn write_rotated_card_sent(w: &mut WriteSet, at_ms: u64) {
        w.put_record(TreeId::Meta, ROTATED_CARD_SENT_KEY, &at_ms);
    }

    /// Our acting identity and our account's device set (the identity alone in a new
    /// one, for a home whose set the engine has not made yet: one from before sets, a
    /// backup without one); a refusal to edit it reads `why: …`.
    fn identity_and_devices(
        &self,
        now_s: u64,
        why: &'static str,
    ) -> Result<(Identity, kkachi_protocol::device::DeviceSet), StoreError> {
        let me = self
            .acting_identity()?
            .ok_or(StoreError::Corrupt("identity"))?;
        let set = match self.own_devices(&me)? {
            Some(set) => set,
            None => kkachi_protocol::device::DeviceSet::new(&me, super::DEFAULT_DEVICE_NAME, now_s)
                .map_err(devices_refused(why))?,
        };
        Ok((me, set))
    }

    /// Gives our identity a new session key, in one write: the key before is kept
    /// until `now_s +` [`RETAIN_SECS`], the card gets a new version (the engine sends
    /// it to every contact at its next start), every session is dropped (contacts see
    /// new ones, under the new key, and seal again what we did not confirm), and every
    /// message of ours still waiting is marked to be sealed again on them. The engine
    /// must not be running: it holds the identity.
    pub fn rotate_session_key<R: RngCore + CryptoRng>(
        &self,
        now_s: u64,
        rng: &mut R,
    ) -> Result<Rotated, StoreError> {
        // This device goes on under the new key: listed under it, the old one taken out
        // for good (contacts never go back to it), in one edit of the set. A home with
        // no set yet starts from the old key alone, so its removal is signed all the
        // same.
        const WHY: &str = "cannot list the new key among your devices";
        let (me, mut set) = self.identity_and_devices(now_s, WHY)?;
        let refused = devices_refused(WHY);
        let mut profile = self.profile()?.ok_or(StoreError::Corrupt("profile"))?;
        let identity = me.with_new_session_key(rng);
        let until = now_s.saturating_add(RETAIN_SECS);
        let mut w = WriteSet::default();
        w.put(
            TreeId::Meta,
            IDENTITY_KEY,
            identity.to_secret_bytes().to_vec(),
        );
        let previous = PreviousRecord {
            secret: me.to_secret_bytes().to_vec(),
            until,
            epoch: profile.request_epoch,
        };
        w.put_record(TreeId::Meta, PREVIOUS_IDENTITY_KEY, &previous);
        let old = me.x25519_public();
        let name = set
            .device(&old)
            .map_or(super::DEFAULT_DEVICE_NAME.to_owned(), |d| {
                d.name().to_owned()
            });
        set.add(&identity, identity.x25519_public(), &name, now_s)
            .map_err(&refused)?;
        if set.device(&old).is_some() {
            set.remove(&identity, &old, now_s).map_err(&refused)?;
        }
        Self::write_own_devices(&mut w, &set);
        // The card goes to every contact now; again to those still behind, from a day
        // on.
        Self::write_rotated_card_sent(&mut w, now_s.saturating_mul(1000));
        profile.card_version += 1;
        Self::write_profile(&mut w, &profile);
        let mut resealed = 0;
        // Our other devices too (SPEC §15.2): our sessions with them were under the old
        // key; what waits for them goes again on new ones (put with the old key's
        // capability, which they granted, until they hold the new set).
        let peers: Vec<PeerId> = self
            .contacts()?
            .iter()
            .map(|c| c.peer)
            .chain(std::iter::once(me.peer_id()))
            .collect();
        for peer in &peers {
            self.forget_sessions(&mut w, peer)?;
            for key in self.outbox_keys_of(peer) {
                let Some(mut entry) = self.outbox_entry(key)? else {
                    continue;
                };
                entry.sealed_on = Some(SEALED_UNDER_AN_OLD_KEY);
                entry.resealed_ms = 0;
                Self::write_outbox(&mut w, key, &entry);
                if entry.kind == OutboxKind::Message {
                    resealed += 1;
                }
            }
        }
        self.apply(w)?;
        Ok(Rotated {
            identity,
            card_version: profile.card_version,
            old_key_until: until,
            resealed,
        })
    }

    /// Lists the device whose session key is `key` among our account's devices, as
    /// `name` (the device that linked it does, as the new one lists itself).
    pub fn list_device(&self, key: [u8; 32], name: &str, now_s: u64) -> Result<(), StoreError> {
        const WHY: &str = "cannot list that device";
        let (me, mut set) = self.identity_and_devices(now_s, WHY)?;
        set.add(&me, key, name, now_s)
            .map_err(devices_refused(WHY))?;
        let mut w = WriteSet::default();
        Self::write_own_devices(&mut w, &set);
        self.apply(w)
    }

    /// Makes this home, holding the records of another device of the account (and
    /// none of its sessions or outbox), a device of its own beside that one: a session
    /// key of its own, listed among the account's devices as `name` with every device
    /// listed before, and a card of its own. Nothing of the other device's key is kept:
    /// it goes on reading its own queues. Returns the identity under the new key.
    pub fn become_new_device<R: RngCore + CryptoRng>(
        &self,
        name: &str,
        now_s: u64,
        rng: &mut R,
    ) -> Result<Identity, StoreError> {
        const WHY: &str = "cannot list this device";
        let (me, mut set) = self.identity_and_devices(now_s, WHY)?;
        let mut profile = self.profile()?.ok_or(StoreError::Corrupt("profile"))?;
        let identity = me.with_new_session_key(rng);
        set.add(&identity, identity.x25519_public(), name, now_s)
            .map_err(devices_refused(WHY))?;
        let mut w = WriteSet::default();
        w.put(
            TreeId::Meta,
            IDENTITY_KEY,
            identity.to_secret_bytes().to_vec(),
        );
        w.remove(TreeId::Meta, PREVIOUS_IDENTITY_KEY);
        w.remove(TreeId::Meta, ROTATED_CARD_SENT_KEY);
        Self::write_own_devices(&mut w, &set);
        // A card of its own, which rides its first messages; not sent as a card update
        // (contacts keep the account's card, and would take this one for a change of
        // key): its first words to each contact are the set, which lists it.
        profile.card_version += 1;
        profile.card_announced = profile.card_version;
        Self::write_profile(&mut w, &profile);
        // Sealed on the other device's sessions, for it: never this one's. And this
        // device numbers its own records, from 1 (SPEC §5): contacts keep each
        // device's numbers apart.
        for contact in self.contacts()?.iter() {
            self.forget_sessions(&mut w, &contact.peer)?;
            self.forget_outbox(&mut w, &contact.peer)?;
            let mut conv = self.conversation(&contact.peer)?;
            conv.next_seq = 0;
            conv.last_hash = [0; 32];
            Self::write_conversation(&mut w, &contact.peer, &conv);
        }
        self.apply(w)?;
        Ok(identity)
    }
}

/// What a refused edit of our device set becomes: `why: …`.
fn devices_refused(
    why: &'static str,
) -> impl Fn(kkachi_protocol::device::DeviceError) -> StoreError {
    move |e| StoreError::Devices(format!("{why}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_key_is_read_until_nothing_sealed_to_it_can_arrive_then_erased() {
        let dir = tempfile::tempdir().unwrap();
        let (store, me, _) = LocalStore::provision(dir.path(), "alice", &[]).unwrap();
        let now = crate::engine::now_ms() / 1000;
        let rotated = store
            .rotate_session_key(now, &mut rand_core::OsRng)
            .unwrap();
        assert!(rotated.identity.same_identity_key(&me));
        assert_ne!(rotated.identity.x25519_public(), me.x25519_public());
        assert_eq!(
            store.identity().unwrap().unwrap().x25519_public(),
            rotated.identity.x25519_public()
        );
        let previous = store.previous_key(now).unwrap().unwrap();
        assert_eq!(previous.identity.x25519_public(), me.x25519_public());
        assert_eq!(previous.until, now + RETAIN_SECS);
        assert!(
            !store.forget_expired_previous_key(now).unwrap(),
            "still read"
        );
        // Once its time is up it is no longer given out, and then erased from the disk.
        let later = now + RETAIN_SECS;
        assert!(store.previous_key(later).unwrap().is_none());
        assert!(store.forget_expired_previous_key(later).unwrap());
        assert!(
            store.previous_key(now).unwrap().is_none(),
            "gone, not only hidden"
        );
        assert!(store.rotated_card_sent_ms().unwrap().is_none());
    }

    #[test]
    fn a_home_with_no_set_yet_still_takes_the_old_key_out() {
        let dir = tempfile::tempdir().unwrap();
        let (store, me, _) = LocalStore::provision(dir.path(), "alice", &[]).unwrap();
        assert!(store.own_devices(&me).unwrap().is_none());
        let rotated = store
            .rotate_session_key(crate::engine::now_ms() / 1000, &mut rand_core::OsRng)
            .unwrap();
        let set = store.own_devices(&rotated.identity).unwrap().unwrap();
        assert!(set.is_removed(&me.x25519_public()));
        let listed: Vec<_> = set.devices().map(|d| *d.key()).collect();
        assert_eq!(listed, [rotated.identity.x25519_public()]);
    }

    #[test]
    fn each_new_key_takes_the_old_one_out_and_a_change_past_the_records_is_refused_whole() {
        use kkachi_protocol::device::{DeviceSet, MAX_EDIT_RECORDS};
        let dir = tempfile::tempdir().unwrap();
        let (store, me, _) = LocalStore::provision(dir.path(), "alice", &[]).unwrap();
        let now = crate::engine::now_ms() / 1000;
        let mut w = WriteSet::default();
        LocalStore::write_own_devices(&mut w, &DeviceSet::new(&me, "phone", now).unwrap());
        store.apply(w).unwrap();
        let mut keys = vec![me.x25519_public()];
        let refused = loop {
            match store.rotate_session_key(now, &mut rand_core::OsRng) {
                Ok(rotated) => keys.push(rotated.identity.x25519_public()),
                Err(e) => break e,
            }
            assert!(keys.len() <= MAX_EDIT_RECORDS, "never past the bound");
        };
        // One device, under the newest key and its name; every earlier key taken out.
        let me = store.identity().unwrap().unwrap();
        let set = store.own_devices(&me).unwrap().unwrap();
        let listed: Vec<_> = set
            .devices()
            .map(|d| (*d.key(), d.name().to_owned()))
            .collect();
        assert_eq!(listed, [(*keys.last().unwrap(), "phone".to_owned())]);
        assert!(keys[..keys.len() - 1].iter().all(|k| set.is_removed(k)));
        assert_eq!(set.records(), MAX_EDIT_RECORDS);
        // The change past them is refused, saying why, and nothing of it is written.
        assert!(
            refused.to_string().contains("cannot list the new key"),
            "{refused}"
        );
        assert_eq!(&me.x25519_public(), keys.last().unwrap());
    }
}
