//! `kkachi`: parses the command line, opens the home directory (or forwards the
//! command to the daemon that holds it), runs the command, prints its output.
//!
//! Its one event loop is the engine's owner task (see the `kkachi_client` crate docs):
//! `daemon` and the UI run it until SIGTERM or Ctrl-C, then shut it down, which
//! finishes the writes under way and flushes before the process exits 0; one-shot
//! commands run it for as long as the command takes.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use kkachi_client::cli::{BackupCommand, BundleCommand, Cli, Command, DeviceCommand};
use kkachi_client::commands::{App, CommandError, Output, print_received, request_line};
use kkachi_client::engine::{AppEvent, Mode};
use kkachi_client::store::{LocalStore, StoreError};
use kkachi_client::{ipc, runtime};

fn default_home() -> PathBuf {
    directories::ProjectDirs::from("", "", "kkachi")
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from(".kkachi"))
}

/// Fields that name a person (a contact, someone writing to us, a peer met directly) or
/// an envelope a relay also knows. Logged as a short alias: the same within one run,
/// unrelated in the next, so a log tells events apart without saying who took part.
const ALIASED_FIELDS: [&str; 6] = [
    "peer",
    "from",
    "contact",
    "envelope",
    "remote_peer_id",
    "to",
];

/// `kkachi.log` past this is moved to `kkachi.log.1` (replacing the one before) at start.
const LOG_ROTATE_BYTES: u64 = 8 << 20;

/// Logs to `to_file` (the UI) or standard error; `online` (the UI and the daemon) also
/// logs kkachi's own events at info level (a relay coming back, a message held).
/// Identities are aliased ([`ALIASED_FIELDS`]); relays' addresses are not.
fn init_logging(to_file: Option<&Path>, online: bool) {
    use blake2::digest::Mac;
    use tracing_subscriber::field::MakeExt;
    let default = if online {
        "warn,kkachi_client=info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let run_key: [u8; 32] = rand::random();
    let fields = tracing_subscriber::fmt::format::debug_fn(move |w, field, value| {
        let name = field.name();
        if ALIASED_FIELDS.contains(&name) {
            let mut mac =
                <blake2::Blake2sMac256 as Mac>::new_from_slice(&run_key).expect("32-byte keys");
            mac.update(format!("{value:?}").as_bytes());
            let tag = mac.finalize().into_bytes();
            write!(
                w,
                "{name}=#{:02x}{:02x}{:02x}{:02x}",
                tag[0], tag[1], tag[2], tag[3]
            )
        } else if name == "message" {
            write!(w, "{value:?}")
        } else {
            write!(w, "{name}={value:?}")
        }
    })
    .delimited(" ");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .fmt_fields(fields);
    let file = to_file.and_then(|p| {
        if std::fs::metadata(p).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
            let _ = std::fs::rename(p, p.with_extension("log.1"));
        }
        use std::os::unix::fs::OpenOptionsExt;
        // Readable by the home's owner only, like everything in it.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(p)
            .ok()
    });
    // The UI's screen is the terminal: a log file it cannot open means no log, never
    // lines written over the screen.
    if to_file.is_some() && file.is_none() && online {
        return;
    }
    match file {
        Some(file) => builder
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
            .init(),
        None => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
    }
}

/// Writes a command's output; its exit code.
fn write_output(output: &Output) -> u8 {
    let _ = std::io::stdout().write_all(output.stdout.as_bytes());
    let _ = std::io::stderr().write_all(output.stderr.as_bytes());
    output.code.clamp(0, 255) as u8
}

fn emit(output: &Output) -> ExitCode {
    ExitCode::from(write_output(output))
}

/// Errors are printed as JSON (`{"error": "…"}`) once `--json` was given.
static JSON_ERRORS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Reports an error; the exit code for it.
fn report(e: impl std::fmt::Display) -> u8 {
    if JSON_ERRORS.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!("{}", serde_json::json!({ "error": e.to_string() }));
    } else {
        eprintln!("error: {e}");
    }
    1
}

/// Why `home` cannot serve a command other than `init`: it holds no identity. Checked
/// before opening it, so a mistyped `--home` creates nothing.
fn missing_home(home: &Path) -> Option<String> {
    (!home.join("db").exists()).then(|| {
        format!(
            "no kkachi identity in {}: create one with `kkachi init --name NAME`, or point --home (or KKACHI_HOME) at the directory that holds yours",
            home.display()
        )
    })
}

