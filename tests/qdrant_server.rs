//! The Qdrant server store against servers of the tests' own, configured the ways production
//! servers are: an API key, TLS with a private CA, a request size limit below the client's
//! batch cap, and a restart in the middle of a run. Each test starts its own server (binary from
//! `QDRANT_BIN`, `PATH` or `../shared/bin/qdrant`) on free loopback ports and prints a loud
//! SKIPPED line and passes where there is none.

mod common;
#[path = "support/qdrant_server.rs"]
mod qdrant_server;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{TestPipeline, TestStore, WorkerProcess, embedder, short_docs};
use qdrant_server::{QdrantServer, ServerOptions};
use rag_ingest::config::ApiKey;
use rag_ingest::embed::Embedder;
use rag_ingest::queue::Topology;
use rag_ingest::setup;
use rag_ingest::store::{
    BatchLimits, ChunkPayload, ChunkPoint, QdrantOptions, QdrantStore, VectorStore, point_id,
};
use rag_ingest::tenant::TenantId;

const FAST: &str = "[retry]\nmax_attempts = 8\nin_process_retries = 2\nbackoff_min_ms = 50\nbackoff_max_ms = 500\ndelays_ms = [500, 1000, 2000]\n[worker]\nshutdown_grace_secs = 10\nreconnect_give_up_secs = 30\n";

/// A pipeline on `server`'s collection named after `test`.
fn pipeline_on(server: &QdrantServer, test: &str, extra: &str) -> TestPipeline {
    TestPipeline::on(
        TestStore::Qdrant {
            url: server.grpc_url(),
        },
        test,
        extra,
    )
}

/// A server with an API key: the right key works; a wrong key, or none, fails at once with
/// an error that names the environment variable to fix (never the key itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_server_takes_the_right_key_and_names_the_variable_for_a_wrong_one() {
    let key = format!("k-{}", uuid::Uuid::new_v4().simple());
    let options = ServerOptions::default().env("QDRANT__SERVICE__API_KEY", key.clone());
    let Some(server) = QdrantServer::start("api_key", options).await else {
        return;
    };
    let fingerprint = embedder().fingerprint().clone();
    let mut t = pipeline_on(&server, "api-key", "");
    let var = "RAG_INGEST_TEST_QDRANT_KEY";

    // A wrong key: refused, and the message says which variable holds it.
    t.config.store.qdrant.api_key_env = Some(var.to_owned());
    t.config.store.qdrant.api_key = Some(ApiKey::new("not-the-key"));
    let err = match setup::open_vector_store(&t.config, &fingerprint).await {
        Ok(_) => panic!("a wrong API key must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(var), "names the variable: {err}");
    assert!(
        err.contains("store.qdrant.api_key_env"),
        "names the field: {err}"
    );
    assert!(!err.contains("not-the-key"), "never shows the key: {err}");

    // No key at all: refused, and the message says how to configure one.
    t.config.store.qdrant.api_key_env = None;
    t.config.store.qdrant.api_key = None;
    let err = match setup::open_vector_store(&t.config, &fingerprint).await {
        Ok(_) => panic!("a server with an API key refuses requests without one"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("store.qdrant.api_key_env"), "{err}");

    // The right key: documents are stored and counted.
    t.config.store.qdrant.api_key_env = Some(var.to_owned());
    t.config.store.qdrant.api_key = Some(ApiKey::new(key.clone()));
    let pipeline = t.store_pipeline().await;
    let docs = short_docs("acme", "keyed", 3);
    for doc in &docs {
        pipeline
            .process(doc)
            .await
            .expect("stored with the right key");
    }
    for doc in &docs {
        assert_eq!(
            pipeline
                .store()
                .count(&doc.tenant, Some(&doc.document_id))
                .await
                .expect("count"),
            common::expected_chunks(&t.config, doc)
        );
    }
}

/// Runs `openssl` with `args` in `dir`; panics with its output if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    // Debian package openssl.
    common::run_ok(
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir),
    );
}

/// A private CA and a server certificate for 127.0.0.1/localhost signed by it, in `dir`:
/// `ca.pem`, `server.pem`, `server.key`; and `other-ca.pem`, a CA that signed nothing.
fn make_certificates(dir: &Path) {
    self_signed_ca(dir, "rag-ingest test CA", "ca");
    self_signed_ca(dir, "another CA", "other-ca");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("write san.ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
}

/// A self-signed CA named `cn` in `dir`: `<name>.pem` and its key `<name>.key`.
fn self_signed_ca(dir: &Path, cn: &str, name: &str) {
    let subject = format!("/CN={cn}");
    let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &subject,
            "-keyout", &key, "-out", &pem,
        ],
    );
}

