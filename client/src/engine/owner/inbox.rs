//! Our mailboxes at our relays: long polls, fetches, deletes once durable, syncs; and
//! envelopes contacts hand us directly.

use std::time::Duration;

use kkachi_protocol::wire::PutOutcome;
use kkachi_protocol::{
    ClientToRelay, Envelope, EnvelopeId, Multiaddr, PeerId, ReadKey, RelayToClient,
};
use rand::Rng;
use tokio::sync::oneshot;

use super::super::machine::Answer;
use super::super::receive::Source;
use super::super::{RelayError, SyncReport, Verdict, now_ms};
use super::grants::{Which, poll_name, split_poll};
use super::{After, Batch, Done, Flushed, Owner, SyncRun};
use crate::net::{DirectReply, NetError, Transport};

impl<T: Transport> Owner<T> {
    /// Where the queue a poll name stands for was read up to in this run. Every run
    /// starts from the beginning, and so does a relay's queue after the relay failed: we
    /// delete what we took in, so the beginning holds only what waits for us (and what a
    /// lost delete left, taken as a copy), and a relay that came back with a new
    /// database, whose cursors start over, is read whole.
    pub(super) fn cursor(&self, name: &str) -> u64 {
        self.cursors.get(name).copied().unwrap_or(0)
    }

