//! What apnsd counts about itself; `server` shows it over HTTP and
//! `health` says whether the daemon is ready. One registry per daemon
//! instance, so several daemons in one test process stay apart.
//!
//! Every series is declared once, in the `series!` table below: its entry
//! gives the field, the registered name, help text and type, and (for an
//! unlabelled counter) its place in [`StatsSnapshot`]. Adding a series is
//! one entry in the right section: a counter or gauge is used as
//! `stats.name.inc()` / `.set(n)`; a labelled one as
//! `stats.name.with(&AppLabel { app }).inc()` (a new label set is a struct
//! deriving `EncodeLabelSet`); a histogram of durations as
//! `stats.name.observe(d)`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

mod health;
mod server;

pub use health::Health;
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
    pub fn set(&self, n: i64) {
        self.0.set(n);
    }
    pub fn get(&self) -> i64 {
        self.0.get()
    }
}

/// A series with one member per label set `L`; `M` is [`Counter`] or
/// [`Gauge`], and `with` picks (creating on first use) the member.
#[derive(Debug)]
pub struct Labelled<L, M>(Family<L, M::Inner>)
where
    L: Clone + std::hash::Hash + Eq,
    M: Member;

/// A metric that can be a member of a [`Labelled`] series.
pub trait Member {
    type Inner: Default + Clone;
    fn wrap(inner: &Self::Inner) -> Self;
}

impl Member for Counter {
    type Inner = PCounter;
    fn wrap(inner: &PCounter) -> Self {
        Counter(inner.clone())
    }
}

impl Member for Gauge {
    type Inner = PGauge;
    fn wrap(inner: &PGauge) -> Self {
        Gauge(inner.clone())
    }
}

impl<L: Clone + std::hash::Hash + Eq, M: Member> Clone for Labelled<L, M> {
    fn clone(&self) -> Self {
        Labelled(self.0.clone())
    }
}

impl<L: Clone + std::hash::Hash + Eq, M: Member> Default for Labelled<L, M> {
    fn default() -> Self {
        Labelled(Family::default())
    }
}

impl<L: Clone + std::hash::Hash + Eq, M: Member> Labelled<L, M> {
    pub fn with(&self, labels: &L) -> M {
        M::wrap(&self.0.get_or_create(labels))
    }

    /// Drops the member for `labels`: its series disappears from `/metrics`.
    pub fn remove(&self, labels: &L) {
        self.0.remove(labels);
    }
}

/// A distribution of durations, in seconds.
#[derive(Debug, Clone)]
pub struct Seconds(prometheus_client::metrics::histogram::Histogram);

