//! An existing queue declared with other arguments gives an error naming the queue, the
//! differing argument (the broker's words) and how to migrate.

mod common;

use std::time::Duration;

use common::{TestPipeline, close_quietly, within};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use rag_ingest::queue::{QueueError, Submitter, Topology};

#[tokio::test]
async fn a_queue_with_other_arguments_is_named_with_a_migration_hint() {
    let t = TestPipeline::new("topo", "");
    let main = Topology::new(&t.config).main_queue();
    let conn = common::connect().await;
    let ch = within("open a channel", conn.create_channel())
        .await
        .expect("channel");
    // A classic queue without the pipeline's arguments, as an older deployment might have.
    let declare = ch.queue_declare(
        main.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    );
    within("declare", declare)
        .await
        .expect("declare classic queue");
    close_quietly(conn).await;

    let err = match within("connect", Submitter::connect(&t.config)).await {
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

/// A peer that accepts the TCP connection but never answers the AMQP handshake (a stalled
/// broker, or another service on the port) gives a timeout error naming the URL, instead of
/// hanging the caller.
#[tokio::test]
async fn a_broker_that_never_answers_the_handshake_times_out_with_the_url() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a local port");
    let port = listener.local_addr().expect("local address").port();
    // Accept connections and hold them open without a byte of AMQP.
    let held = std::thread::spawn(move || listener.accept().map(|(socket, _)| socket));
    let url = format!("amqp://guest:secret@127.0.0.1:{port}/%2f");
    let err = match rag_ingest::queue::connect(
        &url,
        lapin::ConnectionProperties::default(),
        Duration::from_millis(300),
    )
    .await
    {
        Err(e) => e,
        Ok(_) => panic!("a silent peer cannot complete the handshake"),
    };
    assert!(matches!(err, QueueError::ConnectTimeout { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("127.0.0.1:{port}")),
        "names the URL: {text}"
    );
    assert!(!text.contains("secret"), "the password is redacted: {text}");
    assert!(
        held.join().expect("accept thread").is_ok(),
        "the client did reach the listener"
    );
}
