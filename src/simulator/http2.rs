//! The simulated HTTP/2 provider API: TLS with ALPN `h2`, a client
//! certificate or a provider token (ES256, checked against the simulator's
//! key), Apple's request rules, an answer per stream, and the faults of
//! [`Faults`](super::Faults): answers by token rule, GOAWAY after N,
//! a low stream limit, stalls (reads or flow control), expired tokens,
//! refused streams; and Apple's round trip
//! ([`SimulatorOptions::delay`](super::SimulatorOptions::delay)), waited out
//! in each stream's own task so the connection carries on.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

use super::{channels, Accepted, Faults, Http2Request, Shared, SIM_KEY_ID, SIM_TEAM_ID};
use crate::apns::http2::{jwt, ApnsReason, MAX_PAYLOAD, MAX_VOIP_PAYLOAD};
use crate::job::DeviceToken;

/// Apple's limit on a provider token's age.
const TOKEN_MAX_AGE: Duration = Duration::from_secs(3600);
/// Bodies beyond this are not read further (the limit check has its answer).
const MAX_READ: usize = 64 * 1024;

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
    let mut builder = h2::server::Builder::new();
    let faults = shared.faults();
    if let Some(n) = faults.max_streams {
        builder.max_concurrent_streams(n);
    }
    if let Some(window) = faults.stream_window {
        builder.initial_window_size(window);
    }
    let Ok(mut conn) = builder.handshake::<_, Bytes>(tls).await else {
        return;
    };
    let goaway = Arc::new(Notify::new());
    let mut going_away = false;
    loop {
        if stalled(&shared) {
            // Stop driving the connection: no answers, no PING replies.
            return std::future::pending().await;
        }
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    let stream = Stream {
                        shared: shared.clone(),
                        certified,
                        client_topic: client_topic.clone(),
                        number,
                        goaway: goaway.clone(),
                    };
                    tokio::spawn(stream.handle(req, respond));
                }
                _ => return,
            },
            _ = goaway.notified(), if !going_away => {
                // GOAWAY: streams already received are answered; the client
                // must resend anything it sent after them elsewhere.
                going_away = true;
                conn.graceful_shutdown();
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

fn stalled(shared: &Shared) -> bool {
    shared
        .faults()
        .stall_after
        .is_some_and(|n| shared.accepted_count.load(Ordering::Relaxed) >= n)
}

/// One request stream and what it needs to answer.
struct Stream {
    shared: Arc<Shared>,
    certified: bool,
    client_topic: Option<Arc<str>>,
    number: u64,
    goaway: Arc<Notify>,
}

impl Stream {
    async fn handle(self, req: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
        let (parts, mut body) = req.into_parts();
        let faults = self.shared.faults();
        if !faults.refuse_streams.is_empty() {
            let token = parts.uri.path().strip_prefix("/3/device/");
            if token
                .and_then(|hex| DeviceToken::parse(hex).ok())
                .is_some_and(|t| faults.refuses_stream(&t))
            {
                self.shared.streams_refused.fetch_add(1, Ordering::Relaxed);
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                return;
            }
        }
        let mut payload = Vec::new();
        while let Some(chunk) = body.data().await {
            let Ok(chunk) = chunk else { return };
            let _ = body.flow_control().release_capacity(chunk.len());
            if payload.len() < MAX_READ {
                payload.extend_from_slice(&chunk);
            }
        }
        let delay = self.shared.delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let token_rank = match parts.headers.get("authorization") {
            Some(v) if !self.certified => {
                v.to_str().ok().map(|t| self.shared.provider_token_rank(t))
            }
            _ => None,
        };
        let now = SystemTime::now();
        let path = parts.uri.path();
        if path.starts_with(channels::PATH) || path.starts_with(channels::BROADCAST_PATH) {
            let auth = authorize(
                &parts.headers,
                self.certified,
                &faults,
                token_rank,
                self.shared.token_public_key.as_slice(),
                now,
            );
            let answer = match auth {
                Ok(()) if path.starts_with(channels::BROADCAST_PATH) => self
                    .shared
                    .channels
                    .broadcast(&parts.method, path, &parts.headers, &payload),
                Ok(()) => {
                    self.shared
                        .channels
                        .handle(&parts.method, path, &parts.headers, &payload)
                }
                Err((status, reason)) => channels::Answer::refused(status, reason),
            };
            answer.send(respond);
            return;
        }
        let apns_id = parts.headers.get("apns-id").cloned();
        let answer = judge(
            &parts.method,
            parts.uri.path(),
            &parts.headers,
            &payload,
            self.certified,
            &faults,
            token_rank,
            self.shared.token_public_key.as_slice(),
            now,
        );
        let response = Response::builder();
        let response = match apns_id {
            Some(id) => response.header("apns-id", id),
            None => response,
        };
        match answer {
            Ok(request) => {
                let arrived = self.shared.meter.arrived();
                if self.shared.stamps {
                    self.shared.meter.time(&request.token, arrived);
                }
                let count = self.shared.accepted_count.fetch_add(1, Ordering::Relaxed) + 1;
                if !self.shared.sink {
                    self.shared.record_accepted(vec![Accepted {
                        token: request.token,
                        payload,
                        identifier: respond.stream_id().as_u32(),
                        expiry: request.expiry,
                        priority: request.priority,
                        connection: self.number,
                        client_topic: self.client_topic.clone(),
                        http2: Some(request.meta),
                    }]);
                }
                if let Ok(ok) = response.status(StatusCode::OK).body(()) {
                    let _ = respond.send_response(ok, true);
                }
                if faults
                    .goaway_every
                    .is_some_and(|n| n > 0 && count.is_multiple_of(n))
                {
                    self.goaway.notify_one();
                }
            }
            Err(refusal) => {
                if let Some(token) = refusal.token {
                    self.shared
                        .record_http2_refusal(token, refusal.status, refusal.reason);
                }
                let mut json = serde_json::json!({"reason": refusal.reason.text()});
                if refusal.status == 410 {
                    let ms = now
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    json["timestamp"] = ms.into();
                }
                let Ok(head) = response.status(refusal.status).body(()) else {
                    return;
                };
                if let Ok(mut stream) = respond.send_response(head, false) {
                    let _ = stream.send_data(Bytes::from(json.to_string()), true);
                }
            }
        }
    }
}

/// An accepted request, as far as the record goes.
struct Valid {
    token: DeviceToken,
    expiry: Option<u32>,
    priority: Option<u8>,
    meta: Http2Request,
}

struct Refusal {
    token: Option<DeviceToken>,
    status: u16,
    reason: ApnsReason,
}

/// Apple's rules for one request, in the order APNs is known to apply them.
#[allow(clippy::too_many_arguments)]
fn judge(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    payload: &[u8],
    certified: bool,
    faults: &Faults,
    token_rank: Option<usize>,
    public_key: &[u8],
    now: SystemTime,
) -> Result<Valid, Refusal> {
    let refuse = |token, status, reason| Refusal {
        token,
        status,
        reason,
    };
    if method != Method::POST {
        return Err(refuse(None, 405, ApnsReason::MethodNotAllowed));
    }
    let Some(hex) = path.strip_prefix("/3/device/") else {
        return Err(refuse(None, 404, ApnsReason::BadPath));
    };
    let Ok(token) = DeviceToken::parse(hex) else {
        return Err(refuse(None, 400, ApnsReason::BadDeviceToken));
    };
    // No device has it: APNs answers BadDeviceToken once the credentials
    // pass, which `apnsd check --connect` relies on.
    let no_device = hex == crate::apns::http2::PROBE_TOKEN;
    let some = Some(token);
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let token_auth = !certified;
    authorize(headers, certified, faults, token_rank, public_key, now)
        .map_err(|(status, reason)| refuse(some, status, reason))?;
    let Some(topic) = header("apns-topic").filter(|t| !t.is_empty()) else {
        return Err(refuse(some, 400, ApnsReason::MissingTopic));
    };
    let push_type = header("apns-push-type");
    if push_type.is_some_and(|t| t.is_empty() || !t.bytes().all(|b| b.is_ascii_lowercase())) {
        return Err(refuse(some, 400, ApnsReason::InvalidPushType));
    }
    let priority = match header("apns-priority") {
        None => None,
        Some("10") => Some(10),
        Some("5") => Some(5),
        Some("1") => Some(1),
        Some(_) => return Err(refuse(some, 400, ApnsReason::BadPriority)),
    };
    let expiry = match header("apns-expiration").map(str::parse::<u32>) {
        None => None,
        Some(Ok(e)) => Some(e),
        Some(Err(_)) => return Err(refuse(some, 400, ApnsReason::BadExpirationDate)),
    };
    let apns_id = header("apns-id");
    if apns_id.is_some_and(|id| !is_uuid(id)) {
        return Err(refuse(some, 400, ApnsReason::BadMessageId));
    }
    let collapse_id = header("apns-collapse-id");
    if collapse_id.is_some_and(|c| c.len() > 64) {
        return Err(refuse(some, 400, ApnsReason::BadCollapseId));
    }
    let limit = if push_type == Some("voip") {
        MAX_VOIP_PAYLOAD
    } else {
        MAX_PAYLOAD
    };
    if payload.is_empty() {
        return Err(refuse(some, 400, ApnsReason::PayloadEmpty));
    }
    if payload.len() > limit {
        return Err(refuse(some, 413, ApnsReason::PayloadTooLarge));
    }
    if no_device {
        return Err(refuse(some, 400, ApnsReason::BadDeviceToken));
    }
    if let Some((status, reason)) = faults.answer_for(&token) {
        return Err(refuse(some, status, reason));
    }
    Ok(Valid {
        token,
        expiry,
        priority,
        meta: Http2Request {
            topic: topic.to_owned(),
            push_type: push_type.map(str::to_owned),
            apns_id: apns_id.map(str::to_owned),
            collapse_id: collapse_id.map(str::to_owned),
            token_auth,
        },
    })
}

/// A request's credentials: the client certificate (checked in the TLS
/// handshake), or a provider token signed by the simulator's key, fresh enough.
fn authorize(
    headers: &HeaderMap,
    certified: bool,
    faults: &Faults,
    token_rank: Option<usize>,
    public_key: &[u8],
    now: SystemTime,
) -> Result<(), (u16, ApnsReason)> {
    if certified {
        return Ok(());
    }
    let Some(jwt) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bearer "))
    else {
        return Err((403, ApnsReason::MissingProviderToken));
    };
    let iat = jwt::verify(jwt, public_key, SIM_KEY_ID, SIM_TEAM_ID)
        .map_err(|_| (403, ApnsReason::InvalidProviderToken))?;
    let age = crate::clock::unix_secs(now).saturating_sub(iat);
    // The first `expire_tokens` distinct tokens are called expired however
    // young: a server whose clock runs ahead.
    let skewed = token_rank.is_some_and(|r| r < faults.expire_tokens as usize);
    if skewed || age > faults.token_max_age.unwrap_or(TOKEN_MAX_AGE).as_secs() {
        return Err((403, ApnsReason::ExpiredProviderToken));
    }
    Ok(())
}

/// `8-4-4-4-12` hex digits, as Apple requires of `apns-id`.
fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn check(
        path: &str,
        pairs: &[(&'static str, &str)],
        payload: &[u8],
    ) -> Result<Valid, (u16, ApnsReason)> {
        judge(
            &Method::POST,
            path,
            &headers(pairs),
            payload,
            true,
            &Faults::default(),
            None,
            &[],
            SystemTime::now(),
        )
        .map_err(|r| (r.status, r.reason))
    }

    #[test]
    fn requests_are_judged_by_apples_rules() {
        let path = format!("/3/device/{}", "ab".repeat(32));
        let topic = ("apns-topic", "com.example.app");
        let ok = check(&path, &[topic, ("apns-priority", "5")], b"{}").unwrap();
        assert_eq!(
            (ok.priority, ok.meta.topic.as_str()),
            (Some(5), "com.example.app")
        );
        let refused = |pairs: &[(&'static str, &str)], payload: &[u8]| {
            check(&path, pairs, payload).err().map(|(_, r)| r)
        };
        assert_eq!(
            check("/3/x", &[topic], b"{}").err(),
            Some((404, ApnsReason::BadPath))
        );
        assert_eq!(
            check("/3/device/zz", &[topic], b"{}").err(),
            Some((400, ApnsReason::BadDeviceToken))
        );
        assert_eq!(refused(&[], b"{}"), Some(ApnsReason::MissingTopic));
        assert_eq!(
            refused(&[topic, ("apns-priority", "7")], b"{}"),
            Some(ApnsReason::BadPriority)
        );
        assert_eq!(
            refused(&[topic, ("apns-id", "nope")], b"{}"),
            Some(ApnsReason::BadMessageId)
        );
        assert_eq!(
            refused(&[topic, ("apns-expiration", "soon")], b"{}"),
            Some(ApnsReason::BadExpirationDate)
        );
        assert_eq!(refused(&[topic], b""), Some(ApnsReason::PayloadEmpty));
        assert_eq!(
            refused(&[topic], &[b' '; 4097]),
            Some(ApnsReason::PayloadTooLarge)
        );
        assert!(check(&path, &[topic, ("apns-push-type", "voip")], &[b' '; 5120]).is_ok());
        let anonymous = judge(
            &Method::POST,
            &path,
            &headers(&[topic]),
            b"{}",
            false,
            &Faults::default(),
            None,
            &[],
            SystemTime::now(),
        );
        assert_eq!(
            anonymous.err().map(|r| r.reason),
            Some(ApnsReason::MissingProviderToken)
        );
        assert!(is_uuid("0f6a2f2c-1b9e-8c3d-9a4b-123456789abc"));
    }
}
