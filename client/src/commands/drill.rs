//! `kkachi drill`: inspects what keeps messages flowing when something fails, and says
//! what to fix. Each of our relays is asked for its info and has a test envelope looped
//! through a queue of ours there alone; their failure domains, their clocks against
//! ours, our contacts' relays and the age of what waits in the outbox are checked. Exit
//! status 1 when there is a finding.
//!
//! With `--game-day`, each of our relays that is up is then taken out of use in turn,
//! inside the client (its transport refuses that relay, as when it is down), and the
//! test envelope is looped through all the others at once, as deliveries fan out: the
//! round passes when one of them carries it. Contacts reachable only through the relay
//! taken out are named.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use std::collections::HashSet;
use std::future::Future;

use futures::StreamExt;
use kkachi_protocol::envelope::CLOCK_SKEW_SECS;
use kkachi_protocol::wire::{Addressed, PutOutcome, RelayInfo};
use kkachi_protocol::{ClientToRelay, Envelope, Multiaddr, PeerId, QueueKind, RelayToClient};
use serde_json::json;

use super::{App, CommandError, Output};
use crate::engine::now_ms;
use crate::net::{NetError, Transport, peer_of};

/// Contacts' relays asked at once.
const PROBES_AT_ONCE: usize = 32;
/// Longest text of a relay's shown (its error messages are the relay's to choose).
const MAX_RELAY_TEXT: usize = 200;

/// How long one relay has to answer each request of the drill.
const ANSWER_WITHIN: Duration = Duration::from_secs(4);
/// A clock this far from a relay's is a finding: half of what relays tolerate.
pub(crate) const SKEW_FINDING_SECS: u64 = CLOCK_SKEW_SECS / 2;
/// Something waiting in the outbox longer than this is a finding.
pub(crate) const OUTBOX_FINDING_MS: u64 = 3600 * 1000;
/// A last backup older than this is a finding: a lost device would lose what came since.
pub(crate) const BACKUP_FINDING_MS: u64 = 30 * 24 * 3600 * 1000;

/// What the drill saw of one of our relays.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RelayCheck {
    pub(crate) addr: String,
    /// Its info, if it answered.
    pub(crate) info: Option<RelayInfo>,
    /// Why it did not, or why the loop failed.
    pub(crate) error: Option<String>,
    /// The round trip of the test envelope (grant, put, fetch), if it came back.
    pub(crate) loop_ms: Option<u64>,
    /// Our clock minus the relay's, seconds.
    pub(crate) skew_secs: Option<i64>,
}

/// What the drill saw of a contact's relays.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ContactCheck {
    pub(crate) name: String,
    pub(crate) relays: usize,
    pub(crate) reachable: usize,
}

/// One problem and what to do about it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Finding {
    pub(crate) what: String,
    pub(crate) fix: String,
}

/// One round of the game day: one of our relays out of use.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Round {
    /// The relay taken out.
    pub(crate) out: String,
    /// Our other relays that took the test envelope and gave it back meanwhile.
    pub(crate) carried_by: Vec<String>,
    /// How long until the first of them had (ms).
    pub(crate) first_ms: Option<u64>,
    /// Contacts none of whose relays answers us without it.
    pub(crate) stranded: Vec<String>,
}

/// Everything the drill checks, as data: the findings follow from it alone.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Report {
    pub(crate) relays: Vec<RelayCheck>,
    pub(crate) contacts: Vec<ContactCheck>,
    /// Outbox entries, and how long the oldest has waited (ms).
    pub(crate) outbox: (usize, u64),
    /// The game day's rounds, when one was asked for.
    pub(crate) game_day: Option<Vec<Round>>,
    /// How long ago the last backup was made (ms); `None`: never.
    pub(crate) backup_age_ms: Option<u64>,
}

