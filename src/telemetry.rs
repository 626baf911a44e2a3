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
