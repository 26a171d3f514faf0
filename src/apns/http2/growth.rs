//! How many HTTP/2 connections an app keeps open.
//!
//! One connection carries at most `streams ÷ round trip` notifications a
//! second: at Apple's tens of milliseconds, two connections of 1000 streams
//! cap an app near 40,000/s however fast apnsd is. So while every stream is
//! busy and work waits, the app opens more connections (at most quadrupling
//! at once), up to `max_connections`; once the load fits in one connection
//! fewer, it closes one again, down to `connections` (as Go's HTTP/2
//! transport and Pushy's channel pool do).
//!
//! Busy streams with work waiting say as much about a server that is slow to
//! answer (a CPU-bound sink that answers at once) as about a long round
//! trip, and only for the round trip do more connections help. So each grow
//! is judged: the answers per second after it must rise with the connections
//! added, or growth stops (a plateau) until the app shrinks or
//! `shrink_after` has passed. A grow's effect shows a round trip after its
//! connections open, so the verdict waits two round trips (the busy streams
//! over the answer rate, Little's law).
//!
//! Pure policy, no I/O: the caller reports the load whenever it changes (and
//! on a timer while it does not) and acts on the [`Change`]. Two things keep
//! it from flapping between n and n+1:
//! - a band: growing needs nearly every stream busy with work waiting, shrinking
//!   needs the streams in use to fit in half of one connection fewer, so a
//!   grow never makes a shrink due, nor a shrink a grow;
//! - time: saturation must last [`GROW_AFTER`] (a fraction of a round trip,
//!   so a momentary peak does not open a connection) and spare room
//!   [`SHRINK_AFTER`] (long, as a handshake costs more than an idle
//!   connection), each measured afresh after any change.
//!
//! Keeping `connections` open (reconnecting a lost one) stays with the lanes
//! themselves: below the floor this policy holds.

use std::time::{Duration, Instant};

/// How long every stream must stay busy, with work waiting, before a
/// connection is added: a fifth of a typical APNs round trip. Short, as the
/// verdict on each grow (see the module) bounds an overshoot.
pub const GROW_AFTER: Duration = Duration::from_millis(10);

/// How long the load must fit in one connection fewer before one is closed.
pub const SHRINK_AFTER: Duration = Duration::from_secs(60);

/// The longest round trip a verdict waits for (two of them): a server that
/// takes longer is too slow for more connections to matter soon.
const LONGEST_ROUND_TRIP: Duration = Duration::from_millis(500);

/// An app's HTTP/2 connections and their streams at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    /// Connections taking streams.
    pub open: usize,
    /// Connections being opened (their stream limit is not known yet).
    pub opening: usize,
    /// Streams in flight over the open connections.
    pub busy: usize,
    /// Streams the open connections allow together (each the lower of the
    /// server's limit and `max_concurrent_streams`).
    pub capacity: usize,
    /// Work waiting for a stream: notifications a lane holds, and batches
    /// handed to it and not yet taken (the policy asks only whether any
    /// waits, so the two units may add up).
    pub waiting: usize,
    /// Streams answered so far over the app's connections (a running count;
    /// it may fall when a lane goes away).
    pub answered: u64,
}

impl Load {
    /// Nearly every stream (90%) is busy and work still waits: more streams
    /// would be used. Not every one: answers free streams one at a time and
    /// each lane refills its own a moment later, so a look at a saturated
    /// app's lanes seldom finds all of them full at once, and saturation
    /// must hold at every look for [`GROW_AFTER`].
    fn saturated(&self) -> bool {
        self.waiting > 0 && self.busy * 10 >= self.capacity * 9
    }

    /// The streams in use fit in half of the room one connection fewer
    /// gives, with nothing waiting.
    fn spare(&self) -> bool {
        if self.open < 2 || self.waiting > 0 {
            return false;
        }
        let per_connection = self.capacity / self.open;
        let fewer = self.capacity - per_connection;
        self.busy <= fewer / 2
    }
}

/// What the caller should do with the app's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Hold,
    /// Open this many more connections.
    Grow(usize),
    /// Close one connection once its streams have finished (the one with the
    /// fewest is the cheapest to drain).
    Shrink,
}

