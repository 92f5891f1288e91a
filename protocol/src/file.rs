//! Files: encrypted once under a key of their own, cut into chunks named by the hash of
//! their ciphertext, listed by an encrypted manifest (SPEC §13).
//!
//! A file of `size` bytes is cut into chunks of [`CHUNK_BYTES`]; the last is padded
//! with zeros up to the smallest of the size classes [`SIZE_CLASSES`] that holds it, so
//! relays learn a file's size only to within a class. Chunk `i` of `n` is
//!
//! ```text
//! XChaCha20-Poly1305(file key, nonce = 0(19) ‖ i(4, BE) ‖ last(1), ad = "kkachi/file/v1" ‖ n(4, BE), plaintext)
//! ```
//!
//! a STREAM construction: a chunk moved to another index, or a stream cut short or
//! lengthened, does not open. A chunk's id is BLAKE3 of its ciphertext: relays check it
//! on a put, and a downloader checks it before opening. The manifest (the file's size
//! and its chunks' ids) is sealed the same way at index `u32::MAX`, with last = 2, and
//! is itself stored as a chunk. What a chat message carries ([`FileRef`]) is the key,
//! the manifest's id, and what to show before downloading: name, type, size, and for
//! images a small thumbnail. The key is random per file, so fixed nonce prefixes never
//! repeat under one key.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};

/// Plaintext bytes of the file in each chunk (the last holds the rest).
pub const CHUNK_BYTES: usize = 256 * 1024;
/// The sizes a last (or only) chunk's plaintext is padded to.
pub const SIZE_CLASSES: [usize; 4] = [4 * 1024, 16 * 1024, 64 * 1024, CHUNK_BYTES];
/// The AEAD tag each chunk carries.
pub const TAG_BYTES: usize = 16;
/// The largest chunk ciphertext.
pub const MAX_CHUNK: usize = CHUNK_BYTES + TAG_BYTES;
/// The most chunks a file may have: its manifest fits in one chunk (2 GiB).
pub const MAX_CHUNKS: usize = 8_000;
/// The largest file, in bytes.
pub const MAX_FILE_BYTES: u64 = (MAX_CHUNKS * CHUNK_BYTES) as u64;
/// The longest file name, in UTF-8 bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// The longest media type, in bytes.
pub const MAX_MIME_BYTES: usize = 127;
/// The largest inline thumbnail, in bytes.
pub const MAX_THUMBNAIL_BYTES: usize = 16 * 1024;

const AD_LABEL: &[u8] = b"kkachi/file/v1";
const MANIFEST_VERSION: u8 = 1;
const MANIFEST_INDEX: u32 = u32::MAX;

/// The id of a chunk: BLAKE3 of its ciphertext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of a chunk with this ciphertext.
    pub fn of(ciphertext: &[u8]) -> Self {
        Self(*blake3::hash(ciphertext).as_bytes())
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..12])
    }
}

/// A file's key: random, used for that file only.
#[derive(Clone, PartialEq, Eq)]
pub struct FileKey(pub [u8; 32]);

impl FileKey {
    /// A new random key.
    pub fn generate(rng: &mut (impl rand_core::RngCore + rand_core::CryptoRng)) -> Self {
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        Self(key)
    }
}

/// How long a file passed on keeps the same key (SPEC §13.1): a week, so chunks a relay
/// still holds from passing it on before have a week or more left of their two.
pub const FORWARD_PERIOD_SECS: u64 = 7 * 86_400;

