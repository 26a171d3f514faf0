//! Per-job completion: a job's AMQP delivery is acknowledged only when every
//! token has a final outcome and every result it caused is confirmed by the
//! broker. Pure bookkeeping; the pipeline does the I/O.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

pub use crate::job::JobKey;
use crate::token::{DeviceToken, Tokens};

#[derive(Debug)]
struct Open {
    tag: u64,
    /// The job's body size, counted in [`Ledger::held_bytes`] until it is final.
    bytes: u32,
    tokens: u32,
    results: u32,
    /// Tokens that could not be tried (their app was unusable): they travel
    /// on in one retry job once every other token is final.
    deferred: Tokens,
}

/// Where a job stands after one of its tokens is done.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Tokens or results are still outstanding.
    Open,
    /// Everything is final and confirmed: ack this delivery tag.
    Final(u64),
    /// Every token is done but these were deferred: publish them as a retry
    /// job; the job is final once that publish is confirmed.
    Retry(Tokens),
}

#[derive(Debug, Default)]
pub struct Ledger {
    jobs: HashMap<JobKey, Open>,
    held_bytes: u64,
}

impl Ledger {
    /// Registers a job of `bytes` with `tokens` notifications and `results`
    /// results already owed (a rejected job owes one and has no tokens).
    pub fn open(&mut self, key: JobKey, tag: u64, bytes: u32, tokens: u32, results: u32) {
        self.held_bytes += u64::from(bytes);
        let replaced = self.jobs.insert(
            key,
            Open {
                tag,
                bytes,
                tokens,
                results,
                deferred: Tokens::default(),
            },
        );
        if let Some(old) = replaced {
            self.held_bytes -= u64::from(old.bytes);
        }
    }

    /// The body bytes of the jobs not yet final: what the intake bounds.
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    pub fn contains(&self, key: JobKey) -> bool {
        self.jobs.contains_key(&key)
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// One token is final; `results` says how many results it caused to publish.
    pub fn token_done(&mut self, key: JobKey, results: u32) -> Progress {
        let Some(open) = self.jobs.get_mut(&key) else {
            return Progress::Open;
        };
        open.tokens = open.tokens.saturating_sub(1);
        open.results += results;
        self.progress(key)
    }

    /// `n` tokens were accepted without a result to publish: a fan-out job's
    /// tokens settle in runs.
    pub fn tokens_accepted(&mut self, key: JobKey, n: u32) -> Progress {
        let Some(open) = self.jobs.get_mut(&key) else {
            return Progress::Open;
        };
        open.tokens = open.tokens.saturating_sub(n);
        self.progress(key)
    }

    /// One token could not be tried now and goes to the retry job.
    pub fn token_deferred(&mut self, key: JobKey, token: DeviceToken) -> Progress {
        let Some(open) = self.jobs.get_mut(&key) else {
            return Progress::Open;
        };
        open.tokens = open.tokens.saturating_sub(1);
        open.deferred.push(&token);
        self.progress(key)
    }

    /// The broker confirmed one of the job's results (or its retry job).
    /// Returns the delivery tag once the whole job is final.
    pub fn result_confirmed(&mut self, key: JobKey) -> Option<u64> {
        let open = self.jobs.get_mut(&key)?;
        open.results = open.results.saturating_sub(1);
        match self.progress(key) {
            Progress::Final(tag) => Some(tag),
            _ => None,
        }
    }

    fn progress(&mut self, key: JobKey) -> Progress {
        let Some(open) = self.jobs.get_mut(&key) else {
            return Progress::Open;
        };
        if open.tokens > 0 {
            Progress::Open
        } else if !open.deferred.is_empty() {
            open.results += 1;
            Progress::Retry(std::mem::take(&mut open.deferred))
        } else if open.results == 0 {
            let Some(done) = self.jobs.remove(&key) else {
                return Progress::Open;
            };
            self.held_bytes -= u64::from(done.bytes);
            Progress::Final(done.tag)
        } else {
            Progress::Open
        }
    }
}

/// One `basic.ack` to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub tag: u64,
    pub multiple: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    /// Final since then: what the ack lag is measured from.
    Done(Instant),
    Acked,
}

