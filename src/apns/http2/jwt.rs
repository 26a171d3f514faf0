//! Provider tokens for APNs token auth: an ES256 JWT with the key id in its
//! header and the team id and issue time in its claims. One token per key,
//! shared by every connection of the app, minted again when it is
//! [`REFRESH_AFTER`] old or APNs says it expired; minting more often than
//! every 20 minutes would earn `TooManyProviderTokenUpdates`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::HeaderValue;
use serde_json::json;

/// Age at which a token is replaced: inside Apple's 20 to 60 minute band.
pub const REFRESH_AFTER: Duration = Duration::from_secs(40 * 60);

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
    /// The `iat` claim: tells one token from the next.
    pub issued_at: u64,
}

/// The signing key of one app and its current token.
pub struct Signer {
    key: EcdsaKeyPair,
    key_id: String,
    team_id: String,
    current: Mutex<Option<Bearer>>,
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
            current: Mutex::new(None),
        })
    }

    /// The token to send now: the cached one unless it is due for renewal.
    pub fn bearer(&self) -> Result<Bearer, JwtError> {
        self.bearer_at(SystemTime::now())
    }

    fn bearer_at(&self, now: SystemTime) -> Result<Bearer, JwtError> {
        let now = unix_secs(now);
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = current.as_ref() {
            if now.saturating_sub(b.issued_at) < REFRESH_AFTER.as_secs() {
                return Ok(b.clone());
            }
        }
        let token = self.sign(now)?;
        let header =
            HeaderValue::try_from(format!("bearer {token}")).map_err(|_| JwtError::Sign)?;
        let bearer = Bearer {
            header,
            issued_at: now,
        };
        *current = Some(bearer.clone());
        Ok(bearer)
    }

    /// APNs answered `ExpiredProviderToken` to `used`. Forget it, unless a
    /// newer token replaced it already: a burst of such answers mints once.
    pub fn expired(&self, used: &Bearer) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current
            .as_ref()
            .is_some_and(|b| b.issued_at == used.issued_at)
        {
            *current = None;
        }
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

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn one_token_is_reused_until_due_or_expired() {
        let (_dir, path, _) = key_file();
        let signer = Signer::from_p8_file(&path, "K", "T").unwrap();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let first = signer.bearer_at(t0).unwrap();
        let later = signer.bearer_at(t0 + REFRESH_AFTER / 2).unwrap();
        assert_eq!(later.issued_at, first.issued_at);
        let due = signer.bearer_at(t0 + REFRESH_AFTER).unwrap();
        assert_eq!(due.issued_at, 1_700_000_000 + REFRESH_AFTER.as_secs());
        // An answer about the old token does not throw away the new one.
        signer.expired(&first);
        let t1 = t0 + REFRESH_AFTER + Duration::from_secs(5);
        assert_eq!(signer.bearer_at(t1).unwrap().issued_at, due.issued_at);
        signer.expired(&due);
        assert_eq!(signer.bearer_at(t1).unwrap().issued_at, due.issued_at + 5);
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
