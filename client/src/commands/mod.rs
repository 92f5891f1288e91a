//! What each command does. Commands write to an [`Output`] rather than the terminal,
//! so the same code runs in a one-shot process or, forwarded, inside a running daemon.
//!
//! - this module: [`App`] (the store, and an engine once a command needs one), the
//!   dispatch, `init`, `invite`, and finding a contact by what the user typed;
//! - `contacts`: `contact …` and `request …` (message requests);
//! - `messages`: `send`, `sync`, `history`, and how a message is printed;
//! - `relays`: `relay …`, and telling contacts when relays change.
//!
//! Everything a peer chose (names, texts, a relay's strings) is printed through
//! [`crate::sanitize`], never raw.

mod backup;
mod bundle;
mod contacts;
mod devices;
mod drill;
mod files;
mod groups;
mod messages;
mod passphrase;
mod relays;

use std::path::PathBuf;

use kkachi_protocol::{Card, Identity, PeerId};
use serde_json::json;

use crate::cli::{BackupCommand, BundleCommand, Command, RelayCommand};
use crate::engine::{Engine, EngineError, Mode};
use crate::net::{NetError, Network};
use crate::sanitize::for_terminal;
use crate::store::{Contact, LocalStore, Profile, StoreError};

pub use backup::{restore as backup_restore, verify as backup_verify};
pub use contacts::{describe_duration, parse_duration, timer_line};
pub use devices::{LinkAsked, join as device_join, link as device_link};
use groups::Target;
use messages::Pick;
pub use messages::{
    gap_line, message_json, notices, notices_but_gaps, print_received, push_history_line,
    reactions_text, request_line,
};
pub use relays::failure_domain_warnings;

/// What a command printed and how it ended.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Output {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Exit code.
    pub code: i32,
}

impl Output {
    fn out(&mut self, line: impl AsRef<str>) {
        self.stdout.push_str(line.as_ref());
        self.stdout.push('\n');
    }

    fn warn(&mut self, line: impl AsRef<str>) {
        self.stderr.push_str(line.as_ref());
        self.stderr.push('\n');
    }

    fn json(&mut self, value: serde_json::Value) {
        self.out(crate::sanitize::json(&value));
    }
}

