//! The built-in APNs simulator: the binary gateway and the feedback service
//! over TLS with client-certificate checks, strict frame validation, fault
//! injection, and a record of what it accepted for tests to compare.

mod certs;
mod channels;
pub use channels::Broadcast;
mod faults;
mod gateway;
mod http2;
mod meter;

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use certs::{
    write_identity, CertError, ClientSpec, SimCerts, P12_PASSWORD, SIM_KEY_ID, SIM_TEAM_ID,
};
pub use faults::{
    AnswerRule, BadAnswerRule, BadRule, BadStreamRule, Faults, RefuseRule, StreamRule,
};
pub use meter::{stamped_token, Meter, Reading};

use crate::apns::frame::{FeedbackTuple, Status};
use crate::apns::http2::ApnsReason;
use crate::job::DeviceToken;

/// One notification the gateway accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub token: DeviceToken,
    pub payload: Vec<u8>,
    pub identifier: u32,
    pub expiry: Option<u32>,
    pub priority: Option<u8>,
    /// Which TLS session (1, 2, ...) carried it.
    pub connection: u64,
    /// The topic (UID) of the client certificate that session presented, so
    /// tests can tell which identity a daemon used.
    pub client_topic: Option<Arc<str>>,
    /// What an HTTP/2 request carried besides (`None` on the binary gateway).
    pub http2: Option<Http2Request>,
}

/// The headers of an accepted HTTP/2 request that tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http2Request {
    pub topic: String,
    pub push_type: Option<String>,
    pub apns_id: Option<String>,
    pub collapse_id: Option<String>,
    /// Authenticated by provider token (not by client certificate).
    pub token_auth: bool,
}

pub struct SimulatorOptions {
    pub gateway: SocketAddr,
    pub feedback: SocketAddr,
    /// The HTTP/2 provider API.
    pub http2: SocketAddr,
    pub certs: SimCerts,
    pub faults: Faults,
    /// Throughput mode: count accepted notifications, keep nothing per notification.
    pub sink: bool,
    /// Tokens carry their publish time ([`stamped_token`]): time each one into
    /// the [`Meter`]'s latency histogram.
    pub stamps: bool,
    /// Append each accepted token (hex, one per line) to this file.
    pub record: Option<PathBuf>,
    /// HTTP/2: how long each answer takes, as Apple's round trip does; other
    /// streams go on meanwhile, so a connection carries up to
    /// `max_streams ÷ delay` notifications per second.
    pub delay: Duration,
}

impl SimulatorOptions {
    /// Both services on free loopback ports, no faults.
    pub fn new(certs: SimCerts) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        SimulatorOptions {
            gateway: any,
            feedback: any,
            http2: any,
            certs,
            faults: Faults::default(),
            sink: false,
            stamps: false,
            record: None,
            delay: Duration::ZERO,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    #[error("{0}")]
    Certs(#[from] CertError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the record file {}: {source}", path.display())]
    Record {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// State shared by the simulator's tasks.
pub(crate) struct Shared {
    faults: Mutex<Faults>,
    sink: bool,
    stamps: bool,
    meter: Meter,
    accepted: Mutex<Vec<Accepted>>,
    accepted_count: AtomicU64,
    refused: Mutex<Vec<(DeviceToken, Status, u32)>>,
    http2_refused: Mutex<Vec<(DeviceToken, u16, ApnsReason)>>,
    /// HTTP/2 streams reset with `REFUSED_STREAM`.
    streams_refused: AtomicU64,
    /// Distinct provider tokens, in the order first presented.
    provider_tokens: Mutex<Vec<Arc<str>>>,
    /// The HTTP/2 answer delay, in microseconds (changeable while running).
    delay_micros: AtomicU64,
    /// Provider tokens must verify against this (the `.p8` key's public half).
    token_public_key: Vec<u8>,
    /// Broadcast channels, created and deleted through channel management.
    channels: channels::Channels,
    connections: AtomicU64,
    handshake_failures: AtomicU64,
    feedback: Mutex<Vec<FeedbackTuple>>,
    record: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
}

/// Accepts connections until `shutdown`; each runs `connection` until it
/// ends or `shutdown` cuts it short.
async fn serve<Fut>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    connection: fn(tokio::net::TcpStream, TlsAcceptor, Arc<Shared>) -> Fut,
) where
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "simulator: accept failed");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let connection = connection(tcp, acceptor.clone(), shared.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// The topic (UID) of the client certificate a TLS session presented.
fn client_topic(tls: &rustls::ServerConnection) -> Option<Arc<str>> {
    tls.peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| crate::apns::tls::CertInfo::parse(leaf).ok())
        .and_then(|info| info.topic)
        .map(Arc::from)
}

/// A poisoned lock only means a simulator task panicked; its data is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn faults(&self) -> Faults {
        lock(&self.faults).clone()
    }

