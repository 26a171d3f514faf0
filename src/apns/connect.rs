//! The one way out to Apple: TCP (to the endpoint, or to its HTTP CONNECT
//! proxy and through its tunnel), then TLS (SNI, ALPN, client identity and
//! trust roots all come with the endpoint's rustls configuration). Binary
//! lanes, the feedback poller, HTTP/2 lanes, the probes and `apnsd channels`
//! all connect here, so a connection feature is written once.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::proxy::{self, Proxy};

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
    /// The HTTP CONNECT proxy the connection tunnels through, if any: it
    /// sees `addr`, never the identity or the notifications.
    pub proxy: Option<Arc<Proxy>>,
}

/// A TLS connection to APNs.
pub type Stream = TlsStream<TcpStream>;

/// Opens a connection to `endpoint`, with no time limit of its own: for a
/// caller whose deadline also covers what follows (HTTP/2's handshake).
/// Through a proxy, a refusal (407, 403, 502, ...) fails as an I/O error
/// naming the proxy, so it counts as an unreachable gateway.
pub async fn open(endpoint: &Endpoint) -> io::Result<Stream> {
    let proxy = endpoint.proxy.as_deref();
    let first_hop = proxy.map_or_else(|| endpoint.addr.clone(), Proxy::addr);
    let mut tcp = TcpStream::connect(&first_hop)
        .await
        .map_err(|source| match proxy {
            None => source,
            Some(_) => proxy::ProxyError::Connect {
                proxy: first_hop.clone(),
                source,
            }
            .into(),
        })?;
    if let Some(proxy) = proxy {
        proxy::handshake(&mut tcp, proxy, &endpoint.addr).await?;
    }
    // Frames and requests are coalesced before they are written; Nagle
    // would only add a round trip to the last of them.
    tcp.set_nodelay(true)?;
    TlsConnector::from(endpoint.tls.clone())
        .connect(endpoint.server_name.clone(), tcp)
        .await
}

/// [`open`], bounded by `timeout` (which then fails as `TimedOut`, naming
/// the proxy it went through).
pub async fn connect(endpoint: &Endpoint, timeout: Duration) -> io::Result<Stream> {
    tokio::time::timeout(timeout, open(endpoint))
        .await
        .unwrap_or_else(|_| {
            let via = endpoint
                .proxy
                .as_ref()
                .map(|p| format!(" (via the proxy {p})"))
                .unwrap_or_default();
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out{via}"),
            ))
        })
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
            proxy: None,
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

    #[tokio::test]
    async fn a_silent_proxy_times_out_and_is_named_without_its_password() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://u:hunter2@{}", listener.local_addr().unwrap());
        let mut target = endpoint("gateway.example:2195".into());
        target.proxy = Some(Arc::new(Proxy::parse(&uri).unwrap()));
        let e = connect(&target, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let shown = e.to_string();
        assert!(shown.contains("via the proxy http://127.0.0.1:"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        drop(listener);
    }

    #[tokio::test]
    async fn a_refused_proxy_is_named_as_the_proxy() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let mut target = endpoint("gateway.example:2195".into());
        target.proxy = Some(Arc::new(Proxy::parse(&format!("http://{addr}")).unwrap()));
        let e = connect(&target, Duration::from_secs(5)).await.unwrap_err();
        assert!(!is_tls_failure(&e), "{e}");
        assert!(e.to_string().contains("cannot connect to the proxy"), "{e}");
    }
}
