//! Delivery through real processes: three relays and two users, relays killed while
//! sending, all relays down then one back, a client killed mid-send, replies, and a LAN
//! with no relay at all. Each scenario prints the checker's figures.

use std::path::Path;
use std::time::{Duration, Instant};

use kkachi_tests::checker::Checker;
use kkachi_tests::netns::{self, Lan};
use kkachi_tests::procs::{LOOPBACK_ENV, RelayProc, User};
use kkachi_tests::soak;

struct World {
    _dir: tempfile::TempDir,
    relays: Vec<RelayProc>,
    alice: User,
    bob: User,
}

/// Three relays in three failure domains; alice and bob both use all three.
fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let relays: Vec<RelayProc> = (0..3)
        .map(|i| {
            let domain = format!("test/dc{i}");
            RelayProc::start(
                &dir.path().join(format!("relay{i}")),
                &["--failure-domain", &domain],
            )
        })
        .collect();
    let alice = User::new(dir.path(), "alice");
    let bob = User::new(dir.path(), "bob");
    let addrs: Vec<&str> = relays.iter().map(|r| r.addr.as_str()).collect();
    for u in [&alice, &bob] {
        let mut args = vec!["relay", "add"];
        args.extend(&addrs);
        u.ok(&args);
    }
    User::introduce(&alice, &bob);
    World {
        _dir: dir,
        relays,
        alice,
        bob,
    }
}

fn record_send(checker: &mut Checker, user: &User, to: &str, text: &str) -> bool {
    let at = Instant::now();
    match user.send(to, text, 5.0) {
        Some(v) => {
            checker.sent(v["id"].as_str().expect("id"), at);
            true
        }
        None => false,
    }
}

/// `user` sends `n` messages to bob with the CLI (forwarded to their daemon while it
/// runs), one after another, on a thread: the ids of those that succeeded.
fn send_in_background(
    user: &User,
    label: &str,
    n: usize,
) -> std::thread::JoinHandle<Vec<(String, Instant)>> {
    let (home, label) = (user.home.clone(), label.to_owned());
    std::thread::spawn(move || {
        let mut ids = Vec::new();
        for i in 0..n {
            let at = Instant::now();
            let o = std::process::Command::new(kkachi_tests::procs::bin("kkachi"))
                .arg("--home")
                .arg(&home)
                .args(["send", "bob", &format!("{label} m{i}"), "--json"])
                .args(["--timeout", "2"])
                .env("KKACHI_LAN", "0")
                .output()
                .unwrap();
            if o.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                ids.push((v["id"].as_str().unwrap().to_string(), at));
            }
        }
        ids
    })
}

fn drain(checker: &mut Checker, daemon: &kkachi_tests::procs::Daemon, wait: Duration) {
    let expected = checker.outstanding();
    let got = daemon.collect(wait, |g| g.len() >= expected);
    for (at, line) in &got {
        checker.shown(*at, line);
    }
    // Anything extra (duplicates) shows up within a short grace period.
    for (at, line) in daemon.collect(Duration::from_millis(500), |_| false) {
        checker.shown(at, &line);
    }
}

#[test]
fn relays_killed_one_by_one_while_sending() {
    let mut w = world();
    let bob_daemon = w.bob.daemon();
    let mut alice_daemon = w.alice.daemon();
    let n = if soak() { 300 } else { 45 };
    let mut checker = Checker::default();
    let mut replies = Checker::default();
    for i in 0..n {
        if i == n / 3 {
            w.relays[0].kill9();
        }
        if i == 2 * n / 3 {
            w.relays[1].kill9();
        }
        assert!(
            record_send(&mut checker, &w.alice, "bob", &format!("message {i}")),
            "send {i} failed"
        );
        if i % 9 == 0 {
            record_send(&mut replies, &w.bob, "alice", &format!("reply {i}"));
        }
    }
    drain(&mut checker, &bob_daemon, Duration::from_secs(60));
    let report = checker.report();
    println!("kill one by one (alice→bob): {report}");
    assert_eq!(report.lost, 0, "{report}");
    assert_eq!(report.duplicated, 0, "{report}");
    assert_eq!(report.reordered_without_notice, 0, "{report}");
    // The reply path works through the surviving relays too.
    let _ = &mut alice_daemon;
    let got = alice_daemon.collect(Duration::from_secs(30), |g| {
        g.len() >= replies.outstanding()
    });
    for (at, line) in &got {
        replies.shown(*at, line);
    }
    let r = replies.report();
    println!("kill one by one (bob→alice replies): {r}");
    assert_eq!((r.lost, r.duplicated), (0, 0), "{r}");
}

