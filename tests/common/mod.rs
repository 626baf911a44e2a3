//! Shared helpers for integration tests: a unique pipeline per test (own queue names, own
//! store directory), the real model loaded once per test binary, and broker utilities.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};
use rag_ingest::config::PipelineConfig;
use rag_ingest::embed::CandleEmbedder;
use rag_ingest::process::Pipeline;
use rag_ingest::queue::Topology;
use rag_ingest::setup;
use rag_ingest::store::EdgeStore;

#[path = "../support/command.rs"]
mod command;
#[path = "../support/queues.rs"]
mod queues;
#[path = "../support/worker_process.rs"]
mod worker_process;
// Each test or bench crate uses a subset of these helpers.
#[allow(unused_imports)]
pub use command::{output_within, run_ok, stdout};
#[allow(unused_imports)]
pub use queues::{close_quietly, within};
#[allow(unused_imports)]
pub use worker_process::{
    CONSUMING, DEAD_LETTERED, Event, MODEL_LOADED, SETTLED, STALE, STORED, WorkerProcess,
    count_events, final_count,
};

/// The broker URL tests use.
#[allow(dead_code)]
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
#[allow(dead_code)]
pub fn embedder() -> Arc<CandleEmbedder> {
    static MODEL: OnceLock<Arc<CandleEmbedder>> = OnceLock::new();
    Arc::clone(MODEL.get_or_init(|| {
        Arc::new(CandleEmbedder::load(&model_dir(), 32).expect("the real model loads"))
    }))
}

/// Which store a test pipeline writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(dead_code)]
pub enum TestStore {
    /// Qdrant Edge in the test's own directory.
    #[allow(dead_code)]
    Edge,
    /// A collection of the test's own on the Qdrant server at `url` (gRPC).
    #[allow(dead_code)]
    Qdrant {
        /// gRPC URL.
        url: String,
    },
}

impl TestStore {
    /// The shared test server (`QDRANT_URL`), or `None` after a loud SKIPPED line naming
    /// `test`.
    #[allow(dead_code)]
    pub fn qdrant_or_skip(test: &str) -> Option<Self> {
        qdrant_url_or_skip(test).map(|url| TestStore::Qdrant { url })
    }
}

/// Generates `<name>::edge` and `<name>::qdrant` tests for `async fn name(store: TestStore)`;
/// the server variant prints SKIPPED and passes when no server is configured.
#[macro_export]
macro_rules! on_both_stores {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn edge() {
                super::$name(super::common::TestStore::Edge).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn qdrant() {
                let Some(store) = super::common::TestStore::qdrant_or_skip(stringify!($name))
                else {
                    return;
                };
                super::$name(store).await;
            }
        }
    };
}

/// A pipeline config with its own queue names and store directory (or server collection).
#[allow(dead_code)]
pub struct TestPipeline {
    pub config: PipelineConfig,
    #[allow(dead_code)]
    pub dir: tempfile::TempDir,
}

impl TestPipeline {
    /// A unique pipeline named after `test` on Qdrant Edge; `extra` is appended to the TOML
    /// (e.g. a `[retry]` table).
    #[allow(dead_code)]
    pub fn new(test: &str, extra: &str) -> Self {
        Self::on(TestStore::Edge, test, extra)
    }

    /// A unique pipeline named after `test` on `store`; `extra` is appended to the TOML.
    #[allow(dead_code)]
    pub fn on(store: TestStore, test: &str, extra: &str) -> Self {
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
{store_section}
[limits]
max_document_bytes = 4096
{extra}
{metrics}
"#,
            url = amqp_url(),
            model = model_dir().display(),
            store_section = store_section(&store, &name, &dir.path().join("store")),
            // Parallel worker processes must not fight over the default metrics port.
            metrics = if extra.contains("[metrics]") {
                ""
            } else {
                "[metrics]\naddress = \"\""
            },
        );
        let config =
            PipelineConfig::from_toml_str(&text, Path::new("test.toml"), dir.path(), |_| None)
                .expect("test config is valid");
        TestPipeline { config, dir }
    }

    /// The processing pipeline over the shared model and this test's own store, whichever
    /// kind the config names.
    #[allow(dead_code)]
    pub async fn store_pipeline(&self) -> Pipeline<CandleEmbedder, rag_ingest::store::Store> {
        let embedder = embedder();
        let chunker = setup::chunker(&self.config, &embedder).expect("chunker");
        let store = setup::open_vector_store(
            &self.config,
            rag_ingest::embed::Embedder::fingerprint(&*embedder),
        )
        .await
        .expect("store opens");
        Pipeline::new(Arc::new(chunker), embedder, Arc::new(store))
    }

    /// The processing pipeline over the shared model and this test's own Edge store.
    #[allow(dead_code)]
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
    #[allow(dead_code)]
    pub async fn delete_queues(&self) {
        queues::delete_queues(&self.config).await;
    }
}

