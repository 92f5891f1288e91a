//! `device …` and `contact devices`: the devices an account lists (SPEC §15), ours and
//! a contact's, each shown with the fingerprint of its key so two people can compare
//! what each side sees.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use kkachi_protocol::device::DeviceSet;
use kkachi_protocol::link::LinkCode;
use serde_json::json;
use unicode_width::UnicodeWidthStr;

use super::{App, CommandError, Output, describe_duration, hex, name};
use crate::cli::DeviceCommand;
use crate::engine::fingerprint;
use crate::link::{LinkFailure, Offer, Seen};
use crate::store::{LocalStore, StoreError};
use crate::time::format_ms;

impl From<LinkFailure> for CommandError {
    fn from(e: LinkFailure) -> Self {
        match e {
            LinkFailure::Store(e) => CommandError::Store(e),
            other => CommandError::Refused(other.to_string()),
        }
    }
}

/// The removals of `set`, the latest first.
fn removals_by_time(set: &DeviceSet) -> Vec<&kkachi_protocol::device::Removal> {
    let mut removals: Vec<_> = set.removals().collect();
    removals.sort_by_key(|r| std::cmp::Reverse(r.at()));
    removals
}

/// The devices of `set` as JSON, listed and taken out; `mark` names the field that is
/// true for the device whose key it holds (`this` for ours, `card` for the one a
/// contact's card names).
fn set_json(set: &DeviceSet, mark: (&[u8; 32], &str)) -> (serde_json::Value, serde_json::Value) {
    let devices = set
        .devices()
        .map(|d| {
            let mut device = json!({
                "name": d.name(),
                "key": hex(d.key()),
                "fingerprint": fingerprint(d.key()),
                "signed_at_ms": d.at().saturating_mul(1000),
            });
            device[mark.1] = json!(d.key() == mark.0);
            device
        })
        .collect();
    let removed = removals_by_time(set)
        .into_iter()
        .map(|r| {
            json!({
                "key": hex(r.key()),
                "fingerprint": fingerprint(r.key()),
                "removed_at_ms": r.at().saturating_mul(1000),
            })
        })
        .collect();
    (
        serde_json::Value::Array(devices),
        serde_json::Value::Array(removed),
    )
}

/// The devices of `set`, a line each, names padded by the columns they take; `mark`
/// says what to add after the one whose key it names. Each shows when its entry was
/// signed (listed, or last renamed); the keys taken out follow, the latest first.
fn set_lines(set: &DeviceSet, mark: (&[u8; 32], &str), out: &mut Output) {
    let width = set
        .devices()
        .map(|d| name(d.name()).width())
        .max()
        .unwrap_or(0);
    for d in set.devices() {
        let shown = name(d.name());
        let pad = " ".repeat(width - shown.width());
        let note = if d.key() == mark.0 { mark.1 } else { "" };
        out.out(format!(
            "  {shown}{pad}  {}  signed {}{note}",
            fingerprint(d.key()),
            format_ms(d.at().saturating_mul(1000))
        ));
    }
    for r in removals_by_time(set) {
        out.out(format!(
            "  (taken out)  {}  on {}",
            fingerprint(r.key()),
            format_ms(r.at().saturating_mul(1000))
        ));
    }
}

