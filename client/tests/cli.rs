//! The command line as a person meets it: clear errors for the usual mistakes, and the
//! documented outputs. Runs the real `kkachi` binary against temporary homes.

use std::path::Path;
use std::process::{Command, Output};

/// The `kkachi` binary on `home`, offline from the LAN, logging only errors.
fn kkachi_command(home: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kkachi"));
    command
        .arg("--home")
        .arg(home)
        .args(args)
        .env("KKACHI_MDNS", "0")
        .env("KKACHI_LISTEN", "/ip4/127.0.0.1/tcp/0")
        .env("RUST_LOG", "error");
    command
}

fn kkachi(home: &Path, args: &[&str]) -> Output {
    kkachi_command(home, args).output().expect("kkachi runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "failed: {}\n{}", stdout(&o), stderr(&o));
    stdout(&o)
}

fn fails_with(o: Output, needle: &str) {
    assert!(!o.status.success(), "should fail: {}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains(needle), "stderr {err:?} lacks {needle:?}");
}

#[test]
fn commands_before_init_say_how_to_start() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["invite"][..],
        &["contact", "list"],
        &["send", "bob", "hi"],
        &["history", "bob"],
    ] {
        fails_with(kkachi(dir.path(), args), "kkachi init --name");
    }
}

#[test]
fn init_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = ok(kkachi(dir.path(), &["init", "--name", "Minji"]));
    assert!(first.contains("Created identity Minji"));
    fails_with(
        kkachi(dir.path(), &["init", "--name", "Other"]),
        "already exists",
    );
    fails_with(
        kkachi(
            tempfile::tempdir().unwrap().path(),
            &["init", "--name", " "],
        ),
        "name",
    );
}

