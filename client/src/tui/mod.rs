//! The terminal UI, in The Elm Architecture: [`state`] is the model, [`update`] turns
//! messages into state changes and effects (no I/O), [`view`] draws. This module is
//! the runtime: it reads keys on a thread, runs effects as tasks, feeds engine events
//! back as messages, and redraws. The network runs in its own tasks; the UI never
//! waits on it. Logs go to `kkachi.log` in the home directory, never over the screen.

#[cfg(feature = "demo")]
pub mod demo;
pub mod graphics;
pub mod state;
pub mod update;
pub mod view;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kkachi_protocol::PeerId;
use ratatui::crossterm::event::{self, Event};
use tokio::sync::mpsc;

use crate::cli::Command;
use crate::commands::{App, CommandError};
use crate::engine::{AppEvent, Engine, Mode, SendEvent};
use crate::net::{NetConfig, Network, Transport, peer_of};
use crate::store::{Direction, LocalStore, MessageState, StoreError};
use state::{ConversationSummary, Snapshot, State, Status};
use update::{Effect, Msg, update};

/// Messages shown per conversation.
const MESSAGES_SHOWN: usize = 500;
/// Status refresh even when nothing happens.
const TICK: Duration = Duration::from_millis(500);
/// How long a notice stays in the status bar.
const NOTICE_FOR: Duration = Duration::from_secs(8);

/// Demo hooks: take relays down and bring them back, cut the direct path.
pub trait RelaySwitch: Send + Sync {
    /// Toggles relay `n`; returns a line to show.
    fn toggle(&self, n: usize) -> futures::future::BoxFuture<'_, String>;
    /// Cuts the direct path between the demo's two users, or restores it, on the
    /// other user's side; returns whether it is cut now.
    fn toggle_direct(&self) -> bool;
    /// Connects `you` (the user of the UI) directly to the other user, as two people on
    /// one network would be; once at start, and again when the path is restored.
    fn connect(&self, you: crate::net::Network) -> futures::future::BoxFuture<'static, ()>;
}

/// Runs the UI for `home` with the default network settings.
pub async fn run(home: &Path) -> Result<(), CommandError> {
    run_with(home, crate::runtime::net_config(), None).await
}

/// Everything online for one home: the engine (receiving and delivering) and the
/// control socket other `kkachi` commands are forwarded to.
struct Online {
    engine: Engine<Network>,
    control: crate::ipc::Control,
    transfers: tokio::task::JoinHandle<()>,
}

impl Online {
    async fn start(
        home: &Path,
        store: LocalStore,
        config: NetConfig,
    ) -> Result<Self, CommandError> {
        let me = store.acting_identity()?.ok_or(CommandError::NoIdentity)?;
        let engine = crate::runtime::start_engine(store, me, config, Mode::ONLINE)?;
        let control = crate::ipc::Control::start(home, engine.clone()).await?;
        let transfers =
            crate::files::keep_going(engine.clone(), std::time::Duration::from_secs(20));
        Ok(Self {
            engine,
            control,
            transfers,
        })
    }

    /// Stops the engine (which flushes what it wrote), then the control socket (whose
    /// commands under way answer).
    async fn shutdown(self) -> Result<(), CommandError> {
        self.transfers.abort();
        let stopped = self.engine.shutdown().await;
        self.control.stop().await;
        Ok(stopped?)
    }
}

