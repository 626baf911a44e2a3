//! Everything AMQP: queue topology, confirmed publishing, dead-lettering and the consume
//! loop. This layer knows nothing about embeddings; it turns [`crate::process`] outcomes
//! into acks, delayed retries and dead letters.

mod budget;
mod dlq;
mod headers;
mod publish;
mod topology;
mod worker;

pub use budget::MessageFootprint;
pub use dlq::{DlqEntry, DlqFilter, DlqSummary, ReprocessReport, inspect_dlq, reprocess};
pub use headers::{
    H_ATTEMPTS, H_ERROR, H_ERROR_KIND, H_ERROR_STAGE, H_FIRST_FAILED_AT, H_LANE, H_LAST_FAILED_AT,
    H_PANICS, H_PUBLISHED_AT_MS, H_REPROCESSED, H_TENANT,
};
pub use publish::{Submitter, publish_confirmed, publish_confirmed_within};
pub use topology::{DLX, EXCHANGE, Topology};
pub use worker::{RunOptions, Worker, WorkerError, WorkerReport};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};

use crate::config::BrokerConfig;
use crate::telemetry::emit;
use crate::telemetry::events::{BrokerCloseUnanswered, BrokerConnected, BrokerUrlUnreachable};
use crate::validate::redact_url;

/// How long opening a broker connection (TCP connect and AMQP handshake) may take before it
/// fails with [`QueueError::ConnectTimeout`]: a broker that accepts the TCP connection but
/// never answers the handshake must not hang a worker, a submitter or `doctor`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`publish_confirmed`] waits for the broker to take a message and confirm it
/// before it fails with [`QueueError::ConfirmTimeout`]. A broker under a memory or disk alarm
/// stops reading from every publishing connection until the alarm clears, and a stuck node
/// never answers: neither may hang a worker, a submitter or `reprocess` without a word.
/// A pipeline sets its own with `broker.confirm_timeout_ms` (this is its default).
pub const CONFIRM_TIMEOUT: Duration =
    Duration::from_millis(crate::config::DEFAULT_CONFIRM_TIMEOUT_MS);

/// How long closing a channel or connection waits for the broker's close-ok. The client
/// can wait for it forever when the socket goes away during the close or when a dropped
/// channel's close races the connection's (the likely cause of a rare hang of `doctor`), and
/// nothing is lost by giving up: the close is only a courtesy once every publish is confirmed
/// and every delivery settled or handed back.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes `channel` with `reason`, ignoring errors and giving up after [`CLOSE_TIMEOUT`]
/// (the channel is dropped either way). Never fails.
pub(crate) async fn close_channel(channel: &lapin::Channel, reason: &str) {
    bounded_close("channel", reason, channel.close(200, reason.into())).await;
}

/// Closes `conn` with `reason`, ignoring errors and giving up after [`CLOSE_TIMEOUT`] (the
/// connection is dropped either way). Never fails.
pub(crate) async fn close_connection(conn: &Connection, reason: &str) {
    bounded_close("connection", reason, conn.close(200, reason.into())).await;
}

/// Awaits `closing` for at most [`CLOSE_TIMEOUT`], reporting [`BrokerCloseUnanswered`] if it
/// does not finish; its result is ignored.
async fn bounded_close<T>(what: &str, reason: &str, closing: impl std::future::Future<Output = T>) {
    if tokio::time::timeout(CLOSE_TIMEOUT, closing).await.is_err() {
        emit(BrokerCloseUnanswered { what, reason });
    }
}

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
    /// The broker did not confirm a publish in time (`broker.confirm_timeout_ms`, by default
    /// [`CONFIRM_TIMEOUT`]). The message may still reach the queue later (the broker may be
    /// holding it), so callers treat it as not sent and keep their original: the worker
    /// requeues the delivery it was moving, the submitter reports the document as not
    /// submitted.
    #[error(
        "the broker did not confirm the publish to {target} within {secs} s (a memory or disk alarm blocks publishers until it clears: rabbitmq-diagnostics alarms)"
    )]
    ConfirmTimeout {
        /// Exchange/routing key or queue.
        target: String,
        /// The time waited, in seconds.
        secs: u64,
    },
    /// None of several broker URLs could be connected to.
    #[error("cannot connect to any of the {count} RabbitMQ URLs: {errors}")]
    NoBrokerReachable {
        /// How many URLs were tried.
        count: usize,
        /// Each URL's error (passwords redacted), separated by `; `.
        errors: String,
    },
    /// The broker closed the connection or a channel (e.g. `consumer_timeout`, an operator's
    /// `rabbitmqctl close_connection`): deliveries held on it can no longer be settled and the
    /// worker must reconnect.
    #[error("the broker closed the {what}")]
    Closed {
        /// What was closed: `connection`, `consumer channel`, `publish channel`.
        what: String,
    },
    /// The broker cancelled this worker's consumer (`basic.cancel` from the server: the queue
    /// was deleted, or the cluster node holding it went away) while the worker had not asked
    /// for it: no more deliveries come on it and the worker must reconnect to consume again.
    #[error("the broker cancelled the consumer {consumer_tag:?}")]
    ConsumerCancelled {
        /// The consumer tag the broker cancelled (empty if unknown).
        consumer_tag: String,
    },
    /// Any other AMQP failure (connection or channel lost, protocol error).
    #[error("RabbitMQ error: {0}")]
    Amqp(#[from] lapin::Error),
}

