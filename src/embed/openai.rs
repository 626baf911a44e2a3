//! [`OpenAiEmbedder`]: any OpenAI-compatible `POST {base_url}/v1/embeddings` endpoint
//! (OpenAI, vLLM, TEI, Ollama, LiteLLM, infinity).
//!
//! One [`Embedder::embed`] call is split into requests of at most `batch_size` inputs and, when
//! `max_request_tokens` is set, at most that many tokens (counted with the configured
//! `tokenizer.json`, or estimated as UTF-8 bytes + 4 per input, an upper bound for WordPiece,
//! byte-level BPE and SentencePiece tokenizers). The requests run concurrently, at most
//! `max_concurrent_requests` at once over the whole embedder; the answers are matched to the
//! inputs by their `index`. Any malformed answer (not JSON, wrong count, missing or duplicate
//! index, wrong dimension, NaN or infinity) fails the whole call: nothing partial is returned.
//!
//! # Failure policy
//!
//! | answer | error | kind | retried by the embedder? |
//! |---|---|---|---|
//! | 429, 503 | [`EmbedError::Unavailable`] | `embedder_unavailable` | yes: up to `rate_limit_retries` times, waiting `Retry-After` (seconds or HTTP date) or else an exponential backoff with jitter; a `Retry-After` above `max_retry_after` is not waited for |
//! | other 5xx, 408, timeout, connection error | [`EmbedError::Unavailable`] | `embedder_unavailable` | no: the worker's in-process retry (`retry::with_retries`) and delayed-retry tiers handle it |
//! | 2xx with a malformed body | [`EmbedError::InvalidResponse`] (or [`EmbedError::Dimension`]) | `embedder_unavailable` (`dimension_mismatch`) | no |
//! | 401, 403 | [`EmbedError::Auth`] | `embedder_auth` | never |
//! | 400, 404, 422, other 4xx | [`EmbedError::Rejected`] | `embedder_rejected` | never |
//!
//! Only the explicit "come back later" answers are retried inside the embedder, so the two
//! retry layers do not multiply for the same failure. Every request's final outcome feeds a
//! [`CircuitBreaker`]: after `breaker.failure_threshold` consecutive transient failures it
//! opens and calls fail fast with [`EmbedError::CircuitOpen`] without touching the network,
//! which caps the requests an outage can cost at the threshold per probe interval.
//!
//! # Secrets
//!
//! The API key is held in an [`ApiKey`] whose `Debug` prints `***`; it is sent only as
//! `Authorization: Bearer …` (a header marked sensitive) and is masked out of every message
//! that comes back from the provider before it lands in an error.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::rate::{RateLimiters, RateLimits};
use super::{EmbedError, Embedder, Fingerprint, Usage};
use crate::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
use crate::config::{
    DEFAULT_BREAKER_FAILURES, DEFAULT_BREAKER_OPEN_MS, DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_RETRY_AFTER_MS, DEFAULT_RATE_LIMIT_RETRIES, DEFAULT_REMOTE_MAX_INPUT_TOKENS,
    DEFAULT_REQUEST_TIMEOUT_MS, EmbedderConfig, EmbedderKind,
};
use crate::error::ErrorKind;
use crate::secret::Secret;
use crate::shared::rate::SharedRateLimit;
use crate::validate::redact_url;

/// Longest provider message kept in an error, in characters.
const MAX_MESSAGE_CHARS: usize = 500;
/// Tokens added to the byte count of an input when no tokenizer is configured (special
/// tokens and a SentencePiece word-start marker).
const ESTIMATE_EXTRA_TOKENS: usize = 4;
/// Response bodies larger than this (plus room for the expected vectors) are refused.
const BASE_BODY_LIMIT: usize = 1 << 20;

/// An API key: a [`Secret`] (its `Debug` and `Display` print `***`).
pub type ApiKey = Secret;

