//! Confirmed publishing: every publish waits for the broker's confirm, and unroutable
//! messages (returned under `mandatory`) count as failures. [`Submitter`] is the producers'
//! library type behind `rag-ingest submit`.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use std::time::Duration;

use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use uuid::Uuid;

use super::headers::{H_LANE, H_PUBLISHED_AT_MS, H_TENANT, set_str, set_u64};
use super::{QueueError, Topology};
use crate::config::PipelineConfig;
use crate::lane::Lane;
use crate::message::Document;
use crate::process::content_sha256;

/// Namespace of message ids (UUIDv5 of tenant, document, version and content hash).
const MESSAGE_NAMESPACE: Uuid = Uuid::from_u128(0x0d6f_2b1e_93c4_4f7a_b8e2_51a9_7c3d_e610);

/// Publishes `body` to `exchange` with `routing_key` (mandatory) and waits for the confirm,
/// at most [`CONFIRM_TIMEOUT`](super::CONFIRM_TIMEOUT).
///
/// `channel` must be in confirm mode. Fails with [`QueueError::NotConfirmed`] on a nack or
/// when the broker returns the message as unroutable, [`QueueError::ConfirmTimeout`] if no
/// confirm comes in time, [`QueueError::Amqp`] if the channel fails.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), QueueError> {
    publish_confirmed_within(
        channel,
        exchange,
        routing_key,
        body,
        properties,
        super::CONFIRM_TIMEOUT,
    )
    .await
}

/// [`publish_confirmed`] with `timeout` in place of [`CONFIRM_TIMEOUT`](super::CONFIRM_TIMEOUT)
/// for the publish and its confirm together.
///
/// Fails as [`publish_confirmed`] does; with [`QueueError::ConfirmTimeout`] after `timeout`.
pub async fn publish_confirmed_within(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    timeout: Duration,
) -> Result<(), QueueError> {
    let publishing = async {
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        Ok::<_, QueueError>(confirm)
    };
    match tokio::time::timeout(timeout, publishing).await {
        Ok(confirm) => check_confirm(confirm?, exchange, routing_key),
        Err(_) => Err(confirm_timeout(exchange, routing_key, timeout)),
    }
}

/// A confirm-mode channel with the pipeline's confirm deadline (`broker.confirm_timeout_ms`):
/// what the worker, `park`, `reprocess` and [`Submitter`] publish through.
#[derive(Clone)]
pub(crate) struct Publisher {
    channel: Channel,
    confirm_timeout: Duration,
}

impl Publisher {
    /// Publishes on `channel` (in confirm mode), waiting at most `confirm_timeout` per
    /// confirm.
    pub(crate) fn new(channel: Channel, confirm_timeout: Duration) -> Self {
        Publisher {
            channel,
            confirm_timeout,
        }
    }

    /// The channel published on.
    pub(crate) fn channel(&self) -> &Channel {
        &self.channel
    }

    /// [`publish_confirmed_within`] on this channel with its deadline.
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), QueueError> {
        publish_confirmed_within(
            &self.channel,
            exchange,
            routing_key,
            body,
            properties,
            self.confirm_timeout,
        )
        .await
    }
}

/// How a publish's destination is named in errors.
fn target(exchange: &str, routing_key: &str) -> String {
    format!("exchange {exchange:?} key {routing_key:?}")
}

/// [`QueueError::ConfirmTimeout`] for a publish to `exchange`/`routing_key` after `timeout`.
fn confirm_timeout(exchange: &str, routing_key: &str, timeout: Duration) -> QueueError {
    QueueError::ConfirmTimeout {
        target: target(exchange, routing_key),
        secs: timeout.as_secs_f64().ceil() as u64,
    }
}

fn check_confirm(
    confirm: lapin::Confirmation,
    exchange: &str,
    routing_key: &str,
) -> Result<(), QueueError> {
    let target = target(exchange, routing_key);
    if confirm.is_nack() {
        return Err(QueueError::NotConfirmed {
            target,
            reason: "the broker nacked it (queue full or unavailable)".into(),
        });
    }
    if confirm.take_message().is_some() {
        return Err(QueueError::NotConfirmed {
            target,
            reason: "unroutable: no queue is bound for it".into(),
        });
    }
    Ok(())
}

