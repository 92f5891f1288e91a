//! Frames on a session stream (SPEC.md §6): a length prefix, checked against the limit
//! before anything is allocated, then the body.
//!
//! Whoever serves a session never fails it for a bad request: a message it cannot
//! decode becomes [`Request::Malformed`], so it can be answered with a clear error and
//! counted.

use std::io;

use futures::prelude::*;
use kkachi_protocol::DecodeError;
use kkachi_protocol::wire::{self, ClientToRelay};

/// How long a request may take end to end, on both sides: above the longest long poll
/// ([`wire::MAX_WAIT_MS`]) plus a slow flush.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

/// A request as read off a stream.
#[derive(Debug, Clone)]
pub enum Request {
    /// A well-formed request.
    Message(ClientToRelay),
    /// Bytes that do not decode; answered with an error.
    Malformed(DecodeError),
}

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
    // Grown as the bytes arrive, not reserved from the announced length.
    let mut body = Vec::new();
    let read = (&mut *io).take(len as u64).read_to_end(&mut body).await?;
    if read < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the frame ended early",
        ));
    }
    Ok(Ok(body))
}

impl Request {
    /// Reads a request message (after its frame).
    pub fn decode(body: &[u8]) -> Self {
        match ClientToRelay::decode(body) {
            Ok(msg) => Request::Message(msg),
            Err(e) => Request::Malformed(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[tokio::test]
    async fn a_frame_reads_back_whole() {
        let body = ClientToRelay::Info.encode();
        let mut r = Cursor::new(wire::frame(&body));
        assert_eq!(read_frame(&mut r).await.unwrap().unwrap(), body);
        assert!(matches!(
            Request::decode(&body),
            Request::Message(ClientToRelay::Info)
        ));
    }

    #[tokio::test]
    async fn gigabyte_prefix_is_refused_without_reading_the_body() {
        let mut r = Cursor::new((1u32 << 30).to_be_bytes().to_vec());
        assert!(matches!(
            read_frame(&mut r).await.unwrap(),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn garbage_body_is_malformed() {
        assert!(matches!(
            Request::decode(&[0xff, 1, 2]),
            Request::Malformed(DecodeError::UnknownTag { .. })
        ));
    }
}
