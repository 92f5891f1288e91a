//! The outbox: attempts to deliver on each path, what their answers change, new sends.

use kkachi_protocol::wire::{Addressed, PutOutcome};
use kkachi_protocol::{
    ClientToRelay, Envelope, ErrorCode, Multiaddr, PeerId, RelayToClient, WriteKey,
};
use rand::Rng;
use tokio::sync::mpsc;

use super::super::machine::{Attempt, Change, Outcome, Path};
use super::super::{ATTEMPT_TIMEOUT, EngineError, Outgoing, Sending, now_ms};
use super::watch::Watcher;
use super::{After, Done, Owner, SEND_EVENTS};
use crate::net::{NetError, Transport};
use crate::store::{LocalStore, MessageState, OutboxEntry, WriteSet};

impl<T: Transport> Owner<T> {
    pub(super) fn start_attempt(&mut self, attempt: Attempt) {
        if let Some(watcher) = self.watchers.get_mut(&attempt.key) {
            watcher.on_attempt();
        }
        let net = self.state.net.clone();
        let group = self
            .deliveries
            .get(attempt.key)
            .is_some_and(|e| e.kind == crate::store::OutboxKind::Group);
        let keys = match &attempt.path {
            Path::Relay(addr) => self
                .deliveries
                .get(attempt.key)
                .and_then(|e| e.targets.iter().find(|t| t.addr == *addr))
                .map(|t| (WriteKey(t.write), t.request.map(WriteKey))),
            Path::Direct => None,
        };
        // The device it is sealed to, as a peer on the network.
        let device = match (&attempt.path, attempt.contact) {
            (Path::Direct, Some(contact)) => self
                .deliveries
                .get(attempt.key)
                .and_then(|e| self.device_peer(contact, e.device)),
            _ => None,
        };
        self.work.push(Box::pin(async move {
            let (outcome, epoch) = match Envelope::decode(&attempt.envelope) {
                Err(e) => (
                    Outcome::Refused(format!("the outbox envelope is unreadable: {e}")),
                    0,
                ),
                Ok(envelope) => match (&attempt.path, keys) {
                    (Path::Direct, _) => match device {
                        Some(device) => (put(net.direct_put(device, vec![envelope])).await.0, 0),
                        None => (Outcome::Refused("no device to hand it to".into()), 0),
                    },
                    (Path::Relay(addr), Some((pairwise, request))) => {
                        match addr.parse::<Multiaddr>() {
                            // A post of ours into a large group's queue.
                            Ok(relay) if group => {
                                let key = kkachi_protocol::GroupKey(pairwise.0);
                                super::group_queues::put_to_group(&net, &relay, envelope, key).await
                            }
                            Ok(relay) => {
                                put_to_relay(&net, &relay, envelope, pairwise, request).await
                            }
                            Err(e) => (Outcome::Unreachable(format!("bad relay address: {e}")), 0),
                        }
                    }
                    (Path::Relay(addr), None) => (
                        Outcome::Refused(format!("{addr} is not a relay of this entry")),
                        0,
                    ),
                },
            };
            Done::Attempt(attempt, outcome, epoch)
        }));
    }

    /// Contacts with messages waiting and no direct path are sought for one (through
    /// their relays; the network backs off per contact).
    pub(super) fn seek_direct(&self) {
        for peer in self.deliveries.waiting_contacts() {
            if let (Ok(Some(contact)), Some(device)) = (
                self.state.store.contact(&peer),
                self.device_peer(peer, None),
            ) {
                self.state.net.seek_direct(device, contact.card.relays());
            }
        }
    }

