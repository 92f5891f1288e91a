//! Files through real relays and clients: sealed, chunked, spread over relays, fetched
//! from whichever answer, resumed after a kill on either side. Every scenario prints
//! its figures.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kkachi_relay::store::{Limits, MemoryStore, Quota};
use kkachi_tests::faults::{FlippingChunks, Proxy, ProxyMode};
use kkachi_tests::inproc::InProcessRelay;
use kkachi_tests::procs::{RelayProc, User, bin};

const MB: u64 = 1 << 20;

fn random_file(path: &Path, size: u64, seed: u64) {
    kkachi_tests::data::random_file(path, size, seed).expect("test file written");
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    kkachi_tests::data::same_bytes(a, b).expect("files read")
}

/// Alice and Bob, contacts, each with every relay given as an inbox relay.
fn pair(root: &Path, relays: &[&RelayProc]) -> (User, User) {
    let alice = User::new(root, "alice");
    let bob = User::new(root, "bob");
    for u in [&alice, &bob] {
        let mut args = vec!["relay", "add"];
        args.extend(relays.iter().map(|r| r.addr.as_str()));
        u.ok(&args);
    }
    User::introduce(&alice, &bob);
    // Each grants the other at its relays (done when online), so puts are taken.
    bob.ok(&["sync", "--timeout", "10"]);
    alice.ok(&["sync", "--timeout", "10"]);
    (alice, bob)
}

/// `get ID --to DIR --json` at `user`: what it says (the path saved, the counts).
fn saved_by(user: &User, id: &str, dir: &Path) -> serde_json::Value {
    json(&user.ok(&["get", id, "--to", dir.to_str().unwrap(), "--json"]))
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Bob takes in what came (`sync`) and returns the id of the file alice sent last.
fn file_id_at(bob: &User) -> String {
    bob.ok(&["sync", "--timeout", "10"]);
    let history = json(&bob.ok(&["history", "alice", "--json"]));
    let last = history
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|m| !m["file"].is_null())
        .unwrap_or_else(|| panic!("no file message in bob's history: {history}"));
    last["file"]["id"].as_str().unwrap().to_string()
}

