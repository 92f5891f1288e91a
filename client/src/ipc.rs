//! Forwarding commands to a running daemon or UI, which holds the database.
//!
//! The daemon listens on a Unix socket in the home directory (mode 0600). A command
//! run while it holds the database is sent there as one JSON line and answered with
//! its output; the user sees no difference.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

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

/// Serves forwarded commands until the task is dropped.
pub async fn serve(home: PathBuf, engine: Engine<Network>) -> Result<(), CommandError> {
    let path = socket_path(&home);
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
    loop {
        let (stream, _) = listener.accept().await?;
        let engine = engine.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, engine).await {
                tracing::debug!(error = %e, "control connection failed");
            }
        });
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