/// Plans acks for one channel: one multiple-ack for each run of final deliveries
/// at the front, so a busy queue costs one ack frame per batch, not per job.
/// A delivery final behind a slow one is acked on its own once more than
/// `slack` final ones wait behind it, or once one has waited `max_wait`: one
/// slow job never holds the prefetch, and a final job is acked within
/// milliseconds, so a crash redelivers only jobs that were truly in flight.
#[derive(Debug)]
pub struct AckPlanner {
    /// Delivery tags in the order received (consecutive on a channel).
    states: VecDeque<(u64, State)>,
    slack: usize,
    max_wait: Duration,
    /// Entries in `states` that are `Done`: kept as a count so planning stays
    /// cheap with a large prefetch.
    done: usize,
    /// When the oldest `Done` entry became final, or earlier (it is not
    /// moved forward when the front run leaves): waiting ones are acked
    /// early, never late.
    waiting_since: Option<Instant>,
    /// What the broker counts against the prefetch (see [`Unacked`]).
    unacked: Unacked,
    /// The first tag of the current subscription (`u64::MAX` until it sends
    /// one): its deliveries are those from there on, as the broker sends a
    /// cancelled subscription's last deliveries before the next one's first.
    current_from: u64,
}

/// Deliveries not acked yet: the slots they take at the broker, which counts
/// a final job against the prefetch until its ack, not until it is final.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unacked {
    /// Of every subscription of the channel.
    pub total: usize,
    /// Of the subscription consuming now, which the broker sends no more
    /// than its prefetch.
    pub current: usize,
}

impl Unacked {
    fn ack(&mut self, tag: u64, current_from: u64) {
        self.total -= 1;
        if tag >= current_from {
            self.current -= 1;
        }
    }
}

impl AckPlanner {
    pub fn new(slack: usize, max_wait: Duration) -> Self {
        AckPlanner {
            states: VecDeque::new(),
            slack,
            max_wait,
            done: 0,
            waiting_since: None,
            unacked: Unacked::default(),
            current_from: 0,
        }
    }

    /// A new subscription replaced the current one: none of the deliveries
    /// known so far are its.
    pub fn resubscribed(&mut self) {
        self.current_from = u64::MAX;
        self.unacked.current = 0;
    }

    /// `tag` is the first delivery of the current subscription, unless it
    /// already sent one.
    pub fn current_starts(&mut self, tag: u64) {
        if self.current_from == u64::MAX {
            self.current_from = tag;
        }
    }

    /// Deliveries the broker counts as unacked, as far as they arrived.
    pub fn unacked(&self) -> Unacked {
        self.unacked
    }

    /// When `take` will ack final deliveries that wait behind a pending one,
    /// if any wait: the session wakes up then.
    pub fn deadline(&self) -> Option<Instant> {
        self.waiting_since.map(|since| since + self.max_wait)
    }

    /// Follows the prefetch in force: with a small one, a stuck delivery must
    /// not wait for more final ones than the broker will ever send.
    pub fn set_slack(&mut self, slack: usize) {
        self.slack = slack;
    }

    pub fn delivered(&mut self, tag: u64) {
        debug_assert!(
            self.states.back().is_none_or(|&(last, _)| last < tag),
            "deliveries must be planned in tag order"
        );
        self.states.push_back((tag, State::Pending));
        self.unacked.total += 1;
        if tag >= self.current_from {
            self.unacked.current += 1;
        }
    }

    /// Delivery `tag` became final at `now`.
    pub fn done(&mut self, tag: u64, now: Instant) {
        let Some(&(front, _)) = self.states.front() else {
            return;
        };
        let index = tag.wrapping_sub(front) as usize;
        let entry = match self.states.get_mut(index) {
            Some(entry) if entry.0 == tag => Some(entry),
            // Tags are consecutive per channel; fall back to a search if not.
            _ => self.states.iter_mut().find(|e| e.0 == tag),
        };
        if let Some(entry) = entry.filter(|e| e.1 == State::Pending) {
            entry.1 = State::Done(now);
            self.done += 1;
            self.waiting_since.get_or_insert(now);
        }
    }