impl Report {
    /// The problems in this report, each with its fix.
    pub(crate) fn findings(&self) -> Vec<Finding> {
        let mut f = Vec::new();
        if self.relays.is_empty() {
            f.push(Finding {
                what: "you have no relays: only people on your local network can reach you".into(),
                fix: "add relays run by different people in different places: `kkachi relay add ADDR`".into(),
            });
        }
        for r in &self.relays {
            match (&r.info, &r.error, r.loop_ms) {
                (None, e, _) => f.push(Finding {
                    what: format!(
                        "relay {} is down ({})",
                        r.addr,
                        e.as_deref().unwrap_or("no answer")
                    ),
                    fix: "your other relays carry your messages meanwhile; if it stays down, replace it: `kkachi relay remove ADDR`, then `kkachi relay add` another".into(),
                }),
                (Some(_), e, None) => f.push(Finding {
                    what: format!(
                        "relay {} answers but did not loop a test envelope back ({})",
                        r.addr,
                        e.as_deref().unwrap_or("no reason given")
                    ),
                    fix: "it may be full or refuse you (an access token?): check `kkachi relay list`, ask its operator, or replace it".into(),
                }),
                _ => {}
            }
            if let Some(skew) = r.skew_secs
                && skew.unsigned_abs() > SKEW_FINDING_SECS
            {
                let way = if skew > 0 { "ahead of" } else { "behind" };
                f.push(Finding {
                    what: format!(
                        "your clock is {} s {way} relay {} (relays refuse envelopes beyond {} s)",
                        skew.unsigned_abs(),
                        r.addr,
                        CLOCK_SKEW_SECS
                    ),
                    fix: "set your clock from the network (NTP), e.g. `timedatectl set-ntp true`"
                        .into(),
                });
            }
        }
        // Relays that name no failure domain cannot be compared: only named ones count.
        let up: Vec<&RelayCheck> = self.relays.iter().filter(|r| r.info.is_some()).collect();
        let named: Vec<&str> = up
            .iter()
            .filter_map(|r| r.info.as_ref().map(|i| i.failure_domain.as_str()))
            .filter(|d| !d.is_empty())
            .collect();
        let mut domains: BTreeMap<&str, usize> = BTreeMap::new();
        for d in &named {
            *domains.entry(d).or_default() += 1;
        }
        if up.len() >= 2 && named.len() == up.len() && domains.len() < 2 {
            f.push(Finding {
                what: format!(
                    "all your relays share one failure domain ({}): one outage there takes them all",
                    domains.keys().next().copied().unwrap_or_default()
                ),
                fix: "add a relay run elsewhere (another provider or region): `kkachi relay add ADDR`".into(),
            });
        } else if self.relays.len() == 1 {
            f.push(Finding {
                what: "you have one relay: while it is down, only your local network reaches you"
                    .into(),
                fix:
                    "add at least two more, run by others in other places: `kkachi relay add ADDR`"
                        .into(),
            });
        }
        for c in &self.contacts {
            if c.relays > 0 && c.reachable == 0 {
                f.push(Finding {
                    what: format!("none of {}'s {} relays answers you", c.name, c.relays),
                    fix: format!("what you send them waits in your outbox and goes out when one is back; if this lasts, ask {} for their current invite code", c.name),
                });
            }
        }
        for round in self.game_day.iter().flatten() {
            if round.carried_by.is_empty() {
                f.push(Finding {
                    what: format!(
                        "game day: with relay {} out of use, none of your other relays carried a test message: while it is down, only your local network reaches you",
                        round.out
                    ),
                    fix: "add relays run by others in other places (`kkachi relay add ADDR`), or fix the ones named above".into(),
                });
            }
            for name in &round.stranded {
                f.push(Finding {
                    what: format!(
                        "game day: with relay {} out of use, none of {name}'s relays answers you",
                        round.out
                    ),
                    fix: format!("what you send {name} would wait in your outbox meanwhile; ask {name} to add a relay run elsewhere, and for their new invite code"),
                });
            }
        }
        let (waiting, oldest_ms) = self.outbox;
        if waiting > 0 && oldest_ms > OUTBOX_FINDING_MS {
            f.push(Finding {
                what: format!(
                    "{waiting} outgoing item(s) wait; the oldest for {} min",
                    oldest_ms / 60_000
                ),
                fix: "they go out once a recipient's relay answers; keep kkachi running (`kkachi daemon` or the UI), or carry them on a drive".into(),
            });
        }
        if let Some(age) = self.backup_age_ms
            && age > BACKUP_FINDING_MS
        {
            f.push(Finding {
                what: format!(
                    "your last backup is {} days old: a lost device would lose what came since",
                    age / (24 * 3600 * 1000)
                ),
                fix: "make one now: `kkachi backup create --to FILE` (it needs no secret, so a timer can run it)".into(),
            });
        }
        f
    }
}

