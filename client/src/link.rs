//! Adding a device to the account over the local network, or through a relay (SPEC
//! §15.1).
//!
//! The device that has the account listens and shows a one-time code (a secret and its
//! addresses); the new device connects, and both prove they hold the code (a Noise
//! `NNpsk0` handshake, then a first channel message from the new device, which a
//! recorded handshake replayed cannot make) before anything else is said. Both then
//! show the handshake's safety number, and the old device's user confirms the new one
//! shows the same before anything more is sent (someone else who saw the code shows
//! another). The account then goes over in the stream a backup holds (§11), sealed
//! message by message; the new device restores it beside its home as a restore does,
//! as a device of its own (a session key of its own, listed beside the old one), and
//! says so with its key and name. Only then does the old device list it, durably, and
//! confirm; only on that confirmation does the new home take its place, which it tells
//! the old device last. Both then act for the account. A transfer broken anywhere
//! leaves the old device as it was, or (the confirmation lost) listing a device its
//! user checks, and takes out if it holds nothing.
//!
//! Everything the other end sends is bounded (a message is at most 64 KiB by its
//! length field, a handshake message exactly 48 bytes, records as a restore bounds
//! them) and waited for only so long, whole: a connection that trickles bytes is
//! dropped when its time is up. Connections are checked for the code on threads of
//! their own, a few at once, so none holds up the device that has it.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kkachi_protocol::link::{
    Channel, LINK_ANSWER_LEN, LINK_FIRST_LEN, LINK_HELLO_LEN, LinkCode, LinkError, MAX_LINK_CHUNK,
    MAX_LINK_MESSAGE,
};
use thiserror::Error;

use kkachi_protocol::Multiaddr;

use crate::backup::{BackupError, Counts, Ending, Restored};
use crate::store::{LocalStore, StoreError};

/// How long a connection may take to prove it holds the code (its first message, then
/// its hello), from when it was accepted, whatever it sends meanwhile.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long any later message may take before the transfer is given up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the new device waits for the account to start coming: its user compares
/// the safety number and confirms on the old device meanwhile.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the old device waits for the new one to restore what it was sent.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the old device waits to hear that the new home is in place.
const PLACED_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the new device tries each address of the code.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the new device tries each address of a code that also names a relay.
const CONNECT_TIMEOUT_BEFORE_RELAY: Duration = Duration::from_secs(2);
/// How long the handshake through a relay may take, from the new device's end (each
/// message a put and a poll away).
const RELAY_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a wait looks whether it was cancelled.
const CANCEL_CHECK: Duration = Duration::from_millis(200);
/// How long a connection may take to send its first message.
const FIRST_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections checked at once; past it, the oldest is cut off.
const MAX_CHECKING: usize = 64;
/// Connections from one source (an IPv4 address, an IPv6 /64) checked at once; more
/// from it are dropped at once (so nobody holds the offer up by opening connections and
/// saying nothing).
const MAX_CHECKING_PER_ADDRESS: usize = 4;
/// Connections taken from one listener before the offer looks at anything else.
const ACCEPTS_PER_PASS: usize = 16;
/// The new device restored the account: `READY ‖ its session key (32) ‖ u8 len ‖ its
/// name`.
const READY: u8 = 1;
/// The old device listed the new one among the account's devices: `DONE`.
const DONE: u8 = 2;
/// The new home is in place: `PLACED`.
const PLACED: u8 = 3;

/// Why linking failed. Each message says what a person can do.
#[derive(Debug, Error)]
pub enum LinkFailure {
    /// The code, or the channel it opens.
    #[error(transparent)]
    Code(#[from] LinkError),
    /// Restoring what came (or the new home).
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The local store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No device holding the code answered at any of its addresses.
    #[error(
        "no device answered with this code at {tried}: is `kkachi device link` still running on your other device{}? (a code holds while it runs)",
        if *relayed { "" } else { ", on the same network" }
    )]
    NoAnswer {
        /// Each place tried, and what happened there.
        tried: String,
        /// Whether the code names a relay (the devices need not share a network).
        relayed: bool,
    },
    /// The code ran out before a device took the account.
    #[error(
        "no device took the account while the code held ({0}): run `kkachi device link` again for a new code"
    )]
    TimedOut(String),
    /// The transfer broke off.
    #[error("the transfer broke off: {0}")]
    BrokeOff(String),
    /// The name asked for this device is not one a device may have.
    #[error("that name cannot be this device's ({0}): give another with --name")]
    BadName(String),
    /// The old device sent nothing: its user did not confirm this one.
    #[error(
        "the other device did not send your account: its user did not confirm this device (the safety numbers must match), or its offer ended"
    )]
    NotAccepted,
    /// What came is not an account.
    #[error("what the other device sent is not a kkachi account: nothing was kept")]
    NotAnAccount,
    /// The other device runs a newer kkachi.
    #[error(
        "the other device runs a newer kkachi (it sends version {0} of the account): update kkachi on this device"
    )]
    Newer(u8),
    /// Listening or connecting.
    #[error("{0}")]
    Io(String),
    /// Its user stopped the offer.
    #[error("cancelled: the code no longer works, and this device still holds your account")]
    Cancelled,
}

