//! One type per observable event. Each event's [`InternalEvent::emit`] writes its log line,
//! with a stable `event` field (the type's name in snake case), and updates its metrics.
//!
//! Tests and dashboards key on the `event` field and the structured fields (JSON logs with
//! `--log-format json`), never on the wording of the message, which may change.
//!
//! Metrics are documented in `docs/operations.md`; each family is updated by exactly one
//! event here.

use std::fmt::Display;
use std::time::Duration;

use super::InternalEvent;
use super::names;
use crate::breaker::BreakerState;
use crate::process::{Failure, Processed};

/// Emits `event`: shorthand for [`InternalEvent::emit`], so call sites read
/// `emit(MessageSettled { .. })`.
pub fn emit(event: impl InternalEvent) {
    event.emit();
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------

/// A message was processed and acked: `rag_ingest_messages_total{outcome}` and, the
/// message having succeeded, `rag_ingest_last_success_timestamp_seconds`.
#[derive(Debug)]
pub struct MessageSettled<'a> {
    /// What processing did.
    pub outcome: &'a Processed,
}

impl InternalEvent for MessageSettled<'_> {
    fn emit(self) {
        let outcome = self.outcome.label();
        metrics::counter!(names::MESSAGES, "outcome" => outcome).increment(1);
        metrics::gauge!(names::LAST_SUCCESS).set(chrono::Utc::now().timestamp() as f64);
        match self.outcome {
            Processed::Stored { chunks, reused } => tracing::info!(
                event = "message_settled",
                outcome,
                chunks,
                reused,
                "document stored"
            ),
            Processed::Stale { stored } => tracing::info!(
                event = "message_settled",
                outcome,
                stored_version = stored,
                "older version skipped"
            ),
            Processed::Unchanged | Processed::Deleted | Processed::Abandoned => {
                tracing::info!(event = "message_settled", outcome, "document processed")
            }
        }
    }
}

/// A message's delivery could no longer be settled (its broker connection or channel was
/// lost while it was processed), so it wrote nothing: the broker redelivers it. Counts
/// `rag_ingest_messages_total{outcome="abandoned"}`.
#[derive(Debug)]
pub struct MessageAbandoned;

impl InternalEvent for MessageAbandoned {
    fn emit(self) {
        metrics::counter!(names::MESSAGES, "outcome" => "abandoned").increment(1);
        tracing::info!(
            event = "message_abandoned",
            "the delivery was lost before the message's write: nothing written, the broker \
             redelivers it"
        );
    }
}

/// A transient failure is retried: in process after `delay` (`queue` is `None`), or through
/// the delay tier `queue` (the message is settled as `retried`). Counts
/// `rag_ingest_retries_total{stage,kind}` either way, and `rag_ingest_messages_total
/// {outcome="retried"}` for a delayed retry.
#[derive(Debug)]
pub struct MessageRetried<'a> {
    /// The failure being retried.
    pub failure: &'a Failure,
    /// Attempts made so far (this one included).
    pub attempts: u64,
    /// In process: the wait before the next attempt.
    pub delay: Option<Duration>,
    /// Delayed: the retry tier the message was published to.
    pub queue: Option<&'a str>,
}

impl InternalEvent for MessageRetried<'_> {
    fn emit(self) {
        let f = self.failure;
        metrics::counter!(names::RETRIES, "stage" => f.stage.as_str(), "kind" => f.kind.as_str())
            .increment(1);
        match self.queue {
            Some(queue) => {
                metrics::counter!(names::MESSAGES, "outcome" => "retried").increment(1);
                tracing::warn!(
                    event = "message_retried",
                    mode = "delayed",
                    kind = %f.kind,
                    stage = %f.stage,
                    error = %f.reason,
                    attempts = self.attempts,
                    queue,
                    "transient failure; scheduled a delayed retry"
                );
            }
            None => tracing::warn!(
                event = "message_retried",
                mode = "in_process",
                kind = %f.kind,
                stage = %f.stage,
                error = %f.reason,
                attempts = self.attempts,
                retry_in_ms = self.delay.map(millis),
                "transient failure; retrying in process"
            ),
        }
    }
}

/// A message went to the dead-letter queue: `rag_ingest_dead_lettered_total{kind}` and
/// `rag_ingest_messages_total{outcome="dead_lettered"}`.
#[derive(Debug)]
pub struct MessageDeadLettered<'a> {
    /// The failure that sent it there (kind, stage, reason).
    pub failure: &'a Failure,
    /// Attempts made.
    pub attempts: u64,
}

impl InternalEvent for MessageDeadLettered<'_> {
    fn emit(self) {
        let f = self.failure;
        metrics::counter!(names::DEAD_LETTERED, "kind" => f.kind.as_str()).increment(1);
        metrics::counter!(names::MESSAGES, "outcome" => "dead_lettered").increment(1);
        tracing::warn!(
            event = "message_dead_lettered",
            kind = %f.kind,
            stage = %f.stage,
            error = %f.reason,
            attempts = self.attempts,
            "message dead-lettered"
        );
    }
}

