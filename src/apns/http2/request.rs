//! HTTP/2 requests and answers, pure: the request that carries a notification
//! and the verdict on APNs' response. No I/O, so every rule is unit-tested.

use std::time::SystemTime;

use sha2::{Digest, Sha256};

use super::hpack::{self, index};
use super::Reason;
use crate::apns::Notification;
use crate::clock::unix_secs;
use crate::job::JobKey;
use crate::token::{hex_pair, Hex};

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
/// `now` stands in for a 410 that carries no timestamp, and is read only then.
pub fn classify(status: u16, body: &[u8], now: impl FnOnce() -> SystemTime) -> Answer {
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
                .unwrap_or_else(|| unix_secs(now()));
            Answer::Failed(Reason::Unregistered {
                since: u32::try_from(since).unwrap_or(u32::MAX),
            })
        }
        (403, ApnsReason::ExpiredProviderToken) => Answer::TokenExpired,
        (429 | 500 | 503, _) => Answer::Retry(Reason::Http2 { status, reason }),
        _ => Answer::Failed(Reason::Http2 { status, reason }),
    }
}

/// The push type a job gets when it names none: `background` for a payload
/// whose `aps` holds nothing but `content-available` (decided at decode
/// time), `alert` otherwise.
const DEFAULT_PUSH_TYPE: &str = "alert";

/// What every request of one app carries, encoded once per app rather than
/// once per request.
#[derive(Debug, Clone)]
pub struct AppHeaders {
    /// `:method POST`, `:scheme https`, `:authority`.
    common: Vec<u8>,
    /// `apns-topic: <bundle id>`, for the push types without a suffix.
    topic_field: Vec<u8>,
    /// `:path /4/broadcasts/apps/<bundle id>`.
    broadcast_path: Vec<u8>,
    topic: String,
}

impl AppHeaders {
    /// `authority` is the endpoint's `host:port`, `topic` the app's bundle id.
    pub fn new(authority: &str, topic: &str) -> Self {
        let mut common = Vec::new();
        hpack::indexed(&mut common, index::METHOD_POST);
        hpack::indexed(&mut common, index::SCHEME_HTTPS);
        hpack::field(&mut common, index::AUTHORITY, authority.as_bytes());
        let mut topic_field = Vec::new();
        hpack::named(&mut topic_field, b"apns-topic", topic.as_bytes());
        let mut broadcast_path = Vec::new();
        hpack::field(
            &mut broadcast_path,
            index::PATH,
            format!("/4/broadcasts/apps/{topic}").as_bytes(),
        );
        AppHeaders {
            common,
            topic_field,
            broadcast_path,
            topic: topic.to_owned(),
        }
    }
}

/// Appends the header block of the request that carries `n` (its body, the
/// payload, follows as DATA): `POST /3/device/<token>`, or the `/4/broadcasts`
/// request of a channel job. `bearer` is the `authorization` value under
/// token auth. Nothing here allocates but a suffixed topic.
pub fn encode(
    out: &mut Vec<u8>,
    n: &Notification,
    app: &AppHeaders,
    bearer: Option<&[u8]>,
    ids: &mut ApnsIds,
) {
    let env = &n.envelope.job;
    out.extend_from_slice(&app.common);
    if let Some(channel) = env.channel.as_deref() {
        broadcast(out, n, channel, app);
    } else {
        let token = n.token_bytes();
        const DEVICE: &[u8] = b"/3/device/";
        hpack::integer(out, 4, 0, index::PATH);
        hpack::integer(out, 7, 0, DEVICE.len() + 2 * token.len());
        out.extend_from_slice(DEVICE);
        Hex(token).append_to(out);
        let push_type = env.push_type.as_deref().unwrap_or(DEFAULT_PUSH_TYPE);
        match topic_suffix(push_type) {
            suffix if suffix.is_empty() || app.topic.ends_with(suffix) => {
                out.extend_from_slice(&app.topic_field)
            }
            suffix => hpack::named(
                out,
                b"apns-topic",
                format!("{}{suffix}", app.topic).as_bytes(),
            ),
        }
        hpack::named(out, b"apns-push-type", push_type.as_bytes());
        hpack::named(out, b"apns-id", &ids.of(n));
        let priority = env.priority.map(|p| p.code()).or_else(|| {
            // Apple refuses priority 10 for background pushes; its default is 10.
            (push_type == "background").then_some(5)
        });
        if let Some(p) = priority {
            number(out, b"apns-priority", u64::from(p));
        }
        if let Some(expiry) = env.expiry {
            number(out, b"apns-expiration", u64::from(expiry));
        }
        if let Some(id) = env.collapse_id.as_deref() {
            hpack::named(out, b"apns-collapse-id", id.as_bytes());
        }
    }
    if let Some(bearer) = bearer {
        hpack::sensitive(out, index::AUTHORIZATION, bearer);
    }
}

