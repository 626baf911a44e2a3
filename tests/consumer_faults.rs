//! Broker-side faults and untrusted inputs around the consume loop (issue 15, items 5, 6, 9):
//! a connection the broker closes while the worker is paused by an open embedder breaker,
//! an outage longer than RabbitMQ's `consumer_timeout`, the DLQ reason of broker dead
//! letters, producer-set headers, and the DLQ's own delivery limit.
//!
//! The remote embedder is the real worker binary's OpenAI client pointed at a local HTTP
//! server that answers 503 while "down" and real all-MiniLM-L6-v2 vectors otherwise.

mod common;
#[path = "support/openai_server.rs"]
mod openai_server;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{TestPipeline, WorkerProcess, eventually, queue_len, within};
use lapin::Channel;
use lapin::options::{BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use openai_server::{Embedder503, MODEL};
use rag_ingest::config::PipelineConfig;
use rag_ingest::queue::{
    DlqFilter, Submitter, Topology, inspect_dlq, publish_confirmed, reprocess,
};
use rag_ingest::store::VectorStore;
use serde_json::Value;

/// A free loopback port for the worker's /readyz.
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

/// Writes a pipeline file for `t`'s queues and store with an openai embedder at `server`;
/// returns its path and the parsed config.
fn openai_pipeline(
    t: &TestPipeline,
    server: &Embedder503,
    delivery_limit: u32,
    (breaker_failures, breaker_open_ms): (u32, u64),
    metrics: &str,
) -> (PathBuf, PipelineConfig) {
    let c = &t.config;
    let text = format!(
        r#"name = "{name}"
[broker]
url = "{url}"
prefetch = 16
delivery_limit = {delivery_limit}
[tenants]
allowed = ["acme", "globex"]
[chunking]
max_tokens = 64
overlap = 8
[embedder]
kind = "openai"
batch_size = 8
base_url = "http://{addr}"
model = "all-minilm"
fingerprint_model = "{MODEL}"
dims = 384
pooling = "mean"
normalized = true
max_input_tokens = 256
tokenizer = "{tokenizer}"
request_timeout_ms = 2000
rate_limit_retries = 0
breaker_failures = {breaker_failures}
breaker_open_ms = {breaker_open_ms}
[store]
kind = "edge"
path = "{store}"
collection = "c"
[limits]
max_document_bytes = 4096
[retry]
max_attempts = 3
in_process_retries = 1
backoff_min_ms = 5
backoff_max_ms = 10
delays_ms = [300]
[worker]
concurrency = 2
shutdown_grace_secs = 5
reconnect_give_up_secs = 60
[metrics]
address = "{metrics}"
"#,
        name = c.name,
        url = c.broker.url,
        addr = server.addr,
        tokenizer = common::model_dir().join("tokenizer.json").display(),
        store = c.store.path.display(),
    );
    let path = t.dir.path().join("openai-pipeline.toml");
    std::fs::write(&path, &text).expect("write pipeline file");
    let config = PipelineConfig::from_toml_str(&text, &path, t.dir.path(), |_| None)
        .expect("pipeline file is valid");
    (path, config)
}

/// GET /readyz on `addr`: its JSON body, or `None` while nothing answers.
async fn readyz(addr: &str) -> Option<Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET /readyz HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        serde_json::from_str(text.split("\r\n\r\n").nth(1)?).ok()
    };
    tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .ok()
        .flatten()
}

fn check_ok(body: &Option<Value>, check: &str) -> Option<bool> {
    body.as_ref()?["checks"][check]["ok"].as_bool()
}

/// `(consumers, ready, unacked)` of `queue` as the broker reports them.
fn queue_stats(queue: &str) -> (u64, u64, u64) {
    let out = common::rabbitmqctl(&[
        "-q",
        "list_queues",
        "name",
        "consumers",
        "messages_ready",
        "messages_unacknowledged",
    ]);
    for line in out.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() == 4 && f[0] == queue {
            let n = |s: &str| s.trim().parse::<u64>().expect("a count");
            return (n(f[1]), n(f[2]), n(f[3]));
        }
    }
    panic!("queue {queue} not listed:\n{out}");
}

/// Restores a node-wide `rabbit` application setting when dropped (also when a test fails).
struct BrokerEnv {
    key: &'static str,
    old: String,
}

impl BrokerEnv {
    /// Sets `rabbit`'s `key` to `value` (an Erlang term) and remembers the old value.
    fn set(key: &'static str, value: &str) -> Self {
        let old = common::rabbitmqctl(&["eval", &format!("application:get_env(rabbit, {key}).")]);
        common::rabbitmqctl(&[
            "eval",
            &format!("application:set_env(rabbit, {key}, {value})."),
        ]);
        BrokerEnv {
            key,
            old: old.trim().to_string(),
        }
    }
}

