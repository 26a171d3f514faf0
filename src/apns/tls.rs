//! Identities for APNs: a push certificate and its key, from PKCS#12 or PEM,
//! with what the certificate says about itself (topic, environment, validity),
//! and the rustls client configuration that presents it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Apple's extension marking a development (sandbox) push certificate.
const OID_APPLE_SANDBOX: &str = "1.2.840.113635.100.6.3.1";
/// Apple's extension marking a production push certificate.
const OID_APPLE_PRODUCTION: &str = "1.2.840.113635.100.6.3.2";
/// The subject's `UID` attribute, where Apple puts the bundle id (the topic).
const OID_UID: &str = "0.9.2342.19200300.100.1.1";

/// Installs aws-lc-rs as the process's rustls provider. Idempotent: a second
/// call (or a provider installed by someone else) is fine.
pub fn install_crypto_provider() {
    let _ = aws_lc_rs::default_provider().install_default();
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: wrong password or damaged PKCS#12 file ({detail})", path.display())]
    Pkcs12 { path: PathBuf, detail: String },
    #[error("{}: no certificate in the file", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no private key in the file (PEM keys in another file go in `key`)", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: the private key does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: unusable private key: {detail}", path.display())]
    BadKey { path: PathBuf, detail: String },
    #[error("{}: the certificate cannot be parsed: {detail}", path.display())]
    BadCertificate { path: PathBuf, detail: String },
    #[error("{}: no usable CA certificate in the file", path.display())]
    BadCa { path: PathBuf },
    #[error("{host:?} is not a valid server name")]
    ServerName { host: String },
    #[error("building the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// What a push certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    /// The subject's UID: the app's bundle id, which is the APNs topic.
    pub topic: Option<String>,
    pub sandbox: bool,
    pub production: bool,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

impl CertInfo {
    pub fn is_expired(&self, now: i64) -> bool {
        self.not_after <= now
    }

    pub fn expires_within(&self, now: i64, secs: i64) -> bool {
        self.not_after <= now + secs
    }

    /// Reads subject, UID, Apple's environment extensions and validity.
    pub fn parse(der: &[u8]) -> Result<CertInfo, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let topic = cert
            .subject()
            .iter_attributes()
            .find(|a| a.attr_type().to_id_string() == OID_UID)
            .and_then(|a| a.as_str().ok())
            .map(str::to_owned);
        let has = |o: &str| cert.extensions().iter().any(|e| e.oid.to_id_string() == o);
        Ok(CertInfo {
            subject: cert.subject().to_string(),
            topic,
            sandbox: has(OID_APPLE_SANDBOX),
            production: has(OID_APPLE_PRODUCTION),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

/// A client identity: certificate chain (leaf first), key, and what the leaf says.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub info: CertInfo,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            info: self.info.clone(),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("chain", &self.chain.len())
            .field("key", &"<redacted>")
            .field("info", &self.info)
            .finish()
    }
}

impl Identity {
    /// Builds an identity from parts, checking that the key matches the leaf.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Identity, TlsError> {
        let leaf = chain.first().ok_or_else(|| TlsError::NoCertificate {
            path: cert_path.to_owned(),
        })?;
        let info = CertInfo::parse(leaf).map_err(|detail| TlsError::BadCertificate {
            path: cert_path.to_owned(),
            detail,
        })?;
        CertifiedKey::from_der(
            chain.clone(),
            key.clone_key(),
            &aws_lc_rs::default_provider(),
        )
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            },
            other => TlsError::BadKey {
                path: key_path.to_owned(),
                detail: other.to_string(),
            },
        })?;
        Ok(Identity { chain, key, info })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Loads a push identity. PEM is recognised by its `-----BEGIN` armour; anything
/// else is read as PKCS#12 with `password` (empty when none is given). A PEM
/// certificate takes its key from `key`, or from the same file.
pub fn load_identity(
    certificate: &Path,
    password: Option<&str>,
    key: Option<&Path>,
) -> Result<Identity, TlsError> {
    let bytes = read(certificate)?;
    if bytes.windows(10).any(|w| w == b"-----BEGIN") {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::BadCertificate {
                path: certificate.to_owned(),
                detail: e.to_string(),
            })?;
        let key_path = key.unwrap_or(certificate);
        let key_bytes = if key.is_some() {
            read(key_path)?
        } else {
            bytes
        };
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
                path: key_path.to_owned(),
            },
            other => TlsError::BadKey {
                path: key_path.to_owned(),
                detail: other.to_string(),
            },
        })?;
        return Identity::new(chain, key, certificate, key_path);
    }
    let store =
        p12_keystore::KeyStore::from_pkcs12(&bytes, password.unwrap_or("")).map_err(|e| {
            TlsError::Pkcs12 {
                path: certificate.to_owned(),
                detail: e.to_string(),
            }
        })?;
    let (_, chain) = store.private_key_chain().ok_or_else(|| TlsError::NoKey {
        path: certificate.to_owned(),
    })?;
    let certs = chain
        .chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_der().to_vec()))
        .collect();
    let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(chain.key().to_vec()));
    Identity::new(certs, key, certificate, certificate)
}

/// Reads every certificate of a PEM CA file into `roots`.
pub fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsError> {
    let bytes = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::BadCa {
            path: path.to_owned(),
        })?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError::BadCa {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// The client configuration for the gateway and the feedback service: the
/// public web roots plus an optional extra CA; the server is always verified.
pub fn client_config(
    identity: &Identity,
    extra_ca: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_with_roots(identity, roots(extra_ca)?)
}

/// For HTTP/2 token auth: the same trust, no client certificate.
pub fn anonymous_client_config(
    extra_ca: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(extra_ca)?)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `config` offering ALPN `h2`, which APNs' HTTP/2 endpoints require.
pub fn with_h2(config: &rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    let mut config = config.clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// The public web roots plus an optional extra CA.
fn roots(extra_ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = extra_ca {
        add_ca_file(&mut roots, ca)?;
    }
    Ok(roots)
}

pub fn client_config_with_roots(
    identity: &Identity,
    roots: RootCertStore,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    Ok(Arc::new(config))
}

/// A DNS name or IP literal for SNI and certificate verification.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::ServerName {
        host: host.to_owned(),
    })
}