fn error(e: impl std::fmt::Display) -> ExitCode {
    ExitCode::from(report(e))
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// How often a running daemon goes on with file transfers that stopped part-way.
const TRANSFERS_RETRY: std::time::Duration = std::time::Duration::from_secs(20);

async fn daemon(home: &Path, json: bool) -> Result<(), CommandError> {
    if let Some(why) = missing_home(home) {
        return Err(CommandError::Refused(why));
    }
    let store = match LocalStore::open(home) {
        Ok(s) => s,
        Err(StoreError::Locked(_)) => {
            return Err(CommandError::Refused(
                kkachi_client::link::held_by_linking(home).unwrap_or_else(|| {
                    format!(
                        "a kkachi daemon or UI is already running for {}",
                        home.display()
                    )
                }),
            ));
        }
        Err(e) => {
            return Err(CommandError::Refused(format!("{}: {e}", home.display())));
        }
    };
    let me = store.acting_identity()?.ok_or(CommandError::NoIdentity)?;
    let engine = runtime::start_engine(store, me, runtime::net_config(), Mode::ONLINE)?;
    let control = ipc::Control::start(home, engine.clone()).await?;
    let transfers = kkachi_client::files::keep_going(engine.clone(), TRANSFERS_RETRY);
    let events = engine.subscribe();
    let (stop_printer, printer_stop) = tokio::sync::oneshot::channel();
    let printer = tokio::spawn(print_events(
        events,
        engine.store().clone(),
        json,
        printer_stop,
    ));
    eprintln!(
        "kkachi daemon online as {} ({} relays); Ctrl-C to stop",
        engine.identity().peer_id(),
        engine.store().relays()?.len()
    );
    wait_for_signal().await;
    // Structured shutdown: the engine stops what is under way (it is retried on the
    // next start), flushes what it wrote and answers who waits; then the commands
    // under way on the control socket give their answers, and what the engine
    // announced is printed.
    transfers.abort();
    let stopped = engine.shutdown().await;
    control.stop().await;
    let _ = stop_printer.send(());
    let _ = printer.await;
    Ok(stopped?)
}

/// Prints what the engine announces: messages once durable (on stdout), message
/// requests (on stderr). On `stop`, prints what was announced before it and returns.
async fn print_events(
    mut events: tokio::sync::broadcast::Receiver<AppEvent>,
    store: LocalStore,
    json: bool,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    // Names as last seen: a contact who renames themselves is told on stderr.
    let mut names: std::collections::HashMap<kkachi_protocol::PeerId, String> = store
        .added_contacts()
        .unwrap_or_default()
        .iter()
        .map(|c| (c.peer, c.name.clone()))
        .collect();
    let mut print = |event: AppEvent| match event {
        AppEvent::ContactUpdated(peer) => {
            if let Ok(Some(c)) = store.added_contact(&peer)
                && let Some(old) = names.insert(peer, c.name.clone())
                && old != c.name
            {
                eprintln!(
                    "{} is now {}",
                    kkachi_client::sanitize::for_terminal(&old),
                    kkachi_client::sanitize::for_terminal(&c.name)
                );
            }
        }
        AppEvent::DevicesChanged {
            name,
            added,
            removed,
            ..
        } => {
            // Keys that speak for a contact now, or no longer do: told on stderr.
            eprintln!(
                "{}",
                kkachi_client::engine::device_change_line(&name, &added, &removed)
            );
        }
        AppEvent::Request(peer) => {
            // Not a message of a contact: told on stderr, never mixed into the stream
            // of messages.
            if let Ok(Some(request)) = store.request(&peer) {
                eprintln!("{}", request_line(&request));
            }
        }
        AppEvent::Message(r) => {
            let mut out = Output::default();
            print_received(&mut out, &r, json);
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(out.stdout.as_bytes());
            let _ = stdout.flush();
        }
        _ => {}
    };
    let lagged = |n| tracing::warn!(missed = n, "output fell behind; see `kkachi history`");
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) => print(event),
                Err(RecvError::Lagged(n)) => lagged(n),
                Err(RecvError::Closed) => return,
            },
            _ = &mut stop => loop {
                match events.try_recv() {
                    Ok(event) => print(event),
                    Err(TryRecvError::Lagged(n)) => lagged(n),
                    Err(_) => return,
                }
            },
        }
    }
}

