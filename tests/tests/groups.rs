//! Groups from the command line, against real relays: created, joined, talked in, with a
//! relay killed on the way; members removed; announcement channels. Every member holds
//! the same members and sees each message once.

use kkachi_tests::procs::{RelayProc, User};

/// The JSON objects a command printed, one per line.
fn objects(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter(|l| l.starts_with('{') || l.starts_with('['))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// (from, text) of what members wrote in a group, as `history GROUP --json` lists it.
/// Syncs `user` until the key of `group`'s current epoch has reached them. Alice's
/// handout is one delivery round when she makes the change; on a loaded machine a copy
/// can stay in her outbox until her next sync, which this gives her.
fn holds_the_key(user: &User, admin: &User, group: &str) {
    let mut status = serde_json::Value::Null;
    for _ in 0..20 {
        user.ok(&["sync"]);
        status = objects(&user.ok(&["group", "relays", group, "--json"]))[0]["status"].clone();
        if status.is_null() {
            return;
        }
        admin.ok(&["sync"]);
    }
    panic!("{} never got the key of {group}: {status}", user.name);
}

fn said(user: &User, group: &str) -> Vec<(String, String)> {
    let history = &objects(&user.ok(&["history", group, "--json"]))[0];
    history
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["event"] == false)
        .map(|m| {
            (
                m["from"].as_str().unwrap().to_string(),
                m["text"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn members(user: &User, group: &str) -> Vec<(String, String)> {
    let list = &objects(&user.ok(&["group", "members", group, "--json"]))[0];
    let mut out: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["peer_id"].as_str().unwrap().to_string(),
                m["role"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_group_talks_through_a_relay_loss_and_agrees_on_its_members() {
    let dir = tempfile::tempdir().unwrap();
    let mut r1 = RelayProc::start(&dir.path().join("r1"), &[]);
    let r2 = RelayProc::start(&dir.path().join("r2"), &[]);
    let alice = User::new(dir.path(), "alice");
    let bob = User::new(dir.path(), "bob");
    let carol = User::new(dir.path(), "carol");
    for u in [&alice, &bob, &carol] {
        u.ok(&["relay", "add", &r1.addr, &r2.addr]);
    }
    User::introduce(&alice, &bob);
    User::introduce(&alice, &carol);
    User::introduce(&bob, &carol);

    let created = &objects(&alice.ok(&["group", "create", "Family", "--json"]))[0];
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 64);
    let added = &objects(&alice.ok(&["group", "add", "Family", "bob", "carol", "--json"]))[0];
    assert_eq!(added["told"], 2, "{added}");
    bob.ok(&["sync"]);
    carol.ok(&["sync"]);
    let everyone = members(&alice, "Family");
    assert_eq!(everyone.len(), 3);
    assert_eq!(members(&bob, "Family"), everyone);
    assert_eq!(
        members(&carol, &id[..8]),
        everyone,
        "a group is named by its id too"
    );
    let listed = &objects(&bob.ok(&["group", "list", "--json"]))[0];
    assert_eq!(listed[0]["name"], "Family");
    assert_eq!(listed[0]["role"], "member");

    let sent = &objects(&alice.ok(&["send", "Family", "dinner at 7", "--json"]))[0];
    assert_eq!(sent["members"], 2, "{sent}");
    assert_eq!(sent["relayed"], 2, "{sent}");
    // One relay gone for good: the group goes on through the other.
    r1.kill9();
    let got = objects(&bob.ok(&["sync", "--json"]));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["group"], "Family");
    assert_eq!(got[0]["from"], "alice");
    assert_eq!(got[0]["text"], "dinner at 7");
    let sent = &objects(&bob.ok(&["send", "Family", "we", "bring", "cake", "--json"]))[0];
    assert_eq!(sent["relayed"], 2, "{sent}");
    for u in [&alice, &carol] {
        u.ok(&["sync"]);
        // Again: nothing comes twice.
        u.ok(&["sync"]);
    }
    let want = vec![
        ("alice".to_string(), "dinner at 7".to_string()),
        ("bob".to_string(), "we bring cake".to_string()),
    ];
    assert_eq!(said(&carol, "Family"), want);
    assert_eq!(said(&alice, "Family"), want);
    assert_eq!(said(&bob, "Family"), want);
    let text = carol.ok(&["history", "Family"]);
    assert!(text.contains("alice: dinner at 7"), "{text}");
    assert!(
        text.contains("— alice added you to Family; members: you, alice, bob"),
        "{text}"
    );
    // Receipts: Alice's message reached both.
    bob.ok(&["sync"]);
    alice.ok(&["sync"]);
    let history = &objects(&alice.ok(&["history", "Family", "--json"]))[0];
    let dinner = history
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["text"] == "dinner at 7")
        .unwrap();
    assert_eq!(dinner["delivered_to"], 2, "{history}");
    assert_eq!(dinner["state"], "delivered");

    // Carol is removed: she is told, may not post, and gets nothing more.
    alice.ok(&["group", "remove", "Family", "carol"]);
    bob.ok(&["sync"]);
    let told = carol.ok(&["sync"]);
    assert!(told.contains("Family: alice removed you"), "{told}");
    assert_eq!(members(&bob, "Family").len(), 2);
    assert_eq!(members(&carol, "Family"), members(&alice, "Family"));
    let refused = carol.run(&["send", "Family", "hello?"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not a member"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let sent = &objects(&alice.ok(&["send", "Family", "just us now", "--json"]))[0];
    assert_eq!(sent["members"], 1, "sealed for Bob alone: {sent}");
    assert!(objects(&carol.ok(&["sync", "--json"])).is_empty());
    assert_eq!(objects(&bob.ok(&["sync", "--json"])).len(), 1);

    // An announcement channel: only admins post.
    alice.ok(&["group", "mode", "Family", "announcement"]);
    bob.ok(&["sync"]);
    let refused = bob.run(&["send", "Family", "me too"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("only admins post"));
    // Bob is not an admin: he cannot change the group either.
    let refused = bob.run(&["group", "rename", "Family", "Bob's"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("admins"));

    // A timer for the group: set by an admin, told to members.
    let set = alice.ok(&["group", "timer", "Family", "1d"]);
    assert!(
        set.contains("messages now disappear 1 day after they arrive"),
        "{set}"
    );
    bob.ok(&["sync"]);
    let shown = bob.ok(&["group", "timer", "Family"]);
    assert!(
        shown.contains("disappear 1 day after they arrive"),
        "{shown}"
    );
    alice.ok(&["group", "timer", "Family", "off"]);
    bob.ok(&["sync"]);

    // The announcement: who has it, who read it.
    alice.ok(&["send", "Family", "evacuate to the school gym"]);
    let before = &objects(&alice.ok(&["group", "receipts", "Family", "--json"]))[0];
    assert_eq!(before["text"], "evacuate to the school gym");
    assert_eq!(before["read_by"], 0);
    bob.ok(&["sync"]);
    let read = &objects(&bob.ok(&["group", "read", "Family", "--json"]))[0];
    assert!(read["read"].as_u64().unwrap() >= 1, "{read}");
    alice.ok(&["sync"]);
    let after = &objects(&alice.ok(&["group", "receipts", "Family", "--json"]))[0];
    assert_eq!(after["read_by"], 1, "{after}");
    assert_eq!(after["members"][0]["name"], "bob");
    assert_eq!(after["members"][0]["state"], "read");
    let text = alice.ok(&["group", "receipts", "Family"]);
    assert!(text.contains("delivered to 1 of 1, read by 1"), "{text}");
}

#[test]
fn names_that_are_not_groups_or_are_both_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&dir.path().join("r"), &[]);
    let (alice, _bob) = User::alice_and_bob(dir.path(), &relay);
    let none = alice.run(&["group", "members", "Nope"]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("no group named"));
    // A group called like a contact: `send bob` is refused, not guessed, and says how
    // to name each; the contact's peer id still reaches the contact.
    let created = alice.run(&["group", "create", "bob"]);
    assert!(String::from_utf8_lossy(&created.stderr).contains("is called bob too"));
    let both = alice.run(&["send", "bob", "hi"]);
    assert!(!both.status.success());
    let said = String::from_utf8_lossy(&both.stderr);
    assert!(
        said.contains("could be your contact bob or the group bob"),
        "{said}"
    );
    let peer = &objects(&alice.ok(&["contact", "list", "--json"]))[0][0]["peer_id"];
    let sent = alice.ok(&["send", peer.as_str().unwrap(), "hi by id", "--json"]);
    assert_eq!(objects(&sent)[0]["to"], "bob");
    // The only admin of a group with others in it is stopped before leaving.
    alice.ok(&["group", "create", "Trip"]);
    alice.ok(&["group", "add", "Trip", "bob"]);
    // Commands that take contacts say when they were given a group.
    let timer = alice.run(&["timer", "Trip"]);
    assert!(!timer.status.success());
    assert!(String::from_utf8_lossy(&timer.stderr).contains("Trip is a group"));
    let leave = alice.run(&["group", "leave", "Trip"]);
    assert!(String::from_utf8_lossy(&leave.stderr).contains("only admin"));
    // Asking for what is so already changes nothing and says so.
    let again = alice.ok(&["group", "add", "Trip", "bob"]);
    assert!(
        again.contains("nothing to do, bob is a member already"),
        "{again}"
    );
    // A group left can be forgotten; one still joined cannot.
    let forget = alice.run(&["group", "forget", "Trip"]);
    assert!(String::from_utf8_lossy(&forget.stderr).contains("leave the group first"));
    alice.ok(&["group", "leave", "Trip", "--force"]);
    alice.ok(&["group", "forget", "Trip"]);
    let none = alice.run(&["history", "Trip"]);
    assert!(!none.status.success());
    // A bad group name is refused with the reason.
    let bad = alice.run(&["group", "create", " padded"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("group name"));
}

#[test]
fn a_photo_sent_to_a_group_reaches_every_member_through_a_relay_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut relays: Vec<RelayProc> = (0..3)
        .map(|i| RelayProc::start(&dir.path().join(format!("r{i}")), &[]))
        .collect();
    let alice = User::new(dir.path(), "alice");
    let bob = User::new(dir.path(), "bob");
    let carol = User::new(dir.path(), "carol");
    for u in [&alice, &bob, &carol] {
        u.ok(&[
            "relay",
            "add",
            &relays[0].addr,
            &relays[1].addr,
            &relays[2].addr,
        ]);
    }
    User::introduce(&alice, &bob);
    User::introduce(&alice, &carol);
    User::introduce(&bob, &carol);
    alice.ok(&["group", "create", "Family"]);
    alice.ok(&["group", "add", "Family", "bob", "carol"]);
    // Each grants the others at its relays (done when online), so puts are taken.
    for u in [&bob, &carol, &alice] {
        u.ok(&["sync"]);
    }
    // 3 MB of photo: two of each member's three relays get every chunk.
    let photo = dir.path().join("flooded-bridge.jpg");
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 253) as u8).collect();
    std::fs::write(&photo, &bytes).unwrap();
    let sent = &objects(&alice.ok(&[
        "send",
        "Family",
        "--file",
        photo.to_str().unwrap(),
        "the bridge at 9am",
        "--json",
    ]))[0];
    println!("group photo sent: {sent}");
    assert_eq!(sent["members"], 2, "{sent}");
    assert_eq!(sent["copies"], 2, "{sent}");
    assert_eq!(sent["to"], "Family");
    // Any one relay can go: every chunk is on two of each member's relays.
    relays[1].kill9();
    for u in [&bob, &carol] {
        u.ok(&["sync"]);
        let history = &objects(&u.ok(&["history", "Family", "--json"]))[0];
        let list = history.as_array().unwrap();
        let with_file = list
            .iter()
            .find(|m| !m["file"].is_null())
            .unwrap_or_else(|| panic!("no file in the group's history: {history}"));
        assert_eq!(with_file["from"], "alice");
        assert_eq!(with_file["file"]["name"], "flooded-bridge.jpg");
        assert_eq!(with_file["file"]["size"], 3_000_000);
        assert!(
            list.iter().any(|m| m["text"] == "the bridge at 9am"),
            "{history}"
        );
        let id = with_file["file"]["id"].as_str().unwrap().to_string();
        let listed = u.ok(&["files"]);
        assert!(listed.contains("← Family"), "{listed}");
        let to = dir.path().join(format!("saved-{}", u.name));
        let got = &objects(&u.ok(&["get", &id, "--to", to.to_str().unwrap(), "--json"]))[0];
        assert_eq!(got["from"], "Family › alice", "{got}");
        let saved = std::fs::read(got["path"].as_str().unwrap()).unwrap();
        assert!(saved == bytes, "the saved photo differs from the one sent");
        let text = u.ok(&["history", "Family"]);
        assert!(text.contains("alice: 📎 flooded-bridge.jpg"), "{text}");
    }
}

#[test]
fn members_who_are_not_contacts_talk_in_the_group_and_stay_out_of_the_contact_list() {
    let dir = tempfile::tempdir().unwrap();
    let mut r1 = RelayProc::start(&dir.path().join("r1"), &[]);
    let r2 = RelayProc::start(&dir.path().join("r2"), &[]);
    let alice = User::new(dir.path(), "alice");
    let bob = User::new(dir.path(), "bob");
    let carol = User::new(dir.path(), "carol");
    for u in [&alice, &bob, &carol] {
        u.ok(&["relay", "add", &r1.addr, &r2.addr]);
    }
    // Alice knows both; Bob and Carol have never met.
    User::introduce(&alice, &bob);
    User::introduce(&alice, &carol);
    alice.ok(&["group", "create", "Street"]);
    let added = &objects(&alice.ok(&["group", "add", "Street", "bob", "carol", "--json"]))[0];
    assert_eq!(added["told"], 2, "{added}");
    bob.ok(&["sync"]);
    carol.ok(&["sync"]);
    // Each can reach the other, who is still not a contact.
    for (u, other) in [(&bob, "carol"), (&carol, "bob")] {
        let list = &objects(&u.ok(&["group", "members", "Street", "--json"]))[0];
        let them = list
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name_in_group"] == other)
            .unwrap_or_else(|| panic!("{list}"));
        assert_eq!(them["contact"], false, "{them}");
        assert_eq!(them["reachable"], true, "{them}");
        let text = u.ok(&["group", "members", "Street"]);
        assert!(text.contains(&format!("{other} (not a contact)")), "{text}");
        let contacts = u.ok(&["contact", "list"]);
        assert!(!contacts.contains(other), "{contacts}");
        let refused = u.run(&["send", other, "psst"]);
        assert!(!refused.status.success());
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(
            err.contains(&format!(
                "{other} is in a group with you but is not your contact"
            )),
            "{err}"
        );
    }

    // A member who is not a contact can be blocked by the name they go by.
    let blocked = &objects(&carol.ok(&["contact", "block", "bob", "--json"]))[0];
    assert_eq!(blocked["blocked"], "bob", "{blocked}");
    carol.ok(&["contact", "unblock", "bob"]);

    let sent = &objects(&bob.ok(&["send", "Street", "water", "is", "back", "--json"]))[0];
    assert_eq!(sent["members"], 2, "{sent}");
    assert_eq!(
        sent["unreachable"].as_array().map(Vec::len),
        Some(0),
        "{sent}"
    );
    let got = objects(&carol.ok(&["sync", "--json"]));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["text"], "water is back");
    assert_eq!(got[0]["from"], "~bob");
    // One relay gone for good: they go on through the other.
    r1.kill9();
    let sent = &objects(&carol.ok(&["send", "Street", "thanks", "--json"]))[0];
    assert_eq!(sent["members"], 2, "{sent}");
    assert!(sent["relayed"].as_u64().unwrap() >= 1, "{sent}");
    for u in [&alice, &bob] {
        u.ok(&["sync"]);
        u.ok(&["sync"]);
    }
    let pairs = |a: &str, b: &str| {
        vec![
            (a.to_string(), "water is back".to_string()),
            (b.to_string(), "thanks".to_string()),
        ]
    };
    assert_eq!(said(&alice, "Street"), pairs("bob", "carol"));
    assert_eq!(said(&bob, "Street"), pairs("bob", "carol (not a contact)"));
    assert_eq!(
        said(&carol, "Street"),
        pairs("bob (not a contact)", "carol")
    );
    // Nobody was asked to accept anybody.
    for u in [&alice, &bob, &carol] {
        let requests = u.ok(&["request", "list"]);
        assert!(
            !requests.contains("bob") && !requests.contains("carol"),
            "{requests}"
        );
    }
    // Bob adds Carol's code: she is his contact now (said so), and what he writes her
    // alone is a message request on her side until she accepts.
    let added = &objects(&bob.ok(&["contact", "add", &carol.invite(), "--json"]))[0];
    assert_eq!(added["status"], "added", "{added}");
    assert!(bob.ok(&["contact", "list"]).contains("carol"));
    bob.send("carol", "coffee tomorrow?", 5.0).unwrap();
    let synced = carol.run(&["sync"]);
    let said = String::from_utf8_lossy(&synced.stderr);
    assert!(said.contains("message request from bob"), "{said}");
    let accepted = carol.ok(&["request", "accept", "bob"]);
    assert!(accepted.contains("added contact bob"), "{accepted}");
    assert_eq!(
        carol.history_texts("bob"),
        vec!["coffee tomorrow?".to_string()]
    );
}

/// A group given relays of its own (SPEC §14.5): members who are not each other's
/// contacts read one queue on each group relay; a message goes once per relay; one
/// relay killed -9 loses nothing; a removed member reads nothing written after.
#[test]
fn a_group_with_group_relays_talks_through_a_relay_loss_and_shuts_out_a_removed_member() {
    let dir = tempfile::tempdir().unwrap();
    let home_relay = RelayProc::start(&dir.path().join("home"), &[]);
    let mut group_relays: Vec<RelayProc> = (0..3)
        .map(|i| RelayProc::start(&dir.path().join(format!("g{i}")), &[]))
        .collect();
    let alice = User::new(dir.path(), "alice");
    let bob = User::new(dir.path(), "bob");
    let carol = User::new(dir.path(), "carol");
    let dave = User::new(dir.path(), "dave");
    for u in [&alice, &bob, &carol, &dave] {
        u.ok(&["relay", "add", &home_relay.addr]);
    }
    // Alice knows everyone; the others know only her.
    for u in [&bob, &carol, &dave] {
        User::introduce(&alice, u);
    }
    alice.ok(&["group", "create", "Town"]);
    // A relay that does not answer is refused as a group relay, saying which.
    let mut gone = RelayProc::start(&dir.path().join("gone"), &[]);
    gone.kill9();
    let refused = alice.run(&["group", "relays", "Town", &group_relays[0].addr, &gone.addr]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains(&format!(
            "{} does not answer (connection refused",
            gone.addr
        )),
        "{why}"
    );
    let addrs: Vec<&str> = group_relays.iter().map(|r| r.addr.as_str()).collect();
    let mut args = vec!["group", "relays", "Town"];
    args.extend(&addrs);
    alice.ok(&args);
    let shown = &objects(&alice.ok(&["group", "relays", "Town", "--json"]))[0];
    assert_eq!(shown["relays"].as_array().unwrap().len(), 3, "{shown}");
    alice.ok(&["group", "add", "Town", "bob", "carol", "dave"]);
    for u in [&bob, &carol, &dave] {
        holds_the_key(u, &alice, "Town");
    }
    let sent = &objects(&bob.ok(&["send", "Town", "the", "bridge", "is", "out", "--json"]))[0];
    assert_eq!(sent["members"], 3, "{sent}");
    assert_eq!(sent["relayed"], 3, "on every group relay: {sent}");
    for u in [&alice, &carol, &dave] {
        u.ok(&["sync"]);
        let said = said(u, "Town");
        assert_eq!(said.len(), 1, "{said:?}");
        assert_eq!(said[0].1, "the bridge is out");
    }

    // One group relay killed -9: nothing lost, nothing twice.
    group_relays[0].kill9();
    let synced = dave.run(&["sync"]);
    let warned = String::from_utf8_lossy(&synced.stderr);
    assert!(warned.contains("2/3 group relays"), "{warned}");
    assert!(
        warned.contains(&format!(
            "group relay {}: connection refused",
            group_relays[0].addr
        )),
        "{warned}"
    );
    carol.ok(&["send", "Town", "go round by the school"]);
    for u in [&alice, &bob, &dave] {
        u.ok(&["sync"]);
        let texts: Vec<String> = said(u, "Town").into_iter().map(|(_, t)| t).collect();
        assert_eq!(texts, ["the bridge is out", "go round by the school"]);
    }

    // A 3 MB photo, with that relay still down: uploaded once into the group's queues
    // on the two left, and fetched whole by every member.
    let photo = dir.path().join("school-gym.jpg");
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 29 % 241) as u8).collect();
    std::fs::write(&photo, &bytes).unwrap();
    let sent =
        &objects(&carol.ok(&["send", "Town", "--file", photo.to_str().unwrap(), "--json"]))[0];
    println!("photo to a group with group relays: {sent}");
    assert_eq!(sent["group_relays"], true, "{sent}");
    assert_eq!(sent["members"], 3, "{sent}");
    assert_eq!(sent["relays"], 3, "{sent}");
    assert_eq!(sent["copies"], 2, "on both relays left: {sent}");
    assert_eq!(sent["wanted"], 2, "two copies of a file over 1 MiB: {sent}");
    assert_eq!(sent["relayed"], 2, "{sent}");
    let one_upload = sent["bytes_put"].as_u64().unwrap();
    // Two sealed copies (12 chunks of 262,160 bytes and a 4,112-byte manifest each),
    // not two per member.
    assert_eq!(
        one_upload,
        2 * (12 * 262_160 + 4_112),
        "one upload per group relay, not per member: {sent}"
    );
    for u in [&alice, &bob, &dave] {
        u.ok(&["sync"]);
        let history = &objects(&u.ok(&["history", "Town", "--json"]))[0];
        let with_file = history
            .as_array()
            .unwrap()
            .iter()
            .find(|m| !m["file"].is_null())
            .unwrap_or_else(|| panic!("no file in the group's history: {history}"));
        let id = with_file["file"]["id"].as_str().unwrap().to_string();
        let to = dir.path().join(format!("saved-{}", u.name));
        let got = &objects(&u.ok(&["get", &id, "--to", to.to_str().unwrap(), "--json"]))[0];
        assert!(
            got["from"].as_str().unwrap().starts_with("Town › "),
            "{got}"
        );
        let saved = std::fs::read(got["path"].as_str().unwrap()).unwrap();
        assert!(saved == bytes, "the saved photo differs from the one sent");
    }

    // Dave is removed; what Bob writes once he knows is not Dave's to read.
    alice.ok(&["group", "remove", "Town", "dave"]);
    bob.ok(&["sync"]);
    bob.ok(&["send", "Town", "meet at the gym"]);
    carol.ok(&["sync"]);
    assert_eq!(said(&carol, "Town").len(), 4, "three texts and the photo");
    dave.ok(&["sync"]);
    dave.ok(&["sync"]);
    let texts: Vec<String> = said(&dave, "Town").into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, ["the bridge is out", "go round by the school", ""]);
    let out = dave.run(&["send", "Town", "still here?"]);
    assert!(!out.status.success(), "a removed member cannot post");
}
