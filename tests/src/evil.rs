//! A hostile contact, driven by the test: a real identity, card and end-to-end session
//! with its victim, sending authenticated content no honest client would (any sequence
//! number, wrong hash chains, odd kinds, floods, replays, forged cards). It puts
//! envelopes straight into the victim's relays and reads the victim's answers from its
//! own relay, so its session with the victim becomes established like anyone's.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kkachi_protocol::envelope::DEFAULT_TTL_SECS;
use kkachi_protocol::multiaddr::Protocol;
use kkachi_protocol::session::{self, Incoming};
use kkachi_protocol::wire::{Addressed, PutOutcome};
use kkachi_protocol::{
    Card, ClientToRelay, Content, Envelope, ErrorCode, Identity, Multiaddr, PeerId, QueueKind,
    ReadKey, RelayToClient, Session, WriteKey,
};
use kkachi_relay::client::MailboxClient;

/// Unix seconds now.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The relay an address ends with.
fn relay_peer(addr: &Multiaddr) -> PeerId {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => peer,
        _ => panic!("relay address {addr} without /p2p/"),
    }
}

/// The hostile contact.
#[derive(Debug)]
pub struct EvilPeer {
    me: Identity,
    card: Card,
    session: Session,
    /// A client of each of the victim's relays, with our capability there and the
    /// contact-request capability of the victim's card.
    to_victim: Vec<(MailboxClient, WriteKey, Option<WriteKey>)>,
    own: MailboxClient,
    own_key: ReadKey,
    cursor: u64,
    /// Everything put so far, in order.
    pub sent: Vec<Envelope>,
}

impl EvilPeer {
    /// A new identity named `name` whose inbox is `own_relay`, with a session towards
    /// the owner of `victim_invite`.
    pub async fn new(name: &str, own_relay: &str, victim_invite: &str) -> Self {
        let me = Identity::generate();
        let own_relay: Multiaddr = own_relay.parse().expect("relay address");
        let card = Card::new(&me, name, vec![own_relay.clone()], 1).expect("card");
        let victim = Card::from_invite(victim_invite).expect("victim's invite");
        let mut to_victim = Vec::new();
        for relay in victim.relays() {
            // A throwaway transport identity for puts, as senders may use.
            let throwaway = libp2p::identity::Keypair::generate_ed25519();
            let peer = relay_peer(relay);
            to_victim.push((
                MailboxClient::connect(throwaway, relay.clone())
                    .await
                    .expect("victim's relay reachable"),
                me.write_key_for(victim.identity(), &peer),
                victim.request_key_at(&peer).copied(),
            ));
        }
        let own_peer = relay_peer(&own_relay);
        let own = MailboxClient::connect(libp2p::identity::Keypair::generate_ed25519(), own_relay)
            .await
            .expect("own relay reachable");
        // Our inbox takes the victim's answers, as any client's would.
        let own_key = me.inbox_key(&own_peer);
        let grants = [
            (QueueKind::Requests, me.request_write_key(&own_peer, 0).id()),
            (
                QueueKind::Inbox,
                me.grant_for(victim.identity(), &own_peer).id(),
            ),
        ];
        for (kind, id) in grants {
            let answer = own.grant(&own_key, kind, vec![id]).await;
            assert!(
                matches!(answer, Ok(RelayToClient::Granted { .. })),
                "{answer:?}"
            );
        }
        Self {
            session: Session::new(*victim.identity().x25519()),
            me,
            card,
            to_victim,
            own,
            own_key,
            cursor: 0,
            sent: Vec::new(),
        }
    }

    /// Its invite code (for the victim to add it as a contact).
    pub fn invite(&self) -> String {
        self.card.to_invite()
    }

    /// Its identity.
    pub fn identity(&self) -> &Identity {
        &self.me
    }

    /// Seals `content` through the session and puts it on every relay of the victim.
    pub async fn send(&mut self, content: &Content) -> Envelope {
        let packet = self
            .session
            .seal(
                &self.me,
                &self.card,
                &content.encode(),
                now(),
                &mut rand_core::OsRng,
            )
            .expect("seal");
        let envelope = Envelope {
            expires_at: now() + DEFAULT_TTL_SECS,
            payload: packet,
        };
        self.put(envelope.clone()).await;
        envelope
    }

    /// Puts `envelope` as it is on every relay of the victim: with our capability,
    /// or through the victim's contact-request capability where it grants us none.
    pub async fn put(&mut self, envelope: Envelope) {
        for (client, ours, request) in &self.to_victim {
            for write in std::iter::once(*ours).chain(*request) {
                let items = vec![Addressed {
                    write,
                    envelope: envelope.clone(),
                }];
                let answer = client.put(items).await;
                let no_queue = matches!(&answer, Ok(RelayToClient::Stored { outcomes, .. })
                    if matches!(outcomes.first(), Some(PutOutcome::Rejected { code: ErrorCode::NoQueue, .. })));
                if !no_queue {
                    break;
                }
            }
        }
        self.sent.push(envelope);
    }

    /// Reads what the victim sent (receipts carrying handshake answers), so the
    /// session becomes established. Returns how many packets opened.
    pub async fn read_answers(&mut self) -> usize {
        let mut opened = 0;
        loop {
            let Ok(RelayToClient::Batch { items, next, more }) =
                self.own.fetch(&self.own_key, self.cursor, 256).await
            else {
                return opened;
            };
            self.cursor = next;
            let ids = items.iter().map(|i| i.envelope.id()).collect();
            for item in items {
                match session::open(&self.me, &item.envelope.payload) {
                    Ok(Incoming::Init(init)) => {
                        opened +=
                            usize::from(self.session.accept_init(&self.me, init, now()).is_ok());
                    }
                    Ok(Incoming::Transport(t)) => {
                        opened += usize::from(matches!(
                            self.session.open_transport(&self.me, &t, now()),
                            Some(Ok(_))
                        ));
                    }
                    Err(_) => {}
                }
            }
            let key = self.own_key.clone();
            let _ = self.own.request(ClientToRelay::Delete { key, ids }).await;
            if !more {
                return opened;
            }
        }
    }

    /// Reads answers until the session is established (or `within` passes).
    pub async fn establish(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while !self.session.is_established() && tokio::time::Instant::now() < deadline {
            self.read_answers().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.session.is_established()
    }
}
