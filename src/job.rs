//! Jobs as producers publish them: decoding, token normalisation, validation.
//!
//! Decoding is pure (bytes in, `Job` or `Rejection` out) so that every way a job
//! can be unusable is unit-tested and fuzzable without a broker.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::apns::frame::MAX_PAYLOAD;

/// A binary-interface device token: exactly 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceToken([u8; 32]);

impl DeviceToken {
    pub const LEN: usize = 32;

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        DeviceToken(bytes)
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(DeviceToken(bytes.try_into().ok()?))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses hex as producers send it: upper or lower case, with spaces, and
    /// wrapped in the `<...>` that iOS prints for `NSData`.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let trimmed = text.trim();
        let inner = trimmed
            .strip_prefix('<')
            .and_then(|t| t.strip_suffix('>'))
            .unwrap_or(trimmed);
        let mut out = [0u8; 32];
        let mut digits = 0usize;
        for c in inner.chars() {
            if c == ' ' {
                continue;
            }
            let v = c.to_digit(16).ok_or(TokenError::NotHex(c))? as u8;
            if digits < 64 {
                out[digits / 2] |= if digits.is_multiple_of(2) { v << 4 } else { v };
            }
            digits += 1;
        }
        match digits {
            0 => Err(TokenError::Empty),
            64 => Ok(DeviceToken(out)),
            n => Err(TokenError::Length(n)),
        }
    }

    /// The normalised form used in every result: 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }

    /// A stable 64-bit hash for routing one device's notifications to one lane.
    pub fn route_hash(&self) -> u64 {
        u64::from_le_bytes([
            self.0[0], self.0[1], self.0[2], self.0[3], self.0[4], self.0[5], self.0[6], self.0[7],
        ])
    }
}

impl fmt::Display for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceToken({self})")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is empty")]
    Empty,
    #[error("token has {0:?}, which is not a hex digit")]
    NotHex(char),
    #[error("token has {0} hex digits; the binary interface takes exactly 64 (32 bytes)")]
    Length(usize),
}

/// APNs delivery priority (item 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// 10: deliver now (alert, sound, badge).
    Immediate,
    /// 5: power-considerate.
    PowerConsiderate,
}

impl Priority {
    pub fn code(self) -> u8 {
        match self {
            Priority::Immediate => 10,
            Priority::PowerConsiderate => 5,
        }
    }
}

/// A decoded, validated job. The payload is serialised once, as compact JSON,
/// and shared by every token of a fan-out job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: Option<Arc<str>>,
    pub app: Option<String>,
    pub tokens: Vec<DeviceToken>,
    pub payload: Bytes,
    pub expiry: Option<u32>,
    pub priority: Option<Priority>,
}

/// Why a job is unusable. Each message is the `error` sentence of a `rejected` result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("body is not UTF-8 text")]
    NotUtf8,
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("body is not a JSON object")]
    NotObject,
    #[error("job has neither `token` nor `tokens`")]
    NoToken,
    #[error("job has both `token` and `tokens`; use one")]
    BothTokenFields,
    #[error("`tokens` is an empty list")]
    EmptyTokens,
    #[error("`{field}` must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("token {index} ({text:?}) is malformed: {error}")]
    BadToken {
        index: usize,
        text: String,
        error: TokenError,
    },
    #[error("job has no `payload`")]
    NoPayload,
    #[error("`payload` has no `aps` dictionary")]
    NoAps,
    #[error("payload is {size} bytes as compact JSON; the limit is {limit}")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("`priority` must be 10 or 5, not {0}")]
    BadPriority(i64),
    #[error("`expiry` must be unix seconds between 0 and 4294967295, not {0}")]
    BadExpiry(String),
    #[error("unknown app {0:?}")]
    UnknownApp(String),
}

/// An unusable job: the reason, and the id when it could still be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub error: JobError,
    pub id: Option<String>,
}

impl Job {
    /// Decodes a job body. `message_id` is the AMQP property, used when the body
    /// has no `id`.
    pub fn decode(body: &[u8], message_id: Option<&str>) -> Result<Job, Rejection> {
        let fallback_id = || message_id.map(str::to_owned);
        let text = std::str::from_utf8(body).map_err(|_| Rejection {
            error: JobError::NotUtf8,
            id: fallback_id(),
        })?;
        let value: Value = serde_json::from_str(text).map_err(|e| Rejection {
            error: JobError::NotJson(e.to_string()),
            id: fallback_id(),
        })?;
        let Value::Object(map) = value else {
            return Err(Rejection {
                error: JobError::NotObject,
                id: fallback_id(),
            });
        };
        let id = match map.get("id") {
            None | Some(Value::Null) => fallback_id(),
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(_) => {
                return Err(Rejection {
                    error: JobError::WrongType {
                        field: "id",
                        expected: "a string",
                    },
                    id: fallback_id(),
                })
            }
        };
        Self::from_map(map)
            .map(|mut job| {
                job.id = id.clone().map(Arc::from);
                job
            })
            .map_err(|error| Rejection { error, id })
    }

