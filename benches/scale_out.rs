//! Scale-out: documents/s of several `rag-ingest worker` processes consuming one queue
//! (release; needs RabbitMQ):
//!
//! ```text
//! cargo bench --bench scale_out
//! QDRANT_URL=http://127.0.0.1:16334 cargo bench --bench scale_out   # the shared test server
//! ```
//!
//! Two backends:
//! - `edge`, 1 and 2 processes: every process has its own Qdrant Edge directory (Edge is one
//!   process per directory), all consume the same queues; the documents end up split between
//!   the stores, and each must be in exactly one of them. This measures how the work itself
//!   (chunking, embedding, storing) scales across processes.
//! - `qdrant`, 1, 2 and 4 processes, each first unpinned and then pinned to one core
//!   (`taskset -c`, worker i on core i mod the cores this bench may use): all processes share
//!   one collection on a Qdrant server, the production shape. The server is `QDRANT_URL`
//!   (`QDRANT_API_KEY` is sent when set), else one this bench starts from the server binary
//!   (`QDRANT_BIN`, `qdrant` on `PATH`, `../shared/bin/qdrant`); with neither it prints
//!   `SKIPPED`. The corpus adds [`VERSIONED`] second versions: those documents are published
//!   as version 1 among the others and as version 2 (longer: more chunks) after all of them,
//!   and each must end up stored once, as version 2 only.
//!
//! Each run (3 of each case, cases alternating, medians reported): a fresh pipeline from
//! `pipelines/docs.toml` with its own queues (and store directories or collection); the
//! release worker binaries are started and, once each logs `worker consuming`, the clock
//! starts, the messages are published with the library's `Submitter`, and the clock stops when
//! the workers have logged an outcome (stored, or skipped as older) for every message between
//! them. The workers are stopped with SIGTERM and must exit cleanly; their final reports must
//! add up to exactly one outcome per message (none retried, dead-lettered or unchanged). The
//! store must hold each document once: exactly its newest version's chunk count, every chunk
//! of it carrying the newest version. Every difference is printed and fails the bench at the
//! end (after all figures are out). Queues, collections and directories are deleted
//! afterwards. Tokens are the model tokens of every message's chunks.
//!
//! On this 2-core machine one worker already keeps both cores busy (the embedding thread's
//! pool uses every core it may), so the bound on the unpinned speed-up is about 1×. Pinned,
//! one worker has one core and two workers two, so 1 → 2 shows how the design scales with
//! cores; four pinned workers share the two cores two by two, so 2 → 4 shows the cost of
//! oversubscription, not more hardware.

use std::time::{Duration, Instant};

use rag_ingest::chunk::Chunker;
use rag_ingest::embed::{CandleEmbedder, Embedder};
use rag_ingest::message::Document;
use rag_ingest::queue::Submitter;
use rag_ingest::setup;
use rag_ingest::store::{EdgeStore, QdrantStore, VectorStore};

#[path = "../tests/support/qdrant_server.rs"]
mod qdrant_server;
#[path = "support/mod.rs"]
mod support;

use support::{BenchPipeline, WorkerBinary, WorkerProcess};

/// Documents per run.
const DOCS: usize = 128;

/// Documents of the server corpus sent in two versions.
const VERSIONED: usize = 8;

/// Runs of each case.
const RUNS: usize = 3;

/// Worker process counts on the shared server.
const SERVER_PROCESSES: [usize; 3] = [1, 2, 4];

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
            Backend::Qdrant(_) => "qdrant server (one shared collection)",
        }
    }
}

/// What a run publishes and what the store must hold afterwards.
struct Corpus {
    /// Published in this order.
    messages: Vec<Document>,
    /// The newest version of each document.
    finals: Vec<Document>,
    /// Chunk count of each of `finals`.
    expected: Vec<usize>,
    /// Model tokens of every message's chunks.
    tokens: u64,
}

