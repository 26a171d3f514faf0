//! One lane: a persistent connection to APNs and the work routed to it, over
//! either transport. The driver here owns what both share — connect once
//! eagerly and then on demand, keep taking work while there is no connection
//! (`Standby`), back off and reconnect, give the work back once the app is
//! unusable, end once the pool closes and everything has an outcome — and a
//! [`Transport`] drives each connection it opens.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::standby::{Reconnect, Standby};
use super::{Notification, Outcome, Outcomes, Unusable};
use crate::metrics::{LaneStats, Stats};

/// Batches of work a pool has in flight towards one lane: small, so a full
/// lane pushes back on the intake quickly.
pub const CHANNEL: usize = 16;

/// The same for a lane of a pool that grows: work queued in a lane stays
/// there when the pool adds lanes, so a deep queue would keep the first
/// lanes busy for seconds while new ones sit idle (and the intake waits on
/// the first). Two batches still keep a lane's streams full.
pub const GROWING_CHANNEL: usize = 2;

/// What a lane needs of its transport: open a connection, drive it with the
/// lane's work until it ends, and say what a failed connect means. Called
/// once per connection, never per notification.
pub trait Transport: Send + 'static {
    type Connection: Send;
    type Error: fmt::Display + Send;

    /// Who the lane talks to, for its log lines ("the gateway").
    const PEER: &'static str;

    /// The `host:port` it connects to now, for its log lines.
    fn addr(&self) -> &str;

    fn connect(&self) -> impl Future<Output = Result<Self::Connection, Self::Error>> + Send;

    /// What a failed connect says about the app: its credentials or the network.
    fn unusable(error: &Self::Error) -> Unusable;

    /// Drives one connection until it ends; everything it took from `work` has
    /// an outcome by then, or is back in `work`.
    fn drive(
        &mut self,
        connection: Self::Connection,
        lane: &mut Lane,
        work: &mut Work,
    ) -> impl Future<Output = End> + Send;

    /// The lane's reconnect policy and how much it queues without a connection.
    fn policy(&self) -> Policy;
}

/// How a lane connects and what it does between connections, from the
/// app's configuration, whatever its transport.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub connect_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// After this long without a working connection, queued work is handed back.
    pub unusable_after: Duration,
    /// Most notifications queued while waiting for a connection.
    pub backlog: usize,
}

/// How a connection ended, for the reconnect policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The pool closed and everything is final: the lane is done.
    Drained,
    /// APNs answered or accepted something: it works, reconnect at once.
    Healthy,
    /// Refused, closed, stalled or broken without progress: back off before
    /// reconnecting, and after `unusable_after` of this give the work back.
    Broken(Unusable),
}

/// Work a lane holds across connections.
#[derive(Debug, Default)]
pub struct Work {
    /// Ready to send, resends first.
    pub queue: VecDeque<Notification>,
    /// Waiting out a retry pause (HTTP/2's "not now" answers).
    pub later: Vec<(Instant, Notification)>,
    /// Whether the pool may still send more.
    pub open: bool,
}

impl Work {
    fn new() -> Self {
        Work {
            open: true,
            ..Work::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.later.is_empty()
    }

    /// The pool has closed and nothing is left.
    pub fn is_done(&self) -> bool {
        !self.open && self.is_empty()
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.later.iter().map(|(at, _)| *at).min()
    }

    /// Moves notifications whose pause is over to the front of the queue.
    pub fn release_due(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.later.len() {
            if self.later[i].0 <= now {
                let (_, n) = self.later.swap_remove(i);
                self.queue.push_front(n);
            } else {
                i += 1;
            }
        }
    }

    /// Ends every pause: once the app is unusable the whole job waits in the
    /// retry queue instead.
    fn release_all(&mut self) {
        let paused = self.later.drain(..).map(|(_, n)| n);
        self.queue.extend(paused);
    }

    /// Takes a batch the pool sent (`None`: the pool closed).
    pub fn take(&mut self, batch: Option<Vec<Notification>>) {
        match batch {
            Some(batch) => self.queue.extend(batch),
            None => self.open = false,
        }
    }
}

/// What a lane's connection carries now, written by the lane and its
/// transport, read by the pool's growth policy (HTTP/2 apps).
#[derive(Debug, Default)]
pub struct Occupancy {
    connected: AtomicBool,
    streams: AtomicUsize,
    limit: AtomicUsize,
    queued: AtomicUsize,
    answered: AtomicU64,
}

/// One reading of an [`Occupancy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occupied {
    pub connected: bool,
    /// Streams (notifications) in flight on the connection.
    pub streams: usize,
    /// The most the connection allows in flight now.
    pub limit: usize,
    /// Notifications the lane holds that wait for room.
    pub queued: usize,
    /// Streams answered over its connections so far (a running count).
    pub answered: u64,
}

