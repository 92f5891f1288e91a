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
    let alice = User::new(dir.path(), "alice");
    let bob = User::new(dir.path(), "bob");
    for u in [&alice, &bob] {
        u.ok(&["relay", "add", &relay.addr]);
    }
    User::introduce(&alice, &bob);
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
