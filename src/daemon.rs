//! Wiring: configuration → identities → lanes and pollers per app → broker
//! sessions (reopened with backoff when the broker goes away) → drain on
//! shutdown. Reloads rebuild only the apps that changed. Also tells systemd
//! how it is going.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::amqp::Topology;
use crate::apns::http2::{self, jwt::Signer};
use crate::apns::lane::{Outcomes, Settings, Target};
use crate::apns::pool::Pool;
use crate::apns::tls::{self, Identity};
use crate::apns::Protocol;
use crate::backoff::Backoff;
use crate::config::{AppConfig, Config, ConfigError};
use crate::feedback::Poller;
use crate::logging::Logging;
use crate::metrics::Stats;
use crate::pipeline::{
    Inputs, LiveSettings, Pipeline, Reconfigure, ResultRequest, Route, SessionConfig, SessionEnd,
};
use crate::shutdown::Request;
use crate::simulator::{SimCerts, Simulator, SimulatorOptions};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("app {app:?}: {source}")]
    Identity {
        app: String,
        #[source]
        source: tls::TlsError,
    },
    #[error("app {app:?}: {what}")]
    App { app: String, what: String },
    #[error("app {app:?}: {source}")]
    TokenKey {
        app: String,
        #[source]
        source: http2::jwt::JwtError,
    },
    #[error("built-in simulator: {0}")]
    Simulator(String),
    #[error("metrics.listen: cannot listen on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the daemon has stopped")]
    Stopped,
    #[error("app {app:?}: cannot connect to the gateway {addr}: {source}")]
    Connect {
        app: String,
        addr: String,
        source: std::io::Error,
    },
}

/// A running daemon: its counters, the task to await for its end, and what
/// a reload needs to start or retire apps.
pub struct Daemon {
    pub stats: Arc<Stats>,
    wiring: Arc<Mutex<Wiring>>,
    control: mpsc::Sender<Reconfigure>,
    task: JoinHandle<()>,
}

/// What is running now, kept so a reload can tell what changed.
struct Wiring {
    config: Config,
    apps: HashMap<String, RunningApp>,
    simulator: Option<Simulator>,
    metrics: Option<MetricsServer>,
    outcomes: Outcomes,
    requests: mpsc::Sender<ResultRequest>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
}

/// The `/metrics` server in force; it stops when dropped, so a reload that
/// moves `metrics.listen` stops it by putting the new one in its place.
struct MetricsServer {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl MetricsServer {
    fn serve(
        addr: SocketAddr,
        listener: tokio::net::TcpListener,
        stats: Arc<Stats>,
        shutdown: &CancellationToken,
    ) -> MetricsServer {
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
        let stop = shutdown.child_token();
        tokio::spawn(crate::metrics::serve(listener, stats, stop.clone()));
        MetricsServer { addr, stop }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.cancel();
        tracing::info!(addr = %self.addr, "metrics server stopped");
    }
}

/// What a reload does to the metrics server.
enum MetricsChange {
    Keep,
    Move(SocketAddr, tokio::net::TcpListener),
    Stop,
}

struct RunningApp {
    config: AppConfig,
    /// The identity files' contents when loaded: a certificate replaced in
    /// place is a change even though the configuration reads the same.
    material: Material,
    /// Stops the app's feedback poller.
    poller: CancellationToken,
}

type Material = Vec<Option<Vec<u8>>>;

fn material(app: &AppConfig) -> Material {
    [&app.certificate, &app.key, &app.ca, &app.key_file]
        .into_iter()
        .map(|p| p.as_ref().and_then(|p| std::fs::read(p).ok()))
        .collect()
}

/// What a reload changed, for the log and the caller.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub added: Vec<String>,
    /// Apps whose settings or identity changed: new lanes, the old ones drain.
    pub replaced: Vec<String>,
    pub removed: Vec<String>,
    /// The broker settings changed: the session drains and reconnects.
    pub broker_session: bool,
}