#[test]
fn all_relays_down_then_one_returns() {
    let mut w = world();
    let bob_daemon = w.bob.daemon();
    let _alice_daemon = w.alice.daemon();
    for r in &mut w.relays {
        r.kill9();
    }
    let mut checker = Checker::default();
    for i in 0..5 {
        // Exits 0 with "queued": durable in the outbox.
        let at = Instant::now();
        let v = w
            .alice
            .send("bob", &format!("during the outage {i}"), 0.5)
            .expect("send succeeds");
        assert_eq!(v["state"], "queued", "{v}");
        checker.sent(v["id"].as_str().unwrap(), at);
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        bob_daemon
            .collect(Duration::from_millis(300), |_| false)
            .len(),
        0
    );
    // One relay returns (same address, same data): everything arrives, no user action.
    let back = Instant::now();
    w.relays[1].restart();
    drain(&mut checker, &bob_daemon, Duration::from_secs(60));
    let report = checker.report();
    println!(
        "total outage, one relay back after {:?}: {report}",
        back.elapsed()
    );
    assert_eq!((report.lost, report.duplicated), (0, 0), "{report}");
}

#[test]
fn client_killed_mid_send_and_restarted() {
    let w = world();
    let bob_daemon = w.bob.daemon();
    let mut checker = Checker::default();
    let rounds = if soak() { 10 } else { 3 };
    for round in 0..rounds {
        let mut alice_daemon = w.alice.daemon();
        // Sends go through the daemon (forwarded); kill it at a varying point.
        let sender = send_in_background(&w.alice, &format!("r{round}"), 30);
        std::thread::sleep(Duration::from_millis(200 + 150 * round as u64));
        alice_daemon.kill9();
        let ids = sender.join().unwrap();
        for (id, at) in &ids {
            checker.sent(id, *at);
        }
    }
    // Restarted, alice's daemon delivers whatever the kills interrupted.
    let _alice = w.alice.daemon();
    drain(&mut checker, &bob_daemon, Duration::from_secs(60));
    let report = checker.report();
    println!("client kill -9 mid-send ({rounds} rounds): {report}");
    assert!(report.sent > 0, "some sends must have succeeded");
    assert_eq!((report.lost, report.duplicated), (0, 0), "{report}");
}

#[test]
fn daemons_stopped_with_sigterm_mid_traffic_exit_0_and_lose_nothing() {
    // Ctrl+C or SIGTERM: what is under way is finished and flushed, the process exits
    // 0, and a restart neither loses nor repeats anything, on either side.
    let w = world();
    let mut bob_daemon = w.bob.daemon();
    let mut checker = Checker::default();
    let rounds = if soak() { 8 } else { 3 };
    for round in 0..rounds {
        let mut alice_daemon = w.alice.daemon();
        let sender = send_in_background(&w.alice, &format!("t{round}"), 15);
        std::thread::sleep(Duration::from_millis(300 + 200 * round as u64));
        // Both stop while messages are in flight between them.
        let alice_status = alice_daemon.stop();
        let bob_status = bob_daemon.stop();
        assert!(
            alice_status.is_some_and(|s| s.success()),
            "the sender's daemon exits 0 on SIGTERM: {alice_status:?}"
        );
        assert!(
            bob_status.is_some_and(|s| s.success()),
            "the recipient's daemon exits 0 on SIGTERM: {bob_status:?}"
        );
        for (id, at) in sender.join().unwrap() {
            checker.sent(&id, at);
        }
        // What bob's daemon printed before it stopped.
        for (at, line) in bob_daemon.collect(Duration::from_secs(2), |_| false) {
            checker.shown(at, &line);
        }
        bob_daemon = w.bob.daemon();
    }
    // Started again, alice's daemon delivers what the stops interrupted.
    let _alice = w.alice.daemon();
    drain(&mut checker, &bob_daemon, Duration::from_secs(60));
    let report = checker.report();
    println!("daemons stopped with SIGTERM mid-traffic ({rounds} rounds): {report}");
    assert!(report.sent > 0, "some sends must have succeeded");
    assert_eq!((report.lost, report.duplicated), (0, 0), "{report}");
}

