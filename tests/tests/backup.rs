//! Backup and restore against the real binaries: a conversation, a backup, more
//! messages after it (the backup is old), the device lost; the backup restored into a
//! new home with its recovery key, the conversation going on both ways with every
//! message shown once; a wrong key and a damaged chunk named as such. Prints its figures.

use std::path::Path;
use std::time::Instant;

use kkachi_tests::procs::{RelayProc, User};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `user`'s first backup, to `file`, with the recovery key it makes: what it says
/// (`--json`), and the key.
fn first_backup(user: &User, file: &Path) -> (serde_json::Value, String) {
    let made = json(&user.ok(&[
        "backup",
        "create",
        "--to",
        file.to_str().unwrap(),
        "--new-key",
        "--json",
    ]));
    let key = made["recovery_key"]
        .as_str()
        .expect("the first backup shows its key")
        .to_string();
    (made, key)
}

/// Runs `kkachi ARGS` with `--home HOME` and the recovery key in the environment.
fn with_key(home: &Path, key: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(kkachi_tests::procs::bin("kkachi"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env("KKACHI_RECOVERY_KEY", key)
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

#[test]
fn a_lost_device_comes_back_from_its_backup_and_the_conversation_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&dir.path().join("relay"), &[]);
    let hana = User::new(dir.path(), "hana");
    let dae = User::new(dir.path(), "dae");
    for u in [&hana, &dae] {
        u.ok(&["relay", "add", &relay.addr]);
    }
    User::introduce(&hana, &dae);
    let mut said = Vec::new();
    for i in 0..3 {
        let (a, b) = (format!("hana before {i}"), format!("dae before {i}"));
        hana.send("dae", &a, 5.0).expect("sent");
        dae.ok(&["sync"]);
        dae.send("hana", &b, 5.0).expect("sent");
        hana.ok(&["sync"]);
        said.extend([a, b]);
    }
    // A group of theirs, with a message in it, before the backup.
    hana.ok(&["group", "create", "Kin"]);
    hana.ok(&["group", "add", "Kin", "dae"]);
    hana.ok(&["send", "Kin", "group before the backup"]);
    dae.ok(&["sync"]);
    // Her device's name, and the devices Dae's account lists, as she sees them.
    hana.ok(&["device", "rename", "hana's phone"]);
    hana.ok(&["sync"]);
    let devices = hana.ok(&["device", "list", "--json"]);
    let dae_devices = json(&hana.ok(&["contact", "devices", "dae", "--json"]));
    assert!(!dae_devices["devices"].is_null(), "{dae_devices}");
    // One device of Dae's, the one his card names, is sealed to.
    assert_eq!(
        dae_devices["sealed_to"],
        serde_json::json!([dae_devices["card_fingerprint"]]),
        "{dae_devices}"
    );
    let backup = dir.path().join("hana.backup");
    // Without a terminal, the first backup makes its key only when asked to.
    let refused = hana.run(&["backup", "create", "--to", backup.to_str().unwrap()]);
    assert!(!refused.status.success() && !backup.exists());
    let (made, key) = first_backup(&hana, &backup);
    assert_eq!(made["messages"], 6, "{made}");
    // A later backup goes to the same key and shows none.
    let again = json(&hana.ok(&[
        "backup",
        "create",
        "--to",
        backup.to_str().unwrap(),
        "--json",
    ]));
    assert!(again["recovery_key"].is_null(), "{again}");
    // After the backup: messages it does not hold.
    hana.send("dae", "hana after the backup", 5.0)
        .expect("sent");
    dae.ok(&["sync"]);
    said.push("hana after the backup".into());

    // Verified with the right key; the wrong key is named as such, at once.
    let verified = with_key(
        &hana.home,
        &key,
        &["backup", "verify", backup.to_str().unwrap()],
    );
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    let other_key = age_key();
    let started = Instant::now();
    let wrong = with_key(
        &hana.home,
        &other_key,
        &["backup", "verify", backup.to_str().unwrap()],
    );
    let wrong_ms = started.elapsed().as_millis();
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("does not open"), "{err}");

    // The device is lost: its home is gone. Restored into a new one.
    std::fs::remove_dir_all(&hana.home).unwrap();
    let started = Instant::now();
    let restored = with_key(
        &hana.home,
        &key,
        &["backup", "restore", backup.to_str().unwrap()],
    );
    let restore_ms = started.elapsed().as_millis();
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    assert_eq!(
        hana.history_texts("dae"),
        said[..6],
        "what the backup held is back"
    );
    // A new device of her account: her device's name, under a new session key; the
    // key the backup held is taken out.
    let (before, after) = (
        json(&devices),
        json(&hana.ok(&["device", "list", "--json"])),
    );
    let old_fingerprint = &before["devices"][0]["fingerprint"];
    let new_fingerprint = after["devices"][0]["fingerprint"].clone();
    assert_eq!(after["devices"][0]["name"], "hana's phone", "{after}");
    assert_ne!(
        &new_fingerprint, old_fingerprint,
        "a new session key: {after}"
    );
    assert_eq!(
        &after["removed"][0]["fingerprint"], old_fingerprint,
        "{after}"
    );
    assert_eq!(
        json(&hana.ok(&["contact", "devices", "dae", "--json"])),
        dae_devices,
        "Dae's devices as they were"
    );
    // Restoring over an identity is refused.
    let twice = with_key(
        &hana.home,
        &key,
        &["backup", "restore", backup.to_str().unwrap()],
    );
    assert!(!twice.status.success());

    // The conversation goes on, both ways, on new sessions.
    hana.ok(&["sync"]);
    dae.ok(&["sync"]);
    dae.send("hana", "dae after the restore", 5.0)
        .expect("sent");
    hana.send("dae", "hana after the restore", 5.0)
        .expect("sent");
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        hana.ok(&["sync"]);
        dae.ok(&["sync"]);
        let (h, d) = (hana.history_texts("dae"), dae.history_texts("hana"));
        if h.iter().any(|t| t == "dae after the restore")
            && d.iter().any(|t| t == "hana after the restore")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the conversation did not go on: hana {h:?}, dae {d:?}"
        );
    }
    let d = dae.history_texts("hana");
    for text in said.iter().chain(
        [
            "dae after the restore".to_string(),
            "hana after the restore".to_string(),
        ]
        .iter(),
    ) {
        assert_eq!(
            d.iter().filter(|t| *t == text).count(),
            1,
            "{text:?} in dae's history {d:?}"
        );
    }
    let h = hana.history_texts("dae");
    assert_eq!(
        h.iter().filter(|t| *t == "dae after the restore").count(),
        1,
        "{h:?}"
    );
    // Dae seals to the restored device's key, and keeps the lost one's taken out.
    let seen = json(&dae.ok(&["contact", "devices", "hana", "--json"]));
    assert_eq!(seen["card_fingerprint"], new_fingerprint, "{seen}");
    assert_eq!(
        &seen["removed"][0]["fingerprint"], old_fingerprint,
        "{seen}"
    );
    // The group came back too, with what was said in it, and goes on: its next message
    // reaches dae once.
    assert!(hana.ok(&["group", "list"]).contains("Kin"));
    assert!(
        hana.history_texts("Kin")
            .iter()
            .any(|t| t == "group before the backup"),
        "the group's messages are back"
    );
    hana.ok(&["send", "Kin", "group after the restore"]);
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        dae.ok(&["sync"]);
        let g = dae.history_texts("Kin");
        if g.iter().any(|t| t == "group after the restore") {
            assert_eq!(
                g.iter().filter(|t| *t == "group before the backup").count(),
                1,
                "{g:?}"
            );
            assert_eq!(
                g.iter().filter(|t| *t == "group after the restore").count(),
                1,
                "{g:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group did not go on after the restore: {g:?}"
        );
        hana.ok(&["sync"]);
    }
    println!(
        "backup: {} messages backed up, restored in {restore_ms} ms; a wrong recovery key refused in {wrong_ms} ms; \
         after the restore both sides got each other's next message once",
        made["messages"]
    );
}

