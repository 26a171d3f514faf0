//! Jobs as producers publish them: decoding, token normalisation, validation.
//!
//! Decoding is pure (bytes in, `Job` or `Rejection` out) so that every way a job
//! can be unusable is unit-tested and fuzzable without a broker.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

// A job is made of tokens: their names stay reachable here.
pub use crate::token::{DeviceToken, TokenError, Tokens};

/// Names one job for the life of the process (never reused, unlike delivery
/// tags, which restart with every channel): how the ledger and the results it
/// owes know the job again when its notifications come back from APNs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobKey(pub u64);

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
    pub tokens: Tokens,
    pub payload: Bytes,
    pub expiry: Option<u32>,
    pub priority: Option<Priority>,
    /// `apns-push-type` (HTTP/2 only): inferred from the payload when absent.
    pub push_type: Option<Box<str>>,
    /// `apns-collapse-id` (HTTP/2 only).
    pub collapse_id: Option<Box<str>>,
    /// A broadcast (Live Activity) channel id, base64 as APNs issued it:
    /// the job goes to the channel, not to devices. `tokens` then holds the
    /// id's decoded bytes as its one entry, so the ledger, the retry queue
    /// and redelivery count one notification without knowing of channels.
    pub channel: Option<Arc<str>>,
}

/// Apple's limit on `apns-collapse-id`.
pub const MAX_COLLAPSE_ID: usize = 64;

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
    #[error("token {index} ({text}) is malformed: {error}")]
    BadToken {
        index: usize,
        /// [`quote_token`]'s cut of what was written.
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
    #[error("token {index} is {len} bytes; the binary interface takes exactly 32 (64 hex digits)")]
    TokenSize { index: usize, len: usize },
    #[error("`push_type` {0:?} is not an APNs push type (lower-case letters, e.g. \"alert\", \"background\", \"voip\")")]
    BadPushType(String),
    #[error("`collapse_id` must be at most 64 bytes of printable text")]
    BadCollapseId,
    #[error("job has both `channel` and `token`/`tokens`; a push goes to a channel or to devices")]
    ChannelAndTokens,
    #[error("`channel` {0} is not a base64 broadcast channel id")]
    BadChannel(String),
    #[error("a broadcast's `push_type` is \"liveactivity\", not {0:?}")]
    ChannelPushType(String),
    #[error("`channel` needs an HTTP/2 app: the binary interface has no broadcast channels")]
    ChannelOnBinary,
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
        let reject = |error| Rejection {
            error,
            id: fallback_id(),
        };
        let text = std::str::from_utf8(body).map_err(|_| reject(JobError::NotUtf8))?;
        // A struct also deserializes from an array: only an object is a job.
        if !text.trim_start().starts_with('{') {
            return Err(reject(match serde_json::from_str::<IgnoredAny>(text) {
                Ok(_) => JobError::NotObject,
                Err(e) => JobError::NotJson(e.to_string()),
            }));
        }
        let fields: Fields =
            serde_json::from_str(text).map_err(|e| reject(JobError::NotJson(e.to_string())))?;
        let id = match fields.id {
            None => fallback_id(),
            Some(raw) => match id_text(raw) {
                Some(id) => Some(id),
                None => return Err(reject(wrong("id", "a string"))),
            },
        };
        fields
            .into_job(text)
            .map(|mut job| {
                job.id = id.as_deref().map(Arc::from);
                job
            })
            .map_err(|error| Rejection { error, id })
    }

    /// The job as a body [`Job::decode`] reads back: how a job with its
    /// deferred tokens travels through the retry queue. The payload goes
    /// byte for byte.
    pub fn encode(&self) -> Vec<u8> {
        let payload = std::str::from_utf8(&self.payload)
            .ok()
            .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
            .unwrap_or(RawValue::NULL);
        let body = Body {
            id: self.id.as_deref(),
            app: self.app.as_deref(),
            tokens: match self.channel {
                Some(_) => None,
                None => Some(self.tokens.iter().map(|t| t.to_hex()).collect()),
            },
            channel: self.channel.as_deref(),
            payload,
            expiry: self.expiry,
            priority: self.priority.map(Priority::code),
            push_type: self.push_type.as_deref(),
            collapse_id: self.collapse_id.as_deref(),
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// Push types are short lower-case words; Apple adds new ones now and then,
/// so any such word passes and APNs has the last say.
fn is_push_type(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_lowercase())
}

/// It travels as a header value, so it must be printable ASCII.
fn is_collapse_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_COLLAPSE_ID && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// A job body's fields as they were written: each is read (and its type
/// checked) on its own, so an error names the field, and nothing of the body
/// is copied that the job does not keep. `null` reads as absent.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    app: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<&'a RawValue>,
    #[serde(borrow)]
    tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    expiry: Option<&'a RawValue>,
    #[serde(borrow)]
    priority: Option<&'a RawValue>,
    #[serde(borrow)]
    push_type: Option<&'a RawValue>,
    #[serde(borrow)]
    collapse_id: Option<&'a RawValue>,
    #[serde(borrow)]
    channel: Option<&'a RawValue>,
}

