//! kkachi-client: the messenger.
//!
//! One event loop owns the messenger's state: the engine's owner task
//! ([`engine`]'s `owner`), which holds the store's writes, the outbox's schedule and
//! the long polls on our relays, and sleeps until its next deadline or event. Beside
//! it, the network task ([`net`]) owns the libp2p Swarm and answers the engine's
//! requests. The CLI, the daemon and the terminal UI hold an [`engine::Engine`]
//! handle and talk to the owner through it; nothing else writes.
//!
//! - [`store`]: the local sled database (identity, contacts, sessions, messages,
//!   outbox, cursors, message requests, blocked senders), sealed under a key kept in
//!   the home, optionally behind a passphrase ([`passphrase`] asks for it).
//! - [`sequence`]: what a contact's sequence numbers and hash chain say is missing or
//!   altered, in bounded space.
//! - [`sanitize`]: text a peer chose, made safe to print on a terminal.
//! - [`backoff`]: the one retry schedule.
//! - [`net`]: the task owning the libp2p Swarm (relays, contacts directly, LAN peers
//!   by beacons only contacts recognise).
//! - [`engine`]: the delivery engine: its sans-io core (what is due, backoff, what an
//!   answer changes), the owner task, receiving with deduplication, receipts and gap
//!   detection, message requests.
//! - [`runtime`]: the engine started with a real network, and the network's settings.
//! - [`backup`]: backups of a home; [`link`]: handing the account to a new device.
//! - [`cli`], [`commands`]: the command line; [`ipc`] forwards commands to a running
//!   daemon or UI, which holds the database.
//! - [`tui`]: the terminal UI.
pub mod backoff;
pub mod backup;
pub mod cli;
pub mod commands;
pub mod engine;
pub mod files;
pub mod ipc;
pub mod link;
pub mod net;
pub mod passphrase;
pub mod qr;
pub mod runtime;
pub mod sanitize;
pub mod sequence;
pub mod store;
pub mod time;
pub mod tui;
