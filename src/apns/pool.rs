//! The lanes of one app. A device's notifications take the lane its token
//! hashes to, so while an app's lanes stay the same they reach APNs in the
//! order they were published. An HTTP/2 app's lanes may grow while every
//! stream is busy and shrink once idle ([`Growth`]): a device may then move
//! to another lane, which HTTP/2's concurrent streams never ordered anyway.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};

use super::http2::growth::{Change, Growth, Load};
use super::lane::{self, Lane, Occupancy, Transport};
use super::{Notification, Outcomes};
use crate::metrics::Stats;

pub struct Pool {
    lanes: Arc<Mutex<Lanes>>,
    /// Grows and shrinks the lanes (HTTP/2 apps only).
    grower: Option<AbortHandle>,
    /// The lane an HTTP/2 app's next run is offered to first: runs go round
    /// the lanes, so one-notification jobs spread as a hash spread them.
    turn: AtomicUsize,
}

/// Every lane has stopped: the daemon is shutting down.
#[derive(Debug, thiserror::Error)]
#[error("the app's connections are closed")]
pub struct Closed;

/// One lane as the pool sees it: where its work goes, what it carries.
struct Member {
    tx: mpsc::Sender<Vec<Notification>>,
    occupancy: Arc<Occupancy>,
}

/// The lanes taking work and every lane task started, changed under one
/// lock so that a lane grown while the pool closes is closed with it.
struct Lanes {
    members: Vec<Member>,
    /// Every lane task with its index, those shrunk away included, until they end.
    tasks: Vec<(usize, JoinHandle<()>)>,
    closed: bool,
}

/// What a pool needs to start lanes: shared by the grower.
struct Spawner<F> {
    app: Arc<str>,
    transport: F,
    outcomes: Outcomes,
    stats: Arc<Stats>,
    /// Each lane's channel capacity, in batches.
    depth: usize,
    /// Lanes numbered below this queue work while they connect (see
    /// [`Lane::backlog`]): the ones the pool starts with, not the grown ones.
    backlog_below: usize,
}

impl<T: Transport, F: FnMut() -> T> Spawner<F> {
    /// Starts lane number `index` and adds it to `lanes`.
    fn spawn(&mut self, lanes: &mut Lanes, index: usize) {
        let occupancy = Arc::new(Occupancy::default());
        let (tx, task) = Lane::spawn(
            self.app.clone(),
            index,
            (self.transport)(),
            occupancy.clone(),
            self.outcomes.clone(),
            self.stats.clone(),
            lane::Queue {
                depth: self.depth,
                backlog: index < self.backlog_below,
            },
        );
        lanes.members.push(Member { tx, occupancy });
        lanes.tasks.push((index, task));
    }
}

impl Pool {
    /// Starts `connections` lanes (at least one), each over a transport from
    /// `transport`, reporting on `outcomes`.
    pub fn spawn<T: Transport>(
        app: Arc<str>,
        connections: usize,
        transport: impl FnMut() -> T,
        outcomes: Outcomes,
        stats: Arc<Stats>,
    ) -> Pool {
        let connections = connections.max(1);
        stats.set_connections_max(&app, connections);
        let mut spawner = Spawner {
            app,
            transport,
            outcomes,
            stats,
            depth: lane::CHANNEL,
            backlog_below: usize::MAX,
        };
        let lanes = Pool::start(&mut spawner, connections);
        Pool {
            lanes,
            grower: None,
            turn: AtomicUsize::new(0),
        }
    }

    /// Starts the fewest lanes `growth` keeps, and a task that adds a lane
    /// while every stream is busy and work waits, and removes one once the
    /// load fits in fewer (see [`Growth`]).
    pub fn spawn_growing<T: Transport>(
        app: Arc<str>,
        growth: Growth,
        transport: impl FnMut() -> T + Send + 'static,
        outcomes: Outcomes,
        stats: Arc<Stats>,
    ) -> Pool {
        stats.set_connections_max(&app, growth.max());
        let mut spawner = Spawner {
            app,
            transport,
            outcomes,
            stats,
            depth: lane::GROWING_CHANNEL,
            backlog_below: growth.min(),
        };
        let lanes = Pool::start(&mut spawner, growth.min());
        let grower = tokio::spawn(grow(lanes.clone(), growth, spawner));
        Pool {
            lanes,
            grower: Some(grower.abort_handle()),
            turn: AtomicUsize::new(0),
        }
    }