/// Runs the UI for `home`; `demo` adds keys to switch relays.
pub async fn run_with(
    home: &Path,
    config: NetConfig,
    demo: Option<Arc<dyn RelaySwitch>>,
) -> Result<(), CommandError> {
    let store = match LocalStore::open(home) {
        Ok(s) => s,
        Err(StoreError::Locked(_)) => {
            return Err(CommandError::Refused(
                crate::link::held_by_linking(home).unwrap_or_else(|| format!(
                    "kkachi is already running for {} (a daemon or another UI); stop it to open the UI here (the UI stays online just like a daemon)",
                    home.display()
                )),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let mut online = match store.identity()? {
        Some(_) => Some(Online::start(home, store.clone(), config.clone()).await?),
        None => None,
    };
    let mut state = State {
        demo: demo.is_some(),
        ..State::default()
    };
    let (tx, mut rx) = mpsc::channel::<Msg>(256);
    let mut events = online.as_ref().map(|o| o.engine.subscribe());
    if let (Some(d), Some(o)) = (&demo, &online) {
        tokio::spawn(d.connect(o.engine.net().clone()));
    }
    let mut terminal = ratatui::init();
    // Asked of the terminal before anything reads keys: its answer comes as input.
    graphics::detect();
    spawn_key_reader(tx.clone());
    let _ = ratatui::crossterm::execute!(
        std::io::stdout(),
        ratatui::crossterm::event::EnableBracketedPaste,
        ratatui::crossterm::event::EnableMouseCapture
    );
    // A panic leaves the terminal as it was found: mouse reports and bracketed paste
    // off, then ratatui's own hook restores the rest.
    let ratatui_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let _ = ratatui::crossterm::execute!(
            std::io::stdout(),
            ratatui::crossterm::event::DisableMouseCapture,
            ratatui::crossterm::event::DisableBracketedPaste
        );
        ratatui_hook(info);
    }));
    let mut tick = tokio::time::interval(TICK);
    // A conversation the UI opens is read: its badge goes, and its sender hears so.
    let mark = |effects: Vec<Effect>, online: &Option<Online>| {
        for effect in effects {
            if let (Effect::MarkRead(_), Some(o)) = (&effect, online) {
                run_effect(effect, o.engine.clone(), demo.clone(), tx.clone());
            }
        }
    };
    let first = update(
        &mut state,
        Msg::Loaded(snapshot(
            &store,
            online.as_ref().map(|o| &o.engine),
            None,
            None,
        )),
    );
    mark(first, &online);
    let result = loop {
        if let Err(e) = terminal.draw(|f| view::view(&state, f)) {
            break Err(CommandError::Terminal(e));
        }
        let msg = tokio::select! {
            Some(msg) = rx.recv() => msg,
            event = recv_event(&mut events) => match event {
                // Shown as soon as it is in the store; the durable copy changes nothing.
                // Ours, sent from another device of ours: shown, neither rung nor notified.
                Some(AppEvent::Incoming(r))
                    if r.message.direction == crate::store::Direction::Out =>
                {
                    Msg::Redraw
                }
                Some(AppEvent::Incoming(r)) if r.change.is_none() => match &r.group {
                    Some(group) => Msg::GroupArrived {
                        id: group.id,
                        group: group.name.clone(),
                        from: r.name.clone(),
                        event: group.event.then(|| r.message.text.clone()),
                    },
                    None => Msg::Arrived(r.contact),
                },
                Some(AppEvent::Message(_)) => Msg::Redraw,
                // A contact's keys changed: said on the notice line (`/devices` shows them).
                Some(AppEvent::DevicesChanged { name, added, removed, .. }) => Msg::Done {
                    title: None,
                    result: Ok(crate::engine::device_change_line(&name, &added, &removed)),
                },
                Some(AppEvent::Request(peer)) => {
                    let data = snapshot(&store, online.as_ref().map(|o| &o.engine), state.selected, state.group);
                    mark(update(&mut state, Msg::Loaded(data)), &online);
                    Msg::Request(peer)
                }
                _ => Msg::Loaded(snapshot(&store, online.as_ref().map(|o| &o.engine), state.selected, state.group)),
            },
            _ = tick.tick() => {
                if state.notice.as_ref().is_some_and(|(_, at)| at.elapsed() > NOTICE_FOR) {
                    state.notice = None;
                }
                Msg::Loaded(snapshot(&store, online.as_ref().map(|o| &o.engine), state.selected, state.group))
            }
        };
        for effect in update(&mut state, msg) {
            match effect {
                Effect::Init(name) => {
                    let mut app = App::new(store.clone());
                    match app.run(Command::Init { name }, false).await {
                        Ok(_) => match Online::start(home, store.clone(), config.clone()).await {
                            Ok(o) => {
                                events = Some(o.engine.subscribe());
                                online = Some(o);
                            }
                            Err(e) => {
                                state.notice =
                                    Some((format!("error: {e}"), std::time::Instant::now()))
                            }
                        },
                        Err(e) => {
                            state.notice = Some((format!("error: {e}"), std::time::Instant::now()))
                        }
                    }
                    let data = snapshot(
                        &store,
                        online.as_ref().map(|o| &o.engine),
                        state.selected,
                        state.group,
                    );
                    mark(update(&mut state, Msg::Loaded(data)), &online);
                }
                Effect::Reload => {
                    let data = snapshot(
                        &store,
                        online.as_ref().map(|o| &o.engine),
                        state.selected,
                        state.group,
                    );
                    mark(update(&mut state, Msg::Loaded(data)), &online);
                }
                Effect::Bell => {
                    let _ = std::io::stdout().write_all(b"\x07");
                    let _ = std::io::stdout().flush();
                }
                Effect::Notify { from } => notify(&from),
                Effect::Copy(text) => {
                    // OSC 52: terminals that allow it put this on the clipboard.
                    let _ = write!(
                        std::io::stdout(),
                        "\x1b]52;c;{}\x07",
                        base64(text.as_bytes())
                    );
                    let _ = std::io::stdout().flush();
                }
                Effect::Mouse(on) => {
                    let _ = if on {
                        ratatui::crossterm::execute!(
                            std::io::stdout(),
                            ratatui::crossterm::event::EnableMouseCapture
                        )
                    } else {
                        ratatui::crossterm::execute!(
                            std::io::stdout(),
                            ratatui::crossterm::event::DisableMouseCapture
                        )
                    };
                }
                other => {
                    if let Some(o) = &online {
                        run_effect(other, o.engine.clone(), demo.clone(), tx.clone());
                    }
                }
            }
        }
        if state.quit {
            break Ok(());
        }
    };
    let _ = ratatui::crossterm::execute!(
        std::io::stdout(),
        ratatui::crossterm::event::DisableMouseCapture,
        ratatui::crossterm::event::DisableBracketedPaste
    );
    ratatui::restore();
    let stopped = match online {
        Some(o) => o.shutdown().await,
        None => Ok(()),
    };
    store.flush().await?;
    result.and(stopped)
}

async fn recv_event(
    events: &mut Option<tokio::sync::broadcast::Receiver<AppEvent>>,
) -> Option<AppEvent> {
    match events {
        // Lagged (None): the caller reloads everything.
        Some(rx) => rx.recv().await.ok(),
        None => std::future::pending().await,
    }
}

/// Lines one turn of the mouse wheel scrolls.
const WHEEL_LINES: i32 = 3;

/// Reads terminal events on a thread (crossterm's reader blocks).
fn spawn_key_reader(tx: mpsc::Sender<Msg>) {
    std::thread::spawn(move || {
        loop {
            let msg = match event::read() {
                Ok(Event::Key(key)) => Msg::Key(key),
                Ok(Event::Paste(text)) => Msg::Paste(text),
                Ok(Event::Resize(..)) => Msg::Redraw,
                Ok(Event::Mouse(mouse)) => match mouse.kind {
                    event::MouseEventKind::ScrollUp => Msg::Scroll(WHEEL_LINES),
                    event::MouseEventKind::ScrollDown => Msg::Scroll(-WHEEL_LINES),
                    _ => continue,
                },
                Ok(_) => continue,
                Err(_) => break,
            };
            if tx.blocking_send(msg).is_err() {
                break;
            }
        }
    });
}

/// Runs an effect in the background; its outcome comes back as a message.
fn run_effect(
    effect: Effect,
    engine: Engine<Network>,
    demo: Option<Arc<dyn RelaySwitch>>,
    tx: mpsc::Sender<Msg>,
) {
    tokio::spawn(async move {
        let done = match effect {
            Effect::Send { to, text, reply_to } => {
                let result = async {
                    let mut sending = engine.send_reply(to, text, reply_to).await?;
                    let _ = tx.send(Msg::Redraw).await;
                    // Its marks follow from the engine's events; only a failure to save it
                    // is said here.
                    match sending.events.recv().await {
                        Some(SendEvent::NotDurable(why)) => Err(CommandError::NotSaved(why)),
                        _ => Ok::<_, CommandError>(String::new()),
                    }
                }
                .await;
                match result {
                    Ok(_) => Msg::Done {
                        title: None,
                        result: Ok(String::new()),
                    },
                    Err(e) => Msg::Done {
                        title: None,
                        result: Err(e.to_string()),
                    },
                }
            }
            Effect::Run { command, title } => {
                let mut app = App::online(engine);
                let result = match app.run(command, false).await {
                    // A report that found something (the drill) is still shown whole.
                    Ok(out) if out.code == 0 || (title.is_some() && !out.stdout.is_empty()) => {
                        Ok(format!("{}{}", out.stdout, out.stderr)
                            .trim_end()
                            .to_string())
                    }
                    Ok(out) => Err(out.stderr.trim().to_string()),
                    Err(e) => Err(e.to_string()),
                };
                let result = result.map(|s| if s.is_empty() { "done".into() } else { s });
                Msg::Done { title, result }
            }
            Effect::SendGroup { group, text } => {
                let result = engine.send_group(group, text).await;
                Msg::Done {
                    title: None,
                    result: match result {
                        Ok(sent) if sent.unreachable.is_empty() => Ok(String::new()),
                        Ok(sent) => Ok(format!(
                            "not sent to {} (blocked, or no card of theirs yet)",
                            crate::sanitize::for_terminal(&sent.unreachable.join(", "))
                        )),
                        Err(e) => Err(e.to_string()),
                    },
                }
            }
            Effect::MarkGroupRead(id) => {
                if let Err(e) = engine.mark_group_read(id).await {
                    tracing::warn!(error = %e, "could not send read receipts to the group");
                }
                return;
            }
            Effect::MarkRead(peer) => {
                if let Err(e) = engine.mark_read(peer).await {
                    tracing::warn!(error = %e, "could not send read receipts");
                }
                return;
            }
            Effect::ToggleRelay(n) => match demo {
                Some(d) => {
                    let line = d.toggle(n).await;
                    // Back up: no waiting out a backoff to use it.
                    engine.retry_now();
                    Msg::Done {
                        title: None,
                        result: Ok(line),
                    }
                }
                None => return,
            },
            Effect::ToggleDirect => match demo {
                Some(d) => {
                    let cut = d.toggle_direct();
                    engine.net().set_direct_cut(cut);
                    if !cut {
                        d.connect(engine.net().clone()).await;
                    }
                    Msg::Done {
                        title: None,
                        result: Ok(if cut {
                            "direct path CUT: messages now go through the relays only".into()
                        } else {
                            "direct path restored".into()
                        }),
                    }
                }
                None => return,
            },
            Effect::Open { id, to } => {
                let mut app = App::online(engine);
                let result = match app.run(Command::Get { id, to: Some(to) }, true).await {
                    Ok(out) if out.code == 0 => {
                        let saved: serde_json::Value =
                            serde_json::from_str(out.stdout.trim()).unwrap_or_default();
                        match saved["path"].as_str() {
                            Some(path) => {
                                let path = path.to_string();
                                tokio::task::spawn_blocking(move || open_with_desktop(&path))
                                    .await
                                    .unwrap_or_else(|e| Err(e.to_string()))
                            }
                            None => Err("the file was not saved".to_string()),
                        }
                    }
                    Ok(out) => Err(out.stderr.trim().to_string()),
                    Err(e) => Err(e.to_string()),
                };
                Msg::Done {
                    title: None,
                    result,
                }
            }
            Effect::Invite => {
                let home = engine.store().home().to_path_buf();
                let mut app = App::online(engine);
                let invite = app
                    .run(
                        Command::Invite {
                            qr: false,
                            renew: false,
                        },
                        true,
                    )
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|out| {
                        let v: serde_json::Value =
                            serde_json::from_str(out.stdout.trim()).map_err(|e| e.to_string())?;
                        match (v["invite"].as_str(), v["expires_at"].as_u64()) {
                            (Some(code), Some(expires_at)) => Ok((code.to_string(), expires_at)),
                            _ => Err(out.stderr.trim().to_string()),
                        }
                    });
                match invite {
                    Ok((code, expires_at)) => {
                        // Also in a file, to hand over by other means than the screen.
                        let file = home.join("invite.txt");
                        let saved = std::fs::write(&file, format!("{code}\n"))
                            .map(|()| crate::sanitize::for_terminal(&file.display().to_string()).into_owned())
                            .map_err(|e| tracing::warn!(error = %e, "could not write the invite code to a file"))
                            .ok();
                        Msg::Invite {
                            code,
                            expires_at,
                            saved,
                        }
                    }
                    Err(e) => Msg::Done {
                        title: None,
                        result: Err(e),
                    },
                }
            }
            Effect::Init(_)
            | Effect::Reload
            | Effect::Bell
            | Effect::Notify { .. }
            | Effect::Copy(_)
            | Effect::Mouse(_) => return,
        };
        let _ = tx.send(done).await;
    });
}

