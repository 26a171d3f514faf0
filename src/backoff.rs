//! Capped exponential backoff with jitter, shared by every reconnect loop so
//! no failure can turn into a tight loop against APNs or the broker.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// The next delay: uniformly in `[current/2, current]`, then doubling up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let low = ceiling / 2;
        rand::rng().random_range(low..=ceiling)
    }

    /// The longest delay after `failures` failures in a row (`min` after the
    /// first), without jitter or state: for pauses each notification counts
    /// for itself, which must not come early.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        self.min.saturating_mul(1 << doublings).min(self.max)
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400) && delays[3] <= Duration::from_millis(800));
        for d in &delays[4..] {
            assert!(
                *d >= Duration::from_millis(500) && *d <= Duration::from_secs(1),
                "{d:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<_> = (1..=6).map(|a| b.ceiling(a)).collect();
        assert_eq!(d[0], Duration::from_millis(100));
        assert_eq!(d[1], Duration::from_millis(200));
        assert_eq!(d[3], Duration::from_millis(800));
        assert_eq!(d[5], Duration::from_secs(1));
        assert_eq!(b.ceiling(255), Duration::from_secs(1));
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
    }
}
