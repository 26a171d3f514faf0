//! The configuration's shape: what each key is, its type and its default.
//! Deserialisation is strict (a float is not an integer, a string is not a
//! number); the rules that relate keys, and the ranges, live in `validate`.
//! Unknown keys are not refused here: the loader collects them all at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use crate::apns::Protocol;
use crate::brokers::BrokerUris;
use crate::proxy::{Proxy, ProxySetting};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Sandbox,
    Production,
    /// The built-in simulator (in-process unless `gateway` points elsewhere).
    Simulator,
}

impl Environment {
    /// The name as the configuration spells it.
    pub fn name(self) -> &'static str {
        match self {
            Environment::Sandbox => "sandbox",
            Environment::Production => "production",
            Environment::Simulator => "simulator",
        }
    }

    /// Apple's binary gateway for this environment.
    pub fn gateway(self) -> Option<&'static str> {
        match self {
            Environment::Production => Some("gateway.push.apple.com:2195"),
            Environment::Sandbox => Some("gateway.sandbox.push.apple.com:2195"),
            Environment::Simulator => None,
        }
    }

    /// Apple's HTTP/2 provider API for this environment.
    pub fn endpoint(self) -> Option<&'static str> {
        match self {
            Environment::Production => Some("api.push.apple.com:443"),
            Environment::Sandbox => Some("api.sandbox.push.apple.com:443"),
            Environment::Simulator => None,
        }
    }

    /// Apple's channel management API (broadcast channels) for this environment.
    pub fn channel_endpoint(self) -> Option<&'static str> {
        match self {
            Environment::Production => Some("api-manage-broadcast.push.apple.com:2196"),
            Environment::Sandbox => Some("api-manage-broadcast.sandbox.push.apple.com:2195"),
            Environment::Simulator => None,
        }
    }

    pub fn feedback(self) -> Option<&'static str> {
        match self {
            Environment::Production => Some("feedback.push.apple.com:2196"),
            Environment::Sandbox => Some("feedback.sandbox.push.apple.com:2196"),
            Environment::Simulator => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default = "defaults::log_level")]
    pub log_level: String,
    #[serde(default)]
    pub log_format: LogFormat,
    /// On SIGTERM, how long in-flight jobs may take to become final.
    #[serde(default = "defaults::shutdown_timeout", deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
    /// Threads running the daemon's tasks (lapin adds one I/O thread per
    /// broker connection). One makes every hand-off between the intake, the
    /// lanes and the acks a plain task switch instead of a cross-thread wake.
    #[serde(default = "defaults::worker_threads")]
    pub worker_threads: usize,
    #[serde(default)]
    pub amqp: AmqpConfig,
    #[serde(default)]
    pub results: ResultsConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub apps: Vec<AppConfig>,
    /// HTTP CONNECT proxy for every app that sets none of its own.
    #[serde(default)]
    pub proxy: Option<ProxySetting>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AmqpConfig {
    /// One broker URI, or several nodes of a cluster (each process starts at a random one).
    pub uri: BrokerUris,
    pub queue: String,
    /// `x-queue-type` of the jobs queue: `classic` (default) or `quorum`.
    pub queue_type: Option<String>,
    pub prefetch: u16,
    /// Most job body bytes held unacknowledged: the prefetch in force adapts
    /// under `prefetch` to keep within it (0: `prefetch` alone).
    pub prefetch_bytes: u64,
    pub results_exchange: String,
    pub consumer_tag: Option<String>,
    /// A result the broker has not confirmed by then ends the broker session.
    #[serde(deserialize_with = "duration")]
    pub confirm_timeout: Duration,
    /// How long a job whose app is unusable waits in `<queue>.retry`.
    #[serde(deserialize_with = "duration")]
    pub retry_delay: Duration,
    /// Tries of a job whose app stays unusable; then its tokens fail.
    pub max_job_attempts: u32,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            uri: BrokerUris::default(),
            queue: "apns.jobs".into(),
            queue_type: None,
            prefetch: 20_000,
            prefetch_bytes: 32 << 20,
            results_exchange: "apns.results".into(),
            consumer_tag: None,
            confirm_timeout: Duration::from_secs(30),
            retry_delay: Duration::from_secs(60),
            max_job_attempts: 10,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ResultsConfig {
    /// Also publish a `delivered` result per accepted notification.
    pub delivered: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct MetricsConfig {
    /// Where to serve `/metrics`, `/healthz`, `/readyz`; absent: not served.
    pub listen: Option<SocketAddr>,
}

#[derive(Clone, PartialEq, Deserialize)]
pub struct AppConfig {
    pub name: String,
    pub topic: Option<String>,
    pub environment: Environment,
    /// `binary` (the default) or `http2`: Apple's production service speaks only HTTP/2.
    #[serde(default)]
    pub protocol: Protocol,
    pub certificate: Option<PathBuf>,
    /// Resolved from `password_file` at load time.
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default = "defaults::connections")]
    pub connections: usize,
    /// HTTP/2: the most connections the app grows to while every stream is
    /// busy; see [`AppConfig::max_connections`].
    pub max_connections: Option<usize>,
    pub gateway: Option<String>,
    pub feedback: Option<String>,
    pub ca: Option<PathBuf>,
    #[serde(default = "defaults::feedback_interval", deserialize_with = "duration")]
    pub feedback_interval: Duration,
    /// Silence after which a written notification counts as accepted.
    #[serde(default = "defaults::settle", deserialize_with = "duration")]
    pub settle: Duration,
    /// How long settled notifications are kept so a late error can resend what followed.
    #[serde(default = "defaults::retain", deserialize_with = "duration")]
    pub retain: Duration,
    /// Most unsettled notifications per connection.
    #[serde(default = "defaults::window")]
    pub window: usize,
    /// Tries for transient statuses (1 and 255).
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u8,
    #[serde(default = "defaults::connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// A connection whose writes make no progress this long is dropped.
    #[serde(default = "defaults::write_timeout", deserialize_with = "duration")]
    pub write_timeout: Duration,
    #[serde(default = "defaults::reconnect_min", deserialize_with = "duration")]
    pub reconnect_min: Duration,
    #[serde(default = "defaults::reconnect_max", deserialize_with = "duration")]
    pub reconnect_max: Duration,
    /// HTTP/2 token auth: the `.p8` signing key, its key id and the team id.
    pub key_file: Option<PathBuf>,
    pub key_id: Option<String>,
    pub team_id: Option<String>,
    /// HTTP/2 `host:port`, overriding the environment's.
    pub endpoint: Option<String>,
    /// HTTP/2: an answer that takes longer counts as a failed try.
    #[serde(default = "defaults::request_timeout", deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// HTTP/2: how often a connection is PINGed to find out it died.
    #[serde(default = "defaults::ping_interval", deserialize_with = "duration")]
    pub ping_interval: Duration,
    /// HTTP/2: how long the load must fit in one connection fewer before
    /// one of those grown beyond `connections` is closed.
    #[serde(default = "defaults::shrink_after", deserialize_with = "duration")]
    pub shrink_after: Duration,
    /// HTTP/2: most streams open per connection, below the server's own limit.
    #[serde(default = "defaults::max_concurrent_streams")]
    pub max_concurrent_streams: usize,
    /// After this long without a working gateway connection, the app's jobs
    /// go to the retry queue instead of waiting in its lanes.
    #[serde(default = "defaults::unusable_after", deserialize_with = "duration")]
    pub unusable_after: Duration,
    /// HTTP CONNECT proxy for every connection of the app (`""`: none);
    /// absent, the top-level `proxy` applies (filled in at load time).
    #[serde(default)]
    pub proxy: Option<ProxySetting>,
    /// `host:port` of Apple's channel management API, overriding the environment's.
    pub channel_endpoint: Option<String>,
}

