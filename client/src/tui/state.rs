//! The model of the terminal UI: everything `view` draws, nothing else.

use std::time::Instant;

use kkachi_protocol::PeerId;
use ratatui_textarea::TextArea;

use crate::store::MessageRecord;

/// One conversation in the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationSummary {
    /// The contact.
    pub peer: PeerId,
    /// Their name.
    pub name: String,
    /// Incoming messages not yet seen in the UI.
    pub unread: usize,
    /// When the last message was sent, Unix ms.
    pub last_ms: Option<u64>,
    /// Its messages neither ring nor notify.
    pub muted: bool,
}

/// One group in the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    /// The group.
    pub id: kkachi_protocol::group::GroupId,
    /// Its name.
    pub name: String,
    /// How many members it has.
    pub members: usize,
    /// Our role: "admin", "member", or "not a member" (left, removed).
    pub role: &'static str,
    /// Only admins post.
    pub announcement: bool,
    /// Members' messages not read here yet.
    pub unread: usize,
    /// Its disappearing-message timer, seconds (0: off).
    pub timer_secs: u32,
    /// When its last message was sent, Unix ms.
    pub last_ms: Option<u64>,
}

/// A line of the open group, ready to draw (peer text already made safe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLine {
    /// Who wrote it ("me" for ours); empty for a line about the group.
    pub who: String,
    /// What they wrote, or what changed.
    pub text: String,
    /// When, Unix ms.
    pub sent_at_ms: u64,
    /// A line about a change to the group.
    pub event: bool,
    /// Ours: members whose device has it, who read it, of how many.
    pub delivered: usize,
    /// Ours: members who read it.
    pub read: usize,
    /// Ours: members it went to.
    pub copies: usize,
    /// Ours, sent after we were removed (before we knew).
    pub unseen: bool,
    /// The file it carries.
    pub file: Option<GroupFile>,
    /// Ours (whatever names we or a member go by).
    pub ours: bool,
}

/// A file sent to a group, as the UI shows it and acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupFile {
    /// Its id, in hex (what `get` takes).
    pub id: String,
    /// Its name as sent (for deciding whether it may be opened; never drawn raw).
    pub name: String,
    /// How it is shown.
    pub view: FileView,
}

/// The least time between two notifications of one conversation.
pub const NOTIFY_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Connectivity shown in the status bar.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Own inbox relays with an open connection.
    pub relays_up: usize,
    /// Own inbox relays configured.
    pub relays: usize,
    /// Outbox entries no relay or contact has acknowledged yet.
    pub outbox: usize,
    /// Contacts reachable directly on the local network.
    pub lan_peers: usize,
    /// Contacts with an open connection to us (on the LAN or beyond): messages to them
    /// are handed over directly, relays or not.
    pub direct: usize,
    /// People who are not contacts with messages held (`/requests`).
    pub requests: usize,
    /// Files being sent whose message has not gone yet (waiting for their relays).
    pub files_waiting: usize,
}

impl Status {
    /// Nothing is reachable: no relay, no LAN peer, no contact connected.
    pub fn offline(&self) -> bool {
        self.relays_up == 0 && self.lan_peers == 0 && self.direct == 0
    }

    /// No relay answers, yet some contacts are connected directly.
    pub fn direct_only(&self) -> bool {
        self.relays_up == 0 && !self.offline()
    }
}

/// What the loader read from the store for the current selection.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Our name and id, once `init` has run.
    pub me: Option<(String, PeerId)>,
    /// Conversations, most recent first.
    pub conversations: Vec<ConversationSummary>,
    /// Messages of the selected conversation, oldest first.
    pub messages: Vec<MessageRecord>,
    /// What the user should know about the selected conversation: breaks in the
    /// contact's hash chain, refused messages (already safe to draw).
    pub notices: Vec<String>,
    /// The contact's missing messages (ranges of their numbers), drawn where they
    /// belong among the messages.
    pub gaps: Vec<(u64, u64)>,
    /// Connectivity.
    pub status: Status,
    /// The files of the messages shown, by message id.
    pub files: std::collections::HashMap<[u8; 16], FileView>,
    /// Groups, most recent first.
    pub groups: Vec<GroupSummary>,
    /// The open group's lines, oldest first.
    pub group_lines: Vec<GroupLine>,
}

/// A file message as the UI shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileView {
    /// What it is: `📎 name (size) type`, safe to draw.
    pub label: String,
    /// Where it stands (`not fetched: /save fetches it`, `sent`...), safe to draw.
    pub status: String,
    /// Chunks done of all, while it moves.
    pub progress: Option<(usize, usize)>,
    /// Its preview, for a picture.
    pub picture: Option<std::sync::Arc<image::RgbImage>>,
    /// The preview for the terminal's graphics, drawn over its half blocks where the
    /// terminal has them.
    pub graphic: Option<super::graphics::Graphic>,
}

