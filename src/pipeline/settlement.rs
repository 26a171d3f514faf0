//! Settlement: where an APNs outcome becomes broker work. It owns the ledger
//! (where every job stands), the ack planner and the results publisher, so
//! a job is acked only once its results are confirmed, and a job whose app
//! is unusable is parked in the retry queue. One task owns it: no lock per job.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::BasicAckOptions;

use tokio::sync::oneshot;

use crate::amqp::{AmqpError, Confirmed, Owner, Publisher};
use crate::apns::{Envelope, Failure, Notification, Outcome, Reason, Recipient, Withdrawal};
use crate::job::{Job, JobError, JobKey};
use crate::ledger::{Ack, AckPlanner, Ledger, Progress, Unacked};
use crate::metrics::Stats;
use crate::redelivery::{Identity, Positions, Recall};
use crate::results::Event;
use crate::token::Tokens;

/// Longest a final job waits for its ack behind a job still in flight (acks
/// then go one by one instead of one per run): a crash must redeliver only
/// jobs that were truly in flight.
const ACK_WAIT: Duration = Duration::from_millis(5);

/// Most results awaiting the broker's confirm before the settlement stops
/// taking outcomes and the intake stops handing notifications to the lanes.
/// Without it one fan-out job's results all wait at once (a 100,000-token job
/// with `delivered` results held 150 MB); with it memory follows this bound,
/// and the broker still has results enough in flight to confirm in batches.
/// Outcomes taken in one go may overshoot it by a few lane windows.
pub const MAX_UNCONFIRMED: usize = 10_000;

/// How often a warning about unroutable results is logged at most: a results
/// exchange with no queue bound returns every result.
const UNROUTABLE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Settings that apply at once, without a new broker session.
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

/// What a redelivered job still sends.
pub enum Redelivered {
    /// Its tokens, but for these positions (their outcomes are known).
    Send(Option<Positions>),
    /// None: every outcome is known (the job may still wait for results).
    Nothing,
}

/// The jobs of one broker session, from consumed to acked. Its acks and
/// results go over that session's channels, so it ends with the session.
pub struct Settlement {
    consume: lapin::Channel,
    publisher: Publisher,
    ledger: Ledger,
    acks: AckPlanner,
    ack_buf: Vec<Ack>,
    /// How long each job acked by the last flush had been final.
    ack_lags: Vec<Duration>,
    /// Known outcomes of unfinished jobs: the pipeline's, lent for the
    /// session and handed back by [`Settlement::end`].
    recall: Recall,
    /// Set when the session ends, however it ends (see `Drop`): lanes then
    /// drop the unwritten notifications of its jobs, which the broker redelivers.
    withdrawal: Withdrawal,
    /// `<queue>.retry`, where jobs of unusable apps wait.
    retry_queue: String,
    live: LiveSettings,
    stats: Arc<Stats>,
    /// Outcomes taken from the lanes while over [`MAX_UNCONFIRMED`].
    parked: VecDeque<Outcome>,
    /// When an unroutable result was last logged, and how many came since.
    unroutable_logged: Option<Instant>,
    unroutable_quiet: u64,
}

impl Drop for Settlement {
    fn drop(&mut self) {
        self.withdrawal.withdraw();
    }
}

impl Settlement {
    pub fn new(
        consume: lapin::Channel,
        publisher: Publisher,
        prefetch: u16,
        retry_queue: String,
        live: LiveSettings,
        stats: Arc<Stats>,
        recall: Recall,
    ) -> Self {
        Settlement {
            consume,
            publisher,
            ledger: Ledger::default(),
            // Lanes settle at different moments, so one lane's finished jobs
            // often wait behind another's for a tick: only a stuck delivery
            // holding half the prefetch is worth acking around one by one.
            acks: AckPlanner::new(usize::from(prefetch) / 2, ACK_WAIT),
            ack_buf: Vec::new(),
            ack_lags: Vec::new(),
            recall,
            withdrawal: Withdrawal::default(),
            retry_queue,
            live,
            stats,
            parked: VecDeque::new(),
            unroutable_logged: None,
            unroutable_quiet: 0,
        }
    }