impl Seconds {
    fn new(buckets: &[f64]) -> Seconds {
        Seconds(prometheus_client::metrics::histogram::Histogram::new(
            buckets.iter().copied(),
        ))
    }
    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabel {
    pub app: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoutingKeyLabel {
    pub routing_key: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabel {
    pub app: String,
    pub lane: String,
}

/// Generates [`Stats`] (one public field per series plus `health` and the
/// registry), `Stats::new` (which registers each series under its name
/// and help, in table order), and [`StatsSnapshot`] (every unlabelled
/// counter). `health` is given the gauges it keeps. The name is without the
/// `apnsd_` prefix and, for counters, without the `_total` suffix the
/// exposition adds.
macro_rules! series {
    (
        counters { $( $(#[$cdoc:meta])* $c:ident = $cname:literal, $chelp:literal; )* }
        labelled { $( $(#[$ldoc:meta])* $l:ident: $lty:ty = $lname:literal, $lhelp:literal; )* }
        gauges { $( $(#[$gdoc:meta])* $g:ident = $gname:literal, $ghelp:literal; )* }
        histograms {
            $( $(#[$hdoc:meta])* $h:ident [$($b:literal),* $(,)?] = $hname:literal, $hhelp:literal; )*
        }
        health counts refusals in $refused:ident and readiness in $ready:ident;
    ) => {
        /// Everything apnsd counts.
        pub struct Stats {
            $( $(#[$cdoc])* pub $c: Counter, )*
            $( $(#[$ldoc])* pub $l: $lty, )*
            $( $(#[$gdoc])* pub $g: Gauge, )*
            $( $(#[$hdoc])* pub $h: Seconds, )*
            /// Whether the daemon is ready, and why not.
            pub health: Health,
            registry: Registry,
        }

        impl Stats {
            pub fn new() -> Stats {
                let mut registry = Registry::with_prefix("apnsd");
                $( let $c = Counter::default();
                   registry.register($cname, $chelp, $c.0.clone()); )*
                $( let $l = <$lty>::default();
                   registry.register($lname, $lhelp, $l.0.clone()); )*
                $( let $g = Gauge::default();
                   registry.register($gname, $ghelp, $g.0.clone()); )*
                $( let $h = Seconds::new(&[$($b),*]);
                   registry.register($hname, $hhelp, $h.0.clone()); )*
                let health = Health::new($refused.clone(), $ready.clone());
                Stats { $($c,)* $($l,)* $($g,)* $($h,)* health, registry }
            }

            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $( $c: self.$c.get(), )* }
            }
        }

        /// A plain copy of the unlabelled counters, for tests and reports.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct StatsSnapshot {
            $( pub $c: u64, )*
        }
    };
}

series! {
    counters {
        jobs_consumed = "jobs_consumed", "Jobs taken from the jobs queue";
        jobs_rejected = "jobs_rejected", "Jobs that were unusable (rejected results)";
        jobs_acked = "jobs_acked", "Jobs acknowledged after every outcome was final";
        /// Deliveries the broker marked redelivered: their earlier try may have sent some.
        jobs_redelivered = "jobs_redelivered",
            "Jobs the broker delivered again (an earlier try may have sent some notifications)";
        /// Jobs republished to the retry queue because their app was unusable.
        jobs_deferred = "jobs_deferred",
            "Jobs republished to the retry queue because their app was unusable";
        /// Frames handed to a socket and flushed.
        written = "notifications_written", "Notifications written to a gateway connection";
        accepted = "notifications_accepted", "Notifications APNs accepted (settled or implied)";
        /// Every failure; `failed_with` also counts it by reason.
        failed = "notifications_failed", "Notifications that failed for good";
        /// Retried after a transient status (1 or 255).
        retried = "notifications_retried", "Retries after a transient status";
        /// Resent because an earlier notification on the connection failed.
        resent_after_error = "notifications_resent_after_error",
            "Notifications resent because an earlier one on the connection failed";
        /// Resent because a connection closed without saying what it processed:
        /// these are the only possible duplicates.
        resent_after_close = "notifications_resent_after_close",
            "Notifications resent because a connection closed silently (possible duplicates)";
        /// Accepted after the broker session of their job ended: the redelivered
        /// job sends them again, so each is a duplicate.
        accepted_after_session_loss = "notifications_accepted_after_session_loss",
            "Notifications accepted after their broker session ended (sent again on redelivery)";
        /// Not yet written when the broker session of their job ended: dropped, as
        /// the redelivered job sends them.
        dropped_for_redelivery = "notifications_dropped_for_redelivery",
            "Unwritten notifications dropped because their broker session ended";
        /// Not sent again on redelivery: their outcome was known from the lost session.
        skipped_after_redelivery = "notifications_skipped_after_redelivery",
            "Notifications of redelivered jobs not sent again: their outcome was known from the lost broker session";
        results_published = "results_published", "Results confirmed by the broker";
        feedback_tokens = "feedback_tokens", "Tokens reported by the feedback service";
    }
    labelled {
        connections_opened: Labelled<AppLabel, Counter> = "connections_opened",
            "Gateway connections established, by app";
        connect_failures: Labelled<AppLabel, Counter> = "connect_failures",
            "Failed gateway connection attempts, by app";
        stalls: Labelled<AppLabel, Counter> = "connection_stalls",
            "Connections dropped because writes made no progress, by app";
        connections_up: Labelled<AppLabel, Gauge> = "connections_up",
            "Gateway connections open now, by app";
        /// Kept by [`Health`], which owns the refusals it counts.
        identity_refused: Labelled<AppLabel, Gauge> = "identity_refused",
            "Connections whose gateway refuses the app's certificate, by app (not ready while any)";
        window: Labelled<LaneLabel, Gauge> = "window_notifications",
            "Notifications written and not yet settled, by app and connection";
        failed_by_reason: Labelled<ReasonLabel, Counter> = "notifications_failed_by_reason",
            "Notifications that failed for good, by reason";
        connections_max: Labelled<AppLabel, Gauge> = "connections_max",
            "The most gateway connections an app opens (HTTP/2 apps grow to it while every stream is busy), by app";
        /// When each certificate-auth app's certificate ends (unix seconds), so an
        /// alert fires weeks before APNs starts refusing it.
        certificate_expiry: Labelled<AppLabel, Gauge> = "certificate_expiry_timestamp_seconds",
            "When the app's client certificate expires (unix seconds), by app";
        /// 1 for the broker node the session is on, 0 for nodes it was on.
        broker_node: Labelled<NodeLabel, Gauge> = "amqp_session_node",
            "1 for the broker node (host:port) the session is on, 0 for nodes it left";
        /// Results the broker returned because no queue was bound for them:
        /// final, not published again.
        results_unroutable: Labelled<RoutingKeyLabel, Counter> = "results_unroutable",
            "Results the broker returned unrouted (no queue bound for their routing key), by routing key";
    }
    gauges {
        /// Jobs of the current broker session not yet final (0 between sessions).
        jobs_in_flight = "jobs_in_flight",
            "Jobs consumed by the current broker session and not yet final";
        /// Deliveries of the current broker session not acked yet, final
        /// jobs waiting for their ack included: what `amqp.prefetch` bounds.
        jobs_unacked = "jobs_unacked",
            "Deliveries of the current broker session not yet acked (bounded by amqp.prefetch)";
        /// Body bytes of the jobs in flight: what `amqp.prefetch_bytes` bounds.
        job_bytes_held = "job_bytes_held",
            "Body bytes of the jobs in flight (bounded by amqp.prefetch_bytes)";
        /// The prefetch of the current subscription (0 between sessions).
        prefetch = "prefetch",
            "Prefetch of the current subscription, adapted under amqp.prefetch and amqp.prefetch_bytes";
        /// Kept by [`Health`]: `is_ready` as a series, as Prometheus cannot scrape `/readyz`.
        ready = "ready",
            "1 while a broker session consumes and no gateway refuses an app's certificate (as /readyz)";
        /// Results published and not yet confirmed: what the settlement bounds.
        results_unconfirmed = "results_unconfirmed",
            "Results published and awaiting the broker's confirm";
    }
    histograms {
        accept_latency [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 60.0]
            = "consume_to_accepted_seconds",
            "Time from consuming a job to APNs accepting its notification";
        ack_lag [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0]
            = "ack_lag_seconds",
            "Time from a job becoming final (its last result confirmed) to its ack";
    }
    health counts refusals in identity_refused and readiness in ready;
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
    pub fn failed_with(&self, reason: &str) {
        self.failed.inc();
        self.failed_by_reason
            .with(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The broker returned a result with `routing_key` unrouted; returns how
    /// many it returned with that key so far.
    pub fn result_unroutable(&self, routing_key: &str) -> u64 {
        let counter = self.results_unroutable.with(&RoutingKeyLabel {
            routing_key: routing_key.to_owned(),
        });
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
            connections_opened: self.connections_opened.with(&by_app),
            connect_failures: self.connect_failures.with(&by_app),
            stalls: self.stalls.with(&by_app),
            connections_up: self.connections_up.with(&by_app),
            window: self.window.with(&by_lane),
        }
    }

    pub fn observe_accepted(&self, latency: Duration) {
        self.accept_latency.observe(latency);
    }

    pub fn observe_ack_lag(&self, lag: Duration) {
        self.ack_lag.observe(lag);
    }

    /// Marks `node` (a label without userinfo) as the one the session is on, or left.
    pub fn set_broker_node(&self, node: &str, on: bool) {
        self.broker_node
            .with(&NodeLabel {
                node: node.to_owned(),
            })
            .set(i64::from(on));
    }

    /// The most connections `app` opens: `connections`, or an HTTP/2 app's
    /// `max_connections`.
    pub fn set_connections_max(&self, app: &str, max: usize) {
        let by_app = AppLabel {
            app: app.to_owned(),
        };
        self.connections_max.with(&by_app).set(max as i64);
    }

    /// Records when `app`'s certificate expires; `None` (token auth, the
    /// built-in simulator, a removed app) drops the series.
    pub fn set_certificate_expiry(&self, app: &str, not_after: Option<i64>) {
        let label = AppLabel {
            app: app.to_owned(),
        };
        match not_after {
            Some(t) => self.certificate_expiry.with(&label).set(t),
            None => self.certificate_expiry.remove(&label),
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_identity_withholds_readiness_until_every_lane_recovers() {
        let s = Stats::new();
        s.health.set_ready(true);
        assert!(s.health.is_ready());
        s.health.set_identity_refused("shop", 0, true);
        s.health.set_identity_refused("shop", 1, true);
        assert!(!s.health.is_ready());
        assert_eq!(s.health.refused_apps(), ["shop"]);
        assert!(s
            .render()
            .contains("apnsd_identity_refused{app=\"shop\"} 2"));
        s.health.set_identity_refused("shop", 0, false);
        assert!(!s.health.is_ready(), "lane 1 is still refused");
        s.health.set_identity_refused("shop", 1, false);
        assert!(s.health.is_ready());
        assert!(s.health.refused_apps().is_empty());
    }

    #[test]
    fn readiness_and_certificate_expiry_are_series() {
        let s = Stats::new();
        assert!(s.render().contains("apnsd_ready 0"));
        s.health.set_ready(true);
        assert!(s.render().contains("apnsd_ready 1"));
        s.health.set_identity_refused("shop", 0, true);
        assert!(s.render().contains("apnsd_ready 0"));
        s.health.set_identity_refused("shop", 0, false);
        assert!(s.render().contains("apnsd_ready 1"));

        s.set_certificate_expiry("shop", Some(1_800_000_000));
        let line = "apnsd_certificate_expiry_timestamp_seconds{app=\"shop\"} 1800000000";
        assert!(s.render().contains(line), "{}", s.render());
        s.set_certificate_expiry("shop", None);
        assert!(!s.render().contains("{app=\"shop\"} 1800000000"));
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

#[cfg(test)]
mod exposition {
    use super::*;

    /// Each series as `name type {label names} help`, sorted, with every
    /// labelled family given one member so its labels show.
    fn series(s: &Stats) -> Vec<String> {
        s.lane("a", 0);
        s.failed_with("r");
        s.health.set_identity_refused("a", 0, true);
        s.set_certificate_expiry("a", Some(1));
        s.set_broker_node("n:1", true);
        s.set_connections_max("a", 1);
        s.result_unroutable("delivered");
        let text = s.render();
        let mut help = std::collections::BTreeMap::new();
        let mut kind = std::collections::BTreeMap::new();
        let mut labels: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, h) = rest.split_once(' ').unwrap_or((rest, ""));
                help.insert(name, h);
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, t) = rest.split_once(' ').unwrap_or((rest, ""));
                kind.insert(name, t);
            } else if let Some((name, rest)) = line.split_once('{') {
                let family = kind
                    .keys()
                    .filter(|k| name.starts_with(**k))
                    .max_by_key(|k| k.len())
                    .copied()
                    .unwrap_or(name);
                let names: Vec<&str> = rest
                    .split(',')
                    .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
                    .filter(|k| *k != "le")
                    .collect();
                labels.insert(family, names);
            }
        }
        kind.iter()
            .map(|(name, t)| {
                let l = labels.get(name).map(|l| l.join(",")).unwrap_or_default();
                format!("{name} {t} {{{l}}} {}", help.get(name).unwrap_or(&""))
            })
            .collect()
    }

    /// Pins every series' name, type, label names and help, so changing
    /// how they are declared cannot change what a scraper sees.
    #[test]
    fn every_series_keeps_its_name_type_labels_and_help() {
        let expected = [
            "apnsd_ack_lag_seconds histogram {} Time from a job becoming final (its last result confirmed) to its ack.",
            "apnsd_amqp_session_node gauge {node} 1 for the broker node (host:port) the session is on, 0 for nodes it left.",
            "apnsd_certificate_expiry_timestamp_seconds gauge {app} When the app's client certificate expires (unix seconds), by app.",
            "apnsd_connect_failures counter {app} Failed gateway connection attempts, by app.",
            "apnsd_connection_stalls counter {app} Connections dropped because writes made no progress, by app.",
            "apnsd_connections_max gauge {app} The most gateway connections an app opens (HTTP/2 apps grow to it while every stream is busy), by app.",
            "apnsd_connections_opened counter {app} Gateway connections established, by app.",
            "apnsd_connections_up gauge {app} Gateway connections open now, by app.",
            "apnsd_consume_to_accepted_seconds histogram {} Time from consuming a job to APNs accepting its notification.",
            "apnsd_feedback_tokens counter {} Tokens reported by the feedback service.",
            "apnsd_identity_refused gauge {app} Connections whose gateway refuses the app's certificate, by app (not ready while any).",
            "apnsd_job_bytes_held gauge {} Body bytes of the jobs in flight (bounded by amqp.prefetch_bytes).",
            "apnsd_jobs_acked counter {} Jobs acknowledged after every outcome was final.",
            "apnsd_jobs_consumed counter {} Jobs taken from the jobs queue.",
            "apnsd_jobs_deferred counter {} Jobs republished to the retry queue because their app was unusable.",
            "apnsd_jobs_in_flight gauge {} Jobs consumed by the current broker session and not yet final.",
            "apnsd_jobs_redelivered counter {} Jobs the broker delivered again (an earlier try may have sent some notifications).",
            "apnsd_jobs_rejected counter {} Jobs that were unusable (rejected results).",
            "apnsd_jobs_unacked gauge {} Deliveries of the current broker session not yet acked (bounded by amqp.prefetch).",
            "apnsd_notifications_accepted counter {} Notifications APNs accepted (settled or implied).",
            "apnsd_notifications_accepted_after_session_loss counter {} Notifications accepted after their broker session ended (sent again on redelivery).",
            "apnsd_notifications_dropped_for_redelivery counter {} Unwritten notifications dropped because their broker session ended.",
            "apnsd_notifications_failed counter {} Notifications that failed for good.",
            "apnsd_notifications_failed_by_reason counter {reason} Notifications that failed for good, by reason.",
            "apnsd_notifications_resent_after_close counter {} Notifications resent because a connection closed silently (possible duplicates).",
            "apnsd_notifications_resent_after_error counter {} Notifications resent because an earlier one on the connection failed.",
            "apnsd_notifications_retried counter {} Retries after a transient status.",
            "apnsd_notifications_skipped_after_redelivery counter {} Notifications of redelivered jobs not sent again: their outcome was known from the lost broker session.",
            "apnsd_notifications_written counter {} Notifications written to a gateway connection.",
            "apnsd_prefetch gauge {} Prefetch of the current subscription, adapted under amqp.prefetch and amqp.prefetch_bytes.",
            "apnsd_ready gauge {} 1 while a broker session consumes and no gateway refuses an app's certificate (as /readyz).",
            "apnsd_results_published counter {} Results confirmed by the broker.",
            "apnsd_results_unconfirmed gauge {} Results published and awaiting the broker's confirm.",
            "apnsd_results_unroutable counter {routing_key} Results the broker returned unrouted (no queue bound for their routing key), by routing key.",
            "apnsd_window_notifications gauge {app,lane} Notifications written and not yet settled, by app and connection.",
        ];
        assert_eq!(series(&Stats::new()), expected);
    }
}
