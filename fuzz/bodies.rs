//! The fuzz bodies: each takes arbitrary bytes and panics only on a bug.
//! One source, two drivers: the cargo-fuzz targets in `fuzz_targets/` (nightly,
//! `scripts/fuzz.sh`) and the proptest drivers of `tests/fuzz.rs` (stable, CI).

use apnsd::apns::frame::{
    decode_notification, ErrorResponse, FeedbackTuple, Notification, ERROR_RESPONSE_LEN,
    MAX_PAYLOAD,
};
use apnsd::apns::Protocol;
use apnsd::job::Job;

/// Decoding a job never panics; a job it accepts that fits the binary
/// interface is sendable there, and every job survives the trip through the
/// retry queue (`encode`, then `decode`) unchanged.
pub fn job_decoder(data: &[u8]) {
    let Ok(job) = Job::decode(data, Some("message-id")) else {
        return;
    };
    assert!(!job.tokens.is_empty());
    if Protocol::Binary.check(&job).is_ok() {
        assert!(job.payload.len() <= MAX_PAYLOAD);
        assert!(job.tokens.iter().all(|t| t.len() == 32));
    }
    let again = Job::decode(&job.encode(), None).expect("a re-encoded job decodes");
    assert_eq!(again, job);
}

/// The gateway-side frame decoder never panics or over-reads, and whatever it
/// accepts encodes back to a frame that decodes to the same notification.
/// Error responses and feedback tuples are stable under decode and encode.
pub fn frame_codec(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some((used, frame))) = decode_notification(rest) {
        assert!(used > 0 && used <= rest.len());
        assert!(frame.payload.len() <= MAX_PAYLOAD);
        let mut out = Vec::new();
        let sent = Notification {
            identifier: frame.identifier,
            token: frame.token.as_bytes(),
            payload: frame.payload,
            expiry: frame.expiry,
            priority: frame.priority,
        };
        sent.encode(&mut out);
        assert_eq!(out.len(), sent.encoded_len());
        let (n, back) = decode_notification(&out)
            .expect("a frame apnsd writes is valid")
            .expect("and complete");
        assert_eq!(n, out.len());
        let same = (
            back.identifier,
            back.token,
            back.payload,
            back.expiry,
            back.priority,
        );
        let want = (
            frame.identifier,
            frame.token,
            frame.payload,
            frame.expiry,
            frame.priority,
        );
        assert_eq!(same, want);
        rest = &rest[used..];
    }
    if let Some(six) = data.first_chunk::<ERROR_RESPONSE_LEN>() {
        if let Some(resp) = ErrorResponse::decode(six) {
            assert_eq!(ErrorResponse::decode(&resp.encode()), Some(resp));
        }
    }
    let mut rest = data;
    while let Ok(Some((used, tuple))) = FeedbackTuple::decode(rest) {
        assert!(used > 0 && used <= rest.len());
        let mut out = Vec::new();
        tuple.encode(&mut out);
        assert_eq!(FeedbackTuple::decode(&out), Ok(Some((out.len(), tuple))));
        rest = &rest[used..];
    }
}

/// The proxy's answer is read without panicking or claiming more bytes than
/// it was given, and a complete answer reads the same from exactly its own
/// bytes; a proxy URI parses without panicking and its printed forms never
/// carry the password.
pub fn proxy_reply(data: &[u8]) {
    use apnsd::proxy::{parse_reply, Proxy, Reply};
    if let Ok(Reply::Complete { status, len }) = parse_reply(data) {
        assert!(len <= data.len());
        assert!((100..600).contains(&status));
        assert_eq!(
            parse_reply(&data[..len]),
            Ok(Reply::Complete { status, len })
        );
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(proxy) = Proxy::parse(text) {
            let shown = format!("{proxy} {proxy:?}");
            let secret = "fuzz-secret-password";
            if text.contains(secret) {
                assert!(!shown.contains(secret), "{shown}");
            }
        }
    }
}