    /// The session ended, however it ended: its envelopes are withdrawn, and
    /// what is known of its unfinished jobs goes back for their redelivery.
    pub fn end(mut self) -> Recall {
        let mut recall = std::mem::take(&mut self.recall);
        // Outcomes parked behind the bound of unconfirmed results are final
        // all the same: the redelivered jobs must not send them again.
        for o in std::mem::take(&mut self.parked) {
            let env = &o.notification.envelope;
            let deferred = matches!(&o.result, Err(f) if matches!(f.reason, Reason::Unusable(_)))
                && env.retries + 1 < self.live.max_job_attempts;
            if o.correction || deferred {
                continue;
            }
            let over = !self.ledger.contains(env.key);
            let index = o.notification.index;
            let (event, unregistered) = results_of(&o, self.live.delivered_results);
            // As when settled: a result of a job already final is not news.
            if over && event.is_some() && !env.withdrawal.is_withdrawn() {
                continue;
            }
            if event.is_none() {
                recall.outcome(env.key, over, || identity(env), index, None);
            }
            for e in event.into_iter().chain(unregistered) {
                recall.outcome(env.key, over, || identity(env), index, Some(e));
            }
        }
        recall.session_lost();
        recall
    }

    /// The flag the session's envelopes carry.
    pub fn withdrawal(&self) -> Withdrawal {
        self.withdrawal.clone()
    }

    /// A delivery arrived: its tag joins the ack plan in order.
    pub fn delivered(&mut self, tag: u64) {
        self.acks.delivered(tag);
    }

    /// A job goes to the lanes: `tokens` outcomes will settle it.
    pub fn open(&mut self, key: JobKey, tag: u64, body: &[u8], tokens: u32) {
        self.ledger.open(key, tag, body_len(body), tokens, 0);
    }

    /// A job the broker redelivered. When a lost session of this process knew
    /// outcomes of its tokens, those tokens are not sent again and their
    /// results are published again (the broker may not have confirmed them).
    /// Opens the job for the tokens left; says which positions of `job` to
    /// skip, or that nothing is left to send.
    pub async fn open_redelivered(
        &mut self,
        key: JobKey,
        tag: u64,
        body: &[u8],
        app: &str,
        job: &Job,
    ) -> Result<Redelivered, lapin::Error> {
        let identity = Identity::of(job.id.as_deref(), app, &job.payload, &job.tokens);
        let Some(known) = self.recall.redelivered(key, identity) else {
            self.open(key, tag, body, job.tokens.len() as u32);
            return Ok(Redelivered::Send(None));
        };
        let left = known.remaining(job.tokens.len());
        let skipped = job.tokens.len() - left;
        self.stats.skipped_after_redelivery.add(skipped as u64);
        let results = known.results();
        if left == 0 && results.is_empty() {
            self.recall.finished(key);
            self.final_job(tag);
            return Ok(Redelivered::Nothing);
        }
        let tokens = left as u32;
        self.ledger
            .open(key, tag, body_len(body), tokens, results.len() as u32);
        let republish = results.iter().map(|e| (e.clone(), Owner::Job(key)));
        self.publisher.publish_all(republish.collect()).await?;
        self.stats
            .results_unconfirmed
            .set(self.publisher.unconfirmed() as i64);
        if tokens == 0 {
            return Ok(Redelivered::Nothing);
        }
        let skip = (skipped > 0).then(|| known.into_positions());
        Ok(Redelivered::Send(skip))
    }

    /// A new subscription took over with `prefetch`: the slack of the ack
    /// plan follows it, and its deliveries are counted apart from here on.
    pub fn resubscribed(&mut self, prefetch: u16) {
        self.acks.set_slack(usize::from(prefetch) / 2);
        self.acks.resubscribed();
    }

    /// `tag` came from the current subscription (the first one it sends
    /// marks where its deliveries start).
    pub fn current_starts(&mut self, tag: u64) {
        self.acks.current_starts(tag);
    }

    /// Deliveries not acked yet, for the intake policy and the gauges.
    pub fn unacked(&self) -> Unacked {
        self.acks.unacked()
    }

    /// The jobs held and their bytes, for the intake policy and the gauges.
    pub fn held(&self) -> (usize, u64) {
        (self.ledger.len(), self.ledger.held_bytes())
    }

    /// A reload changed the settings that apply at once.
    pub fn set_live(&mut self, live: LiveSettings) {
        self.live = live;
    }

    /// Publishes a result for someone outside the pipeline (feedback), whose
    /// `waiter` hears once the broker confirmed it.
    pub async fn publish_for(
        &mut self,
        event: Event,
        waiter: oneshot::Sender<()>,
    ) -> Result<(), lapin::Error> {
        self.publish(event, Owner::Waiter(waiter)).await
    }

