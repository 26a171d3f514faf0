//! Configuration: a TOML file plus `APNSD_<SECTION>__<KEY>` environment
//! overrides, validated up front so that every problem is reported with the
//! file and the key it concerns.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use crate::apns::Protocol;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", file.display())]
    Parse { file: PathBuf, message: String },
    #[error("{}: {key}: {problem}", file.display())]
    Key {
        file: PathBuf,
        key: String,
        problem: String,
    },
    /// More than one key is wrong: one line each.
    #[error("{}", lines(.0))]
    Several(Vec<ConfigError>),
}

fn lines(problems: &[ConfigError]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

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

    pub fn feedback(self) -> Option<&'static str> {
        match self {
            Environment::Production => Some("feedback.push.apple.com:2196"),
            Environment::Sandbox => Some("feedback.sandbox.push.apple.com:2196"),
            Environment::Simulator => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    pub uri: String,
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
            uri: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
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
#[serde(deny_unknown_fields, default)]
pub struct ResultsConfig {
    /// Also publish a `delivered` result per accepted notification.
    pub delivered: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where to serve `/metrics`, `/healthz`, `/readyz`; absent: not served.
    pub listen: Option<SocketAddr>,
}

#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// HTTP/2: most streams open per connection, below the server's own limit.
    #[serde(default = "defaults::max_concurrent_streams")]
    pub max_concurrent_streams: usize,
    /// After this long without a working gateway connection, the app's jobs
    /// go to the retry queue instead of waiting in its lanes.
    #[serde(default = "defaults::unusable_after", deserialize_with = "duration")]
    pub unusable_after: Duration,
}

impl AppConfig {
    /// HTTP/2 with a provider token instead of a client certificate.
    pub fn token_auth(&self) -> bool {
        self.key_file.is_some()
    }

    /// HTTP/2: the most connections the app grows to while every stream is
    /// busy and work waits; `connections` is where it starts (and the fewest
    /// it keeps). Unset: [`DEFAULT_MAX_CONNECTIONS`], or `connections` if more.
    pub fn max_connections(&self) -> usize {
        self.max_connections
            .unwrap_or(DEFAULT_MAX_CONNECTIONS)
            .max(self.connections)
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
            .finish_non_exhaustive()
    }
}

/// More threads than this only add contention: the work is I/O.
pub const MAX_WORKER_THREADS: usize = 256;

/// `max_connections` when unset: at Apple's round trip of tens of
/// milliseconds, 16 connections of 1000 streams carry over 300,000
/// notifications/s (at 50 ms), more than one app is expected to need.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;

/// Beyond this `max_connections` is surely a typo: each connection costs a
/// TLS handshake and a task, and APNs limits a provider's connections too.
pub const MAX_CONNECTIONS_LIMIT: usize = 1000;

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
    pub fn max_concurrent_streams() -> usize {
        1000
    }
    pub fn unusable_after() -> Duration {
        Duration::from_secs(60)
    }
}

/// Parses `"500ms"`, `"30s"`, `"5m"`, `"1h"`, `"2d"`, and sums such as `"1m30s"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (use e.g. \"500ms\", \"30s\", \"1h\")");
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let value: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            _ => return Err(bad()),
        };
        total += unit
            .checked_mul(u32::try_from(value).map_err(|_| bad())?)
            .ok_or_else(bad)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

