//! Vector storage: where embedded chunks live and how they are found again.
//!
//! [`VectorStore`] is the seam. [`EdgeStore`] is the embedded Qdrant Edge implementation (the
//! default), [`QdrantStore`] talks to a Qdrant server over gRPC, and [`Store`] is whichever of
//! the two a pipeline's configuration names.
//!
//! Storage model (identical for every store):
//! - one collection per pipeline; every point carries `tenant_id` (keyword index, tenant key)
//!   and `document_id` (keyword index); every read and delete filters by tenant;
//! - point id = [`point_id`] (UUIDv5 of `tenant_id/document_id/chunk_index`), so re-delivery
//!   and replay overwrite instead of duplicating;
//! - every chunk written by one upsert of a document carries the same [`Revision`]
//!   (`content_sha256`, `version`, `chunk_count`); after writing a revision the pipeline
//!   deletes the document's points of any other revision;
//! - the collection records the embedder [`Fingerprint`](crate::fingerprint::Fingerprint) and the
//!   vector size; opening it with another embedder fails with
//!   [`StoreError::FingerprintMismatch`], which says what differs;
//! - writes are split into requests of at most [`BatchLimits::max_points`] points and
//!   [`BatchLimits::max_bytes`] bytes.

mod edge;
mod qdrant;

pub use edge::{EdgeMaintenance, EdgeStore, disk_usage};
pub use qdrant::{
    CollectionLayout, MIN_SERVER_VERSION, OUTDATED_SERVER_RISK, QdrantOptions, QdrantStore,
    SAFE_SERVER_VERSION, ServerSupport,
};

use std::fmt;
use std::future::Future;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::StoreConfig;
use crate::error::{ErrorKind, Failure, Stage};
use crate::fingerprint::Fingerprint;
pub use crate::sparse::SparseVector;
use crate::tenant::TenantId;

/// Namespace of the UUIDv5 point ids (a fixed random UUID; never change it, or ids change).
const POINT_NAMESPACE: Uuid = Uuid::from_u128(0x5b0c_7f0e_2f4e_4c3a_9d61_8a3e_1f2b_6c47);

/// Defaults of [`BatchLimits`] (declared with the `[store]` settings they are defaults of).
pub use crate::config::{DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_BATCH_POINTS};

/// The largest document version a store accepts: versions are matched as signed 64-bit
/// integers by Qdrant's filters.
pub const MAX_VERSION: u64 = i64::MAX as u64;

/// The deterministic point id of chunk `chunk_index` of `document_id` for `tenant`.
pub fn point_id(tenant: &TenantId, document_id: &str, chunk_index: usize) -> Uuid {
    let name = format!("{}/{}/{}", tenant.as_str(), document_id, chunk_index);
    Uuid::new_v5(&POINT_NAMESPACE, name.as_bytes())
}

/// The largest [`Order::seq`] a store can compare exactly (2^53 − 1: Qdrant compares numbers
/// in range filters as doubles). Microseconds since 1970 stay below it until the year 2255.
pub const MAX_SEQ: u64 = (1 << 53) - 1;

/// The position of one write in a document's history: the document version it applies
/// (`version`, the message's version, or the stored one inherited by a message without a
/// version) and, to order writes of the same version, the time it was processed (`seq`,
/// microseconds since 1970, at most [`MAX_SEQ`]). Orders compare lexicographically.
///
/// Every point a write stores carries its order, and stores only overwrite or delete points
/// whose order is *older* (see [`VectorStore::upsert_newer`] and
/// [`VectorStore::delete_older`]). Those conditions are checked by the store atomically for
/// each point, so any number of workers writing one document converge on the newest write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "StoredOrder", into = "StoredOrder")]
pub struct Order {
    /// The document version this write applies.
    pub version: u64,
    /// Processing time in microseconds since 1970 (tie-breaker between equal versions).
    pub seq: u64,
}

/// How an [`Order`] is stored in a payload: the version split in two 32-bit halves, so that
/// every number a filter compares is exact as a double.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct StoredOrder {
    v_hi: u64,
    v_lo: u64,
    seq: u64,
}

impl From<StoredOrder> for Order {
    fn from(stored: StoredOrder) -> Self {
        Order {
            version: (stored.v_hi << 32) | (stored.v_lo & 0xffff_ffff),
            seq: stored.seq,
        }
    }
}

impl From<Order> for StoredOrder {
    fn from(order: Order) -> Self {
        StoredOrder {
            v_hi: order.version >> 32,
            v_lo: order.version & 0xffff_ffff,
            seq: order.seq,
        }
    }
}

/// Payload path of the stored order, and of its parts.
pub(crate) const ORDER_FIELD: &str = "order";
const ORDER_V_HI: &str = "order.v_hi";
const ORDER_V_LO: &str = "order.v_lo";
const ORDER_SEQ: &str = "order.seq";
/// Payload field marking a tombstone.
pub(crate) const TOMBSTONE_FIELD: &str = "tombstone";