/// The `[store]` section of a test pipeline: Edge under `path`, or the collection `name` on
/// the server.
#[allow(dead_code)]
fn store_section(store: &TestStore, name: &str, path: &Path) -> String {
    match store {
        TestStore::Edge => format!(
            "[store]\nkind = \"edge\"\npath = \"{}\"\ncollection = \"c\"",
            path.display()
        ),
        TestStore::Qdrant { url } => format!(
            "[store]\nkind = \"qdrant\"\npath = \"{}\"\ncollection = \"{name}\"\n\
             [store.qdrant]\nurl = \"{url}\"",
            path.display()
        ),
    }
}

/// The store section `write_pipeline_file` writes for `c`.
#[allow(dead_code)]
fn config_store_section(c: &PipelineConfig) -> String {
    use rag_ingest::config::StoreKind;
    match c.store.kind {
        StoreKind::Edge => format!(
            "[store]\nkind = \"edge\"\npath = \"{}\"\ncollection = \"{}\"",
            c.store.path.display(),
            c.store.collection
        ),
        StoreKind::Qdrant => {
            let q = &c.store.qdrant;
            let mut text = format!(
                "[store]\nkind = \"qdrant\"\npath = \"{}\"\ncollection = \"{}\"\n\
                 max_batch_bytes = {}\n[store.qdrant]\nurl = \"{}\"\ntimeout_ms = {}\n\
                 connect_timeout_ms = {}\nretries = {}\nbackoff_min_ms = {}\n\
                 backoff_max_ms = {}",
                c.store.path.display(),
                c.store.collection,
                c.store.max_batch_bytes,
                q.url,
                q.timeout_ms,
                q.connect_timeout_ms,
                q.retries,
                q.backoff_min_ms,
                q.backoff_max_ms,
            );
            if let Some(var) = &q.api_key_env {
                text.push_str(&format!("\napi_key_env = \"{var}\""));
            }
            text
        }
    }
}

/// Opens a connection to the test broker (panics if it is down or does not answer).
#[allow(dead_code)]
pub async fn connect() -> Connection {
    within(
        "connect",
        Connection::connect(&amqp_url(), ConnectionProperties::default()),
    )
    .await
    .expect("RabbitMQ must be running on 127.0.0.1:5672 (scripts/ensure-rabbitmq.sh)")
}

/// The message fixtures of `fixtures/messages/<dir>` (`bad`, `unreadable`, `good`): file
/// name → body, in name order. A name starts with the error kind it announces, then `--`.
#[allow(dead_code)]
pub fn message_fixtures(dir: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/messages")
        .join(dir);
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            let body = std::fs::read(&path).expect("fixture body");
            (name, body)
        })
        .collect()
}

/// Publishes every message fixture of `fixtures/messages/<dir>` as a raw persistent body
/// (confirmed) and returns how many of each error kind their names announce.
#[allow(dead_code)]
pub async fn submit_message_fixtures(
    submitter: &rag_ingest::queue::Submitter,
    dir: &str,
) -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for (name, body) in message_fixtures(dir) {
        *kinds.entry(fixture_kind(&name)).or_insert(0usize) += 1;
        submitter
            .submit_raw(
                &body,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap_or_else(|e| panic!("{dir}/{name} not confirmed: {e}"));
    }
    kinds
}

