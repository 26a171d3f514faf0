//! The path of a job: intake (consume, decode, validate) → router (app, lane)
//! → outcomes → results (published with confirms) → ack. One task owns the
//! ledger and the ack planner, so no lock is taken per job.
//!
//! A *session* is one pair of broker connections. When it fails, the daemon
//! opens a new one; the lanes keep running, and what was unacked comes back
//! by redelivery.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, AmqpError, Owner, Publisher, Topology};
use crate::apns::pool::Pool;
use crate::apns::{Envelope, Notification, Outcome};
use crate::job::{Job, JobError};
use crate::ledger::{Ack, AckPlanner, JobKey, Ledger};
use crate::metrics::Stats;
use crate::results::Event;

/// Most deliveries taken in one go before routing them, so one-token jobs
/// travel to the lanes in batches.
const INTAKE_BATCH: usize = 256;

/// An app as the router sees it.
pub struct Route {
    pub name: Arc<str>,
    pub pool: Pool,
}

/// A result someone outside the pipeline needs published (feedback), with a
/// channel that fires once the broker confirmed it.
pub type ResultRequest = (Event, oneshot::Sender<()>);

/// Broker settings of one session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub uri: String,
    pub topology: Topology,
    pub prefetch: u16,
    pub consumer_tag: String,
    pub confirm_timeout: Duration,
    pub delivered_results: bool,
    pub shutdown_timeout: Duration,
}

/// What outlives a session: the routes, and the channels lanes and pollers report on.
pub struct Pipeline {
    pub routes: HashMap<String, Route>,
    pub default_app: String,
    pub outcomes: mpsc::UnboundedReceiver<Vec<Outcome>>,
    pub requests: mpsc::Receiver<ResultRequest>,
    pub stats: Arc<Stats>,
    next_key: u64,
}

/// How a session ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// Shutdown was asked for and everything in flight is final (or was left
    /// to the broker when the shutdown timeout ran out).
    Drained,
}

struct Session<'a> {
    cfg: &'a SessionConfig,
    consume: lapin::Channel,
    publisher: Publisher,
    ledger: Ledger,
    acks: AckPlanner,
    ack_buf: Vec<Ack>,
}

impl Pipeline {
    pub fn new(
        routes: HashMap<String, Route>,
        default_app: String,
        outcomes: mpsc::UnboundedReceiver<Vec<Outcome>>,
        requests: mpsc::Receiver<ResultRequest>,
        stats: Arc<Stats>,
    ) -> Self {
        Pipeline {
            routes,
            default_app,
            outcomes,
            requests,
            stats,
            next_key: 0,
        }
    }

