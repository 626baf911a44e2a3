//! Fairness between tenants (issue 19), against the real RabbitMQ, model, store and Redis
//! (`scripts/ensure-redis.sh`; every test fails when Redis is down, none is skipped):
//!
//! - lanes: a bulk backlog does not hold back live messages; versions order a document
//!   across lanes, and the bulk lane refuses unversioned messages;
//! - tenant budgets: a tenant over its budget is deferred (not dead-lettered, no attempt
//!   used) and resumes when the window rolls while other tenants go on; the budget holds
//!   across two worker processes; Redis failures fail closed by default, open when
//!   configured;
//! - the provider rate limit shared by two worker processes: no 429 and a throughput within
//!   10 % of the limit.
//!
//! Every test has its own queues, store and Redis key prefix.

mod common;
#[allow(dead_code)]
#[path = "support/openai_server.rs"]
mod openai_server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Event, TestPipeline, WorkerProcess, eventually, within};
use openai_server::{Embedder503, MODEL};
use rag_ingest::chunk::Chunker;
use rag_ingest::config::PipelineConfig;
use rag_ingest::embed::{Embedder, OpenAiEmbedder, OpenAiOptions};
use rag_ingest::lane::Lane;
use rag_ingest::message::Document;
use rag_ingest::process::Pipeline;
use rag_ingest::queue::{DlqFilter, RunOptions, Submitter, Topology, Worker, WorkerReport};
use rag_ingest::shared::Redis;
use rag_ingest::shared::rate::SharedRateLimit;
use rag_ingest::store::VectorStore;
use rag_ingest::tenant::TenantId;
use serde_json::Value;
use tokio::sync::oneshot;

/// The Redis server of the tests.
const REDIS_URL: &str = "redis://127.0.0.1:6379/";

/// A unique Redis key prefix for one test.
fn redis_prefix(test: &str) -> String {
    format!(
        "rag-ingest-test-{test}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// A connection to the test Redis; panics if it is not running.
async fn redis_conn() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(REDIS_URL).expect("Redis URL");
    within(
        "connect to Redis",
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("Redis must be running on 127.0.0.1:6379 (scripts/ensure-redis.sh)")
}

/// The keys under `prefix` with their integer values.
async fn redis_counters(prefix: &str) -> Vec<(String, u64)> {
    let mut conn = redis_conn().await;
    let keys: Vec<String> = within(
        "list keys",
        redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut conn),
    )
    .await
    .expect("KEYS");
    let mut out = Vec::new();
    for key in keys {
        let value: Option<u64> = within(
            "get a key",
            redis::cmd("GET").arg(&key).query_async(&mut conn),
        )
        .await
        .unwrap_or(None);
        out.push((key, value.unwrap_or(0)));
    }
    out.sort();
    out
}

/// Deletes every key under `prefix`.
async fn delete_redis_keys(prefix: &str) {
    let mut conn = redis_conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<u64, _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
    }
}

/// Publishes `docs` to `lane` with confirms.
async fn submit_to(config: &PipelineConfig, lane: Lane, docs: &[Document]) {
    let submitter = within("connect", Submitter::connect(config))
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672")
        .with_lane(lane);
    let results = within("submit", submitter.submit_all(docs, |_, _| {})).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    submitter.close().await;
}

/// `docs`, each with `version`.
fn versioned(mut docs: Vec<Document>, version: u64) -> Vec<Document> {
    for d in &mut docs {
        d.version = Some(version);
    }
    docs
}

/// An in-process worker running until [`Running::stop`].
struct Running {
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<WorkerReport, rag_ingest::queue::WorkerError>>,
}

impl Running {
    fn start<E: Embedder, S: VectorStore>(
        config: &PipelineConfig,
        pipeline: Pipeline<E, S>,
    ) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let worker = Worker::new(config.clone(), pipeline);
        let handle = tokio::spawn(async move {
            worker
                .run(RunOptions::default(), async {
                    let _ = stopped.await;
                })
                .await
        });
        Running { stop, handle }
    }

    async fn stop(self) -> WorkerReport {
        let _ = self.stop.send(());
        within("the worker stops", self.handle)
            .await
            .expect("the worker task")
            .expect("the worker ran")
    }
}

