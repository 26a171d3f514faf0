//! RabbitMQ plumbing: connections, the topology apnsd declares, and a results
//! publisher that tracks every confirm so a job is acked only after the broker
//! has its results.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::Future;
use std::task::Poll;
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
    /// The broker closed a fresh results channel each time (the exchange
    /// cannot be declared?): the session ends and the jobs are redelivered.
    #[error("RabbitMQ closed the results channel {MAX_REOPENS} times in a row")]
    ResultsChannel,
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

/// A confirmed publish: whom it settles, and whether the broker routed it.
#[derive(Debug)]
pub struct Confirmed {
    pub owner: Owner,
    /// Returned unrouted: no queue is bound for this routing key. The result
    /// is final all the same (a dropped result is not worth a resend).
    pub unroutable: Option<String>,
}

struct InFlight {
    /// `None` while the message waits for a channel: the one it was
    /// published on closed before taking it.
    confirm: Option<PublisherConfirm>,
    sent: Instant,
    message: Message,
    owner: Owner,
}

/// What is kept of a message until its confirm: enough to publish it again
/// (after a nack or on a fresh channel), and no more. A result keeps its
/// event, not its JSON, so a fan-out job's unconfirmed results stay small.
enum Message {
    /// A result for the results exchange, stamped `at`.
    Result { event: Event, at: SystemTime },
    /// A job parked in a retry queue for `delay`.
    Retry {
        queue: ShortString,
        body: Vec<u8>,
        attempts: u32,
        delay: Duration,
    },
}

impl Message {
    fn routing_key(&self) -> String {
        match self {
            Message::Result { event, .. } => event.routing_key(),
            Message::Retry { queue, .. } => queue.to_string(),
        }
    }
}

/// Results channels opened in a row, with no confirm between them, before
/// the session gives up (and its jobs are redelivered).
const MAX_REOPENS: u32 = 5;

/// Publishes results with confirms, pipelined: many in flight, resolved in
/// order. Results are mandatory, so one that no queue takes comes back and is
/// counted rather than dropped unseen. When the broker closes the channel (a
/// 404 because the results exchange was deleted), a fresh channel declares
/// the exchange again and takes every unconfirmed message: a result whose
/// notification was sent is never the reason to send it again.
pub struct Publisher {
    connection: Connection,
    channel: Channel,
    exchange: ShortString,
    inflight: VecDeque<InFlight>,
    confirm_timeout: Duration,
    /// Channels opened since the last confirm.
    reopens: u32,
}

impl Publisher {
    /// Publishes on `connection`, its own: it opens channels on it as they
    /// close.
    pub async fn open(
        connection: Connection,
        exchange: &str,
        confirm_timeout: Duration,
    ) -> Result<Publisher, lapin::Error> {
        Ok(Publisher {
            channel: results_channel(&connection, exchange).await?,
            connection,
            exchange: exchange.into(),
            inflight: VecDeque::new(),
            confirm_timeout,
            reopens: 0,
        })
    }

    pub fn is_idle(&self) -> bool {
        self.inflight.is_empty()
    }

    /// Closes the connection: whatever is unconfirmed is left to redelivery.
    pub async fn close(&self) {
        let _ = self.connection.close(200, "bye".into()).await;
    }

    /// The results exchange.
    pub fn exchange(&self) -> &str {
        self.exchange.as_str()
    }

    /// Messages published and not yet confirmed.
    pub fn unconfirmed(&self) -> usize {
        self.inflight.len()
    }