impl Daemon {
    /// Starts everything; returns once identities are loaded and lanes run.
    /// Broker trouble does not fail start-up: sessions retry with backoff.
    pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Daemon, DaemonError> {
        let stats = Arc::new(Stats::default());
        let (outcomes_tx, outcomes_rx) = mpsc::unbounded_channel();
        let (requests_tx, requests_rx) = mpsc::channel(1024);
        let (control_tx, control_rx) = mpsc::channel(4);

        // Start-up is a reload from no server: a bad address fails it.
        let metrics = match metrics_change(None, config.metrics.listen).await? {
            MetricsChange::Move(addr, listener) => Some(MetricsServer::serve(
                addr,
                listener,
                stats.clone(),
                &shutdown,
            )),
            MetricsChange::Keep | MetricsChange::Stop => None,
        };
        let mut wiring = Wiring {
            simulator: start_simulator_if_needed(&config, None).await?,
            metrics,
            config: config.clone(),
            apps: HashMap::new(),
            outcomes: outcomes_tx,
            requests: requests_tx,
            stats: stats.clone(),
            shutdown: shutdown.clone(),
        };
        let targets = config
            .apps
            .iter()
            .map(|app| prepare(app, wiring.simulator.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let routes = config
            .apps
            .iter()
            .zip(targets)
            .map(|(app, prepared)| wiring.start_app(app, material(app), prepared))
            .collect();
        let inputs = Inputs {
            outcomes: outcomes_rx,
            requests: requests_rx,
            control: control_rx,
        };
        let pipeline = Pipeline::new(
            routes,
            default_app(&config),
            inputs,
            live_settings(&config),
            stats.clone(),
        );
        let session = session_config(&config);
        let wiring = Arc::new(Mutex::new(wiring));
        let task = tokio::spawn(supervise(pipeline, session, shutdown, wiring.clone()));
        Ok(Daemon {
            stats,
            wiring,
            control: control_tx,
            task,
        })
    }

    /// Applies a new configuration without losing in-flight work. Every new
    /// identity is loaded before anything changes, so an error leaves the
    /// daemon exactly as it was. Logging is the caller's (it owns the subscriber).
    pub async fn reload(&self, config: Config) -> Result<Reloaded, DaemonError> {
        let mut w = self.wiring.lock().await;
        let metrics = metrics_change(w.metrics.as_ref(), config.metrics.listen).await?;
        w.simulator = start_simulator_if_needed(&config, w.simulator.take()).await?;
        let mut prepared = Vec::new();
        for app in &config.apps {
            let material = material(app);
            let unchanged = w
                .apps
                .get(&app.name)
                .is_some_and(|r| r.config == *app && r.material == material);
            if !unchanged {
                prepared.push((app, material, prepare(app, w.simulator.as_ref())?));
            }
        }
        let mut done = Reloaded::default();
        let mut upsert = Vec::new();
        for (app, material, targets) in prepared {
            match w.apps.get(&app.name) {
                Some(old) => {
                    old.poller.cancel();
                    done.replaced.push(app.name.clone());
                }
                None => done.added.push(app.name.clone()),
            }
            upsert.push(w.start_app(app, material, targets));
        }
        w.apps.retain(|name, running| {
            let keep = config.app(Some(name)).is_some();
            if !keep {
                running.poller.cancel();
                done.removed.push(name.clone());
            }
            keep
        });
        if config.worker_threads != w.config.worker_threads {
            tracing::warn!("worker_threads changes take effect at the next start");
        }
        let session = session_config(&config);
        done.broker_session = session != session_config(&w.config);
        let (tx, rx) = oneshot::channel();
        let change = Reconfigure {
            upsert,
            remove: done.removed.clone(),
            default_app: default_app(&config),
            live: live_settings(&config),
            session: done.broker_session.then_some(session),
            done: tx,
        };
        self.control
            .send(change)
            .await
            .map_err(|_| DaemonError::Stopped)?;
        rx.await.map_err(|_| DaemonError::Stopped)?;
        match metrics {
            MetricsChange::Keep => {}
            MetricsChange::Move(addr, listener) => {
                let stats = w.stats.clone();
                w.metrics = Some(MetricsServer::serve(addr, listener, stats, &w.shutdown));
            }
            MetricsChange::Stop => w.metrics = None,
        }
        w.config = config;
        Ok(done)
    }

    /// Waits until the daemon has drained and stopped.
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// Serves reload requests until the daemon stops: each re-reads `path`.
    /// An invalid file is logged with its file and key and changes nothing.
    pub async fn serve(
        mut self,
        path: &Path,
        mut reloads: mpsc::Receiver<Request>,
        logging: &Logging,
    ) {
        loop {
            tokio::select! {
                _ = &mut self.task => return,
                Some(Request::Reload) = reloads.recv() => {
                    let mut reloading = vec![NotifyState::Reloading, NotifyState::Status("reloading the configuration")];
                    reloading.extend(NotifyState::monotonic_usec_now().ok());
                    notify(&reloading);
                    let status = match self.reload_from(path, logging).await {
                        Ok(done) => {
                            tracing::info!(added = ?done.added, replaced = ?done.replaced, removed = ?done.removed,
                                broker_session = done.broker_session, "configuration reloaded");
                            "consuming jobs (configuration reloaded)".to_owned()
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "reload refused: still running on the previous configuration");
                            format!("reload failed, running on the previous configuration: {e}")
                        }
                    };
                    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                }
            }
        }
    }

    async fn reload_from(&self, path: &Path, logging: &Logging) -> Result<Reloaded, ReloadError> {
        let config = Config::load(path)?;
        let (level, format) = (config.log_level.clone(), config.log_format);
        let done = self.reload(config).await?;
        logging.apply(&level, format);
        Ok(done)
    }
}

/// What a reload to `listen` does to the metrics server `current`. A new
/// address is bound before anything changes; one that overlaps the current
/// socket (`0.0.0.0` for `127.0.0.1`, same port) cannot be while that is open,
/// so it waits for the next start rather than leave no server at all.
async fn metrics_change(
    current: Option<&MetricsServer>,
    listen: Option<SocketAddr>,
) -> Result<MetricsChange, DaemonError> {
    let serving = current.map(|m| m.addr);
    match listen {
        Some(addr) if serving == Some(addr) => Ok(MetricsChange::Keep),
        Some(addr) => match crate::metrics::bind(addr).await {
            Ok(listener) => Ok(MetricsChange::Move(addr, listener)),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && serving.is_some_and(|old| old.port() == addr.port()) =>
            {
                tracing::warn!(%addr, "metrics.listen: the new address overlaps the one served now; it takes effect at the next start");
                Ok(MetricsChange::Keep)
            }
            Err(source) => Err(DaemonError::Metrics { addr, source }),
        },
        None if serving.is_some() => Ok(MetricsChange::Stop),
        None => Ok(MetricsChange::Keep),
    }
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Daemon(#[from] DaemonError),
}

impl Wiring {
    /// Starts an app's lanes (and, on the binary interface, its feedback
    /// poller); returns its route.
    fn start_app(&mut self, app: &AppConfig, material: Material, targets: Prepared) -> Route {
        let name: Arc<str> = Arc::from(app.name.as_str());
        let stop = self.shutdown.child_token();
        let pool = match targets {
            Prepared::Binary { gateway, feedback } => {
                let poller = Poller {
                    app: name.clone(),
                    target: Arc::new(feedback),
                    interval: app.feedback_interval,
                    connect_timeout: app.connect_timeout,
                    results: self.requests.clone(),
                    stats: self.stats.clone(),
                };
                tokio::spawn(poller.run(stop.clone()));
                Pool::start(
                    name.clone(),
                    app.connections,
                    Arc::new(gateway),
                    lane_settings(app),
                    self.outcomes.clone(),
                    self.stats.clone(),
                )
            }
            // 410 answers replace the feedback service: no poller.
            Prepared::Http2(target) => {
                let target = Arc::new(target);
                Pool::with_lanes((0..app.connections).map(|i| {
                    http2::Lane::spawn(
                        name.clone(),
                        i,
                        target.clone(),
                        http2_settings(app),
                        self.outcomes.clone(),
                        self.stats.clone(),
                    )
                }))
            }
        };
        self.apps.insert(
            app.name.clone(),
            RunningApp {
                config: app.clone(),
                material,
                poller: stop,
            },
        );
        Route {
            name,
            pool,
            protocol: app.protocol,
        }
    }
}

/// Runs broker sessions until shutdown, reopening them with backoff, and
/// with new settings when a reload changed them.
async fn supervise(
    mut pipeline: Pipeline,
    mut session: SessionConfig,
    shutdown: CancellationToken,
    wiring: Arc<Mutex<Wiring>>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let watchdog = spawn_watchdog();
    let mut first = true;
    loop {
        let ready = || {
            if std::mem::take(&mut first) {
                notify(&[NotifyState::Ready, NotifyState::Status("consuming jobs")]);
            } else {
                notify(&[NotifyState::Status("consuming jobs")]);
            }
        };
        let outcome = pipeline.session(&session, &shutdown, ready).await;
        if let Some(next) = pipeline.take_next_session() {
            tracing::info!(queue = %next.topology.queue, "reconnecting with the new broker settings");
            session = next;
        }
        match outcome {
            Ok(SessionEnd::Drained) => break,
            Ok(SessionEnd::Reconfigured) => backoff.reset(),
            Err(e) if shutdown.is_cancelled() => {
                tracing::warn!(error = %e, "broker session ended during shutdown");
                break;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "broker session failed; unacknowledged jobs will be redelivered");
                notify(&[NotifyState::Status(&format!("broker unavailable: {e}"))]);
                let wait = tokio::time::sleep(delay);
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        _ = &mut wait => break,
                        _ = shutdown.cancelled() => break,
                        Some(change) = pipeline.control.recv() => {
                            pipeline.apply(change);
                        }
                    }
                }
                if let Some(next) = pipeline.take_next_session() {
                    session = next;
                }
                if shutdown.is_cancelled() {
                    break;
                }
            }
        }
    }
    notify(&[NotifyState::Stopping]);
    // Every job is final or left to the broker: what lanes still hold belongs
    // to unacked jobs, which the broker redelivers.
    for task in pipeline.into_lane_tasks() {
        task.abort();
    }
    let mut w = wiring.lock().await;
    for app in w.apps.values() {
        app.poller.cancel();
    }
    if let Some(sim) = w.simulator.take() {
        sim.shutdown().await;
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!("stopped");
}