/// A command run with its standard error read line by line as it comes.
struct Watched {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Watched {
    fn start(user_home: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(bin("kkachi"))
            .arg("--home")
            .arg(user_home)
            .args(args)
            .env("RUST_LOG", "error")
            .env("KKACHI_LAN", "0")
            .env("KKACHI_LISTEN", "/ip4/127.0.0.1/tcp/0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kkachi runs");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Waits until a progress line says at least `fraction` is done; false if the
    /// command ended first.
    fn until_done(&mut self, fraction: f64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    if let Some((done, total)) = progress(&line)
                        && done as f64 >= fraction * total as f64
                    {
                        return true;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => return false,
            }
        }
        false
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `fetching x: 12/400 chunks (3%), …` → (12, 400).
fn progress(line: &str) -> Option<(usize, usize)> {
    let (_, rest) = line.split_once(": ")?;
    let (counts, _) = rest.split_once(" chunks")?;
    let (done, total) = counts.split_once('/')?;
    Some((done.parse().ok()?, total.parse().ok()?))
}

/// Why mounting is not possible here, if it is not.
fn not_root() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    (String::from_utf8_lossy(&uid.stdout).trim() != "0").then(|| "needs root".to_string())
}

fn home_of(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}

#[test]
fn a_file_through_three_relays_with_one_killed_mid_transfer_arrives_intact() {
    let dir = tempfile::tempdir().unwrap();
    let mut relays: Vec<RelayProc> = (0..3)
        .map(|i| RelayProc::start(&dir.path().join(format!("r{i}")), &[]))
        .collect();
    let (alice, bob) = pair(dir.path(), &relays.iter().collect::<Vec<_>>());
    let src = dir.path().join("site-map.bin");
    random_file(&src, 100 * MB, 7);

    // Relay 0 dies (kill -9) while the chunks are going up.
    let started = Instant::now();
    let mut send = Watched::start(
        &home_of(dir.path(), "alice"),
        &["send", "bob", "--file", src.to_str().unwrap(), "--json"],
    );
    assert!(
        send.until_done(0.2, Duration::from_secs(120)),
        "the upload never reached 20%"
    );
    relays[0].kill9();
    let out = send.child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "send --file failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = json(&String::from_utf8_lossy(&out.stdout));
    let up = started.elapsed();
    assert_eq!(sent["size"], 100 * MB);
    assert!(
        sent["copies"].as_u64().unwrap() >= 1,
        "a chunk is on no relay: {sent}"
    );

    // Bob fetches from the two relays left, and the bytes are the same.
    let id = file_id_at(&bob);
    let saved = dir.path().join("saved");
    let started = Instant::now();
    let got = saved_by(&bob, &id[..12], &saved);
    let down = started.elapsed();
    let path = PathBuf::from(got["path"].as_str().unwrap());
    assert_eq!(path.file_name().unwrap(), "site-map.bin");
    assert!(
        same_bytes(&src, &path),
        "the file saved differs from the one sent"
    );
    println!(
        "100 MB through 3 relays, one killed -9 at 20% of the upload: upload {:.1}s (every chunk on {} of {} relays), download {:.1}s ({} chunks, {} damaged), bytes equal",
        up.as_secs_f64(),
        sent["copies"],
        sent["relays"],
        down.as_secs_f64(),
        got["chunks"],
        got["bad_chunks"]
    );
    drop(alice);
}

/// Three relays behind proxies (to slow them down when a kill must land mid-way).
struct Slowed {
    _rt: tokio::runtime::Runtime,
    _relays: Vec<RelayProc>,
    proxies: Vec<Proxy>,
    addrs: Vec<String>,
}

impl Slowed {
    fn start(root: &Path) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let relays: Vec<RelayProc> = (0..3)
            .map(|i| RelayProc::start(&root.join(format!("r{i}")), &[]))
            .collect();
        let mut proxies = Vec::new();
        let mut addrs = Vec::new();
        for r in &relays {
            let port: u16 = r.addr.split('/').nth(4).unwrap().parse().unwrap();
            let proxy = rt.block_on(Proxy::start(port));
            let peer = r.addr.rsplit('/').next().unwrap();
            addrs.push(format!("/ip4/127.0.0.1/tcp/{}/p2p/{peer}", proxy.port));
            proxies.push(proxy);
        }
        Self {
            _rt: rt,
            _relays: relays,
            proxies,
            addrs,
        }
    }

    fn set(&self, mode: ProxyMode) {
        for p in &self.proxies {
            p.set(mode);
        }
    }