impl Fields<'_> {
    /// `body` is the text the fields were read from, to place errors in it.
    fn into_job(self, body: &str) -> Result<Job, JobError> {
        let app = self
            .app
            .map(|raw| string(raw).ok_or_else(|| wrong("app", "a string")))
            .transpose()?;
        let channel = self.channel.map(channel).transpose()?;
        let tokens = match &channel {
            None => tokens(self.token, self.tokens)?,
            Some(_) if self.token.is_some() || self.tokens.is_some() => {
                return Err(JobError::ChannelAndTokens)
            }
            Some((_, key)) => Tokens::from_iter([*key]),
        };
        let (payload, content_only) = payload(self.payload, body)?;
        let expiry = match self.expiry {
            None => None,
            Some(raw) => {
                let n = number(raw).ok_or_else(|| wrong("expiry", "a number (unix seconds)"))?;
                let secs = n.as_u64().and_then(|v| u32::try_from(v).ok());
                Some(secs.ok_or_else(|| JobError::BadExpiry(n.to_string()))?)
            }
        };
        let priority = match self.priority.map(|raw| number(raw).map(|n| n.as_i64())) {
            None => None,
            Some(Some(Some(10))) => Some(Priority::Immediate),
            Some(Some(Some(5))) => Some(Priority::PowerConsiderate),
            Some(Some(Some(other))) => return Err(JobError::BadPriority(other)),
            Some(_) => return Err(wrong("priority", "10 or 5")),
        };
        let push_type = match self.push_type.map(string) {
            None => None,
            Some(Some(s)) if is_push_type(&s) => Some(s.into_boxed_str()),
            Some(Some(s)) => return Err(JobError::BadPushType(s)),
            Some(None) => return Err(wrong("push_type", "a string")),
        }
        .or_else(|| content_only.then(|| "background".into()));
        let push_type = match (&channel, push_type) {
            (None, push_type) => push_type,
            (Some(_), Some(p)) if &*p != LIVE_ACTIVITY && self.push_type.is_some() => {
                return Err(JobError::ChannelPushType(p.into()))
            }
            (Some(_), _) => Some(LIVE_ACTIVITY.into()),
        };
        let collapse_id = match self.collapse_id.map(string) {
            None => None,
            Some(Some(s)) if is_collapse_id(&s) => Some(s.into_boxed_str()),
            Some(Some(_)) => return Err(JobError::BadCollapseId),
            Some(None) => return Err(wrong("collapse_id", "a string")),
        };
        Ok(Job {
            id: None,
            app,
            tokens,
            payload,
            expiry,
            priority,
            push_type,
            collapse_id,
            channel: channel.map(|(id, _)| id),
        })
    }
}

