//! Replies, reactions and a change of one's own name from the command line, against a
//! real relay: each reaches the other side as the command said, scripts see them in
//! `sync --json` and `history --json`, and what a command cannot do is said plainly.

use kkachi_tests::procs::{RelayProc, User};

/// The JSON objects a command printed, one per line.
fn objects(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter(|l| l.starts_with('{') || l.starts_with('['))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn replies_reactions_and_a_new_name_reach_the_contact() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&dir.path().join("r"), &[]);
    let (alice, bob) = User::alice_and_bob(dir.path(), &relay);
    let question = bob.send("alice", "lunch?", 5.0).unwrap();
    let question_id = question["id"].as_str().unwrap().to_string();
    alice.ok(&["sync"]);

    // Nothing of theirs to answer yet: `last` never means one's own.
    let none = bob.run(&["send", "alice", "--reply", "last", "hm"]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("has written nothing here yet"));
    // A reply to their last message.
    let sent = objects(&alice.ok(&["send", "bob", "--reply", "last", "김밥", "--json"]));
    assert_eq!(sent[0]["to"], "bob");
    let got = objects(&bob.ok(&["sync", "--json"]));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["event"], "message");
    assert_eq!(got[0]["text"], "김밥");
    assert_eq!(got[0]["reply_to"]["id"], question_id.as_str());
    assert_eq!(got[0]["reply_to"]["ours"], true);
    let text = bob.ok(&["history", "alice"]);
    assert!(text.contains("alice: ↪ me "), "{text}");

    // A reaction, then another that replaces it, then none.
    alice.ok(&["react", "bob", &question_id[..8], "👍"]);
    alice.ok(&["react", "bob", &question_id[..8], "🎉"]);
    // `react` tries each relay once; on a busy machine a first connection may not be
    // up in time, and what did not go then goes with the next run (here, a sync).
    alice.ok(&["sync"]);
    let got = objects(&bob.ok(&["sync", "--json"]));
    assert!(got.iter().all(|g| g["event"] == "reaction"), "{got:?}");
    let history = &objects(&bob.ok(&["history", "alice", "--json"]))[0];
    let asked = history
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == question_id.as_str())
        .unwrap();
    assert_eq!(asked["reactions"]["theirs"], "🎉");
    alice.ok(&["react", "bob", &question_id[..8], "--remove"]);
    alice.ok(&["sync"]);
    bob.ok(&["sync"]);
    let history = &objects(&bob.ok(&["history", "alice", "--json"]))[0];
    assert!(
        history.as_array().unwrap()[0]["reactions"]["theirs"].is_null(),
        "{history}"
    );

    // Words are no reaction, and a message that is not there cannot be named.
    let refused = alice.run(&["react", "bob", "last", "me"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("emoji and symbols only: 'm'"), "{why}");
    let refused = alice.run(&["send", "bob", "--reply", "abcdef0123", "hi"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no message"));

    // A new name: shown, and taken by the contact who had the old one.
    alice.ok(&["name", "Alice", "Kim"]);
    assert_eq!(alice.ok(&["name"]).trim(), "Alice Kim");
    let synced = bob.run(&["sync"]);
    let said = String::from_utf8_lossy(&synced.stderr);
    assert!(
        said.contains("alice now calls themselves Alice Kim"),
        "{said}"
    );
    let contacts = bob.ok(&["contact", "list"]);
    assert!(contacts.contains("Alice Kim"), "{contacts}");
    bob.ok(&["send", "Alice Kim", "nice name"]);
}

#[test]
fn a_new_session_key_keeps_the_conversation_going_and_retires_old_codes() {
    let dir = tempfile::tempdir().unwrap();
    let relays: Vec<RelayProc> = (0..2)
        .map(|i| RelayProc::start(&dir.path().join(format!("r{i}")), &[]))
        .collect();
    let alice = User::new(dir.path(), "alice");
    let bob = User::new(dir.path(), "bob");
    for u in [&alice, &bob] {
        for r in &relays {
            u.ok(&["relay", "add", &r.addr]);
        }
    }
    User::introduce(&alice, &bob);
    for i in 0..3 {
        alice
            .send("bob", &format!("alice before {i}"), 5.0)
            .unwrap();
        bob.ok(&["sync"]);
        bob.send("alice", &format!("bob before {i}"), 5.0).unwrap();
        alice.ok(&["sync"]);
    }
    let old_code = alice.invite();
    // On its way when the key changes: sealed on the session Alice is about to drop.
    bob.send("alice", "bob while alice rotates", 5.0).unwrap();

    // Not while a daemon holds the keys.
    let mut daemon = alice.daemon();
    let refused = alice.run(&["rotate-key"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("stop the daemon"), "{why}");
    daemon.stop();

    let rotated: serde_json::Value =
        serde_json::from_str(alice.ok(&["rotate-key", "--json"]).lines().last().unwrap()).unwrap();
    assert!(rotated["card_version"].as_u64().unwrap() > 1, "{rotated}");
    assert_ne!(alice.invite(), old_code, "a new code");
    bob.ok(&["sync"]);
    alice.ok(&["sync"]);
    for i in 0..3 {
        // A message relayed on a session the other side just replaced is sealed again
        // on the new one at the sender's next sync: each side syncs until it is there.
        let text = format!("alice after {i}");
        alice.send("bob", &text, 5.0).unwrap();
        bob.sync_until_said("alice", &text, &alice);
        let text = format!("bob after {i}");
        bob.send("alice", &text, 5.0).unwrap();
        alice.sync_until_said("bob", &text, &bob);
    }
    // What either side sealed again is put, and confirmed, before the drill looks.
    bob.ok(&["sync"]);
    alice.ok(&["sync"]);
    bob.ok(&["sync"]);
    alice.ok(&["sync"]);
    let at_alice = alice.history_texts("bob");
    let at_bob = bob.history_texts("alice");
    for i in 0..3 {
        for (texts, text) in [
            (&at_bob, format!("alice before {i}")),
            (&at_bob, format!("alice after {i}")),
            (&at_alice, format!("bob before {i}")),
            (&at_alice, format!("bob after {i}")),
        ] {
            assert_eq!(
                texts.iter().filter(|t| **t == text).count(),
                1,
                "{text:?} in {texts:?}"
            );
        }
    }
    assert_eq!(
        at_alice
            .iter()
            .filter(|t| *t == "bob while alice rotates")
            .count(),
        1,
        "{at_alice:?}"
    );
    // Everything Alice sent was confirmed under the new key: every message of hers is
    // delivered, and nothing waits in her outbox from before. (What an engine queues
    // as it starts, such as the card it sends again on a contact's new session, may
    // still be on its way while the drill reports: only older items count.)
    // (The drill's exit status says whether it found something to fix: two relays on
    // one machine share a failure domain.)
    let drill = alice.run(&["drill", "--json"]);
    let drill = String::from_utf8_lossy(&drill.stdout);
    let outbox: serde_json::Value = serde_json::from_str(drill.lines().last().unwrap()).unwrap();
    let waited = outbox["outbox"]["oldest_ms"].as_u64().unwrap();
    let took = (outbox["seconds"].as_f64().unwrap() * 1000.0) as u64 + 1;
    assert!(waited <= took, "{outbox}");
    alice.ok(&["sync"]);
    let history =
        serde_json::from_str::<serde_json::Value>(&alice.ok(&["history", "bob", "--json"]))
            .unwrap();
    for m in history.as_array().unwrap() {
        if m["direction"] == "out" {
            assert!(m["state"] == "delivered" || m["state"] == "read", "{m}");
        }
    }

    // A stranger holding the code given out before reaches nothing; once they add the
    // new one over it, what waited goes again, and it all arrives as a request.
    let carol = User::new(dir.path(), "carol");
    carol.ok(&["relay", "add", &relays[0].addr]);
    carol.ok(&["contact", "add", &old_code]);
    let old = carol.send("alice", "with the old code", 3.0).unwrap();
    assert_eq!(old["relayed"], 0, "{old}");
    let refused = old["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 2, "{old}");
    assert!(
        refused
            .iter()
            .all(|r| r["reason"].as_str().unwrap().starts_with("no_queue")),
        "{old}"
    );
    alice.ok(&["sync"]);
    let requests = alice.ok(&["request", "list"]);
    assert!(!requests.contains("with the old code"), "{requests}");
    let added = carol.run(&["contact", "add", &alice.invite()]);
    let said = String::from_utf8_lossy(&added.stderr).to_string()
        + &String::from_utf8_lossy(&added.stdout);
    assert!(added.status.success() && said.contains("updated"), "{said}");
    carol.ok(&["sync"]);
    carol.send("alice", "with the new code", 5.0).unwrap();
    alice.ok(&["sync"]);
    let requests = alice.ok(&["request", "list"]);
    assert!(requests.contains("with the new code"), "{requests}");
    assert!(requests.contains("with the old code"), "{requests}");
}

#[test]
fn each_side_sees_the_others_devices_and_a_new_key_takes_the_old_one_out() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&dir.path().join("r"), &[]);
    let (alice, bob) = User::alice_and_bob(dir.path(), &relay);
    let own = |u: &User| objects(&u.ok(&["device", "list", "--json"]))[0].clone();
    let listed = own(&alice);
    let devices = listed["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1, "{listed}");
    assert_eq!(devices[0]["name"], "first device");
    assert_eq!(devices[0]["this"], true);
    // Once they have written to each other, a name of her choosing reaches Bob, with
    // the fingerprint she sees.
    alice.send("bob", "hi", 5.0).unwrap();
    bob.ok(&["sync"]);
    bob.send("alice", "hello", 5.0).unwrap();
    alice.ok(&["sync"]);
    alice.ok(&["device", "rename", "work", "laptop"]);
    bob.ok(&["sync"]);
    let seen = objects(&bob.ok(&["contact", "devices", "alice", "--json"]))[0].clone();
    println!("alice's devices as bob sees them: {seen}");
    let fingerprint = own(&alice)["devices"][0]["fingerprint"].clone();
    assert_eq!(seen["devices"][0]["name"], "work laptop", "{seen}");
    assert_eq!(seen["devices"][0]["fingerprint"], fingerprint, "{seen}");
    assert_eq!(seen["card_fingerprint"], fingerprint, "{seen}");
    let shown = bob.ok(&["contact", "devices", "alice"]);
    assert!(shown.contains("work laptop"), "{shown}");
    assert!(shown.contains("their card names this one"), "{shown}");
    // A name that could disguise itself is refused, saying why.
    let refused = alice.run(&["device", "rename", "laptop\u{202e}"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("the device name is not allowed"), "{why}");
    // A new session key lists this device under it and takes the old key out, for
    // Bob too: he never goes back to it.
    alice.ok(&["rotate-key"]);
    let mut told = String::new();
    for _ in 0..2 {
        told += &String::from_utf8_lossy(&bob.run(&["sync"]).stderr);
        alice.ok(&["sync"]);
    }
    // Bob's sync says so, with both fingerprints.
    told += &String::from_utf8_lossy(&bob.run(&["sync"]).stderr);
    let after = own(&alice);
    let new_fingerprint = after["devices"][0]["fingerprint"].clone();
    assert_ne!(new_fingerprint, fingerprint);
    assert_eq!(after["removed"][0]["fingerprint"], fingerprint, "{after}");
    assert!(
        told.contains(&format!(
            "alice's account lists work laptop (key {}) and took out key {}",
            new_fingerprint.as_str().unwrap(),
            fingerprint.as_str().unwrap()
        )),
        "{told}"
    );
    let seen = objects(&bob.ok(&["contact", "devices", "alice", "--json"]))[0].clone();
    assert_eq!(seen["devices"].as_array().unwrap().len(), 1, "{seen}");
    assert_eq!(seen["devices"][0]["name"], "work laptop", "{seen}");
    assert_eq!(seen["devices"][0]["fingerprint"], new_fingerprint, "{seen}");
    assert_eq!(seen["removed"][0]["fingerprint"], fingerprint, "{seen}");
    assert_eq!(seen["card_fingerprint"], new_fingerprint, "{seen}");
}
