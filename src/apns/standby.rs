//! What a lane of either transport does while it has no connection: it keeps
//! taking work, so one app's dead gateway does not stall the intake every
//! app shares, and once the app is unusable it gives that work back to the
//! pipeline (which parks the jobs in the retry queue) instead of holding it.

use std::future::Future;
use std::time::{Duration, Instant};

use super::lane::{Lane, Work};
use super::{is_expired, Notification, Outcome, Reason, Unusable};
use crate::backoff::Backoff;
use crate::clock::unix_now;
use crate::metrics::Stats;

/// A lane's reconnect policy: back off while connections break, and count
/// the app unusable once none has worked for `unusable_after`.
pub(super) struct Reconnect {
    backoff: Backoff,
    unusable_after: Duration,
    /// Since when every connection has ended broken.
    failing_since: Option<Instant>,
}

impl Reconnect {
    pub fn new(min: Duration, max: Duration, unusable_after: Duration) -> Self {
        Reconnect {
            backoff: Backoff::new(min, max),
            unusable_after,
            failing_since: None,
        }
    }

    /// A connection worked: the next one may be opened at once.
    pub fn healthy(&mut self, stats: &Stats, app: &str, lane: usize) {
        self.backoff.reset();
        self.failing_since = None;
        stats.health.set_identity_refused(app, lane, false);
    }

    /// A connection broke for `why`, or could not be opened: the delay before
    /// the next, and whether the app counts as unusable by now.
    pub fn broken(
        &mut self,
        why: Unusable,
        stats: &Stats,
        app: &str,
        lane: usize,
    ) -> (Duration, Option<Unusable>) {
        stats
            .health
            .set_identity_refused(app, lane, why == Unusable::CertificateRejected);
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        let unusable = (since.elapsed() >= self.unusable_after).then_some(why);
        let delay = self.backoff.next_delay();
        tracing::debug!(app, lane, retry_in = ?delay, "reconnecting after backoff");
        (delay, unusable)
    }
}

/// A lane and its work, borrowed while it waits for a connection or a backoff.
pub(super) struct Standby<'a> {
    pub lane: &'a mut Lane,
    pub work: &'a mut Work,
    /// Most notifications queued while waiting; past it the channel fills and
    /// the pool's back-pressure holds the intake.
    pub limit: usize,
}

impl Standby<'_> {
    /// Waits for `fut`. Work arriving meanwhile is queued, or, while the app is
    /// `unusable`, handed back at once together with everything queued.
    pub async fn wait<F: Future>(&mut self, fut: F, unusable: Option<Unusable>) -> F::Output {
        if let Some(why) = unusable {
            let queued: Vec<_> = self.work.queue.drain(..).collect();
            self.hand_back(queued, why);
        }
        tokio::pin!(fut);
        loop {
            let room = self.work.open && (unusable.is_some() || self.work.queue.len() < self.limit);
            tokio::select! {
                out = &mut fut => return out,
                batch = self.lane.rx.recv(), if room => match (batch, unusable) {
                    (Some(batch), Some(why)) => self.hand_back(batch, why),
                    (batch, _) => self.work.take(batch),
                },
            }
        }
    }

    /// Gives notifications up as unsendable: the pipeline retries their jobs
    /// later. Withdrawn ones are dropped instead (their owner has them), and
    /// expired ones end as such.
    fn hand_back(&self, notifications: Vec<Notification>, why: Unusable) {
        let unix_now = unix_now();
        let mut withdrawn = 0;
        let outcomes: Vec<Outcome> = notifications
            .into_iter()
            .filter(|n| {
                let gone = n.envelope.withdrawal.is_withdrawn();
                withdrawn += u64::from(gone);
                !gone
            })
            .map(|n| {
                let reason = if is_expired(&n, unix_now) {
                    Reason::Expired
                } else {
                    Reason::Unusable(why)
                };
                Outcome::failed(n, reason)
            })
            .collect();
        let lane = &self.lane;
        lane.stats.dropped_for_redelivery.add(withdrawn);
        if !outcomes.is_empty() {
            tracing::warn!(app = %lane.app, lane = lane.index, count = outcomes.len(), reason = Reason::Unusable(why).name(),
                "app unusable: handing notifications back for a later retry");
            lane.report(outcomes);
        }
    }
}