/// The push type of every broadcast: Apple's channels carry Live Activities.
pub const LIVE_ACTIVITY: &str = "liveactivity";

/// A `channel` field: its text, and its decoded bytes as the job's one
/// routing key (see [`Job::channel`]).
fn channel(raw: &RawValue) -> Result<(Arc<str>, DeviceToken), JobError> {
    use base64::Engine;
    let text = borrowed(raw).ok_or_else(|| wrong("channel", "a base64 string"))?;
    base64::engine::general_purpose::STANDARD
        .decode(text.as_bytes())
        .ok()
        .and_then(|bytes| DeviceToken::from_slice(&bytes))
        .map(|key| (Arc::from(&*text), key))
        .ok_or_else(|| JobError::BadChannel(quote_token(&text)))
}

/// What [`Job::encode`] writes.
#[derive(Serialize)]
struct Body<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    app: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    payload: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiry: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    push_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    collapse_id: Option<&'a str>,
}

fn string(raw: &RawValue) -> Option<String> {
    serde_json::from_str(raw.get()).ok()
}

fn number(raw: &RawValue) -> Option<serde_json::Number> {
    serde_json::from_str(raw.get()).ok()
}

/// A job id: a string id as its text; a numeric one as the publisher wrote it
/// (`1e3` stays `1e3`, a big integer keeps its digits), not re-rendered.
fn id_text(raw: &RawValue) -> Option<String> {
    string(raw).or_else(|| number(raw).map(|_| raw.get().to_owned()))
}

/// Most characters of a bad token quoted back: enough to recognise it,
/// while a huge one does not make a huge error, log line and result.
const QUOTED_TOKEN_CHARS: usize = 100;

/// A bad token as errors show it: quoted whole when short, else its first
/// [`QUOTED_TOKEN_CHARS`] characters and its length.
fn quote_token(text: &str) -> String {
    match text.char_indices().nth(QUOTED_TOKEN_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!(
            "{:?}... ({} characters)",
            &text[..cut],
            text.chars().count()
        ),
    }
}

/// The first byte of a JSON value tells its type.
fn starts(raw: Option<&RawValue>, byte: u8) -> bool {
    raw.is_some_and(|r| r.get().as_bytes().first() == Some(&byte))
}

fn wrong(field: &'static str, expected: &'static str) -> JobError {
    JobError::WrongType { field, expected }
}

fn tokens(one: Option<&RawValue>, many: Option<&RawValue>) -> Result<Tokens, JobError> {
    let parse = |index: usize, s: &str| {
        DeviceToken::parse(s).map_err(|error| JobError::BadToken {
            index,
            text: quote_token(s),
            error,
        })
    };
    match (one, many) {
        (None, None) => Err(JobError::NoToken),
        (Some(raw), None) if starts(one, b'"') => {
            let text = borrowed(raw).ok_or_else(|| wrong("token", "a hex string"))?;
            Ok(Tokens::from_iter([parse(0, &text)?]))
        }
        (None, Some(raw)) if starts(many, b'[') => {
            let list = hex_list(raw).ok_or_else(|| wrong("tokens", "a list of hex strings"))?;
            if list.is_empty() {
                return Err(JobError::EmptyTokens);
            }
            let mut tokens = Tokens::with_capacity(list.len());
            for (i, text) in list.iter().enumerate() {
                tokens.push(&parse(i, text)?);
            }
            Ok(tokens)
        }
        (Some(_), Some(_)) if starts(one, b'"') || starts(one, b'[') => {
            Err(JobError::BothTokenFields)
        }
        (Some(_), _) => Err(wrong("token", "a hex string")),
        (_, Some(_)) => Err(wrong("tokens", "a list of hex strings")),
    }
}

/// A string, borrowed from the body unless it has escapes.
fn borrowed(raw: &RawValue) -> Option<Cow<'_, str>> {
    match serde_json::from_str::<&str>(raw.get()) {
        Ok(text) => Some(Cow::Borrowed(text)),
        Err(_) => string(raw).map(Cow::Owned),
    }
}