/// Tells systemd, when it is listening; a failure to tell it changes nothing.
fn notify(states: &[NotifyState<'_>]) {
    let _ = sd_notify::notify(states);
}

/// Pings systemd's watchdog at half its interval while the runtime is alive,
/// draining included: a runtime wedged for longer gets the process restarted.
fn spawn_watchdog() -> Option<JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()? / 2;
    Some(tokio::spawn(async move {
        loop {
            notify(&[NotifyState::Watchdog]);
            tokio::time::sleep(interval).await;
        }
    }))
}

fn session_config(config: &Config) -> SessionConfig {
    let amqp = &config.amqp;
    SessionConfig {
        uri: amqp.uri.clone(),
        topology: Topology {
            queue: amqp.queue.clone(),
            queue_type: amqp.queue_type.clone(),
            results_exchange: amqp.results_exchange.clone(),
        },
        prefetch: amqp.prefetch,
        prefetch_bytes: amqp.prefetch_bytes,
        consumer_tag: amqp
            .consumer_tag
            .clone()
            .unwrap_or_else(|| format!("apnsd-{}", std::process::id())),
        confirm_timeout: amqp.confirm_timeout,
    }
}

fn live_settings(config: &Config) -> LiveSettings {
    LiveSettings {
        delivered_results: config.results.delivered,
        shutdown_timeout: config.shutdown_timeout,
        retry_delay: config.amqp.retry_delay,
        max_job_attempts: config.amqp.max_job_attempts,
    }
}