#[test]
fn a_message_only_the_lost_device_held_goes_out_after_the_restore_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(&dir.path().join("relay"), &[]);
    let hana = User::new(dir.path(), "hana");
    let dae = User::new(dir.path(), "dae");
    for u in [&hana, &dae] {
        u.ok(&["relay", "add", &relay.addr]);
    }
    User::introduce(&hana, &dae);
    hana.send("dae", "hana first", 5.0).expect("sent");
    dae.ok(&["sync"]);
    // The relay is down: the message waits in the outbox, and only there.
    relay.stop();
    let queued = hana
        .send("dae", "hana while the relay was down", 1.0)
        .expect("queued");
    assert_eq!(queued["relayed"], 0, "{queued}");
    let backup = dir.path().join("hana.backup");
    let (_, key) = first_backup(&hana, &backup);
    std::fs::remove_dir_all(&hana.home).unwrap();
    // On the new device kkachi was opened first: an empty home (a database with no
    // identity, its key, a log). The restore takes it.
    drop(kkachi_client::store::LocalStore::open(&hana.home).unwrap());
    std::fs::write(hana.home.join("kkachi.log"), "started\n").unwrap();
    relay.restart();
    let restored = with_key(
        &hana.home,
        &key,
        &["backup", "restore", backup.to_str().unwrap(), "--json"],
    );
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let report = json(&String::from_utf8_lossy(&restored.stdout));
    // Both: the first one's receipt had not come back either. Dae has it already, and
    // must not show it twice.
    assert_eq!(report["resend"], 2, "{report}");
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        hana.ok(&["sync"]);
        dae.ok(&["sync"]);
        let d = dae.history_texts("hana");
        if d.iter().any(|t| t == "hana while the relay was down") {
            assert_eq!(
                d,
                ["hana first", "hana while the relay was down"],
                "each once"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the waiting message never went: {d:?}"
        );
    }
    // And its sender sees it delivered.
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        hana.ok(&["sync"]);
        let out = hana.ok(&["history", "dae", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let state = v
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["text"] == "hana while the relay was down")
            .map(|m| m["state"].clone());
        if state == Some(serde_json::json!("delivered")) || state == Some(serde_json::json!("read"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "never confirmed: {state:?}");
        dae.ok(&["sync"]);
    }
    println!(
        "backup: a message only in the lost device's outbox went out once after the restore, and was confirmed"
    );
}

