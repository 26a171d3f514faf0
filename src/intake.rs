//! Intake: the subscription to the jobs queue, and what becomes of each
//! delivery (decoded, routed to its app, checked, handed to the lanes).
//!
//! How much the broker may push at once is [`Prefetch`]'s to say.
//! `amqp.prefetch` bounds the unacknowledged jobs by count, but one fan-out
//! job can be a megabyte of JSON, and at a prefetch of 20,000 that is no
//! bound at all. `amqp.prefetch_bytes` bounds the job bytes held as well.
//! RabbitMQ has no byte prefetch (it ignores `prefetch_size`) and fixes a
//! consumer's prefetch when it subscribes, so intake subscribes small and
//! subscribes again with whatever prefetch that pure policy asks for.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Consumer;
use tokio::sync::mpsc;

use crate::amqp::{self, AmqpError};
use crate::apns::{Envelope, Notification, Outcome};
use crate::job::JobKey;
use crate::job::{Job, JobError};
use crate::ledger::Unacked;
use crate::metrics::Stats;
use crate::pipeline::settlement::{Redelivered, Settlement};
use crate::pipeline::Routes;

/// Most deliveries taken in one go before routing them, so one-token jobs
/// travel to the lanes in batches.
const BATCH: usize = 256;
/// Notifications handed to the lanes at a time: a batch of fan-out jobs
/// would otherwise be expanded whole (a `Notification` per token) before the
/// first one is written.
const NOTIFICATIONS: usize = 16 * 1024;

/// Turns deliveries into notifications on their app's lanes.
pub struct Intake {
    stats: Arc<Stats>,
    /// Keys jobs across sessions, so a late outcome never matches a newer job.
    next_key: u64,
}

impl Intake {
    pub fn new(stats: Arc<Stats>) -> Self {
        Intake { stats, next_key: 0 }
    }

    /// Decodes, routes and checks `batch`, then hands it to the lanes; what
    /// cannot be sent is rejected through `settle`. While a lane is full,
    /// `outcomes` keep being settled: the lanes free their windows into them,
    /// and left waiting they would pile up without bound.
    pub async fn on_deliveries(
        &mut self,
        routes: &Routes,
        settle: &mut Settlement,
        outcomes: &mut mpsc::UnboundedReceiver<Vec<Outcome>>,
        batch: Vec<Delivery>,
    ) -> Result<(), AmqpError> {
        // Each job goes to the lanes as soon as it is decoded, not after the
        // whole batch: a 10,000-token job takes about a millisecond to
        // decode, and on one thread no lane refills a stream meanwhile, so a
        // batch of eight such jobs left every stream it freed idle for 8 ms.
        let mut routed: HashMap<Arc<str>, Vec<Notification>> = HashMap::new();
        let mut pending = 0;
        let consumed_at = Instant::now();
        for d in batch {
            self.stats.jobs_consumed.inc();
            if d.redelivered {
                self.stats.jobs_redelivered.inc();
            }
            let tag = d.delivery_tag;
            settle.delivered(tag);
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
                    settle
                        .reject(key, tag, rejection.error, d.data, rejection.id)
                        .await?;
                    continue;
                }
            };
            let Some(route) = routes.get(job.app.as_deref()) else {
                let app = job.app.as_deref().unwrap_or(&routes.default_app);
                let error = JobError::UnknownApp(app.to_owned());
                let id = job.id.as_deref().map(str::to_owned);
                settle.reject(key, tag, error, d.data, id).await?;
                continue;
            };
            if let Err(error) = route.protocol.check(&job) {
                let id = job.id.as_deref().map(str::to_owned);
                settle.reject(key, tag, error, d.data, id).await?;
                continue;
            }
            let skip = if !d.redelivered {
                settle.open(key, tag, &d.data, job.tokens.len() as u32);
                None
            } else {
                match settle
                    .open_redelivered(key, tag, &d.data, &route.name, &job)
                    .await?
                {
                    Redelivered::Send(skip) => skip,
                    // Its outcomes were all known: nothing is sent again.
                    Redelivered::Nothing => continue,
                }
            };
            let envelope = Arc::new(Envelope {
                key,
                app: route.name.clone(),
                job,
                consumed_at,
                withdrawal: settle.withdrawal(),
                retries: amqp::attempts(&d.properties),
            });
            // Its JSON body is not needed once decoded: not held while the
            // lanes make room.
            drop(d);
            let count = envelope.job.tokens.len();
            let mut next = 0;
            while next < count {
                let end = count.min(next + NOTIFICATIONS - pending);
                let list = routed.entry(envelope.app.clone()).or_default();
                let before = list.len();
                let left = (next as u32..end as u32)
                    .filter(|&i| skip.as_ref().is_none_or(|known| !known.contains(i)));
                list.extend(left.map(|i| Notification::new(envelope.clone(), i)));
                pending += list.len() - before;
                next = end;
                if pending >= NOTIFICATIONS {
                    submit(routes, settle, outcomes, &mut routed).await?;
                    pending = 0;
                }
            }
        }
        submit(routes, settle, outcomes, &mut routed).await
    }
}

