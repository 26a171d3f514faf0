//! Result messages for the results exchange: routing keys and JSON bodies as
//! the contract fixes them. Pure; the pipeline publishes them with confirms.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::apns::Reason;
use crate::token::DeviceToken;

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delivered {
        app: Arc<str>,
        id: Option<Arc<str>>,
        token: DeviceToken,
    },
    Failed {
        app: Arc<str>,
        id: Option<Arc<str>>,
        token: DeviceToken,
        reason: Reason,
        attempts: u8,
    },
    Unregistered {
        app: Arc<str>,
        token: DeviceToken,
        timestamp: u32,
    },
    Rejected {
        error: String,
        body: Vec<u8>,
        id: Option<String>,
    },
}

impl Event {
    pub fn routing_key(&self) -> String {
        match self {
            Event::Delivered { .. } => "delivered".into(),
            Event::Failed { reason, .. } => format!("failed.{}", reason.name()),
            Event::Unregistered { .. } => "unregistered".into(),
            Event::Rejected { .. } => "rejected".into(),
        }
    }

    /// The JSON body, stamped with `at`, the time the daemon decided.
    pub fn body(&self, at: SystemTime) -> Vec<u8> {
        let at = rfc3339(at);
        let value = match self {
            Event::Delivered { app, id, token } => json!({
                "app": &**app, "id": id.as_deref(), "token": token.to_hex(), "at": at,
            }),
            Event::Failed {
                app,
                id,
                token,
                reason,
                attempts,
            } => json!({
                "app": &**app, "id": id.as_deref(), "token": token.to_hex(),
                "status": reason.status(), "reason": reason.name(), "attempts": attempts, "at": at,
            }),
            Event::Unregistered {
                app,
                token,
                timestamp,
            } => json!({
                "app": &**app, "token": token.to_hex(), "timestamp": timestamp, "at": at,
            }),
            Event::Rejected { error, body, id } => {
                let mut v = json!({
                    "error": error, "body": String::from_utf8_lossy(body), "at": at,
                });
                if let (Some(id), Value::Object(map)) = (id, &mut v) {
                    map.insert("id".into(), Value::String(id.clone()));
                }
                v
            }
        };
        // Serialising a Value built above cannot fail.
        serde_json::to_vec(&value).unwrap_or_default()
    }
}

/// `2026-11-24T02:33:10.123Z`: RFC 3339 in UTC, millisecond precision.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's
/// `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apns::frame::Status;
    use std::time::Duration;

    #[test]
    fn rfc3339_matches_known_instants() {
        let at = |s: u64, ms: u64| UNIX_EPOCH + Duration::from_secs(s) + Duration::from_millis(ms);
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(at(1_795_475_473, 999)), "2026-11-23T23:11:13.999Z");
    }

    fn parse(e: &Event) -> Value {
        serde_json::from_slice(&e.body(UNIX_EPOCH)).unwrap()
    }

    #[test]
    fn bodies_and_routing_keys_follow_the_contract() {
        let token = DeviceToken::from_bytes([0xab; 32]);
        let failed = Event::Failed {
            app: "example".into(),
            id: Some("order-1".into()),
            token,
            reason: Reason::Binary(Status::InvalidToken),
            attempts: 1,
        };
        assert_eq!(failed.routing_key(), "failed.invalid_token");
        let v = parse(&failed);
        assert_eq!(v["app"], "example");
        assert_eq!(v["id"], "order-1");
        assert_eq!(v["token"], "ab".repeat(32));
        assert_eq!(v["status"], 8);
        assert_eq!(v["reason"], "invalid_token");
        assert_eq!(v["attempts"], 1);
        assert_eq!(v["at"], "1970-01-01T00:00:00.000Z");

        let expired = Event::Failed {
            app: "a".into(),
            id: None,
            token,
            reason: Reason::Expired,
            attempts: 0,
        };
        assert_eq!(expired.routing_key(), "failed.expired");
        assert_eq!(parse(&expired)["status"], Value::Null);

        let rejected = Event::Rejected {
            error: "body is not JSON".into(),
            body: b"nope".to_vec(),
            id: Some("m-1".into()),
        };
        assert_eq!(rejected.routing_key(), "rejected");
        let v = parse(&rejected);
        assert_eq!(
            (v["error"].as_str(), v["body"].as_str(), v["id"].as_str()),
            (Some("body is not JSON"), Some("nope"), Some("m-1"))
        );

        let unreg = Event::Unregistered {
            app: "a".into(),
            token,
            timestamp: 1234,
        };
        assert_eq!(unreg.routing_key(), "unregistered");
        assert_eq!(parse(&unreg)["timestamp"], 1234);
        let delivered = Event::Delivered {
            app: "a".into(),
            id: None,
            token,
        };
        assert_eq!(delivered.routing_key(), "delivered");
        assert_eq!(parse(&delivered)["token"], "ab".repeat(32));
    }
}
