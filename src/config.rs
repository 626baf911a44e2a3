//! Pipeline configuration: one TOML file per pipeline (`pipelines/docs.toml` is the default).
//!
//! [`PipelineConfig::load`] reads the file, applies environment overrides, resolves relative
//! paths against the file's own directory, and validates every field. Any problem is a
//! [`ConfigError`] that names the file, the field and what is wrong with it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::context::{ContextMode, Contextualizer};
use crate::fingerprint::{Fingerprint, Precision};
use crate::secret::Secret;
use crate::tenant::TenantId;
use crate::validate::{
    has_scheme, http_url_has_credentials, is_env_var_name, is_http_url_with_host, is_plain_name,
};
/// Re-exported from [`crate::validate`], where the shared URL helpers live.
pub use crate::validate::{redact_url, split_url_list};

/// Environment variable overriding `broker.url` (one URL, or several separated by commas).
pub const ENV_AMQP_URL: &str = "RAG_INGEST_AMQP_URL";
/// Environment variable overriding `broker.tls_ca_file`.
pub const ENV_AMQP_TLS_CA_FILE: &str = "RAG_INGEST_AMQP_TLS_CA_FILE";
/// Environment variable overriding `embedder.model_dir` (and `embedder.fallback.model_dir`
/// when the fallback is a candle model).
pub const ENV_MODEL_DIR: &str = "RAG_INGEST_MODEL_DIR";
/// Environment variable overriding `store.path`.
pub const ENV_STORE_PATH: &str = "RAG_INGEST_STORE_PATH";
/// Environment variable overriding `store.qdrant.url`.
pub const ENV_QDRANT_URL: &str = "RAG_INGEST_QDRANT_URL";
/// Environment variable overriding `redis.url`.
pub const ENV_REDIS_URL: &str = "RAG_INGEST_REDIS_URL";

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
    /// The worker's metrics and health endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// State shared by the pipeline's workers (tenant budgets, the shared provider rate
    /// limit): a Redis server. Unset: nothing is shared.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
}

/// `[redis]`: the Redis server holding what the pipeline's workers share (tenant token
/// budgets, the provider rate limit when `embedder.rate_limit_shared`). Its `Debug` output
/// shows the URL with its password redacted.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` (env `RAG_INGEST_REDIS_URL`); a standalone
    /// server or a primary (keys are not cluster-slotted).
    pub url: String,
    /// Prefix of every key (`<prefix>:<pipeline>:…`), so several deployments can share one
    /// server.
    #[serde(default = "default_redis_key_prefix")]
    pub key_prefix: String,
    /// Deadline of one Redis call (connecting included), in milliseconds: past it the call
    /// counts as failed (see `tenants.budgets.on_redis_error`).
    #[serde(default = "default_redis_timeout_ms")]
    pub timeout_ms: u64,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &Secret::url(self.url.as_str()))
            .field("key_prefix", &self.key_prefix)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

impl RedisConfig {
    /// Checks `[redis]`: a `redis://` or `rediss://` URL the client accepts, a key prefix of
    /// plain characters, a non-zero timeout.
    fn validate(&self, fail: Fail<'_>) -> Result<(), ConfigError> {
        if !(has_scheme(&self.url, "redis://") || has_scheme(&self.url, "rediss://")) {
            return Err(fail(
                "redis.url",
                format!(
                    "{:?} must start with redis:// or rediss://",
                    redact_url(&self.url)
                ),
            ));
        }
        if let Err(e) = redis::Client::open(self.url.as_str()) {
            return Err(fail(
                "redis.url",
                format!(
                    "{:?} is not a valid Redis URL: {}",
                    redact_url(&self.url),
                    e.detail().unwrap_or("unparseable")
                ),
            ));
        }
        if !self
            .key_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
            || self.key_prefix.is_empty()
            || self.key_prefix.len() > 100
        {
            return Err(fail(
                "redis.key_prefix",
                format!(
                    "{:?} must be 1 to 100 letters, digits, '_', '-', '.' or ':'",
                    self.key_prefix
                ),
            ));
        }
        if self.timeout_ms == 0 {
            return Err(fail("redis.timeout_ms", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// `[tenants.budgets]`: model tokens each listed tenant may embed per window, counted in
/// Redis across every worker of the pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetsConfig {
    /// Length of a budget window in seconds; windows are aligned to the Unix epoch on the
    /// Redis server's clock (86400: one UTC day).
    #[serde(default = "default_budget_window_secs")]
    pub window_secs: u64,
    /// Tenant → model tokens per window. A tenant not listed has no budget.
    #[serde(default)]
    pub tokens: BTreeMap<String, u64>,
    /// What a worker does with a budgeted tenant's message while Redis cannot be asked.
    #[serde(default)]
    pub on_redis_error: RedisFailurePolicy,
}

/// `tenants.budgets.on_redis_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisFailurePolicy {
    /// Fail closed: the message is deferred (parked briefly, no attempt used) until Redis
    /// answers again; no token is spent that cannot be counted.
    #[default]
    Closed,
    /// Fail open: the message is processed; its tokens are counted once Redis answers again.
    Open,
}

impl RedisFailurePolicy {
    /// `closed` or `open`.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisFailurePolicy::Closed => "closed",
            RedisFailurePolicy::Open => "open",
        }
    }
}

/// Longest `tenants.budgets.window_secs`: 31 days.
pub const MAX_BUDGET_WINDOW_SECS: u64 = 31 * 86_400;

impl BudgetsConfig {
    /// Checks `[tenants.budgets]`: a window of 1 s to 31 days, every listed tenant allowed
    /// and given at least one token.
    fn validate(&self, allowed: &[String], fail: Fail<'_>) -> Result<(), ConfigError> {
        if self.window_secs == 0 || self.window_secs > MAX_BUDGET_WINDOW_SECS {
            return Err(fail(
                "tenants.budgets.window_secs",
                format!(
                    "{} must be between 1 and {MAX_BUDGET_WINDOW_SECS} (31 days)",
                    self.window_secs
                ),
            ));
        }
        for (tenant, tokens) in &self.tokens {
            let field = format!("tenants.budgets.tokens.{tenant}");
            if !allowed.contains(tenant) {
                return Err(fail(&field, "names a tenant not in tenants.allowed".into()));
            }
            if *tokens == 0 {
                return Err(fail(
                    &field,
                    "must be at least 1 (remove the entry for no budget)".into(),
                ));
            }
        }
        Ok(())
    }
}

/// `[metrics]`: where the worker serves `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` to listen on; an empty string turns the endpoint off.
    #[serde(default = "default_metrics_address")]
    pub address: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            address: default_metrics_address(),
        }
    }
}

impl MetricsConfig {
    /// The socket address to serve on, `None` when turned off. Validated at load time.
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        self.address.parse().ok()
    }
}

/// Default of `metrics.address`: loopback only, so `/metrics` is not exposed by accident.
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9464";

fn default_metrics_address() -> String {
    DEFAULT_METRICS_ADDRESS.to_owned()
}

/// `[broker]`: the RabbitMQ connection. Its `Debug` output shows the URLs with their
/// passwords redacted.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// AMQP URL, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f` (env `RAG_INGEST_AMQP_URL`), or
    /// several nodes of one cluster: a TOML array of URLs or one string with the URLs separated
    /// by commas (an array is kept here in the comma form). Connections try them in rotation;
    /// [`BrokerConfig::urls`] lists them.
    #[serde(deserialize_with = "url_or_list")]
    pub url: String,
    /// PEM file of CA certificates to trust for `amqps://` besides the system's trust store,
    /// e.g. a self-signed or private CA (relative to this file; env
    /// `RAG_INGEST_AMQP_TLS_CA_FILE`).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// The certificates of `tls_ca_file` (PEM), read and checked at load time.
    #[serde(skip)]
    pub tls_ca_pem: Option<String>,
    /// How many unacknowledged deliveries the broker hands this worker at once.
    pub prefetch: u16,
    /// Broker-side crash-loop guard: a message redelivered more often is dead-lettered.
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: u32,
    /// How long a publish (a retry, deferral, DLQ or hand-back copy; a replay of
    /// `reprocess`; a `submit`) waits for the broker's confirm before it fails as not sent
    /// (the source is then kept). A broker under a memory or disk alarm confirms nothing
    /// until the alarm clears.
    #[serde(default = "default_confirm_timeout_ms")]
    pub confirm_timeout_ms: u64,
}

impl std::fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("url", &Secret::url(self.url.as_str()))
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_ca_pem", &self.tls_ca_pem.as_ref().map(|_| "…"))
            .field("prefetch", &self.prefetch)
            .field("delivery_limit", &self.delivery_limit)
            .field("confirm_timeout_ms", &self.confirm_timeout_ms)
            .finish()
    }
}

impl BrokerConfig {
    /// The broker URLs in the order given (one for a single URL); see [`split_url_list`].
    pub fn urls(&self) -> Vec<&str> {
        split_url_list(&self.url)
    }

    /// `confirm_timeout_ms` as a duration.
    pub fn confirm_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.confirm_timeout_ms)
    }
}

/// Accepts `broker.url` as one string or as an array of strings (joined with `,`).
fn url_or_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    match OneOrMany::deserialize(deserializer) {
        Ok(OneOrMany::One(url)) => Ok(url),
        Ok(OneOrMany::Many(urls)) => Ok(urls.join(",")),
        Err(_) => Err(serde::de::Error::custom(
            "expected an AMQP URL or an array of AMQP URLs",
        )),
    }
}

