//! Bundles (SPEC.md §10): the outbox's sealed envelopes written to a file, and a file
//! taken in. What a bundle holds for us is read like envelopes fetched from a relay
//! (the same deduplication: nothing shows twice, whichever way it came first); the rest
//! is carried on: each envelope becomes an outbox entry of its own kind, put into the
//! relays the bundle names until every one holds it, or it expires.

use std::collections::HashSet;

use kkachi_protocol::bundle::{Item, MAX_ADDR_LEN, MAX_ITEMS, Target as BundleTarget};
use kkachi_protocol::envelope::{CLOCK_SKEW_SECS, MAX_TTL_SECS};
use kkachi_protocol::{Envelope, EnvelopeId, PeerId, WriteKey};

use super::state::State;
use super::{EngineError, Verdict};
use crate::net::peer_of;
use crate::store::{LocalStore, OutboxEntry, OutboxKind, Target, TreeId, WriteSet};

/// The most envelopes carried for others at once.
pub const MAX_FORWARDING: usize = 2_000;
/// The most bytes of envelopes carried for others at once.
pub const MAX_FORWARDING_BYTES: usize = 64 << 20;
/// The most distinct relays (by peer id) that envelopes carried for others go to: a
/// bundle cannot make this client dial more than this many, whatever it names.
pub const MAX_CARRIED_RELAYS: usize = 64;
/// Envelopes of a bundle taken in per turn of the engine, which goes on with other
/// work in between.
pub(crate) const IMPORT_CHUNK: usize = 256;

/// What taking in a bundle did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Imported {
    /// Envelopes in it.
    pub envelopes: usize,
    /// For us, taken in now (messages, receipts, cards, requests).
    pub for_us: usize,
    /// New messages among them, shown now.
    pub shown: usize,
    /// For us, and handled before (through a relay, or an earlier bundle).
    pub already_had: usize,
    /// For others: queued to be put into their relays.
    pub forwarding: usize,
    /// Already in our outbox (our own, or this bundle taken in before).
    pub already_queued: usize,
    /// Past their expiry, or expiring further ahead than relays keep anything: dropped.
    pub expired: usize,
    /// For others, but naming no relay we could put them into.
    pub no_relay: usize,
    /// For others, but we carry as much as we may already ([`MAX_FORWARDING`],
    /// [`MAX_FORWARDING_BYTES`], [`MAX_CARRIED_RELAYS`]).
    pub over_limit: usize,
}

impl Imported {
    /// Adds the counts of another part of the same bundle.
    pub fn add(&mut self, other: &Imported) {
        self.envelopes += other.envelopes;
        self.for_us += other.for_us;
        self.shown += other.shown;
        self.already_had += other.already_had;
        self.forwarding += other.forwarding;
        self.already_queued += other.already_queued;
        self.expired += other.expired;
        self.no_relay += other.no_relay;
        self.over_limit += other.over_limit;
    }
}

/// The outbox entries (of any kind) a bundle carries, oldest first, that are meant for
/// `only` (everyone when `None`) and not expired at `now_secs`.
pub(crate) fn export_items(
    store: &LocalStore,
    only: Option<&PeerId>,
    now_secs: u64,
) -> Result<Vec<Item>, EngineError> {
    let only = only.map(|p| p.to_bytes());
    let mut items = Vec::new();
    for (_, entry) in store.outbox()? {
        if items.len() >= MAX_ITEMS {
            break;
        }
        if only.as_ref().is_some_and(|o| *o != entry.contact) {
            continue;
        }
        let Ok(envelope) = Envelope::decode(&entry.envelope) else {
            continue;
        };
        if envelope.expires_at <= now_secs {
            continue;
        }
        let targets = entry
            .targets
            .iter()
            .filter(|t| t.addr.len() <= MAX_ADDR_LEN)
            .filter_map(|t| {
                Some(BundleTarget {
                    relay: t.addr.parse().ok()?,
                    write: WriteKey(t.write),
                    request: t.request.map(WriteKey),
                })
            })
            .take(kkachi_protocol::bundle::MAX_TARGETS)
            .collect();
        items.push(Item { envelope, targets });
    }
    Ok(items)
}

/// Whether `addr` is on this machine or a local network: loopback, private, link-local,
/// unspecified (names are not resolved here: they count as elsewhere).
fn local(addr: &kkachi_protocol::Multiaddr) -> bool {
    use kkachi_protocol::multiaddr::Protocol;
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => {
            ip.is_loopback() || ip.is_private() || ip.is_link_local() || ip.is_unspecified()
        }
        Protocol::Ip6(ip) => {
            ip.is_loopback()
                || ip.is_unspecified()
                || (ip.segments()[0] & 0xfe00) == 0xfc00
                || (ip.segments()[0] & 0xffc0) == 0xfe80
        }
        _ => false,
    })
}

/// What the outbox holds and carries for others, while a bundle is taken in: read from
/// the store once per bundle (the outbox holds whole envelopes), then kept up to date
/// part by part. What leaves the outbox meanwhile is still counted, which errs towards
/// carrying less.
#[derive(Debug, Default)]
pub(crate) struct Carrying {
    /// Envelopes in the outbox, or taken from this bundle.
    known: HashSet<EnvelopeId>,
    /// Envelopes carried for others, and their bytes.
    count: usize,
    bytes: usize,
    /// The relays they go to.
    relays: HashSet<PeerId>,
    /// Relays we use already: ours, and our contacts'.
    familiar: HashSet<PeerId>,
}