/// A prefetched delivery was handed back to the queue's tail unprocessed (the consumer
/// paused): `rag_ingest_messages_total{outcome="parked"}`.
#[derive(Debug)]
pub struct MessageParked;

impl InternalEvent for MessageParked {
    fn emit(self) {
        metrics::counter!(names::MESSAGES, "outcome" => "parked").increment(1);
        tracing::debug!(
            event = "message_parked",
            "prefetched delivery handed back while the consumer is paused"
        );
    }
}

/// Processing a message panicked; the delivery is handed back with its panic count, or
/// dead-lettered once the count reaches the limit (then [`MessageDeadLettered`] follows).
#[derive(Debug)]
pub struct MessagePanicked {
    /// Panics of this message so far.
    pub panics: u64,
    /// The panic limit is reached: the message goes to the DLQ.
    pub give_up: bool,
}

impl InternalEvent for MessagePanicked {
    fn emit(self) {
        tracing::error!(
            event = "message_panicked",
            panics = self.panics,
            give_up = self.give_up,
            "message processing panicked; the delivery is handed back with its panic count \
             (or, if it can no longer be settled, redelivered by the broker)"
        );
    }
}

/// A message was older than the stored version of its document and was skipped.
#[derive(Debug)]
pub struct StaleMessageSkipped {
    /// The message's version.
    pub version: u64,
    /// The version of the document in the store, newer than the message's.
    pub stored_version: u64,
}

impl InternalEvent for StaleMessageSkipped {
    fn emit(self) {
        tracing::debug!(
            event = "stale_message_skipped",
            version = self.version,
            stored_version = self.stored_version,
            "message older than the stored version; skipped"
        );
    }
}

/// A message's `x-attempts` header was ignored: the message did not come from a retry tier.
#[derive(Debug)]
pub struct UntrustedAttempts {
    /// The value the header claimed.
    pub claimed: u64,
}

impl InternalEvent for UntrustedAttempts {
    fn emit(self) {
        tracing::debug!(
            event = "untrusted_attempts",
            claimed = self.claimed,
            "ignoring an x-attempts header on a message that did not come from a retry tier"
        );
    }
}

/// A delivery could not be settled (ack, nack or hand-back) on the broker; what happens to
/// the message is in `consequence`.
#[derive(Debug)]
pub struct SettleFailed<'a, E: Display> {
    /// The broker error.
    pub error: &'a E,
    /// What happens to the message.
    pub consequence: &'static str,
}

impl<E: Display> InternalEvent for SettleFailed<'_, E> {
    fn emit(self) {
        tracing::warn!(
            event = "settle_failed",
            error = %self.error,
            consequence = self.consequence,
            "could not settle a delivery"
        );
    }
}

/// A message task ended without settling its delivery (it was aborted or panicked outside
/// the panic guard); the delivery stays unacked until the channel closes.
#[derive(Debug)]
pub struct MessageTaskFailed<'a, E: Display> {
    /// Why the task ended.
    pub error: &'a E,
}

impl<E: Display> InternalEvent for MessageTaskFailed<'_, E> {
    fn emit(self) {
        tracing::error!(
            event = "message_task_failed",
            error = %self.error,
            "message task failed to complete; its delivery stays unacked until the channel closes"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Embedding and storing
// ---------------------------------------------------------------------------------------

/// A document's new chunks were embedded (`chunks` may be 0 when every chunk reused a stored
/// vector): `rag_ingest_chunks_embedded_total`, `rag_ingest_chunks_reused_total`,
/// `rag_ingest_tokens_embedded_total{tenant,provider}` and `rag_ingest_embed_seconds`.
#[derive(Debug)]
pub struct ChunksEmbedded<'a> {
    /// The document's tenant.
    pub tenant: &'a str,
    /// Who embedded (`local` or the remote provider's label).
    pub provider: &'a str,
    /// Model tokens embedded (the provider's billed count where it reports one).
    pub tokens: u64,
    /// Chunks embedded.
    pub chunks: usize,
    /// Chunks whose stored vector was reused.
    pub reused: usize,
    /// Time the embedding call took (`None` when nothing was embedded).
    pub elapsed: Option<Duration>,
}

impl InternalEvent for ChunksEmbedded<'_> {
    fn emit(self) {
        metrics::counter!(names::CHUNKS_REUSED).increment(self.reused as u64);
        let Some(elapsed) = self.elapsed else {
            return;
        };
        metrics::histogram!(names::EMBED_SECONDS).record(elapsed.as_secs_f64());
        metrics::counter!(names::CHUNKS_EMBEDDED).increment(self.chunks as u64);
        metrics::counter!(
            names::TOKENS_EMBEDDED,
            "tenant" => self.tenant.to_string(),
            "provider" => self.provider.to_string()
        )
        .increment(self.tokens);
        // The same count is charged to the tenant's budget (`crate::meter`).
        crate::meter::record(self.tokens);
        tracing::info!(
            event = "chunks_embedded",
            tokens = self.tokens,
            provider = self.provider,
            chunks = self.chunks,
            reused = self.reused,
            elapsed_ms = millis(elapsed),
            "chunks embedded"
        );
    }
}

