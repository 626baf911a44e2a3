//! Querying what was ingested, always scoped to one tenant, optionally narrowed by exact
//! metadata matches and a minimum score.
//!
//! A search compares dense embeddings, keyword (BM25) vectors, or both fused by the store
//! ([`SearchMode`], hybrid by default; [`Fusion`], distribution-based score fusion by
//! default): on the retrieval benchmark of `benches/retrieval.rs` hybrid search finds the
//! relevant document more often than either branch alone (docs/performance.md). Every hit
//! says where it ranked in each branch.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use rag_ingest::{config::PipelineConfig, search::{SearchOptions, Searcher}};
//! let config = PipelineConfig::load("pipelines/docs.toml".as_ref())?;
//! let searcher = Searcher::open(&config).await?;
//! for hit in searcher.search("acme", "how do retries work?", 5).await? {
//!     println!("{:.3} {} #{}: {}", hit.score, hit.document_id, hit.chunk_index, hit.text);
//! }
//! // Only chunks whose metadata.title is "Retries", scoring at least 0.3.
//! let options = SearchOptions::new(5).metadata_eq("title", "Retries").min_score(0.3);
//! // Keyword matches only (exact terms such as error codes), no model call.
//! let keyword = SearchOptions::new(5).mode(rag_ingest::search::SearchMode::Sparse);
//! let hits = searcher.search_with("acme", "backoff", &options).await?;
//! # Ok(()) }
//! ```

use std::ops::Range;
use std::sync::Arc;

use serde::Serialize;

use crate::config::PipelineConfig;
use crate::embed::{AnyEmbedder, EmbedError, Embedder};
use crate::setup::{SetupError, embedder, open_vector_store};
use crate::sparse::SparseEncoder;
pub use crate::store::{BranchRanks, Fusion, MetadataValue, SearchFilter, SearchMode};
use crate::store::{SearchRequest, Store, StoreError, VectorStore, validate_metadata_key};
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
    /// A metadata filter key is not a plain key, or the minimum score is not a finite number.
    #[error("invalid search filter: {0}")]
    Filter(String),
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
    /// How well it matches: cosine similarity (dense), BM25 score (sparse) or fused
    /// reciprocal-rank score (hybrid).
    pub score: f32,
    /// Its rank in each branch of the search (1 = best; `null` = not among that branch's
    /// candidates, or the branch did not run).
    pub ranks: BranchRanks,
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
    /// The context embedded with the chunk (title and heading path), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// The chunk's page (1-based) in a PDF document.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
}

/// How many results and which: `top_k`, exact metadata matches, a minimum score.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchOptions {
    /// Most results (1 to 1000).
    pub top_k: usize,
    /// Exact matches on `metadata.<key>` (all must hold).
    pub filter: SearchFilter,
    /// Only results scoring at least this much (in the mode's score, see [`SearchHit::score`]).
    pub min_score: Option<f32>,
    /// Which vectors to compare ([`SearchMode::Hybrid`] by default).
    pub mode: SearchMode,
    /// How a hybrid search merges its branches ([`Fusion::default`]).
    pub fusion: Fusion,
}

impl SearchOptions {
    /// The `top_k` best results, no filter, no minimum score.
    pub fn new(top_k: usize) -> Self {
        SearchOptions {
            top_k,
            filter: SearchFilter::default(),
            min_score: None,
            mode: SearchMode::default(),
            fusion: Fusion::default(),
        }
    }

    /// These options with the hybrid fusion `fusion`.
    pub fn fusion(mut self, fusion: Fusion) -> Self {
        self.fusion = fusion;
        self
    }

    /// These options with the search mode `mode`.
    pub fn mode(mut self, mode: SearchMode) -> Self {
        self.mode = mode;
        self
    }

    /// These options plus the condition `metadata.<key> == value`.
    pub fn metadata_eq(mut self, key: impl Into<String>, value: impl Into<MetadataValue>) -> Self {
        self.filter = self.filter.metadata_eq(key, value);
        self
    }

    /// These options with the minimum score `min_score`.
    pub fn min_score(mut self, min_score: f32) -> Self {
        self.min_score = Some(min_score);
        self
    }
}

/// Embeds queries with the pipeline's model (and its keyword model) and searches its store.
pub struct Searcher<E, S> {
    embedder: Arc<E>,
    sparse: SparseEncoder,
    store: Arc<S>,
}

impl Searcher<AnyEmbedder, Store> {
    /// Opens the embedder and the store (`edge` or `qdrant`) `config` names.
    ///
    /// Fails with [`SetupError`] if the model is missing or the store cannot be opened
    /// (for instance because it was built with another embedder).
    pub async fn open(config: &PipelineConfig) -> Result<Self, SetupError> {
        let embedder = Arc::new(embedder(config)?);
        let store = Arc::new(open_vector_store(config, embedder.fingerprint()).await?);
        Ok(Searcher::new(embedder, store))
    }
}

impl<E: Embedder, S: VectorStore> Searcher<E, S> {
    /// A searcher over an already opened embedder and store.
    pub fn new(embedder: Arc<E>, store: Arc<S>) -> Self {
        Searcher {
            embedder,
            sparse: SparseEncoder::bm25(),
            store,
        }
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
        self.search_with(tenant, query, &SearchOptions::new(top_k))
            .await
    }

    /// The best `options.top_k` chunks of `tenant` for `query` whose metadata matches
    /// `options.filter` exactly and whose score is at least `options.min_score`, best first.
    ///
    /// Fails closed like [`Searcher::search`]; also fails with [`SearchError::Filter`] on a
    /// metadata key that is not 1 to 64 characters of letters, digits, `_` and `-`, or a
    /// minimum score that is not a finite number.
    pub async fn search_with(
        &self,
        tenant: &str,
        query: &str,
        options: &SearchOptions,
    ) -> Result<Vec<SearchHit>, SearchError> {
        let tenant = TenantId::new(tenant)?;
        if query.trim().is_empty() {
            return Err(SearchError::EmptyQuery);
        }
        let top_k = options.top_k;
        if top_k == 0 || top_k > 1000 {
            return Err(SearchError::TopK(top_k));
        }
        for (key, _) in &options.filter.metadata {
            validate_metadata_key(key).map_err(SearchError::Filter)?;
        }
        if let Some(min) = options.min_score
            && !min.is_finite()
        {
            return Err(SearchError::Filter(format!(
                "the minimum score must be a finite number, got {min}"
            )));
        }
        let vector = if options.mode.uses_dense() {
            let mut vectors = self.embedder.embed(vec![query.to_string()]).await?;
            vectors.pop().ok_or(EmbedError::Inference(
                "the embedder returned no vector for the query".into(),
            ))?
        } else {
            Vec::new()
        };
        let sparse = options.mode.uses_sparse().then(|| self.sparse.query(query));
        let request = SearchRequest {
            tenant: tenant.clone(),
            vector,
            sparse,
            mode: options.mode,
            fusion: options.fusion,
            top_k,
            filter: options.filter.clone(),
            min_score: options.min_score,
        };
        let hits = self.store.search(request).await?;
        Ok(hits
            .into_iter()
            .filter(|h| h.payload.tenant_id == tenant.as_str())
            .map(|h| SearchHit {
                score: h.score,
                ranks: h.ranks,
                text: h.payload.text,
                document_id: h.payload.document_id,
                chunk_index: h.payload.chunk_index,
                version: h.payload.version,
                byte_range: h.payload.byte_start..h.payload.byte_end,
                metadata: h.payload.metadata,
                context: h.payload.context,
                page: h.payload.page,
            })
            .collect())
    }
}