impl App {
    pub(super) async fn drill(
        &mut self,
        game_day: bool,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        self.identity()?;
        let started = Instant::now();
        let report = self.drill_report(game_day).await?;
        let findings = report.findings();
        if json {
            out.json(json!({
                "clear": findings.is_empty(),
                "seconds": started.elapsed().as_secs_f64(),
                "relays": report.relays.iter().map(|r| json!({
                    "addr": r.addr,
                    "up": r.info.is_some(),
                    "name": r.info.as_ref().map(|i| i.name.clone()),
                    "failure_domain": r.info.as_ref().map(|i| i.failure_domain.clone()),
                    "loop_ms": r.loop_ms,
                    "skew_secs": r.skew_secs,
                    "error": r.error,
                })).collect::<Vec<_>>(),
                "contacts": report.contacts.iter().map(|c| json!({
                    "name": c.name, "relays": c.relays, "reachable": c.reachable,
                })).collect::<Vec<_>>(),
                "outbox": { "waiting": report.outbox.0, "oldest_ms": report.outbox.1 },
                "backup_age_ms": report.backup_age_ms,
                "game_day": report.game_day.as_ref().map(|rounds| rounds.iter().map(|r| json!({
                    "out": r.out,
                    "flowed": !r.carried_by.is_empty(),
                    "carried_by": r.carried_by,
                    "first_ms": r.first_ms,
                    "stranded": r.stranded,
                })).collect::<Vec<_>>()),
                "findings": findings.iter().map(|f| json!({ "what": f.what, "fix": f.fix })).collect::<Vec<_>>(),
            }));
        } else {
            for r in &report.relays {
                let line = match (&r.info, r.loop_ms) {
                    (Some(info), Some(ms)) => format!(
                        "relay {}: up, test envelope back in {ms} ms, failure domain {}, clock {:+} s",
                        r.addr,
                        if info.failure_domain.is_empty() {
                            "unnamed"
                        } else {
                            &info.failure_domain
                        },
                        r.skew_secs.unwrap_or(0)
                    ),
                    (Some(_), None) => format!("relay {}: answers, test envelope not back", r.addr),
                    (None, _) => format!("relay {}: down", r.addr),
                };
                out.out(crate::sanitize::for_terminal(&line));
            }
            for c in &report.contacts {
                out.out(crate::sanitize::for_terminal(&format!(
                    "contact {}: {} of {} relays answer",
                    c.name, c.reachable, c.relays
                )));
            }
            out.out(format!(
                "outbox: {} waiting{}",
                report.outbox.0,
                if report.outbox.0 > 0 {
                    format!(", the oldest for {} s", report.outbox.1 / 1000)
                } else {
                    String::new()
                }
            ));
            out.out(match report.backup_age_ms {
                Some(age) => format!("backup: the last one {} h ago", age / 3_600_000),
                None => "backup: none yet (`kkachi backup create --to FILE`)".to_string(),
            });
            for r in report.game_day.iter().flatten() {
                let line = match r.first_ms {
                    Some(ms) => format!(
                        "game day: relay {} out of use: messages flowed through {} other relay(s), the first back in {ms} ms{}",
                        r.out,
                        r.carried_by.len(),
                        if r.stranded.is_empty() {
                            String::new()
                        } else {
                            format!("; {} contact(s) cut off", r.stranded.len())
                        }
                    ),
                    None => format!(
                        "game day: relay {} out of use: NO other relay carried a message",
                        r.out
                    ),
                };
                out.out(crate::sanitize::for_terminal(&line));
            }
            if let Some(rounds) = &report.game_day {
                let down = report.relays.len() - rounds.len();
                if down > 0 {
                    out.out(format!(
                        "game day: {down} relay(s) already down were not taken out again"
                    ));
                }
            }
            if findings.is_empty() {
                out.out(format!(
                    "all clear ({:.1} s)",
                    started.elapsed().as_secs_f64()
                ));
            }
            for f in &findings {
                out.out(format!(
                    "FINDING: {}",
                    crate::sanitize::for_terminal(&f.what)
                ));
                out.out(format!("  fix: {}", crate::sanitize::for_terminal(&f.fix)));
            }
        }
        if !findings.is_empty() {
            out.code = 1;
        }
        Ok(())
    }