/// Standard base64 (for OSC 52).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Opens the saved file at `path` with the desktop's program for its type (`xdg-open`;
/// `open` on macOS), once its first bytes are what its name says; says where it is
/// when it is not opened. Blocks until the opener has handed it over.
fn open_with_desktop(path: &str) -> Result<String, String> {
    let shown = crate::sanitize::for_terminal(path).into_owned();
    // Saved in any case: what follows only says whether it also opened.
    if !crate::files::content_matches(std::path::Path::new(path)) {
        return Ok(format!(
            "saved to {shown}; not opened: it is not what its name says"
        ));
    }
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    let status = std::process::Command::new(opener)
        .arg(path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    Ok(match status {
        Ok(s) if s.success() => format!("saved to {shown}, and opened"),
        Ok(s) => format!("saved to {shown}; not opened: {opener} failed ({s})"),
        Err(_) => format!("saved to {shown}; not opened: {opener} is not installed here"),
    })
}

/// Tells the person a message from `from` arrived: a terminal notification (OSC 777,
/// and OSC 9 for terminals that know that one), and a desktop one where `notify-send`
/// is installed. The name only, never the text: a notification may show on a locked
/// screen.
fn notify(from: &str) {
    // Nothing a contact chose reaches the terminal raw: control characters go, and the
    // separators of these sequences too.
    let name: String = crate::sanitize::for_terminal(from)
        .chars()
        .filter(|c| !c.is_control() && *c != ';')
        .take(64)
        .collect();
    let _ = write!(
        std::io::stdout(),
        "\x1b]777;notify;kkachi;Message from {name}\x07\x1b]9;kkachi: message from {name}\x07"
    );
    let _ = std::io::stdout().flush();
    // Notification servers read the body as markup.
    let body = format!("Message from {name}")
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    if let Ok(mut child) = std::process::Command::new("notify-send")
        .args(["--app-name=kkachi", "kkachi", &body])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        // Reaped off the UI's thread.
        std::thread::spawn(move || child.wait());
    }
}

