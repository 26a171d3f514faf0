//! HTTP CONNECT proxies: how apnsd reaches Apple from networks that only let
//! traffic out through one.
//!
//! A connection through a proxy is a TCP connection to the proxy, a
//! `CONNECT host:port` request answered by `200`, then the usual TLS
//! handshake with APNs' server name inside that tunnel, so the proxy sees
//! neither the identity nor the notifications. The URI, the request and the
//! proxy's answer are pure code here (unit-tested); [`handshake`] is the one
//! exchange on an already connected stream, which `apns::connect` (the one
//! way out to Apple) runs before TLS when an endpoint has a proxy.
//!
//! The proxy password is a secret: [`Proxy`]'s `Display` and `Debug` and
//! every [`ProxyError`] name the proxy by `host:port` only.

use std::fmt;
use std::io;
use std::sync::Arc;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The longest answer header a proxy may send before the tunnel opens.
const MAX_REPLY: usize = 8192;

/// An HTTP proxy that tunnels with `CONNECT`.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    host: String,
    port: u16,
    credentials: Option<Credentials>,
}

/// Basic auth for the proxy; never printed.
#[derive(Clone, PartialEq, Eq)]
struct Credentials {
    user: String,
    password: String,
}

/// Why a `proxy` value is not a usable proxy URI. The URI itself is never
/// repeated: it may carry a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyUriError {
    #[error("is not a URI (use \"http://[user:password@]host:port\")")]
    NotUri,
    #[error("scheme {0:?} is not supported: only http:// proxies tunnel with CONNECT")]
    Scheme(String),
    #[error("names no host")]
    NoHost,
    #[error("must be http://[user:password@]host:port, without a path, query or fragment")]
    Extra,
    #[error("user or password is not valid percent-encoded UTF-8")]
    Encoding,
}

impl Proxy {
    /// Parses `http://[user:password@]host[:port]` (port 80 when absent);
    /// user and password may be percent-encoded.
    pub fn parse(uri: &str) -> Result<Proxy, ProxyUriError> {
        let url = url::Url::parse(uri.trim()).map_err(|_| ProxyUriError::NotUri)?;
        if url.scheme() != "http" {
            return Err(ProxyUriError::Scheme(url.scheme().to_owned()));
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
            _ => return Err(ProxyUriError::NoHost),
        };
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(ProxyUriError::Extra);
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| ProxyUriError::Encoding)
        };
        let credentials = if url.username().is_empty() && url.password().is_none() {
            None
        } else {
            Some(Credentials {
                user: decode(url.username())?,
                password: decode(url.password().unwrap_or(""))?,
            })
        };
        Ok(Proxy {
            host,
            port: url.port_or_known_default().unwrap_or(80),
            credentials,
        })
    }

    /// `host:port`, to connect to.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Whether the proxy is sent basic auth.
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// The `CONNECT` request for a tunnel to `target` (`host:port`).
    pub fn request(&self, target: &str) -> Result<Vec<u8>, ProxyError> {
        if target.is_empty() || target.bytes().any(|b| b.is_ascii_whitespace() || b < 0x20) {
            return Err(ProxyError::BadTarget);
        }
        let mut req = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: apnsd/{}\r\n",
            env!("CARGO_PKG_VERSION")
        );
        if let Some(c) = &self.credentials {
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", c.user, c.password));
            req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        req.push_str("\r\n");
        Ok(req.into_bytes())
    }
}

/// Only where the proxy is: user and password stay out of logs.
impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}:{}", self.host, self.port)
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr())
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A `proxy` configuration key: `""` turns a proxy off (an app opting out
/// of the top-level one), anything else names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxySetting {
    Off,
    Via(Arc<Proxy>),
}

impl ProxySetting {
    pub fn proxy(&self) -> Option<&Arc<Proxy>> {
        match self {
            ProxySetting::Off => None,
            ProxySetting::Via(p) => Some(p),
        }
    }
}

impl std::str::FromStr for ProxySetting {
    type Err = ProxyUriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            Ok(ProxySetting::Off)
        } else {
            Proxy::parse(s).map(|p| ProxySetting::Via(Arc::new(p)))
        }
    }
}

impl<'de> serde::Deserialize<'de> for ProxySetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|e| serde::de::Error::custom(format!("proxy {e}")))
    }
}

