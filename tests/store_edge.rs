//! Edge-specific integration tests of `EdgeStore` on temporary directories with synthetic
//! vectors: persistence, locking, the fingerprint sidecar, foreign data, optimisation and
//! durability without drop. The behaviour every store shares is in `tests/store_contract.rs`.

use std::path::Path;

use qdrant_edge::{
    EdgeShard, Payload, PointId, PointInsertOperations, PointOperations, PointStructPersisted,
    UpdateOperation, VectorStructPersisted,
};
use rag_ingest::embed::Fingerprint;
use rag_ingest::store::{
    BatchLimits, ChunkPayload, ChunkPoint, EdgeStore, Revision, SearchRequest, StoreError,
    VectorStore, point_id,
};
use rag_ingest::tenant::TenantId;

#[path = "support/vectors.rs"]
mod vectors;
use vectors::{fingerprint, unit_vector};

const COLLECTION: &str = "chunks";

fn tenant(name: &str) -> TenantId {
    TenantId::new(name).expect("valid tenant name")
}

fn payload(tenant: &TenantId, doc: &str, index: usize, count: usize, sha: &str) -> ChunkPayload {
    let mut metadata = serde_json::Map::new();
    metadata.insert(
        "title".to_owned(),
        serde_json::json!(format!("{doc} title")),
    );
    ChunkPayload {
        tenant_id: tenant.as_str().to_owned(),
        document_id: doc.to_owned(),
        version: Some(7),
        chunk_index: index,
        chunk_count: count,
        text: format!("{} {doc} chunk {index} rev {sha}", tenant.as_str()),
        byte_start: index * 100,
        byte_end: index * 100 + 100,
        content_sha256: sha.to_owned(),
        metadata,
        embedder: fingerprint().id(),
        ingested_at: "2025-01-01T00:00:00Z".to_owned(),
        order: None,
        tombstone: false,
        context: None,
        page: None,
    }
}

/// The `count` chunks of `doc` with content hash `sha`; chunk `i` gets vector `seed_base + i`.
fn doc_points(
    tenant: &TenantId,
    doc: &str,
    count: usize,
    sha: &str,
    seed_base: u64,
) -> Vec<ChunkPoint> {
    (0..count)
        .map(|i| ChunkPoint {
            id: point_id(tenant, doc, i),
            vector: unit_vector(seed_base + i as u64),
            sparse: None,
            payload: payload(tenant, doc, i, count, sha),
        })
        .collect()
}

fn open(dir: &Path) -> EdgeStore {
    EdgeStore::open(dir, COLLECTION, &fingerprint()).expect("open store")
}

#[tokio::test]
async fn reopen_after_drop_keeps_data_and_accepts_writes() {
    let dir = tempfile::tempdir().unwrap();
    let a = tenant("acme");

    assert_eq!(
        EdgeStore::recorded_fingerprint(dir.path(), COLLECTION).unwrap(),
        None
    );
    {
        let store = open(dir.path());
        store.upsert(doc_points(&a, "d1", 4, "a", 0)).await.unwrap();
        store
            .upsert(doc_points(&a, "d2", 2, "a", 100))
            .await
            .unwrap();
        store.delete_document(&a, "d2", None).await.unwrap();
    }
    assert_eq!(
        EdgeStore::recorded_fingerprint(dir.path(), COLLECTION).unwrap(),
        Some(fingerprint())
    );

    let store = open(dir.path());
    assert_eq!(store.count(&a, None).await.unwrap(), 4);
    assert_eq!(store.count(&a, Some("d2")).await.unwrap(), 0);
    assert_eq!(
        store.first_chunk(&a, "d1").await.unwrap(),
        Some(payload(&a, "d1", 0, 4, "a"))
    );
    let hits = store
        .search(SearchRequest::new(a.clone(), unit_vector(2), 1))
        .await
        .unwrap();
    assert_eq!(hits[0].payload.chunk_index, 2);

    // Writes after the reopen are applied too.
    store
        .upsert(doc_points(&a, "d3", 3, "a", 300))
        .await
        .unwrap();
    assert_eq!(store.count(&a, None).await.unwrap(), 7);
    store.delete_document(&a, "d1", None).await.unwrap();
    assert_eq!(store.count(&a, None).await.unwrap(), 3);
    drop(store);

    let store = open(dir.path());
    assert_eq!(store.count(&a, None).await.unwrap(), 3);
    assert_eq!(store.count(&a, Some("d3")).await.unwrap(), 3);
}

