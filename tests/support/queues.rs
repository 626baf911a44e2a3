//! Broker helpers shared by the tests and the benches: a deadline for every await on the
//! broker (or the store), so that a stall fails the test loudly, naming the step, instead of
//! hanging CI; and queue clean-up.

use std::future::Future;
use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};
use rag_ingest::config::PipelineConfig;
use rag_ingest::queue::Topology;

/// How long one broker (or store) operation of a test or bench may take.
#[allow(dead_code)]
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Awaits `fut`; panics naming `what` if it has not finished within [`DEADLINE`].
#[allow(dead_code)]
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: no answer within {DEADLINE:?}"),
    }
}

/// Closes `conn`, waiting at most a few seconds (a close that is never answered must not
/// hang a test; the connection is dropped either way).
#[allow(dead_code)]
pub async fn close_quietly(conn: Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "bye".into())).await;
}

/// Deletes every queue of `config`'s pipeline: both lanes, their retry and parked queues,
/// the dead-letter queue (errors ignored: best effort;
/// each step gives up after [`DEADLINE`]).
#[allow(dead_code)]
pub async fn delete_queues(config: &PipelineConfig) {
    let topology = Topology::new(config);
    let connect = Connection::connect(&config.broker.url, ConnectionProperties::default());
    let Ok(Ok(conn)) = tokio::time::timeout(DEADLINE, connect).await else {
        return;
    };
    if let Ok(Ok(ch)) = tokio::time::timeout(DEADLINE, conn.create_channel()).await {
        for queue in topology.all_queues() {
            let delete = ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default());
            let _ = tokio::time::timeout(DEADLINE, delete).await;
        }
    }
    close_quietly(conn).await;
}