impl AppConfig {
    /// HTTP/2 with a provider token instead of a client certificate.
    pub fn token_auth(&self) -> bool {
        self.key_file.is_some()
    }

    /// The proxy the app's connections go through, if any.
    pub fn via_proxy(&self) -> Option<&Arc<Proxy>> {
        self.proxy.as_ref().and_then(ProxySetting::proxy)
    }

    /// HTTP/2: the most connections the app grows to while every stream is
    /// busy and work waits; `connections` is where it starts (and the fewest
    /// it keeps). Unset: [`DEFAULT_MAX_CONNECTIONS`], or `connections` if more.
    /// A binary app keeps `connections`.
    pub fn max_connections(&self) -> usize {
        match self.protocol {
            Protocol::Binary => self.connections,
            Protocol::Http2 => self
                .max_connections
                .unwrap_or(DEFAULT_MAX_CONNECTIONS)
                .max(self.connections),
        }
    }

    /// Talks to a simulator started inside this process.
    pub fn uses_builtin_simulator(&self) -> bool {
        self.environment == Environment::Simulator
            && match self.protocol {
                Protocol::Binary => self.gateway.is_none(),
                Protocol::Http2 => self.endpoint.is_none(),
            }
    }
}

impl std::fmt::Debug for AppConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppConfig")
            .field("name", &self.name)
            .field("environment", &self.environment)
            .field("certificate", &self.certificate)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("connections", &self.connections)
            .field("gateway", &self.gateway)
            .field("protocol", &self.protocol)
            .field("endpoint", &self.endpoint)
            .field("key_id", &self.key_id)
            .field("proxy", &self.proxy)
            .finish_non_exhaustive()
    }
}

/// `max_connections` when unset: at Apple's round trip of tens of
/// milliseconds, 64 connections of 1000 streams carry about 1.1 million
/// notifications/s (at 50 ms and the few ms a busy machine adds), above what
/// apnsd sends into a sink that answers at once on this kind of machine
/// (about 0.9 million), so latency is not what caps it. 32 capped it near
/// 560,000. Connections beyond what helps are not opened (see
/// `apns::http2::growth`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

mod defaults {
    use std::time::Duration;
    pub fn log_level() -> String {
        "info".into()
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn worker_threads() -> usize {
        1
    }
    pub fn connections() -> usize {
        2
    }
    pub fn feedback_interval() -> Duration {
        Duration::from_secs(3600)
    }
    /// Short enough that `prefetch ÷ settle` (100,000 jobs/s) and
    /// `connections × window ÷ settle` (2,000,000 notifications/s) leave the
    /// broker as the limit; `retain` still honours errors that come later.
    pub fn settle() -> Duration {
        Duration::from_millis(200)
    }
    pub fn retain() -> Duration {
        Duration::from_secs(2)
    }
    pub fn window() -> usize {
        200_000
    }
    pub fn max_attempts() -> u8 {
        3
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn write_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn reconnect_min() -> Duration {
        Duration::from_millis(100)
    }
    pub fn reconnect_max() -> Duration {
        Duration::from_secs(30)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn ping_interval() -> Duration {
        Duration::from_secs(30)
    }
    pub fn shrink_after() -> Duration {
        crate::apns::http2::growth::SHRINK_AFTER
    }
    pub fn max_concurrent_streams() -> usize {
        1000
    }
    pub fn unusable_after() -> Duration {
        Duration::from_secs(60)
    }
}

/// A duration as humans write it: `"500ms"`, `"30s"`, `"1h"`, `"1m 30s"`.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(serde::de::Error::custom)
}