/// A list of strings, borrowed from the body unless one has escapes.
fn hex_list(raw: &RawValue) -> Option<Vec<Cow<'_, str>>> {
    match serde_json::from_str::<Vec<&str>>(raw.get()) {
        Ok(list) => Some(list.into_iter().map(Cow::Borrowed).collect()),
        Err(_) => serde_json::from_str::<Vec<String>>(raw.get())
            .ok()
            .map(|list| list.into_iter().map(Cow::Owned).collect()),
    }
}

/// The compact payload, and whether its `aps` holds nothing but
/// `content-available` (a silent, background push). The payload keeps the
/// publisher's key order, numbers and escapes; only whitespace goes.
/// `body` holds `raw`, so a problem inside the payload is placed in the body.
fn payload(raw: Option<&RawValue>, body: &str) -> Result<(Bytes, bool), JobError> {
    let raw = raw.ok_or(JobError::NoPayload)?;
    if !starts(Some(raw), b'{') {
        return Err(wrong("payload", "a JSON object"));
    }
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        aps: Option<&'a RawValue>,
    }
    let head: Head = serde_json::from_str(raw.get())
        .map_err(|e| JobError::NotJson(placed_in_body(&e, raw.get(), body)))?;
    let aps = head
        .aps
        .filter(|a| starts(Some(a), b'{'))
        .ok_or(JobError::NoAps)?;
    let keys: BTreeMap<String, IgnoredAny> =
        serde_json::from_str(aps.get()).map_err(|e| JobError::NotJson(e.to_string()))?;
    let content_only = keys.len() == 1 && keys.contains_key("content-available");
    Ok((Bytes::from(compact(raw.get())), content_only))
}

/// `e`, met parsing `part` (a slice of `body`, as the payload is), with its
/// position counted from the body the publisher wrote, then from the
/// payload: serde_json counts from the text it was given, the payload alone.
fn placed_in_body(e: &serde_json::Error, part: &str, body: &str) -> String {
    let (line, column) = (e.line(), e.column());
    let message = e.to_string();
    let bare = message
        .strip_suffix(&format!(" at line {line} column {column}"))
        .unwrap_or(&message);
    let start = (part.as_ptr() as usize).checked_sub(body.as_ptr() as usize);
    let Some(before) = start.and_then(|at| body.get(..at)) else {
        return format!("{bare} at line {line} column {column} of `payload`");
    };
    let body_line = before.matches('\n').count() + line;
    let body_column = match line {
        1 => before.len() - before.rfind('\n').map_or(0, |n| n + 1) + column,
        _ => column,
    };
    format!("{bare} at line {body_line} column {body_column} (line {line} column {column} of `payload`)")
}

