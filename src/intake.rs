//! How much the broker may push at once. `amqp.prefetch` bounds the
//! unacknowledged jobs by count, but one fan-out job can be a megabyte of
//! JSON, and at a prefetch of 20,000 that is no bound at all.
//! `amqp.prefetch_bytes` bounds the job bytes held as well. RabbitMQ has no
//! byte prefetch (it ignores `prefetch_size`) and fixes a consumer's prefetch
//! when it subscribes, so the pipeline subscribes small and subscribes again
//! with whatever prefetch this policy asks for. Pure policy: the pipeline
//! does the I/O.

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
    /// jobs held and their bytes. Over budget: as many jobs as fit at their
    /// average size. Every prefetch slot in use with half the budget free:
    /// twice as many. Either way no more than `max` less the jobs held, since
    /// those stay ours after the cancel, outside the new subscription's count:
    /// `max` bounds what the daemon holds across subscriptions.
    pub fn next(&self, held_jobs: usize, held_bytes: u64) -> Option<u16> {
        if self.budget == 0 {
            return None;
        }
        let room = usize::from(self.max).saturating_sub(held_jobs);
        let current = usize::from(self.current);
        let next = if held_bytes > self.budget {
            let fit = u128::from(self.budget) * held_jobs as u128 / u128::from(held_bytes);
            Some((fit as usize).clamp(1, current).min(room)).filter(|&n| n >= 1 && n < current)
        } else if held_jobs >= current && held_bytes <= self.budget / 2 {
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

    #[test]
    fn small_jobs_double_the_prefetch_while_the_maximum_leaves_room() {
        let mut p = Prefetch::new(300, 1 << 20);
        assert_eq!(p.current(), START);
        assert_eq!(p.next(15, 15 * 200), None, "a free slot: no need for more");
        let mut steps = Vec::new();
        while let Some(next) = p.next(usize::from(p.current()), 200) {
            p.set(next);
            steps.push(next);
        }
        // 128 held and 172 more make the 300 the daemon may hold.
        assert_eq!(steps, [32, 64, 128, 172]);
        assert_eq!(p.next(299, 200), None, "no room: no new subscription");
    }

    #[test]
    fn large_jobs_keep_it_where_their_bytes_fit() {
        let job = 670_000u64;
        let budget = 32 << 20;
        let mut p = Prefetch::new(20_000, budget);
        p.set(p.next(16, 16 * job).unwrap());
        assert_eq!(p.current(), 32);
        assert_eq!(p.next(32, 32 * job), None, "over half the budget: it stays");
        // Jobs held from a larger subscription than the bytes allow.
        p.set(100);
        assert_eq!(p.next(100, 100 * job), Some(50), "over budget: what fits");
        p.set(50);
        assert_eq!(p.next(100, 100 * job), None, "it shrinks once, not again");
        assert_eq!(
            p.next(1, 64 << 20),
            Some(1),
            "one job over budget: one slot"
        );
        assert_eq!(
            Prefetch::new(100, budget).next(100, 200 << 20),
            None,
            "no room below the maximum: wait for jobs to finish"
        );
    }

    proptest::proptest! {
        /// Whatever is held, a new subscription never lets the daemon hold
        /// more than `max` jobs, and always has a slot.
        #[test]
        fn a_new_prefetch_stays_within_the_maximum(
            max in 1u16..=u16::MAX, budget in 0u64..1 << 30, current in 1u16..=u16::MAX,
            held in 0usize..70_000, bytes in 0u64..1 << 32,
        ) {
            let mut p = Prefetch::new(max, budget);
            p.set(current);
            if let Some(n) = p.next(held, bytes) {
                proptest::prop_assert!(n >= 1);
                proptest::prop_assert!(usize::from(n) + held <= usize::from(max));
                proptest::prop_assert_ne!(n, p.current());
            }
        }
    }

    #[test]
    fn no_budget_leaves_the_configured_prefetch() {
        let p = Prefetch::new(500, 0);
        assert_eq!(p.current(), 500);
        assert_eq!(p.next(500, u64::MAX), None);
        assert_eq!(Prefetch::new(8, 1 << 20).current(), 8);
    }
}
