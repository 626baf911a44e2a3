//! Qdrant Edge upsert throughput in points per second (criterion, release):
//!
//! ```text
//! cargo bench --bench store
//! ```
//!
//! Every case writes new points (384-dimensional L2-normalised vectors, payloads like the
//! pipeline's: a ~900-byte chunk of the fixture documents, byte range, content hash,
//! `title`/`source` metadata, embedder id, timestamp) into its own fresh [`EdgeStore`] in a
//! temporary directory, on a multi-thread tokio runtime:
//!
//! - `sequential/1`, `sequential/16`, `sequential/256`: one `upsert` call of 1, 16 or 256
//!   points at a time (each call is durable when it returns: one flush per call);
//! - `concurrent/8x16`: 8 tasks each upserting 16 points at once (128 points per iteration).
//!   Compared with `sequential/16` it shows whether concurrent writes share flushes (group
//!   commit) or pay one each.
//!
//! After each case the store's point count is checked against the points written.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rag_ingest::embed::Fingerprint;
use rag_ingest::store::{ChunkPayload, ChunkPoint, EdgeStore, VectorStore, point_id};
use rag_ingest::tenant::TenantId;

#[path = "support/mod.rs"]
mod support;

/// Vector dimension of all-MiniLM-L6-v2.
const DIMS: usize = 384;
/// Concurrent upserts in flight in the `concurrent` case.
const TASKS: usize = 8;
/// Points per upsert in the `concurrent` case.
const POINTS_PER_TASK: usize = 16;

/// The fingerprint the pipeline records for all-MiniLM-L6-v2.
fn fingerprint() -> Fingerprint {
    Fingerprint {
        model: "sentence-transformers/all-MiniLM-L6-v2".into(),
        dims: DIMS,
        pooling: "mean".into(),
        normalized: true,
        sparse: None,
    }
}

/// 64 chunk texts of 150 words (about 900 bytes, about 200 model tokens) cut from the
/// fixture documents at different offsets.
fn chunk_texts() -> Vec<String> {
    let corpus: String = support::fixtures()
        .iter()
        .map(|f| f.text.as_str())
        .collect::<Vec<_>>()
        .join("\n\n");
    let words: Vec<&str> = corpus.split_whitespace().collect();
    (0..64)
        .map(|i| {
            words
                .iter()
                .cycle()
                .skip((i * 37) % words.len())
                .take(150)
                .copied()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Makes the points of new documents, numbering them on from `next_doc` (so every call
/// writes new ids).
struct PointFactory {
    texts: Vec<String>,
    tenants: [TenantId; 2],
    embedder: String,
    ingested_at: String,
    next_doc: u64,
    rng: u64,
}

impl PointFactory {
    fn new() -> Self {
        PointFactory {
            texts: chunk_texts(),
            tenants: [
                TenantId::new("acme").expect("tenant"),
                TenantId::new("globex").expect("tenant"),
            ],
            embedder: fingerprint().id(),
            ingested_at: chrono::Utc::now().to_rfc3339(),
            next_doc: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// A deterministic pseudo-random unit vector (xorshift64*).
    fn vector(&mut self) -> Vec<f32> {
        let mut v: Vec<f32> = (0..DIMS)
            .map(|_| {
                self.rng ^= self.rng >> 12;
                self.rng ^= self.rng << 25;
                self.rng ^= self.rng >> 27;
                let x = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
                (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        v
    }

    /// All `n` chunks of one new document.
    fn document(&mut self, n: usize) -> Vec<ChunkPoint> {
        let doc = self.next_doc;
        self.next_doc += 1;
        let tenant = self.tenants[(doc % 2) as usize].clone();
        let document_id = format!("bench/doc-{doc:07}");
        let sha = format!("{:064x}", u128::from(doc) * 0x0123_4567_89ab_cdef);
        let mut metadata = serde_json::Map::new();
        metadata.insert("title".into(), format!("Bench document {doc}").into());
        metadata.insert("source".into(), "fixtures/docs".into());
        let mut byte_start = 0;
        (0..n)
            .map(|index| {
                let text = self.texts[(doc as usize + index) % self.texts.len()].clone();
                let byte_end = byte_start + text.len();
                let point = ChunkPoint {
                    id: point_id(&tenant, &document_id, index),
                    vector: self.vector(),
                    sparse: None,
                    payload: ChunkPayload {
                        tenant_id: tenant.as_str().to_owned(),
                        document_id: document_id.clone(),
                        version: Some(1),
                        chunk_index: index,
                        chunk_count: n,
                        text,
                        byte_start,
                        byte_end,
                        content_sha256: sha.clone(),
                        metadata: metadata.clone(),
                        embedder: self.embedder.clone(),
                        ingested_at: self.ingested_at.clone(),
                        order: None,
                        tombstone: false,
                        context: None,
                        page: None,
                    },
                };
                byte_start = byte_end + 1;
                point
            })
            .collect()
    }
}

/// Total points of both tenants in `store`.
fn stored_points(rt: &tokio::runtime::Runtime, store: &EdgeStore, factory: &PointFactory) -> usize {
    rt.block_on(async {
        let mut total = 0;
        for tenant in &factory.tenants {
            total += store.count(tenant, None).await.expect("count");
        }
        total
    })
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut group = c.benchmark_group("store_upsert");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));

    for batch in [1, 16, 256] {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = EdgeStore::open(dir.path(), "bench", &fingerprint()).expect("store opens");
        let mut factory = PointFactory::new();
        let mut written = 0;
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new("sequential", batch), |b| {
            b.iter_batched(
                || factory.document(batch),
                |points| {
                    rt.block_on(store.upsert(points)).expect("upsert");
                    written += batch;
                },
                BatchSize::SmallInput,
            );
        });
        let stored = stored_points(&rt, &store, &factory);
        assert_eq!(stored, written, "sequential/{batch}: points stored");
        eprintln!("sequential/{batch}: {stored} points written and counted");
        drop(store);
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        Arc::new(EdgeStore::open(dir.path(), "bench", &fingerprint()).expect("store opens"));
    let mut factory = PointFactory::new();
    let mut written = 0;
    group.throughput(Throughput::Elements((TASKS * POINTS_PER_TASK) as u64));
    group.bench_function(
        BenchmarkId::new("concurrent", format!("{TASKS}x{POINTS_PER_TASK}")),
        |b| {
            b.iter_batched(
                || {
                    (0..TASKS)
                        .map(|_| factory.document(POINTS_PER_TASK))
                        .collect::<Vec<_>>()
                },
                |batches| {
                    rt.block_on(async {
                        let tasks: Vec<_> = batches
                            .into_iter()
                            .map(|points| {
                                let store = Arc::clone(&store);
                                tokio::spawn(async move { store.upsert(points).await })
                            })
                            .collect();
                        for task in tasks {
                            task.await.expect("upsert task").expect("upsert");
                        }
                    });
                    written += TASKS * POINTS_PER_TASK;
                },
                BatchSize::SmallInput,
            );
        },
    );
    let stored = stored_points(&rt, &store, &factory);
    assert_eq!(stored, written, "concurrent: points stored");
    eprintln!("concurrent/{TASKS}x{POINTS_PER_TASK}: {stored} points written and counted");
    drop(store);
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
