//! The HTTP/2 provider API: one lane per persistent connection, one stream
//! per notification, an answer for every stream.
//!
//! The lane keeps as many streams open as the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` allows (h2 tracks the setting as it
//! changes; `max_concurrent_streams` caps it further), PINGs an idle
//! connection to find out it died, and retries what a GOAWAY or a broken
//! connection left unanswered. [`request`] and [`jwt`] hold the pure parts.

pub mod growth;
pub mod jwt;
pub mod refused;
pub mod request;

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{Ping, PingPong};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio_rustls::TlsConnector;

use super::lane::Outcomes;
use super::standby::{classify, Reconnect, Standby};
use super::{is_expired, sleep_until, unix_now, Failure, Notification, Outcome, Reason, Unusable};
use crate::metrics::{LaneStats, Stats};
use jwt::{Bearer, Renewal, Signer};
use refused::{RefusedStreams, Step};
use request::Answer;
pub use request::{ApnsReason, MAX_PAYLOAD, MAX_VOIP_PAYLOAD};

/// Longest error body read from APNs (they are a few dozen bytes).
const MAX_BODY: usize = 4096;

/// Where and as whom a lane connects (a reload replaces the whole app).
pub struct Target {
    pub addr: String,
    pub server_name: ServerName<'static>,
    /// Must offer ALPN `h2`; carries the client certificate under certificate auth.
    pub tls: Arc<rustls::ClientConfig>,
    /// `apns-topic`: the app's bundle id.
    pub topic: String,
    /// Token auth; `None` means the client certificate authenticates.
    pub signer: Option<Arc<Signer>>,
}

/// Per-lane tuning, from the app's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub max_attempts: u8,
    pub max_streams: usize,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub ping_interval: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// After this long without a working connection, queued work is handed back.
    pub unusable_after: Duration,
    /// Most notifications a lane queues while it cannot connect.
    pub backlog: usize,
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

/// How a connection ended, for the reconnect policy.
enum End {
    Drained,
    /// APNs answered something: reconnect at once.
    Healthy,
    /// Closed or broken before any answer: back off, and after
    /// `unusable_after` of this give the work back.
    Broken(Unusable),
}

/// Work a lane holds across connections.
struct Work {
    /// Ready to send, resends first.
    queue: VecDeque<Notification>,
    /// Waiting out a retry pause.
    later: Vec<(Instant, Notification)>,
    rx_open: bool,
}

impl Work {
    fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.later.is_empty()
    }

    fn next_due(&self) -> Option<Instant> {
        self.later.iter().map(|(at, _)| *at).min()
    }

    /// Moves notifications whose pause is over to the front of the queue.
    fn release_due(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.later.len() {
            if self.later[i].0 <= now {
                let (_, n) = self.later.swap_remove(i);
                self.queue.push_front(n);
            } else {
                i += 1;
            }
        }
    }
}

pub struct Lane {
    app: Arc<str>,
    index: usize,
    target: Arc<Target>,
    settings: Settings,
    rx: mpsc::Receiver<Vec<Notification>>,
    outcomes: Outcomes,
    stats: Arc<Stats>,
    /// Connection metrics labelled with the app; `window` counts open streams.
    lane_stats: LaneStats,
}

impl Lane {
    /// Starts a lane task. It ends once the returned sender is dropped and every
    /// notification it was given has an outcome.
    pub fn spawn(
        app: Arc<str>,
        index: usize,
        target: Arc<Target>,
        settings: Settings,
        outcomes: Outcomes,
        stats: Arc<Stats>,
    ) -> (mpsc::Sender<Vec<Notification>>, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(16);
        let lane = Lane {
            lane_stats: stats.lane(&app, index),
            app,
            index,
            target,
            settings,
            rx,
            outcomes,
            stats,
        };
        (tx, tokio::spawn(lane.run_then_forget()))
    }

    /// Runs the lane; a lane that ends (drained, or its app retired) no longer
    /// counts against readiness.
    async fn run_then_forget(self) {
        let (stats, app, index) = (self.stats.clone(), self.app.clone(), self.index);
        self.run().await;
        stats.set_identity_refused(&app, index, false);
    }

