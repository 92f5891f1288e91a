//! `update(state, msg) -> effects`: all UI behaviour, with no I/O.

use std::time::Instant;

use kkachi_protocol::PeerId;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::state::{Overlay, Snapshot, State, new_input};
use clap::Parser as _;

use crate::cli::{
    Command, ContactCommand, DeviceCommand, GroupCommand, RelayCommand, RequestCommand,
};
use crate::store::{Direction, MessageRecord};

/// Something that happened.
// One is made per event and moved once into `update`: boxing the snapshot would
// allocate per event to save a copy of a few hundred bytes.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Msg {
    /// A key press.
    Key(KeyEvent),
    /// Pasted text.
    Paste(String),
    /// Fresh data from the store.
    Loaded(Snapshot),
    /// A message arrived in a conversation.
    Arrived(PeerId),
    /// A message arrived in a group.
    GroupArrived {
        /// The group.
        id: kkachi_protocol::group::GroupId,
        /// The group's name.
        group: String,
        /// Its sender.
        from: String,
        /// For a change to the group, what changed.
        event: Option<String>,
    },
    /// Someone who is not a contact wrote; their message is held.
    Request(PeerId),
    /// The terminal changed size: just draw again.
    Redraw,
    /// The mouse wheel: lines up (positive) or down.
    Scroll(i32),
    /// Our invite code, to show.
    Invite {
        /// The code.
        code: String,
        /// Until when it works (Unix seconds).
        expires_at: u64,
        /// The file it was also written to, if it could be.
        saved: Option<String>,
    },
    /// A background effect finished: text to show, or an error.
    Done {
        /// Panel title (None: a one-line notice).
        title: Option<String>,
        /// The output or error.
        result: Result<String, String>,
    },
}

/// Something for the runtime to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Mark the open group's messages read (and tell their authors).
    MarkGroupRead(kkachi_protocol::group::GroupId),
    /// Send a text to a group.
    SendGroup {
        /// The group.
        group: kkachi_protocol::group::GroupId,
        /// What.
        text: String,
    },
    /// Send a text.
    Send {
        /// To whom.
        to: PeerId,
        /// What.
        text: String,
        /// The message it answers, for a reply.
        reply_to: Option<kkachi_protocol::MessageId>,
    },
    /// Run a CLI command; show its output in a panel titled `title`.
    Run {
        /// The command.
        command: Command,
        /// Panel title (None: one-line notice).
        title: Option<String>,
    },
    /// Create the identity.
    Init(String),
    /// Tell the contact we saw these messages.
    MarkRead(PeerId),
    /// Re-read the store (selection or scroll changed).
    Reload,
    /// Ring the terminal bell.
    Bell,
    /// Notify that a message from this contact arrived (their name only).
    Notify {
        /// Who wrote.
        from: String,
    },
    /// Demo: take relay `n` (0-based) down or bring it back.
    ToggleRelay(usize),
    /// Demo: cut the direct path between the two users, or restore it.
    ToggleDirect,
    /// Fetch our invite code (answered with [`Msg::Invite`]).
    Invite,
    /// Put this text on the terminal's clipboard (OSC 52, where the terminal allows).
    Copy(String),
    /// Take mouse events (the wheel scrolls), or leave the mouse to the terminal.
    Mouse(bool),
    /// Save a file a contact sent into `to` (fetching it if needed), then open it with
    /// the desktop's program for its type.
    Open {
        /// The file's id.
        id: String,
        /// The folder to save it in.
        to: std::path::PathBuf,
    },
}

/// The help text (also `/help`).
pub const HELP: &str = "\
Enter        send the message (or run a /command; //text sends /text)
Alt+Enter    new line          F1  this help          Esc  close a panel
Tab, S-Tab   next / previous chat or group (Alt+Down / Alt+Up); Alt+U  unread
PgUp, PgDn   scroll (or the wheel)    Ctrl+Up/Down  pick a message, Esc unpick
Ctrl+C       quit     Ctrl+U  delete to the line's start     Ctrl+Z  undo
/invite  your code and QR            /add CODE [name]  add a contact from it
/requests  messages from non-contacts  /devices [mine]  their (your) devices
/accept WHO [name]      add them; their messages join the conversation
/reject /block /unblock WHO  drop, block, unblock  /remove WHO delete contact
/group create NAME, /group list; in a group: /members /leave /group add WHO
/rename NAME  rename this contact     /name NAME  your own name     /quit
/reply TEXT  /react 👍  answer / react to their last message (or the picked)
/edit TEXT  /delete     change / delete for everyone your last (or picked)
/timer [1d|off]         show or set: messages here disappear (5s to 1y)
/search WORDS           find in 1:1 chats     /mute  this conversation on/off
/relays  /relay add|remove ADDR   your relays (up/down, latency), add, remove
/file PATH /save [DIR] /open /forward WHO  send; save, open, pass on theirs
/drill [game-day]       check relays, clocks, outbox; game-day: each relay out
/bell /notify /mouse    bell, notifications, mouse on/off     /receipts on|off";

/// The demo's keys, after [`HELP`] in the demo.
pub const DEMO_HELP: &str = "\
F2, F3, F4   demo relay 1, 2, 3 down / up    F5  cut / restore the direct path";

/// Applies `msg` to `state`; returns what the runtime must do.
pub fn update(state: &mut State, msg: Msg) -> Vec<Effect> {
    match msg {
        Msg::Loaded(data) => {
            let before = state.selected;
            // A contact whose name changed (they renamed themselves, or we did) is said
            // so, once.
            let old: std::collections::HashMap<PeerId, &str> = state
                .data
                .conversations
                .iter()
                .map(|c| (c.peer, c.name.as_str()))
                .collect();
            let renamed = data.conversations.iter().find_map(|c| {
                old.get(&c.peer)
                    .filter(|name| **name != c.name)
                    .map(|name| (name.to_string(), c.name.clone()))
            });
            state.load(data);
            if let Some((old, new)) = renamed {
                let line = format!(
                    "{} is now {}",
                    crate::sanitize::for_terminal(&old),
                    crate::sanitize::for_terminal(&new)
                );
                notice(state, &line);
            }
            // A conversation opened by the load (the first at start, or another once
            // the open one is gone) is read, as one opened by a key is.
            match state.selected {
                Some(peer) if before != Some(peer) => vec![Effect::MarkRead(peer)],
                _ => vec![],
            }
        }
        Msg::Request(_) => {
            notice(state, "a message request arrived: /requests shows it");
            if state.bell {
                vec![Effect::Bell]
            } else {
                vec![]
            }
        }
        Msg::GroupArrived {
            id,
            group,
            from,
            event,
        } => {
            if state.group == Some(id) {
                state.scroll = 0;
                return vec![Effect::Reload, Effect::MarkGroupRead(id)];
            }
            let group = crate::sanitize::for_terminal(&group);
            let text = match event {
                Some(ref what) => format!("{group}: {}", crate::sanitize::for_terminal(what)),
                None => format!(
                    "{} wrote in {group} (Alt+U opens it)",
                    crate::sanitize::for_terminal(&from)
                ),
            };
            notice(state, &text);
            let mut effects = vec![Effect::Reload];
            if state.bell && event.is_none() {
                effects.push(Effect::Bell);
            }
            effects
        }
        Msg::Arrived(peer) => {
            if state.selected == Some(peer) && state.group.is_none() {
                state.scroll = 0;
                return vec![Effect::Reload, Effect::MarkRead(peer)];
            }
            let mut effects = vec![Effect::Reload];
            let Some(c) = state.data.conversations.iter().find(|c| c.peer == peer) else {
                return effects;
            };
            if c.muted {
                return effects;
            }
            if state.bell {
                effects.push(Effect::Bell);
            }
            let now = std::time::Instant::now();
            let recently = state
                .notified
                .get(&peer)
                .is_some_and(|at| now.duration_since(*at) < super::state::NOTIFY_EVERY);
            if state.notify && !recently {
                let from = c.name.clone();
                state.notified.insert(peer, now);
                effects.push(Effect::Notify { from });
            }
            effects
        }
        Msg::Done { title, result } => {
            match (title, result) {
                (Some(title), Ok(body)) => state.overlay = Some(Overlay::Text { title, body }),
                (None, Ok(line)) => {
                    if let Some(first) = line.lines().next() {
                        notice(state, first);
                    }
                }
                (_, Err(e)) => notice(state, &format!("error: {e}")),
            }
            vec![Effect::Reload]
        }
        Msg::Redraw => vec![],
        Msg::Scroll(_) if state.overlay.is_some() => vec![],
        Msg::Scroll(lines) => {
            state.scroll = if lines > 0 {
                state.scroll.saturating_add(lines.unsigned_abs() as usize)
            } else {
                state.scroll.saturating_sub(lines.unsigned_abs() as usize)
            };
            vec![]
        }
        Msg::Invite {
            code,
            expires_at,
            saved,
        } => {
            state.overlay = Some(Overlay::Invite {
                qr: crate::qr::render(&code).unwrap_or_default(),
                until: crate::time::format_ms(expires_at.saturating_mul(1000)),
                code: code.clone(),
                saved,
            });
            vec![Effect::Copy(code)]
        }
        Msg::Paste(text) => {
            // Terminals send a pasted line break as CR: it stays a line break.
            let text = text.replace("\r\n", "\n").replace('\r', "\n");
            state.input.insert_str(text);
            vec![]
        }
        Msg::Key(key) if key.kind != KeyEventKind::Release => on_key(state, key),
        Msg::Key(_) => vec![],
    }
}

