//! kkachi-relay: the client↔relay wire protocol, and (feature `server`, on by default)
//! the relay itself: a durable store-and-forward mailbox server.
//!
//! A relay holds end-to-end encrypted envelopes for recipients until they fetch and
//! delete them. It sees a mailbox address and opaque bytes: no plaintext, no sender.
//! Users pick several relays run by different people; any one of them is enough.
//!
//! The client half, what a messenger needs to talk to relays and to contacts, builds
//! without the server (`default-features = false`: no store, no metrics, no rate
//! limiter):
//! - [`session`]: the session protocol (`/kkachi/relay/2`), both sides: [`session::Session`]
//!   asks, [`session::serve`] answers;
//! - [`framing`]: frames on a session stream;
//! - [`transport`]: the Swarm every kkachi node is built on;
//! - [`client`]: a minimal client for one relay, for tools and tests.
//!
//! The server (feature `server`):
//! - [`config`]: the TOML configuration with every field documented and defaulted;
//! - [`store`]: the [`MailboxStore`](store::MailboxStore) seam, with the durable sled
//!   store (group commit) and an in-memory one;
//! - `service`: what each request does (validation, ownership, quotas, rate limits);
//! - `node`: the task owning the libp2p Swarm, the relay's one event loop: requests,
//!   long polls, graceful shutdown;
//! - [`metrics`]: Prometheus metrics and the `/metrics` + `/healthz` endpoint.
//!
//! [`start`] runs a relay from a [`Config`] and returns a [`RelayHandle`]; the binary
//! (`main.rs`) only parses flags, builds the config and waits for a signal.

pub mod client;
pub mod framing;
pub mod session;
pub mod transport;

#[cfg(feature = "server")]
mod address_limits;
#[cfg(feature = "server")]
mod boxed;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
mod node;
#[cfg(feature = "server")]
mod server;
#[cfg(feature = "server")]
mod service;
#[cfg(feature = "server")]
pub mod store;

#[cfg(feature = "server")]
pub use server::*;
