//! `device …` and `contact devices`: the devices an account lists (SPEC §15), ours and
//! a contact's, each shown with the fingerprint of its key so two people can compare
//! what each side sees.

use kkachi_protocol::device::DeviceSet;
use serde_json::json;
use unicode_width::UnicodeWidthStr;

use super::{App, CommandError, Output, hex, name};
use crate::cli::DeviceCommand;
use crate::engine::fingerprint;
use crate::time::format_ms;

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
