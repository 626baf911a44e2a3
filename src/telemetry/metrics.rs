//! The metric families: names, descriptions and the labels they are registered with at
//! start, and the process-wide Prometheus recorder.
//!
//! Only [`super::events`] updates metrics; this module declares them.

use metrics::{describe_counter, describe_gauge, describe_histogram};

use crate::error::{ErrorKind, Stage};

/// Metric names (all carry a `pipeline` label).
pub mod names {
    /// Counter: messages settled, by `outcome` (stored, unchanged, stale, deleted, retried,
    /// dead_lettered, parked, deferred).
    pub const MESSAGES: &str = "rag_ingest_messages_total";
    /// Counter: chunks embedded.
    pub const CHUNKS_EMBEDDED: &str = "rag_ingest_chunks_embedded_total";
    /// Counter: chunks of changed documents whose stored vector was reused (same text and
    /// embedder), so they were not embedded again.
    pub const CHUNKS_REUSED: &str = "rag_ingest_chunks_reused_total";
    /// Counter: model tokens embedded, by `tenant` and `provider`.
    pub const TOKENS_EMBEDDED: &str = "rag_ingest_tokens_embedded_total";
    /// Histogram: seconds per embedding call.
    pub const EMBED_SECONDS: &str = "rag_ingest_embed_seconds";
    /// Histogram: seconds per store call, by `op`.
    pub const STORE_SECONDS: &str = "rag_ingest_store_seconds";
    /// Counter: retries, by `stage` and `kind` (in-process and delayed).
    pub const RETRIES: &str = "rag_ingest_retries_total";
    /// Counter: dead-lettered messages, by `kind`.
    pub const DEAD_LETTERED: &str = "rag_ingest_dead_lettered_total";
    /// Gauge: 1 while the named `breaker` is open.
    pub const BREAKER_OPEN: &str = "rag_ingest_breaker_open";
    /// Gauge: messages being processed.
    pub const IN_FLIGHT: &str = "rag_ingest_in_flight_messages";
    /// Gauge: estimated memory of the messages being processed (`worker.max_inflight_bytes`).
    pub const IN_FLIGHT_BYTES: &str = "rag_ingest_in_flight_bytes";
    /// Gauge: Unix time of the last successful ingest (0 until the first).
    pub const LAST_SUCCESS: &str = "rag_ingest_last_success_timestamp_seconds";
    /// Counter: times the worker lost its broker connection and reconnected.
    pub const BROKER_RECONNECTS: &str = "rag_ingest_broker_reconnects_total";
    /// Histogram: seconds from publish to processing start, by `tenant` and `lane`.
    pub const QUEUE_WAIT: &str = "rag_ingest_queue_wait_seconds";
    /// Gauge: messages being processed, by `tenant` and `lane`.
    pub const TENANT_IN_FLIGHT: &str = "rag_ingest_tenant_in_flight_messages";
    /// Gauge: model tokens left in the current budget window, by `tenant` (budgeted tenants).
    pub const BUDGET_REMAINING: &str = "rag_ingest_tenant_budget_remaining_tokens";
    /// Counter: messages deferred because their tenant was over its budget, by `tenant`.
    pub const BUDGET_EXHAUSTED: &str = "rag_ingest_tenant_budget_exhausted_total";
    /// Counter: failed calls to the shared state (Redis), by `component`.
    pub const SHARED_STATE_ERRORS: &str = "rag_ingest_shared_state_errors_total";
    /// Gauge: 1 for the precision the in-process model runs in, by `requested` (`auto`,
    /// `f32`, `bf16`) and `running` (`f32`, `bf16`).
    pub const EMBEDDER_PRECISION: &str = "rag_ingest_embedder_precision";
    /// Histogram: model tokens per forward pass of the in-process model.
    pub const FORWARD_PASS_TOKENS: &str = "rag_ingest_forward_pass_tokens";
    /// Histogram: seconds per forward pass of the in-process model.
    pub const FORWARD_PASS_SECONDS: &str = "rag_ingest_forward_pass_seconds";