/// Points of `tenant` in `store`.
async fn points<S: VectorStore>(store: &S, tenant: &str) -> usize {
    let tenant = TenantId::new(tenant).expect("tenant");
    store.count(&tenant, None).await.unwrap_or(0)
}

/// Model tokens the pipeline's chunker counts for `doc` (what the local embedder charges).
fn doc_tokens(chunker: &Chunker, doc: &Document) -> u64 {
    chunker
        .split(&doc.content, doc.format().expect("a supported type"))
        .iter()
        .map(|c| c.tokens as u64)
        .sum()
}

/// `n` one-chunk documents of `tenant` of nearly the same length.
fn notes(tenant: &str, prefix: &str, n: usize) -> Vec<Document> {
    let tenant = TenantId::new(tenant).expect("tenant");
    (0..n)
        .map(|i| {
            Document::upsert(
                tenant.clone(),
                format!("{prefix}-{i:02}"),
                format!(
                    "Note {prefix} {i:02}: the lantern by the harbor stays lit while the \
                     falcon circles the granite cliff above the meadow."
                ),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Lanes
// ---------------------------------------------------------------------------------------

/// With 40 backfill documents queued on the bulk lane before 3 live edits, the live edits
/// are stored while most of the backfill still waits (one bulk slot of four), and the
/// backfill then completes. With one FIFO queue the edits would wait for all 40.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_backlog_does_not_hold_back_live_messages() {
    let t = TestPipeline::new(
        "fair-lanes",
        "[worker]\nconcurrency = 4\nbulk_concurrency = 1\n",
    );
    let backfill = versioned(common::short_docs("globex", "backfill", 40), 1);
    let edits = common::short_docs("acme", "edit", 3);
    submit_to(&t.config, Lane::Bulk, &backfill).await;
    submit_to(&t.config, Lane::Live, &edits).await;
    let backfill_points: usize = backfill
        .iter()
        .map(|d| common::expected_chunks(&t.config, d))
        .sum();
    let edit_points: usize = edits
        .iter()
        .map(|d| common::expected_chunks(&t.config, d))
        .sum();

    let pipeline = t.pipeline();
    let store = Arc::clone(pipeline.store());
    let worker = Running::start(&t.config, pipeline);
    eventually(Duration::from_secs(60), "the live edits stored", || {
        let store = Arc::clone(&store);
        async move { points(&*store, "acme").await >= edit_points }
    })
    .await;
    let backfill_then = points(&*store, "globex").await;
    assert!(
        backfill_then * 4 < backfill_points,
        "the live edits were stored before most of the backfill: {backfill_then} of \
         {backfill_points} backfill points already stored"
    );
    eventually(Duration::from_secs(120), "the backfill stored", || {
        let store = Arc::clone(&store);
        async move { points(&*store, "globex").await >= backfill_points }
    })
    .await;
    let report = worker.stop().await;
    assert_eq!(report.stored, 43, "{report:?}");
    assert_eq!(report.dead_lettered + report.retried, 0, "{report:?}");
    t.delete_queues().await;
}

/// Versions order a document whatever lane each message took: a backfill's version 1
/// processed after the live version 2 is skipped as stale. An unversioned message on the
/// bulk lane is dead-lettered as `invalid_field` (it could overwrite newer live edits), and
/// a replay from the DLQ puts it back on the bulk lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_order_a_document_across_lanes_and_bulk_needs_one() {
    let t = TestPipeline::new("fair-order", "");
    let acme = TenantId::new("acme").expect("tenant");
    let mut live = Document::upsert(acme.clone(), "guide", "The second edition of the guide.");
    live.version = Some(2);
    let mut old = Document::upsert(acme.clone(), "guide", "The first edition of the guide.");
    old.version = Some(1);
    let grace = Duration::from_millis(300);

    submit_to(&t.config, Lane::Live, &[live]).await;
    let report = common::drain(&t.config, t.pipeline(), Duration::from_secs(60), grace).await;
    assert_eq!(report.stored, 1, "{report:?}");
    submit_to(&t.config, Lane::Bulk, &[old]).await;
    let report = common::drain(&t.config, t.pipeline(), Duration::from_secs(60), grace).await;
    assert_eq!((report.stale, report.stored), (1, 0), "{report:?}");
    let pipeline = t.pipeline();
    let head = pipeline
        .store()
        .first_chunk(&acme, "guide")
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(head.version, Some(2), "the newest version stays");
    drop(pipeline);

    let unversioned = Document::upsert(acme, "guide", "An unversioned snapshot.");
    submit_to(&t.config, Lane::Bulk, &[unversioned]).await;
    let report = common::drain(&t.config, t.pipeline(), Duration::from_secs(60), grace).await;
    assert_eq!((report.dead_lettered, report.stored), (1, 0), "{report:?}");
    let (summary, _) = within(
        "inspect the DLQ",
        rag_ingest::queue::inspect_dlq(&t.config, &DlqFilter::default()),
    )
    .await
    .expect("DLQ");
    assert_eq!(
        summary.by_kind.get("invalid_field"),
        Some(&1),
        "{summary:?}"
    );
    let replay = within(
        "reprocess",
        rag_ingest::queue::reprocess(&t.config, &DlqFilter::default(), false, |_| {}),
    )
    .await
    .expect("reprocess");
    assert_eq!(replay.moved.total, 1);
    let topology = Topology::new(&t.config);
    assert_eq!(common::queue_len(&topology.lane_queue(Lane::Bulk)).await, 1);
    assert_eq!(common::queue_len(&topology.main_queue()).await, 0);
    t.delete_queues().await;
}

// ---------------------------------------------------------------------------------------
// Tenant budgets
// ---------------------------------------------------------------------------------------

/// The TOML of `[redis]` and `[tenants.budgets]`.
fn budget_toml(prefix: &str, window_secs: u64, budget: u64, extra: &str) -> String {
    format!(
        "[redis]\nurl = \"{REDIS_URL}\"\nkey_prefix = \"{prefix}\"\n\
         [tenants.budgets]\nwindow_secs = {window_secs}\ntokens = {{ acme = {budget} }}\n{extra}"
    )
}

/// Waits until the current window of `window_secs` (aligned to the Unix epoch, as the Redis
/// clock on this machine counts it) is less than 300 ms old, so a test phase fits in it.
async fn wait_for_a_fresh_window(window_secs: u64) {
    let window_ms = window_secs * 1000;
    let into = || {
        let now = u64::try_from(chrono::Utc::now().timestamp_millis()).expect("after 1970");
        now % window_ms
    };
    if into() < 300 {
        return;
    }
    eventually(
        Duration::from_secs(window_secs + 5),
        "a fresh budget window",
        || async { into() < 300 },
    )
    .await;
}

/// A tenant over its budget has its messages deferred to the parked queue (not
/// dead-lettered, no attempt used) while another tenant's messages are stored; when the
/// window rolls, the deferred messages come back and are stored, each window's count
/// staying under the budget plus one message (concurrency 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_budget_is_deferred_not_dead_lettered_and_resumes_when_the_window_rolls() {
    const WINDOW: u64 = 8;
    let prefix = redis_prefix("defer");
    let acme_docs = notes("acme", "a", 6);
    let globex_docs = notes("globex", "g", 3);
    // The budget: two and a half documents, so the third is the last admitted.
    let probe = TestPipeline::new("fair-defer-probe", "");
    let chunker = rag_ingest::setup::chunker(&probe.config, &common::embedder()).expect("chunker");
    let tokens: Vec<u64> = acme_docs.iter().map(|d| doc_tokens(&chunker, d)).collect();
    let budget = tokens[0] + tokens[1] + tokens[2] / 2;
    let admitted_per_window = {
        let mut used = 0;
        tokens
            .iter()
            .take_while(|t| {
                let admit = used < budget;
                used += **t;
                admit
            })
            .count()
    };
    let t = TestPipeline::new(
        "fair-defer",
        &budget_toml(&prefix, WINDOW, budget, "[worker]\nconcurrency = 1\n"),
    );
    let pipeline = t.pipeline();
    let store = Arc::clone(pipeline.store());

    wait_for_a_fresh_window(WINDOW).await;
    let window_started = Instant::now();
    submit_to(&t.config, Lane::Live, &acme_docs).await;
    submit_to(&t.config, Lane::Live, &globex_docs).await;
    let worker = Running::start(&t.config, pipeline);
    let topology = Topology::new(&t.config);
    let parked = topology.parked_queue(Lane::Live);
    let deferred = acme_docs.len() - admitted_per_window;
    eventually(
        Duration::from_secs(WINDOW),
        "the other tenant stored and the rest of acme parked",
        || {
            let store = Arc::clone(&store);
            let parked = parked.clone();
            async move {
                points(&*store, "globex").await == 3
                    && common::queue_len(&parked).await as usize == deferred
            }
        },
    )
    .await;
    assert!(
        window_started.elapsed() < Duration::from_secs(WINDOW),
        "the first phase fits in one window"
    );
    assert_eq!(points(&*store, "acme").await, admitted_per_window);
    assert_eq!(
        common::queue_len(&topology.dlq()).await,
        0,
        "nothing dead-lettered"
    );

    // The window rolls: the parked messages come back and are admitted again.
    let all = acme_docs.len();
    eventually(
        Duration::from_secs(3 * WINDOW),
        "every acme document stored after the window rolled",
        || {
            let store = Arc::clone(&store);
            async move { points(&*store, "acme").await == all }
        },
    )
    .await;
    let report = worker.stop().await;
    assert_eq!(report.stored, 9, "{report:?}");
    assert!(report.deferred as usize >= deferred, "{report:?}");
    assert_eq!(
        (report.retried, report.dead_lettered),
        (0, 0),
        "deferral uses no attempt: {report:?}"
    );
    let counters = redis_counters(&format!("{prefix}:{}:budget:acme", t.config.name)).await;
    assert!(counters.len() >= 2, "two windows counted: {counters:?}");
    let largest = tokens.iter().copied().max().unwrap_or(0);
    for (key, used) in &counters {
        assert!(
            *used < budget + largest,
            "window {key}: {used} tokens, budget {budget} + one message {largest}"
        );
    }
    let total: u64 = counters.iter().map(|(_, used)| used).sum();
    assert_eq!(
        total,
        tokens.iter().sum::<u64>(),
        "every token counted once"
    );
    delete_redis_keys(&prefix).await;
    t.delete_queues().await;
}

/// The `fields` and `span` of every JSON log line of `log` whose event is `name`.
fn events<'a>(log: &'a str, name: &'a str) -> impl Iterator<Item = Value> + 'a {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(move |v| v["fields"]["event"] == name)
}

/// The sum of the samples of metric `name` whose labels include every one of `labels`.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let values: Vec<f64> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// GET /metrics on `addr`.
async fn metrics(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        Some(String::from_utf8_lossy(&buf).into_owned())
    };
    within("GET /metrics", fetch)
        .await
        .expect("the worker serves /metrics")
}

