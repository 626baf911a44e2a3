//! Helpers shared by the end-to-end benches (`pipeline`, `memory`, `scale_out`): pipeline
//! files derived from the shipped `pipelines/docs.toml` with unique queue names and their own
//! data directory, realistic documents built from `fixtures/docs/**`, the `rag-ingest worker`
//! binary as a child process whose log is watched, and broker and store utilities.
//!
//! Everything a bench creates is removed again when its owner is dropped, also when the
//! bench panics: [`BenchPipeline`] deletes its queues (and its Qdrant collection) and data
//! directory, [`WorkerProcess`] kills a worker that is still running.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use rag_ingest::chunk::Chunker;
use rag_ingest::config::{PipelineConfig, redact_url};
use rag_ingest::message::Document;
use rag_ingest::queue::Topology;
use rag_ingest::store::VectorStore;
use rag_ingest::tenant::TenantId;

#[path = "../../tests/support/queues.rs"]
mod queues;
#[path = "../../tests/support/worker_process.rs"]
mod worker_process;
pub use queues::delete_queues;
use queues::within;
// Each test or bench crate uses a subset of these helpers.
#[allow(unused_imports)]
pub use worker_process::{CONSUMING, STALE, STORED, WorkerProcess, final_count};

/// The broker URL: `RAG_INGEST_AMQP_URL` (which the worker honours too) or the local default.
#[allow(dead_code)]
pub fn amqp_url() -> String {
    std::env::var("RAG_INGEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The crate root.
pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The real all-MiniLM-L6-v2 directory; panics naming the fix if it is missing.
#[allow(dead_code)]
pub fn model_dir() -> PathBuf {
    let dir = manifest_dir().join("models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "the model is missing at {}: run scripts/fetch-model.sh",
        dir.display()
    );
    dir
}

/// A tokio runtime for the benches' own async work (publishing, queue probes, store checks).
#[allow(dead_code)]
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Panics with a clear message unless the broker accepts a connection within 10 s: a bench
/// without a broker would measure nothing.
#[allow(dead_code)]
pub async fn require_broker() {
    let url = amqp_url();
    let connect = Connection::connect(&url, ConnectionProperties::default());
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(conn)) => {
            queues::close_quietly(conn).await;
        }
        Ok(Err(e)) => panic!(
            "BENCH FAILED: RabbitMQ is not reachable at {}: {e}. Start it \
             (scripts/ensure-rabbitmq.sh) or set RAG_INGEST_AMQP_URL; this bench needs the \
             real broker",
            redact_url(&url)
        ),
        Err(_) => panic!(
            "BENCH FAILED: RabbitMQ at {} did not answer within 10 s. Start it \
             (scripts/ensure-rabbitmq.sh) or set RAG_INGEST_AMQP_URL; this bench needs the \
             real broker",
            redact_url(&url)
        ),
    }
}

/// One fixture document of `fixtures/docs/<tenant>/`.
pub struct Fixture {
    /// The tenant directory it lives in.
    #[allow(dead_code)]
    pub tenant: String,
    /// The file name.
    #[allow(dead_code)]
    pub name: String,
    /// The whole text.
    pub text: String,
}

/// Every fixture document, sorted by tenant and file name.
pub fn fixtures() -> Vec<Fixture> {
    let root = manifest_dir().join("fixtures/docs");
    let mut fixtures = Vec::new();
    for tenant in ["acme", "globex"] {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(root.join(tenant))
            .expect("fixtures/docs/<tenant> is readable")
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "md" || e == "txt"))
            .collect();
        paths.sort();
        for path in paths {
            fixtures.push(Fixture {
                tenant: tenant.to_owned(),
                name: path
                    .file_name()
                    .expect("file name")
                    .to_string_lossy()
                    .into_owned(),
                text: std::fs::read_to_string(&path).expect("fixture is UTF-8 text"),
            });
        }
    }
    assert!(!fixtures.is_empty(), "no fixture documents found");
    fixtures
}

