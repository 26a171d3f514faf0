//! Configuration: a TOML file plus `APNSD_<SECTION>__<KEY>` environment
//! overrides, read strictly and validated up front so that every problem is
//! reported at once, each with the file and the key it concerns, and none
//! quoting a value (a value may be a password).
//!
//! `schema` says what the keys are; `validate` the rules they keep; `views`
//! hands each part of the daemon the settings it runs on.

mod descriptors;
mod schema;
mod validate;
mod views;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use descriptors::ensure_descriptors;
pub use schema::{
    AmqpConfig, AppConfig, Config, Environment, LogFormat, MetricsConfig, Protocol, ResultsConfig,
    DEFAULT_MAX_CONNECTIONS,
};
pub use validate::{check_amqp_uri, MAX_CONNECTIONS_LIMIT, MAX_WORKER_THREADS};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    /// The file is not TOML. Only the position and the parser's message
    /// are kept: its rendering would quote the line, which may hold a secret.
    #[error("{}: line {line}, column {column}: {message}", file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// The environment could not be layered over the file (a variable that
    /// is not Unicode); config-rs's message is not kept, as it quotes values.
    #[error("{}: cannot apply the APNSD_* environment variables over it", file.display())]
    Layer { file: PathBuf },
    #[error("{}: unknown key {key}", file.display())]
    Unknown { file: PathBuf, key: String },
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

/// Keys whose values are never shown, not even in a type error.
const SECRET_KEYS: [&str; 3] = ["password", "uri", "proxy"];

/// Most type errors reported in one pass; each pass drops one bad key.
const MAX_TYPE_ERRORS: usize = 100;

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
        // Parsed first for its syntax errors, which give a position and
        // quote nothing.
        toml::from_str::<toml::Table>(&text).map_err(|e| syntax_error(&file, &text, &e))?;
        let typed = deserialize_all(layer(&file, &text, env)?);
        let mut problems = typed.wrong;
        if let Some(mut cfg) = typed.config {
            let base = path.parent().unwrap_or(Path::new("."));
            problems.extend(cfg.resolve(base));
            problems.extend(validate::validate(&cfg));
            if problems.is_empty() && typed.unknown.is_empty() {
                return Ok(cfg);
            }
        }
        let unknown = typed.unknown.into_iter().map(|key| ConfigError::Unknown {
            file: file.clone(),
            key,
        });
        let wrong = problems.into_iter().map(|(key, problem)| ConfigError::Key {
            file: file.clone(),
            key,
            problem,
        });
        let mut errors: Vec<ConfigError> = unknown.chain(wrong).collect();
        Err(match errors.len() {
            1 => errors.remove(0),
            _ => ConfigError::Several(errors),
        })
    }

    /// The app a job names, or the first app when it names none.
    pub fn app(&self, name: Option<&str>) -> Option<&AppConfig> {
        match name {
            None => self.apps.first(),
            Some(n) => self.apps.iter().find(|a| a.name == n),
        }
    }

    /// Makes file paths relative to the config file's folder and reads password files.
    fn resolve(&mut self, base: &Path) -> Vec<validate::Problem> {
        let mut problems = Vec::new();
        for (i, app) in self.apps.iter_mut().enumerate() {
            if app.proxy.is_none() {
                app.proxy.clone_from(&self.proxy);
            }
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
            let Some(pf) = &app.password_file else {
                continue;
            };
            if app.password.is_some() {
                problems.push((
                    format!("apps[{i}]"),
                    "set `password` or `password_file`, not both".into(),
                ));
                continue;
            }
            match std::fs::read_to_string(pf) {
                Ok(text) => app.password = Some(text.trim_end_matches(['\r', '\n']).to_owned()),
                Err(e) => problems.push((
                    format!("apps[{i}].password_file"),
                    format!("{}: {e}", pf.display()),
                )),
            }
        }
        problems
    }
}

/// A TOML syntax error by position and message alone.
fn syntax_error(file: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map_or(0, |s| s.start).min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |n| n + 1) + 1;
    ConfigError::Syntax {
        file: file.to_owned(),
        line,
        column,
        message: e.message().trim().replace('\n', "; "),
    }
}