impl App {
    pub(super) async fn device(
        &mut self,
        command: DeviceCommand,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        let me = self.identity()?;
        let ours = me.x25519_public();
        match command {
            DeviceCommand::List => {
                // Read here: nothing to deliver.
                let set = self.local_engine()?.own_devices().await?;
                if json {
                    let (devices, removed) = set_json(&set, (&ours, "this"));
                    out.json(json!({ "devices": devices, "removed": removed }));
                    return Ok(());
                }
                out.out(format!("your devices ({} listed):", set.devices().count()));
                set_lines(&set, (&ours, "  ← this device"), out);
            }
            DeviceCommand::Link { .. } | DeviceCommand::Join { .. } => {
                return Err(CommandError::Refused(
                    "linking runs on its own: stop the daemon or UI of this home, then run it again"
                        .into(),
                ));
            }
            DeviceCommand::Rename { name: words } => {
                let engine = self.engine()?;
                let new = words.join(" ");
                let new = new.trim();
                let before = engine.own_devices().await?;
                if before.device(&ours).is_some_and(|d| d.name() == new) {
                    if json {
                        out.json(json!({ "name": new, "contacts": 0, "unchanged": true }));
                    } else {
                        out.warn(format!("this device is called {} already", name(new)));
                    }
                    return Ok(());
                }
                let (_, sent) = engine.rename_device(new.to_owned()).await?;
                // Out before this command ends (a daemon keeps at it).
                engine.settle().await?;
                if json {
                    out.json(json!({ "name": new, "contacts": sent }));
                } else {
                    out.out(format!("this device is now called {}", name(new)));
                    if sent > 0 {
                        out.warn(format!("your contacts ({sent}) are sent the new name"));
                    }
                }
            }
            DeviceCommand::Remove { which } => {
                let engine = self.engine()?;
                let (set, key, sent) = engine.remove_device(which.join(" ")).await?;
                engine.settle().await?;
                if json {
                    let (devices, removed) = set_json(&set, (&ours, "this"));
                    out.json(json!({
                        "removed_key": hex(&key),
                        "removed_fingerprint": fingerprint(&key),
                        "sent_to": sent,
                        "devices": devices,
                        "removed": removed,
                    }));
                    return Ok(());
                }
                out.out(format!(
                    "took the device with key {} out of your account: your contacts and other devices seal nothing more to it once your device set reaches them ({sent} queued)",
                    fingerprint(&key)
                ));
                out.out(format!("your devices ({} listed):", set.devices().count()));
                set_lines(&set, (&ours, "  ← this device"), out);
            }
        }
        Ok(())
    }

    pub(super) fn contact_devices(
        &self,
        who: &str,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        let c = self.resolve(who)?;
        let account = c.card.identity().ed25519();
        let card_key = c.card.identity().x25519();
        let set = self.store.contact_devices(&c.peer, account)?;
        // What we send goes to: each device that wrote to us, and the card's unless
        // their account took it out while another is there.
        let mut sealed_to = self.store.device_sessions_of(&c)?;
        if sealed_to.is_empty() || !set.as_ref().is_some_and(|s| s.is_removed(card_key)) {
            sealed_to.insert(0, *card_key);
        }
        if json {
            let (devices, removed) = match &set {
                Some(set) => set_json(set, (card_key, "card")),
                None => (serde_json::Value::Null, serde_json::Value::Array(vec![])),
            };
            out.json(json!({
                "contact": c.name,
                "peer_id": c.peer.to_string(),
                "card_key": hex(card_key),
                "card_fingerprint": fingerprint(card_key),
                "devices": devices,
                "removed": removed,
                "sealed_to": sealed_to.iter().map(fingerprint).collect::<Vec<_>>(),
            }));
            return Ok(());
        }
        let Some(set) = set else {
            out.out(format!(
                "{}'s list of devices has not reached you yet; their card names one: {}",
                name(&c.name),
                fingerprint(card_key)
            ));
            return Ok(());
        };
        out.out(format!(
            "{}'s devices ({} listed):",
            name(&c.name),
            set.devices().count()
        ));
        set_lines(&set, (card_key, "  ← their card names this one"), out);
        out.out(format!(
            "What you send them goes to {}.",
            sealed_to
                .iter()
                .map(fingerprint)
                .collect::<Vec<_>>()
                .join(" and ")
        ));
        if set.is_removed(card_key) {
            out.warn(format!(
                "their card names a device their account took out ({}): nothing newer from them has reached you yet",
                fingerprint(card_key)
            ));
        } else if set.device(card_key).is_none() {
            out.warn(format!(
                "their card names a device the list does not hold yet ({})",
                fingerprint(card_key)
            ));
        }
        if set.devices().next().is_none() {
            out.warn(format!(
                "{}'s account lists no device (two of them took each other out)",
                name(&c.name)
            ));
        }
        Ok(())
    }
}

