//! The framing under every libp2p-noise connection (the patched asynchronous-codec in
//! relay/vendor): buffers start empty and drained ones are given back, and frames of every
//! size still arrive whole and in order.

use asynchronous_codec::{Bytes, FramedRead, FramedWrite, LengthCodec};
use futures::executor::block_on;
use futures::io::Cursor;
use futures::{SinkExt, StreamExt};

/// Frame sizes from empty to well past both the old 8 KiB buffers and the 1 KiB retained.
fn frames() -> Vec<Bytes> {
    [
        0,
        1,
        100,
        1023,
        1024,
        1025,
        8 * 1024,
        64 * 1024,
        7,
        300_000,
        5,
    ]
    .iter()
    .enumerate()
    .map(|(i, &len)| Bytes::from((0..len).map(|b| (b + i) as u8).collect::<Vec<u8>>()))
    .collect()
}

#[test]
fn buffers_start_empty() {
    let read = FramedRead::new(Cursor::new(Vec::<u8>::new()), LengthCodec);
    assert_eq!(read.read_buffer().capacity(), 0);
    let write = FramedWrite::new(Cursor::new(Vec::<u8>::new()), LengthCodec);
    let parts = write.into_parts();
    assert_eq!(parts.buffer.capacity(), 0);
}

#[test]
fn frames_round_trip_and_drained_buffers_are_released() {
    let sent = frames();
    let mut write = FramedWrite::new(Cursor::new(Vec::new()), LengthCodec);
    block_on(async {
        for frame in &sent {
            write.send(frame.clone()).await.unwrap();
            // `send` flushes: the buffer is empty and a large one was given back.
            let buffer_capacity = write.write_buffer_capacity();
            assert!(
                buffer_capacity <= 1024,
                "write buffer keeps {buffer_capacity} bytes after a {}-byte frame",
                frame.len()
            );
        }
    });
    let wire = write.into_inner().into_inner();

    let mut read = FramedRead::new(Cursor::new(wire), LengthCodec);
    let mut received = Vec::new();
    block_on(async {
        while let Some(frame) = read.next().await {
            received.push(frame.unwrap());
            if read.read_buffer().is_empty() {
                assert!(
                    read.read_buffer().capacity() <= 1024,
                    "read buffer keeps {} bytes after frame {}",
                    read.read_buffer().capacity(),
                    received.len()
                );
            }
        }
    });
    assert_eq!(received, sent);
}

/// What `FramedWrite` keeps between sends.
trait WriteBufferCapacity {
    fn write_buffer_capacity(&mut self) -> usize;
}

impl WriteBufferCapacity for FramedWrite<Cursor<Vec<u8>>, LengthCodec> {
    fn write_buffer_capacity(&mut self) -> usize {
        // `FramedWrite` has no accessor for its buffer; take it apart and put it back.
        let placeholder = FramedWrite::new(Cursor::new(Vec::new()), LengthCodec);
        let parts = std::mem::replace(self, placeholder).into_parts();
        let capacity = parts.buffer.capacity();
        *self = FramedWrite::from_parts(parts);
        capacity
    }
}