/// Something the old device saw while it waited, for its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A connection that did not prove it holds the code was dropped.
    WrongCode(Via),
    /// A device with the code connected; the account is going over.
    Sending(Via),
    /// A device with the code connected, and the user did not confirm it: it was sent
    /// nothing.
    Declined(Via),
    /// A transfer broke off; the code still holds.
    BrokeOff(Via, String),
}

/// Where the other device is: an address on the network, or behind a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// Connected directly, from or to this address.
    Direct(SocketAddr),
    /// Through the relay at this address.
    Relay(String),
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Direct(addr) => write!(f, "{addr}"),
            // A code's relay address is anyone's text.
            Self::Relay(relay) => write!(f, "relay {}", crate::sanitize::for_terminal(relay)),
        }
    }
}

/// What the old device sent, and to which device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handed {
    /// The new device's session key.
    pub to: [u8; 32],
    /// The new device's name, as it gave it.
    pub name: String,
    /// What went over.
    pub counts: Counts,
    /// Where the new device connected from.
    pub from: Via,
    /// Whether the new device said its home is in place (if not, it may have stopped
    /// before: its user checks it before this home goes).
    pub confirmed: bool,
}

/// A code being offered: the listening sockets, the relay, and the code that names
/// them.
#[derive(Debug)]
pub struct Offer {
    code: LinkCode,
    listeners: Vec<TcpListener>,
    relay: Option<relay::Listening>,
    /// Set to end the offer at its next pass.
    stop: Arc<std::sync::atomic::AtomicBool>,
}

/// The order in which a code lists this machine's addresses: a private network's
/// first (what a home or office LAN uses), then link-local IPv4 (a LAN with no router
/// hands out none other), then the rest; never loopback, nor IPv6 link-local (an
/// address that needs its interface named).
fn rank(ip: &IpAddr) -> Option<u8> {
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() || v4.is_unspecified() || v4.is_multicast() => None,
        IpAddr::V4(v4) if v4.is_private() => Some(0),
        IpAddr::V4(v4) if v4.is_link_local() => Some(1),
        IpAddr::V4(_) => Some(2),
        IpAddr::V6(v6) if v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() => None,
        IpAddr::V6(v6) if v6.is_unicast_link_local() => None,
        IpAddr::V6(v6) if v6.is_unique_local() => Some(3),
        IpAddr::V6(_) => Some(4),
    }
}

/// `interfaces` in the order a code lists them, each once.
fn ordered(interfaces: &[IpAddr]) -> Vec<IpAddr> {
    let mut ranked: Vec<(u8, IpAddr)> = interfaces
        .iter()
        .filter_map(|ip| rank(ip).map(|r| (r, *ip)))
        .collect();
    ranked.sort();
    ranked.dedup();
    ranked.into_iter().map(|(_, ip)| ip).collect()
}