    fn record_accepted(&self, accepted: Vec<Accepted>) {
        if accepted.is_empty() {
            return;
        }
        if let Some(record) = &self.record {
            let mut file = lock(record);
            for a in &accepted {
                let _ = writeln!(file, "{}", a.token);
            }
            let _ = file.flush();
        }
        lock(&self.accepted).extend(accepted);
    }

    fn record_refusal(&self, token: DeviceToken, status: Status, identifier: u32) {
        lock(&self.refused).push((token, status, identifier));
    }

    fn record_http2_refusal(&self, token: DeviceToken, status: u16, reason: ApnsReason) {
        lock(&self.http2_refused).push((token, status, reason));
    }

    /// Where `token` stands among the distinct provider tokens presented so
    /// far (0: the first), remembering it if new.
    fn provider_token_rank(&self, token: &str) -> usize {
        let mut seen = lock(&self.provider_tokens);
        if let Some(i) = seen.iter().rposition(|t| &**t == token) {
            return i;
        }
        seen.push(Arc::from(token));
        seen.len() - 1
    }

    fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_micros.load(Ordering::Relaxed))
    }

    fn take_feedback(&self) -> Vec<FeedbackTuple> {
        std::mem::take(&mut *lock(&self.feedback))
    }
}

pub struct Simulator {
    shared: Arc<Shared>,
    certs: SimCerts,
    gateway: SocketAddr,
    feedback: SocketAddr,
    http2: SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Simulator {
    pub async fn start(opts: SimulatorOptions) -> Result<Simulator, SimulatorError> {
        let acceptor = TlsAcceptor::from(opts.certs.server_config()?);
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| SimulatorError::Listen { addr, source })
        };
        let gateway_listener = bind(opts.gateway).await?;
        let feedback_listener = bind(opts.feedback).await?;
        let http2_listener = bind(opts.http2).await?;
        let http2_acceptor = TlsAcceptor::from(opts.certs.http2_server_config()?);
        let record = match &opts.record {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| SimulatorError::Record {
                        path: path.clone(),
                        source,
                    })?;
                Some(Mutex::new(std::io::BufWriter::new(file)))
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            faults: Mutex::new(opts.faults),
            sink: opts.sink,
            stamps: opts.stamps,
            meter: Meter::default(),
            accepted: Mutex::new(Vec::new()),
            accepted_count: AtomicU64::new(0),
            refused: Mutex::new(Vec::new()),
            http2_refused: Mutex::new(Vec::new()),
            streams_refused: AtomicU64::new(0),
            provider_tokens: Mutex::new(Vec::new()),
            delay_micros: AtomicU64::new(micros(opts.delay)),
            token_public_key: opts.certs.token_public_key().to_vec(),
            channels: channels::Channels::default(),
            connections: AtomicU64::new(0),
            handshake_failures: AtomicU64::new(0),
            feedback: Mutex::new(Vec::new()),
            record,
        });
        let local = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);
        let gateway = local(&gateway_listener, opts.gateway);
        let feedback = local(&feedback_listener, opts.feedback);
        let http2 = local(&http2_listener, opts.http2);
        let shutdown = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(report(shared.clone(), shutdown.clone())),
            tokio::spawn(serve(
                gateway_listener,
                acceptor.clone(),
                shared.clone(),
                shutdown.clone(),
                gateway::connection,
            )),
            tokio::spawn(serve(
                feedback_listener,
                acceptor,
                shared.clone(),
                shutdown.clone(),
                gateway::feedback,
            )),
            tokio::spawn(serve(
                http2_listener,
                http2_acceptor,
                shared.clone(),
                shutdown.clone(),
                http2::connection,
            )),
        ];
        Ok(Simulator {
            shared,
            certs: opts.certs,
            gateway,
            feedback,
            http2,
            shutdown,
            tasks,
        })
    }

    pub fn http2_addr(&self) -> SocketAddr {
        self.http2
    }

    /// Broadcast pushes accepted (`/4/broadcasts/apps/<bundle-id>`), oldest first.
    pub fn broadcasts(&self) -> Vec<Broadcast> {
        self.shared.channels.broadcasts()
    }

    /// HTTP/2 streams reset with `REFUSED_STREAM` (see [`Faults::refuse_streams`]).
    pub fn streams_refused(&self) -> u64 {
        self.shared.streams_refused.load(Ordering::Relaxed)
    }

    /// The distinct provider tokens presented so far, in order: one per mint.
    pub fn provider_tokens(&self) -> Vec<Arc<str>> {
        lock(&self.shared.provider_tokens).clone()
    }

    /// Changes the HTTP/2 answer delay (see [`SimulatorOptions::delay`]).
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_micros
            .store(micros(delay), Ordering::Relaxed);
    }

    /// HTTP/2 requests answered with an error: token, status, reason.
    pub fn http2_refused(&self) -> Vec<(DeviceToken, u16, ApnsReason)> {
        lock(&self.shared.http2_refused).clone()
    }

    pub fn gateway_addr(&self) -> SocketAddr {
        self.gateway
    }

    pub fn feedback_addr(&self) -> SocketAddr {
        self.feedback
    }

    pub fn certs(&self) -> &SimCerts {
        &self.certs
    }

    /// Every accepted notification, in the order accepted (empty in sink mode).
    pub fn accepted(&self) -> Vec<Accepted> {
        lock(&self.shared.accepted).clone()
    }

    /// Arrival times and, with `stamps`, publish → arrival latencies.
    pub fn meter(&self) -> &Meter {
        &self.shared.meter
    }

    pub fn accepted_count(&self) -> u64 {
        self.shared.accepted_count.load(Ordering::Relaxed)
    }

    /// Notifications refused by a rule: token, status, identifier.
    pub fn refused(&self) -> Vec<(DeviceToken, Status, u32)> {
        lock(&self.shared.refused).clone()
    }

    /// TLS sessions established with the gateway so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Handshakes refused (no or untrusted client certificate), on any service.
    pub fn handshake_failures(&self) -> u64 {
        self.shared.handshake_failures.load(Ordering::Relaxed)
    }

    /// Queues a tuple for the feedback service's next reader.
    pub fn add_feedback(&self, token: DeviceToken, timestamp: u32) {
        lock(&self.shared.feedback).push(FeedbackTuple { timestamp, token });
    }

    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
    }

    /// Stops both services and every connection.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Logs what the simulator accepted, every two seconds while it changes:
/// the quick start's only visible sign that notifications arrive.
async fn report(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut last = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.cancelled() => return,
        }
        let now = shared.accepted_count.load(Ordering::Relaxed);
        if now != last {
            tracing::info!(
                accepted = now,
                new = now - last,
                connections = shared.connections.load(Ordering::Relaxed),
                "simulator: notifications accepted"
            );
            last = now;
        }
    }
}

/// `apnsd simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Gateway listen address.
    #[arg(long, default_value = "127.0.0.1:22195")]
    pub gateway: SocketAddr,
    /// Feedback service listen address.
    #[arg(long, default_value = "127.0.0.1:22196")]
    pub feedback: SocketAddr,
    /// HTTP/2 provider API listen address.
    #[arg(long, default_value = "127.0.0.1:22197")]
    pub http2: SocketAddr,
    /// Where to write the generated CA and client identity (ca.pem, client.p12, ...).
    #[arg(long, default_value = "simulator-certs")]
    pub dir: PathBuf,
    /// Topic (bundle id) of the generated client certificate.
    #[arg(long, default_value = "com.example.app")]
    pub topic: String,
    /// Refuse tokens starting with HEXPREFIX with STATUS (repeatable), e.g. ff=8.
    #[arg(long, value_name = "HEXPREFIX=STATUS", value_parser = RefuseRule::parse)]
    pub refuse: Vec<RefuseRule>,
    /// Answer status 10 (shutdown) and close after every N accepted notifications.
    #[arg(long, value_name = "N")]
    pub shutdown_every: Option<u64>,
    /// Close silently after every N accepted notifications.
    #[arg(long, value_name = "N")]
    pub close_every: Option<u64>,
    /// Stop reading once N notifications were accepted.
    #[arg(long, value_name = "N")]
    pub stall_after: Option<u64>,
    /// HTTP/2: answer tokens starting with HEXPREFIX with STATUS and Apple's
    /// REASON (repeatable), e.g. ff=410:Unregistered, ee=429:TooManyRequests.
    #[arg(long, value_name = "HEXPREFIX=STATUS:REASON", value_parser = AnswerRule::parse)]
    pub answer: Vec<AnswerRule>,
    /// HTTP/2: send GOAWAY after every N accepted notifications.
    #[arg(long, value_name = "N")]
    pub goaway_every: Option<u64>,
    /// HTTP/2: SETTINGS_MAX_CONCURRENT_STREAMS of each connection (default
    /// 1000, as Apple's).
    #[arg(long, value_name = "N")]
    pub max_streams: Option<u32>,
    /// HTTP/2: answer provider tokens older than this with ExpiredProviderToken.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub token_max_age: Option<Duration>,
    /// HTTP/2: answer the first N distinct provider tokens with
    /// ExpiredProviderToken, as a server whose clock runs ahead (0: none).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub expire_tokens: u32,
    /// HTTP/2: reset streams for tokens starting with HEXPREFIX with
    /// REFUSED_STREAM (repeatable).
    #[arg(long, value_name = "HEXPREFIX", value_parser = StreamRule::parse)]
    pub refuse_stream: Vec<StreamRule>,
    /// HTTP/2: answer each request after this long (e.g. 50ms, Apple's round
    /// trip); other streams go on meanwhile.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "0ms")]
    pub delay: Duration,
    /// Count accepted notifications only (throughput mode).
    #[arg(long)]
    pub sink: bool,
    /// Append every accepted token (hex) to FILE.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Serve HEX (with TIMESTAMP, default now) on the feedback service (repeatable).
    #[arg(long, value_name = "HEX[:TIMESTAMP]", value_parser = parse_feedback)]
    pub feedback_token: Vec<FeedbackTuple>,
}