/// Opens a connection and a confirm-mode channel to the pipeline's broker and declares the
/// topology.
pub(crate) async fn open_channel(
    config: &PipelineConfig,
    topology: &Topology,
) -> Result<(Connection, Channel), QueueError> {
    let (conn, _) = super::Endpoints::from_config(&config.broker)
        .connect(ConnectionProperties::default(), super::CONNECT_TIMEOUT)
        .await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    topology.declare(&conn, &channel).await?;
    Ok((conn, channel))
}

/// Publishes documents to a pipeline's main queue (or, [`Submitter::with_lane`], its bulk
/// lane) with publisher confirms.
pub struct Submitter {
    conn: Connection,
    /// The channel, with how long a publish may wait for its confirm
    /// (`broker.confirm_timeout_ms` by default).
    publisher: Publisher,
    topology: Topology,
    lane: Lane,
    routing_key: String,
}

impl Submitter {
    /// Connects to `config`'s broker and declares the pipeline's topology. Each publish waits
    /// at most `broker.confirm_timeout_ms` for its confirm
    /// ([`Submitter::with_confirm_timeout`] changes that).
    ///
    /// Fails with [`QueueError::Connect`], [`QueueError::ConnectTimeout`] or (several URLs)
    /// [`QueueError::NoBrokerReachable`] if the broker cannot be reached, or
    /// [`QueueError::TopologyMismatch`] if its queues were declared differently.
    pub async fn connect(config: &PipelineConfig) -> Result<Self, QueueError> {
        let topology = Topology::new(config);
        let (conn, channel) = open_channel(config, &topology).await?;
        Ok(Submitter {
            conn,
            publisher: Publisher::new(channel, config.broker.confirm_timeout()),
            routing_key: topology.lane_routing_key(Lane::Live),
            topology,
            lane: Lane::Live,
        })
    }

    /// This submitter, publishing to `lane` (routing key `P` or `P.bulk`; see
    /// [`crate::lane`]). Backfills and re-imports go to [`Lane::Bulk`] so they cannot hold
    /// back live edits.
    pub fn with_lane(mut self, lane: Lane) -> Self {
        self.routing_key = self.topology.lane_routing_key(lane);
        self.lane = lane;
        self
    }

    /// The queue this submitter publishes to.
    pub fn queue(&self) -> String {
        self.topology.lane_queue(self.lane)
    }

    /// [`Submitter::properties`] of `doc` for this submitter's lane (a bulk message also
    /// carries `x-lane: bulk`).
    fn lane_properties(&self, doc: &Document) -> BasicProperties {
        let props = Self::properties(doc);
        if self.lane == Lane::Live {
            return props;
        }
        let mut headers = props.headers().clone().unwrap_or_default();
        set_str(&mut headers, H_LANE, self.lane.as_str());
        props.with_headers(headers)
    }