#[test]
fn invites_round_trip_and_bad_codes_are_explained() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    ok(kkachi(a.path(), &["init", "--name", "Minji"]));
    ok(kkachi(b.path(), &["init", "--name", "Hyun"]));
    let invite = kkachi(a.path(), &["invite"]);
    assert!(
        stderr(&invite).contains("no relays"),
        "warns about missing relays"
    );
    let code = ok(invite).trim().to_string();
    assert!(code.starts_with("kk1") && !code.contains('\n'));
    let added = ok(kkachi(b.path(), &["contact", "add", &code]));
    assert!(added.contains("added contact Minji"), "{added}");
    let list = ok(kkachi(b.path(), &["contact", "list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[0]["name"], "Minji");

    // A typo, a truncated code, something else entirely, your own code.
    let mut typo = code.clone();
    let last = typo.pop().unwrap();
    typo.push(if last == 'a' { 'b' } else { 'a' });
    fails_with(kkachi(b.path(), &["contact", "add", &typo]), "mistyped");
    fails_with(
        kkachi(b.path(), &["contact", "add", &code[..code.len() / 2]]),
        "invite code",
    );
    fails_with(
        kkachi(b.path(), &["contact", "add", "hello"]),
        "not a kkachi invite code",
    );
    let own = ok(kkachi(b.path(), &["invite"])).trim().to_string();
    fails_with(
        kkachi(b.path(), &["contact", "add", &own]),
        "your own invite code",
    );

    let qr = ok(kkachi(a.path(), &["invite", "--qr"]));
    assert!(qr.lines().count() > 20, "a QR code follows the code");
}

#[test]
fn unknown_contact_and_bad_relay_addresses() {
    let a = tempfile::tempdir().unwrap();
    ok(kkachi(a.path(), &["init", "--name", "Minji"]));
    fails_with(
        kkachi(a.path(), &["send", "nobody", "hi"]),
        "no contact or group named",
    );
    fails_with(
        kkachi(a.path(), &["relay", "add", "not-an-address"]),
        "not a multiaddr",
    );
    fails_with(
        kkachi(a.path(), &["relay", "add", "/ip4/127.0.0.1/tcp/4040"]),
        "/p2p/",
    );
    fails_with(
        kkachi(a.path(), &["relay", "remove", "/ip4/127.0.0.1/tcp/1"]),
        "not one of your relays",
    );
}

/// Minji's and Hyun's homes: Minji has Hyun as a contact, and Hyun's one relay is an
/// address nobody listens on, so what Minji sends stays queued.
fn minji_with_hyun_behind_a_dead_relay() -> (tempfile::TempDir, tempfile::TempDir) {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    ok(kkachi(a.path(), &["init", "--name", "Minji"]));
    ok(kkachi(b.path(), &["init", "--name", "Hyun"]));
    // A relay address nobody listens on.
    let peer = "12D3KooWCLXbNhRE2Ev1vJ79en18cz4auE64p6NGYJHPxPCNkMe2";
    ok(kkachi(
        b.path(),
        &["relay", "add", &format!("/ip4/127.0.0.1/tcp/9/p2p/{peer}")],
    ));
    let code = ok(kkachi(b.path(), &["invite"])).trim().to_string();
    ok(kkachi(a.path(), &["contact", "add", &code]));
    (a, b)
}

#[test]
fn send_to_unreachable_relays_is_queued_not_lost() {
    let (a, b) = minji_with_hyun_behind_a_dead_relay();
    let sent = kkachi(
        a.path(),
        &["send", "Hyun", "are you there?", "--timeout", "1"],
    );
    let text = ok(sent);
    assert!(text.contains("queued"), "{text}");
    let json = ok(kkachi(
        a.path(),
        &["send", "hyun", "again", "--timeout", "0.5", "--json"],
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["state"], "queued");
    assert_eq!(v["relayed"], 0);
    let history = ok(kkachi(a.path(), &["history", "Hyun", "--json"]));
    let h: serde_json::Value = serde_json::from_str(&history).unwrap();
    assert_eq!(h.as_array().unwrap().len(), 2);
    for m in h.as_array().unwrap() {
        assert_eq!(m["direction"], "out");
        assert_eq!(m["state"], "queued");
        assert!(m["id"].as_str().unwrap().len() == 32 && m["sent_at"].as_u64().is_some());
    }
    let plain = ok(kkachi(a.path(), &["history", "Hyun"]));
    let lines: Vec<&str> = plain.lines().collect();
    assert_eq!(lines.len(), 2, "{plain}");
    // "2026-11-22 14:03  me → Hyun: are you there?  [queued]"
    let (when, rest) = lines[0].split_at(16);
    assert!(
        when.as_bytes()[4] == b'-' && when.as_bytes()[10] == b' ' && when.as_bytes()[13] == b':',
        "{plain}"
    );
    assert_eq!(rest, "  me → Hyun: are you there?  [queued]");
    assert!(
        lines[1].ends_with("  me → Hyun: again  [queued]"),
        "{plain}"
    );
    let last = ok(kkachi(a.path(), &["history", "Hyun", "--last", "1"]));
    assert_eq!(last.trim_end(), lines[1]);
    let list = kkachi(b.path(), &["relay", "list"]);
    assert!(stdout(&list).contains("down"), "{}", stdout(&list));
    assert!(stderr(&list).contains("single relay"), "{}", stderr(&list));
}

/// `kkachi` with `input` on its standard input.
fn kkachi_with_input(home: &Path, args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = kkachi_command(home, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kkachi runs");
    let mut stdin = child.stdin.take().unwrap();
    // A refused message may leave the rest unread: a broken pipe is no failure here.
    let _ = stdin.write_all(input);
    drop(stdin);
    child.wait_with_output().expect("kkachi finishes")
}

#[test]
fn send_dash_reads_the_message_from_standard_input() {
    let (a, _b) = minji_with_hyun_behind_a_dead_relay();
    let send = ["send", "Hyun", "-", "--timeout", "0.3"];
    let sent = ok(kkachi_with_input(
        a.path(),
        &send,
        "two lines,\nsecond 까치\n".as_bytes(),
    ));
    assert!(sent.contains("queued"), "{sent}");
    fails_with(
        kkachi_with_input(a.path(), &send, b"\n"),
        "no message on standard input",
    );
    fails_with(
        kkachi_with_input(a.path(), &send, b"\xff\xfe bad"),
        "not UTF-8",
    );
    let long = vec![b'a'; kkachi_protocol::content::MAX_TEXT_LEN + 1];
    fails_with(kkachi_with_input(a.path(), &send, &long), "longer than");
    let history = ok(kkachi(a.path(), &["history", "Hyun", "--json"]));
    let h: serde_json::Value = serde_json::from_str(&history).unwrap();
    let texts: Vec<&str> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["two lines,\nsecond 까치"]);
}

#[test]
fn words_need_no_quotes_and_a_name_may_be_started() {
    let (a, _b) = minji_with_hyun_behind_a_dead_relay();
    let sent = ok(kkachi(
        a.path(),
        &[
            "send",
            "hy",
            "are",
            "you",
            "there?",
            "--timeout",
            "0.3",
            "--json",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&sent).unwrap();
    assert_eq!(v["state"], "queued", "{v}");
    let history = ok(kkachi(a.path(), &["history", "HY", "--json"]));
    let h: serde_json::Value = serde_json::from_str(&history).unwrap();
    assert_eq!(h[0]["text"], "are you there?");
    // A start that fits nobody is still an error that says what to do.
    fails_with(
        kkachi(a.path(), &["history", "x"]),
        "no contact or group named",
    );
}

#[test]
fn the_version_the_missing_home_the_missing_terminal_and_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let version = ok(kkachi(dir.path(), &["--version"]));
    assert!(version.starts_with("kkachi "), "{version}");
    // A mistyped home: named, and nothing is created there.
    let typo = dir.path().join("kkachi-typo");
    fails_with(
        kkachi(&typo, &["send", "bob", "hi"]),
        &typo.display().to_string(),
    );
    assert!(!typo.exists(), "a mistyped --home was created");
    // The UI without a terminal: a sentence, not a panic.
    let o = kkachi_command(dir.path(), &[])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("needs a terminal"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Under --json, errors are JSON too.
    let o = kkachi(&typo, &["invite", "--json"]);
    assert!(!o.status.success());
    let v: serde_json::Value = serde_json::from_str(stderr(&o).trim()).unwrap();
    assert!(v["error"].as_str().unwrap().contains("kkachi init"), "{v}");
}

#[test]
fn words_after_a_name_that_continue_another_name_are_refused_not_guessed() {
    let (a, _b) = minji_with_hyun_behind_a_dead_relay();
    let c = tempfile::tempdir().unwrap();
    ok(kkachi(c.path(), &["init", "--name", "Hyun Woo"]));
    let code = ok(kkachi(c.path(), &["invite"])).trim().to_string();
    ok(kkachi(a.path(), &["contact", "add", &code]));
    fails_with(
        kkachi(a.path(), &["send", "Hyun", "Woo", "hi", "--timeout", "0.2"]),
        "did you mean",
    );
    // Quoted, it is clear.
    ok(kkachi(
        a.path(),
        &["send", "Hyun Woo", "one", "--timeout", "0.2"],
    ));
    // A full name unquoted whose first word names nobody else is the name, not the
    // message.
    let d = tempfile::tempdir().unwrap();
    ok(kkachi(d.path(), &["init", "--name", "Soo Ah"]));
    let code = ok(kkachi(d.path(), &["invite"])).trim().to_string();
    ok(kkachi(a.path(), &["contact", "add", &code]));
    ok(kkachi(
        a.path(),
        &["send", "soo", "ah", "two", "--timeout", "0.2"],
    ));
    let texts = |who: &str| -> Vec<String> {
        let history = ok(kkachi(a.path(), &["history", who, "--json"]));
        let h: serde_json::Value = serde_json::from_str(&history).unwrap();
        h.as_array()
            .unwrap()
            .iter()
            .map(|m| m["text"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(texts("Hyun Woo"), ["one"]);
    assert_eq!(texts("Soo Ah"), ["two"]);
    // Hyun (exactly) still gets what follows his name.
    ok(kkachi(
        a.path(),
        &["send", "Hyun", "hi", "there", "--timeout", "0.2"],
    ));
    let history = ok(kkachi(a.path(), &["history", "Hyun", "--json"]));
    assert!(history.contains("\"hi there\""), "{history}");
}

#[test]
fn a_code_copied_from_wrapped_lines_is_taken_whole() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    ok(kkachi(a.path(), &["init", "--name", "Minji"]));
    ok(kkachi(b.path(), &["init", "--name", "Hyun"]));
    let code = ok(kkachi(b.path(), &["invite"])).trim().to_string();
    // As a terminal at 40 columns wraps it: line breaks inside one argument...
    let wrapped: String = code
        .as_bytes()
        .chunks(40)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    ok(kkachi(a.path(), &["contact", "add", &wrapped]));
    // ...or pasted unquoted, so the shell splits it into words.
    let c = tempfile::tempdir().unwrap();
    ok(kkachi(c.path(), &["init", "--name", "Soo"]));
    let mut args = vec!["contact", "add"];
    args.extend(wrapped.split('\n'));
    ok(kkachi(c.path(), &args));
    let list = ok(kkachi(c.path(), &["contact", "list"]));
    assert!(list.contains("Hyun"), "{list}");
}
