//! The records a backup holds, read from and written into the store (the stream's
//! format and its encryption are in [`crate::backup`]).
//!
//! A backup holds who we are (identity, profile), our relays, contacts, conversations,
//! messages with their index, the hash chains of what contacts sent, blocked senders
//! and the envelope ids already handled. It holds no session: a restored home starts
//! new ones, so no session counter is ever used twice, and a contact who sees the new
//! session seals again what we had not confirmed. Nor the outbox (sealed on those
//! sessions), held requests or receipts due.

use kkachi_protocol::content::{Body, Content};
use kkachi_protocol::{MessageId, PeerId};

use super::devices::DEVICES_KEY;
use super::{
    Direction, IDENTITY_KEY, LocalStore, MessageRecord, MessageState, PROFILE_KEY, Profile,
    StoreError, TreeId, WriteSet, decode,
};

/// Trees a backup copies whole.
const WHOLE: [TreeId; 12] = [
    TreeId::Relays,
    TreeId::Contacts,
    TreeId::Conversations,
    TreeId::Messages,
    TreeId::MessageIndex,
    TreeId::Chain,
    TreeId::Blocked,
    TreeId::Seen,
    TreeId::Groups,
    TreeId::GroupMessages,
    TreeId::GroupIndex,
    TreeId::Devices,
];

/// The longest key and value a restore takes.
pub const MAX_BACKUP_KEY: usize = 1024;
/// See [`MAX_BACKUP_KEY`].
pub const MAX_BACKUP_VALUE: usize = 1 << 20;

/// The last backup made of this home: when (Unix ms), and to which recovery key (age
/// recipient).
const BACKUP_RECIPIENT_KEY: &[u8] = b"backup-recipient";
const BACKUP_LAST_KEY: &[u8] = b"backup-last";
/// Our messages a restore found unconfirmed, to seal again on new sessions (a list of
/// contact peer id and message key).
const RESEND_KEY: &[u8] = b"resend";

/// How far a restore moves the card version on: past any version the lost device may
/// have sent after the backup (each change of relays or renewal adds one), so contacts
/// take the restored card as the newest.
pub const RESTORE_CARD_STEP: u64 = 1024;

/// What [`LocalStore::repair_after_restore`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repaired {
    /// Our messages not confirmed as delivered, to seal again at the next start.
    pub resend: usize,
}

/// A record as a backup carries it.
pub type BackupRecord = (TreeId, Vec<u8>, Vec<u8>);

impl TreeId {
    /// The tree of this number, among those a backup carries.
    pub fn from_backup(n: u8) -> Option<Self> {
        std::iter::once(TreeId::Meta)
            .chain(WHOLE)
            .find(|t| *t as u8 == n)
    }
}

impl LocalStore {
    /// Calls `f` with every record a backup holds: identity and profile first. Writes
    /// wait meanwhile, so the records are one consistent state.
    pub fn backup_records(
        &self,
        mut f: impl FnMut(TreeId, &[u8], &[u8]) -> std::io::Result<()>,
    ) -> Result<(), StoreError> {
        let _turn = self.writer.turn.lock();
        let io = |e: std::io::Error| StoreError::Db(format!("cannot write the backup: {e}"));
        for key in [IDENTITY_KEY, PROFILE_KEY] {
            let value = self
                .tree(TreeId::Meta)
                .get(key)?
                .ok_or(StoreError::Corrupt("identity"))?;
            f(TreeId::Meta, key, &value).map_err(io)?;
        }
        // Our device set, once the engine made it: the devices contacts seal to, and
        // the removals they keep.
        if let Some(value) = self.tree(TreeId::Meta).get(DEVICES_KEY)? {
            f(TreeId::Meta, DEVICES_KEY, &value).map_err(io)?;
        }
        for tree in WHOLE {
            for item in self.tree(tree).iter() {
                let (k, v) = item?;
                // A message with a timer is meant to go: a backup, which outlives it,
                // does not keep it.
                if tree == TreeId::Messages
                    && decode::<MessageRecord>(&v, "message")?.timer_secs != 0
                {
                    continue;
                }
                if tree == TreeId::Devices && Self::is_sent_marker(&k) {
                    continue;
                }
                f(tree, &k, &v).map_err(io)?;
            }
        }
        Ok(())
    }

    /// Writes records read from a backup (in a set, all or nothing). The first set a
    /// restore writes holds the identity and profile.
    pub fn restore_records(&self, records: Vec<BackupRecord>) -> Result<(), StoreError> {
        let mut w = WriteSet::default();
        for (tree, key, value) in records {
            if tree == TreeId::Meta && key == PROFILE_KEY {
                // A new card version: at its next start the engine sends it to every
                // contact, on new sessions, so they seal again what we have not confirmed.
                let mut profile: Profile = decode(&value, "profile")?;
                profile.card_version += RESTORE_CARD_STEP;
                w.put_record(tree, key, &profile);
                continue;
            }
            if tree == TreeId::Meta && key != IDENTITY_KEY && key != DEVICES_KEY {
                continue;
            }
            w.put(tree, key, value);
        }
        self.apply(w)
    }