/// The growth policy of one app, with the moments its conditions began.
#[derive(Debug, Clone)]
pub struct Growth {
    min: usize,
    max: usize,
    grow_after: Duration,
    shrink_after: Duration,
    /// Since when every stream has been busy with work waiting, and the
    /// answers counted then.
    saturated_since: Option<(Instant, u64)>,
    /// Since when the load has fit in one connection fewer.
    spare_since: Option<Instant>,
    /// The last grow, until its verdict.
    grown: Option<Grown>,
    /// Since when growing has stopped paying.
    plateau: Option<Instant>,
}

/// What the app carried when it last grew.
#[derive(Debug, Clone, Copy)]
struct Grown {
    /// Connections before the grow.
    connections: usize,
    /// Answers per second over the saturated span before it.
    rate: f64,
    /// Busy streams over that rate.
    round_trip: Duration,
}

impl Growth {
    /// `min` is the app's `connections` (at least 1), `max` its
    /// `max_connections` (at least `min`).
    pub fn new(min: usize, max: usize) -> Self {
        Self::with_timing(min, max, GROW_AFTER, SHRINK_AFTER)
    }

    pub fn with_timing(
        min: usize,
        max: usize,
        grow_after: Duration,
        shrink_after: Duration,
    ) -> Self {
        let min = min.max(1);
        Growth {
            min,
            max: max.max(min),
            grow_after,
            shrink_after,
            saturated_since: None,
            spare_since: None,
            grown: None,
            plateau: None,
        }
    }

    /// The fewest connections it keeps.
    pub fn min(&self) -> usize {
        self.min
    }

    /// The most connections it grows to.
    pub fn max(&self) -> usize {
        self.max
    }

    /// How long saturation must last before a connection is added.
    pub fn grow_after(&self) -> Duration {
        self.grow_after
    }

    /// The change `load` calls for at `now`.
    pub fn observe(&mut self, load: Load, now: Instant) -> Change {
        let total = load.open + load.opening;
        if self
            .plateau
            .is_some_and(|since| now.saturating_duration_since(since) >= self.shrink_after)
        {
            self.plateau = None;
        }
        // A connection on its way changes the capacity: judge again once it is up.
        if load.opening > 0 || total < self.min {
            self.reset();
            return Change::Hold;
        }
        if load.saturated() && total < self.max && self.plateau.is_none() {
            self.spare_since = None;
            return self.saturated(load, total, now);
        }
        if load.spare() && total > self.min {
            self.saturated_since = None;
            if lasted(&mut self.spare_since, now, self.shrink_after) {
                // With fewer connections what the last grow showed is stale.
                self.grown = None;
                self.plateau = None;
                return Change::Shrink;
            }
            return Change::Hold;
        }
        self.reset();
        Change::Hold
    }

    /// Saturation seen at `now`: grow once it has lasted long enough, unless
    /// the last grow did not pay.
    fn saturated(&mut self, load: Load, total: usize, now: Instant) -> Change {
        let (began, answered) = *self.saturated_since.get_or_insert((now, load.answered));
        let span = now.saturating_duration_since(began);
        let wait = match self.grown {
            Some(g) => self.grow_after.max(g.round_trip * 2),
            None => self.grow_after,
        };
        if span < wait || span.is_zero() {
            return Change::Hold;
        }
        self.saturated_since = None;
        // Fewer answers than at the span's start: a lane went away; measure afresh.
        let Some(answers) = load.answered.checked_sub(answered) else {
            return Change::Hold;
        };
        let rate = answers as f64 / span.as_secs_f64();
        if let Some(before) = self.grown.take() {
            if !before.paid(total, rate) {
                self.plateau = Some(now);
                return Change::Hold;
            }
        }
        // No answer at all in the span: the round trip is longer still, so
        // streams are surely the limit, and there is no rate to judge by.
        self.grown = (rate > 0.0).then(|| Grown {
            connections: total,
            rate,
            round_trip: Duration::from_secs_f64(load.busy as f64 / rate).min(LONGEST_ROUND_TRIP),
        });
        Change::Grow(self.step(total))
    }

