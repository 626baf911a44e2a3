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
use rag_ingest::store::{EdgeMaintenance, EdgeStore, VectorStore};

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
    let output = common::run_ok(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, dir)
            .env(CHILD_FAILURES_ENV, failures.to_string()),
    );
    common::stdout(&output)
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
    store
        .count(&doc.tenant, Some(&doc.document_id))
        .await
        .unwrap()
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
    assert!(
        acked,
        "a retry after a one-off flush failure succeeds: {out}"
    );
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

#[path = "support/edge_churn.rs"]
mod edge_churn;

/// Issue 15, item 4: 20 documents written 150 times each (3,000 versions, each an upsert and
/// a delete of the previous revision's stale chunks, with 3 and 6 chunks alternating) take at
/// most 3 times the disk space of their final versions written once into a fresh store, plus
/// the WAL's fixed allowance (its compaction threshold, 1 MiB here, and two segments, which
/// dominates for so little live data). Before the WAL was compacted and deleted points
/// vacuumed, the directory grew with every version: 44.3 MiB (WAL 36.9) for 0.4 MiB of live
/// data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_use_stays_within_a_small_multiple_of_the_live_data() {
    const DOCS: usize = 20;
    const VERSIONS: u64 = 150;
    let live_points = DOCS * edge_churn::chunk_count(VERSIONS);

    let live_dir = tempfile::tempdir().unwrap();
    {
        let store = Arc::new(
            EdgeStore::open(
                live_dir.path(),
                edge_churn::COLLECTION,
                &edge_churn::fingerprint(),
            )
            .unwrap(),
        );
        edge_churn::churn(&store, DOCS, VERSIONS..=VERSIONS).await;
        assert_eq!(
            store.count(&edge_churn::tenant(), None).await.unwrap(),
            live_points
        );
    }
    let live = edge_churn::disk_use(live_dir.path());

    // The default compaction threshold (16 MiB) would compact this churn only twice: a
    // 1 MiB threshold makes the store compact (reload) many times under concurrent writes.
    let maintenance = EdgeMaintenance {
        wal_compact_bytes: 1024 * 1024,
        ..EdgeMaintenance::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let (compactions, optimizations) = {
        let store = Arc::new(
            EdgeStore::open_with_maintenance(
                dir.path(),
                edge_churn::COLLECTION,
                &edge_churn::fingerprint(),
                maintenance,
            )
            .unwrap(),
        );
        edge_churn::churn(&store, DOCS, 1..=VERSIONS).await;
        assert_eq!(
            store.count(&edge_churn::tenant(), None).await.unwrap(),
            live_points
        );
        (store.wal_compactions(), store.optimizations())
    };
    let churned = edge_churn::disk_use(dir.path());
    eprintln!(
        "versions={} live_points={live_points} live: {:.1} MiB (wal {:.1}, segments {:.1}); \
         after churn: {:.1} MiB (wal {:.1}, segments {:.1}); wal compactions={compactions} \
         optimizer runs={optimizations}",
        DOCS as u64 * VERSIONS,
        edge_churn::mib(live.total),
        edge_churn::mib(live.wal),
        edge_churn::mib(live.segments),
        edge_churn::mib(churned.total),
        edge_churn::mib(churned.wal),
        edge_churn::mib(churned.segments),
    );
    assert!(
        compactions >= 5,
        "the WAL was compacted {compactions} times; this churn writes tens of MiB of WAL"
    );
    let wal_allowance = maintenance.wal_compact_bytes + 2 * maintenance.wal_segment_bytes as u64;
    assert!(
        churned.total <= 3 * live.total + wal_allowance,
        "after {} versions the collection takes {:.1} MiB (wal {:.1}, segments {:.1}), more \
         than 3 times the {:.1} MiB of its live data written once plus {:.1} MiB of WAL",
        DOCS as u64 * VERSIONS,
        edge_churn::mib(churned.total),
        edge_churn::mib(churned.wal),
        edge_churn::mib(churned.segments),
        edge_churn::mib(live.total),
        edge_churn::mib(wal_allowance),
    );

    // Everything survives the compactions and vacuums, and a reopen.
    let store = EdgeStore::open(
        dir.path(),
        edge_churn::COLLECTION,
        &edge_churn::fingerprint(),
    )
    .unwrap();
    let tenant = edge_churn::tenant();
    assert_eq!(store.count(&tenant, None).await.unwrap(), live_points);
    for doc in 0..DOCS {
        let first = store
            .first_chunk(&tenant, &format!("doc-{doc}"))
            .await
            .unwrap()
            .expect("stored");
        assert_eq!(first.revision(), edge_churn::revision(doc, VERSIONS));
    }
}