/// "1 contact and 3 messages".
fn counted(contacts: u64, messages: u64) -> String {
    let s = |n: u64| if n == 1 { "" } else { "s" };
    format!(
        "{contacts} contact{} and {messages} message{}",
        s(contacts),
        s(messages)
    )
}

/// A link code from standard input: asked for (not echoed) at a terminal, else read
/// from what is piped in.
fn code_from_stdin() -> Result<zeroize::Zeroizing<String>, CommandError> {
    use std::io::IsTerminal;
    let typed = if std::io::stdin().is_terminal() {
        crate::passphrase::read_line_hidden(
            "Paste the code `kkachi device link` shows, then Enter: ",
        )
        .ok_or_else(|| CommandError::Refused("no terminal to read the code from".into()))?
    } else {
        let mut text = String::new();
        std::io::stdin()
            .lock()
            .take(4096)
            .read_to_string(&mut text)
            .map_err(|e| CommandError::Refused(format!("cannot read the code: {e}")))?;
        zeroize::Zeroizing::new(text)
    };
    if typed.trim().is_empty() {
        return Err(CommandError::Refused(
            "no code came on standard input".into(),
        ));
    }
    Ok(typed)
}

/// A line on standard output at once (the command goes on waiting after it).
fn say(line: impl AsRef<str>) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{}", line.as_ref());
    let _ = stdout.flush();
}

/// What `device link` was asked.
#[derive(Debug, Clone)]
pub struct LinkAsked {
    /// Where to listen (empty: where `KKACHI_LISTEN` says, else this machine's network
    /// addresses).
    pub listen: Vec<SocketAddr>,
    /// Over the local network only.
    pub no_relay: bool,
    /// Through a relay only.
    pub relay_only: bool,
    /// How long the code holds, in seconds.
    pub wait: u32,
    /// Hand over again from a home that handed its account over before.
    pub again: bool,
    /// Hand over without asking to compare the safety number.
    pub yes: bool,
}

