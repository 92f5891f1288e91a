//! Devices against the real binaries: a device joins an account over the network with
//! a one-time code (`device link`, `device join`); both devices send and receive, each
//! shows what the other sent, every message once, and each has the contacts and blocks
//! made on the other; a device taken out (`device remove`)
//! is sealed nothing more; a mistyped code and a code nobody holds are named as such.
//! Prints its figures.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kkachi_tests::netns::{self, Bridged};
use kkachi_tests::procs::{Daemon, LOOPBACK_ENV, RelayProc, User};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The lines `child` prints on stdout, as they come.
fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// The next line as JSON, within `secs` seconds.
fn next_json(lines: &mpsc::Receiver<String>, secs: u64) -> serde_json::Value {
    let line = lines
        .recv_timeout(Duration::from_secs(secs))
        .expect("a line in time");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// `user`'s `device link --json` on loopback (no relay), held `wait`: the process, its stdout
/// lines after the first, and the code the first gives (its addresses checked).
fn offer(user: &User, wait: &str) -> (Child, mpsc::Receiver<String>, String) {
    let (link, lines, offer) = linking(
        user,
        &["--listen", "127.0.0.1:0", "--no-relay", "--wait", wait],
    );
    let code = offer["code"].as_str().expect("a code").to_string();
    assert!(code.starts_with("kkd1"), "{offer}");
    let addrs = offer["addresses"].as_array().expect("addresses");
    assert_eq!(addrs.len(), 1, "{offer}");
    assert!(
        addrs[0].as_str().unwrap().starts_with("127.0.0.1:"),
        "{offer}"
    );
    // --listen named loopback, and no relay: the code says it reaches this machine
    // only.
    assert_eq!(offer["loopback_only"], true, "{offer}");
    assert_eq!(offer["relay"], serde_json::Value::Null, "{offer}");
    (link, lines, code)
}

/// `user`'s `device link --yes --json` with `args`: the process, its stdout lines after
/// the first, and the first (the offer).
fn linking(user: &User, args: &[&str]) -> (Child, mpsc::Receiver<String>, serde_json::Value) {
    let mut all = vec!["device", "link"];
    all.extend_from_slice(args);
    all.extend(["--yes", "--json"]);
    let mut link = user
        .spawn(&all)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = stdout_lines(&mut link);
    let offer = next_json(&lines, 30);
    (link, lines, offer)
}

/// What restores and joins left beside their homes under `dir`.
fn staging_left(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("kkachi-restor"))
        .collect()
}

