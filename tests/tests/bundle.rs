//! Bundles against the real binaries: with every relay down, what waits in Alice's
//! outbox goes on a drive; Bob reads it from the file at once, Carol (who knows neither)
//! carries hers on to Bob's relays once they are back; nothing shows twice, whichever
//! copy arrives first; a damaged or foreign file is refused with a clear error.

use kkachi_tests::procs::{RelayProc, User};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// How many of `user`'s messages with `contact` have exactly `text`.
fn count(user: &User, contact: &str, text: &str) -> usize {
    json(&user.ok(&["history", contact, "--json"]))
        .as_array()
        .expect("history --json is an array")
        .iter()
        .filter(|m| m["text"] == text)
        .count()
}

#[test]
fn a_bundle_carries_messages_once_and_a_damaged_or_foreign_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut relays: Vec<RelayProc> = (0..3)
        .map(|i| RelayProc::start(&dir.path().join(format!("r{i}")), &[]))
        .collect();
    let addrs: Vec<String> = relays.iter().map(|r| r.addr.clone()).collect();
    let alice = User::new(dir.path(), "alice");
    let bob = User::new(dir.path(), "bob");
    let carol = User::new(dir.path(), "carol");
    for user in [&alice, &bob, &carol] {
        let mut args = vec!["relay", "add"];
        args.extend(addrs.iter().map(String::as_str));
        user.ok(&args);
    }
    User::introduce(&alice, &bob);

    // Every relay down: Alice's message waits in her outbox.
    for r in &mut relays {
        r.stop();
    }
    let first = "the bridge is out, take the north road";
    let _ = alice.run(&["send", "bob", first, "--timeout", "1"]);
    let file = dir.path().join("drive/alice.kkb");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let file_s = file.to_str().unwrap();
    let exported = json(&alice.ok(&["bundle", "export", "--to", file_s, "--for", "bob", "--json"]));
    assert!(exported["envelopes"].as_u64().unwrap() >= 1, "{exported}");
    let bytes = std::fs::read(&file).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a bundle holds write keys: its owner's only");
    }
    // Nothing readable: neither the text nor a name.
    for secret in [first.as_bytes(), b"alice", b"bob"] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret),
            "the bundle shows {:?}",
            String::from_utf8_lossy(secret)
        );
    }

    // Bob reads it from the file, with no relay up; a second time changes nothing.
    let imported = json(&bob.ok(&["bundle", "import", file_s, "--json"]));
    assert_eq!(imported["shown"], 1, "{imported}");
    assert_eq!(count(&bob, "alice", first), 1);
    let again = json(&bob.ok(&["bundle", "import", file_s, "--json"]));
    assert_eq!(again["shown"], 0, "{again}");
    assert_eq!(again["forwarding"], 0, "{again}");
    assert_eq!(count(&bob, "alice", first), 1);
    println!("bob took in {imported}; again: {again}");

    // A damaged copy and a file that is no bundle are refused, and say so.
    let mut damaged = bytes.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x40;
    let damaged_path = dir.path().join("drive/damaged.kkb");
    std::fs::write(&damaged_path, &damaged).unwrap();
    let out = bob.run(&["bundle", "import", damaged_path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("damaged") && err.contains("copy it again"),
        "{err}"
    );
    let foreign = dir.path().join("drive/notes.txt");
    std::fs::write(&foreign, "shopping: rice, water, batteries").unwrap();
    let out = bob.run(&["bundle", "import", foreign.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a kkachi bundle"), "{err}");
    let out = bob.run(&["bundle", "import", "/nonexistent/bundle.kkb"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));

    // A second message goes with Carol, who is nobody's contact: she cannot read it,
    // and carries it while the relays are down.
    let second = "water at the school gym from 6";
    let _ = alice.run(&["send", "bob", second, "--timeout", "1"]);
    let file2 = dir.path().join("drive/second.kkb");
    let file2_s = file2.to_str().unwrap();
    alice.ok(&["bundle", "export", "--to", file2_s, "--for", "bob"]);
    let carried = json(&carol.ok(&["bundle", "import", file2_s, "--json"]));
    assert_eq!(carried["for_you"], 0, "{carried}");
    assert!(carried["forwarding"].as_u64().unwrap() >= 1, "{carried}");
    assert!(carried["carrying"].as_u64().unwrap() >= 1, "{carried}");
    println!("carol carries {carried}");

    // The relays come back. Carol's sync puts what she carries into Bob's relays.
    for r in &mut relays {
        r.restart();
    }
    carol.ok(&["sync", "--timeout", "10"]);
    let drill = carol.run(&["drill", "--json"]);
    let drill = json(&String::from_utf8_lossy(&drill.stdout));
    assert_eq!(
        drill["outbox"]["waiting"], 0,
        "carol delivered all she carried: {drill}"
    );
    bob.ok(&["sync", "--timeout", "10"]);
    assert_eq!(count(&bob, "alice", second), 1);
    // Alice's own copies go too now, and Bob's receipts come back: still once each.
    alice.ok(&["sync", "--timeout", "10"]);
    bob.ok(&["sync", "--timeout", "10"]);
    alice.ok(&["sync", "--timeout", "10"]);
    assert_eq!(count(&bob, "alice", first), 1);
    assert_eq!(count(&bob, "alice", second), 1);
    let states: Vec<String> = json(&alice.ok(&["history", "bob", "--json"]))
        .as_array()
        .expect("history --json is an array")
        .iter()
        .map(|m| m["state"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        states.iter().all(|s| s == "delivered" || s == "read"),
        "alice hears both were delivered: {states:?}"
    );
}