    /// The AMQP properties a document is published with: persistent, JSON, `message_id`
    /// derived from tenant, document, version and content (an idempotency key),
    /// `correlation_id` = request id, headers `x-tenant-id` and `x-published-at-ms` (now).
    pub fn properties(doc: &Document) -> BasicProperties {
        let key = format!(
            "{}/{}/{}/{}/{}",
            doc.tenant,
            doc.document_id,
            doc.op.as_str(),
            doc.version.map(|v| v.to_string()).unwrap_or_default(),
            content_sha256(&doc.content)
        );
        let message_id = Uuid::new_v5(&MESSAGE_NAMESPACE, key.as_bytes()).to_string();
        let mut headers = FieldTable::default();
        set_str(&mut headers, H_TENANT, doc.tenant.as_str());
        let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
        set_u64(&mut headers, H_PUBLISHED_AT_MS, now_ms);
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message_id.into())
            .with_timestamp(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0))
            .with_headers(headers);
        if let Some(r) = &doc.request_id {
            props = props.with_correlation_id(r.as_str().into());
        }
        props
    }

    /// Waits at most `timeout` for each confirm instead of `broker.confirm_timeout_ms`.
    #[must_use]
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.publisher.confirm_timeout = timeout;
        self
    }

    /// Publishes one document and waits for the broker's confirm.
    ///
    /// Fails with [`QueueError::NotConfirmed`], [`QueueError::ConfirmTimeout`] or
    /// [`QueueError::Amqp`]; the document was then not accepted by the broker and should be
    /// submitted again (after a confirm timeout the broker may still take the first copy:
    /// submitting again is safe, a document's points have fixed ids and the newest version
    /// wins).
    pub async fn submit(&self, doc: &Document) -> Result<(), QueueError> {
        self.publisher
            .publish(
                super::EXCHANGE,
                &self.routing_key,
                &doc.to_wire(),
                self.lane_properties(doc),
            )
            .await
    }

    /// Publishes a raw body as-is (for tools that forward pre-encoded messages), with
    /// confirm. Fails like [`Submitter::submit`].
    pub async fn submit_raw(
        &self,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), QueueError> {
        self.publisher
            .publish(super::EXCHANGE, &self.routing_key, body, properties)
            .await
    }

    /// Publishes many documents, pipelining the confirms, and reports each one's result in
    /// input order. `on_done` is called once per confirmed or failed document.
    ///
    /// If the broker confirms nothing for the confirm timeout (a resource alarm blocks the
    /// connection), the documents still waiting and every later one fail with
    /// [`QueueError::ConfirmTimeout`] at once, without being sent: one deadline for the
    /// batch, not one per document.
    pub async fn submit_all(
        &self,
        docs: &[Document],
        mut on_done: impl FnMut(usize, &Result<(), QueueError>),
    ) -> Vec<Result<(), QueueError>> {
        const WINDOW: usize = 256;
        let mut results = Vec::with_capacity(docs.len());
        let timed_out = || {
            confirm_timeout(
                super::EXCHANGE,
                &self.routing_key,
                self.publisher.confirm_timeout,
            )
        };
        // Moved forward by every confirm (or failure) that arrives: the broker makes progress.
        let mut deadline = tokio::time::Instant::now() + self.publisher.confirm_timeout;
        let mut stalled = false;
        for (start, window) in docs
            .chunks(WINDOW)
            .enumerate()
            .map(|(i, w)| (i * WINDOW, w))
        {
            let mut pending = Vec::with_capacity(window.len());
            for doc in window {
                if stalled {
                    pending.push(None);
                    continue;
                }
                let body = doc.to_wire();
                let publish = self.publisher.channel.basic_publish(
                    super::EXCHANGE.into(),
                    self.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    self.lane_properties(doc),
                );
                match tokio::time::timeout_at(deadline, publish).await {
                    Ok(sent) => pending.push(Some(sent)),
                    Err(_) => {
                        stalled = true;
                        pending.push(None);
                    }
                }
            }
            for (offset, sent) in pending.into_iter().enumerate() {
                let result = match sent {
                    Some(Err(e)) => Err(QueueError::Amqp(e)),
                    // Not sent (the batch had stalled), or sent but the broker has stopped
                    // confirming.
                    None => Err(timed_out()),
                    Some(Ok(_)) if stalled => Err(timed_out()),
                    Some(Ok(confirm)) => match tokio::time::timeout_at(deadline, confirm).await {
                        Ok(Ok(c)) => check_confirm(c, super::EXCHANGE, &self.routing_key),
                        Ok(Err(e)) => Err(QueueError::Amqp(e)),
                        Err(_) => {
                            stalled = true;
                            Err(timed_out())
                        }
                    },
                };
                if !stalled {
                    deadline = tokio::time::Instant::now() + self.publisher.confirm_timeout;
                }
                on_done(start + offset, &result);
                results.push(result);
            }
        }
        results
    }

    /// Closes the channel and the connection, waiting at most 5 s for each.
    /// Errors and timeouts while closing are ignored: every publish has already been
    /// confirmed or reported, and the connection is dropped either way.
    pub async fn close(self) {
        super::close_channel(&self.publisher.channel, "done").await;
        super::close_connection(&self.conn, "done").await;
    }
}
