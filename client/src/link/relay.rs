//! The link's channel through a relay (SPEC §15.1), for devices that cannot reach each
//! other directly: two queues on one of the old device's relays, named by the code's
//! secret. The old device opens both; each joining device picks a random stream id and
//! writes into the queue to the old device, which tells the streams apart and answers
//! each in the queue to the new device. What goes through is the same framed channel as
//! over TCP, cut into envelopes (`Relayed`); the relay sees a throwaway identity at
//! each end, queue keys it cannot tie to anyone, and sealed bytes.
//!
//! Everything blocks: it runs on the link's own threads, each request a task on the
//! runtime the command started, waited for (so a thread left over as the process ends
//! finds its request failed, and stops).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use kkachi_protocol::link::{LINK_STREAM_LEN, LinkQueues, MAX_LINK_RELAYED, Relayed};
use kkachi_protocol::wire::Addressed;
use kkachi_protocol::{
    ClientToRelay, Envelope, EnvelopeId, ErrorCode, Multiaddr, PutOutcome, QueueKind, ReadKey,
    RelayToClient, WriteKey,
};
use tokio::runtime::Handle;

use crate::net::{NetConfig, Network, Transport};

/// How long one request to the relay may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How long a long poll of a queue waits for something (short: the loop also checks
/// whether it should stop).
const POLL_MS: u32 = 1000;
/// How long an envelope of the link lives on the relay (the transfer reads it in
/// seconds; a link abandoned leaves nothing for long).
const ENVELOPE_SECS: u64 = 15 * 60;
/// Streams the old device checks at once through the relay; past it, the oldest is
/// dropped (a device that has the code answers in a moment: only one that does not is
/// old). Only holders of the code, or the relay, can start any.
const MAX_STREAMS: usize = 8;
/// Envelopes waiting for a stream's reader before the stream is dropped: the old device
/// reads a handful from each (the handshake, then one word at a time), so a stream
/// sending more is flooding.
const STREAM_BACKLOG: usize = 16;
/// Envelopes the new device holds ahead of what it restored (about 2 MiB).
const JOINER_BACKLOG: usize = 32;
/// Stream ids remembered as done, so their late envelopes open nothing new.
const MAX_DONE: usize = 4096;
/// Pause before a refused or failed put is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// How often a wait looks whether it was cancelled.
const CANCEL_CHECK: Duration = Duration::from_millis(200);
/// How long a stream's end is tried for, as its pipe goes.
const END_WITHIN: Duration = Duration::from_secs(2);
/// The smallest envelope a relay must take for a link to go through it.
const MIN_CHUNK: usize = 1024;
/// What an envelope carries besides the channel's bytes: the stream and its number.
const RELAYED_HEADER: usize = LINK_STREAM_LEN + 4;

/// A network that speaks to relays only, as throwaway identities, for one link.
pub(super) fn network() -> Result<Network, String> {
    let config = NetConfig {
        listen: Vec::new(),
        lan: false,
        direct: false,
        circuits: false,
    };
    Network::start(libp2p::identity::Keypair::generate_ed25519(), config)
        .map(|(net, _events)| net)
        .map_err(|e| e.to_string())
}

/// One request to `relay`, answered within [`ANSWER_WITHIN`].
async fn ask(
    net: &Network,
    relay: &Multiaddr,
    request: ClientToRelay,
) -> Result<RelayToClient, String> {
    let reader = matches!(
        request,
        ClientToRelay::Subscribe { .. }
            | ClientToRelay::Delete { .. }
            | ClientToRelay::Grant { .. }
            | ClientToRelay::Revoke { .. }
    );
    let answer = if reader {
        tokio::time::timeout(ANSWER_WITHIN, net.request_as_reader(relay, request)).await
    } else {
        tokio::time::timeout(ANSWER_WITHIN, net.request(relay, request)).await
    };
    match answer {
        Ok(Ok(RelayToClient::Error { code, message })) => Err(format!(
            "{}: {}",
            code.as_str(),
            crate::sanitize::for_terminal(&message)
        )),
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", ANSWER_WITHIN.as_secs())),
    }
}

