//! [`EdgeStore`]: the [`VectorStore`] backed by an embedded Qdrant Edge shard (`qdrant-edge` 0.7.0).
//!
//! Facts about `qdrant-edge` 0.7.0 this module relies on (read from its source):
//! - Every `EdgeShard` call is synchronous and may do disk I/O, so each one runs on the
//!   blocking pool via [`tokio::task::spawn_blocking`].
//! - `EdgeShard::update` appends the operation to the WAL (an mmap that is *not* synced;
//!   `SerdeWal::write` documents that it does not guarantee durability) and applies it to the
//!   segments, so the change is visible to reads as soon as `update` returns. `EdgeShard::load`
//!   never replays the WAL: only flushed segments survive a crash. A write is therefore durable
//!   only after `EdgeShard::flush` (WAL flush + synchronous, forced flush of every segment),
//!   which this store calls after every write.
//! - `EdgeShard::flush` (also run by `EdgeShard`'s `Drop`) panics instead of returning an error:
//!   on I/O failure, and when the WAL or segment-holder lock is contended (`try_lock().expect`).
//!   All writes, flushes and optimizations are therefore serialised by one mutex (reads take
//!   only shared locks and may run concurrently); a panic is caught by `spawn_blocking` and
//!   reported as [`StoreError::Unavailable`].
//! - The WAL directory is locked exclusively while a shard is open: a second [`EdgeStore`] on
//!   the same collection fails to open until the first one is dropped.
//! - Filters work on unindexed payload fields too (the plain segment checks payloads); the
//!   keyword indexes only make them faster. `EdgeShard::optimize` builds the HNSW index (new
//!   segments inherit the payload indexes); until then searches are exact brute-force scans.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use qdrant_edge::{
    Condition, CountRequest, CreateIndex, DEFAULT_VECTOR_NAME, Distance, EdgeConfig, EdgeShard,
    EdgeVectorParams, FieldCondition, FieldIndexOperations, Filter, JsonPath, KeywordIndexParams,
    Match, NamedQuery, OperationError, Payload, PayloadFieldSchema, PayloadSchemaParams, PointId,
    PointInsertOperations, PointOperations, PointStructPersisted, QueryEnum, QueryRequest,
    ScoringQuery, UpdateOperation, ValueVariants, VectorStructPersisted, WithPayloadInterface,
    WithVector,
};
use tokio::runtime::{Handle, RuntimeFlavor};

use super::{ChunkPayload, ChunkPoint, ScoredChunk, StoreError, VectorStore, point_id};
use crate::embed::Fingerprint;
use crate::tenant::TenantId;

/// Name of the sidecar file (inside the collection directory) recording the [`Fingerprint`].
const FINGERPRINT_FILE: &str = "rag-ingest.json";
/// Temporary name the sidecar is written under before being renamed into place.
const FINGERPRINT_TMP_FILE: &str = "rag-ingest.json.tmp";

/// Payload fields with a keyword index, and whether each is the tenant key.
const KEYWORD_INDEXES: [(&str, bool); 3] = [
    ("tenant_id", true),
    ("document_id", false),
    ("content_sha256", false),
];

/// A [`VectorStore`] kept in an embedded Qdrant Edge shard under `data_dir/<collection>/`.
///
/// Cosine distance, one unnamed dense vector of `fingerprint.dims` values per point, the
/// [`ChunkPayload`] fields at the top level of the point payload. Every write is flushed to
/// disk before the call returns. Dropping the store flushes the shard once more; on a
/// multi-threaded Tokio runtime that final flush runs under
/// [`tokio::task::block_in_place`], elsewhere it blocks the dropping thread.
pub struct EdgeStore {
    collection: String,
    dims: usize,
    /// Always `Some` until [`Drop`] takes it.
    shared: Option<Arc<Shared>>,
}

/// The shard and the lock serialising its writes (see the module documentation).
struct Shared {
    shard: EdgeShard,
    writes: Mutex<()>,
}

impl Shared {
    /// Applies `operation` and flushes the shard so the change is durable; fails with
    /// [`StoreError::Rejected`] or [`StoreError::Unavailable`] as mapped by [`map_op_err`]
    /// (a failed flush panics inside qdrant-edge and surfaces as `Unavailable`).
    fn write(&self, operation: UpdateOperation) -> Result<(), StoreError> {
        // A poisoned lock only means an earlier flush panicked; the shard holds no state
        // guarded by this mutex, so carrying on is safe.
        let _guard = self.writes.lock().unwrap_or_else(PoisonError::into_inner);
        self.shard.update(operation).map_err(map_op_err)?;
        self.shard.flush();
        Ok(())
    }
}

