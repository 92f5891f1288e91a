//! Receiving: open, deduplicate, store durably, acknowledge with receipts; then (the
//! caller) deletes from the relay. Also sealing again for a contact that lost its state.

use kkachi_protocol::session::{self, Incoming};
use kkachi_protocol::{
    Body, Content, Envelope, MailboxId, MessageId, Multiaddr, PeerId, ReceiptStatus, RelayToClient,
    Session, SessionError,
};

use super::{AppEvent, Engine, EngineError, Sessions, now_ms};
use crate::net::Transport;
use crate::store::{
    Contact, Conversation, Direction, LocalStore, MessageRecord, MessageState, OutboxKind, TreeId,
    WriteSet, message_key,
};

/// A message shown to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Who sent it.
    pub contact: PeerId,
    /// Their name.
    pub name: String,
    /// The message.
    pub message: MessageRecord,
    /// Sequence numbers of theirs still missing after this one arrived.
    pub missing: Vec<u64>,
}

impl<T: Transport> Engine<T> {
    /// Processes envelopes from a relay or a direct path. Everything is durable when
    /// this returns, so the caller may delete them from the relay. Returns new texts.
    /// Each is announced twice: [`AppEvent::Incoming`] once it is in the store, then
    /// [`AppEvent::Message`] once it is on disk.
    pub async fn receive(&self, envelopes: Vec<Envelope>) -> Result<Vec<Received>, EngineError> {
        let mine = MailboxId::for_peer(&self.me.peer_id());
        let now = now_ms();
        let mut sessions = self.lock.lock().await;
        let contacts = self.store.contacts()?;
        let mut w = WriteSet::default();
        let mut shown = Vec::new();
        // Contacts whose session changed in this batch, and their conversations.
        let mut touched: Vec<PeerId> = Vec::new();
        let mut convs: Vec<(PeerId, Conversation)> = Vec::new();
        let mut receipts: Vec<(Contact, Vec<MessageId>)> = Vec::new();
        for envelope in envelopes {
            let id = envelope.id();
            if envelope.mailbox != mine || self.store.seen(&id)? {
                continue;
            }
            LocalStore::write_seen(&mut w, &id, now);
            let opened = self.open(
                &contacts,
                &mut sessions,
                &mut touched,
                &envelope.payload,
                now,
            );
            let (contact, body, peer_reset) = match opened {
                Ok(x) => x,
                Err(reason) => {
                    tracing::debug!(envelope = %id, %reason, "envelope not opened");
                    continue;
                }
            };
            if peer_reset {
                let session = sessions.get(&self.store, &contact)?;
                self.reseal_for(&mut w, &contact, session, now)?;
            }
            let content = match Content::decode(&body) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(from = %contact.peer, error = %e, "unreadable content");
                    continue;
                }
            };
            // `None`: a receipt, card update or duplicate: nothing to show.
            if let Some(r) = self.apply_content(&mut w, &contact, &mut convs, content, now)? {
                match receipts.iter_mut().find(|(c, _)| c.peer == contact.peer) {
                    Some((_, ids)) => ids.push(MessageId(r.message.id)),
                    None => receipts.push((contact.clone(), vec![MessageId(r.message.id)])),
                }
                shown.push(r);
            }
        }
        // Receipts ride the same write set: they exist iff the messages are stored.
        let receipts_queued = !receipts.is_empty();
        for (contact, ids) in receipts {
            let session = sessions.get(&self.store, &contact)?;
            let receipt = Body::Receipt {
                status: ReceiptStatus::Delivered,
                ids,
            };
            self.queue_control(&mut w, &contact, session, receipt, now)?;
            if !touched.contains(&contact.peer) {
                touched.push(contact.peer);
            }
        }
        for contact in contacts.iter().filter(|c| touched.contains(&c.peer)) {
            let session = sessions.get(&self.store, contact)?;
            LocalStore::write_session(&mut w, &contact.peer, session);
        }
        for (peer, conv) in &convs {
            LocalStore::write_conversation(&mut w, peer, conv);
        }
        if let Err(e) = self.store.apply(w) {
            sessions.reset();
            return Err(e.into());
        }
        // In the store now: a view of it may show them while they go to the disk. Nothing
        // is acknowledged (receipt, relay delete, direct answer) before they are durable.
        drop(sessions);
        for r in &shown {
            self.emit(AppEvent::Incoming(r.clone()));
        }
        self.store.flush().await?;
        for r in &shown {
            self.emit(AppEvent::Message(r.clone()));
        }
        if receipts_queued {
            self.outbox_wake.notify_one();
        }
        Ok(shown)
    }

    /// Opens a sealed packet against our contacts' sessions.
    fn open(
        &self,
        contacts: &[Contact],
        sessions: &mut Sessions,
        touched: &mut Vec<PeerId>,
        payload: &[u8],
        now: u64,
    ) -> Result<(Contact, Vec<u8>, bool), String> {
        let mut touch = |peer: PeerId| {
            if !touched.contains(&peer) {
                touched.push(peer);
            }
        };
        let now_s = now / 1000;
        match session::open(&self.me, payload).map_err(|e| e.to_string())? {
            Incoming::Init(init) => {
                let Some(contact) = contacts
                    .iter()
                    .find(|c| c.card.identity().x25519() == init.remote_static())
                else {
                    return Err("first message from someone who is not a contact".into());
                };
                let session = sessions
                    .get(&self.store, contact)
                    .map_err(|e| e.to_string())?;
                touch(contact.peer);
                match session.accept_init(&self.me, init, now_s) {
                    Ok(opened) => Ok((contact.clone(), opened.body, opened.peer_reset)),
                    Err(SessionError::Replay) => Err("duplicate".into()),
                    Err(e) => Err(e.to_string()),
                }
            }
            Incoming::Transport(packet) => {
                for contact in contacts {
                    let session = sessions
                        .get(&self.store, contact)
                        .map_err(|e| e.to_string())?;
                    match session.open_transport(&self.me, &packet, now_s) {
                        None => continue,
                        Some(Ok(opened)) => {
                            touch(contact.peer);
                            return Ok((contact.clone(), opened.body, opened.peer_reset));
                        }
                        Some(Err(SessionError::Replay)) => return Err("duplicate".into()),
                        Some(Err(e)) => return Err(e.to_string()),
                    }
                }
                Err("no session opens it".into())
            }
        }
    }

    fn apply_content(
        &self,
        w: &mut WriteSet,
        contact: &Contact,
        convs: &mut Vec<(PeerId, Conversation)>,
        content: Content,
        now: u64,
    ) -> Result<Option<Received>, EngineError> {
        match content.body {
            Body::Text(text) => {
                if self.store.message(&contact.peer, &content.id)?.is_some() {
                    return Ok(None); // same message through another path
                }
                let conv = conv_mut(convs, &self.store, &contact.peer)?;
                let missing = note_sequence(conv, content.seq);
                let local = conv.next_local;
                conv.next_local += 1;
                let record = MessageRecord {
                    id: content.id.0,
                    direction: Direction::In,
                    text,
                    state: MessageState::Received,
                    sent_at_ms: content.sent_at_ms,
                    stored_at_ms: now,
                    seq: content.seq,
                    prev: content.prev,
                };
                LocalStore::write_message(
                    w,
                    &contact.peer,
                    message_key(&contact.peer, local),
                    &record,
                );
                Ok(Some(Received {
                    contact: contact.peer,
                    name: contact.name.clone(),
                    message: record,
                    missing,
                }))
            }
            Body::Receipt { status, ids } => {
                let state = match status {
                    ReceiptStatus::Delivered => MessageState::Delivered,
                    ReceiptStatus::Read => MessageState::Read,
                };
                for id in &ids {
                    self.advance_state(w, &contact.peer, id, state)?;
                }
                // Delivered: the outbox entries of those messages are done.
                for (key, entry) in self.store.outbox()? {
                    if entry.kind == OutboxKind::Message
                        && entry.contact == contact.peer.to_bytes()
                        && ids.contains(&MessageId(entry.message_id))
                    {
                        w.remove(TreeId::Outbox, key.to_be_bytes().to_vec());
                    }
                }
                Ok(None)
            }
            Body::CardUpdate(card) => {
                if card.supersedes(&contact.card) {
                    let updated = Contact {
                        peer: contact.peer,
                        name: contact.name.clone(),
                        card: *card,
                    };
                    LocalStore::write_contact(w, &updated);
                    self.emit(AppEvent::ContactUpdated(contact.peer));
                }
                Ok(None)
            }
            Body::Unknown { kind, .. } => {
                tracing::debug!(kind, from = %contact.peer, "ignoring content of an unknown kind");
                Ok(None)
            }
        }
    }

    /// The contact lost its session state: what we sealed for it and it has not
    /// confirmed is sealed again (same message ids, so nothing shows twice).
    fn reseal_for(
        &self,
        w: &mut WriteSet,
        contact: &Contact,
        session: &mut Session,
        now: u64,
    ) -> Result<(), EngineError> {
        for (key, mut entry) in self.store.outbox()? {
            if entry.contact != contact.peer.to_bytes() || entry.kind != OutboxKind::Message {
                continue;
            }
            let Some((_, record)) = self
                .store
                .message(&contact.peer, &MessageId(entry.message_id))?
            else {
                continue;
            };
            let content = Content {
                id: MessageId(record.id),
                seq: record.seq,
                prev: record.prev,
                sent_at_ms: record.sent_at_ms,
                body: Body::Text(record.text),
            };
            // Same message id, sealed anew, with a fresh lifetime.
            entry.envelope = self
                .seal_envelope(contact, session, &content, now)?
                .encode();
            for t in &mut entry.targets {
                t.acked = false;
                t.next_try_ms = 0;
            }
            entry.direct_acked = false;
            LocalStore::write_outbox(w, key, &entry);
        }
        tracing::info!(contact = %contact.peer, "contact lost its session; unconfirmed messages sealed again");
        Ok(())
    }

    /// Fetches everything waiting at one of our relays (no long wait), processes it,
    /// deletes it there. Returns new texts.
    pub async fn sync_relay(
        &self,
        relay: &Multiaddr,
        wait_ms: u32,
    ) -> Result<Vec<Received>, String> {
        let mailbox = MailboxId::for_peer(&self.me.peer_id());
        let addr = relay.to_string();
        let mut shown = Vec::new();
        let mut first = true;
        loop {
            let cursor = self
                .store
                .relays()
                .map_err(|e| e.to_string())?
                .into_iter()
                .find(|r| r.addr == addr)
                .map_or(0, |r| r.cursor);
            let request = if first && wait_ms > 0 {
                kkachi_protocol::ClientToRelay::Subscribe {
                    mailbox,
                    after: cursor,
                    wait_ms,
                }
            } else {
                kkachi_protocol::ClientToRelay::Fetch {
                    mailbox,
                    after: cursor,
                    limit: 256,
                }
            };
            first = false;
            let answer = self.net.request(relay, request).await;
            let (items, next, more) = match answer {
                Ok(RelayToClient::Batch { items, next, more }) => (items, next, more),
                Ok(RelayToClient::Error { code, message }) => {
                    self.note_relay(&addr, Err(format!("{}: {message}", code.as_str())));
                    return Err(message);
                }
                Ok(other) => return Err(format!("unexpected answer {other:?}")),
                Err(e) => {
                    self.note_relay(&addr, Err(e.to_string()));
                    return Err(e.to_string());
                }
            };
            let ids: Vec<_> = items.iter().map(|i| i.envelope.id()).collect();
            let envelopes = items.into_iter().map(|i| i.envelope).collect();
            shown.extend(self.receive(envelopes).await.map_err(|e| e.to_string())?);
            if !ids.is_empty() {
                let delete = kkachi_protocol::ClientToRelay::Delete { mailbox, ids };
                if let Err(e) = self.net.request(relay, delete).await {
                    tracing::debug!(relay = %addr, error = %e, "delete failed; will be deduplicated");
                }
            }
            let _ = self
                .store
                .update_relay(&addr, |r| r.cursor = r.cursor.max(next));
            self.note_relay(&addr, Ok(()));
            if !more {
                return Ok(shown);
            }
        }
    }

    /// Records a relay's health and tells the UI.
    pub(crate) fn note_relay(&self, addr: &str, result: Result<(), String>) {
        let up = result.is_ok();
        let _ = self.store.update_relay(addr, |r| match result {
            Ok(()) => {
                r.last_ok_ms = Some(now_ms());
                r.last_error = None;
            }
            Err(e) => r.last_error = Some(e),
        });
        self.emit(AppEvent::Relay {
            addr: addr.to_owned(),
            up,
        });
    }
}

