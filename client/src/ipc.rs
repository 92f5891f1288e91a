//! Forwarding commands to a running daemon or UI, which holds the database.
//!
//! The daemon listens on a Unix socket in the home directory (mode 0600). A command
//! run while it holds the database is sent there as one JSON line and answered with
//! its output; the user sees no difference.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

use crate::cli::Command;
use crate::commands::{App, CommandError, Output};
use crate::engine::Engine;
use crate::net::Network;

/// Largest request accepted on the socket.
const MAX_REQUEST: u64 = 1 << 20;

#[derive(serde::Serialize, serde::Deserialize)]
struct Request {
    command: Command,
    json: bool,
}

/// The socket path for a home directory.
pub fn socket_path(home: &Path) -> PathBuf {
    home.join("daemon.sock")
}

/// Sends `command` to the daemon running for `home`.
pub async fn forward(home: &Path, command: Command, json: bool) -> Result<Output, CommandError> {
    let path = socket_path(home);
    let mut stream =
        UnixStream::connect(&path)
            .await
            .map_err(|source| CommandError::DaemonUnreachable {
                home: home.to_path_buf(),
                source,
            })?;
    let mut line = serde_json::to_vec(&Request { command, json })?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    stream.shutdown().await?;
    let mut answer = Vec::new();
    stream.take(64 << 20).read_to_end(&mut answer).await?;
    serde_json::from_slice(&answer).map_err(CommandError::DaemonAnswer)
}

/// How long a stopping daemon waits for the commands under way to answer.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The control socket: serves forwarded commands on its own task until stopped.
#[derive(Debug)]
pub struct Control {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Control {
    /// Creates the socket for `home` (mode 0600) and serves it.
    pub async fn start(home: &Path, engine: Engine<Network>) -> Result<Self, CommandError> {
        let path = socket_path(home);
        // A socket file left by a daemon that crashed: nobody answers on it.
        if path.exists() && UnixStream::connect(&path).await.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        let listener = UnixListener::bind(&path).map_err(|source| CommandError::ControlSocket {
            path: path.clone(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, path, engine, stopped));
        Ok(Self {
            stop: Some(stop),
            task,
        })
    }

    /// Stops taking connections, gives the commands under way a few seconds to answer
    /// (stop the engine first, and they answer at once), and removes the socket.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

async fn serve(
    listener: UnixListener,
    path: PathBuf,
    engine: Engine<Network>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let engine = engine.clone();
                    connections.spawn(async move {
                        if let Err(e) = answer(stream, engine).await {
                            tracing::debug!(error = %e, "control connection failed");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "control socket: accept failed"),
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = &mut stopped => break,
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
    let drained = tokio::time::timeout(STOP_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = connections.len(),
            "commands still under way when the daemon stopped"
        );
    }
}

async fn answer(stream: UnixStream, engine: Engine<Network>) -> Result<(), CommandError> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let request: Request = serde_json::from_str(&line)?;
    let mut app = App::online(engine);
    let output = match app.run(request.command, request.json).await {
        Ok(o) => o,
        Err(e) => Output {
            stdout: String::new(),
            stderr: format!("error: {e}\n"),
            code: 1,
        },
    };
    write.write_all(&serde_json::to_vec(&output)?).await?;
    write.shutdown().await?;
    Ok(())
}

/// Removes the socket when the daemon stops.
pub fn cleanup(home: &Path) {
    let _ = std::fs::remove_file(socket_path(home));
}
