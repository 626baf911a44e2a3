//! The document lifecycle end to end through the real RabbitMQ, the real model and Qdrant
//! Edge: a document is ingested, changed (fewer chunks, new text) and re-submitted; searches
//! then find only the new text and the store holds exactly the new chunks; an older version
//! submitted afterwards is skipped as stale and changes nothing; a delete removes only that
//! document.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestPipeline, TestStore, embedder};
use rag_ingest::chunk::ChunkFormat;
use rag_ingest::config::PipelineConfig;
use rag_ingest::embed::CandleEmbedder;
use rag_ingest::message::Document;
use rag_ingest::process::Pipeline;
use rag_ingest::queue::WorkerReport;
use rag_ingest::search::{SearchOptions, Searcher};
use rag_ingest::setup;
use rag_ingest::store::VectorStore;
use rag_ingest::tenant::TenantId;

/// `n` paragraphs of about 40 tokens on `topic` (one 64-token chunk each).
fn paragraphs(topic: &str, details: &[&str], n: usize) -> String {
    (0..n)
        .map(|i| {
            let detail = details[i % details.len()];
            format!(
                "Section {i} on {topic}: {detail}. Everyone on the team learns this early, \
                 writes it down in the shared notebook, and reviews it again at the end of \
                 each season."
            )
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The chunks `content` gives with the test pipeline's chunker.
fn chunks_of(config: &PipelineConfig, content: &str) -> usize {
    setup::chunker(config, &embedder())
        .expect("chunker")
        .split(content, ChunkFormat::Text)
        .len()
}

fn upsert(id: &str, content: &str, version: u64, title: &str) -> Document {
    let mut doc = Document::upsert(TenantId::new("acme").expect("tenant"), id, content);
    doc.version = Some(version);
    doc.metadata
        .insert("title".into(), serde_json::json!(title));
    doc.request_id = Some(format!("lifecycle-{id}-v{version}"));
    doc
}

/// Publishes `docs` with confirms, then runs a worker until the queues are drained.
async fn submit_and_drain<S: VectorStore>(
    t: &TestPipeline,
    pipeline: &Pipeline<CandleEmbedder, S>,
    docs: &[Document],
) -> WorkerReport {
    common::submit(&t.config, docs).await;
    let (timeout, grace) = (Duration::from_secs(300), Duration::from_millis(500));
    common::drain(&t.config, pipeline.clone(), timeout, grace).await
}

on_both_stores!(a_changed_document_replaces_the_old_one_and_a_stale_version_changes_nothing);
async fn a_changed_document_replaces_the_old_one_and_a_stale_version_changes_nothing(
    kind: TestStore,
) {
    let t = TestPipeline::on(kind, "lifecycle", "");
    let pipeline = t.store_pipeline().await;
    let store = Arc::clone(pipeline.store());
    let acme = TenantId::new("acme").expect("tenant");
    let searcher = Searcher::new(embedder(), Arc::clone(&store));

    let old_text = paragraphs(
        "lighthouse keeping",
        &[
            "the lamp is trimmed at dusk",
            "the foghorn sounds every thirty seconds in fog",
            "the lens is polished with soft linen",
            "storm shutters close before the gale",
        ],
        8,
    );
    let new_text = paragraphs(
        "sourdough baking",
        &[
            "the starter is fed with rye flour every morning",
            "the dough rests overnight in a cool cellar",
        ],
        3,
    );
    let old_chunks = chunks_of(&t.config, &old_text);
    let new_chunks = chunks_of(&t.config, &new_text);
    assert!(
        new_chunks < old_chunks,
        "the change must shrink the document ({old_chunks} -> {new_chunks} chunks)"
    );
    let neighbour = paragraphs("bicycle repair", &["the chain is oiled after rain"], 2);
    let neighbour_chunks = chunks_of(&t.config, &neighbour);

    // 1. Ingest version 1 and a neighbouring document.
    let v1 = upsert("handbook.txt", &old_text, 1, "Lighthouse handbook");
    let report = submit_and_drain(
        &t,
        &pipeline,
        &[v1.clone(), upsert("bikes.txt", &neighbour, 1, "Bikes")],
    )
    .await;
    assert_eq!(report.stored, 2, "{report:?}");
    assert_eq!(
        store
            .count(&acme, Some("handbook.txt"))
            .await
            .expect("count"),
        old_chunks
    );
    let hits = searcher
        .search("acme", "how is the lighthouse lamp looked after?", 3)
        .await
        .expect("search");
    assert_eq!(hits[0].document_id, "handbook.txt", "{hits:#?}");

    // 2. Version 2: fewer chunks, new text.
    let v2 = upsert("handbook.txt", &new_text, 2, "Bakery handbook");
    let report = submit_and_drain(&t, &pipeline, &[v2]).await;
    assert_eq!(report.stored, 1, "{report:?}");
    assert_eq!(
        store
            .count(&acme, Some("handbook.txt"))
            .await
            .expect("count"),
        new_chunks,
        "point count equals the new chunk count"
    );
    assert_eq!(
        store.count(&acme, None).await.expect("count"),
        new_chunks + neighbour_chunks
    );
    let stored_v2 = store
        .first_chunk(&acme, "handbook.txt")
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(stored_v2.version, Some(2));
    assert_eq!(stored_v2.chunk_count, new_chunks);

    // Searching for the old text finds only the new text of the document.
    for query in [
        "how is the lighthouse lamp looked after?",
        "foghorn and storm shutters",
        "feeding the sourdough starter",
    ] {
        let hits = searcher.search("acme", query, 20).await.expect("search");
        let handbook: Vec<_> = hits
            .iter()
            .filter(|h| h.document_id == "handbook.txt")
            .collect();
        assert_eq!(handbook.len(), new_chunks, "{query}: {hits:#?}");
        for hit in handbook {
            assert!(hit.text.contains("sourdough"), "{query}: {}", hit.text);
            assert!(!hit.text.contains("lighthouse"), "{query}: {}", hit.text);
            assert_eq!(hit.version, Some(2));
            assert_eq!(
                &new_text[hit.byte_range.clone()],
                hit.text,
                "byte range points into the new content"
            );
        }
    }
    // The old title is gone from the metadata too.
    let by_old_title = searcher
        .search_with(
            "acme",
            "lighthouse",
            &SearchOptions::new(10).metadata_eq("title", "Lighthouse handbook"),
        )
        .await
        .expect("search");
    assert!(by_old_title.is_empty(), "{by_old_title:#?}");
    let by_new_title = searcher
        .search_with(
            "acme",
            "bread",
            &SearchOptions::new(10).metadata_eq("title", "Bakery handbook"),
        )
        .await
        .expect("search");
    assert_eq!(by_new_title.len(), new_chunks);

    // 3. Version 1 again (a late redelivery or replay): skipped as stale, nothing changes.
    let report = submit_and_drain(&t, &pipeline, &[v1]).await;
    assert_eq!(report.stale, 1, "{report:?}");
    assert_eq!(report.stored, 0, "{report:?}");
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert_eq!(
        store
            .count(&acme, Some("handbook.txt"))
            .await
            .expect("count"),
        new_chunks
    );
    assert_eq!(
        store
            .first_chunk(&acme, "handbook.txt")
            .await
            .expect("read"),
        Some(stored_v2),
        "not even the write time changed"
    );
    let hits = searcher
        .search("acme", "how is the lighthouse lamp looked after?", 20)
        .await
        .expect("search");
    assert!(
        hits.iter().all(|h| !h.text.contains("lighthouse")),
        "{hits:#?}"
    );

    // 4. Deleting the document (version 3) removes it and nothing else.
    let mut delete = Document::delete(acme.clone(), "handbook.txt");
    delete.version = Some(3);
    let report = submit_and_drain(&t, &pipeline, &[delete]).await;
    assert_eq!(report.deleted, 1, "{report:?}");
    assert_eq!(
        store
            .count(&acme, Some("handbook.txt"))
            .await
            .expect("count"),
        0
    );
    assert_eq!(
        store.count(&acme, None).await.expect("count"),
        neighbour_chunks
    );

    t.delete_queues().await;
}

/// Runs the binary with `args`; returns (success, stdout, stderr).
fn cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rag-ingest"))
        .args(args)
        .output()
        .expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `search --filter/--min-score` and `purge-tenant` through the binary (no broker needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_search_filters_and_purge_tenant_needs_confirmation() {
    let t = TestPipeline::new("purge", "");
    let file = common::write_pipeline_file(&t);
    let file = file.to_str().expect("utf-8 path");
    let acme = TenantId::new("acme").expect("tenant");
    let globex = TenantId::new("globex").expect("tenant");
    let (acme_points, globex_points) = {
        let pipeline = t.pipeline();
        for (tenant, id, topic, title) in [
            ("acme", "a.txt", "lighthouse keeping", "Lights"),
            ("acme", "b.txt", "sourdough baking", "Bread"),
            ("globex", "a.txt", "lighthouse keeping", "Lights"),
        ] {
            let mut doc = upsert(id, &paragraphs(topic, &["the basics"], 2), 1, title);
            doc.tenant = TenantId::new(tenant).expect("tenant");
            pipeline.process(&doc).await.expect("process");
        }
        let store = pipeline.store();
        (
            store.count(&acme, None).await.expect("count"),
            store.count(&globex, None).await.expect("count"),
        )
        // The embedded store is closed here, so the binary can open it.
    };
    assert!(acme_points > 0 && globex_points > 0);

    let (ok, stdout, stderr) = cli(&[
        "search",
        "--pipeline",
        file,
        "--tenant",
        "acme",
        "--filter",
        "title=Bread",
        "--json",
        "how is bread made?",
    ]);
    assert!(ok, "{stderr}");
    let hits: Vec<serde_json::Value> = serde_json::from_str(&stdout).expect("JSON hits");
    assert!(!hits.is_empty());
    assert!(hits.iter().all(|h| h["document_id"] == "b.txt"), "{stdout}");
    assert!(hits.iter().all(|h| h["version"] == 1), "{stdout}");
    let (ok, stdout, stderr) = cli(&[
        "search",
        "--pipeline",
        file,
        "--tenant",
        "acme",
        "--min-score",
        "0.999",
        "--json",
        "how is bread made?",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "[]");
    let (ok, _, stderr) = cli(&[
        "search",
        "--pipeline",
        file,
        "--tenant",
        "acme",
        "--filter",
        "a.b=c",
        "query",
    ]);
    assert!(!ok);
    assert!(stderr.contains("a.b"), "{stderr}");

    // Without the confirmation flag nothing is deleted.
    let (ok, _, stderr) = cli(&["purge-tenant", "--pipeline", file, "--tenant", "acme"]);
    assert!(!ok);
    assert!(stderr.contains("--yes-delete-everything"), "{stderr}");
    {
        let pipeline = t.pipeline();
        assert_eq!(
            pipeline.store().count(&acme, None).await.expect("count"),
            acme_points
        );
    }

    let (ok, stdout, stderr) = cli(&[
        "purge-tenant",
        "--pipeline",
        file,
        "--tenant",
        "acme",
        "--yes-delete-everything",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!("{acme_points} point(s) before, 0 after")),
        "{stdout}"
    );
    let pipeline = t.pipeline();
    assert_eq!(pipeline.store().count(&acme, None).await.expect("count"), 0);
    assert_eq!(
        pipeline.store().count(&globex, None).await.expect("count"),
        globex_points
    );
}