    /// Sends `request` about the queue named `relay` (a poll name) to its relay.
    pub(super) fn ask_mailbox(&mut self, relay: String, request: ClientToRelay, sync: bool) {
        let net = self.state.net.clone();
        self.work.push(Box::pin(async move {
            // A group queue's name starts with its group relay's address.
            let addr = super::super::groups::group_poll_relay(&relay)
                .unwrap_or_else(|| split_poll(&relay).0);
            let result = match addr.parse::<Multiaddr>() {
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

    pub(super) fn on_mailbox(
        &mut self,
        relay: String,
        result: Result<RelayToClient, NetError>,
        sync: bool,
    ) {
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
                return self.mailbox_failed(&relay, RelayError::Refused(why), sync, now);
            }
            Err(e) => {
                let why = RelayError::Unreachable(e.to_string());
                return self.mailbox_failed(&relay, why, sync, now);
            }
        };
        let ids: Vec<EnvelopeId> = items.iter().map(|i| i.envelope.id()).collect();
        let envelopes: Vec<Envelope> = items.into_iter().map(|i| i.envelope).collect();
        if super::super::groups::group_poll_relay(&relay).is_some()
            && self.group_queue(&relay).is_none()
        {
            // A group queue no longer read (we left, or its epoch is past): its batch
            // is dropped, read again from the start if it is ever read again.
            if sync {
                self.sync_relay_done(&relay, Ok(()));
            }
            return;
        }
        if let Some(q) = self.group_queue(&relay).cloned() {
            // A large group's queue: taken in, never deleted from (others read it).
            let result = self
                .state
                .take_group_items(q.group, q.epoch, &envelopes, now);
            self.drain_announcements();
            // A have may be due now that something came.
            self.next_large_upkeep = Some(now);
            match result {
                Ok(shown) => self.wait_durable(After::Mailbox(Batch {
                    relay,
                    ids: Vec::new(),
                    next,
                    more,
                    sync,
                    empty: envelopes.is_empty(),
                    shown: if sync { shown } else { Vec::new() },
                })),
                Err(e) => {
                    self.mailbox_failed(&relay, RelayError::NotStored(e.to_string()), sync, now)
                }
            }
            self.sync_outbox();
            return;
        }
        let result = self.state.receive(&envelopes, Source::Network, now);
        self.drain_announcements();
        match result {
            Ok(tally) => {
                let empty = ids.is_empty();
                let after = After::Mailbox(Batch {
                    relay,
                    ids,
                    next,
                    more,
                    sync,
                    empty,
                    // A sync reports them once they are durable, so it never prints
                    // what a crash could make it print again.
                    shown: if sync { tally.shown } else { Vec::new() },
                });
                self.wait_durable(after);
            }
            Err(e) => self.mailbox_failed(&relay, RelayError::NotStored(e.to_string()), sync, now),
        }
        self.sync_outbox();
    }

    /// A poll or fetch of the queue named `name` failed.
    pub(super) fn mailbox_failed(&mut self, name: &str, why: RelayError, sync: bool, now: u64) {
        if self.group_queue(name).is_some() {
            // A group relay (not ours): read from the start once it answers.
            self.cursors.remove(name);
            if sync {
                self.sync_relay_done(name, Err(why));
            } else {
                let jitter = rand::thread_rng().r#gen::<u64>();
                self.inboxes
                    .handle_answer(name, Answer::Failed, now, jitter);
            }
            return;
        }
        let relay = split_poll(name).0;
        for which in Which::ALL {
            self.cursors.remove(&poll_name(relay, which));
        }
        self.state.note_relay(relay, Err(why.clone()));
        // It may come back without its data: it is told our grants again; and a
        // reservation there (circuits on) is asked for again once it answers.
        self.grants.invalidate_relay(relay);
        self.reserve_again = true;
        let relay = name;
        if sync {
            self.sync_relay_done(relay, Err(why));
        } else {
            let jitter = rand::thread_rng().r#gen::<u64>();
            self.inboxes
                .handle_answer(relay, Answer::Failed, now, jitter);
        }
    }

    /// A sync is done with the queue named `name`; the report lists each relay once
    /// (by its inbox).
    pub(super) fn sync_relay_done(&mut self, name: &str, result: Result<(), RelayError>) {
        let (relay, which) = split_poll(name);
        // A group relay is not one of ours: reported apart, once (answering a read of
        // any of its group queues).
        let group = super::super::groups::group_poll_relay(name);
        for run in &mut self.syncs {
            if let Some(i) = run.left.iter().position(|r| r == name) {
                run.left.remove(i);
                match group {
                    Some(relay) => note_group_relay(&mut run.report, relay, result.clone()),
                    None if which == Which::Inbox => {
                        run.report.relays.push((relay.to_owned(), result.clone()));
                    }
                    None => {}
                }
            }
        }
    }

    pub(super) fn delete(&mut self, relay: &str, key: ReadKey, ids: Vec<EnvelopeId>) {
        let net = self.state.net.clone();
        let relay = split_poll(relay).0.to_owned();
        self.work.push(Box::pin(async move {
            if let Ok(addr) = relay.parse::<Multiaddr>()
                && let Err(e) = net.request(&addr, ClientToRelay::Delete { key, ids }).await
            {
                tracing::debug!(%relay, error = %e, "delete failed; what stays is recognised as a copy");
            }
            Done::Quiet
        }));
    }

    pub(super) fn start_sync(
        &mut self,
        reply: oneshot::Sender<SyncReport>,
        timeout: Duration,
        now: u64,
    ) {
        let due = self.deliveries.handle_force(now);
        self.write_entries(due);
        let relays: Vec<String> = match self.state.store.relays() {
            Ok(rs) => rs.into_iter().map(|r| r.addr).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read our relays");
                Vec::new()
            }
        };
        let queues = self.read_queues();
        let names: Vec<String> = relays
            .iter()
            .flat_map(|r| queues.iter().map(|w| poll_name(r, *w)))
            .chain(self.group_queues.keys().cloned())
            .collect();
        for name in &names {
            let after = self.cursor(name);
            let Some(fetch) = self.read_request(name, after, 0) else {
                continue;
            };
            self.ask_mailbox(name.clone(), fetch, true);
        }
        self.syncs.push(SyncRun {
            left: names,
            report: SyncReport::default(),
            deadline: now + timeout.as_millis() as u64,
            reply,
        });
        // Housekeeping first: a card about to run out is renewed, what expired goes,
        // receipts a crash left are sealed.
        self.renew_card_if_due(now);
        let result = self.state.housekeeping(now).map(drop);
        self.after_change(result, |_| {});
    }

    /// A peer handed us envelopes directly: a device of a contact (not blocked) or of
    /// our own account is answered per envelope once what became of them is durable;
    /// anyone else is sent to the relays.
    pub(super) fn direct_put(
        &mut self,
        from: PeerId,
        envelopes: Vec<Envelope>,
        reply: DirectReply,
        now: u64,
    ) {
        let store = &self.state.store;
        let known = match self.transports.get(&from) {
            Some((peer, _)) if *peer == self.state.me.peer_id() => true,
            Some((peer, _)) => {
                matches!(store.contact(peer), Ok(Some(_)))
                    && matches!(store.blocked(peer), Ok(None))
            }
            None => false,
        };
        if !known {
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
                        Ok(()) => RelayToClient::Stored { outcomes, epoch: 0 },
                        Err(_) => RelayToClient::error(
                            kkachi_protocol::ErrorCode::Internal,
                            "the recipient could not store it",
                        ),
                    });
                })));
            }
            Err(e) => {
                self.sync_outbox();
                tracing::warn!(%from, error = %e, "could not store a direct delivery");
                reply.send(RelayToClient::error(
                    kkachi_protocol::ErrorCode::Internal,
                    "the recipient could not store it",
                ));
            }
        }
    }

    /// A batch from our mailbox at `relay` is durable (or the last flush failed):
    /// delete it there, move the cursor past it, and fetch more or wait for the next.
    pub(super) fn mailbox_durable(&mut self, batch: Batch, flushed: Flushed) {
        let (relay, next, sync) = (batch.relay, batch.next, batch.sync);
        if flushed.is_err() {
            // Not durable: not deleted, not moved past; it comes again.
            let why = RelayError::NotStored("the local database failed".into());
            return self.mailbox_failed(&relay, why, sync, now_ms());
        }
        for run in &mut self.syncs {
            run.report.shown.extend(batch.shown.iter().cloned());
        }
        let group = super::super::groups::group_poll_relay(&relay).is_some();
        if !group {
            let Some(key) = self.queue_key(&relay) else {
                return;
            };
            if !batch.ids.is_empty() {
                self.delete(&relay, key, batch.ids);
            }
        }
        let (addr, which) = split_poll(&relay);
        let cursor = self.cursors.entry(relay.clone()).or_default();
        *cursor = (*cursor).max(next);
        if !group {
            self.state.note_relay(addr, Ok(()));
        }
        if std::mem::take(&mut self.reserve_again)
            && let Err(e) = self.take_relays()
        {
            tracing::warn!(error = %e, "cannot read our relays");
        }
        // Strangers' requests are read a batch at a time, at a steady pace, however
        // many wait; a sync reads everything.
        let paced = which.is_requests() && !sync && !group;
        let more = match (batch.more && !paced, self.read_request(&relay, next, 0)) {
            (true, Some(fetch)) => Some(fetch),
            _ => None,
        };
        if let Some(fetch) = more {
            self.ask_mailbox(relay, fetch, sync);
        } else if sync {
            self.sync_relay_done(&relay, Ok(()));
        } else {
            let answer = match (batch.empty, paced) {
                (true, _) => Answer::Empty,
                (false, true) => Answer::Paced,
                (false, false) => Answer::Items,
            };
            self.inboxes.handle_answer(&relay, answer, now_ms(), 0);
        }
    }
}

/// How a direct sender is told what became of one envelope.
fn direct_outcome(verdict: Verdict) -> PutOutcome {
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

/// Notes how group relay `relay` answered a read of one of its group queues: once per
/// relay, answered if any read was.
pub(super) fn note_group_relay(
    report: &mut crate::engine::SyncReport,
    relay: &str,
    result: Result<(), RelayError>,
) {
    match report.group_relays.iter_mut().find(|(r, _)| r == relay) {
        Some((_, held)) => {
            if held.is_err() {
                *held = result;
            }
        }
        None => report.group_relays.push((relay.to_owned(), result)),
    }
}
