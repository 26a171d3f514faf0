//! Fault injection: the ways a gateway misbehaves that apnsd must survive.

use std::time::Duration;

use crate::apns::frame::Status;
use crate::apns::http2::ApnsReason;
use crate::job::DeviceToken;

/// Reads the hex token prefix of a rule.
fn parse_prefix(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) || hex.len() > 2 * DeviceToken::MAX_LEN {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Refuse every token starting with `prefix` (bytes) with `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefuseRule {
    pub prefix: Vec<u8>,
    pub status: Status,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refuse rule {0:?}: expected HEXPREFIX=STATUS, e.g. ff=8")]
pub struct BadRule(String);

impl RefuseRule {
    /// Parses `HEXPREFIX=STATUS` (an even number of hex digits, a status code).
    pub fn parse(text: &str) -> Result<RefuseRule, BadRule> {
        let bad = || BadRule(text.to_owned());
        let (hex, status) = text.split_once('=').ok_or_else(bad)?;
        let prefix = parse_prefix(hex).ok_or_else(bad)?;
        let status: u8 = status.trim().parse().map_err(|_| bad())?;
        Ok(RefuseRule {
            prefix,
            status: Status::from_code(status),
        })
    }

    pub fn matches(&self, token: &DeviceToken) -> bool {
        token.as_bytes().starts_with(&self.prefix)
    }
}

/// HTTP/2: answer every token starting with `prefix` with `status` and `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerRule {
    pub prefix: Vec<u8>,
    pub status: u16,
    pub reason: ApnsReason,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("answer rule {0:?}: expected HEXPREFIX=STATUS:REASON, e.g. ff=410:Unregistered")]
pub struct BadAnswerRule(String);

impl AnswerRule {
    /// Parses `HEXPREFIX=STATUS:REASON` with one of Apple's reasons.
    pub fn parse(text: &str) -> Result<AnswerRule, BadAnswerRule> {
        let bad = || BadAnswerRule(text.to_owned());
        let (hex, answer) = text.split_once('=').ok_or_else(bad)?;
        let (status, reason) = answer.split_once(':').ok_or_else(bad)?;
        let reason = ApnsReason::parse(reason.trim());
        let status: u16 = status.trim().parse().map_err(|_| bad())?;
        if reason == ApnsReason::Unknown || !(400..600).contains(&status) {
            return Err(bad());
        }
        Ok(AnswerRule {
            prefix: parse_prefix(hex).ok_or_else(bad)?,
            status,
            reason,
        })
    }
}

/// What the gateway does wrong, changeable while it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    pub refuse: Vec<RefuseRule>,
    /// After every N accepted notifications (over all connections), answer
    /// `(10, last processed)` and close.
    pub shutdown_every: Option<u64>,
    /// After every N accepted notifications, close without a word, dropping
    /// whatever else was read.
    pub close_every: Option<u64>,
    /// Once N notifications were accepted in all, stop reading on every
    /// connection (sockets stay open).
    pub stall_after: Option<u64>,
    /// Sleep this long before each read: a slow gateway.
    pub read_delay: Option<Duration>,
    /// HTTP/2: answer tokens by rule instead of accepting them.
    pub answer: Vec<AnswerRule>,
    /// HTTP/2: send GOAWAY after every N accepted notifications.
    pub goaway_every: Option<u64>,
    /// HTTP/2: `SETTINGS_MAX_CONCURRENT_STREAMS` for new connections (else
    /// 1000, as Apple's).
    pub max_streams: Option<u32>,
    /// HTTP/2: provider tokens older than this are answered 403
    /// `ExpiredProviderToken` (Apple: one hour).
    pub token_max_age: Option<Duration>,
    /// HTTP/2: the first N distinct provider tokens presented are answered
    /// 403 `ExpiredProviderToken` however young they are, as a server whose
    /// clock runs ahead would (`u32::MAX`: every token).
    pub expire_tokens: u32,
    /// HTTP/2: streams for tokens starting with one of these prefixes are
    /// reset with `REFUSED_STREAM` before anything is processed.
    pub refuse_streams: Vec<StreamRule>,
    /// HTTP/2: the initial flow-control window of each stream for new
    /// connections; `Some(0)` lets no request body through (a flow-control
    /// stall: the connection answers PINGs but no request completes).
    pub stream_window: Option<u32>,
}

/// HTTP/2: reset every stream for a token starting with `prefix` with
/// `REFUSED_STREAM`, as a server shedding load does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRule {
    pub prefix: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stream rule {0:?}: expected HEXPREFIX, an even number of hex digits")]
pub struct BadStreamRule(String);

impl StreamRule {
    pub fn parse(text: &str) -> Result<StreamRule, BadStreamRule> {
        let prefix = parse_prefix(text.trim()).ok_or_else(|| BadStreamRule(text.to_owned()))?;
        Ok(StreamRule { prefix })
    }
}

impl Faults {
    pub fn refusal(&self, token: &DeviceToken) -> Option<Status> {
        self.refuse
            .iter()
            .find(|r| r.matches(token))
            .map(|r| r.status)
    }

    pub fn refuses_stream(&self, token: &DeviceToken) -> bool {
        self.refuse_streams
            .iter()
            .any(|r| token.as_bytes().starts_with(&r.prefix))
    }

    pub fn answer_for(&self, token: &DeviceToken) -> Option<(u16, ApnsReason)> {
        self.answer
            .iter()
            .find(|r| token.as_bytes().starts_with(&r.prefix))
            .map(|r| (r.status, r.reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_match_by_prefix() {
        let rule = RefuseRule::parse("ff01=8").unwrap();
        assert_eq!(rule.prefix, vec![0xff, 0x01]);
        assert_eq!(rule.status, Status::InvalidToken);
        let mut t = [0u8; 32];
        t[0] = 0xff;
        t[1] = 0x01;
        assert!(rule.matches(&DeviceToken::from_bytes(t)));
        t[1] = 0x02;
        assert!(!rule.matches(&DeviceToken::from_bytes(t)));
        for bad in ["ff", "f=8", "zz=8", "ff=x", "=8x"] {
            assert!(RefuseRule::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(RefuseRule::parse("=1").unwrap().prefix, Vec::<u8>::new());
    }

    #[test]
    fn answer_rules_name_a_status_and_an_apple_reason() {
        let rule = AnswerRule::parse("0410=410:Unregistered").unwrap();
        assert_eq!(
            rule,
            AnswerRule {
                prefix: vec![0x04, 0x10],
                status: 410,
                reason: ApnsReason::Unregistered
            }
        );
        let faults = Faults {
            answer: vec![rule],
            ..Default::default()
        };
        let mut t = [0u8; 32];
        t[..2].copy_from_slice(&[0x04, 0x10]);
        assert_eq!(
            faults.answer_for(&DeviceToken::from_bytes(t)),
            Some((410, ApnsReason::Unregistered))
        );
        let streams = Faults {
            refuse_streams: vec![StreamRule::parse("0410").unwrap()],
            ..Default::default()
        };
        assert!(streams.refuses_stream(&DeviceToken::from_bytes(t)));
        assert!(!streams.refuses_stream(&DeviceToken::from_bytes([0; 32])));
        assert!(StreamRule::parse("041").is_err());
        for bad in [
            "ff=400",
            "ff=400:NoSuchReason",
            "ff=200:BadTopic",
            "f=400:BadTopic",
        ] {
            assert!(AnswerRule::parse(bad).is_err(), "{bad}");
        }
    }
}