/// Valid JSON `text` without the whitespace between its tokens.
fn compact(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in text.as_bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            in_string = b == b'"';
            out.push(b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "1b14a89b65361301e7ded0f8de35ec1f322c37698b9fe712252a2cba42207d90";

    #[test]
    fn a_job_survives_the_retry_queue_byte_for_byte() {
        let body = format!(
            r#"{{"id":"r1","app":"a","token":"{HEX}","payload":{{"aps":{{}},"f":4.3660053974682745e-57}},"expiry":7,"priority":5}}"#
        );
        let job = Job::decode(body.as_bytes(), None).unwrap();
        assert_eq!(
            job.payload.as_ref(),
            br#"{"aps":{},"f":4.3660053974682745e-57}"#,
            "floats keep every digit"
        );
        assert_eq!(Job::decode(&job.encode(), None).unwrap(), job);
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
        assert_eq!(
            job.tokens,
            Tokens::from_iter([DeviceToken::parse(HEX).unwrap()])
        );
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
            (
                "[null,null,null,null,null,null,null,null,null]".into(),
                JobError::NotObject,
            ),
            (format!("{{{p}}}"), JobError::NoToken),
            (
                format!(r#"{{"token":null,"tokens":null,{p}}}"#),
                JobError::NoToken,
            ),
            (
                format!(r#"{{"token":"{HEX}","token":"{HEX}",{p}}}"#),
                JobError::NotJson(String::new()),
            ),
            (
                format!(r#"{{"tokens":["{HEX}",7],{p}}}"#),
                wrong("tokens", "a list of hex strings"),
            ),
            (
                format!(r#"{{"id":[1],"token":"{HEX}",{p}}}"#),
                wrong("id", "a string"),
            ),
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
    fn the_payload_goes_as_written_less_the_whitespace() {
        let payload =
            r#"{ "z": 1.50, "aps" : {"alert": "a \"b\"\t c\u00e9 ", "badge":1e2}, "a": [1, 2] }"#;
        let body = format!(r#"{{"id": 42, "tokens": ["{HEX}"], "payload": {payload}}}"#);
        let job = decode(&body).unwrap();
        assert_eq!(
            std::str::from_utf8(&job.payload).unwrap(),
            r#"{"z":1.50,"aps":{"alert":"a \"b\"\t c\u00e9 ","badge":1e2},"a":[1,2]}"#
        );
        assert_eq!(job.id.as_deref(), Some("42"));
        assert_eq!(Job::decode(&job.encode(), None).unwrap(), job);
        let escaped = format!(
            r#"{{"tokens":["\u0031{}"],"payload":{{"aps":{{}}}}}}"#,
            &HEX[1..]
        );
        assert_eq!(
            decode(&escaped).unwrap().tokens.get(0),
            DeviceToken::parse(HEX).ok()
        );
    }

    #[test]
    fn a_duplicate_key_in_the_payload_is_placed_in_the_body() {
        let one_line = format!(r#"{{"token":"{HEX}","payload":{{"aps":{{}},"aps":{{}}}}}}"#);
        let lines = format!(
            "{{\"token\":\"{HEX}\",\n  \"payload\": {{\n    \"aps\": {{}},\n    \"aps\": {{}}\n  }}\n}}"
        );
        let error = |body: &str| decode(body).map(|_| ()).unwrap_err().error.to_string();
        assert_eq!(
            error(&one_line),
            "body is not JSON: duplicate field `aps` at line 1 column 101 \
             (line 1 column 15 of `payload`)"
        );
        assert_eq!(
            error(&lines),
            "body is not JSON: duplicate field `aps` at line 4 column 9 \
             (line 3 column 9 of `payload`)"
        );
    }

    #[test]
    fn push_type_and_collapse_id() {
        let p = r#""payload":{"aps":{"alert":"x"}}"#;
        let job = decode(&format!(
            r#"{{"token":"{HEX}",{p},"push_type":"voip","collapse_id":"score-1"}}"#
        ))
        .unwrap();
        assert_eq!(job.push_type.as_deref(), Some("voip"));
        assert_eq!(job.collapse_id.as_deref(), Some("score-1"));
        assert_eq!(
            decode(&format!(r#"{{"token":"{HEX}",{p}}}"#))
                .unwrap()
                .push_type,
            None
        );
        let silent = decode(&format!(
            r#"{{"token":"{HEX}","payload":{{"aps":{{"content-available":1}}}}}}"#
        ))
        .unwrap();
        assert_eq!(silent.push_type.as_deref(), Some("background"));
        let errors = [
            (r#""push_type":5"#, wrong("push_type", "a string")),
            (
                r#""push_type":"Alert""#,
                JobError::BadPushType("Alert".into()),
            ),
            (r#""collapse_id":[1]"#, wrong("collapse_id", "a string")),
            (r#""collapse_id":"""#, JobError::BadCollapseId),
        ];
        for (field, want) in errors {
            let body = format!(r#"{{"token":"{HEX}",{p},{field}}}"#);
            assert_eq!(decode(&body).unwrap_err().error, want, "{field}");
        }
        let long = format!(r#""collapse_id":"{}""#, "c".repeat(65));
        assert_eq!(
            decode(&format!(r#"{{"token":"{HEX}",{p},{long}}}"#))
                .unwrap_err()
                .error,
            JobError::BadCollapseId
        );
    }

    #[test]
    fn a_channel_job_goes_to_its_channel_alone() {
        let p = r#""payload":{"aps":{"event":"update","content-state":{}}}"#;
        let job = decode(&format!(
            r#"{{"id":"b-1","channel":"dHdlbnR5LWNoYXJzLWlk",{p},"priority":5}}"#
        ))
        .unwrap();
        assert_eq!(job.channel.as_deref(), Some("dHdlbnR5LWNoYXJzLWlk"));
        assert_eq!(job.push_type.as_deref(), Some(LIVE_ACTIVITY));
        assert_eq!(
            job.tokens.len(),
            1,
            "one notification, keyed by the channel"
        );
        assert_eq!(job.tokens.bytes(0), b"twenty-chars-id");
        assert_eq!(Job::decode(&job.encode(), None).unwrap(), job);
        let silent = decode(r#"{"channel":"AAAA","payload":{"aps":{"content-available":1}}}"#);
        assert_eq!(silent.unwrap().push_type.as_deref(), Some(LIVE_ACTIVITY));

        let c = r#""channel":"dHdlbnR5LWNoYXJzLWlk""#;
        let errors = [
            (
                format!(r#"{c},"token":"{HEX}""#),
                JobError::ChannelAndTokens,
            ),
            (
                format!(r#"{c},"tokens":["{HEX}"]"#),
                JobError::ChannelAndTokens,
            ),
            (format!(r#"{c},"tokens":[]"#), JobError::ChannelAndTokens),
            (
                r#""channel":"not base64!""#.into(),
                JobError::BadChannel(r#""not base64!""#.into()),
            ),
            (
                r#""channel":"""#.into(),
                JobError::BadChannel(r#""""#.into()),
            ),
            (r#""channel":7"#.into(), wrong("channel", "a base64 string")),
            (
                format!(r#"{c},"push_type":"alert""#),
                JobError::ChannelPushType("alert".into()),
            ),
        ];
        for (fields, want) in errors {
            let body = format!("{{{fields},{p}}}");
            assert_eq!(decode(&body).unwrap_err().error, want, "{body}");
        }
        let explicit = format!(r#"{{{c},"push_type":"liveactivity",{p}}}"#);
        assert!(decode(&explicit).is_ok());
    }

    #[test]
    fn a_numeric_id_is_echoed_as_written() {
        for id in ["1e3", "12345678901234567890123", "-0.50", "42"] {
            let body = format!(r#"{{"id": {id}, "token": "{HEX}", "payload": {{"aps": {{}}}}}}"#);
            assert_eq!(decode(&body).unwrap().id.as_deref(), Some(id));
            let bad = format!(r#"{{"id": {id}, "token": "zz", "payload": {{"aps": {{}}}}}}"#);
            assert_eq!(decode(&bad).unwrap_err().id.as_deref(), Some(id));
        }
    }

    #[test]
    fn a_huge_bad_token_is_quoted_in_part() {
        let huge = "g".repeat(5_000_000);
        let body = format!(r#"{{"token": "{huge}", "payload": {{"aps": {{}}}}}}"#);
        let message = decode(&body).unwrap_err().error.to_string();
        assert!(message.len() < 400, "{} bytes", message.len());
        assert!(message.contains(&"g".repeat(100)), "{message}");
        assert!(message.contains("5000000 characters"), "{message}");
        let short = r#"{"token": "xyz", "payload": {"aps": {}}}"#;
        let message = decode(short).unwrap_err().error.to_string();
        assert!(message.contains("(\"xyz\")"), "{message}");
    }
}