/// `[tenants]`: the allow-list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsConfig {
    /// Tenants whose documents are accepted; any other tenant is dead-lettered as `unknown_tenant`.
    pub allowed: Vec<String>,
    /// `[tenants.budgets]`: model tokens per tenant per window (needs `[redis]`).
    #[serde(default)]
    pub budgets: Option<BudgetsConfig>,
}

/// `[chunking]`: chunk sizes in the embedding model's own tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkingConfig {
    /// Largest chunk, in model tokens without special tokens.
    pub max_tokens: usize,
    /// Tokens shared by consecutive chunks.
    pub overlap: usize,
    /// What is embedded with each chunk: `"none"` (the chunk alone, the default) or
    /// `"headings"` (the document title and the chunk's Markdown heading path, within
    /// [`Contextualizer::budget_for`] tokens taken from `max_tokens`). Changing it re-embeds
    /// each document at its next update.
    #[serde(default)]
    pub context: ContextMode,
}

/// Embedder implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbedderKind {
    /// In-process candle BERT model.
    Candle,
    /// Any OpenAI-compatible `POST {base_url}/v1/embeddings` endpoint (OpenAI, vLLM, TEI,
    /// Ollama, LiteLLM, infinity).
    OpenAi,
}

impl EmbedderKind {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            EmbedderKind::Candle => "candle",
            EmbedderKind::OpenAi => "openai",
        }
    }
}

/// `[embedder]` (and `[embedder.fallback]`): the model.
///
/// `kind = "candle"` needs `model_dir`; its fingerprint comes from the model files.
/// `kind = "openai"` needs `base_url`, `model` and the explicit fingerprint
/// (`fingerprint_model`, `dims`, `pooling`, `normalized`), which must describe what the remote
/// model really computes: it is compared with the collection's and with the fallback's.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedderConfig {
    /// Implementation.
    pub kind: EmbedderKind,
    /// candle: Hugging Face model directory (relative to this file; env
    /// `RAG_INGEST_MODEL_DIR`). Unused by openai.
    #[serde(default)]
    pub model_dir: PathBuf,
    /// candle: texts per forward pass; openai: most texts per HTTP request.
    pub batch_size: usize,
    /// candle: arithmetic of the linear layers: `auto` (default: bf16 where the CPU has
    /// AVX-512 BF16 and a load-time self-check keeps cosine ≥ 0.9999 to f32, else f32), `f32`
    /// (the reference vectors) or `bf16` (about 1.6× faster on CPUs with AVX-512 BF16; fails
    /// to load elsewhere). Unused by openai.
    #[serde(default)]
    pub precision: Precision,
    /// openai: endpoint root; requests go to `{base_url}/v1/embeddings` (a trailing `/v1` is
    /// not doubled).
    #[serde(default)]
    pub base_url: Option<String>,
    /// openai: the `model` sent in every request.
    #[serde(default)]
    pub model: Option<String>,
    /// openai: NAME of the environment variable holding the API key (sent as
    /// `Authorization: Bearer …`); unset means no `Authorization` header.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// openai: `dimensions` sent in every request (models that can shorten their vectors);
    /// must equal `dims`.
    #[serde(default)]
    pub dimensions: Option<usize>,
    /// openai: fingerprint model identity, e.g. `sentence-transformers/all-MiniLM-L6-v2`.
    #[serde(default)]
    pub fingerprint_model: Option<String>,
    /// openai: fingerprint vector dimension.
    #[serde(default)]
    pub dims: Option<usize>,
    /// openai: fingerprint pooling, e.g. `mean`.
    #[serde(default)]
    pub pooling: Option<String>,
    /// openai: fingerprint normalisation (true when vectors are L2-normalised).
    #[serde(default)]
    pub normalized: Option<bool>,
    /// openai: the most tokens the remote model reads per input (the chunker keeps chunks
    /// within it). Default 512.
    #[serde(default)]
    pub max_input_tokens: Option<usize>,
    /// openai: token budget of one request; batches are split so that each request's inputs
    /// add up to at most this many tokens. Unset: split by `batch_size` only.
    #[serde(default)]
    pub max_request_tokens: Option<usize>,
    /// openai: a `tokenizer.json` of the remote model (relative to this file), used to count
    /// tokens for `max_request_tokens` and by the chunker. Without it tokens are estimated
    /// as UTF-8 bytes + 4 (an upper bound), and the chunker uses a candle fallback's tokenizer.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// openai: timeout of one HTTP request, in milliseconds.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// openai: HTTP requests in flight at once, over all messages of this worker.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// openai: requests per minute this worker sends at most (0 = no limit); requests wait
    /// for budget instead of collecting 429s.
    #[serde(default)]
    pub max_requests_per_minute: u32,
    /// openai: model tokens per minute this worker sends at most (0 = no limit), counted
    /// with the embedder's tokenizer.
    #[serde(default)]
    pub max_tokens_per_minute: u32,
    /// openai: `max_requests_per_minute` and `max_tokens_per_minute` are the limits of all
    /// the pipeline's workers together, enforced by one bucket in Redis (needs `[redis]`);
    /// false: each worker enforces them on its own.
    #[serde(default)]
    pub rate_limit_shared: bool,
    /// openai: retries of one request answered 429 or 503, inside the embedder (honouring
    /// `Retry-After`). Other transient failures are retried by the worker (`[retry]`).
    #[serde(default = "default_rate_limit_retries")]
    pub rate_limit_retries: u32,
    /// openai: the longest `Retry-After` the embedder waits for, in milliseconds; a longer
    /// one fails the call at once (transient) and the worker's delayed retry takes over.
    #[serde(default = "default_max_retry_after_ms")]
    pub max_retry_after_ms: u64,
    /// openai: consecutive transient failures that open the circuit breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// openai: milliseconds the open breaker fails calls fast before letting a probe through.
    #[serde(default = "default_breaker_open_ms")]
    pub breaker_open_ms: u64,
    /// `[embedder.fallback]`: an embedder of the same vector space used while this one's
    /// circuit breaker is open or a call to it fails transiently (same fields; no nested
    /// fallback).
    #[serde(default)]
    pub fallback: Option<Box<EmbedderConfig>>,
}

impl EmbedderConfig {
    /// The fingerprint configured for an openai embedder; `None` for candle (whose
    /// fingerprint comes from the model files) or when a field is missing.
    pub fn configured_fingerprint(&self) -> Option<Fingerprint> {
        if self.kind != EmbedderKind::OpenAi {
            return None;
        }
        Some(Fingerprint {
            model: self.fingerprint_model.clone()?,
            dims: self.dims?,
            pooling: self.pooling.clone()?,
            normalized: self.normalized?,
            sparse: None,
        })
    }

    fn resolve_paths(&mut self, base: &Path) {
        if !self.model_dir.as_os_str().is_empty() {
            self.model_dir = base.join(&self.model_dir);
        }
        if let Some(tokenizer) = &self.tokenizer {
            self.tokenizer = Some(base.join(tokenizer));
        }
        if let Some(fallback) = &mut self.fallback {
            fallback.resolve_paths(base);
        }
    }