/// The key the file `file` is sealed under anew when `by` passes it on to `to` (a
/// contact's peer id or a group's key) at `now_secs` (SPEC §13.1). Keyed by a secret of
/// `by`'s, so nobody else, the file's first sender included, can tell which chunks are
/// the file passed on; the same within a period, so passing it to the same
/// conversation again makes the same chunks (found with `HasChunks`, not put twice).
pub fn forward_key(
    file: &FileRef,
    to: &[u8],
    by: &crate::identity::Identity,
    now_secs: u64,
) -> FileKey {
    let secret = by.derived_secret("kkachi/file-forward-secret/v1");
    let mut h = blake3::Hasher::new_keyed(&secret);
    h.update(b"kkachi/file-forward/v1")
        .update(&file.id())
        .update(&(to.len() as u32).to_be_bytes())
        .update(to)
        .update(&(now_secs / FORWARD_PERIOD_SECS).to_be_bytes());
    FileKey(*h.finalize().as_bytes())
}

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileKey(…)")
    }
}

/// Why a file, a chunk or a manifest could not be sealed or opened.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FileError {
    /// Malformed bytes.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Over [`MAX_FILE_BYTES`].
    #[error("a file of {0} bytes; the limit is {MAX_FILE_BYTES}")]
    TooLarge(u64),
    /// A chunk or manifest that does not open under the key at its place: damaged,
    /// moved, from another file, or the stream cut short.
    #[error("a chunk of the file does not open: damaged, or not this file's")]
    Sealed,
    /// A chunk whose ciphertext does not hash to its id.
    #[error("a chunk does not match its id")]
    WrongId,
    /// A field over its bound, or inconsistent with another.
    #[error("{0}")]
    Invalid(&'static str),
}

/// Whether `len` is the length of a sealed chunk or manifest: a size class and its tag.
/// Relays take nothing else, so every chunk they hold is at least 4 KiB.
pub fn is_sealed_len(len: usize) -> bool {
    SIZE_CLASSES.iter().any(|c| c + TAG_BYTES == len)
}

/// How many chunks a file of `size` bytes has (one for an empty file).
pub fn chunk_count(size: u64) -> usize {
    (size.div_ceil(CHUNK_BYTES as u64) as usize).max(1)
}

/// The plaintext length chunk `index` of a file of `size` bytes is sealed at: a whole
/// chunk, or for the last, the smallest size class that holds what is left.
pub fn padded_len(size: u64, index: usize) -> usize {
    let before = (index * CHUNK_BYTES) as u64;
    let left = size.saturating_sub(before).min(CHUNK_BYTES as u64) as usize;
    if index + 1 < chunk_count(size) {
        return CHUNK_BYTES;
    }
    SIZE_CLASSES
        .iter()
        .copied()
        .find(|c| *c >= left)
        .unwrap_or(CHUNK_BYTES)
}

fn nonce(index: u32, last: u8) -> XNonce {
    let mut n = [0u8; 24];
    n[19..23].copy_from_slice(&index.to_be_bytes());
    n[23] = last;
    XNonce::from(n)
}

fn ad(count: usize) -> Vec<u8> {
    let mut ad = AD_LABEL.to_vec();
    ad.extend_from_slice(&(count as u32).to_be_bytes());
    ad
}

/// Seals chunk `index` of a file of `count` chunks: `plain` is that chunk's part of the
/// file, padded here to [`padded_len`] when it is the last.
pub fn seal_chunk(key: &FileKey, index: usize, count: usize, plain: &[u8], size: u64) -> Vec<u8> {
    let last = index + 1 == count;
    let mut padded = plain.to_vec();
    padded.resize(padded_len(size, index).max(plain.len()), 0);
    XChaCha20Poly1305::new(Key::from_slice(&key.0))
        .encrypt(
            &nonce(index as u32, u8::from(last)),
            Payload {
                msg: &padded,
                aad: &ad(count),
            },
        )
        .expect("sealing cannot fail")
}

