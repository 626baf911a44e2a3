//! Shared helpers for integration tests: a unique pipeline per test (own queue names, own
//! store directory), the real model loaded once per test binary, and broker utilities.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};
use rag_ingest::config::PipelineConfig;
use rag_ingest::embed::CandleEmbedder;
use rag_ingest::process::Pipeline;
use rag_ingest::queue::Topology;
use rag_ingest::setup;
use rag_ingest::store::EdgeStore;

/// The broker URL tests use.
pub fn amqp_url() -> String {
    std::env::var("RAG_INGEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The real all-MiniLM-L6-v2 directory.
pub fn model_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "the model is missing at {}: run scripts/fetch-model.sh",
        dir.display()
    );
    dir
}

/// The real model, loaded once per test binary.
pub fn embedder() -> Arc<CandleEmbedder> {
    static MODEL: OnceLock<Arc<CandleEmbedder>> = OnceLock::new();
    Arc::clone(MODEL.get_or_init(|| {
        Arc::new(CandleEmbedder::load(&model_dir(), 32).expect("the real model loads"))
    }))
}

/// A pipeline config with its own queue names and store directory.
pub struct TestPipeline {
    pub config: PipelineConfig,
    pub dir: tempfile::TempDir,
}

impl TestPipeline {
    /// A unique pipeline named after `test`; `extra` is appended to the TOML (e.g. a
    /// `[retry]` table).
    pub fn new(test: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let name = format!(
            "t-{test}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let text = format!(
            r#"
name = "{name}"
[broker]
url = "{url}"
prefetch = 16
delivery_limit = 5
[tenants]
allowed = ["acme", "globex"]
[chunking]
max_tokens = 64
overlap = 8
[embedder]
kind = "candle"
model_dir = "{model}"
batch_size = 32
[store]
kind = "edge"
path = "{store}"
collection = "c"
[limits]
max_document_bytes = 4096
{extra}
"#,
            url = amqp_url(),
            model = model_dir().display(),
            store = dir.path().join("store").display(),
        );
        let config =
            PipelineConfig::from_toml_str(&text, Path::new("test.toml"), dir.path(), |_| None)
                .expect("test config is valid");
        TestPipeline { config, dir }
    }

    /// The processing pipeline over the shared model and this test's own store.
    pub fn pipeline(&self) -> Pipeline<CandleEmbedder, EdgeStore> {
        let embedder = embedder();
        let chunker = setup::chunker(&self.config, &embedder).expect("chunker");
        let store = setup::open_store(
            &self.config,
            rag_ingest::embed::Embedder::fingerprint(&*embedder),
        )
        .expect("store opens");
        Pipeline::new(Arc::new(chunker), embedder, Arc::new(store))
    }

    /// Deletes this pipeline's queues from the broker.
    pub async fn delete_queues(&self) {
        let topology = Topology::new(&self.config);
        let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await
        else {
            return;
        };
        if let Ok(ch) = conn.create_channel().await {
            let mut queues = vec![topology.main_queue(), topology.dlq()];
            queues.extend(topology.retry_queues());
            for q in queues {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        let _ = conn.close(200, "bye".into()).await;
    }
}

/// Ready messages in `queue` (the queue must exist).
pub async fn queue_len(queue: &str) -> u32 {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672 (scripts/ensure-rabbitmq.sh)");
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions::durable().passive(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("queue exists");
    let _ = conn.close(200, "bye".into()).await;
    q.message_count()
}

/// Polls `check` every 50 ms until it returns true; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
