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
//! processing: it cancels its consumers and hands back what was prefetched (a confirmed copy
//! to the queue's tail, then an ack: see [`park`]), and consumes with prefetch 1 for the
//! probe. A requeue or a closed channel would count toward the quorum queue's delivery limit.
//!
//! The worker consumes both lanes ([`crate::lane`]), each with a consumer of its own: the
//! live lane with `broker.prefetch`, the bulk lane with `worker.bulk_concurrency`. A bulk
//! delivery is taken only while fewer than `worker.bulk_concurrency` bulk messages are being
//! processed and the in-flight bytes are under the same share of `worker.max_inflight_bytes`,
//! so live deliveries always find a slot; with no live traffic the bulk lane still gets most
//! of the worker.

mod delivery;
mod session;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

use super::publish::Publisher;
use super::{Endpoints, QueueError, Topology};
use crate::config::PipelineConfig;
use crate::embed::Embedder;
use crate::health::Health;
use crate::lane::Lane;
use crate::message::Rules;
use crate::process::Pipeline;
use crate::shared::Redis;
use crate::shared::budget::TenantBudgets;
use crate::store::VectorStore;
use crate::telemetry::emit;
use crate::telemetry::events::{BrokerConnectionLost, BrokerReconnecting, WorkerConsuming};

use delivery::DocLocks;
use session::{Session, SessionEnd};

/// How a worker run ends besides a signal.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Exit once the main and retry queues are empty and nothing is in flight.
    pub exit_when_idle: bool,
    /// With `exit_when_idle`: how long no delivery may arrive before the queues are checked.
    pub idle_grace: Duration,
}

/// What a worker run did, counted per outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
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
    /// Messages deferred to a parked queue (tenant over its budget, or the budget unknown).
    pub deferred: u64,
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
    deferred: AtomicU64,
}

impl Counters {
    /// Counts a settled message's outcome.
    fn count(&self, done: &crate::process::Processed) {
        use crate::process::Processed;
        let counter = match done {
            Processed::Stored { .. } => &self.stored,
            Processed::Unchanged => &self.unchanged,
            Processed::Stale { .. } => &self.stale,
            Processed::Deleted => &self.deleted,
            // Not settled: the broker redelivers it, and that delivery is counted.
            Processed::Abandoned => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far.
    fn report(&self) -> WorkerReport {
        WorkerReport {
            stored: self.stored.load(Ordering::Relaxed),
            unchanged: self.unchanged.load(Ordering::Relaxed),
            stale: self.stale.load(Ordering::Relaxed),
            deleted: self.deleted.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            deferred: self.deferred.load(Ordering::Relaxed),
        }
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

/// Consumes one pipeline's queues (both lanes) and processes every delivery.
pub struct Worker<E, S> {
    config: Arc<PipelineConfig>,
    pipeline: Pipeline<E, S>,
    rules: Arc<Rules>,
    topology: Topology,
    endpoints: Endpoints,
    locks: Arc<DocLocks>,
    counters: Arc<Counters>,
    health: Option<Arc<Health>>,
    budgets: Option<Arc<TenantBudgets>>,
}

impl<E: Embedder, S: VectorStore> Worker<E, S> {
    /// A worker for `config`'s pipeline, processing with `pipeline`.
    /// With `[tenants.budgets]` and `[redis]`, messages are admitted against their
    /// tenant's budget ([`TenantBudgets`]).
    pub fn new(config: PipelineConfig, pipeline: Pipeline<E, S>) -> Self {
        let rules = Rules::from_config(&config);
        // The Redis URL was checked when the config was loaded.
        let redis = Redis::from_config(&config).ok().flatten().map(Arc::new);
        Worker {
            budgets: TenantBudgets::from_config(&config, redis).map(Arc::new),
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

    /// Reports the broker connection to `/readyz`.
    fn set_connected(&self, connected: bool) {
        if let Some(h) = &self.health {
            h.set_broker_connected(connected);
        }
    }

    /// Reports the consumer to `/readyz`.
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
        crate::telemetry::metrics::register_tenants(
            self.config.tenants.allowed.iter().map(String::as_str),
        );
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
            let session = match Session::open(self).await {
                Ok(session) => Ok(session.run(&options, shutdown.as_mut()).await),
                Err(e) => Err(e),
            };
            let (err, was_connected) = match session {
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
            emit(BrokerConnectionLost {
                error: &err,
                retry_in: delay,
            });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.as_mut() => return Ok(self.counters.report()),
            }
            self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
            emit(BrokerReconnecting);
        }
    }

    /// Connects to the first reachable broker URL, opens a confirming publish channel,
    /// declares the topology and opens the consume channel. Publishes on it wait at most
    /// `broker.confirm_timeout_ms` for their confirm.
    ///
    /// Fails if no URL answers or the topology cannot be declared (or mismatches).
    async fn connect(&self) -> Result<(Connection, Channel, Publisher), QueueError> {
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
        let publish = Publisher::new(publish, self.config.broker.confirm_timeout());
        Ok((conn, consume, publish))
    }

    /// Most bulk-lane messages processed at once (`worker.bulk_concurrency`).
    fn bulk_slots(&self) -> usize {
        self.config.worker.bulk_slots()
    }

    /// Starts a consumer on `lane`'s queue for `feed` (its prefetch is set first: a
    /// per-consumer `basic.qos` applies to consumers started after it).
    async fn subscribe(
        &self,
        consume: &Channel,
        lane: Lane,
        feed: Feed,
    ) -> Result<Subscription, QueueError> {
        let prefetch = match (feed, lane) {
            (Feed::Full, Lane::Live) => self.config.broker.prefetch,
            (Feed::Full, Lane::Bulk) => {
                u16::try_from(self.bulk_slots()).unwrap_or(self.config.broker.prefetch)
            }
            (Feed::Probe, _) => 1,
        };
        let queue = self.topology.lane_queue(lane);
        consume
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("rag-ingest-{}", uuid::Uuid::new_v4());
        let stream = consume
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        emit(WorkerConsuming {
            queue: &queue,
            lane: lane.as_str(),
            broker: &self.config.redacted_amqp_url(),
            prefetch,
            concurrency: match lane {
                Lane::Live => self.config.worker.concurrency,
                Lane::Bulk => self.bulk_slots(),
            },
            feed: feed.as_str(),
        });
        Ok(Subscription {
            stream,
            tag,
            lane,
            feed,
            cancelling: false,
        })
    }
}

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

/// A consumer on one lane's queue.
struct Subscription {
    stream: lapin::Consumer,
    tag: String,
    lane: Lane,
    feed: Feed,
    /// `basic.cancel` was sent: deliveries still arriving were prefetched before it and
    /// are handed back ([`park`]) until the stream ends.
    cancelling: bool,
}
