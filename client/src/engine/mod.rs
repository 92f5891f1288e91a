//! The delivery engine: everything between "the user pressed send" and "the contact's
//! device has it", and the way back.
//!
//! One task owns the engine (`owner/`): the store's writes, the live end-to-end
//! sessions, the outbox's schedule and the long polls on our own relays. It sleeps until
//! the next deadline or the next event (a command, a network answer, a flush done, a
//! network event): no fixed-interval polling. Everything else talks to it through an
//! [`Engine`] handle, cheap to clone: the CLI, the daemon, the terminal UI, the control
//! socket. Its decisions (what is due, backoff, what an answer does to a message's
//! state) are pure functions in [`machine`], tested with a fake clock.
//!
//! Sending: a message is sealed, wrapped in an envelope, and written to the store with
//! the session state that sealed it, in one write set; its delivery starts at once (at
//! most `MAX_UNSAVED_SEALS` packets ever leave before their write is durable, so no
//! session counter repeats after a crash); [`SendEvent::Durable`] follows once it is on
//! disk. Delivery puts the envelope on every inbox relay of the recipient (and hands it
//! over directly when connected), retrying each path that has not acknowledged, with
//! backoff, until the contact's delivery receipt arrives. States: queued → relayed n/N
//! → delivered → read.
//!
//! Receiving (`receive.rs`): each envelope on its own, from any relay or path, is
//! deduplicated, opened and stored; a view of the store may show it then. Once durable
//! it is answered with a receipt, and only then deleted from the relay. Sequence gaps
//! and breaks in a contact's hash chain are recorded and shown. First messages from
//! people who are not contacts are held as requests.
//!
//! Contacts (`contacts.rs`): adding, accepting a request, blocking, removing, renaming:
//! changes made on the owner task like everything else.

mod bundle;
mod contacts;
mod devices;
mod groups;
pub mod machine;
mod own;
mod owner;
mod receive;
mod state;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kkachi_protocol::{Card, Envelope, Identity, MessageId, PeerId};
use thiserror::Error;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::net::{NetEvent, Transport};
use crate::store::{LocalStore, MessageState, StoreError};

pub(crate) use bundle::export_items;
pub use bundle::{Imported, MAX_CARRIED_RELAYS, MAX_FORWARDING, MAX_FORWARDING_BYTES};
pub use contacts::{ContactError, ContactOutcome};
pub use devices::{device_change_line, fingerprint};
pub use groups::{GroupChange, GroupChanged, GroupFilePlace, GroupFileRoute, GroupSent, GroupTag};
pub(crate) use groups::{group_poll_name, large_status};
pub use machine::Progress;
pub use receive::{Change, Received, Verdict};

use owner::{Command, Owner};
use state::State;

/// How long one delivery attempt to one relay may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Long-poll wait on each of our relays.
pub const SUBSCRIBE_WAIT_MS: u32 = 25_000;
/// Capacity of the application event channel.
const EVENT_CAPACITY: usize = 1024;
/// Capacity of the command channel into the owner task.
const COMMANDS: usize = 256;

/// Failures the user can act on.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The message is invalid (too long, ...).
    #[error("{0}")]
    Invalid(String),
    /// Encryption failed.
    #[error("encryption failed: {0}")]
    Session(#[from] kkachi_protocol::SessionError),
    /// A change to contacts was refused.
    #[error(transparent)]
    Contact(#[from] ContactError),
    /// The engine has stopped (the process is shutting down).
    #[error("the engine has stopped")]
    Stopped,
    /// What was written could not be made durable.
    #[error("the local database could not save it: {0}")]
    NotSaved(Arc<StoreError>),
    /// What the caller prepared no longer fits (a group's key changed meanwhile):
    /// nothing was done, and it may be prepared again.
    #[error("{0}")]
    Changed(String),
}

/// Why one of our relays did not serve a request.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RelayError {
    /// No answer: down, unreachable, or too slow.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// It answered, and refused (its own words).
    #[error("refused: {0}")]
    Refused(String),
    /// No answer before the caller's deadline.
    #[error("no answer in time")]
    Late,
    /// What it sent could not be stored here; it is fetched again.
    #[error("what came could not be stored: {0}")]
    NotStored(String),
}

