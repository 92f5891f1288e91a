//! File transfers, each way: what is uploaded for a contact and how far, what a contact
//! sent and how far it is fetched. The bytes live beside the database (see
//! [`crate::files`]); these records say what they are.

use kkachi_protocol::PeerId;
use kkachi_protocol::file::{ChunkId, FileRef};
use kkachi_protocol::group::GroupId;
use serde::{Deserialize, Serialize};

use super::{LocalStore, StoreError, TreeId, WriteSet, decode};

/// A transfer's id: its file reference's ([`FileRef::id`]).
pub type TransferId = [u8; 32];

const OUT: u8 = 0;
const IN: u8 = 1;
/// The messages that offered a received file ([`Offer`]s).
const OFFERS: u8 = 2;

fn key(direction: u8, id: &TransferId) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(direction);
    k.extend_from_slice(id);
    k
}

/// A file being sent: sealed into a spool file, its chunks uploaded to the contact's
/// relays, then its message sent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outgoing {
    /// The contact.
    pub contact: Vec<u8>,
    /// The reference the message carries (SPEC §13).
    pub reference: Vec<u8>,
    /// The ids of its chunks, in order, then its manifest's.
    pub chunks: Vec<[u8; 32]>,
    /// The sealed manifest's length (it follows the chunks in the spool file).
    pub manifest_len: u32,
    /// For each relay chunks went to (by address), a bitmap of the chunks it holds
    /// (bit `i` of byte `i / 8`, the manifest last): written as the upload goes, and
    /// checked with the relay again when it goes on after a stop.
    pub relays: Vec<(String, Vec<u8>)>,
    /// The message was queued (in the same write as this).
    pub message_sent: bool,
    /// The message's id, once known.
    pub message: Option<[u8; 16]>,
    /// Every chunk is on as many relays as it goes to: the spool file is gone.
    pub finished: bool,
    /// Our clock when it was sealed, Unix ms.
    pub created_ms: u64,
    /// Why the last attempt stopped short, if it did.
    pub last_error: Option<String>,
    /// Attempts that stopped short in a row.
    pub attempts: u32,
    /// Not tried again on its own before this (Unix ms).
    pub retry_at_ms: u64,
    /// For a group's file, the members (peer ids) its message went to, written with
    /// the message: only their copies are topped up later.
    pub members: Vec<Vec<u8>>,
    /// For a file to a group with group relays, the epoch its message went under
    /// (whose group queues hold its chunks), written with the message.
    pub epoch: Option<[u8; 32]>,
}

/// The contact a transfer record's `contact` names: `None` for a group's key (see
/// [`super::group_key`]), which is itself shaped like a peer id.
fn contact_in(key: &[u8]) -> Option<PeerId> {
    super::groups::group_of(key)
        .is_none()
        .then(|| PeerId::from_bytes(key).ok())
        .flatten()
}

/// A transfer record's file reference.
fn reference_in(bytes: &[u8]) -> Result<FileRef, StoreError> {
    FileRef::decode(bytes).map_err(|_| StoreError::Corrupt("file reference"))
}

impl Outgoing {
    /// The contact's id (`None` for a file sent to a group).
    pub fn contact(&self) -> Option<PeerId> {
        contact_in(&self.contact)
    }

    /// The group it goes to, for a file sent to one (its key is in `contact`).
    pub fn group(&self) -> Option<GroupId> {
        super::groups::group_of(&self.contact)
    }

    /// The file reference.
    pub fn file(&self) -> Result<FileRef, StoreError> {
        reference_in(&self.reference)
    }

    /// The chunk ids, the manifest's last.
    pub fn ids(&self) -> Vec<ChunkId> {
        self.chunks.iter().copied().map(ChunkId).collect()
    }
}

/// Where a file a contact sent stands here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum IncomingState {
    /// Not fetched (not asked for, or not yet).
    Offered,
    /// Being fetched, or asked for and stopped part-way (it goes on).
    Fetching,
    /// Every chunk is here, checked, and on disk.
    Done,
    /// It cannot be fetched: the reason.
    Failed(String),
}

