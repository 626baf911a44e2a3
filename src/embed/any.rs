//! [`AnyEmbedder`]: whichever embedder a pipeline's configuration names, as one type, so that
//! the pipeline, the worker and search stay generic over a single [`Embedder`].

use std::future::Future;
use std::pin::Pin;

use tokenizers::Tokenizer;

use super::{
    CandleEmbedder, EmbedError, Embedder, FailoverEmbedder, Fingerprint, OpenAiEmbedder, Usage,
};
use crate::breaker::CircuitBreaker;

/// A boxed embedding future (the variants' futures differ in type, and a failover nests them).
type EmbedFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, EmbedError>> + Send + 'a>>;

/// An in-process model, a remote provider, or a primary with a same-space fallback.
#[derive(Debug)]
pub enum AnyEmbedder {
    /// `kind = "candle"`.
    Candle(CandleEmbedder),
    /// `kind = "openai"`.
    OpenAi(OpenAiEmbedder),
    /// `[embedder]` with an `[embedder.fallback]`.
    Failover(Box<FailoverEmbedder<AnyEmbedder, AnyEmbedder>>),
}

impl AnyEmbedder {
    /// The tokenizer that counts this model's tokens (truncation and padding off), for the
    /// chunker: the candle model's, the one configured for a remote provider, or, for a
    /// failover, the primary's or else the fallback's. `None` for a remote provider without
    /// a configured tokenizer.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        match self {
            AnyEmbedder::Candle(e) => Some(e.tokenizer()),
            AnyEmbedder::OpenAi(e) => e.tokenizer(),
            AnyEmbedder::Failover(f) => {
                f.primary().tokenizer().or_else(|| f.fallback().tokenizer())
            }
        }
    }
}

impl Embedder for AnyEmbedder {
    fn fingerprint(&self) -> &Fingerprint {
        match self {
            AnyEmbedder::Candle(e) => e.fingerprint(),
            AnyEmbedder::OpenAi(e) => e.fingerprint(),
            AnyEmbedder::Failover(f) => f.fingerprint(),
        }
    }

    fn max_input_tokens(&self) -> usize {
        match self {
            AnyEmbedder::Candle(e) => e.max_input_tokens(),
            AnyEmbedder::OpenAi(e) => e.max_input_tokens(),
            AnyEmbedder::Failover(f) => f.max_input_tokens(),
        }
    }

    fn embed(
        &self,
        texts: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Vec<f32>>, EmbedError>> + Send {
        let call: EmbedFuture<'_, Vec<Vec<f32>>> = match self {
            AnyEmbedder::Candle(e) => Box::pin(e.embed(texts)),
            AnyEmbedder::OpenAi(e) => Box::pin(e.embed(texts)),
            AnyEmbedder::Failover(f) => Box::pin(f.embed(texts)),
        };
        call
    }

    fn embed_with_usage(
        &self,
        texts: Vec<String>,
    ) -> impl Future<Output = Result<(Vec<Vec<f32>>, Usage), EmbedError>> + Send {
        let call: EmbedFuture<'_, (Vec<Vec<f32>>, Usage)> = match self {
            AnyEmbedder::Candle(e) => Box::pin(e.embed_with_usage(texts)),
            AnyEmbedder::OpenAi(e) => Box::pin(e.embed_with_usage(texts)),
            AnyEmbedder::Failover(f) => Box::pin(f.embed_with_usage(texts)),
        };
        call
    }

    fn breaker(&self) -> Option<&CircuitBreaker> {
        match self {
            AnyEmbedder::Candle(e) => e.breaker(),
            AnyEmbedder::OpenAi(e) => e.breaker(),
            AnyEmbedder::Failover(f) => f.breaker(),
        }
    }
}
