//! The one way out to Apple: TCP, then TLS (SNI, ALPN, client identity and
//! trust roots all come with the endpoint's rustls configuration). Binary
//! lanes, the feedback poller, HTTP/2 lanes and the gateway probe all connect
//! here, so a connection feature (a proxy tunnel, a source address) is
//! written once.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Where and as whom a connection goes. Swapped as a whole on reload: new
/// connections use the new value, open ones keep the identity they have.
#[derive(Clone)]
pub struct Endpoint {
    /// `host:port`.
    pub addr: String,
    /// For SNI and for verifying the server's certificate.
    pub server_name: ServerName<'static>,
    /// Trust roots, the client identity (if any) and ALPN.
    pub tls: Arc<rustls::ClientConfig>,
}

/// A TLS connection to APNs.
pub type Stream = TlsStream<TcpStream>;

/// Opens a connection to `endpoint`, with no time limit of its own: for a
/// caller whose deadline also covers what follows (HTTP/2's handshake).
pub async fn open(endpoint: &Endpoint) -> io::Result<Stream> {
    let tcp = TcpStream::connect(&endpoint.addr).await?;
    // Frames and requests are coalesced before they are written; Nagle
    // would only add a round trip to the last of them.
    tcp.set_nodelay(true)?;
    TlsConnector::from(endpoint.tls.clone())
        .connect(endpoint.server_name.clone(), tcp)
        .await
}

/// [`open`], bounded by `timeout` (which then fails as `TimedOut`).
pub async fn connect(endpoint: &Endpoint, timeout: Duration) -> io::Result<Stream> {
    tokio::time::timeout(timeout, open(endpoint))
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")))
}

/// A failure the TLS layer reports (an alert from the server, or its
/// certificate refused by us) is about credentials; anything else is the network.
pub fn is_tls_failure(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(addr: String) -> Endpoint {
        crate::apns::tls::install_crypto_provider();
        let roots = rustls::RootCertStore::empty();
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Endpoint {
            addr,
            server_name: ServerName::try_from("localhost").unwrap(),
            tls: Arc::new(tls),
        }
    }

    #[tokio::test]
    async fn a_refused_port_is_the_network_and_an_untrusted_server_is_tls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let refused = connect(&endpoint(addr), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(!is_tls_failure(&refused), "{refused}");

        let sim = crate::simulator::Simulator::start(crate::simulator::SimulatorOptions::new(
            crate::simulator::SimCerts::generate("com.example.app").unwrap(),
        ))
        .await
        .unwrap();
        let untrusted = connect(
            &endpoint(sim.gateway_addr().to_string()),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(is_tls_failure(&untrusted), "{untrusted}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let e = connect(&endpoint(addr), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        drop(listener);
    }
}