/// TLS settings for `amqps://` URLs: the server certificate is verified against the system
/// trust store plus the CA certificates given here (`broker.tls_ca_file`). `amqp://` URLs
/// ignore it.
#[derive(Debug, Clone, Default)]
pub struct BrokerTls {
    /// Extra CA certificates to trust (PEM).
    pub ca_pem: Option<String>,
}

impl BrokerTls {
    /// The TLS settings of `broker` (its CA file was read and checked at config load).
    pub fn from_config(broker: &BrokerConfig) -> Self {
        BrokerTls {
            ca_pem: broker.tls_ca_pem.clone(),
        }
    }

    fn client_config(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            identity: None,
            cert_chain: self.ca_pem.clone(),
        }
    }
}

/// Opens a connection to `url` (TLS with `tls` for `amqps://`), giving up after `timeout`
/// (the crate uses [`CONNECT_TIMEOUT`]). Every broker connection of the crate is opened here.
///
/// Fails with [`QueueError::Connect`] if the broker refuses, cannot be reached or its TLS
/// certificate is not trusted, or [`QueueError::ConnectTimeout`] if it does not answer in time.
pub async fn connect(
    url: &str,
    tls: &BrokerTls,
    properties: ConnectionProperties,
    timeout: Duration,
) -> Result<Connection, QueueError> {
    let opening = async {
        let runtime = lapin::runtime::default_runtime()?;
        Connection::connect_with_config(url, properties, tls.client_config(), runtime).await
    };
    match tokio::time::timeout(timeout, opening).await {
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

/// The broker's URLs (the nodes of one cluster, or one URL) with their TLS settings, tried in
/// rotation: each [`Endpoints::connect`] starts with the URL after the one it last connected
/// to, so a reconnect after losing a node goes to another node first.
pub struct Endpoints {
    urls: Vec<String>,
    tls: BrokerTls,
    next: AtomicUsize,
}

impl std::fmt::Debug for Endpoints {
    /// Shows the URLs with their passwords redacted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field(
                "urls",
                &self.urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>(),
            )
            .field("tls_ca", &self.tls.ca_pem.is_some())
            .field("next", &self.next.load(Ordering::Relaxed))
            .finish()
    }
}

impl Endpoints {
    /// The URLs of `broker.url` (validated at config load) and its TLS settings.
    pub fn from_config(broker: &BrokerConfig) -> Self {
        Endpoints::new(
            broker.urls().into_iter().map(str::to_owned).collect(),
            BrokerTls::from_config(broker),
        )
    }

    /// Endpoints over `urls`, tried in this order first.
    pub fn new(urls: Vec<String>, tls: BrokerTls) -> Self {
        Endpoints {
            urls,
            tls,
            next: AtomicUsize::new(0),
        }
    }

    /// The URLs, in configuration order.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Connects to the first URL that answers, trying each once from the rotation point, each
    /// within `timeout`; returns the connection and the URL used (password redacted).
    ///
    /// With one URL, fails as [`connect`] does; with several, fails with
    /// [`QueueError::NoBrokerReachable`] listing each URL's error.
    pub async fn connect(
        &self,
        properties: ConnectionProperties,
        timeout: Duration,
    ) -> Result<(Connection, String), QueueError> {
        let count = self.urls.len();
        let start = self.next.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for step in 0..count {
            let index = (start + step) % count;
            let url = &self.urls[index];
            match connect(url, &self.tls, properties.clone(), timeout).await {
                Ok(conn) => {
                    self.next.store((index + 1) % count, Ordering::Relaxed);
                    let url = redact_url(url);
                    if count > 1 {
                        emit(BrokerConnected { url: &url });
                    }
                    return Ok((conn, url));
                }
                Err(e) if count == 1 => return Err(e),
                Err(e) => {
                    emit(BrokerUrlUnreachable {
                        url: &redact_url(url),
                        error: &e,
                    });
                    errors.push(e.to_string());
                }
            }
        }
        Err(QueueError::NoBrokerReachable {
            count,
            errors: if errors.is_empty() {
                "no URL configured".into()
            } else {
                errors.join("; ")
            },
        })
    }
}
