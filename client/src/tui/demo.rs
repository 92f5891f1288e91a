//! `kkachi demo`: the whole idea on one machine, in one command. Three relays run in
//! this process (in memory), a second user ("Kkachi") answers every message, and the
//! UI opens with keys to take relays down and bring them back while chatting.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use kkachi_protocol::Multiaddr;
use kkachi_relay::config::Config;
use kkachi_relay::store::{Limits, MemoryStore, Quota};
use kkachi_relay::{Metrics, RelayHandle};
use libp2p::identity::Keypair;
use tokio::sync::Mutex;

use super::RelaySwitch;
use crate::commands::CommandError;
use crate::engine::{AppEvent, Mode};
use crate::net::NetConfig;
use crate::net::Transport;
use crate::store::LocalStore;

/// One demo relay: its key and in-memory store outlive restarts.
#[derive(Debug)]
struct Slot {
    key: Keypair,
    store: MemoryStore,
    port: u16,
    running: Option<RelayHandle>,
}

/// The three relays of the demo.
#[derive(Debug)]
pub struct DemoRelays {
    slots: Mutex<Vec<Slot>>,
    /// The direct path between the two users is cut (F5).
    direct_cut: std::sync::atomic::AtomicBool,
    /// The second user's engine, whose side of the direct path F5 cuts too, and which
    /// tries a relay brought back at once.
    bot: std::sync::OnceLock<crate::engine::Engine<crate::net::Network>>,
}

fn loopback_net() -> NetConfig {
    NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid")],
        lan: false,
        direct: true,
        circuits: false,
    }
}

fn free_port() -> Result<u16, CommandError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_slot(slot: &mut Slot, i: usize) -> Result<Multiaddr, CommandError> {
    let config = Config {
        data_dir: PathBuf::new(),
        listen: vec![
            format!("/ip4/127.0.0.1/tcp/{}", slot.port)
                .parse()
                .expect("valid"),
        ],
        info: kkachi_relay::config::InfoConfig {
            name: format!("demo-{}", i + 1),
            operator: "kkachi demo".into(),
            failure_domain: format!("demo/zone-{}", i + 1),
        },
        ..Config::default()
    };
    let mut handle =
        kkachi_relay::start_with(config, slot.key.clone(), slot.store.clone(), Metrics::new())
            .await
            .map_err(|e| CommandError::Refused(format!("demo relay {}: {e}", i + 1)))?;
    let addr = handle.wait_listening(1).await.remove(0);
    slot.running = Some(handle);
    Ok(addr)
}

impl DemoRelays {
    async fn start() -> Result<(Arc<Self>, Vec<Multiaddr>), CommandError> {
        let mut slots = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..3 {
            let mut slot = Slot {
                key: Keypair::generate_ed25519(),
                store: MemoryStore::new(Limits::uniform(Quota {
                    max_envelopes: 100_000,
                    max_bytes: 1 << 30,
                })),
                port: free_port()?,
                running: None,
            };
            addrs.push(start_slot(&mut slot, i).await?);
            slots.push(slot);
        }
        Ok((
            Arc::new(Self {
                slots: Mutex::new(slots),
                direct_cut: Default::default(),
                bot: Default::default(),
            }),
            addrs,
        ))
    }
}

impl RelaySwitch for DemoRelays {
    fn connect(&self, you: crate::net::Network) -> BoxFuture<'static, ()> {
        let bot = self.bot.get().cloned();
        async move {
            let Some(bot) = bot else { return };
            // The other user's device, as the network knows it.
            let peer = bot.net().local_peer();
            // The other user listens on loopback only: as two people on one network.
            for _ in 0..50 {
                for addr in &bot.net().listen_addrs() {
                    let addr = addr.clone().with(libp2p::multiaddr::Protocol::P2p(peer));
                    if you.connect_contact(peer, addr).await.is_ok() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tracing::warn!("the demo's users could not connect directly");
        }
        .boxed()
    }

    fn toggle_direct(&self) -> bool {
        let cut = !self.direct_cut.load(std::sync::atomic::Ordering::Relaxed);
        self.direct_cut
            .store(cut, std::sync::atomic::Ordering::Relaxed);
        if let Some(bot) = self.bot.get() {
            bot.net().set_direct_cut(cut);
        }
        cut
    }

    fn toggle(&self, n: usize) -> BoxFuture<'_, String> {
        async move {
            let mut slots = self.slots.lock().await;
            let Some(slot) = slots.get_mut(n) else {
                return format!("there is no relay {}", n + 1);
            };
            match slot.running.take() {
                Some(handle) => {
                    let _ = handle.shutdown().await;
                    format!(
                        "relay demo-{} is DOWN: keep chatting, nothing is lost",
                        n + 1
                    )
                }
                None => match start_slot(slot, n).await {
                    Ok(_) => {
                        if let Some(bot) = self.bot.get() {
                            bot.retry_now();
                        }
                        format!("relay demo-{} is back up", n + 1)
                    }
                    Err(e) => format!("could not restart relay {}: {e}", n + 1),
                },
            }
        }
        .boxed()
    }
}