/// The pipeline made a store call: `rag_ingest_store_seconds{op}` (successful or not).
#[derive(Debug)]
pub struct StoreCall {
    /// Which call (one of [`super::metrics::STORE_OPS`]).
    pub op: &'static str,
    /// How long it took.
    pub elapsed: Duration,
    /// Whether it succeeded.
    pub ok: bool,
}

impl InternalEvent for StoreCall {
    fn emit(self) {
        metrics::histogram!(names::STORE_SECONDS, "op" => self.op)
            .record(self.elapsed.as_secs_f64());
        tracing::trace!(
            event = "store_call",
            op = self.op,
            ok = self.ok,
            elapsed_ms = millis(self.elapsed),
            "store call"
        );
    }
}

/// The stored vectors of a document could not be read back for reuse; every chunk is
/// embedded again.
#[derive(Debug)]
pub struct StoredVectorsUnreadable<'a, E: Display> {
    /// The store error that made the stored vectors unusable.
    pub error: &'a E,
}

impl<E: Display> InternalEvent for StoredVectorsUnreadable<'_, E> {
    fn emit(self) {
        tracing::warn!(
            event = "stored_vectors_unreadable",
            error = %self.error,
            "stored vectors not reusable; embedding every chunk"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Circuit breakers
// ---------------------------------------------------------------------------------------

/// A circuit breaker was created: `rag_ingest_breaker_open{breaker}` starts at 0.
#[derive(Debug)]
pub struct BreakerCreated<'a> {
    /// The breaker's name (the dependency it guards).
    pub breaker: &'a str,
}

impl InternalEvent for BreakerCreated<'_> {
    fn emit(self) {
        metrics::gauge!(names::BREAKER_OPEN, "breaker" => self.breaker.to_string()).set(0.0);
    }
}

/// A circuit breaker changed state: `rag_ingest_breaker_open{breaker}` is 1 while open.
#[derive(Debug)]
pub struct BreakerChanged<'a> {
    /// The breaker's name.
    pub breaker: &'a str,
    /// Previous state.
    pub from: BreakerState,
    /// New state.
    pub to: BreakerState,
    /// Consecutive failures counted so far.
    pub consecutive_failures: u32,
    /// How long the breaker stays open before a probe.
    pub open_for: Duration,
}

impl InternalEvent for BreakerChanged<'_> {
    fn emit(self) {
        let open = self.to == BreakerState::Open;
        metrics::gauge!(names::BREAKER_OPEN, "breaker" => self.breaker.to_string()).set(if open {
            1.0
        } else {
            0.0
        });
        let (from, to) = (self.from.as_str(), self.to.as_str());
        match self.to {
            BreakerState::Open => tracing::warn!(
                event = "breaker_changed",
                breaker = self.breaker,
                from,
                to,
                consecutive_failures = self.consecutive_failures,
                open_for_ms = millis(self.open_for),
                "circuit breaker opened: calls fail fast until the probe"
            ),
            BreakerState::HalfOpen => tracing::info!(
                event = "breaker_changed",
                breaker = self.breaker,
                from,
                to,
                "circuit breaker half-open: probing"
            ),
            BreakerState::Closed => tracing::info!(
                event = "breaker_changed",
                breaker = self.breaker,
                from,
                to,
                "circuit breaker closed: the dependency answered again"
            ),
        }
    }
}

/// The embedder's breaker lets a probe message through.
#[derive(Debug)]
pub struct BreakerProbeAllowed;

impl InternalEvent for BreakerProbeAllowed {
    fn emit(self) {
        tracing::debug!(
            event = "breaker_probe_allowed",
            "embedder breaker lets a probe through"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Broker and consumer
// ---------------------------------------------------------------------------------------

/// Connected to one of several broker URLs.
#[derive(Debug)]
pub struct BrokerConnected<'a> {
    /// The URL, password redacted.
    pub url: &'a str,
}

impl InternalEvent for BrokerConnected<'_> {
    fn emit(self) {
        tracing::info!(
            event = "broker_connected",
            url = self.url,
            "connected to RabbitMQ"
        );
    }
}

/// One of several broker URLs did not answer; the next one is tried.
#[derive(Debug)]
pub struct BrokerUrlUnreachable<'a, E: Display> {
    /// The URL, password redacted.
    pub url: &'a str,
    /// The connection error of this URL.
    pub error: &'a E,
}

impl<E: Display> InternalEvent for BrokerUrlUnreachable<'_, E> {
    fn emit(self) {
        tracing::warn!(
            event = "broker_url_unreachable",
            url = self.url,
            error = %self.error,
            "broker URL unreachable; trying the next one"
        );
    }
}

