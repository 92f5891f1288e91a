use super::*;
use crate::test_rng;

use crate::test_person as person;

fn at(ms: u64) -> Hlc {
    Hlc { ms, count: 0 }
}

const GROUP: GroupId = GroupId([9; 32]);
/// An epoch id for posts whose epoch no test opens.
const E: EpochId = EpochId([3; 32]);

fn relay(n: u8) -> PeerId {
    person(200 + n).peer_id()
}

#[test]
fn every_member_and_no_one_else_unwraps_the_epoch_key() {
    let admin = person(1);
    let members: Vec<Identity> = (2..6).map(person).collect();
    let outsider = person(7);
    let key = EpochKey::generate(&mut test_rng(1));
    let mut keys: Vec<[u8; 32]> = members.iter().map(|m| m.x25519_public()).collect();
    keys.push(admin.x25519_public());
    let records = KeyRecord::make(&admin, GROUP, 1, at(10), &key, &keys).unwrap();
    assert_eq!(records.len(), 1);
    let record = KeyRecord::decode(records[0].encode()).unwrap();
    assert_eq!(record, records[0]);
    assert_eq!(record.epoch(), key.id(&GROUP));
    assert_eq!(record.part(), (0, 1));
    for m in members.iter().chain([&admin]) {
        assert_eq!(record.unwrap(m), Some(key.clone()));
        assert!(record.names(&m.x25519_public()));
    }
    assert_eq!(record.unwrap(&outsider), None);
    assert!(!record.names(&outsider.x25519_public()));
    // A member's new session key reads nothing wrapped for the old one.
    let rotated = members[0].with_new_session_key(&mut test_rng(2));
    assert_eq!(record.unwrap(&rotated), None);
}

#[test]
fn an_altered_key_record_is_refused() {
    let admin = person(1);
    let key = EpochKey::generate(&mut test_rng(1));
    let record = KeyRecord::make(&admin, GROUP, 1, at(10), &key, &[person(2).x25519_public()])
        .unwrap()
        .remove(0);
    let bytes = record.encode().to_vec();
    for i in [
        0,
        40,
        KEY_HEADER_LEN + 3,
        KEY_HEADER_LEN + 20,
        bytes.len() - 1,
    ] {
        let mut bad = bytes.clone();
        bad[i] ^= 1;
        assert!(KeyRecord::decode(&bad).is_err(), "byte {i} altered");
    }
    let mut long = bytes.clone();
    long.push(0);
    assert!(KeyRecord::decode(&long).is_err(), "trailing byte");
    assert!(KeyRecord::decode(&bytes[..bytes.len() - 1]).is_err());
}

#[test]
fn a_wrap_of_another_key_than_the_epoch_names_is_no_key() {
    // An admin signing a record whose wrap holds a key that is not the epoch's cannot
    // give one member a different key under the same epoch.
    let admin = person(1);
    let member = person(2);
    let named = EpochKey::generate(&mut test_rng(1));
    let other = EpochKey::generate(&mut test_rng(2));
    let epoch = named.id(&GROUP);
    let mx = member.x25519_public();
    let dh = diffie_hellman(&admin, &mx).unwrap();
    let k = wrap_key(&dh, &GROUP, &epoch, &admin.x25519_public(), &mx);
    let sealed = ChaCha20Poly1305::new(Key::from_slice(k.as_slice()))
        .encrypt(
            Nonce::from_slice(&[0; 12]),
            Payload {
                msg: other.0.as_slice(),
                aad: &wrap_ad(&GROUP, &epoch),
            },
        )
        .unwrap();
    let mut w = Writer::with_capacity(512);
    w.u8(LARGE_VERSION).raw(&GROUP.0);
    admin.public().write(&mut w);
    w.u64(1).u64(10).u32(0).raw(&epoch.0).u8(0).u8(1).u16(1);
    w.raw(&mx[..8]).raw(&sealed);
    let mut bytes = w.finish();
    let sig = admin.sign(KEY_RECORD_LABEL, &bytes);
    bytes.extend_from_slice(&sig);
    let record = KeyRecord::decode(&bytes).expect("well formed and signed");
    assert_eq!(record.unwrap(&member), None);
}