impl Drop for BrokerEnv {
    fn drop(&mut self) {
        let restore = match self
            .old
            .strip_prefix("{ok,")
            .and_then(|s| s.strip_suffix('}'))
        {
            Some(v) => format!("application:set_env(rabbit, {}, {v}).", self.key),
            None => format!("application:unset_env(rabbit, {}).", self.key),
        };
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["eval", &restore])
            .output();
    }
}

async fn submit_docs(config: &PipelineConfig, docs: &[rag_ingest::message::Document]) {
    let submitter = within("connect", Submitter::connect(config))
        .await
        .expect("RabbitMQ must be running");
    let results = within("submit", submitter.submit_all(docs, |_, _| {})).await;
    assert!(results.iter().all(Result::is_ok));
    within("close", submitter.close()).await;
}

/// Item 5: the broker closes the worker's connection while the embedder's breaker is open
/// (the worker is paused and polls nothing). The worker must notice at once, reconnect and
/// hold nothing while paused: no consumer and no unacked delivery on the queue, nothing
/// dead-lettered, every message still queued; `/readyz` names the missing consumer.
///
/// On the old code the worker kept its prefetched deliveries unacked while paused and did
/// not notice the closed connection until the breaker's next probe (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_connection_closed_while_paused_reconnects_and_holds_nothing() {
    let server = Embedder503::start(true).await;
    let t = TestPipeline::new("cf-paused", "");
    let metrics = free_addr();
    let (file, config) = openai_pipeline(&t, &server, 5, (2, 60_000), &metrics);
    let topology = Topology::new(&config);
    let docs = common::short_docs("acme", "paused", 20);
    submit_docs(&config, &docs).await;

    let worker = WorkerProcess::start(&file, false);
    eventually(Duration::from_secs(60), "the breaker open", || async {
        check_ok(&readyz(&metrics).await, "breakers") == Some(false)
    })
    .await;
    // Paused: no consumer, nothing held, everything queued (main queue or retry tier).
    eventually(
        Duration::from_secs(20),
        "no consumer and nothing unacked while paused",
        || async {
            let (consumers, _, unacked) = queue_stats(&topology.main_queue());
            consumers == 0 && unacked == 0 && common::pending(&config).await == 20
        },
    )
    .await;
    assert_eq!(
        check_ok(&readyz(&metrics).await, "consumer"),
        Some(false),
        "/readyz names the missing consumer"
    );

    let before = common::worker_connections(&config.name);
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(common::close_worker_connections(&config.name), 1);
    eventually(
        Duration::from_secs(15),
        "a new worker connection",
        || async {
            let now = common::worker_connections(&config.name);
            now.len() == 1 && now != before
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "/readyz broker ok again",
        || async { check_ok(&readyz(&metrics).await, "broker") == Some(true) },
    )
    .await;
    assert_eq!(queue_len(&topology.dlq()).await, 0, "nothing dead-lettered");
    assert_eq!(common::pending(&config).await, 20, "every message queued");

    worker.signal("TERM");
    let (status, log) = worker.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}\n{log}");
    assert_eq!(common::pending(&config).await, 20, "every message queued");
    assert_eq!(queue_len(&topology.dlq()).await, 0);
    t.delete_queues().await;
}

