//! Answers and rekeys: offers we make, answers we give, and the answers we take
//! (SPEC 4.2, 4.4, 4.5).

use super::packet::{self, Answer, Offer};
use super::*;

impl Session {
    /// The rekey offer to attach: the outstanding one if any, else a new handshake.
    pub(super) fn rekey_offer(&mut self, me: &Identity, now: u64) -> Result<Offer, SessionError> {
        let generation = self.next_generation();
        if let Some(p) = self
            .pending
            .iter()
            .find(|p| p.offer.is_some() && p.generation == generation)
        {
            let msg1 = p.offer.clone().expect("filtered on offer");
            return Ok(Offer {
                generation,
                seq: p.seq,
                instance: self.instance,
                msg1,
            });
        }
        let seq = self.next_offer_seq;
        let (msg1, reference) = self.start_handshake(me, &[], generation, now)?;
        let pending = self
            .pending
            .iter_mut()
            .find(|p| p.reference == reference)
            .expect("just pushed");
        pending.offer = Some(msg1.clone());
        Ok(Offer {
            generation,
            seq,
            instance: self.instance,
            msg1,
        })
    }

    /// The newest answer that would improve on the current session, to attach to
    /// everything we send until the peer uses (confirms) one.
    pub(super) fn best_answer(&self) -> Option<Answer> {
        let floor = self.current.as_ref().map(|c| c.rank);
        self.offered
            .iter()
            .rev()
            .find(|o| floor.is_none_or(|f| o.session.rank > f))
            .map(|o| Answer {
                reference: o.reference,
                msg2: o.answer.clone(),
            })
    }

    /// Completes one of our handshakes from the peer's answer. An answer we cannot use
    /// (already completed, forgotten after a restart, or forged) is ignored: it never
    /// affects the message it came with.
    pub(super) fn take_answer(&mut self, me: &Identity, answer: &Answer, now: u64) {
        let Some(i) = self
            .pending
            .iter()
            .position(|p| p.reference == answer.reference)
        else {
            return;
        };
        let mut payload = [0u8; packet::MAX_ANSWER_LEN];
        let pending = &mut self.pending[i];
        let Ok(n) = pending.state.read_message(&answer.msg2, &mut payload) else {
            return;
        };
        let Some((generation, peer_instance)) = decode_answer_payload(&payload[..n]) else {
            return;
        };
        let mut pending = self.pending.remove(i);
        let rank = self.rank(me, generation, true);
        let session = Established::from_handshake(&mut pending.state, rank, peer_instance, now);
        self.pending.retain(|p| p.generation > generation);
        self.install(session, now);
    }

    /// Answers a handshake message 1 (a first message or a rekey offer) and keeps the
    /// resulting session as offered until the peer confirms it.
    pub(super) fn answer_offer(
        &mut self,
        me: &Identity,
        mut state: snow::HandshakeState,
        proposal: Proposal,
        now: u64,
    ) -> Result<(), SessionError> {
        if self
            .offered
            .iter()
            .any(|o| o.reference == proposal.reference)
        {
            return Ok(());
        }
        if proposal.generation > self.highest_acceptable_generation() {
            // Not answered: a hostile peer cannot push generations towards the end of
            // their range. The message it came with is still opened.
            return Ok(());
        }
        let full = self.offered.len() >= MAX_OFFERED;
        if full && self.offered.iter().all(|o| o.seq > proposal.seq) {
            // Older than every answer we keep: the initiator has moved on from it.
            return Ok(());
        }
        let mut msg2 = vec![0u8; packet::MAX_ANSWER_LEN];
        let payload = encode_answer_payload(proposal.generation, self.instance);
        let n = state.write_message(&payload, &mut msg2)?;
        msg2.truncate(n);
        let rank = self.rank(me, proposal.generation, false);
        let session = Established::from_handshake(&mut state, rank, proposal.instance, now);
        self.offered.push(Offered {
            reference: proposal.reference,
            seq: proposal.seq,
            answer: msg2,
            created_at: now,
            session,
        });
        // Keep the highest sequence numbers; `best_answer` relies on this order.
        self.offered.sort_by_key(|o| o.seq);
        if self.offered.len() > MAX_OFFERED {
            self.offered.remove(0);
        }
        Ok(())
    }

    pub(super) fn answer_rekey(
        &mut self,
        me: &Identity,
        offer: &Offer,
        now: u64,
    ) -> Result<(), SessionError> {
        let secret = me.x25519_secret();
        let mut state = builder(&secret)?.build_responder()?;
        let mut payload = [0u8; packet::MAX_OFFER_LEN];
        state.read_message(&offer.msg1, &mut payload)?;
        if remote_static(&state)? != self.remote {
            return Err(SessionError::WrongPeer);
        }
        let proposal = Proposal {
            reference: reference(&state),
            generation: offer.generation,
            seq: offer.seq,
            instance: offer.instance,
        };
        self.answer_offer(me, state, proposal, now)
    }

    /// The highest generation an offer may propose to this state (see
    /// [`MAX_FIRST_GENERATION`]).
    pub(super) fn highest_acceptable_generation(&self) -> u32 {
        let held = self
            .current
            .iter()
            .chain(self.retired.iter())
            .chain(self.offered.iter().map(|o| &o.session))
            .map(|s| s.rank.generation)
            .max();
        match held {
            None => MAX_FIRST_GENERATION,
            Some(g) => g
                .saturating_add(MAX_GENERATION_STEP)
                .min(u32::MAX - MAX_GENERATION_STEP),
        }
    }
}

/// What an offer (a handshake message 1) proposes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Proposal {
    pub(super) reference: [u8; 16],
    pub(super) generation: u32,
    pub(super) seq: u64,
    pub(super) instance: [u8; 8],
}

/// The payload of an answer (IK message 2): the generation it confirms and the
/// answerer's instance id.
pub(super) fn encode_answer_payload(generation: u32, instance: [u8; 8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..4].copy_from_slice(&generation.to_be_bytes());
    out[4..].copy_from_slice(&instance);
    out
}

fn decode_answer_payload(payload: &[u8]) -> Option<(u32, [u8; 8])> {
    let payload: &[u8; 12] = payload.try_into().ok()?;
    let generation = u32::from_be_bytes(payload[..4].try_into().ok()?);
    Some((generation, payload[4..].try_into().ok()?))
}