/// The `/4/broadcasts/apps/<topic>` request of a channel job. Apple requires
/// priority and expiration on a broadcast: a job without a priority goes at
/// 10 (Apple's default elsewhere), one without an `expiry` at 0 (deliver
/// once, store nothing), which every channel accepts, whereas a later
/// expiration is refused on a channel that stores no message.
fn broadcast(out: &mut Vec<u8>, n: &Notification, channel: &str, app: &AppHeaders) {
    let env = &n.envelope.job;
    out.extend_from_slice(&app.broadcast_path);
    hpack::named(out, b"apns-channel-id", channel.as_bytes());
    hpack::named(out, b"apns-push-type", crate::job::LIVE_ACTIVITY.as_bytes());
    number(
        out,
        b"apns-priority",
        u64::from(env.priority.map_or(10, |p| p.code())),
    );
    number(out, b"apns-expiration", u64::from(env.expiry.unwrap_or(0)));
}

/// A field whose value is a decimal number.
fn number(out: &mut Vec<u8>, name: &[u8], value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut v = value;
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    hpack::named(out, name, &digits[at..]);
}

/// Apple wants some push types on a suffixed topic (`<bundle>.voip`, ...).
fn topic_suffix(push_type: &str) -> &'static str {
    match push_type {
        "voip" => ".voip",
        "complication" => ".complication",
        "fileprovider" => ".pushkit.fileprovider",
        "location" => ".location-query",
        "liveactivity" => ".push-type.liveactivity",
        "pushtotalk" => ".voip-ptt",
        _ => "",
    }
}

/// Makes each notification's `apns-id`: a UUID that is the same every time
/// this job reaches this token (a retry, a redelivery after a crash), so
/// APNs' logs and the simulator can tell a resend: SHA-256 over the app, the
/// job id (or the payload when the job has none) and the token, shaped as a
/// version 8 UUID. It keeps the hash state after the last job's part: a lane
/// sends a fan-out job's tokens in runs, and its payload is then hashed once
/// per run rather than once per token.
#[derive(Default)]
pub struct ApnsIds {
    job: Option<(JobKey, Sha256)>,
}

