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

use crate::apns::binary::Binary;
use crate::apns::http2::Http2;
use crate::apns::pool::Pool;
use crate::apns::Outcomes;
use crate::config::{AppConfig, Config, ConfigError};
use crate::feedback::Poller;
use crate::logging::Logging;
use crate::metrics::{metrics_change, ListenError, MetricsChange, MetricsServer, Stats};
use crate::pipeline::supervisor::supervise;
use crate::pipeline::{Inputs, Pipeline, Reconfigure, ResultRequest, Route};
use crate::signals::Request;
use crate::systemd::notify;
use crate::targets::{certificate_expiry, prepare, Prepared, StandIn, TargetError};

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
        let metrics = match metrics_change(None, config.metrics.listen)
            .await
            .map_err(DaemonError::from)?
        {
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
            config.live(),
            stats.clone(),
        );
        let broker = config.broker();
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
        let metrics = metrics_change(w.metrics.as_ref(), config.metrics.listen)
            .await
            .map_err(DaemonError::from)?;
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
        let stats = w.stats.clone();
        w.apps.retain(|name, running| {
            let keep = config.app(Some(name)).is_some();
            if !keep {
                running.poller.cancel();
                stats.set_certificate_expiry(name, None);
                done.removed.push(name.clone());
            }
            keep
        });
        if config.worker_threads != w.config.worker_threads {
            tracing::warn!("worker_threads changes take effect at the next start");
        }
        let broker = config.broker();
        done.broker_session = broker != w.config.broker();
        let (tx, rx) = oneshot::channel();
        let change = Reconfigure {
            upsert,
            remove: done.removed.clone(),
            default_app: default_app(&config),
            live: config.live(),
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

impl From<ListenError> for DaemonError {
    fn from(e: ListenError) -> Self {
        DaemonError::Metrics {
            addr: e.addr,
            source: e.source,
        }
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
        self.stats
            .set_certificate_expiry(&app.name, certificate_expiry(app));
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
                let (gateway, settings) = (Arc::new(gateway), app.binary());
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
                let (target, settings) = (Arc::new(target), app.http2());
                Pool::spawn_growing(
                    name.clone(),
                    app.growth(),
                    move || Http2::new(target.clone(), settings),
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

fn default_app(config: &Config) -> String {
    config
        .apps
        .first()
        .map(|a| a.name.clone())
        .unwrap_or_default()
}