/// One comparison of a payload number with a constant (all constants below 2^53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OrderTerm {
    /// `field < value`.
    Less(&'static str, u64),
    /// `field == value`.
    Equal(&'static str, u64),
    /// The point has no `order` field (written before orders existed: older than any write).
    Missing,
}

impl Order {
    /// The condition "the point's order is older than `self`", as alternatives (any may hold)
    /// of conjunctions (all must hold), for the stores to translate into their filters.
    pub(crate) fn older_terms(self) -> Vec<Vec<OrderTerm>> {
        let stored = StoredOrder::from(self);
        vec![
            vec![OrderTerm::Less(ORDER_V_HI, stored.v_hi)],
            vec![
                OrderTerm::Equal(ORDER_V_HI, stored.v_hi),
                OrderTerm::Less(ORDER_V_LO, stored.v_lo),
            ],
            vec![
                OrderTerm::Equal(ORDER_V_HI, stored.v_hi),
                OrderTerm::Equal(ORDER_V_LO, stored.v_lo),
                OrderTerm::Less(ORDER_SEQ, stored.seq),
            ],
            vec![OrderTerm::Missing],
        ]
    }

    /// Fails with [`StoreError::Rejected`] if `seq` is above [`MAX_SEQ`] or `version` above
    /// [`MAX_VERSION`].
    pub(crate) fn check(self) -> Result<(), StoreError> {
        check_version(Some(self.version))?;
        if self.seq > MAX_SEQ {
            return Err(StoreError::rejected(format!(
                "write order {} is above the largest the store can compare ({MAX_SEQ})",
                self.seq
            )));
        }
        Ok(())
    }
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
    /// Byte offset of the chunk's first byte in the document's text (the content itself for
    /// text, Markdown and code; the extracted text for HTML and PDF).
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
    /// The order of the write that stored this point (`None` on points written before
    /// orders existed, which count as older than any write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<Order>,
    /// This point is a tombstone: the document was deleted by the write `order` names (see
    /// [`ChunkPayload::tombstone`]). Tombstones hold no text and are never returned by
    /// searches or counted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tombstone: bool,
    /// The context embedded with the chunk's text (with `chunking.context = "headings"`: the
    /// document title and the chunk's heading path, e.g. `Handbook › Retries › Backoff`);
    /// `None` when the chunk was embedded alone. [`text`](ChunkPayload::text) stays the
    /// chunk's own bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// The chunk's page (1-based) in a PDF document; `None` for other content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
}

impl ChunkPayload {
    /// The order of the write that stored this point; a point written before orders existed
    /// counts as `(version or 0, 0)`.
    pub fn effective_order(&self) -> Order {
        self.order.unwrap_or(Order {
            version: self.version.unwrap_or(0),
            seq: 0,
        })
    }

    /// The tombstone of `tenant`'s `document_id` deleted by the write `order`: stored in
    /// chunk 0's place (so a later write of an older order cannot take it), with no text, no
    /// metadata, and `embedder` as the embedder fingerprint id.
    pub fn tombstone(
        tenant: &TenantId,
        document_id: &str,
        version: Option<u64>,
        order: Order,
        embedder: &str,
    ) -> Self {
        ChunkPayload {
            tenant_id: tenant.as_str().to_owned(),
            document_id: document_id.to_owned(),
            version,
            chunk_index: 0,
            chunk_count: 0,
            text: String::new(),
            byte_start: 0,
            byte_end: 0,
            content_sha256: String::new(),
            metadata: serde_json::Map::new(),
            embedder: embedder.to_owned(),
            ingested_at: chrono::Utc::now().to_rfc3339(),
            order: Some(order),
            tombstone: true,
            context: None,
            page: None,
        }
    }

    /// The revision of the document this chunk was written for.
    pub fn revision(&self) -> Revision {
        Revision {
            content_sha256: self.content_sha256.clone(),
            version: self.version,
            chunk_count: self.chunk_count,
        }
    }
}

/// One written revision of a document: every chunk written by one upsert carries the same
/// values, so "the points of another revision" are exactly the stale ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    /// Hex SHA-256 of the document content.
    pub content_sha256: String,
    /// Producer-supplied version (`None` matches points without a version).
    pub version: Option<u64>,
    /// Number of chunks of the revision.
    pub chunk_count: usize,
}

/// A point to write: id, vector and payload.
#[derive(Debug, Clone)]
pub struct ChunkPoint {
    /// Deterministic id from [`point_id`].
    pub id: Uuid,
    /// The embedding.
    pub vector: Vec<f32>,
    /// The keyword vector (BM25 term weights, see [`crate::sparse`]); `None` writes the dense
    /// vector only. A collection created without sparse vectors stores none (see
    /// [`VectorStore::upsert`]).
    pub sparse: Option<SparseVector>,
    /// What is stored beside the vector: text, ids, version, order and metadata.
    pub payload: ChunkPayload,
}

/// One stored point, as a scroll over a whole collection returns it
/// ([`Store::scroll`]): tombstones included.
#[derive(Debug, Clone)]
pub struct StoredPoint {
    /// The point id.
    pub id: Uuid,
    /// The stored payload.
    pub payload: ChunkPayload,
    /// The stored dense embedding.
    pub vector: Vec<f32>,
}

/// One page of a scroll over a collection: its points, in id order, and where the next page
/// starts (`None` after the last page).
#[derive(Debug, Clone, Default)]
pub struct PointPage {
    /// The points of this page.
    pub points: Vec<StoredPoint>,
    /// The id the next page starts at.
    pub next: Option<Uuid>,
}

/// A stored chunk with its vector (see [`VectorStore::chunk_vectors`]).
#[derive(Debug, Clone)]
pub struct StoredChunk {
    /// The stored payload.
    pub payload: ChunkPayload,
    /// The stored embedding.
    pub vector: Vec<f32>,
}

/// A search result.
#[derive(Debug, Clone)]
pub struct ScoredChunk {
    /// How well the chunk matches (higher is better): the cosine similarity for a
    /// [`SearchMode::Dense`] search, the BM25 score for [`SearchMode::Sparse`], the
    /// reciprocal-rank-fusion score for [`SearchMode::Hybrid`].
    pub score: f32,
    /// The chunk's rank (1 = best) in each branch of the search, `None` where the branch did
    /// not return it among its candidates.
    pub ranks: BranchRanks,
    /// The stored payload.
    pub payload: ChunkPayload,
}

/// Where a search hit ranked in each branch (1 = best; `None` = not among the branch's
/// candidates, or the branch did not run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BranchRanks {
    /// Rank among the dense (embedding) nearest neighbours.
    pub dense: Option<usize>,
    /// Rank among the keyword (BM25) matches.
    pub sparse: Option<usize>,
}

/// Which vectors a search compares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SearchMode {
    /// Dense embeddings only: nearest neighbours by cosine similarity.
    Dense,
    /// Keyword vectors only: BM25 with inverse document frequencies over the collection.
    Sparse,
    /// Both branches, fused by the store's query API ([`Fusion`]: distribution-based score
    /// fusion by default, or reciprocal rank fusion).
    #[default]
    Hybrid,
}

