//! [`QdrantStore`]: the [`VectorStore`] backed by a Qdrant server through `qdrant-client` 1.20
//! (gRPC, port 6334 by default).
//!
//! Collection bootstrap ([`QdrantStore::open`]):
//! - a missing collection is created with one unnamed dense vector of the embedder's size and
//!   cosine distance, and with the embedder [`Fingerprint`] in the collection's *metadata*
//!   under the key [`FINGERPRINT_METADATA_KEY`] (collection metadata needs a Qdrant server
//!   ≥ 1.16). Creation and recording are one request, so there is no window in which the
//!   collection exists without its fingerprint; a concurrent creator is tolerated
//!   (`AlreadyExists` is not an error). On a cluster, the [`CollectionLayout`] (shard number,
//!   replication factor, write consistency factor) is set at creation; unset values are the
//!   server's defaults;
//! - keyword payload indexes on `tenant_id` (`is_tenant`), `document_id` and `content_sha256`,
//!   and integer indexes on `version` and `chunk_count`, are created if missing (`wait=true`).
//!   Metadata filters use `metadata.<key>`, which is not indexed: a server in strict mode
//!   (`unindexed_filtering_retrieve = false`) needs a keyword index on each key searched by;
//! - the collection's vector size and distance, and the recorded fingerprint, are compared
//!   with the embedder's. Any difference is [`StoreError::FingerprintMismatch`] (saying what
//!   differs); a collection without a recorded fingerprint (not created by rag-ingest, or a
//!   server too old to keep collection metadata) is refused with [`StoreError::Rejected`].
//!
//! Requests: every write uses `wait=true`, so it returns once applied and visible. Upserts are
//! split by [`BatchLimits`], measured exactly as protobuf-encoded bytes, so one request (and
//! the memory the server needs for it) stays bounded. Qdrant 1.19 applies
//! `service.max_request_size_mb` to its REST API only: its gRPC services accept messages of
//! any size, so a server limit below `store.max_batch_bytes` never refuses a gRPC upsert
//! (`tests/qdrant_server.rs`). Each request is retried
//! in process with exponential backoff and jitter (`backon`) on transient failures only:
//! gRPC `Unavailable`, `DeadlineExceeded`, `ResourceExhausted` (honouring the server's
//! `retry-after` when it fits within the backoff ceiling) and `Aborted`, plus the client's own
//! "Failed to connect" error (which `qdrant-client` reports as `Internal` although it means
//! the server is unreachable). `InvalidArgument`, `NotFound` and every other code fail at once.
//!
//! Error mapping: the retryable failures above and `Internal`, `Unknown`, `Cancelled` and
//! `DataLoss` become [`StoreError::Unavailable`] (the queue retries the message later);
//! everything else [`StoreError::Rejected`]. Messages carry the gRPC code and message but never
//! the request metadata, so the API key never appears in errors or logs.
//!
//! Payloads: the [`ChunkPayload`] fields are stored at the top level of the point payload,
//! converted from JSON (integers as 64-bit signed integers; versions above
//! [`MAX_VERSION`](super::MAX_VERSION) are refused rather than silently turned into floats).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use qdrant_client::qdrant::r#match::MatchValue;
use qdrant_client::qdrant::{
    Condition, CountPoints, CreateCollection, CreateFieldIndexCollection, DeletePoints, Distance,
    FieldType, Filter, GetPoints, KeywordIndexParams, Modifier, NamedVectors, PayloadIndexParams,
    PointId, PointStruct, PointsSelector, PrefetchQuery, Query, QueryBatchPoints, QueryPoints,
    Range, Rrf, ScoredPoint, ScrollPoints, SetPayloadPoints, SparseVectorConfig,
    SparseVectorParams, UpsertPoints, Value as QValue, VectorInput, VectorParams, VectorsConfig,
    payload_index_params, point_id::PointIdOptions, vector_output, vectors_config,
};
use qdrant_client::{Qdrant, QdrantError};
use tonic::Code;

use super::{
    BatchLimits, BoxError, BranchRanks, ChunkPayload, ChunkPoint, MetadataValue, ORDER_FIELD,
    Order, OrderTerm, Revision, ScoredChunk, SearchMode, SearchRequest, StoreError, StoreFailure,
    StoredChunk, TOMBSTONE_FIELD, VectorStore, assign_ranks, check_owner, check_points_order,
    check_sparse, check_vector, check_version, hybrid_candidates, no_sparse_vectors, point_id,
    split_batches,
};
use crate::config::{
    DEFAULT_QDRANT_BACKOFF_MAX_MS, DEFAULT_QDRANT_BACKOFF_MIN_MS,
    DEFAULT_QDRANT_CONNECT_TIMEOUT_MS, DEFAULT_QDRANT_RETRIES, DEFAULT_QDRANT_TIMEOUT_MS,
    StoreConfig,
};
use crate::fingerprint::Fingerprint;
use crate::secret::Secret;
use crate::sparse::SPARSE_VECTOR_NAME;
use crate::tenant::TenantId;
use crate::validate::redact_url;

/// The oldest Qdrant server version `QdrantStore` opens (major, minor): conditional upserts
/// (`update_filter`) and collection metadata came with 1.16. An older server would ignore the
/// condition of a write, so an older version could overwrite a newer one.
pub const MIN_SERVER_VERSION: (u64, u64) = (1, 16);

/// The oldest Qdrant server version without a known defect for this store's writes (major,
/// minor): before 1.19, a server replaying its write-ahead log after a crash evaluated
/// conditional upserts and deletes by filter again, and could bring deleted points back
/// (qdrant/qdrant#9575). Older servers from [`MIN_SERVER_VERSION`] on are accepted with a
/// warning.
pub const SAFE_SERVER_VERSION: (u64, u64) = (1, 19);

/// What can go wrong on a server older than [`SAFE_SERVER_VERSION`] (for warnings).
pub const OUTDATED_SERVER_RISK: &str = "after a crash of the server, replaying its write-ahead \
     log can bring deleted points back (qdrant/qdrant#9575)";

/// How a Qdrant server version suits this store (see [`MIN_SERVER_VERSION`] and
/// [`SAFE_SERVER_VERSION`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerSupport {
    /// [`SAFE_SERVER_VERSION`] or later.
    Supported,
    /// From [`MIN_SERVER_VERSION`] up to [`SAFE_SERVER_VERSION`]: works, with a known
    /// defect after a server crash.
    Outdated,
    /// Older than [`MIN_SERVER_VERSION`]: refused.
    Unsupported,
    /// Not a `major.minor[.patch]` version (a development build, say): accepted.
    Unknown,
}

impl ServerSupport {
    /// Classifies the version string a server reports (`1.19.0`, `v1.18.2`, `1.19.0-rc.1`).
    pub fn of(version: &str) -> Self {
        let version = version.trim();
        let version = version.strip_prefix('v').unwrap_or(version);
        let mut parts = version.split(['.', '-', '+']);
        let major = parts.next().and_then(|p| p.parse::<u64>().ok());
        let minor = parts.next().and_then(|p| p.parse::<u64>().ok());
        match (major, minor) {
            (Some(major), Some(minor)) if (major, minor) >= SAFE_SERVER_VERSION => {
                ServerSupport::Supported
            }
            (Some(major), Some(minor)) if (major, minor) >= MIN_SERVER_VERSION => {
                ServerSupport::Outdated
            }
            (Some(_), Some(_)) => ServerSupport::Unsupported,
            _ => ServerSupport::Unknown,
        }
    }
}

/// Collection metadata key holding the embedder [`Fingerprint`] (a JSON object with `model`,
/// `dims`, `pooling` and `normalized`).
pub const FINGERPRINT_METADATA_KEY: &str = "rag_ingest_embedder";

/// Payload fields with a keyword index, and whether each is the tenant key.
const KEYWORD_INDEXES: [(&str, bool); 3] = [
    ("tenant_id", true),
    ("document_id", false),
    ("content_sha256", false),
];

/// Integer payload fields the lifecycle filters on (indexed so that deletes and relabels also
/// work on servers in strict mode, which refuse filters on unindexed fields).
const INTEGER_INDEXES: [&str; 5] = [
    "version",
    "chunk_count",
    "order.v_hi",
    "order.v_lo",
    "order.seq",
];

/// Bytes an upsert request needs besides its points (collection name is added separately):
/// field tags, the `wait` flag and slack for optional fields.
const UPSERT_OVERHEAD: usize = 64;

/// Point ids per retrieve request of [`QdrantStore::chunk_vectors`](VectorStore::chunk_vectors)
/// (each response carries a vector and a payload per id).
const RETRIEVE_BATCH: usize = 256;

