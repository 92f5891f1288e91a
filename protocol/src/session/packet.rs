//! Byte layouts of sealed packets and of the plaintext frames inside them.
//!
//! ```text
//! packet = version(1)=4 ‖ lead(8) ‖ rest,   len(packet) ∈ SIZE_CLASSES
//!   transport:     lead = session_tag; rest = nonce(24) ‖ XChaCha20-Poly1305(key, nonce,
//!                  aad = version ‖ session_tag, TransportFrame ‖ zero padding)
//!   first message: lead = 8 random bytes; rest = Noise IK message 1 whose payload is
//!                  InitFrame ‖ zero padding, with its ephemeral key (the first 32 bytes)
//!                  XORed with H("kkachi/first-mask/v4", recipient_x25519, lead)
//! session_tag = H("kkachi/session-tag/v4", send_key, counter(8))[0..8]
//! InitFrame      = proposed_generation(4) ‖ offer_seq(8) ‖ instance(8) ‖ sent_at(8)
//!                  ‖ answer? ‖ sender_card(u16 len) ‖ body(u32 len)
//! TransportFrame = counter(8) ‖ sent_at(8) ‖ answer? ‖ offer? ‖ body(u32 len)
//! answer?        = 0 | 1 ‖ reference(16) ‖ msg2(u16 len, ≤ 64)
//! offer?         = 0 | 1 ‖ proposed_generation(4) ‖ offer_seq(8) ‖ instance(8)
//!                  ‖ msg1(u16 len, ≤ 128)
//! ```
//!
//! Nothing outside the encryption tells the two kinds apart: both are a version byte
//! and random-looking bytes, in one of a few lengths.

use crate::card::MAX_CARD_LEN;
use crate::codec::{DecodeError, Reader, Writer};
use crate::content::{CONTENT_HEADER_LEN, MAX_BODY_LEN};

/// The version byte every sealed packet starts with.
pub const PACKET_VERSION: u8 = 4;
/// Length of a transport packet's session tag (and of the random lead of a first
/// message, in the same place).
pub const SESSION_TAG_LEN: usize = 8;
/// The lengths a sealed packet may have: every packet is padded to the smallest that
/// holds it, so its size tells an observer only which of these it is.
pub const SIZE_CLASSES: [usize; 4] = [2048, 8192, 32768, crate::envelope::MAX_PAYLOAD_LEN];
/// Bytes of a packet before what the session encrypts: version and lead.
pub(crate) const HEADER_LEN: usize = 1 + SESSION_TAG_LEN;
/// Length of a Noise ephemeral key: the part of a first message masked.
pub(crate) const EPHEMERAL_LEN: usize = 32;
pub(crate) const NONCE_LEN: usize = 24;
pub(crate) const TAG_LEN: usize = 16;
/// Largest body a session seals: one content record.
pub const MAX_SEALED_BODY: usize = CONTENT_HEADER_LEN + MAX_BODY_LEN;
/// IK message 2 with its payload (generation ‖ instance): e (32) ‖ 12 ‖ tag (16).
pub(crate) const MAX_ANSWER_LEN: usize = 64;
/// IK message 1 with an empty payload: e (32) ‖ s (32 + 16) ‖ tag (16).
pub(crate) const MAX_OFFER_LEN: usize = 128;

/// A handshake answer (Noise IK message 2) riding in a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) reference: [u8; 16],
    pub(crate) msg2: Vec<u8>,
}

/// A rekey offer (Noise IK message 1 with an empty payload) riding in a transport packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Offer {
    pub(crate) generation: u32,
    pub(crate) seq: u64,
    pub(crate) instance: [u8; 8],
    pub(crate) msg1: Vec<u8>,
}

/// The plaintext of a first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InitFrame {
    pub(crate) generation: u32,
    pub(crate) seq: u64,
    pub(crate) instance: [u8; 8],
    pub(crate) sent_at: u64,
    pub(crate) answer: Option<Answer>,
    /// The sender's encoded card: who holds the static key this message came from.
    pub(crate) card: Vec<u8>,
    pub(crate) body: Vec<u8>,
}

/// The plaintext of a transport message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TransportFrame {
    pub(crate) counter: u64,
    pub(crate) sent_at: u64,
    pub(crate) answer: Option<Answer>,
    pub(crate) offer: Option<Offer>,
    pub(crate) body: Vec<u8>,
}

