//! One persistent TLS connection to the binary gateway, and the policy around
//! it: coalesced writes, the settle window, resends ahead of new work, retries
//! of transient statuses, reconnects with capped backoff.
//!
//! The lane owns its socket. A small reader task waits for the only thing the
//! gateway ever writes (a 6-byte error response) or the close; the lane task
//! writes, keeps the [`Window`] and turns its verdicts into [`Outcome`]s.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::frame::{self, ErrorResponse, Status, ERROR_RESPONSE_LEN};
use super::standby::{classify, Reconnect, Standby};
use super::window::{Kind, Verdict, Window};
use super::{is_expired, sleep_until, unix_now, Failure, Notification, Outcome, Reason, Unusable};
use crate::metrics::{LaneStats, Stats};

/// Coalesce up to this many bytes of frames into one write.
const BATCH_BYTES: usize = 128 * 1024;
/// After a write of several frames (a busy lane), the next one waits up to
/// this long (plus the timer's millisecond) for more, unless a full batch is
/// already waiting: at high rates that halves the writes and the gateway's
/// reads. A lane writing single frames (a quiet one) never waits.
const COALESCE: Duration = Duration::from_millis(1);
/// Frames in a write that make the next one wait.
const COALESCE_FROM: u64 = 4;
/// Queued notifications that make a write worth making at once.
const HOLD_BELOW: usize = 256;
/// Settle ticks per `settle` period at most: entries settle up to
/// `settle / SETTLE_BATCHES` late, in batches.
const SETTLE_BATCHES: u32 = 16;
/// Settled notifications retained at most, as a share of `window`: a late
/// error naming one older than those resends everything retained (safe, at
/// worst twice), so the cap trades duplicates in a rare case for memory.
const RETAIN_SHARE: usize = 4;
/// The smallest in-flight window a lane shrinks to after silent closes.
const MIN_WINDOW: usize = 8;
/// After a failed write, how long to wait for the error response that probably
/// explains it (the gateway writes it, then closes).
const ANSWER_GRACE: Duration = Duration::from_secs(1);

/// Where and as whom a lane connects. Swapped as a whole on reload: new
/// connections use the new value, the current one keeps its identity.
#[derive(Clone)]
pub struct Target {
    pub addr: String,
    pub server_name: ServerName<'static>,
    pub tls: Arc<rustls::ClientConfig>,
    /// HTTP CONNECT proxy the connection tunnels through.
    pub proxy: Option<Arc<crate::proxy::Proxy>>,
}

/// Per-lane tuning, from the app's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub settle: Duration,
    pub retain: Duration,
    pub window: usize,
    pub max_attempts: u8,
    pub connect_timeout: Duration,
    pub write_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// After this long without a working connection, queued work is handed back.
    pub unusable_after: Duration,
}

pub type Outcomes = mpsc::UnboundedSender<Vec<Outcome>>;

pub struct Lane {
    app: Arc<str>,
    index: usize,
    target: Arc<Target>,
    settings: Settings,
    rx: mpsc::Receiver<Vec<Notification>>,
    outcomes: Outcomes,
    stats: Arc<Stats>,
    lane_stats: LaneStats,
    /// The in-flight limit in force, at most `settings.window`. A silent close
    /// halves it to what was unsettled; settling grows it back. A gateway that
    /// keeps closing before anything settles would otherwise get everything
    /// resent forever, and each close could duplicate a whole window.
    cwnd: usize,
}

/// What the reader saw.
enum Answer {
    Error(ErrorResponse),
    Closed,
    Garbage,
    Failed(io::Error),
}

