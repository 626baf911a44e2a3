//! Integration tests of `EdgeStore` on temporary directories with synthetic vectors.

use std::path::Path;

use qdrant_edge::{
    EdgeShard, Payload, PointId, PointInsertOperations, PointOperations, PointStructPersisted,
    UpdateOperation, VectorStructPersisted,
};
use rag_ingest::embed::Fingerprint;
use rag_ingest::store::{ChunkPayload, ChunkPoint, EdgeStore, StoreError, VectorStore, point_id};
use rag_ingest::tenant::TenantId;

const DIMS: usize = 384;
const COLLECTION: &str = "chunks";

fn fingerprint() -> Fingerprint {
    Fingerprint {
        model: "test/synthetic".to_owned(),
        dims: DIMS,
        pooling: "mean".to_owned(),
        normalized: true,
    }
}

fn tenant(name: &str) -> TenantId {
    TenantId::new(name).expect("valid tenant name")
}

/// A deterministic pseudo-random unit vector of `DIMS` values (splitmix64 from `seed`).
fn unit_vector(seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut v: Vec<f32> = (0..DIMS)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            // Uniform in [-1, 1).
            (z >> 11) as f32 / (1u64 << 52) as f32 - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
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
            payload: payload(tenant, doc, i, count, sha),
        })
        .collect()
}

fn open(dir: &Path) -> EdgeStore {
    EdgeStore::open(dir, COLLECTION, &fingerprint()).expect("open store")
}

#[tokio::test]
async fn upsert_then_count_and_reupsert_does_not_grow() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = tenant("acme");

    assert_eq!(store.count(&a, None).await.unwrap(), 0);
    store.upsert(doc_points(&a, "d1", 5, "a", 0)).await.unwrap();
    store
        .upsert(doc_points(&a, "d2", 3, "a", 100))
        .await
        .unwrap();
    assert_eq!(store.count(&a, None).await.unwrap(), 8);
    assert_eq!(store.count(&a, Some("d1")).await.unwrap(), 5);
    assert_eq!(store.count(&a, Some("d2")).await.unwrap(), 3);
    assert_eq!(store.count(&a, Some("missing")).await.unwrap(), 0);
    assert_eq!(store.count(&tenant("other"), None).await.unwrap(), 0);

    // Same ids again (new vectors and hash): overwritten, not duplicated.
    store
        .upsert(doc_points(&a, "d1", 5, "b", 50))
        .await
        .unwrap();
    assert_eq!(store.count(&a, None).await.unwrap(), 8);
    assert_eq!(store.count(&a, Some("d1")).await.unwrap(), 5);
    let first = store.first_chunk(&a, "d1").await.unwrap().unwrap();
    assert_eq!(first.content_sha256, "b");

    // An empty batch is a no-op.
    store.upsert(Vec::new()).await.unwrap();
    assert_eq!(store.count(&a, None).await.unwrap(), 8);
}