    /// The acks to send at `now`; `lags` gets, per job acked, how long it
    /// had been final.
    pub fn take(&mut self, now: Instant, out: &mut Vec<Ack>, lags: &mut Vec<Duration>) {
        let mut last_done = None;
        let mut run = 0usize;
        while let Some(&(tag, state)) = self.states.front() {
            if state == State::Pending {
                break;
            }
            if let State::Done(at) = state {
                last_done = Some(tag);
                run += 1;
                lags.push(now.saturating_duration_since(at));
                self.unacked.ack(tag, self.current_from);
            }
            self.states.pop_front();
        }
        self.done -= run;
        if let Some(tag) = last_done {
            out.push(Ack {
                tag,
                multiple: run > 1,
            });
        }
        let overdue = self.deadline().is_some_and(|at| now >= at);
        if self.done > 0 && (self.done > self.slack || overdue) {
            for entry in self.states.iter_mut() {
                if let State::Done(at) = entry.1 {
                    entry.1 = State::Acked;
                    lags.push(now.saturating_duration_since(at));
                    out.push(Ack {
                        tag: entry.0,
                        multiple: false,
                    });
                    self.unacked.ack(entry.0, self.current_from);
                }
            }
            self.done = 0;
        }
        if self.done == 0 {
            self.waiting_since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_final_after_its_tokens_and_results() {
        let mut l = Ledger::default();
        l.open(JobKey(1), 7, 100, 3, 0);
        assert_eq!(l.token_done(JobKey(1), 0), Progress::Open);
        assert_eq!(l.token_done(JobKey(1), 1), Progress::Open);
        assert_eq!(
            l.token_done(JobKey(1), 0),
            Progress::Open,
            "a result is still unconfirmed"
        );
        assert_eq!(l.held_bytes(), 100, "held until final");
        assert_eq!(l.result_confirmed(JobKey(1)), Some(7));
        assert!(l.is_empty());
        assert_eq!(l.held_bytes(), 0);
        assert_eq!(
            l.token_done(JobKey(1), 0),
            Progress::Open,
            "unknown jobs are ignored"
        );
        l.open(JobKey(2), 8, 100, 1, 0);
        assert_eq!(l.token_done(JobKey(2), 0), Progress::Final(8));
    }

    #[test]
    fn deferred_tokens_leave_in_one_retry_job_once_the_rest_is_final() {
        let t = |n: u8| DeviceToken::from_bytes([n; 32]);
        let mut l = Ledger::default();
        l.open(JobKey(3), 4, 100, 3, 0);
        assert_eq!(l.token_deferred(JobKey(3), t(1)), Progress::Open);
        assert_eq!(l.token_deferred(JobKey(3), t(2)), Progress::Open);
        assert_eq!(
            l.token_done(JobKey(3), 0),
            Progress::Retry(Tokens::from_iter([t(1), t(2)]))
        );
        assert!(
            l.contains(JobKey(3)),
            "final only once the retry job is confirmed"
        );
        assert_eq!(l.result_confirmed(JobKey(3)), Some(4));
        assert!(l.is_empty());
    }

    #[test]
    fn a_fan_out_job_counts_its_tokens_in_runs() {
        let mut l = Ledger::default();
        l.open(JobKey(3), 4, 100, 10_000, 0);
        assert_eq!(l.tokens_accepted(JobKey(3), 6_000), Progress::Open);
        assert_eq!(l.tokens_accepted(JobKey(3), 4_000), Progress::Final(4));
        assert!(l.is_empty());
    }

    #[test]
    fn a_rejected_job_waits_for_its_result() {
        let mut l = Ledger::default();
        l.open(JobKey(2), 9, 100, 0, 1);
        assert!(l.contains(JobKey(2)));
        assert_eq!(l.result_confirmed(JobKey(2)), Some(9));
    }

    /// A planner whose final deliveries never wait long enough to be acked
    /// for their wait alone, with its clock.
    fn planner(slack: usize) -> (AckPlanner, Instant) {
        (
            AckPlanner::new(slack, Duration::from_secs(3600)),
            Instant::now(),
        )
    }

    fn acks(p: &mut AckPlanner, now: Instant) -> Vec<(u64, bool)> {
        let mut out = Vec::new();
        p.take(now, &mut out, &mut Vec::new());
        out.into_iter().map(|a| (a.tag, a.multiple)).collect()
    }

    #[test]
    fn a_final_delivery_behind_a_pending_one_is_acked_after_max_wait() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut p = AckPlanner::new(100, ms(5));
        for t in 1..=3 {
            p.delivered(t);
        }
        assert_eq!(p.deadline(), None, "nothing final, nothing to wake up for");
        p.done(2, t0);
        p.done(3, t0 + ms(2));
        assert_eq!(p.deadline(), Some(t0 + ms(5)));
        assert_eq!(
            acks(&mut p, t0 + ms(4)),
            vec![],
            "within max_wait and slack"
        );
        let (mut out, mut lags) = (Vec::new(), Vec::new());
        p.take(t0 + ms(5), &mut out, &mut lags);
        let out: Vec<(u64, bool)> = out.into_iter().map(|a| (a.tag, a.multiple)).collect();
        assert_eq!(out, vec![(2, false), (3, false)]);
        assert_eq!(lags, vec![ms(5), ms(3)]);
        assert_eq!(p.deadline(), None);
        assert_eq!(p.unacked().total, 1);
        p.done(1, t0 + ms(9));
        lags.clear();
        p.take(t0 + ms(10), &mut Vec::new(), &mut lags);
        assert_eq!(lags, vec![ms(1)], "the front run's lag, once per job");
        assert_eq!(p.unacked().total, 0);
    }

    #[test]
    fn the_front_run_reports_one_lag_per_job() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut p = AckPlanner::new(8, ms(5));
        for t in 1..=3 {
            p.delivered(t);
            p.done(t, t0 + ms(t));
        }
        let (mut out, mut lags) = (Vec::new(), Vec::new());
        p.take(t0 + ms(3), &mut out, &mut lags);
        assert_eq!(
            out,
            vec![Ack {
                tag: 3,
                multiple: true
            }]
        );
        assert_eq!(lags, vec![ms(2), ms(1), ms(0)]);
    }

