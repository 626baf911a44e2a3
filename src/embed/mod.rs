//! Embedding: turning chunk texts into vectors.
//!
//! [`Embedder`] is the seam between the pipeline and a model. [`CandleEmbedder`] runs
//! all-MiniLM-L6-v2 (or any BERT-family sentence-transformers model directory) in process.

mod candle;

pub use candle::CandleEmbedder;

use std::future::Future;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::ErrorKind;

/// Identifies a vector space: two embedders with equal fingerprints produce comparable vectors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Model identity, e.g. `sentence-transformers/all-MiniLM-L6-v2`.
    pub model: String,
    /// Vector dimension.
    pub dims: usize,
    /// Pooling strategy, e.g. `mean`.
    pub pooling: String,
    /// Whether vectors are L2-normalised.
    pub normalized: bool,
}

impl Fingerprint {
    /// A compact one-line form, e.g. `sentence-transformers/all-MiniLM-L6-v2|384|mean|l2`,
    /// stored in every point's payload.
    pub fn id(&self) -> String {
        format!(
            "{}|{}|{}|{}",
            self.model,
            self.dims,
            self.pooling,
            if self.normalized { "l2" } else { "raw" }
        )
    }
}

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
}

impl EmbedError {
    /// The taxonomy kind of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EmbedError::Tokenize(_) => ErrorKind::EmbedderRejected,
            EmbedError::Dimension { .. } => ErrorKind::DimensionMismatch,
            EmbedError::ModelMissing { .. }
            | EmbedError::ModelLoad { .. }
            | EmbedError::Inference(_)
            | EmbedError::WorkerGone => ErrorKind::EmbedderUnavailable,
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
}
