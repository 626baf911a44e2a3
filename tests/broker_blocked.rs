//! A broker that stops confirming must not hang a publisher: a RabbitMQ node of the test's
//! own (`scripts/rabbitmq-node.sh`, never the machine's rabbit@localhost) is put under a
//! memory alarm, which blocks every publishing connection until it clears. A confirmed publish
//! then fails with [`QueueError::ConfirmTimeout`] after its deadline instead of waiting
//! forever; once the alarm clears, the broker takes the held message (it was not lost, which
//! is why callers keep their original and treat the publish as not sent).

mod common;

#[path = "support/rabbitmq_node.rs"]
mod rabbitmq_node;

use std::time::{Duration, Instant};

use common::{TestPipeline, write_pipeline_file};
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rabbitmq_node::RabbitNode;
use rag_ingest::config::{ENV_AMQP_URL, PipelineConfig};
use rag_ingest::queue::{QueueError, Submitter, publish_confirmed_within};

/// The message count of `queue` as the broker reports it.
async fn message_count(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the queue exists")
        .message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_broker_does_not_confirm_fails_after_its_deadline_and_is_not_lost() {
    let state = tempfile::tempdir().expect("temp dir");
    let name = format!(
        "rag-blocked-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let node = RabbitNode::start(&name, &state.path().join("node"), None);
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", node.amqp_port);
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connects to the test's node");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let queue = format!("blocked-{name}");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
    let deadline = Duration::from_secs(3);
    // A submitter of a pipeline on the same node, connected before the alarm.
    let t = TestPipeline::new("blocked", "");
    let file = write_pipeline_file(&t);
    let config =
        PipelineConfig::load_with_env(&file, |name| (name == ENV_AMQP_URL).then(|| url.clone()))
            .expect("the pipeline file is valid");
    let submitter = Submitter::connect(&config)
        .await
        .expect("connects to the test's node")
        .with_confirm_timeout(deadline);
    let publish = || {
        publish_confirmed_within(
            &channel,
            "",
            &queue,
            b"held",
            BasicProperties::default(),
            deadline,
        )
    };

    // Unblocked, the node confirms.
    publish().await.expect("confirmed before the alarm");
    assert_eq!(message_count(&channel, &queue).await, 1);

    // A memory limit of one byte raises the alarm on the node's next memory check.
    node.ctl(&["set_vm_memory_high_watermark", "absolute", "1"]);
    let until = Instant::now() + Duration::from_secs(30);
    while !node
        .ctl(&["eval", "rabbit_alarm:get_alarms()."])
        .contains("resource_limit")
    {
        assert!(Instant::now() < until, "the memory alarm was not raised");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Blocked: the publish fails after its deadline, with the target and the time waited. The
    // outer limit only keeps a hang (the old behaviour) from stalling the suite.
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(60), publish())
        .await
        .expect("the publish returned instead of waiting for the confirm forever");
    let waited = started.elapsed();
    match result {
        Err(QueueError::ConfirmTimeout { target, secs }) => {
            assert_eq!(secs, 3);
            assert!(target.contains(&queue), "{target}");
        }
        other => panic!("expected a confirm timeout, got {other:?}"),
    }
    assert!(waited >= deadline, "failed before its deadline: {waited:?}");

    // A batch gets one deadline, not one per document: all fail after about one deadline.
    let docs = common::short_docs("acme", "blocked", 5);
    let started = Instant::now();
    let results = tokio::time::timeout(
        Duration::from_secs(60),
        submitter.submit_all(&docs, |_, _| {}),
    )
    .await
    .expect("submit_all returned instead of waiting for confirms forever");
    let waited = started.elapsed();
    assert_eq!(results.len(), docs.len());
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(QueueError::ConfirmTimeout { secs: 3, .. }))),
        "every document reported as not confirmed in time: {results:?}"
    );
    assert!(
        waited >= deadline && waited < 3 * deadline,
        "one deadline for the batch, not one per document: {waited:?}"
    );

    // Cleared, the broker takes the held message: the publish was late, not lost. The
    // connection was blocked, so the count is read on a fresh one.
    node.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    let fresh = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connects after the alarm");
    let other = fresh.create_channel().await.expect("channel");
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let count = message_count(&other, &queue).await;
        if count == 2 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the held message did not arrive after the alarm cleared ({count} queued)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the first connection publishes again.
    publish().await.expect("confirmed after the alarm");
}
