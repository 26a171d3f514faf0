//! The HTTP/2 provider API's transport: one persistent connection per lane,
//! one stream per notification, an answer for every stream.
//!
//! A connection keeps as many streams open as the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` allows (as it changes;
//! `max_concurrent_streams` caps it further), PINGs the server to find out it
//! died, and retries what a GOAWAY or a broken connection left unanswered.
//! The lane's task drives its [`connection::Connection`] itself: no task per
//! stream. [`frame`], [`hpack`], [`request`] and [`jwt`] hold the pure parts;
//! connecting, reconnecting and waiting without a connection are the lane's
//! ([`super::lane`]).

pub mod connection;
pub mod frame;
pub mod growth;
pub mod hpack;
pub mod in_flight;
pub mod jwt;
pub mod refused;
pub mod request;
pub mod wire;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::connect::{self, Endpoint};
use super::lane::{End, Lane, Policy, Transport, Work};
use super::{is_expired, Notification, Outcome, Reason, Unusable};
use crate::backoff::Backoff;
use crate::clock::{sleep_until, unix_now};
use connection::{Closed, Ending, Event};
use jwt::{Bearer, Renewal, Signer};
use refused::{RefusedStreams, Step};
use request::{Answer, ApnsIds, AppHeaders};
pub use request::{ApnsReason, MAX_BROADCAST_PAYLOAD, MAX_PAYLOAD, MAX_VOIP_PAYLOAD};

/// Longest error body read from APNs (they are a few dozen bytes).
const MAX_BODY: usize = 4096;

/// Where and as whom a lane connects (a reload replaces the whole app).
pub struct Target {
    /// Its TLS configuration must offer ALPN `h2`; it carries the client
    /// certificate under certificate auth.
    pub endpoint: Endpoint,
    /// `apns-topic`: the app's bundle id.
    pub topic: String,
    /// Token auth; `None` means the client certificate authenticates.
    pub signer: Option<Arc<Signer>>,
}

/// Per-lane tuning, from the app's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Http2Settings {
    pub max_attempts: u8,
    pub max_streams: usize,
    pub request_timeout: Duration,
    pub ping_interval: Duration,
    /// Its reconnect delays also pace retries of APNs' "not now" answers.
    pub policy: Policy,
}

/// What a stream carries for the lane: the notification and the provider
/// token it went with.
pub struct Sent {
    n: Notification,
    bearer: Option<Arc<Bearer>>,
}

/// A lane's connection.
pub type Connection = connection::Connection<Sent>;

/// A lane's connections to the HTTP/2 provider API.
pub struct Http2 {
    target: Arc<Target>,
    headers: AppHeaders,
    ids: ApnsIds,
    settings: Http2Settings,
}

impl Http2 {
    pub fn new(target: Arc<Target>, settings: Http2Settings) -> Self {
        let headers = AppHeaders::new(&target.endpoint.addr, &target.topic);
        Http2 {
            target,
            headers,
            ids: ApnsIds::default(),
            settings,
        }
    }
}

impl Http2Settings {
    fn options(&self) -> connection::Options {
        connection::Options {
            request_timeout: self.request_timeout,
            ping_interval: self.ping_interval,
            max_body: MAX_BODY,
            keep_headers: false,
        }
    }
}

impl Transport for Http2 {
    type Connection = Connection;
    type Error = ConnectError;
    const PEER: &'static str = "APNs (HTTP/2)";

    fn addr(&self) -> &str {
        &self.target.endpoint.addr
    }

    async fn connect(&self) -> Result<Connection, ConnectError> {
        let timeout = self.settings.policy.connect_timeout;
        open(&self.target.endpoint, timeout, self.settings.options()).await
    }

    fn unusable(error: &ConnectError) -> Unusable {
        error.unusable()
    }

