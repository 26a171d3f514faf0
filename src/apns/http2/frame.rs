//! HTTP/2 frames (RFC 9113 §4 and §6), pure: bytes in, frames out, and the
//! frames a client writes appended to a buffer. No I/O and no state, so the
//! connection ([`super::connection`]) holds every rule that needs memory and
//! this holds every rule about bytes, fuzzed and tested from every side.

/// What a client sends before anything else (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Every frame starts with 9 bytes: length (24 bits), type, flags, stream.
pub const HEAD_LEN: usize = 9;
/// The frame size and window every peer starts with.
pub const DEFAULT_MAX_FRAME: u32 = 16_384;
pub const DEFAULT_WINDOW: u32 = 65_535;
/// Largest frame size and window the protocol allows.
pub const MAX_FRAME_LIMIT: u32 = (1 << 24) - 1;
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// Frame types.
pub mod kind {
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const PRIORITY: u8 = 2;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const PUSH_PROMISE: u8 = 5;
    pub const PING: u8 = 6;
    pub const GOAWAY: u8 = 7;
    pub const WINDOW_UPDATE: u8 = 8;
    pub const CONTINUATION: u8 = 9;
}

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

/// SETTINGS parameters (RFC 9113 §6.5.2).
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 1;
    pub const ENABLE_PUSH: u16 = 2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 3;
    pub const INITIAL_WINDOW_SIZE: u16 = 4;
    pub const MAX_FRAME_SIZE: u16 = 5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 6;
}

/// Error codes (RFC 9113 §7).
pub mod code {
    pub const NO_ERROR: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const FLOW_CONTROL_ERROR: u32 = 3;
    pub const FRAME_SIZE_ERROR: u32 = 6;
    pub const REFUSED_STREAM: u32 = 7;
    pub const CANCEL: u32 = 8;
    pub const COMPRESSION_ERROR: u32 = 9;
}

/// A frame read from the peer, borrowing its payload from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// `flow` is the length flow control counts, padding included.
    Data {
        stream: u32,
        end_stream: bool,
        data: &'a [u8],
        flow: u32,
    },
    Headers {
        stream: u32,
        end_stream: bool,
        end_headers: bool,
        block: &'a [u8],
    },
    Continuation {
        stream: u32,
        end_headers: bool,
        block: &'a [u8],
    },
    RstStream {
        stream: u32,
        code: u32,
    },
    Settings {
        ack: bool,
        params: Settings<'a>,
    },
    Ping {
        ack: bool,
        data: [u8; 8],
    },
    GoAway {
        last_stream: u32,
        code: u32,
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    PushPromise {
        stream: u32,
    },
    /// PRIORITY and unknown types: read past (RFC 9113 §4.1, §5.5).
    Ignored,
}

/// The parameters of a SETTINGS frame, read as they are iterated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings<'a>(&'a [u8]);

impl Iterator for Settings<'_> {
    type Item = (u16, u32);

    fn next(&mut self) -> Option<(u16, u32)> {
        let (param, rest) = self.0.split_first_chunk::<6>()?;
        self.0 = rest;
        let id = u16::from_be_bytes([param[0], param[1]]);
        Some((
            id,
            u32::from_be_bytes([param[2], param[3], param[4], param[5]]),
        ))
    }
}

/// A frame the peer got wrong: the connection ends with this code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("HTTP/2 {what} (error code {code})")]
pub struct FrameError {
    pub code: u32,
    pub what: &'static str,
}

const fn protocol(what: &'static str) -> FrameError {
    FrameError {
        code: code::PROTOCOL_ERROR,
        what,
    }
}

const fn frame_size(what: &'static str) -> FrameError {
    FrameError {
        code: code::FRAME_SIZE_ERROR,
        what,
    }
}

fn u31(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & MAX_WINDOW
}