    async fn publish(&mut self, event: Event, owner: Owner) -> Result<(), lapin::Error> {
        self.publisher.publish(event, owner).await?;
        self.stats
            .results_unconfirmed
            .set(self.publisher.unconfirmed() as i64);
        Ok(())
    }

    /// Too many results await their confirm: take no more outcomes (and hand
    /// the lanes no more work) until confirms come in.
    pub fn backlogged(&self) -> bool {
        !self.parked.is_empty() || self.publisher.unconfirmed() >= MAX_UNCONFIRMED
    }

    /// Waits for the next confirm and settles whom it concerns; once half
    /// the bound is free, parked outcomes go on.
    pub async fn settle_next_confirm(&mut self) -> Result<(), AmqpError> {
        if let Some(confirmed) = self.publisher.confirmed().await? {
            self.confirmed(confirmed);
        }
        if !self.parked.is_empty() && self.publisher.unconfirmed() <= MAX_UNCONFIRMED / 2 {
            self.resume().await?;
        }
        self.stats
            .results_unconfirmed
            .set(self.publisher.unconfirmed() as i64);
        Ok(())
    }

    /// Settles the outcomes of `batch` while the bound of unconfirmed results
    /// allows; the rest wait, as outcomes (far smaller than their results),
    /// for confirms. A lane reports a whole settled window at once, so a
    /// batch alone can be a fan-out job's every token.
    pub async fn on_outcome_batch(&mut self, batch: Vec<Outcome>) -> Result<(), lapin::Error> {
        if self.parked.is_empty() && self.room() >= batch.len() {
            return self.settle_outcomes(batch).await;
        }
        self.parked.extend(batch);
        self.resume().await
    }

    /// Results that may still be published before the bound.
    fn room(&self) -> usize {
        MAX_UNCONFIRMED.saturating_sub(self.publisher.unconfirmed())
    }

    async fn resume(&mut self) -> Result<(), lapin::Error> {
        while !self.parked.is_empty() && self.room() > 0 {
            let n = self.room().min(self.parked.len());
            let chunk: Vec<Outcome> = self.parked.drain(..n).collect();
            self.settle_outcomes(chunk).await?;
        }
        Ok(())
    }

    /// Whether results await the broker's confirm.
    pub fn confirming(&self) -> bool {
        !self.publisher.is_idle()
    }

    /// Nothing left to settle: every job final, every result confirmed.
    pub fn is_settled(&self) -> bool {
        self.ledger.is_empty() && self.publisher.is_idle() && self.parked.is_empty()
    }

