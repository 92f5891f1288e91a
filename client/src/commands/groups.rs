//! `kkachi group …`, and `send` and `history` when they name a group.

use std::time::{Duration, Instant};

use kkachi_protocol::PeerId;
use kkachi_protocol::group::{GroupId, Mode, Role, Roster};
use serde_json::json;

use super::messages::message_json;
use super::{App, CommandError, Output, fail, name, resolve_contact};
use crate::cli::{GroupCommand, SendArgs};
use crate::engine::{GroupChange, GroupChanged};
use crate::sanitize::for_terminal;
use crate::store::{Contact, GroupMessage, GroupRecord, LocalStore, MessageState};
use crate::time::LocalTimes;

/// A group we hold, with its merged state.
pub(super) struct Group {
    pub(super) id: GroupId,
    pub(super) record: GroupRecord,
    pub(super) roster: Roster,
}

/// What `send` and `history` name: a contact or a group.
pub(super) enum Target {
    Contact(Box<Contact>),
    Group(Box<Group>),
}

/// Every group we hold (not those only waiting messages told us of), by name.
pub(super) fn groups(store: &LocalStore) -> Result<Vec<Group>, CommandError> {
    let mut out = Vec::new();
    for (id, record) in store.groups()? {
        if let Some(roster) = record.roster(id)? {
            out.push(Group { id, record, roster });
        }
    }
    out.sort_by(|a, b| {
        a.roster
            .name
            .to_lowercase()
            .cmp(&b.roster.name.to_lowercase())
    });
    Ok(out)
}

