//! Vector storage: where embedded chunks live and how they are found again.
//!
//! [`VectorStore`] is the seam; [`EdgeStore`] is the embedded Qdrant Edge implementation.
//! Storage model (identical for every store):
//! - one collection per pipeline; every point carries `tenant_id` (keyword index, tenant key)
//!   and `document_id` (keyword index); every read and delete filters by tenant;
//! - point id = [`point_id`] (UUIDv5 of `tenant_id/document_id/chunk_index`), so re-delivery
//!   and replay overwrite instead of duplicating;
//! - the collection records the embedder [`Fingerprint`](crate::embed::Fingerprint); opening it with another one fails.

mod edge;

pub use edge::EdgeStore;

use std::future::Future;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ErrorKind;
use crate::tenant::TenantId;

/// Namespace of the UUIDv5 point ids (a fixed random UUID; never change it, or ids change).
const POINT_NAMESPACE: Uuid = Uuid::from_u128(0x5b0c_7f0e_2f4e_4c3a_9d61_8a3e_1f2b_6c47);

/// The deterministic point id of chunk `chunk_index` of `document_id` for `tenant`.
pub fn point_id(tenant: &TenantId, document_id: &str, chunk_index: usize) -> Uuid {
    let name = format!("{}/{}/{}", tenant.as_str(), document_id, chunk_index);
    Uuid::new_v5(&POINT_NAMESPACE, name.as_bytes())
}

/// What is stored with every point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkPayload {
    /// Owning tenant.
    pub tenant_id: String,
    /// Document the chunk belongs to.
    pub document_id: String,
    /// Producer-supplied document version, if any.
    pub version: Option<u64>,
    /// Position of the chunk in the document (0-based).
    pub chunk_index: usize,
    /// Number of chunks the document had when this chunk was written.
    pub chunk_count: usize,
    /// The chunk text.
    pub text: String,
    /// Byte offset of the chunk's first byte in the source content.
    pub byte_start: usize,
    /// Byte offset one past the chunk's last byte in the source content.
    pub byte_end: usize,
    /// Hex SHA-256 of the whole document content (identifies a document revision).
    pub content_sha256: String,
    /// Producer-supplied metadata (title, url, …).
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// [`Fingerprint::id`] of the embedder that produced the vector.
    pub embedder: String,
    /// RFC 3339 time of the write.
    pub ingested_at: String,
}

/// A point to write: id, vector and payload.
#[derive(Debug, Clone)]
pub struct ChunkPoint {
    /// Deterministic id from [`point_id`].
    pub id: Uuid,
    /// The embedding.
    pub vector: Vec<f32>,
    /// The payload.
    pub payload: ChunkPayload,
}

/// A search result.
#[derive(Debug, Clone)]
pub struct ScoredChunk {
    /// Cosine similarity to the query (higher is closer).
    pub score: f32,
    /// The stored payload.
    pub payload: ChunkPayload,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or failed in a way that may pass (I/O, timeouts).
    #[error("vector store unavailable: {0}")]
    Unavailable(String),
    /// The store refused the request; sending it again will not help.
    #[error("vector store rejected the request: {0}")]
    Rejected(String),
    /// The collection was created for another embedder.
    #[error(
        "collection {collection} was built with embedder {stored}, but this pipeline's embedder is {expected}; use another collection or re-ingest into a new one"
    )]
    FingerprintMismatch {
        /// Collection name.
        collection: String,
        /// Fingerprint id recorded in the collection.
        stored: String,
        /// Fingerprint id of the configured embedder.
        expected: String,
    },
    /// A vector of the wrong length was given.
    #[error("vector has {got} dimensions, the collection has {expected}")]
    Dimension {
        /// Collection dimension.
        expected: usize,
        /// Given dimension.
        got: usize,
    },
}

impl StoreError {
    /// The taxonomy kind of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Unavailable(_) => ErrorKind::StoreUnavailable,
            StoreError::Rejected(_) | StoreError::FingerprintMismatch { .. } => {
                ErrorKind::StoreRejected
            }
            StoreError::Dimension { .. } => ErrorKind::DimensionMismatch,
        }
    }
}

/// Stores and retrieves chunk embeddings, always scoped to one tenant.
///
/// Every method may fail with [`StoreError::Unavailable`] (transient) or
/// [`StoreError::Rejected`] (permanent). None may block the async runtime.
pub trait VectorStore: Send + Sync + 'static {
    /// Writes `points` (insert or overwrite by id) and returns once they are durable
    /// and visible to searches.
    fn upsert(
        &self,
        points: Vec<ChunkPoint>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The payload of chunk 0 of `document_id` (how the stored revision is identified), or
    /// `None` if the tenant has no such document.
    fn first_chunk(
        &self,
        tenant: &TenantId,
        document_id: &str,
    ) -> impl Future<Output = Result<Option<ChunkPayload>, StoreError>> + Send;

    /// Deletes `tenant`'s points of `document_id` whose `content_sha256` differs from
    /// `keep_sha256` (all of them when `keep_sha256` is `None`). Other tenants and documents
    /// are never touched.
    fn delete_document(
        &self,
        tenant: &TenantId,
        document_id: &str,
        keep_sha256: Option<&str>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The `top_k` chunks of `tenant` closest to `vector`, best first.
    fn search(
        &self,
        tenant: &TenantId,
        vector: Vec<f32>,
        top_k: usize,
    ) -> impl Future<Output = Result<Vec<ScoredChunk>, StoreError>> + Send;

    /// Number of `tenant`'s points, only those of `document_id` when given.
    fn count(
        &self,
        tenant: &TenantId,
        document_id: Option<&str>,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;
}
