//! A long-running worker's write pattern against an [`EdgeStore`], with synthetic vectors:
//! many versions of the same few documents, each version written as the pipeline writes it
//! (upsert the new revision's chunks, then delete the document's chunks of any other
//! revision). Chunk counts alternate between 3 and 6, so every other version leaves stale
//! points behind to delete. Shared by `tests/edge_durability.rs` and `benches/edge_disk.rs`.

use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Arc;

use rag_ingest::store::{
    ChunkPayload, ChunkPoint, EdgeStore, Revision, VectorStore, disk_usage, point_id,
};
use rag_ingest::tenant::TenantId;

#[path = "vectors.rs"]
mod vectors;
/// The fingerprint the churn stores record.
pub use vectors::fingerprint;
use vectors::unit_vector;

/// The collection every churn store uses.
pub const COLLECTION: &str = "churn";

/// The tenant every churn document belongs to.
pub fn tenant() -> TenantId {
    TenantId::new("acme").expect("valid tenant")
}

/// Chunks of version `version` of a document.
pub fn chunk_count(version: u64) -> usize {
    if version.is_multiple_of(2) { 3 } else { 6 }
}

/// The revision of version `version` of document `doc`.
pub fn revision(doc: usize, version: u64) -> Revision {
    Revision {
        content_sha256: format!("{doc:04}-{version:08}"),
        version: Some(version),
        chunk_count: chunk_count(version),
    }
}

/// The points of version `version` of document `doc`: ~600-byte chunk texts, a small
/// metadata object, one synthetic vector each.
pub fn version_points(doc: usize, version: u64) -> Vec<ChunkPoint> {
    let tenant = tenant();
    let document_id = format!("doc-{doc}");
    let revision = revision(doc, version);
    let mut metadata = serde_json::Map::new();
    metadata.insert("title".into(), format!("Document {doc}").into());
    metadata.insert(
        "source".into(),
        format!("https://example.com/docs/{doc}").into(),
    );
    (0..revision.chunk_count)
        .map(|index| ChunkPoint {
            id: point_id(&tenant, &document_id, index),
            vector: unit_vector(version * 1_000 + doc as u64 * 10 + index as u64),
            sparse: None,
            payload: ChunkPayload {
                tenant_id: tenant.as_str().to_owned(),
                document_id: document_id.clone(),
                version: revision.version,
                chunk_index: index,
                chunk_count: revision.chunk_count,
                text: format!("version {version} chunk {index} ").repeat(30),
                byte_start: index * 600,
                byte_end: index * 600 + 600,
                content_sha256: revision.content_sha256.clone(),
                metadata: metadata.clone(),
                embedder: fingerprint().id(),
                ingested_at: "2025-01-01T00:00:00Z".to_owned(),
                order: None,
                tombstone: false,
                context: None,
                page: None,
            },
        })
        .collect()
}

/// Writes versions `versions` of documents `0..docs`, one writer task per document (so
/// writes share flushes as concurrent deliveries do), each version as the pipeline writes
/// it. Panics if a write fails.
pub async fn churn(store: &Arc<EdgeStore>, docs: usize, versions: RangeInclusive<u64>) {
    let writers: Vec<_> = (0..docs)
        .map(|doc| {
            let store = Arc::clone(store);
            let versions = versions.clone();
            tokio::spawn(async move {
                let tenant = tenant();
                let document_id = format!("doc-{doc}");
                for version in versions {
                    store
                        .upsert(version_points(doc, version))
                        .await
                        .expect("upsert");
                    store
                        .delete_document(&tenant, &document_id, Some(&revision(doc, version)))
                        .await
                        .expect("delete stale chunks");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer task");
    }
}

/// Bytes on disk of a collection directory: all of it, its WAL and its segments.
#[derive(Debug, Clone, Copy)]
pub struct DiskUse {
    pub total: u64,
    pub wal: u64,
    pub segments: u64,
}

/// What the collection under `data_dir` takes on disk.
pub fn disk_use(data_dir: &Path) -> DiskUse {
    let dir = data_dir.join(COLLECTION);
    DiskUse {
        total: disk_usage(&dir).expect("measure collection"),
        wal: disk_usage(&dir.join("wal")).expect("measure wal"),
        segments: disk_usage(&dir.join("segments")).expect("measure segments"),
    }
}

/// `bytes` in MiB, for printing.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