/// How to reach a Qdrant server and how hard to try.
#[derive(Clone)]
pub struct QdrantOptions {
    /// gRPC URL, e.g. `http://127.0.0.1:6334` (`https://` for TLS).
    pub url: String,
    /// API key sent with every request, if the server needs one. Never logged or shown: a
    /// [`Secret`] prints `***`.
    pub api_key: Option<Secret>,
    /// Name of the environment variable the key came from (`store.qdrant.api_key_env`), so
    /// that a refused key is reported with where to fix it.
    pub api_key_env: Option<String>,
    /// Deadline of one request (also bounds `wait=true` writes).
    pub timeout: Duration,
    /// Deadline for establishing a connection.
    pub connect_timeout: Duration,
    /// In-process retries of one request on transient failures (0 = none).
    pub retries: usize,
    /// First retry delay (doubles each time, with jitter).
    pub backoff_min: Duration,
    /// Largest retry delay; a server `retry-after` above it ends the retries.
    pub backoff_max: Duration,
    /// Caps on one upsert request.
    pub limits: BatchLimits,
    /// Sharding and replication of a collection this store creates.
    pub layout: CollectionLayout,
}

/// How a collection created by [`QdrantStore::open`] is spread over a cluster. `None`
/// leaves a setting to the server's default (on a single node: one shard, one replica,
/// writes wait for one replica). Only used when the collection is created; an existing
/// collection keeps its own (a difference is logged as a warning).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CollectionLayout {
    /// Shards of the collection.
    pub shard_number: Option<u32>,
    /// Copies of each shard, on distinct peers.
    pub replication_factor: Option<u32>,
    /// Replicas that must apply a write before the server answers it.
    pub write_consistency_factor: Option<u32>,
}

impl QdrantOptions {
    /// Options for `url` with the defaults of `[store.qdrant]` (see the `DEFAULT_QDRANT_*`
    /// constants in [`crate::config`]): no API key, 10 s request and 5 s connect timeout,
    /// 3 retries from 100 ms to 2 s, default [`BatchLimits`].
    pub fn new(url: impl Into<String>) -> Self {
        QdrantOptions {
            url: url.into(),
            api_key: None,
            api_key_env: None,
            timeout: Duration::from_millis(DEFAULT_QDRANT_TIMEOUT_MS),
            connect_timeout: Duration::from_millis(DEFAULT_QDRANT_CONNECT_TIMEOUT_MS),
            retries: DEFAULT_QDRANT_RETRIES as usize,
            backoff_min: Duration::from_millis(DEFAULT_QDRANT_BACKOFF_MIN_MS),
            backoff_max: Duration::from_millis(DEFAULT_QDRANT_BACKOFF_MAX_MS),
            limits: BatchLimits::default(),
            layout: CollectionLayout::default(),
        }
    }

    /// The options a validated `[store]` section describes: `[store.qdrant]` (the API key
    /// as resolved from its environment variable when the config was loaded) and the write
    /// caps of `[store]`. Cannot fail: the section was checked when it was loaded.
    pub fn from_config(config: &StoreConfig) -> Self {
        let q = &config.qdrant;
        QdrantOptions {
            url: q.url.clone(),
            api_key: q.api_key.clone(),
            api_key_env: q.api_key_env.clone(),
            timeout: Duration::from_millis(q.timeout_ms),
            connect_timeout: Duration::from_millis(q.connect_timeout_ms),
            retries: q.retries as usize,
            backoff_min: Duration::from_millis(q.backoff_min_ms),
            backoff_max: Duration::from_millis(q.backoff_max_ms),
            limits: BatchLimits::from(config),
            layout: CollectionLayout {
                shard_number: q.shard_number,
                replication_factor: q.replication_factor,
                write_consistency_factor: q.write_consistency_factor,
            },
        }
    }
}

impl fmt::Debug for QdrantOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QdrantOptions")
            .field("url", &redact_url(&self.url))
            .field("api_key", &self.api_key)
            .field("api_key_env", &self.api_key_env)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("retries", &self.retries)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("limits", &self.limits)
            .field("layout", &self.layout)
            .finish()
    }
}

/// A [`VectorStore`] in one collection of a Qdrant server (see the module documentation).
pub struct QdrantStore {
    client: Qdrant,
    collection: String,
    dims: usize,
    /// Whether the collection holds keyword (sparse) vectors.
    sparse: bool,
    /// The URL with any password redacted, for error messages.
    url: String,
    retries: usize,
    backoff_min: Duration,
    backoff_max: Duration,
    limits: BatchLimits,
    /// What to tell a user whose credentials the server refuses.
    auth_hint: String,
    layout: CollectionLayout,
    /// The server's version as its health check reported it when the store was opened.
    server_version: Option<String>,
}

impl fmt::Debug for QdrantStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QdrantStore")
            .field("url", &self.url)
            .field("collection", &self.collection)
            .field("dims", &self.dims)
            .finish_non_exhaustive()
    }
}

impl QdrantStore {
    /// Connects to the server `options` names and opens the collection `collection`, creating
    /// it if missing (see the module documentation for what is created and checked).
    ///
    /// Fails with [`StoreError::FingerprintMismatch`] if the collection was created for another
    /// embedder (or has another vector size or distance); [`StoreError::Rejected`] if
    /// `collection` is not a plain name (`[A-Za-z0-9_.-]`, 1 to 255 characters), the URL is
    /// invalid, `fingerprint.dims` is 0, the collection has no recorded fingerprint, the
    /// server is older than [`MIN_SERVER_VERSION`] or refuses a request (e.g. a wrong API
    /// key); [`StoreError::Unavailable`] if the server cannot be reached within the retries.
    pub async fn open(
        options: &QdrantOptions,
        collection: &str,
        fingerprint: &Fingerprint,
    ) -> Result<Self, StoreError> {
        let mut store = Self::connect(options, collection, fingerprint)?;
        store.check_server_version().await?;
        store.bootstrap(fingerprint).await?;
        Ok(store)
    }

    /// A store for `collection` on the server `options` names, for vectors of
    /// `fingerprint`, without any request yet.
    ///
    /// Fails with [`StoreError::Rejected`] if the name, the URL or the fingerprint's
    /// dimension is invalid.
    fn connect(
        options: &QdrantOptions,
        collection: &str,
        fingerprint: &Fingerprint,
    ) -> Result<Self, StoreError> {
        if fingerprint.dims == 0 {
            return Err(StoreError::rejected(
                "embedder fingerprint has 0 dimensions",
            ));
        }
        check_collection_name(collection)?;
        let url = redact_url(&options.url);
        if !(options.url.starts_with("http://") || options.url.starts_with("https://")) {
            return Err(StoreError::rejected(format!(
                "Qdrant URL {url:?} must start with http:// or https://"
            )));
        }
        let mut builder = Qdrant::from_url(&options.url)
            .timeout(options.timeout)
            .connect_timeout(options.connect_timeout)
            .skip_compatibility_check();
        if let Some(key) = &options.api_key {
            builder.set_api_key(key.expose());
        }
        let client = builder.build().map_err(|e| match e {
            QdrantError::InvalidUri(e) => {
                StoreError::rejected(format!("Qdrant URL {url:?} is not a valid URI: {e}"))
            }
            other => StoreError::rejected(format!(
                "cannot build a Qdrant client for {url}: {}",
                describe(&other)
            )),
        })?;
        let store = QdrantStore {
            client,
            collection: collection.to_owned(),
            dims: fingerprint.dims,
            sparse: fingerprint.sparse.is_some(),
            url,
            retries: options.retries,
            backoff_min: options.backoff_min,
            backoff_max: options.backoff_max.max(options.backoff_min),
            limits: BatchLimits {
                max_points: options.limits.max_points.max(1),
                max_bytes: options.limits.max_bytes.max(1),
            },
            auth_hint: auth_hint(options),
            layout: options.layout,
            server_version: None,
        };
        Ok(store)
    }