    /// Runs one broker session until shutdown has drained it or the broker fails.
    /// `ready` fires once the consumer is attached.
    pub async fn session(
        &mut self,
        cfg: &SessionConfig,
        shutdown: &CancellationToken,
        ready: impl FnOnce(),
    ) -> Result<SessionEnd, AmqpError> {
        let consume_conn = amqp::connect(&cfg.uri, "apnsd-consume").await?;
        let publish_conn = amqp::connect(&cfg.uri, "apnsd-publish").await?;
        let consume = amqp::consumer_channel(&consume_conn, &cfg.topology, cfg.prefetch).await?;
        let publisher = Publisher::open(
            &publish_conn,
            &cfg.topology.results_exchange,
            cfg.confirm_timeout,
        )
        .await?;
        let mut consumer = consume
            .basic_consume(
                cfg.topology.queue.as_str().into(),
                cfg.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(queue = %cfg.topology.queue, prefetch = cfg.prefetch, "consuming jobs");
        self.stats.set_ready(true);
        ready();

        let mut s = Session {
            cfg,
            consume,
            publisher,
            ledger: Ledger::default(),
            acks: AckPlanner::new((usize::from(cfg.prefetch) / 4).min(64)),
            ack_buf: Vec::new(),
        };
        let mut consuming = true;
        let mut drain_deadline: Option<Instant> = None;
        let result = loop {
            if !consuming && s.ledger.is_empty() && s.publisher.is_idle() {
                break Ok(SessionEnd::Drained);
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if consuming => {
                    consuming = false;
                    drain_deadline = Some(Instant::now() + cfg.shutdown_timeout);
                    tracing::info!(in_flight = s.ledger.len(), "stopping intake, letting in-flight jobs finish");
                    if let Err(e) = s.consume.basic_cancel(cfg.consumer_tag.as_str().into(), BasicCancelOptions::default()).await {
                        break Err(e.into());
                    }
                }
                _ = sleep_until(drain_deadline), if drain_deadline.is_some() => {
                    tracing::warn!(unfinished = s.ledger.len(),
                        "shutdown timeout: leaving unfinished jobs to the broker for redelivery");
                    break Ok(SessionEnd::Drained);
                }
                Some(batch) = self.outcomes.recv() => {
                    if let Err(e) = self.on_outcomes(&mut s, batch).await { break Err(e.into()) }
                }
                owner = s.publisher.confirmed(), if !s.publisher.is_idle() => match owner {
                    Ok(Some(owner)) => s.confirmed(&self.stats, owner),
                    Ok(None) => {}
                    Err(e) => break Err(e),
                },
                Some((event, waiter)) = self.requests.recv(), if consuming => {
                    if let Err(e) = s.publisher.publish(&event, Owner::Waiter(waiter)).await { break Err(e.into()) }
                }
                delivery = consumer.next(), if consuming => match delivery {
                    Some(Ok(first)) => {
                        let mut batch = vec![first];
                        while batch.len() < INTAKE_BATCH {
                            match futures_lite::future::poll_once(consumer.next()).await {
                                Some(Some(Ok(d))) => batch.push(d),
                                _ => break,
                            }
                        }
                        if let Err(e) = self.on_deliveries(&mut s, batch).await { break Err(e) }
                    }
                    Some(Err(e)) => break Err(e.into()),
                    None => break Err(AmqpError::ConsumerCancelled),
                },
            }
            if let Err(e) = s.flush_acks().await {
                break Err(e.into());
            }
        };
        self.stats.set_ready(false);
        if result.is_ok() {
            let _ = s.flush_acks().await;
            let _ = consume_conn.close(200, "bye".into()).await;
            let _ = publish_conn.close(200, "bye".into()).await;
        }
        result
    }

    async fn on_deliveries(
        &mut self,
        s: &mut Session<'_>,
        batch: Vec<Delivery>,
    ) -> Result<(), AmqpError> {
        let mut routed: HashMap<Arc<str>, Vec<Notification>> = HashMap::new();
        let consumed_at = Instant::now();
        for d in batch {
            self.stats.jobs_consumed.inc();
            let tag = d.delivery_tag;
            s.acks.delivered(tag);
            self.next_key += 1;
            let key = JobKey(self.next_key);
            let message_id = d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned());
            let job = match Job::decode(&d.data, message_id.as_deref()) {
                Ok(job) => job,
                Err(rejection) => {
                    s.reject(&self.stats, key, tag, rejection.error, d.data, rejection.id)
                        .await?;
                    continue;
                }
            };
            let app = job.app.as_deref().unwrap_or(&self.default_app);
            let Some(route) = self.routes.get(app) else {
                let error = JobError::UnknownApp(app.to_owned());
                let id = job.id.as_deref().map(str::to_owned);
                s.reject(&self.stats, key, tag, error, d.data, id).await?;
                continue;
            };
            s.ledger.open(key, tag, job.tokens.len() as u32, 0);
            let envelope = Arc::new(Envelope {
                key,
                id: job.id,
                app: route.name.clone(),
                payload: job.payload,
                expiry: job.expiry,
                priority: job.priority,
                consumed_at,
            });
            let list = routed.entry(route.name.clone()).or_default();
            list.extend(
                job.tokens
                    .into_iter()
                    .map(|t| Notification::new(envelope.clone(), t)),
            );
        }
        for (app, notifications) in routed {
            if let Some(route) = self.routes.get(&*app) {
                // Lanes close only when the daemon tears down; the jobs then come back.
                let _ = route.pool.submit(notifications).await;
            }
        }
        Ok(())
    }