impl Offer {
    /// Listens on `listen`, or (if it is empty) on each address of `interfaces` a code
    /// lists (see [`rank`]; loopback alone if there is none), and makes a code naming
    /// where. An unspecified address in `listen` is listened on as given and named by
    /// the addresses of `interfaces`.
    pub fn new(listen: &[SocketAddr], interfaces: &[IpAddr]) -> Result<Self, LinkFailure> {
        let ours = ordered(interfaces);
        let mut wanted: Vec<SocketAddr> = listen.to_vec();
        if wanted.is_empty() {
            wanted = ours
                .iter()
                .take(kkachi_protocol::link::MAX_LINK_ADDRS)
                .map(|ip| SocketAddr::new(*ip, 0))
                .collect();
        }
        if wanted.is_empty() {
            wanted.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0));
        }
        let mut listeners = Vec::new();
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for want in &wanted {
            let failed =
                |e: std::io::Error| LinkFailure::Io(format!("cannot listen on {want}: {e}"));
            let listener = TcpListener::bind(want).map_err(failed)?;
            let bound = listener.local_addr().map_err(failed)?;
            listener.set_nonblocking(true).map_err(failed)?;
            let named: Vec<SocketAddr> = if bound.ip().is_unspecified() {
                let matching: Vec<SocketAddr> = ours
                    .iter()
                    .filter(|ip| ip.is_ipv4() == bound.is_ipv4())
                    .map(|ip| SocketAddr::new(*ip, bound.port()))
                    .collect();
                if matching.is_empty() {
                    vec![SocketAddr::new(
                        if bound.is_ipv4() {
                            IpAddr::V4(Ipv4Addr::LOCALHOST)
                        } else {
                            IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
                        },
                        bound.port(),
                    )]
                } else {
                    matching
                }
            } else {
                vec![bound]
            };
            for addr in named {
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
            listeners.push(listener);
        }
        // Room for a relay.
        addrs.truncate(kkachi_protocol::link::MAX_LINK_ADDRS - 1);
        let code = LinkCode::generate(&mut rand_core::OsRng, addrs, None)?;
        Ok(Self {
            code,
            listeners,
            relay: None,
            stop: Arc::default(),
        })
    }

    /// An offer (listening as [`Offer::new`] does, given `listen` and its interfaces)
    /// that also waits on one of `relays` (each with the access token its operator
    /// gave, if any): the first that opens the code's queues. Without `listen` the code
    /// names the relay alone, and fails if none opens; with it, an offer no relay holds
    /// is made all the same, and why none does is told.
    pub async fn through_relay(
        listen: Option<(&[SocketAddr], &[IpAddr])>,
        relays: &[(Multiaddr, Vec<u8>)],
    ) -> Result<(Self, Option<String>), LinkFailure> {
        if listen.is_none() && relays.is_empty() {
            return Err(LinkFailure::Io(
                "this account has no relay to link through: add one (`kkachi relay add`), or leave out --relay-only to link over the local network".into(),
            ));
        }
        // Only a relay a code can name (its address short enough, ending in its id).
        let mut failed = Vec::new();
        let mut usable = Vec::new();
        for (addr, token) in relays {
            match kkachi_protocol::link::check_relay(addr) {
                Ok(()) => usable.push((addr, token)),
                Err(e) => failed.push(format!("{addr}: {e}")),
            }
        }
        let mut offer = match (listen, usable.first()) {
            (Some((listen, interfaces)), _) => Self::new(listen, interfaces)?,
            (None, Some((first, _))) => Self {
                code: LinkCode::generate(
                    &mut rand_core::OsRng,
                    Vec::new(),
                    Some((*first).clone()),
                )?,
                listeners: Vec::new(),
                relay: None,
                stop: Arc::default(),
            },
            (None, None) => {
                return Err(LinkFailure::Io(format!(
                    "no relay could hold the link: {}",
                    failed.join("; ")
                )));
            }
        };
        let net = relay::network().map_err(LinkFailure::Io)?;
        let queues = offer.code.queues();
        for (addr, token) in usable {
            match relay::open(&net, addr, &queues, token).await {
                Ok(chunk) => {
                    offer.code = offer.code.with_relay(Some(addr.clone()))?;
                    offer.relay = Some(relay::listen(
                        tokio::runtime::Handle::current(),
                        net,
                        addr.clone(),
                        queues,
                        chunk,
                    ));
                    return Ok((offer, None));
                }
                Err(why) => failed.push(format!("{addr}: {why}")),
            }
        }
        if offer.listeners.is_empty() {
            return Err(LinkFailure::Io(format!(
                "no relay could hold the link: {}",
                failed.join("; ")
            )));
        }
        offer.code = offer.code.with_relay(None)?;
        let why = if failed.is_empty() {
            "this account has no relay".into()
        } else {
            failed.join("; ")
        };
        Ok((offer, Some(why)))
    }

    /// What ends the offer at its next pass, once set (not a transfer under way).
    pub fn stopper(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.stop.clone()
    }

    /// The relay the code names, if any.
    pub fn relay(&self) -> Option<&Multiaddr> {
        self.relay.as_ref().map(relay::Listening::relay)
    }

    /// The code to show.
    pub fn code(&self) -> &LinkCode {
        &self.code
    }

    /// Whether the code reaches this machine only (it names loopback addresses only).
    pub fn loopback_only(&self) -> bool {
        self.code.relay().is_none() && self.code.addrs().iter().all(|a| a.ip().is_loopback())
    }

    /// Waits `wait` for a device holding the code, sends it the account in `store`,
    /// and records that this home handed it over. `confirm` is asked first, with where
    /// the device is and the safety number of its handshake (the new device shows its
    /// own: the same, unless someone else who holds the code connected instead); a
    /// device it does not confirm is sent nothing. `seen` hears what happens meanwhile.
    /// Connections are checked on threads of their own (at most [`MAX_CHECKING`] at
    /// once, the oldest cut off past it; [`MAX_CHECKING_PER_ADDRESS`] from one source;
    /// each for at most [`HANDSHAKE_TIMEOUT`]), so none holds up another for long.
    /// Blocks: run it off the async runtime.
    pub fn serve(
        self,
        store: &LocalStore,
        wait: Duration,
        confirm: impl FnMut(&Via, &str) -> bool,
        seen: impl FnMut(Seen),
    ) -> Result<Handed, LinkFailure> {
        let handed = serve(&self, store, wait, confirm, seen);
        if let Some(relay) = self.relay {
            relay.close();
        }
        handed
    }
}