/// What the second user can see of the network when it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    /// Its relays that are up.
    relays_up: usize,
    /// Connected to you directly (and the path not cut).
    direct: bool,
}

/// The second user's answer to message number `count`, `text`: how it came, and what
/// to try next from where things stand.
fn reply_to(text: &str, count: usize, seen: Seen) -> String {
    let how = match (seen.relays_up, seen.direct) {
        (0, true) => " directly: no relay is up, and we still talk",
        (0, false) => "",
        (_, false) => " through the relays",
        (_, true) => "",
    };
    let next = match (seen.relays_up, seen.direct) {
        (3, true) if count == 1 => {
            "Each message goes to all three relays at once, and to me directly (\"direct 1\" below). Press F2, F3 or F4 to take a relay down, and keep writing."
        }
        (3, true) => "Press F2, F3 or F4 to take a relay down, and keep writing.",
        (1 | 2, true) => "Take the others down too: we still talk directly (NO RELAY).",
        (0, true) => {
            "Now F5 cuts the direct path too: your messages then wait in the outbox (OFFLINE) and go out when a relay returns."
        }
        (_, false) => "F5 again brings the direct path back.",
        _ => "",
    };
    let greeting = if count == 1 { "안녕! " } else { "" };
    format!("{greeting}I got \"{text}\"{how}. {next}")
        .trim_end()
        .to_string()
}

/// Runs the demo until the UI quits.
pub async fn run() -> Result<(), CommandError> {
    let root = tempfile::Builder::new().prefix("kkachi-demo-").tempdir()?;
    let (relays, addrs) = DemoRelays::start().await?;
    let (you_store, _, you_card) = LocalStore::provision(&root.path().join("you"), "You", &addrs)?;
    let (bot_store, bot_me, bot_card) =
        LocalStore::provision(&root.path().join("kkachi"), "Kkachi", &addrs)?;
    you_store.add_card(&bot_card)?;
    bot_store.add_card(&you_card)?;
    drop(you_store);

    let bot = crate::runtime::start_engine(bot_store, bot_me, loopback_net(), Mode::ONLINE)?;
    let _ = relays.bot.set(bot.clone());
    // Your device, as the bot's network knows it.
    let you_device = you_card.identity().transport_peer();
    let responder = {
        let bot = bot.clone();
        let cut = relays.clone();
        let relay_peers: Vec<kkachi_protocol::PeerId> =
            addrs.iter().filter_map(crate::net::peer_of).collect();
        let mut events = bot.subscribe();
        tokio::spawn(async move {
            let mut count = 0;
            while let Ok(event) = events.recv().await {
                let AppEvent::Message(r) = event else {
                    continue;
                };
                if r.change.is_some() {
                    continue; // an edit, delete or reaction: nothing to answer
                }
                count += 1;
                tokio::time::sleep(Duration::from_millis(400)).await;
                let connected = bot.net().connected();
                let seen = Seen {
                    relays_up: relay_peers.iter().filter(|p| connected.contains(p)).count(),
                    direct: !cut.direct_cut.load(std::sync::atomic::Ordering::Relaxed)
                        && you_device.is_some_and(|d| connected.contains(&d)),
                };
                let _ = bot
                    .send(r.contact, reply_to(&r.message.text, count, seen))
                    .await;
            }
        })
    };
    // A first message from the bot, so the conversation is open on start.
    let hello = "Hi! I'm a second user on this machine. Write me something.";
    let _ = bot
        .send(you_card.identity().peer_id(), hello.to_owned())
        .await;
    let switch: Arc<dyn RelaySwitch> = relays.clone();
    let result = super::run_with(&root.path().join("you"), loopback_net(), Some(switch)).await;
    responder.abort();
    let _ = bot.shutdown().await;
    let slots = std::mem::take(&mut *relays.slots.lock().await);
    for slot in slots {
        if let Some(h) = slot.running {
            let _ = h.shutdown().await;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_second_user_says_how_a_message_came_and_what_to_try_from_there() {
        let seen = |relays_up, direct| Seen { relays_up, direct };
        let all = reply_to("hi", 1, seen(3, true));
        assert!(all.starts_with("안녕! I got \"hi\". Each message"), "{all}");
        assert!(reply_to("x", 2, seen(2, true)).contains("Take the others down too"));
        let direct = reply_to("x", 3, seen(0, true));
        assert!(
            direct.contains("directly: no relay is up") && direct.contains("F5"),
            "{direct}"
        );
        let relays = reply_to("x", 4, seen(1, false));
        assert!(
            relays.contains("through the relays") && relays.contains("F5 again"),
            "{relays}"
        );
    }
}