    /// Every family, in the order of the operations documentation.
    pub const ALL: [&str; 21] = [
        MESSAGES,
        CHUNKS_EMBEDDED,
        CHUNKS_REUSED,
        TOKENS_EMBEDDED,
        EMBED_SECONDS,
        STORE_SECONDS,
        RETRIES,
        DEAD_LETTERED,
        BREAKER_OPEN,
        IN_FLIGHT,
        IN_FLIGHT_BYTES,
        LAST_SUCCESS,
        BROKER_RECONNECTS,
        QUEUE_WAIT,
        TENANT_IN_FLIGHT,
        BUDGET_REMAINING,
        BUDGET_EXHAUSTED,
        SHARED_STATE_ERRORS,
        EMBEDDER_PRECISION,
        FORWARD_PASS_TOKENS,
        FORWARD_PASS_SECONDS,
    ];
}

/// Every `outcome` of [`names::MESSAGES`].
pub const OUTCOMES: [&str; 9] = [
    "stored",
    "unchanged",
    "stale",
    "deleted",
    "retried",
    "dead_lettered",
    "parked",
    "deferred",
    "abandoned",
];

/// Every `op` of [`names::STORE_SECONDS`], as the pipeline names its store calls.
pub const STORE_OPS: [&str; 6] = [
    "read_head",
    "read_vectors",
    "upsert",
    "relabel",
    "count",
    "delete",
];

/// Describes every family (`# HELP`) and registers the series known in advance at zero, so
/// that alerts such as `rate(rag_ingest_dead_lettered_total[5m])` have a series from the
/// start. Per-tenant and per-breaker series appear with their first tenant or breaker.
pub fn describe_all() {
    describe_counter!(
        names::MESSAGES,
        "Messages settled, by outcome (stored, unchanged, stale, deleted, retried, dead_lettered, parked, deferred), and messages abandoned before their write because their delivery was lost (abandoned)."
    );
    describe_counter!(
        names::CHUNKS_EMBEDDED,
        "Chunks embedded (distinct texts sent to the embedder)."
    );
    describe_counter!(
        names::CHUNKS_REUSED,
        "Chunks of edited documents whose stored vector was reused instead of embedded."
    );
    describe_counter!(
        names::TOKENS_EMBEDDED,
        "Model tokens embedded, by tenant and provider (remote: the provider's billed prompt_tokens)."
    );
    describe_histogram!(
        names::EMBED_SECONDS,
        metrics::Unit::Seconds,
        "Time per embedding call (one document's new chunks)."
    );
    describe_histogram!(
        names::STORE_SECONDS,
        metrics::Unit::Seconds,
        "Time per vector store call made while processing a message, by op."
    );
    describe_counter!(
        names::RETRIES,
        "Retries of a transient failure, in process and through a delay tier, by stage and kind."
    );
    describe_counter!(
        names::DEAD_LETTERED,
        "Messages sent to the dead-letter queue, by error kind."
    );
    describe_gauge!(
        names::BREAKER_OPEN,
        "1 while the named circuit breaker is open (the worker takes no messages), else 0."
    );
    describe_gauge!(names::IN_FLIGHT, "Messages being processed.");
    describe_gauge!(
        names::IN_FLIGHT_BYTES,
        metrics::Unit::Bytes,
        "Estimated memory of the messages being processed (bounded by worker.max_inflight_bytes)."
    );
    describe_gauge!(
        names::LAST_SUCCESS,
        "Unix time of the last successfully settled message (0 until the first)."
    );
    describe_counter!(
        names::BROKER_RECONNECTS,
        "Times the worker lost its broker connection and reconnected."
    );
    describe_histogram!(
        names::QUEUE_WAIT,
        metrics::Unit::Seconds,
        "Time from publish to processing start, by tenant and lane (first deliveries only)."
    );
    describe_gauge!(
        names::TENANT_IN_FLIGHT,
        "Messages being processed, by tenant and lane."
    );
    describe_gauge!(
        names::BUDGET_REMAINING,
        "Model tokens left in the tenant's current budget window (budgeted tenants)."
    );
    describe_counter!(
        names::BUDGET_EXHAUSTED,
        "Messages deferred to the next budget window because their tenant was over its token budget."
    );
    describe_counter!(
        names::SHARED_STATE_ERRORS,
        "Failed calls to the shared state (Redis), by component (budget, rate_limit)."
    );
    describe_gauge!(
        names::EMBEDDER_PRECISION,
        "1 for the precision the in-process model runs in, by requested and running precision."
    );
    describe_histogram!(
        names::FORWARD_PASS_TOKENS,
        "Model tokens per forward pass of the in-process model (full passes hold batch_size x max_seq_length)."
    );
    describe_histogram!(
        names::FORWARD_PASS_SECONDS,
        metrics::Unit::Seconds,
        "Time per forward pass of the in-process model."
    );

    for outcome in OUTCOMES {
        metrics::counter!(names::MESSAGES, "outcome" => outcome).increment(0);
    }
    for kind in ErrorKind::ALL {
        metrics::counter!(names::DEAD_LETTERED, "kind" => kind.as_str()).increment(0);
    }
    for (stage, kind) in [
        (Stage::Embed, ErrorKind::EmbedderUnavailable),
        (Stage::Store, ErrorKind::StoreUnavailable),
    ] {
        metrics::counter!(names::RETRIES, "stage" => stage.as_str(), "kind" => kind.as_str())
            .increment(0);
    }
    metrics::counter!(names::CHUNKS_EMBEDDED).increment(0);
    metrics::counter!(names::CHUNKS_REUSED).increment(0);
    metrics::counter!(names::TOKENS_EMBEDDED).increment(0);
    metrics::counter!(names::BROKER_RECONNECTS).increment(0);
    for component in ["budget", "rate_limit"] {
        metrics::counter!(names::SHARED_STATE_ERRORS, "component" => component).increment(0);
    }
    // Registering a histogram handle makes its family show with a zero count.
    let _ = metrics::histogram!(names::EMBED_SECONDS);
    let _ = metrics::histogram!(names::FORWARD_PASS_TOKENS);
    let _ = metrics::histogram!(names::FORWARD_PASS_SECONDS);
    for op in STORE_OPS {
        let _ = metrics::histogram!(names::STORE_SECONDS, "op" => op);
    }
    metrics::gauge!(names::IN_FLIGHT).set(0.0);
    metrics::gauge!(names::IN_FLIGHT_BYTES).set(0.0);
    metrics::gauge!(names::LAST_SUCCESS).set(0.0);
}

