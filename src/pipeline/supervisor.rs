//! The broker supervisor: runs broker sessions until shutdown, reopening
//! them with backoff when the broker goes away, and with new settings when a
//! reload changed them. With several broker nodes it starts at a random one
//! and moves to the next whenever a session fails ([`Rotation`]).

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use super::{BrokerSettings, Drained, Pipeline};
use crate::backoff::Backoff;
use crate::brokers::{self, Rotation};
use crate::systemd::{notify, spawn_watchdog};

pub async fn supervise(
    mut pipeline: Pipeline,
    mut broker: BrokerSettings,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let watchdog = spawn_watchdog();
    let mut first = true;
    let mut nodes = Rotation::random(broker.uri.len());
    loop {
        let uri = broker.uri.get(nodes.current()).to_owned();
        let node = brokers::node_label(&uri);
        let stats = pipeline.stats.clone();
        let ready = || {
            stats.set_broker_node(&node, true);
            tracing::info!(node = %node, "broker session open");
            if std::mem::take(&mut first) {
                notify(&[NotifyState::Ready, NotifyState::Status("consuming jobs")]);
            } else {
                notify(&[NotifyState::Status("consuming jobs")]);
            }
        };
        let outcome = pipeline.session(&broker, &uri, &shutdown, ready).await;
        stats.set_broker_node(&node, false);
        if outcome.is_err() {
            nodes.advance();
        }
        if let Some(next) = pipeline.take_next_broker() {
            tracing::info!(queue = %next.topology.queue, "reconnecting with the new broker settings");
            switch(&mut broker, &mut nodes, next);
        }
        match outcome {
            Ok(Drained::Shutdown) => break,
            Ok(Drained::Reconfigured) => backoff.reset(),
            Err(e) if shutdown.is_cancelled() => {
                tracing::warn!(error = %e, "broker session ended during shutdown");
                break;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, node = %node, retry_in = ?delay, "broker session failed; unacknowledged jobs will be redelivered");
                notify(&[NotifyState::Status(&format!("broker unavailable: {e}"))]);
                pipeline.idle(delay, &shutdown).await;
                if let Some(next) = pipeline.take_next_broker() {
                    switch(&mut broker, &mut nodes, next);
                }
                if shutdown.is_cancelled() {
                    break;
                }
            }
        }
    }
    notify(&[NotifyState::Stopping]);
    // Every job is final or left to the broker: what lanes still hold belongs
    // to unacked jobs, which the broker redelivers. Feedback pollers stop
    // with the shutdown token they were started under.
    for task in pipeline.into_lane_tasks() {
        task.abort();
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!("stopped");
}

/// Puts broker settings a reload asked for in force; a changed list of nodes
/// starts a new rotation over it.
fn switch(broker: &mut BrokerSettings, nodes: &mut Rotation, next: BrokerSettings) {
    if next.uri != broker.uri {
        *nodes = Rotation::random(next.uri.len());
    }
    *broker = next;
}
