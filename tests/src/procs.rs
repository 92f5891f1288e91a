//! Real processes: relays and users.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Path of a workspace binary (built by `cargo test --workspace`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found; build it first with `cargo build --workspace` (or run `cargo test --workspace`)",
        path.display()
    );
    path
}

/// kill -9 the child, if running, and reap it.
fn kill9(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// SIGTERM the child, if running, and wait for it to exit: how it exited.
fn terminate(child: &mut Option<Child>) -> Option<std::process::ExitStatus> {
    let mut c = child.take()?;
    let _ = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status();
    c.wait().ok()
}

/// `program`, run inside network namespace `netns` when given.
fn command_in(netns: Option<&str>, program: PathBuf) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// The lines a child prints, read on a thread as they come.
fn lines_of(stdout: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A free TCP port on loopback (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A relay process with a fixed port and data directory, so a restart keeps its
/// address and PeerId.
#[derive(Debug)]
pub struct RelayProc {
    /// Data directory.
    pub dir: PathBuf,
    /// TCP port.
    pub port: u16,
    /// Full address, `/ip4/127.0.0.1/tcp/PORT/p2p/ID`.
    pub addr: String,
    /// Extra arguments given at every start.
    pub args: Vec<String>,
    child: Option<Child>,
    /// The IP to listen on.
    pub ip: String,
    netns: Option<String>,
    /// Where its log goes, at debug level (else warnings to the test's stderr).
    log: Option<PathBuf>,
}

impl RelayProc {
    /// Starts a relay on loopback.
    pub fn start(dir: &Path, args: &[&str]) -> Self {
        Self::start_on(dir, "127.0.0.1", None, args)
    }

    /// Starts a relay on `ip`, inside network namespace `netns` if given.
    pub fn start_on(dir: &Path, ip: &str, netns: Option<&str>, args: &[&str]) -> Self {
        let mut relay = Self {
            dir: dir.to_path_buf(),
            port: free_port(),
            addr: String::new(),
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
            ip: ip.to_string(),
            netns: netns.map(str::to_string),
            log: None,
        };
        relay.first_start();
        relay
    }

    /// Starts a relay on loopback that logs everything (debug level) to `log`.
    pub fn start_logged(dir: &Path, args: &[&str], log: &Path) -> Self {
        let mut relay = Self {
            dir: dir.to_path_buf(),
            port: free_port(),
            addr: String::new(),
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
            ip: "127.0.0.1".into(),
            netns: None,
            log: Some(log.to_path_buf()),
        };
        relay.first_start();
        relay
    }

    /// The first start: a port found free may be taken by another process (a client's
    /// outgoing connection, another test's relay) before the relay binds it, so a relay
    /// that exits at once is started again on another port, a few times (one that hangs
    /// is not).
    fn first_start(&mut self) {
        for _ in 0..4 {
            match self.try_start() {
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    eprintln!("relay exited at start on port {}; another port", self.port);
                    self.port = free_port();
                }
                other => return other.expect("relay printed its address"),
            }
        }
        self.restart();
    }

    /// (Re)starts the process on the same port and data; waits for its address line.
    pub fn restart(&mut self) {
        self.try_start().expect("relay printed its address");
    }

    fn try_start(&mut self) -> Result<(), std::sync::mpsc::RecvTimeoutError> {
        assert!(self.child.is_none(), "relay already running");
        let mut cmd = command_in(self.netns.as_deref(), bin("kkachi-relay"));
        let listen = format!("/ip4/{}/tcp/{}", self.ip, self.port);
        cmd.args(["--listen", &listen, "--metrics", "off", "--data-dir"])
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::piped());
        match &self.log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("relay log file");
                cmd.env("RUST_LOG", "debug").stderr(file);
            }
            None => {
                cmd.env("RUST_LOG", "warn").stderr(Stdio::inherit());
            }
        }
        let mut child = cmd.spawn().expect("relay starts");
        let rx = lines_of(child.stdout.take().expect("stdout"));
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(e) => {
                let mut child = Some(child);
                kill9(&mut child);
                return Err(e);
            }
        };
        self.addr = line
            .strip_prefix("listening on ")
            .expect("listening line")
            .to_string();
        self.child = Some(child);
        Ok(())
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) {
        let _ = terminate(&mut self.child);
    }

    /// True while the process runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Waits up to `within` for the process to exit by itself; its exit status.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A user: a home directory and the `kkachi` binary.
#[derive(Debug)]
pub struct User {
    /// Home directory.
    pub home: PathBuf,
    /// Display name.
    pub name: String,
    netns: Option<String>,
    env: Vec<(String, String)>,
}

/// A running `kkachi daemon --json`, its messages read as they are printed.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    lines: mpsc::Receiver<(Instant, serde_json::Value)>,
}

/// The environment of a user on loopback: LAN discovery off, listening on 127.0.0.1 only.
pub const LOOPBACK_ENV: [(&str, &str); 2] = [
    ("KKACHI_LAN", "0"),
    ("KKACHI_LISTEN", "/ip4/127.0.0.1/tcp/0"),
];

impl User {
    /// A user with an identity, on loopback, LAN discovery off.
    pub fn new(root: &Path, name: &str) -> Self {
        Self::with_env(root, name, None, &LOOPBACK_ENV)
    }

