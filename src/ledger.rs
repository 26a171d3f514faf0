//! Per-job completion: a job's AMQP delivery is acknowledged only when every
//! token has a final outcome and every result it caused is confirmed by the
//! broker. Pure bookkeeping; the pipeline does the I/O.

use std::collections::{HashMap, VecDeque};

/// Names one job for the life of the process (never reused, unlike delivery
/// tags, which restart with every channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobKey(pub u64);

#[derive(Debug)]
struct Open {
    tag: u64,
    tokens: u32,
    results: u32,
}

#[derive(Debug, Default)]
pub struct Ledger {
    jobs: HashMap<JobKey, Open>,
}

impl Ledger {
    /// Registers a job with `tokens` notifications and `results` results
    /// already owed (a rejected job owes one and has no tokens).
    pub fn open(&mut self, key: JobKey, tag: u64, tokens: u32, results: u32) {
        self.jobs.insert(
            key,
            Open {
                tag,
                tokens,
                results,
            },
        );
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
    /// Returns the delivery tag once the whole job is final.
    pub fn token_done(&mut self, key: JobKey, results: u32) -> Option<u64> {
        let open = self.jobs.get_mut(&key)?;
        open.tokens = open.tokens.saturating_sub(1);
        open.results += results;
        self.settle_if_final(key)
    }

    /// `n` tokens were accepted without a result to publish: a fan-out job's
    /// tokens settle in runs. Returns the delivery tag once the job is final.
    pub fn tokens_accepted(&mut self, key: JobKey, n: u32) -> Option<u64> {
        let open = self.jobs.get_mut(&key)?;
        open.tokens = open.tokens.saturating_sub(n);
        self.settle_if_final(key)
    }

    /// The broker confirmed one of the job's results.
    pub fn result_confirmed(&mut self, key: JobKey) -> Option<u64> {
        let open = self.jobs.get_mut(&key)?;
        open.results = open.results.saturating_sub(1);
        self.settle_if_final(key)
    }

    fn settle_if_final(&mut self, key: JobKey) -> Option<u64> {
        let open = self.jobs.get(&key)?;
        if open.tokens == 0 && open.results == 0 {
            self.jobs.remove(&key).map(|o| o.tag)
        } else {
            None
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
    Done,
    Acked,
}

/// Plans acks for one channel: one multiple-ack for each run of final deliveries
/// at the front, so a busy queue costs one ack frame per batch, not per job.
/// A delivery stuck behind a slow one is acked on its own once more than
/// `slack` final ones wait behind it, so one slow job never holds the prefetch.
#[derive(Debug)]
pub struct AckPlanner {
    /// Delivery tags in the order received (consecutive on a channel).
    states: VecDeque<(u64, State)>,
    slack: usize,
    /// Entries in `states` that are `Done`: kept as a count so planning stays
    /// cheap with a large prefetch.
    done: usize,
}

impl AckPlanner {
    pub fn new(slack: usize) -> Self {
        AckPlanner {
            states: VecDeque::new(),
            slack,
            done: 0,
        }
    }

    pub fn delivered(&mut self, tag: u64) {
        self.states.push_back((tag, State::Pending));
    }

    pub fn done(&mut self, tag: u64) {
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
            entry.1 = State::Done;
            self.done += 1;
        }
    }

    /// Deliveries still waiting for their ack.
    pub fn unacked(&self) -> usize {
        self.states.iter().filter(|e| e.1 != State::Acked).count()
    }

    /// The acks to send now.
    pub fn take(&mut self, out: &mut Vec<Ack>) {
        let mut last_done = None;
        let mut run = 0usize;
        while let Some(&(tag, state)) = self.states.front() {
            if state == State::Pending {
                break;
            }
            if state == State::Done {
                last_done = Some(tag);
                run += 1;
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
        if self.done > self.slack {
            for entry in self.states.iter_mut().filter(|e| e.1 == State::Done) {
                entry.1 = State::Acked;
                out.push(Ack {
                    tag: entry.0,
                    multiple: false,
                });
            }
            self.done = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_final_after_its_tokens_and_results() {
        let mut l = Ledger::default();
        l.open(JobKey(1), 7, 3, 0);
        assert_eq!(l.token_done(JobKey(1), 0), None);
        assert_eq!(l.token_done(JobKey(1), 1), None);
        assert_eq!(
            l.token_done(JobKey(1), 0),
            None,
            "a result is still unconfirmed"
        );
        assert_eq!(l.result_confirmed(JobKey(1)), Some(7));
        assert!(l.is_empty());
        assert_eq!(l.token_done(JobKey(1), 0), None, "unknown jobs are ignored");
    }

    #[test]
    fn a_fan_out_job_counts_its_tokens_in_runs() {
        let mut l = Ledger::default();
        l.open(JobKey(3), 4, 10_000, 0);
        assert_eq!(l.tokens_accepted(JobKey(3), 6_000), None);
        assert_eq!(l.tokens_accepted(JobKey(3), 4_000), Some(4));
        assert!(l.is_empty());
    }

    #[test]
    fn a_rejected_job_waits_for_its_result() {
        let mut l = Ledger::default();
        l.open(JobKey(2), 9, 0, 1);
        assert!(l.contains(JobKey(2)));
        assert_eq!(l.result_confirmed(JobKey(2)), Some(9));
    }

    fn acks(p: &mut AckPlanner) -> Vec<(u64, bool)> {
        let mut out = Vec::new();
        p.take(&mut out);
        out.into_iter().map(|a| (a.tag, a.multiple)).collect()
    }

    #[test]
    fn contiguous_final_deliveries_share_one_multiple_ack() {
        let mut p = AckPlanner::new(8);
        for t in 1..=5 {
            p.delivered(t);
        }
        p.done(2);
        p.done(1);
        p.done(3);
        assert_eq!(acks(&mut p), vec![(3, true)]);
        p.done(5);
        assert_eq!(acks(&mut p), vec![], "5 waits behind 4 within the slack");
        p.done(4);
        assert_eq!(acks(&mut p), vec![(5, true)]);
        assert_eq!(p.unacked(), 0);
        p.delivered(6);
        p.done(6);
        assert_eq!(acks(&mut p), vec![(6, false)]);
    }

    #[test]
    fn a_stuck_delivery_does_not_hold_the_others() {
        let mut p = AckPlanner::new(2);
        for t in 1..=5 {
            p.delivered(t);
        }
        for t in 2..=5 {
            p.done(t);
        }
        assert_eq!(
            acks(&mut p),
            vec![(2, false), (3, false), (4, false), (5, false)]
        );
        assert_eq!(p.unacked(), 1);
        p.done(1);
        // 2..=5 are acked already: a multiple ack up to 1 never covers them twice.
        assert_eq!(acks(&mut p), vec![(1, false)]);
        assert_eq!(p.unacked(), 0);
    }
}
