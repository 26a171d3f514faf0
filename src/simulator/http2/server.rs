//! One connection's HTTP/2 state and the socket it drives: reads, writes
//! and the response delay's timer, polled from the connection's one task.
//! What each frame does to the state is [`frames`].

mod frames;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;

use super::{
    Echo, End, Judge, Reply, Stream, CLOSE_GRACE, CONNECTION_WINDOW, MAX_FRAME, MAX_STREAMS,
    WRITE_HIGH_WATER,
};
use crate::apns::http2::frame::{self, code, setting, FrameError, PeerLimits};
use crate::apns::http2::hpack;
use crate::apns::http2::wire::Wire;

/// One connection's HTTP/2 state, driven by its task.
pub(super) struct Server {
    wire: Wire<TlsStream<TcpStream>>,
    judge: Judge,
    decoder: hpack::Decoder,
    preface_read: bool,
    /// The client's first SETTINGS arrived (it must come first).
    settings_seen: bool,
    /// The client acknowledged this end's SETTINGS: the stream limit holds.
    settings_acked: bool,
    max_streams: usize,
    /// The stream receive window announced.
    stream_window: u32,

    peer: PeerLimits,
    send_window: i64,
    recv_window: i64,
    /// Connection flow-control bytes taken since the last WINDOW_UPDATE.
    unacked: u32,

    /// The highest stream id the client opened.
    last_id: u32,
    /// Streams by id. A map by hash: with a response delay a thousand wait
    /// per connection, and an ordered map allocated, split and merged its
    /// nodes as ids rose (a tenth of the simulator's CPU at 50 ms); ids may
    /// skip, so apnsd's ring by id does not fit. Boxed (and recycled), so
    /// the table moves pointers, not whole streams.
    streams: HashMap<u32, Box<Stream>, BuildHasherDefault<IdHasher>>,
    /// Boxes kept for the next streams, so boxing costs no allocation.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<Stream>>,
    /// Streams whose answer body waits for window, in order.
    blocked: VecDeque<u32>,
    /// A header block arriving in CONTINUATION frames: its stream, END_STREAM.
    continuing: Option<(u32, bool)>,
    continuation: Vec<u8>,
    /// Answers waiting out the response delay, in arrival (and so deadline)
    /// order. Their streams left `streams` when judged.
    delayed: VecDeque<(Instant, Waiting)>,
    delay_timer: Pin<Box<Sleep>>,
    /// The last stream id of the GOAWAY sent.
    going_away: Option<u32>,
    /// A protocol error: the GOAWAY is queued and nothing more is read.
    failing: bool,
    body: Vec<u8>,
}

/// A judged request's answer, with all it needs of its stream, while it
/// waits out the response delay. The stream's box goes back to the spares at
/// judgement, still in the cache, for the next request to reuse. Held for
/// the delay, 64 connections' thousand streams each were cold when answered
/// and probed for by id: reading this queue in order instead saves about a
/// tenth of the simulator's CPU at a 50 ms delay.
pub(super) struct Waiting {
    pub(super) id: u32,
    pub(super) reply: Reply,
    pub(super) echo: Option<Echo>,
    pub(super) send_window: i64,
}

