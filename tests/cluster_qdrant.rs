//! A 3-peer Qdrant cluster on loopback loses a peer in the middle of ingestion (ignored: run
//! with `cargo test --test cluster_qdrant -- --ignored --nocapture`; needs RabbitMQ and a Qdrant
//! server binary, prints SKIPPED without one).
//!
//! The collection is created by the worker with `replication_factor = 3` (every shard on every
//! peer) and `write_consistency_factor = 2` (a write is answered once two replicas applied it).
//! So an acknowledged write is on two peers and survives the loss of any one; with one peer down
//! two replicas remain, enough to keep accepting writes; reads need one replica. Raft needs a
//! majority (2 of 3) to mark the lost peer's replicas dead, which it also keeps.
//!
//! The worker (the real binary) talks to peer 0 through one URL (`qdrant-client` takes one
//! endpoint; it has no list of peers); peer 2 is killed with SIGKILL after a third of the
//! documents are stored. Searches run the whole time, alternating between peers 0 and 1.
//! Checked afterwards through peer 1: every confirmed document holds exactly its chunks (none
//! missing, none twice; `stored` counts the documents that do), the worker reports each
//! processed once (stored, or unchanged for a retry that found its chunks written) and none
//! dead-lettered, and no search failed. One line sums it up:
//! `qdrant-cluster: confirmed=N stored=N lost=0 duplicated=0 searches_ok=K searches_failed=0`.

mod common;
#[path = "support/qdrant_server.rs"]
mod qdrant_server;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{TestPipeline, WorkerProcess};
use qdrant_server::QdrantServer;
use rag_ingest::embed::Embedder;
use rag_ingest::store::{QdrantOptions, QdrantStore, SearchRequest, VectorStore};
use rag_ingest::tenant::TenantId;

