//! Qdrant Edge under disk faults and long runs, with the real model and chunker:
//! - a write whose flush failed is never acknowledged on the strength of reads of state that
//!   is not on disk (issue 15, item 3);
//! - the data directory stays within a small multiple of the live data however many
//!   versions are written (issue 15, item 4).
//!
//! The fault tests run the pipeline in a child process that exits without running any
//! destructor (a crash: qdrant-edge's flush-on-drop never runs), then reopen the store from
//! disk in the parent.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{TestPipeline, embedder, short_docs};
use rag_ingest::embed::Embedder;
use rag_ingest::message::Document;
use rag_ingest::process::Pipeline;
use rag_ingest::setup;
use rag_ingest::store::{EdgeStore, VectorStore};

/// Set in the child process: the store directory to write to.
const CHILD_DIR_ENV: &str = "RAG_INGEST_TEST_EDGE_DURABILITY_DIR";
/// Set in the child process: how many flushes fail.
const CHILD_FAILURES_ENV: &str = "RAG_INGEST_TEST_EDGE_DURABILITY_FAILURES";
/// Printed by the child for each delivery the pipeline accepted (the worker would ack it).
const ACKED: &str = "DELIVERY-ACKED";
/// Printed by the child for each delivery the pipeline failed (it would stay queued).
const FAILED: &str = "DELIVERY-FAILED";
const COLLECTION: &str = "c";

/// The document every fault test writes.
fn document() -> Document {
    short_docs("acme", "durable", 3).remove(2)
}

/// Child side: opens the store in `dir`, makes the next `failures` flushes fail, processes
/// the document up to three times (the first delivery and its in-process retries, as the
/// worker does until one succeeds), prints what the worker would do with each delivery,
/// then exits without running any destructor.
async fn child(dir: &Path, failures: u32) -> ! {
    let t = TestPipeline::new("edge-durability-child", "");
    let embedder = embedder();
    let chunker = setup::chunker(&t.config, &embedder).expect("chunker");
    let store = EdgeStore::open(dir, COLLECTION, embedder.fingerprint()).expect("store opens");
    store.inject_flush_failures(failures);
    let pipeline = Pipeline::new(Arc::new(chunker), embedder, Arc::new(store));
    let doc = document();
    for attempt in 1..=3 {
        match pipeline.process(&doc).await {
            Ok(outcome) => {
                println!("{ACKED} attempt={attempt} outcome={}", outcome.label());
                break;
            }
            Err(failure) => println!("{FAILED} attempt={attempt} kind={}", failure.kind),
        }
    }
    std::process::exit(0);
}

/// Runs `test` in a child process against `dir` with `failures` failing flushes; returns
/// its stdout.
fn run_child(test: &str, dir: &Path, failures: u32) -> String {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_FAILURES_ENV, failures.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "the child failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The child's side when this process is one; otherwise nothing.
async fn maybe_child() {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        let failures = std::env::var(CHILD_FAILURES_ENV)
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        child(Path::new(&dir), failures).await;
    }
}

/// Chunks of `doc` on disk after a restart (the store reopened from disk).
async fn chunks_on_disk(dir: &Path, doc: &Document) -> usize {
    let store = EdgeStore::open(dir, COLLECTION, embedder().fingerprint()).expect("reopen");
    store.count(&doc.tenant, Some(&doc.document_id)).await.unwrap()
}

/// A flush fails once, the delivery fails; its retry must not find its own unflushed chunks
/// and call the document unchanged. After a crash, the acknowledged document is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_is_never_acknowledged_as_unchanged() {
    const TEST: &str = "a_failed_flush_is_never_acknowledged_as_unchanged";
    maybe_child().await;
    let dir = tempfile::tempdir().unwrap();
    let out = run_child(TEST, dir.path(), 1);
    eprintln!("{out}");
    assert!(
        out.contains(&format!("{FAILED} attempt=1")),
        "the delivery whose flush failed must fail: {out}"
    );
    let acked = out.contains(ACKED);
    let stored = chunks_on_disk(dir.path(), &document()).await;
    assert!(
        !acked || stored > 0,
        "the delivery was acknowledged ({out}) but after a restart the document has \
         {stored} chunks on disk"
    );
    // The fault was transient: the retry makes the write durable and succeeds.
    assert!(acked, "a retry after a one-off flush failure succeeds: {out}");
}

/// A persistent disk fault: every delivery fails (none is acknowledged) and nothing claims
/// to be stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_flush_fault_fails_every_delivery() {
    const TEST: &str = "a_persistent_flush_fault_fails_every_delivery";
    maybe_child().await;
    let dir = tempfile::tempdir().unwrap();
    let out = run_child(TEST, dir.path(), u32::MAX);
    eprintln!("{out}");
    let stored = chunks_on_disk(dir.path(), &document()).await;
    assert!(
        !out.contains(ACKED),
        "a delivery was acknowledged although no flush ever succeeded ({stored} chunks on \
         disk after the restart): {out}"
    );
    assert_eq!(out.matches(FAILED).count(), 3, "{out}");
}
