//! The simulated HTTP/2 provider API: TLS with ALPN `h2`, a client
//! certificate or a provider token (ES256, checked against the simulator's
//! key), Apple's request rules ([`rules`]), an answer per stream, and the
//! faults of [`Faults`]: answers by token rule, GOAWAY after N, a low stream
//! limit, stalls (reads or flow control), expired tokens, refused streams;
//! and Apple's round trip
//! ([`SimulatorOptions::delay`](super::SimulatorOptions::delay)).
//!
//! Why its own server: the benchmark runs the simulator on the cores apnsd is
//! measured on, and a general server (a task, a `HeaderMap` and a request
//! object per stream) cost more per request than apnsd does. Here, as in
//! apnsd's client ([`crate::apns::http2::connection`]), one task per
//! connection owns the TLS socket and drives reads, writes and timers from
//! one poll function; frames are decoded in place ([`frame`], [`hpack`]), a
//! request's fields land in a reused [`Head`], and answers are appended to
//! one buffer, many to a TLS write. Answers held for the response delay wait
//! in a queue in arrival order, which is deadline order as the delay is the
//! same for every stream, while the connection takes more streams.

mod head;
mod reply;
mod rules;

use std::collections::{BTreeMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use http::Method;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::{channels, Accepted, Faults, Shared};
use crate::apns::http2::frame::{self, code, setting, Frame, FrameError};
use crate::apns::http2::hpack;
use crate::job::DeviceToken;
use head::{Field, Head};
use reply::Reply;
use rules::{Credential, DEVICE_PATH};

/// Bodies beyond this are not kept further (the limit check has its answer).
const MAX_READ: usize = 64 * 1024;
/// `SETTINGS_MAX_CONCURRENT_STREAMS` when the faults set none, as Apple's.
const MAX_STREAMS: u32 = 1000;
/// The connection's receive window: request bodies are small, so it is
/// given back in large steps, a WINDOW_UPDATE per thousands of requests.
const CONNECTION_WINDOW: u32 = 16 << 20;
/// The largest header block taken (HEADERS and its CONTINUATIONs).
const MAX_HEADER_BLOCK: usize = 64 << 10;
/// The largest frame taken (this end announces no other).
const MAX_FRAME: u32 = frame::DEFAULT_MAX_FRAME;
/// Answers queued beyond this stop the reading of requests until the
/// client takes them, so a client that does not read holds no more.
const WRITE_HIGH_WATER: usize = 256 << 10;
/// Ended streams kept to reuse their buffers.
const SPARE_STREAMS: usize = 256;
/// A payload buffer larger than this is not kept for the next stream.
const KEEP_CAPACITY: usize = 8 << 10;
/// How long a closing connection may take to write its last frames.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

pub(super) async fn connection(tcp: TcpStream, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            tracing::debug!(error = %e, "simulator: TLS handshake refused (HTTP/2)");
            shared.handshake_failures.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let client_topic = super::client_topic(tls.get_ref().1);
    let certified = tls
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|c| !c.is_empty());
    let number = shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
    let judge = Judge {
        faults: shared.faults(),
        shared,
        certified,
        client_topic,
        number,
        credential: None,
        now: None,
        instant: None,
        arrived: None,
        accepted: Vec::new(),
        goaway_due: false,
        stalled: false,
    };
    let mut server = Server::new(tls, judge);
    if poll_fn(|cx| server.poll(cx)).await == End::Close {
        server.close().await;
    }
}

/// How a connection's driving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Write what is queued and close the TLS session.
    Close,
    /// The socket failed: nothing more can be written.
    Drop,
}

/// One request stream.
#[derive(Debug, Default)]
struct Stream {
    head: Head,
    /// The body as far as [`MAX_READ`], when something needs its bytes
    /// (a record, a channel request); only counted otherwise.
    payload: Vec<u8>,
    keep: bool,
    received: u64,
    /// Flow-control bytes taken since the stream's last WINDOW_UPDATE.
    unacked: u32,
    /// The client ended its side (END_STREAM).
    ended: bool,
    /// The answer, while it waits out the response delay.
    reply: Option<Reply>,
    send_window: i64,
    /// Answer body not yet sent for want of window, from `unsent_at`.
    unsent: Vec<u8>,
    unsent_at: usize,
}

impl Stream {
    fn reset(&mut self) {
        self.head.clear();
        if self.payload.capacity() > KEEP_CAPACITY {
            self.payload = Vec::new();
        }
        self.payload.clear();
        self.unsent.clear();
        self.keep = false;
        self.received = 0;
        self.unacked = 0;
        self.ended = false;
        self.reply = None;
        self.unsent_at = 0;
    }
}

