//! The worker: consume deliveries, process them, and settle each one exactly once as
//! ack (stored or skipped), delayed retry (transient failure) or dead letter (permanent
//! failure or attempts exhausted). A delivery is acked only after the store write returned
//! or its republished copy was confirmed; anything else stays unacked and is redelivered.
//!
//! Lifecycle: connect → declare topology → consume; on connection or channel loss (noticed
//! within a second even while nothing is being taken), reconnect with backoff and resume
//! (giving up after `worker.reconnect_give_up_secs`); on shutdown, stop taking deliveries,
//! finish in-flight ones within `worker.shutdown_grace_secs`, hand the rest back, close.
//!
//! While the embedder's circuit breaker is open the worker holds no delivery it is not
//! processing: it cancels its consumer and hands back what was prefetched (a confirmed copy
//! to the queue's tail, then an ack: see [`park`]), and consumes with prefetch 1 for the
//! probe. A requeue or a closed channel would count toward the quorum queue's delivery limit.

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
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::budget::{ByteBudget, MessageFootprint};
use super::dlq::republish_failed;
use super::headers::{H_ATTEMPTS, H_PANICS, H_TENANT, death_queues, get_str, get_u64, set_u64};
use super::publish::publish_confirmed;
use super::{EXCHANGE, Endpoints, QueueError, Topology};
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
    endpoints: Endpoints,
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
            endpoints: Endpoints::from_config(&config.broker),
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

    fn set_consuming(&self, consuming: bool) {
        if let Some(h) = &self.health {
            h.set_consuming(consuming);
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
        // A named connection lets operators (and tests) find this worker's connection in
        // `rabbitmqctl list_connections name client_properties`.
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("rag-ingest worker {}", self.config.name).into());
        let (conn, _) = self
            .endpoints
            .connect(properties, super::CONNECT_TIMEOUT)
            .await?;
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        self.topology.declare(&conn, &publish).await?;
        let consume = conn.create_channel().await?;
        Ok((conn, consume, publish))
    }

    /// Starts a consumer on the main queue for `feed` (its prefetch is set first: a
    /// per-consumer `basic.qos` applies to consumers started after it).
    async fn subscribe(&self, consume: &Channel, feed: Feed) -> Result<Subscription, QueueError> {
        let prefetch = match feed {
            Feed::Full => self.config.broker.prefetch,
            Feed::Probe => 1,
        };
        consume
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("rag-ingest-{}", uuid::Uuid::new_v4());
        let stream = consume
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
            prefetch,
            concurrency = self.config.worker.concurrency,
            feed = feed.as_str(),
            "worker consuming"
        );
        Ok(Subscription {
            stream,
            tag,
            feed,
            cancelling: false,
        })
    }

    async fn session(
        &self,
        options: &RunOptions,
        mut shutdown: Pin<&mut (impl Future<Output = ()> + Send)>,
    ) -> Result<SessionEnd, QueueError> {
        let (conn, consume, publish) = self.connect().await?;
        self.set_connected(true);
        let breaker = self.pipeline.embedder().breaker();
        let mut changes = breaker.map(|b| b.subscribe());

        let concurrency = self.config.worker.concurrency;
        let budget = ByteBudget::new(self.config.worker.max_inflight_bytes).with_footprint(
            MessageFootprint::new(&self.config, self.pipeline.embedder().fingerprint().dims),
        );
        let mut tasks: JoinSet<Result<(), QueueError>> = JoinSet::new();
        // The delivery of every running task, so that past the shutdown grace period an
        // unfinished one can be handed back without touching its delivery count.
        let mut held: HashMap<tokio::task::Id, Arc<Delivery>> = HashMap::new();
        let mut sub: Option<Subscription> = None;
        let mut last_activity = Instant::now();
        let mut idle_tick = tokio::time::interval(Duration::from_millis(200));
        // A closed channel or connection must end the session even while nothing polls the
        // consumer (breaker open, concurrency full): the broker may have closed the channel
        // (consumer_timeout, an operator) and the worker would otherwise sit without a
        // consumer forever.
        let mut liveness = tokio::time::interval(LIVENESS_CHECK);
        // Consecutive idle checks that found the queues empty. One is not enough: a delivery
        // may sit in the consumer's buffer (unacked, so not counted as ready) when the tick
        // wins the `select!`, and a message moving from a retry tier back to the main queue
        // is briefly in neither.
        let mut empty_checks = 0u32;
        // The breaker lets a probe through (its open interval has passed).
        let mut probe_ready = false;
        let end = loop {
            let state = breaker.map(|b| b.state());
            let breaker_open = state == Some(BreakerState::Open);
            let gated = state.is_some_and(|s| s != BreakerState::Closed);
            if let (Some(b), Some(h)) = (&breaker, &self.health) {
                h.set_breaker_open(b.name(), breaker_open);
            }
            metrics::gauge!(names::BREAKER_OPEN).set(if breaker_open { 1.0 } else { 0.0 });
            metrics::gauge!(names::IN_FLIGHT).set(tasks.len() as f64);
            metrics::gauge!(names::IN_FLIGHT_BYTES).set(budget.in_flight() as f64);

            // While the breaker is closed, consume with the full prefetch. While it is open,
            // hold nothing: cancel the consumer (what it had prefetched is parked, below)
            // until the probe time, then consume with prefetch 1 so the next delivery is
            // the probe and nothing else waits unacked in this process.
            let wanted = if !gated {
                Some(Feed::Full)
            } else if probe_ready {
                Some(Feed::Probe)
            } else {
                None
            };
            match &mut sub {
                Some(s) if !s.cancelling && Some(s.feed) != wanted => {
                    if let Err(e) = consume
                        .basic_cancel(s.tag.as_str().into(), BasicCancelOptions::default())
                        .await
                    {
                        break SessionEnd::Lost(QueueError::Amqp(e));
                    }
                    s.cancelling = true;
                    self.set_consuming(false);
                    info!(
                        breaker = state.map_or("none", BreakerState::as_str),
                        "consumer cancelled while the embedder breaker is not closed; prefetched deliveries are handed back"
                    );
                }
                None => {
                    if let Some(feed) = wanted {
                        match self.subscribe(&consume, feed).await {
                            Ok(s) => {
                                sub = Some(s);
                                self.set_consuming(true);
                            }
                            Err(e) => break SessionEnd::Lost(e),
                        }
                    }
                }
                _ => {}
            }

            let can_take = tasks.len() < concurrency && budget.has_room();
            let poll_feed = sub.as_ref().is_some_and(|s| s.cancelling || can_take);
            tokio::select! {
                _ = shutdown.as_mut() => {
                    info!("shutdown requested: no new deliveries, finishing in-flight messages");
                    break SessionEnd::Stopped;
                }
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    last_activity = Instant::now();
                    empty_checks = 0;
                    match joined {
                        Ok((id, Ok(()))) => {
                            held.remove(&id);
                        }
                        Ok((id, Err(e))) => {
                            held.remove(&id);
                            error!(error = %e, "could not settle a delivery; the channel is unusable");
                            break SessionEnd::Lost(e);
                        }
                        Err(e) => {
                            held.remove(&e.id());
                            error!(error = %e, "message task failed to complete; its delivery stays unacked until the channel closes");
                        }
                    }
                }
                () = async {
                    if let Some(b) = &breaker {
                        b.ready().await;
                    }
                }, if gated && !probe_ready => {
                    probe_ready = true;
                    debug!("embedder breaker lets a probe through");
                }
                changed = async {
                    match changes.as_mut() {
                        Some(rx) => rx.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    if !changed {
                        changes = None;
                    }
                    // Re-evaluate from the new state: a probe that failed re-opens the
                    // breaker and the next probe waits for its interval again.
                    probe_ready = false;
                }
                next = async {
                    match sub.as_mut() {
                        Some(s) => s.stream.next().await,
                        None => std::future::pending().await,
                    }
                }, if poll_feed => {
                    let cancelling = sub.as_ref().is_some_and(|s| s.cancelling);
                    match next {
                        Some(Ok(delivery)) if cancelling => {
                            // Prefetched but not started: hand it back without a
                            // redelivery (see `park`).
                            if let Err(e) = park(&publish, &self.topology, &delivery).await {
                                break SessionEnd::Lost(e);
                            }
                            metrics::counter!(names::MESSAGES, "outcome" => "parked").increment(1);
                            debug!("prefetched delivery handed back while the consumer is paused");
                        }
                        Some(Ok(delivery)) => {
                            last_activity = Instant::now();
                            empty_checks = 0;
                            let delivery = Arc::new(delivery);
                            let admitted = budget.admit_body(&delivery.data);
                            let work = self.handle(Arc::clone(&delivery), publish.clone());
                            let task = give_up_on_panic(
                                work,
                                Arc::clone(&delivery),
                                publish.clone(),
                                self.topology.clone(),
                                self.config.broker.delivery_limit,
                            );
                            let spawned = tasks.spawn(async move {
                                let _admitted = admitted;
                                task.await
                            });
                            held.insert(spawned.id(), delivery);
                        }
                        Some(Err(e)) => break SessionEnd::Lost(QueueError::Amqp(e)),
                        None if cancelling => sub = None,
                        None => break SessionEnd::Lost(QueueError::ConsumerCancelled {
                            consumer_tag: sub.as_ref().map(|s| s.tag.clone()).unwrap_or_default(),
                        }),
                    }
                }
                _ = liveness.tick() => {
                    if let Some(what) = closed_part(&conn, &consume, &publish) {
                        error!(closed = what, "the broker closed the worker's {what}; reconnecting");
                        break SessionEnd::Lost(QueueError::Closed { what: what.into() });
                    }
                }
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
        self.set_consuming(false);
        match &end {
            SessionEnd::Stopped => {
                if let Some(s) = sub.take() {
                    self.hand_back_prefetched(&consume, &publish, s).await;
                }
                let grace = self.config.shutdown_grace();
                let drained = tokio::time::timeout(grace, async {
                    while let Some(joined) = tasks.join_next_with_id().await {
                        match joined {
                            Ok((id, result)) => {
                                held.remove(&id);
                                if let Err(e) = result {
                                    warn!(error = %e, "delivery left unacked during shutdown");
                                }
                            }
                            Err(e) => {
                                held.remove(&e.id());
                            }
                        }
                    }
                })
                .await;
                if drained.is_err() {
                    tasks.abort_all();
                    while let Some(joined) = tasks.join_next_with_id().await {
                        if let Ok((id, _)) = joined {
                            held.remove(&id);
                        }
                    }
                    let mut handed_back = 0usize;
                    for delivery in held.values() {
                        // A task stopped before settling its delivery: hand it back (a copy
                        // at the queue's tail, then ack) so the shutdown does not count
                        // as a failed delivery. Processing is idempotent, so a task that
                        // had already written its document costs only a repeat.
                        if delivery.acker.usable()
                            && park(&publish, &self.topology, delivery).await.is_ok()
                        {
                            handed_back += 1;
                        }
                    }
                    warn!(
                        unfinished = held.len(),
                        handed_back,
                        "grace period over; unfinished messages were handed back to the queue"
                    );
                }
            }
            SessionEnd::Lost(_) => tasks.abort_all(),
        }
        let _ = consume.close(200, "bye".into()).await;
        let _ = publish.close(200, "bye".into()).await;
        let _ = conn.close(200, "bye".into()).await;
        Ok(end)
    }

    /// Cancels `sub` (unless already cancelling) and hands back every delivery it had
    /// prefetched (see [`park`]), waiting at most [`HAND_BACK_TIMEOUT`] for the broker's
    /// cancel-ok. Whatever cannot be handed back stays unacked and returns to the queue when
    /// the channel closes.
    async fn hand_back_prefetched(
        &self,
        consume: &Channel,
        publish: &Channel,
        mut sub: Subscription,
    ) {
        let drained = tokio::time::timeout(HAND_BACK_TIMEOUT, async {
            if !sub.cancelling
                && consume
                    .basic_cancel(sub.tag.as_str().into(), BasicCancelOptions::default())
                    .await
                    .is_err()
            {
                return 0usize;
            }
            let mut handed_back = 0usize;
            while let Some(Ok(delivery)) = sub.stream.next().await {
                if park(publish, &self.topology, &delivery).await.is_err() {
                    break;
                }
                handed_back += 1;
            }
            handed_back
        })
        .await;
        match drained {
            Ok(n) if n > 0 => info!(handed_back = n, "prefetched deliveries handed back"),
            Ok(_) => {}
            Err(_) => warn!("the broker did not confirm the consumer's cancel in time"),
        }
    }

    fn handle(
        &self,
        delivery: Arc<Delivery>,
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
            let headers = delivery.properties.headers();
            let previous = trusted_attempts(headers, &topology, config.retry.max_attempts);
            let attempts = previous.saturating_add(1);
            let decoded = decode(&delivery.data, &rules)
                .map_err(|rejection| Failure::new(rejection.kind, crate::error::Stage::Decode, rejection.reason))
                .and_then(|doc| match get_str(headers, H_TENANT) {
                    // The header is the producer's claim; the body is what gets stored. A
                    // header naming another tenant is a broken (or hostile) producer.
                    Some(claimed) if claimed != doc.tenant.as_str() => Err(Failure::new(
                        crate::error::ErrorKind::InvalidField,
                        crate::error::Stage::Decode,
                        format!(
                            "header `{H_TENANT}` ({claimed:?}) disagrees with the body's `tenant_id` ({:?})",
                            doc.tenant.as_str()
                        ),
                    )),
                    _ => Ok(doc),
                });
            let outcome = match decoded {
                Err(failure) => {
                    let span = tracing::Span::current();
                    span.record("stage", "decode");
                    if let Some(t) = peek_tenant(&delivery.data) {
                        span.record("tenant_id", t.as_str());
                    }
                    Err(failure)
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
                            .acker
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
            // If the channel is gone the broker redelivers; the write is idempotent.
            settled(delivery.acker.ack(BasicAckOptions::default()).await).inspect_err(|e| {
                warn!(error = %e, "ack failed; the message will be redelivered");
            })
        }
        .instrument(span)
    }
}

/// How often the session checks that its connection and channels are still open.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);

/// How long a stopping worker waits for the broker's cancel-ok while handing back
/// prefetched deliveries.
const HAND_BACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Which consumer a session keeps on the main queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// The breaker is closed (or there is none): consume with `broker.prefetch`.
    Full,
    /// The breaker is open and its probe time has come: consume with prefetch 1, so the
    /// next delivery is the probe and nothing else waits unacked in this process.
    Probe,
}

impl Feed {
    fn as_str(self) -> &'static str {
        match self {
            Feed::Full => "full",
            Feed::Probe => "probe",
        }
    }
}

