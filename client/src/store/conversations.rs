//! Contacts, sessions, conversations, messages, receipts due and hash chains.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kkachi_protocol::{Card, MessageId, PeerId, Session};

use super::records::ContactRecord;
use super::{
    Contact, Conversation, DeviceNumbers, LocalStore, MessageRecord, StoreError, TreeId, WriteSet,
    decode,
};
use crate::sequence::ChainLink;

/// Decoded contacts. Decoding checks each card's signatures, which costs more than
/// the rest of receiving a message, and contacts are read on every one.
#[derive(Debug, Default)]
pub(super) struct ContactCache {
    /// Bumped after every write to the contacts tree.
    pub(super) generation: AtomicU64,
    /// The contacts as of `.0`, a generation.
    cached: parking_lot::RwLock<Option<(u64, Arc<Vec<Contact>>)>>,
}

impl LocalStore {
    // --- contacts ---

    /// All contacts, by name. Decoded once per change of the contacts tree and shared.
    pub fn contacts(&self) -> Result<Arc<Vec<Contact>>, StoreError> {
        let generation = self.contacts.generation.load(Ordering::SeqCst);
        if let Some((g, contacts)) = self.contacts.cached.read().as_ref()
            && *g == generation
        {
            return Ok(contacts.clone());
        }
        let mut out = Vec::new();
        for item in self.tree(TreeId::Contacts).iter() {
            let (k, v) = item?;
            out.push(contact_from(&k, &v)?);
        }
        out.sort_by_key(|c| c.name.to_lowercase());
        let out = Arc::new(out);
        *self.contacts.cached.write() = Some((generation, out.clone()));
        Ok(out)
    }

    /// One contact (or member met in a group: [`Contact::through_group`]).
    pub fn contact(&self, peer: &PeerId) -> Result<Option<Contact>, StoreError> {
        Ok(self.contacts()?.iter().find(|c| c.peer == *peer).cloned())
    }

    /// The contacts the user added, by name: not the members only met in a group.
    pub fn added_contacts(&self) -> Result<Vec<Contact>, StoreError> {
        Ok(self
            .contacts()?
            .iter()
            .filter(|c| c.is_added())
            .cloned()
            .collect())
    }

    /// One contact the user added.
    pub fn added_contact(&self, peer: &PeerId) -> Result<Option<Contact>, StoreError> {
        Ok(self.contact(peer)?.filter(Contact::is_added))
    }

    /// Adds or replaces a contact (in a WriteSet).
    pub fn write_contact(w: &mut WriteSet, contact: &Contact) {
        let record = ContactRecord {
            name: contact.name.clone(),
            card: contact.card.encode(),
            through_group: contact.through_group,
        };
        w.put_record(TreeId::Contacts, contact.peer.to_bytes(), &record);
    }

    // --- sessions and conversations ---

    /// The session with `contact` (a fresh one if none is stored).
    pub fn session(&self, contact: &Contact) -> Result<Session, StoreError> {
        match self.tree(TreeId::Sessions).get(contact.peer.to_bytes())? {
            Some(bytes) => Session::decode(&bytes).map_err(|_| StoreError::Corrupt("session")),
            None => Ok(Session::new(*contact.card.identity().x25519())),
        }
    }

    /// Writes a session state (in a WriteSet).
    pub fn write_session(w: &mut WriteSet, peer: &PeerId, session: &Session) {
        w.put(TreeId::Sessions, peer.to_bytes(), session.encode().to_vec());
    }

    /// The session with the device of `peer`'s account whose session key is `key`,
    /// other than the one their card names (a fresh one if none is stored).
    pub fn device_session(&self, peer: &PeerId, key: &[u8; 32]) -> Result<Session, StoreError> {
        match self
            .tree(TreeId::Sessions)
            .get(device_session_key(peer, key))?
        {
            Some(bytes) => Session::decode(&bytes).map_err(|_| StoreError::Corrupt("session")),
            None => Ok(Session::new(*key)),
        }
    }

    /// The session keys of `contact`'s other devices we hold sessions with (each proved
    /// its key with a first message), but those their account took out since.
    pub fn device_sessions_of(&self, contact: &Contact) -> Result<Vec<[u8; 32]>, StoreError> {
        let mut keys = self.device_session_keys(&contact.peer)?;
        // The card's device is the contact's own session, never also another device.
        keys.retain(|k| k != contact.card.identity().x25519());
        if keys.is_empty() {
            return Ok(keys);
        }
        if let Some(set) = self.contact_devices(&contact.peer, contact.card.identity().ed25519())? {
            keys.retain(|k| !set.is_removed(k));
        }
        Ok(keys)
    }

