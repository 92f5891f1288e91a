//! The local database (sled 0.34) in the user's home directory.
//!
//! Everything the client knows lives here: identity, profile, own relays, contacts and
//! their cards, end-to-end session states, conversations, messages with their states,
//! the outbox, per-relay cursors and seen envelope ids. Related changes are collected
//! in a [`WriteSet`] and applied all or nothing, then flushed: a message is in the
//! outbox, with the session state that sealed it, before anyone is told it was sent.
//!
//! All or nothing without sled's batches or transactions. In sled 0.34 each of those
//! seals the log buffer twice and hands both to sled's I/O pool, which wakes every idle
//! thread of the pool: about 0.45 ms of a message's way to the screen on two cores.
//! Writes are taken in turn instead; a set of several is first stored whole under one
//! journal key, then written key by key, then the journal key is removed. sled
//! recovers its log up to the first tear, so after a crash the disk holds a prefix of
//! these writes: if it holds any of a set's keys it holds the journal entry too, and
//! opening the store applies that entry again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kkachi_protocol::{Card, Identity, Multiaddr};
use serde::de::DeserializeOwned;
use thiserror::Error;

mod backup;
mod conversations;
mod devices;
mod groups;
mod keyfile;
mod outbox;
mod records;
mod requests;
mod rotation;
mod transfers;
mod vault;
mod writes;

pub use backup::{
    BackupRecord, MAX_BACKUP_KEY, MAX_BACKUP_VALUE, RESTORE_CARD_STEP, Repaired, outgoing_content,
    text_body,
};
use conversations::ContactCache;
pub use devices::{DEFAULT_DEVICE_NAME, HandedOver, devices_digest};
pub use groups::{
    Chain, GroupMessage, GroupRecord, HeldEpoch, LargeState, MAX_EPOCHS_KEPT, MAX_EPOCHS_PER_MAKER,
    MAX_HELD_POSTS, MAX_INTRODUCTIONS, MAX_WAITING_GROUPS, MAX_WAITING_PER_GROUP, Waiting,
    group_key, group_member_key, group_of, member_of,
};
pub use keyfile::{
    KEY_FILE, PASSPHRASE_ENV, PassphrasePrompt, Protection, has_passphrase, key_path,
    set_passphrase_prompt,
};
pub use records::*;
pub use requests::{Blocked, HeldMessage, MAX_HELD_PER_SENDER, MAX_HELD_TOTAL, Request};
pub use rotation::{PreviousKey, Rotated, SEALED_UNDER_AN_OLD_KEY};
pub use transfers::{
    GroupSource, Incoming, IncomingState, MAX_FILE_OFFERS, Offer, Outgoing, TransferId,
};
use vault::{Tree, Vault};
use writes::{Durability, JOURNAL_TREE, TREES, Writer, complete_journaled};
pub use writes::{TreeId, WriteSet};

/// Local store failures.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Another kkachi process has the database open.
    #[error(
        "another kkachi process (daemon or tui) is using {0}; stop it, or run this command while it runs \
         (commands are forwarded to it)"
    )]
    Locked(PathBuf),
    /// sled failed.
    #[error("local database error: {0}")]
    Db(String),
    /// A record does not decode (a newer version wrote it, or corruption).
    #[error("local database record {0} is unreadable")]
    Corrupt(&'static str),
    /// The name or relays do not make a valid card.
    #[error("invalid card: {0}")]
    InvalidCard(String),
    /// The key file is missing, damaged or unreadable.
    #[error("{0}")]
    KeyFile(String),
    /// The key file does not open this database.
    #[error(
        "the key file {0} does not belong to the database beside it: put back the key file that was made with this home"
    )]
    WrongKey(PathBuf),
    /// The passphrase given does not unlock the key.
    #[error("{0}")]
    WrongPassphrase(String),
    /// The key is under a passphrase and none could be asked for.
    #[error("{0}")]
    PassphraseNeeded(String),
    /// A change our device set refuses (SPEC §15).
    #[error("{0}")]
    Devices(String),
    /// This home handed its account to a linked device (SPEC §15.1).
    #[error("{0}")]
    HandedOver(String),
}