/// Points of `collection` on a TLS server, counted over REST with the private CA.
fn count_over_tls(server: &QdrantServer, ca: &Path, collection: &str) -> Option<u64> {
    let out = std::process::Command::new("curl")
        .args(["-sf", "--max-time", "5", "--cacert"])
        .arg(ca)
        .args(["-X", "POST", "-H", "content-type: application/json", "-d"])
        .arg(r#"{"exact": true}"#)
        .arg(format!(
            "{}/collections/{collection}/points/count",
            server.http_url()
        ))
        .output()
        .ok()?;
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    body["result"]["count"].as_u64()
}

/// A server speaking TLS with a certificate from a private CA: the worker trusts it through
/// `SSL_CERT_FILE` (the client reads its trusted roots from there) and stores every document;
/// without that CA, `doctor` fails on the store instead of sending anything in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_with_a_private_ca_is_trusted_through_ssl_cert_file() {
    let certs = tempfile::tempdir().expect("temp dir");
    make_certificates(certs.path());
    let path = |name: &str| certs.path().join(name).display().to_string();
    let options = ServerOptions {
        tls: true,
        ..ServerOptions::default()
    }
    .env("QDRANT__SERVICE__ENABLE_TLS", "true")
    .env("QDRANT__TLS__CERT", path("server.pem"))
    .env("QDRANT__TLS__KEY", path("server.key"))
    .env("QDRANT__TLS__CA_CERT", path("ca.pem"));
    let Some(server) = QdrantServer::start("tls", options).await else {
        return;
    };
    assert!(server.grpc_url().starts_with("https://"));
    let t = pipeline_on(&server, "tls", FAST);
    let file = common::write_pipeline_file(&t);
    let docs = short_docs("acme", "tls", 6);
    common::submit(&t.config, &docs).await;

    // Trusting another CA only, the store check fails.
    let doctor = std::process::Command::new(env!("CARGO_BIN_EXE_rag-ingest"))
        .args(["doctor", "--pipeline"])
        .arg(&file)
        .env("SSL_CERT_FILE", path("other-ca.pem"))
        .output()
        .expect("doctor runs");
    assert!(
        !doctor.status.success(),
        "doctor must fail on an untrusted certificate:\n{}",
        String::from_utf8_lossy(&doctor.stdout)
    );

    let ca = path("ca.pem");
    let worker = WorkerProcess::start_with_env(&file, true, &[("SSL_CERT_FILE", &ca)]);
    let (status, log) = worker.wait_exit(Duration::from_secs(120)).await;
    assert!(status.success(), "{log}");
    let expected: usize = docs
        .iter()
        .map(|d| common::expected_chunks(&t.config, d))
        .sum();
    assert_eq!(
        count_over_tls(
            &server,
            certs.path().join("ca.pem").as_path(),
            &t.config.store.collection
        ),
        Some(expected as u64),
        "every chunk stored over TLS"
    );
    assert_eq!(common::pending(&t.config).await, 0);
    let dlq = Topology::new(&t.config).dlq();
    assert_eq!(common::queue_len(&dlq).await, 0, "nothing dead-lettered");
    t.delete_queues().await;
}

/// `n` synthetic chunks of `doc`, each with a `text_len`-byte text.
fn big_points(t: &TenantId, doc: &str, n: usize, text_len: usize) -> Vec<ChunkPoint> {
    let dims = embedder().fingerprint().dims;
    (0..n)
        .map(|i| {
            let mut vector = vec![0.0f32; dims];
            vector[i % dims] = 1.0;
            ChunkPoint {
                id: point_id(t, doc, i),
                vector,
                sparse: None,
                payload: ChunkPayload {
                    tenant_id: t.as_str().to_owned(),
                    document_id: doc.to_owned(),
                    version: Some(1),
                    chunk_index: i,
                    chunk_count: n,
                    text: format!("{i} {}", "x".repeat(text_len)),
                    byte_start: 0,
                    byte_end: 1,
                    content_sha256: "big".into(),
                    metadata: serde_json::Map::new(),
                    embedder: embedder().fingerprint().id(),
                    ingested_at: "2025-01-01T00:00:00Z".into(),
                    order: None,
                    tombstone: false,
                    context: None,
                    page: None,
                },
            }
        })
        .collect()
}

