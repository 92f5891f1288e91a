//! `view(state, frame)`: draws the state; decides nothing.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{Block, Clear, List, ListItem, ListState, Paragraph, Wrap};
use unicode_width::UnicodeWidthChar;

use super::state::{FileView, GroupSummary, Overlay, State};
use super::update::HELP;
use crate::sanitize::{for_terminal, for_terminal_block};
use crate::store::{Direction, MessageRecord, MessageState};
use crate::time::{format_day, format_ms_short};

/// Draws the whole screen.
pub fn view(state: &State, frame: &mut Frame) {
    let [main, status] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(1)]).areas(frame.area());
    let list_width = if main.width > 60 { 26 } else { main.width / 3 };
    let [list, right] =
        Layout::horizontal([Constraint::Length(list_width), Constraint::Min(10)]).areas(main);
    // The compose box grows with what is typed, lines wrapped as it draws them.
    let inner = usize::from(right.width.saturating_sub(2)).max(1);
    let rows: usize = state
        .input
        .lines()
        .iter()
        .map(|l| wrap(l, inner).len())
        .sum();
    let input_height = (rows.min(8) as u16 + 2).clamp(3, 8);
    let [chat, input] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(input_height)]).areas(right);
    draw_list(state, frame, list);
    draw_chat(state, frame, chat);
    draw_input(state, frame, input);
    draw_status(state, frame, status);
    if let Some(overlay) = &state.overlay {
        draw_overlay(overlay, state.demo, frame, main);
    }
}

fn draw_list(state: &State, frame: &mut Frame, area: Rect) {
    let items: Vec<ListItem> = state
        .data
        .conversations
        .iter()
        .map(|c| {
            let when = c.last_ms.map(format_ms_short).unwrap_or_default();
            let mut spans = vec![Span::raw(for_terminal(&c.name).into_owned())];
            if c.unread > 0 {
                spans.push(Span::raw(" "));
                spans.push(Span::styled(
                    format!("({})", c.unread),
                    Style::new().fg(Color::Yellow).bold(),
                ));
            }
            if c.muted {
                spans.push(Span::styled(" muted", Style::new().fg(Color::DarkGray)));
            }
            let used: usize = spans.iter().map(|s| s.width()).sum();
            let inner = usize::from(area.width.saturating_sub(4));
            let pad = inner.saturating_sub(used + when.len());
            spans.push(Span::raw(" ".repeat(pad)));
            spans.push(Span::styled(when, Style::new().fg(Color::DarkGray)));
            ListItem::new(Line::from(spans))
        })
        .collect();
    let mut items = items;
    if !state.data.groups.is_empty() {
        items.push(ListItem::new(Line::from(Span::styled(
            "─ Groups ─",
            Style::new().fg(Color::DarkGray),
        ))));
        for g in &state.data.groups {
            let when = g.last_ms.map(format_ms_short).unwrap_or_default();
            let inner = usize::from(area.width.saturating_sub(4));
            let mut tail = Vec::new();
            if g.unread > 0 {
                tail.push(Span::styled(
                    format!(" ({})", g.unread),
                    Style::new().fg(Color::Yellow).bold(),
                ));
            }
            if g.role == "not a member" {
                tail.push(Span::styled(" (left)", Style::new().fg(Color::DarkGray)));
            }
            // The name gives way to what follows it, so the time always shows.
            let tail_width: usize = tail.iter().map(|s| s.width()).sum();
            let room = inner.saturating_sub(tail_width + when.len() + 1).max(3);
            let name = format!("# {}", for_terminal(&g.name));
            let name = if name.chars().count() > room {
                let cut: String = name.chars().take(room.saturating_sub(1)).collect();
                format!("{cut}…")
            } else {
                name
            };
            let mut spans = vec![Span::raw(name)];
            spans.extend(tail);
            let used: usize = spans.iter().map(|s| s.width()).sum();
            let pad = inner.saturating_sub(used + when.len());
            spans.push(Span::raw(" ".repeat(pad)));
            spans.push(Span::styled(when, Style::new().fg(Color::DarkGray)));
            items.push(ListItem::new(Line::from(spans)));
        }
    }
    let contacts = state.data.conversations.len();
    let selected = match state.group {
        Some(id) => state
            .data
            .groups
            .iter()
            .position(|g| g.id == id)
            .map(|i| contacts + 1 + i),
        None => state
            .selected
            .and_then(|p| state.data.conversations.iter().position(|c| c.peer == p)),
    };
    let list = List::new(items)
        .block(Block::bordered().title(" Conversations "))
        .highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol("›");
    let mut list_state = ListState::default().with_selected(selected);
    frame.render_stateful_widget(list, area, &mut list_state);
}

/// The delivery glyph of an outgoing message.
pub fn glyph(state: &MessageState) -> Span<'static> {
    match state {
        MessageState::Queued => Span::styled(" ◷ queued", Style::new().fg(Color::Yellow)),
        MessageState::Relayed { relayed, total } => Span::styled(
            format!(" ✓ {relayed}/{total}"),
            Style::new().fg(Color::DarkGray),
        ),
        MessageState::Delivered => Span::styled(" ✓✓", Style::new().fg(Color::Green)),
        MessageState::Read => Span::styled(" ✓✓ read", Style::new().fg(Color::Cyan)),
        MessageState::SentElsewhere => {
            Span::styled(" ✓ from another device", Style::new().fg(Color::DarkGray))
        }
        MessageState::Received => Span::raw(""),
    }
}

/// How a message is drawn beside its text.
#[derive(Debug, Default)]
struct Decor {
    /// The line quoting what it answers, for a reply (already safe to draw).
    quote: Option<String>,
    /// Picked (Ctrl+Up): drawn marked.
    picked: bool,
    /// The file it carries, as shown.
    file: Option<crate::tui::state::FileView>,
}

/// The widest and tallest a picture's preview is drawn, in cells.
pub(crate) const PICTURE_COLS: u16 = 32;
/// See [`PICTURE_COLS`].
pub(crate) const PICTURE_ROWS: u16 = 8;

/// A progress bar `width` cells wide: `█████░░░░░ 48%`.
fn progress_bar(done: usize, total: usize, width: usize) -> String {
    let width = width.clamp(4, 30);
    let filled = (done * width).checked_div(total).unwrap_or(0).min(width);
    let pct = (done * 100).checked_div(total).unwrap_or(0);
    format!(
        "{}{} {pct}%",
        "█".repeat(filled),
        "░".repeat(width - filled)
    )
}