    pub async fn publish(&mut self, event: Event, owner: Owner) -> Result<(), lapin::Error> {
        let message = Message::Result {
            event,
            at: SystemTime::now(),
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
        let message = Message::Retry {
            queue: queue.into(),
            body,
            attempts,
            delay,
        };
        self.send(message, owner).await
    }

    /// Publishes `message`; if the channel is closed, it waits in order for
    /// the next one, which [`Publisher::confirmed`] opens.
    async fn send(&mut self, message: Message, owner: Owner) -> Result<(), lapin::Error> {
        self.send_all(vec![(message, owner)]).await
    }

    /// Publishes results together (see [`publish_all`]), in order.
    pub async fn publish_all(&mut self, results: Vec<(Event, Owner)>) -> Result<(), lapin::Error> {
        let at = SystemTime::now();
        let messages = results
            .into_iter()
            .map(|(event, owner)| (Message::Result { event, at }, owner))
            .collect();
        self.send_all(messages).await
    }

    /// Publishes `messages`; those the channel is closed for wait in order
    /// for the next one, which [`Publisher::confirmed`] opens.
    async fn send_all(&mut self, messages: Vec<(Message, Owner)>) -> Result<(), lapin::Error> {
        let mut confirms = if self.channel.status().connected() {
            publish_all(
                &self.channel,
                &self.exchange,
                messages.iter().map(|(m, _)| m),
            )
            .await
        } else {
            Vec::new()
        }
        .into_iter();
        let sent = Instant::now();
        for (message, owner) in messages {
            let confirm = match confirms.next() {
                Some(Ok(confirm)) => Some(confirm),
                Some(Err(e)) if !self.connection.status().connected() => return Err(e),
                Some(Err(_)) | None => None,
            };
            self.inflight.push_back(InFlight {
                confirm,
                sent,
                message,
                owner,
            });
        }
        Ok(())
    }

    /// Waits for the oldest unconfirmed message. A nack republishes it and
    /// yields nothing; a returned retry is an error, since its job must not be
    /// acked; a closed channel is replaced (see [`Publisher`]). Cancel-safe:
    /// the pending confirm stays in place.
    pub async fn confirmed(&mut self) -> Result<Option<Confirmed>, AmqpError> {
        let Some(front) = self.inflight.front_mut() else {
            return std::future::pending().await;
        };
        let deadline = front.sent + self.confirm_timeout;
        let Some(confirm) = front.confirm.as_mut() else {
            self.reopen().await?;
            return Ok(None);
        };
        let confirmation = match tokio::time::timeout_at(deadline.into(), confirm).await {
            Err(_) => return Err(AmqpError::ConfirmTimeout(self.confirm_timeout)),
            Ok(Err(e)) if self.connection.status().connected() => {
                tracing::warn!(exchange = %self.exchange, error = %e,
                    "results channel closed: publishing unconfirmed results again on a new one");
                self.reopen().await?;
                return Ok(None);
            }
            Ok(result) => result?,
        };
        self.reopens = 0;
        let Some(done) = self.inflight.pop_front() else {
            return Ok(None);
        };
        let routing_key = done.message.routing_key();
        match (confirmation, &done.message) {
            (Confirmation::Nack(_), _) => {
                tracing::warn!(%routing_key, "broker refused a message: publishing it again");
                self.send(done.message, done.owner).await?;
                Ok(None)
            }
            (Confirmation::Ack(Some(_)), Message::Retry { .. }) => {
                Err(AmqpError::Unroutable(routing_key))
            }
            (Confirmation::Ack(Some(_)), Message::Result { .. }) => Ok(Some(Confirmed {
                owner: done.owner,
                unroutable: Some(routing_key),
            })),
            (Confirmation::Ack(None) | Confirmation::NotRequested, _) => Ok(Some(Confirmed {
                owner: done.owner,
                unroutable: None,
            })),
        }
    }

    /// Opens a new channel (declaring the exchange again) and publishes every
    /// unconfirmed message on it, in order.
    async fn reopen(&mut self) -> Result<(), AmqpError> {
        self.reopens += 1;
        if self.reopens > MAX_REOPENS {
            return Err(AmqpError::ResultsChannel);
        }
        self.channel = results_channel(&self.connection, self.exchange.as_str()).await?;
        let now = Instant::now();
        let messages = self.inflight.iter().map(|e| &e.message);
        let confirms = publish_all(&self.channel, &self.exchange, messages).await;
        for (entry, confirm) in self.inflight.iter_mut().zip(confirms) {
            entry.confirm = Some(confirm?);
            entry.sent = now;
        }
        Ok(())
    }
}

/// A channel in confirm mode, the results exchange declared on it.
async fn results_channel(conn: &Connection, exchange: &str) -> Result<Channel, lapin::Error> {
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
    Ok(channel)
}

/// Both kinds are mandatory: the broker confirms an unroutable message as
/// well, and only a mandatory one comes back to say it was dropped.
const MANDATORY: BasicPublishOptions = BasicPublishOptions {
    mandatory: true,
    immediate: false,
};

/// A message as it goes on the wire.
struct Wire<'a> {
    exchange: ShortString,
    routing_key: ShortString,
    body: Cow<'a, [u8]>,
    props: BasicProperties,
}

impl Message {
    fn wire(&self, exchange: &ShortString) -> Wire<'_> {
        match self {
            Message::Result { event, at } => Wire {
                exchange: exchange.clone(),
                routing_key: event.routing_key().into(),
                body: Cow::Owned(event.body(*at)),
                props: json_props(),
            },
            Message::Retry {
                queue,
                body,
                attempts,
                delay,
            } => {
                let mut headers = FieldTable::default();
                headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongUInt(*attempts));
                Wire {
                    exchange: "".into(),
                    routing_key: queue.clone(),
                    body: Cow::Borrowed(body),
                    props: json_props()
                        .with_headers(headers)
                        .with_expiration(delay.as_millis().to_string().into()),
                }
            }
        }
    }
}

/// Publishes `messages` on `channel` together: each publish hands its frames
/// over when first polled, in order, so they leave in one write instead of
/// one wake-up of the connection's I/O loop per message.
async fn publish_all<'a>(
    channel: &Channel,
    exchange: &ShortString,
    messages: impl Iterator<Item = &'a Message>,
) -> Vec<Result<PublisherConfirm, lapin::Error>> {
    let wires: Vec<Wire<'_>> = messages.map(|m| m.wire(exchange)).collect();
    let mut publishes: Vec<_> = wires
        .iter()
        .map(|w| {
            Box::pin(channel.basic_publish(
                w.exchange.clone(),
                w.routing_key.clone(),
                MANDATORY,
                &w.body,
                w.props.clone(),
            ))
        })
        .collect();
    let mut done: Vec<Option<Result<PublisherConfirm, lapin::Error>>> =
        publishes.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (publish, slot) in publishes.iter_mut().zip(done.iter_mut()) {
            if slot.is_none() {
                match publish.as_mut().poll(cx) {
                    Poll::Ready(result) => *slot = Some(result),
                    Poll::Pending => waiting = true,
                }
            }
        }
        if waiting {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    done.into_iter().flatten().collect()
}
