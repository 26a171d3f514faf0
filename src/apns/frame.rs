//! Binary provider protocol frames: pure encoding and decoding, no I/O.
//!
//! Both sides live here: the client encodes notifications and decodes error
//! responses; the simulator decodes notifications (strictly, as Apple documented
//! them) and encodes error responses and feedback tuples. All integers are
//! big-endian.

use crate::token::DeviceToken;

/// Largest payload the binary interface accepts since iOS 8.
pub const MAX_PAYLOAD: usize = 2048;
/// `u8 8 | u8 status | u32 identifier`.
pub const ERROR_RESPONSE_LEN: usize = 6;
/// `u32 timestamp | u16 token_len | token`.
pub const FEEDBACK_TUPLE_LEN: usize = 4 + 2 + DeviceToken::BINARY_LEN;
/// Largest command 2 frame body we will ever need to buffer: every item once,
/// at its maximum size. Anything longer cannot be valid.
pub const MAX_FRAME_BODY: usize =
    3 + DeviceToken::BINARY_LEN + 3 + MAX_PAYLOAD + 3 + 4 + 3 + 4 + 3 + 1;

const COMMAND_SIMPLE: u8 = 0;
const COMMAND_ENHANCED: u8 = 1;
const COMMAND_ITEMS: u8 = 2;
const COMMAND_ERROR: u8 = 8;

const ITEM_TOKEN: u8 = 1;
const ITEM_PAYLOAD: u8 = 2;
const ITEM_IDENTIFIER: u8 = 3;
const ITEM_EXPIRY: u8 = 4;
const ITEM_PRIORITY: u8 = 5;

/// An APNs error-response status, as Apple's table lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    NoErrors,
    ProcessingError,
    MissingDeviceToken,
    MissingTopic,
    MissingPayload,
    InvalidTokenSize,
    InvalidTopicSize,
    InvalidPayloadSize,
    InvalidToken,
    Shutdown,
    ProtocolError,
    /// 255, and any code Apple never documented.
    Unknown,
}

/// What the sender must do with the notification an error response names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The notification will never be accepted: report it.
    Permanent,
    /// A transient failure on Apple's side: try again, counting the attempt.
    Retry,
    /// Status 10: the identifier is the last notification processed, not a failure.
    Shutdown,
}

impl Status {
    pub fn from_code(code: u8) -> Status {
        match code {
            0 => Status::NoErrors,
            1 => Status::ProcessingError,
            2 => Status::MissingDeviceToken,
            3 => Status::MissingTopic,
            4 => Status::MissingPayload,
            5 => Status::InvalidTokenSize,
            6 => Status::InvalidTopicSize,
            7 => Status::InvalidPayloadSize,
            8 => Status::InvalidToken,
            10 => Status::Shutdown,
            128 => Status::ProtocolError,
            _ => Status::Unknown,
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Status::NoErrors => 0,
            Status::ProcessingError => 1,
            Status::MissingDeviceToken => 2,
            Status::MissingTopic => 3,
            Status::MissingPayload => 4,
            Status::InvalidTokenSize => 5,
            Status::InvalidTopicSize => 6,
            Status::InvalidPayloadSize => 7,
            Status::InvalidToken => 8,
            Status::Shutdown => 10,
            Status::ProtocolError => 128,
            Status::Unknown => 255,
        }
    }

    /// The snake_case name used in `failed.<reason>` routing keys.
    pub fn reason(self) -> &'static str {
        match self {
            Status::NoErrors => "no_errors",
            Status::ProcessingError => "processing_error",
            Status::MissingDeviceToken => "missing_device_token",
            Status::MissingTopic => "missing_topic",
            Status::MissingPayload => "missing_payload",
            Status::InvalidTokenSize => "invalid_token_size",
            Status::InvalidTopicSize => "invalid_topic_size",
            Status::InvalidPayloadSize => "invalid_payload_size",
            Status::InvalidToken => "invalid_token",
            Status::Shutdown => "shutdown",
            Status::ProtocolError => "protocol_error",
            Status::Unknown => "unknown",
        }
    }

    /// 128 is a bug of ours (the frame could not be parsed): resending the same
    /// bytes would fail the same way, so it is permanent. Status 0 in an error
    /// response makes no sense; treating it as retryable never loses anything.
    pub fn disposition(self) -> Disposition {
        match self {
            Status::Shutdown => Disposition::Shutdown,
            Status::ProcessingError | Status::Unknown | Status::NoErrors => Disposition::Retry,
            _ => Disposition::Permanent,
        }
    }
}

/// The gateway's only message: `(8, status, identifier)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorResponse {
    pub status: Status,
    pub identifier: u32,
}