/// Registers the per-tenant series of a worker's `tenants` at zero (every tenant's queue
/// wait and in-flight count on both lanes, and its budget deferrals), so those families have
/// their series from the start. The label values are the allow-list's, so the series count
/// is bounded by it (`tenants.allowed` × 2 lanes); messages of other tenants are
/// dead-lettered before they are counted.
pub fn register_tenants<'a>(tenants: impl IntoIterator<Item = &'a str>) {
    for tenant in tenants {
        for lane in crate::lane::Lane::ALL {
            let labels = [
                ("tenant", tenant.to_owned()),
                ("lane", lane.as_str().to_owned()),
            ];
            let _ = metrics::histogram!(names::QUEUE_WAIT, &labels);
            metrics::gauge!(names::TENANT_IN_FLIGHT, &labels).increment(0.0);
        }
        metrics::counter!(names::BUDGET_EXHAUSTED, "tenant" => tenant.to_owned()).increment(0);
    }
}

/// Installs the process-wide Prometheus recorder with the global label `pipeline` and
/// registers every family ([`describe_all`]) (once; later calls return the same handle,
/// with the first call's label).
///
/// Fails only if another metrics recorder was installed by someone else.
pub fn metrics_handle(
    pipeline: &str,
) -> Result<metrics_exporter_prometheus::PrometheusHandle, metrics_exporter_prometheus::BuildError>
{
    use std::sync::Mutex;
    static HANDLE: Mutex<Option<metrics_exporter_prometheus::PrometheusHandle>> = Mutex::new(None);
    let mut slot = HANDLE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = slot.as_ref() {
        return Ok(h.clone());
    }
    let buckets = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    // Queue waits run from milliseconds (idle) to hours (a backlog).
    let wait_buckets = [
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
    ];
    // Passes hold from one short text to batch_size (up to 1024) x max_seq_length tokens.
    let pass_buckets = [
        16.0, 64.0, 256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 65536.0, 262144.0,
    ];
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&buckets)?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(names::FORWARD_PASS_TOKENS.to_owned()),
            &pass_buckets,
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(names::QUEUE_WAIT.to_owned()),
            &wait_buckets,
        )?
        .add_global_label("pipeline", pipeline)
        .install_recorder()?;
    describe_all();
    *slot = Some(handle.clone());
    Ok(handle)
}
