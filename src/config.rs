//! Pipeline configuration: one TOML file per pipeline (`pipelines/docs.toml` is the default).
//!
//! [`PipelineConfig::load`] reads the file, applies environment overrides, resolves relative
//! paths against the file's own directory, and validates every field. Any problem is a
//! [`ConfigError`] that names the file, the field and what is wrong with it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::tenant::TenantId;

/// Environment variable overriding `broker.url`.
pub const ENV_AMQP_URL: &str = "RAG_INGEST_AMQP_URL";
/// Environment variable overriding `embedder.model_dir`.
pub const ENV_MODEL_DIR: &str = "RAG_INGEST_MODEL_DIR";
/// Environment variable overriding `store.path`.
pub const ENV_STORE_PATH: &str = "RAG_INGEST_STORE_PATH";

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read pipeline config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or a field has the wrong type or is unknown.
    #[error("invalid pipeline config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (it names the line and the key).
        message: String,
    },
    /// A field has a value that is not allowed.
    #[error("invalid pipeline config {path}: field `{field}`: {problem}")]
    Field {
        /// The file (or `<env>` for an environment override).
        path: PathBuf,
        /// Dotted field name, e.g. `chunking.overlap`.
        field: String,
        /// What is wrong and what is allowed.
        problem: String,
    },
}

/// A whole pipeline: where documents come from, how they are processed, where they go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Pipeline name; queue names derive from it (`rag-ingest.<name>`, `…dlq`, `…retry.<ms>`).
    pub name: String,
    /// RabbitMQ settings.
    pub broker: BrokerConfig,
    /// Which tenants may submit documents.
    pub tenants: TenantsConfig,
    /// How documents are split.
    pub chunking: ChunkingConfig,
    /// Which model computes embeddings.
    pub embedder: EmbedderConfig,
    /// Where vectors are stored.
    pub store: StoreConfig,
    /// Input limits.
    pub limits: LimitsConfig,
    /// Retry policy for transient failures.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Worker behaviour.
    #[serde(default)]
    pub worker: WorkerConfig,
}

/// `[broker]`: the RabbitMQ connection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// AMQP URL, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f` (env `RAG_INGEST_AMQP_URL`).
    pub url: String,
    /// How many unacknowledged deliveries the broker hands this worker at once.
    pub prefetch: u16,
    /// Broker-side crash-loop guard: a message redelivered more often is dead-lettered.
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: u32,
}

/// `[tenants]`: the allow-list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsConfig {
    /// Tenants whose documents are accepted; any other tenant is dead-lettered as `unknown_tenant`.
    pub allowed: Vec<String>,
}

/// `[chunking]`: chunk sizes in the embedding model's own tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkingConfig {
    /// Largest chunk, in model tokens without special tokens.
    pub max_tokens: usize,
    /// Tokens shared by consecutive chunks.
    pub overlap: usize,
}

/// Embedder implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbedderKind {
    /// In-process candle BERT model.
    Candle,
}

/// `[embedder]`: the model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedderConfig {
    /// Implementation.
    pub kind: EmbedderKind,
    /// Hugging Face model directory (relative to this file; env `RAG_INGEST_MODEL_DIR`).
    pub model_dir: PathBuf,
    /// Texts per forward pass.
    pub batch_size: usize,
}

/// Store implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Embedded Qdrant Edge on local disk.
    Edge,
}

/// `[store]`: the vector store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Implementation.
    pub kind: StoreKind,
    /// Data directory for `edge` (relative to this file; env `RAG_INGEST_STORE_PATH`).
    pub path: PathBuf,
    /// Collection name.
    pub collection: String,
}

/// `[limits]`: what a single message may hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest accepted document content, in bytes of UTF-8.
    pub max_document_bytes: usize,
}

/// `[retry]`: what happens to transient failures (store or embedder unavailable).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Total attempts (deliveries) before a message goes to the DLQ.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// In-process retries of one attempt before it is handed to a delayed-retry tier.
    #[serde(default = "default_in_process_retries")]
    pub in_process_retries: u32,
    /// First in-process backoff delay in milliseconds (doubles each time, with jitter).
    #[serde(default = "default_backoff_min_ms")]
    pub backoff_min_ms: u64,
    /// Largest in-process backoff delay in milliseconds.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Delayed-retry tiers in milliseconds; attempt n waits in tier min(n-1, last).
    #[serde(default = "default_delays_ms")]
    pub delays_ms: Vec<u64>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: default_max_attempts(),
            in_process_retries: default_in_process_retries(),
            backoff_min_ms: default_backoff_min_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            delays_ms: default_delays_ms(),
        }
    }
}