/// The quote line of a reply: who wrote what it answers, and the start of it, from our
/// own copy (a reply carries no text of what it answers).
fn quote_line(
    m: &MessageRecord,
    all: &[MessageRecord],
    them: &str,
    width: usize,
) -> Option<String> {
    let quote = m.reply_to?;
    let direction = if quote.ours {
        Direction::Out
    } else {
        Direction::In
    };
    let who = if quote.ours { "me" } else { them };
    let text = match all
        .iter()
        .find(|q| q.id == quote.id && q.direction == direction)
    {
        Some(q) if q.deleted => "(deleted)".to_string(),
        Some(q) => for_terminal(q.text.lines().next().unwrap_or_default()).into_owned(),
        None => "(a message not shown here)".to_string(),
    };
    let line = format!("↪ {who}: {text}");
    // One line after the header: cut with an ellipsis where it would wrap.
    let room = width.saturating_sub(20).max(8);
    let mut out = String::new();
    let mut used = 0;
    for c in line.chars() {
        let w = c.width().unwrap_or(0);
        if used + w > room {
            out.push('…');
            break;
        }
        out.push(c);
        used += w;
    }
    Some(out)
}

fn message_lines(m: &MessageRecord, them: &str, width: usize, decor: &Decor) -> Vec<Line<'static>> {
    let who = author(m, them);
    let mut who_style = match m.direction {
        Direction::Out => Style::new().fg(Color::Blue).bold(),
        Direction::In => Style::new().fg(Color::Magenta).bold(),
    };
    if decor.picked {
        who_style = who_style.add_modifier(Modifier::REVERSED);
    }
    let indent = header_indent(m, them, width);
    let mut lines = Vec::new();
    let header = |who_style| {
        vec![
            Span::styled(
                format_ms_short(m.sent_at_ms),
                Style::new().fg(Color::DarkGray),
            ),
            Span::raw(" "),
            Span::styled(who.clone(), who_style),
            Span::raw(": "),
        ]
    };
    let mut first = true;
    // A reply says what it answers on its own first line, the text under it.
    if let Some(quote) = &decor.quote {
        let mut spans = header(who_style);
        spans.push(Span::styled(
            quote.clone(),
            Style::new().fg(Color::DarkGray).italic(),
        ));
        lines.push(Line::from(spans));
        first = false;
    }
    // What a peer wrote never reaches the terminal raw: escapes become visible.
    let text = if m.deleted {
        "(deleted)".to_string()
    } else if let Some(file) = &decor.file {
        file.label.clone()
    } else if m.edited {
        format!("{} (edited)", for_terminal_block(&m.text))
    } else {
        for_terminal_block(&m.text).into_owned()
    };
    for paragraph in text.split('\n') {
        for chunk in wrap(paragraph, width.saturating_sub(indent).max(8)) {
            let mut spans = Vec::new();
            if first {
                spans = header(who_style);
                first = false;
            } else {
                spans.push(Span::raw(" ".repeat(indent)));
            }
            spans.push(Span::raw(chunk));
            lines.push(Line::from(spans));
        }
    }
    if m.direction == Direction::Out
        && let Some(last) = lines.last_mut()
    {
        last.spans.push(glyph(&m.state));
    }
    if let Some(reactions) = crate::commands::reactions_text(m, them)
        && let Some(last) = lines.last_mut()
    {
        last.spans.push(Span::styled(
            format!("  {reactions}"),
            Style::new().fg(Color::Yellow),
        ));
    }
    if let (Some(file), false) = (&decor.file, m.deleted) {
        lines.extend(file_lines(file, indent, width));
    }
    lines
}

/// Under a file message, `indent` columns in: where the file stands, how far it is,
/// and a picture's preview in half blocks (the place its graphic takes, see
/// [`graphic_at`]).
fn file_lines(file: &FileView, indent: usize, width: usize) -> Vec<Line<'static>> {
    let pad = Span::raw(" ".repeat(indent));
    let mut status = vec![pad.clone()];
    if let Some((done, total)) = file.progress {
        status.push(Span::styled(
            progress_bar(done, total, width.saturating_sub(indent) / 3),
            Style::new().fg(Color::Cyan),
        ));
        status.push(Span::raw(" "));
    }
    status.push(Span::styled(
        file.status.clone(),
        Style::new().fg(Color::DarkGray),
    ));
    let mut lines = vec![Line::from(status)];
    if let Some(picture) = &file.picture {
        let cols = PICTURE_COLS.min(width.saturating_sub(indent) as u16);
        for mut row in crate::files::picture::half_blocks(picture, cols, PICTURE_ROWS) {
            row.spans.insert(0, pad.clone());
            lines.push(row);
        }
    }
    lines
}

/// Splits `text` into lines at most `width` columns wide (wide characters count two),
/// between words where it can; a word wider than a line is split where it must be.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut out = Vec::new();
    let mut line = String::new();
    let mut used = 0;
    for word in text.split_inclusive(' ') {
        let w: usize = word.chars().map(|c| c.width().unwrap_or(0)).sum();
        // The trailing space may hang past the edge.
        let fits = word
            .trim_end_matches(' ')
            .chars()
            .map(|c| c.width().unwrap_or(0))
            .sum::<usize>();
        if used + fits > width && !line.is_empty() {
            out.push(std::mem::take(&mut line).trim_end().to_string());
            used = 0;
        }
        if w > width {
            // Too long for any line: cut it.
            for c in word.chars() {
                let cw = c.width().unwrap_or(0);
                if used + cw > width && !line.is_empty() {
                    out.push(std::mem::take(&mut line));
                    used = 0;
                }
                line.push(c);
                used += cw;
            }
        } else {
            line.push_str(word);
            used += w;
        }
    }
    out.push(line.trim_end_matches(' ').to_string());
    out
}

/// A line naming the day the messages under it are from.
fn day_line(day: &str, width: usize) -> Line<'static> {
    let label = format!(" {day} ");
    let side = width.saturating_sub(label.chars().count()) / 2;
    Line::from(Span::styled(
        format!("{}{label}{}", "─".repeat(side), "─".repeat(side)),
        Style::new().fg(Color::DarkGray),
    ))
}

