//! Our queues on our relays: which write capabilities they grant (SPEC.md §3). Each of
//! our relays holds two queues of ours: the inbox, granting one capability per contact,
//! and the contact-request queue, granting the capability in our card. Each relay is
//! told, once per run and again whenever our contacts change or the relay failed a long
//! poll (it may have lost its data), what they grant, in one sequence of requests that
//! first withdraws the capabilities of everyone blocked or removed (in this run), so a
//! grant sent earlier never lands after the withdrawal. Every request is idempotent, so
//! telling a relay again costs one request per 1,024 contacts.

use std::collections::{HashMap, HashSet};

use kkachi_protocol::wire::MAX_GRANT_IDS;
use kkachi_protocol::{
    ClientToRelay, Identity, Multiaddr, PeerId, QueueKind, ReadKey, RelayToClient, WriteId,
};

use super::super::state::relay_peer;
use super::super::{ATTEMPT_TIMEOUT, now_ms};
use super::{Done, Owner};
use crate::net::{NetError, Transport};

/// How long a relay whose grant failed waits before it is tried again.
const GRANT_RETRY_MS: u64 = 5_000;

/// Which of our relays grant what they should, as far as this run knows.
#[derive(Debug, Default)]
pub(super) struct Grants {
    /// By relay address: `None` while a grant is under way, `Some(0)` once done, or
    /// `Some(t)`: try again at `t`.
    relays: HashMap<String, Option<u64>>,
    /// Relays told while contacts changed: told again once that ends.
    dirty: HashSet<String>,
    /// People removed in this run: withdrawn at every telling (blocked contacts are
    /// found in the store each time).
    removed: Vec<[u8; 32]>,
}

impl Grants {
    /// Every relay is told again (contacts changed); one being told now, once it is done.
    pub(super) fn invalidate(&mut self) {
        for (relay, state) in &mut self.relays {
            match state {
                Some(0) => *state = Some(1),
                None => {
                    self.dirty.insert(relay.clone());
                }
                Some(_) => {}
            }
        }
    }

    /// Whether a relay is being told something right now.
    pub(super) fn busy(&self) -> bool {
        self.relays.values().any(Option::is_none)
    }

    /// When a relay is next due to be told (its grant failed, or contacts changed).
    pub(super) fn next_deadline(&self) -> Option<u64> {
        self.relays
            .values()
            .filter_map(|s| s.filter(|t| *t != 0))
            .min()
    }

    /// `relay` is told again (it failed; it may have lost its data).
    pub(super) fn invalidate_relay(&mut self, relay: &str) {
        match self.relays.get_mut(relay) {
            Some(state @ Some(0)) => *state = Some(1),
            Some(None) => {
                self.dirty.insert(relay.to_owned());
            }
            _ => {}
        }
    }
}

/// Which of our queues at a relay a long poll or fetch reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Which {
    /// Contacts' envelopes.
    Inbox,
    /// Strangers' first messages, through the card's contact-request capability.
    Requests,
    /// The request queue of the epoch before: nothing new reaches it (its capability
    /// is revoked), but what strangers sealed while the earlier code was valid is read
    /// for as long as it can still arrive.
    EarlierRequests,
    /// The inbox of our session key before its rotation: contacts who do not hold our
    /// new card yet still put there, with the capabilities it still grants.
    PreviousInbox,
    /// The request queue of that key: revoked, read while what was put can arrive.
    PreviousRequests,
}

impl Which {
    /// Every queue there is.
    pub(super) const ALL: [Which; 5] = [
        Which::Inbox,
        Which::Requests,
        Which::EarlierRequests,
        Which::PreviousInbox,
        Which::PreviousRequests,
    ];

    /// Strangers' first messages: read a batch at a time, at a steady pace.
    pub(super) fn is_requests(self) -> bool {
        matches!(
            self,
            Which::Requests | Which::EarlierRequests | Which::PreviousRequests
        )
    }

