//! What each command does. Commands write to an [`Output`] rather than the terminal,
//! so the same code runs in a one-shot process or, forwarded, inside a running daemon.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kkachi_protocol::wire::RelayInfo;
use kkachi_protocol::{Card, ClientToRelay, Identity, MessageId, Multiaddr, PeerId, RelayToClient};
use serde_json::json;

use crate::cli::{Command, ContactCommand, RelayCommand, SendArgs};
use crate::engine::{ATTEMPT_TIMEOUT, AppEvent, Engine, Received, now_ms};
use crate::net::{Network, Transport, peer_of};
use crate::store::{
    Contact, Direction, LocalStore, MessageRecord, MessageState, Profile, WriteSet,
};
use crate::time::{LocalTimes, format_ms};

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
        self.out(value.to_string());
    }
}

/// A failure the user can act on: printed to stderr, exit code 1.
#[derive(Debug, Clone)]
pub struct UserError(pub String);

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for UserError {
    fn from(e: E) -> Self {
        UserError(e.to_string())
    }
}

fn fail<T>(message: impl Into<String>) -> Result<T, UserError> {
    Err(UserError(message.into()))
}

/// Everything a command may use: the store, the identity, and (once started) the
/// network and engine.
pub struct App {
    store: LocalStore,
    engine: Option<Arc<Engine<Network>>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("home", &self.store.home())
            .finish_non_exhaustive()
    }
}

/// After the first acknowledgement, how long `send` waits for slower relays.
const STRAGGLER_GRACE: Duration = Duration::from_millis(500);

const NO_IDENTITY: &str = "no identity yet: create one with `kkachi init --name NAME`";

impl App {
    /// Commands over an opened store; the network starts when a command needs it.
    pub fn new(store: LocalStore) -> Self {
        Self {
            store,
            engine: None,
        }
    }

    /// Commands inside a running daemon, sharing its engine.
    pub fn online(engine: Arc<Engine<Network>>) -> Self {
        Self {
            store: engine.store().clone(),
            engine: Some(engine),
        }
    }

    fn identity(&self) -> Result<Identity, UserError> {
        self.store
            .identity()?
            .ok_or_else(|| UserError(NO_IDENTITY.into()))
    }

    fn profile(&self) -> Result<Profile, UserError> {
        self.store
            .profile()?
            .ok_or_else(|| UserError(NO_IDENTITY.into()))
    }

    /// The engine, starting the network if this process has none yet.
    pub fn engine(&mut self) -> Result<Arc<Engine<Network>>, UserError> {
        if let Some(e) = &self.engine {
            return Ok(e.clone());
        }
        let me = self.identity()?;
        let engine =
            crate::runtime::start_engine(self.store.clone(), me, crate::runtime::net_config())?;
        self.engine = Some(engine.clone());
        Ok(engine)
    }

    /// Runs one command (not `daemon` or `tui`, which the binary handles).
    pub async fn run(&mut self, command: Command, json: bool) -> Result<Output, UserError> {
        let mut out = Output::default();
        match command {
            Command::Init { name } => self.init(&name, json, &mut out)?,
            Command::Relay(RelayCommand::Add { addrs }) => {
                self.relay_add(&addrs, json, &mut out).await?
            }
            Command::Relay(RelayCommand::List) => self.relay_list(json, &mut out).await?,
            Command::Relay(RelayCommand::Remove { addr }) => {
                self.relay_remove(&addr, json, &mut out).await?
            }
            Command::Invite { qr } => self.invite(qr, json, &mut out)?,
            Command::Contact(ContactCommand::Add { code, name }) => {
                self.contact_add(&code, name, json, &mut out)?
            }
            Command::Contact(ContactCommand::List) => self.contact_list(json, &mut out)?,
            Command::Send(args) => self.send(args, json, &mut out).await?,
            Command::Sync { timeout } => self.sync(timeout, json, &mut out).await?,
            Command::History { contact, last } => self.history(&contact, last, json, &mut out)?,
            Command::Daemon | Command::Tui => {
                return fail("a kkachi daemon or UI is already running for this home");
            }
            Command::Demo => {
                return fail("`kkachi demo` runs on its own, in a temporary home");
            }
        }
        Ok(out)
    }