fn default_app(config: &Config) -> String {
    config
        .apps
        .first()
        .map(|a| a.name.clone())
        .unwrap_or_default()
}

fn lane_settings(app: &AppConfig) -> Settings {
    Settings {
        settle: app.settle,
        retain: app.retain,
        window: app.window,
        max_attempts: app.max_attempts,
        connect_timeout: app.connect_timeout,
        write_timeout: app.write_timeout,
        reconnect_min: app.reconnect_min,
        reconnect_max: app.reconnect_max,
        unusable_after: app.unusable_after,
    }
}

fn http2_settings(app: &AppConfig) -> http2::Settings {
    http2::Settings {
        max_attempts: app.max_attempts,
        max_streams: app.max_concurrent_streams,
        connect_timeout: app.connect_timeout,
        request_timeout: app.request_timeout,
        ping_interval: app.ping_interval,
        reconnect_min: app.reconnect_min,
        reconnect_max: app.reconnect_max,
        unusable_after: app.unusable_after,
        backlog: app.window,
    }
}

/// The built-in simulator, started when an app needs it and none runs yet.
async fn start_simulator_if_needed(
    config: &Config,
    running: Option<Simulator>,
) -> Result<Option<Simulator>, DaemonError> {
    if running.is_some() {
        return Ok(running);
    }
    let Some(app) = config.apps.iter().find(|a| a.uses_builtin_simulator()) else {
        return Ok(None);
    };
    let topic = app
        .topic
        .clone()
        .unwrap_or_else(|| "com.example.app".into());
    let certs = SimCerts::generate(&topic).map_err(|e| DaemonError::Simulator(e.to_string()))?;
    let sim = Simulator::start(SimulatorOptions::new(certs))
        .await
        .map_err(|e| DaemonError::Simulator(e.to_string()))?;
    tracing::info!(gateway = %sim.gateway_addr(), feedback = %sim.feedback_addr(),
        http2 = %sim.http2_addr(), "started the built-in APNs simulator");
    Ok(Some(sim))
}