/// [`ask`] from a thread off the runtime: the request runs as a task on `rt`, and a
/// runtime gone fails it.
fn blocking(
    rt: &Handle,
    net: &Network,
    relay: &Multiaddr,
    request: ClientToRelay,
) -> Result<RelayToClient, String> {
    let (net, relay) = (net.clone(), relay.clone());
    waited(rt, async move { ask(&net, &relay, request).await })
}

/// `task` (which ends within [`ANSWER_WITHIN`]) run on `rt` and waited for from a
/// thread off the runtime; a runtime gone fails it.
fn waited<T: Send + 'static>(
    rt: &Handle,
    task: impl Future<Output = Result<T, String>> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(task.await);
    });
    rx.recv_timeout(ANSWER_WITHIN + Duration::from_secs(1))
        .unwrap_or_else(|_| Err("the link stopped".into()))
}

/// The most channel bytes one envelope to `relay` carries: as much as its largest
/// payload allows (its info says), at most [`MAX_LINK_RELAYED`].
async fn chunk_at(net: &Network, relay: &Multiaddr) -> Result<usize, String> {
    let RelayToClient::Info(info) = ask(net, relay, ClientToRelay::Info).await? else {
        return Err("the relay answered something else".into());
    };
    let payload = match info.max_payload {
        0 => kkachi_protocol::envelope::MAX_PAYLOAD_LEN,
        n => n as usize,
    };
    let chunk = payload.saturating_sub(RELAYED_HEADER).min(MAX_LINK_RELAYED);
    if chunk < MIN_CHUNK {
        return Err(format!(
            "it takes envelopes of {payload} bytes at most, too few to link through"
        ));
    }
    Ok(chunk)
}

/// Opens the code's two queues on `relay` (with the access token its operator gave, if
/// any), each writable with the code's key alone: how many bytes an envelope there
/// carries. Opens neither if it cannot open both.
pub(super) async fn open(
    net: &Network,
    relay: &Multiaddr,
    queues: &LinkQueues,
    token: &[u8],
) -> Result<usize, String> {
    let chunk = chunk_at(net, relay).await?;
    for (i, (read, write)) in [&queues.to_old, &queues.to_new].into_iter().enumerate() {
        let granted = ask(
            net,
            relay,
            ClientToRelay::Grant {
                key: read.clone(),
                kind: QueueKind::Inbox,
                token: token.to_vec(),
                write_ids: vec![write.id()],
            },
        )
        .await;
        let why = match granted {
            Ok(RelayToClient::Granted { .. }) => continue,
            Ok(_) => "the relay answered something else".to_string(),
            Err(why) => why,
        };
        if i == 1 {
            let (read, write) = &queues.to_old;
            let revoke = ClientToRelay::Revoke {
                key: read.clone(),
                write_ids: vec![write.id()],
            };
            let _ = ask(net, relay, revoke).await;
        }
        return Err(why);
    }
    Ok(chunk)
}

/// Where envelopes of one stream go, in order.
struct Out {
    rt: Handle,
    net: Network,
    relay: Multiaddr,
    write: WriteKey,
    stream: [u8; LINK_STREAM_LEN],
    seq: u32,
    /// The most channel bytes an envelope carries there.
    chunk: usize,
    /// The old device's: the key that reads the queue it puts into, to take back what
    /// a stream that broke off left there (it would hold the queue's quota from the
    /// next stream), and the envelopes put so far.
    cleanup: Option<(ReadKey, Vec<EnvelopeId>)>,
}