/// Something the user interface may want to show.
#[derive(Debug, Clone)]
pub enum AppEvent {
    /// A new message is in the store, not yet on disk: a view of the store (the
    /// terminal UI) may show it now. If the process dies before the disk has it, it was
    /// never acknowledged, so it arrives again after a restart and is stored once.
    /// [`AppEvent::Message`] follows once it is durable.
    Incoming(Received),
    /// A new message is durable. Sent exactly once per message, even across a crash:
    /// for output that cannot be taken back (the daemon's stream of messages).
    Message(Received),
    /// An outgoing message changed state.
    State {
        /// The contact.
        contact: PeerId,
        /// The message.
        id: MessageId,
        /// Its new state.
        state: MessageState,
    },
    /// An outgoing message was handed to the contact's device directly (it is
    /// [`MessageState::Delivered`]).
    HandedOver {
        /// The contact.
        contact: PeerId,
        /// The message.
        id: MessageId,
    },
    /// A contact was added, changed (new relays or name), blocked or removed.
    ContactUpdated(PeerId),
    /// A contact's account listed devices or took some out (SPEC §15): session keys
    /// that now speak for them, or no longer do. Not sent for the first list.
    DevicesChanged {
        /// The contact.
        contact: PeerId,
        /// What the user calls them.
        name: String,
        /// Devices listed now: name and key.
        added: Vec<(String, [u8; 32])>,
        /// Keys taken out.
        removed: Vec<[u8; 32]>,
    },
    /// Someone who is not a contact sent a message; it is held as a request.
    Request(PeerId),
    /// A relay answered (true) or failed (false).
    Relay {
        /// Its address.
        addr: String,
        /// Reachable.
        up: bool,
    },
}

/// A message sealed into the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    /// The message id.
    pub id: MessageId,
    /// Its outbox key.
    pub outbox_key: u64,
}

/// How a send goes, as it happens.
#[derive(Debug, Clone)]
pub enum SendEvent {
    /// The message is durable in the outbox: it will be delivered, whatever happens to
    /// this process.
    Durable,
    /// It could not be made durable: it may be lost with this process.
    NotDurable(Arc<StoreError>),
    /// More paths acknowledged.
    Progress(Progress),
    /// The contact has it: handed over directly (`true`), or confirmed by its receipt.
    Delivered {
        /// Handed over directly.
        direct: bool,
    },
    /// It left the outbox undelivered: the contact was removed or blocked.
    Withdrawn,
    /// A relay of the contact's answered and refused it (it is tried again later): the
    /// relay's address and its reason, which starts with the error code (`quota_exceeded:
    /// …`, `rate_limited: …`).
    Refused {
        /// The relay.
        relay: String,
        /// Its reason.
        reason: String,
    },
}

/// A send under way: the message, and its progress as it happens.
#[derive(Debug)]
pub struct Sending {
    /// The message.
    pub queued: Queued,
    /// What happens to it: [`SendEvent::Durable`] (or `NotDurable`) first, then progress
    /// until it is delivered or this engine stops. Dropping it changes nothing.
    pub events: mpsc::Receiver<SendEvent>,
}

/// What a send carries.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A text, perhaps a reply.
    Text {
        text: String,
        reply_to: Option<MessageId>,
    },
    /// A file whose chunks are uploaded, and writes to make with its message.
    File {
        file: Box<kkachi_protocol::file::FileRef>,
        with: crate::store::WriteSet,
    },
}

/// What the engine does on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// Keep a long poll open on each of our relays and take in what arrives.
    pub inbox: bool,
    /// Deliver the outbox (otherwise it only fills, for a later run to deliver).
    pub deliver: bool,
}

impl Mode {
    /// The daemon and the terminal UI: receive and deliver, for as long as it runs.
    pub const ONLINE: Mode = Mode {
        inbox: true,
        deliver: true,
    };
    /// A one-shot command (`send`, `sync`): deliver; receive only when asked.
    pub const ONE_SHOT: Mode = Mode {
        inbox: false,
        deliver: true,
    };
    /// A change to local state only (contacts): nothing goes out.
    pub const LOCAL: Mode = Mode {
        inbox: false,
        deliver: false,
    };
}

/// What a [`Engine::sync`] did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// New messages, as they came.
    pub shown: Vec<Received>,
    /// Each of our relays, and whether it answered (or why not).
    pub relays: Vec<(String, Result<(), RelayError>)>,
    /// Each group relay of our groups with group relays, and whether it answered any
    /// read of a group queue there (or why not).
    pub group_relays: Vec<(String, Result<(), RelayError>)>,
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `run`, boxed to be run on the owner task, its result boxed in turn.
fn boxed<T, R: Send + 'static>(
    run: impl FnOnce(&mut State<T>, u64) -> Result<R, EngineError> + Send + 'static,
) -> owner::Change<T> {
    Box::new(move |state, now| {
        run(state, now).map(|r| Box::new(r) as Box<dyn std::any::Any + Send>)
    })
}

