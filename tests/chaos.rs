//! Chaos soak that checks state, not counts: two worker processes share one queue and one
//! collection on a Qdrant server of the test's own. They get a shuffled stream of upserts of
//! several versions per document, deletes at some versions, and bad messages, while the test
//! kills a worker with SIGKILL (and starts it again), drops the workers' broker connections
//! (twice), takes the embedding provider down (the workers use the OpenAI client against a
//! local server that answers 503 while down and the real model's vectors while up), and kills
//! and restarts the Qdrant server. At the end the store is compared with a model
//! computed from the messages alone: per document, the message with the highest version
//! decides (absent if it is a delete, otherwise exactly its chunks). It prints
//! `chaos: docs=N wrong=0 lost=0 duplicated=0 dead_lettered=K (expected K)`.
//!
//! The default is a short run for CI (`CHAOS_DOCS`, default 16 documents × 4 versions); set
//! `CHAOS_DOCS=200` for a longer one.

mod common;
#[path = "support/openai_server.rs"]
mod openai_server;
#[path = "support/qdrant_server.rs"]
mod qdrant_server;

use std::sync::Arc;
use std::time::Duration;

use common::{TestPipeline, TestStore, WorkerProcess, embedder, expected_chunks};
use openai_server::{Embedder503, MODEL};
use qdrant_server::{QdrantServer, ServerOptions};
use rag_ingest::embed::Embedder;
use rag_ingest::message::{Document, Op};
use rag_ingest::queue::{Submitter, Topology};
use rag_ingest::setup;
use rag_ingest::store::VectorStore;
use rag_ingest::tenant::TenantId;

const CONFIG: &str = "[retry]\nmax_attempts = 10\nin_process_retries = 2\nbackoff_min_ms = 50\nbackoff_max_ms = 500\ndelays_ms = [300, 1000, 2000]\n[worker]\nconcurrency = 4\nshutdown_grace_secs = 20\nreconnect_give_up_secs = 60\n";