impl EdgeStore {
    /// Opens the collection `collection` under `data_dir` (the shard lives in
    /// `data_dir/<collection>/`), creating it if missing: cosine distance, dimension
    /// `fingerprint.dims`, keyword payload indexes on `tenant_id` (the tenant key),
    /// `document_id` and `content_sha256`. A new collection records `fingerprint` in
    /// `data_dir/<collection>/rag-ingest.json` before the shard is created.
    ///
    /// Blocks on disk I/O: call it before serving or from a blocking context.
    ///
    /// Fails with [`StoreError::FingerprintMismatch`] if the collection was created with another
    /// fingerprint; [`StoreError::Rejected`] if `collection` is not a plain directory name
    /// (`[A-Za-z0-9_.-]`, not `.`/`..`), `fingerprint.dims` is 0, the sidecar cannot be parsed,
    /// or the directory holds data that is not a rag-ingest collection; and
    /// [`StoreError::Unavailable`] on I/O errors or if the shard cannot be loaded (for instance
    /// because another store has it open).
    pub fn open(
        data_dir: &Path,
        collection: &str,
        fingerprint: &Fingerprint,
    ) -> Result<Self, StoreError> {
        if fingerprint.dims == 0 {
            return Err(StoreError::Rejected(
                "embedder fingerprint has 0 dimensions".to_owned(),
            ));
        }
        let dir = collection_dir(data_dir, collection)?;
        fs::create_dir_all(&dir).map_err(|e| io_error("cannot create", &dir, &e))?;

        let config = EdgeConfig::builder()
            .vector(
                DEFAULT_VECTOR_NAME,
                EdgeVectorParams::builder(fingerprint.dims, Distance::Cosine).build(),
            )
            .build();

        let shard = match read_fingerprint(&dir)? {
            Some(stored) if stored != *fingerprint => {
                return Err(StoreError::FingerprintMismatch {
                    collection: collection.to_owned(),
                    stored: stored.id(),
                    expected: fingerprint.id(),
                });
            }
            // Created earlier (possibly interrupted before the shard was complete): `load`
            // with an explicit config creates whatever is missing and checks the segments.
            Some(_) => EdgeShard::load(&dir, Some(config)).map_err(map_op_err)?,
            None => {
                ensure_no_foreign_data(&dir)?;
                write_fingerprint(&dir, fingerprint)?;
                EdgeShard::new(&dir, config).map_err(map_op_err)?
            }
        };

        let shared = Shared {
            shard,
            writes: Mutex::new(()),
        };
        // Idempotent: an index that already exists is left as it is.
        for (field, is_tenant) in KEYWORD_INDEXES {
            shared.write(keyword_index(field, is_tenant)?)?;
        }

        Ok(Self {
            collection: collection.to_owned(),
            dims: fingerprint.dims,
            shared: Some(Arc::new(shared)),
        })
    }

    /// The fingerprint recorded for the collection `collection` under `data_dir`, `None` if the
    /// collection does not exist (has no `rag-ingest.json`).
    ///
    /// Blocks on disk I/O. Fails with [`StoreError::Rejected`] if `collection` is not a plain
    /// directory name or the sidecar cannot be parsed, [`StoreError::Unavailable`] if it cannot
    /// be read.
    pub fn recorded_fingerprint(
        data_dir: &Path,
        collection: &str,
    ) -> Result<Option<Fingerprint>, StoreError> {
        read_fingerprint(&collection_dir(data_dir, collection)?)
    }

    /// Runs the shard's optimizers until they have nothing left to do: builds the HNSW index
    /// (and merges or vacuums segments) — useful after bulk loads. Writes wait until it ends;
    /// searches keep working.
    ///
    /// Fails with [`StoreError::Unavailable`] if an optimizer or the flush afterwards fails.
    pub async fn optimize(&self) -> Result<(), StoreError> {
        self.run(|shared| {
            let _guard = shared.writes.lock().unwrap_or_else(PoisonError::into_inner);
            shared.shard.optimize().map_err(map_op_err)?;
            shared.shard.flush();
            Ok(())
        })
        .await
    }

