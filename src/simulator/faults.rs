//! Fault injection: the ways a gateway misbehaves that apnsd must survive.

use std::time::Duration;

use crate::apns::frame::Status;
use crate::job::DeviceToken;

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
        if hex.len() % 2 != 0 || hex.len() > 64 {
            return Err(bad());
        }
        let prefix = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| bad())?;
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
}

impl Faults {
    pub fn refusal(&self, token: &DeviceToken) -> Option<Status> {
        self.refuse
            .iter()
            .find(|r| r.matches(token))
            .map(|r| r.status)
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
}