fn notice(state: &mut State, text: &str) {
    state.notice = Some((text.to_string(), Instant::now()));
}

fn on_key(state: &mut State, key: KeyEvent) -> Vec<Effect> {
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    let alt = key.modifiers.contains(KeyModifiers::ALT);
    match key.code {
        KeyCode::Char('c') if ctrl => {
            state.quit = true;
            vec![]
        }
        KeyCode::F(1) => {
            state.overlay = Some(Overlay::Help);
            vec![]
        }
        KeyCode::F(n @ 2..=4) if state.demo => vec![Effect::ToggleRelay(usize::from(n - 2))],
        KeyCode::F(5) if state.demo => vec![Effect::ToggleDirect],
        KeyCode::Esc if state.overlay.is_some() && state.overlay != Some(Overlay::Welcome) => {
            state.overlay = None;
            vec![]
        }
        KeyCode::Esc if state.picked.is_some() => {
            state.picked = None;
            vec![]
        }
        KeyCode::Up if ctrl && state.overlay.is_none() => pick(state, -1),
        KeyCode::Down if ctrl && state.overlay.is_none() => pick(state, 1),
        KeyCode::Tab => switch(state, 1),
        KeyCode::BackTab => switch(state, -1),
        KeyCode::Char('u') if alt => next_unread(state),
        KeyCode::Down if alt => switch(state, 1),
        KeyCode::Up if alt => switch(state, -1),
        KeyCode::PageUp => {
            state.scroll = state.scroll.saturating_add(10);
            vec![]
        }
        KeyCode::PageDown => {
            state.scroll = state.scroll.saturating_sub(10);
            vec![]
        }
        KeyCode::Enter if alt => {
            state.input.insert_newline();
            vec![]
        }
        KeyCode::Enter => submit(state),
        // Kill to the start of the line, as shells and iamb do; undo is Ctrl+Z.
        KeyCode::Char('u') if ctrl => {
            state.input.delete_line_by_head();
            vec![]
        }
        KeyCode::Char('z') if ctrl => {
            state.input.undo();
            vec![]
        }
        _ => {
            state.input.input(key);
            vec![]
        }
    }
}

/// Picks the message before (-1) or after (1) the one picked; from none, the last one
/// going up; past the last one going down, none.
fn pick(state: &mut State, step: isize) -> Vec<Effect> {
    let messages = &state.data.messages;
    if messages.is_empty() {
        return vec![];
    }
    let at = state
        .picked
        .and_then(|id| messages.iter().position(|m| m.id == id));
    state.picked = match (at, step < 0) {
        (None, true) => messages.last().map(|m| m.id),
        (None, false) => None,
        (Some(i), true) => Some(messages[i.saturating_sub(1)].id),
        (Some(i), false) => messages.get(i + 1).map(|m| m.id),
    };
    // The view scrolls to keep the picked message on screen.
    vec![]
}

/// Puts `line` (a command that could not run) back in the input box, to correct.
fn keep(state: &mut State, line: &str) {
    let mut input = new_input();
    input.insert_str(format!("/{line}"));
    state.input = input;
}

/// The path after `/word` on a command line: the rest of the line (it may hold spaces),
/// `~/` the home, made absolute; `None` if there is none.
fn path_after(line: &str, word: &str) -> Option<std::path::PathBuf> {
    let rest = line.trim_start().strip_prefix(word)?.trim();
    // As a terminal pastes a dropped file: in quotes, or with its spaces escaped.
    let unquoted = match rest.as_bytes() {
        [b'\'', .., b'\''] | [b'"', .., b'"'] if rest.len() >= 2 => {
            rest[1..rest.len() - 1].to_string()
        }
        _ => rest.replace("\\ ", " "),
    };
    let rest = unquoted.as_str();
    if rest.is_empty() {
        return None;
    }
    let path = match rest.strip_prefix("~/") {
        Some(tail) => std::env::var_os("HOME")
            .map(|h| std::path::PathBuf::from(h).join(tail))
            .unwrap_or_else(|| rest.into()),
        None if rest == "~" => std::env::var_os("HOME").map_or_else(|| rest.into(), Into::into),
        None => std::path::PathBuf::from(rest),
    };
    Some(std::path::absolute(&path).unwrap_or(path))
}

/// Where `/save` puts files by default: the user's downloads folder, else the folder
/// the UI started in.
fn downloads() -> std::path::PathBuf {
    directories::UserDirs::new()
        .and_then(|d| d.download_dir().map(std::path::Path::to_path_buf))
        .filter(|d| d.is_dir())
        .or_else(|| std::env::current_dir().ok())
        .unwrap_or_else(|| ".".into())
}

/// The message /reply and /react act on: the one picked, or their last; never a
/// deleted one.
fn reply_target(state: &State) -> Option<&MessageRecord> {
    let messages = &state.data.messages;
    match state.picked {
        Some(id) => messages.iter().find(|m| m.id == id && !m.deleted),
        None => messages
            .iter()
            .rev()
            .find(|m| m.direction == Direction::In && !m.deleted),
    }
}

/// The message of ours that `spec` (as [`own_target`] gives it) names, if shown.
fn own_message<'a>(state: &'a State, spec: &str) -> Option<&'a MessageRecord> {
    let mut ours = state
        .data
        .messages
        .iter()
        .rev()
        .filter(|m| m.direction == Direction::Out && !m.deleted);
    if spec == "last" {
        ours.next()
    } else {
        ours.find(|m| kkachi_protocol::MessageId(m.id).to_hex() == spec)
    }
}

/// The message /edit and /delete act on, as the command line names it: the one picked,
/// or our last; `Err` says why not.
fn own_target(state: &State) -> Result<String, &'static str> {
    match state.picked {
        None => Ok("last".into()),
        Some(id) => match state.data.messages.iter().find(|m| m.id == id) {
            Some(m) if m.direction == Direction::Out => {
                Ok(kkachi_protocol::MessageId(m.id).to_hex())
            }
            _ => Err("only your own messages can be edited or deleted for everyone"),
        },
    }
}

/// Moves along the list: conversations, then groups.
fn switch(state: &mut State, step: isize) -> Vec<Effect> {
    let contacts = state.data.conversations.len();
    let total = contacts + state.data.groups.len();
    if total == 0 {
        return vec![];
    }
    let at = match state.group {
        Some(id) => state
            .data
            .groups
            .iter()
            .position(|g| g.id == id)
            .map(|i| contacts + i),
        None => state
            .selected
            .and_then(|p| state.data.conversations.iter().position(|c| c.peer == p)),
    }
    .unwrap_or(0) as isize;
    let next = (at + step).rem_euclid(total as isize) as usize;
    state.scroll = 0;
    state.picked = None;
    if next >= contacts {
        let id = state.data.groups[next - contacts].id;
        state.group = Some(id);
        return vec![Effect::Reload, Effect::MarkGroupRead(id)];
    }
    let peer = state.data.conversations[next].peer;
    state.group = None;
    state.selected = Some(peer);
    vec![Effect::Reload, Effect::MarkRead(peer)]
}

/// Opens the next conversation (in the list's order, after the open one) with unread
/// messages.
/// Words of a command line; "double quotes" keep spaces inside one.
fn split_quoted(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(word);
    }
    out
}

fn next_unread(state: &mut State) -> Vec<Effect> {
    let list = &state.data.conversations;
    let at = state
        .selected
        .and_then(|p| list.iter().position(|c| c.peer == p))
        .unwrap_or(0);
    let found = (1..=list.len())
        .map(|step| &list[(at + step) % list.len()])
        .find(|c| c.unread > 0 && Some(c.peer) != state.selected)
        .map(|c| c.peer);
    match found {
        Some(peer) => {
            state.selected = Some(peer);
            state.group = None;
            state.scroll = 0;
            state.picked = None;
            vec![Effect::Reload, Effect::MarkRead(peer)]
        }
        None => match state
            .data
            .groups
            .iter()
            .find(|g| g.unread > 0 && Some(g.id) != state.group)
            .map(|g| g.id)
        {
            Some(id) => {
                state.group = Some(id);
                state.scroll = 0;
                state.picked = None;
                vec![Effect::Reload, Effect::MarkGroupRead(id)]
            }
            None => {
                notice(state, "nothing unread");
                vec![]
            }
        },
    }
}

