//! An app's targets: where its lanes and feedback poller connect and the
//! identity they present. They are prepared (identities loaded, names
//! checked) before anything changes, so a bad identity leaves a running
//! daemon untouched. Also the probe `apnsd check --connect` makes with them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::apns::connect::Endpoint;
use crate::apns::http2::{self, jwt::Signer};
use crate::apns::tls::{self, Identity};
use crate::apns::Protocol;
use crate::config::AppConfig;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("app {app:?}: {source}")]
    Identity {
        app: String,
        #[source]
        source: tls::TlsError,
    },
    #[error("app {app:?}: {what}")]
    App { app: String, what: String },
    #[error("app {app:?}: {source}")]
    TokenKey {
        app: String,
        #[source]
        source: http2::jwt::JwtError,
    },
    #[error("app {app:?}: cannot connect to the gateway {addr}: {source}")]
    Connect {
        app: String,
        addr: String,
        source: std::io::Error,
    },
}

/// A gateway standing in for Apple's, for the apps on `environment =
/// "simulator"` that name no address: start-up resolves it once into its
/// addresses and a client configuration that trusts its root (and presents
/// the identity it issued), so nothing after start-up knows what runs there.
#[derive(Clone)]
pub struct StandIn {
    pub gateway: SocketAddr,
    pub feedback: SocketAddr,
    /// The HTTP/2 provider API.
    pub endpoint: SocketAddr,
    pub tls: Arc<rustls::ClientConfig>,
    /// The topic of the identity it issued, if it names one.
    pub topic: Option<String>,
}

/// The stand-in an app connects to, if it is one that needs it. Without one
/// (none was started, or `Daemon::start` was called directly) such an app
/// cannot run: it fails as a bad identity would, leaving the daemon as it was.
fn stand_in_for<'a>(
    app: &AppConfig,
    stand_in: Option<&'a StandIn>,
) -> Result<Option<&'a StandIn>, TargetError> {
    if !app.uses_builtin_simulator() {
        return Ok(None);
    }
    stand_in.map(Some).ok_or_else(|| TargetError::App {
        app: app.name.clone(),
        what: "the built-in simulator starts with the daemon, and none runs: restart apnsd to add an app on it".into(),
    })
}

/// An app's targets, identities loaded: prepared before anything changes so
/// a bad identity leaves the running daemon untouched.
pub enum Prepared {
    Binary {
        gateway: Endpoint,
        feedback: Endpoint,
    },
    Http2(http2::Target),
}

pub fn prepare(app: &AppConfig, stand_in: Option<&StandIn>) -> Result<Prepared, TargetError> {
    match app.protocol {
        Protocol::Binary => {
            targets(app, stand_in).map(|(gateway, feedback)| Prepared::Binary { gateway, feedback })
        }
        Protocol::Http2 => http2_target(app, stand_in).map(Prepared::Http2),
    }
}

/// The gateway and feedback targets of an app: addresses, server name, identity.
fn targets(
    app: &AppConfig,
    stand_in: Option<&StandIn>,
) -> Result<(Endpoint, Endpoint), TargetError> {
    let fail = |what: String| TargetError::App {
        app: app.name.clone(),
        what,
    };
    let stand_in = stand_in_for(app, stand_in)?;
    let tls_config = match stand_in {
        Some(s) => s.tls.clone(),
        None => {
            let identity = load_identity(app)?;
            tls::client_config(&identity, app.ca.as_deref()).map_err(|source| {
                TargetError::Identity {
                    app: app.name.clone(),
                    source,
                }
            })?
        }
    };
    let (gateway, feedback) = match stand_in {
        Some(s) => (s.gateway.to_string(), s.feedback.to_string()),
        None => {
            let gateway = app
                .gateway
                .clone()
                .or_else(|| app.environment.gateway().map(str::to_owned));
            let feedback = app
                .feedback
                .clone()
                .or_else(|| app.environment.feedback().map(str::to_owned));
            gateway.zip(feedback).ok_or_else(|| {
                fail(
                    "the simulator environment needs both `gateway` and `feedback`, or neither"
                        .into(),
                )
            })?
        }
    };
    let target = |addr: String| -> Result<Endpoint, TargetError> {
        let host = host_of(&addr);
        let server_name = tls::server_name(host).map_err(|e| fail(e.to_string()))?;
        Ok(Endpoint {
            addr,
            server_name,
            tls: tls_config.clone(),
            proxy: app.via_proxy().cloned(),
        })
    };
    Ok((target(gateway)?, target(feedback)?))
}