/// Why no tunnel was opened. Each names the proxy by `host:port` only.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot connect to the proxy {proxy}: {source}")]
    Connect { proxy: String, source: io::Error },
    /// 407, or 401 as tinyproxy answers.
    #[error("the proxy {proxy} {} (HTTP {status})",
        if *.sent { "refused the user and password given" } else { "wants credentials: give them as http://user:password@host:port" })]
    AuthRequired {
        proxy: String,
        sent: bool,
        status: u16,
    },
    #[error("the proxy {proxy} refused the tunnel to {target} (403 Forbidden)")]
    Forbidden { proxy: String, target: String },
    #[error("the proxy {proxy} cannot reach {target} (502 Bad Gateway)")]
    BadGateway { proxy: String, target: String },
    #[error("the proxy {proxy} refused the tunnel to {target} (HTTP {status})")]
    Refused {
        proxy: String,
        target: String,
        status: u16,
    },
    #[error("the proxy {proxy} answered something that is not HTTP: {what}")]
    Malformed { proxy: String, what: &'static str },
    #[error("the proxy {proxy} closed the connection without answering")]
    Closed { proxy: String },
    #[error("the tunnel target is not host:port")]
    BadTarget,
    #[error("talking to the proxy {proxy}: {source}")]
    Io { proxy: String, source: io::Error },
}

/// What a proxy's answer says so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The header has not ended yet: read more.
    Partial,
    /// The header ended after `len` bytes with this status.
    Complete { status: u16, len: usize },
}

/// Why bytes are not an HTTP/1 answer header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotHttp(pub &'static str);

/// Reads an answer header incrementally: call again with more bytes while it
/// is [`Reply::Partial`]. Only the status line matters; the headers are
/// skipped up to the blank line that ends them.
pub fn parse_reply(buf: &[u8]) -> Result<Reply, NotHttp> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n");
    let status_line = &buf[..line_end.unwrap_or(buf.len())];
    // Judge the status line as soon as it can be judged, so garbage fails fast.
    let prefix = b"HTTP/1.";
    let n = status_line.len().min(prefix.len());
    if status_line[..n] != prefix[..n] {
        return Err(NotHttp("the status line does not start with HTTP/1."));
    }
    let Some(line_end) = line_end else {
        return if buf.len() >= MAX_REPLY {
            Err(NotHttp("the status line is too long"))
        } else {
            Ok(Reply::Partial)
        };
    };
    let mut parts = status_line.splitn(3, |&b| b == b' ');
    let _version = parts.next();
    let status = parts
        .next()
        // Three digits, the first 1 to 5 (RFC 9110's classes).
        .filter(|code| {
            code.len() == 3
                && (b'1'..=b'5').contains(&code[0])
                && code.iter().all(u8::is_ascii_digit)
        })
        .and_then(|code| std::str::from_utf8(code).ok()?.parse::<u16>().ok())
        .ok_or(NotHttp("the status line has no three-digit status"))?;
    match buf[line_end..].windows(4).position(|w| w == b"\r\n\r\n") {
        Some(at) => Ok(Reply::Complete {
            status,
            len: line_end + at + 4,
        }),
        None if buf.len() >= MAX_REPLY => Err(NotHttp("the answer header is too long")),
        None => Ok(Reply::Partial),
    }
}

/// Asks the proxy on `stream` for a tunnel to `target` (`host:port`) and
/// reads its answer. On success the stream is the tunnel. It has no time
/// limit of its own: the connect it is part of is bounded as a whole.
pub async fn handshake<S>(stream: &mut S, proxy: &Proxy, target: &str) -> Result<(), ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let request = proxy.request(target)?;
    let name = proxy.addr();
    let io = |source| ProxyError::Io {
        proxy: name.clone(),
        source,
    };
    stream.write_all(&request).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    let (status, extra) = loop {
        let read = stream.read(&mut chunk).await.map_err(io)?;
        if read == 0 {
            return Err(ProxyError::Closed {
                proxy: name.clone(),
            });
        }
        buf.extend_from_slice(&chunk[..read]);
        match parse_reply(&buf) {
            Ok(Reply::Partial) => continue,
            Ok(Reply::Complete { status, len }) => break (status, buf.len() - len),
            Err(NotHttp(what)) => {
                return Err(ProxyError::Malformed {
                    proxy: name.clone(),
                    what,
                })
            }
        }
    };
    let target = target.to_owned();
    match status {
        // The TLS client speaks first, so a proxy that already sent more
        // than its header is not a tunnel.
        200..=299 if extra > 0 => Err(ProxyError::Malformed {
            proxy: name,
            what: "data arrived before the tunnel was used",
        }),
        200..=299 => Ok(()),
        401 | 407 => Err(ProxyError::AuthRequired {
            proxy: name,
            sent: proxy.has_credentials(),
            status,
        }),
        403 => Err(ProxyError::Forbidden {
            proxy: name,
            target,
        }),
        502 => Err(ProxyError::BadGateway {
            proxy: name,
            target,
        }),
        status => Err(ProxyError::Refused {
            proxy: name,
            target,
            status,
        }),
    }
}