/// A free loopback address.
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

/// Writes a candle pipeline file `name` for `t` with `extra` TOML, serving metrics on
/// `metrics` (`""`: off); returns its path.
fn pipeline_file(t: &TestPipeline, name: &str, metrics: &str, extra: &str) -> PathBuf {
    let c = &t.config;
    let text = format!(
        r#"name = "{name}"
[broker]
url = "{url}"
prefetch = 16
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
[metrics]
address = "{metrics}"
{extra}"#,
        name = c.name,
        url = c.broker.url,
        model = common::model_dir().display(),
        store = c.store.path.display(),
    );
    let path = t.dir.path().join(name);
    std::fs::write(&path, text).expect("write the pipeline file");
    path
}

/// Two worker processes share one budget through Redis: the tenant's count ends at or over
/// the budget and under the budget plus one message per worker (each processes one message
/// at a time: the messages admitted while the tenant was under its budget may all finish);
/// the count is exactly the tokens the workers' `chunks_embedded` events report; the rest is
/// parked, nothing dead-lettered; the other tenant is stored in full. `rag-ingest tenants`
/// shows the same count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_holds_across_two_worker_processes() {
    let prefix = redis_prefix("multi");
    let t = TestPipeline::new("fair-multi", "");
    let acme_docs = notes("acme", "m", 30);
    let globex_docs = notes("globex", "x", 5);
    let chunker = rag_ingest::setup::chunker(&t.config, &common::embedder()).expect("chunker");
    let tokens: Vec<u64> = acme_docs.iter().map(|d| doc_tokens(&chunker, d)).collect();
    let largest = tokens.iter().copied().max().unwrap_or(0);
    let budget = tokens.iter().take(10).sum::<u64>();
    // 31 days: the window does not roll during the test.
    let extra = budget_toml(&prefix, 31 * 86_400, budget, "[worker]\nconcurrency = 1\n");
    let file = pipeline_file(&t, "fair-pipeline.toml", "", &extra);
    // The first worker serves its metrics.
    let metrics_addr = free_addr();
    let files = [
        pipeline_file(&t, "fair-pipeline-0.toml", &metrics_addr, &extra),
        file.clone(),
    ];
    let mut workers: Vec<WorkerProcess> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let store = t
                .dir
                .path()
                .join(format!("store-{i}"))
                .display()
                .to_string();
            WorkerProcess::start_with_env(f, false, &[("RAG_INGEST_STORE_PATH", &store)])
        })
        .collect();
    for w in &mut workers {
        w.wait_for(&common::CONSUMING, 2, Duration::from_secs(120));
    }
    submit_to(&t.config, Lane::Live, &acme_docs).await;
    submit_to(&t.config, Lane::Live, &globex_docs).await;
    let deferred = Event::named("message_deferred");
    let settled_or_deferred = |ws: &[WorkerProcess]| -> usize {
        ws.iter()
            .map(|w| w.count(&common::STORED) + w.count(&deferred))
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while settled_or_deferred(&workers) < 35 {
        assert!(
            Instant::now() < deadline,
            "every message stored or deferred within 120 s: {}",
            settled_or_deferred(&workers)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What an operator sees on the first worker's /metrics.
    let body = metrics(&metrics_addr).await;
    let acme = "tenant=\"acme\"";
    assert_eq!(
        sample(&body, "rag_ingest_tenant_budget_remaining_tokens", &[acme]),
        Some(0.0),
        "{body}"
    );
    assert!(
        sample(&body, "rag_ingest_tenant_budget_exhausted_total", &[acme]).unwrap_or(0.0) > 0.0
            || workers[0].count(&deferred) == 0,
        "{body}"
    );
    for tenant in ["acme", "globex"] {
        let labels = [&format!("tenant=\"{tenant}\"")[..], "lane=\"live\""];
        assert_eq!(
            sample(&body, "rag_ingest_tenant_in_flight_messages", &labels),
            Some(0.0),
            "nothing in flight any more: {body}"
        );
        assert!(
            sample(&body, "rag_ingest_queue_wait_seconds_count", &labels).is_some(),
            "{body}"
        );
    }
    let mut logs = Vec::new();
    for w in workers {
        w.signal("TERM");
        let (status, log) = w.wait_exit(Duration::from_secs(60)).await;
        assert!(status.success(), "{log}");
        logs.push(log);
    }
    let log = logs.join("\n");
    let counters = redis_counters(&format!("{prefix}:{}:budget:acme", t.config.name)).await;
    assert_eq!(counters.len(), 1, "one window: {counters:?}");
    let used = counters[0].1;
    assert!(used >= budget, "the budget was reached: {used} of {budget}");
    assert!(
        used < budget + 2 * largest,
        "at most one message per worker past the budget: {used} tokens, budget {budget}, \
         largest message {largest}"
    );
    let embedded: u64 = events(&log, "chunks_embedded")
        .filter(|e| e["span"]["tenant_id"] == "acme")
        .filter_map(|e| e["fields"]["tokens"].as_u64())
        .sum();
    assert_eq!(
        embedded, used,
        "the budget counts the tokens the metric counts"
    );
    let stored_acme = events(&log, "message_settled")
        .filter(|e| e["span"]["tenant_id"] == "acme")
        .count();
    let deferred_acme = 30 - stored_acme;
    assert!(deferred_acme > 0, "some acme messages were deferred");
    eprintln!(
        "two workers: budget {budget}, counted {used} (largest message {largest}), acme \
         stored {stored_acme}, deferred {deferred_acme}"
    );
    let topology = Topology::new(&t.config);
    assert_eq!(
        common::queue_len(&topology.parked_queue(Lane::Live)).await as usize,
        deferred_acme
    );
    assert_eq!(common::queue_len(&topology.dlq()).await, 0);
    let stored_globex = events(&log, "message_settled")
        .filter(|e| e["span"]["tenant_id"] == "globex")
        .count();
    assert_eq!(stored_globex, 5, "the other tenant is not limited");
    assert!(
        events(&log, "tenant_budget_exhausted").count() >= deferred_acme,
        "each deferral says why"
    );

    let out = common::run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_rag-ingest"))
            .args(["tenants", "--json", "--pipeline"])
            .arg(&file),
    );
    let listed: Value = serde_json::from_str(&common::stdout(&out)).expect("JSON");
    let acme = listed
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["tenant"] == "acme"))
        .expect("acme listed");
    assert_eq!(acme["used"].as_u64(), Some(used));
    assert_eq!(acme["budget"].as_u64(), Some(budget));
    assert_eq!(
        acme["remaining"].as_u64(),
        Some(budget.saturating_sub(used))
    );
    let globex = listed
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["tenant"] == "globex"))
        .expect("globex listed");
    assert!(globex["budget"].is_null(), "{globex}");
    assert!(
        globex["used"].as_u64().unwrap_or(0) > 0,
        "counted, not limited"
    );
    delete_redis_keys(&prefix).await;
    t.delete_queues().await;
}

