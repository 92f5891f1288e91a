//! `kkachi backup create|verify|restore` (SPEC.md §11).

use std::path::Path;

use serde_json::json;

use super::{App, CommandError, Output};
use crate::backup::{self, BackupError, Ending, RECOVERY_KEY_ENV};

impl From<BackupError> for CommandError {
    fn from(e: BackupError) -> Self {
        CommandError::Refused(e.to_string())
    }
}

impl App {
    pub(super) fn backup_create(
        &mut self,
        to: &Path,
        new_key: bool,
        interactive: bool,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        self.identity()?;
        let (secret, recipient) = match self.store.backup_recipient()? {
            Some(r) if !new_key => (None, r),
            None if !new_key && !interactive => {
                return Err(CommandError::Refused(
                    "the first backup makes your recovery key and shows it once: run it in a terminal, or add --new-key to have the key printed where the output goes".into(),
                ));
            }
            _ => {
                let (secret, public) = backup::new_recovery_key();
                (Some(secret), public)
            }
        };
        // The daemon's other work goes on meanwhile (it may take the command).
        let (counts, bytes) =
            tokio::task::block_in_place(|| backup::create(&self.store, &recipient, to))?;
        // Only once the file is whole: a failed first backup leaves no key behind.
        self.store
            .note_backup(&recipient, crate::engine::now_ms())?;
        if json {
            out.json(json!({ "file": to.display().to_string(), "bytes": bytes,
                             "contacts": counts.contacts, "messages": counts.messages,
                             "records": counts.records, "recovery_key": secret }));
            return Ok(());
        }
        out.out(format!(
            "Backed up {} contacts and {} messages to {} ({} KiB).",
            counts.contacts,
            counts.messages,
            to.display(),
            bytes.div_ceil(1024)
        ));
        if let Some(secret) = secret {
            out.out(String::new());
            out.out("Your recovery key. It is shown this once: write it down or keep it in a password manager.");
            out.out("Without it no backup can be read; with it anyone can read them.");
            out.out(String::new());
            out.out(format!("    {secret}"));
            out.out(String::new());
            out.out("Later backups go to the same key and need no secret.");
        }
        Ok(())
    }
}

/// The recovery key, from the environment or typed at the terminal.
fn recovery_key() -> Result<age::x25519::Identity, CommandError> {
    let text = match std::env::var(RECOVERY_KEY_ENV) {
        Ok(k) => zeroize::Zeroizing::new(k),
        Err(_) => crate::passphrase::read_line_hidden("Recovery key: ").ok_or_else(|| {
            CommandError::Refused(format!(
                "no terminal to ask for the recovery key: run this in one, or set {RECOVERY_KEY_ENV}"
            ))
        })?,
    };
    Ok(backup::parse_recovery_key(&text)?)
}

fn ending_line(file: &Path, ending: &Ending, what: &str) -> Option<String> {
    match ending {
        Ending::Whole => None,
        Ending::Damaged { chunk } => Some(format!(
            "{} is damaged at chunk {} (bytes {}–{} of its contents): {what} everything before it; what came after is lost",
            file.display(),
            chunk,
            chunk * backup::CHUNK,
            (chunk + 1) * backup::CHUNK
        )),
        Ending::CutShort => Some(format!(
            "{} ends early (copied only in part?): {what} everything it holds",
            file.display()
        )),
    }
}

/// An error line on stderr, as JSON under `--json` (as every command's errors are).
fn push_error(out: &mut Output, line: &str, json: bool) {
    if json {
        out.stderr
            .push_str(&format!("{}\n", json!({ "error": line })));
    } else {
        out.stderr.push_str(&format!("error: {line}\n"));
    }
}

fn ending_json(ending: &Ending) -> serde_json::Value {
    match ending {
        Ending::Whole => json!("whole"),
        Ending::Damaged { chunk } => json!({ "damaged_chunk": chunk }),
        Ending::CutShort => json!("cut short"),
    }
}

/// `backup verify FILE`: reads it through. Exit status 1 unless it is whole.
pub fn verify(file: &Path, json: bool) -> Result<Output, CommandError> {
    let key = recovery_key()?;
    let started = std::time::Instant::now();
    let (counts, ending) = backup::read(file, &key, |_| Ok(()))?;
    let mut out = Output::default();
    if json {
        out.json(json!({
            "file": file.display().to_string(),
            "contacts": counts.contacts,
            "messages": counts.messages,
            "records": counts.records,
            "made_at": counts.made_ms,
            "ending": ending_json(&ending),
            "ms": started.elapsed().as_millis() as u64,
        }));
    } else {
        out.out(format!(
            "{} holds {} contacts and {} messages ({} records), made {}.",
            file.display(),
            counts.contacts,
            counts.messages,
            counts.records,
            crate::time::format_ms(counts.made_ms)
        ));
    }
    match ending_line(file, &ending, "read") {
        None => {
            if !json {
                out.out("It reads whole with this recovery key.");
            }
        }
        Some(line) => {
            push_error(&mut out, &line, json);
            out.code = 1;
        }
    }
    Ok(out)
}

/// `backup restore FILE` into `home`. Exit status 1 if only part was restored.
pub fn restore(home: &Path, file: &Path, json: bool) -> Result<Output, CommandError> {
    let key = recovery_key()?;
    let started = std::time::Instant::now();
    let restored = backup::restore(home, file, &key)?;
    let mut out = Output::default();
    let ms = started.elapsed().as_millis() as u64;
    if json {
        out.json(json!({
            "home": home.display().to_string(),
            "contacts": restored.counts.contacts,
            "messages": restored.counts.messages,
            "records": restored.counts.records,
            "made_at": restored.counts.made_ms,
            "resend": restored.resend,
            "new_key": restored.new_key,
            "ending": ending_json(&restored.ending),
            "ms": ms,
        }));
    } else {
        out.out(format!(
            "Restored {} contacts and {} messages (a backup made {}) into {} in {:.1} s.",
            restored.counts.contacts,
            restored.counts.messages,
            crate::time::format_ms(restored.counts.made_ms),
            home.display(),
            ms as f64 / 1000.0
        ));
        if restored.new_key {
            out.out("This device has a new session key: at the next start your contacts get your card, take the key, and send again what you had not received. The key the backup held is taken out of your devices, so nothing new is sealed to it.");
            out.out("The invite codes you gave out before reach you no more: share `kkachi invite` again.");
            out.out("This device keeps the name the backup's had: `kkachi device rename NAME` gives it its own.");
        } else {
            out.out("Conversations go on with new sessions: at the next start your contacts get your card again and send again what you had not received.");
            out.warn("This device keeps the session key the backup held: your account has listed as many device keys as it may. A new identity starts a new list.");
        }
        if restored.resend > 0 {
            out.out(format!(
                "{} message(s) you sent had not been delivered when the backup was made: they go again then.",
                restored.resend
            ));
        }
        out.out("Restore only if the old device is gone: once your contacts take the new key, it is shut out.");
        out.out("This home has no passphrase yet: `kkachi passphrase set` adds one.");
    }
    if let Some(line) = ending_line(file, &restored.ending, "restored") {
        push_error(&mut out, &line, json);
        out.code = 1;
    }
    Ok(out)
}