/// An app's targets, identities loaded: prepared before anything changes so
/// a bad identity leaves the running daemon untouched.
enum Prepared {
    Binary { gateway: Target, feedback: Target },
    Http2(http2::Target),
}

fn prepare(app: &AppConfig, simulator: Option<&Simulator>) -> Result<Prepared, DaemonError> {
    match app.protocol {
        Protocol::Binary => targets(app, simulator)
            .map(|(gateway, feedback)| Prepared::Binary { gateway, feedback }),
        Protocol::Http2 => http2_target(app, simulator).map(Prepared::Http2),
    }
}

/// The gateway and feedback targets of an app: addresses, server name, identity.
fn targets(
    app: &AppConfig,
    simulator: Option<&Simulator>,
) -> Result<(Target, Target), DaemonError> {
    let fail = |what: String| DaemonError::App {
        app: app.name.clone(),
        what,
    };
    let builtin = app.uses_builtin_simulator().then_some(simulator).flatten();
    let tls_config = match builtin {
        Some(sim) => sim
            .certs()
            .client_config()
            .map_err(|e| fail(e.to_string()))?,
        None => {
            let identity = load_identity(app)?;
            tls::client_config(&identity, app.ca.as_deref()).map_err(|source| {
                DaemonError::Identity {
                    app: app.name.clone(),
                    source,
                }
            })?
        }
    };
    let (gateway, feedback) = match builtin {
        Some(sim) => (
            sim.gateway_addr().to_string(),
            sim.feedback_addr().to_string(),
        ),
        None => {
            let gateway = app
                .gateway
                .clone()
                .or_else(|| app.environment.gateway().map(str::to_owned));
            let feedback = app
                .feedback
                .clone()
                .or_else(|| app.environment.feedback().map(str::to_owned));
            gateway.zip(feedback).ok_or_else(|| {
                fail(
                    "the simulator environment needs both `gateway` and `feedback`, or neither"
                        .into(),
                )
            })?
        }
    };
    let target = |addr: String| -> Result<Target, DaemonError> {
        let host = host_of(&addr);
        let server_name = tls::server_name(host).map_err(|e| fail(e.to_string()))?;
        Ok(Target {
            addr,
            server_name,
            tls: tls_config.clone(),
            proxy: app.via_proxy().cloned().map(Arc::new),
        })
    };
    Ok((target(gateway)?, target(feedback)?))
}

