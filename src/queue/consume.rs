//! The worker: consume deliveries, process them, and settle each one exactly once as
//! ack (stored or skipped), delayed retry (transient failure) or dead letter (permanent
//! failure or attempts exhausted). A delivery is acked only after the store write returned
//! or its republished copy was confirmed; anything else stays unacked and is redelivered.
//!
//! Lifecycle: connect → declare topology → consume; on connection loss, reconnect with
//! backoff and resume (giving up after `worker.reconnect_give_up_secs`); on shutdown, stop
//! taking deliveries, finish in-flight ones within `worker.shutdown_grace_secs`, close.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_lite::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Connection, ConnectionProperties};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::budget::{ByteBudget, MessageFootprint};
use super::dlq::republish_failed;
use super::headers::{H_ATTEMPTS, get_u64};
use super::{QueueError, Topology};
use crate::breaker::BreakerState;
use crate::config::PipelineConfig;
use crate::embed::Embedder;
use crate::health::Health;
use crate::message::{Rules, decode, peek_tenant};
use crate::process::{Failure, Pipeline, Processed};
use crate::retry::{tier_delay, with_retries};
use crate::store::VectorStore;
use crate::telemetry::names;

/// How a worker run ends besides a signal.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Exit once the main and retry queues are empty and nothing is in flight.
    pub exit_when_idle: bool,
    /// With `exit_when_idle`: how long no delivery may arrive before the queues are checked.
    pub idle_grace: Duration,
}

/// What a worker run did, counted per outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Documents embedded and written.
    pub stored: u64,
    /// Documents skipped because the store already had that content.
    pub unchanged: u64,
    /// Messages skipped because the store had a newer version.
    pub stale: u64,
    /// Documents deleted.
    pub deleted: u64,
    /// Messages sent to a delayed-retry tier.
    pub retried: u64,
    /// Messages sent to the DLQ.
    pub dead_lettered: u64,
    /// Times the worker reconnected to the broker.
    pub reconnects: u64,
}

#[derive(Default)]
struct Counters {
    stored: AtomicU64,
    unchanged: AtomicU64,
    stale: AtomicU64,
    deleted: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    reconnects: AtomicU64,
}

impl Counters {
    fn report(&self) -> WorkerReport {
        WorkerReport {
            stored: self.stored.load(Ordering::Relaxed),
            unchanged: self.unchanged.load(Ordering::Relaxed),
            stale: self.stale.load(Ordering::Relaxed),
            deleted: self.deleted.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
        }
    }
}

/// Serialises processing of the same document within this worker, so two versions of one
/// document in flight at once cannot interleave their writes and deletes.
#[derive(Default)]
struct DocLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl DocLocks {
    fn get(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, lock| Arc::strong_count(lock) > 1);
        Arc::clone(map.entry(key).or_default())
    }
}

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The broker stayed unreachable for longer than `worker.reconnect_give_up_secs`.
    #[error("gave up reconnecting to RabbitMQ after {secs} s: {last}")]
    GaveUp {
        /// Seconds spent trying.
        secs: u64,
        /// The last error.
        last: QueueError,
    },
    /// An error no reconnect can fix (e.g. a topology mismatch).
    #[error(transparent)]
    Fatal(QueueError),
}

enum SessionEnd {
    Stopped,
    Lost(QueueError),
}

/// Consumes one pipeline's main queue and processes every delivery.
pub struct Worker<E, S> {
    config: Arc<PipelineConfig>,
    pipeline: Pipeline<E, S>,
    rules: Arc<Rules>,
    topology: Topology,
    locks: Arc<DocLocks>,
    counters: Arc<Counters>,
    health: Option<Arc<Health>>,
}

impl<E: Embedder, S: VectorStore> Worker<E, S> {
    /// A worker for `config`'s pipeline, processing with `pipeline`.
    pub fn new(config: PipelineConfig, pipeline: Pipeline<E, S>) -> Self {
        let rules = Rules {
            allowed_tenants: config.allowed_tenants(),
            max_document_bytes: config.limits.max_document_bytes,
            max_metadata_bytes: config.limits.max_metadata_bytes,
        };
        Worker {
            topology: Topology::new(&config),
            config: Arc::new(config),
            pipeline,
            rules: Arc::new(rules),
            locks: Arc::default(),
            counters: Arc::default(),
            health: None,
        }
    }