/// Hands what `on_deliveries` decoded to the lanes, settling outcomes while
/// a lane is full.
async fn submit(
    routes: &Routes,
    settle: &mut Settlement,
    outcomes: &mut mpsc::UnboundedReceiver<Vec<Outcome>>,
    routed: &mut HashMap<Arc<str>, Vec<Notification>>,
) -> Result<(), AmqpError> {
    for (app, notifications) in routed.drain() {
        let Some(route) = routes.get(Some(&*app)) else {
            continue;
        };
        let mut send = std::pin::pin!(route.pool.submit(notifications));
        loop {
            // Over the bound of unconfirmed results the lanes get no more
            // work, and their outcomes wait, until confirms come in: a fan-out
            // job's results never all wait for their confirms at once.
            let open = !settle.backlogged();
            tokio::select! {
                biased;
                // Lanes close only when the daemon tears down; the jobs then come back.
                _ = &mut send, if open => break,
                Some(batch) = outcomes.recv(), if open => {
                    settle.on_outcome_batch(batch).await?;
                    settle.flush_acks().await?;
                }
                confirmed = settle.settle_next_confirm(), if settle.confirming() => {
                    confirmed?;
                    settle.flush_acks().await?;
                }
            }
        }
    }
    Ok(())
}

/// A session's subscription to the jobs queue, made again whenever the
/// intake policy asks for another prefetch.
pub struct Subscription {
    pub consumer: Consumer,
    /// The former subscription, cancelled, still handing over what the broker
    /// sent it before the cancel took effect.
    pub former: Option<Consumer>,
    /// `amqp.consumer_tag`; later subscriptions add `.1`, `.2`, ...
    base: String,
    tag: String,
    made: u32,
    prefetch: Prefetch,
}

