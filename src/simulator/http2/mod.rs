//! The simulated HTTP/2 provider API: TLS with ALPN `h2`, a client
//! certificate or a provider token (ES256, checked against the simulator's
//! key), Apple's request rules ([`rules`]), an answer per stream, and the
//! faults of [`Faults`]: answers by token rule, GOAWAY after N, a low stream
//! limit, stalls (reads or flow control), expired tokens, refused streams;
//! and Apple's round trip
//! ([`SimulatorOptions::delay`](super::SimulatorOptions::delay)).
//!
//! Why its own server: the benchmark runs the simulator on the cores apnsd is
//! measured on, and a general server (a task, a `HeaderMap` and a request
//! object per stream) cost more per request than apnsd does. Here, as in
//! apnsd's client ([`crate::apns::http2::connection`]), one task per
//! connection owns the TLS socket and drives reads, writes and timers from
//! one poll function; frames are decoded in place ([`frame`], [`hpack`]), a
//! request's fields land in a reused [`Head`], and answers are appended to
//! one buffer, many to a TLS write. Answers held for the response delay wait
//! in a queue in arrival order, which is deadline order as the delay is the
//! same for every stream, while the connection takes more streams.

mod head;
mod judge;
mod reply;
mod rules;
mod server;
#[cfg(test)]
mod tests;

use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::Shared;
use crate::apns::http2::frame;
use head::Head;
use judge::Judge;
use reply::Reply;
use server::Server;

/// Bodies beyond this are not kept further (the limit check has its answer).
const MAX_READ: usize = 64 * 1024;
/// `SETTINGS_MAX_CONCURRENT_STREAMS` when the faults set none, as Apple's.
const MAX_STREAMS: u32 = 1000;
/// The connection's receive window: request bodies are small, so it is
/// given back in large steps, a WINDOW_UPDATE per thousands of requests.
const CONNECTION_WINDOW: u32 = 16 << 20;
/// The largest header block taken (HEADERS and its CONTINUATIONs).
const MAX_HEADER_BLOCK: usize = 64 << 10;
/// The largest frame taken (this end announces no other).
const MAX_FRAME: u32 = frame::DEFAULT_MAX_FRAME;
/// Answers queued beyond this stop the reading of requests until the
/// client takes them, so a client that does not read holds no more.
const WRITE_HIGH_WATER: usize = 256 << 10;
/// Ended streams kept to reuse their buffers: as many as may be open at
/// once (a client keeps the limit busy, answers come in bursts of it), up
/// to this many.
const SPARE_STREAMS: usize = 10_000;
/// A payload buffer larger than this is not kept for the next stream.
const KEEP_CAPACITY: usize = 8 << 10;
/// How long a closing connection may take to write its last frames.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

pub(super) async fn connection(tcp: TcpStream, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            tracing::debug!(error = %e, "simulator: TLS handshake refused (HTTP/2)");
            shared.handshake_failures.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let client_topic = super::client_topic(tls.get_ref().1);
    let certified = tls
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|c| !c.is_empty());
    let number = shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
    let judge = Judge {
        faults: shared.faults(),
        shared,
        certified,
        client_topic,
        number,
        credential: None,
        now: None,
        instant: None,
        arrived: None,
        accepted: Vec::new(),
        goaway_due: false,
        stalled: false,
    };
    let mut server = Server::new(tls, judge);
    if poll_fn(|cx| server.poll(cx)).await == End::Close {
        server.close().await;
    }
}

/// How a connection's driving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Write what is queued and close the TLS session.
    Close,
    /// The socket failed: nothing more can be written.
    Drop,
}

/// One request stream.
#[derive(Debug, Default)]
struct Stream {
    /// The request's fields. Once the request is judged the stream goes
    /// back to the connection's spares with its buffers, so answers waiting
    /// out a delay hold no header storage, and a new request decodes into
    /// buffers still in the cache rather than ones a delay ago.
    head: Head,
    /// The body as far as [`MAX_READ`], when something needs its bytes
    /// (a record, a channel request); only counted otherwise.
    payload: Vec<u8>,
    keep: bool,
    received: u64,
    /// Flow-control bytes taken since the stream's last WINDOW_UPDATE.
    unacked: u32,
    /// The client ended its side (END_STREAM).
    ended: bool,
    send_window: i64,
    /// Answer body not yet sent for want of window, from `unsent_at`.
    unsent: Vec<u8>,
    unsent_at: usize,
}

/// An `apns-id` to echo: a UUID's 36 characters in place, anything else
/// (which Apple refuses) boxed.
#[derive(Debug)]
enum Echo {
    Uuid([u8; 36]),
    Other(Box<[u8]>),
}

impl Echo {
    fn of(id: &[u8]) -> Echo {
        match id.try_into() {
            Ok(uuid) => Echo::Uuid(uuid),
            Err(_) => Echo::Other(id.into()),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Echo::Uuid(uuid) => uuid,
            Echo::Other(id) => id,
        }
    }
}

impl Stream {
    fn reset(&mut self) {
        self.head.clear();
        if self.payload.capacity() > KEEP_CAPACITY {
            self.payload = Vec::new();
        }
        self.payload.clear();
        self.unsent.clear();
        self.keep = false;
        self.received = 0;
        self.unacked = 0;
        self.ended = false;
        self.unsent_at = 0;
    }
}
