//! Apple's channel management API for broadcast push (iOS 18 Live
//! Activities), as the simulator serves it on its HTTP/2 port: create, read,
//! list and delete an app's channels, with Apple's errors for a missing,
//! malformed or unknown channel id; and the broadcast push itself
//! (`POST /4/broadcasts/apps/<bundle-id>`), recorded per channel.

use std::collections::BTreeMap;
use std::sync::Mutex;

use base64::Engine;
use http::{HeaderMap, Method};

use crate::apns::http2::ApnsReason;

/// Every channel management path starts so: `/1/apps/<bundle-id>/...`.
pub(super) const PATH: &str = "/1/apps/";

/// A broadcast push's path: `/4/broadcasts/apps/<bundle-id>`.
pub(super) const BROADCAST_PATH: &str = "/4/broadcasts/apps/";

/// Largest broadcast payload APNs takes (a Live Activity update).
const MAX_BROADCAST_PAYLOAD: usize = 5120;

/// The channels of every app (bundle id → channel id → storage policy),
/// and the broadcasts accepted.
#[derive(Default)]
pub(crate) struct Channels {
    by_topic: Mutex<BTreeMap<String, BTreeMap<String, u8>>>,
    broadcasts: Mutex<Vec<Broadcast>>,
}

/// A broadcast push the simulator accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broadcast {
    pub topic: String,
    pub channel: String,
    pub payload: Vec<u8>,
}

/// An answer: status, the `apns-channel-id` header of a created channel, a JSON body.
#[derive(Debug, PartialEq)]
pub(super) struct Answer {
    status: u16,
    channel_id: Option<String>,
    body: Option<serde_json::Value>,
}

impl Answer {
    pub(super) fn refused(status: u16, reason: ApnsReason) -> Answer {
        Answer {
            status,
            channel_id: None,
            body: Some(serde_json::json!({ "reason": reason.text() })),
        }
    }

    fn ok(status: u16, body: Option<serde_json::Value>) -> Answer {
        Answer {
            status,
            channel_id: None,
            body,
        }
    }

    /// Status, `apns-channel-id` and body, for the connection to write.
    pub(super) fn into_parts(self) -> (u16, Option<String>, Option<Vec<u8>>) {
        let body = self.body.map(|json| json.to_string().into_bytes());
        (self.status, self.channel_id, body)
    }
}

