//! Copying a collection into another, adding keyword vectors: how a collection created before
//! hybrid search (dense vectors only) is migrated, with `rag-ingest reindex --from OLD`.
//!
//! Every point is copied with its id, payload and dense vector (no model call); its keyword
//! vector is computed from the stored text and context ([`crate::context::embed_text`], the
//! same text the pipeline encodes). Tombstones are copied too, so deleted documents stay
//! deleted. Points of one write are copied with the store's conditional write
//! ([`VectorStore::upsert_newer`]), so running a worker against the new collection meanwhile
//! never lets a copied point replace a newer one (points written before orders existed are
//! copied with their effective order, `(version, 0)`, older than any pipeline write). The
//! chunks of one document are spread over the pages (point ids are hashes), so a copied page
//! can also insert chunks at positions where a worker's newer, shorter revision has none:
//! after the copy every document whose stored head is newer than what was copied is settled
//! like a pipeline write settles it (points older than the head are deleted). The copy is
//! idempotent and can be re-run after an interruption.

use std::collections::BTreeMap;

use crate::context::embed_text;
use crate::sparse::SparseEncoder;
use crate::store::{ChunkPoint, Order, Store, StoreError, StoredPoint, VectorStore};
use crate::tenant::TenantId;

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Points copied (chunks and tombstones).
    pub points: u64,
    /// Of those, tombstones.
    pub tombstones: u64,
    /// Pages read from the source.
    pub pages: u64,
    /// Documents checked after the copy (one read each).
    pub checked: u64,
    /// Of those, documents whose head in the target was newer than the copy (a worker wrote
    /// them meanwhile): their older points, copied or not, were deleted.
    pub settled: u64,
}

/// Copies every point of `source` into `target` with a keyword vector from `sparse`, reading
/// `page` points at a time, then settles the documents a worker wrote meanwhile (see the
/// module documentation); `progress` is called with the running report after each page and
/// every 256 documents checked.
/// Holds the newest copied order of every document in memory (about 100 bytes each).
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
    // The newest order copied per document.
    let mut copied: BTreeMap<(String, String), Order> = BTreeMap::new();
    loop {
        let batch = source.scroll(from, page).await?;
        report.pages += 1;
        // Points of one write (one document, one order) go in one conditional write.
        let mut writes: BTreeMap<(String, String, Order), Vec<ChunkPoint>> = BTreeMap::new();
        for mut point in batch.points {
            report.points += 1;
            if point.payload.tombstone {
                report.tombstones += 1;
            }
            let order = point.payload.effective_order();
            point.payload.order = Some(order);
            let document = (
                point.payload.tenant_id.clone(),
                point.payload.document_id.clone(),
            );
            let newest = copied.entry(document.clone()).or_insert(order);
            *newest = (*newest).max(order);
            writes
                .entry((document.0, document.1, order))
                .or_default()
                .push(with_keywords(point, sparse));
        }
        for ((_, _, order), points) in writes {
            target.upsert_newer(points, order).await?;
        }
        progress(&report);
        match batch.next {
            Some(next) => from = Some(next),
            None => break,
        }
    }
    for ((tenant, document_id), newest) in copied {
        report.checked += 1;
        if report.checked.is_multiple_of(256) {
            progress(&report);
        }
        // Ids come from stored payloads; one that is not a tenant id cannot be read back.
        let Ok(tenant) = TenantId::new(&tenant) else {
            continue;
        };
        let Some(head) = target.first_chunk(&tenant, &document_id).await? else {
            continue;
        };
        let head = head.effective_order();
        if head > newest {
            target.delete_older(&tenant, &document_id, head).await?;
            report.settled += 1;
        }
    }
    progress(&report);
    Ok(report)
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