/// Everything an [`OpenAiEmbedder`] needs. [`OpenAiOptions::new`] fills in the defaults;
/// [`OpenAiOptions::from_config`] reads an `[embedder]` table.
#[derive(Clone)]
pub struct OpenAiOptions {
    /// Endpoint root: requests go to `{base_url}/v1/embeddings` (a trailing `/v1` is not
    /// doubled).
    pub base_url: String,
    /// The `model` sent in every request.
    pub model: String,
    /// Sent as `Authorization: Bearer …` when present.
    pub api_key: Option<ApiKey>,
    /// `dimensions` sent in every request when present.
    pub dimensions: Option<usize>,
    /// The vector space the remote model produces (configured, not discovered).
    pub fingerprint: Fingerprint,
    /// Most tokens the remote model reads per input ([`Embedder::max_input_tokens`]).
    pub max_input_tokens: usize,
    /// Most inputs per request (0 is treated as 1).
    pub batch_size: usize,
    /// Token budget per request (`None`: split by `batch_size` only).
    pub max_request_tokens: Option<usize>,
    /// The remote model's tokenizer, for counting tokens (truncation and padding are turned
    /// off when the embedder is built).
    pub tokenizer: Option<Tokenizer>,
    /// Timeout of one HTTP request (connect, send, whole response).
    pub request_timeout: Duration,
    /// HTTP requests in flight at once over the whole embedder (0 is treated as 1).
    pub max_concurrent_requests: usize,
    /// Retries of a request answered 429 or 503.
    pub rate_limit_retries: u32,
    /// First backoff delay for 429/503 without `Retry-After` (doubles, with jitter).
    pub backoff_min: Duration,
    /// Largest backoff delay for 429/503 without `Retry-After`.
    pub backoff_max: Duration,
    /// The longest `Retry-After` waited for inside the embedder.
    pub max_retry_after: Duration,
    /// When the circuit breaker opens and how long it stays open.
    pub breaker: BreakerConfig,
    /// Client-side requests and tokens per minute (0 = no limit).
    pub rate_limits: RateLimits,
    /// `rate_limits` enforced for all workers together in Redis
    /// (`embedder.rate_limit_shared`; `None`: for this worker alone). Set by
    /// [`crate::setup`].
    pub shared_rate_limit: Option<SharedRateLimit>,
}

impl fmt::Debug for OpenAiOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiOptions")
            .field("base_url", &redact_url(&self.base_url))
            .field("model", &self.model)
            .field("api_key", &self.api_key)
            .field("dimensions", &self.dimensions)
            .field("fingerprint", &self.fingerprint)
            .field("max_input_tokens", &self.max_input_tokens)
            .field("batch_size", &self.batch_size)
            .field("max_request_tokens", &self.max_request_tokens)
            .field("tokenizer", &self.tokenizer.is_some())
            .field("request_timeout", &self.request_timeout)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("rate_limit_retries", &self.rate_limit_retries)
            .field("max_retry_after", &self.max_retry_after)
            .field("breaker", &self.breaker)
            .field("rate_limits", &self.rate_limits)
            .field("shared_rate_limit", &self.shared_rate_limit)
            .finish_non_exhaustive()
    }
}

impl OpenAiOptions {
    /// Options with the defaults: no key, batches of 32, no token budget, 30 s timeout,
    /// 4 concurrent requests, 2 retries of 429/503 (backoff 200 ms → 5 s, `Retry-After` up
    /// to 30 s), breaker opening after 5 failures for 30 s, 512 tokens per input.
    pub fn new(
        base_url: impl Into<String>,
        model: impl Into<String>,
        fingerprint: Fingerprint,
    ) -> Self {
        OpenAiOptions {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            dimensions: None,
            fingerprint,
            max_input_tokens: DEFAULT_REMOTE_MAX_INPUT_TOKENS,
            batch_size: 32,
            max_request_tokens: None,
            tokenizer: None,
            request_timeout: Duration::from_millis(DEFAULT_REQUEST_TIMEOUT_MS),
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            rate_limit_retries: DEFAULT_RATE_LIMIT_RETRIES,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            max_retry_after: Duration::from_millis(DEFAULT_MAX_RETRY_AFTER_MS),
            rate_limits: RateLimits::default(),
            shared_rate_limit: None,
            breaker: BreakerConfig {
                failure_threshold: DEFAULT_BREAKER_FAILURES,
                open_for: Duration::from_millis(DEFAULT_BREAKER_OPEN_MS),
            },
        }
    }

