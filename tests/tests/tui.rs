//! The terminal UI end to end: the real `kkachi tui` inside tmux, against real relays.
//! It must show an incoming message, send one with Enter, and show `relays 1/2` after
//! one of its two relays is killed; compose several lines and take a pasted text whole;
//! reply, react and search; and in the demo, keep talking directly with every relay
//! down until the direct path is cut, when messages wait for a relay to return.

use std::process::Command;
use std::time::{Duration, Instant};

use kkachi_tests::procs::{RelayProc, User, bin};

struct Tmux {
    session: String,
}

impl Tmux {
    fn start(session: &str, command: &str) -> Self {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", session])
            .output();
        let ok = Command::new("tmux")
            .args([
                "-u",
                "new-session",
                "-d",
                "-s",
                session,
                "-x",
                "100",
                "-y",
                "30",
                command,
            ])
            .status()
            .expect("tmux runs");
        assert!(ok.success(), "tmux session did not start");
        Self {
            session: session.to_string(),
        }
    }

    fn screen(&self) -> String {
        let o = Command::new("tmux")
            .args(["capture-pane", "-t", &self.session, "-p"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Pastes `text` as a terminal does (bracketed, when the program asked for it).
    fn paste(&self, text: &str) {
        let buffer = format!("{}-paste", self.session);
        assert!(
            Command::new("tmux")
                .args(["set-buffer", "-b", &buffer, text])
                .status()
                .unwrap()
                .success()
        );
        assert!(
            Command::new("tmux")
                .args([
                    "paste-buffer",
                    "-p",
                    "-d",
                    "-b",
                    &buffer,
                    "-t",
                    &self.session
                ])
                .status()
                .unwrap()
                .success()
        );
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", self.session.as_str()];
        args.extend(keys);
        assert!(Command::new("tmux").args(&args).status().unwrap().success());
    }

    /// Waits until the screen contains `needle`.
    fn wait_for(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let screen = self.screen();
            if screen.contains(needle) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "screen never showed {needle:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // A program told to quit (Ctrl+C) gets the time to clean up after itself.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && Command::new("tmux")
                .args(["has-session", "-t", &self.session])
                .output()
                .is_ok_and(|o| o.status.success())
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.session])
            .output();
    }
}

#[test]
fn tui_shows_sends_and_notices_a_dead_relay() {
    if Command::new("tmux").arg("-V").output().is_err() {
        println!("SKIPPED tui_shows_sends_and_notices_a_dead_relay: tmux is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut relays: Vec<RelayProc> = (0..2)
        .map(|i| RelayProc::start(&dir.path().join(format!("r{i}")), &[]))
        .collect();
    let alice = User::new(dir.path(), "alice");
    let bob = User::new(dir.path(), "bob");
    for u in [&alice, &bob] {
        u.ok(&["relay", "add", &relays[0].addr, &relays[1].addr]);
    }
    User::introduce(&alice, &bob);
    bob.ok(&["send", "alice", "hello from the shell"]);

    let command = format!(
        "KKACHI_LAN=0 KKACHI_LISTEN=/ip4/127.0.0.1/tcp/0 {} --home {} tui",
        bin("kkachi").display(),
        alice.home.display()
    );
    let tmux = Tmux::start(&format!("kkachi-tui-{}", std::process::id()), &command);
    tmux.wait_for("hello from the shell", Duration::from_secs(20));
    tmux.wait_for("relays 2/2", Duration::from_secs(20));

    // Enter sends; bob receives it.
    let bob_daemon = bob.daemon();
    tmux.keys(&["hi bob, typed in the UI", "Enter"]);
    let got = bob_daemon.collect(Duration::from_secs(20), |g| !g.is_empty());
    assert_eq!(
        got.first().map(|(_, v)| v["text"].clone()),
        Some("hi bob, typed in the UI".into())
    );
    // Bob's receipt turns the glyph into "delivered".
    tmux.wait_for("✓✓", Duration::from_secs(20));

    relays[0].kill9();
    let screen = tmux.wait_for("relays 1/2", Duration::from_secs(10));
    assert!(!screen.contains("OFFLINE"));

    // New messages keep arriving through the surviving relay.
    drop(bob_daemon);
    bob.ok(&["send", "alice", "still here after the relay died"]);
    tmux.wait_for("still here after the relay died", Duration::from_secs(20));

    // The invite panel shows the code whole at this size; its lines, joined, are the
    // code (what copying them from the terminal gives).
    let code = alice.invite();
    tmux.keys(&["/invite", "Enter"]);
    let screen = tmux.wait_for("Your invite code", Duration::from_secs(10));
    let shown: String = screen
        .lines()
        .map(|l| l.trim().trim_matches('│').trim())
        .filter(|l| !l.is_empty() && code.contains(*l))
        .collect();
    assert_eq!(shown, code, "{screen}");
    // And in a file, to hand over some other way.
    let saved = std::fs::read_to_string(alice.home.join("invite.txt")).unwrap();
    assert_eq!(saved.trim(), code);
    tmux.keys(&["Escape"]);
    tmux.keys(&["C-c"]);
}

/// Whether tmux is here to drive the UI; says why a test is skipped if not.
fn have_tmux(test: &str) -> bool {
    let here = Command::new("tmux").arg("-V").output().is_ok();
    if !here {
        println!("SKIPPED {test}: tmux is not installed");
    }
    here
}

#[test]
fn tui_composes_lines_takes_pastes_whole_replies_reacts_and_searches() {
    if !have_tmux("tui_composes_lines_takes_pastes_whole_replies_reacts_and_searches") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let relays: Vec<RelayProc> = (0..2)
        .map(|i| RelayProc::start(&dir.path().join(format!("r{i}")), &[]))
        .collect();
    let alice = User::new(dir.path(), "alice");
    let bob = User::new(dir.path(), "bob");
    for u in [&alice, &bob] {
        u.ok(&["relay", "add", &relays[0].addr, &relays[1].addr]);
    }
    User::introduce(&alice, &bob);
    let question = bob.send("alice", "where do we meet?", 5.0).unwrap();
    let question_id = question["id"].as_str().unwrap().to_string();

    let command = format!(
        "KKACHI_LAN=0 KKACHI_LISTEN=/ip4/127.0.0.1/tcp/0 {} --home {} tui",
        bin("kkachi").display(),
        alice.home.display()
    );
    let tmux = Tmux::start(&format!("kkachi-tui2-{}", std::process::id()), &command);
    tmux.wait_for("where do we meet?", Duration::from_secs(20));
    tmux.wait_for("relays 2/2", Duration::from_secs(20));
    let bob_daemon = bob.daemon();
    // What Bob's daemon prints next.
    let next = || {
        let got = bob_daemon.collect(Duration::from_secs(20), |g| !g.is_empty());
        assert!(!got.is_empty(), "bob's daemon printed nothing");
        got.into_iter().next().unwrap().1
    };

    // Alt+Enter starts a new line; Enter sends them together.
    tmux.keys(&["line one", "M-Enter", "line two", "Enter"]);
    assert_eq!(next()["text"], "line one\nline two");
    // A pasted text keeps its line breaks and is not sent by them.
    tmux.paste("pasted first\npasted second");
    tmux.wait_for("pasted second", Duration::from_secs(5));
    tmux.keys(&["Enter"]);
    assert_eq!(next()["text"], "pasted first\npasted second");

    // A reply to Bob's question names it, at Bob's too.
    tmux.keys(&["-l", "/reply at the north gate"]);
    tmux.keys(&["Enter"]);
    let reply = next();
    assert_eq!(reply["text"], "at the north gate");
    assert_eq!(reply["reply_to"]["id"], question_id.as_str());
    assert_eq!(
        reply["reply_to"]["ours"], true,
        "at Bob's, it answers his own"
    );
    tmux.wait_for("↪ bob: where do we meet?", Duration::from_secs(5));

    // A reaction to it reaches Bob as a change of that message.
    tmux.keys(&["-l", "/react 👍"]);
    tmux.keys(&["Enter"]);
    let reaction = next();
    assert_eq!(reaction["event"], "reaction");
    assert_eq!(reaction["id"], question_id.as_str());
    assert_eq!(reaction["reactions"]["theirs"], "👍");
    tmux.wait_for("👍 me", Duration::from_secs(5));
    // Bob's reaction to Alice's last message shows at hers.
    bob.ok(&["react", "alice", "last", "❤"]);
    tmux.wait_for("❤ bob", Duration::from_secs(20));

    // Search finds the reply.
    tmux.keys(&["/search north gate", "Enter"]);
    let screen = tmux.wait_for("Search: north gate", Duration::from_secs(10));
    assert!(screen.contains("at the north gate"), "{screen}");
    tmux.keys(&["Escape"]);
    tmux.keys(&["C-c"]);
}

#[test]
fn demo_talks_directly_with_every_relay_down_until_the_direct_path_is_cut() {
    if !have_tmux("demo_talks_directly_with_every_relay_down_until_the_direct_path_is_cut") {
        return;
    }
    let command = format!("{} demo", bin("kkachi").display());
    let tmux = Tmux::start(&format!("kkachi-demo-{}", std::process::id()), &command);
    tmux.wait_for("Write me something", Duration::from_secs(20));
    tmux.wait_for("relays 3/3", Duration::from_secs(20));
    tmux.wait_for("direct 1", Duration::from_secs(20));
    tmux.keys(&["F2"]);
    tmux.wait_for("relays 2/3", Duration::from_secs(10));
    tmux.keys(&["F3"]);
    tmux.wait_for("relays 1/3", Duration::from_secs(10));
    tmux.keys(&["F4"]);
    let screen = tmux.wait_for("relays 0/3", Duration::from_secs(10));
    assert!(screen.contains("NO RELAY"), "{screen}");
    assert!(!screen.contains("OFFLINE"), "{screen}");
    // Straight to the other user: delivered, and answered.
    tmux.keys(&["direct only", "Enter"]);
    tmux.wait_for("me: direct only ✓✓", Duration::from_secs(10));
    tmux.wait_for(
        "I got \"direct only\" directly: no relay is up",
        Duration::from_secs(10),
    );
    // F5 cuts the direct path: nothing is reachable, and what is written waits.
    tmux.keys(&["F5"]);
    tmux.wait_for("OFFLINE", Duration::from_secs(10));
    tmux.keys(&["cut off", "Enter"]);
    tmux.wait_for("me: cut off ◷ queued", Duration::from_secs(10));
    // A relay back: it goes, and the answer comes, at once.
    tmux.keys(&["F3"]);
    tmux.wait_for("relays 1/3", Duration::from_secs(10));
    tmux.wait_for("me: cut off ✓✓", Duration::from_secs(10));
    tmux.wait_for(
        "I got \"cut off\" through the relays",
        Duration::from_secs(10),
    );
    tmux.keys(&["C-c"]);
}

/// Plays a terminal for `kkachi tui` in a pseudo-terminal: answers its questions as a
/// terminal with kitty's graphics does (`kitty`) or as one without graphics (`plain`),
/// reads what it draws until `until` shows or 20 s pass, quits it with Ctrl+C, and
/// prints what it saw as JSON. `png PATH` writes a 120×80 picture instead: red above,
/// blue below.
const TERMINAL: &str = r#"
import json, os, pty, select, struct, sys, time, zlib, fcntl, termios
if sys.argv[1] == "png":
    w, h = 120, 80
    rows = b"".join(b"\0" + (b"\xdc\x1e\x1e" if y < h // 2 else b"\x1e\x1e\xdc") * w for y in range(h))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    open(sys.argv[2], "wb").write(png)
    sys.exit(0)
kind, until, argv = sys.argv[1], sys.argv[2].encode(), sys.argv[3:]
pid, fd = pty.fork()
if pid == 0:
    fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 600, 1000))
    os.execv(argv[0], argv)
seen, answered, deadline, asked = b"", 0, time.time() + 20, False
answers = [(b"\x1b_Gi=31,", b"\x1b_Gi=31;OK\x1b\\" if kind == "kitty" else b""),
           (b"\x1b[c", b"\x1b[?62;22c"), (b"\x1b[16t", b"\x1b[6;20;10t"), (b"\x1b[5n", b"\x1b[0n")]
while time.time() < deadline:
    r, _, _ = select.select([fd], [], [], 0.1)
    if r:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        seen += data
    for i, (question, answer) in enumerate(answers):
        if not answered & (1 << i) and question in seen:
            answered |= 1 << i
            asked = asked or i == 0
            if answer:
                os.write(fd, answer)
    if until in seen:
        break
shown = until in seen
# Then what it draws in the next two seconds (a frame with a picture comes in parts).
settled = time.time() + 2
while shown and time.time() < settled:
    try:
        if select.select([fd], [], [], 0.1)[0]:
            seen += os.read(fd, 1 << 20)
    except OSError:
        break
os.write(fd, b"\x03")
code, quit_at, interrupts = None, time.time(), 1
while time.time() - quit_at < 20:
    if interrupts == 1 and time.time() - quit_at > 5:
        # Not gone after 5 s: once more (said in the output).
        try:
            os.write(fd, b"\x03")
        except OSError:
            pass
        interrupts += 1
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        code = os.waitstatus_to_exitcode(status)
        break
    try:
        if select.select([fd], [], [], 0.1)[0]:
            os.read(fd, 65536)
    except OSError:
        # Its side of the terminal is closed: it is exiting.
        time.sleep(0.05)
if code is None:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
text = seen.decode("utf-8", "replace")
print(json.dumps({
    "asked": asked,
    "shown": shown,
    "transmits": text.count("\x1b_G") - text.count("\x1b_Gi=31,"),
    "placeholders": text.count("\U0010EEEE"),
    "half_blocks": text.count("\u2580"),
    "exit": code,
    "exit_s": round(time.time() - quit_at, 2),
    "interrupts": interrupts,
    "screen": "".join(c for c in text[-6000:] if c.isprintable() and c not in "\x1b\U0010EEEE"),
}))
"#;

#[test]
fn a_photo_is_drawn_with_the_terminals_graphics_or_half_blocks_without_them() {
    let test = "a_photo_is_drawn_with_the_terminals_graphics_or_half_blocks_without_them";
    if Command::new("python3").arg("-V").output().is_err() {
        println!("SKIPPED {test}: python3 is not installed to play the terminal");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&dir.path().join("r0"), &[]);
    let alice = User::new(dir.path(), "alice");
    let bob = User::new(dir.path(), "bob");
    for u in [&alice, &bob] {
        u.ok(&["relay", "add", &relay.addr]);
    }
    User::introduce(&alice, &bob);
    // Alice grants bob at her relay (done when online), so his puts are taken.
    alice.ok(&["sync", "--timeout", "10"]);
    let photo = dir.path().join("flooded-street.png");
    let made = Command::new("python3")
        .args(["-c", TERMINAL, "png", photo.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(made.success());
    bob.ok(&["send", "alice", "--file", photo.to_str().unwrap()]);
    alice.ok(&["sync", "--timeout", "10"]);
    let history = alice.ok(&["history", "bob", "--json"]);
    assert!(history.contains("flooded-street.png"), "{history}");
    let kkachi = bin("kkachi");
    let play = |kind: &str| -> serde_json::Value {
        let out = Command::new("python3")
            .args(["-c", TERMINAL, kind, "flooded-street.png"])
            .arg(&kkachi)
            .args(["--home", alice.home.to_str().unwrap(), "tui"])
            .env("KKACHI_LAN", "0")
            .env("KKACHI_LISTEN", "/ip4/127.0.0.1/tcp/0")
            .env_remove("TMUX")
            .env_remove("KKACHI_GRAPHICS")
            .env_remove("KITTY_WINDOW_ID")
            .env_remove("TERM_PROGRAM")
            .env_remove("LC_TERMINAL")
            .env(
                "TERM",
                if kind == "kitty" {
                    "xterm-kitty"
                } else {
                    "xterm-256color"
                },
            )
            .output()
            .unwrap();
        let seen = String::from_utf8_lossy(&out.stdout);
        println!("{kind} terminal: {}", seen.trim());
        serde_json::from_str(seen.trim())
            .unwrap_or_else(|e| panic!("{e}: {seen}\n{}", String::from_utf8_lossy(&out.stderr)))
    };
    // A terminal with kitty's graphics is asked, and the photo goes to it as an image
    // placed by kitty's placeholders, with no half blocks.
    let kitty = play("kitty");
    assert_eq!(kitty["asked"], true, "{kitty}");
    assert_eq!(kitty["shown"], true, "{kitty}");
    assert!(kitty["transmits"].as_u64().unwrap() >= 1, "{kitty}");
    assert!(kitty["placeholders"].as_u64().unwrap() >= 8, "{kitty}");
    assert_eq!(kitty["half_blocks"], 0, "{kitty}");
    assert_eq!(kitty["exit"], 0, "{kitty}");
    // One that does not say it draws pictures is not asked, and gets the half blocks.
    let plain = play("plain");
    assert_eq!(plain["asked"], false, "{plain}");
    assert_eq!(plain["shown"], true, "{plain}");
    assert_eq!(plain["transmits"], 0, "{plain}");
    assert!(plain["half_blocks"].as_u64().unwrap() >= 8 * 10, "{plain}");
    assert_eq!(plain["exit"], 0, "{plain}");
}