    /// The keys of every device of `peer` a session is kept with, as stored (the
    /// card's and those their set took out included).
    pub fn device_session_keys(&self, peer: &PeerId) -> Result<Vec<[u8; 32]>, StoreError> {
        let prefix = peer.to_bytes();
        let mut keys = Vec::new();
        for item in self.tree(TreeId::Sessions).scan_prefix(&prefix) {
            let (k, _) = item?;
            if let Ok(key) = <[u8; 32]>::try_from(&k[prefix.len()..]) {
                keys.push(key);
            }
        }
        Ok(keys)
    }

    /// Writes the session with one of `peer`'s other devices (in a WriteSet).
    pub fn write_device_session(
        w: &mut WriteSet,
        peer: &PeerId,
        key: &[u8; 32],
        session: &Session,
    ) {
        w.put(
            TreeId::Sessions,
            device_session_key(peer, key),
            session.encode().to_vec(),
        );
    }

    /// Removes the session with one of `peer`'s other devices (in a WriteSet).
    pub fn remove_device_session(w: &mut WriteSet, peer: &PeerId, key: &[u8; 32]) {
        w.remove(TreeId::Sessions, device_session_key(peer, key));
    }

    /// Removes every session with `peer`, their other devices' included (in a WriteSet).
    pub fn forget_sessions(&self, w: &mut WriteSet, peer: &PeerId) -> Result<(), StoreError> {
        for item in self.tree(TreeId::Sessions).scan_prefix(peer.to_bytes()) {
            let (k, _) = item?;
            w.remove(TreeId::Sessions, k.to_vec());
        }
        Ok(())
    }

    /// The conversation with `peer`.
    pub fn conversation(&self, peer: &PeerId) -> Result<Conversation, StoreError> {
        Ok(self
            .get_record(TreeId::Conversations, &peer.to_bytes(), "conversation")?
            .unwrap_or_default())
    }

    /// Writes a conversation (in a WriteSet).
    pub fn write_conversation(w: &mut WriteSet, peer: &PeerId, conv: &Conversation) {
        w.put_record(TreeId::Conversations, peer.to_bytes(), conv);
    }

    // --- messages ---

    /// Messages with `peer`, oldest first.
    pub fn messages(&self, peer: &PeerId) -> Result<Vec<MessageRecord>, StoreError> {
        let mut out = Vec::new();
        self.for_each_message(peer, |m| out.push(m))?;
        Ok(out)
    }

