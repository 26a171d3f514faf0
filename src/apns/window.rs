//! What APNs' silence means: the window of notifications written on one
//! binary-interface connection, and the verdict for each when the connection
//! answers, closes, or stays quiet long enough.
//!
//! Pure policy, no I/O: the lane feeds it writes, flushes, clock ticks, error
//! responses and closes, and acts on the verdicts. Identifiers on a connection
//! are contiguous from 1, so an entry is found by subtraction, not search.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::frame::{Disposition, ErrorResponse, Status};

/// What the lane must do with one notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict<T> {
    pub item: T,
    pub kind: Kind,
    /// The item had already settled as accepted (it was retained): its job may be
    /// final already, so it must not be counted a second time.
    pub late: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// APNs took it: it settled, or a later notification was named in an error.
    Accepted,
    /// An error response named it with a permanent status.
    Failed(Status),
    /// An error response named it with a transient status: try again, counting the attempt.
    Retry(Status),
    /// Written after the one that failed: APNs dropped it. Resend, not an attempt.
    Resend,
    /// The connection closed without saying what it processed: resend, maybe twice.
    Ambiguous,
}

/// Entries up to (not including) `end` reached the socket, or were retained, at `at`.
#[derive(Debug, Clone, Copy)]
struct Mark {
    end: u32,
    at: Instant,
}

/// The notifications written on one connection, oldest first. Identifiers
/// are contiguous, so entries hold only the item: an identifier is a
/// position, and a time is kept once per flush (or settling tick), not per entry.
pub struct Window<T> {
    /// Written but not yet settled; the front has identifier `front_id`.
    unsettled: VecDeque<T>,
    /// The identifier of `unsettled`'s front (the next one to push when empty).
    front_id: u32,
    /// Flushes whose entries are still unsettled, oldest first.
    flushes: VecDeque<Mark>,
    /// Settled as accepted, kept for `retain` so a late error can still be
    /// acted on. They are the identifiers just before `front_id`.
    retained: VecDeque<T>,
    /// When each run of retained entries settled, oldest first.
    settled: VecDeque<Mark>,
    settle: Duration,
    retain: Duration,
    retain_cap: usize,
}

impl<T: Clone> Window<T> {
    pub fn new(settle: Duration, retain: Duration, retain_cap: usize) -> Self {
        Window {
            unsettled: VecDeque::new(),
            front_id: 0,
            flushes: VecDeque::new(),
            retained: VecDeque::new(),
            settled: VecDeque::new(),
            settle,
            retain,
            retain_cap,
        }
    }

    /// Unsettled entries: the number the lane bounds with its `window` setting.
    pub fn len(&self) -> usize {
        self.unsettled.len()
    }

    pub fn is_empty(&self) -> bool {
        self.unsettled.is_empty()
    }

    /// One past the last identifier pushed.
    fn end_id(&self) -> u32 {
        self.front_id.wrapping_add(self.unsettled.len() as u32)
    }

    /// Records a notification about to be written. `id` must follow the last one.
    pub fn push(&mut self, id: u32, item: T) {
        if self.unsettled.is_empty() && self.retained.is_empty() {
            self.front_id = id;
        }
        debug_assert_eq!(self.end_id(), id);
        self.unsettled.push_back(item);
    }

    /// Everything pushed so far has reached the socket: its settle clock starts now.
    pub fn flushed(&mut self, now: Instant) {
        let end = self.end_id();
        let flushed_to = self.flushes.back().map_or(self.front_id, |m| m.end);
        if end != flushed_to {
            self.flushes.push_back(Mark { end, at: now });
        }
    }