#[tokio::test]
async fn search_returns_nearest_first_and_only_the_tenants_points() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = tenant("tenant-a");
    let b = tenant("tenant-b");

    // Both tenants store the same document with identical vectors.
    store
        .upsert(doc_points(&a, "doc", 20, "a", 1))
        .await
        .unwrap();
    store
        .upsert(doc_points(&b, "doc", 20, "a", 1))
        .await
        .unwrap();

    // Query close to chunk 7's vector (seed 8) but not identical to it.
    let mut query = unit_vector(8);
    for (q, noise) in query.iter_mut().zip(unit_vector(999)) {
        *q += 0.05 * noise;
    }
    let hits = store.search(&a, query.clone(), 5).await.unwrap();
    assert_eq!(hits.len(), 5);
    assert_eq!(hits[0].payload.chunk_index, 7);
    assert_eq!(hits[0].payload, payload(&a, "doc", 7, 20, "a"));
    assert!(hits[0].score > 0.9, "score {}", hits[0].score);
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    assert!(hits.iter().all(|h| h.payload.tenant_id == "tenant-a"));

    // Asking for more than the tenant has returns only the tenant's 20 points, never B's.
    let all = store.search(&a, query.clone(), 100).await.unwrap();
    assert_eq!(all.len(), 20);
    assert!(all.iter().all(|h| h.payload.tenant_id == "tenant-a"));

    let hits_b = store.search(&b, query, 3).await.unwrap();
    assert_eq!(hits_b.len(), 3);
    assert_eq!(hits_b[0].payload, payload(&b, "doc", 7, 20, "a"));
    assert!(hits_b.iter().all(|h| h.payload.tenant_id == "tenant-b"));

    assert!(
        store
            .search(&tenant("nobody"), unit_vector(8), 5)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .search(&a, unit_vector(8), 0)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn first_chunk_is_scoped_to_tenant_and_document() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = tenant("acme");
    let b = tenant("globex");

    store.upsert(doc_points(&a, "d1", 4, "a", 0)).await.unwrap();
    let first = store.first_chunk(&a, "d1").await.unwrap();
    assert_eq!(first, Some(payload(&a, "d1", 0, 4, "a")));

    assert_eq!(store.first_chunk(&a, "unknown").await.unwrap(), None);
    assert_eq!(store.first_chunk(&b, "d1").await.unwrap(), None);
}

#[tokio::test]
async fn first_chunk_refuses_a_payload_of_another_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = tenant("acme");
    let b = tenant("globex");

    // A point stored under A's id for d1/0 whose payload claims tenant B.
    let forged = ChunkPoint {
        id: point_id(&a, "d1", 0),
        vector: unit_vector(1),
        payload: payload(&b, "d1", 0, 1, "a"),
    };
    store.upsert(vec![forged]).await.unwrap();

    let err = store.first_chunk(&a, "d1").await.unwrap_err();
    assert!(matches!(err, StoreError::Rejected(_)), "{err:?}");
    assert_eq!(store.first_chunk(&b, "d1").await.unwrap(), None);
}

#[tokio::test]
async fn delete_with_keep_removes_only_stale_chunks_of_that_document() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = tenant("acme");
    let b = tenant("globex");

    // Revision "a" of d1 has 10 chunks, revision "b" only 3 (overwriting chunks 0..3).
    store
        .upsert(doc_points(&a, "d1", 10, "a", 0))
        .await
        .unwrap();
    store
        .upsert(doc_points(&a, "d2", 5, "a", 100))
        .await
        .unwrap();
    store
        .upsert(doc_points(&b, "d1", 10, "a", 0))
        .await
        .unwrap();
    store
        .upsert(doc_points(&a, "d1", 3, "b", 200))
        .await
        .unwrap();
    assert_eq!(store.count(&a, Some("d1")).await.unwrap(), 10);

    store.delete_document(&a, "d1", Some("b")).await.unwrap();

    assert_eq!(store.count(&a, Some("d1")).await.unwrap(), 3);
    let remaining = store.search(&a, unit_vector(200), 100).await.unwrap();
    let d1: Vec<_> = remaining
        .iter()
        .filter(|h| h.payload.document_id == "d1")
        .collect();
    assert_eq!(d1.len(), 3);
    assert!(d1.iter().all(|h| h.payload.content_sha256 == "b"));
    let mut indexes: Vec<_> = d1.iter().map(|h| h.payload.chunk_index).collect();
    indexes.sort_unstable();
    assert_eq!(indexes, vec![0, 1, 2]);
    assert_eq!(
        store.first_chunk(&a, "d1").await.unwrap(),
        Some(payload(&a, "d1", 0, 3, "b"))
    );

    // Other documents and other tenants are untouched.
    assert_eq!(store.count(&a, Some("d2")).await.unwrap(), 5);
    assert_eq!(store.count(&b, Some("d1")).await.unwrap(), 10);
    assert_eq!(store.count(&a, None).await.unwrap(), 8);
    assert_eq!(store.count(&b, None).await.unwrap(), 10);

    // Keeping the current hash again deletes nothing.
    store.delete_document(&a, "d1", Some("b")).await.unwrap();
    assert_eq!(store.count(&a, Some("d1")).await.unwrap(), 3);
}