#[test]
fn a_thousand_and_more_member_keys_spread_over_parts() {
    let admin = person(1);
    let key = EpochKey::generate(&mut test_rng(1));
    let keys: Vec<[u8; 32]> = (0..2500u32)
        .map(|i| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            k[31] = 0x40;
            k
        })
        .collect();
    let records = KeyRecord::make(&admin, GROUP, 3, at(10), &key, &keys).unwrap();
    assert_eq!(records.len(), 3);
    let mut wraps = 0;
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.part(), (i as u8, 3));
        assert!(r.encode().len() <= MAX_KEY_RECORD_LEN);
        // A record and its post fit in one item.
        let post = Post::sign(
            &admin,
            GROUP,
            key.id(&GROUP),
            0,
            MessageId([0; 16]),
            at(10),
            PostBody::Key(Box::new(r.clone())),
        )
        .unwrap();
        let item = post.seal(&key, &mut test_rng(3));
        assert_eq!(item.len(), if i < 2 { 65_536 } else { 32_768 });
        assert_eq!(open_item(&GROUP, &key, &item, |_| true).unwrap(), post);
        wraps += r.tags().count();
    }
    assert_eq!(wraps, 2500);
    let too_many: Vec<[u8; 32]> = (0..(MAX_WRAPS * MAX_KEY_PARTS + 1) as u32)
        .map(|i| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            k
        })
        .collect();
    assert!(KeyRecord::make(&admin, GROUP, 3, at(10), &key, &too_many).is_err());
}

fn every_body(admin: &Identity) -> Vec<(u64, PostBody)> {
    let op = super::super::SignedOp::create(
        admin,
        "Ann",
        [1; 16],
        "Town",
        super::super::Mode::Chat,
        at(1),
    );
    let group = op.group();
    let key = EpochKey::generate(&mut test_rng(5));
    let record = KeyRecord::make(admin, group, 1, at(2), &key, &[admin.x25519_public()])
        .unwrap()
        .remove(0);
    vec![
        (
            1,
            PostBody::Message {
                seconds: 0,
                text: "evacuate to the school gym".into(),
            },
        ),
        (
            2,
            PostBody::File {
                seconds: 60,
                file: Box::new(FileRef {
                    key: crate::file::FileKey([3; 32]),
                    manifest: crate::file::ChunkId([4; 32]),
                    size: 5,
                    name: "map.png".into(),
                    mime: "image/png".into(),
                    thumbnail: Vec::new(),
                }),
            },
        ),
        (0, PostBody::Ops(vec![op])),
        (0, PostBody::Key(Box::new(record))),
        (
            0,
            PostBody::Have(Have {
                heads: vec![
                    ([1; 32], [1; 8], 4, 3),
                    ([1; 32], [2; 8], 2, 2),
                    ([2; 32], [1; 8], 9, 0),
                ],
                ops: [6; 16],
            }),
        ),
    ]
}

#[test]
fn posts_of_every_kind_round_trip_through_an_item() {
    let admin = person(1);
    let bodies = every_body(&admin);
    let group = match &bodies[2].1 {
        PostBody::Ops(ops) => ops[0].group(),
        _ => unreachable!(),
    };
    let key = EpochKey::generate(&mut test_rng(8));
    let mut rng = test_rng(9);
    for (seq, body) in bodies {
        let prev = if seq > 1 {
            MessageId([7; 16])
        } else {
            MessageId([0; 16])
        };
        let post = Post::sign(
            &admin,
            group,
            key.id(&group),
            seq,
            prev,
            at(20),
            body.clone(),
        )
        .unwrap();
        assert_eq!(post.body(), &body);
        assert_eq!(Post::decode(post.encode()).unwrap(), post);
        let item = post.seal(&key, &mut rng);
        assert!(SIZE_CLASSES.contains(&item.len()));
        assert_eq!(item.len(), item.len());
        let opened = open_item(&group, &key, &item, |_| true).unwrap();
        assert_eq!(opened, post);
        assert_eq!(opened.id(), post.id());
        // Sealed again (another nonce), it is the same post with the same id.
        let again = open_item(&group, &key, &post.seal(&key, &mut rng), |_| true).unwrap();
        assert_eq!(again.id(), post.id());
    }
}