    fn pair(&self, root: &Path) -> (User, User) {
        let alice = User::new(root, "alice");
        let bob = User::new(root, "bob");
        for u in [&alice, &bob] {
            let mut args = vec!["relay", "add"];
            args.extend(self.addrs.iter().map(String::as_str));
            u.ok(&args);
        }
        User::introduce(&alice, &bob);
        bob.ok(&["sync", "--timeout", "10"]);
        alice.ok(&["sync", "--timeout", "10"]);
        (alice, bob)
    }
}

fn files_json(user: &User) -> Vec<serde_json::Value> {
    json(&user.ok(&["files", "--json"]))
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_recipient_killed_half_way_fetches_at_most_one_chunk_again() {
    let dir = tempfile::tempdir().unwrap();
    let relays = Slowed::start(dir.path());
    let (alice, bob) = relays.pair(dir.path());
    let src = dir.path().join("evacuation-plan.pdf");
    random_file(&src, 12 * MB, 11);
    alice.ok(&["send", "bob", "--file", src.to_str().unwrap()]);
    let id = file_id_at(&bob);

    // Bob's fetch is killed -9 once half the chunks are here.
    relays.set(ProxyMode::Slow);
    let saved = dir.path().join("saved");
    let mut get = Watched::start(
        &home_of(dir.path(), "bob"),
        &["get", &id, "--to", saved.to_str().unwrap(), "--json"],
    );
    assert!(
        get.until_done(0.5, Duration::from_secs(120)),
        "the fetch never reached half way"
    );
    get.kill9();
    relays.set(ProxyMode::Pass);
    let row = files_json(&bob)
        .into_iter()
        .find(|f| f["id"] == id.as_str())
        .expect("the file is listed");
    assert_eq!(row["state"], "fetching", "{row}");
    let (here, total) = (
        row["done"].as_u64().unwrap(),
        row["total"].as_u64().unwrap(),
    );
    assert!(here >= total / 2 && here < total, "{row}");

    // Started again, it fetches what was missing, and at most one chunk more.
    let got = saved_by(&bob, &id, &saved);
    let fetched = got["fetched"].as_u64().unwrap();
    println!(
        "12 MB: fetch killed -9 with {here}/{total} chunks here; the second fetch took {fetched} chunks ({} again)",
        fetched.saturating_sub(total - here)
    );
    assert!(
        fetched <= total - here + 1,
        "{fetched} chunks fetched after a stop with {here}/{total} here"
    );
    assert!(same_bytes(&src, Path::new(got["path"].as_str().unwrap())));
}

#[test]
fn a_sender_killed_mid_upload_goes_on_and_the_file_arrives_once() {
    let dir = tempfile::tempdir().unwrap();
    let relays = Slowed::start(dir.path());
    let (alice, bob) = relays.pair(dir.path());
    let src = dir.path().join("photo-of-the-bridge.jpg");
    random_file(&src, 12 * MB, 13);

    relays.set(ProxyMode::Slow);
    let mut send = Watched::start(
        &home_of(dir.path(), "alice"),
        &["send", "bob", "--file", src.to_str().unwrap(), "--json"],
    );
    assert!(
        send.until_done(0.3, Duration::from_secs(120)),
        "the upload never reached 30%"
    );
    send.kill9();
    relays.set(ProxyMode::Pass);
    let row = files_json(&alice).remove(0);
    assert_eq!(row["state"], "waiting", "{row}");

    // The next sync goes on with it, and sends its message once.
    let started = Instant::now();
    alice.ok(&["sync", "--timeout", "10"]);
    let row = files_json(&alice).remove(0);
    assert_eq!(row["state"], "sent", "{row}");
    let id = file_id_at(&bob);
    let history = json(&bob.ok(&["history", "alice", "--json"]));
    let files = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| !m["file"].is_null())
        .count();
    assert_eq!(files, 1, "the file message was shown {files} times");
    let got = saved_by(&bob, &id, &dir.path().join("saved"));
    assert!(same_bytes(&src, Path::new(got["path"].as_str().unwrap())));
    println!(
        "12 MB: sender killed -9 at 30% of the upload; `sync` finished it in {:.1}s; one message, bytes equal",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_relay_serving_flipped_bytes_is_caught_and_the_chunk_fetched_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let flipping = std::sync::Arc::new(FlippingChunks::open(&dir.path().join("evil-chunks")));
    let evil = InProcessRelay::start_with_chunks(
        MemoryStore::new(Limits::uniform(Quota {
            max_envelopes: 1_000_000,
            max_bytes: u64::MAX,
        })),
        Some(flipping.clone()),
    );
    let honest: Vec<RelayProc> = (0..2)
        .map(|i| RelayProc::start(&dir.path().join(format!("r{i}")), &[]))
        .collect();
    // The lying relay first: it is asked first.
    let alice = User::new(dir.path(), "alice");
    let bob = User::new(dir.path(), "bob");
    for u in [&alice, &bob] {
        u.ok(&["relay", "add", &evil.addr, &honest[0].addr, &honest[1].addr]);
    }
    User::introduce(&alice, &bob);
    bob.ok(&["sync", "--timeout", "10"]);
    alice.ok(&["sync", "--timeout", "10"]);
    // Small enough to go to every relay: each chunk is on the liar too.
    let src = dir.path().join("notes.txt");
    random_file(&src, 900 << 10, 17);
    alice.ok(&["send", "bob", "--file", src.to_str().unwrap()]);
    let id = file_id_at(&bob);
    let got = saved_by(&bob, &id, &dir.path().join("saved"));
    let flipped = flipping.flipped.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "a relay flipping a byte of every chunk it served: {flipped} served so, {} caught, bytes equal",
        got["bad_chunks"]
    );
    assert!(flipped > 0, "the lying relay was never asked");
    assert_eq!(got["bad_chunks"].as_u64().unwrap(), flipped);
    assert!(same_bytes(&src, Path::new(got["path"].as_str().unwrap())));
}

#[test]
fn a_relay_with_a_full_disk_refuses_and_the_others_take_the_file() {
    if let Some(why) = not_root() {
        println!(
            "SKIPPED a_relay_with_a_full_disk_refuses_and_the_others_take_the_file: {why} (mounts a small tmpfs)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("small");
    std::fs::create_dir_all(&mount).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
        .arg(&mount)
        .status()
        .unwrap();
    assert!(ok.success(), "mount tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let config = dir.path().join("small.toml");
    std::fs::write(&config, "[limits]\nmin_free_disk_bytes = 2097152\n").unwrap();
    let full = RelayProc::start(
        &mount.join("relay"),
        &["--config", config.to_str().unwrap()],
    );
    let others: Vec<RelayProc> = (0..2)
        .map(|i| RelayProc::start(&dir.path().join(format!("r{i}")), &[]))
        .collect();
    let (alice, bob) = pair(dir.path(), &[&full, &others[0], &others[1]]);
    let src = dir.path().join("flood-map.png");
    random_file(&src, 24 * MB, 19);
    let sent = json(&alice.ok(&["send", "bob", "--file", src.to_str().unwrap(), "--json"]));
    let refusals = sent["refused"].as_array().unwrap();
    let by_full: Vec<&serde_json::Value> = refusals
        .iter()
        .filter(|r| r["relay"] == full.addr.as_str())
        .collect();
    println!(
        "24 MB with one relay's disk filling up: every chunk on {} of {} relays; the full relay said {:?}",
        sent["copies"],
        sent["relays"],
        by_full.first().map(|r| r["reason"].to_string())
    );
    assert!(sent["copies"].as_u64().unwrap() >= 2, "{sent}");
    assert!(
        by_full.iter().any(|r| {
            let why = r["reason"].as_str().unwrap_or_default();
            why.starts_with("storage_full") || why.starts_with("internal")
        }),
        "the full relay did not refuse: {sent}"
    );
    let id = file_id_at(&bob);
    let got = saved_by(&bob, &id, &dir.path().join("saved"));
    assert!(same_bytes(&src, Path::new(got["path"].as_str().unwrap())));
}

#[test]
fn a_photo_is_fetched_as_soon_as_it_arrives_at_a_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let relays: Vec<RelayProc> = (0..2)
        .map(|i| RelayProc::start(&dir.path().join(format!("r{i}")), &[]))
        .collect();
    let (alice, bob) = pair(dir.path(), &relays.iter().collect::<Vec<_>>());
    let mut daemon = bob.daemon();
    let src = dir.path().join("IMG_0042.jpg");
    random_file(&src, 300 << 10, 23);
    let other = dir.path().join("report.zip");
    random_file(&other, 300 << 10, 29);
    alice.ok(&["send", "bob", "--file", src.to_str().unwrap()]);
    alice.ok(&["send", "bob", "--file", other.to_str().unwrap()]);
    let lines = daemon.collect(Duration::from_secs(30), |got| {
        got.iter().filter(|(_, l)| !l["file"].is_null()).count() >= 2
    });
    assert_eq!(
        lines.iter().filter(|(_, l)| !l["file"].is_null()).count(),
        2,
        "the daemon did not show both files: {lines:?}"
    );
    // The photo is fetched by itself; the archive waits to be asked for.
    let deadline = Instant::now() + Duration::from_secs(30);
    let states = loop {
        let rows = files_json(&bob);
        let state = |name: &str| {
            rows.iter()
                .find(|r| r["name"] == name)
                .map(|r| r["state"].as_str().unwrap_or_default().to_string())
        };
        let states = (state("IMG_0042.jpg"), state("report.zip"));
        if states.0.as_deref() == Some("fetched") || Instant::now() > deadline {
            break states;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "a running daemon: photo {:?}, archive {:?}",
        states.0, states.1
    );
    assert_eq!(states.0.as_deref(), Some("fetched"));
    assert_eq!(states.1.as_deref(), Some("offered"));
    // Saving it, through the daemon, writes the same bytes.
    let id = files_json(&bob)
        .into_iter()
        .find(|r| r["name"] == "IMG_0042.jpg")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let got = saved_by(&bob, &id, &dir.path().join("saved"));
    assert!(same_bytes(&src, Path::new(got["path"].as_str().unwrap())));
    assert_eq!(
        got["fetched"], 0,
        "a fetched photo was fetched again: {got}"
    );
    daemon.stop();
}

/// The files kept (sealed) for received files under a home.
fn kept(home: &Path) -> Vec<String> {
    std::fs::read_dir(home.join("files").join("in"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_file_goes_with_its_message_and_with_a_blocked_sender() {
    let dir = tempfile::tempdir().unwrap();
    let relays: Vec<RelayProc> = (0..2)
        .map(|i| RelayProc::start(&dir.path().join(format!("r{i}")), &[]))
        .collect();
    let (alice, bob) = pair(dir.path(), &relays.iter().collect::<Vec<_>>());
    let bob_home = home_of(dir.path(), "bob");
    let saved = dir.path().join("saved");
    let src = dir.path().join("receipt.pdf");
    random_file(&src, 600 << 10, 31);
    alice.ok(&["send", "bob", "--file", src.to_str().unwrap()]);
    let id = file_id_at(&bob);
    bob.ok(&["get", &id, "--to", saved.to_str().unwrap()]);
    assert!(
        kept(&bob_home).iter().any(|f| f.starts_with(&id)),
        "nothing kept for the file fetched"
    );

    // Deleted here: the file's key and its sealed bytes go with the message.
    let history = json(&bob.ok(&["history", "alice", "--json"]));
    let message = history.as_array().unwrap().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    bob.ok(&["delete", "alice", &message, "--for-me"]);
    assert!(
        files_json(&bob).iter().all(|f| f["id"] != id.as_str()),
        "the file of a deleted message is still listed"
    );
    assert!(kept(&bob_home).is_empty(), "left: {:?}", kept(&bob_home));
    assert!(
        !bob.run(&["get", &id[..12]]).status.success(),
        "a deleted message's file could still be fetched"
    );
    // What was saved elsewhere is the person's own copy: it stays.
    assert!(same_bytes(&src, &saved.join("receipt.pdf")));

    // Blocked: what they sent, fetched or not, goes.
    alice.ok(&["send", "bob", "--file", src.to_str().unwrap()]);
    let second = file_id_at(&bob);
    bob.ok(&["get", &second, "--to", saved.to_str().unwrap()]);
    bob.ok(&["contact", "block", "alice"]);
    assert!(files_json(&bob).is_empty(), "{:?}", files_json(&bob));
    assert!(kept(&bob_home).is_empty(), "left: {:?}", kept(&bob_home));
    println!(
        "a file deleted for me, then one from a sender blocked: both gone from the home, the saved copies kept"
    );
}

#[test]
fn with_a_relay_down_a_file_goes_on_the_one_left_and_its_text_is_never_held_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut relays: Vec<RelayProc> = (0..2)
        .map(|i| RelayProc::start(&dir.path().join(format!("r{i}")), &[]))
        .collect();
    let (alice, bob) = pair(dir.path(), &relays.iter().collect::<Vec<_>>());
    // One of Bob's two relays is down: each chunk goes on the other, said so.
    relays[1].kill9();
    let src = dir.path().join("levee.bin");
    random_file(&src, 3 * MB, 21);
    let started = Instant::now();
    let out = alice.run(&["send", "bob", "--file", src.to_str().unwrap(), "the levee"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    let warned = String::from_utf8_lossy(&out.stderr);
    println!(
        "2 relays, one down: sent in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        said.trim()
    );
    assert!(said.contains("each chunk on 1 of their 2 relays"), "{said}");
    assert!(warned.contains("only one copy of each chunk"), "{warned}");
    let id = file_id_at(&bob);
    let got = saved_by(&bob, &id, &dir.path().join("saved"));
    assert!(same_bytes(&src, Path::new(got["path"].as_str().unwrap())));
    assert!(
        bob.history_texts("alice")
            .contains(&"the levee".to_string())
    );

    // Both down: the file waits, and its text goes ahead of it (into the outbox).
    relays[0].kill9();
    let later = dir.path().join("shelter-list.bin");
    random_file(&later, 2 * MB, 22);
    let sent = json(&alice.ok(&[
        "send",
        "bob",
        "--file",
        later.to_str().unwrap(),
        "who is at the shelter",
        "--json",
    ]));
    assert_eq!(sent["state"], "queued", "{sent}");
    assert!(sent["text_id"].is_string(), "{sent}");
    // The relays come back: both arrive, the text first.
    for r in &mut relays {
        r.restart();
    }
    alice.ok(&["sync", "--timeout", "20"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while files_json(&alice).iter().any(|r| r["state"] == "waiting") && Instant::now() < deadline {
        alice.ok(&["sync", "--timeout", "5"]);
    }
    bob.ok(&["sync", "--timeout", "10"]);
    assert!(
        bob.history_texts("alice")
            .contains(&"who is at the shelter".to_string())
    );
    let history = json(&bob.ok(&["history", "alice", "--json"]));
    let names: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["file"]["name"].as_str())
        .collect();
    assert_eq!(names, ["levee.bin", "shelter-list.bin"], "{history}");
}

#[test]
fn a_file_passed_on_from_the_command_line_arrives_whole_and_is_not_put_twice() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&dir.path().join("r"), &[]);
    let (alice, bob) = pair(dir.path(), &[&relay]);
    let carol = User::new(dir.path(), "carol");
    carol.ok(&["relay", "add", &relay.addr]);
    User::introduce(&bob, &carol);
    carol.ok(&["sync", "--timeout", "10"]);
    bob.ok(&["sync", "--timeout", "10"]);
    let src = dir.path().join("route.pdf");
    random_file(&src, 600 << 10, 23);
    alice.ok(&["send", "bob", "--file", src.to_str().unwrap()]);
    let id = file_id_at(&bob);
    // Not fetched yet: `--forward` fetches it first, then passes it on.
    let sent = json(&bob.ok(&[
        "send",
        "carol",
        "--forward",
        &id[..8],
        "from alice",
        "--json",
    ]));
    println!("passed on: {sent}");
    assert_eq!(sent["name"], "route.pdf", "{sent}");
    assert_ne!(sent["file"].as_str().unwrap(), id, "sealed anew: {sent}");
    let first_put = sent["bytes_put"].as_u64().unwrap();
    assert!(first_put > 600 << 10, "{sent}");
    assert!(
        sent["text_id"].is_string(),
        "the text went after it: {sent}"
    );
    carol.ok(&["sync", "--timeout", "10"]);
    let history = json(&carol.ok(&["history", "bob", "--json"]));
    let with_file = history
        .as_array()
        .unwrap()
        .iter()
        .find(|m| !m["file"].is_null())
        .unwrap_or_else(|| panic!("no file in carol's history: {history}"));
    let forwarded = with_file["file"]["id"].as_str().unwrap().to_string();
    assert_eq!(forwarded, sent["file"].as_str().unwrap());
    // Passed on again before she saves it (her relay still holds it): nothing is put.
    let again = json(&bob.ok(&["send", "carol", "--forward", &id[..8], "--json"]));
    assert_eq!(again["file"], sent["file"], "{again}");
    assert_eq!(again["bytes_put"], 0, "nothing put twice: {again}");
    let said = bob.ok(&["send", "carol", "--forward", &id[..8]]);
    assert!(said.contains("nothing put"), "{said}");
    let got = saved_by(&carol, &forwarded, &dir.path().join("saved"));
    assert!(same_bytes(&src, Path::new(got["path"].as_str().unwrap())));
    // A file one sent is not passed on: it is sent again from where it is.
    let out = alice.run(&["send", "bob", "--forward", &id[..8]]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--file PATH"), "{err}");
}