/// Layers the `APNSD_<SECTION>__<KEY>` variables of `env` (the process
/// environment when `None`) over the file with config-rs, and hands back the
/// merged tree as TOML so the strict pass reads it as it reads the file. A
/// variable's value that reads as a boolean, integer or float takes that
/// kind; any other is a string. Each value keeps its kind on the way
/// (config-rs's integer stays a TOML integer, its string a string), so the
/// strict types still refuse `2.7` for a count or `"100"` from the file.
///
/// config-rs lowercases the variable's name (`APNSD_AMQP__URI` sets
/// `amqp.uri`) but keeps the file's keys as written; every key apnsd knows is
/// lowercase, so an override always meets the key it names.
fn layer(
    file: &Path,
    text: &str,
    env: Option<HashMap<String, String>>,
) -> Result<toml::Value, ConfigError> {
    let environment = ::config::Environment::with_prefix("APNSD")
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
        .source(env);
    ::config::Config::builder()
        .add_source(::config::File::from_str(text, ::config::FileFormat::Toml))
        .add_source(environment)
        .build()
        .and_then(::config::Config::try_deserialize::<toml::Value>)
        // config-rs's messages may quote a value: only the fact is kept.
        .map_err(|_| ConfigError::Layer {
            file: file.to_owned(),
        })
}

/// Deserialises `value` strictly, reporting every unknown key and every
/// wrongly typed one: each pass that fails on a key drops it (its default
/// stands in) and tries again, so one run names them all. The config comes
/// back when only defaults stood in for bad keys, so its other rules can
/// still be checked in the same run.
fn deserialize_all(mut value: toml::Value) -> Typed {
    let mut problems: Vec<validate::Problem> = Vec::new();
    let mut unknown_keys: Vec<String> = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    for _ in 0..MAX_TYPE_ERRORS {
        let mut unknown = Vec::new();
        let result = serde_path_to_error::deserialize::<_, Config>(
            serde_ignored::Deserializer::new(value.clone(), &mut |path: serde_ignored::Path| {
                unknown.push(key_path(&path))
            }),
        );
        for key in unknown {
            if !unknown_keys.contains(&key) {
                unknown_keys.push(key);
            }
        }
        match result {
            Ok(config) => {
                return Typed {
                    config: Some(config),
                    unknown: unknown_keys,
                    wrong: problems,
                }
            }
            Err(e) => {
                let key = e.path().to_string();
                let secret = SECRET_KEYS.iter().any(|s| key.ends_with(s));
                let problem = if secret {
                    "has the wrong type (the value is not shown: it may be secret)".to_owned()
                } else {
                    e.inner().message().to_owned()
                };
                if remove(&mut value, e.path()) {
                    removed.push(format!("{key}."));
                    problems.push((key, problem));
                    continue;
                }
                // Nothing to drop: something is missing. When it is a key
                // dropped above, its problem is reported already.
                let consequence = removed.iter().any(|r| r.starts_with(&format!("{key}.")));
                if !consequence {
                    problems.push((key, problem));
                }
                break;
            }
        }
    }
    Typed {
        config: None,
        unknown: unknown_keys,
        wrong: problems,
    }
}

/// What strict deserialisation made of the file.
struct Typed {
    /// The configuration, defaults standing in for any wrongly typed key;
    /// none when a required key is missing.
    config: Option<Config>,
    unknown: Vec<String>,
    wrong: Vec<validate::Problem>,
}

/// `apps[0].connections` for serde_ignored's path.
fn key_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", key_path(parent)),
        P::Map { parent, key } => match key_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            key_path(parent)
        }
    }
}

