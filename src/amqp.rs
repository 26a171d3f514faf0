//! RabbitMQ plumbing: connections, the topology apnsd declares, and a results
//! publisher that tracks every confirm so a job is acked only after the broker
//! has its results.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use lapin::options::{
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use lapin::{Confirmation, PublisherConfirm};
use tokio::sync::oneshot;

use crate::brokers::{BrokerUris, Rotation};
use crate::config::AmqpConfig;
use crate::ledger::JobKey;
use crate::results::Event;

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("RabbitMQ: {0}")]
    Lapin(#[from] lapin::Error),
    #[error("RabbitMQ did not confirm a result within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("the broker cancelled the consumer (queue deleted?)")]
    ConsumerCancelled,
    /// The retry queue is gone (deleted while the session ran): the job stays
    /// unacked and the next session declares the queue again.
    #[error("RabbitMQ could not route a retry to queue {0} (deleted?)")]
    Unroutable(String),
}

/// Where the jobs come from and the results go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub queue: String,
    /// `x-queue-type` for the jobs queue (`classic` when absent, or `quorum`).
    pub queue_type: Option<String>,
    pub results_exchange: String,
}

/// Header counting how often a job went through the retry queue.
pub const ATTEMPTS_HEADER: &str = "x-apnsd-attempts";

impl From<&AmqpConfig> for Topology {
    fn from(amqp: &AmqpConfig) -> Self {
        Topology {
            queue: amqp.queue.clone(),
            queue_type: amqp.queue_type.clone(),
            results_exchange: amqp.results_exchange.clone(),
        }
    }
}

impl Topology {
    /// `<queue>.retry`: jobs whose app is unusable wait here until their
    /// per-message TTL runs out, then dead-letter back to the jobs queue.
    pub fn retry_queue(&self) -> String {
        format!("{}.retry", self.queue)
    }
}

/// The frame size asked for unless the URI names one (`?frame_max=`). lapin
/// keeps 32 frames of buffer per direction and connection: at RabbitMQ's
/// 128 KiB that is 16 MiB for the daemon's two connections, at 32 KiB 4 MiB,
/// and bodies are no slower to read in 32 KiB frames.
const FRAME_MAX: u32 = 32 * 1024;

pub async fn connect(uri: &str, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match uri.parse::<AMQPUri>() {
        Ok(mut parsed) => {
            parsed.query.frame_max.get_or_insert(FRAME_MAX);
            Connection::connect_uri(parsed, props).await
        }
        // lapin names what is wrong with the URI.
        Err(_) => Connection::connect(uri, props).await,
    }
}

/// Connects to the first node of `uris` that answers, trying each once from
/// a random start (one-shot commands; the daemon rotates with a backoff).
pub async fn connect_any(uris: &BrokerUris, name: &str) -> Result<Connection, lapin::Error> {
    let mut nodes = Rotation::random(uris.len());
    let mut tries = uris.len();
    loop {
        match connect(uris.get(nodes.current()), name).await {
            Ok(conn) => return Ok(conn),
            Err(e) if tries <= 1 => return Err(e),
            Err(_) => {
                tries -= 1;
                nodes.advance();
            }
        }
    }
}

/// Declares the durable jobs queue (idempotent) and sets the prefetch before
/// anything is consumed, so the broker never pushes more than we bound.
pub async fn consumer_channel(
    conn: &Connection,
    topology: &Topology,
    prefetch: u16,
) -> Result<Channel, lapin::Error> {
    let ch = conn.create_channel().await?;
    declare_queue(&ch, topology).await?;
    ch.basic_qos(prefetch, BasicQosOptions { global: false })
        .await?;
    Ok(ch)
}

/// Declares the jobs queue and its retry queue. The delay is a per-message
/// TTL, not `x-message-ttl`, so changing `retry_delay` never makes the
/// declaration clash with the queue that exists.
pub async fn declare_queue(ch: &Channel, topology: &Topology) -> Result<(), lapin::Error> {
    let mut args = FieldTable::default();
    if let Some(kind) = &topology.queue_type {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(kind.as_str().into()),
        );
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(topology.queue.as_str().into(), durable, args.clone())
        .await?;
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(topology.queue.as_str().into()),
    );
    ch.queue_declare(topology.retry_queue().as_str().into(), durable, args)
        .await?;
    Ok(())
}

