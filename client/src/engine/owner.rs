//! The engine's one event loop. One task owns the [`State`] (store writes, live
//! sessions), the outbox's schedule ([`Deliveries`]) and the long polls on our relays
//! ([`Inboxes`]); it sleeps until the next deadline or the next event:
//!
//! - a command from an [`Engine`](super::Engine) handle (send, a change to contacts, sync);
//! - a piece of work finishing: an attempt to deliver, a poll or fetch of our mailbox, a
//!   flush of the store;
//! - a network event (a contact handing us envelopes, a peer or relay appearing).
//!
//! Network exchanges and flushes run as futures this task polls, so it never waits on
//! the disk or the network: what must follow a write (an answer, a relay delete, a
//! "durable" to the sender) waits in `after` for the flush that covers the write, and
//! one flush covers every write made before it started (group commit). Nothing is
//! acknowledged before it is durable, and nothing leaves before the write that sealed
//! it is durable, but the newest sends (at most `MAX_UNSAVED_SEALS` at once).

use std::any::Any;
use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use kkachi_protocol::wire::PutOutcome;
use kkachi_protocol::{
    ClientToRelay, Envelope, EnvelopeId, MailboxId, Multiaddr, PeerId, RelayToClient,
};
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

use super::machine::{Attempt, Deliveries, EarlySends, Inboxes, Outcome, Path};
use super::receive::Source;
use super::state::State;
use super::{
    ATTEMPT_TIMEOUT, EngineError, Mode, Progress, SUBSCRIBE_WAIT_MS, SendEvent, Sending,
    SyncReport, now_ms,
};
use crate::net::{DirectReply, NetError, NetEvent, Transport, peer_of};
use crate::store::{LocalStore, StoreError, WriteSet};

/// Attempts to deliver under way at once.
const PARALLEL_DELIVERIES: usize = 16;
/// How often expired envelopes and requests are forgotten.
const HOUSEKEEPING_MS: u64 = 6 * 3600 * 1000;
/// How often contacts with messages waiting are sought for a direct path.
const SEEK_MS: u64 = 30_000;
/// Room for progress events per send; a receiver that lags misses some.
const SEND_EVENTS: usize = 32;

/// A change to run on the owner task; its result goes back boxed.
pub(super) type Change<T> =
    Box<dyn FnOnce(&mut State<T>, u64) -> Result<Box<dyn Any + Send>, EngineError> + Send>;

