//! Handing the account to a new device over the local network (SPEC §15.1).
//!
//! The device that has the account listens and shows a one-time code (a secret and its
//! addresses); the new device connects, and both prove they hold the code in a Noise
//! `NNpsk0` handshake before anything else is said. The account then goes over in the
//! stream a backup holds (§11), sealed message by message; the new device restores it
//! beside its home as a restore does, with a session key of its own, and says so. Only
//! then does the old device record, durably, that it handed the account over (it acts
//! for it no more), and confirm; only on that confirmation does the new home take its
//! place. So at no moment do two devices act for the account under one key, and a
//! transfer broken anywhere leaves the old device as it was, or (the confirmation lost)
//! able to hand the account over again.
//!
//! Everything the other end sends is bounded (a message is at most 64 KiB by its
//! length field, records as a restore bounds them) and waited for only so long; a
//! connection that does not hold the code is dropped after its first message, and too
//! many of them end the offer.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kkachi_protocol::link::{Channel, LinkCode, LinkError, MAX_LINK_CHUNK, MAX_LINK_MESSAGE};
use thiserror::Error;

use crate::backup::{BackupError, Counts, Ending, Restored};
use crate::store::{LocalStore, StoreError};

/// How long the new device's first message, and the old device's answer, may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long any later read or write may wait before the transfer is given up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the old device waits for the new one to restore what it was sent.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the new device tries each address of the code.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections that do not hold the code, after which the offer ends (someone on the
/// network is guessing; a new code is one command away).
pub const MAX_WRONG_CODES: u32 = 16;
/// The new device restored the account: `READY ‖ its session key (32)`.
const READY: u8 = 1;
/// The old device handed the account over: `DONE`.
const DONE: u8 = 2;

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
    /// Nothing answered at any address of the code.
    #[error(
        "nothing answers at {0}: is `kkachi device link` still running on your other device, on the same network? (a code holds while it runs)"
    )]
    NoAnswer(String),
    /// The code ran out before a device took the account.
    #[error(
        "no device took the account while the code held ({0}): run `kkachi device link` again for a new code"
    )]
    TimedOut(String),
    /// Too many connections did not hold the code.
    #[error(
        "{MAX_WRONG_CODES} connections did not hold the code (someone may be guessing): the code is withdrawn; run `kkachi device link` again for a new one"
    )]
    WrongCodes,
    /// The transfer broke off.
    #[error("the transfer broke off: {0}")]
    BrokeOff(String),
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
}

/// Something the old device saw while it waited, for its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A connection that does not hold the code was dropped.
    WrongCode(SocketAddr),
    /// A device with the code connected; the account is going over.
    Sending(SocketAddr),
    /// A transfer broke off; the code still holds.
    BrokeOff(SocketAddr, String),
}

/// What the old device handed over, and to whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handed {
    /// The new device's session key.
    pub to: [u8; 32],
    /// What went over.
    pub counts: Counts,
    /// Where the new device connected from.
    pub from: SocketAddr,
}

/// A code being offered: the listening sockets and the code that names them.
#[derive(Debug)]
pub struct Offer {
    code: LinkCode,
    listeners: Vec<TcpListener>,
}

