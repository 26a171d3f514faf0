//! The HTTP/2 provider API's transport: one persistent connection per lane,
//! one stream per notification, an answer for every stream.
//!
//! A connection keeps as many streams open as the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` allows (h2 tracks the setting as it
//! changes; `max_concurrent_streams` caps it further), PINGs an idle
//! connection to find out it died, and retries what a GOAWAY or a broken
//! connection left unanswered. [`request`] and [`jwt`] hold the pure parts;
//! connecting, reconnecting and waiting without a connection are the lane's
//! ([`super::lane`]).

pub mod growth;
pub mod jwt;
pub mod refused;
pub mod request;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{Ping, PingPong};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};

use super::connect::{self, Endpoint};
use super::lane::{End, Lane, Policy, Transport, Work};
use super::{is_expired, Notification, Outcome, Reason, Unusable};
use crate::backoff::Backoff;
use crate::clock::{sleep_until, unix_now};
use jwt::{Bearer, Renewal, Signer};
use refused::{RefusedStreams, Step};
use request::Answer;
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

/// How one stream ended, as the lane sees it.
enum Exchange {
    Answered {
        status: u16,
        body: Vec<u8>,
    },
    /// Left unprocessed by a GOAWAY: safe to send again, elsewhere.
    Refused,
    /// Reset with REFUSED_STREAM: safe to send again, but the server may
    /// refuse it every time (see [`refused`]).
    RefusedStream,
    /// The connection broke first: APNs may or may not have it.
    Lost,
    TimedOut,
}

/// One finished stream: the notification, the token it was sent with, the end.
type Finished = (Notification, Option<Bearer>, Exchange);

/// A lane's connections to the HTTP/2 provider API.
pub struct Http2 {
    target: Arc<Target>,
    settings: Http2Settings,
}

impl Http2 {
    pub fn new(target: Arc<Target>, settings: Http2Settings) -> Self {
        Http2 { target, settings }
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
        open(&self.target.endpoint, self.settings.policy.connect_timeout).await
    }

    fn unusable(error: &ConnectError) -> Unusable {
        error.unusable()
    }

