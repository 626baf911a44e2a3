//! The real `rag-ingest worker` process against the real RabbitMQ: killed with SIGKILL in
//! the middle of a batch, stopped with SIGTERM or SIGINT, or cut off from the broker, it
//! never loses a document and never stores one twice.
//!
//! The store (Qdrant Edge) is locked by the worker process while it runs, so these tests
//! watch the worker's log lines and the broker's queue lengths while it runs, and open the
//! store only after it has exited.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{
    Event, MODEL_LOADED, STORED, TestPipeline, TestStore, WorkerProcess, count_events, embedder,
    eventually, expected_chunks, final_count, queue_len, short_docs,
};
use rag_ingest::embed::Embedder;
use rag_ingest::message::Document;
use rag_ingest::queue::Topology;
use rag_ingest::setup;
use rag_ingest::store::{Store, VectorStore};
use rag_ingest::tenant::TenantId;

const FAST: &str = "[retry]\nmax_attempts = 3\nin_process_retries = 1\nbackoff_min_ms = 5\nbackoff_max_ms = 10\ndelays_ms = [200, 400]\n[worker]\nshutdown_grace_secs = 10\nreconnect_give_up_secs = 30\n";

fn docs(prefix: &str, n: usize) -> Vec<Document> {
    let mut docs = short_docs("acme", prefix, n / 2);
    docs.extend(short_docs("globex", prefix, n - n / 2));
    docs
}

async fn setup_pipeline(test: &str, docs: &[Document]) -> (TestPipeline, PathBuf) {
    setup_pipeline_on(TestStore::Edge, test, docs).await
}

async fn setup_pipeline_on(
    kind: TestStore,
    test: &str,
    docs: &[Document],
) -> (TestPipeline, PathBuf) {
    let t = TestPipeline::on(kind, test, FAST);
    let file = common::write_pipeline_file(&t);
    common::submit(&t.config, docs).await;
    (t, file)
}

/// Opens the pipeline's store (an Edge store only while no worker process runs).
async fn open_store(t: &TestPipeline) -> Store {
    setup::open_vector_store(&t.config, embedder().fingerprint())
        .await
        .expect("store opens")
}

/// Points per document (0 if absent), checking that none is partially stored.
async fn stored_docs<S: VectorStore>(t: &TestPipeline, store: &S, docs: &[Document]) -> usize {
    let mut stored = 0;
    for doc in docs {
        let count = store.count(&doc.tenant, Some(&doc.document_id));
        let points = common::within("count stored points", count)
            .await
            .expect("count");
        if points > 0 {
            assert_eq!(
                points,
                expected_chunks(&t.config, doc),
                "{}/{} stored completely, once",
                doc.tenant,
                doc.document_id
            );
            stored += 1;
        }
    }
    stored
}

/// Every document stored exactly once and nothing else in the store; queues empty.
async fn assert_all_stored_once(t: &TestPipeline, docs: &[Document]) {
    let store = open_store(t).await;
    assert_eq!(stored_docs(t, &store, docs).await, docs.len(), "all stored");
    let expected: usize = docs.iter().map(|d| expected_chunks(&t.config, d)).sum();
    let mut total = 0;
    for tenant in ["acme", "globex"] {
        total += store
            .count(&TenantId::new(tenant).expect("tenant"), None)
            .await
            .expect("count");
    }
    assert_eq!(total, expected, "total points == sum of chunk counts");
    drop(store);
    let topology = Topology::new(&t.config);
    assert_eq!(
        common::pending(&t.config).await,
        0,
        "main and retry queues empty"
    );
    assert_eq!(queue_len(&topology.dlq()).await, 0, "nothing dead-lettered");
}

on_both_stores!(
    /// SIGKILL in the middle of a batch, then a restart with `--exit-when-idle`: every
    /// document is stored exactly once.
    signals_sigkill_mid_batch_then_restart_stores_each_document_once
);
async fn signals_sigkill_mid_batch_then_restart_stores_each_document_once(kind: TestStore) {
    let docs = docs("kill", 40);
    let (t, file) = setup_pipeline_on(kind, "sig-kill", &docs).await;
    let mut worker = WorkerProcess::start(&file, false);
    worker.wait_stored(5).await;
    worker.signal("KILL");
    let (status, log) = worker.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success(), "killed");
    let stored_before = count_events(&log, &STORED);
    assert!(
        stored_before < docs.len(),
        "killed mid-batch ({stored_before} stored)"
    );

    // The killed worker's deliveries return to the queue.
    let main = Topology::new(&t.config).main_queue();
    let left = docs.len() - stored_before;
    eventually(
        Duration::from_secs(10),
        "unacked messages back in the queue",
        || async { queue_len(&main).await as usize >= left },
    )
    .await;

    let worker = WorkerProcess::start(&file, true);
    let (status, log) = worker.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{log}");
    assert_all_stored_once(&t, &docs).await;
    t.delete_queues().await;
}

