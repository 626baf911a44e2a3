//! Scale-out: documents/s of one vs two worker processes consuming one queue (plain `main`,
//! release; needs RabbitMQ):
//!
//! ```text
//! cargo bench --bench scale_out
//! QDRANT_URL=http://127.0.0.1:6334 cargo bench --bench scale_out   # also the shared server
//! ```
//!
//! Two backends, each for 1 and then 2 processes:
//! - `edge`: every process has its own Qdrant Edge directory (Edge is one process per
//!   directory), all consume the same queues; the documents end up split between the
//!   stores, and each must be in exactly one of them. This measures how the work itself
//!   (chunking, embedding, storing) scales across processes. Always runs.
//! - `qdrant`: all processes share one collection on a Qdrant server (`QDRANT_URL`;
//!   `QDRANT_API_KEY` is sent when set). Without `QDRANT_URL` this half prints
//!   `SKIPPED: QDRANT_URL not set — the shared-server scale-out needs a Qdrant server`.
//!
//! Each run (3 of each, alternating, medians reported): a fresh pipeline from `pipelines/docs.toml` with its own queues (and store
//! directories or collection); the release `rag-ingest worker` binaries are started and, once
//! each logs `worker consuming`, the clock starts, 128 Markdown documents (a few chunks each)
//! are published with the library's `Submitter`, and the clock stops when the workers have
//! logged `document stored` 128 times between them. The workers are stopped with SIGTERM and
//! must exit cleanly; their final reports must add up to exactly 128 stored documents (each
//! document stored exactly once, none retried or dead-lettered), and the stores must hold
//! exactly each document's chunk count, each document in one store. Queues, collections and
//! directories are deleted afterwards.
//!
//! On this 2-core machine one worker already keeps both cores busy (the embedding thread's
//! pool uses every core), so the bound on the speed-up is about 1×: a second process adds
//! overlap of the non-embedding work, and contention.

use std::time::{Duration, Instant};

use rag_ingest::embed::{CandleEmbedder, Embedder};
use rag_ingest::message::Document;
use rag_ingest::queue::Submitter;
use rag_ingest::setup;
use rag_ingest::store::{EdgeStore, QdrantStore};

#[path = "support/mod.rs"]
mod support;

use support::{BenchPipeline, WorkerBinary, WorkerProcess};

/// Documents per run.
const DOCS: usize = 128;

/// Runs of each process count.
const RUNS: usize = 3;

/// Where the workers store.
enum Backend {
    /// Each process its own Qdrant Edge directory.
    EdgePerProcess,
    /// One collection on the Qdrant server at this URL, shared by every process.
    Qdrant(String),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::EdgePerProcess => "edge (one directory per process)",
            Backend::Qdrant(_) => "qdrant (one shared collection)",
        }
    }
}

/// One run with `processes` workers; returns the time from the first publish to the last
/// stored document.
fn run(
    rt: &tokio::runtime::Runtime,
    binary: &WorkerBinary,
    backend: &Backend,
    processes: usize,
    docs: &[Document],
    expected: &[usize],
    embedder: &CandleEmbedder,
) -> Duration {
    let pipeline = BenchPipeline::new("scale", |t| {
        if let Backend::Qdrant(url) = backend {
            let collection = format!(
                "rag-ingest-bench-scale-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            );
            support::set(t, "store.kind", "qdrant");
            support::set(t, "store.collection", collection);
            support::set(t, "store.qdrant.url", url.as_str());
            if std::env::var("QDRANT_API_KEY").is_ok_and(|k| !k.is_empty()) {
                support::set(t, "store.qdrant.api_key_env", "QDRANT_API_KEY");
            }
        }
    });
    let configs: Vec<_> = (0..processes)
        .map(|k| match backend {
            Backend::EdgePerProcess => pipeline.for_process(k),
            Backend::Qdrant(_) => (pipeline.file.clone(), pipeline.config.clone()),
        })
        .collect();
    let mut workers: Vec<WorkerProcess> = configs
        .iter()
        .map(|(file, _)| WorkerProcess::start(binary, file, &[]))
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
    let fingerprint = embedder.fingerprint();
    let verified = match backend {
        Backend::EdgePerProcess => {
            let stores: Vec<EdgeStore> = configs
                .iter()
                .map(|(_, config)| {
                    EdgeStore::open(&config.store.path, &config.store.collection, fingerprint)
                        .expect("a worker's store opens after it exited")
                })
                .collect();
            rt.block_on(support::verify_stored(&stores, docs, expected))
        }
        Backend::Qdrant(_) => rt.block_on(async {
            let store = QdrantStore::open(
                &setup::qdrant_options(&pipeline.config),
                &pipeline.config.store.collection,
                fingerprint,
            )
            .await
            .expect("the Qdrant collection opens");
            support::verify_stored(&[store], docs, expected).await
        }),
    };
    if let Err(e) = verified {
        panic!("BENCH FAILED: the stores do not hold every chunk exactly once:\n{e}");
    }
    eprintln!(
        "scale_out: {}: {processes} process(es): {:.3} s, {:.2} docs/s; documents stored per \
         process {per_worker:?}",
        backend.name(),
        elapsed.as_secs_f64(),
        docs.len() as f64 / elapsed.as_secs_f64()
    );
    elapsed
}

fn main() {
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
        "scale_out: {DOCS} documents, {chunks} chunks, {tokens} model tokens; \
         worker.concurrency {} per process",
        config.worker.concurrency
    );

    let mut backends = vec![Backend::EdgePerProcess];
    match std::env::var("QDRANT_URL") {
        Ok(url) if !url.trim().is_empty() => backends.push(Backend::Qdrant(url)),
        _ => eprintln!(
            "SKIPPED: QDRANT_URL not set — the shared-server scale-out needs a Qdrant server"
        ),
    }
    for backend in &backends {
        // Alternating 1 and 2 processes, so a burst of load elsewhere hits both alike.
        let (mut ones, mut twos) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            ones.push(run(&rt, &binary, backend, 1, &docs, &expected, &embedder));
            twos.push(run(&rt, &binary, backend, 2, &docs, &expected, &embedder));
        }
        let one = support::median(&ones).expect("RUNS > 0");
        let two = support::median(&twos).expect("RUNS > 0");
        let rate = |d: Duration| DOCS as f64 / d.as_secs_f64();
        println!(
            "scale-out, {} (medians of {RUNS} runs each): 1 process {:.2} docs/s ({:.0} tokens/s), 2 processes {:.2} docs/s \
             ({:.0} tokens/s): speed-up {:.2}x",
            backend.name(),
            rate(one),
            tokens as f64 / one.as_secs_f64(),
            rate(two),
            tokens as f64 / two.as_secs_f64(),
            one.as_secs_f64() / two.as_secs_f64()
        );
    }
}