/// [`Offer::serve`], on its parts.
fn serve(
    offer: &Offer,
    store: &LocalStore,
    wait: Duration,
    mut confirm: impl FnMut(&Via, &str) -> bool,
    mut seen: impl FnMut(Seen),
) -> Result<Handed, LinkFailure> {
    let (code, listeners, relay) = (&offer.code, &offer.listeners, offer.relay.as_ref());
    let deadline = Instant::now() + wait;
    let (checked_tx, checked) = mpsc::channel::<(Via, Result<(Conn, Channel), LinkFailure>)>();
    let checking = Checking::default();
    loop {
        if offer.stop.load(Ordering::SeqCst) {
            return Err(LinkFailure::Cancelled);
        }
        if Instant::now() >= deadline {
            let secs = u32::try_from(wait.as_secs()).unwrap_or(u32::MAX);
            return Err(LinkFailure::TimedOut(crate::commands::describe_duration(
                secs,
            )));
        }
        let mut idle = true;
        // Streams through the relay: as many as started (the relay's end bounds them).
        while let Some(mut pipe) = relay.and_then(|r| r.streams.try_recv().ok()) {
            idle = false;
            let from = Via::Relay(pipe.relay().to_string());
            if pipe.ended() {
                // Dropped for newer streams before this pass.
                seen(Seen::WrongCode(from));
                continue;
            }
            let (code, tx) = (code.clone(), checked_tx.clone());
            let checking = std::thread::Builder::new().spawn(move || {
                let _ = tx.send((from, check(&code, Conn::relay(pipe))));
            });
            if let Err(e) = checking {
                tracing::warn!(error = %e, "a link stream was not checked");
            }
        }
        for listener in listeners {
            // A bounded number each pass, so results are read and the deadline
            // checked whatever comes in.
            for _ in 0..ACCEPTS_PER_PASS {
                let (stream, from) = match listener.accept() {
                    Ok(conn) => conn,
                    Err(e) => {
                        if e.kind() != std::io::ErrorKind::WouldBlock {
                            tracing::debug!(error = %e, "a link connection failed");
                        }
                        break;
                    }
                };
                idle = false;
                let Some(id) = checking.admit(from, &stream) else {
                    // That address has as many being checked as it may.
                    drop(stream);
                    seen(Seen::WrongCode(Via::Direct(from)));
                    continue;
                };
                let (code, tx, done) = (code.clone(), checked_tx.clone(), checking.clone());
                std::thread::spawn(move || {
                    let result = Conn::new(stream).and_then(|conn| check(&code, conn));
                    done.release(id, from);
                    let _ = tx.send((Via::Direct(from), result));
                });
            }
        }
        while let Ok((from, result)) = checked.try_recv() {
            idle = false;
            let (conn, channel) = match result {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%from, error = %e, "a link connection did not prove it holds the code");
                    seen(Seen::WrongCode(from));
                    continue;
                }
            };
            if Instant::now() >= deadline {
                // Ran out while others were asked about: this one is too late.
                break;
            }
            // Proven: a stream through the relay is no longer pushed out by newer ones.
            conn.hold();
            if !confirm(&from, &channel.safety_number()) {
                seen(Seen::Declined(from));
                continue;
            }
            seen(Seen::Sending(from.clone()));
            match add_device(store, conn, channel) {
                Ok((to, name, counts, confirmed)) => {
                    return Ok(Handed {
                        to,
                        name,
                        counts,
                        from,
                        confirmed,
                    });
                }
                Err(e @ LinkFailure::Store(_)) => return Err(e),
                Err(e) => seen(Seen::BrokeOff(from, e.to_string())),
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether the connection `conn` holds the code: its first message opens under the
/// code (within [`FIRST_TIMEOUT`]: a device that has the code sends it at once), and
/// its hello (which only the one who made that first message can seal) comes next; all
/// within [`HANDSHAKE_TIMEOUT`] of now.
fn check(code: &LinkCode, mut conn: Conn) -> Result<(Conn, Channel), LinkFailure> {
    let started = Instant::now();
    let first = conn.read_until(started + FIRST_TIMEOUT, LINK_FIRST_LEN)?;
    let (answered, answer) = code.answer(&first)?;
    conn.write(&answer)?;
    let hello = conn.read_until(started + HANDSHAKE_TIMEOUT, LINK_HELLO_LEN)?;
    Ok((conn, answered.hello(&hello)?))
}

/// The connections being checked: how many from each source, and (oldest first) a
/// handle on each, to cut the oldest off when the most are being checked.
#[derive(Clone, Default)]
struct Checking {
    inner: Arc<parking_lot::Mutex<CheckingInner>>,
}

#[derive(Default)]
struct CheckingInner {
    next: u64,
    by_source: std::collections::HashMap<IpAddr, usize>,
    live: std::collections::VecDeque<(u64, TcpStream)>,
}

/// Where a connection comes from, for counting: an IPv4 address, or an IPv6 /64 (one
/// host easily holds a whole /64).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::V6(std::net::Ipv6Addr::from(o))
        }
        v4 => v4,
    }
}

impl Checking {
    /// Takes `stream` from `from` in to be checked, unless its source has as many
    /// being checked as it may; when the most are being checked, the oldest is cut off
    /// (a device that has the code answers in a moment: only one that does not is old).
    fn admit(&self, from: SocketAddr, stream: &TcpStream) -> Option<u64> {
        let mut inner = self.inner.lock();
        let n = inner.by_source.entry(source(from.ip())).or_default();
        if *n >= MAX_CHECKING_PER_ADDRESS {
            return None;
        }
        *n += 1;
        if inner.live.len() >= MAX_CHECKING
            && let Some((_, oldest)) = inner.live.pop_front()
        {
            let _ = oldest.shutdown(std::net::Shutdown::Both);
        }
        let id = inner.next;
        inner.next += 1;
        if let Ok(handle) = stream.try_clone() {
            inner.live.push_back((id, handle));
        }
        Some(id)
    }