/// A handle to the engine's owner task. Cheap to clone; the task stops (after flushing)
/// when the last handle is dropped or on [`Engine::shutdown`].
#[derive(Debug)]
pub struct Engine<T> {
    commands: mpsc::Sender<Command<T>>,
    events: broadcast::Sender<AppEvent>,
    store: LocalStore,
    me: Identity,
    /// Our session key before its last rotation, while its queues are read.
    previous: Option<Identity>,
    net: T,
    faults: Arc<AtomicU64>,
    task: Arc<parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    transfers: Arc<crate::files::Live>,
}

impl<T: Clone> Clone for Engine<T> {
    fn clone(&self) -> Self {
        Self {
            commands: self.commands.clone(),
            events: self.events.clone(),
            store: self.store.clone(),
            me: self.me.clone(),
            previous: self.previous.clone(),
            net: self.net.clone(),
            faults: self.faults.clone(),
            task: self.task.clone(),
            transfers: self.transfers.clone(),
        }
    }
}

impl<T: Transport> Engine<T> {
    /// Starts the owner task for `me` over `store` and `net` (whose events come on
    /// `net_events`, if it has any), doing what `mode` says.
    pub fn start(
        store: LocalStore,
        me: Identity,
        net: T,
        net_events: Option<mpsc::Receiver<NetEvent>>,
        mode: Mode,
    ) -> Self {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (commands, commands_rx) = mpsc::channel(COMMANDS);
        let faults = Arc::new(AtomicU64::new(0));
        let previous = state::previous_key(&store, &me);
        let state = State::new(
            store.clone(),
            me.clone(),
            previous.clone(),
            net.clone(),
            events.clone(),
            faults.clone(),
        );
        let owner = Owner::new(state, mode, commands_rx, net_events);
        let task = tokio::spawn(owner.run());
        Self {
            commands,
            events,
            store,
            me,
            previous: previous.map(|p| p.identity),
            net,
            faults,
            task: Arc::new(parking_lot::Mutex::new(Some(task))),
            transfers: Arc::default(),
        }
    }

    /// The local store (for reading; the owner task makes the writes that matter).
    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    /// The user's identity.
    pub fn identity(&self) -> &Identity {
        &self.me
    }

    /// Our identity with its session key before the last rotation, while what was put
    /// into that key's inbox (messages, chunks of files) can still be there.
    pub fn previous_identity(&self) -> Option<&Identity> {
        self.previous.as_ref()
    }

    /// The network.
    pub fn net(&self) -> &T {
        &self.net
    }

    /// The file transfers this process runs.
    pub fn transfers(&self) -> &Arc<crate::files::Live> {
        &self.transfers
    }

    /// Subscribes to application events.
    pub fn subscribe(&self) -> broadcast::Receiver<AppEvent> {
        self.events.subscribe()
    }