/// The commands `/…` names (an unknown one is not run, and what was typed stays).
const COMMANDS: &[&str] = &[
    "quit", "q", "help", "invite", "relays", "relay", "drill", "add", "requests", "accept",
    "reject", "block", "unblock", "remove", "rename", "bell", "timer", "mute", "notify", "search",
    "receipts", "edit", "delete", "reply", "react", "name", "mouse", "file", "save", "open",
    "forward", "group", "members", "leave", "devices",
];

fn submit(state: &mut State) -> Vec<Effect> {
    // A delete waiting for its confirmation is confirmed only by the next command.
    let confirming = state.confirm_delete.take();
    let text = state.input.lines().join("\n");
    let text = text.trim().to_string();
    if text.is_empty() {
        return vec![];
    }
    if state.data.me.is_none() {
        // The welcome panel asks for a name.
        state.input = new_input();
        return vec![Effect::Init(text)];
    }
    // `//` at the start sends a message that begins with `/`.
    let message = match text.strip_prefix("//") {
        Some(rest) => format!("/{rest}"),
        None => match text.strip_prefix('/') {
            Some(command) => {
                let name = command.split_whitespace().next().unwrap_or_default();
                if !COMMANDS.contains(&name) {
                    // Kept, to correct or to send with `//`.
                    notice(
                        state,
                        &format!(
                            "unknown command /{name}; /help lists them, and // at the start sends a message that begins with /"
                        ),
                    );
                    return vec![];
                }
                state.input = new_input();
                state.confirm_delete = confirming;
                let effects = run_command(state, command);
                if name != "delete" {
                    state.confirm_delete = None;
                }
                return effects;
            }
            None => text,
        },
    };
    if let Some(group) = state.group {
        if state
            .current_group()
            .is_some_and(|g| g.role == "not a member")
        {
            notice(
                state,
                "you are not in this group any more: nothing can be sent to it",
            );
            return vec![];
        }
        state.input = new_input();
        state.scroll = 0;
        return vec![Effect::SendGroup {
            group,
            text: message,
        }];
    }
    match state.selected {
        Some(to) => {
            state.input = new_input();
            state.scroll = 0;
            vec![Effect::Send {
                to,
                text: message,
                reply_to: None,
            }]
        }
        None => {
            // Kept until there is someone to send it to.
            notice(
                state,
                "no conversation yet: add a contact with /add CODE (what you typed is kept)",
            );
            vec![]
        }
    }
}

