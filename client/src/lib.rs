//! kkachi-client: the messenger.
//!
//! - [`store`]: the local sled database (identity, contacts, sessions, messages,
//!   outbox, cursors, message requests, blocked senders).
//! - [`sequence`]: what a contact's sequence numbers and hash chain say is missing or
//!   altered, in bounded space.
//! - [`sanitize`]: text a peer chose, made safe to print on a terminal.
//! - [`net`]: the task owning the libp2p Swarm (relays, LAN peers via mDNS).
//! - [`engine`]: the delivery engine: durable outbox, multi-path delivery with retries,
//!   receiving with deduplication, receipts and gap detection.
//! - [`runtime`]: the engine started with a real network, and the network's settings.
//! - [`cli`], [`commands`]: the command line; [`ipc`] forwards commands to a running
//!   daemon or UI, which holds the database.
//! - [`tui`]: the terminal UI.
pub mod cli;
pub mod commands;
pub mod engine;
pub mod ipc;
pub mod net;
pub mod qr;
pub mod runtime;
pub mod sanitize;
pub mod sequence;
pub mod store;
pub mod time;
pub mod tui;
