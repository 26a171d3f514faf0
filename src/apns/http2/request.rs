//! HTTP/2 requests and answers, pure: the request that carries a notification
//! and the verdict on APNs' response. No I/O, so every rule is unit-tested.

use std::time::SystemTime;

use aws_lc_rs::digest;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use http::{Method, Request};

use super::Reason;
use crate::apns::Notification;
use crate::clock::unix_secs;
use crate::token::Hex;

/// Largest payload HTTP/2 takes for every push type but VoIP.
pub const MAX_PAYLOAD: usize = 4096;
/// Largest VoIP payload.
pub const MAX_VOIP_PAYLOAD: usize = 5120;
/// Largest broadcast (channel) payload: a Live Activity update.
pub const MAX_BROADCAST_PAYLOAD: usize = 5120;

/// Generates [`ApnsReason`] from the `reason` strings Apple documents, each
/// with the snake_case name that becomes the `failed.<reason>` routing key.
macro_rules! reasons {
    ($($variant:ident => $snake:literal,)*) => {
        /// The `reason` of an APNs HTTP/2 error response.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ApnsReason {
            $($variant,)*
            /// A reason this build does not know (logged as APNs sent it).
            Unknown,
        }

        impl ApnsReason {
            pub const ALL: &'static [ApnsReason] = &[$(ApnsReason::$variant,)*];

            /// Reads the `reason` as APNs spells it.
            pub fn parse(text: &str) -> ApnsReason {
                match text {
                    $(stringify!($variant) => ApnsReason::$variant,)*
                    _ => ApnsReason::Unknown,
                }
            }

            /// The spelling APNs uses (the simulator answers with it).
            pub fn text(self) -> &'static str {
                match self {
                    $(ApnsReason::$variant => stringify!($variant),)*
                    ApnsReason::Unknown => "Unknown",
                }
            }

            /// snake_case, for routing keys and metrics.
            pub fn name(self) -> &'static str {
                match self {
                    $(ApnsReason::$variant => $snake,)*
                    ApnsReason::Unknown => "unknown",
                }
            }
        }
    };
}

reasons! {
    BadCollapseId => "bad_collapse_id",
    BadDeviceToken => "bad_device_token",
    BadExpirationDate => "bad_expiration_date",
    BadMessageId => "bad_message_id",
    BadPriority => "bad_priority",
    BadTopic => "bad_topic",
    DeviceTokenNotForTopic => "device_token_not_for_topic",
    DuplicateHeaders => "duplicate_headers",
    IdleTimeout => "idle_timeout",
    InvalidPushType => "invalid_push_type",
    MissingDeviceToken => "missing_device_token",
    MissingTopic => "missing_topic",
    PayloadEmpty => "payload_empty",
    TopicDisallowed => "topic_disallowed",
    BadCertificate => "bad_certificate",
    BadCertificateEnvironment => "bad_certificate_environment",
    ExpiredProviderToken => "expired_provider_token",
    Forbidden => "forbidden",
    InvalidProviderToken => "invalid_provider_token",
    MissingProviderToken => "missing_provider_token",
    UnrelatedKeyIdInToken => "unrelated_key_id_in_token",
    BadEnvironmentKeyIdInToken => "bad_environment_key_id_in_token",
    BadPath => "bad_path",
    MethodNotAllowed => "method_not_allowed",
    ExpiredToken => "expired_token",
    Unregistered => "unregistered",
    PayloadTooLarge => "payload_too_large",
    TooManyProviderTokenUpdates => "too_many_provider_token_updates",
    TooManyRequests => "too_many_requests",
    InternalServerError => "internal_server_error",
    ServiceUnavailable => "service_unavailable",
    Shutdown => "shutdown",
    MissingChannelId => "missing_channel_id",
    BadChannelId => "bad_channel_id",
    ChannelNotRegistered => "channel_not_registered",
    BadMessageStoragePolicy => "bad_message_storage_policy",
}

/// What to do with a notification after APNs answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Accepted,
    /// Final: report it.
    Failed(Reason),
    /// Transient (429, 500, 503): try again after a pause, up to the limit.
    Retry(Reason),
    /// The provider token is older than APNs allows: mint a new one, try again.
    TokenExpired,
}