    /// Opens the existing collection `collection` as it was created, whatever its recorded
    /// fingerprint (returned with the store), without creating anything: how
    /// `rag-ingest reindex` reads a collection of an older layout.
    ///
    /// Fails with [`StoreError::Rejected`] if the collection does not exist or has no
    /// recorded fingerprint (or on anything [`QdrantStore::open`] refuses),
    /// [`StoreError::Unavailable`] if the server cannot be reached.
    pub async fn open_existing(
        options: &QdrantOptions,
        collection: &str,
    ) -> Result<(Self, Fingerprint), StoreError> {
        // A placeholder until the recorded fingerprint is read; `open_with` creates nothing
        // with `create: false`.
        let placeholder = Fingerprint {
            model: String::new(),
            dims: 1,
            pooling: String::new(),
            normalized: true,
            sparse: None,
        };
        let mut store = Self::connect(options, collection, &placeholder)?;
        store.check_server_version().await?;
        let name = collection.to_owned();
        let exists = store
            .call("check collection", || {
                store.client.collection_exists(name.clone())
            })
            .await?;
        if !exists {
            return Err(StoreError::rejected(format!(
                "collection {collection} does not exist on {}",
                store.url
            )));
        }
        let recorded = store.recorded_fingerprint().await?.ok_or_else(|| {
            StoreError::rejected(format!(
                "collection {collection} has no embedder fingerprint in its metadata (key \
                 {FINGERPRINT_METADATA_KEY}): it was not created by rag-ingest"
            ))
        })?;
        store.dims = recorded.dims;
        store.sparse = recorded.sparse.is_some();
        Ok((store, recorded))
    }

    /// The server's version as its health check reported it when the store was opened
    /// (`None` before that, or where the health check is not routed to the server).
    pub fn server_version(&self) -> Option<&str> {
        self.server_version.as_deref()
    }

    /// Asks the server its version (gRPC health check) and keeps it. A server older than
    /// [`MIN_SERVER_VERSION`] is refused; one older than [`SAFE_SERVER_VERSION`] is accepted
    /// with a warning ([`QdrantServerOutdated`](crate::telemetry::events::QdrantServerOutdated));
    /// a version that does not read as `major.minor[.patch]` (a development build), or no
    /// version because a proxy in front of the server does not route the health check
    /// (`Unimplemented`, `NotFound`), is accepted as it is.
    ///
    /// Fails with [`StoreError::Rejected`] for a server older than [`MIN_SERVER_VERSION`] (or
    /// a refused request), [`StoreError::Unavailable`] if the server cannot be reached.
    async fn check_server_version(&mut self) -> Result<(), StoreError> {
        let reply = match self
            .call_raw("health check", || self.client.health_check())
            .await
        {
            Ok(reply) => reply,
            Err(e)
                if status(&e)
                    .is_some_and(|s| matches!(s.code(), Code::Unimplemented | Code::NotFound)) =>
            {
                return Ok(());
            }
            Err(e) => return Err(self.map_error("health check", &e)),
        };
        let version = reply.version;
        match ServerSupport::of(&version) {
            ServerSupport::Unsupported => {
                return Err(StoreError::rejected(format!(
                    "the Qdrant server at {} is version {version}: rag-ingest needs {}.{} or \
                     later (conditional writes, which let the newest version win, and \
                     collection metadata, which records the embedder), and recommends {}.{} \
                     or later; upgrade the server",
                    self.url,
                    MIN_SERVER_VERSION.0,
                    MIN_SERVER_VERSION.1,
                    SAFE_SERVER_VERSION.0,
                    SAFE_SERVER_VERSION.1
                )));
            }
            ServerSupport::Outdated => {
                crate::telemetry::emit(crate::telemetry::events::QdrantServerOutdated {
                    url: &self.url,
                    version: &version,
                    recommended: SAFE_SERVER_VERSION,
                });
            }
            ServerSupport::Supported | ServerSupport::Unknown => {}
        }
        self.server_version = Some(version);
        Ok(())
    }

    /// The collection this store writes to.
    pub fn collection(&self) -> &str {
        &self.collection
    }

    /// The write caps this store splits upserts by.
    pub fn batch_limits(&self) -> BatchLimits {
        self.limits
    }

    /// The fingerprint recorded in the collection's metadata, `None` if the collection has
    /// none.
    ///
    /// Fails with [`StoreError::Rejected`] if the collection does not exist or the recorded
    /// value is not a fingerprint, [`StoreError::Unavailable`] if the server cannot be reached.
    pub async fn recorded_fingerprint(&self) -> Result<Option<Fingerprint>, StoreError> {
        let info = self.collection_info().await?;
        read_fingerprint(&self.collection, info.config.as_ref())
    }

    /// Up to `limit` points (every tenant, tombstones included) in id order from `from` on:
    /// see [`Store::scroll`](super::Store::scroll).
    ///
    /// Fails with [`StoreError::Rejected`] if a payload is not a [`ChunkPayload`], a point
    /// has no dense vector or no UUID id, [`StoreError::Unavailable`] if the server cannot be
    /// reached.
    pub async fn scroll(
        &self,
        from: Option<uuid::Uuid>,
        limit: usize,
    ) -> Result<super::PointPage, StoreError> {
        let request = ScrollPoints {
            collection_name: self.collection.clone(),
            offset: from.map(uuid_point_id),
            limit: Some(u32::try_from(limit.max(1)).unwrap_or(u32::MAX)),
            with_payload: Some(true.into()),
            with_vectors: Some(true.into()),
            ..ScrollPoints::default()
        };
        let response = self
            .call("scroll points", || self.client.scroll(request.clone()))
            .await?;
        let mut points = Vec::with_capacity(response.result.len());
        for point in response.result {
            let id = describe_point_id(point.id.as_ref());
            let uuid = uuid::Uuid::parse_str(&id)
                .map_err(|_| StoreError::rejected(format!("point {id} does not have a UUID id")))?;
            let payload = decode_payload(&id, point.payload)?;
            let vector = match point.vectors.and_then(|v| v.get_vector_by_name("")) {
                Some(vector_output::Vector::Dense(dense)) => dense.data,
                _ => {
                    return Err(StoreError::rejected(format!(
                        "point {id} has no dense vector"
                    )));
                }
            };
            points.push(super::StoredPoint {
                id: uuid,
                payload,
                vector,
            });
        }
        let next = match response.next_page_offset {
            Some(next) => {
                let id = describe_point_id(Some(&next));
                Some(uuid::Uuid::parse_str(&id).map_err(|_| {
                    StoreError::rejected(format!("point {id} does not have a UUID id"))
                })?)
            }
            None => None,
        };
        Ok(super::PointPage { points, next })
    }

    /// Deletes the whole collection (every tenant's points and the recorded fingerprint).
    /// Meant for tests and tooling; the pipeline never calls it.
    ///
    /// Fails with [`StoreError::Unavailable`] or [`StoreError::Rejected`] like any request.
    pub async fn delete_collection(&self) -> Result<(), StoreError> {
        let name = self.collection.clone();
        self.call("delete collection", || {
            self.client.delete_collection(name.clone())
        })
        .await?;
        Ok(())
    }

    /// Creates the collection if missing, creates missing payload indexes and checks the
    /// recorded fingerprint and vector parameters.
    async fn bootstrap(&self, fingerprint: &Fingerprint) -> Result<(), StoreError> {
        let name = self.collection.clone();
        let exists = self
            .call("check collection", || {
                self.client.collection_exists(name.clone())
            })
            .await?;
        if !exists {
            self.create_collection(fingerprint).await?;
        }

        let info = self.collection_info().await?;
        let config = info.config.as_ref();
        match read_fingerprint(&self.collection, config)? {
            Some(stored) if stored != *fingerprint => {
                return Err(StoreError::mismatch(&self.collection, &stored, fingerprint));
            }
            Some(_) => {}
            None => {
                return Err(StoreError::rejected(format!(
                    "collection {} has no embedder fingerprint in its metadata (key \
                     {FINGERPRINT_METADATA_KEY}): it was not created by rag-ingest, or the \
                     server is older than Qdrant 1.16 and does not keep collection metadata; \
                     use another collection name or upgrade the server",
                    self.collection
                )));
            }
        }
        self.check_vector_params(config, fingerprint)?;
        self.compare_layout(config);

        for (field, is_tenant) in KEYWORD_INDEXES {
            if !info.payload_schema.contains_key(field) {
                let params =
                    payload_index_params::IndexParams::KeywordIndexParams(KeywordIndexParams {
                        is_tenant: Some(is_tenant),
                        ..KeywordIndexParams::default()
                    });
                self.create_index(field, FieldType::Keyword, Some(params))
                    .await?;
            }
        }
        for field in INTEGER_INDEXES {
            if !info.payload_schema.contains_key(field) {
                self.create_index(field, FieldType::Integer, None).await?;
            }
        }
        if !info.payload_schema.contains_key(TOMBSTONE_FIELD) {
            self.create_index(TOMBSTONE_FIELD, FieldType::Bool, None)
                .await?;
        }
        Ok(())
    }