/// A server whose request limit (`service.max_request_size_mb` = 1) is below the client's
/// batch cap (16 MiB by default): Qdrant applies that limit to REST only, so a 3 MiB gRPC
/// upsert and a 2 MiB single point are taken, and every point is stored; with
/// `store.max_batch_bytes` below the size of the upsert it is split into several requests,
/// which store the same points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_the_servers_request_limit_is_stored_whole() {
    let options = ServerOptions::default().env("QDRANT__SERVICE__MAX_REQUEST_SIZE_MB", "1");
    let Some(server) = QdrantServer::start("request_limit", options).await else {
        return;
    };
    let fingerprint = embedder().fingerprint().clone();
    let t = TenantId::new("acme").expect("tenant");
    for (collection, max_bytes) in [("limits-default", None), ("limits-split", Some(256 * 1024))] {
        let mut options = QdrantOptions::new(server.grpc_url());
        if let Some(max_bytes) = max_bytes {
            options.limits = BatchLimits {
                max_points: 256,
                max_bytes,
            };
        }
        let store = QdrantStore::open(&options, collection, &fingerprint)
            .await
            .expect("open");
        store
            .upsert(big_points(&t, "big", 48, 64 * 1024))
            .await
            .expect("a 3 MiB upsert is taken");
        assert_eq!(store.count(&t, Some("big")).await.expect("count"), 48);
        if max_bytes.is_none() {
            store
                .upsert(big_points(&t, "huge", 1, 2 * 1024 * 1024))
                .await
                .expect("a 2 MiB point is taken over gRPC");
            assert_eq!(store.count(&t, Some("huge")).await.expect("count"), 1);
        }
    }
    // The limit is real on the REST API: the same request is taken small and refused at 2 MiB.
    let rest_put = |text_len: usize| {
        let body = format!(
            r#"{{"points":[{{"id":1,"vector":[{}],"payload":{{"text":"{}"}}}}]}}"#,
            vec!["0.1"; fingerprint.dims].join(","),
            "x".repeat(text_len)
        );
        let body_file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(body_file.path(), body).expect("write body");
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
            .args(["-H", "content-type: application/json", "--data-binary"])
            .arg(format!("@{}", body_file.path().display()))
            .arg(format!(
                "{}/collections/limits-default/points?wait=true",
                server.http_url()
            ))
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(rest_put(16), "200", "a small REST upsert is taken");
    let refused = rest_put(2 * 1024 * 1024);
    assert!(
        refused.starts_with('4'),
        "REST refuses a request over max_request_size_mb: {refused}"
    );
    drop(server);
}

/// The server is killed (SIGKILL) and restarted while a worker ingests: writes fail, are
/// retried, and every confirmed document ends up stored exactly once; nothing is
/// dead-lettered. Writes use `wait=true`, so what the worker acked survives the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_mid_run_loses_nothing_acked() {
    let Some(mut server) = QdrantServer::start("restart", ServerOptions::default()).await else {
        return;
    };
    let t = pipeline_on(&server, "restart", FAST);
    let file = common::write_pipeline_file(&t);
    let mut docs = short_docs("acme", "restart", 30);
    docs.extend(short_docs("globex", "restart", 30));
    common::submit(&t.config, &docs).await;

    let fingerprint = embedder().fingerprint().clone();
    let probe = Arc::new(
        setup::open_vector_store(&t.config, &fingerprint)
            .await
            .expect("store opens"),
    );
    let worker = WorkerProcess::start(&file, true);
    let acme = TenantId::new("acme").expect("tenant");
    common::eventually(Duration::from_secs(120), "some documents stored", || {
        let probe = Arc::clone(&probe);
        let acme = acme.clone();
        async move { probe.count(&acme, None).await.unwrap_or(0) >= 3 }
    })
    .await;
    server.kill();
    server.restart().await;

    let (status, log) = worker.wait_exit(Duration::from_secs(240)).await;
    assert!(status.success(), "{log}");
    for doc in &docs {
        assert_eq!(
            probe
                .count(&doc.tenant, Some(&doc.document_id))
                .await
                .expect("count"),
            common::expected_chunks(&t.config, doc),
            "{}/{} stored exactly once",
            doc.tenant,
            doc.document_id
        );
    }
    assert_eq!(common::pending(&t.config).await, 0, "queues drained");
    let dlq = Topology::new(&t.config).dlq();
    assert_eq!(common::queue_len(&dlq).await, 0, "nothing dead-lettered");
    t.delete_queues().await;
}