/// Opens one gateway connection with the app's identity and listens briefly.
/// Under TLS 1.3 a server refuses a client certificate only after the client
/// thinks the handshake is done, with an alert: a gateway that stays silent
/// for [`PROBE_LISTEN`] has accepted the identity. Apps on the built-in
/// simulator have nothing to probe before it starts; HTTP/2 apps are not
/// probed (their lanes log a refused identity on their first connection).
pub async fn probe_gateway(app: &AppConfig) -> Result<(), TargetError> {
    use tokio::io::AsyncReadExt;
    if app.uses_builtin_simulator() || app.protocol == Protocol::Http2 {
        return Ok(());
    }
    let (gateway, _) = targets(app, None)?;
    let fail = |source| TargetError::Connect {
        app: app.name.clone(),
        addr: gateway.addr.clone(),
        source,
    };
    let mut stream = crate::apns::connect::connect(&gateway, app.connect_timeout)
        .await
        .map_err(fail)?;
    match tokio::time::timeout(PROBE_LISTEN, stream.read(&mut [0u8; 6])).await {
        Err(_) => Ok(()),
        Ok(Ok(_)) => Err(fail(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "the gateway closed the connection at once",
        ))),
        Ok(Err(e)) => Err(fail(e)),
    }
}

/// How long a probe waits for the gateway to refuse the identity.
const PROBE_LISTEN: Duration = Duration::from_millis(500);

/// The HTTP/2 target of an app: endpoint, TLS with ALPN `h2`, topic, and the
/// provider-token signer under token auth.
pub(crate) fn http2_target(
    app: &AppConfig,
    stand_in: Option<&StandIn>,
) -> Result<http2::Target, TargetError> {
    let fail = |what: String| TargetError::App {
        app: app.name.clone(),
        what,
    };
    let identity_error = |source| TargetError::Identity {
        app: app.name.clone(),
        source,
    };
    let (addr, tls, signer, cert_topic) = match stand_in_for(app, stand_in)? {
        Some(s) => (s.endpoint.to_string(), s.tls.clone(), None, s.topic.clone()),
        None => {
            let addr = app
                .endpoint
                .clone()
                .or_else(|| app.environment.endpoint().map(str::to_owned))
                .ok_or_else(|| fail("the simulator environment needs `endpoint`".into()))?;
            match (&app.key_file, &app.key_id, &app.team_id) {
                (Some(key_file), Some(key_id), Some(team_id)) => {
                    let signer =
                        Signer::from_p8_file(key_file, key_id, team_id).map_err(|source| {
                            TargetError::TokenKey {
                                app: app.name.clone(),
                                source,
                            }
                        })?;
                    let tls =
                        tls::anonymous_client_config(app.ca.as_deref()).map_err(identity_error)?;
                    (addr, tls, Some(Arc::new(signer)), None)
                }
                _ => {
                    let identity = load_identity(app)?;
                    let tls =
                        tls::client_config(&identity, app.ca.as_deref()).map_err(identity_error)?;
                    (addr, tls, None, identity.info.topic)
                }
            }
        }
    };
    let topic =
        app.topic.clone().or(cert_topic).ok_or_else(|| {
            fail("no `topic`, and the certificate names none (subject UID)".into())
        })?;
    if http::HeaderValue::from_str(&topic).is_err() {
        return Err(fail(format!("topic {topic:?} is not a valid header value")));
    }
    if http::uri::Authority::try_from(addr.as_str()).is_err() {
        return Err(fail(format!("endpoint {addr:?} is not a valid host:port")));
    }
    let server_name = tls::server_name(host_of(&addr)).map_err(|e| fail(e.to_string()))?;
    Ok(http2::Target {
        endpoint: Endpoint {
            addr,
            server_name,
            tls: tls::with_h2(&tls),
            proxy: app.via_proxy().cloned(),
        },
        topic,
        signer,
    })
}