/// The error kind a message fixture's name announces (`pdf_corrupt--truncated.json` →
/// `pdf_corrupt`).
#[allow(dead_code)]
pub fn fixture_kind(name: &str) -> String {
    name.split("--").next().unwrap_or_default().to_string()
}

/// Ready messages in `queue` (the queue must exist).
#[allow(dead_code)]
pub async fn queue_len(queue: &str) -> u32 {
    let conn = connect().await;
    let ch = within("open a channel", conn.create_channel())
        .await
        .expect("channel");
    let declare = ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions::durable().passive(),
        lapin::types::FieldTable::default(),
    );
    let q = within(&format!("inspect queue {queue}"), declare)
        .await
        .expect("queue exists");
    close_quietly(conn).await;
    q.message_count()
}

/// Submits `docs` to `config`'s pipeline with confirms; panics unless every one is confirmed
/// within the broker deadline.
#[allow(dead_code)]
pub async fn submit(config: &PipelineConfig, docs: &[rag_ingest::message::Document]) {
    let submitter = within("connect", rag_ingest::queue::Submitter::connect(config))
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672");
    let results = within("submit", submitter.submit_all(docs, |_, _| {})).await;
    assert!(
        results.iter().all(Result::is_ok),
        "every document confirmed: {results:?}"
    );
    submitter.close().await;
}

/// Runs an in-process worker of `config` over `pipeline` until its queues stay idle for
/// `idle_grace`; returns its report. Panics if it fails or has not finished within `timeout`.
#[allow(dead_code)]
pub async fn drain<E, S>(
    config: &PipelineConfig,
    pipeline: Pipeline<E, S>,
    timeout: Duration,
    idle_grace: Duration,
) -> rag_ingest::queue::WorkerReport
where
    E: rag_ingest::embed::Embedder,
    S: rag_ingest::store::VectorStore,
{
    let worker = rag_ingest::queue::Worker::new(config.clone(), pipeline);
    let options = rag_ingest::queue::RunOptions {
        exit_when_idle: true,
        idle_grace,
    };
    let run = worker.run(options, std::future::pending());
    match tokio::time::timeout(timeout, run).await {
        Ok(report) => report.expect("the worker runs"),
        Err(_) => panic!("the worker did not drain the queues within {timeout:?}"),
    }
}

/// Polls `check` every 50 ms until it returns true; panics with `what` after `timeout`.
#[allow(dead_code)]
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

// ---------------------------------------------------------------------------------------
// Lose-nothing helpers (tests/lose_nothing.rs, tests/signals.rs).
// ---------------------------------------------------------------------------------------

/// Writes `t.config` (every section, retry and worker included) as a pipeline file the
/// binary can load, next to the test's store; returns its path.
#[allow(dead_code)]
pub fn write_pipeline_file(t: &TestPipeline) -> PathBuf {
    let c = &t.config;
    let tenants: Vec<String> = c.tenants.allowed.iter().map(|t| format!("{t:?}")).collect();
    let delays: Vec<String> = c.retry.delays_ms.iter().map(u64::to_string).collect();
    let text = format!(
        r#"name = "{name}"
[broker]
url = "{url}"
prefetch = {prefetch}
delivery_limit = {limit}
confirm_timeout_ms = {confirm}
[tenants]
allowed = [{tenants}]
[chunking]
max_tokens = {max_tokens}
overlap = {overlap}
[embedder]
kind = "candle"
model_dir = "{model}"
batch_size = {batch}
{store_section}
[limits]
max_document_bytes = {max_bytes}
[retry]
max_attempts = {attempts}
in_process_retries = {in_process}
backoff_min_ms = {bmin}
backoff_max_ms = {bmax}
delays_ms = [{delays}]
[worker]
concurrency = {concurrency}
shutdown_grace_secs = {grace}
reconnect_give_up_secs = {give_up}
[metrics]
address = "{metrics}"
"#,
        name = c.name,
        url = c.broker.url,
        prefetch = c.broker.prefetch,
        limit = c.broker.delivery_limit,
        confirm = c.broker.confirm_timeout_ms,
        tenants = tenants.join(", "),
        max_tokens = c.chunking.max_tokens,
        overlap = c.chunking.overlap,
        model = c.embedder.model_dir.display(),
        batch = c.embedder.batch_size,
        store_section = config_store_section(c),
        max_bytes = c.limits.max_document_bytes,
        attempts = c.retry.max_attempts,
        in_process = c.retry.in_process_retries,
        bmin = c.retry.backoff_min_ms,
        bmax = c.retry.backoff_max_ms,
        delays = delays.join(", "),
        concurrency = c.worker.concurrency,
        grace = c.worker.shutdown_grace_secs,
        give_up = c.worker.reconnect_give_up_secs,
        metrics = c.metrics.address,
    );
    let path = t.dir.path().join("pipeline.toml");
    std::fs::write(&path, text).expect("write pipeline file");
    path
}

