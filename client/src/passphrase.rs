//! Passphrases typed at the terminal, without echo.

use std::io::{BufRead, Write};
use std::path::Path;

use zeroize::Zeroizing;

/// Where a new passphrase may come from without a terminal (scripts, tests).
pub const NEW_PASSPHRASE_ENV: &str = "KKACHI_NEW_PASSPHRASE";
/// The shortest passphrase taken.
pub const MIN_LEN: usize = 8;

/// Reads one line from the controlling terminal with echo off; `None` without one.
pub fn read_line_hidden(prompt: &str) -> Option<Zeroizing<String>> {
    read_hidden(prompt)
}

fn read_hidden(prompt: &str) -> Option<Zeroizing<String>> {
    use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .ok()?;
    let before = tcgetattr(&tty).ok()?;
    let mut quiet = before.clone();
    quiet.local_modes -= LocalModes::ECHO;
    quiet.local_modes |= LocalModes::ECHONL;
    tcsetattr(&tty, OptionalActions::Flush, &quiet).ok()?;
    let mut out = &tty;
    let _ = out.write_all(prompt.as_bytes());
    let _ = out.flush();
    let mut line = Zeroizing::new(String::new());
    let read = std::io::BufReader::new(&tty).read_line(&mut line);
    let _ = tcsetattr(&tty, OptionalActions::Flush, &before);
    read.ok()?;
    while line.ends_with(['\n', '\r']) {
        line.pop();
    }
    Some(line)
}

/// Asks for the passphrase of `home` at the terminal (the store's prompt).
pub fn prompt(home: &Path, again: bool) -> Option<Zeroizing<String>> {
    let lead = if again {
        "That passphrase does not unlock it. "
    } else {
        ""
    };
    read_hidden(&format!("{lead}Passphrase for {}: ", home.display()))
}

/// The current passphrase of `home`, for changing or removing it: from
/// [`PASSPHRASE_ENV`](crate::store::PASSPHRASE_ENV), or typed at the terminal.
pub fn read_current(home: &Path) -> Result<Zeroizing<String>, String> {
    if let Ok(p) = std::env::var(crate::store::PASSPHRASE_ENV) {
        return Ok(Zeroizing::new(p));
    }
    read_hidden(&format!("Current passphrase for {}: ", home.display())).ok_or_else(|| {
        format!(
            "no terminal to ask for the current passphrase: run this in one, or set {}",
            crate::store::PASSPHRASE_ENV
        )
    })
}

/// A new passphrase: from [`NEW_PASSPHRASE_ENV`], or typed twice at the terminal.
pub fn read_new() -> Result<Zeroizing<String>, String> {
    let new = match std::env::var(NEW_PASSPHRASE_ENV) {
        Ok(p) => Zeroizing::new(p),
        Err(_) => {
            let first = read_hidden("New passphrase: ").ok_or_else(|| {
                format!("no terminal to ask for the new passphrase: run this in one, or set {NEW_PASSPHRASE_ENV}")
            })?;
            let again = read_hidden("The same again: ")
                .ok_or_else(|| "the terminal went away".to_string())?;
            if *first != *again {
                return Err("the two passphrases differ; nothing was changed".into());
            }
            first
        }
    };
    if new.chars().count() < MIN_LEN {
        return Err(format!(
            "a passphrase needs at least {MIN_LEN} characters; nothing was changed"
        ));
    }
    Ok(new)
}
