//! `contact …` and `request …`: adding, listing, blocking, removing and renaming
//! contacts, and the messages of people who are not contacts yet.

use kkachi_protocol::{Card, PeerId};
use serde_json::json;
use unicode_width::UnicodeWidthStr;

use super::{App, CommandError, Output, fail, hex, name, resolve_contact, short_id};
use crate::cli::{ContactCommand, RequestCommand};
use crate::engine::ContactOutcome;
use crate::sanitize::for_terminal;
use crate::store::{Contact, LocalStore, Request};
use crate::time::format_ms;

/// Lines of each held message shown by `request list`.
const PREVIEW_CHARS: usize = 120;

impl App {
    pub(super) async fn contact(
        &mut self,
        command: ContactCommand,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        self.identity()?;
        match command {
            ContactCommand::Add { code, name } => {
                self.contact_add(&code.concat(), name, json, out).await
            }
            ContactCommand::List => self.contact_list(json, out),
            ContactCommand::Devices { contact } => self.contact_devices(&contact, json, out),
            ContactCommand::Remove { contact } => {
                let c = self.resolve(&contact)?;
                let done = self.local_engine()?.remove_contact(c.peer).await?;
                if json {
                    out.json(json!({ "removed": c.name, "peer_id": c.peer.to_string(),
                                     "messages": done.removed_messages }));
                } else {
                    out.out(format!(
                        "removed {} and {} message(s) with them; what they send from now on is a message request",
                        name(&c.name),
                        done.removed_messages
                    ));
                }
                Ok(())
            }
            ContactCommand::Block { contact } => {
                let (peer, label) = match resolve_contact(&self.store, &contact) {
                    // A group member going by a contact's name: which one is not guessed.
                    Ok(c)
                        if c.peer.to_string() != contact
                            && !met_named(&self.store, &contact)?.is_empty() =>
                    {
                        return fail(format!(
                            "{:?} is your contact {} and a group member too: block by the peer id (`kkachi contact list --json`, `kkachi group members GROUP --json`)",
                            for_terminal(&contact).as_ref(),
                            name(&c.name)
                        ));
                    }
                    Ok(c) => (c.peer, c.name),
                    Err(not_contact) => match contact.parse::<PeerId>() {
                        Ok(p) => (p, contact.clone()),
                        // A member of a group of ours who is not a contact, by the
                        // name they go by (only if one member alone does).
                        Err(_) => match met_named(&self.store, &contact)?.as_slice() {
                            [one] => (one.peer, one.card.name().to_owned()),
                            [] => return Err(not_contact),
                            _ => {
                                return fail(format!(
                                    "several group members go by {:?}: block one by the peer id `kkachi group members GROUP --json` shows",
                                    for_terminal(&contact).as_ref()
                                ));
                            }
                        },
                    },
                };
                self.block(peer, label, json, out).await
            }
            ContactCommand::Unblock { contact } => self.unblock(&contact, json, out).await,
            ContactCommand::Rename { contact, name: new } => {
                let c = self.resolve(&contact)?;
                self.local_engine()?
                    .rename_contact(c.peer, new.clone())
                    .await?;
                if json {
                    out.json(json!({ "renamed": c.name, "name": new.trim(), "peer_id": c.peer.to_string() }));
                } else {
                    out.out(format!("{} is now {}", name(&c.name), name(new.trim())));
                }
                Ok(())
            }
        }
    }

    /// `timer CONTACT [DURATION|off]`.
    pub(super) async fn timer(
        &mut self,
        contact: &str,
        duration: Option<&str>,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        let c = self.resolve(contact)?;
        let Some(duration) = duration else {
            let secs = self.store.conversation(&c.peer)?.timer_secs;
            if json {
                out.json(json!({ "contact": c.name, "timer_secs": secs }));
            } else {
                out.out(timer_line(&c.name, secs));
            }
            return Ok(());
        };
        let secs = parse_duration(duration).map_err(CommandError::Refused)?;
        let engine = self.engine()?;
        engine.set_timer(c.peer, secs).await?;
        // Tried once at every relay of theirs now; what is left goes with the next sync.
        engine.deliver_now().await?;
        if json {
            out.json(json!({ "contact": c.name, "timer_secs": secs }));
        } else {
            out.out(timer_line(&c.name, secs));
        }
        Ok(())
    }

