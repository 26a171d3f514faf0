//! Start-up: the one place that knows the built-in simulator. When an app
//! on `environment = "simulator"` names no address, it starts the simulator
//! in-process and resolves it, once, into a [`StandIn`] (addresses and a
//! client configuration that trusts its root): the daemon sees only that.
//! The simulator outlives the daemon's drain, so it serves what the lanes
//! still send while a SIGTERM drains them.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon::{Daemon, DaemonError};
use crate::logging::Logging;
use crate::metrics::Stats;
use crate::signals::Request;
use crate::simulator::{SimCerts, Simulator, SimulatorOptions};
use crate::targets::StandIn;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("built-in simulator: {0}")]
    Simulator(String),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}

/// A started daemon, and the simulator it may be sending to.
pub struct Started {
    pub daemon: Daemon,
    simulator: Option<Simulator>,
}

/// Starts the simulator when an app needs it, then the daemon.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Started, StartError> {
    let simulator = start_simulator(&config).await?;
    let stand_in = simulator.as_ref().map(stand_in).transpose()?;
    let daemon = Daemon::start_with(config, shutdown, stand_in).await?;
    Ok(Started { daemon, simulator })
}

impl Started {
    pub fn stats(&self) -> &Arc<Stats> {
        &self.daemon.stats
    }

    /// [`Daemon::serve`], then the simulator stops.
    pub async fn serve(self, path: &Path, reloads: mpsc::Receiver<Request>, logging: &Logging) {
        self.daemon.serve(path, reloads, logging).await;
        stop(self.simulator).await;
    }

    /// [`Daemon::wait`], then the simulator stops.
    pub async fn wait(self) {
        self.daemon.wait().await;
        stop(self.simulator).await;
    }
}

async fn stop(simulator: Option<Simulator>) {
    if let Some(sim) = simulator {
        sim.shutdown().await;
    }
}

/// The built-in simulator, when an app needs it; its certificates name the
/// first such app's topic.
async fn start_simulator(config: &Config) -> Result<Option<Simulator>, StartError> {
    let Some(app) = config.apps.iter().find(|a| a.uses_builtin_simulator()) else {
        return Ok(None);
    };
    let topic = app
        .topic
        .clone()
        .unwrap_or_else(|| "com.example.app".into());
    let certs = SimCerts::generate(&topic).map_err(|e| StartError::Simulator(e.to_string()))?;
    let sim = Simulator::start(SimulatorOptions::new(certs))
        .await
        .map_err(|e| StartError::Simulator(e.to_string()))?;
    tracing::info!(gateway = %sim.gateway_addr(), feedback = %sim.feedback_addr(),
        http2 = %sim.http2_addr(), "started the built-in APNs simulator");
    Ok(Some(sim))
}

fn stand_in(sim: &Simulator) -> Result<StandIn, StartError> {
    let tls = sim
        .certs()
        .client_config()
        .map_err(|e| StartError::Simulator(e.to_string()))?;
    Ok(StandIn {
        gateway: sim.gateway_addr(),
        feedback: sim.feedback_addr(),
        endpoint: sim.http2_addr(),
        tls,
        topic: sim.certs().client().info.topic.clone(),
    })
}