/// Documents submitted.
const DOCS: usize = 150;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long fault scenario: a 3-peer Qdrant cluster loses a peer during ingestion"]
async fn a_replicated_collection_survives_a_peer_killed_during_ingestion() {
    let test = "cluster_qdrant";
    let Some(peer0) = QdrantServer::start_peer(test, None).await else {
        return;
    };
    let bootstrap = peer0.p2p_url();
    let peer1 = QdrantServer::start_peer(test, Some(bootstrap.clone()))
        .await
        .expect("binary found above");
    let mut peer2 = QdrantServer::start_peer(test, Some(bootstrap))
        .await
        .expect("binary found above");
    common::eventually(Duration::from_secs(60), "3 peers in the cluster", || {
        let n = peer0.cluster_peers();
        async move { n == 3 }
    })
    .await;

    let t = TestPipeline::new(
        "qcluster",
        "[retry]\ndelays_ms = [500, 2000]\n[worker]\nconcurrency = 8",
    );
    let file = common::write_qdrant_pipeline_file(
        &t,
        &peer0.grpc_url(),
        "replication_factor = 3\nwrite_consistency_factor = 2",
    );
    let collection = t.config.name.clone();
    let worker = WorkerProcess::start(&file, false);
    common::eventually(Duration::from_secs(120), "the worker consuming", || {
        let n = worker.count(&common::CONSUMING);
        async move { n >= 1 }
    })
    .await;

    // The worker created the collection: replicated on every peer.
    let info = peer0
        .http_get(&format!("/collections/{collection}"))
        .expect("collection info");
    let info: serde_json::Value = serde_json::from_str(&info).expect("JSON");
    let params = &info["result"]["config"]["params"];
    assert_eq!(params["replication_factor"], 3, "{params}");
    assert_eq!(params["write_consistency_factor"], 2, "{params}");

    let fingerprint = rag_ingest::setup::collection_fingerprint(common::embedder().fingerprint());
    let open = |url: String| {
        let fingerprint = fingerprint.clone();
        let collection = collection.clone();
        async move {
            QdrantStore::open(&QdrantOptions::new(url), &collection, &fingerprint)
                .await
                .expect("the collection opens")
        }
    };
    let readers = Arc::new([open(peer0.grpc_url()).await, open(peer1.grpc_url()).await]);

    // Searches the whole time, alternating between the worker's peer and another survivor.
    let acme = TenantId::new("acme").expect("tenant");
    let query = common::embedder()
        .embed(vec!["a lantern near the harbor".to_owned()])
        .await
        .expect("embed the query")
        .remove(0);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let searcher = {
        let (readers, stop, ok, failed) = (
            Arc::clone(&readers),
            Arc::clone(&stop),
            Arc::clone(&ok),
            Arc::clone(&failed),
        );
        let (tenant, query) = (acme.clone(), query.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let request = SearchRequest::new(tenant.clone(), query.clone(), 5);
                match readers[i % 2].search(request).await {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        eprintln!("search via peer {} failed: {e}", i % 2);
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let docs = common::short_docs("acme", "qc", DOCS);
    common::submit(&t.config, &docs).await; // panics unless every one is confirmed
    let confirmed = docs.len();

    // Kill peer 2 (not the worker's) once a third is stored.
    common::eventually(
        Duration::from_secs(120),
        "a third of the documents stored",
        || {
            let n = worker.count(&common::STORED);
            async move { n >= DOCS / 3 }
        },
    )
    .await;
    peer2.kill();
    let stored_at_kill = worker.count(&common::STORED);
    assert!(
        stored_at_kill < DOCS,
        "the peer must die during ingestion, not after ({stored_at_kill} of {DOCS} stored)"
    );
    let searches_before_kill = ok.load(Ordering::SeqCst);

    // Settled as stored, or as unchanged for a retry that found its chunks written.
    common::eventually(Duration::from_secs(240), "every document processed", || {
        let n = worker.count(&common::SETTLED);
        async move { n >= DOCS }
    })
    .await;
    common::eventually(Duration::from_secs(30), "the queues drained", || async {
        common::pending(&t.config).await == 0
    })
    .await;
    // Searches after the last write too.
    let after = ok.load(Ordering::SeqCst);
    common::eventually(Duration::from_secs(30), "searches after ingestion", || {
        let n = ok.load(Ordering::SeqCst);
        async move { n >= after + 10 }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    searcher.await.expect("searcher");

    worker.signal("TERM");
    let (status, log) = worker.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "worker exit {status}:\n{log}");
    let reported = common::final_count(&log, "stored") + common::final_count(&log, "unchanged");
    let dead = common::final_count(&log, "dead_lettered");

    // Every confirmed document, read through peer 1: exactly its chunks.
    let (mut stored, mut lost, mut duplicated, mut want_total) = (0, 0, 0, 0);
    for doc in &docs {
        let want = common::expected_chunks(&t.config, doc);
        want_total += want;
        let got = readers[1]
            .count(&doc.tenant, Some(&doc.document_id))
            .await
            .expect("count");
        if got == want {
            stored += 1;
        } else if got < want {
            lost += 1;
            eprintln!("lost: {} has {got} of {want} chunks", doc.document_id);
        } else if got > want {
            duplicated += 1;
            eprintln!(
                "duplicated: {} has {got} chunks, {want} expected",
                doc.document_id
            );
        }
    }
    let tenant_total = readers[1].count(&acme, None).await.expect("count");
    let final_hits = readers[1]
        .search(SearchRequest::new(acme.clone(), query, 5))
        .await
        .expect("search after ingestion");
    let (searches_ok, searches_failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    println!(
        "qdrant-cluster: confirmed={confirmed} stored={stored} lost={lost} \
         duplicated={duplicated} searches_ok={searches_ok} searches_failed={searches_failed}"
    );
    eprintln!(
        "qdrant-cluster: peer 2 killed after {stored_at_kill} stored documents and \
         {searches_before_kill} searches; {tenant_total} points, {want_total} expected"
    );

    assert_eq!(lost, 0, "documents lost");
    assert_eq!(duplicated, 0, "documents stored twice");
    assert_eq!(tenant_total, want_total, "points of the tenant");
    assert_eq!(stored, confirmed, "every confirmed document stored");
    assert_eq!(
        reported, confirmed as u64,
        "the worker processed each once:\n{log}"
    );
    assert_eq!(dead, 0, "nothing dead-lettered:\n{log}");
    assert_eq!(searches_failed, 0, "searches failed");
    assert!(searches_before_kill > 0, "searches ran before the kill");
    assert_eq!(final_hits.len(), 5, "the search finds the documents");

    drop(readers);
    t.delete_queues().await;
    drop((peer0, peer1, peer2));
}
