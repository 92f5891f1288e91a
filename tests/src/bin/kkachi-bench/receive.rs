//! What taking in one envelope costs the recipient, with few and with many contacts:
//! a message from one contact among them, and a junk envelope that looks like a
//! transport packet. Each transport packet names its session by its tag, so neither
//! should grow with the number of contacts.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use kkachi_client::engine::{Engine, Mode};
use kkachi_client::net::Network;
use kkachi_client::store::LocalStore;
use kkachi_protocol::session::{self, Incoming};
use kkachi_protocol::{Body, Card, Content, Envelope, Identity, MessageId, Session};
use rand::RngCore;
use serde_json::json;

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn text(seq: u64, words: &str) -> Vec<u8> {
    Content {
        id: MessageId(rand::random()),
        seq,
        prev: [0; 32],
        sent_at_ms: now_s() * 1000,
        body: Body::Text(words.into()),
    }
    .encode()
}

fn envelope(payload: Vec<u8>) -> Envelope {
    Envelope {
        expires_at: now_s() + 3600,
        payload,
    }
}

/// A contact of the recipient's, with its end of an established session.
struct Peer {
    me: Identity,
    card: Card,
    session: Session,
}

/// Per-envelope cost, in microseconds, of a message from one of `contacts` contacts
/// and of a junk transport packet, each over `messages` envelopes.
pub(crate) async fn receive_cost(
    root: &Path,
    contacts: usize,
    messages: usize,
) -> Result<serde_json::Value> {
    let home = root.join(format!("receive-{contacts}"));
    let (store, me, my_card) = LocalStore::provision(&home, "me", &[])?;
    let engine = Engine::start(
        store.clone(),
        me.clone(),
        Network::offline(me.peer_id()),
        None,
        Mode::LOCAL,
    );
    // Every contact writes first; our answers (receipts) go into our outbox, which is
    // where each contact reads them to have its session established.
    let mut peers = Vec::with_capacity(contacts);
    let mut firsts = Vec::with_capacity(contacts);
    for i in 0..contacts {
        let id = Identity::generate();
        let card = Card::new(&id, &format!("contact {i}"), vec![], 1)?;
        engine.add_contact(card.clone(), None).await?;
        let mut session = Session::new(*my_card.identity().x25519());
        let packet = session.seal(
            &id,
            &card,
            &text(1, "hello"),
            now_s(),
            &mut rand_core::OsRng,
        )?;
        firsts.push(envelope(packet));
        peers.push(Peer {
            me: id,
            card,
            session,
        });
    }
    for chunk in firsts.chunks(256) {
        engine.receive(chunk.to_vec()).await?;
    }
    let outbox = store.outbox()?;
    for peer in &mut peers {
        let mine = peer.me.peer_id().to_bytes();
        let answers: Vec<Vec<u8>> = outbox
            .iter()
            .filter(|(_, e)| e.contact == mine)
            .map(|(_, e)| e.envelope.clone())
            .collect();
        for bytes in answers {
            let sealed = Envelope::decode(&bytes)?;
            match session::open(&peer.me, &sealed.payload)? {
                Incoming::Init(init) => {
                    peer.session.accept_init(&peer.me, init, now_s())?;
                }
                Incoming::Transport(t) => {
                    if let Some(r) = peer.session.open_transport(&peer.me, &t, now_s()) {
                        r?;
                    }
                }
            }
        }
        if !peer.session.is_established() {
            bail!("a contact's session was not established by our answer");
        }
    }
    let peer = peers.first_mut().context("at least one contact")?;
    let batch = 64;
    // The first batch also indexes every contact's sessions; it is not timed.
    let mut take = |n: usize, seq: &mut u64| -> Result<Vec<Envelope>> {
        (0..n)
            .map(|_| {
                *seq += 1;
                let p = peer.session.seal(
                    &peer.me,
                    &peer.card,
                    &text(*seq, "a line of chat, as long as they usually are"),
                    now_s(),
                    &mut rand_core::OsRng,
                )?;
                Ok(envelope(p))
            })
            .collect()
    };
    let mut seq = 1;
    engine.receive(take(batch, &mut seq)?).await?;
    let mut spent = Duration::ZERO;
    let mut taken = 0;
    while taken < messages {
        let envelopes = take(batch, &mut seq)?;
        let started = Instant::now();
        engine.receive(envelopes).await?;
        spent += started.elapsed();
        taken += batch;
    }
    let message_us = spent.as_secs_f64() * 1e6 / taken as f64;
    // Junk: a packet of the smallest size class, random after its version byte. No
    // session expects its tag, so it is tried as a first message (one handshake), and
    // then on every session within the small allowance, dropped beyond it.
    let junk: Vec<Envelope> = (0..messages)
        .map(|_| {
            let mut p = vec![0u8; session::SIZE_CLASSES[0]];
            rand::thread_rng().fill_bytes(&mut p);
            p[0] = session::PACKET_VERSION;
            envelope(p)
        })
        .collect();
    let started = Instant::now();
    for chunk in junk.chunks(batch) {
        engine.receive(chunk.to_vec()).await?;
    }
    let junk_us = started.elapsed().as_secs_f64() * 1e6 / junk.len() as f64;
    engine.shutdown().await?;
    Ok(json!({
        "contacts": contacts,
        "message_us": message_us,
        "junk_us": junk_us,
    }))
}
