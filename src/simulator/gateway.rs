//! The simulated binary gateway and feedback service. The gateway behaves as
//! Apple documented: success is silent; a bad frame or a refused token gets
//! `(8, status, identifier)`, then the connection closes and whatever was
//! written after it is discarded.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::{Accepted, Shared};
use crate::apns::frame::{decode_notification, ErrorResponse, Status};

const READ_BUF: usize = 256 * 1024;

/// How a gateway connection ends.
enum Close {
    Answer(ErrorResponse),
    Silent,
    Stall,
}

pub(super) async fn connection(tcp: TcpStream, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let mut tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            tracing::debug!(error = %e, "simulator: TLS handshake refused");
            shared.handshake_failures.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let number = shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
    let client_topic = super::client_topic(tls.get_ref().1);
    let mut buf: Vec<u8> = Vec::with_capacity(READ_BUF);
    let close = 'conn: loop {
        let faults = shared.faults();
        if let Some(delay) = faults.read_delay {
            tokio::time::sleep(delay).await;
        }
        if stalled(&shared, faults.stall_after) {
            break Close::Stall;
        }
        buf.reserve(READ_BUF);
        match tls.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let now = shared.meter.arrived();
        let mut pos = 0;
        let mut accepted = Vec::new();
        let end = loop {
            match decode_notification(&buf[pos..]) {
                Ok(None) => break None,
                Err(refusal) => {
                    break Some(Close::Answer(ErrorResponse {
                        status: refusal.status,
                        identifier: refusal.identifier,
                    }))
                }
                Ok(Some((used, frame))) => {
                    if let Some(status) = faults.refusal(&frame.token) {
                        shared.record_refusal(frame.token, status, frame.identifier);
                        break Some(Close::Answer(ErrorResponse {
                            status,
                            identifier: frame.identifier,
                        }));
                    }
                    pos += used;
                    if shared.stamps {
                        shared.meter.time(&frame.token, now);
                    }
                    let count = shared.accepted_count.fetch_add(1, Ordering::Relaxed) + 1;
                    if !shared.sink {
                        accepted.push(Accepted {
                            token: frame.token,
                            payload: frame.payload.to_vec(),
                            identifier: frame.identifier,
                            expiry: frame.expiry,
                            priority: frame.priority,
                            connection: number,
                            client_topic: client_topic.clone(),
                            http2: None,
                        });
                    }
                    if faults
                        .shutdown_every
                        .is_some_and(|n| n > 0 && count.is_multiple_of(n))
                    {
                        break Some(Close::Answer(ErrorResponse {
                            status: Status::Shutdown,
                            identifier: frame.identifier,
                        }));
                    }
                    if faults
                        .close_every
                        .is_some_and(|n| n > 0 && count.is_multiple_of(n))
                    {
                        break Some(Close::Silent);
                    }
                    if stalled(&shared, faults.stall_after) {
                        break Some(Close::Stall);
                    }
                }
            }
        };
        shared.record_accepted(accepted);
        if let Some(close) = end {
            break 'conn close;
        }
        buf.drain(..pos);
    };
    match close {
        Close::Answer(resp) => answer(&mut tls, resp).await,
        Close::Silent => {}
        Close::Stall => std::future::pending::<()>().await,
    }
}

fn stalled(shared: &Shared, stall_after: Option<u64>) -> bool {
    stall_after.is_some_and(|n| shared.accepted_count.load(Ordering::Relaxed) >= n)
}

async fn answer(tls: &mut TlsStream<TcpStream>, resp: ErrorResponse) {
    let _ = tls.write_all(&resp.encode()).await;
    let _ = tls.shutdown().await;
}

/// Hands out the feedback list and closes: the list is cleared once read, as Apple does.
pub(super) async fn feedback(tcp: TcpStream, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let Ok(mut tls) = acceptor.accept(tcp).await else {
        shared.handshake_failures.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let tuples = shared.take_feedback();
    let mut out = Vec::with_capacity(tuples.len() * 38);
    for t in &tuples {
        t.encode(&mut out);
    }
    let _ = tls.write_all(&out).await;
    let _ = tls.shutdown().await;
}