fn run_command(state: &mut State, line: &str) -> Vec<Effect> {
    let mut words = line.split_whitespace();
    let run = |command, title: Option<&str>| Effect::Run {
        command,
        title: title.map(str::to_string),
    };
    let (first, second) = {
        let mut peek = line.split_whitespace();
        (peek.next(), peek.next())
    };
    // In an open group: its own commands, and the contact's are refused plainly.
    if let Some(group) = state.group {
        let id = group.to_hex();
        match first {
            Some("members") => {
                return vec![run(
                    Command::Group(GroupCommand::Members { group: id }),
                    Some("Members"),
                )];
            }
            Some("leave") if state.confirm_leave != Some(group) => {
                // Asked once more: leaving cannot be taken back by a member.
                state.confirm_leave = Some(group);
                notice(state, "leave this group? /leave again to leave");
                return vec![];
            }
            Some("leave") => {
                state.confirm_leave = None;
                return vec![run(
                    Command::Group(GroupCommand::Leave {
                        group: id,
                        force: second == Some("--force"),
                    }),
                    None,
                )];
            }
            Some("timer") => {
                notice(state, "in a group: /group timer [1d|off] (admins set it)");
                return vec![];
            }
            Some("remove") => {
                // Not to be taken for removing someone from the group: that deletes a
                // contact and your chat with them.
                notice(
                    state,
                    "/remove deletes a contact; to take someone out of this group: /group remove WHO",
                );
                return vec![];
            }
            Some("edit" | "delete" | "reply" | "react" | "rename" | "mute" | "search") => {
                notice(state, "not in groups yet: that works in 1:1 chats");
                return vec![];
            }
            _ => {}
        }
    }
    state.confirm_leave = None;
    // In a 1:1 chat, the contact's devices; elsewhere (or `/devices mine`) ours.
    if first == Some("devices") {
        return match (second, state.selected) {
            (None, Some(peer)) if state.group.is_none() => vec![run(
                Command::Contact(ContactCommand::Devices {
                    contact: peer.to_string(),
                }),
                Some("Devices"),
            )],
            (None | Some("mine"), _) => vec![run(
                Command::Device(DeviceCommand::List),
                Some("Your devices"),
            )],
            _ => {
                notice(
                    state,
                    "usage: /devices (this contact's, with their fingerprints), /devices mine",
                );
                vec![]
            }
        };
    }
    if matches!(first, Some("members" | "leave")) && state.group.is_none() {
        notice(
            state,
            "open a group first (Tab); /group members GROUP and /group leave GROUP work anywhere",
        );
        return vec![];
    }
    if first == Some("group") {
        let mut args = split_quoted(line);
        args.remove(0);
        // In an open group, its commands act on it: `/group add Minji`.
        if let (Some(open), Some(sub)) = (state.group, args.first())
            && matches!(
                sub.as_str(),
                "add"
                    | "remove"
                    | "admin"
                    | "rename"
                    | "mode"
                    | "members"
                    | "receipts"
                    | "read"
                    | "timer"
            )
        {
            args.insert(1, open.to_hex());
        }
        let parsed = crate::cli::Cli::try_parse_from(
            ["kkachi", "group"]
                .into_iter()
                .map(str::to_string)
                .chain(args),
        );
        return match parsed {
            Ok(crate::cli::Cli {
                command: Some(command @ Command::Group(_)),
                ..
            }) => {
                let title = matches!(
                    command,
                    Command::Group(GroupCommand::List | GroupCommand::Members { .. })
                )
                .then_some("Groups");
                vec![run(command, title)]
            }
            _ => {
                notice(
                    state,
                    if state.group.is_some() {
                        "in a group: /group add|remove|admin WHO, rename NAME, mode chat|announcement, members, receipts"
                    } else {
                        "usage: /group create NAME, /group list; a group's own commands work in it (Tab)"
                    },
                );
                vec![]
            }
        };
    }
    match (words.next(), words.next()) {
        (Some("quit" | "q"), _) => {
            state.quit = true;
            vec![]
        }
        (Some("help"), _) => {
            state.overlay = Some(Overlay::Help);
            vec![]
        }
        (Some("invite"), _) => vec![Effect::Invite],
        (Some("relays"), _) | (Some("relay"), Some("list")) => {
            vec![run(Command::Relay(RelayCommand::List), Some("Relays"))]
        }
        (Some("drill"), Some("game-day")) => vec![run(
            Command::Drill { game_day: true },
            Some("Drill: game day"),
        )],
        (Some("drill"), None) => vec![run(Command::Drill { game_day: false }, Some("Drill"))],
        (Some("drill"), Some(_)) => {
            notice(state, "usage: /drill [game-day]");
            vec![]
        }
        (Some("relay"), Some("add")) => {
            let addrs: Vec<String> = words.map(str::to_string).collect();
            if addrs.is_empty() {
                notice(state, "usage: /relay add ADDR");
                return vec![];
            }
            vec![run(
                Command::Relay(RelayCommand::Add { addrs, token: None }),
                None,
            )]
        }
        (Some("relay"), Some("remove")) => match words.next() {
            Some(addr) => vec![run(
                Command::Relay(RelayCommand::Remove {
                    addr: addr.to_string(),
                }),
                None,
            )],
            None => {
                notice(state, "usage: /relay remove ADDR");
                vec![]
            }
        },
        (Some("add"), Some(first)) => {
            let rest: Vec<&str> = words.collect();
            // A code pasted from a wrapped line comes in pieces: as many as make a
            // valid code are the code, the words after them the name.
            let joined = |n: usize| -> String {
                std::iter::once(first)
                    .chain(rest[..n].iter().copied())
                    .collect()
            };
            let pieces = (0..=rest.len())
                .find(|&n| kkachi_protocol::Card::from_invite(&joined(n)).is_ok())
                .unwrap_or(0);
            let name = (pieces < rest.len()).then(|| rest[pieces..].join(" "));
            vec![run(
                Command::Contact(ContactCommand::Add {
                    code: vec![joined(pieces)],
                    name,
                }),
                None,
            )]
        }
        (Some("add"), None) => {
            notice(state, "usage: /add CODE [name]");
            vec![]
        }
        (Some("requests"), _) => vec![run(
            Command::Request(RequestCommand::List),
            Some("Message requests"),
        )],
        (Some("accept"), Some(who)) => {
            let name: Vec<&str> = words.collect();
            let name = (!name.is_empty()).then(|| name.join(" "));
            let who = who.to_string();
            vec![run(
                Command::Request(RequestCommand::Accept { who, name }),
                None,
            )]
        }
        (Some("reject"), Some(who)) => vec![run(
            Command::Request(RequestCommand::Reject {
                who: who.to_string(),
            }),
            None,
        )],
        (Some("block"), Some(who)) => vec![run(
            Command::Contact(ContactCommand::Block {
                contact: who.to_string(),
            }),
            None,
        )],
        (Some("unblock"), Some(who)) => vec![run(
            Command::Contact(ContactCommand::Unblock {
                contact: who.to_string(),
            }),
            None,
        )],
        (Some("remove"), Some(who)) => vec![run(
            Command::Contact(ContactCommand::Remove {
                contact: who.to_string(),
            }),
            None,
        )],
        (Some("search"), Some(first)) => {
            let words: Vec<String> = std::iter::once(first)
                .chain(words)
                .map(str::to_owned)
                .collect();
            let title = format!("Search: {}", words.join(" "));
            vec![run(
                Command::Search {
                    words,
                    contact: None,
                    last: 50,
                },
                Some(title.as_str()),
            )]
        }
        (Some("search"), None) => {
            notice(state, "usage: /search WORDS");
            vec![]
        }
        (Some("file"), first) => {
            // To the open group, else to the open conversation.
            let to = match (state.group, state.selected) {
                (Some(group), _) => group.to_hex(),
                (None, Some(peer)) => peer.to_string(),
                (None, None) => {
                    notice(state, "open the conversation first");
                    return vec![];
                }
            };
            let Some(path) = path_after(line, "file").filter(|_| first.is_some()) else {
                notice(state, "usage: /file PATH (a file or photo, up to 2 GiB)");
                return vec![];
            };
            if !path.is_file() {
                let why = if path.exists() {
                    "is not a file"
                } else {
                    "does not exist"
                };
                notice(state, &format!("{} {why}", path.display()));
                keep(state, line);
                return vec![];
            }
            vec![run(
                Command::Send(crate::cli::SendArgs {
                    contact: to,
                    text: Vec::new(),
                    timeout: 5.0,
                    reply: None,
                    file: Some(path),
                    forward: None,
                }),
                None,
            )]
        }
        (Some("forward"), to) => {
            let target = line
                .trim_start()
                .strip_prefix("forward")
                .map(str::trim)
                .filter(|t| !t.is_empty());
            let Some(to) = target.filter(|_| to.is_some()) else {
                notice(
                    state,
                    "usage: /forward NAME (their last file, or the one picked, to a contact or group)",
                );
                return vec![];
            };
            let Some((id, _)) = their_file(state, "forward") else {
                return vec![];
            };
            state.picked = None;
            vec![run(
                Command::Send(crate::cli::SendArgs {
                    contact: to.to_owned(),
                    text: Vec::new(),
                    timeout: 5.0,
                    reply: None,
                    file: None,
                    forward: Some(id),
                }),
                None,
            )]
        }
        (Some(verb @ ("save" | "open")), dir) => {
            let Some(found) = their_file(state, verb) else {
                return vec![];
            };
            let (id, file_name) = found;
            let to = match (dir, path_after(line, verb)) {
                (Some(_), Some(d)) if d.is_dir() => d,
                (Some(_), Some(d)) => {
                    let why = if d.exists() {
                        "is not a folder"
                    } else {
                        "does not exist"
                    };
                    notice(state, &format!("{} {why}", d.display()));
                    keep(state, line);
                    return vec![];
                }
                _ => downloads(),
            };
            state.picked = None;
            if verb == "open" {
                // Only what opens as a document, picture or recording: a contact's file
                // never runs as a program, whatever they call its type.
                if !crate::files::opens_safely(&file_name) {
                    notice(
                        state,
                        "that kind of file is not opened from here: /save it and look at it first",
                    );
                    return vec![];
                }
                return vec![Effect::Open { id, to }];
            }
            vec![run(Command::Get { id, to: Some(to) }, None)]
        }
        (Some("mute"), _) => match state.current() {
            Some(c) => vec![run(
                Command::Mute {
                    contact: c.peer.to_string(),
                    off: c.muted,
                },
                None,
            )],
            None => {
                notice(state, "open the conversation to mute first");
                vec![]
            }
        },
        (Some("edit"), Some(first)) => match (state.selected, own_target(state)) {
            (Some(_), Err(why)) => {
                notice(state, why);
                keep(state, line);
                vec![]
            }
            (Some(peer), Ok(message)) => {
                let text = std::iter::once(first)
                    .chain(words)
                    .map(str::to_owned)
                    .collect();
                state.picked = None;
                vec![run(
                    Command::Edit {
                        contact: peer.to_string(),
                        message,
                        text,
                    },
                    None,
                )]
            }
            (None, _) => {
                notice(state, "open the conversation first");
                vec![]
            }
        },
        (Some("edit"), None) => {
            notice(
                state,
                "usage: /edit NEW TEXT (changes your last message here, or the one picked with Ctrl+Up)",
            );
            vec![]
        }
        (Some("delete"), Some(_)) => {
            notice(
                state,
                "usage: /delete (deletes your last message here, for everyone)",
            );
            vec![]
        }
        (Some("delete"), None) => match (state.selected, own_target(state)) {
            (Some(_), Err(why)) => {
                notice(state, why);
                keep(state, line);
                vec![]
            }
            (Some(peer), Ok(message)) => {
                // For everyone, and it cannot be taken back: asked twice.
                if state.confirm_delete.take() != Some((peer, message.clone())) {
                    let shown = own_message(state, &message)
                        .map(|m| {
                            let text: String = m.text.chars().take(30).collect();
                            format!("\u{201c}{}\u{201d}", crate::sanitize::for_terminal(&text))
                        })
                        .unwrap_or_else(|| "your last message".into());
                    notice(
                        state,
                        &format!("delete {shown} for everyone? Enter again to confirm"),
                    );
                    state.confirm_delete = Some((peer, message));
                    keep(state, line);
                    return vec![];
                }
                state.picked = None;
                vec![run(
                    Command::Delete {
                        contact: peer.to_string(),
                        message,
                        for_me: false,
                    },
                    None,
                )]
            }
            (None, _) => {
                notice(state, "open the conversation first");
                vec![]
            }
        },
        (Some("name"), Some(first)) => {
            let name = std::iter::once(first)
                .chain(words)
                .map(str::to_owned)
                .collect();
            vec![run(Command::Name { name }, None)]
        }
        (Some("name"), None) => match &state.data.me {
            Some((me, _)) => {
                let line = format!(
                    "you are {}; /name NEW NAME changes it",
                    crate::sanitize::for_terminal(me)
                );
                notice(state, &line);
                vec![]
            }
            None => vec![],
        },
        (Some("reply"), first) => {
            let Some(to) = state.selected else {
                notice(state, "open the conversation first");
                return vec![];
            };
            // The text as typed after the command, line breaks and all.
            let text = line
                .trim_start()
                .strip_prefix("reply")
                .unwrap_or_default()
                .trim()
                .to_string();
            if first.is_none() || text.is_empty() {
                notice(
                    state,
                    "usage: /reply TEXT (answers their last message, or the one picked with Ctrl+Up)",
                );
                return vec![];
            }
            let Some(target) = reply_target(state) else {
                notice(
                    state,
                    "they have written nothing here yet: pick a message with Ctrl+Up",
                );
                keep(state, line);
                return vec![];
            };
            let reply_to = Some(kkachi_protocol::MessageId(target.id));
            state.picked = None;
            state.scroll = 0;
            vec![Effect::Send { to, text, reply_to }]
        }
        (Some("react"), emoji) => {
            let Some(peer) = state.selected else {
                notice(state, "open the conversation first");
                return vec![];
            };
            let Some(emoji) = emoji else {
                notice(
                    state,
                    "usage: /react EMOJI (on their last message, or the one picked with Ctrl+Up; the same again takes it back)",
                );
                return vec![];
            };
            let Some(target) = reply_target(state) else {
                notice(
                    state,
                    "they have written nothing here yet: pick a message with Ctrl+Up",
                );
                keep(state, line);
                return vec![];
            };
            if let Err(e) = kkachi_protocol::content::check_reaction(emoji) {
                notice(state, &format!("{e}"));
                keep(state, line);
                return vec![];
            }
            // The same reaction again takes it back, as a second tap does elsewhere.
            let remove = target.reactions.ours == emoji;
            let message = kkachi_protocol::MessageId(target.id).to_hex();
            state.picked = None;
            vec![run(
                Command::React {
                    contact: peer.to_string(),
                    message,
                    emoji: (!remove).then(|| emoji.to_string()),
                    remove,
                },
                None,
            )]
        }
        (Some("receipts"), setting) => {
            if let Some(s) = setting
                && s != "on"
                && s != "off"
            {
                notice(state, "usage: /receipts [on|off]");
                return vec![];
            }
            vec![run(
                Command::Receipts {
                    setting: setting.map(str::to_owned),
                },
                None,
            )]
        }
        (Some("notify"), _) => {
            state.notify = !state.notify;
            notice(
                state,
                if state.notify {
                    "notifications on"
                } else {
                    "notifications off"
                },
            );
            vec![]
        }
        (Some("timer"), arg) => match state.selected {
            Some(peer) => {
                if let Some(d) = arg
                    && let Err(e) = crate::commands::parse_duration(d)
                {
                    notice(state, &e);
                    return vec![];
                }
                vec![run(
                    Command::Timer {
                        contact: peer.to_string(),
                        duration: arg.map(str::to_owned),
                    },
                    None,
                )]
            }
            None => {
                notice(state, "open the conversation to set its timer first");
                vec![]
            }
        },
        (Some("rename"), Some(first)) => match state.selected {
            Some(peer) => {
                let name = std::iter::once(first)
                    .chain(words)
                    .collect::<Vec<_>>()
                    .join(" ");
                vec![run(
                    Command::Contact(ContactCommand::Rename {
                        contact: peer.to_string(),
                        name,
                    }),
                    None,
                )]
            }
            None => {
                notice(state, "open the conversation to rename first");
                vec![]
            }
        },
        (Some(cmd @ ("accept" | "reject" | "block" | "unblock" | "remove" | "rename")), None) => {
            let what = if cmd == "rename" { "NAME" } else { "WHO" };
            notice(state, &format!("usage: /{cmd} {what} (see /help)"));
            vec![]
        }
        (Some("mouse"), _) => {
            state.mouse = !state.mouse;
            notice(
                state,
                if state.mouse {
                    "mouse on: the wheel scrolls (hold Shift to select text)"
                } else {
                    "mouse off: the terminal selects text; PgUp and PgDn scroll"
                },
            );
            vec![Effect::Mouse(state.mouse)]
        }
        (Some("bell"), _) => {
            state.bell = !state.bell;
            notice(state, if state.bell { "bell on" } else { "bell off" });
            vec![]
        }
        _ => {
            notice(state, &format!("unknown command /{line}; /help lists them"));
            vec![]
        }
    }
}