/// A panel drawn over the chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overlay {
    /// Keys and commands.
    Help,
    /// First start: asks for a name.
    Welcome,
    /// Our invite code, whole at any width, and its QR code where it fits.
    Invite {
        /// The code.
        code: String,
        /// Its QR code, drawn with half blocks (empty if it could not be made).
        qr: String,
        /// Until when it works (a date for people).
        until: String,
        /// The file it was also written to (safe to draw), if it could be.
        saved: Option<String>,
    },
    /// Text from a command (relay list, drill, errors).
    Text {
        /// Panel title.
        title: String,
        /// Its lines.
        body: String,
    },
}

/// The whole UI state.
pub struct State {
    /// Data from the store.
    pub data: Snapshot,
    /// The selected conversation.
    pub selected: Option<PeerId>,
    /// The open group, if one is open (it is shown instead of `selected`).
    pub group: Option<kkachi_protocol::group::GroupId>,
    /// The input box.
    pub input: TextArea<'static>,
    /// An open panel, if any.
    pub overlay: Option<Overlay>,
    /// A one-line notice in the status bar, and when it was set.
    pub notice: Option<(String, Instant)>,
    /// Lines scrolled up from the bottom of the chat.
    pub scroll: usize,
    /// The message picked with Ctrl+Up / Ctrl+Down, that /reply, /react, /edit and
    /// /delete act on (without one: the last message, theirs or ours as fits).
    pub picked: Option<[u8; 16]>,
    /// A delete for everyone asked for once (its contact and message), to be confirmed
    /// by asking again at once.
    pub confirm_delete: Option<(PeerId, String)>,
    /// A group whose /leave was asked once, to be confirmed by asking again.
    pub confirm_leave: Option<kkachi_protocol::group::GroupId>,
    /// Ring the terminal bell for messages in other conversations.
    pub bell: bool,
    /// Notify (terminal notification, desktop notification where there is one) for
    /// messages in other conversations.
    pub notify: bool,
    /// When each conversation last notified: at most one notification per
    /// [`NOTIFY_EVERY`], however fast its messages come.
    pub notified: std::collections::HashMap<kkachi_protocol::PeerId, Instant>,
    /// Demo controls are available (F2–F4 toggle relays).
    pub demo: bool,
    /// Mouse events are taken (the wheel scrolls); off, the terminal selects text.
    pub mouse: bool,
    /// Set when the user asked to quit.
    pub quit: bool,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("selected", &self.selected)
            .field("overlay", &self.overlay)
            .field("scroll", &self.scroll)
            .finish_non_exhaustive()
    }
}

impl Default for State {
    fn default() -> Self {
        Self {
            data: Snapshot::default(),
            selected: None,
            group: None,
            input: new_input(),
            overlay: None,
            notice: None,
            scroll: 0,
            picked: None,
            confirm_delete: None,
            confirm_leave: None,
            bell: true,
            notify: true,
            notified: std::collections::HashMap::new(),
            demo: false,
            mouse: true,
            quit: false,
        }
    }
}

/// A fresh input box.
pub fn new_input() -> TextArea<'static> {
    let mut input = TextArea::default();
    input.set_cursor_line_style(ratatui::style::Style::default());
    // Long lines wrap (between words where they can), so a long message can be read
    // back before it goes.
    input.set_wrap_mode(ratatui_textarea::WrapMode::WordOrGlyph);
    input.set_placeholder_text("Type a message, or /help");
    input
}

impl State {
    /// The open group's summary.
    pub fn current_group(&self) -> Option<&GroupSummary> {
        let id = self.group?;
        self.data.groups.iter().find(|g| g.id == id)
    }

    /// The selected conversation's summary (none while a group is open).
    pub fn current(&self) -> Option<&ConversationSummary> {
        if self.group.is_some() {
            return None;
        }
        let peer = self.selected?;
        self.data.conversations.iter().find(|c| c.peer == peer)
    }

    /// Takes in new data; keeps the selection valid (the most recent conversation when
    /// there was none).
    pub fn load(&mut self, data: Snapshot) {
        self.data = data;
        if self.group.is_some() && self.current_group().is_none() {
            self.group = None; // forgotten meanwhile
        }
        let valid = self
            .selected
            .is_some_and(|p| self.data.conversations.iter().any(|c| c.peer == p));
        if !valid {
            self.selected = self.data.conversations.first().map(|c| c.peer);
            self.scroll = 0;
            self.picked = None;
        }
        // A picked message gone (deleted here, expired) is picked no more.
        if let Some(id) = self.picked
            && !self.data.messages.iter().any(|m| m.id == id)
        {
            self.picked = None;
        }
        if self.data.me.is_none() && self.overlay.is_none() {
            self.overlay = Some(Overlay::Welcome);
        }
        if self.data.me.is_some() && self.overlay == Some(Overlay::Welcome) {
            self.overlay = None;
        }
    }
}
