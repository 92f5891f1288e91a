//! Relay configuration: a TOML file whose every field has a default, overridden by
//! command-line flags and `KKACHI_RELAY_*` environment variables (see `main.rs`).
//! `contrib/kkachi-relay.toml` is the documented example; a test keeps it in sync.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kkachi_protocol::Multiaddr;
use kkachi_protocol::envelope::{DEFAULT_TTL_SECS, MAX_PAYLOAD_LEN, MAX_TTL_SECS};
use serde::Deserialize;
use thiserror::Error;

/// Why a configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Where to serve `/metrics` and `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    /// No metrics endpoint.
    Off,
    /// Serve on this address.
    On(SocketAddr),
}

impl std::str::FromStr for MetricsListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        s.parse()
            .map(Self::On)
            .map_err(|_| format!("expected HOST:PORT or \"off\", got {s:?}"))
    }
}

impl<'de> Deserialize<'de> for MetricsListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The whole relay configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory for the node key and the mailbox database. Default: the platform data
    /// directory (`~/.local/share/kkachi-relay` on Linux).
    pub data_dir: PathBuf,
    /// Addresses to listen on. Default: TCP and QUIC on port 4040, all interfaces.
    pub listen: Vec<Multiaddr>,
    /// Prometheus `/metrics` and `/healthz` address, or "off". Default: off.
    pub metrics: MetricsListen,
    /// What the relay tells clients about itself.
    pub info: InfoConfig,
    /// Storage and abuse limits.
    pub limits: LimitsConfig,
    /// Circuit relay v2 service, so two clients behind NAT can reach each other.
    pub circuit: CircuitConfig,
    /// Who may open queues here.
    pub access: AccessConfig,
}

/// Who may open queues on the relay. Anyone holding a queue's write key can always put
/// into it, whatever the policy: members of a community relay stay reachable from
/// outside.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessConfig {
    /// "anyone" (the default) or "token": only holders of one of `tokens` open queues.
    pub open: OpenPolicy,
    /// Access tokens handed out by the operator (each at most 64 bytes), for
    /// `open = "token"`. An allowlist is a token per member.
    pub tokens: Vec<String>,
}

/// Who may open queues.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpenPolicy {
    /// Anyone.
    #[default]
    Anyone,
    /// Holders of an access token.
    Token,
}

/// Self-description sent to clients (`Info`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InfoConfig {
    /// A short name for this relay, shown to users. Default: empty.
    pub name: String,
    /// How to reach the operator (e-mail or URL). Default: empty.
    pub operator: String,
    /// Failure-domain label, e.g. "hetzner/fsn1" or "home/seoul": relays that share a
    /// label can fail together, and clients warn when all of a user's relays do.
    pub failure_domain: String,
}