/// Why a command failed: printed to stderr, exit code 1.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// What was asked cannot be done as asked; the message says why and what to do.
    #[error("{0}")]
    Refused(String),
    /// This home has no identity yet.
    #[error("no identity yet: create one with `kkachi init --name NAME`")]
    NoIdentity,
    /// Another kkachi process holds this home and could not be asked.
    #[error(
        "another kkachi process holds {home} but its control socket is unreachable ({source}); is it still starting?"
    )]
    DaemonUnreachable {
        /// The home directory.
        home: PathBuf,
        /// Why the socket did not answer.
        source: std::io::Error,
    },
    /// The running daemon's answer could not be read.
    #[error("the running daemon gave an unreadable answer: {0}")]
    DaemonAnswer(serde_json::Error),
    /// The control socket could not be created.
    #[error("cannot create {path}: {source}")]
    ControlSocket {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The message could not be made durable.
    #[error("the message could not be saved: {0}")]
    NotSaved(std::sync::Arc<StoreError>),
    /// The terminal failed.
    #[error("the terminal: {0}")]
    Terminal(std::io::Error),
    /// The local database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The network.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A file transfer.
    #[error(transparent)]
    Files(#[from] crate::files::FilesError),
    /// A card or invite code.
    #[error(transparent)]
    Card(#[from] kkachi_protocol::CardError),
    /// The invite code does not fit in a QR code.
    #[error("cannot draw the QR code: {0}")]
    Qr(#[from] qrcode::types::QrError),
    /// Reading or writing a file or socket.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A request or answer on the control socket.
    #[error("control socket: {0}")]
    Json(#[from] serde_json::Error),
}

fn fail<T>(message: impl Into<String>) -> Result<T, CommandError> {
    Err(CommandError::Refused(message.into()))
}

/// Everything a command may use: the store, the identity, and (once started) the
/// network and engine.
pub struct App {
    store: LocalStore,
    engine: Option<Engine<Network>>,
    /// The engine is this command's own (not a running daemon's): stopped at the end.
    owned: bool,
    /// An engine with no network, for changes that need none (contacts).
    offline: Option<Engine<Network>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("home", &self.store.home())
            .finish_non_exhaustive()
    }
}

/// `kkachi invite` never prints a code with less than this left to live (30 days): it
/// makes a new one first.
const INVITE_MIN_LIFE_SECS: u64 = 30 * 24 * 3600;

impl App {
    /// Commands over an opened store; the network starts when a command needs it.
    pub fn new(store: LocalStore) -> Self {
        Self {
            store,
            engine: None,
            owned: false,
            offline: None,
        }
    }

    /// Commands inside a running daemon, sharing its engine.
    pub fn online(engine: Engine<Network>) -> Self {
        Self {
            store: engine.store().clone(),
            engine: Some(engine),
            owned: false,
            offline: None,
        }
    }

    /// Stops the engines this command started, once what they wrote is durable (or
    /// with the error that kept it from the disk).
    pub async fn close(self) -> Result<(), CommandError> {
        if let (true, Some(engine)) = (self.owned, &self.engine) {
            engine.shutdown().await?;
        }
        if let Some(engine) = &self.offline {
            engine.shutdown().await?;
        }
        Ok(())
    }

    fn identity(&self) -> Result<Identity, CommandError> {
        self.store
            .acting_identity()?
            .ok_or(CommandError::NoIdentity)
    }

    fn profile(&self) -> Result<Profile, CommandError> {
        self.store.profile()?.ok_or(CommandError::NoIdentity)
    }

    /// The engine, starting it (and the network) if this process has none yet: it
    /// delivers, and receives when asked.
    pub fn engine(&mut self) -> Result<Engine<Network>, CommandError> {
        if let Some(e) = &self.engine {
            return Ok(e.clone());
        }
        let me = self.identity()?;
        let engine = crate::runtime::start_engine(
            self.store.clone(),
            me,
            crate::runtime::net_config(),
            Mode::ONE_SHOT,
        )?;
        self.engine = Some(engine.clone());
        self.owned = true;
        Ok(engine)
    }

    /// The running engine if there is one, else one that never touches the network:
    /// for local changes, which are made on the engine's task like all others.
    fn local_engine(&mut self) -> Result<Engine<Network>, CommandError> {
        if let Some(e) = self.engine.as_ref().or(self.offline.as_ref()) {
            return Ok(e.clone());
        }
        let me = self.identity()?;
        let net = Network::offline(me.transport_keypair().public().to_peer_id());
        let engine = Engine::start(self.store.clone(), me, net, None, Mode::LOCAL);
        self.offline = Some(engine.clone());
        Ok(engine)
    }

    /// Runs one command (not `daemon` or `tui`, which the binary handles).
    pub async fn run(&mut self, command: Command, json: bool) -> Result<Output, CommandError> {
        let mut out = Output::default();
        match command {
            Command::Init { name } => self.init(&name, json, &mut out)?,
            Command::Name { name } => self.set_name(&name.join(" "), json, &mut out).await?,
            Command::Relay(RelayCommand::Add { addrs, token }) => {
                self.relay_add(&addrs, token, json, &mut out).await?
            }
            Command::Relay(RelayCommand::List) => self.relay_list(json, &mut out).await?,
            Command::Relay(RelayCommand::Remove { addr }) => {
                self.relay_remove(&addr, json, &mut out).await?
            }
            Command::Invite { qr, renew } => {
                // A code handed out should work for a while: one with less than a month
                // left is replaced first.
                let left = self
                    .profile()?
                    .card_expires_at
                    .saturating_sub(crate::engine::now_ms() / 1000);
                if renew || left < INVITE_MIN_LIFE_SECS {
                    self.renew_invite(!renew, &mut out).await?;
                }
                self.invite(qr, json, &mut out)?
            }
            Command::Device(command) => self.device(command, json, &mut out).await?,
            Command::Contact(command) => self.contact(command, json, &mut out).await?,
            Command::Request(command) => self.request(command, json, &mut out).await?,
            Command::Group(command) => self.group(command, json, &mut out).await?,
            Command::Send(args) => self.send(args, json, &mut out).await?,
            Command::Files { cancel: None } => self.files(json, &mut out)?,
            Command::Files { cancel: Some(id) } => self.cancel_file(&id, json, &mut out)?,
            Command::Get { id, to } => self.get(&id, to, json, &mut out).await?,
            Command::Sync { timeout } => self.sync(timeout, json, &mut out).await?,
            Command::Search {
                words,
                contact,
                last,
            } => self.search(&words.join(" "), contact.as_deref(), last, json, &mut out)?,
            Command::Edit {
                contact,
                message,
                text,
            } => {
                let c = self.resolve(&contact)?;
                let id = self.find_message(&c, &message, Pick::Ours)?;
                self.engine()?
                    .revise(c.peer, id, Some(text.join(" ")))
                    .await?;
                self.engine()?.deliver_now().await?;
                if json {
                    out.json(json!({ "edited": id.to_hex(), "contact": c.name }));
                } else {
                    out.out(format!("edited: {}", text.join(" ")));
                }
            }
            Command::Delete {
                contact,
                message,
                for_me,
            } => {
                let c = self.resolve(&contact)?;
                let id =
                    self.find_message(&c, &message, if for_me { Pick::Any } else { Pick::Ours })?;
                if for_me {
                    self.local_engine()?.delete_for_me(c.peer, id).await?;
                } else {
                    self.engine()?.revise(c.peer, id, None).await?;
                    self.engine()?.deliver_now().await?;
                }
                if json {
                    out.json(
                        json!({ "deleted": id.to_hex(), "contact": c.name, "for_me": for_me }),
                    );
                } else if for_me {
                    out.out("deleted on this device");
                } else {
                    out.out("deleted for everyone");
                }
            }
            Command::React {
                contact,
                message,
                emoji,
                remove,
            } => {
                let c = self.resolve(&contact)?;
                let id = self.find_message(&c, &message, Pick::TheirsFirst)?;
                let emoji = if remove {
                    String::new()
                } else {
                    emoji.unwrap_or_default()
                };
                if !remove && emoji.trim().is_empty() {
                    return fail("name a reaction, such as 👍, or --remove yours");
                }
                self.engine()?.react(c.peer, id, emoji.clone()).await?;
                self.engine()?.deliver_now().await?;
                if json {
                    out.json(
                        json!({ "reacted": id.to_hex(), "contact": c.name, "reaction": emoji }),
                    );
                } else if remove {
                    out.out("reaction taken back");
                } else {
                    out.out(format!("reacted {}", crate::sanitize::for_terminal(&emoji)));
                }
            }
            Command::Receipts { setting } => {
                if let Some(setting) = &setting {
                    self.identity()?;
                    self.local_engine()?
                        .set_read_receipts(setting == "on")
                        .await?;
                }
                let on = !self.profile()?.read_receipts_off;
                if json {
                    out.json(json!({ "read_receipts": on }));
                } else if on {
                    out.out(
                        "Read receipts are on: contacts see when you have read their messages.",
                    );
                } else {
                    out.out(
                        "Read receipts are off: contacts see their messages delivered, not read.",
                    );
                }
            }
            Command::Mute { contact, off } => {
                let c = self.resolve(&contact)?;
                self.local_engine()?.set_muted(c.peer, !off).await?;
                if json {
                    out.json(json!({ "contact": c.name, "muted": !off }));
                } else {
                    out.out(format!(
                        "{} {}",
                        crate::sanitize::for_terminal(&c.name),
                        if off {
                            "is no longer muted"
                        } else {
                            "is muted: its messages neither ring nor notify"
                        }
                    ));
                }
            }
            Command::Timer { contact, duration } => {
                self.timer(&contact, duration.as_deref(), json, &mut out)
                    .await?
            }
            Command::History { contact, last } => match self.target(&contact)? {
                Target::Contact(_) => self.history(&contact, last, json, &mut out)?,
                Target::Group(group) => self.group_history(&group, last, json, &mut out)?,
            },
            Command::Drill { game_day } => self.drill(game_day, json, &mut out).await?,
            Command::Bundle(BundleCommand::Export { to, contact }) => {
                self.bundle_export(&to, contact.as_deref(), json, &mut out)?
            }
            Command::Bundle(BundleCommand::Import { file }) => {
                self.bundle_import(&file, json, &mut out).await?
            }
            Command::Passphrase(command) => self.passphrase(command, json, &mut out)?,
            Command::RotateKey => self.rotate_key(json, &mut out).await?,
            Command::Backup(BackupCommand::Create {
                to,
                new_key,
                interactive,
            }) => self.backup_create(&to, new_key, interactive, json, &mut out)?,
            Command::Backup(BackupCommand::Verify { .. } | BackupCommand::Restore { .. }) => {
                return fail(
                    "`backup verify` and `backup restore` run on their own, not through a running kkachi",
                );
            }
            Command::Daemon | Command::Tui => {
                return fail("a kkachi daemon or UI is already running for this home");
            }
            Command::Demo => {
                return fail("`kkachi demo` runs on its own, in a temporary home");
            }
        }
        Ok(out)
    }

    /// Prints our name, or (given one) makes it our card's and sends the card to every
    /// contact.
    async fn set_name(
        &mut self,
        new: &str,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        let mut profile = self.profile()?;
        let new = new.trim();
        if new.is_empty() {
            if json {
                out.json(json!({ "name": profile.name }));
            } else {
                out.out(for_terminal(&profile.name));
            }
            return Ok(());
        }
        // The same rules a card uses.
        Card::new(&self.identity()?, new, vec![], 1)?;
        if new == profile.name {
            out.warn(format!("your name is {} already", for_terminal(new)));
            return Ok(());
        }
        // The name and the card version that carries it, in one write.
        profile.name = new.to_string();
        profile.card_version += 1;
        self.store.apply({
            let mut w = crate::store::WriteSet::default();
            LocalStore::write_profile(&mut w, &profile);
            w
        })?;
        self.send_card(out).await?;
        if json {
            out.json(json!({ "name": new }));
        } else {
            out.out(format!("your name is now {}", for_terminal(new)));
        }
        Ok(())
    }

    fn init(&self, name: &str, json: bool, out: &mut Output) -> Result<(), CommandError> {
        if let Some(existing) = self.store.identity()? {
            return fail(format!(
                "an identity already exists in {} (peer id {}); use another --home for a second one",
                self.store.home().display(),
                existing.peer_id()
            ));
        }
        let identity = Identity::generate();
        // Validates the name with the same rules a card uses.
        Card::new(&identity, name, vec![], 1)?;
        self.store.init_identity(&identity, &Profile::new(name))?;
        if json {
            out.json(json!({ "peer_id": identity.peer_id().to_string(), "name": name }));
        } else {
            out.out(format!("Created identity {name} ({}).", identity.peer_id()));
            out.out(
                "Next: add inbox relays with `kkachi relay add ADDR`, then share `kkachi invite`.",
            );
        }
        Ok(())
    }

    fn invite(&self, qr: bool, json: bool, out: &mut Output) -> Result<(), CommandError> {
        let card = self.own_card()?;
        let code = card.to_invite();
        if card.relays().is_empty() {
            out.warn("note: you have no relays, so this code reaches you only on your local network; add relays with `kkachi relay add ADDR`");
        }
        if json {
            out.json(
                json!({ "invite": code, "peer_id": card.identity().peer_id().to_string(),
                             "version": card.version(), "expires_at": card.expires_at() }),
            );
        } else {
            out.out(&code);
            if qr {
                out.out(crate::qr::render(&code)?);
            }
            out.warn(format!(
                "this code works until {}; then kkachi makes a new one and this one stops reaching you",
                crate::time::format_ms(card.expires_at().saturating_mul(1000))
            ));
        }
        Ok(())
    }

    /// Finds a contact by name (case-insensitive), full peer id, or the unique start of a
    /// name or peer id.
    pub fn resolve(&self, who: &str) -> Result<Contact, CommandError> {
        resolve_contact(&self.store, who).or_else(|e| {
            if self.names_group(who) {
                fail(format!(
                    "{} is a group: this works with contacts; in groups, `send` and `history` do",
                    for_terminal(who).as_ref()
                ))
            } else {
                Err(e)
            }
        })
    }
}

/// Finds a contact by name (case-insensitive), full peer id, or the unique start of a
/// name (any case) or of a peer id.
pub fn resolve_contact(store: &LocalStore, who: &str) -> Result<Contact, CommandError> {
    if store.identity()?.is_none() {
        return Err(CommandError::NoIdentity);
    }
    // Members only met in a group are not contacts: their names are theirs to choose.
    let contacts = store.added_contacts()?;
    // An id first: a name can never stand for someone else's id.
    if let Ok(peer) = who.parse::<PeerId>()
        && let Some(c) = contacts.iter().find(|c| c.peer == peer)
    {
        return Ok(c.clone());
    }
    let named: Vec<&Contact> = contacts
        .iter()
        .filter(|c| c.name.to_lowercase() == who.to_lowercase())
        .collect();
    match named.as_slice() {
        [one] => return Ok((*one).clone()),
        [] => {}
        many => {
            return fail(format!(
                "{} contacts are named {:?}; use the peer id (`kkachi contact list` shows it) or rename one",
                many.len(),
                for_terminal(who).as_ref()
            ));
        }
    }
    // The start of a name (any case), or of a peer id (six characters at least).
    let lower = who.to_lowercase();
    let by_prefix: Vec<&Contact> = contacts
        .iter()
        .filter(|c| {
            (!who.trim().is_empty() && c.name.to_lowercase().starts_with(&lower))
                || (who.len() >= 6 && c.peer.to_string().starts_with(who))
        })
        .collect();
    match by_prefix.as_slice() {
        [one] => Ok((*one).clone()),
        [] => fail(format!(
            "no contact named {:?}; `kkachi contact list` shows your contacts, `kkachi contact add CODE` adds one",
            for_terminal(who).as_ref()
        )),
        many => fail(format!(
            "{:?} matches {} contacts ({}); type more of the name or of the peer id",
            for_terminal(who).as_ref(),
            many.len(),
            many.iter()
                .map(|c| name(&c.name).into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Lower-case hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A peer's id as people compare it: its last 8 characters, like a fingerprint.
fn short_id(peer: &PeerId) -> String {
    let s = peer.to_string();
    s[s.len().saturating_sub(8)..].to_string()
}

/// A name a peer chose, safe to print.
fn name(s: &str) -> std::borrow::Cow<'_, str> {
    for_terminal(s)
}
