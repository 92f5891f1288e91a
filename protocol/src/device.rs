//! The devices of one account (SPEC.md §15): which X25519 session keys speak for an
//! identity key, as a set every device can edit and all of them agree on.
//!
//! Every device of an account holds the account's identity key and a session key of its
//! own. The set lists the session keys, each in an entry the identity key signed, and
//! the keys taken out, each in a signed removal that stays: a removed key never comes
//! back, whatever copy of an older set turns up later. Two devices that edit the set at
//! once, offline, each keep their edits: merging takes the union of entries and of
//! removals, so any two holders of the same entries and removals see the same devices
//! whatever order they met them in (the set is a join-semilattice; merging is
//! commutative, associative and idempotent).
//!
//! Nothing here trusts the bytes it reads: every entry and removal is checked against
//! the account's key, counts are bounded before anything is allocated, and a merge
//! whose result would hold more records than a set may is refused as a whole, leaving
//! the set as it was. The one bound is on keys ever signed (devices listed plus
//! removals), which a merge can only raise: so whenever everything signed for an
//! account fits, every order of merging succeeds and they all agree. Devices stop
//! editing at half the bound, which leaves the other half to copies edited apart.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::card::{NameError, check_name};
use crate::codec::{DecodeError, Reader, Writer};
use crate::identity::{Identity, verify_raw};

/// Version byte of an encoded device set.
pub const DEVICE_SET_VERSION: u8 = 1;
/// Label of the signature on a device entry.
pub const DEVICE_LABEL: &str = "kkachi/device/v1";
/// Label of the signature on a removal.
pub const REMOVAL_LABEL: &str = "kkachi/device-removal/v1";
/// Devices a client lets its user link: it refuses to add one more while it sees
/// this many.
pub const MAX_DEVICES: usize = 8;
/// Entries and removals together in one set: the keys ever signed for an account.
pub const MAX_DEVICE_RECORDS: usize = 64;
/// Records past which a device adds no device: an account links this many devices over
/// its life (the first included) before it needs a new identity, and copies of the set
/// edited apart have as many again to merge into.
pub const MAX_EDIT_RECORDS: usize = MAX_DEVICE_RECORDS / 2;
/// A device's time may not be this (a rename must be able to come later).
const END_OF_TIME: u64 = u64::MAX;
/// Bytes of a device's name (at most 64 characters, as every name: SPEC §2).
pub const MAX_DEVICE_NAME_LEN: usize = 255;
/// The largest encoded set: version, two counts, and the records at their largest.
pub const MAX_DEVICE_SET_LEN: usize =
    1 + 1 + 1 + MAX_DEVICE_RECORDS * (32 + 8 + 1 + MAX_DEVICE_NAME_LEN + 64);

/// Why a device set was refused or could not be changed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DeviceError {
    /// The bytes are not a well-formed set.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// An entry or removal is not signed by the account's identity key.
    #[error("a device {what} is not signed by the account's identity key")]
    BadSignature {
        /// "entry" or "removal".
        what: &'static str,
    },
    /// A device's name breaks the rules for names.
    #[error("the device name is not allowed: {0}")]
    Name(#[from] NameError),
    /// The identity given is not this set's account.
    #[error("this device set belongs to another account")]
    OtherAccount,
    /// The key was taken out of the account, which is for good.
    #[error(
        "that device was removed from this account and cannot come back; link it again to give it a new key"
    )]
    Removed,
    /// The key is not one of the account's devices.
    #[error("no such device in this account")]
    Unknown,
    /// Taking out the last device would leave the account with none.
    #[error("this is the account's only device; it cannot be removed")]
    LastDevice,
    /// The account already has as many devices as a client links.
    #[error("this account has {0} devices, the most it may have; remove one first")]
    TooMany(usize),
    /// The set (or a merge into it) would hold more records than the bound allows.
    #[error(
        "the device set would hold {records} devices and removals; at most {max} may be (an account that signed more needs a new identity)"
    )]
    Full {
        /// Entries and removals it would hold.
        records: usize,
        /// The bound that applies: [`MAX_DEVICE_RECORDS`], or [`MAX_EDIT_RECORDS`]
        /// for adding a device.
        max: usize,
    },
    /// A time at the end of the clock's range: nothing could come after it.
    #[error("the device time {0} is out of range")]
    BadTime(u64),
}

