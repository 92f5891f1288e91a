//! The records a backup holds, read from and written into the store (the stream's
//! format and its encryption are in [`crate::backup`]).
//!
//! A backup holds who we are (identity, profile), our relays, contacts, conversations,
//! messages with their index, the hash chains of what contacts sent, blocked senders
//! and the envelope ids already handled. It holds no session: a restored home starts
//! new ones, so no session counter is ever used twice, and a contact who sees the new
//! session seals again what we had not confirmed. Nor the outbox (sealed on those
//! sessions), held requests or receipts due.

use super::{IDENTITY_KEY, LocalStore, PROFILE_KEY, Profile, StoreError, TreeId, WriteSet, decode};

/// Trees a backup copies whole.
const WHOLE: [TreeId; 8] = [
    TreeId::Relays,
    TreeId::Contacts,
    TreeId::Conversations,
    TreeId::Messages,
    TreeId::MessageIndex,
    TreeId::Chain,
    TreeId::Blocked,
    TreeId::Seen,
];

/// The longest key and value a restore takes.
pub const MAX_BACKUP_KEY: usize = 1024;
/// See [`MAX_BACKUP_KEY`].
pub const MAX_BACKUP_VALUE: usize = 1 << 20;

/// The last backup made of this home: when (Unix ms), and to which recovery key (age
/// recipient).
const BACKUP_RECIPIENT_KEY: &[u8] = b"backup-recipient";
const BACKUP_LAST_KEY: &[u8] = b"backup-last";

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
    /// Calls `f` with every record a backup holds: identity and profile first.
    pub fn backup_records(
        &self,
        mut f: impl FnMut(TreeId, &[u8], &[u8]) -> std::io::Result<()>,
    ) -> Result<(), StoreError> {
        let io = |e: std::io::Error| StoreError::Db(format!("cannot write the backup: {e}"));
        for key in [IDENTITY_KEY, PROFILE_KEY] {
            let value = self
                .tree(TreeId::Meta)
                .get(key)?
                .ok_or(StoreError::Corrupt("identity"))?;
            f(TreeId::Meta, key, &value).map_err(io)?;
        }
        for tree in WHOLE {
            for item in self.tree(tree).iter() {
                let (k, v) = item?;
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
                profile.card_version += 1;
                w.put_record(tree, key, &profile);
                continue;
            }
            if tree == TreeId::Meta && key != IDENTITY_KEY {
                continue;
            }
            w.put(tree, key, value);
        }
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