/// Item 5: an embedder outage longer than RabbitMQ's `consumer_timeout` (lowered to 4 s,
/// checked every 500 ms, for the outage only) with `delivery_limit = 1`: nothing is
/// dead-lettered, and once the embedder is back every document is stored.
///
/// On the old code the worker held 16 prefetched deliveries while the breaker was open; the
/// broker closed its channel (406 "delivery acknowledgement timed out") and returned them
/// with their delivery count incremented, so after two such closes they were dead-lettered
/// as `delivery_limit`.
///
/// Ignored by default: `consumer_timeout` is a node-wide setting, and channels other tests
/// open during the outage would get it too. Run with `--ignored` on a broker of your own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "lowers the broker's node-wide consumer_timeout for ~15 s"]
async fn faults_outage_longer_than_consumer_timeout_dead_letters_nothing() {
    let server = Embedder503::start(true).await;
    let t = TestPipeline::new("cf-ctimeout", "");
    let metrics = free_addr();
    let (file, config) = openai_pipeline(&t, &server, 1, (2, 1_000), &metrics);
    let topology = Topology::new(&config);
    let docs = common::short_docs("acme", "ctimeout", 20);
    submit_docs(&config, &docs).await;

    let started = Instant::now();
    let worker = {
        let _tick = BrokerEnv::set("channel_tick_interval", "500");
        let _timeout = BrokerEnv::set("consumer_timeout", "4000");
        let worker = WorkerProcess::start(&file, true);
        // The outage: three consumer timeouts long.
        while started.elapsed() < Duration::from_secs(15) {
            assert_eq!(
                queue_len(&topology.dlq()).await,
                0,
                "nothing dead-lettered during the outage:\n{}",
                worker.log()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            server.requests.load(Ordering::SeqCst) > 0,
            "the worker called the embedder"
        );
        worker
    };
    server.set_down(false);
    let (status, log) = worker.wait_exit(Duration::from_secs(180)).await;
    assert!(status.success(), "{status}\n{log}");
    assert_eq!(queue_len(&topology.dlq()).await, 0, "{log}");
    let fingerprint = rag_ingest::embed::Fingerprint {
        model: MODEL.into(),
        dims: 384,
        pooling: "mean".into(),
        normalized: true,
        sparse: None,
    };
    let store = rag_ingest::setup::open_store(&config, &fingerprint).expect("store opens");
    for doc in &docs {
        assert!(
            store
                .first_chunk(&doc.tenant, &doc.document_id)
                .await
                .expect("read")
                .is_some(),
            "{} stored\n{log}",
            doc.document_id
        );
    }
    t.delete_queues().await;
}

async fn channel() -> (lapin::Connection, Channel) {
    common::confirm_channel().await
}

fn headers(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.to_string()))
}

/// Item 6: a message the broker dead-lettered for its delivery limit shows
/// `delivery_limit`, even though an earlier delayed retry left `x-error-kind` on it, and
/// `reprocess --kind delivery_limit` finds it. (Old code: it showed the stale
/// `embedder_unavailable` and the kind filter missed it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_broker_delivery_limit_is_the_dlq_kind_over_a_stale_error_kind() {
    let t = TestPipeline::new("cf-dlkind", "");
    let topology = Topology::new(&t.config);
    let doc = &common::short_docs("acme", "dlkind", 1)[0];
    let props = Submitter::properties(doc).with_headers(headers(&[
        ("x-tenant-id", long("acme")),
        ("x-error-kind", long("embedder_unavailable")),
        ("x-attempts", AMQPValue::LongLongInt(1)),
    ]));
    let (conn, ch) = channel().await;
    within("declare", topology.declare(&conn, &ch))
        .await
        .expect("declare");
    within(
        "publish",
        publish_confirmed(
            &ch,
            rag_ingest::queue::EXCHANGE,
            topology.routing_key(),
            &doc.to_wire(),
            props,
        ),
    )
    .await
    .expect("published");
    // Return it until the broker's delivery limit dead-letters it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while queue_len(&topology.dlq()).await == 0 {
        assert!(Instant::now() < deadline, "never dead-lettered");
        if let Some(msg) = within(
            "get",
            ch.basic_get(topology.main_queue().into(), BasicGetOptions::default()),
        )
        .await
        .expect("get")
        {
            within(
                "nack",
                msg.delivery.acker.nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                }),
            )
            .await
            .expect("nack");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    common::close_quietly(conn).await;

    let filter = DlqFilter {
        kind: Some("delivery_limit".into()),
        ..DlqFilter::default()
    };
    let (summary, entries) = inspect_dlq(&t.config, &filter).await.expect("inspect");
    assert_eq!(summary.total, 1);
    assert_eq!(entries.len(), 1, "{:?}", summary.by_kind);
    assert_eq!(entries[0].kind, "delivery_limit");
    let report = reprocess(&t.config, &filter, false, |_| {})
        .await
        .expect("reprocess");
    assert_eq!(report.moved.total, 1);
    assert_eq!(queue_len(&topology.dlq()).await, 0);
    t.delete_queues().await;
}

