//! Provider tokens for APNs token auth: an ES256 JWT with the key id in its
//! header and the team id and issue time in its claims. One token per key,
//! shared by every connection of the app, minted again when it is
//! [`REFRESH_AFTER`] old or APNs says it expired.
//!
//! Minting more often than every 20 minutes earns `TooManyProviderTokenUpdates`,
//! so an expiry answer is trusted once: the token it names is replaced at
//! once. When the replacement is called expired as well, the token was fresh
//! and the clock is what is wrong; another token from the same clock would be
//! refused the same way, so the next one waits for [`MINT_FLOOR`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::HeaderValue;
use serde_json::json;

use crate::clock::unix_secs;

/// Age at which a token is replaced: inside Apple's 20 to 60 minute band.
pub const REFRESH_AFTER: Duration = Duration::from_secs(40 * 60);

/// Least time between a token minted to replace an expired one and the next,
/// when that one is called expired too: Apple's own limit on token updates
/// (about one per 20 minutes), so a skewed clock never gets the key throttled.
/// A clock stepped backwards (an NTP fix) lifts it: the new clock may be right.
pub const MINT_FLOOR: Duration = Duration::from_secs(20 * 60);

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a PKCS#8 P-256 private key (an APNs .p8 file): {detail}", path.display())]
    BadKey { path: PathBuf, detail: String },
    #[error("signing the provider token failed")]
    Sign,
    #[error("the provider token is malformed")]
    Malformed,
    #[error("the provider token's signature does not verify")]
    Signature,
    #[error("the provider token names key {0:?}, not the configured one")]
    KeyId(String),
    #[error("the provider token names team {0:?}, not the configured one")]
    Team(String),
}

/// A minted token as the `authorization` header carries it.
#[derive(Debug, Clone)]
pub struct Bearer {
    pub header: HeaderValue,
    /// The `iat` claim, in whole seconds: two tokens may share it.
    pub issued_at: u64,
    /// Which mint of its signer this is (1, 2, ...): tells one token from
    /// the next exactly, so a late answer about an old token is recognised.
    pub generation: u64,
}

/// What an `ExpiredProviderToken` answer did to the token it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// This answer retired the token: the next request carries a new one.
    /// Only the first answer about a token says so (`minted`: tokens so far).
    Retired { minted: u64 },
    /// A newer token is out or due already: send again at once.
    Replaced,
    /// The token replaced an expired one and is called expired too: the clock
    /// is likely off. It stays in use until [`MINT_FLOOR`] has passed, so
    /// sending again only helps after a pause. `first`: the first such
    /// answer in the signer's life (say so in the log once).
    Held { first: bool },
}

/// The signer's current token and why it was minted.
#[derive(Debug, Default)]
struct State {
    current: Option<Arc<Bearer>>,
    minted: u64,
    /// `current` replaced a token APNs called expired.
    replacement: bool,
    /// APNs called `current` expired: it goes as soon as the floor allows.
    stale: bool,
    clock_warned: bool,
}

impl State {
    /// Whether `current` may be replaced at `now`.
    fn due(&self, b: &Bearer, now: u64) -> bool {
        if self.stale {
            // A clock that went back moved since the token was minted: try it.
            !self.replacement || now < b.issued_at || now - b.issued_at >= MINT_FLOOR.as_secs()
        } else {
            now.saturating_sub(b.issued_at) >= REFRESH_AFTER.as_secs()
        }
    }
}

/// The signing key of one app and its current token.
pub struct Signer {
    key: EcdsaKeyPair,
    key_id: String,
    team_id: String,
    state: Mutex<State>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Reads an APNs `.p8` file (PEM-armoured PKCS#8).
    pub fn from_p8_file(path: &Path, key_id: &str, team_id: &str) -> Result<Signer, JwtError> {
        let text = std::fs::read(path).map_err(|source| JwtError::Read {
            path: path.to_owned(),
            source,
        })?;
        let bad = |detail: String| JwtError::BadKey {
            path: path.to_owned(),
            detail,
        };
        let der = pem::parse(&text).map_err(|e| bad(e.to_string()))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.contents())
            .map_err(|e| bad(e.to_string()))?;
        Ok(Signer {
            key,
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            state: Mutex::new(State::default()),
        })
    }

    /// The token to send now: the cached one unless it is due for renewal.
    /// Shared, as every stream keeps the token it went with.
    pub fn bearer(&self) -> Result<Arc<Bearer>, JwtError> {
        self.bearer_at(SystemTime::now())
    }

