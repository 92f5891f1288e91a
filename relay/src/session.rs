//! The session protocol `/kkachi/relay/2` (SPEC.md §6): one long-lived stream per
//! client and relay carries every request, each frame tagged with its request id, and
//! answers come back in any order (a long poll waits while puts on the same stream are
//! answered). It is the only way to talk to a relay, and contacts hand envelopes to
//! each other directly the same way.
//!
//! A request opens no stream: no stream setup and protocol negotiation frames, no
//! closing frames, no trip through the libp2p connection handler. A request/answer
//! round trip on loopback is under 100 µs (a stream per request took about 280 µs).
//!
//! The serving side ([`serve`], a relay, or a client taking direct deliveries) reads
//! frames and hands each request on, to be answered through a [`SessionReply`]; the
//! asking side is [`Session`].

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use asynchronous_codec::{BytesMut, Decoder, Encoder, Framed};
use futures::future::BoxFuture;
use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncReadExt as _, AsyncWriteExt, StreamExt as _};
use kkachi_protocol::wire::{self, ClientToRelay, ErrorCode, RelayToClient};
use kkachi_protocol::{DecodeError, PeerId};
use libp2p::{Stream, StreamProtocol};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::framing::{REQUEST_TIMEOUT, Request, read_frame};

/// The session protocol name as a libp2p stream protocol.
pub const SESSION_PROTOCOL: StreamProtocol = StreamProtocol::new(wire::SESSION_PROTOCOL_NAME);

/// A request read off a session, on its way to whoever answers it.
#[derive(Debug)]
pub struct SessionRequest {
    /// Who asks (the connection's authenticated peer).
    pub peer: PeerId,
    /// What they ask.
    pub request: Request,
    /// Where the answer goes.
    pub reply: SessionReply,
}

/// The channel from the node to a session's writer. Unbounded in type only: every answer
/// but a last refusal goes through a [`SessionReply`], and at most
/// [`wire::MAX_IN_FLIGHT`] of those exist at once. Answers are boxed, and the channel is
/// futures' (a node per message) rather than Tokio's (slots 32 at a time, up front): a
/// session held open by an idle client should not hold 32 answers' worth (4 KiB) of slots.
type Answers = futures::channel::mpsc::UnboundedSender<Answer>;

/// Where the answer to one session request goes. Holds one of the session's
/// [`wire::MAX_IN_FLIGHT`] places until it is answered or dropped.
#[derive(Debug)]
pub struct SessionReply {
    id: u32,
    out: Answers,
    _place: OwnedSemaphorePermit,
}

impl SessionReply {
    /// Sends the answer; false if the session is gone.
    pub fn send(self, response: RelayToClient) -> bool {
        self.out
            .unbounded_send((self.id, Box::new(response)))
            .is_ok()
    }

    /// Whether the session can still take the answer.
    pub fn is_open(&self) -> bool {
        !self.out.is_closed()
    }
}

/// Serves each inbound session stream in a task of its own, handing its requests to
/// `node`; sessions quiet for `idle` are closed.
pub async fn accept(
    mut incoming: libp2p_stream::IncomingStreams,
    node: mpsc::Sender<SessionRequest>,
    idle: Duration,
) {
    use futures::StreamExt;
    while let Some((peer, stream)) = incoming.next().await {
        tokio::spawn(serve(peer, stream, node.clone(), idle));
    }
}