/// One device of the account, as its identity key vouched for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    key: [u8; 32],
    name: String,
    at: u64,
    sig: [u8; 64],
}

impl Device {
    /// The device's X25519 session key, which names it.
    pub fn key(&self) -> &[u8; 32] {
        &self.key
    }

    /// The name its user gave it ("laptop"): shown to the account's own devices and
    /// to every contact (and member met in a group) the set goes to.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// When it was added or last renamed (Unix seconds, the editor's clock).
    pub fn at(&self) -> u64 {
        self.at
    }

    fn signed_bytes(key: &[u8; 32], at: u64, name: &str) -> Vec<u8> {
        let mut w = Writer::with_capacity(32 + 8 + 1 + name.len());
        w.raw(key).u64(at).bytes8(name.as_bytes());
        w.finish()
    }

    fn write(&self, w: &mut Writer) {
        w.raw(&self.key)
            .u64(self.at)
            .bytes8(self.name.as_bytes())
            .raw(&self.sig);
    }

    /// Of two entries for the same key, the one a merge keeps: the greater `(at, name,
    /// signature)` (names and signatures compared byte by byte), so every device keeps
    /// the same one.
    fn wins_over(&self, other: &Device) -> bool {
        (self.at, &self.name, &self.sig) > (other.at, &other.name, &other.sig)
    }
}

/// A device taken out of the account, signed by its identity key; kept for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    key: [u8; 32],
    at: u64,
    sig: [u8; 64],
}

impl Removal {
    /// The session key of the device taken out.
    pub fn key(&self) -> &[u8; 32] {
        &self.key
    }

    /// When it was taken out (Unix seconds, the editor's clock).
    pub fn at(&self) -> u64 {
        self.at
    }

    fn signed_bytes(key: &[u8; 32], at: u64) -> Vec<u8> {
        let mut w = Writer::with_capacity(40);
        w.raw(key).u64(at);
        w.finish()
    }

    /// Of two removals of one key, the one a merge keeps: the earlier, and of two as
    /// early the smaller signature.
    fn wins_over(&self, other: &Removal) -> bool {
        (self.at, &self.sig) < (other.at, &other.sig)
    }
}

/// What a merge changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    /// Keys listed now that were not before.
    pub added: Vec<[u8; 32]>,
    /// Keys listed before and taken out now.
    pub removed: Vec<[u8; 32]>,
    /// Keys whose entry changed (a new name).
    pub renamed: Vec<[u8; 32]>,
}

impl Merged {
    /// Whether the merge changed nothing anyone would see.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.renamed.is_empty()
    }
}

/// The devices of one account: entries and removals, each signed by its identity key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSet {
    account: [u8; 32],
    devices: BTreeMap<[u8; 32], Device>,
    removed: BTreeMap<[u8; 32], Removal>,
}

impl DeviceSet {
    /// The set of a new account: its one device, the identity's own session key.
    pub fn new(identity: &Identity, name: &str, now: u64) -> Result<Self, DeviceError> {
        let mut set = Self {
            account: *identity.public().ed25519(),
            devices: BTreeMap::new(),
            removed: BTreeMap::new(),
        };
        set.add(identity, identity.x25519_public(), name, now)?;
        Ok(set)
    }

    /// The account's identity key (raw Ed25519).
    pub fn account(&self) -> &[u8; 32] {
        &self.account
    }

    /// The devices listed, by key.
    pub fn devices(&self) -> impl Iterator<Item = &Device> {
        self.devices.values()
    }

    /// The removals kept, by key.
    pub fn removals(&self) -> impl Iterator<Item = &Removal> {
        self.removed.values()
    }

    /// The device with this session key, if it is listed.
    pub fn device(&self, key: &[u8; 32]) -> Option<&Device> {
        self.devices.get(key)
    }

    /// Whether this session key was taken out of the account.
    pub fn is_removed(&self, key: &[u8; 32]) -> bool {
        self.removed.contains_key(key)
    }

    fn check_identity(&self, identity: &Identity) -> Result<(), DeviceError> {
        if identity.public().ed25519() == &self.account {
            Ok(())
        } else {
            Err(DeviceError::OtherAccount)
        }
    }