fn conv_mut<'a>(
    convs: &'a mut Vec<(PeerId, Conversation)>,
    store: &LocalStore,
    peer: &PeerId,
) -> Result<&'a mut Conversation, EngineError> {
    if let Some(i) = convs.iter().position(|(p, _)| p == peer) {
        return Ok(&mut convs[i].1);
    }
    convs.push((*peer, store.conversation(peer)?));
    Ok(&mut convs.last_mut().expect("just pushed").1)
}

/// Records that sequence number `seq` arrived; returns what is still missing.
fn note_sequence(conv: &mut Conversation, seq: u64) -> Vec<u64> {
    if seq == 0 {
        return conv.missing.clone();
    }
    if seq > conv.recv_max_seq {
        conv.missing.extend(conv.recv_max_seq + 1..seq);
        conv.recv_max_seq = seq;
    } else {
        conv.missing.retain(|&m| m != seq);
    }
    // Bound the list: a contact cannot make us hold more than this many gaps.
    const MAX_MISSING: usize = 1000;
    if conv.missing.len() > MAX_MISSING {
        let drop = conv.missing.len() - MAX_MISSING;
        conv.missing.drain(..drop);
    }
    conv.missing.clone()
}

#[cfg(test)]
mod sequence_tests {
    use super::*;

    #[test]
    fn gaps_are_recorded_and_filled() {
        let mut c = Conversation::default();
        assert!(note_sequence(&mut c, 1).is_empty());
        assert_eq!(note_sequence(&mut c, 4), vec![2, 3]);
        assert_eq!(note_sequence(&mut c, 3), vec![2]);
        assert!(note_sequence(&mut c, 2).is_empty());
        assert!(note_sequence(&mut c, 5).is_empty());
        assert!(
            note_sequence(&mut c, 0).is_empty(),
            "receipts never cause gaps"
        );
    }
}