/// `kkachi device link`: offers the account in `home` under a one-time code for as
/// long as asked, and hands it to the device that joins with it once its user
/// confirmed the safety number both show (unless asked not to). Runs only where no
/// other kkachi holds the home (this one must not change while it goes over).
pub async fn link(home: &Path, asked: &LinkAsked, json: bool) -> Result<Output, CommandError> {
    let LinkAsked {
        ref listen,
        no_relay,
        relay_only,
        wait,
        again,
        yes,
    } = *asked;

    let store = match LocalStore::open(home) {
        Ok(s) => s,
        Err(StoreError::Locked(_)) => {
            return Err(CommandError::Refused(format!(
                "a kkachi daemon or UI is running for {}: stop it first (the account must not change while it goes to the new device)",
                home.display()
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let me = store.identity()?.ok_or(CommandError::NoIdentity)?;
    let before = store.handed_over()?;
    if let (Some(h), false) = (before, again) {
        return Err(CommandError::Refused(format!(
            "this home handed your account to device {} on {}. Only if that device did not finish joining (it holds no account), run `kkachi device link --again`",
            fingerprint(&h.to),
            format_ms(h.at_ms)
        )));
    }
    if !yes && !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return Err(CommandError::Refused(
            "the new device's safety number is confirmed here, at a terminal: run this in one, or add --yes to add the first device that has the code to your account".into(),
        ));
    }
    // What finds the home held meanwhile says by what.
    let linking = crate::link::mark_linking(home);
    let wanted = if listen.is_empty() {
        crate::link::listen_from_env()
    } else {
        listen.to_vec()
    };
    let mut listen: Vec<SocketAddr> = Vec::new();
    for addr in wanted {
        if !listen.contains(&addr) {
            listen.push(addr);
        }
    }
    let interfaces = if relay_only {
        Vec::new()
    } else if listen.iter().any(|a| a.ip().is_unspecified()) || listen.is_empty() {
        crate::link::interfaces().await
    } else {
        Vec::new()
    };
    let relays: Vec<(kkachi_protocol::Multiaddr, Vec<u8>)> = if no_relay {
        Vec::new()
    } else {
        store
            .relays()?
            .into_iter()
            .filter_map(|r| {
                let addr = r.addr.parse().ok()?;
                Some((addr, r.token.map(String::into_bytes).unwrap_or_default()))
            })
            .collect()
    };
    let direct = (!relay_only).then_some((listen.as_slice(), interfaces.as_slice()));
    let (offer, no_relay_why) = if relays.is_empty() && !relay_only {
        (Offer::new(&listen, &interfaces)?, None)
    } else {
        if !json && !relays.is_empty() {
            eprintln!("opening the link on your relay…");
        }
        Offer::through_relay(direct, &relays).await?
    };
    if let Some(why) = &no_relay_why {
        eprintln!(
            "warning: no relay could hold the link ({why}): the code reaches this network only"
        );
    }
    let code = offer.code().encode();
    let addrs: Vec<String> = offer.code().addrs().iter().map(|a| a.to_string()).collect();
    let relay = offer.relay().map(|r| r.to_string());
    if let Some(h) = before {
        // On the user's word alone: if that device holds the account, two would.
        eprintln!(
            "warning: this home handed your account to device {} on {}. Go on only if that device holds no account: if it does, the account would act from two devices, and contacts would reach only one",
            fingerprint(&h.to),
            format_ms(h.at_ms)
        );
    }
    if json {
        say(crate::sanitize::json(&json!({
            "code": code,
            "addresses": addrs,
            "relay": relay,
            "wait_secs": wait,
            "loopback_only": offer.loopback_only(),
            "again": before.is_some(),
        })));
    } else {
        say("On the new device, run:");
        say("");
        say(format!("    kkachi device join {code}"));
        say("");
        // For a camera: not into a file or a pipe.
        if std::io::IsTerminal::is_terminal(&std::io::stdout())
            && let Ok(qr) = crate::qr::render(&code)
        {
            say(qr);
        }
        let reach = if addrs.is_empty() {
            String::new()
        } else if offer.code().addrs().iter().all(|a| a.ip().is_loopback()) {
            format!(
                "at {} (this machine only: no network address of it was found, or --listen named loopback)",
                addrs.join(", ")
            )
        } else {
            format!("at {} (the same network)", addrs.join(", "))
        };
        let through = match &relay {
            Some(r) if reach.is_empty() => format!("through your relay {r}"),
            Some(r) => format!(", and through your relay {r} from anywhere"),
            None => String::new(),
        };
        say(format!(
            "It reaches this device {reach}{through}, for {}.",
            describe_duration(wait)
        ));
        say(
            "Anyone who has this code before the new device uses it can take your account: show it to no one else. Where others share the new machine, type `kkachi device join -` and paste the code: it then stays out of the process list.",
        );
        say(
            "The new device joins your account beside this one, under a key of its own: both send and receive, and each shows what the other sends and reads.",
        );
    }
    let peer = me.peer_id();
    let served = store.clone();
    let mut wrong = 0u64;
    let confirm = move |from: &crate::link::Via, number: &str| {
        if json {
            eprintln!(
                "{}",
                json!({ "event": "holds_code", "from": from.to_string(), "safety_number": number })
            );
        }
        if yes {
            if !json {
                eprintln!("the device at {from} holds the code (safety number {number})");
            }
            return true;
        }
        // What was typed before the question (a stray Enter, a "y") does not answer it.
        let _ = rustix::termios::tcflush(std::io::stdin(), rustix::termios::QueueSelector::IFlush);
        eprint!(
            "The device at {from} holds the code. Does it show the safety number {number}? Type y to add it to your account: "
        );
        let mut answer = String::new();
        let _ = std::io::stdin().read_line(&mut answer);
        matches!(answer.trim(), "y" | "Y" | "yes" | "Yes" | "YES")
    };
    let stop = offer.stopper();
    let mut serving = tokio::task::spawn_blocking(move || {
        offer.serve(&served, Duration::from_secs(u64::from(wait)), confirm, |seen| {
            if matches!(seen, Seen::WrongCode(_)) {
                wrong += 1;
                // A few are told; then only every hundredth (someone may be trying
                // codes, which cannot be guessed: the code holds).
                if wrong > 5 && !wrong.is_multiple_of(100) {
                    return;
                }
            }
            let (event, from, line) = match &seen {
                Seen::WrongCode(from) if wrong > 5 => (
                    "wrong_code",
                    from,
                    format!(
                        "{wrong} connections so far without this code (the last from {from}): someone on the network may be trying codes, which cannot be guessed; the code still holds"
                    ),
                ),
                Seen::WrongCode(from) => (
                    "wrong_code",
                    from,
                    format!(
                        "a connection from {from} did not prove it holds this code (a wrong code, or it gave up): dropped"
                    ),
                ),
                Seen::Sending(from) => (
                    "sending",
                    from,
                    format!("the device at {from} holds the code: sending your account"),
                ),
                Seen::BrokeOff(from, why) => (
                    "broke_off",
                    from,
                    format!("the transfer to {from} broke off ({why}); the code still holds"),
                ),
                Seen::Declined(from) => (
                    "declined",
                    from,
                    format!(
                        "the device at {from} was not confirmed: it was sent nothing; the code still holds. If you did not start it, someone else has seen the code: stop here (Ctrl-C) and make a new one"
                    ),
                ),
            };
            if json {
                eprintln!("{}", json!({ "event": event, "from": from.to_string() }));
            } else {
                eprintln!("{line}");
            }
        })
    });
    let served = tokio::select! {
        served = &mut serving => served,
        _ = tokio::signal::ctrl_c() => {
            // The offer ends at its next pass (its relay keys withdrawn); a transfer
            // under way is not waited for: until this device recorded the hand-over, it
            // keeps the account, and after it, the record is durable.
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            match tokio::time::timeout(Duration::from_secs(3), &mut serving).await {
                Ok(served) if !matches!(served, Ok(Err(LinkFailure::Cancelled))) => served,
                _ => {
                    drop(linking);
                    match store.handed_over() {
                        Ok(Some(h)) if before.is_none_or(|b| b.to != h.to) => eprintln!(
                            "stopped after this device handed your account to device {}: check that it holds it",
                            fingerprint(&h.to)
                        ),
                        _ => eprintln!("{}", LinkFailure::Cancelled),
                    }
                    std::process::exit(130);
                }
            }
        }
    };
    let handed = served
    .map_err(|e| CommandError::Refused(format!("linking stopped: {e}")))?
    .map_err(|e| match (e, before.is_some()) {
        (LinkFailure::TimedOut(held), true) => CommandError::Refused(format!(
            "no device took the account while the code held ({held}): run `kkachi device link --again` for a new code"
        )),
        (e, _) => e.into(),
    })?;
    let mut out = Output::default();
    if json {
        out.json(json!({
            "linked": true,
            "device": handed.name,
            "confirmed": handed.confirmed,
            "peer_id": peer.to_string(),
            "key": hex(&handed.to),
            "fingerprint": fingerprint(&handed.to),
            "from": handed.from.to_string(),
            "contacts": handed.counts.contacts,
            "messages": handed.counts.messages,
            "records": handed.counts.records,
        }));
        return Ok(out);
    }
    out.out(format!(
        "Your account went to the device at {}, now one of your devices as {} (key {}): {}.",
        handed.from,
        name(&handed.name),
        fingerprint(&handed.to),
        counted(handed.counts.contacts, handed.counts.messages)
    ));
    if handed.confirmed {
        out.out("Both devices act for your account: start kkachi here again, and each shows what the other sends. Contacts seal to the new one from its first message to them.");
    } else {
        out.warn(format!(
            "The new device did not say its home is in place: check that it holds your account (`kkachi device list` there). If it does not, take it out here: `kkachi device remove {}`.",
            &hex(&handed.to)[..16]
        ));
    }
    Ok(out)
}

/// `kkachi device join CODE`: takes the account a device offers under `code` into
/// `home`, which must hold none yet, as a device of it called `device`.
pub async fn join(
    home: &Path,
    code: &[String],
    device: &str,
    json: bool,
) -> Result<Output, CommandError> {
    let typed = if code == ["-"] {
        code_from_stdin()?
    } else {
        zeroize::Zeroizing::new(code.join(" "))
    };
    let code = LinkCode::parse(&typed).map_err(LinkFailure::from)?;
    let into = home.to_path_buf();
    let state = std::sync::Arc::new(crate::link::JoinState::default());
    let joined_state = state.clone();
    let device = device.trim().to_owned();
    let named = device.clone();
    let mut joining = tokio::task::spawn_blocking(move || {
        crate::link::join(
            &into,
            &code,
            &device,
            |from, number| {
                if json {
                    eprintln!(
                        "{}",
                        json!({ "event": "connected", "from": from.to_string(), "safety_number": number })
                    );
                } else {
                    eprintln!(
                        "Connected to the device at {from}. Safety number: {number}. Check that it shows the same (it asks you to confirm there, unless it was started with --yes)."
                    );
                }
            },
            &joined_state,
        )
    });
    let joined = loop {
        tokio::select! {
            joined = &mut joining => break joined
                .map_err(|e| CommandError::Refused(format!("joining stopped: {e}")))??,
            _ = tokio::signal::ctrl_c() => {
                if !state.cancel() {
                    // The other device may have listed this one already.
                    eprintln!("the other device is listing this one: this can no longer be cancelled, and ends in a moment");
                    continue;
                }
                // The transfer stops within a moment, tells the other device, and
                // removes what it staged (the other device let go of nothing: that
                // waits for this one's word, which a cancelled join never gives).
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut joining).await;
                crate::backup::cancel_restore(home);
                eprintln!("cancelled: nothing was kept here, and your account's devices are as they were");
                std::process::exit(130);
            }
        }
    };
    let restored = &joined.restored;
    let key = restored.session_key;
    let mut out = Output::default();
    if json {
        out.json(json!({
            "home": home.display().to_string(),
            "peer_id": restored.peer.to_string(),
            "name": restored.name,
            "from": joined.from.to_string(),
            "key": hex(&key),
            "fingerprint": fingerprint(&key),
            "contacts": restored.counts.contacts,
            "messages": restored.counts.messages,
            "records": restored.counts.records,
            "resend": restored.resend,
            "new_key": restored.new_key,
            "device": named,
        }));
        return Ok(out);
    }
    out.out(format!(
        "This device now holds the account of {} ({}): {}, from the device at {}.",
        name(&restored.name),
        restored.peer,
        counted(restored.counts.contacts, restored.counts.messages),
        joined.from
    ));
    out.out(format!(
        "It is one of your devices, beside the other, under a key of its own ({}). From its first start, your contacts seal to it too once it writes to them, and your devices show each other what each sends and reads.",
        fingerprint(&key)
    ));
    out.out("This home has no passphrase yet: `kkachi passphrase set` adds one.");
    Ok(out)
}
