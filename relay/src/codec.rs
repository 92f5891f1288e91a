//! The libp2p request/response codec for `/kkachi/relay/1`: one length-prefixed frame
//! each way per stream (see the protocol crate's `wire` module and SPEC.md §6).
//!
//! The relay side never fails a stream for a bad request: a frame it cannot decode
//! becomes [`Request::Malformed`], so the service can answer with a clear error and
//! count it. An announced length over the limit is refused before the body is read.

use std::io;

use futures::prelude::*;
use kkachi_protocol::DecodeError;
use kkachi_protocol::wire::{self, ClientToRelay, RelayToClient};
use libp2p::StreamProtocol;
use libp2p::request_response;

/// How long a request may take end to end, on both sides: above the longest long poll
/// ([`wire::MAX_WAIT_MS`]) plus a slow flush.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

/// The protocol name as a libp2p stream protocol.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new(wire::PROTOCOL_NAME);

/// A request as read off a stream.
#[derive(Debug, Clone)]
pub enum Request {
    /// A well-formed request.
    Message(ClientToRelay),
    /// Bytes that do not decode; answered with an error.
    Malformed(DecodeError),
}

/// Frame codec for both sides of the relay protocol.
#[derive(Debug, Clone, Copy, Default)]
pub struct RelayCodec;

/// Reads one frame body; `Ok(Err(_))` when the announced length is over the limit
/// (nothing more is read then).
pub(crate) async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
) -> io::Result<Result<Vec<u8>, DecodeError>> {
    let mut prefix = [0u8; 4];
    io.read_exact(&mut prefix).await?;
    let len = match wire::frame_len(prefix) {
        Ok(len) => len,
        Err(e) => return Ok(Err(e)),
    };
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    Ok(Ok(body))
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, body: &[u8]) -> io::Result<()> {
    io.write_all(&wire::frame(body)).await?;
    io.flush().await?;
    io.close().await
}

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl request_response::Codec for RelayCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = RelayToClient;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(match read_frame(io).await? {
            Ok(body) => match ClientToRelay::decode(&body) {
                Ok(msg) => Request::Message(msg),
                Err(e) => Request::Malformed(e),
            },
            Err(e) => Request::Malformed(e),
        })
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<RelayToClient>
    where
        T: AsyncRead + Unpin + Send,
    {
        let body = read_frame(io).await?.map_err(invalid)?;
        RelayToClient::decode(&body).map_err(invalid)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            Request::Message(msg) => write_frame(io, &msg.encode()).await,
            Request::Malformed(e) => Err(invalid(e)),
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: RelayToClient,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res.encode()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use kkachi_protocol::wire::ErrorCode;
    use request_response::Codec as _;

    #[tokio::test]
    async fn frames_round_trip() {
        let mut buf = Cursor::new(Vec::new());
        RelayCodec
            .write_request(&PROTOCOL, &mut buf, Request::Message(ClientToRelay::Info))
            .await
            .unwrap();
        let mut r = Cursor::new(buf.into_inner());
        let req = RelayCodec.read_request(&PROTOCOL, &mut r).await.unwrap();
        assert!(matches!(req, Request::Message(ClientToRelay::Info)));

        let mut buf = Cursor::new(Vec::new());
        let resp = RelayToClient::error(ErrorCode::RateLimited, "slow down");
        RelayCodec
            .write_response(&PROTOCOL, &mut buf, resp.clone())
            .await
            .unwrap();
        let mut r = Cursor::new(buf.into_inner());
        assert_eq!(
            RelayCodec.read_response(&PROTOCOL, &mut r).await.unwrap(),
            resp
        );
    }

    #[tokio::test]
    async fn gigabyte_prefix_is_malformed_without_reading_the_body() {
        let mut r = Cursor::new((1u32 << 30).to_be_bytes().to_vec());
        let req = RelayCodec.read_request(&PROTOCOL, &mut r).await.unwrap();
        assert!(matches!(
            req,
            Request::Malformed(DecodeError::TooLong { .. })
        ));
    }

    #[tokio::test]
    async fn garbage_body_is_malformed() {
        let mut r = Cursor::new(wire::frame(&[0xff, 1, 2]));
        let req = RelayCodec.read_request(&PROTOCOL, &mut r).await.unwrap();
        assert!(matches!(
            req,
            Request::Malformed(DecodeError::UnknownTag { .. })
        ));
    }
}