    async fn drill_report(&mut self, game_day: bool) -> Result<Report, CommandError> {
        let engine = self.engine()?;
        let me = self.identity()?;
        let records = self.store.relays()?;
        let checks = records.iter().map(|r| {
            let net = engine.net().clone();
            let (addr, token, me) = (r.addr.clone(), r.token.clone(), me.clone());
            async move { check_relay(&net, &me, addr, token).await }
        });
        // Each contact's relays that are not ours, asked once each, while ours are.
        let contacts: Vec<_> = self
            .store
            .contacts()?
            .iter()
            .filter(|c| matches!(self.store.blocked(&c.peer), Ok(None)))
            .cloned()
            .collect();
        let mut theirs: BTreeMap<String, bool> = BTreeMap::new();
        for c in contacts.iter() {
            for a in c.card.relays() {
                if !records.iter().any(|r| r.addr == a.to_string()) {
                    theirs.insert(a.to_string(), false);
                }
            }
        }
        let probes = theirs.keys().cloned().map(|addr| {
            let net = engine.net().clone();
            async move {
                let up = match addr.parse::<Multiaddr>() {
                    Ok(a) => matches!(
                        tokio::time::timeout(ANSWER_WITHIN, net.request(&a, ClientToRelay::Info))
                            .await,
                        Ok(Ok(RelayToClient::Info(_)))
                    ),
                    Err(_) => false,
                };
                (addr, up)
            }
        });
        // A few dozen at a time: a thousand dials at once would time out on their own.
        let (relays, answers): (Vec<RelayCheck>, Vec<(String, bool)>) = futures::join!(
            futures::future::join_all(checks),
            futures::stream::iter(probes)
                .buffer_unordered(PROBES_AT_ONCE)
                .collect::<Vec<_>>()
        );
        for (addr, up) in answers {
            theirs.insert(addr, up);
        }
        let ours: Vec<(String, bool)> = relays
            .iter()
            .map(|r| (r.addr.clone(), r.info.is_some()))
            .collect();
        let up = |addr: &str| {
            theirs
                .get(addr)
                .copied()
                .or_else(|| ours.iter().find(|(a, _)| a == addr).map(|(_, u)| *u))
                .unwrap_or(false)
        };
        // A relay taken out is out under any of its addresses: compared by peer id.
        let reachable_without = |c: &crate::store::Contact, out: Option<&str>| {
            let out = out.and_then(|o| o.parse::<Multiaddr>().ok().as_ref().and_then(peer_of));
            c.card
                .relays()
                .iter()
                .filter(|a| out.is_none() || peer_of(a) != out)
                .filter(|a| up(&a.to_string()))
                .count()
        };
        let checks = contacts
            .iter()
            .map(|c| ContactCheck {
                name: c.name.clone(),
                relays: c.card.relays().len(),
                reachable: reachable_without(c, None),
            })
            .collect();
        let game_day = if game_day {
            let mut rounds = Vec::new();
            // Relays already down are out of use as it is: the checks above cover them.
            for out in relays.iter().filter(|r| r.info.is_some()) {
                let mut round = game_day_round(engine.net(), &me, &records, &out.addr).await;
                round.stranded = contacts
                    .iter()
                    .filter(|c| reachable_without(c, None) > 0)
                    .filter(|c| reachable_without(c, Some(&out.addr)) == 0)
                    .map(|c| c.name.clone())
                    .collect();
                rounds.push(round);
            }
            Some(rounds)
        } else {
            None
        };
        let contacts = checks;
        // What we carry for others (from bundles) is theirs to wait for.
        let outbox: Vec<_> = self
            .store
            .outbox()?
            .into_iter()
            .filter(|(_, e)| e.kind != crate::store::OutboxKind::Forward)
            .collect();
        let now = now_ms();
        let oldest = outbox
            .iter()
            .map(|(_, e)| waited_ms(e, now))
            .max()
            .unwrap_or(0);
        let backup_age_ms = self
            .store
            .last_backup_ms()?
            .map(|at| now.saturating_sub(at));
        Ok(Report {
            relays,
            contacts,
            outbox: (outbox.len(), oldest),
            game_day,
            backup_age_ms,
        })
    }
}

/// The transport of the client with one relay taken out of use: every request to it
/// fails at once, as when it is down.
#[derive(Clone)]
struct Without<T> {
    net: T,
    out: Multiaddr,
}

