//! `apnsd channels`: Apple's channel management API for broadcast push
//! (iOS 18 Live Activities), with an app's credentials and proxy.
//!
//! Channels live on their own hosts (`api-manage-broadcast[.sandbox].push.apple.com`,
//! ports 2196 and 2195), under `/1/apps/<bundle-id>/`: `POST channels`
//! creates one (its id comes back in `apns-channel-id`), `GET channels` and
//! `DELETE channels` name one with the `apns-channel-id` header, and `GET
//! all-channels` lists them. Building the request and reading the answer are
//! pure; [`run`] sends one request on a connection of its own.

use std::fmt;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request};

use crate::apns::http2::{self, RequestError};
use crate::config::{AppConfig, Environment};

/// What `apnsd channels` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Action {
    Create,
    List,
    Get,
    Delete,
}

/// One channel management request, its arguments checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `storage_policy`: 0 stores no message, 1 the most recent one.
    Create {
        storage_policy: u8,
    },
    List,
    Get(ChannelId),
    Delete(ChannelId),
}

/// A channel id as APNs issues it: base64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelId(String);

impl ChannelId {
    pub fn parse(text: &str) -> Result<ChannelId, ChannelError> {
        let text = text.trim();
        match base64::engine::general_purpose::STANDARD.decode(text) {
            Ok(bytes) if !bytes.is_empty() => Ok(ChannelId(text.to_owned())),
            _ => Err(ChannelError::Usage(format!(
                "--channel: {text:?} is not a base64 channel id"
            ))),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Bad arguments or configuration (exit 2).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("APNs refused: {status} {reason}")]
    Refused { status: u16, reason: String },
    #[error("APNs answered {status} without {what}")]
    Unexpected { status: u16, what: &'static str },
}

impl Command {
    /// Checks that the options fit the action.
    pub fn new(
        action: Action,
        storage_policy: Option<u8>,
        channel: Option<&str>,
    ) -> Result<Command, ChannelError> {
        let usage = |m: &str| Err(ChannelError::Usage(m.to_owned()));
        if action != Action::Create && storage_policy.is_some() {
            return usage("--storage-policy is for `channels create` only");
        }
        if matches!(action, Action::Create | Action::List) && channel.is_some() {
            return usage("--channel is for `channels get` and `channels delete` only");
        }
        let channel = || match channel {
            Some(c) => ChannelId::parse(c),
            None => Err(ChannelError::Usage("--channel ID is required".into())),
        };
        Ok(match action {
            Action::Create => match storage_policy.unwrap_or(0) {
                p @ (0 | 1) => Command::Create { storage_policy: p },
                _ => {
                    return usage(
                        "--storage-policy is 0 (no message stored) or 1 (the most recent)",
                    )
                }
            },
            Action::List => Command::List,
            Action::Get => Command::Get(channel()?),
            Action::Delete => Command::Delete(channel()?),
        })
    }

    /// The request for `topic` (the bundle id) at `authority` (`host:port`).
    pub fn request(
        &self,
        authority: &str,
        topic: &str,
    ) -> Result<(Request<()>, Bytes), http::Error> {
        let base = format!("https://{authority}/1/apps/{topic}");
        let (method, path, channel, body) = match self {
            Command::Create { storage_policy } => (
                Method::POST,
                "channels",
                None,
                serde_json::json!({
                    "message-storage-policy": storage_policy,
                    "push-type": "LiveActivity",
                })
                .to_string(),
            ),
            Command::List => (Method::GET, "all-channels", None, String::new()),
            Command::Get(id) => (Method::GET, "channels", Some(id), String::new()),
            Command::Delete(id) => (Method::DELETE, "channels", Some(id), String::new()),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{base}/{path}"));
        if let Some(id) = channel {
            req = req.header("apns-channel-id", id.as_str());
        }
        Ok((req.body(())?, Bytes::from(body)))
    }

    /// Reads APNs' answer.
    pub fn answer(
        &self,
        status: u16,
        headers: &http::HeaderMap,
        body: &[u8],
    ) -> Result<Output, ChannelError> {
        let expected = match self {
            Command::Create { .. } => 201,
            Command::List | Command::Get(_) => 200,
            Command::Delete(_) => 204,
        };
        if status != expected {
            return Err(ChannelError::Refused {
                status,
                reason: http2::reason_of(body),
            });
        }
        let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let unexpected = |what| ChannelError::Unexpected { status, what };
        match self {
            Command::Create { .. } => headers
                .get("apns-channel-id")
                .and_then(|v| v.to_str().ok())
                .map(|id| Output::Created(id.to_owned()))
                .ok_or(unexpected("an apns-channel-id header")),
            Command::List => json["channels"]
                .as_array()
                .map(|ids| {
                    Output::Channels(
                        ids.iter()
                            .filter_map(|id| id.as_str().map(str::to_owned))
                            .collect(),
                    )
                })
                .ok_or(unexpected("a \"channels\" list")),
            Command::Get(id) => json["message-storage-policy"]
                .as_u64()
                .map(|policy| Output::Channel {
                    id: id.as_str().to_owned(),
                    storage_policy: policy,
                })
                .ok_or(unexpected("a message-storage-policy")),
            Command::Delete(id) => Ok(Output::Deleted(id.as_str().to_owned())),
        }
    }
}

/// What a request achieved, printed by the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Created(String),
    Channels(Vec<String>),
    Channel { id: String, storage_policy: u64 },
    Deleted(String),
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Output::Created(id) => write!(f, "{id}"),
            Output::Channels(ids) => ids.iter().try_for_each(|id| writeln!(f, "{id}")),
            Output::Channel { id, storage_policy } => {
                write!(f, "{id} message-storage-policy={storage_policy}")
            }
            Output::Deleted(id) => write!(f, "deleted {id}"),
        }
    }
}

