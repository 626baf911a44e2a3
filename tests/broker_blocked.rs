//! A broker that stops confirming must not hang a publisher: a RabbitMQ node of the test's
//! own (`scripts/rabbitmq-node.sh`, never the machine's rabbit@localhost) is put under a
//! memory alarm, which blocks every publishing connection until it clears. A confirmed publish
//! then fails with [`QueueError::ConfirmTimeout`] after its deadline instead of waiting
//! forever; once the alarm clears, the broker takes the held message (it was not lost, which
//! is why callers keep their original and treat the publish as not sent), and `reprocess`
//! stops with that error, its dead letter kept. A worker process
//! under the same alarm keeps every message: the copy it could not get confirmed leaves its
//! delivery with the broker, and once the alarm clears everything is settled.

mod common;

#[path = "support/rabbitmq_node.rs"]
mod rabbitmq_node;

use std::time::{Duration, Instant};

use common::{
    DEAD_LETTERED, Event, TestPipeline, WorkerProcess, final_count, short_docs, write_pipeline_file,
};
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rabbitmq_node::RabbitNode;
use rag_ingest::config::{ENV_AMQP_URL, PipelineConfig};
use rag_ingest::queue::{
    DlqFilter, QueueError, Submitter, Topology, inspect_dlq, publish_confirmed_within, reprocess,
};

/// A RabbitMQ node of the test's own, named `prefix-<random>`, with its state under `dir`:
/// the node, its AMQP URL and its name.
fn own_node(prefix: &str, dir: &std::path::Path) -> (RabbitNode, String, String) {
    let name = format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let node = RabbitNode::start(&name, &dir.join("node"), None);
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", node.amqp_port);
    (node, url, name)
}