/// The open group: who wrote what, lines about changes, and for ours how many members
/// have it.
fn draw_group(state: &State, group: &GroupSummary, frame: &mut Frame, area: Rect) {
    let width = usize::from(area.width.saturating_sub(2));
    let mut lines: Vec<Line> = Vec::new();
    let mut graphics = Vec::new();
    let mut last_day = String::new();
    for l in &state.data.group_lines {
        let day = format_day(l.sent_at_ms);
        if day != last_day {
            lines.push(day_line(&day, width));
            last_day = day;
        }
        let time = format_ms_short(l.sent_at_ms);
        if l.event {
            for chunk in wrap(&format!("{time} — {}", l.text), width.max(8)) {
                lines.push(Line::from(Span::styled(
                    chunk,
                    Style::new().fg(Color::DarkGray),
                )));
            }
            continue;
        }
        // Ours: how many members have it on their device, and read it (not relays).
        let mark = if l.who != "me" {
            String::new()
        } else if l.unseen {
            " ⚠ sent after you were removed".into()
        } else if l.copies == 0 {
            String::new()
        } else if l.read == l.copies {
            format!(" ✓✓ read by all {}", l.copies)
        } else if l.read > 0 {
            format!(" ✓ {}/{} have it, {} read", l.delivered, l.copies, l.read)
        } else {
            format!(" ✓ {}/{} have it", l.delivered, l.copies)
        };
        let who_style = if l.who == "me" {
            Style::new().fg(Color::Cyan).bold()
        } else {
            Style::new().fg(Color::Green).bold()
        };
        let said = match &l.file {
            Some(file) => &file.view.label,
            None => &l.text,
        };
        let text = format!("{time} {}: {said}{mark}", l.who);
        for (i, chunk) in wrap(&text, width.max(8)).into_iter().enumerate() {
            if i == 0 && chunk.starts_with(&format!("{time} {}:", l.who)) {
                let head = format!("{time} ");
                let rest = chunk[head.len() + l.who.len()..].to_string();
                lines.push(Line::from(vec![
                    Span::styled(head, Style::new().fg(Color::DarkGray)),
                    Span::styled(l.who.clone(), who_style),
                    Span::raw(rest),
                ]));
            } else {
                lines.push(Line::from(chunk));
            }
        }
        // A file: where it stands, and a picture's preview (in the terminal's graphics
        // where it has them).
        if let Some(file) = &l.file {
            let indent = format!("{time} {}: ", l.who).chars().count().min(width / 2);
            let drawn = file_lines(&file.view, indent, width);
            if let Some((graphic, indent)) = graphic_at(&file.view, indent, width, &drawn) {
                let at = lines.len() + drawn.len() - usize::from(graphic.size().height);
                graphics.push((at, indent, graphic));
            }
            lines.extend(drawn);
        }
    }
    if lines.is_empty() {
        lines.push(Line::from(Span::styled(
            "No messages yet. /members shows who is in it; /group add … adds more.",
            Style::new().fg(Color::DarkGray),
        )));
    }
    let height = usize::from(area.height.saturating_sub(2));
    let bottom = lines.len().saturating_sub(
        state
            .scroll
            .min(lines.len().saturating_sub(height.min(lines.len()))),
    );
    let top = bottom.saturating_sub(height);
    let visible: Vec<Line> = lines[top..bottom].to_vec();
    let mut title = format!(
        " # {} · {} member{} · {}{}{} ",
        for_terminal(&group.name),
        group.members,
        if group.members == 1 { "" } else { "s" },
        group.role,
        if group.announcement {
            " · announcements"
        } else {
            ""
        },
        if group.timer_secs > 0 {
            format!(
                " · ⏱ {}",
                crate::commands::describe_duration(group.timer_secs)
            )
        } else {
            String::new()
        }
    );
    if state.scroll > 0 {
        title.push_str("(scrolled, PgDn) ");
    }
    frame.render_widget(
        Paragraph::new(visible).block(Block::bordered().title(title)),
        area,
    );
    draw_graphics(frame, area, top..bottom, graphics);
}

fn draw_chat(state: &State, frame: &mut Frame, area: Rect) {
    if let Some(group) = state.current_group() {
        draw_group(state, group, frame, area);
        return;
    }
    let Some(current) = state.current() else {
        let hint = Paragraph::new(Text::from(vec![
            Line::from("No conversations yet."),
            Line::from(""),
            Line::from("Ask someone for their invite code and type /add CODE,"),
            Line::from("and give them yours with /invite."),
        ]))
        .block(Block::bordered().title(" kkachi "))
        .wrap(Wrap { trim: false });
        frame.render_widget(hint, area);
        return;
    };
    let width = usize::from(area.width.saturating_sub(2));
    let mut lines: Vec<Line> = Vec::new();
    let them = for_terminal(&current.name);
    let mut last_day = String::new();
    let gap_style = Style::new().fg(Color::Yellow);
    let mut picked_at = None;
    // Pictures for the terminal's graphics: the line where each one's half blocks
    // start, and how far in.
    let mut graphics = Vec::new();
    let mut gaps = state.data.gaps.iter().peekable();
    for m in &state.data.messages {
        // A gap is drawn where its messages belong: before the first of theirs after it.
        if m.direction == Direction::In && m.seq > 0 {
            while let Some(&&gap) = gaps.peek() {
                if gap.1 >= m.seq {
                    break;
                }
                for chunk in wrap(
                    &format!("⚠ {}", crate::commands::gap_line(&current.name, gap)),
                    width.max(8),
                ) {
                    lines.push(Line::from(Span::styled(chunk, gap_style)));
                }
                gaps.next();
            }
        }
        let day = format_day(m.sent_at_ms);
        if day != last_day {
            lines.push(day_line(&day, width));
            last_day = day;
        }
        let decor = Decor {
            quote: quote_line(m, &state.data.messages, &them, width),
            picked: state.picked == Some(m.id),
            file: state.data.files.get(&m.id).cloned(),
        };
        if decor.picked {
            picked_at = Some(lines.len());
        }
        let drawn = message_lines(m, &them, width, &decor);
        let file = decor.file.as_ref().filter(|_| !m.deleted);
        let indent = header_indent(m, &them, width);
        if let Some((graphic, indent)) = file.and_then(|f| graphic_at(f, indent, width, &drawn)) {
            graphics.push((
                lines.len() + drawn.len() - usize::from(graphic.size().height),
                indent,
                graphic,
            ));
        }
        lines.extend(drawn);
    }
    // Gaps after every message shown (their later messages are not loaded).
    for &gap in gaps {
        for chunk in wrap(
            &format!("⚠ {}", crate::commands::gap_line(&current.name, gap)),
            width.max(8),
        ) {
            lines.push(Line::from(Span::styled(chunk, gap_style)));
        }
    }
    for notice in &state.data.notices {
        for chunk in wrap(&format!("⚠ {notice}"), width.max(8)) {
            lines.push(Line::from(Span::styled(
                chunk,
                Style::new().fg(Color::Yellow),
            )));
        }
    }
    let height = usize::from(area.height.saturating_sub(2));
    let bottom = lines.len().saturating_sub(
        state
            .scroll
            .min(lines.len().saturating_sub(height.min(lines.len()))),
    );
    let mut top = bottom.saturating_sub(height);
    let mut bottom = bottom;
    // A picked message is always on screen: what /delete or /edit acts on is seen.
    if let Some(at) = picked_at {
        if at < top {
            top = at;
            bottom = (top + height).min(lines.len());
        } else if at >= bottom {
            bottom = (at + 1).min(lines.len());
            top = bottom.saturating_sub(height);
        }
    }
    let visible: Vec<Line> = lines[top..bottom].to_vec();
    let mut title = format!(" {them} ");
    if state.scroll > 0 {
        title.push_str("(scrolled, PgDn) ");
    }
    frame.render_widget(
        Paragraph::new(visible).block(Block::bordered().title(title)),
        area,
    );
    draw_graphics(frame, area, top..bottom, graphics);
}

