//! A second relay on a port another process holds refuses to start, and says why
//! (libp2p binds with SO_REUSEPORT: without the check it would start and take some of
//! the first one's connections).

use std::io::BufRead;
use std::process::{Command, Stdio};

fn relay(port: u16, dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kkachi-relay"));
    command
        .args([
            "--listen",
            &format!("/ip4/127.0.0.1/tcp/{port}"),
            "--metrics",
            "off",
            "--data-dir",
        ])
        .arg(dir)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

#[test]
fn a_relay_refuses_a_port_already_in_use() {
    // Held by another program.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let out = relay(port, dir.path())
        .output()
        .expect("the relay binary runs");
    assert!(!out.status.success(), "it started on a port in use");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("/tcp/{port}")) && err.contains("in use by another process"),
        "{err}"
    );
    drop(held);

    // Held by another relay (which binds with SO_REUSEPORT).
    let mut first = relay(port, &dir.path().join("first"))
        .spawn()
        .expect("the relay binary runs");
    let mut lines = std::io::BufReader::new(first.stdout.take().unwrap()).lines();
    let line = lines.next().expect("a line").expect("readable");
    assert!(line.starts_with("listening on"), "{line}");
    let out = relay(port, &dir.path().join("second"))
        .output()
        .expect("the relay binary runs");
    let _ = first.kill();
    let _ = first.wait();
    assert!(
        !out.status.success(),
        "a second relay started on the first one's port"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another process"), "{err}");
}

#[test]
fn id_takes_the_config_and_says_what_users_add_and_errors_are_sentences() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, "listen = [\"/ip4/0.0.0.0/tcp/4040\"]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kkachi-relay"))
        .args(["id", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .expect("the relay binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(peer.starts_with("12D3Koo"), "{peer}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "kkachi relay add /ip4/<this host's address>/tcp/4040/p2p/{peer}"
        )),
        "{err}"
    );
    // A broken configuration: one sentence, no backtrace even when asked for one.
    std::fs::write(&config, "listen = 7\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kkachi-relay"))
        .args(["--config"])
        .arg(&config)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the relay binary runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        !err.contains("Stack backtrace") && !err.contains("   0: "),
        "{err}"
    );
}