impl<T> State<T> {
    fn carrying(&self) -> Result<Carrying, EngineError> {
        let outbox = self.store.outbox()?;
        let carried: Vec<&OutboxEntry> = outbox
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e.kind == OutboxKind::Forward)
            .collect();
        let ours = self.store.relays()?;
        let contacts = self.store.contacts()?;
        Ok(Carrying {
            known: outbox
                .iter()
                .map(|(_, e)| EnvelopeId::of_encoding(&e.envelope))
                .collect(),
            count: carried.len(),
            bytes: carried.iter().map(|e| e.envelope.len()).sum(),
            relays: carried
                .iter()
                .flat_map(|e| &e.targets)
                .filter_map(|t| t.addr.parse().ok().as_ref().and_then(peer_of))
                .collect(),
            familiar: ours
                .iter()
                .filter_map(|r| r.addr.parse().ok().as_ref().and_then(peer_of))
                .chain(
                    contacts
                        .iter()
                        .flat_map(|c| c.card.relays().iter().filter_map(peer_of)),
                )
                .collect(),
        })
    }

    /// Takes in one part of a bundle at `now` (Unix ms). `carrying` is read from the
    /// store at the first part (`None`) and handed on to the next.
    pub(crate) fn import_bundle(
        &mut self,
        items: &[Item],
        carrying: &mut Option<Carrying>,
        now: u64,
    ) -> Result<Imported, EngineError> {
        let now_secs = now / 1000;
        let mut report = Imported {
            envelopes: items.len(),
            ..Imported::default()
        };
        let c = match carrying {
            Some(c) => c,
            None => carrying.insert(self.carrying()?),
        };
        let mut fresh = Vec::new();
        for item in items {
            let too_far = item.envelope.expires_at > now_secs + MAX_TTL_SECS + CLOCK_SKEW_SECS;
            let id = item.envelope.id();
            if item.envelope.expires_at <= now_secs || too_far {
                report.expired += 1;
            } else if !c.known.insert(id) {
                report.already_queued += 1;
            } else {
                fresh.push((item, id));
            }
        }
        // Read first: what opens is ours, whichever queue it was put into.
        let envelopes: Vec<Envelope> = fresh.iter().map(|(i, _)| i.envelope.clone()).collect();
        let tally = self.receive(&envelopes, super::receive::Source::Bundle, now)?;
        report.shown = tally.shown.len();
        let mut w = WriteSet::default();
        for ((item, id), verdict) in fresh.into_iter().zip(tally.verdicts) {
            match verdict {
                Verdict::Taken | Verdict::Held => report.for_us += 1,
                Verdict::Duplicate => report.already_had += 1,
                Verdict::Refused => {
                    // Each relay once, only relays named by their peer id, and none on
                    // this machine or its local network unless we know it already (a
                    // bundle from anyone must not make us knock on local services).
                    let mut peers = Vec::new();
                    let targets: Vec<Target> = item
                        .targets
                        .iter()
                        .filter(|t| match peer_of(&t.relay) {
                            Some(p)
                                if !peers.contains(&p)
                                    && (c.familiar.contains(&p) || !local(&t.relay)) =>
                            {
                                peers.push(p);
                                true
                            }
                            _ => false,
                        })
                        .map(|t| Target {
                            addr: t.relay.to_string(),
                            acked: false,
                            attempts: 0,
                            next_try_ms: 0,
                            write: t.write.0,
                            request: t.request.map(|k| k.0),
                            epoch: 0,
                        })
                        .collect();
                    if targets.is_empty() {
                        report.no_relay += 1;
                        continue;
                    }
                    let bytes = item.envelope.encoded_len();
                    let new_relays = peers.iter().filter(|p| !c.relays.contains(p)).count();
                    if c.count >= MAX_FORWARDING
                        || c.bytes + bytes > MAX_FORWARDING_BYTES
                        || c.relays.len() + new_relays > MAX_CARRIED_RELAYS
                    {
                        report.over_limit += 1;
                        continue;
                    }
                    c.count += 1;
                    c.bytes += bytes;
                    c.relays.extend(peers);
                    let mut message_id = [0; 16];
                    message_id.copy_from_slice(&id.0[..16]);
                    let entry = OutboxEntry {
                        message_id,
                        contact: Vec::new(),
                        kind: OutboxKind::Forward,
                        device: None,
                        envelope: item.envelope.encode(),
                        targets,
                        direct_acked: false,
                        created_ms: now,
                        sealed_on: None,
                        resealed_ms: 0,
                        queued_ms: now,
                        content: Vec::new(),
                    };
                    LocalStore::write_outbox(&mut w, self.store.next_outbox_seq()?, &entry);
                    report.forwarding += 1;
                }
            }
        }
        self.store.apply(w)?;
        Ok(report)
    }

    /// Forgets envelopes carried for others that expired before `now` (Unix ms): no
    /// relay would take them. Returns how many.
    pub(crate) fn drop_expired_forwards(&self, now: u64) -> Result<usize, EngineError> {
        let mut w = WriteSet::default();
        let mut dropped = 0;
        for (key, entry) in self.store.outbox()? {
            let expired =
                Envelope::decode(&entry.envelope).map_or(true, |e| e.expires_at <= now / 1000);
            if entry.kind == OutboxKind::Forward && expired {
                w.remove(TreeId::Outbox, key.to_be_bytes().to_vec());
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.store.apply(w)?;
        }
        Ok(dropped)
    }
}