    async fn contact_add(
        &mut self,
        code: &str,
        new_name: Option<String>,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        // A code copied from a wrapped terminal line comes with line breaks or spaces
        // in it; a code has neither.
        let code: String = code.split_whitespace().collect();
        let card = Card::from_invite(&code)?;
        let before = self.store.added_contact(&card.identity().peer_id())?;
        let done = self.local_engine()?.add_contact(card, new_name).await?;
        report_added(&done, before.is_some(), json, out);
        Ok(())
    }

    fn contact_list(&self, json: bool, out: &mut Output) -> Result<(), CommandError> {
        let contacts = self.store.added_contacts()?;
        let blocked = self.store.blocked_all()?;
        let is_blocked = |p: &PeerId| blocked.iter().any(|(b, _)| b == p);
        if json {
            let list: Vec<_> = contacts
                .iter()
                .map(|c| json!({ "name": c.name, "peer_id": c.peer.to_string(), "card_name": c.card.name(),
                                 "blocked": is_blocked(&c.peer),
                                 "relays": c.card.relays().iter().map(|r| r.to_string()).collect::<Vec<_>>() }))
                .collect();
            out.json(serde_json::Value::Array(list));
            return Ok(());
        }
        if contacts.is_empty() {
            out.warn("no contacts yet: add one with `kkachi contact add CODE`");
        }
        // Padded by the columns a name takes on screen, so Hangul names line up.
        let width = contacts
            .iter()
            .map(|c| name(&c.name).width())
            .max()
            .unwrap_or(0)
            .max(12);
        for c in contacts.iter() {
            let shown = name(&c.name);
            let pad = " ".repeat(width - shown.width());
            out.out(format!(
                "{shown}{pad}  {}  {} relay(s){}",
                c.peer,
                c.card.relays().len(),
                if is_blocked(&c.peer) {
                    "  (blocked)"
                } else {
                    ""
                }
            ));
        }
        for (peer, b) in blocked
            .iter()
            .filter(|(p, _)| !contacts.iter().any(|c| c.peer == *p))
        {
            out.out(format!(
                "{} ({peer}): blocked, not a contact",
                name(&b.name)
            ));
        }
        let requests = self.store.requests()?;
        if !requests.is_empty() {
            out.warn(format!(
                "{} message request(s) waiting: `kkachi request list`",
                requests.len()
            ));
        }
        Ok(())
    }

    /// Blocks `peer`, known to the user as `label`.
    async fn block(
        &mut self,
        peer: PeerId,
        label: String,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        self.local_engine()?.block(peer, label.clone()).await?;
        if json {
            out.json(json!({ "blocked": label, "peer_id": peer.to_string() }));
        } else {
            out.out(format!(
                "blocked {}: what they send is dropped unread; `kkachi contact unblock` undoes it",
                name(&label)
            ));
        }
        Ok(())
    }

    async fn unblock(
        &mut self,
        who: &str,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        let peer = match resolve_contact(&self.store, who) {
            Ok(c) => c.peer,
            Err(not_contact) => {
                let blocked = self.store.blocked_all()?;
                match blocked.iter().find(|(p, b)| {
                    b.name.to_lowercase() == who.to_lowercase() || matches_id(p, who)
                }) {
                    Some((p, _)) => *p,
                    None => return Err(not_contact),
                }
            }
        };
        if !self.local_engine()?.unblock(peer).await? {
            return fail(format!("{} is not blocked", for_terminal(who)));
        }
        if json {
            out.json(json!({ "unblocked": peer.to_string() }));
        } else {
            out.out(format!(
                "unblocked {}; messages they send from now on arrive again",
                for_terminal(who)
            ));
        }
        Ok(())
    }