    fn check_bounds(records: usize, max: usize) -> Result<(), DeviceError> {
        if records > max {
            return Err(DeviceError::Full { records, max });
        }
        Ok(())
    }

    /// Entries and removals held: the keys ever signed for the account, as far as this
    /// copy knows.
    pub fn records(&self) -> usize {
        self.devices.len() + self.removed.len()
    }

    /// Lists a device (or renames one listed), signed by the account's identity key.
    /// Refused for a key taken out before, and for one device more than
    /// [`MAX_DEVICES`].
    pub fn add(
        &mut self,
        identity: &Identity,
        key: [u8; 32],
        name: &str,
        now: u64,
    ) -> Result<(), DeviceError> {
        self.check_identity(identity)?;
        check_name(name)?;
        if now == END_OF_TIME {
            return Err(DeviceError::BadTime(now));
        }
        if self.removed.contains_key(&key) {
            return Err(DeviceError::Removed);
        }
        let listed = self.devices.get(&key);
        if listed.is_none() {
            if self.devices.len() >= MAX_DEVICES {
                return Err(DeviceError::TooMany(self.devices.len()));
            }
            Self::check_bounds(self.records() + 1, MAX_EDIT_RECORDS)?;
        }
        // A rename is a later entry: it must win over the one it replaces.
        let at = match listed {
            None => now,
            Some(d) => match d.at.checked_add(1).filter(|at| *at != END_OF_TIME) {
                Some(after) => now.max(after),
                None => return Err(DeviceError::BadTime(d.at)),
            },
        };
        let sig = identity.sign(DEVICE_LABEL, &Device::signed_bytes(&key, at, name));
        let device = Device {
            key,
            name: name.to_owned(),
            at,
            sig,
        };
        self.devices.insert(key, device);
        Ok(())
    }

    /// Takes a device out of the account for good. Refused for the last device listed
    /// (though two devices that each take out the other while apart leave none: see
    /// SPEC §15). The removal takes the place of the entry, so the records held stay as
    /// many.
    pub fn remove(
        &mut self,
        identity: &Identity,
        key: &[u8; 32],
        now: u64,
    ) -> Result<(), DeviceError> {
        self.check_identity(identity)?;
        if self.removed.contains_key(key) {
            return Ok(());
        }
        if now == END_OF_TIME {
            return Err(DeviceError::BadTime(now));
        }
        if !self.devices.contains_key(key) {
            return Err(DeviceError::Unknown);
        }
        if self.devices.len() == 1 {
            return Err(DeviceError::LastDevice);
        }
        let sig = identity.sign(REMOVAL_LABEL, &Removal::signed_bytes(key, now));
        self.devices.remove(key);
        self.removed.insert(
            *key,
            Removal {
                key: *key,
                at: now,
                sig,
            },
        );
        Ok(())
    }

    /// Takes in what another copy of the set holds. Both must be the same account's
    /// (anything decoded was checked against it). Refused as a whole, changing nothing,
    /// when the result would hold more than [`MAX_DEVICE_RECORDS`] records: only an
    /// account signing past its bound can cause that, and only about its own devices.
    pub fn merge(&mut self, other: &DeviceSet) -> Result<Merged, DeviceError> {
        if other.account != self.account {
            return Err(DeviceError::OtherAccount);
        }
        let mut removed = self.removed.clone();
        for (key, r) in &other.removed {
            match removed.get(key) {
                Some(kept) if !r.wins_over(kept) => {}
                _ => {
                    removed.insert(*key, r.clone());
                }
            }
        }
        let mut devices: BTreeMap<[u8; 32], Device> = self
            .devices
            .iter()
            .filter(|(key, _)| !removed.contains_key(*key))
            .map(|(k, d)| (*k, d.clone()))
            .collect();
        for (key, d) in &other.devices {
            if removed.contains_key(key) {
                continue;
            }
            match devices.get(key) {
                Some(kept) if !d.wins_over(kept) => {}
                _ => {
                    devices.insert(*key, d.clone());
                }
            }
        }
        Self::check_bounds(devices.len() + removed.len(), MAX_DEVICE_RECORDS)?;
        let mut merged = Merged::default();
        for (key, d) in &devices {
            match self.devices.get(key) {
                None => merged.added.push(*key),
                Some(before) if before.name != d.name => merged.renamed.push(*key),
                Some(_) => {}
            }
        }
        merged.removed = self
            .devices
            .keys()
            .filter(|k| !devices.contains_key(*k))
            .copied()
            .collect();
        self.devices = devices;
        self.removed = removed;
        Ok(merged)
    }