/// Opens chunk `index` of a file of `size` bytes after checking it hashes to `id`:
/// that chunk's part of the file, padding removed.
pub fn open_chunk(
    key: &FileKey,
    id: &ChunkId,
    index: usize,
    size: u64,
    ciphertext: &[u8],
) -> Result<Vec<u8>, FileError> {
    if ChunkId::of(ciphertext) != *id {
        return Err(FileError::WrongId);
    }
    let count = chunk_count(size);
    if index >= count || ciphertext.len() != padded_len(size, index) + TAG_BYTES {
        return Err(FileError::Sealed);
    }
    let last = index + 1 == count;
    let mut plain = XChaCha20Poly1305::new(Key::from_slice(&key.0))
        .decrypt(
            &nonce(index as u32, u8::from(last)),
            Payload {
                msg: ciphertext,
                aad: &ad(count),
            },
        )
        .map_err(|_| FileError::Sealed)?;
    let before = (index * CHUNK_BYTES) as u64;
    plain.truncate(size.saturating_sub(before).min(CHUNK_BYTES as u64) as usize);
    Ok(plain)
}

/// A file's size and the ids of its chunks, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The file's size in bytes.
    pub size: u64,
    /// Its chunks' ids.
    pub chunks: Vec<ChunkId>,
}

impl Manifest {
    /// Seals the manifest as a chunk of its own, under the file's key; returns its id
    /// and ciphertext.
    pub fn seal(&self, key: &FileKey) -> Result<(ChunkId, Vec<u8>), FileError> {
        self.check()?;
        let mut w = Writer::with_capacity(13 + 32 * self.chunks.len());
        w.u8(MANIFEST_VERSION)
            .u64(self.size)
            .u32(self.chunks.len() as u32);
        for id in &self.chunks {
            w.raw(&id.0);
        }
        let mut plain = w.finish();
        plain.resize(manifest_class(self.chunks.len()), 0);
        let sealed = XChaCha20Poly1305::new(Key::from_slice(&key.0))
            .encrypt(
                &nonce(MANIFEST_INDEX, 2),
                Payload {
                    msg: &plain,
                    aad: MANIFEST_AD,
                },
            )
            .expect("sealing cannot fail");
        Ok((ChunkId::of(&sealed), sealed))
    }

    /// Opens a sealed manifest after checking it hashes to `id`.
    pub fn open(key: &FileKey, id: &ChunkId, sealed: &[u8]) -> Result<Self, FileError> {
        if ChunkId::of(sealed) != *id {
            return Err(FileError::WrongId);
        }
        if !is_sealed_len(sealed.len()) {
            return Err(FileError::Sealed);
        }
        let plain = XChaCha20Poly1305::new(Key::from_slice(&key.0))
            .decrypt(
                &nonce(MANIFEST_INDEX, 2),
                Payload {
                    msg: sealed,
                    aad: MANIFEST_AD,
                },
            )
            .map_err(|_| FileError::Sealed)?;
        let mut r = Reader::new(&plain);
        let version = r.u8("manifest version")?;
        if version != MANIFEST_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "manifest",
                version,
            }
            .into());
        }
        let size = r.u64("file size")?;
        if size > MAX_FILE_BYTES {
            return Err(FileError::TooLarge(size));
        }
        let n = r.u32("chunk count")? as usize;
        if n != chunk_count(size) {
            return Err(FileError::Invalid(
                "a manifest lists as many chunks as its size needs",
            ));
        }
        // Padded to the smallest class that holds it, as it is sealed.
        if sealed.len() != manifest_class(n) + TAG_BYTES {
            return Err(FileError::Invalid(
                "a manifest is padded to the smallest size class",
            ));
        }
        let mut chunks = Vec::with_capacity(n);
        for _ in 0..n {
            chunks.push(ChunkId(r.array("chunk id")?));
        }
        // The rest is padding: zeros only.
        if r.rest().iter().any(|b| *b != 0) {
            return Err(FileError::Invalid("a manifest's padding is zeros"));
        }
        Ok(Self { size, chunks })
    }

    fn check(&self) -> Result<(), FileError> {
        if self.size > MAX_FILE_BYTES {
            return Err(FileError::TooLarge(self.size));
        }
        if self.chunks.len() != chunk_count(self.size) {
            return Err(FileError::Invalid(
                "a manifest lists as many chunks as its size needs",
            ));
        }
        Ok(())
    }
}