    pub(super) async fn request(
        &mut self,
        command: RequestCommand,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        self.identity()?;
        match command {
            RequestCommand::List => self.request_list(json, out),
            RequestCommand::Accept { who, name: new } => {
                let r = resolve_request(&self.store, &who)?;
                let done = self.local_engine()?.accept_request(r.peer, new).await?;
                report_added(&done, false, json, out);
                Ok(())
            }
            RequestCommand::Reject { who } => {
                let r = resolve_request(&self.store, &who)?;
                let n = self.local_engine()?.reject_request(r.peer).await?;
                if json {
                    out.json(json!({ "rejected": r.peer.to_string(), "messages": n }));
                } else {
                    out.out(format!(
                        "dropped {n} message(s) from {}; they may write again (`kkachi contact block` stops that)",
                        name(r.card.name())
                    ));
                }
                Ok(())
            }
            // Only among requests: a stranger calling themselves "Mom" must not get
            // your contact Mom blocked.
            RequestCommand::Block { who } => {
                let r = resolve_request(&self.store, &who)?;
                self.block(r.peer, r.card.name().to_owned(), json, out)
                    .await
            }
        }
    }

    fn request_list(&self, json: bool, out: &mut Output) -> Result<(), CommandError> {
        let requests = self.store.requests()?;
        if json {
            let list: Vec<_> = requests.iter().map(request_json).collect();
            out.json(serde_json::Value::Array(list));
            return Ok(());
        }
        let dropped = self.store.requests_dropped()?;
        if dropped > 0 {
            out.warn(format!(
                "{dropped} message(s) from people who are not contacts were dropped because requests were full \
                 (20 per sender, 2,000 in all); reject or block the ones you do not want"
            ));
        }
        if requests.is_empty() {
            out.warn("no message requests");
            return Ok(());
        }
        for r in &requests {
            out.out(format!(
                "{} (says they are {:?}; id …{}, {} relay(s)): {} message(s)",
                r.peer,
                name(r.card.name()).as_ref(),
                short_id(&r.peer),
                r.card.relays().len(),
                r.messages.len()
            ));
            for m in &r.messages {
                let text = m
                    .text
                    .as_deref()
                    .unwrap_or("(a kind of message this version cannot show)");
                let mut preview: String = for_terminal(text).chars().take(PREVIEW_CHARS).collect();
                if for_terminal(text).chars().count() > PREVIEW_CHARS {
                    preview.push('…');
                }
                out.out(format!("  {}  {preview}", format_ms(m.sent_at_ms)));
            }
        }
        out.warn(
            "accept with `kkachi request accept WHO [--name NAME]`, or `request reject WHO`, or `request block WHO` \
             (WHO: the name they give, or their id); they see their messages as delivered only once you accept",
        );
        Ok(())
    }
}

fn report_added(done: &ContactOutcome, existed: bool, json: bool, out: &mut Output) {
    let Some(c) = &done.contact else {
        return;
    };
    let status = match (done.added, done.updated, existed) {
        (true, _, _) => "added",
        (false, true, _) => "updated",
        _ => "kept",
    };
    if json {
        out.json(json!({ "name": c.name, "peer_id": c.peer.to_string(), "relays": c.card.relays().len(),
                         "status": status, "accepted": done.accepted.len(), "unblocked": done.unblocked }));
        return;
    }
    match status {
        "kept" => out.warn(format!("{} is already a contact", name(&c.name))),
        verb => out.out(format!(
            "{verb} contact {} ({}, {} relay(s))",
            name(&c.name),
            c.peer,
            c.card.relays().len()
        )),
    }
    if done.unblocked {
        out.out(format!("{} was blocked; now unblocked", name(&c.name)));
    }
    if !done.accepted.is_empty() {
        out.out(format!(
            "{} message(s) {} sent before you added them are now in your conversation (`kkachi history {}`)",
            done.accepted.len(),
            name(&c.name),
            name(&c.name)
        ));
    }
}

fn request_json(r: &Request) -> serde_json::Value {
    let messages: Vec<_> = r
        .messages
        .iter()
        .map(|m| json!({ "id": hex(&m.message_id), "text": m.text, "sent_at": m.sent_at_ms, "seq": m.seq }))
        .collect();
    json!({ "peer_id": r.peer.to_string(), "name": r.card.name(),
            "relays": r.card.relays().len(), "messages": messages })
}

/// True if `who` is `peer`'s id, or at least 6 characters of its start or end.
fn matches_id(peer: &PeerId, who: &str) -> bool {
    let id = peer.to_string();
    id == who || (who.len() >= 6 && (id.starts_with(who) || id.ends_with(who)))
}