/// A recovery key of some other backup.
fn age_key() -> String {
    kkachi_client::backup::new_recovery_key().0
}

#[test]
fn a_damaged_chunk_is_named_and_everything_before_it_is_restored() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (store, _, _) = kkachi_client::store::LocalStore::provision(&home, "Min", &[]).unwrap();
    // A contact with enough messages for several 64 KiB chunks.
    let other = kkachi_protocol::Identity::generate();
    let card = kkachi_protocol::Card::new(&other, "Other", vec![], 1).unwrap();
    let contact = store.add_card(&card).unwrap();
    let mut w = kkachi_client::store::WriteSet::default();
    for i in 0..2000u64 {
        let record = kkachi_client::store::MessageRecord {
            id: rand::random(),
            direction: kkachi_client::store::Direction::In,
            text: format!("message {i:05} {}", "x".repeat(200)),
            state: kkachi_client::store::MessageState::Received,
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
        kkachi_client::store::LocalStore::write_message(
            &mut w,
            &contact.peer,
            kkachi_client::store::message_key(&contact.peer, i),
            &record,
        );
    }
    store.apply(w).unwrap();
    let (secret, public) = kkachi_client::backup::new_recovery_key();
    let file = dir.path().join("backup");
    let (counts, bytes) = kkachi_client::backup::create(&store, &public, &file).unwrap();
    drop(store);
    assert_eq!(counts.messages, 2000);
    // Flip a byte in the middle of the file.
    let mut data = std::fs::read(&file).unwrap();
    let at = data.len() / 2;
    data[at] ^= 0x40;
    std::fs::write(&file, &data).unwrap();
    let key = kkachi_client::backup::parse_recovery_key(&secret).unwrap();
    let restored =
        kkachi_client::backup::restore(&dir.path().join("restored"), &file, &key).unwrap();
    let kkachi_client::backup::Ending::Damaged { chunk } = restored.ending else {
        panic!("{:?}", restored.ending);
    };
    let chunks = bytes.div_ceil(kkachi_client::backup::CHUNK);
    assert!(chunk > 0 && chunk < chunks, "chunk {chunk} of {chunks}");
    let store = open_when_free(&dir.path().join("restored"));
    let messages = store.messages(&contact.peer).unwrap();
    assert_eq!(messages.len() as u64, restored.counts.messages);
    assert!(
        messages.len() > 100 && messages.len() < 2000,
        "{}",
        messages.len()
    );
    // Everything before the damage, in order, none of it invented.
    for (i, m) in messages.iter().enumerate() {
        assert!(
            m.text.starts_with(&format!("message {i:05} ")),
            "{}",
            m.text
        );
    }
    println!(
        "backup: a byte flipped at {at} of {bytes}: chunk {chunk} of {chunks} named, the {} messages before it restored",
        messages.len()
    );
}

