//! The path of a job: intake (consume, decode, validate, route to an app's
//! lanes) → outcomes → settlement (results published with confirms, acks).
//! One task owns the routes, the intake and the settlement, so no lock is
//! taken per job; reloads are put in force on that task, between deliveries.
//!
//! A *broker session* is one pair of broker connections. When it fails, the
//! [`supervisor`] opens a new one; the lanes keep running, and what was
//! unacked comes back by redelivery.

pub mod settlement;
pub mod supervisor;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, AmqpError, Publisher, Topology};
use crate::apns::pool::Pool;
use crate::apns::{Outcome, Protocol};
use crate::brokers::BrokerUris;
use crate::clock::sleep_until;
use crate::intake::{self, Intake, Prefetch, Subscription};
use crate::metrics::Stats;
use crate::redelivery::Recall;
use crate::results::Event;
pub use settlement::LiveSettings;
use settlement::Settlement;

/// An app as the router sees it.
pub struct Route {
    pub name: Arc<str>,
    pub pool: Pool,
    /// Decides the job limits (token length, payload size) checked at routing.
    pub protocol: Protocol,
}

/// The apps jobs are routed to, by name.
pub struct Routes {
    map: HashMap<Arc<str>, Route>,
    /// Where a job that names no app goes.
    pub default_app: String,
}

impl Routes {
    /// The route of the app a job names, or of the default app.
    pub fn get(&self, app: Option<&str>) -> Option<&Route> {
        self.map.get(app.unwrap_or(&self.default_app))
    }
}

/// A result someone outside the pipeline needs published (feedback), with a
/// channel that fires once the broker confirmed it.
pub type ResultRequest = (Event, oneshot::Sender<()>);

/// Broker settings of one broker session: a change to any of them needs a new session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerSettings {
    /// The broker nodes; the supervisor picks the one each session uses.
    pub uri: BrokerUris,
    pub topology: Topology,
    pub prefetch: u16,
    /// Most job body bytes held; the prefetch in force adapts under it (0: off).
    pub prefetch_bytes: u64,
    pub consumer_tag: String,
    pub confirm_timeout: Duration,
}

/// A reload, prepared off the pipeline's task (identities loaded, lanes
/// started) so that applying it is only a swap of routes.
pub struct Reconfigure {
    /// New or changed apps. A route it replaces stops taking work; its lanes
    /// finish what they hold, so nothing in flight is lost.
    pub upsert: Vec<Route>,
    /// Apps no longer configured: their lanes drain the same way.
    pub remove: Vec<String>,
    pub default_app: String,
    pub live: LiveSettings,
    /// New broker settings: the current session drains, then a new one starts.
    pub broker: Option<BrokerSettings>,
    /// Fires once the change is in force.
    pub done: oneshot::Sender<()>,
}

/// Why a broker session drained (everything in flight final, or left to the
/// broker when the shutdown timeout ran out).
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// Shutdown was asked for.
    Shutdown,
    /// A reload changed the broker settings; they are in
    /// [`Pipeline::take_next_broker`].
    Reconfigured,
}

/// The channels a pipeline listens on.
pub struct Inputs {
    pub outcomes: mpsc::UnboundedReceiver<Vec<Outcome>>,
    pub requests: mpsc::Receiver<ResultRequest>,
    pub control: mpsc::Receiver<Reconfigure>,
}

/// What outlives a broker session: the routes, the intake, and the channels
/// lanes, pollers and reloads report on.
pub struct Pipeline {
    routes: Routes,
    intake: Intake,
    outcomes: mpsc::UnboundedReceiver<Vec<Outcome>>,
    requests: mpsc::Receiver<ResultRequest>,
    control: mpsc::Receiver<Reconfigure>,
    stats: Arc<Stats>,
    live: LiveSettings,
    /// Broker settings a reload asked for, in force from the next session.
    next_broker: Option<BrokerSettings>,
    /// Lane tasks of replaced or removed apps, still finishing their work.
    retired: Vec<JoinHandle<()>>,
    /// Known outcomes of unfinished jobs, kept across sessions for their redelivery.
    recall: Recall,
}