/// What judging a request needs, and what it leaves for the connection to do.
struct Judge {
    shared: Arc<Shared>,
    /// The faults as of this turn of the connection (they change while it runs).
    faults: Faults,
    certified: bool,
    client_topic: Option<Arc<str>>,
    number: u64,
    /// The provider token last presented here, and what it checked out as.
    credential: Option<(String, Credential)>,
    /// The clocks and the meter, read once per read of the socket.
    now: Option<SystemTime>,
    instant: Option<Instant>,
    arrived: Option<u64>,
    /// Accepted during this read, recorded together (never in sink mode).
    accepted: Vec<Accepted>,
    /// An acceptance made it time for a GOAWAY.
    goaway_due: bool,
    /// An acceptance (or another connection's) reached `stall_after`.
    stalled: bool,
}

impl Judge {
    fn stall_reached(&self) -> bool {
        self.faults
            .stall_after
            .is_some_and(|n| self.shared.accepted_count.load(Ordering::Relaxed) >= n)
    }

    /// A read's frames are about to be handled.
    fn begin(&mut self) {
        self.now = None;
        self.instant = None;
        self.arrived = None;
    }

    /// A read's frames were handled: what they brought is recorded.
    fn end(&mut self) {
        if !self.accepted.is_empty() {
            self.shared
                .record_accepted(std::mem::take(&mut self.accepted));
        }
    }

    fn now(&mut self) -> SystemTime {
        *self.now.get_or_insert_with(SystemTime::now)
    }

    fn instant(&mut self) -> Instant {
        *self.instant.get_or_insert_with(Instant::now)
    }

    /// What the request's `authorization` checked out as, under token auth.
    fn credential(&mut self, head: &Head) -> Option<Credential> {
        if self.certified {
            return None;
        }
        let value = head.get(Field::Authorization)?;
        match &self.credential {
            Some((seen, credential)) if seen == value => Some(*credential),
            _ => {
                let rank = self.shared.provider_token_rank(value);
                let credential = Credential::check(value, rank, &self.shared.token_public_key);
                self.credential = Some((value.to_owned(), credential));
                Some(credential)
            }
        }
    }

    /// Judges a whole request (stream `id`): counts, records and meters an
    /// accepted one, records a refused one.
    fn reply(&mut self, id: u32, stream: &mut Stream) -> Reply {
        let now = self.now();
        let credential = self.credential(&stream.head);
        let path = stream.head.path().unwrap_or_default();
        if path.starts_with(channels::PATH) || path.starts_with(channels::BROADCAST_PATH) {
            let answer =
                match rules::authorize(&stream.head, self.certified, &self.faults, credential, now)
                {
                    Err((status, reason)) => channels::Answer::refused(status, reason),
                    Ok(()) => {
                        let method = stream
                            .head
                            .get(Field::Method)
                            .and_then(|m| Method::from_bytes(m.as_bytes()).ok());
                        let headers = stream.head.header_map();
                        let store = &self.shared.channels;
                        match method {
                            None => channels::Answer::refused(
                                405,
                                crate::apns::http2::ApnsReason::MethodNotAllowed,
                            ),
                            Some(m) if path.starts_with(channels::BROADCAST_PATH) => {
                                store.broadcast(&m, path, &headers, &stream.payload)
                            }
                            Some(m) => store.handle(&m, path, &headers, &stream.payload),
                        }
                    }
                };
            let (status, channel_id, body) = answer.into_parts();
            return Reply::Channel {
                status,
                channel_id,
                body,
            };
        }
        let payload_len = usize::try_from(stream.received).unwrap_or(usize::MAX);
        let verdict = rules::judge(
            &stream.head,
            payload_len,
            self.certified,
            &self.faults,
            credential,
            now,
        );
        match verdict {
            Ok(valid) => {
                let arrived = *self
                    .arrived
                    .get_or_insert_with(|| self.shared.meter.arrived());
                if self.shared.stamps {
                    self.shared.meter.time(&valid.token, arrived);
                }
                let count = self.shared.accepted_count.fetch_add(1, Ordering::Relaxed) + 1;
                if !self.shared.sink {
                    self.accepted.push(Accepted {
                        token: valid.token,
                        payload: std::mem::take(&mut stream.payload),
                        identifier: id,
                        expiry: valid.expiry,
                        priority: valid.priority,
                        connection: self.number,
                        client_topic: self.client_topic.clone(),
                        http2: Some(valid.meta()),
                    });
                }
                let faults = &self.faults;
                if faults
                    .goaway_every
                    .is_some_and(|n| n > 0 && count.is_multiple_of(n))
                {
                    self.goaway_due = true;
                }
                if faults.stall_after.is_some_and(|n| count >= n) {
                    self.stalled = true;
                }
                Reply::Accepted
            }
            Err(refusal) => {
                if let Some(token) = refusal.token {
                    self.shared
                        .record_http2_refusal(token, refusal.status, refusal.reason);
                }
                let timestamp = (refusal.status == 410).then(|| {
                    now.duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64)
                });
                Reply::Refused {
                    status: refusal.status,
                    reason: refusal.reason,
                    timestamp,
                }
            }
        }
    }
}