/// The worker's broker session ended (connection or channel lost, or it could not start);
/// it reconnects after `retry_in`.
#[derive(Debug)]
pub struct BrokerConnectionLost<'a, E: Display> {
    /// Why the session ended.
    pub error: &'a E,
    /// The wait before reconnecting.
    pub retry_in: Duration,
}

impl<E: Display> InternalEvent for BrokerConnectionLost<'_, E> {
    fn emit(self) {
        tracing::warn!(
            event = "broker_connection_lost",
            error = %self.error,
            retry_in_ms = millis(self.retry_in),
            "broker connection lost; reconnecting"
        );
    }
}

/// The worker starts a new broker session after losing one:
/// `rag_ingest_broker_reconnects_total`.
#[derive(Debug)]
pub struct BrokerReconnecting;

impl InternalEvent for BrokerReconnecting {
    fn emit(self) {
        metrics::counter!(names::BROKER_RECONNECTS).increment(1);
        tracing::debug!(event = "broker_reconnecting", "reconnecting to the broker");
    }
}

/// The broker closed the worker's connection or a channel; the session ends.
#[derive(Debug)]
pub struct BrokerClosed<'a> {
    /// What was closed (`connection`, `consume channel`, `publish channel`).
    pub what: &'a str,
}

impl InternalEvent for BrokerClosed<'_> {
    fn emit(self) {
        tracing::error!(
            event = "broker_closed",
            closed = self.what,
            "the broker closed the worker's {}; reconnecting",
            self.what
        );
    }
}

/// Closing a channel or connection got no close-ok within
/// [`crate::queue::CLOSE_TIMEOUT`]; it is dropped instead (nothing is lost: a close only
/// follows settled deliveries and confirmed publishes).
#[derive(Debug)]
pub struct BrokerCloseUnanswered<'a> {
    /// What was being closed: `channel` or `connection`.
    pub what: &'a str,
    /// The close reason sent (`doctor`, `bye`, `done`, …).
    pub reason: &'a str,
}

impl InternalEvent for BrokerCloseUnanswered<'_> {
    fn emit(self) {
        tracing::warn!(
            event = "broker_close_unanswered",
            closed = self.what,
            reason = self.reason,
            "the broker did not acknowledge closing a {} in time; dropped it",
            self.what
        );
    }
}

/// The worker consumes the main queue.
#[derive(Debug)]
pub struct WorkerConsuming<'a> {
    /// The queue the consumer is on (`rag-ingest.<pipeline>`, or `….bulk` for the bulk lane).
    pub queue: &'a str,
    /// `live` or `bulk`.
    pub lane: &'a str,
    /// The broker URL, password redacted.
    pub broker: &'a str,
    /// The consumer's prefetch.
    pub prefetch: u16,
    /// Messages processed at once.
    pub concurrency: usize,
    /// `full`, or `probe` (one message while the embedder's breaker probes).
    pub feed: &'a str,
}

impl InternalEvent for WorkerConsuming<'_> {
    fn emit(self) {
        tracing::info!(
            event = "worker_consuming",
            queue = self.queue,
            lane = self.lane,
            broker = self.broker,
            prefetch = self.prefetch,
            concurrency = self.concurrency,
            feed = self.feed,
            "worker consuming"
        );
    }
}

/// The consumer was cancelled because the embedder's breaker is not closed.
#[derive(Debug)]
pub struct ConsumerPaused<'a> {
    /// The breaker's state.
    pub breaker: &'a str,
}

impl InternalEvent for ConsumerPaused<'_> {
    fn emit(self) {
        tracing::info!(
            event = "consumer_paused",
            breaker = self.breaker,
            "consumer cancelled while the embedder breaker is not closed; prefetched deliveries are handed back"
        );
    }
}

/// Prefetched deliveries were handed back to the queue (`count` of them), or the broker did
/// not confirm the consumer's cancel in time (`confirmed` false).
#[derive(Debug)]
pub struct PrefetchedHandedBack {
    /// Deliveries handed back.
    pub count: usize,
    /// The broker confirmed the cancel within the time limit.
    pub confirmed: bool,
}

impl InternalEvent for PrefetchedHandedBack {
    fn emit(self) {
        if !self.confirmed {
            tracing::warn!(
                event = "prefetched_handed_back",
                count = self.count,
                confirmed = false,
                "the broker did not confirm the consumer's cancel in time"
            );
        } else if self.count > 0 {
            tracing::info!(
                event = "prefetched_handed_back",
                count = self.count,
                confirmed = true,
                "prefetched deliveries handed back"
            );
        }
    }
}

/// Messages being processed: `rag_ingest_in_flight_messages` and
/// `rag_ingest_in_flight_bytes`.
#[derive(Debug)]
pub struct InFlight {
    /// Message tasks running.
    pub messages: usize,
    /// Estimated bytes.
    pub bytes: usize,
}

