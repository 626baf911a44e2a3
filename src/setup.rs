//! Builds a pipeline's components (model, chunker, store) from its configuration.

use std::sync::Arc;

use crate::chunk::{ChunkError, Chunker};
use crate::config::{EmbedderKind, PipelineConfig, StoreKind};
use crate::embed::{CandleEmbedder, EmbedError, Embedder, Fingerprint};
use crate::process::Pipeline;
use crate::store::{EdgeStore, StoreError};

/// Why a component could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The model could not be loaded.
    #[error("embedder: {0}")]
    Embed(#[from] EmbedError),
    /// The chunking settings do not fit the model.
    #[error("chunking: {0}")]
    Chunk(#[from] ChunkError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Loads the embedder `config.embedder` names.
pub fn open_embedder(config: &PipelineConfig) -> Result<CandleEmbedder, SetupError> {
    match config.embedder.kind {
        EmbedderKind::Candle => Ok(CandleEmbedder::load(
            &config.embedder.model_dir,
            config.embedder.batch_size,
        )?),
    }
}

/// Opens the store `config.store` names for vectors of `fingerprint`; fails if the
/// collection was built with another embedder.
pub fn open_store(
    config: &PipelineConfig,
    fingerprint: &Fingerprint,
) -> Result<EdgeStore, SetupError> {
    match config.store.kind {
        StoreKind::Edge => Ok(EdgeStore::open(
            &config.store.path,
            &config.store.collection,
            fingerprint,
        )?),
    }
}

/// Builds the chunker for `embedder`'s tokenizer and `config.chunking`.
pub fn chunker(config: &PipelineConfig, embedder: &CandleEmbedder) -> Result<Chunker, SetupError> {
    Ok(Chunker::new(
        embedder.tokenizer().clone(),
        config.chunking.max_tokens,
        config.chunking.overlap,
        embedder.max_input_tokens(),
    )?)
}

/// Builds the whole processing pipeline `config` describes.
pub fn pipeline(
    config: &PipelineConfig,
) -> Result<Pipeline<CandleEmbedder, EdgeStore>, SetupError> {
    let embedder = open_embedder(config)?;
    let chunker = chunker(config, &embedder)?;
    let store = open_store(config, embedder.fingerprint())?;
    Ok(Pipeline::new(
        Arc::new(chunker),
        Arc::new(embedder),
        Arc::new(store),
    ))
}