async fn one_shot(home: &Path, command: Command, json: bool) -> ExitCode {
    if !matches!(command, Command::Init { .. })
        && let Some(why) = missing_home(home)
    {
        return error(why);
    }
    match LocalStore::open(home) {
        Ok(store) => {
            let mut app = App::new(store.clone());
            let result = app.run(command, json).await;
            // The command's engines stop (what they wrote is flushed).
            let closed = app.close().await;
            let flushed = store.flush().await.map_err(CommandError::from);
            let code = match (
                result,
                closed.and(
                    flushed
                        .as_ref()
                        .map_err(|e| CommandError::Refused(e.to_string()))
                        .copied(),
                ),
            ) {
                (Ok(output), Ok(())) => write_output(&output),
                (Ok(output), Err(e)) => {
                    write_output(&output);
                    report(e)
                }
                (Err(e), _) => report(e),
            };
            if flushed.is_ok() {
                // Everything is durable. Tearing down the page cache and the runtime
                // would cost more than a read of a long history itself: skip it.
                let _ = std::io::stdout().flush();
                std::process::exit(code.into());
            }
            ExitCode::from(code)
        }
        Err(StoreError::Locked(_)) => match ipc::forward(home, command, json).await {
            Ok(output) => emit(&output),
            Err(e) => match kkachi_client::link::held_by_linking(home) {
                Some(why) => error(why),
                None => error(e),
            },
        },
        Err(e) => error(format!("{}: {e}", home.display())),
    }
}

/// `send CONTACT -`: the text is read from standard input here, in the process the
/// person started (a running daemon, which may take the command, has another stdin).
/// At most the longest text a message may carry is read; one final newline is dropped.
fn text_from_stdin(command: Command) -> Result<Command, String> {
    use std::io::Read;
    let Command::Send(mut args) = command else {
        return Ok(command);
    };
    if args.text != ["-"] {
        return Ok(Command::Send(args));
    }
    let limit = kkachi_protocol::content::MAX_TEXT_LEN;
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the message from standard input: {e}"))?;
    if bytes.len() > limit {
        return Err(format!(
            "the message on standard input is longer than {limit} bytes, the most one message holds"
        ));
    }
    let mut text = String::from_utf8(bytes)
        .map_err(|_| "the message on standard input is not UTF-8 text".to_string())?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.trim().is_empty() {
        return Err("no message on standard input".into());
    }
    args.text = vec![text];
    Ok(Command::Send(args))
}

/// `passphrase set|remove`: the passphrases are read here, where the person is (a
/// running daemon, which may take the command, has no terminal of theirs): the current
/// one first, if the home has one, then the new one.
fn passphrases(home: &Path, command: Command) -> Result<Command, String> {
    use kkachi_client::cli::PassphraseCommand;
    use kkachi_client::passphrase::{read_current, read_new};
    let current = || -> Result<Option<String>, String> {
        Ok(if kkachi_client::store::has_passphrase(home) {
            Some(read_current(home)?.to_string())
        } else {
            None
        })
    };
    Ok(match command {
        Command::Passphrase(PassphraseCommand::Set { new: None, .. }) => {
            let current = current()?;
            let new = read_new()?;
            Command::Passphrase(PassphraseCommand::Set {
                new: Some(new.to_string()),
                current,
            })
        }
        Command::Passphrase(PassphraseCommand::Remove { current: None }) => {
            Command::Passphrase(PassphraseCommand::Remove {
                current: current()?,
            })
        }
        other => other,
    })
}

/// A bundle's file is named relative to where the person runs kkachi, not where a
/// daemon that may take the command runs.
fn absolute_paths(command: Command) -> Result<Command, String> {
    let absolute = |p: std::path::PathBuf| {
        std::path::absolute(&p).map_err(|e| format!("cannot resolve {}: {e}", p.display()))
    };
    Ok(match command {
        Command::Bundle(BundleCommand::Export { to, contact }) => {
            Command::Bundle(BundleCommand::Export {
                to: absolute(to)?,
                contact,
            })
        }
        Command::Bundle(BundleCommand::Import { file }) => Command::Bundle(BundleCommand::Import {
            file: absolute(file)?,
        }),
        Command::Backup(BackupCommand::Create { to, new_key, .. }) => {
            Command::Backup(BackupCommand::Create {
                to: absolute(to)?,
                new_key,
                interactive: std::io::stdout().is_terminal(),
            })
        }
        Command::Send(mut args) => {
            if args.file.as_deref() == Some(std::path::Path::new("-")) {
                return Err(
                    "--file takes the path of a file; standard input (-) is for a text".into(),
                );
            }
            args.file = args.file.map(absolute).transpose()?;
            Command::Send(args)
        }
        // Saved here, in the folder the person is in, even when a daemon does it.
        Command::Get { id, to } => Command::Get {
            id,
            to: Some(absolute(to.unwrap_or_else(|| ".".into()))?),
        },
        other => other,
    })
}