/// Hashes a stream id with one multiply: ids are small and rising, and the
/// multiply spreads them over the table's bits. SipHash's defence against
/// chosen keys buys nothing in a test server.
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u32(u32::from(b));
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = (self.0 ^ u64::from(id)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

fn protocol(what: &'static str) -> FrameError {
    FrameError {
        code: code::PROTOCOL_ERROR,
        what,
    }
}

fn flow_control(what: &'static str) -> FrameError {
    FrameError {
        code: code::FLOW_CONTROL_ERROR,
        what,
    }
}

fn compression(_: hpack::DecodeError) -> FrameError {
    FrameError {
        code: code::COMPRESSION_ERROR,
        what: "a header block that does not decode",
    }
}

/// How much of `len` a window lets through.
fn sendable(window: i64, len: usize) -> usize {
    len.min(usize::try_from(window.max(0)).unwrap_or(usize::MAX))
}

impl Server {
    /// Queues this end's SETTINGS and connection window; the client's
    /// preface is read as the first bytes arrive.
    pub(super) fn new(io: TlsStream<TcpStream>, judge: Judge) -> Server {
        let max_streams = judge.faults.max_streams.unwrap_or(MAX_STREAMS);
        let stream_window = judge
            .faults
            .stream_window
            .map_or(frame::DEFAULT_WINDOW, |w| w.min(frame::MAX_WINDOW));
        let mut wire = Wire::new(io);
        let write = &mut wire.write;
        let mut params = vec![(setting::MAX_CONCURRENT_STREAMS, max_streams)];
        if judge.faults.stream_window.is_some() {
            params.push((setting::INITIAL_WINDOW_SIZE, stream_window));
        }
        frame::settings(write, &params);
        frame::window_update(write, 0, CONNECTION_WINDOW - frame::DEFAULT_WINDOW);
        Server {
            wire,
            judge,
            decoder: hpack::Decoder::default(),
            preface_read: false,
            settings_seen: false,
            settings_acked: false,
            max_streams: usize::try_from(max_streams).unwrap_or(usize::MAX),
            stream_window,
            peer: PeerLimits::default(),
            send_window: i64::from(frame::DEFAULT_WINDOW),
            recv_window: i64::from(CONNECTION_WINDOW),
            unacked: 0,
            last_id: 0,
            streams: HashMap::default(),
            spare: Vec::new(),
            blocked: VecDeque::new(),
            continuing: None,
            continuation: Vec::new(),
            delayed: VecDeque::new(),
            delay_timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            going_away: None,
            failing: false,
            body: Vec::new(),
        }
    }

    /// Drives the connection as far as it goes without waiting; ready when
    /// it is over.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        if !self.judge.stalled {
            self.judge.faults = self.judge.shared.faults();
            self.judge.stalled = self.judge.stall_reached();
        }
        for _ in 0..16 {
            if self.judge.stalled {
                // Stop driving the connection: no answers, no PING replies.
                // What was queued before the stall still leaves.
                return match self.poll_write(cx) {
                    Ok(_) => Poll::Pending,
                    Err(()) => Poll::Ready(End::Drop),
                };
            }
            self.poll_delayed(cx);
            let Ok(wrote) = self.poll_write(cx) else {
                return Poll::Ready(End::Drop);
            };
            if self.finished() {
                return Poll::Ready(End::Close);
            }
            let backlog = self.wire.unwritten();
            let read = if self.failing || backlog >= WRITE_HIGH_WATER {
                false
            } else {
                match self.poll_read(cx) {
                    Ok(read) => read,
                    Err(end) => return Poll::Ready(end),
                }
            };
            if !wrote && !read {
                return Poll::Pending;
            }
        }
        // Plenty done this turn: let the runtime's other tasks run.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Whether everything owed was written: after a protocol error, or after
    /// a GOAWAY once the streams it covers are answered.
    fn finished(&self) -> bool {
        let owed = if self.failing {
            false
        } else {
            self.going_away.is_none() || !self.streams.is_empty() || !self.delayed.is_empty()
        };
        !owed && self.wire.is_flushed()
    }

    /// Writes the answers whose delay is over.
    fn poll_delayed(&mut self, cx: &mut Context<'_>) {
        let mut now = Instant::now();
        while let Some(&(due, _)) = self.delayed.front() {
            if due > now {
                now = Instant::now();
            }
            if due > now {
                if self.delay_timer.deadline() != due {
                    self.delay_timer.as_mut().reset(due);
                }
                if self.delay_timer.as_mut().poll(cx).is_pending() {
                    return;
                }
            }
            if let Some((_, waiting)) = self.delayed.pop_front() {
                self.answer(waiting);
            }
        }
    }

    /// Writes what is queued; true if anything was written.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<bool, ()> {
        self.wire.poll_write(cx).map_err(|_| ())
    }

    /// Reads and handles what arrived; true if anything was read.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
        match self.wire.poll_read(cx) {
            Poll::Ready(Ok(0)) => Err(End::Close),
            Poll::Ready(Ok(_)) => {
                self.judge.begin();
                self.handle_frames();
                self.judge.end();
                Ok(true)
            }
            Poll::Ready(Err(_)) => Err(End::Drop),
            Poll::Pending => Ok(false),
        }
    }

    fn handle_frames(&mut self) {
        // Frames borrow the read buffer while their handlers change the rest.
        let read = std::mem::take(&mut self.wire.read);
        let mut at = 0;
        if !self.preface_read {
            let n = read.len().min(frame::PREFACE.len());
            if read[..n] != frame::PREFACE[..n] {
                self.fail(protocol("no HTTP/2 client preface"));
            } else if n == frame::PREFACE.len() {
                self.preface_read = true;
                at = n;
            }
        }
        while self.preface_read && !self.failing && !self.judge.stalled {
            match frame::decode(&read[at..], MAX_FRAME) {
                Ok(Some((frame, used))) => {
                    at += used;
                    if let Err(e) = self.handle(frame) {
                        self.fail(e);
                    }
                }
                Ok(None) => break,
                Err(e) => self.fail(e),
            }
        }
        self.wire.read = read;
        self.wire.read.advance(at);
    }

    /// A connection error: GOAWAY with its code, then the connection ends.
    fn fail(&mut self, e: FrameError) {
        tracing::debug!(error = %e, "simulator: HTTP/2 client broke the protocol");
        frame::goaway(&mut self.wire.write, self.last_id, e.code);
        self.failing = true;
    }

    /// Writes out what is queued (answers, a GOAWAY) and closes the TLS
    /// session, then waits for the client to close its side, each within
    /// [`CLOSE_GRACE`]: requests that crossed the GOAWAY may still arrive,
    /// and closing on them unread would reset the connection and lose the
    /// answers the client has yet to read.
    pub(super) async fn close(mut self) {
        self.wire.close(CLOSE_GRACE).await;
        self.wire.linger(CLOSE_GRACE).await;
    }
}