impl Occupancy {
    pub fn read(&self) -> Occupied {
        Occupied {
            connected: self.connected.load(Ordering::Relaxed),
            streams: self.streams.load(Ordering::Relaxed),
            limit: self.limit.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            answered: self.answered.load(Ordering::Relaxed),
        }
    }

    /// Counts streams that ended with an answer: the growth policy judges a
    /// grow by the rate of these.
    pub fn answered(&self, streams: u64) {
        self.answered.fetch_add(streams, Ordering::Relaxed);
    }

    /// What the transport carries at this turn of its loop.
    pub fn set(&self, streams: usize, limit: usize, queued: usize) {
        self.streams.store(streams, Ordering::Relaxed);
        self.limit.store(limit, Ordering::Relaxed);
        self.queued.store(queued, Ordering::Relaxed);
    }

    /// Whether the lane has a connection now.
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        if !up {
            self.set(0, 0, 0);
        }
    }
}

/// How much work a lane holds that it has not sent.
#[derive(Debug, Clone, Copy)]
pub struct Queue {
    /// Its channel's capacity, in batches.
    pub depth: usize,
    /// See [`Lane::backlog`].
    pub backlog: bool,
}

/// What a lane shares with the transport driving its connection: who it is,
/// where work comes from and outcomes go, and its counters.
pub struct Lane {
    pub app: Arc<str>,
    pub index: usize,
    pub rx: mpsc::Receiver<Vec<Notification>>,
    pub outcomes: Outcomes,
    pub stats: Arc<Stats>,
    /// Connection metrics labelled with the app and lane.
    pub lane_stats: LaneStats,
    /// What its connection carries, for the pool.
    pub occupancy: Arc<Occupancy>,
    /// Whether it queues work beyond its channel while it has no connection
    /// (up to the policy's `backlog`). A lane a pool grew does not: under
    /// load the pool hands work to whichever lane has room, and one still
    /// connecting always has, so it took tens of thousands of notifications
    /// during its handshake and sent them alone, at its streams' pace, long
    /// after the other lanes had finished.
    pub backlog: bool,
}

impl Lane {
    /// Starts a lane task over `transport`. It ends once the returned sender
    /// is dropped and every notification it was given has an outcome.
    pub fn spawn<T: Transport>(
        app: Arc<str>,
        index: usize,
        transport: T,
        occupancy: Arc<Occupancy>,
        outcomes: Outcomes,
        stats: Arc<Stats>,
        queue: Queue,
    ) -> (mpsc::Sender<Vec<Notification>>, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(queue.depth);
        let lane = Lane {
            lane_stats: stats.lane(&app, index),
            app,
            index,
            rx,
            outcomes,
            stats,
            occupancy,
            backlog: queue.backlog,
        };
        (tx, tokio::spawn(lane.run_then_forget(transport)))
    }

    /// Reports final words; the receiver only goes away when the daemon is
    /// being torn down, when there is no one left to tell.
    pub fn report(&self, outcomes: Vec<Outcome>) {
        if !outcomes.is_empty() {
            let _ = self.outcomes.send(outcomes);
        }
    }

    /// Runs the lane; a lane that ends (drained, or its app retired) no longer
    /// counts against readiness.
    async fn run_then_forget<T: Transport>(mut self, transport: T) {
        self.run(transport).await;
        self.stats
            .health
            .set_identity_refused(&self.app, self.index, false);
    }