/// Waits for `child` to exit, at most `secs` seconds (killed and failed after that).
fn exits_within(mut child: Child, secs: u64) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_device_joins_with_a_code_and_both_devices_send_receive_and_show_each_others_messages() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(dir.path(), &[]);
    let (alice, bob) = User::alice_and_bob(dir.path(), &relay);
    let said = ["alice before the phone", "bob before the phone"];
    alice.ok(&["send", "bob", said[0]]);
    bob.sync_until_said("alice", said[0], &alice);
    bob.ok(&["send", "alice", said[1]]);
    alice.sync_until_said("bob", said[1], &bob);
    let before = json(&alice.ok(&["device", "list", "--json"]));
    let laptop_fingerprint = before["devices"][0]["fingerprint"].clone();

    // The laptop offers the account; its first line is the code.
    let (link, lines, code) = offer(&alice, "2m");

    let phone = User::without_identity(dir.path(), "alice-phone", None, &LOOPBACK_ENV);
    // A mistyped code is named as such, and leaves nothing behind.
    let mut typo = code.clone().into_bytes();
    let at = typo.len() - 2;
    typo[at] = if typo[at] == b'a' { b'b' } else { b'a' };
    let mistyped = phone.run(&["device", "join", std::str::from_utf8(&typo).unwrap()]);
    assert!(!mistyped.status.success());
    let why = String::from_utf8_lossy(&mistyped.stderr);
    assert!(why.contains("checksum"), "{why}");
    // A name no device may have is refused before anything is asked.
    let bad = phone.run(&["device", "join", &code, "--name", " "]);
    assert!(!bad.status.success());
    let why = String::from_utf8_lossy(&bad.stderr);
    assert!(why.contains("--name"), "{why}");

    // Meanwhile the laptop's home is held, and what finds it so says by what.
    let held = alice.run(&["send", "bob", "while it goes"]);
    assert!(!held.status.success());
    let why = String::from_utf8_lossy(&held.stderr);
    assert!(why.contains("`kkachi device link` (process"), "{why}");

    // The right code, on standard input (out of the process list), in two lines as
    // copied.
    let (a, b) = code.split_at(code.len() / 2);
    let started = Instant::now();
    let mut join = phone
        .spawn(&["device", "join", "-", "--name", "phone", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = join.stdin.take().unwrap();
        writeln!(stdin, "{a}\n{b}").unwrap();
    }
    let out = exits_within(join, 60);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let joined = json(&String::from_utf8_lossy(&out.stdout));
    let join_ms = started.elapsed().as_millis();
    let linked = next_json(&lines, 30);
    assert!(exits_within(link, 30).status.success());
    assert_eq!(linked["linked"], true, "{linked}");
    assert_eq!(linked["device"], "phone", "{linked}");
    assert_eq!(linked["confirmed"], true, "{linked}");
    assert_eq!(joined["name"], "alice", "{joined}");
    assert_eq!(joined["device"], "phone", "{joined}");
    assert_eq!(linked["peer_id"], joined["peer_id"], "{linked} {joined}");
    assert!(
        staging_left(dir.path()).is_empty(),
        "{:?}",
        staging_left(dir.path())
    );
    assert_eq!(linked["key"], joined["key"], "{linked} {joined}");
    assert_eq!(linked["messages"], joined["messages"], "{linked} {joined}");
    assert!(joined["messages"].as_u64().unwrap() >= 2, "{joined}");
    assert_eq!(joined["new_key"], true, "{joined}");

    // Both list both; each has a key of its own.
    let fingerprints = |user: &User| {
        let list = json(&user.ok(&["device", "list", "--json"]));
        let mut all: Vec<String> = list["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["fingerprint"].as_str().unwrap().to_owned())
            .collect();
        all.sort();
        all
    };
    let mut both = vec![
        laptop_fingerprint.as_str().unwrap().to_owned(),
        joined["fingerprint"].as_str().unwrap().to_owned(),
    ];
    both.sort();
    assert_eq!(fingerprints(&alice), both);
    assert_eq!(fingerprints(&phone), both);
    // The phone holds the conversation.
    let history = phone.history_texts("bob");
    for text in said {
        assert_eq!(
            history.iter().filter(|t| *t == text).count(),
            1,
            "{history:?}"
        );
    }

    // Each device sends; Bob gets each message once, and the other device shows it
    // after one read of its relays.
    phone.ok(&["sync"]);
    alice.ok(&["sync"]);
    let from_phone = "alice from her phone";
    phone.ok(&["send", "bob", from_phone]);
    bob.sync_until_said("alice", from_phone, &phone);
    let synced = Instant::now();
    alice.ok(&["sync"]);
    let shown_ms = synced.elapsed().as_millis();
    assert!(
        alice.history_texts("bob").iter().any(|t| t == from_phone),
        "one sync of the laptop shows what the phone sent: {:?}",
        alice.history_texts("bob")
    );
    let from_laptop = "alice from her laptop";
    alice.ok(&["send", "bob", from_laptop]);
    bob.sync_until_said("alice", from_laptop, &alice);
    phone.ok(&["sync"]);
    assert!(
        phone.history_texts("bob").iter().any(|t| t == from_laptop),
        "one sync of the phone shows what the laptop sent: {:?}",
        phone.history_texts("bob")
    );
    // Bob writes: both devices get it.
    let to_both = "bob to both of her devices";
    bob.ok(&["send", "alice", to_both]);
    phone.sync_until_said("bob", to_both, &bob);
    alice.sync_until_said("bob", to_both, &bob);
    let everything = [said[0], said[1], from_phone, from_laptop, to_both];
    for (who, texts) in [
        ("bob", bob.history_texts("alice")),
        ("the laptop", alice.history_texts("bob")),
        ("the phone", phone.history_texts("bob")),
    ] {
        for text in everything {
            assert_eq!(
                texts.iter().filter(|t| *t == text).count(),
                1,
                "{text:?} once at {who}: {texts:?}"
            );
        }
    }
    // Bob keeps the laptop's card, and seals to both devices.
    let seen = json(&bob.ok(&["contact", "devices", "alice", "--json"]));
    assert_eq!(seen["card_fingerprint"], laptop_fingerprint, "{seen}");
    assert_eq!(
        seen["sealed_to"].as_array().map(Vec::len),
        Some(2),
        "{seen}"
    );

    // A contact added on the laptop is one on the phone; a block on the phone holds
    // on the laptop.
    let carol = User::new(dir.path(), "carol");
    carol.ok(&["relay", "add", &relay.addr]);
    alice.ok(&["contact", "add", &carol.invite()]);
    // (Adding works offline: what it tells goes at the next sync.)
    alice.ok(&["sync"]);
    phone.ok(&["sync"]);
    let carol_at = |user: &User| {
        let list = json(&user.ok(&["contact", "list", "--json"]));
        list.as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "carol")
            .cloned()
            .unwrap_or_else(|| panic!("carol is not a contact of {}: {list}", user.name))
    };
    assert_eq!(carol_at(&phone)["blocked"], false);
    phone.ok(&["contact", "block", "carol"]);
    phone.ok(&["sync"]);
    alice.ok(&["sync"]);
    assert_eq!(carol_at(&alice)["blocked"], true);

    // The laptop takes the phone out: it is listed no more, on either device or at
    // Bob's once the set reaches them.
    let removed = json(&alice.ok(&["device", "remove", "phone", "--json"]));
    assert_eq!(
        removed["removed_fingerprint"], joined["fingerprint"],
        "{removed}"
    );
    let this = alice.run(&["device", "remove", laptop_fingerprint.as_str().unwrap()]);
    assert!(!this.status.success(), "not this device");
    bob.ok(&["sync"]);
    let seen = json(&bob.ok(&["contact", "devices", "alice", "--json"]));
    assert_eq!(
        seen["sealed_to"],
        serde_json::json!([laptop_fingerprint]),
        "{seen}"
    );
    println!(
        "devices: {} records ({} messages) went to the phone in {join_ms} ms; each device \
         showed what the other sent after one sync ({shown_ms} ms for the laptop's); \
         every message once on both and at Bob's",
        joined["records"], joined["messages"]
    );
}