impl InternalEvent for InFlight {
    fn emit(self) {
        metrics::gauge!(names::IN_FLIGHT).set(self.messages as f64);
        metrics::gauge!(names::IN_FLIGHT_BYTES).set(self.bytes as f64);
    }
}

/// With `--exit-when-idle`: the queues still hold `pending` messages (0: drained, the worker
/// exits).
#[derive(Debug)]
pub struct QueuesChecked {
    /// Messages still queued.
    pub pending: u64,
}

impl InternalEvent for QueuesChecked {
    fn emit(self) {
        if self.pending == 0 {
            tracing::info!(event = "queues_drained", "queues drained; exiting");
        } else {
            tracing::debug!(
                event = "queues_pending",
                pending = self.pending,
                "waiting for queued messages"
            );
        }
    }
}

/// A stop was requested (SIGTERM, SIGINT): no new deliveries, in-flight messages finish.
#[derive(Debug)]
pub struct ShutdownRequested;

impl InternalEvent for ShutdownRequested {
    fn emit(self) {
        tracing::info!(
            event = "shutdown_requested",
            "shutdown requested: no new deliveries, finishing in-flight messages"
        );
    }
}

/// The shutdown grace period ran out: `unfinished` messages were stopped, `handed_back` of
/// them went back to the queue.
#[derive(Debug)]
pub struct ShutdownGraceExpired {
    /// Messages still running when the grace period ended.
    pub unfinished: usize,
    /// Of those, how many were handed back to the queue.
    pub handed_back: usize,
}

impl InternalEvent for ShutdownGraceExpired {
    fn emit(self) {
        tracing::warn!(
            event = "shutdown_grace_expired",
            unfinished = self.unfinished,
            handed_back = self.handed_back,
            "grace period over; unfinished messages were handed back to the queue"
        );
    }
}

/// A lost broker session's running messages ended: `finished` ran to the end of their
/// store writes (their acks failed; the broker redelivers them), `aborted` were still
/// running after the grace period.
#[derive(Debug)]
pub struct SessionLostTasksEnded {
    /// Messages that ran to the end.
    pub finished: usize,
    /// Messages aborted after the grace period.
    pub aborted: usize,
}

impl InternalEvent for SessionLostTasksEnded {
    fn emit(self) {
        if self.aborted > 0 {
            tracing::warn!(
                event = "session_lost_tasks_ended",
                finished = self.finished,
                aborted = self.aborted,
                "the broker connection was lost; messages still running after the grace \
                 period were aborted (the broker redelivers them)"
            );
        } else {
            tracing::info!(
                event = "session_lost_tasks_ended",
                finished = self.finished,
                aborted = self.aborted,
                "the broker connection was lost; the running messages finished their writes \
                 (the broker redelivers them)"
            );
        }
    }
}

/// The metrics and health endpoints are served.
#[derive(Debug)]
pub struct MetricsServing<'a> {
    /// The bound address.
    pub address: &'a str,
}

impl InternalEvent for MetricsServing<'_> {
    fn emit(self) {
        tracing::info!(
            event = "metrics_serving",
            address = self.address,
            "serving /metrics, /healthz and /readyz"
        );
    }
}

/// The metrics and health server stopped (the worker keeps running without it).
#[derive(Debug)]
pub struct MetricsServerStopped<'a, E: Display> {
    /// The server's error.
    pub error: &'a E,
}

impl<E: Display> InternalEvent for MetricsServerStopped<'_, E> {
    fn emit(self) {
        tracing::error!(
            event = "metrics_server_stopped",
            error = %self.error,
            "metrics/health server stopped"
        );
    }
}

/// The DLQ exists without `x-delivery-limit` (declared by an earlier version); see the
/// operations documentation for the migration.
#[derive(Debug)]
pub struct LegacyDlqFound<'a> {
    /// The dead-letter queue found without `x-delivery-limit`.
    pub queue: &'a str,
    /// The broker, password redacted.
    pub broker: &'a str,
}

impl InternalEvent for LegacyDlqFound<'_> {
    fn emit(self) {
        tracing::warn!(
            event = "legacy_dlq_found",
            queue = self.queue,
            broker = self.broker,
            "the DLQ was declared by an earlier version without x-delivery-limit; on RabbitMQ 4.0-4.2 each inspection (dlq list/show, reprocess) counts toward the default limit of 20. To migrate: stop the workers, move its messages, delete the queue and start a worker again"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Components: model, remote embedder, stores
// ---------------------------------------------------------------------------------------

/// The local embedding model is loaded and its thread started.
#[derive(Debug)]
pub struct ModelLoaded<'a> {
    /// The model's name (fingerprint).
    pub model: &'a str,
    /// Vector dimensions.
    pub dims: usize,
    /// Longest input in model tokens.
    pub max_seq_length: usize,
    /// Chunks per forward pass.
    pub batch_size: usize,
    /// The precision the forward pass runs in (`f32`, `bf16`, `int8` or `int16`).
    pub precision: &'a str,
    /// The precision the configuration asked for (`auto`, `f32`, `bf16`, `int8` or
    /// `int16`).
    pub requested_precision: &'a str,
    /// Why that precision runs.
    pub precision_reason: &'a str,
    /// What attention's products compute in (`f32`, `bf16` or `int16`).
    pub attention: &'a str,
    /// Where the model files are.
    pub dir: &'a str,
}

impl InternalEvent for ModelLoaded<'_> {
    fn emit(self) {
        tracing::info!(
            event = "model_loaded",
            model = self.model,
            dims = self.dims,
            max_seq_length = self.max_seq_length,
            batch_size = self.batch_size,
            precision = self.precision,
            requested_precision = self.requested_precision,
            precision_reason = self.precision_reason,
            attention = self.attention,
            dir = self.dir,
            "embedding model loaded"
        );
        metrics::gauge!(
            names::EMBEDDER_PRECISION,
            "requested" => self.requested_precision.to_owned(),
            "running" => self.precision.to_owned()
        )
        .set(1.0);
    }
}