    async fn run(mut self) {
        let s = self.settings;
        let mut work = Work {
            queue: VecDeque::new(),
            later: Vec::new(),
            rx_open: true,
        };
        let mut reconnect = Reconnect::new(s.reconnect_min, s.reconnect_max, s.unusable_after);
        let mut first = true;
        loop {
            // Connect eagerly once, then only when there is work.
            if work.is_empty() && !first {
                match self.rx.recv().await {
                    Some(batch) => work.queue.extend(batch),
                    None => return,
                }
            }
            first = false;
            let target = self.target.clone();
            let attempt = connect(&target, s.connect_timeout);
            let end = match self.standby(attempt, None, &mut work).await {
                Ok(conn) => {
                    tracing::debug!(app = %self.app, lane = self.index, addr = %target.addr, "connected (HTTP/2)");
                    self.lane_stats.connections_opened.inc();
                    self.lane_stats.connections_up.add(1);
                    let end = self.connection(conn, &target, &mut work).await;
                    self.lane_stats.connections_up.add(-1);
                    self.lane_stats.window.set(0);
                    end
                }
                Err(e) => {
                    self.lane_stats.connect_failures.inc();
                    tracing::warn!(app = %self.app, lane = self.index, addr = %target.addr,
                        error = %e, "cannot connect to APNs (HTTP/2)");
                    End::Broken(e.unusable())
                }
            };
            match end {
                End::Drained => return,
                End::Healthy => reconnect.healthy(&self.stats, &self.app, self.index),
                End::Broken(why) => {
                    let (delay, unusable) =
                        reconnect.broken(why, &self.stats, &self.app, self.index);
                    if unusable.is_some() {
                        // Retry pauses are moot: the whole job waits in the retry queue.
                        let paused = work.later.drain(..).map(|(_, n)| n);
                        work.queue.extend(paused);
                    }
                    let pause = tokio::time::sleep(delay);
                    self.standby(pause, unusable, &mut work).await;
                }
            }
            if !work.rx_open && work.is_empty() {
                return;
            }
        }
    }

    /// Waits for `fut` without a connection, taking work meanwhile (see [`Standby`]).
    async fn standby<F: Future>(
        &mut self,
        fut: F,
        unusable: Option<Unusable>,
        work: &mut Work,
    ) -> F::Output {
        Standby {
            app: &self.app,
            lane: self.index,
            rx: &mut self.rx,
            rx_open: &mut work.rx_open,
            queue: &mut work.queue,
            limit: self.settings.backlog,
            stats: &self.stats,
            outcomes: &self.outcomes,
        }
        .wait(fut, unusable)
        .await
    }