    async fn drive(&mut self, conn: Connection, lane: &mut Lane, work: &mut Work) -> End {
        Streams {
            target: &self.target,
            headers: &self.headers,
            ids: &mut self.ids,
            settings: self.settings,
            lane,
        }
        .run(conn, work)
        .await
    }

    fn policy(&self) -> Policy {
        self.settings.policy
    }
}

/// One connection being driven: its streams, the app's target, the lane.
struct Streams<'a> {
    target: &'a Target,
    headers: &'a AppHeaders,
    ids: &'a mut ApnsIds,
    settings: Http2Settings,
    lane: &'a mut Lane,
}

impl Streams<'_> {
    /// Drives one connection until it ends; every stream opened on it has
    /// finished by then.
    async fn run(mut self, mut conn: Connection, work: &mut Work) -> End {
        let s = self.settings;
        let mut answered = false;
        let mut usable = true;
        // Streams that made this connection suspect: (timed out, lost).
        let mut unanswered = (0u64, 0u64);
        let end = loop {
            if work.is_done() && conn.in_flight() == 0 {
                break End::Drained;
            }
            if (!usable || !conn.accepting()) && conn.in_flight() == 0 {
                break if answered {
                    End::Healthy
                } else {
                    End::Broken(Unusable::GatewayUnreachable)
                };
            }
            // The clock is read once for the streams opened in one turn.
            let mut clock = None;
            while usable && conn.has_room(s.max_streams) && !conn.write_full() {
                let Some(n) = work.queue.pop_front() else {
                    break;
                };
                let now = *clock.get_or_insert_with(|| (tokio::time::Instant::now(), unix_now()));
                self.open_stream(&mut conn, n, now);
            }
            let room = usable && conn.has_room(s.max_streams);
            self.lane.lane_stats.window.set(conn.in_flight() as i64);
            let limit = s.max_streams.min(conn.limit());
            self.lane
                .occupancy
                .set(conn.in_flight(), limit, work.queue.len());
            let due = work.next_due();
            tokio::select! {
                biased;
                event = conn.next() => {
                    let mut outcomes = Vec::new();
                    let mut next = Some(event);
                    let mut answers = 0;
                    while let Some(event) = next {
                        match event {
                            Event::Ended(sent, ending) => {
                                if matches!(ending, Ending::Answered { .. }) {
                                    answered = true;
                                    answers += 1;
                                }
                                // A broken or unanswered stream makes the connection
                                // suspect: retries go out on a fresh one, not into a
                                // connection PING has yet to find dead.
                                match ending {
                                    Ending::TimedOut => unanswered.0 += 1,
                                    Ending::Lost => unanswered.1 += 1,
                                    _ => {}
                                }
                                usable &= unanswered == (0, 0);
                                self.finish(sent, ending, work, &mut outcomes);
                            }
                            // Back to the top, where more streams open.
                            Event::Writable => {}
                            Event::Closed(why) => {
                                usable = false;
                                if matches!(why, Closed::Stalled) {
                                    tracing::warn!(app = %self.lane.app, lane = self.lane.index,
                                        "APNs stopped answering PINGs: dropping the connection");
                                    self.lane.lane_stats.stalls.inc();
                                } else {
                                    tracing::debug!(app = %self.lane.app, lane = self.lane.index,
                                        error = %why, "HTTP/2 connection ended");
                                }
                            }
                        }
                        next = conn.try_next();
                    }
                    self.lane.occupancy.answered(answers);
                    self.lane.report(outcomes);
                }
                _ = sleep_until(due), if due.is_some() => work.release_due(Instant::now()),
                batch = self.lane.rx.recv(), if room && work.open && work.queue.is_empty() => work.take(batch),
            }
        };
        conn.shutdown(CLOSE_GRACE).await;
        if unanswered != (0, 0) {
            tracing::warn!(app = %self.lane.app, lane = self.lane.index, timed_out = unanswered.0,
                lost = unanswered.1, "retired an HTTP/2 connection whose streams went unanswered");
        }
        end
    }

    /// Sends one notification on a new stream of `conn`, which has room;
    /// `(now, unix_now)` is the time of this turn of the lane.
    fn open_stream(
        &mut self,
        conn: &mut Connection,
        n: Notification,
        clock: (tokio::time::Instant, u64),
    ) {
        let target = self.target;
        let env = &n.envelope;
        if env.withdrawal.is_withdrawn() {
            // Its owner took it back (the broker redelivers the job).
            self.lane.stats.dropped_for_redelivery.inc();
            return;
        }
        if is_expired(&n, clock.1) {
            self.lane.report(vec![Outcome::failed(n, Reason::Expired)]);
            return;
        }
        let bearer = match target.signer.as_deref().map(Signer::bearer).transpose() {
            Ok(b) => b,
            Err(e) => {
                // Signing with a key that loaded cannot fail short of a broken
                // crypto library; retrying could not help.
                tracing::error!(app = %self.lane.app, error = %e, "cannot sign a provider token");
                self.lane.report(vec![Outcome::refused(
                    n,
                    Reason::Http2 {
                        status: 403,
                        reason: ApnsReason::MissingProviderToken,
                    },
                )]);
                return;
            }
        };
        let payload = env.job.payload.clone();
        let (headers, ids) = (self.headers, &mut *self.ids);
        conn.send(Sent { n, bearer }, &payload, clock.0, |sent, out| {
            let bearer = sent.bearer.as_ref().map(|b| b.header.as_bytes());
            request::encode(out, &sent.n, headers, bearer, ids);
        });
        self.lane.stats.written.inc();
    }

    /// Turns a finished stream into an outcome, a retry or a resend.
    fn finish(&self, sent: Sent, ending: Ending, work: &mut Work, outcomes: &mut Vec<Outcome>) {
        let Sent { mut n, bearer } = sent;
        let bearer = bearer.as_ref();
        let s = self.settings;
        let target = self.target;
        let pauses = Backoff::new(s.policy.reconnect_min, s.policy.reconnect_max);
        // Counts the try; `Some` once the tries are used up. A pause is for
        // APNs' own "not now" answers; a lost or stale stream goes again at once.
        let retry = |n: Notification, reason: Reason, work: &mut Work, pause: bool| {
            let mut n = n;
            n.attempts = n.attempts.saturating_add(1);
            if n.attempts >= s.max_attempts {
                return Some(Outcome::refused(n, reason));
            }
            if pause {
                let delay = pauses.ceiling(u32::from(n.attempts));
                work.later.push((Instant::now() + delay, n));
            } else {
                work.queue.push_front(n);
            }
            None
        };
        let (outcome, resend_counter) = match ending {
            Ending::Answered { status, body, .. } => {
                match request::classify(status, &body, SystemTime::now) {
                    Answer::Accepted => (Some(Outcome::accepted(n)), None),
                    Answer::Failed(reason) => {
                        n.attempts = n.attempts.saturating_add(1);
                        (Some(Outcome::refused(n, reason)), None)
                    }
                    Answer::Retry(reason) => {
                        (retry(n, reason, work, true), Some(&self.lane.stats.retried))
                    }
                    Answer::TokenExpired => {
                        let renewal = match (&target.signer, bearer) {
                            (Some(signer), Some(used)) => signer.expired(used),
                            _ => Renewal::Replaced,
                        };
                        match renewal {
                            Renewal::Retired { minted } => tracing::info!(app = %self.lane.app,
                                tokens_minted = minted,
                                "APNs says the provider token expired: minting a new one"),
                            Renewal::Held { first: true } => tracing::warn!(app = %self.lane.app,
                                floor = ?jwt::MINT_FLOOR,
                                "APNs says a fresh provider token expired: the system clock may be off; \
                                 the next token waits for the floor between mints"),
                            Renewal::Held { first: false } | Renewal::Replaced => {}
                        }
                        let reason = Reason::Http2 {
                            status: 403,
                            reason: ApnsReason::ExpiredProviderToken,
                        };
                        // A held token would be refused again at once: pause.
                        let pause = matches!(renewal, Renewal::Held { .. });
                        (
                            retry(n, reason, work, pause),
                            Some(&self.lane.stats.retried),
                        )
                    }
                }
            }
            Ending::Unprocessed => {
                work.queue.push_front(n);
                (None, Some(&self.lane.stats.resent_after_error))
            }
            Ending::Reset(frame::code::REFUSED_STREAM) => {
                n.refusals = n.refusals.saturating_add(1);
                let policy = RefusedStreams {
                    min: s.policy.reconnect_min,
                    max: s.policy.reconnect_max,
                };
                match policy.step(n.refusals) {
                    Step::Resend { after } => {
                        work.later.push((Instant::now() + after, n));
                        (None, Some(&self.lane.stats.resent_after_error))
                    }
                    Step::CountTry => (
                        retry(n, Reason::RefusedStream, work, true),
                        Some(&self.lane.stats.retried),
                    ),
                }
            }
            Ending::Lost | Ending::Reset(_) => (
                retry(n, Reason::ConnectionLost, work, false),
                Some(&self.lane.stats.resent_after_close),
            ),
            Ending::TimedOut => (
                retry(n, Reason::Timeout, work, false),
                Some(&self.lane.stats.resent_after_close),
            ),
        };
        if let (None, Some(counter)) = (&outcome, resend_counter) {
            counter.inc();
        }
        outcomes.extend(outcome);
    }
}