/// The file `/VERB` acts on: in a group, the last file a member sent; in a
/// conversation, the picked message's file, else their last one (its id and name). A
/// notice says why there is none.
fn their_file(state: &mut State, verb: &str) -> Option<(String, String)> {
    Some(if state.group.is_some() {
        let last = state.data.group_lines.iter().rev();
        let Some(file) = last
            .filter(|l| !l.ours && !l.event)
            .find_map(|l| l.file.as_ref())
        else {
            notice(state, &format!("no file from a member here to {verb}"));
            return None;
        };
        (file.id.clone(), file.name.clone())
    } else {
        if state.selected.is_none() {
            notice(state, "open the conversation first");
            return None;
        }
        let target = match state.picked {
            Some(id) => state.data.messages.iter().find(|m| m.id == id),
            None => state
                .data
                .messages
                .iter()
                .rev()
                .find(|m| m.direction == Direction::In && m.file.is_some() && !m.deleted),
        };
        let Some(file) = target
            .filter(|m| m.direction == Direction::In && !m.deleted)
            .and_then(|m| m.file.as_ref()?.file())
        else {
            notice(
                state,
                &format!("no file of theirs here to {verb}: pick one with Ctrl+Up, then /{verb}"),
            );
            return None;
        };
        (crate::files::hex(&file.id()), file.name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tui::state::{ConversationSummary, Status};

    fn key(code: KeyCode) -> Msg {
        Msg::Key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    fn typed(state: &mut State, text: &str) {
        for c in text.chars() {
            update(state, key(KeyCode::Char(c)));
        }
    }

    fn loaded(n: usize) -> (State, Vec<PeerId>) {
        let peers: Vec<PeerId> = (0..n).map(|_| PeerId::random()).collect();
        let mut s = State::default();
        update(
            &mut s,
            Msg::Loaded(Snapshot {
                me: Some(("me".into(), PeerId::random())),
                conversations: peers
                    .iter()
                    .enumerate()
                    .map(|(i, p)| ConversationSummary {
                        peer: *p,
                        name: format!("c{i}"),
                        unread: 0,
                        last_ms: None,
                        muted: false,
                    })
                    .collect(),
                status: Status {
                    relays_up: 1,
                    relays: 2,
                    outbox: 0,
                    lan_peers: 0,
                    direct: 0,
                    requests: 0,
                    files_waiting: 0,
                },
                ..Snapshot::default()
            }),
        );
        (s, peers)
    }

    #[test]
    fn starts_on_the_most_recent_conversation_and_enter_sends() {
        let (mut s, peers) = loaded(3);
        assert_eq!(s.selected, Some(peers[0]));
        typed(&mut s, "hello");
        let effects = update(&mut s, key(KeyCode::Enter));
        assert_eq!(
            effects,
            vec![Effect::Send {
                to: peers[0],
                text: "hello".into(),
                reply_to: None
            }]
        );
        assert_eq!(s.input.lines(), [""], "input cleared after sending");
        assert!(
            update(&mut s, key(KeyCode::Enter)).is_empty(),
            "empty input sends nothing"
        );
    }

    #[test]
    fn alt_enter_makes_a_new_line() {
        let (mut s, peers) = loaded(1);
        typed(&mut s, "a");
        update(
            &mut s,
            Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::ALT)),
        );
        typed(&mut s, "b");
        let effects = update(&mut s, key(KeyCode::Enter));
        assert_eq!(
            effects,
            vec![Effect::Send {
                to: peers[0],
                text: "a\nb".into(),
                reply_to: None
            }]
        );
    }

    #[test]
    fn tab_cycles_conversations_both_ways() {
        let (mut s, peers) = loaded(3);
        update(&mut s, key(KeyCode::Tab));
        assert_eq!(s.selected, Some(peers[1]));
        update(&mut s, key(KeyCode::BackTab));
        update(&mut s, key(KeyCode::BackTab));
        assert_eq!(s.selected, Some(peers[2]), "wraps around");
        update(
            &mut s,
            Msg::Key(KeyEvent::new(KeyCode::Down, KeyModifiers::ALT)),
        );
        assert_eq!(s.selected, Some(peers[0]));
    }

    #[test]
    fn devices_shows_the_open_contacts_or_ours() {
        let (mut s, peers) = loaded(2);
        assert_eq!(s.selected, Some(peers[0]));
        typed(&mut s, "/devices");
        assert_eq!(
            update(&mut s, key(KeyCode::Enter)),
            vec![Effect::Run {
                command: Command::Contact(ContactCommand::Devices {
                    contact: peers[0].to_string()
                }),
                title: Some("Devices".into())
            }]
        );
        typed(&mut s, "/devices mine");
        assert_eq!(
            update(&mut s, key(KeyCode::Enter)),
            vec![Effect::Run {
                command: Command::Device(DeviceCommand::List),
                title: Some("Your devices".into())
            }]
        );
        typed(&mut s, "/devices of everyone");
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert!(s.notice.as_ref().unwrap().0.contains("usage: /devices"));
    }

    #[test]
    fn commands_become_effects_and_unknown_ones_say_so() {
        let (mut s, _) = loaded(1);
        typed(&mut s, "/add kk1abc Minji Park");
        let e = update(&mut s, key(KeyCode::Enter));
        assert_eq!(
            e,
            vec![Effect::Run {
                command: Command::Contact(ContactCommand::Add {
                    code: vec!["kk1abc".into()],
                    name: Some("Minji Park".into())
                }),
                title: None
            }]
        );
        typed(&mut s, "/relays");
        assert!(matches!(
            update(&mut s, key(KeyCode::Enter))[0],
            Effect::Run {
                command: Command::Relay(RelayCommand::List),
                ..
            }
        ));
        typed(&mut s, "/drill");
        assert_eq!(
            update(&mut s, key(KeyCode::Enter)),
            vec![Effect::Run {
                command: Command::Drill { game_day: false },
                title: Some("Drill".into())
            }]
        );
        typed(&mut s, "/drill game-day");
        assert_eq!(
            update(&mut s, key(KeyCode::Enter)),
            vec![Effect::Run {
                command: Command::Drill { game_day: true },
                title: Some("Drill: game day".into())
            }]
        );
        typed(&mut s, "/frobnicate");
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert!(s.notice.as_ref().unwrap().0.contains("unknown command"));
        assert_eq!(s.input.lines(), ["/frobnicate"], "kept to be corrected");
        update(
            &mut s,
            Msg::Key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL)),
        );
        typed(&mut s, "/quit");
        update(&mut s, key(KeyCode::Enter));
        assert!(s.quit);
    }

    #[test]
    fn help_opens_with_f1_and_closes_with_esc() {
        let (mut s, _) = loaded(1);
        update(&mut s, key(KeyCode::F(1)));
        assert_eq!(s.overlay, Some(Overlay::Help));
        update(&mut s, key(KeyCode::Esc));
        assert_eq!(s.overlay, None);
    }

    #[test]
    fn first_start_asks_for_a_name() {
        let mut s = State::default();
        update(&mut s, Msg::Loaded(Snapshot::default()));
        assert_eq!(s.overlay, Some(Overlay::Welcome));
        update(&mut s, key(KeyCode::Esc));
        assert_eq!(
            s.overlay,
            Some(Overlay::Welcome),
            "the welcome panel stays until a name is given"
        );
        typed(&mut s, "Jiwoo");
        assert_eq!(
            update(&mut s, key(KeyCode::Enter)),
            vec![Effect::Init("Jiwoo".into())]
        );
    }

    #[test]
    fn messages_elsewhere_ring_the_bell_unless_turned_off() {
        let (mut s, peers) = loaded(2);
        assert!(update(&mut s, Msg::Arrived(peers[1])).contains(&Effect::Bell));
        assert!(update(&mut s, Msg::Arrived(peers[0])).contains(&Effect::MarkRead(peers[0])));
        typed(&mut s, "/bell");
        update(&mut s, key(KeyCode::Enter));
        assert!(!update(&mut s, Msg::Arrived(peers[1])).contains(&Effect::Bell));
    }

    #[test]
    fn messages_elsewhere_notify_by_name_unless_muted_or_turned_off() {
        let (mut s, peers) = loaded(3);
        let name = s.data.conversations[1].name.clone();
        let effects = update(&mut s, Msg::Arrived(peers[1]));
        assert!(
            effects.contains(&Effect::Notify { from: name }),
            "{effects:?}"
        );
        // A flood notifies once: the next within ten seconds rings only.
        let effects = update(&mut s, Msg::Arrived(peers[1]));
        assert_eq!(effects, [Effect::Reload, Effect::Bell]);
        // /delete takes no argument: a typo cannot delete the wrong message for everyone.
        typed(&mut s, "/delete 3f2a");
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        // Muted: counted, but neither a bell nor a notification.
        s.data.conversations[2].muted = true;
        let effects = update(&mut s, Msg::Arrived(peers[2]));
        assert_eq!(effects, [Effect::Reload]);
        // /mute asks to mute the open conversation, or unmute it when it is muted.
        typed(&mut s, "/mute");
        let effects = update(&mut s, key(KeyCode::Enter));
        assert!(
            matches!(
                &effects[..],
                [Effect::Run {
                    command: Command::Mute { off: false, .. },
                    ..
                }]
            ),
            "{effects:?}"
        );
        typed(&mut s, "/notify");
        update(&mut s, key(KeyCode::Enter));
        let effects = update(&mut s, Msg::Arrived(peers[1]));
        assert!(
            !effects.iter().any(|e| matches!(e, Effect::Notify { .. })),
            "{effects:?}"
        );
        // /search runs the search and shows it in a panel.
        typed(&mut s, "/search north gate");
        let effects = update(&mut s, key(KeyCode::Enter));
        assert!(
            matches!(&effects[..], [Effect::Run { command: Command::Search { words, .. }, title: Some(t) }]
                if words == &["north", "gate"] && t == "Search: north gate"),
            "{effects:?}"
        );
    }

    #[test]
    fn alt_u_opens_the_next_conversation_with_unread_messages() {
        let (mut s, peers) = loaded(3);
        s.data.conversations[2].unread = 4;
        let alt_u = || Msg::Key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::ALT));
        assert_eq!(
            update(&mut s, alt_u()),
            [Effect::Reload, Effect::MarkRead(peers[2])]
        );
        assert_eq!(s.selected, Some(peers[2]));
        // Nothing else unread: said so, and the conversation stays.
        assert!(update(&mut s, alt_u()).is_empty());
        assert_eq!(s.selected, Some(peers[2]));
        assert!(
            s.notice
                .as_ref()
                .is_some_and(|(n, _)| n == "nothing unread")
        );
    }

    #[test]
    fn ctrl_c_quits_and_paging_scrolls() {
        let (mut s, _) = loaded(1);
        update(&mut s, key(KeyCode::PageUp));
        assert_eq!(s.scroll, 10);
        update(&mut s, key(KeyCode::PageDown));
        assert_eq!(s.scroll, 0);
        update(
            &mut s,
            Msg::Key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
        );
        assert!(s.quit);
    }

    #[test]
    fn slash_slash_sends_a_slash_and_what_cannot_go_is_kept() {
        let (mut s, peers) = loaded(1);
        typed(&mut s, "//shrug");
        assert_eq!(
            update(&mut s, key(KeyCode::Enter)),
            vec![Effect::Send {
                to: peers[0],
                text: "/shrug".into(),
                reply_to: None
            }]
        );
        // An unknown command is not thrown away: it stays to be corrected.
        typed(&mut s, "/shrug hello");
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert_eq!(s.input.lines(), ["/shrug hello"]);
        assert!(
            s.notice.as_ref().unwrap().0.contains("//"),
            "{:?}",
            s.notice
        );
        // Nobody to send to yet: what was typed stays too.
        let mut empty = State::default();
        update(
            &mut empty,
            Msg::Loaded(Snapshot {
                me: Some(("me".into(), PeerId::random())),
                ..Snapshot::default()
            }),
        );
        typed(&mut empty, "hello?");
        assert!(update(&mut empty, key(KeyCode::Enter)).is_empty());
        assert_eq!(empty.input.lines(), ["hello?"]);
    }

    #[test]
    fn pasted_line_breaks_stay_and_ctrl_u_kills_the_line() {
        let (mut s, peers) = loaded(1);
        update(&mut s, Msg::Paste("one\rtwo\r\nthree".into()));
        assert_eq!(s.input.lines(), ["one", "two", "three"]);
        let ctrl = |c| Msg::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL));
        update(&mut s, ctrl('u'));
        assert_eq!(
            s.input.lines(),
            ["one", "two", ""],
            "killed to the line's start"
        );
        update(&mut s, ctrl('z'));
        assert_eq!(s.input.lines(), ["one", "two", "three"], "and undone");
        assert_eq!(
            update(&mut s, key(KeyCode::Enter)),
            vec![Effect::Send {
                to: peers[0],
                text: "one\ntwo\nthree".into(),
                reply_to: None
            }]
        );
    }

    #[test]
    fn a_code_pasted_over_several_lines_is_added_whole() {
        let (mut s, _) = loaded(1);
        let id = kkachi_protocol::Identity::generate();
        let relay: kkachi_protocol::Multiaddr =
            format!("/ip4/127.0.0.1/tcp/4040/p2p/{}", PeerId::random())
                .parse()
                .unwrap();
        let code = kkachi_protocol::Card::new(&id, "Minji", vec![relay], 1)
            .unwrap()
            .to_invite();
        let (a, b) = code.split_at(code.len() / 2);
        update(&mut s, Msg::Paste(format!("/add {a}\r{b} Minji Park")));
        assert_eq!(
            update(&mut s, key(KeyCode::Enter)),
            vec![Effect::Run {
                command: Command::Contact(ContactCommand::Add {
                    code: vec![code.clone()],
                    name: Some("Minji Park".into())
                }),
                title: None
            }]
        );
    }

    #[test]
    fn the_conversation_open_at_start_is_read() {
        let peer = PeerId::random();
        let mut s = State::default();
        let data = Snapshot {
            me: Some(("me".into(), PeerId::random())),
            conversations: vec![crate::tui::state::ConversationSummary {
                peer,
                name: "Minji".into(),
                unread: 2,
                last_ms: None,
                muted: false,
            }],
            ..Snapshot::default()
        };
        assert_eq!(
            update(&mut s, Msg::Loaded(data.clone())),
            vec![Effect::MarkRead(peer)]
        );
        assert!(
            update(&mut s, Msg::Loaded(data)).is_empty(),
            "once, not at every reload"
        );
    }

    fn record(id: u8, direction: Direction, text: &str) -> MessageRecord {
        MessageRecord {
            id: [id; 16],
            direction,
            text: text.into(),
            state: crate::store::MessageState::Received,
            sent_at_ms: u64::from(id),
            stored_at_ms: 0,
            seq: u64::from(id),
            prev: [0; 32],
            timer_secs: 0,
            edited: false,
            deleted: false,
            revised_seq: 0,
            reply_to: None,
            reactions: Default::default(),
            file: None,
        }
    }

    #[test]
    fn file_sends_a_path_and_save_keeps_their_last_file_or_the_picked() {
        let (mut s, peers) = loaded(1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("사진 1.png");
        std::fs::write(&path, b"not really a picture").unwrap();
        typed(&mut s, &format!("/file {}", path.display()));
        let e = update(&mut s, key(KeyCode::Enter));
        assert!(
            matches!(&e[..], [Effect::Run { command: Command::Send(args), title: None }]
                if args.file.as_deref() == Some(path.as_path())
                    && args.contact == peers[0].to_string()
                    && args.text.is_empty()),
            "{e:?}"
        );
        // Missing, or not a file: said, and what was typed stays to correct.
        typed(&mut s, "/file /no/such/file");
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert!(s.notice.as_ref().unwrap().0.contains("does not exist"));
        assert_eq!(s.input.lines().join(""), "/file /no/such/file");
        s.input = crate::tui::state::new_input();
        typed(&mut s, &format!("/file {}", dir.path().display()));
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert!(s.notice.as_ref().unwrap().0.contains("is not a file"));
        s.input = crate::tui::state::new_input();
        // A dropped file as terminals paste it: quoted, or its spaces escaped.
        for pasted in [
            format!("'{}'", path.display()),
            path.display().to_string().replace(' ', "\\ "),
        ] {
            typed(&mut s, &format!("/file {pasted}"));
            let e = update(&mut s, key(KeyCode::Enter));
            assert!(
                matches!(&e[..], [Effect::Run { command: Command::Send(args), .. }]
                    if args.file.as_deref() == Some(path.as_path())),
                "{pasted}: {e:?}"
            );
        }
        // Nothing of theirs to save yet.
        typed(&mut s, "/save");
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert!(s.notice.as_ref().unwrap().0.contains("no file of theirs"));
        s.input = crate::tui::state::new_input();
        let file = |name: &str| kkachi_protocol::file::FileRef {
            key: kkachi_protocol::file::FileKey([1; 32]),
            manifest: kkachi_protocol::file::ChunkId([2; 32]),
            size: 10,
            name: name.into(),
            mime: String::new(),
            thumbnail: Vec::new(),
        };
        let with = |id, name: &str| MessageRecord {
            file: Some(crate::store::FileNote::of(&file(name))),
            ..record(id, Direction::In, "")
        };
        s.data.messages = vec![
            with(1, "a.pdf"),
            with(2, "b.pdf"),
            record(3, Direction::In, "hi"),
        ];
        // Their last file, into the folder named (one that is not, refused).
        let kept = tempfile::tempdir().unwrap();
        let kept = kept.path().to_str().unwrap();
        typed(&mut s, "/save /no/such/folder");
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert!(s.notice.as_ref().unwrap().0.contains("does not exist"));
        s.input = crate::tui::state::new_input();
        typed(&mut s, &format!("/save {kept}"));
        let e = update(&mut s, key(KeyCode::Enter));
        assert_eq!(
            e,
            vec![Effect::Run {
                command: Command::Get {
                    id: crate::files::hex(&file("b.pdf").id()),
                    to: Some(kept.into()),
                },
                title: None,
            }]
        );
        // Their last file, passed on to a contact or group named as `send` names them.
        typed(&mut s, "/forward");
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert!(s.notice.as_ref().unwrap().0.contains("usage: /forward"));
        s.input = crate::tui::state::new_input();
        typed(&mut s, "/forward Town Hall");
        let e = update(&mut s, key(KeyCode::Enter));
        assert!(
            matches!(&e[..], [Effect::Run { command: Command::Send(args), .. }]
                if args.contact == "Town Hall"
                    && args.file.is_none()
                    && args.forward.as_deref() == Some(crate::files::hex(&file("b.pdf").id()).as_str())),
            "{e:?}"
        );
        // A full-width space (as Korean input methods type it) is a space.
        typed(&mut s, "/forward\u{3000}민지");
        let e = update(&mut s, key(KeyCode::Enter));
        assert!(
            matches!(&e[..], [Effect::Run { command: Command::Send(args), .. }] if args.contact == "민지"),
            "{e:?}"
        );
        // The picked one.
        let ctrl = |code| Msg::Key(KeyEvent::new(code, KeyModifiers::CONTROL));
        for _ in 0..3 {
            update(&mut s, ctrl(KeyCode::Up));
        }
        assert_eq!(s.picked, Some([1; 16]));
        typed(&mut s, &format!("/save {kept}"));
        let e = update(&mut s, key(KeyCode::Enter));
        assert!(
            matches!(&e[..], [Effect::Run { command: Command::Get { id, .. }, .. }]
                if *id == crate::files::hex(&file("a.pdf").id())),
            "{e:?}"
        );
        // Opened: a document is saved, then opened.
        typed(&mut s, &format!("/open {kept}"));
        assert_eq!(
            update(&mut s, key(KeyCode::Enter)),
            vec![Effect::Open {
                id: crate::files::hex(&file("b.pdf").id()),
                to: kept.into(),
            }]
        );
        // What could run as a program is never opened, whatever type its sender says.
        s.data.messages.push(with(4, "invoice.pdf.desktop"));
        typed(&mut s, "/open");
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert!(
            s.notice
                .as_ref()
                .unwrap()
                .0
                .contains("not opened from here")
        );
    }

    #[test]
    fn reply_and_react_act_on_their_last_message_or_the_one_picked() {
        let (mut s, peers) = loaded(1);
        s.data.messages = vec![
            record(1, Direction::In, "lunch?"),
            record(2, Direction::Out, "yes"),
            record(3, Direction::In, "where"),
            record(4, Direction::Out, "here"),
        ];
        // No pick: their last message.
        typed(&mut s, "/reply 김밥");
        update(
            &mut s,
            Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::ALT)),
        );
        typed(&mut s, "then coffee");
        let e = update(&mut s, key(KeyCode::Enter));
        assert_eq!(
            e,
            vec![Effect::Send {
                to: peers[0],
                text: "김밥\nthen coffee".into(),
                reply_to: Some(kkachi_protocol::MessageId([3; 16])),
            }]
        );
        // Ctrl+Up from the bottom picks the last message, again the one before.
        let ctrl = |code| Msg::Key(KeyEvent::new(code, KeyModifiers::CONTROL));
        update(&mut s, ctrl(KeyCode::Up));
        update(&mut s, ctrl(KeyCode::Up));
        update(&mut s, ctrl(KeyCode::Up));
        assert_eq!(s.picked, Some([2; 16]));
        update(&mut s, ctrl(KeyCode::Down));
        assert_eq!(s.picked, Some([3; 16]));
        typed(&mut s, "/react 👍");
        let e = update(&mut s, key(KeyCode::Enter));
        assert_eq!(
            e,
            vec![Effect::Run {
                command: Command::React {
                    contact: peers[0].to_string(),
                    message: hex_of(3),
                    emoji: Some("👍".into()),
                    remove: false,
                },
                title: None,
            }]
        );
        assert_eq!(s.picked, None, "used, the pick goes");
        // The same reaction again takes it back.
        s.data.messages[2].reactions.ours = "👍".into();
        typed(&mut s, "/react 👍");
        assert!(matches!(
            &update(&mut s, key(KeyCode::Enter))[0],
            Effect::Run {
                command: Command::React {
                    remove: true,
                    emoji: None,
                    ..
                },
                ..
            }
        ));
        // Editing a picked message of theirs is refused; of ours, it names it.
        update(&mut s, ctrl(KeyCode::Up));
        update(&mut s, ctrl(KeyCode::Up));
        assert_eq!(s.picked, Some([3; 16]));
        typed(&mut s, "/edit no");
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert!(s.notice.as_ref().unwrap().0.contains("only your own"));
        assert_eq!(s.input.lines(), ["/edit no"], "kept, to correct");
        update(&mut s, ctrl(KeyCode::Char('u')));
        update(&mut s, ctrl(KeyCode::Up));
        typed(&mut s, "/delete");
        // For everyone: asked first, and what was typed stays to confirm with Enter.
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert!(
            s.notice
                .as_ref()
                .unwrap()
                .0
                .contains("for everyone? Enter again")
        );
        assert_eq!(s.input.lines(), ["/delete"]);
        assert!(matches!(
            &update(&mut s, key(KeyCode::Enter))[0],
            Effect::Run { command: Command::Delete { message, for_me: false, .. }, .. } if *message == hex_of(2)
        ));
        // Anything else in between drops the question.
        update(&mut s, ctrl(KeyCode::Up));
        typed(&mut s, "/delete");
        update(&mut s, key(KeyCode::Enter));
        update(&mut s, ctrl(KeyCode::Char('u')));
        typed(&mut s, "/bell");
        update(&mut s, key(KeyCode::Enter));
        typed(&mut s, "/delete");
        assert!(
            update(&mut s, key(KeyCode::Enter)).is_empty(),
            "asked again"
        );
        update(&mut s, ctrl(KeyCode::Char('u')));
        update(&mut s, key(KeyCode::Esc));
        // Esc unpicks; past the last going down unpicks too.
        update(&mut s, ctrl(KeyCode::Up));
        update(&mut s, key(KeyCode::Esc));
        assert_eq!(s.picked, None);
        update(&mut s, ctrl(KeyCode::Up));
        update(&mut s, ctrl(KeyCode::Down));
        assert_eq!(s.picked, None);
        // The mouse wheel scrolls.
        update(&mut s, Msg::Scroll(3));
        update(&mut s, Msg::Scroll(3));
        update(&mut s, Msg::Scroll(-2));
        assert_eq!(s.scroll, 4);
        // Our own name.
        typed(&mut s, "/name Jiwoo Kim");
        assert_eq!(
            update(&mut s, key(KeyCode::Enter)),
            vec![Effect::Run {
                command: Command::Name {
                    name: vec!["Jiwoo".into(), "Kim".into()]
                },
                title: None
            }]
        );
    }

    fn hex_of(id: u8) -> String {
        kkachi_protocol::MessageId([id; 16]).to_hex()
    }

    #[test]
    fn a_contact_renamed_is_said_once() {
        let (mut s, peers) = loaded(2);
        let mut data = s.data.clone();
        data.conversations[1].name = "Minji Park".into();
        update(&mut s, Msg::Loaded(data.clone()));
        assert_eq!(s.notice.as_ref().unwrap().0, "c1 is now Minji Park");
        s.notice = None;
        update(&mut s, Msg::Loaded(data));
        assert!(s.notice.is_none(), "said once");
        assert_eq!(s.data.conversations[1].peer, peers[1]);
    }
}