/// A file a contact sent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Incoming {
    /// The contact.
    pub contact: Vec<u8>,
    /// The message that carried it.
    pub message: [u8; 16],
    /// The reference it carried.
    pub reference: Vec<u8>,
    /// Where it stands.
    pub state: IncomingState,
    /// Chunks that came from a relay not matching their id (caught, fetched again
    /// elsewhere).
    pub bad_chunks: u64,
    /// Where it was saved (`get`).
    pub saved: Vec<String>,
    /// Our clock when it arrived, Unix ms.
    pub created_ms: u64,
    /// Fetched without being asked (an image, by the auto-fetch rule).
    pub auto: bool,
    /// Attempts that stopped short in a row.
    pub attempts: u32,
    /// Not tried again on its own before this (Unix ms).
    pub retry_at_ms: u64,
}

/// A message that offered a file, and where it said the chunks are: the same file (one
/// id) may come in several messages, since anyone may send on a reference they got.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Offer {
    /// Who sent it, as [`Incoming::contact`] names them.
    pub from: Vec<u8>,
    /// The message.
    pub message: [u8; 16],
    /// The group queues it said hold the chunks (a group with group relays); `None`:
    /// our own queues.
    pub source: Option<GroupSource>,
    /// Our clock when it came, Unix ms.
    pub at_ms: u64,
}

/// Where a file posted to a group with group relays is (SPEC §14.5).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupSource {
    /// The group.
    pub group: [u8; 32],
    /// The epoch its post named, whose group queues hold the chunks.
    pub epoch: [u8; 32],
    /// Each group relay (its address) and the key of the epoch's group queue there,
    /// as the group's relays were when the post came.
    pub queues: Vec<(String, [u8; 32])>,
}

/// Offers kept of one file, one per sender (their newest): the file is fetched from
/// wherever any of them says, and stays while any of them is here. Past this many, the
/// oldest goes.
pub const MAX_FILE_OFFERS: usize = 8;

impl Incoming {
    /// A file offered in message `message` from `from` (a contact's peer id, or a
    /// group's key), not asked for yet.
    pub fn offered(from: Vec<u8>, message: [u8; 16], file: &FileRef, now_ms: u64) -> Self {
        Incoming {
            contact: from,
            message,
            reference: file.encode(),
            state: IncomingState::Offered,
            bad_chunks: 0,
            saved: Vec::new(),
            created_ms: now_ms,
            auto: false,
            attempts: 0,
            retry_at_ms: 0,
        }
    }

    /// The contact's id (`None` for a file a member sent to a group).
    pub fn contact(&self) -> Option<PeerId> {
        contact_in(&self.contact)
    }

    /// The group it came in, for a file a member sent to one (its key and the
    /// member's are in `contact`).
    pub fn group(&self) -> Option<GroupId> {
        super::groups::group_of(&self.contact)
    }

    /// The member who sent it, for a file sent to a group.
    pub fn member(&self) -> Option<PeerId> {
        super::groups::member_of(&self.contact)
    }

    /// The file reference.
    pub fn file(&self) -> Result<FileRef, StoreError> {
        reference_in(&self.reference)
    }
}

impl LocalStore {
    /// The file being sent with manifest `id`.
    pub fn outgoing_file(&self, id: &TransferId) -> Result<Option<Outgoing>, StoreError> {
        self.get_record(TreeId::Transfers, &key(OUT, id), "outgoing file")
    }

    /// The file received with manifest `id`.
    pub fn incoming_file(&self, id: &TransferId) -> Result<Option<Incoming>, StoreError> {
        self.get_record(TreeId::Transfers, &key(IN, id), "incoming file")
    }

    /// Writes an outgoing file's record (in a WriteSet).
    pub fn write_outgoing_file(w: &mut WriteSet, id: &TransferId, record: &Outgoing) {
        w.put_record(TreeId::Transfers, key(OUT, id), record);
    }

    /// Writes an incoming file's record (in a WriteSet).
    pub fn write_incoming_file(w: &mut WriteSet, id: &TransferId, record: &Incoming) {
        w.put_record(TreeId::Transfers, key(IN, id), record);
    }