/// Serves one inbound session stream until the client closes it, it breaks, or it has
/// been idle (nothing read, nothing unanswered) for `idle` to twice that. Requests go
/// to `node`.
///
/// One task reads requests and writes answers: an idle session costs the relay one task,
/// not two, and no lock to share the stream. A write in progress holds up reading, which is
/// the back-pressure a client that stops reading its answers should get.
///
/// Not an `async fn`: its parameters would stay in the task's state beside what is made of
/// them, for the life of the session.
pub fn serve(
    peer: PeerId,
    stream: Stream,
    node: mpsc::Sender<SessionRequest>,
    idle: Duration,
) -> impl Future<Output = ()> + Send {
    let mut io = Framed::new(stream, SessionCodec);
    let (out, mut answers) = futures::channel::mpsc::unbounded();
    let places = Arc::new(Semaphore::new(wire::MAX_IN_FLIGHT));
    async move {
        let tick = tokio::time::sleep(idle);
        tokio::pin!(tick);
        // The place the next request will take; one is held before a frame is read.
        let mut place: Option<OwnedSemaphorePermit> = None;
        // Nothing read and nothing unanswered since the last tick.
        let mut quiet = false;
        loop {
            tokio::select! {
                biased;
                // `out` is held here, so the channel stays open.
                Some(first) = answers.next() => {
                    if write_answers(&mut io, first, &mut answers).await.is_err() {
                        return; // broken: the node sees its replies closed
                    }
                }
                taken = places.clone().acquire_owned(), if place.is_none() => {
                    match taken {
                        Ok(taken) => place = Some(taken),
                        Err(_) => break,
                    }
                }
                frame = io.next(), if place.is_some() => {
                    quiet = false;
                    let reply = |id| SessionReply {
                        id,
                        out: out.clone(),
                        _place: place.take().expect("a place is held while reading"),
                    };
                    let request = match frame {
                        Some(Ok(body)) => match request_from(peer, body, reply) {
                            Ok(request) => request,
                            Err(refused) => {
                                // The stream cannot be read past a frame it refuses: say why,
                                // then close.
                                tracing::debug!(%peer, error = %refused, "session frame refused");
                                let _ = out.unbounded_send((0, Box::new(refusal(&refused))));
                                break;
                            }
                        },
                        Some(Err(_)) | None => break, // broken or closed
                    };
                    // Waits (boxed, as it holds the whole request) only when the node's queue
                    // is full, which keeps an idle session's task small.
                    match node.try_send(request) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Closed(_)) => break, // the node has stopped
                        Err(mpsc::error::TrySendError::Full(request)) => {
                            let node = node.clone();
                            let sent: BoxFuture<'static, bool> =
                                Box::pin(async move { node.send(request).await.is_ok() });
                            if !sent.await {
                                break;
                            }
                        }
                    }
                }
                () = &mut tick => {
                    // Idle: nothing read and nothing unanswered (apart from a place held for
                    // the next request) over a whole period, checked at two ticks in a row.
                    let held = usize::from(place.is_some());
                    let all_free = places.available_permits() + held == wire::MAX_IN_FLIGHT;
                    if all_free && quiet {
                        break;
                    }
                    quiet = all_free;
                    tick.as_mut().reset(tokio::time::Instant::now() + idle);
                }
            }
        }
        // Answers still owed are written as they come; the stream is closed once every reply
        // is answered or dropped.
        drop(out);
        drop(place);
        while let Some(first) = answers.next().await {
            if write_answers(&mut io, first, &mut answers).await.is_err() {
                return;
            }
        }
        let _ = futures::SinkExt::close(&mut io).await;
    }
}

/// The request in one session frame, with where its answer goes (`reply`, given the request
/// id); the frame's error if the session cannot go on past it.
fn request_from(
    peer: PeerId,
    frame: Result<BytesMut, DecodeError>,
    reply: impl FnOnce(u32) -> SessionReply,
) -> Result<SessionRequest, DecodeError> {
    let body = frame?;
    let (id, message) = wire::session_split(&body)?;
    let request = Request::decode(message);
    Ok(SessionRequest {
        peer,
        request,
        reply: reply(id),
    })
}

fn refusal(e: &DecodeError) -> RelayToClient {
    let code = match e {
        DecodeError::TooLong { .. } => ErrorCode::TooLarge,
        _ => ErrorCode::Malformed,
    };
    RelayToClient::error(code, format!("session frame refused, closing: {e}"))
}

/// Writes `first` and every answer already queued behind it, then flushes once.
async fn write_answers(
    io: &mut Framed<Stream, SessionCodec>,
    first: Answer,
    answers: &mut futures::channel::mpsc::UnboundedReceiver<Answer>,
) -> io::Result<()> {
    use futures::SinkExt;
    io.feed(first).await?;
    while let Ok(next) = answers.try_recv() {
        io.feed(next).await?;
    }
    io.flush().await
}

/// Most a session's read buffer grows by ahead of the bytes that arrived.
const GROW_BY: usize = 64 * 1024;

/// An answer on its way to the client: the request id and the message.
type Answer = (u32, Box<RelayToClient>);

/// The relay's side of the session framing: length-prefixed frames of `u32 id ‖ message`
/// (SPEC.md §6.1). A refused length is decoded as an error item: the stream cannot be read
/// past it, so the session closes after saying why.
struct SessionCodec;

impl Decoder for SessionCodec {
    type Item = Result<BytesMut, DecodeError>;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<Self::Item>> {
        let Some(prefix) = src.get(..4) else {
            return Ok(None);
        };
        let len = match wire::frame_len(prefix.try_into().expect("4 bytes")) {
            Ok(len) => len,
            Err(e) => return Ok(Some(Err(e))),
        };
        if src.len() < 4 + len {
            // Room grows as the bytes arrive, never by more than a read's worth ahead:
            // a length prefix alone reserves nothing, so a peer that announces large
            // frames and sends little costs what it sent.
            src.reserve((4 + len - src.len()).min(GROW_BY));
            return Ok(None);
        }
        let _prefix = src.split_to(4);
        Ok(Some(Ok(src.split_to(len))))
    }
}

