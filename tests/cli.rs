//! The real binary: argument and config errors are named; submit, worker and search work
//! together through RabbitMQ.

mod common;

use std::process::Command;

use common::{TestPipeline, run_ok};

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
            .args(["worker", "--exit-when-idle", "--pipeline"])
            .arg(&path),
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stored=4"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

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
    let exists = common::within("inspect the queue", declare).await;
    assert!(exists.is_err(), "a dry run must not touch the broker");
}