/// `n` distinct Markdown documents named `<prefix>-NNN`, alternating between the tenants
/// `acme` and `globex`. Document `i` is a heading followed by 2 to 5 of its tenant's
/// fixture documents (rotating), about 0.8 to 2.5 KiB: a few chunks each at the default
/// 200-token chunk size. Each carries `title` and `source` metadata.
#[allow(dead_code)]
pub fn realistic_docs(prefix: &str, n: usize) -> Vec<Document> {
    let fixtures = fixtures();
    (0..n)
        .map(|i| {
            let tenant = if i % 2 == 0 { "acme" } else { "globex" };
            let own: Vec<&Fixture> = fixtures.iter().filter(|f| f.tenant == tenant).collect();
            let parts = 2 + i % 4;
            let mut content = format!("# {prefix} note {i}\n\n");
            let mut sources = Vec::new();
            for k in 0..parts {
                let fixture = own[(i / 2 + k) % own.len()];
                content.push_str(&fixture.text);
                content.push_str("\n\n");
                sources.push(fixture.name.clone());
            }
            let mut doc = Document::upsert(
                TenantId::new(tenant).expect("tenant"),
                format!("{prefix}-{i:03}"),
                content,
            );
            doc.content_type = "text/markdown".into();
            doc.metadata
                .insert("title".into(), format!("{prefix} note {i}").into());
            doc.metadata
                .insert("source".into(), sources.join(",").into());
            doc
        })
        .collect()
}

/// `n` distinct documents of exactly `bytes` bytes named `<prefix>-NNN`, alternating tenants
/// and content types (`text/markdown`, `text/plain`): the fixture documents of the tenant
/// repeated under numbered section headings.
#[allow(dead_code)]
pub fn large_docs(prefix: &str, n: usize, bytes: usize) -> Vec<Document> {
    let fixtures = fixtures();
    (0..n)
        .map(|i| {
            let tenant = if i % 2 == 0 { "acme" } else { "globex" };
            let own: Vec<&Fixture> = fixtures.iter().filter(|f| f.tenant == tenant).collect();
            let mut content = String::with_capacity(bytes + 4096);
            let mut section = 0;
            while content.len() < bytes {
                content.push_str(&format!("\n\n## {prefix} {i} section {section}\n\n"));
                content.push_str(&own[section % own.len()].text);
                section += 1;
            }
            let mut end = bytes;
            while !content.is_char_boundary(end) {
                end -= 1;
            }
            content.truncate(end);
            let mut doc = Document::upsert(
                TenantId::new(tenant).expect("tenant"),
                format!("{prefix}-{i:03}"),
                content,
            );
            if i % 2 == 0 {
                doc.content_type = "text/markdown".into();
            }
            doc
        })
        .collect()
}

/// Sets the dotted `path` (e.g. `broker.prefetch`) of a TOML table, creating tables on the
/// way.
#[allow(dead_code)]
pub fn set(table: &mut toml::Table, path: &str, value: impl Into<toml::Value>) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().expect("a non-empty path");
    let mut current = table;
    for part in parts {
        current = current
            .entry(part)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .unwrap_or_else(|| panic!("{path}: {part} is not a table"));
    }
    current.insert(last.to_owned(), value.into());
}

/// A pipeline file for one bench run: `pipelines/docs.toml` (the shipped defaults: chunk
/// size, batch size, prefetch, concurrency, limits) with a unique name (so its own queues),
/// an absolute model path, the bench's broker URL, its own store directory, metrics off, and
/// whatever the bench changes on top.
#[allow(dead_code)]
pub struct BenchPipeline {
    /// The loaded configuration, exactly as the worker loads it.
    pub config: PipelineConfig,
    /// The pipeline file handed to the worker.
    pub file: PathBuf,
    /// Qdrant collection to delete on drop (`store.kind = "qdrant"`).
    qdrant_collection: Option<String>,
    /// Holds the pipeline file and the edge store; removed on drop.
    #[allow(dead_code)]
    dir: tempfile::TempDir,
}