/// How a connection ended, for the reconnect policy.
enum End {
    /// The sender side closed and everything is final: the lane is done.
    Drained,
    /// The gateway answered or accepted something: it works, reconnect at once.
    Healthy,
    /// Refused, closed, stalled or broken without progress: back off before
    /// reconnecting, and after `unusable_after` of this give the work back.
    Broken(Unusable),
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
            app: app.clone(),
            index,
            target,
            settings,
            rx,
            outcomes,
            lane_stats: stats.lane(&app, index),
            stats,
            cwnd: settings.window,
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
        let mut queue = VecDeque::new();
        let s = self.settings;
        let mut reconnect = Reconnect::new(s.reconnect_min, s.reconnect_max, s.unusable_after);
        let mut rx_open = true;
        let mut first = true;
        loop {
            // Connect eagerly once, then only when there is work: an idle lane
            // holds no socket open against a gateway that closes idle ones.
            if queue.is_empty() && !first {
                match self.rx.recv().await {
                    Some(batch) => queue.extend(batch),
                    None => return,
                }
            }
            first = false;
            let target = self.target.clone();
            let attempt = connect(&target, self.settings.connect_timeout);
            let end = match self.standby(attempt, None, &mut queue, &mut rx_open).await {
                Ok(stream) => {
                    tracing::debug!(app = %self.app, lane = self.index, addr = %target.addr, "connected");
                    self.lane_stats.connections_opened.inc();
                    self.lane_stats.connections_up.add(1);
                    let end = self.connection(stream, &mut queue, &mut rx_open).await;
                    self.lane_stats.connections_up.add(-1);
                    self.lane_stats.window.set(0);
                    end
                }
                Err(e) => {
                    self.lane_stats.connect_failures.inc();
                    tracing::warn!(app = %self.app, lane = self.index, addr = %target.addr,
                        error = %e, "cannot connect to the gateway");
                    End::Broken(classify(&e))
                }
            };
            match end {
                End::Drained => return,
                End::Healthy => reconnect.healthy(&self.stats, &self.app, self.index),
                End::Broken(why) => {
                    let (delay, unusable) =
                        reconnect.broken(why, &self.stats, &self.app, self.index);
                    let pause = tokio::time::sleep(delay);
                    self.standby(pause, unusable, &mut queue, &mut rx_open)
                        .await;
                }
            }
            if !rx_open && queue.is_empty() {
                return;
            }
        }
    }

    /// Waits for `fut` without a connection, taking work meanwhile (see [`Standby`]).
    async fn standby<F: Future>(
        &mut self,
        fut: F,
        unusable: Option<Unusable>,
        queue: &mut VecDeque<Notification>,
        rx_open: &mut bool,
    ) -> F::Output {
        Standby {
            app: &self.app,
            lane: self.index,
            rx: &mut self.rx,
            rx_open,
            queue,
            limit: self.settings.window,
            stats: &self.stats,
            outcomes: &self.outcomes,
        }
        .wait(fut, unusable)
        .await
    }

    /// Drives one connection until it ends; every notification written on it
    /// has a verdict by then.
    async fn connection(
        &mut self,
        stream: TlsStream<TcpStream>,
        queue: &mut VecDeque<Notification>,
        rx_open: &mut bool,
    ) -> End {
        let s = self.settings;
        let (rd, mut wr) = tokio::io::split(stream);
        let mut reader = tokio::spawn(read_answer(rd));
        let mut window = Window::new(s.settle, s.retain, s.window / RETAIN_SHARE);
        let mut verdicts = Vec::new();
        let mut out: Vec<u8> = Vec::with_capacity(BATCH_BYTES + frame::MAX_FRAME_BODY + 5);
        let mut written = 0usize;
        let mut flushing = false;
        let mut in_batch = 0u64;
        let mut write_started: Option<Instant> = None;
        let mut next_id: u32 = 1;
        let mut accepted_any = false;
        let mut coalesce_until: Option<Instant> = None;

        let end = loop {
            let hold = coalesce_until.filter(|&at| {
                queue.len() < HOLD_BELOW && self.rx.is_empty() && at > Instant::now()
            });
            if out.is_empty() && hold.is_none() {
                in_batch = self.fill(queue, &mut window, &mut next_id, &mut out, rx_open);
                if !out.is_empty() {
                    write_started = Some(Instant::now());
                }
            }
            if out.is_empty() && !*rx_open && queue.is_empty() && window.is_empty() {
                let _ = wr.shutdown().await;
                break End::Drained;
            }
            if next_id > u32::MAX - 1024 && out.is_empty() && window.is_empty() {
                // Identifiers are about to wrap: start a fresh connection cleanly.
                break End::Healthy;
            }
            // A write that cannot make progress means what was written before it
            // may still sit in buffers, unread: do not let it settle meanwhile.
            let stalled = write_started.is_some_and(|t| t.elapsed() > s.settle / 2);
            // Ticking a little late settles many flushes at once: one outcome
            // batch, one multiple-ack, instead of one per write.
            let settle_at = window
                .next_deadline()
                .filter(|_| !stalled)
                .map(|at| at + s.settle / SETTLE_BATCHES);
            let stall_at = write_started.map(|t| t + s.write_timeout);
            self.lane_stats.window.set(window.len() as i64);
            let can_take = *rx_open
                && out.is_empty()
                && queue.is_empty()
                && window.len() < self.cwnd
                && next_id < u32::MAX - 1024;

            tokio::select! {
                biased;
                answer = &mut reader => {
                    let answer = answer.unwrap_or(Answer::Closed);
                    break self.finish(answer, &mut window, &mut verdicts, queue, accepted_any);
                }
                r = write_or_flush(&mut wr, &out[written..]), if written < out.len() || flushing => match r {
                    Ok(n) if n > 0 => {
                        written += n;
                        flushing = written == out.len();
                    }
                    Ok(_) if flushing => {
                        window.flushed(Instant::now());
                        self.stats.written.add(in_batch);
                        out.clear();
                        written = 0;
                        flushing = false;
                        write_started = None;
                        coalesce_until = (in_batch >= COALESCE_FROM).then(|| Instant::now() + COALESCE);
                    }
                    _ => break self.broken_write(reader, &mut window, &mut verdicts, queue, accepted_any).await,
                },
                _ = sleep_until(hold), if hold.is_some() && !queue.is_empty() => {}
                _ = sleep_until(settle_at), if settle_at.is_some() => {
                    window.tick(Instant::now(), &mut verdicts);
                    accepted_any |= !verdicts.is_empty();
                    self.cwnd = (self.cwnd + verdicts.len()).min(s.window);
                    self.apply(&mut verdicts, queue);
                }
                _ = sleep_until(stall_at), if stall_at.is_some() => {
                    tracing::warn!(app = %self.app, lane = self.index,
                        "gateway stopped reading for {:?}: dropping the connection", s.write_timeout);
                    self.lane_stats.stalls.inc();
                    reader.abort();
                    self.shrink_window(window.len());
                    window.on_close(&mut verdicts);
                    self.apply(&mut verdicts, queue);
                    break End::Broken(Unusable::GatewayUnreachable);
                }
                batch = self.rx.recv(), if can_take => match batch {
                    Some(batch) => queue.extend(batch),
                    None => *rx_open = false,
                },
            }
        };
        end
    }

    /// Encodes queued notifications (resends first, they sit at the front) into
    /// one write, taking more from the channel only when the queue is empty.
    /// Returns how many frames it encoded.
    fn fill(
        &mut self,
        queue: &mut VecDeque<Notification>,
        window: &mut Window<Notification>,
        next_id: &mut u32,
        out: &mut Vec<u8>,
        rx_open: &mut bool,
    ) -> u64 {
        let unix_now = unix_now();
        let mut count = 0;
        let mut stale = 0;
        let mut expired = Vec::new();
        while out.len() < BATCH_BYTES && window.len() < self.cwnd && *next_id < u32::MAX - 1024 {
            if queue.is_empty() && *rx_open {
                match self.rx.try_recv() {
                    Ok(batch) => queue.extend(batch),
                    Err(mpsc::error::TryRecvError::Disconnected) => *rx_open = false,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
            }
            let Some(n) = queue.pop_front() else { break };
            let env = &n.envelope;
            if env.session.get() {
                stale += 1;
                continue;
            }
            if is_expired(&n, unix_now) {
                let attempts = n.attempts;
                expired.push(Outcome {
                    notification: n,
                    result: Err(Failure {
                        reason: Reason::Expired,
                        attempts,
                    }),
                });
                continue;
            }
            let id = *next_id;
            *next_id += 1;
            frame::Notification {
                identifier: id,
                token: n.token_bytes(),
                payload: &env.payload,
                expiry: env.expiry,
                priority: env.priority.map(|p| p.code()),
            }
            .encode(out);
            window.push(id, n);
            count += 1;
        }
        if !expired.is_empty() {
            let _ = self.outcomes.send(expired);
        }
        self.stats.dropped_for_redelivery.add(stale);
        count
    }

    /// The connection's last word: verdicts for everything in its window.
    fn finish(
        &mut self,
        answer: Answer,
        window: &mut Window<Notification>,
        verdicts: &mut Vec<Verdict<Notification>>,
        queue: &mut VecDeque<Notification>,
        accepted_any: bool,
    ) -> End {
        let end = match answer {
            Answer::Error(resp) => {
                let level_shutdown = resp.status == Status::Shutdown;
                if level_shutdown {
                    tracing::info!(app = %self.app, lane = self.index, last = resp.identifier,
                        "gateway is shutting down the connection");
                } else {
                    tracing::debug!(app = %self.app, lane = self.index, status = resp.status.code(),
                        identifier = resp.identifier, "gateway answered an error");
                }
                window.on_error(resp, verdicts);
                End::Healthy
            }
            silent => {
                let broken = match &silent {
                    Answer::Failed(e) => classify(e),
                    _ => Unusable::GatewayUnreachable,
                };
                if !window.is_empty() {
                    let why = match silent {
                        Answer::Failed(e) => e.to_string(),
                        Answer::Garbage => "bytes that are not an error response".into(),
                        _ => "end of stream".into(),
                    };
                    tracing::warn!(app = %self.app, lane = self.index, unsettled = window.len(), %why,
                        "gateway closed without an answer: resending what it may not have processed");
                    self.shrink_window(window.len());
                }
                window.on_close(verdicts);
                if accepted_any {
                    End::Healthy
                } else {
                    End::Broken(broken)
                }
            }
        };
        self.apply(verdicts, queue);
        end
    }

    /// A write failed: most likely the gateway answered and closed. Give its
    /// answer a moment to arrive before treating the close as silent.
    async fn broken_write(
        &mut self,
        reader: JoinHandle<Answer>,
        window: &mut Window<Notification>,
        verdicts: &mut Vec<Verdict<Notification>>,
        queue: &mut VecDeque<Notification>,
        accepted_any: bool,
    ) -> End {
        let abort = reader.abort_handle();
        let answer = match tokio::time::timeout(ANSWER_GRACE, reader).await {
            Ok(Ok(answer)) => answer,
            _ => {
                abort.abort();
                Answer::Closed
            }
        };
        self.finish(answer, window, verdicts, queue, accepted_any)
    }

    /// After an ambiguous close, the next connection may have at most half of
    /// what was unsettled in flight.
    fn shrink_window(&mut self, unsettled: usize) {
        if unsettled > 0 {
            self.cwnd =
                (unsettled / 2).clamp(MIN_WINDOW.min(self.settings.window), self.settings.window);
        }
    }

    /// Turns verdicts into outcomes and resends; resends go to the front of the
    /// queue in their original order, ahead of new work.
    fn apply(
        &mut self,
        verdicts: &mut Vec<Verdict<Notification>>,
        queue: &mut VecDeque<Notification>,
    ) {
        if verdicts.is_empty() {
            return;
        }
        let mut outcomes = Vec::new();
        let mut resend = Vec::new();
        for v in verdicts.drain(..) {
            let mut n = v.item;
            n.reported |= v.late;
            match v.kind {
                Kind::Accepted => {
                    outcomes.push(Outcome {
                        notification: n,
                        result: Ok(()),
                    });
                }
                Kind::Failed(status) => outcomes.push(fail(n, status)),
                Kind::Retry(status) => {
                    n.attempts = n.attempts.saturating_add(1);
                    if n.attempts >= self.settings.max_attempts {
                        outcomes.push(fail(n, status));
                    } else {
                        self.stats.retried.inc();
                        resend.push(n);
                    }
                }
                Kind::Resend => {
                    self.stats.resent_after_error.inc();
                    resend.push(n);
                }
                Kind::Ambiguous => {
                    self.stats.resent_after_close.inc();
                    resend.push(n);
                }
            }
        }
        for n in resend.into_iter().rev() {
            queue.push_front(n);
        }
        if !outcomes.is_empty() {
            // The receiver only goes away when the daemon is being torn down.
            let _ = self.outcomes.send(outcomes);
        }
    }
}