/// Reads what the UI shows from the store and the network.
pub fn snapshot(
    store: &LocalStore,
    engine: Option<&Engine<Network>>,
    selected: Option<PeerId>,
    group: Option<kkachi_protocol::group::GroupId>,
) -> Snapshot {
    let me = match (store.identity(), store.profile()) {
        (Ok(Some(id)), Ok(Some(p))) => Some((p.name, id.peer_id())),
        _ => None,
    };
    let mut conversations: Vec<ConversationSummary> = store
        .added_contacts()
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let recent = store.recent_messages(&c.peer, 200).unwrap_or_default();
            ConversationSummary {
                peer: c.peer,
                name: c.name.clone(),
                unread: recent
                    .iter()
                    .filter(|m| {
                        m.direction == Direction::In
                            && m.state == MessageState::Received
                            && !m.deleted
                    })
                    .count(),
                last_ms: recent.last().map(|m| m.sent_at_ms),
                muted: store
                    .conversation(&c.peer)
                    .map(|conv| conv.muted)
                    .unwrap_or(false),
            }
        })
        .collect();
    conversations.sort_by_key(|c| std::cmp::Reverse(c.last_ms));
    let selected = selected.or_else(|| conversations.first().map(|c| c.peer));
    let (messages, notices, gaps) = match selected {
        Some(peer) => {
            let (notices, gaps) = match (store.conversation(&peer), store.contact(&peer)) {
                (Ok(conv), Ok(Some(c))) => (
                    crate::commands::notices_but_gaps(&conv, &c.name),
                    conv.gaps.ranges().to_vec(),
                ),
                _ => (vec![], vec![]),
            };
            let messages = store
                .recent_messages(&peer, MESSAGES_SHOWN)
                .unwrap_or_default();
            (messages, notices, gaps)
        }
        None => (vec![], vec![], vec![]),
    };
    let requests = store.requests().map(|r| r.len()).unwrap_or(0);
    let files_waiting = store
        .file_transfers()
        .map(|(out, _)| out.iter().filter(|(_, r)| !r.message_sent).count())
        .unwrap_or(0);
    let relays = store.relays().unwrap_or_default();
    let status = match engine {
        Some(engine) => {
            let connected = engine.net().connected();
            let relay_peers: Vec<PeerId> = relays
                .iter()
                .filter_map(|r| r.addr.parse().ok().and_then(|a| peer_of(&a)))
                .collect();
            Status {
                relays_up: relay_peers.iter().filter(|p| connected.contains(p)).count(),
                relays: relays.len(),
                // What no relay (or contact) has yet: the messages really waiting.
                outbox: store
                    .outbox()
                    .map(|o| o.iter().filter(|(_, e)| e.acked_count() == 0).count())
                    .unwrap_or(0),
                lan_peers: engine.net().lan_peers().len(),
                // Blocked contacts get nothing from us, directly or not.
                direct: store
                    .contacts()
                    .map(|cs| {
                        cs.iter()
                            .filter(|c| {
                                // Any device of theirs we hold a session with, each a peer
                                // of its own (a device taken out has none left).
                                let mut devices =
                                    store.device_session_keys(&c.peer).unwrap_or_default();
                                devices.push(*c.card.identity().x25519());
                                c.is_added()
                                    && devices.iter().any(|x| {
                                        kkachi_protocol::identity::transport_peer(x)
                                            .is_some_and(|d| connected.contains(&d))
                                    })
                            })
                            .filter(|c| !matches!(store.blocked(&c.peer), Ok(Some(_))))
                            .count()
                    })
                    .unwrap_or(0),
                requests,
                files_waiting,
            }
        }
        None => Status {
            relays: relays.len(),
            requests,
            files_waiting,
            ..Status::default()
        },
    };
    let files = messages
        .iter()
        .filter(|m| !m.deleted)
        .filter_map(|m| {
            let file = m.file.as_ref()?.file()?;
            Some((m.id, file_view(store, engine, m, &file)))
        })
        .collect();
    let (groups, group_lines) = group_snapshot(store, engine, me.as_ref().map(|(_, p)| *p), group);
    Snapshot {
        me,
        conversations,
        messages,
        notices,
        gaps,
        status,
        files,
        groups,
        group_lines,
    }
}