    fn start<T: Transport>(
        spawner: &mut Spawner<impl FnMut() -> T>,
        connections: usize,
    ) -> Arc<Mutex<Lanes>> {
        let mut lanes = Lanes {
            members: Vec::with_capacity(connections),
            tasks: Vec::with_capacity(connections),
            closed: false,
        };
        for index in 0..connections {
            spawner.spawn(&mut lanes, index);
        }
        Arc::new(Mutex::new(lanes))
    }

    /// Routes notifications to their lanes, waiting while a lane is full: this
    /// is the back-pressure that keeps memory bounded.
    pub async fn submit(&self, notifications: Vec<Notification>) -> Result<(), Closed> {
        let lanes = self.senders();
        match lanes.len() {
            0 => return Err(Closed),
            // A growing pool's one lane takes runs like any: given the whole
            // chunk, it would hold 16,384 notifications while the lanes
            // grown for them sat idle.
            1 if self.grower.is_none() => {
                return lanes[0].send(notifications).await.map_err(|_| Closed)
            }
            _ => {}
        }
        if self.grower.is_none() {
            // Binary: a device's notifications keep their order on its lane.
            let n = lanes.len() as u64;
            let share = notifications.len() / lanes.len() + 1;
            let mut split: Vec<Vec<Notification>> = (0..lanes.len())
                .map(|_| Vec::with_capacity(share + share / 4))
                .collect();
            for item in notifications {
                split[(item.route_hash() % n) as usize].push(item);
            }
            for (lane, batch) in lanes.iter().zip(split) {
                if !batch.is_empty() {
                    lane.send(batch).await.map_err(|_| Closed)?;
                }
            }
            return Ok(());
        }
        // HTTP/2 keeps no order among a device's notifications (streams are
        // answered concurrently), so no lane is a device's own: each lane
        // takes a run of consecutive notifications, whichever has room first,
        // rather than the intake waiting on one lane while lanes just grown
        // beside it sit idle. Runs also keep a lane reading the job's tokens
        // in order: spread by hash over dozens of lanes, every token a lane
        // wrote was a cache miss, a tenth of its CPU.
        let mut rest = notifications;
        let mut lanes = lanes;
        let mut next = self.turn.load(Ordering::Relaxed);
        while !rest.is_empty() {
            let share = rest.len().div_ceil(lanes.len()).min(GROWING_BATCH);
            // A lane with room now, taking turns: no wait, no allocation.
            let count = lanes.len();
            let taken = (0..count).map(|i| (next + i) % count).find(|&at| {
                let Ok(permit) = lanes[at].try_reserve() else {
                    return false;
                };
                permit.send(rest.split_off(rest.len() - share));
                true
            });
            if let Some(at) = taken {
                next = at + 1;
                continue;
            }
            // Every lane is full. Looked at afresh: the grower may have added lanes.
            lanes = self.senders();
            if lanes.is_empty() {
                return Err(Closed);
            }
            let Ok(permit) = tokio::time::timeout(RECHECK, first_room(&lanes)).await else {
                continue;
            };
            let share = rest.len().div_ceil(lanes.len()).min(GROWING_BATCH);
            permit?.send(rest.split_off(rest.len() - share));
        }
        self.turn.store(next, Ordering::Relaxed);
        Ok(())
    }

    fn senders(&self) -> Vec<mpsc::Sender<Vec<Notification>>> {
        let lanes = lock(&self.lanes);
        lanes.members.iter().map(|m| m.tx.clone()).collect()
    }

    /// Stops taking work; the returned tasks end once every notification they
    /// hold has an outcome.
    pub fn close(self) -> Vec<JoinHandle<()>> {
        if let Some(grower) = &self.grower {
            grower.abort();
        }
        let mut lanes = lock(&self.lanes);
        lanes.closed = true;
        lanes.members.clear();
        lanes.tasks.drain(..).map(|(_, task)| task).collect()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Some(grower) = &self.grower {
            grower.abort();
        }
    }
}

