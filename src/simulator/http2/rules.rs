//! Apple's rules for one request to the provider API, applied to its
//! [`Head`] and body length: pure, so they are tested without a connection.

use std::time::{Duration, SystemTime};

use super::head::{Field, Head};
use crate::apns::http2::{jwt, ApnsReason, MAX_PAYLOAD, MAX_VOIP_PAYLOAD};
use crate::job::DeviceToken;
use crate::simulator::{Faults, Http2Request, SIM_KEY_ID, SIM_TEAM_ID};

/// Apple's limit on a provider token's age.
const TOKEN_MAX_AGE: Duration = Duration::from_secs(3600);

/// The device path's prefix.
pub(super) const DEVICE_PATH: &str = "/3/device/";

/// What a provider token is, worked out once per distinct token on a
/// connection: its signature check is the costliest step of a request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Credential {
    /// Where it stands among the distinct tokens presented (0: the first).
    pub(super) rank: usize,
    /// Its `iat` if it verifies against the simulator's key.
    pub(super) iat: Option<u64>,
}

impl Credential {
    /// Checks an `authorization` value against `public_key`.
    pub(super) fn check(value: &str, rank: usize, public_key: &[u8]) -> Credential {
        let iat = value
            .strip_prefix("bearer ")
            .and_then(|jwt| jwt::verify(jwt, public_key, SIM_KEY_ID, SIM_TEAM_ID).ok());
        Credential { rank, iat }
    }
}

/// An accepted request, as far as the record goes.
#[derive(Debug)]
pub(super) struct Valid<'a> {
    pub(super) token: DeviceToken,
    pub(super) expiry: Option<u32>,
    pub(super) priority: Option<u8>,
    topic: &'a str,
    push_type: Option<&'a str>,
    apns_id: Option<&'a str>,
    collapse_id: Option<&'a str>,
    token_auth: bool,
}

impl Valid<'_> {
    /// The headers tests look at, owned (only when the request is recorded).
    pub(super) fn meta(&self) -> Http2Request {
        Http2Request {
            topic: self.topic.to_owned(),
            push_type: self.push_type.map(str::to_owned),
            apns_id: self.apns_id.map(str::to_owned),
            collapse_id: self.collapse_id.map(str::to_owned),
            token_auth: self.token_auth,
        }
    }
}

#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) token: Option<DeviceToken>,
    pub(super) status: u16,
    pub(super) reason: ApnsReason,
}

/// Apple's rules for one request, in the order APNs is known to apply them.
pub(super) fn judge<'a>(
    head: &'a Head,
    payload_len: usize,
    certified: bool,
    faults: &Faults,
    credential: Option<Credential>,
    now: SystemTime,
) -> Result<Valid<'a>, Refusal> {
    let refuse = |token, status, reason| Refusal {
        token,
        status,
        reason,
    };
    if head.get(Field::Method) != Some("POST") {
        return Err(refuse(None, 405, ApnsReason::MethodNotAllowed));
    }
    let Some(hex) = head.path().and_then(|p| p.strip_prefix(DEVICE_PATH)) else {
        return Err(refuse(None, 404, ApnsReason::BadPath));
    };
    let Ok(token) = DeviceToken::parse(hex) else {
        return Err(refuse(None, 400, ApnsReason::BadDeviceToken));
    };
    // No device has it: APNs answers BadDeviceToken once the credentials
    // pass, which `apnsd check --connect` relies on.
    let no_device = hex == crate::apns::http2::PROBE_TOKEN;
    let some = Some(token);
    let header = |field| head.get(field);
    authorize(head, certified, faults, credential, now)
        .map_err(|(status, reason)| refuse(some, status, reason))?;
    let Some(topic) = header(Field::Topic).filter(|t| !t.is_empty()) else {
        return Err(refuse(some, 400, ApnsReason::MissingTopic));
    };
    let push_type = header(Field::PushType);
    if push_type.is_some_and(|t| t.is_empty() || !t.bytes().all(|b| b.is_ascii_lowercase())) {
        return Err(refuse(some, 400, ApnsReason::InvalidPushType));
    }
    let priority = match header(Field::Priority) {
        None => None,
        Some("10") => Some(10),
        Some("5") => Some(5),
        Some("1") => Some(1),
        Some(_) => return Err(refuse(some, 400, ApnsReason::BadPriority)),
    };
    let expiry = match header(Field::Expiration).map(str::parse::<u32>) {
        None => None,
        Some(Ok(e)) => Some(e),
        Some(Err(_)) => return Err(refuse(some, 400, ApnsReason::BadExpirationDate)),
    };
    let apns_id = header(Field::Id);
    if apns_id.is_some_and(|id| !is_uuid(id)) {
        return Err(refuse(some, 400, ApnsReason::BadMessageId));
    }
    let collapse_id = header(Field::CollapseId);
    if collapse_id.is_some_and(|c| c.len() > 64) {
        return Err(refuse(some, 400, ApnsReason::BadCollapseId));
    }
    let limit = if push_type == Some("voip") {
        MAX_VOIP_PAYLOAD
    } else {
        MAX_PAYLOAD
    };
    if payload_len == 0 {
        return Err(refuse(some, 400, ApnsReason::PayloadEmpty));
    }
    if payload_len > limit {
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
        topic,
        push_type,
        apns_id,
        collapse_id,
        token_auth: !certified,
    })
}

