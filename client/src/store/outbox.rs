//! The outbox, and the envelope ids already handled.

use std::collections::{BTreeSet, HashMap};

use kkachi_protocol::{EnvelopeId, MessageId, PeerId};
use serde::Deserialize;

use super::{LocalStore, OutboxEntry, OutboxKind, StoreError, TreeId, WriteSet};

/// The first fields of an [`OutboxEntry`], as stored: what the index needs.
#[derive(Deserialize)]
struct Head {
    message_id: [u8; 16],
    contact: Vec<u8>,
    kind: OutboxKind,
    device: Option<[u8; 32]>,
}

/// A message for one device of a contact: contact, message id, device.
type Addressed = (Vec<u8>, [u8; 16], Option<[u8; 32]>);

/// The outbox's messages (and the control records for devices other than a card's) by
/// contact, message id and device, in memory, kept up to date by every write: a
/// receipt (which names message ids) or a contact who lost its session finds its
/// entries without reading the whole outbox.
#[derive(Debug, Default)]
pub(super) struct OutboxIndex {
    by_contact: HashMap<Vec<u8>, BTreeSet<u64>>,
    by_message: HashMap<Addressed, u64>,
    by_key: HashMap<u64, Addressed>,
}

impl OutboxIndex {
    /// Entry `key` is now `value` (an encoded entry), or (`None`) gone.
    pub(super) fn note(&mut self, key: u64, value: Option<&[u8]>) {
        if let Some((contact, id, device)) = self.by_key.remove(&key) {
            self.by_message.remove(&(contact.clone(), id, device));
            if let Some(keys) = self.by_contact.get_mut(&contact) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.by_contact.remove(&contact);
                }
            }
        }
        let Some((head, _)) = value.and_then(|v| postcard::take_from_bytes::<Head>(v).ok()) else {
            return;
        };
        // Messages, and whatever goes to a device other than a card's (a contact's
        // other device, or one of ours): what a device taken out, or a new session
        // with it, must find.
        let for_a_device = head.kind == OutboxKind::Control && head.device.is_some();
        if head.kind != OutboxKind::Message && !for_a_device {
            return;
        }
        self.by_contact
            .entry(head.contact.clone())
            .or_default()
            .insert(key);
        self.by_message
            .insert((head.contact.clone(), head.message_id, head.device), key);
        self.by_key
            .insert(key, (head.contact, head.message_id, head.device));
    }
}

impl LocalStore {
    // --- outbox ---