    fn bearer_at(&self, now: SystemTime) -> Result<Arc<Bearer>, JwtError> {
        let now = unix_secs(now);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = state.current.as_ref() {
            if !state.due(b, now) {
                return Ok(b.clone());
            }
        }
        let token = self.sign(now)?;
        let header =
            HeaderValue::try_from(format!("bearer {token}")).map_err(|_| JwtError::Sign)?;
        state.minted += 1;
        let bearer = Arc::new(Bearer {
            header,
            issued_at: now,
            generation: state.minted,
        });
        state.replacement = state.stale;
        state.stale = false;
        state.current = Some(bearer.clone());
        Ok(bearer)
    }

    /// APNs answered `ExpiredProviderToken` to `used`. A burst of such
    /// answers about one token retires it once; answers about a token
    /// already replaced change nothing.
    pub fn expired(&self, used: &Bearer) -> Renewal {
        self.expired_at(used, SystemTime::now())
    }

    fn expired_at(&self, used: &Bearer, now: SystemTime) -> Renewal {
        let now = unix_secs(now);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(current) = state.current.clone() else {
            return Renewal::Replaced;
        };
        if current.generation != used.generation {
            return Renewal::Replaced;
        }
        let first_answer = !state.stale;
        state.stale = true;
        if state.due(&current, now) {
            return if first_answer {
                Renewal::Retired {
                    minted: state.minted,
                }
            } else {
                Renewal::Replaced
            };
        }
        let first = !state.clock_warned;
        state.clock_warned = true;
        Renewal::Held { first }
    }

    fn sign(&self, iat: u64) -> Result<String, JwtError> {
        let input = signing_input(&self.key_id, &self.team_id, iat);
        let sig = self
            .key
            .sign(&SystemRandom::new(), input.as_bytes())
            .map_err(|_| JwtError::Sign)?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }
}