    fn init(&self, name: &str, json: bool, out: &mut Output) -> Result<(), UserError> {
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
        self.store.init_identity(
            &identity,
            &Profile {
                name: name.to_owned(),
                card_version: 1,
            },
        )?;
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

    fn own_card(&self) -> Result<Card, UserError> {
        let me = self.identity()?;
        let profile = self.profile()?;
        let relays = self
            .store
            .relays()?
            .iter()
            .filter_map(|r| r.addr.parse().ok())
            .collect();
        Ok(Card::new(&me, &profile.name, relays, profile.card_version)?)
    }

    /// After a relay change: a new card version, sent to every contact in-band.
    async fn announce_card(&mut self, out: &mut Output) -> Result<(), UserError> {
        let mut profile = self.profile()?;
        profile.card_version += 1;
        let mut w = WriteSet::default();
        w.put_record(crate::store::TreeId::Meta, b"profile".to_vec(), &profile);
        self.store.apply(w)?;
        let card = self.own_card()?;
        let contacts = self.store.contacts()?;
        if contacts.is_empty() {
            return Ok(());
        }
        let engine = self.engine()?;
        engine.queue_card_updates(&card).await?;
        engine.deliver_due().await?;
        out.warn(format!(
            "your new relays were sent to {} contact(s)",
            contacts.len()
        ));
        Ok(())
    }

    async fn relay_add(
        &mut self,
        addrs: &[String],
        json: bool,
        out: &mut Output,
    ) -> Result<(), UserError> {
        self.identity()?;
        let mut parsed = Vec::new();
        for a in addrs {
            let addr: Multiaddr = a
                .parse()
                .map_err(|e| UserError(format!("{a:?} is not a multiaddr ({e}); expected e.g. /ip4/203.0.113.5/tcp/4040/p2p/12D3KooW...")))?;
            if peer_of(&addr).is_none() {
                return fail(format!(
                    "{a} must end with /p2p/<relay peer id> (the relay prints its full address when it starts)"
                ));
            }
            parsed.push(addr);
        }
        let mut added = Vec::new();
        for addr in &parsed {
            if self.store.add_relay(addr)? {
                added.push(addr.to_string());
            } else {
                out.warn(format!("{addr} is already one of your relays"));
            }
        }
        if !added.is_empty() {
            self.announce_card(out).await?;
        }
        if json {
            out.json(json!({ "added": added }));
        } else {
            for a in &added {
                out.out(format!("added relay {a}"));
            }
            if !added.is_empty() {
                out.out(
                    "check they answer with `kkachi relay list`; share your new `kkachi invite`",
                );
            }
        }
        Ok(())
    }

    async fn relay_remove(
        &mut self,
        addr: &str,
        json: bool,
        out: &mut Output,
    ) -> Result<(), UserError> {
        self.identity()?;
        if !self.store.remove_relay(addr)? {
            return fail(format!(
                "{addr} is not one of your relays; `kkachi relay list` shows them"
            ));
        }
        self.announce_card(out).await?;
        if json {
            out.json(json!({ "removed": addr }));
        } else {
            out.out(format!("removed relay {addr}"));
        }
        Ok(())
    }

    async fn relay_list(&mut self, json: bool, out: &mut Output) -> Result<(), UserError> {
        self.identity()?;
        let relays = self.store.relays()?;
        if relays.is_empty() {
            if json {
                out.json(json!([]));
            }
            out.warn("no relays yet: people can reach you only on your local network. Add some with `kkachi relay add ADDR`.");
            return Ok(());
        }
        let engine = self.engine()?;
        let probes = relays.iter().map(|r| {
            let engine = engine.clone();
            let addr = r.addr.clone();
            async move {
                let started = Instant::now();
                let result = match addr.parse::<Multiaddr>() {
                    Ok(a) => tokio::time::timeout(
                        Duration::from_secs(3),
                        engine.net().request(&a, ClientToRelay::Info),
                    )
                    .await
                    .map_err(|_| "no answer within 3 s".to_string())
                    .and_then(|r| r.map_err(|e| e.to_string())),
                    Err(e) => Err(e.to_string()),
                };
                (addr, result, started.elapsed())
            }
        });
        let results = futures::future::join_all(probes).await;
        let mut rows = Vec::new();
        for (addr, result, took) in results {
            let info: Option<RelayInfo> = match &result {
                Ok(RelayToClient::Info(info)) => Some(info.clone()),
                _ => None,
            };
            if let Some(info) = &info {
                self.store.update_relay(&addr, |r| {
                    r.name = info.name.clone();
                    r.failure_domain = info.failure_domain.clone();
                    r.last_ok_ms = Some(now_ms());
                    r.last_error = None;
                })?;
            }
            let record = self.store.relays()?.into_iter().find(|r| r.addr == addr);
            let domain = record
                .as_ref()
                .map(|r| r.failure_domain.clone())
                .unwrap_or_default();
            let name = record.as_ref().map(|r| r.name.clone()).unwrap_or_default();
            let status = match (&info, &result) {
                (Some(_), _) => format!("up ({} ms)", took.as_millis()),
                (None, Err(e)) => format!("down: {e}"),
                (None, Ok(other)) => format!("down: unexpected answer {other:?}"),
            };
            rows.push((addr, name, domain, info.is_some(), status, took));
        }
        if json {
            let list: Vec<_> = rows
                .iter()
                .map(|(addr, name, domain, up, status, took)| {
                    json!({ "addr": addr, "name": name, "failure_domain": domain, "up": up,
                            "status": status, "latency_ms": if *up { Some(took.as_millis() as u64) } else { None } })
                })
                .collect();
            out.json(serde_json::Value::Array(list));
        } else {
            for (addr, name, domain, _, status, _) in &rows {
                let domain = if domain.is_empty() {
                    "(no failure domain)"
                } else {
                    domain
                };
                let name = if name.is_empty() { "" } else { name };
                out.out(format!("{status:<16} {domain:<24} {name:<16} {addr}"));
            }
        }
        for warning in failure_domain_warnings(rows.iter().map(|r| r.2.as_str())) {
            out.warn(format!("warning: {warning}"));
        }
        Ok(())
    }

    fn invite(&self, qr: bool, json: bool, out: &mut Output) -> Result<(), UserError> {
        let card = self.own_card()?;
        let code = card.to_invite();
        if card.relays().is_empty() {
            out.warn("note: you have no relays, so this code reaches you only on your local network; add relays with `kkachi relay add ADDR`");
        }
        if json {
            out.json(json!({ "invite": code, "peer_id": card.identity().peer_id().to_string(), "version": card.version() }));
        } else {
            out.out(&code);
            if qr {
                out.out(crate::qr::render(&code)?);
            }
        }
        Ok(())
    }

    fn contact_add(
        &self,
        code: &str,
        name: Option<String>,
        json: bool,
        out: &mut Output,
    ) -> Result<(), UserError> {
        let me = self.identity()?;
        let card = Card::from_invite(code)?;
        let peer = card.identity().peer_id();
        if peer == me.peer_id() {
            return fail("that is your own invite code");
        }
        let contacts = self.store.contacts()?;
        let existing = contacts.iter().find(|c| c.peer == peer);
        let name = name
            .unwrap_or_else(|| existing.map_or_else(|| card.name().to_owned(), |c| c.name.clone()));
        if name.trim().is_empty() {
            return fail("the contact name is empty; choose one with --name");
        }
        if contacts
            .iter()
            .any(|c| c.peer != peer && c.name.eq_ignore_ascii_case(&name))
        {
            return fail(format!(
                "you already have a contact named {name}; choose another with --name"
            ));
        }
        let verb = match existing {
            Some(old) if card.supersedes(&old.card) => "updated",
            Some(old) if old.card.version() > card.version() => {
                return fail(format!(
                    "you already have a newer card for {} (version {} > {})",
                    old.name,
                    old.card.version(),
                    card.version()
                ));
            }
            Some(old) if old.name == name => {
                out.warn(format!("{name} is already a contact"));
                "kept"
            }
            Some(_) => "renamed",
            None => "added",
        };
        let contact = Contact {
            peer,
            name: name.clone(),
            card: card.clone(),
        };
        let mut w = WriteSet::default();
        LocalStore::write_contact(&mut w, &contact);
        self.store.apply(w)?;
        if json {
            out.json(json!({ "name": name, "peer_id": peer.to_string(), "relays": card.relays().len(), "status": verb }));
        } else if verb != "kept" {
            out.out(format!(
                "{verb} contact {name} ({peer}, {} relays)",
                card.relays().len()
            ));
        }
        Ok(())
    }

    fn contact_list(&self, json: bool, out: &mut Output) -> Result<(), UserError> {
        self.identity()?;
        let contacts = self.store.contacts()?;
        if json {
            let list: Vec<_> = contacts
                .iter()
                .map(|c| json!({ "name": c.name, "peer_id": c.peer.to_string(), "card_name": c.card.name(),
                                 "relays": c.card.relays().iter().map(|r| r.to_string()).collect::<Vec<_>>() }))
                .collect();
            out.json(serde_json::Value::Array(list));
        } else if contacts.is_empty() {
            out.warn("no contacts yet: add one with `kkachi contact add CODE`");
        } else {
            for c in contacts.iter() {
                out.out(format!(
                    "{:<20} {} ({} relays)",
                    c.name,
                    c.peer,
                    c.card.relays().len()
                ));
            }
        }
        Ok(())
    }

    /// Finds a contact by name (case-insensitive), full peer id, or unique peer id prefix.
    pub fn resolve(&self, who: &str) -> Result<Contact, UserError> {
        resolve_contact(&self.store, who)
    }

    async fn send(
        &mut self,
        args: SendArgs,
        json: bool,
        out: &mut Output,
    ) -> Result<(), UserError> {
        let contact = self.resolve(&args.contact)?;
        let engine = self.engine()?;
        // Another delivery (a running daemon's outbox pass) may hand it over first.
        let mut events = engine.subscribe();
        let queued = engine.send_text(&contact, &args.text).await?;
        // Durable now. Deliver within the timeout; once one path has it, wait only
        // briefly for the others (a dead relay must not hold the sender up). Whatever
        // does not make it stays in the outbox for `sync` or the daemon.
        let deadline = Instant::now() + Duration::from_secs_f64(args.timeout.max(0.0));
        let mut progress = None;
        let mut delivered = false;
        let mut direct = false;
        while Instant::now() < deadline {
            let attempt = deadline
                .saturating_duration_since(Instant::now())
                .min(ATTEMPT_TIMEOUT);
            let round = {
                let engine = engine.clone();
                let key = queued.outbox_key;
                tokio::spawn(async move { engine.deliver(key, true, attempt).await })
            };
            let mut first_ack: Option<Instant> = None;
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                match engine.progress(queued.outbox_key)? {
                    // Gone from the outbox: handed over directly (or a receipt came).
                    None => delivered = true,
                    Some(p) => progress = Some(p),
                }
                let acked = delivered || progress.is_some_and(|p| p.acked > 0);
                if acked && first_ack.is_none() {
                    first_ack = Some(Instant::now());
                }
                let all = progress
                    .is_some_and(|p| p.acked as usize >= usize::from(p.total).max(1) || p.direct);
                let grace_over = first_ack.is_some_and(|t| t.elapsed() >= STRAGGLER_GRACE);
                if delivered
                    || all
                    || grace_over
                    || round.is_finished()
                    || Instant::now() >= deadline
                {
                    break;
                }
            }
            if delivered {
                // Gone from the outbox: handed over directly, or the contact's receipt
                // came back through the relays. This round says which once its other
                // paths answer, or the event of whichever delivery handed it over.
                let wait = STRAGGLER_GRACE.min(deadline.saturating_duration_since(Instant::now()));
                if let Ok(Ok(Ok(Some(p)))) = tokio::time::timeout(wait, round).await {
                    direct = p.direct;
                }
                direct |= handed_over(&mut events, &queued.id);
                break;
            }
            if progress.is_some_and(|p| p.acked > 0) {
                break;
            }
            if !round.is_finished() {
                let _ =
                    tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), round)
                        .await;
            }
            tokio::time::sleep(
                Duration::from_millis(300).min(deadline.saturating_duration_since(Instant::now())),
            )
            .await;
        }
        let (acked, total) = progress.map_or((0, contact.card.relays().len() as u8), |p| {
            (p.acked, p.total)
        });
        let state = if delivered {
            "delivered"
        } else if acked == 0 {
            "queued"
        } else {
            "relayed"
        };
        if json {
            out.json(
                json!({ "id": queued.id.to_hex(), "to": contact.name, "state": state,
                             "relayed": acked, "relays": total, "direct": direct }),
            );
        } else if delivered {
            out.out(format!(
                "delivered to {}{} (message {})",
                contact.name,
                if direct { " directly" } else { "" },
                queued.id
            ));
        } else if acked == 0 {
            out.out(format!(
                "queued for {} (message {}): no relay of theirs answered within {}s; it stays in your outbox and `kkachi sync` or `kkachi daemon` delivers it",
                contact.name, queued.id, args.timeout
            ));
        } else {
            out.out(format!(
                "sent to {}: relayed {}/{} (message {})",
                contact.name, acked, total, queued.id
            ));
        }
        Ok(())
    }

    async fn sync(&mut self, timeout: f64, json: bool, out: &mut Output) -> Result<(), UserError> {
        self.identity()?;
        let engine = self.engine()?;
        let limit = Duration::from_secs_f64(timeout.max(0.1));
        // Deliver everything pending (all paths, now), then fetch from every own relay.
        let keys: Vec<u64> = self.store.outbox()?.into_iter().map(|(k, _)| k).collect();
        let deliveries = keys
            .iter()
            .map(|k| engine.deliver(*k, true, limit.min(ATTEMPT_TIMEOUT)));
        let _ = tokio::time::timeout(limit, futures::future::join_all(deliveries)).await;
        let relays = self.store.relays()?;
        let fetches = relays.iter().map(|r| {
            let engine = engine.clone();
            let addr = r.addr.clone();
            async move {
                let result = match addr.parse::<Multiaddr>() {
                    Ok(a) => match tokio::time::timeout(limit, engine.sync_relay(&a, 0)).await {
                        Ok(r) => r,
                        Err(_) => Err(format!("no answer within {}s", limit.as_secs_f64())),
                    },
                    Err(e) => Err(e.to_string()),
                };
                (addr, result)
            }
        });
        let mut received: Vec<Received> = Vec::new();
        let mut reached = 0;
        for (addr, result) in futures::future::join_all(fetches).await {
            match result {
                Ok(mut got) => {
                    reached += 1;
                    received.append(&mut got);
                }
                Err(e) => out.warn(format!("relay {addr} unreachable: {e}")),
            }
        }
        // Receipts for what just arrived go out before we exit.
        let _ = tokio::time::timeout(limit, engine.deliver_due()).await;
        received.sort_by_key(|r| r.message.sent_at_ms);
        for r in &received {
            print_received(out, r, json);
        }
        let pending = self.store.outbox_len();
        if !json {
            out.warn(format!(
                "{} new message(s); {reached}/{} relays reached; {pending} item(s) waiting in the outbox",
                received.len(),
                relays.len()
            ));
        }
        Ok(())
    }

    fn history(
        &self,
        who: &str,
        last: Option<usize>,
        json: bool,
        out: &mut Output,
    ) -> Result<(), UserError> {
        let contact = self.resolve(who)?;
        let mut times = LocalTimes::default();
        let mut count = 0usize;
        let mut list = Vec::new();
        let mut each = |m: MessageRecord| {
            count += 1;
            if json {
                list.push(message_json(&contact, &m));
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
        if !conv.missing.is_empty() {
            out.out(format!(
                "  ⚠ {} message(s) from {} missing so far (their numbers {:?}); they may still arrive",
                conv.missing.len(),
                contact.name,
                conv.missing
            ));
        }
        if count == 0 {
            out.warn(format!("no messages with {} yet", contact.name));
        }
        Ok(())
    }
}

/// Finds a contact by name (case-insensitive), full peer id, or unique peer id prefix.
pub fn resolve_contact(store: &LocalStore, who: &str) -> Result<Contact, UserError> {
    if store.identity()?.is_none() {
        return fail(NO_IDENTITY);
    }
    let contacts = store.contacts()?;
    if let Some(c) = contacts.iter().find(|c| c.name.eq_ignore_ascii_case(who)) {
        return Ok(c.clone());
    }
    if let Ok(peer) = who.parse::<PeerId>()
        && let Some(c) = contacts.iter().find(|c| c.peer == peer)
    {
        return Ok(c.clone());
    }
    let by_prefix: Vec<&Contact> = contacts
        .iter()
        .filter(|c| who.len() >= 6 && c.peer.to_string().starts_with(who))
        .collect();
    match by_prefix.as_slice() {
        [one] => Ok((*one).clone()),
        [] => fail(format!(
            "no contact named {who:?}; `kkachi contact list` shows your contacts, `kkachi contact add CODE` adds one"
        )),
        many => fail(format!(
            "{who:?} matches {} contacts ({}); use more of the peer id",
            many.len(),
            many.iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Warnings about relays that can fail together (the lesson of a single building).
pub fn failure_domain_warnings<'a>(domains: impl Iterator<Item = &'a str>) -> Vec<String> {
    let domains: Vec<&str> = domains.collect();
    let mut warnings = Vec::new();
    if domains.len() == 1 {
        warnings.push("you have a single relay: when it is down, mail waits until it returns. Add a second, run by someone else.".to_string());
    }
    let known: Vec<&str> = domains.iter().copied().filter(|d| !d.is_empty()).collect();
    if domains.len() > 1 && known.len() == domains.len() && known.iter().all(|d| *d == known[0]) {
        warnings.push(format!(
            "all your relays are in failure domain {:?}: one outage there takes every one of them down. Add a relay run elsewhere.",
            known[0]
        ));
    }
    let unknown = domains.len() - known.len();
    if unknown > 0 && domains.len() > 1 {
        warnings.push(format!("{unknown} relay(s) did not report a failure domain (unreachable, or not configured by its operator)"));
    }
    warnings
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
    match m.direction {
        Direction::Out => {
            let _ = writeln!(
                out,
                "  me → {}: {}  [{}]",
                contact.name,
                m.text,
                StateText(&m.state)
            );
        }
        Direction::In => {
            let _ = writeln!(out, "  {}: {}", contact.name, m.text);
        }
    }
}

/// A message as JSON (history and daemon output).
pub fn message_json(contact: &Contact, m: &MessageRecord) -> serde_json::Value {
    let (relayed, relays) = match m.state {
        MessageState::Relayed { relayed, total } => (Some(relayed), Some(total)),
        _ => (None, None),
    };
    json!({
        "id": hex(&m.id),
        "contact": contact.name,
        "peer_id": contact.peer.to_string(),
        "direction": match m.direction { Direction::In => "in", Direction::Out => "out" },
        "text": m.text,
        "state": m.state.label(),
        "relayed": relayed,
        "relays": relays,
        "sent_at": m.sent_at_ms,
        "seq": m.seq,
    })
}

/// True if the events seen so far say message `id` was handed to its contact directly.
/// An event skipped because the receiver fell behind counts as not seen.
fn handed_over(events: &mut tokio::sync::broadcast::Receiver<AppEvent>, id: &MessageId) -> bool {
    use tokio::sync::broadcast::error::TryRecvError;
    loop {
        match events.try_recv() {
            Ok(AppEvent::HandedOver { id: handed, .. }) if handed == *id => return true,
            Ok(_) | Err(TryRecvError::Lagged(_)) => {}
            Err(TryRecvError::Empty | TryRecvError::Closed) => return false,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Prints an incoming message (sync and daemon).
pub fn print_received(out: &mut Output, r: &Received, json: bool) {
    if json {
        let mut v = json!({
            "id": hex(&r.message.id),
            "from": r.name,
            "peer_id": r.contact.to_string(),
            "direction": "in",
            "text": r.message.text,
            "state": r.message.state.label(),
            "sent_at": r.message.sent_at_ms,
            "seq": r.message.seq,
        });
        if !r.missing.is_empty() {
            v["missing"] = json!(r.missing);
        }
        out.json(v);
    } else {
        out.out(format!(
            "{}  {}: {}",
            format_ms(r.message.sent_at_ms),
            r.name,
            r.message.text
        ));
        if !r.missing.is_empty() {
            out.out(format!(
                "  ⚠ {} earlier message(s) from {} not received yet",
                r.missing.len(),
                r.name
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::failure_domain_warnings;

    #[test]
    fn warns_when_relays_can_fail_together() {
        let all_same = failure_domain_warnings(["aws/seoul", "aws/seoul", "aws/seoul"].into_iter());
        assert!(
            all_same.iter().any(|w| w.contains("\"aws/seoul\"")),
            "{all_same:?}"
        );
        let spread =
            failure_domain_warnings(["aws/seoul", "hetzner/fsn1", "home/busan"].into_iter());
        assert!(spread.is_empty(), "{spread:?}");
        let single = failure_domain_warnings(["aws/seoul"].into_iter());
        assert!(
            single.iter().any(|w| w.contains("single relay")),
            "{single:?}"
        );
        let unknown = failure_domain_warnings(["aws/seoul", ""].into_iter());
        assert!(
            unknown.iter().any(|w| w.contains("did not report")),
            "{unknown:?}"
        );
        assert!(
            !unknown.iter().any(|w| w.contains("all your relays")),
            "unknown domains are not assumed equal"
        );
    }
}