    async fn settle_outcomes(&mut self, batch: Vec<Outcome>) -> Result<(), lapin::Error> {
        let now = Instant::now();
        let mut accepted = 0;
        // Consecutive silent acceptances of one job (a fan-out job's tokens
        // settle together) are counted in the ledger with one lookup.
        let mut run: Option<(Arc<Envelope>, u32)> = None;
        // The batch's results, published together once it is settled.
        let mut outbox = Vec::new();
        for o in batch {
            let n = &o.notification;
            let env = &n.envelope;
            if o.correction {
                // Counted against its job already, which may be final: only a
                // failure is news, published on its own. Its acceptance was
                // counted when first reported: a resend accepted again (after
                // an error that came past the settle time) is not a second one.
                match o.result {
                    Ok(()) => {}
                    Err(f) => {
                        self.stats.failed_with(f.reason.name());
                        outbox.push((failed(env, n, f), Owner::Nobody));
                    }
                }
                continue;
            }
            let in_run = run.as_ref().is_some_and(|(e, _)| e.key == env.key);
            let counted = in_run || self.ledger.contains(env.key);
            if let (true, Err(f)) = (counted, o.result) {
                if matches!(f.reason, Reason::Unusable(_))
                    && env.retries + 1 < self.live.max_job_attempts
                {
                    let progress = self.ledger.token_deferred(env.key, n.token());
                    self.progress(env, progress).await?;
                    continue;
                }
            }
            match o.result {
                Ok(()) => {
                    accepted += 1;
                    self.stats
                        .observe_accepted(now.saturating_duration_since(env.consumed_at));
                }
                Err(f) => self.stats.failed_with(f.reason.name()),
            }
            let (event, unregistered) = results_of(&o, self.live.delivered_results);
            match (counted, event) {
                (true, Some(event)) => {
                    let results = 1 + u32::from(unregistered.is_some());
                    let progress = self.ledger.token_done(env.key, results);
                    if progress == Progress::Open {
                        for e in std::iter::once(&event).chain(&unregistered) {
                            let known = Some(e.clone());
                            self.recall
                                .outcome(env.key, false, || identity(env), n.index, known);
                        }
                    }
                    outbox.push((event, Owner::Job(env.key)));
                    if let Some(event) = unregistered {
                        outbox.push((event, Owner::Job(env.key)));
                    }
                    self.progress(env, progress).await?;
                }
                (true, None) => {
                    // A one-token job is final with this outcome: nothing to note.
                    if env.job.tokens.len() > 1 {
                        self.recall
                            .outcome(env.key, false, || identity(env), n.index, None);
                    }
                    match &mut run {
                        Some((_, count)) if in_run => *count += 1,
                        _ => {
                            let previous = run.replace((n.envelope.clone(), 1));
                            self.accepted_run(previous).await?;
                        }
                    }
                }
                // From a broken session: the job comes back by redelivery,
                // which skips this token (this process remembers it).
                (false, None) => {
                    self.stats.accepted_after_session_loss.inc();
                    self.recall
                        .outcome(env.key, true, || identity(env), n.index, None);
                }
                // Final after its session ended: the redelivered job publishes its results.
                (false, Some(event)) if env.withdrawal.is_withdrawn() => {
                    for e in std::iter::once(event).chain(unregistered) {
                        self.recall
                            .outcome(env.key, true, || identity(env), n.index, Some(e));
                    }
                }
                (false, Some(_)) => {}
            }
        }
        self.accepted_run(run).await?;
        self.stats.accepted.add(accepted);
        self.publisher.publish_all(outbox).await?;
        self.stats
            .results_unconfirmed
            .set(self.publisher.unconfirmed() as i64);
        Ok(())
    }

    /// A job that cannot be sent: its `rejected` result settles it.
    pub async fn reject(
        &mut self,
        key: JobKey,
        tag: u64,
        error: JobError,
        body: Vec<u8>,
        id: Option<String>,
    ) -> Result<(), lapin::Error> {
        self.stats.jobs_rejected.inc();
        tracing::warn!(id = id.as_deref().unwrap_or(""), %error, "rejected job");
        self.ledger.open(key, tag, body_len(&body), 0, 1);
        let event = Event::Rejected {
            error: error.to_string(),
            body,
            id,
        };
        self.publish(event, Owner::Job(key)).await
    }

    /// `run` counts tokens of one job that ended without a result to publish.
    async fn accepted_run(
        &mut self,
        run: Option<(Arc<Envelope>, u32)>,
    ) -> Result<(), lapin::Error> {
        let Some((env, n)) = run else {
            return Ok(());
        };
        let progress = self.ledger.tokens_accepted(env.key, n);
        self.progress(&env, progress).await
    }

    /// Acts on where a job stands: ack it, or park its deferred tokens in the
    /// retry queue (the job is final once that publish is confirmed).
    async fn progress(&mut self, env: &Envelope, progress: Progress) -> Result<(), lapin::Error> {
        match progress {
            Progress::Open => Ok(()),
            Progress::Final(tag) => {
                self.recall.finished(env.key);
                self.final_job(tag);
                Ok(())
            }
            Progress::Retry(tokens) => self.retry(env, tokens).await,
        }
    }

    async fn retry(&mut self, env: &Envelope, tokens: Tokens) -> Result<(), lapin::Error> {
        let delay = self.live.retry_delay;
        self.stats.jobs_deferred.inc();
        let attempts = env.retries + 1;
        tracing::warn!(app = %env.app, id = env.job.id.as_deref().unwrap_or(""), tokens = tokens.len(), attempts,
            retry_in = ?delay, "app unusable: job parked in the retry queue");
        // The deferred tokens only, on the app the job was routed to.
        let job = &env.job;
        let body = Job {
            id: job.id.clone(),
            app: Some(env.app.to_string()),
            tokens,
            payload: job.payload.clone(),
            expiry: job.expiry,
            priority: job.priority,
            push_type: job.push_type.clone(),
            collapse_id: job.collapse_id.clone(),
            channel: job.channel.clone(),
        }
        .encode();
        let owner = Owner::Job(env.key);
        self.publisher
            .publish_retry(&self.retry_queue, body, attempts, delay, owner)
            .await
    }

