//! The real binary: argument and config errors are named; submit, worker and search work
//! together through RabbitMQ.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::{TestPipeline, TestStore, run_ok};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rag-ingest"))
}

fn write_config(t: &TestPipeline) -> std::path::PathBuf {
    common::write_pipeline_file(t)
}

#[test]
fn a_bad_config_names_the_field() {
    let t = TestPipeline::new("cli-bad", "");
    let path = write_config(&t);
    let text = std::fs::read_to_string(&path)
        .expect("read")
        .replace("overlap = 8", "overlap = 99");
    std::fs::write(&path, text).expect("write");
    let out = bin()
        .args(["search", "--pipeline"])
        .arg(&path)
        .args(["--tenant", "acme", "q"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chunking.overlap"), "{err}");
}

#[test]
fn a_missing_model_says_how_to_get_it() {
    let t = TestPipeline::new("cli-model", "");
    let path = write_config(&t);
    let out = bin()
        .args(["embed", "--pipeline"])
        .arg(&path)
        .arg("hello")
        .env("RAG_INGEST_MODEL_DIR", t.dir.path().join("nowhere"))
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("scripts/fetch-model.sh"), "{err}");
}

#[test]
fn a_bad_argument_is_named() {
    let out = bin()
        .args(["search", "--top-k", "many", "q", "--tenant", "a"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--top-k"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_worker_search_through_the_binary() {
    let t = TestPipeline::new("cli", "");
    let path = write_config(&t);
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/docs/acme");
    let out = run_ok(
        bin()
            .args(["submit", "--pipeline"])
            .arg(&path)
            .args(["--tenant", "acme"])
            .arg(&docs),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("submitted 4 of 4"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let out = run_ok(
        bin()
            .args([
                "worker",
                "--exit-when-idle",
                "--report",
                "json",
                "--pipeline",
            ])
            .arg(&path),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(report["stored"], 4, "{report}");
    assert_eq!(report["dead_lettered"], 0, "{report}");

    let out = run_ok(
        bin()
            .args(["search", "--json", "--pipeline"])
            .arg(&path)
            .args([
                "--tenant",
                "acme",
                "--top-k",
                "2",
                "getting money back for a taxi",
            ]),
    );
    let hits: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(hits[0]["document_id"], "expenses.txt", "{hits:#}");
    // The default mode is hybrid: each hit carries its rank in both branches.
    assert!(hits[0]["ranks"]["dense"].is_u64(), "{hits:#}");

    // Keyword search: an exact term of one document only, ranked by BM25.
    let out = run_ok(
        bin()
            .args(["search", "--json", "--mode", "sparse", "--pipeline"])
            .arg(&path)
            .args(["--tenant", "acme", "--top-k", "3", "Retry-After"]),
    );
    let hits: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(hits[0]["document_id"], "retries.md", "{hits:#}");
    assert_eq!(hits[0]["ranks"]["sparse"], 1, "{hits:#}");
    assert!(hits[0]["ranks"]["dense"].is_null(), "{hits:#}");
    let out = bin()
        .args(["search", "--mode", "fuzzy", "--pipeline"])
        .arg(&path)
        .args(["--tenant", "acme", "q"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mode"));

    let out = run_ok(
        bin()
            .args(["embed", "--pipeline"])
            .arg(&path)
            .args(["one", "two"]),
    );
    let lines: Vec<Vec<f32>> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("vector"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0].len(), 384);

    t.delete_queues().await;
}

#[tokio::test]
async fn submit_dry_run_counts_chunks_and_tokens_and_publishes_nothing() {
    let t = TestPipeline::new("cli-dry", "");
    let path = write_config(&t);
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/docs/globex");
    let out = run_ok(
        bin()
            .args(["submit", "--dry-run", "--pipeline"])
            .arg(&path)
            .args(["--tenant", "globex"])
            .arg(&docs),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("dry run: 4 document(s)"), "{stdout}");
    let tokens: usize = stdout
        .lines()
        .filter(|l| l.contains(" token(s)") && !l.starts_with("dry run"))
        .map(|l| {
            l.split('\t')
                .nth(2)
                .and_then(|c| c.split(' ').next())
                .and_then(|n| n.parse::<usize>().ok())
                .expect("count")
        })
        .sum();
    assert!(tokens > 100, "{stdout}");
    assert!(
        stdout.contains(&format!("{tokens} token(s) with")),
        "{stdout}"
    );
    // Nothing was published: the pipeline's queue was never even declared.
    assert!(
        !main_queue_exists(&t).await,
        "a dry run must not touch the broker"
    );
}

/// Whether the pipeline's main queue exists (it is declared by the first publish).
async fn main_queue_exists(t: &TestPipeline) -> bool {
    let conn = common::connect().await;
    let ch = common::within("open a channel", conn.create_channel())
        .await
        .expect("channel");
    let declare = ch.queue_declare(
        rag_ingest::queue::Topology::new(&t.config)
            .main_queue()
            .as_str()
            .into(),
        lapin::options::QueueDeclareOptions::durable().passive(),
        lapin::types::FieldTable::default(),
    );
    common::within("inspect the queue", declare).await.is_ok()
}

#[tokio::test]
async fn submit_refuses_what_the_worker_would_reject_and_publishes_nothing() {
    let t = TestPipeline::new("cli-refuse", "");
    let path = write_config(&t);
    let docs = t.dir.path().join("docs");
    std::fs::create_dir_all(&docs).expect("mkdir");
    let limit = t.config.limits.max_document_bytes;
    std::fs::write(docs.join("big.md"), "word ".repeat(limit)).expect("write");
    std::fs::write(docs.join("blank.txt"), " \n\t\n").expect("write");
    std::fs::write(docs.join("empty.txt"), "").expect("write");
    std::fs::write(docs.join("fine.md"), "# Fine\n\nA small document.").expect("write");
    for dry_run in [true, false] {
        let mut cmd = bin();
        cmd.args(["submit", "--pipeline"]).arg(&path);
        if dry_run {
            cmd.arg("--dry-run");
        }
        let out = cmd
            .args(["--tenant", "acme"])
            .arg(&docs)
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "dry_run={dry_run}: {err}");
        for (file, kind) in [
            ("big.md", "content_too_large"),
            ("blank.txt", "empty_content"),
            ("empty.txt", "empty_content"),
        ] {
            assert!(
                err.lines().any(|l| l.contains(file) && l.contains(kind)),
                "dry_run={dry_run}: {file} not refused as {kind}: {err}"
            );
        }
        assert!(
            !err.lines().any(|l| l.contains("fine.md")),
            "dry_run={dry_run}: {err}"
        );
    }
    assert!(!main_queue_exists(&t).await, "nothing may be published");
}

#[tokio::test]
async fn submit_types_html_pdf_and_code_by_extension_and_refuses_an_encrypted_pdf() {
    let mut t = TestPipeline::new("cli-types", "");
    t.config.limits.max_document_bytes = 1 << 20;
    let path = write_config(&t);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let docs = t.dir.path().join("docs");
    std::fs::create_dir_all(&docs).expect("mkdir");
    let files = [
        "qemu-nbd.html",
        "owner-password-only.pdf",
        "semver_eval.rs",
        "textwrap.py",
        "zod_util.js",
        "zod_error.d.ts",
        "persistent_https_client.go",
    ];
    for file in files {
        std::fs::copy(
            root.join("fixtures/docs/content").join(file),
            docs.join(file),
        )
        .expect("copy");
    }
    // A Word file is skipped (and said so), not sent.
    std::fs::write(docs.join("notes.docx"), b"PK\x03\x04").expect("write");
    let out = run_ok(
        bin()
            .args(["submit", "--dry-run", "--pipeline"])
            .arg(&path)
            .args(["--tenant", "acme"])
            .arg(&docs),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("dry run: 7 document(s)"), "{stdout}");
    for file in files {
        let chunks: usize = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{file}\t")))
            .and_then(|l| l.split('\t').nth(1))
            .and_then(|c| c.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{file} not reported: {stdout}"));
        assert!(chunks > 0, "{file}: {stdout}");
    }
    assert!(
        stderr.contains("notes.docx"),
        "the skipped file is named: {stderr}"
    );

    // An encrypted PDF is refused before anything is published, with its kind.
    let message =
        std::fs::read(root.join("fixtures/messages/unreadable/pdf_encrypted--user_password.json"))
            .expect("fixture");
    let message: serde_json::Value = serde_json::from_slice(&message).expect("json");
    let doc = rag_ingest::message::decode(
        message.to_string().as_bytes(),
        &rag_ingest::message::Rules::from_config(&t.config),
    )
    .expect("decodes");
    std::fs::write(docs.join("locked.pdf"), doc.bytes().expect("base64")).expect("write");
    let out = bin()
        .args(["submit", "--pipeline"])
        .arg(&path)
        .args(["--tenant", "acme"])
        .arg(&docs)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains("locked.pdf") && l.contains("pdf_encrypted")),
        "{err}"
    );
    assert!(!main_queue_exists(&t).await, "nothing may be published");
}

#[test]
fn submit_walks_a_symlink_loop_once_and_says_what_it_skipped() {
    let t = TestPipeline::new("cli-loop", "");
    let path = write_config(&t);
    let docs = t.dir.path().join("docs");
    std::fs::create_dir_all(docs.join("sub")).expect("mkdir");
    std::fs::write(docs.join("a.md"), "# A\n\nFirst document.").expect("write");
    std::fs::write(docs.join("sub/b.txt"), "Second document.").expect("write");
    std::os::unix::fs::symlink("..", docs.join("sub/up")).expect("symlink");
    std::os::unix::fs::symlink(".", docs.join("self")).expect("symlink");
    std::fs::write(docs.join("notes.docx"), "not text").expect("write");
    let out = run_ok(
        bin()
            .args(["submit", "--dry-run", "--pipeline"])
            .arg(&path)
            .args(["--tenant", "acme"])
            .arg(&docs),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    let ids: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" chunk(s)\t") && !l.starts_with("dry run"))
        .filter_map(|l| l.split('\t').next())
        .collect();
    assert_eq!(ids, ["a.md", "sub/b.txt"], "each file once: {stdout}");
    for skipped in ["self", "up", "notes.docx"] {
        assert!(
            err.lines().any(|l| l.contains(skipped)),
            "{skipped} not reported as skipped: {err}"
        );
    }
}

#[tokio::test]
async fn delete_publishes_a_confirmed_delete_per_document() {
    let t = TestPipeline::new("cli-delete", "");
    let path = write_config(&t);
    run_ok(bin().args(["delete", "--pipeline"]).arg(&path).args([
        "--tenant",
        "acme",
        "--version",
        "7",
        "doc-1",
        "doc-2",
    ]));
    let queue = rag_ingest::queue::Topology::new(&t.config).main_queue();
    let messages = common::take_all(&queue).await;
    let rules = rag_ingest::message::Rules::from_config(&t.config);
    let mut deleted: Vec<(String, Option<u64>)> = messages
        .iter()
        .map(|(_, body)| {
            let doc = rag_ingest::message::decode(body, &rules).expect("a valid message");
            assert_eq!(doc.op, rag_ingest::message::Op::Delete);
            assert_eq!(doc.tenant.as_str(), "acme");
            (doc.document_id, doc.version)
        })
        .collect();
    deleted.sort();
    assert_eq!(
        deleted,
        [
            ("doc-1".to_string(), Some(7)),
            ("doc-2".to_string(), Some(7))
        ]
    );

    let out = bin()
        .args(["delete", "--pipeline"])
        .arg(&path)
        .args(["--tenant", "acme", " "])
        .output()
        .expect("runs");
    assert!(!out.status.success(), "a blank document id is refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid_document_id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.delete_queues().await;
}

#[test]
fn search_keeps_stderr_quiet_unless_verbose() {
    let t = TestPipeline::new("cli-quiet", "");
    let path = write_config(&t);
    let search = |verbose: bool| {
        let mut cmd = bin();
        if verbose {
            cmd.arg("-v");
        }
        run_ok(
            cmd.args(["search", "--pipeline"])
                .arg(&path)
                .args(["--tenant", "acme", "anything"])
                .env_remove("RUST_LOG"),
        )
    };
    let quiet = search(false);
    assert!(
        String::from_utf8_lossy(&quiet.stdout).contains("no results"),
        "{}",
        String::from_utf8_lossy(&quiet.stdout)
    );
    assert_eq!(
        String::from_utf8_lossy(&quiet.stderr),
        "",
        "nothing on stderr by default"
    );
    let verbose = search(true);
    assert!(
        !verbose.stderr.is_empty(),
        "-v shows progress (the model loading) on stderr"
    );
}

on_both_stores!(
    /// A collection written before keyword vectors existed: the worker's commands refuse it
    /// naming the migration; `reindex --from` copies it (tombstones included, no model call)
    /// into a new collection where keyword and hybrid searches work; a second run changes
    /// nothing.
    reindex_migrates_a_collection_created_before_keyword_vectors
);

async fn reindex_migrates_a_collection_created_before_keyword_vectors(store: TestStore) {
    use rag_ingest::embed::Embedder;
    use rag_ingest::message::Document;
    use rag_ingest::store::{EdgeStore, QdrantOptions, QdrantStore, Store, VectorStore};

    let mut t = TestPipeline::on(store, "reindex", "");
    let new_collection = t.config.store.collection.clone();
    let old_collection = format!("{new_collection}-old");
    let embedder = common::embedder();
    let dense_only = embedder.fingerprint().clone();
    // The old layout: dense vectors only, as rag-ingest wrote collections before.
    let old = match t.config.store.kind {
        rag_ingest::config::StoreKind::Edge => Store::Edge(
            EdgeStore::open(&t.config.store.path, &old_collection, &dense_only).expect("open"),
        ),
        rag_ingest::config::StoreKind::Qdrant => Store::from(
            QdrantStore::open(
                &QdrantOptions::from_config(&t.config.store),
                &old_collection,
                &dense_only,
            )
            .await
            .expect("open"),
        ),
    };
    let chunker = rag_ingest::setup::chunker(&t.config, &embedder).expect("chunker");
    let old = Arc::new(old);
    let pipeline = rag_ingest::process::Pipeline::new(
        Arc::new(chunker),
        Arc::clone(&embedder),
        Arc::clone(&old),
    );
    let acme = rag_ingest::tenant::TenantId::new("acme").expect("tenant");
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/docs/acme");
    for name in ["retries.md", "expenses.txt", "security.md"] {
        let content = std::fs::read_to_string(docs.join(name)).expect("fixture");
        let mut doc = Document::upsert(acme.clone(), name, content);
        doc.content_type = if name.ends_with(".md") {
            "text/markdown"
        } else {
            "text/plain"
        }
        .into();
        pipeline.process(&doc).await.expect("stored");
    }
    pipeline
        .process(&Document::delete(acme.clone(), "security.md"))
        .await
        .expect("deleted");
    let chunks = old.count(&acme, None).await.expect("count");
    drop(pipeline);
    drop(old);

    // Pointed at the old collection, a search is refused, naming the way out.
    t.config.store.collection = old_collection.clone();
    let old_file = common::write_pipeline_file(&t);
    let refused = bin()
        .args(["search", "--pipeline"])
        .arg(&old_file)
        .args(["--tenant", "acme", "retry"])
        .output()
        .expect("runs");
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("reindex"), "{err}");
    // Copying a collection onto itself is refused.
    let itself = bin()
        .args(["reindex", "--from", &old_collection, "--pipeline"])
        .arg(&old_file)
        .output()
        .expect("runs");
    assert!(!itself.status.success());

    t.config.store.collection = new_collection.clone();
    let file = common::write_pipeline_file(&t);
    for run in 0..2 {
        let out = run_ok(
            bin()
                .args(["reindex", "--from", &old_collection, "--pipeline"])
                .arg(&file),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("copied {} point(s) (1 tombstone(s))", chunks + 1)),
            "run {run}: {stdout}"
        );
    }
    let out = run_ok(
        bin()
            .args(["search", "--json", "--mode", "sparse", "--pipeline"])
            .arg(&file)
            .args(["--tenant", "acme", "--top-k", "20", "Retry-After"]),
    );
    let hits: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(hits[0]["document_id"], "retries.md", "{hits:#}");
    let out = run_ok(
        bin()
            .args(["search", "--json", "--pipeline"])
            .arg(&file)
            .args(["--tenant", "acme", "--top-k", "50", "security passwords"]),
    );
    let hits: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let ids: Vec<&str> = hits
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|h| h["document_id"].as_str())
        .collect();
    assert!(!ids.is_empty());
    assert!(
        !ids.contains(&"security.md"),
        "the deleted document stays deleted: {ids:?}"
    );
    let new = rag_ingest::setup::open_vector_store(&t.config, embedder.fingerprint())
        .await
        .expect("the new collection opens");
    assert_eq!(new.count(&acme, None).await.expect("count"), chunks);
    // A second copy of a deleted document's tombstone keeps a later write of it possible.
    assert!(
        new.first_chunk(&acme, "security.md")
            .await
            .expect("read")
            .is_some_and(|head| head.tombstone)
    );
    if let Store::Qdrant(q) = new {
        q.delete_collection().await.expect("cleanup");
        QdrantStore::open_existing(
            &QdrantOptions::from_config(&t.config.store),
            &old_collection,
        )
        .await
        .expect("old")
        .0
        .delete_collection()
        .await
        .expect("cleanup");
    }
}

on_both_stores!(
    /// `reindex` while a worker already writes the new collection: a document the worker
    /// rewrote shorter keeps only the worker's chunks — the copied page that brings the old
    /// revision's other chunks (spread over pages: ids are hashes) is settled after the
    /// copy. Failed on the old code: the target held the old revision's chunks 1.. beside
    /// the worker's chunk 0.
    reindex_alongside_a_worker_leaves_only_the_newest_revision
);

async fn reindex_alongside_a_worker_leaves_only_the_newest_revision(store: TestStore) {
    use rag_ingest::embed::Embedder;
    use rag_ingest::message::Document;
    use rag_ingest::store::{Store, VectorStore};

    let mut t = TestPipeline::on(store, "reindex-race", "");
    let embedder = common::embedder();
    let new_collection = t.config.store.collection.clone();
    t.config.store.collection = format!("{new_collection}-old");
    let source = Arc::new(
        rag_ingest::setup::open_vector_store(&t.config, embedder.fingerprint())
            .await
            .expect("source opens"),
    );
    t.config.store.collection = new_collection;
    let target = Arc::new(
        rag_ingest::setup::open_vector_store(&t.config, embedder.fingerprint())
            .await
            .expect("target opens"),
    );
    let chunker = Arc::new(rag_ingest::setup::chunker(&t.config, &embedder).expect("chunker"));
    let into = |store: &Arc<Store>| {
        rag_ingest::process::Pipeline::new(
            Arc::clone(&chunker),
            Arc::clone(&embedder),
            Arc::clone(store),
        )
    };
    let acme = rag_ingest::tenant::TenantId::new("acme").expect("tenant");
    let long = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/docs/acme/retries.md"),
    )
    .expect("fixture");
    let mut old = Document::upsert(acme.clone(), "raced", long);
    old.version = Some(1);
    let mut other = Document::upsert(acme.clone(), "quiet", "A document nobody rewrites.");
    other.version = Some(1);
    into(&source).process(&old).await.expect("stored");
    into(&source).process(&other).await.expect("stored");
    let old_chunks = source.count(&acme, Some("raced")).await.expect("count");
    assert!(old_chunks >= 3, "the old revision has several chunks");
    // The worker on the new collection has version 2 already, one chunk.
    let mut new = Document::upsert(acme.clone(), "raced", "Version two: one short chunk.");
    new.version = Some(2);
    into(&target).process(&new).await.expect("stored");

    let sparse = rag_ingest::sparse::SparseEncoder::bm25();
    let report = rag_ingest::reindex::copy_collection(&source, &target, &sparse, 2, |_| {})
        .await
        .expect("copied");
    assert_eq!((report.checked, report.settled), (2, 1), "{report:?}");
    assert_eq!(
        target.count(&acme, Some("raced")).await.expect("count"),
        1,
        "only version 2's chunk: {report:?}"
    );
    let chunks = target
        .chunk_vectors(&acme, "raced", 64)
        .await
        .expect("read");
    assert!(
        chunks.iter().all(|c| c.payload.version == Some(2)),
        "{:?}",
        chunks
            .iter()
            .map(|c| (c.payload.chunk_index, c.payload.version))
            .collect::<Vec<_>>()
    );
    assert_eq!(target.count(&acme, Some("quiet")).await.expect("count"), 1);
    for store in [target, source] {
        if let Ok(Store::Qdrant(q)) = Arc::try_unwrap(store) {
            q.delete_collection().await.expect("cleanup");
        }
    }
}