impl Out {
    /// Puts `bytes` (at most [`MAX_LINK_RELAYED`]) as the stream's next envelope,
    /// trying again while the relay is away or its queue full, until `deadline`.
    fn put(&mut self, bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
        let envelope = Envelope {
            expires_at: crate::engine::now_ms() / 1000 + ENVELOPE_SECS,
            payload: Relayed {
                stream: self.stream,
                seq: self.seq,
                bytes: bytes.to_vec(),
            }
            .encode(),
        };
        loop {
            let request = ClientToRelay::Put {
                items: vec![Addressed {
                    write: self.write,
                    envelope: envelope.clone(),
                }],
            };
            let why = match blocking(&self.rt, &self.net, &self.relay, request) {
                Ok(RelayToClient::Stored { outcomes, .. }) => match outcomes.first() {
                    Some(PutOutcome::Stored | PutOutcome::Duplicate) => {
                        self.seq += 1;
                        if let Some((_, ids)) = &mut self.cleanup {
                            ids.push(envelope.id());
                        }
                        return Ok(());
                    }
                    // The reader is behind, or the relay busy: it frees up.
                    Some(PutOutcome::Rejected {
                        code: ErrorCode::QuotaExceeded | ErrorCode::RateLimited,
                        message,
                    }) => message.clone(),
                    // The code's queue is gone (the offer ended), or never was (a wrong code).
                    Some(PutOutcome::Rejected {
                        code: ErrorCode::NoQueue,
                        ..
                    }) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            "nothing waits there under this code: it was used already, ran out, or was mistyped",
                        ));
                    }
                    Some(PutOutcome::Rejected { code, message }) => {
                        return Err(std::io::Error::other(format!(
                            "the relay refused the transfer ({}: {})",
                            code.as_str(),
                            crate::sanitize::for_terminal(message)
                        )));
                    }
                    None => "no outcome".into(),
                },
                Ok(_) => "an unexpected answer".into(),
                Err(why) => why,
            };
            if Instant::now() + RETRY_AFTER >= deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the relay did not take the transfer ({why})"),
                ));
            }
            std::thread::sleep(RETRY_AFTER);
        }
    }
}

/// One stream of the channel through the relay: what the link reads and writes as it
/// would a TCP connection.
pub(super) struct Pipe {
    out: Out,
    /// What was written and not put yet: envelopes go out full, or when the other end
    /// must answer.
    pending: Vec<u8>,
    inbound: Receiver<Vec<u8>>,
    buf: Vec<u8>,
    at: usize,
    /// Set when the pipe goes: what reads for it stops (the new device's thread), or
    /// forgets its stream (the old device's).
    gone: Arc<AtomicBool>,
    /// Set once the old device's check of the stream passed: it is not dropped for
    /// newer ones any more.
    held: Arc<AtomicBool>,
    /// Whether what was put stays for the other end to read when the pipe goes (the
    /// account was handed over).
    keep: bool,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.gone.store(true, Ordering::SeqCst);
        if self.out.seq == 0 {
            // Nothing was said on it: nothing to end, or take back (a stream dropped
            // unanswered, as under a flood, costs no put).
            return;
        }
        // The other end hears at once that the stream ended, as a closed connection
        // says (else it would wait out its deadline).
        let _ = self.out.put(&[], Instant::now() + END_WITHIN);
        let Some((read, ids)) = self.out.cleanup.take().filter(|_| !self.keep) else {
            return;
        };
        // What the other end did not read of a stream that broke off goes (but its end).
        let ids = &ids[..ids.len().saturating_sub(1)];
        for ids in ids.chunks(kkachi_protocol::wire::MAX_DELETE_IDS) {
            let delete = ClientToRelay::Delete {
                key: read.clone(),
                ids: ids.to_vec(),
            };
            let _ = blocking(&self.out.rt, &self.out.net, &self.out.relay, delete);
        }
    }
}

impl Pipe {
    fn new(out: Out, inbound: Receiver<Vec<u8>>, gone: Arc<AtomicBool>) -> Self {
        Self {
            out,
            pending: Vec::new(),
            inbound,
            buf: Vec::new(),
            at: 0,
            gone,
            held: Arc::default(),
            keep: false,
        }
    }

    /// The old device's check of the stream passed: newer streams no longer push it out.
    pub(super) fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    /// What was put stays for the other end when the pipe goes (it reads it after).
    pub(super) fn keep_sent(&mut self) {
        self.keep = true;
    }

