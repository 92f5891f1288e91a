//! `kkachi drill` against the real binaries: all clear on a healthy setup, and on a
//! broken one (a relay down, every relay in one failure domain, a contact none of whose
//! relays answers) each problem named with its fix and exit status 1. (The clock-skew
//! finding is decided by the same code from the relay's clock in its info; its rule is
//! tested in the client's unit tests, as no test may move a machine's clock.) And the
//! game day: each relay taken out of use in turn, messages still flowing through the
//! others, and what would stop them named.

use std::time::Instant;

use kkachi_tests::procs::{RelayProc, User};

fn add_relays(user: &User, relays: &[&RelayProc]) {
    let mut args = vec!["relay", "add"];
    args.extend(relays.iter().map(|r| r.addr.as_str()));
    user.ok(&args);
}

fn drill(user: &User) -> (i32, serde_json::Value, f64) {
    drill_with(user, &[])
}

fn drill_with(user: &User, more: &[&str]) -> (i32, serde_json::Value, f64) {
    let started = Instant::now();
    let mut args = vec!["drill", "--json"];
    args.extend(more);
    let out = user.run(&args);
    let took = started.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "drill --json printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v, took)
}

fn findings(v: &serde_json::Value) -> Vec<String> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| format!("{} | fix: {}", f["what"], f["fix"]))
        .collect()
}

/// A relay in failure domain `domain`, its data in `dir/name`.
fn start(dir: &std::path::Path, name: &str, domain: &str) -> RelayProc {
    RelayProc::start(&dir.join(name), &["--failure-domain", domain])
}

/// Three relays in three failure domains, and alice and bob using all three,
/// introduced.
fn three_domains(dir: &std::path::Path) -> ([RelayProc; 3], User, User) {
    let relays = [
        start(dir, "r0", "test/dc0"),
        start(dir, "r1", "test/dc1"),
        start(dir, "r2", "test/dc2"),
    ];
    let alice = User::new(dir, "alice");
    let bob = User::new(dir, "bob");
    add_relays(&alice, &relays.iter().collect::<Vec<_>>());
    add_relays(&bob, &relays.iter().collect::<Vec<_>>());
    User::introduce(&alice, &bob);
    (relays, alice, bob)
}

#[test]
fn drill_is_all_clear_on_a_healthy_setup_and_names_each_problem_with_its_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relays, alice, bob) = three_domains(dir.path());

    // Healthy: every relay loops a test envelope back, in three failure domains, with
    // the same clock; bob's relays answer; nothing waits.
    let (code, v, took) = drill(&alice);
    assert_eq!(findings(&v), Vec::<String>::new(), "{v}");
    assert_eq!((code, v["clear"].as_bool()), (0, Some(true)), "{v}");
    for r in v["relays"].as_array().unwrap() {
        assert_eq!(r["up"], true, "{r}");
        assert!(r["loop_ms"].as_u64().is_some(), "{r}");
        assert!(r["skew_secs"].as_i64().unwrap().abs() <= 2, "{r}");
    }
    assert_eq!(v["contacts"][0]["reachable"], 3, "{v}");
    assert!(took < 30.0, "the drill took {took:.1} s");
    println!("healthy: all clear in {took:.1} s");
    // The test envelopes were taken away again: nothing of them reaches bob or alice.
    let text = String::from_utf8_lossy(&alice.run(&["drill"]).stdout).into_owned();
    assert!(text.contains("all clear"), "{text}");

    // One relay down: named, with what to do, and exit status 1.
    relays[0].stop();
    let (code, v, took) = drill(&alice);
    let f = findings(&v);
    assert_eq!(code, 1, "{v}");
    assert_eq!(f.len(), 1, "{f:#?}");
    assert!(
        f[0].contains(&format!("relay {} is down", relays[0].addr)),
        "{f:#?}"
    );
    assert!(f[0].contains("kkachi relay remove"), "{f:#?}");
    println!(
        "one relay down: {} finding in {took:.1} s: {}",
        f.len(),
        f[0]
    );
    relays[0].restart();

    // Carol's two relays share a failure domain; and none of bob's relays answers her.
    let same = [
        start(dir.path(), "s0", "test/same"),
        start(dir.path(), "s1", "test/same"),
    ];
    let carol = User::new(dir.path(), "carol");
    add_relays(&carol, &same.iter().collect::<Vec<_>>());
    User::introduce(&carol, &bob);
    for r in &mut relays {
        r.stop();
    }
    let (code, v, _) = drill(&carol);
    let f = findings(&v);
    assert_eq!(code, 1, "{v}");
    assert!(
        f.iter()
            .any(|f| f.contains("share one failure domain (test/same)")
                && f.contains("another provider or region")),
        "{f:#?}"
    );
    assert!(
        f.iter()
            .any(|f| f.contains("none of bob's 3 relays answers you")),
        "{f:#?}"
    );
    assert_eq!(f.len(), 2, "{f:#?}");
    println!("one failure domain, a contact unreachable: {f:#?}");

    // The human form says the same, with each fix on its own line.
    let out = carol.run(&["drill"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FINDING: all your relays share one failure domain"),
        "{text}"
    );
    assert!(text.contains("  fix: add a relay run elsewhere"), "{text}");
}

#[test]
fn the_game_day_takes_each_relay_out_in_turn_and_names_what_would_stop_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relays, alice, _bob) = three_domains(dir.path());

    // Three relays: with any one out, the other two carry the test message.
    let (code, v, took) = drill_with(&alice, &["--game-day"]);
    assert_eq!(findings(&v), Vec::<String>::new(), "{v}");
    assert_eq!(code, 0, "{v}");
    let rounds = v["game_day"].as_array().unwrap();
    assert_eq!(rounds.len(), 3, "{v}");
    for (round, relay) in rounds.iter().zip(&relays) {
        assert_eq!(round["out"], relay.addr.as_str(), "{round}");
        assert_eq!(round["flowed"], true, "{round}");
        let carried: Vec<&str> = round["carried_by"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(carried.len(), 2, "{round}");
        assert!(!carried.contains(&relay.addr.as_str()), "{round}");
        assert!(round["first_ms"].as_u64().is_some(), "{round}");
        assert_eq!(round["stranded"], serde_json::json!([]), "{round}");
    }
    assert!(took < 30.0, "the game day took {took:.1} s");
    println!("game day, 3 relays: all clear in {took:.1} s");

    // Dan uses r0 and r1; Erin only r1. Taking r1 out cuts Erin off.
    let dan = User::new(dir.path(), "dan");
    let erin = User::new(dir.path(), "erin");
    add_relays(&dan, &[&relays[0], &relays[1]]);
    add_relays(&erin, &[&relays[1]]);
    User::introduce(&dan, &erin);
    let (code, v, _) = drill_with(&dan, &["--game-day"]);
    let f = findings(&v);
    assert_eq!(code, 1, "{v}");
    assert_eq!(f.len(), 1, "{f:#?}");
    assert!(
        f[0].contains(&format!(
            "with relay {} out of use, none of erin's relays answers you",
            relays[1].addr
        )),
        "{f:#?}"
    );

    // With r1 down, r0 is all Dan has left: taking it out stops everything.
    relays[1].stop();
    let out = dan.run(&["drill", "--game-day"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "FINDING: game day: with relay {} out of use, none of your other relays carried a test message",
            relays[0].addr
        )),
        "{text}"
    );
    assert!(
        text.contains("1 relay(s) already down were not taken out again"),
        "{text}"
    );
    println!("game day, one relay left: {text}");
}
