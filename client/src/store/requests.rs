//! Message requests and blocked senders.
//!
//! A first message from someone who is not a contact is not thrown away: it is held,
//! sealed as it arrived, under its sender and message id, until the user accepts the
//! sender (it then goes through the receive path like any other), rejects or blocks
//! them, or it expires. Held messages are bounded per sender and in total, so strangers
//! cannot fill the disk. Blocked senders are remembered by identity; what they send is
//! dropped unread.

use kkachi_protocol::{Card, PeerId};
use serde::{Deserialize, Serialize};

use super::{LocalStore, StoreError, TreeId, WriteSet, decode};

/// Most messages held from one sender who is not a contact.
pub const MAX_HELD_PER_SENDER: usize = 20;
/// Most messages held from all such senders together. When full, the sender holding
/// the most gives up one to a sender holding fewer; see [`LocalStore::largest_request`].
pub const MAX_HELD_TOTAL: usize = 2000;

/// Where the count of requests dropped because they were full is kept.
const DROPPED_KEY: &[u8] = b"requests_dropped";

/// One message held from someone who is not a contact yet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeldMessage {
    /// The envelope as it arrived (still sealed: accepting opens it again); empty when
    /// `opened` holds the message instead.
    pub envelope: Vec<u8>,
    /// The content, when it was opened on a session already (from a member met in a
    /// group); empty otherwise.
    pub opened: Vec<u8>,
    /// A record of a group we are in, from someone not (yet) known as its member (the
    /// operations adding them may still be on their way): taken in once they are met,
    /// never shown as a message request.
    pub group: bool,
    /// The card it carried: who the sender says they are.
    pub card: Vec<u8>,
    /// The sender's id for the message.
    pub message_id: [u8; 16],
    /// The sender's sequence number for it, to accept messages in order.
    pub seq: u64,
    /// The sender's clock, Unix ms.
    pub sent_at_ms: u64,
    /// Its text, to show before accepting (None for kinds that have none).
    pub text: Option<String>,
    /// When it arrived, Unix ms.
    pub received_ms: u64,
    /// When the envelope expires, Unix seconds: then it is forgotten.
    pub expires_at: u64,
}

/// Everything held from one sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The sender.
    pub peer: PeerId,
    /// Their newest card among the messages.
    pub card: Card,
    /// The messages, in the sender's order.
    pub messages: Vec<HeldMessage>,
}

/// A blocked sender.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Blocked {
    /// The name they had when blocked.
    pub name: String,
    /// When, Unix ms.
    pub at_ms: u64,
}

fn held_key(peer: &PeerId, message_id: &[u8; 16]) -> Vec<u8> {
    let mut k = peer.to_bytes();
    k.extend_from_slice(message_id);
    k
}

impl LocalStore {
    /// Every sender with messages to show held, oldest request first (not the group
    /// records held from people not yet known as members: [`HeldMessage::group`]).
    pub fn requests(&self) -> Result<Vec<Request>, StoreError> {
        let mut out = self.all_requests()?;
        for r in &mut out {
            r.messages.retain(|m| !m.group);
        }
        out.retain(|r| !r.messages.is_empty());
        Ok(out)
    }

    /// Every sender with anything held, oldest first.
    pub fn all_requests(&self) -> Result<Vec<Request>, StoreError> {
        let mut out: Vec<Request> = Vec::new();
        for item in self.tree(TreeId::Requests).iter() {
            let (k, v) = item?;
            let held: HeldMessage = decode(&v, "held message")?;
            let peer = k
                .len()
                .checked_sub(16)
                .and_then(|n| PeerId::from_bytes(&k[..n]).ok())
                .ok_or(StoreError::Corrupt("held message key"))?;
            let card = Card::decode(&held.card).map_err(|_| StoreError::Corrupt("held card"))?;
            match out.iter_mut().find(|r| r.peer == peer) {
                Some(r) => {
                    if card.version() > r.card.version() {
                        r.card = card;
                    }
                    r.messages.push(held);
                }
                None => out.push(Request {
                    peer,
                    card,
                    messages: vec![held],
                }),
            }
        }
        for r in &mut out {
            r.messages
                .sort_by_key(|m| (m.seq, m.sent_at_ms, m.received_ms));
        }
        out.sort_by_key(|r| r.messages.iter().map(|m| m.received_ms).min());
        Ok(out)
    }

