//! One delivery, from decoding to settlement: the message is processed (with in-process
//! retries of transient failures) under its document's lock, then acked, sent to a delay
//! tier or dead-lettered, exactly once; a panic hands the delivery back with a count.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures_lite::FutureExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::FieldTable;
use tracing::{Instrument, info_span};

use super::{Counters, Worker};
use crate::config::PipelineConfig;
use crate::embed::Embedder;
use crate::error::{ErrorKind, Stage};
use crate::message::{Document, Rules, decode, peek_tenant};
use crate::process::{Failure, Pipeline, Processed};
use crate::queue::dlq::republish_failed;
use crate::queue::headers::{
    H_ATTEMPTS, H_PANICS, H_TENANT, death_queues, get_str, get_u64, set_u64,
};
use crate::queue::publish::publish_confirmed;
use crate::queue::{EXCHANGE, QueueError, Topology};
use crate::retry::{tier_delay, with_retries};
use crate::store::VectorStore;
use crate::telemetry::emit;
use crate::telemetry::events::{
    MessageDeadLettered, MessagePanicked, MessageRetried, MessageSettled, SettleFailed,
    UntrustedAttempts,
};

/// Serialises processing of the same document within this worker, so two versions of one
/// document in flight at once cannot interleave their writes and deletes.
#[derive(Default)]
pub(super) struct DocLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl DocLocks {
    /// The lock of document `key` (`tenant/document_id`); unused locks are dropped.
    pub(super) fn get(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, lock| Arc::strong_count(lock) > 1);
        Arc::clone(map.entry(key).or_default())
    }
}

impl<E: Embedder, S: VectorStore> Worker<E, S> {
    /// The task that processes and settles `delivery` (see the module documentation), in
    /// the `message` span that labels its log lines.
    pub(super) fn handle(
        &self,
        delivery: Arc<Delivery>,
        publish: Channel,
    ) -> impl Future<Output = Result<(), QueueError>> + Send + 'static {
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_string())
            .unwrap_or_default();
        let span = info_span!(
            "message",
            pipeline = %self.config.name,
            message_id = %message_id,
            tenant_id = tracing::field::Empty,
            document_id = tracing::field::Empty,
            request_id = tracing::field::Empty,
            stage = tracing::field::Empty,
        );
        let task = Task {
            pipeline: self.pipeline.clone(),
            rules: Arc::clone(&self.rules),
            config: Arc::clone(&self.config),
            topology: self.topology.clone(),
            locks: Arc::clone(&self.locks),
            counters: Arc::clone(&self.counters),
            delivery,
            publish,
        };
        task.run().instrument(span)
    }
}

/// What one delivery's task needs of its worker.
struct Task<E, S> {
    pipeline: Pipeline<E, S>,
    rules: Arc<Rules>,
    config: Arc<PipelineConfig>,
    topology: Topology,
    locks: Arc<DocLocks>,
    counters: Arc<Counters>,
    delivery: Arc<Delivery>,
    publish: Channel,
}

impl<E: Embedder, S: VectorStore> Task<E, S> {
    /// Decodes, processes and settles the delivery: ack on success, a delay tier or the DLQ
    /// on failure (acked once the copy is confirmed).
    ///
    /// Fails when the delivery cannot be settled (the channel is gone: the broker
    /// redelivers, and the write is idempotent).
    async fn run(self) -> Result<(), QueueError> {
        let headers = self.delivery.properties.headers();
        let previous = trusted_attempts(headers, &self.topology, self.config.retry.max_attempts);
        let attempts = previous.saturating_add(1);
        let outcome = match self.decode() {
            Err(failure) => Err(failure),
            Ok(doc) => self.process(&doc, attempts).await,
        };
        match outcome {
            Ok(done) => {
                self.counters.count(&done);
                emit(MessageSettled { outcome: &done });
            }
            Err(failure) => self.fail(&failure, previous, attempts).await?,
        }
        settled(self.delivery.acker.ack(BasicAckOptions::default()).await).inspect_err(|e| {
            emit(SettleFailed {
                error: e,
                consequence: "the message will be redelivered",
            });
        })
    }

