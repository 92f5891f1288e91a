use proptest::prelude::*;

use super::*;
use crate::identity::SECRET_LEN;

/// An identity from a fixed secret (the same in every run).
fn person(n: u8) -> Identity {
    let mut secret = vec![1u8];
    secret.extend_from_slice(&[n; 32]);
    secret.extend_from_slice(&[n.wrapping_add(100); 32]);
    assert_eq!(secret.len(), SECRET_LEN);
    Identity::from_secret_bytes(&secret).unwrap()
}

/// The session key of the account's `n`th device.
fn device_key(n: u8) -> [u8; 32] {
    [n; 32]
}

fn keys(set: &DeviceSet) -> Vec<[u8; 32]> {
    set.devices().map(|d| *d.key()).collect()
}

#[test]
fn a_new_account_lists_its_own_session_key() {
    let me = person(1);
    let set = DeviceSet::new(&me, "laptop", 1_000).unwrap();
    assert_eq!(keys(&set), vec![me.x25519_public()]);
    assert_eq!(set.device(&me.x25519_public()).unwrap().name(), "laptop");
    let bytes = set.encode();
    assert_eq!(bytes.len(), 3 + 32 + 8 + 1 + 6 + 64);
    assert_eq!(DeviceSet::decode(set.account(), &bytes).unwrap(), set);
}

#[test]
fn known_answer() {
    // A set of a fixed identity: two devices listed and one removed, at fixed times.
    // Ed25519 signatures are deterministic, so the encoding is too.
    let me = person(1);
    let mut set = DeviceSet::new(&me, "laptop", 1_000).unwrap();
    set.add(&me, device_key(7), "phone", 1_001).unwrap();
    set.add(&me, device_key(8), "old tablet", 1_002).unwrap();
    set.remove(&me, &device_key(8), 1_003).unwrap();
    let bytes = set.encode();
    // The layout, field by field: version, one count per part, keys in order.
    assert_eq!(bytes[0], DEVICE_SET_VERSION);
    assert_eq!(bytes[1], 2, "two devices listed");
    let first = &bytes[2..2 + 32];
    assert_eq!(first, &device_key(7), "keys ascend: [7; 32] first");
    assert_eq!(&bytes[34..42], &1_001u64.to_be_bytes());
    assert_eq!(&bytes[42..48], b"\x05phone");
    let removals = 2 + (32 + 8 + 1 + 5 + 64) + (32 + 8 + 1 + 6 + 64);
    assert_eq!(bytes[removals], 1, "one removal");
    assert_eq!(&bytes[removals + 1..removals + 33], &device_key(8));
    assert_eq!(bytes.len(), removals + 1 + 32 + 8 + 64);
    assert_eq!(
        blake3::hash(&bytes).to_hex().as_str(),
        "72819a78c66a86fea0d5aa14b683eb25781fd0486621d83a15432f20fb733f91",
        "the encoding of this set changed: a format change needs a new version"
    );
}

#[test]
fn editing_is_refused_where_it_must_be() {
    let me = person(1);
    let mut set = DeviceSet::new(&me, "laptop", 10).unwrap();
    let mine = me.x25519_public();
    assert_eq!(set.remove(&me, &mine, 11), Err(DeviceError::LastDevice));
    assert_eq!(
        set.remove(&me, &device_key(9), 11),
        Err(DeviceError::Unknown)
    );
    assert_eq!(
        set.add(&person(2), device_key(3), "x", 11),
        Err(DeviceError::OtherAccount)
    );
    assert!(matches!(
        set.add(&me, device_key(3), "bad\u{202e}name", 11),
        Err(DeviceError::Name(_))
    ));
    for n in 2..=MAX_DEVICES as u8 {
        set.add(&me, device_key(n), &format!("device {n}"), 12)
            .unwrap();
    }
    assert_eq!(
        set.add(&me, device_key(100), "one too many", 13),
        Err(DeviceError::TooMany(MAX_DEVICES))
    );
    set.remove(&me, &device_key(2), 14).unwrap();
    assert_eq!(
        set.add(&me, device_key(2), "back again", 15),
        Err(DeviceError::Removed),
        "a removed key stays out"
    );
    set.remove(&me, &device_key(2), 16).unwrap();
    assert_eq!(
        set.removals().count(),
        1,
        "removing twice keeps one removal"
    );
    // Renaming keeps the device and wins over the older name, whatever the clock says.
    set.add(&me, device_key(3), "kitchen", 5).unwrap();
    let renamed = set.device(&device_key(3)).unwrap();
    assert_eq!((renamed.name(), renamed.at()), ("kitchen", 13));
}

#[test]
fn a_removed_device_never_comes_back_from_an_old_copy() {
    let me = person(1);
    let mut laptop = DeviceSet::new(&me, "laptop", 10).unwrap();
    laptop.add(&me, device_key(5), "phone", 11).unwrap();
    let old = laptop.clone();
    laptop.remove(&me, &device_key(5), 12).unwrap();
    let merged = laptop.merge(&old).unwrap();
    assert!(merged.is_empty(), "{merged:?}");
    assert!(laptop.device(&device_key(5)).is_none());
    let mut stale = old.clone();
    let merged = stale.merge(&laptop).unwrap();
    assert_eq!(merged.removed, vec![device_key(5)]);
    assert_eq!(stale, laptop);
}

