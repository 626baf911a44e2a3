//! docker-compose parity: `docker-compose.yml` and `pipelines/compose.toml` name the Qdrant
//! server version the tests run against, and the worker runs with `compose.toml`'s settings
//! against a real server (the compose service URLs rewritten to loopback).
//!
//! The server is `QDRANT_URL` (the shared test server of `scripts/ensure-qdrant.sh`), else one
//! of the test's own from the server binary; without either the second test prints SKIPPED.

mod common;
#[path = "support/qdrant_server.rs"]
mod qdrant_server;

use std::path::Path;
use std::time::Duration;

use common::WorkerProcess;
use qdrant_server::{QdrantServer, ServerOptions, TESTED_VERSION};
use rag_ingest::config::PipelineConfig;
use rag_ingest::embed::Embedder;
use rag_ingest::message::Document;
use rag_ingest::store::{QdrantStore, VectorStore};
use rag_ingest::tenant::TenantId;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).expect(rel)
}

/// The table at `path` (e.g. `["store", "qdrant"]`) of `table`; panics naming it if missing.
fn section<'a>(table: &'a mut toml::Table, path: &[&str]) -> &'a mut toml::Table {
    let mut t = table;
    for s in path {
        t = t
            .get_mut(*s)
            .and_then(toml::Value::as_table_mut)
            .unwrap_or_else(|| panic!("compose.toml has no [{}]", path.join(".")));
    }
    t
}

/// Replaces `key` of the table at `path`, which compose.toml must set already.
fn set(table: &mut toml::Table, path: &[&str], key: &str, value: toml::Value) {
    let t = section(table, path);
    assert!(t.contains_key(key), "compose.toml sets {key} in {path:?}");
    t.insert(key.to_owned(), value);
}

#[test]
fn compose_files_name_the_tested_qdrant_version() {
    let image = format!("qdrant/qdrant:v{TESTED_VERSION}");
    let compose = yaml_rust2::YamlLoader::load_from_str(&read("docker-compose.yml"))
        .expect("valid YAML")
        .remove(0);
    assert_eq!(
        compose["services"]["qdrant"]["image"].as_str(),
        Some(image.as_str()),
        "docker-compose.yml's qdrant image"
    );
    assert!(
        read("pipelines/compose.toml").contains(&image),
        "pipelines/compose.toml names {image}"
    );
    match qdrant_server::qdrant_bin() {
        Some(bin) => {
            let out = std::process::Command::new(&bin)
                .arg("--version")
                .output()
                .expect("qdrant --version runs");
            let version = String::from_utf8_lossy(&out.stdout);
            assert!(
                version.split_whitespace().any(|w| w == TESTED_VERSION),
                "{} is {version:?}, the tests and compose name {TESTED_VERSION}",
                bin.display()
            );
        }
        None => eprintln!(
            "SKIPPED (part): no Qdrant server binary, so its version was not compared with \
             {TESTED_VERSION}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_with_compose_settings_stores_a_document_on_the_server() {
    let test = "the_worker_with_compose_settings_stores_a_document_on_the_server";
    // The shared server, or one of our own.
    let mut own = None;
    let url = match std::env::var("QDRANT_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => match QdrantServer::start(test, ServerOptions::default()).await {
            Some(server) => {
                let url = server.grpc_url();
                own = Some(server);
                url
            }
            None => return,
        },
    };

    // compose.toml as it ships, with the compose service names replaced by loopback and a
    // unique pipeline (queues) and collection name.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut table: toml::Table = read("pipelines/compose.toml").parse().expect("TOML");
    let name = format!(
        "t-compose-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    set(&mut table, &[], "name", name.clone().into());
    set(&mut table, &["broker"], "url", common::amqp_url().into());
    set(&mut table, &["store"], "collection", name.clone().into());
    set(&mut table, &["store", "qdrant"], "url", url.clone().into());
    set(
        &mut table,
        &["embedder"],
        "model_dir",
        common::model_dir().display().to_string().into(),
    );
    // 0.0.0.0:9464 would collide with other workers on this machine.
    set(&mut table, &["metrics"], "address", "".into());
    if std::env::var("QDRANT_API_KEY").is_ok_and(|k| !k.is_empty()) && own.is_none() {
        section(&mut table, &["store", "qdrant"])
            .insert("api_key_env".into(), "QDRANT_API_KEY".into());
    }
    let file = dir.path().join("compose.toml");
    std::fs::write(&file, toml::to_string(&table).expect("serialise")).expect("write");
    let config = PipelineConfig::load(&file).expect("the rewritten compose pipeline loads");
    assert_eq!(config.store.kind, rag_ingest::config::StoreKind::Qdrant);

    let mut worker = WorkerProcess::start(&file, false);
    common::eventually(Duration::from_secs(120), "the worker consuming", || {
        let n = worker.count(&common::CONSUMING);
        async move { n >= 1 }
    })
    .await;

    let tenant = TenantId::new("acme").expect("tenant");
    let mut doc = Document::upsert(
        tenant.clone(),
        "compose-1",
        ["onboarding.md", "retries.md", "security.md", "expenses.txt"]
            .map(|f| read(&format!("fixtures/docs/acme/{f}")))
            .join("\n\n"),
    );
    doc.content_type = "text/markdown".into();
    doc.version = Some(1);
    common::submit(&config, std::slice::from_ref(&doc)).await;
    worker.wait_stored(1).await;

    let store = QdrantStore::open(
        &rag_ingest::setup::qdrant_options(&config),
        &name,
        &rag_ingest::setup::collection_fingerprint(common::embedder().fingerprint()),
    )
    .await
    .expect("the collection opens");
    let want = common::expected_chunks(&config, &doc);
    assert!(want > 1, "the document has several chunks");
    assert_eq!(
        store
            .count(&tenant, Some("compose-1"))
            .await
            .expect("count"),
        want
    );
    let first = store
        .first_chunk(&tenant, "compose-1")
        .await
        .expect("read")
        .expect("chunk 0 stored");
    assert_eq!(first.version, Some(1));
    assert_eq!(first.chunk_count, want);

    worker.signal("TERM");
    let (status, log) = worker.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "worker exit {status}:\n{log}");
    assert_eq!(common::final_count(&log, "stored"), 1, "{log}");
    store.delete_collection().await.expect("delete collection");
    common::TestPipeline { config, dir }.delete_queues().await;
    drop(own);
}