fn write_answer(w: &mut Writer, answer: Option<&Answer>) {
    match answer {
        None => {
            w.u8(0);
        }
        Some(a) => {
            w.u8(1).raw(&a.reference).bytes16(&a.msg2);
        }
    }
}

fn read_answer(r: &mut Reader<'_>) -> Result<Option<Answer>, DecodeError> {
    if !r.bool("answer present")? {
        return Ok(None);
    }
    Ok(Some(Answer {
        reference: r.array("answer reference")?,
        msg2: r.bytes16(MAX_ANSWER_LEN, "answer")?.to_vec(),
    }))
}

fn read_body(r: &mut Reader<'_>) -> Result<Vec<u8>, DecodeError> {
    Ok(r.bytes32(MAX_SEALED_BODY, "sealed body")?.to_vec())
}

/// The smallest size class of at least `len` bytes, if any.
pub(crate) fn size_class(len: usize) -> Option<usize> {
    SIZE_CLASSES.into_iter().find(|c| *c >= len)
}

/// Appends zeros to `frame` so that, with `overhead` bytes around it, the packet is
/// exactly a size class; `None` if no class holds it.
pub(crate) fn pad(mut frame: Vec<u8>, overhead: usize) -> Option<Vec<u8>> {
    let class = size_class(frame.len() + overhead)?;
    frame.resize(class - overhead, 0);
    Some(frame)
}

/// What follows a frame must be padding: zeros only.
fn finish_padded(r: Reader<'_>) -> Result<(), DecodeError> {
    let rest = r.rest();
    match rest.iter().position(|b| *b != 0) {
        None => Ok(()),
        Some(_) => Err(DecodeError::TrailingBytes(rest.len())),
    }
}

impl InitFrame {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(
            4 + 8 + 8 + 8 + 1 + 16 + 2 + MAX_ANSWER_LEN + 2 + self.card.len() + 4 + self.body.len(),
        );
        w.u32(self.generation)
            .u64(self.seq)
            .raw(&self.instance)
            .u64(self.sent_at);
        write_answer(&mut w, self.answer.as_ref());
        w.bytes16(&self.card).bytes32(&self.body);
        w.finish()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let frame = Self {
            generation: r.u32("generation")?,
            seq: r.u64("offer sequence")?,
            instance: r.array("instance")?,
            sent_at: r.u64("sent at")?,
            answer: read_answer(&mut r)?,
            card: r.bytes16(MAX_CARD_LEN, "sender card")?.to_vec(),
            body: read_body(&mut r)?,
        };
        finish_padded(r)?;
        Ok(frame)
    }
}

impl TransportFrame {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(256 + self.body.len());
        w.u64(self.counter).u64(self.sent_at);
        write_answer(&mut w, self.answer.as_ref());
        match &self.offer {
            None => {
                w.u8(0);
            }
            Some(o) => {
                w.u8(1)
                    .u32(o.generation)
                    .u64(o.seq)
                    .raw(&o.instance)
                    .bytes16(&o.msg1);
            }
        }
        w.bytes32(&self.body);
        w.finish()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let counter = r.u64("counter")?;
        let sent_at = r.u64("sent at")?;
        let answer = read_answer(&mut r)?;
        let offer = if r.bool("offer present")? {
            Some(Offer {
                generation: r.u32("offer generation")?,
                seq: r.u64("offer sequence")?,
                instance: r.array("instance")?,
                msg1: r.bytes16(MAX_OFFER_LEN, "offer")?.to_vec(),
            })
        } else {
            None
        };
        let body = read_body(&mut r)?;
        finish_padded(r)?;
        Ok(Self {
            counter,
            sent_at,
            answer,
            offer,
            body,
        })
    }
}

/// The outer layer of a sealed packet: its lead (a transport packet's session tag, or a
/// first message's random bytes) and the rest, not yet decrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outer<'a> {
    pub(crate) lead: &'a [u8; SESSION_TAG_LEN],
    pub(crate) rest: &'a [u8],
}