    /// The document of the delivery, checked against the pipeline's rules and the
    /// producer's tenant header; records the span's fields.
    fn decode(&self) -> Result<Document, Failure> {
        let span = tracing::Span::current();
        let body = &self.delivery.data;
        let decoded = decode(body, &self.rules)
            .map_err(|rejection| Failure::new(rejection.kind, Stage::Decode, rejection.reason))
            .and_then(|doc| match get_str(self.delivery.properties.headers(), H_TENANT) {
                // The header is the producer's claim; the body is what gets stored. A
                // header naming another tenant is a broken (or hostile) producer.
                Some(claimed) if claimed != doc.tenant.as_str() => Err(Failure::new(
                    ErrorKind::InvalidField,
                    Stage::Decode,
                    format!(
                        "header `{H_TENANT}` ({claimed:?}) disagrees with the body's `tenant_id` ({:?})",
                        doc.tenant.as_str()
                    ),
                )),
                _ => Ok(doc),
            });
        match &decoded {
            Err(_) => {
                span.record("stage", "decode");
                if let Some(t) = peek_tenant(body) {
                    span.record("tenant_id", t.as_str());
                }
            }
            Ok(doc) => {
                span.record("tenant_id", doc.tenant.as_str());
                span.record("document_id", doc.document_id.as_str());
                if let Some(r) = &doc.request_id {
                    span.record("request_id", r.as_str());
                }
            }
        }
        decoded
    }

    /// Processes `doc` under its document lock, retrying transient failures in process.
    async fn process(&self, doc: &Document, attempts: u64) -> Result<Processed, Failure> {
        let lock = self
            .locks
            .get(format!("{}/{}", doc.tenant, doc.document_id));
        let _guard = lock.lock().await;
        with_retries(
            &self.config.retry,
            || self.pipeline.process(doc),
            |failure, delay| {
                emit(MessageRetried {
                    failure,
                    attempts,
                    delay: Some(delay),
                    queue: None,
                });
            },
        )
        .await
    }

    /// Sends the delivery to a delay tier (a transient failure with attempts left, or a
    /// breaker refusal, which does not burn an attempt) or to the DLQ, with its failure in
    /// the headers.
    ///
    /// Fails when the copy is not confirmed; the delivery is then nacked with requeue so the
    /// broker keeps it.
    async fn fail(
        &self,
        failure: &Failure,
        previous: u64,
        attempts: u64,
    ) -> Result<(), QueueError> {
        // A breaker refusal does not burn an attempt: the message waits in a delay tier
        // with its count unchanged until the dependency is back.
        let attempts = if failure.circuit_open {
            previous
        } else {
            attempts
        };
        let max_attempts = u64::from(self.config.retry.max_attempts);
        let retry =
            failure.circuit_open || (failure.kind.is_transient() && attempts < max_attempts);
        let queue = if retry {
            let tier = u32::try_from(attempts).unwrap_or(u32::MAX);
            self.topology
                .retry_queue(tier_delay(&self.config.retry, tier))
        } else {
            self.topology.dlq()
        };
        let delivery = &self.delivery;
        let republished = republish_failed(
            &self.publish,
            &queue,
            &delivery.data,
            &delivery.properties,
            failure,
            attempts,
        )
        .await;
        if let Err(e) = republished {
            // Not confirmed: leave the source with the broker so nothing is lost.
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            let _ = delivery.acker.nack(requeue).await;
            return Err(e);
        }
        if retry {
            self.counters.retried.fetch_add(1, Ordering::Relaxed);
            emit(MessageRetried {
                failure,
                attempts,
                delay: None,
                queue: Some(&queue),
            });
        } else {
            self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
            emit(MessageDeadLettered { failure, attempts });
        }
        Ok(())
    }
}