fn u32_at(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// What the peer's SETTINGS say about the frames this end sends, for either
/// end: each stream's initial send window and the largest frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLimits {
    pub initial_window: i64,
    pub max_frame: u32,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            initial_window: i64::from(DEFAULT_WINDOW),
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

impl PeerLimits {
    /// Takes one setting; returns the change it makes to every open stream's
    /// send window (RFC 9113 §6.9.2), 0 for all but INITIAL_WINDOW_SIZE.
    pub fn apply(&mut self, id: u16, value: u32) -> Result<i64, FrameError> {
        match id {
            setting::INITIAL_WINDOW_SIZE => {
                if value > MAX_WINDOW {
                    return Err(FrameError {
                        code: code::FLOW_CONTROL_ERROR,
                        what: "initial window beyond 2^31-1",
                    });
                }
                let delta = i64::from(value) - self.initial_window;
                self.initial_window = i64::from(value);
                Ok(delta)
            }
            setting::MAX_FRAME_SIZE => {
                if !(DEFAULT_MAX_FRAME..=MAX_FRAME_LIMIT).contains(&value) {
                    return Err(protocol("MAX_FRAME_SIZE out of range"));
                }
                self.max_frame = value;
                Ok(0)
            }
            setting::ENABLE_PUSH if value > 1 => Err(protocol("ENABLE_PUSH neither 0 nor 1")),
            _ => Ok(0),
        }
    }
}

/// Reads one frame from the front of `buf`: `Ok(None)` until it is all
/// there, else the frame and how many bytes it took. `max_frame` is the
/// largest payload this end allows (its own SETTINGS_MAX_FRAME_SIZE).
pub fn decode(buf: &[u8], max_frame: u32) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let Some(head) = buf.first_chunk::<HEAD_LEN>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]);
    if len > max_frame {
        return Err(frame_size("frame longer than the allowed frame size"));
    }
    let total = HEAD_LEN + len as usize;
    let Some(payload) = buf.get(HEAD_LEN..total) else {
        return Ok(None);
    };
    let (ty, flags, stream) = (head[3], head[4], u31(&head[5..9]));
    let on_stream = || {
        if stream == 0 {
            Err(protocol("stream frame on stream 0"))
        } else {
            Ok(())
        }
    };
    let on_connection = || {
        if stream == 0 {
            Ok(())
        } else {
            Err(protocol("connection frame on a stream"))
        }
    };
    let frame = match ty {
        kind::DATA => {
            on_stream()?;
            Frame::Data {
                stream,
                end_stream: flags & END_STREAM != 0,
                data: unpad(payload, flags)?,
                flow: len,
            }
        }
        kind::HEADERS => {
            on_stream()?;
            let mut block = unpad(payload, flags)?;
            if flags & PRIORITY_FLAG != 0 {
                block = block
                    .get(5..)
                    .ok_or(frame_size("HEADERS too short for its priority"))?;
            }
            Frame::Headers {
                stream,
                end_stream: flags & END_STREAM != 0,
                end_headers: flags & END_HEADERS != 0,
                block,
            }
        }
        kind::CONTINUATION => {
            on_stream()?;
            Frame::Continuation {
                stream,
                end_headers: flags & END_HEADERS != 0,
                block: payload,
            }
        }
        kind::RST_STREAM => {
            on_stream()?;
            if len != 4 {
                return Err(frame_size("RST_STREAM not 4 bytes"));
            }
            Frame::RstStream {
                stream,
                code: u32_at(payload),
            }
        }
        kind::SETTINGS => {
            on_connection()?;
            let ack = flags & ACK != 0;
            if (ack && len != 0) || !len.is_multiple_of(6) {
                return Err(frame_size("SETTINGS of a wrong length"));
            }
            Frame::Settings {
                ack,
                params: Settings(payload),
            }
        }
        kind::PING => {
            on_connection()?;
            let data = *payload
                .first_chunk::<8>()
                .filter(|_| len == 8)
                .ok_or(frame_size("PING not 8 bytes"))?;
            Frame::Ping {
                ack: flags & ACK != 0,
                data,
            }
        }
        kind::GOAWAY => {
            on_connection()?;
            if len < 8 {
                return Err(frame_size("GOAWAY shorter than 8 bytes"));
            }
            Frame::GoAway {
                last_stream: u31(payload),
                code: u32_at(&payload[4..]),
            }
        }
        kind::WINDOW_UPDATE => {
            if len != 4 {
                return Err(frame_size("WINDOW_UPDATE not 4 bytes"));
            }
            Frame::WindowUpdate {
                stream,
                increment: u31(payload),
            }
        }
        kind::PUSH_PROMISE => {
            on_stream()?;
            Frame::PushPromise { stream }
        }
        kind::PRIORITY => {
            on_stream()?;
            if len != 5 {
                return Err(frame_size("PRIORITY not 5 bytes"));
            }
            Frame::Ignored
        }
        _ => Frame::Ignored,
    };
    Ok(Some((frame, total)))
}

