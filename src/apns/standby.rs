//! What a lane of either transport does while it has no connection: it keeps
//! taking work, so one app's dead gateway does not stall the intake every
//! app shares, and once the app is unusable it gives that work back to the
//! pipeline (which parks the jobs in the retry queue) instead of holding it.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::lane::Outcomes;
use super::{is_expired, unix_now, Failure, Notification, Outcome, Reason, Unusable};
use crate::backoff::Backoff;
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
        stats.set_identity_refused(app, lane, false);
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
        stats.set_identity_refused(app, lane, why == Unusable::CertificateRejected);
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        let unusable = (since.elapsed() >= self.unusable_after).then_some(why);
        let delay = self.backoff.next_delay();
        tracing::debug!(app, lane, retry_in = ?delay, "reconnecting after backoff");
        (delay, unusable)
    }
}

/// A lane's work and channels, borrowed while it waits for a connection or a backoff.
pub(super) struct Standby<'a> {
    pub app: &'a str,
    pub lane: usize,
    pub rx: &'a mut mpsc::Receiver<Vec<Notification>>,
    pub rx_open: &'a mut bool,
    pub queue: &'a mut VecDeque<Notification>,
    /// Most notifications queued while waiting; past it the channel fills and
    /// the pool's back-pressure holds the intake.
    pub limit: usize,
    pub stats: &'a Stats,
    pub outcomes: &'a Outcomes,
}

impl Standby<'_> {
    /// Waits for `fut`. Work arriving meanwhile is queued, or, while the app is
    /// `unusable`, handed back at once together with everything queued.
    pub async fn wait<F: Future>(&mut self, fut: F, unusable: Option<Unusable>) -> F::Output {
        if let Some(why) = unusable {
            let queued: Vec<_> = self.queue.drain(..).collect();
            self.hand_back(queued, why);
        }
        tokio::pin!(fut);
        loop {
            let room = *self.rx_open && (unusable.is_some() || self.queue.len() < self.limit);
            tokio::select! {
                out = &mut fut => return out,
                batch = self.rx.recv(), if room => match (batch, unusable) {
                    (Some(batch), Some(why)) => self.hand_back(batch, why),
                    (Some(batch), None) => self.queue.extend(batch),
                    (None, _) => *self.rx_open = false,
                },
            }
        }
    }

    /// Gives notifications up as unsendable: the pipeline retries their jobs
    /// later. Those of an ended broker session are dropped instead (the broker
    /// redelivers their jobs), and expired ones end as such.
    fn hand_back(&self, notifications: Vec<Notification>, why: Unusable) {
        let unix_now = unix_now();
        let mut stale = 0;
        let outcomes: Vec<Outcome> = notifications
            .into_iter()
            .filter(|n| {
                let ended = n.envelope.session.get();
                stale += u64::from(ended);
                !ended
            })
            .map(|n| {
                let reason = if is_expired(&n, unix_now) {
                    Reason::Expired
                } else {
                    Reason::Unusable(why)
                };
                let attempts = n.attempts;
                Outcome {
                    notification: n,
                    result: Err(Failure { reason, attempts }),
                }
            })
            .collect();
        self.stats.dropped_for_redelivery.add(stale);
        if !outcomes.is_empty() {
            tracing::warn!(app = %self.app, lane = self.lane, count = outcomes.len(), reason = Reason::Unusable(why).name(),
                "app unusable: handing notifications back for a later retry");
            // The receiver only goes away when the daemon is being torn down.
            let _ = self.outcomes.send(outcomes);
        }
    }
}

/// A failure the TLS layer reports (an alert from the gateway, or its
/// certificate refused by us) is about credentials; anything else is the network.
pub fn classify(e: &io::Error) -> Unusable {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(_) => Unusable::CertificateRejected,
        None => Unusable::GatewayUnreachable,
    }
}
