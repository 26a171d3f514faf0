//! The feedback service poller: every `feedback_interval`, read the list of
//! devices that no longer take the app's notifications and publish each as an
//! `unregistered` result. APNs clears the list once read, so a tuple is only
//! let go after the broker confirmed its result.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::apns::frame::FeedbackTuple;
use crate::apns::lane::Target;
use crate::metrics::Stats;
use crate::pipeline::ResultRequest;
use crate::results::Event;

/// A feedback connection that sends nothing for this long is abandoned.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Poller {
    pub app: Arc<str>,
    pub target: Arc<Target>,
    pub interval: Duration,
    pub connect_timeout: Duration,
    pub results: mpsc::Sender<ResultRequest>,
    pub stats: Arc<Stats>,
}

impl Poller {
    /// Polls at once, then every `interval`, until `stop` (a reload retiring
    /// this poller, or shutdown).
    pub async fn run(self, stop: CancellationToken) {
        loop {
            let target = self.target.clone();
            let polled = tokio::select! {
                r = poll(&target, self.connect_timeout) => r,
                _ = stop.cancelled() => return,
            };
            match polled {
                Ok(tuples) => {
                    if !tuples.is_empty() {
                        tracing::info!(app = %self.app, count = tuples.len(), "feedback service reported unregistered devices");
                    }
                    self.stats.feedback_tokens.add(tuples.len() as u64);
                    // Not cut short by `stop`: APNs has forgotten these tuples,
                    // so they are published until confirmed or the daemon is gone.
                    self.publish(tuples).await;
                }
                Err(e) => {
                    tracing::warn!(app = %self.app, addr = %target.addr, error = %e, "feedback poll failed")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Publishes every tuple, again and again until each one is confirmed:
    /// a dropped confirm channel means its broker session died.
    async fn publish(&self, tuples: Vec<FeedbackTuple>) {
        let mut todo = tuples;
        while !todo.is_empty() {
            let mut waiting = Vec::with_capacity(todo.len());
            for t in todo {
                let (tx, rx) = oneshot::channel();
                let event = Event::Unregistered {
                    app: self.app.clone(),
                    token: t.token,
                    timestamp: t.timestamp,
                };
                if self.results.send((event, tx)).await.is_err() {
                    return;
                }
                waiting.push((t, rx));
            }
            todo = Vec::new();
            for (t, rx) in waiting {
                if rx.await.is_err() {
                    todo.push(t);
                }
            }
            if !todo.is_empty() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Connects, reads until the service closes, decodes the tuples.
pub async fn poll(target: &Target, connect_timeout: Duration) -> io::Result<Vec<FeedbackTuple>> {
    let connect = async {
        let tcp = crate::proxy::tcp(target.proxy.as_deref(), &target.addr, connect_timeout).await?;
        TlsConnector::from(target.tls.clone())
            .connect(target.server_name.clone(), tcp)
            .await
    };
    let mut stream = tokio::time::timeout(connect_timeout, connect)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let mut buf = Vec::new();
    match tokio::time::timeout(READ_TIMEOUT, stream.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => {}
        // The service closes without close_notify; what was read is complete tuples or not.
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "feedback read timed out",
            ))
        }
    }
    let mut tuples = Vec::new();
    let mut rest = &buf[..];
    loop {
        match FeedbackTuple::decode(rest) {
            Ok(Some((used, t))) => {
                tuples.push(t);
                rest = &rest[used..];
            }
            Ok(None) => break,
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
    if !rest.is_empty() {
        tracing::warn!(bytes = rest.len(), "feedback service ended mid-tuple");
    }
    Ok(tuples)
}