    /// Whether the stream ended before anything of it was read (the old device
    /// dropped it for newer ones): nothing to check.
    pub(super) fn ended(&mut self) -> bool {
        if self.at < self.buf.len() {
            return false;
        }
        match self.inbound.try_recv() {
            Ok(bytes) => {
                self.buf = bytes;
                self.at = 0;
                false
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => false,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => true,
        }
    }

    /// Where the stream goes, for people: the relay's address.
    pub(super) fn relay(&self) -> &Multiaddr {
        &self.out.relay
    }

    /// Writes `bytes`; what fills envelopes goes out at once, the rest on
    /// [`Pipe::flush`] (or the next read).
    pub(super) fn write_all(&mut self, bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
        self.pending.extend_from_slice(bytes);
        while self.pending.len() >= self.out.chunk {
            let rest = self.pending.split_off(self.out.chunk);
            let full = std::mem::replace(&mut self.pending, rest);
            self.out.put(&full, deadline)?;
        }
        Ok(())
    }

    /// Puts what was written and not put yet.
    pub(super) fn flush(&mut self, deadline: Instant) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        self.out.put(&pending, deadline)
    }

    /// Fills `buf` by `deadline`.
    pub(super) fn read_exact_until(
        &mut self,
        buf: &mut [u8],
        deadline: Instant,
        cancelled: &dyn Fn() -> bool,
    ) -> std::io::Result<()> {
        self.flush(deadline)?;
        let mut filled = 0;
        while filled < buf.len() {
            if self.at == self.buf.len() {
                let left = deadline.saturating_duration_since(Instant::now());
                if cancelled() {
                    return Err(
                        // Not `Interrupted`, which readers take as "try again".
                        std::io::Error::other("cancelled"),
                    );
                }
                self.buf = match self.inbound.recv_timeout(left.min(CANCEL_CHECK)) {
                    Ok(bytes) => bytes,
                    Err(RecvTimeoutError::Timeout) if !left.is_zero() => continue,
                    Err(RecvTimeoutError::Timeout) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the other device stopped answering",
                        ));
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the other device's stream through the relay ended",
                        ));
                    }
                };
                self.at = 0;
            }
            let n = (buf.len() - filled).min(self.buf.len() - self.at);
            buf[filled..filled + n].copy_from_slice(&self.buf[self.at..self.at + n]);
            filled += n;
            self.at += n;
        }
        Ok(())
    }
}

/// What a reader made of an envelope.
enum Routed {
    /// Taken (or dropped as junk): it is deleted.
    Taken,
    /// Not this reader's (another joining device's): it stays.
    Left,
    /// The reader is done: it is deleted, and nothing more is read.
    Done,
}

/// Reads `read` on `relay` until `stop`, handing each envelope's payload to `route`
/// in the order stored, and deleting what it took. Ends when `route` says so.
fn read_queue(
    rt: &Handle,
    net: &Network,
    relay: &Multiaddr,
    read: &ReadKey,
    stop: &AtomicBool,
    mut route: impl FnMut(&[u8]) -> Routed,
) {
    let mut after = 0;
    while !stop.load(Ordering::SeqCst) {
        let request = ClientToRelay::Subscribe {
            key: read.clone(),
            after,
            wait_ms: POLL_MS,
        };
        let (items, next) = match blocking(rt, net, relay, request) {
            Ok(RelayToClient::Batch { items, next, .. }) => (items, next),
            Ok(_) | Err(_) => {
                // The relay is away for now: the link's own deadlines decide.
                std::thread::sleep(RETRY_AFTER);
                continue;
            }
        };
        after = after.max(next);
        let mut ids = Vec::with_capacity(items.len());
        let mut go_on = true;
        for item in &items {
            if !go_on || stop.load(Ordering::SeqCst) {
                break;
            }
            match route(&item.envelope.payload) {
                Routed::Taken => ids.push(item.envelope.id()),
                Routed::Left => {}
                Routed::Done => {
                    ids.push(item.envelope.id());
                    go_on = false;
                }
            }
        }
        for ids in ids.chunks(kkachi_protocol::wire::MAX_DELETE_IDS) {
            let _ = blocking(
                rt,
                net,
                relay,
                ClientToRelay::Delete {
                    key: read.clone(),
                    ids: ids.to_vec(),
                },
            );
        }
        if !go_on {
            return;
        }
    }
}