impl Encoder for SessionCodec {
    type Item<'a> = Answer;
    type Error = io::Error;

    fn encode(&mut self, (id, answer): Answer, dst: &mut BytesMut) -> io::Result<()> {
        dst.extend_from_slice(&wire::session_frame(id, &answer.encode()));
        Ok(())
    }
}

/// Why a session request got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    /// The stream closed or broke before the answer came.
    #[error("session with the relay closed: {0}")]
    Closed(String),
    /// No answer within the request timeout.
    #[error("no answer from the relay within {0:?}")]
    Timeout(Duration),
    /// The session stream could not be opened.
    #[error("no session with the relay: {0}")]
    NotOpened(String),
}

type Pending = HashMap<u32, oneshot::Sender<Result<RelayToClient, SessionError>>>;

/// Where the session with one peer is kept: none yet, or the latest. Requests take an
/// open one without waiting (a plain lock, held for a clone); only when there is none
/// does a caller open one, and callers arriving meanwhile wait for it instead of opening
/// their own.
#[derive(Debug, Default)]
pub struct SessionSlot {
    current: Mutex<Option<Arc<Session>>>,
    opening: tokio::sync::Mutex<()>,
}

impl SessionSlot {
    /// A slot holding `session`.
    pub fn holding(session: Arc<Session>) -> Self {
        Self {
            current: Mutex::new(Some(session)),
            opening: tokio::sync::Mutex::default(),
        }
    }

    /// The open session, if there is one.
    pub fn open_session(&self) -> Option<Arc<Session>> {
        self.current.lock().clone().filter(|s| s.is_open())
    }

    /// The open session, or one `open` opens (one caller at a time; the rest take it).
    pub async fn get_or_open<E, F>(&self, open: impl FnOnce() -> F) -> Result<Arc<Session>, E>
    where
        F: std::future::Future<Output = Result<Arc<Session>, E>>,
    {
        if let Some(session) = self.open_session() {
            return Ok(session);
        }
        let _turn = self.opening.lock().await;
        if let Some(session) = self.open_session() {
            return Ok(session);
        }
        let session = open().await?;
        *self.current.lock() = Some(session.clone());
        Ok(session)
    }
}

/// The client side of one session stream: requests are written straight to the
/// stream from the caller's task, answers are matched to them by id.
#[derive(Debug)]
pub struct Session {
    writer: futures::lock::Mutex<WriteHalf<Stream>>,
    /// Unanswered requests; `None` once the stream is closed.
    pending: Arc<Mutex<Option<Pending>>>,
    next_id: AtomicU32,
    /// Stops the reading task, which lets go of the stream.
    stop: Mutex<Option<oneshot::Sender<()>>>,
    /// When the stream last showed the peer is there: bytes read from it, or a write
    /// to it finished (milliseconds since `origin`).
    heard: Arc<AtomicU64>,
    origin: Instant,
}

/// Notes the time whenever bytes are read.
struct Heard<R> {
    inner: R,
    heard: Arc<AtomicU64>,
    origin: Instant,
}

impl<R: futures::AsyncRead + Unpin> futures::AsyncRead for Heard<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled
            && *n > 0
        {
            let now = self.origin.elapsed().as_millis() as u64;
            self.heard.store(now, Ordering::Relaxed);
        }
        polled
    }
}

impl Session {
    /// Takes over an open session stream; a task reads its answers.
    pub fn start(stream: Stream) -> Arc<Self> {
        let (reader, writer) = stream.split();
        let pending = Arc::new(Mutex::new(Some(Pending::new())));
        let (stop, stopped) = oneshot::channel();
        let (heard, origin) = (Arc::new(AtomicU64::new(0)), Instant::now());
        let reader = Heard {
            inner: reader,
            heard: heard.clone(),
            origin,
        };
        tokio::spawn(read_answers(reader, pending.clone(), stopped));
        Arc::new(Self {
            writer: futures::lock::Mutex::new(writer),
            pending,
            next_id: AtomicU32::new(1),
            stop: Mutex::new(Some(stop)),
            heard,
            origin,
        })
    }

