//! `send --file`, `files`, `get`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{App, CommandError, Output, fail, name};
use crate::engine::SendEvent;
use crate::files::{self, FilesError, Live, describe, hex, human_size};
use crate::store::{IncomingState, TransferId};

/// Says what became of the text given with a file (`went` introduces its message id
/// in plain output; JSON carries it in the file's object). A failure is a warning, not
/// the command's failure: the file went, and sending it all again would send it twice.
fn say_caption(
    out: &mut Output,
    json: bool,
    caption: Option<kkachi_protocol::MessageId>,
    error: Option<String>,
    went: &str,
) {
    if let (Some(caption), false) = (caption, json) {
        out.out(format!("{went} (message {caption})"));
    }
    if let Some(why) = error {
        out.warn(format!(
            "the text was not sent: {why}; send it again with `kkachi send`"
        ));
    }
}

/// How often a transfer run by this command reports how far it is (on stderr).
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Progress printed while a transfer runs; it stops when this is dropped.
struct Ticker(tokio::task::JoinHandle<()>);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Prints how far transfer `id` is on stderr while it runs: one line each time it
/// moves, as `label: done/total chunks (p%), rate`.
fn report_progress(live: Arc<Live>, incoming: bool, id: TransferId, label: String) -> Ticker {
    Ticker(tokio::spawn(async move {
        let mut last = None;
        loop {
            tokio::time::sleep(PROGRESS_EVERY).await;
            let Some(p) = live.progress(incoming, &id) else {
                continue;
            };
            if p.total == 0 || last == Some(p.done) {
                continue;
            }
            last = Some(p.done);
            eprintln!(
                "{label}: {}/{} chunks ({:.0}%), {}/s",
                p.done,
                p.total,
                100.0 * p.done as f64 / p.total as f64,
                human_size(p.rate() as u64)
            );
        }
    }))
}

