//! Time helpers every side shares: unix seconds for APNs' wire formats, and
//! an optional deadline as a `select!` arm.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// `t` in whole unix seconds; 0 for a clock set before 1970.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Now, in whole unix seconds.
pub fn unix_now() -> u64 {
    unix_secs(SystemTime::now())
}

/// Sleeps until `at`, or forever: a `select!` arm for an optional deadline.
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn unix_seconds_count_from_the_epoch_and_floor_before_it() {
        assert_eq!(
            unix_secs(UNIX_EPOCH + Duration::from_millis(1_700_000_000_999)),
            1_700_000_000
        );
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_secs(5)), 0);
    }

    #[tokio::test]
    async fn no_deadline_never_fires_and_a_deadline_does() {
        let at = Instant::now() + Duration::from_millis(5);
        tokio::select! {
            _ = sleep_until(None) => panic!("no deadline fired"),
            _ = sleep_until(Some(at)) => {}
        }
    }
}