    /// What is held from `peer`, if anything.
    pub fn request(&self, peer: &PeerId) -> Result<Option<Request>, StoreError> {
        Ok(self.all_requests()?.into_iter().find(|r| r.peer == *peer))
    }

    /// How many messages are held: (from `peer`, in total).
    pub fn held_counts(&self, peer: &PeerId) -> Result<(usize, usize), StoreError> {
        let tree = self.tree(TreeId::Requests);
        let mine = tree.scan_prefix(peer.to_bytes()).count();
        Ok((mine, tree.len()))
    }

    /// The sender holding the most messages (the first found among equals), how many,
    /// and the key of one of them: what gives way when requests are full.
    pub fn largest_request(&self) -> Result<Option<(PeerId, usize, Vec<u8>)>, StoreError> {
        let mut best: Option<(Vec<u8>, usize, Vec<u8>)> = None;
        let mut current: Option<(Vec<u8>, usize, Vec<u8>)> = None;
        // Keys are sender ‖ message id, so each sender's messages are adjacent.
        for item in self.tree(TreeId::Requests).iter() {
            let (k, _) = item?;
            let prefix = k[..k.len().saturating_sub(16)].to_vec();
            match &mut current {
                Some((p, n, last)) if *p == prefix => {
                    *n += 1;
                    *last = k.to_vec();
                }
                _ => {
                    if let Some(done) = current.take()
                        && best.as_ref().is_none_or(|b| done.1 > b.1)
                    {
                        best = Some(done);
                    }
                    current = Some((prefix, 1, k.to_vec()));
                }
            }
        }
        if let Some(done) = current
            && best.as_ref().is_none_or(|b| done.1 > b.1)
        {
            best = Some(done);
        }
        best.map(|(p, n, key)| {
            PeerId::from_bytes(&p)
                .map(|peer| (peer, n, key))
                .map_err(|_| StoreError::Corrupt("held message key"))
        })
        .transpose()
    }

