//! Encryption at rest: what the files of a home show, and how its key is kept.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kkachi_protocol::{Card, Identity, MessageId, Multiaddr};

use super::*;

const PHRASE: &str = "the spare key is under the blue flowerpot";

/// Every file under `dir`, recursively, with every directory.
fn walk(dir: &Path, files: &mut Vec<PathBuf>, dirs: &mut Vec<PathBuf>) {
    dirs.push(dir.to_path_buf());
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, files, dirs);
        } else {
            files.push(path);
        }
    }
}

fn found_in(home: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    walk(home, &mut files, &mut dirs);
    files
        .into_iter()
        .filter(|f| {
            std::fs::read(f)
                .unwrap_or_default()
                .windows(needle.len())
                .any(|w| w == needle)
        })
        .collect()
}

/// A home with a contact, a conversation holding [`PHRASE`] and a relay; returns
/// what must not be readable in its files: first what a home in the clear shows, then
/// forms it would not show either (a peer id as text).
fn converse(store: &LocalStore) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let relay: Multiaddr =
        "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
            .parse()
            .unwrap();
    store.add_relay(&relay).unwrap();
    let minji = Identity::generate();
    let card = Card::new(&minji, "Minji Kwon", vec![relay.clone()], 1).unwrap();
    let contact = store.add_card(&card).unwrap();
    let peer = contact.peer;
    let mut w = WriteSet::default();
    let ids: Vec<[u8; 16]> = (0..50).map(|_| rand::random()).collect();
    for i in 0..50u64 {
        let record = MessageRecord {
            id: ids[i as usize],
            direction: if i % 2 == 0 {
                Direction::In
            } else {
                Direction::Out
            },
            text: format!("{PHRASE} ({i})"),
            state: MessageState::Received,
            sent_at_ms: i,
            stored_at_ms: i,
            seq: i + 1,
            prev: [0; 32],
            timer_secs: 0,
            edited: false,
            deleted: false,
            revised_seq: 0,
            reply_to: None,
            reactions: Default::default(),
            file: None,
        };
        LocalStore::write_message(&mut w, &peer, message_key(&peer, i), &record);
        LocalStore::write_receipt_due(&mut w, &peer, &MessageId(record.id));
    }
    LocalStore::write_conversation(&mut w, &peer, &Conversation::default());
    // A group, with a message from Minji in it.
    let me = store.identity().unwrap().unwrap();
    let create = kkachi_protocol::group::SignedOp::create(
        &me,
        "Me",
        [3; 16],
        "Kwon family gathering",
        kkachi_protocol::group::Mode::Chat,
        kkachi_protocol::group::Hlc { ms: 1, count: 0 },
    );
    let group = create.group();
    let record = super::GroupRecord {
        ops: vec![create.encode().to_vec()],
        next_seq: 2,
        joined: true,
        ..Default::default()
    };
    LocalStore::write_group(&mut w, &group, &record);
    let said = super::GroupMessage {
        from: peer.to_bytes(),
        name: "Minji Kwon".into(),
        hlc: (2, 0),
        message: MessageRecord {
            id: ids[0],
            direction: Direction::In,
            text: format!("{PHRASE} (to the group)"),
            state: MessageState::Received,
            sent_at_ms: 2,
            stored_at_ms: 2,
            seq: 51,
            prev: [0; 32],
            timer_secs: 0,
            edited: false,
            deleted: false,
            revised_seq: 0,
            reply_to: None,
            reactions: Default::default(),
            file: None,
        },
        copies: Vec::new(),
        event: false,
        unseen: false,
        missed: Vec::new(),
        post_seq: 0,
        post_device: [0; 8],
        reach: (0, 0, 0),
    };
    LocalStore::write_group_message(&mut w, &group, 0, &said);
    LocalStore::write_group_copy(&mut w, &peer, &ids[1], &group, 0);
    // Her account's devices, and a record of what we sent her.
    let devices =
        kkachi_protocol::device::DeviceSet::new(&minji, "Minji's tablet", 1_700_000_000).unwrap();
    LocalStore::write_contact_devices(&mut w, &peer, &devices);
    LocalStore::write_devices_sent_to(&mut w, &peer, &[7; 32], true);
    store.apply(w).unwrap();
    store.db.flush().unwrap();
    (
        vec![
            PHRASE.as_bytes().to_vec(),
            b"Minji Kwon".to_vec(),
            b"Minji's tablet".to_vec(),
            minji.x25519_public().to_vec(),
            b"Kwon family gathering".to_vec(),
            group.0.to_vec(),
            peer.to_bytes(),
            relay.to_string().into_bytes(),
            // Message ids: their sender knows them.
            ids[0].to_vec(),
            ids[49].to_vec(),
        ],
        vec![peer.to_string().into_bytes()],
    )
}