    /// Calls `f` with every message with `peer`, oldest first, without holding them
    /// all. Reading pages of a store just opened is most of the cost of a long history,
    /// so a helper thread reads ahead while this one decodes and `f` works.
    pub fn for_each_message(
        &self,
        peer: &PeerId,
        mut f: impl FnMut(MessageRecord),
    ) -> Result<(), StoreError> {
        const BATCH: usize = 512;
        let tree = self.tree(TreeId::Messages);
        let prefix = peer.to_bytes();
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<Vec<u8>>, StoreError>>(8);
            scope.spawn(move || {
                let mut batch = Vec::with_capacity(BATCH);
                for item in tree.scan_prefix(prefix) {
                    match item {
                        Ok((_, v)) => batch.push(v),
                        Err(e) => {
                            // What came before it is read first.
                            let _ = tx.send(Ok(std::mem::take(&mut batch)));
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                    if batch.len() == BATCH
                        && tx
                            .send(Ok(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))))
                            .is_err()
                    {
                        return; // the reader gave up
                    }
                }
                let _ = tx.send(Ok(batch));
            });
            // Dropping `rx` on an error stops the helper at its next batch.
            let now = crate::engine::now_ms();
            for batch in rx {
                for v in batch? {
                    let m: MessageRecord = decode(&v, "message")?;
                    // Gone, though not deleted yet.
                    if !m.expired(now) {
                        f(m);
                    }
                }
            }
            Ok(())
        })
    }

    /// The most recent `n` messages with `peer`, oldest first.
    pub fn recent_messages(
        &self,
        peer: &PeerId,
        n: usize,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        let now = crate::engine::now_ms();
        let mut out: Vec<MessageRecord> = self
            .tree(TreeId::Messages)
            .scan_prefix(peer.to_bytes())
            .rev()
            .map(|item| {
                let (_, v) = item?;
                decode::<MessageRecord>(&v, "message")
            })
            .filter(|m| m.as_ref().map_or(true, |m| !m.expired(now)))
            .take(n)
            .collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// A message by its sender's id within a conversation: (key, record).
    pub fn message(
        &self,
        peer: &PeerId,
        id: &MessageId,
    ) -> Result<Option<(Vec<u8>, MessageRecord)>, StoreError> {
        let Some(key) = self.tree(TreeId::MessageIndex).get(index_key(peer, id))? else {
            return Ok(None);
        };
        Ok(self
            .get_record(TreeId::Messages, &key, "message")?
            .map(|m| (key, m)))
    }

    /// The messages (of `only`, or of every contact) whose text holds every word of
    /// `query`, in any case: newest first, at most `limit`. Each contact's messages are
    /// read in turn, opened one by one.
    pub fn search(
        &self,
        query: &str,
        only: Option<&PeerId>,
        limit: usize,
    ) -> Result<Vec<(PeerId, MessageRecord)>, StoreError> {
        let words: Vec<String> = query.split_whitespace().map(str::to_lowercase).collect();
        let mut found: Vec<(PeerId, MessageRecord)> = Vec::new();
        if words.is_empty() || limit == 0 {
            return Ok(found);
        }
        // Newest first, at most `limit`; trimmed as it goes, so memory stays bounded
        // however many match.
        let trim = |found: &mut Vec<(PeerId, MessageRecord)>| {
            found.sort_by_key(|(_, m)| std::cmp::Reverse(m.sent_at_ms));
            found.truncate(limit);
        };
        for contact in self.contacts()?.iter() {
            if only.is_some_and(|p| *p != contact.peer) {
                continue;
            }
            self.for_each_message(&contact.peer, |m| {
                if m.deleted {
                    return;
                }
                let text = m.text.to_lowercase();
                if words.iter().all(|w| text.contains(w.as_str())) {
                    found.push((contact.peer, m));
                    if found.len() >= 2 * limit + 64 {
                        trim(&mut found);
                    }
                }
            })?;
        }
        trim(&mut found);
        Ok(found)
    }

    /// Messages of `peer` on disk, expired or not.
    #[cfg(test)]
    pub(crate) fn stored_message_count(&self, peer: &PeerId) -> usize {
        self.tree(TreeId::Messages)
            .scan_prefix(peer.to_bytes())
            .count()
    }

    /// Deletes the messages of `peer` whose timer ran out by `now`: how many, and when
    /// the next one of theirs is due (0: none). Their hash-chain links stay (they hold
    /// no text).
    pub fn delete_expired(&self, peer: &PeerId, now: u64) -> Result<(usize, u64), StoreError> {
        let mut w = WriteSet::default();
        let mut next = 0u64;
        let mut gone = 0;
        let mut freed = 0u64;
        for item in self.tree(TreeId::Messages).scan_prefix(peer.to_bytes()) {
            let (key, value) = item?;
            let record: MessageRecord = decode(&value, "message")?;
            if record.expired(now) {
                w.remove(TreeId::Messages, key);
                w.remove(TreeId::MessageIndex, index_key(peer, &MessageId(record.id)));
                gone += 1;
                if record.direction == super::Direction::In {
                    freed += record.text.len() as u64 + super::RECORD_CHARGE;
                } else {
                    // Not delivered yet: it still goes, sealed as it is, but the copy
                    // of its text kept to seal it again goes now, with the message.
                    for key in self.outbox_keys_of_message(peer, &MessageId(record.id)) {
                        if let Some(mut entry) = self.outbox_entry(key)?
                            && !entry.content.is_empty()
                        {
                            entry.content.clear();
                            Self::write_outbox(&mut w, key, &entry);
                        }
                    }
                }
            } else if record.timer_secs != 0 && (next == 0 || record.expires_at() < next) {
                next = record.expires_at();
            }
        }
        let mut conv = self.conversation(peer)?;
        conv.next_expiry_ms = next;
        // What went no longer counts against what one contact may make us keep.
        conv.received_bytes = conv.received_bytes.saturating_sub(freed);
        Self::write_conversation(&mut w, peer, &conv);
        self.apply(w)?;
        Ok((gone, next))
    }

    /// Writes a new message and its index entry (in a WriteSet).
    pub fn write_message(w: &mut WriteSet, peer: &PeerId, key: Vec<u8>, message: &MessageRecord) {
        w.put(
            TreeId::MessageIndex,
            index_key(peer, &MessageId(message.id)),
            key.clone(),
        );
        w.put_record(TreeId::Messages, key, message);
    }

    // --- receipts due ---

    /// Notes that message `id` of `peer` is to be confirmed (in a WriteSet).
    pub fn write_receipt_due(w: &mut WriteSet, peer: &PeerId, id: &MessageId) {
        w.put(TreeId::ReceiptsDue, index_key(peer, id), Vec::new());
    }

    /// Clears the note of [`LocalStore::write_receipt_due`] (in a WriteSet).
    pub fn clear_receipt_due(w: &mut WriteSet, peer: &PeerId, id: &MessageId) {
        w.remove(TreeId::ReceiptsDue, index_key(peer, id));
    }

    /// Messages to confirm, by contact.
    pub fn receipts_due(&self) -> Result<Vec<(PeerId, Vec<MessageId>)>, StoreError> {
        let mut out: Vec<(PeerId, Vec<MessageId>)> = Vec::new();
        for item in self.tree(TreeId::ReceiptsDue).iter() {
            let (k, _) = item?;
            let split = k
                .len()
                .checked_sub(16)
                .ok_or(StoreError::Corrupt("receipt due"))?;
            let peer =
                PeerId::from_bytes(&k[..split]).map_err(|_| StoreError::Corrupt("receipt due"))?;
            let id = MessageId(k[split..].try_into().expect("16 bytes"));
            match out.last_mut() {
                Some((p, ids)) if *p == peer => ids.push(id),
                _ => out.push((peer, vec![id])),
            }
        }
        Ok(out)
    }

    // --- hash chains ---

    /// The record of `peer` held at sequence number `seq`, if any.
    pub fn chain_link(
        &self,
        peer: &PeerId,
        device: &Option<[u8; 32]>,
        seq: u64,
    ) -> Result<Option<ChainLink>, StoreError> {
        self.get_record(TreeId::Chain, &chain_key(peer, device, seq), "chain link")
    }

    /// Records the record of `device` of `peer` (their card's: `None`) at `seq` (in a
    /// WriteSet).
    pub fn write_chain_link(
        w: &mut WriteSet,
        peer: &PeerId,
        device: &Option<[u8; 32]>,
        seq: u64,
        link: &ChainLink,
    ) {
        w.put_record(TreeId::Chain, chain_key(peer, device, seq), link);
    }

    /// What `peer`'s device `key` (not their card's) numbered so far.
    pub fn device_numbers(
        &self,
        peer: &PeerId,
        key: &[u8; 32],
    ) -> Result<DeviceNumbers, StoreError> {
        Ok(self
            .get_record(
                TreeId::Conversations,
                &device_session_key(peer, key),
                "device numbers",
            )?
            .unwrap_or_default())
    }

    /// Forgets what `peer`'s device `key` numbered (in a WriteSet): it was taken out.
    pub fn forget_device_numbers(w: &mut WriteSet, peer: &PeerId, key: &[u8; 32]) {
        w.remove(TreeId::Conversations, device_session_key(peer, key));
    }

    /// Writes what `peer`'s device `key` numbered (in a WriteSet).
    pub fn write_device_numbers(
        w: &mut WriteSet,
        peer: &PeerId,
        key: &[u8; 32],
        numbers: &DeviceNumbers,
    ) {
        w.put_record(
            TreeId::Conversations,
            device_session_key(peer, key),
            numbers,
        );
    }

    /// Everything kept about `peer` goes (in a WriteSet): contact, session,
    /// conversation, messages, chain and outbox entries; their device set stays (a key
    /// their account took out stays out). Returns how many messages.
    pub fn forget_contact(&self, w: &mut WriteSet, peer: &PeerId) -> Result<usize, StoreError> {
        let prefix = peer.to_bytes();
        w.remove(TreeId::Contacts, prefix.clone());
        self.forget_sessions(w, peer)?;
        Self::forget_devices_sent(w, peer);
        let mut messages = 0;
        for tree in [
            TreeId::Messages,
            TreeId::MessageIndex,
            TreeId::Chain,
            TreeId::Conversations,
        ] {
            for item in self.tree(tree).scan_prefix(&prefix) {
                let (k, _) = item?;
                w.remove(tree, k.to_vec());
                messages += usize::from(tree == TreeId::Messages);
            }
        }
        self.forget_outbox(w, peer)?;
        Ok(messages)
    }

    /// Drops every outbox entry for `peer` (in a WriteSet).
    pub fn forget_outbox(&self, w: &mut WriteSet, peer: &PeerId) -> Result<(), StoreError> {
        let contact = peer.to_bytes();
        for (key, entry) in self.outbox()? {
            if entry.contact == contact {
                w.remove(TreeId::Outbox, key.to_be_bytes().to_vec());
            }
        }
        Ok(())
    }
}

fn device_session_key(peer: &PeerId, key: &[u8; 32]) -> Vec<u8> {
    let mut k = peer.to_bytes();
    k.extend_from_slice(key);
    k
}

fn chain_key(peer: &PeerId, device: &Option<[u8; 32]>, seq: u64) -> Vec<u8> {
    let mut k = peer.to_bytes();
    if let Some(device) = device {
        k.extend_from_slice(device);
    }
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn index_key(peer: &PeerId, id: &MessageId) -> Vec<u8> {
    let mut k = peer.to_bytes();
    k.extend_from_slice(&id.0);
    k
}

fn contact_from(key: &[u8], value: &[u8]) -> Result<Contact, StoreError> {
    let record: ContactRecord = decode(value, "contact")?;
    let peer = PeerId::from_bytes(key).map_err(|_| StoreError::Corrupt("contact key"))?;
    let card = Card::decode(&record.card).map_err(|_| StoreError::Corrupt("contact card"))?;
    Ok(Contact {
        peer,
        name: record.name,
        card,
        through_group: record.through_group,
    })
}