    /// How long since the stream last showed the peer is there (bytes came in, or a
    /// write went out whole).
    pub fn quiet_for(&self) -> Duration {
        let heard = Duration::from_millis(self.heard.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(heard)
    }

    fn note_heard(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.heard.fetch_max(now, Ordering::Relaxed);
    }

    /// Opens a session stream with `relay` over `control` (which dials if need be) and
    /// starts it; gives up after `timeout`.
    pub async fn open(
        control: &mut libp2p_stream::Control,
        relay: PeerId,
        timeout: Duration,
    ) -> Result<Arc<Self>, SessionError> {
        match tokio::time::timeout(timeout, control.open_stream(relay, SESSION_PROTOCOL)).await {
            Ok(Ok(stream)) => Ok(Self::start(stream)),
            Ok(Err(e)) => Err(SessionError::NotOpened(e.to_string())),
            Err(_) => Err(SessionError::NotOpened(format!(
                "not open within {timeout:?}"
            ))),
        }
    }

    /// Whether requests can still be sent.
    pub fn is_open(&self) -> bool {
        self.pending.lock().is_some()
    }

    /// Sends one request and waits for its answer (at most [`REQUEST_TIMEOUT`]).
    pub async fn request(&self, request: &ClientToRelay) -> Result<RelayToClient, SessionError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().as_mut() {
            Some(pending) => pending.insert(id, tx),
            None => return Err(SessionError::Closed("stream closed".into())),
        };
        let mut in_flight = InFlight {
            session: self,
            id,
            started: false,
            written: false,
        };
        let frame = wire::session_frame(id, &request.encode());
        let written = {
            let mut writer = self.writer.lock().await;
            in_flight.started = true;
            match writer.write_all(&frame).await {
                Ok(()) => writer.flush().await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = written {
            return Err(SessionError::Closed(format!("write failed: {e}")));
        }
        in_flight.written = true;
        self.note_heard();
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(SessionError::Closed("stream closed".into())),
            Err(_) => Err(SessionError::Timeout(REQUEST_TIMEOUT)),
        }
    }

    /// Gives the session up (its peer stopped answering): unanswered requests fail as
    /// closed, new ones are refused, and the stream is let go.
    pub fn abandon(&self, why: &str) {
        self.fail(why);
    }

    /// Closes the session: new requests are refused, unanswered ones fail, and the
    /// stream is let go.
    fn fail(&self, why: &str) {
        fail_all(&self.pending, why);
        if let Some(stop) = self.stop.lock().take() {
            let _ = stop.send(());
        }
    }
}

/// One request from the time it is registered: forgotten when its caller stops
/// waiting, and a write it left unfinished closes the session (the stream would carry
/// half a frame).
struct InFlight<'a> {
    session: &'a Session,
    id: u32,
    /// Its frame has begun to be written (it holds the writer).
    started: bool,
    written: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.session.pending.lock().as_mut() {
            p.remove(&self.id);
        }
        // One given up while still waiting for its turn to write left nothing behind.
        if self.started && !self.written {
            self.session
                .fail("a request was abandoned while being written");
        }
    }
}

fn fail_all(pending: &Mutex<Option<Pending>>, why: &str) {
    if let Some(waiting) = pending.lock().take() {
        for (_, tx) in waiting {
            let _ = tx.send(Err(SessionError::Closed(why.to_owned())));
        }
    }
}

async fn read_answers(
    mut reader: Heard<ReadHalf<Stream>>,
    pending: Arc<Mutex<Option<Pending>>>,
    stopped: oneshot::Receiver<()>,
) {
    let reading = async {
        loop {
            let body = match read_frame(&mut reader).await {
                Ok(Ok(body)) => body,
                Ok(Err(e)) => break format!("bad frame from the relay: {e}"),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    break "closed by the relay".into();
                }
                Err(e) => break e.to_string(),
            };
            let (id, message) = match wire::session_split(&body) {
                Ok(x) => x,
                Err(e) => break format!("bad frame from the relay: {e}"),
            };
            let answer = RelayToClient::decode(message).map_err(|e| {
                SessionError::Closed(format!("unreadable answer from the relay: {e}"))
            });
            if id == 0 {
                // The relay refused the stream itself and closes it.
                break match answer {
                    Ok(RelayToClient::Error { message, .. }) => message,
                    _ => "refused by the relay".into(),
                };
            }
            let tx = pending.lock().as_mut().and_then(|p| p.remove(&id));
            if let Some(tx) = tx {
                let _ = tx.send(answer);
            }
        }
    };
    let why: String = tokio::select! {
        why = reading => why,
        _ = stopped => "closed by this side".into(),
    };
    tracing::debug!(reason = %why, "session closed");
    fail_all(&pending, &why);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, F>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An open session costs the relay one task whose state is this future, for as long as
    /// the client stays. It was 992 bytes, plus a writer task and a lock around the stream,
    /// before reading and writing moved into one task and the rarely needed states were
    /// boxed; 776 bytes in a release build now.
    #[test]
    fn a_session_task_stays_small() {
        let size = future_size(serve);
        assert!(size <= 900, "a session's task holds {size} bytes");
    }
}