/// The groups we are in (or were), most recent first, and the open group's last
/// lines, made safe to draw.
fn group_snapshot(
    store: &LocalStore,
    engine: Option<&Engine<Network>>,
    me: Option<PeerId>,
    open: Option<kkachi_protocol::group::GroupId>,
) -> (Vec<state::GroupSummary>, Vec<state::GroupLine>) {
    use crate::sanitize::for_terminal;
    use kkachi_protocol::group::{Mode, Role};
    let own_key = store
        .identity()
        .ok()
        .flatten()
        .map(|i| *i.public().ed25519());
    let mut groups = Vec::new();
    let mut lines = Vec::new();
    for (id, record) in store.groups().unwrap_or_default() {
        let Ok(Some(roster)) = record.roster(id) else {
            continue;
        };
        // The last ones to arrive: enough for the list (unread, latest) and for the view.
        let messages = store
            .recent_group_messages(&id, MESSAGES_SHOWN.max(200))
            .unwrap_or_default();
        let role = match own_key.and_then(|k| roster.role(&k)) {
            Some(Role::Admin) => "admin",
            Some(Role::Member) => "member",
            None => "not a member",
        };
        let unread = messages
            .iter()
            .filter(|m| !m.event && !m.from.is_empty() && m.message.state == MessageState::Received)
            .count();
        groups.push(state::GroupSummary {
            id,
            name: roster.name.clone(),
            members: roster.members.len(),
            role,
            announcement: roster.mode == Mode::Announcement,
            unread,
            timer_secs: roster.timer_secs,
            last_ms: messages.iter().map(|m| m.message.sent_at_ms).max(),
        });
        if open != Some(id) {
            continue;
        }
        let skip = messages.len().saturating_sub(MESSAGES_SHOWN);
        for m in messages.into_iter().skip(skip) {
            let who = match m.author() {
                _ if m.event => String::new(),
                None => "me".into(),
                Some(p) if Some(p) == me => "me".into(),
                Some(p) => match store.added_contact(&p) {
                    Ok(Some(c)) => for_terminal(&c.name).into_owned(),
                    // Their own name, nobody vouched for it: marked, as messengers do.
                    _ => format!("~{}", for_terminal(&m.name)),
                },
            };
            let (delivered, read) = m.tally();
            let file =
                m.message
                    .file
                    .as_ref()
                    .and_then(|f| f.file())
                    .map(|file| state::GroupFile {
                        id: crate::files::hex(&file.id()),
                        name: file.name.clone(),
                        view: file_view(store, engine, &m.message, &file),
                    });
            let ours = !m.event && m.author().is_none_or(|p| Some(p) == me);
            lines.push(state::GroupLine {
                ours,
                who,
                text: for_terminal(&m.message.text).into_owned(),
                file,
                sent_at_ms: m.message.sent_at_ms,
                event: m.event,
                delivered,
                read,
                copies: m.audience(),
                unseen: m.unseen,
            });
        }
    }
    groups.sort_by_key(|g| std::cmp::Reverse(g.last_ms));
    (groups, lines)
}