fn db(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// The local database.
#[derive(Debug, Clone)]
pub struct LocalStore {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    /// Seals and opens every record (see [`vault`]).
    vault: Arc<Vault>,
    /// The database key and how it is kept, for changing the passphrase.
    key: Arc<parking_lot::Mutex<keyfile::Unlocked>>,
    /// The write set being applied (see [`LocalStore::apply`]).
    journal: sled::Tree,
    writer: Arc<Writer>,
    path: PathBuf,
    contacts: Arc<ContactCache>,
    durability: Arc<Durability>,
    /// Outbox keys written since [`LocalStore::take_outbox_changes`] last took them: how
    /// the engine's scheduler learns of every change to the outbox, whoever made it.
    outbox_changes: Arc<parking_lot::Mutex<Vec<u64>>>,
    /// The outbox's messages by contact and id.
    outbox_index: Arc<parking_lot::Mutex<outbox::OutboxIndex>>,
    /// Held while a relay record is read, changed and written back, so two changes
    /// (the engine's cursor, `relay list`'s names) cannot undo each other.
    relays_turn: Arc<parking_lot::Mutex<()>>,
    /// Held by whoever reads a file's records and writes them back: see
    /// [`LocalStore::files_turn`].
    files_turn: Arc<parking_lot::Mutex<()>>,
}

const IDENTITY_KEY: &[u8] = b"identity";
const PROFILE_KEY: &[u8] = b"profile";
/// A known value sealed under the database key: a key file that opens it belongs to
/// this database.
const VAULT_KEY: &[u8] = b"vault";
const VAULT_CHECK: &[u8] = b"kkachi local store, sealed";

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt(what))
}

impl LocalStore {
    /// Opens (or creates) the database under `home`, unlocking its key (asking for
    /// the passphrase if it has one).
    pub fn open(home: &Path) -> Result<Self, StoreError> {
        Self::open_as(home, false, None)
    }

    /// Opens the database under `home` with this passphrase (for a home that has one).
    pub fn open_with_passphrase(home: &Path, passphrase: &str) -> Result<Self, StoreError> {
        Self::open_as(home, false, Some(passphrase))
    }

    fn open_as(home: &Path, clear: bool, passphrase: Option<&str>) -> Result<Self, StoreError> {
        let path = home.join("db");
        private_dir(home, path.exists())?;
        private_dir(&path, true)?;
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(64 << 20)
            .flush_every_ms(Some(1000))
            .open()
            .map_err(|e| {
                if e.to_string().contains("could not acquire lock") {
                    StoreError::Locked(home.to_path_buf())
                } else {
                    db(e)
                }
            })?;
        private_files(&path)?;
        let trees: Vec<sled::Tree> = TREES
            .iter()
            .map(|name| db.open_tree(name).map_err(self::db))
            .collect::<Result<_, _>>()?;
        let journal = db.open_tree(JOURNAL_TREE).map_err(self::db)?;
        let empty = journal.is_empty() && trees.iter().all(sled::Tree::is_empty);
        let unlocked = match keyfile::unlock(home, passphrase)? {
            Some(u) => u,
            None if !empty
                && !trees[TreeId::Meta as usize]
                    .contains_key(VAULT_KEY)
                    .map_err(self::db)? =>
            {
                return Err(StoreError::KeyFile(format!(
                    "{} was made by an earlier development version of kkachi, which did not seal its database; this version cannot open it: move it aside and run `kkachi init` again",
                    home.display()
                )));
            }
            None if !empty => {
                return Err(StoreError::KeyFile(format!(
                    "the database in {} is sealed and its key file {} is missing: put the key file back, or restore from a backup",
                    path.display(),
                    key_path(home).display()
                )));
            }
            None if clear => {
                keyfile::create_clear(home)?;
                keyfile::Unlocked {
                    key: None,
                    protection: Protection::Clear,
                }
            }
            None => keyfile::create(home)?,
        };
        let vault = match &unlocked.key {
            Some(key) => Vault::sealed(key),
            None => Vault::clear(),
        };
        let store = Self {
            db,
            trees,
            vault: Arc::new(vault),
            key: Arc::new(parking_lot::Mutex::new(unlocked)),
            journal,
            writer: Arc::default(),
            path: home.to_path_buf(),
            contacts: Arc::default(),
            durability: Arc::default(),
            outbox_changes: Arc::default(),
            outbox_index: Arc::default(),
            relays_turn: Arc::default(),
            files_turn: Arc::default(),
        };
        store.check_key(empty)?;
        complete_journaled(&store.db, &store.trees, &store.journal)?;
        store.load_outbox_index()?;
        Ok(store)
    }