    /// Drives one connection until it ends; every stream opened on it has
    /// finished by then.
    async fn connection(&mut self, conn: Connection, target: &Target, work: &mut Work) -> End {
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
            if !work.rx_open && work.is_empty() && streams.is_empty() {
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
            self.lane_stats.window.set(streams.len() as i64);
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
                            self.finish(n, bearer.as_ref(), exchange, target, work, &mut outcomes);
                        }
                        next = streams.try_join_next();
                    }
                    if !outcomes.is_empty() {
                        // The receiver only goes away when the daemon is being torn down.
                        let _ = self.outcomes.send(outcomes);
                    }
                }
                _ = &mut keepalive, if usable => {
                    tracing::warn!(app = %self.app, lane = self.index,
                        "APNs stopped answering PINGs: dropping the connection");
                    self.lane_stats.stalls.inc();
                    usable = false;
                    // Ends the connection, so every open stream fails at once.
                    driver.abort();
                }
                ready = std::future::poll_fn(|cx| send.poll_ready(cx)), if room && !work.queue.is_empty() => match ready {
                    Ok(()) => {
                        if let Some(n) = work.queue.pop_front() {
                            if !self.open_stream(&mut send, n, target, work, &mut streams) {
                                usable = false;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(app = %self.app, lane = self.index, error = %e,
                            "connection no longer takes streams");
                        usable = false;
                    }
                },
                _ = sleep_until(due), if due.is_some() => work.release_due(Instant::now()),
                batch = self.rx.recv(), if room && work.rx_open && work.queue.is_empty() => match batch {
                    Some(batch) => work.queue.extend(batch),
                    None => work.rx_open = false,
                },
            }
        };
        keepalive.abort();
        driver.abort();
        if unanswered != (0, 0) {
            tracing::warn!(app = %self.app, lane = self.index, timed_out = unanswered.0,
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
        target: &Target,
        work: &mut Work,
        streams: &mut JoinSet<Finished>,
    ) -> bool {
        let env = &n.envelope;
        if env.session.get() {
            // Its broker session ended: the job is redelivered and sends it then.
            self.stats.dropped_for_redelivery.inc();
            return true;
        }
        if is_expired(&n, unix_now()) {
            let attempts = n.attempts;
            let _ = self.outcomes.send(vec![Outcome {
                notification: n,
                result: Err(Failure {
                    reason: Reason::Expired,
                    attempts,
                }),
            }]);
            return true;
        }
        let bearer = match target.signer.as_deref().map(Signer::bearer).transpose() {
            Ok(b) => b,
            Err(e) => {
                // Signing with a key that loaded cannot fail short of a broken
                // crypto library; retrying could not help.
                tracing::error!(app = %self.app, error = %e, "cannot sign a provider token");
                let _ = self.outcomes.send(vec![fail(
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
            &target.addr,
            &target.topic,
            bearer.as_ref().map(|b| &b.header),
        ) {
            Ok(req) => req,
            Err(e) => {
                // Every part was validated (job decoding, the app's topic and
                // endpoint at start): reaching this is a bug, reported as such.
                tracing::error!(app = %self.app, error = %e, "cannot build the request");
                let _ = self.outcomes.send(vec![fail(
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
                let _ = body.send_data(env.payload.clone(), true);
                self.stats.written.inc();
                let timeout = self.settings.request_timeout;
                streams.spawn(async move {
                    let exchange = exchange(response, timeout).await;
                    (n, bearer, exchange)
                });
                true
            }
            Err(e) => {
                tracing::debug!(app = %self.app, lane = self.index, error = %e, "stream not opened");
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
        target: &Target,
        work: &mut Work,
        outcomes: &mut Vec<Outcome>,
    ) {
        let s = self.settings;
        // Counts the try; `Some` once the tries are used up. A pause is for
        // APNs' own "not now" answers; a lost or stale stream goes again at once.
        let retry = |n: Notification, reason: Reason, work: &mut Work, pause: bool| {
            let mut n = n;
            n.attempts = n.attempts.saturating_add(1);
            if n.attempts >= s.max_attempts {
                return Some(fail(n, reason));
            }
            if pause {
                let delay = retry_delay(s.reconnect_min, s.reconnect_max, n.attempts);
                work.later.push((Instant::now() + delay, n));
            } else {
                work.queue.push_front(n);
            }
            None
        };
        let (outcome, resend_counter) = match exchange {
            Exchange::Answered { status, body } => {
                match request::classify(status, &body, SystemTime::now()) {
                    Answer::Accepted => {
                        let ok = Outcome {
                            notification: n,
                            result: Ok(()),
                        };
                        (Some(ok), None)
                    }
                    Answer::Failed(reason) => {
                        n.attempts = n.attempts.saturating_add(1);
                        (Some(fail(n, reason)), None)
                    }
                    Answer::Retry(reason) => {
                        (retry(n, reason, work, true), Some(&self.stats.retried))
                    }
                    Answer::TokenExpired => {
                        let renewal = match (&target.signer, bearer) {
                            (Some(signer), Some(used)) => signer.expired(used),
                            _ => Renewal::Replaced,
                        };
                        match renewal {
                            Renewal::Retired { minted } => tracing::info!(app = %self.app,
                                tokens_minted = minted,
                                "APNs says the provider token expired: minting a new one"),
                            Renewal::Held { first: true } => tracing::warn!(app = %self.app,
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
                        (retry(n, reason, work, pause), Some(&self.stats.retried))
                    }
                }
            }
            Exchange::Refused => {
                work.queue.push_front(n);
                (None, Some(&self.stats.resent_after_error))
            }
            Exchange::RefusedStream => {
                n.refusals = n.refusals.saturating_add(1);
                let policy = RefusedStreams {
                    min: s.reconnect_min,
                    max: s.reconnect_max,
                };
                match policy.step(n.refusals) {
                    Step::Resend { after } => {
                        work.later.push((Instant::now() + after, n));
                        (None, Some(&self.stats.resent_after_error))
                    }
                    Step::CountTry => (
                        retry(n, Reason::RefusedStream, work, true),
                        Some(&self.stats.retried),
                    ),
                }
            }
            Exchange::Lost => (
                retry(n, Reason::ConnectionLost, work, false),
                Some(&self.stats.resent_after_close),
            ),
            Exchange::TimedOut => (
                retry(n, Reason::Timeout, work, false),
                Some(&self.stats.resent_after_close),
            ),
        };
        if let (None, Some(counter)) = (&outcome, resend_counter) {
            counter.inc();
        }
        outcomes.extend(outcome);
    }
}

/// The final failure of `n`, which has been tried `n.attempts` times.
fn fail(n: Notification, reason: Reason) -> Outcome {
    let attempts = n.attempts.max(1);
    Outcome {
        notification: n,
        result: Err(Failure { reason, attempts }),
    }
}

/// The pause before try `attempts + 1`: doubling from `min`, capped at `max`.
fn retry_delay(min: Duration, max: Duration, attempts: u8) -> Duration {
    let doublings = u32::from(attempts.saturating_sub(1)).min(16);
    min.saturating_mul(1 << doublings).min(max)
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

struct Connection {
    send: SendRequest<Bytes>,
    /// Drives the connection's frames; aborting it ends the connection.
    driver: JoinHandle<Result<(), h2::Error>>,
    ping: Option<PingPong>,
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
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
            ConnectError::Io(e) => classify(e),
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

async fn connect(target: &Target, timeout: Duration) -> Result<Connection, ConnectError> {
    // The driver runs from the h2 handshake on; a connect that fails or times
    // out after it must not leave it holding the socket.
    let mut spawned: Option<AbortHandle> = None;
    let attempt = async {
        let tcp = TcpStream::connect(&target.addr).await?;
        tcp.set_nodelay(true)?;
        let tls = TlsConnector::from(target.tls.clone())
            .connect(target.server_name.clone(), tcp)
            .await?;
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

#[cfg(test)]
mod tests {
    use super::retry_delay;
    use std::time::Duration;

    #[test]
    fn retry_pauses_double_up_to_the_cap() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<_> = (1..=6).map(|a| retry_delay(min, max, a)).collect();
        assert_eq!(d[0], min);
        assert_eq!(d[1], Duration::from_millis(200));
        assert_eq!(d[3], Duration::from_millis(800));
        assert_eq!(d[5], max);
        assert_eq!(retry_delay(min, max, 255), max);
    }
}
