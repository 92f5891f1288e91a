//! Byte-level building blocks shared by every encoding in this crate.
//!
//! All integers are big-endian. Variable-length fields carry a length prefix that is
//! checked against the field's named maximum *and* against the bytes actually present
//! before anything is allocated, so a hostile length prefix (say 1 GiB) costs nothing.

use thiserror::Error;

/// Why a byte string could not be decoded. Every decoder in this crate returns this
/// (possibly wrapped) instead of panicking, whatever the input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The input ended inside the named field.
    #[error("truncated input: {field} is incomplete")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// A length prefix or count exceeds the field's maximum.
    #[error("{field} is too long: {len} > {max}")]
    TooLong {
        /// The field being read.
        field: &'static str,
        /// The length announced or found.
        len: u64,
        /// The largest allowed.
        max: u64,
    },
    /// Bytes were left over after a complete value.
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
    /// The format version is not one this implementation understands.
    #[error("unsupported {what} version {version}")]
    UnsupportedVersion {
        /// Which format.
        what: &'static str,
        /// The version byte found.
        version: u8,
    },
    /// A tag byte names no known variant.
    #[error("unknown {field} tag {tag}")]
    UnknownTag {
        /// The field being read.
        field: &'static str,
        /// The tag found.
        tag: u64,
    },
    /// A text field is not valid UTF-8.
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field being read.
        field: &'static str,
    },
    /// A field is well-formed bytes but not a valid value.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field being read.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Appends big-endian fields to a byte vector.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Vec::with_capacity(capacity),
        }
    }

    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// Raw bytes with no length prefix (fixed-size fields).
    pub(crate) fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// Bytes behind a u8 length prefix. Callers guarantee `v.len() <= 255`.
    pub(crate) fn bytes8(&mut self, v: &[u8]) -> &mut Self {
        debug_assert!(v.len() <= usize::from(u8::MAX));
        self.u8(v.len() as u8).raw(v)
    }

    /// Bytes behind a u16 length prefix. Callers guarantee `v.len() <= 65535`.
    pub(crate) fn bytes16(&mut self, v: &[u8]) -> &mut Self {
        debug_assert!(v.len() <= usize::from(u16::MAX));
        self.u16(v.len() as u16).raw(v)
    }

    /// Bytes behind a u32 length prefix. Callers guarantee `v.len() <= u32::MAX`.
    pub(crate) fn bytes32(&mut self, v: &[u8]) -> &mut Self {
        debug_assert!(u32::try_from(v.len()).is_ok());
        self.u32(v.len() as u32).raw(v)
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads big-endian fields from a borrowed slice, never reading past its end.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated { field });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(DecodeError::UnknownTag {
                field,
                tag: tag.into(),
            }),
        }
    }

    /// A length-prefixed byte string whose announced length is checked against `max`
    /// and against the remaining input before it is sliced.
    fn prefixed(
        &mut self,
        len: u64,
        max: usize,
        field: &'static str,
    ) -> Result<&'a [u8], DecodeError> {
        if len > max as u64 {
            return Err(DecodeError::TooLong {
                field,
                len,
                max: max as u64,
            });
        }
        // len <= max <= usize::MAX, so the cast is lossless.
        self.take(len as usize, field)
    }

    pub(crate) fn bytes8(
        &mut self,
        max: usize,
        field: &'static str,
    ) -> Result<&'a [u8], DecodeError> {
        let len = self.u8(field)?;
        self.prefixed(len.into(), max, field)
    }

    pub(crate) fn bytes16(
        &mut self,
        max: usize,
        field: &'static str,
    ) -> Result<&'a [u8], DecodeError> {
        let len = self.u16(field)?;
        self.prefixed(len.into(), max, field)
    }

    pub(crate) fn bytes32(
        &mut self,
        max: usize,
        field: &'static str,
    ) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(field)?;
        self.prefixed(len.into(), max, field)
    }

    /// A UTF-8 string behind a u8 length prefix.
    pub(crate) fn str8(&mut self, max: usize, field: &'static str) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes8(max, field)?)
            .map_err(|_| DecodeError::InvalidUtf8 { field })
    }

    /// A UTF-8 string behind a u16 length prefix.
    pub(crate) fn str16(
        &mut self,
        max: usize,
        field: &'static str,
    ) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes16(max, field)?)
            .map_err(|_| DecodeError::InvalidUtf8 { field })
    }

    /// An element count, checked against `max` and against the smallest possible
    /// encoding of that many elements (`min_each` bytes), so a hostile count cannot
    /// make the caller reserve memory the input could never fill.
    pub(crate) fn count16(
        &mut self,
        max: usize,
        min_each: usize,
        field: &'static str,
    ) -> Result<usize, DecodeError> {
        let n = usize::from(self.u16(field)?);
        if n > max {
            return Err(DecodeError::TooLong {
                field,
                len: n as u64,
                max: max as u64,
            });
        }
        if n.saturating_mul(min_each) > self.remaining() {
            return Err(DecodeError::Truncated { field });
        }
        Ok(n)
    }

    /// Succeeds only if every byte was consumed.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }

    /// The unread rest of the input.
    pub(crate) fn rest(self) -> &'a [u8] {
        self.buf
    }
}

/// BLAKE2s-256 over a domain-separation label and a sequence of parts, each prefixed
/// with its length so that no two different part lists hash the same.
pub(crate) fn hash(label: &str, parts: &[&[u8]]) -> [u8; 32] {
    use blake2::{Blake2s256, Digest};
    let mut h = Blake2s256::new();
    h.update((label.len() as u64).to_be_bytes());
    h.update(label.as_bytes());
    for part in parts {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_length_prefix_is_rejected_before_allocation() {
        // A u32 prefix announcing 1 GiB followed by three bytes.
        let mut input = (1u32 << 30).to_be_bytes().to_vec();
        input.extend_from_slice(b"abc");
        let err = Reader::new(&input)
            .bytes32(64 * 1024, "payload")
            .unwrap_err();
        assert_eq!(
            err,
            DecodeError::TooLong {
                field: "payload",
                len: 1 << 30,
                max: 64 * 1024
            }
        );
    }

    #[test]
    fn length_within_max_but_beyond_input_is_truncated() {
        let mut input = 10u16.to_be_bytes().to_vec();
        input.extend_from_slice(b"abc");
        let err = Reader::new(&input).bytes16(100, "name").unwrap_err();
        assert_eq!(err, DecodeError::Truncated { field: "name" });
    }

    #[test]
    fn hostile_count_is_rejected_against_remaining_bytes() {
        let input = 1000u16.to_be_bytes();
        let err = Reader::new(&input).count16(1024, 32, "ids").unwrap_err();
        assert_eq!(err, DecodeError::Truncated { field: "ids" });
        let err = Reader::new(&input).count16(10, 32, "ids").unwrap_err();
        assert!(matches!(err, DecodeError::TooLong { len: 1000, .. }));
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u8("x").unwrap(), 1);
        assert_eq!(r.finish(), Err(DecodeError::TrailingBytes(2)));
    }

    #[test]
    fn hash_is_length_delimited() {
        assert_ne!(hash("l", &[b"ab", b"c"]), hash("l", &[b"a", b"bc"]));
        assert_ne!(hash("l1", &[b"x"]), hash("l", &[b"1x"]));
    }
}