/// The new device's stream to the old device through `relay`: a fresh stream id, and a
/// thread reading what comes back for it.
pub(super) fn connect(relay: &Multiaddr, queues: &LinkQueues) -> Result<Pipe, String> {
    let rt = Handle::try_current().map_err(|e| e.to_string())?;
    let net = {
        let _entered = rt.enter();
        network()?
    };
    let chunk = {
        let (net, relay) = (net.clone(), relay.clone());
        waited(&rt, async move { chunk_at(&net, &relay).await })?
    };
    let stream: [u8; LINK_STREAM_LEN] = rand::random();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, inbound) = std::sync::mpsc::sync_channel(JOINER_BACKLOG);
    {
        let (rt, net, relay, read, stop) = (
            rt.clone(),
            net.clone(),
            relay.clone(),
            queues.to_new.0.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let mut expected = 0u32;
            read_queue(&rt, &net, &relay, &read, &stop, |payload| {
                let Ok(relayed) = Relayed::decode(payload) else {
                    // Junk, which nobody reads: it goes.
                    return Routed::Taken;
                };
                if relayed.stream != stream {
                    // Another device's: for it to read.
                    return Routed::Left;
                }
                if relayed.seq < expected {
                    // One put twice.
                    return Routed::Taken;
                }
                if relayed.seq > expected || relayed.is_end() {
                    // The other end ended the stream, or one was lost: the channel
                    // cannot go on (ending it says so).
                    return Routed::Done;
                }
                expected += 1;
                if tx.send(relayed.bytes).is_ok() {
                    Routed::Taken
                } else {
                    Routed::Done
                }
            });
        });
    }
    let out = Out {
        rt,
        net,
        relay: relay.clone(),
        write: queues.to_old.1,
        stream,
        seq: 0,
        chunk,
        cleanup: None,
    };
    Ok(Pipe::new(out, inbound, stop))
}

/// A stream the old device reads for: the next number it takes, where it goes, and
/// whether its pipe went.
struct Live {
    expected: u32,
    tx: SyncSender<Vec<u8>>,
    gone: Arc<AtomicBool>,
    /// Whether its check passed.
    held: Arc<AtomicBool>,
    /// When it started, counted in streams.
    started: u64,
}

/// The streams the old device reads for, and those it is done with (the newest
/// [`MAX_DONE`]).
#[derive(Default)]
struct Streams {
    live: HashMap<[u8; LINK_STREAM_LEN], Live>,
    done: HashSet<[u8; LINK_STREAM_LEN]>,
    done_order: VecDeque<[u8; LINK_STREAM_LEN]>,
    /// Streams started so far.
    started: u64,
}

impl Streams {
    /// Nothing more of `stream` is read.
    fn finish(&mut self, stream: [u8; LINK_STREAM_LEN]) {
        self.live.remove(&stream);
        if self.done.insert(stream) {
            self.done_order.push_back(stream);
            if self.done_order.len() > MAX_DONE
                && let Some(old) = self.done_order.pop_front()
            {
                self.done.remove(&old);
            }
        }
    }
}

/// The old device's end of the relay: streams from devices holding the code, as
/// they start.
pub(super) struct Listening {
    /// Each new stream, to be checked like a connection.
    pub(super) streams: Receiver<Pipe>,
    stop: Arc<AtomicBool>,
    rt: Handle,
    net: Network,
    relay: Multiaddr,
    queues: LinkQueues,
}

impl std::fmt::Debug for Listening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listening")
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Listening {
    /// The relay listened on.
    pub(super) fn relay(&self) -> &Multiaddr {
        &self.relay
    }

    /// Stops listening, and withdraws the code's keys from its queues: nothing more
    /// goes in, whoever holds the code (what is left expires on the relay). Blocks.
    pub(super) fn close(self) {
        self.stop.store(true, Ordering::SeqCst);
        for (read, write) in [&self.queues.to_old, &self.queues.to_new] {
            let revoke = ClientToRelay::Revoke {
                key: read.clone(),
                write_ids: vec![write.id()],
            };
            let _ = blocking(&self.rt, &self.net, &self.relay, revoke);
        }
    }
}

