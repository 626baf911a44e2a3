//! HTML, PDF and source code end to end through the real RabbitMQ, the real model and both
//! stores: the real-world fixtures of fixtures/docs/content are submitted as `rag-ingest
//! submit` types them, the unreadable fixtures of fixtures/messages/unreadable beside them;
//! the worker stores the first and dead-letters each of the others with its own kind at
//! stage `extract`; searches find each document by what it says, PDF hits with their page.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TestPipeline, TestStore, embedder, queue_len};
use rag_ingest::extract::ContentKind;
use rag_ingest::message::Document;
use rag_ingest::queue::{DlqFilter, Submitter, Topology, inspect_dlq};
use rag_ingest::search::Searcher;
use rag_ingest::store::VectorStore;
use rag_ingest::tenant::TenantId;

/// (fixture, a query in other words than the document's)
const CASES: &[(&str, &str)] = &[
    (
        "qemu-nbd.html",
        "serve a virtual machine disk image to other hosts over a network block protocol",
    ),
    (
        "owner-password-only.pdf",
        "where desktop applications register which file formats they understand",
    ),
    (
        "semver_eval.rs",
        "does a version satisfy a requirement with prerelease tags",
    ),
    (
        "textwrap.py",
        "break long paragraphs into lines of a maximum width",
    ),
    (
        "persistent_https_client.go",
        "golang client that keeps an https proxy socket alive",
    ),
    (
        "zod_util.js",
        "detect the runtime type of a value: promise, date, map or set",
    ),
    (
        "zod_error.d.ts",
        "typescript declarations of validation issue codes",
    ),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fixture `name` as `rag-ingest submit` sends it.
fn document(name: &str) -> Document {
    let tenant = TenantId::new("acme").expect("tenant");
    let ext = Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .expect("extension");
    let content_type = ContentKind::content_type_for_extension(ext).expect("known extension");
    let bytes = std::fs::read(root().join("fixtures/docs/content").join(name)).expect("fixture");
    let mut doc = if content_type == "application/pdf" {
        Document::upsert_bytes(tenant, name, content_type, &bytes)
    } else {
        let mut doc = Document::upsert(tenant, name, String::from_utf8(bytes).expect("utf-8"));
        doc.content_type = content_type.into();
        doc
    };
    doc.version = Some(1);
    doc
}

on_both_stores!(html_pdf_and_code_end_to_end_with_unreadable_content);
async fn html_pdf_and_code_end_to_end_with_unreadable_content(kind: TestStore) {
    let mut t = TestPipeline::on(kind, "e2e-content", "");
    t.config.limits.max_document_bytes = 1 << 20;
    let pipeline = t.store_pipeline().await;
    let store = std::sync::Arc::clone(pipeline.store());
    let topology = Topology::new(&t.config);

    let docs: Vec<Document> = CASES.iter().map(|(name, _)| document(name)).collect();
    let submitter = Submitter::connect(&t.config)
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672");
    let results = submitter.submit_all(&docs, |_, _| {}).await;
    assert!(results.iter().all(Result::is_ok), "confirmed: {results:?}");
    let expected = common::submit_message_fixtures(&submitter, "unreadable").await;
    submitter.close().await;

    let report = common::drain(
        &t.config,
        pipeline.clone(),
        Duration::from_secs(300),
        Duration::from_millis(500),
    )
    .await;
    let unreadable: usize = expected.values().sum();
    assert_eq!(report.stored as usize, docs.len(), "{report:?}");
    assert_eq!(report.dead_lettered as usize, unreadable, "{report:?}");

    // Every unreadable message is in the DLQ with its own kind, at stage extract, at once.
    let (summary, entries) = inspect_dlq(&t.config, &DlqFilter::default())
        .await
        .expect("dlq");
    assert_eq!(summary.total, unreadable);
    let mut got = BTreeMap::new();
    for e in &entries {
        *got.entry(e.kind.clone()).or_insert(0usize) += 1;
        assert_eq!(e.stage.as_deref(), Some("extract"), "{e:?}");
        assert_eq!(e.attempts, Some(1), "{e:?}");
        assert!(e.error.as_deref().is_some_and(|r| !r.is_empty()), "{e:?}");
    }
    assert_eq!(got, expected);
    assert_eq!(queue_len(&topology.main_queue()).await, 0);

    // Every document is stored whole; the PDF's chunks know their page.
    let tenant = TenantId::new("acme").expect("tenant");
    for doc in &docs {
        let first = store
            .first_chunk(&tenant, &doc.document_id)
            .await
            .expect("read")
            .expect("stored");
        let count = store
            .count(&tenant, Some(&doc.document_id))
            .await
            .expect("count");
        assert_eq!(count, first.chunk_count, "{}", doc.document_id);
        let is_pdf = doc.content_type == "application/pdf";
        assert_eq!(first.page.is_some(), is_pdf, "{}: page", doc.document_id);
    }

    // Each document is found by what it says, in other words.
    let searcher = Searcher::new(embedder(), store.clone());
    for (name, query) in CASES {
        let hits = searcher.search("acme", query, 3).await.expect("search");
        assert_eq!(
            hits.first().map(|h| h.document_id.as_str()),
            Some(*name),
            "query {query:?}: {hits:#?}"
        );
        if name.ends_with(".pdf") {
            let page = hits[0].page.expect("a PDF hit has its page");
            assert!((1..=2).contains(&page), "page {page}");
        } else {
            assert_eq!(hits[0].page, None);
        }
        if name.ends_with(".html") {
            for hit in &hits {
                assert!(!hit.text.contains("<script"), "markup stored: {}", hit.text);
            }
        }
    }

    t.delete_queues().await;
}