/// A request's credentials: the client certificate (checked in the TLS
/// handshake), or a provider token signed by the simulator's key, fresh
/// enough. `credential` is what its `authorization` value checked out as.
pub(super) fn authorize(
    head: &Head,
    certified: bool,
    faults: &Faults,
    credential: Option<Credential>,
    now: SystemTime,
) -> Result<(), (u16, ApnsReason)> {
    if certified {
        return Ok(());
    }
    let bearer = head
        .get(Field::Authorization)
        .is_some_and(|v| v.starts_with("bearer "));
    if !bearer {
        return Err((403, ApnsReason::MissingProviderToken));
    }
    let Some(Credential {
        rank,
        iat: Some(iat),
    }) = credential
    else {
        return Err((403, ApnsReason::InvalidProviderToken));
    };
    let age = crate::clock::unix_secs(now).saturating_sub(iat);
    // The first `expire_tokens` distinct tokens are called expired however
    // young: a server whose clock runs ahead.
    let skewed = rank < faults.expire_tokens as usize;
    if skewed || age > faults.token_max_age.unwrap_or(TOKEN_MAX_AGE).as_secs() {
        return Err((403, ApnsReason::ExpiredProviderToken));
    }
    Ok(())
}

/// `8-4-4-4-12` hex digits, as Apple requires of `apns-id`.
fn is_uuid(text: &str) -> bool {
    // 8-4-4-4-12 hex digits: dashes at 8, 13, 18 and 23. Digits go through
    // a table with no branch each: a branch on random hex digits (a number
    // or a letter) mispredicted so often that this was a tenth of the
    // simulator's CPU.
    let b = text.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return false;
    }
    let bad = b
        .iter()
        .enumerate()
        .filter(|&(i, _)| !matches!(i, 8 | 13 | 18 | 23))
        .fold(0, |bad, (_, &c)| bad | crate::token::nibble(c));
    bad < 16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, path: &str, pairs: &[(&str, &str)]) -> Head {
        let mut h = Head::default();
        h.set(b":method", method.as_bytes());
        h.set(b":path", path.as_bytes());
        for (k, v) in pairs {
            h.set(k.as_bytes(), v.as_bytes());
        }
        h
    }

    fn check(
        path: &str,
        pairs: &[(&str, &str)],
        payload: &[u8],
    ) -> Result<Valid<'static>, (u16, ApnsReason)> {
        // Leaked so the borrowed fields outlive this call; tests only.
        let head: &'static Head = Box::leak(Box::new(head("POST", path, pairs)));
        judge(
            head,
            payload.len(),
            true,
            &Faults::default(),
            None,
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
            (ok.priority, ok.meta().topic.as_str()),
            (Some(5), "com.example.app")
        );
        let refused = |pairs: &[(&str, &str)], payload: &[u8]| {
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
        let get = head("GET", &path, &[topic]);
        let now = SystemTime::now();
        assert_eq!(
            judge(&get, 2, true, &Faults::default(), None, now)
                .err()
                .map(|r| r.reason),
            Some(ApnsReason::MethodNotAllowed)
        );
        let anonymous = head("POST", &path, &[topic]);
        assert_eq!(
            judge(&anonymous, 2, false, &Faults::default(), None, now)
                .err()
                .map(|r| r.reason),
            Some(ApnsReason::MissingProviderToken)
        );
        assert!(is_uuid("0f6a2f2c-1b9e-8c3d-9a4b-123456789abc"));
        assert!(!is_uuid("0f6a2f2c-1b9e-8c3d-9a4b-123456789abc-0"));
        assert!(!is_uuid("0f6a2f2c-1b9e-8c3d-9a4b"));
        assert!(!is_uuid("0f6a2f2c-1b9e-8c3d-9a4b-123456789abz"));
        assert!(is_uuid("0F6A2F2C-1B9E-8C3D-9A4B-123456789ABC"));
        assert!(
            !is_uuid("0f6a2f2c01b9e-8c3d-9a4b-123456789abc"),
            "a digit for a dash"
        );
        assert!(
            !is_uuid("0f6a2f2c-1b9e-8c3d-9a4b-12345678-abc"),
            "a dash for a digit"
        );
    }

    #[test]
    fn provider_tokens_are_judged_by_signature_age_and_rank() {
        let certs = crate::simulator::SimCerts::generate("com.example.app").unwrap();
        let dir = tempfile::tempdir().unwrap();
        certs.write_to(dir.path()).unwrap();
        let p8 = dir.path().join("token-key.p8");
        let signer = jwt::Signer::from_p8_file(&p8, SIM_KEY_ID, SIM_TEAM_ID).unwrap();
        let value = signer.bearer().unwrap().header.to_str().unwrap().to_owned();
        let key = certs.token_public_key();
        let token = |value: &str| head("POST", "/", &[("authorization", value)]);
        let now = SystemTime::now();
        let faults = Faults::default();
        let fresh = Credential::check(&value, 0, key);
        assert!(fresh.iat.is_some());
        assert_eq!(
            authorize(&token(&value), false, &faults, Some(fresh), now),
            Ok(())
        );
        let expire_first = Faults {
            expire_tokens: 1,
            ..Faults::default()
        };
        assert_eq!(
            authorize(&token(&value), false, &expire_first, Some(fresh), now),
            Err((403, ApnsReason::ExpiredProviderToken))
        );
        let later = now + Duration::from_secs(3601);
        assert_eq!(
            authorize(&token(&value), false, &faults, Some(fresh), later),
            Err((403, ApnsReason::ExpiredProviderToken))
        );
        let forged = format!("{value}x");
        let bad = Credential::check(&forged, 1, key);
        assert_eq!(bad.iat, None);
        assert_eq!(
            authorize(&token(&forged), false, &faults, Some(bad), now),
            Err((403, ApnsReason::InvalidProviderToken))
        );
        assert_eq!(
            authorize(&token("basic x"), false, &faults, None, now),
            Err((403, ApnsReason::MissingProviderToken))
        );
    }
}
