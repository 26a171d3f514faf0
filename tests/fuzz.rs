//! The fuzz bodies of `fuzz/` under stable Rust: proptest feeds them arbitrary
//! bytes and inputs shaped like real jobs and frames, so every CI run
//! exercises what `scripts/fuzz.sh` fuzzes for longer on nightly.

#[path = "../fuzz/bodies.rs"]
mod bodies;

use proptest::prelude::*;
use serde_json::{json, Value};

/// JSON values of every kind, small enough to stay fast.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "[ -~]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Token texts: mostly valid ones in the forms producers use, and near misses.
fn token_text() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => "[0-9a-f]{64}".prop_map(Value::from),
        2 => "[0-9A-F]{64}".prop_map(|t| Value::from(format!("<{t}>"))),
        1 => "[0-9a-fA-F ]{0,70}".prop_map(Value::from),
        1 => any_json(),
    ]
}

/// `Some` most of the time when `likely`, rarely otherwise.
fn maybe<T: std::fmt::Debug>(
    likely: bool,
    s: impl Strategy<Value = T>,
) -> impl Strategy<Value = Option<T>> {
    let p = if likely { 0.9 } else { 0.15 };
    prop::option::weighted(p, s)
}

/// Objects shaped like jobs, every field sometimes right and sometimes not.
fn job_like() -> impl Strategy<Value = Vec<u8>> {
    let payload = prop_oneof![
        6 => ("[ -~]{0,40}", any_json()).prop_map(|(a, extra)| json!({"aps": {"alert": a}, "x": extra})),
        1 => (0usize..2100).prop_map(|n| json!({"aps": {"alert": "x".repeat(n)}})),
        1 => any_json(),
    ];
    let priority = prop_oneof![4 => Just(json!(10)), 4 => Just(json!(5)), 1 => any_json()];
    let expiry = prop_oneof![4 => any::<u32>().prop_map(Value::from), 1 => any_json()];
    let text = prop_oneof![4 => "[a-z]{1,8}".prop_map(Value::from), 1 => any_json()];
    (
        maybe(true, token_text()),
        maybe(false, prop::collection::vec(token_text(), 0..4)),
        maybe(true, payload),
        maybe(true, text.clone()),
        maybe(true, priority),
        maybe(true, expiry),
        maybe(false, text),
    )
        .prop_map(|(token, tokens, payload, id, priority, expiry, app)| {
            let mut map = serde_json::Map::new();
            for (key, value) in [
                ("token", token),
                ("tokens", tokens.map(Value::from)),
                ("payload", payload),
                ("id", id),
                ("priority", priority),
                ("expiry", expiry),
                ("app", app),
            ] {
                if let Some(v) = value {
                    map.insert(key.into(), v);
                }
            }
            serde_json::to_vec(&Value::Object(map)).unwrap()
        })
}

fn fixed(id: u8, len: usize) -> impl Strategy<Value = (u8, Vec<u8>)> {
    prop::collection::vec(any::<u8>(), len).prop_map(move |d| (id, d))
}

fn payload_item() -> impl Strategy<Value = (u8, Vec<u8>)> {
    "[ -~]{0,60}".prop_map(|a| (2, format!(r#"{{"aps":{{"alert":{a:?}}}}}"#).into_bytes()))
}

/// One item of a command 2 frame: mostly well-formed, sometimes not.
fn item() -> impl Strategy<Value = (u8, Vec<u8>)> {
    prop_oneof![
        2 => fixed(1, 32),
        2 => payload_item(),
        2 => fixed(3, 4),
        2 => fixed(4, 4),
        2 => prop::sample::select(vec![5u8, 10, 0, 255]).prop_map(|p| (5, vec![p])),
        1 => (any::<u8>(), prop::collection::vec(any::<u8>(), 0..40)),
    ]
}

/// The items of one frame in any order: usually the required ones plus a few more.
fn items() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
    let required = (fixed(3, 4), fixed(1, 32), payload_item()).prop_map(|(a, b, c)| vec![a, b, c]);
    let extra = prop::collection::vec(item(), 0..3);
    (required, extra, prop::bool::weighted(0.8)).prop_flat_map(|(mut items, extra, keep)| {
        if !keep {
            items.clear();
        }
        items.extend(extra);
        Just(items).prop_shuffle()
    })
}

/// Byte streams of frames: command 2 with items in any order, and the other commands.
fn frames_like() -> impl Strategy<Value = Vec<u8>> {
    let command = prop_oneof![8 => Just(2u8), 1 => 0u8..4, 1 => any::<u8>()];
    let frame = (command, items()).prop_map(|(command, items)| {
        let mut body = Vec::new();
        for (id, data) in items {
            body.push(id);
            body.extend_from_slice(&(data.len() as u16).to_be_bytes());
            body.extend_from_slice(&data);
        }
        let mut out = vec![command];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    });
    prop::collection::vec(frame, 1..4).prop_map(|frames| frames.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn job_decoder_on_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
        bodies::job_decoder(&data);
    }

    #[test]
    fn job_decoder_on_job_like_json(data in job_like()) {
        bodies::job_decoder(&data);
    }

    #[test]
    fn frame_codec_on_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        bodies::frame_codec(&data);
    }

    #[test]
    fn frame_codec_on_frame_like_bytes(data in frames_like()) {
        bodies::frame_codec(&data);
    }

    #[test]
    fn proxy_reply_on_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
        bodies::proxy_reply(&data);
    }

    #[test]
    fn proxy_reply_on_reply_like_text(
        data in "(HTTP/1\\.[01] [0-9]{3}[ -~]{0,12}\r\n([A-Za-z-]{1,8}: [ -~]{0,8}\r\n){0,3}(\r\n)?|http://([a-z]{1,5}(:(fuzz-secret-password|[a-z%0-9]{0,6}))?@)?[a-z.]{1,8}(:[0-9]{1,5})?/?)"
    ) {
        bodies::proxy_reply(data.as_bytes());
    }
}