impl SearchMode {
    /// Every mode, in the order the CLI lists them.
    pub const ALL: [SearchMode; 3] = [SearchMode::Dense, SearchMode::Sparse, SearchMode::Hybrid];

    /// The mode's name: `dense`, `sparse` or `hybrid`.
    pub fn as_str(self) -> &'static str {
        match self {
            SearchMode::Dense => "dense",
            SearchMode::Sparse => "sparse",
            SearchMode::Hybrid => "hybrid",
        }
    }

    /// Whether the search compares dense embeddings.
    pub fn uses_dense(self) -> bool {
        self != SearchMode::Sparse
    }

    /// Whether the search compares keyword vectors.
    pub fn uses_sparse(self) -> bool {
        self != SearchMode::Dense
    }
}

impl fmt::Display for SearchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SearchMode {
    type Err = String;

    /// Parses `dense`, `sparse` or `hybrid` (case-insensitive); the error lists the modes.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SearchMode::ALL
            .into_iter()
            .find(|mode| mode.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown search mode {s:?}: use dense, sparse or hybrid"))
    }
}

/// The `k` of reciprocal rank fusion: a hit's fused score is the sum of `1 / (k + rank - 1)`
/// (rank counted from 1, Qdrant's convention) over the branches that returned it. 60, the
/// value of the original RRF paper (Cormack et al. 2009), rather than Qdrant's default of 2:
/// larger values flatten the weight of the top ranks, so agreement between the branches
/// counts more than a single first place.
pub const RRF_K: u32 = 60;

/// How a hybrid search merges its two candidate lists (both computed by the store's query
/// API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fusion {
    /// Reciprocal rank fusion: each branch adds `1 / (k + rank - 1)` (rank from 1) to a hit's
    /// score. Only ranks count, not how far apart the scores are.
    Rrf {
        /// The smoothing constant (at least 1): larger values weigh agreement between the
        /// branches more than a first place in one of them.
        k: u32,
    },
    /// Distribution-based score fusion: each branch's scores are normalised by their mean
    /// and three standard deviations, then summed, so a hit far ahead in one branch keeps
    /// that lead.
    Dbsf,
}

impl Default for Fusion {
    /// [`Fusion::Dbsf`]: on the retrieval benchmark (`benches/retrieval.rs`, 504 crate
    /// READMEs) it is the fusion that beats both branches on every metric; reciprocal rank
    /// fusion, which ignores how far ahead a hit is, trails the keyword branch there.
    fn default() -> Self {
        Fusion::Dbsf
    }
}

impl fmt::Display for Fusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fusion::Rrf { k } => write!(f, "rrf(k={k})"),
            Fusion::Dbsf => f.write_str("dbsf"),
        }
    }
}

impl std::str::FromStr for Fusion {
    type Err = String;

    /// Parses `dbsf`, `rrf` (with [`RRF_K`]) or `rrf:K` (K from 1 to 1000); the error says
    /// what is accepted.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "rrf" => Ok(Fusion::Rrf { k: RRF_K }),
            "dbsf" => Ok(Fusion::Dbsf),
            other => other
                .strip_prefix("rrf:")
                .and_then(|k| k.parse().ok())
                .filter(|k| (1..=1000).contains(k))
                .map(|k| Fusion::Rrf { k })
                .ok_or_else(|| {
                    format!("unknown fusion {s:?}: use rrf, rrf:K (K from 1 to 1000) or dbsf")
                }),
        }
    }
}

/// How many candidates each branch of a hybrid search contributes to the fusion for a
/// search of `top_k` results: four times `top_k`, at least 40, at most 1,000.
pub fn hybrid_candidates(top_k: usize) -> usize {
    top_k.saturating_mul(4).clamp(40, 1000)
}

/// Annotates `hits` (the fused result) with each hit's rank in `dense` and `sparse` (the
/// branches' candidate lists, best first, by point id).
pub(crate) fn assign_ranks<Id: PartialEq>(
    hits: &mut [(Id, ScoredChunk)],
    dense: &[Id],
    sparse: &[Id],
) {
    for (id, hit) in hits.iter_mut() {
        hit.ranks = BranchRanks {
            dense: dense.iter().position(|d| d == id).map(|i| i + 1),
            sparse: sparse.iter().position(|s| s == id).map(|i| i + 1),
        };
    }
}

/// A value a metadata field must equal exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataValue {
    /// A string, compared byte for byte (no tokenising, case-sensitive).
    String(String),
    /// An integer.
    Integer(i64),
    /// A boolean.
    Bool(bool),
}

impl From<&str> for MetadataValue {
    fn from(value: &str) -> Self {
        MetadataValue::String(value.to_owned())
    }
}

impl From<String> for MetadataValue {
    fn from(value: String) -> Self {
        MetadataValue::String(value)
    }
}

impl From<i64> for MetadataValue {
    fn from(value: i64) -> Self {
        MetadataValue::Integer(value)
    }
}

impl From<bool> for MetadataValue {
    fn from(value: bool) -> Self {
        MetadataValue::Bool(value)
    }
}

/// Conditions on a search besides the tenant: every one must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchFilter {
    /// `(key, value)`: the payload field `metadata.<key>` must equal `value`. Keys are 1 to 64
    /// characters of ASCII letters, digits, `_` and `-` (see [`validate_metadata_key`]).
    pub metadata: Vec<(String, MetadataValue)>,
}

impl SearchFilter {
    /// This filter plus the condition `metadata.<key> == value`.
    pub fn metadata_eq(mut self, key: impl Into<String>, value: impl Into<MetadataValue>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// Fails with [`StoreError::Rejected`] if a key is not a plain metadata key.
    pub fn validate(&self) -> Result<(), StoreError> {
        for (key, _) in &self.metadata {
            validate_metadata_key(key).map_err(StoreError::rejected)?;
        }
        Ok(())
    }
}

/// Checks that `key` can be used in a metadata filter: 1 to 64 characters of ASCII letters,
/// digits, `_` and `-` (no dots or brackets, which payload paths would interpret). Fails with a
/// description of the problem.
pub fn validate_metadata_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 64 {
        return Err(format!(
            "metadata filter key {key:?} must be 1 to 64 characters long"
        ));
    }
    if !key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    {
        return Err(format!(
            "metadata filter key {key:?} may only contain letters, digits, '_' and '-'"
        ));
    }
    Ok(())
}

