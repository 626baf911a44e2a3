//! End to end through the real RabbitMQ, the real model and Qdrant Edge: two tenants'
//! documents and bad messages are submitted, the worker drains the queue, paraphrased
//! queries find each document first for its own tenant and never cross tenants, and every
//! bad message is in the DLQ with its reason.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{TestPipeline, TestStore, embedder, queue_len};
use rag_ingest::message::Document;
use rag_ingest::queue::{DlqFilter, Submitter, Topology, inspect_dlq};
use rag_ingest::search::{SearchError, Searcher};
use rag_ingest::store::VectorStore;
use rag_ingest::tenant::TenantId;

/// (tenant, fixture file, a query that paraphrases it without copying its words)
const CASES: &[(&str, &str, &str)] = &[
    (
        "acme",
        "retries.md",
        "how long should a client pause before repeating a failed request to a server?",
    ),
    (
        "acme",
        "onboarding.md",
        "what happens on a newcomer's initial days at the firm?",
    ),
    (
        "acme",
        "expenses.txt",
        "how do staff get refunded for costs paid personally?",
    ),
    (
        "acme",
        "security.md",
        "requirements for credentials and multi-factor sign-in",
    ),
    (
        "globex",
        "volcanoes.md",
        "why does a mountain explode and spew molten rock?",
    ),
    (
        "globex",
        "sourdough.txt",
        "making a loaf with natural leaven",
    ),
    (
        "globex",
        "chess.md",
        "good strategy for the start of a board game with kings and pawns",
    ),
    (
        "globex",
        "solar.md",
        "generating power for a home from the sun",
    ),
];

fn fixture_doc(tenant: &str, file: &str) -> Document {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/docs")
        .join(tenant)
        .join(file);
    let content = std::fs::read_to_string(&path).expect("fixture");
    let mut doc = Document::upsert(TenantId::new(tenant).expect("tenant"), file, content);
    doc.content_type = if file.ends_with(".md") {
        "text/markdown"
    } else {
        "text/plain"
    }
    .into();
    doc.request_id = Some(format!("req-{tenant}-{file}"));
    doc
}

on_both_stores!(two_tenants_end_to_end_with_bad_messages);
async fn two_tenants_end_to_end_with_bad_messages(kind: TestStore) {
    let t = TestPipeline::on(kind, "e2e", "");
    let pipeline = t.store_pipeline().await;
    let store = std::sync::Arc::clone(pipeline.store());
    let topology = Topology::new(&t.config);

    // Same document id in both tenants, different contents: ids must not collide.
    let mut docs: Vec<Document> = CASES.iter().map(|(t, f, _)| fixture_doc(t, f)).collect();
    let mut shared_a = Document::upsert(
        TenantId::new("acme").expect("t"),
        "shared/faq.md",
        "Acme's cafeteria serves vegetarian curry every Tuesday.",
    );
    shared_a.content_type = "text/markdown".into();
    let shared_b = Document::upsert(
        TenantId::new("globex").expect("t"),
        "shared/faq.md",
        "Globex parking garage closes at midnight on weekends.",
    );
    docs.push(shared_a);
    docs.push(shared_b);

    let submitter = Submitter::connect(&t.config)
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672");
    let results = submitter.submit_all(&docs, |_, _| {}).await;
    assert!(
        results.iter().all(Result::is_ok),
        "every document confirmed: {results:?}"
    );
    let bad_expected = common::submit_message_fixtures(&submitter, "bad").await;
    submitter.close().await;

    let (timeout, grace) = (Duration::from_secs(300), Duration::from_millis(500));
    let report = common::drain(&t.config, pipeline.clone(), timeout, grace).await;

    let bad_total: usize = bad_expected.values().sum();
    assert_eq!(report.stored as usize, docs.len(), "{report:?}");
    assert_eq!(report.dead_lettered as usize, bad_total, "{report:?}");
    assert_eq!(
        queue_len(&topology.main_queue()).await,
        0,
        "main queue drained"
    );

    // Every good document is stored: one point per chunk, chunk 0 present.
    for doc in &docs {
        let first = store
            .first_chunk(&doc.tenant, &doc.document_id)
            .await
            .expect("read")
            .expect("stored");
        let count = store
            .count(&doc.tenant, Some(&doc.document_id))
            .await
            .expect("count");
        assert!(count > 0);
        assert_eq!(
            count, first.chunk_count,
            "{}: points == chunks",
            doc.document_id
        );
    }

    // Paraphrased queries find their document first, for their own tenant only.
    let searcher = Searcher::new(embedder(), store.clone());
    for (tenant, file, query) in CASES {
        let hits = searcher.search(tenant, query, 3).await.expect("search");
        assert_eq!(
            hits.first().map(|h| h.document_id.as_str()),
            Some(*file),
            "query {query:?} for {tenant}: {hits:#?}"
        );
        let own: Vec<&str> = CASES
            .iter()
            .filter(|c| c.0 == *tenant)
            .map(|c| c.1)
            .chain(["shared/faq.md"])
            .collect();
        for other in ["acme", "globex"] {
            let hits = searcher.search(other, query, 10).await.expect("search");
            for h in &hits {
                let owner_files: Vec<&str> = CASES
                    .iter()
                    .filter(|c| c.0 == other)
                    .map(|c| c.1)
                    .chain(["shared/faq.md"])
                    .collect();
                assert!(
                    owner_files.contains(&h.document_id.as_str()),
                    "tenant {other} got foreign {}",
                    h.document_id
                );
                if other != *tenant {
                    assert!(
                        !own.contains(&h.document_id.as_str()) || h.document_id == "shared/faq.md"
                    );
                }
            }
        }
    }
    let faq_a = searcher
        .search("acme", "where do I leave my car at night?", 10)
        .await
        .expect("search");
    assert!(
        faq_a.iter().all(|h| !h.text.contains("parking")),
        "acme saw globex's faq: {faq_a:#?}"
    );
    let faq_b = searcher
        .search("globex", "parking garage", 1)
        .await
        .expect("search");
    assert!(faq_b[0].text.contains("parking"), "{faq_b:#?}");
    assert!(matches!(
        searcher.search("", "anything", 3).await,
        Err(SearchError::Tenant(_))
    ));

    // Every bad message is in the DLQ with its kind and reason.
    let (summary, entries) = inspect_dlq(&t.config, &DlqFilter::default())
        .await
        .expect("dlq");
    assert_eq!(summary.total, bad_total);
    let mut got = BTreeMap::new();
    for e in &entries {
        *got.entry(e.kind.clone()).or_insert(0usize) += 1;
        assert!(e.error.as_deref().is_some_and(|r| !r.is_empty()), "{e:?}");
        assert_eq!(e.stage.as_deref(), Some("decode"));
        assert_eq!(e.attempts, Some(1));
    }
    assert_eq!(got, bad_expected);
    // Inspection lost nothing.
    assert_eq!(queue_len(&topology.dlq()).await as usize, bad_total);

    t.delete_queues().await;
}