    async fn run<T: Transport>(&mut self, mut transport: T) {
        let policy = transport.policy();
        let mut work = Work::new();
        let mut reconnect = Reconnect::new(
            policy.reconnect_min,
            policy.reconnect_max,
            policy.unusable_after,
        );
        let mut first = true;
        loop {
            // Connect eagerly once, then only when there is work: an idle lane
            // holds no connection open against a server that closes idle ones.
            if work.is_empty() && !first {
                match self.rx.recv().await {
                    Some(batch) => work.queue.extend(batch),
                    None => return,
                }
            }
            first = false;
            let attempt = transport.connect();
            let end = match self.standby(attempt, None, &mut work, policy).await {
                Ok(connection) => {
                    tracing::debug!(app = %self.app, lane = self.index, addr = transport.addr(),
                        "connected to {}", T::PEER);
                    self.lane_stats.connections_opened.inc();
                    self.lane_stats.connections_up.add(1);
                    self.occupancy.set_connected(true);
                    let end = transport.drive(connection, self, &mut work).await;
                    self.occupancy.set_connected(false);
                    self.lane_stats.connections_up.add(-1);
                    self.lane_stats.window.set(0);
                    end
                }
                Err(e) => {
                    self.lane_stats.connect_failures.inc();
                    tracing::warn!(app = %self.app, lane = self.index, addr = transport.addr(), error = %e,
                        "cannot connect to {}", T::PEER);
                    End::Broken(T::unusable(&e))
                }
            };
            match end {
                End::Drained => return,
                End::Healthy => reconnect.healthy(&self.stats, &self.app, self.index),
                End::Broken(why) => {
                    let (delay, unusable) =
                        reconnect.broken(why, &self.stats, &self.app, self.index);
                    if unusable.is_some() {
                        work.release_all();
                    }
                    let pause = tokio::time::sleep(delay);
                    self.standby(pause, unusable, &mut work, policy).await;
                }
            }
            if work.is_done() {
                return;
            }
        }
    }

    /// Waits for `fut` without a connection, taking work meanwhile (see [`Standby`]).
    async fn standby<F: Future>(
        &mut self,
        fut: F,
        unusable: Option<Unusable>,
        work: &mut Work,
        policy: Policy,
    ) -> F::Output {
        let limit = if self.backlog { policy.backlog } else { 0 };
        Standby {
            lane: self,
            work,
            limit,
        }
        .wait(fut, unusable)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{DeviceToken, Tokens};

    /// A transport whose connect never finishes: the lane stays in standby.
    struct Connecting;

    impl Transport for Connecting {
        type Connection = ();
        type Error = String;
        const PEER: &'static str = "nobody";

        fn addr(&self) -> &str {
            "nowhere:443"
        }

        async fn connect(&self) -> Result<(), String> {
            std::future::pending().await
        }

        fn unusable(_: &String) -> Unusable {
            Unusable::GatewayUnreachable
        }

        async fn drive(&mut self, (): (), _: &mut Lane, _: &mut Work) -> End {
            End::Drained
        }

        fn policy(&self) -> Policy {
            Policy {
                connect_timeout: Duration::from_secs(60),
                reconnect_min: Duration::from_secs(1),
                reconnect_max: Duration::from_secs(1),
                unusable_after: Duration::from_secs(60),
                backlog: 1000,
            }
        }
    }

    fn batch(n: u32) -> Vec<Notification> {
        let tokens: Tokens = (0..n)
            .map(|i| DeviceToken::from_bytes([i as u8; 32]))
            .collect();
        let env = crate::apns::tests::envelope(tokens);
        (0..n).map(|i| Notification::new(env.clone(), i)).collect()
    }

    /// How many batches of 10 a lane still connecting takes (its channel
    /// holds 2 more), up to 20 offered.
    async fn taken_while_connecting(backlog: bool) -> usize {
        let (outcomes, _rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::new());
        let occupancy = Arc::new(Occupancy::default());
        let (tx, task) = Lane::spawn(
            Arc::from("app"),
            1,
            Connecting,
            occupancy,
            outcomes,
            stats,
            Queue { depth: 2, backlog },
        );
        let mut sent = 0;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(2)).await;
            if tx.try_send(batch(10)).is_ok() {
                sent += 1;
            }
        }
        task.abort();
        sent - 2
    }

    #[tokio::test]
    async fn a_lane_a_pool_grew_takes_no_work_until_it_is_connected() {
        assert_eq!(taken_while_connecting(false).await, 0);
        // A lane the pool started with queues up to the policy's backlog
        // (1000 here), so one dead app does not hold up the intake.
        assert_eq!(taken_while_connecting(true).await, 18);
    }
}
