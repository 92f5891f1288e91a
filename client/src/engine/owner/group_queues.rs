//! Large groups' queues on their group relays (SPEC §14.5): read with long polls as our
//! own queues are (the same schedule, by poll name), never deleted from, and opened on
//! each relay once per run; posts put there, opening a queue a relay does not hold.

use std::collections::HashMap;

use kkachi_protocol::wire::Addressed;
use kkachi_protocol::{ClientToRelay, Envelope, ErrorCode, GroupKey, Multiaddr, WriteKey};

use super::super::groups::{GroupQueue, group_poll_relay};
use super::super::machine::Outcome;
use super::outbox::put;
use super::{Done, Owner};
use crate::net::Transport;

impl<T: Transport> Owner<T> {
    /// The group queue a poll name stands for, if it is one.
    pub(super) fn group_queue(&self, name: &str) -> Option<&GroupQueue> {
        self.group_queues.get(name)
    }

    /// Reads the large groups' queues anew (their epochs or relays changed): polled
    /// beside our own queues, and each new one opened on its relay.
    pub(super) fn refresh_group_queues(&mut self) {
        let queues = match self.state.group_queues() {
            Ok(q) => q,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read our groups' queues");
                return;
            }
        };
        let fresh: HashMap<String, GroupQueue> =
            queues.into_iter().map(|q| (q.name.clone(), q)).collect();
        let new: Vec<GroupQueue> = fresh
            .iter()
            .filter(|(name, _)| !self.group_queues.contains_key(*name))
            .map(|(_, q)| q.clone())
            .collect();
        self.cursors
            .retain(|name, _| group_poll_relay(name).is_none() || fresh.contains_key(name));
        self.group_queues = fresh;
        self.set_polls();
        for q in new {
            self.open_group_queue(q.relay.clone(), q.key);
            // A sync under way reads it too: a key that came in the sync's first
            // batches opens the group's queue in the same sync.
            if !self.syncs.is_empty() {
                for run in &mut self.syncs {
                    run.left.push(q.name.clone());
                }
                if let Some(fetch) = self.read_request(&q.name, 0, 0) {
                    self.ask_mailbox(q.name.clone(), fetch, true);
                }
            }
        }
    }

    /// Our queues and the groups' queues, as the long polls' schedule holds them.
    pub(super) fn set_polls(&mut self) {
        if !self.mode.inbox {
            return;
        }
        let names = self
            .inbox_names
            .iter()
            .cloned()
            .chain(self.group_queues.keys().cloned());
        self.inboxes.set(names);
    }

    /// Opens a group queue on its relay (idempotent); a put answered `no queue` opens
    /// it again.
    fn open_group_queue(&mut self, relay: String, key: GroupKey) {
        let net = self.state.net.clone();
        self.work.push(Box::pin(async move {
            if let Ok(addr) = relay.parse::<Multiaddr>() {
                let open = ClientToRelay::OpenGroup {
                    key,
                    token: Vec::new(),
                };
                if let Err(e) = net.request(&addr, open).await {
                    tracing::debug!(%relay, error = %e, "could not open a group queue; a put opens it");
                }
            }
            Done::Quiet
        }));
    }

    /// The request reading the queue named `name` after `after` (a long poll if
    /// `wait_ms` > 0): a group queue's or one of ours.
    pub(super) fn read_request(
        &self,
        name: &str,
        after: u64,
        wait_ms: u32,
    ) -> Option<ClientToRelay> {
        if let Some(q) = self.group_queue(name) {
            return Some(ClientToRelay::ReadGroup {
                key: q.key,
                after,
                limit: 256,
                wait_ms,
            });
        }
        let key = self.queue_key(name)?;
        Some(if wait_ms == 0 {
            ClientToRelay::Fetch {
                key,
                after,
                limit: 256,
            }
        } else {
            ClientToRelay::Subscribe {
                key,
                after,
                wait_ms,
            }
        })
    }

    /// Large groups' upkeep, when due: haves posted, held posts released, epochs kept
    /// sound.
    pub(super) fn large_upkeep_if_due(&mut self, now: u64) {
        if self.next_large_upkeep.is_none_or(|at| at > now) {
            return;
        }
        match self.state.large_upkeep(now) {
            Ok((queued, next)) => {
                self.next_large_upkeep = next;
                if queued {
                    self.after_change(Ok(()), |_| {});
                }
            }
            Err(e) => {
                // Not again at once: at the next change or batch taken in.
                self.next_large_upkeep = None;
                tracing::warn!(error = %e, "large groups' upkeep failed");
            }
        }
    }
}

/// Puts `envelope` into the group queue of `key` at `relay`; a relay that holds no such
/// queue (it lost its data, or the queue is new) has it opened, and is put to again.
pub(super) async fn put_to_group<T: Transport>(
    net: &T,
    relay: &Multiaddr,
    envelope: Envelope,
    key: GroupKey,
) -> (Outcome, u64) {
    let through = |envelope: Envelope| ClientToRelay::PutGroup {
        items: vec![Addressed {
            write: WriteKey(key.0),
            envelope,
        }],
    };
    match put(net.request(relay, through(envelope.clone()))).await {
        (Outcome::Refused(why), _) if why.starts_with(ErrorCode::NoQueue.as_str()) => {
            let open = ClientToRelay::OpenGroup {
                key,
                token: Vec::new(),
            };
            if let Err(e) = net.request(relay, open).await {
                return (Outcome::Unreachable(e.to_string()), 0);
            }
            put(net.request(relay, through(envelope))).await
        }
        answer => answer,
    }
}
