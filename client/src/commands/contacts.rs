//! `contact …` and `request …`: adding, listing, blocking, removing and renaming
//! contacts, and the messages of people who are not contacts yet.

use kkachi_protocol::{Card, PeerId};
use serde_json::json;
use unicode_width::UnicodeWidthStr;

use super::{App, CommandError, Output, fail, hex, name, resolve_contact, short_id};
use crate::cli::{ContactCommand, RequestCommand};
use crate::engine::ContactOutcome;
use crate::sanitize::for_terminal;
use crate::store::{LocalStore, Request};
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
                    Ok(c) => (c.peer, c.name),
                    Err(not_contact) => match contact.parse::<PeerId>() {
                        Ok(p) => (p, contact.clone()),
                        Err(_) => return Err(not_contact),
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
        let before = self.store.contact(&card.identity().peer_id())?;
        let done = self.local_engine()?.add_contact(card, new_name).await?;
        report_added(&done, before.is_some(), json, out);
        Ok(())
    }

    fn contact_list(&self, json: bool, out: &mut Output) -> Result<(), CommandError> {
        let contacts = self.store.contacts()?;
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
             (WHO: the name they give, or their id); they see your messages as delivered only once you accept",
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