/// Opens one gateway connection with the app's identity and listens briefly.
/// Under TLS 1.3 a server refuses a client certificate only after the client
/// thinks the handshake is done, with an alert: a gateway that stays silent
/// for [`PROBE_LISTEN`] has accepted the identity. Apps on the built-in
/// simulator have nothing to probe before it starts; HTTP/2 apps are not
/// probed (their lanes log a refused identity on their first connection).
pub async fn probe_gateway(app: &AppConfig) -> Result<(), DaemonError> {
    use tokio::io::AsyncReadExt;
    if app.uses_builtin_simulator() || app.protocol == Protocol::Http2 {
        return Ok(());
    }
    let (gateway, _) = targets(app, None)?;
    let fail = |source| DaemonError::Connect {
        app: app.name.clone(),
        addr: gateway.addr.clone(),
        source,
    };
    let mut stream = crate::apns::lane::connect(&gateway, app.connect_timeout)
        .await
        .map_err(fail)?;
    match tokio::time::timeout(PROBE_LISTEN, stream.read(&mut [0u8; 6])).await {
        Err(_) => Ok(()),
        Ok(Ok(_)) => Err(fail(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "the gateway closed the connection at once",
        ))),
        Ok(Err(e)) => Err(fail(e)),
    }
}

/// How long a probe waits for the gateway to refuse the identity.
const PROBE_LISTEN: Duration = Duration::from_millis(500);

/// The HTTP/2 target of an app: endpoint, TLS with ALPN `h2`, topic, and the
/// provider-token signer under token auth.
pub(crate) fn http2_target(
    app: &AppConfig,
    simulator: Option<&Simulator>,
) -> Result<http2::Target, DaemonError> {
    let fail = |what: String| DaemonError::App {
        app: app.name.clone(),
        what,
    };
    let identity_error = |source| DaemonError::Identity {
        app: app.name.clone(),
        source,
    };
    let builtin = app.uses_builtin_simulator().then_some(simulator).flatten();
    let (addr, tls, signer, cert_topic) = match builtin {
        Some(sim) => {
            let tls = sim
                .certs()
                .client_config()
                .map_err(|e| fail(e.to_string()))?;
            let topic = sim.certs().client().info.topic.clone();
            (sim.http2_addr().to_string(), tls, None, topic)
        }
        None => {
            let addr = app
                .endpoint
                .clone()
                .or_else(|| app.environment.endpoint().map(str::to_owned))
                .ok_or_else(|| fail("the simulator environment needs `endpoint`".into()))?;
            match (&app.key_file, &app.key_id, &app.team_id) {
                (Some(key_file), Some(key_id), Some(team_id)) => {
                    let signer =
                        Signer::from_p8_file(key_file, key_id, team_id).map_err(|source| {
                            DaemonError::TokenKey {
                                app: app.name.clone(),
                                source,
                            }
                        })?;
                    let tls =
                        tls::anonymous_client_config(app.ca.as_deref()).map_err(identity_error)?;
                    (addr, tls, Some(Arc::new(signer)), None)
                }
                _ => {
                    let identity = load_identity(app)?;
                    let tls =
                        tls::client_config(&identity, app.ca.as_deref()).map_err(identity_error)?;
                    (addr, tls, None, identity.info.topic)
                }
            }
        }
    };
    let topic =
        app.topic.clone().or(cert_topic).ok_or_else(|| {
            fail("no `topic`, and the certificate names none (subject UID)".into())
        })?;
    if http::HeaderValue::from_str(&topic).is_err() {
        return Err(fail(format!("topic {topic:?} is not a valid header value")));
    }
    if http::uri::Authority::try_from(addr.as_str()).is_err() {
        return Err(fail(format!("endpoint {addr:?} is not a valid host:port")));
    }
    let server_name = tls::server_name(host_of(&addr)).map_err(|e| fail(e.to_string()))?;
    Ok(http2::Target {
        addr,
        server_name,
        tls: tls::with_h2(&tls),
        topic,
        signer,
        proxy: app.via_proxy().cloned().map(Arc::new),
    })
}

