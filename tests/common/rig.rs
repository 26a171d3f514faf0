//! An in-process daemon against a simulator and this test's slice of the
//! broker, built in one place for every protocol: [`Rig::builder`] takes the
//! protocol, the simulator's faults and the app's keys, and writes the
//! configuration. The library's daemon API is used here and nowhere else in
//! the rig tests, so a change to it lands in one place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use apnsd::config::Config;
use apnsd::daemon::{Daemon, Reloaded};
use apnsd::metrics::{Stats, StatsSnapshot};
use apnsd::simulator::{write_identity, SimCerts, Simulator, SimulatorOptions};
// The library's names the scenarios use (each file some of them).
#[allow(unused_imports)]
pub use apnsd::{
    apns::http2::ApnsReason,
    job::DeviceToken,
    simulator::{AnswerRule, ClientSpec, Faults, RefuseRule},
};
use tokio_util::sync::CancellationToken;

use super::{amqp_uri, job, wait_until, Broker, WAIT};

/// Which APNs interface an app speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// The binary interface (gateway and feedback service).
    Binary,
    /// The HTTP/2 provider API.
    Http2,
}

/// How an HTTP/2 app proves who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// The identity `<client>.p12` next to the configuration.
    Certificate,
    /// The simulator's provider-token key.
    Token,
}

impl Auth {
    /// The app's identity lines: the identity `client` (a `.p12` stem) or
    /// the provider-token key, in the folder `certs` (a path prefix).
    pub fn toml(self, certs: &str, client: &str) -> String {
        match self {
            Auth::Certificate => {
                format!("certificate = \"{certs}{client}.p12\"\npassword = \"simulator\"\n")
            }
            Auth::Token => format!(
                "key_file = \"{certs}token-key.p8\"\nkey_id = \"SIMKEY0001\"\n\
                 team_id = \"SIMTEAM001\"\ntopic = \"com.example.app\"\n"
            ),
        }
    }
}

/// Where a simulator's services listen, and where its certificates are
/// relative to the configuration file.
#[derive(Clone, Debug)]
pub struct Services {
    /// Prefix of the certificate paths (`""`: beside the configuration).
    pub certs: String,
    pub gateway: String,
    pub feedback: String,
    pub http2: String,
}

impl Services {
    /// An in-process simulator whose certificates lie beside the configuration.
    pub fn of(sim: &Simulator) -> Services {
        Services {
            certs: String::new(),
            gateway: sim.gateway_addr().to_string(),
            feedback: sim.feedback_addr().to_string(),
            http2: sim.http2_addr().to_string(),
        }
    }

    /// The same certificates, every service at `addr` (a closed port, a relay).
    pub fn all_at(&self, addr: &str) -> Services {
        Services {
            certs: self.certs.clone(),
            gateway: addr.to_owned(),
            feedback: addr.to_owned(),
            http2: addr.to_owned(),
        }
    }
}

/// One `[[apps]]` entry with the tests' defaults (two connections, fast
/// reconnects, a short settle, no periodic feedback poll).
#[derive(Clone, Debug)]
pub struct App {
    pub name: String,
    pub protocol: Protocol,
    pub auth: Auth,
    /// The identity's file stem for [`Auth::Certificate`].
    pub client: String,
    /// Services other than the simulator's (a closed port, a relay).
    pub at: Option<String>,
    /// `key = value` lines that add to or override the defaults.
    pub keys: String,
}

impl App {
    pub fn new(name: &str, protocol: Protocol) -> App {
        App {
            name: name.to_owned(),
            protocol,
            auth: Auth::Certificate,
            client: "client".to_owned(),
            at: None,
            keys: String::new(),
        }
    }

    /// Presents the identity `<client>.p12`.
    pub fn client(mut self, client: &str) -> App {
        self.client = client.to_owned();
        self
    }

    pub fn auth(mut self, auth: Auth) -> App {
        self.auth = auth;
        self
    }

    /// Connects to `addr` for every service instead of the simulator.
    pub fn at(mut self, addr: &str) -> App {
        self.at = Some(addr.to_owned());
        self
    }

    /// Adds `key = value` lines (one a line), replacing defaults of the same key.
    pub fn keys(mut self, lines: &str) -> App {
        self.keys.push_str(lines);
        self.keys.push('\n');
        self
    }

