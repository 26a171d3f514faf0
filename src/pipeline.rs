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
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Consumer;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, AmqpError, Owner, Publisher, Topology};
use crate::apns::pool::Pool;
use crate::apns::{Envelope, Failure, Notification, Outcome, Protocol, Reason, SessionEnded};
use crate::brokers::BrokerUris;
use crate::intake::Prefetch;
use crate::job::{Job, JobError, Tokens};
use crate::ledger::{Ack, AckPlanner, JobKey, Ledger, Progress};
use crate::metrics::Stats;
use crate::redelivery::{Identity, Recall};
use crate::results::Event;

/// Most deliveries taken in one go before routing them, so one-token jobs
/// travel to the lanes in batches.
const INTAKE_BATCH: usize = 256;
/// Notifications handed to the lanes at a time: a batch of fan-out jobs
/// would otherwise be expanded whole (a `Notification` per token) before the
/// first one is written.
const INTAKE_NOTIFICATIONS: usize = 16 * 1024;
/// Longest a final job waits for its ack behind a job still in flight (acks
/// then go one by one instead of one per run): a crash must redeliver only
/// jobs that were truly in flight.
const ACK_WAIT: Duration = Duration::from_millis(5);

/// An app as the router sees it.
pub struct Route {
    pub name: Arc<str>,
    pub pool: Pool,
    /// Decides the job limits (token length, payload size) checked at routing.
    pub protocol: Protocol,
}

/// A result someone outside the pipeline needs published (feedback), with a
/// channel that fires once the broker confirmed it.
pub type ResultRequest = (Event, oneshot::Sender<()>);

/// Broker settings of one session: a change to any of them needs a new session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// The broker nodes; the supervisor picks the one each session uses.
    pub uri: BrokerUris,
    pub topology: Topology,
    pub prefetch: u16,
    /// Most job body bytes held; the prefetch in force adapts under it (0: off).
    pub prefetch_bytes: u64,
    pub consumer_tag: String,
    pub confirm_timeout: Duration,
}

/// Settings that apply at once, without a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveSettings {
    pub delivered_results: bool,
    /// How long a drain (shutdown, or a session restart on reload) may take.
    pub shutdown_timeout: Duration,
    /// How long a job whose app is unusable waits in the retry queue.
    pub retry_delay: Duration,
    /// Tries of a job whose app stays unusable before its tokens fail.
    pub max_job_attempts: u32,
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
    pub session: Option<SessionConfig>,
    /// Fires once the change is in force.
    pub done: oneshot::Sender<()>,
}

/// What outlives a session: the routes, and the channels lanes and pollers report on.
pub struct Pipeline {
    pub routes: HashMap<Arc<str>, Route>,
    pub default_app: String,
    pub outcomes: mpsc::UnboundedReceiver<Vec<Outcome>>,
    pub requests: mpsc::Receiver<ResultRequest>,
    pub control: mpsc::Receiver<Reconfigure>,
    pub stats: Arc<Stats>,
    live: LiveSettings,
    /// Broker settings a reload asked for, in force from the next session.
    next_session: Option<SessionConfig>,
    /// Lane tasks of replaced or removed apps, still finishing their work.
    retired: Vec<JoinHandle<()>>,
    next_key: u64,
    /// Known outcomes of unfinished jobs, kept across sessions for their redelivery.
    recall: Recall,
}

/// How a session ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// Shutdown was asked for and everything in flight is final (or was left
    /// to the broker when the shutdown timeout ran out).
    Drained,
    /// A reload changed the broker settings; the session drained the same way.
    /// The new settings are in [`Pipeline::take_next_session`].
    Reconfigured,
}

struct Session {
    consume: lapin::Channel,
    publisher: Publisher,
    ledger: Ledger,
    acks: AckPlanner,
    ack_buf: Vec<Ack>,
    /// How long each job acked by the last flush had been final.
    ack_lags: Vec<Duration>,
    stats: Arc<Stats>,
    /// The pipeline's, lent for the session.
    recall: Recall,
    /// Set when the session ends, however it ends (see `Drop`): lanes then
    /// drop the unwritten notifications of its jobs, which the broker redelivers.
    ended: SessionEnded,
    /// `<queue>.retry`, where jobs of unusable apps wait.
    retry_queue: String,
}

