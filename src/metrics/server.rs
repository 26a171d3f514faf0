//! The HTTP endpoint that shows the counters: `/metrics` (Prometheus
//! text), `/healthz` (the process answers), `/readyz` (a broker session is
//! consuming), and its lifecycle across reloads.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Stats;

/// `metrics.listen` cannot be bound.
#[derive(Debug, thiserror::Error)]
#[error("metrics.listen: cannot listen on {addr}: {source}")]
pub struct ListenError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// The `/metrics` server in force; it stops when dropped, so a reload that
/// moves `metrics.listen` stops it by putting the new one in its place.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl MetricsServer {
    pub fn serve(
        addr: SocketAddr,
        listener: tokio::net::TcpListener,
        stats: Arc<Stats>,
        shutdown: &CancellationToken,
    ) -> MetricsServer {
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
        let stop = shutdown.child_token();
        tokio::spawn(serve(listener, stats, stop.clone()));
        MetricsServer { addr, stop }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.cancel();
        tracing::info!(addr = %self.addr, "metrics server stopped");
    }
}

/// What a reload does to the metrics server.
pub enum MetricsChange {
    Keep,
    Move(SocketAddr, tokio::net::TcpListener),
    Stop,
}

/// What a reload to `listen` does to the metrics server `current`. A new
/// address is bound before anything changes; one that overlaps the current
/// socket (`0.0.0.0` for `127.0.0.1`, same port) cannot be while that is open,
/// so it waits for the next start rather than leave no server at all.
pub async fn metrics_change(
    current: Option<&MetricsServer>,
    listen: Option<SocketAddr>,
) -> Result<MetricsChange, ListenError> {
    let serving = current.map(|m| m.addr);
    match listen {
        Some(addr) if serving == Some(addr) => Ok(MetricsChange::Keep),
        Some(addr) => match bind(addr).await {
            Ok(listener) => Ok(MetricsChange::Move(addr, listener)),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && serving.is_some_and(|old| old.port() == addr.port()) =>
            {
                tracing::warn!(%addr, "metrics.listen: the new address overlaps the one served now; it takes effect at the next start");
                Ok(MetricsChange::Keep)
            }
            Err(source) => Err(ListenError { addr, source }),
        },
        None if serving.is_some() => Ok(MetricsChange::Stop),
        None => Ok(MetricsChange::Keep),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` over plain HTTP/1.1 until
/// `shutdown`. Prometheus scrapes need nothing more than this.
pub async fn serve(listener: TcpListener, stats: Arc<Stats>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(_) => continue,
            },
            _ = shutdown.cancelled() => return,
        };
        tokio::spawn(answer(stream, stats.clone(), IDLE_TIMEOUT));
    }
}

/// Longest request head (request line and headers) read: a scrape needs a
/// few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;

/// A client that sends nothing for this long is let go.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads one request head, answers it and closes the connection.
async fn answer<S>(mut stream: S, stats: Arc<Stats>, idle: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (status, content_type, body) = match read_head(&mut stream, idle).await {
        Head::Complete(request) => respond(&request, &stats),
        Head::TooLarge => (
            "431 Request Header Fields Too Large",
            "text/plain",
            format!("request head over {MAX_HEAD} bytes\n"),
        ),
        Head::Gone => return,
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// What reading a request head came to.
#[derive(Debug, PartialEq)]
enum Head {
    Complete(String),
    TooLarge,
    /// Closed, failed or idle for too long before the head ended.
    Gone,
}

/// Reads until the blank line that ends the head, however the request is
/// split into segments, within `MAX_HEAD` bytes and `idle` between reads.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, idle: Duration) -> Head {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            return Head::Complete(String::from_utf8_lossy(&head[..end]).into_owned());
        }
        if head.len() > MAX_HEAD {
            return Head::TooLarge;
        }
        match tokio::time::timeout(idle, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return Head::Gone,
        }
    }
}

fn respond(request: &str, stats: &Stats) -> (&'static str, &'static str, String) {
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return ("405 Method Not Allowed", "text/plain", "GET only\n".into());
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            stats.render(),
        ),
        "/healthz" => ("200 OK", "text/plain", "ok\n".into()),
        "/readyz" if stats.health.is_ready() => ("200 OK", "text/plain", "ready\n".into()),
        "/readyz" => {
            let refused = stats.health.refused_apps();
            let why = if refused.is_empty() {
                "not consuming: broker session not established\n".to_owned()
            } else {
                format!(
                    "the gateway refuses the certificate of: {}\n",
                    refused.join(", ")
                )
            };
            ("503 Service Unavailable", "text/plain", why)
        }
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Binds the metrics listener, so a bad address fails start-up, not later.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server on `127.0.0.1:<free port>` that `metrics_change` can weigh
    /// new addresses against; its listener holds the port.
    async fn serving() -> (MetricsServer, tokio::net::TcpListener) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        (MetricsServer { addr, stop }, listener)
    }

    #[tokio::test]
    async fn a_metrics_reload_binds_first_and_keeps_an_overlapping_address_for_later() {
        let (current, _held) = serving().await;
        let port = current.addr.port();
        let same = metrics_change(Some(&current), Some(current.addr)).await;
        assert!(matches!(same, Ok(MetricsChange::Keep)));
        let wildcard = format!("0.0.0.0:{port}").parse().unwrap();
        let overlap = metrics_change(Some(&current), Some(wildcard)).await;
        assert!(matches!(overlap, Ok(MetricsChange::Keep)), "next start");
        let moved = metrics_change(Some(&current), Some("127.0.0.1:0".parse().unwrap())).await;
        assert!(matches!(moved, Ok(MetricsChange::Move(..))));
        assert!(matches!(
            metrics_change(Some(&current), None).await,
            Ok(MetricsChange::Stop)
        ));
        assert!(matches!(
            metrics_change(None, None).await,
            Ok(MetricsChange::Keep)
        ));
        // Another process's port: refused, and the error names the key.
        let (_other, taken) = serving().await;
        let taken = taken.local_addr().unwrap();
        assert!(
            matches!(
                metrics_change(None, Some(taken)).await,
                Err(ListenError { .. })
            ),
            "start-up fails on it"
        );
        match metrics_change(Some(&current), Some(taken)).await {
            Err(e) => assert!(
                e.to_string()
                    .starts_with("metrics.listen: cannot listen on"),
                "{e}"
            ),
            Ok(_) => panic!("{taken} is in use"),
        }
    }

    #[test]
    fn endpoints_answer() {
        let s = Stats::new();
        assert!(respond("GET /healthz HTTP/1.1", &s).0.starts_with("200"));
        assert!(respond("GET /readyz HTTP/1.1", &s).0.starts_with("503"));
        s.health.set_ready(true);
        assert!(respond("GET /readyz HTTP/1.1", &s).0.starts_with("200"));
        assert!(respond("GET /metrics HTTP/1.1", &s)
            .2
            .contains("apnsd_jobs_acked_total 0"));
        assert!(respond("GET /nope HTTP/1.1", &s).0.starts_with("404"));
        assert!(respond("POST /metrics HTTP/1.1", &s).0.starts_with("405"));
    }

    /// A peer whose bytes arrive one given segment per read.
    struct Segments(std::collections::VecDeque<Vec<u8>>);

    impl tokio::io::AsyncRead for Segments {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if let Some(segment) = self.0.pop_front() {
                buf.put_slice(&segment);
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn segments(parts: &[&[u8]]) -> Segments {
        Segments(parts.iter().map(|p| p.to_vec()).collect())
    }

    #[tokio::test]
    async fn a_request_split_across_segments_is_read_whole() {
        let mut peer = segments(&[b"GET /hea", b"lthz HTTP/1.1\r\nHost: x\r", b"\n\r\n"]);
        let head = read_head(&mut peer, IDLE_TIMEOUT).await;
        assert_eq!(
            head,
            Head::Complete("GET /healthz HTTP/1.1\r\nHost: x".into())
        );
        let Head::Complete(request) = head else {
            unreachable!()
        };
        assert!(respond(&request, &Stats::new()).0.starts_with("200"));
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused_and_a_closed_one_dropped() {
        let big = vec![b'a'; 1000];
        let mut parts: Vec<&[u8]> = vec![b"GET /metrics HTTP/1.1\r\nX: "];
        parts.extend(std::iter::repeat_n(big.as_slice(), 10));
        assert_eq!(
            read_head(&mut segments(&parts), IDLE_TIMEOUT).await,
            Head::TooLarge
        );
        let mut closed = segments(&[b"GET /metrics HTTP/1.1\r\n"]);
        assert_eq!(read_head(&mut closed, IDLE_TIMEOUT).await, Head::Gone);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_is_let_go_after_the_idle_timeout() {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b"GET /hea").await.unwrap();
        let started = tokio::time::Instant::now();
        answer(server, Arc::new(Stats::new()), IDLE_TIMEOUT).await;
        assert_eq!(started.elapsed(), IDLE_TIMEOUT);
        let mut answered = Vec::new();
        client.read_to_end(&mut answered).await.unwrap();
        assert!(answered.is_empty(), "nothing is answered to half a request");
    }

    #[tokio::test]
    async fn the_server_answers_a_request_written_in_two_parts() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, Arc::new(Stats::new()), stop.clone()));
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.set_nodelay(true).unwrap();
        client.write_all(b"GET /hea").await.unwrap();
        client.write_all(b"lthz HTTP/1.1\r\n\r\n").await.unwrap();
        let mut answered = String::new();
        client.read_to_string(&mut answered).await.unwrap();
        stop.cancel();
        assert!(answered.starts_with("HTTP/1.1 200 OK"), "{answered}");
        assert!(answered.ends_with("ok\n"), "{answered}");
    }
}
