//! What the worker tells the outside world: log lines and Prometheus metrics.
//!
//! Every observable event is one type in [`events`] whose [`InternalEvent::emit`] writes its
//! log line (with an `event` field naming it, so JSON logs can be filtered on a stable key
//! rather than on wording) and updates its metrics, with uniform labels. Call sites are one
//! line: `emit(MessageSettled { .. })`. The metric families are declared once, in
//! [`metrics`], described (`# HELP`) and registered when the recorder is installed, so a
//! fresh worker's `/metrics` already shows them.
//!
//! Logs: human-readable lines by default, JSON lines with `--log-format json`. Every line
//! about a message carries the `message` span's fields (pipeline, message_id, tenant_id,
//! document_id, request_id, stage). Filter with `RUST_LOG` (default `info`).

pub mod events;
pub mod metrics;

pub use events::emit;
pub use metrics::{metrics_handle, names};

use tracing_subscriber::EnvFilter;

/// One observable event: its `emit` writes the event's log line and updates its metrics.
pub trait InternalEvent {
    /// Records the event (log line and metrics). Never fails: a metric without an installed
    /// recorder is a no-op, a log line without a subscriber is dropped.
    fn emit(self);
}

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, with span fields.
    Json,
}

/// Installs the global subscriber writing to stderr at `default_level` unless `RUST_LOG`
/// says otherwise. Calling it twice has no effect.
pub fn init(format: LogFormat) {
    init_with_level(format, "info");
}

/// Like [`init`], with the level used when `RUST_LOG` is not set (`"warn"` keeps a
/// command's standard error quiet unless something goes wrong).
pub fn init_with_level(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{default_level},lapin=warn,qdrant_edge=error"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
}