    fn from_map(mut map: Map<String, Value>) -> Result<Job, JobError> {
        let app = match map.remove("app") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err(wrong("app", "a string")),
        };
        let tokens = tokens(map.remove("token"), map.remove("tokens"))?;
        let payload = payload(map.remove("payload"))?;
        let expiry = match map.remove("expiry") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(
                n.as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| JobError::BadExpiry(n.to_string()))?,
            ),
            Some(_) => return Err(wrong("expiry", "a number (unix seconds)")),
        };
        let priority = match map.remove("priority") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_i64() {
                Some(10) => Some(Priority::Immediate),
                Some(5) => Some(Priority::PowerConsiderate),
                Some(other) => return Err(JobError::BadPriority(other)),
                None => return Err(wrong("priority", "10 or 5")),
            },
            Some(_) => return Err(wrong("priority", "10 or 5")),
        };
        Ok(Job {
            id: None,
            app,
            tokens,
            payload,
            expiry,
            priority,
        })
    }
}

fn wrong(field: &'static str, expected: &'static str) -> JobError {
    JobError::WrongType { field, expected }
}

fn tokens(one: Option<Value>, many: Option<Value>) -> Result<Vec<DeviceToken>, JobError> {
    let parse = |index: usize, v: &Value| match v {
        Value::String(s) => DeviceToken::parse(s).map_err(|error| JobError::BadToken {
            index,
            text: s.clone(),
            error,
        }),
        _ => Err(wrong("tokens", "a list of hex strings")),
    };
    match (one, many) {
        (Some(Value::Null) | None, Some(Value::Null) | None) => Err(JobError::NoToken),
        (Some(Value::String(s)), None | Some(Value::Null)) => {
            Ok(vec![parse(0, &Value::String(s))?])
        }
        (Some(Value::Null) | None, Some(Value::Array(list))) => {
            if list.is_empty() {
                return Err(JobError::EmptyTokens);
            }
            list.iter().enumerate().map(|(i, v)| parse(i, v)).collect()
        }
        (Some(Value::String(_)), Some(_)) | (Some(Value::Array(_)), Some(_)) => {
            Err(JobError::BothTokenFields)
        }
        (Some(_), _) => Err(wrong("token", "a hex string")),
        (_, Some(_)) => Err(wrong("tokens", "a list of hex strings")),
    }
}