/// The `x-apnsd-attempts` header of a delivery: 0 when absent or not a number.
pub fn attempts(props: &BasicProperties) -> u32 {
    let value = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(ATTEMPTS_HEADER).cloned());
    match value {
        Some(AMQPValue::LongUInt(n)) => n,
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u32::try_from(n).unwrap_or(0),
        Some(AMQPValue::ShortUInt(n)) => n.into(),
        Some(AMQPValue::ShortShortUInt(n)) => n.into(),
        _ => 0,
    }
}

fn json_props() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

/// Who is waiting for a result's confirm.
#[derive(Debug)]
pub enum Owner {
    /// The job stays unacked until this result is confirmed.
    Job(JobKey),
    /// A feedback poller, which republishes if the confirm never comes.
    Waiter(oneshot::Sender<()>),
    /// A result for a job that is final already (a late failure).
    Nobody,
}

struct InFlight {
    confirm: PublisherConfirm,
    sent: Instant,
    message: Message,
    owner: Owner,
}

/// What is needed to publish a message again after a nack.
struct Message {
    exchange: ShortString,
    routing_key: ShortString,
    body: Vec<u8>,
    props: BasicProperties,
    /// Set for retries: the broker confirms an unroutable message as well, and
    /// only a mandatory one comes back to say it was dropped.
    mandatory: bool,
}

/// Publishes results with confirms, pipelined: many in flight, resolved in order.
pub struct Publisher {
    channel: Channel,
    exchange: ShortString,
    inflight: VecDeque<InFlight>,
    confirm_timeout: Duration,
}

impl Publisher {
    pub async fn open(
        conn: &Connection,
        exchange: &str,
        confirm_timeout: Duration,
    ) -> Result<Publisher, lapin::Error> {
        let channel = conn.create_channel().await?;
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher {
            channel,
            exchange: exchange.into(),
            inflight: VecDeque::new(),
            confirm_timeout,
        })
    }

    pub fn is_idle(&self) -> bool {
        self.inflight.is_empty()
    }

    pub async fn publish(&mut self, event: &Event, owner: Owner) -> Result<(), lapin::Error> {
        let message = Message {
            exchange: self.exchange.clone(),
            routing_key: event.routing_key().into(),
            body: event.body(SystemTime::now()),
            props: json_props(),
            mandatory: false,
        };
        self.send(message, owner).await
    }

    /// Parks a job body in `queue` (a retry queue) for `delay`, stamped with
    /// its attempt count.
    pub async fn publish_retry(
        &mut self,
        queue: &str,
        body: Vec<u8>,
        attempts: u32,
        delay: Duration,
        owner: Owner,
    ) -> Result<(), lapin::Error> {
        let mut headers = FieldTable::default();
        headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongUInt(attempts));
        let message = Message {
            exchange: "".into(),
            routing_key: queue.into(),
            body,
            props: json_props()
                .with_headers(headers)
                .with_expiration(delay.as_millis().to_string().into()),
            mandatory: true,
        };
        self.send(message, owner).await
    }

    async fn send(&mut self, message: Message, owner: Owner) -> Result<(), lapin::Error> {
        let confirm = self
            .channel
            .basic_publish(
                message.exchange.clone(),
                message.routing_key.clone(),
                BasicPublishOptions {
                    mandatory: message.mandatory,
                    ..Default::default()
                },
                &message.body,
                message.props.clone(),
            )
            .await?;
        self.inflight.push_back(InFlight {
            confirm,
            sent: Instant::now(),
            message,
            owner,
        });
        Ok(())
    }

    /// Waits for the oldest unconfirmed result. A nack republishes it and
    /// yields nothing; a returned retry is an error, since its job must not be
    /// acked. Cancel-safe: the pending confirm stays in place.
    pub async fn confirmed(&mut self) -> Result<Option<Owner>, AmqpError> {
        let Some(front) = self.inflight.front_mut() else {
            return std::future::pending().await;
        };
        let deadline = front.sent + self.confirm_timeout;
        let confirmation = match tokio::time::timeout_at(deadline.into(), &mut front.confirm).await
        {
            Err(_) => return Err(AmqpError::ConfirmTimeout(self.confirm_timeout)),
            Ok(result) => result?,
        };
        let Some(done) = self.inflight.pop_front() else {
            return Ok(None);
        };
        match confirmation {
            Confirmation::Nack(_) => {
                tracing::warn!(routing_key = %done.message.routing_key, "broker refused a message: publishing it again");
                self.send(done.message, done.owner).await?;
                Ok(None)
            }
            Confirmation::Ack(Some(_)) => {
                Err(AmqpError::Unroutable(done.message.routing_key.to_string()))
            }
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(Some(done.owner)),
        }
    }
}