#[cfg(test)]
mod group_tests {
    use super::*;
    use crate::tui::state::GroupSummary;
    use kkachi_protocol::group::GroupId;

    fn key(code: KeyCode) -> Msg {
        Msg::Key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    fn typed(state: &mut State, text: &str) {
        for c in text.chars() {
            update(state, key(KeyCode::Char(c)));
        }
    }

    /// One contact and one group.
    fn loaded() -> (State, PeerId, GroupId) {
        let peer = PeerId::random();
        let id = GroupId([9; 32]);
        let mut s = State::default();
        update(
            &mut s,
            Msg::Loaded(Snapshot {
                me: Some(("me".into(), PeerId::random())),
                conversations: vec![crate::tui::state::ConversationSummary {
                    peer,
                    name: "Minji".into(),
                    unread: 0,
                    last_ms: None,
                    muted: false,
                }],
                groups: vec![GroupSummary {
                    id,
                    name: "Family".into(),
                    members: 3,
                    role: "member",
                    announcement: false,
                    unread: 1,
                    timer_secs: 0,
                    last_ms: None,
                }],
                ..Snapshot::default()
            }),
        );
        (s, peer, id)
    }

    #[test]
    fn tab_reaches_groups_and_what_is_typed_goes_to_the_open_group() {
        let (mut s, peer, id) = loaded();
        assert_eq!(s.selected, Some(peer));
        assert_eq!(s.group, None);
        update(&mut s, key(KeyCode::Tab));
        assert_eq!(s.group, Some(id), "after the contacts come the groups");
        typed(&mut s, "hello all");
        let effects = update(&mut s, key(KeyCode::Enter));
        assert_eq!(
            effects,
            vec![Effect::SendGroup {
                group: id,
                text: "hello all".into()
            }]
        );
        // Back round to the contact: texts go to them again.
        update(&mut s, key(KeyCode::Tab));
        assert_eq!(s.group, None);
        typed(&mut s, "hi");
        assert!(matches!(
            update(&mut s, key(KeyCode::Enter)).as_slice(),
            [Effect::Send { to, .. }] if *to == peer
        ));
    }

    #[test]
    fn group_commands_run_and_contact_commands_are_refused_in_a_group() {
        let (mut s, _, id) = loaded();
        update(&mut s, key(KeyCode::Tab));
        typed(&mut s, "/members");
        let effects = update(&mut s, key(KeyCode::Enter));
        assert!(matches!(
            effects.as_slice(),
            [Effect::Run { command: Command::Group(GroupCommand::Members { group }), .. }]
                if *group == id.to_hex()
        ));
        typed(&mut s, "/react 👍");
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert!(s.notice.as_ref().unwrap().0.contains("1:1 chats"));
        // A file goes to the open group; /save finds no member's file yet.
        let dir = tempfile::tempdir().unwrap();
        let photo = dir.path().join("shelter.jpg");
        std::fs::write(&photo, b"jpeg").unwrap();
        typed(&mut s, &format!("/file {}", photo.display()));
        assert!(matches!(
            update(&mut s, key(KeyCode::Enter)).as_slice(),
            [Effect::Run { command: Command::Send(args), .. }]
                if args.contact == id.to_hex() && args.file.as_deref() == Some(photo.as_path())
        ));
        typed(&mut s, "/save");
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert!(
            s.notice
                .as_ref()
                .unwrap()
                .0
                .contains("no file from a member")
        );
        // `/remove WHO` deletes a contact: in a group it is stopped and explained.
        typed(&mut s, "/remove Minji");
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert!(s.notice.as_ref().unwrap().0.contains("/group remove WHO"));
        // In the open group, its commands act on it.
        typed(&mut s, "/group add Minji \"Hyun Park\"");
        let effects = update(&mut s, key(KeyCode::Enter));
        assert!(
            matches!(
                effects.as_slice(),
                [Effect::Run { command: Command::Group(GroupCommand::Add { group, contacts }), .. }]
                    if *group == id.to_hex() && contacts == &["Minji".to_string(), "Hyun Park".to_string()]
            ),
            "{effects:?}"
        );
        // Leaving is asked twice.
        typed(&mut s, "/leave");
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert!(s.notice.as_ref().unwrap().0.contains("/leave again"));
        typed(&mut s, "/leave");
        assert!(matches!(
            update(&mut s, key(KeyCode::Enter)).as_slice(),
            [Effect::Run {
                command: Command::Group(GroupCommand::Leave { .. }),
                ..
            }]
        ));
        assert_eq!(s.group, Some(id), "the group stays open, to read");
        typed(&mut s, "/group frobnicate");
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert!(
            s.notice
                .as_ref()
                .unwrap()
                .0
                .starts_with("in a group: /group add")
        );
    }

    #[test]
    fn alt_u_reaches_an_unread_group_and_a_group_left_takes_no_text() {
        let (mut s, _, id) = loaded();
        let effects = update(
            &mut s,
            Msg::Key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::ALT)),
        );
        assert_eq!(s.group, Some(id));
        assert_eq!(effects, vec![Effect::Reload, Effect::MarkGroupRead(id)]);
        s.data.groups[0].role = "not a member";
        typed(&mut s, "still here?");
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert_eq!(
            s.input.lines().join(""),
            "still here?",
            "what was typed stays"
        );
    }

    #[test]
    fn quoted_words_stay_together() {
        assert_eq!(
            split_quoted(r#"group members "weekend trip"  x"#),
            vec!["group", "members", "weekend trip", "x"]
        );
        assert_eq!(split_quoted(r#"a "" b"#), vec!["a", "", "b"]);
    }

    #[test]
    fn a_message_in_the_open_group_scrolls_to_it_and_another_group_is_noted() {
        let (mut s, _, id) = loaded();
        update(&mut s, key(KeyCode::Tab));
        s.scroll = 5;
        let effects = update(
            &mut s,
            Msg::GroupArrived {
                id,
                group: "Family".into(),
                from: "Minji".into(),
                event: None,
            },
        );
        assert_eq!(effects, vec![Effect::Reload, Effect::MarkGroupRead(id)]);
        assert_eq!(s.scroll, 0);
        let other = GroupId([1; 32]);
        update(
            &mut s,
            Msg::GroupArrived {
                id: other,
                group: "Work\u{1b}[2J".into(),
                from: "Hyun".into(),
                event: None,
            },
        );
        let (notice, _) = s.notice.clone().unwrap();
        assert!(notice.contains("Hyun wrote in Work"), "{notice}");
        assert!(!notice.contains('\u{1b}'), "peer text is made safe");
    }
}
