//! What the simulator answers a request, and how an answer's header block is
//! written: `:status` from HPACK's static table where it has the code, the
//! other fields as literals that never enter the dynamic table, so the
//! encoder keeps no state and a 200 costs a dozen bytes.

use std::io::Write;

use crate::apns::http2::{frame, hpack, ApnsReason};

/// A request's answer, kept while a response delay runs.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Reply {
    Accepted,
    /// Apple's JSON body with `reason`, and `timestamp` (ms) for a 410.
    Refused {
        status: u16,
        reason: ApnsReason,
        timestamp: Option<u64>,
    },
    /// A channel management or broadcast answer.
    Channel {
        status: u16,
        channel_id: Option<String>,
        body: Option<Vec<u8>>,
    },
}

impl Reply {
    pub(super) fn status(&self) -> u16 {
        match self {
            Reply::Accepted => 200,
            Reply::Refused { status, .. } | Reply::Channel { status, .. } => *status,
        }
    }

    /// Appends the body to `out` (nothing for an answer without one).
    pub(super) fn body(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Accepted => {}
            Reply::Refused {
                reason, timestamp, ..
            } => {
                // Apple's reasons are plain identifiers: nothing to escape.
                let _ = write!(out, r#"{{"reason":"{}""#, reason.text());
                if let Some(ms) = timestamp {
                    let _ = write!(out, r#","timestamp":{ms}"#);
                }
                out.push(b'}');
            }
            Reply::Channel { body, .. } => out.extend_from_slice(body.as_deref().unwrap_or(&[])),
        }
    }
}

/// `:status` values the static table holds (RFC 7541 Appendix A, 8–14).
fn status_index(status: u16) -> Option<usize> {
    Some(match status {
        200 => 8,
        204 => 9,
        206 => 10,
        304 => 11,
        400 => 12,
        404 => 13,
        500 => 14,
        _ => return None,
    })
}

/// Appends the HEADERS (and, for a long block, CONTINUATION) frames of an
/// answer on `stream`: its status, then `fields` (lower-case names).
pub(super) fn head(
    out: &mut Vec<u8>,
    stream: u32,
    status: u16,
    fields: &[(&[u8], &[u8])],
    end_stream: bool,
    max_frame: u32,
) {
    let mark = frame::begin_headers(out, stream, end_stream);
    match status_index(status) {
        Some(index) => hpack::indexed(out, index),
        None => {
            let digits = [
                b'0' + (status / 100 % 10) as u8,
                b'0' + (status / 10 % 10) as u8,
                b'0' + (status % 10) as u8,
            ];
            hpack::field(out, 8, &digits);
        }
    }
    for (name, value) in fields {
        hpack::named(out, name, value);
    }
    frame::end_headers(out, mark, max_frame);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apns::http2::frame::Frame;

    fn decoded(out: &[u8]) -> (bool, Vec<(String, String)>) {
        let Ok(Some((
            Frame::Headers {
                end_stream, block, ..
            },
            _,
        ))) = frame::decode(out, frame::DEFAULT_MAX_FRAME)
        else {
            panic!("not a HEADERS frame: {out:?}");
        };
        let mut fields = Vec::new();
        hpack::Decoder::default()
            .decode(block, |n, v| {
                fields.push((
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                ))
            })
            .unwrap();
        (end_stream, fields)
    }

    #[test]
    fn statuses_use_the_static_table_where_it_has_them() {
        for (status, first) in [(200, 0x88), (400, 0x8c), (404, 0x8d), (500, 0x8e)] {
            let mut out = Vec::new();
            head(&mut out, 1, status, &[], true, frame::DEFAULT_MAX_FRAME);
            assert_eq!(out[frame::HEAD_LEN..], [first]);
        }
        let mut out = Vec::new();
        let id: &[u8] = b"0f6a2f2c-1b9e-8c3d-9a4b-123456789abc";
        head(
            &mut out,
            3,
            410,
            &[(b"apns-id", id)],
            false,
            frame::DEFAULT_MAX_FRAME,
        );
        let (end_stream, fields) = decoded(&out);
        assert!(!end_stream);
        assert_eq!(
            fields,
            [
                (":status".to_owned(), "410".to_owned()),
                (
                    "apns-id".to_owned(),
                    String::from_utf8_lossy(id).into_owned()
                )
            ]
        );
    }

    #[test]
    fn refusals_carry_apples_json() {
        let mut body = Vec::new();
        let gone = Reply::Refused {
            status: 410,
            reason: ApnsReason::Unregistered,
            timestamp: Some(1_700_000_000_123),
        };
        gone.body(&mut body);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"reason": "Unregistered", "timestamp": 1_700_000_000_123u64})
        );
        body.clear();
        Reply::Refused {
            status: 400,
            reason: ApnsReason::BadDeviceToken,
            timestamp: None,
        }
        .body(&mut body);
        assert_eq!(body, br#"{"reason":"BadDeviceToken"}"#);
        body.clear();
        Reply::Accepted.body(&mut body);
        assert!(body.is_empty());
        assert_eq!(gone.status(), 410);
    }
}
