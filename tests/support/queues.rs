//! Broker clean-up shared by the tests and the benches.

use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};
use rag_ingest::config::PipelineConfig;
use rag_ingest::queue::Topology;

/// Deletes `config`'s main, retry and dead-letter queues (errors ignored: best effort).
pub async fn delete_queues(config: &PipelineConfig) {
    let topology = Topology::new(config);
    let Ok(conn) = Connection::connect(&config.broker.url, ConnectionProperties::default()).await
    else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        let mut queues = vec![topology.main_queue(), topology.dlq()];
        queues.extend(topology.retry_queues());
        for queue in queues {
            let _ = ch
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(200, "bye".into()).await;
}