    /// A new home kept in the clear, not sealed: only to measure what sealing costs.
    #[doc(hidden)]
    pub fn provision_clear(
        home: &Path,
        name: &str,
        relays: &[Multiaddr],
    ) -> Result<(Self, Identity, Card), StoreError> {
        let store = Self::open_as(home, true, None)?;
        store.provision_with(name, relays)
    }

    /// Checks that the key opens this database (writes the check into a new one:
    /// `empty`, nothing in any tree).
    fn check_key(&self, empty: bool) -> Result<(), StoreError> {
        let meta = self.tree(TreeId::Meta);
        match meta.get(VAULT_KEY) {
            Ok(Some(v)) if v == VAULT_CHECK => Ok(()),
            Ok(None) if empty => {
                // Written around the write sets: it is not one of the store's changes.
                let disk = self.vault.disk_key(TreeId::Meta, VAULT_KEY);
                let sealed = self.vault.seal(TreeId::Meta, VAULT_KEY, &disk, VAULT_CHECK);
                self.trees[TreeId::Meta as usize]
                    .insert(disk, sealed)
                    .map_err(db)?;
                self.db.flush().map_err(db)?;
                Ok(())
            }
            Ok(_) | Err(StoreError::Corrupt(_)) => Err(StoreError::WrongKey(key_path(&self.path))),
            Err(e) => Err(e),
        }
    }

    /// How the database key is kept.
    pub fn protection(&self) -> Protection {
        self.key.lock().protection
    }

    /// Puts the database key under `new`, or (`None`) keeps it in the key file without
    /// one. A key under a passphrase already is changed only with that one (`current`),
    /// whoever asks. Only the key file is rewritten: copies of the key file made before
    /// still open the database.
    pub fn set_passphrase(
        &self,
        current: Option<&str>,
        new: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut unlocked = self.key.lock();
        let Some(key) = &unlocked.key else {
            return Err(StoreError::KeyFile(
                "this home is kept in the clear; it has no key to protect".into(),
            ));
        };
        if unlocked.protection == Protection::Passphrase {
            let Some(current) = current else {
                return Err(StoreError::PassphraseNeeded(
                    "the current passphrase is needed to change or remove it".into(),
                ));
            };
            let opened = keyfile::unlock(&self.path, Some(current))?;
            if opened.as_ref().and_then(|u| u.key.as_ref()).map(|k| **k) != Some(**key) {
                return Err(StoreError::WrongPassphrase(
                    "that is not the current passphrase; nothing was changed".into(),
                ));
            }
        }
        keyfile::rewrap(&self.path, key, new)?;
        unlocked.protection = if new.is_some() {
            Protection::Passphrase
        } else {
            Protection::KeyFile
        };
        Ok(())
    }

    /// The home directory.
    pub fn home(&self) -> &Path {
        &self.path
    }