/// A picture to draw in the terminal's graphics: the line where its half blocks start,
/// how far in, and the graphic.
type Placed = (usize, u16, super::graphics::Graphic);

/// Draws over their half blocks the pictures this terminal can draw with its graphics,
/// in a bordered `area` showing lines `shown`; one scrolled partly out shows the rows
/// still in.
fn draw_graphics(
    frame: &mut Frame,
    area: Rect,
    shown: std::ops::Range<usize>,
    graphics: Vec<Placed>,
) {
    let mut inner = Block::bordered().inner(area);
    inner.height = inner.height.min(shown.len() as u16);
    for (at, indent, graphic) in graphics {
        if at + usize::from(graphic.size().height) > shown.start && at < shown.end {
            graphic.draw(
                frame.buffer_mut(),
                inner,
                indent,
                at as i32 - shown.start as i32,
            );
        }
    }
}

/// Where a file's picture goes in the terminal's graphics: the graphic and its indent,
/// if it has one and it takes the very place of the half blocks the message's lines
/// `drawn` end with (not so in a window too narrow for the whole picture, where the
/// half blocks stay).
fn graphic_at(
    file: &FileView,
    indent: usize,
    width: usize,
    drawn: &[Line],
) -> Option<(super::graphics::Graphic, u16)> {
    let (picture, graphic) = (file.picture.as_ref()?, file.graphic.as_ref()?);
    let cols = PICTURE_COLS.min(width.saturating_sub(indent) as u16);
    let blocks = crate::files::picture::fit(picture, cols, PICTURE_ROWS)?;
    let (w, h) = blocks.dimensions();
    let size = graphic.size();
    (u32::from(size.width) == w
        && u32::from(size.height) == h.div_ceil(2)
        && drawn.len() >= usize::from(size.height))
    .then(|| (graphic.clone(), indent as u16))
}

/// Who wrote a message, as its header names them.
fn author(m: &MessageRecord, them: &str) -> String {
    match m.direction {
        Direction::Out => "me".to_string(),
        Direction::In => them.to_string(),
    }
}

/// How far a message's lines after its first are indented: the width of its header.
fn header_indent(m: &MessageRecord, them: &str, width: usize) -> usize {
    let prefix = format!("{} {}: ", format_ms_short(m.sent_at_ms), author(m, them));
    prefix.chars().count().min(width / 2)
}

fn draw_input(state: &State, frame: &mut Frame, area: Rect) {
    let mut input = state.input.clone();
    // What /reply, /react, /edit and /delete will act on, while one is picked.
    let picked = state
        .picked
        .and_then(|id| state.data.messages.iter().find(|m| m.id == id));
    let title = match picked {
        Some(m) => {
            let who = match m.direction {
                Direction::Out => "me".to_string(),
                Direction::In => state
                    .current()
                    .map(|c| for_terminal(&c.name).into_owned())
                    .unwrap_or_default(),
            };
            let text = if m.deleted {
                "(deleted)".to_string()
            } else if let Some(file) = state.data.files.get(&m.id) {
                file.label.clone()
            } else {
                for_terminal(m.text.lines().next().unwrap_or_default()).into_owned()
            };
            let room = usize::from(area.width).saturating_sub(30).max(8);
            let mut start: String = text.chars().take(room).collect();
            if start.len() < text.len() {
                start.push('…');
            }
            format!(" Picked {who}: {start} · Esc unpicks ")
        }
        None => match state.current_group() {
            Some(g) if g.role == "not a member" => " You are not in this group any more ".into(),
            Some(g) => format!(
                " Message to # {} · Enter send · F1 help ",
                for_terminal(&g.name)
            ),
            None => " Message · Enter send · Alt+Enter new line · F1 help ".to_string(),
        },
    };
    input.set_block(Block::bordered().title(title));
    frame.render_widget(&input, area);
}