fn payload(value: Option<Value>) -> Result<Bytes, JobError> {
    let payload = match value {
        None | Some(Value::Null) => return Err(JobError::NoPayload),
        Some(v @ Value::Object(_)) => v,
        Some(_) => return Err(wrong("payload", "a JSON object")),
    };
    if !matches!(payload.get("aps"), Some(Value::Object(_))) {
        return Err(JobError::NoAps);
    }
    let compact = serde_json::to_vec(&payload).map_err(|e| JobError::NotJson(e.to_string()))?;
    if compact.len() > MAX_PAYLOAD {
        return Err(JobError::PayloadTooLarge {
            size: compact.len(),
            limit: MAX_PAYLOAD,
        });
    }
    Ok(Bytes::from(compact))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "1b14a89b65361301e7ded0f8de35ec1f322c37698b9fe712252a2cba42207d90";

    #[test]
    fn token_normalisation_accepts_ios_forms() {
        let want = DeviceToken::parse(HEX).unwrap();
        assert_eq!(want.to_hex(), HEX);
        for form in [
            HEX.to_uppercase(),
            format!("<{}>", HEX),
            "<1b14a89b 65361301 e7ded0f8 de35ec1f 322c3769 8b9fe712 252a2cba 42207d90>".into(),
            format!("  {HEX} "),
        ] {
            assert_eq!(DeviceToken::parse(&form), Ok(want), "{form}");
        }
    }

    #[test]
    fn token_errors_say_what_is_wrong() {
        assert_eq!(DeviceToken::parse(""), Err(TokenError::Empty));
        assert_eq!(DeviceToken::parse("<>"), Err(TokenError::Empty));
        assert_eq!(DeviceToken::parse("abc"), Err(TokenError::Length(3)));
        assert_eq!(DeviceToken::parse(&HEX[..62]), Err(TokenError::Length(62)));
        assert_eq!(
            DeviceToken::parse(&format!("{HEX}00")),
            Err(TokenError::Length(66))
        );
        assert_eq!(
            DeviceToken::parse(&HEX.replace('b', "g")),
            Err(TokenError::NotHex('g'))
        );
    }

    fn decode(body: &str) -> Result<Job, Rejection> {
        Job::decode(body.as_bytes(), None)
    }

    #[test]
    fn a_full_job_decodes() {
        let body = format!(
            r#"{{"id":"order-1234","app":"example","token":"{HEX}",
                "payload":{{"aps": {{"alert":"Hello","badge":1}}}},"expiry":1795475473,"priority":10}}"#
        );
        let job = decode(&body).unwrap();
        assert_eq!(job.id.as_deref(), Some("order-1234"));
        assert_eq!(job.app.as_deref(), Some("example"));
        assert_eq!(job.tokens, vec![DeviceToken::parse(HEX).unwrap()]);
        assert_eq!(&job.payload[..], br#"{"aps":{"alert":"Hello","badge":1}}"#);
        assert_eq!(job.expiry, Some(1795475473));
        assert_eq!(job.priority, Some(Priority::Immediate));
    }

    #[test]
    fn fan_out_and_message_id_fallback() {
        let body = format!(
            r#"{{"tokens":["{HEX}","<{}>"],"payload":{{"aps":{{}}}}}}"#,
            HEX.to_uppercase()
        );
        let job = Job::decode(body.as_bytes(), Some("m-1")).unwrap();
        assert_eq!(job.tokens.len(), 2);
        assert_eq!(job.id.as_deref(), Some("m-1"));
        assert_eq!((job.app, job.expiry, job.priority), (None, None, None));
    }

    #[test]
    fn every_unusable_job_has_a_clear_error() {
        let p = r#""payload":{"aps":{}}"#;
        let cases: Vec<(String, JobError)> = vec![
            ("not json".into(), JobError::NotJson(String::new())),
            ("[1,2]".into(), JobError::NotObject),
            (format!("{{{p}}}"), JobError::NoToken),
            (format!(r#"{{"tokens":[],{p}}}"#), JobError::EmptyTokens),
            (
                format!(r#"{{"token":"{HEX}","tokens":["{HEX}"],{p}}}"#),
                JobError::BothTokenFields,
            ),
            (
                format!(r#"{{"token":5,{p}}}"#),
                wrong("token", "a hex string"),
            ),
            (format!(r#"{{"token":"{HEX}"}}"#), JobError::NoPayload),
            (
                format!(r#"{{"token":"{HEX}","payload":"hi"}}"#),
                wrong("payload", "a JSON object"),
            ),
            (
                format!(r#"{{"token":"{HEX}","payload":{{"alert":1}}}}"#),
                JobError::NoAps,
            ),
            (
                format!(r#"{{"token":"{HEX}",{p},"priority":7}}"#),
                JobError::BadPriority(7),
            ),
            (
                format!(r#"{{"token":"{HEX}",{p},"priority":"high"}}"#),
                wrong("priority", "10 or 5"),
            ),
            (
                format!(r#"{{"token":"{HEX}",{p},"expiry":-1}}"#),
                JobError::BadExpiry("-1".into()),
            ),
            (
                format!(r#"{{"token":"{HEX}",{p},"app":3}}"#),
                wrong("app", "a string"),
            ),
        ];
        for (body, want) in cases {
            let got = decode(&body).unwrap_err().error;
            match (&got, &want) {
                (JobError::NotJson(_), JobError::NotJson(_)) => {}
                _ => assert_eq!(got, want, "{body}"),
            }
        }
        let bad = decode(&format!(r#"{{"id":"x","tokens":["{HEX}","zz"],{p}}}"#)).unwrap_err();
        assert_eq!(bad.id.as_deref(), Some("x"));
        assert!(matches!(bad.error, JobError::BadToken { index: 1, .. }));
        assert_eq!(
            Job::decode(&[0xff, 0xfe], None).unwrap_err().error,
            JobError::NotUtf8
        );
    }

    #[test]
    fn payload_limit_is_measured_on_compact_json() {
        let fits = "x".repeat(MAX_PAYLOAD - r#"{"aps":{"alert":""}}"#.len());
        let body =
            format!(r#"{{"token":"{HEX}","payload":{{ "aps" : {{ "alert" : "{fits}" }} }}}}"#);
        assert_eq!(decode(&body).unwrap().payload.len(), MAX_PAYLOAD);
        let body = format!(r#"{{"token":"{HEX}","payload":{{"aps":{{"alert":"{fits}x"}}}}}}"#);
        assert_eq!(
            decode(&body).unwrap_err().error,
            JobError::PayloadTooLarge {
                size: MAX_PAYLOAD + 1,
                limit: MAX_PAYLOAD
            }
        );
    }
}
