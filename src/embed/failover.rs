//! [`FailoverEmbedder`]: a primary embedder with a fallback of the same vector space.
//!
//! Every call goes to the primary first. A remote primary whose circuit breaker is open fails
//! fast without touching the network, so while the breaker is open every call is served by
//! the fallback at the cost of one refused permit; when the breaker lets a probe through,
//! that call tries the primary again and, if it answers, the primary is back.
//!
//! The fallback serves a call when the primary's failure says nothing against the input:
//! every kind except `embedder_rejected` (the provider refused this input, and an identical
//! model would too). That includes `embedder_auth` (a revoked key is an outage of the
//! primary, not a property of the message) and `dimension_mismatch` (a provider that
//! started serving another model). Switching to and from the fallback is logged once per
//! switch.
//!
//! Both embedders must have equal [`Fingerprint`]s — model, dimension, pooling and
//! normalisation — or [`FailoverEmbedder::new`] refuses them: vectors from the two are stored
//! side by side and must be comparable.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{EmbedError, Embedder, Fingerprint, Usage};
use crate::breaker::CircuitBreaker;
use crate::error::ErrorKind;
use crate::telemetry::emit;
use crate::telemetry::events::EmbedderFailover;

/// A primary embedder with a same-space fallback. See the [module docs](self).
#[derive(Debug)]
pub struct FailoverEmbedder<P, F> {
    primary: P,
    fallback: F,
    /// True while the last call was served by the fallback (for logging switches only).
    on_fallback: AtomicBool,
    fallback_calls: AtomicU64,
}

impl<P: Embedder, F: Embedder> FailoverEmbedder<P, F> {
    /// Pairs `primary` with `fallback`.
    ///
    /// # Errors
    ///
    /// [`EmbedError::FingerprintMismatch`] naming both fingerprints if they differ.
    pub fn new(primary: P, fallback: F) -> Result<Self, EmbedError> {
        if primary.fingerprint() != fallback.fingerprint() {
            return Err(EmbedError::FingerprintMismatch {
                primary: primary.fingerprint().id(),
                fallback: fallback.fingerprint().id(),
            });
        }
        Ok(FailoverEmbedder {
            primary,
            fallback,
            on_fallback: AtomicBool::new(false),
            fallback_calls: AtomicU64::new(0),
        })
    }

    /// The primary embedder.
    pub fn primary(&self) -> &P {
        &self.primary
    }

    /// The fallback embedder.
    pub fn fallback(&self) -> &F {
        &self.fallback
    }

    /// Calls served by the fallback so far.
    pub fn fallback_calls(&self) -> u64 {
        self.fallback_calls.load(Ordering::Relaxed)
    }

    async fn embed_inner(&self, texts: Vec<String>) -> Result<(Vec<Vec<f32>>, Usage), EmbedError> {
        let primary_error = match self.primary.embed_with_usage(texts.clone()).await {
            Ok(answer) => {
                if self.on_fallback.swap(false, Ordering::Relaxed) {
                    emit(EmbedderFailover {
                        state: "recovered",
                        primary: &self.primary.fingerprint().id(),
                        error: None,
                        fallback_error: None,
                    });
                }
                return Ok(answer);
            }
            // A refused input is refused by the fallback too; a primary whose own settings
            // fail (`Config`, permanent as well) is worked around by the fallback.
            Err(e)
                if e.kind() == ErrorKind::EmbedderRejected
                    && !matches!(e, EmbedError::Config(_)) =>
            {
                return Err(e);
            }
            Err(e) => e,
        };
        let primary = self.primary.fingerprint().id();
        emit(EmbedderFailover {
            state: if self.on_fallback.swap(true, Ordering::Relaxed) {
                "still_failing"
            } else {
                "switched"
            },
            primary: &primary,
            error: Some(format!("{} ({})", primary_error, primary_error.kind())),
            fallback_error: None,
        });
        self.fallback_calls.fetch_add(1, Ordering::Relaxed);
        self.fallback
            .embed_with_usage(texts)
            .await
            .inspect_err(|e| {
                emit(EmbedderFailover {
                    state: "both_failed",
                    primary: &primary,
                    error: Some(primary_error.to_string()),
                    fallback_error: Some(e.to_string()),
                });
            })
    }
}

impl<P: Embedder, F: Embedder> Embedder for FailoverEmbedder<P, F> {
    fn fingerprint(&self) -> &Fingerprint {
        self.primary.fingerprint()
    }

    /// The smaller of the two limits, so that every chunk fits either model.
    fn max_input_tokens(&self) -> usize {
        self.primary
            .max_input_tokens()
            .min(self.fallback.max_input_tokens())
    }

    fn embed(
        &self,
        texts: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Vec<f32>>, EmbedError>> + Send {
        let call = self.embed_inner(texts);
        async move { call.await.map(|(vectors, _)| vectors) }
    }

    fn embed_with_usage(
        &self,
        texts: Vec<String>,
    ) -> impl Future<Output = Result<(Vec<Vec<f32>>, Usage), EmbedError>> + Send {
        self.embed_inner(texts)
    }

    /// The fallback's breaker: the pair is out only when the fallback is (an in-process
    /// fallback has none, so a worker never pauses for the pair).
    fn breaker(&self) -> Option<&CircuitBreaker> {
        self.fallback.breaker()
    }
}