    /// The canonical encoding: `version(1)=1 ‖ count(1) ‖ count × device ‖ count(1) ‖
    /// count × removal`, devices and removals each in ascending order of key, no key
    /// in both; `device = key(32) ‖ at(8) ‖ u8 len ‖ name ‖ signature(64)` and
    /// `removal = key(32) ‖ at(8) ‖ signature(64)`.
    pub fn encode(&self) -> Vec<u8> {
        let mut w =
            Writer::with_capacity(3 + self.devices.len() * (105 + 16) + self.removed.len() * 104);
        w.u8(DEVICE_SET_VERSION).u8(self.devices.len() as u8);
        for d in self.devices.values() {
            d.write(&mut w);
        }
        w.u8(self.removed.len() as u8);
        for r in self.removed.values() {
            w.raw(&r.key).u64(r.at).raw(&r.sig);
        }
        w.finish()
    }

    /// Reads a set of the account with identity key `account`, checking every
    /// signature, the order, the names and the bounds.
    pub fn decode(account: &[u8; 32], bytes: &[u8]) -> Result<Self, DeviceError> {
        if bytes.len() > MAX_DEVICE_SET_LEN {
            return Err(DecodeError::TooLong {
                field: "device set",
                len: bytes.len() as u64,
                max: MAX_DEVICE_SET_LEN as u64,
            }
            .into());
        }
        let mut r = Reader::new(bytes);
        let version = r.u8("device set version")?;
        if version != DEVICE_SET_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "device set",
                version,
            }
            .into());
        }
        let count = usize::from(r.u8("device count")?);
        Self::check_bounds(count, MAX_DEVICE_RECORDS)?;
        let mut devices = BTreeMap::new();
        for _ in 0..count {
            let key = r.array::<32>("device key")?;
            let at = r.u64("device time")?;
            let name = r.str8(MAX_DEVICE_NAME_LEN, "device name")?;
            let sig = r.array::<64>("device signature")?;
            check_name(name)?;
            check_read(
                &devices,
                &key,
                at,
                "devices are not in ascending order of key",
            )?;
            if !verify_raw(
                account,
                DEVICE_LABEL,
                &Device::signed_bytes(&key, at, name),
                &sig,
            ) {
                return Err(DeviceError::BadSignature { what: "entry" });
            }
            let name = name.to_owned();
            devices.insert(key, Device { key, name, at, sig });
        }
        let count = usize::from(r.u8("removal count")?);
        Self::check_bounds(devices.len() + count, MAX_DEVICE_RECORDS)?;
        let mut removed = BTreeMap::new();
        for _ in 0..count {
            let key = r.array::<32>("removed device key")?;
            let at = r.u64("removal time")?;
            let sig = r.array::<64>("removal signature")?;
            check_read(
                &removed,
                &key,
                at,
                "removals are not in ascending order of key",
            )?;
            if devices.contains_key(&key) {
                return Err(DecodeError::Invalid {
                    field: "device set",
                    reason: "a device is both listed and removed",
                }
                .into());
            }
            if !verify_raw(
                account,
                REMOVAL_LABEL,
                &Removal::signed_bytes(&key, at),
                &sig,
            ) {
                return Err(DeviceError::BadSignature { what: "removal" });
            }
            removed.insert(key, Removal { key, at, sig });
        }
        r.finish()?;
        Ok(Self {
            account: *account,
            devices,
            removed,
        })
    }
}

/// Checks a record just read against those before it: its time in range, its key after
/// theirs (`disorder` says what is wrong otherwise).
fn check_read<T>(
    before: &BTreeMap<[u8; 32], T>,
    key: &[u8; 32],
    at: u64,
    disorder: &'static str,
) -> Result<(), DeviceError> {
    if at == END_OF_TIME {
        return Err(DeviceError::BadTime(at));
    }
    if before.keys().next_back().is_some_and(|last| last >= key) {
        return Err(DecodeError::Invalid {
            field: "device set",
            reason: disorder,
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