    /// Offers `file` (from message `message` of `from`, a peer id or a group's key,
    /// its chunks in our queues or in the group queues of `source`) for fetching, in a
    /// WriteSet (read through it: one batch may offer a file twice). The same file
    /// offered again keeps its record, and notes the offer beside it (see
    /// [`MAX_FILE_OFFERS`]): whoever sends a reference first cannot decide alone where
    /// the file is fetched from, nor make it go by deleting their message.
    pub fn offer_incoming_file(
        &self,
        w: &mut WriteSet,
        file: &FileRef,
        from: Vec<u8>,
        message: [u8; 16],
        now_ms: u64,
        source: Option<GroupSource>,
    ) -> Result<(), StoreError> {
        let id = file.id();
        let held: Option<Incoming> = match w.pending(TreeId::Transfers, &key(IN, &id)) {
            Some(Some(bytes)) => Some(decode(bytes, "incoming file")?),
            Some(None) => None,
            None => self.incoming_file(&id)?,
        };
        // The message the record is named by: its offer is never pushed out.
        let named = match &held {
            Some(r) => (r.contact.clone(), r.message),
            None => {
                LocalStore::write_incoming_file(
                    w,
                    &id,
                    &Incoming::offered(from.clone(), message, file, now_ms),
                );
                (from.clone(), message)
            }
        };
        let is_named = |o: &Offer| o.from == named.0 && o.message == named.1;
        let mut offers = match w.pending(TreeId::Transfers, &key(OFFERS, &id)) {
            Some(Some(bytes)) => decode(bytes, "file offers")?,
            Some(None) => Vec::new(),
            None => self.file_offers(&id)?,
        };
        let offer = Offer {
            from,
            message,
            source,
            at_ms: now_ms,
        };
        // One per sender, their newest (and the one the record is named by); the oldest
        // goes past the bound.
        if offers
            .iter()
            .any(|o| o.from == offer.from && o.message == offer.message)
        {
            return Ok(());
        }
        offers.retain(|o: &Offer| o.from != offer.from || is_named(o));
        offers.push(offer);
        if offers.len() > MAX_FILE_OFFERS
            && let Some(oldest) = offers.iter().position(|o| !is_named(o))
        {
            offers.remove(oldest);
        }
        LocalStore::write_file_offers(w, &id, &offers);
        Ok(())
    }

    /// The messages that offered file `id` (oldest first).
    pub fn file_offers(&self, id: &TransferId) -> Result<Vec<Offer>, StoreError> {
        Ok(self
            .get_record(TreeId::Transfers, &key(OFFERS, id), "file offers")?
            .unwrap_or_default())
    }

    /// Files whose offers are kept with no record of the file (it was swept while a
    /// message offering it was taken in).
    pub fn orphan_file_offers(&self) -> Result<Vec<TransferId>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree(TreeId::Transfers).scan_prefix([OFFERS]) {
            let (k, _) = item?;
            if let Some(id) = k.get(1..).and_then(|id| TransferId::try_from(id).ok())
                && self.incoming_file(&id)?.is_none()
            {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Writes the offers of file `id` (in a WriteSet).
    pub fn write_file_offers(w: &mut WriteSet, id: &TransferId, offers: &Vec<Offer>) {
        w.put_record(TreeId::Transfers, key(OFFERS, id), offers);
    }

    /// Removes a transfer's record (in a WriteSet), and a received file's offers.
    pub fn remove_file_record(w: &mut WriteSet, id: &TransferId, incoming: bool) {
        w.remove(TreeId::Transfers, key(if incoming { IN } else { OUT }, id));
        if incoming {
            w.remove(TreeId::Transfers, key(OFFERS, id));
        }
    }

    /// Every transfer: files being sent, then files received, each by id.
    #[allow(clippy::type_complexity)]
    pub fn file_transfers(
        &self,
    ) -> Result<(Vec<(TransferId, Outgoing)>, Vec<(TransferId, Incoming)>), StoreError> {
        let (mut out, mut inc) = (Vec::new(), Vec::new());
        for item in self.tree(TreeId::Transfers).iter() {
            let (k, v) = item?;
            let Some((&dir, id)) = k.split_first() else {
                continue;
            };
            let Ok(id) = TransferId::try_from(id) else {
                continue;
            };
            match dir {
                OUT => out.push((id, decode(&v, "outgoing file")?)),
                IN => inc.push((id, decode(&v, "incoming file")?)),
                _ => {}
            }
        }
        Ok((out, inc))
    }
}