/// `base64url(header).base64url(claims)`: what the signature covers.
fn signing_input(key_id: &str, team_id: &str, iat: u64) -> String {
    let header = json!({"alg": "ES256", "kid": key_id});
    let claims = json!({"iss": team_id, "iat": iat});
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// Checks a token the way APNs does (the simulator's side): ES256 signature
/// by `public_key` (an uncompressed P-256 point), `kid` and `iss` as
/// configured. Returns `iat`, whose age the caller judges.
pub fn verify(
    token: &str,
    public_key: &[u8],
    key_id: &str,
    team_id: &str,
) -> Result<u64, JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let decode = |part: &str| -> Result<serde_json::Value, JwtError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| JwtError::Malformed)?;
        serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)
    };
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| JwtError::Malformed)?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public_key)
        .verify(format!("{header}.{claims}").as_bytes(), &sig)
        .map_err(|_| JwtError::Signature)?;
    let (header, claims) = (decode(header)?, decode(claims)?);
    if header["alg"] != "ES256" {
        return Err(JwtError::Malformed);
    }
    match header["kid"].as_str() {
        Some(kid) if kid == key_id => {}
        other => return Err(JwtError::KeyId(other.unwrap_or_default().to_owned())),
    }
    match claims["iss"].as_str() {
        Some(iss) if iss == team_id => {}
        other => return Err(JwtError::Team(other.unwrap_or_default().to_owned())),
    }
    claims["iat"].as_u64().ok_or(JwtError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn key_file() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("AuthKey.p8");
        std::fs::write(&path, key.serialize_pem()).unwrap();
        (dir, path, key.public_key_raw().to_vec())
    }

    fn token(b: &Bearer) -> &str {
        b.header.to_str().unwrap().strip_prefix("bearer ").unwrap()
    }

    #[test]
    fn tokens_verify_and_carry_kid_iss_iat() {
        let (_dir, path, public) = key_file();
        let signer = Signer::from_p8_file(&path, "KEY123", "TEAM456").unwrap();
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let b = signer.bearer_at(at).unwrap();
        assert_eq!(b.issued_at, 1_700_000_000);
        assert_eq!(
            verify(token(&b), &public, "KEY123", "TEAM456").unwrap(),
            1_700_000_000
        );
        assert!(matches!(
            verify(token(&b), &public, "OTHER", "TEAM456"),
            Err(JwtError::KeyId(_))
        ));
        assert!(matches!(
            verify(token(&b), &public, "KEY123", "OTHER"),
            Err(JwtError::Team(_))
        ));
        let (_d2, _p2, stranger) = key_file();
        assert!(matches!(
            verify(token(&b), &stranger, "KEY123", "TEAM456"),
            Err(JwtError::Signature)
        ));
        assert!(matches!(
            verify("a.b", &public, "KEY123", "TEAM456"),
            Err(JwtError::Malformed)
        ));
    }

    fn signer() -> (tempfile::TempDir, Signer) {
        let (dir, path, _) = key_file();
        (dir, Signer::from_p8_file(&path, "K", "T").unwrap())
    }

    const T0: u64 = 1_700_000_000;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn one_token_is_reused_until_due_or_expired() {
        let (_dir, signer) = signer();
        let t0 = at(T0);
        let first = signer.bearer_at(t0).unwrap();
        let later = signer.bearer_at(t0 + REFRESH_AFTER / 2).unwrap();
        assert_eq!(later.generation, first.generation);
        let due = signer.bearer_at(t0 + REFRESH_AFTER).unwrap();
        assert_eq!(due.issued_at, T0 + REFRESH_AFTER.as_secs());
        assert_eq!(due.generation, first.generation + 1);
        // An answer about the old token does not throw away the new one.
        let t1 = t0 + REFRESH_AFTER + Duration::from_secs(5);
        assert_eq!(signer.expired_at(&first, t1), Renewal::Replaced);
        assert_eq!(signer.bearer_at(t1).unwrap().generation, due.generation);
        assert_eq!(signer.expired_at(&due, t1), Renewal::Retired { minted: 2 });
        let fresh = signer.bearer_at(t1).unwrap();
        assert_eq!(
            (fresh.issued_at, fresh.generation),
            (T0 + REFRESH_AFTER.as_secs() + 5, 3)
        );
    }

    #[test]
    fn a_burst_of_expiry_answers_in_one_second_mints_once() {
        let (_dir, signer) = signer();
        let a = signer.bearer_at(at(T0)).unwrap();
        assert_eq!(
            signer.expired_at(&a, at(T0)),
            Renewal::Retired { minted: 1 }
        );
        // Answers still in flight about `a` before anyone asked for a token.
        assert_eq!(signer.expired_at(&a, at(T0)), Renewal::Replaced);
        let b = signer.bearer_at(at(T0)).unwrap();
        assert_eq!(b.issued_at, a.issued_at, "same second, told apart anyway");
        assert_ne!(b.header, a.header);
        for _ in 0..50 {
            assert_eq!(signer.expired_at(&a, at(T0)), Renewal::Replaced);
        }
        assert_eq!(signer.bearer_at(at(T0)).unwrap().generation, b.generation);
    }

    #[test]
    fn a_fresh_replacement_called_expired_waits_for_the_floor() {
        let (_dir, signer) = signer();
        let a = signer.bearer_at(at(T0)).unwrap();
        signer.expired_at(&a, at(T0));
        let b = signer.bearer_at(at(T0 + 1)).unwrap();
        // The replacement is refused too: the clock is off. Say so once.
        assert_eq!(
            signer.expired_at(&b, at(T0 + 1)),
            Renewal::Held { first: true }
        );
        assert_eq!(
            signer.expired_at(&b, at(T0 + 2)),
            Renewal::Held { first: false }
        );
        let just_before = T0 + 1 + MINT_FLOOR.as_secs() - 1;
        assert_eq!(
            signer.bearer_at(at(just_before)).unwrap().generation,
            b.generation
        );
        // Once the floor has passed, the next answer lets a new one be minted.
        let after = T0 + 1 + MINT_FLOOR.as_secs();
        assert_eq!(signer.expired_at(&b, at(after)), Renewal::Replaced);
        let c = signer.bearer_at(at(after)).unwrap();
        assert_eq!(c.generation, b.generation + 1);
        // c replaced b, which was stale: held again, and the log was told already.
        assert_eq!(
            signer.expired_at(&c, at(after)),
            Renewal::Held { first: false }
        );
        // A clock stepped backwards may be the fix: it may mint at once.
        assert_eq!(
            signer.bearer_at(at(after - 3600)).unwrap().generation,
            c.generation + 1
        );
    }

    #[test]
    fn a_token_that_aged_normally_is_replaced_at_once_when_called_expired() {
        let (_dir, signer) = signer();
        let a = signer.bearer_at(at(T0)).unwrap();
        let b = signer.bearer_at(at(T0) + REFRESH_AFTER).unwrap();
        assert_eq!(b.generation, a.generation + 1);
        // b was minted on schedule, not to replace an expired token.
        let t = T0 + REFRESH_AFTER.as_secs() + 1;
        assert_eq!(signer.expired_at(&b, at(t)), Renewal::Retired { minted: 2 });
        assert_eq!(signer.bearer_at(at(t)).unwrap().generation, 3);
    }

    #[test]
    fn a_file_that_is_not_a_p8_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.p8");
        std::fs::write(&path, "hello").unwrap();
        let e = Signer::from_p8_file(&path, "K", "T").unwrap_err();
        assert!(e.to_string().contains("x.p8"), "{e}");
    }
}