/// What a handle asks of the owner.
pub(super) enum Command<T> {
    Send {
        contact: PeerId,
        text: String,
        reply: oneshot::Sender<Result<Sending, EngineError>>,
    },
    Change {
        run: Change<T>,
        reply: oneshot::Sender<Result<Box<dyn Any + Send>, EngineError>>,
    },
    RelaysChanged {
        announce: bool,
        reply: oneshot::Sender<Result<usize, EngineError>>,
    },
    Sync {
        timeout: Duration,
        reply: oneshot::Sender<SyncReport>,
    },
    Settle {
        force: bool,
        reply: oneshot::Sender<()>,
    },
    Progress {
        key: u64,
        reply: oneshot::Sender<Option<Progress>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// A piece of work that finished.
enum Done {
    Attempt(Attempt, Outcome),
    Mailbox {
        relay: String,
        result: Result<RelayToClient, NetError>,
        sync: bool,
    },
    Flushed(Result<(), StoreError>),
    Deleted,
}

/// What waits for a write to be durable.
enum After {
    /// Let these outbox entries leave.
    Release(Vec<u64>),
    /// Announce messages durable, and new requests.
    Announce(Vec<super::Received>, Vec<PeerId>),
    /// Answer someone (told whether the flush succeeded).
    Reply(Box<dyn FnOnce(Result<(), String>) + Send>),
    /// A send is durable: its watcher hears so.
    SendDurable(u64),
    /// A batch from our mailbox at `relay` is durable: delete it there, move the cursor.
    Mailbox {
        relay: String,
        ids: Vec<EnvelopeId>,
        next: u64,
        more: bool,
        sync: bool,
    },
}

/// Who waits on a send's progress. What happens before its write is durable is kept
/// until then: "durable" always comes first.
struct Watcher {
    events: mpsc::Sender<SendEvent>,
    durable: bool,
    early: Vec<SendEvent>,
    /// Attempts under way for this message.
    in_flight: u32,
    /// The contact's receipt came while attempts were under way: whether one of them
    /// handed it over directly is known when they finish.
    receipted: bool,
    /// `Delivered` was told.
    delivered: bool,
    /// Its outbox entry is gone: no more attempts.
    gone: bool,
}

impl Watcher {
    fn new(events: mpsc::Sender<SendEvent>) -> Self {
        Watcher {
            events,
            durable: false,
            early: Vec::new(),
            in_flight: 0,
            receipted: false,
            delivered: false,
            gone: false,
        }
    }

    fn tell_delivered(&mut self, direct: bool) {
        if !self.delivered {
            self.delivered = true;
            self.tell(SendEvent::Delivered { direct });
        }
    }

    /// An attempt for it starts.
    fn on_attempt(&mut self) {
        self.in_flight += 1;
    }

    /// An attempt's answer, recorded: whether it handed the message over directly, the
    /// progress it made, and whether the outbox entry is gone.
    fn on_answer(&mut self, handed_over: bool, progress: Option<Progress>, gone: bool) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.gone |= gone;
        if handed_over {
            self.tell_delivered(true);
        } else if let Some(p) = progress {
            self.tell(SendEvent::Progress(p));
        }
        if self.receipted && self.in_flight == 0 {
            self.tell_delivered(false);
        }
    }

    /// Gone from the outbox, not by an answer here: the contact's receipt (or the
    /// contact was removed). An attempt under way may yet tell that it went directly.
    fn on_receipt(&mut self) {
        self.gone = true;
        match self.in_flight {
            0 => self.tell_delivered(false),
            _ => self.receipted = true,
        }
    }

    /// Nothing more will be told.
    fn finished(&self) -> bool {
        self.durable && self.in_flight == 0 && (self.delivered || self.gone)
    }

    fn tell(&mut self, event: SendEvent) {
        if self.durable {
            // A receiver that lags misses some progress; the last word is in the store.
            let _ = self.events.try_send(event);
        } else {
            self.early.push(event);
        }
    }

    fn durable(&mut self, flushed: Result<(), String>) {
        let first = match flushed {
            Ok(()) => SendEvent::Durable,
            Err(why) => SendEvent::NotDurable(why),
        };
        self.durable = true;
        self.tell(first);
        for event in std::mem::take(&mut self.early) {
            self.tell(event);
        }
    }
}

/// A sync under way.
struct SyncRun {
    left: Vec<String>,
    report: SyncReport,
    /// Past this, it answers with what it has.
    deadline: u64,
    reply: oneshot::Sender<SyncReport>,
}

pub(super) struct Owner<T> {
    state: State<T>,
    mode: Mode,
    deliveries: Deliveries,
    inboxes: Inboxes,
    commands: mpsc::Receiver<Command<T>>,
    net_events: Option<mpsc::Receiver<NetEvent>>,
    work: FuturesUnordered<BoxFuture<'static, Done>>,
    /// What waits for its write (the ticket) to be durable.
    after: Vec<(u64, After)>,
    flushing: bool,
    /// Sends that left before they were durable.
    early: EarlySends,
    /// Progress of sends, by outbox key.
    watchers: HashMap<u64, Watcher>,
    syncs: Vec<SyncRun>,
    settles: Vec<oneshot::Sender<()>>,
    next_housekeeping: u64,
    next_seek: u64,
    stopping: Option<oneshot::Sender<()>>,
}

impl<T: Transport> Owner<T> {
    pub(super) fn new(
        state: State<T>,
        mode: Mode,
        commands: mpsc::Receiver<Command<T>>,
        net_events: Option<mpsc::Receiver<NetEvent>>,
    ) -> Self {
        Self {
            state,
            mode,
            deliveries: Deliveries::default(),
            inboxes: Inboxes::default(),
            commands,
            net_events,
            work: FuturesUnordered::new(),
            after: Vec::new(),
            flushing: false,
            early: EarlySends::default(),
            watchers: HashMap::new(),
            syncs: Vec::new(),
            settles: Vec::new(),
            next_housekeeping: 0,
            next_seek: 0,
            stopping: None,
        }
    }