    /// Connection `id` from `from` was checked.
    fn release(&self, id: u64, from: SocketAddr) {
        let mut inner = self.inner.lock();
        inner.live.retain(|(live, _)| *live != id);
        let key = source(from.ip());
        if let Some(n) = inner.by_source.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                inner.by_source.remove(&key);
            }
        }
    }
}

/// Sends the account over `channel`, waits for the new device's word that it holds
/// it, lists it among the account's devices durably, confirms, and waits to hear the
/// new home is in place: the new device's key and name, what went, and whether it was
/// heard.
fn add_device(
    store: &LocalStore,
    conn: Conn,
    channel: Channel,
) -> Result<([u8; 32], String, Counts, bool), LinkFailure> {
    let mut out = Sealing {
        conn,
        channel,
        buf: Vec::with_capacity(MAX_LINK_CHUNK),
        failed: None,
    };
    let counts = crate::backup::write_contents(store, &mut out, |e| {
        BackupError::Io(format!("sending the account: {e}"))
    });
    let counts = match (counts, out.failed.take()) {
        (Ok(counts), _) => counts,
        // The connection failed (whatever the store made of it): the code holds still.
        (Err(_), Some(why)) => return Err(LinkFailure::from(why)),
        (Err(BackupError::Store(e)), None) => return Err(LinkFailure::Store(e)),
        (Err(other), None) => return Err(LinkFailure::BrokeOff(other.to_string())),
    };
    let Sealing {
        mut conn,
        mut channel,
        ..
    } = out;
    let ready = channel.open(&conn.read(RESTORE_TIMEOUT)?)?;
    let said = match ready.split_first() {
        Some((&READY, rest)) if rest.len() > 33 && rest.len() == 33 + usize::from(rest[32]) => {
            let key: [u8; 32] = rest[..32].try_into().expect("32 bytes");
            std::str::from_utf8(&rest[33..])
                .ok()
                .map(|name| (key, name.to_owned()))
        }
        _ => None,
    };
    let Some((to, name)) = said else {
        return Err(LinkFailure::BrokeOff(
            "the new device did not say it holds the account".into(),
        ));
    };
    let me = store.identity()?.ok_or(StoreError::Corrupt("identity"))?;
    if to == me.x25519_public()
        || store
            .own_devices(&me)?
            .is_some_and(|set| set.device(&to).is_some() || set.is_removed(&to))
    {
        return Err(LinkFailure::BrokeOff(
            "the new device kept a key this account holds already: it would act as another device"
                .into(),
        ));
    }
    // The commit: from here the account lists the new device beside this one (a name
    // the rules refuse, or an account that lists all it may, ends the link here).
    store
        .list_device(to, &name, crate::engine::now_ms() / 1000)
        .map_err(|e| match e {
            StoreError::Devices(why) => LinkFailure::BrokeOff(why),
            e => e.into(),
        })?;
    store.sync()?;
    // If the confirmation is lost, the new device does not take its home: this one
    // tells its user to check there (and to take the key out if it holds nothing), so
    // whether the new home is in place is asked, and told.
    // Through a relay, DONE stays there for the new device to read, whatever becomes of
    // this end (as bytes written to a connection reach its other end after it closes).
    conn.keep_sent();
    let confirmed = channel
        .seal(&[DONE])
        .map_err(LinkFailure::from)
        .and_then(|done| conn.write(&done).map_err(LinkFailure::from))
        .and_then(|()| Ok(channel.open(&conn.read(PLACED_TIMEOUT)?)?))
        .is_ok_and(|placed| placed == [PLACED]);
    Ok((to, name, counts, confirmed))
}

/// What the new device took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// What was restored.
    pub restored: Restored,
    /// Where the old device answered.
    pub from: Via,
}

/// Where a join stands, for what may cancel it: it is either cancelled before it tells
/// the old device it holds the account, or not cancelled at all.
#[derive(Debug, Default, Clone)]
pub struct JoinState(Arc<std::sync::atomic::AtomicU8>);

impl JoinState {
    const RUNNING: u8 = 0;
    const COMMITTING: u8 = 1;
    const CANCELLED: u8 = 2;

    /// From here the old device may let go of the account; false if it was cancelled
    /// first.
    fn commit(&self) -> bool {
        self.0
            .compare_exchange(
                Self::RUNNING,
                Self::COMMITTING,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }

    /// Whether the join was cancelled: what it waits for it waits for no more.
    fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst) == Self::CANCELLED
    }

    /// Cancels the join, unless it told the old device it holds the account already
    /// (false: it can only finish now). The join then stops within a moment, and
    /// says so to the old device (which would wait for it otherwise).
    pub fn cancel(&self) -> bool {
        self.0
            .compare_exchange(
                Self::RUNNING,
                Self::CANCELLED,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }
}