/// How long a retired connection gets to say GOAWAY before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the server did not agree to HTTP/2 (ALPN h2)")]
    NoH2,
    #[error("HTTP/2 handshake: {0}")]
    Handshake(#[from] Closed),
    #[error("connect timed out")]
    TimedOut,
}

impl ConnectError {
    fn unusable(&self) -> Unusable {
        match self {
            ConnectError::Io(e) | ConnectError::Handshake(Closed::Io(e)) => Unusable::of_io(e),
            ConnectError::Handshake(_) | ConnectError::NoH2 | ConnectError::TimedOut => {
                Unusable::GatewayUnreachable
            }
        }
    }
}

/// Connects, agrees on HTTP/2 and sees the server answer a PING, all within `timeout`.
async fn open<T>(
    endpoint: &Endpoint,
    timeout: Duration,
    options: connection::Options,
) -> Result<connection::Connection<T>, ConnectError> {
    let attempt = async {
        let tls = connect::open(endpoint).await?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(ConnectError::NoH2);
        }
        Ok(connection::Connection::handshake(tls, options).await?)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err(ConnectError::TimedOut))
}

/// Why [`send_one`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the request failed: {0}")]
    Failed(String),
}

/// Longest answer body [`send_one`] reads (a list of 10,000 channel ids fits).
const MAX_ONE_BODY: usize = 1 << 20;

