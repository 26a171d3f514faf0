//! The daemon's lifecycle: configuration → targets (identities loaded) →
//! lanes and pollers per app → the pipeline under its broker supervisor →
//! drain on shutdown. Reloads rebuild only the apps that changed, and tell
//! systemd how they went.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use sd_notify::NotifyState;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::amqp::Topology;
use crate::apns::binary::{Binary, BinarySettings};
use crate::apns::http2::{Http2, Http2Settings};
use crate::apns::lane::Policy;
use crate::apns::pool::Pool;
use crate::apns::Outcomes;
use crate::config::{AppConfig, Config, ConfigError};
use crate::feedback::Poller;
use crate::logging::Logging;
use crate::metrics::Stats;
use crate::pipeline::supervisor::supervise;
use crate::pipeline::{
    BrokerSettings, Inputs, LiveSettings, Pipeline, Reconfigure, ResultRequest, Route,
};
use crate::signals::Request;
use crate::systemd::notify;
use crate::targets::{prepare, Prepared, StandIn, TargetError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("metrics.listen: cannot listen on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the daemon has stopped")]
    Stopped,
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
    /// Where apps on the built-in simulator connect, resolved at start-up.
    stand_in: Option<StandIn>,
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
    /// Apps on the built-in simulator need [`Daemon::start_with`].
    pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Daemon, DaemonError> {
        Daemon::start_with(config, shutdown, None).await
    }

    /// [`Daemon::start`], with apps on the built-in simulator sent to `stand_in`
    /// (now and after every reload).
    pub async fn start_with(
        config: Config,
        shutdown: CancellationToken,
        stand_in: Option<StandIn>,
    ) -> Result<Daemon, DaemonError> {
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
            stand_in,
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
            .map(|app| prepare(app, wiring.stand_in.as_ref()))
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
        let broker = broker_settings(&config);
        let wiring = Arc::new(Mutex::new(wiring));
        let task = tokio::spawn(supervise(pipeline, broker, shutdown));
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
        let mut prepared = Vec::new();
        for app in &config.apps {
            let material = material(app);
            let unchanged = w
                .apps
                .get(&app.name)
                .is_some_and(|r| r.config == *app && r.material == material);
            if !unchanged {
                prepared.push((app, material, prepare(app, w.stand_in.as_ref())?));
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
        let broker = broker_settings(&config);
        done.broker_session = broker != broker_settings(&w.config);
        let (tx, rx) = oneshot::channel();
        let change = Reconfigure {
            upsert,
            remove: done.removed.clone(),
            default_app: default_app(&config),
            live: live_settings(&config),
            broker: done.broker_session.then_some(broker),
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
                let (gateway, settings) = (Arc::new(gateway), lane_settings(app));
                Pool::spawn(
                    name.clone(),
                    app.connections,
                    || Binary::new(gateway.clone(), settings),
                    self.outcomes.clone(),
                    self.stats.clone(),
                )
            }
            // 410 answers replace the feedback service: no poller.
            Prepared::Http2(target) => {
                let (target, settings) = (Arc::new(target), http2_settings(app));
                Pool::spawn(
                    name.clone(),
                    app.connections,
                    || Http2::new(target.clone(), settings),
                    self.outcomes.clone(),
                    self.stats.clone(),
                )
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

fn broker_settings(config: &Config) -> BrokerSettings {
    let amqp = &config.amqp;
    BrokerSettings {
        uri: amqp.uri.clone(),
        topology: Topology::from(amqp),
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

fn lane_settings(app: &AppConfig) -> BinarySettings {
    BinarySettings {
        settle: app.settle,
        retain: app.retain,
        window: app.window,
        max_attempts: app.max_attempts,
        write_timeout: app.write_timeout,
        policy: lane_policy(app),
    }
}

/// What lanes of either transport share: connecting, reconnecting, and what
/// they queue meanwhile (the `window` key doubles as the HTTP/2 backlog).
fn lane_policy(app: &AppConfig) -> Policy {
    Policy {
        connect_timeout: app.connect_timeout,
        reconnect_min: app.reconnect_min,
        reconnect_max: app.reconnect_max,
        unusable_after: app.unusable_after,
        backlog: app.window,
    }
}

fn http2_settings(app: &AppConfig) -> Http2Settings {
    Http2Settings {
        max_attempts: app.max_attempts,
        max_streams: app.max_concurrent_streams,
        request_timeout: app.request_timeout,
        ping_interval: app.ping_interval,
        policy: lane_policy(app),
    }
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
}
