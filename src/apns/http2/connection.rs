//! One HTTP/2 client connection: it owns the TLS socket and its buffers and
//! keeps the connection's state (streams, flow control, the peer's settings,
//! PING and request deadlines), driven from the task that uses it.
//!
//! Why not a general HTTP/2 client: APNs traffic is one request shape at
//! hundreds of thousands a second. Here a request is a header block appended
//! to the write buffer and its payload after it, with no task, lock,
//! allocation or header map per stream; many requests leave in one TLS
//! write, and every answer read in one go is handed back in one batch.
//! [`super::frame`] and [`super::hpack`] hold the byte-level rules.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_rustls::client::TlsStream;

use super::frame::{self, code, setting, Frame, FrameError, PeerLimits};
use super::hpack;
use super::in_flight::InFlight;
use super::wire::Wire;

/// The receive window this end grants, per stream and for the connection:
/// answers are small, so nothing waits on a WINDOW_UPDATE from us.
const RECV_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
/// The largest header block accepted from the server.
const MAX_HEADER_BLOCK: usize = 64 << 10;
/// The largest frame this end accepts (its SETTINGS_MAX_FRAME_SIZE).
const MAX_FRAME: u32 = frame::DEFAULT_MAX_FRAME;
/// Stream ids run out at 2^31: the connection takes no more streams near it,
/// so the lane opens a fresh one.
const LAST_STREAM_ID: u32 = (1 << 31) - 1;
/// Frames written before a flush is forced, so one turn of a busy loop does
/// not hold megabytes.
const WRITE_HIGH_WATER: usize = 64 << 10;

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// A whole answer: its status, its other header fields if the
    /// connection keeps them, and up to `max_body` bytes of its body.
    Answered {
        status: u16,
        headers: Vec<(Vec<u8>, Vec<u8>)>,
        body: Vec<u8>,
    },
    /// Above a GOAWAY's last stream: the server never processed it.
    Unprocessed,
    /// Reset by the server with this code (REFUSED_STREAM: not processed).
    Reset(u32),
    /// The connection ended first: the server may or may not have it.
    Lost,
    /// No answer within the request timeout; the stream was cancelled.
    TimedOut,
}

/// Why the connection ended.
#[derive(Debug, thiserror::Error)]
pub enum Closed {
    #[error("the server stopped answering PINGs")]
    Stalled,
    #[error("the server closed the connection")]
    Eof,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Protocol(#[from] FrameError),
    #[error(transparent)]
    Hpack(#[from] hpack::DecodeError),
}

/// What the connection has to say.
pub enum Event<T> {
    /// A stream ended; `T` is what its sender attached to it.
    Ended(T, Ending),
    /// The write buffer, full when [`Connection::next`] was called, has
    /// drained below its mark: more streams may be queued. Without it a
    /// caller that stopped at the mark waited for an answer to queue more,
    /// a whole round trip with streams to spare.
    Writable,
    /// The connection is over; every stream has ended before this.
    Closed(Closed),
}

/// Tuning, from the app's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub request_timeout: Duration,
    pub ping_interval: Duration,
    /// Longest answer body kept (APNs' error bodies are a few dozen bytes).
    pub max_body: usize,
    /// Keep the answers' header fields (the tools read `apns-channel-id`).
    pub keep_headers: bool,
}

/// A stream in flight. Thousands are, per connection, so what only an
/// error answer carries lives behind a box that a plain 200 never allocates.
struct Open<T> {
    tag: T,
    status: Option<u16>,
    /// Header fields kept (`keep_headers`) and body bytes received.
    answer: Option<Box<Received>>,
    /// Payload not yet sent for want of window.
    unsent: Bytes,
    send_window: i64,
    /// Received since the last stream WINDOW_UPDATE.
    received: u32,
}

/// What a stream's answer carried besides its status.
#[derive(Default)]
struct Received {
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
}

/// A header block arriving in HEADERS + CONTINUATION frames.
struct Continuing {
    stream: u32,
    end_stream: bool,
    block: Vec<u8>,
}

pub struct Connection<T> {
    wire: Wire<TlsStream<TcpStream>>,
    decoder: hpack::Decoder,
    options: Options,

    peer_max_streams: usize,
    peer: PeerLimits,
    settings_seen: bool,
    send_window: i64,
    received: u32,