    /// When `tick` next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let settle = self.flushes.front().map(|m| m.at + self.settle);
        let expire = self.settled.front().map(|m| m.at + self.retain);
        match (settle, expire) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Settles entries that have been on the wire for `settle` and forgets
    /// retained ones older than `retain`. Call only while the connection is healthy.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Verdict<T>>) {
        let keep = !self.retain.is_zero() && self.retain_cap > 0;
        let mut settled_to = None;
        while let Some(mark) = self.flushes.front().copied() {
            if mark.at + self.settle > now {
                break;
            }
            self.flushes.pop_front();
            while self.front_id != mark.end {
                let Some(item) = self.unsettled.pop_front() else {
                    break;
                };
                self.front_id = self.front_id.wrapping_add(1);
                if keep {
                    if self.retained.len() == self.retain_cap {
                        self.retained.pop_front();
                    }
                    self.retained.push_back(item.clone());
                }
                out.push(verdict(item, Kind::Accepted, false));
            }
            settled_to = Some(mark.end);
        }
        if let (true, Some(end)) = (keep, settled_to) {
            self.settled.push_back(Mark { end, at: now });
        }
        while let Some(mark) = self.settled.front().copied() {
            if mark.at + self.retain > now {
                break;
            }
            self.settled.pop_front();
            let expired = self.retained.len() - self.retained_from(mark.end);
            self.retained.drain(..expired);
        }
        // Runs whose entries the cap pushed out of `retained` are done with.
        let first = self.first_retained();
        while self
            .settled
            .front()
            .is_some_and(|m| m.end.wrapping_sub(first) as i32 <= 0)
        {
            self.settled.pop_front();
        }
    }

    /// The identifier of the oldest retained entry (`front_id` when none is).
    fn first_retained(&self) -> u32 {
        self.front_id.wrapping_sub(self.retained.len() as u32)
    }

    /// How many retained entries have identifiers at or after `id`.
    fn retained_from(&self, id: u32) -> usize {
        (self.front_id.wrapping_sub(id) as usize).min(self.retained.len())
    }

    /// The gateway answered `resp` and is closing: every entry gets its verdict and
    /// the window is left empty, as the connection is dead.
    pub fn on_error(&mut self, resp: ErrorResponse, out: &mut Vec<Verdict<T>>) {
        if self.unsettled.is_empty() && self.retained.is_empty() {
            return;
        }
        let first = self.first_retained();
        let last = self.end_id().wrapping_sub(1);
        let id = resp.identifier;
        let disposition = resp.status.disposition();
        if id == 0 || id > last {
            // Attributes nothing: what is unsettled may or may not have been processed.
            return self.on_close(out);
        }
        if id < first {
            // Older than anything kept: everything here came after it and was dropped.
            self.drain_retained(|_| Some(Kind::Resend), out);
            self.drain_unsettled(|_| Kind::Resend, out);
            return;
        }
        let named = |e_id: u32| -> Kind {
            use std::cmp::Ordering::*;
            match (e_id.cmp(&id), disposition) {
                (Less, _) | (Equal, Disposition::Shutdown) => Kind::Accepted,
                (Equal, Disposition::Permanent) => Kind::Failed(resp.status),
                (Equal, Disposition::Retry) => Kind::Retry(resp.status),
                (Greater, _) => Kind::Resend,
            }
        };
        // Retained entries are accepted already: only a change of mind is reported.
        self.drain_retained(
            |e_id| Some(named(e_id)).filter(|k| *k != Kind::Accepted),
            out,
        );
        self.drain_unsettled(named, out);
    }

    /// The connection closed (or was abandoned) without an error response.
    pub fn on_close(&mut self, out: &mut Vec<Verdict<T>>) {
        self.retained.clear();
        self.settled.clear();
        self.drain_unsettled(|_| Kind::Ambiguous, out);
    }

    fn drain_retained(&mut self, kind: impl Fn(u32) -> Option<Kind>, out: &mut Vec<Verdict<T>>) {
        let first = self.first_retained();
        self.settled.clear();
        for (i, item) in self.retained.drain(..).enumerate() {
            if let Some(k) = kind(first.wrapping_add(i as u32)) {
                out.push(verdict(item, k, true));
            }
        }
    }

    fn drain_unsettled(&mut self, kind: impl Fn(u32) -> Kind, out: &mut Vec<Verdict<T>>) {
        self.flushes.clear();
        let first = self.front_id;
        self.front_id = self.end_id();
        for (i, item) in self.unsettled.drain(..).enumerate() {
            out.push(verdict(item, kind(first.wrapping_add(i as u32)), false));
        }
    }
}