/// The channels a pipeline listens on.
pub struct Inputs {
    pub outcomes: mpsc::UnboundedReceiver<Vec<Outcome>>,
    pub requests: mpsc::Receiver<ResultRequest>,
    pub control: mpsc::Receiver<Reconfigure>,
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
            routes: routes.into_iter().map(|r| (r.name.clone(), r)).collect(),
            default_app,
            outcomes: inputs.outcomes,
            requests: inputs.requests,
            control: inputs.control,
            stats,
            live,
            next_session: None,
            retired: Vec::new(),
            next_key: 0,
            recall: Recall::default(),
        }
    }

    /// Puts a reload in force. Returns whether the broker session must change.
    pub fn apply(&mut self, change: Reconfigure) -> bool {
        for route in change.upsert {
            if let Some(old) = self.routes.insert(route.name.clone(), route) {
                self.retired.extend(old.pool.close());
            }
        }
        for name in change.remove {
            if let Some(old) = self.routes.remove(name.as_str()) {
                self.retired.extend(old.pool.close());
            }
        }
        self.retired.retain(|t| !t.is_finished());
        self.default_app = change.default_app;
        self.live = change.live;
        if change.session.is_some() {
            self.next_session = change.session;
        }
        let _ = change.done.send(());
        self.next_session.is_some()
    }

    /// Broker settings a reload asked for, if any.
    pub fn take_next_session(&mut self) -> Option<SessionConfig> {
        self.next_session.take()
    }

    /// Every lane task, current and retired, for the final teardown.
    pub fn into_lane_tasks(self) -> Vec<JoinHandle<()>> {
        let mut tasks = self.retired;
        for (_, route) in self.routes {
            tasks.extend(route.pool.close());
        }
        tasks
    }

    /// Runs one broker session on the node at `uri` until shutdown has
    /// drained it or the broker fails. `ready` fires once the consumer is attached.
    pub async fn session(
        &mut self,
        cfg: &SessionConfig,
        uri: &str,
        shutdown: &CancellationToken,
        ready: impl FnOnce(),
    ) -> Result<SessionEnd, AmqpError> {
        let consume_conn = amqp::connect(uri, "apnsd-consume").await?;
        let publish_conn = amqp::connect(uri, "apnsd-publish").await?;
        let intake = Prefetch::new(cfg.prefetch, cfg.prefetch_bytes);
        let consume =
            amqp::consumer_channel(&consume_conn, &cfg.topology, intake.current()).await?;
        let publisher = Publisher::open(
            &publish_conn,
            &cfg.topology.results_exchange,
            cfg.confirm_timeout,
        )
        .await?;
        let mut sub =
            Subscription::start(&consume, &cfg.topology.queue, &cfg.consumer_tag, intake).await?;
        self.stats.prefetch.set(i64::from(intake.current()));
        tracing::info!(queue = %cfg.topology.queue, prefetch = intake.current(),
            max_prefetch = cfg.prefetch, prefetch_bytes = cfg.prefetch_bytes, "consuming jobs");
        self.stats.set_ready(true);
        ready();

        let mut s = Session {
            consume,
            publisher,
            ledger: Ledger::default(),
            // Lanes settle at different moments, so one lane's finished jobs
            // often wait behind another's for a tick: only a stuck delivery
            // holding half the prefetch is worth acking around one by one.
            acks: AckPlanner::new(usize::from(intake.current()) / 2, ACK_WAIT),
            ack_buf: Vec::new(),
            ack_lags: Vec::new(),
            stats: self.stats.clone(),
            recall: std::mem::take(&mut self.recall),
            ended: SessionEnded::default(),
            retry_queue: cfg.topology.retry_queue(),
        };
        let mut consuming = true;
        let mut drain_deadline: Option<Instant> = None;
        let mut restart = self.next_session.is_some();
        let end = || {
            if shutdown.is_cancelled() {
                SessionEnd::Drained
            } else {
                SessionEnd::Reconfigured
            }
        };
        let result = loop {
            if consuming && (restart || shutdown.is_cancelled()) {
                consuming = false;
                drain_deadline = Some(Instant::now() + self.live.shutdown_timeout);
                tracing::info!(
                    in_flight = s.ledger.len(),
                    "stopping intake, letting in-flight jobs finish"
                );
                if let Err(e) = sub.cancel(&s.consume).await {
                    break Err(e.into());
                }
            }
            if !consuming && s.ledger.is_empty() && s.publisher.is_idle() {
                break Ok(end());
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if consuming => {}
                // Final jobs waiting behind a pending one: acked after the loop.
                _ = sleep_until(s.acks.deadline()), if s.acks.deadline().is_some() => {}
                _ = sleep_until(drain_deadline), if drain_deadline.is_some() => {
                    tracing::warn!(unfinished = s.ledger.len(),
                        "drain timeout: leaving unfinished jobs to the broker for redelivery");
                    break Ok(end());
                }
                Some(change) = self.control.recv() => restart |= self.apply(change),
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
                // Before the current subscription's: the former's deliveries
                // have the lower tags, and acks are planned in tag order.
                delivery = next_delivery(&mut sub.former), if consuming => match delivery {
                    Some(Ok(d)) => if let Err(e) = self.on_deliveries(&mut s, vec![d]).await { break Err(e) },
                    Some(Err(e)) => break Err(e.into()),
                    None => sub.former = None,
                },
                delivery = sub.consumer.next(), if consuming => match delivery {
                    Some(Ok(first)) => {
                        let mut batch = vec![first];
                        while batch.len() < INTAKE_BATCH {
                            match futures_lite::future::poll_once(sub.consumer.next()).await {
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
            let held = (s.ledger.len(), s.ledger.held_bytes());
            if consuming {
                match sub.adapt(&s.consume, &cfg.topology.queue, held).await {
                    Ok(Some(prefetch)) => {
                        s.acks.set_slack(usize::from(prefetch) / 2);
                        self.stats.prefetch.set(i64::from(prefetch));
                    }
                    Ok(None) => {}
                    Err(e) => break Err(e.into()),
                }
            }
            self.stats.jobs_in_flight.set(held.0 as i64);
            self.stats.job_bytes_held.set(held.1 as i64);
        };
        // However the session ended, its unfinished jobs come back.
        self.recall = std::mem::take(&mut s.recall);
        self.recall.session_lost();
        self.stats.set_ready(false);
        self.stats.jobs_in_flight.set(0);
        self.stats.job_bytes_held.set(0);
        self.stats.prefetch.set(0);
        if result.is_ok() {
            let _ = s.flush_acks().await;
            let _ = consume_conn.close(200, "bye".into()).await;
            let _ = publish_conn.close(200, "bye".into()).await;
        }
        result
    }

    async fn on_deliveries(
        &mut self,
        s: &mut Session,
        batch: Vec<Delivery>,
    ) -> Result<(), AmqpError> {
        // Decode the whole batch first: a job's compact tokens cost far less
        // than its JSON body, which is freed as soon as it is read.
        let mut jobs = Vec::with_capacity(batch.len());
        let consumed_at = Instant::now();
        for d in batch {
            self.stats.jobs_consumed.inc();
            if d.redelivered {
                self.stats.jobs_redelivered.inc();
            }
            let tag = d.delivery_tag;
            s.acks.delivered(tag);
            self.next_key += 1;
            let key = JobKey(self.next_key);
            let message_id = d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned());
            let mut job = match Job::decode(&d.data, message_id.as_deref()) {
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
            if let Err(error) = job.check(route.protocol) {
                let id = job.id.as_deref().map(str::to_owned);
                s.reject(&self.stats, key, tag, error, d.data, id).await?;
                continue;
            }
            // A job redelivered after a lost session of this process sends
            // only the tokens without a known outcome, and publishes the
            // known outcomes' results again (they may not have been confirmed).
            let mut republish = Vec::new();
            if d.redelivered {
                let identity =
                    Identity::of(job.id.as_deref(), &route.name, &job.payload, &job.tokens);
                if let Some(known) = s.recall.redelivered(key, identity) {
                    let (left, skipped) = known.remaining(&job.tokens);
                    self.stats.skipped_after_redelivery.add(skipped);
                    republish = known.results().to_vec();
                    job.tokens = left;
                }
            }
            if job.tokens.is_empty() && republish.is_empty() {
                s.recall.finished(key);
                s.final_job(&self.stats, tag);
                continue;
            }
            let count = job.tokens.len();
            s.ledger.open(
                key,
                tag,
                body_len(&d.data),
                count as u32,
                republish.len() as u32,
            );
            for event in &republish {
                s.publisher.publish(event, Owner::Job(key)).await?;
            }
            if count == 0 {
                continue;
            }
            let envelope = Arc::new(Envelope {
                key,
                tokens: job.tokens,
                id: job.id,
                app: route.name.clone(),
                payload: job.payload,
                expiry: job.expiry,
                priority: job.priority,
                push_type: job.push_type,
                collapse_id: job.collapse_id,
                consumed_at,
                session: s.ended.clone(),
                retries: amqp::attempts(&d.properties),
            });
            jobs.push(envelope);
        }
        let mut routed: HashMap<Arc<str>, Vec<Notification>> = HashMap::new();
        let mut pending = 0;
        for envelope in jobs {
            let count = envelope.tokens.len();
            let mut next = 0;
            while next < count {
                let end = count.min(next + INTAKE_NOTIFICATIONS - pending);
                let list = routed.entry(envelope.app.clone()).or_default();
                list.extend((next..end).map(|i| Notification::new(envelope.clone(), i as u32)));
                pending += end - next;
                next = end;
                if pending >= INTAKE_NOTIFICATIONS {
                    self.submit(s, &mut routed).await?;
                    pending = 0;
                }
            }
        }
        Ok(self.submit(s, &mut routed).await?)
    }

    /// Hands what `on_deliveries` decoded to the lanes. While a lane is full,
    /// outcomes keep being handled: the lanes free their windows into them, and
    /// left waiting they would pile up without bound.
    async fn submit(
        &mut self,
        s: &mut Session,
        routed: &mut HashMap<Arc<str>, Vec<Notification>>,
    ) -> Result<(), lapin::Error> {
        for (app, notifications) in routed.drain() {
            let Some(route) = self.routes.get(&*app) else {
                continue;
            };
            let mut send = std::pin::pin!(route.pool.submit(notifications));
            loop {
                tokio::select! {
                    biased;
                    // Lanes close only when the daemon tears down; the jobs then come back.
                    _ = &mut send => break,
                    Some(batch) = self.outcomes.recv() => {
                        Self::on_outcome_batch(&self.stats, &self.live, s, batch).await?;
                        s.flush_acks().await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Handles `first` and whatever else the lanes reported meanwhile.
    async fn on_outcomes(
        &mut self,
        s: &mut Session,
        first: Vec<Outcome>,
    ) -> Result<(), lapin::Error> {
        let mut batch = first;
        for _ in 1..64 {
            Self::on_outcome_batch(&self.stats, &self.live, s, batch).await?;
            match self.outcomes.try_recv() {
                Ok(next) => batch = next,
                Err(_) => return Ok(()),
            }
        }
        // The last batch taken is handled too: dropping it would lose outcomes.
        Self::on_outcome_batch(&self.stats, &self.live, s, batch).await
    }

    async fn on_outcome_batch(
        stats: &Stats,
        live: &LiveSettings,
        s: &mut Session,
        batch: Vec<Outcome>,
    ) -> Result<(), lapin::Error> {
        let now = Instant::now();
        let mut accepted = 0;
        // Consecutive silent acceptances of one job (a fan-out job's tokens
        // settle together) are counted in the ledger with one lookup.
        let mut run: Option<(Arc<Envelope>, u32)> = None;
        for o in batch {
            let n = &o.notification;
            let env = &n.envelope;
            let in_run = run.as_ref().is_some_and(|(e, _)| e.key == env.key);
            let counted = !n.reported && (in_run || s.ledger.contains(env.key));
            if let (true, Err(f)) = (counted, o.result) {
                if matches!(f.reason, Reason::Unusable(_))
                    && env.retries + 1 < live.max_job_attempts
                {
                    let progress = s.ledger.token_deferred(env.key, n.token());
                    s.progress(stats, env, progress, live.retry_delay).await?;
                    continue;
                }
            }
            match o.result {
                Ok(()) => {
                    accepted += 1;
                    stats.observe_accepted(now.saturating_duration_since(env.consumed_at));
                }
                Err(f) => stats.failed_with(f.reason.name()),
            }
            let event = match o.result {
                Ok(()) if live.delivered_results && !n.reported => Some(Event::Delivered {
                    app: env.app.clone(),
                    id: env.id.clone(),
                    token: n.token(),
                }),
                Ok(()) => None,
                Err(f) => {
                    // A daemon-side failure counts the job's tries, not the gateway's.
                    let attempts = match f.reason {
                        Reason::Unusable(_) => u8::try_from(env.retries + 1).unwrap_or(u8::MAX),
                        _ => f.attempts,
                    };
                    tracing::info!(app = %env.app, id = env.id.as_deref().unwrap_or(""), token = %n.token(),
                        reason = f.reason.name(), attempts, "notification failed");
                    Some(Event::Failed {
                        app: env.app.clone(),
                        id: env.id.clone(),
                        token: n.token(),
                        reason: f.reason,
                        attempts,
                    })
                }
            };
            // HTTP/2's 410 also says since when the token is gone, as the
            // feedback service did: the job owes an `unregistered` result too.
            let unregistered = match o.result {
                Err(Failure {
                    reason: Reason::Unregistered { since },
                    ..
                }) => Some(Event::Unregistered {
                    app: env.app.clone(),
                    token: n.token(),
                    timestamp: since,
                }),
                _ => None,
            };
            match (counted, event) {
                (true, Some(event)) => {
                    let results = 1 + u32::from(unregistered.is_some());
                    let progress = s.ledger.token_done(env.key, results);
                    if progress == Progress::Open {
                        for e in std::iter::once(&event).chain(&unregistered) {
                            let known = Some(e.clone());
                            s.recall
                                .outcome(env.key, false, || identity(env), n.token(), known);
                        }
                    }
                    s.publisher.publish(&event, Owner::Job(env.key)).await?;
                    if let Some(event) = unregistered {
                        s.publisher.publish(&event, Owner::Job(env.key)).await?;
                    }
                    s.progress(stats, env, progress, live.retry_delay).await?;
                }
                (true, None) => {
                    // A one-token job is final with this outcome: nothing to note.
                    if env.tokens.len() > 1 {
                        s.recall
                            .outcome(env.key, false, || identity(env), n.token(), None);
                    }
                    match &mut run {
                        Some((_, count)) if in_run => *count += 1,
                        _ => {
                            let previous = run.replace((n.envelope.clone(), 1));
                            s.accepted_run(stats, live.retry_delay, previous).await?;
                        }
                    }
                }
                // A late failure of a notification whose job is final already.
                (false, Some(event @ Event::Failed { .. })) if n.reported => {
                    s.publisher.publish(&event, Owner::Nobody).await?;
                }
                // From a broken session: the job comes back by redelivery and
                // sends this one again.
                (false, None) if o.result.is_ok() && !n.reported => {
                    stats.accepted_after_session_loss.inc();
                    s.recall
                        .outcome(env.key, true, || identity(env), n.token(), None);
                }
                // Final after its session ended: the redelivered job publishes its results.
                (false, Some(event)) if !n.reported && env.session.get() => {
                    for e in std::iter::once(event).chain(unregistered) {
                        s.recall
                            .outcome(env.key, true, || identity(env), n.token(), Some(e));
                    }
                }
                _ => {}
            }
        }
        s.accepted_run(stats, live.retry_delay, run).await?;
        stats.accepted.add(accepted);
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.ended.set();
    }
}

impl Session {
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
        self.ledger.open(key, tag, body_len(&body), 0, 1);
        let event = Event::Rejected {
            error: error.to_string(),
            body,
            id,
        };
        self.publisher.publish(&event, Owner::Job(key)).await
    }

    /// `run` counts tokens of one job that ended without a result to publish.
    async fn accepted_run(
        &mut self,
        stats: &Stats,
        retry_delay: Duration,
        run: Option<(Arc<Envelope>, u32)>,
    ) -> Result<(), lapin::Error> {
        let Some((env, n)) = run else {
            return Ok(());
        };
        let progress = self.ledger.tokens_accepted(env.key, n);
        self.progress(stats, &env, progress, retry_delay).await
    }

    /// Acts on where a job stands: ack it, or park its deferred tokens in the
    /// retry queue (the job is final once that publish is confirmed).
    async fn progress(
        &mut self,
        stats: &Stats,
        env: &Envelope,
        progress: Progress,
        retry_delay: Duration,
    ) -> Result<(), lapin::Error> {
        match progress {
            Progress::Open => Ok(()),
            Progress::Final(tag) => {
                self.recall.finished(env.key);
                self.final_job(stats, tag);
                Ok(())
            }
            Progress::Retry(tokens) => self.retry(stats, env, tokens, retry_delay).await,
        }
    }

    async fn retry(
        &mut self,
        stats: &Stats,
        env: &Envelope,
        tokens: Tokens,
        delay: Duration,
    ) -> Result<(), lapin::Error> {
        stats.jobs_deferred.inc();
        let attempts = env.retries + 1;
        tracing::warn!(app = %env.app, id = env.id.as_deref().unwrap_or(""), tokens = tokens.len(), attempts,
            retry_in = ?delay, "app unusable: job parked in the retry queue");
        let body = Job {
            id: env.id.clone(),
            app: Some(env.app.to_string()),
            tokens,
            payload: env.payload.clone(),
            expiry: env.expiry,
            priority: env.priority,
            push_type: env.push_type.clone(),
            collapse_id: env.collapse_id.clone(),
        }
        .encode();
        let owner = Owner::Job(env.key);
        self.publisher
            .publish_retry(&self.retry_queue, body, attempts, delay, owner)
            .await
    }

    fn final_job(&mut self, stats: &Stats, tag: u64) {
        stats.jobs_acked.inc();
        self.acks.done(tag, Instant::now());
    }

    fn confirmed(&mut self, stats: &Stats, owner: Owner) {
        stats.results_published.inc();
        match owner {
            Owner::Job(key) => {
                if let Some(tag) = self.ledger.result_confirmed(key) {
                    self.recall.finished(key);
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
        self.acks
            .take(Instant::now(), &mut self.ack_buf, &mut self.ack_lags);
        for lag in self.ack_lags.drain(..) {
            self.stats.observe_ack_lag(lag);
        }
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

/// Names a job across deliveries, for [`Recall`].
fn identity(env: &Envelope) -> Identity {
    Identity::of(env.id.as_deref(), &env.app, &env.payload, &env.tokens)
}

/// A body's size as the ledger counts it (RabbitMQ caps messages far below 4 GiB).
fn body_len(body: &[u8]) -> u32 {
    u32::try_from(body.len()).unwrap_or(u32::MAX)
}

/// A session's subscription to the jobs queue, made again whenever the
/// intake policy asks for another prefetch.
struct Subscription {
    consumer: Consumer,
    /// The former subscription, cancelled, still handing over what the broker
    /// sent it before the cancel took effect.
    former: Option<Consumer>,
    /// `amqp.consumer_tag`; later subscriptions add `.1`, `.2`, ...
    base: String,
    tag: String,
    made: u32,
    prefetch: Prefetch,
}

impl Subscription {
    async fn start(
        channel: &lapin::Channel,
        queue: &str,
        tag: &str,
        prefetch: Prefetch,
    ) -> Result<Self, lapin::Error> {
        Ok(Subscription {
            consumer: subscribe(channel, queue, tag).await?,
            former: None,
            base: tag.to_owned(),
            tag: tag.to_owned(),
            made: 0,
            prefetch,
        })
    }

    /// Subscribes again when the policy wants another prefetch for the jobs
    /// and bytes `held`; returns the new prefetch. Waits while the former
    /// subscription still hands over deliveries.
    async fn adapt(
        &mut self,
        channel: &lapin::Channel,
        queue: &str,
        held: (usize, u64),
    ) -> Result<Option<u16>, lapin::Error> {
        if self.former.is_some() {
            return Ok(None);
        }
        let Some(prefetch) = self.prefetch.next(held.0, held.1) else {
            return Ok(None);
        };
        // Cancel first: the broker never has two subscriptions' worth out to us.
        self.cancel(channel).await?;
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await?;
        self.made += 1;
        let tag = format!("{}.{}", self.base, self.made);
        let next = subscribe(channel, queue, &tag).await?;
        self.former = Some(std::mem::replace(&mut self.consumer, next));
        self.tag = tag;
        self.prefetch.set(prefetch);
        tracing::debug!(
            prefetch,
            held_jobs = held.0,
            held_bytes = held.1,
            "prefetch adapted"
        );
        Ok(Some(prefetch))
    }

    async fn cancel(&self, channel: &lapin::Channel) -> Result<(), lapin::Error> {
        channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await
    }
}

async fn subscribe(
    channel: &lapin::Channel,
    queue: &str,
    tag: &str,
) -> Result<Consumer, lapin::Error> {
    channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// The next delivery of `consumer`, or never when there is none.
async fn next_delivery(consumer: &mut Option<Consumer>) -> Option<Result<Delivery, lapin::Error>> {
    match consumer {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
