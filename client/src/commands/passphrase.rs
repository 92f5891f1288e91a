//! `kkachi passphrase set|remove|status`: how the key of the local store is kept.

use serde_json::json;

use super::{App, CommandError, Output, fail};
use crate::cli::PassphraseCommand;
use crate::store::{PASSPHRASE_ENV, Protection, key_path};

fn label(p: Protection) -> &'static str {
    match p {
        Protection::KeyFile => "key file",
        Protection::Passphrase => "passphrase",
        Protection::Clear => "clear",
    }
}

impl App {
    pub(super) fn passphrase(
        &self,
        command: PassphraseCommand,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        let home = self.store.home().to_path_buf();
        let key = key_path(&home);
        let said = match command {
            PassphraseCommand::Set { new, current } => {
                let Some(new) = new else {
                    return fail("no new passphrase was given");
                };
                if new.chars().count() < crate::passphrase::MIN_LEN {
                    return fail(format!(
                        "a passphrase needs at least {} characters; nothing was changed",
                        crate::passphrase::MIN_LEN
                    ));
                }
                let had = self.store.protection();
                self.store.set_passphrase(current.as_deref(), Some(&new))?;
                if had == Protection::Passphrase {
                    "The passphrase is changed.".to_string()
                } else {
                    format!(
                        "kkachi now asks for this passphrase at every start (or reads {PASSPHRASE_ENV}). It cannot be recovered if forgotten."
                    )
                }
            }
            PassphraseCommand::Remove { current } => {
                if self.store.protection() != Protection::Passphrase {
                    return fail(format!("{} has no passphrase", home.display()));
                }
                self.store.set_passphrase(current.as_deref(), None)?;
                format!(
                    "The passphrase is removed: the key is in {}, readable only by you.",
                    key.display()
                )
            }
            PassphraseCommand::Status => match self.store.protection() {
                Protection::Passphrase => format!(
                    "Everything in {} is sealed; its key is in {} under a passphrase.",
                    home.display(),
                    key.display()
                ),
                Protection::KeyFile => format!(
                    "Everything in {} is sealed; its key is in {}, readable only by you (no passphrase: `kkachi passphrase set` adds one).",
                    home.display(),
                    key.display()
                ),
                Protection::Clear => format!("{} is not sealed.", home.display()),
            },
        };
        if json {
            out.json(json!({ "protection": label(self.store.protection()),
                             "key_file": key.display().to_string() }));
        } else {
            out.out(said);
        }
        Ok(())
    }
}
