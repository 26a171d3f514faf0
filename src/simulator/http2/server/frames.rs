//! What each frame from the client does to the connection: streams opened,
//! bodies taken and their window given back, requests judged when they end,
//! answers written as flow control allows.

use std::sync::atomic::Ordering;

use super::{compression, flow_control, protocol, sendable, Server, Waiting};
use crate::apns::http2::frame::{self, code, Frame, FrameError};
use crate::job::DeviceToken;
use crate::simulator::http2::head::Field;
use crate::simulator::http2::reply::{self, Reply};
use crate::simulator::http2::rules::DEVICE_PATH;
use crate::simulator::http2::{
    Echo, Stream, CONNECTION_WINDOW, MAX_HEADER_BLOCK, MAX_READ, SPARE_STREAMS,
};

impl Server {
    pub(super) fn handle(&mut self, frame: Frame<'_>) -> Result<(), FrameError> {
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
                frame::settings_ack(&mut self.wire.write);
                self.unblock();
            }
            Frame::Ping { ack: false, data } => frame::ping(&mut self.wire.write, true, data),
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
        // This end never indexes (HEADER_TABLE_SIZE) and never pushes.
        let delta = self.peer.apply(id, value)?;
        if delta != 0 {
            let waiting = self.delayed.iter_mut().map(|(_, w)| &mut w.send_window);
            let open = self.streams.values_mut().map(|s| &mut s.send_window);
            for window in open.chain(waiting) {
                *window += delta;
            }
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
        } else if let Some(window) = self.send_window_of(id) {
            *window += i64::from(increment);
            if increment == 0 {
                self.reset(id, code::PROTOCOL_ERROR);
            } else if *window > i64::from(frame::MAX_WINDOW) {
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
        let open = if id > self.last_id {
            None
        } else if let Some(stream) = self.streams.get(&id) {
            Some(stream.ended)
        } else {
            self.waiting(id).map(|_| true)
        };
        if let Some(ended) = open {
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
        let mut stream = self.spare.pop().unwrap_or_default();
        let head = &mut stream.head;
        if let Err(e) = self.decoder.decode(block, |n, v| head.set(n, v)) {
            self.recycle(stream);
            return Err(compression(e));
        }
        self.last_id = id;
        if !stream.head.well_formed() {
            self.refuse(id, stream, code::PROTOCOL_ERROR);
            return Ok(());
        }
        if self.settings_acked && self.streams.len() + self.delayed.len() >= self.max_streams {
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
        stream.send_window = self.peer.initial_window;
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
            frame::window_update(&mut self.wire.write, 0, self.unacked);
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
            frame::window_update(&mut self.wire.write, id, stream.unacked);
            stream.unacked = 0;
        }
        Ok(())
    }

    /// The client ended stream `id`: judge it, and answer now or after the delay.
    fn on_end(&mut self, id: u32) {
        let Some(mut stream) = self.streams.remove(&id) else {
            return;
        };
        stream.ended = true;
        match stream.head.content_length() {
            Ok(None) => {}
            Ok(Some(n)) if n == stream.received => {}
            _ => return self.refuse(id, stream, code::PROTOCOL_ERROR),
        }
        let reply = self.judge.reply(id, &mut stream);
        // Judged: what the answer needs of the request is its id, and the
        // stream's window for a body.
        let waiting = Waiting {
            id,
            reply,
            echo: stream.head.bytes(Field::Id).map(Echo::of),
            send_window: stream.send_window,
        };
        self.recycle(stream);
        if std::mem::take(&mut self.judge.goaway_due) && self.going_away.is_none() {
            // Streams received so far are answered; the client must send
            // anything after them elsewhere.
            frame::goaway(&mut self.wire.write, self.last_id, code::NO_ERROR);
            self.going_away = Some(self.last_id);
        }
        let delay = self.judge.shared.delay();
        if delay.is_zero() {
            self.answer(waiting);
        } else {
            let due = self.judge.instant() + delay;
            self.delayed.push_back((due, waiting));
        }
    }

    /// Writes a judged request's answer, its body as far as flow control
    /// allows; a body held back opens a stream again until it is sent.
    pub(super) fn answer(&mut self, waiting: Waiting) {
        let Waiting {
            id,
            reply,
            echo,
            send_window,
        } = waiting;
        self.body.clear();
        reply.body(&mut self.body);
        let end_stream = self.body.is_empty();
        let field = match &reply {
            Reply::Channel { channel_id, .. } => channel_id
                .as_deref()
                .map(|c| (&b"apns-channel-id"[..], c.as_bytes())),
            _ => echo.as_ref().map(|e| (&b"apns-id"[..], e.as_bytes())),
        };
        let max_frame = self.peer.max_frame;
        reply::head(
            &mut self.wire.write,
            id,
            reply.status(),
            field.as_slice(),
            end_stream,
            max_frame,
        );
        if end_stream {
            return;
        }
        let n = sendable(send_window.min(self.send_window), self.body.len());
        self.send_window -= n as i64;
        if n == self.body.len() {
            frame::data(&mut self.wire.write, id, &self.body, true, max_frame);
            return;
        }
        if n > 0 {
            frame::data(&mut self.wire.write, id, &self.body[..n], false, max_frame);
        }
        let mut stream = self.spare.pop().unwrap_or_default();
        stream.ended = true;
        stream.send_window = send_window - n as i64;
        stream.unsent.extend_from_slice(&self.body[n..]);
        self.streams.insert(id, stream);
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
            frame::data(
                &mut self.wire.write,
                id,
                &left[..n],
                done,
                self.peer.max_frame,
            );
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
    fn refuse(&mut self, id: u32, stream: Box<Stream>, code: u32) {
        frame::rst_stream(&mut self.wire.write, id, code);
        self.recycle(stream);
    }

    fn reset(&mut self, id: u32, code: u32) {
        frame::rst_stream(&mut self.wire.write, id, code);
        self.remove(id);
    }

    fn remove(&mut self, id: u32) {
        if let Some(stream) = self.streams.remove(&id) {
            return self.recycle(stream);
        }
        // Judged and waiting: never answered.
        if let Some(at) = self.delayed.iter().position(|(_, w)| w.id == id) {
            self.delayed.remove(at);
        }
    }

    /// The answer of stream `id` if it waits out the delay. The queue is
    /// searched, so only frames that seldom come for a judged stream (a
    /// reset, a window update, trailers) look there.
    fn waiting(&mut self, id: u32) -> Option<&mut Waiting> {
        self.delayed.iter_mut().map(|(_, w)| w).find(|w| w.id == id)
    }

    /// The send window of stream `id`, open or waiting out the delay.
    fn send_window_of(&mut self, id: u32) -> Option<&mut i64> {
        if self.streams.contains_key(&id) {
            return self.streams.get_mut(&id).map(|s| &mut s.send_window);
        }
        self.waiting(id).map(|w| &mut w.send_window)
    }

    fn recycle(&mut self, mut stream: Box<Stream>) {
        if self.spare.len() < self.max_streams.min(SPARE_STREAMS) {
            stream.reset();
            self.spare.push(stream);
        }
    }
}