/// Classifies a response. `body` is APNs' JSON (`{"reason": ..., "timestamp": ms}`);
/// `now` stands in for a 410 that carries no timestamp.
pub fn classify(status: u16, body: &[u8], now: SystemTime) -> Answer {
    if status == 200 {
        return Answer::Accepted;
    }
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let reason = json["reason"]
        .as_str()
        .map_or(ApnsReason::Unknown, ApnsReason::parse);
    match (status, reason) {
        (410, _) => {
            // APNs gives milliseconds; results carry unix seconds, as the
            // feedback service's tuples did.
            let since = json["timestamp"]
                .as_u64()
                .map(|ms| ms / 1000)
                .unwrap_or_else(|| unix_secs(now));
            Answer::Failed(Reason::Unregistered {
                since: u32::try_from(since).unwrap_or(u32::MAX),
            })
        }
        (403, ApnsReason::ExpiredProviderToken) => Answer::TokenExpired,
        (429 | 500 | 503, _) => Answer::Retry(Reason::Http2 { status, reason }),
        _ => Answer::Failed(Reason::Http2 { status, reason }),
    }
}

static APNS_TOPIC: HeaderName = HeaderName::from_static("apns-topic");
static APNS_PUSH_TYPE: HeaderName = HeaderName::from_static("apns-push-type");
static APNS_PRIORITY: HeaderName = HeaderName::from_static("apns-priority");
static APNS_EXPIRATION: HeaderName = HeaderName::from_static("apns-expiration");
static APNS_ID: HeaderName = HeaderName::from_static("apns-id");
static APNS_COLLAPSE_ID: HeaderName = HeaderName::from_static("apns-collapse-id");
static APNS_CHANNEL_ID: HeaderName = HeaderName::from_static("apns-channel-id");

/// The push type a job gets when it names none: `background` for a payload
/// whose `aps` holds nothing but `content-available` (decided at decode
/// time), `alert` otherwise.
const DEFAULT_PUSH_TYPE: &str = "alert";

/// Builds the `POST /3/device/<token>` request for `n` (the body, the
/// payload, is sent separately). `authority` is the endpoint's `host:port`,
/// `topic` the app's bundle id, `bearer` the `authorization` value under
/// token auth.
pub fn build(
    n: &Notification,
    authority: &str,
    topic: &str,
    bearer: Option<&HeaderValue>,
) -> Result<Request<()>, http::Error> {
    let env = &n.envelope.job;
    if let Some(channel) = env.channel.as_deref() {
        return broadcast(n, channel, authority, topic, bearer);
    }
    let push_type = env.push_type.as_deref().unwrap_or(DEFAULT_PUSH_TYPE);
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!("https://{authority}/3/device/{}", n.token()))
        .header(&APNS_TOPIC, topic_for(topic, push_type))
        .header(&APNS_PUSH_TYPE, push_type)
        .header(&APNS_ID, apns_id(n));
    let priority = env.priority.map(|p| p.code()).or_else(|| {
        // Apple refuses priority 10 for background pushes; its default is 10.
        (push_type == "background").then_some(5)
    });
    if let Some(p) = priority {
        req = req.header(&APNS_PRIORITY, u32::from(p));
    }
    if let Some(expiry) = env.expiry {
        req = req.header(&APNS_EXPIRATION, expiry);
    }
    if let Some(id) = env.collapse_id.as_deref() {
        req = req.header(&APNS_COLLAPSE_ID, id);
    }
    if let Some(bearer) = bearer {
        req = req.header(AUTHORIZATION, bearer);
    }
    req.body(())
}

/// Builds the `POST /4/broadcasts/apps/<topic>` request of a channel job.
/// Apple requires priority and expiration on a broadcast: a job without a
/// priority goes at 10 (Apple's default elsewhere), one without an `expiry`
/// at 0 (deliver once, store nothing), which every channel accepts, whereas a
/// later expiration is refused on a channel that stores no message.
fn broadcast(
    n: &Notification,
    channel: &str,
    authority: &str,
    topic: &str,
    bearer: Option<&HeaderValue>,
) -> Result<Request<()>, http::Error> {
    let env = &n.envelope.job;
    let priority = env.priority.map_or(10, |p| p.code());
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!("https://{authority}/4/broadcasts/apps/{topic}"))
        .header(&APNS_CHANNEL_ID, channel)
        .header(&APNS_PUSH_TYPE, crate::job::LIVE_ACTIVITY)
        .header(&APNS_PRIORITY, u32::from(priority))
        .header(&APNS_EXPIRATION, env.expiry.unwrap_or(0));
    if let Some(bearer) = bearer {
        req = req.header(AUTHORIZATION, bearer);
    }
    req.body(())
}