    /// Reads a validated `kind = "openai"` embedder table; the API key is looked up with
    /// `env` under the name in `api_key_env`, and `tokenizer` is loaded from disk.
    ///
    /// # Errors
    ///
    /// [`EmbedError::Config`] if the table is not an openai one or lacks a field, the key
    /// variable is unset or empty (the error names the variable, never a value), or the
    /// tokenizer cannot be read.
    pub fn from_config(
        config: &EmbedderConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, EmbedError> {
        if config.kind != EmbedderKind::OpenAi {
            return Err(EmbedError::Config(format!(
                "kind {:?} is not an OpenAI-compatible embedder",
                config.kind.as_str()
            )));
        }
        let missing = |name: &str| EmbedError::Config(format!("{name} is required"));
        let fingerprint = config.configured_fingerprint().ok_or_else(|| {
            missing("the fingerprint (fingerprint_model, dims, pooling, normalized)")
        })?;
        let mut options = OpenAiOptions::new(
            config.base_url.clone().ok_or_else(|| missing("base_url"))?,
            config.model.clone().ok_or_else(|| missing("model"))?,
            fingerprint,
        );
        if let Some(name) = &config.api_key_env {
            let key = env(name).filter(|k| !k.trim().is_empty()).ok_or_else(|| {
                EmbedError::Config(format!(
                    "the API key variable {name} (embedder.api_key_env) is not set or empty"
                ))
            })?;
            options.api_key = Some(Secret::new(key.trim()));
        }
        if let Some(path) = &config.tokenizer {
            let tokenizer = Tokenizer::from_file(path).map_err(|e| {
                EmbedError::Config(format!("cannot read tokenizer {}: {e}", path.display()))
            })?;
            options.tokenizer = Some(tokenizer);
        }
        options.dimensions = config.dimensions;
        options.max_input_tokens = config
            .max_input_tokens
            .unwrap_or(DEFAULT_REMOTE_MAX_INPUT_TOKENS);
        options.batch_size = config.batch_size;
        options.max_request_tokens = config.max_request_tokens;
        options.request_timeout = Duration::from_millis(config.request_timeout_ms);
        options.max_concurrent_requests = config.max_concurrent_requests;
        options.rate_limits = RateLimits {
            requests_per_minute: config.max_requests_per_minute,
            tokens_per_minute: config.max_tokens_per_minute,
        };
        options.rate_limit_retries = config.rate_limit_retries;
        options.max_retry_after = Duration::from_millis(config.max_retry_after_ms);
        options.breaker = BreakerConfig {
            failure_threshold: config.breaker_failures,
            open_for: Duration::from_millis(config.breaker_open_ms),
        };
        Ok(options)
    }
}

/// An OpenAI-compatible remote embedder. See the [module docs](self) for the batching,
/// retry, circuit-breaker and secret-handling policy.
///
/// Cloning is cheap: clones share the HTTP client, the concurrency limit, the breaker and
/// the token counters.
#[derive(Clone)]
pub struct OpenAiEmbedder {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    endpoint: String,
    /// The endpoint with credentials redacted: names the provider in logs, errors, usage.
    label: String,
    model: String,
    /// `Bearer …`, marked sensitive.
    authorization: Option<HeaderValue>,
    /// The key itself, only to mask it out of provider messages.
    api_key: Option<ApiKey>,
    dimensions: Option<usize>,
    fingerprint: Fingerprint,
    max_input_tokens: usize,
    batch_size: usize,
    max_request_tokens: Option<usize>,
    tokenizer: Option<Tokenizer>,
    request_timeout: Duration,
    rate_limit_retries: u32,
    backoff_min: Duration,
    backoff_max: Duration,
    max_retry_after: Duration,
    slots: Semaphore,
    rate: RateLimiters,
    breaker: CircuitBreaker,
    tokens_used: AtomicU64,
    requests_sent: AtomicU64,
}

impl fmt::Debug for OpenAiEmbedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("OpenAiEmbedder")
            .field("endpoint", &inner.label)
            .field("model", &inner.model)
            .field("api_key", &inner.api_key)
            .field("fingerprint", &inner.fingerprint)
            .field("batch_size", &inner.batch_size)
            .field("max_request_tokens", &inner.max_request_tokens)
            .field("breaker", &inner.breaker.state())
            .finish_non_exhaustive()
    }
}

/// The request body.
#[derive(Serialize)]
struct EmbeddingsRequest<'a> {
    model: &'a str,
    input: &'a [String],
    encoding_format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<usize>,
}

/// The parts of the response body this embedder reads.
#[derive(Deserialize)]
struct EmbeddingsResponse {
    data: Vec<EmbeddingItem>,
    #[serde(default)]
    usage: Option<UsageBody>,
}

