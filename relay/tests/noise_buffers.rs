//! The Noise layer under every libp2p connection (the patched libp2p-noise in relay/vendor):
//! data of every size still arrives whole and in order, and a connection that has carried
//! large frames goes back to holding no more memory than one that never did.
//!
//! Upstream kept, per connection and for its whole life, a send buffer as large as the
//! largest frame ever sent (up to 64 KiB) and an encryption buffer 1 KiB larger still.

use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};
use libp2p::identity::Keypair;
use libp2p::noise;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

type Noise = noise::Output<Compat<TcpStream>>;

/// Two ends of a Noise session over a loopback TCP connection.
async fn pair() -> (Noise, Noise) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (dialed, accepted) = (dialed.unwrap().compat(), accepted.unwrap().0.compat());
    let initiator = noise::Config::new(&Keypair::generate_ed25519()).unwrap();
    let responder = noise::Config::new(&Keypair::generate_ed25519()).unwrap();
    let (a, b) = tokio::join!(
        initiator.upgrade_outbound(dialed, "/noise"),
        responder.upgrade_inbound(accepted, "/noise")
    );
    (a.unwrap().1, b.unwrap().1)
}

/// Sends `data` from `from` to `to` in writes of `chunk` bytes, then checks it arrived whole.
async fn carry(from: &mut Noise, to: &mut Noise, data: &[u8], chunk: usize) {
    let send = async {
        for part in data.chunks(chunk.max(1)) {
            from.write_all(part).await.unwrap();
        }
        from.flush().await.unwrap();
    };
    let receive = async {
        let mut got = vec![0u8; data.len()];
        to.read_exact(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(send, receive)
    })
    .await
    .expect("data did not arrive within 30 s");
    assert!(
        got == data,
        "{} bytes in writes of {chunk} arrived changed",
        data.len()
    );
}

fn data(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + seed) as u8).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn large_frames_leave_nothing_behind_and_every_size_arrives_whole() {
    // dhat writes its profile when an assertion fails: to the temporary directory.
    let _profiler = dhat::Profiler::builder()
        .testing()
        .file_name(std::env::temp_dir().join("kkachi-noise-buffers-dhat.json"))
        .build();
    let (mut a, mut b) = pair().await;

    // Both ends idle after small traffic only.
    carry(&mut a, &mut b, b"hello", 5).await;
    carry(&mut b, &mut a, b"hello", 5).await;
    let before = dhat::HeapStats::get().curr_bytes;

    // Every size around the frame limit (65,519 bytes of cleartext) and the 1 KiB kept, in
    // one write and in many.
    for (seed, len) in [
        0, 1, 15, 16, 17, 1023, 1024, 1025, 65_518, 65_519, 65_520, 300_000,
    ]
    .into_iter()
    .enumerate()
    {
        carry(&mut a, &mut b, &data(len, seed), usize::MAX).await;
        carry(&mut b, &mut a, &data(len, seed + 1), 777).await;
    }

    // Idle again after small traffic.
    carry(&mut a, &mut b, b"hello", 5).await;
    carry(&mut b, &mut a, b"hello", 5).await;
    let after = dhat::HeapStats::get().curr_bytes;

    // Upstream holds about 290 KB more here (its buffers grown to the largest frame).
    dhat::assert!(
        after <= before + 2048,
        "after large frames the two ends hold {} bytes more than before",
        after.saturating_sub(before)
    );
}
