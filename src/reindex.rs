//! Copying a collection into another, adding keyword vectors: how a collection created before
//! hybrid search (dense vectors only) is migrated, with `rag-ingest reindex --from OLD`.
//!
//! Every point is copied with its id, payload and dense vector (no model call); its keyword
//! vector is computed from the stored text and context ([`crate::context::embed_text`], the
//! same text the pipeline encodes). Tombstones are copied too, so deleted documents stay
//! deleted. Points of one write are copied with the store's conditional write
//! ([`VectorStore::upsert_newer`]), so running a worker against the new collection meanwhile
//! never lets a copied point replace a newer one; the copy is idempotent and can be re-run
//! after an interruption.

use std::collections::BTreeMap;

use crate::context::embed_text;
use crate::sparse::SparseEncoder;
use crate::store::{ChunkPoint, Order, Store, StoreError, StoredPoint, VectorStore};

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Points copied (chunks and tombstones).
    pub points: u64,
    /// Of those, tombstones.
    pub tombstones: u64,
    /// Pages read from the source.
    pub pages: u64,
}

/// Copies every point of `source` into `target` with a keyword vector from `sparse`, reading
/// `page` points at a time; `progress` is called with the running report after each page.
///
/// Fails with the first [`StoreError`] of a read or a write (what was written stays written;
/// running the copy again completes it).
pub async fn copy_collection(
    source: &Store,
    target: &Store,
    sparse: &SparseEncoder,
    page: usize,
    mut progress: impl FnMut(&CopyReport),
) -> Result<CopyReport, StoreError> {
    let mut report = CopyReport::default();
    let mut from = None;
    loop {
        let batch = source.scroll(from, page).await?;
        report.pages += 1;
        // Points of one write (one document, one order) go in one conditional write. Points
        // written before orders existed are copied unconditionally.
        let mut writes: BTreeMap<(String, String, Option<Order>), Vec<ChunkPoint>> =
            BTreeMap::new();
        for point in batch.points {
            report.points += 1;
            if point.payload.tombstone {
                report.tombstones += 1;
            }
            let key = (
                point.payload.tenant_id.clone(),
                point.payload.document_id.clone(),
                point.payload.order,
            );
            writes
                .entry(key)
                .or_default()
                .push(with_keywords(point, sparse));
        }
        for ((_, _, order), points) in writes {
            match order {
                Some(order) => target.upsert_newer(points, order).await?,
                None => target.upsert(points).await?,
            }
        }
        progress(&report);
        match batch.next {
            Some(next) => from = Some(next),
            None => return Ok(report),
        }
    }
}

/// `point` as a point to write, with the keyword vector of its text and context (none for a
/// tombstone).
fn with_keywords(point: StoredPoint, sparse: &SparseEncoder) -> ChunkPoint {
    let keywords = (!point.payload.tombstone).then(|| {
        sparse.document(&embed_text(
            point.payload.context.as_deref(),
            &point.payload.text,
        ))
    });
    ChunkPoint {
        id: point.id,
        vector: point.vector,
        sparse: keywords,
        payload: point.payload,
    }
}