/// SIGTERM (or SIGINT) during a run: exit code 0; every acked document is stored, every
/// other one is still queued (stored + queued == submitted); a restart finishes the batch.
async fn graceful_stop(signal: &str) {
    let docs = docs(&format!("stop-{signal}"), 40);
    let (t, file) = setup_pipeline(&format!("sig-{}", signal.to_lowercase()), &docs).await;
    let mut worker = WorkerProcess::start(&file, false);
    worker.wait_stored(5).await;
    worker.signal(signal);
    let (status, log) = worker.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "SIG{signal} exits 0:\n{log}");
    assert_eq!(
        count_events(&log, &Event::named("shutdown_requested")),
        1,
        "{log}"
    );
    let reported = final_count(&log, "stored") as usize;
    assert_eq!(reported, count_events(&log, &STORED), "{log}");
    assert!(
        reported < docs.len(),
        "stopped mid-batch ({reported} stored)"
    );

    let store = open_store(&t).await;
    let stored = stored_docs(&t, &store, &docs).await;
    drop(store);
    assert_eq!(stored, reported, "everything the worker reported is stored");
    let main = Topology::new(&t.config).main_queue();
    let wanted = docs.len() - stored;
    eventually(
        Duration::from_secs(10),
        "stored + queued == submitted",
        || async { queue_len(&main).await as usize == wanted },
    )
    .await;

    let worker = WorkerProcess::start(&file, true);
    let (status, log) = worker.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{log}");
    assert_eq!(final_count(&log, "stored") as usize, wanted, "{log}");
    assert_all_stored_once(&t, &docs).await;
    t.delete_queues().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_sigterm_mid_batch_exits_zero_and_loses_nothing() {
    graceful_stop("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_sigint_mid_batch_behaves_like_sigterm() {
    graceful_stop("INT").await;
}

/// The broker closes the worker's connection mid-batch (only that connection, found by its
/// name): the worker reconnects, finishes the batch and stops cleanly; nothing lost, nothing
/// stored twice. Half the documents are submitted only after the close, so the worker has
/// work left to reconnect for however fast it is (on a fast CPU the whole first half can be
/// done before the close takes effect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_connection_closed_by_broker_worker_reconnects_and_finishes() {
    let docs = docs("drop", 60);
    let (first, rest) = docs.split_at(docs.len() / 2);
    let (t, file) = setup_pipeline("sig-drop", first).await;
    let mut worker = WorkerProcess::start(&file, false);
    worker.wait_stored(5).await;
    let name = t.config.name.clone();
    eventually(
        Duration::from_secs(10),
        "the worker's named connection",
        || {
            let name = name.clone();
            async move { !common::worker_connections(&name).is_empty() }
        },
    )
    .await;
    assert_eq!(common::close_worker_connections(&t.config.name), 1);
    common::submit(&t.config, rest).await;
    // Every document settled (stored, or found unchanged when redelivered after the close).
    // The deadline only bounds a hang: 60 documents through the dev build's model take up
    // to about 50 s beside the other tests of this file.
    let settled = |w: &WorkerProcess| {
        w.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["fields"]["event"] == "message_settled")
            .filter_map(|e| {
                let span = &e["span"];
                Some((
                    span["tenant_id"].as_str()?.to_owned(),
                    span["document_id"].as_str()?.to_owned(),
                ))
            })
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    worker
        .wait_until(
            "every document settled",
            Duration::from_secs(180),
            Duration::from_millis(100),
            |w| settled(w) == docs.len(),
        )
        .await;
    worker.signal("TERM");
    let (status, log) = worker.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{log}");
    assert!(
        count_events(&log, &Event::named("broker_connection_lost")) >= 1,
        "{log}"
    );
    assert!(final_count(&log, "reconnects") >= 1, "{log}");
    assert_all_stored_once(&t, &docs).await;
    t.delete_queues().await;
}

/// SIGTERM while the worker is still starting (model loaded, broker not yet consumed):
/// it exits 0 like any other SIGTERM (the handlers are installed before start-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_sigterm_during_startup_exits_zero() {
    let (t, file) = setup_pipeline("sig-early", &docs("early", 2)).await;
    let worker = WorkerProcess::start(&file, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while worker.count(&MODEL_LOADED) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no start-up:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    worker.signal("TERM");
    let (status, log) = worker.wait_exit(Duration::from_secs(30)).await;
    t.delete_queues().await;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM during start-up exits 0:\n{log}"
    );
}