fn verdict<T>(item: T, kind: Kind, late: bool) -> Verdict<T> {
    Verdict { item, kind, late }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SETTLE: Duration = Duration::from_millis(500);
    const RETAIN: Duration = Duration::from_secs(2);

    fn window_with(n: u32, t0: Instant) -> Window<u32> {
        let mut w = Window::new(SETTLE, RETAIN, 1000);
        for id in 1..=n {
            w.push(id, id);
        }
        w.flushed(t0);
        w
    }

    fn kinds(v: &[Verdict<u32>]) -> Vec<(u32, Kind, bool)> {
        v.iter().map(|v| (v.item, v.kind, v.late)).collect()
    }

    fn err(status: Status, identifier: u32) -> ErrorResponse {
        ErrorResponse { status, identifier }
    }

    #[test]
    fn silence_settles_only_flushed_entries_after_settle() {
        let t0 = Instant::now();
        let mut w = window_with(2, t0);
        w.push(3, 3);
        let mut out = Vec::new();
        w.tick(t0 + SETTLE - Duration::from_millis(1), &mut out);
        assert!(out.is_empty());
        assert_eq!(w.next_deadline(), Some(t0 + SETTLE));
        w.tick(t0 + SETTLE, &mut out);
        assert_eq!(
            kinds(&out),
            vec![(1, Kind::Accepted, false), (2, Kind::Accepted, false)]
        );
        assert_eq!(w.len(), 1, "the unflushed entry waits for its flush");
        w.flushed(t0 + SETTLE);
        out.clear();
        w.tick(t0 + SETTLE * 2, &mut out);
        assert_eq!(kinds(&out), vec![(3, Kind::Accepted, false)]);
    }

    #[test]
    fn permanent_status_fails_the_named_one_and_resends_the_rest() {
        let mut w = window_with(5, Instant::now());
        let mut out = Vec::new();
        w.on_error(err(Status::InvalidToken, 3), &mut out);
        assert_eq!(
            kinds(&out),
            vec![
                (1, Kind::Accepted, false),
                (2, Kind::Accepted, false),
                (3, Kind::Failed(Status::InvalidToken), false),
                (4, Kind::Resend, false),
                (5, Kind::Resend, false),
            ]
        );
        assert!(w.is_empty());
    }

    #[test]
    fn every_permanent_and_transient_status() {
        for code in [1u8, 2, 3, 4, 5, 6, 7, 8, 128, 255] {
            let status = Status::from_code(code);
            let mut w = window_with(3, Instant::now());
            let mut out = Vec::new();
            w.on_error(err(status, 2), &mut out);
            let want = match code {
                1 | 255 => Kind::Retry(status),
                _ => Kind::Failed(status),
            };
            assert_eq!(
                kinds(&out),
                vec![
                    (1, Kind::Accepted, false),
                    (2, want, false),
                    (3, Kind::Resend, false)
                ],
                "status {code}"
            );
        }
    }

    #[test]
    fn shutdown_names_the_last_processed() {
        let mut w = window_with(4, Instant::now());
        let mut out = Vec::new();
        w.on_error(err(Status::Shutdown, 2), &mut out);
        assert_eq!(
            kinds(&out),
            vec![
                (1, Kind::Accepted, false),
                (2, Kind::Accepted, false),
                (3, Kind::Resend, false),
                (4, Kind::Resend, false),
            ]
        );
    }

    #[test]
    fn silent_close_and_unattributable_errors_are_ambiguous() {
        for resp in [
            None,
            Some(err(Status::InvalidToken, 0)),
            Some(err(Status::InvalidToken, 99)),
        ] {
            let t0 = Instant::now();
            let mut w = window_with(3, t0);
            let mut out = Vec::new();
            w.tick(t0 + SETTLE, &mut out);
            w.push(4, 4);
            w.push(5, 5);
            out.clear();
            match resp {
                Some(r) => w.on_error(r, &mut out),
                None => w.on_close(&mut out),
            }
            assert_eq!(
                kinds(&out),
                vec![(4, Kind::Ambiguous, false), (5, Kind::Ambiguous, false)],
                "{resp:?}"
            );
        }
    }

    #[test]
    fn late_error_on_a_retained_entry_resends_what_followed() {
        let t0 = Instant::now();
        let mut w = window_with(3, t0);
        let mut out = Vec::new();
        w.tick(t0 + SETTLE, &mut out);
        w.push(4, 4);
        out.clear();
        w.on_error(err(Status::InvalidToken, 2), &mut out);
        assert_eq!(
            kinds(&out),
            vec![
                (2, Kind::Failed(Status::InvalidToken), true),
                (3, Kind::Resend, true),
                (4, Kind::Resend, false),
            ]
        );
    }

    #[test]
    fn error_older_than_the_window_resends_everything() {
        let t0 = Instant::now();
        let mut w = Window::new(SETTLE, Duration::ZERO, 0);
        for id in 1..=4 {
            w.push(id, id);
        }
        w.flushed(t0);
        let mut out = Vec::new();
        w.tick(t0 + SETTLE, &mut out);
        w.push(5, 5);
        w.push(6, 6);
        out.clear();
        w.on_error(err(Status::Shutdown, 3), &mut out);
        assert_eq!(
            kinds(&out),
            vec![(5, Kind::Resend, false), (6, Kind::Resend, false)]
        );
    }

    #[test]
    fn the_retain_cap_keeps_the_newest_and_their_identifiers() {
        let t0 = Instant::now();
        let mut w = Window::new(SETTLE, RETAIN, 2);
        for id in 1..=5 {
            w.push(id, id);
        }
        w.flushed(t0);
        let mut out = Vec::new();
        w.tick(t0 + SETTLE, &mut out);
        assert_eq!(out.len(), 5);
        out.clear();
        w.on_error(err(Status::InvalidToken, 4), &mut out);
        assert_eq!(
            kinds(&out),
            vec![
                (4, Kind::Failed(Status::InvalidToken), true),
                (5, Kind::Resend, true)
            ]
        );
    }

    #[test]
    fn retained_entries_expire() {
        let t0 = Instant::now();
        let mut w = window_with(2, t0);
        let mut out = Vec::new();
        w.tick(t0 + SETTLE, &mut out);
        assert_eq!(w.next_deadline(), Some(t0 + SETTLE + RETAIN));
        w.tick(t0 + SETTLE + RETAIN, &mut out);
        assert_eq!(w.next_deadline(), None);
        out.clear();
        w.on_close(&mut out);
        assert!(out.is_empty());
    }

    /// Which identifier an error response names, relative to the window.
    #[derive(Debug, Clone)]
    enum Named {
        /// 0: APNs could not tell which.
        Zero,
        /// One of the identifiers written on this connection, picked by index.
        Written(u16),
        /// Past the last one written.
        Beyond,
    }

    #[derive(Debug, Clone)]
    enum Step {
        Write(u8),
        Flush,
        Tick(u16),
        Error(u8, Named),
        Close,
    }

    fn step() -> impl Strategy<Value = Step> {
        let status = prop_oneof![
            prop::sample::select(vec![0u8, 1, 2, 3, 4, 5, 6, 7, 8, 10, 128, 255]),
            any::<u8>(),
        ];
        let named = prop_oneof![
            Just(Named::Zero),
            any::<u16>().prop_map(Named::Written),
            Just(Named::Beyond),
        ];
        prop_oneof![
            4 => (1u8..20).prop_map(Step::Write),
            3 => Just(Step::Flush),
            3 => (0u16..1500).prop_map(Step::Tick),
            2 => (status, named).prop_map(|(s, n)| Step::Error(s, n)),
            1 => Just(Step::Close),
        ]
    }

    /// A notification as the lane tracks it (see `Lane::apply`).
    #[derive(Debug, Clone, Copy)]
    struct Item {
        n: u32,
        attempts: u8,
        reported: bool,
    }

    const MAX_ATTEMPTS: u8 = 3;

    /// What happened to each notification, as the pipeline would count it.
    #[derive(Default)]
    struct Ledger {
        /// Outcomes counted against the job (not `reported`): must end at exactly one.
        counted: std::collections::HashMap<u32, u32>,
        /// Whether that counted outcome was an acceptance.
        accepted: std::collections::HashSet<u32>,
        /// Failures after an acceptance was counted (published on their own).
        late_failures: std::collections::HashMap<u32, u32>,
    }

    impl Ledger {
        /// Mirrors the binary transport's `apply`: outcomes are counted, resends queued in order.
        fn apply(&mut self, out: &mut Vec<Verdict<Item>>, queue: &mut VecDeque<Item>) {
            let mut resend = Vec::new();
            for v in out.drain(..) {
                let mut item = v.item;
                item.reported |= v.late;
                let outcome = match v.kind {
                    Kind::Accepted => Some(true),
                    Kind::Failed(_) => Some(false),
                    Kind::Retry(_) => {
                        item.attempts += 1;
                        (item.attempts >= MAX_ATTEMPTS).then_some(false)
                    }
                    Kind::Resend | Kind::Ambiguous => None,
                };
                match (outcome, item.reported) {
                    (None, _) => resend.push(item),
                    (Some(ok), false) => {
                        *self.counted.entry(item.n).or_default() += 1;
                        if ok {
                            self.accepted.insert(item.n);
                        }
                    }
                    (Some(true), true) => {}
                    (Some(false), true) => *self.late_failures.entry(item.n).or_default() += 1,
                }
            }
            for item in resend.into_iter().rev() {
                queue.push_front(item);
            }
        }
    }

    proptest! {
        /// For any sequence of writes, flushes, clock ticks, error responses
        /// (every status; identifiers 0, written, or beyond the window) and
        /// silent closes, followed by a healthy connection: every notification
        /// gets exactly one outcome counted against its job, and a failure
        /// after an acceptance (a late error on a retained entry) at most once.
        #[test]
        fn every_notification_ends_in_exactly_one_outcome(steps in proptest::collection::vec(step(), 1..80)) {
            let mut now = Instant::now();
            let new_window = || Window::<Item>::new(SETTLE, RETAIN, 50);
            let mut w = new_window();
            let mut written: Vec<u32> = Vec::new();
            let mut next_item = 0u32;
            let mut queue: VecDeque<Item> = VecDeque::new();
            let mut ledger = Ledger::default();
            let mut out = Vec::new();
            for s in steps {
                match s {
                    Step::Write(n) => {
                        for _ in 0..n {
                            let item = queue.pop_front().unwrap_or_else(|| {
                                next_item += 1;
                                Item { n: next_item, attempts: 0, reported: false }
                            });
                            let id = written.len() as u32 + 1;
                            w.push(id, item);
                            written.push(id);
                        }
                    }
                    Step::Flush => w.flushed(now),
                    Step::Tick(ms) => {
                        now += Duration::from_millis(u64::from(ms));
                        w.tick(now, &mut out);
                    }
                    Step::Error(code, named) => {
                        let identifier = match named {
                            Named::Zero => 0,
                            Named::Written(i) if !written.is_empty() => written[usize::from(i) % written.len()],
                            Named::Written(_) | Named::Beyond => written.len() as u32 + 1,
                        };
                        w.on_error(err(Status::from_code(code), identifier), &mut out);
                        prop_assert!(w.is_empty(), "the connection is dead");
                        w = new_window();
                        written.clear();
                    }
                    Step::Close => {
                        w.on_close(&mut out);
                        prop_assert!(w.is_empty());
                        w = new_window();
                        written.clear();
                    }
                }
                ledger.apply(&mut out, &mut queue);
            }
            // A healthy connection takes the rest until everything settled.
            while !queue.is_empty() || !w.is_empty() {
                while let Some(item) = queue.pop_front() {
                    let id = written.len() as u32 + 1;
                    w.push(id, item);
                    written.push(id);
                }
                w.flushed(now);
                now += SETTLE;
                w.tick(now, &mut out);
                ledger.apply(&mut out, &mut queue);
            }
            for item in 1..=next_item {
                let counted = ledger.counted.get(&item).copied().unwrap_or(0);
                prop_assert_eq!(counted, 1, "item {} has {} counted outcomes", item, counted);
                let late = ledger.late_failures.get(&item).copied().unwrap_or(0);
                prop_assert!(late <= 1, "item {} failed late {} times", item, late);
                prop_assert!(late == 0 || ledger.accepted.contains(&item),
                    "a late failure follows an acceptance");
            }
        }
    }
}
