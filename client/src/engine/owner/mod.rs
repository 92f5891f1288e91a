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
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use kkachi_protocol::{EnvelopeId, Multiaddr, PeerId, RelayToClient};
use tokio::sync::{mpsc, oneshot};

use super::machine::{Attempt, Deliveries, EarlySends, Inboxes, Outcome};
use super::state::{Device, State};
use super::{
    EngineError, Mode, Outgoing, Progress, RelayError, SUBSCRIBE_WAIT_MS, Sending, SyncReport,
    now_ms,
};
use crate::net::{NetError, NetEvent, Transport, peer_of};
use crate::store::StoreError;
use watch::Watcher;

mod grants;
mod group_queues;
mod inbox;
mod outbox;
mod watch;

/// Attempts to deliver under way at once (each relay, each contact and what is
/// carried for others have smaller shares: see the machine).
const PARALLEL_DELIVERIES: usize = 64;
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
        what: Outgoing,
        reply: oneshot::Sender<Result<Sending, EngineError>>,
    },
    Change {
        run: Change<T>,
        reply: oneshot::Sender<Result<Box<dyn Any + Send>, EngineError>>,
    },
    /// Reads the state: nothing is written, so no grants are renewed and no flush is
    /// waited for.
    Read {
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
    /// Relays may be back: every path waiting out a backoff, and every long poll, is
    /// due now.
    RetryNow,
    Progress {
        key: u64,
        reply: oneshot::Sender<Option<Progress>>,
    },
    Shutdown {
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
}

/// A piece of work that finished.
enum Done {
    /// A delivery attempt ended, with the relay's store epoch (0: none named).
    Attempt(Attempt, Outcome, u64),
    Mailbox {
        relay: String,
        result: Result<RelayToClient, NetError>,
        sync: bool,
    },
    Flushed(Flushed),
    /// A request whose answer changes nothing here (a delete, opening a group queue):
    /// what it did not do is done again later.
    Quiet,
    /// A relay took our grants, or not.
    Granted {
        relay: String,
        result: Result<(), String>,
    },
}

/// Whether a flush made the writes before it durable.
type Flushed = Result<(), Arc<StoreError>>;

/// What waits for a write to be durable.
enum After {
    /// Let these outbox entries leave.
    Release(Vec<u64>),
    /// Announce messages durable, and new requests.
    Announce(Vec<super::Received>, Vec<PeerId>),
    /// Answer someone (told whether the flush succeeded).
    Reply(Box<dyn FnOnce(Flushed) + Send>),
    /// A send is durable: its watcher hears so.
    SendDurable(u64),
    /// A batch from our mailbox is durable: delete it there, move the cursor.
    Mailbox(Batch),
}

/// A batch from our mailbox at `relay`, taken in.
struct Batch {
    relay: String,
    ids: Vec<EnvelopeId>,
    /// The cursor after it, and whether more waits.
    next: u64,
    more: bool,
    /// Fetched by a sync (which reports `shown`), or by the long poll.
    sync: bool,
    /// The relay had nothing.
    empty: bool,
    shown: Vec<super::Received>,
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
    grants: grants::Grants,
    /// A relay failed: ask for reservations again once one answers.
    reserve_again: bool,
    /// Where each of our queues was read up to in this run, by poll name.
    cursors: HashMap<String, u64>,
    /// The poll names of our own queues at our relays.
    inbox_names: Vec<String>,
    /// Large groups' queues we read, by poll name.
    group_queues: HashMap<String, super::groups::GroupQueue>,
    /// When large groups' upkeep is next due (a have waits to be posted).
    next_large_upkeep: Option<u64>,
    /// The epoch of our contact-request queues (our card's).
    request_epoch: u32,
    /// Until when (Unix seconds) the request queue of the epoch before is read.
    earlier_requests_until: u64,
    /// The peer id of each device of each contact (and of our own account), and the
    /// LAN key this device shares with it, by its X25519 key (`None`: a key that gives
    /// neither), each worked out once.
    lan_keys: HashMap<[u8; 32], Option<(PeerId, kkachi_protocol::lan::LanKey)>>,
    /// Whose device each peer id on the network is (SPEC §1: a device's transport
    /// identity is its session key's), for every device let in.
    transports: HashMap<PeerId, (PeerId, Device)>,
    /// And the other way: the peer id of each such device.
    device_peers: HashMap<(PeerId, Device), PeerId>,
    /// Our account's device set as large groups' upkeep last followed it.
    own_set_seen: Option<Vec<u8>>,
    /// What each contact's device set lists and took out, read again only when the set
    /// changed.
    listings: HashMap<PeerId, Listing>,
    commands: mpsc::Receiver<Command<T>>,
    net_events: Option<mpsc::Receiver<NetEvent>>,
    work: FuturesUnordered<BoxFuture<'static, Done>>,
    /// What waits for its write (the ticket) to be durable.
    after: Vec<(u64, After)>,
    flushing: bool,
    /// Flushes that failed in a row, and when to try again.
    flush_failures: u32,
    next_flush: u64,
    /// Sends that left before they were durable.
    early: EarlySends,
    /// Progress of sends, by outbox key.
    watchers: HashMap<u64, Watcher>,
    syncs: Vec<SyncRun>,
    settles: Vec<oneshot::Sender<()>>,
    next_housekeeping: u64,
    next_seek: u64,
    stopping: Option<oneshot::Sender<Result<(), EngineError>>>,
}

/// The keys a contact's device set lists and took out, as read from its bytes.
#[derive(Debug, Default)]
struct Listing {
    set: Option<Vec<u8>>,
    listed: Vec<[u8; 32]>,
    removed: Vec<[u8; 32]>,
}

impl Listing {
    /// This listing, read again if `contact`'s set changed since (a set that does not
    /// decode lists nothing: their card's device is still let in).
    fn refreshed(self, store: &crate::store::LocalStore, contact: &crate::store::Contact) -> Self {
        let raw = match store.contact_devices_bytes(&contact.peer) {
            Ok(raw) => raw,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a contact's devices");
                return self;
            }
        };
        if raw == self.set {
            return self;
        }
        let account = contact.card.identity().ed25519();
        let set = raw
            .as_deref()
            .and_then(|b| kkachi_protocol::device::DeviceSet::decode(account, b).ok());
        Self {
            listed: set
                .iter()
                .flat_map(|s| s.devices().map(|d| *d.key()))
                .collect(),
            removed: set
                .iter()
                .flat_map(|s| s.removals().map(|r| *r.key()))
                .collect(),
            set: raw,
        }
    }
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
            grants: grants::Grants::default(),
            reserve_again: false,
            cursors: HashMap::new(),
            inbox_names: Vec::new(),
            group_queues: HashMap::new(),
            next_large_upkeep: None,
            request_epoch: 0,
            earlier_requests_until: 0,
            lan_keys: HashMap::new(),
            transports: HashMap::new(),
            device_peers: HashMap::new(),
            own_set_seen: None,
            listings: HashMap::new(),
            commands,
            net_events,
            work: FuturesUnordered::new(),
            after: Vec::new(),
            flushing: false,
            flush_failures: 0,
            next_flush: 0,
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
        // A card that ran out is renewed before anything is sealed, and what a crash
        // left sealed on a replaced session is sealed again.
        self.renew_card_if_due(now_ms());
        let resealed = self.state.reseal_stale_everywhere(now_ms());
        if let Err(e) = &resealed {
            tracing::warn!(error = %e, "could not seal again what waits on replaced sessions");
        }
        self.after_change(resealed.map(drop), |_| {});
        loop {
            let now = now_ms();
            self.start_work(now);
            self.settle_waiters(now);
            let sleep = self
                .next_deadline(now)
                .map(|at| tokio::time::sleep(Duration::from_millis(at.saturating_sub(now))));
            // Not biased: a steady stream of finished work must not hold up commands
            // and contacts' hand-overs.
            tokio::select! {
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
            if !self.deliveries.upsert(key, entry) {
                tracing::warn!(
                    key,
                    "an outbox entry names no valid contact; it is left alone"
                );
            }
        }
        self.state.store.take_outbox_changes();
        self.allow_contacts();
        self.take_relays()?;
        Ok(())
    }

    /// Tells the network whose devices may connect and find us on the LAN: every
    /// device of each contact not blocked that we seal to (the card's, and each other
    /// one that wrote to us) or that their device set lists (so a device of theirs that
    /// never wrote can, on a LAN with no relay), and each other device of our own
    /// account (SPEC §15.2). Each
    /// is a peer of its own on the network (its session key names its transport
    /// identity, SPEC §1) and shares a key of its own with this device for the LAN (a
    /// Diffie–Hellman each, so kept from one call to the next).
    fn allow_contacts(&mut self) {
        let Ok(contacts) = self.state.store.contacts() else {
            return;
        };
        // A key two accounts name is let in once, as the first to name it: our own
        // devices, then the devices contacts' cards name, then those we hold sessions
        // with, then those only a set lists (which a hostile contact could list to
        // shadow someone else's device).
        let me = self.state.me.peer_id();
        let mut devices: Vec<(u8, PeerId, Device, [u8; 32])> = Vec::new();
        match self.state.with_own(|own| own.listed.clone()) {
            Ok(listed) => devices.extend(listed.into_iter().map(|k| (0, me, Some(k), k))),
            Err(e) => tracing::warn!(error = %e, "cannot read our device set"),
        }
        let mut listings = std::mem::take(&mut self.listings);
        for c in contacts.iter() {
            if !matches!(self.state.store.blocked(&c.peer), Ok(None)) {
                continue;
            }
            let card = *c.card.identity().x25519();
            let listing = listings
                .remove(&c.peer)
                .unwrap_or_default()
                .refreshed(&self.state.store, c);
            if !listing.removed.contains(&card) {
                devices.push((1, c.peer, None, card));
            }
            match self.state.store.device_session_keys(&c.peer) {
                Ok(keys) => devices.extend(
                    keys.into_iter()
                        .filter(|k| *k != card && !listing.removed.contains(k))
                        .map(|k| (2, c.peer, Some(k), k)),
                ),
                Err(e) => tracing::warn!(error = %e, "cannot read a contact's devices"),
            }
            devices.extend(
                listing
                    .listed
                    .iter()
                    .filter(|k| **k != card)
                    .take(kkachi_protocol::device::MAX_DEVICES)
                    .map(|k| (3, c.peer, Some(*k), *k)),
            );
            self.listings.insert(c.peer, listing);
        }
        devices.sort_by_key(|d| d.0);
        let own_key = self.state.me.x25519_public();
        let mut keys = std::mem::take(&mut self.lan_keys);
        let mut kept = HashMap::with_capacity(devices.len());
        let mut allowed = Vec::with_capacity(devices.len());
        self.transports.clear();
        self.device_peers.clear();
        for (_, peer, device, x) in devices {
            if x == own_key {
                continue;
            }
            let known = match keys.remove(&x).or_else(|| kept.get(&x).cloned()) {
                Some(known) => known,
                None => kkachi_protocol::identity::transport_peer(&x)
                    .zip(self.state.me.lan_key_with(&x)),
            };
            kept.insert(x, known.clone());
            // Named by its transport identity, which every encoding of one key shares.
            let Some((transport, key)) = known else {
                continue;
            };
            if self.transports.contains_key(&transport) {
                continue;
            }
            allowed.push((transport, key));
            self.transports.insert(transport, (peer, device));
            self.device_peers.insert((peer, device), transport);
        }
        self.lan_keys = kept;
        self.state.net.allow_only(allowed);
        self.set_direct();
    }

    /// If our account's device set changed since last seen, large groups' upkeep runs
    /// now: their keys go to a device added, and a new key follows one taken out.
    pub(super) fn after_own_devices(&mut self, now: u64) {
        match self.state.store.own_devices_bytes() {
            Ok(set) if set != self.own_set_seen => {
                self.own_set_seen = set;
                self.next_large_upkeep = Some(now);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read our device set"),
        }
    }

    /// Tells the schedule which devices the network reaches directly now.
    pub(super) fn set_direct(&mut self) {
        let direct = self
            .state
            .net
            .direct_peers()
            .iter()
            .filter_map(|p| self.transports.get(p).copied())
            .collect();
        self.deliveries.set_direct(direct);
    }

    /// The peer id of `contact`'s device `device` on the network, if it is let in.
    pub(super) fn device_peer(&self, contact: PeerId, device: Device) -> Option<PeerId> {
        self.device_peers.get(&(contact, device)).copied()
    }

    /// A card about to run out is renewed: granted anew at our relays (the previous
    /// request epoch revoked) and sent to every contact, as after a change of relays.
    pub(super) fn renew_card_if_due(&mut self, now: u64) {
        match self.state.renew_card_if_due(now) {
            Ok(false) => {}
            Ok(true) => {
                self.grants.invalidate();
                if let Err(e) = self.take_relays() {
                    tracing::warn!(error = %e, "cannot read our relays");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not renew our card"),
        }
        // After a renewal, or a start after a crash that came before contacts were told.
        match self.state.announce_card_if_due(now) {
            // Nothing queued (the usual case at every upkeep): nothing to wait for.
            Ok(0) => {}
            Ok(_) => self.after_change(Ok(()), |_| {}),
            Err(e) => tracing::warn!(error = %e, "could not send contacts our new card"),
        }
        // Our device set, made at the first start of a home from before sets, or
        // changed (a device renamed, a key rotated) since contacts were last sent it.
        match self.state.announce_devices_if_due(now) {
            Ok(0) => {}
            Ok(_) => self.after_change(Ok(()), |_| {}),
            Err(e) => tracing::warn!(error = %e, "could not send contacts our device set"),
        }
        // After a rotation of our key: contacts we have no session with under the new
        // one get the card again (daily), until the old key is forgotten.
        match self.state.resend_rotated_card(now) {
            Ok(0) => {}
            Ok(_) => self.after_change(Ok(()), |_| {}),
            Err(e) => tracing::warn!(error = %e, "could not send contacts our new card again"),
        }
        // Once nothing sealed to our previous key can arrive any more, it is erased and
        // its queues are no longer read.
        if let Err(e) = self.state.store.forget_expired_previous_key(now / 1000) {
            tracing::warn!(error = %e, "could not forget our previous session key");
        }
        if self
            .state
            .previous
            .as_ref()
            .is_some_and(|p| p.until <= now / 1000)
        {
            self.state.previous = None;
            self.grants.invalidate();
            if let Err(e) = self.take_relays() {
                tracing::warn!(error = %e, "cannot read our relays");
            }
        }
        // After a restore: what we had sent and nobody confirmed goes again.
        match self.state.resend_restored(now) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(
                    messages = n,
                    "sent again what was not delivered before the restore"
                );
                self.after_change(Ok(()), |_| {});
            }
            Err(e) => tracing::warn!(error = %e, "could not send again what the restore found"),
        }
    }

    /// Our relays as stored: polled (in the inbox mode) and kept reservations at.
    pub(super) fn take_relays(&mut self) -> Result<(), EngineError> {
        let relays: Vec<String> = self
            .state
            .store
            .relays()?
            .into_iter()
            .map(|r| r.addr)
            .collect();
        if let Some(profile) = self.state.store.profile()? {
            self.request_epoch = profile.request_epoch;
            // The current card was made when the one before was retired; what strangers
            // sealed under the earlier code can arrive for as long as an envelope lives.
            let renewed_at = profile
                .card_expires_at
                .saturating_sub(kkachi_protocol::card::CARD_LIFETIME_SECS);
            self.earlier_requests_until =
                renewed_at.saturating_add(kkachi_protocol::session::RETAIN_SECS);
        }
        self.grant_relays(&relays);
        if self.mode.inbox {
            let queues = self.read_queues();
            self.inbox_names = relays
                .iter()
                .flat_map(|a| queues.iter().map(|w| grants::poll_name(a, *w)))
                .collect();
            self.set_polls();
            self.state
                .net
                .reserve_at(relays.iter().filter_map(|a| a.parse().ok()).collect());
        }
        Ok(())
    }

    /// Final steps: make everything written durable, answer who waits, and tell the
    /// one who asked to stop whether the last flush made it.
    async fn stop(mut self) {
        let flushed = self.state.store.flush().await.map_err(Arc::new);
        if let Err(e) = &flushed {
            tracing::error!(error = %e, "the last flush before stopping failed");
        }
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
            let _ = reply.send(flushed.map_err(EngineError::NotSaved));
        }
        tracing::debug!("engine stopped");
    }

    // --- deadlines and work ---

    fn next_deadline(&self, now: u64) -> Option<u64> {
        let mut deadlines = vec![];
        // With every delivery slot taken, the next answer wakes the loop.
        if self.mode.deliver && self.deliveries.in_flight() < PARALLEL_DELIVERIES {
            deadlines.extend(self.deliveries.next_deadline());
            if !self.deliveries.is_empty() {
                deadlines.push(self.next_seek);
            }
        }
        if !self.after.is_empty() && !self.flushing {
            deadlines.push(self.next_flush);
        }
        if self.mode.inbox {
            deadlines.extend(self.inboxes.next_deadline());
            deadlines.push(self.next_housekeeping);
        }
        if self.mode.deliver {
            deadlines.extend(self.next_large_upkeep);
        }
        if self.mode.inbox || self.mode.deliver {
            deadlines.extend(self.grants.next_deadline());
        }
        deadlines.extend(*self.state.stale_due.lock());
        deadlines.extend(*self.state.expiry_due.lock());
        deadlines.extend(self.syncs.iter().map(|r| r.deadline));
        deadlines.into_iter().min().map(|d| d.max(now))
    }

    /// Starts what is due: upkeep, long polls, deliveries.
    fn start_work(&mut self, now: u64) {
        let stale_due = *self.state.stale_due.lock();
        if stale_due.is_some_and(|at| at <= now) {
            // Entries held back from being sealed again on a new session: their time.
            *self.state.stale_due.lock() = None;
            let result = self.state.reseal_stale_everywhere(now);
            if let Err(e) = &result {
                tracing::warn!(error = %e, "could not seal again what waits on replaced sessions");
            }
            self.after_change(result.map(drop), |_| {});
        }
        let expiry_due = *self.state.expiry_due.lock();
        if expiry_due.is_some_and(|at| at <= now) {
            let result = self.state.expire_messages(now);
            if let Err(e) = &result {
                tracing::warn!(error = %e, "could not delete disappearing messages");
                // Not again at once: at the next upkeep.
                *self.state.expiry_due.lock() = None;
            }
            self.after_change(result.map(drop), |_| {});
        }
        if self.mode.inbox && now >= self.next_housekeeping {
            self.next_housekeeping = now + HOUSEKEEPING_MS;
            self.renew_card_if_due(now);
            let result = self.state.housekeeping(now);
            if let Err(e) = &result {
                tracing::warn!(error = %e, "housekeeping failed");
            }
            self.after_change(result.map(drop), |_| {});
        }
        if self.mode.inbox || self.mode.deliver {
            self.start_grants();
        }
        if self
            .state
            .group_queues_changed
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            self.refresh_group_queues();
            self.next_large_upkeep = Some(now);
        }
        if self.mode.deliver {
            self.large_upkeep_if_due(now);
        }
        if self.mode.inbox {
            for relay in self.inboxes.poll(now) {
                let after = self.cursor(&relay);
                let Some(request) = self.read_request(&relay, after, SUBSCRIBE_WAIT_MS) else {
                    continue;
                };
                self.ask_mailbox(relay, request, false);
            }
        }
        if !self.mode.deliver {
            self.maybe_flush();
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

    // --- what finished ---

    fn on_done(&mut self, done: Done) {
        match done {
            Done::Attempt(attempt, outcome, epoch) => self.on_attempt(attempt, outcome, epoch),
            Done::Mailbox {
                relay,
                result,
                sync,
            } => self.on_mailbox(relay, result, sync),
            Done::Flushed(result) => self.flushed(result),
            Done::Quiet => {}
            Done::Granted { relay, result } => self.on_granted(relay, result),
        }
    }

    /// A flush ended. What it made durable goes ahead. If it failed, who waits for an
    /// answer is told, and the rest (packets to release, messages to announce, relay
    /// batches to delete) waits for a flush that succeeds, tried again with backoff.
    fn flushed(&mut self, result: Flushed) {
        self.flushing = false;
        self.run_durable();
        match result {
            Ok(()) => self.flush_failures = 0,
            Err(e) => {
                tracing::error!(error = %e, "flushing the store failed");
                self.flush_failures = self.flush_failures.saturating_add(1);
                let wait = crate::backoff::Backoff {
                    first: Duration::from_millis(100),
                    max: Duration::from_secs(10),
                };
                self.next_flush =
                    now_ms() + wait.wait_ms(self.flush_failures, rand::random::<u64>());
                let (told, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.after)
                    .into_iter()
                    .partition(|(_, after)| {
                        matches!(after, After::Reply(_) | After::SendDurable(_))
                    });
                self.after = kept;
                for (_, after) in told {
                    self.run_after(after, Err(e.clone()));
                }
            }
        }
    }

    fn run_after(&mut self, after: After, flushed: Flushed) {
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
                    if w.finished() || w.abandoned() {
                        self.watchers.remove(&key);
                    }
                }
            }
            After::Mailbox(batch) => self.mailbox_durable(batch, flushed),
        }
    }

    // --- commands ---

    fn on_command(&mut self, command: Command<T>) {
        let now = now_ms();
        match command {
            Command::Send {
                contact,
                what,
                reply,
            } => {
                let _ = reply.send(self.send(contact, what, now));
            }
            Command::Change { run, reply } => {
                let result = run(&mut self.state, now);
                // Contacts may have changed: our relays grant theirs again, and the
                // network lets in whom it should.
                self.grants.invalidate();
                self.allow_contacts();
                self.after_own_devices(now);
                self.after_change(result, move |r| {
                    let _ = reply.send(r);
                });
            }
            Command::RelaysChanged { announce, reply } => {
                self.grants.invalidate();
                let result = self.take_relays().and_then(|()| match announce {
                    true => self.state.queue_card_updates(now),
                    false => Ok(0),
                });
                self.after_change(result, move |r| {
                    let _ = reply.send(r);
                });
            }
            Command::Sync { timeout, reply } => {
                self.set_direct();
                self.start_sync(reply, timeout, now);
            }
            Command::Settle { force, reply } => {
                self.set_direct();
                if force {
                    let due = self.deliveries.handle_force(now);
                    self.write_entries(due);
                }
                self.settles.push(reply);
            }
            Command::RetryNow => {
                self.set_direct();
                let due = self.deliveries.handle_force(now);
                self.write_entries(due);
                if let Ok(relays) = self.state.store.relays() {
                    for r in &relays {
                        for which in self.read_queues() {
                            self.inboxes
                                .handle_relay_up(&grants::poll_name(&r.addr, which), now);
                        }
                    }
                }
            }
            Command::Read { run, reply } => {
                let _ = reply.send(run(&mut self.state, now));
            }
            Command::Progress { key, reply } => {
                let _ = reply.send(self.deliveries.progress(key));
            }
            Command::Shutdown { reply } => self.stopping = Some(reply),
        }
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
                reply(flushed.map(|()| r).map_err(EngineError::NotSaved))
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

    /// Runs what waited for writes that are durable now.
    fn run_durable(&mut self) {
        let store = &self.state.store;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.after)
            .into_iter()
            .partition(|(ticket, _)| store.is_durable(*ticket));
        self.after = waiting;
        for (_, after) in ready {
            self.run_after(after, Ok(()));
        }
    }

    /// Starts a flush if something waits for one and none is under way (nor, after a
    /// failure, before its retry is due). Called only at the end of `start_work`, once the
    /// turn's deliveries have started: the flush wakes a blocking thread and sled's I/O
    /// pool, and starts only once this task has yielded, so the requests those deliveries
    /// wrote go out first instead of waiting for a core.
    fn maybe_flush(&mut self) {
        if self.flushing {
            return;
        }
        self.run_durable();
        if self.after.is_empty() || now_ms() < self.next_flush {
            return;
        }
        self.flushing = true;
        let store = self.state.store.clone();
        self.work.push(Box::pin(async move {
            tokio::task::yield_now().await;
            Done::Flushed(store.flush().await.map_err(Arc::new))
        }));
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
            for name in run.left.drain(..) {
                // Each of our relays once, by its inbox; group relays apart.
                if let Some(relay) = super::groups::group_poll_relay(&name) {
                    inbox::note_group_relay(&mut run.report, relay, Err(RelayError::Late));
                    continue;
                }
                if let (relay, grants::Which::Inbox) = grants::split_poll(&name) {
                    run.report
                        .relays
                        .push((relay.to_owned(), Err(RelayError::Late)));
                }
            }
            let _ = run.reply.send(run.report);
        }
        let quiet = self.deliveries.in_flight() == 0
            && !self.grants.busy()
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
                self.set_direct();
            }
            NetEvent::Connection { peer, up } => {
                self.set_direct();
                if up {
                    // A relay we could not reach is back: what waits for it goes now.
                    let of_peer = |addr: &str| {
                        addr.parse::<Multiaddr>().ok().and_then(|a| peer_of(&a)) == Some(peer)
                    };
                    let due = self.deliveries.handle_relay_up(of_peer, now);
                    self.write_entries(due);
                    if let Ok(relays) = self.state.store.relays() {
                        for r in relays.iter().filter(|r| of_peer(&r.addr)) {
                            for which in self.read_queues() {
                                self.inboxes
                                    .handle_relay_up(&grants::poll_name(&r.addr, which), now);
                            }
                        }
                    }
                }
            }
        }
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