/// The most a growing pool's lane is handed at once. A lane keeps what it
/// was handed however many lanes grow beside it, and drains it at most
/// `streams ÷ round trip` (20,000/s at Apple's 50 ms): the 8,000-notification
/// batches of a pool's first two lanes kept one lane sending alone for the
/// last half second of a fan-out. Two such batches queued and one taken keep
/// a lane's 1000 streams full.
const GROWING_BATCH: usize = 512;

/// How often work waiting for room looks again for lanes grown meanwhile:
/// a fraction of the grower's own delay.
const RECHECK: Duration = Duration::from_millis(5);

/// Room for one batch on whichever of `lanes` has it first.
async fn first_room(
    lanes: &[mpsc::Sender<Vec<Notification>>],
) -> Result<mpsc::Permit<'_, Vec<Notification>>, Closed> {
    let mut waits: Vec<_> = lanes.iter().map(|l| Some(Box::pin(l.reserve()))).collect();
    std::future::poll_fn(|cx| {
        let mut open = false;
        for slot in &mut waits {
            let Some(wait) = slot else { continue };
            match wait.as_mut().poll(cx) {
                Poll::Ready(Ok(permit)) => return Poll::Ready(Ok(permit)),
                // That lane has ended: not polled again.
                Poll::Ready(Err(_)) => *slot = None,
                Poll::Pending => open = true,
            }
        }
        if open {
            Poll::Pending
        } else {
            Poll::Ready(Err(Closed))
        }
    })
    .await
}

fn lock(lanes: &Mutex<Lanes>) -> MutexGuard<'_, Lanes> {
    // Nothing panics under the lock; a poisoned one still holds valid lanes.
    lanes.lock().unwrap_or_else(|e| e.into_inner())
}

