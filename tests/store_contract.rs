//! The `VectorStore` contract, one suite for every store.
//!
//! Each contract is a generic async function over a [`Backend`] (how to open a fresh
//! collection of one store kind); the `contract!` macro turns it into two tests:
//! `<contract>::edge` (embedded Qdrant Edge in a temporary directory, always runs) and
//! `<contract>::qdrant` (a fresh collection on the Qdrant server at `QDRANT_URL`, API key from
//! `QDRANT_API_KEY` if set; prints `SKIPPED: QDRANT_URL not set` and passes when unset).
//!
//! Lifecycle contracts go through `Pipeline::process` with real documents, the real model
//! (wrapped in a call counter) and the real chunker; storage contracts use synthetic vectors.

mod common;
#[path = "support/fault_store.rs"]
mod fault_store;

use std::sync::Arc;

use common::{CountingEmbedder, qdrant_url_or_skip};
use fault_store::{Call, FaultStore, Hook, Op};
use rag_ingest::chunk::{ChunkFormat, Chunker};
use rag_ingest::embed::{Embedder, Fingerprint};
use rag_ingest::message::Document;
use rag_ingest::process::{Pipeline, Processed};
use rag_ingest::search::{SearchMode, SearchOptions, Searcher};
use rag_ingest::store::{
    BatchLimits, ChunkPayload, ChunkPoint, EdgeStore, Order, QdrantOptions, QdrantStore, Revision,
    SearchFilter, SearchRequest, StoreError, VectorStore, point_id,
};
use rag_ingest::tenant::TenantId;

#[path = "support/vectors.rs"]
mod vectors;
use vectors::{DIMS, unit_vector};

/// Chunk sizes of the pipelines built here (tokens of the real model).
const MAX_TOKENS: usize = 64;
const OVERLAP: usize = 8;

// ---------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------

/// A fresh, empty collection of one store kind.
#[allow(async_fn_in_trait)]
trait Backend {
    /// The store type.
    type Store: VectorStore;

    /// Opens the collection for vectors of `fingerprint`, splitting writes by `limits`.
    async fn open(
        &self,
        fingerprint: &Fingerprint,
        limits: BatchLimits,
    ) -> Result<Self::Store, StoreError>;

    /// A second handle on the same collection, as another worker process would have one
    /// (a new client for a server; the same store for Edge, which one process owns).
    async fn second_writer(&self, first: &Arc<Self::Store>) -> Arc<Self::Store>;

    /// Removes the collection.
    async fn finish(self);
}

/// Qdrant Edge in a temporary directory.
struct EdgeBackend {
    dir: tempfile::TempDir,
}

impl EdgeBackend {
    fn new() -> Self {
        EdgeBackend {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }
}

impl Backend for EdgeBackend {
    type Store = EdgeStore;

    async fn open(
        &self,
        fingerprint: &Fingerprint,
        limits: BatchLimits,
    ) -> Result<EdgeStore, StoreError> {
        Ok(EdgeStore::open(self.dir.path(), "contract", fingerprint)?.with_batch_limits(limits))
    }

    async fn second_writer(&self, first: &Arc<EdgeStore>) -> Arc<EdgeStore> {
        Arc::clone(first)
    }

    async fn finish(self) {}
}

/// A uniquely named collection on the Qdrant server at `QDRANT_URL`.
struct QdrantBackend {
    url: String,
    api_key: Option<String>,
    collection: String,
}

impl QdrantBackend {
    /// `None` (after a loud SKIPPED line) when `QDRANT_URL` is not set.
    fn from_env(test: &str) -> Option<Self> {
        let url = qdrant_url_or_skip(test)?;
        Some(QdrantBackend {
            url,
            api_key: std::env::var("QDRANT_API_KEY")
                .ok()
                .filter(|k| !k.is_empty()),
            collection: format!(
                "rag-ingest-contract-{test}-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
        })
    }
}

impl Backend for QdrantBackend {
    type Store = QdrantStore;

    async fn open(
        &self,
        fingerprint: &Fingerprint,
        limits: BatchLimits,
    ) -> Result<QdrantStore, StoreError> {
        let mut options = QdrantOptions::new(self.url.clone());
        options.api_key = self.api_key.clone().map(rag_ingest::secret::Secret::new);
        options.limits = limits;
        QdrantStore::open(&options, &self.collection, fingerprint).await
    }

    async fn second_writer(&self, _first: &Arc<QdrantStore>) -> Arc<QdrantStore> {
        Arc::new(
            self.open(&model_fingerprint(), BatchLimits::default())
                .await
                .expect("a second client opens the collection"),
        )
    }

