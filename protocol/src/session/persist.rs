//! The stored form of a [`Session`], for the client's local database.
//!
//! ```text
//! session     = version(1)=2 ‖ remote(32) ‖ instance(8) ‖ next_offer_seq(8) ‖ current?
//!               ‖ n(1) ‖ retired×n ‖ m(1) ‖ offered×m ‖ seen_inits
//! established = id(32) ‖ generation(4) ‖ initiator_lower(1) ‖ peer_instance(8)
//!               ‖ send_key(32)
//!               ‖ recv_key(32) ‖ next_send(8) ‖ created_at(8) ‖ retired_at(8, 0 = none)
//!               ‖ first_received_at(8, 0 = none) ‖ window(512)
//! offered     = reference(16) ‖ seq(8) ‖ answer(u16 len) ‖ created_at(8) ‖ established
//! ```
//! Version 1 (without `first_received_at`) is still read.
//! Unanswered handshakes are not stored: their snow state cannot be serialised, and
//! losing them only means the next message starts a new handshake.

use zeroize::Zeroizing;

use super::packet::MAX_ANSWER_LEN;
use super::replay::{ReplayWindow, SeenInits};
use super::{Established, MAX_OFFERED, MAX_RETIRED, Offered, Rank, Session, SessionError};
use crate::codec::{DecodeError, Reader, Writer};

const STATE_VERSION: u8 = 2;

fn write_established(w: &mut Writer, s: &Established) {
    w.raw(&s.id)
        .u32(s.rank.generation)
        .bool(s.rank.initiator_lower)
        .raw(&s.peer_instance)
        .raw(s.send_key.as_ref())
        .raw(s.recv_key.as_ref())
        .u64(s.next_send)
        .u64(s.created_at)
        .u64(s.retired_at.unwrap_or(0))
        .u64(s.first_received_at.unwrap_or(0));
    s.window.write(w);
}

fn optional_time(t: u64) -> Option<u64> {
    (t != 0).then_some(t)
}

fn read_established(r: &mut Reader<'_>, version: u8) -> Result<Established, DecodeError> {
    Ok(Established {
        id: r.array("session id")?,
        rank: Rank {
            generation: r.u32("generation")?,
            initiator_lower: r.bool("initiator lower")?,
        },
        peer_instance: r.array("peer instance")?,
        send_key: Zeroizing::new(r.array("send key")?),
        recv_key: Zeroizing::new(r.array("receive key")?),
        next_send: r.u64("next counter")?,
        created_at: r.u64("created at")?,
        retired_at: optional_time(r.u64("retired at")?),
        first_received_at: if version >= 2 {
            optional_time(r.u64("first received at")?)
        } else {
            None
        },
        window: ReplayWindow::read(r)?,
    })
}

fn read_count(r: &mut Reader<'_>, max: usize, field: &'static str) -> Result<usize, DecodeError> {
    let n = usize::from(r.u8(field)?);
    if n > max {
        return Err(DecodeError::TooLong {
            field,
            len: n as u64,
            max: max as u64,
        });
    }
    Ok(n)
}

impl Session {
    /// Serialises everything but unanswered handshakes. Contains secret keys: store it
    /// as carefully as the identity.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut w = Writer::with_capacity(2048);
        w.u8(STATE_VERSION)
            .raw(&self.remote)
            .raw(&self.instance)
            .u64(self.next_offer_seq);
        match &self.current {
            None => {
                w.u8(0);
            }
            Some(c) => {
                w.u8(1);
                write_established(&mut w, c);
            }
        }
        w.u8(self.retired.len() as u8);
        for s in &self.retired {
            write_established(&mut w, s);
        }
        w.u8(self.offered.len() as u8);
        for o in &self.offered {
            w.raw(&o.reference)
                .u64(o.seq)
                .bytes16(&o.answer)
                .u64(o.created_at);
            write_established(&mut w, &o.session);
        }
        self.seen_inits.write(&mut w);
        Zeroizing::new(w.finish())
    }

    /// Reads what [`Session::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, SessionError> {
        let mut r = Reader::new(bytes);
        let version = r.u8("session version")?;
        if !(1..=STATE_VERSION).contains(&version) {
            return Err(DecodeError::UnsupportedVersion {
                what: "session state",
                version,
            }
            .into());
        }
        let remote = r.array("remote key")?;
        let instance = r.array("instance")?;
        let next_offer_seq = r.u64("offer sequence")?;
        let current = if r.bool("current present")? {
            Some(read_established(&mut r, version)?)
        } else {
            None
        };
        let n = read_count(&mut r, MAX_RETIRED, "retired sessions")?;
        let retired = (0..n)
            .map(|_| read_established(&mut r, version))
            .collect::<Result<_, _>>()?;
        let m = read_count(&mut r, MAX_OFFERED, "offered sessions")?;
        let mut offered = Vec::with_capacity(m);
        for _ in 0..m {
            offered.push(Offered {
                reference: r.array("offer reference")?,
                seq: r.u64("offer sequence")?,
                answer: r.bytes16(MAX_ANSWER_LEN, "answer")?.to_vec(),
                created_at: r.u64("offer time")?,
                session: read_established(&mut r, version)?,
            });
        }
        let seen_inits = SeenInits::read(&mut r)?;
        r.finish()?;
        Ok(Self {
            remote,
            current,
            retired,
            offered,
            pending: Vec::new(),
            seen_inits,
            instance,
            next_offer_seq,
        })
    }
}
