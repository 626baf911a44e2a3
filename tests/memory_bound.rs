//! Issue 15, item 7: the worst message the limits allow stays within the memory the
//! in-flight budget counts for it.
//!
//! The worst message under `pipelines/docs.toml`'s limits: 1 MiB of content made of
//! single-byte tokens (`"!"`: the most chunks per byte, 200 tokens per chunk with 20 of
//! overlap) and metadata at `limits.max_metadata_bytes` made of many small entries (the most
//! memory per counted byte). In a child process (so the kernel's high-water mark belongs to
//! this message alone) it is decoded, chunked by the real chunker, given synthetic vectors
//! (embedding thousands of chunks with the model would take minutes; the model's own memory
//! depends on its batch size, not on the message) and written to a Qdrant Edge store as the
//! pipeline writes it (every chunk carrying the metadata). The growth of the peak resident set
//! over the whole message must stay within [`MessageFootprint::estimate_body`].
//!
//! Slow (it writes ~100 MB): `cargo test --test memory_bound -- --ignored --nocapture`.

mod common;

use std::path::Path;

use common::embedder;
use rag_ingest::config::PipelineConfig;
use rag_ingest::embed::Embedder;
use rag_ingest::message::{Rules, decode, metadata_size};
use rag_ingest::process::content_sha256;
use rag_ingest::queue::MessageFootprint;
use rag_ingest::setup;
use rag_ingest::store::{ChunkPayload, ChunkPoint, EdgeStore, VectorStore, point_id};

const CHILD_ENV: &str = "RAG_INGEST_TEST_MEMORY_BOUND_DIR";

/// `field` (e.g. `VmHWM`) of this process's `/proc/self/status`, in bytes.
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
        .unwrap()
        * 1024
}

/// Resets the kernel's high-water mark to the current resident set.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

fn docs_config(store: &Path) -> PipelineConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/docs.toml");
    let mut config = PipelineConfig::load(&path).expect("pipelines/docs.toml loads");
    config.store.path = store.to_path_buf();
    config
}

/// The worst body `config`'s limits allow (see the module documentation).
fn worst_body(config: &PipelineConfig) -> Vec<u8> {
    let limit = config.limits.max_metadata_bytes;
    let mut metadata = serde_json::Map::new();
    for i in 0.. {
        let mut next = metadata.clone();
        next.insert(format!("k{i}"), serde_json::Value::from("v"));
        if metadata_size(&next) > limit {
            break;
        }
        metadata = next;
    }
    let body = serde_json::json!({
        "schema": 1,
        "tenant_id": config.allowed_tenants().into_iter().next().unwrap().as_str(),
        "document_id": "worst",
        "content": "!".repeat(config.limits.max_document_bytes),
        "metadata": metadata,
    });
    serde_json::to_vec(&body).unwrap()
}

async fn child(dir: &Path) {
    let config = docs_config(dir);
    let model = embedder();
    let chunker = setup::chunker(&config, &model).unwrap();
    let dims = model.fingerprint().dims;
    let store = EdgeStore::open(
        dir,
        &config.store.collection,
        &setup::collection_fingerprint(model.fingerprint()),
    )
    .unwrap()
    .with_batch_limits(setup::batch_limits(&config));
    let body = worst_body(&config);
    let rules = Rules {
        allowed_tenants: config.allowed_tenants(),
        max_document_bytes: config.limits.max_document_bytes,
        max_metadata_bytes: config.limits.max_metadata_bytes,
    };
    let footprint = MessageFootprint::new(&config, dims);
    let counted = footprint.estimate_body(&body);

    let before = proc_status_bytes("VmRSS");
    reset_peak();
    let doc = decode(&body, &rules).expect("the worst message is within the limits");
    let chunks = chunker.split(&doc.content, doc.format().unwrap());
    let chunk_count = chunks.len();
    let sha = content_sha256(&doc.content);
    let points: Vec<ChunkPoint> = chunks
        .into_iter()
        .map(|chunk| ChunkPoint {
            id: point_id(&doc.tenant, &doc.document_id, chunk.index),
            vector: vec![1.0 / (dims as f32).sqrt(); dims],
            sparse: None,
            payload: ChunkPayload {
                tenant_id: doc.tenant.as_str().to_owned(),
                document_id: doc.document_id.clone(),
                version: doc.version,
                chunk_index: chunk.index,
                chunk_count,
                text: chunk.text,
                byte_start: chunk.byte_range.start,
                byte_end: chunk.byte_range.end,
                content_sha256: sha.clone(),
                metadata: doc.metadata.clone(),
                embedder: model.fingerprint().id(),
                ingested_at: "2025-01-01T00:00:00Z".to_owned(),
                order: None,
                tombstone: false,
                context: None,
                page: None,
            },
        })
        .collect();
    store.upsert(points).await.unwrap();
    drop(doc);
    let peak = proc_status_bytes("VmHWM");
    let grew = peak.saturating_sub(before);
    println!(
        "MEMORY-BOUND body={} chunks={chunk_count} peak_growth={} counted={counted} \
         ({:.0} MiB of {:.0} MiB)",
        body.len(),
        grew,
        grew as f64 / 1048576.0,
        counted as f64 / 1048576.0
    );
    assert_eq!(
        store
            .count(
                &rules.allowed_tenants.into_iter().next().unwrap(),
                Some("worst")
            )
            .await
            .unwrap(),
        chunk_count
    );
    assert!(
        chunk_count <= footprint.chunks(config.limits.max_document_bytes),
        "{chunk_count} chunks, more than the {} the footprint assumes",
        footprint.chunks(config.limits.max_document_bytes)
    );
    assert!(
        grew as usize <= counted,
        "the worst message grew the peak resident set by {grew} bytes, more than the \
         {counted} the in-flight budget counts for it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: writes ~100 MB; run with --ignored"]
async fn the_worst_message_stays_within_its_counted_footprint() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&dir)).await;
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let output = common::run_ok(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "the_worst_message_stays_within_its_counted_footprint",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_ENV, dir.path()),
    );
    let stdout = common::stdout(&output);
    eprintln!("{stdout}");
    assert!(stdout.contains("MEMORY-BOUND"), "{stdout}");
}
