//! Querying what was ingested, always scoped to one tenant.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use rag_ingest::{config::PipelineConfig, search::Searcher};
//! let config = PipelineConfig::load("pipelines/docs.toml".as_ref())?;
//! let searcher = Searcher::open(&config)?;
//! for hit in searcher.search("acme", "how do retries work?", 5).await? {
//!     println!("{:.3} {} #{}: {}", hit.score, hit.document_id, hit.chunk_index, hit.text);
//! }
//! # Ok(()) }
//! ```

use std::ops::Range;
use std::sync::Arc;

use serde::Serialize;

use crate::config::PipelineConfig;
use crate::embed::{CandleEmbedder, EmbedError, Embedder};
use crate::setup::{SetupError, open_embedder, open_store};
use crate::store::{EdgeStore, StoreError, VectorStore};
use crate::tenant::{TenantError, TenantId};

/// Why a search failed.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// No tenant, or a malformed one: searches are always scoped to one tenant.
    #[error("a search needs a valid tenant: {0}")]
    Tenant(#[from] TenantError),
    /// The query text is empty.
    #[error("the query is empty")]
    EmptyQuery,
    /// `top_k` is 0 or above 1000.
    #[error("top_k must be between 1 and 1000, got {0}")]
    TopK(usize),
    /// The query could not be embedded.
    #[error("embedding the query failed: {0}")]
    Embed(#[from] EmbedError),
    /// The store failed.
    #[error("searching the store failed: {0}")]
    Store(#[from] StoreError),
}

/// One matching chunk.
#[derive(Debug, Clone, Serialize)]
pub struct SearchHit {
    /// Cosine similarity to the query.
    pub score: f32,
    /// The chunk text.
    pub text: String,
    /// The document it belongs to.
    pub document_id: String,
    /// The chunk's position in the document.
    pub chunk_index: usize,
    /// The stored document version, if the producer set one.
    pub version: Option<u64>,
    /// The chunk's byte range in the source document.
    pub byte_range: Range<usize>,
    /// The document's metadata.
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// Embeds queries with the pipeline's model and searches its store.
pub struct Searcher<E, S> {
    embedder: Arc<E>,
    store: Arc<S>,
}

impl Searcher<CandleEmbedder, EdgeStore> {
    /// Opens the embedder and store `config` names.
    ///
    /// Fails with [`SetupError`] if the model is missing or the store cannot be opened
    /// (for instance because it was built with another embedder).
    pub fn open(config: &PipelineConfig) -> Result<Self, SetupError> {
        let embedder = Arc::new(open_embedder(config)?);
        let store = Arc::new(open_store(config, embedder.fingerprint())?);
        Ok(Searcher::new(embedder, store))
    }
}

impl<E: Embedder, S: VectorStore> Searcher<E, S> {
    /// A searcher over an already opened embedder and store.
    pub fn new(embedder: Arc<E>, store: Arc<S>) -> Self {
        Searcher { embedder, store }
    }

    /// The `top_k` chunks of `tenant` most similar to `query`, best first.
    ///
    /// Fails closed: an empty or malformed tenant is [`SearchError::Tenant`], never a search
    /// across tenants. Also fails on an empty query, a bad `top_k`, or embedder/store errors.
    pub async fn search(
        &self,
        tenant: &str,
        query: &str,
        top_k: usize,
    ) -> Result<Vec<SearchHit>, SearchError> {
        let tenant = TenantId::new(tenant)?;
        if query.trim().is_empty() {
            return Err(SearchError::EmptyQuery);
        }
        if top_k == 0 || top_k > 1000 {
            return Err(SearchError::TopK(top_k));
        }
        let mut vectors = self.embedder.embed(vec![query.to_string()]).await?;
        let vector = vectors.pop().ok_or(EmbedError::Inference(
            "the embedder returned no vector for the query".into(),
        ))?;
        let hits = self.store.search(&tenant, vector, top_k).await?;
        Ok(hits
            .into_iter()
            .filter(|h| h.payload.tenant_id == tenant.as_str())
            .map(|h| SearchHit {
                score: h.score,
                text: h.payload.text,
                document_id: h.payload.document_id,
                chunk_index: h.payload.chunk_index,
                version: h.payload.version,
                byte_range: h.payload.byte_start..h.payload.byte_end,
                metadata: h.payload.metadata,
            })
            .collect())
    }
}