    /// Creates the collection with `fingerprint` in its metadata; a concurrent creation by
    /// someone else (`AlreadyExists`) is not an error.
    async fn create_collection(&self, fingerprint: &Fingerprint) -> Result<(), StoreError> {
        let recorded = serde_json::to_value(fingerprint).map_err(|e| {
            StoreError::rejected(format!("cannot encode the embedder fingerprint: {e}"))
        })?;
        let request = CreateCollection {
            collection_name: self.collection.clone(),
            vectors_config: Some(VectorsConfig {
                config: Some(vectors_config::Config::Params(VectorParams {
                    size: self.dims as u64,
                    distance: Distance::Cosine.into(),
                    ..VectorParams::default()
                })),
            }),
            sparse_vectors_config: self.sparse.then(|| SparseVectorConfig {
                map: HashMap::from([(
                    SPARSE_VECTOR_NAME.to_owned(),
                    SparseVectorParams {
                        modifier: Some(Modifier::Idf.into()),
                        ..SparseVectorParams::default()
                    },
                )]),
            }),
            metadata: HashMap::from([(
                FINGERPRINT_METADATA_KEY.to_owned(),
                QValue::from(recorded),
            )]),
            shard_number: self.layout.shard_number,
            replication_factor: self.layout.replication_factor,
            write_consistency_factor: self.layout.write_consistency_factor,
            ..CreateCollection::default()
        };
        let result = self
            .call_raw("create collection", || {
                self.client.create_collection(request.clone())
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            // Someone else created it meanwhile; the checks that follow decide whether it fits.
            Err(e) if status(&e).is_some_and(|s| s.code() == Code::AlreadyExists) => Ok(()),
            Err(e) => Err(self.map_error("create collection", &e)),
        }
    }

    /// Creates an index of `field_type` on `field` and waits for it.
    async fn create_index(
        &self,
        field: &str,
        field_type: FieldType,
        params: Option<payload_index_params::IndexParams>,
    ) -> Result<(), StoreError> {
        let request = CreateFieldIndexCollection {
            collection_name: self.collection.clone(),
            wait: Some(true),
            field_name: field.to_owned(),
            field_type: Some(field_type.into()),
            field_index_params: params.map(|p| PayloadIndexParams {
                index_params: Some(p),
            }),
            ..CreateFieldIndexCollection::default()
        };
        self.call("create payload index", || {
            self.client.create_field_index(request.clone())
        })
        .await?;
        Ok(())
    }

    /// The collection's description.
    async fn collection_info(&self) -> Result<qdrant_client::qdrant::CollectionInfo, StoreError> {
        let name = self.collection.clone();
        let response = self
            .call("read collection info", || {
                self.client.collection_info(name.clone())
            })
            .await?;
        response.result.ok_or_else(|| {
            StoreError::unavailable(format!(
                "the server returned no description of collection {}",
                self.collection
            ))
        })
    }

    /// Fails with [`StoreError::FingerprintMismatch`] unless the collection has one unnamed
    /// cosine vector of `fingerprint.dims` values.
    fn check_vector_params(
        &self,
        config: Option<&qdrant_client::qdrant::CollectionConfig>,
        fingerprint: &Fingerprint,
    ) -> Result<(), StoreError> {
        let params = config
            .and_then(|c| c.params.as_ref())
            .and_then(|p| p.vectors_config.as_ref())
            .and_then(|v| v.config.as_ref());
        let mismatch = |what: String| StoreError::FingerprintMismatch {
            collection: self.collection.clone(),
            stored: what.clone(),
            expected: fingerprint.id(),
            differs: what,
        };
        match params {
            Some(vectors_config::Config::Params(p)) => {
                if p.size != fingerprint.dims as u64 {
                    return Err(mismatch(format!(
                        "vector size: collection {}, configured {}",
                        p.size, fingerprint.dims
                    )));
                }
                if p.distance != i32::from(Distance::Cosine) {
                    return Err(mismatch(format!(
                        "distance: collection {:?}, configured Cosine",
                        Distance::try_from(p.distance).unwrap_or(Distance::UnknownDistance)
                    )));
                }
            }
            _ => {
                return Err(mismatch(
                    "vectors: the collection has named vectors or none, rag-ingest needs one \
                     unnamed vector"
                        .to_owned(),
                ));
            }
        }
        if self.sparse {
            let sparse = config
                .and_then(|c| c.params.as_ref())
                .and_then(|p| p.sparse_vectors_config.as_ref())
                .and_then(|s| s.map.get(SPARSE_VECTOR_NAME));
            match sparse {
                Some(params) if params.modifier == Some(Modifier::Idf.into()) => {}
                Some(_) => {
                    return Err(mismatch(format!(
                        "sparse vector {SPARSE_VECTOR_NAME:?} has no idf modifier"
                    )));
                }
                None => {
                    return Err(mismatch(format!(
                        "the collection has no sparse vector {SPARSE_VECTOR_NAME:?}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Logs a warning for each layout setting the configuration names that the existing
    /// collection does not have (the collection keeps its own: Qdrant changes replication
    /// only through an explicit collection update).
    fn compare_layout(&self, config: Option<&qdrant_client::qdrant::CollectionConfig>) {
        let Some(params) = config.and_then(|c| c.params.as_ref()) else {
            return;
        };
        let actual = [
            ("shard_number", Some(params.shard_number)),
            ("replication_factor", params.replication_factor),
            ("write_consistency_factor", params.write_consistency_factor),
        ];
        let wanted = [
            self.layout.shard_number,
            self.layout.replication_factor,
            self.layout.write_consistency_factor,
        ];
        for ((setting, actual), wanted) in actual.into_iter().zip(wanted) {
            if let Some(wanted) = wanted
                && actual != Some(wanted)
            {
                crate::telemetry::emit(crate::telemetry::events::CollectionLayoutDiffers {
                    collection: &self.collection,
                    setting,
                    configured: wanted,
                    actual,
                });
            }
        }
    }

    /// The backoff of one request's in-process retries.
    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_jitter()
            .with_min_delay(self.backoff_min)
            .with_max_delay(self.backoff_max)
            .with_max_times(self.retries)
    }

    /// Runs the request `op` with in-process retries on transient failures (see the module
    /// documentation); maps the final error with [`map_error`].
    async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, QdrantError>>,
    {
        self.call_raw(what, op)
            .await
            .map_err(|e| self.map_error(what, &e))
    }

    /// The [`StoreError`] for a failed request `what` (see [`map_error`]); a refused API key
    /// says where the key comes from.
    fn map_error(&self, what: &str, e: &QdrantError) -> StoreError {
        let error = map_error(what, &self.collection, &self.url, e);
        let refused = status(e)
            .is_some_and(|s| matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied));
        match error {
            StoreError::Rejected(mut failure) if refused => {
                failure.reason = format!("{}; {}", failure.reason, self.auth_hint);
                StoreError::Rejected(failure)
            }
            other => other,
        }
    }

    /// Like [`QdrantStore::call`], returning the client's error as it is.
    async fn call_raw<T, F, Fut>(&self, what: &str, op: F) -> Result<T, QdrantError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, QdrantError>>,
    {
        let ceiling = self.backoff_max;
        let collection = &self.collection;
        op.retry(self.backoff())
            .sleep(tokio::time::sleep)
            .when(is_retryable)
            .adjust(|e, delay| match (e, delay) {
                (
                    QdrantError::ResourceExhaustedError {
                        retry_after_seconds,
                        ..
                    },
                    Some(delay),
                ) => {
                    let wanted = Duration::from_secs(*retry_after_seconds);
                    // A longer wait than the ceiling is the queue's job (delayed retry tiers).
                    (wanted <= ceiling).then(|| delay.max(wanted))
                }
                (_, delay) => delay,
            })
            .notify(|e, delay| {
                crate::telemetry::emit(crate::telemetry::events::StoreRetrying {
                    collection,
                    operation: what,
                    error: &describe(e),
                    retry_in: delay,
                });
            })
            .await
    }

    /// `points` checked and encoded, split into requests by [`BatchLimits`] (measured as
    /// encoded protobuf).
    ///
    /// Fails with [`StoreError::Dimension`] if a vector has the wrong length,
    /// [`StoreError::Rejected`] if a vector holds NaN/infinity, a version is above
    /// [`MAX_VERSION`](super::MAX_VERSION), a payload cannot be encoded or one point alone is
    /// above the byte cap.
    fn encode_batches(&self, points: Vec<ChunkPoint>) -> Result<Vec<Vec<PointStruct>>, StoreError> {
        let mut encoded = Vec::with_capacity(points.len());
        for point in points {
            check_vector(self.dims, &point.vector)?;
            check_version(point.payload.version)?;
            let payload = encode_payload(&point.payload)?;
            let vectors = match point.sparse {
                Some(sparse) if self.sparse => {
                    check_sparse(&sparse)?;
                    NamedVectors::default()
                        .add_vector("", point.vector)
                        .add_vector(
                            SPARSE_VECTOR_NAME,
                            qdrant_client::qdrant::Vector::new_sparse(
                                sparse.indices,
                                sparse.values,
                            ),
                        )
                        .into()
                }
                _ => point.vector.into(),
            };
            let point = PointStruct {
                id: Some(uuid_point_id(point.id)),
                payload,
                vectors: Some(vectors),
            };
            let len = prost::Message::encoded_len(&point);
            // Field tag plus length prefix of the repeated `points` entry.
            let size = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
            encoded.push((size, point));
        }
        let overhead = UPSERT_OVERHEAD + self.collection.len();
        Ok(
            split_batches(encoded, overhead, self.limits, |(size, _)| *size)?
                .into_iter()
                .map(|batch| batch.into_iter().map(|(_, point)| point).collect())
                .collect(),
        )
    }

    /// Writes `batches` one after the other with `wait=true` (and `update_filter`, if given).
    ///
    /// Fails with the error of the first request that fails (earlier requests stay written).
    async fn write_batches(
        &self,
        batches: Vec<Vec<PointStruct>>,
        update_filter: Option<Filter>,
    ) -> Result<(), StoreError> {
        for batch in batches {
            let request = UpsertPoints {
                collection_name: self.collection.clone(),
                wait: Some(true),
                points: batch,
                update_filter: update_filter.clone(),
                ..UpsertPoints::default()
            };
            self.call("upsert points", || {
                self.client.upsert_points(request.clone())
            })
            .await?;
        }
        Ok(())
    }

    /// Deletes the points matching `filter` and waits for it.
    async fn delete_by_filter(&self, what: &str, filter: Filter) -> Result<(), StoreError> {
        let request = DeletePoints {
            collection_name: self.collection.clone(),
            wait: Some(true),
            points: Some(PointsSelector::from(filter)),
            ..DeletePoints::default()
        };
        self.call(what, || self.client.delete_points(request.clone()))
            .await?;
        Ok(())
    }
}

impl VectorStore for QdrantStore {
    /// Upserts `points` with `wait=true`, in requests capped by [`BatchLimits`] (measured as
    /// encoded protobuf), one after the other.
    ///
    /// Fails with [`StoreError::Dimension`] if a vector has the wrong length,
    /// [`StoreError::Rejected`] if a vector holds NaN/infinity, a version is above
    /// [`MAX_VERSION`](super::MAX_VERSION), a payload cannot be encoded or one point alone is
    /// above the byte cap (nothing is written in these cases), or the server refuses a request;
    /// [`StoreError::Unavailable`] if the server cannot be reached (earlier requests stay
    /// written).
    async fn upsert(&self, points: Vec<ChunkPoint>) -> Result<(), StoreError> {
        let batches = self.encode_batches(points)?;
        self.write_batches(batches, None).await
    }

    /// Upserts like [`QdrantStore::upsert`] with the server's conditional upsert
    /// (`update_filter` = "the stored point is older than `order`", Qdrant ≥ 1.16): new points
    /// are inserted, existing ones replaced only where the filter holds, checked by the server
    /// as it applies the write.
    ///
    /// Fails like [`QdrantStore::upsert`], and with [`StoreError::Rejected`] if `order` is out
    /// of range or a payload does not carry it.
    async fn upsert_newer(&self, points: Vec<ChunkPoint>, order: Order) -> Result<(), StoreError> {
        check_points_order(&points, order)?;
        let batches = self.encode_batches(points)?;
        self.write_batches(batches, Some(older_filter(order))).await
    }

    /// Deletes (with `wait=true`) by the filter `tenant_id == tenant AND document_id ==
    /// document_id AND (order older than `order`)`.
    ///
    /// Fails with [`StoreError::Rejected`] if `order` is out of range or the server refuses
    /// the request, [`StoreError::Unavailable`] if it cannot be reached.
    async fn delete_older(
        &self,
        tenant: &TenantId,
        document_id: &str,
        order: Order,
    ) -> Result<(), StoreError> {
        order.check()?;
        let mut filter = scope_filter(tenant, Some(document_id));
        filter.must.push(Condition::from(older_filter(order)));
        self.delete_by_filter("delete older points", filter).await
    }

    /// Retrieves point [`point_id`]`(tenant, document_id, 0)`.
    ///
    /// Fails with [`StoreError::Rejected`] if its payload is not a [`ChunkPayload`] or belongs
    /// to another tenant or document (never returned), [`StoreError::Unavailable`] if the read
    /// fails.
    async fn first_chunk(
        &self,
        tenant: &TenantId,
        document_id: &str,
    ) -> Result<Option<ChunkPayload>, StoreError> {
        let id = point_id(tenant, document_id, 0);
        let request = GetPoints {
            collection_name: self.collection.clone(),
            ids: vec![uuid_point_id(id)],
            with_payload: Some(true.into()),
            with_vectors: Some(false.into()),
            ..GetPoints::default()
        };
        let response = self
            .call("retrieve point", || self.client.get_points(request.clone()))
            .await?;
        let Some(point) = response.result.into_iter().next() else {
            return Ok(None);
        };
        let payload = decode_payload(&id.to_string(), point.payload)?;
        check_owner(&payload, tenant.as_str(), document_id, &id)?;
        Ok(Some(payload))
    }

    /// Retrieves points [`point_id`]`(tenant, document_id, i)` for `i` in `0..chunk_count`
    /// with payloads and vectors, [`RETRIEVE_BATCH`] ids per request.
    ///
    /// Fails with [`StoreError::Rejected`] if a payload is not a [`ChunkPayload`] of that
    /// tenant and document or a point has no dense vector, [`StoreError::Unavailable`] if the
    /// server cannot be reached.
    async fn chunk_vectors(
        &self,
        tenant: &TenantId,
        document_id: &str,
        chunk_count: usize,
    ) -> Result<Vec<StoredChunk>, StoreError> {
        let ids: Vec<_> = (0..chunk_count)
            .map(|index| point_id(tenant, document_id, index))
            .collect();
        let mut chunks = Vec::with_capacity(chunk_count);
        for batch in ids.chunks(RETRIEVE_BATCH) {
            let request = GetPoints {
                collection_name: self.collection.clone(),
                ids: batch.iter().copied().map(uuid_point_id).collect(),
                with_payload: Some(true.into()),
                with_vectors: Some(true.into()),
                ..GetPoints::default()
            };
            let response = self
                .call("retrieve points", || {
                    self.client.get_points(request.clone())
                })
                .await?;
            for point in response.result {
                let id = describe_point_id(point.id.as_ref());
                let payload = decode_payload(&id, point.payload)?;
                check_owner(&payload, tenant.as_str(), document_id, &id)?;
                if payload.tombstone {
                    continue;
                }
                let vector = match point.vectors.and_then(|v| v.get_vector_by_name("")) {
                    Some(vector_output::Vector::Dense(dense)) => dense.data,
                    _ => {
                        return Err(StoreError::rejected(format!(
                            "point {id} has no dense vector"
                        )));
                    }
                };
                chunks.push(StoredChunk { payload, vector });
            }
        }
        chunks.sort_by_key(|chunk| chunk.payload.chunk_index);
        Ok(chunks)
    }

    /// Deletes (with `wait=true`) by the filter `tenant_id == tenant AND document_id ==
    /// document_id AND NOT (the point belongs to keep)`.
    ///
    /// Fails with [`StoreError::Rejected`] if `keep.version` is above
    /// [`MAX_VERSION`](super::MAX_VERSION) or the server refuses the request,
    /// [`StoreError::Unavailable`] if it cannot be reached.
    async fn delete_document(
        &self,
        tenant: &TenantId,
        document_id: &str,
        keep: Option<&Revision>,
    ) -> Result<(), StoreError> {
        let mut filter = scope_filter(tenant, Some(document_id));
        if let Some(keep) = keep {
            filter.must_not = vec![Condition::from(revision_filter(keep, true)?)];
        }
        self.delete_by_filter("delete document", filter).await
    }

    /// Sets the payload keys `version`, `metadata` and `order` (with `wait=true`) on the points
    /// matching `tenant_id == tenant AND document_id == document_id AND content_sha256 ==
    /// revision.content_sha256 AND chunk_count == revision.chunk_count AND (order older than
    /// `order`)`. A `None` version
    /// removes the key (read back as `None`).
    ///
    /// Fails with [`StoreError::Rejected`] if `version` is above
    /// [`MAX_VERSION`](super::MAX_VERSION) or the server refuses the request,
    /// [`StoreError::Unavailable`] if it cannot be reached.
    async fn relabel_document(
        &self,
        tenant: &TenantId,
        document_id: &str,
        revision: &Revision,
        version: Option<u64>,
        metadata: &serde_json::Map<String, serde_json::Value>,
        order: Order,
    ) -> Result<(), StoreError> {
        check_version(version)?;
        order.check()?;
        let mut filter = scope_filter(tenant, Some(document_id));
        filter
            .must
            .push(Condition::from(revision_filter(revision, false)?));
        filter.must.push(Condition::from(older_filter(order)));
        let order = serde_json::to_value(order)
            .map_err(|e| StoreError::rejected(format!("cannot encode write order: {e}")))?;
        let payload = HashMap::from([
            (
                "version".to_owned(),
                QValue::from(serde_json::json!(version)),
            ),
            (
                "metadata".to_owned(),
                QValue::from(serde_json::Value::Object(metadata.clone())),
            ),
            (ORDER_FIELD.to_owned(), QValue::from(order)),
        ]);
        let request = SetPayloadPoints {
            collection_name: self.collection.clone(),
            wait: Some(true),
            payload,
            points_selector: Some(PointsSelector::from(filter)),
            ..SetPayloadPoints::default()
        };
        self.call("set payload", || self.client.set_payload(request.clone()))
            .await?;
        Ok(())
    }

    /// Deletes (with `wait=true`) by the filter `tenant_id == tenant`.
    ///
    /// Fails with [`StoreError::Rejected`] if the server refuses the request,
    /// [`StoreError::Unavailable`] if it cannot be reached.
    async fn purge_tenant(&self, tenant: &TenantId) -> Result<(), StoreError> {
        self.delete_by_filter("purge tenant", scope_filter(tenant, None))
            .await
    }

    /// Universal query (nearest) restricted to `tenant_id == request.tenant` and the metadata
    /// conditions, with the score threshold, with payloads.
    ///
    /// Fails with [`StoreError::Dimension`] if the vector has the wrong length,
    /// [`StoreError::Rejected`] if it holds NaN/infinity, the request is invalid (see
    /// [`SearchRequest::validate`]), a hit's payload is not a [`ChunkPayload`] of the tenant or
    /// the server refuses the query, [`StoreError::Unavailable`] if it cannot be reached.
    async fn search(&self, request: SearchRequest) -> Result<Vec<ScoredChunk>, StoreError> {
        if request.mode.uses_dense() {
            check_vector(self.dims, &request.vector)?;
        }
        request.validate()?;
        if request.mode.uses_sparse() && !self.sparse {
            return Err(no_sparse_vectors(&self.collection));
        }
        if request.top_k == 0 {
            return Ok(Vec::new());
        }
        let mut filter = scope_filter(&request.tenant, None);
        for (key, value) in &request.filter.metadata {
            filter.must.push(metadata_match(key, value)?);
        }
        filter.must_not.push(tombstone_condition());
        let dense = VectorInput::new_dense(request.vector);
        let sparse = request
            .sparse
            .map(|s| VectorInput::new_sparse(s.indices, s.values));
        let query =
            |query: Query, using: Option<&str>, limit: usize, with_payload: bool| QueryPoints {
                collection_name: self.collection.clone(),
                query: Some(query),
                using: using.map(str::to_owned),
                filter: Some(filter.clone()),
                score_threshold: request.min_score.filter(|_| with_payload),
                limit: Some(limit as u64),
                with_payload: Some(with_payload.into()),
                with_vectors: Some(false.into()),
                ..QueryPoints::default()
            };
        let tenant = request.tenant.as_str();
        let min_score = request.min_score;
        let top_k = request.top_k;
        let (mode, sparse) = match (request.mode, sparse) {
            (SearchMode::Dense, _) => (SearchMode::Dense, None),
            (mode, Some(sparse)) => (mode, Some(sparse)),
            (_, None) => {
                return Err(StoreError::rejected(
                    "a keyword search needs a sparse vector",
                ));
            }
        };
        match (mode, sparse) {
            (SearchMode::Sparse, Some(sparse)) => {
                let request = query(
                    Query::new_nearest(sparse),
                    Some(SPARSE_VECTOR_NAME),
                    top_k,
                    true,
                );
                let response = self
                    .call("query points", || self.client.query(request.clone()))
                    .await?;
                ranked(response.result, tenant, min_score, |rank| BranchRanks {
                    dense: None,
                    sparse: Some(rank),
                })
            }
            (SearchMode::Hybrid, Some(sparse)) => {
                let candidates = hybrid_candidates(top_k);
                let branch = |query: Query, using: Option<&str>| PrefetchQuery {
                    query: Some(query),
                    using: using.map(str::to_owned),
                    filter: Some(filter.clone()),
                    limit: Some(candidates as u64),
                    ..PrefetchQuery::default()
                };
                let fused = QueryPoints {
                    prefetch: vec![
                        branch(Query::new_nearest(dense.clone()), None),
                        branch(Query::new_nearest(sparse.clone()), Some(SPARSE_VECTOR_NAME)),
                    ],
                    ..query(
                        match request.fusion {
                            super::Fusion::Rrf { k } => Query::new_rrf(Rrf {
                                k: Some(k),
                                weights: Vec::new(),
                            }),
                            super::Fusion::Dbsf => {
                                Query::new_fusion(qdrant_client::qdrant::Fusion::Dbsf)
                            }
                        },
                        None,
                        top_k,
                        true,
                    )
                };
                // One round trip: the fused result, and each branch's candidates (ids only)
                // to report every hit's rank per branch.
                let batch = QueryBatchPoints {
                    collection_name: self.collection.clone(),
                    query_points: vec![
                        fused,
                        query(Query::new_nearest(dense), None, candidates, false),
                        query(
                            Query::new_nearest(sparse),
                            Some(SPARSE_VECTOR_NAME),
                            candidates,
                            false,
                        ),
                    ],
                    ..QueryBatchPoints::default()
                };
                let response = self
                    .call("query points", || self.client.query_batch(batch.clone()))
                    .await?;
                let mut results = response.result.into_iter().map(|batch| batch.result);
                let (Some(fused), Some(dense), Some(sparse)) =
                    (results.next(), results.next(), results.next())
                else {
                    return Err(StoreError::unavailable(
                        "the server answered a hybrid query batch with fewer than 3 results",
                    ));
                };
                let ids = |hits: Vec<ScoredPoint>| -> Vec<String> {
                    hits.iter()
                        .map(|hit| describe_point_id(hit.id.as_ref()))
                        .collect()
                };
                let (dense, sparse) = (ids(dense), ids(sparse));
                let mut hits = Vec::with_capacity(fused.len());
                for hit in fused {
                    if min_score.is_some_and(|min| hit.score < min) {
                        continue;
                    }
                    let id = describe_point_id(hit.id.as_ref());
                    hits.push((id, scored(hit, tenant)?));
                }
                assign_ranks(&mut hits, &dense, &sparse);
                Ok(hits.into_iter().map(|(_, hit)| hit).collect())
            }
            _ => {
                let request = query(Query::new_nearest(dense), None, top_k, true);
                let response = self
                    .call("query points", || self.client.query(request.clone()))
                    .await?;
                ranked(response.result, tenant, min_score, |rank| BranchRanks {
                    dense: Some(rank),
                    sparse: None,
                })
            }
        }
    }

    /// Exact count with the filter `tenant_id == tenant` (and `document_id == document_id`),
    /// tombstones left out.
    ///
    /// Fails with [`StoreError::Rejected`] if the server refuses the request,
    /// [`StoreError::Unavailable`] if it cannot be reached.
    async fn count(
        &self,
        tenant: &TenantId,
        document_id: Option<&str>,
    ) -> Result<usize, StoreError> {
        let mut filter = scope_filter(tenant, document_id);
        filter.must_not.push(tombstone_condition());
        let request = CountPoints {
            collection_name: self.collection.clone(),
            filter: Some(filter),
            exact: Some(true),
            ..CountPoints::default()
        };
        let response = self
            .call("count points", || self.client.count(request.clone()))
            .await?;
        let count = response.result.map(|r| r.count).unwrap_or(0);
        usize::try_from(count).map_err(|_| {
            StoreError::rejected(format!("the server counted {count} points, too many"))
        })
    }
}

/// Fails with [`StoreError::Rejected`] unless `name` is 1 to 255 characters of
/// `[A-Za-z0-9_.-]` (and not `.` or `..`).
fn check_collection_name(name: &str) -> Result<(), StoreError> {
    let plain = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if plain {
        Ok(())
    } else {
        Err(StoreError::rejected(format!(
            "collection name {name:?} may only contain letters, digits, '_', '.' and '-' (1 to \
             255 characters, not '.' or '..')"
        )))
    }
}

/// The fingerprint recorded in `config`'s metadata, `None` if there is none.
fn read_fingerprint(
    collection: &str,
    config: Option<&qdrant_client::qdrant::CollectionConfig>,
) -> Result<Option<Fingerprint>, StoreError> {
    let Some(value) = config.and_then(|c| c.metadata.get(FINGERPRINT_METADATA_KEY)) else {
        return Ok(None);
    };
    serde_json::from_value(value.clone().into_json())
        .map(Some)
        .map_err(|e| {
            StoreError::rejected(format!(
                "collection {collection} records an invalid embedder fingerprint under \
                 {FINGERPRINT_METADATA_KEY}: {e}"
            ))
        })
}

/// A UUID point id.
/// A search hit as a [`ScoredChunk`] (ranks unset).
///
/// Fails with [`StoreError::Rejected`] if its payload is not a [`ChunkPayload`] of `tenant`.
fn scored(hit: ScoredPoint, tenant: &str) -> Result<ScoredChunk, StoreError> {
    let id = describe_point_id(hit.id.as_ref());
    let payload = decode_payload(&id, hit.payload)?;
    if payload.tenant_id != tenant {
        return Err(StoreError::rejected(format!(
            "search for tenant {tenant} matched point {id} of another tenant"
        )));
    }
    Ok(ScoredChunk {
        score: hit.score,
        ranks: BranchRanks::default(),
        payload,
    })
}

/// The hits of a one-branch search, best first, with `ranks(rank)` (rank counting from 1);
/// hits under `min_score` are left out.
///
/// Fails like [`scored`].
fn ranked(
    hits: Vec<ScoredPoint>,
    tenant: &str,
    min_score: Option<f32>,
    ranks: impl Fn(usize) -> BranchRanks,
) -> Result<Vec<ScoredChunk>, StoreError> {
    let mut chunks = Vec::with_capacity(hits.len());
    for hit in hits {
        if min_score.is_some_and(|min| hit.score < min) {
            continue;
        }
        let mut chunk = scored(hit, tenant)?;
        chunk.ranks = ranks(chunks.len() + 1);
        chunks.push(chunk);
    }
    Ok(chunks)
}

fn uuid_point_id(id: uuid::Uuid) -> PointId {
    PointId {
        point_id_options: Some(PointIdOptions::Uuid(id.to_string())),
    }
}

/// A point id for messages.
fn describe_point_id(id: Option<&PointId>) -> String {
    match id.and_then(|id| id.point_id_options.as_ref()) {
        Some(PointIdOptions::Uuid(uuid)) => uuid.clone(),
        Some(PointIdOptions::Num(n)) => n.to_string(),
        None => "<no id>".to_owned(),
    }
}

/// The filter `tenant_id == tenant` (AND `document_id == document_id` when given).
fn scope_filter(tenant: &TenantId, document_id: Option<&str>) -> Filter {
    let mut must = vec![keyword_match("tenant_id", tenant.as_str())];
    if let Some(document_id) = document_id {
        must.push(keyword_match("document_id", document_id));
    }
    Filter {
        must,
        ..Filter::default()
    }
}

/// The filter "belongs to `revision`": same content hash and chunk count, and (when
/// `with_version`) the same version, or no version when `revision.version` is `None`.
fn revision_filter(revision: &Revision, with_version: bool) -> Result<Filter, StoreError> {
    check_version(revision.version)?;
    let chunk_count = i64::try_from(revision.chunk_count)
        .map_err(|_| StoreError::rejected("chunk_count is too large to compare in a filter"))?;
    let mut must = vec![
        keyword_match("content_sha256", &revision.content_sha256),
        Condition::matches("chunk_count", MatchValue::Integer(chunk_count)),
    ];
    if with_version {
        must.push(match revision.version {
            // check_version above guarantees the conversion.
            Some(v) => Condition::matches(
                "version",
                MatchValue::Integer(i64::try_from(v).unwrap_or(i64::MAX)),
            ),
            None => Condition::is_empty("version"),
        });
    }
    Ok(Filter {
        must,
        ..Filter::default()
    })
}

/// The filter "the point's order is older than `order`" (see [`Order::older_terms`]; every
/// number compared is below 2^53, so exact as the double the server compares).
fn older_filter(order: Order) -> Filter {
    let should = order
        .older_terms()
        .into_iter()
        .map(|conjunction| {
            let must = conjunction
                .into_iter()
                .map(|term| match term {
                    OrderTerm::Less(field, value) => Condition::range(
                        field,
                        Range {
                            lt: Some(value as f64),
                            ..Range::default()
                        },
                    ),
                    // Below 2^53, so the conversion cannot fail.
                    OrderTerm::Equal(field, value) => Condition::matches(
                        field,
                        MatchValue::Integer(i64::try_from(value).unwrap_or(i64::MAX)),
                    ),
                    OrderTerm::Missing => Condition::is_empty(ORDER_FIELD),
                })
                .collect();
            Condition::from(Filter {
                must,
                ..Filter::default()
            })
        })
        .collect();
    Filter {
        should,
        ..Filter::default()
    }
}

/// The condition "is a tombstone" (for `must_not`).
fn tombstone_condition() -> Condition {
    Condition::matches(TOMBSTONE_FIELD, MatchValue::Boolean(true))
}

/// The condition `field == value` on a keyword field (exact, never tokenised).
fn keyword_match(field: &str, value: &str) -> Condition {
    Condition::matches(field, MatchValue::Keyword(value.to_owned()))
}

/// The condition `metadata.<key> == value`.
fn metadata_match(key: &str, value: &MetadataValue) -> Result<Condition, StoreError> {
    super::validate_metadata_key(key).map_err(StoreError::rejected)?;
    let value = match value {
        MetadataValue::String(s) => MatchValue::Keyword(s.clone()),
        MetadataValue::Integer(i) => MatchValue::Integer(*i),
        MetadataValue::Bool(b) => MatchValue::Boolean(*b),
    };
    Ok(Condition::matches(format!("metadata.{key}"), value))
}

/// `payload` as a point payload (its fields at the top level).
fn encode_payload(payload: &ChunkPayload) -> Result<HashMap<String, QValue>, StoreError> {
    match serde_json::to_value(payload) {
        Ok(serde_json::Value::Object(map)) => Ok(map
            .into_iter()
            .map(|(key, value)| (key, QValue::from(value)))
            .collect()),
        Ok(other) => Err(StoreError::rejected(format!(
            "chunk payload encoded to a JSON {other} instead of an object"
        ))),
        Err(e) => Err(StoreError::rejected(format!(
            "cannot encode chunk payload: {e}"
        ))),
    }
}

/// The [`ChunkPayload`] stored in point `id`; [`StoreError::Rejected`] if it does not
/// deserialize.
fn decode_payload(id: &str, payload: HashMap<String, QValue>) -> Result<ChunkPayload, StoreError> {
    if payload.is_empty() {
        return Err(StoreError::rejected(format!("point {id} has no payload")));
    }
    let map: serde_json::Map<String, serde_json::Value> = payload
        .into_iter()
        .map(|(key, value)| (key, value.into_json()))
        .collect();
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| {
        StoreError::rejected(format!(
            "point {id} does not hold a rag-ingest chunk payload: {e}"
        ))
    })
}

/// The gRPC status of `e`, if it came from the server (or the transport).
fn status(e: &QdrantError) -> Option<&tonic::Status> {
    match e {
        QdrantError::ResponseError { status }
        | QdrantError::ResourceExhaustedError { status, .. } => Some(status),
        _ => None,
    }
}

/// `qdrant-client` reports a failed connection attempt as `Internal` with this prefix.
fn is_connect_failure(status: &tonic::Status) -> bool {
    status.code() == Code::Internal && status.message().starts_with("Failed to connect")
}

/// Whether `e` is worth retrying in process: `Unavailable`, `DeadlineExceeded`,
/// `ResourceExhausted`, `Aborted`, or a failed connection attempt.
pub(crate) fn is_retryable(e: &QdrantError) -> bool {
    status(e).is_some_and(|s| {
        matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted
        ) || is_connect_failure(s)
    })
}

/// A description of `e` without request or response metadata (never holds the API key).
fn describe(e: &QdrantError) -> String {
    match status(e) {
        Some(s) => format!("{:?}: {}", s.code(), s.message()),
        None => match e {
            QdrantError::ConversionError(m) => format!("conversion error: {m}"),
            QdrantError::InvalidUri(e) => format!("invalid URI: {e}"),
            QdrantError::Io(e) => format!("I/O error: {e}"),
            // The remaining variants carry no request data (no metadata, no key).
            other => other.to_string(),
        },
    }
}

/// What to tell a user whose credentials the server refuses, given where the key came from.
fn auth_hint(options: &QdrantOptions) -> String {
    match (&options.api_key_env, &options.api_key) {
        (Some(var), Some(_)) => format!(
            "the server refused the API key read from the environment variable {var} \
             (store.qdrant.api_key_env): set {var} to this server's key \
             (service.api_key / QDRANT__SERVICE__API_KEY)"
        ),
        (Some(var), None) => format!(
            "the server requires an API key, but the environment variable {var} \
             (store.qdrant.api_key_env) is not set"
        ),
        (None, Some(_)) => "the server refused the API key".to_owned(),
        (None, None) => "the server requires an API key: set store.qdrant.api_key_env to the \
                         name of an environment variable holding it"
            .to_owned(),
    }
}

/// The [`StoreError`] for a failed request `what` (see the module documentation): the
/// operation, the collection and the server's error (without its metadata, see [`sanitized`])
/// as the source.
fn map_error(what: &str, collection: &str, url: &str, e: &QdrantError) -> StoreError {
    let failure = StoreFailure::caused_by(
        what,
        collection,
        format!("{} (Qdrant at {url})", describe(e)),
        sanitized(e),
    );
    let transient = match status(e) {
        Some(s) => {
            is_retryable(e)
                || matches!(
                    s.code(),
                    Code::Internal | Code::Unknown | Code::Cancelled | Code::DataLoss
                )
        }
        None => matches!(e, QdrantError::Io(_)),
    };
    if transient {
        StoreError::Unavailable(failure)
    } else {
        StoreError::Rejected(failure)
    }
}

/// The client's error to keep as a [`StoreFailure`]'s source: a gRPC status is rebuilt from
/// its code and message only (its metadata could echo request headers such as the API key),
/// any other error is described by its message (the remaining variants carry no request
/// data).
fn sanitized(e: &QdrantError) -> BoxError {
    match e {
        QdrantError::ResponseError { status } => Box::new(QdrantError::ResponseError {
            status: tonic::Status::new(status.code(), status.message()),
        }),
        QdrantError::ResourceExhaustedError {
            status,
            retry_after_seconds,
        } => Box::new(QdrantError::ResourceExhaustedError {
            status: tonic::Status::new(status.code(), status.message()),
            retry_after_seconds: *retry_after_seconds,
        }),
        other => describe(other).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_are_classified_by_major_and_minor() {
        for (version, support) in [
            ("1.19.0", ServerSupport::Supported),
            ("v1.19.3", ServerSupport::Supported),
            ("1.20.0-rc.1", ServerSupport::Supported),
            ("2.0.0", ServerSupport::Supported),
            (" 1.18.2 ", ServerSupport::Outdated),
            ("1.16", ServerSupport::Outdated),
            ("1.15.5", ServerSupport::Unsupported),
            ("0.99.0", ServerSupport::Unsupported),
            ("dev", ServerSupport::Unknown),
            ("", ServerSupport::Unknown),
            ("1", ServerSupport::Unknown),
            ("1.x", ServerSupport::Unknown),
            ("99999999999999999999999.1", ServerSupport::Unknown),
        ] {
            assert_eq!(ServerSupport::of(version), support, "{version:?}");
        }
    }

    fn response(code: Code, message: &str) -> QdrantError {
        QdrantError::ResponseError {
            status: tonic::Status::new(code, message),
        }
    }

    #[test]
    fn only_transient_codes_are_retried() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
        ] {
            assert!(is_retryable(&response(code, "x")), "{code:?}");
        }
        assert!(is_retryable(&response(
            Code::Internal,
            "Failed to connect to http://127.0.0.1:1/: refused"
        )));
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::FailedPrecondition,
            Code::Internal,
            Code::Unknown,
        ] {
            assert!(!is_retryable(&response(code, "x")), "{code:?}");
        }
        assert!(!is_retryable(&QdrantError::ConversionError("x".into())));
    }

    #[test]
    fn errors_map_to_unavailable_or_rejected() {
        let unavailable = [
            response(Code::Unavailable, "down"),
            response(Code::Internal, "disk"),
            response(Code::DeadlineExceeded, "slow"),
        ];
        for e in &unavailable {
            assert!(
                matches!(map_error("op", "c", "u", e), StoreError::Unavailable(_)),
                "{e}"
            );
        }
        let rejected = [
            response(Code::InvalidArgument, "bad"),
            response(Code::NotFound, "no collection"),
            response(Code::Unauthenticated, "key"),
        ];
        for e in &rejected {
            assert!(
                matches!(map_error("op", "c", "u", e), StoreError::Rejected(_)),
                "{e}"
            );
        }
    }

    #[test]
    fn error_messages_leave_out_metadata() {
        let mut status = tonic::Status::new(Code::Unauthenticated, "Invalid api-key");
        status
            .metadata_mut()
            .insert("api-key", "s3cr3t-key".parse().expect("ascii"));
        let e = QdrantError::ResponseError { status };
        let text = map_error("upsert points", "docs", "http://h:6334", &e).to_string();
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("Unauthenticated"), "{text}");
        assert!(text.contains("docs"), "{text}");
    }

    #[test]
    fn errors_keep_the_operation_collection_and_cause_without_metadata() {
        use std::error::Error as _;
        let mut answer = tonic::Status::new(Code::Unavailable, "down");
        answer
            .metadata_mut()
            .insert("api-key", "s3cr3t-key".parse().expect("ascii"));
        let e = QdrantError::ResponseError { status: answer };
        let error = map_error("upsert points", "docs", "http://h:6334", &e);
        let StoreError::Unavailable(failure) = &error else {
            panic!("expected Unavailable, got {error:?}");
        };
        assert_eq!(failure.operation, "upsert points");
        assert_eq!(failure.collection, "docs");
        let cause = error
            .source()
            .and_then(|f| f.source())
            .expect("the server's error is kept");
        let kept = cause
            .downcast_ref::<QdrantError>()
            .and_then(status)
            .expect("a gRPC status");
        assert_eq!(kept.code(), Code::Unavailable);
        assert!(kept.metadata().is_empty());
        assert!(!cause.to_string().contains("s3cr3t"), "{cause}");
    }

    #[test]
    fn options_debug_hides_the_api_key() {
        let mut options = QdrantOptions::new("http://127.0.0.1:6334");
        options.api_key = Some(Secret::new("s3cr3t-key"));
        let text = format!("{options:?}");
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("***"), "{text}");
    }

