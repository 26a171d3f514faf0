//! Counters the daemon keeps about itself. Plain atomics, owned by one daemon
//! instance (so tests running several daemons in one process stay apart).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Everything apnsd counts. Names follow the Prometheus names they render as.
#[derive(Debug, Default)]
pub struct Stats {
    pub jobs_consumed: Counter,
    pub jobs_rejected: Counter,
    pub jobs_acked: Counter,
    /// Frames handed to a socket and flushed.
    pub written: Counter,
    pub accepted: Counter,
    pub failed: Counter,
    /// Retried after a transient status (1 or 255).
    pub retried: Counter,
    /// Resent because an earlier notification on the connection failed.
    pub resent_after_error: Counter,
    /// Resent because a connection closed without saying what it processed:
    /// these are the only possible duplicates.
    pub resent_after_close: Counter,
    pub connections: Counter,
    pub connect_failures: Counter,
    pub stalls: Counter,
    pub connections_up: Gauge,
    pub feedback_tokens: Counter,
}

/// A plain copy of [`Stats`], for tests and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    pub jobs_consumed: u64,
    pub jobs_rejected: u64,
    pub jobs_acked: u64,
    pub written: u64,
    pub accepted: u64,
    pub failed: u64,
    pub retried: u64,
    pub resent_after_error: u64,
    pub resent_after_close: u64,
    pub connections: u64,
    pub connect_failures: u64,
    pub stalls: u64,
    pub feedback_tokens: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            jobs_consumed: self.jobs_consumed.get(),
            jobs_rejected: self.jobs_rejected.get(),
            jobs_acked: self.jobs_acked.get(),
            written: self.written.get(),
            accepted: self.accepted.get(),
            failed: self.failed.get(),
            retried: self.retried.get(),
            resent_after_error: self.resent_after_error.get(),
            resent_after_close: self.resent_after_close.get(),
            connections: self.connections.get(),
            connect_failures: self.connect_failures.get(),
            stalls: self.stalls.get(),
            feedback_tokens: self.feedback_tokens.get(),
        }
    }
}
