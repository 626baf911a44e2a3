//! Disk use of a Qdrant Edge collection under a long-running worker's write pattern
//! (plain `main`, release; no broker, no model):
//!
//! ```text
//! cargo bench --bench edge_disk
//! ```
//!
//! 50 documents are each written in 400 versions (20,000 versions in all) by 50 concurrent
//! writers, every version as the pipeline writes it: upsert the new revision's chunks (3 or 6,
//! alternating, ~600-byte texts, synthetic 384-dimensional vectors), then delete the
//! document's chunks of any other revision. Every 4,000 versions it prints one line:
//! `versions=N live_points=P disk=X MiB wal=W MiB segments=S MiB wal_compactions=C
//! optimizer_runs=O`. At the end it prints what the live data alone takes when written once
//! into a fresh store, and the ratio.

use std::sync::Arc;
use std::time::Instant;

use rag_ingest::store::{EdgeStore, VectorStore};

#[path = "../tests/support/edge_churn.rs"]
mod edge_churn;

/// Documents written over and over.
const DOCS: usize = 50;
/// Versions of each document.
const VERSIONS: u64 = 400;
/// Versions per document between two printed lines.
const STEP: u64 = 80;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run());
}

async fn run() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(
        EdgeStore::open(
            dir.path(),
            edge_churn::COLLECTION,
            &edge_churn::fingerprint(),
        )
        .expect("open store"),
    );
    let tenant = edge_churn::tenant();
    let mut done = 0;
    while done < VERSIONS {
        let next = (done + STEP).min(VERSIONS);
        edge_churn::churn(&store, DOCS, done + 1..=next).await;
        done = next;
        let live = store.count(&tenant, None).await.expect("count");
        let usage = edge_churn::disk_use(dir.path());
        println!(
            "versions={} live_points={live} disk={:.1} MiB wal={:.1} MiB segments={:.1} MiB \
             wal_compactions={} optimizer_runs={} elapsed={:.0}s",
            DOCS as u64 * done,
            edge_churn::mib(usage.total),
            edge_churn::mib(usage.wal),
            edge_churn::mib(usage.segments),
            store.wal_compactions(),
            store.optimizations(),
            started.elapsed().as_secs_f64(),
        );
    }
    drop(store);
    let churned = edge_churn::disk_use(dir.path());

    let fresh = tempfile::tempdir().expect("temp dir");
    {
        let store = Arc::new(
            EdgeStore::open(
                fresh.path(),
                edge_churn::COLLECTION,
                &edge_churn::fingerprint(),
            )
            .expect("open store"),
        );
        edge_churn::churn(&store, DOCS, VERSIONS..=VERSIONS).await;
    }
    let live = edge_churn::disk_use(fresh.path());
    println!(
        "closed after {} versions: disk={:.1} MiB; the live data written once: {:.1} MiB; \
         ratio {:.2}",
        DOCS as u64 * VERSIONS,
        edge_churn::mib(churned.total),
        edge_churn::mib(live.total),
        churned.total as f64 / live.total.max(1) as f64,
    );
}