fn parse_feedback(text: &str) -> Result<FeedbackTuple, String> {
    let (hex, ts) = match text.split_once(':') {
        Some((hex, ts)) => (
            hex,
            ts.parse::<u32>().map_err(|e| format!("timestamp: {e}"))?,
        ),
        None => (
            text,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as u32),
        ),
    };
    let token = DeviceToken::parse(hex).map_err(|e| e.to_string())?;
    Ok(FeedbackTuple {
        timestamp: ts,
        token,
    })
}

/// Runs the simulator until `shutdown` completes.
pub async fn run_cli(args: SimulateArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let certs = SimCerts::generate(&args.topic)?;
    certs.write_to(&args.dir)?;
    let opts = SimulatorOptions {
        gateway: args.gateway,
        feedback: args.feedback,
        http2: args.http2,
        certs,
        faults: Faults {
            refuse: args.refuse,
            shutdown_every: args.shutdown_every,
            close_every: args.close_every,
            stall_after: args.stall_after,
            read_delay: None,
            answer: args.answer,
            goaway_every: args.goaway_every,
            max_streams: args.max_streams,
            token_max_age: args.token_max_age,
            expire_tokens: args.expire_tokens,
            refuse_streams: args.refuse_stream,
            stream_window: None,
        },
        sink: args.sink,
        stamps: false,
        record: args.record,
        delay: args.delay,
    };
    let sim = Simulator::start(opts).await?;
    for t in args.feedback_token {
        sim.add_feedback(t.token, t.timestamp);
    }
    tracing::info!(gateway = %sim.gateway_addr(), feedback = %sim.feedback_addr(),
        http2 = %sim.http2_addr(), certs = %args.dir.display(), password = P12_PASSWORD,
        key_id = SIM_KEY_ID, team_id = SIM_TEAM_ID, "APNs simulator running");
    shutdown.await;
    sim.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apns::frame::{ErrorResponse, Notification, ERROR_RESPONSE_LEN};
    use crate::apns::tls;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_rustls::TlsConnector;

    fn token(first: u8, n: u8) -> DeviceToken {
        let mut b = [n; 32];
        b[0] = first;
        DeviceToken::from_bytes(b)
    }

    fn frames(tokens: &[DeviceToken]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            Notification {
                identifier: i as u32 + 1,
                token: t.as_bytes(),
                payload: b"{\"aps\":{}}",
                expiry: None,
                priority: Some(10),
            }
            .encode(&mut out);
        }
        out
    }

    async fn start(faults: Faults) -> Simulator {
        tls::install_crypto_provider();
        let mut opts = SimulatorOptions::new(SimCerts::generate("com.example.app").unwrap());
        opts.faults = faults;
        Simulator::start(opts).await.unwrap()
    }

    async fn connect(
        sim: &Simulator,
        addr: SocketAddr,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let config = sim.certs().client_config().unwrap();
        TlsConnector::from(config)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    }

    /// Writes `bytes`, then reads until the gateway closes.
    async fn exchange(sim: &Simulator, bytes: &[u8]) -> Vec<u8> {
        let mut tls = connect(sim, sim.gateway_addr()).await;
        tls.write_all(bytes).await.unwrap();
        tls.flush().await.unwrap();
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer).await;
        answer
    }

    #[tokio::test]
    async fn accepts_silently_and_records() {
        let sim = start(Faults::default()).await;
        let tokens = [token(1, 1), token(1, 2)];
        let mut tls = connect(&sim, sim.gateway_addr()).await;
        tls.write_all(&frames(&tokens)).await.unwrap();
        tls.flush().await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sim.accepted_count() < 2 {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let accepted = sim.accepted();
        assert_eq!(accepted.iter().map(|a| a.token).collect::<Vec<_>>(), tokens);
        assert_eq!(
            (accepted[1].identifier, accepted[1].priority),
            (2, Some(10))
        );
        assert_eq!(sim.connections(), 1);
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn a_refused_token_is_answered_and_what_follows_is_dropped() {
        let sim = start(Faults {
            refuse: vec![RefuseRule::parse("ff=8").unwrap()],
            ..Default::default()
        })
        .await;
        let answer = exchange(&sim, &frames(&[token(1, 1), token(0xff, 2), token(1, 3)])).await;
        let resp = ErrorResponse::decode(answer[..ERROR_RESPONSE_LEN].try_into().unwrap()).unwrap();
        assert_eq!((resp.status, resp.identifier), (Status::InvalidToken, 2));
        assert_eq!(answer.len(), ERROR_RESPONSE_LEN);
        assert_eq!(
            sim.accepted().iter().map(|a| a.token).collect::<Vec<_>>(),
            [token(1, 1)]
        );
        assert_eq!(
            sim.refused(),
            vec![(token(0xff, 2), Status::InvalidToken, 2)]
        );
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_names_the_last_processed_and_close_says_nothing() {
        let sim = start(Faults {
            shutdown_every: Some(2),
            ..Default::default()
        })
        .await;
        let answer = exchange(&sim, &frames(&[token(1, 1), token(1, 2), token(1, 3)])).await;
        assert_eq!(
            answer,
            ErrorResponse {
                status: Status::Shutdown,
                identifier: 2
            }
            .encode()
        );
        assert_eq!(sim.accepted_count(), 2);
        sim.set_faults(Faults {
            close_every: Some(1),
            ..Default::default()
        });
        let answer = exchange(&sim, &frames(&[token(2, 1), token(2, 2)])).await;
        assert!(answer.is_empty());
        assert_eq!(sim.accepted_count(), 3);
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn malformed_frames_get_a_protocol_error() {
        let sim = start(Faults::default()).await;
        let answer = exchange(&sim, &[9, 0, 0, 0, 0, 0]).await;
        assert_eq!(
            answer,
            ErrorResponse {
                status: Status::ProtocolError,
                identifier: 0
            }
            .encode()
        );
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn clients_without_a_trusted_certificate_are_refused() {
        let sim = start(Faults::default()).await;
        let stranger = SimCerts::generate("com.stranger").unwrap();
        let config = sim.certs().client_config_for(stranger.client()).unwrap();
        let tcp = TcpStream::connect(sim.gateway_addr()).await.unwrap();
        let result = TlsConnector::from(config)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await;
        // With TLS 1.3 the client learns of the refusal on its first read.
        if let Ok(mut tls) = result {
            let _ = tls.write_all(&frames(&[token(1, 1)])).await;
            let mut buf = Vec::new();
            assert!(tls.read_to_end(&mut buf).await.is_err() || buf.is_empty());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sim.handshake_failures() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "handshake was not refused"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(sim.connections(), 0);
        assert_eq!(sim.accepted_count(), 0);
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn feedback_is_served_once() {
        let sim = start(Faults::default()).await;
        sim.add_feedback(token(3, 3), 1234);
        async fn read(sim: &Simulator) -> Vec<u8> {
            let mut tls = connect(sim, sim.feedback_addr()).await;
            let mut buf = Vec::new();
            let _ = tls.read_to_end(&mut buf).await;
            buf
        }
        let first = read(&sim).await;
        assert_eq!(
            FeedbackTuple::decode(&first).unwrap(),
            Some((
                first.len(),
                FeedbackTuple {
                    timestamp: 1234,
                    token: token(3, 3)
                }
            ))
        );
        assert!(read(&sim).await.is_empty());
        sim.shutdown().await;
    }
}
