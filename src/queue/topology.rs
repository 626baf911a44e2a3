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
//!   with a warning (see [`Topology::declare`]);
//! - the bulk lane ([`crate::lane`]): quorum queue `rag-ingest.P.bulk` bound with key
//!   `P.bulk`, with the main queue's arguments plus `x-dead-letter-routing-key: P` (the
//!   broker's own dead letters reach the one DLQ), and its own delayed-retry tiers
//!   `rag-ingest.P.bulk.retry.<ms>` dead-lettering back to `rag-ingest`/`P.bulk`, so a
//!   retried backfill message never lands in the live lane;
//! - one parked queue per lane, `rag-ingest.P.parked` and `rag-ingest.P.bulk.parked`, where
//!   messages of a tenant over its token budget wait until the budget window rolls: each
//!   copy carries a per-message `expiration` (the time left in the window), after which the
//!   broker dead-letters it back to its lane (`rag-ingest`/`P` or `P.bulk`).

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ErrorKind as LapinErrorKind, ExchangeKind};

use super::QueueError;
use crate::config::PipelineConfig;
use crate::lane::Lane;

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

    /// Every delayed-retry queue of the live lane.
    pub fn retry_queues(&self) -> Vec<String> {
        self.delays_ms
            .iter()
            .map(|d| self.retry_queue(*d))
            .collect()
    }

    /// Routing key of `lane` on the main exchange: `P` (live) or `P.bulk`.
    pub fn lane_routing_key(&self, lane: Lane) -> String {
        match lane {
            Lane::Live => self.pipeline.clone(),
            Lane::Bulk => format!("{}.bulk", self.pipeline),
        }
    }

    /// The queue of `lane`: the main queue (live) or `rag-ingest.P.bulk`.
    pub fn lane_queue(&self, lane: Lane) -> String {
        format!("{EXCHANGE}.{}", self.lane_routing_key(lane))
    }

    /// The delayed-retry queue of `lane` for `delay_ms`: `rag-ingest.P.retry.<ms>` (live) or
    /// `rag-ingest.P.bulk.retry.<ms>`.
    pub fn lane_retry_queue(&self, lane: Lane, delay_ms: u64) -> String {
        format!("{}.retry.{delay_ms}", self.lane_queue(lane))
    }

    /// The common prefixes of both lanes' delayed-retry queues.
    pub fn retry_queue_prefixes(&self) -> [String; 2] {
        Lane::ALL.map(|lane| format!("{}.retry.", self.lane_queue(lane)))
    }

    /// The queue where `lane`'s messages of a tenant over its budget wait for the window
    /// to roll: `rag-ingest.P.parked` or `rag-ingest.P.bulk.parked`.
    pub fn parked_queue(&self, lane: Lane) -> String {
        format!("{}.parked", self.lane_queue(lane))
    }

    /// The queues whose messages are waiting to be processed: both lanes and their
    /// delayed-retry tiers (not the parked queues, which wait for a budget window, nor the
    /// DLQ).
    pub fn work_queues(&self) -> Vec<String> {
        let mut queues = Vec::new();
        for lane in Lane::ALL {
            queues.push(self.lane_queue(lane));
            queues.extend(
                self.delays_ms
                    .iter()
                    .map(|d| self.lane_retry_queue(lane, *d)),
            );
        }
        queues
    }

    /// Every queue of the pipeline: [`Topology::work_queues`], the parked queues and the DLQ.
    pub fn all_queues(&self) -> Vec<String> {
        let mut queues = self.work_queues();
        queues.extend(Lane::ALL.map(|lane| self.parked_queue(lane)));
        queues.push(self.dlq());
        queues
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

        for lane in Lane::ALL {
            self.declare_lane(channel, lane).await?;
        }
        self.declare_dlq(conn).await?;
        self.bind(channel, &self.dlq(), DLX).await?;
        Ok(())
    }

    /// Declares `lane`'s queue (bound to the main exchange with its routing key), its
    /// delayed-retry tiers and its parked queue. The live lane's queue keeps exactly the
    /// arguments earlier versions declared.
    async fn declare_lane(&self, channel: &Channel, lane: Lane) -> Result<(), QueueError> {
        let key = self.lane_routing_key(lane);
        let mut main = quorum();
        str_arg(&mut main, "x-dead-letter-exchange", DLX);
        if lane == Lane::Bulk {
            // The DLQ is bound with the live key: the broker's own dead letters (delivery
            // limit) of the bulk queue must reach it too.
            str_arg(&mut main, "x-dead-letter-routing-key", &self.pipeline);
        }
        str_arg(&mut main, "x-dead-letter-strategy", "at-least-once");
        str_arg(&mut main, "x-overflow", "reject-publish");
        main.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(i32::try_from(self.delivery_limit).unwrap_or(i32::MAX)),
        );
        let queue = self.lane_queue(lane);
        self.declare_queue(channel, &queue, main).await?;
        self.bind_key(channel, &queue, EXCHANGE, &key).await?;

        for delay in &self.delays_ms {
            let mut args = back_to(&key);
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(*delay).unwrap_or(i64::MAX)),
            );
            self.declare_queue(channel, &self.lane_retry_queue(lane, *delay), args)
                .await?;
        }
        // No queue TTL: each parked copy carries its own expiration (the rest of the window).
        self.declare_queue(channel, &self.parked_queue(lane), back_to(&key))
            .await
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
            super::close_channel(&ch, "declared").await;
        }
        match declared {
            Err(QueueError::TopologyMismatch { server, .. }) => {
                let ch = conn.create_channel().await?;
                let legacy = self.declare_queue(&ch, &dlq, quorum()).await;
                if ch.status().connected() {
                    super::close_channel(&ch, "declared").await;
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
        self.bind_key(channel, queue, exchange, &self.pipeline)
            .await
    }

    async fn bind_key(
        &self,
        channel: &Channel,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> Result<(), QueueError> {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Ready-message counts of both lanes and every retry queue (passive declares; the
    /// parked queues are not counted).
    ///
    /// Fails with [`QueueError::Amqp`] if a queue does not exist or the channel is gone.
    pub async fn pending(&self, channel: &Channel) -> Result<u64, QueueError> {
        let mut total = 0u64;
        for q in self.work_queues() {
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

/// Arguments of a quorum queue whose messages the broker dead-letters back to the main
/// exchange with routing key `key` (a delayed-retry tier or a parked queue).
fn back_to(key: &str) -> FieldTable {
    let mut args = quorum();
    str_arg(&mut args, "x-dead-letter-exchange", EXCHANGE);
    str_arg(&mut args, "x-dead-letter-routing-key", key);
    str_arg(&mut args, "x-dead-letter-strategy", "at-least-once");
    str_arg(&mut args, "x-overflow", "reject-publish");
    args
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