#[tokio::test]
async fn delete_without_keep_removes_the_whole_document() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = tenant("acme");
    let b = tenant("globex");

    store.upsert(doc_points(&a, "d1", 6, "a", 0)).await.unwrap();
    store
        .upsert(doc_points(&a, "d2", 2, "a", 100))
        .await
        .unwrap();
    store.upsert(doc_points(&b, "d1", 6, "a", 0)).await.unwrap();

    store.delete_document(&a, "d1", None).await.unwrap();

    assert_eq!(store.count(&a, Some("d1")).await.unwrap(), 0);
    assert_eq!(store.first_chunk(&a, "d1").await.unwrap(), None);
    assert_eq!(store.count(&a, Some("d2")).await.unwrap(), 2);
    assert_eq!(store.count(&b, Some("d1")).await.unwrap(), 6);
    assert_eq!(
        store.first_chunk(&b, "d1").await.unwrap(),
        Some(payload(&b, "d1", 0, 6, "a"))
    );

    // Deleting a document that does not exist is not an error.
    store.delete_document(&a, "never", None).await.unwrap();
    assert_eq!(store.count(&a, None).await.unwrap(), 2);
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
    let hits = store.search(&a, unit_vector(2), 1).await.unwrap();
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

#[tokio::test]
async fn fingerprint_mismatch_on_reopen_fails() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));

    let other = Fingerprint {
        model: "other/model".to_owned(),
        ..fingerprint()
    };
    let err = EdgeStore::open(dir.path(), COLLECTION, &other)
        .err()
        .expect("open with another fingerprint must fail");
    match err {
        StoreError::FingerprintMismatch {
            collection,
            stored,
            expected,
        } => {
            assert_eq!(collection, COLLECTION);
            assert_eq!(stored, fingerprint().id());
            assert_eq!(expected, other.id());
        }
        other => panic!("expected FingerprintMismatch, got {other:?}"),
    }

    let bigger = Fingerprint {
        dims: 768,
        ..fingerprint()
    };
    assert!(matches!(
        EdgeStore::open(dir.path(), COLLECTION, &bigger),
        Err(StoreError::FingerprintMismatch { .. })
    ));

    // The recorded fingerprint is unchanged and the original one still opens.
    assert_eq!(
        EdgeStore::recorded_fingerprint(dir.path(), COLLECTION).unwrap(),
        Some(fingerprint())
    );
    drop(open(dir.path()));
}

#[tokio::test]
async fn wrong_vector_length_is_a_dimension_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = tenant("acme");

    let mut points = doc_points(&a, "d1", 3, "a", 0);
    points[2].vector.pop();
    match store.upsert(points).await {
        Err(StoreError::Dimension { expected, got }) => {
            assert_eq!(expected, DIMS);
            assert_eq!(got, DIMS - 1);
        }
        other => panic!("expected a Dimension error, got {other:?}"),
    }
    // Nothing of the refused batch was written.
    assert_eq!(store.count(&a, None).await.unwrap(), 0);

    match store.search(&a, vec![0.5; DIMS + 1], 3).await {
        Err(StoreError::Dimension { expected, got }) => {
            assert_eq!(expected, DIMS);
            assert_eq!(got, DIMS + 1);
        }
        other => panic!("expected a Dimension error, got {other:?}"),
    }

    let mut nan = doc_points(&a, "d1", 1, "a", 0);
    nan[0].vector[0] = f32::NAN;
    assert!(matches!(
        store.upsert(nan).await,
        Err(StoreError::Rejected(_))
    ));
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
        store.search(&a, unit_vector(1), 3).await,
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
    let hits = store.search(&a, unit_vector(1234), 10).await.unwrap();
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
    let hits = store.search(&a, unit_vector(50_001), 1).await.unwrap();
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
        store.delete_document(&a, "d1", Some("b")).await.unwrap();
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