#[test]
fn a_merge_past_the_bounds_is_refused_and_changes_nothing() {
    let me = person(1);
    let mut a = DeviceSet::new(&me, "a", 1).unwrap();
    let mut b = a.clone();
    for n in 0..7 {
        a.add(&me, device_key(10 + n), "a's", 2).unwrap();
        b.add(&me, device_key(30 + n), "b's", 2).unwrap();
    }
    let mut c = a.clone();
    c.merge(&b).unwrap();
    assert_eq!(
        c.devices().count(),
        15,
        "two sides linking while apart both keep theirs"
    );
    let mut d = DeviceSet::new(&me, "a", 1).unwrap();
    for n in 0..7 {
        d.add(&me, device_key(50 + n), "d's", 2).unwrap();
    }
    let before = c.clone();
    let err = c.merge(&d).unwrap_err();
    assert!(
        matches!(err, DeviceError::Full { devices: 22, .. }),
        "{err}"
    );
    assert_eq!(c, before);
    assert_eq!(
        DeviceSet::new(&person(2), "x", 1).unwrap().merge(&a),
        Err(DeviceError::OtherAccount)
    );
}

#[test]
fn hostile_encodings_are_refused_with_what_is_wrong() {
    let me = person(1);
    let account = *me.public().ed25519();
    let mut set = DeviceSet::new(&me, "laptop", 10).unwrap();
    set.add(&me, device_key(200), "phone", 11).unwrap();
    set.add(&me, device_key(201), "tablet", 11).unwrap();
    set.remove(&me, &device_key(201), 12).unwrap();
    let good = set.encode();
    assert!(DeviceSet::decode(&account, &good).is_ok());

    // Another account's key: no signature verifies.
    assert_eq!(
        DeviceSet::decode(person(2).public().ed25519(), &good),
        Err(DeviceError::BadSignature { what: "entry" })
    );
    // A changed name, time or key breaks its entry's signature; a changed removal, its.
    for at in [3, 2 + 32 + 3, 2 + 32 + 8 + 2] {
        let mut bad = good.clone();
        bad[at] ^= 1;
        assert_eq!(
            DeviceSet::decode(&account, &bad),
            Err(DeviceError::BadSignature { what: "entry" }),
            "byte {at}"
        );
    }
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(
        DeviceSet::decode(&account, &bad),
        Err(DeviceError::BadSignature { what: "removal" })
    );
    // Truncated anywhere, or with bytes left over.
    for len in 0..good.len() {
        assert!(DeviceSet::decode(&account, &good[..len]).is_err(), "{len}");
    }
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(
        DeviceSet::decode(&account, &long),
        Err(DeviceError::Decode(DecodeError::TrailingBytes(1)))
    ));
    // A count past the bound is refused before anything is read.
    let huge = [DEVICE_SET_VERSION, 255];
    assert!(matches!(
        DeviceSet::decode(&account, &huge),
        Err(DeviceError::Full { devices: 255, .. })
    ));
    assert!(matches!(
        DeviceSet::decode(&account, &vec![0; MAX_DEVICE_SET_LEN + 1]),
        Err(DeviceError::Decode(DecodeError::TooLong { .. }))
    ));
    assert!(matches!(
        DeviceSet::decode(&account, &[2, 0, 0]),
        Err(DeviceError::Decode(DecodeError::UnsupportedVersion {
            version: 2,
            ..
        }))
    ));
}

#[test]
fn only_canonical_sets_decode() {
    let me = person(1);
    let account = *me.public().ed25519();
    let entry = |key: [u8; 32], name: &str| {
        let mut w = Writer::with_capacity(200);
        let sig = me.sign(DEVICE_LABEL, &Device::signed_bytes(&key, 1, name));
        w.raw(&key).u64(1).bytes8(name.as_bytes()).raw(&sig);
        w.finish()
    };
    let removal = |key: [u8; 32]| {
        let sig = me.sign(REMOVAL_LABEL, &Removal::signed_bytes(&key, 2));
        [&key[..], &2u64.to_be_bytes(), &sig].concat()
    };
    let set = |devices: &[Vec<u8>], removals: &[Vec<u8>]| {
        let mut out = vec![DEVICE_SET_VERSION, devices.len() as u8];
        devices.iter().for_each(|d| out.extend_from_slice(d));
        out.push(removals.len() as u8);
        removals.iter().for_each(|r| out.extend_from_slice(r));
        out
    };
    let (a, b) = (device_key(1), device_key(2));
    assert!(DeviceSet::decode(&account, &set(&[entry(a, "a"), entry(b, "b")], &[])).is_ok());
    let invalid = |bytes: Vec<u8>| match DeviceSet::decode(&account, &bytes) {
        Err(DeviceError::Decode(DecodeError::Invalid { reason, .. })) => reason,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        invalid(set(&[entry(b, "b"), entry(a, "a")], &[])),
        "devices are not in ascending order of key"
    );
    assert_eq!(
        invalid(set(&[entry(a, "a"), entry(a, "a")], &[])),
        "devices are not in ascending order of key"
    );
    assert_eq!(
        invalid(set(&[entry(a, "a")], &[removal(b), removal(a)])),
        "removals are not in ascending order of key"
    );
    assert_eq!(
        invalid(set(&[entry(a, "a")], &[removal(a)])),
        "a device is both listed and removed"
    );
    // A name with a line break or a direction override is refused even though signed.
    assert!(matches!(
        DeviceSet::decode(&account, &set(&[entry(a, "a\nb")], &[])),
        Err(DeviceError::Name(NameError::Control(0x0a)))
    ));
}