#[test]
fn a_sealed_home_shows_no_message_name_peer_or_relay_and_is_owner_only() {
    let root = tempfile::tempdir().unwrap();
    // The same conversation kept in the clear: the search finds what is there.
    let clear = root.path().join("clear");
    let (store, _, _) = LocalStore::provision_clear(&clear, "Me", &[]).unwrap();
    let (secrets, _) = converse(&store);
    drop(store);
    for s in &secrets {
        assert!(
            !found_in(&clear, s).is_empty(),
            "the search finds {:?} in a home kept in the clear",
            String::from_utf8_lossy(s)
        );
    }

    let home = root.path().join("sealed");
    let (store, _, _) = LocalStore::provision(&home, "Me", &[]).unwrap();
    let (mut secrets, other_forms) = converse(&store);
    secrets.extend(other_forms);
    let me = store.identity().unwrap().unwrap();
    // Still read back whole.
    let peer = store.contacts().unwrap()[0].peer;
    let texts: Vec<String> = store
        .messages(&peer)
        .unwrap()
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(texts.len(), 50);
    assert!(texts.iter().all(|t| t.starts_with(PHRASE)));
    let (group, _) = store.groups().unwrap().remove(0);
    assert!(
        store.group_messages(&group).unwrap()[0]
            .message
            .text
            .starts_with(PHRASE)
    );
    assert_eq!(store.receipts_due().unwrap()[0].1.len(), 50);
    assert_eq!(store.relays().unwrap().len(), 1);
    drop(store);
    let mut bytes = 0;
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    walk(&home, &mut files, &mut dirs);
    for f in &files {
        bytes += std::fs::metadata(f).unwrap().len();
    }
    for s in secrets.iter().chain([me.to_secret_bytes().to_vec()].iter()) {
        assert_eq!(
            found_in(&home, s),
            Vec::<PathBuf>::new(),
            "{:?} is readable in a sealed home",
            String::from_utf8_lossy(s)
        );
    }
    for d in &dirs {
        let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", d.display());
    }
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is {mode:o}", f.display());
    }
    println!(
        "at rest: {} files, {} KiB searched for {} secrets: none found; directories 0700, files 0600",
        files.len(),
        bytes / 1024,
        secrets.len() + 1
    );
}

#[test]
fn a_wrong_missing_or_damaged_key_file_is_named_and_nothing_is_changed() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    drop(LocalStore::provision(&a, "A", &[]).unwrap());
    drop(LocalStore::provision(&b, "B", &[]).unwrap());
    let key_a = std::fs::read(key_path(&a)).unwrap();
    let key_b = std::fs::read(key_path(&b)).unwrap();

    // B's key file beside A's database.
    std::fs::write(key_path(&a), &key_b).unwrap();
    let err = reopen_err(&a);
    assert!(matches!(err, StoreError::WrongKey(_)), "{err:?}");
    assert!(err.to_string().contains("does not belong"), "{err}");

    // A flipped byte.
    let mut damaged = key_a.clone();
    damaged[20] ^= 1;
    std::fs::write(key_path(&a), &damaged).unwrap();
    let err = reopen_err(&a);
    assert!(err.to_string().contains("is damaged"), "{err}");

    // None at all, beside a database that holds something.
    std::fs::remove_file(key_path(&a)).unwrap();
    let err = reopen_err(&a);
    assert!(err.to_string().contains("is missing"), "{err}");
    assert!(
        !key_path(&a).exists(),
        "no new key was made for an old database"
    );

    // The right one again: everything is there.
    std::fs::write(key_path(&a), &key_a).unwrap();
    let store = reopen(&a);
    assert_eq!(store.profile().unwrap().unwrap().name, "A");
}