/// Proxy refusals reach the connect-failure path as I/O errors (the gateway
/// is unreachable); the message stays the proxy's own.
impl From<ProxyError> for io::Error {
    fn from(e: ProxyError) -> io::Error {
        let kind = match &e {
            ProxyError::AuthRequired { .. } | ProxyError::Forbidden { .. } => {
                io::ErrorKind::PermissionDenied
            }
            ProxyError::Connect { source, .. } | ProxyError::Io { source, .. } => source.kind(),
            ProxyError::Closed { .. } => io::ErrorKind::ConnectionAborted,
            _ => io::ErrorKind::ConnectionRefused,
        };
        io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(uri: &str) -> Proxy {
        Proxy::parse(uri).expect("a valid proxy URI")
    }

    #[test]
    fn uris_parse_with_and_without_credentials() {
        let p = proxy("http://proxy.example:3128");
        assert_eq!(p.addr(), "proxy.example:3128");
        assert!(!p.has_credentials());
        let p = proxy("http://al%40ice:p%3Ass@10.0.0.1:8080/");
        assert_eq!(p.addr(), "10.0.0.1:8080");
        assert!(
            p.credentials
                == Some(Credentials {
                    user: "al@ice".into(),
                    password: "p:ss".into()
                })
        );
        assert_eq!(proxy("http://[::1]:8888").addr(), "[::1]:8888");
        assert_eq!(proxy("http://proxy").addr(), "proxy:80");
    }

    #[test]
    fn bad_uris_are_refused_without_repeating_them() {
        for (uri, want) in [
            ("proxy:3128", ProxyUriError::Scheme("proxy".into())),
            (
                "https://u:secret@p:1",
                ProxyUriError::Scheme("https".into()),
            ),
            ("socks5://p:1", ProxyUriError::Scheme("socks5".into())),
            ("http://u:secret@p:1/path", ProxyUriError::Extra),
            ("http://u:secret@p:1?q", ProxyUriError::Extra),
            ("not a uri", ProxyUriError::NotUri),
            ("http://u:%ff@p:1", ProxyUriError::Encoding),
        ] {
            let err = Proxy::parse(uri).expect_err(uri);
            assert_eq!(err, want, "{uri}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[test]
    fn the_password_is_never_printed() {
        let p = proxy("http://user:hunter2@proxy:3128");
        let shown = format!("{p} {p:?} {:?}", ProxySetting::Via(Arc::new(p.clone())));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("user"), "{shown}");
        assert!(shown.contains("proxy:3128"), "{shown}");
        let e = ProxyError::AuthRequired {
            proxy: p.addr(),
            sent: true,
            status: 407,
        };
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn settings_turn_off_with_an_empty_string() {
        assert_eq!("".parse::<ProxySetting>(), Ok(ProxySetting::Off));
        let on: ProxySetting = "http://p:1".parse().expect("valid");
        assert_eq!(on.proxy().map(|p| p.addr()), Some("p:1".into()));
    }

    #[test]
    fn the_request_carries_basic_auth_only_when_given() {
        let plain = String::from_utf8(
            proxy("http://p:1")
                .request("api.push.apple.com:443")
                .expect("ok"),
        )
        .expect("ascii");
        assert!(plain.starts_with("CONNECT api.push.apple.com:443 HTTP/1.1\r\n"));
        assert!(plain.contains("\r\nHost: api.push.apple.com:443\r\n"));
        assert!(!plain.contains("Proxy-Authorization"));
        assert!(plain.ends_with("\r\n\r\n"));
        let auth = String::from_utf8(
            proxy("http://Aladdin:open%20sesame@p:1")
                .request("h:1")
                .expect("ok"),
        )
        .expect("ascii");
        // RFC 7617's example.
        assert!(auth.contains("\r\nProxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n"));
    }

    #[test]
    fn targets_cannot_inject_headers() {
        let p = proxy("http://p:1");
        for bad in ["", "h:1\r\nX-Evil: 1", "h :1", "h:1\n"] {
            assert!(
                matches!(p.request(bad), Err(ProxyError::BadTarget)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn replies_parse_incrementally() {
        let reply = b"HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n";
        for cut in 0..reply.len() {
            assert_eq!(parse_reply(&reply[..cut]), Ok(Reply::Partial), "cut {cut}");
        }
        assert_eq!(
            parse_reply(reply),
            Ok(Reply::Complete {
                status: 200,
                len: reply.len()
            })
        );
        assert_eq!(
            parse_reply(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\nbody"),
            Ok(Reply::Complete {
                status: 407,
                len: 46
            })
        );
        assert_eq!(
            parse_reply(b"HTTP/1.1 502\r\n\r\n"),
            Ok(Reply::Complete {
                status: 502,
                len: 16
            })
        );
    }

    #[test]
    fn garbage_fails_fast() {
        assert!(parse_reply(b"SSH-2.0-OpenSSH").is_err());
        assert!(parse_reply(b"\x16\x03\x01").is_err());
        assert!(parse_reply(b"HTTP/1.1 abc OK\r\n").is_err());
        assert!(parse_reply(b"HTTP/1.1 2000 OK\r\n").is_err());
        assert!(parse_reply(b"HTTP/1.1 000 Zero\r\n\r\n").is_err());
        assert!(parse_reply(b"HTTP/1.1 600 Six\r\n\r\n").is_err());
        let endless = [b"HTTP/1.1 200 OK\r\n".as_slice(), &[b'x'; MAX_REPLY]].concat();
        assert!(parse_reply(&endless).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_without_panicking(bytes: Vec<u8>) {
            let _ = parse_reply(&bytes);
        }

        #[test]
        fn a_complete_reply_never_claims_more_than_it_was_given(
            status in 100u16..600,
            headers in proptest::collection::vec("[A-Za-z-]{1,10}: [ -~]{0,20}", 0..5),
        ) {
            let mut text = format!("HTTP/1.1 {status} Whatever\r\n");
            for h in &headers {
                text.push_str(h);
                text.push_str("\r\n");
            }
            text.push_str("\r\n");
            let got = parse_reply(text.as_bytes());
            proptest::prop_assert_eq!(got, Ok(Reply::Complete { status, len: text.len() }));
        }
    }

    /// Plays a proxy on one end of an in-memory pipe.
    async fn against(answer: &'static [u8], p: &Proxy) -> (Result<(), ProxyError>, String) {
        let (mut ours, mut theirs) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.ends_with(b"\r\n\r\n") {
                let n = theirs.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            theirs.write_all(answer).await.expect("write");
            // Holds the pipe open until the client is done.
            let _ = theirs.read(&mut buf).await;
            String::from_utf8(got).expect("ascii")
        });
        let result = handshake(&mut ours, p, "gw:2195").await;
        drop(ours);
        (result, server.await.expect("server"))
    }

    #[tokio::test]
    async fn handshake_outcomes_are_typed() {
        let p = proxy("http://u:pw@proxy:3128");
        let (ok, request) = against(b"HTTP/1.1 200 OK\r\n\r\n", &p).await;
        assert!(ok.is_ok(), "{ok:?}");
        assert!(request.starts_with("CONNECT gw:2195 HTTP/1.1"));
        type Expected = fn(&ProxyError) -> bool;
        let cases: [(&[u8], Expected); 6] = [
            (b"HTTP/1.1 407 Auth\r\n\r\n", |e| {
                matches!(e, ProxyError::AuthRequired { sent: true, .. })
            }),
            (b"HTTP/1.1 403 No\r\n\r\n", |e| {
                matches!(e, ProxyError::Forbidden { .. })
            }),
            (b"HTTP/1.1 502 Bad\r\n\r\n", |e| {
                matches!(e, ProxyError::BadGateway { .. })
            }),
            (b"HTTP/1.1 503 Busy\r\n\r\n", |e| {
                matches!(e, ProxyError::Refused { status: 503, .. })
            }),
            (b"\x15\x03\x03\x00\x02\x02\x28", |e| {
                matches!(e, ProxyError::Malformed { .. })
            }),
            (b"HTTP/1.1 200 OK\r\n\r\n\x16\x03", |e| {
                matches!(e, ProxyError::Malformed { .. })
            }),
        ];
        for (answer, want) in cases {
            let (got, _) = against(answer, &p).await;
            let err = got.expect_err("refused");
            assert!(want(&err), "{err:?}");
            assert!(!err.to_string().contains("pw"), "{err}");
        }
    }

    #[tokio::test]
    async fn a_proxy_that_hangs_up_is_reported() {
        let (mut ours, theirs) = tokio::io::duplex(4096);
        drop(theirs);
        let p = proxy("http://proxy:3128");
        let err = handshake(&mut ours, &p, "gw:2195")
            .await
            .expect_err("closed");
        assert!(
            matches!(err, ProxyError::Closed { .. } | ProxyError::Io { .. }),
            "{err:?}"
        );
    }
}