impl<'a> Outer<'a> {
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        if !SIZE_CLASSES.contains(&bytes.len()) {
            return Err(DecodeError::Invalid {
                field: "sealed packet",
                reason: "its length is not one of the size classes",
            });
        }
        let mut r = Reader::new(bytes);
        let version = r.u8("packet version")?;
        if version != PACKET_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "sealed packet",
                version,
            });
        }
        let lead: &[u8; SESSION_TAG_LEN] = r
            .take(SESSION_TAG_LEN, "lead")?
            .try_into()
            .expect("took exactly SESSION_TAG_LEN bytes");
        Ok(Outer {
            lead,
            rest: r.rest(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_answer() -> impl Strategy<Value = Option<Answer>> {
        proptest::option::of(
            (
                any::<[u8; 16]>(),
                proptest::collection::vec(any::<u8>(), 0..=MAX_ANSWER_LEN),
            )
                .prop_map(|(reference, msg2)| Answer { reference, msg2 }),
        )
    }

    proptest! {
        #[test]
        fn init_frame_round_trip(generation in any::<u32>(), seq in any::<u64>(), instance in any::<[u8; 8]>(), sent_at in any::<u64>(),
                                 answer in arb_answer(),
                                 card in proptest::collection::vec(any::<u8>(), 0..300),
                                 body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let f = InitFrame { generation, seq, instance, sent_at, answer, card, body };
            prop_assert_eq!(InitFrame::decode(&f.encode()).unwrap(), f);
        }

        #[test]
        fn transport_frame_round_trip(counter in any::<u64>(), sent_at in any::<u64>(),
                                      answer in arb_answer(),
                                      offer in proptest::option::of((any::<u32>(), any::<u64>(), any::<[u8; 8]>(), proptest::collection::vec(any::<u8>(), 0..=MAX_OFFER_LEN))),
                                      body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let f = TransportFrame {
                counter, sent_at, answer,
                offer: offer.map(|(generation, seq, instance, msg1)| Offer { generation, seq, instance, msg1 }),
                body,
            };
            prop_assert_eq!(TransportFrame::decode(&f.encode()).unwrap(), f);
        }

        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Outer::parse(&bytes);
            let _ = InitFrame::decode(&bytes);
            let _ = TransportFrame::decode(&bytes);
        }
    }

    #[test]
    fn outer_takes_only_size_classes_of_this_version() {
        for class in SIZE_CLASSES {
            let mut ok = vec![0u8; class];
            ok[0] = PACKET_VERSION;
            ok[1..1 + SESSION_TAG_LEN].copy_from_slice(&[7; SESSION_TAG_LEN]);
            let outer = Outer::parse(&ok).unwrap();
            assert_eq!(outer.lead, &[7; SESSION_TAG_LEN]);
            assert_eq!(outer.rest.len(), class - HEADER_LEN);
            for len in [class - 1, class + 1] {
                let mut off = ok.clone();
                off.resize(len, 0);
                assert!(
                    matches!(Outer::parse(&off), Err(DecodeError::Invalid { .. })),
                    "{len} bytes"
                );
            }
            // Version 3 packets (exact sizes, a kind byte) are refused, not misread.
            ok[0] = 3;
            assert!(matches!(
                Outer::parse(&ok),
                Err(DecodeError::UnsupportedVersion { version: 3, .. })
            ));
        }
        assert!(Outer::parse(&[]).is_err());
    }

    #[test]
    fn frames_are_padded_to_a_class_and_only_zeros_may_follow_them() {
        let frame = TransportFrame {
            counter: 1,
            sent_at: 2,
            answer: None,
            offer: None,
            body: vec![9; 100],
        };
        let overhead = HEADER_LEN + NONCE_LEN + TAG_LEN;
        let padded = pad(frame.encode(), overhead).unwrap();
        assert_eq!(padded.len() + overhead, SIZE_CLASSES[0]);
        assert_eq!(TransportFrame::decode(&padded).unwrap(), frame);
        let mut bad = padded.clone();
        *bad.last_mut().unwrap() = 1;
        assert!(matches!(
            TransportFrame::decode(&bad),
            Err(DecodeError::TrailingBytes(_))
        ));
        // One byte more than the smallest class holds takes the next one.
        let fits = SIZE_CLASSES[0] - overhead;
        assert_eq!(pad(vec![0; fits], overhead).unwrap().len(), fits);
        assert_eq!(
            pad(vec![0; fits + 1], overhead).unwrap().len() + overhead,
            SIZE_CLASSES[1]
        );
        assert_eq!(pad(vec![0; SIZE_CLASSES[3]], 1), None);
    }
}