/// A consumer on the main queue.
struct Subscription {
    stream: lapin::Consumer,
    tag: String,
    feed: Feed,
    /// `basic.cancel` was sent: deliveries still arriving were prefetched before it and
    /// are handed back ([`park`]) until the stream ends.
    cancelling: bool,
}

/// Which part of the session the broker has closed, if any.
fn closed_part(conn: &Connection, consume: &Channel, publish: &Channel) -> Option<&'static str> {
    if !conn.status().connected() {
        Some("connection")
    } else if !consume.status().connected() {
        Some("consumer channel")
    } else if !publish.status().connected() {
        Some("publish channel")
    } else {
        None
    }
}

/// Turns the result of an ack or nack into a settlement result. lapin answers `Ok(false)`
/// when the delivery's channel has been closed (its acker is poisoned): nothing reached the
/// broker, which redelivers the message, and the session must reconnect.
fn settled(result: Result<bool, lapin::Error>) -> Result<(), QueueError> {
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(QueueError::Closed {
            what: "consumer channel (the delivery can no longer be settled)".into(),
        }),
        Err(e) => Err(QueueError::Amqp(e)),
    }
}

/// Hands a delivery that was taken but not processed back to the queue without a
/// redelivery: publishes a copy (same body and properties, minus the broker's
/// `x-delivery-count`) to the tail of the main queue, waits for the confirm, then acks the
/// original.
///
/// Requeueing instead (`basic.nack`/`basic.reject` with requeue, a consumer-channel close)
/// increments a quorum queue's delivery count on RabbitMQ 3.x (checked on 3.10.8), so a long
/// outage would dead-letter healthy messages as `delivery_limit`; a confirmed copy plus ack
/// counts nothing. The copy keeps `x-attempts` and `x-death`, so its retry budget is the
/// original's. Fails with [`QueueError`] if the copy is not confirmed or the ack cannot be
/// sent; the original then stays with the broker.
async fn park(
    publish: &Channel,
    topology: &Topology,
    delivery: &Delivery,
) -> Result<(), QueueError> {
    let mut properties = delivery.properties.clone();
    if let Some(old) = delivery.properties.headers() {
        let mut headers = FieldTable::default();
        for (k, v) in old.inner() {
            if k.as_str() != "x-delivery-count" {
                headers.insert(k.clone(), v.clone());
            }
        }
        properties = properties.with_headers(headers);
    }
    publish_confirmed(
        publish,
        EXCHANGE,
        topology.routing_key(),
        &delivery.data,
        properties,
    )
    .await?;
    settled(delivery.acker.ack(BasicAckOptions::default()).await)
}