    /// Checks this embedder's fields; `prefix` is `embedder` or `embedder.fallback`.
    fn validate(
        &self,
        prefix: &str,
        fail: &dyn Fn(&str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let field = |name: &str| format!("{prefix}.{name}");
        if self.batch_size == 0 || self.batch_size > 1024 {
            return Err(fail(
                &field("batch_size"),
                format!("{} must be between 1 and 1024", self.batch_size),
            ));
        }
        let remote_only: [(&str, bool); 12] = [
            ("base_url", self.base_url.is_some()),
            ("model", self.model.is_some()),
            ("api_key_env", self.api_key_env.is_some()),
            ("dimensions", self.dimensions.is_some()),
            ("fingerprint_model", self.fingerprint_model.is_some()),
            ("dims", self.dims.is_some()),
            ("pooling", self.pooling.is_some()),
            ("normalized", self.normalized.is_some()),
            ("max_input_tokens", self.max_input_tokens.is_some()),
            ("max_request_tokens", self.max_request_tokens.is_some()),
            ("tokenizer", self.tokenizer.is_some()),
            ("rate_limit_shared", self.rate_limit_shared),
        ];
        match self.kind {
            EmbedderKind::Candle => {
                if self.model_dir.as_os_str().is_empty() {
                    return Err(fail(
                        &field("model_dir"),
                        "is required for kind \"candle\"".into(),
                    ));
                }
                if let Some((name, _)) = remote_only.iter().find(|(_, set)| *set) {
                    return Err(fail(
                        &field(name),
                        "is only for kind \"openai\" (a candle model's fingerprint, limits and tokenizer come from its files)".into(),
                    ));
                }
            }
            EmbedderKind::OpenAi => {
                if matches!(
                    self.precision,
                    Precision::Bf16 | Precision::Int8 | Precision::Int16
                ) {
                    return Err(fail(
                        &field("precision"),
                        "is only for kind \"candle\" (a remote provider computes its own vectors)"
                            .into(),
                    ));
                }
                self.validate_remote(&field, fail)?;
            }
        }
        Ok(())
    }

    /// The endpoint and fingerprint of an openai embedder (every field the kind requires),
    /// then its limits; fails naming the first missing or invalid field.
    fn validate_remote(
        &self,
        field: &dyn Fn(&str) -> String,
        fail: &dyn Fn(&str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let required = |name: &str| fail(&field(name), "is required for kind \"openai\"".into());
        let base_url = self
            .base_url
            .as_deref()
            .ok_or_else(|| required("base_url"))?;
        if !(base_url.starts_with("http://") || base_url.starts_with("https://"))
            || base_url.len() <= "https://".len()
        {
            return Err(fail(
                &field("base_url"),
                format!(
                    "{:?} must be an http:// or https:// URL",
                    redact_url(base_url)
                ),
            ));
        }
        if self.model.as_deref().is_none_or(|m| m.trim().is_empty()) {
            return Err(required("model"));
        }
        if let Some(name) = &self.api_key_env
            && !is_env_var_name(name)
        {
            return Err(fail(
                &field("api_key_env"),
                format!(
                    "{name:?} must be the NAME of an environment variable (letters, digits, '_'), not the key itself"
                ),
            ));
        }
        if self
            .fingerprint_model
            .as_deref()
            .is_none_or(|m| m.trim().is_empty())
        {
            return Err(required("fingerprint_model"));
        }
        let dims = self.dims.ok_or_else(|| required("dims"))?;
        if dims == 0 {
            return Err(fail(&field("dims"), "must be at least 1".into()));
        }
        if self.pooling.as_deref().is_none_or(|p| p.trim().is_empty()) {
            return Err(required("pooling"));
        }
        if self.normalized.is_none() {
            return Err(required("normalized"));
        }
        if let Some(dimensions) = self.dimensions
            && dimensions != dims
        {
            return Err(fail(
                &field("dimensions"),
                format!(
                    "{dimensions} must equal dims ({dims}): the fingerprint must describe the vectors the provider returns"
                ),
            ));
        }
        self.validate_remote_limits(field, fail)
    }

    /// The request limits of an openai embedder: token budgets, timeout, concurrency and
    /// circuit breaker; fails naming the first field out of range.
    fn validate_remote_limits(
        &self,
        field: &dyn Fn(&str) -> String,
        fail: &dyn Fn(&str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let max_input = self
            .max_input_tokens
            .unwrap_or(DEFAULT_REMOTE_MAX_INPUT_TOKENS);
        if max_input < 8 {
            return Err(fail(
                &field("max_input_tokens"),
                format!("{max_input} is too small; use at least 8"),
            ));
        }
        if let Some(budget) = self.max_request_tokens
            && budget < max_input
        {
            return Err(fail(
                &field("max_request_tokens"),
                format!(
                    "{budget} must be at least max_input_tokens ({max_input}) so that every chunk fits in a request"
                ),
            ));
        }
        if self.request_timeout_ms == 0 {
            return Err(fail(
                &field("request_timeout_ms"),
                "must be at least 1".into(),
            ));
        }
        if self.max_concurrent_requests == 0 || self.max_concurrent_requests > 1024 {
            return Err(fail(
                &field("max_concurrent_requests"),
                format!(
                    "{} must be between 1 and 1024",
                    self.max_concurrent_requests
                ),
            ));
        }
        if self.breaker_failures == 0 {
            return Err(fail(
                &field("breaker_failures"),
                "must be at least 1".into(),
            ));
        }
        if self.breaker_open_ms == 0 {
            return Err(fail(&field("breaker_open_ms"), "must be at least 1".into()));
        }
        Ok(())
    }
}

/// Per-input token limit of an openai embedder without `max_input_tokens`.
pub const DEFAULT_REMOTE_MAX_INPUT_TOKENS: usize = 512;

/// Store implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Embedded Qdrant Edge on local disk.
    Edge,
    /// A Qdrant server over gRPC (`[store.qdrant]`).
    Qdrant,
}

impl StoreKind {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Edge => "edge",
            StoreKind::Qdrant => "qdrant",
        }
    }
}

/// `[store]`: the vector store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Implementation.
    pub kind: StoreKind,
    /// Data directory for `edge` (relative to this file; env `RAG_INGEST_STORE_PATH`).
    /// Required for `edge`, unused by `qdrant` (empty when not set).
    #[serde(default)]
    pub path: PathBuf,
    /// Collection name.
    pub collection: String,
    /// Most points in one write request (1 to 10 000); larger upserts are split.
    #[serde(default = "default_max_batch_points")]
    pub max_batch_points: usize,
    /// Most bytes in one write request (1 KiB to 256 MiB); larger upserts are split. A Qdrant
    /// server refuses requests above its `service.max_request_size_mb` (32 MiB by default).
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// `[store.qdrant]`: the server, for `kind = "qdrant"` (ignored by `edge`).
    #[serde(default)]
    pub qdrant: QdrantConfig,
}

/// An API key read from the environment: a [`Secret`] (its `Debug` and `Display` print `***`).
pub type ApiKey = Secret;

/// `[store.qdrant]`: how to reach a Qdrant server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QdrantConfig {
    /// gRPC URL (`http://` or `https://`, port 6334 by default; env `RAG_INGEST_QDRANT_URL`).
    #[serde(default = "default_qdrant_url")]
    pub url: String,
    /// NAME of the environment variable holding the API key; unset means no key. The key
    /// itself never goes in the file.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The key read from `api_key_env` when the config was loaded (only for `kind = "qdrant"`).
    #[serde(skip)]
    pub api_key: Option<ApiKey>,
    /// Deadline of one request in milliseconds (also bounds `wait=true` writes).
    #[serde(default = "default_qdrant_timeout_ms")]
    pub timeout_ms: u64,
    /// Deadline for connecting, in milliseconds.
    #[serde(default = "default_qdrant_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// In-process retries of one request on transient gRPC failures (0 to 20).
    #[serde(default = "default_qdrant_retries")]
    pub retries: u32,
    /// First retry delay in milliseconds (doubles each time, with jitter).
    #[serde(default = "default_qdrant_backoff_min_ms")]
    pub backoff_min_ms: u64,
    /// Largest retry delay in milliseconds.
    #[serde(default = "default_qdrant_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Shards of a collection this worker creates (1 to 65536); unset = the server's default
    /// (one per peer at creation in a cluster, 1 on a single node). Only used at creation.
    #[serde(default)]
    pub shard_number: Option<u32>,
    /// Copies of each shard kept on distinct peers of a cluster (1 to 64); unset = the
    /// server's default (1). Only used when this worker creates the collection.
    #[serde(default)]
    pub replication_factor: Option<u32>,
    /// Replicas that must apply a write before the server answers (1 to
    /// `replication_factor`); unset = the server's default (1). Only used at creation.
    #[serde(default)]
    pub write_consistency_factor: Option<u32>,
}

impl Default for QdrantConfig {
    fn default() -> Self {
        QdrantConfig {
            url: default_qdrant_url(),
            api_key_env: None,
            api_key: None,
            timeout_ms: default_qdrant_timeout_ms(),
            connect_timeout_ms: default_qdrant_connect_timeout_ms(),
            retries: default_qdrant_retries(),
            backoff_min_ms: default_qdrant_backoff_min_ms(),
            backoff_max_ms: default_qdrant_backoff_max_ms(),
            shard_number: None,
            replication_factor: None,
            write_consistency_factor: None,
        }
    }
}

/// `[limits]`: what a single message may hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest accepted document content, in bytes of UTF-8.
    pub max_document_bytes: usize,
    /// Largest accepted `metadata` object, in bytes as counted by
    /// [`metadata_size`](crate::message::metadata_size) (its compact JSON plus 32 bytes per
    /// key and value, about what it takes in memory). The metadata is stored with every
    /// chunk, so it is multiplied by the chunk count in memory and on disk. Default 16 KiB.
    #[serde(default = "default_max_metadata_bytes")]
    pub max_metadata_bytes: usize,
    /// Most pages of an `application/pdf` document; a longer PDF is dead-lettered as
    /// `content_too_large` before its pages are read. Default 2,000.
    #[serde(default = "default_max_pdf_pages")]
    pub max_pdf_pages: usize,
}

fn default_max_pdf_pages() -> usize {
    2_000
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
    /// Most bytes the messages being processed may occupy at once: a delivery is taken only
    /// while the messages in flight, each counted at its estimated footprint (body, content
    /// copies, and per chunk its metadata, vector and payload copies; see
    /// [`MessageFootprint`](crate::queue::MessageFootprint)), add up to less, so the working
    /// set stays bounded however large documents and their metadata are. One message
    /// counted above the budget is still processed, alone.
    #[serde(default = "default_max_inflight_bytes")]
    pub max_inflight_bytes: usize,
    /// Seconds to finish in-flight messages after SIGTERM/SIGINT before giving up on them.
    #[serde(default = "default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
    /// Seconds to keep trying to reconnect to the broker before exiting non-zero.
    #[serde(default = "default_reconnect_give_up_secs")]
    pub reconnect_give_up_secs: u64,
    /// Most bulk-lane messages processed at once (1..=`concurrency`; default
    /// `concurrency` − `concurrency`/4, at least 1): the other slots stay free for live
    /// messages. See [`WorkerConfig::bulk_slots`].
    #[serde(default)]
    pub bulk_concurrency: Option<usize>,
}

impl WorkerConfig {
    /// Most bulk-lane messages processed at once: `bulk_concurrency`, or by default
    /// `concurrency` − `concurrency`/4 (at least 1), so a quarter of the slots are kept for
    /// live messages.
    pub fn bulk_slots(&self) -> usize {
        self.bulk_concurrency
            .unwrap_or_else(|| self.concurrency.saturating_sub(self.concurrency / 4))
            .clamp(1, self.concurrency.max(1))
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            bulk_concurrency: None,
            concurrency: default_concurrency(),
            max_inflight_bytes: default_max_inflight_bytes(),
            shutdown_grace_secs: default_shutdown_grace_secs(),
            reconnect_give_up_secs: default_reconnect_give_up_secs(),
        }
    }
}