impl Subscription {
    pub async fn start(
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

    /// Subscribes again when the policy wants another prefetch for the
    /// deliveries `unacked` and the jobs and bytes `held`; returns the new
    /// prefetch. Waits while the former subscription still hands over
    /// deliveries: until then, how many it will is unknown.
    pub async fn adapt(
        &mut self,
        channel: &lapin::Channel,
        queue: &str,
        unacked: Unacked,
        held: (usize, u64),
    ) -> Result<Option<u16>, lapin::Error> {
        if self.former.is_some() {
            return Ok(None);
        }
        let Some(prefetch) = self.prefetch.next(unacked, held.0, held.1) else {
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
            unacked = unacked.total,
            held_jobs = held.0,
            held_bytes = held.1,
            "prefetch adapted"
        );
        Ok(Some(prefetch))
    }

    pub async fn cancel(&self, channel: &lapin::Channel) -> Result<(), lapin::Error> {
        channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await
    }
}

/// Up to `BATCH` deliveries: the next one, and what else is ready.
pub async fn next_batch(consumer: &mut Consumer) -> Option<Result<Vec<Delivery>, lapin::Error>> {
    let first = match consumer.next().await? {
        Ok(d) => d,
        Err(e) => return Some(Err(e)),
    };
    let mut batch = vec![first];
    while batch.len() < BATCH {
        match futures_lite::future::poll_once(consumer.next()).await {
            Some(Some(Ok(d))) => batch.push(d),
            _ => break,
        }
    }
    Some(Ok(batch))
}

/// The next delivery of `consumer`, or never when there is none.
pub async fn next_delivery(
    consumer: &mut Option<Consumer>,
) -> Option<Result<Delivery, lapin::Error>> {
    match consumer {
        Some(c) => c.next().await,
        None => std::future::pending().await,
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

/// The prefetch a session starts with: a queue full of large jobs then sends
/// only a few of them at first; small jobs double it within milliseconds.
pub const START: u16 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefetch {
    max: u16,
    /// Most job bytes held; 0 leaves `max` alone in force.
    budget: u64,
    current: u16,
}

impl Prefetch {
    pub fn new(max: u16, budget: u64) -> Self {
        let max = max.max(1);
        let current = if budget == 0 { max } else { START.min(max) };
        Prefetch {
            max,
            budget,
            current,
        }
    }

    /// The prefetch in force.
    pub fn current(&self) -> u16 {
        self.current
    }

    /// The prefetch to subscribe with now, when it should change, given the
    /// deliveries not acked yet and the jobs and bytes held. Over budget: as
    /// many jobs as fit at their average size. Every slot of the current
    /// subscription taken (a final job keeps its slot until acked) with half
    /// the budget free: twice as many. Either way no more than `max` less
    /// what the broker may count as unacked after the cancel: every delivery
    /// not acked yet, and the current subscription's free slots, which it
    /// may fill before the cancel takes effect. So `max` bounds the
    /// unacked deliveries across subscriptions, as it bounds one.
    pub fn next(&self, unacked: Unacked, held_jobs: usize, held_bytes: u64) -> Option<u16> {
        if self.budget == 0 {
            return None;
        }
        let current = usize::from(self.current);
        let free = current.saturating_sub(unacked.current);
        let room = usize::from(self.max).saturating_sub(unacked.total + free);
        let next = if held_bytes > self.budget {
            let fit = u128::from(self.budget) * held_jobs as u128 / u128::from(held_bytes);
            Some((fit as usize).clamp(1, current).min(room)).filter(|&n| n >= 1 && n < current)
        } else if free == 0 && held_bytes <= self.budget / 2 {
            Some((2 * current).min(room)).filter(|&n| n > current)
        } else {
            None
        };
        next.map(|n| n as u16)
    }

    /// The broker took `prefetch` for the new subscription.
    pub fn set(&mut self, prefetch: u16) {
        self.current = prefetch.clamp(1, self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` deliveries not acked, all of the current subscription.
    fn taken(n: usize) -> Unacked {
        Unacked {
            total: n,
            current: n,
        }
    }

    #[test]
    fn small_jobs_double_the_prefetch_while_the_maximum_leaves_room() {
        let mut p = Prefetch::new(300, 1 << 20);
        assert_eq!(p.current(), START);
        assert_eq!(
            p.next(taken(15), 15, 15 * 200),
            None,
            "a free slot: no need for more"
        );
        let mut steps = Vec::new();
        while let Some(next) = p.next(taken(usize::from(p.current())), 1, 200) {
            p.set(next);
            steps.push(next);
        }
        // 128 unacked and 172 more make the 300 the daemon may hold.
        assert_eq!(steps, [32, 64, 128, 172]);
        assert_eq!(
            p.next(taken(299), 1, 200),
            None,
            "no room: no new subscription"
        );
    }

    #[test]
    fn a_final_job_keeps_its_slot_until_acked() {
        let p = Prefetch::new(300, 32 << 20);
        // 10,000-token jobs: 7 still sending, 9 final waiting for their ack
        // behind a slow one; the broker sends no 17th.
        assert_eq!(p.next(taken(16), 7, 7 * 670_000), Some(32));
    }

    #[test]
    fn the_room_counts_older_deliveries_and_free_slots() {
        let mut p = Prefetch::new(300, 1 << 20);
        p.set(128);
        let older = |n: usize| Unacked {
            total: 128 + n,
            current: 128,
        };
        assert_eq!(p.next(older(22), 1, 200), Some(150));
        assert_eq!(
            p.next(older(100), 1, 200),
            None,
            "72 left: fewer than the current prefetch"
        );
        // Over budget with 28 slots free: the broker may still fill them
        // before the cancel, so they count against the maximum.
        p.set(200);
        let held = Unacked {
            total: 172,
            current: 172,
        };
        assert_eq!(p.next(held, 172, 4 << 20), Some(43));
        let older = Unacked {
            total: 260,
            current: 172,
        };
        assert_eq!(p.next(older, 172, 4 << 20), Some(12), "300 - 260 - 28");
    }

    #[test]
    fn large_jobs_keep_it_where_their_bytes_fit() {
        let job = 670_000u64;
        let budget = 32 << 20;
        let mut p = Prefetch::new(20_000, budget);
        p.set(p.next(taken(16), 16, 16 * job).unwrap());
        assert_eq!(p.current(), 32);
        assert_eq!(
            p.next(taken(32), 32, 32 * job),
            None,
            "over half the budget: it stays"
        );
        // Jobs held from a larger subscription than the bytes allow.
        p.set(100);
        assert_eq!(
            p.next(taken(100), 100, 100 * job),
            Some(50),
            "over budget: what fits"
        );
        p.set(50);
        let before_the_shrink = Unacked {
            total: 100,
            current: 0,
        };
        assert_eq!(
            p.next(before_the_shrink, 100, 100 * job),
            None,
            "it shrinks once, not again"
        );
        assert_eq!(
            p.next(taken(1), 1, 64 << 20),
            Some(1),
            "one job over budget: one slot"
        );
        let older = Unacked {
            total: 100,
            current: 16,
        };
        assert_eq!(
            Prefetch::new(100, budget).next(older, 100, 200 << 20),
            None,
            "no room below the maximum: wait for jobs to finish"
        );
    }

    proptest::proptest! {
        /// Whatever is unacked and held, a new subscription never lets the
        /// broker count more than `max` deliveries unacked, even if the
        /// current one fills its free slots before the cancel, and always
        /// has a slot.
        #[test]
        fn a_new_prefetch_stays_within_the_maximum(
            max in 1u16..=u16::MAX, budget in 0u64..1 << 30, current in 1u16..=u16::MAX,
            total in 0usize..70_000, of_current in 0usize..70_000,
            held in 0usize..70_000, bytes in 0u64..1 << 32,
        ) {
            let mut p = Prefetch::new(max, budget);
            p.set(current);
            let of_current = of_current.min(total).min(usize::from(p.current()));
            let unacked = Unacked { total, current: of_current };
            if let Some(n) = p.next(unacked, held, bytes) {
                let free = usize::from(p.current()) - of_current;
                proptest::prop_assert!(n >= 1);
                proptest::prop_assert!(usize::from(n) + total + free <= usize::from(max));
                proptest::prop_assert_ne!(n, p.current());
            }
        }
    }

    #[test]
    fn no_budget_leaves_the_configured_prefetch() {
        let p = Prefetch::new(500, 0);
        assert_eq!(p.current(), 500);
        assert_eq!(p.next(taken(500), 500, u64::MAX), None);
        assert_eq!(Prefetch::new(8, 1 << 20).current(), 8);
    }
}