impl BenchPipeline {
    /// A pipeline named `bench-<prefix>-<random>`; `edit` changes the TOML table before it
    /// is written (see [`set`]).
    #[allow(dead_code)]
    pub fn new(prefix: &str, edit: impl FnOnce(&mut toml::Table)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let base = manifest_dir().join("pipelines/docs.toml");
        let text = std::fs::read_to_string(&base).expect("pipelines/docs.toml is readable");
        let mut table: toml::Table = text.parse().expect("pipelines/docs.toml is valid TOML");
        let name = format!(
            "bench-{prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        set(&mut table, "name", name.as_str());
        set(&mut table, "broker.url", amqp_url());
        set(
            &mut table,
            "embedder.model_dir",
            model_dir().display().to_string(),
        );
        set(
            &mut table,
            "store.path",
            dir.path().join("store").display().to_string(),
        );
        set(&mut table, "metrics.address", "");
        edit(&mut table);
        let file = dir.path().join("pipeline.toml");
        let config = write_and_load(&file, &table);
        let qdrant_collection = (config.store.kind == rag_ingest::config::StoreKind::Qdrant)
            .then(|| config.store.collection.clone());
        BenchPipeline {
            config,
            file,
            qdrant_collection,
            dir,
        }
    }

    /// The directory of the edge store (`store.path`).
    #[allow(dead_code)]
    pub fn store_path(&self) -> &Path {
        &self.config.store.path
    }

    /// A copy of the pipeline file for worker process `k` of several, with its own edge
    /// store directory (Qdrant Edge is one process per directory) and the same queues;
    /// returns the file and the loaded configuration.
    #[allow(dead_code)]
    pub fn for_process(&self, k: usize) -> (PathBuf, PipelineConfig) {
        let text = std::fs::read_to_string(&self.file).expect("the pipeline file is readable");
        let mut table: toml::Table = text.parse().expect("the pipeline file is valid TOML");
        let store = self.dir.path().join(format!("store-{k}"));
        set(&mut table, "store.path", store.display().to_string());
        let file = self.dir.path().join(format!("pipeline-{k}.toml"));
        let config = write_and_load(&file, &table);
        (file, config)
    }

    /// The main queue.
    #[allow(dead_code)]
    pub fn main_queue(&self) -> String {
        Topology::new(&self.config).main_queue()
    }
}

/// Writes `table` to `file` and loads it exactly as the worker will.
#[allow(dead_code)]
fn write_and_load(file: &Path, table: &toml::Table) -> PipelineConfig {
    std::fs::write(
        file,
        toml::to_string(table).expect("pipeline table serialises"),
    )
    .expect("write the pipeline file");
    PipelineConfig::load(file)
        .unwrap_or_else(|e| panic!("the bench pipeline {} is invalid: {e}", file.display()))
}

impl Drop for BenchPipeline {
    fn drop(&mut self) {
        // A thread of its own: drop may run inside or outside a runtime.
        let config = self.config.clone();
        let collection = self.qdrant_collection.take();
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async {
                delete_queues(&config).await;
                if let Some(collection) = collection {
                    delete_qdrant_collection(&config, &collection).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Deletes `collection` on `config`'s Qdrant server (errors ignored: best effort).
#[allow(dead_code)]
async fn delete_qdrant_collection(config: &PipelineConfig, collection: &str) {
    let q = &config.store.qdrant;
    let mut builder = qdrant_client::Qdrant::from_url(&q.url).skip_compatibility_check();
    if let Some(key) = &q.api_key {
        builder.set_api_key(key.expose());
    }
    if let Ok(client) = builder.build() {
        let _ = client.delete_collection(collection.to_owned()).await;
    }
}

/// One open channel for asking the broker about queues.
#[allow(dead_code)]
pub struct QueueProbe {
    conn: Connection,
    channel: Channel,
}

impl QueueProbe {
    /// Connects to the bench broker.
    #[allow(dead_code)]
    pub async fn connect() -> Self {
        let conn = within(
            "connect",
            Connection::connect(&amqp_url(), ConnectionProperties::default()),
        )
        .await
        .expect("RabbitMQ is reachable (scripts/ensure-rabbitmq.sh)");
        let channel = within("open a channel", conn.create_channel())
            .await
            .expect("channel");
        QueueProbe { conn, channel }
    }

    /// Ready (not yet delivered) messages in `queue`, which must exist.
    #[allow(dead_code)]
    pub async fn ready(&self, queue: &str) -> u32 {
        let declare = self.channel.queue_declare(
            queue.into(),
            QueueDeclareOptions::durable().passive(),
            FieldTable::default(),
        );
        within(&format!("inspect queue {queue}"), declare)
            .await
            .unwrap_or_else(|e| panic!("queue {queue} cannot be inspected: {e}"))
            .message_count()
    }

    /// Closes the connection (and with it the channel).
    #[allow(dead_code)]
    pub async fn close(self) {
        drop(self.channel);
        queues::close_quietly(self.conn).await;
    }
}

/// The chunk count of each document with `chunker` (what the store must hold for it).
#[allow(dead_code)]
pub fn expected_chunks(chunker: &Chunker, docs: &[Document]) -> Vec<usize> {
    docs.iter()
        .map(|doc| {
            chunker
                .split(&doc.content, doc.format().expect("supported content type"))
                .len()
        })
        .collect()
}

/// Checks that `stores` between them hold each document `i` of `docs` exactly once: one
/// store has exactly `expected[i]` points for it and every other store none, and the stores
/// hold nothing else for the documents' tenants. Returns the total number of points, or a
/// description of every difference.
#[allow(dead_code)]
pub async fn verify_stored<S: VectorStore>(
    stores: &[S],
    docs: &[Document],
    expected: &[usize],
) -> Result<usize, String> {
    let mut problems = Vec::new();
    let mut per_tenant: std::collections::BTreeMap<&str, usize> = Default::default();
    for (doc, &want) in docs.iter().zip(expected) {
        let mut counts = Vec::with_capacity(stores.len());
        for store in stores {
            counts.push(
                store
                    .count(&doc.tenant, Some(&doc.document_id))
                    .await
                    .map_err(|e| format!("count of {}: {e}", doc.document_id))?,
            );
        }
        let holders = counts.iter().filter(|&&n| n > 0).count();
        if holders != 1 || counts.iter().sum::<usize>() != want {
            problems.push(format!(
                "{}/{}: {counts:?} points in the {} store(s), expected {want} in exactly one",
                doc.tenant,
                doc.document_id,
                stores.len()
            ));
        }
        *per_tenant.entry(doc.tenant.as_str()).or_default() += want;
    }
    let mut total = 0;
    for (tenant, want) in per_tenant {
        let tenant_id = TenantId::new(tenant).expect("tenant");
        let mut got = 0;
        for store in stores {
            got += store
                .count(&tenant_id, None)
                .await
                .map_err(|e| format!("count of tenant {tenant}: {e}"))?;
        }
        if got != want {
            problems.push(format!("tenant {tenant}: {got} points, expected {want}"));
        }
        total += got;
    }
    if problems.is_empty() {
        Ok(total)
    } else {
        Err(problems.join("\n"))
    }
}

/// Model tokens of `texts`, `[CLS]`/`[SEP]` included (what the forward pass computes).
#[allow(dead_code)]
pub fn model_tokens(tokenizer: &tokenizers::Tokenizer, texts: &[&str]) -> u64 {
    tokenizer
        .encode_batch(texts.to_vec(), true)
        .expect("tokenize")
        .iter()
        .map(|e| e.len() as u64)
        .sum()
}

/// A private link to (or copy of) the `rag-ingest` binary cargo built with this bench,
/// taken once at the start: the target directory may be shared with other checkouts whose
/// builds replace `target/release/rag-ingest` while a bench runs. Removed on drop.
#[allow(dead_code)]
pub struct WorkerBinary {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl WorkerBinary {
    /// Links (or, across file systems, copies) `CARGO_BIN_EXE_rag-ingest` into a temporary
    /// directory and prints which build it is.
    #[allow(dead_code)]
    pub fn snapshot() -> Self {
        let source = Path::new(env!("CARGO_BIN_EXE_rag-ingest"));
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("rag-ingest");
        if std::fs::hard_link(source, &path).is_err() {
            std::fs::copy(source, &path)
                .unwrap_or_else(|e| panic!("cannot copy {}: {e}", source.display()));
        }
        let modified = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339())
            .unwrap_or_default();
        eprintln!(
            "worker binary: {} (built {modified}, from {})",
            source.display(),
            manifest_dir().display()
        );
        WorkerBinary { path, _dir: dir }
    }

    /// The binary to run.
    #[allow(dead_code)]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl WorkerProcess {
    /// Starts `<binary> --log-format text worker --pipeline <file> <extra>` with info logs
    /// (lapin and qdrant_edge at warn).
    #[allow(dead_code)]
    pub fn start(binary: &WorkerBinary, file: &Path, extra: &[&str]) -> Self {
        Self::start_on(binary, file, extra, None)
    }

    /// Like [`start`](Self::start); with `core`, the process may run on that CPU core only
    /// (`taskset -c <core>`, which then executes the worker in its place, so
    /// [`id`](Self::id) is the worker's pid).
    #[allow(dead_code)]
    pub fn start_on(
        binary: &WorkerBinary,
        file: &Path,
        extra: &[&str],
        core: Option<usize>,
    ) -> Self {
        let args: Vec<&str> = ["--report", "json"]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        WorkerProcess::launch(worker_process::Launch {
            binary: binary.path(),
            global_args: &["--log-format", "json"],
            pipeline: file,
            args: &args,
            env: &[],
            core,
            failure: "BENCH FAILED: ",
        })
    }
}

/// Panics with the log unless a worker that was asked to stop exited cleanly, stored
/// `stored` documents and retried or dead-lettered none.
#[allow(dead_code)]
pub fn check_clean_exit(status: ExitStatus, log: &str, stored: u64) {
    assert!(
        status.success(),
        "BENCH FAILED: the worker exited with {status}; log:\n{log}"
    );
    for (name, want) in [("stored", stored), ("retried", 0), ("dead_lettered", 0)] {
        let got = final_count(log, name);
        assert_eq!(
            got, want,
            "BENCH FAILED: the worker reports {name}={got}, expected {want}; log:\n{log}"
        );
    }
}

/// Median of `values` (the mean of the two middle values for an even count); `None` when
/// empty.
#[allow(dead_code)]
pub fn median(values: &[Duration]) -> Option<Duration> {
    let mut sorted = values.to_vec();
    sorted.sort();
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2),
    }
}
