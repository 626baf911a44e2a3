//! An existing queue declared with other arguments gives an error naming the queue, the
//! differing argument (the broker's words) and how to migrate.

mod common;

use common::{TestPipeline, amqp_url};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use rag_ingest::queue::{QueueError, Submitter, Topology};

#[tokio::test]
async fn a_queue_with_other_arguments_is_named_with_a_migration_hint() {
    let t = TestPipeline::new("topo", "");
    let main = Topology::new(&t.config).main_queue();
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running");
    let ch = conn.create_channel().await.expect("channel");
    // A classic queue without the pipeline's arguments, as an older deployment might have.
    ch.queue_declare(
        main.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .expect("declare classic queue");
    let _ = conn.close(200, "bye".into()).await;

    let err = match Submitter::connect(&t.config).await {
        Err(e) => e,
        Ok(_) => panic!("declaring over a queue with other arguments must fail"),
    };
    assert!(
        matches!(err, QueueError::TopologyMismatch { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains(&main), "names the queue: {text}");
    assert!(
        text.contains("x-queue-type") || text.contains("x-dead-letter"),
        "names the argument: {text}"
    );
    assert!(
        text.contains("rabbitmqctl delete_queue"),
        "says how to migrate: {text}"
    );
    t.delete_queues().await;
}