fn main() -> ExitCode {
    // Whatever kkachi creates (the database's files, logs, the control socket, bundles)
    // is for the person who runs it only.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    kkachi_client::store::set_passphrase_prompt(kkachi_client::passphrase::prompt);
    let cli = Cli::parse();
    JSON_ERRORS.store(cli.json, std::sync::atomic::Ordering::Relaxed);
    let home = cli.home.clone().unwrap_or_else(default_home);
    let command = match text_from_stdin(cli.command.unwrap_or(Command::Tui))
        .and_then(absolute_paths)
        .and_then(|c| passphrases(&home, c))
    {
        Ok(command) => command,
        Err(e) => return error(e),
    };
    let is_tui = matches!(command, Command::Tui | Command::Demo);
    if is_tui && !(std::io::stdin().is_terminal() && std::io::stdout().is_terminal()) {
        return error(
            "the terminal UI needs a terminal: start it from one, or run a command instead (`kkachi --help` lists them)",
        );
    }
    if matches!(command, Command::Demo) {
        // The demo leaves nothing behind, and the screen is the UI's: it logs nothing.
    } else if is_tui {
        let _ = std::fs::create_dir_all(&home);
        init_logging(Some(&home.join("kkachi.log")), true);
    } else if matches!(command, Command::Daemon) || !home.join("db").is_dir() {
        // A daemon's log is its standard error (a service manager keeps it); so is a
        // command's where no home is set up yet (a mistyped --home gets no file).
        init_logging(None, matches!(command, Command::Daemon));
    } else {
        // A command's standard error is for what it says itself: the network's
        // warnings (a relay that does not answer, with its error) go to the home's log.
        init_logging(Some(&home.join("kkachi.log")), false);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return error(format!("cannot start: {e}")),
    };
    let code = runtime.block_on(async {
        match command {
            Command::Daemon => match daemon(&home, cli.json).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => error(e),
            },
            Command::Tui => match kkachi_client::tui::run(&home).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => error(e),
            },
            #[cfg(feature = "demo")]
            Command::Demo => match kkachi_client::tui::demo::run().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => error(e),
            },
            #[cfg(not(feature = "demo"))]
            Command::Demo => error("this kkachi was built without the demo (feature `demo`)"),
            // Neither needs (nor may use) a running kkachi: one reads a file, the other
            // makes a home.
            Command::Backup(BackupCommand::Verify { file }) => {
                match kkachi_client::commands::backup_verify(&file, cli.json) {
                    Ok(output) => emit(&output),
                    Err(e) => error(e),
                }
            }
            Command::Backup(BackupCommand::Restore { file }) => {
                match kkachi_client::commands::backup_restore(&home, &file, cli.json) {
                    Ok(output) => emit(&output),
                    Err(e) => error(e),
                }
            }
            // One makes a home, the other must hold its home alone while the account
            // goes over: neither is forwarded to a running kkachi.
            Command::Device(DeviceCommand::Join { code, name }) => {
                match kkachi_client::commands::device_join(&home, &code, &name, cli.json).await {
                    Ok(output) => emit(&output),
                    Err(e) => error(e),
                }
            }
            Command::Device(DeviceCommand::Link {
                listen,
                no_relay,
                relay_only,
                wait,
                again,
                yes,
            }) => {
                if let Some(why) = missing_home(&home) {
                    return error(why);
                }
                let asked = kkachi_client::commands::LinkAsked {
                    listen,
                    no_relay,
                    relay_only,
                    wait,
                    again,
                    yes,
                };
                match kkachi_client::commands::device_link(&home, &asked, cli.json).await {
                    Ok(output) => emit(&output),
                    Err(e) => error(e),
                }
            }
            other => one_shot(&home, other, cli.json).await,
        }
    });
    // What is left (the network task) is cancelled; a flush under way finishes.
    drop(runtime);
    code
}