/// Looks at the lanes' load several times per [`Growth`]'s grow delay and
/// acts on its verdict, until the pool closes.
async fn grow<T: Transport>(
    lanes: Arc<Mutex<Lanes>>,
    mut growth: Growth,
    mut spawner: Spawner<impl FnMut() -> T>,
) {
    let period = (growth.grow_after() / 5).max(Duration::from_millis(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut lanes = lock(&lanes);
        if lanes.closed {
            return;
        }
        lanes.tasks.retain(|(_, task)| !task.is_finished());
        let load = lanes.load();
        match growth.observe(load, Instant::now()) {
            Change::Hold => {}
            Change::Grow(by) => {
                for _ in 0..by {
                    let index = lanes.members.len();
                    tracing::info!(app = %spawner.app, lane = index, connections = index + 1,
                        "every HTTP/2 stream is busy and work waits: opening another connection");
                    spawner.spawn(&mut lanes, index);
                }
            }
            Change::Shrink => {
                // Its lane drains what it holds, then closes the connection.
                lanes.members.pop();
                tracing::info!(app = %spawner.app, connections = lanes.members.len(),
                    "the load fits in fewer HTTP/2 connections: closing one");
            }
        }
    }
}

impl Lanes {
    /// The load of the lanes taking work. A lane not connected counts as
    /// opening, and so does one shrunk away and still draining: the policy
    /// holds until both settle.
    fn load(&self) -> Load {
        let mut load = Load::default();
        for m in &self.members {
            let o = m.occupancy.read();
            if o.connected {
                load.open += 1;
                load.busy += o.streams;
                load.capacity += o.limit;
            } else {
                load.opening += 1;
            }
            load.answered += o.answered;
            // Batches sent and not yet taken wait too.
            load.waiting += o.queued + (m.tx.max_capacity() - m.tx.capacity());
        }
        let taking = self.members.len();
        let draining = self.tasks.iter().filter(|(i, _)| *i >= taking).count();
        load.opening += draining;
        load
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(connected: bool, streams: usize, queued: usize) -> Member {
        let (tx, _) = mpsc::channel(4);
        let occupancy = Arc::new(Occupancy::default());
        occupancy.set_connected(connected);
        if connected {
            occupancy.set(streams, 10, queued);
            occupancy.answered(streams as u64 * 100);
        }
        Member { tx, occupancy }
    }

    #[tokio::test]
    async fn load_counts_lanes_without_a_connection_and_draining_ones_as_opening() {
        let (tx, _rx) = mpsc::channel(4);
        tx.send(Vec::new()).await.unwrap();
        let full = Member {
            tx,
            ..member(true, 10, 3)
        };
        let draining = tokio::spawn(std::future::pending());
        let lanes = Lanes {
            members: vec![full, member(true, 4, 0), member(false, 0, 0)],
            tasks: vec![(3, draining)],
            closed: false,
        };
        assert_eq!(
            lanes.load(),
            Load {
                open: 2,
                opening: 2,
                busy: 14,
                capacity: 20,
                // Three queued in the lane, one batch in its channel.
                waiting: 4,
                answered: 1400,
            }
        );
    }

    /// A growing pool of `lanes` connected lanes (the grower never runs),
    /// with each lane's receiving end.
    fn growing_pool(
        lanes: usize,
    ) -> (Pool, Vec<mpsc::Receiver<Vec<Notification>>>, JoinHandle<()>) {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..lanes).map(|_| mpsc::channel(8)).unzip();
        let lanes = Lanes {
            members: senders
                .into_iter()
                .map(|tx| Member {
                    tx,
                    ..member(true, 0, 0)
                })
                .collect(),
            tasks: Vec::new(),
            closed: false,
        };
        let grower = tokio::spawn(std::future::pending::<()>());
        let pool = Pool {
            lanes: Arc::new(Mutex::new(lanes)),
            grower: Some(grower.abort_handle()),
            turn: AtomicUsize::new(0),
        };
        (pool, receivers, grower)
    }

    /// The notifications of one job of `count` tokens, token `i` being `token(i)`.
    fn job(count: u32, token: impl Fn(u32) -> [u8; 32]) -> Vec<Notification> {
        let tokens: crate::token::Tokens = (0..count)
            .map(|i| crate::token::DeviceToken::from_bytes(token(i)))
            .collect();
        let env = crate::apns::tests::envelope(tokens);
        (0..count)
            .map(|i| Notification::new(env.clone(), i))
            .collect()
    }

    #[tokio::test]
    async fn a_growing_pool_hands_a_lane_at_most_one_growing_batch_at_a_time() {
        // One lane too: the lanes grown beside it must find work left.
        for lanes in [1, 2] {
            let (pool, mut receivers, grower) = growing_pool(lanes);
            let work = job(3000, |i| [(i % 251) as u8; 32]);
            pool.submit(work).await.unwrap();
            drop(pool);
            let mut sizes = Vec::new();
            for rx in &mut receivers {
                while let Ok(batch) = rx.try_recv() {
                    sizes.push(batch.len());
                }
            }
            assert_eq!(sizes.iter().sum::<usize>(), 3000);
            assert!(
                sizes.iter().all(|&n| n <= GROWING_BATCH),
                "{lanes}: {sizes:?}"
            );
            grower.abort();
        }
    }

    #[tokio::test]
    async fn a_growing_pool_hands_every_lane_runs_of_consecutive_notifications() {
        let (pool, mut receivers, grower) = growing_pool(3);
        // Every token alike: hashing tokens would send them all to one lane.
        pool.submit(job(3000, |_| [7; 32])).await.unwrap();
        drop(pool);
        let mut seen = vec![false; 3000];
        for rx in &mut receivers {
            let mut batches = 0;
            while let Ok(batch) = rx.try_recv() {
                batches += 1;
                let first = batch[0].index;
                for (at, n) in batch.iter().enumerate() {
                    assert_eq!(n.index, first + at as u32, "a run in the job's order");
                    assert!(!std::mem::replace(&mut seen[n.index as usize], true));
                }
            }
            assert!(batches > 0, "every lane takes work");
        }
        assert!(seen.iter().all(|&s| s), "every notification handed on");
        grower.abort();
    }

    #[tokio::test]
    async fn one_notification_jobs_go_round_the_lanes() {
        let (pool, mut receivers, grower) = growing_pool(2);
        let env = crate::apns::tests::envelope(
            std::iter::once(crate::token::DeviceToken::from_bytes([7; 32])).collect(),
        );
        for _ in 0..6 {
            pool.submit(vec![Notification::new(env.clone(), 0)])
                .await
                .unwrap();
        }
        drop(pool);
        for rx in &mut receivers {
            let mut batches = 0;
            while rx.try_recv().is_ok() {
                batches += 1;
            }
            assert_eq!(batches, 3, "each lane takes every other job");
        }
        grower.abort();
    }
}