fn load_identity(app: &AppConfig) -> Result<Identity, TargetError> {
    let Some(cert) = &app.certificate else {
        return Err(TargetError::App {
            app: app.name.clone(),
            what: "`certificate` is required outside the built-in simulator".into(),
        });
    };
    tls::load_identity(cert, app.password.as_deref(), app.key.as_deref()).map_err(|source| {
        TargetError::Identity {
            app: app.name.clone(),
            source,
        }
    })
}

/// When the app's client certificate expires, for the expiry alert; `None`
/// with token auth. Loaded again rather than threaded through `prepare`,
/// which has already refused an identity that does not load.
pub fn certificate_expiry(app: &AppConfig) -> Option<i64> {
    app.certificate.as_ref()?;
    load_identity(app)
        .ok()
        .map(|identity| identity.info.not_after)
}

/// `host:port` → `host`, minding bracketed IPv6 literals.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_ports_and_brackets() {
        assert_eq!(
            host_of("gateway.push.apple.com:2195"),
            "gateway.push.apple.com"
        );
        assert_eq!(host_of("127.0.0.1:22195"), "127.0.0.1");
        assert_eq!(host_of("[::1]:22195"), "::1");
    }

    fn config(apps: &str) -> crate::config::Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("apnsd.toml");
        std::fs::write(&path, format!("[amqp]\n{apps}")).unwrap();
        crate::config::Config::load(&path).unwrap()
    }

    fn stand_in() -> StandIn {
        tls::install_crypto_provider();
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        StandIn {
            gateway: "127.0.0.1:1".parse().unwrap(),
            feedback: "127.0.0.1:2".parse().unwrap(),
            endpoint: "127.0.0.1:3".parse().unwrap(),
            tls: Arc::new(tls),
            topic: Some("com.example.standin".into()),
        }
    }

    #[test]
    fn apps_on_the_built_in_simulator_connect_to_the_stand_in() {
        let config = config(
            "[[apps]]\nname = \"a\"\nenvironment = \"simulator\"\n\
             [[apps]]\nname = \"b\"\nenvironment = \"simulator\"\nprotocol = \"http2\"\n",
        );
        let stand_in = stand_in();
        match prepare(&config.apps[0], Some(&stand_in)) {
            Ok(Prepared::Binary { gateway, feedback }) => {
                assert_eq!(
                    (gateway.addr.as_str(), feedback.addr.as_str()),
                    ("127.0.0.1:1", "127.0.0.1:2")
                );
            }
            _ => panic!("a binary app on the stand-in"),
        }
        match prepare(&config.apps[1], Some(&stand_in)) {
            Ok(Prepared::Http2(target)) => {
                assert_eq!(target.endpoint.addr, "127.0.0.1:3");
                assert_eq!(
                    target.topic, "com.example.standin",
                    "the topic of its identity"
                );
            }
            _ => panic!("an HTTP/2 app on the stand-in"),
        }
        // None was started (a reload adding the first such app): refused, named.
        for app in &config.apps {
            match prepare(app, None) {
                Err(e @ TargetError::App { .. }) => {
                    assert!(e.to_string().contains("restart apnsd"), "{e}")
                }
                _ => panic!("{} needs a stand-in", app.name),
            }
        }
    }

    #[test]
    fn apps_with_addresses_ignore_the_stand_in() {
        let config = config(&format!(
            "[[apps]]\nname = \"a\"\nenvironment = \"simulator\"\ngateway = \"127.0.0.1:9\"\n\
             feedback = \"127.0.0.1:8\"\ncertificate = \"{}/Cargo.toml\"\n",
            env!("CARGO_MANIFEST_DIR")
        ));
        match prepare(&config.apps[0], Some(&stand_in())) {
            Err(TargetError::Identity { app, .. }) => assert_eq!(app, "a"),
            _ => panic!("its own identity is loaded, and it is no identity"),
        }
    }
}
