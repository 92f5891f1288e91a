//! `kkachi-relay`: parses flags and configuration, starts the relay, prints its listen
//! addresses, and shuts down gracefully on SIGTERM or Ctrl-C.
//!
//! Its one event loop is the node task (`kkachi_relay::node`), which owns the Swarm:
//! sessions, long polls and the store's group commits meet there.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kkachi_relay::config::{Config, MetricsListen};
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

/// A kkachi relay: stores end-to-end encrypted envelopes until their recipients fetch
/// them. It never sees who wrote a message or what it says.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Directory for the node key and mailbox database.
    #[arg(long, global = true, env = "KKACHI_RELAY_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// Listen address (repeatable), e.g. /ip4/0.0.0.0/tcp/4040.
    #[arg(
        long,
        global = true,
        env = "KKACHI_RELAY_LISTEN",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    listen: Vec<Multiaddr>,

    /// TOML configuration file (see relay/contrib/kkachi-relay.toml in the sources).
    #[arg(long, global = true, env = "KKACHI_RELAY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Serve /metrics and /healthz on ADDR (host:port), or "off".
    #[arg(long, env = "KKACHI_RELAY_METRICS", value_name = "ADDR|off")]
    metrics: Option<MetricsListen>,

    /// Failure-domain label, e.g. "provider/region".
    #[arg(long, env = "KKACHI_RELAY_FAILURE_DOMAIN", value_name = "LABEL")]
    failure_domain: Option<String>,

    /// Name shown to users.
    #[arg(long, env = "KKACHI_RELAY_NAME")]
    name: Option<String>,

    /// How users can reach the operator.
    #[arg(long, env = "KKACHI_RELAY_OPERATOR")]
    operator: Option<String>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the relay's PeerId (creating its key if needed) and exit; the addresses
    /// users add follow on standard error.
    Id,
}

impl Cli {
    /// File values, then flags and environment on top.
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if !self.listen.is_empty() {
            config.listen = self.listen.clone();
        }
        if let Some(m) = self.metrics {
            config.metrics = m;
        }
        if let Some(fd) = &self.failure_domain {
            config.info.failure_domain = fd.clone();
        }
        if let Some(name) = &self.name {
            config.info.name = name.clone();
        }
        if let Some(op) = &self.operator {
            config.info.operator = op.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libp2p=warn"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            r = tokio::signal::ctrl_c() => r.map(|()| "SIGINT").context("waiting for Ctrl-C"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        Ok("Ctrl-C")
    }
}

#[tokio::main]
async fn main() {
    // Errors as a sentence (with their causes), never a backtrace.
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The addresses users add, as far as this host can tell: the listen addresses with
/// the PeerId, a wildcard standing for this host's public address.
fn addresses_to_add(config: &Config, peer: libp2p::PeerId) -> Vec<String> {
    config
        .listen
        .iter()
        .map(|a| {
            let text = a.clone().with(Protocol::P2p(peer)).to_string();
            text.replace("/ip4/0.0.0.0/", "/ip4/<this host's address>/")
                .replace("/ip6/::/", "/ip6/<this host's address>/")
        })
        .collect()
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    let config = cli.config()?;
    if let Some(Command::Id) = cli.command {
        let key = kkachi_relay::load_or_create_key(&config.data_dir)?;
        let peer = key.public().to_peer_id();
        println!("{peer}");
        for addr in addresses_to_add(&config, peer) {
            eprintln!("users add: kkachi relay add {addr}");
        }
        return Ok(());
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        data_dir = %config.data_dir.display(),
        listen = ?config.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
        failure_domain = %config.info.failure_domain,
        max_bytes = config.limits.max_bytes,
        max_envelopes = config.limits.max_envelopes,
        queue_max_bytes = config.limits.queue_max_bytes,
        "starting kkachi-relay"
    );
    let data_dir = config.data_dir.clone();
    let relay = kkachi_relay::start(config)
        .await
        .with_context(|| format!("starting the relay (data dir {})", data_dir.display()))?;
    if let Some(addr) = relay.metrics_addr() {
        tracing::info!("metrics on http://{addr}/metrics");
    }
    let peer = relay.peer_id();
    let mut addrs = relay.addrs();
    let mut printed: HashSet<Multiaddr> = HashSet::new();
    let signal = wait_for_signal();
    tokio::pin!(signal);
    let mut watchdog = tokio::time::interval(std::time::Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = watchdog.tick() => {
                if let Some(why) = relay.fatal() {
                    // The node drains by itself; a store that blocks in sled must not
                    // keep the process alive. Everything acknowledged is on disk.
                    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(12);
                    while !relay.is_finished() && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    eprintln!("error: storage failed ({why}); stopped. Start the relay again once the disk has space (systemd and Docker restart it automatically).");
                    std::process::exit(1);
                }
            }
            changed = addrs.changed() => {
                if changed.is_err() {
                    break;
                }
                let current: Vec<Multiaddr> = addrs.borrow_and_update().clone();
                for addr in current {
                    if printed.insert(addr.clone()) {
                        // The CLI contract: one line per listen address, as soon as it listens.
                        println!("listening on {}", addr.with(Protocol::P2p(peer)));
                    }
                }
            }
            which = &mut signal => {
                tracing::info!("{}: shutting down", which?);
                break;
            }
        }
    }
    if let Err(e) = relay.shutdown().await {
        // Exit without running destructors: a failed store may block in them, and
        // everything acknowledged is already on disk.
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    tracing::info!("stopped");
    Ok(())
}
