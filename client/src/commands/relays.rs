//! `relay add|list|remove`, and telling contacts when relays change.

use std::time::{Duration, Instant};

use kkachi_protocol::wire::RelayInfo;
use kkachi_protocol::{Card, ClientToRelay, Multiaddr, RelayToClient};
use serde_json::json;

use super::{App, CommandError, Output, fail, name};
use crate::engine::now_ms;
use crate::net::{Transport, peer_of};
use crate::store::{LocalStore, WriteSet};

impl App {
    pub(super) fn own_card(&self) -> Result<Card, CommandError> {
        self.profile()?;
        Ok(self.store.own_card(&self.identity()?)?)
    }

    /// After a change of relays or name: a new card version, sent to every contact in-band, and our
    /// queue opened on every relay with what it should grant (our card's
    /// contact-request capability, a capability per contact), so the new invite code
    /// works at once.
    pub(super) async fn announce_card(&mut self, out: &mut Output) -> Result<(), CommandError> {
        let mut profile = self.profile()?;
        profile.card_version += 1;
        let mut w = WriteSet::default();
        LocalStore::write_profile(&mut w, &profile);
        self.store.apply(w)?;
        self.send_card(out).await
    }

    /// Sends our card (its version raised already, in the same write as what changed,
    /// so a crash before this leaves it for the engine's next start to send) to every
    /// contact, and opens our queues on every relay.
    pub(super) async fn send_card(&mut self, out: &mut Output) -> Result<(), CommandError> {
        let contacts = self.store.contacts()?;
        let engine = self.engine()?;
        engine.relays_changed(!contacts.is_empty()).await?;
        // What was queued, and the grants, go out before this command ends (a daemon
        // keeps at it).
        engine.settle().await?;
        if !contacts.is_empty() {
            out.warn(format!(
                "your new card was sent to {} contact(s)",
                contacts.len()
            ));
        }
        Ok(())
    }

    /// A new request epoch: earlier invite codes stop reaching us once our relays have
    /// been told (now, as for a change of relays), and contacts get the new card.
    /// `automatic`: the old code was about to run out (else the user asked).
    pub(super) async fn renew_invite(
        &mut self,
        automatic: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        let mut profile = self.profile()?;
        if profile.request_epoch == u32::MAX {
            return fail("this identity has renewed its code as often as it can");
        }
        profile.renew_card(now_ms() / 1000);
        let mut w = WriteSet::default();
        LocalStore::write_profile(&mut w, &profile);
        self.store.apply(w)?;
        self.announce_card(out).await?;
        if automatic {
            out.warn("your invite code was about to expire, so here is a new one; earlier codes no longer reach you (your contacts are not affected)");
        } else {
            out.warn(
                "your earlier invite codes no longer reach you; your contacts are not affected",
            );
        }
        Ok(())
    }

    /// A new session key (SPEC.md §1, §2): the old one is read for as long as what was
    /// sealed to it can arrive, every session starts again under the new one, and every
    /// contact is sent the new card (from this command's engine, or the next start's).
    pub(super) async fn rotate_key(
        &mut self,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        if self.engine.is_some() && !self.owned {
            return fail(
                "rotate-key replaces the keys a running kkachi holds: stop the daemon and quit the UI, then run it again",
            );
        }
        let now_s = now_ms() / 1000;
        let earlier = self.store.previous_key(now_s)?;
        let rotated = self
            .store
            .rotate_session_key(now_s, &mut rand_core::OsRng)?;
        // Each change of key signs a record of the account's devices, which holds 32.
        if let Some(set) = self.store.own_devices(&rotated.identity)? {
            let left = kkachi_protocol::device::MAX_EDIT_RECORDS.saturating_sub(set.records());
            if left <= 4 {
                out.warn(format!(
                    "{left} more change(s) of key (or restores) fit in your account's list of devices; past them, only a new identity changes key"
                ));
            }
        }
        if earlier.is_some() {
            out.warn("the key before your last rotation is no longer read: contacts who have not heard from you since then send again, once your new card reaches them, what you had not confirmed");
        }
        let contacts = self
            .store
            .added_contacts()?
            .iter()
            .filter(|c| matches!(self.store.blocked(&c.peer), Ok(None)))
            .count();
        self.send_card(out).await?;
        let days = kkachi_protocol::session::RETAIN_SECS / 86_400;
        if json {
            out.json(json!({
                "card_version": rotated.card_version,
                "contacts": contacts,
                "old_key_read_until_ms": rotated.old_key_until.saturating_mul(1000),
                "resealed": rotated.resealed,
            }));
        } else {
            out.out(format!(
                "your session key is new; you are the same person to your {contacts} contact(s), who are sent your new card and need do nothing"
            ));
            out.out(format!(
                "what contacts sealed to the old one is still read for {days} days; {} message(s) of yours not yet confirmed go again under the new one",
                rotated.resealed
            ));
            out.out("your earlier invite codes no longer reach you: share `kkachi invite` again");
            out.out(
                "if you keep backups, make a new one: one made before now holds the key just replaced",
            );
        }
        Ok(())
    }

    pub(super) async fn relay_add(
        &mut self,
        addrs: &[String],
        token: Option<String>,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        if let Some(t) = &token
            && (t.is_empty() || t.len() > kkachi_protocol::wire::MAX_TOKEN_LEN)
        {
            return fail(format!(
                "an access token is 1 to {} bytes",
                kkachi_protocol::wire::MAX_TOKEN_LEN
            ));
        }
        self.identity()?;
        let mut parsed = Vec::new();
        for a in addrs {
            let addr: Multiaddr = a
                .parse()
                .map_err(|e| CommandError::Refused(format!("{a:?} is not a multiaddr ({e}); expected e.g. /ip4/203.0.113.5/tcp/4040/p2p/12D3KooW...")))?;
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
            } else if token.is_none() {
                out.warn(format!("{addr} is already one of your relays"));
            }
            if let Some(t) = &token {
                self.store
                    .update_relay(&addr.to_string(), |r| r.token = Some(t.clone()))?;
            }
        }
        if token.is_some() && added.is_empty() {
            // A token for relays already ours: opened there now.
            self.announce_card(out).await?;
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

    pub(super) async fn relay_remove(
        &mut self,
        addr: &str,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
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

    pub(super) async fn relay_list(
        &mut self,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
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
                (None, Err(e)) => format!("down: {}", super::drill::why_down(&e.to_string())),
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
            // The relay chose its name and failure domain, and the status may quote its
            // error: none of them reaches the terminal raw.
            for (addr, relay_name, domain, _, status, _) in &rows {
                let domain = if domain.is_empty() {
                    "(no failure domain)"
                } else {
                    domain
                };
                out.out(format!(
                    "{:<16} {:<24} {:<16} {addr}",
                    name(status),
                    name(domain),
                    name(relay_name)
                ));
            }
        }
        for warning in failure_domain_warnings(rows.iter().map(|r| r.2.as_str())) {
            out.warn(format!("warning: {}", name(&warning)));
        }
        Ok(())
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