impl Pipeline {
    pub fn new(
        routes: Vec<Route>,
        default_app: String,
        inputs: Inputs,
        live: LiveSettings,
        stats: Arc<Stats>,
    ) -> Self {
        Pipeline {
            routes: Routes {
                map: routes.into_iter().map(|r| (r.name.clone(), r)).collect(),
                default_app,
            },
            intake: Intake::new(stats.clone()),
            outcomes: inputs.outcomes,
            requests: inputs.requests,
            control: inputs.control,
            stats,
            live,
            next_broker: None,
            retired: Vec::new(),
            recall: Recall::default(),
        }
    }

    /// Puts a reload in force. Returns whether the broker session must change.
    fn apply(&mut self, change: Reconfigure) -> bool {
        for route in change.upsert {
            if let Some(old) = self.routes.map.insert(route.name.clone(), route) {
                self.retired.extend(old.pool.close());
            }
        }
        for name in change.remove {
            if let Some(old) = self.routes.map.remove(name.as_str()) {
                self.retired.extend(old.pool.close());
            }
        }
        self.retired.retain(|t| !t.is_finished());
        self.routes.default_app = change.default_app;
        self.live = change.live;
        if change.broker.is_some() {
            self.next_broker = change.broker;
        }
        let _ = change.done.send(());
        self.next_broker.is_some()
    }

    /// Broker settings a reload asked for, if any.
    pub fn take_next_broker(&mut self) -> Option<BrokerSettings> {
        self.next_broker.take()
    }