/// One nearest-neighbour query, always scoped to one tenant.
#[derive(Debug, Clone)]
pub struct SearchRequest {
    /// The only tenant whose points may match.
    pub tenant: TenantId,
    /// The query embedding (the collection's dimension); not read by a
    /// [`SearchMode::Sparse`] search.
    pub vector: Vec<f32>,
    /// The query's keyword vector ([`SparseEncoder::query`](crate::sparse::SparseEncoder::query)),
    /// needed by [`SearchMode::Sparse`] and [`SearchMode::Hybrid`].
    pub sparse: Option<SparseVector>,
    /// Which vectors to compare.
    pub mode: SearchMode,
    /// How a hybrid search merges its branches.
    pub fusion: Fusion,
    /// Most results to return; 0 returns none.
    pub top_k: usize,
    /// Further conditions on the payload.
    pub filter: SearchFilter,
    /// Only results scoring at least this much (cosine similarity, -1 to 1).
    pub min_score: Option<f32>,
}

impl SearchRequest {
    /// The `top_k` nearest points of `tenant` by dense embedding ([`SearchMode::Dense`]),
    /// without further conditions.
    pub fn new(tenant: TenantId, vector: Vec<f32>, top_k: usize) -> Self {
        SearchRequest {
            tenant,
            vector,
            sparse: None,
            mode: SearchMode::Dense,
            fusion: Fusion::default(),
            top_k,
            filter: SearchFilter::default(),
            min_score: None,
        }
    }

    /// This request in `mode`, with the query's keyword vector `sparse`.
    pub fn with_mode(mut self, mode: SearchMode, sparse: SparseVector) -> Self {
        self.mode = mode;
        self.sparse = Some(sparse);
        self
    }

    /// Fails with [`StoreError::Rejected`] if a filter key is invalid, `min_score` is not a
    /// finite number, or a sparse or hybrid search has no keyword vector (or a malformed one:
    /// lengths differ, a weight is not finite).
    pub fn validate(&self) -> Result<(), StoreError> {
        self.filter.validate()?;
        if let Fusion::Rrf { k: 0 } = self.fusion {
            return Err(StoreError::rejected(
                "the RRF constant k must be at least 1",
            ));
        }
        if self.mode.uses_sparse() {
            let Some(sparse) = &self.sparse else {
                return Err(StoreError::rejected(format!(
                    "a {} search needs the query's keyword vector",
                    self.mode
                )));
            };
            check_sparse(sparse)?;
        }
        if let Some(min) = self.min_score
            && !min.is_finite()
        {
            return Err(StoreError::rejected(format!(
                "min_score must be a finite number, got {min}"
            )));
        }
        Ok(())
    }
}

/// Caps on one write request; larger upserts are split into several requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most points per request (at least 1).
    pub max_points: usize,
    /// Most bytes per request (as encoded for the store; at least 1). A single point larger
    /// than this cannot be written.
    pub max_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_points: DEFAULT_MAX_BATCH_POINTS,
            max_bytes: DEFAULT_MAX_BATCH_BYTES,
        }
    }
}

impl From<&StoreConfig> for BatchLimits {
    /// The write caps `[store]` sets (`max_batch_points`, `max_batch_bytes`), validated when
    /// the config was loaded.
    fn from(config: &StoreConfig) -> Self {
        BatchLimits {
            max_points: config.max_batch_points,
            max_bytes: config.max_batch_bytes,
        }
    }
}

/// Splits `items` into consecutive batches of at most `limits.max_points` items whose sizes
/// (`size(item)` each, plus `overhead` once per batch) add up to at most `limits.max_bytes`.
///
/// Fails with [`StoreError::Rejected`] naming the item if one item alone exceeds the byte cap.
pub(crate) fn split_batches<T>(
    items: Vec<T>,
    overhead: usize,
    limits: BatchLimits,
    size: impl Fn(&T) -> usize,
) -> Result<Vec<Vec<T>>, StoreError> {
    let max_points = limits.max_points.max(1);
    let mut batches = Vec::new();
    let mut current = Vec::new();
    let mut current_bytes = overhead;
    for (index, item) in items.into_iter().enumerate() {
        let bytes = size(&item);
        if overhead.saturating_add(bytes) > limits.max_bytes {
            return Err(StoreError::rejected(format!(
                "point {index} of the batch needs {bytes} bytes, more than the write limit of {} \
                 bytes (store.max_batch_bytes); raise the limit or use smaller chunks",
                limits.max_bytes
            )));
        }
        if !current.is_empty()
            && (current.len() >= max_points
                || current_bytes.saturating_add(bytes) > limits.max_bytes)
        {
            batches.push(std::mem::take(&mut current));
            current_bytes = overhead;
        }
        current_bytes = current_bytes.saturating_add(bytes);
        current.push(item);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    Ok(batches)
}

/// Fails with [`StoreError::Dimension`] if `vector` does not have `dims` values, or
/// [`StoreError::Rejected`] if it holds a NaN or infinite value.
/// Fails with [`StoreError::Rejected`] unless `payload` (read from point `id`) belongs to
/// `tenant`'s `document_id`: a payload of another tenant is never handed out.
pub(crate) fn check_owner(
    payload: &ChunkPayload,
    tenant: &str,
    document_id: &str,
    id: &dyn fmt::Display,
) -> Result<(), StoreError> {
    if payload.tenant_id == tenant && payload.document_id == document_id {
        Ok(())
    } else {
        Err(StoreError::rejected(format!(
            "point {id} should hold a chunk of document {document_id:?} of tenant {tenant}, \
             but its payload names another tenant or document"
        )))
    }
}

pub(crate) fn check_vector(dims: usize, vector: &[f32]) -> Result<(), StoreError> {
    if vector.len() != dims {
        return Err(StoreError::Dimension {
            expected: dims,
            got: vector.len(),
        });
    }
    if vector.iter().any(|v| !v.is_finite()) {
        return Err(StoreError::rejected("vector holds a NaN or infinite value"));
    }
    Ok(())
}

/// Fails with [`StoreError::Rejected`] unless `order` is in range and every point's payload
/// carries it.
/// Fails with [`StoreError::Rejected`] if `sparse` has more ids than weights (or fewer), a
/// repeated id, or a weight that is not finite.
pub(crate) fn check_sparse(sparse: &SparseVector) -> Result<(), StoreError> {
    if sparse.indices.len() != sparse.values.len() {
        return Err(StoreError::rejected(format!(
            "sparse vector has {} ids and {} weights",
            sparse.indices.len(),
            sparse.values.len()
        )));
    }
    if sparse.values.iter().any(|v| !v.is_finite()) {
        return Err(StoreError::rejected(
            "sparse vector holds a weight that is not a finite number",
        ));
    }
    let mut ids = sparse.indices.clone();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return Err(StoreError::rejected("sparse vector repeats a term id"));
    }
    Ok(())
}