#[tokio::test]
async fn a_second_open_of_a_live_collection_fails() {
    let dir = tempfile::tempdir().unwrap();
    let _store = open(dir.path());
    let err = EdgeStore::open(dir.path(), COLLECTION, &fingerprint())
        .err()
        .expect("second open must fail");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

/// The refusal itself is a contract test; here: the sidecar is what is compared, a refused
/// open leaves it untouched, and the error names the differing fields.
#[tokio::test]
async fn a_refused_open_leaves_the_sidecar_untouched() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let sidecar = dir.path().join(COLLECTION).join("rag-ingest.json");
    let before = std::fs::read(&sidecar).unwrap();

    let other = Fingerprint {
        model: "other/model".to_owned(),
        dims: 768,
        ..fingerprint()
    };
    let err = EdgeStore::open(dir.path(), COLLECTION, &other)
        .err()
        .expect("open with another fingerprint must fail");
    match &err {
        StoreError::FingerprintMismatch {
            collection,
            differs,
            ..
        } => {
            assert_eq!(collection, COLLECTION);
            assert!(
                differs.contains("model: stored \"test/synthetic\""),
                "{differs}"
            );
            assert!(
                differs.contains("dims: stored 384, configured 768"),
                "{differs}"
            );
            assert!(!differs.contains("pooling"), "{differs}");
        }
        other => panic!("expected FingerprintMismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("differs in"), "{err}");

    assert_eq!(std::fs::read(&sidecar).unwrap(), before);
    assert_eq!(
        EdgeStore::recorded_fingerprint(dir.path(), COLLECTION).unwrap(),
        Some(fingerprint())
    );
    drop(open(dir.path()));
}

/// Upserts split by small caps are applied under one lock and all survive a reopen.
#[tokio::test]
async fn split_upserts_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let a = tenant("acme");
    {
        let store = open(dir.path()).with_batch_limits(BatchLimits {
            max_points: 2,
            max_bytes: 4096,
        });
        assert_eq!(store.batch_limits().max_points, 2);
        store.upsert(doc_points(&a, "d1", 9, "a", 0)).await.unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.count(&a, Some("d1")).await.unwrap(), 9);
}

#[tokio::test]
async fn invalid_names_and_foreign_directories_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["", ".", "..", "a/b", "../x", "a b"] {
        assert!(
            matches!(
                EdgeStore::open(dir.path(), name, &fingerprint()),
                Err(StoreError::Rejected(_))
            ),
            "collection name {name:?} must be rejected"
        );
    }
    let zero = Fingerprint {
        dims: 0,
        ..fingerprint()
    };
    assert!(matches!(
        EdgeStore::open(dir.path(), COLLECTION, &zero),
        Err(StoreError::Rejected(_))
    ));

    // A non-empty directory without a sidecar is not ours.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("data.bin"), b"x").unwrap();
    assert!(matches!(
        EdgeStore::open(dir.path(), "foreign", &fingerprint()),
        Err(StoreError::Rejected(_))
    ));
    assert!(foreign.join("data.bin").exists());

    // A corrupt sidecar is reported, not panicked on.
    let corrupt = dir.path().join("corrupt");
    std::fs::create_dir(&corrupt).unwrap();
    std::fs::write(corrupt.join("rag-ingest.json"), b"{not json").unwrap();
    assert!(matches!(
        EdgeStore::recorded_fingerprint(dir.path(), "corrupt"),
        Err(StoreError::Rejected(_))
    ));
    assert!(matches!(
        EdgeStore::open(dir.path(), "corrupt", &fingerprint()),
        Err(StoreError::Rejected(_))
    ));
}