#[test]
fn items_that_are_not_the_epochs_do_not_open() {
    let admin = person(1);
    let key = EpochKey::generate(&mut test_rng(1));
    let other = EpochKey::generate(&mut test_rng(2));
    let post = Post::sign(
        &admin,
        GROUP,
        key.id(&GROUP),
        1,
        MessageId([0; 16]),
        at(5),
        PostBody::Message {
            seconds: 0,
            text: "hi".into(),
        },
    )
    .unwrap();
    let item = post.seal(&key, &mut test_rng(3));
    assert_eq!(item.len(), SIZE_CLASSES[0]);
    assert!(matches!(
        open_item(&GROUP, &other, &item, |_| true),
        Err(ItemError::Unreadable)
    ));
    assert!(matches!(
        open_item(&GroupId([8; 32]), &key, &item, |_| true),
        Err(ItemError::Unreadable)
    ));
    for i in [0, 5, 30, 100, item.len() - 1] {
        let mut bad = item.clone();
        bad[i] ^= 1;
        assert!(
            open_item(&GROUP, &key, &bad, |_| true).is_err(),
            "byte {i} altered"
        );
    }
    assert!(open_item(&GROUP, &key, &item[..item.len() - 1], |_| true).is_err());
    // Padding that is not zeros, sealed properly, is refused.
    let epoch = key.id(&GROUP);
    let mut plain = (post.encode().len() as u32).to_be_bytes().to_vec();
    plain.extend_from_slice(post.encode());
    plain.resize(SIZE_CLASSES[0] - ITEM_HEADER_LEN - AEAD_TAG_LEN, 0);
    *plain.last_mut().unwrap() = 1;
    let ad = item_ad(&epoch);
    let sealed = XChaCha20Poly1305::new(Key::from_slice(key.item_key().as_slice()))
        .encrypt(
            XNonce::from_slice(&[0; 24]),
            Payload {
                msg: &plain,
                aad: &ad,
            },
        )
        .unwrap();
    let mut crafted = vec![LARGE_VERSION];
    crafted.extend_from_slice(&[0; 24]);
    crafted.extend_from_slice(&sealed);
    assert!(matches!(
        open_item(&GROUP, &key, &crafted, |_| true),
        Err(ItemError::Post(_))
    ));
}

#[test]
fn numbers_are_for_messages_and_files_only() {
    let admin = person(1);
    let text = || PostBody::Message {
        seconds: 0,
        text: "x".into(),
    };
    let zero = MessageId([0; 16]);
    assert!(Post::sign(&admin, GROUP, E, 0, zero, at(1), text()).is_err());
    assert!(Post::sign(&admin, GROUP, E, 1, MessageId([1; 16]), at(1), text()).is_err());
    assert!(Post::sign(&admin, GROUP, E, 2, MessageId([1; 16]), at(1), text()).is_ok());
    let have = PostBody::Have(Have::default());
    assert!(Post::sign(&admin, GROUP, E, 1, zero, at(1), have.clone()).is_err());
    assert!(Post::sign(&admin, GROUP, E, 0, zero, at(1), have).is_ok());
    let empty = PostBody::Message {
        seconds: 0,
        text: String::new(),
    };
    assert!(Post::sign(&admin, GROUP, E, 1, zero, at(1), empty).is_err());
    let unsorted = PostBody::Have(Have {
        heads: vec![([2; 32], [0; 8], 1, 0), ([1; 32], [0; 8], 1, 0)],
        ops: [0; 16],
    });
    assert!(Post::sign(&admin, GROUP, E, 0, zero, at(1), unsorted).is_err());
    // One author's devices ascend too, each named once.
    let twice = PostBody::Have(Have {
        heads: vec![([1; 32], [3; 8], 1, 0), ([1; 32], [3; 8], 2, 0)],
        ops: [0; 16],
    });
    assert!(Post::sign(&admin, GROUP, E, 0, zero, at(1), twice).is_err());
}

#[test]
fn a_key_record_posted_by_someone_else_is_refused() {
    let admin = person(1);
    let other = person(2);
    let key = EpochKey::generate(&mut test_rng(1));
    let record = KeyRecord::make(&admin, GROUP, 1, at(1), &key, &[admin.x25519_public()])
        .unwrap()
        .remove(0);
    let zero = MessageId([0; 16]);
    let body = PostBody::Key(Box::new(record));
    assert!(Post::sign(&other, GROUP, E, 0, zero, at(1), body.clone()).is_err());
    assert!(Post::sign(&admin, GroupId([1; 32]), E, 0, zero, at(1), body.clone()).is_err());
    assert!(Post::sign(&admin, GROUP, E, 0, zero, at(1), body).is_ok());
}