/// With Redis unreachable, a budgeted tenant's message is deferred by default (fail closed:
/// nothing spent that cannot be counted, nothing lost), while an unbudgeted tenant's is
/// stored; with `on_redis_error = "open"` both are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_fails_closed_by_default_and_open_when_configured() {
    // Nothing listens on port 1: connections are refused at once.
    let unreachable = |policy: &str| {
        format!(
            "[redis]\nurl = \"redis://127.0.0.1:1/\"\ntimeout_ms = 200\n\
             [tenants.budgets]\ntokens = {{ acme = 100000 }}\n{policy}"
        )
    };
    for (policy, expect_deferred) in [("", true), ("on_redis_error = \"open\"\n", false)] {
        let t = TestPipeline::new("fair-redis-down", &unreachable(policy));
        let docs = [notes("acme", "a", 1), notes("globex", "g", 1)].concat();
        submit_to(&t.config, Lane::Live, &docs).await;
        let pipeline = t.pipeline();
        let store = Arc::clone(pipeline.store());
        let worker = Running::start(&t.config, pipeline);
        let parked = Topology::new(&t.config).parked_queue(Lane::Live);
        eventually(Duration::from_secs(30), "both messages handled", || {
            let store = Arc::clone(&store);
            let parked = parked.clone();
            async move {
                let acme = if expect_deferred {
                    common::queue_len(&parked).await == 1
                } else {
                    points(&*store, "acme").await == 1
                };
                acme && points(&*store, "globex").await == 1
            }
        })
        .await;
        let report = worker.stop().await;
        if expect_deferred {
            assert_eq!((report.stored, report.deferred), (1, 1), "{report:?}");
            assert_eq!(points(&*store, "acme").await, 0);
        } else {
            assert_eq!((report.stored, report.deferred), (2, 0), "{report:?}");
        }
        assert_eq!(report.dead_lettered + report.retried, 0, "{report:?}");
        t.delete_queues().await;
    }
}

