//! The database key, and the file that keeps it: `HOME/key`, owner-only.
//!
//! The key is 32 random bytes made with the home. The file keeps it as it is (the
//! home's permissions protect it, as an SSH key without a passphrase), or wrapped
//! under a key derived from a passphrase with Argon2id. Changing or removing the
//! passphrase rewrites this file only; the database is never sealed again.
//!
//! Layout: `"kkachi-key" ‖ version (1) ‖ kind ‖ body ‖ BLAKE2s-256(everything before)`.
//! The check tells a damaged file from a wrong passphrase. Kinds:
//! - 0, key: `key (32)`;
//! - 1, passphrase: `memory KiB (u32) ‖ passes (u32) ‖ lanes (u32) ‖ salt (16) ‖
//!   nonce (24) ‖ XChaCha20-Poly1305(key) (48)`, the header up to the nonce as
//!   associated data;
//! - 2, clear: no key; the database is not sealed. Made only by
//!   [`super::LocalStore::provision_clear`], to measure what sealing costs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use blake2::Digest;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use super::StoreError;

/// The key file's name in the home directory.
pub const KEY_FILE: &str = "key";
/// The environment variable a passphrase may come from (scripts, services).
pub const PASSPHRASE_ENV: &str = "KKACHI_PASSPHRASE";

const MAGIC: &[u8] = b"kkachi-key";
const VERSION: u8 = 1;
const CHECK_LEN: usize = 32;
const KIND_KEY: u8 = 0;
const KIND_PASSPHRASE: u8 = 1;
const KIND_CLEAR: u8 = 2;

/// Argon2id cost of a new wrapping: 64 MiB, 3 passes, one lane (about a third of a
/// second on a laptop core).
const MEMORY_KIB: u32 = 64 << 10;
const PASSES: u32 = 3;
const LANES: u32 = 1;
/// The most a key file may ask for, so a planted one cannot make kkachi allocate or
/// work without bound (four times the cost of a new wrapping).
const MAX_MEMORY_KIB: u32 = 256 << 10;
const MAX_PASSES: u32 = 12;
const MAX_LANES: u32 = 4;
/// The longest key file read.
const MAX_KEY_FILE: u64 = 4096;

/// How the key is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// In the key file as it is, readable by the owner only.
    KeyFile,
    /// Wrapped under a passphrase.
    Passphrase,
    /// No key: the database is not sealed (measurements only).
    Clear,
}

/// The database key once unlocked.
#[derive(Debug)]
pub(super) struct Unlocked {
    /// `None` in the clear.
    pub(super) key: Option<Zeroizing<[u8; 32]>>,
    pub(super) protection: Protection,
}

/// Asks the person for the passphrase of `home` (no echo; `again` after a wrong one);
/// `None` if nobody can be asked.
pub type PassphrasePrompt = fn(home: &Path, again: bool) -> Option<Zeroizing<String>>;

static PROMPT: OnceLock<PassphrasePrompt> = OnceLock::new();

/// How a passphrase is asked for when [`PASSPHRASE_ENV`] is not set (the binary sets a
/// terminal prompt; a library user may set its own).
pub fn set_passphrase_prompt(prompt: PassphrasePrompt) {
    let _ = PROMPT.set(prompt);
}

/// The key file of `home`.
pub fn key_path(home: &Path) -> PathBuf {
    home.join(KEY_FILE)
}

fn damaged(path: &Path, why: &str) -> StoreError {
    StoreError::KeyFile(format!(
        "the key file {} is damaged ({why}); without it the database cannot be read: put back a copy of it, or restore from a backup",
        path.display()
    ))
}

fn encode(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 2 + body.len() + CHECK_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(body);
    let check = blake2::Blake2s256::digest(&out);
    out.extend_from_slice(&check);
    out
}

