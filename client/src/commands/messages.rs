//! `send`, `sync`, `history`, and how a message is printed.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{App, CommandError, Output, Target, fail, hex, name, short_id};

use crate::cli::SendArgs;
use crate::engine::{Progress, Received, SendEvent};
use crate::sanitize::for_terminal;
use crate::store::{Contact, Conversation, Direction, MessageRecord, MessageState, Request};
use crate::time::{LocalTimes, format_ms};

/// After the first acknowledgement, how long `send` waits for slower relays.
pub(super) const STRAGGLER_GRACE: Duration = Duration::from_millis(500);

impl App {
    pub(super) async fn send(
        &mut self,
        args: SendArgs,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        let contact = match self.target(&args.contact)? {
            Target::Group(g) => return self.send_to_group(*g, args, json, out).await,
            Target::Contact(c) => *c,
        };
        // `send Al Capone hi` with contacts "Al" and "Al Capone": the words after the
        // name may be the rest of a longer name. The longest that names a contact
        // decides: the same contact, and those words are the name, not the message;
        // another one, and it is refused, not guessed.
        let mut words: &[String] = &args.text;
        let contacts = self.store.added_contacts()?;
        for taken in (1..args.text.len()).rev() {
            let longer = format!("{} {}", args.contact, args.text[..taken].join(" "));
            let Some(other) = contacts
                .iter()
                .find(|c| c.name.to_lowercase() == longer.to_lowercase())
            else {
                continue;
            };
            if other.peer != contact.peer {
                return fail(format!(
                    "did you mean {} or {}? Quote the name: kkachi send \"{}\" …",
                    name(&contact.name),
                    name(&other.name),
                    name(&other.name)
                ));
            }
            words = &args.text[taken..];
            break;
        }
        let text = words.join(" ");
        if self.store.blocked(&contact.peer)?.is_some() {
            return fail(format!(
                "{} is blocked; `kkachi contact unblock {}` first",
                name(&contact.name),
                name(&contact.name)
            ));
        }
        if let Some(payload) = crate::commands::files::Payload::of(&args) {
            if args.reply.is_some() {
                return fail("--reply goes with a text; send the file, then reply to it");
            }
            return self
                .send_file(
                    crate::files::To::Contact(contact.peer),
                    &contact.name,
                    payload,
                    &text,
                    args.timeout,
                    json,
                    out,
                )
                .await;
        }
        let reply_to = match &args.reply {
            Some(spec) => Some(self.find_message(&contact, spec, Pick::TheirsFirst)?),
            None => None,
        };
        let engine = self.engine()?;
        let mut sending = engine
            .send_reply(contact.peer, text.clone(), reply_to)
            .await?;
        let queued = sending.queued;
        // The contract: exit 0 once it is durable in the outbox.
        match sending.events.recv().await {
            Some(SendEvent::Durable) => {}
            Some(SendEvent::NotDurable(why)) => return Err(CommandError::NotSaved(why)),
            other => return fail(format!("the message could not be saved ({other:?})")),
        }
        // Then its delivery within the timeout; once one path has it, only briefly for
        // the others (a dead relay must not hold the sender up). What does not make it
        // stays in the outbox for `sync` or the daemon.
        let deadline = Instant::now() + Duration::from_secs_f64(args.timeout.max(0.0));
        let total = contact.card.relays().len().min(usize::from(u8::MAX)) as u8;
        let mut progress = Progress {
            acked: 0,
            total,
            direct: false,
        };
        let mut delivered = None;
        let mut withdrawn = false;
        let mut refused: Vec<(String, String)> = Vec::new();
        let mut first_ack: Option<Instant> = None;
        loop {
            let until = first_ack.map_or(deadline, |t| (t + STRAGGLER_GRACE).min(deadline));
            let event = tokio::time::timeout_at(until.into(), sending.events.recv()).await;
            match event {
                Ok(Some(SendEvent::Progress(p))) => {
                    progress = p;
                    first_ack = first_ack.or((p.acked > 0).then(Instant::now));
                    if p.direct || p.acked >= p.total.max(1) {
                        break;
                    }
                }
                Ok(Some(SendEvent::Delivered { direct })) => {
                    delivered = Some(direct);
                    break;
                }
                Ok(Some(SendEvent::Withdrawn)) => {
                    withdrawn = true;
                    break;
                }
                Ok(Some(SendEvent::Refused { relay, reason })) => {
                    if let Some(r) = refused.iter_mut().find(|(r, _)| *r == relay) {
                        r.1 = reason;
                    } else {
                        refused.push((relay, reason));
                    }
                    // Every relay refused: nothing more comes within the timeout.
                    if refused.len() >= usize::from(total) && progress.acked == 0 {
                        break;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let (acked, total) = (progress.acked, progress.total);
        let state = match (delivered, acked) {
            (Some(_), _) => "delivered",
            _ if withdrawn => "withdrawn",
            (None, 0) => "queued",
            (None, _) => "relayed",
        };
        let direct = delivered == Some(true) || progress.direct;
        if json {
            let refusals: Vec<_> = refused
                .iter()
                .map(|(relay, reason)| json!({ "relay": relay, "reason": reason }))
                .collect();
            out.json(
                json!({ "id": queued.id.to_hex(), "to": contact.name, "state": state,
                        "relayed": acked, "relays": total, "direct": direct,
                        "refused": refusals }),
            );
        } else if withdrawn {
            out.out(format!(
                "not sent to {}: they were removed or blocked meanwhile (message {})",
                name(&contact.name),
                queued.id
            ));
        } else if delivered.is_some() {
            out.out(format!(
                "delivered to {}{} (message {})",
                name(&contact.name),
                if direct { " directly" } else { "" },
                queued.id
            ));
        } else if acked == 0 && !refused.is_empty() {
            let why: Vec<String> = refused
                .iter()
                .map(|(relay, reason)| format!("relay {relay} refused: {}", for_terminal(reason)))
                .collect();
            out.out(format!(
                "queued for {} (message {}): {}; it stays in your outbox and is tried again",
                name(&contact.name),
                queued.id,
                why.join("; ")
            ));
        } else if acked == 0 {
            // Inside a running daemon or UI, that one delivers it; a one-shot command
            // leaves it for the next that goes online.
            let then = if self.owned {
                "`kkachi sync` or `kkachi daemon` delivers it"
            } else {
                "the running kkachi delivers it once a relay of theirs answers"
            };
            out.out(format!(
                "queued for {} (message {}): no relay of theirs answered within {}s; it stays in your outbox and {then}",
                name(&contact.name),
                queued.id,
                args.timeout
            ));
        } else {
            out.out(format!(
                "sent to {}: relayed {}/{} (message {})",
                name(&contact.name),
                acked,
                total,
                queued.id
            ));
        }
        Ok(())
    }

    pub(super) async fn sync(
        &mut self,
        timeout: f64,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        self.identity()?;
        let engine = self.engine()?;
        let names_before: Vec<(kkachi_protocol::PeerId, String)> = self
            .store
            .added_contacts()?
            .iter()
            .map(|c| (c.peer, c.name.clone()))
            .collect();
        let limit = Duration::from_secs_f64(timeout.max(0.1));
        // A contact's keys that changed while reading are told (on stderr).
        let mut events = engine.subscribe();
        // Everything pending goes now; every relay of ours is read; receipts for what
        // came go out before it returns.
        let report = engine.sync(limit).await?;
        loop {
            use tokio::sync::broadcast::error::TryRecvError;
            match events.try_recv() {
                Ok(crate::engine::AppEvent::DevicesChanged {
                    name,
                    added,
                    removed,
                    ..
                }) => out.warn(crate::engine::device_change_line(&name, &added, &removed)),
                Ok(_) => {}
                // Many messages came meanwhile: the oldest events were passed over,
                // and those after them are still read.
                Err(TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        // Files sent or asked for that stopped part-way go on, and end, here.
        for transfer in crate::files::resume(&engine, false)? {
            let _ = transfer.await;
        }
        let mut reached = 0;
        for (addr, result) in &report.relays {
            match result {
                Ok(()) => reached += 1,
                // The relay chose the words of its error: escaped.
                Err(e) => out.warn(format!("relay {addr}: {}", for_terminal(&e.to_string()))),
            }
        }
        // Group relays (of groups that have them): said apart, each once.
        let group_reached = report
            .group_relays
            .iter()
            .filter(|(_, r)| r.is_ok())
            .count();
        for (addr, result) in &report.group_relays {
            if let Err(e) = result {
                out.warn(format!(
                    "group relay {}: {}",
                    for_terminal(addr),
                    for_terminal(&super::drill::why_down(&e.to_string()))
                ));
            }
        }
        let mut received = report.shown;
        received.sort_by_key(|r| r.message.sent_at_ms);
        for r in &received {
            print_received(out, r, json);
        }
        let pending = self.store.outbox_len();
        for request in self.store.requests()? {
            out.warn(request_line(&request));
        }
        // A contact who renamed themselves is said so: their old name no longer finds them.
        for c in self.store.added_contacts()?.iter() {
            if let Some((_, old)) = names_before
                .iter()
                .find(|(p, n)| *p == c.peer && *n != c.name)
            {
                out.warn(format!(
                    "{} now calls themselves {}; `kkachi contact rename \"{}\" NAME` names them otherwise",
                    name(old),
                    name(&c.name),
                    name(&c.name)
                ));
            }
        }
        if !json {
            let new = received.iter().filter(|r| r.change.is_none()).count();
            let changes = match received.len() - new {
                0 => String::new(),
                n => format!(" and {n} edit(s), deletion(s) or reaction(s)"),
            };
            let groups = match report.group_relays.len() {
                0 => String::new(),
                n => format!(", {group_reached}/{n} group relays"),
            };
            out.warn(format!(
                "{new} new message(s){changes}; {reached}/{} relays reached{groups}; {pending} item(s) in the outbox, not yet confirmed by their recipients",
                report.relays.len()
            ));
        }
        Ok(())
    }

    /// A message of the conversation with `contact` (with `own`, one of ours only):
    /// `last` (our last one not deleted), or its whole id in hex, or a start of it (6
    /// characters or more) that only one has.
    pub(super) fn find_message(
        &self,
        contact: &Contact,
        spec: &str,
        pick: Pick,
    ) -> Result<kkachi_protocol::MessageId, CommandError> {
        let mut messages = self.store.messages(&contact.peer)?;
        if pick == Pick::Ours {
            // Their ids are theirs to choose: they could not crowd ours out of a prefix.
            messages.retain(|m| m.direction == Direction::Out);
        }
        if spec == "last" {
            let last = |direction| {
                messages
                    .iter()
                    .rev()
                    .find(|m| m.direction == direction && !m.deleted)
                    .map(|m| kkachi_protocol::MessageId(m.id))
            };
            let found = match pick {
                Pick::TheirsFirst => last(Direction::In),
                Pick::Ours | Pick::Any => last(Direction::Out),
            };
            return found.ok_or_else(|| {
                CommandError::Refused(match pick {
                    Pick::TheirsFirst => format!(
                        "{} has written nothing here yet; name a message of yours by its id (`history --json`)",
                        name(&contact.name)
                    ),
                    _ => format!("you have sent {} nothing to change", name(&contact.name)),
                })
            });
        }
        let spec = spec.to_lowercase();
        if spec.len() < 6 || !spec.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(CommandError::Refused(
                "name the message by `last` or by its id (from `history --json`), at least its first 6 characters".into(),
            ));
        }
        if let Some(m) = messages.iter().find(|m| hex(&m.id) == spec) {
            return Ok(kkachi_protocol::MessageId(m.id));
        }
        let found: Vec<&MessageRecord> = messages
            .iter()
            .filter(|m| hex(&m.id).starts_with(&spec))
            .collect();
        match found[..] {
            [m] => Ok(kkachi_protocol::MessageId(m.id)),
            [] => Err(CommandError::Refused(format!(
                "no message {spec} with {}",
                name(&contact.name)
            ))),
            _ => Err(CommandError::Refused(format!(
                "{} messages start with {spec}: give more of the id",
                found.len()
            ))),
        }
    }

    pub(super) fn search(
        &self,
        query: &str,
        only: Option<&str>,
        limit: usize,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        let only = only.map(|c| self.resolve(c)).transpose()?;
        let found = self
            .store
            .search(query, only.as_ref().map(|c| &c.peer), limit)?;
        let contacts = self.store.contacts()?;
        let mut times = LocalTimes::default();
        let mut list = Vec::new();
        for (peer, m) in &found {
            let Some(contact) = contacts.iter().find(|c| c.peer == *peer) else {
                continue;
            };
            if json {
                let mut v = message_json(&contact.name, &contact.peer, m);
                v["contact"] = serde_json::json!(contact.name);
                list.push(v);
            } else {
                push_history_line(&mut out.stdout, &mut times, contact, m);
            }
        }
        if json {
            out.json(serde_json::Value::Array(list));
        } else if found.is_empty() {
            out.warn(format!("no message holds {}", name(query)));
        }
        Ok(())
    }

    pub(super) fn history(
        &self,
        who: &str,
        last: Option<usize>,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        let contact = self.resolve(who)?;
        let mut times = LocalTimes::default();
        let mut count = 0usize;
        let mut list = Vec::new();
        let mut each = |m: MessageRecord| {
            count += 1;
            if json {
                list.push(message_json(&contact.name, &contact.peer, &m));
            } else {
                push_history_line(&mut out.stdout, &mut times, &contact, &m);
            }
        };
        match last {
            Some(n) => self
                .store
                .recent_messages(&contact.peer, n)?
                .into_iter()
                .for_each(each),
            None => self.store.for_each_message(&contact.peer, &mut each)?,
        }
        let conv = self.store.conversation(&contact.peer)?;
        if json {
            out.json(serde_json::Value::Array(list));
            return Ok(());
        }
        for notice in notices(&conv, &contact.name) {
            out.out(format!("  ⚠ {notice}"));
        }
        if count == 0 {
            out.warn(format!("no messages with {} yet", name(&contact.name)));
        }
        Ok(())
    }
}

/// Which messages a command may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pick {
    /// Only ours (editing, deleting for everyone); `last` is our last one.
    Ours,
    /// Any; `last` is our last one (deleting here only).
    Any,
    /// Any; `last` is their last one, never ours (replying, reacting).
    TheirsFirst,
}

/// A message's state as the user reads it: "delivered", "relayed 2/3".
struct StateText<'a>(&'a MessageState);

impl std::fmt::Display for StateText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            MessageState::Relayed { relayed, total } => write!(f, "relayed {relayed}/{total}"),
            other => f.write_str(other.label()),
        }
    }
}

/// Appends one history line (and a newline) to `out`.
pub fn push_history_line(
    out: &mut String,
    times: &mut LocalTimes,
    contact: &Contact,
    m: &MessageRecord,
) {
    times.push_long(out, m.sent_at_ms);
    let mut text = shown_text(m);
    if let Some(quote) = &m.reply_to {
        text = format!("{} {text}", quote_mark(quote, &contact.name));
    }
    if let Some(reactions) = reactions_text(m, &contact.name) {
        text = format!("{text}  [{reactions}]");
    }
    match m.direction {
        Direction::Out => {
            let _ = writeln!(
                out,
                "  me → {}: {}  [{}]",
                name(&contact.name),
                text,
                StateText(&m.state)
            );
        }
        Direction::In => {
            let _ = writeln!(out, "  {}: {}", name(&contact.name), text);
        }
    }
}

/// A message's text as shown: "(deleted)" for one deleted for everyone, "(edited)"
/// after one changed, safe for a terminal.
pub(super) fn shown_text(m: &MessageRecord) -> String {
    if m.deleted {
        "(deleted)".to_string()
    } else if let Some(file) = m.file.as_ref().and_then(|f| f.file()) {
        format!(
            "{}  [file {}]",
            crate::files::describe(&file),
            &crate::files::hex(&file.id())[..12]
        )
    } else if m.edited {
        format!("{} (edited)", for_terminal(&m.text))
    } else {
        for_terminal(&m.text).into_owned()
    }
}

/// What a reply answers, for people: whose message, and the start of its id ("↪ me
/// 3f2a1b2c").
fn quote_mark(quote: &crate::store::Quote, who: &str) -> String {
    let whose = if quote.ours {
        "me".into()
    } else {
        name(who).into_owned()
    };
    format!("↪ {whose} {}", &hex(&quote.id)[..8])
}

/// The reactions to a message for people ("👍 me, ❤ Minji"), safe for a terminal.
pub fn reactions_text(m: &MessageRecord, who: &str) -> Option<String> {
    let r = &m.reactions;
    let mut parts = Vec::new();
    if !r.ours.is_empty() {
        parts.push(format!("{} me", for_terminal(&r.ours)));
    }
    if !r.theirs.is_empty() {
        parts.push(format!("{} {}", for_terminal(&r.theirs), name(who)));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// The reply and reactions fields of a message in JSON.
fn extras_json(m: &MessageRecord) -> (serde_json::Value, serde_json::Value) {
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    (
        json!(
            m.reply_to
                .map(|q| json!({ "id": hex(&q.id), "ours": q.ours }))
        ),
        json!({ "mine": some(&m.reactions.ours), "theirs": some(&m.reactions.theirs) }),
    )
}

/// A message as JSON (history and daemon output).
pub fn message_json(
    contact: &str,
    peer: &kkachi_protocol::PeerId,
    m: &MessageRecord,
) -> serde_json::Value {
    let (reply_to, reactions) = extras_json(m);
    let (relayed, relays) = match m.state {
        MessageState::Relayed { relayed, total } => (Some(relayed), Some(total)),
        _ => (None, None),
    };
    json!({
        "id": hex(&m.id),
        "contact": contact,
        "peer_id": peer.to_string(),
        "direction": match m.direction { Direction::In => "in", Direction::Out => "out" },
        "text": m.text,
        "state": m.state.label(),
        "relayed": relayed,
        "relays": relays,
        "sent_at": m.sent_at_ms,
        "seq": m.seq,
        "edited": m.edited,
        "deleted": m.deleted,
        "reply_to": reply_to,
        "reactions": reactions,
        "file": file_json(m),
    })
}

/// The file a message carries, in JSON (`null` for a text).
fn file_json(m: &MessageRecord) -> serde_json::Value {
    match m.file.as_ref().and_then(|f| f.file()) {
        Some(file) if !m.deleted => json!({
            "id": crate::files::hex(&file.id()),
            "name": crate::files::safe_name(&file.name),
            "size": file.size,
            "mime": file.mime,
        }),
        _ => serde_json::Value::Null,
    }
}

/// Prints an incoming message, or a contact's change to one (sync and daemon).
pub fn print_received(out: &mut Output, r: &Received, json: bool) {
    if let Some(change) = r.change {
        print_change(out, r, change, json);
        return;
    }
    if json {
        let mut v = json!({
            "id": hex(&r.message.id),
            // `contact` as in `history --json`; `from` is kept for scripts that read it.
            "contact": r.name,
            "from": r.name,
            "peer_id": r.contact.to_string(),
            // "out": sent from another device of this account.
            "direction": if r.message.direction == Direction::Out { "out" } else { "in" },
            "text": r.message.text,
            "state": r.message.state.label(),
            "sent_at": r.message.sent_at_ms,
            "seq": r.message.seq,
            "event": "message",
            "reply_to": extras_json(&r.message).0,
            "file": file_json(&r.message),
        });
        if r.gaps.missing() > 0 {
            v["missing"] = json!(r.gaps.missing());
            v["gaps"] = json!(r.gaps.ranges());
        }
        if let Some(group) = &r.group {
            // As `history GROUP --json`: the conversation is the group's.
            v["contact"] = json!(group.name);
            v["group"] = json!(group.name);
            v["group_id"] = json!(group.id.to_hex());
            if group.event {
                v["event"] = json!("group");
                v["direction"] = json!("event");
            }
        }
        out.json(v);
    } else if let Some(group) = r.group.as_ref().filter(|g| g.event) {
        out.out(format!(
            "{}  {}: {}",
            format_ms(r.message.sent_at_ms),
            name(&group.name),
            shown_text(&r.message)
        ));
    } else if let Some(group) = &r.group {
        out.out(format!(
            "{}  {} › {}: {}",
            format_ms(r.message.sent_at_ms),
            name(&group.name),
            name(&r.name),
            shown_text(&r.message)
        ));
    } else {
        let reply = match &r.message.reply_to {
            Some(quote) => format!("{} ", quote_mark(quote, &r.name)),
            None => String::new(),
        };
        let who = if r.message.direction == Direction::Out {
            // Sent from another device of this account.
            format!("you → {}", name(&r.name))
        } else {
            name(&r.name).to_string()
        };
        out.out(format!(
            "{}  {who}: {reply}{}",
            format_ms(r.message.sent_at_ms),
            shown_text(&r.message)
        ));
        if r.gaps.missing() > 0 {
            out.out(format!(
                "  ⚠ {} earlier message(s) from {} not received yet (numbers {})",
                r.gaps.missing(),
                name(&r.name),
                r.gaps.describe()
            ));
        }
    }
}

/// Prints a contact's edit, delete or reaction: in JSON, `event` names it and `id` the
/// message it changed (as `history --json` shows it now).
fn print_change(out: &mut Output, r: &Received, change: crate::engine::Change, json: bool) {
    let m = &r.message;
    if json {
        let mut v = message_json(&r.name, &r.contact, m);
        v["event"] = json!(change.label());
        v["from"] = json!(r.name);
        out.json(v);
        return;
    }
    let who = name(&r.name);
    let line = match change {
        crate::engine::Change::Edited => {
            format!(
                "{who} edited message {}: {}",
                &hex(&m.id)[..8],
                for_terminal(&m.text)
            )
        }
        crate::engine::Change::Deleted => {
            format!("{who} deleted message {} for everyone", &hex(&m.id)[..8])
        }
        crate::engine::Change::Reacted if m.reactions.theirs.is_empty() => {
            format!(
                "{who} took back their reaction to message {}",
                &hex(&m.id)[..8]
            )
        }
        crate::engine::Change::Reacted => format!(
            "{who} reacted {} to message {}",
            for_terminal(&m.reactions.theirs),
            &hex(&m.id)[..8]
        ),
    };
    out.out(format!("{}  {line}", format_ms(crate::engine::now_ms())));
}

/// What the user should know about a conversation beyond its messages: gaps, breaks in
/// the contact's hash chain, conflicting messages, messages refused.
pub fn notices(conv: &Conversation, who: &str) -> Vec<String> {
    let mut out = notices_but_gaps(conv, who);
    let gaps = &conv.gaps;
    if gaps.missing() > 0 {
        out.insert(
            usize::from(conv.timer_secs > 0),
            format!(
                "{} message(s) from {} missing so far (numbers {}); they may still arrive",
                gaps.missing(),
                name(who),
                gaps.describe()
            ),
        );
    }
    out
}

/// A gap in a contact's messages, for a view that draws it where it is.
pub fn gap_line(who: &str, (from, to): (u64, u64)) -> String {
    let count = to - from + 1;
    let numbers = if from == to {
        format!("number {from}")
    } else {
        format!("numbers {from}–{to}")
    };
    format!(
        "{count} message(s) from {} missing here ({numbers}); they may still arrive",
        name(who)
    )
}

/// [`notices`] without the missing messages (a view drawing each gap in its place).
pub fn notices_but_gaps(conv: &Conversation, who: &str) -> Vec<String> {
    let mut out = Vec::new();
    if conv.timer_secs > 0 {
        out.push(super::timer_line(who, conv.timer_secs));
    }
    let who = name(who);
    let gaps = &conv.gaps;
    if gaps.forgotten() > 0 {
        out.push(format!(
            "{} older missing message(s) from {who} are no longer tracked",
            gaps.forgotten()
        ));
    }
    if !conv.chain_breaks.is_empty() {
        let list: Vec<String> = conv.chain_breaks.iter().map(u64::to_string).collect();
        out.push(format!(
            "message(s) number {} from {who} do not follow the one before: one may have been \
             altered, replaced, or sent from a restored copy of their app",
            list.join(", ")
        ));
    }
    if conv.conflicts > 0 {
        out.push(format!(
            "{} message(s) from {who} claimed a number another of their messages holds",
            conv.conflicts
        ));
    }
    if conv.refused > 0 {
        out.push(format!(
            "{} message(s) from {who} were refused: what they sent takes more than the 256 MiB \
             kept per contact. Block them, or remove and add them again to start over",
            conv.refused
        ));
    }
    out
}

/// One line about a message request, for stderr.
pub fn request_line(request: &Request) -> String {
    format!(
        "message request from {} ({}): {} message(s); `kkachi request list` shows them",
        name(request.card.name()),
        short_id(&request.peer),
        request.messages.len()
    )
}
