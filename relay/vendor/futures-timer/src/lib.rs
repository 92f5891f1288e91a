//! A general purpose crate for working with timeouts and delays with futures.
//!
//! kkachi's build: a [`Delay`] made inside a Tokio runtime runs on that runtime's timer
//! (which must be enabled, as it is in every kkachi runtime); one made elsewhere runs on
//! upstream's helper thread, as before. See `PATCHED.md`.
//!
//! # Examples
//!
//! ```no_run
//! # async fn example() {
//! use std::time::Duration;
//! use futures_timer::Delay;
//!
//! let now = Delay::new(Duration::from_secs(3)).await;
//! println!("waited for 3 secs");
//! # }
//! ```

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]

// Upstream's timer thread, unchanged; it only serves delays made outside a runtime.
#[allow(deprecated, dead_code, unexpected_cfgs)]
mod native;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// A future representing the notification that an elapsed duration has
/// occurred.
///
/// This is created through the `Delay::new` method indicating when the future should fire.
/// Note that these futures are not intended for high resolution timers, but rather they will
/// likely fire some granularity after the exact instant that they're otherwise indicated to fire
/// at.
pub struct Delay {
    inner: Inner,
}

enum Inner {
    Tokio(Pin<Box<tokio::time::Sleep>>),
    Thread(native::ThreadDelay),
}

/// `dur` from now, or thirty years from now where that overflows (as Tokio does).
fn deadline(dur: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(dur)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
}

impl Delay {
    /// Creates a new future which will fire at `dur` time into the future.
    ///
    /// Inside a Tokio runtime the delay runs on that runtime's timer; elsewhere on the
    /// default timer, spun up in a helper thread on first use.
    #[inline]
    pub fn new(dur: Duration) -> Delay {
        let inner = if tokio::runtime::Handle::try_current().is_ok() {
            Inner::Tokio(Box::pin(tokio::time::sleep_until(deadline(dur))))
        } else {
            Inner::Thread(native::ThreadDelay::new(dur))
        };
        Delay { inner }
    }

    /// Resets this timeout to fire `dur` time from now, whether or not it has fired.
    #[inline]
    pub fn reset(&mut self, dur: Duration) {
        match &mut self.inner {
            Inner::Tokio(sleep) => sleep.as_mut().reset(deadline(dur)),
            Inner::Thread(delay) => delay.reset(dur),
        }
    }
}

impl Future for Delay {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.inner {
            Inner::Tokio(sleep) => sleep.as_mut().poll(cx),
            Inner::Thread(delay) => Pin::new(delay).poll(cx),
        }
    }
}

impl fmt::Debug for Delay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> Result<(), fmt::Error> {
        f.debug_struct("Delay").finish()
    }
}
