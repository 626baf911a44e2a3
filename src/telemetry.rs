//! Logging set-up: human-readable lines by default, JSON lines with `--log-format json`.
//! Every line about a message carries the `message` span's fields (pipeline, message_id,
//! tenant_id, document_id, request_id, stage). Filter with `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, with span fields.
    Json,
}

/// Installs the global subscriber writing to stderr. Calling it twice has no effect.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,qdrant_edge=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
}

/// Metric names (all carry a `pipeline` label).
pub mod names {
    /// Counter: messages settled, by `outcome` (stored, unchanged, stale, deleted, retried,
    /// dead_lettered).
    pub const MESSAGES: &str = "rag_ingest_messages_total";
    /// Counter: chunks embedded.
    pub const CHUNKS_EMBEDDED: &str = "rag_ingest_chunks_embedded_total";
    /// Counter: chunks of changed documents whose stored vector was reused (same text and
    /// embedder), so they were not embedded again.
    pub const CHUNKS_REUSED: &str = "rag_ingest_chunks_reused_total";
    /// Counter: model tokens embedded, by `tenant`.
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
    /// Gauge: body bytes of the messages being processed (`worker.max_inflight_bytes`).
    pub const IN_FLIGHT_BYTES: &str = "rag_ingest_in_flight_bytes";
    /// Gauge: Unix time of the last successful ingest.
    pub const LAST_SUCCESS: &str = "rag_ingest_last_success_timestamp_seconds";
}

/// Installs the process-wide Prometheus recorder with the global label `pipeline` (once;
/// later calls return the same handle, with the first call's label).
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
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&buckets)?
        .add_global_label("pipeline", pipeline)
        .install_recorder()?;
    *slot = Some(handle.clone());
    Ok(handle)
}
