//! Everything that speaks to APNs, behind one seam: the pipeline hands a
//! transport [`Notification`]s and gets one [`Outcome`] back for each.
//! Resends, reconnects and settling stay inside the transport.

pub mod binary;
pub mod connect;
pub mod frame;
pub mod http2;
pub mod lane;
pub mod pool;
mod standby;
pub mod tls;
pub mod window;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::job::{Job, JobError, JobKey};
use crate::token::DeviceToken;
use frame::Status;
use http2::ApnsReason;

/// Where the lanes of every app report: one batch of final words at a time.
pub type Outcomes = mpsc::UnboundedSender<Vec<Outcome>>;

/// Which of Apple's provider interfaces an app speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The retired binary interface (what apnsd spoke first; the default).
    #[default]
    Binary,
    /// Today's HTTP/2 provider API.
    Http2,
}

impl Protocol {
    /// Binary frames carry exactly 32 bytes; Apple says HTTP/2 tokens may grow.
    pub fn accepts_token_len(self, len: usize) -> bool {
        match self {
            Protocol::Binary => len == DeviceToken::BINARY_LEN,
            Protocol::Http2 => (1..=DeviceToken::MAX_LEN).contains(&len),
        }
    }

    /// The payload limit; on HTTP/2 VoIP pushes get more room.
    pub fn max_payload(self, push_type: Option<&str>) -> usize {
        match (self, push_type) {
            (Protocol::Binary, _) => frame::MAX_PAYLOAD,
            (Protocol::Http2, Some("voip")) => http2::MAX_VOIP_PAYLOAD,
            (Protocol::Http2, _) => http2::MAX_PAYLOAD,
        }
    }

    /// Weighs a job against this protocol's limits (token length, payload
    /// size); checked once the job is routed to an app, since they differ.
    pub fn check(self, job: &Job) -> Result<(), JobError> {
        if job.channel.is_some() {
            return match self {
                Protocol::Binary => Err(JobError::ChannelOnBinary),
                Protocol::Http2 if job.payload.len() > http2::MAX_BROADCAST_PAYLOAD => {
                    Err(JobError::PayloadTooLarge {
                        size: job.payload.len(),
                        limit: http2::MAX_BROADCAST_PAYLOAD,
                    })
                }
                Protocol::Http2 => Ok(()),
            };
        }
        if let Some((index, len)) = (0..job.tokens.len())
            .map(|i| (i, job.tokens.bytes(i).len()))
            .find(|&(_, len)| !self.accepts_token_len(len))
        {
            return Err(JobError::TokenSize { index, len });
        }
        let limit = self.max_payload(job.push_type.as_deref());
        if job.payload.len() > limit {
            return Err(JobError::PayloadTooLarge {
                size: job.payload.len(),
                limit,
            });
        }
        Ok(())
    }
}

/// What every notification of one job shares: one allocation per job, so a
/// fan-out of 10,000 tokens costs one payload buffer and one token list.
#[derive(Debug)]
pub struct Envelope {
    pub key: JobKey,
    /// The job as decoded; a [`Notification`] names one of its tokens by index.
    pub job: Job,
    /// The app it was routed to: its own, or the default one.
    pub app: Arc<str>,
    /// When the job was consumed, for the consume-to-accepted latency.
    pub consumed_at: Instant,
    /// Whether whoever handed the work over has taken it back: a lane drops
    /// what it has not written yet instead of sending it.
    pub withdrawal: Withdrawal,
    /// Times the job already went through the retry queue (`x-apnsd-attempts`):
    /// the pipeline's count, which no transport reads.
    pub retries: u32,
}

/// Work handed to the lanes that its owner may take back before it is
/// written: the pipeline withdraws a broker session's jobs when the session
/// ends, since the broker redelivers them and they would go out twice. Shared
/// by many envelopes and read for every notification a lane writes, so a plain
/// atomic flag.
#[derive(Debug, Clone, Default)]
pub struct Withdrawal(Arc<AtomicBool>);