/// Listens on the queues `open` made on `relay` (whose envelopes carry `chunk` bytes):
/// each stream that starts (its first envelope, number 0) becomes a [`Pipe`]. At most
/// [`MAX_STREAMS`] are being checked at once, the oldest dropped past it (never one
/// whose check passed), and at most as many wait to be checked; a stream that ends,
/// floods its pipe, skips a number, or whose pipe was dropped, is done, and nothing of
/// it is read again.
pub(super) fn listen(
    rt: Handle,
    net: Network,
    relay: Multiaddr,
    queues: LinkQueues,
    chunk: usize,
) -> Listening {
    let stop = Arc::new(AtomicBool::new(false));
    // Unbounded, but each stream in it past the newest few was dropped already (and
    // holds at most what came before): the offer takes them all at its next pass.
    let (streams_tx, streams) = std::sync::mpsc::channel();
    {
        let (rt, net, relay, queues, stop) = (
            rt.clone(),
            net.clone(),
            relay.clone(),
            queues.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let mut streams = Streams::default();
            read_queue(&rt, &net, &relay, &queues.to_old.0, &stop, |payload| {
                let Ok(relayed) = Relayed::decode(payload) else {
                    return Routed::Taken;
                };
                let stream = relayed.stream;
                // Pipes dropped since (checked and failed, or done) are done.
                let dropped: Vec<_> = streams
                    .live
                    .iter()
                    .filter(|(_, l)| l.gone.load(Ordering::SeqCst))
                    .map(|(s, _)| *s)
                    .collect();
                for s in dropped {
                    streams.finish(s);
                }
                if let Some(l) = streams.live.get_mut(&stream) {
                    if relayed.seq < l.expected {
                        return Routed::Taken;
                    }
                    let ended = relayed.seq > l.expected
                        || relayed.is_end()
                        || matches!(
                            l.tx.try_send(relayed.bytes),
                            Err(TrySendError::Full(_) | TrySendError::Disconnected(_))
                        );
                    l.expected += 1;
                    if ended {
                        streams.finish(stream);
                    }
                    return Routed::Taken;
                }
                if streams.done.contains(&stream) || relayed.seq != 0 || relayed.is_end() {
                    return Routed::Taken;
                }
                if streams.live.len() >= MAX_STREAMS {
                    let oldest = streams
                        .live
                        .iter()
                        .filter(|(_, l)| !l.held.load(Ordering::SeqCst))
                        .min_by_key(|(_, l)| l.started)
                        .map(|(s, _)| *s);
                    match oldest {
                        Some(oldest) => streams.finish(oldest),
                        None => return Routed::Taken,
                    }
                }
                let (tx, inbound) = std::sync::mpsc::sync_channel(STREAM_BACKLOG);
                if tx.try_send(relayed.bytes).is_err() {
                    return Routed::Taken;
                }
                let out = Out {
                    rt: rt.clone(),
                    net: net.clone(),
                    relay: relay.clone(),
                    write: queues.to_new.1,
                    stream,
                    seq: 0,
                    chunk,
                    cleanup: Some((queues.to_new.0.clone(), Vec::new())),
                };
                let pipe = Pipe::new(out, inbound, Arc::default());
                let live = Live {
                    expected: 1,
                    tx,
                    gone: pipe.gone.clone(),
                    held: pipe.held.clone(),
                    started: streams.started + 1,
                };
                if streams_tx.send(pipe).is_err() {
                    return Routed::Done;
                }
                streams.started += 1;
                streams.live.insert(stream, live);
                Routed::Taken
            });
        });
    }
    Listening {
        streams,
        stop,
        rt,
        net,
        relay,
        queues,
    }
}

#[cfg(test)]
mod tests;
