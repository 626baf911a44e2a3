//! Everything AMQP: queue topology, confirmed publishing, dead-lettering and the consume
//! loop. This layer knows nothing about embeddings; it turns [`crate::process`] outcomes
//! into acks, delayed retries and dead letters.

mod budget;
mod consume;
mod dlq;
mod headers;
mod publish;
mod topology;

pub use budget::MessageFootprint;
pub use consume::{RunOptions, Worker, WorkerError, WorkerReport};
pub use dlq::{DlqEntry, DlqFilter, DlqSummary, ReprocessReport, inspect_dlq, reprocess};
pub use headers::{
    H_ATTEMPTS, H_ERROR, H_ERROR_KIND, H_ERROR_STAGE, H_FIRST_FAILED_AT, H_LAST_FAILED_AT,
    H_REPROCESSED, H_TENANT,
};
pub use publish::{Submitter, publish_confirmed};
pub use topology::{DLX, EXCHANGE, Topology};

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

use crate::config::redact_url;

/// How long opening a broker connection (TCP connect and AMQP handshake) may take before it
/// fails with [`QueueError::ConnectTimeout`]: a broker that accepts the TCP connection but
/// never answers the handshake must not hang a worker, a submitter or `doctor`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a broker operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The connection to the broker could not be opened.
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Connect {
        /// The broker URL, password redacted.
        url: String,
        /// The client's error.
        source: lapin::Error,
    },
    /// The broker did not complete the connection handshake in time ([`CONNECT_TIMEOUT`]).
    #[error(
        "cannot connect to RabbitMQ at {url}: no answer to the connection handshake within {secs} s (is the broker overloaded, or is something else listening on that port?)"
    )]
    ConnectTimeout {
        /// The broker URL, password redacted.
        url: String,
        /// The time waited, in seconds.
        secs: u64,
    },
    /// A queue or exchange exists with other arguments than this pipeline declares.
    #[error(
        "{what} already exists with different arguments: {server}. To migrate: stop the workers, move or drain its messages, delete it (rabbitmqctl delete_queue {what}) and start a worker again, which re-declares it; or use another pipeline name"
    )]
    TopologyMismatch {
        /// The queue or exchange name.
        what: String,
        /// The broker's message (it names the differing argument).
        server: String,
    },
    /// The broker refused to confirm a publish (nack) or returned it as unroutable.
    #[error("the broker did not confirm the publish to {target}: {reason}")]
    NotConfirmed {
        /// Exchange/routing key or queue.
        target: String,
        /// Nack or return.
        reason: String,
    },
    /// Any other AMQP failure (connection or channel lost, protocol error).
    #[error("RabbitMQ error: {0}")]
    Amqp(#[from] lapin::Error),
}

/// Opens a connection to `url`, giving up after `timeout` (the crate uses
/// [`CONNECT_TIMEOUT`]).
///
/// Fails with [`QueueError::Connect`] if the broker refuses or cannot be reached, or
/// [`QueueError::ConnectTimeout`] if it does not answer in time.
pub async fn connect(
    url: &str,
    properties: ConnectionProperties,
    timeout: Duration,
) -> Result<Connection, QueueError> {
    match tokio::time::timeout(timeout, Connection::connect(url, properties)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(source)) => Err(QueueError::Connect {
            url: redact_url(url),
            source,
        }),
        Err(_) => Err(QueueError::ConnectTimeout {
            url: redact_url(url),
            secs: timeout.as_secs_f64().ceil() as u64,
        }),
    }
}