// Defaults: each declared once, here, and used by the serde defaults below, the `Default`
// impls and the components' own constructors (e.g. `QdrantOptions::new`).

/// Default of `broker.delivery_limit`.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 5;
/// Default of `broker.confirm_timeout_ms`: [`crate::queue::CONFIRM_TIMEOUT`].
pub const DEFAULT_CONFIRM_TIMEOUT_MS: u64 = 30_000;
/// Largest `broker.confirm_timeout_ms`: one hour (a longer wait is a hang by another name).
pub const MAX_CONFIRM_TIMEOUT_MS: u64 = 3_600_000;
/// Default of `embedder.request_timeout_ms` (openai).
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Default of `embedder.max_concurrent_requests` (openai).
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 4;
/// Default of `embedder.rate_limit_retries` (openai).
pub const DEFAULT_RATE_LIMIT_RETRIES: u32 = 2;
/// Default of `embedder.max_retry_after_ms` (openai).
pub const DEFAULT_MAX_RETRY_AFTER_MS: u64 = 30_000;
/// Default of `embedder.breaker_failures` (openai): the breaker's own default.
pub const DEFAULT_BREAKER_FAILURES: u32 = crate::breaker::DEFAULT_FAILURE_THRESHOLD;
/// Default of `embedder.breaker_open_ms` (openai): the breaker's own default.
pub const DEFAULT_BREAKER_OPEN_MS: u64 = crate::breaker::DEFAULT_OPEN_FOR_MS;
/// Default of `retry.max_attempts`.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Default of `retry.in_process_retries`.
pub const DEFAULT_IN_PROCESS_RETRIES: u32 = 3;
/// Default of `retry.backoff_min_ms`.
pub const DEFAULT_BACKOFF_MIN_MS: u64 = 100;
/// Default of `retry.backoff_max_ms`.
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 5_000;
/// Default of `retry.delays_ms`.
pub const DEFAULT_DELAYS_MS: [u64; 3] = [1_000, 10_000, 60_000];
/// Default of `worker.concurrency`.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// Default of `limits.max_metadata_bytes`.
pub const DEFAULT_MAX_METADATA_BYTES: usize = 16 * 1024;
/// Default of `worker.max_inflight_bytes`.
pub const DEFAULT_MAX_INFLIGHT_BYTES: usize = 16 * 1024 * 1024;
/// Default of `worker.shutdown_grace_secs`.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 30;
/// Default of `worker.reconnect_give_up_secs`.
pub const DEFAULT_RECONNECT_GIVE_UP_SECS: u64 = 300;
/// Default of `store.max_batch_points`.
pub const DEFAULT_MAX_BATCH_POINTS: usize = 256;
/// Default of `store.max_batch_bytes`: 16 MiB, half of a Qdrant server's default request
/// limit (`service.max_request_size_mb` = 32).
pub const DEFAULT_MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Default of `store.qdrant.url`.
pub const DEFAULT_QDRANT_URL: &str = "http://127.0.0.1:6334";
/// Default of `store.qdrant.timeout_ms`.
pub const DEFAULT_QDRANT_TIMEOUT_MS: u64 = 10_000;
/// Default of `store.qdrant.connect_timeout_ms`.
pub const DEFAULT_QDRANT_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Default of `store.qdrant.retries`.
pub const DEFAULT_QDRANT_RETRIES: u32 = 3;
/// Default of `store.qdrant.backoff_min_ms`.
pub const DEFAULT_QDRANT_BACKOFF_MIN_MS: u64 = 100;
/// Default of `store.qdrant.backoff_max_ms`.
pub const DEFAULT_QDRANT_BACKOFF_MAX_MS: u64 = 2_000;
/// Default of `redis.key_prefix`.
pub const DEFAULT_REDIS_KEY_PREFIX: &str = "rag-ingest";
/// Default of `redis.timeout_ms`.
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 500;
/// Default of `tenants.budgets.window_secs`: one day.
pub const DEFAULT_BUDGET_WINDOW_SECS: u64 = 86_400;

fn default_delivery_limit() -> u32 {
    DEFAULT_DELIVERY_LIMIT
}
fn default_confirm_timeout_ms() -> u64 {
    DEFAULT_CONFIRM_TIMEOUT_MS
}
fn default_request_timeout_ms() -> u64 {
    DEFAULT_REQUEST_TIMEOUT_MS
}
fn default_max_concurrent_requests() -> usize {
    DEFAULT_MAX_CONCURRENT_REQUESTS
}
fn default_rate_limit_retries() -> u32 {
    DEFAULT_RATE_LIMIT_RETRIES
}
fn default_max_retry_after_ms() -> u64 {
    DEFAULT_MAX_RETRY_AFTER_MS
}
fn default_breaker_failures() -> u32 {
    DEFAULT_BREAKER_FAILURES
}
fn default_breaker_open_ms() -> u64 {
    DEFAULT_BREAKER_OPEN_MS
}
fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}
fn default_in_process_retries() -> u32 {
    DEFAULT_IN_PROCESS_RETRIES
}
fn default_backoff_min_ms() -> u64 {
    DEFAULT_BACKOFF_MIN_MS
}
fn default_backoff_max_ms() -> u64 {
    DEFAULT_BACKOFF_MAX_MS
}
fn default_delays_ms() -> Vec<u64> {
    DEFAULT_DELAYS_MS.to_vec()
}
fn default_concurrency() -> usize {
    DEFAULT_CONCURRENCY
}
fn default_max_metadata_bytes() -> usize {
    DEFAULT_MAX_METADATA_BYTES
}
fn default_max_inflight_bytes() -> usize {
    DEFAULT_MAX_INFLIGHT_BYTES
}
fn default_shutdown_grace_secs() -> u64 {
    DEFAULT_SHUTDOWN_GRACE_SECS
}
fn default_reconnect_give_up_secs() -> u64 {
    DEFAULT_RECONNECT_GIVE_UP_SECS
}
fn default_max_batch_points() -> usize {
    DEFAULT_MAX_BATCH_POINTS
}
fn default_max_batch_bytes() -> usize {
    DEFAULT_MAX_BATCH_BYTES
}
fn default_redis_key_prefix() -> String {
    DEFAULT_REDIS_KEY_PREFIX.to_owned()
}
fn default_redis_timeout_ms() -> u64 {
    DEFAULT_REDIS_TIMEOUT_MS
}
fn default_budget_window_secs() -> u64 {
    DEFAULT_BUDGET_WINDOW_SECS
}
fn default_qdrant_url() -> String {
    DEFAULT_QDRANT_URL.to_owned()
}
fn default_qdrant_timeout_ms() -> u64 {
    DEFAULT_QDRANT_TIMEOUT_MS
}
fn default_qdrant_connect_timeout_ms() -> u64 {
    DEFAULT_QDRANT_CONNECT_TIMEOUT_MS
}
fn default_qdrant_retries() -> u32 {
    DEFAULT_QDRANT_RETRIES
}
fn default_qdrant_backoff_min_ms() -> u64 {
    DEFAULT_QDRANT_BACKOFF_MIN_MS
}
fn default_qdrant_backoff_max_ms() -> u64 {
    DEFAULT_QDRANT_BACKOFF_MAX_MS
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
        if let Some(file) = env(ENV_AMQP_TLS_CA_FILE) {
            config.broker.tls_ca_file = Some(PathBuf::from(file));
        }
        if let Some(file) = &config.broker.tls_ca_file {
            config.broker.tls_ca_file = Some(base.join(file));
        }
        if let Some(dir) = env(ENV_MODEL_DIR) {
            if let Some(fallback) = &mut config.embedder.fallback
                && fallback.kind == EmbedderKind::Candle
            {
                fallback.model_dir = PathBuf::from(&dir);
            }
            config.embedder.model_dir = PathBuf::from(dir);
        }
        if let Some(dir) = env(ENV_STORE_PATH) {
            config.store.path = PathBuf::from(dir);
        }
        if let Some(url) = env(ENV_QDRANT_URL) {
            config.store.qdrant.url = url;
        }
        if let Some(url) = env(ENV_REDIS_URL)
            && let Some(redis) = &mut config.redis
        {
            redis.url = url;
        }
        config.embedder.resolve_paths(base);
        if !config.store.path.as_os_str().is_empty() {
            config.store.path = base.join(&config.store.path);
        }
        let field_error = |field: &'static str| {
            move |problem: String| ConfigError::Field {
                path: origin.to_path_buf(),
                field: field.to_owned(),
                problem,
            }
        };
        if config.store.kind == StoreKind::Qdrant {
            config
                .store
                .qdrant
                .resolve_api_key(&env)
                .map_err(field_error("store.qdrant.api_key_env"))?;
        }
        config.validate(origin)?;
        config
            .broker
            .load_ca()
            .map_err(field_error("broker.tls_ca_file"))?;
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

    /// The broker URL (every one of a list) with any password replaced by `***`, safe to log.
    pub fn redacted_amqp_url(&self) -> String {
        redact_url(&self.broker.url)
    }

    fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let fail = |field: &str, problem: String| ConfigError::Field {
            path: origin.to_path_buf(),
            field: field.to_string(),
            problem,
        };
        if !is_plain_name(&self.name, 100) {
            return Err(fail(
                "name",
                format!(
                    "{:?} must be 1 to 100 characters of letters, digits, '_' or '-'",
                    self.name
                ),
            ));
        }
        self.broker.validate(&fail)?;
        self.tenants.validate(&fail)?;
        self.chunking.validate(&fail)?;
        self.embedder.validate_with_fallback(&fail)?;
        self.store.validate(&fail)?;
        self.limits.validate(&fail)?;
        self.retry.validate(&fail)?;
        self.worker.validate(self.broker.prefetch, &fail)?;
        self.metrics.validate(&fail)?;
        self.validate_shared(&fail)
    }

    /// Checks `[redis]` and what needs it: budgets with tenants listed, and
    /// `embedder.rate_limit_shared` (which also needs a limit to share).
    fn validate_shared(&self, fail: Fail<'_>) -> Result<(), ConfigError> {
        if let Some(redis) = &self.redis {
            redis.validate(fail)?;
        }
        if let Some(budgets) = &self.tenants.budgets {
            budgets.validate(&self.tenants.allowed, fail)?;
            if !budgets.tokens.is_empty() && self.redis.is_none() {
                return Err(fail(
                    "tenants.budgets",
                    "needs [redis]: budgets are counted there, across every worker".into(),
                ));
            }
        }
        let embedder = &self.embedder;
        if embedder.rate_limit_shared {
            if self.redis.is_none() {
                return Err(fail(
                    "embedder.rate_limit_shared",
                    "needs [redis]: the shared bucket lives there".into(),
                ));
            }
            if embedder.max_requests_per_minute == 0 && embedder.max_tokens_per_minute == 0 {
                return Err(fail(
                    "embedder.rate_limit_shared",
                    "set embedder.max_requests_per_minute or max_tokens_per_minute to share".into(),
                ));
            }
        }
        if embedder
            .fallback
            .as_ref()
            .is_some_and(|f| f.rate_limit_shared)
        {
            return Err(fail(
                "embedder.fallback.rate_limit_shared",
                "only the primary embedder's limit can be shared".into(),
            ));
        }
        Ok(())
    }

    /// The token budget of `tenant` per window, if it has one.
    pub fn budget_of(&self, tenant: &str) -> Option<u64> {
        self.tenants.budgets.as_ref()?.tokens.get(tenant).copied()
    }

    /// Grace period for in-flight messages at shutdown.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.worker.shutdown_grace_secs)
    }
}