    /// A user with an identity, in network namespace `netns`, with extra environment.
    pub fn with_env(root: &Path, name: &str, netns: Option<&str>, env: &[(&str, &str)]) -> Self {
        let user = Self::without_identity(root, name, netns, env);
        user.ok(&["init", "--name", name]);
        user
    }

    /// A user whose home (`root/name`) holds no identity yet: one to restore or join
    /// into.
    pub fn without_identity(
        root: &Path,
        name: &str,
        netns: Option<&str>,
        env: &[(&str, &str)],
    ) -> Self {
        Self {
            home: root.join(name),
            name: name.to_string(),
            netns: netns.map(str::to_string),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// `kkachi ARGS` for this user, to start as a child.
    pub fn spawn(&self, args: &[&str]) -> Command {
        let mut cmd = self.command();
        cmd.args(args);
        cmd
    }

    fn command(&self) -> Command {
        let mut cmd = command_in(self.netns.as_deref(), bin("kkachi"));
        cmd.arg("--home").arg(&self.home).env("RUST_LOG", "error");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs a command.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("kkachi runs")
    }

    /// Runs a command with these environment variables changed.
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command();
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.args(args).output().expect("kkachi runs")
    }

    /// Runs a command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "{} {:?} failed: {}{}",
            self.name,
            args,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The texts of the conversation with `with`, oldest first (`history --json`).
    pub fn history_texts(&self, with: &str) -> Vec<String> {
        let out = self.ok(&["history", with, "--json"]);
        serde_json::from_str::<serde_json::Value>(&out)
            .expect("history --json is JSON")
            .as_array()
            .expect("an array")
            .iter()
            .filter_map(|m| m["text"].as_str().map(str::to_owned))
            .collect()
    }

    /// Syncs until `text` from `sender` (known here as `with`) is in the conversation:
    /// `send` exits once a message is in the outbox, and on a loaded machine its put may
    /// still be waiting there, so the sender syncs too between tries (at most 20).
    pub fn sync_until_said(&self, with: &str, text: &str, sender: &User) {
        for _ in 0..20 {
            self.ok(&["sync"]);
            if self.history_texts(with).iter().any(|t| t == text) {
                return;
            }
            sender.ok(&["sync"]);
        }
        panic!("{text:?} from {} never reached {}", sender.name, self.name);
    }

    /// This user's invite code.
    pub fn invite(&self) -> String {
        self.ok(&["invite"]).trim().to_string()
    }

    /// Alice and Bob, homes under `dir`, both on `relay` and contacts of each other.
    pub fn alice_and_bob(dir: &Path, relay: &RelayProc) -> (User, User) {
        let alice = User::new(dir, "alice");
        let bob = User::new(dir, "bob");
        for u in [&alice, &bob] {
            u.ok(&["relay", "add", &relay.addr]);
        }
        User::introduce(&alice, &bob);
        (alice, bob)
    }

    /// Makes `a` and `b` contacts of each other.
    pub fn introduce(a: &User, b: &User) {
        a.ok(&["contact", "add", &b.invite()]);
        b.ok(&["contact", "add", &a.invite()]);
    }

    /// Sends `text` to `to` with `--json`; the message id if the command exited 0.
    pub fn send(&self, to: &str, text: &str, timeout_secs: f64) -> Option<serde_json::Value> {
        let o = self.run(&[
            "send",
            to,
            text,
            "--json",
            "--timeout",
            &timeout_secs.to_string(),
        ]);
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// Starts `kkachi daemon` with its default logging, and hands back its standard
    /// error line by line (kill the child when done).
    pub fn daemon_logging(&self) -> (Child, mpsc::Receiver<String>) {
        let mut child = self
            .command()
            .env_remove("RUST_LOG")
            .arg("daemon")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("daemon starts");
        let lines = lines_of(child.stderr.take().expect("stderr"));
        (child, lines)
    }

    /// Starts `kkachi daemon --json`; waits until it accepts commands.
    pub fn daemon(&self) -> Daemon {
        let mut child = self
            .command()
            .args(["daemon", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("daemon starts");
        let raw = lines_of(child.stdout.take().expect("stdout"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in raw {
                if let Ok(v) = serde_json::from_str(&line) {
                    let _ = tx.send((Instant::now(), v));
                }
            }
        });
        let socket = self.home.join("daemon.sock");
        // A daemon killed before may have left its socket file: wait for one that answers.
        let answers = || std::os::unix::net::UnixStream::connect(&socket).is_ok();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !answers() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(answers(), "{}'s daemon did not start", self.name);
        Daemon {
            child: Some(child),
            lines,
        }
    }
}

impl Daemon {
    /// Messages printed so far or within `wait`, until `until` says enough.
    pub fn collect(
        &self,
        wait: Duration,
        mut until: impl FnMut(&[(Instant, serde_json::Value)]) -> bool,
    ) -> Vec<(Instant, serde_json::Value)> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        loop {
            if until(&got) {
                return got;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return got;
            }
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) => got.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return got,
            }
        }
    }

    /// Messages printed so far, without waiting.
    pub fn ready(&self) -> Vec<(Instant, serde_json::Value)> {
        self.lines.try_iter().collect()
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    /// True while the process runs (it has not exited or been stopped).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM and wait: how it exited (None if it was not running).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        terminate(&mut self.child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}