impl Offer {
    /// Listens on `listen` (every address of this machine, on one port, if empty) and
    /// makes a code naming where: the addresses of `interfaces` for an unspecified one
    /// (loopback only if there is no other).
    pub fn new(listen: &[SocketAddr], interfaces: &[IpAddr]) -> Result<Self, LinkFailure> {
        let any = [SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)];
        let listen = if listen.is_empty() { &any[..] } else { listen };
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for want in listen {
            let listener = TcpListener::bind(want)
                .map_err(|e| LinkFailure::Io(format!("cannot listen on {want}: {e}")))?;
            let bound = listener
                .local_addr()
                .map_err(|e| LinkFailure::Io(format!("cannot listen on {want}: {e}")))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| LinkFailure::Io(format!("cannot listen on {want}: {e}")))?;
            if bound.ip().is_unspecified() {
                let mut named: Vec<IpAddr> = interfaces
                    .iter()
                    .copied()
                    .filter(|ip| ip.is_ipv4() == bound.is_ipv4() && !ip.is_loopback())
                    .collect();
                if named.is_empty() {
                    named.push(if bound.is_ipv4() {
                        IpAddr::V4(Ipv4Addr::LOCALHOST)
                    } else {
                        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
                    });
                }
                addrs.extend(
                    named
                        .into_iter()
                        .map(|ip| SocketAddr::new(ip, bound.port())),
                );
            } else {
                addrs.push(bound);
            }
            listeners.push(listener);
        }
        addrs.dedup();
        addrs.truncate(kkachi_protocol::link::MAX_LINK_ADDRS);
        let code = LinkCode::generate(&mut rand_core::OsRng, addrs)?;
        Ok(Self { code, listeners })
    }

    /// The code to show.
    pub fn code(&self) -> &LinkCode {
        &self.code
    }

    /// Waits `wait` for a device holding the code, sends it the account in `store`,
    /// and records that this home handed it over. `seen` hears what happens meanwhile.
    /// Blocks: run it off the async runtime.
    pub fn serve(
        self,
        store: &LocalStore,
        wait: Duration,
        mut seen: impl FnMut(Seen),
    ) -> Result<Handed, LinkFailure> {
        let deadline = Instant::now() + wait;
        let mut wrong = 0u32;
        loop {
            if Instant::now() >= deadline {
                let secs = u32::try_from(wait.as_secs()).unwrap_or(u32::MAX);
                return Err(LinkFailure::TimedOut(crate::commands::describe_duration(
                    secs,
                )));
            }
            let mut accepted = None;
            for listener in &self.listeners {
                match listener.accept() {
                    Ok(conn) => {
                        accepted = Some(conn);
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => tracing::debug!(error = %e, "a link connection failed"),
                }
            }
            let Some((stream, from)) = accepted else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let mut conn = match Conn::new(stream, HANDSHAKE_TIMEOUT) {
                Ok(c) => c,
                Err(_) => continue,
            };
            let channel = match conn.read().map_err(LinkFailure::from).and_then(|first| {
                let (channel, answer) = self.code.answer(&first)?;
                conn.write(&answer)?;
                Ok(channel)
            }) {
                Ok(c) => c,
                Err(LinkFailure::Code(LinkError::Handshake)) => {
                    wrong += 1;
                    seen(Seen::WrongCode(from));
                    if wrong >= MAX_WRONG_CODES {
                        return Err(LinkFailure::WrongCodes);
                    }
                    continue;
                }
                Err(e) => {
                    tracing::debug!(%from, error = %e, "a link connection gave up before its handshake");
                    continue;
                }
            };
            seen(Seen::Sending(from));
            match hand_over(store, conn, channel) {
                Ok((to, counts)) => return Ok(Handed { to, counts, from }),
                Err(e @ LinkFailure::Store(_)) => return Err(e),
                Err(e) => seen(Seen::BrokeOff(from, e.to_string())),
            }
        }
    }
}

/// Sends the account over `channel`, waits for the new device's word that it holds
/// it, records the hand-over durably, and confirms.
fn hand_over(
    store: &LocalStore,
    mut conn: Conn,
    channel: Channel,
) -> Result<([u8; 32], Counts), LinkFailure> {
    conn.timeout(IDLE_TIMEOUT)?;
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
    conn.timeout(RESTORE_TIMEOUT)?;
    let ready = channel.open(&conn.read()?)?;
    let to: [u8; 32] = match ready.split_first() {
        Some((&READY, key)) if key.len() == 32 => key.try_into().expect("32 bytes"),
        _ => {
            return Err(LinkFailure::BrokeOff(
                "the new device did not say it holds the account".into(),
            ));
        }
    };
    let me = store.identity()?.ok_or(StoreError::Corrupt("identity"))?;
    if to == me.x25519_public() {
        return Err(LinkFailure::BrokeOff(
            "the new device kept this device's key (its list of devices is full): the account stays here".into(),
        ));
    }
    // The commit: from here this home acts for the account no more.
    store.hand_over(to, crate::engine::now_ms())?;
    // Best effort: if the confirmation is lost, the new device does not take its home,
    // and this one (which holds everything still) may hand the account over again.
    let _ = channel
        .seal(&[DONE])
        .map_err(LinkFailure::from)
        .and_then(|done| conn.write(&done).map_err(LinkFailure::from));
    Ok((to, counts))
}

/// What the new device took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// What was restored.
    pub restored: Restored,
    /// The address that answered.
    pub from: SocketAddr,
}