/// How a file message is shown: what it is, where it stands, its preview.
fn file_view(
    store: &LocalStore,
    engine: Option<&Engine<Network>>,
    m: &crate::store::MessageRecord,
    file: &kkachi_protocol::file::FileRef,
) -> state::FileView {
    use crate::sanitize::for_terminal;
    use crate::store::IncomingState;
    let id = file.id();
    let incoming = m.direction == Direction::In;
    let live = engine
        .and_then(|e| e.transfers().progress(incoming, &id))
        .filter(|p| p.total > 0)
        .map(|p| (p.done, p.total));
    let (status, progress) = if incoming {
        match store.incoming_file(&id) {
            Ok(Some(r)) => match r.state {
                IncomingState::Done => match r.saved.last() {
                    Some(path) => (format!("saved to {}", for_terminal(path)), None),
                    None => ("fetched: /save keeps a copy".to_string(), None),
                },
                IncomingState::Fetching => (
                    "fetching".to_string(),
                    live.or_else(|| crate::files::fetched_chunks(store.home(), &id, file)),
                ),
                IncomingState::Offered => ("not fetched: /save fetches it".to_string(), None),
                IncomingState::Failed(why) => {
                    (format!("cannot be fetched: {}", for_terminal(&why)), None)
                }
            },
            _ => ("not on this device".to_string(), None),
        }
    } else {
        match store.outgoing_file(&id) {
            Ok(Some(r)) if r.finished => ("on their relays".to_string(), None),
            // Sent with fewer copies than it goes to: the rest follow.
            Ok(Some(r)) if r.message_sent => {
                ("on their relays (more copies to come)".to_string(), None)
            }
            Ok(Some(r)) => match live {
                Some(p) => ("uploading".to_string(), Some(p)),
                None => (
                    match &r.last_error {
                        Some(why) => format!("waiting for their relays: {}", for_terminal(why)),
                        None => "waiting for their relays".to_string(),
                    },
                    None,
                ),
            },
            _ => (String::new(), None),
        }
    };
    let (picture, graphic) = picture(&id, &file.thumbnail);
    state::FileView {
        label: crate::files::describe(file),
        status,
        progress,
        picture: picture.clone(),
        graphic,
    }
}