impl ApnsIds {
    pub fn of(&mut self, n: &Notification) -> [u8; 36] {
        let env = &n.envelope;
        let mut ctx = match &self.job {
            Some((key, ctx)) if *key == env.key => ctx.clone(),
            _ => {
                let mut ctx = Sha256::new();
                ctx.update(env.app.as_bytes());
                ctx.update([0]);
                match env.job.id.as_deref() {
                    Some(id) => ctx.update(id.as_bytes()),
                    None => ctx.update(&env.job.payload),
                }
                ctx.update([0]);
                self.job = Some((env.key, ctx.clone()));
                ctx
            }
        };
        ctx.update(n.token_bytes());
        let hash = ctx.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&hash[..16]);
        b[6] = (b[6] & 0x0f) | 0x80;
        b[8] = (b[8] & 0x3f) | 0x80;
        // 8-4-4-4-12 digits: a dash before bytes 4, 6, 8 and 10.
        let mut id = [b'-'; 36];
        let mut at = 0;
        for (i, &byte) in b.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                at += 1;
            }
            id[at..at + 2].copy_from_slice(&hex_pair(byte));
            at += 2;
        }
        id
    }
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
        let now = || UNIX_EPOCH + Duration::from_secs(1_700_000_000);
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

    /// An id made afresh, with nothing kept from an earlier job.
    fn apns_id(n: &Notification) -> [u8; 36] {
        ApnsIds::default().of(n)
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

    /// The fields of `n`'s request, as a server decodes them.
    fn fields(
        n: &Notification,
        authority: &str,
        topic: &str,
        bearer: Option<&[u8]>,
    ) -> Vec<(String, String)> {
        let mut block = Vec::new();
        let headers = AppHeaders::new(authority, topic);
        encode(&mut block, n, &headers, bearer, &mut ApnsIds::default());
        let mut fields = Vec::new();
        hpack::Decoder::default()
            .decode(&block, |name, value| {
                let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
                fields.push((text(name), text(value)));
            })
            .unwrap();
        fields
    }

    fn get<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
        let mut found = fields.iter().filter(|(n, _)| n == name);
        let value = found.next().map(|(_, v)| v.as_str());
        assert!(found.next().is_none(), "{name} twice");
        value
    }

    #[test]
    fn requests_carry_the_jobs_headers() {
        let bearer = b"bearer x.y.z".as_slice();
        let n = notification(Some("order-1"), None);
        let h = fields(&n, "api.push.apple.com:443", "com.example", Some(bearer));
        assert_eq!(get(&h, ":method"), Some("POST"));
        assert_eq!(get(&h, ":scheme"), Some("https"));
        assert_eq!(get(&h, ":authority"), Some("api.push.apple.com:443"));
        assert_eq!(
            get(&h, ":path").unwrap(),
            format!("/3/device/{}", "ab".repeat(40))
        );
        assert_eq!(get(&h, "apns-topic"), Some("com.example"));
        assert_eq!(get(&h, "apns-push-type"), Some("alert"));
        assert_eq!(get(&h, "apns-expiration"), Some("1795475473"));
        assert_eq!(get(&h, "apns-collapse-id"), Some("score"));
        assert_eq!(get(&h, "authorization"), Some("bearer x.y.z"));
        assert_eq!(get(&h, "apns-id").unwrap().as_bytes(), apns_id(&n));
        assert_eq!(get(&h, "apns-priority"), None);
        // Pseudo-header fields come first (RFC 9113 §8.3).
        let last_pseudo = h.iter().rposition(|(n, _)| n.starts_with(':')).unwrap();
        assert!(h[..=last_pseudo].iter().all(|(n, _)| n.starts_with(':')));

        let mut bg = notification(None, Some("background"));
        let h = fields(&bg, "h:443", "com.example", None);
        assert_eq!(get(&h, "apns-priority"), Some("5"));
        assert_eq!(get(&h, "authorization"), None);
        Arc::get_mut(&mut bg.envelope).unwrap().job.priority = Some(Priority::Immediate);
        let h = fields(&bg, "h:443", "com.example", None);
        assert_eq!(get(&h, "apns-priority"), Some("10"));

        let voip = notification(None, Some("voip"));
        let h = fields(&voip, "h:443", "com.example", None);
        assert_eq!(get(&h, "apns-topic"), Some("com.example.voip"));
        let h = fields(&voip, "h:443", "com.example.voip", None);
        assert_eq!(get(&h, "apns-topic"), Some("com.example.voip"));
    }

    #[test]
    fn a_channel_job_is_one_broadcast_with_apples_required_headers() {
        let mut n = notification(Some("b-1"), Some("liveactivity"));
        let job = &mut Arc::get_mut(&mut n.envelope).unwrap().job;
        job.channel = Some("dHdlbnR5LWNoYXJzLWlk".into());
        job.expiry = None;
        let bearer = b"bearer x.y.z".as_slice();
        let h = fields(&n, "h:443", "com.example", Some(bearer));
        assert_eq!(get(&h, ":path"), Some("/4/broadcasts/apps/com.example"));
        assert_eq!(get(&h, "apns-channel-id"), Some("dHdlbnR5LWNoYXJzLWlk"));
        assert_eq!(get(&h, "apns-push-type"), Some("liveactivity"));
        assert_eq!(
            get(&h, "apns-priority"),
            Some("10"),
            "Apple requires one: 10 by default"
        );
        assert_eq!(
            get(&h, "apns-expiration"),
            Some("0"),
            "Apple requires one: 0 by default"
        );
        assert_eq!(get(&h, "authorization"), Some("bearer x.y.z"));
        assert!(get(&h, "apns-topic").is_none() && get(&h, "apns-collapse-id").is_none());

        let job = &mut Arc::get_mut(&mut n.envelope).unwrap().job;
        job.priority = Some(Priority::PowerConsiderate);
        job.expiry = Some(1_900_000_000);
        let h = fields(&n, "h:443", "com.example", None);
        assert_eq!(get(&h, "apns-priority"), Some("5"));
        assert_eq!(get(&h, "apns-expiration"), Some("1900000000"));
    }

    #[test]
    fn apns_id_is_a_uuid_stable_per_job_and_token() {
        let id = |n: &Notification| String::from_utf8(apns_id(n).to_vec()).unwrap();
        let a = id(&notification(Some("order-1"), None));
        assert_eq!(a, id(&notification(Some("order-1"), None)));
        assert_ne!(a, id(&notification(Some("order-2"), None)));
        let mut other_token = notification(Some("order-1"), None);
        other_token.index = 1;
        assert_ne!(a, id(&other_token));
        let groups: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert_eq!(&a[14..15], "8", "version 8: {a}");
    }

    #[test]
    fn apns_id_is_the_sha256_of_app_job_and_token_as_it_always_was() {
        // A job redelivered across an upgrade keeps its ids: the derivation
        // is SHA-256 over `app 0 job-id 0 token`, whichever library hashes it.
        let n = notification(Some("order-1"), None);
        let env = &n.envelope;
        let mut input = format!("{}\0order-1\0", env.app).into_bytes();
        input.extend_from_slice(n.token_bytes());
        let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &input);
        let mut want: Vec<u8> = hash.as_ref()[..16].to_vec();
        want[6] = (want[6] & 0x0f) | 0x80;
        want[8] = (want[8] & 0x3f) | 0x80;
        let digits: String = want.iter().map(|b| format!("{b:02x}")).collect();
        let want = format!(
            "{}-{}-{}-{}-{}",
            &digits[..8],
            &digits[8..12],
            &digits[12..16],
            &digits[16..20],
            &digits[20..]
        );
        assert_eq!(String::from_utf8(apns_id(&n).to_vec()).unwrap(), want);
    }

    #[test]
    fn apns_ids_kept_per_job_match_ids_made_afresh() {
        let mut ids = ApnsIds::default();
        let a = notification(Some("order-1"), None);
        let mut a2 = Notification::new(a.envelope.clone(), 1);
        a2.attempts = 1;
        // Another job (another key), then the first job's other token.
        let mut b = notification(Some("order-2"), None);
        Arc::get_mut(&mut b.envelope).unwrap().key = JobKey(2);
        for n in [&a, &a2, &b, &a2, &a] {
            assert_eq!(ids.of(n), apns_id(n));
        }
        assert_ne!(ids.of(&a), ids.of(&a2));
    }
}