fn fail(n: Notification, status: Status) -> Outcome {
    let attempts = n.attempts.max(1);
    Outcome {
        notification: n,
        result: Err(Failure {
            reason: Reason::Apns(status),
            attempts,
        }),
    }
}

/// Writes what is left of the batch, or flushes it once all is written
/// (returning 0). Both are cancel-safe, which the lane's `select!` needs.
async fn write_or_flush(
    wr: &mut WriteHalf<TlsStream<TcpStream>>,
    rest: &[u8],
) -> io::Result<usize> {
    if rest.is_empty() {
        wr.flush().await.map(|()| 0)
    } else {
        wr.write(rest).await
    }
}

/// TCP connect (through the proxy, if any) and TLS handshake, bounded by `timeout`.
pub async fn connect(target: &Target, timeout: Duration) -> io::Result<TlsStream<TcpStream>> {
    let attempt = async {
        let tcp = crate::proxy::tcp(target.proxy.as_deref(), &target.addr, timeout).await?;
        tcp.set_nodelay(true)?;
        TlsConnector::from(target.tls.clone())
            .connect(target.server_name.clone(), tcp)
            .await
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")))
}

/// Waits for the gateway's error response or the end of the stream.
async fn read_answer(mut rd: ReadHalf<TlsStream<TcpStream>>) -> Answer {
    let mut buf = [0u8; ERROR_RESPONSE_LEN];
    let mut filled = 0;
    loop {
        match rd.read(&mut buf[filled..]).await {
            Ok(0) => return Answer::Closed,
            Ok(n) => {
                filled += n;
                if filled == ERROR_RESPONSE_LEN {
                    return ErrorResponse::decode(&buf).map_or(Answer::Garbage, Answer::Error);
                }
            }
            Err(e) => return Answer::Failed(e),
        }
    }
}