    /// Every outbox entry, oldest first, with its key.
    pub fn outbox(&self) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        self.records::<OutboxEntry>(TreeId::Outbox, "outbox entry")
            .map(|v| {
                v.into_iter()
                    .map(|(k, e)| {
                        (
                            u64::from_be_bytes(k.as_slice().try_into().unwrap_or([0; 8])),
                            e,
                        )
                    })
                    .collect()
            })
    }

    /// One outbox entry.
    pub fn outbox_entry(&self, key: u64) -> Result<Option<OutboxEntry>, StoreError> {
        self.get_record(TreeId::Outbox, &key.to_be_bytes(), "outbox entry")
    }

    /// The outbox keys of `contact`'s messages among `ids` sealed to `device` of
    /// theirs (receipts and card updates are not included, but for devices other than
    /// a card's, whose random ids no receipt names).
    pub fn outbox_keys_for(
        &self,
        contact: &PeerId,
        ids: &[MessageId],
        device: &Option<[u8; 32]>,
    ) -> Vec<u64> {
        let contact = contact.to_bytes();
        let index = self.outbox_index.lock();
        ids.iter()
            .filter_map(|id| {
                index
                    .by_message
                    .get(&(contact.clone(), id.0, *device))
                    .copied()
            })
            .collect()
    }

    /// The outbox keys of message `id` for `contact`, for every device of theirs.
    pub fn outbox_keys_of_message(&self, contact: &PeerId, id: &MessageId) -> Vec<u64> {
        self.outbox_keys_where(contact, |(_, m, _)| *m == id.0)
    }

    /// The outbox keys of the messages among `ids` for `contact`, for every device
    /// of theirs: one pass over their entries, however many ids.
    pub fn outbox_keys_of_messages(&self, contact: &PeerId, ids: &[MessageId]) -> Vec<u64> {
        let ids: std::collections::HashSet<[u8; 16]> = ids.iter().map(|id| id.0).collect();
        self.outbox_keys_where(contact, |(_, m, _)| ids.contains(m))
    }

    /// The outbox keys of the messages waiting for `device` of `contact`.
    pub fn outbox_keys_of_device(&self, contact: &PeerId, device: &Option<[u8; 32]>) -> Vec<u64> {
        self.outbox_keys_where(contact, |(_, _, d)| d == device)
    }

    /// The outbox keys of `contact`'s messages whose address `pick` takes.
    fn outbox_keys_where(&self, contact: &PeerId, pick: impl Fn(&Addressed) -> bool) -> Vec<u64> {
        let index = self.outbox_index.lock();
        let Some(keys) = index.by_contact.get(&contact.to_bytes()) else {
            return Vec::new();
        };
        keys.iter()
            .copied()
            .filter(|k| index.by_key.get(k).is_some_and(&pick))
            .collect()
    }

    /// The outbox keys of every message waiting for `contact`, oldest first.
    pub fn outbox_keys_of(&self, contact: &PeerId) -> Vec<u64> {
        let index = self.outbox_index.lock();
        index
            .by_contact
            .get(&contact.to_bytes())
            .map(|keys| keys.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The index as the outbox holds it now.
    pub(super) fn load_outbox_index(&self) -> Result<(), StoreError> {
        let mut index = OutboxIndex::default();
        for item in self.tree(TreeId::Outbox).iter() {
            let (k, v) = item?;
            if let Ok(key) = <[u8; 8]>::try_from(k.as_ref()) {
                index.note(u64::from_be_bytes(key), Some(&v));
            }
        }
        *self.outbox_index.lock() = index;
        Ok(())
    }

    /// Number of entries waiting.
    pub fn outbox_len(&self) -> usize {
        self.tree(TreeId::Outbox).len()
    }

    /// Writes an outbox entry (in a WriteSet).
    pub fn write_outbox(w: &mut WriteSet, key: u64, entry: &OutboxEntry) {
        w.put_record(TreeId::Outbox, key.to_be_bytes().to_vec(), entry);
    }

    // --- seen envelopes ---

    /// True if this envelope was already processed.
    pub fn seen(&self, id: &EnvelopeId) -> Result<bool, StoreError> {
        self.tree(TreeId::Seen).contains_key(id.0)
    }

    /// Records an envelope as handled for good (in a WriteSet), until it expires
    /// (`expires_at`, Unix seconds): after that no relay may hand it out again, and
    /// [`LocalStore::prune_seen`] forgets it.
    pub fn write_seen(w: &mut WriteSet, id: &EnvelopeId, expires_at: u64) {
        w.put(
            TreeId::Seen,
            id.0.to_vec(),
            expires_at.to_be_bytes().to_vec(),
        );
    }

    /// Forgets the ids of envelopes that expired before `before` (Unix seconds; pass
    /// now minus the tolerated clock skew): the receive path refuses expired envelopes
    /// before it looks them up. Returns how many were forgotten.
    pub fn prune_seen(&self, before: u64) -> Result<usize, StoreError> {
        let mut w = WriteSet::default();
        let mut n = 0;
        for item in self.tree(TreeId::Seen).iter() {
            let (k, v) = item?;
            let expires = <[u8; 8]>::try_from(v.as_ref()).map_or(0, u64::from_be_bytes);
            if expires < before {
                w.remove(TreeId::Seen, k.to_vec());
                n += 1;
            }
            // In bounded sets: each is one journaled write.
            if w.len() >= 1024 {
                self.apply(std::mem::take(&mut w))?;
            }
        }
        self.apply(w)?;
        Ok(n)
    }

    /// Envelope ids remembered as handled.
    pub fn seen_len(&self) -> usize {
        self.tree(TreeId::Seen).len()
    }
}