/// The error of a keyword or hybrid search (or a write) that needs sparse vectors in a
/// collection created without them, naming the migration.
pub(crate) fn no_sparse_vectors(collection: &str) -> StoreError {
    StoreError::rejected(format!(
        "collection {collection} has no keyword (sparse) vectors: it was created before hybrid \
         search. Search it with mode \"dense\", or migrate it: `rag-ingest reindex --from \
         {collection}` into a new collection (see docs/storage.md, \"Migrating to hybrid \
         search\")"
    ))
}

pub(crate) fn check_points_order(points: &[ChunkPoint], order: Order) -> Result<(), StoreError> {
    order.check()?;
    match points.iter().find(|p| p.payload.order != Some(order)) {
        Some(point) => Err(StoreError::rejected(format!(
            "point {} carries order {:?}, not the write's order {order:?}",
            point.id, point.payload.order
        ))),
        None => Ok(()),
    }
}

/// Fails with [`StoreError::Rejected`] if `version` is above [`MAX_VERSION`].
pub(crate) fn check_version(version: Option<u64>) -> Result<(), StoreError> {
    match version {
        Some(v) if v > MAX_VERSION => Err(StoreError::rejected(format!(
            "document version {v} is above the largest version the store can compare \
             ({MAX_VERSION})"
        ))),
        _ => Ok(()),
    }
}

/// What differs between a stored and a configured fingerprint, e.g.
/// `model: stored "a", configured "b"; dims: stored 384, configured 768`.
pub fn describe_fingerprint_difference(stored: &Fingerprint, expected: &Fingerprint) -> String {
    let mut parts = Vec::new();
    if stored.model != expected.model {
        parts.push(format!(
            "model: stored {:?}, configured {:?}",
            stored.model, expected.model
        ));
    }
    if stored.dims != expected.dims {
        parts.push(format!(
            "dims: stored {}, configured {}",
            stored.dims, expected.dims
        ));
    }
    if stored.pooling != expected.pooling {
        parts.push(format!(
            "pooling: stored {:?}, configured {:?}",
            stored.pooling, expected.pooling
        ));
    }
    if stored.normalized != expected.normalized {
        parts.push(format!(
            "normalized: stored {}, configured {}",
            stored.normalized, expected.normalized
        ));
    }
    match (&stored.sparse, &expected.sparse) {
        (None, Some(configured)) => parts.push(format!(
            "sparse: the collection has no keyword vectors (created before hybrid search), \
             configured {configured:?}; migrate with `rag-ingest reindex` or re-ingest into a \
             new collection (docs/storage.md, \"Migrating to hybrid search\")"
        )),
        (stored, configured) if stored != configured => parts.push(format!(
            "sparse: stored {stored:?}, configured {configured:?}"
        )),
        _ => {}
    }
    if parts.is_empty() {
        "nothing (the fingerprints are equal)".to_owned()
    } else {
        parts.join("; ")
    }
}

/// The underlying error of a [`StoreFailure`] (an I/O error, a gRPC status, a storage-engine
/// error), kept for [`std::error::Error::source`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a failed store operation was doing and why it failed: the operation (e.g.
/// `upsert points`), the collection, a reason safe to log (never a secret), and the
/// underlying error when there is one, as its [`source`](std::error::Error::source).
///
/// A failure detected by this crate before any request (an invalid input, a closed store) has
/// a reason but no source; [`StoreFailure::from`] a string makes one.
#[derive(Debug)]
pub struct StoreFailure {
    /// The operation that failed, e.g. `upsert points`; empty when not tied to one.
    pub operation: String,
    /// The collection it was working on; empty when not known.
    pub collection: String,
    /// What went wrong, safe to log.
    pub reason: String,
    /// The underlying error, if any.
    pub source: Option<BoxError>,
}

impl StoreFailure {
    /// A failure with only a reason (no operation, collection or underlying error).
    pub fn new(reason: impl Into<String>) -> Self {
        StoreFailure {
            operation: String::new(),
            collection: String::new(),
            reason: reason.into(),
            source: None,
        }
    }

    /// A failure of `operation` on `collection`, described by `reason`, caused by `source`.
    pub fn caused_by(
        operation: impl Into<String>,
        collection: impl Into<String>,
        reason: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        StoreFailure {
            operation: operation.into(),
            collection: collection.into(),
            reason: reason.into(),
            source: Some(source.into()),
        }
    }

    /// Fills in the operation and the collection where they are not known yet.
    pub fn during(mut self, operation: &str, collection: &str) -> Self {
        if self.operation.is_empty() {
            operation.clone_into(&mut self.operation);
        }
        if self.collection.is_empty() {
            collection.clone_into(&mut self.collection);
        }
        self
    }
}