impl Config {
    /// Loads `path` with the process environment's `APNSD_*` overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    pub fn load_with_env(
        path: &Path,
        env: Option<HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let file = path.to_owned();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let overrides = config::Environment::with_prefix("APNSD")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(env);
        let built = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .add_source(overrides)
            .build()
            .map_err(|e| ConfigError::Parse {
                file: file.clone(),
                message: e.to_string(),
            })?;
        let mut cfg: Config = built.try_deserialize().map_err(|e| ConfigError::Parse {
            file: file.clone(),
            message: explain(&e.to_string()),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve(base, &file)?;
        cfg.validate(&file)?;
        Ok(cfg)
    }

    /// The app a job names, or the first app when it names none.
    pub fn app(&self, name: Option<&str>) -> Option<&AppConfig> {
        match name {
            None => self.apps.first(),
            Some(n) => self.apps.iter().find(|a| a.name == n),
        }
    }

    /// Makes file paths relative to the config file's folder and reads password files.
    fn resolve(&mut self, base: &Path, file: &Path) -> Result<(), ConfigError> {
        for (i, app) in self.apps.iter_mut().enumerate() {
            for p in [
                &mut app.certificate,
                &mut app.key,
                &mut app.ca,
                &mut app.password_file,
                &mut app.key_file,
            ]
            .into_iter()
            .flatten()
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
            if let Some(pf) = &app.password_file {
                if app.password.is_some() {
                    return Err(key_error(
                        file,
                        format!("apps[{i}]"),
                        "set `password` or `password_file`, not both",
                    ));
                }
                let text = std::fs::read_to_string(pf).map_err(|e| {
                    key_error(
                        file,
                        format!("apps[{i}].password_file"),
                        format!("{}: {e}", pf.display()),
                    )
                })?;
                app.password = Some(text.trim_end_matches(['\r', '\n']).to_owned());
            }
        }
        Ok(())
    }

    /// Checks every rule and reports every broken one, so an operator fixes a
    /// file in one pass rather than one error per run.
    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut bad = |key: String, problem: String| problems.push(key_error(file, key, problem));
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            bad("log_level".into(), format!("{:?}: {e}", self.log_level));
        }
        if !(1..=MAX_WORKER_THREADS).contains(&self.worker_threads) {
            bad(
                "worker_threads".into(),
                format!(
                    "must be 1 to {MAX_WORKER_THREADS}, not {}",
                    self.worker_threads
                ),
            );
        }
        if self.apps.is_empty() {
            bad(
                "apps".into(),
                "at least one [[apps]] entry is needed".into(),
            );
        }
        if self.amqp.prefetch == 0 {
            bad("amqp.prefetch".into(), "must be between 1 and 65535".into());
        }
        if let Some(kind) = &self.amqp.queue_type {
            if kind != "classic" && kind != "quorum" {
                bad(
                    "amqp.queue_type".into(),
                    "must be \"classic\" or \"quorum\"".into(),
                );
            }
        }
        if self.amqp.max_job_attempts == 0 {
            bad("amqp.max_job_attempts".into(), "must be at least 1".into());
        }
        if self.amqp.retry_delay > Duration::from_secs(u64::from(u32::MAX) / 1000) {
            bad("amqp.retry_delay".into(), "must be under 49 days".into());
        }
        if self.amqp.queue.is_empty() {
            bad("amqp.queue".into(), "must not be empty".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, app) in self.apps.iter().enumerate() {
            let at = |k: &str| format!("apps[{i}].{k}");
            if app.name.trim().is_empty() {
                bad(at("name"), "must not be empty".into());
            }
            if !names.insert(app.name.as_str()) {
                bad(
                    at("name"),
                    format!("{:?} is used by an earlier app", app.name),
                );
            }
            for (k, zero) in [
                ("connections", app.connections == 0),
                ("window", app.window == 0),
                ("max_attempts", app.max_attempts == 0),
            ] {
                if zero {
                    bad(at(k), "must be at least 1".into());
                }
            }
            if app.settle.is_zero() {
                bad(at("settle"), "must be more than 0".into());
            }
            if let Some(max) = app.max_connections {
                if app.protocol != Protocol::Http2 {
                    bad(
                        at("max_connections"),
                        "applies to protocol = \"http2\" only".into(),
                    );
                } else if max < app.connections || max > MAX_CONNECTIONS_LIMIT {
                    bad(
                        at("max_connections"),
                        format!(
                            "must be between `connections` ({}) and {MAX_CONNECTIONS_LIMIT}, not {max}",
                            app.connections
                        ),
                    );
                }
            }
            if app.reconnect_min > app.reconnect_max {
                bad(at("reconnect_min"), "must not exceed reconnect_max".into());
            }
            let token_keys = [&app.key_id, &app.team_id].map(Option::is_some);
            if !matches!(
                (app.key_file.is_some(), token_keys),
                (false, [false, false]) | (true, [true, true])
            ) {
                bad(
                    at("key_file"),
                    "token auth needs `key_file`, `key_id` and `team_id` together".into(),
                );
            }
            if app.token_auth() {
                if app.protocol != Protocol::Http2 {
                    bad(
                        at("key_file"),
                        "token auth needs protocol = \"http2\"".into(),
                    );
                }
                if app.certificate.is_some() {
                    bad(
                        at("key_file"),
                        "use `certificate` or `key_file`, not both".into(),
                    );
                }
                if app.topic.is_none() {
                    bad(
                        at("topic"),
                        "is required with token auth (there is no certificate to read it from)"
                            .into(),
                    );
                }
            }
            if app.certificate.is_none() && !app.token_auth() && !app.uses_builtin_simulator() {
                bad(at("certificate"), "is required (PKCS#12 or PEM)".into());
            }
            for (k, zero) in [
                ("request_timeout", app.request_timeout.is_zero()),
                ("ping_interval", app.ping_interval.is_zero()),
            ] {
                if zero {
                    bad(at(k), "must be more than 0".into());
                }
            }
            if app.max_concurrent_streams == 0 {
                bad(at("max_concurrent_streams"), "must be at least 1".into());
            }
            for (k, v) in [
                ("gateway", &app.gateway),
                ("feedback", &app.feedback),
                ("endpoint", &app.endpoint),
            ] {
                if let Some(addr) = v {
                    let port_ok = addr
                        .rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                    if !port_ok {
                        bad(at(k), format!("{addr:?} is not host:port"));
                    }
                }
            }
            if app.environment == Environment::Simulator
                && app.protocol == Protocol::Binary
                && app.gateway.is_some() != app.feedback.is_some()
            {
                bad(
                    at("feedback"),
                    "the simulator environment needs both `gateway` and `feedback`, or neither"
                        .into(),
                );
            }
            for (k, v) in [
                ("certificate", &app.certificate),
                ("key", &app.key),
                ("ca", &app.ca),
                ("key_file", &app.key_file),
            ] {
                if let Some(p) = v {
                    if !p.is_file() {
                        bad(at(k), format!("{} does not exist", p.display()));
                    }
                }
            }
        }
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.remove(0)),
            _ => Err(ConfigError::Several(problems)),
        }
    }
}