fn draw_status(state: &State, frame: &mut Frame, area: Rect) {
    let s = &state.data.status;
    let relay_style = if s.relays_up == 0 {
        Style::new().fg(Color::Red).bold()
    } else if s.relays_up < s.relays {
        Style::new().fg(Color::Yellow)
    } else {
        Style::new().fg(Color::Green)
    };
    let mut spans = vec![
        Span::styled(
            format!(" relays {}/{} ", s.relays_up, s.relays),
            relay_style,
        ),
        Span::raw("│"),
        Span::raw(format!(" outbox {} ", s.outbox)),
        Span::raw("│"),
        Span::raw(format!(" LAN {} ", s.lan_peers)),
    ];
    if s.direct > 0 {
        spans.push(Span::raw("│"));
        spans.push(Span::styled(
            format!(" direct {} ", s.direct),
            Style::new().fg(Color::Green),
        ));
    }
    if s.requests > 0 {
        spans.push(Span::raw("│"));
        spans.push(Span::styled(
            format!(" requests {} (/requests) ", s.requests),
            Style::new().fg(Color::Yellow).bold(),
        ));
    }
    // A file not sent yet has no message to show it: said here until it goes.
    if s.files_waiting > 0 {
        spans.push(Span::raw("│"));
        spans.push(Span::styled(
            format!(" sending {} file(s) ", s.files_waiting),
            Style::new().fg(Color::Cyan),
        ));
    }
    if s.offline() {
        spans.push(Span::raw("│"));
        spans.push(Span::styled(
            " OFFLINE: messages wait in the outbox ",
            Style::new().fg(Color::White).bg(Color::Red).bold(),
        ));
    } else if s.direct_only() {
        spans.push(Span::raw("│"));
        spans.push(Span::styled(
            " NO RELAY: only connected contacts get messages now ",
            Style::new().fg(Color::Black).bg(Color::Yellow).bold(),
        ));
    }
    // What just happened comes before the demo's reminder, which may be cut off.
    if let Some((notice, _)) = &state.notice {
        spans.push(Span::raw("│ "));
        spans.push(Span::styled(notice.clone(), Style::new().italic()));
        spans.push(Span::raw(" "));
    }
    if state.demo {
        spans.push(Span::raw("│"));
        spans.push(Span::styled(
            " F2–F4 relays · F5 direct ",
            Style::new().fg(Color::Cyan),
        ));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

/// The invite panel: the code whole, in as many lines as the width needs (copying the
/// lines gives the code: `/add` and `contact add` take its pieces), its QR code where
/// the window is large enough, and otherwise how large it must be.
fn draw_invite(
    code: &str,
    qr: &str,
    until: &str,
    saved: Option<&str>,
    frame: &mut Frame,
    area: Rect,
) {
    let qr_width = qr.lines().map(|l| l.chars().count()).max().unwrap_or(0);
    let qr_height = qr.lines().count();
    let inner = usize::from(area.width.saturating_sub(4)).max(10);
    let width = inner.min(code.len().max(qr_width).max(60));
    let mut lines: Vec<String> = code
        .as_bytes()
        .chunks(width)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    lines.push(String::new());
    lines.push(format!("works until {until}"));
    lines.push("copied to the clipboard where the terminal allows".into());
    if let Some(saved) = saved {
        lines.push(format!("and written to {saved}"));
    }
    let room = usize::from(area.height.saturating_sub(2));
    if qr_height > 0 {
        if qr_width <= width && lines.len() + 1 + qr_height <= room {
            lines.push(String::new());
            lines.extend(qr.lines().map(str::to_string));
        } else {
            lines.push(format!(
                "the QR code needs a window of {}×{}: enlarge it to scan",
                qr_width + 4,
                qr_height + lines.len() + 3
            ));
        }
    }
    let body = lines.join("\n");
    let title = " Your invite code (Esc closes) ";
    let widest = lines.iter().map(|l| l.chars().count()).max().unwrap_or(20);
    let rect = centered(
        area,
        (widest.max(title.len()) + 4) as u16,
        lines.len() as u16 + 2,
    );
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(body).block(Block::bordered().title(title)),
        rect,
    );
}

fn draw_overlay(overlay: &Overlay, demo: bool, frame: &mut Frame, area: Rect) {
    let (title, body) = match overlay {
        Overlay::Invite {
            code,
            qr,
            until,
            saved,
        } => {
            return draw_invite(code, qr, until, saved.as_deref(), frame, area);
        }
        Overlay::Help if demo => (
            " Help (Esc closes) ".to_string(),
            format!("{HELP}\n{}", super::update::DEMO_HELP),
        ),
        Overlay::Help => (" Help (Esc closes) ".to_string(), HELP.to_string()),
        Overlay::Welcome => (
            " Welcome to kkachi ".to_string(),
            "kkachi keeps your chats going when a server or a whole datacenter fails:\n\
             messages go to several relays run by different people, wait safely on your\n\
             device when nothing is reachable, and travel directly on a local network.\n\n\
             Type the name your contacts will see, and press Enter."
                .to_string(),
        ),
        Overlay::Text { title, body } => (format!(" {title} (Esc closes) "), body.clone()),
    };
    let lines = body.lines().count() as u16 + 2;
    let widest = body.lines().map(|l| l.chars().count()).max().unwrap_or(20) as u16 + 4;
    let rect = centered(area, widest.max(title.chars().count() as u16 + 4), lines);
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(body).block(Block::bordered().title(title)),
        rect,
    );
}

#[cfg(test)]
mod tests {
    use kkachi_protocol::PeerId;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    use super::*;
    use crate::tui::state::{ConversationSummary, Snapshot, Status};