    pub(super) fn on_attempt(&mut self, attempt: Attempt, outcome: Outcome, epoch: u64) {
        let now = now_ms();
        if let Path::Relay(relay) = &attempt.path {
            // Before the result is recorded: its target takes this epoch, and anything
            // the relay acknowledged under another one goes there again.
            let again = self.deliveries.handle_epoch(attempt.key, relay, epoch, now);
            self.write_entries(again);
        }
        if let (Path::Relay(relay), Outcome::Refused(why)) = (&attempt.path, &outcome)
            && let Some(watcher) = self.watchers.get_mut(&attempt.key)
        {
            watcher.on_refused(relay, why);
        }
        let jitter = rand::thread_rng().r#gen::<u64>();
        let r = self
            .deliveries
            .handle_result(&attempt, outcome, now, jitter);
        let mut w = WriteSet::default();
        match &r.change {
            Change::Write(entry) => LocalStore::write_outbox(&mut w, attempt.key, entry),
            Change::Remove => w.remove(
                crate::store::TreeId::Outbox,
                attempt.key.to_be_bytes().to_vec(),
            ),
            Change::Nothing => {}
        }
        if let (Some(state), Some(id), Some(contact)) = (r.state, attempt.message, attempt.contact)
        {
            let result = match crate::store::group_of(&contact.to_bytes()) {
                // Our post in a large group: one more group relay holds it.
                Some(group) => self.state.advance_group_post(&mut w, group, &id),
                None => self
                    .state
                    .advance_state(&mut w, &contact, &id, state)
                    .map(drop),
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "cannot record a message's state");
            }
        }
        if r.handed_over
            && let (Some(id), Some(contact)) = (attempt.message, attempt.contact)
        {
            self.state
                .emit(super::super::AppEvent::HandedOver { contact, id });
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
        // This answer's own write is in the schedule already.
        self.sync_outbox_except(&[attempt.key]);
        if let Some(watcher) = self.watchers.get_mut(&attempt.key) {
            watcher.on_answer(r.handed_over, r.progress, r.gone);
            if watcher.finished() || watcher.abandoned() {
                self.watchers.remove(&attempt.key);
            }
        }
    }

    pub(super) fn send(
        &mut self,
        contact: PeerId,
        what: Outgoing,
        now: u64,
    ) -> Result<Sending, EngineError> {
        // Members only met in a group are not written to outside it.
        let Some(card) = self.state.store.added_contact(&contact)? else {
            return Err(super::super::ContactError::NotContact(contact.to_string()).into());
        };
        let queued = match what {
            Outgoing::Text { text, reply_to } => {
                self.state.queue_text(&card, &text, reply_to, now)?
            }
            Outgoing::File { file, with } => self.state.queue_file(&card, *file, with, now)?,
        };
        let (events, rx) = mpsc::channel(SEND_EVENTS);
        self.watchers
            .insert(queued.outbox_key, Watcher::new(events, contact, queued.id));
        self.sync_outbox();
        // The newest sends leave before their write is durable, within the bound.
        let store = &self.state.store;
        if self
            .early
            .claim(store.write_ticket(), |t| store.is_durable(t))
        {
            self.deliveries.release(queued.outbox_key);
        }
        if let Some(device) = self.device_peer(contact, None) {
            self.state.net.seek_direct(device, card.card.relays());
        }
        self.wait_durable(After::SendDurable(queued.outbox_key));
        Ok(Sending { queued, events: rx })
    }

    /// Brings the schedule up to date with what was written to the outbox (by anyone):
    /// changed entries wait for their write to be durable before they leave.
    pub(super) fn sync_outbox(&mut self) {
        self.sync_outbox_except(&[]);
    }

    /// [`Owner::sync_outbox`], but for the entries `own`: written from the schedule,
    /// which has them already.
    pub(super) fn sync_outbox_except(&mut self, own: &[u64]) {
        let changed: Vec<u64> = self
            .state
            .store
            .take_outbox_changes()
            .into_iter()
            .filter(|k| !own.contains(k))
            .collect();
        if changed.is_empty() {
            return;
        }
        let mut held = Vec::new();
        for key in changed {
            match self.state.store.outbox_entry(key) {
                Ok(Some(entry)) => {
                    if self.deliveries.upsert(key, entry) {
                        self.deliveries.hold(key);
                        held.push(key);
                    } else {
                        tracing::warn!(
                            key,
                            "an outbox entry names no valid contact; it is left alone"
                        );
                    }
                }
                Ok(None) => {
                    self.deliveries.remove(key);
                    self.outbox_left(key);
                }
                Err(e) => tracing::warn!(error = %e, key, "cannot read an outbox entry"),
            }
        }
        self.wait_durable(After::Release(held));
    }