    #[test]
    fn filters_use_exact_keyword_matches() {
        let tenant = TenantId::new("acme").expect("tenant");
        let filter = scope_filter(&tenant, Some("a doc with spaces"));
        let text = format!("{filter:?}");
        assert!(text.contains("Keyword(\"a doc with spaces\")"), "{text}");
        assert!(!text.contains("Text("), "{text}");
    }

    #[test]
    fn collection_names_are_checked() {
        assert!(check_collection_name("docs-1.v2_x").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(256)] {
            assert!(check_collection_name(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable_not_rejected() {
        // Port 9 (discard) on localhost: nothing listens, the connection is refused at once.
        let mut options = QdrantOptions::new("http://127.0.0.1:9");
        options.retries = 1;
        options.backoff_min = Duration::from_millis(1);
        options.backoff_max = Duration::from_millis(2);
        options.connect_timeout = Duration::from_millis(500);
        options.api_key = Some(Secret::new("s3cr3t-key"));
        let fingerprint = Fingerprint {
            model: "m".into(),
            dims: 4,
            pooling: "mean".into(),
            normalized: true,
            sparse: None,
        };
        let err = QdrantStore::open(&options, "c", &fingerprint)
            .await
            .expect_err("nothing listens on port 9");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }

    #[tokio::test]
    async fn bad_urls_and_names_are_rejected_before_connecting() {
        let fingerprint = Fingerprint {
            model: "m".into(),
            dims: 4,
            pooling: "mean".into(),
            normalized: true,
            sparse: None,
        };
        let options = QdrantOptions::new("127.0.0.1:6334");
        assert!(matches!(
            QdrantStore::open(&options, "c", &fingerprint).await,
            Err(StoreError::Rejected(_))
        ));
        let options = QdrantOptions::new("http://127.0.0.1:6334");
        assert!(matches!(
            QdrantStore::open(&options, "a/b", &fingerprint).await,
            Err(StoreError::Rejected(_))
        ));
    }
}
