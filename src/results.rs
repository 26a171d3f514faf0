//! Result messages for the results exchange: routing keys and JSON bodies as
//! the contract fixes them. Pure; the pipeline publishes them with confirms.

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{json, Value};

use crate::apns::{Reason, Recipient};
use crate::token::DeviceToken;

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delivered {
        app: Arc<str>,
        id: Option<Arc<str>>,
        to: Recipient,
    },
    Failed {
        app: Arc<str>,
        id: Option<Arc<str>>,
        to: Recipient,
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
        // `2026-11-24T02:33:10.123Z`: RFC 3339 in UTC, millisecond precision.
        let at = humantime::format_rfc3339_millis(at).to_string();
        let mut value = match self {
            Event::Delivered { app, id, .. } => json!({
                "app": &**app, "id": id.as_deref(), "at": at,
            }),
            Event::Failed {
                app,
                id,
                reason,
                attempts,
                ..
            } => json!({
                "app": &**app, "id": id.as_deref(),
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
        if let (Event::Delivered { to, .. } | Event::Failed { to, .. }, Value::Object(map)) =
            (self, &mut value)
        {
            let (key, text) = match to {
                Recipient::Device(token) => ("token", token.to_hex()),
                Recipient::Channel(channel) => ("channel", channel.to_string()),
            };
            map.insert(key.into(), Value::String(text));
        }
        // Serialising a Value built above cannot fail.
        serde_json::to_vec(&value).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apns::frame::Status;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn at_is_rfc3339_in_utc_with_milliseconds() {
        let at = |s: u64, ms: u64| UNIX_EPOCH + Duration::from_secs(s) + Duration::from_millis(ms);
        let e = Event::Rejected {
            error: "x".into(),
            body: Vec::new(),
            id: None,
        };
        for (t, text) in [
            (at(0, 0), "1970-01-01T00:00:00.000Z"),
            (at(951_782_400, 5), "2000-02-29T00:00:00.005Z"),
            (at(1_795_475_473, 999), "2026-11-23T23:11:13.999Z"),
        ] {
            let body: Value = serde_json::from_slice(&e.body(t)).unwrap();
            assert_eq!(body["at"], text);
        }
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
            to: Recipient::Device(token),
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
            to: Recipient::Device(token),
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
            to: Recipient::Device(token),
        };
        assert_eq!(delivered.routing_key(), "delivered");
        assert_eq!(parse(&delivered)["token"], "ab".repeat(32));
    }

    #[test]
    fn a_broadcast_result_names_its_channel_instead_of_a_token() {
        let channel = Recipient::Channel("dHdlbnR5LWNoYXJzLWlk".into());
        let delivered = Event::Delivered {
            app: "a".into(),
            id: Some("b-1".into()),
            to: channel.clone(),
        };
        let v = parse(&delivered);
        assert_eq!(v["channel"], "dHdlbnR5LWNoYXJzLWlk");
        assert_eq!(v.get("token"), None);
        let failed = Event::Failed {
            app: "a".into(),
            id: None,
            to: channel,
            reason: Reason::Http2 {
                status: 400,
                reason: crate::apns::http2::ApnsReason::ChannelNotRegistered,
            },
            attempts: 1,
        };
        assert_eq!(failed.routing_key(), "failed.channel_not_registered");
        let v = parse(&failed);
        assert_eq!(v["channel"], "dHdlbnR5LWNoYXJzLWlk");
        assert_eq!((v["status"].as_u64(), v.get("token")), (Some(400), None));
    }
}