/// The in-process model ran one forward pass: `rag_ingest_forward_pass_tokens` and
/// `rag_ingest_forward_pass_seconds`. How full passes are is what continuous batching is
/// for: passes far below `batch_size × max_seq_length` while messages wait mean the worker
/// does not feed the model fast enough.
#[derive(Debug)]
pub struct ForwardPassRun {
    /// Texts in the pass.
    pub texts: usize,
    /// Model tokens in the pass (special tokens included).
    pub tokens: usize,
    /// How long the pass took.
    pub elapsed: Duration,
}

impl InternalEvent for ForwardPassRun {
    fn emit(self) {
        metrics::histogram!(names::FORWARD_PASS_TOKENS).record(self.tokens as f64);
        metrics::histogram!(names::FORWARD_PASS_SECONDS).record(self.elapsed.as_secs_f64());
        tracing::debug!(
            event = "forward_pass_run",
            texts = self.texts,
            tokens = self.tokens,
            elapsed_ms = millis(self.elapsed),
            "forward pass run"
        );
    }
}

/// A remote (OpenAI-compatible) embedder is configured.
#[derive(Debug)]
pub struct RemoteEmbedderConfigured<'a> {
    /// The endpoint's label (host, no credentials).
    pub endpoint: &'a str,
    /// The provider's model name.
    pub model: &'a str,
    /// The fingerprint its vectors are stored under.
    pub fingerprint: &'a str,
    /// Whether an API key is sent.
    pub authenticated: bool,
}

impl InternalEvent for RemoteEmbedderConfigured<'_> {
    fn emit(self) {
        tracing::info!(
            event = "remote_embedder_configured",
            endpoint = self.endpoint,
            model = self.model,
            fingerprint = self.fingerprint,
            authenticated = self.authenticated,
            "remote embedder configured"
        );
    }
}

/// The embedding provider asked to slow down (429 or 503); the request is retried after
/// `delay`.
#[derive(Debug)]
pub struct ProviderThrottled<'a> {
    /// The provider's label.
    pub provider: &'a str,
    /// The HTTP status.
    pub status: u16,
    /// The wait before the next request.
    pub delay: Duration,
    /// The wait comes from the provider's `Retry-After`.
    pub retry_after: bool,
    /// Requests made for this batch so far.
    pub attempt: u64,
}

impl InternalEvent for ProviderThrottled<'_> {
    fn emit(self) {
        tracing::warn!(
            event = "provider_throttled",
            provider = self.provider,
            status = self.status,
            delay_ms = millis(self.delay),
            retry_after = self.retry_after,
            attempt = self.attempt,
            "embedding provider asked to slow down; retrying"
        );
    }
}

/// What a failover embedder did: `switched` to the fallback, `still_failing` on it,
/// `recovered` (the primary answered again) or `both_failed`.
#[derive(Debug)]
pub struct EmbedderFailover<'a> {
    /// `switched`, `still_failing`, `recovered` or `both_failed`.
    pub state: &'static str,
    /// The primary's fingerprint.
    pub primary: &'a str,
    /// The primary's error (not for `recovered`).
    pub error: Option<String>,
    /// The fallback's error (`both_failed`).
    pub fallback_error: Option<String>,
}

impl InternalEvent for EmbedderFailover<'_> {
    fn emit(self) {
        let (error, fallback_error) = (self.error, self.fallback_error);
        match self.state {
            "recovered" => tracing::info!(
                event = "embedder_failover",
                state = self.state,
                primary = self.primary,
                "primary embedder answered again; leaving the fallback"
            ),
            "still_failing" => tracing::debug!(
                event = "embedder_failover",
                state = self.state,
                primary = self.primary,
                error,
                "primary embedder still failing; using the fallback"
            ),
            _ => tracing::warn!(
                event = "embedder_failover",
                state = self.state,
                primary = self.primary,
                error,
                fallback_error,
                "primary embedder failed; using the same-space fallback (or both failed)"
            ),
        }
    }
}

