//! `rag-ingest doctor`: one ✓/✗ line per check and a non-zero exit on any ✗.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{
    TestPipeline, output_within, qdrant_url_or_skip, write_pipeline_file,
    write_qdrant_pipeline_file,
};
use rag_ingest::embed::{Embedder, Fingerprint};
use rag_ingest::store::{EdgeStore, QdrantOptions, QdrantStore, ServerSupport};

fn doctor(t: &TestPipeline, env: &[(&str, String)]) -> (Output, String) {
    let file = write_pipeline_file(t);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rag-ingest"));
    cmd.args(["doctor", "--pipeline"]).arg(&file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Doctor bounds each check itself (CHECK_TIMEOUT); this only turns a hang into a failure.
    let out = output_within(&mut cmd, Duration::from_secs(300));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

#[tokio::test]
async fn a_healthy_pipeline_passes_every_check() {
    let t = TestPipeline::new("doctor-ok", "");
    let (out, stdout) = doctor(&t, &[]);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["config", "broker", "model", "store"] {
        assert!(
            stdout.contains(&format!("✓ {name}:")),
            "{name} missing:\n{stdout}"
        );
    }
    assert!(!stdout.contains('✗'), "{stdout}");
    t.delete_queues().await;
}

#[test]
fn a_wrong_amqp_url_fails_the_broker_check() {
    let t = TestPipeline::new("doctor-amqp", "");
    let (out, stdout) = doctor(
        &t,
        &[(
            "RAG_INGEST_AMQP_URL",
            "amqp://guest:Secret-9@127.0.0.1:1/%2f".into(),
        )],
    );
    assert!(!out.status.success());
    assert!(stdout.contains("✗ broker:"), "{stdout}");
    assert!(stdout.contains("fix:"), "{stdout}");
    assert!(!stdout.contains("Secret-9"), "password leaked: {stdout}");
}

#[test]
fn a_missing_model_fails_the_model_check() {
    let t = TestPipeline::new("doctor-model", "");
    let missing = t.dir.path().join("no-model");
    let (out, stdout) = doctor(
        &t,
        &[("RAG_INGEST_MODEL_DIR", missing.display().to_string())],
    );
    assert!(!out.status.success());
    assert!(stdout.contains("✗ model:"), "{stdout}");
    assert!(stdout.contains("scripts/fetch-model.sh"), "{stdout}");
}

#[tokio::test]
async fn a_collection_of_another_embedder_fails_the_store_check() {
    let t = TestPipeline::new("doctor-fp", "");
    let other = Fingerprint {
        model: "sentence-transformers/some-other-model".into(),
        dims: 384,
        pooling: "mean".into(),
        normalized: true,
        sparse: None,
    };
    drop(
        EdgeStore::open(&t.config.store.path, &t.config.store.collection, &other).expect("create"),
    );
    let (out, stdout) = doctor(&t, &[]);
    assert!(!out.status.success());
    assert!(stdout.contains("✓ model:"), "{stdout}");
    assert!(stdout.contains("✗ store:"), "{stdout}");
    assert!(stdout.contains("some-other-model"), "{stdout}");
    t.delete_queues().await;
}

/// A healthy run logs nothing at warn or error level: the lapin client used to log a
/// connection error on every run, because doctor dropped its channel (an asynchronous close)
/// right before closing the connection.
#[tokio::test]
async fn a_healthy_pipeline_logs_no_warning_or_error() {
    let t = TestPipeline::new("doctor-quiet", "");
    let file = write_pipeline_file(&t);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rag-ingest"));
    cmd.args(["--log-format", "json", "doctor", "--pipeline"])
        .arg(&file)
        // The default filter's qdrant_edge=error: qdrant-edge warns on every shard open that
        // its feature flags are unset, and it offers no way to set them.
        .env("RUST_LOG", "info,qdrant_edge=error");
    let out = output_within(&mut cmd, Duration::from_secs(300));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let mut lines = 0;
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        let level = event["level"].as_str().unwrap_or_default();
        assert!(
            level != "WARN" && level != "ERROR",
            "a healthy doctor run logged at {level}: {line}"
        );
        lines += 1;
    }
    assert!(
        lines > 0,
        "no log lines at info level: is --log-format json applied?"
    );
    t.delete_queues().await;
}

/// On a Qdrant server, the store check reads the server's version (the store refuses one
/// older than 1.16 and warns below 1.19) and names it; the tests' server (1.19 or later)
/// passes without a warning.
#[tokio::test]
async fn the_store_check_names_the_qdrant_servers_version() {
    let Some(url) = qdrant_url_or_skip("the_store_check_names_the_qdrant_servers_version") else {
        return;
    };
    let t = TestPipeline::new("doctor-qdrant", "");
    let key = std::env::var("QDRANT_API_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    let extra = if key.is_some() {
        "api_key_env = \"QDRANT_API_KEY\""
    } else {
        ""
    };
    let file = write_qdrant_pipeline_file(&t, &url, extra);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rag-ingest"));
    cmd.args(["doctor", "--pipeline"]).arg(&file);
    let out = output_within(&mut cmd, Duration::from_secs(300));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut options = QdrantOptions::new(&url);
    options.api_key = key.map(rag_ingest::secret::Secret::new);
    let fingerprint = rag_ingest::setup::collection_fingerprint(common::embedder().fingerprint());
    let store = QdrantStore::open(&options, &t.config.name, &fingerprint)
        .await
        .expect("the collection doctor created opens");
    let version = store
        .server_version()
        .expect("the server's version is read at open")
        .to_owned();
    assert_eq!(
        ServerSupport::of(&version),
        ServerSupport::Supported,
        "{version}"
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("✓ store:"))
        .unwrap_or_else(|| panic!("no passed store check:\n{stdout}"));
    assert!(line.contains(&version), "{line}");
    assert!(!stdout.contains("warning:"), "{stdout}");
    store.delete_collection().await.expect("delete collection");
    t.delete_queues().await;
}
