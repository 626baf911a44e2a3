//! Embedding: turning chunk texts into vectors.
//!
//! [`Embedder`] is the seam between the pipeline and a model. [`CandleEmbedder`] runs
//! all-MiniLM-L6-v2 (or any BERT-family sentence-transformers model directory) in process;
//! [`OpenAiEmbedder`] calls any OpenAI-compatible `/v1/embeddings` endpoint behind a
//! [`CircuitBreaker`]; [`FailoverEmbedder`] pairs two embedders of the same vector space;
//! [`AnyEmbedder`] is whichever of these a pipeline's configuration names.

mod any;
mod candle;
mod failover;
mod openai;
pub mod rate;

pub use any::AnyEmbedder;
pub use candle::{
    AUTO_MIN_COSINE, BF16_SLOW_RATIO, CandleEmbedder, PrecisionChoice, SELF_CHECK_TEXTS,
};
pub use failover::FailoverEmbedder;
pub use openai::{ApiKey, OpenAiEmbedder, OpenAiOptions};

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use crate::breaker::{BreakerOpen, CircuitBreaker};

use crate::error::{ErrorKind, Failure, Stage};
/// Re-exported from [`crate::fingerprint`], where they live so that the config and the stores
/// need not depend on the embedders.
pub use crate::fingerprint::{Fingerprint, Precision};

/// Why embedding failed.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The model directory or one of its files is missing.
    #[error(
        "model not found at {path}: run scripts/fetch-model.sh (or point embedder.model_dir at a Hugging Face sentence-transformers model directory)"
    )]
    ModelMissing {
        /// The missing file or directory.
        path: PathBuf,
    },
    /// A model file exists but could not be read or parsed.
    #[error("cannot load model from {path}: {reason}")]
    ModelLoad {
        /// The file that failed to load.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The tokenizer failed on an input.
    #[error("tokenizer failed: {0}")]
    Tokenize(String),
    /// The forward pass failed.
    #[error("inference failed: {0}")]
    Inference(String),
    /// The embedding thread has stopped (the embedder was dropped or panicked).
    #[error("embedding worker is gone")]
    WorkerGone,
    /// The embedder returned a vector whose length is not the expected dimension.
    #[error("embedder returned {got} dimensions, expected {expected}")]
    Dimension {
        /// Expected dimension.
        expected: usize,
        /// Returned dimension.
        got: usize,
    },
    /// A remote embedder's settings cannot be used (bad URL, API key variable unset or not a
    /// valid header value, unreadable tokenizer, HTTP client setup). Never contains the key.
    /// Permanent ([`ErrorKind::EmbedderRejected`]): the same settings fail the same way.
    #[error("embedder configuration: {0}")]
    Config(String),
    /// A remote provider could not be reached, timed out, or answered 5xx or 429 (after the
    /// embedder's own bounded retries for 429/503).
    #[error("{provider} unavailable: {reason}")]
    Unavailable {
        /// The provider's endpoint (credentials redacted).
        provider: String,
        /// What happened, with the provider's message when it sent one.
        reason: String,
        /// How long the provider asked us to wait (`Retry-After`), if it said.
        retry_after: Option<Duration>,
    },
    /// A remote provider answered 2xx with a body that is not a valid embeddings response
    /// (not JSON, wrong count, missing or duplicate index, non-finite values). Nothing from
    /// it is used.
    #[error("{provider} sent an invalid response: {reason}")]
    InvalidResponse {
        /// The provider's endpoint (credentials redacted).
        provider: String,
        /// What is wrong with the response.
        reason: String,
    },
    /// A remote provider refused the request (HTTP 400, 404, 422 and other 4xx): the same
    /// request will be refused again.
    #[error("{provider} rejected the request (HTTP {status}): {message}")]
    Rejected {
        /// The provider's endpoint (credentials redacted).
        provider: String,
        /// HTTP status code.
        status: u16,
        /// The provider's error message (truncated).
        message: String,
    },
    /// A remote provider refused the credentials (HTTP 401 or 403).
    #[error("{provider} refused the credentials (HTTP {status}): {message}")]
    Auth {
        /// The provider's endpoint (credentials redacted).
        provider: String,
        /// HTTP status code.
        status: u16,
        /// The provider's error message (truncated, the API key masked).
        message: String,
    },
    /// The provider's circuit breaker is open: the call failed fast without being sent.
    #[error("{provider}: {source}")]
    CircuitOpen {
        /// The provider's endpoint (credentials redacted).
        provider: String,
        /// The breaker's refusal (state and time to the next probe).
        source: BreakerOpen,
    },
    /// Two embedders that must share a vector space (primary and fallback) do not.
    #[error(
        "the fallback embedder ({fallback}) does not produce the same vectors as the primary ({primary}): model, dimension, pooling and normalisation must all match"
    )]
    FingerprintMismatch {
        /// The primary's fingerprint id.
        primary: String,
        /// The fallback's fingerprint id.
        fallback: String,
    },
}