    /// Runs `f` on the blocking pool; a panic or cancelled task becomes
    /// [`StoreError::Unavailable`].
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T, StoreError> + Send + 'static,
    {
        let shared = self
            .shared
            .clone()
            .ok_or_else(|| StoreError::Unavailable("vector store is closed".to_owned()))?;
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "vector store operation on collection {} failed: {e}",
                    self.collection
                ))
            })?
    }

    /// Fails with [`StoreError::Dimension`] if `vector` does not have the collection's
    /// dimension, [`StoreError::Rejected`] if it holds a NaN or infinite value.
    fn check_vector(&self, vector: &[f32]) -> Result<(), StoreError> {
        if vector.len() != self.dims {
            return Err(StoreError::Dimension {
                expected: self.dims,
                got: vector.len(),
            });
        }
        if vector.iter().any(|v| !v.is_finite()) {
            return Err(StoreError::Rejected(
                "vector holds a NaN or infinite value".to_owned(),
            ));
        }
        Ok(())
    }
}

impl Drop for EdgeStore {
    fn drop(&mut self) {
        // Dropping the last `EdgeShard` flushes it (blocking I/O). Keep that off the async
        // worker threads where Tokio allows it.
        let Some(shared) = self.shared.take() else {
            return;
        };
        let multi_thread = Handle::try_current()
            .is_ok_and(|handle| handle.runtime_flavor() == RuntimeFlavor::MultiThread);
        if multi_thread {
            tokio::task::block_in_place(move || drop(shared));
        } else {
            drop(shared);
        }
    }
}

impl VectorStore for EdgeStore {
    /// Upserts `points` in one operation and flushes the shard (see the module documentation).
    ///
    /// Fails with [`StoreError::Dimension`] if a vector has the wrong length (nothing is
    /// written), [`StoreError::Rejected`] if a vector holds NaN/infinity or a payload cannot be
    /// encoded, [`StoreError::Unavailable`] if the write or the flush fails.
    async fn upsert(&self, points: Vec<ChunkPoint>) -> Result<(), StoreError> {
        if points.is_empty() {
            return Ok(());
        }
        let mut persisted = Vec::with_capacity(points.len());
        for point in points {
            self.check_vector(&point.vector)?;
            persisted.push(PointStructPersisted {
                id: PointId::Uuid(point.id),
                vector: VectorStructPersisted::Single(point.vector),
                payload: Some(encode_payload(&point.payload)?),
            });
        }
        let operation = UpdateOperation::PointOperation(PointOperations::UpsertPoints(
            PointInsertOperations::PointsList(persisted),
        ));
        self.run(move |shared| shared.write(operation)).await
    }

    /// Retrieves point [`point_id`]`(tenant, document_id, 0)`.
    ///
    /// Fails with [`StoreError::Rejected`] if its payload is not a [`ChunkPayload`] or belongs to
    /// another tenant or document (never returned), [`StoreError::Unavailable`] if the read
    /// fails.
    async fn first_chunk(
        &self,
        tenant: &TenantId,
        document_id: &str,
    ) -> Result<Option<ChunkPayload>, StoreError> {
        let id = PointId::Uuid(point_id(tenant, document_id, 0));
        let tenant = tenant.as_str().to_owned();
        let document_id = document_id.to_owned();
        self.run(move |shared| {
            let records = shared
                .shard
                .retrieve(
                    &[id],
                    Some(WithPayloadInterface::Bool(true)),
                    Some(WithVector::Bool(false)),
                )
                .map_err(map_op_err)?;
            let Some(record) = records.into_iter().next() else {
                return Ok(None);
            };
            let payload = decode_payload(&record.id, record.payload)?;
            if payload.tenant_id != tenant || payload.document_id != document_id {
                return Err(StoreError::Rejected(format!(
                    "point {id} should hold chunk 0 of document {document_id:?} of tenant \
                     {tenant}, but its payload names another tenant or document"
                )));
            }
            Ok(Some(payload))
        })
        .await
    }

    /// Deletes by filter: `tenant_id == tenant AND document_id == document_id AND NOT
    /// content_sha256 == keep_sha256` (the last condition only when `keep_sha256` is given),
    /// then flushes.
    ///
    /// Fails with [`StoreError::Unavailable`] if the delete or the flush fails.
    async fn delete_document(
        &self,
        tenant: &TenantId,
        document_id: &str,
        keep_sha256: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut filter = scope_filter(tenant, Some(document_id))?;
        if let Some(keep) = keep_sha256 {
            filter.must_not = Some(vec![keyword_match("content_sha256", keep)?]);
        }
        let operation =
            UpdateOperation::PointOperation(PointOperations::DeletePointsByFilter(filter));
        self.run(move |shared| shared.write(operation)).await
    }