/// Takes the account offered under `code` into `home` (which must hold none). The home
/// appears only once the old device confirmed it handed the account over. Blocks: run
/// it off the async runtime.
pub fn join(home: &Path, code: &LinkCode) -> Result<Joined, LinkFailure> {
    crate::backup::restore_with(home, |staging| {
        let (mut conn, from) = connect(code)?;
        let (joining, first) = code.join();
        conn.write(&first)?;
        // The old device hangs up on a first message that does not hold its code.
        let answer = conn.read().map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                LinkFailure::Code(LinkError::Handshake)
            }
            _ => e.into(),
        })?;
        let channel = joining.finish(&answer)?;
        conn.timeout(IDLE_TIMEOUT)?;
        let mut input = Opening {
            conn,
            channel,
            buf: Vec::new(),
            at: 0,
        };
        let name = format!("the account from {from}");
        let restored = crate::backup::restore_into(staging, &name, |sink| {
            crate::backup::read_contents(&mut input, &name, sink)
        })
        .map_err(|e| match e {
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
        if !restored.new_key {
            // It would act under the other device's key: two devices, one key.
            return Err(LinkFailure::BrokeOff(
                "your account has listed as many device keys as it may, so no device can join it: the account stays on the other device (a new identity starts a new list)".into(),
            ));
        }
        let Opening {
            mut conn,
            mut channel,
            ..
        } = input;
        let mut ready = vec![READY];
        ready.extend_from_slice(&restored.session_key);
        conn.write(&channel.seal(&ready)?)?;
        let done = conn.read().map_err(|e| {
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
        Ok(Joined { restored, from })
    })
}

/// Connects to the first address of `code` that answers.
fn connect(code: &LinkCode) -> Result<(Conn, SocketAddr), LinkFailure> {
    let mut failed = Vec::new();
    for addr in code.addrs() {
        match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
            Ok(stream) => {
                let conn = Conn::new(stream, HANDSHAKE_TIMEOUT)?;
                return Ok((conn, *addr));
            }
            Err(e) => failed.push(format!("{addr} ({e})")),
        }
    }
    Err(LinkFailure::NoAnswer(failed.join(", ")))
}

/// The addresses of this machine's interfaces, as the system lists them now.
pub async fn interfaces() -> Vec<IpAddr> {
    let Ok(mut watcher) = if_watch::tokio::IfWatcher::new() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    // The watcher lists what is up at once; it only waits for changes after that.
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(200), watcher.next()).await
    {
        if let Ok(if_watch::IfEvent::Up(net)) = event {
            found.push(net.addr());
        }
    }
    found
}

/// A TCP connection carrying length-prefixed messages (`u16 ‖ bytes`).
struct Conn {
    stream: TcpStream,
}

impl Conn {
    fn new(stream: TcpStream, timeout: Duration) -> Result<Self, LinkFailure> {
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_nodelay(true))
            .map_err(|e| LinkFailure::Io(e.to_string()))?;
        let mut conn = Self { stream };
        conn.timeout(timeout)?;
        Ok(conn)
    }

    fn timeout(&mut self, after: Duration) -> Result<(), LinkFailure> {
        self.stream
            .set_read_timeout(Some(after))
            .and_then(|()| self.stream.set_write_timeout(Some(after)))
            .map_err(|e| LinkFailure::Io(e.to_string()))
    }

    fn write(&mut self, msg: &[u8]) -> std::io::Result<()> {
        let len = u16::try_from(msg.len()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "message too long")
        })?;
        let mut framed = Vec::with_capacity(2 + msg.len());
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(msg);
        self.stream.write_all(&framed)
    }

    /// The next message: at most [`MAX_LINK_MESSAGE`] bytes, as its length field allows.
    fn read(&mut self) -> std::io::Result<Vec<u8>> {
        let mut len = [0u8; 2];
        self.stream.read_exact(&mut len)?;
        let len = usize::from(u16::from_be_bytes(len));
        debug_assert!(len <= MAX_LINK_MESSAGE);
        let mut msg = vec![0u8; len];
        self.stream.read_exact(&mut msg)?;
        Ok(msg)
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
        self.conn.stream.flush()
    }
}

/// Reads a stream from channel messages. A message that does not open reads as
/// `InvalidData` (what a restore takes for a damaged chunk).
struct Opening {
    conn: Conn,
    channel: Channel,
    buf: Vec<u8>,
    at: usize,
}

impl Read for Opening {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.buf.len() {
            let msg = self.conn.read()?;
            self.buf = self
                .channel
                .open(&msg)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
            self.at = 0;
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

#[cfg(test)]
mod tests;
