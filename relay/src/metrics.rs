//! Prometheus metrics (`kkachi_*`) and the tiny HTTP server for `/metrics` and
//! `/healthz`.
//!
//! The HTTP side reads at most one request head per connection (8 KiB, 5 s), answers,
//! and closes: enough for Prometheus and load balancers, nothing to attack.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::store::StoreStats;

/// A label naming an outcome, reason or request kind.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    kind: &'static str,
}

/// All relay metrics. Cheap to clone (shared counters).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Open connections.
    pub connections: Gauge,
    /// Envelopes put, by outcome (stored, duplicate, rejected).
    pub puts: Family<Kind, Counter>,
    /// Requests handled, by kind.
    pub requests: Family<Kind, Counter>,
    /// Refusals, by reason.
    pub rejections: Family<Kind, Counter>,
    /// Envelopes currently stored.
    pub stored_envelopes: Gauge,
    /// Bytes currently stored.
    pub stored_bytes: Gauge,
    /// Mailboxes with waiting envelopes.
    pub mailboxes: Gauge,
    /// Envelopes removed by expiry.
    pub expired: Counter,
    /// Open long polls.
    pub waiting: Gauge,
    /// Duration of each storage flush.
    pub flush_seconds: Histogram,
    /// Time from receiving a put to acknowledging it.
    pub put_ack_seconds: Histogram,
    /// Chunks of files held.
    pub stored_chunks: Gauge,
    /// Bytes of chunks held.
    pub stored_chunk_bytes: Gauge,
    /// Bytes of chunks served.
    pub chunk_bytes_served: Counter,
    ready: Arc<AtomicBool>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            registry: Arc::new(Registry::default()),
            connections: Gauge::default(),
            puts: Family::default(),
            requests: Family::default(),
            rejections: Family::default(),
            stored_envelopes: Gauge::default(),
            stored_bytes: Gauge::default(),
            mailboxes: Gauge::default(),
            expired: Counter::default(),
            waiting: Gauge::default(),
            flush_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            put_ack_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            stored_chunks: Gauge::default(),
            stored_chunk_bytes: Gauge::default(),
            chunk_bytes_served: Counter::default(),
            ready: Arc::new(AtomicBool::new(false)),
        };
        registry.register(
            "kkachi_connections",
            "Open connections",
            m.connections.clone(),
        );
        registry.register("kkachi_puts", "Envelopes put, by outcome", m.puts.clone());
        registry.register(
            "kkachi_requests",
            "Requests handled, by kind",
            m.requests.clone(),
        );
        registry.register(
            "kkachi_rejections",
            "Refusals, by reason",
            m.rejections.clone(),
        );
        registry.register(
            "kkachi_stored_envelopes",
            "Envelopes stored",
            m.stored_envelopes.clone(),
        );
        registry.register(
            "kkachi_stored_bytes",
            "Bytes stored",
            m.stored_bytes.clone(),
        );
        registry.register(
            "kkachi_mailboxes",
            "Mailboxes with envelopes",
            m.mailboxes.clone(),
        );
        registry.register(
            "kkachi_expired",
            "Envelopes removed by expiry",
            m.expired.clone(),
        );
        registry.register(
            "kkachi_waiting_subscriptions",
            "Open long polls",
            m.waiting.clone(),
        );
        registry.register(
            "kkachi_flush_seconds",
            "Duration of storage flushes",
            m.flush_seconds.clone(),
        );
        registry.register(
            "kkachi_put_ack_seconds",
            "Time from receiving a put to acknowledging it",
            m.put_ack_seconds.clone(),
        );
        registry.register(
            "kkachi_stored_chunks",
            "Chunks of files stored",
            m.stored_chunks.clone(),
        );
        registry.register(
            "kkachi_stored_chunk_bytes",
            "Bytes of chunks of files stored",
            m.stored_chunk_bytes.clone(),
        );
        registry.register(
            "kkachi_chunk_bytes_served",
            "Bytes of chunks of files served",
            m.chunk_bytes_served.clone(),
        );
        Self {
            registry: Arc::new(registry),
            ..m
        }
    }

    /// Mirrors the chunk store's totals into the gauges.
    pub fn set_chunks(&self, s: crate::store::chunks::ChunkStats) {
        self.stored_chunks.set(s.chunks as i64);
        self.stored_chunk_bytes.set(s.bytes as i64);
    }

    pub(crate) fn kind(kind: &'static str) -> Kind {
        Kind { kind }
    }

    /// Mirrors store totals into the gauges.
    pub fn set_store(&self, s: StoreStats) {
        self.stored_envelopes.set(s.envelopes as i64);
        self.stored_bytes.set(s.bytes as i64);
        self.mailboxes.set(s.mailboxes as i64);
    }

    /// Marks the relay as serving (for `/healthz`).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Binds the HTTP endpoint and serves it in the background; returns the bound
    /// address (useful with port 0).
    pub async fn serve(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let metrics = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        let mut head = vec![0u8; 8192];
                        let mut n = 0;
                        while n < head.len() {
                            let read = stream.read(&mut head[n..]).await?;
                            if read == 0 {
                                break;
                            }
                            n += read;
                            if head[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                        let response = metrics.respond(&head[..n]);
                        stream.write_all(response.as_bytes()).await?;
                        stream.shutdown().await
                    })
                    .await;
                });
            }
        });
        Ok(local)
    }

    fn respond(&self, head: &[u8]) -> String {
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        // HEAD answers as GET would, without the body (load balancers probe with it).
        let head_only = method == "HEAD";
        let method = if head_only { "GET" } else { method };
        let (status, content_type, body) = match (method, path) {
            ("GET", "/metrics") => (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.render(),
            ),
            ("GET", "/healthz") if self.ready.load(Ordering::Relaxed) => {
                ("200 OK", "text/plain", "ok\n".to_string())
            }
            ("GET", "/healthz") => (
                "503 Service Unavailable",
                "text/plain",
                "starting or stopping\n".to_string(),
            ),
            ("GET", _) => (
                "404 Not Found",
                "text/plain",
                "try /metrics or /healthz\n".to_string(),
            ),
            _ => (
                "405 Method Not Allowed",
                "text/plain",
                "GET or HEAD only\n".to_string(),
            ),
        };
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
            body.len(),
            if head_only { "" } else { body.as_str() }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_kkachi_metrics() {
        let m = Metrics::new();
        m.puts.get_or_create(&Metrics::kind("stored")).inc();
        m.flush_seconds.observe(0.002);
        let text = m.render();
        assert!(
            text.contains("kkachi_puts_total{kind=\"stored\"} 1"),
            "{text}"
        );
        assert!(text.contains("kkachi_flush_seconds_bucket"));
        assert!(text.contains("kkachi_connections"));
    }

    #[tokio::test]
    async fn serves_metrics_and_health_over_http() {
        let m = Metrics::new();
        let addr = m.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let ask = |method: &'static str, path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("{method} {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let get = |path: &'static str| ask("GET", path);
        assert!(get("/healthz").await.starts_with("HTTP/1.1 503"));
        m.set_ready(true);
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/metrics").await.contains("kkachi_stored_envelopes"));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        let head = ask("HEAD", "/healthz").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "no body: {head}");
        assert!(ask("POST", "/healthz").await.starts_with("HTTP/1.1 405"));
    }
}