/// Runs `rabbitmqctl` with `args`; returns its stdout, or panics (with its output) if it
/// fails.
#[allow(dead_code)]
pub fn rabbitmqctl(args: &[&str]) -> String {
    stdout(&run_ok(
        std::process::Command::new("rabbitmqctl").args(args),
    ))
}

/// Broker ids (`<rabbit@host.N.N.N>`, what `rabbitmqctl close_connection` takes) of the
/// connections opened by workers of `pipeline`: their client property `connection_name` is
/// `rag-ingest worker <pipeline>`.
#[allow(dead_code)]
pub fn worker_connections(pipeline: &str) -> Vec<String> {
    let out = rabbitmqctl(&["-q", "list_connections", "pid", "client_properties"]);
    let wanted = format!("\"rag-ingest worker {pipeline}\"");
    out.lines()
        .filter(|l| l.contains(&wanted))
        .filter_map(|l| l.split('\t').next().map(str::to_owned))
        .collect()
}

/// Closes every broker connection of `pipeline`'s workers (only theirs); returns how many
/// were closed.
#[allow(dead_code)]
pub fn close_worker_connections(pipeline: &str) -> usize {
    let mut closed = 0;
    for pid in worker_connections(pipeline) {
        // The connection may be gone already (worker exiting): count only real closes.
        let out = std::process::Command::new("rabbitmqctl")
            .args([
                "close_connection",
                &pid,
                "test: dropping the worker's connection",
            ])
            .output()
            .expect("rabbitmqctl runs");
        if out.status.success() {
            closed += 1;
        }
    }
    closed
}

/// Opens a connection and a confirm-mode channel (panics if the broker is down).
#[allow(dead_code)]
pub async fn confirm_channel() -> (Connection, lapin::Channel) {
    let conn = connect().await;
    let ch = within("open a channel", conn.create_channel())
        .await
        .expect("channel");
    within(
        "confirm mode",
        ch.confirm_select(lapin::options::ConfirmSelectOptions::default()),
    )
    .await
    .expect("confirm mode");
    (conn, ch)
}

/// Publishes `body` straight to `queue` (default exchange) and waits for the confirm.
#[allow(dead_code)]
pub async fn publish_to_queue(
    ch: &lapin::Channel,
    queue: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) {
    let publish = rag_ingest::queue::publish_confirmed(ch, "", queue, body, properties);
    within(&format!("publish to {queue}"), publish)
        .await
        .expect("publish confirmed");
}

/// Removes every message of `queue` (basic.get + ack) and returns them in queue order.
#[allow(dead_code)]
pub async fn take_all(queue: &str) -> Vec<(lapin::BasicProperties, Vec<u8>)> {
    let conn = connect().await;
    let ch = within("open a channel", conn.create_channel())
        .await
        .expect("channel");
    let mut out = Vec::new();
    loop {
        let get = ch.basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: false },
        );
        let Some(msg) = within(&format!("basic.get from {queue}"), get)
            .await
            .expect("basic.get")
        else {
            break;
        };
        out.push((msg.delivery.properties.clone(), msg.delivery.data.clone()));
        let ack = ch.basic_ack(
            msg.delivery.delivery_tag,
            lapin::options::BasicAckOptions::default(),
        );
        within("ack", ack).await.expect("ack");
    }
    close_quietly(conn).await;
    out
}