    pub(super) async fn run(mut self) {
        if let Err(e) = self.load() {
            tracing::error!(error = %e, "cannot read the outbox");
        }
        loop {
            let now = now_ms();
            self.start_work(now);
            self.settle_waiters(now);
            let sleep = self
                .next_deadline(now)
                .map(|at| tokio::time::sleep(Duration::from_millis(at.saturating_sub(now))));
            tokio::select! {
                // Finished work first: it releases answers and makes room for more.
                biased;
                Some(done) = self.work.next(), if !self.work.is_empty() => self.on_done(done),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break, // every handle is gone
                },
                Some(event) = recv(&mut self.net_events) => self.on_net_event(event),
                () = sleep_or_never(sleep) => {}
            }
            if self.stopping.is_some() {
                break;
            }
        }
        self.stop().await;
    }

    /// The outbox as stored, and our relays.
    fn load(&mut self) -> Result<(), EngineError> {
        for (key, entry) in self.state.store.outbox()? {
            self.deliveries.upsert(key, entry);
        }
        self.state.store.take_outbox_changes();
        self.deliveries.set_direct(self.state.net.direct_peers());
        self.take_relays()?;
        Ok(())
    }

    /// Our relays as stored: polled (in the inbox mode) and kept reservations at.
    fn take_relays(&mut self) -> Result<(), EngineError> {
        let relays: Vec<String> = self
            .state
            .store
            .relays()?
            .into_iter()
            .map(|r| r.addr)
            .collect();
        if self.mode.inbox {
            self.inboxes.set(relays.iter().cloned());
            self.state
                .net
                .reserve_at(relays.iter().filter_map(|a| a.parse().ok()).collect());
        }
        Ok(())
    }

    /// Final steps: make everything written durable, answer who waits.
    async fn stop(mut self) {
        let flushed = self.state.store.flush().await.map_err(|e| e.to_string());
        for (_, after) in std::mem::take(&mut self.after) {
            self.run_after(after, flushed.clone());
        }
        for run in self.syncs.drain(..) {
            let _ = run.reply.send(run.report);
        }
        for w in self.settles.drain(..) {
            let _ = w.send(());
        }
        if let Some(reply) = self.stopping.take() {
            let _ = reply.send(());
        }
        tracing::debug!("engine stopped");
    }

    // --- deadlines and work ---

    fn next_deadline(&self, now: u64) -> Option<u64> {
        let mut deadlines = vec![];
        if self.mode.deliver {
            deadlines.extend(self.deliveries.next_deadline());
            if !self.deliveries.is_empty() {
                deadlines.push(self.next_seek);
            }
        }
        if self.mode.inbox {
            deadlines.extend(self.inboxes.next_deadline());
            deadlines.push(self.next_housekeeping);
        }
        deadlines.extend(self.syncs.iter().map(|r| r.deadline));
        deadlines.into_iter().min().map(|d| d.max(now))
    }

    /// Starts what is due: upkeep, long polls, deliveries.
    fn start_work(&mut self, now: u64) {
        if self.mode.inbox && now >= self.next_housekeeping {
            self.next_housekeeping = now + HOUSEKEEPING_MS;
            let result = self.state.housekeeping(now);
            if let Err(e) = &result {
                tracing::warn!(error = %e, "housekeeping failed");
            }
            self.after_change(result.map(drop), |_| {});
        }
        if self.mode.inbox {
            let mailbox = MailboxId::for_peer(&self.state.me.peer_id());
            for relay in self.inboxes.poll(now) {
                let after = self.cursor(&relay);
                let request = ClientToRelay::Subscribe {
                    mailbox,
                    after,
                    wait_ms: SUBSCRIBE_WAIT_MS,
                };
                self.ask_mailbox(relay, request, false);
            }
        }
        if !self.mode.deliver {
            return;
        }
        let reputs = self.deliveries.poll_reputs(now);
        if !reputs.is_empty() {
            self.write_entries(reputs);
        }
        if now >= self.next_seek {
            self.next_seek = now + SEEK_MS;
            self.seek_direct();
        }
        let room = PARALLEL_DELIVERIES.saturating_sub(self.deliveries.in_flight());
        for attempt in self.deliveries.poll_attempts(now, room) {
            self.start_attempt(attempt);
        }
        self.maybe_flush();
    }