    /// Nearest-neighbour query restricted to `tenant_id == tenant`, with payloads.
    ///
    /// Fails with [`StoreError::Dimension`] if `vector` has the wrong length,
    /// [`StoreError::Rejected`] if it holds NaN/infinity or a hit's payload is not a
    /// [`ChunkPayload`] of `tenant`, [`StoreError::Unavailable`] if the query fails.
    async fn search(
        &self,
        tenant: &TenantId,
        vector: Vec<f32>,
        top_k: usize,
    ) -> Result<Vec<ScoredChunk>, StoreError> {
        self.check_vector(&vector)?;
        if top_k == 0 {
            return Ok(Vec::new());
        }
        let request = QueryRequest {
            prefetches: Vec::new(),
            query: Some(ScoringQuery::Vector(QueryEnum::Nearest(
                NamedQuery::default_dense(vector),
            ))),
            filter: Some(scope_filter(tenant, None)?),
            score_threshold: None,
            limit: top_k,
            offset: 0,
            params: None,
            with_vector: WithVector::Bool(false),
            with_payload: WithPayloadInterface::Bool(true),
        };
        let tenant = tenant.as_str().to_owned();
        self.run(move |shared| {
            let hits = shared.shard.query(request).map_err(map_op_err)?;
            hits.into_iter()
                .map(|hit| {
                    let payload = decode_payload(&hit.id, hit.payload)?;
                    if payload.tenant_id != tenant {
                        return Err(StoreError::Rejected(format!(
                            "search for tenant {tenant} matched point {} of another tenant",
                            hit.id
                        )));
                    }
                    Ok(ScoredChunk {
                        score: hit.score,
                        payload,
                    })
                })
                .collect()
        })
        .await
    }

    /// Exact count with the filter `tenant_id == tenant` (and `document_id == document_id`).
    ///
    /// Fails with [`StoreError::Unavailable`] if the count fails.
    async fn count(
        &self,
        tenant: &TenantId,
        document_id: Option<&str>,
    ) -> Result<usize, StoreError> {
        let request = CountRequest {
            filter: Some(scope_filter(tenant, document_id)?),
            exact: true,
        };
        self.run(move |shared| shared.shard.count(request).map_err(map_op_err))
            .await
    }
}

/// `data_dir/<collection>`, after checking that `collection` is a plain directory name.
fn collection_dir(data_dir: &Path, collection: &str) -> Result<PathBuf, StoreError> {
    let plain = !collection.is_empty()
        && collection != "."
        && collection != ".."
        && collection
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !plain {
        return Err(StoreError::Rejected(format!(
            "collection name {collection:?} may only contain letters, digits, '_', '.' and '-' \
             (and may not be empty, '.' or '..')"
        )));
    }
    Ok(data_dir.join(collection))
}

/// The fingerprint in `dir`'s sidecar, `None` if there is none.
fn read_fingerprint(dir: &Path) -> Result<Option<Fingerprint>, StoreError> {
    let path = dir.join(FINGERPRINT_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("cannot read", &path, &e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        StoreError::Rejected(format!(
            "{} is not a valid embedder fingerprint: {e}",
            path.display()
        ))
    })
}