#[tokio::test]
async fn a_payload_that_is_not_a_chunk_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let a = tenant("acme");
    drop(open(dir.path()));

    // Write a point with a foreign payload directly into the shard.
    {
        let shard = EdgeShard::load(&dir.path().join(COLLECTION), None).unwrap();
        let mut map = serde_json::Map::new();
        map.insert("tenant_id".to_owned(), serde_json::json!("acme"));
        map.insert("document_id".to_owned(), serde_json::json!("d1"));
        map.insert("text".to_owned(), serde_json::json!(42));
        let point = PointStructPersisted {
            id: PointId::Uuid(point_id(&a, "d1", 0)),
            vector: VectorStructPersisted::Single(unit_vector(1)),
            payload: Some(Payload(map)),
        };
        shard
            .update(UpdateOperation::PointOperation(
                PointOperations::UpsertPoints(PointInsertOperations::PointsList(vec![point])),
            ))
            .unwrap();
        shard.flush();
    }

    let store = open(dir.path());
    assert_eq!(store.count(&a, Some("d1")).await.unwrap(), 1);
    assert!(matches!(
        store.first_chunk(&a, "d1").await,
        Err(StoreError::Rejected(_))
    ));
    assert!(matches!(
        store
            .search(SearchRequest::new(a.clone(), unit_vector(1), 3))
            .await,
        Err(StoreError::Rejected(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimize_after_bulk_load_keeps_results_and_tenant_isolation() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = tenant("tenant-a");
    let b = tenant("tenant-b");

    // Enough vectors (> 10 MB) to pass qdrant's default indexing threshold, so optimize
    // really builds an HNSW segment.
    const PER_TENANT: usize = 3500;
    // Both tenants get the same vectors.
    for t in [&a, &b] {
        for batch in 0..(PER_TENANT / 500) {
            let points = (0..500)
                .map(|i| {
                    let n = batch * 500 + i;
                    let doc = format!("doc{}", n / 10);
                    ChunkPoint {
                        id: point_id(t, &doc, n % 10),
                        vector: unit_vector(n as u64),
                        sparse: None,
                        payload: payload(t, &doc, n % 10, 10, "a"),
                    }
                })
                .collect();
            store.upsert(points).await.unwrap();
        }
    }
    assert_eq!(store.count(&a, None).await.unwrap(), PER_TENANT);

    store.optimize().await.unwrap();

    assert_eq!(store.count(&a, None).await.unwrap(), PER_TENANT);
    assert_eq!(store.count(&b, None).await.unwrap(), PER_TENANT);
    let hits = store
        .search(SearchRequest::new(a.clone(), unit_vector(1234), 10))
        .await
        .unwrap();
    assert_eq!(hits.len(), 10);
    assert_eq!(hits[0].payload.document_id, "doc123");
    assert_eq!(hits[0].payload.chunk_index, 4);
    assert!(hits.iter().all(|h| h.payload.tenant_id == "tenant-a"));

    // Writes and deletes keep working after optimization.
    store
        .upsert(doc_points(&a, "fresh", 2, "a", 50_000))
        .await
        .unwrap();
    store.delete_document(&a, "doc0", None).await.unwrap();
    assert_eq!(store.count(&a, None).await.unwrap(), PER_TENANT + 2 - 10);
    assert_eq!(store.count(&b, Some("doc0")).await.unwrap(), 10);
    let hits = store
        .search(SearchRequest::new(a.clone(), unit_vector(50_001), 1))
        .await
        .unwrap();
    assert_eq!(hits[0].payload.document_id, "fresh");
    assert_eq!(hits[0].payload.chunk_index, 1);
    drop(store);

    let store = open(dir.path());
    assert_eq!(store.count(&a, None).await.unwrap(), PER_TENANT + 2 - 10);
    drop(store);

    // The shard on disk has an HNSW index and the three keyword payload indexes.
    let info = EdgeShard::load(&dir.path().join(COLLECTION), None)
        .unwrap()
        .info();
    assert!(info.indexed_vectors_count > 0, "{info:?}");
    for field in ["tenant_id", "document_id", "content_sha256"] {
        assert!(
            info.payload_schema
                .keys()
                .any(|key| key.to_string() == field),
            "no index on {field}: {info:?}"
        );
    }
}

/// Environment variable telling the child process of [`upserts_are_durable_without_drop`]
/// where to write.
const CHILD_DIR_ENV: &str = "RAG_INGEST_STORE_EDGE_CHILD_DIR";

/// Writes in a child process that exits without running any destructor (so qdrant-edge's
/// flush-on-drop never runs), then checks the parent sees every acknowledged write.
#[tokio::test]
async fn upserts_are_durable_without_drop() {
    let a = tenant("acme");
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        let store = open(Path::new(&dir));
        store
            .upsert(doc_points(&a, "d1", 10, "a", 0))
            .await
            .unwrap();
        store
            .upsert(doc_points(&a, "d1", 3, "b", 100))
            .await
            .unwrap();
        store
            .delete_document(
                &a,
                "d1",
                Some(&Revision {
                    content_sha256: "b".into(),
                    version: Some(7),
                    chunk_count: 3,
                }),
            )
            .await
            .unwrap();
        store
            .upsert(doc_points(&a, "d2", 4, "a", 200))
            .await
            .unwrap();
        std::process::exit(0);
    }

    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "upserts_are_durable_without_drop", "--nocapture"])
        .env(CHILD_DIR_ENV, dir.path())
        .status()
        .unwrap();
    assert!(status.success());

    let store = open(dir.path());
    assert_eq!(store.count(&a, Some("d1")).await.unwrap(), 3);
    assert_eq!(store.count(&a, Some("d2")).await.unwrap(), 4);
    assert_eq!(
        store.first_chunk(&a, "d1").await.unwrap(),
        Some(payload(&a, "d1", 0, 3, "b"))
    );
}