/// A decoded preview at the size its half blocks are drawn, and the same for the
/// terminal's graphics where it has them.
type Picture = (Option<Arc<image::RgbImage>>, Option<graphics::Graphic>);

/// A file's preview, decoded and encoded once and kept at the size it is drawn (a few
/// KiB each), for more files than a conversation shows: a contact sending many cannot
/// make the UI decode them again on every frame.
fn picture(id: &[u8; 32], preview: &[u8]) -> Picture {
    type Cache = parking_lot::Mutex<std::collections::HashMap<[u8; 32], Picture>>;
    static PICTURES: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    if preview.is_empty() {
        return (None, None);
    }
    let mut cache = PICTURES.get_or_init(Default::default).lock();
    if let Some(p) = cache.get(id) {
        return p.clone();
    }
    if cache.len() >= 2 * MESSAGES_SHOWN {
        cache.clear();
    }
    let p = match crate::files::picture::pixels(preview) {
        Some(full) => {
            let cells = crate::files::picture::fit(&full, view::PICTURE_COLS, view::PICTURE_ROWS);
            // In the terminal's graphics, from every pixel of the preview, in the
            // place its half blocks take.
            let graphic = cells.as_ref().and_then(|c| {
                let (w, h) = c.dimensions();
                let place = ratatui::layout::Size::new(w as u16, h.div_ceil(2) as u16);
                graphics::Graphic::new(&full, place)
            });
            (cells.map(Arc::new), graphic)
        }
        None => (None, None),
    };
    cache.insert(*id, p.clone());
    p
}

