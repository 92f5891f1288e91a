//! Device sets (SPEC §15): our account's, and each contact's as their devices sent it.
//!
//! Every set is kept in its canonical encoding and read back against the account's
//! identity key, so what the store holds is checked as a peer's set would be.

use kkachi_protocol::device::DeviceSet;
use kkachi_protocol::{Identity, PeerId};

use super::{LocalStore, StoreError, TreeId, WriteSet};

/// Our account's set.
pub(super) const DEVICES_KEY: &[u8] = b"devices";
/// After a contact's peer id in the devices tree: the digest of our set as last
/// queued for them. A set that differs goes again (to a contact met since, or after a
/// crash between a change and telling contacts).
const SENT_SUFFIX: u8 = 1;

/// Set once this home handed the account to a linked device (SPEC §15.1): that
/// device's session key (32) ‖ when, Unix ms (8). Never in a backup or a link's stream.
const HANDED_OVER_KEY: &[u8] = b"handed-over";

/// This home handed its account to another device: to which (its session key) and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandedOver {
    /// The session key of the device that took the account.
    pub to: [u8; 32],
    /// When, Unix ms.
    pub at_ms: u64,
}

/// What a device is called until its user names it (`kkachi device rename`). Contacts
/// see it, so it says nothing of the machine.
pub const DEFAULT_DEVICE_NAME: &str = "first device";

impl LocalStore {
    /// Whether this home handed its account to another device (and so acts for it no
    /// more).
    pub fn handed_over(&self) -> Result<Option<HandedOver>, StoreError> {
        Ok(self
            .tree(TreeId::Meta)
            .get(HANDED_OVER_KEY)?
            .filter(|v| v.len() == 40)
            .map(|v| HandedOver {
                to: v[..32].try_into().expect("32 bytes"),
                at_ms: u64::from_be_bytes(v[32..].try_into().expect("8 bytes")),
            }))
    }

    /// Records, durably before it returns, that this home handed its account to the
    /// device of session key `to`: from then on it starts no engine.
    pub fn hand_over(&self, to: [u8; 32], at_ms: u64) -> Result<(), StoreError> {
        let mut value = to.to_vec();
        value.extend_from_slice(&at_ms.to_be_bytes());
        let mut w = WriteSet::default();
        w.put(TreeId::Meta, HANDED_OVER_KEY, value);
        self.apply(w)?;
        self.sync()
    }

    /// Our identity, to act for the account with: `None` before `init`, and refused
    /// (saying why and what to do) in a home that handed the account to another device.
    pub fn acting_identity(&self) -> Result<Option<Identity>, StoreError> {
        if let Some(h) = self.handed_over()? {
            return Err(StoreError::HandedOver(format!(
                "this device handed your account to another device (key {}) on {}, and no longer acts for it: use that device. Only if it did not finish joining (it holds no account), `kkachi device link --again` here hands the account over again; otherwise remove this home",
                crate::engine::fingerprint(&h.to),
                crate::time::format_ms(h.at_ms)
            )));
        }
        self.identity()
    }

    /// Our account's device set, if this home has one yet (it is made at the first
    /// start of a home from before sets).
    pub fn own_devices(&self, me: &Identity) -> Result<Option<DeviceSet>, StoreError> {
        self.device_set(TreeId::Meta, DEVICES_KEY, me.public().ed25519())
    }

    /// Our account's device set as stored (canonical, read back with
    /// [`DeviceSet::decode`] against our identity key), if there is one.
    pub fn own_devices_bytes(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.tree(TreeId::Meta).get(DEVICES_KEY)
    }

    /// Replaces our account's device set.
    pub fn write_own_devices(w: &mut WriteSet, set: &DeviceSet) {
        w.put(TreeId::Meta, DEVICES_KEY, set.encode());
    }

    /// Whether our set of digest `sent` ([`devices_digest`]) is what contact `peer` was
    /// last sent: `None` if not; else whether it went on a session they had answered
    /// (one sent before, as a first message, may have been set aside by them: it goes
    /// once more when they answer).
    pub fn devices_sent_to(
        &self,
        peer: &PeerId,
        sent: &[u8; 32],
    ) -> Result<Option<bool>, StoreError> {
        Ok(self
            .tree(TreeId::Devices)
            .get(sent_key(peer))?
            .filter(|kept| kept.len() == 33 && kept[..32] == sent[..])
            .map(|kept| kept[32] == 1))
    }

    /// Records our set of digest `sent` as sent to contact `peer`, on a session they
    /// had answered (`answered`) or not.
    pub fn write_devices_sent_to(w: &mut WriteSet, peer: &PeerId, sent: &[u8; 32], answered: bool) {
        let mut value = sent.to_vec();
        value.push(u8::from(answered));
        w.put(TreeId::Devices, sent_key(peer), value);
    }

    /// Forgets what we sent contact `peer` (they are forgotten). Their set stays: a
    /// key their account took out stays out if they are added again, or met in a group.
    pub(super) fn forget_devices_sent(w: &mut WriteSet, peer: &PeerId) {
        w.remove(TreeId::Devices, sent_key(peer));
    }

    /// The set kept for `peer`, as stored (it holds what was checked when it came).
    pub fn contact_devices_bytes(&self, peer: &PeerId) -> Result<Option<Vec<u8>>, StoreError> {
        self.tree(TreeId::Devices).get(peer.to_bytes())
    }

    /// Whether `key` of the devices tree is a record of what we sent (not a contact's
    /// set): a backup leaves those out, as it leaves out the outbox that carried them.
    pub(super) fn is_sent_marker(key: &[u8]) -> bool {
        key.last() == Some(&SENT_SUFFIX) && PeerId::from_bytes(&key[..key.len() - 1]).is_ok()
    }

    /// The device set contact `peer` (whose identity key is `account`) sent, merged
    /// over everything they sent before.
    pub fn contact_devices(
        &self,
        peer: &PeerId,
        account: &[u8; 32],
    ) -> Result<Option<DeviceSet>, StoreError> {
        self.device_set(TreeId::Devices, &peer.to_bytes(), account)
    }

    /// Replaces the device set kept for contact `peer`.
    pub fn write_contact_devices(w: &mut WriteSet, peer: &PeerId, set: &DeviceSet) {
        w.put(TreeId::Devices, peer.to_bytes(), set.encode());
    }

    fn device_set(
        &self,
        tree: TreeId,
        key: &[u8],
        account: &[u8; 32],
    ) -> Result<Option<DeviceSet>, StoreError> {
        match self.tree(tree).get(key)? {
            None => Ok(None),
            Some(bytes) => DeviceSet::decode(account, &bytes)
                .map(Some)
                .map_err(|_| StoreError::Corrupt("device set")),
        }
    }
}

fn sent_key(peer: &PeerId) -> Vec<u8> {
    let mut key = peer.to_bytes();
    key.push(SENT_SUFFIX);
    key
}

/// What stands for a set of ours in the records of what each contact was sent.
pub fn devices_digest(set: &DeviceSet) -> [u8; 32] {
    use blake2::Digest as _;
    blake2::Blake2s256::digest(set.encode()).into()
}