// ---------------------------------------------------------------------------------------
// The provider rate limit shared by several workers
// ---------------------------------------------------------------------------------------

/// Writes an openai pipeline file for `t` against `server`, sharing
/// `max_requests_per_minute` through Redis under `prefix`; returns its path.
fn openai_pipeline_file(t: &TestPipeline, server: &Embedder503, prefix: &str, rpm: u32) -> PathBuf {
    let c = &t.config;
    let text = format!(
        r#"name = "{name}"
[broker]
url = "{url}"
prefetch = 32
[tenants]
allowed = ["acme", "globex"]
[chunking]
max_tokens = 64
overlap = 8
[embedder]
kind = "openai"
batch_size = 1
base_url = "http://{addr}"
model = "all-minilm"
fingerprint_model = "{MODEL}"
dims = 384
pooling = "mean"
normalized = true
max_input_tokens = 256
tokenizer = "{tokenizer}"
rate_limit_retries = 0
max_requests_per_minute = {rpm}
rate_limit_shared = true
[store]
kind = "edge"
path = "{store}"
collection = "c"
[limits]
max_document_bytes = 4096
[worker]
concurrency = 16
[metrics]
address = ""
[redis]
url = "{REDIS_URL}"
key_prefix = "{prefix}"
"#,
        name = c.name,
        url = c.broker.url,
        addr = server.addr,
        tokenizer = common::model_dir().join("tokenizer.json").display(),
        store = c.store.path.display(),
    );
    let path = t.dir.path().join("openai-pipeline.toml");
    std::fs::write(&path, text).expect("write the pipeline file");
    path
}