    /// Makes a restored store whole, whatever part of the backup arrived: each
    /// contact's message index rebuilt from its messages, its counters past the newest
    /// message (so no local order or sequence number is given twice), and our messages
    /// not confirmed as delivered noted to be sealed again on new sessions.
    pub fn repair_after_restore(&self) -> Result<Repaired, StoreError> {
        let mut resend: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for contact in self.contacts()?.iter() {
            let peer = contact.peer;
            let mut w = WriteSet::default();
            for item in self.tree(TreeId::MessageIndex).scan_prefix(peer.to_bytes()) {
                let (k, _) = item?;
                w.remove(TreeId::MessageIndex, k);
            }
            let mut conv = self.conversation(&peer)?;
            let mut next_local = 0u64;
            let mut newest_out: Option<MessageRecord> = None;
            for item in self.tree(TreeId::Messages).scan_prefix(peer.to_bytes()) {
                let (key, value) = item?;
                let record: MessageRecord = decode(&value, "message")?;
                let local = key
                    .len()
                    .checked_sub(8)
                    .and_then(|n| <[u8; 8]>::try_from(&key[n..]).ok())
                    .map_or(0, u64::from_be_bytes);
                next_local = next_local.max(local + 1);
                let mut index = peer.to_bytes();
                index.extend_from_slice(&record.id);
                w.put(TreeId::MessageIndex, index, key.clone());
                if record.direction == Direction::Out {
                    if matches!(
                        record.state,
                        MessageState::Queued | MessageState::Relayed { .. }
                    ) {
                        resend.push((peer.to_bytes(), key.clone()));
                    }
                    if record.seq > 0 && newest_out.as_ref().is_none_or(|n| record.seq > n.seq) {
                        newest_out = Some(record);
                    }
                }
            }
            conv.next_local = conv.next_local.max(next_local);
            if let Some(newest) = newest_out
                && newest.seq + 1 >= conv.next_seq
            {
                conv.next_seq = newest.seq + 1;
                conv.last_hash = outgoing_content(&newest).hash();
            }
            Self::write_conversation(&mut w, &peer, &conv);
            self.apply(w)?;
        }
        let mut w = WriteSet::default();
        w.put_record(TreeId::Meta, RESEND_KEY, &resend);
        self.apply(w)?;
        Ok(Repaired {
            resend: resend.len(),
        })
    }

    /// Our messages a restore found unconfirmed: (contact, message key, record).
    pub fn pending_resends(&self) -> Result<Vec<(PeerId, Vec<u8>, MessageRecord)>, StoreError> {
        let Some(list) =
            self.get_record::<Vec<(Vec<u8>, Vec<u8>)>>(TreeId::Meta, RESEND_KEY, "resend list")?
        else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (peer, key) in list {
            let (Ok(peer), Some(record)) = (
                PeerId::from_bytes(&peer),
                self.get_record::<MessageRecord>(TreeId::Messages, &key, "message")?,
            ) else {
                continue;
            };
            out.push((peer, key, record));
        }
        Ok(out)
    }

    /// Clears the list of [`LocalStore::pending_resends`] (in a WriteSet).
    pub fn clear_resends(w: &mut WriteSet) {
        w.remove(TreeId::Meta, RESEND_KEY);
    }

    /// Our messages a restore found unconfirmed are another device's to deliver (this
    /// home joined beside it): shown as sent from there, and not sealed again here.
    pub fn forget_resends(&self) -> Result<(), StoreError> {
        let mut w = WriteSet::default();
        for (_, key, mut record) in self.pending_resends()? {
            record.state = MessageState::SentElsewhere;
            w.put_record(TreeId::Messages, key, &record);
        }
        Self::clear_resends(&mut w);
        self.apply(w)
    }

    /// Notes a backup made now to `recipient` (an age recipient).
    pub fn note_backup(&self, recipient: &str, at_ms: u64) -> Result<(), StoreError> {
        let mut w = WriteSet::default();
        w.put(
            TreeId::Meta,
            BACKUP_RECIPIENT_KEY,
            recipient.as_bytes().to_vec(),
        );
        w.put(TreeId::Meta, BACKUP_LAST_KEY, at_ms.to_be_bytes().to_vec());
        self.apply(w)
    }

    /// The recovery key's public half backups go to, once one was made.
    pub fn backup_recipient(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .tree(TreeId::Meta)
            .get(BACKUP_RECIPIENT_KEY)?
            .and_then(|v| String::from_utf8(v).ok()))
    }

    /// When the last backup was made (Unix ms).
    pub fn last_backup_ms(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .tree(TreeId::Meta)
            .get(BACKUP_LAST_KEY)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes))
    }
}

/// The content an outgoing message was sent as: the same id, number, chain and text, so
/// a contact who has it already recognises it.
pub fn outgoing_content(record: &MessageRecord) -> Content {
    let text = record.text.clone();
    Content {
        id: MessageId(record.id),
        seq: record.seq,
        prev: record.prev,
        sent_at_ms: record.sent_at_ms,
        body: match (&record.file, record.reply_to, record.timer_secs) {
            (Some(note), _, secs) if let Some(file) = note.file() => Body::File {
                secs,
                file: Box::new(file),
            },
            (_, reply_to, secs) => text_body(reply_to, secs, text),
        },
    }
}

/// A text's body: a reply, a timed text or a plain one.
pub fn text_body(reply_to: Option<crate::store::Quote>, secs: u32, text: String) -> Body {
    match (reply_to, secs) {
        (Some(quote), secs) => Body::Reply {
            target: MessageId(quote.id),
            own: quote.ours,
            secs,
            text,
        },
        (None, 0) => Body::Text(text),
        (None, secs) => Body::TimedText { secs, text },
    }
}