/// Builds the [`ConfigError::Field`] for a dotted field name and a problem; each section's
/// `validate` reports through one.
type Fail<'a> = &'a dyn Fn(&str, String) -> ConfigError;

impl BrokerConfig {
    /// Checks `[broker]`: every URL of `url` (at least one, each `amqp://` or `amqps://` and
    /// parseable as an AMQP URI; errors show it with its password redacted), `prefetch` and
    /// `delivery_limit` at least 1, `confirm_timeout_ms` between 1 ms and an hour. Fails with
    /// the first problem, naming its field.
    fn validate(&self, fail: Fail<'_>) -> Result<(), ConfigError> {
        let urls = self.urls();
        if urls.is_empty() {
            return Err(fail(
                "broker.url",
                "no URL given; set an amqp:// or amqps:// URL, or an array of them".into(),
            ));
        }
        let several = urls.len() > 1;
        for (i, url) in urls.iter().enumerate() {
            let which = if several {
                format!("entry {} ", i + 1)
            } else {
                String::new()
            };
            if !(has_scheme(url, "amqp://") || has_scheme(url, "amqps://")) {
                return Err(fail(
                    "broker.url",
                    format!(
                        "{which}{:?} must start with amqp:// or amqps://",
                        redact_url(url)
                    ),
                ));
            }
            if let Err(problem) = url.parse::<lapin::uri::AMQPUri>() {
                return Err(fail(
                    "broker.url",
                    format!(
                        "{which}{:?} is not a valid AMQP URL: {problem} (percent-encode '/', '@', '#', '?' and ':' in the user name and password, e.g. '/' as %2F)",
                        redact_url(url)
                    ),
                ));
            }
        }
        if self.prefetch == 0 {
            return Err(fail("broker.prefetch", "must be at least 1".into()));
        }
        if self.delivery_limit == 0 {
            return Err(fail("broker.delivery_limit", "must be at least 1".into()));
        }
        if !(1..=MAX_CONFIRM_TIMEOUT_MS).contains(&self.confirm_timeout_ms) {
            return Err(fail(
                "broker.confirm_timeout_ms",
                format!("must be between 1 and {MAX_CONFIRM_TIMEOUT_MS} (one hour)"),
            ));
        }
        Ok(())
    }
}

impl TenantsConfig {
    /// Checks `[tenants]`: at least one tenant, each a valid [`TenantId`].
    fn validate(&self, fail: Fail<'_>) -> Result<(), ConfigError> {
        if self.allowed.is_empty() {
            return Err(fail(
                "tenants.allowed",
                "must list at least one tenant".into(),
            ));
        }
        for (i, t) in self.allowed.iter().enumerate() {
            if let Err(e) = TenantId::new(t.clone()) {
                return Err(fail(&format!("tenants.allowed[{i}]"), e.to_string()));
            }
        }
        Ok(())
    }
}

impl ChunkingConfig {
    /// Checks `[chunking]`: `max_tokens` at least 8, `overlap` below it. (Whether they fit the
    /// model is checked when the chunker is built.)
    fn validate(&self, fail: Fail<'_>) -> Result<(), ConfigError> {
        if self.max_tokens < 8 {
            return Err(fail(
                "chunking.max_tokens",
                format!("{} is too small; use at least 8", self.max_tokens),
            ));
        }
        if self.overlap >= self.max_tokens {
            return Err(fail(
                "chunking.overlap",
                format!(
                    "{} must be less than chunking.max_tokens ({})",
                    self.overlap, self.max_tokens
                ),
            ));
        }
        let budget = Contextualizer::budget_for(self.context, self.max_tokens);
        if self.overlap >= self.max_tokens - budget {
            return Err(fail(
                "chunking.overlap",
                format!(
                    "{} must be less than chunking.max_tokens ({}) minus the {budget} tokens \
                     chunking.context = \"{}\" reserves",
                    self.overlap,
                    self.max_tokens,
                    self.context.as_str()
                ),
            ));
        }
        Ok(())
    }
}

impl EmbedderConfig {
    /// `[embedder]` and `[embedder.fallback]`: each on its own, then their fingerprints
    /// against each other when both are configured explicitly (a candle model's fingerprint
    /// is only known once loaded: `setup::embedder` checks that case), then whether the
    /// chunker has a tokenizer. Fails with the first problem, naming its field.
    fn validate_with_fallback(&self, fail: Fail<'_>) -> Result<(), ConfigError> {
        self.validate("embedder", fail)?;
        let tokenizer_required = || {
            fail(
                "embedder.tokenizer",
                "is required for kind \"openai\" unless the fallback is a candle model: chunks are sized in the model's own tokens".into(),
            )
        };
        let Some(fallback) = &self.fallback else {
            if self.kind == EmbedderKind::OpenAi && self.tokenizer.is_none() {
                return Err(tokenizer_required());
            }
            return Ok(());
        };
        if fallback.fallback.is_some() {
            return Err(fail(
                "embedder.fallback.fallback",
                "a fallback cannot have a fallback of its own".into(),
            ));
        }
        fallback.validate("embedder.fallback", fail)?;
        if let (Some(primary), Some(other)) = (
            self.configured_fingerprint(),
            fallback.configured_fingerprint(),
        ) && primary != other
        {
            return Err(fail(
                "embedder.fallback",
                format!(
                    "fingerprint {} differs from the primary's {}: a fallback must produce the same vector space (model, dims, pooling, normalisation)",
                    other.id(),
                    primary.id()
                ),
            ));
        }
        if self.kind == EmbedderKind::OpenAi
            && self.tokenizer.is_none()
            && fallback.kind != EmbedderKind::Candle
        {
            return Err(tokenizer_required());
        }
        Ok(())
    }
}

impl StoreConfig {
    /// Checks `[store]` (collection name, `path` for edge, write caps) and, for
    /// `kind = "qdrant"`, `[store.qdrant]`. Fails with the first problem, naming its field.
    fn validate(&self, fail: Fail<'_>) -> Result<(), ConfigError> {
        if !is_plain_name(&self.collection, usize::MAX) {
            return Err(fail(
                "store.collection",
                format!(
                    "{:?} must be non-empty letters, digits, '_' or '-'",
                    self.collection
                ),
            ));
        }
        if self.kind == StoreKind::Edge && self.path.as_os_str().is_empty() {
            return Err(fail(
                "store.path",
                "is required for kind \"edge\" (the data directory)".into(),
            ));
        }
        if self.max_batch_points == 0 || self.max_batch_points > 10_000 {
            return Err(fail(
                "store.max_batch_points",
                format!("{} must be between 1 and 10000", self.max_batch_points),
            ));
        }
        if self.max_batch_bytes < 1024 || self.max_batch_bytes > 256 * 1024 * 1024 {
            return Err(fail(
                "store.max_batch_bytes",
                format!(
                    "{} must be between 1024 and 268435456 (256 MiB); a Qdrant server refuses \
                     requests above its max_request_size_mb (32 MiB by default)",
                    self.max_batch_bytes
                ),
            ));
        }
        if self.kind != StoreKind::Qdrant {
            return Ok(());
        }
        self.qdrant.validate(fail)
    }
}