/// The payload of a PADDED frame without its pad length byte and padding.
fn unpad(payload: &[u8], flags: u8) -> Result<&[u8], FrameError> {
    if flags & PADDED == 0 {
        return Ok(payload);
    }
    let (&pad, rest) = payload
        .split_first()
        .ok_or(frame_size("PADDED frame without its pad length"))?;
    rest.len()
        .checked_sub(usize::from(pad))
        .map(|end| &rest[..end])
        .ok_or(protocol("padding longer than the frame"))
}

/// Appends a frame head.
pub fn head(out: &mut Vec<u8>, len: usize, ty: u8, flags: u8, stream: u32) {
    let len = u32::try_from(len).unwrap_or(u32::MAX).min(MAX_FRAME_LIMIT);
    let [_, a, b, c] = len.to_be_bytes();
    out.extend_from_slice(&[a, b, c, ty, flags]);
    out.extend_from_slice(&(stream & MAX_WINDOW).to_be_bytes());
}

pub fn settings(out: &mut Vec<u8>, params: &[(u16, u32)]) {
    head(out, params.len() * 6, kind::SETTINGS, 0, 0);
    for (id, value) in params {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
    }
}

pub fn settings_ack(out: &mut Vec<u8>) {
    head(out, 0, kind::SETTINGS, ACK, 0);
}

pub fn ping(out: &mut Vec<u8>, ack: bool, data: [u8; 8]) {
    head(out, 8, kind::PING, if ack { ACK } else { 0 }, 0);
    out.extend_from_slice(&data);
}

pub fn window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    head(out, 4, kind::WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&(increment & MAX_WINDOW).to_be_bytes());
}

pub fn rst_stream(out: &mut Vec<u8>, stream: u32, code: u32) {
    head(out, 4, kind::RST_STREAM, 0, stream);
    out.extend_from_slice(&code.to_be_bytes());
}