/// Takes the account offered under `code` into `home` (which must hold none), as a
/// device of the account named `device`, beside the one offering it. `connected`
/// hears where the old device answered and the safety number its user is to compare.
/// The home appears only once the old device confirmed it listed this one. Blocks:
/// run it off the async runtime.
pub fn join(
    home: &Path,
    code: &LinkCode,
    device: &str,
    connected: impl FnOnce(&Via, &str),
    state: &JoinState,
) -> Result<Joined, LinkFailure> {
    // Checked before anything is asked of the other device.
    let device = device.trim();
    kkachi_protocol::card::check_name(device).map_err(|e| LinkFailure::BadName(e.to_string()))?;
    let (joined, mut conn, mut channel) = crate::backup::restore_with(home, |staging| {
        let (conn, channel, from) = connect(code, state)?;
        connected(&from, &channel.safety_number());
        let mut input = Opening::new(conn, channel);
        let name = format!("the account from {from}");
        let restored = crate::backup::restore_into(staging, &name, Some(device), |sink| {
            crate::backup::read_contents(&mut input, &name, sink)
        })
        .map_err(|e| match e {
            // Nothing came: the old device's user did not confirm this one.
            e if input.opened == 0 && !matches!(e, BackupError::Store(_)) => {
                LinkFailure::NotAccepted
            }
            BackupError::Io(why) => LinkFailure::BrokeOff(why),
            BackupError::NotABackup(_) | BackupError::Header(_) => LinkFailure::NotAnAccount,
            BackupError::Newer(_, version) => LinkFailure::Newer(version),
            other => LinkFailure::Backup(other),
        })?;
        match restored.ending {
            Ending::Whole => {}
            Ending::CutShort => {
                return Err(LinkFailure::BrokeOff(format!(
                    "the connection closed after {} records: nothing was kept; run `kkachi device join` again while `kkachi device link` runs",
                    restored.counts.records
                )));
            }
            Ending::Damaged { .. } => return Err(LinkFailure::Code(LinkError::Tampered)),
        }
        if input.at != input.buf.len() {
            // Something after the end of the account, in its last message.
            return Err(LinkFailure::NotAnAccount);
        }
        if !restored.new_key {
            // It would act under the other device's key: two devices, one key.
            return Err(LinkFailure::BrokeOff(
                "your account lists as many devices as it may (8), or has signed every device record it may: take a device out first (`kkachi device remove` on the other device), or start a new identity".into(),
            ));
        }
        // The home may have changed while the account came: checked again before the
        // other device lets go of it.
        crate::backup::check_new_home(home)?;
        let Opening {
            mut conn,
            mut channel,
            ..
        } = input;
        let mut ready = vec![READY];
        ready.extend_from_slice(&restored.session_key);
        // At most a name's length, which fits a byte.
        ready.push(u8::try_from(device.len()).unwrap_or(u8::MAX));
        ready.extend_from_slice(device.as_bytes());
        // From here the other device may let go of the account: this one must not be
        // cancelled any more.
        if !state.commit() {
            return Err(LinkFailure::BrokeOff("cancelled".into()));
        }
        conn.write(&channel.seal(&ready)?)?;
        let done = conn.read(IDLE_TIMEOUT).map_err(|e| {
            LinkFailure::BrokeOff(format!(
                "the other device did not confirm it handed the account over ({}): nothing was kept here; run `kkachi device link` there again",
                io_why(&e)
            ))
        })?;
        if channel.open(&done)? != [DONE] {
            return Err(LinkFailure::BrokeOff(
                "the other device did not confirm it handed the account over".into(),
            ));
        }
        Ok((Joined { restored, from }, conn, channel))
    })?;
    // In place: the old device hears it (if not, it tells its user to check here).
    if let Ok(placed) = channel.seal(&[PLACED]) {
        let _ = conn.write(&placed).and_then(|()| conn.flush());
    }
    Ok(joined)
}