/// Deterministic xorshift for the shuffle.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The text of `doc`'s version `v`: 1 to 4 paragraphs, so versions differ in chunk count.
fn text(doc: usize, v: u64) -> String {
    let paragraphs = 1 + (doc + v as usize) % 4;
    (0..paragraphs)
        .map(|p| {
            format!(
                "Document {doc} version {v} paragraph {p}: the ferry crossed the fjord at \
                 dawn while the heron watched the basalt cliffs and the quill scratched \
                 notes about tide number {} in the harbour log.",
                doc * 31 + v as usize * 7 + p
            )
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The messages of the soak: for each document versions 1..=4 (upserts), a delete at
/// version 3 for every third document and at version 5 for every fifth; shuffled.
fn messages(docs: usize, rng: &mut Rng) -> Vec<Document> {
    let mut out = Vec::new();
    for d in 0..docs {
        let tenant = TenantId::new(if d % 2 == 0 { "acme" } else { "globex" }).expect("tenant");
        let id = format!("chaos-{d}");
        for v in 1..=4u64 {
            if d % 3 == 0 && v == 3 {
                let mut delete = Document::delete(tenant.clone(), id.clone());
                delete.version = Some(v);
                out.push(delete);
                continue;
            }
            let mut upsert = Document::upsert(tenant.clone(), id.clone(), text(d, v));
            upsert.version = Some(v);
            out.push(upsert);
        }
        if d % 5 == 0 {
            let mut delete = Document::delete(tenant.clone(), id.clone());
            delete.version = Some(5);
            out.push(delete);
        }
    }
    for i in (1..out.len()).rev() {
        out.swap(i, rng.below(i + 1));
    }
    out
}

/// Bad messages from the fixtures (each must be dead-lettered once).
fn bad_messages() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/messages/bad");
    let mut bodies: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .expect("bad fixtures")
        .map(|e| std::fs::read(e.expect("entry").path()).expect("body"))
        .collect();
    bodies.sort();
    bodies.truncate(5);
    bodies
}

/// Submits `docs` in order (confirmed) with the bad messages spread among them.
async fn submit(t: &TestPipeline, docs: &[Document], bad: &[Vec<u8>]) {
    let submitter = common::within("connect", Submitter::connect(&t.config))
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672");
    let step = docs.len() / (bad.len() + 1);
    let mut bad = bad.iter().enumerate();
    for (i, doc) in docs.iter().enumerate() {
        let result = common::within("submit", submitter.submit(doc)).await;
        assert!(result.is_ok(), "confirmed: {result:?}");
        if step > 0
            && i % step == step - 1
            && let Some((k, body)) = bad.next()
        {
            let properties = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(format!("chaos-bad-{k}").into());
            common::within("submit bad", submitter.submit_raw(body, properties))
                .await
                .expect("bad message confirmed");
        }
    }
    for (k, body) in bad {
        let properties = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("chaos-bad-{k}").into());
        common::within("submit bad", submitter.submit_raw(body, properties))
            .await
            .expect("bad message confirmed");
    }
    submitter.close().await;
}

/// Replaces the `[embedder]` table of the pipeline file `file` with the OpenAI client of
/// `server` (same vector space as the local model: the same fingerprint).
fn use_remote_embedder(file: &std::path::Path, server: &Embedder503) {
    let text = std::fs::read_to_string(file).expect("pipeline file");
    let start = text.find("[embedder]\n").expect("an [embedder] table");
    let end = text[start + 1..]
        .find("\n[")
        .map_or(text.len(), |i| start + 1 + i + 1);
    let remote = format!(
        "[embedder]\nkind = \"openai\"\nbatch_size = 8\nbase_url = \"http://{addr}\"\n\
         model = \"all-minilm\"\nfingerprint_model = \"{MODEL}\"\ndims = 384\n\
         pooling = \"mean\"\nnormalized = true\nmax_input_tokens = 256\n\
         tokenizer = \"{tokenizer}\"\nrequest_timeout_ms = 10000\nrate_limit_retries = 0\n\
         breaker_failures = 3\nbreaker_open_ms = 500\n",
        addr = server.addr,
        tokenizer = common::model_dir().join("tokenizer.json").display(),
    );
    let text = format!("{}{remote}{}", &text[..start], &text[end..]);
    std::fs::write(file, text).expect("write pipeline file");
}

/// The stored chunks as `index/count@version (order, worker-side ingestion time)`, to tell
/// which writes left them.
fn describe(chunks: &[rag_ingest::store::StoredChunk]) -> String {
    chunks
        .iter()
        .map(|c| {
            format!(
                "{}/{}@{:?} ({:?}, {})",
                c.payload.chunk_index,
                c.payload.chunk_count,
                c.payload.version,
                c.payload.order,
                c.payload.ingested_at
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits until at most `left` messages are ready in the main and retry queues.
async fn wait_backlog(t: &TestPipeline, left: u64) {
    common::eventually(
        Duration::from_secs(300),
        &format!("backlog down to {left}"),
        || async { common::pending(&t.config).await <= left },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_several_workers_faults_and_shuffled_versions_leave_the_newest_state() {
    let Some(mut server) = QdrantServer::start("chaos", ServerOptions::default()).await else {
        return;
    };
    let n: usize = std::env::var("CHAOS_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let mut t = TestPipeline::on(
        TestStore::Qdrant {
            url: server.grpc_url(),
        },
        "chaos",
        CONFIG,
    );
    // Kills return a worker's prefetched deliveries with their delivery count raised: keep
    // the crash-loop guard well above the faults this test injects.
    t.config.broker.prefetch = 8;
    t.config.broker.delivery_limit = 20;
    let file = common::write_pipeline_file(&t);
    let provider = Embedder503::start(false).await;
    use_remote_embedder(&file, &provider);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let docs = messages(n, &mut rng);
    let bad = bad_messages();
    let total = docs.len() as u64 + bad.len() as u64;
    submit(&t, &docs, &bad).await;

    // Fault 1: the embedding provider is down (503) as the workers start, until they have
    // seen it fail several times (their breakers open and they stop taking messages); then
    // it comes back.
    provider.set_down(true);
    let mut workers = vec![
        WorkerProcess::start(&file, false),
        WorkerProcess::start(&file, false),
    ];
    common::eventually(
        Duration::from_secs(120),
        "failed embedding calls",
        || async { provider.requests.load(std::sync::atomic::Ordering::SeqCst) >= 6 },
    )
    .await;
    provider.set_down(false);
    // Fault 2: SIGKILL a worker mid-run, start it again.
    wait_backlog(&t, total * 4 / 5).await;
    workers[0].signal("KILL");
    let killed = workers.remove(0);
    // Every worker's log, kept for a failure's report.
    let mut logs = Vec::new();
    let (status, log) = killed.wait_exit(Duration::from_secs(20)).await;
    logs.push(log);
    assert!(!status.success(), "killed");
    workers.push(WorkerProcess::start(&file, false));
    // Fault 3: the broker drops every worker connection.
    wait_backlog(&t, total * 3 / 5).await;
    let dropped = common::close_worker_connections(&t.config.name);
    // Fault 4: the Qdrant server crashes and comes back.
    wait_backlog(&t, total * 2 / 5).await;
    server.kill();
    server.restart().await;
    // Fault 5: the broker drops the connections again, near the end (messages in flight
    // are redelivered to the other worker while their first copy may still be writing).
    wait_backlog(&t, total / 5).await;
    let dropped = dropped + common::close_worker_connections(&t.config.name);

    // Let the workers finish what is queued, stop them, and drain what they returned.
    wait_backlog(&t, 0).await;
    for worker in &workers {
        worker.signal("TERM");
    }
    for worker in workers {
        let (status, log) = worker.wait_exit(Duration::from_secs(60)).await;
        assert!(status.success(), "a stopped worker exits 0:\n{log}");
        logs.push(log);
    }
    let last = WorkerProcess::start(&file, true);
    let (status, log) = last.wait_exit(Duration::from_secs(300)).await;
    assert!(status.success(), "{log}");
    logs.push(log);

    // The model: the highest version per document decides.
    let store = Arc::new(
        setup::open_vector_store(&t.config, embedder().fingerprint())
            .await
            .expect("store opens"),
    );
    let mut newest: std::collections::BTreeMap<(String, String), &Document> = Default::default();
    for doc in &docs {
        let key = (doc.tenant.as_str().to_owned(), doc.document_id.clone());
        let entry = newest.entry(key).or_insert(doc);
        if doc.version > entry.version {
            *entry = doc;
        }
    }
    let (mut wrong, mut lost, mut duplicated) = (0, 0, 0);
    let mut problems = Vec::new();
    for doc in newest.values() {
        let count = store
            .count(&doc.tenant, Some(&doc.document_id))
            .await
            .expect("count");
        let chunks = store
            .chunk_vectors(&doc.tenant, &doc.document_id, 64)
            .await
            .expect("read chunks");
        match doc.op {
            Op::Delete => {
                if count != 0 {
                    wrong += 1;
                    problems.push(format!("{} deleted but holds {count}", doc.document_id));
                }
            }
            Op::Upsert => {
                let expected = expected_chunks(&t.config, doc);
                let sha = rag_ingest::process::content_sha256(&doc.content);
                if count == 0 {
                    lost += 1;
                    problems.push(format!("{} lost", doc.document_id));
                } else if count > expected {
                    duplicated += 1;
                    problems.push(format!(
                        "{} holds {count} > {expected}: {}",
                        doc.document_id,
                        describe(&chunks)
                    ));
                } else if count != expected
                    || chunks.len() != expected
                    || chunks.iter().any(|c| {
                        c.payload.content_sha256 != sha || c.payload.version != doc.version
                    })
                {
                    wrong += 1;
                    problems.push(format!(
                        "{} holds another revision: {}",
                        doc.document_id,
                        describe(&chunks)
                    ));
                }
            }
        }
    }
    let dlq = Topology::new(&t.config).dlq();
    let dead_lettered = common::queue_len(&dlq).await as usize;
    println!(
        "chaos: docs={} wrong={wrong} lost={lost} duplicated={duplicated} \
         dead_lettered={dead_lettered} (expected {}) messages={total} connections_dropped={dropped} \
         provider_requests={}",
        newest.len(),
        bad.len(),
        provider.requests.load(std::sync::atomic::Ordering::SeqCst)
    );
    if !problems.is_empty() {
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{}-workers.log", t.config.name));
        let written = std::fs::write(&path, logs.join("\n----- next worker -----\n"));
        panic!(
            "{problems:#?}\nthe workers' logs: {} ({written:?})",
            path.display()
        );
    }
    // What the DLQ holds, by kind, tenant and stage, to explain a mismatch.
    let dlq_list = std::process::Command::new(env!("CARGO_BIN_EXE_rag-ingest"))
        .args(["dlq", "list", "--pipeline"])
        .arg(&file)
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_else(|e| format!("(dlq list failed: {e})"));
    // Only the bad messages are dead-lettered, each of them. RabbitMQ cannot publish the
    // DLQ copy and ack the original atomically: a connection lost between the copy's
    // confirm and the ack dead-letters that message again on its redelivery (at least
    // once), so at most one extra copy per dropped connection is allowed.
    let (_, entries) =
        rag_ingest::queue::inspect_dlq(&t.config, &rag_ingest::queue::DlqFilter::default())
            .await
            .expect("inspect the DLQ");
    let mut bodies: Vec<Vec<u8>> = entries.into_iter().map(|e| e.body).collect();
    bodies.sort();
    bodies.dedup();
    assert!(
        bodies == bad && dead_lettered <= bad.len() + dropped,
        "only the bad messages are dead-lettered ({} distinct of {} expected, {dead_lettered} \
         copies); the DLQ holds:\n{dlq_list}",
        bodies.len(),
        bad.len()
    );
    assert_eq!(common::pending(&t.config).await, 0);
    t.delete_queues().await;
}