/// The group `who` names: its id (or its start, 6 characters or more), its name (any
/// case), or the unique start of its name; `None` if none does; with whether it was
/// named exactly (by id or whole name).
fn find_group(store: &LocalStore, who: &str) -> Result<Option<(Group, bool)>, CommandError> {
    let all = groups(store)?;
    let lower = who.to_lowercase();
    let pick = |f: &dyn Fn(&Group) -> bool| -> Vec<usize> {
        (0..all.len()).filter(|&i| f(&all[i])).collect()
    };
    // A whole name first, then the start of an id, then the start of a name.
    let mut matches = pick(&|g| g.roster.name.to_lowercase() == lower);
    let mut exactly = true;
    if matches.is_empty() && who.len() >= 6 {
        matches = pick(&|g| g.id.to_hex().starts_with(&lower));
    }
    if matches.is_empty() && !who.trim().is_empty() {
        matches = pick(&|g| g.roster.name.to_lowercase().starts_with(&lower));
        exactly = false;
    }
    match matches.as_slice() {
        [] => Ok(None),
        [one] => {
            let mut all = all;
            Ok(Some((all.swap_remove(*one), exactly)))
        }
        many => fail(format!(
            "{:?} matches {} groups ({}); name one by its id",
            for_terminal(who).as_ref(),
            many.len(),
            many.iter()
                .map(|&i| format!("{} id {}", name(&all[i].roster.name), short(&all[i].id)))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn resolve_group(store: &LocalStore, who: &str) -> Result<Group, CommandError> {
    match find_group(store, who)? {
        Some((g, _)) => Ok(g),
        None => fail(format!(
            "no group named {:?}; `kkachi group list` shows your groups",
            for_terminal(who).as_ref()
        )),
    }
}

fn role_label(role: Option<Role>) -> &'static str {
    match role {
        Some(Role::Admin) => "admin",
        Some(Role::Member) => "member",
        None => "not a member",
    }
}

fn mode_label(mode: Mode) -> &'static str {
    match mode {
        Mode::Chat => "chat",
        Mode::Announcement => "announcement",
    }
}

impl App {
    /// What `who` names for `send` and `history`: a contact, or else a group. A name
    /// that is both a contact's and a group's exactly is refused, not guessed.
    pub(super) fn target(&self, who: &str) -> Result<Target, CommandError> {
        let contact = resolve_contact(&self.store, who);
        // A peer id names a contact, whatever any group is called.
        if let Ok(c) = &contact
            && c.peer.to_string() == who
        {
            return Ok(Target::Contact(Box::new(c.clone())));
        }
        match (contact, find_group(&self.store, who)?) {
            // Both a contact and a group answer to it (a group's name is chosen by
            // whoever made it): refused, never guessed, so a message cannot go to the
            // wrong people.
            (Ok(c), Some((g, _))) => fail(format!(
                "{:?} could be your contact {} or the group {}: name the contact by peer id ({}) or the group by id ({})",
                for_terminal(who).as_ref(),
                name(&c.name),
                name(&g.roster.name),
                c.peer,
                short(&g.id)
            )),
            (Err(_), Some((g, _))) => Ok(Target::Group(Box::new(g))),
            (Ok(c), None) => Ok(Target::Contact(Box::new(c))),
            // Neither: both lists are where to look.
            (Err(CommandError::Refused(why)), None) if why.starts_with("no contact named") => {
                // A member of a group of ours, who is not a contact: said so.
                let lower = who.to_lowercase();
                if let Some(m) = self.store.contacts()?.iter().find(|c| {
                    c.through_group
                        && (c.card.name().to_lowercase() == lower || c.peer.to_string() == who)
                }) {
                    return fail(format!(
                        "{} is in a group with you but is not your contact: to write to them alone, add their code (`kkachi contact add CODE`); they can also ask you",
                        name(m.card.name())
                    ));
                }
                fail(format!(
                    "no contact or group named {:?}; `kkachi contact list` and `kkachi group list` show them",
                    for_terminal(who).as_ref()
                ))
            }
            (Err(e), None) => Err(e),
        }
    }

    /// Whether `who` names a group (for commands that take contacts only, to say so).
    pub(super) fn names_group(&self, who: &str) -> bool {
        find_group(&self.store, who).is_ok_and(|g| g.is_some())
    }

    /// A member of `group` named by a contact's name or peer id, or by their name in
    /// the group.
    fn member(&self, group: &Group, who: &str) -> Result<PeerId, CommandError> {
        let members: Vec<PeerId> = group
            .roster
            .members
            .values()
            .map(|m| m.identity.peer_id())
            .collect();
        if matches!(who.to_lowercase().as_str(), "me" | "you" | "myself") {
            return Ok(self.identity()?.peer_id());
        }
        if let Ok(c) = resolve_contact(&self.store, who) {
            if members.contains(&c.peer) {
                return Ok(c.peer);
            }
            let was = group.roster.former.contains(c.card.identity().ed25519());
            return fail(format!(
                "{} is not a member of {}{}",
                name(&c.name),
                name(&group.roster.name),
                if was { " any more" } else { "" }
            ));
        }
        let lower = who.to_lowercase();
        let named: Vec<PeerId> = group
            .roster
            .members
            .values()
            .filter(|m| {
                m.name.to_lowercase() == lower
                    || (who.len() >= 6 && m.identity.peer_id().to_string().starts_with(who))
            })
            .map(|m| m.identity.peer_id())
            .collect();
        match named.as_slice() {
            [one] => Ok(*one),
            [] => fail(format!(
                "{} has no member {:?}; `kkachi group members {}` lists them",
                name(&group.roster.name),
                for_terminal(who).as_ref(),
                name(&group.roster.name)
            )),
            _ => fail(format!(
                "several members of {} are called {:?}; use the peer id (`kkachi group members`)",
                name(&group.roster.name),
                for_terminal(who).as_ref()
            )),
        }
    }

    /// How a member is shown: the contact's name we gave them, else their name in the
    /// group, marked.
    fn member_name(&self, peer: &PeerId, in_group: &str) -> Result<String, CommandError> {
        Ok(match self.store.added_contact(peer)? {
            Some(c) => c.name,
            None => format!("{in_group} (not a contact)"),
        })
    }

    pub(super) async fn group(
        &mut self,
        command: GroupCommand,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        match command {
            GroupCommand::Create {
                name: words,
                announcement,
            } => {
                let group_name = words.join(" ");
                let lower = group_name.to_lowercase();
                let clash = resolve_contact(&self.store, &group_name)
                    .is_ok_and(|c| c.name.to_lowercase() == lower)
                    || groups(&self.store)?
                        .iter()
                        .any(|g| g.roster.name.to_lowercase() == lower);
                let engine = self.local_engine()?;
                let id = engine.create_group(group_name.clone()).await?;
                if announcement {
                    engine
                        .change_group(id, GroupChange::Mode(Mode::Announcement))
                        .await?;
                }
                if json {
                    out.json(json!({
                        "id": id.to_hex(),
                        "name": group_name,
                        "mode": mode_label(if announcement { Mode::Announcement } else { Mode::Chat }),
                    }));
                } else {
                    out.out(format!(
                        "created {}{} (id {}); add members with `kkachi group add {} CONTACT…`",
                        if announcement {
                            "the announcement channel "
                        } else {
                            ""
                        },
                        name(&group_name),
                        short(&id),
                        short(&id)
                    ));
                }
                if clash {
                    out.warn(format!(
                        "a contact or another group is called {} too: name this group by its id ({})",
                        name(&group_name),
                        short(&id)
                    ));
                }
            }
            GroupCommand::Add { group, contacts } => {
                let g = resolve_group(&self.store, &group)?;
                let mut peers = Vec::new();
                let own = self.store.own_card(&self.identity()?)?;
                for who in &contacts {
                    if who.to_lowercase() == own.name().to_lowercase()
                        && resolve_contact(&self.store, who).is_err()
                    {
                        return fail(format!("you are in {} already", name(&g.roster.name)));
                    }
                    let c = self.resolve(who)?;
                    if self.store.blocked(&c.peer)?.is_some() {
                        return fail(format!("{} is blocked", name(&c.name)));
                    }
                    peers.push(c.peer);
                }
                let done = self.change(&g, GroupChange::Add(peers)).await?;
                report_change(out, json, &g, "added", &done);
            }
            GroupCommand::Remove { group, member } => {
                let g = resolve_group(&self.store, &group)?;
                let peer = self.member(&g, &member)?;
                if peer == self.identity()?.peer_id() {
                    return fail("to leave a group: `kkachi group leave GROUP`");
                }
                let done = self.change(&g, GroupChange::Remove(peer)).await?;
                report_change(out, json, &g, "removed", &done);
            }
            GroupCommand::Leave { group, force } => {
                let g = resolve_group(&self.store, &group)?;
                let me = *self.identity()?.public().ed25519();
                if !force
                    && g.roster.role(&me) == Some(Role::Admin)
                    && g.roster.admins().count() == 1
                    && g.roster.members.len() > 1
                {
                    return fail(format!(
                        "you are the only admin of {}: make someone admin first (`kkachi group admin {} MEMBER`), or leave anyway with --force (then nobody can add or remove members)",
                        name(&g.roster.name),
                        short(&g.id)
                    ));
                }
                let done = self.change(&g, GroupChange::Leave).await?;
                if json {
                    out.json(
                        json!({ "left": g.roster.name, "id": g.id.to_hex(), "told": done.told }),
                    );
                } else {
                    out.out(format!(
                        "you left {}; {} member(s) told",
                        name(&g.roster.name),
                        done.told
                    ));
                }
            }
            GroupCommand::Read { group } => {
                let g = resolve_group(&self.store, &group)?;
                let engine = self.engine()?;
                let n = engine.mark_group_read(g.id).await?;
                engine.deliver_now().await?;
                if json {
                    out.json(json!({ "group": g.roster.name, "read": n }));
                } else {
                    out.out(format!(
                        "{}: {n} message(s) marked read",
                        name(&g.roster.name)
                    ));
                }
            }
            GroupCommand::Receipts { group, message } => {
                let g = resolve_group(&self.store, &group)?;
                self.group_receipts(&g, message.as_deref(), json, out)?;
            }
            GroupCommand::Forget { group } => {
                let g = resolve_group(&self.store, &group)?;
                let n = self.local_engine()?.forget_group(g.id).await?;
                if json {
                    out.json(
                        json!({ "forgot": g.roster.name, "id": g.id.to_hex(), "messages": n }),
                    );
                } else {
                    out.out(format!(
                        "forgot {} and its {n} message(s)",
                        name(&g.roster.name)
                    ));
                }
            }
            GroupCommand::Rename { group, name: words } => {
                let g = resolve_group(&self.store, &group)?;
                let done = self
                    .change(&g, GroupChange::Rename(words.join(" ")))
                    .await?;
                report_change(out, json, &g, "renamed", &done);
            }
            GroupCommand::Admin {
                group,
                member,
                revoke,
            } => {
                let g = resolve_group(&self.store, &group)?;
                let peer = self.member(&g, &member)?;
                let done = self.change(&g, GroupChange::Admin(peer, !revoke)).await?;
                let what = if revoke { "not_admin" } else { "admin" };
                report_change(out, json, &g, what, &done);
            }
            GroupCommand::Timer { group, duration } => {
                let g = resolve_group(&self.store, &group)?;
                let Some(duration) = duration else {
                    let secs = g.roster.timer_secs;
                    if json {
                        out.json(json!({ "group": g.roster.name, "timer_secs": secs }));
                    } else if secs == 0 {
                        out.out(format!(
                            "messages in {} stay (no timer)",
                            name(&g.roster.name)
                        ));
                    } else {
                        out.out(format!(
                            "messages in {} disappear {} after they arrive",
                            name(&g.roster.name),
                            super::describe_duration(secs)
                        ));
                    }
                    return Ok(());
                };
                let secs = super::parse_duration(&duration).or_else(fail)?;
                let done = self.change(&g, GroupChange::Timer(secs)).await?;
                report_change(out, json, &g, "timer", &done);
            }
            GroupCommand::Relays {
                group,
                addrs,
                none,
                unchecked,
            } => {
                let g = resolve_group(&self.store, &group)?;
                if addrs.is_empty() && !none {
                    let relays: Vec<String> =
                        g.roster.relays.iter().map(|a| a.to_string()).collect();
                    let status = match self.store.group(&g.id)? {
                        Some(record) => crate::engine::large_status(&record, &g.roster),
                        None => None,
                    };
                    if json {
                        out.json(json!({
                            "group": g.roster.name,
                            "relays": relays,
                            "status": status,
                        }));
                    } else if relays.is_empty() {
                        out.out(format!(
                            "{} has no group relays: each message is sealed to each member (at most {} members)",
                            name(&g.roster.name),
                            kkachi_protocol::group::SMALL_GROUP_MAX
                        ));
                    } else {
                        out.out(format!("{} keeps its messages on:", name(&g.roster.name)));
                        for r in &relays {
                            out.out(format!("  {r}"));
                        }
                        if let Some(status) = status {
                            out.warn(status);
                        }
                    }
                    return Ok(());
                }
                let mut relays = Vec::new();
                for a in &addrs {
                    let addr: kkachi_protocol::Multiaddr = a
                        .parse()
                        .or_else(|e| fail(format!("{a} is not a relay address: {e}")))?;
                    relays.push(addr);
                }
                if !unchecked {
                    self.check_group_relays(&relays).await?;
                }
                match relays.len() {
                    1 => out.warn(
                        "one group relay: losing it stops the group until it returns; name three run by different people",
                    ),
                    2 => out.warn(
                        "two group relays: losing one leaves a single copy of each message, losing both stops the group; name three",
                    ),
                    _ => {}
                }
                let done = self.change(&g, GroupChange::Relays(relays)).await?;
                report_change(out, json, &g, "relays", &done);
            }
            GroupCommand::Mode { group, mode } => {
                let g = resolve_group(&self.store, &group)?;
                let mode = match mode.to_lowercase().as_str() {
                    "chat" => Mode::Chat,
                    "announcement" | "announce" => Mode::Announcement,
                    _ => {
                        return fail(
                            "the mode is `chat` (everyone posts) or `announcement` (only admins post)",
                        );
                    }
                };
                let done = self.change(&g, GroupChange::Mode(mode)).await?;
                report_change(out, json, &g, "mode", &done);
            }
            GroupCommand::List => {
                let me = *self.identity()?.public().ed25519();
                let all = groups(&self.store)?;
                if json {
                    let list: Vec<_> = all
                        .iter()
                        .map(|g| {
                            json!({
                                "id": g.id.to_hex(),
                                "name": g.roster.name,
                                "members": g.roster.members.len(),
                                "role": g.roster.role(&me).map(|r| role_label(Some(r))),
                                "mode": mode_label(g.roster.mode),
                                "timer_secs": g.roster.timer_secs,
                            })
                        })
                        .collect();
                    out.json(serde_json::Value::Array(list));
                } else if all.is_empty() {
                    out.warn("no groups yet; `kkachi group create NAME` makes one");
                } else {
                    for g in &all {
                        out.out(format!(
                            "{}  {} member(s), {}{}  id {}",
                            name(&g.roster.name),
                            g.roster.members.len(),
                            role_label(g.roster.role(&me)),
                            match g.roster.mode {
                                Mode::Announcement => ", announcement channel",
                                Mode::Chat => "",
                            },
                            &g.id.to_hex()[..12]
                        ));
                    }
                }
            }
            GroupCommand::Members { group } => {
                let g = resolve_group(&self.store, &group)?;
                let me = self.identity()?.peer_id();
                let mut list = Vec::new();
                for m in g.roster.members.values() {
                    let peer = m.identity.peer_id();
                    let contact = self.store.added_contact(&peer)?;
                    list.push((peer, m, contact));
                }
                // You first, then admins, then by name.
                list.sort_by_key(|(peer, m, contact)| {
                    (
                        *peer != me,
                        m.role != Role::Admin,
                        contact
                            .as_ref()
                            .map_or(m.name.to_lowercase(), |c| c.name.to_lowercase()),
                    )
                });
                if json {
                    let items: Vec<_> = list
                        .iter()
                        .map(|(peer, m, contact)| {
                            json!({
                                "name": contact.as_ref().map_or(m.name.as_str(), |c| c.name.as_str()),
                                "name_in_group": m.name,
                                "peer_id": peer.to_string(),
                                "role": role_label(Some(m.role)),
                                "you": *peer == me,
                                "contact": contact.is_some(),
                                // A card of theirs is held (a contact's, or one a member
                                // passed on) and they are not blocked: they are sent to.
                                "reachable": (*peer != me).then(|| {
                                    matches!(self.store.contact(peer), Ok(Some(_)))
                                        && matches!(self.store.blocked(peer), Ok(None))
                                }),
                            })
                        })
                        .collect();
                    out.json(serde_json::Value::Array(items));
                } else {
                    out.out(format!(
                        "{} ({} member{}{})",
                        name(&g.roster.name),
                        list.len(),
                        if list.len() == 1 { "" } else { "s" },
                        match g.roster.mode {
                            Mode::Announcement => ", announcement channel",
                            Mode::Chat => "",
                        }
                    ));
                    let mut rows = Vec::new();
                    for (peer, m, _) in &list {
                        let shown = if *peer == me {
                            "you".to_string()
                        } else {
                            self.member_name(peer, &m.name)?
                        };
                        rows.push((name(&shown).into_owned(), role_label(Some(m.role))));
                    }
                    let width = rows
                        .iter()
                        .map(|(n, _)| n.chars().count())
                        .max()
                        .unwrap_or(0);
                    for (who, role) in rows {
                        let pad = width - who.chars().count();
                        out.out(format!("  {who}{}  {role}", " ".repeat(pad)));
                    }
                }
            }
        }
        Ok(())
    }

    /// `group receipts`: for one of our messages, each member's copy and how far it got.
    fn group_receipts(
        &self,
        g: &Group,
        message: Option<&str>,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        let ours: Vec<GroupMessage> = self
            .store
            .group_messages(&g.id)?
            .into_iter()
            .filter(|m| m.from.is_empty() && !m.event)
            .collect();
        let picked = match message {
            None | Some("last") => ours.last(),
            Some(prefix) if prefix.len() >= 6 => {
                let found: Vec<&GroupMessage> = ours
                    .iter()
                    .filter(|m| hex(&m.message.id).starts_with(&prefix.to_lowercase()))
                    .collect();
                match found.as_slice() {
                    [one] => Some(*one),
                    [] => None,
                    _ => return fail("several of your messages start so; give more of the id"),
                }
            }
            Some(_) => return fail("name the message by its id (6 characters or more) or `last`"),
        };
        let Some(m) = picked else {
            return fail(format!(
                "no message of yours in {} {}",
                name(&g.roster.name),
                if message.is_some() {
                    "has that id"
                } else {
                    "yet"
                }
            ));
        };
        // In a large group, each member's have says whether they hold it.
        let copies: Vec<(Vec<u8>, MessageState)> = if m.post_seq == 0 {
            m.copies.clone()
        } else {
            let me = *self.identity()?.public().ed25519();
            g.roster
                .members
                .iter()
                .filter(|(k, _)| **k != me)
                .map(|(k, member)| {
                    let ack = g.record.large.acks.iter().find(|(a, ..)| a == k);
                    let held = ack.is_some_and(|(_, head, ..)| *head >= m.post_seq);
                    let read = ack.is_some_and(|(_, _, read, _)| *read >= m.post_seq);
                    let state = match (held, read, m.message.state) {
                        (_, true, _) => MessageState::Read,
                        (true, false, _) => MessageState::Delivered,
                        (false, false, s @ MessageState::Relayed { .. }) => s,
                        (false, false, _) => MessageState::Queued,
                    };
                    (member.identity.peer_id().to_bytes(), state)
                })
                .collect()
        };
        let mut rows = Vec::new();
        for (peer, state) in &copies {
            let Ok(peer) = PeerId::from_bytes(peer) else {
                continue;
            };
            let in_group = g
                .roster
                .members
                .values()
                .chain(std::iter::empty())
                .find(|x| x.identity.peer_id() == peer)
                .map_or(String::new(), |x| x.name.clone());
            let who = self.member_name(&peer, &in_group)?;
            let member = g
                .roster
                .members
                .values()
                .any(|x| x.identity.peer_id() == peer);
            let label = match state {
                _ if !member => "not a member any more",
                MessageState::Read => "read",
                MessageState::Delivered => "delivered",
                MessageState::Relayed { .. } if m.post_seq != 0 => {
                    "on the group's relays, not on their device yet"
                }
                MessageState::Relayed { .. } => "on their relays, not on their device yet",
                _ => "not sent yet (in your outbox)",
            };
            rows.push((who, peer, *state, label));
        }
        // Who has not got it first: that is who to reach another way.
        rows.sort_by_key(|(who, _, state, _)| {
            (
                matches!(state, MessageState::Delivered | MessageState::Read),
                *state == MessageState::Read,
                who.to_lowercase(),
            )
        });
        let (delivered, read) = m.tally();
        if json {
            let members: Vec<_> = rows
                .iter()
                .map(|(who, peer, state, _)| {
                    json!({ "name": who, "peer_id": peer.to_string(), "state": state.label() })
                })
                .collect();
            out.json(json!({
                "id": hex(&m.message.id),
                "text": m.message.text,
                "delivered_to": delivered,
                "read_by": read,
                "members": members,
            }));
            return Ok(());
        }
        out.out(format!(
            "{} (message {}): delivered to {delivered} of {}, read by {read}",
            super::messages::shown_text(&m.message)
                .lines()
                .next()
                .unwrap_or_default(),
            &hex(&m.message.id)[..12],
            m.audience()
        ));
        let width = rows
            .iter()
            .map(|(w, ..)| w.chars().count())
            .max()
            .unwrap_or(0);
        for (who, _, _, label) in &rows {
            let shown = name(who);
            let pad = width.saturating_sub(shown.chars().count());
            out.out(format!("  {shown}{}  {label}", " ".repeat(pad)));
        }
        Ok(())
    }

    /// Makes a change and delivers it (what does not go now waits in the outbox).
    async fn change(
        &mut self,
        g: &Group,
        change: GroupChange,
    ) -> Result<GroupChanged, CommandError> {
        let engine = self.engine()?;
        let done = engine.change_group(g.id, change).await?;
        engine.deliver_now().await?;
        Ok(done)
    }

    /// How many members' copies of our group message `id` (of `copies`) a relay or the
    /// member took, delivering meanwhile, within `timeout` seconds.
    pub(super) async fn relayed_copies(
        &mut self,
        group: GroupId,
        id: kkachi_protocol::MessageId,
        copies: usize,
        timeout: f64,
    ) -> Result<usize, CommandError> {
        let engine = self.engine()?;
        let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
        let mut relayed = 0;
        loop {
            let _ = tokio::time::timeout_at(deadline.into(), engine.deliver_now()).await;
            let m = self
                .store
                .recent_group_messages(&group, 64)?
                .into_iter()
                .find(|m| m.message.id == id.0);
            relayed = m.as_ref().map_or(relayed, |m| {
                m.copies
                    .iter()
                    .filter(|(_, s)| *s != MessageState::Queued)
                    .count()
            });
            if relayed >= copies || Instant::now() >= deadline {
                return Ok(relayed);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks each of `relays` whether it answers and opens queues for anyone (every
    /// member opens the group's queues there): refused, naming the first that does not.
    async fn check_group_relays(
        &mut self,
        relays: &[kkachi_protocol::Multiaddr],
    ) -> Result<(), CommandError> {
        let engine = self.engine()?;
        use crate::net::Transport;
        let asked = futures::future::join_all(relays.iter().map(|addr| {
            let engine = engine.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(5),
                    engine
                        .net()
                        .request(addr, kkachi_protocol::ClientToRelay::Info),
                )
                .await
                .map_err(|_| "no answer within 5 s".to_owned())
                .and_then(|r| r.map_err(|e| super::drill::why_down(&e.to_string())))
            }
        }))
        .await;
        for (addr, answer) in relays.iter().zip(asked) {
            let shown = crate::sanitize::for_terminal(&addr.to_string()).into_owned();
            match answer {
                Ok(kkachi_protocol::RelayToClient::Info(info)) if info.open_policy == 0 => {}
                Ok(kkachi_protocol::RelayToClient::Info(_)) => {
                    return fail(format!(
                        "{shown} opens queues only for holders of its operator's access token: members could not open the group's queues there; name relays open to anyone"
                    ));
                }
                Ok(_) => {
                    return fail(format!("{shown} does not answer as a kkachi relay"));
                }
                Err(why) => {
                    return fail(format!(
                        "{shown} does not answer ({}); start it or name another, or set it anyway with --unchecked",
                        crate::sanitize::for_terminal(&why)
                    ));
                }
            }
        }
        Ok(())
    }

    /// How many of the `total` group relays of `group` took message `id` (a post to a
    /// group with group relays), waiting at most `timeout` seconds for all of them.
    pub(super) async fn relayed_on_group_relays(
        &mut self,
        group: GroupId,
        id: kkachi_protocol::MessageId,
        total: usize,
        timeout: f64,
    ) -> Result<usize, CommandError> {
        let engine = self.engine()?;
        let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
        let mut relayed = 0;
        // Once one relay has it, the others only briefly: a relay that is down does not
        // hold the sender up (the outbox goes on with it).
        let mut first: Option<Instant> = None;
        // Delivery runs while the message's state is looked at every 50 ms: one relay
        // that hangs holds the delivery up, not the count.
        let deliver = engine.deliver_now();
        tokio::pin!(deliver);
        let mut delivering = true;
        while relayed < total {
            tokio::select! {
                _ = &mut deliver, if delivering => delivering = false,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    // Done: another round for what is left (a relay that failed).
                    if !delivering {
                        deliver.set(engine.deliver_now());
                        delivering = true;
                    }
                }
            }
            let m = self
                .store
                .recent_group_messages(&group, 64)?
                .into_iter()
                .find(|m| m.message.id == id.0);
            relayed = match m.map(|m| m.message.state) {
                Some(MessageState::Relayed { relayed, .. }) => usize::from(relayed),
                Some(MessageState::Delivered | MessageState::Read) => total,
                _ => relayed,
            };
            if relayed > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            let until = first.map_or(deadline, |t| {
                (t + super::messages::STRAGGLER_GRACE).min(deadline)
            });
            if relayed >= total || Instant::now() >= until {
                break;
            }
        }
        Ok(relayed)
    }

    /// `send GROUP TEXT`: sealed to every member; exits once it is durable, after
    /// reporting how many members' relays took their copy within the timeout.
    pub(super) async fn send_to_group(
        &mut self,
        g: Group,
        args: SendArgs,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        if args.reply.is_some() {
            return fail("--reply goes to a contact's message, not to a group's");
        }
        // `send Hiking Club hi`: the words after the first may be the rest of the
        // group's name (the longest that names a group decides; another group's is
        // refused, not guessed).
        let mut words: &[String] = &args.text;
        for taken in (1..args.text.len()).rev() {
            let longer = format!("{} {}", args.contact, args.text[..taken].join(" "));
            let Ok(Some((other, _))) = find_group(&self.store, &longer) else {
                continue;
            };
            if other.roster.name.to_lowercase() != longer.to_lowercase() {
                continue;
            }
            if other.id != g.id {
                return fail(format!(
                    "did you mean {} or {}? Quote the name: kkachi send \"{}\" …",
                    name(&g.roster.name),
                    name(&other.roster.name),
                    name(&other.roster.name)
                ));
            }
            words = &args.text[taken..];
            break;
        }
        let text = words.join(" ");
        if let Some(payload) = crate::commands::files::Payload::of(&args) {
            return self
                .send_file(
                    crate::files::To::Group(g.id),
                    &g.roster.name,
                    payload,
                    &text,
                    args.timeout,
                    json,
                    out,
                )
                .await;
        }
        let engine = self.engine()?;
        let sent = engine.send_group(g.id, text).await?;
        if !g.roster.relays.is_empty() {
            return self
                .sent_to_large_group(g, sent, args.timeout, json, out)
                .await;
        }
        // Durable now: the exit status says so. Then how far the copies got.
        let relayed = self
            .relayed_copies(g.id, sent.id, sent.copies, args.timeout)
            .await?;
        if json {
            out.json(json!({
                "id": sent.id.to_hex(),
                "group": g.roster.name,
                "group_id": g.id.to_hex(),
                "members": sent.copies,
                "relayed": relayed,
                "unreachable": sent.unreachable,
                "state": if sent.copies == 0 { "sent" } else if relayed == 0 { "queued" } else { "relayed" },
            }));
        } else {
            out.out(format!(
                "sent to {}: relayed for {relayed} of {} member(s) (message {})",
                name(&g.roster.name),
                sent.copies,
                sent.id.to_hex()
            ));
            if sent.copies == 0 && sent.unreachable.is_empty() {
                out.warn(format!(
                    "nobody else is in {} yet: add members with `kkachi group add {} CONTACT…`",
                    name(&g.roster.name),
                    short(&g.id)
                ));
            }
            if relayed < sent.copies {
                out.out("  the rest stays in the outbox: `kkachi sync` or the daemon delivers it");
            }
        }
        if !sent.unreachable.is_empty() {
            out.warn(format!(
                "not sent to {}: blocked, or their card has not reached you yet (the member who added them passes it on)",
                sent.unreachable
                    .iter()
                    .map(|n| name(n).into_owned())
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        Ok(())
    }

    /// `send GROUP TEXT` in a group with group relays: one copy per group relay, read
    /// by every member; reports how many relays took it within the timeout.
    async fn sent_to_large_group(
        &mut self,
        g: Group,
        sent: crate::engine::GroupSent,
        timeout: f64,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        let total = g.roster.relays.len();
        // Nothing went while it waits for a key: nothing to count.
        let relayed = if sent.copies > 0 {
            self.relayed_on_group_relays(g.id, sent.id, total, timeout)
                .await?
        } else {
            0
        };
        if json {
            out.json(json!({
                "id": sent.id.to_hex(),
                "group": g.roster.name,
                "group_id": g.id.to_hex(),
                "members": sent.copies,
                "relays": total,
                "relayed": relayed,
                "unreachable": sent.unreachable,
                "state": if sent.copies == 0 { "waiting" } else if relayed == 0 { "queued" } else { "relayed" },
            }));
            return Ok(());
        }
        if sent.copies == 0 {
            out.out(format!(
                "kept for {}: it goes once an admin hands out the group's new key (message {})",
                name(&g.roster.name),
                sent.id.to_hex()
            ));
            return Ok(());
        }
        out.out(format!(
            "sent to {}: on {relayed} of {total} group relay(s), for {} member(s) (message {})",
            name(&g.roster.name),
            sent.copies,
            sent.id.to_hex()
        ));
        if relayed == 0 {
            out.warn(format!(
                "no group relay of {} took it yet: it stays in your outbox; `kkachi group relays {}` shows them, and `kkachi sync` tries again",
                name(&g.roster.name),
                short(&g.id)
            ));
        } else if relayed < total {
            out.out("  the rest stays in the outbox: `kkachi sync` or the daemon delivers it");
        }
        Ok(())
    }

    /// `history GROUP`: every message in the order members show them.
    pub(super) fn group_history(
        &self,
        g: &Group,
        last: Option<usize>,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        let me = self.identity()?.peer_id();
        let mut messages = self.store.group_messages(&g.id)?;
        if let Some(n) = last {
            let skip = messages.len().saturating_sub(n);
            messages.drain(..skip);
        }
        if json {
            let list: Vec<_> = messages
                .iter()
                .map(|m| group_message_json(self, g, &me, m))
                .collect::<Result<_, _>>()?;
            out.json(serde_json::Value::Array(list));
            return Ok(());
        }
        let mut times = LocalTimes::default();
        for m in &messages {
            let mut line = String::new();
            times.push_long(&mut line, m.message.sent_at_ms);
            if m.event {
                line.push_str(&format!("  — {}", for_terminal(&m.message.text)));
                out.out(line);
                continue;
            }
            let who = match m.author() {
                Some(peer) => self.member_name(&peer, &m.name)?,
                None => "me".into(),
            };
            line.push_str(&format!(
                "  {}: {}",
                name(&who),
                super::messages::shown_text(&m.message)
            ));
            if m.unseen {
                line.push_str(
                    "  [sent after you were removed: members may not have been shown it]",
                );
            } else if m.author().is_none() {
                let (delivered, read) = m.tally();
                line.push_str(&format!(
                    "  [delivered {delivered}/{n}{}]",
                    if read > 0 {
                        format!(", read {read}/{}", m.audience())
                    } else {
                        String::new()
                    },
                    n = m.audience()
                ));
            }
            out.out(line);
        }
        if messages.is_empty() {
            out.warn(format!("no messages in {} yet", name(&g.roster.name)));
        }
        if g.record.dropped > 0 {
            out.out(format!(
                "  ⚠ {} message(s) from people who may not post here were dropped",
                g.record.dropped
            ));
        }
        // A large group's gaps: messages of an author numbered below one shown.
        for chain in &g.record.large.chains {
            let missing = chain.missing();
            if missing == 0 {
                continue;
            }
            let who = match g.roster.members.get(&chain.author) {
                Some(m) => self.member_name(&m.identity.peer_id(), &m.name)?,
                None => "a former member".into(),
            };
            out.out(format!(
                "  ⚠ {missing} earlier message(s) from {} have not arrived yet",
                name(&who)
            ));
        }
        if let Some(status) = crate::engine::large_status(&g.record, &g.roster) {
            out.out(format!("  ⚠ {status}"));
        }
        if !g.record.waiting.is_empty() {
            // Whose: a member's add (or promotion) may be on its way; someone removed
            // stays here until the week is up.
            let mut from: Vec<String> = g
                .record
                .waiting
                .iter()
                .map(|w| match w.message.author() {
                    Some(p) => self
                        .member_name(&p, &w.message.name)
                        .unwrap_or_else(|_| w.message.name.clone()),
                    None => w.message.name.clone(),
                })
                .map(|n| name(&n).into_owned())
                .collect();
            from.sort();
            from.dedup();
            out.out(format!(
                "  ⚠ {} message(s) from {} wait until the group's changes let them post here (shown then, or dropped after a week)",
                g.record.waiting.len(),
                from.join(", ")
            ));
        }
        Ok(())
    }
}

/// A group message as `history GROUP --json` shows it: the fields of a contact's
/// message, the sender in `from`, the group, and for ours how many members have it.
fn group_message_json(
    app: &App,
    g: &Group,
    me: &PeerId,
    m: &GroupMessage,
) -> Result<serde_json::Value, CommandError> {
    let author = m.author();
    let peer = author.unwrap_or(*me);
    let from = match author {
        Some(p) if m.event => match app.store.added_contact(&p)? {
            Some(c) => Some(c.name),
            None => None,
        },
        Some(p) => Some(app.member_name(&p, &m.name)?),
        None if m.event => None,
        None => Some(m.name.clone()),
    };
    let mut v = message_json(&g.roster.name, &peer, &m.message);
    v["from"] = json!(from);
    v["event"] = json!(m.event);
    if m.event {
        v["direction"] = json!("event");
    }
    v["group"] = json!(g.roster.name);
    v["group_id"] = json!(g.id.to_hex());
    if author.is_none() && !m.event {
        let (delivered, read) = m.tally();
        v["unseen"] = json!(m.unseen);
        v["members"] = json!(m.audience());
        v["delivered_to"] = json!(delivered);
        v["read_by"] = json!(read);
    }
    Ok(v)
}

fn report_change(out: &mut Output, json: bool, g: &Group, what: &str, done: &GroupChanged) {
    if json {
        out.json(json!({
            "group": g.roster.name,
            "id": g.id.to_hex(),
            "change": if done.changed.is_empty() { "none" } else { what },
            "who": done.changed,
            "told": done.told,
            "unreachable": done.unreachable,
            "unchanged": done.skipped,
        }));
        return;
    }
    let list = |names: &[String]| {
        names
            .iter()
            .map(|n| name(n).into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !done.changed.is_empty() {
        let did = match what {
            "added" => format!("added {}", list(&done.changed)),
            "removed" => format!("removed {}", list(&done.changed)),
            "renamed" => format!("renamed to {}", list(&done.changed)),
            "admin" => format!("{} made admin", list(&done.changed)),
            "not_admin" => format!("{} no longer admin", list(&done.changed)),
            "timer" => match done.changed.first().and_then(|s| s.parse::<u32>().ok()) {
                Some(0) | None => "disappearing messages off".into(),
                Some(secs) => format!(
                    "messages now disappear {} after they arrive",
                    super::describe_duration(secs)
                ),
            },
            "relays" => match done.changed.first().map(String::as_str) {
                Some("0 relays") => "no group relays: each message is sealed to each member".into(),
                _ => format!(
                    "the group now keeps its messages on {}",
                    list(&done.changed)
                ),
            },
            "mode" => match done.changed.first().map(String::as_str) {
                Some("announcement") => "now an announcement channel: only admins post".into(),
                _ => "every member posts now".into(),
            },
            other => format!("{other} {}", list(&done.changed)),
        };
        out.out(format!(
            "{}: {did}; {} member(s) told",
            name(&g.roster.name),
            done.told
        ));
    }
    for skipped in &done.skipped {
        out.out(format!(
            "{}: nothing to do, {}",
            name(&g.roster.name),
            name(skipped)
        ));
    }
    if !done.unreachable.is_empty() {
        out.warn(format!(
            "not told (blocked, or their card has not reached you yet): {}",
            list(&done.unreachable)
        ));
    }
}

/// Lower-case hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A group's id as shown for naming it in commands: its first 12 hex digits.
fn short(id: &GroupId) -> String {
    id.to_hex()[..12].to_string()
}