/// One connection's HTTP/2 state, driven by its task.
struct Server {
    io: TlsStream<TcpStream>,
    judge: Judge,
    read: BytesMut,
    write: Vec<u8>,
    written: usize,
    needs_flush: bool,
    decoder: hpack::Decoder,
    preface_read: bool,
    /// The client's first SETTINGS arrived (it must come first).
    settings_seen: bool,
    /// The client acknowledged this end's SETTINGS: the stream limit holds.
    settings_acked: bool,
    max_streams: usize,
    /// The stream receive window announced.
    stream_window: u32,

    peer_initial_window: i64,
    peer_max_frame: u32,
    send_window: i64,
    recv_window: i64,
    /// Connection flow-control bytes taken since the last WINDOW_UPDATE.
    unacked: u32,

    /// The highest stream id the client opened.
    last_id: u32,
    /// Streams by id: ids rise, so inserts land at the end.
    streams: BTreeMap<u32, Stream>,
    spare: Vec<Stream>,
    /// Streams whose answer body waits for window, in order.
    blocked: VecDeque<u32>,
    /// A header block arriving in CONTINUATION frames: its stream, END_STREAM.
    continuing: Option<(u32, bool)>,
    continuation: Vec<u8>,
    /// Answers waiting out the response delay: when, and which stream.
    delayed: VecDeque<(Instant, u32)>,
    delay_timer: Pin<Box<Sleep>>,
    /// The last stream id of the GOAWAY sent.
    going_away: Option<u32>,
    /// A protocol error: the GOAWAY is queued and nothing more is read.
    failing: bool,
    body: Vec<u8>,
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
    fn new(io: TlsStream<TcpStream>, judge: Judge) -> Server {
        let max_streams = judge.faults.max_streams.unwrap_or(MAX_STREAMS);
        let stream_window = judge
            .faults
            .stream_window
            .map_or(frame::DEFAULT_WINDOW, |w| w.min(frame::MAX_WINDOW));
        let mut write = Vec::with_capacity(64 << 10);
        let mut params = vec![(setting::MAX_CONCURRENT_STREAMS, max_streams)];
        if judge.faults.stream_window.is_some() {
            params.push((setting::INITIAL_WINDOW_SIZE, stream_window));
        }
        frame::settings(&mut write, &params);
        frame::window_update(&mut write, 0, CONNECTION_WINDOW - frame::DEFAULT_WINDOW);
        Server {
            io,
            judge,
            read: BytesMut::with_capacity(64 << 10),
            write,
            written: 0,
            needs_flush: false,
            decoder: hpack::Decoder::default(),
            preface_read: false,
            settings_seen: false,
            settings_acked: false,
            max_streams: usize::try_from(max_streams).unwrap_or(usize::MAX),
            stream_window,
            peer_initial_window: i64::from(frame::DEFAULT_WINDOW),
            peer_max_frame: frame::DEFAULT_MAX_FRAME,
            send_window: i64::from(frame::DEFAULT_WINDOW),
            recv_window: i64::from(CONNECTION_WINDOW),
            unacked: 0,
            last_id: 0,
            streams: BTreeMap::new(),
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
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
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
            let backlog = self.write.len() - self.written;
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
            self.going_away.is_none() || !self.streams.is_empty()
        };
        !owed && self.write.is_empty() && !self.needs_flush
    }

    /// Writes the answers whose delay is over.
    fn poll_delayed(&mut self, cx: &mut Context<'_>) {
        let mut now = Instant::now();
        while let Some(&(due, id)) = self.delayed.front() {
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
            self.delayed.pop_front();
            self.answer(id);
        }
    }