impl<T: Transport> Without<T> {
    /// The transport and address to go on with, or the refusal of the relay taken out.
    fn through(&self, relay: &Multiaddr) -> Result<(T, Multiaddr), NetError> {
        let out =
            *relay == self.out || peer_of(relay).is_some_and(|p| peer_of(&self.out) == Some(p));
        if out {
            return Err(NetError::Unreachable(
                "taken out of use for the game day".into(),
            ));
        }
        Ok((self.net.clone(), relay.clone()))
    }
}

impl<T: Transport> Transport for Without<T> {
    fn request(
        &self,
        relay: &Multiaddr,
        request: ClientToRelay,
    ) -> impl Future<Output = Result<RelayToClient, NetError>> + Send {
        let through = self.through(relay);
        async move {
            let (net, relay) = through?;
            net.request(&relay, request).await
        }
    }

    fn request_as_reader(
        &self,
        relay: &Multiaddr,
        request: ClientToRelay,
    ) -> impl Future<Output = Result<RelayToClient, NetError>> + Send {
        let through = self.through(relay);
        async move {
            let (net, relay) = through?;
            net.request_as_reader(&relay, request).await
        }
    }

    fn direct_put(
        &self,
        peer: PeerId,
        envelopes: Vec<Envelope>,
    ) -> impl Future<Output = Result<RelayToClient, NetError>> + Send {
        self.net.direct_put(peer, envelopes)
    }

    fn direct_peers(&self) -> HashSet<PeerId> {
        self.net.direct_peers()
    }

    fn connected(&self) -> HashSet<PeerId> {
        self.net.connected()
    }
}

/// Takes relay `out` out of use and loops a test envelope through every one of `ours`
/// at once (the one taken out refuses it): who carried it, and how soon the first did.
async fn game_day_round<T: Transport>(
    net: &T,
    me: &kkachi_protocol::Identity,
    ours: &[crate::store::RelayRecord],
    out: &str,
) -> Round {
    let mut round = Round {
        out: out.to_string(),
        carried_by: Vec::new(),
        first_ms: None,
        stranded: Vec::new(),
    };
    let Ok(out_addr) = out.parse::<Multiaddr>() else {
        return round;
    };
    let without = Without {
        net: net.clone(),
        out: out_addr,
    };
    let checks = ours.iter().map(|r| {
        let (without, addr, token) = (without.clone(), r.addr.clone(), r.token.clone());
        async move { check_relay(&without, me, addr, token).await }
    });
    for check in futures::future::join_all(checks).await {
        if let Some(ms) = check.loop_ms {
            // The one taken out cannot have carried it: the transport refused it.
            debug_assert_ne!(check.addr, out);
            round.first_ms = Some(round.first_ms.map_or(ms, |f: u64| f.min(ms)));
            round.carried_by.push(check.addr);
        }
    }
    round
}

/// How long an outbox entry has waited since it was first queued (its `created_ms`
/// moves on each time it is put everywhere again).
fn waited_ms(e: &crate::store::OutboxEntry, now: u64) -> u64 {
    let queued = match e.queued_ms {
        0 => e.created_ms,
        t => t.min(e.created_ms),
    };
    now.saturating_sub(queued)
}

/// Why a relay could not be reached, in a few words a user can act on: the network
/// layer's own errors name every address and layer tried (hundreds of characters);
/// anything not recognised is cut short.
pub(crate) fn why_down(error: &str) -> String {
    let lower = error.to_lowercase();
    let plain = [
        (
            "connection refused",
            "connection refused: nothing listens there",
        ),
        ("timed out", "no answer in time"),
        ("timeout", "no answer in time"),
        ("no route to host", "no route to it"),
        ("network is unreachable", "the network is unreachable"),
        ("connection reset", "the connection was reset"),
        ("failed to negotiate", "it does not speak kkachi's protocol"),
        ("wrong peer", "another peer answers at that address"),
    ];
    match plain.iter().find(|(needle, _)| lower.contains(needle)) {
        Some((_, words)) => (*words).to_owned(),
        None => short(error),
    }
}

/// At most [`MAX_RELAY_TEXT`] characters of a relay's text.
fn short(text: &str) -> String {
    match text.char_indices().nth(MAX_RELAY_TEXT) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

/// What kind of answer a relay gave (never its contents).
fn kind(answer: &RelayToClient) -> &'static str {
    match answer {
        RelayToClient::Stored { .. } => "stored",
        RelayToClient::Batch { .. } => "batch",
        RelayToClient::Deleted { .. } => "deleted",
        RelayToClient::Info(_) => "info",
        RelayToClient::Error { .. } => "error",
        RelayToClient::Granted { .. } => "granted",
        RelayToClient::Chunk { .. } => "chunk",
        RelayToClient::ChunksHeld { .. } => "chunks held",
    }
}