/// The attempts a delivery has already used, as far as they can be trusted.
///
/// `x-attempts` is written by this worker when it sends a message to a delayed-retry tier;
/// the broker then adds an `x-death` entry naming that tier's queue when it moves the
/// message back. A producer can set any header: an `x-attempts` on a message that never
/// went through this pipeline's retry tier is ignored (0), so it cannot make a message
/// skip its retries, and a trusted value is capped at `max_attempts` so it cannot overflow.
pub(crate) fn trusted_attempts(
    headers: &Option<FieldTable>,
    topology: &Topology,
    max_attempts: u32,
) -> u64 {
    let Some(claimed) = get_u64(headers, H_ATTEMPTS) else {
        return 0;
    };
    let prefix = topology.retry_queue_prefix();
    if death_queues(headers).iter().any(|q| q.starts_with(&prefix)) {
        claimed.min(u64::from(max_attempts))
    } else {
        debug!(
            claimed,
            "ignoring an x-attempts header on a message that did not come from a retry tier"
        );
        0
    }
}

/// Runs one delivery's `work`. If it panics, the delivery is not requeued (on RabbitMQ 4.3+
/// a `basic.nack` with requeue no longer counts toward the delivery limit, so a message that
/// crashes every time would loop forever): a copy with `x-panics` incremented goes to the
/// tail of the main queue and the original is acked; once `x-panics` reaches
/// `panic_limit`, the copy goes to the DLQ instead, as `delivery_limit`. If that publish
/// fails, the delivery is nacked with requeue (the broker's count is then the guard).
async fn give_up_on_panic(
    work: impl Future<Output = Result<(), QueueError>>,
    delivery: Arc<Delivery>,
    publish: Channel,
    topology: Topology,
    panic_limit: u32,
) -> Result<(), QueueError> {
    if let Ok(result) = AssertUnwindSafe(work).catch_unwind().await {
        return result;
    }
    let panics = get_u64(delivery.properties.headers(), H_PANICS)
        .unwrap_or(0)
        .saturating_add(1);
    let give_up = panics >= u64::from(panic_limit);
    error!(
        panics,
        give_up, "message processing panicked; handing the delivery back with its panic count"
    );
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    set_u64(&mut headers, H_PANICS, panics);
    let properties = delivery.properties.clone().with_headers(headers);
    let published = if give_up {
        let failure = Failure::new(
            crate::error::ErrorKind::DeliveryLimit,
            crate::error::Stage::Broker,
            format!("processing panicked {panics} times"),
        );
        metrics::counter!(names::DEAD_LETTERED, "kind" => failure.kind.as_str()).increment(1);
        let attempts = get_u64(delivery.properties.headers(), H_ATTEMPTS).unwrap_or(0);
        republish_failed(
            &publish,
            &topology.dlq(),
            &delivery.data,
            &properties,
            &failure,
            attempts,
        )
        .await
    } else {
        publish_confirmed(
            &publish,
            EXCHANGE,
            topology.routing_key(),
            &delivery.data,
            properties,
        )
        .await
    };
    match published {
        Ok(()) => settled(delivery.acker.ack(BasicAckOptions::default()).await),
        Err(e) => {
            warn!(error = %e, "could not hand back a panicked delivery; requeueing it");
            settled(
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    fn topology() -> Topology {
        let text = "name = \"p\"\n[broker]\nurl = \"amqp://g:g@127.0.0.1:5672/%2f\"\nprefetch = 8\n[tenants]\nallowed = [\"acme\"]\n[chunking]\nmax_tokens = 64\noverlap = 8\n[embedder]\nkind = \"candle\"\nmodel_dir = \"m\"\nbatch_size = 8\n[store]\nkind = \"edge\"\npath = \"data\"\ncollection = \"c\"\n[limits]\nmax_document_bytes = 1000\n";
        let config = PipelineConfig::from_toml_str(
            text,
            std::path::Path::new("t.toml"),
            std::path::Path::new("/base"),
            |_| None,
        )
        .expect("config");
        Topology::new(&config)
    }

    fn headers(attempts: i64, death_queue: Option<&str>) -> Option<FieldTable> {
        let mut h = FieldTable::default();
        set_u64(&mut h, H_ATTEMPTS, u64::try_from(attempts).unwrap_or(0));
        if let Some(q) = death_queue {
            let mut death = FieldTable::default();
            death.insert(
                "queue".into(),
                AMQPValue::LongString(LongString::from(q.to_string())),
            );
            death.insert(
                "reason".into(),
                AMQPValue::LongString(LongString::from("expired".to_string())),
            );
            h.insert(
                "x-death".into(),
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
            );
        }
        Some(h)
    }

    use lapin::types::AMQPValue;

    #[test]
    fn producer_set_attempts_are_ignored() {
        let t = topology();
        assert_eq!(trusted_attempts(&headers(i64::MAX, None), &t, 5), 0);
        assert_eq!(trusted_attempts(&headers(4, None), &t, 5), 0);
        assert_eq!(
            trusted_attempts(&headers(4, Some("rag-ingest.other.retry.100")), &t, 5),
            0,
            "another pipeline's retry tier is not ours"
        );
        assert_eq!(trusted_attempts(&None, &t, 5), 0);
    }

    #[test]
    fn attempts_from_our_retry_tier_are_kept_and_capped() {
        let t = topology();
        let tier = t.retry_queue(1_000);
        assert_eq!(trusted_attempts(&headers(2, Some(&tier)), &t, 5), 2);
        assert_eq!(trusted_attempts(&headers(i64::MAX, Some(&tier)), &t, 5), 5);
        assert_eq!(
            trusted_attempts(&headers(i64::MAX, Some(&tier)), &t, 5).saturating_add(1),
            6,
            "no overflow"
        );
    }

    #[test]
    fn a_poisoned_acker_is_a_lost_channel_not_a_settlement() {
        assert!(settled(Ok(true)).is_ok());
        assert!(matches!(settled(Ok(false)), Err(QueueError::Closed { .. })));
    }
}