fn reopen_err(home: &Path) -> StoreError {
    for _ in 0..500 {
        match LocalStore::open(home) {
            Err(StoreError::Locked(_)) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) => return e,
            Ok(_) => panic!("{} opened", home.display()),
        }
    }
    panic!("{} stayed locked", home.display())
}

#[test]
fn a_home_kept_in_the_clear_by_an_earlier_version_is_named_as_such() {
    let root = tempfile::tempdir().unwrap();
    let home = root.path().join("old");
    drop(LocalStore::provision_clear(&home, "Old", &[]).unwrap());
    // What an earlier version left: the same records, no check record, no key file.
    {
        // sled lets go of its lock from its own thread a moment after the drop.
        let mut tries = 0;
        let db = loop {
            match sled::open(home.join("db")) {
                Ok(db) => break db,
                Err(e) if tries < 250 => {
                    let _ = e;
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("the store stayed locked: {e}"),
            }
        };
        db.open_tree("meta").unwrap().remove(VAULT_KEY).unwrap();
        db.flush().unwrap();
    }
    std::fs::remove_file(key_path(&home)).unwrap();
    let err = reopen_err(&home);
    assert!(
        err.to_string().contains("earlier development version"),
        "{err}"
    );
    assert!(!key_path(&home).exists());
}

#[test]
fn a_passphrase_rewraps_the_key_only_and_a_wrong_one_is_told_apart_from_damage() {
    let root = tempfile::tempdir().unwrap();
    let home = root.path().join("home");
    let (store, _, _) = LocalStore::provision(&home, "Me", &[]).unwrap();
    let key = std::fs::read(key_path(&home)).unwrap();
    let raw: Vec<u8> = key[12..44].to_vec();
    let on_disk = |store: &LocalStore| {
        let key = store.vault.disk_key(TreeId::Meta, IDENTITY_KEY);
        store.trees[TreeId::Meta as usize]
            .get(key)
            .unwrap()
            .unwrap()
    };
    let identity_before = on_disk(&store);
    store
        .set_passphrase(None, Some("correct horse battery"))
        .unwrap();
    assert_eq!(store.protection(), Protection::Passphrase);
    drop(store);
    let wrapped = std::fs::read(key_path(&home)).unwrap();
    assert!(
        !wrapped.windows(32).any(|w| w == raw.as_slice()),
        "the key is not in the file as it is"
    );
    let mode = std::fs::metadata(key_path(&home))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    // Without one: nobody to ask in a test.
    let err = reopen_err(&home);
    assert!(matches!(err, StoreError::PassphraseNeeded(_)), "{err:?}");
    // A wrong one, told within a second, as wrong (not as damage).
    let started = Instant::now();
    let err = loop {
        match LocalStore::open_with_passphrase(&home, "correct horse battery staple") {
            Err(StoreError::Locked(_)) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) => break e,
            Ok(_) => panic!("a wrong passphrase opened the store"),
        }
    };
    let took = started.elapsed();
    assert!(matches!(err, StoreError::WrongPassphrase(_)), "{err:?}");
    // A damaged file is told as damage, whatever the passphrase.
    let mut damaged = wrapped.clone();
    damaged[30] ^= 1;
    std::fs::write(key_path(&home), &damaged).unwrap();
    let err = LocalStore::open_with_passphrase(&home, "correct horse battery").unwrap_err();
    assert!(err.to_string().contains("is damaged"), "{err}");
    std::fs::write(key_path(&home), &wrapped).unwrap();

    let store = LocalStore::open_with_passphrase(&home, "correct horse battery").unwrap();
    assert_eq!(store.profile().unwrap().unwrap().name, "Me");
    assert!(
        on_disk(&store) == identity_before,
        "the database is not sealed again (a new seal has a new nonce)"
    );
    // Removed: the key file holds the same key again, and no passphrase is needed.
    // Only with the current passphrase, whoever asks.
    assert!(matches!(
        store.set_passphrase(None, None),
        Err(StoreError::PassphraseNeeded(_))
    ));
    assert!(matches!(
        store.set_passphrase(Some("correct horse"), None),
        Err(StoreError::WrongPassphrase(_))
    ));
    assert_eq!(store.protection(), Protection::Passphrase);
    store
        .set_passphrase(Some("correct horse battery"), None)
        .unwrap();
    drop(store);
    assert!(
        std::fs::read(key_path(&home)).unwrap()[12..44] == raw[..],
        "the same key, as it is"
    );
    assert_eq!(reopen(&home).protection(), Protection::KeyFile);
    println!("passphrase: a wrong one refused in {} ms", took.as_millis());
}