impl QdrantConfig {
    /// Checks `[store.qdrant]`: an `http(s)://` URL with a host and without credentials,
    /// timeouts at least 1 ms, at most 20 retries, a backoff range, and the cluster layout.
    fn validate(&self, fail: Fail<'_>) -> Result<(), ConfigError> {
        if http_url_has_credentials(&self.url) {
            return Err(fail(
                "store.qdrant.url",
                format!(
                    "{:?} must not carry credentials; put the API key in the environment \
                     variable named by store.qdrant.api_key_env",
                    redact_url(&self.url)
                ),
            ));
        }
        if !is_http_url_with_host(&self.url) {
            return Err(fail(
                "store.qdrant.url",
                format!(
                    "{:?} must be an http:// or https:// URL with a host, e.g. \
                     http://127.0.0.1:6334 (the gRPC port)",
                    redact_url(&self.url)
                ),
            ));
        }
        if self.timeout_ms == 0 {
            return Err(fail("store.qdrant.timeout_ms", "must be at least 1".into()));
        }
        if self.connect_timeout_ms == 0 {
            return Err(fail(
                "store.qdrant.connect_timeout_ms",
                "must be at least 1".into(),
            ));
        }
        if self.retries > 20 {
            return Err(fail(
                "store.qdrant.retries",
                format!("{} must be between 0 and 20", self.retries),
            ));
        }
        if self.backoff_min_ms == 0 || self.backoff_min_ms > self.backoff_max_ms {
            return Err(fail(
                "store.qdrant.backoff_min_ms",
                "must be at least 1 and not above store.qdrant.backoff_max_ms".into(),
            ));
        }
        self.validate_cluster(fail)
    }