fn kek(
    passphrase: &str,
    salt: &[u8],
    m: u32,
    t: u32,
    p: u32,
) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    let params = argon2::Params::new(m, t, p, Some(32))
        .map_err(|e| StoreError::KeyFile(format!("passphrase parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase.as_bytes(), salt, out.as_mut())
        .map_err(|e| StoreError::KeyFile(format!("passphrase: {e}")))?;
    Ok(out)
}

/// The key file's bytes for `key`, wrapped under `passphrase` if one is given.
fn key_file(key: &[u8; 32], passphrase: Option<&str>) -> Result<Vec<u8>, StoreError> {
    let Some(passphrase) = passphrase else {
        return Ok(encode(KIND_KEY, key));
    };
    let salt: [u8; 16] = rand::random();
    let nonce: [u8; 24] = rand::random();
    let mut header = Vec::new();
    header.extend_from_slice(MAGIC);
    header.push(VERSION);
    header.push(KIND_PASSPHRASE);
    for n in [MEMORY_KIB, PASSES, LANES] {
        header.extend_from_slice(&n.to_be_bytes());
    }
    header.extend_from_slice(&salt);
    let wrapping = kek(passphrase, &salt, MEMORY_KIB, PASSES, LANES)?;
    let sealed = XChaCha20Poly1305::new((&*wrapping).into())
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: key,
                aad: &header,
            },
        )
        .expect("sealing in memory does not fail");
    let mut body = header[MAGIC.len() + 2..].to_vec();
    body.extend_from_slice(&nonce);
    body.extend_from_slice(&sealed);
    Ok(encode(KIND_PASSPHRASE, &body))
}

/// Writes `bytes` as `home`'s key file, owner-only, whole or not at all.
fn write_key_file(home: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = key_path(home);
    let tmp = home.join(format!(".{KEY_FILE}.{:016x}", rand::random::<u64>()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(home)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        StoreError::KeyFile(format!("cannot write {}: {e}", path.display()))
    })
}

/// A new key for a new home, kept in its key file.
pub(super) fn create(home: &Path) -> Result<Unlocked, StoreError> {
    let key = Zeroizing::new(rand::random::<[u8; 32]>());
    write_key_file(home, &key_file(&key, None)?)?;
    Ok(Unlocked {
        key: Some(key),
        protection: Protection::KeyFile,
    })
}

/// Marks a new home as kept in the clear.
pub(super) fn create_clear(home: &Path) -> Result<(), StoreError> {
    write_key_file(home, &encode(KIND_CLEAR, &[]))
}

/// Rewrites `home`'s key file for `key`, under `passphrase` or (`None`) without one.
pub(super) fn rewrap(
    home: &Path,
    key: &[u8; 32],
    passphrase: Option<&str>,
) -> Result<(), StoreError> {
    write_key_file(home, &key_file(key, passphrase)?)
}

/// True if `home`'s key is under a passphrase.
pub fn has_passphrase(home: &Path) -> bool {
    std::fs::read(key_path(home))
        .is_ok_and(|b| b.starts_with(MAGIC) && b.get(MAGIC.len() + 1) == Some(&KIND_PASSPHRASE))
}