#[derive(Deserialize)]
struct EmbeddingItem {
    index: usize,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct UsageBody {
    #[serde(default)]
    prompt_tokens: Option<u64>,
}

/// One request's vectors (in input order) and what it cost.
struct BatchResult {
    vectors: Vec<Vec<f32>>,
    prompt_tokens: u64,
    requests: u64,
}

/// The outcome of one HTTP exchange.
enum Exchange {
    /// 2xx: the body.
    Body(Vec<u8>),
    /// 429 or 503: may be retried after the delay the provider asked for.
    Later {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
}

impl OpenAiEmbedder {
    /// Builds the embedder (no request is sent).
    ///
    /// Installs rustls' `ring` crypto provider as the process default if none is installed
    /// yet (the HTTP client needs one even for `http://`).
    ///
    /// # Errors
    ///
    /// [`EmbedError::Config`] if the base URL is not http(s), the key is not a valid header
    /// value, the tokenizer cannot be reconfigured, or the HTTP client cannot be built.
    pub fn new(options: OpenAiOptions) -> Result<Self, EmbedError> {
        let base = options.base_url.trim().trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(EmbedError::Config(format!(
                "base_url {:?} must be an http:// or https:// URL",
                redact_url(base)
            )));
        }
        let endpoint = if base.ends_with("/v1") {
            format!("{base}/embeddings")
        } else {
            format!("{base}/v1/embeddings")
        };
        let label = redact_url(&endpoint);
        let authorization = options
            .api_key
            .as_ref()
            .map(|key| {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
                    .map_err(|_| {
                        EmbedError::Config(
                        "the API key contains characters that are not allowed in an HTTP header"
                            .into(),
                    )
                    })?;
                value.set_sensitive(true);
                Ok::<_, EmbedError>(value)
            })
            .transpose()?;
        let tokenizer = options
            .tokenizer
            .map(|mut t| {
                t.with_truncation(None)
                    .map_err(|e| EmbedError::Config(format!("tokenizer: {e}")))?;
                t.with_padding(None);
                Ok::<_, EmbedError>(t)
            })
            .transpose()?;

        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // Fails only if another thread installed one meanwhile, which is just as good.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = reqwest::Client::builder()
            .timeout(options.request_timeout)
            .connect_timeout(options.request_timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("rag-ingest/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| EmbedError::Config(format!("cannot build the HTTP client: {e}")))?;

        let inner = Inner {
            client,
            endpoint,
            breaker: CircuitBreaker::new(label.clone(), options.breaker),
            label,
            model: options.model,
            authorization,
            api_key: options.api_key,
            dimensions: options.dimensions,
            fingerprint: options.fingerprint,
            max_input_tokens: options.max_input_tokens.max(1),
            batch_size: options.batch_size.max(1),
            max_request_tokens: options.max_request_tokens,
            tokenizer,
            request_timeout: options.request_timeout,
            rate_limit_retries: options.rate_limit_retries,
            backoff_min: options.backoff_min,
            backoff_max: options.backoff_max.max(options.backoff_min),
            max_retry_after: options.max_retry_after,
            slots: Semaphore::new(options.max_concurrent_requests.max(1)),
            rate: RateLimiters::new(options.rate_limits).with_shared(options.shared_rate_limit),
            tokens_used: AtomicU64::new(0),
            requests_sent: AtomicU64::new(0),
        };
        crate::telemetry::emit(crate::telemetry::events::RemoteEmbedderConfigured {
            endpoint: &inner.label,
            model: &inner.model,
            fingerprint: &inner.fingerprint.id(),
            authenticated: inner.authorization.is_some(),
        });
        Ok(OpenAiEmbedder {
            inner: Arc::new(inner),
        })
    }

    /// The endpoint (credentials redacted), as it appears in logs, errors and [`Usage`].
    pub fn provider(&self) -> &str {
        &self.inner.label
    }

    /// The circuit breaker guarding this provider.
    pub fn circuit_breaker(&self) -> &CircuitBreaker {
        &self.inner.breaker
    }

    /// The configured tokenizer (truncation and padding off), if any.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.inner.tokenizer.as_ref()
    }

    /// Input tokens billed by the provider since this embedder was built, over all calls,
    /// including calls that failed after some of their requests succeeded.
    pub fn tokens_used(&self) -> u64 {
        self.inner.tokens_used.load(Ordering::Relaxed)
    }

    /// HTTP requests sent since this embedder was built, retries included.
    pub fn requests_sent(&self) -> u64 {
        self.inner.requests_sent.load(Ordering::Relaxed)
    }
}

impl Embedder for OpenAiEmbedder {
    fn fingerprint(&self) -> &Fingerprint {
        &self.inner.fingerprint
    }

    fn max_input_tokens(&self) -> usize {
        self.inner.max_input_tokens
    }