/// Connects to the first address of `code` where a device holding it answers (its
/// relay last), and proves this one holds it too (the handshake, then the hello).
fn connect(code: &LinkCode, state: &JoinState) -> Result<(Conn, Channel, Via), LinkFailure> {
    let mut failed = Vec::new();
    let mut refused = false;
    // With a relay to fall back on, an address that does not answer is given up sooner.
    let within = if code.relay().is_some() {
        CONNECT_TIMEOUT_BEFORE_RELAY
    } else {
        CONNECT_TIMEOUT
    };
    let direct = code.addrs().iter().map(|addr| {
        (
            Via::Direct(*addr),
            TcpStream::connect_timeout(addr, within)
                .map_err(|e| e.to_string())
                .and_then(|s| Conn::new(s).map_err(|e| e.to_string())),
        )
    });
    // Tried only once every address was: the relay learns nothing of a link that does
    // not need it.
    let relayed = code.relay().into_iter().map(|r| {
        (
            Via::Relay(r.to_string()),
            relay::connect(r, &code.queues()).map(Conn::relay),
        )
    });
    for (via, conn) in direct.chain(relayed) {
        let mut conn = match conn {
            Ok(c) => c.cancelled_by(state),
            Err(e) => {
                failed.push(format!("{via} ({e})"));
                continue;
            }
        };
        let deadline = Instant::now()
            + match via {
                Via::Direct(_) => HANDSHAKE_TIMEOUT,
                Via::Relay(_) => RELAY_HANDSHAKE_TIMEOUT,
            };
        let mut shake = || -> Result<Channel, LinkFailure> {
            let (joining, first) = code.join(&mut rand_core::OsRng);
            conn.write(&first)?;
            // The old device hangs up on a first message that does not hold its code
            // (through a relay, nothing waits under a wrong code: the put says so).
            let direct = matches!(via, Via::Direct(_));
            let answer =
                conn.read_until(deadline, LINK_ANSWER_LEN)
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::InvalidData
                            if direct =>
                        {
                            LinkFailure::Code(LinkError::Handshake)
                        }
                        _ => e.into(),
                    })?;
            let (channel, hello) = joining.finish(&answer)?;
            conn.write(&hello)?;
            conn.flush()?;
            Ok(channel)
        };
        match shake() {
            Ok(channel) => return Ok((conn, channel, via)),
            Err(LinkFailure::Code(LinkError::Handshake)) => {
                refused = true;
                failed.push(format!("{via} (does not hold this code)"));
            }
            Err(LinkFailure::BrokeOff(why)) => failed.push(format!("{via} ({why})")),
            Err(_) => failed.push(format!("{via} (connected, but no answer in time)")),
        }
    }
    if refused {
        return Err(LinkError::Handshake.into());
    }
    Err(LinkFailure::NoAnswer {
        tried: failed.join(", "),
        relayed: code.relay().is_some(),
    })
}

/// The file a running `device link` keeps in its home (its process id), so that what
/// finds the home held can say by what.
const LINKING_FILE: &str = "linking";

/// Marks `home` as being handed over by this process, until the guard goes.
pub fn mark_linking(home: &Path) -> impl Drop {
    let path = home.join(LINKING_FILE);
    let _ = std::fs::write(&path, std::process::id().to_string());
    struct Unmark(std::path::PathBuf);
    impl Drop for Unmark {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    Unmark(path)
}

/// The process handing `home` over, if one marked it (read only when the home is
/// found held: a mark a killed process left is then someone else's hold).
pub fn linking(home: &Path) -> Option<u32> {
    std::fs::read_to_string(home.join(LINKING_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What to tell someone who finds `home` held while `device link` hands it over.
pub fn held_by_linking(home: &Path) -> Option<String> {
    linking(home).map(|pid| {
        format!(
            "`kkachi device link` (process {pid}) is handing this account to a new device: wait for it to end, or stop it"
        )
    })
}

/// Where kkachi is told to listen (`KKACHI_LISTEN`, as the network reads it): the
/// addresses an offer listens on by default, each on a port of its own.
pub fn listen_from_env() -> Vec<SocketAddr> {
    if std::env::var_os("KKACHI_LISTEN").is_none() {
        return Vec::new();
    }
    crate::runtime::net_config()
        .listen
        .iter()
        .filter_map(|addr| {
            addr.iter().find_map(|p| match p {
                kkachi_protocol::multiaddr::Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
                kkachi_protocol::multiaddr::Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
                _ => None,
            })
        })
        .map(|ip| SocketAddr::new(ip, 0))
        .fold(Vec::new(), |mut all, a| {
            if !all.contains(&a) {
                all.push(a);
            }
            all
        })
}

/// The addresses of this machine's interfaces, as the system lists them now.
pub async fn interfaces() -> Vec<IpAddr> {
    let Ok(mut watcher) = if_watch::tokio::IfWatcher::new() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    // The watcher lists what is up at once; it only waits for changes after that.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(event)) = tokio::time::timeout_at(
        until.min(tokio::time::Instant::now() + Duration::from_millis(200)),
        watcher.next(),
    )
    .await
    {
        if let Ok(if_watch::IfEvent::Up(net)) = event {
            found.push(net.addr());
        }
    }
    found
}

/// A connection carrying length-prefixed messages (`u16 ‖ bytes`): over TCP, or a
/// stream through a relay.
struct Conn {
    io: Io,
    /// What a wait gives up on, besides its deadline (the joining device's user
    /// cancelling).
    cancel: Option<JoinState>,
}

enum Io {
    Tcp(TcpStream),
    Relay(Box<relay::Pipe>),
}

impl Conn {
    fn new(stream: TcpStream) -> Result<Self, LinkFailure> {
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_nodelay(true))
            .and_then(|()| stream.set_write_timeout(Some(IDLE_TIMEOUT)))
            .map_err(|e| LinkFailure::Io(e.to_string()))?;
        Ok(Self {
            io: Io::Tcp(stream),
            cancel: None,
        })
    }

    fn relay(pipe: relay::Pipe) -> Self {
        Self {
            io: Io::Relay(Box::new(pipe)),
            cancel: None,
        }
    }

    /// Waits on this connection end when `state` is cancelled.
    fn cancelled_by(mut self, state: &JoinState) -> Self {
        self.cancel = Some(state.clone());
        self
    }

    /// The other end proved it holds the code (through a relay, that keeps the stream).
    fn hold(&self) {
        if let Io::Relay(pipe) = &self.io {
            pipe.hold();
        }
    }

    /// What was sent stays for the other end to read, whatever becomes of this end.
    fn keep_sent(&mut self) {
        if let Io::Relay(pipe) = &mut self.io {
            pipe.keep_sent();
        }
    }

    /// Sends `msg`: at once over TCP; through a relay, once an envelope fills or on the
    /// next read or [`Conn::flush`].
    fn write(&mut self, msg: &[u8]) -> std::io::Result<()> {
        let len = u16::try_from(msg.len()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "message too long")
        })?;
        let mut framed = Vec::with_capacity(2 + msg.len());
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(msg);
        match &mut self.io {
            Io::Tcp(stream) => stream.write_all(&framed),
            Io::Relay(pipe) => pipe.write_all(&framed, Instant::now() + IDLE_TIMEOUT),
        }
    }

    /// Sends what was written and not sent yet.
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.io {
            Io::Tcp(_) => Ok(()),
            Io::Relay(pipe) => pipe.flush(Instant::now() + IDLE_TIMEOUT),
        }
    }

    /// The next message, within `within`.
    fn read(&mut self, within: Duration) -> std::io::Result<Vec<u8>> {
        self.read_until(Instant::now() + within, MAX_LINK_MESSAGE)
    }

    /// The next message, whole by `deadline` (however slowly it trickles in), and at
    /// most `max` bytes long: a longer one is refused before it is read.
    fn read_until(&mut self, deadline: Instant, max: usize) -> std::io::Result<Vec<u8>> {
        let mut len = [0u8; 2];
        self.read_exact_until(&mut len, deadline)?;
        let len = usize::from(u16::from_be_bytes(len));
        if len > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a message of {len} bytes where at most {max} may come"),
            ));
        }
        let mut msg = vec![0u8; len];
        self.read_exact_until(&mut msg, deadline)?;
        Ok(msg)
    }

    fn read_exact_until(&mut self, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
        let cancel = self.cancel.clone();
        let cancelled = move || cancel.as_ref().is_some_and(JoinState::is_cancelled);
        let stream = match &mut self.io {
            Io::Tcp(stream) => stream,
            Io::Relay(pipe) => return pipe.read_exact_until(buf, deadline, &cancelled),
        };
        let mut filled = 0;
        while filled < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the other device stopped answering",
                ));
            }
            if cancelled() {
                return Err(
                    // Not `Interrupted`, which readers take as "try again".
                    std::io::Error::other("cancelled"),
                );
            }
            stream.set_read_timeout(Some(left.min(CANCEL_CHECK)))?;
            match stream.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the other device closed the connection",
                    ));
                }
                Ok(n) => filled += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// What a failed read or write on the connection means for a person.
