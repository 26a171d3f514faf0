//! The binary interface's transport: one persistent TLS connection to the
//! gateway per lane, and the policy around it: coalesced writes, the settle
//! window, resends ahead of new work, retries of transient statuses.
//!
//! A small reader task waits for the only thing the gateway ever writes (a
//! 6-byte error response) or the close; the lane task writes, keeps the
//! [`Window`] and turns its verdicts into [`Outcome`]s. Connecting,
//! reconnecting and waiting without a connection are the lane's ([`super::lane`]).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::connect::{self, Endpoint, Stream};
use super::frame::{self, ErrorResponse, Status, ERROR_RESPONSE_LEN};
use super::lane::{End, Lane, Policy, Transport, Work};
use super::window::{Kind, Verdict, Window};
use super::{is_expired, Notification, Outcome, Reason, Unusable};
use crate::clock::{sleep_until, unix_now};

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

/// Per-lane tuning, from the app's configuration.
#[derive(Debug, Clone, Copy)]
pub struct BinarySettings {
    pub settle: Duration,
    pub retain: Duration,
    pub window: usize,
    pub max_attempts: u8,
    pub write_timeout: Duration,
    pub policy: Policy,
}

/// A lane's connections to the binary gateway.
pub struct Binary {
    endpoint: Arc<Endpoint>,
    settings: BinarySettings,
    /// The in-flight limit in force, at most `settings.window`. A silent close
    /// halves it to what was unsettled; settling grows it back. A gateway that
    /// keeps closing before anything settles would otherwise get everything
    /// resent forever, and each close could duplicate a whole window.
    cwnd: usize,
}

/// What the gateway said on a connection, as its reader saw it.
enum Reply {
    Error(ErrorResponse),
    Closed,
    Garbage,
    Failed(io::Error),
}

impl Binary {
    pub fn new(endpoint: Arc<Endpoint>, settings: BinarySettings) -> Self {
        Binary {
            endpoint,
            settings,
            cwnd: settings.window,
        }
    }
}

impl Transport for Binary {
    type Connection = Stream;
    type Error = io::Error;
    const PEER: &'static str = "the gateway";

    fn addr(&self) -> &str {
        &self.endpoint.addr
    }

    async fn connect(&self) -> io::Result<Stream> {
        connect::connect(&self.endpoint, self.settings.policy.connect_timeout).await
    }

    fn unusable(error: &io::Error) -> Unusable {
        Unusable::of_io(error)
    }

    async fn drive(&mut self, stream: Stream, lane: &mut Lane, work: &mut Work) -> End {
        Connection { binary: self, lane }.run(stream, work).await
    }

    fn policy(&self) -> Policy {
        self.settings.policy
    }
}

/// One connection being driven: the transport's state and the lane's.
struct Connection<'a> {
    binary: &'a mut Binary,
    lane: &'a mut Lane,
}