    async fn finish(self) {
        let mut builder = qdrant_client::Qdrant::from_url(&self.url).skip_compatibility_check();
        if let Some(key) = &self.api_key {
            builder.set_api_key(key);
        }
        if let Ok(client) = builder.build() {
            let _ = client.delete_collection(self.collection.clone()).await;
        }
    }
}

/// Generates `<contract>::edge` and `<contract>::qdrant` for the generic function `contract`.
macro_rules! contract {
    ($contract:ident) => {
        mod $contract {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn edge() {
                super::$contract(super::EdgeBackend::new()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn qdrant() {
                let Some(backend) = super::QdrantBackend::from_env(stringify!($contract)) else {
                    return;
                };
                super::$contract(backend).await;
            }
        }
    };
}

contract!(idempotent_reupsert_does_not_grow);
contract!(a_shrinking_document_leaves_only_its_new_chunks);
contract!(an_older_version_never_overwrites_a_newer_one);
contract!(unchanged_content_makes_no_embedder_call);
contract!(delete_touches_one_tenants_document_only);
contract!(search_and_delete_never_cross_tenants);
contract!(purge_tenant_removes_only_that_tenant);
contract!(metadata_filter_and_score_threshold);
contract!(a_fingerprint_mismatch_refuses_to_open);
contract!(a_batch_over_the_byte_cap_is_split_and_fully_stored);
contract!(refused_writes_change_nothing);
contract!(a_forged_payload_is_never_returned_to_another_tenant);
contract!(an_interrupted_write_is_completed_by_the_retry);
contract!(stored_vectors_are_read_back_by_chunk);
contract!(editing_one_paragraph_embeds_only_the_chunks_it_touches);
contract!(two_writers_that_read_the_same_revision_leave_only_the_newest);
contract!(a_newer_writer_that_read_first_still_wins);
contract!(without_versions_the_last_processed_write_wins_whole);
contract!(a_delete_is_not_undone_by_an_older_upsert_arriving_later);
contract!(keyword_and_hybrid_search_find_exact_terms_with_ranks_per_branch);
contract!(keyword_and_hybrid_search_stay_in_the_tenant_and_apply_filters_to_every_branch);
contract!(a_collection_without_keyword_vectors_is_refused_with_the_migration);
contract!(contextual_chunks_store_their_context_and_reembed_on_a_new_title);
contract!(an_unchanged_revision_without_an_order_keeps_a_newer_write_in_progress);

/// A collection written before write orders existed: an unchanged document whose stored
/// revision has no order is given one and settled by order. A newer write in progress (its
/// chunks beyond the old count stored, its chunk 0 not yet) is kept; a leftover of an older
/// revision without an order is removed. (It used to count the points and delete every
/// other revision, the newer write's chunks included.)
async fn an_unchanged_revision_without_an_order_keeps_a_newer_write_in_progress<B: Backend>(
    backend: B,
) {
    let store = Arc::new(open(&backend).await);
    let a = tenant("acme");
    let (pipeline, embedder) = pipeline(Arc::clone(&store));
    let content = paragraphs("legacy", 3);
    let v1 = doc("acme", "old", &content, Some(1));
    pipeline.process(&v1).await.expect("v1");
    let stored = stored_chunks(&*store, &a, "old").await;
    let n = stored.len();
    assert_eq!(n, chunk_count(&content));

    // As an older release stored it: the same payloads without an order.
    let mut points: Vec<ChunkPoint> = stored
        .iter()
        .map(|payload| ChunkPoint {
            id: point_id(&a, "old", payload.chunk_index),
            vector: unit_vector(payload.chunk_index as u64),
            payload: ChunkPayload {
                order: None,
                ..payload.clone()
            },
            sparse: None,
        })
        .collect();
    // A leftover of an older revision, also without an order.
    let mut leftover = stored[0].clone();
    leftover.chunk_index = n + 5;
    leftover.chunk_count = n + 6;
    leftover.content_sha256 = "older".into();
    leftover.order = None;
    points.push(ChunkPoint {
        id: point_id(&a, "old", n + 5),
        vector: unit_vector(99),
        payload: leftover,
        sparse: None,
    });
    // The newer write in progress: version 2, chunks n and n + 1 of n + 2 stored.
    for index in [n, n + 1] {
        let mut newer = stored[0].clone();
        newer.chunk_index = index;
        newer.chunk_count = n + 2;
        newer.version = Some(2);
        newer.content_sha256 = "newer".into();
        newer.order = Some(Order { version: 2, seq: 1 });
        points.push(ChunkPoint {
            id: point_id(&a, "old", index),
            vector: unit_vector(200 + index as u64),
            payload: newer,
            sparse: None,
        });
    }
    store.upsert(points).await.expect("legacy points");
    assert_eq!(store.count(&a, Some("old")).await.expect("count"), n + 3);

    let calls = embedder.calls();
    assert_eq!(
        pipeline.process(&v1).await.expect("redelivered v1"),
        Processed::Unchanged
    );
    assert_eq!(embedder.calls(), calls, "unchanged content is not embedded");
    let after = stored_chunks(&*store, &a, "old").await;
    let newer: Vec<usize> = after
        .iter()
        .filter(|p| p.content_sha256 == "newer")
        .map(|p| p.chunk_index)
        .collect();
    assert_eq!(newer, vec![n, n + 1], "the newer write's chunks are kept");
    assert!(
        after.iter().all(|p| p.content_sha256 != "older"),
        "the older revision's leftover is removed"
    );
    let kept: Vec<&ChunkPayload> = after
        .iter()
        .filter(|p| p.content_sha256 == stored[0].content_sha256)
        .collect();
    assert_eq!(kept.len(), n, "the unchanged revision is whole");
    assert!(
        kept.iter()
            .all(|p| p.order.is_some_and(|o| o.version == 1 && o.seq > 0)),
        "the unchanged revision now has a write order: {kept:?}"
    );

    drop(pipeline);
    drop(store);
    backend.finish().await;
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn tenant(name: &str) -> TenantId {
    TenantId::new(name).expect("valid tenant name")
}

/// The fingerprint of a collection for the real model (synthetic vectors live in its space
/// for these tests), with keyword vectors, as the product creates every collection.
fn model_fingerprint() -> Fingerprint {
    rag_ingest::setup::collection_fingerprint(common::embedder().fingerprint())
}

/// Opens `backend` for the real model with the default caps.
async fn open<B: Backend>(backend: &B) -> B::Store {
    backend
        .open(&model_fingerprint(), BatchLimits::default())
        .await
        .expect("store opens")
}

/// A pipeline over `store` with the real chunker and the counting real model.
fn pipeline<S: VectorStore>(
    store: Arc<S>,
) -> (Pipeline<CountingEmbedder, S>, Arc<CountingEmbedder>) {
    let embedder = Arc::new(CountingEmbedder::new());
    let chunker = Chunker::new(
        embedder.tokenizer().clone(),
        MAX_TOKENS,
        OVERLAP,
        embedder.max_input_tokens(),
    )
    .expect("chunker");
    (
        Pipeline::new(Arc::new(chunker), Arc::clone(&embedder), store),
        embedder,
    )
}

/// Chunks `content` would give in [`pipeline`] as plain text.
fn chunk_count(content: &str) -> usize {
    let embedder = common::embedder();
    Chunker::new(
        embedder.tokenizer().clone(),
        MAX_TOKENS,
        OVERLAP,
        embedder.max_input_tokens(),
    )
    .expect("chunker")
    .split(content, ChunkFormat::Text)
    .len()
}

/// Plain text of `n` paragraphs about `topic`, each about 40 tokens, so that each paragraph is
/// one 64-token chunk.
fn paragraphs(topic: &str, n: usize) -> String {
    const THINGS: [&str; 12] = [
        "lighthouse",
        "glacier",
        "orchard",
        "volcano",
        "harbor",
        "desert",
        "meadow",
        "canyon",
        "reef",
        "tundra",
        "prairie",
        "lagoon",
    ];
    (0..n)
        .map(|i| {
            let thing = THINGS[i % THINGS.len()];
            format!(
                "Part {i} of the {topic} notes describes the {thing}. Visitors to the {thing} \
                 report calm mornings, long walks, careful maps and quiet evenings spent \
                 writing about the {thing} and its {topic} history."
            )
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// A plain-text upsert.
fn doc(tenant_name: &str, id: &str, content: &str, version: Option<u64>) -> Document {
    let mut doc = Document::upsert(tenant(tenant_name), id, content);
    doc.version = version;
    doc
}

/// Synthetic chunks 0..count of `doc` (revision `sha`, version 1); chunk `i` gets vector
/// `seed + i` and a `text_len`-byte text.
fn points(
    t: &TenantId,
    doc: &str,
    count: usize,
    sha: &str,
    seed: u64,
    text_len: usize,
) -> Vec<ChunkPoint> {
    (0..count)
        .map(|i| {
            let mut metadata = serde_json::Map::new();
            metadata.insert("title".into(), serde_json::json!(format!("{doc} title")));
            let mut text = format!("{} {doc} chunk {i} rev {sha} ", t.as_str());
            while text.len() < text_len {
                text.push('x');
            }
            ChunkPoint {
                id: point_id(t, doc, i),
                vector: unit_vector(seed + i as u64),
                payload: ChunkPayload {
                    tenant_id: t.as_str().to_owned(),
                    document_id: doc.to_owned(),
                    version: Some(1),
                    chunk_index: i,
                    chunk_count: count,
                    text,
                    byte_start: i * 10,
                    byte_end: i * 10 + 10,
                    content_sha256: sha.to_owned(),
                    metadata,
                    embedder: model_fingerprint().id(),
                    ingested_at: "2025-01-01T00:00:00Z".to_owned(),
                    order: None,
                    tombstone: false,
                    context: None,
                    page: None,
                },
                sparse: None,
            }
        })
        .collect()
}

/// Every stored payload of `doc` of `t`, by chunk index (via a tenant-scoped search).
async fn stored_chunks<S: VectorStore>(store: &S, t: &TenantId, doc: &str) -> Vec<ChunkPayload> {
    let request = SearchRequest::new(t.clone(), unit_vector(12345), 1000);
    let mut chunks: Vec<ChunkPayload> = store
        .search(request)
        .await
        .expect("search")
        .into_iter()
        .map(|hit| hit.payload)
        .filter(|p| p.document_id == doc)
        .collect();
    chunks.sort_by_key(|p| p.chunk_index);
    chunks
}

// ---------------------------------------------------------------------------------------
// Contracts
// ---------------------------------------------------------------------------------------

/// Writing the same ids again overwrites: no growth, neither through the store nor through
/// the pipeline (where a redelivered document is recognised as unchanged).
async fn idempotent_reupsert_does_not_grow<B: Backend>(backend: B) {
    let store = Arc::new(open(&backend).await);
    let a = tenant("acme");

    store
        .upsert(points(&a, "d1", 5, "a", 0, 40))
        .await
        .expect("upsert");
    store
        .upsert(points(&a, "d2", 3, "a", 100, 40))
        .await
        .expect("upsert");
    assert_eq!(store.count(&a, None).await.expect("count"), 8);
    // Same ids, new vectors and hash: overwritten, not duplicated.
    store
        .upsert(points(&a, "d1", 5, "b", 50, 40))
        .await
        .expect("upsert");
    assert_eq!(store.count(&a, None).await.expect("count"), 8);
    assert_eq!(store.count(&a, Some("d1")).await.expect("count"), 5);
    let first = store
        .first_chunk(&a, "d1")
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(first.content_sha256, "b");
    store
        .upsert(Vec::new())
        .await
        .expect("empty upsert is a no-op");
    assert_eq!(store.count(&a, None).await.expect("count"), 8);

    // Through the pipeline: the same document twice.
    let (pipeline, _) = pipeline(Arc::clone(&store));
    let d = doc("acme", "guide", &paragraphs("harbour", 4), Some(1));
    let chunks = chunk_count(&d.content);
    assert_eq!(
        pipeline.process(&d).await.expect("process"),
        Processed::Stored { chunks, reused: 0 }
    );
    assert_eq!(
        pipeline.process(&d).await.expect("process"),
        Processed::Unchanged
    );
    assert_eq!(store.count(&a, Some("guide")).await.expect("count"), chunks);
    assert_eq!(store.count(&a, None).await.expect("count"), 8 + chunks);

    drop(pipeline);
    drop(store);
    backend.finish().await;
}

/// A document going from 10 chunks to 3 keeps exactly the 3 new ones.
async fn a_shrinking_document_leaves_only_its_new_chunks<B: Backend>(backend: B) {
    let store = Arc::new(open(&backend).await);
    let (pipeline, _) = pipeline(Arc::clone(&store));
    let a = tenant("acme");

    let long = paragraphs("river", 10);
    let short = paragraphs("mountain", 3);
    assert_eq!(
        chunk_count(&long),
        10,
        "the long fixture must give 10 chunks"
    );
    assert_eq!(
        chunk_count(&short),
        3,
        "the short fixture must give 3 chunks"
    );
    // Another document of the tenant stays as it is.
    let other = doc("acme", "other", &paragraphs("forest", 2), Some(1));
    pipeline.process(&other).await.expect("process");

    let v1 = doc("acme", "handbook", &long, Some(1));
    assert_eq!(
        pipeline.process(&v1).await.expect("process"),
        Processed::Stored {
            chunks: 10,
            reused: 0
        }
    );
    assert_eq!(store.count(&a, Some("handbook")).await.expect("count"), 10);

    let v2 = doc("acme", "handbook", &short, Some(2));
    assert_eq!(
        pipeline.process(&v2).await.expect("process"),
        Processed::Stored {
            chunks: 3,
            reused: 0
        }
    );
    assert_eq!(store.count(&a, Some("handbook")).await.expect("count"), 3);
    let chunks = stored_chunks(&*store, &a, "handbook").await;
    assert_eq!(chunks.len(), 3);
    let sha = rag_ingest::process::content_sha256(&short);
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk.chunk_index, i);
        assert_eq!(chunk.chunk_count, 3);
        assert_eq!(chunk.version, Some(2));
        assert_eq!(chunk.content_sha256, sha);
        assert!(chunk.text.contains("mountain"), "{}", chunk.text);
        assert_eq!(&short[chunk.byte_start..chunk.byte_end], chunk.text);
    }
    assert_eq!(
        store.count(&a, Some("other")).await.expect("count"),
        chunk_count(&other.content)
    );

    drop(pipeline);
    drop(store);
    backend.finish().await;
}

/// A message older than the stored version is skipped (upsert and delete alike), also after
/// a version bump that did not change the content.
async fn an_older_version_never_overwrites_a_newer_one<B: Backend>(backend: B) {
    let store = Arc::new(open(&backend).await);
    let (pipeline, embedder) = pipeline(Arc::clone(&store));
    let a = tenant("acme");
    let new_text = paragraphs("comet", 2);
    let old_text = paragraphs("asteroid", 4);

    let v5 = doc("acme", "sky", &new_text, Some(5));
    pipeline.process(&v5).await.expect("process");
    let stored = store
        .first_chunk(&a, "sky")
        .await
        .expect("read")
        .expect("stored");
    let calls = embedder.calls();

    let v4 = doc("acme", "sky", &old_text, Some(4));
    assert_eq!(
        pipeline.process(&v4).await.expect("process"),
        Processed::Stale { stored: 5 }
    );
    let mut delete_v3 = Document::delete(a.clone(), "sky");
    delete_v3.version = Some(3);
    assert_eq!(
        pipeline.process(&delete_v3).await.expect("process"),
        Processed::Stale { stored: 5 }
    );
    assert_eq!(embedder.calls(), calls, "a stale message is never embedded");
    assert_eq!(
        store.first_chunk(&a, "sky").await.expect("read"),
        Some(stored.clone())
    );
    assert_eq!(
        store.count(&a, Some("sky")).await.expect("count"),
        stored.chunk_count
    );

    // v7 with the same content: recorded without embedding; then v6 is stale.
    let v7 = doc("acme", "sky", &new_text, Some(7));
    assert_eq!(
        pipeline.process(&v7).await.expect("process"),
        Processed::Unchanged
    );
    assert_eq!(embedder.calls(), calls);
    let chunks = stored_chunks(&*store, &a, "sky").await;
    assert_eq!(chunks.len(), stored.chunk_count);
    assert!(chunks.iter().all(|c| c.version == Some(7)), "{chunks:#?}");
    let v6 = doc("acme", "sky", &old_text, Some(6));
    assert_eq!(
        pipeline.process(&v6).await.expect("process"),
        Processed::Stale { stored: 7 }
    );
    assert!(
        stored_chunks(&*store, &a, "sky")
            .await
            .iter()
            .all(|c| c.text.contains("comet"))
    );

    // A newer version with new content does replace it.
    let v8 = doc("acme", "sky", &old_text, Some(8));
    assert_eq!(
        pipeline.process(&v8).await.expect("process"),
        Processed::Stored {
            chunks: chunk_count(&old_text),
            reused: 0,
        }
    );
    let chunks = stored_chunks(&*store, &a, "sky").await;
    assert_eq!(chunks.len(), chunk_count(&old_text));
    assert!(
        chunks
            .iter()
            .all(|c| c.version == Some(8) && c.text.contains("asteroid"))
    );

    drop(pipeline);
    drop(store);
    backend.finish().await;
}

/// Re-submitting unchanged content makes zero embedding calls and writes nothing; a metadata
/// change is recorded without embedding either.
async fn unchanged_content_makes_no_embedder_call<B: Backend>(backend: B) {
    let store = Arc::new(open(&backend).await);
    let (pipeline, embedder) = pipeline(Arc::clone(&store));
    let a = tenant("acme");
    let text = paragraphs("lantern", 3);

    let mut d = doc("acme", "notes", &text, Some(1));
    d.metadata
        .insert("title".into(), serde_json::json!("Lanterns"));
    assert_eq!(
        pipeline.process(&d).await.expect("process"),
        Processed::Stored {
            chunks: 3,
            reused: 0
        }
    );
    assert_eq!(embedder.calls(), 1);
    assert_eq!(embedder.texts(), 3);
    let before = stored_chunks(&*store, &a, "notes").await;

    // Identical message (a redelivery): no embedding, no write (ingested_at unchanged).
    assert_eq!(
        pipeline.process(&d).await.expect("process"),
        Processed::Unchanged
    );
    assert_eq!(embedder.calls(), 1);
    assert_eq!(stored_chunks(&*store, &a, "notes").await, before);

    // Same content, new metadata: no embedding, metadata updated on every chunk.
    d.metadata
        .insert("title".into(), serde_json::json!("Lanterns, revised"));
    assert_eq!(
        pipeline.process(&d).await.expect("process"),
        Processed::Unchanged
    );
    assert_eq!(embedder.calls(), 1);
    let after = stored_chunks(&*store, &a, "notes").await;
    assert_eq!(after.len(), 3);
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(new.metadata["title"], "Lanterns, revised");
        assert_eq!(new.text, old.text);
        assert_eq!(new.content_sha256, old.content_sha256);
    }

    // New content is embedded again.
    let changed = doc("acme", "notes", &paragraphs("candle", 3), Some(2));
    pipeline.process(&changed).await.expect("process");
    assert_eq!(embedder.calls(), 2);

    // The same content without a version: recorded as unversioned, still no embedding.
    let unversioned = doc("acme", "notes", &changed.content, None);
    assert_eq!(
        pipeline.process(&unversioned).await.expect("process"),
        Processed::Unchanged
    );
    assert_eq!(embedder.calls(), 2);
    let chunks = stored_chunks(&*store, &a, "notes").await;
    assert_eq!(chunks.len(), 3);
    assert!(chunks.iter().all(|c| c.version.is_none()), "{chunks:#?}");
    assert_eq!(
        pipeline.process(&unversioned).await.expect("process"),
        Processed::Unchanged
    );
    assert_eq!(embedder.calls(), 2);

    drop(pipeline);
    drop(store);
    backend.finish().await;
}

/// `op=delete` removes that tenant's chunks of that document (leaving a tombstone in chunk 0's
/// place) and nothing else.
async fn delete_touches_one_tenants_document_only<B: Backend>(backend: B) {
    let store = Arc::new(open(&backend).await);
    let (pipeline, _) = pipeline(Arc::clone(&store));
    let a = tenant("acme");
    let g = tenant("globex");

    let text = paragraphs("copper", 3);
    for d in [
        doc("acme", "d1", &text, None),
        doc("acme", "d2", &paragraphs("willow", 2), None),
        doc("globex", "d1", &text, None),
    ] {
        pipeline.process(&d).await.expect("process");
    }
    let d2 = store.count(&a, Some("d2")).await.expect("count");
    let g1 = store.count(&g, Some("d1")).await.expect("count");
    assert!(d2 > 0 && g1 > 0);

    assert_eq!(
        pipeline
            .process(&Document::delete(a.clone(), "d1"))
            .await
            .expect("process"),
        Processed::Deleted
    );
    assert_eq!(store.count(&a, Some("d1")).await.expect("count"), 0);
    let tombstone = store
        .first_chunk(&a, "d1")
        .await
        .expect("read")
        .expect("a tombstone in chunk 0's place");
    assert!(
        tombstone.tombstone && tombstone.text.is_empty(),
        "{tombstone:?}"
    );
    assert_eq!(store.count(&a, Some("d2")).await.expect("count"), d2);
    assert_eq!(store.count(&g, Some("d1")).await.expect("count"), g1);
    assert!(
        !store
            .first_chunk(&g, "d1")
            .await
            .expect("read")
            .expect("globex's d1 is untouched")
            .tombstone
    );

    // Deleting a missing document is fine and changes nothing.
    assert_eq!(
        pipeline
            .process(&Document::delete(a.clone(), "never"))
            .await
            .expect("process"),
        Processed::Deleted
    );
    assert_eq!(store.count(&a, None).await.expect("count"), d2);

    drop(pipeline);
    drop(store);
    backend.finish().await;
}

/// Search results and deletes stay inside one tenant even when ids, content and vectors are
/// identical across tenants.
async fn search_and_delete_never_cross_tenants<B: Backend>(backend: B) {
    let store = open(&backend).await;
    let a = tenant("tenant-a");
    let b = tenant("tenant-b");

    store
        .upsert(points(&a, "doc", 20, "a", 1, 40))
        .await
        .expect("upsert");
    store
        .upsert(points(&b, "doc", 20, "a", 1, 40))
        .await
        .expect("upsert");

    // Near chunk 7's vector (seed 8), not identical.
    let mut query = unit_vector(8);
    for (q, noise) in query.iter_mut().zip(unit_vector(999)) {
        *q += 0.05 * noise;
    }
    let hits = store
        .search(SearchRequest::new(a.clone(), query.clone(), 5))
        .await
        .expect("search");
    assert_eq!(hits.len(), 5);
    assert_eq!(hits[0].payload.chunk_index, 7);
    assert!(hits[0].score > 0.9, "score {}", hits[0].score);
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    assert!(hits.iter().all(|h| h.payload.tenant_id == "tenant-a"));
    // More than the tenant has: only its 20.
    let all = store
        .search(SearchRequest::new(a.clone(), query.clone(), 100))
        .await
        .expect("search");
    assert_eq!(all.len(), 20);
    assert!(all.iter().all(|h| h.payload.tenant_id == "tenant-a"));
    assert!(
        store
            .search(SearchRequest::new(tenant("nobody"), query.clone(), 5))
            .await
            .expect("search")
            .is_empty()
    );
    assert!(
        store
            .search(SearchRequest::new(a.clone(), query.clone(), 0))
            .await
            .expect("search")
            .is_empty()
    );

    // Deleting A's document (all of it, or only other revisions) leaves B's alone.
    store
        .delete_document(
            &a,
            "doc",
            Some(&Revision {
                content_sha256: "other".into(),
                version: Some(1),
                chunk_count: 20,
            }),
        )
        .await
        .expect("delete");
    assert_eq!(store.count(&a, Some("doc")).await.expect("count"), 0);
    assert_eq!(store.count(&b, Some("doc")).await.expect("count"), 20);
    store
        .delete_document(&b, "doc", None)
        .await
        .expect("delete");
    assert_eq!(store.count(&b, None).await.expect("count"), 0);

    // first_chunk never returns another tenant's point.
    store
        .upsert(points(&b, "doc", 2, "a", 1, 40))
        .await
        .expect("upsert");
    assert_eq!(store.first_chunk(&a, "doc").await.expect("read"), None);

    drop(store);
    backend.finish().await;
}

/// `purge_tenant` removes every point of one tenant and nothing of another.
async fn purge_tenant_removes_only_that_tenant<B: Backend>(backend: B) {
    let store = open(&backend).await;
    let a = tenant("acme");
    let g = tenant("globex");
    for (i, d) in ["d1", "d2", "d3"].into_iter().enumerate() {
        store
            .upsert(points(&a, d, 4, "a", i as u64 * 10, 40))
            .await
            .expect("upsert");
        store
            .upsert(points(&g, d, 3, "a", i as u64 * 10, 40))
            .await
            .expect("upsert");
    }
    assert_eq!(store.count(&a, None).await.expect("count"), 12);

    store.purge_tenant(&a).await.expect("purge");
    assert_eq!(store.count(&a, None).await.expect("count"), 0);
    assert_eq!(store.first_chunk(&a, "d1").await.expect("read"), None);
    assert!(
        store
            .search(SearchRequest::new(a.clone(), unit_vector(1), 10))
            .await
            .expect("search")
            .is_empty()
    );
    assert_eq!(store.count(&g, None).await.expect("count"), 9);
    assert_eq!(store.count(&g, Some("d2")).await.expect("count"), 3);

    // Purging again, or a tenant without points, is fine.
    store.purge_tenant(&a).await.expect("purge");
    store.purge_tenant(&tenant("nobody")).await.expect("purge");
    assert_eq!(store.count(&g, None).await.expect("count"), 9);

    drop(store);
    backend.finish().await;
}

/// Exact metadata matches (string, integer, boolean) and the score threshold narrow results,
/// in the store and through the search library; hits carry version and byte range.
async fn metadata_filter_and_score_threshold<B: Backend>(backend: B) {
    let store = Arc::new(open(&backend).await);
    let (pipeline, _) = pipeline(Arc::clone(&store));
    let a = tenant("acme");

    let docs = [
        (
            "retries",
            "Retry policy",
            2024,
            true,
            "A client should wait with exponential backoff and jitter before retrying a failed request to a busy server.",
        ),
        (
            "backoff",
            "Retry policy draft",
            2023,
            false,
            "Backoff delays double after each failed attempt, up to a ceiling, so that overloaded servers can recover.",
        ),
        (
            "pasta",
            "Cooking",
            2024,
            false,
            "Boil the pasta in salted water for nine minutes and keep a cup of the starchy water for the sauce.",
        ),
    ];
    for (id, title, year, published, text) in docs {
        let mut d = doc("acme", id, text, Some(3));
        d.metadata.insert("title".into(), serde_json::json!(title));
        d.metadata.insert("year".into(), serde_json::json!(year));
        d.metadata
            .insert("published".into(), serde_json::json!(published));
        pipeline.process(&d).await.expect("process");
    }
    // Another tenant with the same title never shows up.
    let mut foreign = doc("globex", "retries", docs[0].4, Some(1));
    foreign
        .metadata
        .insert("title".into(), serde_json::json!("Retry policy"));
    pipeline.process(&foreign).await.expect("process");

    let searcher = Searcher::new(common::embedder(), Arc::clone(&store));
    let query = "how long to wait before trying a request again";

    let hits = searcher
        .search_with(
            "acme",
            query,
            &SearchOptions::new(10).metadata_eq("title", "Retry policy"),
        )
        .await
        .expect("search");
    assert_eq!(hits.len(), 1, "{hits:#?}");
    assert_eq!(hits[0].document_id, "retries");
    assert_eq!(hits[0].version, Some(3));
    assert_eq!(hits[0].byte_range, 0..docs[0].4.len());
    assert_eq!(hits[0].text, docs[0].4);

    // Exact, not a substring or token match.
    let hits = searcher
        .search_with(
            "acme",
            query,
            &SearchOptions::new(10).metadata_eq("title", "Retry"),
        )
        .await
        .expect("search");
    assert!(hits.is_empty(), "{hits:#?}");

    // Integer and boolean values; several conditions must all hold.
    let hits = searcher
        .search_with(
            "acme",
            query,
            &SearchOptions::new(10).metadata_eq("year", 2024i64),
        )
        .await
        .expect("search");
    let mut ids: Vec<&str> = hits.iter().map(|h| h.document_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["pasta", "retries"]);
    let hits = searcher
        .search_with(
            "acme",
            query,
            &SearchOptions::new(10)
                .metadata_eq("year", 2024i64)
                .metadata_eq("published", false),
        )
        .await
        .expect("search");
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].document_id, "pasta");

    // Score threshold (cosine similarity: a dense search): between the best (a retry
    // document) and the worst (pasta).
    let dense = SearchOptions::new(10).mode(SearchMode::Dense);
    let all = searcher
        .search_with("acme", query, &dense)
        .await
        .expect("search");
    assert_eq!(all.len(), 3);
    assert_ne!(all[0].document_id, "pasta");
    assert_eq!(all[2].document_id, "pasta");
    let threshold = (all[1].score + all[2].score) / 2.0;
    let above = searcher
        .search_with("acme", query, &dense.clone().min_score(threshold))
        .await
        .expect("search");
    assert_eq!(above.len(), 2, "threshold {threshold}: {above:#?}");
    assert!(above.iter().all(|h| h.score >= threshold));
    let none = searcher
        .search_with("acme", query, &dense.clone().min_score(0.999))
        .await
        .expect("search");
    assert!(none.is_empty(), "{none:#?}");

    // The store itself: an exact synthetic hit scores ~1 and passes a high threshold.
    store
        .upsert(points(&a, "synthetic", 3, "s", 500, 40))
        .await
        .expect("upsert");
    let request = SearchRequest {
        min_score: Some(0.99),
        ..SearchRequest::new(a.clone(), unit_vector(501), 10)
    };
    let hits = store.search(request).await.expect("search");
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].payload.document_id, "synthetic");
    assert_eq!(hits[0].payload.chunk_index, 1);
    let request = SearchRequest {
        filter: SearchFilter::default().metadata_eq("title", "synthetic title"),
        ..SearchRequest::new(a.clone(), unit_vector(7), 10)
    };
    assert_eq!(store.search(request).await.expect("search").len(), 3);

