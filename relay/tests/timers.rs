//! libp2p's timeouts (the patched futures-timer in relay/vendor): inside a Tokio runtime a
//! `Delay` runs on that runtime's timer, so it follows the runtime's clock; outside one it
//! still fires, on upstream's helper thread. Each check runs on its own thread and is given
//! ten real seconds, so a delay that ignores the runtime's clock fails instead of hanging.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_timer::Delay;

/// Runs `check` on a fresh thread and fails if it does not finish within ten seconds.
fn within_ten_seconds<T: Send + 'static>(check: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(check());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the delay did not fire within ten real seconds")
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

#[test]
fn a_delay_made_in_a_runtime_follows_its_clock() {
    // An hour on the paused clock passes at once; on a helper thread it would take an hour.
    let (virtual_elapsed, real_elapsed) = within_ten_seconds(|| {
        paused_runtime().block_on(async {
            let start = tokio::time::Instant::now();
            let real = Instant::now();
            Delay::new(Duration::from_secs(3600)).await;
            (start.elapsed(), real.elapsed())
        })
    });
    assert!(
        virtual_elapsed >= Duration::from_secs(3600),
        "{virtual_elapsed:?}"
    );
    assert!(real_elapsed < Duration::from_secs(10), "{real_elapsed:?}");
}

#[test]
fn reset_moves_the_deadline() {
    let (early, fired_at) = within_ten_seconds(|| {
        paused_runtime().block_on(async {
            let start = tokio::time::Instant::now();
            let mut delay = Delay::new(Duration::from_secs(10));
            // Not due after 5 s...
            let early = tokio::time::timeout(Duration::from_secs(5), &mut delay)
                .await
                .is_ok();
            // ...and reset to 60 s from then: fires at 65 s, not at 10.
            delay.reset(Duration::from_secs(60));
            delay.await;
            (early, start.elapsed())
        })
    });
    assert!(!early, "the delay fired before its deadline");
    assert!(fired_at >= Duration::from_secs(65), "fired at {fired_at:?}");
    assert!(fired_at < Duration::from_secs(66), "fired at {fired_at:?}");
}

#[test]
fn huge_delays_do_not_overflow() {
    within_ten_seconds(|| {
        paused_runtime().block_on(async {
            let mut delay = Delay::new(Duration::MAX);
            assert!(
                tokio::time::timeout(Duration::from_secs(86_400), &mut delay)
                    .await
                    .is_err()
            );
            delay.reset(Duration::MAX);
            assert!(
                tokio::time::timeout(Duration::from_secs(86_400), &mut delay)
                    .await
                    .is_err()
            );
        })
    });
}

#[test]
fn a_delay_made_outside_a_runtime_still_fires() {
    let elapsed = within_ten_seconds(|| {
        let start = Instant::now();
        futures::executor::block_on(Delay::new(Duration::from_millis(30)));
        start.elapsed()
    });
    assert!(elapsed >= Duration::from_millis(30), "{elapsed:?}");
}
