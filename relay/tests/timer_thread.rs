//! A client and a relay start no timer thread: every timeout libp2p arms (connection
//! setup, stream upgrades, idle connections, pings) runs on the Tokio runtime's timer.
//! Upstream futures-timer would start a `futures-timer` thread on the first one and wake
//! it for each. Alone in its own test binary, as the check looks at every thread in the
//! process (listed in Linux's /proc).
#![cfg(target_os = "linux")]

use std::time::Duration;

use kkachi_protocol::wire::{ClientToRelay, RelayToClient};
use kkachi_relay::client::MailboxClient;
use kkachi_relay::config::Config;
use kkachi_relay::start;
use libp2p::identity::Keypair;

/// The names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_run_their_timeouts_on_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = start(Config {
        data_dir: dir.path().to_path_buf(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        ..Config::default()
    })
    .await
    .expect("relay starts");
    let addr = relay.wait_listening(1).await.remove(0);
    let client = MailboxClient::connect(Keypair::generate_ed25519(), addr)
        .await
        .expect("connects");
    for _ in 0..50 {
        let answer = client.request(ClientToRelay::Info).await.expect("answer");
        assert!(matches!(answer, RelayToClient::Info(_)), "{answer:?}");
    }
    // Long polls that time out: the relay's wait and the request's own timeout.
    let mailbox = client.mailbox();
    let answer = client
        .request(ClientToRelay::Subscribe {
            mailbox,
            after: 0,
            wait_ms: 50,
        })
        .await
        .expect("answer");
    assert!(
        matches!(&answer, RelayToClient::Batch { items, .. } if items.is_empty()),
        "{answer:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let names = thread_names();
    assert!(!names.is_empty());
    assert!(
        !names.iter().any(|n| n == "futures-timer"),
        "a futures-timer thread runs: {names:?}"
    );
    relay.shutdown().await.unwrap();
}