    fn start_attempt(&mut self, attempt: Attempt) {
        if let Some(watcher) = self.watchers.get_mut(&attempt.key) {
            watcher.on_attempt();
        }
        let net = self.state.net.clone();
        self.work.push(Box::pin(async move {
            let outcome = match Envelope::decode(&attempt.envelope) {
                Err(e) => Outcome::Refused(format!("the outbox envelope is unreadable: {e}")),
                Ok(envelope) => match &attempt.path {
                    Path::Direct => put(net.direct_put(attempt.contact, vec![envelope])).await,
                    Path::Relay(addr) => match addr.parse::<Multiaddr>() {
                        Ok(relay) => {
                            let request = ClientToRelay::Put {
                                envelopes: vec![envelope],
                            };
                            put(net.request(&relay, request)).await
                        }
                        Err(e) => Outcome::Unreachable(format!("bad relay address: {e}")),
                    },
                },
            };
            Done::Attempt(attempt, outcome)
        }));
    }

    /// Contacts with messages waiting and no direct path are sought for one (through
    /// their relays; the network backs off per contact).
    fn seek_direct(&self) {
        for peer in self.deliveries.waiting_contacts() {
            if let Ok(Some(contact)) = self.state.store.contact(&peer) {
                self.state.net.seek_direct(peer, contact.card.relays());
            }
        }
    }

    /// Where our mailbox at `relay` was read up to.
    fn cursor(&self, relay: &str) -> u64 {
        self.state
            .store
            .relays()
            .ok()
            .and_then(|rs| rs.into_iter().find(|r| r.addr == relay))
            .map_or(0, |r| r.cursor)
    }

    fn ask_mailbox(&mut self, relay: String, request: ClientToRelay, sync: bool) {
        let net = self.state.net.clone();
        self.work.push(Box::pin(async move {
            let result = match relay.parse::<Multiaddr>() {
                Ok(addr) => net.request(&addr, request).await,
                Err(e) => Err(NetError::Unreachable(format!("bad relay address: {e}"))),
            };
            Done::Mailbox {
                relay,
                result,
                sync,
            }
        }));
    }

    // --- what finished ---