fn load_identity(app: &AppConfig) -> Result<Identity, DaemonError> {
    let Some(cert) = &app.certificate else {
        return Err(DaemonError::App {
            app: app.name.clone(),
            what: "`certificate` is required outside the built-in simulator".into(),
        });
    };
    tls::load_identity(cert, app.password.as_deref(), app.key.as_deref()).map_err(|source| {
        DaemonError::Identity {
            app: app.name.clone(),
            source,
        }
    })
}

/// `host:port` → `host`, minding bracketed IPv6 literals.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server on `127.0.0.1:<free port>` that `metrics_change` can weigh
    /// new addresses against; its listener holds the port.
    async fn serving() -> (MetricsServer, tokio::net::TcpListener) {
        let listener = crate::metrics::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        (MetricsServer { addr, stop }, listener)
    }

    #[tokio::test]
    async fn a_metrics_reload_binds_first_and_keeps_an_overlapping_address_for_later() {
        let (current, _held) = serving().await;
        let port = current.addr.port();
        let same = metrics_change(Some(&current), Some(current.addr)).await;
        assert!(matches!(same, Ok(MetricsChange::Keep)));
        let wildcard = format!("0.0.0.0:{port}").parse().unwrap();
        let overlap = metrics_change(Some(&current), Some(wildcard)).await;
        assert!(matches!(overlap, Ok(MetricsChange::Keep)), "next start");
        let moved = metrics_change(Some(&current), Some("127.0.0.1:0".parse().unwrap())).await;
        assert!(matches!(moved, Ok(MetricsChange::Move(..))));
        assert!(matches!(
            metrics_change(Some(&current), None).await,
            Ok(MetricsChange::Stop)
        ));
        assert!(matches!(
            metrics_change(None, None).await,
            Ok(MetricsChange::Keep)
        ));
        // Another process's port: refused, and the error names the key.
        let (_other, taken) = serving().await;
        let taken = taken.local_addr().unwrap();
        assert!(
            matches!(
                metrics_change(None, Some(taken)).await,
                Err(DaemonError::Metrics { .. })
            ),
            "start-up fails on it"
        );
        match metrics_change(Some(&current), Some(taken)).await {
            Err(e) => assert!(
                e.to_string()
                    .starts_with("metrics.listen: cannot listen on"),
                "{e}"
            ),
            Ok(_) => panic!("{taken} is in use"),
        }
    }

    #[test]
    fn host_of_strips_ports_and_brackets() {
        assert_eq!(
            host_of("gateway.push.apple.com:2195"),
            "gateway.push.apple.com"
        );
        assert_eq!(host_of("127.0.0.1:22195"), "127.0.0.1");
        assert_eq!(host_of("[::1]:22195"), "::1");
    }
}