/// Known answers: the tags of keys on disk, and a key file, for a fixed key (SPEC §12).
#[test]
fn keys_on_disk_and_key_files_match_their_known_answers() {
    let vault = vault::Vault::sealed(&[7; 32]);
    // An Ed25519 peer id: identity multihash of a protobuf public key (38 bytes).
    let mut peer = vec![0x00, 0x24, 0x08, 0x01, 0x12, 0x20];
    peer.extend_from_slice(&[9; 32]);
    let mut message = peer.clone();
    message.extend_from_slice(&5u64.to_be_bytes());
    let mut index = peer.clone();
    index.extend_from_slice(&[3; 16]);
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let answers = [
        (TreeId::Messages, message.clone(), KAT_MESSAGE),
        (TreeId::MessageIndex, index, KAT_INDEX),
        (TreeId::Seen, vec![1; 32], KAT_SEEN),
        (TreeId::Meta, b"profile".to_vec(), "70726f66696c65"),
    ];
    for (tree, key, answer) in answers {
        assert_eq!(hex(&vault.disk_key(tree, &key)), answer, "{tree:?}");
    }
    // A contact's records keep their order on disk: the tail after the tag is as it was.
    assert!(hex(&vault.disk_key(TreeId::Messages, &message)).ends_with("0000000000000005"));
    // And a sealed value opens to the same logical key and value.
    let disk = vault.disk_key(TreeId::Messages, &message);
    let sealed = vault.seal(TreeId::Messages, &message, &disk, b"hello");
    assert_eq!(
        vault.open(TreeId::Messages, &disk, &sealed).unwrap(),
        (message.clone(), b"hello".to_vec())
    );
    // Under another tree, or another key, it does not.
    assert!(vault.open(TreeId::Chain, &disk, &sealed).is_err());
    let mut other = disk.clone();
    *other.last_mut().unwrap() ^= 1;
    assert!(vault.open(TreeId::Messages, &other, &sealed).is_err());

    let root = tempfile::tempdir().unwrap();
    keyfile::rewrap(root.path(), &[7; 32], None).unwrap();
    assert_eq!(
        hex(&std::fs::read(key_path(root.path())).unwrap()),
        KAT_KEY_FILE
    );
}

const KAT_MESSAGE: &str = "85794225771c6b32f5299baea38216a50000000000000005";
const KAT_INDEX: &str = "a9b1b556ce74865bb0199490359a23651babe6e914c449c9ab2a329d2def35e6";
const KAT_SEEN: &str = "e99162f1c5ab78e8cde54cb011ef7510";
const KAT_KEY_FILE: &str = "6b6b616368692d6b65790100070707070707070707070707070707070707070707070707070707070707070793ffc3eb3fe9141f1b859039007e612c10583fa270aca7f371f1b47cdcf62f32";

#[test]
fn search_finds_every_word_in_any_case_newest_first_in_sealed_messages() {
    let root = tempfile::tempdir().unwrap();
    let (store, _, _) = LocalStore::provision(&root.path().join("h"), "Me", &[]).unwrap();
    let _ = converse(&store);
    let peer = store.contacts().unwrap()[0].peer;
    let found = store.search("BLUE spare", None, 10).unwrap();
    assert_eq!(found.len(), 10, "50 hold both words; at most 10 come back");
    assert!(
        found
            .windows(2)
            .all(|w| w[0].1.sent_at_ms >= w[1].1.sent_at_ms)
    );
    assert_eq!(found[0].1.text, format!("{PHRASE} (49)"));
    assert!(found.iter().all(|(p, _)| *p == peer));
    assert_eq!(
        store
            .search("flowerpot (7)", Some(&peer), 10)
            .unwrap()
            .len(),
        1
    );
    assert!(store.search("red flowerpot", None, 10).unwrap().is_empty());
    assert!(store.search("   ", None, 10).unwrap().is_empty());
    let other = kkachi_protocol::Identity::generate().peer_id();
    assert!(store.search("blue", Some(&other), 10).unwrap().is_empty());
}