    /// Handles `first` and whatever else the lanes reported meanwhile.
    async fn on_outcomes(
        &mut self,
        s: &mut Session<'_>,
        first: Vec<Outcome>,
    ) -> Result<(), lapin::Error> {
        let mut batch = first;
        for _ in 0..64 {
            self.on_outcome_batch(s, batch).await?;
            match self.outcomes.try_recv() {
                Ok(next) => batch = next,
                Err(_) => break,
            }
        }
        Ok(())
    }

    async fn on_outcome_batch(
        &mut self,
        s: &mut Session<'_>,
        batch: Vec<Outcome>,
    ) -> Result<(), lapin::Error> {
        for o in batch {
            let n = &o.notification;
            let env = &n.envelope;
            match o.result {
                Ok(()) => {
                    self.stats.accepted.inc();
                    self.stats.observe_accepted(env.consumed_at.elapsed());
                }
                Err(f) => self.stats.failed_with(f.reason.name()),
            }
            let event = match o.result {
                Ok(()) if s.cfg.delivered_results && !n.reported => Some(Event::Delivered {
                    app: env.app.clone(),
                    id: env.id.clone(),
                    token: n.token,
                }),
                Ok(()) => None,
                Err(f) => {
                    tracing::info!(app = %env.app, id = env.id.as_deref().unwrap_or(""), token = %n.token,
                        reason = f.reason.name(), attempts = f.attempts, "notification failed");
                    Some(Event::Failed {
                        app: env.app.clone(),
                        id: env.id.clone(),
                        token: n.token,
                        reason: f.reason,
                        attempts: f.attempts,
                    })
                }
            };
            let counted = !n.reported && s.ledger.contains(env.key);
            match (counted, event) {
                (true, Some(event)) => {
                    s.ledger.token_done(env.key, true);
                    s.publisher.publish(&event, Owner::Job(env.key)).await?;
                }
                (true, None) => {
                    if let Some(tag) = s.ledger.token_done(env.key, false) {
                        s.final_job(&self.stats, tag);
                    }
                }
                // A late failure of a notification whose job is final already.
                (false, Some(event @ Event::Failed { .. })) if n.reported => {
                    s.publisher.publish(&event, Owner::Nobody).await?;
                }
                // From a broken session: the job comes back by redelivery.
                _ => {}
            }
        }
        Ok(())
    }
}

impl Session<'_> {
    async fn reject(
        &mut self,
        stats: &Stats,
        key: JobKey,
        tag: u64,
        error: JobError,
        body: Vec<u8>,
        id: Option<String>,
    ) -> Result<(), lapin::Error> {
        stats.jobs_rejected.inc();
        tracing::warn!(id = id.as_deref().unwrap_or(""), %error, "rejected job");
        self.ledger.open(key, tag, 0, 1);
        let event = Event::Rejected {
            error: error.to_string(),
            body,
            id,
        };
        self.publisher.publish(&event, Owner::Job(key)).await
    }

    fn final_job(&mut self, stats: &Stats, tag: u64) {
        stats.jobs_acked.inc();
        self.acks.done(tag);
    }

    fn confirmed(&mut self, stats: &Stats, owner: Owner) {
        stats.results_published.inc();
        match owner {
            Owner::Job(key) => {
                if let Some(tag) = self.ledger.result_confirmed(key) {
                    self.final_job(stats, tag);
                }
            }
            Owner::Waiter(tx) => {
                let _ = tx.send(());
            }
            Owner::Nobody => {}
        }
    }

    async fn flush_acks(&mut self) -> Result<(), lapin::Error> {
        self.acks.take(&mut self.ack_buf);
        for ack in self.ack_buf.drain(..) {
            self.consume
                .basic_ack(
                    ack.tag,
                    BasicAckOptions {
                        multiple: ack.multiple,
                    },
                )
                .await?;
        }
        Ok(())
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