#[test]
fn a_device_joins_through_a_relay_when_it_cannot_reach_the_other_one() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(dir.path(), &[]);
    let (alice, bob) = User::alice_and_bob(dir.path(), &relay);
    let before = "alice before she moves through the relay";
    alice.ok(&["send", "bob", before]);
    bob.sync_until_said("alice", before, &alice);

    // The code names the relay alone: no address of the old device.
    let (link, lines, offer) = linking(&alice, &["--relay-only", "--wait", "2m"]);
    assert_eq!(
        offer["addresses"].as_array().map(Vec::len),
        Some(0),
        "{offer}"
    );
    assert_eq!(offer["relay"], relay.addr.as_str(), "{offer}");
    assert_eq!(offer["loopback_only"], false, "{offer}");
    let code = offer["code"].as_str().expect("a code").to_string();

    let phone = User::without_identity(dir.path(), "alice-phone", None, &LOOPBACK_ENV);
    let started = Instant::now();
    let out = exits_within(
        phone
            .spawn(&["device", "join", &code, "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        60,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let join_ms = started.elapsed().as_millis();
    let joined = json(&String::from_utf8_lossy(&out.stdout));
    let handed = next_json(&lines, 30);
    let link = exits_within(link, 30);
    assert!(link.status.success());
    let through = format!("relay {}", relay.addr);
    assert_eq!(joined["from"], through.as_str(), "{joined}");
    assert_eq!(handed["from"], through.as_str(), "{handed}");
    assert_eq!(handed["confirmed"], true, "{handed}");
    assert_eq!(handed["key"], joined["key"], "{handed} {joined}");
    assert!(staging_left(dir.path()).is_empty());
    // No panic or stray report from the link's threads as either process ended.
    for err in [&out.stderr, &link.stderr] {
        let err = String::from_utf8_lossy(err);
        assert!(!err.contains("panicked"), "{err}");
    }

    // The conversation goes on from the new device.
    phone.ok(&["sync"]);
    let after = "alice from the phone that came through the relay";
    phone.ok(&["send", "bob", after]);
    bob.sync_until_said("alice", after, &phone);
    let b = bob.history_texts("alice");
    for text in [before, after] {
        assert_eq!(b.iter().filter(|t| *t == text).count(), 1, "{b:?}");
    }
    println!(
        "devices: {} records went to the new device through the relay in {join_ms} ms",
        joined["records"]
    );

    // An account with no relay cannot link through one, and says so.
    let carol = User::new(dir.path(), "carol");
    let none = carol.run(&["device", "link", "--relay-only", "--yes"]);
    assert!(!none.status.success());
    let why = String::from_utf8_lossy(&none.stderr);
    assert!(why.contains("no relay to link through"), "{why}");
}

#[test]
fn a_code_nobody_offers_is_named_and_linking_waits_for_no_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let alice = User::new(dir.path(), "alice");
    // An offer nobody takes.
    let (link, _, code) = offer(&alice, "10s");
    // It runs out: nothing changed, and the code then reaches no one.
    let out = exits_within(link, 30);
    assert!(!out.status.success());
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("no device took the account"), "{why}");
    alice.ok(&["device", "list"]);
    let phone = User::without_identity(dir.path(), "phone", None, &LOOPBACK_ENV);
    let late = phone.run(&["device", "join", &code]);
    assert!(!late.status.success());
    let why = String::from_utf8_lossy(&late.stderr);
    assert!(
        why.contains("no device answered with this code at 127.0.0.1:"),
        "{why}"
    );
    assert!(!phone.home.exists());
    // An offer its user stops (Ctrl-C) says so, and leaves the home free.
    let (link, _, _) = offer(&alice, "2m");
    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &link.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let out = exits_within(link, 20);
    assert_eq!(out.status.code(), Some(130));
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("cancelled: the code no longer works"), "{why}");
    assert!(!alice.home.join("linking").exists());
    alice.ok(&["device", "list"]);
    // Not a link code at all.
    let invite = alice.invite();
    let wrong = phone.run(&["device", "join", &invite]);
    let why = String::from_utf8_lossy(&wrong.stderr);
    assert!(why.contains("that is an invite code"), "{why}");
    // Linking needs the home to itself: with a daemon running it says so.
    let mut daemon = alice.daemon();
    let busy = alice.run(&["device", "link", "--listen", "127.0.0.1:0", "--yes"]);
    assert!(!busy.status.success());
    let why = String::from_utf8_lossy(&busy.stderr);
    assert!(why.contains("stop it first"), "{why}");
    daemon.stop();
    // With no terminal to confirm the new device's safety number, and no --yes, it
    // does not offer at all.
    let unasked = alice.run(&["device", "link", "--listen", "127.0.0.1:0"]);
    assert!(!unasked.status.success());
    let why = String::from_utf8_lossy(&unasked.stderr);
    assert!(
        why.contains("at a terminal") && why.contains("--yes"),
        "{why}"
    );
}

