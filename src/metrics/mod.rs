//! What apnsd counts about itself; `server` shows it over HTTP. One
//! registry per daemon instance, so several daemons in one test process
//! stay apart.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

mod server;

pub use server::{bind, metrics_change, serve, ListenError, MetricsChange, MetricsServer};

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
    connections_opened: Family<AppLabel, PCounter>,
    connect_failures: Family<AppLabel, PCounter>,
    stalls: Family<AppLabel, PCounter>,
    connections_up: Family<AppLabel, PGauge>,
    window: Family<LaneLabel, PGauge>,
    identity_refused: Family<AppLabel, PGauge>,
    connections_max: Family<AppLabel, PGauge>,
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
        let connections_max = Family::<AppLabel, PGauge>::default();
        registry.register(
            "connections_max",
            "The most gateway connections an app opens (HTTP/2 apps grow to it while every stream is busy), by app",
            connections_max.clone(),
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
            connections_opened,
            connect_failures,
            stalls,
            connections_up,
            window,
            identity_refused,
            connections_max,
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
    /// The most connections `app` opens: `connections`, or an HTTP/2 app's
    /// `max_connections`.
    pub fn set_connections_max(&self, app: &str, max: usize) {
        let by_app = AppLabel {
            app: app.to_owned(),
        };
        self.connections_max.get_or_create(&by_app).set(max as i64);
    }

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
    pub feedback_tokens: u64,
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
}
