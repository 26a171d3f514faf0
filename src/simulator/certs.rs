//! Certificates the simulator makes at start: a CA, a server certificate for
//! localhost, and client identities shaped like Apple's push certificates
//! (topic in the subject UID, Apple's environment extensions).

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::apns::tls::{self, CertInfo, Identity, TlsError};

/// Password of the `.p12` files the simulator writes.
pub const P12_PASSWORD: &str = "simulator";
/// Key id and team id of the simulator's provider-token key (`token-key.p8`).
pub const SIM_KEY_ID: &str = "SIMKEY0001";
pub const SIM_TEAM_ID: &str = "SIMTEAM001";

const UID: &[u64] = &[0, 9, 2342, 19_200_300, 100, 1, 1];
const APPLE_SANDBOX: &[u64] = &[1, 2, 840, 113_635, 100, 6, 3, 1];
const APPLE_PRODUCTION: &[u64] = &[1, 2, 840, 113_635, 100, 6, 3, 2];

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("building a TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Identity(#[from] TlsError),
    #[error("writing a PKCS#12 file: {0}")]
    Pkcs12(String),
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error("writing certificates: {0}")]
    Io(#[from] std::io::Error),
}

/// What a minted client certificate claims.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub topic: String,
    pub sandbox: bool,
    pub production: bool,
    /// A certificate that expired in 2020, for `apnsd check` tests.
    pub expired: bool,
    /// A certificate that expires in ten days, for `apnsd check` tests.
    pub expires_soon: bool,
}

impl ClientSpec {
    pub fn new(topic: &str) -> Self {
        ClientSpec {
            topic: topic.to_owned(),
            sandbox: true,
            production: true,
            expired: false,
            expires_soon: false,
        }
    }
}

pub struct SimCerts {
    issuer: Issuer<'static, KeyPair>,
    ca: CertificateDer<'static>,
    ca_pem: String,
    server: (Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>),
    client: Identity,
    /// The P-256 key provider tokens must be signed with (an APNs `.p8`).
    token_key: KeyPair,
}

impl SimCerts {
    /// A fresh CA, server certificate and client identity for `topic`.
    pub fn generate(topic: &str) -> Result<SimCerts, CertError> {
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name
            .push(DnType::CommonName, "apnsd simulator CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let mut server = CertificateParams::new(vec!["localhost".to_owned()])?;
        server
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let server_cert = server.signed_by(&server_key, &issuer)?;
        let server_key_der =
            PrivateKeyDer::from(PrivatePkcs8KeyDer::from(server_key.serialize_der()));

        let mut certs = SimCerts {
            ca: ca_cert.der().clone(),
            ca_pem: ca_cert.pem(),
            issuer,
            server: (
                vec![server_cert.der().clone(), ca_cert.der().clone()],
                Arc::new(server_key_der),
            ),
            client: placeholder_identity(),
            token_key: KeyPair::generate()?,
        };
        certs.client = certs.mint_client(&ClientSpec::new(topic))?;
        Ok(certs)
    }

    /// A client identity signed by the simulator's CA.
    pub fn mint_client(&self, spec: &ClientSpec) -> Result<Identity, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CustomDnType(UID.to_vec()), spec.topic.as_str());
        dn.push(
            DnType::CommonName,
            format!("Apple Push Services: {}", spec.topic),
        );
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        // Apple's extensions carry a DER NULL.
        if spec.sandbox {
            params
                .custom_extensions
                .push(CustomExtension::from_oid_content(APPLE_SANDBOX, vec![5, 0]));
        }
        if spec.production {
            params
                .custom_extensions
                .push(CustomExtension::from_oid_content(
                    APPLE_PRODUCTION,
                    vec![5, 0],
                ));
        }
        if spec.expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        } else if spec.expires_soon {
            let now = std::time::SystemTime::now();
            params.not_before = (now - std::time::Duration::from_secs(86_400)).into();
            params.not_after = (now + std::time::Duration::from_secs(10 * 86_400)).into();
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let chain = vec![cert.der().clone(), self.ca.clone()];
        let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let info = CertInfo::parse(cert.der()).map_err(|detail| {
            CertError::Identity(TlsError::BadCertificate {
                path: "<generated>".into(),
                detail,
            })
        })?;
        Ok(Identity { chain, key, info })
    }

    /// The identity a daemon presents to this simulator.
    pub fn client(&self) -> &Identity {
        &self.client
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The gateway's and feedback service's TLS configuration: client
    /// certificates are required and must chain to this simulator's CA.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, CertError> {
        self.build_server_config(false).map(Arc::new)
    }

    /// The HTTP/2 endpoint's: ALPN `h2`, and a client certificate is optional
    /// (token auth has none) but must chain to this CA when presented.
    pub fn http2_server_config(&self) -> Result<Arc<rustls::ServerConfig>, CertError> {
        let mut config = self.build_server_config(true)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    fn build_server_config(
        &self,
        optional_client: bool,
    ) -> Result<rustls::ServerConfig, CertError> {
        let provider = Arc::new(aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone())?;
        let mut verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        if optional_client {
            verifier = verifier.allow_unauthenticated();
        }
        let verifier = verifier
            .build()
            .map_err(|e| CertError::Verifier(e.to_string()))?;
        Ok(rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.server.0.clone(), self.server.1.clone_key())?)
    }

    /// The provider-token signing key as Apple hands it out: a PKCS#8 PEM `.p8`.
    pub fn token_key_pem(&self) -> String {
        self.token_key.serialize_pem()
    }

    /// The public half of the token key (an uncompressed P-256 point).
    pub fn token_public_key(&self) -> &[u8] {
        self.token_key.public_key_raw()
    }

    /// A client configuration that trusts only this simulator and presents
    /// its client identity.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        self.client_config_for(&self.client)
    }

    pub fn client_config_for(
        &self,
        identity: &Identity,
    ) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone())?;
        tls::client_config_with_roots(identity, roots)
    }

    /// Writes `ca.pem`, `client.pem`, `client-key.pem`, `client.p12`
    /// (password [`P12_PASSWORD`]) and `token-key.p8` so a daemon in another
    /// process can connect.
    pub fn write_to(&self, dir: &Path) -> Result<(), CertError> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.pem"), &self.ca_pem)?;
        std::fs::write(dir.join("token-key.p8"), self.token_key_pem())?;
        write_identity(&self.client, dir, "client")
    }
}

