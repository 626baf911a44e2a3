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
        &rag_ingest::queue::BrokerTls::default(),
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

/// Several broker URLs: a dead node is skipped and the next URL is used; each connect starts
/// after the node it last reached (rotation); when none answers, the error lists every URL,
/// passwords redacted.
#[tokio::test]
async fn several_broker_urls_fail_over_in_rotation() {
    use rag_ingest::queue::{BrokerTls, Endpoints};
    // A port nothing listens on: bound, then released.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dead = format!("amqp://guest:dead-secret@127.0.0.1:{dead_port}/%2f");
    let live = common::amqp_url();
    let endpoints = Endpoints::new(vec![dead.clone(), live.clone()], BrokerTls::default());
    let timeout = Duration::from_secs(10);
    for attempt in 0..2 {
        let (conn, used) = within(
            "connect",
            endpoints.connect(lapin::ConnectionProperties::default(), timeout),
        )
        .await
        .expect("the live URL is reached");
        assert_eq!(
            used,
            rag_ingest::config::redact_url(&live),
            "attempt {attempt}"
        );
        close_quietly(conn).await;
    }

    let endpoints = Endpoints::new(vec![live.clone(), dead.clone()], BrokerTls::default());
    let (first, used) = within(
        "connect",
        endpoints.connect(lapin::ConnectionProperties::default(), timeout),
    )
    .await
    .expect("first URL");
    assert_eq!(used, rag_ingest::config::redact_url(&live));
    // The next connect starts with the second URL (dead), then wraps around to the first.
    let (second, used) = within(
        "connect",
        endpoints.connect(lapin::ConnectionProperties::default(), timeout),
    )
    .await
    .expect("wraps around to the live URL");
    assert_eq!(used, rag_ingest::config::redact_url(&live));
    close_quietly(first).await;
    close_quietly(second).await;

    let other_dead = format!("amqp://guest:other-secret@127.0.0.1:{dead_port}/other");
    let endpoints = Endpoints::new(vec![dead, other_dead], BrokerTls::default());
    let err = match within(
        "connect",
        endpoints.connect(lapin::ConnectionProperties::default(), timeout),
    )
    .await
    {
        Err(e) => e,
        Ok(_) => panic!("nothing listens on {dead_port}"),
    };
    assert!(
        matches!(err, QueueError::NoBrokerReachable { count: 2, .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.matches(&format!("127.0.0.1:{dead_port}")).count() == 2,
        "names both URLs: {text}"
    );
    assert!(!text.contains("secret"), "passwords redacted: {text}");
}