/// Item 6: the DLQ selects by the body's tenant, and a `x-tenant-id` header that disagrees
/// with the body is itself an error (`invalid_field`), not stored. (Old code: the message
/// was stored, and `dlq --tenant` went by the header.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_tenant_header_disagreeing_with_the_body_is_invalid_field() {
    let t = TestPipeline::new("cf-tenant", "");
    let doc = &common::short_docs("acme", "liar", 1)[0];
    let props =
        Submitter::properties(doc).with_headers(headers(&[("x-tenant-id", long("globex"))]));
    let submitter = within("connect", Submitter::connect(&t.config))
        .await
        .expect("connect");
    within("submit", submitter.submit_raw(&doc.to_wire(), props))
        .await
        .expect("submitted");
    within("close", submitter.close()).await;

    let pipeline = t.pipeline();
    let store = Arc::clone(pipeline.store());
    let (timeout, grace) = (Duration::from_secs(60), Duration::from_millis(300));
    let report = common::drain(&t.config, pipeline, timeout, grace).await;
    assert_eq!((report.stored, report.dead_lettered), (0, 1), "{report:?}");
    assert!(
        store
            .first_chunk(&doc.tenant, &doc.document_id)
            .await
            .expect("read")
            .is_none()
    );
    let by = |tenant: &str| DlqFilter {
        tenant: Some(tenant.into()),
        ..DlqFilter::default()
    };
    let (_, acme) = inspect_dlq(&t.config, &by("acme")).await.expect("inspect");
    assert_eq!(acme.len(), 1);
    assert_eq!(acme[0].kind, "invalid_field");
    assert_eq!(acme[0].tenant.as_deref(), Some("acme"));
    let (_, globex) = inspect_dlq(&t.config, &by("globex"))
        .await
        .expect("inspect");
    assert!(globex.is_empty(), "the header's tenant selects nothing");
    t.delete_queues().await;
}

/// Item 9: the DLQ is declared with an explicit delivery limit (so inspecting it never
/// reaches RabbitMQ 4.x's default limit of 20), and a DLQ an earlier version declared
/// without one is still accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_dlq_has_an_explicit_delivery_limit_and_legacy_dlqs_still_work() {
    let t = TestPipeline::new("cf-dlqlimit", "");
    let topology = Topology::new(&t.config);
    let submitter = within("connect", Submitter::connect(&t.config))
        .await
        .expect("connect");
    within("close", submitter.close()).await;
    let args = common::rabbitmqctl(&["-q", "list_queues", "name", "arguments"]);
    let line = args
        .lines()
        .find(|l| l.split('\t').next() == Some(topology.dlq().as_str()))
        .expect("the DLQ is listed");
    assert!(
        line.contains("x-delivery-limit") && line.contains(&i32::MAX.to_string()),
        "{line}"
    );
    t.delete_queues().await;

    // A DLQ declared as earlier versions did (quorum, no limit).
    let legacy = TestPipeline::new("cf-dlqlegacy", "");
    let legacy_topology = Topology::new(&legacy.config);
    let (conn, ch) = channel().await;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("quorum"));
    within(
        "declare legacy",
        ch.queue_declare(
            legacy_topology.dlq().into(),
            QueueDeclareOptions::durable(),
            args,
        ),
    )
    .await
    .expect("legacy DLQ");
    common::close_quietly(conn).await;
    let submitter = within("connect", Submitter::connect(&legacy.config))
        .await
        .expect("a legacy DLQ is accepted");
    let doc = &common::short_docs("acme", "legacy", 1)[0];
    within("submit", submitter.submit(doc))
        .await
        .expect("submitted");
    within("close", submitter.close()).await;
    assert_eq!(queue_len(&legacy_topology.main_queue()).await, 1);
    legacy.delete_queues().await;
}

/// Item 6: a producer-set `x-attempts` does not make a failing message skip its retries:
/// a message whose processing fails transiently is retried `max_attempts` times even when
/// it arrives claiming `x-attempts = 2^63 - 1`. (Old code: dead-lettered at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_producer_set_attempts_do_not_skip_retries() {
    let server = Embedder503::start(true).await;
    let t = TestPipeline::new("cf-attempts", "");
    // A breaker that never opens: every call really fails (and counts an attempt).
    let (_, config) = openai_pipeline(&t, &server, 5, (1_000, 60_000), "");
    let doc = &common::short_docs("acme", "forged", 1)[0];
    let props = Submitter::properties(doc).with_headers(headers(&[
        ("x-tenant-id", long("acme")),
        ("x-attempts", AMQPValue::LongLongInt(i64::MAX)),
        ("x-reprocessed", AMQPValue::LongLongInt(i64::MAX)),
    ]));
    let submitter = within("connect", Submitter::connect(&config))
        .await
        .expect("connect");
    within("submit", submitter.submit_raw(&doc.to_wire(), props))
        .await
        .expect("submitted");
    within("close", submitter.close()).await;
    let pipeline = rag_ingest::setup::pipeline(&config)
        .await
        .expect("pipeline builds");
    let (timeout, grace) = (Duration::from_secs(60), Duration::from_millis(300));
    let report = common::drain(&config, pipeline, timeout, grace).await;
    assert_eq!(
        (report.retried, report.dead_lettered),
        (u64::from(config.retry.max_attempts) - 1, 1),
        "{report:?}"
    );
    let (_, entries) = inspect_dlq(&config, &DlqFilter::default())
        .await
        .expect("inspect");
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].attempts,
        Some(u64::from(config.retry.max_attempts))
    );
    t.delete_queues().await;
}