#[cfg(test)]
mod base64_tests {
    #[test]
    fn encodes_like_the_standard() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"kk1 code"), "a2sxIGNvZGU=");
    }
}

#[cfg(test)]
mod group_view_tests {
    use kkachi_protocol::group::{Hlc, Mode, Op, Role, SignedOp};
    use kkachi_protocol::{Card, Identity};

    use crate::store::{
        Contact, Direction, GroupMessage, GroupRecord, LocalStore, MessageRecord, MessageState,
        WriteSet,
    };

    fn said(who: &Identity, name: &str, at: u64, text: &str) -> GroupMessage {
        GroupMessage {
            from: who.peer_id().to_bytes(),
            name: name.into(),
            hlc: (at, 0),
            message: MessageRecord {
                id: [at as u8; 16],
                direction: Direction::In,
                text: text.into(),
                state: MessageState::Received,
                sent_at_ms: at,
                stored_at_ms: at,
                seq: 1,
                prev: [0; 32],
                timer_secs: 0,
                edited: false,
                deleted: false,
                revised_seq: 0,
                reply_to: None,
                reactions: Default::default(),
                file: None,
            },
            copies: Vec::new(),
            event: false,
            unseen: false,
            missed: Vec::new(),
            post_seq: 0,
            post_device: [0; 8],
            reach: (0, 0, 0),
        }
    }

    #[test]
    fn members_who_are_not_contacts_are_marked_in_a_groups_lines() {
        let dir = tempfile::tempdir().unwrap();
        let (store, me, _) = LocalStore::provision(dir.path(), "Me", &[]).unwrap();
        let (bob, carol) = (Identity::generate(), Identity::generate());
        let at = |ms| Hlc { ms, count: 0 };
        let create = SignedOp::create(&me, "Me", [1; 16], "Street", Mode::Chat, at(1));
        let id = create.group();
        let add = |who: &Identity, name: &str, seq: u64| {
            let op = Op::Add {
                member: who.public(),
                name: name.into(),
                role: Role::Member,
            };
            SignedOp::sign(&me, id, seq, at(seq), op)
        };
        let ops = [create.clone(), add(&bob, "bob", 2), add(&carol, "carol", 3)];
        let record = GroupRecord {
            ops: ops.iter().map(|o| o.encode().to_vec()).collect(),
            joined: true,
            ..GroupRecord::default()
        };
        let mut w = WriteSet::default();
        LocalStore::write_group(&mut w, &id, &record);
        // Carol is a contact, under the name we gave her; Bob was only met in the group.
        let card = |who: &Identity, name: &str| Card::new(who, name, vec![], 1).unwrap();
        let carol_contact =
            Contact::new(carol.peer_id(), "Carol Park".into(), card(&carol, "carol"));
        LocalStore::write_contact(&mut w, &carol_contact);
        let bob_met = Contact {
            through_group: true,
            ..Contact::new(bob.peer_id(), "bob".into(), card(&bob, "bob"))
        };
        LocalStore::write_contact(&mut w, &bob_met);
        LocalStore::write_group_message(&mut w, &id, 0, &said(&bob, "bob", 10, "hi"));
        LocalStore::write_group_message(&mut w, &id, 1, &said(&carol, "carol", 11, "hello"));
        store.apply(w).unwrap();
        let snap = super::snapshot(&store, None, None, Some(id));
        let who: Vec<&str> = snap
            .group_lines
            .iter()
            .filter(|l| !l.event)
            .map(|l| l.who.as_str())
            .collect();
        assert_eq!(who, vec!["~bob", "Carol Park"]);
        // Nor is Bob among the conversations.
        assert!(snap.conversations.iter().all(|c| c.peer != bob.peer_id()));
    }
}
