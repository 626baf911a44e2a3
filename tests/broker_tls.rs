//! `amqps://` against a real RabbitMQ TLS listener with a self-signed certificate: a second
//! RabbitMQ node of the test's own on loopback (`scripts/rabbitmq-node.sh`, never the
//! machine's rabbit@localhost), a CA and server certificate made with the openssl CLI.
//!
//! With `broker.tls_ca_file` naming that CA, the submitter publishes with confirms over TLS
//! (the broker lists the connection as TLS) and the worker consumes and stores every document.
//! With another CA, or none, connecting fails at once with the certificate error instead of
//! hanging.

mod common;

#[path = "support/rabbitmq_node.rs"]
mod rabbitmq_node;

use std::error::Error as _;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{TestPipeline, within, write_pipeline_file};
use rabbitmq_node::{RabbitNode, make_certificates};
use rag_ingest::config::{ENV_AMQP_TLS_CA_FILE, ENV_AMQP_URL, PipelineConfig};
use rag_ingest::queue::{QueueError, Submitter};
use rag_ingest::store::VectorStore;

/// Loads `t`'s pipeline file with the broker URL and CA file given as environment overrides,
/// as an operator would set them.
fn tls_config(t: &TestPipeline, url: &str, ca: Option<&Path>) -> PipelineConfig {
    let file = write_pipeline_file(t);
    PipelineConfig::load_with_env(&file, |name| match name {
        ENV_AMQP_URL => Some(url.to_string()),
        ENV_AMQP_TLS_CA_FILE => ca.map(|p| p.display().to_string()),
        _ => None,
    })
    .expect("the amqps:// config is valid")
}

/// The rustls error at the bottom of `err`, if any.
fn tls_cause(err: &QueueError) -> Option<&rustls::Error> {
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // io::Error's `source` skips the error it wraps: look inside it too.
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        source = e.source();
    }
    None
}

/// Connecting with `config` fails quickly with an untrusted-certificate error.
async fn assert_untrusted(config: &PipelineConfig, what: &str) {
    let started = Instant::now();
    let err = match within(what, Submitter::connect(config)).await {
        Ok(_) => panic!("{what}: a certificate from an unknown CA must not be trusted"),
        Err(e) => e,
    };
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{what}: failed only after {:?}",
        started.elapsed()
    );
    assert!(matches!(err, QueueError::Connect { .. }), "{what}: {err:?}");
    assert!(
        matches!(
            tls_cause(&err),
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))
        ),
        "{what}: the cause is the untrusted certificate: {err:?}"
    );
    assert!(
        !err.to_string().contains("guest:guest"),
        "password redacted: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_self_signed_certificate_round_trips_and_untrusted_ones_fail_fast() {
    let state = tempfile::tempdir().expect("temp dir");
    let certs = state.path().join("certs");
    let other_ca = state.path().join("other-ca");
    make_certificates(&certs);
    make_certificates(&other_ca);
    let name = format!(
        "rag-tls-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let node = RabbitNode::start(&name, &state.path().join("node"), Some(&certs));
    let tls_port = node.tls_port.expect("TLS listener");
    // 127.0.0.1 is checked against the certificate's IP SAN.
    let url = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f");

    let t = TestPipeline::new("tls", "");
    let config = tls_config(&t, &url, Some(&certs.join("ca.pem")));
    assert_eq!(config.broker.urls(), [url.as_str()]);

    // Submit with confirms over TLS; the broker sees a TLS connection.
    let docs = common::short_docs("acme", "tls", 5);
    let submitter = within("connect over amqps", Submitter::connect(&config))
        .await
        .expect("connects over amqps with the CA file");
    let connections = node.ctl(&["-q", "list_connections", "port", "ssl", "ssl_protocol"]);
    assert!(
        connections
            .lines()
            .any(|l| l.starts_with(&format!("{tls_port}\ttrue\ttlsv1."))),
        "the broker lists a TLS connection on {tls_port}: {connections}"
    );
    let results = within("submit over amqps", submitter.submit_all(&docs, |_, _| {})).await;
    assert!(
        results.iter().all(Result::is_ok),
        "every document confirmed: {results:?}"
    );
    within("close", submitter.close()).await;

    // The worker consumes over TLS and stores every document.
    let pipeline = t.pipeline();
    let store = std::sync::Arc::clone(pipeline.store());
    let (timeout, grace) = (Duration::from_secs(60), Duration::from_millis(300));
    let report = common::drain(&config, pipeline, timeout, grace).await;
    assert_eq!(report.stored, docs.len() as u64, "{report:?}");
    for doc in &docs {
        let count = store
            .count(&doc.tenant, Some(&doc.document_id))
            .await
            .expect("count");
        assert_eq!(
            count,
            common::expected_chunks(&config, doc),
            "{}: one point per chunk",
            doc.document_id
        );
    }

    // Another CA, or only the system's trust store: a clear error, at once.
    assert_untrusted(
        &tls_config(&t, &url, Some(&other_ca.join("ca.pem"))),
        "wrong CA",
    )
    .await;
    assert_untrusted(&tls_config(&t, &url, None), "no CA file").await;
    drop(node);
}