    /// `shard_number`, `replication_factor` and `write_consistency_factor`.
    fn validate_cluster(&self, fail: Fail<'_>) -> Result<(), ConfigError> {
        if let Some(n) = self.shard_number
            && !(1..=65_536).contains(&n)
        {
            return Err(fail(
                "store.qdrant.shard_number",
                format!("{n} must be between 1 and 65536"),
            ));
        }
        if let Some(n) = self.replication_factor
            && !(1..=64).contains(&n)
        {
            return Err(fail(
                "store.qdrant.replication_factor",
                format!("{n} must be between 1 and 64"),
            ));
        }
        if let Some(w) = self.write_consistency_factor {
            // The server's default replication factor is 1.
            let replicas = self.replication_factor.unwrap_or(1);
            if w == 0 || w > replicas {
                return Err(fail(
                    "store.qdrant.write_consistency_factor",
                    format!(
                        "{w} must be between 1 and store.qdrant.replication_factor ({replicas}{}): \
                         a write cannot wait for more replicas than exist",
                        if self.replication_factor.is_none() {
                            ", the server's default when unset"
                        } else {
                            ""
                        }
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl QdrantConfig {
    /// With `api_key_env`: reads the key from that environment variable (looked up with
    /// `env`) into `api_key`. Fails with the problem (for `store.qdrant.api_key_env`) if the
    /// name is not an environment variable name or the variable is unset or empty; the key is
    /// never shown.
    fn resolve_api_key(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), String> {
        let Some(name) = &self.api_key_env else {
            return Ok(());
        };
        if !is_env_var_name(name) {
            return Err(
                "must be the NAME of an environment variable (letters, digits, '_'), not the key \
                 itself"
                    .into(),
            );
        }
        match env(name) {
            Some(key) if !key.trim().is_empty() => {
                self.api_key = Some(Secret::new(key));
                Ok(())
            }
            _ => Err(format!(
                "environment variable {name} is not set or empty; export the Qdrant API key in \
                 it, or remove api_key_env for a server without authentication"
            )),
        }
    }
}

impl BrokerConfig {
    /// With `tls_ca_file`: checks that some URL is `amqps://`, reads the file and keeps its
    /// certificates in `tls_ca_pem`. Fails with the problem (for `broker.tls_ca_file`) if no
    /// URL uses TLS, or the file cannot be read or holds no valid PEM certificate.
    fn load_ca(&mut self) -> Result<(), String> {
        let Some(file) = &self.tls_ca_file else {
            return Ok(());
        };
        if !self.urls().iter().any(|u| has_scheme(u, "amqps://")) {
            return Err(
                "is only used for TLS, but no broker.url is amqps://; remove it or use amqps://"
                    .into(),
            );
        }
        let pem = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let certificates =
            ca_certificates(&pem).map_err(|problem| format!("{}: {problem}", file.display()))?;
        if certificates == 0 {
            return Err(format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                file.display()
            ));
        }
        self.tls_ca_pem = Some(pem);
        Ok(())
    }
}

impl LimitsConfig {
    /// Checks `[limits]`: a document of at least 1 byte, metadata of at least 2 (`{}`).
    fn validate(&self, fail: Fail<'_>) -> Result<(), ConfigError> {
        if self.max_document_bytes == 0 {
            return Err(fail(
                "limits.max_document_bytes",
                "must be at least 1".into(),
            ));
        }
        if self.max_metadata_bytes < 2 {
            return Err(fail(
                "limits.max_metadata_bytes",
                "must be at least 2 (an empty object)".into(),
            ));
        }
        if self.max_pdf_pages == 0 {
            return Err(fail("limits.max_pdf_pages", "must be at least 1".into()));
        }
        Ok(())
    }
}

impl RetryConfig {
    /// Checks `[retry]`: at least one attempt, a backoff range, at least one delay tier, each
    /// at least 1 ms.
    fn validate(&self, fail: Fail<'_>) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(fail("retry.max_attempts", "must be at least 1".into()));
        }
        if self.backoff_min_ms == 0 || self.backoff_min_ms > self.backoff_max_ms {
            return Err(fail(
                "retry.backoff_min_ms",
                "must be at least 1 and not above retry.backoff_max_ms".into(),
            ));
        }
        if self.delays_ms.is_empty() || self.delays_ms.contains(&0) {
            return Err(fail(
                "retry.delays_ms",
                "must list at least one delay, each at least 1 ms".into(),
            ));
        }
        Ok(())
    }
}

impl WorkerConfig {
    /// Checks `[worker]`: `concurrency` between 1 and `prefetch` (`broker.prefetch`), a
    /// non-zero in-flight byte budget.
    fn validate(&self, prefetch: u16, fail: Fail<'_>) -> Result<(), ConfigError> {
        if self.concurrency == 0 || self.concurrency > usize::from(prefetch) {
            return Err(fail(
                "worker.concurrency",
                format!(
                    "{} must be between 1 and broker.prefetch ({prefetch})",
                    self.concurrency
                ),
            ));
        }
        if self.max_inflight_bytes == 0 {
            return Err(fail(
                "worker.max_inflight_bytes",
                "must be at least 1".into(),
            ));
        }
        if let Some(bulk) = self.bulk_concurrency
            && (bulk == 0 || bulk > self.concurrency)
        {
            return Err(fail(
                "worker.bulk_concurrency",
                format!(
                    "{bulk} must be between 1 and worker.concurrency ({})",
                    self.concurrency
                ),
            ));
        }
        Ok(())
    }
}

impl MetricsConfig {
    /// Checks `[metrics]`: `address` is `""` or an IP socket address.
    fn validate(&self, fail: Fail<'_>) -> Result<(), ConfigError> {
        if !self.address.is_empty() && self.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(fail(
                "metrics.address",
                format!(
                    "{:?} is not host:port with an IP address (e.g. 127.0.0.1:9464), nor \"\" to turn the endpoint off",
                    self.address
                ),
            ));
        }
        Ok(())
    }
}

/// Counts the PEM certificates in `pem`; fails with the parser's message if a PEM section is
/// malformed.
fn ca_certificates(pem: &str) -> Result<usize, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut count = 0usize;
    for certificate in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        certificate.map_err(|e| format!("not a valid PEM certificate file: {e}"))?;
        count = count.saturating_add(1);
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_of_a_config_never_shows_the_broker_password() {
        let text = GOOD.replace("guest:guest@", "guest:s3cr%2Ft@");
        let config =
            PipelineConfig::from_toml_str(&text, Path::new("p.toml"), Path::new("."), |_| None)
                .expect("valid");
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cr"), "{debug}");
        assert!(debug.contains("guest:***@"), "{debug}");
    }

    /// A minimal valid pipeline (edge store), shared with `store_tests`.
    pub(super) const GOOD: &str = r#"
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

    #[test]
    fn the_confirm_timeout_defaults_to_the_crate_constant_and_can_be_set() {
        let default = parse(GOOD).expect("valid");
        assert_eq!(
            default.broker.confirm_timeout(),
            crate::queue::CONFIRM_TIMEOUT
        );
        let set = parse(&GOOD.replace("prefetch = 8", "prefetch = 8\nconfirm_timeout_ms = 2500"))
            .expect("valid");
        assert_eq!(
            set.broker.confirm_timeout(),
            std::time::Duration::from_millis(2500)
        );
    }

    fn field_error(text: &str) -> String {
        match parse(text) {
            Err(ConfigError::Field { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn precision_is_auto_unless_set_and_unknown_values_are_named() {
        assert_eq!(
            parse(GOOD).expect("valid").embedder.precision,
            Precision::Auto
        );
        let f32 = GOOD.replace("batch_size = 16", "batch_size = 16\nprecision = \"f32\"");
        assert_eq!(
            parse(&f32).expect("valid").embedder.precision,
            Precision::F32
        );
        let bf16 = GOOD.replace("batch_size = 16", "batch_size = 16\nprecision = \"bf16\"");
        assert_eq!(
            parse(&bf16).expect("valid").embedder.precision,
            Precision::Bf16
        );
        let int8 = GOOD.replace("batch_size = 16", "batch_size = 16\nprecision = \"int8\"");
        assert_eq!(
            parse(&int8).expect("valid").embedder.precision,
            Precision::Int8
        );
        let int16 = GOOD.replace("batch_size = 16", "batch_size = 16\nprecision = \"int16\"");
        assert_eq!(
            parse(&int16).expect("valid").embedder.precision,
            Precision::Int16
        );
        let bad = GOOD.replace("batch_size = 16", "batch_size = 16\nprecision = \"f16\"");
        let err = parse(&bad).expect_err("f16 is not a precision").to_string();
        assert!(err.contains("precision") && err.contains("bf16"), "{err}");
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
            (
                "prefetch = 8",
                "prefetch = 8\nconfirm_timeout_ms = 0",
                "broker.confirm_timeout_ms",
            ),
            (
                "prefetch = 8",
                "prefetch = 8\nconfirm_timeout_ms = 3600001",
                "broker.confirm_timeout_ms",
            ),
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
            (
                "max_document_bytes = 1000",
                "max_document_bytes = 1000\nmax_metadata_bytes = 1",
                "limits.max_metadata_bytes",
            ),
            ("name = \"t\"", "name = \"a/b\"", "name"),
            (
                "max_document_bytes = 1000",
                "max_document_bytes = 1000\n[metrics]\naddress = \"localhost\"",
                "metrics.address",
            ),
            (
                "max_document_bytes = 1000",
                "max_document_bytes = 1000\n[worker]\nmax_inflight_bytes = 0",
                "worker.max_inflight_bytes",
            ),
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
    fn fairness_fields_are_checked_and_named() {
        let redis = "[redis]\nurl = \"redis://127.0.0.1:6379/\"\n";
        let budgets = "[tenants.budgets]\nwindow_secs = 60\ntokens = { acme = 1000 }\n";
        let ok = parse(&format!("{GOOD}{redis}{budgets}")).expect("valid");
        assert_eq!(ok.budget_of("acme"), Some(1000));
        assert_eq!(ok.budget_of("other"), None);
        let b = ok.tenants.budgets.as_ref().expect("budgets");
        assert_eq!(
            b.on_redis_error,
            RedisFailurePolicy::Closed,
            "fails closed by default"
        );
        assert_eq!(ok.redis.as_ref().map(|r| r.timeout_ms), Some(500));
        // 4 slots: one kept for live messages; 1 slot: shared.
        assert_eq!(
            ok.worker.bulk_slots(),
            DEFAULT_CONCURRENCY - DEFAULT_CONCURRENCY / 4
        );
        let one = parse(&format!("{GOOD}[worker]\nconcurrency = 1\n")).expect("valid");
        assert_eq!(one.worker.bulk_slots(), 1);

        let cases = [
            (format!("{GOOD}{budgets}"), "tenants.budgets"),
            (
                format!("{GOOD}{redis}{}", budgets.replace("60", "0")),
                "tenants.budgets.window_secs",
            ),
            (
                format!("{GOOD}{redis}{}", budgets.replace("acme", "nobody")),
                "tenants.budgets.tokens.nobody",
            ),
            (
                format!("{GOOD}{redis}{}", budgets.replace("1000", "0")),
                "tenants.budgets.tokens.acme",
            ),
            (
                format!("{GOOD}{}", redis.replace("redis://", "http://")),
                "redis.url",
            ),
            (
                format!("{GOOD}{redis}key_prefix = \"a b\"\n"),
                "redis.key_prefix",
            ),
            (format!("{GOOD}{redis}timeout_ms = 0\n"), "redis.timeout_ms"),
            (
                format!("{GOOD}[worker]\nconcurrency = 4\nbulk_concurrency = 5\n"),
                "worker.bulk_concurrency",
            ),
            (
                format!("{GOOD}[worker]\nbulk_concurrency = 0\n"),
                "worker.bulk_concurrency",
            ),
            (
                GOOD.replace(
                    "batch_size = 16",
                    "batch_size = 16\nrate_limit_shared = true",
                ),
                "embedder.rate_limit_shared",
            ),
        ];
        for (text, field) in cases {
            assert_eq!(field_error(&text), field, "{text}");
        }
        // The password of the Redis URL never shows.
        let secret = parse(&format!(
            "{GOOD}[redis]\nurl = \"redis://:hunter2@127.0.0.1:6379/\"\n"
        ))
        .expect("valid");
        assert!(!format!("{secret:?}").contains("hunter2"));
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

    /// Issue 15 item 8: a password with an unencoded `/`, `@`, `#` (or `?`, `:`) is hidden
    /// whole. The old redaction ended the authority at the first `/`, so `pa/ss` leaked.
    #[test]
    fn redaction_hides_passwords_with_reserved_characters() {
        let cases = [
            ("amqp://u:top/secret@h:5672/%2f", "amqp://u:***@h:5672/%2f"),
            ("amqp://u:top@secret@h:5672/%2f", "amqp://u:***@h:5672/%2f"),
            ("amqp://u:top#secret@h:5672/%2f", "amqp://u:***@h:5672/%2f"),
            ("amqp://u:top#/secret@h/%2f", "amqp://u:***@h/%2f"),
            ("amqps://u:a/b@c#d?e:f@h:5671/v", "amqps://u:***@h:5671/v"),
            ("amqp://u:top/secret@h", "amqp://u:***@h"),
            (
                "https://k:top/secret@api.example.com/v1",
                "https://k:***@api.example.com/v1",
            ),
        ];
        for (url, want) in cases {
            let got = redact_url(url);
            assert_eq!(got, want, "redacting {url}");
            assert!(!got.contains("secret") && !got.contains("top"), "{got}");
        }
        // User only, no password: nothing to hide.
        assert_eq!(redact_url("amqp://u@h:1/v"), "amqp://u@h:1/v");
    }

    /// Each URL of a list is redacted, not only the first.
    #[test]
    fn redaction_hides_the_password_of_every_url_in_a_list() {
        let list = "amqp://a:first/pw@h1:5672/%2f, amqp://b:second@pw@h2:5672/%2f,amqps://c:third#pw@h3:5671/%2f";
        let got = redact_url(list);
        assert_eq!(
            got,
            "amqp://a:***@h1:5672/%2f,amqp://b:***@h2:5672/%2f,amqps://c:***@h3:5671/%2f"
        );
        let c = parse(&GOOD.replace(
            "url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"",
            "url = [\"amqp://a:first%2Fpw@h1:5672/%2f\", \"amqp://b:second@h2:5672/%2f\"]",
        ))
        .expect("a list of URLs is valid");
        let shown = c.redacted_amqp_url();
        assert!(
            !shown.contains("first") && !shown.contains("second"),
            "{shown}"
        );
        assert!(
            shown.contains("h1:5672") && shown.contains("h2:5672"),
            "{shown}"
        );
    }

    #[test]
    fn broker_url_takes_one_url_an_array_or_a_comma_separated_list() {
        let one = parse(GOOD).expect("one URL");
        assert_eq!(one.broker.urls(), ["amqp://guest:guest@127.0.0.1:5672/%2f"]);
        let array = parse(&GOOD.replace(
            "url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"",
            "url = [\"amqp://g:g@127.0.0.1:5701/%2f\", \"amqp://g:g@127.0.0.1:5702/%2f\", \"amqps://g:g@localhost:5703/%2f\"]",
        ))
        .expect("an array");
        assert_eq!(
            array.broker.urls(),
            [
                "amqp://g:g@127.0.0.1:5701/%2f",
                "amqp://g:g@127.0.0.1:5702/%2f",
                "amqps://g:g@localhost:5703/%2f"
            ]
        );
        let env = PipelineConfig::from_toml_str(GOOD, Path::new("p.toml"), Path::new("/b"), |k| {
            (k == ENV_AMQP_URL).then(|| "amqp://g:g@n1:5672/%2f, amqp://g:g@n2:5672/%2f".into())
        })
        .expect("a comma-separated list from the environment");
        assert_eq!(
            env.broker.urls(),
            ["amqp://g:g@n1:5672/%2f", "amqp://g:g@n2:5672/%2f"]
        );
        // A comma inside a password does not split the URL.
        assert_eq!(split_url_list("amqp://u:a,b@h/%2f"), ["amqp://u:a,b@h/%2f"]);
    }

    #[test]
    fn bad_broker_urls_are_named() {
        for url in [
            "url = []",
            "url = \"\"",
            "url = [\"amqp://g:g@h1/%2f\", \"http://h2/\"]",
            "url = \"amqp://g:g@h1/%2f,amqp://g:g@h2:notaport/%2f\"",
            // An unencoded '/' in the password makes the host part unparseable.
            "url = \"amqp://g:pa/ss@h1:5672/%2f\"",
            "url = 5",
        ] {
            let text = GOOD.replace("url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"", url);
            let err = parse(&text).expect_err(url);
            match &err {
                ConfigError::Field { field, problem, .. } => {
                    assert_eq!(field, "broker.url", "{url}: {err}");
                    assert!(!problem.contains("ss@"), "password shown: {problem}");
                }
                ConfigError::Parse { message, .. } => {
                    assert!(message.contains("url"), "{url}: {message}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    fn ca_fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tls/test-ca.pem")
    }

    #[test]
    fn amqps_is_accepted_with_or_without_a_ca_file() {
        let tls = GOOD.replace(
            "amqp://guest:guest@127.0.0.1:5672",
            "amqps://guest:guest@localhost:5671",
        );
        let c = parse(&tls).expect("amqps:// is built in");
        assert!(c.broker.tls_ca_pem.is_none());
        let with_ca = tls.replace(
            "prefetch = 8",
            &format!(
                "prefetch = 8\ntls_ca_file = {:?}",
                ca_fixture().display().to_string()
            ),
        );
        let c = parse(&with_ca).expect("a CA file");
        assert!(
            c.broker
                .tls_ca_pem
                .as_deref()
                .is_some_and(|p| p.contains("BEGIN CERTIFICATE"))
        );
        // Relative paths resolve against the config file's directory; the environment overrides.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let c = PipelineConfig::from_toml_str(&tls, Path::new("p.toml"), dir, |k| {
            (k == ENV_AMQP_TLS_CA_FILE).then(|| "fixtures/tls/test-ca.pem".into())
        })
        .expect("CA file from the environment");
        assert_eq!(c.broker.tls_ca_file, Some(ca_fixture()));
        assert!(c.broker.tls_ca_pem.is_some());
    }

    #[test]
    fn bad_tls_ca_files_are_named() {
        let tls = GOOD.replace(
            "amqp://guest:guest@127.0.0.1:5672",
            "amqps://guest:guest@localhost:5671",
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").expect("write");
        let broken = dir.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\n%%%\n").expect("write");
        let cases = [
            (tls.clone(), dir.path().join("missing.pem")),
            (tls.clone(), not_pem),
            (tls.clone(), broken),
            // A CA file is for TLS only: with amqp:// it would silently do nothing.
            (GOOD.to_string(), ca_fixture()),
        ];
        for (text, file) in cases {
            let text = text.replace(
                "prefetch = 8",
                &format!(
                    "prefetch = 8\ntls_ca_file = {:?}",
                    file.display().to_string()
                ),
            );
            assert_eq!(
                field_error(&text),
                "broker.tls_ca_file",
                "{}",
                file.display()
            );
        }
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;

    use super::tests::GOOD as EDGE;

    const QDRANT: &str = r#"
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
kind = "qdrant"
collection = "docs"
[store.qdrant]
url = "http://qdrant:6334"
api_key_env = "MY_QDRANT_KEY"
[limits]
max_document_bytes = 1000
"#;

    fn parse_with(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<PipelineConfig, ConfigError> {
        PipelineConfig::from_toml_str(text, Path::new("p.toml"), Path::new("/base"), env)
    }

    fn key_env(name: &str) -> Option<String> {
        (name == "MY_QDRANT_KEY").then(|| "s3cr3t-key".to_string())
    }

    fn field_of(result: Result<PipelineConfig, ConfigError>) -> String {
        match result {
            Err(ConfigError::Field { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn edge_defaults_for_new_store_fields() {
        let c = parse_with(EDGE, |_| None).expect("valid");
        assert_eq!(c.store.kind, StoreKind::Edge);
        assert_eq!(c.store.max_batch_points, DEFAULT_MAX_BATCH_POINTS);
        assert_eq!(c.store.max_batch_bytes, DEFAULT_MAX_BATCH_BYTES);
        assert_eq!(c.store.qdrant.url, "http://127.0.0.1:6334");
        assert!(c.store.qdrant.api_key.is_none());
    }

    #[test]
    fn qdrant_config_reads_the_key_from_the_named_variable() {
        let c = parse_with(QDRANT, key_env).expect("valid");
        assert_eq!(c.store.kind, StoreKind::Qdrant);
        assert_eq!(c.store.qdrant.url, "http://qdrant:6334");
        assert_eq!(
            c.store.qdrant.api_key.as_ref().map(ApiKey::expose),
            Some("s3cr3t-key")
        );
        assert_eq!(c.store.path, PathBuf::new(), "no path needed for qdrant");
        assert_eq!(c.store.qdrant.timeout_ms, 10_000);
        // The key never shows in Debug output.
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    #[test]
    fn qdrant_url_env_override() {
        let c = parse_with(QDRANT, |k| match k {
            ENV_QDRANT_URL => Some("https://cloud.example:6334".into()),
            other => key_env(other),
        })
        .expect("valid");
        assert_eq!(c.store.qdrant.url, "https://cloud.example:6334");
    }

    #[test]
    fn a_missing_api_key_variable_is_named_without_a_value() {
        let err = parse_with(QDRANT, |_| None).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("store.qdrant.api_key_env"), "{text}");
        assert!(text.contains("MY_QDRANT_KEY"), "{text}");
        // An empty variable counts as missing.
        let err = parse_with(QDRANT, |k| (k == "MY_QDRANT_KEY").then(String::new)).unwrap_err();
        assert!(err.to_string().contains("store.qdrant.api_key_env"));
        // For an edge store the qdrant section is not resolved.
        let edge = EDGE.replace(
            "collection = \"docs\"",
            "collection = \"docs\"\n[store.qdrant]\napi_key_env = \"MY_QDRANT_KEY\"",
        );
        assert!(parse_with(&edge, |_| None).is_ok());
    }

    #[test]
    fn cluster_settings_default_to_the_server_and_are_checked() {
        let c = parse_with(QDRANT, key_env).expect("valid");
        assert_eq!(c.store.qdrant.shard_number, None);
        assert_eq!(c.store.qdrant.replication_factor, None);
        assert_eq!(c.store.qdrant.write_consistency_factor, None);
        let url = "url = \"http://qdrant:6334\"";
        let with = |extra: &str| QDRANT.replace(url, &format!("{url}\n{extra}"));
        let c = parse_with(
            &with("shard_number = 2\nreplication_factor = 3\nwrite_consistency_factor = 2"),
            key_env,
        )
        .expect("valid");
        assert_eq!(c.store.qdrant.shard_number, Some(2));
        assert_eq!(c.store.qdrant.replication_factor, Some(3));
        assert_eq!(c.store.qdrant.write_consistency_factor, Some(2));
        let cases = [
            ("shard_number = 0", "store.qdrant.shard_number"),
            ("replication_factor = 0", "store.qdrant.replication_factor"),
            ("replication_factor = 65", "store.qdrant.replication_factor"),
            (
                "replication_factor = 2\nwrite_consistency_factor = 3",
                "store.qdrant.write_consistency_factor",
            ),
            (
                "replication_factor = 2\nwrite_consistency_factor = 0",
                "store.qdrant.write_consistency_factor",
            ),
            // Unset replication factor is the server's 1.
            (
                "write_consistency_factor = 2",
                "store.qdrant.write_consistency_factor",
            ),
        ];
        for (extra, field) in cases {
            assert_eq!(
                field_of(parse_with(&with(extra), key_env)),
                field,
                "{extra}"
            );
        }
    }

    #[test]
    fn each_bad_store_field_is_named() {
        let cases: [(&str, &str, &str, &str); 11] = [
            (EDGE, "path = \"data\"\n", "", "store.path"),
            (
                EDGE,
                "collection = \"docs\"",
                "collection = \"docs\"\nmax_batch_points = 0",
                "store.max_batch_points",
            ),
            (
                EDGE,
                "collection = \"docs\"",
                "collection = \"docs\"\nmax_batch_bytes = 100",
                "store.max_batch_bytes",
            ),
            (
                QDRANT,
                "url = \"http://qdrant:6334\"",
                "url = \"qdrant:6334\"",
                "store.qdrant.url",
            ),
            (
                QDRANT,
                "url = \"http://qdrant:6334\"",
                "url = \"http://\"",
                "store.qdrant.url",
            ),
            (
                QDRANT,
                "url = \"http://qdrant:6334\"",
                "url = \"http://u:p@qdrant:6334\"",
                "store.qdrant.url",
            ),
            (
                QDRANT,
                "api_key_env = \"MY_QDRANT_KEY\"",
                "api_key_env = \"not a name\"",
                "store.qdrant.api_key_env",
            ),
            (
                QDRANT,
                "url = \"http://qdrant:6334\"",
                "url = \"http://qdrant:6334\"\ntimeout_ms = 0",
                "store.qdrant.timeout_ms",
            ),
            (
                QDRANT,
                "url = \"http://qdrant:6334\"",
                "url = \"http://qdrant:6334\"\nconnect_timeout_ms = 0",
                "store.qdrant.connect_timeout_ms",
            ),
            (
                QDRANT,
                "url = \"http://qdrant:6334\"",
                "url = \"http://qdrant:6334\"\nretries = 99",
                "store.qdrant.retries",
            ),
            (
                QDRANT,
                "url = \"http://qdrant:6334\"",
                "url = \"http://qdrant:6334\"\nbackoff_min_ms = 5000\nbackoff_max_ms = 10",
                "store.qdrant.backoff_min_ms",
            ),
        ];
        for (base, from, to, field) in cases {
            assert!(base.contains(from), "{from:?}");
            let text = base.replacen(from, to, 1);
            assert_eq!(
                field_of(parse_with(&text, key_env)),
                field,
                "after replacing {from:?} with {to:?}"
            );
        }
    }

    #[test]
    fn unknown_store_fields_and_inline_keys_are_refused() {
        let err = parse_with(
            &QDRANT.replace("api_key_env = \"MY_QDRANT_KEY\"", "api_key = \"s3cr3t\""),
            key_env,
        )
        .unwrap_err();
        assert!(err.to_string().contains("api_key"), "{err}");
        let err = parse_with(
            &QDRANT.replace("kind = \"qdrant\"", "kind = \"milvus\""),
            key_env,
        )
        .unwrap_err();
        assert!(err.to_string().contains("milvus"), "{err}");
    }
}
