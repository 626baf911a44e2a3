//! The operations endpoint of a real worker process: `/metrics` counters and histograms move
//! by the right amounts when documents are ingested; `/healthz` answers; `/readyz` turns 503
//! naming the broker while the broker is unreachable and 200 again once it is back. Also:
//! secrets never appear in logs, and docker-compose.yml has the expected structure.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{TestPipeline, WorkerProcess, eventually, expected_chunks, short_docs};
use rag_ingest::queue::Submitter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A plain HTTP/1.0 GET; returns (status, body), or None if nothing answers.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// The sum of every sample of `name` whose labels contain all of `labels`.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A TCP proxy to RabbitMQ that the test can cut and restore. It keeps its listener (bound
/// to a port the OS picks) for its whole life, so a restore never has to bind again: while
/// cut, every proxied connection is closed and new ones are closed as soon as accepted.
struct BrokerProxy {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
    _task: JoinHandle<()>,
}

impl BrokerProxy {
    async fn start() -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("proxy binds");
        let port = listener.local_addr().expect("proxy address").port();
        let (cut, mut cuts) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut links = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else {
                            break;
                        };
                        if *cuts.borrow() {
                            continue; // dropped: the connection closes at once
                        }
                        links.spawn(async move {
                            if let Ok(mut outbound) = TcpStream::connect("127.0.0.1:5672").await {
                                let _ =
                                    tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            }
                        });
                    }
                    changed = cuts.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        if *cuts.borrow() {
                            links.abort_all();
                        }
                    }
                }
            }
        });
        BrokerProxy {
            port,
            cut,
            _task: task,
        }
    }

    /// Closes every proxied connection and refuses new ones until [`BrokerProxy::restore`].
    fn cut(&self) {
        let _ = self.cut.send(true);
    }

    /// Proxies new connections again.
    fn restore(&self) {
        let _ = self.cut.send(false);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_and_readiness_follows_the_broker() {
    let proxy = BrokerProxy::start().await;
    let proxy_port = proxy.port;
    let metrics_port = free_port();
    let extra = format!(
        "[metrics]\naddress = \"127.0.0.1:{metrics_port}\"\n[worker]\nreconnect_give_up_secs = 120"
    );
    let mut t = TestPipeline::new("ops", &extra);
    let direct_url = t.config.broker.url.clone();
    t.config.broker.url = format!("amqp://guest:guest@127.0.0.1:{proxy_port}/%2f");
    let file = common::write_pipeline_file(&t);
    let addr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().expect("addr");

    let mut worker = WorkerProcess::start(&file, false);
    eventually(Duration::from_secs(60), "/readyz 200", || async {
        matches!(get(addr, "/readyz").await, Some((200, _)))
    })
    .await;
    let (status, body) = get(addr, "/healthz").await.expect("healthz answers");
    assert_eq!(status, 200, "{body}");
    let (_, before) = get(addr, "/metrics").await.expect("metrics answer");
    let stored_before = sample(
        &before,
        "rag_ingest_messages_total",
        &["outcome=\"stored\""],
    );

    let docs = short_docs("acme", "ops", 6);
    let chunks: usize = docs.iter().map(|d| expected_chunks(&t.config, d)).sum();
    let mut submit_config = t.config.clone();
    submit_config.broker.url = direct_url;
    let submitter = Submitter::connect(&submit_config)
        .await
        .expect("RabbitMQ must be running");
    assert!(
        submitter
            .submit_all(&docs, |_, _| {})
            .await
            .iter()
            .all(Result::is_ok)
    );
    submitter.close().await;
    worker.wait_stored(docs.len()).await;

    let wanted = stored_before + docs.len() as f64;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let body = get(addr, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default();
        if sample(&body, "rag_ingest_messages_total", &["outcome=\"stored\""]) >= wanted {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stored counter never reached {wanted}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pipeline_label = format!("pipeline=\"{}\"", t.config.name);
    assert_eq!(
        sample(
            &after,
            "rag_ingest_messages_total",
            &["outcome=\"stored\"", &pipeline_label]
        ) - stored_before,
        docs.len() as f64,
        "{after}"
    );
    assert_eq!(
        sample(&after, "rag_ingest_chunks_embedded_total", &[])
            - sample(&before, "rag_ingest_chunks_embedded_total", &[]),
        chunks as f64
    );
    assert!(
        sample(
            &after,
            "rag_ingest_tokens_embedded_total",
            &["tenant=\"acme\""]
        ) > 0.0,
        "{after}"
    );
    assert!(
        sample(&after, "rag_ingest_embed_seconds_count", &[]) >= 1.0,
        "{after}"
    );
    assert!(
        sample(&after, "rag_ingest_store_seconds_count", &["op=\"upsert\""]) >= docs.len() as f64,
        "{after}"
    );
    // Every embedded text went through a forward pass: at least one pass, holding at least
    // each text's [CLS] and [SEP].
    let passes = sample(&after, "rag_ingest_forward_pass_tokens_count", &[])
        - sample(&before, "rag_ingest_forward_pass_tokens_count", &[]);
    let pass_tokens = sample(&after, "rag_ingest_forward_pass_tokens_sum", &[])
        - sample(&before, "rag_ingest_forward_pass_tokens_sum", &[]);
    assert!(passes >= 1.0, "{after}");
    assert!(
        pass_tokens >= 2.0 * chunks as f64,
        "{pass_tokens} tokens\n{after}"
    );
    assert!(
        sample(&after, "rag_ingest_forward_pass_seconds_count", &[]) >= passes,
        "{after}"
    );
    assert!(
        sample(&after, "rag_ingest_last_success_timestamp_seconds", &[]) > 1.0e9,
        "{after}"
    );
    assert_eq!(sample(&after, "rag_ingest_dead_lettered_total", &[]), 0.0);

    // The broker becomes unreachable: readiness names it.
    proxy.cut();
    eventually(
        Duration::from_secs(30),
        "/readyz 503 naming the broker",
        || async {
            match get(addr, "/readyz").await {
                Some((503, body)) => {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    v["checks"]["broker"]["ok"] == false && v["checks"]["store"]["ok"] == true
                }
                _ => false,
            }
        },
    )
    .await;
    let (status, _) = get(addr, "/healthz").await.expect("still alive");
    assert_eq!(status, 200);

    // The broker comes back: ready again.
    proxy.restore();
    eventually(
        Duration::from_secs(60),
        "/readyz 200 after the broker is back",
        || async { matches!(get(addr, "/readyz").await, Some((200, _))) },
    )
    .await;

    worker.signal("TERM");
    let (status, log) = worker.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{log}");
    t.delete_queues().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    let secret = "S3cret-Pa55-do-not-log";
    let mut t = TestPipeline::new("secrets", "[worker]\nreconnect_give_up_secs = 1");
    t.config.broker.url = format!("amqp://guest:{secret}@127.0.0.1:1/%2f");
    let file = common::write_pipeline_file(&t);
    for format in ["text", "json"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rag-ingest"))
            .args(["--log-format", format, "worker", "--pipeline"])
            .arg(&file)
            .env("RUST_LOG", "debug")
            .output()
            .expect("runs");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success(),
            "an unreachable broker past the give-up time is an error"
        );
        assert!(
            all.contains("guest:***@127.0.0.1:1"),
            "the redacted URL is shown: {all}"
        );
        assert!(
            !all.contains(secret),
            "the password leaked in {format} logs"
        );
    }
}

#[test]
fn docker_compose_names_rabbitmq_qdrant_and_the_worker() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-compose.yml");
    let text = std::fs::read_to_string(&path).expect("docker-compose.yml");
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).expect("valid YAML");
    let services = &docs[0]["services"];
    for name in ["rabbitmq", "qdrant", "worker"] {
        assert!(!services[name].is_badvalue(), "service {name} missing");
        assert!(
            !services[name]["healthcheck"].is_badvalue(),
            "service {name} has no healthcheck"
        );
    }
    assert!(
        services["rabbitmq"]["image"]
            .as_str()
            .is_some_and(|i| i.contains("management"))
    );
    assert_eq!(
        services["worker"]["build"]["dockerfile"].as_str(),
        Some("deploy/Dockerfile")
    );
    let pipeline = services["worker"]["command"]
        .as_vec()
        .and_then(|c| {
            c.iter()
                .filter_map(|v| v.as_str())
                .find(|s| s.ends_with(".toml"))
                .map(str::to_owned)
        })
        .expect("the worker names its pipeline");
    let local = pipeline.replace("/etc/rag-ingest/", "");
    let config = rag_ingest::config::PipelineConfig::load_with_env(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(&local),
        |_| None,
    )
    .expect("the compose pipeline is valid");
    assert!(
        config.broker.url.contains("@rabbitmq:5672"),
        "{}",
        config.broker.url
    );
    assert_eq!(config.store.kind, rag_ingest::config::StoreKind::Qdrant);
    assert!(!docs[0]["volumes"].is_badvalue(), "named volumes");
    assert!(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/Dockerfile")
            .is_file()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_store_while_it_fails_its_probe() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use rag_ingest::health::{self, Health};
    use rag_ingest::store::{StoreError, VectorStore};

    let t = TestPipeline::new("ready-store", "");
    let store = Arc::new(
        rag_ingest::setup::open_store(
            &t.config,
            rag_ingest::embed::Embedder::fingerprint(&*common::embedder()),
        )
        .expect("store opens"),
    );
    // The store "goes away": the probe's real store call is replaced by an I/O failure.
    let down = Arc::new(AtomicBool::new(false));
    let health = Health::new();
    health.set_broker_connected(true);
    health.set_consuming(true);
    health.set_model_loaded(true);
    let (probe_store, probe_down) = (Arc::clone(&store), Arc::clone(&down));
    health.set_store_probe(Arc::new(move || {
        let (store, down) = (Arc::clone(&probe_store), Arc::clone(&probe_down));
        Box::pin(async move {
            if down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("disk unreachable".into()).to_string());
            }
            let tenant = rag_ingest::tenant::TenantId::new("probe").map_err(|e| e.to_string())?;
            store
                .count(&tenant, None)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }));
    let handle = rag_ingest::telemetry::metrics_handle("ready-store").expect("recorder");
    let addr = health::serve("127.0.0.1:0".parse().expect("addr"), health, handle)
        .await
        .expect("serves");

    assert_eq!(get(addr, "/readyz").await.map(|(s, _)| s), Some(200));
    down.store(true, Ordering::SeqCst);
    let (status, body) = get(addr, "/readyz").await.expect("answers");
    assert_eq!(status, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["checks"]["store"]["ok"], false, "{body}");
    assert!(
        v["checks"]["store"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("disk unreachable")),
        "{body}"
    );
    assert_eq!(v["checks"]["broker"]["ok"], true, "{body}");
    down.store(false, Ordering::SeqCst);
    assert_eq!(get(addr, "/readyz").await.map(|(s, _)| s), Some(200));
}

/// Every family is described and has a series as soon as the worker serves `/metrics`, so
/// alerts on rates (`rate(rag_ingest_dead_lettered_total[5m])`) work before the first event.
/// `rag_ingest_breaker_open` has one series per circuit breaker, from its creation: the
/// local model has none (`embed_openai` covers the remote embedder's);
/// `rag_ingest_tenant_budget_remaining_tokens` one per budgeted tenant once its budget was
/// read: this pipeline has no budgets (`fairness` covers them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_family_is_described_and_present_at_start() {
    let metrics_port = free_port();
    let extra = format!("[metrics]\naddress = \"127.0.0.1:{metrics_port}\"");
    let t = TestPipeline::new("ops-families", &extra);
    let file = common::write_pipeline_file(&t);
    let addr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().expect("addr");
    let worker = WorkerProcess::start(&file, false);
    eventually(Duration::from_secs(60), "/metrics answers", || async {
        matches!(get(addr, "/metrics").await, Some((200, _)))
    })
    .await;
    let (_, body) = get(addr, "/metrics").await.expect("metrics answer");
    let mut missing = Vec::new();
    let names = rag_ingest::telemetry::names::ALL;
    for name in names.iter().filter(|n| {
        ![
            rag_ingest::telemetry::names::BREAKER_OPEN,
            rag_ingest::telemetry::names::BUDGET_REMAINING,
            // Set when the model has loaded, checked below.
            rag_ingest::telemetry::names::EMBEDDER_PRECISION,
        ]
        .contains(*n)
    }) {
        let described = body.contains(&format!("# HELP {name} "));
        let has_series = body.lines().any(|l| {
            !l.starts_with('#')
                && (l.starts_with(&format!("{name}{{"))
                    || l.starts_with(&format!("{name}_count{{"))
                    || l.starts_with(&format!("{name} ")))
        });
        if !(described && has_series) {
            missing.push(format!(
                "{name} (described: {described}, series: {has_series})"
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "families missing at start: {missing:?}\n{body}"
    );
    // Once the model is loaded, the precision it runs in (the default asks for `auto`).
    let precision = rag_ingest::telemetry::names::EMBEDDER_PRECISION;
    eventually(Duration::from_secs(120), "the precision gauge", || async {
        get(addr, "/metrics").await.is_some_and(|(_, body)| {
            body.lines().any(|l| {
                l.starts_with(&format!("{precision}{{"))
                    && l.contains("requested=\"auto\"")
                    && ["bf16", "int16", "f32"]
                        .iter()
                        .any(|p| l.contains(&format!("running=\"{p}\"")))
                    && l.ends_with(" 1")
            })
        })
    })
    .await;
    for kind in rag_ingest::error::ErrorKind::ALL {
        assert!(
            body.lines()
                .any(|l| l.starts_with("rag_ingest_dead_lettered_total{")
                    && l.contains(&format!("kind=\"{kind}\""))),
            "no zero series for dead-lettered kind {kind}:\n{body}"
        );
    }
    assert_eq!(
        sample(&body, "rag_ingest_messages_total", &[]),
        0.0,
        "{body}"
    );
    worker.signal("TERM");
    let (status, log) = worker.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{log}");
    t.delete_queues().await;
}