/// Drops the key at `path` from `value`; false when there is none (the
/// error was about something missing, not something present).
fn remove(value: &mut toml::Value, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut at = value;
    for segment in parents {
        let next = match (segment, at) {
            (Segment::Map { key }, toml::Value::Table(t)) => t.get_mut(key),
            (Segment::Seq { index }, toml::Value::Array(a)) => a.get_mut(*index),
            _ => None,
        };
        let Some(next) = next else {
            return false;
        };
        at = next;
    }
    match (last, at) {
        (Segment::Map { key }, toml::Value::Table(t)) => t.remove(key).is_some(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::brokers::BrokerUris;

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
    fn durations_are_read_as_humans_write_them() {
        for (text, expect) in [
            ("500ms", Duration::from_millis(500)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
            ("1m 30s", Duration::from_secs(90)),
            ("2d", Duration::from_secs(172_800)),
        ] {
            let c = load(&format!("shutdown_timeout = \"{text}\"\n{APP}")).unwrap();
            assert_eq!(c.shutdown_timeout, expect, "{text}");
        }
        for bad in ["", "5", "s", "5x", "-1s"] {
            let m = message(&format!("shutdown_timeout = \"{bad}\"\n{APP}"));
            assert!(m.contains("shutdown_timeout: "), "{bad}: {m}");
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
        assert_eq!(c.amqp.uri, BrokerUris::single("amqp://other:5672/%2f"));
    }

    #[test]
    fn an_environment_value_keeps_its_kind() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "apnsd.toml", APP);
        let env = HashMap::from([("APNSD_AMQP__PREFETCH".to_owned(), "2.7".to_owned())]);
        let e = Config::load_with_env(&p, Some(env))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("amqp.prefetch: invalid type: floating point"),
            "{e}"
        );
        let env = HashMap::from([("APNSD_LOG_LEVEL".to_owned(), "10".to_owned())]);
        let e = Config::load_with_env(&p, Some(env))
            .unwrap_err()
            .to_string();
        assert!(e.contains("log_level: invalid type: integer"), "{e}");
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
        let token =
            "key_file = \"AuthKey.p8\"\nkey_id = \"ABC123DEFG\"\nteam_id = \"DEF123GHIJ\"\n";
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
            "{app}topic = \"t\"\nkey_file = \"/etc/hostname\"\nkey_id = \"YOUR_KEY_ID\"\nteam_id = \"YOUR_TEAM_ID\"\n"
        ));
        assert!(
            m.contains("apps[0].key_id: \"YOUR_KEY_ID\" is a placeholder"),
            "{m}"
        );
        assert!(
            m.contains("apps[0].team_id: \"YOUR_TEAM_ID\" is a placeholder"),
            "{m}"
        );
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
    fn amqp_uri_takes_a_list_and_checks_every_entry() {
        let c = load(&format!(
            "[amqp]\nuri = [\"amqp://a:5681/%2f\", \"amqp://b:5682/%2f\"]\n{APP}"
        ))
        .expect("a list of URIs");
        assert_eq!(c.amqp.uri.len(), 2);
        assert_eq!(c.amqp.uri.get(1), "amqp://b:5682/%2f");
        let m = message(&format!(
            "[amqp]\nuri = [\"amqp://a\", \"http://u:s3cret@b\", \"nope:s3cret\"]\n{APP}"
        ));
        assert!(m.contains("amqp.uri[1]: not an AMQP URI"), "{m}");
        assert!(m.contains("amqp.uri[2]: "), "{m}");
        assert!(!m.contains("amqp.uri[0]") && !m.contains("s3cret"), "{m}");
        let m = message(&format!("[amqp]\nuri = \"http://x\"\n{APP}"));
        assert!(m.contains("amqp.uri: not an AMQP URI"), "{m}");
        // An empty list is refused as a value of the wrong shape, unquoted.
        let m = message(&format!("[amqp]\nuri = []\n{APP}"));
        assert!(m.contains("amqp.uri: "), "{m}");
    }

    #[test]
    fn apps_inherit_the_top_level_proxy_unless_they_set_their_own() {
        let cfg = load(
            r#"
            proxy = "http://user:s3cret@proxy.example:3128"
            [[apps]]
            name = "inherits"
            environment = "simulator"
            [[apps]]
            name = "own"
            environment = "simulator"
            proxy = "http://other:8080"
            [[apps]]
            name = "off"
            environment = "simulator"
            proxy = ""
            "#,
        )
        .expect("valid");
        let via: Vec<_> = cfg
            .apps
            .iter()
            .map(|a| a.via_proxy().map(|p| p.addr()))
            .collect();
        assert_eq!(
            via,
            [
                Some("proxy.example:3128".to_owned()),
                Some("other:8080".to_owned()),
                None
            ]
        );
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn a_bad_proxy_is_named_without_its_password() {
        for text in [
            format!("{APP}proxy = \"socks5://user:s3cret@proxy:1080\"\n"),
            format!("proxy = \"http://user:s3cret@proxy:1080/path\"\n{APP}"),
        ] {
            let m = message(&text);
            assert!(m.contains("proxy: "), "{m}");
            assert!(!m.contains("s3cret"), "{m}");
        }
        let m = message(&format!("{APP}channel_endpoint = \"nowhere\"\n"));
        assert!(m.contains("apps[0].channel_endpoint"), "{m}");
    }

    #[test]
    fn max_connections_defaults_above_connections_and_is_http2_only() {
        let h2 = format!("{APP}protocol = \"http2\"\n");
        let app = |extra: &str| load(&format!("{h2}{extra}")).unwrap().apps[0].max_connections();
        assert_eq!(app(""), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(app("connections = 80\n"), 80);
        assert_eq!(app("connections = 3\nmax_connections = 3\n"), 3);
        assert_eq!(app("max_connections = 50\n"), 50);
        let m = message(&format!("{h2}connections = 4\nmax_connections = 3\n"));
        assert!(
            m.contains("apps[0].max_connections: must be 4 to 1000, not 3"),
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
            .contains("apps[0].connections: must be 1 to 100, not 0"));
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
    fn types_are_strict_and_every_problem_is_reported_at_once() {
        let m = message(&format!(
            "[amqp]\nprefetch = \"100\"\n[results]\ndelivered = \"yes\"\n{APP}connections = 2.7\nwindow = 0\nbogus = 1\n"
        ));
        for key in [
            "amqp.prefetch: ",
            "results.delivered: ",
            "apps[0].connections: ",
            "apps[0].window: must be",
            "unknown key apps[0].bogus",
        ] {
            assert!(m.contains(key), "{key} in {m}");
        }
        assert_eq!(m.lines().count(), 5, "{m}");
        let m = message("[[apps]]\nname = \"a\"\nenvironment = \"staging\"\n");
        assert!(m.contains("apps[0].environment: "), "{m}");
        for valid in ["sandbox", "production", "simulator"] {
            assert!(m.contains(valid), "{m}");
        }
        assert_eq!(
            m.lines().count(),
            1,
            "a dropped required key is not reported twice: {m}"
        );
    }

    #[test]
    fn no_error_quotes_a_secret() {
        let secret = "Zq9-SECRET-pw";
        for text in [
            format!("{APP}password = \"Zq9\\q-SECRET-pw\"\n"),
            format!("{APP}password = \"{secret}\n"),
            format!("{APP}password = \"{secret}\"\npassword = \"{secret}\"\n"),
            format!("{APP}password = [\"{secret}\"]\n"),
            format!("[amqp]\nuri = \"http://u:{secret}@what\"\n{APP}"),
            format!("[amqp]\nuri = \"amqp://u:{secret}@host:port/\"\n{APP}"),
            format!("[amqp]\nuri = [\"amqp://a\", \"amqp://u:{secret}@host:port/\"]\n{APP}"),
            format!("[amqp]\nuri = [1, \"amqp://u:{secret}@host/\"]\n{APP}"),
        ] {
            let m = message(&text);
            assert!(!m.contains("SECRET"), "{text} gave {m}");
            assert!(m.contains("apnsd.toml"), "{m}");
        }
        let m = message(&format!("{APP}password = \"{secret}\n"));
        assert!(
            m.contains("line 4"),
            "the position stands in for the line: {m}"
        );
        let m = message(&format!("[amqp]\nuri = \"http://u:{secret}@what\"\n{APP}"));
        assert!(m.contains("amqp.uri: "), "{m}");
    }

    #[test]
    fn the_shipped_config_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let c = Config::load_with_env(&p, Some(HashMap::new())).unwrap();
        assert_eq!(c.apps[0].environment, Environment::Simulator);
        assert!(c.apps[0].gateway.is_none());
    }
}