    fn final_job(&mut self, tag: u64) {
        self.stats.jobs_acked.inc();
        self.acks.done(tag, Instant::now());
    }

    /// The broker confirmed a result: the job it settles may be final. A
    /// result it returned unrouted is final too: it is counted and logged, not
    /// published again (no queue would take it).
    fn confirmed(&mut self, Confirmed { owner, unroutable }: Confirmed) {
        match unroutable {
            Some(routing_key) => self.unroutable(&routing_key),
            None => self.stats.results_published.inc(),
        }
        match owner {
            Owner::Job(key) => {
                if let Some(tag) = self.ledger.result_confirmed(key) {
                    self.recall.finished(key);
                    self.final_job(tag);
                }
            }
            Owner::Waiter(tx) => {
                let _ = tx.send(());
            }
            Owner::Nobody => {}
        }
    }

    /// When final jobs waiting behind one in flight are due for their ack:
    /// the session wakes up then to flush them.
    pub fn ack_deadline(&self) -> Option<Instant> {
        self.acks.deadline()
    }

    fn unroutable(&mut self, routing_key: &str) {
        let count = self.stats.result_unroutable(routing_key);
        let now = Instant::now();
        if self
            .unroutable_logged
            .is_some_and(|at| now.duration_since(at) < UNROUTABLE_LOG_EVERY)
        {
            self.unroutable_quiet += 1;
            return;
        }
        tracing::warn!(
            exchange = self.publisher.exchange(),
            routing_key,
            count,
            unlogged_since_last = self.unroutable_quiet,
            "results dropped: no queue is bound to the results exchange for this routing key"
        );
        self.unroutable_logged = Some(now);
        self.unroutable_quiet = 0;
    }

    /// Ends the session's publishing (its acks go on the consume channel).
    pub async fn close(&self) {
        self.publisher.close().await;
    }

    pub async fn flush_acks(&mut self) -> Result<(), lapin::Error> {
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

/// The `failed` result of `n`, logged.
fn failed(env: &Envelope, n: &Notification, f: Failure) -> Event {
    // A daemon-side failure counts the job's tries, not the gateway's.
    let attempts = match f.reason {
        Reason::Unusable(_) => u8::try_from(env.retries + 1).unwrap_or(u8::MAX),
        _ => f.attempts,
    };
    let to = n.recipient();
    let id = env.job.id.as_deref().unwrap_or("");
    let reason = f.reason.name();
    match &to {
        Recipient::Device(token) => tracing::info!(app = %env.app, id, token = %token,
            reason, attempts, "notification failed"),
        Recipient::Channel(channel) => tracing::info!(app = %env.app, id, channel = %channel,
            reason, attempts, "broadcast failed"),
    }
    Event::Failed {
        app: env.app.clone(),
        id: env.job.id.clone(),
        to,
        reason: f.reason,
        attempts,
    }
}

/// The results `o` owes: its own (none for an acceptance unless `delivered`
/// results are on), and for HTTP/2's 410, which also says since when the
/// token is gone as the feedback service did, an `unregistered` one.
fn results_of(o: &Outcome, delivered: bool) -> (Option<Event>, Option<Event>) {
    let n = &o.notification;
    let env = &n.envelope;
    let event = match o.result {
        Ok(()) if delivered => Some(Event::Delivered {
            app: env.app.clone(),
            id: env.job.id.clone(),
            to: n.recipient(),
        }),
        Ok(()) => None,
        Err(f) => Some(failed(env, n, f)),
    };
    // HTTP/2's 410 also says since when the token is gone, as the feedback
    // service did: the job owes an `unregistered` result too. A channel is no
    // device token: its end is the `failed` result alone.
    let unregistered = match o.result {
        Err(Failure {
            reason: Reason::Unregistered { since },
            ..
        }) if env.job.channel.is_none() => Some(Event::Unregistered {
            app: env.app.clone(),
            token: n.token(),
            timestamp: since,
        }),
        _ => None,
    };
    (event, unregistered)
}

/// Names a job across deliveries, for [`Recall`].
fn identity(env: &Envelope) -> Identity {
    Identity::of(
        env.job.id.as_deref(),
        &env.app,
        &env.job.payload,
        &env.job.tokens,
    )
}

/// A body's size as the ledger counts it (RabbitMQ caps messages far below 4 GiB).
fn body_len(body: &[u8]) -> u32 {
    u32::try_from(body.len()).unwrap_or(u32::MAX)
}