    /// Reports broker connectivity and breaker state to `health` (served on `/readyz`).
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
    }

    fn set_connected(&self, connected: bool) {
        if let Some(h) = &self.health {
            h.set_broker_connected(connected);
        }
    }

    /// Runs until `shutdown` completes (then drains in-flight messages), until the queues are
    /// idle with [`RunOptions::exit_when_idle`], or until the broker stays unreachable past
    /// the give-up time ([`WorkerError::GaveUp`]). A topology mismatch is
    /// [`WorkerError::Fatal`].
    pub async fn run(
        &self,
        options: RunOptions,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<WorkerReport, WorkerError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let give_up = Duration::from_secs(self.config.worker.reconnect_give_up_secs);
        let new_backoff = || {
            ExponentialBuilder::new()
                .with_jitter()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .without_max_times()
                .build()
        };
        let mut backoff = new_backoff();
        let mut down_since: Option<Instant> = None;
        loop {
            let (err, was_connected) = match self.session(&options, shutdown.as_mut()).await {
                Ok(SessionEnd::Stopped) => return Ok(self.counters.report()),
                Ok(SessionEnd::Lost(e)) => (e, true),
                Err(e @ QueueError::TopologyMismatch { .. }) => return Err(WorkerError::Fatal(e)),
                Err(e) => (e, false),
            };
            if was_connected {
                down_since = None;
                backoff = new_backoff();
            }
            let since = *down_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= give_up {
                return Err(WorkerError::GaveUp {
                    secs: since.elapsed().as_secs(),
                    last: err,
                });
            }
            let delay = backoff.next().unwrap_or(Duration::from_secs(5));
            warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "broker connection lost; reconnecting");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.as_mut() => return Ok(self.counters.report()),
            }
            self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn connect(&self) -> Result<(Connection, Channel, Channel), QueueError> {
        let url = &self.config.broker.url;
        // A named connection lets operators (and tests) find this worker's connection in
        // `rabbitmqctl list_connections name client_properties`.
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("rag-ingest worker {}", self.config.name).into());
        let conn = super::connect(url, properties, super::CONNECT_TIMEOUT).await?;
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        self.topology.declare(&publish).await?;
        let consume = conn.create_channel().await?;
        consume
            .basic_qos(self.config.broker.prefetch, BasicQosOptions::default())
            .await?;
        Ok((conn, consume, publish))
    }

    async fn session(
        &self,
        options: &RunOptions,
        mut shutdown: Pin<&mut (impl Future<Output = ()> + Send)>,
    ) -> Result<SessionEnd, QueueError> {
        let (conn, consume, publish) = self.connect().await?;
        self.set_connected(true);
        let breaker = self.pipeline.embedder().breaker();
        let tag = format!("rag-ingest-{}", uuid::Uuid::new_v4());
        let mut consumer = consume
            .basic_consume(
                self.topology.main_queue().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        info!(
            queue = %self.topology.main_queue(),
            broker = %self.config.redacted_amqp_url(),
            prefetch = self.config.broker.prefetch,
            concurrency = self.config.worker.concurrency,
            "worker consuming"
        );

        let concurrency = self.config.worker.concurrency;
        let budget = ByteBudget::new(self.config.worker.max_inflight_bytes).with_footprint(
            MessageFootprint::new(&self.config, self.pipeline.embedder().fingerprint().dims),
        );
        let mut tasks: JoinSet<Result<(), QueueError>> = JoinSet::new();
        let mut last_activity = Instant::now();
        let mut idle_tick = tokio::time::interval(Duration::from_millis(200));
        // Consecutive idle checks that found the queues empty. One is not enough: a delivery
        // may sit in the consumer's buffer (unacked, so not counted as ready) when the tick
        // wins the `select!`, and a message moving from a retry tier back to the main queue
        // is briefly in neither.
        let mut empty_checks = 0u32;
        let mut probe_ready = false;
        let end = loop {
            let can_take = tasks.len() < concurrency && budget.has_room();
            let breaker_open = breaker
                .as_ref()
                .is_some_and(|b| b.state() == BreakerState::Open);
            // While the breaker is not closed, take one delivery each time it lets a call
            // through (the probe); the others wait in the queue.
            let gated = breaker
                .as_ref()
                .is_some_and(|b| b.state() != BreakerState::Closed);
            if let (Some(b), Some(h)) = (&breaker, &self.health) {
                h.set_breaker_open(b.name(), breaker_open);
            }
            metrics::gauge!(names::BREAKER_OPEN).set(if breaker_open { 1.0 } else { 0.0 });
            metrics::gauge!(names::IN_FLIGHT).set(tasks.len() as f64);
            metrics::gauge!(names::IN_FLIGHT_BYTES).set(budget.in_flight() as f64);
            tokio::select! {
                _ = shutdown.as_mut() => {
                    info!("shutdown requested: no new deliveries, finishing in-flight messages");
                    break SessionEnd::Stopped;
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    last_activity = Instant::now();
                    empty_checks = 0;
                    match joined {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            error!(error = %e, "could not settle a delivery; the channel is unusable");
                            break SessionEnd::Lost(e);
                        }
                        Err(e) => error!(error = %e, "message task failed to complete; its delivery stays unacked until the channel closes"),
                    }
                }
                // While the embedder's breaker is open, take nothing: messages stay queued
                // instead of burning attempts; the first delivery after the interval probes.
                () = async {
                    if let Some(b) = &breaker {
                        b.ready().await;
                    }
                }, if gated && !probe_ready => {
                    probe_ready = true;
                    debug!("embedder breaker lets a probe through");
                }
                next = consumer.next(), if can_take && (!gated || probe_ready) => match next {
                    Some(Ok(delivery)) => {
                        probe_ready = false;
                        last_activity = Instant::now();
                        empty_checks = 0;
                        let acker = delivery.acker.clone();
                        let admitted = budget.admit_body(&delivery.data);
                        let task = requeue_on_panic(self.handle(delivery, publish.clone()), acker);
                        tasks.spawn(async move {
                            let _admitted = admitted;
                            task.await
                        });
                    }
                    Some(Err(e)) => break SessionEnd::Lost(QueueError::Amqp(e)),
                    None => break SessionEnd::Lost(QueueError::NotConfirmed {
                        target: self.topology.main_queue(),
                        reason: "the broker cancelled the consumer".into(),
                    }),
                },
                _ = idle_tick.tick(), if options.exit_when_idle && tasks.is_empty() => {
                    if last_activity.elapsed() >= options.idle_grace {
                        match self.topology.pending(&publish).await {
                            Ok(0) if empty_checks >= 1 => {
                                info!("queues drained; exiting");
                                break SessionEnd::Stopped;
                            }
                            Ok(0) => empty_checks += 1,
                            Ok(n) => {
                                empty_checks = 0;
                                debug!(pending = n, "waiting for queued messages");
                            }
                            Err(e) => break SessionEnd::Lost(e),
                        }
                    }
                }
            }
        };

        self.set_connected(false);
        let _ = consume
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
        match &end {
            SessionEnd::Stopped => {
                let grace = self.config.shutdown_grace();
                let drained = tokio::time::timeout(grace, async {
                    while let Some(joined) = tasks.join_next().await {
                        if let Ok(Err(e)) = joined {
                            warn!(error = %e, "delivery left unacked during shutdown");
                        }
                    }
                })
                .await;
                if drained.is_err() {
                    warn!(
                        unfinished = tasks.len(),
                        "grace period over; unfinished messages stay queued for redelivery"
                    );
                    tasks.abort_all();
                }
            }
            SessionEnd::Lost(_) => tasks.abort_all(),
        }
        let _ = consume.close(200, "bye".into()).await;
        let _ = publish.close(200, "bye".into()).await;
        let _ = conn.close(200, "bye".into()).await;
        Ok(end)
    }

    fn handle(
        &self,
        delivery: Delivery,
        publish: Channel,
    ) -> impl Future<Output = Result<(), QueueError>> + Send + 'static {
        let pipeline = self.pipeline.clone();
        let rules = Arc::clone(&self.rules);
        let config = Arc::clone(&self.config);
        let topology = self.topology.clone();
        let locks = Arc::clone(&self.locks);
        let counters = Arc::clone(&self.counters);
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_string())
            .unwrap_or_default();
        let span = info_span!(
            "message",
            pipeline = %config.name,
            message_id = %message_id,
            tenant_id = tracing::field::Empty,
            document_id = tracing::field::Empty,
            request_id = tracing::field::Empty,
            stage = tracing::field::Empty,
        );
        async move {
            let previous = get_u64(delivery.properties.headers(), H_ATTEMPTS).unwrap_or(0);
            let attempts = previous + 1;
            let outcome = match decode(&delivery.data, &rules) {
                Err(rejection) => {
                    let span = tracing::Span::current();
                    span.record("stage", "decode");
                    if let Some(t) = peek_tenant(&delivery.data) {
                        span.record("tenant_id", t.as_str());
                    }
                    Err(Failure::new(rejection.kind, crate::error::Stage::Decode, rejection.reason))
                }
                Ok(doc) => {
                    let span = tracing::Span::current();
                    span.record("tenant_id", doc.tenant.as_str());
                    span.record("document_id", doc.document_id.as_str());
                    if let Some(r) = &doc.request_id {
                        span.record("request_id", r.as_str());
                    }
                    let lock = locks.get(format!("{}/{}", doc.tenant, doc.document_id));
                    let _guard = lock.lock().await;
                    with_retries(
                        &config.retry,
                        || pipeline.process(&doc),
                        |f, delay| {
                            warn!(kind = %f.kind, stage = %f.stage, error = %f.reason, retry_in_ms = delay.as_millis() as u64, attempt = attempts, "transient failure; retrying in process");
                        },
                    )
                    .await
                }
            };
            match outcome {
                Ok(done) => {
                    let counter = match &done {
                        Processed::Stored { .. } => &counters.stored,
                        Processed::Unchanged => &counters.unchanged,
                        Processed::Stale { .. } => &counters.stale,
                        Processed::Deleted => &counters.deleted,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(names::MESSAGES, "outcome" => done.label()).increment(1);
                    metrics::gauge!(names::LAST_SUCCESS)
                        .set(chrono::Utc::now().timestamp() as f64);
                    match &done {
                        Processed::Stored { chunks, reused } => info!(chunks, reused, outcome = "stored", "document stored"),
                        Processed::Stale { stored } => info!(stored_version = stored, outcome = "stale", "older version skipped"),
                        other => info!(outcome = other.label(), "document processed"),
                    }
                }
                Err(failure) => {
                    // A breaker refusal does not burn an attempt: the message waits in a
                    // delay tier with its count unchanged until the dependency is back.
                    let attempts = if failure.circuit_open { previous } else { attempts };
                    let retry = failure.circuit_open
                        || (failure.kind.is_transient() && attempts < u64::from(config.retry.max_attempts));
                    let queue = if retry {
                        topology.retry_queue(tier_delay(&config.retry, u32::try_from(attempts).unwrap_or(u32::MAX)))
                    } else {
                        topology.dlq()
                    };
                    if let Err(e) = republish_failed(&publish, &queue, &delivery.data, &delivery.properties, &failure, attempts).await {
                        // Not confirmed: leave the source with the broker so nothing is lost.
                        let _ = delivery
                            .nack(BasicNackOptions { multiple: false, requeue: true })
                            .await;
                        return Err(e);
                    }
                    let outcome = if retry { "retried" } else { "dead_lettered" };
                    metrics::counter!(names::MESSAGES, "outcome" => outcome).increment(1);
                    if retry {
                        metrics::counter!(names::RETRIES, "stage" => failure.stage.as_str(), "kind" => failure.kind.as_str())
                            .increment(1);
                        counters.retried.fetch_add(1, Ordering::Relaxed);
                        warn!(kind = %failure.kind, stage = %failure.stage, error = %failure.reason, attempts, queue = %queue, "transient failure; scheduled a delayed retry");
                    } else {
                        metrics::counter!(names::DEAD_LETTERED, "kind" => failure.kind.as_str()).increment(1);
                        counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        warn!(kind = %failure.kind, stage = %failure.stage, error = %failure.reason, attempts, "message dead-lettered");
                    }
                }
            }
            if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                // The channel is gone: the broker redelivers; the write is idempotent.
                warn!(error = %e, "ack failed; the message will be redelivered");
                return Err(QueueError::Amqp(e));
            }
            Ok(())
        }
        .instrument(span)
    }
}

/// Runs one delivery's `work`; if it panics, hands the delivery back to the broker (nack with
/// requeue) instead of leaving it unacked for the rest of the session. The redelivery counts
/// against the main queue's `x-delivery-limit`, so a message that crashes its task every time
/// ends in the DLQ (kind `delivery_limit`) rather than holding a prefetch slot forever (and,
/// after `prefetch` such messages, stalling the worker).
async fn requeue_on_panic(
    work: impl Future<Output = Result<(), QueueError>>,
    acker: Acker,
) -> Result<(), QueueError> {
    match AssertUnwindSafe(work).catch_unwind().await {
        Ok(result) => result,
        Err(_) => {
            error!(
                "message processing panicked; requeueing the delivery (past the delivery limit the broker dead-letters it)"
            );
            acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
                .map(|_| ())
                .map_err(QueueError::Amqp)
        }
    }
}