/// What `send` sends as a file.
pub(super) enum Payload<'a> {
    /// A file on this device.
    Path(&'a Path),
    /// A file received here, passed on (`--forward`): how it was named.
    Forward(&'a str),
}

impl<'a> Payload<'a> {
    /// The file `send` was given, if any.
    pub(super) fn of(args: &'a crate::cli::SendArgs) -> Option<Self> {
        match (&args.file, &args.forward) {
            (Some(path), _) => Some(Payload::Path(path)),
            (None, Some(spec)) => Some(Payload::Forward(spec)),
            (None, None) => None,
        }
    }
}

impl App {
    /// How a contact or a group a file is with is named.
    fn party_name(&self, party: files::To) -> Result<String, CommandError> {
        Ok(match party {
            files::To::Contact(peer) => self
                .store
                .contact(&peer)?
                .map_or_else(|| peer.to_string(), |c| c.name),
            files::To::Group(group) => match self.store.group(&group)? {
                Some(record) => record
                    .roster(group)?
                    .map_or_else(|| group.to_hex(), |r| r.name),
                None => group.to_hex(),
            },
        })
    }

    /// `GROUP › MEMBER` for a file `member` sent to a group in message `message` (the
    /// member as we call them, or as named in the group), or just the group's name
    /// `group_name` if the message is gone.
    fn group_sender(
        &self,
        group: kkachi_protocol::group::GroupId,
        member: Option<kkachi_protocol::PeerId>,
        message: &[u8; 16],
        group_name: String,
    ) -> String {
        let Some(from) = member else {
            return group_name;
        };
        match self.store.group_message_by_id(&group, &from, message) {
            Ok(Some(m)) => {
                let member = match self.store.added_contact(&from).ok().flatten() {
                    Some(c) => c.name,
                    None => format!("~{}", m.name),
                };
                format!("{group_name} › {member}")
            }
            _ => group_name,
        }
    }

    /// `send CONTACT --file PATH [TEXT]`, and `send GROUP --file PATH [TEXT]` (`to_name`
    /// names the contact or the group); `--forward FILE` instead of `--file`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn send_file(
        &mut self,
        to: files::To,
        to_name: &str,
        payload: Payload<'_>,
        text: &str,
        timeout: f64,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        let engine = self.engine()?;
        let started = Instant::now();
        let claim = match payload {
            Payload::Path(path) => files::prepare(&engine, to, path).await?,
            Payload::Forward(spec) => {
                let (incoming, id) = files::find_transfer(&self.store, spec)?;
                if !incoming {
                    return fail(
                        "that is a file you sent; send it again from where it is with --file PATH",
                    );
                }
                let (_, file) = files::transfer_file(&self.store, true, &id)?;
                // Not here yet: fetched first, as `get` does.
                let ticker = self.owned.then(|| {
                    report_progress(
                        engine.transfers().clone(),
                        true,
                        id,
                        format!("fetching {}", files::safe_name(&file.name)),
                    )
                });
                let fetched = files::fetch(&engine, id).await;
                drop(ticker);
                let fetched = fetched?;
                if fetched.fetched > 0 && !json {
                    out.out(format!(
                        "fetched {} first ({} chunk(s))",
                        describe(&file),
                        fetched.fetched
                    ));
                }
                if !fetched.complete {
                    return fail(format!(
                        "{} is not all here yet, so it cannot be passed on; `kkachi get {}` goes on fetching it",
                        files::safe_name(&file.name),
                        &hex(&id)[..12]
                    ));
                }
                files::prepare_forward(&engine, to, id).await?
            }
        };
        let id = claim.id;
        let (_, file) = files::transfer_file(&self.store, false, &id)?;
        let ticker = self.owned.then(|| {
            report_progress(
                engine.transfers().clone(),
                false,
                id,
                format!("sending {}", files::safe_name(&file.name)),
            )
        });
        let result = files::upload(&engine, claim).await;
        drop(ticker);
        let report = match result {
            Ok(report) => report,
            Err(FilesError::Unavailable(why)) => {
                // Sealed and recorded: it goes once their relays take it. The text is
                // not held back with it: it goes now.
                let (caption, caption_error) = self.try_caption(to, text, timeout).await;
                let then = if self.owned {
                    "`kkachi sync` or `kkachi daemon` goes on with it"
                } else {
                    "the running kkachi goes on with it"
                };
                if json {
                    out.json(json!({ "file": hex(&id), "to": to_name, "state": "queued",
                                     "name": files::safe_name(&file.name), "size": file.size,
                                     "why": why, "text_id": caption.map(|c| c.to_hex()),
                                     "text_error": caption_error }));
                } else {
                    out.out(format!(
                        "queued {} for {} (file {}): {}; {then}",
                        describe(&file),
                        name(to_name),
                        &hex(&id)[..12],
                        crate::sanitize::for_terminal(&why)
                    ));
                }
                say_caption(
                    out,
                    json,
                    caption,
                    caption_error,
                    "the text went ahead of it",
                );
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        // The message: durable, then relayed (briefly waited for, as a text's).
        let mut state = "sent";
        let mut message = None;
        let mut relayed = None;
        if let (Some(sent), files::To::Group(group)) = (&report.group_sent, to) {
            // Durable (the engine said so before answering); then how many members'
            // relays took their copy within the timeout, as for a text.
            message = Some(sent.id.to_hex());
            let n = if report.group_relays {
                self.relayed_on_group_relays(group, sent.id, report.relays, timeout)
                    .await?
            } else {
                self.relayed_copies(group, sent.id, sent.copies, timeout)
                    .await?
            };
            relayed = Some(n);
            state = if sent.copies == 0 {
                "sent"
            } else if n == 0 {
                "queued"
            } else {
                "relayed"
            };
        }
        if let Some(mut sending) = report.sending {
            message = Some(sending.queued.id.to_hex());
            match sending.events.recv().await {
                Some(SendEvent::Durable) => {}
                Some(SendEvent::NotDurable(why)) => return Err(CommandError::NotSaved(why)),
                other => return fail(format!("the message could not be saved ({other:?})")),
            }
            state = "queued";
            let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
            while let Ok(Some(event)) =
                tokio::time::timeout_at(deadline.into(), sending.events.recv()).await
            {
                match event {
                    SendEvent::Progress(p) if p.acked > 0 || p.direct => {
                        state = "relayed";
                        break;
                    }
                    SendEvent::Delivered { .. } => {
                        state = "delivered";
                        break;
                    }
                    SendEvent::Withdrawn => {
                        state = "withdrawn";
                        break;
                    }
                    _ => {}
                }
            }
        }
        // Sealing and putting overlap: the rate is the file's size over the whole send.
        let seconds = started.elapsed().as_secs_f64();
        let rate = file.size as f64 / seconds.max(0.001);
        let (caption, caption_error) = self.try_caption(to, text, timeout).await;
        if json {
            out.json(json!({
                "id": message,
                "file": hex(&id),
                "to": to_name,
                "state": state,
                "name": files::safe_name(&file.name),
                "size": file.size,
                "copies": report.copies,
                "wanted": report.wanted,
                "members": report.members,
                "relayed": relayed,
                "text_id": caption.map(|c| c.to_hex()),
                "text_error": caption_error,
                "left_members": report.left_members,
                "relays": report.relays,
                "group_relays": report.group_relays,
                "bytes_put": report.bytes,
                "seconds": seconds,
                "left_out": report.left_out.iter()
                    .map(|(relay, why)| json!({ "relay": relay, "reason": why }))
                    .collect::<Vec<_>>(),
                "refused": report.refused.iter()
                    .map(|(relay, why)| json!({ "relay": relay, "reason": why }))
                    .collect::<Vec<_>>(),
            }));
        } else {
            let speed = if file.size >= 4 << 20 {
                format!(", {}/s", human_size(rate as u64))
            } else {
                String::new()
            };
            // Short of where it goes (a relay out): the rest follows.
            let so_far = if report.copies < report.wanted {
                format!(" so far (it goes on {} once they answer)", report.wanted)
            } else {
                String::new()
            };
            let placed = match to {
                files::To::Contact(_) => {
                    format!(
                        "each chunk on {} of their {} relays{so_far}",
                        report.copies, report.relays
                    )
                }
                files::To::Group(_) if report.group_relays => format!(
                    "each chunk on {} of the group's {} relays{so_far}, for {} member(s)",
                    report.copies, report.relays, report.members
                ),
                files::To::Group(_) => format!(
                    "each chunk on at least {} relays of each of {} member(s){so_far}",
                    report.copies, report.members
                ),
            };
            // Passed on again, or sent again: what the relays held already is not put.
            let put = if report.bytes == 0 {
                "; nothing put: the relays hold it already".to_owned()
            } else {
                String::new()
            };
            let went = match (relayed, &report.group_sent) {
                (Some(n), Some(_)) if report.group_relays => {
                    format!("message on {n} of {} group relay(s)", report.relays)
                }
                (Some(n), Some(sent)) => {
                    format!("message relayed for {n} of {} member(s)", sent.copies)
                }
                _ => format!("message {state}"),
            };
            out.out(format!(
                "sent {} to {}: {placed}{speed}{put} (file {}); {went}",
                describe(&file),
                name(to_name),
                &hex(&id)[..12],
            ));
            for (relay, why) in &report.left_out {
                out.warn(format!(
                    "relay {} was left out: {}",
                    crate::sanitize::for_terminal(relay),
                    crate::sanitize::for_terminal(&super::drill::why_down(why))
                ));
            }
            if report.degraded {
                out.warn(
                    "only one copy of each chunk is on a relay (the others refused or failed): \
                     if that relay is lost before it is fetched, the file is lost",
                );
            }
            if !report.left_members.is_empty() {
                let names: Vec<String> = report
                    .left_members
                    .iter()
                    .map(|n| name(n).into_owned())
                    .collect();
                out.warn(format!(
                    "not sent to {}: their relays took none of it; send it to them again later",
                    names.join(", ")
                ));
            }
        }
        say_caption(out, json, caption, caption_error, "and the text");
        Ok(())
    }

    /// [`Self::send_caption`], its failure given back as words.
    async fn try_caption(
        &mut self,
        to: files::To,
        text: &str,
        timeout: f64,
    ) -> (Option<kkachi_protocol::MessageId>, Option<String>) {
        match self.send_caption(to, text, timeout).await {
            Ok(id) => (id, None),
            Err(e) => (None, Some(e.to_string())),
        }
    }

    /// Sends the text given with a file, if any (after the file's message, or ahead of
    /// a file that waits for relays to take it); its message id.
    async fn send_caption(
        &mut self,
        to: files::To,
        text: &str,
        timeout: f64,
    ) -> Result<Option<kkachi_protocol::MessageId>, CommandError> {
        if text.trim().is_empty() {
            return Ok(None);
        }
        let engine = self.engine()?;
        let id = match to {
            files::To::Contact(peer) => {
                let mut sending = engine.send(peer, text.to_owned()).await?;
                match sending.events.recv().await {
                    Some(SendEvent::Durable) => {}
                    Some(SendEvent::NotDurable(why)) => {
                        return Err(CommandError::NotSaved(why));
                    }
                    other => return fail(format!("the text could not be saved ({other:?})")),
                }
                sending.queued.id
            }
            // Durable once answered; then put on the members' relays, briefly waited
            // for as the file's message was.
            files::To::Group(group) => {
                let id = engine.send_group(group, text.to_owned()).await?.id;
                let _ = tokio::time::timeout(
                    Duration::from_secs_f64(timeout.max(0.0)),
                    engine.deliver_now(),
                )
                .await;
                id
            }
        };
        Ok(Some(id))
    }

    /// `files --cancel FILE`.
    pub(super) fn cancel_file(
        &mut self,
        spec: &str,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        let (incoming, id) = files::find_transfer(&self.store, spec)?;
        let (_, file) = files::transfer_file(&self.store, incoming, &id)?;
        let what = files::cancel(&self.store, incoming, &id)?;
        if json {
            out.json(
                json!({ "cancelled": hex(&id), "direction": if incoming { "in" } else { "out" } }),
            );
        } else {
            out.out(match what {
                files::Cancelled::Upload => format!("{} will not be sent", describe(&file)),
                files::Cancelled::Fetch => format!(
                    "stopped fetching {}; `kkachi get {}` fetches it again",
                    describe(&file),
                    &hex(&id)[..12]
                ),
            });
        }
        Ok(())
    }

    /// `files`: every transfer, newest first.
    pub(super) fn files(&mut self, json: bool, out: &mut Output) -> Result<(), CommandError> {
        files::sweep(&self.store)?;
        let (outgoing, incoming) = self.store.file_transfers()?;
        let live = self.engine.as_ref().map(|e| e.transfers().clone());
        let contacts = self.store.contacts()?;
        // Each group's name, its log merged once (not once per file).
        let group_names: std::collections::HashMap<_, _> = super::groups::groups(&self.store)?
            .into_iter()
            .map(|g| (g.id, g.roster.name))
            .collect();
        let who = |group: Option<kkachi_protocol::group::GroupId>,
                   peer: Option<kkachi_protocol::PeerId>| {
            match group {
                Some(group) => group_names
                    .get(&group)
                    .cloned()
                    .unwrap_or_else(|| group.to_hex()),
                None => peer
                    .and_then(|p| contacts.iter().find(|c| c.peer == p))
                    .map_or_else(|| "(no longer a contact)".to_string(), |c| c.name.clone()),
            }
        };
        let home = self.store.home().to_path_buf();
        // Newest first: by when it was sent or arrived, then by its sender's clock.
        let mut rows: Vec<((u64, u64), serde_json::Value, String)> = Vec::new();
        for (id, r) in &outgoing {
            let Ok(file) = r.file() else { continue };
            let running = live.as_ref().and_then(|l| l.progress(false, id));
            let (state, detail) = if r.finished {
                ("sent", "sent".to_string())
            } else if r.message_sent {
                // Sent with fewer copies than it goes to: the rest follow.
                (
                    "sent",
                    format!(
                        "sent{}",
                        r.last_error
                            .as_ref()
                            .map(|e| format!("; {}", crate::sanitize::for_terminal(e)))
                            .unwrap_or_default()
                    ),
                )
            } else if let Some(p) = &running {
                (
                    "uploading",
                    format!("uploading {}/{} chunks", p.done, p.total),
                )
            } else {
                (
                    "waiting",
                    format!(
                        "waiting for their relays{}",
                        r.last_error
                            .as_ref()
                            .map(|e| format!(": {}", crate::sanitize::for_terminal(e)))
                            .unwrap_or_default()
                    ),
                )
            };
            let to = who(r.group(), r.contact());
            rows.push((
                (r.created_ms, r.created_ms),
                json!({
                    "id": hex(id), "direction": "out", "contact": to,
                    "name": files::safe_name(&file.name), "size": file.size, "mime": file.mime,
                    "state": state, "message": r.message.map(|m| hex16(&m)),
                    "error": r.last_error,
                    "done": running.as_ref().map(|p| p.done), "total": running.as_ref().map(|p| p.total),
                }),
                format!(
                    "{}  → {}  {}  {detail}",
                    &hex(id)[..12],
                    name(&to),
                    describe(&file)
                ),
            ));
        }
        for (id, r) in &incoming {
            let Ok(file) = r.file() else { continue };
            let running = live.as_ref().and_then(|l| l.progress(true, id));
            let on_disk = files::fetched_chunks(&home, id, &file);
            let (done, total) = match (&running, on_disk) {
                (Some(p), _) if p.total > 0 => (Some(p.done), Some(p.total)),
                (_, Some((d, t))) => (Some(d), Some(t)),
                _ => (None, None),
            };
            let (state, detail) = match &r.state {
                IncomingState::Done if !r.saved.is_empty() => (
                    "saved",
                    format!(
                        "saved to {}",
                        crate::sanitize::for_terminal(r.saved.last().expect("not empty"))
                    ),
                ),
                IncomingState::Done => (
                    "fetched",
                    format!("fetched; `kkachi get {}` saves it", &hex(id)[..12]),
                ),
                IncomingState::Fetching => (
                    "fetching",
                    match (done, total) {
                        (Some(d), Some(t)) => format!("fetching {d}/{t} chunks"),
                        _ => "fetching".to_string(),
                    },
                ),
                IncomingState::Offered => (
                    "offered",
                    format!("not fetched; `kkachi get {}` fetches it", &hex(id)[..12]),
                ),
                IncomingState::Failed(why) => (
                    "failed",
                    format!("failed: {}", crate::sanitize::for_terminal(why)),
                ),
            };
            let from = match r.group() {
                Some(group) => {
                    self.group_sender(group, r.member(), &r.message, who(Some(group), None))
                }
                None => who(None, r.contact()),
            };
            let sent_at = r
                .contact()
                .and_then(|p| {
                    self.store
                        .message(&p, &kkachi_protocol::MessageId(r.message))
                        .ok()
                        .flatten()
                })
                .map_or(0, |(_, m)| m.sent_at_ms);
            rows.push((
                (r.created_ms, sent_at),
                json!({
                    "id": hex(id), "direction": "in", "contact": from,
                    "name": files::safe_name(&file.name), "size": file.size, "mime": file.mime,
                    "state": state, "message": hex16(&r.message), "done": done, "total": total,
                    "bad_chunks": r.bad_chunks, "saved": r.saved,
                    "error": match &r.state { IncomingState::Failed(w) => Some(w.clone()), _ => None },
                }),
                format!(
                    "{}  ← {}  {}  {detail}",
                    &hex(id)[..12],
                    name(&from),
                    describe(&file)
                ),
            ));
        }
        rows.sort_by_key(|r| std::cmp::Reverse(r.0));
        if json {
            out.json(json!(rows.into_iter().map(|r| r.1).collect::<Vec<_>>()));
        } else if rows.is_empty() {
            out.out("no files sent or received yet; `kkachi send CONTACT --file PATH` sends one");
        } else {
            for (_, _, line) in rows {
                out.out(line);
            }
        }
        Ok(())
    }

    /// `get ID [--to DIR]`.
    pub(super) async fn get(
        &mut self,
        spec: &str,
        to: Option<PathBuf>,
        json: bool,
        out: &mut Output,
    ) -> Result<(), CommandError> {
        let (incoming, id) = files::find_transfer(&self.store, spec)?;
        if !incoming {
            return fail("that is a file you sent; `kkachi files` shows how far it is");
        }
        let (peer, file) = files::transfer_file(&self.store, true, &id)?;
        let dir = match to {
            Some(dir) => dir,
            None => std::env::current_dir()?,
        };
        if dir.exists() && !dir.is_dir() {
            return fail(format!(
                "--to names a folder to save into; {} is a file",
                crate::sanitize::for_terminal(&dir.display().to_string())
            ));
        }
        let engine = self.engine()?;
        let ticker = self.owned.then(|| {
            report_progress(
                engine.transfers().clone(),
                true,
                id,
                format!("fetching {}", files::safe_name(&file.name)),
            )
        });
        let result = files::fetch(&engine, id).await;
        drop(ticker);
        let report = result?;
        let store = self.store.clone();
        let target = dir.clone();
        let path = tokio::task::spawn_blocking(move || files::export(&store, &id, &target))
            .await
            .map_err(|e| CommandError::Refused(format!("saving the file failed: {e}")))??;
        // Saved: our relays may let its chunks go (the sealed copy here stays).
        if let Err(e) = files::release(&engine, id).await {
            tracing::warn!(error = %e, "relays not told to let a saved file go; they drop it when it expires");
        }
        let from = match peer {
            files::To::Group(group) => {
                let record = self.store.incoming_file(&id)?;
                let (member, message) = record.map(|r| (r.member(), r.message)).unwrap_or_default();
                self.group_sender(group, member, &message, self.party_name(peer)?)
            }
            files::To::Contact(_) => self.party_name(peer)?,
        };
        if json {
            out.json(json!({
                "id": hex(&id), "path": path.display().to_string(), "name": files::safe_name(&file.name),
                "size": file.size, "from": from, "fetched": report.fetched, "chunks": report.chunks,
                "bad_chunks": report.bad, "seconds": report.elapsed.as_secs_f64(),
            }));
        } else {
            out.out(format!(
                "saved {} from {} to {}",
                describe(&file),
                name(&from),
                crate::sanitize::for_terminal(&path.display().to_string())
            ));
            if report.bad > 0 {
                out.warn(format!(
                    "{} chunk(s) came damaged from a relay and were fetched again from another",
                    report.bad
                ));
            }
        }
        Ok(())
    }
}

fn hex16(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