/// A store request failed transiently and is retried in process after `retry_in`.
#[derive(Debug)]
pub struct StoreRetrying<'a> {
    /// The collection the request was for.
    pub collection: &'a str,
    /// The request that failed (`upsert`, `delete`, `count`, …).
    pub operation: &'a str,
    /// The transient error, described without secrets.
    pub error: &'a str,
    /// The wait before the next try.
    pub retry_in: Duration,
}

impl InternalEvent for StoreRetrying<'_> {
    fn emit(self) {
        tracing::warn!(
            event = "store_retrying",
            collection = self.collection,
            operation = self.operation,
            error = self.error,
            retry_in_ms = millis(self.retry_in),
            "store request failed transiently; retrying"
        );
    }
}

/// The store is unavailable while the worker starts; it waits for it (up to
/// `worker.reconnect_give_up_secs`).
#[derive(Debug)]
pub struct StoreWaiting<'a, E: Display> {
    /// Why the store cannot be opened.
    pub error: &'a E,
    /// The wait before the next try.
    pub retry_in: Duration,
}

impl<E: Display> InternalEvent for StoreWaiting<'_, E> {
    fn emit(self) {
        tracing::warn!(
            event = "store_waiting",
            error = %self.error,
            retry_in_ms = millis(self.retry_in),
            "the store is unavailable at start-up; waiting for it"
        );
    }
}

/// An existing Qdrant collection has another layout than `store.qdrant` configures; it keeps
/// its own.
#[derive(Debug)]
pub struct CollectionLayoutDiffers<'a> {
    /// The collection whose layout differs.
    pub collection: &'a str,
    /// The setting (`shard_number`, `replication_factor`, `write_consistency_factor`).
    pub setting: &'a str,
    /// The configured value.
    pub configured: u32,
    /// The collection's value, if it reports one.
    pub actual: Option<u32>,
}

impl InternalEvent for CollectionLayoutDiffers<'_> {
    fn emit(self) {
        tracing::warn!(
            event = "collection_layout_differs",
            collection = self.collection,
            setting = self.setting,
            configured = self.configured,
            actual = self.actual,
            "the existing collection has another layout than store.qdrant configures; \
             it keeps its own (change it with a Qdrant collection update)"
        );
    }
}

/// The Qdrant server is older than the recommended version: it works, but a crash of the
/// server can bring deleted points back (qdrant/qdrant#9575, fixed in 1.19).
#[derive(Debug)]
pub struct QdrantServerOutdated<'a> {
    /// The server's URL (password redacted).
    pub url: &'a str,
    /// The version the server reports.
    pub version: &'a str,
    /// The recommended minimum (major, minor).
    pub recommended: (u64, u64),
}

impl InternalEvent for QdrantServerOutdated<'_> {
    fn emit(self) {
        tracing::warn!(
            event = "qdrant_server_outdated",
            url = self.url,
            version = self.version,
            recommended = %format!("{}.{}", self.recommended.0, self.recommended.1),
            "the Qdrant server is older than recommended: {}; upgrade it",
            crate::store::OUTDATED_SERVER_RISK
        );
    }
}

/// A Qdrant Edge maintenance task failed: `optimize`, `compact_wal`, `measure_wal`,
/// `close_for_compaction` or `final_flush` (the last two are errors: writes may be lost
/// from the segments, though not from the WAL).
#[derive(Debug)]
pub struct EdgeMaintenanceFailed<'a> {
    /// Which maintenance task failed.
    pub task: &'static str,
    /// The shard's directory.
    pub dir: &'a str,
    /// The error, or the panic message of the storage engine.
    pub error: &'a str,
}

impl InternalEvent for EdgeMaintenanceFailed<'_> {
    fn emit(self) {
        match self.task {
            "compact_wal" | "final_flush" => tracing::error!(
                event = "edge_maintenance_failed",
                task = self.task,
                dir = self.dir,
                error = self.error,
                "a Qdrant Edge maintenance task failed"
            ),
            _ => tracing::warn!(
                event = "edge_maintenance_failed",
                task = self.task,
                dir = self.dir,
                error = self.error,
                "a Qdrant Edge maintenance task failed"
            ),
        }
    }
}

/// A request to the embedding provider waited for the client-side rate limits
/// (`embedder.max_requests_per_minute`, `embedder.max_tokens_per_minute`).
#[derive(Debug)]
pub struct RateLimitWaited<'a> {
    /// The provider's label.
    pub provider: &'a str,
    /// How long the request waited.
    pub waited: Duration,
    /// The request's model tokens.
    pub tokens: u64,
}