    /// Writes what is queued; true if anything was written.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<bool, ()> {
        let mut progress = false;
        while self.written < self.write.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.write[self.written..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Err(()),
                Poll::Ready(Ok(n)) => {
                    self.written += n;
                    self.needs_flush = true;
                    progress = true;
                }
                Poll::Pending => return Ok(progress),
            }
        }
        self.write.clear();
        self.written = 0;
        if self.needs_flush {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.needs_flush = false,
                Poll::Ready(Err(_)) => return Err(()),
                Poll::Pending => {}
            }
        }
        Ok(progress)
    }

    /// Reads and handles what arrived; true if anything was read.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
        if self.read.capacity() - self.read.len() < 16 << 10 {
            self.read.reserve(64 << 10);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read) {
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
        let read = std::mem::take(&mut self.read);
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
        self.read = read;
        self.read.advance(at);
    }

    /// A connection error: GOAWAY with its code, then the connection ends.
    fn fail(&mut self, e: FrameError) {
        tracing::debug!(error = %e, "simulator: HTTP/2 client broke the protocol");
        frame::goaway(&mut self.write, self.last_id, e.code);
        self.failing = true;
    }

    fn handle(&mut self, frame: Frame<'_>) -> Result<(), FrameError> {
        if !self.settings_seen && !matches!(frame, Frame::Settings { ack: false, .. }) {
            return Err(protocol("the client's first frame is not SETTINGS"));
        }
        if let Some((stream, _)) = self.continuing {
            if !matches!(frame, Frame::Continuation { stream: s, .. } if s == stream) {
                return Err(protocol("a header block interrupted"));
            }
        }
        match frame {
            Frame::Data {
                stream,
                end_stream,
                data,
                flow,
            } => self.on_data(stream, end_stream, data, flow)?,
            Frame::Headers {
                stream,
                end_stream,
                end_headers: true,
                block,
            } => self.on_header_block(stream, end_stream, block)?,
            Frame::Headers {
                stream,
                end_stream,
                end_headers: false,
                block,
            } => {
                self.continuation.clear();
                self.continuation.extend_from_slice(block);
                self.continuing = Some((stream, end_stream));
            }
            Frame::Continuation {
                end_headers, block, ..
            } => {
                let Some((stream, end_stream)) = self.continuing else {
                    return Err(protocol("CONTINUATION without HEADERS"));
                };
                self.continuation.extend_from_slice(block);
                if self.continuation.len() > MAX_HEADER_BLOCK {
                    return Err(protocol("header block too large"));
                }
                if end_headers {
                    self.continuing = None;
                    let block = std::mem::take(&mut self.continuation);
                    let result = self.on_header_block(stream, end_stream, &block);
                    self.continuation = block;
                    result?;
                }
            }
            Frame::RstStream { stream, .. } => {
                if stream > self.last_id {
                    return Err(protocol("RST_STREAM on a stream never opened"));
                }
                self.remove(stream);
            }
            Frame::Settings { ack: true, .. } => self.settings_acked = true,
            Frame::Settings { ack: false, params } => {
                for (id, value) in params {
                    self.on_setting(id, value)?;
                }
                self.settings_seen = true;
                frame::settings_ack(&mut self.write);
                self.unblock();
            }
            Frame::Ping { ack: false, data } => frame::ping(&mut self.write, true, data),
            // The client opens no more streams; those open are still answered.
            Frame::Ping { ack: true, .. } | Frame::GoAway { .. } | Frame::Ignored => {}
            Frame::WindowUpdate { stream, increment } => {
                self.on_window_update(stream, increment)?
            }
            Frame::PushPromise { .. } => return Err(protocol("PUSH_PROMISE from a client")),
        }
        Ok(())
    }

    fn on_setting(&mut self, id: u16, value: u32) -> Result<(), FrameError> {
        match id {
            setting::INITIAL_WINDOW_SIZE => {
                if value > frame::MAX_WINDOW {
                    return Err(flow_control("initial window beyond 2^31-1"));
                }
                // RFC 9113 §6.9.2: the change applies to every open stream.
                let delta = i64::from(value) - self.peer_initial_window;
                self.peer_initial_window = i64::from(value);
                for stream in self.streams.values_mut() {
                    stream.send_window += delta;
                }
            }
            setting::MAX_FRAME_SIZE => {
                if !(frame::DEFAULT_MAX_FRAME..=frame::MAX_FRAME_LIMIT).contains(&value) {
                    return Err(protocol("MAX_FRAME_SIZE out of range"));
                }
                self.peer_max_frame = value;
            }
            setting::ENABLE_PUSH if value > 1 => {
                return Err(protocol("ENABLE_PUSH neither 0 nor 1"));
            }
            // This end never indexes (HEADER_TABLE_SIZE) and never pushes.
            _ => {}
        }
        Ok(())
    }

    fn on_window_update(&mut self, id: u32, increment: u32) -> Result<(), FrameError> {
        if id == 0 {
            if increment == 0 {
                return Err(protocol("WINDOW_UPDATE of 0"));
            }
            self.send_window += i64::from(increment);
            if self.send_window > i64::from(frame::MAX_WINDOW) {
                return Err(flow_control("window beyond 2^31-1"));
            }
        } else if let Some(stream) = self.streams.get_mut(&id) {
            stream.send_window += i64::from(increment);
            if increment == 0 {
                self.reset(id, code::PROTOCOL_ERROR);
            } else if stream.send_window > i64::from(frame::MAX_WINDOW) {
                self.reset(id, code::FLOW_CONTROL_ERROR);
            }
        }
        self.unblock();
        Ok(())
    }

    fn on_header_block(
        &mut self,
        id: u32,
        end_stream: bool,
        block: &[u8],
    ) -> Result<(), FrameError> {
        if let Some(ended) = self.streams.get(&id).map(|s| s.ended) {
            // Trailers: decoded, as every block must be to keep the
            // decoder's table in step, and dropped.
            self.decoder.decode(block, |_, _| {}).map_err(compression)?;
            if ended || !end_stream {
                self.reset(id, code::PROTOCOL_ERROR);
            } else {
                self.on_end(id);
            }
            return Ok(());
        }
        if id.is_multiple_of(2) {
            return Err(protocol("a client stream with an even id"));
        }
        let after_goaway = self.going_away.is_some_and(|last| id > last);
        if id <= self.last_id || after_goaway {
            // A stream already closed, or one the client must send elsewhere.
            self.decoder.decode(block, |_, _| {}).map_err(compression)?;
            self.last_id = self.last_id.max(id);
            return Ok(());
        }
        self.last_id = id;
        let mut stream = self.spare.pop().unwrap_or_default();
        let head = &mut stream.head;
        if let Err(e) = self.decoder.decode(block, |n, v| head.set(n, v)) {
            self.recycle(stream);
            return Err(compression(e));
        }
        if !stream.head.well_formed() {
            self.refuse(id, stream, code::PROTOCOL_ERROR);
            return Ok(());
        }
        if self.settings_acked && self.streams.len() >= self.max_streams {
            self.refuse(id, stream, code::REFUSED_STREAM);
            return Ok(());
        }
        let device = stream.head.path().and_then(|p| p.strip_prefix(DEVICE_PATH));
        let faults = &self.judge.faults;
        let refused = !faults.refuse_streams.is_empty()
            && device
                .and_then(|hex| DeviceToken::parse(hex).ok())
                .is_some_and(|t| faults.refuses_stream(&t));
        if refused {
            let shared = &self.judge.shared;
            shared.streams_refused.fetch_add(1, Ordering::Relaxed);
            self.refuse(id, stream, code::REFUSED_STREAM);
            return Ok(());
        }
        stream.keep = !(self.judge.shared.sink && device.is_some());
        stream.send_window = self.peer_initial_window;
        self.streams.insert(id, stream);
        if end_stream {
            self.on_end(id);
        }
        Ok(())
    }

    fn on_data(
        &mut self,
        id: u32,
        end_stream: bool,
        data: &[u8],
        flow: u32,
    ) -> Result<(), FrameError> {
        self.recv_window -= i64::from(flow);
        if self.recv_window < 0 {
            return Err(flow_control("DATA beyond the connection window"));
        }
        self.unacked += flow;
        if self.unacked >= CONNECTION_WINDOW / 2 {
            frame::window_update(&mut self.write, 0, self.unacked);
            self.recv_window += i64::from(self.unacked);
            self.unacked = 0;
        }
        let Some(stream) = self.streams.get_mut(&id) else {
            if id > self.last_id {
                return Err(protocol("DATA on a stream never opened"));
            }
            // Reset, refused, or after the GOAWAY: read past.
            return Ok(());
        };
        if stream.ended {
            return Ok(());
        }
        stream.received += data.len() as u64;
        if stream.keep && stream.payload.len() < MAX_READ {
            stream.payload.extend_from_slice(data);
        }
        if end_stream {
            self.on_end(id);
            return Ok(());
        }
        // The window comes back as the body is taken: none is granted
        // beyond the announced one, so a window of 0 lets no body through.
        stream.unacked += flow;
        if stream.unacked > 0 && stream.unacked >= self.stream_window / 2 {
            frame::window_update(&mut self.write, id, stream.unacked);
            stream.unacked = 0;
        }
        Ok(())
    }

    /// The client ended stream `id`: judge it, and answer now or after the delay.
    fn on_end(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.ended = true;
        match stream.head.content_length() {
            Ok(None) => {}
            Ok(Some(n)) if n == stream.received => {}
            _ => return self.reset(id, code::PROTOCOL_ERROR),
        }
        stream.reply = Some(self.judge.reply(id, stream));
        if std::mem::take(&mut self.judge.goaway_due) && self.going_away.is_none() {
            // Streams received so far are answered; the client must send
            // anything after them elsewhere.
            frame::goaway(&mut self.write, self.last_id, code::NO_ERROR);
            self.going_away = Some(self.last_id);
        }
        let delay = self.judge.shared.delay();
        if delay.is_zero() {
            self.answer(id);
        } else {
            let due = self.judge.instant() + delay;
            self.delayed.push_back((due, id));
        }
    }

    /// Writes stream `id`'s answer, its body as far as flow control allows.
    fn answer(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let Some(reply) = stream.reply.take() else {
            return;
        };
        self.body.clear();
        reply.body(&mut self.body);
        let end_stream = self.body.is_empty();
        let field = match &reply {
            Reply::Channel { channel_id, .. } => channel_id
                .as_deref()
                .map(|c| (&b"apns-channel-id"[..], c.as_bytes())),
            _ => stream.head.bytes(Field::Id).map(|v| (&b"apns-id"[..], v)),
        };
        let max_frame = self.peer_max_frame;
        reply::head(
            &mut self.write,
            id,
            reply.status(),
            field.as_slice(),
            end_stream,
            max_frame,
        );
        if end_stream {
            return self.remove(id);
        }
        let n = sendable(stream.send_window.min(self.send_window), self.body.len());
        stream.send_window -= n as i64;
        self.send_window -= n as i64;
        if n == self.body.len() {
            frame::data(&mut self.write, id, &self.body, true, max_frame);
            return self.remove(id);
        }
        if n > 0 {
            frame::data(&mut self.write, id, &self.body[..n], false, max_frame);
        }
        stream.unsent.extend_from_slice(&self.body[n..]);
        self.blocked.push_back(id);
    }

    /// Sends what flow control now allows of the answer bodies waiting.
    fn unblock(&mut self) {
        while let Some(&id) = self.blocked.front() {
            let Some(stream) = self.streams.get_mut(&id) else {
                self.blocked.pop_front();
                continue;
            };
            let left = &stream.unsent[stream.unsent_at..];
            let n = sendable(stream.send_window.min(self.send_window), left.len());
            if n == 0 && !left.is_empty() {
                return;
            }
            let done = n == left.len();
            frame::data(&mut self.write, id, &left[..n], done, self.peer_max_frame);
            stream.unsent_at += n;
            stream.send_window -= n as i64;
            self.send_window -= n as i64;
            if !done {
                return;
            }
            self.blocked.pop_front();
            self.remove(id);
        }
    }

    /// Resets a stream this end will not answer.
    fn refuse(&mut self, id: u32, stream: Stream, code: u32) {
        frame::rst_stream(&mut self.write, id, code);
        self.recycle(stream);
    }

    fn reset(&mut self, id: u32, code: u32) {
        frame::rst_stream(&mut self.write, id, code);
        self.remove(id);
    }

    fn remove(&mut self, id: u32) {
        if let Some(stream) = self.streams.remove(&id) {
            self.recycle(stream);
        }
    }

    fn recycle(&mut self, mut stream: Stream) {
        if self.spare.len() < SPARE_STREAMS {
            stream.reset();
            self.spare.push(stream);
        }
    }

    /// Writes out what is queued (answers, a GOAWAY) and closes the TLS
    /// session, within [`CLOSE_GRACE`].
    async fn close(mut self) {
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            poll_fn(|cx| match self.poll_write(cx) {
                Ok(_) if !self.write.is_empty() || self.needs_flush => Poll::Pending,
                _ => Poll::Ready(()),
            })
            .await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.io).await;
        })
        .await;
    }
}