/// Turns the result of an ack or nack into a settlement result. lapin answers `Ok(false)`
/// when the delivery's channel has been closed (its acker is poisoned): nothing reached the
/// broker, which redelivers the message, and the session must reconnect.
pub(super) fn settled(result: Result<bool, lapin::Error>) -> Result<(), QueueError> {
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(QueueError::Closed {
            what: "consumer channel (the delivery can no longer be settled)".into(),
        }),
        Err(e) => Err(QueueError::Amqp(e)),
    }
}

/// Hands a delivery that was taken but not processed back to the queue without a
/// redelivery: publishes a copy (same body and properties, minus the broker's
/// `x-delivery-count`) to the tail of the main queue, waits for the confirm, then acks the
/// original.
///
/// Requeueing instead (`basic.nack`/`basic.reject` with requeue, a consumer-channel close)
/// increments a quorum queue's delivery count on RabbitMQ 3.x (checked on 3.10.8), so a long
/// outage would dead-letter healthy messages as `delivery_limit`; a confirmed copy plus ack
/// counts nothing. The copy keeps `x-attempts` and `x-death`, so its retry budget is the
/// original's. Fails with [`QueueError`] if the copy is not confirmed or the ack cannot be
/// sent; the original then stays with the broker.
pub(super) async fn park(
    publish: &Channel,
    topology: &Topology,
    delivery: &Delivery,
) -> Result<(), QueueError> {
    let mut properties = delivery.properties.clone();
    if let Some(old) = delivery.properties.headers() {
        let mut headers = FieldTable::default();
        for (k, v) in old.inner() {
            if k.as_str() != "x-delivery-count" {
                headers.insert(k.clone(), v.clone());
            }
        }
        properties = properties.with_headers(headers);
    }
    publish_confirmed(
        publish,
        EXCHANGE,
        topology.routing_key(),
        &delivery.data,
        properties,
    )
    .await?;
    settled(delivery.acker.ack(BasicAckOptions::default()).await)
}

/// The attempts a delivery has already used, as far as they can be trusted.
///
/// `x-attempts` is written by this worker when it sends a message to a delayed-retry tier;
/// the broker then adds an `x-death` entry naming that tier's queue when it moves the
/// message back. A producer can set any header: an `x-attempts` on a message that never
/// went through this pipeline's retry tier is ignored (0), so it cannot make a message
/// skip its retries, and a trusted value is capped at `max_attempts` so it cannot overflow.
pub(crate) fn trusted_attempts(
    headers: &Option<FieldTable>,
    topology: &Topology,
    max_attempts: u32,
) -> u64 {
    let Some(claimed) = get_u64(headers, H_ATTEMPTS) else {
        return 0;
    };
    let prefix = topology.retry_queue_prefix();
    if death_queues(headers).iter().any(|q| q.starts_with(&prefix)) {
        claimed.min(u64::from(max_attempts))
    } else {
        emit(UntrustedAttempts { claimed });
        0
    }
}

