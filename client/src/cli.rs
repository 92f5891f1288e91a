//! Command-line syntax (the CLI contract in the design notes; scripts rely on it).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// kkachi: a messenger that keeps working when a datacenter burns.
#[derive(Debug, Parser)]
#[command(name = "kkachi", version, about, long_about = None)]
pub struct Cli {
    /// Where kkachi keeps your identity, contacts and messages.
    #[arg(long, global = true, env = "KKACHI_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,

    /// Machine-readable output (JSON).
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do; without one, the terminal UI starts.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The commands.
#[derive(Debug, Clone, PartialEq, Subcommand, serde::Serialize, serde::Deserialize)]
pub enum Command {
    /// Create your identity.
    Init {
        /// The name your contacts see.
        #[arg(long)]
        name: String,
    },
    /// Manage your inbox relays.
    #[command(subcommand)]
    Relay(RelayCommand),
    /// Print your invite code (give it to people who should be able to write to you).
    Invite {
        /// Also draw it as a QR code.
        #[arg(long)]
        qr: bool,
        /// Make a new code: every code given out before stops reaching you (your
        /// contacts are not affected).
        #[arg(long)]
        renew: bool,
    },
    /// Your account's devices: list them (with the fingerprint of each one's key), name
    /// this one, or hand the account to a new device (link, join).
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Manage contacts.
    #[command(subcommand)]
    Contact(ContactCommand),
    /// Messages from people who are not your contacts yet: list, accept, reject, block.
    #[command(subcommand)]
    Request(RequestCommand),
    /// Groups: create one, add and remove members, list them. `send GROUP TEXT` and
    /// `history GROUP` talk in one.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Send a message or a file, or pass on a file you received. Exits 0 once it is
    /// safely in your outbox.
    Send(SendArgs),
    /// Files sent and received: how far each is, and its id for `get`.
    Files {
        /// Stop a file: one being sent (before its message went: it is not sent, and
        /// its sealed copy is removed), or one being fetched (what is here is removed;
        /// `get` fetches it again).
        #[arg(long, value_name = "FILE")]
        cancel: Option<String>,
    },
    /// Fetch a file a contact sent (if it is not here yet) and save it.
    Get {
        /// The file: its id from `files` or `history --json` (or the start of it, 6
        /// characters or more), or the id of the message that carried it.
        id: String,
        /// The folder to save it in (made if missing); the current one by default. A
        /// file of the same name there is kept: the new one gets ` (1)` added.
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
    },
    /// Deliver the outbox, fetch new mail, print new messages, exit.
    Sync {
        /// Give up on unreachable relays after this many seconds.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
    },
    /// Change the name your contacts see (it reaches them with your card); without a
    /// name, prints it.
    Name {
        /// The new name (its words are joined by spaces).
        name: Vec<String>,
    },
    /// Make messages with a contact disappear: those stored from now on are deleted this
    /// long after, on both sides (30s, 10m, 1h, 1d, 1w; `off`). Without a duration,
    /// shows the timer.
    Timer {
        /// Contact name or peer id.
        contact: String,
        /// How long messages stay: a number with s, m, h, d or w; `off` for always.
        duration: Option<String>,
    },
    /// Find messages in your 1:1 chats: those holding every word given, in any case,
    /// newest first.
    Search {
        /// The words to find.
        #[arg(required = true)]
        words: Vec<String>,
        /// Only in the conversation with this contact.
        #[arg(long)]
        contact: Option<String>,
        /// At most this many (default 50).
        #[arg(long, default_value_t = 50)]
        last: usize,
    },
    /// Change the text of a message you sent, for everyone.
    Edit {
        /// Contact name or peer id.
        contact: String,
        /// The message: `last` (your last one), or its id from `history --json` (or
        /// the start of it, 6 characters or more).
        message: String,
        /// The new text.
        #[arg(required = true)]
        text: Vec<String>,
    },
    /// React to a message with an emoji (one reaction of yours per message; a new one
    /// replaces it); with --remove, take yours back.
    React {
        /// Contact name or peer id.
        contact: String,
        /// The message: `last` (their last one), or its id (or its start).
        message: String,
        /// The reaction: emoji only, such as 👍 (at most 64 bytes).
        #[arg(required_unless_present = "remove")]
        emoji: Option<String>,
        /// Take your reaction back.
        #[arg(long, conflicts_with = "emoji")]
        remove: bool,
    },
    /// Delete a message you sent, for everyone (it shows as deleted); with --for-me,
    /// delete any message on this device only.
    Delete {
        /// Contact name or peer id.
        contact: String,
        /// The message: `last` (your last one), or its id (or its start).
        message: String,
        /// Only here; the contact keeps theirs.
        #[arg(long)]
        for_me: bool,
    },
    /// Tell contacts when you read their messages (`on`, the default) or not (`off`:
    /// they see them delivered only). Without a word, says which.
    Receipts {
        /// `on` or `off`.
        #[arg(value_parser = ["on", "off"])]
        setting: Option<String>,
    },
    /// Mute a conversation (its messages neither ring nor notify in the UI), or unmute
    /// it with --off.
    Mute {
        /// Contact name or peer id.
        contact: String,
        /// Unmute.
        #[arg(long)]
        off: bool,
    },
    /// Show the conversation with a contact, or a group's.
    History {
        /// Contact name or peer id, or a group's name or id.
        contact: String,
        /// Show only the last N messages.
        #[arg(long)]
        last: Option<usize>,
    },
    /// Check what keeps your messages flowing (relays, their failure domains and clocks,
    /// your contacts' relays, the outbox) and say what to fix. Exit status 1 when there
    /// is something to fix.
    Drill {
        /// Then take each of your relays out of use in turn (inside this client) and
        /// check that messages still flow through the others.
        #[arg(long)]
        game_day: bool,
    },
    /// Carry messages on a drive: write what waits in your outbox to a file, or take
    /// one in (what is for you is read; the rest goes on to its relays from here).
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Back up everything this home holds into one file encrypted to a recovery key;
    /// check a backup; restore one into a new home.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Protect what kkachi keeps on this device with a passphrase, change it, or remove
    /// it. Everything is sealed either way; the passphrase guards the key.
    #[command(subcommand)]
    Passphrase(PassphraseCommand),
    /// Give yourself a new session key (the key messages to you are sealed to, and
    /// your queues derive from); you stay the same person to your contacts. Every
    /// contact is sent your new card and starts new sessions with you; invite codes
    /// given out before stop working. Run it with kkachi stopped (no daemon, no UI).
    RotateKey,
    /// Stay online: receive, deliver, and print each incoming message as a line.
    Daemon,
    /// The terminal UI.
    Tui,
    /// Try kkachi on this machine: three local relays, a second user who answers, and
    /// keys to take relays down while you chat.
    Demo,
}

/// `kkachi relay ...`
#[derive(Debug, Clone, PartialEq, Subcommand, serde::Serialize, serde::Deserialize)]
pub enum RelayCommand {
    /// Add inbox relays (multiaddrs ending in /p2p/<peer id>).
    Add {
        /// Relay addresses.
        #[arg(required = true)]
        addrs: Vec<String>,
        /// The access token the relays' operator gave you, for relays that open queues
        /// only for its holders.
        #[arg(long)]
        token: Option<String>,
    },
    /// List your relays, their failure domains and whether they answer.
    List,
    /// Remove an inbox relay.
    Remove {
        /// The relay address (as listed).
        addr: String,
    },
}

/// `kkachi backup ...`
#[derive(Debug, Clone, PartialEq, Subcommand, serde::Serialize, serde::Deserialize)]
pub enum BackupCommand {
    /// Write a backup: identity, contacts, messages and relays, encrypted to your
    /// recovery key. The first one makes the recovery key and shows it once: without
    /// it no backup can be read. Later ones need no secret (they can run unattended).
    Create {
        /// The file to write (replaced if it exists).
        #[arg(long)]
        to: PathBuf,
        /// Make a new recovery key (shown once) for this and later backups; earlier
        /// backups still need the old one. Without a terminal, the first backup needs it
        /// too (the key is then printed where the output goes).
        #[arg(long)]
        new_key: bool,
        /// Whether the output goes to a terminal (set by the binary).
        #[arg(skip)]
        interactive: bool,
    },
    /// Read a backup through with your recovery key (from KKACHI_RECOVERY_KEY, or
    /// asked) and say what it holds, or where it is damaged.
    Verify {
        /// The backup file.
        file: PathBuf,
    },
    /// Restore a backup into a home that holds no identity yet (the default home, or
    /// --home): everything up to a damaged part, if there is one. Conversations go on
    /// with new sessions.
    Restore {
        /// The backup file.
        file: PathBuf,
    },
}

/// `kkachi passphrase ...`
#[derive(Debug, Clone, PartialEq, Subcommand, serde::Serialize, serde::Deserialize)]
pub enum PassphraseCommand {
    /// Set or change the passphrase (asked twice at the terminal, or taken from
    /// KKACHI_NEW_PASSPHRASE). kkachi then asks for it at every start, or reads
    /// KKACHI_PASSPHRASE. A forgotten passphrase cannot be recovered.
    Set {
        /// The new passphrase, read before the command runs (never on the command line).
        #[arg(skip)]
        new: Option<String>,
        /// The current one, if there is one, read likewise.
        #[arg(skip)]
        current: Option<String>,
    },
    /// Remove the passphrase: the key stays in the home's key file, readable only by you.
    Remove {
        /// The current passphrase, read before the command runs.
        #[arg(skip)]
        current: Option<String>,
    },
    /// Say how the key of this home is kept.
    Status,
}

/// `kkachi bundle ...`
#[derive(Debug, Clone, PartialEq, Subcommand, serde::Serialize, serde::Deserialize)]
pub enum BundleCommand {
    /// Write the sealed envelopes waiting in your outbox to a file. It holds nothing a
    /// relay does not see: no names, no contents; but whoever has it can put those
    /// envelopes into the relays it names.
    Export {
        /// The file to write (replaced if it exists).
        #[arg(long)]
        to: std::path::PathBuf,
        /// Only what waits for this contact (name or peer id).
        #[arg(long = "for")]
        contact: Option<String>,
    },
    /// Take in a bundle: what is for you is read at once (nothing shows twice), what is
    /// for others goes to their relays once one answers.
    Import {
        /// The bundle file.
        file: std::path::PathBuf,
    },
}

/// `kkachi contact ...`
#[derive(Debug, Clone, PartialEq, Subcommand, serde::Serialize, serde::Deserialize)]
pub enum ContactCommand {
    /// Add (or update) a contact from their invite code.
    Add {
        /// The invite code (starts with kk1). A code wrapped over several lines or
        /// words is taken whole: what separates its parts is dropped.
        #[arg(required = true, num_args = 1..)]
        code: Vec<String>,
        /// A name of your choosing for them.
        #[arg(long)]
        name: Option<String>,
    },
    /// List contacts.
    List,
    /// Remove a contact and your conversation with them.
    Remove {
        /// Contact name or peer id.
        contact: String,
    },
    /// Block a contact (or the sender of a message request): what they send is dropped.
    Block {
        /// Contact name, request sender, or peer id.
        contact: String,
    },
    /// Unblock someone.
    Unblock {
        /// Contact name, or the blocked peer id.
        contact: String,
    },
    /// Give a contact another name (shown only to you).
    Rename {
        /// Contact name or peer id.
        contact: String,
        /// The new name.
        name: String,
    },
    /// The devices a contact's account lists, each with its key's fingerprint: compare
    /// them with what `kkachi device list` shows on their side.
    Devices {
        /// Contact name or peer id.
        contact: String,
    },
}

/// `kkachi device ...`
#[derive(Debug, Clone, PartialEq, Subcommand, serde::Serialize, serde::Deserialize)]
pub enum DeviceCommand {
    /// List your account's devices: this one, and those taken out. Each shows the
    /// fingerprint of its key, which contacts see under `kkachi contact devices`.
    List,
    /// Give this device a name your contacts see ("laptop"; the words are joined by
    /// spaces; at most 64 characters).
    Rename {
        /// The new name.
        #[arg(required = true, num_args = 1..)]
        name: Vec<String>,
    },
    /// Add a device to your account: shows a one-time code (and its QR code) for
    /// `kkachi device join` there, and waits. The account goes over the local network,
    /// or (for a device elsewhere) through one of your relays, encrypted under the code;
    /// the new device then sends and receives beside this one, under a key of its own,
    /// and each shows what the other sends and reads. Stop the daemon or UI of this home
    /// first.
    Link {
        /// Listen here (an IP address and a port: 0 picks one; repeat for several)
        /// instead of on this machine's network addresses (or those KKACHI_LISTEN names).
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Vec<std::net::SocketAddr>,
        /// Over the local network only: no relay carries the transfer (nor learns its
        /// size).
        #[arg(long, conflicts_with = "relay_only")]
        no_relay: bool,
        /// Through a relay only: the code names no address of this device (for a new
        /// device on another network).
        #[arg(long, conflicts_with = "listen")]
        relay_only: bool,
        /// How long the code holds (10s to 1d).
        #[arg(long, default_value = "10m", value_parser = link_wait)]
        wait: u32,
        /// Hand the account over again from a home that handed it over before: only if
        /// the device it went to did not finish joining (it holds no account).
        #[arg(long)]
        again: bool,
        /// Hand the account to the first device that has the code, without asking to
        /// compare its safety number (for scripts; a terminal is needed otherwise).
        #[arg(long)]
        yes: bool,
    },
    /// Make this a device of your account, with the code `kkachi device link` shows on
    /// another device of it. Run it with a --home that holds no account yet.
    Join {
        /// The code (spaces and line breaks are ignored); `-` reads it from standard
        /// input, where other users of this machine cannot see it.
        #[arg(required = true, num_args = 1..)]
        code: Vec<String>,
        /// What to call this device (your contacts see it).
        #[arg(long, default_value = NEW_DEVICE_NAME)]
        name: String,
    },
    /// Take a device out of your account (lost, sold, or one that never finished
    /// joining), by its name or the start of its key's fingerprint: contacts and your
    /// other devices seal nothing more to it once your device set reaches them. Not
    /// this device: remove it from another.
    Remove {
        /// Its name, or the start of its fingerprint (`kkachi device list`).
        #[arg(required = true, num_args = 1..)]
        which: Vec<String>,
    },
}

/// What `kkachi device join` calls the new device unless told.
pub const NEW_DEVICE_NAME: &str = "new device";

/// How long a link code holds: a duration as `parse_duration` reads it, from 10 s to a
/// day.
fn link_wait(text: &str) -> Result<u32, String> {
    match crate::commands::parse_duration(text)? {
        secs @ 10..=86_400 => Ok(secs),
        _ => Err("a link code holds from 10s to 1d".into()),
    }
}

/// `kkachi group ...`
#[derive(Debug, Clone, PartialEq, Subcommand, serde::Serialize, serde::Deserialize)]
pub enum GroupCommand {
    /// Create a group with you as its only member and admin.
    Create {
        /// Its name (its words are joined by spaces).
        #[arg(required = true)]
        name: Vec<String>,
        /// An announcement channel: only admins post, members read.
        #[arg(long)]
        announcement: bool,
    },
    /// Add contacts to a group (admins only). Each is told, and gets the group's history
    /// of members; messages sent before they joined stay with those who got them.
    Add {
        /// The group's name or id.
        group: String,
        /// Contacts (names or peer ids).
        #[arg(required = true)]
        contacts: Vec<String>,
    },
    /// Remove a member (admins only). Members who are your contacts are told, the
    /// removed one too; you send them nothing more, and others stop once they know.
    Remove {
        /// The group's name or id.
        group: String,
        /// The member: a contact's name or peer id, or their name in the group.
        member: String,
    },
    /// Leave a group: members who are your contacts are told; you keep its messages so
    /// far (`group forget` removes them).
    Leave {
        /// The group's name or id.
        group: String,
        /// Leave even as its only admin (then nobody can add or remove members).
        #[arg(long)]
        force: bool,
    },
    /// Remove a group you left (or were removed from) from this device, with its
    /// messages.
    Forget {
        /// The group's name or id.
        group: String,
    },
    /// List your groups.
    List,
    /// Who has your message, and who read it: your last one in the group, or MESSAGE
    /// (`last`, or its id from `history GROUP --json`, or 6 characters or more of it).
    Receipts {
        /// The group's name or id.
        group: String,
        /// The message (default: your last).
        message: Option<String>,
    },
    /// Mark the group's messages read, and tell their authors (unless read receipts
    /// are off). The terminal UI does this when the group is open.
    Read {
        /// The group's name or id.
        group: String,
    },
    /// List a group's members and their roles.
    Members {
        /// The group's name or id.
        group: String,
    },
    /// Rename a group (admins only).
    Rename {
        /// The group's name or id.
        group: String,
        /// The new name (its words are joined by spaces).
        #[arg(required = true)]
        name: Vec<String>,
    },
    /// Make a member an admin, or (with --revoke) a member again (admins only).
    Admin {
        /// The group's name or id.
        group: String,
        /// The member: a contact's name or peer id, or their name in the group.
        member: String,
        /// Take the admin role away.
        #[arg(long)]
        revoke: bool,
    },
    /// Make messages in a group disappear: those sent from now on are deleted this long
    /// after each member stores them (30s, 10m, 1h, 1d, 1w; `off`; admins only).
    /// Without a duration, shows the timer.
    Timer {
        /// The group's name or id.
        group: String,
        /// How long messages stay: a number with s, m, h, d or w; `off` for always.
        duration: Option<String>,
    },
    /// Let every member post (`chat`), or only admins (`announcement`) (admins only).
    Mode {
        /// The group's name or id.
        group: String,
        /// `chat` or `announcement`.
        mode: String,
    },
    /// Give a group its own relays, where it keeps one queue every member reads: a
    /// message is sent once per relay whatever the number of members, and the group
    /// may grow to 1,000 members (admins only). Name three run by different people, so
    /// losing one loses nothing. Without addresses, shows them; with `--none`, the
    /// group goes back to sealing each message to each member (32 members at most).
    Relays {
        /// The group's name or id.
        group: String,
        /// Relay addresses, each ending in /p2p/<relay peer id>.
        addrs: Vec<String>,
        /// Take the group relays away.
        #[arg(long, conflicts_with = "addrs")]
        none: bool,
        /// Set them without asking each whether it answers and is open to anyone.
        #[arg(long, conflicts_with = "none")]
        unchecked: bool,
    },
}

/// `kkachi request ...`
#[derive(Debug, Clone, PartialEq, Subcommand, serde::Serialize, serde::Deserialize)]
pub enum RequestCommand {
    /// Show who wrote to you without being a contact, and what they wrote.
    List,
    /// Add the sender as a contact; their messages move into the conversation.
    Accept {
        /// The name they give, or their peer id (or its start or end).
        who: String,
        /// A name of your choosing for them.
        #[arg(long)]
        name: Option<String>,
    },
    /// Drop their messages (they may write again).
    Reject {
        /// The name they give, or their peer id.
        who: String,
    },
    /// Drop their messages and block them.
    Block {
        /// The name they give, or their peer id.
        who: String,
    },
}

/// `kkachi send ...`
#[derive(Debug, Clone, PartialEq, Args, serde::Serialize, serde::Deserialize)]
pub struct SendArgs {
    /// Contact name or peer id, or a group's name (quoted if it has spaces), the start of
    /// it, or its id (`kkachi group list`).
    pub contact: String,
    /// The message (its words are joined by spaces, so quoting is optional); `-`
    /// reads it from standard input. With --file or --forward, an optional text sent
    /// after it.
    #[arg(required_unless_present_any = ["file", "forward"], num_args = 0..)]
    pub text: Vec<String>,
    /// Send this file (up to 2 GiB): sealed, put on the contact's relays, then its
    /// message sent. If this stops part-way, `sync` or the daemon goes on with it.
    #[arg(long, value_name = "PATH", conflicts_with = "forward")]
    pub file: Option<PathBuf>,
    /// Pass on a file you received (its id from `files` or the start of it, or the id
    /// of its message, as for `get`; fetched first if it is not here yet), sealed anew
    /// for them: never written out in the clear, and what their relays still hold of
    /// it is not put again if you pass it to them again.
    #[arg(long, value_name = "FILE")]
    pub forward: Option<String>,
    /// How long to wait for relays to acknowledge, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
    /// Send it as a reply to a message of the conversation: `last` (their last one), or
    /// its id from `history --json` (or the start of it, 6 characters or more).
    #[arg(long, value_name = "MESSAGE")]
    pub reply: Option<String>,
}