impl InternalEvent for RateLimitWaited<'_> {
    fn emit(self) {
        tracing::debug!(
            event = "rate_limit_waited",
            provider = self.provider,
            waited_ms = millis(self.waited),
            tokens = self.tokens,
            "request waited for the client-side rate limit"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Fairness: lanes, tenant budgets, shared state
// ---------------------------------------------------------------------------------------

/// A message's processing starts (its tenant admitted): `rag_ingest_queue_wait_seconds
/// {tenant,lane}` records how long it waited since the producer published it (first
/// deliveries only: `queue_wait` is `None` for a message back from a retry tier or a parked
/// queue, or without a publish time).
#[derive(Debug)]
pub struct MessageStarted<'a> {
    /// The message's tenant (one of `tenants.allowed`).
    pub tenant: &'a str,
    /// `live` or `bulk`.
    pub lane: &'static str,
    /// Publish time to now.
    pub queue_wait: Option<Duration>,
}

impl InternalEvent for MessageStarted<'_> {
    fn emit(self) {
        if let Some(wait) = self.queue_wait {
            metrics::histogram!(
                names::QUEUE_WAIT,
                "tenant" => self.tenant.to_string(),
                "lane" => self.lane
            )
            .record(wait.as_secs_f64());
        }
        tracing::debug!(
            event = "message_started",
            lane = self.lane,
            queue_wait_ms = self.queue_wait.map(millis),
            "processing started"
        );
    }
}

/// A message of `tenant` started (`delta` 1) or stopped (−1) being processed:
/// `rag_ingest_tenant_in_flight_messages{tenant,lane}`. No log line.
#[derive(Debug)]
pub struct TenantInFlight<'a> {
    /// The message's tenant (one of `tenants.allowed`).
    pub tenant: &'a str,
    /// `live` or `bulk`.
    pub lane: &'static str,
    /// +1 or −1.
    pub delta: f64,
}

impl InternalEvent for TenantInFlight<'_> {
    fn emit(self) {
        metrics::gauge!(
            names::TENANT_IN_FLIGHT,
            "tenant" => self.tenant.to_string(),
            "lane" => self.lane
        )
        .increment(self.delta);
    }
}

/// A message was deferred without using an attempt: its copy waits in `queue` (a parked
/// queue) for `resume_in`, then returns to its lane. `rag_ingest_messages_total
/// {outcome="deferred"}`.
#[derive(Debug)]
pub struct MessageDeferred<'a> {
    /// `budget_exhausted` (the tenant is over its budget until the window rolls) or
    /// `budget_unknown` (Redis could not be asked and budgets fail closed).
    pub reason: &'a str,
    /// The parked queue.
    pub queue: &'a str,
    /// When the copy returns to its lane.
    pub resume_in: Duration,
}

impl InternalEvent for MessageDeferred<'_> {
    fn emit(self) {
        metrics::counter!(names::MESSAGES, "outcome" => "deferred").increment(1);
        tracing::info!(
            event = "message_deferred",
            reason = self.reason,
            queue = self.queue,
            resume_in_ms = millis(self.resume_in),
            "message deferred; no attempt used"
        );
    }
}

/// A message of a tenant at or over its token budget was deferred until the window rolls:
/// `rag_ingest_tenant_budget_exhausted_total{tenant}`.
#[derive(Debug)]
pub struct TenantBudgetExhausted<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// Tokens counted in the current window.
    pub used: u64,
    /// The tenant's budget per window.
    pub budget: u64,
    /// Time until the window rolls.
    pub resume_in: Duration,
}

impl InternalEvent for TenantBudgetExhausted<'_> {
    fn emit(self) {
        metrics::counter!(names::BUDGET_EXHAUSTED, "tenant" => self.tenant.to_string())
            .increment(1);
        tracing::warn!(
            event = "tenant_budget_exhausted",
            tenant = self.tenant,
            used = self.used,
            budget = self.budget,
            resume_in_ms = millis(self.resume_in),
            "tenant over its token budget; its messages wait for the next window"
        );
    }
}

/// A budgeted tenant's count was read or updated: `rag_ingest_tenant_budget_remaining_tokens
/// {tenant}` (0 once exhausted). No log line.
#[derive(Debug)]
pub struct TenantBudgetObserved<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// Tokens left in the current window.
    pub remaining: u64,
}

impl InternalEvent for TenantBudgetObserved<'_> {
    fn emit(self) {
        metrics::gauge!(names::BUDGET_REMAINING, "tenant" => self.tenant.to_string())
            .set(self.remaining as f64);
    }
}

/// A call to the shared state (Redis) failed: `rag_ingest_shared_state_errors_total
/// {component}`.
#[derive(Debug)]
pub struct SharedStateUnavailable<'a, E: Display> {
    /// `budget` or `rate_limit`.
    pub component: &'static str,
    /// What failed.
    pub error: &'a E,
    /// What the worker does about it.
    pub consequence: &'a str,
}

impl<E: Display> InternalEvent for SharedStateUnavailable<'_, E> {
    fn emit(self) {
        metrics::counter!(names::SHARED_STATE_ERRORS, "component" => self.component).increment(1);
        tracing::warn!(
            event = "shared_state_unavailable",
            component = self.component,
            error = %self.error,
            consequence = self.consequence,
            "shared state (Redis) unavailable"
        );
    }
}