    #[test]
    fn contiguous_final_deliveries_share_one_multiple_ack() {
        let (mut p, now) = planner(8);
        for t in 1..=5 {
            p.delivered(t);
        }
        p.done(2, now);
        p.done(1, now);
        p.done(3, now);
        assert_eq!(acks(&mut p, now), vec![(3, true)]);
        p.done(5, now);
        assert_eq!(
            acks(&mut p, now),
            vec![],
            "5 waits behind 4 within the slack"
        );
        p.done(4, now);
        assert_eq!(acks(&mut p, now), vec![(5, true)]);
        assert_eq!(p.unacked().total, 0);
        p.delivered(6);
        p.done(6, now);
        assert_eq!(acks(&mut p, now), vec![(6, false)]);
    }

    #[test]
    fn a_stuck_delivery_does_not_hold_the_others() {
        let (mut p, now) = planner(2);
        for t in 1..=5 {
            p.delivered(t);
        }
        for t in 2..=5 {
            p.done(t, now);
        }
        assert_eq!(
            acks(&mut p, now),
            vec![(2, false), (3, false), (4, false), (5, false)]
        );
        assert_eq!(p.unacked().total, 1);
        p.done(1, now);
        // 2..=5 are acked already: a multiple ack up to 1 never covers them twice.
        assert_eq!(acks(&mut p, now), vec![(1, false)]);
        assert_eq!(p.unacked().total, 0);
    }

    #[test]
    fn unacked_deliveries_are_counted_per_subscription_until_acked() {
        let (mut p, now) = planner(8);
        let count = |p: &AckPlanner| (p.unacked().total, p.unacked().current);
        for t in 1..=3 {
            p.delivered(t);
        }
        p.done(2, now);
        assert_eq!(
            count(&p),
            (3, 3),
            "final is not acked: the slot stays taken"
        );
        p.resubscribed();
        assert_eq!(count(&p), (3, 0), "none of them is the new subscription's");
        // The cancelled subscription still hands over what it had sent.
        p.delivered(4);
        p.current_starts(5);
        p.delivered(5);
        p.current_starts(6);
        p.delivered(6);
        assert_eq!(count(&p), (6, 2));
        p.done(6, now);
        assert_eq!(
            acks(&mut p, now),
            vec![],
            "6 waits behind 1 within the slack"
        );
        assert_eq!(count(&p), (6, 2));
        for t in [1, 3, 4] {
            p.done(t, now);
        }
        assert_eq!(acks(&mut p, now), vec![(4, true)]);
        assert_eq!(count(&p), (2, 2));
        p.done(5, now);
        assert_eq!(acks(&mut p, now), vec![(6, true)]);
        assert_eq!(count(&p), (0, 0));
    }

    #[test]
    fn acks_around_a_stuck_delivery_free_their_slots() {
        let (mut p, now) = planner(1);
        for t in 1..=4 {
            p.delivered(t);
        }
        p.resubscribed();
        p.current_starts(5);
        p.delivered(5);
        for t in [3, 4, 5] {
            p.done(t, now);
        }
        assert_eq!(acks(&mut p, now), vec![(3, false), (4, false), (5, false)]);
        assert_eq!((p.unacked().total, p.unacked().current), (2, 0));
        p.done(1, now);
        p.done(2, now);
        assert_eq!(acks(&mut p, now), vec![(2, true)]);
        assert_eq!(p.unacked(), Unacked::default());
    }
}