/// Raises a memory alarm on `node` (a limit of one byte, hit on its next memory check) and
/// waits until the node reports it.
async fn raise_memory_alarm(node: &RabbitNode) {
    node.ctl(&["set_vm_memory_high_watermark", "absolute", "1"]);
    let until = Instant::now() + Duration::from_secs(30);
    while !node
        .ctl(&["eval", "rabbit_alarm:get_alarms()."])
        .contains("resource_limit")
    {
        assert!(Instant::now() < until, "the memory alarm was not raised");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Messages in `queue` on `node`, ready and unacknowledged together, as of the node's last
/// statistics (refreshed every few seconds: poll).
fn held_messages(node: &RabbitNode, queue: &str) -> u64 {
    node.ctl(&[
        "list_queues",
        "--quiet",
        "--no-table-headers",
        "name",
        "messages",
    ])
    .lines()
    .filter_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next() == Some(queue)).then(|| fields.next()?.parse::<u64>().ok())?
    })
    .sum()
}

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
    let (node, url, name) = own_node("rag-blocked", state.path());
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
    // A dead letter for `reprocess` to replay under the alarm.
    let dlq = Topology::new(&config).dlq();
    publish_confirmed_within(
        &channel,
        "",
        &dlq,
        b"dead",
        BasicProperties::default(),
        deadline,
    )
    .await
    .expect("confirmed before the alarm");

    raise_memory_alarm(&node).await;

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

    // `reprocess` under the alarm: its replay is not confirmed, so it stops with the deadline's
    // error (after handing back what it held, within bounded waits) instead of hanging.
    let mut replaying = config.clone();
    replaying.broker.confirm_timeout_ms = 3_000;
    let replayed = tokio::time::timeout(
        Duration::from_secs(60),
        reprocess(&replaying, &DlqFilter::default(), false, |_| {}),
    )
    .await
    .expect("reprocess returned instead of hanging under the alarm");
    assert!(
        matches!(replayed, Err(QueueError::ConfirmTimeout { secs: 3, .. })),
        "{replayed:?}"
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
    // The dead letter `reprocess` could not replay is back in the DLQ.
    let until = Instant::now() + Duration::from_secs(30);
    while message_count(&other, &dlq).await != 1 {
        assert!(
            Instant::now() < until,
            "the dead letter did not return to the DLQ after the alarm cleared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the first connection publishes again.
    publish().await.expect("confirmed after the alarm");
}

/// A worker that must publish a copy (here: a bad message's DLQ copy) while the broker is
/// under a memory alarm does not wait for the confirm forever: after
/// `broker.confirm_timeout_ms` the delivery is left with the broker (`settle_failed`) and the
/// worker reconnects, storing what needs no publish meanwhile. Once the alarm clears the bad
/// message reaches the DLQ with its reason and nothing stays queued or unacked: nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_under_a_memory_alarm_keeps_every_message_and_settles_them_when_it_clears() {
    let state = tempfile::tempdir().expect("temp dir");
    let (node, url, _) = own_node("rag-blocked-worker", state.path());
    let mut t = TestPipeline::new(
        "blocked-worker",
        "[worker]\nshutdown_grace_secs = 5\nreconnect_give_up_secs = 120\n",
    );
    t.config.broker.url = url;
    t.config.broker.confirm_timeout_ms = 1_500;
    let file = write_pipeline_file(&t);

    // Before the alarm: good documents and one message that is not JSON (it can only be
    // settled by a confirmed DLQ copy).
    let good = short_docs("acme", "blocked", 3);
    let submitter = Submitter::connect(&t.config)
        .await
        .expect("connects to the test's node");
    for result in submitter.submit_all(&good, |_, _| {}).await {
        result.expect("confirmed before the alarm");
    }
    submitter
        .submit_raw(b"{not json", BasicProperties::default())
        .await
        .expect("confirmed before the alarm");
    submitter.close().await;
    let topology = Topology::new(&t.config);
    let (main, dlq) = (topology.main_queue(), topology.dlq());
    // The node's queue figures are statistics, refreshed every few seconds: polled.
    let until = Instant::now() + Duration::from_secs(30);
    while held_messages(&node, &main) != 4 {
        assert!(
            Instant::now() < until,
            "the 4 messages never showed in {main}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    raise_memory_alarm(&node).await;
    let mut worker = WorkerProcess::start(&file, false);
    // What needs no publish goes on: the documents are stored under the alarm.
    worker.wait_stored(good.len()).await;
    // The DLQ copy is not confirmed: after its deadline the worker gives the delivery back
    // and reconnects, instead of hanging on the confirm.
    let settle_failed = Event {
        name: "settle_failed",
        fields: &[],
    };
    worker
        .wait_until(
            "a publish the blocked broker did not confirm",
            Duration::from_secs(60),
            Duration::from_millis(100),
            |w| w.count(&settle_failed) >= 1,
        )
        .await;
    assert_eq!(
        held_messages(&node, &dlq),
        0,
        "nothing confirmed under the alarm"
    );

    node.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    // Cleared: the bad message is dead-lettered and nothing is left queued or unacked.
    worker
        .wait_until(
            "the DLQ copy after the alarm cleared",
            Duration::from_secs(90),
            Duration::from_millis(200),
            |w| w.count(&DEAD_LETTERED) >= 1,
        )
        .await;
    let until = Instant::now() + Duration::from_secs(90);
    while held_messages(&node, &main) > 0 || held_messages(&node, &dlq) == 0 {
        assert!(
            Instant::now() < until,
            "messages left in {main} ({}) or none in the DLQ after the alarm cleared",
            held_messages(&node, &main)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.signal("TERM");
    let (status, output) = worker.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "the worker exits cleanly: {output}");
    assert!(
        final_count(&output, "reconnects") >= 1,
        "the unconfirmed publish ended the session: {output}"
    );
    assert!(
        final_count(&output, "stored") + final_count(&output, "unchanged") >= good.len() as u64,
        "{output}"
    );

    // The DLQ holds the bad message with its reason. A copy the broker held during the alarm
    // may arrive besides the one published after the redelivery: at least once, at most twice.
    let (summary, entries) = inspect_dlq(&t.config, &DlqFilter::default())
        .await
        .expect("inspect the DLQ");
    assert!((1..=2).contains(&summary.total), "{summary:?}");
    for entry in &entries {
        assert_eq!(entry.body, b"{not json");
        assert_eq!(entry.kind, "invalid_json");
    }
    assert_eq!(held_messages(&node, &main), 0);
}