/// The members of our groups who are not contacts and go by `who` (any case; a
/// leading `~`, as they are shown, is taken off).
fn met_named(store: &LocalStore, who: &str) -> Result<Vec<Contact>, CommandError> {
    let lower = who.strip_prefix('~').unwrap_or(who).to_lowercase();
    Ok(store
        .contacts()?
        .iter()
        .filter(|c| c.through_group && c.card.name().to_lowercase() == lower)
        .cloned()
        .collect())
}

/// Finds a message request by the name its sender gives (any case) or their id (whole,
/// or a unique start or end of at least 6 characters).
fn resolve_request(store: &LocalStore, who: &str) -> Result<Request, CommandError> {
    let requests = store.requests()?;
    let by_id: Vec<&Request> = requests
        .iter()
        .filter(|r| matches_id(&r.peer, who))
        .collect();
    let by_name: Vec<&Request> = requests
        .iter()
        .filter(|r| r.card.name().to_lowercase() == who.to_lowercase())
        .collect();
    match (by_id.as_slice(), by_name.as_slice()) {
        // One match either way, or the same request both ways: an id that merely ends
        // like someone's name does not win over the name.
        ([one], []) | ([], [one]) => Ok((*one).clone()),
        ([a], [b]) if a.peer == b.peer => Ok((*a).clone()),
        ([], []) => fail(format!(
            "no message request from {:?}; `kkachi request list` shows them",
            for_terminal(who).as_ref()
        )),
        _ => fail(format!(
            "{:?} matches several requests; use more of the id `kkachi request list` shows",
            for_terminal(who).as_ref()
        )),
    }
}

/// What the timer of the conversation with `who` is.
pub fn timer_line(who: &str, secs: u32) -> String {
    if secs == 0 {
        format!(
            "messages with {} stay (no disappearing-message timer)",
            name(who)
        )
    } else {
        format!(
            "messages with {} disappear {} after they are sent or arrive, on both sides",
            name(who),
            describe_duration(secs)
        )
    }
}

/// "1 day", "30 minutes": a timer as people say it.
pub fn describe_duration(secs: u32) -> String {
    let units = [
        (604_800, "week"),
        (86_400, "day"),
        (3600, "hour"),
        (60, "minute"),
        (1, "second"),
    ];
    for (size, unit) in units {
        if secs >= size && secs.is_multiple_of(size) {
            let n = secs / size;
            return format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
        }
    }
    format!("{secs} seconds")
}

/// `30s`, `10m`, `1h`, `1d`, `1w`, or `off` (0): seconds.
pub fn parse_duration(text: &str) -> Result<u32, String> {
    let t = text.trim().to_lowercase();
    if t == "off" || t == "0" {
        return Ok(0);
    }
    let bad = || {
        format!(
            "{text:?} is not a duration: write a number with s, m, h, d or w (30s, 10m, 1h, 1d, 1w), or off"
        )
    };
    let (number, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let size: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(bad()),
    };
    let secs = n.checked_mul(size).ok_or_else(bad)?;
    if secs == 0 {
        return Ok(0);
    }
    if secs < u64::from(crate::store::MIN_TIMER_SECS) {
        return Err(format!(
            "the shortest timer is {} seconds",
            crate::store::MIN_TIMER_SECS
        ));
    }
    u32::try_from(secs)
        .ok()
        .filter(|s| *s <= kkachi_protocol::content::MAX_TIMER_SECS)
        .ok_or_else(|| "the longest timer is a year".to_string())
}

#[cfg(test)]
mod timer_tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("30s"), Ok(30));
        assert_eq!(parse_duration("10m"), Ok(600));
        assert_eq!(parse_duration(" 1D "), Ok(86_400));
        assert_eq!(parse_duration("2w"), Ok(1_209_600));
        assert_eq!(parse_duration("off"), Ok(0));
        assert!(parse_duration("1s").unwrap_err().contains("shortest"));
        assert!(parse_duration("400d").unwrap_err().contains("longest"));
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(parse_duration("10").unwrap_err().contains("not a duration"));
        assert_eq!(describe_duration(86_400), "1 day");
        assert_eq!(describe_duration(90), "90 seconds");
        assert_eq!(describe_duration(7200), "2 hours");
    }
}