    async fn drive(&mut self, conn: Connection, lane: &mut Lane, work: &mut Work) -> End {
        Streams {
            target: &self.target,
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
    settings: Http2Settings,
    lane: &'a mut Lane,
}

impl Streams<'_> {
    /// Drives one connection until it ends; every stream opened on it has
    /// finished by then.
    async fn run(mut self, conn: Connection, work: &mut Work) -> End {
        let s = self.settings;
        let Connection {
            mut send,
            driver,
            ping,
        } = conn;
        let mut keepalive = tokio::spawn(keepalive(ping, s.ping_interval));
        let mut streams: JoinSet<Finished> = JoinSet::new();
        let mut answered = false;
        let mut usable = true;
        // Streams that made this connection suspect: (timed out, lost).
        let mut unanswered = (0u64, 0u64);
        let end = loop {
            if work.is_done() && streams.is_empty() {
                break End::Drained;
            }
            if !usable && streams.is_empty() {
                break if answered {
                    End::Healthy
                } else {
                    End::Broken(Unusable::GatewayUnreachable)
                };
            }
            let room = usable && streams.len() < s.max_streams;
            self.lane.lane_stats.window.set(streams.len() as i64);
            let limit = s.max_streams.min(send.current_max_send_streams());
            self.lane
                .occupancy
                .set(streams.len(), limit, work.queue.len());
            let due = work.next_due();
            tokio::select! {
                biased;
                Some(joined) = streams.join_next(), if !streams.is_empty() => {
                    let mut outcomes = Vec::new();
                    let mut next = Some(joined);
                    while let Some(joined) = next {
                        if let Ok((n, bearer, exchange)) = joined {
                            answered |= matches!(exchange, Exchange::Answered { .. });
                            // A broken or unanswered stream makes the connection
                            // suspect: retries go out on a fresh one, not into a
                            // connection PING has yet to find dead.
                            match exchange {
                                Exchange::TimedOut => unanswered.0 += 1,
                                Exchange::Lost => unanswered.1 += 1,
                                _ => {}
                            }
                            usable &= unanswered == (0, 0);
                            self.finish(n, bearer.as_ref(), exchange, work, &mut outcomes);
                        }
                        next = streams.try_join_next();
                    }
                    self.lane.report(outcomes);
                }
                _ = &mut keepalive, if usable => {
                    tracing::warn!(app = %self.lane.app, lane = self.lane.index,
                        "APNs stopped answering PINGs: dropping the connection");
                    self.lane.lane_stats.stalls.inc();
                    usable = false;
                    // Ends the connection, so every open stream fails at once.
                    driver.abort();
                }
                ready = std::future::poll_fn(|cx| send.poll_ready(cx)), if room && !work.queue.is_empty() => match ready {
                    Ok(()) => {
                        if let Some(n) = work.queue.pop_front() {
                            if !self.open_stream(&mut send, n, work, &mut streams) {
                                usable = false;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(app = %self.lane.app, lane = self.lane.index, error = %e,
                            "connection no longer takes streams");
                        usable = false;
                    }
                },
                _ = sleep_until(due), if due.is_some() => work.release_due(Instant::now()),
                batch = self.lane.rx.recv(), if room && work.open && work.queue.is_empty() => work.take(batch),
            }
        };
        keepalive.abort();
        driver.abort();
        if unanswered != (0, 0) {
            tracing::warn!(app = %self.lane.app, lane = self.lane.index, timed_out = unanswered.0,
                lost = unanswered.1, "retired an HTTP/2 connection whose streams went unanswered");
        }
        end
    }

    /// Sends one notification on a new stream. False: the connection refused
    /// it and is done (the notification went back to the queue).
    fn open_stream(
        &mut self,
        send: &mut SendRequest<Bytes>,
        n: Notification,
        work: &mut Work,
        streams: &mut JoinSet<Finished>,
    ) -> bool {
        let target = self.target;
        let env = &n.envelope;
        if env.withdrawal.is_withdrawn() {
            // Its owner took it back (the broker redelivers the job).
            self.lane.stats.dropped_for_redelivery.inc();
            return true;
        }
        if is_expired(&n, unix_now()) {
            self.lane.report(vec![Outcome::failed(n, Reason::Expired)]);
            return true;
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
                return true;
            }
        };
        let req = match request::build(
            &n,
            &target.endpoint.addr,
            &target.topic,
            bearer.as_ref().map(|b| &b.header),
        ) {
            Ok(req) => req,
            Err(e) => {
                // Every part was validated (job decoding, the app's topic and
                // endpoint at start): reaching this is a bug, reported as such.
                tracing::error!(app = %self.lane.app, error = %e, "cannot build the request");
                self.lane.report(vec![Outcome::refused(
                    n,
                    Reason::Http2 {
                        status: 400,
                        reason: ApnsReason::Unknown,
                    },
                )]);
                return true;
            }
        };
        match send.send_request(req, false) {
            Ok((response, mut body)) => {
                // A failure here shows on the response future as well.
                let _ = body.send_data(env.job.payload.clone(), true);
                self.lane.stats.written.inc();
                let timeout = self.settings.request_timeout;
                streams.spawn(async move {
                    let exchange = exchange(response, timeout).await;
                    (n, bearer, exchange)
                });
                true
            }
            Err(e) => {
                tracing::debug!(app = %self.lane.app, lane = self.lane.index, error = %e, "stream not opened");
                work.queue.push_front(n);
                false
            }
        }
    }

    /// Turns a finished stream into an outcome, a retry or a resend.
    fn finish(
        &self,
        mut n: Notification,
        bearer: Option<&Bearer>,
        exchange: Exchange,
        work: &mut Work,
        outcomes: &mut Vec<Outcome>,
    ) {
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
        let (outcome, resend_counter) = match exchange {
            Exchange::Answered { status, body } => {
                match request::classify(status, &body, SystemTime::now()) {
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
            Exchange::Refused => {
                work.queue.push_front(n);
                (None, Some(&self.lane.stats.resent_after_error))
            }
            Exchange::RefusedStream => {
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
            Exchange::Lost => (
                retry(n, Reason::ConnectionLost, work, false),
                Some(&self.lane.stats.resent_after_close),
            ),
            Exchange::TimedOut => (
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

/// Waits for the response and its body, within `timeout`.
async fn exchange(response: ResponseFuture, timeout: Duration) -> Exchange {
    let answer = async {
        let response = response.await?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if bytes.len() < MAX_BODY {
                bytes.extend_from_slice(&chunk[..chunk.len().min(MAX_BODY - bytes.len())]);
            }
        }
        Ok::<_, h2::Error>((status, bytes))
    };
    match tokio::time::timeout(timeout, answer).await {
        Ok(Ok((status, body))) => Exchange::Answered { status, body },
        Ok(Err(e)) if e.reason() == Some(h2::Reason::REFUSED_STREAM) && !e.is_go_away() => {
            Exchange::RefusedStream
        }
        Ok(Err(e)) if e.is_go_away() => Exchange::Refused,
        Ok(Err(_)) => Exchange::Lost,
        Err(_) => Exchange::TimedOut,
    }
}

/// Sends a PING every `interval`; returns when one goes unanswered for as long.
async fn keepalive(ping: Option<PingPong>, interval: Duration) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(interval, ping.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
    }
}

pub struct Connection {
    send: SendRequest<Bytes>,
    /// Drives the connection's frames; aborting it ends the connection.
    driver: JoinHandle<Result<(), h2::Error>>,
    ping: Option<PingPong>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the server did not agree to HTTP/2 (ALPN h2)")]
    NoH2,
    #[error("HTTP/2 handshake: {0}")]
    Handshake(#[from] h2::Error),
    #[error("connect timed out")]
    TimedOut,
}

impl ConnectError {
    fn unusable(&self) -> Unusable {
        match self {
            ConnectError::Io(e) => Unusable::of_io(e),
            // h2 keeps only the kind and text of an I/O error; under h2 only
            // the TLS layer reports `InvalidData` (an alert, a bad record).
            ConnectError::Handshake(e) => match e.get_io() {
                Some(io) if io.kind() == io::ErrorKind::InvalidData => {
                    Unusable::CertificateRejected
                }
                _ => Unusable::GatewayUnreachable,
            },
            ConnectError::NoH2 | ConnectError::TimedOut => Unusable::GatewayUnreachable,
        }
    }
}

/// Connects, agrees on HTTP/2 and sees the server answer a PING, all within `timeout`.
async fn open(endpoint: &Endpoint, timeout: Duration) -> Result<Connection, ConnectError> {
    // The driver runs from the h2 handshake on; a connect that fails or times
    // out after it must not leave it holding the socket.
    let mut spawned: Option<AbortHandle> = None;
    let attempt = async {
        let tls = connect::open(endpoint).await?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(ConnectError::NoH2);
        }
        let (send, mut conn) = h2::client::Builder::new()
            .enable_push(false)
            .handshake(tls)
            .await?;
        let mut ping = conn.ping_pong();
        let mut driver = tokio::spawn(conn);
        spawned = Some(driver.abort_handle());
        // A PONG shows the server took our identity: under TLS 1.3 a refused
        // client certificate only shows now, as an alert ending the connection.
        if let Some(ping) = ping.as_mut() {
            if let Err(e) = ping.ping(Ping::opaque()).await {
                let cause = match (&mut driver).await {
                    Ok(Err(cause)) => cause,
                    _ => e,
                };
                return Err(ConnectError::Handshake(cause));
            }
        }
        Ok(Connection { send, driver, ping })
    };
    let result = tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err(ConnectError::TimedOut));
    if let (Err(_), Some(driver)) = (&result, spawned) {
        driver.abort();
    }
    result
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
    mut req: http::Request<()>,
    body: Bytes,
    timeout: Duration,
) -> Result<(http::response::Parts, Vec<u8>), RequestError> {
    let failed = |e: &dyn std::fmt::Display| RequestError::Failed(e.to_string());
    let conn = open(&target.endpoint, timeout)
        .await
        .map_err(|e| RequestError::Connect {
            addr: target.endpoint.addr.clone(),
            source: Box::new(e),
        })?;
    if let Some(signer) = &target.signer {
        let bearer = signer.bearer().map_err(|e| failed(&e))?;
        req.headers_mut()
            .insert(http::header::AUTHORIZATION, bearer.header);
    }
    let Connection {
        mut send, driver, ..
    } = conn;
    let exchange = async {
        let (response, mut stream) = send
            .send_request(req, body.is_empty())
            .map_err(|e| failed(&e))?;
        if !body.is_empty() {
            stream.send_data(body, true).map_err(|e| failed(&e))?;
        }
        let (parts, mut incoming) = response.await.map_err(|e| failed(&e))?.into_parts();
        let mut read = Vec::new();
        while let Some(chunk) = incoming.data().await {
            let chunk = chunk.map_err(|e| failed(&e))?;
            let _ = incoming.flow_control().release_capacity(chunk.len());
            if read.len() + chunk.len() > MAX_ONE_BODY {
                return Err(RequestError::Failed("the answer is too long".into()));
            }
            read.extend_from_slice(&chunk);
        }
        Ok((parts, read))
    };
    let answer = tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(RequestError::Failed(format!(
                "no answer within {timeout:?}"
            )))
        });
    driver.abort();
    answer
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
