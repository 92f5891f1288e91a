//! Files through real relays and clients: sealed, chunked, spread over relays, fetched
//! from whichever answer, resumed after a kill on either side. Every scenario prints
//! its figures.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kkachi_tests::procs::{RelayProc, User, bin};

const MB: u64 = 1 << 20;

/// Writes `size` bytes that do not repeat (so no chunk equals another) to `path`.
fn random_file(path: &Path, size: u64, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut left = size;
    let mut block = vec![0u8; 1 << 16];
    while left > 0 {
        for b in block.chunks_mut(8) {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

/// Whether two files hold the same bytes (read a block at a time).
fn same_bytes(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            return true;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
    }
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
    (alice, bob)
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
        send.until_done(0.3, Duration::from_secs(120)),
        "the upload never reached 30%"
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
    let got = json(&bob.ok(&["get", &id[..12], "--to", saved.to_str().unwrap(), "--json"]));
    let down = started.elapsed();
    let path = PathBuf::from(got["path"].as_str().unwrap());
    assert_eq!(path.file_name().unwrap(), "site-map.bin");
    assert!(
        same_bytes(&src, &path),
        "the file saved differs from the one sent"
    );
    println!(
        "100 MB through 3 relays, one killed -9 at 30% of the upload: upload {:.1}s (every chunk on {} of {} relays), download {:.1}s ({} chunks, {} damaged), bytes equal",
        up.as_secs_f64(),
        sent["copies"],
        sent["relays"],
        down.as_secs_f64(),
        got["chunks"],
        got["bad_chunks"]
    );
    drop(alice);
}