/// Two worker processes share `max_requests_per_minute` = 480 (8 per second) through Redis
/// against a provider that answers 429 above 10 requests per second: no request is refused,
/// and over a 12-second window the provider serves within 10 % of 8 per second. (Each
/// worker on its own bucket of 480 would send up to 16 per second.) Each worker processes 16
/// messages at once, so a slow store flush (a busy disk) does not leave the bucket idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_provider_rate_limit_without_a_429() {
    const RATE: f64 = 8.0;
    let server = Embedder503::start(false).await;
    server.limit_per_second(10);
    let prefix = redis_prefix("rate");
    let t = TestPipeline::new("fair-rate", "");
    let file = openai_pipeline_file(&t, &server, &prefix, 480);
    let stores: Vec<String> = (0..2)
        .map(|i| {
            t.dir
                .path()
                .join(format!("store-{i}"))
                .display()
                .to_string()
        })
        .collect();
    let mut workers: Vec<WorkerProcess> = stores
        .iter()
        .map(|s| WorkerProcess::start_with_env(&file, false, &[("RAG_INGEST_STORE_PATH", s)]))
        .collect();
    for w in &mut workers {
        w.wait_for(&common::CONSUMING, 2, Duration::from_secs(120));
    }
    // One chunk, so one request, per document.
    let docs = notes("acme", "r", 160);
    submit_to(&t.config, Lane::Live, &docs).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while server.served().len() < 130 {
        assert!(
            Instant::now() < deadline,
            "requests keep coming: {} served, {} throttled",
            server.served().len(),
            server.throttled()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let served = server.served();
    // Steady state: from the 10th request, a 12-second window.
    let start = served[10];
    let window = Duration::from_secs(12);
    let in_window = served
        .iter()
        .filter(|t| **t >= start && **t < start + window)
        .count();
    let rate = in_window as f64 / window.as_secs_f64();
    eprintln!(
        "shared limit {RATE}/s: {in_window} requests served in {window:?} ({rate:.2}/s), {} \
         throttled",
        server.throttled()
    );
    assert_eq!(server.throttled(), 0, "no request refused");
    assert!(
        (rate - RATE).abs() <= RATE * 0.1,
        "{rate:.2} requests/s served, limit {RATE}"
    );
    for w in workers {
        w.signal("TERM");
        let (status, log) = w.wait_exit(Duration::from_secs(60)).await;
        assert!(status.success(), "{log}");
        assert_eq!(events(&log, "provider_throttled").count(), 0, "{log}");
    }
    delete_redis_keys(&prefix).await;
    t.delete_queues().await;
}

/// With Redis unreachable, a shared limit falls back to the worker's own bucket at the same
/// rate: requests still go out, spaced at the rate, none refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_limit_falls_back_to_the_workers_own_bucket_without_redis() {
    let server = Embedder503::start(false).await;
    server.limit_per_second(10);
    let redis_config: rag_ingest::config::RedisConfig =
        toml::from_str("url = \"redis://127.0.0.1:1/\"\ntimeout_ms = 200\n").expect("redis table");
    let redis = Arc::new(Redis::new(&redis_config, "fair-fallback").expect("client"));
    let mut options = OpenAiOptions::new(
        format!("http://{}", server.addr),
        "all-minilm".to_owned(),
        common::embedder().fingerprint().clone(),
    );
    options.batch_size = 1;
    options.max_concurrent_requests = 8;
    options.rate_limit_retries = 0;
    options.rate_limits = rag_ingest::embed::rate::RateLimits {
        requests_per_minute: 480,
        tokens_per_minute: 0,
    };
    options.shared_rate_limit = Some(SharedRateLimit::new(redis, 480, 0));
    let embedder = OpenAiEmbedder::new(options).expect("embedder");
    let texts: Vec<String> = (0..9).map(|i| format!("fallback text {i}")).collect();
    let started = Instant::now();
    let vectors = embedder.embed(texts).await.expect("every request answered");
    assert_eq!(vectors.len(), 9);
    assert_eq!(server.throttled(), 0);
    assert!(
        started.elapsed() >= Duration::from_millis(8 * 1000 / 8),
        "spaced at 8 per second by the local bucket: {:?}",
        started.elapsed()
    );
}
