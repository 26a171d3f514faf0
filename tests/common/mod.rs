//! Shared test harness: a per-test slice of the real RabbitMQ (its own queue,
//! results exchange and results queue, removed at the end) and helpers to
//! publish jobs and collect results.
#![allow(dead_code)]

pub mod logs;
pub mod process;
pub mod reach;
pub mod relay;
pub mod rig;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use serde_json::Value;

pub const AMQP_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long any one wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(60);

/// The broker the tests use: `TEST_AMQP_URI`, or the local one. The soak
/// points it at a broker of its own, as it restarts the broker. (Not
/// `APNSD_*`: the daemons the tests spawn would read it as configuration.)
pub fn amqp_uri() -> String {
    std::env::var("TEST_AMQP_URI").unwrap_or_else(|_| AMQP_URI.to_owned())
}

/// A valid token whose first byte is `first` and whose rest encodes `n`.
pub fn token(first: u8, n: u32) -> String {
    let mut bytes = [0u8; 32];
    bytes[0] = first;
    bytes[28..].copy_from_slice(&n.to_be_bytes());
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` tokens whose first byte is `first`.
pub fn tokens(first: u8, n: u32) -> Vec<String> {
    (0..n).map(|i| token(first, i)).collect()
}

/// A one-token job with a short alert.
pub fn job(id: &str, token: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": id,
        "token": token,
        "payload": {"aps": {"alert": format!("hello {id}")}},
    }))
    .unwrap()
}

pub struct Broker {
    conn: Connection,
    ch: Channel,
    pub queue: String,
    pub exchange: String,
    pub results_queue: String,
    results: Consumer,
}

#[derive(Debug, Clone)]
pub struct Received {
    pub routing_key: String,
    pub body: Value,
}

impl Broker {
    /// Names are unique per test run, so tests can share one broker in parallel.
    pub async fn new(test: &str) -> Broker {
        let suffix: u64 = rand::random();
        let queue = format!("apnsd-test.{test}.{suffix:x}.jobs");
        let exchange = format!("apnsd-test.{test}.{suffix:x}.results");
        let results_queue = format!("apnsd-test.{test}.{suffix:x}.collected");
        let conn = Connection::connect(&amqp_uri(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ must run on 127.0.0.1:5672 (see README)");
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_declare(
            results_queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            results_queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let results = ch
            .basic_consume(
                results_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Broker {
            conn,
            ch,
            queue,
            exchange,
            results_queue,
            results,
        }
    }

    /// Config lines for `[amqp]` pointing the daemon at this test's names.
    pub fn amqp_toml(&self, prefetch: u32) -> String {
        format!(
            "[amqp]\nuri = \"{}\"\nqueue = \"{}\"\nprefetch = {prefetch}\nresults_exchange = \"{}\"\n",
            amqp_uri(),
            self.queue,
            self.exchange
        )
    }

    /// Publishes bodies to the jobs queue and waits for the broker's confirms.
    pub async fn publish_all(&self, bodies: impl IntoIterator<Item = Vec<u8>>) {
        let mut confirms = Vec::new();
        for body in bodies {
            confirms.push(
                self.ch
                    .basic_publish(
                        "".into(),
                        self.queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .unwrap(),
            );
        }
        for c in confirms {
            assert!(c.await.unwrap().is_ack());
        }
    }

    pub async fn publish_with_message_id(&self, body: &[u8], message_id: &str) {
        let c = self
            .ch
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_message_id(message_id.into()),
            )
            .await
            .unwrap();
        assert!(c.await.unwrap().is_ack());
    }

    /// Collects results until `n` arrived; panics after `within`.
    pub async fn results(&mut self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, self.results.next()).await;
            let Ok(Some(Ok(d))) = next else {
                panic!("only {} of {n} results arrived: {out:#?}", out.len());
            };
            d.ack(BasicAckOptions::default()).await.unwrap();
            out.push(Received {
                routing_key: d.routing_key.to_string(),
                body: serde_json::from_slice(&d.data).unwrap(),
            });
        }
        out
    }

    /// Results that arrive within `quiet`, expecting none: returns what came.
    pub async fn no_more_results(&mut self, quiet: Duration) -> Vec<Received> {
        let mut out = Vec::new();
        while let Ok(Some(Ok(d))) = tokio::time::timeout(quiet, self.results.next()).await {
            d.ack(BasicAckOptions::default()).await.unwrap();
            out.push(Received {
                routing_key: d.routing_key.to_string(),
                body: serde_json::from_slice(&d.data).unwrap(),
            });
        }
        out
    }

    /// Takes `n` jobs off the jobs queue (as a consumer would), parsed.
    pub async fn take_jobs(&self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let got = self
                .ch
                .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap();
            let Some(message) = got else {
                panic!("only {} of {n} jobs in the queue", out.len());
            };
            out.push(serde_json::from_slice(&message.delivery.data).unwrap());
        }
        out
    }

    /// Messages ready in the jobs queue (unacked ones are not counted while a
    /// consumer holds them; after the daemon stops they are back here).
    pub async fn queue_depth(&self) -> u32 {
        self.depth(&self.queue).await
    }

    /// Messages waiting in the jobs queue's retry queue.
    pub async fn retry_depth(&self) -> u32 {
        self.depth(&format!("{}.retry", self.queue)).await
    }

    /// Deletes the retry queue under a running daemon, as an operator might.
    pub async fn delete_retry_queue(&self) {
        let queue = format!("{}.retry", self.queue);
        self.ch
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }

    /// Deletes the results exchange under a running daemon, as an operator
    /// might (its binding to the results queue goes with it).
    pub async fn delete_results_exchange(&self) {
        self.ch
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
            .unwrap();
    }

    /// Deletes a queue the test declared besides its own (e.g. an example's).
    pub async fn delete_queue(&self, queue: &str) {
        self.ch
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }

    async fn depth(&self, queue: &str) -> u32 {
        message_count(&self.ch, queue).await
    }

    /// Deletes this test's queues (jobs and retry) and exchange.
    pub async fn cleanup(self) {
        for queue in [self.queue.clone(), format!("{}.retry", self.queue)] {
            let _ = self
                .ch
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self
            .ch
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = self.conn.close(200, "bye".into()).await;
    }
}

/// Messages ready in `queue` (a passive declare), on any channel.
pub async fn message_count(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

/// Groups results by routing key.
pub fn by_key(results: &[Received]) -> HashMap<String, Vec<Value>> {
    let mut map: HashMap<String, Vec<Value>> = HashMap::new();
    for r in results {
        map.entry(r.routing_key.clone())
            .or_default()
            .push(r.body.clone());
    }
    map
}

/// Checks `cond` every 20 ms until it holds: whether it did within `within`.
/// The wait yields to the runtime, which keeps serving the daemon and the
/// simulator under test.
pub async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    wait_until_async(within, || std::future::ready(cond())).await
}

/// Waits until `cond` holds; panics with `what` after `within`.
pub async fn eventually(within: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(
        wait_until(within, cond).await,
        "timed out waiting for {what}"
    );
}

/// [`wait_until`] for a condition that has to wait itself (a scrape, a
/// connection attempt).
pub async fn wait_until_async<F: std::future::Future<Output = bool>>(
    within: Duration,
    mut cond: impl FnMut() -> F,
) -> bool {
    let deadline = Instant::now() + within;
    while !cond().await {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// [`eventually`] for a condition that has to wait itself.
pub async fn eventually_async<F: std::future::Future<Output = bool>>(
    within: Duration,
    what: &str,
    cond: impl FnMut() -> F,
) {
    assert!(
        wait_until_async(within, cond).await,
        "timed out waiting for {what}"
    );
}

/// Runs a scenario once per protocol: `both_protocols!(name, ...)` makes a
/// module `name` holding the tests `binary` and `http2`, each calling the
/// `async fn name(Protocol)` beside it.
#[macro_export]
macro_rules! both_protocols {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use $crate::common::rig::Protocol;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn binary() {
                super::$scenario(Protocol::Binary).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn http2() {
                super::$scenario(Protocol::Http2).await;
            }
        }
    )*};
}