    fn embed(
        &self,
        texts: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Vec<f32>>, EmbedError>> + Send {
        let inner = Arc::clone(&self.inner);
        async move { inner.embed_all(texts).await.map(|(vectors, _)| vectors) }
    }

    fn embed_with_usage(
        &self,
        texts: Vec<String>,
    ) -> impl Future<Output = Result<(Vec<Vec<f32>>, Usage), EmbedError>> + Send {
        let inner = Arc::clone(&self.inner);
        async move { inner.embed_all(texts).await }
    }

    fn breaker(&self) -> Option<&CircuitBreaker> {
        Some(&self.inner.breaker)
    }
}

impl Inner {
    /// Splits `texts` into requests, runs them concurrently and puts the vectors back in
    /// input order.
    async fn embed_all(
        self: Arc<Self>,
        texts: Vec<String>,
    ) -> Result<(Vec<Vec<f32>>, Usage), EmbedError> {
        let mut usage = Usage {
            provider: self.label.clone(),
            prompt_tokens: 0,
            requests: 0,
        };
        if texts.is_empty() {
            return Ok((Vec::new(), usage));
        }
        let (batches, counted) = self.plan(&texts);
        let count = texts.len();
        let texts = Arc::new(texts);
        let mut slots: Vec<Option<Vec<f32>>> = vec![None; count];
        let mut store = |range: Range<usize>, batch: BatchResult| {
            usage.prompt_tokens += batch.prompt_tokens;
            usage.requests += batch.requests;
            for (slot, vector) in slots[range].iter_mut().zip(batch.vectors) {
                *slot = Some(vector);
            }
        };
        let mut pending = batches.into_iter().zip(counted);
        if self.breaker.state() != BreakerState::Closed
            && let Some((range, tokens)) = pending.next()
        {
            // The first request may be the breaker's only probe: send it alone, so that the
            // others are not refused while it runs (they follow once it closed the breaker).
            let batch = self.guarded_request(&texts[range.clone()], tokens).await?;
            store(range, batch);
        }
        let mut requests = JoinSet::new();
        for (range, tokens) in pending {
            let inner = Arc::clone(&self);
            let texts = Arc::clone(&texts);
            requests.spawn(async move {
                let result = inner.guarded_request(&texts[range.clone()], tokens).await;
                (range, result)
            });
        }
        // Dropping the set on an early return aborts the requests still running.
        while let Some(joined) = requests.join_next().await {
            let (range, result) = joined.map_err(|e| EmbedError::Unavailable {
                provider: self.label.clone(),
                reason: format!("request task failed: {e}"),
                retry_after: None,
            })?;
            store(range, result?);
        }
        let vectors = slots
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| EmbedError::InvalidResponse {
                provider: self.label.clone(),
                reason: "an input got no vector".into(),
            })?;
        Ok((vectors, usage))
    }

    /// Consecutive ranges of `texts`, each at most `batch_size` long and (when a budget is
    /// set) at most `max_request_tokens` tokens, with each range's token count. An input
    /// alone over the budget gets a request of its own.
    fn plan(&self, texts: &[String]) -> (Vec<Range<usize>>, Vec<u64>) {
        let mut ranges = Vec::new();
        let mut counts = Vec::new();
        let mut start = 0;
        let mut tokens = 0usize;
        for (i, text) in texts.iter().enumerate() {
            let t = self.count_tokens(text);
            let full = i - start >= self.batch_size
                || self
                    .max_request_tokens
                    .is_some_and(|budget| i > start && tokens + t > budget);
            if full {
                ranges.push(start..i);
                counts.push(tokens as u64);
                start = i;
                tokens = 0;
            }
            tokens += t;
        }
        ranges.push(start..texts.len());
        counts.push(tokens as u64);
        (ranges, counts)
    }

    /// Tokens of `text` as the provider will count them (special tokens included): exact
    /// with a tokenizer, otherwise UTF-8 bytes + 4 (never less than the real count for
    /// WordPiece, byte-level BPE or SentencePiece).
    fn count_tokens(&self, text: &str) -> usize {
        self.tokenizer
            .as_ref()
            .and_then(|t| t.encode(text, true).ok())
            .map_or(text.len() + ESTIMATE_EXTRA_TOKENS, |e| e.len())
    }

    /// One batch through the circuit breaker: fails fast while it is open; reports the
    /// outcome (transient failures count, everything else is a sign of life).
    async fn guarded_request(
        &self,
        texts: &[String],
        counted_tokens: u64,
    ) -> Result<BatchResult, EmbedError> {
        let permit = self
            .breaker
            .try_acquire()
            .map_err(|source| EmbedError::CircuitOpen {
                provider: self.label.clone(),
                source,
            })?;
        let result = self.request_with_retries(texts, counted_tokens).await;
        match &result {
            Err(e) if e.kind() == ErrorKind::EmbedderUnavailable => permit.failure(),
            _ => permit.success(),
        }
        result
    }