/// Reads `home`'s key file; `None` if there is none. A passphrase is `given`, or taken
/// from [`PASSPHRASE_ENV`], or asked for.
pub(super) fn unlock(home: &Path, given: Option<&str>) -> Result<Option<Unlocked>, StoreError> {
    let path = key_path(home);
    let cannot =
        |e: std::io::Error| StoreError::KeyFile(format!("cannot read {}: {e}", path.display()));
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(cannot(e)),
    };
    // Bounded, and a file: not a device or a pipe planted in its place.
    if !file.metadata().map_err(cannot)?.is_file() {
        return Err(damaged(&path, "not a file"));
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_KEY_FILE + 1), &mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(damaged(&path, "too long"));
    }
    if !bytes.starts_with(MAGIC) {
        return Err(damaged(&path, "not a kkachi key file"));
    }
    if bytes.len() < MAGIC.len() + 2 + CHECK_LEN {
        return Err(damaged(&path, "cut short"));
    }
    let (signed, check) = bytes.split_at(bytes.len() - CHECK_LEN);
    if blake2::Blake2s256::digest(signed).as_slice() != check {
        return Err(damaged(&path, "its check does not match"));
    }
    if signed[MAGIC.len()] != VERSION {
        return Err(StoreError::KeyFile(format!(
            "the key file {} was written by a newer kkachi (version {}): update kkachi",
            path.display(),
            signed[MAGIC.len()]
        )));
    }
    let kind = signed[MAGIC.len() + 1];
    let body = &signed[MAGIC.len() + 2..];
    match kind {
        KIND_KEY => {
            let key: [u8; 32] = body
                .try_into()
                .map_err(|_| damaged(&path, "wrong length"))?;
            Ok(Some(Unlocked {
                key: Some(Zeroizing::new(key)),
                protection: Protection::KeyFile,
            }))
        }
        KIND_CLEAR if body.is_empty() => Ok(Some(Unlocked {
            key: None,
            protection: Protection::Clear,
        })),
        KIND_PASSPHRASE => unwrap_with_passphrase(home, &path, signed, given).map(Some),
        _ => Err(damaged(&path, "unknown kind")),
    }
}

fn unwrap_with_passphrase(
    home: &Path,
    path: &Path,
    signed: &[u8],
    given: Option<&str>,
) -> Result<Unlocked, StoreError> {
    let body = &signed[MAGIC.len() + 2..];
    if body.len() != 12 + 16 + 24 + 48 {
        return Err(damaged(path, "wrong length"));
    }
    let n = |i: usize| u32::from_be_bytes(body[i..i + 4].try_into().expect("4 bytes"));
    let (m, t, p) = (n(0), n(4), n(8));
    if m > MAX_MEMORY_KIB || !(1..=MAX_PASSES).contains(&t) || !(1..=MAX_LANES).contains(&p) {
        return Err(damaged(path, "passphrase parameters out of range"));
    }
    let salt = &body[12..28];
    let nonce = &body[28..52];
    let sealed = &body[52..];
    let header = &signed[..MAGIC.len() + 2 + 28];
    let try_one = |passphrase: &str| -> Result<Option<Zeroizing<[u8; 32]>>, StoreError> {
        let wrapping = kek(passphrase, salt, m, t, p)?;
        Ok(XChaCha20Poly1305::new((&*wrapping).into())
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: header,
                },
            )
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
            .map(Zeroizing::new))
    };
    let unlocked = |key| Unlocked {
        key: Some(key),
        protection: Protection::Passphrase,
    };
    let wrong = |from: &str| {
        StoreError::WrongPassphrase(format!(
            "the passphrase {from} does not unlock {}",
            home.display()
        ))
    };
    if let Some(passphrase) = given {
        return try_one(passphrase)?
            .map(unlocked)
            .ok_or_else(|| wrong("given"));
    }
    if let Ok(passphrase) = std::env::var(PASSPHRASE_ENV) {
        let passphrase = Zeroizing::new(passphrase);
        return try_one(&passphrase)?
            .map(unlocked)
            .ok_or_else(|| wrong(&format!("in {PASSPHRASE_ENV}")));
    }
    let Some(prompt) = PROMPT.get() else {
        return Err(needed(home));
    };
    for attempt in 0..3 {
        let Some(passphrase) = prompt(home, attempt > 0) else {
            return Err(needed(home));
        };
        if let Some(key) = try_one(&passphrase)? {
            return Ok(unlocked(key));
        }
    }
    Err(StoreError::WrongPassphrase(format!(
        "three passphrases did not unlock {}",
        home.display()
    )))
}

fn needed(home: &Path) -> StoreError {
    StoreError::PassphraseNeeded(format!(
        "{} is protected by a passphrase: run kkachi in a terminal to be asked for it, or set {PASSPHRASE_ENV}",
        home.display()
    ))
}
