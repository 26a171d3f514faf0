//! Wiring: configuration → identities → lanes and pollers per app → broker
//! sessions (reopened with backoff when the broker goes away) → drain on
//! shutdown. Also tells systemd how it is going.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::amqp::Topology;
use crate::apns::lane::{Settings, Target};
use crate::apns::pool::Pool;
use crate::apns::tls::{self, Identity};
use crate::backoff::Backoff;
use crate::config::{AppConfig, Config, Environment};
use crate::feedback::Poller;
use crate::metrics::Stats;
use crate::pipeline::{Pipeline, Route, SessionConfig};
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
    #[error("built-in simulator: {0}")]
    Simulator(String),
    #[error("metrics.listen: cannot listen on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// A running daemon: its counters, and the task to await for its end.
pub struct Daemon {
    pub stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl Daemon {
    /// Starts everything; returns once identities are loaded and lanes run.
    /// Broker trouble does not fail start-up: sessions retry with backoff.
    pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Daemon, DaemonError> {
        let stats = Arc::new(Stats::default());
        let (outcomes_tx, outcomes_rx) = mpsc::unbounded_channel();
        let (requests_tx, requests_rx) = mpsc::channel(1024);

        if let Some(addr) = config.metrics.listen {
            let listener = crate::metrics::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?;
            tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
            tokio::spawn(crate::metrics::serve(
                listener,
                stats.clone(),
                shutdown.child_token(),
            ));
        }
        let simulator = start_simulator_if_needed(&config).await?;
        let mut routes = HashMap::new();
        let mut pollers = Vec::new();
        for app in &config.apps {
            let (gateway, feedback) = targets(app, simulator.as_ref())?;
            let name: Arc<str> = Arc::from(app.name.as_str());
            let (_gateway_tx, gateway_rx) = watch::channel(Arc::new(gateway));
            let pool = Pool::start(
                name.clone(),
                app.connections,
                gateway_rx,
                lane_settings(app),
                outcomes_tx.clone(),
                stats.clone(),
            );
            routes.insert(
                app.name.clone(),
                Route {
                    name: name.clone(),
                    pool,
                },
            );
            let (_feedback_tx, feedback_rx) = watch::channel(Arc::new(feedback));
            let poller = Poller {
                app: name,
                target: feedback_rx,
                interval: app.feedback_interval,
                connect_timeout: app.connect_timeout,
                results: requests_tx.clone(),
                stats: stats.clone(),
            };
            pollers.push(tokio::spawn(poller.run(shutdown.child_token())));
        }
        drop(outcomes_tx);
        let default_app = config
            .apps
            .first()
            .map(|a| a.name.clone())
            .unwrap_or_default();
        let pipeline = Pipeline::new(routes, default_app, outcomes_rx, requests_rx, stats.clone());
        let session = session_config(&config);
        let task = tokio::spawn(supervise(pipeline, session, shutdown, pollers, simulator));
        Ok(Daemon { stats, task })
    }

    /// Waits until the daemon has drained and stopped.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Runs broker sessions until shutdown, reopening them with backoff.
async fn supervise(
    mut pipeline: Pipeline,
    session: SessionConfig,
    shutdown: CancellationToken,
    pollers: Vec<JoinHandle<()>>,
    simulator: Option<Simulator>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let watchdog = spawn_watchdog(shutdown.clone());
    loop {
        let ready = || {
            let _ = sd_notify::notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status("consuming jobs"),
            ]);
        };
        match pipeline.session(&session, &shutdown, ready).await {
            Ok(_) => break,
            Err(e) if shutdown.is_cancelled() => {
                tracing::warn!(error = %e, "broker session ended during shutdown");
                break;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "broker session failed; unacknowledged jobs will be redelivered");
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&format!(
                    "broker unavailable: {e}"
                ))]);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    for p in pollers {
        p.abort();
    }
    // Every job is final or left to the broker: what lanes still hold belongs
    // to unacked jobs, which the broker redelivers.
    let Pipeline { routes, .. } = pipeline;
    for (_, route) in routes {
        for task in route.pool.close() {
            task.abort();
        }
    }
    if let Some(sim) = simulator {
        sim.shutdown().await;
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!("stopped");
}

/// Pings systemd's watchdog at half its interval while the runtime is alive.
fn spawn_watchdog(shutdown: CancellationToken) -> Option<JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()? / 2;
    Some(tokio::spawn(async move {
        loop {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.cancelled() => {}
            }
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
        consumer_tag: amqp
            .consumer_tag
            .clone()
            .unwrap_or_else(|| format!("apnsd-{}", std::process::id())),
        confirm_timeout: amqp.confirm_timeout,
        delivered_results: config.results.delivered,
        shutdown_timeout: config.shutdown_timeout,
    }
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
    }
}

/// Apps in the simulator environment without a gateway of their own talk to
/// one simulator started in this process.
fn needs_builtin_simulator(app: &AppConfig) -> bool {
    app.environment == Environment::Simulator && app.gateway.is_none()
}

async fn start_simulator_if_needed(config: &Config) -> Result<Option<Simulator>, DaemonError> {
    let Some(app) = config.apps.iter().find(|a| needs_builtin_simulator(a)) else {
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
        "started the built-in APNs simulator");
    Ok(Some(sim))
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
    let builtin = needs_builtin_simulator(app).then_some(simulator).flatten();
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
        })
    };
    Ok((target(gateway)?, target(feedback)?))
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
    use super::host_of;

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
