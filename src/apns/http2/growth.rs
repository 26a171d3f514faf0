//! How many HTTP/2 connections an app keeps open.
//!
//! One connection carries at most `streams ÷ round trip` notifications a
//! second: at Apple's tens of milliseconds, two connections of 1000 streams
//! cap an app near 40,000/s however fast apnsd is. So while every stream is
//! busy and work waits, the app opens more connections (as many as the
//! waiting work would fill, at most doubling at once), up to
//! `max_connections`; once the load fits in one connection fewer, it closes
//! one again, down to `connections` (as Go's HTTP/2 transport and Pushy's
//! channel pool do).
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
/// connection is added: half of a typical APNs round trip.
pub const GROW_AFTER: Duration = Duration::from_millis(25);

/// How long the load must fit in one connection fewer before one is closed.
pub const SHRINK_AFTER: Duration = Duration::from_secs(60);

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
    /// Notifications waiting for a stream.
    pub waiting: usize,
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
    /// Since when every stream has been busy with work waiting.
    saturated_since: Option<Instant>,
    /// Since when the load has fit in one connection fewer.
    spare_since: Option<Instant>,
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
        // A connection on its way changes the capacity: judge again once it is up.
        if load.opening > 0 || total < self.min {
            self.reset();
            return Change::Hold;
        }
        if load.saturated() && total < self.max {
            self.spare_since = None;
            if lasted(&mut self.saturated_since, now, self.grow_after) {
                return Change::Grow(self.step(load, total));
            }
            return Change::Hold;
        }
        if load.spare() && total > self.min {
            self.saturated_since = None;
            if lasted(&mut self.spare_since, now, self.shrink_after) {
                return Change::Shrink;
            }
            return Change::Hold;
        }
        self.reset();
        Change::Hold
    }

    /// How many to add at once: enough for the work waiting, at most as
    /// many as are open (doubling, as TCP's slow start does, so 2 reach 32
    /// in four steps rather than thirty), never beyond `max`.
    fn step(&self, load: Load, total: usize) -> usize {
        let per_connection = (load.capacity / load.open.max(1)).max(1);
        let needed = load.waiting.div_ceil(per_connection).max(1);
        needed.min(total.max(1)).min(self.max - total)
    }

    fn reset(&mut self) {
        self.saturated_since = None;
        self.spare_since = None;
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
        }
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn grows_once_saturation_has_lasted() {
        let mut g = policy(2, 4);
        let t0 = Instant::now();
        assert_eq!(g.observe(load(2, 2000, 50), t0), Change::Hold);
        assert_eq!(g.observe(load(2, 2000, 50), ms(t0, 19)), Change::Hold);
        assert_eq!(g.observe(load(2, 2000, 50), ms(t0, 20)), Change::Grow(1));
        // The next grow needs a full span of its own.
        assert_eq!(g.observe(load(2, 2000, 50), ms(t0, 21)), Change::Hold);
        assert_eq!(g.observe(load(2, 2000, 50), ms(t0, 40)), Change::Hold);
        assert_eq!(g.observe(load(2, 2000, 50), ms(t0, 41)), Change::Grow(1));
    }

    #[test]
    fn streams_freed_and_not_yet_refilled_still_count_as_saturated() {
        let mut g = policy(2, 4);
        let t0 = Instant::now();
        // Lanes refill their streams a moment after answers free them: 1,850
        // of 2,000 busy with work waiting is saturation, 1,750 is not.
        assert_eq!(g.observe(load(2, 1850, 50), t0), Change::Hold);
        assert_eq!(g.observe(load(2, 2000, 50), ms(t0, 10)), Change::Hold);
        assert_eq!(g.observe(load(2, 1800, 50), ms(t0, 20)), Change::Grow(1));
        assert_eq!(g.observe(load(2, 1750, 50), ms(t0, 30)), Change::Hold);
        assert_eq!(g.observe(load(2, 1900, 50), ms(t0, 45)), Change::Hold);
    }

    #[test]
    fn a_step_opens_what_the_waiting_work_fills_at_most_doubling() {
        let t0 = Instant::now();
        let step = |open: usize, waiting: usize, max: usize| {
            let mut g = policy(1, max);
            g.observe(load(open, open * STREAMS, waiting), t0);
            g.observe(load(open, open * STREAMS, waiting), ms(t0, 20))
        };
        assert_eq!(step(2, 1, 32), Change::Grow(1));
        assert_eq!(step(2, 1500, 32), Change::Grow(2));
        assert_eq!(step(4, 2001, 32), Change::Grow(3));
        assert_eq!(step(4, 100_000, 32), Change::Grow(4), "doubling at most");
        assert_eq!(step(30, 100_000, 32), Change::Grow(2), "never beyond max");
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
        assert_eq!(g.observe(load(2, 2000, 50), ms(t0, 35)), Change::Grow(1));
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