pub fn goaway(out: &mut Vec<u8>, last_stream: u32, code: u32) {
    head(out, 8, kind::GOAWAY, 0, 0);
    out.extend_from_slice(&(last_stream & MAX_WINDOW).to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
}

/// Appends DATA frames carrying `data`, each at most `max_frame` long; the
/// last ends the stream if `end_stream`.
pub fn data(out: &mut Vec<u8>, stream: u32, data: &[u8], end_stream: bool, max_frame: u32) {
    let max = (max_frame as usize).max(1);
    let mut chunks = data.chunks(max).peekable();
    if chunks.peek().is_none() {
        head(out, 0, kind::DATA, u8::from(end_stream), stream);
        return;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let flags = if last && end_stream { END_STREAM } else { 0 };
        head(out, chunk.len(), kind::DATA, flags, stream);
        out.extend_from_slice(chunk);
    }
}

/// Starts a HEADERS frame whose header block the caller appends next; hand
/// the mark to [`end_headers`] once it has.
pub fn begin_headers(out: &mut Vec<u8>, stream: u32, end_stream: bool) -> HeadersMark {
    let at = out.len();
    head(out, 0, kind::HEADERS, u8::from(end_stream), stream);
    HeadersMark { at, stream }
}

/// Where a HEADERS frame begins in the output, from [`begin_headers`].
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct HeadersMark {
    at: usize,
    stream: u32,
}

/// Closes the HEADERS frame begun at `mark`: sets its length and END_HEADERS,
/// splitting the block over CONTINUATION frames if it is longer than
/// `max_frame` (a header block is never larger than a few hundred bytes for
/// APNs, so the split is the rare path).
pub fn end_headers(out: &mut Vec<u8>, mark: HeadersMark, max_frame: u32) {
    let start = mark.at + HEAD_LEN;
    let max = (max_frame as usize).max(1);
    if out.len() - start <= max {
        let len = out.len() - start;
        let [_, a, b, c] = (len as u32).to_be_bytes();
        out[mark.at..mark.at + 3].copy_from_slice(&[a, b, c]);
        out[mark.at + 4] |= END_HEADERS;
        return;
    }
    let block = out.split_off(start);
    let first = &block[..max];
    let [_, a, b, c] = (max as u32).to_be_bytes();
    out[mark.at..mark.at + 3].copy_from_slice(&[a, b, c]);
    out.extend_from_slice(first);
    let mut rest = block[max..].chunks(max).peekable();
    while let Some(chunk) = rest.next() {
        let flags = if rest.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        head(out, chunk.len(), kind::CONTINUATION, flags, mark.stream);
        out.extend_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(buf: &[u8]) -> Frame<'_> {
        let (frame, used) = decode(buf, DEFAULT_MAX_FRAME).unwrap().unwrap();
        assert_eq!(used, buf.len());
        frame
    }

    #[test]
    fn every_written_frame_reads_back() {
        let mut out = Vec::new();
        settings(
            &mut out,
            &[
                (setting::ENABLE_PUSH, 0),
                (setting::INITIAL_WINDOW_SIZE, 1 << 20),
            ],
        );
        let Frame::Settings { ack: false, params } = one(&out) else {
            panic!("{:?}", one(&out))
        };
        assert_eq!(
            params.collect::<Vec<_>>(),
            [
                (setting::ENABLE_PUSH, 0),
                (setting::INITIAL_WINDOW_SIZE, 1 << 20)
            ]
        );
        for (write, expected) in [
            (
                Box::new(|o: &mut Vec<u8>| settings_ack(o)) as Box<dyn Fn(&mut Vec<u8>)>,
                Frame::Settings {
                    ack: true,
                    params: Settings(&[]),
                },
            ),
            (
                Box::new(|o| ping(o, true, *b"12345678")),
                Frame::Ping {
                    ack: true,
                    data: *b"12345678",
                },
            ),
            (
                Box::new(|o| window_update(o, 3, 70_000)),
                Frame::WindowUpdate {
                    stream: 3,
                    increment: 70_000,
                },
            ),
            (
                Box::new(|o| rst_stream(o, 5, code::CANCEL)),
                Frame::RstStream {
                    stream: 5,
                    code: code::CANCEL,
                },
            ),
            (
                Box::new(|o| goaway(o, 7, code::NO_ERROR)),
                Frame::GoAway {
                    last_stream: 7,
                    code: 0,
                },
            ),
        ] {
            let mut out = Vec::new();
            write(&mut out);
            assert_eq!(one(&out), expected);
        }
    }

    #[test]
    fn data_is_split_at_the_frame_size_and_ends_the_stream_once() {
        let mut out = Vec::new();
        data(&mut out, 1, &[7; 10], true, 4);
        let mut frames = Vec::new();
        let mut at = 0;
        while let Some((frame, used)) = decode(&out[at..], 4).unwrap() {
            frames.push(frame);
            at += used;
        }
        assert_eq!(at, out.len());
        let ends: Vec<(usize, bool)> = frames
            .iter()
            .map(|f| match f {
                Frame::Data {
                    data, end_stream, ..
                } => (data.len(), *end_stream),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ends, [(4, false), (4, false), (2, true)]);

        let mut empty = Vec::new();
        data(&mut empty, 1, &[], true, 4);
        assert!(matches!(
            one(&empty),
            Frame::Data {
                end_stream: true,
                data: [],
                ..
            }
        ));
    }

    #[test]
    fn a_long_header_block_continues_in_continuation_frames() {
        let mut out = Vec::new();
        let mark = begin_headers(&mut out, 9, true);
        out.extend((0..10u8).collect::<Vec<_>>());
        end_headers(&mut out, mark, 4);
        let mut at = 0;
        let mut block = Vec::new();
        let mut kinds = Vec::new();
        while let Some((frame, used)) = decode(&out[at..], 4).unwrap() {
            at += used;
            match frame {
                Frame::Headers {
                    stream: 9,
                    end_stream: true,
                    end_headers,
                    block: b,
                } => {
                    kinds.push(("headers", end_headers));
                    block.extend_from_slice(b);
                }
                Frame::Continuation {
                    stream: 9,
                    end_headers,
                    block: b,
                } => {
                    kinds.push(("continuation", end_headers));
                    block.extend_from_slice(b);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(block, (0..10u8).collect::<Vec<_>>());
        assert_eq!(
            kinds,
            [
                ("headers", false),
                ("continuation", false),
                ("continuation", true)
            ]
        );

        let mut short = Vec::new();
        let mark = begin_headers(&mut short, 1, false);
        short.extend_from_slice(b"abc");
        end_headers(&mut short, mark, DEFAULT_MAX_FRAME);
        assert_eq!(
            one(&short),
            Frame::Headers {
                stream: 1,
                end_stream: false,
                end_headers: true,
                block: b"abc"
            }
        );
    }

    #[test]
    fn peer_limits_follow_the_settings_and_refuse_what_is_out_of_range() {
        let mut peer = PeerLimits::default();
        assert_eq!(
            peer.apply(setting::INITIAL_WINDOW_SIZE, 100),
            Ok(100 - 65_535)
        );
        assert_eq!(peer.apply(setting::INITIAL_WINDOW_SIZE, 300), Ok(200));
        assert_eq!(peer.apply(setting::MAX_FRAME_SIZE, 32_768), Ok(0));
        assert_eq!(
            peer,
            PeerLimits {
                initial_window: 300,
                max_frame: 32_768
            }
        );
        assert_eq!(peer.apply(setting::MAX_CONCURRENT_STREAMS, 1), Ok(0));
        for (id, value) in [
            (setting::INITIAL_WINDOW_SIZE, MAX_WINDOW + 1),
            (setting::MAX_FRAME_SIZE, DEFAULT_MAX_FRAME - 1),
            (setting::MAX_FRAME_SIZE, MAX_FRAME_LIMIT + 1),
            (setting::ENABLE_PUSH, 2),
        ] {
            assert!(peer.apply(id, value).is_err(), "{id} = {value}");
        }
    }

    #[test]
    fn a_partial_frame_waits_for_the_rest() {
        let mut out = Vec::new();
        ping(&mut out, false, [1; 8]);
        for cut in 0..out.len() {
            assert_eq!(decode(&out[..cut], DEFAULT_MAX_FRAME), Ok(None), "{cut}");
        }
    }

    #[test]
    fn padding_and_priority_are_stripped() {
        // HEADERS, PADDED | PRIORITY | END_HEADERS, pad 2, 5 priority bytes, block "hi".
        let mut buf = vec![
            0,
            0,
            10,
            kind::HEADERS,
            PADDED | PRIORITY_FLAG | END_HEADERS,
        ];
        buf.extend_from_slice(&1u32.to_be_bytes());
        buf.extend_from_slice(&[2, 0, 0, 0, 0, 16, b'h', b'i', 0, 0]);
        assert_eq!(
            one(&buf),
            Frame::Headers {
                stream: 1,
                end_stream: false,
                end_headers: true,
                block: b"hi"
            }
        );
        let mut data = vec![0, 0, 4, kind::DATA, PADDED | END_STREAM];
        data.extend_from_slice(&3u32.to_be_bytes());
        data.extend_from_slice(&[1, b'x', b'y', 0]);
        assert_eq!(
            one(&data),
            Frame::Data {
                stream: 3,
                end_stream: true,
                data: b"xy",
                flow: 4
            }
        );
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let frame = |len: u32, ty: u8, flags: u8, stream: u32, payload: &[u8]| {
            let mut b = len.to_be_bytes()[1..].to_vec();
            b.extend_from_slice(&[ty, flags]);
            b.extend_from_slice(&stream.to_be_bytes());
            b.extend_from_slice(payload);
            b
        };
        let cases = [
            frame(3, kind::RST_STREAM, 0, 1, &[0; 3]),
            frame(4, kind::RST_STREAM, 0, 0, &[0; 4]),
            frame(5, kind::SETTINGS, 0, 0, &[0; 5]),
            frame(6, kind::SETTINGS, ACK, 0, &[0; 6]),
            frame(6, kind::SETTINGS, 0, 1, &[0; 6]),
            frame(7, kind::PING, 0, 0, &[0; 7]),
            frame(4, kind::GOAWAY, 0, 0, &[0; 4]),
            frame(3, kind::WINDOW_UPDATE, 0, 0, &[0; 3]),
            frame(1, kind::DATA, 0, 0, &[0]),
            frame(2, kind::DATA, PADDED, 1, &[5, 0]),
            frame(0, kind::DATA, PADDED, 1, &[]),
            frame(3, kind::HEADERS, PRIORITY_FLAG, 1, &[0; 3]),
            frame(4, kind::PRIORITY, 0, 1, &[0; 4]),
        ];
        for case in cases {
            assert!(decode(&case, DEFAULT_MAX_FRAME).is_err(), "{case:?}");
        }
        let long = frame(DEFAULT_MAX_FRAME + 1, kind::DATA, 0, 1, &[]);
        assert_eq!(
            decode(&long, DEFAULT_MAX_FRAME).unwrap_err().code,
            code::FRAME_SIZE_ERROR
        );
        let unknown = frame(2, 0xfa, 0, 0, &[0; 2]);
        assert_eq!(one(&unknown), Frame::Ignored);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_without_panicking(bytes: Vec<u8>, max in 0u32..100) {
            let mut at = 0;
            while let Ok(Some((_, used))) = decode(&bytes[at..], max) {
                proptest::prop_assert!(used >= HEAD_LEN);
                at += used;
            }
        }
    }
}