    fn on_done(&mut self, done: Done) {
        match done {
            Done::Attempt(attempt, outcome) => self.on_attempt(attempt, outcome),
            Done::Mailbox {
                relay,
                result,
                sync,
            } => self.on_mailbox(relay, result, sync),
            Done::Flushed(result) => {
                self.flushing = false;
                let result = result.map_err(|e| {
                    tracing::error!(error = %e, "flushing the store failed");
                    e.to_string()
                });
                let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.after)
                    .into_iter()
                    .partition(|(ticket, _)| {
                        result.is_err() || self.state.store.is_durable(*ticket)
                    });
                self.after = waiting;
                for (_, after) in ready {
                    self.run_after(after, result.clone());
                }
            }
            Done::Deleted => {}
        }
        self.maybe_flush();
    }

    fn on_attempt(&mut self, attempt: Attempt, outcome: Outcome) {
        let now = now_ms();
        let jitter = rand::thread_rng().r#gen::<u64>();
        let r = self
            .deliveries
            .handle_result(&attempt, outcome, now, jitter);
        let mut w = WriteSet::default();
        match &r.entry {
            Some(entry) => LocalStore::write_outbox(&mut w, attempt.key, entry),
            None if r.known => w.remove(
                crate::store::TreeId::Outbox,
                attempt.key.to_be_bytes().to_vec(),
            ),
            None => {}
        }
        if let (Some(state), Some(id)) = (r.state, attempt.message)
            && let Err(e) = self
                .state
                .advance_state(&mut w, &attempt.contact, &id, state)
        {
            tracing::warn!(error = %e, "cannot record a message's state");
        }
        if r.handed_over
            && let Some(id) = attempt.message
        {
            self.state.emit(super::AppEvent::HandedOver {
                contact: attempt.contact,
                id,
            });
        }
        if let Err(e) = self.state.store.apply(w) {
            tracing::warn!(error = %e, "cannot record a delivery");
        }
        if let Some((addr, health)) = r.relay {
            if let Err(why) = &health {
                tracing::debug!(relay = %addr, error = %why, "relay unreachable");
            }
            self.state.note_relay(&addr, health);
        }
        // Only this answer's own write is new, and the schedule has it already.
        self.state.store.take_outbox_changes();
        if let Some(watcher) = self.watchers.get_mut(&attempt.key) {
            watcher.on_answer(r.handed_over, r.progress, r.entry.is_none());
            if watcher.finished() {
                self.watchers.remove(&attempt.key);
            }
        }
    }

    fn on_mailbox(&mut self, relay: String, result: Result<RelayToClient, NetError>, sync: bool) {
        let now = now_ms();
        let (items, next, more) = match result {
            Ok(RelayToClient::Batch { items, next, more }) => (items, next, more),
            Ok(other) => {
                let why = match other {
                    RelayToClient::Error { code, message } => {
                        format!("{}: {message}", code.as_str())
                    }
                    other => format!("unexpected answer {other:?}"),
                };
                return self.mailbox_failed(&relay, why, sync, now);
            }
            Err(e) => return self.mailbox_failed(&relay, e.to_string(), sync, now),
        };
        let ids: Vec<EnvelopeId> = items.iter().map(|i| i.envelope.id()).collect();
        let envelopes: Vec<Envelope> = items.into_iter().map(|i| i.envelope).collect();
        let result = self.state.receive(&envelopes, Source::Network, now);
        self.drain_announcements();
        match result {
            Ok(tally) => {
                if let Some(run) = self.syncs.iter_mut().find(|_| sync) {
                    run.report.shown.extend(tally.shown);
                }
                let after = After::Mailbox {
                    relay,
                    ids,
                    next,
                    more,
                    sync,
                };
                self.wait_durable(after);
            }
            Err(e) => {
                self.mailbox_failed(&relay, format!("cannot store what came: {e}"), sync, now)
            }
        }
        self.sync_outbox();
    }

    fn mailbox_failed(&mut self, relay: &str, why: String, sync: bool, now: u64) {
        self.state.note_relay(relay, Err(why.clone()));
        if sync {
            self.sync_relay_done(relay, Err(why));
        } else {
            let jitter = rand::thread_rng().r#gen::<u64>();
            self.inboxes.handle_answer(relay, false, now, jitter);
        }
    }

    fn sync_relay_done(&mut self, relay: &str, result: Result<(), String>) {
        for run in &mut self.syncs {
            if let Some(i) = run.left.iter().position(|r| r == relay) {
                run.left.remove(i);
                run.report.relays.push((relay.to_owned(), result.clone()));
            }
        }
    }

    fn run_after(&mut self, after: After, flushed: Result<(), String>) {
        match after {
            After::Release(keys) => {
                for key in keys {
                    self.deliveries.release(key);
                }
            }
            After::Announce(shown, requests) => {
                if flushed.is_ok() {
                    for r in shown {
                        self.state.emit(super::AppEvent::Message(r));
                    }
                }
                for peer in requests {
                    self.state.emit(super::AppEvent::Request(peer));
                }
            }
            After::Reply(reply) => reply(flushed),
            After::SendDurable(key) => {
                if let Some(w) = self.watchers.get_mut(&key) {
                    w.durable(flushed);
                    if w.finished() || w.events.is_closed() {
                        self.watchers.remove(&key);
                    }
                }
            }
            After::Mailbox {
                relay,
                ids,
                next,
                more,
                sync,
            } => {
                if flushed.is_err() {
                    // Not durable: not deleted, not moved past; it comes again.
                    return self.mailbox_failed(&relay, "the store failed".into(), sync, now_ms());
                }
                let mailbox = MailboxId::for_peer(&self.state.me.peer_id());
                if !ids.is_empty() {
                    self.delete(&relay, mailbox, ids);
                }
                let _ = self
                    .state
                    .store
                    .update_relay(&relay, |r| r.cursor = r.cursor.max(next));
                self.state.note_relay(&relay, Ok(()));
                if more {
                    let fetch = ClientToRelay::Fetch {
                        mailbox,
                        after: next,
                        limit: 256,
                    };
                    self.ask_mailbox(relay, fetch, sync);
                } else if sync {
                    self.sync_relay_done(&relay, Ok(()));
                } else {
                    self.inboxes.handle_answer(&relay, true, now_ms(), 0);
                }
            }
        }
    }

    fn delete(&mut self, relay: &str, mailbox: MailboxId, ids: Vec<EnvelopeId>) {
        let net = self.state.net.clone();
        let relay = relay.to_owned();
        self.work.push(Box::pin(async move {
            if let Ok(addr) = relay.parse::<Multiaddr>()
                && let Err(e) = net.request(&addr, ClientToRelay::Delete { mailbox, ids }).await
            {
                tracing::debug!(%relay, error = %e, "delete failed; what stays is recognised as a copy");
            }
            Done::Deleted
        }));
    }

    // --- commands ---

    fn on_command(&mut self, command: Command<T>) {
        let now = now_ms();
        match command {
            Command::Send {
                contact,
                text,
                reply,
            } => {
                let _ = reply.send(self.send(contact, &text, now));
            }
            Command::Change { run, reply } => {
                let result = run(&mut self.state, now);
                self.after_change(result, move |r| {
                    let _ = reply.send(r);
                });
            }
            Command::RelaysChanged { announce, reply } => {
                let result = self.take_relays().and_then(|()| match announce {
                    true => self.state.queue_card_updates(now),
                    false => Ok(0),
                });
                self.after_change(result, move |r| {
                    let _ = reply.send(r);
                });
            }
            Command::Sync { timeout, reply } => {
                self.deliveries.set_direct(self.state.net.direct_peers());
                self.start_sync(reply, timeout, now);
            }
            Command::Settle { force, reply } => {
                self.deliveries.set_direct(self.state.net.direct_peers());
                if force {
                    let due = self.deliveries.handle_force(now);
                    self.write_entries(due);
                }
                self.settles.push(reply);
            }
            Command::Progress { key, reply } => {
                let _ = reply.send(self.deliveries.progress(key));
            }
            Command::Shutdown { reply } => self.stopping = Some(reply),
        }
        self.maybe_flush();
    }

    fn send(&mut self, contact: PeerId, text: &str, now: u64) -> Result<Sending, EngineError> {
        let Some(card) = self.state.store.contact(&contact)? else {
            return Err(super::ContactError::NotContact(contact.to_string()).into());
        };
        let queued = self.state.queue_text(&card, text, now)?;
        let (events, rx) = mpsc::channel(SEND_EVENTS);
        self.watchers
            .insert(queued.outbox_key, Watcher::new(events));
        self.sync_outbox();
        // The newest sends leave before their write is durable, within the bound.
        let store = &self.state.store;
        if self
            .early
            .claim(store.write_ticket(), |t| store.is_durable(t))
        {
            self.deliveries.release(queued.outbox_key);
        }
        self.state.net.seek_direct(contact, card.card.relays());
        self.wait_durable(After::SendDurable(queued.outbox_key));
        Ok(Sending { queued, events: rx })
    }

    fn start_sync(&mut self, reply: oneshot::Sender<SyncReport>, timeout: Duration, now: u64) {
        let due = self.deliveries.handle_force(now);
        self.write_entries(due);
        let relays: Vec<String> = match self.state.store.relays() {
            Ok(rs) => rs.into_iter().map(|r| r.addr).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read our relays");
                Vec::new()
            }
        };
        let mailbox = MailboxId::for_peer(&self.state.me.peer_id());
        for relay in &relays {
            let after = self.cursor(relay);
            let fetch = ClientToRelay::Fetch {
                mailbox,
                after,
                limit: 256,
            };
            self.ask_mailbox(relay.clone(), fetch, true);
        }
        self.syncs.push(SyncRun {
            left: relays,
            report: SyncReport::default(),
            deadline: now + timeout.as_millis() as u64,
            reply,
        });
        // Housekeeping first: what expired goes, receipts a crash left are sealed.
        let result = self.state.housekeeping(now).map(drop);
        self.after_change(result, |_| {});
    }

    /// After a change made by a command: the outbox learns what changed, and `reply`
    /// gets the result once what it wrote is durable (at once if it failed).
    fn after_change<R: Send + 'static>(
        &mut self,
        result: Result<R, EngineError>,
        reply: impl FnOnce(Result<R, EngineError>) + Send + 'static,
    ) {
        self.drain_announcements();
        self.sync_outbox();
        match result {
            Err(e) => reply(Err(e)),
            Ok(r) => self.wait_durable(After::Reply(Box::new(move |flushed| {
                reply(
                    flushed
                        .map(|()| r)
                        .map_err(|why| StoreError::Db(why).into()),
                )
            }))),
        }
    }

    /// What the state took in is announced once durable.
    fn drain_announcements(&mut self) {
        let shown = std::mem::take(&mut self.state.announced);
        let requests = std::mem::take(&mut self.state.requests);
        if !shown.is_empty() || !requests.is_empty() {
            self.wait_durable(After::Announce(shown, requests));
        }
    }

    /// `after` runs once everything written so far is durable.
    fn wait_durable(&mut self, after: After) {
        let ticket = self.state.store.write_ticket();
        self.after.push((ticket, after));
    }

    /// Starts a flush if something waits for one and none is under way.
    fn maybe_flush(&mut self) {
        if self.flushing {
            return;
        }
        let store = &self.state.store;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.after)
            .into_iter()
            .partition(|(ticket, _)| store.is_durable(*ticket));
        self.after = waiting;
        for (_, after) in ready {
            self.run_after(after, Ok(()));
        }
        if self.after.is_empty() {
            return;
        }
        self.flushing = true;
        let store = self.state.store.clone();
        self.work
            .push(Box::pin(async move { Done::Flushed(store.flush().await) }));
    }

    /// Brings the schedule up to date with what was written to the outbox (by anyone):
    /// changed entries wait for their write to be durable before they leave.
    fn sync_outbox(&mut self) {
        let changed = self.state.store.take_outbox_changes();
        if changed.is_empty() {
            return;
        }
        let mut held = Vec::new();
        for key in changed {
            match self.state.store.outbox_entry(key) {
                Ok(Some(entry)) => {
                    self.deliveries.upsert(key, entry);
                    self.deliveries.hold(key);
                    held.push(key);
                }
                Ok(None) => {
                    self.deliveries.remove(key);
                    if let Some(watcher) = self.watchers.get_mut(&key) {
                        watcher.on_receipt();
                        if watcher.finished() {
                            self.watchers.remove(&key);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, key, "cannot read an outbox entry"),
            }
        }
        self.wait_durable(After::Release(held));
    }

    fn write_entries(&mut self, entries: Vec<(u64, crate::store::OutboxEntry)>) {
        let mut w = WriteSet::default();
        for (key, entry) in &entries {
            LocalStore::write_outbox(&mut w, *key, entry);
        }
        if let Err(e) = self.state.store.apply(w) {
            tracing::warn!(error = %e, "cannot record the outbox's schedule");
        }
        // Timing only: the envelopes did not change, so they need not wait.
        self.state.store.take_outbox_changes();
    }

    /// Answers who waits for quiet: nothing under way, nothing due now, nothing waiting
    /// for the disk; and syncs whose fetches are all done, once quiet too.
    fn settle_waiters(&mut self, now: u64) {
        // Syncs out of time answer with what they have.
        let (late, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.syncs)
            .into_iter()
            .partition(|r| now >= r.deadline);
        self.syncs = running;
        for mut run in late {
            for relay in run.left.drain(..) {
                run.report
                    .relays
                    .push((relay, Err("no answer in time".into())));
            }
            let _ = run.reply.send(run.report);
        }
        let quiet = self.deliveries.in_flight() == 0
            && self.after.is_empty()
            && !self.flushing
            && (!self.mode.deliver || self.deliveries.next_deadline().is_none_or(|d| d > now));
        if !quiet {
            return;
        }
        for w in self.settles.drain(..) {
            let _ = w.send(());
        }
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.syncs)
            .into_iter()
            .partition(|r| r.left.is_empty());
        self.syncs = running;
        for run in done {
            let _ = run.reply.send(run.report);
        }
    }

    // --- the network ---

    fn on_net_event(&mut self, event: NetEvent) {
        let now = now_ms();
        match event {
            NetEvent::DirectPut {
                from,
                envelopes,
                reply,
            } => self.direct_put(from, envelopes, reply, now),
            NetEvent::LanPeer { .. } => {
                self.deliveries.set_direct(self.state.net.direct_peers());
            }
            NetEvent::Connection { peer, up } => {
                self.deliveries.set_direct(self.state.net.direct_peers());
                if up {
                    // A relay we could not reach is back: what waits for it goes now.
                    let of_peer = |addr: &str| {
                        addr.parse::<Multiaddr>().ok().and_then(|a| peer_of(&a)) == Some(peer)
                    };
                    let due = self.deliveries.handle_relay_up(of_peer, now);
                    self.write_entries(due);
                    if let Ok(relays) = self.state.store.relays() {
                        for r in relays.iter().filter(|r| of_peer(&r.addr)) {
                            self.inboxes.handle_relay_up(&r.addr, now);
                        }
                    }
                }
            }
        }
        self.maybe_flush();
    }

    /// A peer handed us envelopes directly: a contact (not blocked) is answered per
    /// envelope once what became of them is durable; anyone else is sent to the relays.
    fn direct_put(&mut self, from: PeerId, envelopes: Vec<Envelope>, reply: DirectReply, now: u64) {
        let store = &self.state.store;
        let contact =
            matches!(store.contact(&from), Ok(Some(_))) && matches!(store.blocked(&from), Ok(None));
        if !contact {
            reply.send(RelayToClient::error(
                kkachi_protocol::ErrorCode::NotOwner,
                "this client takes direct deliveries from its contacts only",
            ));
            return;
        }
        let result = self.state.receive(&envelopes, Source::Network, now);
        self.drain_announcements();
        match result {
            Ok(tally) => {
                self.sync_outbox();
                let outcomes: Vec<PutOutcome> =
                    tally.verdicts.into_iter().map(direct_outcome).collect();
                self.wait_durable(After::Reply(Box::new(move |flushed| {
                    reply.send(match flushed {
                        Ok(()) => RelayToClient::Stored { outcomes },
                        Err(_) => RelayToClient::error(
                            kkachi_protocol::ErrorCode::Internal,
                            "the recipient could not store it",
                        ),
                    });
                })));
            }
            Err(e) => {
                tracing::warn!(%from, error = %e, "could not store a direct delivery");
                reply.send(RelayToClient::error(
                    kkachi_protocol::ErrorCode::Internal,
                    "the recipient could not store it",
                ));
            }
        }
    }
}