/// The store at `home`, once the process that wrote it last here (the restore) has let
/// go of it: sled releases its lock from a thread of its own, a moment after the drop.
fn open_when_free(home: &std::path::Path) -> kkachi_client::store::LocalStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match kkachi_client::store::LocalStore::open(home) {
            Err(kkachi_client::store::StoreError::Locked(_))
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other.expect("the restored store opens"),
        }
    }
}

#[test]
fn a_restore_lists_a_new_device_key_and_keeps_the_backups_when_the_account_can_list_no_more() {
    use kkachi_client::store::{LocalStore, WriteSet};
    use kkachi_protocol::device::{DeviceSet, MAX_EDIT_RECORDS};
    let dir = tempfile::tempdir().unwrap();
    let (secret, public) = kkachi_client::backup::new_recovery_key();
    let key = kkachi_client::backup::parse_recovery_key(&secret).unwrap();
    // Three accounts: one with room in its list of devices, one whose devices changed
    // key as often as the list allows, and one from before lists (none in its backup).
    let mut outcomes = Vec::new();
    for case in ["room", "full", "none"] {
        let home = dir.path().join(format!("home-{case}"));
        let (store, me, _) = LocalStore::provision(&home, "Min", &[]).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        // A contact's set, and the record that ours was sent to them.
        let other = kkachi_protocol::Identity::generate();
        let card = kkachi_protocol::Card::new(&other, "Other", vec![], 1).unwrap();
        let peer = store.add_card(&card).unwrap().peer;
        let theirs = DeviceSet::new(&other, "their phone", now).unwrap();
        let mut w = WriteSet::default();
        if case != "none" {
            LocalStore::write_own_devices(&mut w, &DeviceSet::new(&me, "tablet", now).unwrap());
        }
        LocalStore::write_contact_devices(&mut w, &peer, &theirs);
        LocalStore::write_devices_sent_to(&mut w, &peer, &[9; 32], true);
        store.apply(w).unwrap();
        assert_eq!(store.devices_sent_to(&peer, &[9; 32]).unwrap(), Some(true));
        if case == "full" {
            while store.rotate_session_key(now, &mut rand_core::OsRng).is_ok() {}
        }
        let me = store.identity().unwrap().unwrap();
        let backed_up = me.x25519_public();
        let file = dir.path().join(format!("backup-{case}"));
        kkachi_client::backup::create(&store, &public, &file).unwrap();
        drop(store);
        let target = dir.path().join(format!("restored-{case}"));
        let restored = kkachi_client::backup::restore(&target, &file, &key).unwrap();
        let store = open_when_free(&target);
        let me = store.identity().unwrap().unwrap();
        // Their set came back; the record of what we sent did not (the outbox that
        // carried it is not in a backup), so it goes again.
        assert_eq!(
            store
                .contact_devices(&peer, other.public().ed25519())
                .unwrap(),
            Some(theirs)
        );
        assert_eq!(store.devices_sent_to(&peer, &[9; 32]).unwrap(), None);
        let set = store.own_devices(&me).unwrap().unwrap();
        let listed: Vec<_> = set.devices().map(|d| d.name().to_owned()).collect();
        let name = if case == "none" {
            "first device"
        } else {
            "tablet"
        };
        assert_eq!(listed, [name], "one device, under its name");
        assert!(set.device(&me.x25519_public()).is_some());
        outcomes.push((restored.new_key, me.x25519_public() != backed_up));
        if restored.new_key {
            assert!(set.is_removed(&backed_up), "the backup's key taken out");
        } else {
            assert_eq!(set.records(), MAX_EDIT_RECORDS);
        }
    }
    // A new key where the list had room, or none was kept (the backup's key taken out
    // all the same); the backup's own where it had none (restored all the same).
    assert_eq!(outcomes, [(true, true), (false, false), (true, true)]);
}
