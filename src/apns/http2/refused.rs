//! What a stream the server refused (`RST_STREAM REFUSED_STREAM`) costs its
//! notification.
//!
//! A refused stream was not processed, so sending it again is safe, and a
//! server shedding load (or a stream limit lowered while requests were in
//! flight) refuses a few streams now and then: those go again without using
//! up a try. But a server that refuses one token every time would turn a
//! resend at once into a loop of thousands of resets a second and a job that
//! never ends. So every resend waits, doubling, and past [`FREE_REFUSALS`]
//! each refusal counts as a try like any transient answer, ending the
//! notification as `failed.refused_stream` once its tries are used up.
//!
//! Pure policy: the lane counts refusals per notification and acts on the step.

use std::time::Duration;

/// Refusals a notification may meet before they count as tries.
pub const FREE_REFUSALS: u8 = 3;

/// What to do with a notification whose stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send it again after this pause, not counting a try.
    Resend { after: Duration },
    /// Count a try, as for any transient answer (with its pause).
    CountTry,
}

/// The pauses a refused notification waits out, from the app's reconnect bounds.
#[derive(Debug, Clone, Copy)]
pub struct RefusedStreams {
    pub min: Duration,
    pub max: Duration,
}

impl RefusedStreams {
    /// The step after the `refusals`-th refusal of one notification (1 = its first).
    pub fn step(&self, refusals: u8) -> Step {
        if refusals > FREE_REFUSALS {
            return Step::CountTry;
        }
        let doublings = u32::from(refusals.saturating_sub(1));
        Step::Resend {
            after: self.min.saturating_mul(1 << doublings).min(self.max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RefusedStreams = RefusedStreams {
        min: Duration::from_millis(100),
        max: Duration::from_millis(300),
    };

    #[test]
    fn the_first_refusals_pause_doubling_without_a_try() {
        let ms = |m| Step::Resend {
            after: Duration::from_millis(m),
        };
        assert_eq!(POLICY.step(1), ms(100));
        assert_eq!(POLICY.step(2), ms(200));
        assert_eq!(POLICY.step(3), ms(300), "capped at max");
    }

    #[test]
    fn later_refusals_count_as_tries() {
        assert_eq!(POLICY.step(FREE_REFUSALS + 1), Step::CountTry);
        assert_eq!(POLICY.step(u8::MAX), Step::CountTry);
    }

    #[test]
    fn no_refusal_is_resent_at_once() {
        let zero = RefusedStreams {
            min: Duration::ZERO,
            max: Duration::ZERO,
        };
        // Even with no reconnect pause configured, the bound holds.
        assert_eq!(zero.step(FREE_REFUSALS + 1), Step::CountTry);
        for r in 1..=FREE_REFUSALS {
            assert!(matches!(POLICY.step(r), Step::Resend { after } if !after.is_zero()));
        }
    }
}