impl Withdrawal {
    pub fn withdraw(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_withdrawn(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// One device's copy of a job, as it travels through a lane: 16 bytes, since
/// its token stays in the envelope's list.
#[derive(Debug, Clone)]
pub struct Notification {
    pub envelope: Arc<Envelope>,
    /// Which of the envelope's tokens.
    pub index: u32,
    /// Tries that ended in a transient status.
    pub attempts: u8,
    /// Its acceptance was reported already (binary: it settled, then a late
    /// error response made it travel again): what is said of it from now on is
    /// an [`Outcome::correction`].
    pub reported: bool,
    /// HTTP/2: streams the server refused for it (see `http2::refused`).
    pub refusals: u8,
}

impl Notification {
    pub fn new(envelope: Arc<Envelope>, index: u32) -> Self {
        Notification {
            envelope,
            index,
            attempts: 0,
            reported: false,
            refusals: 0,
        }
    }

    /// The token's bytes, for the wire.
    pub fn token_bytes(&self) -> &[u8] {
        self.envelope.job.tokens.bytes(self.index as usize)
    }

    /// The token as a value of its own, for results and logs. Every token in
    /// an envelope came from a `DeviceToken`, so this is never the fallback.
    pub fn token(&self) -> DeviceToken {
        self.envelope
            .job
            .tokens
            .get(self.index as usize)
            .unwrap_or(DeviceToken::from_bytes([0; DeviceToken::BINARY_LEN]))
    }

    /// Who it goes to, for results and logs: the device, or the broadcast
    /// channel of a channel job.
    pub fn recipient(&self) -> Recipient {
        match &self.envelope.job.channel {
            Some(channel) => Recipient::Channel(channel.clone()),
            None => Recipient::Device(self.token()),
        }
    }

    /// A stable hash of the whole token, routing one device's notifications
    /// to one lane of a binary app (which keeps their order there). Every
    /// byte counts: tokens that share a prefix (issued together, or made up
    /// by a test) still spread over every lane.
    pub fn route_hash(&self) -> u64 {
        route_hash(self.token_bytes())
    }
}

/// Where a notification goes: one device, or every device subscribed to a
/// broadcast channel (results name it `token` or `channel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    Device(DeviceToken),
    /// The channel id as the job gave it (base64).
    Channel(Arc<str>),
}

/// FNV-1a over 8-byte words, then MurmurHash3's finalizer: a handful of
/// multiplications for a 32-byte token, no allocation, the same in every
/// process. The finalizer matters: a lane is `hash % lanes`, and without it
/// the low bits would ignore the high bits of every word.
fn route_hash(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ bytes.len() as u64;
    for chunk in bytes.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(word)).wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Why a notification failed for good: APNs' status, or a daemon-side reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A binary-interface status.
    Binary(Status),
    /// An HTTP/2 answer: the status code and APNs' `reason`.
    Http2 { status: u16, reason: ApnsReason },
    /// HTTP/2 410: the token is no longer valid, since `since` (unix seconds).
    Unregistered { since: u32 },
    /// Its `expiry` passed before it could be written.
    Expired,
    /// HTTP/2: no answer within `request_timeout`, on every attempt.
    Timeout,
    /// HTTP/2: the connection broke before the answer, on every attempt.
    ConnectionLost,
    /// HTTP/2: the server refused the stream (`REFUSED_STREAM`) on every attempt.
    RefusedStream,
    /// Its app could not be used for `unusable_after`, on every try of the job.
    Unusable(Unusable),
}

/// Why an app's gateway cannot be used at all; the job waits in the retry
/// queue rather than holding a lane that cannot send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    /// Connections are refused, time out, or close before anything is accepted.
    GatewayUnreachable,
    /// The TLS handshake fails: the certificate is expired, revoked or not trusted.
    CertificateRejected,
}

impl Unusable {
    /// What a failed connect or a broken connection says about the app: a
    /// failure the TLS layer reports is about credentials, anything else is
    /// the network.
    pub fn of_io(e: &io::Error) -> Unusable {
        if connect::is_tls_failure(e) {
            Unusable::CertificateRejected
        } else {
            Unusable::GatewayUnreachable
        }
    }
}

impl Reason {
    /// The `<reason>` of the `failed.<reason>` routing key.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Binary(s) => s.reason(),
            Reason::Http2 { reason, .. } => reason.name(),
            Reason::Unregistered { .. } => ApnsReason::Unregistered.name(),
            Reason::Expired => "expired",
            Reason::Timeout => "timeout",
            Reason::ConnectionLost => "connection_lost",
            Reason::RefusedStream => "refused_stream",
            Reason::Unusable(Unusable::GatewayUnreachable) => "gateway_unreachable",
            Reason::Unusable(Unusable::CertificateRejected) => "certificate_rejected",
        }
    }

    /// APNs' status code, when APNs gave one.
    pub fn status(self) -> Option<u16> {
        match self {
            Reason::Binary(s) => Some(u16::from(s.code())),
            Reason::Http2 { status, .. } => Some(status),
            Reason::Unregistered { .. } => Some(410),
            Reason::Expired
            | Reason::Timeout
            | Reason::ConnectionLost
            | Reason::RefusedStream
            | Reason::Unusable(_) => None,
        }
    }
}