/// What a chat message says about a file: how to fetch and open it, and what to show
/// before it is fetched. Every field is the sender's word until the file is opened:
/// `size` is checked against the manifest then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    /// The file's key.
    pub key: FileKey,
    /// Its manifest's id.
    pub manifest: ChunkId,
    /// Its size in bytes.
    pub size: u64,
    /// Its name (no path: a name only, checked by the recipient before use).
    pub name: String,
    /// Its media type, such as `image/jpeg` (may be empty).
    pub mime: String,
    /// For images, a small preview (JPEG or PNG), at most [`MAX_THUMBNAIL_BYTES`].
    pub thumbnail: Vec<u8>,
}

impl FileRef {
    /// The encoding inside a content record of kind 10.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(
            32 + 32 + 8 + 2 + self.name.len() + self.mime.len() + 4 + self.thumbnail.len(),
        );
        w.raw(&self.key.0)
            .raw(&self.manifest.0)
            .u64(self.size)
            .bytes8(self.name.as_bytes())
            .bytes8(self.mime.as_bytes())
            .bytes16(&self.thumbnail);
        w.finish()
    }

    /// What names this file in a conversation: a hash of the whole reference, key
    /// included, so no one who lacks the key can make another reference with the same
    /// id (a manifest id alone is seen by relays, and chosen by senders).
    pub fn id(&self) -> [u8; 32] {
        *blake3::Hasher::new_derive_key("kkachi/file-ref/v1")
            .update(&self.encode())
            .finalize()
            .as_bytes()
    }

    /// Decodes one, checking every bound before allocating.
    pub fn decode(bytes: &[u8]) -> Result<Self, FileError> {
        let mut r = Reader::new(bytes);
        let key = FileKey(r.array("file key")?);
        let manifest = ChunkId(r.array("manifest id")?);
        let size = r.u64("file size")?;
        let name = r.str8(MAX_NAME_BYTES, "file name")?.to_owned();
        let mime = r.str8(MAX_MIME_BYTES, "media type")?.to_owned();
        let thumbnail = r.bytes16(MAX_THUMBNAIL_BYTES, "thumbnail")?.to_vec();
        r.finish()?;
        let file = Self {
            key,
            manifest,
            size,
            name,
            mime,
            thumbnail,
        };
        file.check()?;
        Ok(file)
    }

    /// Checks the bounds [`FileRef::decode`] enforces.
    pub fn check(&self) -> Result<(), FileError> {
        if self.size > MAX_FILE_BYTES {
            return Err(FileError::TooLarge(self.size));
        }
        if self.name.len() > MAX_NAME_BYTES || self.name.trim().is_empty() {
            return Err(FileError::Invalid("a file name is 1 to 255 bytes"));
        }
        if self.mime.len() > MAX_MIME_BYTES || !self.mime.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(FileError::Invalid(
                "a media type is up to 127 printable ASCII bytes",
            ));
        }
        if self.thumbnail.len() > MAX_THUMBNAIL_BYTES {
            return Err(FileError::Invalid("a thumbnail is at most 16 KiB"));
        }
        Ok(())
    }
}

const MANIFEST_AD: &[u8] = b"kkachi/file/v1/manifest";

