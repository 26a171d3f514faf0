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
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use lapin::{Confirmation, PublisherConfirm};
use tokio::sync::oneshot;

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
}

/// Where the jobs come from and the results go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub queue: String,
    /// `x-queue-type` for the jobs queue (`classic` when absent, or `quorum`).
    pub queue_type: Option<String>,
    pub results_exchange: String,
}

pub async fn connect(uri: &str, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(uri, props).await
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

pub async fn declare_queue(ch: &Channel, topology: &Topology) -> Result<(), lapin::Error> {
    let mut args = FieldTable::default();
    if let Some(kind) = &topology.queue_type {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(kind.as_str().into()),
        );
    }
    ch.queue_declare(
        topology.queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    Ok(())
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
    routing_key: ShortString,
    body: Vec<u8>,
    owner: Owner,
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
        let body = event.body(SystemTime::now());
        self.send(event.routing_key().into(), body, owner).await
    }

    async fn send(
        &mut self,
        routing_key: ShortString,
        body: Vec<u8>,
        owner: Owner,
    ) -> Result<(), lapin::Error> {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.clone(),
                routing_key.clone(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await?;
        self.inflight.push_back(InFlight {
            confirm,
            sent: Instant::now(),
            routing_key,
            body,
            owner,
        });
        Ok(())
    }

    /// Waits for the oldest unconfirmed result. A nack republishes it and
    /// yields nothing. Cancel-safe: the pending confirm stays in place.
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
                tracing::warn!(routing_key = %done.routing_key, "broker refused a result: publishing it again");
                self.send(done.routing_key, done.body, done.owner).await?;
                Ok(None)
            }
            Confirmation::Ack(_) | Confirmation::NotRequested => Ok(Some(done.owner)),
        }
    }
}