impl Channels {
    /// Answers one channel management request (its credentials already checked).
    pub(super) fn handle(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Answer {
        let Some((topic, what)) = path.strip_prefix(PATH).and_then(|r| r.split_once('/')) else {
            return Answer::refused(404, ApnsReason::BadPath);
        };
        let mut all = self.by_topic.lock().unwrap_or_else(|e| e.into_inner());
        let channels = all.entry(topic.to_owned()).or_default();
        match (what, method) {
            ("channels", &Method::POST) => {
                let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
                let policy = match json["message-storage-policy"].as_u64() {
                    Some(p @ (0 | 1)) => p as u8,
                    _ => return Answer::refused(400, ApnsReason::BadMessageStoragePolicy),
                };
                if json["push-type"] != "LiveActivity" {
                    return Answer::refused(400, ApnsReason::InvalidPushType);
                }
                let id =
                    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
                channels.insert(id.clone(), policy);
                Answer {
                    status: 201,
                    channel_id: Some(id),
                    body: None,
                }
            }
            ("channels", &Method::GET) => match known(channels, headers) {
                Ok((_, policy)) => Answer::ok(
                    200,
                    Some(serde_json::json!({
                        "message-storage-policy": policy,
                        "push-type": "LiveActivity",
                    })),
                ),
                Err(refused) => refused,
            },
            ("channels", &Method::DELETE) => match known(channels, headers) {
                Ok((id, _)) => {
                    channels.remove(&id);
                    Answer::ok(204, None)
                }
                Err(refused) => refused,
            },
            ("all-channels", &Method::GET) => Answer::ok(
                200,
                Some(serde_json::json!({ "channels": channels.keys().collect::<Vec<_>>() })),
            ),
            ("channels" | "all-channels", _) => Answer::refused(405, ApnsReason::MethodNotAllowed),
            _ => Answer::refused(404, ApnsReason::BadPath),
        }
    }
}

impl Channels {
    /// Answers one broadcast push (its credentials already checked), as
    /// Apple's "Sending broadcast push notification requests to APNs"
    /// describes it: a known channel, push type `liveactivity`, priority and
    /// expiration both given, no expiration for a channel that stores no
    /// message, a payload of at most 5120 bytes.
    pub(super) fn broadcast(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        payload: &[u8],
    ) -> Answer {
        let Some(topic) = path
            .strip_prefix(BROADCAST_PATH)
            .filter(|t| !t.is_empty() && !t.contains('/'))
        else {
            return Answer::refused(404, ApnsReason::BadPath);
        };
        if method != Method::POST {
            return Answer::refused(405, ApnsReason::MethodNotAllowed);
        }
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let mut all = self.by_topic.lock().unwrap_or_else(|e| e.into_inner());
        let (channel, policy) = match known(all.entry(topic.to_owned()).or_default(), headers) {
            Ok(known) => known,
            Err(refused) => return refused,
        };
        drop(all);
        if header("apns-push-type") != Some("liveactivity") {
            return Answer::refused(400, ApnsReason::InvalidPushType);
        }
        if !matches!(header("apns-priority"), Some("5" | "10")) {
            return Answer::refused(400, ApnsReason::BadPriority);
        }
        match header("apns-expiration").map(str::parse::<u64>) {
            Some(Ok(0)) => {}
            Some(Ok(_)) if policy == 1 => {}
            _ => return Answer::refused(400, ApnsReason::BadExpirationDate),
        }
        if payload.len() > MAX_BROADCAST_PAYLOAD {
            return Answer::refused(413, ApnsReason::PayloadTooLarge);
        }
        let mut broadcasts = self.broadcasts.lock().unwrap_or_else(|e| e.into_inner());
        broadcasts.push(Broadcast {
            topic: topic.to_owned(),
            channel,
            payload: payload.to_vec(),
        });
        Answer::ok(200, None)
    }