    /// Sends one batch, retrying 429/503 as the policy allows.
    async fn request_with_retries(
        &self,
        texts: &[String],
        counted_tokens: u64,
    ) -> Result<BatchResult, EmbedError> {
        let body = serde_json::to_vec(&EmbeddingsRequest {
            model: &self.model,
            input: texts,
            encoding_format: "float",
            dimensions: self.dimensions,
        })
        .map_err(|e| EmbedError::Config(format!("cannot encode the request: {e}")))?;
        let mut backoff = ExponentialBuilder::new()
            .with_jitter()
            .with_min_delay(self.backoff_min)
            .with_max_delay(self.backoff_max)
            .with_max_times(self.rate_limit_retries as usize)
            .build();
        let mut requests = 0u64;
        loop {
            requests += 1;
            let waited = self.rate.acquire(counted_tokens).await;
            if !waited.is_zero() {
                crate::telemetry::emit(crate::telemetry::events::RateLimitWaited {
                    provider: &self.label,
                    waited,
                    tokens: counted_tokens,
                });
            }
            match self.exchange(body.clone(), texts.len()).await? {
                Exchange::Body(bytes) => {
                    let (vectors, reported) = self.parse(&bytes, texts.len())?;
                    let prompt_tokens = reported.unwrap_or(counted_tokens);
                    self.tokens_used.fetch_add(prompt_tokens, Ordering::Relaxed);
                    return Ok(BatchResult {
                        vectors,
                        prompt_tokens,
                        requests,
                    });
                }
                Exchange::Later {
                    status,
                    message,
                    retry_after,
                } => {
                    let give_up = |why: &str| EmbedError::Unavailable {
                        provider: self.label.clone(),
                        reason: format!(
                            "HTTP {status} after {requests} request(s){why}: {message}"
                        ),
                        retry_after,
                    };
                    let Some(backoff_delay) = backoff.next() else {
                        return Err(give_up(""));
                    };
                    let delay = retry_after.unwrap_or(backoff_delay);
                    if delay > self.max_retry_after {
                        return Err(give_up(&format!(
                            "; Retry-After {delay:?} is longer than the {:?} this embedder waits",
                            self.max_retry_after
                        )));
                    }
                    crate::telemetry::emit(crate::telemetry::events::ProviderThrottled {
                        provider: &self.label,
                        status,
                        delay,
                        retry_after: retry_after.is_some(),
                        attempt: requests,
                    });
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One HTTP request; holds a concurrency slot for its duration only.
    async fn exchange(&self, body: Vec<u8>, inputs: usize) -> Result<Exchange, EmbedError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| EmbedError::WorkerGone)?;
        let mut request = self
            .client
            .post(&self.endpoint)
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .body(body);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        self.requests_sent.fetch_add(1, Ordering::Relaxed);
        let mut response = request.send().await.map_err(|e| self.transport(e))?;
        let status = response.status();
        let retry_after = parse_retry_after(response.headers(), SystemTime::now());
        let limit = BASE_BODY_LIMIT.saturating_add(
            inputs
                .saturating_mul(self.fingerprint.dims)
                .saturating_mul(32),
        );
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.transport(e))? {
            if bytes.len() + chunk.len() > limit {
                return Err(EmbedError::InvalidResponse {
                    provider: self.label.clone(),
                    reason: format!("the response (HTTP {status}) is larger than {limit} bytes"),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        if status.is_success() {
            return Ok(Exchange::Body(bytes));
        }
        let code = status.as_u16();
        let message = self.provider_message(&bytes);
        let provider = self.label.clone();
        match code {
            429 | 503 => Ok(Exchange::Later {
                status: code,
                message,
                retry_after,
            }),
            401 | 403 => Err(EmbedError::Auth {
                provider,
                status: code,
                message,
            }),
            408 => Err(EmbedError::Unavailable {
                provider,
                reason: format!("HTTP {code}: {message}"),
                retry_after,
            }),
            400..=499 => Err(EmbedError::Rejected {
                provider,
                status: code,
                message,
            }),
            _ => Err(EmbedError::Unavailable {
                provider,
                reason: format!("HTTP {code}: {message}"),
                retry_after,
            }),
        }
    }

    /// A transport failure (timeout, connection, broken body) as a transient error, without
    /// the URL and with the whole cause chain.
    fn transport(&self, error: reqwest::Error) -> EmbedError {
        let reason = if error.is_timeout() {
            format!("no answer within {:?}", self.request_timeout)
        } else {
            let error = error.without_url();
            let mut reason = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                reason.push_str(": ");
                reason.push_str(&cause.to_string());
                source = cause.source();
            }
            reason
        };
        EmbedError::Unavailable {
            provider: self.label.clone(),
            reason: self.mask(&reason),
            retry_after: None,
        }
    }

    /// Checks and orders a 2xx body: exactly `expected` embeddings, each index once, each
    /// of the fingerprint's dimension, all finite. Returns the vectors in input order and the
    /// provider's `usage.prompt_tokens`.
    fn parse(
        &self,
        body: &[u8],
        expected: usize,
    ) -> Result<(Vec<Vec<f32>>, Option<u64>), EmbedError> {
        let invalid = |reason: String| EmbedError::InvalidResponse {
            provider: self.label.clone(),
            reason: self.mask(&reason),
        };
        let response: EmbeddingsResponse = serde_json::from_slice(body).map_err(|e| {
            invalid(format!(
                "not an embeddings response ({e}); body starts with {:?}",
                truncate(&String::from_utf8_lossy(body), 120)
            ))
        })?;
        if response.data.len() != expected {
            return Err(invalid(format!(
                "{} embeddings for {expected} inputs",
                response.data.len()
            )));
        }
        let mut vectors: Vec<Option<Vec<f32>>> = vec![None; expected];
        for item in response.data {
            let slot = vectors.get_mut(item.index).ok_or_else(|| {
                invalid(format!(
                    "index {} is out of range for {expected} inputs",
                    item.index
                ))
            })?;
            if slot.is_some() {
                return Err(invalid(format!("index {} appears twice", item.index)));
            }
            if item.embedding.len() != self.fingerprint.dims {
                return Err(EmbedError::Dimension {
                    expected: self.fingerprint.dims,
                    got: item.embedding.len(),
                });
            }
            if item.embedding.iter().any(|x| !x.is_finite()) {
                return Err(invalid(format!(
                    "embedding {} contains a NaN or infinite value",
                    item.index
                )));
            }
            *slot = Some(item.embedding);
        }
        // With the count equal and no duplicates, every slot is filled; check anyway.
        let vectors = vectors
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("an index is missing".into()))?;
        Ok((vectors, response.usage.and_then(|u| u.prompt_tokens)))
    }

    /// The provider's error message: `error.message` (OpenAI, vLLM, LiteLLM), `error` as a
    /// string (TEI, Ollama), `message` or `detail`, else the raw body; API key masked,
    /// truncated to [`MAX_MESSAGE_CHARS`].
    fn provider_message(&self, body: &[u8]) -> String {
        let text = String::from_utf8_lossy(body);
        let from_json = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                let pick = |v: &serde_json::Value| match v {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Null => None,
                    other => Some(other.to_string()),
                };
                v.pointer("/error/message")
                    .and_then(pick)
                    .or_else(|| v.get("error").filter(|e| e.is_string()).and_then(pick))
                    .or_else(|| v.get("message").and_then(pick))
                    .or_else(|| v.get("detail").and_then(pick))
            });
        let message = from_json.unwrap_or_else(|| text.trim().to_owned());
        let message = if message.is_empty() {
            "(empty body)".to_owned()
        } else {
            message
        };
        truncate(&self.mask(&message), MAX_MESSAGE_CHARS)
    }

    /// `text` with every occurrence of the API key replaced by `***`.
    fn mask(&self, text: &str) -> String {
        match &self.api_key {
            Some(key) if !key.is_empty() => text.replace(key.expose(), "***"),
            _ => text.to_owned(),
        }
    }
}

/// The first `max` characters of `text`, with `…` when cut.
fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// `Retry-After` as a delay: delta-seconds or an HTTP date (relative to `now`; a date in the
/// past is zero). `None` if absent or unparsable.
fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint() -> Fingerprint {
        Fingerprint {
            model: "m".into(),
            dims: 2,
            pooling: "mean".into(),
            normalized: true,
            sparse: None,
        }
    }

