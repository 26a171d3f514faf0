//! What the gateway measures for the benchmark, at a fixed cost per read and
//! nothing kept per notification: when the first and the last frame arrived,
//! and, for tokens stamped with their publish time, a histogram of publish →
//! arrival latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::job::DeviceToken;

/// Sub-buckets per power of two: values are kept within 1/64 (about 1.6%).
const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// Latencies up to 2^40 µs (12 days) fit; anything longer lands in the last bucket.
const BUCKETS: usize = SUB * (40 - SUB_BITS as usize + 2);

/// A token whose first 8 bytes are `prefix` (which spreads tokens over lanes)
/// and whose last 8 bytes carry `published` in unix microseconds, big-endian.
pub fn stamped_token(prefix: u64, published: SystemTime) -> DeviceToken {
    let mut bytes = [0u8; DeviceToken::BINARY_LEN];
    bytes[..8].copy_from_slice(&prefix.to_le_bytes());
    bytes[24..].copy_from_slice(&unix_micros(published).to_be_bytes());
    DeviceToken::from_bytes(bytes)
}

/// The stamp in a token's last 8 bytes (0 for a shorter token).
fn stamp_of(token: &DeviceToken) -> u64 {
    let bytes = token.as_bytes();
    bytes
        .len()
        .checked_sub(8)
        .and_then(|at| bytes[at..].try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Arrival times and latencies. Cheap enough to stay on in sink mode.
pub struct Meter {
    epoch: Instant,
    /// Microseconds since `epoch`, plus one (0 means "nothing yet").
    first: AtomicU64,
    last: AtomicU64,
    latency: Box<[AtomicU64]>,
}

/// The meter's figures at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// From the first frame to the last one; zero with fewer than two reads.
    pub span: Duration,
    /// How many stamped frames were timed.
    pub timed: u64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            epoch: Instant::now(),
            first: AtomicU64::new(0),
            last: AtomicU64::new(0),
            latency: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Meter {
    /// Frames arrived in one read; returns the wall-clock time to time stamped tokens with.
    pub(crate) fn arrived(&self) -> u64 {
        let at = self.epoch.elapsed().as_micros() as u64 + 1;
        let _ = self
            .first
            .compare_exchange(0, at, Ordering::Relaxed, Ordering::Relaxed);
        self.last.fetch_max(at, Ordering::Relaxed);
        unix_micros(SystemTime::now())
    }

    /// Times one stamped token that arrived at `now` (unix microseconds).
    pub(crate) fn time(&self, token: &DeviceToken, now: u64) {
        let micros = now.saturating_sub(stamp_of(token));
        self.latency[bucket(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets everything, for the next measurement.
    pub fn reset(&self) {
        self.first.store(0, Ordering::Relaxed);
        self.last.store(0, Ordering::Relaxed);
        for b in self.latency.iter() {
            b.store(0, Ordering::Relaxed);
        }
    }

    pub fn read(&self) -> Reading {
        let (first, last) = (
            self.first.load(Ordering::Relaxed),
            self.last.load(Ordering::Relaxed),
        );
        let counts: Vec<u64> = self
            .latency
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let timed = counts.iter().sum();
        let quantile = |q: f64| {
            let rank = ((timed as f64 * q).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return Duration::from_micros(upper_bound(i));
                }
            }
            Duration::ZERO
        };
        Reading {
            span: Duration::from_micros(last.saturating_sub(first)),
            timed,
            p50: quantile(0.50),
            p99: quantile(0.99),
            max: quantile(1.0),
        }
    }
}

/// Log-linear buckets: exact below `SUB`, then `SUB` buckets per power of two.
fn bucket(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros() - SUB_BITS;
    let index = (exp as usize + 1) * SUB + ((v >> exp) as usize & (SUB - 1));
    index.min(BUCKETS - 1)
}

/// The largest value that falls in bucket `i`.
fn upper_bound(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let exp = (i / SUB - 1) as u32;
    let mantissa = (SUB + i % SUB) as u64;
    ((mantissa + 1) << exp) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_keep_values_within_two_percent() {
        for v in [0u64, 1, 63, 64, 65, 127, 128, 1000, 4_999, 123_456, 1 << 39] {
            let hi = upper_bound(bucket(v));
            assert!(hi >= v && hi - v <= v / 64, "{v} → {hi}");
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_of_stamped_tokens() {
        let meter = Meter::default();
        let now = meter.arrived();
        let published = |micros_ago: u64| {
            UNIX_EPOCH + Duration::from_micros(now) - Duration::from_micros(micros_ago)
        };
        for ago in 1..=100 {
            meter.time(&stamped_token(ago, published(ago * 100)), now);
        }
        let r = meter.read();
        assert_eq!(r.timed, 100);
        assert!(r.p50 >= Duration::from_micros(5_000) && r.p50 < Duration::from_micros(5_100));
        assert!(r.p99 >= Duration::from_micros(9_900) && r.p99 < Duration::from_micros(10_100));
        meter.reset();
        assert_eq!(meter.read().timed, 0);
    }
}