/// Storage, quota and rate limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest envelope payload accepted, bytes (at most 65536). Default: 65536.
    pub max_payload: usize,
    /// Longest envelope lifetime accepted, seconds (at most 30 days). Default: 30 days.
    pub max_ttl_secs: u64,
    /// Most envelopes held in one inbox queue, from all its contacts. Default: 50,000.
    pub queue_max_envelopes: u64,
    /// Most bytes held in one inbox queue. Default: 1 GiB.
    pub queue_max_bytes: u64,
    /// Most envelopes held for one write capability (one contact's puts into one
    /// queue), so one contact cannot fill a queue for the others. Default: 2000.
    pub capability_max_envelopes: u64,
    /// Most bytes held for one write capability. Default: 64 MiB.
    pub capability_max_bytes: u64,
    /// Most write capabilities one queue may grant (its owner's contacts). Default: 4096.
    pub grants_per_queue: u32,
    /// Most envelopes held in one contact-request queue (shared by everyone holding
    /// the owner's invite code). Default: 200.
    pub request_max_envelopes: u64,
    /// Most bytes held in one contact-request queue. Default: 8 MiB.
    pub request_max_bytes: u64,
    /// Longest lifetime of an envelope put through a contact-request capability, seconds
    /// (clients give envelopes 14 days; less refuses theirs). Default: 14 days, against
    /// 30 for contacts.
    pub request_max_ttl_secs: u64,
    /// Contact requests one address may put per hour, sustained, into all request
    /// queues together. Default: 20.
    pub request_puts_per_hour_per_address: u32,
    /// Contact requests one address may put in a burst. Default: 10.
    pub request_put_burst_per_address: u32,
    /// Envelopes one peer may put per second, sustained. Default: 500.
    pub puts_per_sec: u32,
    /// Envelopes one peer may put in a burst. Default: 2000.
    pub put_burst: u32,
    /// Envelopes all peers connecting from one address (an IPv4 address or an IPv6
    /// /64) may put per second, sustained, so fresh identities do not buy a flooder
    /// more. Default: 2000.
    pub puts_per_sec_per_address: u32,
    /// Envelopes all peers from one address may put in a burst. Default: 10000.
    pub put_burst_per_address: u32,
    /// Most simultaneous connections. Default: 20000.
    pub max_connections: u32,
    /// Most simultaneous connections from one peer. Default: 8.
    pub max_connections_per_peer: u32,
    /// Most simultaneous connections from one address (an IPv4 address or an IPv6
    /// /64), whatever identities they use. Default: 128.
    pub max_connections_per_address: u32,
    /// Envelope bytes all peers from one address may put per hour, sustained: its share
    /// of the relay's storage over time, whatever identities and queues it uses.
    /// Default: 2 GiB.
    pub put_bytes_per_hour_per_address: u64,
    /// The same, in a burst. Default: 256 MiB.
    pub put_bytes_burst_per_address: u64,
    /// Requests of any kind one connection may make per second, sustained. Default: 500.
    pub requests_per_sec: u32,
    /// Requests of any kind one connection may make in a burst. Default: 4000.
    pub request_burst: u32,
    /// Most envelopes the relay holds in all, whoever they are for. Default: 10,000,000.
    pub max_envelopes: u64,
    /// Most envelope bytes the relay holds in all. Default: 16 GiB.
    pub max_bytes: u64,
    /// Most queues the relay keeps. Default: 1,000,000.
    pub max_queues: u64,
    /// New queues one address may open per hour, sustained. Default: 60.
    pub queues_per_hour_per_address: u32,
    /// Write keys one address may grant per hour, sustained (at least 4,096 at once).
    /// Default: 20,000.
    pub grants_per_hour_per_address: u32,
    /// Puts are refused (reads go on) while the data directory's file system has less
    /// free space than this, bytes. Default: 256 MiB.
    pub min_free_disk_bytes: u64,
    /// Most connections still handshaking. Default: 512.
    pub max_pending_connections: u32,
    /// Long polls (subscriptions) one peer may hold open. Default: 8.
    pub max_waiting_per_peer: usize,
    /// Close connections idle this long, seconds (subscribed clients are never idle).
    /// Default: 120.
    pub idle_timeout_secs: u64,
    /// sled page cache size, bytes. Default: 256 MiB.
    pub cache_bytes: u64,
    /// Bytes of files (chunks) held for one write capability: the largest file one
    /// contact can send through this relay at once. Default: 256 MiB.
    pub chunk_bytes_per_capability: u64,
    /// Bytes of files held for one queue. Default: 2 GiB.
    pub chunk_bytes_per_queue: u64,
    /// Bytes of files held in all; 0 stores no files. Default: 32 GiB.
    pub chunk_bytes_total: u64,
}

/// Circuit relay v2 limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitConfig {
    /// Offer circuit relay at all. Default: true.
    pub enabled: bool,
    /// Most reservations held. Default: 256.
    pub max_reservations: usize,
    /// Most relayed circuits at once. Default: 64.
    pub max_circuits: usize,
    /// Longest life of one circuit, seconds (enough to upgrade to a direct path).
    /// Default: 120.
    pub max_circuit_secs: u64,
    /// Most bytes relayed per circuit. Default: 1 MiB.
    pub max_circuit_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            listen: vec![
                "/ip4/0.0.0.0/tcp/4040".parse().expect("valid"),
                "/ip4/0.0.0.0/udp/4040/quic-v1".parse().expect("valid"),
            ],
            metrics: MetricsListen::Off,
            info: InfoConfig::default(),
            limits: LimitsConfig::default(),
            circuit: CircuitConfig::default(),
            access: AccessConfig::default(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_payload: MAX_PAYLOAD_LEN,
            max_ttl_secs: MAX_TTL_SECS,
            queue_max_envelopes: 50_000,
            queue_max_bytes: 1 << 30,
            capability_max_envelopes: 2_000,
            capability_max_bytes: 64 << 20,
            grants_per_queue: 4_096,
            request_max_envelopes: 200,
            request_max_bytes: 8 << 20,
            request_max_ttl_secs: DEFAULT_TTL_SECS,
            request_puts_per_hour_per_address: 20,
            request_put_burst_per_address: 10,
            puts_per_sec: 500,
            put_burst: 2000,
            puts_per_sec_per_address: 2000,
            put_burst_per_address: 10_000,
            max_connections: 20_000,
            max_connections_per_peer: 8,
            max_connections_per_address: 128,
            put_bytes_per_hour_per_address: 2 << 30,
            put_bytes_burst_per_address: 256 << 20,
            requests_per_sec: 500,
            request_burst: 4000,
            max_envelopes: 10_000_000,
            max_bytes: 16 << 30,
            max_queues: 1_000_000,
            queues_per_hour_per_address: 60,
            grants_per_hour_per_address: 20_000,
            min_free_disk_bytes: 256 << 20,
            max_pending_connections: 512,
            max_waiting_per_peer: 8,
            idle_timeout_secs: 120,
            cache_bytes: 256 << 20,
            chunk_bytes_per_capability: 256 << 20,
            chunk_bytes_per_queue: 2 << 30,
            chunk_bytes_total: 32 << 30,
        }
    }
}