    /// How a poll name marks this queue after the relay's address.
    fn suffix(self) -> &'static str {
        match self {
            Which::Inbox => "",
            Which::Requests => "#requests",
            Which::EarlierRequests => "#earlier-requests",
            Which::PreviousInbox => "#previous-key",
            Which::PreviousRequests => "#previous-key-requests",
        }
    }
}

/// The long polls and fetches name a queue as `ADDR` (the inbox), `ADDR#requests` (the
/// contact-request queue), `ADDR#earlier-requests`, `ADDR#previous-key` or
/// `ADDR#previous-key-requests`: the schedule and the syncs keep them apart by name (a
/// multiaddr has no `#`).
pub(super) fn poll_name(addr: &str, which: Which) -> String {
    format!("{addr}{}", which.suffix())
}

/// The relay address and the queue a poll name stands for.
pub(super) fn split_poll(name: &str) -> (&str, Which) {
    Which::ALL
        .iter()
        .filter(|w| **w != Which::Inbox)
        .find_map(|w| name.strip_suffix(w.suffix()).map(|addr| (addr, *w)))
        .unwrap_or((name, Which::Inbox))
}

/// Session keys, one per device.
type Keys = Vec<[u8; 32]>;

/// What the inbox of `me` at relay `peer` is told: the capabilities of `withdrawn`
/// revoked, and those of `granted` granted (in that order: the revocations first).
fn inbox_requests(
    me: &Identity,
    peer: &PeerId,
    withdrawn: &[[u8; 32]],
    granted: &[[u8; 32]],
    token: &[u8],
) -> (Vec<ClientToRelay>, Vec<ClientToRelay>) {
    let key = me.inbox_key(peer);
    let ids = |who: &[[u8; 32]]| -> Vec<WriteId> {
        who.iter()
            .map(|device| me.grant_for_device(device, peer).id())
            .collect()
    };
    let revokes = ids(withdrawn)
        .chunks(MAX_GRANT_IDS)
        .map(|ids| ClientToRelay::Revoke {
            key: key.clone(),
            write_ids: ids.to_vec(),
        })
        .collect();
    let grants = ids(granted)
        .chunks(MAX_GRANT_IDS)
        .map(|ids| ClientToRelay::Grant {
            key: key.clone(),
            kind: QueueKind::Inbox,
            token: token.to_vec(),
            write_ids: ids.to_vec(),
        })
        .collect();
    (revokes, grants)
}

impl<T: Transport> Owner<T> {
    /// The read key of the queue a poll name stands for (its relay address ends in
    /// `/p2p/…`).
    pub(super) fn queue_key(&self, name: &str) -> Option<ReadKey> {
        let (relay, which) = split_poll(name);
        let addr: Multiaddr = relay.parse().ok()?;
        let peer = relay_peer(&addr)?;
        Some(match which {
            Which::Inbox => self.state.me.inbox_key(&peer),
            Which::Requests => self.state.me.request_read_key(&peer, self.request_epoch),
            Which::EarlierRequests => self
                .state
                .me
                .request_read_key(&peer, self.request_epoch.checked_sub(1)?),
            Which::PreviousInbox => self.state.previous.as_ref()?.identity.inbox_key(&peer),
            Which::PreviousRequests => {
                let previous = self.state.previous.as_ref()?;
                previous.identity.request_read_key(&peer, previous.epoch)
            }
        })
    }

    /// The queues we read at each relay: the inbox, the request queue, and the one of
    /// the epoch before while what was sealed under it can still arrive.
    pub(super) fn read_queues(&self) -> Vec<Which> {
        let mut queues = vec![Which::Inbox, Which::Requests];
        if self.request_epoch > 0 && now_ms() / 1000 < self.earlier_requests_until {
            queues.push(Which::EarlierRequests);
        }
        if self.state.previous.is_some() {
            queues.extend([Which::PreviousInbox, Which::PreviousRequests]);
        }
        queues
    }