/// One edit on one device: link a new device, rename one, or take one out.
#[derive(Debug, Clone)]
enum Edit {
    Add(u8),
    Rename(u8, u8),
    Remove(u8),
    /// Take in everything another device holds.
    Sync(usize),
}

fn edits() -> impl Strategy<Value = Vec<(usize, Edit, u64)>> {
    let edit = prop_oneof![
        (0u8..12).prop_map(Edit::Add),
        (0u8..12, 0u8..4).prop_map(|(k, n)| Edit::Rename(k, n)),
        (0u8..12).prop_map(Edit::Remove),
        (0usize..3).prop_map(Edit::Sync),
    ];
    proptest::collection::vec((0usize..3, edit, 1u64..50), 0..60)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Three devices edit the set while apart (with clocks that collide or run back),
    /// now and then taking in another's copy; once each has taken in the others', in
    /// any order and more than once, all three list the same devices, and no device
    /// taken out anywhere is listed.
    #[test]
    fn concurrent_edits_converge(history in edits(), order in proptest::collection::vec(0usize..3, 0..12)) {
        let me = person(1);
        let first = DeviceSet::new(&me, "first", 0).unwrap();
        let mut copies = [first.clone(), first.clone(), first];
        let mut ever_removed = Vec::new();
        for (who, edit, now) in history {
            match edit {
                Edit::Add(k) => {
                    let _ = copies[who].add(&me, device_key(k), &format!("device {k}"), now);
                }
                Edit::Rename(k, n) => {
                    if copies[who].device(&device_key(k)).is_some() {
                        copies[who].add(&me, device_key(k), &format!("name {n}"), now).unwrap();
                    }
                }
                Edit::Remove(k) => {
                    if copies[who].remove(&me, &device_key(k), now).is_ok()
                        && copies[who].is_removed(&device_key(k))
                    {
                        ever_removed.push(device_key(k));
                    }
                }
                Edit::Sync(from) => {
                    let other = copies[from].clone();
                    let _ = copies[who].merge(&other);
                }
            }
        }
        // Gossip: some random exchanges, then each takes in every other's copy twice
        // over (the second round carries what the first brought).
        for pair in order.windows(2) {
            let other = copies[pair[1]].clone();
            copies[pair[0]].merge(&other).unwrap();
        }
        for _ in 0..2 {
            for i in 0..3 {
                for j in 0..3 {
                    let other = copies[j].clone();
                    copies[i].merge(&other).unwrap();
                }
            }
        }
        prop_assert_eq!(&copies[0], &copies[1]);
        prop_assert_eq!(&copies[1], &copies[2]);
        for key in &ever_removed {
            prop_assert!(copies[0].device(key).is_none());
            prop_assert!(copies[0].is_removed(key));
        }
        // Merging is idempotent, and what converged survives the wire.
        let mut again = copies[0].clone();
        prop_assert!(again.merge(&copies[1]).unwrap().is_empty());
        let decoded = DeviceSet::decode(copies[0].account(), &copies[0].encode()).unwrap();
        prop_assert_eq!(&decoded, &copies[0]);
    }

    /// Merging two copies gives the same set in either order.
    #[test]
    fn merging_commutes(history in edits()) {
        let me = person(1);
        let first = DeviceSet::new(&me, "first", 0).unwrap();
        let (mut a, mut b) = (first.clone(), first);
        for (who, edit, now) in history {
            let set = if who == 0 { &mut a } else { &mut b };
            match edit {
                Edit::Add(k) | Edit::Rename(k, _) => {
                    let _ = set.add(&me, device_key(k), &format!("n{now}"), now);
                }
                Edit::Remove(k) => {
                    let _ = set.remove(&me, &device_key(k), now);
                }
                Edit::Sync(_) => {}
            }
        }
        let mut ab = a.clone();
        let mut ba = b.clone();
        let left = ab.merge(&b);
        let right = ba.merge(&a);
        prop_assert_eq!(left.is_ok(), right.is_ok());
        if left.is_ok() {
            prop_assert_eq!(ab, ba);
        }
    }
}