impl fmt::Display for StoreFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.operation.is_empty(), self.collection.is_empty()) {
            (false, false) => write!(
                f,
                "{} on collection {} failed: ",
                self.operation, self.collection
            )?,
            (false, true) => write!(f, "{} failed: ", self.operation)?,
            (true, false) => write!(f, "collection {}: ", self.collection)?,
            (true, true) => {}
        }
        f.write_str(&self.reason)
    }
}

impl std::error::Error for StoreFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<String> for StoreFailure {
    fn from(reason: String) -> Self {
        StoreFailure::new(reason)
    }
}

impl From<&str> for StoreFailure {
    fn from(reason: &str) -> Self {
        StoreFailure::new(reason)
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or failed in a way that may pass (I/O, timeouts).
    #[error("vector store unavailable: {0}")]
    Unavailable(#[source] StoreFailure),
    /// The store refused the request; sending it again will not help.
    #[error("vector store rejected the request: {0}")]
    Rejected(#[source] StoreFailure),
    /// The collection was created for another embedder.
    #[error(
        "collection {collection} was built with embedder {stored}, but this pipeline's embedder is {expected} (differs in {differs}); use another collection or re-ingest into a new one"
    )]
    FingerprintMismatch {
        /// Collection name.
        collection: String,
        /// Fingerprint id recorded in the collection.
        stored: String,
        /// Fingerprint id of the configured embedder.
        expected: String,
        /// Which fingerprint fields differ, with both values.
        differs: String,
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

    /// A transient failure with only a reason ([`StoreError::Unavailable`]).
    pub fn unavailable(reason: impl Into<String>) -> Self {
        StoreError::Unavailable(StoreFailure::new(reason))
    }

    /// A permanent failure with only a reason ([`StoreError::Rejected`]).
    pub fn rejected(reason: impl Into<String>) -> Self {
        StoreError::Rejected(StoreFailure::new(reason))
    }

    /// Whether retrying may succeed (the store was unavailable).
    pub fn is_transient(&self) -> bool {
        self.kind().is_transient()
    }

    /// Adds the operation and the collection to an [`Unavailable`](StoreError::Unavailable)
    /// or [`Rejected`](StoreError::Rejected) failure that does not name them yet; other
    /// variants are returned as they are.
    pub fn during(self, operation: &str, collection: &str) -> Self {
        match self {
            StoreError::Unavailable(f) => StoreError::Unavailable(f.during(operation, collection)),
            StoreError::Rejected(f) => StoreError::Rejected(f.during(operation, collection)),
            other => other,
        }
    }

    /// The mismatch error for `collection`, recorded with `stored`, opened with `expected`.
    pub(crate) fn mismatch(collection: &str, stored: &Fingerprint, expected: &Fingerprint) -> Self {
        StoreError::FingerprintMismatch {
            collection: collection.to_owned(),
            stored: stored.id(),
            expected: expected.id(),
            differs: describe_fingerprint_difference(stored, expected),
        }
    }
}

/// A store failure as a processing [`Failure`] at [`Stage::Store`].
impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::new(e.kind(), Stage::Store, e.to_string())
    }
}