/// `[worker]`: concurrency and lifecycle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Messages processed concurrently (at most `broker.prefetch`).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Seconds to finish in-flight messages after SIGTERM/SIGINT before giving up on them.
    #[serde(default = "default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
    /// Seconds to keep trying to reconnect to the broker before exiting non-zero.
    #[serde(default = "default_reconnect_give_up_secs")]
    pub reconnect_give_up_secs: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: default_concurrency(),
            shutdown_grace_secs: default_shutdown_grace_secs(),
            reconnect_give_up_secs: default_reconnect_give_up_secs(),
        }
    }
}

fn default_delivery_limit() -> u32 {
    5
}
fn default_max_attempts() -> u32 {
    5
}
fn default_in_process_retries() -> u32 {
    3
}
fn default_backoff_min_ms() -> u64 {
    100
}
fn default_backoff_max_ms() -> u64 {
    5_000
}
fn default_delays_ms() -> Vec<u64> {
    vec![1_000, 10_000, 60_000]
}
fn default_concurrency() -> usize {
    4
}
fn default_shutdown_grace_secs() -> u64 {
    30
}
fn default_reconnect_give_up_secs() -> u64 {
    300
}

impl PipelineConfig {
    /// Reads, overrides from the process environment, resolves and validates `path`.
    ///
    /// Fails with [`ConfigError`] naming the field when anything is wrong.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, |name| std::env::var(name).ok())
    }

    /// Like [`PipelineConfig::load`], with environment lookups answered by `env`
    /// (lets tests override without touching the process environment).
    pub fn load_with_env(
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml_str(&text, path, base, env)
    }

    /// Parses `text` as if read from `origin`, resolving relative paths against `base`.
    ///
    /// Fails with [`ConfigError`] naming the field when anything is wrong.
    pub fn from_toml_str(
        text: &str,
        origin: &Path,
        base: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut config: PipelineConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        if let Some(url) = env(ENV_AMQP_URL) {
            config.broker.url = url;
        }
        if let Some(dir) = env(ENV_MODEL_DIR) {
            config.embedder.model_dir = PathBuf::from(dir);
        }
        if let Some(dir) = env(ENV_STORE_PATH) {
            config.store.path = PathBuf::from(dir);
        }
        config.embedder.model_dir = base.join(&config.embedder.model_dir);
        config.store.path = base.join(&config.store.path);
        config.validate(origin)?;
        Ok(config)
    }

    /// The allowed tenants, validated.
    pub fn allowed_tenants(&self) -> BTreeSet<TenantId> {
        self.tenants
            .allowed
            .iter()
            .filter_map(|t| TenantId::new(t.clone()).ok())
            .collect()
    }

    /// The broker URL with any password replaced by `***`, safe to log.
    pub fn redacted_amqp_url(&self) -> String {
        redact_url(&self.broker.url)
    }

    fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let fail = |field: &str, problem: String| ConfigError::Field {
            path: origin.to_path_buf(),
            field: field.to_string(),
            problem,
        };
        if self.name.is_empty()
            || self.name.len() > 100
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        {
            return Err(fail(
                "name",
                format!(
                    "{:?} must be 1 to 100 characters of letters, digits, '_' or '-'",
                    self.name
                ),
            ));
        }
        if !(self.broker.url.starts_with("amqp://") || self.broker.url.starts_with("amqps://")) {
            return Err(fail(
                "broker.url",
                format!(
                    "{:?} must start with amqp:// or amqps://",
                    redact_url(&self.broker.url)
                ),
            ));
        }
        if self.broker.url.starts_with("amqps://") {
            return Err(fail(
                "broker.url",
                "amqps:// (TLS) is not built into this binary yet; use amqp:// or a TLS-terminating proxy".into(),
            ));
        }
        if self.broker.prefetch == 0 {
            return Err(fail("broker.prefetch", "must be at least 1".into()));
        }
        if self.broker.delivery_limit == 0 {
            return Err(fail("broker.delivery_limit", "must be at least 1".into()));
        }
        if self.tenants.allowed.is_empty() {
            return Err(fail(
                "tenants.allowed",
                "must list at least one tenant".into(),
            ));
        }
        for (i, t) in self.tenants.allowed.iter().enumerate() {
            if let Err(e) = TenantId::new(t.clone()) {
                return Err(fail(&format!("tenants.allowed[{i}]"), e.to_string()));
            }
        }
        if self.chunking.max_tokens < 8 {
            return Err(fail(
                "chunking.max_tokens",
                format!("{} is too small; use at least 8", self.chunking.max_tokens),
            ));
        }
        if self.chunking.overlap >= self.chunking.max_tokens {
            return Err(fail(
                "chunking.overlap",
                format!(
                    "{} must be less than chunking.max_tokens ({})",
                    self.chunking.overlap, self.chunking.max_tokens
                ),
            ));
        }
        if self.embedder.batch_size == 0 || self.embedder.batch_size > 1024 {
            return Err(fail(
                "embedder.batch_size",
                format!("{} must be between 1 and 1024", self.embedder.batch_size),
            ));
        }
        if self.store.collection.is_empty()
            || !self
                .store
                .collection
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        {
            return Err(fail(
                "store.collection",
                format!(
                    "{:?} must be non-empty letters, digits, '_' or '-'",
                    self.store.collection
                ),
            ));
        }
        if self.limits.max_document_bytes == 0 {
            return Err(fail(
                "limits.max_document_bytes",
                "must be at least 1".into(),
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(fail("retry.max_attempts", "must be at least 1".into()));
        }
        if self.retry.backoff_min_ms == 0 || self.retry.backoff_min_ms > self.retry.backoff_max_ms {
            return Err(fail(
                "retry.backoff_min_ms",
                "must be at least 1 and not above retry.backoff_max_ms".into(),
            ));
        }
        if self.retry.delays_ms.is_empty() || self.retry.delays_ms.contains(&0) {
            return Err(fail(
                "retry.delays_ms",
                "must list at least one delay, each at least 1 ms".into(),
            ));
        }
        if self.worker.concurrency == 0
            || self.worker.concurrency > usize::from(self.broker.prefetch)
        {
            return Err(fail(
                "worker.concurrency",
                format!(
                    "{} must be between 1 and broker.prefetch ({})",
                    self.worker.concurrency, self.broker.prefetch
                ),
            ));
        }
        Ok(())
    }

    /// Grace period for in-flight messages at shutdown.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.worker.shutdown_grace_secs)
    }
}

