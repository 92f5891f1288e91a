//! The outbox, and the envelope ids already handled.

use kkachi_protocol::EnvelopeId;

use super::{LocalStore, OutboxEntry, StoreError, TreeId, WriteSet, db};

impl LocalStore {
    // --- outbox ---

    /// Every outbox entry, oldest first, with its key.
    pub fn outbox(&self) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        self.records::<OutboxEntry>(TreeId::Outbox, "outbox entry")
            .map(|v| {
                v.into_iter()
                    .map(|(k, e)| {
                        (
                            u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8])),
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
        self.tree(TreeId::Seen).contains_key(id.0).map_err(db)
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
            let (k, v) = item.map_err(db)?;
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