    /// The entry, for the simulator at `sim` (or [`App::at`]).
    pub fn toml(&self, sim: &Services) -> String {
        let sim = match &self.at {
            Some(addr) => sim.all_at(addr),
            None => sim.clone(),
        };
        let mut keys: Vec<(String, String)> = match self.protocol {
            Protocol::Binary => vec![
                ("gateway", format!("\"{}\"", sim.gateway)),
                ("feedback", format!("\"{}\"", sim.feedback)),
                ("connections", "2".into()),
                ("settle", "\"150ms\"".into()),
                ("feedback_interval", "\"1h\"".into()),
            ],
            Protocol::Http2 => vec![
                ("protocol", "\"http2\"".into()),
                ("endpoint", format!("\"{}\"", sim.http2)),
                ("connections", "2".into()),
                ("request_timeout", "\"5s\"".into()),
                ("ping_interval", "\"1s\"".into()),
            ],
        }
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        keys.push(("reconnect_min".into(), "\"10ms\"".into()));
        keys.push(("reconnect_max".into(), "\"200ms\"".into()));
        for (key, value) in self.keys.lines().filter_map(|l| l.split_once('=')) {
            let (key, value) = (key.trim().to_owned(), value.trim().to_owned());
            match keys.iter_mut().find(|(k, _)| *k == key) {
                Some(entry) => entry.1 = value,
                None => keys.push((key, value)),
            }
        }
        let keys: String = keys.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        let auth = self.auth.toml(&sim.certs, &self.client);
        format!(
            "\n[[apps]]\nname = \"{name}\"\nenvironment = \"simulator\"\n{auth}ca = \"{certs}ca.pem\"\n{keys}",
            name = self.name,
            certs = sim.certs,
        )
    }
}

/// An in-process simulator whose certificates are written to a temp folder,
/// where the configuration goes too.
pub struct SimDir {
    pub sim: Simulator,
    pub dir: tempfile::TempDir,
}