/// Runs one delivery's `work`. If it panics, the delivery is not requeued (on RabbitMQ 4.3+
/// a `basic.nack` with requeue no longer counts toward the delivery limit, so a message that
/// crashes every time would loop forever): a copy with `x-panics` incremented goes to the
/// tail of the main queue and the original is acked; once `x-panics` reaches
/// `panic_limit`, the copy goes to the DLQ instead, as `delivery_limit`. If that publish
/// fails, the delivery is nacked with requeue (the broker's count is then the guard).
pub(super) async fn give_up_on_panic(
    work: impl Future<Output = Result<(), QueueError>>,
    delivery: Arc<Delivery>,
    publish: Channel,
    topology: Topology,
    panic_limit: u32,
) -> Result<(), QueueError> {
    if let Ok(result) = AssertUnwindSafe(work).catch_unwind().await {
        return result;
    }
    let panics = get_u64(delivery.properties.headers(), H_PANICS)
        .unwrap_or(0)
        .saturating_add(1);
    let give_up = panics >= u64::from(panic_limit);
    emit(MessagePanicked { panics, give_up });
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    set_u64(&mut headers, H_PANICS, panics);
    let properties = delivery.properties.clone().with_headers(headers);
    let published = if give_up {
        let failure = Failure::new(
            crate::error::ErrorKind::DeliveryLimit,
            crate::error::Stage::Broker,
            format!("processing panicked {panics} times"),
        );
        let attempts = get_u64(delivery.properties.headers(), H_ATTEMPTS).unwrap_or(0);
        emit(MessageDeadLettered {
            failure: &failure,
            attempts,
        });
        republish_failed(
            &publish,
            &topology.dlq(),
            &delivery.data,
            &properties,
            &failure,
            attempts,
        )
        .await
    } else {
        publish_confirmed(
            &publish,
            EXCHANGE,
            topology.routing_key(),
            &delivery.data,
            properties,
        )
        .await
    };
    match published {
        Ok(()) => settled(delivery.acker.ack(BasicAckOptions::default()).await),
        Err(e) => {
            emit(SettleFailed {
                error: &e,
                consequence: "could not hand back a panicked delivery; requeued",
            });
            settled(
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use lapin::types::{FieldArray, LongString};

    fn topology() -> Topology {
        let text = "name = \"p\"\n[broker]\nurl = \"amqp://g:g@127.0.0.1:5672/%2f\"\nprefetch = 8\n[tenants]\nallowed = [\"acme\"]\n[chunking]\nmax_tokens = 64\noverlap = 8\n[embedder]\nkind = \"candle\"\nmodel_dir = \"m\"\nbatch_size = 8\n[store]\nkind = \"edge\"\npath = \"data\"\ncollection = \"c\"\n[limits]\nmax_document_bytes = 1000\n";
        let config = PipelineConfig::from_toml_str(
            text,
            std::path::Path::new("t.toml"),
            std::path::Path::new("/base"),
            |_| None,
        )
        .expect("config");
        Topology::new(&config)
    }

    fn headers(attempts: i64, death_queue: Option<&str>) -> Option<FieldTable> {
        let mut h = FieldTable::default();
        set_u64(&mut h, H_ATTEMPTS, u64::try_from(attempts).unwrap_or(0));
        if let Some(q) = death_queue {
            let mut death = FieldTable::default();
            death.insert(
                "queue".into(),
                AMQPValue::LongString(LongString::from(q.to_string())),
            );
            death.insert(
                "reason".into(),
                AMQPValue::LongString(LongString::from("expired".to_string())),
            );
            h.insert(
                "x-death".into(),
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
            );
        }
        Some(h)
    }

    use lapin::types::AMQPValue;

    #[test]
    fn producer_set_attempts_are_ignored() {
        let t = topology();
        assert_eq!(trusted_attempts(&headers(i64::MAX, None), &t, 5), 0);
        assert_eq!(trusted_attempts(&headers(4, None), &t, 5), 0);
        assert_eq!(
            trusted_attempts(&headers(4, Some("rag-ingest.other.retry.100")), &t, 5),
            0,
            "another pipeline's retry tier is not ours"
        );
        assert_eq!(trusted_attempts(&None, &t, 5), 0);
    }

    #[test]
    fn attempts_from_our_retry_tier_are_kept_and_capped() {
        let t = topology();
        let tier = t.retry_queue(1_000);
        assert_eq!(trusted_attempts(&headers(2, Some(&tier)), &t, 5), 2);
        assert_eq!(trusted_attempts(&headers(i64::MAX, Some(&tier)), &t, 5), 5);
        assert_eq!(
            trusted_attempts(&headers(i64::MAX, Some(&tier)), &t, 5).saturating_add(1),
            6,
            "no overflow"
        );
    }

    #[test]
    fn a_poisoned_acker_is_a_lost_channel_not_a_settlement() {
        assert!(settled(Ok(true)).is_ok());
        assert!(matches!(settled(Ok(false)), Err(QueueError::Closed { .. })));
    }
}