impl ErrorResponse {
    pub fn encode(&self) -> [u8; ERROR_RESPONSE_LEN] {
        let id = self.identifier.to_be_bytes();
        [
            COMMAND_ERROR,
            self.status.code(),
            id[0],
            id[1],
            id[2],
            id[3],
        ]
    }

    /// `None` when the bytes are not an error response (wrong command byte):
    /// the caller must then treat the connection as closed without an answer.
    pub fn decode(bytes: &[u8; ERROR_RESPONSE_LEN]) -> Option<ErrorResponse> {
        if bytes[0] != COMMAND_ERROR {
            return None;
        }
        Some(ErrorResponse {
            status: Status::from_code(bytes[1]),
            identifier: u32::from_be_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]),
        })
    }
}

/// One notification as the item-based format (command 2) carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notification<'a> {
    pub identifier: u32,
    pub token: &'a [u8],
    pub payload: &'a [u8],
    /// Unix seconds; `None` leaves the item out (APNs then uses its default).
    pub expiry: Option<u32>,
    pub priority: Option<u8>,
}

impl Notification<'_> {
    /// Bytes `encode` appends, so callers can reserve once for a batch.
    pub fn encoded_len(&self) -> usize {
        5 + (3 + 4)
            + (3 + self.token.len())
            + (3 + self.payload.len())
            + self.expiry.map_or(0, |_| 3 + 4)
            + self.priority.map_or(0, |_| 3 + 1)
    }

    /// Appends a command 2 frame. The identifier item goes first so APNs can
    /// report it even when a later item is bad. The caller guarantees
    /// `payload.len() <= MAX_PAYLOAD` (job validation does).
    pub fn encode(&self, out: &mut Vec<u8>) {
        debug_assert!(self.payload.len() <= MAX_PAYLOAD);
        let body = self.encoded_len() - 5;
        out.reserve(body + 5);
        out.push(COMMAND_ITEMS);
        out.extend_from_slice(&(body as u32).to_be_bytes());
        put_item(out, ITEM_IDENTIFIER, &self.identifier.to_be_bytes());
        put_item(out, ITEM_TOKEN, self.token);
        put_item(out, ITEM_PAYLOAD, self.payload);
        if let Some(expiry) = self.expiry {
            put_item(out, ITEM_EXPIRY, &expiry.to_be_bytes());
        }
        if let Some(priority) = self.priority {
            put_item(out, ITEM_PRIORITY, &[priority]);
        }
    }
}

