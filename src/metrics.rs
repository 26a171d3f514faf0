//! What apnsd counts about itself, and the small HTTP endpoint that shows it:
//! `/metrics` (Prometheus text), `/healthz` (the process answers), `/readyz`
//! (a broker session is consuming). One registry per daemon instance, so
//! several daemons in one test process stay apart.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type PCounter = prometheus_client::metrics::counter::Counter<u64>;
type PGauge = prometheus_client::metrics::gauge::Gauge<i64>;

#[derive(Debug, Default, Clone)]
pub struct Counter(PCounter);

impl Counter {
    pub fn inc(&self) {
        self.0.inc();
    }
    pub fn add(&self, n: u64) {
        self.0.inc_by(n);
    }
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

#[derive(Debug, Default, Clone)]
pub struct Gauge(PGauge);

impl Gauge {
    pub fn add(&self, n: i64) {
        self.0.inc_by(n);
    }
    pub fn get(&self) -> i64 {
        self.0.get()
    }
}

impl Gauge {
    pub fn set(&self, n: i64) {
        self.0.set(n);
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoutingKeyLabel {
    routing_key: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabel {
    app: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LaneLabel {
    app: String,
    lane: String,
}

/// The gateway connection metrics of one lane, labelled with its app (and
/// lane): an operator needs to see which app cannot reach APNs.
#[derive(Debug, Clone)]
pub struct LaneStats {
    pub connections_opened: Counter,
    pub connect_failures: Counter,
    pub stalls: Counter,
    pub connections_up: Gauge,
    /// Notifications written on the connection and not yet settled.
    pub window: Gauge,
}

/// Everything apnsd counts.
pub struct Stats {
    pub jobs_consumed: Counter,
    pub jobs_rejected: Counter,
    pub jobs_acked: Counter,
    /// Deliveries the broker marked redelivered: their earlier try may have sent some.
    pub jobs_redelivered: Counter,
    /// Jobs republished to the retry queue because their app was unusable.
    pub jobs_deferred: Counter,
    /// Jobs of the current broker session not yet final (0 between sessions).
    pub jobs_in_flight: Gauge,
    /// Body bytes of those jobs: what `amqp.prefetch_bytes` bounds.
    pub job_bytes_held: Gauge,
    /// The prefetch of the current subscription (0 between sessions).
    pub prefetch: Gauge,
    /// Frames handed to a socket and flushed.
    pub written: Counter,
    pub accepted: Counter,
    pub failed: Counter,
    failed_by_reason: Family<ReasonLabel, PCounter>,
    /// Retried after a transient status (1 or 255).
    pub retried: Counter,
    /// Resent because an earlier notification on the connection failed.
    pub resent_after_error: Counter,
    /// Resent because a connection closed without saying what it processed:
    /// these are the only possible duplicates.
    pub resent_after_close: Counter,
    /// Accepted after the broker session of their job ended: the redelivered
    /// job sends them again, so each is a duplicate.
    pub accepted_after_session_loss: Counter,
    /// Not yet written when the broker session of their job ended: dropped, as
    /// the redelivered job sends them.
    pub dropped_for_redelivery: Counter,
    pub results_published: Counter,
    /// Results the broker returned because no queue was bound for them.
    results_unroutable: Family<RoutingKeyLabel, PCounter>,
    /// The same over every routing key, for snapshots (not exported).
    unroutable_total: Counter,
    /// Results published and not yet confirmed: what the settlement bounds.
    pub results_unconfirmed: Gauge,
    connections_opened: Family<AppLabel, PCounter>,
    connect_failures: Family<AppLabel, PCounter>,
    stalls: Family<AppLabel, PCounter>,
    connections_up: Family<AppLabel, PGauge>,
    window: Family<LaneLabel, PGauge>,
    identity_refused: Family<AppLabel, PGauge>,
    /// (app, lane) pairs whose gateway refuses the certificate now.
    refused: Mutex<HashSet<(String, usize)>>,
    pub feedback_tokens: Counter,
    accept_latency: Histogram,
    ready: AtomicBool,
    registry: Registry,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.snapshot().fmt(f)
    }
}

impl Stats {
    pub fn new() -> Stats {
        let mut registry = Registry::with_prefix("apnsd");
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.0.clone());
            c
        };
        let jobs_consumed = counter("jobs_consumed", "Jobs taken from the jobs queue");
        let jobs_rejected = counter(
            "jobs_rejected",
            "Jobs that were unusable (rejected results)",
        );
        let jobs_acked = counter(
            "jobs_acked",
            "Jobs acknowledged after every outcome was final",
        );
        let jobs_redelivered = counter(
            "jobs_redelivered",
            "Jobs the broker delivered again (an earlier try may have sent some notifications)",
        );
        let jobs_deferred = counter(
            "jobs_deferred",
            "Jobs republished to the retry queue because their app was unusable",
        );
        let written = counter(
            "notifications_written",
            "Notifications written to a gateway connection",
        );
        let accepted = counter(
            "notifications_accepted",
            "Notifications APNs accepted (settled or implied)",
        );
        let failed = counter("notifications_failed", "Notifications that failed for good");
        let retried = counter("notifications_retried", "Retries after a transient status");
        let resent_after_error = counter(
            "notifications_resent_after_error",
            "Notifications resent because an earlier one on the connection failed",
        );
        let resent_after_close = counter(
            "notifications_resent_after_close",
            "Notifications resent because a connection closed silently (possible duplicates)",
        );
        let accepted_after_session_loss = counter(
            "notifications_accepted_after_session_loss",
            "Notifications accepted after their broker session ended (sent again on redelivery)",
        );
        let dropped_for_redelivery = counter(
            "notifications_dropped_for_redelivery",
            "Unwritten notifications dropped because their broker session ended",
        );
        let results_published = counter("results_published", "Results confirmed by the broker");
        let feedback_tokens = counter("feedback_tokens", "Tokens reported by the feedback service");
        let results_unroutable = Family::<RoutingKeyLabel, PCounter>::default();
        registry.register(
            "results_unroutable",
            "Results the broker returned unrouted (no queue bound for their routing key), by routing key",
            results_unroutable.clone(),
        );
        let results_unconfirmed = Gauge::default();
        registry.register(
            "results_unconfirmed",
            "Results published and awaiting the broker's confirm",
            results_unconfirmed.0.clone(),
        );
        let mut family = |name: &str, help: &str| {
            let f = Family::<AppLabel, PCounter>::default();
            registry.register(name, help, f.clone());
            f
        };
        let connections_opened = family(
            "connections_opened",
            "Gateway connections established, by app",
        );
        let connect_failures = family(
            "connect_failures",
            "Failed gateway connection attempts, by app",
        );
        let stalls = family(
            "connection_stalls",
            "Connections dropped because writes made no progress, by app",
        );
        let jobs_in_flight = Gauge::default();
        registry.register(
            "jobs_in_flight",
            "Jobs consumed by the current broker session and not yet final",
            jobs_in_flight.0.clone(),
        );
        let job_bytes_held = Gauge::default();
        registry.register(
            "job_bytes_held",
            "Body bytes of the jobs in flight (bounded by amqp.prefetch_bytes)",
            job_bytes_held.0.clone(),
        );
        let prefetch = Gauge::default();
        registry.register(
            "prefetch",
            "Prefetch of the current subscription, adapted under amqp.prefetch and amqp.prefetch_bytes",
            prefetch.0.clone(),
        );
        let connections_up = Family::<AppLabel, PGauge>::default();
        registry.register(
            "connections_up",
            "Gateway connections open now, by app",
            connections_up.clone(),
        );
        let identity_refused = Family::<AppLabel, PGauge>::default();
        registry.register(
            "identity_refused",
            "Connections whose gateway refuses the app's certificate, by app (not ready while any)",
            identity_refused.clone(),
        );
        let window = Family::<LaneLabel, PGauge>::default();
        registry.register(
            "window_notifications",
            "Notifications written and not yet settled, by app and connection",
            window.clone(),
        );
        let failed_by_reason = Family::<ReasonLabel, PCounter>::default();
        registry.register(
            "notifications_failed_by_reason",
            "Notifications that failed for good, by reason",
            failed_by_reason.clone(),
        );
        let accept_latency = Histogram::new([
            0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 60.0,
        ]);
        registry.register(
            "consume_to_accepted_seconds",
            "Time from consuming a job to APNs accepting its notification",
            accept_latency.clone(),
        );
        Stats {
            jobs_consumed,
            jobs_rejected,
            jobs_acked,
            jobs_redelivered,
            jobs_deferred,
            jobs_in_flight,
            job_bytes_held,
            prefetch,
            written,
            accepted,
            failed,
            failed_by_reason,
            retried,
            resent_after_error,
            resent_after_close,
            accepted_after_session_loss,
            dropped_for_redelivery,
            results_published,
            results_unroutable,
            unroutable_total: Counter::default(),
            results_unconfirmed,
            connections_opened,
            connect_failures,
            stalls,
            connections_up,
            window,
            identity_refused,
            refused: Mutex::new(HashSet::new()),
            feedback_tokens,
            accept_latency,
            ready: AtomicBool::new(false),
            registry,
        }
    }

    pub fn failed_with(&self, reason: &str) {
        self.failed.inc();
        self.failed_by_reason
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The broker returned a result with `routing_key` unrouted; returns how
    /// many it returned with that key so far.
    pub fn result_unroutable(&self, routing_key: &str) -> u64 {
        let label = RoutingKeyLabel {
            routing_key: routing_key.to_owned(),
        };
        self.unroutable_total.inc();
        let counter = self.results_unroutable.get_or_create(&label);
        counter.inc();
        counter.get()
    }

    /// The connection metrics of `app`'s lane number `lane`.
    pub fn lane(&self, app: &str, lane: usize) -> LaneStats {
        let by_app = AppLabel {
            app: app.to_owned(),
        };
        let by_lane = LaneLabel {
            app: app.to_owned(),
            lane: lane.to_string(),
        };
        LaneStats {
            connections_opened: Counter(self.connections_opened.get_or_create(&by_app).clone()),
            connect_failures: Counter(self.connect_failures.get_or_create(&by_app).clone()),
            stalls: Counter(self.stalls.get_or_create(&by_app).clone()),
            connections_up: Gauge(self.connections_up.get_or_create(&by_app).clone()),
            window: Gauge(self.window.get_or_create(&by_lane).clone()),
        }
    }

    pub fn observe_accepted(&self, latency: Duration) {
        self.accept_latency.observe(latency.as_secs_f64());
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// A broker session consumes, and no gateway refuses an app's certificate.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.refused_apps().is_empty()
    }

    /// Records whether the gateway refuses the certificate of `app`'s lane
    /// `lane`: readiness is withheld while any lane is refused.
    pub fn set_identity_refused(&self, app: &str, lane: usize, refused: bool) {
        let mut set = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (app.to_owned(), lane);
        let changed = if refused {
            set.insert(key)
        } else {
            set.remove(&key)
        };
        if changed {
            let by_app = AppLabel {
                app: app.to_owned(),
            };
            let count = set.iter().filter(|(a, _)| a == app).count();
            self.identity_refused
                .get_or_create(&by_app)
                .set(count as i64);
        }
    }

    /// Apps with a lane whose gateway refuses their certificate, sorted.
    pub fn refused_apps(&self) -> Vec<String> {
        let set = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        let mut apps: Vec<String> = set.iter().map(|(a, _)| a.clone()).collect();
        apps.sort();
        apps.dedup();
        apps
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            jobs_consumed: self.jobs_consumed.get(),
            jobs_rejected: self.jobs_rejected.get(),
            jobs_acked: self.jobs_acked.get(),
            jobs_redelivered: self.jobs_redelivered.get(),
            jobs_deferred: self.jobs_deferred.get(),
            written: self.written.get(),
            accepted: self.accepted.get(),
            failed: self.failed.get(),
            retried: self.retried.get(),
            resent_after_error: self.resent_after_error.get(),
            resent_after_close: self.resent_after_close.get(),
            accepted_after_session_loss: self.accepted_after_session_loss.get(),
            dropped_for_redelivery: self.dropped_for_redelivery.get(),
            results_published: self.results_published.get(),
            results_unroutable: self.unroutable_total.get(),
            feedback_tokens: self.feedback_tokens.get(),
        }
    }
}

/// A plain copy of the counters, for tests and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    pub jobs_consumed: u64,
    pub jobs_rejected: u64,
    pub jobs_acked: u64,
    pub jobs_redelivered: u64,
    pub jobs_deferred: u64,
    pub written: u64,
    pub accepted: u64,
    pub failed: u64,
    pub retried: u64,
    pub resent_after_error: u64,
    pub resent_after_close: u64,
    pub accepted_after_session_loss: u64,
    pub dropped_for_redelivery: u64,
    pub results_published: u64,
    /// Over every routing key.
    pub results_unroutable: u64,
    pub feedback_tokens: u64,
}

/// Serves `/metrics`, `/healthz` and `/readyz` over plain HTTP/1.1 until
/// `shutdown`. Prometheus scrapes need nothing more than this.
pub async fn serve(listener: TcpListener, stats: Arc<Stats>, shutdown: CancellationToken) {
    loop {
        let (mut stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(_) => continue,
            },
            _ = shutdown.cancelled() => return,
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
            let Ok(Ok(n)) = read else { return };
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, content_type, body) = respond(&request, &stats);
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

fn respond(request: &str, stats: &Stats) -> (&'static str, &'static str, String) {
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return ("405 Method Not Allowed", "text/plain", "GET only\n".into());
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            stats.render(),
        ),
        "/healthz" => ("200 OK", "text/plain", "ok\n".into()),
        "/readyz" if stats.is_ready() => ("200 OK", "text/plain", "ready\n".into()),
        "/readyz" => {
            let refused = stats.refused_apps();
            let why = if refused.is_empty() {
                "not consuming: broker session not established\n".to_owned()
            } else {
                format!(
                    "the gateway refuses the certificate of: {}\n",
                    refused.join(", ")
                )
            };
            ("503 Service Unavailable", "text/plain", why)
        }
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Binds the metrics listener, so a bad address fails start-up, not later.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_identity_withholds_readiness_until_every_lane_recovers() {
        let s = Stats::new();
        s.set_ready(true);
        assert!(s.is_ready());
        s.set_identity_refused("shop", 0, true);
        s.set_identity_refused("shop", 1, true);
        assert!(!s.is_ready());
        assert_eq!(s.refused_apps(), ["shop"]);
        assert!(s
            .render()
            .contains("apnsd_identity_refused{app=\"shop\"} 2"));
        s.set_identity_refused("shop", 0, false);
        assert!(!s.is_ready(), "lane 1 is still refused");
        s.set_identity_refused("shop", 1, false);
        assert!(s.is_ready());
        assert!(s.refused_apps().is_empty());
    }

    #[test]
    fn renders_counters_and_reasons() {
        let s = Stats::new();
        s.jobs_consumed.add(3);
        s.failed_with("invalid_token");
        s.observe_accepted(Duration::from_millis(3));
        let text = s.render();
        assert!(text.contains("apnsd_jobs_consumed_total 3"), "{text}");
        assert!(
            text.contains("apnsd_notifications_failed_by_reason_total{reason=\"invalid_token\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("apnsd_consume_to_accepted_seconds_count 1"),
            "{text}"
        );
        assert_eq!(s.snapshot().failed, 1);
    }

    #[test]
    fn endpoints_answer() {
        let s = Stats::new();
        assert!(respond("GET /healthz HTTP/1.1", &s).0.starts_with("200"));
        assert!(respond("GET /readyz HTTP/1.1", &s).0.starts_with("503"));
        s.set_ready(true);
        assert!(respond("GET /readyz HTTP/1.1", &s).0.starts_with("200"));
        assert!(respond("GET /metrics HTTP/1.1", &s)
            .2
            .contains("apnsd_jobs_acked_total 0"));
        assert!(respond("GET /nope HTTP/1.1", &s).0.starts_with("404"));
        assert!(respond("POST /metrics HTTP/1.1", &s).0.starts_with("405"));
    }
}