    // Invalid filters are refused, not ignored.
    let request = SearchRequest {
        filter: SearchFilter::default().metadata_eq("title.nested", "x"),
        ..SearchRequest::new(a.clone(), unit_vector(7), 10)
    };
    assert!(matches!(
        store.search(request).await,
        Err(StoreError::Rejected(_))
    ));
    let request = SearchRequest {
        min_score: Some(f32::NAN),
        ..SearchRequest::new(a.clone(), unit_vector(7), 10)
    };
    assert!(matches!(
        store.search(request).await,
        Err(StoreError::Rejected(_))
    ));

    drop(pipeline);
    drop(searcher);
    drop(store);
    backend.finish().await;
}

/// A collection records its embedder: another fingerprint refuses to open and says what
/// differs; the original one opens and finds its data.
async fn a_fingerprint_mismatch_refuses_to_open<B: Backend>(backend: B) {
    let a = tenant("acme");
    let fingerprint = model_fingerprint();
    {
        let store = open(&backend).await;
        store
            .upsert(points(&a, "d1", 2, "a", 0, 40))
            .await
            .expect("upsert");
    }

    let other_model = Fingerprint {
        model: "other/model".to_owned(),
        ..fingerprint.clone()
    };
    match backend.open(&other_model, BatchLimits::default()).await {
        Err(StoreError::FingerprintMismatch {
            stored,
            expected,
            differs,
            ..
        }) => {
            assert_eq!(stored, fingerprint.id());
            assert_eq!(expected, other_model.id());
            assert!(differs.contains("model"), "{differs}");
            assert!(differs.contains("other/model"), "{differs}");
        }
        Err(other) => panic!("expected FingerprintMismatch, got {other:?}"),
        Ok(_) => panic!("a store with another embedder must not open"),
    }
    let bigger = Fingerprint {
        dims: 768,
        ..fingerprint.clone()
    };
    match backend.open(&bigger, BatchLimits::default()).await {
        Err(e @ StoreError::FingerprintMismatch { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("dims") || text.contains("vector size"),
                "{text}"
            );
        }
        Err(other) => panic!("expected FingerprintMismatch, got {other:?}"),
        Ok(_) => panic!("a store with another dimension must not open"),
    }
    let raw = Fingerprint {
        normalized: false,
        ..fingerprint.clone()
    };
    assert!(matches!(
        backend.open(&raw, BatchLimits::default()).await,
        Err(StoreError::FingerprintMismatch { .. })
    ));

    let store = open(&backend).await;
    assert_eq!(store.count(&a, None).await.expect("count"), 2);

    drop(store);
    backend.finish().await;
}

/// An upsert larger than the byte cap is split into several requests and every point is
/// stored; a single point above the cap is refused and nothing of its batch is written.
async fn a_batch_over_the_byte_cap_is_split_and_fully_stored<B: Backend>(backend: B) {
    // Each synthetic point: 1536 bytes of vector + ~1.3 KB payload; 8 KiB holds a few.
    let limits = BatchLimits {
        max_points: 1000,
        max_bytes: 8 * 1024,
    };
    let store = Arc::new(
        backend
            .open(&model_fingerprint(), limits)
            .await
            .expect("store opens"),
    );
    let a = tenant("acme");

    let many = points(&a, "big", 40, "a", 0, 1000);
    store.upsert(many).await.expect("split upsert");
    assert_eq!(store.count(&a, Some("big")).await.expect("count"), 40);
    for i in [0, 17, 39] {
        let hits = store
            .search(SearchRequest::new(a.clone(), unit_vector(i), 1))
            .await
            .expect("search");
        assert_eq!(hits[0].payload.chunk_index, i as usize);
    }

    // The point cap splits too.
    let limits = BatchLimits {
        max_points: 3,
        max_bytes: 1024 * 1024,
    };
    drop(store);
    let store = Arc::new(
        backend
            .open(&model_fingerprint(), limits)
            .await
            .expect("store opens"),
    );
    store
        .upsert(points(&a, "many", 10, "a", 100, 40))
        .await
        .expect("split upsert");
    assert_eq!(store.count(&a, Some("many")).await.expect("count"), 10);

    // Through the pipeline: a 10-chunk document with a cap of ~2 chunks per request.
    drop(store);
    let limits = BatchLimits {
        max_points: 1000,
        max_bytes: 6 * 1024,
    };
    let store = Arc::new(
        backend
            .open(&model_fingerprint(), limits)
            .await
            .expect("store opens"),
    );
    let (pipeline, _) = pipeline(Arc::clone(&store));
    let long = doc("acme", "long", &paragraphs("atlas", 10), Some(1));
    assert_eq!(
        pipeline.process(&long).await.expect("process"),
        Processed::Stored {
            chunks: 10,
            reused: 0
        }
    );
    assert_eq!(store.count(&a, Some("long")).await.expect("count"), 10);

    // One point alone above the cap: refused, nothing of the batch written.
    let mut oversized = points(&a, "huge", 3, "a", 300, 100);
    oversized[1].payload.text = "y".repeat(10 * 1024);
    match store.upsert(oversized).await {
        Err(StoreError::Rejected(failure)) => {
            let message = failure.to_string();
            assert!(message.contains("max_batch_bytes"), "{message}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_eq!(store.count(&a, Some("huge")).await.expect("count"), 0);

    drop(pipeline);
    drop(store);
    backend.finish().await;
}

/// Writes the store refuses (wrong dimension, non-finite values, versions too large to
/// compare) are refused whole.
async fn refused_writes_change_nothing<B: Backend>(backend: B) {
    let store = open(&backend).await;
    let a = tenant("acme");

    let mut short = points(&a, "d1", 3, "a", 0, 40);
    short[2].vector.pop();
    match store.upsert(short).await {
        Err(StoreError::Dimension { expected, got }) => {
            assert_eq!((expected, got), (DIMS, DIMS - 1));
        }
        other => panic!("expected a Dimension error, got {other:?}"),
    }
    let mut nan = points(&a, "d1", 2, "a", 0, 40);
    nan[0].vector[0] = f32::NAN;
    assert!(matches!(
        store.upsert(nan).await,
        Err(StoreError::Rejected(_))
    ));
    let mut huge_version = points(&a, "d1", 2, "a", 0, 40);
    huge_version[1].payload.version = Some(u64::MAX);
    assert!(matches!(
        store.upsert(huge_version).await,
        Err(StoreError::Rejected(_))
    ));
    assert_eq!(store.count(&a, None).await.expect("count"), 0);
    assert!(matches!(
        store
            .search(SearchRequest::new(a.clone(), vec![0.5; DIMS + 1], 3))
            .await,
        Err(StoreError::Dimension { .. })
    ));

    drop(store);
    backend.finish().await;
}

/// A point stored under one tenant's id whose payload claims another tenant is refused, not
/// returned, and invisible to the other tenant.
async fn a_forged_payload_is_never_returned_to_another_tenant<B: Backend>(backend: B) {
    let store = open(&backend).await;
    let a = tenant("acme");
    let g = tenant("globex");

    let mut forged = points(&g, "d1", 1, "a", 1, 40);
    forged[0].id = point_id(&a, "d1", 0);
    store.upsert(forged).await.expect("upsert");

    assert!(matches!(
        store.first_chunk(&a, "d1").await,
        Err(StoreError::Rejected(_))
    ));
    assert_eq!(store.first_chunk(&g, "d1").await.expect("read"), None);
    assert!(matches!(
        store.chunk_vectors(&a, "d1", 1).await,
        Err(StoreError::Rejected(_))
    ));
    assert!(
        store
            .chunk_vectors(&g, "d1", 1)
            .await
            .expect("read")
            .is_empty()
    );
    // Searches filter on the payload's tenant: the point is globex's, never acme's.
    assert!(
        store
            .search(SearchRequest::new(a.clone(), unit_vector(1), 5))
            .await
            .expect("search")
            .is_empty()
    );
    assert_eq!(
        store
            .search(SearchRequest::new(g.clone(), unit_vector(1), 5))
            .await
            .expect("search")
            .len(),
        1
    );

    drop(store);
    backend.finish().await;
}

/// A store hook: the next upsert writes only its first `partial` points, then fails
/// transiently (a write interrupted between two batches).
#[derive(Default)]
struct Interrupt {
    partial: std::sync::Mutex<Option<usize>>,
    /// Set while a cut write is under way: its success is turned into the failure.
    cut: std::sync::atomic::AtomicBool,
}

impl Hook for Interrupt {
    async fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        if let Some(points) = call.points {
            let partial = self.partial.lock().expect("lock").take();
            if let Some(n) = partial {
                points.truncate(n);
                self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        Ok(())
    }

    async fn after(&self, op: Op, _ok: bool) -> Result<(), StoreError> {
        let write = matches!(op, Op::Upsert | Op::UpsertNewer);
        if write && self.cut.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Unavailable("interrupted".into()));
        }
        Ok(())
    }
}

/// A new revision whose write was cut off halfway is not mistaken for stored: the retry
/// writes it completely (chunk 0, which identifies the stored revision, is written last),
/// embedding only the chunks the interrupted write did not store, and the old revision's
/// extra chunks are removed.
async fn an_interrupted_write_is_completed_by_the_retry<B: Backend>(backend: B) {
    let inner = Arc::new(open(&backend).await);
    let store = Arc::new(FaultStore::new(Arc::clone(&inner), Interrupt::default()));
    let (pipeline, embedder) = pipeline(Arc::clone(&store));
    let a = tenant("acme");

    let v1 = doc("acme", "atlas", &paragraphs("island", 4), Some(1));
    pipeline.process(&v1).await.expect("process");
    let v2_text = paragraphs("volcano", 6);
    let v2 = doc("acme", "atlas", &v2_text, Some(2));

    *store.partial.lock().expect("lock") = Some(3);
    let failure = pipeline.process(&v2).await.expect_err("interrupted");
    assert!(failure.kind.is_transient(), "{failure}");
    let calls = embedder.calls();
    let texts = embedder.texts();
    // Chunk 0 still names revision 1.
    let first = inner
        .first_chunk(&a, "atlas")
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(first.version, Some(1));

    // The 3 chunks the interrupted write stored (1, 2 and 3: chunk 0 goes last) keep their
    // vectors; the retry embeds the other 3.
    assert_eq!(
        pipeline.process(&v2).await.expect("process"),
        Processed::Stored {
            chunks: 6,
            reused: 3
        }
    );
    assert_eq!(
        embedder.calls(),
        calls + 1,
        "the retry embeds what is missing"
    );
    assert_eq!(embedder.texts(), texts + 3);
    let chunks = stored_chunks(&*inner, &a, "atlas").await;
    assert_eq!(chunks.len(), 6);
    assert!(
        chunks
            .iter()
            .all(|c| c.version == Some(2) && c.text.contains("volcano")),
        "{chunks:#?}"
    );

    drop(pipeline);
    drop(store);
    drop(inner);
    backend.finish().await;
}

/// `chunk_vectors` returns the stored chunks of one document, in order, with the vectors
/// written; missing chunks are left out and nothing of another document or tenant appears.
async fn stored_vectors_are_read_back_by_chunk<B: Backend>(backend: B) {
    let store = open(&backend).await;
    let a = tenant("acme");
    let g = tenant("globex");
    let written = points(&a, "d1", 5, "a", 100, 40);
    store.upsert(written.clone()).await.expect("upsert");
    store
        .upsert(points(&g, "d1", 5, "g", 200, 40))
        .await
        .expect("upsert");
    store
        .upsert(points(&a, "d2", 5, "b", 300, 40))
        .await
        .expect("upsert");

    // Asking for more chunks than stored returns the stored ones.
    let read = store.chunk_vectors(&a, "d1", 8).await.expect("read");
    assert_eq!(read.len(), 5);
    for (chunk, point) in read.iter().zip(&written) {
        assert_eq!(chunk.payload, point.payload);
        let cosine: f32 = chunk
            .vector
            .iter()
            .zip(&point.vector)
            .map(|(x, y)| x * y)
            .sum();
        assert!(
            cosine > 0.99999,
            "vector of chunk {} changed",
            chunk.payload.chunk_index
        );
    }
    assert_eq!(
        store.chunk_vectors(&a, "d1", 2).await.expect("read").len(),
        2
    );
    assert!(
        store
            .chunk_vectors(&a, "d3", 4)
            .await
            .expect("read")
            .is_empty()
    );
    assert!(
        store
            .chunk_vectors(&a, "d1", 0)
            .await
            .expect("read")
            .is_empty()
    );

    drop(store);
    backend.finish().await;
}

/// Editing one paragraph of a 50-chunk document embeds only the chunks whose text changed;
/// every other chunk keeps its stored vector, and every stored vector is still the embedding
/// of its chunk's text.
async fn editing_one_paragraph_embeds_only_the_chunks_it_touches<B: Backend>(backend: B) {
    let store = Arc::new(open(&backend).await);
    let a = tenant("acme");
    let (pipeline, embedder) = pipeline(Arc::clone(&store));
    let original = paragraphs("atlas", 50);
    assert_eq!(chunk_count(&original), 50, "one chunk per paragraph");
    assert_eq!(
        pipeline
            .process(&doc("acme", "atlas", &original, Some(1)))
            .await
            .expect("process"),
        Processed::Stored {
            chunks: 50,
            reused: 0
        }
    );
    let old_texts: Vec<String> = stored_chunks(&*store, &a, "atlas")
        .await
        .into_iter()
        .map(|p| p.text)
        .collect();

    let edited = original.replace(
        "Part 20 of the atlas notes describes",
        "Part 20 of the atlas notes, revised last spring, describes",
    );
    assert_ne!(edited, original);
    let embedder_model = common::embedder();
    let new_texts: Vec<String> = Chunker::new(
        embedder_model.tokenizer().clone(),
        MAX_TOKENS,
        OVERLAP,
        embedder_model.max_input_tokens(),
    )
    .expect("chunker")
    .split(&edited, ChunkFormat::Text)
    .into_iter()
    .map(|c| c.text)
    .collect();
    let touched = new_texts.iter().filter(|t| !old_texts.contains(t)).count();
    assert!(
        (1..=2).contains(&touched),
        "the edit should touch one or two chunks, touched {touched}"
    );

    let texts_before = embedder.texts();
    assert_eq!(
        pipeline
            .process(&doc("acme", "atlas", &edited, Some(2)))
            .await
            .expect("process"),
        Processed::Stored {
            chunks: new_texts.len(),
            reused: new_texts.len() - touched
        }
    );
    assert_eq!(
        embedder.texts() - texts_before,
        touched,
        "only the touched chunks are embedded"
    );

    let stored = store
        .chunk_vectors(&a, "atlas", new_texts.len())
        .await
        .expect("read");
    assert_eq!(stored.len(), new_texts.len());
    assert_eq!(
        store.count(&a, Some("atlas")).await.expect("count"),
        new_texts.len()
    );
    let texts: Vec<&str> = stored.iter().map(|c| c.payload.text.as_str()).collect();
    let fresh = embedder_model.embed_blocking(&texts).expect("embed");
    for (chunk, want) in stored.iter().zip(&fresh) {
        assert_eq!(chunk.payload.version, Some(2));
        let cosine: f32 = chunk.vector.iter().zip(want).map(|(x, y)| x * y).sum();
        assert!(
            cosine > 0.9999,
            "chunk {} holds a vector of another text (cos {cosine})",
            chunk.payload.chunk_index
        );
    }

    drop(pipeline);
    drop(store);
    backend.finish().await;
}

// ---------------------------------------------------------------------------------------
// Several writers of one document (issue: newest wins across workers)
// ---------------------------------------------------------------------------------------

/// A store hook that stops a writer: it signals `paused` after the first read of a
/// document's stored revision (`first_chunk`, which still returns what it read), then waits
/// for `release`: the writer has read the stored revision and stalls (a slow embedder, a GC
/// pause) while another writer stores a different version.
#[derive(Default)]
struct Gate {
    paused: tokio::sync::Notify,
    release: tokio::sync::Notify,
    used: std::sync::atomic::AtomicBool,
}

impl Hook for Gate {
    async fn after(&self, op: Op, _ok: bool) -> Result<(), StoreError> {
        if op == Op::FirstChunk && !self.used.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.paused.notify_one();
            self.release.notified().await;
        }
        Ok(())
    }
}

/// Processes `slow` on `slow_store` up to its first read, then `fast` completely on
/// `fast_store`, then lets `slow` finish; returns both outcomes.
async fn race<S: VectorStore>(
    slow_store: Arc<S>,
    slow: Document,
    fast_store: Arc<S>,
    fast: Document,
) -> (Processed, Processed) {
    let gate = Arc::new(Gate::default());
    let paused = Arc::new(FaultStore::new(slow_store, Arc::clone(&gate)));
    let (slow_pipeline, _) = pipeline(paused);
    let slow_task = tokio::spawn(async move { slow_pipeline.process(&slow).await });
    common::within(
        "the slow writer reads the stored revision",
        gate.paused.notified(),
    )
    .await;
    let (fast_pipeline, _) = pipeline(fast_store);
    let fast_outcome = fast_pipeline.process(&fast).await.expect("fast writer");
    gate.release.notify_one();
    let slow_outcome = common::within("the slow writer finishes", slow_task)
        .await
        .expect("slow task")
        .expect("slow writer");
    (slow_outcome, fast_outcome)
}

/// The document holds exactly the chunks of `content`: every index once, each with
/// `content`'s hash, chunk count and `version`, and nothing else (searches and counts agree).
async fn assert_exactly<S: VectorStore>(
    store: &S,
    t: &TenantId,
    id: &str,
    content: &str,
    version: Option<u64>,
) {
    let expected = chunk_count(content);
    let sha = rag_ingest::process::content_sha256(content);
    let chunks = stored_chunks(store, t, id).await;
    let summary: Vec<_> = chunks
        .iter()
        .map(|c| {
            (
                c.chunk_index,
                c.chunk_count,
                c.version,
                &c.content_sha256[..8],
            )
        })
        .collect();
    assert_eq!(
        chunks.iter().map(|c| c.chunk_index).collect::<Vec<_>>(),
        (0..expected).collect::<Vec<_>>(),
        "exactly the chunks 0..{expected} of the winning revision: {summary:?}"
    );
    assert!(
        chunks
            .iter()
            .all(|c| c.content_sha256 == sha && c.chunk_count == expected && c.version == version),
        "every chunk of the winning revision (version {version:?}): {summary:?}"
    );
    assert_eq!(
        store.count(t, Some(id)).await.expect("count"),
        expected,
        "count agrees"
    );
}

/// The scenario of the issue: worker A (v2) and worker B (v3) both read v1. B stores v3
/// (more chunks than v2) while A is stalled; A then writes v2. Exactly v3 must remain: no v2
/// chunk over v3's, no v3 chunk deleted by A's cleanup.
async fn two_writers_that_read_the_same_revision_leave_only_the_newest<B: Backend>(backend: B) {
    let store = Arc::new(open(&backend).await);
    let other = backend.second_writer(&store).await;
    let a = tenant("acme");
    let (first, _) = pipeline(Arc::clone(&store));
    first
        .process(&doc("acme", "race", &paragraphs("first", 3), Some(1)))
        .await
        .expect("v1");

    let v2_text = paragraphs("second", 4);
    let v3_text = paragraphs("third", 6);
    assert!(chunk_count(&v3_text) > chunk_count(&v2_text));
    let (slow, fast) = race(
        other,
        doc("acme", "race", &v2_text, Some(2)),
        Arc::clone(&store),
        doc("acme", "race", &v3_text, Some(3)),
    )
    .await;
    assert!(matches!(fast, Processed::Stored { .. }), "{fast:?}");
    assert_eq!(slow, Processed::Stale { stored: 3 }, "v2 lost to v3");
    assert_exactly(&*store, &a, "race", &v3_text, Some(3)).await;

    drop(first);
    drop(store);
    backend.finish().await;
}

/// The other order: the newer writer (v3) reads first and stalls, the older one (v2) is
/// stored meanwhile; v3 then replaces it entirely, although v2 had more chunks.
async fn a_newer_writer_that_read_first_still_wins<B: Backend>(backend: B) {
    let store = Arc::new(open(&backend).await);
    let other = backend.second_writer(&store).await;
    let a = tenant("acme");
    let v2_text = paragraphs("second", 6);
    let v3_text = paragraphs("third", 3);
    let (slow, fast) = race(
        other,
        doc("acme", "race", &v3_text, Some(3)),
        Arc::clone(&store),
        doc("acme", "race", &v2_text, Some(2)),
    )
    .await;
    assert!(matches!(fast, Processed::Stored { .. }), "{fast:?}");
    assert!(matches!(slow, Processed::Stored { .. }), "{slow:?}");
    assert_exactly(&*store, &a, "race", &v3_text, Some(3)).await;

    drop(store);
    backend.finish().await;
}

/// Documents without a version follow "last processed wins": the writer that stores last
/// wins, whole (never a mix of two contents), whichever read first.
async fn without_versions_the_last_processed_write_wins_whole<B: Backend>(backend: B) {
    let store = Arc::new(open(&backend).await);
    let other = backend.second_writer(&store).await;
    let a = tenant("acme");
    let (first, _) = pipeline(Arc::clone(&store));
    first
        .process(&doc("acme", "plain", &paragraphs("first", 2), None))
        .await
        .expect("first");
    let slow_text = paragraphs("slow", 3);
    let fast_text = paragraphs("fast", 5);
    let (slow, fast) = race(
        other,
        doc("acme", "plain", &slow_text, None),
        Arc::clone(&store),
        doc("acme", "plain", &fast_text, None),
    )
    .await;
    assert!(matches!(fast, Processed::Stored { .. }), "{fast:?}");
    assert!(matches!(slow, Processed::Stored { .. }), "{slow:?}");
    assert_exactly(&*store, &a, "plain", &slow_text, None).await;

    drop(first);
    drop(store);
    backend.finish().await;
}

/// A delete of version 2 leaves a tombstone: the v1 upsert that arrives afterwards (from a
/// retry tier or a DLQ replay) is stale and stores nothing; an older delete is stale too; a
/// newer upsert brings the document back. Tombstones are never searched or counted.
async fn a_delete_is_not_undone_by_an_older_upsert_arriving_later<B: Backend>(backend: B) {
    let store = Arc::new(open(&backend).await);
    let (pipeline, embedder) = pipeline(Arc::clone(&store));
    let a = tenant("acme");
    let v1_text = paragraphs("first", 3);
    let v1 = doc("acme", "gone", &v1_text, Some(1));
    pipeline.process(&v1).await.expect("v1");
    let mut delete_v2 = Document::delete(a.clone(), "gone");
    delete_v2.version = Some(2);
    assert_eq!(
        pipeline.process(&delete_v2).await.expect("delete"),
        Processed::Deleted
    );
    assert_eq!(store.count(&a, Some("gone")).await.expect("count"), 0);
    assert!(stored_chunks(&*store, &a, "gone").await.is_empty());

    let calls = embedder.calls();
    assert_eq!(
        pipeline.process(&v1).await.expect("replayed v1"),
        Processed::Stale { stored: 2 },
        "the replayed older upsert is recognised as stale"
    );
    assert_eq!(embedder.calls(), calls, "and never embedded");
    let mut delete_v1 = Document::delete(a.clone(), "gone");
    delete_v1.version = Some(1);
    assert_eq!(
        pipeline.process(&delete_v1).await.expect("older delete"),
        Processed::Stale { stored: 2 }
    );
    assert_eq!(store.count(&a, Some("gone")).await.expect("count"), 0);
    assert!(stored_chunks(&*store, &a, "gone").await.is_empty());
    assert_eq!(
        store.count(&a, None).await.expect("count"),
        0,
        "no tombstone is counted"
    );

    // A delete of a document that was never stored leaves a tombstone too.
    let mut delete_new = Document::delete(a.clone(), "never");
    delete_new.version = Some(5);
    pipeline.process(&delete_new).await.expect("delete");
    assert_eq!(
        pipeline
            .process(&doc("acme", "never", &v1_text, Some(4)))
            .await
            .expect("late v4"),
        Processed::Stale { stored: 5 }
    );

    // A newer version brings the document back, whole.
    let v3_text = paragraphs("third", 2);
    let v3 = doc("acme", "gone", &v3_text, Some(3));
    assert!(matches!(
        pipeline.process(&v3).await.expect("v3"),
        Processed::Stored { .. }
    ));
    assert_exactly(&*store, &a, "gone", &v3_text, Some(3)).await;

    drop(pipeline);
    drop(store);
    backend.finish().await;
}

// ---------------------------------------------------------------------------------------
// Keyword and hybrid search, contextual chunks (issue 17)
// ---------------------------------------------------------------------------------------

/// A document with one exact term (an error code) that the others do not have.
const ERROR_DOC: &str = "When an upload fails, the worker waits and tries again, doubling the \
    delay each time. Error E4012 means the vector store refused the batch because a point was \
    larger than the byte cap.";

/// Stores `ERROR_DOC` as `errors` and four documents of other topics for tenant `t`.
async fn store_corpus<E: Embedder, S: VectorStore>(pipeline: &Pipeline<E, S>, t: &str) {
    let mut docs = vec![doc(t, "errors", ERROR_DOC, Some(1))];
    for topic in ["gardening", "astronomy", "cooking", "sailing"] {
        docs.push(doc(t, topic, &paragraphs(topic, 2), Some(1)));
    }
    for d in &docs {
        let outcome = pipeline.process(d).await.expect("stored");
        assert!(matches!(outcome, Processed::Stored { .. }), "{outcome:?}");
    }
}

/// A keyword search finds the one document with an exact term at rank 1 (no model call
/// needed); a hybrid search returns it first with its rank in each branch; a dense search
/// reports dense ranks only. Deleted documents are not found by keyword either.
async fn keyword_and_hybrid_search_find_exact_terms_with_ranks_per_branch<B: Backend>(backend: B) {
    let store = Arc::new(open(&backend).await);
    let (pipeline, embedder) = pipeline(Arc::clone(&store));
    store_corpus(&pipeline, "kw").await;
    let searcher = Searcher::new(Arc::clone(&embedder), Arc::clone(&store));

    let calls = embedder.calls();
    let sparse = searcher
        .search_with(
            "kw",
            "E4012",
            &SearchOptions::new(5).mode(SearchMode::Sparse),
        )
        .await
        .expect("keyword search");
    assert_eq!(embedder.calls(), calls, "a keyword search embeds nothing");
    assert!(!sparse.is_empty(), "the exact term is found");
    assert!(
        sparse.iter().all(|hit| hit.document_id == "errors"),
        "only the document with the term matches: {:?}",
        sparse.iter().map(|h| &h.document_id).collect::<Vec<_>>()
    );
    assert_eq!(sparse[0].ranks.sparse, Some(1));
    assert_eq!(sparse[0].ranks.dense, None);

    let hybrid = searcher
        .search_with("kw", "error E4012", &SearchOptions::new(5))
        .await
        .expect("hybrid search (the default)");
    assert_eq!(hybrid[0].document_id, "errors", "{hybrid:?}");
    assert_eq!(hybrid[0].ranks.sparse, Some(1), "{:?}", hybrid[0].ranks);
    assert!(hybrid[0].ranks.dense.is_some(), "{:?}", hybrid[0].ranks);
    assert!(hybrid.windows(2).all(|w| w[0].score >= w[1].score));
    // With reciprocal rank fusion, scores are sums of 1 / (k + rank - 1) per branch: at most
    // 2 / k, best first, and the same document leads.
    let k = rag_ingest::store::RRF_K;
    let rrf = searcher
        .search_with(
            "kw",
            "error E4012",
            &SearchOptions::new(5).fusion(rag_ingest::search::Fusion::Rrf { k }),
        )
        .await
        .expect("hybrid search with RRF");
    assert_eq!(rrf[0].document_id, "errors", "{rrf:?}");
    let best = 2.0 / k as f32;
    assert!(
        rrf.iter().all(|h| h.score > 0.0 && h.score <= best + 1e-6),
        "{rrf:?}"
    );
    assert!(rrf.windows(2).all(|w| w[0].score >= w[1].score));

    let dense = searcher
        .search_with(
            "kw",
            "vegetables in the garden",
            &SearchOptions::new(3).mode(SearchMode::Dense),
        )
        .await
        .expect("dense search");
    for (i, hit) in dense.iter().enumerate() {
        assert_eq!(hit.ranks.dense, Some(i + 1));
        assert_eq!(hit.ranks.sparse, None);
    }

    let deleted = Document::delete(tenant("kw"), "errors");
    pipeline.process(&deleted).await.expect("deleted");
    for mode in [SearchMode::Sparse, SearchMode::Hybrid] {
        let hits = searcher
            .search_with("kw", "E4012", &SearchOptions::new(5).mode(mode))
            .await
            .expect("search after the delete");
        assert!(
            hits.iter().all(|hit| hit.document_id != "errors"),
            "{mode}: a deleted document was found"
        );
    }
    backend.finish().await;
}

/// Both branches of a hybrid search (and a keyword search) are scoped to the tenant and
/// narrowed by the metadata filter: another tenant's document with the same term, or one of
/// the tenant's documents outside the filter, is never returned.
async fn keyword_and_hybrid_search_stay_in_the_tenant_and_apply_filters_to_every_branch<
    B: Backend,
>(
    backend: B,
) {
    let store = Arc::new(open(&backend).await);
    let (pipeline, embedder) = pipeline(Arc::clone(&store));
    store_corpus(&pipeline, "ta").await;
    store_corpus(&pipeline, "tb").await;
    let mut tagged = doc("ta", "errors-ops", ERROR_DOC, Some(1));
    tagged
        .metadata
        .insert("team".into(), serde_json::json!("ops"));
    pipeline.process(&tagged).await.expect("stored");
    let searcher = Searcher::new(embedder, Arc::clone(&store));

    for mode in [SearchMode::Sparse, SearchMode::Hybrid] {
        let hits = searcher
            .search_with(
                "ta",
                "E4012 refused batch",
                &SearchOptions::new(20).mode(mode),
            )
            .await
            .expect("search");
        assert!(!hits.is_empty());
        assert!(
            hits.iter()
                .all(|hit| hit.metadata.get("team").is_none() || hit.document_id == "errors-ops"),
            "{mode}"
        );
        let ids: std::collections::HashSet<_> =
            hits.iter().map(|h| h.document_id.as_str()).collect();
        assert!(
            ids.contains("errors") && ids.contains("errors-ops"),
            "{mode}: {ids:?}"
        );

        let filtered = searcher
            .search_with(
                "ta",
                "E4012 refused batch",
                &SearchOptions::new(20).mode(mode).metadata_eq("team", "ops"),
            )
            .await
            .expect("filtered search");
        assert!(!filtered.is_empty(), "{mode}");
        assert!(
            filtered.iter().all(|hit| hit.document_id == "errors-ops"),
            "{mode}: the filter applies to every branch: {:?}",
            filtered.iter().map(|h| &h.document_id).collect::<Vec<_>>()
        );
    }
    // Raw store requests: a hit of another tenant would fail the search, not be returned.
    let encoder = rag_ingest::sparse::SparseEncoder::bm25();
    let request = SearchRequest::new(tenant("tb"), unit_vector(7), 50)
        .with_mode(SearchMode::Hybrid, encoder.query("E4012"));
    let hits = store.search(request).await.expect("hybrid store search");
    assert!(hits.iter().all(|h| h.payload.tenant_id == "tb"));
    backend.finish().await;
}

/// A collection created before hybrid search (dense vectors only) is refused by a pipeline
/// that writes keyword vectors, saying what differs and how to migrate; opened as it is, it
/// answers dense searches and refuses keyword ones with the same advice.
async fn a_collection_without_keyword_vectors_is_refused_with_the_migration<B: Backend>(
    backend: B,
) {
    let dense_only = common::embedder().fingerprint().clone();
    assert!(dense_only.sparse.is_none());
    let legacy = Arc::new(
        backend
            .open(&dense_only, BatchLimits::default())
            .await
            .expect("a dense-only collection opens"),
    );
    let (pipeline, embedder) = pipeline(Arc::clone(&legacy));
    store_corpus(&pipeline, "old").await;

    let searcher = Searcher::new(embedder, Arc::clone(&legacy));
    let dense = searcher
        .search_with(
            "old",
            "error codes",
            &SearchOptions::new(3).mode(SearchMode::Dense),
        )
        .await
        .expect("dense search still works");
    assert!(!dense.is_empty());
    match searcher
        .search_with(
            "old",
            "E4012",
            &SearchOptions::new(3).mode(SearchMode::Sparse),
        )
        .await
    {
        Err(rag_ingest::search::SearchError::Store(StoreError::Rejected(failure))) => {
            assert!(failure.reason.contains("reindex"), "{failure}");
        }
        other => panic!("a keyword search of a dense-only collection must be refused: {other:?}"),
    }
    drop(searcher);
    drop(pipeline);
    drop(legacy);

    match backend
        .open(&model_fingerprint(), BatchLimits::default())
        .await
    {
        Err(StoreError::FingerprintMismatch { differs, .. }) => {
            assert!(differs.contains("sparse"), "{differs}");
            assert!(differs.contains("reindex"), "{differs}");
        }
        Err(other) => panic!("expected FingerprintMismatch, got {other:?}"),
        Ok(_) => panic!("a collection without keyword vectors must not open for hybrid search"),
    }
    backend.finish().await;
}

/// With `chunking.context = "headings"`, each chunk is embedded after the document title and
/// its heading path, which is stored as `context` beside the chunk's own text (on both
/// stores) and counted within the token limit; a new title re-embeds the document although
/// its content is unchanged, and the same title does not.
async fn contextual_chunks_store_their_context_and_reembed_on_a_new_title<B: Backend>(backend: B) {
    let store = Arc::new(open(&backend).await);
    let embedder = Arc::new(CountingEmbedder::new());
    let mode = rag_ingest::context::ContextMode::Headings;
    let budget = rag_ingest::context::Contextualizer::budget_for(mode, MAX_TOKENS);
    // The pipeline's chunker and contextualizer (built again below for `embed_texts`).
    let stages = || {
        let chunker = Chunker::new(
            embedder.tokenizer().clone(),
            MAX_TOKENS - budget,
            OVERLAP,
            embedder.max_input_tokens(),
        )
        .expect("chunker");
        let context =
            rag_ingest::context::Contextualizer::new(mode, embedder.tokenizer(), MAX_TOKENS);
        (chunker, context)
    };
    let (chunker, context) = stages();
    let pipeline = Pipeline::new(Arc::new(chunker), Arc::clone(&embedder), Arc::clone(&store))
        .with_context(context);

    let content = format!(
        "# Retries\n\n{}\n\n## Backoff\n\n{}\n",
        paragraphs("retry", 2),
        paragraphs("backoff", 2)
    );
    let mut d = doc("ctx", "handbook", &content, Some(1));
    d.content_type = "text/markdown".into();
    d.metadata
        .insert("title".into(), serde_json::json!("Handbook"));
    assert!(matches!(
        pipeline.process(&d).await,
        Ok(Processed::Stored { .. })
    ));

    let stored = stored_chunks(store.as_ref(), &tenant("ctx"), "handbook").await;
    assert!(stored.len() >= 3, "{} chunks", stored.len());
    let contexts: Vec<_> = stored.iter().map(|c| c.context.clone()).collect();
    assert!(
        contexts
            .iter()
            .all(|c| c.as_deref().is_some_and(|c| c.starts_with("Handbook"))),
        "{contexts:?}"
    );
    assert!(
        contexts
            .iter()
            .any(|c| c.as_deref() == Some("Handbook › Retries › Backoff")),
        "{contexts:?}"
    );
    // `process::embed_texts` (what the pipeline bench embeds as the worker's work) is
    // exactly what was embedded for each stored chunk, in chunk order.
    let (same_chunker, same_context) = stages();
    let texts = rag_ingest::process::embed_texts(
        &same_chunker,
        &same_context,
        &rag_ingest::extract::ExtractLimits::default(),
        &d,
    )
    .expect("embed texts");
    let mut in_order = stored.clone();
    in_order.sort_by_key(|c| c.chunk_index);
    let embedded: Vec<String> = in_order
        .iter()
        .map(|c| rag_ingest::context::embed_text(c.context.as_deref(), &c.text))
        .collect();
    assert_eq!(texts, embedded);
    let tokenizer = embedder.tokenizer();
    for chunk in &stored {
        assert_eq!(
            &content[chunk.byte_start..chunk.byte_end],
            chunk.text,
            "text is the chunk's own bytes"
        );
        let embedded = rag_ingest::context::embed_text(chunk.context.as_deref(), &chunk.text);
        let tokens = tokenizer.encode(embedded, false).expect("tokenize").len();
        assert!(
            tokens <= MAX_TOKENS,
            "{tokens} tokens embedded for chunk {}",
            chunk.chunk_index
        );
    }

    // Same content and title, new version: relabelled, nothing embedded.
    let texts = embedder.texts();
    d.version = Some(2);
    assert_eq!(
        pipeline.process(&d).await.expect("processed"),
        Processed::Unchanged
    );
    assert_eq!(embedder.texts(), texts);

    // A new title changes what is embedded: every chunk is embedded again.
    d.version = Some(3);
    d.metadata
        .insert("title".into(), serde_json::json!("Operations guide"));
    match pipeline.process(&d).await.expect("processed") {
        Processed::Stored { chunks, reused } => {
            assert_eq!(reused, 0, "{chunks} chunks");
            assert_eq!(embedder.texts(), texts + chunks);
        }
        other => panic!("a new title must re-embed, got {other:?}"),
    }
    let stored = stored_chunks(store.as_ref(), &tenant("ctx"), "handbook").await;
    assert!(stored.iter().all(|c| {
        c.context
            .as_deref()
            .is_some_and(|c| c.starts_with("Operations guide"))
    }));
    backend.finish().await;
}
