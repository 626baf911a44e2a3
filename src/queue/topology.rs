//! Queue topology of one pipeline, declared idempotently by every worker and submitter.
//!
//! For pipeline `P` (all durable):
//! - exchange `rag-ingest` (direct); quorum queue `rag-ingest.P` bound with key `P`, with
//!   dead-letter exchange `rag-ingest.dlx` and `x-delivery-limit` (crash-loop guard);
//! - quorum queues `rag-ingest.P.retry.<ms>` with that TTL, dead-lettering back to
//!   `rag-ingest`/`P` (delayed retries);
//! - exchange `rag-ingest.dlx` (direct) and quorum queue `rag-ingest.P.dlq` bound with key `P`,
//!   with `x-delivery-limit` 2147483647: inspecting the DLQ hands messages back with
//!   `basic.nack(requeue)`, which RabbitMQ 3.x and 4.0–4.2 count as deliveries, and 4.0+
//!   gives quorum queues a default limit of 20, so without an explicit limit a DLQ with no
//!   dead-letter exchange of its own would drop a message after 20 inspections. (`-1`, which
//!   4.x reads as "no limit", is accepted by 3.10 but means "dead-letter on the first
//!   return" there.) A DLQ declared without the limit by an earlier version is kept as it is,
//!   with a warning (see [`Topology::declare`]).

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ErrorKind as LapinErrorKind, ExchangeKind};

use super::QueueError;
use crate::config::PipelineConfig;

/// The main exchange every document is published to.
pub const EXCHANGE: &str = "rag-ingest";
/// The dead-letter exchange the broker uses for messages it dead-letters itself.
pub const DLX: &str = "rag-ingest.dlx";
/// The DLQ's `x-delivery-limit`: the largest value (`i32::MAX`), so that returns from
/// inspection never reach it on any RabbitMQ version.
pub const DLQ_DELIVERY_LIMIT: i32 = i32::MAX;

/// Names and arguments of one pipeline's queues.
#[derive(Debug, Clone)]
pub struct Topology {
    pipeline: String,
    delays_ms: Vec<u64>,
    delivery_limit: u32,
}

impl Topology {
    /// The topology of `config`'s pipeline.
    pub fn new(config: &PipelineConfig) -> Self {
        Topology {
            pipeline: config.name.clone(),
            delays_ms: config.retry.delays_ms.clone(),
            delivery_limit: config.broker.delivery_limit,
        }
    }

    /// Routing key of the pipeline on both exchanges (the pipeline name).
    pub fn routing_key(&self) -> &str {
        &self.pipeline
    }

    /// The main queue, `rag-ingest.P`.
    pub fn main_queue(&self) -> String {
        format!("{EXCHANGE}.{}", self.pipeline)
    }

    /// The dead-letter queue, `rag-ingest.P.dlq`.
    pub fn dlq(&self) -> String {
        format!("{EXCHANGE}.{}.dlq", self.pipeline)
    }

    /// The delayed-retry queue for `delay_ms`, `rag-ingest.P.retry.<ms>`.
    pub fn retry_queue(&self, delay_ms: u64) -> String {
        format!("{EXCHANGE}.{}.retry.{delay_ms}", self.pipeline)
    }

    /// The common prefix of this pipeline's delayed-retry queues, `rag-ingest.P.retry.`
    /// (also of tiers a previous configuration declared with other delays).
    pub fn retry_queue_prefix(&self) -> String {
        format!("{EXCHANGE}.{}.retry.", self.pipeline)
    }

    /// Every delayed-retry queue.
    pub fn retry_queues(&self) -> Vec<String> {
        self.delays_ms
            .iter()
            .map(|d| self.retry_queue(*d))
            .collect()
    }

    /// Declares exchanges, queues and bindings on `channel` (the DLQ on channels of its own
    /// opened on `conn`, see [`Topology::declare_dlq`]). Idempotent.
    ///
    /// Fails with [`QueueError::TopologyMismatch`] when a queue exists with other arguments
    /// (the channel is closed by the broker then), or [`QueueError::Amqp`].
    pub async fn declare(&self, conn: &Connection, channel: &Channel) -> Result<(), QueueError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        for exchange in [EXCHANGE, DLX] {
            channel
                .exchange_declare(
                    exchange.into(),
                    ExchangeKind::Direct,
                    durable,
                    FieldTable::default(),
                )
                .await
                .map_err(|e| mismatch(exchange, e))?;
        }

