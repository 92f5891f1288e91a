//! kkachi-client: the messenger.
//!
//! - [`store`]: the local sled database (identity, contacts, sessions, messages,
//!   outbox, cursors).
//! - [`net`]: the task owning the libp2p Swarm (relays, LAN peers via mDNS).
//! - [`engine`]: the delivery engine: durable outbox, multi-path delivery with retries,
//!   receiving with deduplication, receipts and gap detection.
pub mod engine;
pub mod net;
pub mod store;