    fn tree(&self, id: TreeId) -> Tree<'_> {
        Tree {
            raw: &self.trees[id as usize],
            id,
            vault: &self.vault,
        }
    }

    fn get_record<T: DeserializeOwned>(
        &self,
        tree: TreeId,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        match self.tree(tree).get(key)? {
            Some(v) => decode(&v, what).map(Some),
            None => Ok(None),
        }
    }

    fn records<T: DeserializeOwned>(
        &self,
        tree: TreeId,
        what: &'static str,
    ) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        self.tree(tree)
            .iter()
            .map(|item| {
                let (k, v) = item?;
                Ok((k, decode(&v, what)?))
            })
            .collect()
    }

    // --- identity and profile ---

    /// The user's identity, if `init` has run.
    pub fn identity(&self) -> Result<Option<Identity>, StoreError> {
        match self.tree(TreeId::Meta).get(IDENTITY_KEY)? {
            Some(bytes) => Identity::from_secret_bytes(&bytes)
                .map(Some)
                .map_err(|_| StoreError::Corrupt("identity")),
            None => Ok(None),
        }
    }

    /// A new home at `home` with a fresh identity named `name` and these inbox relays
    /// (what `init` and `relay add` do); returns it with the identity and signed card.
    pub fn provision(
        home: &Path,
        name: &str,
        relays: &[Multiaddr],
    ) -> Result<(Self, Identity, Card), StoreError> {
        Self::open(home)?.provision_with(name, relays)
    }

    fn provision_with(
        self,
        name: &str,
        relays: &[Multiaddr],
    ) -> Result<(Self, Identity, Card), StoreError> {
        let me = Identity::generate();
        let profile = Profile::new(name);
        self.init_identity(&me, &profile)?;
        for r in relays {
            self.add_relay(r)?;
        }
        let card = self.own_card(&me)?;
        Ok((self, me, card))
    }

    /// The user's own card as it stands (profile name, relays, card version).
    pub fn own_card(&self, me: &Identity) -> Result<Card, StoreError> {
        let profile = self.profile()?.ok_or(StoreError::Corrupt("profile"))?;
        let relays = self
            .relays()?
            .iter()
            .filter_map(|r| r.addr.parse().ok())
            .collect();
        Card::new_at_epoch(
            me,
            &profile.name,
            relays,
            profile.card_version,
            profile.request_epoch,
            profile.card_expires_at,
        )
        .map_err(|e| StoreError::InvalidCard(e.to_string()))
    }

    /// Adds `card`'s owner as a contact under the card's name.
    pub fn add_card(&self, card: &Card) -> Result<Contact, StoreError> {
        let contact = Contact::new(
            card.identity().peer_id(),
            card.name().to_owned(),
            card.clone(),
        );
        let mut w = WriteSet::default();
        Self::write_contact(&mut w, &contact);
        self.apply(w)?;
        Ok(contact)
    }

    /// Writes the identity and profile (once, at `init`).
    pub fn init_identity(&self, identity: &Identity, profile: &Profile) -> Result<(), StoreError> {
        let mut w = WriteSet::default();
        w.put(
            TreeId::Meta,
            IDENTITY_KEY,
            identity.to_secret_bytes().to_vec(),
        );
        w.put_record(TreeId::Meta, PROFILE_KEY, profile);
        self.apply(w)
    }

    /// The user's profile.
    pub fn profile(&self) -> Result<Option<Profile>, StoreError> {
        self.get_record(TreeId::Meta, PROFILE_KEY, "profile")
    }

    /// Replaces the profile.
    pub fn write_profile(w: &mut WriteSet, profile: &Profile) {
        w.put_record(TreeId::Meta, PROFILE_KEY, profile);
    }

    /// Next outbox order number (read-modify-write inside the caller's WriteSet).
    pub fn next_outbox_seq(&self) -> Result<u64, StoreError> {
        let id = self.db.generate_id().map_err(db)?;
        Ok(id)
    }

    // --- relays ---

    /// Own inbox relays, in the order added.
    pub fn relays(&self) -> Result<Vec<RelayRecord>, StoreError> {
        let mut relays: Vec<(u64, RelayRecord)> = self
            .records::<(u64, RelayRecord)>(TreeId::Relays, "relay")?
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        relays.sort_by_key(|(order, _)| *order);
        Ok(relays.into_iter().map(|(_, r)| r).collect())
    }

    /// The turn to read a file's records (a received file's record and the messages that
    /// offered it, a sent file's record) and write them back: taking in messages (which
    /// adds offers), the sweep (which prunes them, moves a record or removes it), a fetch
    /// or an upload saving its progress and cancelling one all hold it from their first
    /// read to their write, so none writes over what another wrote in between (an offer
    /// taken in while the sweep ran, a transfer cancelled while it saved). Not
    /// reentrant: whoever holds it calls none of the others.
    pub fn files_turn(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.files_turn.lock()
    }

    /// Adds a relay; false if it was already there.
    pub fn add_relay(&self, addr: &Multiaddr) -> Result<bool, StoreError> {
        let _turn = self.relays_turn.lock();
        let key = addr.to_string();
        if self.tree(TreeId::Relays).contains_key(&key)? {
            return Ok(false);
        }
        let order = self.db.generate_id().map_err(db)?;
        let record = RelayRecord {
            addr: key.clone(),
            name: String::new(),
            failure_domain: String::new(),
            last_ok_ms: None,
            last_error: None,
            token: None,
        };
        let mut w = WriteSet::default();
        w.put_record(TreeId::Relays, key, &(order, record));
        self.apply(w)?;
        Ok(true)
    }

    /// Removes a relay; false if it was not there.
    pub fn remove_relay(&self, addr: &str) -> Result<bool, StoreError> {
        let _turn = self.relays_turn.lock();
        if self.tree(TreeId::Relays).get(addr)?.is_none() {
            return Ok(false);
        }
        let mut w = WriteSet::default();
        w.remove(TreeId::Relays, addr.as_bytes().to_vec());
        self.apply(w)?;
        Ok(true)
    }

    /// Updates a relay's record in place (no-op if it was removed meanwhile).
    pub fn update_relay(
        &self,
        addr: &str,
        f: impl FnOnce(&mut RelayRecord),
    ) -> Result<(), StoreError> {
        let _turn = self.relays_turn.lock();
        let Some((order, mut record)) =
            self.get_record::<(u64, RelayRecord)>(TreeId::Relays, addr.as_bytes(), "relay")?
        else {
            return Ok(());
        };
        let before = record.clone();
        f(&mut record);
        if record == before {
            return Ok(());
        }
        let mut w = WriteSet::default();
        w.put_record(TreeId::Relays, addr, &(order, record));
        self.apply(w)
    }
}