/// How a direct sender is told what became of one envelope.
fn direct_outcome(verdict: super::Verdict) -> PutOutcome {
    use super::Verdict;
    let rejected = |code, message: &str| PutOutcome::Rejected {
        code,
        message: message.into(),
    };
    match verdict {
        Verdict::Taken => PutOutcome::Stored,
        Verdict::Duplicate => PutOutcome::Duplicate,
        Verdict::Held => rejected(
            kkachi_protocol::ErrorCode::NotOwner,
            "held as a message request until the recipient accepts you",
        ),
        Verdict::Refused => rejected(
            kkachi_protocol::ErrorCode::Malformed,
            "the recipient could not take it in",
        ),
    }
}

/// One put, and what its answer means for the path.
async fn put(
    request: impl std::future::Future<Output = Result<RelayToClient, NetError>>,
) -> Outcome {
    match tokio::time::timeout(ATTEMPT_TIMEOUT, request).await {
        Err(_) => Outcome::Unreachable(format!("no answer within {ATTEMPT_TIMEOUT:?}")),
        Ok(Err(e)) => Outcome::Unreachable(e.to_string()),
        Ok(Ok(RelayToClient::Stored { outcomes })) => match outcomes.first() {
            Some(PutOutcome::Stored | PutOutcome::Duplicate) => Outcome::Acked,
            Some(PutOutcome::Rejected { code, message }) => {
                Outcome::Refused(format!("{}: {message}", code.as_str()))
            }
            None => Outcome::Refused("an empty answer".into()),
        },
        Ok(Ok(RelayToClient::Error { code, message })) => {
            Outcome::Refused(format!("{}: {message}", code.as_str()))
        }
        Ok(Ok(other)) => Outcome::Refused(format!("unexpected answer {other:?}")),
    }
}

async fn recv(events: &mut Option<mpsc::Receiver<NetEvent>>) -> Option<NetEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_or_never(sleep: Option<tokio::time::Sleep>) {
    match sleep {
        Some(s) => s.await,
        None => std::future::pending().await,
    }
}