/// Apple wants some push types on a suffixed topic (`<bundle>.voip`, ...).
fn topic_for(topic: &str, push_type: &str) -> String {
    let suffix = match push_type {
        "voip" => ".voip",
        "complication" => ".complication",
        "fileprovider" => ".pushkit.fileprovider",
        "location" => ".location-query",
        "liveactivity" => ".push-type.liveactivity",
        "pushtotalk" => ".voip-ptt",
        _ => "",
    };
    if topic.ends_with(suffix) {
        topic.to_owned()
    } else {
        format!("{topic}{suffix}")
    }
}

/// A UUID that is the same every time this job reaches this token (a retry,
/// a redelivery after a crash), so APNs' logs and the simulator can tell a
/// resend: SHA-256 over the app, the job id (or the payload when the job has
/// none) and the token, shaped as a version 8 UUID.
pub fn apns_id(n: &Notification) -> String {
    let env = &n.envelope;
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(env.app.as_bytes());
    ctx.update(&[0]);
    match env.job.id.as_deref() {
        Some(id) => ctx.update(id.as_bytes()),
        None => ctx.update(&env.job.payload),
    }
    ctx.update(&[0]);
    ctx.update(n.token_bytes());
    let hash = ctx.finish();
    let mut b = [0u8; 16];
    b.copy_from_slice(&hash.as_ref()[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = Hex(&b).to_string();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apns::Envelope;
    use crate::job::{Job, JobKey, Priority};
    use crate::token::DeviceToken;
    use std::sync::Arc;
    use std::time::{Duration, Instant, UNIX_EPOCH};

    fn snake(camel: &str) -> String {
        let mut out = String::new();
        for (i, c) in camel.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        }
        out
    }

    #[test]
    fn reason_names_are_apples_in_snake_case() {
        for r in ApnsReason::ALL {
            assert_eq!(r.name(), snake(r.text()), "{r:?}");
            assert_eq!(ApnsReason::parse(r.text()), *r);
        }
        assert_eq!(ApnsReason::parse("SomethingNew"), ApnsReason::Unknown);
    }

    #[test]
    fn responses_are_classified() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(classify(200, b"", now), Answer::Accepted);
        let http2 = |status, reason| Reason::Http2 { status, reason };
        assert_eq!(
            classify(400, br#"{"reason":"BadDeviceToken"}"#, now),
            Answer::Failed(http2(400, ApnsReason::BadDeviceToken))
        );
        assert_eq!(
            classify(
                410,
                br#"{"reason":"Unregistered","timestamp":1500000000123}"#,
                now
            ),
            Answer::Failed(Reason::Unregistered {
                since: 1_500_000_000
            })
        );
        assert_eq!(
            classify(410, br#"{"reason":"Unregistered"}"#, now),
            Answer::Failed(Reason::Unregistered {
                since: 1_700_000_000
            })
        );
        assert_eq!(
            classify(403, br#"{"reason":"ExpiredProviderToken"}"#, now),
            Answer::TokenExpired
        );
        assert_eq!(
            classify(403, br#"{"reason":"InvalidProviderToken"}"#, now),
            Answer::Failed(http2(403, ApnsReason::InvalidProviderToken))
        );
        for (status, reason) in [
            (429, ApnsReason::TooManyRequests),
            (500, ApnsReason::InternalServerError),
            (503, ApnsReason::ServiceUnavailable),
        ] {
            let body = format!(r#"{{"reason":"{}"}}"#, reason.text());
            assert_eq!(
                classify(status, body.as_bytes(), now),
                Answer::Retry(http2(status, reason))
            );
        }
        assert_eq!(
            classify(413, b"not json", now),
            Answer::Failed(http2(413, ApnsReason::Unknown))
        );
    }

    fn notification(id: Option<&str>, push_type: Option<&str>) -> Notification {
        let tokens = [[0xab; 40].as_slice(), &[1; 32]]
            .iter()
            .filter_map(|t| DeviceToken::from_slice(t))
            .collect();
        let envelope = Arc::new(Envelope {
            key: JobKey(1),
            job: Job {
                id: id.map(Arc::from),
                app: None,
                tokens,
                payload: bytes::Bytes::from_static(br#"{"aps":{}}"#),
                expiry: Some(1_795_475_473),
                priority: None,
                push_type: push_type.map(Into::into),
                collapse_id: Some("score".into()),
                channel: None,
            },
            app: "example".into(),
            consumed_at: Instant::now(),
            withdrawal: Default::default(),
            retries: 0,
        });
        Notification::new(envelope, 0)
    }

    #[test]
    fn requests_carry_the_jobs_headers() {
        let bearer = HeaderValue::from_static("bearer x.y.z");
        let n = notification(Some("order-1"), None);
        let req = build(&n, "api.push.apple.com:443", "com.example", Some(&bearer)).unwrap();
        assert_eq!(req.method(), Method::POST);
        assert_eq!(
            req.uri().to_string(),
            format!(
                "https://api.push.apple.com:443/3/device/{}",
                "ab".repeat(40)
            )
        );
        let h = req.headers();
        assert_eq!(h["apns-topic"], "com.example");
        assert_eq!(h["apns-push-type"], "alert");
        assert_eq!(h["apns-expiration"], "1795475473");
        assert_eq!(h["apns-collapse-id"], "score");
        assert_eq!(h["authorization"], "bearer x.y.z");
        assert!(h.get("apns-priority").is_none());

        let mut bg = notification(None, Some("background"));
        let req = build(&bg, "h:443", "com.example", None).unwrap();
        assert_eq!(req.headers()["apns-priority"], "5");
        assert!(req.headers().get("authorization").is_none());
        Arc::get_mut(&mut bg.envelope).unwrap().job.priority = Some(Priority::Immediate);
        let req = build(&bg, "h:443", "com.example", None).unwrap();
        assert_eq!(req.headers()["apns-priority"], "10");

        let voip = notification(None, Some("voip"));
        let req = build(&voip, "h:443", "com.example", None).unwrap();
        assert_eq!(req.headers()["apns-topic"], "com.example.voip");
        let req = build(&voip, "h:443", "com.example.voip", None).unwrap();
        assert_eq!(req.headers()["apns-topic"], "com.example.voip");
    }

    #[test]
    fn a_channel_job_is_one_broadcast_with_apples_required_headers() {
        let mut n = notification(Some("b-1"), Some("liveactivity"));
        let job = &mut Arc::get_mut(&mut n.envelope).unwrap().job;
        job.channel = Some("dHdlbnR5LWNoYXJzLWlk".into());
        job.expiry = None;
        let bearer = HeaderValue::from_static("bearer x.y.z");
        let req = build(&n, "h:443", "com.example", Some(&bearer)).unwrap();
        assert_eq!(
            req.uri().to_string(),
            "https://h:443/4/broadcasts/apps/com.example"
        );
        let h = req.headers();
        assert_eq!(h["apns-channel-id"], "dHdlbnR5LWNoYXJzLWlk");
        assert_eq!(h["apns-push-type"], "liveactivity");
        assert_eq!(
            h["apns-priority"], "10",
            "Apple requires one: 10 by default"
        );
        assert_eq!(
            h["apns-expiration"], "0",
            "Apple requires one: 0 by default"
        );
        assert_eq!(h["authorization"], "bearer x.y.z");
        assert!(h.get("apns-topic").is_none() && h.get("apns-collapse-id").is_none());

        let job = &mut Arc::get_mut(&mut n.envelope).unwrap().job;
        job.priority = Some(Priority::PowerConsiderate);
        job.expiry = Some(1_900_000_000);
        let req = build(&n, "h:443", "com.example", None).unwrap();
        let h = req.headers();
        assert_eq!(h["apns-priority"], "5");
        assert_eq!(h["apns-expiration"], "1900000000");
    }

    #[test]
    fn apns_id_is_a_uuid_stable_per_job_and_token() {
        let a = apns_id(&notification(Some("order-1"), None));
        assert_eq!(a, apns_id(&notification(Some("order-1"), None)));
        assert_ne!(a, apns_id(&notification(Some("order-2"), None)));
        let mut other_token = notification(Some("order-1"), None);
        other_token.index = 1;
        assert_ne!(a, apns_id(&other_token));
        let groups: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert_eq!(&a[14..15], "8", "version 8: {a}");
    }
}