#[test]
fn known_answers() {
    // The epoch id, computed apart from this crate (Python's hashlib.blake2s over the
    // length-delimited label and parts of SPEC's H).
    let key = EpochKey::from_bytes([0x11; 32]);
    assert_eq!(
        hex::encode(key.id(&GROUP).0),
        "bf3c3ecdbc3d487eb8c721b6d0b421c73d3a3e41f0c1cfb26c3669e2dc566e68"
    );
    // The queue keys differ per relay, and name queues apart from granted ones.
    let (r1, r2) = (relay(1), relay(2));
    assert_ne!(key.queue_key(&r1).0, key.queue_key(&r2).0);
    assert_eq!(
        key.queue_key(&r1).0,
        hash("kkachi/group-queue-key/v1", &[&[0x11; 32], &r1.to_bytes()])
    );
    assert_eq!(
        hex::encode(crate::queue::GroupKey([0x55; 32]).queue().0),
        "dcb9736b547c95a2306f2155c011c1098e48037225276bfc286406b73c879072"
    );
    // The post layout, field by field.
    let admin = person(1);
    let post = Post::sign(
        &admin,
        GROUP,
        key.id(&GROUP),
        1,
        MessageId([0; 16]),
        Hlc {
            ms: 1_000,
            count: 2,
        },
        PostBody::Message {
            seconds: 7,
            text: "hi".into(),
        },
    )
    .unwrap();
    let mut expected = vec![2u8];
    expected.extend_from_slice(&[9; 32]);
    expected.extend_from_slice(&key.id(&GROUP).0);
    expected.extend_from_slice(admin.public().ed25519());
    // The device that posted it: its X25519 key's first 8 bytes.
    expected.extend_from_slice(&admin.x25519_public()[..8]);
    expected.extend_from_slice(&1u64.to_be_bytes());
    expected.extend_from_slice(&[0; 16]);
    expected.extend_from_slice(&1_000u64.to_be_bytes());
    expected.extend_from_slice(&2u32.to_be_bytes());
    expected.push(1);
    expected.extend_from_slice(&6u32.to_be_bytes());
    expected.extend_from_slice(&7u32.to_be_bytes());
    expected.extend_from_slice(b"hi");
    let bytes = post.encode();
    assert_eq!(&bytes[..bytes.len() - 64], &expected[..]);
    assert!(admin.public().verify(
        POST_LABEL,
        &expected,
        &bytes[bytes.len() - 64..].try_into().unwrap()
    ));
    assert_eq!(post.id().0[..], hash(POST_LABEL, &[bytes])[..16]);
}

#[test]
fn low_order_keys_get_no_wrap_and_strangers_cost_one_signature() {
    let admin = person(1);
    let key = EpochKey::generate(&mut test_rng(1));
    // A member binding a key of low order would have a wrap anyone could open.
    let members = [person(2).x25519_public(), [0; 32]];
    assert!(matches!(
        KeyRecord::make(&admin, GROUP, 1, at(1), &key, &members),
        Err(GroupError::Key(_))
    ));
    // A post whose author the reader does not take is refused before its body.
    let post = Post::sign(
        &admin,
        GROUP,
        key.id(&GROUP),
        1,
        MessageId([0; 16]),
        at(2),
        PostBody::Message {
            seconds: 0,
            text: "hi".into(),
        },
    )
    .unwrap();
    let item = post.seal(&key, &mut test_rng(4));
    assert!(matches!(
        open_item(&GROUP, &key, &item, |_| false),
        Err(ItemError::Post(GroupError::NotMember))
    ));
    // An item padded past the smallest size class that holds it is refused (it would
    // cost every reader more than it needs).
    let epoch = key.id(&GROUP);
    let mut plain = (post.encode().len() as u32).to_be_bytes().to_vec();
    plain.extend_from_slice(post.encode());
    plain.resize(SIZE_CLASSES[1] - ITEM_HEADER_LEN - AEAD_TAG_LEN, 0);
    let sealed = XChaCha20Poly1305::new(Key::from_slice(key.item_key().as_slice()))
        .encrypt(
            XNonce::from_slice(&[1; 24]),
            Payload {
                msg: &plain,
                aad: &item_ad(&epoch),
            },
        )
        .unwrap();
    let mut padded = vec![LARGE_VERSION];
    padded.extend_from_slice(&[1; 24]);
    padded.extend_from_slice(&sealed);
    assert_eq!(padded.len(), SIZE_CLASSES[1]);
    assert!(open_item(&GROUP, &key, &padded, |_| true).is_err());
    // A post written for another epoch, sealed under this one, is refused.
    let elsewhere = Post::sign(
        &admin,
        GROUP,
        E,
        1,
        MessageId([0; 16]),
        at(2),
        PostBody::Message {
            seconds: 0,
            text: "hi".into(),
        },
    )
    .unwrap();
    let mut plain = (elsewhere.encode().len() as u32).to_be_bytes().to_vec();
    plain.extend_from_slice(elsewhere.encode());
    plain.resize(SIZE_CLASSES[0] - ITEM_HEADER_LEN - AEAD_TAG_LEN, 0);
    let sealed = XChaCha20Poly1305::new(Key::from_slice(key.item_key().as_slice()))
        .encrypt(
            XNonce::from_slice(&[2; 24]),
            Payload {
                msg: &plain,
                aad: &item_ad(&epoch),
            },
        )
        .unwrap();
    let mut moved = vec![LARGE_VERSION];
    moved.extend_from_slice(&[2; 24]);
    moved.extend_from_slice(&sealed);
    assert!(matches!(
        open_item(&GROUP, &key, &moved, |_| true),
        Err(ItemError::Post(GroupError::WrongGroup))
    ));
}
