use proptest::prelude::*;

use super::*;

use crate::test_person as person;

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
        "014e77b98c55d9c9c4f1ff6adb6a4e7ba4b4e7e9a9f32161fc96610921929262",
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

/// A copy of the set with `n` devices linked and taken out again, keys from `from`
/// on: `n` records more, one device listed still.
fn churned(me: &Identity, base: &DeviceSet, from: u8, n: u8) -> DeviceSet {
    let mut set = base.clone();
    for k in from..from + n {
        set.add(me, device_key(k), "passing", 2).unwrap();
        set.remove(me, &device_key(k), 3).unwrap();
    }
    set
}

#[test]
fn a_device_adds_none_past_half_the_records() {
    let me = person(1);
    let set = DeviceSet::new(&me, "a", 1).unwrap();
    let mut set = churned(&me, &set, 10, (MAX_EDIT_RECORDS - 1) as u8);
    assert_eq!(set.records(), MAX_EDIT_RECORDS);
    assert_eq!(
        set.add(&me, device_key(200), "one more", 4),
        Err(DeviceError::Full {
            records: MAX_EDIT_RECORDS + 1,
            max: MAX_EDIT_RECORDS
        })
    );
    // Renaming adds no record.
    set.add(&me, me.x25519_public(), "renamed", 5).unwrap();
}

#[test]
fn removals_that_arrive_late_do_not_make_the_order_matter() {
    // Three copies link seven devices each while apart; one copy of the second then
    // takes its seven out again. Whichever order a holder meets them in, it ends with
    // the same devices (the only bound is on records, which merging can only raise).
    let me = person(1);
    let base = DeviceSet::new(&me, "a", 1).unwrap();
    let link = |from: u8| {
        let mut set = base.clone();
        for k in from..from + 7 {
            set.add(&me, device_key(k), "linked", 2).unwrap();
        }
        set
    };
    let (a, b, c) = (link(10), link(30), link(50));
    let mut b_later = b.clone();
    for k in 30..37 {
        b_later.remove(&me, &device_key(k), 3).unwrap();
    }
    let mut first = a.clone();
    for other in [&b, &c, &b_later] {
        first.merge(other).unwrap();
    }
    let mut second = a;
    for other in [&b_later, &c, &b] {
        second.merge(other).unwrap();
    }
    assert_eq!(first, second);
    assert_eq!(first.devices().count(), 15);
}

#[test]
fn a_merge_past_the_bound_is_refused_and_changes_nothing() {
    let me = person(1);
    let base = DeviceSet::new(&me, "a", 1).unwrap();
    let per_copy = (MAX_EDIT_RECORDS - 1) as u8;
    let a = churned(&me, &base, 10, per_copy);
    let b = churned(&me, &base, 10 + per_copy, per_copy);
    let c = churned(&me, &base, 10 + 2 * per_copy, 2);
    let mut ab = a.clone();
    ab.merge(&b).unwrap();
    assert_eq!(ab.records(), MAX_DEVICE_RECORDS - 1);
    let before = ab.clone();
    assert_eq!(
        ab.merge(&c),
        Err(DeviceError::Full {
            records: MAX_DEVICE_RECORDS + 1,
            max: MAX_DEVICE_RECORDS
        })
    );
    assert_eq!(ab, before);
    assert_eq!(
        DeviceSet::new(&person(2), "x", 1).unwrap().merge(&a),
        Err(DeviceError::OtherAccount)
    );
}

#[test]
fn two_devices_that_take_each_other_out_leave_none() {
    let me = person(1);
    let mut one = DeviceSet::new(&me, "one", 1).unwrap();
    one.add(&me, device_key(9), "two", 2).unwrap();
    let mut two = one.clone();
    one.remove(&me, &device_key(9), 3).unwrap();
    two.remove(&me, &me.x25519_public(), 3).unwrap();
    one.merge(&two).unwrap();
    two.merge(&one).unwrap();
    assert_eq!(one, two);
    assert_eq!(one.devices().count(), 0, "an account with no device left");
    assert_eq!(
        DeviceSet::decode(one.account(), &one.encode()).unwrap(),
        one
    );
}

