//! `kkachi bundle export|import`: messages carried on a drive (SPEC.md §10).

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use kkachi_protocol::bundle::{self, MAX_BUNDLE_LEN};
use serde_json::json;

use super::{App, CommandError, Output, fail};
use crate::engine::{export_items, now_ms};
use crate::store::OutboxKind;

/// How long an import tries to put what it carries into relays before it returns
/// (what is left goes with the next `sync`, `daemon` or UI).
const DELIVER_WITHIN: Duration = Duration::from_secs(10);

impl App {
    pub(super) fn bundle_export(
        &mut self,
        to: &Path,
        contact: Option<&str>,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        self.identity()?;
        let only = contact.map(|c| self.resolve(c)).transpose()?;
        let mut items = export_items(&self.store, only.as_ref().map(|c| &c.peer), now_ms() / 1000)?;
        // Oldest first, as many as fit.
        let room = MAX_BUNDLE_LEN - 64;
        let mut used = 0;
        let mut fits = 0;
        for item in &items {
            if used + item.encoded_len() > room {
                break;
            }
            used += item.encoded_len();
            fits += 1;
        }
        let left_out = items.len() - fits;
        items.truncate(fits);
        let bytes = bundle::encode(&items).map_err(|e| CommandError::Refused(e.to_string()))?;
        write_private(to, &bytes)
            .map_err(|e| CommandError::Refused(format!("cannot write {}: {e}", to.display())))?;
        if json {
            out.json(json!({
                "file": to.display().to_string(),
                "envelopes": items.len(),
                "bytes": bytes.len(),
                "left_out": left_out,
            }));
        } else {
            let whom = only
                .as_ref()
                .map(|c| format!(" for {}", c.name))
                .unwrap_or_default();
            out.out(crate::sanitize::for_terminal(&format!(
                "wrote {} envelope(s){whom} ({} KiB) to {}",
                items.len(),
                bytes.len().div_ceil(1024),
                to.display()
            )));
            if left_out > 0 {
                out.warn(format!(
                    "{left_out} more did not fit ({} MiB at most): export them to another file after these are delivered",
                    MAX_BUNDLE_LEN >> 20
                ));
            }
            out.out("anyone can carry it: `kkachi bundle import FILE` on any kkachi delivers them (the recipient reads theirs at once; others pass them on to the relays when one answers). It holds no names and nothing readable.");
        }
        Ok(())
    }

    pub(super) async fn bundle_import(
        &mut self,
        file: &Path,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        self.identity()?;
        // Reading and checking up to 256 MiB is no work for the async threads.
        let path = file.to_path_buf();
        let items = tokio::task::spawn_blocking(move || {
            let bytes = read_bounded(&path)?;
            bundle::decode(&bytes)
                .map_err(|e| CommandError::Refused(format!("{}: {e}", path.display())))
        })
        .await
        .map_err(|e| CommandError::Refused(format!("reading the bundle failed: {e}")))??;
        let engine = self.engine()?;
        let imported = engine.import_bundle(items).await?;
        // What it carries for others, and the receipts for what it brought us, go now
        // if a relay answers.
        let _ = tokio::time::timeout(DELIVER_WITHIN, engine.deliver_now()).await;
        let carrying = self
            .store
            .outbox()?
            .iter()
            .filter(|(_, e)| e.kind == OutboxKind::Forward)
            .count();
        if json {
            out.json(json!({
                "envelopes": imported.envelopes,
                "for_you": imported.for_us,
                "shown": imported.shown,
                "already_had": imported.already_had,
                "forwarding": imported.forwarding,
                "already_queued": imported.already_queued,
                "expired": imported.expired,
                "no_relay": imported.no_relay,
                "over_limit": imported.over_limit,
                "carrying": carrying,
            }));
            return Ok(());
        }
        out.out(format!(
            "{} envelope(s): {} for you ({} new message(s); {} you had already)",
            imported.envelopes, imported.for_us, imported.shown, imported.already_had
        ));
        if imported.forwarding > 0 || carrying > 0 {
            out.out(format!(
                "{} for others, queued for their relays; {carrying} still wait for a relay to answer (they go with `kkachi sync`, the daemon or the UI)",
                imported.forwarding
            ));
        }
        if imported.already_queued > 0 {
            out.out(format!(
                "{} were in your outbox already",
                imported.already_queued
            ));
        }
        if imported.expired > 0 {
            out.warn(format!("{} had expired and were dropped", imported.expired));
        }
        if imported.no_relay > 0 {
            out.warn(format!(
                "{} were for others but named no relay to take them to",
                imported.no_relay
            ));
        }
        if imported.over_limit > 0 {
            out.warn(format!(
                "{} were not taken: this kkachi carries at most {} envelopes ({} MiB) for others at once, to at most {} relays",
                imported.over_limit,
                crate::engine::MAX_FORWARDING,
                crate::engine::MAX_FORWARDING_BYTES >> 20,
                crate::engine::MAX_CARRIED_RELAYS
            ));
        }
        Ok(())
    }
}

/// Reads `file`, refusing it before reading if it is larger than any bundle may be.
fn read_bounded(file: &Path) -> Result<Vec<u8>, CommandError> {
    let cannot =
        |e: std::io::Error| CommandError::Refused(format!("cannot read {}: {e}", file.display()));
    let f = std::fs::File::open(file).map_err(cannot)?;
    let meta = f.metadata().map_err(cannot)?;
    if !meta.is_file() {
        return fail(format!("{} is not a file", file.display()));
    }
    let len = meta.len();
    if len > MAX_BUNDLE_LEN as u64 {
        return fail(format!(
            "{}: {}",
            file.display(),
            bundle::BundleError::TooLarge {
                len,
                max: MAX_BUNDLE_LEN as u64
            }
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(MAX_BUNDLE_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    Ok(bytes)
}

/// Writes `bytes` to `to` readable by its owner only, whole or not at all: into a new
/// file of a random name beside it (never one that exists, nor through a link), synced,
/// then renamed over it.
fn write_private(to: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match to.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle".into());
    let partial = dir.join(format!(".{name}.{:016x}.partial", rand::random::<u64>()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&partial)?;
    let result = (|| {
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&partial, to)?;
        // The rename itself, durable.
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}