    /// Entry `key` left the outbox, not by an answer here: the contact's receipt, or
    /// the contact was removed or blocked. Its message's state says which.
    fn outbox_left(&mut self, key: u64) {
        let Some(watcher) = self.watchers.get_mut(&key) else {
            return;
        };
        let delivered = matches!(
            self.state.store.message(&watcher.contact, &watcher.message),
            Ok(Some((_, record))) if matches!(record.state, MessageState::Delivered | MessageState::Read)
        );
        watcher.on_removed(delivered);
        if watcher.finished() || watcher.abandoned() {
            self.watchers.remove(&key);
        }
    }

    pub(super) fn write_entries(&mut self, entries: Vec<(u64, OutboxEntry)>) {
        if entries.is_empty() {
            return;
        }
        let mut w = WriteSet::default();
        for (key, entry) in &entries {
            LocalStore::write_outbox(&mut w, *key, entry);
        }
        if let Err(e) = self.state.store.apply(w) {
            tracing::warn!(error = %e, "cannot record the outbox's schedule");
        }
        // Timing only: the envelopes did not change, so they need not wait.
        let own: Vec<u64> = entries.iter().map(|(k, _)| *k).collect();
        self.sync_outbox_except(&own);
    }
}

/// Puts `envelope` into the contact's queue at `relay` with our capability there; if
/// the contact has granted none there (it has not accepted us yet, or the relay lost
/// its grants), through the contact-request capability of its card.
async fn put_to_relay<T: Transport>(
    net: &T,
    relay: &Multiaddr,
    envelope: Envelope,
    pairwise: WriteKey,
    request: Option<WriteKey>,
) -> (Outcome, u64) {
    let through = |write: WriteKey, envelope: Envelope| ClientToRelay::Put {
        items: vec![Addressed { write, envelope }],
    };
    let answer = put(net.request(relay, through(pairwise, envelope.clone()))).await;
    match (answer, request) {
        ((Outcome::Refused(why), _), Some(request))
            if why.starts_with(ErrorCode::NoQueue.as_str()) =>
        {
            put(net.request(relay, through(request, envelope))).await
        }
        (answer, _) => answer,
    }
}

/// One put, and what its answer means for the path, with the relay's store epoch (0
/// when it named none).
pub(super) async fn put(
    request: impl std::future::Future<Output = Result<RelayToClient, NetError>>,
) -> (Outcome, u64) {
    match tokio::time::timeout(ATTEMPT_TIMEOUT, request).await {
        Err(_) => (
            Outcome::Unreachable(format!("no answer within {ATTEMPT_TIMEOUT:?}")),
            0,
        ),
        Ok(Err(e)) => (Outcome::Unreachable(e.to_string()), 0),
        Ok(Ok(RelayToClient::Stored { outcomes, epoch })) => (
            match outcomes.first() {
                Some(PutOutcome::Stored | PutOutcome::Duplicate) => Outcome::Acked,
                Some(PutOutcome::Rejected { code, message }) => {
                    Outcome::Refused(format!("{}: {message}", code.as_str()))
                }
                None => Outcome::Refused("an empty answer".into()),
            },
            epoch,
        ),
        Ok(Ok(RelayToClient::Error { code, message })) => {
            (Outcome::Refused(format!("{}: {message}", code.as_str())), 0)
        }
        Ok(Ok(other)) => (Outcome::Refused(format!("unexpected answer {other:?}")), 0),
    }
}