#[test]
fn lan_only_two_namespaces_no_relay() {
    if let Some(why) = netns::unavailable() {
        println!("SKIPPED lan_only_two_namespaces_no_relay: {why}");
        return;
    }
    let lan = Lan::create("kkt_lan_", 41).expect("namespaces");
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = lan.alice_and_bob(dir.path());
    let bob_daemon = bob.daemon();
    let _alice_daemon = alice.daemon();
    let mut checker = Checker::default();
    let started = Instant::now();
    for i in 0..5 {
        // No relays: each send waits for bob to show up on the LAN and hands over directly.
        let at = Instant::now();
        let v = alice
            .send("bob", &format!("over the LAN {i}"), 10.0)
            .expect("send succeeds");
        assert_eq!(v["direct"], true, "{v}");
        checker.sent(v["id"].as_str().unwrap(), at);
    }
    drain(&mut checker, &bob_daemon, Duration::from_secs(30));
    let report = checker.report();
    println!(
        "LAN only (beacons, direct), first send after {:?}: {report}",
        started.elapsed()
    );
    assert_eq!((report.lost, report.duplicated), (0, 0), "{report}");
}

/// Alice sends to bob every 200 ms until a send is handed over directly; returns how
/// long that took (None if it never happened within `sends`), after checking nothing
/// was lost or shown twice.
fn send_until_direct(
    alice: &User,
    bob_daemon: &kkachi_tests::procs::Daemon,
    label: &str,
    sends: usize,
) -> Option<Duration> {
    let mut checker = Checker::default();
    let started = Instant::now();
    let mut direct_after = None;
    for i in 0..sends {
        let at = Instant::now();
        let out = alice.run(&[
            "send",
            "bob",
            &format!("{label} {i}"),
            "--json",
            "--timeout",
            "5",
        ]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert!(
            out.status.success(),
            "send failed: {v} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        checker.sent(v["id"].as_str().unwrap(), at);
        if v["direct"] == true {
            direct_after = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drain(&mut checker, bob_daemon, Duration::from_secs(30));
    let report = checker.report();
    println!("{label}: direct after {direct_after:?}; {report}");
    assert_eq!((report.lost, report.duplicated), (0, 0), "{report}");
    direct_after
}

/// Alice and bob on loopback (with `env` as well), introduced, both using `relay` only.
fn pair_at(relay: &RelayProc, root: &Path, env: &[(&str, &str)]) -> (User, User) {
    let env: Vec<(&str, &str)> = LOOPBACK_ENV.iter().chain(env).copied().collect();
    let alice = User::with_env(root, "alice", None, &env);
    let bob = User::with_env(root, "bob", None, &env);
    for u in [&alice, &bob] {
        u.ok(&["relay", "add", &relay.addr]);
    }
    User::introduce(&alice, &bob);
    (alice, bob)
}

#[test]
fn contacts_off_the_lan_go_direct_through_a_relay_circuit() {
    // No LAN discovery: the only way to meet directly is through the relay (circuit relay v2),
    // then hole punching (DCUtR) upgrades to a direct connection. The first send goes
    // through the relay and starts that; the next ones should find the path open.
    let dir = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(&dir.path().join("relay"), &[]);
    // Circuits name each user to the relay, so they are opt-in.
    let (alice, bob) = pair_at(&relay, dir.path(), &[("KKACHI_CIRCUITS", "1")]);
    let bob_daemon = bob.daemon();
    let alice_daemon = alice.daemon();
    let first = send_until_direct(&alice, &bob_daemon, "fresh", 50);
    assert!(first.is_some(), "never handed over directly");

    // The relay restarts: bob's reservation died with its connection and must be asked
    // for again once the relay is back, or nobody can reach bob through it any more.
    // Alice restarts too, so her direct connection to bob is gone.
    drop(alice_daemon);
    relay.kill9();
    relay.restart();
    let _alice_daemon = alice.daemon();
    let again = send_until_direct(&alice, &bob_daemon, "after relay restart", 50);
    assert!(again.is_some(), "no direct path once the relay came back");
}

#[test]
fn relays_only_users_are_never_reached_directly() {
    // The same setting as above, where the path opens within a few sends, but both
    // users turned direct connections off: every message goes through the relay.
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&dir.path().join("relay"), &[]);
    let (alice, bob) = pair_at(&relay, dir.path(), &[("KKACHI_DIRECT", "0")]);
    let bob_daemon = bob.daemon();
    let _alice_daemon = alice.daemon();
    let direct = send_until_direct(&alice, &bob_daemon, "relays only", 15);
    assert_eq!(
        direct, None,
        "handed over directly although both turned it off"
    );
}

#[test]
fn hole_punched_contacts_drop_the_relayed_connection() {
    // Once hole punching has opened a direct connection, the circuit through the relay
    // must go: requests are spread over all of a peer's connections, so it would carry
    // half of the direct deliveries the long way, and it holds one of the relay's slots.
    use kkachi_client::net::{NetConfig, Network, Transport};
    use libp2p::identity::Keypair;

    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&dir.path().join("relay"), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let config = || NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            lan: false,
            direct: true,
            circuits: true,
        };
        let (alice, _alice_events) = Network::start(Keypair::generate_ed25519(), config()).unwrap();
        let bob_key = Keypair::generate_ed25519();
        let bob_id = bob_key.public().to_peer_id();
        let (bob, _bob_events) = Network::start(bob_key, config()).unwrap();
        let relay_addr: libp2p::Multiaddr = relay.addr.parse().unwrap();
        // Bob asks his relay for a reservation (connecting to it as himself, which
        // is why circuits are opt-in).
        let info = bob
            .request(&relay_addr, kkachi_protocol::ClientToRelay::Info)
            .await;
        assert!(info.is_ok(), "relay unreachable: {info:?}");
        // Alice knows no address of bob's: the circuit through the relay is the only way
        // to him, and hole punching over it the only way to a direct connection.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            bob.reserve_at(vec![relay_addr.clone()]);
            alice.seek_direct(bob_id, std::slice::from_ref(&relay_addr));
            if let (1.., 0) = alice.links(&bob_id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let links = alice.links(&bob_id);
        println!(
            "circuit then hole punch: links to bob (direct, relayed) {links:?} after {:?}",
            started.elapsed()
        );
        assert!(
            links.0 >= 1 && links.1 == 0,
            "want direct connections to bob and no relayed one: {links:?}"
        );
        // It stays that way: nothing opens a new circuit while a direct one is up.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let later = alice.links(&bob_id);
        assert!(later.0 >= 1 && later.1 == 0, "{later:?}");
    });
}

#[test]
fn the_daemon_says_when_a_relay_stops_answering_and_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut relays: Vec<RelayProc> = (0..2)
        .map(|i| RelayProc::start(&dir.path().join(format!("r{i}")), &[]))
        .collect();
    let alice = User::new(dir.path(), "alice");
    alice.ok(&["relay", "add", &relays[0].addr, &relays[1].addr]);
    let (mut daemon, lines) = alice.daemon_logging();
    let first = relays[0].addr.clone();
    let wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
                if line.contains(needle) && line.contains(&first) {
                    return line;
                }
                seen.push(line);
            }
        }
        panic!("no {needle:?} for {first} in: {seen:#?}");
    };
    // Give its long polls time to start, then take one relay away.
    std::thread::sleep(Duration::from_secs(1));
    relays[0].kill9();
    let down = wait_for("does not answer");
    assert!(down.contains("WARN"), "{down}");
    relays[0].restart();
    wait_for("answers again");
    let _ = daemon.kill();
    let _ = daemon.wait();
}

#[test]
fn a_send_taken_by_a_running_daemon_says_that_one_delivers_it() {
    let dir = tempfile::tempdir().unwrap();
    let alice = User::new(dir.path(), "alice");
    let bob = User::new(dir.path(), "bob");
    // Bob's one relay: an address nobody listens on.
    let dead = format!(
        "/ip4/127.0.0.1/tcp/{}/p2p/12D3KooWCLXbNhRE2Ev1vJ79en18cz4auE64p6NGYJHPxPCNkMe2",
        kkachi_tests::procs::free_port()
    );
    bob.ok(&["relay", "add", &dead]);
    alice.ok(&["contact", "add", &bob.invite()]);
    let _daemon = alice.daemon();
    let out = alice.ok(&["send", "bob", "are you there?", "--timeout", "0.5"]);
    assert!(out.contains("the running kkachi delivers it"), "{out}");
    assert!(!out.contains("kkachi daemon"), "{out}");
}