/// Creates `dir` owner-only if it does not exist; with `always`, makes an existing one
/// owner-only too (one kkachi made: a home passed with `--home` that holds something
/// else is left as its owner set it).
fn private_dir(dir: &Path, always: bool) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let exists = dir.exists();
    if !exists {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| StoreError::Db(format!("cannot create {}: {e}", dir.display())))?;
    }
    // A link the person made (a home on another disk) is theirs to set.
    let linked = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
    if (!exists || always) && !linked {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| StoreError::Db(format!("cannot protect {}: {e}", dir.display())))?;
    }
    Ok(())
}

/// Makes the database's files owner-only (sled creates them as the umask says).
fn private_files(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let entries = std::fs::read_dir(dir)
        .map_err(|e| StoreError::Db(format!("cannot read {}: {e}", dir.display())))?;
    for entry in entries.flatten() {
        let path = entry.path();
        // What sled made: files and its blobs directory. A link is not followed.
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let mode = if kind.is_dir() {
            private_files(&path)?;
            0o700
        } else if kind.is_file() {
            0o600
        } else {
            continue;
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| StoreError::Db(format!("cannot protect {}: {e}", path.display())))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) fn reopen(home: &Path) -> LocalStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match LocalStore::open(home) {
            Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other.expect("store reopens"),
        }
    }
}

#[cfg(test)]
mod at_rest_tests;
#[cfg(test)]
mod tests;
