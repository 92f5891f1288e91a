//! The terminal UI end to end: the real `kkachi tui` inside tmux, against real relays.
//! It must show an incoming message, send one with Enter, and show `relays 1/2` after
//! one of its two relays is killed.

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
    tmux.keys(&["Escape"]);
    tmux.keys(&["C-c"]);
}