    next_id: u32,
    /// Streams in flight by id.
    open: InFlight<Open<T>>,
    /// Streams with payload waiting for window, in the order they opened.
    blocked: VecDeque<u32>,
    continuing: Option<Continuing>,
    /// Each stream's answer deadline, in the order they opened (so in
    /// deadline order); entries of ended streams are dropped lazily.
    deadlines: VecDeque<(Instant, u32)>,
    deadline_timer: Pin<Box<Sleep>>,
    keepalive: Pin<Box<Sleep>>,
    ping_outstanding: bool,
    pings_sent: u64,
    /// The lowest last-stream id of the GOAWAYs received.
    goaway: Option<u32>,
    events: VecDeque<Event<T>>,
    closed: bool,
}

impl<T> Connection<T> {
    /// Speaks HTTP/2 on an established TLS connection (ALPN `h2`): sends the
    /// preface and this end's settings, and returns once the server's
    /// settings arrived and it answered a PING — under TLS 1.3 a refused
    /// client certificate only shows now, as an alert that ends it.
    pub async fn handshake(io: TlsStream<TcpStream>, options: Options) -> Result<Self, Closed> {
        let now = Instant::now();
        let mut conn = Connection {
            wire: Wire::new(io),
            decoder: hpack::Decoder::default(),
            options,
            peer_max_streams: usize::MAX,
            peer: PeerLimits::default(),
            settings_seen: false,
            send_window: i64::from(frame::DEFAULT_WINDOW),
            received: 0,
            next_id: 1,
            open: InFlight::default(),
            blocked: VecDeque::new(),
            continuing: None,
            deadlines: VecDeque::new(),
            deadline_timer: Box::pin(tokio::time::sleep_until(now + options.request_timeout)),
            keepalive: Box::pin(tokio::time::sleep_until(now + options.ping_interval)),
            ping_outstanding: false,
            pings_sent: 0,
            goaway: None,
            events: VecDeque::new(),
            closed: false,
        };
        conn.wire.write.extend_from_slice(frame::PREFACE);
        frame::settings(
            &mut conn.wire.write,
            &[
                (setting::ENABLE_PUSH, 0),
                (setting::INITIAL_WINDOW_SIZE, RECV_WINDOW),
                (setting::MAX_FRAME_SIZE, MAX_FRAME),
            ],
        );
        frame::window_update(
            &mut conn.wire.write,
            0,
            CONNECTION_WINDOW - frame::DEFAULT_WINDOW,
        );
        conn.send_ping();
        let answered = poll_fn(|cx| {
            if let Err(closed) = conn.poll_io(cx) {
                return Poll::Ready(Err(closed));
            }
            if let Some(Event::Closed(why)) = conn.events.pop_front() {
                return Poll::Ready(Err(why));
            }
            if conn.settings_seen && !conn.ping_outstanding {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await;
        answered.map(|()| conn)
    }

    /// Streams in flight.
    pub fn in_flight(&self) -> usize {
        self.open.len()
    }

    /// The most streams the server allows in flight now.
    pub fn limit(&self) -> usize {
        self.peer_max_streams
    }

    /// Whether the connection takes new streams at all (not closed, not going
    /// away, stream ids left).
    pub fn accepting(&self) -> bool {
        !self.closed && self.goaway.is_none() && self.next_id < LAST_STREAM_ID
    }

    /// Whether a new stream may open now, with at most `cap` in flight.
    pub fn has_room(&self, cap: usize) -> bool {
        self.accepting() && self.open.len() < cap.min(self.peer_max_streams)
    }

    /// Opens a stream for `tag`: `head` appends its header block, `body` is sent as
    /// DATA as far as flow control allows now, the rest as it allows later.
    /// The caller checks [`has_room`](Self::has_room) first. `now` starts
    /// its answer's deadline (the caller reads the clock once for a batch).
    pub fn send(
        &mut self,
        tag: T,
        body: &Bytes,
        now: Instant,
        head: impl FnOnce(&T, &mut Vec<u8>),
    ) {
        let id = self.next_id;
        self.next_id += 2;
        let mark = frame::begin_headers(&mut self.wire.write, id, body.is_empty());
        if id == 1 {
            hpack::no_table(&mut self.wire.write);
        }
        head(&tag, &mut self.wire.write);
        frame::end_headers(&mut self.wire.write, mark, self.peer.max_frame);
        let mut open = Open {
            tag,
            status: None,
            answer: None,
            unsent: Bytes::new(),
            send_window: self.peer.initial_window,
            received: 0,
        };
        let now_sendable = self.sendable(&open, body.len());
        if body.is_empty() {
            // The HEADERS frame ended the stream.
        } else if now_sendable == body.len() {
            frame::data(&mut self.wire.write, id, body, true, self.peer.max_frame);
        } else {
            if now_sendable > 0 {
                frame::data(
                    &mut self.wire.write,
                    id,
                    &body[..now_sendable],
                    false,
                    self.peer.max_frame,
                );
            }
            open.unsent = body.slice(now_sendable..);
            self.blocked.push_back(id);
        }
        let sent = now_sendable as i64;
        open.send_window -= sent;
        self.send_window -= sent;
        self.open.insert(id, open);
        let deadline = now + self.options.request_timeout;
        if self.deadlines.is_empty() {
            self.deadline_timer.as_mut().reset(deadline);
        }
        self.deadlines.push_back((deadline, id));
    }

    /// How much of `len` bytes both windows let a stream send now.
    fn sendable(&self, open: &Open<T>, len: usize) -> usize {
        let window = open.send_window.min(self.send_window).max(0);
        len.min(usize::try_from(window).unwrap_or(usize::MAX))
    }

    /// The next event: a stream that ended, room to write again, or the
    /// end of the connection. Writes what was queued and reads what arrived
    /// meanwhile.
    pub async fn next(&mut self) -> Event<T> {
        let full = self.write_full();
        poll_fn(|cx| {
            if let Err(closed) = self.poll_io(cx) {
                self.close(closed);
            }
            match self.events.pop_front() {
                Some(event) => Poll::Ready(event),
                None if full && !self.closed && !self.write_full() => Poll::Ready(Event::Writable),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// An event already at hand, without waiting.
    pub fn try_next(&mut self) -> Option<Event<T>> {
        self.events.pop_front()
    }

    /// Drives the socket and the timers as far as they go without waiting.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Result<(), Closed> {
        if self.closed {
            return Ok(());
        }
        self.poll_timers(cx);
        // Reading can queue frames to write (SETTINGS and PING
        // acknowledgements, window updates), and writing may free the peer
        // to send more: go round until neither makes progress.
        for _ in 0..16 {
            let wrote = self.poll_write(cx)?;
            let read = self.poll_read(cx)?;
            if self.closed || (!wrote && !read) {
                return Ok(());
            }
        }
        // Plenty done this turn: come back after the caller's other work.
        cx.waker().wake_by_ref();
        Ok(())
    }

    fn poll_timers(&mut self, cx: &mut Context<'_>) {
        if self.keepalive.as_mut().poll(cx).is_ready() {
            if self.ping_outstanding {
                self.close(Closed::Stalled);
                return;
            }
            self.send_ping();
        }
        while self.deadline_timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            while let Some(&(at, id)) = self.deadlines.front() {
                if !self.open.contains(id) {
                    self.deadlines.pop_front();
                } else if at <= now {
                    self.deadlines.pop_front();
                    frame::rst_stream(&mut self.wire.write, id, code::CANCEL);
                    self.end(id, Ending::TimedOut);
                } else {
                    break;
                }
            }
            let next = self
                .deadlines
                .front()
                .map_or(now + self.options.request_timeout, |d| d.0);
            self.deadline_timer.as_mut().reset(next);
        }
    }

    fn send_ping(&mut self) {
        self.pings_sent += 1;
        frame::ping(&mut self.wire.write, false, self.pings_sent.to_be_bytes());
        self.ping_outstanding = true;
        let next = Instant::now() + self.options.ping_interval;
        self.keepalive.as_mut().reset(next);
    }

    /// Writes what is queued; true if anything was written.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<bool, Closed> {
        Ok(self.wire.poll_write(cx)?)
    }

    /// Reads and handles what arrived; true if anything was read.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Result<bool, Closed> {
        match self.wire.poll_read(cx) {
            Poll::Ready(Ok(0)) => Err(Closed::Eof),
            Poll::Ready(Ok(_)) => {
                self.handle_frames()?;
                Ok(true)
            }
            Poll::Ready(Err(e)) => Err(Closed::Io(e)),
            Poll::Pending => Ok(false),
        }
    }

    fn handle_frames(&mut self) -> Result<(), Closed> {
        // Frames borrow the read buffer while their handlers change the rest.
        let read = std::mem::take(&mut self.wire.read);
        let mut at = 0;
        let result = loop {
            match frame::decode(&read[at..], MAX_FRAME) {
                Ok(Some((frame, used))) => {
                    at += used;
                    if let Err(e) = self.handle(frame) {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => {
                    frame::goaway(&mut self.wire.write, 0, e.code);
                    break Err(Closed::Protocol(e));
                }
            }
        };
        self.wire.read = read;
        self.wire.read.advance(at);
        // Answers come mostly in order: drop the deadlines of the streams
        // they ended, so the queue holds about what is in flight.
        while let Some(&(_, id)) = self.deadlines.front() {
            if self.open.contains(id) {
                break;
            }
            self.deadlines.pop_front();
        }
        result
    }

    fn handle(&mut self, frame: Frame<'_>) -> Result<(), Closed> {
        if let Some(c) = &self.continuing {
            if !matches!(&frame, Frame::Continuation { stream, .. } if *stream == c.stream) {
                return Err(protocol_error("a header block interrupted"));
            }
        }
        match frame {
            Frame::Data {
                stream,
                end_stream,
                data,
                flow,
            } => self.on_data(stream, end_stream, data, flow),
            Frame::Headers {
                stream,
                end_stream,
                end_headers,
                block,
            } => {
                if end_headers {
                    self.on_header_block(stream, end_stream, block)?;
                } else {
                    self.continuing = Some(Continuing {
                        stream,
                        end_stream,
                        block: block.to_vec(),
                    });
                }
            }
            Frame::Continuation {
                end_headers, block, ..
            } => {
                let Some(c) = self.continuing.as_mut() else {
                    return Err(protocol_error("CONTINUATION without HEADERS"));
                };
                c.block.extend_from_slice(block);
                if c.block.len() > MAX_HEADER_BLOCK {
                    return Err(protocol_error("header block too large"));
                }
                if end_headers {
                    if let Some(c) = self.continuing.take() {
                        self.on_header_block(c.stream, c.end_stream, &c.block)?;
                    }
                }
            }
            Frame::RstStream { stream, code } => self.end(stream, Ending::Reset(code)),
            Frame::Settings { ack: true, .. } => {}
            Frame::Settings { ack: false, params } => {
                for (id, value) in params {
                    self.on_setting(id, value)?;
                }
                self.settings_seen = true;
                frame::settings_ack(&mut self.wire.write);
                self.unblock();
            }
            Frame::Ping { ack: false, data } => frame::ping(&mut self.wire.write, true, data),
            Frame::Ping { ack: true, data } => {
                if data == self.pings_sent.to_be_bytes() {
                    self.ping_outstanding = false;
                }
            }
            Frame::GoAway { last_stream, .. } => self.on_goaway(last_stream),
            Frame::WindowUpdate { stream, increment } => {
                if increment == 0 {
                    return Err(protocol_error("WINDOW_UPDATE of 0"));
                }
                let window = if stream == 0 {
                    Some(&mut self.send_window)
                } else {
                    self.open.get_mut(stream).map(|o| &mut o.send_window)
                };
                if let Some(window) = window {
                    *window += i64::from(increment);
                    if *window > i64::from(frame::MAX_WINDOW) {
                        return Err(FrameError {
                            code: code::FLOW_CONTROL_ERROR,
                            what: "window beyond 2^31-1",
                        }
                        .into());
                    }
                }
                self.unblock();
            }
            Frame::PushPromise { .. } => return Err(protocol_error("PUSH_PROMISE, push disabled")),
            Frame::Ignored => {}
        }
        Ok(())
    }

    fn on_setting(&mut self, id: u16, value: u32) -> Result<(), Closed> {
        match id {
            setting::MAX_CONCURRENT_STREAMS => {
                self.peer_max_streams = usize::try_from(value).unwrap_or(usize::MAX)
            }
            _ => {
                let delta = self.peer.apply(id, value)?;
                if delta != 0 {
                    for open in self.open.values_mut() {
                        open.send_window += delta;
                    }
                }
            }
        }
        Ok(())
    }

    fn on_data(&mut self, stream: u32, end_stream: bool, data: &[u8], flow: u32) {
        self.received += flow;
        if self.received >= CONNECTION_WINDOW / 2 {
            frame::window_update(&mut self.wire.write, 0, self.received);
            self.received = 0;
        }
        let max_body = self.options.max_body;
        let Some(open) = self.open.get_mut(stream) else {
            return;
        };
        if !data.is_empty() {
            let body = &mut open.answer.get_or_insert_default().body;
            let room = max_body.saturating_sub(body.len());
            body.extend_from_slice(&data[..data.len().min(room)]);
        }
        open.received += flow;
        if end_stream {
            self.finish(stream);
        } else if open.received >= RECV_WINDOW / 2 {
            frame::window_update(&mut self.wire.write, stream, open.received);
            open.received = 0;
        }
    }

    fn on_header_block(
        &mut self,
        stream: u32,
        end_stream: bool,
        block: &[u8],
    ) -> Result<(), Closed> {
        // Every block goes through the decoder, answers to streams already
        // ended included: its table must stay in step with the server's.
        let mut status = None;
        let mut headers = Vec::new();
        let keep = self.options.keep_headers;
        self.decoder.decode(block, |name, value| {
            if name == b":status" {
                status = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok());
            } else if keep {
                headers.push((name.to_vec(), value.to_vec()));
            }
        })?;
        if let Some(open) = self.open.get_mut(stream) {
            if open.status.is_none() {
                open.status = status;
            }
            if !headers.is_empty() {
                open.answer
                    .get_or_insert_default()
                    .headers
                    .append(&mut headers);
            }
            if end_stream {
                self.finish(stream);
            }
        }
        Ok(())
    }

    /// The server ended a stream: an answer, or a reset if it had no status.
    fn finish(&mut self, stream: u32) {
        let Some(open) = self.open.get_mut(stream) else {
            return;
        };
        let ending = match open.status {
            Some(status) => {
                let Received { headers, body } = open.answer.take().map(|a| *a).unwrap_or_default();
                Ending::Answered {
                    status,
                    headers,
                    body,
                }
            }
            None => Ending::Reset(code::PROTOCOL_ERROR),
        };
        self.end(stream, ending);
    }

    fn on_goaway(&mut self, last_stream: u32) {
        let last = self.goaway.map_or(last_stream, |l| l.min(last_stream));
        self.goaway = Some(last);
        let above: Vec<u32> = self.open.ids().filter(|&id| id > last).collect();
        for id in above {
            self.end(id, Ending::Unprocessed);
        }
    }

    /// Sends what flow control now allows of the streams waiting for window.
    fn unblock(&mut self) {
        while let Some(&id) = self.blocked.front() {
            let Some(open) = self.open.get(id) else {
                self.blocked.pop_front();
                continue;
            };
            let n = self.sendable(open, open.unsent.len());
            if n == 0 {
                return;
            }
            let max_frame = self.peer.max_frame;
            let Some(open) = self.open.get_mut(id) else {
                return;
            };
            let chunk = open.unsent.split_to(n);
            let done = open.unsent.is_empty();
            frame::data(&mut self.wire.write, id, &chunk, done, max_frame);
            open.send_window -= n as i64;
            self.send_window -= n as i64;
            if !done {
                return;
            }
            self.blocked.pop_front();
        }
    }

    fn end(&mut self, stream: u32, ending: Ending) {
        if let Some(open) = self.open.remove(stream) {
            self.events.push_back(Event::Ended(open.tag, ending));
        }
    }

    /// Ends the connection: every open stream is lost (or unprocessed, above
    /// a GOAWAY's last stream), then `why` is the last event.
    fn close(&mut self, why: Closed) {
        if self.closed {
            return;
        }
        self.closed = true;
        let last = self.goaway.unwrap_or(LAST_STREAM_ID);
        let ids: Vec<u32> = self.open.ids().collect();
        for id in ids {
            let ending = if id > last {
                Ending::Unprocessed
            } else {
                Ending::Lost
            };
            self.end(id, ending);
        }
        self.blocked.clear();
        self.deadlines.clear();
        self.events.push_back(Event::Closed(why));
    }

    /// Writes out what is queued (a GOAWAY, a last RST_STREAM) before the
    /// connection is dropped, within `within`.
    pub async fn shutdown(mut self, within: Duration) {
        frame::goaway(&mut self.wire.write, 0, code::NO_ERROR);
        self.wire.close(within).await;
    }

    /// Whether enough is queued that the caller should let it be written
    /// before queuing more.
    pub fn write_full(&self) -> bool {
        self.wire.unwritten() >= WRITE_HIGH_WATER
    }
}

fn protocol_error(what: &'static str) -> Closed {
    Closed::Protocol(FrameError {
        code: code::PROTOCOL_ERROR,
        what,
    })
}
