//! Exponential backoff with jitter, the one schedule for every retry in the client:
//! delivery attempts, long polls on our relays, circuit reservations and the search
//! for a contact's direct path. Pure: the caller passes the failures so far and a
//! random number, so it is tested without a clock.

use std::time::Duration;

/// Waits that double from `first` up to `max` with each failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failure.
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Backoff {
    /// The wait after `failures` failures: in `[cap/2, cap]` for
    /// `cap = min(max, first·2^failures)`; `jitter` (any number, random in practice)
    /// picks where, so clients that failed together do not retry together.
    pub fn wait(&self, failures: u32, jitter: u64) -> Duration {
        let first = self.first.as_millis() as u64;
        let cap = first
            .saturating_mul(1 << failures.min(20))
            .min(self.max.as_millis() as u64);
        Duration::from_millis(cap / 2 + jitter % (cap / 2 + 1))
    }

    /// [`Backoff::wait`] in milliseconds.
    pub fn wait_ms(&self, failures: u32, jitter: u64) -> u64 {
        self.wait(failures, jitter).as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: Backoff = Backoff {
        first: Duration::from_millis(500),
        max: Duration::from_secs(15),
    };

    proptest! {
        #[test]
        fn waits_double_up_to_the_cap_within_their_jitter(failures in 0u32..64, jitter in any::<u64>()) {
            let wait = B.wait_ms(failures, jitter);
            let cap = (500u64 << failures.min(20)).min(15_000);
            prop_assert!(wait >= cap / 2 && wait <= cap, "{wait} outside [{}, {cap}]", cap / 2);
        }
    }

    #[test]
    fn the_first_wait_is_about_first_and_the_last_about_max() {
        assert!((250..=500).contains(&B.wait_ms(0, 12345)));
        assert!((7_500..=15_000).contains(&B.wait_ms(40, 999)));
        assert_eq!(B.wait_ms(3, 0), 2_000, "no jitter: half the cap");
    }
}