fn io_why(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            "the other device stopped answering".into()
        }
        std::io::ErrorKind::UnexpectedEof => "the other device closed the connection".into(),
        _ => e.to_string(),
    }
}

impl From<std::io::Error> for LinkFailure {
    fn from(e: std::io::Error) -> Self {
        LinkFailure::BrokeOff(io_why(&e))
    }
}

/// Writes a stream as channel messages of at most [`MAX_LINK_CHUNK`] bytes each.
struct Sealing {
    conn: Conn,
    channel: Channel,
    buf: Vec<u8>,
    /// How the connection failed, if it did.
    failed: Option<std::io::Error>,
}

impl Sealing {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let msg = self
            .channel
            .seal(&self.buf)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        self.buf.clear();
        self.conn.write(&msg).inspect_err(|e| {
            self.failed = Some(std::io::Error::new(e.kind(), e.to_string()));
        })
    }
}

impl Write for Sealing {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = MAX_LINK_CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MAX_LINK_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()?;
        self.conn.flush()
    }
}

/// Reads a stream from channel messages, each within [`IDLE_TIMEOUT`]. A message that
/// does not open, or holds nothing, reads as `InvalidData` (what a restore takes for a
/// damaged chunk).
struct Opening {
    conn: Conn,
    channel: Channel,
    buf: Vec<u8>,
    at: usize,
    /// Messages opened so far (the first may wait for the other user to confirm).
    opened: usize,
}

impl Opening {
    fn new(conn: Conn, channel: Channel) -> Self {
        Self {
            conn,
            channel,
            buf: Vec::new(),
            at: 0,
            opened: 0,
        }
    }
}

impl Read for Opening {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.buf.len() {
            let within = if self.opened == 0 {
                CONFIRM_TIMEOUT
            } else {
                IDLE_TIMEOUT
            };
            let msg = self.conn.read(within)?;
            self.buf = self
                .channel
                .open(&msg)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
            self.at = 0;
            self.opened += 1;
            if self.buf.is_empty() {
                // Never sent: the stream goes in messages that each hold some of it.
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "an empty message",
                ));
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

mod relay;
#[cfg(test)]
mod tests;