fn key_error(file: &Path, key: String, problem: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        file: file.to_owned(),
        key,
        problem: problem.into(),
    }
}

/// Rewrites config-rs's messages so the key comes first, with its full path:
/// "unknown field `x`, expected ... for key `amqp`" → "unknown key amqp.x (expected ...)".
fn explain(message: &str) -> String {
    let fixed = fix_index_paths(message);
    let Some(rest) = fixed.strip_prefix("unknown field `") else {
        return fixed;
    };
    let Some((field, rest)) = rest.split_once('`') else {
        return fixed;
    };
    let (expected, section) = match rest.rsplit_once(" for key `") {
        Some((exp, sec)) => (exp, Some(sec.trim_end_matches('`'))),
        None => (rest, None),
    };
    let path = match section {
        Some(s) => format!("{s}.{field}"),
        None => field.to_owned(),
    };
    format!("unknown key {path} ({})", expected.trim_start_matches(", "))
}

/// config-rs writes `apps[0]connections`; make it `apps[0].connections`.
fn fix_index_paths(message: &str) -> String {
    let mut out = String::with_capacity(message.len() + 4);
    let mut chars = message.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == ']' && chars.peek().is_some_and(|n| n.is_ascii_alphabetic()) {
            out.push('.');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = "[[apps]]\nname = \"example\"\nenvironment = \"simulator\"\n";

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "apnsd.toml", text);
        Config::load_with_env(&p, Some(HashMap::new()))
    }

    fn message(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "5", "s", "5x", "1.5s", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_contract_example_parses_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "example.p12", "not read by load");
        write(dir.path(), "example.pass", "s3cret\n");
        write(dir.path(), "ca.pem", "not read by load");
        let text = r#"