    /// How many envelopes were refused since start because reading them panicked: a
    /// bug in kkachi, which the log names. The rest of their batch went on.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// Sends `command`, built around a reply channel, and waits for the reply.
    async fn ask<R>(
        &self,
        command: impl FnOnce(oneshot::Sender<R>) -> Command<T>,
    ) -> Result<R, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)
    }

    /// Runs `change` on the owner task, makes what it wrote durable, and returns its
    /// result.
    async fn change<R: Send + 'static>(
        &self,
        change: impl FnOnce(&mut State<T>, u64) -> Result<R, EngineError> + Send + 'static,
    ) -> Result<R, EngineError> {
        let run = boxed(change);
        let result = self.ask(|reply| Command::Change { run, reply }).await??;
        Ok(*result
            .downcast::<R>()
            .expect("a change answers with its own type"))
    }

    /// Runs `read` on the owner task and returns its result; it writes nothing, so
    /// nothing is flushed or granted again for it.
    async fn read<R: Send + 'static>(
        &self,
        read: impl FnOnce(&mut State<T>, u64) -> Result<R, EngineError> + Send + 'static,
    ) -> Result<R, EngineError> {
        let run = boxed(read);
        let result = self.ask(|reply| Command::Read { run, reply }).await??;
        Ok(*result
            .downcast::<R>()
            .expect("a read answers with its own type"))
    }

    /// Sends `text` to `contact`: returns once it is sealed into the outbox, with its
    /// progress to come (durable first).
    pub async fn send(&self, contact: PeerId, text: String) -> Result<Sending, EngineError> {
        self.send_reply(contact, text, None).await
    }

    /// [`send`](Self::send), as a reply to message `reply_to` of the conversation (ours
    /// or theirs) when given.
    pub async fn send_reply(
        &self,
        contact: PeerId,
        text: String,
        reply_to: Option<MessageId>,
    ) -> Result<Sending, EngineError> {
        self.ask(|reply| Command::Send {
            contact,
            what: Outgoing::Text { text, reply_to },
            reply,
        })
        .await?
    }

    /// Sends a message carrying `file` to `contact` (its chunks are on the contact's
    /// relays already), with the writes `with` in the same write set: the caller's record
    /// that the message went, so it never goes twice.
    pub async fn send_file(
        &self,
        contact: PeerId,
        file: kkachi_protocol::file::FileRef,
        with: crate::store::WriteSet,
    ) -> Result<Sending, EngineError> {
        self.ask(|reply| Command::Send {
            contact,
            what: Outgoing::File {
                file: Box::new(file),
                with,
            },
            reply,
        })
        .await?
    }

    /// Reacts to message `target` with `emoji` ("" takes our reaction back).
    pub async fn react(
        &self,
        peer: PeerId,
        target: MessageId,
        emoji: String,
    ) -> Result<(), EngineError> {
        self.change(move |state, now| state.react(&peer, target, emoji, now))
            .await
    }

    /// Founds a group named `name`, with us as its only member and admin.
    pub async fn create_group(
        &self,
        name: String,
    ) -> Result<kkachi_protocol::group::GroupId, EngineError> {
        self.change(move |state, now| state.create_group(&name, now))
            .await
    }

    /// Changes group `id` (members, roles, name, mode) and tells its members.
    pub async fn change_group(
        &self,
        id: kkachi_protocol::group::GroupId,
        change: GroupChange,
    ) -> Result<GroupChanged, EngineError> {
        self.change(move |state, now| state.change_group(id, change, now))
            .await
    }

    /// Marks group `id`'s messages read and tells their authors; returns how many.
    pub async fn mark_group_read(
        &self,
        id: kkachi_protocol::group::GroupId,
    ) -> Result<usize, EngineError> {
        self.change(move |state, now| state.mark_group_read(id, now))
            .await
    }

    /// Forgets group `id` (one we left or were removed from) here; returns how many of
    /// its messages went.
    pub async fn forget_group(
        &self,
        id: kkachi_protocol::group::GroupId,
    ) -> Result<usize, EngineError> {
        self.change(move |state, _| state.forget_group(id)).await
    }

    /// Seals `text` to every member of group `id`; returns once it is durable.
    pub async fn send_group(
        &self,
        id: kkachi_protocol::group::GroupId,
        text: String,
    ) -> Result<GroupSent, EngineError> {
        self.change(move |state, now| state.send_group(id, &text, now))
            .await
    }

    /// Sends a message carrying `file` to group `id`, in one write with `with`; returns
    /// once it is durable. In a group without group relays it is sealed to the members
    /// `to` (those whose relays took its chunks); with group relays it is posted under
    /// the epoch whose group queues on those relays hold the chunks (`put_in`;
    /// `Changed` if we may no longer write under it, or the relays changed).
    pub async fn send_group_file(
        &self,
        id: kkachi_protocol::group::GroupId,
        file: kkachi_protocol::file::FileRef,
        to: Vec<PeerId>,
        put_in: Option<GroupFilePlace>,
        with: crate::store::WriteSet,
    ) -> Result<GroupSent, EngineError> {
        self.change(move |state, now| state.send_group_file(id, file, to, put_in, with, now))
            .await
    }

    /// The group queues of epoch `epoch` of group `group` on its relays now (none if we
    /// do not hold that epoch): where a file posted under it is.
    pub async fn group_epoch_queues(
        &self,
        group: kkachi_protocol::group::GroupId,
        epoch: [u8; 32],
    ) -> Result<Vec<(kkachi_protocol::Multiaddr, kkachi_protocol::GroupKey)>, EngineError> {
        self.read(move |state, _| state.epoch_queues_of(group, epoch))
            .await
    }

    /// Where a file for group `id` goes now; an error if we may not post there.
    pub async fn group_file_route(
        &self,
        id: kkachi_protocol::group::GroupId,
    ) -> Result<GroupFileRoute, EngineError> {
        self.read(move |state, _| state.group_file_route(id)).await
    }

    /// Marks `peer`'s messages read and tells them (read receipts).
    pub async fn mark_read(&self, peer: PeerId) -> Result<(), EngineError> {
        self.change(move |state, now| state.mark_read(&peer, now).map(drop))
            .await
    }

    /// Our relays changed: takes the new set, and (if `announce`) sends our new card to
    /// every contact. Returns how many were sent it.
    pub async fn relays_changed(&self, announce: bool) -> Result<usize, EngineError> {
        self.ask(|reply| Command::RelaysChanged { announce, reply })
            .await?
    }

    /// Delivers everything waiting, now, and fetches what waits at each of our relays
    /// (no long wait); returns once that is done and what it led to (receipts) has gone
    /// out, or after `timeout` with what was done by then.
    pub async fn sync(&self, timeout: Duration) -> Result<SyncReport, EngineError> {
        self.ask(|reply| Command::Sync { timeout, reply }).await
    }

    /// Returns once nothing is under way and nothing is due now.
    pub async fn settle(&self) -> Result<(), EngineError> {
        self.ask(|reply| Command::Settle {
            force: false,
            reply,
        })
        .await
    }

    /// Makes every path not yet acknowledged due now, and returns once nothing is under
    /// way and nothing is due.
    pub async fn deliver_now(&self) -> Result<(), EngineError> {
        self.ask(|reply| Command::Settle { force: true, reply })
            .await
    }

    /// Relays may be back (one was restarted, the network returned): what waits out a
    /// backoff is tried now, and long polls start again. Returns at once.
    pub fn retry_now(&self) {
        let _ = self.commands.try_send(Command::RetryNow);
    }

    /// How far outbox entry `key` got (None once it is gone: delivered, or done).
    pub async fn progress(&self, key: u64) -> Result<Option<Progress>, EngineError> {
        self.ask(|reply| Command::Progress { key, reply }).await
    }

    /// Takes in envelopes (as from a relay). Returns new texts.
    pub async fn receive(&self, envelopes: Vec<Envelope>) -> Result<Vec<Received>, EngineError> {
        self.change(move |state, now| {
            state
                .receive(&envelopes, receive::Source::Network, now)
                .map(|t| t.shown)
        })
        .await
    }

    /// Takes in the envelopes of a bundle: reads those for us, and queues the others
    /// to be put into the relays it names. Returns once that is durable.
    pub async fn import_bundle(
        &self,
        mut items: Vec<kkachi_protocol::bundle::Item>,
    ) -> Result<Imported, EngineError> {
        // A part at a time: the engine goes on with other work in between.
        let mut report = Imported::default();
        let mut carrying = None;
        while !items.is_empty() {
            let part: Vec<_> = items
                .drain(..items.len().min(bundle::IMPORT_CHUNK))
                .collect();
            let (done, then) = self
                .change(move |state, now| {
                    let mut carrying = carrying;
                    let done = state.import_bundle(&part, &mut carrying, now)?;
                    Ok((done, carrying))
                })
                .await?;
            carrying = then;
            report.add(&done);
        }
        Ok(report)
    }

    /// Our account's device set (made, this device alone, in a home from before sets).
    pub async fn own_devices(&self) -> Result<kkachi_protocol::device::DeviceSet, EngineError> {
        self.change(|state, now| {
            let mut w = crate::store::WriteSet::default();
            let set = state.own_devices(&mut w, now)?;
            state.store.apply(w)?;
            Ok(set)
        })
        .await
    }

    /// Gives this device a new name and queues the set for every contact: the set as
    /// it is now, and for how many contacts it was queued.
    pub async fn rename_device(
        &self,
        name: String,
    ) -> Result<(kkachi_protocol::device::DeviceSet, usize), EngineError> {
        self.change(move |state, now| {
            let set = state.rename_device(&name, now)?;
            let sent = state.announce_devices_if_due(now)?;
            Ok((set, sent))
        })
        .await
    }

    /// Takes the device `which` names out of the account and queues the set for every
    /// contact: the set as it is now, the key taken out, and for how many contacts it
    /// was queued.
    pub async fn remove_device(
        &self,
        which: String,
    ) -> Result<(kkachi_protocol::device::DeviceSet, [u8; 32], usize), EngineError> {
        self.change(move |state, now| {
            let (set, key) = state.remove_device(&which, now)?;
            let sent = state.announce_devices_if_due(now)?;
            Ok((set, key, sent))
        })
        .await
    }

    /// Adds or updates a contact from `card` (see [`ContactOutcome`]).
    pub async fn add_contact(
        &self,
        card: Card,
        name: Option<String>,
    ) -> Result<ContactOutcome, EngineError> {
        self.change(move |state, now| state.add_contact(&card, name.as_deref(), now))
            .await
    }

    /// Accepts `peer`'s message request.
    pub async fn accept_request(
        &self,
        peer: PeerId,
        name: Option<String>,
    ) -> Result<ContactOutcome, EngineError> {
        self.change(move |state, now| state.accept_request(&peer, name.as_deref(), now))
            .await
    }

    /// Drops `peer`'s message request; how many messages it held.
    pub async fn reject_request(&self, peer: PeerId) -> Result<usize, EngineError> {
        self.change(move |state, _| state.reject_request(&peer))
            .await
    }

    /// Blocks `peer`, known as `name`.
    pub async fn block(&self, peer: PeerId, name: String) -> Result<ContactOutcome, EngineError> {
        self.change(move |state, _| state.block(&peer, &name)).await
    }

    /// Unblocks `peer`; false if they were not blocked.
    pub async fn unblock(&self, peer: PeerId) -> Result<bool, EngineError> {
        self.change(move |state, _| state.unblock(&peer)).await
    }

    /// Removes contact `peer` and everything kept about them.
    pub async fn remove_contact(&self, peer: PeerId) -> Result<ContactOutcome, EngineError> {
        self.change(move |state, now| state.remove_contact(&peer, now))
            .await
    }

    /// Renames contact `peer`.
    pub async fn rename_contact(
        &self,
        peer: PeerId,
        name: String,
    ) -> Result<ContactOutcome, EngineError> {
        self.change(move |state, _| state.rename_contact(&peer, &name))
            .await
    }

    /// Sets the disappearing-message timer of the conversation with `peer` (seconds; 0
    /// turns it off), on both sides.
    pub async fn set_timer(&self, peer: PeerId, secs: u32) -> Result<(), EngineError> {
        self.change(move |state, now| state.set_timer(&peer, secs, now))
            .await
    }

    /// Changes (`Some(text)`) or deletes for everyone (`None`) our message `target`.
    pub async fn revise(
        &self,
        peer: PeerId,
        target: MessageId,
        text: Option<String>,
    ) -> Result<(), EngineError> {
        self.change(move |state, now| state.revise(&peer, target, text, now))
            .await
    }

    /// Deletes our copy of a message only.
    pub async fn delete_for_me(&self, peer: PeerId, target: MessageId) -> Result<(), EngineError> {
        self.change(move |state, _| state.delete_for_me(&peer, target))
            .await
    }

    /// Sends read receipts, or (`false`) only delivery receipts.
    pub async fn set_read_receipts(&self, on: bool) -> Result<(), EngineError> {
        self.change(move |state, _| state.set_read_receipts(on))
            .await
    }

    /// Mutes or unmutes the conversation with `peer`.
    pub async fn set_muted(&self, peer: PeerId, muted: bool) -> Result<(), EngineError> {
        self.change(move |state, _| state.set_muted(&peer, muted))
            .await
    }

    /// Deletes the messages whose disappearing-message timer ran out.
    pub async fn expire_messages(&self) -> Result<usize, EngineError> {
        self.change(|state, now| state.expire_messages(now)).await
    }

    /// Forgets what expired and takes in what waits (see the owner's upkeep).
    pub async fn housekeeping(&self) -> Result<(), EngineError> {
        self.change(|state, now| state.housekeeping(now).map(drop))
            .await
    }

    /// Stops the owner task: what is under way is dropped (it is retried later), what
    /// was written is flushed, and waiting answers are given. Returns once done, with
    /// the last flush's failure if it failed (stopped already: `Ok`).
    pub async fn shutdown(&self) -> Result<(), EngineError> {
        let result = match self.ask(|reply| Command::Shutdown { reply }).await {
            Ok(flushed) => flushed,
            Err(EngineError::Stopped) => Ok(()),
            Err(e) => Err(e),
        };
        let task = self.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
        result
    }
}