        let mut main = quorum();
        str_arg(&mut main, "x-dead-letter-exchange", DLX);
        str_arg(&mut main, "x-dead-letter-strategy", "at-least-once");
        str_arg(&mut main, "x-overflow", "reject-publish");
        main.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(i32::try_from(self.delivery_limit).unwrap_or(i32::MAX)),
        );
        self.declare_queue(channel, &self.main_queue(), main)
            .await?;
        self.bind(channel, &self.main_queue(), EXCHANGE).await?;

        for delay in &self.delays_ms {
            let mut args = quorum();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(*delay).unwrap_or(i64::MAX)),
            );
            str_arg(&mut args, "x-dead-letter-exchange", EXCHANGE);
            str_arg(&mut args, "x-dead-letter-routing-key", &self.pipeline);
            str_arg(&mut args, "x-dead-letter-strategy", "at-least-once");
            str_arg(&mut args, "x-overflow", "reject-publish");
            self.declare_queue(channel, &self.retry_queue(*delay), args)
                .await?;
        }

        self.declare_dlq(conn).await?;
        self.bind(channel, &self.dlq(), DLX).await?;
        Ok(())
    }

    /// Declares the DLQ with [`DLQ_DELIVERY_LIMIT`]. A DLQ that an earlier version declared
    /// without a delivery limit makes that declare fail (PRECONDITION_FAILED, on its own
    /// channel so the caller's survives); it is then re-declared with the earlier arguments,
    /// so existing deployments keep working, and a warning says how to migrate.
    ///
    /// Fails with [`QueueError::TopologyMismatch`] if the DLQ exists with yet other
    /// arguments, or [`QueueError::Amqp`].
    async fn declare_dlq(&self, conn: &Connection) -> Result<(), QueueError> {
        let dlq = self.dlq();
        let mut args = quorum();
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(DLQ_DELIVERY_LIMIT),
        );
        let ch = conn.create_channel().await?;
        let declared = self.declare_queue(&ch, &dlq, args).await;
        if ch.status().connected() {
            let _ = ch.close(200, "declared".into()).await;
        }
        match declared {
            Err(QueueError::TopologyMismatch { server, .. }) => {
                let ch = conn.create_channel().await?;
                let legacy = self.declare_queue(&ch, &dlq, quorum()).await;
                if ch.status().connected() {
                    let _ = ch.close(200, "declared".into()).await;
                }
                legacy?;
                crate::telemetry::emit(crate::telemetry::events::LegacyDlqFound {
                    queue: &dlq,
                    broker: &server,
                });
                Ok(())
            }
            other => other,
        }
    }

    async fn declare_queue(
        &self,
        channel: &Channel,
        name: &str,
        args: FieldTable,
    ) -> Result<(), QueueError> {
        channel
            .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
            .await
            .map(|_| ())
            .map_err(|e| mismatch(name, e))
    }

    async fn bind(&self, channel: &Channel, queue: &str, exchange: &str) -> Result<(), QueueError> {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                self.pipeline.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Ready-message counts of the main queue and every retry queue (passive declares).
    ///
    /// Fails with [`QueueError::Amqp`] if a queue does not exist or the channel is gone.
    pub async fn pending(&self, channel: &Channel) -> Result<u64, QueueError> {
        let mut total = 0u64;
        for q in std::iter::once(self.main_queue()).chain(self.retry_queues()) {
            total += u64::from(queue_len(channel, &q).await?);
        }
        Ok(total)
    }
}

/// Ready messages in `queue` (passive declare; fails if it does not exist).
pub(crate) async fn queue_len(channel: &Channel, queue: &str) -> Result<u32, QueueError> {
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable().passive(),
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    str_arg(&mut args, "x-queue-type", "quorum");
    args
}

fn str_arg(args: &mut FieldTable, key: &str, value: &str) {
    args.insert(
        ShortString::from(key),
        AMQPValue::LongString(LongString::from(value.to_string())),
    );
}

fn mismatch(what: &str, e: lapin::Error) -> QueueError {
    if let LapinErrorKind::ProtocolError(amqp) = e.kind()
        && matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
        )
    {
        return QueueError::TopologyMismatch {
            what: what.to_string(),
            server: amqp.get_message().to_string(),
        };
    }
    QueueError::Amqp(e)
}