    /// The broadcasts accepted so far, oldest first.
    pub(super) fn broadcasts(&self) -> Vec<Broadcast> {
        self.broadcasts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The request's `apns-channel-id`, if it names one of `channels`.
fn known(channels: &BTreeMap<String, u8>, headers: &HeaderMap) -> Result<(String, u8), Answer> {
    let Some(id) = headers.get("apns-channel-id") else {
        return Err(Answer::refused(400, ApnsReason::MissingChannelId));
    };
    let id = id.to_str().unwrap_or_default();
    if base64::engine::general_purpose::STANDARD
        .decode(id)
        .is_err()
        || id.is_empty()
    {
        return Err(Answer::refused(400, ApnsReason::BadChannelId));
    }
    channels
        .get(id)
        .map(|policy| (id.to_owned(), *policy))
        .ok_or_else(|| Answer::refused(400, ApnsReason::ChannelNotRegistered))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_id(id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("apns-channel-id", id.parse().unwrap());
        h
    }

    #[test]
    fn channels_live_from_create_to_delete() {
        let store = Channels::default();
        let path = "/1/apps/com.example.app/channels";
        let created = store.handle(
            &Method::POST,
            path,
            &HeaderMap::new(),
            br#"{"message-storage-policy": 1, "push-type": "LiveActivity"}"#,
        );
        assert_eq!(created.status, 201);
        let id = created.channel_id.unwrap();
        let read = store.handle(&Method::GET, path, &with_id(&id), b"");
        assert_eq!(read.status, 200);
        assert_eq!(read.body.unwrap()["message-storage-policy"], 1);
        let all = store.handle(
            &Method::GET,
            "/1/apps/com.example.app/all-channels",
            &HeaderMap::new(),
            b"",
        );
        assert_eq!(all.body.unwrap()["channels"], serde_json::json!([id]));
        let other = store.handle(
            &Method::GET,
            "/1/apps/com.other/all-channels",
            &HeaderMap::new(),
            b"",
        );
        assert_eq!(other.body.unwrap()["channels"], serde_json::json!([]));
        assert_eq!(
            store
                .handle(&Method::DELETE, path, &with_id(&id), b"")
                .status,
            204
        );
        assert_eq!(
            store.handle(&Method::GET, path, &with_id(&id), b""),
            Answer::refused(400, ApnsReason::ChannelNotRegistered)
        );
    }

    #[test]
    fn broadcasts_follow_apples_rules() {
        let channels = Channels::default();
        let create = |policy: u8| {
            let body =
                format!(r#"{{"message-storage-policy":{policy},"push-type":"LiveActivity"}}"#);
            let created = channels.handle(
                &Method::POST,
                "/1/apps/com.x/channels",
                &HeaderMap::new(),
                body.as_bytes(),
            );
            created.channel_id.expect("created")
        };
        let (none, latest) = (create(0), create(1));
        let send = |id: &str, pairs: &[(&'static str, &'static str)], payload: &[u8]| {
            let mut headers = with_id(id);
            for (k, v) in pairs {
                headers.insert(*k, v.parse().unwrap());
            }
            channels
                .broadcast(&Method::POST, "/4/broadcasts/apps/com.x", &headers, payload)
                .status
        };
        let good = [
            ("apns-push-type", "liveactivity"),
            ("apns-priority", "10"),
            ("apns-expiration", "0"),
        ];
        let update = br#"{"aps":{"event":"update","timestamp":1}}"#;
        assert_eq!(send(&none, &good, update), 200);
        let later = [
            ("apns-push-type", "liveactivity"),
            ("apns-priority", "5"),
            ("apns-expiration", "1900000000"),
        ];
        assert_eq!(send(&latest, &later, update), 200);
        assert_eq!(
            send(&none, &later, update),
            400,
            "no storage, no expiration"
        );
        assert_eq!(
            send(&none, &good[..2], update),
            400,
            "expiration is required"
        );
        assert_eq!(
            send(&none, &[good[0], good[2]], update),
            400,
            "priority is required"
        );
        assert_eq!(
            send(
                &none,
                &[("apns-push-type", "alert"), good[1], good[2]],
                update
            ),
            400
        );
        assert_eq!(send(&none, &good, &[b' '; 5121]), 413);
        assert_eq!(
            send("dW5rbm93bg==", &good, update),
            400,
            "an unknown channel"
        );
        let accepted = channels.broadcasts();
        assert_eq!(
            accepted
                .iter()
                .map(|b| b.channel.as_str())
                .collect::<Vec<_>>(),
            [none.as_str(), latest.as_str()]
        );
        assert!(accepted
            .iter()
            .all(|b| b.topic == "com.x" && b.payload == update));
    }

    #[test]
    fn bad_requests_get_apples_reasons() {
        let store = Channels::default();
        let path = "/1/apps/com.example.app/channels";
        for (method, headers, body, want) in [
            (
                Method::POST,
                HeaderMap::new(),
                &br#"{"message-storage-policy": 2, "push-type": "LiveActivity"}"#[..],
                ApnsReason::BadMessageStoragePolicy,
            ),
            (
                Method::POST,
                HeaderMap::new(),
                br#"{"message-storage-policy": 0, "push-type": "alert"}"#,
                ApnsReason::InvalidPushType,
            ),
            (
                Method::GET,
                HeaderMap::new(),
                b"",
                ApnsReason::MissingChannelId,
            ),
            (
                Method::DELETE,
                with_id("not base64!"),
                b"",
                ApnsReason::BadChannelId,
            ),
        ] {
            let answer = store.handle(&method, path, &headers, body);
            assert_eq!(answer, Answer::refused(400, want));
        }
        assert_eq!(
            store
                .handle(&Method::GET, "/1/apps/x", &HeaderMap::new(), b"")
                .status,
            404
        );
        assert_eq!(
            store
                .handle(&Method::PUT, path, &HeaderMap::new(), b"")
                .status,
            405
        );
    }
}
