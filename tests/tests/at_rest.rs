//! What someone holding a device finds in kkachi's files, against the real binaries: a
//! conversation through a relay, one side behind a passphrase, after which both homes
//! are searched for the words said, the names and the identities, and their
//! permissions are read. The scenario prints its figures.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kkachi_protocol::Card;
use kkachi_tests::procs::{LOOPBACK_ENV, RelayProc, User};

const PASSPHRASE: &str = "wet pavement after the typhoon";

fn walk(dir: &Path, files: &mut Vec<PathBuf>, dirs: &mut Vec<PathBuf>) {
    dirs.push(dir.to_path_buf());
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, files, dirs);
        } else {
            files.push(path);
        }
    }
}

#[test]
fn a_conversation_leaves_nothing_readable_in_either_home() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&dir.path().join("relay"), &[]);
    let seoyeon = User::new(dir.path(), "Seoyeon Han");
    let mut env = LOOPBACK_ENV.to_vec();
    env.push(("KKACHI_NEW_PASSPHRASE", PASSPHRASE));
    env.push(("KKACHI_PASSPHRASE", PASSPHRASE));
    let jaewon = User::with_env(dir.path(), "Jaewon Oh", None, &env);
    let said = jaewon.ok(&["passphrase", "set"]);
    assert!(said.contains("asks for this passphrase"), "{said}");
    let status: serde_json::Value =
        serde_json::from_str(&jaewon.ok(&["passphrase", "status", "--json"])).unwrap();
    assert_eq!(status["protection"], "passphrase", "{status}");
    for user in [&seoyeon, &jaewon] {
        user.ok(&["relay", "add", &relay.addr]);
    }
    User::introduce(&seoyeon, &jaewon);
    let to_jaewon = "meet at the north gate of the stadium at six";
    let to_seoyeon = "bring the radio and the spare batteries";
    seoyeon.send("Jaewon", to_jaewon, 5.0).expect("sent");
    jaewon.sync_until_said("Seoyeon", to_jaewon, &seoyeon);
    jaewon.send("Seoyeon", to_seoyeon, 5.0).expect("sent");
    seoyeon.sync_until_said("Jaewon", to_seoyeon, &jaewon);
    assert_eq!(jaewon.history_texts("Seoyeon"), [to_jaewon, to_seoyeon]);
    assert_eq!(seoyeon.history_texts("Jaewon"), [to_jaewon, to_seoyeon]);

    // Found again by words in any case, from the sealed store, behind the passphrase too.
    for (user, with) in [(&seoyeon, "Jaewon Oh"), (&jaewon, "Seoyeon Han")] {
        let found: serde_json::Value =
            serde_json::from_str(&user.ok(&["search", "NORTH", "gate", "--json"])).unwrap();
        let found = found.as_array().unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0]["text"], to_jaewon);
        assert_eq!(found[0]["contact"], with);
    }
    let none = seoyeon.run(&["search", "typhoon"]);
    assert!(
        none.status.success() && String::from_utf8_lossy(&none.stderr).contains("no message holds")
    );
    let muted: serde_json::Value =
        serde_json::from_str(&seoyeon.ok(&["mute", "Jaewon", "--json"])).unwrap();
    assert_eq!(muted["muted"], true);

    // A wrong passphrase is told as such, quickly, and changes nothing.
    let started = Instant::now();
    let wrong = jaewon.run_env(
        &["history", "Seoyeon"],
        &[("KKACHI_PASSPHRASE", "dry pavement")],
    );
    let wrong_ms = started.elapsed().as_millis();
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("does not unlock"), "{err}");

    let peer = |u: &User| Card::from_invite(&u.invite()).unwrap().identity().peer_id();
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("a message", to_jaewon.as_bytes().to_vec()),
        ("a message", to_seoyeon.as_bytes().to_vec()),
        ("a name", b"Seoyeon Han".to_vec()),
        ("a name", b"Jaewon Oh".to_vec()),
        ("a peer id", peer(&seoyeon).to_bytes()),
        ("a peer id", peer(&jaewon).to_bytes()),
        ("a peer id", peer(&seoyeon).to_string().into_bytes()),
        ("a peer id", peer(&jaewon).to_string().into_bytes()),
        ("the relay", relay.addr.as_bytes().to_vec()),
        ("the passphrase", PASSPHRASE.as_bytes().to_vec()),
    ];
    let (mut searched, mut count) = (0u64, 0);
    for user in [&seoyeon, &jaewon] {
        let (mut files, mut dirs) = (Vec::new(), Vec::new());
        walk(&user.home, &mut files, &mut dirs);
        for d in &dirs {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{} is {mode:o}", d.display());
        }
        for f in &files {
            let meta = std::fs::metadata(f).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} is {mode:o}", f.display());
            let bytes = std::fs::read(f).unwrap();
            searched += bytes.len() as u64;
            count += 1;
            for (what, s) in &secrets {
                assert!(
                    !bytes.windows(s.len()).any(|w| w == s.as_slice()),
                    "{what} ({}) is readable in {}",
                    String::from_utf8_lossy(s),
                    f.display()
                );
            }
        }
    }
    println!(
        "at rest: 2 homes after a conversation, {count} files, {} KiB searched for {} secrets: none found; \
         directories 0700, files 0600; a wrong passphrase refused in {wrong_ms} ms",
        searched / 1024,
        secrets.len()
    );
}