impl Connection<'_> {
    /// Drives one connection until it ends; every notification written on it
    /// has a verdict by then.
    async fn run(mut self, stream: Stream, work: &mut Work) -> End {
        let s = self.binary.settings;
        let (rd, mut wr) = tokio::io::split(stream);
        let mut reader = tokio::spawn(read_reply(rd));
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
                work.queue.len() < HOLD_BELOW && self.lane.rx.is_empty() && at > Instant::now()
            });
            if out.is_empty() && hold.is_none() {
                in_batch = self.fill(work, &mut window, &mut next_id, &mut out);
                if !out.is_empty() {
                    write_started = Some(Instant::now());
                }
            }
            if out.is_empty() && work.is_done() && window.is_empty() {
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
            self.lane.lane_stats.window.set(window.len() as i64);
            let can_take = work.open
                && out.is_empty()
                && work.queue.is_empty()
                && window.len() < self.binary.cwnd
                && next_id < u32::MAX - 1024;

            tokio::select! {
                biased;
                answer = &mut reader => {
                    let answer = answer.unwrap_or(Reply::Closed);
                    break self.finish(answer, &mut window, &mut verdicts, work, accepted_any);
                }
                r = write_or_flush(&mut wr, &out[written..]), if written < out.len() || flushing => match r {
                    Ok(n) if n > 0 => {
                        written += n;
                        flushing = written == out.len();
                    }
                    Ok(_) if flushing => {
                        window.flushed(Instant::now());
                        self.lane.stats.written.add(in_batch);
                        out.clear();
                        written = 0;
                        flushing = false;
                        write_started = None;
                        coalesce_until = (in_batch >= COALESCE_FROM).then(|| Instant::now() + COALESCE);
                    }
                    _ => break self.broken_write(reader, &mut window, &mut verdicts, work, accepted_any).await,
                },
                _ = sleep_until(hold), if hold.is_some() && !work.queue.is_empty() => {}
                _ = sleep_until(settle_at), if settle_at.is_some() => {
                    window.tick(Instant::now(), &mut verdicts);
                    accepted_any |= !verdicts.is_empty();
                    self.binary.cwnd = (self.binary.cwnd + verdicts.len()).min(s.window);
                    self.apply(&mut verdicts, work);
                }
                _ = sleep_until(stall_at), if stall_at.is_some() => {
                    tracing::warn!(app = %self.lane.app, lane = self.lane.index, unsettled = window.len(),
                        "gateway stopped reading for {:?}: dropping the connection", s.write_timeout);
                    self.lane.lane_stats.stalls.inc();
                    reader.abort();
                    self.shrink_window(window.len());
                    window.on_close(&mut verdicts);
                    self.apply(&mut verdicts, work);
                    break End::Broken(Unusable::GatewayUnreachable);
                }
                batch = self.lane.rx.recv(), if can_take => work.take(batch),
            }
        };
        end
    }

    /// Encodes queued notifications (resends first, they sit at the front) into
    /// one write, taking more from the channel only when the queue is empty.
    /// Returns how many frames it encoded.
    fn fill(
        &mut self,
        work: &mut Work,
        window: &mut Window<Notification>,
        next_id: &mut u32,
        out: &mut Vec<u8>,
    ) -> u64 {
        let unix_now = unix_now();
        let mut count = 0;
        let mut withdrawn = 0;
        let mut expired = Vec::new();
        while out.len() < BATCH_BYTES
            && window.len() < self.binary.cwnd
            && *next_id < u32::MAX - 1024
        {
            if work.queue.is_empty() && work.open {
                match self.lane.rx.try_recv() {
                    Ok(batch) => work.queue.extend(batch),
                    Err(mpsc::error::TryRecvError::Disconnected) => work.open = false,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
            }
            let Some(n) = work.queue.pop_front() else {
                break;
            };
            let env = &n.envelope;
            if env.withdrawal.is_withdrawn() {
                withdrawn += 1;
                continue;
            }
            if is_expired(&n, unix_now) {
                expired.push(Outcome::failed(n, Reason::Expired));
                continue;
            }
            let id = *next_id;
            *next_id += 1;
            frame::Notification {
                identifier: id,
                token: n.token_bytes(),
                payload: &env.job.payload,
                expiry: env.job.expiry,
                priority: env.job.priority.map(|p| p.code()),
            }
            .encode(out);
            window.push(id, n);
            count += 1;
        }
        self.lane.report(expired);
        self.lane.stats.dropped_for_redelivery.add(withdrawn);
        count
    }

    /// The connection's last word: verdicts for everything in its window.
    fn finish(
        &mut self,
        answer: Reply,
        window: &mut Window<Notification>,
        verdicts: &mut Vec<Verdict<Notification>>,
        work: &mut Work,
        accepted_any: bool,
    ) -> End {
        let end = match answer {
            Reply::Error(resp) => {
                let level_shutdown = resp.status == Status::Shutdown;
                if level_shutdown {
                    tracing::info!(app = %self.lane.app, lane = self.lane.index, last = resp.identifier,
                        "gateway is shutting down the connection");
                } else {
                    tracing::debug!(app = %self.lane.app, lane = self.lane.index, status = resp.status.code(),
                        identifier = resp.identifier, "gateway answered an error");
                }
                window.on_error(resp, verdicts);
                End::Healthy
            }
            silent => {
                let broken = match &silent {
                    Reply::Failed(e) => Unusable::of_io(e),
                    _ => Unusable::GatewayUnreachable,
                };
                if !window.is_empty() {
                    let why = match silent {
                        Reply::Failed(e) => e.to_string(),
                        Reply::Garbage => "bytes that are not an error response".into(),
                        _ => "end of stream".into(),
                    };
                    tracing::warn!(app = %self.lane.app, lane = self.lane.index, unsettled = window.len(), %why,
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
        self.apply(verdicts, work);
        end
    }

    /// A write failed: most likely the gateway answered and closed. Give its
    /// answer a moment to arrive before treating the close as silent.
    async fn broken_write(
        &mut self,
        reader: JoinHandle<Reply>,
        window: &mut Window<Notification>,
        verdicts: &mut Vec<Verdict<Notification>>,
        work: &mut Work,
        accepted_any: bool,
    ) -> End {
        let abort = reader.abort_handle();
        let answer = match tokio::time::timeout(ANSWER_GRACE, reader).await {
            Ok(Ok(answer)) => answer,
            _ => {
                abort.abort();
                Reply::Closed
            }
        };
        self.finish(answer, window, verdicts, work, accepted_any)
    }

    /// After an ambiguous close, the next connection may have at most half of
    /// what was unsettled in flight.
    fn shrink_window(&mut self, unsettled: usize) {
        if unsettled > 0 {
            self.binary.cwnd = (unsettled / 2).clamp(
                MIN_WINDOW.min(self.binary.settings.window),
                self.binary.settings.window,
            );
        }
    }

    /// Turns verdicts into outcomes and resends; resends go to the front of the
    /// queue in their original order, ahead of new work.
    fn apply(&mut self, verdicts: &mut Vec<Verdict<Notification>>, work: &mut Work) {
        if verdicts.is_empty() {
            return;
        }
        let mut outcomes = Vec::new();
        let mut resend = Vec::new();
        for v in verdicts.drain(..) {
            let mut n = v.item;
            n.reported |= v.late;
            match v.kind {
                Kind::Accepted => outcomes.push(Outcome::accepted(n)),
                Kind::Failed(status) => outcomes.push(Outcome::refused(n, Reason::Binary(status))),
                Kind::Retry(status) => {
                    n.attempts = n.attempts.saturating_add(1);
                    if n.attempts >= self.binary.settings.max_attempts {
                        outcomes.push(Outcome::refused(n, Reason::Binary(status)));
                    } else {
                        self.lane.stats.retried.inc();
                        resend.push(n);
                    }
                }
                Kind::Resend => {
                    self.lane.stats.resent_after_error.inc();
                    resend.push(n);
                }
                Kind::Ambiguous => {
                    self.lane.stats.resent_after_close.inc();
                    resend.push(n);
                }
            }
        }
        for n in resend.into_iter().rev() {
            work.queue.push_front(n);
        }
        self.lane.report(outcomes);
    }
}

/// Writes what is left of the batch, or flushes it once all is written
/// (returning 0). Both are cancel-safe, which the lane's `select!` needs.
async fn write_or_flush(wr: &mut WriteHalf<Stream>, rest: &[u8]) -> io::Result<usize> {
    if rest.is_empty() {
        wr.flush().await.map(|()| 0)
    } else {
        wr.write(rest).await
    }
}

/// Waits for the gateway's error response or the end of the stream.
async fn read_reply(mut rd: ReadHalf<Stream>) -> Reply {
    let mut buf = [0u8; ERROR_RESPONSE_LEN];
    let mut filled = 0;
    loop {
        match rd.read(&mut buf[filled..]).await {
            Ok(0) => return Reply::Closed,
            Ok(n) => {
                filled += n;
                if filled == ERROR_RESPONSE_LEN {
                    return ErrorResponse::decode(&buf).map_or(Reply::Garbage, Reply::Error);
                }
            }
            Err(e) => return Reply::Failed(e),
        }
    }
}