/// Concurrent upserts share flushes (group commit), and every write of a shared flush is
/// durable: a child process runs 32 concurrent upserts, checks they took at most a quarter
/// as many flushes, and exits without running any destructor; the parent then finds all 32 documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_upserts_share_flushes_and_all_are_durable() {
    const WRITERS: usize = 32;
    let a = tenant("acme");
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        let store = std::sync::Arc::new(open(Path::new(&dir)));
        let before = store.flushes();
        let writers: Vec<_> = (0..WRITERS)
            .map(|i| {
                let store = std::sync::Arc::clone(&store);
                let points = doc_points(&a, &format!("doc-{i}"), 2, "a", 10 * i as u64);
                tokio::spawn(async move { store.upsert(points).await })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap().unwrap();
        }
        let flushes = store.flushes() - before;
        eprintln!("{WRITERS} concurrent upserts took {flushes} flushes");
        // While one flush runs (milliseconds of I/O), the other writers queue up behind it;
        // without group commit nearly every write pays its own.
        assert!(
            (1..=WRITERS as u64 / 4).contains(&flushes),
            "{WRITERS} concurrent upserts took {flushes} flushes: they did not share them"
        );
        std::process::exit(0);
    }

    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "concurrent_upserts_share_flushes_and_all_are_durable",
            "--nocapture",
        ])
        .env(CHILD_DIR_ENV, dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "the writing child failed: {status}");

    let store = open(dir.path());
    assert_eq!(store.count(&a, None).await.unwrap(), 2 * WRITERS);
    for i in 0..WRITERS {
        let doc = format!("doc-{i}");
        assert_eq!(
            store.first_chunk(&a, &doc).await.unwrap(),
            Some(payload(&a, &doc, 0, 2, "a")),
            "{doc} was acknowledged but is not stored"
        );
    }
}