    /// Waits out `delay` between broker sessions, reloads still put in force.
    pub async fn idle(&mut self, delay: Duration, shutdown: &CancellationToken) {
        let wait = tokio::time::sleep(delay);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => return,
                _ = shutdown.cancelled() => return,
                Some(change) = self.control.recv() => {
                    self.apply(change);
                }
            }
        }
    }

    /// Every lane task, current and retired, for the final teardown.
    pub fn into_lane_tasks(self) -> Vec<JoinHandle<()>> {
        let mut tasks = self.retired;
        for (_, route) in self.routes.map {
            tasks.extend(route.pool.close());
        }
        tasks
    }

    /// Runs one broker session on the node at `uri` (one of `cfg.uri`) until
    /// shutdown has drained it or the broker fails. `ready` fires once the
    /// consumer is attached.
    pub async fn session(
        &mut self,
        cfg: &BrokerSettings,
        uri: &str,
        shutdown: &CancellationToken,
        ready: impl FnOnce(),
    ) -> Result<Drained, AmqpError> {
        let consume_conn = amqp::connect(uri, "apnsd-consume").await?;
        let publish_conn = amqp::connect(uri, "apnsd-publish").await?;
        let prefetch = Prefetch::new(cfg.prefetch, cfg.prefetch_bytes);
        let consume =
            amqp::consumer_channel(&consume_conn, &cfg.topology, prefetch.current()).await?;
        let publisher = Publisher::open(
            publish_conn,
            &cfg.topology.results_exchange,
            cfg.confirm_timeout,
        )
        .await?;
        let mut sub =
            Subscription::start(&consume, &cfg.topology.queue, &cfg.consumer_tag, prefetch).await?;
        self.stats.prefetch.set(i64::from(prefetch.current()));
        tracing::info!(queue = %cfg.topology.queue, prefetch = prefetch.current(),
            max_prefetch = cfg.prefetch, prefetch_bytes = cfg.prefetch_bytes, "consuming jobs");
        self.stats.health.set_ready(true);
        ready();

        let mut settle = Settlement::new(
            consume.clone(),
            publisher,
            prefetch.current(),
            cfg.topology.retry_queue(),
            self.live,
            self.stats.clone(),
            std::mem::take(&mut self.recall),
        );
        let mut consuming = true;
        let mut drain_deadline: Option<Instant> = None;
        let mut restart = self.next_broker.is_some();
        let end = || {
            if shutdown.is_cancelled() {
                Drained::Shutdown
            } else {
                Drained::Reconfigured
            }
        };
        let result = loop {
            if consuming && (restart || shutdown.is_cancelled()) {
                consuming = false;
                drain_deadline = Some(Instant::now() + self.live.shutdown_timeout);
                tracing::info!(
                    in_flight = settle.held().0,
                    "stopping intake, letting in-flight jobs finish"
                );
                if let Err(e) = sub.cancel(&consume).await {
                    break Err(e.into());
                }
            }
            if !consuming && settle.is_settled() {
                break Ok(end());
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if consuming => {}
                // Final jobs waiting behind one in flight: acked after the select.
                _ = sleep_until(settle.ack_deadline()), if settle.ack_deadline().is_some() => {}
                _ = sleep_until(drain_deadline), if drain_deadline.is_some() => {
                    tracing::warn!(unfinished = settle.held().0,
                        "drain timeout: leaving unfinished jobs to the broker for redelivery");
                    break Ok(end());
                }
                Some(change) = self.control.recv() => {
                    restart |= self.apply(change);
                    settle.set_live(self.live);
                }
                // Over the bound of unconfirmed results, outcomes wait in
                // the lanes (whose windows then fill) until confirms come in.
                Some(batch) = self.outcomes.recv(), if !settle.backlogged() => {
                    if let Err(e) = on_outcomes(&mut settle, &mut self.outcomes, batch).await { break Err(e.into()) }
                }
                confirmed = settle.settle_next_confirm(), if settle.confirming() => {
                    if let Err(e) = confirmed { break Err(e) }
                }
                Some((event, waiter)) = self.requests.recv(), if consuming => {
                    if let Err(e) = settle.publish_for(event, waiter).await { break Err(e.into()) }
                }
                // Before the current subscription's: the former's deliveries
                // have the lower tags, and acks are planned in tag order.
                delivery = intake::next_delivery(&mut sub.former), if consuming => match delivery {
                    Some(Ok(d)) => if let Err(e) = self.intake.on_deliveries(&self.routes, &mut settle, &mut self.outcomes, vec![d]).await { break Err(e) },
                    Some(Err(e)) => break Err(e.into()),
                    None => sub.former = None,
                },
                batch = intake::next_batch(&mut sub.consumer), if consuming => match batch {
                    Some(Ok(batch)) => {
                        if let Some(first) = batch.first() {
                            settle.current_starts(first.delivery_tag);
                        }
                        if let Err(e) = self.intake.on_deliveries(&self.routes, &mut settle, &mut self.outcomes, batch).await { break Err(e) }
                    }
                    Some(Err(e)) => break Err(e.into()),
                    None => break Err(AmqpError::ConsumerCancelled),
                },
            }
            if let Err(e) = settle.flush_acks().await {
                break Err(e.into());
            }
            let (held, unacked) = (settle.held(), settle.unacked());
            if consuming {
                match sub
                    .adapt(&consume, &cfg.topology.queue, unacked, held)
                    .await
                {
                    Ok(Some(prefetch)) => {
                        settle.resubscribed(prefetch);
                        self.stats.prefetch.set(i64::from(prefetch));
                    }
                    Ok(None) => {}
                    Err(e) => break Err(e.into()),
                }
            }
            self.stats.jobs_in_flight.set(held.0 as i64);
            // A new subscription changes which deliveries are its, not how many.
            self.stats.jobs_unacked.set(unacked.total as i64);
            self.stats.job_bytes_held.set(held.1 as i64);
        };
        self.stats.health.set_ready(false);
        self.stats.jobs_in_flight.set(0);
        self.stats.jobs_unacked.set(0);
        self.stats.job_bytes_held.set(0);
        self.stats.prefetch.set(0);
        if result.is_ok() {
            let _ = settle.flush_acks().await;
            settle.close().await;
        }
        // However the session ended, its unfinished jobs come back.
        self.recall = settle.end();
        if result.is_ok() {
            let _ = consume_conn.close(200, "bye".into()).await;
        }
        result
    }
}

/// Settles `first` and whatever else the lanes reported meanwhile, up to the
/// bound of unconfirmed results.
async fn on_outcomes(
    settle: &mut Settlement,
    outcomes: &mut mpsc::UnboundedReceiver<Vec<Outcome>>,
    first: Vec<Outcome>,
) -> Result<(), lapin::Error> {
    let mut batch = first;
    for _ in 1..64 {
        settle.on_outcome_batch(batch).await?;
        if settle.backlogged() {
            return Ok(());
        }
        match outcomes.try_recv() {
            Ok(next) => batch = next,
            Err(_) => return Ok(()),
        }
    }
    // The last batch taken is handled too: dropping it would lose outcomes.
    settle.on_outcome_batch(batch).await
}