/// Writes `<name>.pem` (chain), `<name>-key.pem` and `<name>.p12`.
pub fn write_identity(identity: &Identity, dir: &Path, name: &str) -> Result<(), CertError> {
    let pem: String = identity
        .chain
        .iter()
        .map(|c| pem_block("CERTIFICATE", c))
        .collect();
    std::fs::write(dir.join(format!("{name}.pem")), pem)?;
    std::fs::write(
        dir.join(format!("{name}-key.pem")),
        pem_block("PRIVATE KEY", identity.key.secret_der()),
    )?;
    let certs = identity
        .chain
        .iter()
        .map(|c| p12_keystore::Certificate::from_der(c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pkcs12(e.to_string()))?;
    let chain =
        p12_keystore::PrivateKeyChain::new(identity.key.secret_der(), [1u8, 2, 3, 4], certs);
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry(name, p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
    let p12 = store
        .writer(P12_PASSWORD)
        .write()
        .map_err(|e| CertError::Pkcs12(e.to_string()))?;
    std::fs::write(dir.join(format!("{name}.p12")), p12)?;
    Ok(())
}

fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

fn placeholder_identity() -> Identity {
    Identity {
        chain: Vec::new(),
        key: PrivateKeyDer::from(PrivatePkcs8KeyDer::from(Vec::new())),
        info: CertInfo {
            subject: String::new(),
            topic: None,
            sandbox: false,
            production: false,
            not_before: 0,
            not_after: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_identities_load_back_with_topic_and_environment() {
        tls::install_crypto_provider();
        let certs = SimCerts::generate("com.example.app").unwrap();
        let dir = tempfile::tempdir().unwrap();
        certs.write_to(dir.path()).unwrap();

        let p12 =
            tls::load_identity(&dir.path().join("client.p12"), Some(P12_PASSWORD), None).unwrap();
        assert_eq!(p12.info.topic.as_deref(), Some("com.example.app"));
        assert!(p12.info.sandbox && p12.info.production);
        assert!(p12.info.not_after > p12.info.not_before);

        let pem = tls::load_identity(
            &dir.path().join("client.pem"),
            None,
            Some(&dir.path().join("client-key.pem")),
        )
        .unwrap();
        assert_eq!(pem.info, p12.info);
        assert_eq!(pem.chain.len(), 2);
        tls::client_config(&pem, Some(&dir.path().join("ca.pem"))).unwrap();
    }

    #[test]
    fn wrong_password_mismatched_key_and_bad_ca_are_named() {
        tls::install_crypto_provider();
        let certs = SimCerts::generate("com.example.app").unwrap();
        let dir = tempfile::tempdir().unwrap();
        certs.write_to(dir.path()).unwrap();
        let other = certs
            .mint_client(&ClientSpec {
                sandbox: true,
                production: false,
                ..ClientSpec::new("com.other")
            })
            .unwrap();
        assert!(other.info.sandbox && !other.info.production);
        write_identity(&other, dir.path(), "other").unwrap();

        let err =
            tls::load_identity(&dir.path().join("client.p12"), Some("nope"), None).unwrap_err();
        assert!(matches!(err, TlsError::Pkcs12 { .. }), "{err}");
        assert!(err.to_string().contains("client.p12"));

        let err = tls::load_identity(
            &dir.path().join("client.pem"),
            None,
            Some(&dir.path().join("other-key.pem")),
        )
        .unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("other-key.pem"));

        let err = tls::load_identity(&dir.path().join("client.pem"), None, None).unwrap_err();
        assert!(matches!(err, TlsError::NoKey { .. }), "{err}");

        let identity =
            tls::load_identity(&dir.path().join("client.p12"), Some(P12_PASSWORD), None).unwrap();
        let err =
            tls::client_config(&identity, Some(&dir.path().join("client-key.pem"))).unwrap_err();
        assert!(matches!(err, TlsError::BadCa { .. }), "{err}");
        let err = tls::load_identity(&dir.path().join("missing.p12"), None, None).unwrap_err();
        assert!(err.to_string().contains("missing.p12"), "{err}");
    }

    #[test]
    fn expired_certificates_say_so() {
        tls::install_crypto_provider();
        let certs = SimCerts::generate("com.example.app").unwrap();
        let old = certs
            .mint_client(&ClientSpec {
                expired: true,
                ..ClientSpec::new("com.old")
            })
            .unwrap();
        assert!(old.info.is_expired(1_700_000_000));
        assert!(!certs.client().info.is_expired(1_700_000_000));
        assert!(certs
            .client()
            .info
            .expires_within(1_700_000_000, i64::MAX / 2));
    }
}
