//! The rules a well-typed configuration must still keep: ranges that protect
//! the process, keys that only make sense together, files that must exist.
//! Every broken rule is reported, so an operator fixes a file in one pass.

use std::ops::RangeInclusive;
use std::time::Duration;

use lapin::uri::AMQPUri;

use super::schema::{AppConfig, Config, Environment, Protocol};

/// More threads than this only add contention: the work is I/O.
pub const MAX_WORKER_THREADS: usize = 256;

/// Beyond this `max_connections` is surely a typo: each connection costs a
/// TLS handshake and a task, and APNs limits a provider's connections too.
pub const MAX_CONNECTIONS_LIMIT: usize = 1000;

/// One broken rule: the key's full path and what is wrong with it.
pub(super) type Problem = (String, String);

/// Collects problems for one configuration.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn bad(&mut self, key: impl Into<String>, problem: impl Into<String>) {
        self.0.push((key.into(), problem.into()));
    }

    /// `value` must lie in `range`; `why` says what the bound protects.
    fn within<T>(&mut self, key: impl Into<String>, value: T, range: RangeInclusive<T>, why: &str)
    where
        T: PartialOrd + std::fmt::Display,
    {
        if !range.contains(&value) {
            self.bad(
                key,
                format!(
                    "must be {} to {}, not {value} ({why})",
                    range.start(),
                    range.end()
                ),
            );
        }
    }

    /// `value` must be at least `min`: shorter makes a loop spin or a
    /// timeout fire before any network could answer.
    fn at_least(&mut self, key: impl Into<String>, value: Duration, min: Duration, why: &str) {
        if value < min {
            self.bad(
                key,
                format!(
                    "must be at least {} ({why})",
                    humantime::format_duration(min)
                ),
            );
        }
    }
}

/// Longest delay a broker's `x-message-ttl` (milliseconds in a u32) can hold.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(u32::MAX as u64 / 1000);

/// Checks every rule of `config`; an empty list means it is usable.
pub(super) fn validate(config: &Config) -> Vec<Problem> {
    let mut p = Problems::default();
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log_level) {
        p.bad("log_level", format!("{:?}: {e}", config.log_level));
    }
    p.within(
        "worker_threads",
        config.worker_threads,
        1..=MAX_WORKER_THREADS,
        "more threads only add contention: the work is I/O",
    );
    if config.apps.is_empty() {
        p.bad("apps", "at least one [[apps]] entry is needed");
    }
    amqp(config, &mut p);
    let mut names = std::collections::HashSet::new();
    for (i, app) in config.apps.iter().enumerate() {
        if !names.insert(app.name.as_str()) {
            p.bad(
                format!("apps[{i}].name"),
                format!("{:?} is used by an earlier app", app.name),
            );
        }
        self::app(app, &format!("apps[{i}]"), &mut p);
    }
    p.0
}

fn amqp(config: &Config, p: &mut Problems) {
    let amqp = &config.amqp;
    for (i, uri) in amqp.uri.iter().enumerate() {
        if let Err(problem) = check_amqp_uri(uri) {
            match amqp.uri.len() {
                1 => p.bad("amqp.uri", problem),
                _ => p.bad(format!("amqp.uri[{i}]"), problem),
            }
        }
    }
    p.within(
        "amqp.prefetch",
        amqp.prefetch,
        1..=u16::MAX,
        "AMQP's basic.qos counts in 16 bits and 0 would mean unlimited",
    );
    p.within(
        "amqp.prefetch_bytes",
        amqp.prefetch_bytes,
        0..=1 << 30,
        "job bodies held unacknowledged stay in memory; 0 turns the byte bound off",
    );
    if let Some(kind) = &amqp.queue_type {
        if kind != "classic" && kind != "quorum" {
            p.bad("amqp.queue_type", "must be \"classic\" or \"quorum\"");
        }
    }
    p.within(
        "amqp.max_job_attempts",
        amqp.max_job_attempts,
        1..=1000,
        "a job retried more often only circles through the retry queue",
    );
    p.at_least(
        "amqp.retry_delay",
        amqp.retry_delay,
        Duration::from_millis(100),
        "a shorter delay makes a job whose app is down circle the broker",
    );
    if amqp.retry_delay > MAX_RETRY_DELAY {
        p.bad("amqp.retry_delay", "must be under 49 days");
    }
    p.at_least(
        "amqp.confirm_timeout",
        amqp.confirm_timeout,
        Duration::from_secs(1),
        "a busy broker needs time to confirm",
    );
    if amqp.queue.is_empty() {
        p.bad("amqp.queue", "must not be empty");
    }
}

/// Checks one broker URI the way the AMQP client will read it, so a URI
/// that could never connect is refused at start instead of retried forever.
/// The problem never quotes the URI: its userinfo holds a password.
pub fn check_amqp_uri(uri: &str) -> Result<(), String> {
    match uri.parse::<AMQPUri>() {
        Ok(_) => Ok(()),
        // The parser's own words, unless they quote the URI back.
        Err(e) if !e.contains(uri) && !uri.is_empty() => Err(format!("not an AMQP URI: {e}")),
        Err(_) => Err("not an AMQP URI (amqp://user:password@host:port/vhost)".into()),
    }
}