/// Where an app's channel management requests go: `channel_endpoint`, else
/// Apple's host for the environment; in the `simulator` environment the
/// simulator serves it on the app's HTTP/2 `endpoint`.
pub fn endpoint(app: &AppConfig) -> Option<String> {
    app.channel_endpoint
        .clone()
        .or_else(|| app.environment.channel_endpoint().map(str::to_owned))
        .or_else(|| {
            (app.environment == Environment::Simulator)
                .then(|| app.endpoint.clone())
                .flatten()
        })
}

/// Sends `command` for `app`, with its credentials and proxy.
pub async fn run(app: &AppConfig, command: &Command) -> Result<Output, ChannelError> {
    let usage = |m: String| ChannelError::Usage(format!("{}: {m}", app.name));
    if app.protocol != crate::apns::Protocol::Http2 {
        return Err(usage(
            "channels need an HTTP/2 app (protocol = \"http2\")".into(),
        ));
    }
    let addr = endpoint(app).ok_or_else(|| {
        usage("the simulator environment needs `channel_endpoint` or `endpoint`".into())
    })?;
    let mut target =
        crate::targets::http2_target(app, None).map_err(|e| ChannelError::Usage(e.to_string()))?;
    let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
    target.endpoint.server_name = crate::apns::tls::server_name(host.trim_matches(['[', ']']))
        .map_err(|e| usage(e.to_string()))?;
    target.endpoint.addr = addr;
    let (req, body) = command
        .request(&target.endpoint.addr, &target.topic)
        .map_err(|e| usage(e.to_string()))?;
    let (parts, answer) = http2::send_one(&target, req, body, app.connect_timeout).await?;
    command.answer(parts.status.as_u16(), &parts.headers, &answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_must_fit_the_action() {
        assert_eq!(
            Command::new(Action::Create, Some(1), None).unwrap(),
            Command::Create { storage_policy: 1 }
        );
        assert_eq!(
            Command::new(Action::Create, None, None).unwrap(),
            Command::Create { storage_policy: 0 }
        );
        for (action, policy, channel) in [
            (Action::Create, Some(2), None),
            (Action::List, Some(0), None),
            (Action::Get, None, None),
            (Action::Delete, None, Some("not base64!")),
            (Action::List, None, Some("dGVzdA==")),
        ] {
            assert!(
                matches!(
                    Command::new(action, policy, channel),
                    Err(ChannelError::Usage(_))
                ),
                "{action:?} {policy:?} {channel:?}"
            );
        }
    }

    #[test]
    fn requests_follow_apples_paths() {
        let id = ChannelId::parse("dHdlbnR5LWNoYXJzLWxvbmctaWQ=").unwrap();
        let cases = [
            (
                Command::Create { storage_policy: 1 },
                "POST",
                "/1/apps/com.x/channels",
                false,
            ),
            (Command::List, "GET", "/1/apps/com.x/all-channels", false),
            (
                Command::Get(id.clone()),
                "GET",
                "/1/apps/com.x/channels",
                true,
            ),
            (
                Command::Delete(id.clone()),
                "DELETE",
                "/1/apps/com.x/channels",
                true,
            ),
        ];
        for (command, method, path, names_channel) in cases {
            let (req, body) = command.request("h:2195", "com.x").unwrap();
            assert_eq!(req.method().as_str(), method);
            assert_eq!(req.uri().path(), path);
            assert_eq!(req.uri().authority().unwrap().as_str(), "h:2195");
            assert_eq!(req.headers().contains_key("apns-channel-id"), names_channel);
            if method == "POST" {
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(
                    json,
                    serde_json::json!({"message-storage-policy": 1, "push-type": "LiveActivity"})
                );
            } else {
                assert!(body.is_empty());
            }
        }
    }

    #[test]
    fn answers_are_read_or_refused() {
        let mut headers = http::HeaderMap::new();
        headers.insert("apns-channel-id", "Y2hhbm5lbA==".parse().unwrap());
        let create = Command::Create { storage_policy: 0 };
        assert_eq!(
            create.answer(201, &headers, b"").unwrap(),
            Output::Created("Y2hhbm5lbA==".into())
        );
        assert!(matches!(
            create.answer(201, &http::HeaderMap::new(), b""),
            Err(ChannelError::Unexpected { .. })
        ));
        let list = Command::List
            .answer(200, &headers, br#"{"channels":["a","b"]}"#)
            .unwrap();
        assert_eq!(list.to_string(), "a\nb\n");
        let get = Command::Get(ChannelId::parse("Y2hhbm5lbA==").unwrap());
        let refused = get
            .answer(400, &headers, br#"{"reason":"ChannelNotRegistered"}"#)
            .unwrap_err();
        assert_eq!(
            refused.to_string(),
            "APNs refused: 400 ChannelNotRegistered"
        );
    }
}