impl Corpus {
    fn new(messages: Vec<Document>, chunker: &Chunker, tokenizer: &tokenizers::Tokenizer) -> Self {
        let mut finals: Vec<Document> = Vec::new();
        for doc in &messages {
            match finals
                .iter_mut()
                .find(|d| d.tenant == doc.tenant && d.document_id == doc.document_id)
            {
                Some(existing) if existing.version < doc.version => *existing = doc.clone(),
                Some(_) => {}
                None => finals.push(doc.clone()),
            }
        }
        let expected = support::expected_chunks(chunker, &finals);
        let texts: Vec<String> = messages
            .iter()
            .flat_map(|doc| {
                chunker
                    .split(&doc.content, doc.format().expect("markdown"))
                    .into_iter()
                    .map(|c| c.text)
            })
            .collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let tokens = support::model_tokens(tokenizer, &refs);
        Corpus {
            messages,
            finals,
            expected,
            tokens,
        }
    }
}

/// The figures of one run.
struct RunResult {
    elapsed: Duration,
    /// Every difference between the store and the corpus (empty when right).
    problems: Vec<String>,
}

/// One run with `processes` workers (pinned to a core each if `cores` is given).
#[allow(clippy::too_many_arguments)]
fn run(
    rt: &tokio::runtime::Runtime,
    binary: &WorkerBinary,
    backend: &Backend,
    processes: usize,
    cores: Option<&[usize]>,
    corpus: &Corpus,
    embedder: &CandleEmbedder,
) -> RunResult {
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
        .enumerate()
        .map(|(k, (file, _))| {
            let core = cores.map(|c| c[k % c.len()]);
            WorkerProcess::start_on(binary, file, &[], core)
        })
        .collect();
    for worker in &mut workers {
        worker.wait_for(&support::CONSUMING, 1, Duration::from_secs(120));
    }
    let submitter = rt
        .block_on(Submitter::connect(&pipeline.config))
        .expect("the submitter connects");

    let messages = &corpus.messages;
    let started = Instant::now();
    for (doc, result) in messages
        .iter()
        .zip(rt.block_on(submitter.submit_all(messages, |_, _| {})))
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
        let done: usize = workers
            .iter()
            .map(|w| w.count(&support::STORED) + w.count(&support::STALE))
            .sum();
        if done >= messages.len() {
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
            "BENCH FAILED: only {done} of {} messages processed within 15 minutes",
            messages.len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = started.elapsed();
    rt.block_on(submitter.close());

    for worker in &workers {
        worker.signal("TERM");
    }
    let (mut per_worker, mut stale) = (Vec::new(), 0);
    for worker in workers {
        let (status, log) = worker.wait_exit_blocking(Duration::from_secs(60));
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
        stale += support::final_count(&log, "stale");
    }
    let mut problems = Vec::new();
    let total: u64 = per_worker.iter().sum::<u64>() + stale;
    if total != messages.len() as u64 {
        problems.push(format!(
            "the workers stored {per_worker:?} and skipped {stale} as older: {total} outcomes \
             for {} messages (each must have exactly one)",
            messages.len()
        ));
    }
    let fingerprint = &rag_ingest::setup::collection_fingerprint(embedder.fingerprint());
    let verified = match backend {
        Backend::EdgePerProcess => {
            let stores: Vec<EdgeStore> = configs
                .iter()
                .map(|(_, config)| {
                    EdgeStore::open(&config.store.path, &config.store.collection, fingerprint)
                        .expect("a worker's store opens after it exited")
                })
                .collect();
            rt.block_on(support::verify_stored(
                &stores,
                &corpus.finals,
                &corpus.expected,
            ))
            .map(|_| ())
        }
        Backend::Qdrant(_) => rt.block_on(async {
            let store = QdrantStore::open(
                &setup::qdrant_options(&pipeline.config),
                &pipeline.config.store.collection,
                fingerprint,
            )
            .await
            .expect("the Qdrant collection opens");
            let counts = support::verify_stored(
                std::slice::from_ref(&store),
                &corpus.finals,
                &corpus.expected,
            )
            .await;
            let versions = verify_newest(&store, corpus).await;
            match (counts, versions) {
                (Ok(_), Ok(())) => Ok(()),
                (a, b) => Err([a.err(), b.err()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("\n")),
            }
        }),
    };
    if let Err(e) = verified {
        problems.push(format!("the store differs from the corpus:\n{e}"));
    }
    let pinning = match cores {
        Some(c) => format!(
            "pinned ({})",
            (0..processes)
                .map(|k| format!("w{k}→cpu{}", c[k % c.len()]))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        None => "unpinned".to_owned(),
    };
    eprintln!(
        "scale_out: {}: {processes} process(es), {pinning}: {:.3} s, {:.2} docs/s; stored per \
         process {per_worker:?}, skipped as older {stale}{}",
        backend.name(),
        elapsed.as_secs_f64(),
        messages.len() as f64 / elapsed.as_secs_f64(),
        if problems.is_empty() {
            String::new()
        } else {
            format!("; PROBLEMS:\n{}", problems.join("\n"))
        }
    );
    RunResult { elapsed, problems }
}

/// Checks that every chunk of each versioned document carries its newest version.
async fn verify_newest(store: &QdrantStore, corpus: &Corpus) -> Result<(), String> {
    let mut problems = Vec::new();
    for (doc, &want) in corpus.finals.iter().zip(&corpus.expected) {
        let Some(newest) = doc.version.filter(|&v| v > 1) else {
            continue;
        };
        let chunks = store
            .chunk_vectors(&doc.tenant, &doc.document_id, want)
            .await
            .map_err(|e| format!("read {}: {e}", doc.document_id))?;
        let versions: Vec<Option<u64>> = chunks.iter().map(|c| c.payload.version).collect();
        if chunks.len() != want || versions.iter().any(|v| *v != Some(newest)) {
            problems.push(format!(
                "{}/{}: chunk versions {versions:?}, expected {want} chunks of version {newest}",
                doc.tenant, doc.document_id
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// The server corpus: `docs` as version 1, then [`VERSIONED`] of them again as version 2 with
/// more text (so more chunks), published after all the others.
fn versioned(docs: &[Document]) -> Vec<Document> {
    let mut messages: Vec<Document> = docs
        .iter()
        .map(|d| Document {
            version: Some(1),
            ..d.clone()
        })
        .collect();
    let step = docs.len() / VERSIONED;
    for k in 0..VERSIONED {
        let mut newer = messages[k * step].clone();
        newer.version = Some(2);
        newer.content = format!(
            "{}\n\n## Revision 2\n\n{}",
            newer.content,
            messages[(k * step + 1) % docs.len()].content
        );
        newer.metadata.insert("revision".into(), 2.into());
        messages.push(newer);
    }
    messages
}

/// The CPU cores this process may run on (`taskset -cp`), e.g. `[0, 1]`.
fn allowed_cores() -> Vec<usize> {
    let out = std::process::Command::new("taskset")
        .args(["-cp", &std::process::id().to_string()])
        .output()
        .expect("taskset runs (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    let list = text.rsplit(':').next().unwrap_or("").trim();
    let mut cores = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().expect("core"), b.parse().expect("core"));
                cores.extend(a..=b);
            }
            None => cores.push(part.parse().expect("core")),
        }
    }
    assert!(!cores.is_empty(), "no cores in {text:?}");
    cores
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
    let edge = Corpus::new(docs.clone(), &chunker, embedder.tokenizer());
    let server = Corpus::new(versioned(&docs), &chunker, embedder.tokenizer());
    // A second version has more chunks than its first, so a mix of the two shows.
    for (doc, &chunks) in server.finals.iter().zip(&server.expected) {
        if doc.version == Some(2) {
            let first = docs
                .iter()
                .find(|d| d.document_id == doc.document_id)
                .expect("the first version");
            let older = support::expected_chunks(&chunker, std::slice::from_ref(first));
            assert!(
                chunks > older[0],
                "{}: version 2 has {chunks} chunks, version 1 {}",
                doc.document_id,
                older[0]
            );
        }
    }
    eprintln!(
        "scale_out: edge corpus {DOCS} documents, {} chunks, {} model tokens; server corpus {} \
         messages ({VERSIONED} documents in two versions), {} chunks stored at the end, {} model \
         tokens; worker.concurrency {} per process",
        edge.expected.iter().sum::<usize>(),
        edge.tokens,
        server.messages.len(),
        server.expected.iter().sum::<usize>(),
        server.tokens,
        config.worker.concurrency
    );
    let mut problems: Vec<String> = Vec::new();
    let rate = |corpus: &Corpus, d: Duration| {
        (
            corpus.messages.len() as f64 / d.as_secs_f64(),
            corpus.tokens as f64 / d.as_secs_f64(),
        )
    };

    // Edge, alternating 1 and 2 processes, so a burst of load elsewhere hits both alike.
    let backend = Backend::EdgePerProcess;
    let (mut ones, mut twos) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        for (n, into) in [(1, &mut ones), (2, &mut twos)] {
            let r = run(&rt, &binary, &backend, n, None, &edge, &embedder);
            problems.extend(r.problems);
            into.push(r.elapsed);
        }
    }
    let one = support::median(&ones).expect("RUNS > 0");
    let two = support::median(&twos).expect("RUNS > 0");
    let ((d1, t1), (d2, t2)) = (rate(&edge, one), rate(&edge, two));
    println!(
        "scale-out, {} (medians of {RUNS} runs each): 1 process {d1:.2} docs/s ({t1:.0} \
         tokens/s), 2 processes {d2:.2} docs/s ({t2:.0} tokens/s): speed-up {:.2}x",
        backend.name(),
        one.as_secs_f64() / two.as_secs_f64()
    );

    // The shared server: QDRANT_URL, or one of our own.
    let mut own_server = None;
    let url = match std::env::var("QDRANT_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            eprintln!("scale_out: QDRANT_URL not set; starting a Qdrant server of this bench");
            own_server = rt.block_on(qdrant_server::QdrantServer::start(
                "the shared-server scale-out",
                qdrant_server::ServerOptions::default(),
            ));
            own_server.as_ref().map(|s| s.grpc_url())
        }
    };
    match url {
        None => eprintln!(
            "SKIPPED: no Qdrant server (QDRANT_URL unset and no server binary) — the \
             shared-server scale-out did not run"
        ),
        Some(url) => {
            let backend = Backend::Qdrant(url);
            let cores = allowed_cores();
            let cases: Vec<(usize, bool)> = [false, true]
                .into_iter()
                .flat_map(|pinned| SERVER_PROCESSES.map(|n| (n, pinned)))
                .collect();
            let mut times: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
            for _ in 0..RUNS {
                for (i, &(n, pinned)) in cases.iter().enumerate() {
                    let pin = pinned.then_some(cores.as_slice());
                    let r = run(&rt, &binary, &backend, n, pin, &server, &embedder);
                    problems.extend(r.problems);
                    times[i].push(r.elapsed);
                }
            }
            println!(
                "scale-out, {} (medians of {RUNS} runs each; {} messages, {} tokens; cores \
                 {cores:?}):",
                backend.name(),
                server.messages.len(),
                server.tokens
            );
            for pinned in [false, true] {
                let mut base = None;
                let mut line = Vec::new();
                for (i, &(n, p)) in cases.iter().enumerate() {
                    if p != pinned {
                        continue;
                    }
                    let median = support::median(&times[i]).expect("RUNS > 0");
                    let base = *base.get_or_insert(median);
                    let (docs_s, tokens_s) = rate(&server, median);
                    line.push(format!(
                        "{n} process(es) {docs_s:.2} docs/s ({tokens_s:.0} tokens/s, {:.2}x)",
                        base.as_secs_f64() / median.as_secs_f64()
                    ));
                }
                println!(
                    "  {}: {}",
                    if pinned {
                        "pinned, one core each (worker i on core i mod cores)"
                    } else {
                        "unpinned"
                    },
                    line.join(", ")
                );
            }
        }
    }
    drop(own_server);
    assert!(
        problems.is_empty(),
        "BENCH FAILED: {} run(s) found the store differing from the corpus:\n{}",
        problems.len(),
        problems.join("\n\n")
    );
}