fn app(app: &AppConfig, at: &str, p: &mut Problems) {
    let key = |k: &str| format!("{at}.{k}");
    if app.name.trim().is_empty() {
        p.bad(key("name"), "must not be empty");
    }
    p.within(
        key("connections"),
        app.connections,
        1..=100,
        "each is a TLS connection and a file descriptor; Apple throttles providers that open many",
    );
    if let Some(max) = app.max_connections {
        if app.protocol != Protocol::Http2 {
            p.bad(
                key("max_connections"),
                "applies to protocol = \"http2\" only",
            );
        } else {
            p.within(
                key("max_connections"),
                max,
                app.connections..=MAX_CONNECTIONS_LIMIT,
                "the app starts with `connections`; each more is a TLS connection and a file descriptor",
            );
        }
    }
    p.within(
        key("window"),
        app.window,
        1..=1_000_000,
        "each unsettled notification is held in memory until it settles",
    );
    p.within(
        key("max_attempts"),
        app.max_attempts,
        1..=100,
        "each try is another send of the same notification",
    );
    p.within(
        key("max_concurrent_streams"),
        app.max_concurrent_streams,
        1..=10_000,
        "each open stream holds a request in memory; Apple allows about 1000",
    );
    let ms = Duration::from_millis;
    for (k, value, min, why) in [
        (
            "settle",
            app.settle,
            ms(1),
            "0 would accept a notification before Apple could refuse it",
        ),
        (
            "feedback_interval",
            app.feedback_interval,
            ms(1000),
            "each poll is a TLS connection to Apple",
        ),
        (
            "connect_timeout",
            app.connect_timeout,
            ms(100),
            "no handshake completes sooner",
        ),
        (
            "write_timeout",
            app.write_timeout,
            ms(100),
            "no network drains a write sooner",
        ),
        (
            "reconnect_min",
            app.reconnect_min,
            ms(10),
            "shorter reconnects in a tight loop",
        ),
        (
            "reconnect_max",
            app.reconnect_max,
            ms(100),
            "shorter reconnects in a tight loop",
        ),
        (
            "unusable_after",
            app.unusable_after,
            ms(100),
            "shorter sends jobs to the retry queue on a blip",
        ),
        (
            "request_timeout",
            app.request_timeout,
            ms(100),
            "no answer comes back sooner",
        ),
        (
            "shrink_after",
            app.shrink_after,
            ms(100),
            "a shorter lull closes connections the next burst needs again",
        ),
        (
            "ping_interval",
            app.ping_interval,
            ms(1000),
            "more often is load, not liveness",
        ),
    ] {
        p.at_least(key(k), value, min, why);
    }
    if app.reconnect_min > app.reconnect_max {
        p.bad(key("reconnect_min"), "must not exceed reconnect_max");
    }
    let token_keys = [&app.key_id, &app.team_id].map(Option::is_some);
    if !matches!(
        (app.key_file.is_some(), token_keys),
        (false, [false, false]) | (true, [true, true])
    ) {
        p.bad(
            key("key_file"),
            "token auth needs `key_file`, `key_id` and `team_id` together",
        );
    }
    if app.token_auth() {
        if app.protocol != Protocol::Http2 {
            p.bad(key("key_file"), "token auth needs protocol = \"http2\"");
        }
        if app.certificate.is_some() {
            p.bad(key("key_file"), "use `certificate` or `key_file`, not both");
        }
        for (k, id) in [("key_id", &app.key_id), ("team_id", &app.team_id)] {
            if let Some(id) = id.as_deref().filter(|id| !is_apple_id(id)) {
                p.bad(
                    key(k),
                    format!("{id:?} is a placeholder, not Apple's (10 capital letters and digits, from Apple's developer site)"),
                );
            }
        }
        if app.topic.is_none() {
            p.bad(
                key("topic"),
                "is required with token auth (there is no certificate to read it from)",
            );
        }
    }
    if app.certificate.is_none() && !app.token_auth() && !app.uses_builtin_simulator() {
        p.bad(key("certificate"), "is required (PKCS#12 or PEM)");
    }
    for (k, v) in [
        ("gateway", &app.gateway),
        ("feedback", &app.feedback),
        ("endpoint", &app.endpoint),
        ("channel_endpoint", &app.channel_endpoint),
    ] {
        if let Some(addr) = v {
            let port_ok = addr
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !port_ok {
                p.bad(key(k), format!("{addr:?} is not host:port"));
            }
        }
    }
    if app.environment == Environment::Simulator
        && app.protocol == Protocol::Binary
        && app.gateway.is_some() != app.feedback.is_some()
    {
        p.bad(
            key("feedback"),
            "the simulator environment needs both `gateway` and `feedback`, or neither",
        );
    }
    for (k, v) in [
        ("certificate", &app.certificate),
        ("key", &app.key),
        ("ca", &app.ca),
        ("key_file", &app.key_file),
    ] {
        if let Some(path) = v {
            if !path.is_file() {
                p.bad(key(k), format!("{} does not exist", path.display()));
            }
        }
    }
}

/// Apple's key ids and team ids are ten capital letters and digits: anything
/// else is the shipped example's placeholder (or a typo), which APNs would
/// answer with `InvalidProviderToken` on every request.
fn is_apple_id(id: &str) -> bool {
    id.len() == 10
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqp_uris_are_parsed_without_quoting_them() {
        assert!(check_amqp_uri("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
        assert!(check_amqp_uri("amqps://broker.example/vhost").is_ok());
        for bad in [
            "http://what",
            "amqp://u:hunter2@host:port/%2f",
            "hunter2",
            "",
            "amqp://u:hunter2@host:99999/",
        ] {
            let e = check_amqp_uri(bad).unwrap_err();
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