    /// How many to add at once: at most three times as many as are open
    /// (quadrupling, so 2 reach 32 in two steps; the verdict on each grow
    /// bounds an overshoot), never beyond `max`.
    fn step(&self, total: usize) -> usize {
        (3 * total).clamp(1, self.max - total)
    }

    fn reset(&mut self) {
        self.saturated_since = None;
        self.spare_since = None;
    }
}

impl Grown {
    /// Whether `rate` with `connections` rose enough over the rate before
    /// the grow: by a quarter of the connections' own rise (×4 connections
    /// must carry ×1.75), well apart from the ×1 of a server that is the limit.
    fn paid(&self, connections: usize, rate: f64) -> bool {
        let more = connections as f64 / self.connections.max(1) as f64;
        rate >= self.rate * (1.0 + (more - 1.0) / 4.0)
    }
}

/// Whether a condition that holds at `now` has held for `span` (since the
/// moment `since` remembers, set now if unset). Once it has, the moment is
/// forgotten, so the next change needs a full `span` of its own.
fn lasted(since: &mut Option<Instant>, now: Instant, span: Duration) -> bool {
    let began = *since.get_or_insert(now);
    if now.saturating_duration_since(began) >= span {
        *since = None;
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAMS: usize = 1000;
    const GROW: Duration = Duration::from_millis(20);
    const SHRINK: Duration = Duration::from_secs(10);

    fn policy(min: usize, max: usize) -> Growth {
        Growth::with_timing(min, max, GROW, SHRINK)
    }

    /// `open` connections of 1000 streams, `busy` in use, `waiting` queued.
    fn load(open: usize, busy: usize, waiting: usize) -> Load {
        Load {
            open,
            opening: 0,
            busy,
            capacity: open * STREAMS,
            waiting,
            answered: 0,
        }
    }

    /// The same, with `answered` streams answered so far.
    fn answered(open: usize, busy: usize, answered: u64) -> Load {
        Load {
            answered,
            ..load(open, busy, 50)
        }
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn grows_once_saturation_has_lasted() {
        let mut g = policy(2, 64);
        let t0 = Instant::now();
        assert_eq!(g.observe(load(2, 2000, 50), t0), Change::Hold);
        assert_eq!(g.observe(load(2, 2000, 50), ms(t0, 19)), Change::Hold);
        assert_eq!(g.observe(load(2, 2000, 50), ms(t0, 20)), Change::Grow(6));
        // The next grow needs a full span of its own.
        assert_eq!(g.observe(load(2, 2000, 50), ms(t0, 21)), Change::Hold);
        assert_eq!(g.observe(load(2, 2000, 50), ms(t0, 40)), Change::Hold);
        assert_eq!(g.observe(load(2, 2000, 50), ms(t0, 41)), Change::Grow(6));
    }

    #[test]
    fn streams_freed_and_not_yet_refilled_still_count_as_saturated() {
        let mut g = policy(2, 4);
        let t0 = Instant::now();
        // Lanes refill their streams a moment after answers free them: 1,850
        // of 2,000 busy with work waiting is saturation, 1,750 is not.
        assert_eq!(g.observe(load(2, 1850, 50), t0), Change::Hold);
        assert_eq!(g.observe(load(2, 2000, 50), ms(t0, 10)), Change::Hold);
        assert_eq!(g.observe(load(2, 1800, 50), ms(t0, 20)), Change::Grow(2));
        assert_eq!(g.observe(load(2, 1750, 50), ms(t0, 30)), Change::Hold);
        assert_eq!(g.observe(load(2, 1900, 50), ms(t0, 45)), Change::Hold);
    }

    #[test]
    fn a_step_at_most_quadruples_and_never_passes_max() {
        let t0 = Instant::now();
        let step = |open: usize, max: usize| {
            let mut g = policy(1, max);
            g.observe(load(open, open * STREAMS, 1), t0);
            g.observe(load(open, open * STREAMS, 1), ms(t0, 20))
        };
        assert_eq!(step(1, 2), Change::Grow(1));
        assert_eq!(step(2, 32), Change::Grow(6));
        assert_eq!(step(8, 32), Change::Grow(24));
        assert_eq!(step(30, 32), Change::Grow(2), "never beyond max");
    }

    #[test]
    fn a_momentary_peak_does_not_grow() {
        let mut g = policy(2, 4);
        let t0 = Instant::now();
        g.observe(load(2, 2000, 50), t0);
        // Streams came free and nothing waits: the clock starts over.
        assert_eq!(g.observe(load(2, 1999, 0), ms(t0, 10)), Change::Hold);
        assert_eq!(g.observe(load(2, 2000, 50), ms(t0, 15)), Change::Hold);
        assert_eq!(g.observe(load(2, 2000, 50), ms(t0, 30)), Change::Hold);
        assert_eq!(g.observe(load(2, 2000, 50), ms(t0, 35)), Change::Grow(2));
    }

    /// Two connections answering 40,000/s (a 50 ms round trip) grow to 8;
    /// returns the policy and the moment the 8 are up.
    fn grown_at_a_50ms_round_trip() -> (Growth, Instant) {
        let mut g = policy(2, 64);
        let t0 = Instant::now();
        assert_eq!(g.observe(answered(2, 2000, 0), t0), Change::Hold);
        assert_eq!(
            g.observe(answered(2, 2000, 800), ms(t0, 20)),
            Change::Grow(6)
        );
        let opening = Load {
            opening: 6,
            ..answered(2, 2000, 900)
        };
        assert_eq!(g.observe(opening, ms(t0, 30)), Change::Hold);
        (g, ms(t0, 50))
    }

    #[test]
    fn a_grow_that_carries_more_is_followed_by_the_next_two_round_trips_on() {
        let (mut g, up) = grown_at_a_50ms_round_trip();
        let t = |ms| up + Duration::from_millis(ms);
        assert_eq!(g.observe(answered(8, 8000, 1000), up), Change::Hold);
        // The verdict waits two round trips (100 ms), not the 20 ms span.
        assert_eq!(g.observe(answered(8, 8000, 3000), t(20)), Change::Hold);
        assert_eq!(g.observe(answered(8, 8000, 9000), t(99)), Change::Hold);
        // 8 connections answer 100,000/s: ×2.5 of 40,000, more than the ×1.75 asked.
        assert_eq!(
            g.observe(answered(8, 8000, 11_000), t(100)),
            Change::Grow(24)
        );
    }

    #[test]
    fn a_grow_that_carries_no_more_stops_growth_until_shrink_after() {
        let (mut g, up) = grown_at_a_50ms_round_trip();
        let t = |ms| up + Duration::from_millis(ms);
        g.observe(answered(8, 8000, 1000), up);
        // A server that is itself the limit: still 40,000/s (×1, not ×1.75).
        assert_eq!(g.observe(answered(8, 8000, 5000), t(100)), Change::Hold);
        for (at, answers) in [(200, 9000), (5000, 200_000), (9000, 360_000)] {
            assert_eq!(g.observe(answered(8, 8000, answers), t(at)), Change::Hold);
        }
        // After `shrink_after` (10 s here) it tries again.
        let late = t(100) + SHRINK;
        assert_eq!(g.observe(answered(8, 8000, 400_000), late), Change::Hold);
        assert_eq!(
            g.observe(answered(8, 8000, 400_800), late + GROW),
            Change::Grow(24)
        );
    }

    #[test]
    fn fewer_answers_than_at_the_span_start_measure_afresh() {
        let mut g = policy(2, 64);
        let t0 = Instant::now();
        g.observe(answered(2, 2000, 5000), t0);
        // A lane went away with its count: no rate, no grow, a new span.
        assert_eq!(g.observe(answered(2, 2000, 100), ms(t0, 20)), Change::Hold);
        assert_eq!(g.observe(answered(2, 2000, 200), ms(t0, 25)), Change::Hold);
        assert_eq!(g.observe(answered(2, 2000, 300), ms(t0, 44)), Change::Hold);
        assert_eq!(
            g.observe(answered(2, 2000, 900), ms(t0, 45)),
            Change::Grow(6)
        );
    }

    #[test]
    fn busy_streams_without_waiting_work_do_not_grow() {
        let mut g = policy(1, 4);
        let t0 = Instant::now();
        for t in [0, 100, 1000, 60_000] {
            assert_eq!(g.observe(load(1, 1000, 0), ms(t0, t)), Change::Hold);
        }
    }

    #[test]
    fn never_beyond_max_nor_while_a_connection_opens() {
        let mut g = policy(2, 3);
        let t0 = Instant::now();
        let opening = Load {
            opening: 1,
            ..load(2, 2000, 50)
        };
        for t in [0, 50, 500] {
            assert_eq!(g.observe(opening, ms(t0, t)), Change::Hold);
        }
        for t in [600, 700, 5000] {
            assert_eq!(g.observe(load(3, 3000, 50), ms(t0, t)), Change::Hold);
        }
    }

    #[test]
    fn shrinks_once_the_load_fits_in_one_fewer_for_long() {
        let mut g = policy(2, 4);
        let t0 = Instant::now();
        // 4 connections, 1500 busy: fits in half of three (1500).
        assert_eq!(g.observe(load(4, 1500, 0), t0), Change::Hold);
        assert_eq!(g.observe(load(4, 1500, 0), t0 + SHRINK / 2), Change::Hold);
        assert_eq!(g.observe(load(4, 1500, 0), t0 + SHRINK), Change::Shrink);
        // After the shrink, a full span again before the next.
        let t1 = t0 + SHRINK;
        assert_eq!(g.observe(load(3, 100, 0), t1 + SHRINK / 2), Change::Hold);
        assert_eq!(
            g.observe(load(3, 100, 0), t1 + SHRINK * 3 / 2),
            Change::Shrink
        );
    }

    #[test]
    fn never_below_connections() {
        let mut g = policy(2, 4);
        let t0 = Instant::now();
        for t in [0, 10_000, 100_000] {
            assert_eq!(g.observe(load(2, 0, 0), ms(t0, t)), Change::Hold);
        }
        // A lost connection is the lanes' to reconnect, not a reason to grow.
        assert_eq!(g.observe(load(1, 1000, 50), t0), Change::Hold);
        assert_eq!(g.observe(load(1, 1000, 50), ms(t0, 1000)), Change::Hold);
    }

    #[test]
    fn work_in_between_the_thresholds_holds_and_restarts_both_clocks() {
        let mut g = policy(2, 4);
        let t0 = Instant::now();
        g.observe(load(3, 900, 0), t0); // spare: 900 ≤ 1000
                                        // 1200 busy of 3000: not saturated, not spare (1200 > 1000).
        assert_eq!(g.observe(load(3, 1200, 0), t0 + SHRINK / 2), Change::Hold);
        assert_eq!(g.observe(load(3, 900, 0), t0 + SHRINK), Change::Hold);
        assert_eq!(g.observe(load(3, 900, 0), t0 + SHRINK * 2), Change::Shrink);
    }

    #[test]
    fn a_grow_never_makes_a_shrink_due_nor_a_shrink_a_grow() {
        // Any saturated load of n connections, seen with n + 1, is not spare;
        // any spare load of n, seen with n - 1, is not saturated.
        for n in 1..=16 {
            for waiting in [0, 1] {
                let saturated = load(n, n * STREAMS, waiting.max(1));
                assert!(saturated.saturated());
                assert!(!load(n + 1, saturated.busy, waiting).spare(), "n = {n}");
            }
            if n >= 2 {
                let most_spare = (n - 1) * STREAMS / 2;
                assert!(load(n, most_spare, 0).spare());
                assert!(!load(n - 1, most_spare, 1).saturated(), "n = {n}");
            }
        }
    }

    #[test]
    fn bounds_are_made_consistent() {
        let mut g = Growth::new(0, 0);
        assert_eq!((g.min, g.max), (1, 1));
        let t0 = Instant::now();
        assert_eq!(g.observe(load(1, 1000, 9), t0 + GROW_AFTER), Change::Hold);
        let g = Growth::new(4, 2);
        assert_eq!((g.min, g.max), (4, 4));
    }
}