/// The final word on one notification, or a correction of it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub notification: Notification,
    pub result: Result<(), Failure>,
    /// It corrects an acceptance reported before: the job counted this
    /// notification already (and may be final), so this is not counted
    /// against it again; a failure is published on its own. Only the binary
    /// interface, whose errors can name a notification after it settled,
    /// reports these.
    pub correction: bool,
}

impl Outcome {
    pub fn accepted(notification: Notification) -> Self {
        Outcome {
            correction: notification.reported,
            notification,
            result: Ok(()),
        }
    }

    /// Ends `notification` for `reason` after the tries it had (none, when it
    /// was never written).
    pub fn failed(notification: Notification, reason: Reason) -> Self {
        let attempts = notification.attempts;
        Outcome {
            correction: notification.reported,
            notification,
            result: Err(Failure { reason, attempts }),
        }
    }

    /// Ends `notification` with APNs' final answer to a try of it.
    pub fn refused(notification: Notification, reason: Reason) -> Self {
        let attempts = notification.attempts.max(1);
        Outcome {
            correction: notification.reported,
            notification,
            result: Err(Failure { reason, attempts }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub reason: Reason,
    pub attempts: u8,
}

/// Whether `n`'s `expiry` (unix seconds; 0 means "now or never") has passed.
fn is_expired(n: &Notification, unix_now: u64) -> bool {
    n.envelope
        .job
        .expiry
        .is_some_and(|e| e != 0 && u64::from(e) < unix_now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Rejection;
    use crate::token::{TokenError, Tokens};
    use bytes::Bytes;

    const HEX: &str = "1b14a89b65361301e7ded0f8de35ec1f322c37698b9fe712252a2cba42207d90";

    fn decode(body: &str) -> Result<Job, Rejection> {
        Job::decode(body.as_bytes(), None)
    }

    #[test]
    fn a_channel_job_needs_http2_and_fits_apples_broadcast_limit() {
        let job = |size: usize| {
            let body = format!(
                r#"{{"channel":"AAAA","payload":{{"aps":{{}},"x":"{}"}}}}"#,
                "x".repeat(size - r#"{"aps":{},"x":""}"#.len())
            );
            Job::decode(body.as_bytes(), None).unwrap()
        };
        let fits = job(http2::MAX_BROADCAST_PAYLOAD);
        assert_eq!(Protocol::Http2.check(&fits), Ok(()));
        assert_eq!(
            Protocol::Binary.check(&fits),
            Err(JobError::ChannelOnBinary)
        );
        assert_eq!(
            Protocol::Http2.check(&job(http2::MAX_BROADCAST_PAYLOAD + 1)),
            Err(JobError::PayloadTooLarge {
                size: http2::MAX_BROADCAST_PAYLOAD + 1,
                limit: http2::MAX_BROADCAST_PAYLOAD
            })
        );
    }

    #[test]
    fn payload_limit_is_measured_on_compact_json_per_protocol() {
        use super::frame::MAX_PAYLOAD;
        let fits = "x".repeat(MAX_PAYLOAD - r#"{"aps":{"alert":""}}"#.len());
        let body =
            format!(r#"{{"token":"{HEX}","payload":{{ "aps" : {{ "alert" : "{fits}" }} }}}}"#);
        let job = decode(&body).unwrap();
        assert_eq!(job.payload.len(), MAX_PAYLOAD);
        assert_eq!(Protocol::Binary.check(&job), Ok(()));
        let body = format!(r#"{{"token":"{HEX}","payload":{{"aps":{{"alert":"{fits}x"}}}}}}"#);
        let job = decode(&body).unwrap();
        assert_eq!(
            Protocol::Binary.check(&job),
            Err(JobError::PayloadTooLarge {
                size: MAX_PAYLOAD + 1,
                limit: MAX_PAYLOAD
            })
        );
        assert_eq!(Protocol::Http2.check(&job), Ok(()));
        let big = "x".repeat(4100);
        let body = |push_type: &str| {
            format!(r#"{{"token":"{HEX}","payload":{{"aps":{{"alert":"{big}"}}}}{push_type}}}"#)
        };
        let too_big = decode(&body("")).unwrap();
        assert!(matches!(
            Protocol::Http2.check(&too_big),
            Err(JobError::PayloadTooLarge { limit: 4096, .. })
        ));
        let voip = decode(&body(r#","push_type":"voip""#)).unwrap();
        assert_eq!(Protocol::Http2.check(&voip), Ok(()));
    }

    #[test]
    fn token_length_depends_on_the_protocol() {
        let short = "ab".repeat(31);
        let long = "cd".repeat(100);
        for (hex, binary, http2) in [
            (HEX.to_owned(), true, true),
            (short, false, true),
            (long, false, true),
        ] {
            let job = decode(&format!(r#"{{"token":"{hex}","payload":{{"aps":{{}}}}}}"#)).unwrap();
            assert_eq!(Protocol::Binary.check(&job).is_ok(), binary, "{hex}");
            assert_eq!(Protocol::Http2.check(&job).is_ok(), http2, "{hex}");
        }
        let job = decode(&format!(
            r#"{{"tokens":["{HEX}","{}"],"payload":{{"aps":{{}}}}}}"#,
            "ab".repeat(40)
        ))
        .unwrap();
        assert_eq!(
            Protocol::Binary.check(&job),
            Err(JobError::TokenSize { index: 1, len: 40 })
        );
        assert_eq!(DeviceToken::parse(&"ab".repeat(40)).unwrap().len(), 40);
        assert_eq!(
            DeviceToken::parse(&"ab".repeat(101)),
            Err(TokenError::Length(202))
        );
    }

    pub(super) fn envelope(tokens: Tokens) -> Arc<Envelope> {
        Arc::new(Envelope {
            key: JobKey(1),
            job: Job {
                id: None,
                app: None,
                tokens,
                payload: Bytes::from_static(b"{}"),
                expiry: None,
                priority: None,
                push_type: None,
                collapse_id: None,
                channel: None,
            },
            app: Arc::from("app"),
            consumed_at: Instant::now(),
            withdrawal: Withdrawal::default(),
            retries: 0,
        })
    }

    /// Routes 800 tokens made by `vary(i, bytes)` from a common base and
    /// checks every lane gets a fair share, for several lane counts.
    fn assert_spread(what: &str, vary: impl Fn(u32, &mut [u8; 32])) {
        let tokens: Tokens = (0..800u32)
            .map(|i| {
                let mut bytes = [0xab; 32];
                vary(i, &mut bytes);
                DeviceToken::from_bytes(bytes)
            })
            .collect();
        let env = envelope(tokens);
        for lanes in [2u64, 3, 4, 8] {
            let mut per_lane = vec![0; lanes as usize];
            for i in 0..800 {
                per_lane[(Notification::new(env.clone(), i).route_hash() % lanes) as usize] += 1;
            }
            let fair = 800 / lanes as usize;
            for (lane, &count) in per_lane.iter().enumerate() {
                assert!(
                    count > fair / 2 && count < fair * 3 / 2,
                    "{what}, {lanes} lanes: lane {lane} got {count} of 800: {per_lane:?}"
                );
            }
        }
    }

    #[test]
    fn tokens_sharing_a_prefix_spread_over_every_lane() {
        // The first 28 bytes are the same: routing by a prefix would put
        // every one on one lane.
        assert_spread("a shared prefix", |i, b| {
            b[28..].copy_from_slice(&i.to_be_bytes())
        });
        // Only the high bits of bytes differ: a hash whose low bits follow
        // the low bits of its input would still use one lane of two.
        assert_spread("high bits only", |i, b| {
            b[24..].copy_from_slice(&(u64::from(i) << 53).to_le_bytes())
        });
    }

    #[test]
    fn a_token_always_takes_the_same_lane() {
        let token = DeviceToken::parse(HEX).unwrap();
        let a = Notification::new(envelope([token].into_iter().collect()), 0);
        let b = Notification::new(envelope([token].into_iter().collect()), 0);
        assert_eq!(a.route_hash(), b.route_hash());
        // Pinned, so a change of hash (which would reorder a device's
        // notifications across a restart of the routing) is a decision.
        assert_eq!(route_hash(b"a"), 0x86ed_e49b_2924_d824);
        assert_ne!(route_hash(b"a"), route_hash(b"a\0"), "the length counts");
    }
}