/// One request on a connection of its own, for the tools that are not the
/// daemon (`check --connect`, `channels`): the answer's head and body.
/// Under token auth the target's signer adds the `authorization` header.
pub async fn send_one(
    target: &Target,
    req: http::Request<()>,
    body: Bytes,
    timeout: Duration,
) -> Result<(http::response::Parts, Vec<u8>), RequestError> {
    let failed = |e: &dyn std::fmt::Display| RequestError::Failed(e.to_string());
    let options = connection::Options {
        request_timeout: timeout,
        ping_interval: timeout,
        max_body: MAX_ONE_BODY + 1,
        keep_headers: true,
    };
    let mut conn = open::<()>(&target.endpoint, timeout, options)
        .await
        .map_err(|e| RequestError::Connect {
            addr: target.endpoint.addr.clone(),
            source: Box::new(e),
        })?;
    let bearer = match &target.signer {
        Some(signer) => Some(signer.bearer().map_err(|e| failed(&e))?),
        None => None,
    };
    let (parts, ()) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    conn.send((), &body, tokio::time::Instant::now(), |(), out| {
        hpack::field(out, hpack::index::METHOD, parts.method.as_str().as_bytes());
        hpack::indexed(out, hpack::index::SCHEME_HTTPS);
        hpack::field(
            out,
            hpack::index::AUTHORITY,
            target.endpoint.addr.as_bytes(),
        );
        hpack::field(out, hpack::index::PATH, path.as_bytes());
        for (name, value) in &parts.headers {
            hpack::named(out, name.as_str().as_bytes(), value.as_bytes());
        }
        if let Some(bearer) = &bearer {
            hpack::sensitive(out, hpack::index::AUTHORIZATION, bearer.header.as_bytes());
        }
    });
    // The connection's only stream ends before any `Closed`.
    let answer = loop {
        match conn.next().await {
            Event::Ended((), ending) => break ending,
            Event::Writable => {}
            Event::Closed(why) => return Err(failed(&why)),
        }
    };
    conn.shutdown(CLOSE_GRACE).await;
    match answer {
        Ending::Answered {
            status,
            headers,
            body,
        } => {
            if body.len() > MAX_ONE_BODY {
                return Err(RequestError::Failed("the answer is too long".into()));
            }
            let mut response = http::Response::builder().status(status);
            for (name, value) in headers {
                if !name.starts_with(b":") {
                    response = response.header(name, value);
                }
            }
            let (parts, ()) = response.body(()).map_err(|e| failed(&e))?.into_parts();
            Ok((parts, body))
        }
        Ending::TimedOut => Err(RequestError::Failed(format!(
            "no answer within {timeout:?}"
        ))),
        other => Err(RequestError::Failed(format!("no answer: {other:?}"))),
    }
}