impl SimDir {
    pub async fn start(faults: Faults) -> SimDir {
        apnsd::apns::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let certs = SimCerts::generate("com.example.app").unwrap();
        certs.write_to(dir.path()).unwrap();
        let mut options = SimulatorOptions::new(certs);
        options.faults = faults;
        let sim = Simulator::start(options).await.unwrap();
        SimDir { sim, dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn services(&self) -> Services {
        Services::of(&self.sim)
    }

    /// Mints a client identity of the simulator's CA and writes it as `<name>.p12`.
    pub fn mint(&self, name: &str, spec: ClientSpec) {
        let identity = self.sim.certs().mint_client(&spec).unwrap();
        write_identity(&identity, self.dir.path(), name).unwrap();
    }

    /// Writes a client identity of another CA as `<name>.p12`.
    pub fn mint_stranger(&self, name: &str) {
        let stranger = SimCerts::generate("com.example.app").unwrap();
        write_identity(stranger.client(), self.dir.path(), name).unwrap();
    }
}

/// What a rig is made of; [`RigBuilder::start`] starts it.
pub struct RigBuilder {
    test: String,
    app: App,
    faults: Faults,
    delay: std::time::Duration,
    delivered: bool,
    prefetch: u32,
    uri: Option<String>,
    results_exchange: Option<String>,
    amqp: String,
    apps: Vec<App>,
    sections: String,
    identities: Vec<(String, ClientSpec)>,
    feedback: Vec<(DeviceToken, u32)>,
}

impl RigBuilder {
    /// The simulator's faults from the start.
    pub fn faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// The simulator answers each HTTP/2 stream this late.
    pub fn delay(mut self, delay: std::time::Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Names the `example` app `name` instead (to tell its log lines apart).
    pub fn name(mut self, name: &str) -> Self {
        self.app.name = name.to_owned();
        self
    }

    /// Publishes a `delivered` result for every accepted notification.
    pub fn delivered(mut self) -> Self {
        self.delivered = true;
        self
    }

    pub fn prefetch(mut self, prefetch: u32) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// The daemon reaches the broker at `uri` (a relay) rather than directly.
    pub fn broker_uri(mut self, uri: &str) -> Self {
        self.uri = Some(uri.to_owned());
        self
    }

    /// Results go to `exchange` (which the test removes) instead of the
    /// broker slice's own, bound to its results queue.
    pub fn results_exchange(mut self, exchange: &str) -> Self {
        self.results_exchange = Some(exchange.to_owned());
        self
    }

    /// More `[amqp]` lines.
    pub fn amqp(mut self, lines: &str) -> Self {
        self.amqp.push_str(lines);
        self
    }

    /// More keys for the `example` app (see [`App::keys`]).
    pub fn keys(mut self, lines: &str) -> Self {
        self.app = self.app.keys(lines);
        self
    }

    /// How the `example` app proves who it is.
    pub fn auth(mut self, auth: Auth) -> Self {
        self.app = self.app.auth(auth);
        self
    }

    /// Another app beside `example`.
    pub fn app(mut self, app: App) -> Self {
        self.apps.push(app);
        self
    }

    /// A section after the apps (`[metrics]`, ...).
    pub fn section(mut self, text: &str) -> Self {
        self.sections.push_str(text);
        self
    }

    /// Mints a client identity of the simulator's CA and writes it as `<name>.p12`.
    pub fn identity(mut self, name: &str, spec: ClientSpec) -> Self {
        self.identities.push((name.to_owned(), spec));
        self
    }

    /// A tuple the feedback service holds before the daemon starts.
    pub fn feedback(mut self, token: DeviceToken, timestamp: u32) -> Self {
        self.feedback.push((token, timestamp));
        self
    }

    /// Starts the simulator and a daemon configured for it and this test's broker slice.
    pub async fn start(self) -> Rig {
        let broker = Broker::new(&self.test).await;
        let simulator = SimDir::start(self.faults).await;
        for (name, spec) in self.identities {
            simulator.mint(&name, spec);
        }
        let SimDir { sim, dir } = simulator;
        sim.set_delay(self.delay);
        for (token, timestamp) in self.feedback {
            sim.add_feedback(token, timestamp);
        }
        let services = Services::of(&sim);
        let mut amqp = broker.amqp_toml(self.prefetch);
        if let Some(uri) = &self.uri {
            amqp = amqp.replace(&amqp_uri(), uri);
        }
        if let Some(exchange) = &self.results_exchange {
            amqp = amqp.replace(&broker.exchange, exchange);
        }
        let apps: String = std::iter::once(&self.app)
            .chain(&self.apps)
            .map(|app| app.toml(&services))
            .collect();
        let toml = format!(
            "shutdown_timeout = \"10s\"\n{amqp}{}\n[results]\ndelivered = {}\n{apps}\n{}",
            self.amqp, self.delivered, self.sections,
        );
        Rig::with_config(broker, sim, dir, &toml).await
    }
}

/// Starts a daemon on the configuration at `path`; cancel the token to drain it.
pub async fn start_daemon(path: &Path) -> (Daemon, CancellationToken) {
    apnsd::apns::tls::install_crypto_provider();
    let config = Config::load(path).unwrap();
    let shutdown = CancellationToken::new();
    let daemon = Daemon::start(config, shutdown.clone()).await.unwrap();
    (daemon, shutdown)
}

/// Starts the daemon as `apnsd run` does, with the built-in simulator when an
/// app names the `simulator` environment.
pub async fn start_with_builtin(path: &Path) -> (apnsd::startup::Started, CancellationToken) {
    apnsd::apns::tls::install_crypto_provider();
    let config = Config::load(path).unwrap();
    let shutdown = CancellationToken::new();
    let started = apnsd::startup::start(config, shutdown.clone())
        .await
        .unwrap();
    (started, shutdown)
}

pub struct Rig {
    pub broker: Broker,
    pub sim: Simulator,
    pub daemon: Daemon,
    pub shutdown: CancellationToken,
    /// Certificates and the configuration file; removed with the rig.
    pub dir: tempfile::TempDir,
}

impl Rig {
    /// A rig for `test` whose `example` app speaks `protocol`.
    pub fn builder(test: &str, protocol: Protocol) -> RigBuilder {
        RigBuilder {
            test: test.to_owned(),
            app: App::new("example", protocol),
            faults: Faults::default(),
            delay: std::time::Duration::ZERO,
            delivered: false,
            prefetch: 5000,
            uri: None,
            results_exchange: None,
            amqp: String::new(),
            apps: Vec::new(),
            sections: String::new(),
            identities: Vec::new(),
            feedback: Vec::new(),
        }
    }

    /// A daemon on a configuration the test wrote itself (`toml`, saved as
    /// `apnsd.toml` in `dir`), for a test that must start something between
    /// the simulator and the daemon (a proxy in front of it).
    pub async fn with_config(
        broker: Broker,
        sim: Simulator,
        dir: tempfile::TempDir,
        toml: &str,
    ) -> Rig {
        let path = dir.path().join("apnsd.toml");
        std::fs::write(&path, toml).unwrap();
        let (daemon, shutdown) = start_daemon(&path).await;
        Rig {
            broker,
            sim,
            daemon,
            shutdown,
            dir,
        }
    }

    /// The daemon's counters, live.
    pub fn stats(&self) -> std::sync::Arc<Stats> {
        self.daemon.stats.clone()
    }

    /// A counter summed over its labels (apps, lanes), from the Prometheus text.
    pub fn total(&self, name: &str) -> u64 {
        let text = self.daemon.stats.render();
        let samples = text.lines().filter(|l| l.starts_with(name));
        samples
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum()
    }

    /// The configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("apnsd.toml")
    }

    /// Reloads the configuration file, as SIGHUP does.
    pub async fn reload(&self) -> Reloaded {
        let config = Config::load(&self.config_path()).unwrap();
        self.daemon.reload(config).await.unwrap()
    }

    /// Stops the daemon (drain), checks nothing was left in the jobs or the
    /// retry queue, cleans up.
    pub async fn finish(self) -> StatsSnapshot {
        assert_eq!(self.broker.retry_depth().await, 0, "jobs left to retry");
        self.shutdown.cancel();
        let stats = self.daemon.stats.clone();
        tokio::time::timeout(WAIT, self.daemon.wait())
            .await
            .expect("daemon drains");
        assert_eq!(
            self.broker.queue_depth().await,
            0,
            "jobs left in the queue (unacked ones return there)"
        );
        self.sim.shutdown().await;
        self.broker.cleanup().await;
        stats.snapshot()
    }

    /// How often the simulator accepted each token.
    pub fn accepted_counts(&self) -> HashMap<DeviceToken, usize> {
        let mut counts = HashMap::new();
        for a in self.sim.accepted() {
            *counts.entry(a.token).or_insert(0) += 1;
        }
        counts
    }

    /// How often the simulator refused `token` (either protocol).
    pub fn refusals(&self, token: &str) -> usize {
        let t = tok(token);
        let binary = self.sim.refused().iter().filter(|r| r.0 == t).count();
        let http2 = self.sim.http2_refused().iter().filter(|r| r.0 == t).count();
        binary + http2
    }

    /// Every token of `tokens` was accepted exactly once.
    pub fn assert_once(&self, tokens: &[String]) {
        let counts = self.accepted_counts();
        for t in tokens {
            assert_eq!(counts.get(&tok(t)), Some(&1), "token {t}");
        }
    }

    /// Publishes `n` one-token jobs (`j0`, `j1`, ...) for `tokens(i)`; returns the tokens.
    pub async fn burst(&self, n: u32, tokens: impl Fn(u32) -> String) -> Vec<String> {
        let tokens: Vec<String> = (0..n).map(tokens).collect();
        self.publish(&tokens).await;
        tokens
    }

    /// Publishes one-token jobs (`j0`, `j1`, ...) for `tokens`.
    pub async fn publish(&self, tokens: &[String]) {
        self.publish_tokens("j", tokens).await;
    }

    /// Publishes a one-token job for each of `tokens`, with ids `<prefix><i>`.
    pub async fn publish_tokens(&self, prefix: &str, tokens: &[String]) {
        let jobs = tokens.iter().enumerate();
        self.broker
            .publish_all(jobs.map(|(i, t)| job(&format!("{prefix}{i}"), t)))
            .await;
    }

    /// Waits until the daemon acked `jobs` jobs.
    pub async fn wait_acked(&self, jobs: u64) {
        let stats = self.stats();
        let acked = wait_until(WAIT, || stats.jobs_acked.get() >= jobs).await;
        assert!(
            acked,
            "not every job was acked: {:?}, simulator accepted {} over {} connections",
            stats.snapshot(),
            self.sim.accepted_count(),
            self.sim.connections()
        );
    }

    /// Waits until every token was accepted at least once; returns the duplicates.
    pub async fn all_accepted(&self, tokens: &[String]) -> usize {
        let wanted: Vec<DeviceToken> = tokens.iter().map(|t| tok(t)).collect();
        let mut counts = HashMap::new();
        let done = wait_until(WAIT, || {
            counts = self.accepted_counts();
            wanted.iter().all(|t| counts.contains_key(t))
        })
        .await;
        assert!(
            done,
            "{} of {} tokens accepted: {:?}",
            wanted.iter().filter(|t| counts.contains_key(t)).count(),
            wanted.len(),
            self.daemon.stats.snapshot()
        );
        wanted.iter().map(|t| counts[t] - 1).sum()
    }
}

/// A token as the simulator records it.
pub fn tok(hex: &str) -> DeviceToken {
    DeviceToken::parse(hex).unwrap()
}