/// Asks one of our relays for its info, then loops a test envelope through our drill
/// queue there: grant, put, fetch, delete, revoke.
async fn check_relay<T: Transport>(
    net: &T,
    me: &kkachi_protocol::Identity,
    addr: String,
    token: Option<String>,
) -> RelayCheck {
    let mut check = RelayCheck {
        addr: addr.clone(),
        info: None,
        error: None,
        loop_ms: None,
        skew_secs: None,
    };
    let Ok(relay) = addr.parse::<Multiaddr>() else {
        check.error = Some("not a multiaddr".into());
        return check;
    };
    let Some(peer) = peer_of(&relay) else {
        check.error = Some("no /p2p/ peer id".into());
        return check;
    };
    let ask = |request| async {
        match tokio::time::timeout(ANSWER_WITHIN, net.request_as_reader(&relay, request)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(why_down(&e.to_string())),
            Err(_) => Err(format!("no answer within {} s", ANSWER_WITHIN.as_secs())),
        }
    };
    match ask(ClientToRelay::Info).await {
        Ok(RelayToClient::Info(info)) => {
            let skew = i128::from(now_ms() / 1000) - i128::from(info.now_secs);
            check.skew_secs = Some(skew.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64);
            check.info = Some(info);
        }
        Ok(other) => {
            check.error = Some(format!("unexpected answer ({})", kind(&other)));
            return check;
        }
        Err(e) => {
            check.error = Some(e);
            return check;
        }
    }
    let (read, write) = me.drill_keys(&peer);
    let started = Instant::now();
    let mut payload = vec![0u8; kkachi_protocol::session::SIZE_CLASSES[0]];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut payload);
    let envelope = Envelope {
        expires_at: now_ms() / 1000 + 600,
        payload,
    };
    let id = envelope.id();
    let result: Result<(), String> = async {
        let token = token.map(String::into_bytes).unwrap_or_default();
        match ask(ClientToRelay::Grant {
            key: read.clone(),
            kind: QueueKind::Inbox,
            token,
            write_ids: vec![write.id()],
        })
        .await?
        {
            RelayToClient::Granted { .. } => {}
            RelayToClient::Error { code, message } => {
                return Err(format!("{}: {}", code.as_str(), short(&message)));
            }
            other => return Err(format!("unexpected answer ({})", kind(&other))),
        }
        let put = ClientToRelay::Put {
            items: vec![Addressed { write, envelope }],
        };
        match ask(put).await? {
            RelayToClient::Stored { outcomes, .. } => match outcomes.first() {
                Some(PutOutcome::Rejected { code, .. }) => {
                    return Err(format!("put refused: {}", code.as_str()));
                }
                Some(_) => {}
                None => return Err("no outcome for the put".into()),
            },
            RelayToClient::Error { code, message } => {
                return Err(format!("{}: {}", code.as_str(), short(&message)));
            }
            other => return Err(format!("unexpected answer ({})", kind(&other))),
        }
        let fetched = match ask(ClientToRelay::Fetch {
            key: read.clone(),
            after: 0,
            limit: 16,
        })
        .await?
        {
            RelayToClient::Batch { items, .. } => items,
            RelayToClient::Error { code, message } => {
                return Err(format!("{}: {}", code.as_str(), short(&message)));
            }
            other => return Err(format!("unexpected answer ({})", kind(&other))),
        };
        if !fetched.iter().any(|s| s.envelope.id() == id) {
            return Err("the test envelope was acknowledged but not given back".into());
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => check.loop_ms = Some(started.elapsed().as_millis() as u64),
        Err(e) => check.error = Some(e),
    }
    // Tidy up whatever happened: the envelope and the grant go.
    let _ = ask(ClientToRelay::Delete {
        key: read.clone(),
        ids: vec![id],
    })
    .await;
    let _ = ask(ClientToRelay::Revoke {
        key: read,
        write_ids: vec![write.id()],
    })
    .await;
    check
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(domain: &str, now_secs: u64) -> RelayInfo {
        RelayInfo {
            protocol_version: 2,
            software: String::new(),
            name: String::new(),
            operator: String::new(),
            failure_domain: domain.into(),
            max_payload: 0,
            max_ttl_secs: 0,
            capability_max_envelopes: 0,
            capability_max_bytes: 0,
            puts_per_sec: 0,
            open_policy: 0,
            grants_per_queue: 0,
            request_max_envelopes: 0,
            request_max_ttl_secs: 0,
            now_secs,
            store_epoch: 1,
        }
    }

    fn up(addr: &str, domain: &str, skew: i64) -> RelayCheck {
        RelayCheck {
            addr: addr.into(),
            info: Some(info(domain, 0)),
            error: None,
            loop_ms: Some(3),
            skew_secs: Some(skew),
        }
    }

    fn healthy() -> Report {
        Report {
            relays: vec![up("a", "dc-a", 0), up("b", "dc-b", 2), up("c", "dc-c", -1)],
            contacts: vec![ContactCheck {
                name: "Minji".into(),
                relays: 3,
                reachable: 2,
            }],
            outbox: (1, 5_000),
            game_day: None,
            backup_age_ms: Some(3_600_000),
        }
    }

    #[test]
    fn a_healthy_setup_is_all_clear() {
        assert_eq!(healthy().findings(), []);
    }

    #[test]
    fn an_old_backup_is_a_finding_and_none_yet_is_not() {
        let mut r = healthy();
        r.backup_age_ms = Some(BACKUP_FINDING_MS + 86_400_000);
        let f = r.findings();
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].what.contains("last backup is 31 days old"), "{f:?}");
        assert!(f[0].fix.contains("kkachi backup create"));
        r.backup_age_ms = None;
        assert_eq!(r.findings(), []);
    }

    #[test]
    fn each_problem_is_named_with_its_fix() {
        let mut r = healthy();
        r.relays[0].info = None;
        r.relays[0].loop_ms = None;
        r.relays[0].error = Some("connection refused".into());
        let f = r.findings();
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].what.contains("relay a is down (connection refused)"));
        assert!(f[0].fix.contains("kkachi relay remove"));

        let mut r = healthy();
        for relay in &mut r.relays {
            relay.info = Some(info("hetzner/fsn1", 0));
        }
        let f = r.findings();
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(
            f[0].what
                .contains("share one failure domain (hetzner/fsn1)")
        );

        let mut r = healthy();
        r.relays[1].skew_secs = Some(-400);
        let f = r.findings();
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].what.contains("400 s behind relay b"), "{}", f[0].what);
        assert!(f[0].fix.contains("NTP"));

        let mut r = healthy();
        r.relays[2].loop_ms = None;
        r.relays[2].error = Some("put refused: quota exceeded".into());
        assert!(
            r.findings()[0]
                .what
                .contains("did not loop a test envelope back (put refused")
        );

        let mut r = healthy();
        r.contacts[0].reachable = 0;
        assert!(
            r.findings()[0]
                .what
                .contains("none of Minji's 3 relays answers you")
        );

        let mut r = healthy();
        r.outbox = (4, 2 * OUTBOX_FINDING_MS);
        assert!(
            r.findings()[0]
                .what
                .contains("4 outgoing item(s) wait; the oldest for 120 min")
        );

        let mut r = healthy();
        r.relays.truncate(1);
        assert!(r.findings()[0].what.contains("you have one relay"));
        r.relays.clear();
        assert!(r.findings()[0].what.contains("you have no relays"));
    }

    #[test]
    fn relays_that_name_no_failure_domain_are_not_called_one_and_a_wild_clock_is_named() {
        let mut r = healthy();
        for relay in &mut r.relays {
            relay.info = Some(info("", 0));
        }
        assert_eq!(r.findings(), [], "unnamed domains cannot be compared");
        r.relays[0].skew_secs = Some(i64::MIN);
        assert!(r.findings()[0].what.contains("behind relay a"));
    }

    #[test]
    fn an_entry_has_waited_since_it_was_first_queued() {
        let mut e = crate::store::OutboxEntry {
            message_id: [0; 16],
            contact: vec![],
            kind: crate::store::OutboxKind::Message,
            device: None,
            envelope: vec![],
            targets: vec![],
            direct_acked: false,
            created_ms: 5_000,
            sealed_on: None,
            resealed_ms: 0,
            queued_ms: 1_000,
            content: Vec::new(),
        };
        assert_eq!(
            waited_ms(&e, 10_000),
            9_000,
            "put again at 5 s, queued at 1 s"
        );
        e.queued_ms = 0;
        assert_eq!(
            waited_ms(&e, 10_000),
            5_000,
            "from before the field: created_ms"
        );
    }

    #[test]
    fn network_errors_are_said_in_a_few_words() {
        let dial = "Transport([(/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWabc, Other(Custom { kind: Other, error: Other(Left(Left(Os { code: 111, kind: ConnectionRefused, message: \"Connection refused\" }))) }))])";
        assert_eq!(why_down(dial), "connection refused: nothing listens there");
        assert_eq!(
            why_down("no answer within 5s: request timed out"),
            "no answer in time"
        );
        let odd = "x".repeat(500);
        assert_eq!(why_down(&odd).chars().count(), MAX_RELAY_TEXT + 1);
    }

    #[test]
    fn a_relays_text_is_cut_short() {
        let long = "x".repeat(10_000);
        assert_eq!(short(&long).chars().count(), MAX_RELAY_TEXT + 1);
        assert_eq!(short("fine"), "fine");
    }

    #[test]
    fn a_game_day_round_that_nothing_carried_or_that_strands_a_contact_is_a_finding() {
        let round = |out: &str, carried_by: &[&str], stranded: &[&str]| Round {
            out: out.into(),
            carried_by: carried_by.iter().map(|s| s.to_string()).collect(),
            first_ms: (!carried_by.is_empty()).then_some(4),
            stranded: stranded.iter().map(|s| s.to_string()).collect(),
        };
        let mut r = healthy();
        r.game_day = Some(vec![
            round("a", &["b", "c"], &[]),
            round("b", &["a", "c"], &[]),
            round("c", &["a", "b"], &[]),
        ]);
        assert_eq!(r.findings(), []);
        r.game_day = Some(vec![round("a", &[], &[]), round("b", &["a"], &["Minji"])]);
        let f = r.findings();
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(
            f[0].what
                .contains("with relay a out of use, none of your other relays carried"),
            "{f:?}"
        );
        assert!(f[0].fix.contains("kkachi relay add"));
        assert!(
            f[1].what
                .contains("with relay b out of use, none of Minji's relays answers you"),
            "{f:?}"
        );
    }

    /// A transport that answers every request with the relay's own info.
    #[derive(Clone)]
    struct Echo;

    impl Transport for Echo {
        async fn request(
            &self,
            _relay: &Multiaddr,
            _request: ClientToRelay,
        ) -> Result<RelayToClient, NetError> {
            Ok(RelayToClient::Info(info("", 0)))
        }

        async fn direct_put(
            &self,
            _peer: PeerId,
            _envelopes: Vec<Envelope>,
        ) -> Result<RelayToClient, NetError> {
            Err(NetError::Stopped)
        }

        fn direct_peers(&self) -> HashSet<PeerId> {
            HashSet::new()
        }

        fn connected(&self) -> HashSet<PeerId> {
            HashSet::new()
        }
    }

    #[tokio::test]
    async fn a_relay_taken_out_of_use_is_refused_by_address_or_by_peer() {
        let peer = PeerId::random();
        let out: Multiaddr = format!("/ip4/127.0.0.1/tcp/1/p2p/{peer}").parse().unwrap();
        let other_addr: Multiaddr = format!("/ip6/::1/tcp/2/p2p/{peer}").parse().unwrap();
        let elsewhere: Multiaddr = format!("/ip4/127.0.0.1/tcp/3/p2p/{}", PeerId::random())
            .parse()
            .unwrap();
        let without = Without {
            net: Echo,
            out: out.clone(),
        };
        for refused in [&out, &other_addr] {
            let e = without
                .request(refused, ClientToRelay::Info)
                .await
                .unwrap_err();
            assert!(e.to_string().contains("taken out of use"), "{e}");
            assert!(
                without
                    .request_as_reader(refused, ClientToRelay::Info)
                    .await
                    .is_err()
            );
        }
        assert!(
            without
                .request(&elsewhere, ClientToRelay::Info)
                .await
                .is_ok()
        );
        assert!(
            without
                .request_as_reader(&elsewhere, ClientToRelay::Info)
                .await
                .is_ok()
        );
    }

    #[test]
    fn a_small_skew_is_no_finding() {
        let mut r = healthy();
        r.relays[0].skew_secs = Some(SKEW_FINDING_SECS as i64);
        assert_eq!(r.findings(), []);
    }
}