/// The `reason` of an APNs error body, or a stand-in when it has none.
pub fn reason_of(body: &[u8]) -> String {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    json["reason"].as_str().unwrap_or("(no reason)").to_owned()
}

/// The device token of [`probe`]'s request: well-formed, and no device has it.
pub const PROBE_TOKEN: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Why an HTTP/2 endpoint failed [`probe`].
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("APNs refused the {what}: {status} {reason}")]
    Refused {
        what: &'static str,
        status: u16,
        reason: String,
    },
}

/// Proves an app's HTTP/2 credentials without notifying anyone: the TLS
/// handshake and a PING answered (the client certificate, if any, was
/// taken), then one request to [`PROBE_TOKEN`]. APNs judges the credentials
/// before the token, so `400 BadDeviceToken` means they are good, and a 403
/// (`InvalidProviderToken`, `BadCertificate`, ...) names what is wrong.
/// Returns what was proven, for `apnsd check --connect`.
pub async fn probe(target: &Target, timeout: Duration) -> Result<String, ProbeError> {
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!(
            "https://{}/3/device/{PROBE_TOKEN}",
            target.endpoint.addr
        ))
        .header("apns-topic", target.topic.as_str())
        .header("apns-push-type", "background")
        .header("apns-priority", "5")
        .body(())
        .map_err(|e| RequestError::Failed(e.to_string()))?;
    let body = Bytes::from_static(br#"{"aps":{"content-available":1}}"#);
    let (parts, body) = send_one(target, req, body, timeout).await?;
    let (status, reason) = (parts.status.as_u16(), reason_of(&body));
    let what = if target.signer.is_some() {
        "provider token"
    } else {
        "client certificate"
    };
    match (status, reason.as_str()) {
        (400, "BadDeviceToken") | (200, _) => Ok(format!(
            "TLS and HTTP/2 up, PING answered, {what} and topic accepted ({status} {reason} for a token no device has)"
        )),
        _ => Err(ProbeError::Refused {
            what,
            status,
            reason,
        }),
    }
}