impl Default for CircuitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_reservations: 256,
            max_circuits: 64,
            max_circuit_secs: 120,
            max_circuit_bytes: 1 << 20,
        }
    }
}

/// The platform data directory for the relay.
pub fn default_data_dir() -> PathBuf {
    directories::ProjectDirs::from("", "", "kkachi-relay")
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from("kkachi-relay-data"))
}

impl Config {
    /// Reads a TOML file; fields it omits keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks ranges that the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.max_payload == 0 || l.max_payload > MAX_PAYLOAD_LEN {
            return Err(ConfigError::Invalid(format!(
                "limits.max_payload must be between 1 and {MAX_PAYLOAD_LEN}"
            )));
        }
        if l.max_ttl_secs == 0 || l.max_ttl_secs > MAX_TTL_SECS {
            return Err(ConfigError::Invalid(format!(
                "limits.max_ttl_secs must be between 1 and {MAX_TTL_SECS} (30 days)"
            )));
        }
        if l.puts_per_sec_per_address == 0 || l.put_burst_per_address == 0 {
            return Err(ConfigError::Invalid(
                "limits.puts_per_sec_per_address and limits.put_burst_per_address must be at least 1"
                    .into(),
            ));
        }
        if l.puts_per_sec == 0 || l.put_burst == 0 {
            return Err(ConfigError::Invalid(
                "limits.puts_per_sec and limits.put_burst must be at least 1".into(),
            ));
        }
        if l.request_puts_per_hour_per_address == 0 || l.request_put_burst_per_address == 0 {
            return Err(ConfigError::Invalid(
                "limits.request_puts_per_hour_per_address and limits.request_put_burst_per_address must be at least 1"
                    .into(),
            ));
        }
        if self.access.open == OpenPolicy::Token && self.access.tokens.is_empty() {
            return Err(ConfigError::Invalid(
                "access.open = \"token\" needs at least one entry in access.tokens".into(),
            ));
        }
        if let Some(t) = self
            .access
            .tokens
            .iter()
            .find(|t| t.len() > 64 || t.is_empty())
        {
            return Err(ConfigError::Invalid(format!(
                "access token {:?}… must be 1 to 64 bytes",
                t.chars().take(8).collect::<String>()
            )));
        }
        if self.listen.is_empty() {
            return Err(ConfigError::Invalid(
                "at least one listen address is needed".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.idle_timeout_secs.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_documents_every_section() {
        let text = include_str!("../contrib/kkachi-relay.toml");
        let cfg = Config::from_toml(text).expect("example parses");
        cfg.validate().unwrap();
        for section in ["[info]", "[limits]", "[circuit]", "[access]"] {
            assert!(text.contains(section), "example lacks {section}");
        }
        // Every limits field appears in the example with its default value.
        let d = LimitsConfig::default();
        assert_eq!(cfg.limits.queue_max_envelopes, d.queue_max_envelopes);
        assert_eq!(cfg.limits.capability_max_bytes, d.capability_max_bytes);
        assert_eq!(cfg.limits.request_max_envelopes, d.request_max_envelopes);
        assert_eq!(cfg.limits.puts_per_sec, d.puts_per_sec);
        assert_eq!(
            cfg.limits.chunk_bytes_per_capability,
            d.chunk_bytes_per_capability
        );
        assert_eq!(cfg.limits.chunk_bytes_total, d.chunk_bytes_total);
        assert_eq!(
            cfg.circuit.max_circuits,
            CircuitConfig::default().max_circuits
        );
    }

    #[test]
    fn empty_file_gives_defaults() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(cfg.listen, Config::default().listen);
        assert_eq!(cfg.metrics, MetricsListen::Off);
        cfg.validate().unwrap();
    }

    #[test]
    fn typos_and_bad_values_are_reported() {
        let err = Config::from_toml("[limits]\nputs_per_second = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("puts_per_second"), "{err}");
        let err = Config::from_toml("metrics = \"nonsense\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("HOST:PORT"), "{err}");
        let mut cfg = Config::default();
        cfg.limits.max_payload = 1 << 20;
        assert!(cfg.validate().is_err());
        assert_eq!("off".parse::<MetricsListen>(), Ok(MetricsListen::Off));
        assert!(matches!("127.0.0.1:9464".parse(), Ok(MetricsListen::On(_))));
    }
}