fn put_item(out: &mut Vec<u8>, id: u8, data: &[u8]) {
    out.push(id);
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an enhanced-format frame (command 1), for peers that predate command 2.
pub fn encode_enhanced(
    out: &mut Vec<u8>,
    identifier: u32,
    expiry: u32,
    token: &DeviceToken,
    payload: &[u8],
) {
    out.push(COMMAND_ENHANCED);
    out.extend_from_slice(&identifier.to_be_bytes());
    out.extend_from_slice(&expiry.to_be_bytes());
    out.extend_from_slice(&(token.len() as u16).to_be_bytes());
    out.extend_from_slice(token.as_bytes());
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends a simple-format frame (command 0): no identifier, so errors cannot be attributed.
pub fn encode_simple(out: &mut Vec<u8>, token: &DeviceToken, payload: &[u8]) {
    out.push(COMMAND_SIMPLE);
    out.extend_from_slice(&(token.len() as u16).to_be_bytes());
    out.extend_from_slice(token.as_bytes());
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
}

/// A notification decoded by the gateway side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// 0, 1 or 2.
    pub command: u8,
    /// 0 for command 0 frames and for command 2 frames without item 3.
    pub identifier: u32,
    pub token: DeviceToken,
    pub payload: &'a [u8],
    pub expiry: Option<u32>,
    pub priority: Option<u8>,
}

/// Why the gateway refuses a frame: the status and identifier it answers with.
/// After answering, the gateway closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("frame refused with status {} ({}) for identifier {identifier}", status.code(), status.reason())]
pub struct Invalid {
    pub status: Status,
    pub identifier: u32,
}

/// Decodes one notification frame from the front of `buf`, validating it the way
/// Apple's gateway does. `Ok(None)` means more bytes are needed; `Ok(Some((n, frame)))`
/// consumed `n` bytes.
pub fn decode_notification(buf: &[u8]) -> Result<Option<(usize, Decoded<'_>)>, Invalid> {
    let Some(&command) = buf.first() else {
        return Ok(None);
    };
    match command {
        COMMAND_ITEMS => decode_items(buf),
        COMMAND_ENHANCED => decode_legacy(buf, true),
        COMMAND_SIMPLE => decode_legacy(buf, false),
        _ => Err(refuse(Status::ProtocolError, 0)),
    }
}

fn refuse(status: Status, identifier: u32) -> Invalid {
    Invalid { status, identifier }
}

fn be_u16(b: &[u8]) -> usize {
    u16::from_be_bytes([b[0], b[1]]) as usize
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn decode_items(buf: &[u8]) -> Result<Option<(usize, Decoded<'_>)>, Invalid> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let body_len = be_u32(&buf[1..5]) as usize;
    if body_len > MAX_FRAME_BODY {
        return Err(refuse(Status::ProtocolError, 0));
    }
    if buf.len() < 5 + body_len {
        return Ok(None);
    }
    let body = &buf[5..5 + body_len];

    let mut identifier = None;
    let mut token: Option<&[u8]> = None;
    let mut payload: Option<&[u8]> = None;
    let mut expiry = None;
    let mut priority = None;
    // Item problems are reported against the identifier when it came first, as
    // apnsd writes it; otherwise against 0, as the real gateway did.
    let mut pos = 0;
    while pos < body.len() {
        let id_so_far = identifier.unwrap_or(0);
        if body.len() - pos < 3 {
            return Err(refuse(Status::ProtocolError, id_so_far));
        }
        let item = body[pos];
        let len = be_u16(&body[pos + 1..pos + 3]);
        pos += 3;
        if body.len() - pos < len {
            return Err(refuse(Status::ProtocolError, id_so_far));
        }
        let data = &body[pos..pos + len];
        pos += len;
        let duplicate = match item {
            ITEM_TOKEN => token.replace(data).is_some(),
            ITEM_PAYLOAD => payload.replace(data).is_some(),
            ITEM_IDENTIFIER => {
                if len != 4 {
                    return Err(refuse(Status::ProtocolError, id_so_far));
                }
                identifier.replace(be_u32(data)).is_some()
            }
            ITEM_EXPIRY => {
                if len != 4 {
                    return Err(refuse(Status::ProtocolError, id_so_far));
                }
                expiry.replace(be_u32(data)).is_some()
            }
            ITEM_PRIORITY => {
                if len != 1 || !matches!(data[0], 5 | 10) {
                    return Err(refuse(Status::ProtocolError, id_so_far));
                }
                priority.replace(data[0]).is_some()
            }
            _ => return Err(refuse(Status::ProtocolError, id_so_far)),
        };
        if duplicate {
            return Err(refuse(Status::ProtocolError, id_so_far));
        }
    }
    let identifier = identifier.unwrap_or(0);
    let token = validate_token(token, identifier)?;
    let payload = validate_payload(payload, identifier)?;
    Ok(Some((
        5 + body_len,
        Decoded {
            command: COMMAND_ITEMS,
            identifier,
            token,
            payload,
            expiry,
            priority,
        },
    )))
}

fn validate_token(token: Option<&[u8]>, identifier: u32) -> Result<DeviceToken, Invalid> {
    match token {
        None | Some([]) => Err(refuse(Status::MissingDeviceToken, identifier)),
        Some(bytes) => DeviceToken::from_slice(bytes)
            .filter(|t| t.len() == DeviceToken::BINARY_LEN)
            .ok_or_else(|| refuse(Status::InvalidTokenSize, identifier)),
    }
}

fn validate_payload(payload: Option<&[u8]>, identifier: u32) -> Result<&[u8], Invalid> {
    match payload {
        None | Some([]) => Err(refuse(Status::MissingPayload, identifier)),
        Some(p) if p.len() > MAX_PAYLOAD => Err(refuse(Status::InvalidPayloadSize, identifier)),
        Some(p) => Ok(p),
    }
}

fn decode_legacy(buf: &[u8], enhanced: bool) -> Result<Option<(usize, Decoded<'_>)>, Invalid> {
    let head = if enhanced { 1 + 4 + 4 } else { 1 };
    if buf.len() < head + 2 {
        return Ok(None);
    }
    let (identifier, expiry) = if enhanced {
        (be_u32(&buf[1..5]), Some(be_u32(&buf[5..9])))
    } else {
        (0, None)
    };
    let token_len = be_u16(&buf[head..head + 2]);
    if token_len > DeviceToken::BINARY_LEN {
        // The frame cannot be delimited reliably once the length is absurd.
        return Err(refuse(Status::InvalidTokenSize, identifier));
    }
    let payload_at = head + 2 + token_len;
    if buf.len() < payload_at + 2 {
        return Ok(None);
    }
    let payload_len = be_u16(&buf[payload_at..payload_at + 2]);
    if payload_len > MAX_PAYLOAD {
        return Err(refuse(Status::InvalidPayloadSize, identifier));
    }
    let end = payload_at + 2 + payload_len;
    if buf.len() < end {
        return Ok(None);
    }
    let token = validate_token(Some(&buf[head + 2..payload_at]), identifier)?;
    let payload = validate_payload(Some(&buf[payload_at + 2..end]), identifier)?;
    Ok(Some((
        end,
        Decoded {
            command: if enhanced {
                COMMAND_ENHANCED
            } else {
                COMMAND_SIMPLE
            },
            identifier,
            token,
            payload,
            expiry,
            priority: None,
        },
    )))
}

/// One feedback-service record: the device stopped taking notifications at `timestamp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedbackTuple {
    pub timestamp: u32,
    pub token: DeviceToken,
}

impl FeedbackTuple {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&(self.token.len() as u16).to_be_bytes());
        out.extend_from_slice(self.token.as_bytes());
    }

    /// Decodes one tuple from the front of `buf`. `Ok(None)`: more bytes needed.
    /// A token length other than 32 cannot be a binary-interface token.
    pub fn decode(buf: &[u8]) -> Result<Option<(usize, FeedbackTuple)>, FeedbackError> {
        if buf.len() < 6 {
            return Ok(None);
        }
        let len = be_u16(&buf[4..6]);
        if len != DeviceToken::BINARY_LEN {
            return Err(FeedbackError::TokenLength(len));
        }
        if buf.len() < 6 + len {
            return Ok(None);
        }
        let token =
            DeviceToken::from_slice(&buf[6..6 + len]).ok_or(FeedbackError::TokenLength(len))?;
        Ok(Some((
            6 + len,
            FeedbackTuple {
                timestamp: be_u32(&buf[0..4]),
                token,
            },
        )))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FeedbackError {
    #[error("feedback tuple with a {0}-byte token (expected 32)")]
    TokenLength(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> DeviceToken {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8;
        }
        DeviceToken::from_bytes(b)
    }

    #[test]
    fn command2_layout_is_byte_exact() {
        let t = token();
        let n = Notification {
            identifier: 0x01020304,
            token: t.as_bytes(),
            payload: b"{}",
            expiry: Some(0x0a0b0c0d),
            priority: Some(10),
        };
        let mut out = Vec::new();
        n.encode(&mut out);
        let mut want = vec![2, 0, 0, 0, 58];
        want.extend_from_slice(&[3, 0, 4, 1, 2, 3, 4]);
        want.extend_from_slice(&[1, 0, 32]);
        want.extend_from_slice(t.as_bytes());
        want.extend_from_slice(&[2, 0, 2, b'{', b'}']);
        want.extend_from_slice(&[4, 0, 4, 0x0a, 0x0b, 0x0c, 0x0d]);
        want.extend_from_slice(&[5, 0, 1, 10]);
        assert_eq!(out, want);
        assert_eq!(out.len(), n.encoded_len());
    }

    #[test]
    fn command2_without_optional_items() {
        let t = token();
        let n = Notification {
            identifier: 7,
            token: t.as_bytes(),
            payload: b"{\"aps\":{}}",
            expiry: None,
            priority: None,
        };
        let mut out = Vec::new();
        n.encode(&mut out);
        assert_eq!(out.len(), n.encoded_len());
        assert_eq!(&out[..5], &[2, 0, 0, 0, (7 + 35 + 13) as u8]);
        let (used, d) = decode_notification(&out).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(d.identifier, 7);
        assert_eq!(d.token, t);
        assert_eq!(d.payload, b"{\"aps\":{}}");
        assert_eq!((d.expiry, d.priority), (None, None));
    }

    #[test]
    fn command1_and_command0_layouts() {
        let t = token();
        let mut out = Vec::new();
        encode_enhanced(&mut out, 9, 1000, &t, b"{}");
        let mut want = vec![1, 0, 0, 0, 9, 0, 0, 3, 232, 0, 32];
        want.extend_from_slice(t.as_bytes());
        want.extend_from_slice(&[0, 2, b'{', b'}']);
        assert_eq!(out, want);
        let (used, d) = decode_notification(&out).unwrap().unwrap();
        assert_eq!(
            (used, d.command, d.identifier, d.expiry),
            (out.len(), 1, 9, Some(1000))
        );

        let mut out = Vec::new();
        encode_simple(&mut out, &t, b"{}");
        let mut want = vec![0, 0, 32];
        want.extend_from_slice(t.as_bytes());
        want.extend_from_slice(&[0, 2, b'{', b'}']);
        assert_eq!(out, want);
        let (used, d) = decode_notification(&out).unwrap().unwrap();
        assert_eq!((used, d.command, d.identifier), (out.len(), 0, 0));
    }

    #[test]
    fn error_response_round_trip() {
        let r = ErrorResponse {
            status: Status::InvalidToken,
            identifier: 0xdeadbeef,
        };
        let bytes = r.encode();
        assert_eq!(bytes, [8, 8, 0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(ErrorResponse::decode(&bytes), Some(r));
        assert_eq!(ErrorResponse::decode(&[7, 8, 0, 0, 0, 1]), None);
    }

    #[test]
    fn every_status_round_trips_and_unknown_codes_fold_to_255() {
        for code in [0u8, 1, 2, 3, 4, 5, 6, 7, 8, 10, 128, 255] {
            assert_eq!(Status::from_code(code).code(), code);
        }
        assert_eq!(Status::from_code(9), Status::Unknown);
        assert_eq!(Status::InvalidToken.reason(), "invalid_token");
        assert_eq!(Status::Shutdown.disposition(), Disposition::Shutdown);
        assert_eq!(Status::ProcessingError.disposition(), Disposition::Retry);
        assert_eq!(Status::Unknown.disposition(), Disposition::Retry);
        assert_eq!(Status::InvalidToken.disposition(), Disposition::Permanent);
        assert_eq!(Status::ProtocolError.disposition(), Disposition::Permanent);
    }

    #[test]
    fn partial_frames_ask_for_more() {
        let t = token();
        let mut out = Vec::new();
        Notification {
            identifier: 1,
            token: t.as_bytes(),
            payload: b"{}",
            expiry: Some(0),
            priority: Some(5),
        }
        .encode(&mut out);
        for cut in 0..out.len() {
            assert_eq!(decode_notification(&out[..cut]), Ok(None), "cut at {cut}");
        }
    }

    fn frame(items: &[(u8, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (id, data) in items {
            put_item(&mut body, *id, data);
        }
        let mut out = vec![2];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn strict_validation_answers_apples_statuses() {
        let t = token();
        let id = 5u32.to_be_bytes();
        let big = vec![b'x'; MAX_PAYLOAD + 1];
        let cases: Vec<(Vec<u8>, Status)> = vec![
            (frame(&[(3, &id), (2, b"{}")]), Status::MissingDeviceToken),
            (
                frame(&[(3, &id), (1, &[1; 31]), (2, b"{}")]),
                Status::InvalidTokenSize,
            ),
            (
                frame(&[(3, &id), (1, t.as_bytes())]),
                Status::MissingPayload,
            ),
            (
                frame(&[(3, &id), (1, t.as_bytes()), (2, &big)]),
                Status::InvalidPayloadSize,
            ),
            (
                frame(&[(3, &id), (1, t.as_bytes()), (2, b"{}"), (5, &[7])]),
                Status::ProtocolError,
            ),
            (
                frame(&[(3, &id), (1, t.as_bytes()), (2, b"{}"), (2, b"{}")]),
                Status::ProtocolError,
            ),
            (
                frame(&[(3, &id), (9, b"x"), (1, t.as_bytes()), (2, b"{}")]),
                Status::ProtocolError,
            ),
        ];
        for (bytes, status) in cases {
            assert_eq!(
                decode_notification(&bytes),
                Err(Invalid {
                    status,
                    identifier: 5
                }),
                "{status:?}"
            );
        }
        assert_eq!(
            decode_notification(&[9, 0, 0]),
            Err(Invalid {
                status: Status::ProtocolError,
                identifier: 0
            })
        );
        let mut huge = vec![2];
        huge.extend_from_slice(&(MAX_FRAME_BODY as u32 + 1).to_be_bytes());
        assert_eq!(
            decode_notification(&huge),
            Err(Invalid {
                status: Status::ProtocolError,
                identifier: 0
            })
        );
    }

    #[test]
    fn feedback_tuple_round_trip() {
        let f = FeedbackTuple {
            timestamp: 1_700_000_000,
            token: token(),
        };
        let mut out = Vec::new();
        f.encode(&mut out);
        assert_eq!(out.len(), FEEDBACK_TUPLE_LEN);
        assert_eq!(&out[..6], &[0x65, 0x53, 0xf1, 0x00, 0, 32]);
        assert_eq!(FeedbackTuple::decode(&out), Ok(Some((out.len(), f))));
        assert_eq!(FeedbackTuple::decode(&out[..10]), Ok(None));
        out[5] = 31;
        assert_eq!(
            FeedbackTuple::decode(&out),
            Err(FeedbackError::TokenLength(31))
        );
    }
}