/// Ready messages of the main queue plus every retry queue of `config`'s pipeline.
#[allow(dead_code)]
pub async fn pending(config: &PipelineConfig) -> u64 {
    let topology = Topology::new(config);
    let mut total = u64::from(queue_len(&topology.main_queue()).await);
    for q in topology.retry_queues() {
        total += u64::from(queue_len(&q).await);
    }
    total
}

/// Header `name` of `properties` as text (strings) or a number rendered as text.
#[allow(dead_code)]
pub fn header(properties: &lapin::BasicProperties, name: &str) -> Option<String> {
    use lapin::types::AMQPValue;
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// The chunk count `doc` gets from `config`'s chunker (what the store must hold for it).
#[allow(dead_code)]
pub fn expected_chunks(config: &PipelineConfig, doc: &rag_ingest::message::Document) -> usize {
    static CHUNKERS: OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, Arc<rag_ingest::chunk::Chunker>>>,
    > = OnceLock::new();
    let key = format!("{}/{}", config.chunking.max_tokens, config.chunking.overlap);
    let chunker = {
        let mut map = CHUNKERS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Arc::clone(
            map.entry(key)
                .or_insert_with(|| Arc::new(setup::chunker(config, &embedder()).expect("chunker"))),
        )
    };
    chunker
        .split(&doc.content, doc.format().expect("supported content type"))
        .len()
}

/// `n` short, distinct plain-text documents of `tenant` named `<prefix>-<i>`, of 1 to 3
/// chunks each with the test pipelines' 64-token chunks.
#[allow(dead_code)]
pub fn short_docs(tenant: &str, prefix: &str, n: usize) -> Vec<rag_ingest::message::Document> {
    const WORDS: [&str; 24] = [
        "river", "granite", "lantern", "orchard", "falcon", "copper", "meadow", "harbor", "violin",
        "glacier", "pepper", "canyon", "saffron", "beacon", "thistle", "marble", "comet", "willow",
        "anchor", "ember", "quartz", "tundra", "maple", "cobalt",
    ];
    let tenant = rag_ingest::tenant::TenantId::new(tenant).expect("tenant");
    (0..n)
        .map(|i| {
            let sentences = 1 + (i * 7) % 9;
            let mut text = format!("Note {prefix} number {i}.");
            for s in 0..sentences {
                let w = |k: usize| WORDS[(i * 5 + s * 3 + k) % WORDS.len()];
                text.push_str(&format!(
                    " The {} near the {} keeps a {} and a {} for day {}.",
                    w(0),
                    w(1),
                    w(2),
                    w(3),
                    s + i
                ));
            }
            rag_ingest::message::Document::upsert(tenant.clone(), format!("{prefix}-{i}"), text)
        })
        .collect()
}

impl WorkerProcess {
    /// Starts `rag-ingest --log-format json worker --pipeline <file> --report json` of this
    /// build (with `--exit-when-idle` and a 300 ms idle grace if asked), so its log is typed
    /// events ([`WorkerProcess::count`]) and its exit report JSON ([`final_count`]); panics if
    /// the binary cannot be started.
    #[allow(dead_code)]
    pub fn start(file: &Path, exit_when_idle: bool) -> Self {
        Self::start_with_env(file, exit_when_idle, &[])
    }

    /// Like [`WorkerProcess::start`], with extra environment variables.
    #[allow(dead_code)]
    pub fn start_with_env(file: &Path, exit_when_idle: bool, env: &[(&str, &str)]) -> Self {
        let args: &[&str] = if exit_when_idle {
            &[
                "--report",
                "json",
                "--exit-when-idle",
                "--idle-grace-ms",
                "300",
            ]
        } else {
            &["--report", "json"]
        };
        WorkerProcess::launch(worker_process::Launch {
            binary: Path::new(env!("CARGO_BIN_EXE_rag-ingest")),
            global_args: &["--log-format", "json"],
            pipeline: file,
            args,
            env,
            core: None,
            failure: "",
        })
    }
}

// ---------------------------------------------------------------------------------------
// Store-contract helpers (tests/store_contract.rs, tests/lifecycle.rs).
// ---------------------------------------------------------------------------------------

/// An [`Embedder`](rag_ingest::embed::Embedder) that forwards to the real model and counts
/// the calls and texts it was asked to embed.
#[allow(dead_code)]
pub struct CountingEmbedder {
    inner: Arc<CandleEmbedder>,
    calls: std::sync::atomic::AtomicUsize,
    texts: std::sync::atomic::AtomicUsize,
}

impl CountingEmbedder {
    /// A counter around the shared real model ([`embedder`]).
    #[allow(dead_code)]
    pub fn new() -> Self {
        CountingEmbedder {
            inner: embedder(),
            calls: std::sync::atomic::AtomicUsize::new(0),
            texts: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Embedding calls so far.
    #[allow(dead_code)]
    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Texts embedded so far.
    #[allow(dead_code)]
    pub fn texts(&self) -> usize {
        self.texts.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The model's tokenizer (for building a chunker).
    #[allow(dead_code)]
    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        self.inner.tokenizer()
    }

    #[allow(dead_code)]
    fn count(&self, texts: &[String]) {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.texts
            .fetch_add(texts.len(), std::sync::atomic::Ordering::SeqCst);
    }
}

impl rag_ingest::embed::Embedder for CountingEmbedder {
    fn fingerprint(&self) -> &rag_ingest::embed::Fingerprint {
        self.inner.fingerprint()
    }

    fn max_input_tokens(&self) -> usize {
        rag_ingest::embed::Embedder::max_input_tokens(&*self.inner)
    }

    fn embed(
        &self,
        texts: Vec<String>,
    ) -> impl std::future::Future<Output = Result<Vec<Vec<f32>>, rag_ingest::embed::EmbedError>> + Send
    {
        self.count(&texts);
        self.inner.embed(texts)
    }

    fn embed_with_usage(
        &self,
        texts: Vec<String>,
    ) -> impl std::future::Future<
        Output = Result<(Vec<Vec<f32>>, rag_ingest::embed::Usage), rag_ingest::embed::EmbedError>,
    > + Send {
        self.count(&texts);
        self.inner.embed_with_usage(texts)
    }
}

/// The Qdrant server of the server-side store tests (`QDRANT_URL`, gRPC), or `None` after
/// printing a loud `SKIPPED` line to stderr naming `test`.
#[allow(dead_code)]
pub fn qdrant_url_or_skip(test: &str) -> Option<String> {
    match std::env::var("QDRANT_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            eprintln!(
                "SKIPPED: QDRANT_URL not set — {test} did not run against a Qdrant server \
                 (set QDRANT_URL=http://127.0.0.1:6334 and optionally QDRANT_API_KEY)"
            );
            None
        }
    }
}

/// Like [`write_pipeline_file`], with the store on a Qdrant server: `store.kind = "qdrant"`,
/// the collection named after the pipeline (unique per test, so the shared server is safe),
/// `store.qdrant.url = url`, and `qdrant_extra` (TOML lines, e.g. `replication_factor = 3`)
/// added to `[store.qdrant]`. Returns the file's path.
#[allow(dead_code)]
pub fn write_qdrant_pipeline_file(t: &TestPipeline, url: &str, qdrant_extra: &str) -> PathBuf {
    let path = write_pipeline_file(t);
    let text = std::fs::read_to_string(&path).expect("read pipeline file");
    let mut table: toml::Table = text.parse().expect("pipeline file is TOML");
    let mut qdrant: toml::Table = qdrant_extra.parse().expect("qdrant_extra is TOML");
    qdrant.insert("url".into(), url.into());
    let store = table
        .get_mut("store")
        .and_then(toml::Value::as_table_mut)
        .expect("[store]");
    store.insert("kind".into(), "qdrant".into());
    store.remove("path");
    store.insert("collection".into(), t.config.name.clone().into());
    store.insert("qdrant".into(), qdrant.into());
    std::fs::write(&path, toml::to_string(&table).expect("serialise")).expect("write");
    path
}