    fn embedder(options: impl FnOnce(&mut OpenAiOptions)) -> OpenAiEmbedder {
        let mut o = OpenAiOptions::new("http://127.0.0.1:9/", "m", fingerprint());
        options(&mut o);
        OpenAiEmbedder::new(o).expect("builds")
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let mut headers = HeaderMap::new();
        assert_eq!(parse_retry_after(&headers, now), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(
            parse_retry_after(&headers, now),
            Some(Duration::from_secs(7))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(42));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&later).expect("header"));
        assert_eq!(
            parse_retry_after(&headers, now),
            Some(Duration::from_secs(42))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(42));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&past).expect("header"));
        assert_eq!(parse_retry_after(&headers, now), Some(Duration::ZERO));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&headers, now), None);
    }

    #[tokio::test]
    async fn endpoint_does_not_double_v1() {
        assert_eq!(
            embedder(|_| {}).inner.endpoint,
            "http://127.0.0.1:9/v1/embeddings"
        );
        let e = embedder(|o| o.base_url = "https://h.example/v1/".into());
        assert_eq!(e.inner.endpoint, "https://h.example/v1/embeddings");
        let e = embedder(|o| o.base_url = "https://u:pw@h.example".into());
        assert_eq!(e.provider(), "https://u:***@h.example/v1/embeddings");
        let err = OpenAiEmbedder::new(OpenAiOptions::new("ftp://h", "m", fingerprint()))
            .expect_err("not http");
        assert!(matches!(err, EmbedError::Config(_)), "{err}");
    }

    #[tokio::test]
    async fn plan_splits_by_count_and_token_budget() {
        let e = embedder(|o| {
            o.batch_size = 3;
            o.max_request_tokens = Some(20);
        });
        // Estimated tokens: bytes + 4.
        let texts: Vec<String> = [
            "aaaa",
            "bbbb",
            "c",
            "dddddddddddddddddddddddddddd",
            "e",
            "f",
            "g",
            "h",
        ]
        .map(String::from)
        .to_vec();
        let (ranges, counts) = e.inner.plan(&texts);
        assert_eq!(ranges, vec![0..2, 2..3, 3..4, 4..7, 7..8]);
        assert_eq!(counts, vec![16, 5, 32, 15, 5]);
        let e = embedder(|o| o.batch_size = 4);
        let (ranges, _) = e.inner.plan(&texts);
        assert_eq!(ranges, vec![0..4, 4..8]);
    }

    #[tokio::test]
    async fn messages_are_extracted_masked_and_truncated() {
        let e = embedder(|o| o.api_key = Some(ApiKey::new("sk-secret")));
        let m = |body: &str| e.inner.provider_message(body.as_bytes());
        assert_eq!(
            m(r#"{"error":{"message":"bad key sk-secret","type":"x"}}"#),
            "bad key ***"
        );
        assert_eq!(
            m(r#"{"error":"Input validation error"}"#),
            "Input validation error"
        );
        assert_eq!(
            m(r#"{"detail":[{"msg":"field required"}]}"#),
            r#"[{"msg":"field required"}]"#
        );
        assert_eq!(m("<html>gateway</html>"), "<html>gateway</html>");
        assert_eq!(m(""), "(empty body)");
        let long = m(&"x".repeat(2000));
        assert_eq!(long.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(!format!("{e:?}").contains("sk-secret"));
    }

    #[tokio::test]
    async fn parse_orders_by_index_and_rejects_bad_answers() {
        let e = embedder(|_| {});
        let ok = br#"{"object":"list","data":[{"object":"embedding","index":1,"embedding":[0.0,1.0]},{"object":"embedding","index":0,"embedding":[1.0,0.0]}],"model":"m","usage":{"prompt_tokens":5,"total_tokens":5}}"#;
        let (vectors, tokens) = e.inner.parse(ok, 2).expect("valid");
        assert_eq!(vectors, vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
        assert_eq!(tokens, Some(5));
        let cases: [(&[u8], ErrorKind); 6] = [
            (br#"{"data":[{"index":0,"embedding":[1.0,0.0]}]}"#, ErrorKind::EmbedderUnavailable),
            (br#"{"data":[{"index":0,"embedding":[1.0,0.0]},{"index":0,"embedding":[1.0,0.0]}]}"#, ErrorKind::EmbedderUnavailable),
            (br#"{"data":[{"index":0,"embedding":[1.0,0.0]},{"index":2,"embedding":[1.0,0.0]}]}"#, ErrorKind::EmbedderUnavailable),
            (br#"{"data":[{"index":0,"embedding":[1.0]},{"index":1,"embedding":[1.0]}]}"#, ErrorKind::DimensionMismatch),
            (br#"{"data":[{"index":0,"embedding":[1.0,1e39]},{"index":1,"embedding":[1.0,0.0]}]}"#, ErrorKind::EmbedderUnavailable),
            (b"Internal error", ErrorKind::EmbedderUnavailable),
        ];
        for (body, kind) in cases {
            let err = e.inner.parse(body, 2).expect_err("invalid");
            assert_eq!(err.kind(), kind, "{err}");
        }
    }
}
