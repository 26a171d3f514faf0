//! Everything that speaks to APNs, behind one seam: the pipeline hands a
//! transport [`Notification`]s and gets one [`Outcome`] back for each.
//! Resends, reconnects and settling stay inside the transport.

pub mod frame;
pub mod http2;
pub mod lane;
pub mod pool;
mod standby;
pub mod tls;
pub mod window;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::job::{DeviceToken, Priority, Tokens};
use crate::ledger::JobKey;
use frame::Status;
use http2::ApnsReason;

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
}

/// What every notification of one job shares: one allocation per job, so a
/// fan-out of 10,000 tokens costs one payload buffer and one token list.
#[derive(Debug)]
pub struct Envelope {
    pub key: JobKey,
    /// The job's tokens; a [`Notification`] names one by index.
    pub tokens: Tokens,
    pub id: Option<Arc<str>>,
    pub app: Arc<str>,
    pub payload: Bytes,
    pub expiry: Option<u32>,
    pub priority: Option<Priority>,
    /// HTTP/2 only: `apns-push-type` as the job gave it.
    pub push_type: Option<Box<str>>,
    /// HTTP/2 only: `apns-collapse-id`.
    pub collapse_id: Option<Box<str>>,
    /// When the job was consumed, for the consume-to-accepted latency.
    pub consumed_at: Instant,
    /// Set when the broker session that consumed the job ends: the job is
    /// then redelivered, so a lane drops what it has not written yet instead
    /// of sending it a second time.
    pub session: SessionEnded,
    /// Times the job already went through the retry queue (`x-apnsd-attempts`).
    pub retries: u32,
}

/// Shared by the jobs of one broker session, set once it has ended. A plain
/// atomic flag: lanes read it for every notification they write.
#[derive(Debug, Clone, Default)]
pub struct SessionEnded(Arc<AtomicBool>);

impl SessionEnded {
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
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
    /// An acceptance was reported already (it settled, then a late error made it
    /// travel again): later outcomes must not be counted against its job again.
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
        self.envelope.tokens.bytes(self.index as usize)
    }

    /// The token as a value of its own, for results and logs. Every token in
    /// an envelope came from a `DeviceToken`, so this is never the fallback.
    pub fn token(&self) -> DeviceToken {
        self.envelope
            .tokens
            .get(self.index as usize)
            .unwrap_or(DeviceToken::from_bytes([0; DeviceToken::BINARY_LEN]))
    }

    /// A stable hash of the token, routing one device's notifications to one lane.
    pub fn route_hash(&self) -> u64 {
        let mut head = [0u8; 8];
        let bytes = self.token_bytes();
        let n = bytes.len().min(8);
        head[..n].copy_from_slice(&bytes[..n]);
        u64::from_le_bytes(head)
    }
}

/// Why a notification failed for good: APNs' status, or a daemon-side reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A binary-interface status.
    Apns(Status),
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

impl Reason {
    /// The `<reason>` of the `failed.<reason>` routing key.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Apns(s) => s.reason(),
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
            Reason::Apns(s) => Some(u16::from(s.code())),
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

/// The final word on one notification.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub notification: Notification,
    pub result: Result<(), Failure>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub reason: Reason,
    pub attempts: u8,
}

/// Whether `n`'s `expiry` (unix seconds; 0 means "now or never") has passed.
fn is_expired(n: &Notification, unix_now: u64) -> bool {
    n.envelope
        .expiry
        .is_some_and(|e| e != 0 && u64::from(e) < unix_now)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Sleeps until `at`, or forever: a `select!` arm for an optional deadline.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