    /// Messages from people who are not contacts dropped so far because requests were
    /// full.
    pub fn requests_dropped(&self) -> Result<u64, StoreError> {
        Ok(self
            .tree(TreeId::Meta)
            .get(DROPPED_KEY)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Counts one more dropped request (in a WriteSet; the caller holds the engine's
    /// lock, so read and write do not race).
    pub fn count_request_dropped(&self, w: &mut WriteSet) -> Result<(), StoreError> {
        let n = self.requests_dropped()?.saturating_add(1);
        w.put(TreeId::Meta, DROPPED_KEY, n.to_be_bytes().to_vec());
        Ok(())
    }

    /// True if message `id` of `peer` is held already.
    pub fn is_held(&self, peer: &PeerId, id: &[u8; 16]) -> Result<bool, StoreError> {
        self.tree(TreeId::Requests).contains_key(held_key(peer, id))
    }

    /// Holds a message (in a WriteSet).
    pub fn write_held(w: &mut WriteSet, peer: &PeerId, held: &HeldMessage) {
        w.put_record(TreeId::Requests, held_key(peer, &held.message_id), held);
    }

    /// Drops everything held from `peer` (in a WriteSet).
    pub fn remove_request(&self, w: &mut WriteSet, peer: &PeerId) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.tree(TreeId::Requests).scan_prefix(peer.to_bytes()) {
            let (k, _) = item?;
            w.remove(TreeId::Requests, k.to_vec());
            n += 1;
        }
        Ok(n)
    }

    /// Drops the held message of `peer` that `envelope` is (in a WriteSet): it has been
    /// taken in.
    pub fn release_held(
        &self,
        w: &mut WriteSet,
        peer: &PeerId,
        envelope: &kkachi_protocol::Envelope,
    ) -> Result<(), StoreError> {
        let bytes = envelope.encode();
        for item in self.tree(TreeId::Requests).scan_prefix(peer.to_bytes()) {
            let (k, v) = item?;
            let held: HeldMessage = decode(&v, "held message")?;
            if held.envelope == bytes {
                w.remove(TreeId::Requests, k.to_vec());
            }
        }
        Ok(())
    }

    /// Drops the held message `id` of `peer` (in a WriteSet): it has been taken in.
    pub fn release_held_id(w: &mut WriteSet, peer: &PeerId, id: &[u8; 16]) {
        w.remove(TreeId::Requests, held_key(peer, id));
    }

    /// Drops held messages that expired before `before` (Unix seconds).
    pub fn prune_requests(&self, before: u64) -> Result<usize, StoreError> {
        let mut w = WriteSet::default();
        for item in self.tree(TreeId::Requests).iter() {
            let (k, v) = item?;
            let held: HeldMessage = decode(&v, "held message")?;
            if held.expires_at < before {
                w.remove(TreeId::Requests, k.to_vec());
            }
        }
        let n = w.len();
        self.apply(w)?;
        Ok(n)
    }

    // --- blocked ---

    /// The blocked sender `peer`, if blocked.
    pub fn blocked(&self, peer: &PeerId) -> Result<Option<Blocked>, StoreError> {
        self.get_record(TreeId::Blocked, &peer.to_bytes(), "blocked sender")
    }

    /// Every blocked sender.
    pub fn blocked_all(&self) -> Result<Vec<(PeerId, Blocked)>, StoreError> {
        self.records::<Blocked>(TreeId::Blocked, "blocked sender")?
            .into_iter()
            .map(|(k, b)| {
                PeerId::from_bytes(&k)
                    .map(|p| (p, b))
                    .map_err(|_| StoreError::Corrupt("blocked sender key"))
            })
            .collect()
    }

    /// Blocks `peer` (in a WriteSet).
    pub fn write_blocked(w: &mut WriteSet, peer: &PeerId, blocked: &Blocked) {
        w.put_record(TreeId::Blocked, peer.to_bytes(), blocked);
    }

    /// Unblocks `peer` (in a WriteSet).
    pub fn write_unblocked(w: &mut WriteSet, peer: &PeerId) {
        w.remove(TreeId::Blocked, peer.to_bytes());
    }
}

#[cfg(test)]
mod tests {
    use kkachi_protocol::Identity;

    use super::*;

    fn held(card: &Card, id: u8, seq: u64, received_ms: u64) -> HeldMessage {
        HeldMessage {
            envelope: vec![id; 10],
            opened: Vec::new(),
            group: false,
            card: card.encode(),
            message_id: [id; 16],
            seq,
            sent_at_ms: seq,
            text: Some(format!("m{id}")),
            received_ms,
            expires_at: 1000 + u64::from(id),
        }
    }

    #[test]
    fn requests_group_by_sender_in_order_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let (frank, hana) = (Identity::generate(), Identity::generate());
        let frank_card = Card::new(&frank, "Frank", vec![], 1).unwrap();
        let frank_newer = Card::new(&frank, "Frank K", vec![], 2).unwrap();
        let hana_card = Card::new(&hana, "Hana", vec![], 1).unwrap();
        let mut w = WriteSet::default();
        LocalStore::write_held(&mut w, &frank.peer_id(), &held(&frank_newer, 2, 2, 50));
        LocalStore::write_held(&mut w, &frank.peer_id(), &held(&frank_card, 1, 1, 60));
        LocalStore::write_held(&mut w, &hana.peer_id(), &held(&hana_card, 9, 1, 10));
        store.apply(w).unwrap();
        let all = store.requests().unwrap();
        assert_eq!(
            all.iter().map(|r| r.card.name()).collect::<Vec<_>>(),
            ["Hana", "Frank K"],
            "oldest request first, newest card"
        );
        let seqs: Vec<u64> = all[1].messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [1, 2], "in the sender's order");
        assert_eq!(store.held_counts(&frank.peer_id()).unwrap(), (2, 3));
        // Frank holds the most: his messages give way first when requests are full.
        let (largest, n, key) = store.largest_request().unwrap().unwrap();
        assert_eq!((largest, n), (frank.peer_id(), 2));
        assert!(key.starts_with(&frank.peer_id().to_bytes()));
        assert_eq!(store.requests_dropped().unwrap(), 0);
        let mut w = WriteSet::default();
        store.count_request_dropped(&mut w).unwrap();
        store.apply(w).unwrap();
        assert_eq!(store.requests_dropped().unwrap(), 1);
        assert!(store.is_held(&frank.peer_id(), &[1; 16]).unwrap());
        assert_eq!(store.prune_requests(1002).unwrap(), 1);
        assert_eq!(store.held_counts(&frank.peer_id()).unwrap(), (1, 2));
        let mut w = WriteSet::default();
        assert_eq!(store.remove_request(&mut w, &frank.peer_id()).unwrap(), 1);
        store.apply(w).unwrap();
        assert!(store.request(&frank.peer_id()).unwrap().is_none());
        assert!(store.request(&hana.peer_id()).unwrap().is_some());
    }
}