/// The texts of the messages `daemon` shows within `wait` (or until `enough` says so),
/// each with its direction.
fn shown(
    daemon: &Daemon,
    wait: Duration,
    enough: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let texts = |got: &[(Instant, serde_json::Value)]| -> Vec<(String, String)> {
        got.iter()
            .filter(|(_, v)| v["event"] == "message")
            .map(|(_, v)| {
                (
                    v["text"].as_str().unwrap_or_default().to_owned(),
                    v["direction"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    texts(&daemon.collect(wait, |got| enough(&texts(got))))
}

#[test]
fn on_a_lan_with_no_relay_every_device_of_an_account_reaches_and_is_reached_directly() {
    if let Some(why) = netns::unavailable() {
        println!(
            "SKIPPED on_a_lan_with_no_relay_every_device_of_an_account_reaches_and_is_reached_directly: {why}"
        );
        return;
    }
    // Her laptop, her phone and Bob, each in a namespace of its own on one bridge: a LAN
    // with no internet and no relay at all.
    let net = Bridged::create("kkt_dv_", 44, &["laptop", "phone", "bob"]).expect("namespaces");
    net.multicast().expect("multicast on the bridge");
    let dir = tempfile::tempdir().unwrap();
    let listen: Vec<String> = net
        .ips
        .iter()
        .map(|ip| format!("/ip4/{ip}/tcp/0"))
        .collect();
    let on = |i: usize| [("KKACHI_LISTEN", listen[i].as_str())];
    let alice = User::with_env(dir.path(), "alice", Some(&net.ns[0]), &on(0));
    let bob = User::with_env(dir.path(), "bob", Some(&net.ns[2]), &on(2));
    User::introduce(&alice, &bob);
    let bob_daemon = bob.daemon();
    {
        // They talk once over the LAN: Bob has written to her, so her devices are his
        // to know.
        let _laptop = alice.daemon();
        let v = alice.send("bob", "before the phone", 30.0).expect("sent");
        assert_eq!(v["direct"], true, "{v}");
        let v = bob.send("alice", "hello laptop", 30.0).expect("sent");
        assert_eq!(v["direct"], true, "{v}");
        let got = shown(&_laptop, Duration::from_secs(30), |t| !t.is_empty());
        assert_eq!(got, [("hello laptop".to_owned(), "in".to_owned())]);
    }

    // The phone joins her account over the LAN.
    let (link, lines, offer) = linking(
        &alice,
        &[
            "--listen",
            &format!("{}:0", net.ips[0]),
            "--no-relay",
            "--wait",
            "2m",
        ],
    );
    let code = offer["code"].as_str().expect("a code").to_owned();
    let phone = User::without_identity(dir.path(), "alice-phone", Some(&net.ns[1]), &on(1));
    phone.ok(&["device", "join", &code, "--name", "phone"]);
    assert_eq!(next_json(&lines, 30)["linked"], true);
    assert!(exits_within(link, 30).status.success());

    // Both of her devices run. The laptop tells Bob its set (which lists the phone),
    // and the phone, found on the LAN, writes its first words to Bob directly.
    let laptop = alice.daemon();
    let phone_daemon = phone.daemon();
    let started = Instant::now();
    let mut to_both = Vec::new();
    let mut at_phone = Vec::new();
    while at_phone.is_empty() && started.elapsed() < Duration::from_secs(90) {
        let text = format!("to both of her devices {}", to_both.len());
        let v = bob.send("alice", &text, 10.0).expect("sent");
        assert_eq!(v["direct"], true, "no relay: only the LAN carries it: {v}");
        to_both.push(text);
        at_phone = shown(&phone_daemon, Duration::from_secs(4), |t| !t.is_empty());
    }
    let reached_phone = started.elapsed();
    assert_eq!(
        at_phone,
        [(to_both.last().unwrap().clone(), "in".to_owned())],
        "Bob reached her phone directly, once"
    );
    // The laptop got every one of them, once each.
    let at_laptop = shown(&laptop, Duration::from_secs(30), |t| {
        t.len() >= to_both.len()
    });
    let expected: Vec<(String, String)> = to_both
        .iter()
        .map(|t| (t.clone(), "in".to_owned()))
        .collect();
    assert_eq!(at_laptop, expected);

    // The phone writes back: Bob gets it directly, and the laptop shows it as hers.
    let v = phone.send("bob", "from her phone", 30.0).expect("sent");
    assert_eq!(v["direct"], true, "{v}");
    let at_bob = shown(&bob_daemon, Duration::from_secs(30), |t| {
        t.iter().any(|(text, _)| text == "from her phone")
    });
    assert_eq!(
        at_bob.iter().filter(|(t, _)| t == "from her phone").count(),
        1,
        "{at_bob:?}"
    );
    let copy = shown(&laptop, Duration::from_secs(30), |t| !t.is_empty());
    assert_eq!(copy, [("from her phone".to_owned(), "out".to_owned())]);
    // Nothing more shows anywhere (nothing twice).
    let late = Duration::from_secs(2);
    assert!(shown(&laptop, late, |_| false).is_empty());
    assert!(shown(&phone_daemon, late, |_| false).is_empty());
    println!(
        "LAN only, three devices: Bob reached her phone directly {:.1} s after both of her \
         devices started ({} messages to her, each once on the laptop); the phone's message \
         reached Bob and her laptop directly",
        reached_phone.as_secs_f64(),
        to_both.len()
    );
}