    fn message(
        direction: Direction,
        text: &str,
        state: MessageState,
        minute: u64,
    ) -> MessageRecord {
        MessageRecord {
            id: [minute as u8; 16],
            direction,
            text: text.into(),
            state,
            sent_at_ms: 1_700_000_000_000 + minute * 60_000,
            stored_at_ms: 0,
            seq: minute,
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

    fn render(state: &State, w: u16, h: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
        terminal.draw(|f| view(state, f)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        let mut out = String::new();
        for y in 0..h {
            let mut x = 0;
            while x < w {
                let symbol = buffer[(x, y)].symbol();
                out.push_str(symbol);
                // A wide character covers the next cell too.
                x += unicode_width::UnicodeWidthStr::width(symbol).max(1) as u16;
            }
            out.push('\n');
        }
        // Times depend on the local time zone; mask them.
        mask_times(&out)
    }

    fn mask_times(s: &str) -> String {
        let chars: Vec<char> = s.chars().collect();
        let mut out = String::new();
        let mut i = 0;
        while i < chars.len() {
            if i + 5 <= chars.len()
                && chars[i].is_ascii_digit()
                && chars[i + 1].is_ascii_digit()
                && chars[i + 2] == ':'
                && chars[i + 3].is_ascii_digit()
                && chars[i + 4].is_ascii_digit()
            {
                out.push_str("HH:MM");
                i += 5;
            } else if i + 10 <= chars.len()
                && chars[i..i + 4].iter().all(char::is_ascii_digit)
                && chars[i + 4] == '-'
                && chars[i + 5..i + 7].iter().all(char::is_ascii_digit)
                && chars[i + 7] == '-'
                && chars[i + 8..i + 10].iter().all(char::is_ascii_digit)
            {
                out.push_str("YYYY-MM-DD");
                i += 10;
            } else {
                out.push(chars[i]);
                i += 1;
            }
        }
        out
    }

    fn chat_state() -> State {
        let minji = PeerId::random();
        let mut s = State::default();
        s.load(Snapshot {
            me: Some(("Jiwoo".into(), PeerId::random())),
            conversations: vec![
                ConversationSummary {
                    peer: minji,
                    name: "Minji".into(),
                    unread: 0,
                    last_ms: Some(1_700_000_300_000),
                    muted: false,
                },
                ConversationSummary {
                    peer: PeerId::random(),
                    name: "Hyun".into(),
                    unread: 2,
                    last_ms: Some(1_700_000_000_000),
                    muted: false,
                },
            ],
            messages: vec![
                message(Direction::In, "점심 먹었어?", MessageState::Received, 1),
                MessageRecord {
                    reactions: crate::store::Reactions {
                        theirs: "👍".into(),
                        ..Default::default()
                    },
                    ..message(Direction::Out, "아직! you?", MessageState::Read, 2)
                },
                message(
                    Direction::Out,
                    "relay test",
                    MessageState::Relayed {
                        relayed: 2,
                        total: 3,
                    },
                    3,
                ),
                // Their number 5 after their 1: 2 to 4 are missing, and shown there.
                MessageRecord {
                    reply_to: Some(crate::store::Quote {
                        id: [2; 16],
                        ours: true,
                    }),
                    ..message(Direction::In, "김밥 먹자 🍙", MessageState::Received, 5)
                },
                message(Direction::Out, "nothing reachable", MessageState::Queued, 6),
            ],
            notices: vec!["a notice about the conversation".into()],
            gaps: vec![(2, 4)],
            status: Status {
                relays_up: 1,
                relays: 2,
                outbox: 1,
                lan_peers: 0,
                direct: 0,
                requests: 0,
                files_waiting: 0,
            },
            files: Default::default(),
            groups: Vec::new(),
            group_lines: Vec::new(),
        });
        s
    }

    /// The chat with a group open: lines about changes, members' messages, ours with
    /// how many members have it.
    fn group_state() -> State {
        use crate::tui::state::{GroupLine, GroupSummary};
        let mut s = chat_state();
        let id = kkachi_protocol::group::GroupId([7; 32]);
        let mut data = s.data.clone();
        data.groups = vec![GroupSummary {
            id,
            name: "Family".into(),
            members: 3,
            role: "admin",
            announcement: false,
            unread: 0,
            timer_secs: 0,
            last_ms: Some(1_700_000_400_000),
        }];
        let line = |who: &str, text: &str, event: bool, at: u64| GroupLine {
            who: who.into(),
            text: text.into(),
            sent_at_ms: 1_700_000_000_000 + at,
            event,
            delivered: 1,
            read: 0,
            copies: 2,
            unseen: false,
            file: None,
            ours: who == "me",
        };
        data.group_lines = vec![
            line("", "you added Minji", true, 0),
            line("", "you added Hyun", true, 0),
            line("Minji", "저녁 7시 어때?", false, 60_000),
            line("me", "good, see you at grandma's", false, 120_000),
        ];
        s.group = Some(id);
        s.load(data);
        s
    }

    #[test]
    fn group_screen_snapshot() {
        let s = group_state();
        let screen = render(&s, 80, 16);
        assert!(screen.contains("# Family"), "{screen}");
        insta::assert_snapshot!(screen);
        // A timer is said in the title.
        let mut s = s;
        s.data.groups[0].timer_secs = 86_400;
        assert!(render(&s, 100, 16).contains("⏱ 1 day"));
    }

    #[test]
    fn a_photo_in_a_group_shows_what_it_is_where_it_stands_and_its_preview() {
        use crate::tui::graphics::Graphic;
        use crate::tui::state::{FileView, GroupFile};
        use ratatui_image::picker::{Picker, ProtocolType};
        let preview = image::RgbImage::from_fn(64, 32, |_, y| {
            image::Rgb(if y < 16 { [220, 30, 30] } else { [30, 30, 220] })
        });
        let blocks = crate::files::picture::fit(&preview, PICTURE_COLS, PICTURE_ROWS).unwrap();
        let place =
            ratatui::layout::Size::new(blocks.width() as u16, blocks.height().div_ceil(2) as u16);
        let with = |graphic: Option<Graphic>| {
            let mut s = group_state();
            let mut photo = s.data.group_lines[2].clone();
            photo.text = String::new();
            photo.file = Some(GroupFile {
                id: "ab".repeat(32),
                name: "shelter.jpg".into(),
                view: FileView {
                    label: "📎 shelter.jpg (1.2 MB) image/jpeg".into(),
                    status: "fetched: /save keeps a copy".into(),
                    progress: None,
                    picture: Some(std::sync::Arc::new(blocks.clone())),
                    graphic,
                },
            });
            s.data.group_lines.push(photo);
            s
        };
        let s = with(None);
        let screen = render(&s, 80, 24);
        assert!(
            screen.contains("Minji: 📎 shelter.jpg (1.2 MB)"),
            "{screen}"
        );
        assert!(screen.contains("fetched: /save keeps a copy"), "{screen}");
        let rows = screen.lines().filter(|l| l.contains('▀')).count();
        assert_eq!(rows, usize::from(place.height), "{screen}");
        // With kitty's graphics, the picture takes the half blocks' place.
        let mut picker = Picker::halfblocks();
        picker.set_protocol_type(ProtocolType::Kitty);
        let s = with(Graphic::with(&picker, &preview, place));
        let screen = render(&s, 80, 24);
        assert!(!screen.contains('▀'), "{screen}");
        let placed = screen.lines().filter(|l| l.contains('\u{10EEEE}')).count();
        assert_eq!(placed, usize::from(place.height), "{screen}");
        // And /save takes the member's file.
        let mut s = with(None);
        s.input = crate::tui::state::new_input();
        for c in "/save".chars() {
            crate::tui::update::update(
                &mut s,
                crate::tui::update::Msg::Key(ratatui::crossterm::event::KeyEvent::from(
                    ratatui::crossterm::event::KeyCode::Char(c),
                )),
            );
        }
        let effects = crate::tui::update::update(
            &mut s,
            crate::tui::update::Msg::Key(ratatui::crossterm::event::KeyEvent::from(
                ratatui::crossterm::event::KeyCode::Enter,
            )),
        );
        assert!(
            matches!(
                effects.as_slice(),
                [crate::tui::update::Effect::Run {
                    command: crate::cli::Command::Get { id, .. },
                    ..
                }] if *id == "ab".repeat(32)
            ),
            "{effects:?}"
        );
    }

    #[test]
    fn files_not_sent_yet_are_said_in_the_status_bar() {
        let mut s = chat_state();
        assert!(!render(&s, 100, 16).contains("sending"));
        s.data.status.files_waiting = 2;
        assert!(render(&s, 100, 16).contains("sending 2 file(s)"));
    }

    #[test]
    fn a_photo_is_drawn_with_half_blocks_and_a_transfer_with_its_bar() {
        use crate::tui::state::FileView;
        let mut s = chat_state();
        // Their photo (a preview: red above, blue below) and our file going up.
        let mut data = s.data.clone();
        data.messages = vec![
            message(Direction::In, "", MessageState::Received, 1),
            message(Direction::Out, "", MessageState::Queued, 2),
        ];
        data.gaps.clear();
        data.notices.clear();
        let preview = image::RgbImage::from_fn(48, 24, |_, y| {
            if y < 12 {
                image::Rgb([220, 30, 30])
            } else {
                image::Rgb([30, 30, 220])
            }
        });
        data.files.insert(
            [1; 16],
            FileView {
                label: "📎 bridge.jpg (2.1 MB) image/jpeg".into(),
                status: "not fetched: /save fetches it".into(),
                progress: None,
                picture: Some(std::sync::Arc::new(preview)),
                graphic: None,
            },
        );
        data.files.insert(
            [2; 16],
            FileView {
                label: "📎 map.pdf (40 MB) application/pdf".into(),
                status: "uploading".into(),
                progress: Some((60, 160)),
                picture: None,
                graphic: None,
            },
        );
        s.load(data);
        let rendered = render(&s, 80, 24);
        insta::assert_snapshot!("file_messages_80x24", rendered);
        // The preview's cells: red over red at the top, blue over blue at the bottom.
        let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
        terminal.draw(|f| view(&s, f)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        let cells: Vec<_> = buffer
            .content()
            .iter()
            .filter(|c| c.symbol() == "▀")
            .map(|c| (c.fg, c.bg))
            .collect();
        assert!(!cells.is_empty(), "no half blocks drawn:\n{rendered}");
        let red = Color::Rgb(220, 30, 30);
        let blue = Color::Rgb(30, 30, 220);
        assert_eq!(cells.first(), Some(&(red, red)));
        assert_eq!(cells.last(), Some(&(blue, blue)));
        assert!(rendered.contains("███"), "no progress bar:\n{rendered}");
    }

    /// A conversation whose one message is a photo (`w`×`h` pixels, red above and blue
    /// below), drawn as a terminal with `kind` of graphics would, in a window `rows`
    /// high: what every cell holds, row by row.
    fn photo_drawn_with(
        kind: ratatui_image::picker::ProtocolType,
        rows: u16,
        scroll: usize,
    ) -> Vec<String> {
        use crate::tui::graphics::Graphic;
        use crate::tui::state::FileView;
        let mut s = chat_state();
        let mut data = s.data.clone();
        data.messages = vec![
            message(Direction::In, "", MessageState::Received, 1),
            message(Direction::In, "after the photo", MessageState::Received, 2),
        ];
        data.gaps.clear();
        data.notices.clear();
        let preview = image::RgbImage::from_fn(96, 64, |_, y| {
            image::Rgb(if y < 32 { [220, 30, 30] } else { [30, 30, 220] })
        });
        let blocks = crate::files::picture::fit(&preview, PICTURE_COLS, PICTURE_ROWS).unwrap();
        let place =
            ratatui::layout::Size::new(blocks.width() as u16, blocks.height().div_ceil(2) as u16);
        let mut picker = ratatui_image::picker::Picker::halfblocks();
        picker.set_protocol_type(kind);
        data.files.insert(
            [1; 16],
            FileView {
                label: "📎 bridge.jpg (2.1 MB) image/jpeg".into(),
                status: "not fetched: /save fetches it".into(),
                progress: None,
                picture: Some(std::sync::Arc::new(blocks)),
                graphic: Graphic::with(&picker, &preview, place),
            },
        );
        s.load(data);
        s.scroll = scroll;
        let mut terminal = Terminal::new(TestBackend::new(80, rows)).unwrap();
        terminal.draw(|f| view(&s, f)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        (0..rows)
            .map(|y| (0..80).map(|x| buffer[(x, y)].symbol()).collect())
            .collect()
    }

    #[test]
    fn a_photo_is_drawn_in_the_terminals_graphics_in_the_place_of_its_half_blocks() {
        use ratatui_image::picker::ProtocolType;
        let blocks = photo_drawn_with(ProtocolType::Halfblocks, 24, 0);
        let block_rows: Vec<usize> = (0..blocks.len())
            .filter(|&y| blocks[y].contains('▀'))
            .collect();
        assert_eq!(block_rows.len(), 8, "{blocks:#?}");
        let below = blocks.iter().position(|r| r.contains("after the photo"));
        for (kind, mark) in [
            (ProtocolType::Kitty, "\x1b_G"),
            (ProtocolType::Sixel, "\x1bP"),
            (ProtocolType::Iterm2, "\x1b]1337;File="),
        ] {
            let drawn = photo_drawn_with(kind, 24, 0);
            let all = drawn.concat();
            assert!(all.contains(mark), "{kind:?}: no {mark:?} drawn");
            assert!(!all.contains('▀'), "{kind:?}: half blocks left");
            // Where the half blocks were, and nothing else moved.
            let first = drawn.iter().position(|r| r.contains('\x1b')).unwrap();
            assert_eq!(first, block_rows[0], "{kind:?}");
            assert_eq!(
                drawn.iter().position(|r| r.contains("after the photo")),
                below
            );
            assert!(drawn[first].starts_with(&blocks[first][..blocks[first].find('▀').unwrap()]));
        }
        // Kitty's placeholders: one row of them per row of the picture.
        let kitty = photo_drawn_with(ProtocolType::Kitty, 24, 0);
        let placed = kitty.iter().filter(|r| r.contains('\u{10EEEE}')).count();
        assert_eq!(placed, 8);
    }

    #[test]
    fn a_photo_scrolled_partly_out_shows_the_rows_still_in() {
        use ratatui_image::picker::ProtocolType;
        // A window too short for the photo and the line after it: scrolled to the
        // bottom, the photo's upper rows are out.
        let rows = 9;
        let blocks = photo_drawn_with(ProtocolType::Halfblocks, rows, 0);
        let shown = blocks.iter().filter(|r| r.contains('▀')).count();
        assert!((1..8).contains(&shown), "{blocks:#?}");
        let kitty = photo_drawn_with(ProtocolType::Kitty, rows, 0);
        let placed: Vec<usize> = (0..kitty.len())
            .filter(|&y| kitty[y].contains('\u{10EEEE}'))
            .collect();
        let block_rows: Vec<usize> = (0..blocks.len())
            .filter(|&y| blocks[y].contains('▀'))
            .collect();
        assert_eq!(placed, block_rows);
        // Scrolled up past it, the photo's lower rows are out instead.
        let up = photo_drawn_with(ProtocolType::Kitty, rows, 6);
        let placed_up = up.iter().filter(|r| r.contains('\u{10EEEE}')).count();
        let blocks_up = photo_drawn_with(ProtocolType::Halfblocks, rows, 6);
        assert_eq!(
            placed_up,
            blocks_up.iter().filter(|r| r.contains('▀')).count()
        );
        assert!(
            placed_up >= 1 && !up.concat().contains("after the photo"),
            "{up:#?}"
        );
    }

    #[test]
    fn chat_screen_snapshot() {
        insta::assert_snapshot!(render(&chat_state(), 80, 16));
    }

    #[test]
    fn chat_snapshots_at_80x24_and_120x35() {
        let mut s = chat_state();
        s.picked = Some([5; 16]);
        insta::assert_snapshot!("chat_80x24", render(&s, 80, 24));
        insta::assert_snapshot!("chat_120x35", render(&s, 120, 35));
    }

    #[test]
    fn a_long_message_being_written_wraps_and_the_box_grows() {
        let mut s = chat_state();
        let words: Vec<String> = (1..=30).map(|n| format!("word{n}")).collect();
        s.input.insert_str(words.join(" "));
        let screen = render(&s, 80, 24);
        // Every word is on screen, none cut at the edge.
        for w in &words {
            assert!(
                screen.split(|c: char| !c.is_alphanumeric()).any(|t| t == w),
                "{w} not whole in\n{screen}"
            );
        }
    }

    #[test]
    fn a_picked_message_far_up_is_scrolled_into_view() {
        let mut s = chat_state();
        s.data.messages = (1..=40)
            .map(|n| {
                message(
                    Direction::In,
                    &format!("message number {n}"),
                    MessageState::Received,
                    n,
                )
            })
            .collect();
        s.data.gaps.clear();
        assert!(!render(&s, 80, 16).contains("message number 3 "));
        s.picked = Some([3; 16]);
        let screen = render(&s, 80, 16);
        assert!(screen.contains("message number 3 "), "{screen}");
        assert!(!screen.contains("message number 40"), "{screen}");
    }

    #[test]
    fn the_demo_help_lists_its_keys_whole_at_80x24() {
        let mut s = chat_state();
        s.demo = true;
        s.overlay = Some(Overlay::Help);
        let screen = render(&s, 80, 24);
        for line in HELP.lines().chain(super::super::update::DEMO_HELP.lines()) {
            assert!(
                screen.contains(line.trim_end()),
                "{line:?} not whole in\n{screen}"
            );
        }
        assert!(
            screen.contains("F5  cut / restore the direct path"),
            "{screen}"
        );
    }

    #[test]
    fn with_every_relay_down_a_directly_connected_contact_is_no_offline() {
        let mut s = chat_state();
        s.data.status = Status {
            relays_up: 0,
            relays: 3,
            outbox: 0,
            lan_peers: 0,
            direct: 1,
            requests: 0,
            files_waiting: 0,
        };
        let screen = render(&s, 120, 16);
        assert!(!screen.contains("OFFLINE"), "{screen}");
        assert!(screen.contains("direct 1"), "{screen}");
        assert!(
            screen.contains("NO RELAY: only connected contacts get messages now"),
            "{screen}"
        );
        s.data.status.direct = 0;
        assert!(render(&s, 120, 16).contains("OFFLINE"));
    }

    #[test]
    fn offline_status_and_help_overlay_snapshot() {
        let mut s = chat_state();
        s.data.status = Status {
            relays_up: 0,
            relays: 2,
            outbox: 3,
            lan_peers: 0,
            direct: 0,
            requests: 0,
            files_waiting: 0,
        };
        s.overlay = Some(Overlay::Help);
        let screen = render(&s, 80, 22);
        assert!(screen.contains("OFFLINE"));
        assert!(screen.contains("relays 0/2"));
        insta::assert_snapshot!(screen);
    }

    #[test]
    fn welcome_on_first_start_and_tiny_terminals_do_not_panic() {
        let mut s = State::default();
        s.load(Snapshot::default());
        let screen = render(&s, 80, 20);
        assert!(screen.contains("Welcome to kkachi"));
        for (w, h) in [(1, 1), (10, 4), (20, 3), (200, 60)] {
            render(&chat_state(), w, h);
        }
    }

    #[test]
    fn wide_characters_wrap_by_columns() {
        let pieces = wrap("가나다라마", 4);
        assert_eq!(pieces, vec!["가나", "다라", "마"]);
        assert_eq!(wrap("", 4), vec![""]);
    }

    #[test]
    fn the_invite_code_is_whole_at_80x24_and_the_qr_shows_where_it_fits() {
        let id = kkachi_protocol::Identity::generate();
        let relays = (0..3)
            .map(|i| {
                format!("/ip4/203.0.113.{i}/tcp/4040/p2p/{}", PeerId::random())
                    .parse()
                    .unwrap()
            })
            .collect();
        let code = kkachi_protocol::Card::new(&id, "지우 Jiwoo", relays, 1)
            .unwrap()
            .to_invite();
        let mut state = State::default();
        crate::tui::update::update(
            &mut state,
            crate::tui::update::Msg::Invite {
                code: code.clone(),
                expires_at: 1_800_000_000,
                saved: Some("/home/jiwoo/.kkachi/invite.txt".into()),
            },
        );
        for (w, h, qr) in [(80, 24, false), (120, 35, false), (120, 70, true)] {
            let screen = render(&state, w, h);
            // The code, read back from the panel's lines, is the code.
            let read: String = screen
                .lines()
                .filter_map(|l| {
                    let inner = l.trim().trim_matches('│').trim();
                    (inner.starts_with("kk1") || (!inner.is_empty() && code.contains(inner)))
                        .then(|| inner.to_string())
                })
                .collect();
            assert_eq!(read, code, "at {w}×{h}:\n{screen}");
            assert_eq!(
                screen.contains('▀') || screen.contains('▄'),
                qr,
                "at {w}×{h}:\n{screen}"
            );
            if !qr {
                assert!(screen.contains("the QR code needs a window of"), "{screen}");
            }
            assert!(
                screen.contains("written to /home/jiwoo/.kkachi/invite.txt"),
                "{screen}"
            );
        }
    }

    #[test]
    fn wrapping_keeps_words_whole_and_cuts_only_what_no_line_holds() {
        assert_eq!(wrap("the bridge is out", 10), ["the bridge", "is out"]);
        assert_eq!(
            wrap("supercalifragilistic ok", 8),
            ["supercal", "ifragili", "stic ok"]
        );
        // Hangul counts two columns a character.
        assert_eq!(wrap("점심 먹었어? 아직", 8), ["점심", "먹었어?", "아직"]);
        assert_eq!(wrap("", 10), [""]);
        for line in wrap("a b c d e f g h i j k l m n o p", 5) {
            assert!(line.chars().count() <= 5, "{line:?}");
        }
    }
}