log_level = "info"
log_format = "text"
[amqp]
uri = "amqp://guest:guest@127.0.0.1:5672/%2f"
queue = "apns.jobs"
prefetch = 20000
results_exchange = "apns.results"
[results]
delivered = false
[metrics]
listen = "127.0.0.1:9464"
[[apps]]
name = "example"
topic = "com.example.app"
environment = "sandbox"
certificate = "example.p12"
password_file = "example.pass"
connections = 2
gateway = "127.0.0.1:22195"
feedback = "127.0.0.1:22196"
ca = "ca.pem"
feedback_interval = "1h"
"#;
        let p = write(dir.path(), "apnsd.toml", text);
        let c = Config::load_with_env(&p, Some(HashMap::new())).unwrap();
        let app = &c.apps[0];
        assert_eq!(app.password.as_deref(), Some("s3cret"));
        assert_eq!(
            app.certificate.as_deref(),
            Some(dir.path().join("example.p12").as_path())
        );
        assert_eq!(app.environment, Environment::Sandbox);
        assert_eq!(app.feedback_interval, Duration::from_secs(3600));
        assert_eq!(
            (app.settle, app.window, app.max_attempts),
            (Duration::from_millis(200), 200_000, 3)
        );
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.amqp.prefetch, 20_000);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.worker_threads, 1);
        assert!(!format!("{app:?}").contains("s3cret"));
        assert_eq!(c.app(None).map(|a| a.name.as_str()), Some("example"));
        assert!(c.app(Some("other")).is_none());
    }

    #[test]
    fn environment_overrides_apply() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "apnsd.toml", APP);
        let env = HashMap::from([
            ("APNSD_AMQP__PREFETCH".to_owned(), "10".to_owned()),
            ("APNSD_LOG_LEVEL".to_owned(), "debug".to_owned()),
            (
                "APNSD_AMQP__URI".to_owned(),
                "amqp://other:5672/%2f".to_owned(),
            ),
        ]);
        let c = Config::load_with_env(&p, Some(env)).unwrap();
        assert_eq!((c.amqp.prefetch, c.log_level.as_str()), (10, "debug"));
        assert_eq!(c.amqp.uri, "amqp://other:5672/%2f");
    }

    #[test]
    fn worker_threads_are_bounded() {
        let m = message(&format!("worker_threads = 0\n{APP}"));
        assert!(m.contains("worker_threads: must be 1 to 256, not 0"), "{m}");
        assert!(message(&format!("worker_threads = 257\n{APP}")).contains("not 257"));
        assert_eq!(
            load(&format!("worker_threads = 4\n{APP}"))
                .unwrap()
                .worker_threads,
            4
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        assert!(message(&format!("bogus = 1\n{APP}")).contains("unknown key bogus"));
        assert!(message(&format!("[amqp]\nprefetchh = 3\n{APP}"))
            .contains("unknown key amqp.prefetchh"));
        let m = message(&format!("{APP}connectionz = 3\n"));
        assert!(m.contains("unknown key apps[0].connectionz"), "{m}");
        assert!(m.contains("apnsd.toml"), "{m}");
    }

    #[test]
    fn http2_apps_with_token_auth() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "AuthKey.p8", "not read by load");
        let app = "[[apps]]\nname = \"a\"\nenvironment = \"production\"\nprotocol = \"http2\"\n";
        let token = "key_file = \"AuthKey.p8\"\nkey_id = \"K\"\nteam_id = \"T\"\n";
        let p = write(
            dir.path(),
            "apnsd.toml",
            &format!("{app}{token}topic = \"com.example\"\nendpoint = \"127.0.0.1:2197\"\n"),
        );
        let c = Config::load_with_env(&p, Some(HashMap::new())).unwrap();
        let a = &c.apps[0];
        assert_eq!(a.protocol, Protocol::Http2);
        assert!(a.token_auth());
        assert_eq!(
            a.key_file.as_deref(),
            Some(dir.path().join("AuthKey.p8").as_path())
        );
        assert_eq!(
            (a.request_timeout, a.ping_interval, a.max_concurrent_streams),
            (Duration::from_secs(10), Duration::from_secs(30), 1000)
        );
        assert_eq!(
            Environment::Production.endpoint(),
            Some("api.push.apple.com:443")
        );

        let m = message(&format!("{app}key_id = \"K\"\n"));
        assert!(m.contains("apps[0].key_file: token auth needs"), "{m}");
        let m = message(&format!(
            "{app}key_file = \"/etc/hostname\"\nkey_id = \"K\"\nteam_id = \"T\"\n"
        ));
        assert!(
            m.contains("apps[0].topic: is required with token auth"),
            "{m}"
        );
        let binary = "[[apps]]\nname = \"a\"\nenvironment = \"sandbox\"\ntopic = \"t\"\n";
        let m = message(&format!(
            "{binary}key_file = \"/etc/hostname\"\nkey_id = \"K\"\nteam_id = \"T\"\n"
        ));
        assert!(m.contains("needs protocol = \"http2\""), "{m}");
        let m = message(&format!(
            "{app}certificate = \"/etc/hostname\"\nendpoint = \"nowhere\"\n"
        ));
        assert!(m.contains("apps[0].endpoint"), "{m}");
        let m = message(&format!("{app}protocol2 = 1\n"));
        assert!(m.contains("unknown key apps[0].protocol2"), "{m}");
        let m = message("[[apps]]\nname = \"a\"\nenvironment = \"sandbox\"\nprotocol = \"spdy\"\n");
        assert!(m.contains("spdy"), "{m}");
        // The built-in simulator needs neither certificate nor key.
        assert!(load(&format!("{APP}protocol = \"http2\"\n")).is_ok());
    }

    #[test]
    fn max_connections_defaults_above_connections_and_is_http2_only() {
        let h2 = format!("{APP}protocol = \"http2\"\n");
        let app = |extra: &str| load(&format!("{h2}{extra}")).unwrap().apps[0].max_connections();
        assert_eq!(app(""), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(app("connections = 20\n"), 20);
        assert_eq!(app("connections = 3\nmax_connections = 3\n"), 3);
        assert_eq!(app("max_connections = 40\n"), 40);
        let m = message(&format!("{h2}connections = 4\nmax_connections = 3\n"));
        assert!(
            m.contains(
                "apps[0].max_connections: must be between `connections` (4) and 1000, not 3"
            ),
            "{m}"
        );
        assert!(message(&format!("{h2}max_connections = 5000\n")).contains("not 5000"));
        let m = message(&format!("{APP}max_connections = 4\n"));
        assert!(
            m.contains("apps[0].max_connections: applies to protocol = \"http2\" only"),
            "{m}"
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        assert!(message(&format!("{APP}settle = \"fast\"\n")).contains("apps[0].settle"));
        assert!(message(&format!("[amqp]\nprefetch = 70000\n{APP}")).contains("amqp.prefetch"));
        assert!(message(&format!("[amqp]\nprefetch = 0\n{APP}")).contains("amqp.prefetch"));
        assert!(message(&format!("{APP}connections = 0\n"))
            .contains("apps[0].connections: must be at least 1"));
        assert!(message(&format!("{APP}environment2 = 1\n")).contains("environment2"));
        assert!(message(&format!("{APP}{APP}")).contains("apps[1].name"));
        assert!(message("log_level = \"info\"\n").contains("at least one [[apps]]"));
        let m = message("[[apps]]\nname = \"a\"\nenvironment = \"sandbox\"\n");
        assert!(m.contains("apps[0].certificate: is required"), "{m}");
        let m = message(
            "[[apps]]\nname = \"a\"\nenvironment = \"sandbox\"\ncertificate = \"/nope/x.p12\"\n",
        );
        assert!(m.contains("/nope/x.p12 does not exist"), "{m}");
        let m = message("[[apps]]\nname = \"a\"\nenvironment = \"sandbox\"\ncertificate = \"/etc/hostname\"\ngateway = \"localhost\"\n");
        assert!(m.contains("apps[0].gateway"), "{m}");
        let m = message(&format!(
            "{APP}password = \"a\"\npassword_file = \"/etc/hostname\"\n"
        ));
        assert!(m.contains("not both"), "{m}");
    }

    #[test]
    fn the_shipped_config_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let c = Config::load_with_env(&p, Some(HashMap::new())).unwrap();
        assert_eq!(c.apps[0].environment, Environment::Simulator);
        assert!(c.apps[0].gateway.is_none());
    }
}
