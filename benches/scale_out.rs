//! Scale-out: documents/s of one vs two worker processes consuming one queue (plain `main`,
//! release; needs RabbitMQ and a Qdrant server):
//!
//! ```text
//! QDRANT_URL=http://127.0.0.1:6334 cargo bench --bench scale_out
//! ```
//!
//! (`QDRANT_API_KEY` is sent when set.) Qdrant Edge is one process per collection directory,
//! so several workers need `store.kind = "qdrant"`. Without `QDRANT_URL` the bench prints
//! `SKIPPED: QDRANT_URL not set — scale-out needs a shared Qdrant server` and exits 0.
//!
//! For 1 and then 2 processes: a fresh pipeline from `pipelines/docs.toml` with its own
//! queues and its own Qdrant collection; the release `rag-ingest worker` binaries are
//! started and, once each logs `worker consuming`, the clock starts, 64 Markdown documents
//! (a few chunks each) are published with the library's `Submitter`, and the clock stops when
//! the workers have logged `document stored` 64 times between them. The workers are stopped
//! with SIGTERM and must exit cleanly; their final reports must add up to exactly 64 stored
//! documents (each document stored exactly once, none retried or dead-lettered), and the
//! collection must hold exactly each document's chunk count. Queues and collections are
//! deleted afterwards.

use std::time::{Duration, Instant};

use rag_ingest::embed::{CandleEmbedder, Embedder};
use rag_ingest::message::Document;
use rag_ingest::queue::Submitter;
use rag_ingest::setup;
use rag_ingest::store::QdrantStore;

#[path = "support/mod.rs"]
mod support;

use support::{BenchPipeline, WorkerBinary, WorkerProcess};

/// Documents per run.
const DOCS: usize = 64;

/// One run with `processes` workers; returns the time from the first publish to the last
/// stored document.
fn run(
    rt: &tokio::runtime::Runtime,
    binary: &WorkerBinary,
    qdrant_url: &str,
    processes: usize,
    docs: &[Document],
    expected: &[usize],
    embedder: &CandleEmbedder,
) -> Duration {
    let collection = format!(
        "rag-ingest-bench-scale-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let pipeline = BenchPipeline::new("scale", |t| {
        support::set(t, "store.kind", "qdrant");
        support::set(t, "store.collection", collection.as_str());
        support::set(t, "store.qdrant.url", qdrant_url);
        if std::env::var("QDRANT_API_KEY").is_ok_and(|k| !k.is_empty()) {
            support::set(t, "store.qdrant.api_key_env", "QDRANT_API_KEY");
        }
    });
    let mut workers: Vec<WorkerProcess> = (0..processes)
        .map(|_| WorkerProcess::start(binary, &pipeline.file, &[]))
        .collect();
    for worker in &mut workers {
        worker.wait_for(support::CONSUMING, 1, Duration::from_secs(120));
    }
    let submitter = rt
        .block_on(Submitter::connect(&pipeline.config))
        .expect("the submitter connects");

    let started = Instant::now();
    for (doc, result) in docs
        .iter()
        .zip(rt.block_on(submitter.submit_all(docs, |_, _| {})))
    {
        if let Err(e) = result {
            panic!(
                "BENCH FAILED: the broker did not confirm {}: {e}",
                doc.document_id
            );
        }
    }
    let deadline = started + Duration::from_secs(900);
    loop {
        let stored: usize = workers.iter().map(|w| w.count(support::STORED)).sum();
        if stored >= docs.len() {
            break;
        }
        for worker in &mut workers {
            if let Some(status) = worker.exited() {
                panic!(
                    "BENCH FAILED: a worker exited early ({status}); log:\n{}",
                    worker.log()
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "BENCH FAILED: only {stored} of {} documents stored within 15 minutes",
            docs.len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = started.elapsed();
    rt.block_on(submitter.close());

    for worker in &workers {
        worker.signal("TERM");
    }
    let mut per_worker = Vec::new();
    for worker in workers {
        let (status, log) = worker.wait_exit(Duration::from_secs(60));
        assert!(
            status.success(),
            "BENCH FAILED: a worker exited with {status}; log:\n{log}"
        );
        for name in ["unchanged", "retried", "dead_lettered"] {
            let n = support::final_count(&log, name);
            assert_eq!(
                n, 0,
                "BENCH FAILED: a worker reports {name}={n}; log:\n{log}"
            );
        }
        per_worker.push(support::final_count(&log, "stored"));
    }
    let total: u64 = per_worker.iter().sum();
    assert_eq!(
        total,
        docs.len() as u64,
        "BENCH FAILED: the workers stored {per_worker:?} documents, expected {} in all \
         (each exactly once)",
        docs.len()
    );
    rt.block_on(async {
        let store = QdrantStore::open(
            &setup::qdrant_options(&pipeline.config),
            &pipeline.config.store.collection,
            embedder.fingerprint(),
        )
        .await
        .expect("the Qdrant collection opens");
        support::verify_stored(&store, docs, expected)
            .await
            .unwrap_or_else(|e| {
                panic!("BENCH FAILED: the collection does not hold every chunk:\n{e}")
            });
    });
    eprintln!(
        "scale_out: {processes} process(es): {:.3} s, {:.2} docs/s; documents stored per \
         process {per_worker:?}",
        elapsed.as_secs_f64(),
        docs.len() as f64 / elapsed.as_secs_f64()
    );
    elapsed
}

fn main() {
    let Some(qdrant_url) = std::env::var("QDRANT_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
    else {
        eprintln!("SKIPPED: QDRANT_URL not set — scale-out needs a shared Qdrant server");
        return;
    };
    let rt = support::runtime();
    rt.block_on(support::require_broker());
    let binary = WorkerBinary::snapshot();

    let config = BenchPipeline::new("scale-setup", |_| {}).config.clone();
    let embedder = CandleEmbedder::load(&support::model_dir(), config.embedder.batch_size)
        .expect("the model loads (scripts/fetch-model.sh)");
    let chunker = setup::chunker(&config, &embedder).expect("chunker");
    let docs = support::realistic_docs("scale", DOCS);
    let expected = support::expected_chunks(&chunker, &docs);
    let chunks: usize = expected.iter().sum();
    let texts: Vec<String> = docs
        .iter()
        .flat_map(|doc| {
            chunker
                .split(&doc.content, doc.format().expect("markdown"))
                .into_iter()
                .map(|c| c.text)
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let tokens = support::model_tokens(embedder.tokenizer(), &refs);
    eprintln!(
        "scale_out: {DOCS} documents, {chunks} chunks, {tokens} model tokens; Qdrant at \
         {qdrant_url}; worker.concurrency {} per process",
        config.worker.concurrency
    );

    let one = run(&rt, &binary, &qdrant_url, 1, &docs, &expected, &embedder);
    let two = run(&rt, &binary, &qdrant_url, 2, &docs, &expected, &embedder);
    let rate = |d: Duration| DOCS as f64 / d.as_secs_f64();
    println!(
        "scale-out: 1 process {:.2} docs/s ({:.0} tokens/s), 2 processes {:.2} docs/s ({:.0} \
         tokens/s): speed-up {:.2}x",
        rate(one),
        tokens as f64 / one.as_secs_f64(),
        rate(two),
        tokens as f64 / two.as_secs_f64(),
        one.as_secs_f64() / two.as_secs_f64()
    );
}