impl EmbedError {
    /// The taxonomy kind of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            // A configuration problem does not pass by itself: retrying cannot help.
            EmbedError::Tokenize(_) | EmbedError::Rejected { .. } | EmbedError::Config(_) => {
                ErrorKind::EmbedderRejected
            }
            EmbedError::Auth { .. } => ErrorKind::EmbedderAuth,
            EmbedError::Dimension { .. } | EmbedError::FingerprintMismatch { .. } => {
                ErrorKind::DimensionMismatch
            }
            EmbedError::ModelMissing { .. }
            | EmbedError::ModelLoad { .. }
            | EmbedError::Inference(_)
            | EmbedError::WorkerGone
            | EmbedError::Unavailable { .. }
            | EmbedError::InvalidResponse { .. }
            | EmbedError::CircuitOpen { .. } => ErrorKind::EmbedderUnavailable,
        }
    }

    /// How long the provider asked to wait before trying again (`Retry-After`, or the time
    /// until an open circuit breaker's probe), if known: a hint for choosing a retry delay.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            EmbedError::Unavailable { retry_after, .. } => *retry_after,
            EmbedError::CircuitOpen { source, .. } => Some(source.retry_in),
            _ => None,
        }
    }
}

/// An embedding failure as a processing [`Failure`] at [`Stage::Embed`]; a circuit breaker's
/// refusal is marked [`Failure::circuit_open`].
impl From<EmbedError> for Failure {
    fn from(e: EmbedError) -> Self {
        let circuit_open = matches!(e, EmbedError::CircuitOpen { .. });
        Failure {
            circuit_open,
            ..Failure::new(e.kind(), Stage::Embed, e.to_string())
        }
    }
}

/// What one embedding call cost, for per-tenant cost reporting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Who computed the vectors: [`Usage::LOCAL`] for an in-process model, otherwise the
    /// remote provider's endpoint (credentials redacted).
    pub provider: String,
    /// Input tokens the provider billed (`usage.prompt_tokens` of its responses, or the
    /// embedder's own count when a response has none); 0 for an in-process model.
    pub prompt_tokens: u64,
    /// HTTP requests sent, retries included; 0 for an in-process model.
    pub requests: u64,
}

impl Usage {
    /// The provider name of in-process models.
    pub const LOCAL: &'static str = "local";

    /// The usage of a call served by an in-process model: nothing billed.
    pub fn local() -> Self {
        Usage {
            provider: Usage::LOCAL.to_owned(),
            prompt_tokens: 0,
            requests: 0,
        }
    }
}

/// Computes embeddings for batches of texts.
///
/// Implementations must return exactly one vector per input, in input order, each of
/// `fingerprint().dims` values. They must never block the async runtime.
pub trait Embedder: Send + Sync + 'static {
    /// The vector space this embedder produces.
    fn fingerprint(&self) -> &Fingerprint;

    /// The most tokens (special tokens included) the model reads; longer inputs are truncated.
    fn max_input_tokens(&self) -> usize;

    /// Embeds `texts`; fails with [`EmbedError`] if the model fails.
    fn embed(
        &self,
        texts: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Vec<f32>>, EmbedError>> + Send;

    /// Embeds `texts` like [`Embedder::embed`] and also reports what the call cost
    /// ([`Usage`]), so that the caller can attribute tokens to the message's tenant.
    ///
    /// The default serves in-process models: [`Usage::local`].
    fn embed_with_usage(
        &self,
        texts: Vec<String>,
    ) -> impl Future<Output = Result<(Vec<Vec<f32>>, Usage), EmbedError>> + Send {
        let call = self.embed(texts);
        async move { Ok((call.await?, Usage::local())) }
    }

    /// The circuit breaker of the remote provider this embedder ultimately depends on, if any.
    ///
    /// While it is open, calls fail fast with [`EmbedError::CircuitOpen`]: a worker should
    /// stop taking messages and wait for [`CircuitBreaker::ready`]. `None` for in-process
    /// models, and for a failover whose fallback is one.
    fn breaker(&self) -> Option<&CircuitBreaker> {
        None
    }
}