/// The plaintext size a manifest of `n` chunks is sealed at: the smallest size class
/// that holds its 13-byte header and ids.
fn manifest_class(n: usize) -> usize {
    SIZE_CLASSES
        .iter()
        .copied()
        .find(|c| *c >= 13 + 32 * n)
        .unwrap_or(CHUNK_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed_file(key: &FileKey, data: &[u8]) -> (Vec<(ChunkId, Vec<u8>)>, Manifest) {
        let size = data.len() as u64;
        let count = chunk_count(size);
        let chunks: Vec<(ChunkId, Vec<u8>)> = (0..count)
            .map(|i| {
                let part = &data
                    [(i * CHUNK_BYTES).min(data.len())..((i + 1) * CHUNK_BYTES).min(data.len())];
                let c = seal_chunk(key, i, count, part, size);
                (ChunkId::of(&c), c)
            })
            .collect();
        let manifest = Manifest {
            size,
            chunks: chunks.iter().map(|(id, _)| *id).collect(),
        };
        (chunks, manifest)
    }

    #[test]
    fn a_file_opens_whole_and_its_last_chunk_is_padded_to_a_class() {
        let key = FileKey([7; 32]);
        let data: Vec<u8> = (0..CHUNK_BYTES * 2 + 5_000)
            .map(|i| (i % 251) as u8)
            .collect();
        let (chunks, manifest) = sealed_file(&key, &data);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0].1.len(), CHUNK_BYTES + TAG_BYTES);
        // 5,000 bytes left: padded to 16 KiB.
        assert_eq!(chunks[2].1.len(), 16 * 1024 + TAG_BYTES);
        let (mid, sealed) = manifest.seal(&key).unwrap();
        let opened = Manifest::open(&key, &mid, &sealed).unwrap();
        assert_eq!(opened, manifest);
        let mut back = Vec::new();
        for (i, (id, c)) in chunks.iter().enumerate() {
            back.extend(open_chunk(&key, id, i, opened.size, c).unwrap());
        }
        assert_eq!(back, data);
        // An empty file is one chunk of the smallest class.
        let (empty, m) = sealed_file(&key, &[]);
        assert_eq!(empty[0].1.len(), 4 * 1024 + TAG_BYTES);
        assert_eq!(
            open_chunk(&key, &empty[0].0, 0, 0, &empty[0].1).unwrap(),
            b""
        );
        assert_eq!(m.chunks.len(), 1);
    }

    #[test]
    fn moved_cut_damaged_or_foreign_chunks_do_not_open() {
        let key = FileKey([7; 32]);
        let data = vec![1u8; CHUNK_BYTES + 10];
        let (chunks, manifest) = sealed_file(&key, &data);
        let size = manifest.size;
        // At another index.
        assert_eq!(
            open_chunk(&key, &chunks[0].0, 1, size, &chunks[0].1),
            Err(FileError::Sealed)
        );
        // The stream cut short: the first chunk offered as the last of a 1-chunk file.
        assert_eq!(
            open_chunk(&key, &chunks[0].0, 0, CHUNK_BYTES as u64, &chunks[0].1),
            Err(FileError::Sealed)
        );
        // A flipped byte: the id no longer matches; with the id of what it is now, it
        // does not open.
        let mut bad = chunks[1].1.clone();
        bad[3] ^= 1;
        assert_eq!(
            open_chunk(&key, &chunks[1].0, 1, size, &bad),
            Err(FileError::WrongId)
        );
        assert_eq!(
            open_chunk(&key, &ChunkId::of(&bad), 1, size, &bad),
            Err(FileError::Sealed)
        );
        // Another file's key.
        assert_eq!(
            open_chunk(&FileKey([8; 32]), &chunks[0].0, 0, size, &chunks[0].1),
            Err(FileError::Sealed)
        );
        // A manifest claiming another size for the same chunks is refused.
        let wrong = Manifest {
            size: size + CHUNK_BYTES as u64,
            chunks: manifest.chunks.clone(),
        };
        assert!(wrong.seal(&key).is_err());
    }

    #[test]
    fn a_forward_key_is_one_per_file_conversation_person_and_week() {
        let identity = |n: u8| {
            let mut secret = vec![2u8];
            secret.extend([n; 32]);
            secret.extend([9u8; 32]);
            crate::identity::Identity::from_secret_bytes(&secret).unwrap()
        };
        let file = FileRef {
            key: FileKey([7; 32]),
            manifest: ChunkId([8; 32]),
            size: 5,
            name: "a.txt".into(),
            mime: String::new(),
            thumbnail: Vec::new(),
        };
        let (me, week) = (identity(1), 3 * FORWARD_PERIOD_SECS + 5);
        let key = forward_key(&file, b"bob", &me, week);
        assert_eq!(
            hex::encode(key.0),
            "cc909939025f8e812e478356eba7c0e3c0ad69d10b842f5cf7f1d7c7771dfaf3",
            "known answer (checked with Python's blake3)"
        );
        assert_eq!(
            key.0,
            forward_key(&file, b"bob", &me, 3 * FORWARD_PERIOD_SECS).0,
            "the same all week"
        );
        let other = |k: FileKey| assert_ne!(k.0, key.0);
        other(forward_key(&file, b"carol", &me, week));
        other(forward_key(&file, b"bob", &identity(2), week));
        other(forward_key(&file, b"bob", &me, week + FORWARD_PERIOD_SECS));
        // Another file under the same key (its sender's doing) gets another key.
        let renamed = FileRef {
            name: "b.txt".into(),
            ..file.clone()
        };
        other(forward_key(&renamed, b"bob", &me, week));
        // The session key does not change it: only the identity's secret does.
        let rotated = me.with_new_session_key(&mut rand_core::OsRng);
        assert_eq!(forward_key(&file, b"bob", &rotated, week).0, key.0);
    }

    #[test]
    fn known_answers() {
        let key = FileKey([7; 32]);
        let c = seal_chunk(&key, 0, 1, b"kkachi", 6);
        assert_eq!(c.len(), 4 * 1024 + TAG_BYTES);
        // Computed independently (libsodium's XChaCha20-Poly1305 and the BLAKE3
        // reference implementation).
        assert_eq!(
            ChunkId::of(&c).to_hex(),
            "ffe2a1d6051f9626c93012819b686656b825dd8b0ebfa55978f9ad2b3181bc41"
        );
        let (mid, _) = Manifest {
            size: 6,
            chunks: vec![ChunkId::of(&c)],
        }
        .seal(&key)
        .unwrap();
        assert_eq!(
            mid.to_hex(),
            "f4243e5119d41b9f597373cf87ad6c4cf2b535127139893f0b4b333af9c5079d"
        );
        let file = FileRef {
            key,
            manifest: mid,
            size: 6,
            name: "지도.png".into(),
            mime: "image/png".into(),
            thumbnail: vec![1, 2, 3],
        };
        let bytes = file.encode();
        assert_eq!(FileRef::decode(&bytes).unwrap(), file);
        assert_eq!(
            hex::encode(&bytes[64..]),
            "00000000000000060aeca780eb8f842e706e6709696d6167652f706e670003010203"
        );
        // The BLAKE3 reference implementation, derive_key mode, over those bytes.
        assert_eq!(
            hex::encode(file.id()),
            "da958865d756d194e6fad3901dfd49c9eaaf5910015b4e81286dc97261715547"
        );
        // Another key, the same manifest id: another file.
        let other = FileRef {
            key: FileKey([8; 32]),
            ..file.clone()
        };
        assert_ne!(other.id(), file.id());
    }

    #[test]
    fn file_refs_are_bounded_both_ways() {
        let ok = FileRef {
            key: FileKey([1; 32]),
            manifest: ChunkId([2; 32]),
            size: 10,
            name: "a.txt".into(),
            mime: "text/plain".into(),
            thumbnail: vec![],
        };
        for bad in [
            FileRef {
                size: MAX_FILE_BYTES + 1,
                ..ok.clone()
            },
            FileRef {
                name: " ".into(),
                ..ok.clone()
            },
            FileRef {
                mime: "text/plain\n".into(),
                ..ok.clone()
            },
            FileRef {
                thumbnail: vec![0; MAX_THUMBNAIL_BYTES + 1],
                ..ok.clone()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
        // Truncated and over-long encodings are refused.
        let bytes = ok.encode();
        for n in 0..bytes.len() {
            assert!(FileRef::decode(&bytes[..n]).is_err(), "{n}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(FileRef::decode(&long).is_err());
    }
}