#[test]
fn times_at_the_end_of_the_clock_are_refused() {
    let me = person(1);
    let mut set = DeviceSet::new(&me, "a", 1).unwrap();
    assert_eq!(
        set.add(&me, device_key(3), "b", u64::MAX),
        Err(DeviceError::BadTime(u64::MAX))
    );
    set.add(&me, device_key(3), "b", u64::MAX - 1).unwrap();
    assert_eq!(
        set.add(&me, device_key(3), "renamed", 5),
        Err(DeviceError::BadTime(u64::MAX - 1)),
        "a rename must come later, and nothing can"
    );
    assert_eq!(set.device(&device_key(3)).unwrap().name(), "b");
    assert_eq!(
        set.remove(&me, &device_key(3), u64::MAX),
        Err(DeviceError::BadTime(u64::MAX))
    );
    // Signed at the end of time by the identity key, it is still refused.
    let key = device_key(4);
    let sig = me.sign(DEVICE_LABEL, &Device::signed_bytes(&key, u64::MAX, "late"));
    let mut w = Writer::with_capacity(200);
    w.u8(DEVICE_SET_VERSION)
        .u8(1)
        .raw(&key)
        .u64(u64::MAX)
        .bytes8(b"late")
        .raw(&sig)
        .u8(0);
    assert_eq!(
        DeviceSet::decode(set.account(), &w.finish()),
        Err(DeviceError::BadTime(u64::MAX))
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
        Err(DeviceError::Full { records: 255, .. })
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

/// One edit on one device: link a new device, rename one, or take one out (the nth
/// listed).
#[derive(Debug, Clone)]
enum Edit {
    Add(u8),
    Rename(u8, u8),
    Remove(u8),
    /// Take in everything another device holds.
    Sync(usize),
}

fn edits() -> impl Strategy<Value = Vec<(usize, Edit, u64)>> {
    // Up to 200 keys, so that copies edited apart can sign more than a set may hold.
    let edit = prop_oneof![
        8 => (0u8..200).prop_map(Edit::Add),
        1 => (0u8..200, 0u8..4).prop_map(|(k, n)| Edit::Rename(k, n)),
        8 => (0u8..200).prop_map(Edit::Remove),
        1 => (0usize..3).prop_map(Edit::Sync),
    ];
    proptest::collection::vec((0usize..3, edit, 1u64..50), 0..600)
}

/// Three copies of one account's set after `history`, with the keys taken out
/// anywhere.
fn play(me: &Identity, history: Vec<(usize, Edit, u64)>) -> ([DeviceSet; 3], Vec<[u8; 32]>) {
    let first = DeviceSet::new(me, "first", 0).unwrap();
    let mut copies = [first.clone(), first.clone(), first];
    let mut ever_removed = Vec::new();
    for (who, edit, now) in history {
        match edit {
            Edit::Add(k) => {
                let _ = copies[who].add(me, device_key(k), &format!("device {k}"), now);
            }
            Edit::Rename(k, n) => {
                if copies[who].device(&device_key(k)).is_some() {
                    copies[who]
                        .add(me, device_key(k), &format!("name {n}"), now)
                        .unwrap();
                }
            }
            Edit::Remove(k) => {
                // One of those listed (by position), so that devices come and go.
                let listed: Vec<[u8; 32]> = copies[who].devices().map(|d| *d.key()).collect();
                let Some(&key) = listed.get(usize::from(k) % listed.len().max(1)) else {
                    continue;
                };
                if copies[who].remove(me, &key, now).is_ok() && copies[who].is_removed(&key) {
                    ever_removed.push(key);
                }
            }
            Edit::Sync(from) => {
                let other = copies[from].clone();
                let _ = copies[who].merge(&other);
            }
        }
    }
    (copies, ever_removed)
}

/// The keys signed in any of `sets`: how many records their union holds.
fn union_records(sets: &[&DeviceSet]) -> usize {
    let mut keys = std::collections::BTreeSet::new();
    for set in sets {
        keys.extend(set.devices().map(|d| *d.key()));
        keys.extend(set.removals().map(|r| *r.key()));
    }
    keys.len()
}

/// `a` merged with `b`, or `a` as it was if the merge was refused (checked to be for
/// the bound, and only past it).
fn merged(a: &DeviceSet, b: &DeviceSet) -> DeviceSet {
    let mut out = a.clone();
    match out.merge(b) {
        Ok(_) => {}
        Err(DeviceError::Full { records, max }) => {
            assert_eq!(max, MAX_DEVICE_RECORDS);
            assert!(records > MAX_DEVICE_RECORDS);
            assert_eq!(records, union_records(&[a, b]));
            assert_eq!(&out, a);
        }
        Err(e) => panic!("{e}"),
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Three devices edit the set while apart (with clocks that collide or run back),
    /// now and then taking in another's copy; once each has taken in the others', in
    /// any order and more than once, all three list the same devices, and no device
    /// taken out anywhere is listed. Past the bound, merges are refused for it alone.
    #[test]
    fn concurrent_edits_converge(history in edits(), order in proptest::collection::vec(0usize..3, 0..12)) {
        let me = person(1);
        let (mut copies, ever_removed) = play(&me, history);
        let fits = union_records(&[&copies[0], &copies[1], &copies[2]]) <= MAX_DEVICE_RECORDS;
        // Gossip: some random exchanges, then each takes in every other's copy twice
        // over (the second round carries what the first brought).
        for pair in order.windows(2) {
            copies[pair[0]] = merged(&copies[pair[0]], &copies[pair[1]]);
        }
        for _ in 0..2 {
            for i in 0..3 {
                for j in 0..3 {
                    copies[i] = merged(&copies[i], &copies[j]);
                }
            }
        }
        if fits {
            prop_assert_eq!(&copies[0], &copies[1]);
            prop_assert_eq!(&copies[1], &copies[2]);
            for key in &ever_removed {
                prop_assert!(copies[0].device(key).is_none());
                prop_assert!(copies[0].is_removed(key));
            }
        }
        // Merging is idempotent, and what converged survives the wire.
        let mut again = copies[0].clone();
        prop_assert!(again.merge(&copies[0].clone()).unwrap().is_empty());
        let decoded = DeviceSet::decode(copies[0].account(), &copies[0].encode()).unwrap();
        prop_assert_eq!(&decoded, &copies[0]);
    }

    /// Merging commutes and associates whenever the union fits.
    #[test]
    fn merging_commutes_and_associates(history in edits()) {
        let me = person(1);
        let ([a, b, c], _) = play(&me, history);
        if union_records(&[&a, &b]) <= MAX_DEVICE_RECORDS {
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
        }
        if union_records(&[&a, &b, &c]) <= MAX_DEVICE_RECORDS {
            let left = merged(&merged(&a, &b), &c);
            prop_assert_eq!(&left, &merged(&a, &merged(&b, &c)));
            prop_assert_eq!(&left, &merged(&merged(&c, &a), &b));
        }
    }
}