/// Stores and retrieves chunk embeddings, always scoped to one tenant.
///
/// Every method may fail with [`StoreError::Unavailable`] (transient) or
/// [`StoreError::Rejected`] (permanent). None may block the async runtime.
pub trait VectorStore: Send + Sync + 'static {
    /// Writes `points` (insert or overwrite by id) and returns once they are durable
    /// and visible to searches. Large inputs are written in several requests (see
    /// [`BatchLimits`]) in the order of `points`, so the last point is written last; if one
    /// fails, the earlier ones stay written (upserts are idempotent, so writing the same points
    /// again completes the job).
    ///
    /// Fails with [`StoreError::Dimension`] on a vector of the wrong length and
    /// [`StoreError::Rejected`] on a non-finite vector, a version above [`MAX_VERSION`] or a
    /// point larger than the byte cap (nothing is written in these cases).
    fn upsert(
        &self,
        points: Vec<ChunkPoint>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Writes `points` (all of one document, each payload carrying `order`) where the stored
    /// point with the same id is older than `order` or absent: a stored point of the same or
    /// a newer order is left as it is. The condition is checked by the store for each point
    /// atomically, so concurrent writers of one document (in any number of processes) can
    /// never overwrite a newer write with an older one. Split and ordered like
    /// [`upsert`](VectorStore::upsert).
    ///
    /// Fails like [`upsert`](VectorStore::upsert), and with [`StoreError::Rejected`] if
    /// `order` is out of range (see [`MAX_SEQ`]) or a payload's order is not `order`.
    fn upsert_newer(
        &self,
        points: Vec<ChunkPoint>,
        order: Order,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes `tenant`'s points of `document_id` (tombstones included) whose order is older
    /// than `order`, and those written before orders existed. Points of `order` itself and of
    /// newer writes are never touched, whatever other writers do meanwhile.
    ///
    /// Fails with [`StoreError::Rejected`] if `order` is out of range,
    /// [`StoreError::Unavailable`] if the delete fails.
    fn delete_older(
        &self,
        tenant: &TenantId,
        document_id: &str,
        order: Order,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The payload of chunk 0 of `document_id` (how the stored revision is identified; a
    /// tombstone if the document was deleted), or `None` if the tenant has no such document.
    fn first_chunk(
        &self,
        tenant: &TenantId,
        document_id: &str,
    ) -> impl Future<Output = Result<Option<ChunkPayload>, StoreError>> + Send;

    /// Chunks `0..chunk_count` of `tenant`'s `document_id` with their payloads and vectors,
    /// in chunk order; chunks that are not stored are left out. This is how an edited document
    /// reuses the vectors of the chunks whose text did not change.
    ///
    /// Fails with [`StoreError::Rejected`] if a point's payload is not a [`ChunkPayload`] of
    /// that tenant and document or it has no dense vector (nothing is returned then),
    /// [`StoreError::Unavailable`] if the read fails.
    fn chunk_vectors(
        &self,
        tenant: &TenantId,
        document_id: &str,
        chunk_count: usize,
    ) -> impl Future<Output = Result<Vec<StoredChunk>, StoreError>> + Send;

    /// Deletes `tenant`'s points of `document_id` whose [`Revision`] differs from `keep` (all
    /// of them when `keep` is `None`). Other tenants and documents are never touched.
    fn delete_document(
        &self,
        tenant: &TenantId,
        document_id: &str,
        keep: Option<&Revision>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Sets `version`, `metadata` and `order` on `tenant`'s points of `document_id` that
    /// belong to `revision` (same content hash and chunk count; any version) and are older
    /// than `order`, without touching their vectors: how a new version of unchanged content
    /// is recorded without re-embedding.
    ///
    /// Fails with [`StoreError::Rejected`] if `version` is above [`MAX_VERSION`] or `order`
    /// is out of range.
    fn relabel_document(
        &self,
        tenant: &TenantId,
        document_id: &str,
        revision: &Revision,
        version: Option<u64>,
        metadata: &serde_json::Map<String, serde_json::Value>,
        order: Order,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes every point of `tenant` (and nothing of any other tenant).
    fn purge_tenant(
        &self,
        tenant: &TenantId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The best `request.top_k` chunks (never tombstones) of `request.tenant` for
    /// `request.vector` that pass
    /// `request.filter` and score at least `request.min_score`, best first.
    ///
    /// Fails with [`StoreError::Dimension`] on a vector of the wrong length and
    /// [`StoreError::Rejected`] on a non-finite vector, an invalid filter key or a non-finite
    /// `min_score`.
    fn search(
        &self,
        request: SearchRequest,
    ) -> impl Future<Output = Result<Vec<ScoredChunk>, StoreError>> + Send;

    /// Number of `tenant`'s chunks (tombstones not counted), only those of `document_id` when
    /// given.
    fn count(
        &self,
        tenant: &TenantId,
        document_id: Option<&str>,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;
}

/// The store a pipeline's configuration names: embedded Qdrant Edge or a Qdrant server.
pub enum Store {
    /// `store.kind = "edge"`.
    Edge(EdgeStore),
    /// `store.kind = "qdrant"` (boxed: the client is much larger than the Edge handle).
    Qdrant(Box<QdrantStore>),
}

impl Store {
    /// The configured kind, `edge` or `qdrant`, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Edge(_) => "edge",
            Store::Qdrant(_) => "qdrant",
        }
    }
}

impl From<EdgeStore> for Store {
    fn from(store: EdgeStore) -> Self {
        Store::Edge(store)
    }
}

impl From<QdrantStore> for Store {
    fn from(store: QdrantStore) -> Self {
        Store::Qdrant(Box::new(store))
    }
}

impl Store {
    /// Up to `limit` points of the whole collection (every tenant, tombstones included) in
    /// id order, from `from` on (the first page without it). How a collection is copied
    /// (`rag-ingest reindex`); never used by the pipeline or searches.
    ///
    /// Fails with [`StoreError::Rejected`] if a point's payload is not a [`ChunkPayload`] or
    /// it has no dense vector, [`StoreError::Unavailable`] if the read fails.
    pub async fn scroll(&self, from: Option<Uuid>, limit: usize) -> Result<PointPage, StoreError> {
        match self {
            Store::Edge(s) => s.scroll(from, limit).await,
            Store::Qdrant(s) => s.scroll(from, limit).await,
        }
    }

    /// The collection's name.
    pub fn collection(&self) -> &str {
        match self {
            Store::Edge(s) => s.collection(),
            Store::Qdrant(s) => s.collection(),
        }
    }
}

impl VectorStore for Store {
    async fn upsert(&self, points: Vec<ChunkPoint>) -> Result<(), StoreError> {
        match self {
            Store::Edge(s) => s.upsert(points).await,
            Store::Qdrant(s) => s.upsert(points).await,
        }
    }

    async fn upsert_newer(&self, points: Vec<ChunkPoint>, order: Order) -> Result<(), StoreError> {
        match self {
            Store::Edge(s) => s.upsert_newer(points, order).await,
            Store::Qdrant(s) => s.upsert_newer(points, order).await,
        }
    }

    async fn delete_older(
        &self,
        tenant: &TenantId,
        document_id: &str,
        order: Order,
    ) -> Result<(), StoreError> {
        match self {
            Store::Edge(s) => s.delete_older(tenant, document_id, order).await,
            Store::Qdrant(s) => s.delete_older(tenant, document_id, order).await,
        }
    }

    async fn first_chunk(
        &self,
        tenant: &TenantId,
        document_id: &str,
    ) -> Result<Option<ChunkPayload>, StoreError> {
        match self {
            Store::Edge(s) => s.first_chunk(tenant, document_id).await,
            Store::Qdrant(s) => s.first_chunk(tenant, document_id).await,
        }
    }

    async fn chunk_vectors(
        &self,
        tenant: &TenantId,
        document_id: &str,
        chunk_count: usize,
    ) -> Result<Vec<StoredChunk>, StoreError> {
        match self {
            Store::Edge(s) => s.chunk_vectors(tenant, document_id, chunk_count).await,
            Store::Qdrant(s) => s.chunk_vectors(tenant, document_id, chunk_count).await,
        }
    }

    async fn delete_document(
        &self,
        tenant: &TenantId,
        document_id: &str,
        keep: Option<&Revision>,
    ) -> Result<(), StoreError> {
        match self {
            Store::Edge(s) => s.delete_document(tenant, document_id, keep).await,
            Store::Qdrant(s) => s.delete_document(tenant, document_id, keep).await,
        }
    }

    async fn relabel_document(
        &self,
        tenant: &TenantId,
        document_id: &str,
        revision: &Revision,
        version: Option<u64>,
        metadata: &serde_json::Map<String, serde_json::Value>,
        order: Order,
    ) -> Result<(), StoreError> {
        match self {
            Store::Edge(s) => {
                s.relabel_document(tenant, document_id, revision, version, metadata, order)
                    .await
            }
            Store::Qdrant(s) => {
                s.relabel_document(tenant, document_id, revision, version, metadata, order)
                    .await
            }
        }
    }

    async fn purge_tenant(&self, tenant: &TenantId) -> Result<(), StoreError> {
        match self {
            Store::Edge(s) => s.purge_tenant(tenant).await,
            Store::Qdrant(s) => s.purge_tenant(tenant).await,
        }
    }

    async fn search(&self, request: SearchRequest) -> Result<Vec<ScoredChunk>, StoreError> {
        match self {
            Store::Edge(s) => s.search(request).await,
            Store::Qdrant(s) => s.search(request).await,
        }
    }

    async fn count(
        &self,
        tenant: &TenantId,
        document_id: Option<&str>,
    ) -> Result<usize, StoreError> {
        match self {
            Store::Edge(s) => s.count(tenant, document_id).await,
            Store::Qdrant(s) => s.count(tenant, document_id).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_points: usize, max_bytes: usize) -> BatchLimits {
        BatchLimits {
            max_points,
            max_bytes,
        }
    }

    #[test]
    fn batches_respect_the_point_cap() {
        let batches = split_batches((0..7).collect(), 0, limits(3, 1000), |_| 1).unwrap();
        assert_eq!(batches, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
    }

    #[test]
    fn batches_respect_the_byte_cap_with_overhead() {
        // Each item 40 bytes, overhead 20, cap 100: two items (20 + 80) fit, three do not.
        let batches = split_batches((0..5).collect(), 20, limits(100, 100), |_| 40).unwrap();
        assert_eq!(batches, vec![vec![0, 1], vec![2, 3], vec![4]]);
        // Sizes vary: a big item starts its own batch.
        let sizes = [10, 10, 70, 20, 90];
        let batches =
            split_batches((0..5).collect(), 0, limits(100, 100), |i: &usize| sizes[*i]).unwrap();
        assert_eq!(batches, vec![vec![0, 1, 2], vec![3], vec![4]]);
    }

    #[test]
    fn an_item_over_the_byte_cap_is_rejected() {
        let err = split_batches(vec![1, 2], 10, limits(10, 100), |i| i * 60).unwrap_err();
        assert!(
            matches!(&err, StoreError::Rejected(m) if m.to_string().contains("point 1")),
            "{err}"
        );
    }

    #[test]
    fn empty_input_gives_no_batches() {
        let batches = split_batches(Vec::<u8>::new(), 0, limits(1, 1), |_| 1).unwrap();
        assert!(batches.is_empty());
    }

    #[test]
    fn metadata_keys_are_checked() {
        assert!(validate_metadata_key("title").is_ok());
        assert!(validate_metadata_key("content-type_2").is_ok());
        for bad in ["", "a.b", "a[]", "a b", "ü", &"k".repeat(65)] {
            assert!(validate_metadata_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn orders_round_trip_through_the_stored_form_and_compare_lexicographically() {
        for order in [
            Order { version: 0, seq: 0 },
            Order {
                version: MAX_VERSION,
                seq: MAX_SEQ,
            },
            Order {
                version: (1 << 32) + 7,
                seq: 12,
            },
            Order {
                version: u64::from(u32::MAX),
                seq: 1,
            },
        ] {
            let json = serde_json::to_value(order).unwrap();
            for part in ["v_hi", "v_lo", "seq"] {
                assert!(json[part].as_u64().unwrap() <= MAX_SEQ, "{json}");
            }
            assert_eq!(serde_json::from_value::<Order>(json).unwrap(), order);
        }
        let a = Order {
            version: 1 << 32,
            seq: 0,
        };
        let b = Order {
            version: (1 << 32) - 1,
            seq: MAX_SEQ,
        };
        assert!(b < a);
        assert!(Order { version: 3, seq: 5 } < Order { version: 3, seq: 6 });
        assert!(
            Order {
                version: 0,
                seq: MAX_SEQ + 1
            }
            .check()
            .is_err()
        );
    }

    #[test]
    fn search_modes_and_fusions_parse_and_name_what_is_accepted() {
        assert_eq!("Hybrid".parse(), Ok(SearchMode::Hybrid));
        assert_eq!(" sparse ".parse(), Ok(SearchMode::Sparse));
        assert!(
            "fuzzy"
                .parse::<SearchMode>()
                .is_err_and(|e| e.contains("dense"))
        );
        assert_eq!("dbsf".parse(), Ok(Fusion::Dbsf));
        assert_eq!("rrf".parse(), Ok(Fusion::Rrf { k: RRF_K }));
        assert_eq!("RRF:7".parse(), Ok(Fusion::Rrf { k: 7 }));
        for bad in ["rrf:0", "rrf:1001", "rrf:x", "max"] {
            assert!(
                bad.parse::<Fusion>().is_err_and(|e| e.contains("rrf:K")),
                "{bad}"
            );
        }
        assert_eq!(Fusion::default(), Fusion::Dbsf);
        assert_eq!(SearchMode::default(), SearchMode::Hybrid);
    }

    #[test]
    fn versions_above_i64_are_refused() {
        assert!(check_version(None).is_ok());
        assert!(check_version(Some(MAX_VERSION)).is_ok());
        assert!(matches!(
            check_version(Some(MAX_VERSION + 1)),
            Err(StoreError::Rejected(_))
        ));
    }

    #[test]
    fn fingerprint_differences_are_named() {
        let a = Fingerprint {
            model: "m".into(),
            dims: 384,
            pooling: "mean".into(),
            normalized: true,
            sparse: None,
        };
        let b = Fingerprint {
            dims: 768,
            normalized: false,
            sparse: None,
            ..a.clone()
        };
        let text = describe_fingerprint_difference(&a, &b);
        assert!(text.contains("dims: stored 384, configured 768"), "{text}");
        assert!(text.contains("normalized"), "{text}");
        assert!(!text.contains("model"), "{text}");
    }
}