/// Fails with [`StoreError::Rejected`] if `dir` (which has no sidecar) holds anything but a
/// leftover temporary sidecar: it is not ours to overwrite.
fn ensure_no_foreign_data(dir: &Path) -> Result<(), StoreError> {
    let entries = fs::read_dir(dir).map_err(|e| io_error("cannot list", dir, &e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("cannot list", dir, &e))?;
        if entry.file_name() != FINGERPRINT_TMP_FILE {
            return Err(StoreError::Rejected(format!(
                "{} is not empty but has no {FINGERPRINT_FILE}: it is not a rag-ingest \
                 collection; use another collection name or data directory",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Writes `fingerprint` to `dir`'s sidecar atomically (temporary file, fsync, rename, fsync of
/// the directory).
fn write_fingerprint(dir: &Path, fingerprint: &Fingerprint) -> Result<(), StoreError> {
    let json = serde_json::to_vec_pretty(fingerprint).map_err(|e| {
        StoreError::Rejected(format!("cannot encode the embedder fingerprint: {e}"))
    })?;
    let tmp = dir.join(FINGERPRINT_TMP_FILE);
    let path = dir.join(FINGERPRINT_FILE);
    let mut file = File::create(&tmp).map_err(|e| io_error("cannot create", &tmp, &e))?;
    file.write_all(&json)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error("cannot write", &tmp, &e))?;
    fs::rename(&tmp, &path).map_err(|e| io_error("cannot create", &path, &e))?;
    sync_dir(dir)
}

/// Makes the directory entries of `dir` durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("cannot sync", dir, &e))
}

/// Directories cannot be opened for syncing on this platform; the rename is all we can do.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), StoreError> {
    Ok(())
}

fn io_error(action: &str, path: &Path, e: &io::Error) -> StoreError {
    StoreError::Unavailable(format!("{action} {}: {e}", path.display()))
}

/// The operation creating a keyword index on `field`.
fn keyword_index(field: &str, is_tenant: bool) -> Result<UpdateOperation, StoreError> {
    let params = KeywordIndexParams {
        is_tenant: Some(is_tenant),
        ..KeywordIndexParams::default()
    };
    Ok(UpdateOperation::FieldIndexOperation(
        FieldIndexOperations::CreateIndex(CreateIndex {
            field_name: json_path(field)?,
            field_schema: Some(PayloadFieldSchema::FieldParams(
                PayloadSchemaParams::Keyword(params),
            )),
        }),
    ))
}

/// The filter `tenant_id == tenant` (AND `document_id == document_id` when given).
fn scope_filter(tenant: &TenantId, document_id: Option<&str>) -> Result<Filter, StoreError> {
    let mut must = vec![keyword_match("tenant_id", tenant.as_str())?];
    if let Some(document_id) = document_id {
        must.push(keyword_match("document_id", document_id)?);
    }
    Ok(Filter {
        should: None,
        min_should: None,
        must: Some(must),
        must_not: None,
    })
}

/// The condition `field == value` on a keyword payload field.
fn keyword_match(field: &str, value: &str) -> Result<Condition, StoreError> {
    Ok(Condition::Field(FieldCondition::new_match(
        json_path(field)?,
        Match::new_value(ValueVariants::String(value.to_owned())),
    )))
}

fn json_path(field: &str) -> Result<JsonPath, StoreError> {
    JsonPath::try_from(field)
        .map_err(|()| StoreError::Rejected(format!("invalid payload field path {field:?}")))
}

/// `payload` as a point payload (its fields at the top level).
fn encode_payload(payload: &ChunkPayload) -> Result<Payload, StoreError> {
    match serde_json::to_value(payload) {
        Ok(serde_json::Value::Object(map)) => Ok(Payload(map)),
        Ok(other) => Err(StoreError::Rejected(format!(
            "chunk payload encoded to a JSON {other} instead of an object"
        ))),
        Err(e) => Err(StoreError::Rejected(format!(
            "cannot encode chunk payload: {e}"
        ))),
    }
}

/// The [`ChunkPayload`] stored in point `id`; [`StoreError::Rejected`] if it has none or it
/// does not deserialize.
fn decode_payload(id: &PointId, payload: Option<Payload>) -> Result<ChunkPayload, StoreError> {
    let payload =
        payload.ok_or_else(|| StoreError::Rejected(format!("point {id} has no payload")))?;
    serde_json::from_value(serde_json::Value::Object(payload.0)).map_err(|e| {
        StoreError::Rejected(format!(
            "point {id} does not hold a rag-ingest chunk payload: {e}"
        ))
    })
}

/// Transient failures (I/O, corruption, timeouts) become [`StoreError::Unavailable`], everything
/// else (invalid requests) [`StoreError::Rejected`].
fn map_op_err(e: OperationError) -> StoreError {
    match e {
        OperationError::ServiceError { .. }
        | OperationError::InconsistentStorage { .. }
        | OperationError::OutOfMemory { .. }
        | OperationError::Cancelled { .. }
        | OperationError::Timeout { .. } => StoreError::Unavailable(e.to_string()),
        OperationError::WrongVectorDimension {
            expected_dim,
            received_dim,
        } => StoreError::Dimension {
            expected: expected_dim,
            got: received_dim,
        },
        OperationError::VectorNameNotExists { .. }
        | OperationError::PointIdError { .. }
        | OperationError::TypeError { .. }
        | OperationError::TypeInferenceError { .. }
        | OperationError::ValidationError { .. }
        | OperationError::WrongSparse
        | OperationError::WrongMulti
        | OperationError::MissingRangeIndexForOrderBy { .. }
        | OperationError::MissingMapIndexForFacet { .. }
        | OperationError::VariableTypeError { .. }
        | OperationError::NonFiniteNumber { .. } => StoreError::Rejected(e.to_string()),
    }
}