/// Replaces the password of a URL like `amqp://user:pass@host/` with `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}://{}:***{}",
            &url[..scheme_end],
            &authority[..colon],
            &rest[at..]
        ),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
prefetch = 8
[tenants]
allowed = ["acme"]
[chunking]
max_tokens = 200
overlap = 20
[embedder]
kind = "candle"
model_dir = "models/m"
batch_size = 16
[store]
kind = "edge"
path = "data"
collection = "docs"
[limits]
max_document_bytes = 1000
"#;

    fn parse(text: &str) -> Result<PipelineConfig, ConfigError> {
        PipelineConfig::from_toml_str(text, Path::new("p.toml"), Path::new("/base"), |_| None)
    }

    fn field_error(text: &str) -> String {
        match parse(text) {
            Err(ConfigError::Field { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn good_config_resolves_paths_against_the_file() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.embedder.model_dir, Path::new("/base/models/m"));
        assert_eq!(c.store.path, Path::new("/base/data"));
        assert_eq!(c.retry.max_attempts, 5);
    }

    #[test]
    fn environment_overrides_url_and_paths() {
        let c =
            PipelineConfig::from_toml_str(
                GOOD,
                Path::new("p.toml"),
                Path::new("/b"),
                |k| match k {
                    ENV_AMQP_URL => Some("amqp://u:secret@h:1/v".into()),
                    ENV_MODEL_DIR => Some("/abs/model".into()),
                    _ => None,
                },
            )
            .expect("valid");
        assert_eq!(c.broker.url, "amqp://u:secret@h:1/v");
        assert_eq!(c.embedder.model_dir, Path::new("/abs/model"));
        assert_eq!(c.redacted_amqp_url(), "amqp://u:***@h:1/v");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            ("overlap = 20", "overlap = 300", "chunking.overlap"),
            ("prefetch = 8", "prefetch = 0", "broker.prefetch"),
            ("allowed = [\"acme\"]", "allowed = []", "tenants.allowed"),
            (
                "allowed = [\"acme\"]",
                "allowed = [\"a b\"]",
                "tenants.allowed[0]",
            ),
            ("batch_size = 16", "batch_size = 0", "embedder.batch_size"),
            ("amqp://guest", "http://guest", "broker.url"),
            (
                "collection = \"docs\"",
                "collection = \"\"",
                "store.collection",
            ),
            (
                "max_document_bytes = 1000",
                "max_document_bytes = 0",
                "limits.max_document_bytes",
            ),
            ("name = \"t\"", "name = \"a/b\"", "name"),
        ];
        for (from, to, field) in cases {
            let text = GOOD.replace(from, to);
            assert_eq!(
                field_error(&text),
                field,
                "after replacing {from:?} with {to:?}"
            );
        }
    }

    #[test]
    fn unknown_and_mistyped_fields_are_named_by_the_parser() {
        let err = parse(&GOOD.replace("prefetch = 8", "prefetch = \"8\"")).unwrap_err();
        assert!(err.to_string().contains("prefetch"), "{err}");
        let err =
            parse(&GOOD.replace("batch_size = 16", "batch_size = 16\nbatchsize = 3")).unwrap_err();
        assert!(err.to_string().contains("batchsize"), "{err}");
        let err = parse(&GOOD.replace("kind = \"candle\"", "kind = \"onnx\"")).unwrap_err();
        assert!(err.to_string().contains("onnx"), "{err}");
    }

    #[test]
    fn redaction_leaves_urls_without_password_alone() {
        assert_eq!(
            redact_url("amqp://127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://a:b@h/%2f"), "amqp://a:***@h/%2f");
    }
}