    /// Our relays are now `relays`: new ones are told at once, removed ones forgotten.
    pub(super) fn grant_relays(&mut self, relays: &[String]) {
        self.grants.relays.retain(|r, _| relays.contains(r));
        for relay in relays {
            self.grants.relays.entry(relay.clone()).or_insert(Some(1));
        }
    }

    /// Starts telling each of our relays that needs it what to grant (nothing to do on
    /// most turns of the loop: it returns at once).
    pub(super) fn start_grants(&mut self) {
        let now = now_ms();
        if self
            .state
            .met
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            // Members met in a group are granted as contacts are, and let in on the LAN;
            // our own devices too (as large groups follow them).
            self.grants.invalidate();
            self.allow_contacts();
            self.after_own_devices(now);
        }
        if self.state.revoked.lock().is_empty()
            && self.grants.next_deadline().is_none_or(|t| t > now)
        {
            return;
        }
        let relays: Vec<String> = self.grants.relays.keys().cloned().collect();
        let removed = std::mem::take(&mut *self.state.revoked.lock());
        if !removed.is_empty() {
            for identity in removed {
                if !self.grants.removed.contains(&identity) {
                    self.grants.removed.push(identity);
                }
            }
            self.grants.invalidate();
            // A contact's key replaced by a rotation: the LAN knows their new one too.
            self.allow_contacts();
        }
        // Whom to grant and withdraw, worked out once for every relay told now.
        let mut keys = None;
        for relay in relays {
            let state = self.grants.relays.get(&relay).copied().flatten();
            if !matches!(state, Some(t) if t != 0 && t <= now) {
                continue;
            }
            if keys.is_none() {
                keys = self.grant_keys();
            }
            let Some((withdrawn, granted)) = &keys else {
                continue;
            };
            let Some(requests) = self.grant_requests(&relay, withdrawn, granted) else {
                continue;
            };
            self.grants.relays.insert(relay.clone(), None);
            tracing::debug!(%relay, requests = requests.len(), "telling a relay what to grant");
            let net = self.state.net.clone();
            self.work.push(Box::pin(async move {
                let mut result = Ok(());
                match relay.parse::<Multiaddr>() {
                    Ok(addr) => {
                        for request in requests {
                            let answer =
                                tokio::time::timeout(ATTEMPT_TIMEOUT, net.request(&addr, request))
                                    .await
                                    .unwrap_or_else(|_| {
                                        Err(NetError::Unreachable(format!(
                                            "no answer within {ATTEMPT_TIMEOUT:?}"
                                        )))
                                    });
                            match answer {
                                Ok(RelayToClient::Granted { .. }) => {}
                                Ok(RelayToClient::Error { code, message }) => {
                                    result = Err(format!("{}: {message}", code.as_str()));
                                    break;
                                }
                                Ok(other) => {
                                    result = Err(format!("unexpected answer {other:?}"));
                                    break;
                                }
                                Err(e) => {
                                    result = Err(e.to_string());
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => result = Err(format!("bad relay address: {e}")),
                }
                Done::Granted { relay, result }
            }));
        }
    }

    /// The session keys whose capabilities our inbox withdraws (everyone blocked, or
    /// removed in this run) and grants (every device of every other contact), or
    /// `None` if the store cannot say.
    fn grant_keys(&self) -> Option<(Keys, Keys)> {
        let contacts = match self.state.store.contacts() {
            Ok(cs) => cs,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read our contacts");
                return None;
            }
        };
        let (blocked, granted): (Vec<_>, Vec<_>) = contacts
            .iter()
            .partition(|c| !matches!(self.state.store.blocked(&c.peer), Ok(None)));
        // Every device of each: the card's, and each other one that wrote to us.
        let keys = |of: &[&crate::store::Contact]| -> Option<Vec<[u8; 32]>> {
            let mut keys = Vec::new();
            for c in of {
                match self.state.device_keys(c) {
                    Ok(k) => keys.extend(k),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read a contact's devices");
                        return None;
                    }
                }
            }
            Some(keys)
        };
        let mut withdrawn = self.grants.removed.clone();
        withdrawn.extend(keys(&blocked)?);
        let mut granted = keys(&granted)?;
        // Our account's other devices (SPEC §15.2); those it took out are withdrawn.
        match self.state.store.own_devices(&self.state.me) {
            Ok(Some(set)) => {
                let me = self.state.me.x25519_public();
                granted.extend(set.devices().map(|d| *d.key()).filter(|k| *k != me));
                withdrawn.extend(set.removals().map(|r| *r.key()).filter(|k| *k != me));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read our device set");
                return None;
            }
        }
        Some((withdrawn, granted))
    }

    /// The requests that bring `relay` up to date: withdraw the capabilities of
    /// `withdrawn`, grant those of `granted` (see [`Self::grant_keys`]).
    fn grant_requests(
        &self,
        relay: &str,
        withdrawn: &[[u8; 32]],
        granted: &[[u8; 32]],
    ) -> Option<Vec<ClientToRelay>> {
        let addr: Multiaddr = relay.parse().ok()?;
        let peer = relay_peer(&addr)?;
        let token = self.relay_token(relay);
        let (mut requests, inbox_grants) =
            inbox_requests(&self.state.me, &peer, withdrawn, granted, &token);
        let epoch = self.request_epoch;
        if let Some(before) = epoch.checked_sub(1) {
            // The codes given out before the last renewal reach nothing any more.
            requests.push(ClientToRelay::Revoke {
                key: self.state.me.request_read_key(&peer, before),
                write_ids: vec![self.state.me.request_write_key(&peer, before).id()],
            });
        }
        requests.push(ClientToRelay::Grant {
            key: self.state.me.request_read_key(&peer, epoch),
            kind: QueueKind::Requests,
            token: token.clone(),
            write_ids: vec![self.state.me.request_write_key(&peer, epoch).id()],
        });
        requests.extend(inbox_grants);
        if let Some(previous) = &self.state.previous {
            // Our session key before its rotation: its codes reach nothing any more;
            // contacts who do not hold our new card yet still reach its inbox.
            let old = &previous.identity;
            requests.push(ClientToRelay::Revoke {
                key: old.request_read_key(&peer, previous.epoch),
                write_ids: vec![old.request_write_key(&peer, previous.epoch).id()],
            });
            let (revokes, grants) = inbox_requests(old, &peer, withdrawn, granted, &token);
            requests.extend(revokes);
            requests.extend(grants);
        }
        Some(requests)
    }

    /// The access token we hold for `relay`, if its operator gave us one.
    fn relay_token(&self, relay: &str) -> Vec<u8> {
        self.state
            .store
            .relays()
            .ok()
            .and_then(|rs| rs.into_iter().find(|r| r.addr == relay))
            .and_then(|r| r.token)
            .map(String::into_bytes)
            .unwrap_or_default()
    }

    pub(super) fn on_granted(&mut self, relay: String, result: Result<(), String>) {
        let dirty = self.grants.dirty.remove(&relay);
        let Some(state) = self.grants.relays.get_mut(&relay) else {
            return;
        };
        match result {
            Ok(()) if dirty => *state = Some(1),
            Ok(()) => *state = Some(0),
            Err(why) => {
                // A write key granted to someone else's queue there is an attack on
                // our invite (its request key is public): said loudly.
                if why.starts_with(kkachi_protocol::ErrorCode::NotAllowed.as_str()) {
                    tracing::error!(%relay, error = %why, "the relay refused our grants; until it takes them, people may not reach us through it");
                } else {
                    tracing::warn!(%relay, error = %why, "the relay did not take our grants; trying again");
                }
                *state = Some(now_ms() + GRANT_RETRY_MS);
            }
        }
    }
}
