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

use super::Worker;
use crate::embed::Embedder;
use crate::message::{decode, peek_tenant};
use crate::process::{Failure, Processed};
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
    /// The task that processes and settles `delivery` (see the module documentation).
    pub(super) fn handle(
        &self,
        delivery: Arc<Delivery>,
        publish: Channel,
    ) -> impl Future<Output = Result<(), QueueError>> + Send + 'static {
        let pipeline = self.pipeline.clone();
        let rules = Arc::clone(&self.rules);
        let config = Arc::clone(&self.config);
        let topology = self.topology.clone();
        let locks = Arc::clone(&self.locks);
        let counters = Arc::clone(&self.counters);
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_string())
            .unwrap_or_default();
        let span = info_span!(
            "message",
            pipeline = %config.name,
            message_id = %message_id,
            tenant_id = tracing::field::Empty,
            document_id = tracing::field::Empty,
            request_id = tracing::field::Empty,
            stage = tracing::field::Empty,
        );
        async move {
            let headers = delivery.properties.headers();
            let previous = trusted_attempts(headers, &topology, config.retry.max_attempts);
            let attempts = previous.saturating_add(1);
            let decoded = decode(&delivery.data, &rules)
                .map_err(|rejection| Failure::new(rejection.kind, crate::error::Stage::Decode, rejection.reason))
                .and_then(|doc| match get_str(headers, H_TENANT) {
                    // The header is the producer's claim; the body is what gets stored. A
                    // header naming another tenant is a broken (or hostile) producer.
                    Some(claimed) if claimed != doc.tenant.as_str() => Err(Failure::new(
                        crate::error::ErrorKind::InvalidField,
                        crate::error::Stage::Decode,
                        format!(
                            "header `{H_TENANT}` ({claimed:?}) disagrees with the body's `tenant_id` ({:?})",
                            doc.tenant.as_str()
                        ),
                    )),
                    _ => Ok(doc),
                });
            let outcome = match decoded {
                Err(failure) => {
                    let span = tracing::Span::current();
                    span.record("stage", "decode");
                    if let Some(t) = peek_tenant(&delivery.data) {
                        span.record("tenant_id", t.as_str());
                    }
                    Err(failure)
                }
                Ok(doc) => {
                    let span = tracing::Span::current();
                    span.record("tenant_id", doc.tenant.as_str());
                    span.record("document_id", doc.document_id.as_str());
                    if let Some(r) = &doc.request_id {
                        span.record("request_id", r.as_str());
                    }
                    let lock = locks.get(format!("{}/{}", doc.tenant, doc.document_id));
                    let _guard = lock.lock().await;
                    with_retries(
                        &config.retry,
                        || pipeline.process(&doc),
                        |failure, delay| {
                            emit(MessageRetried { failure, attempts, delay: Some(delay), queue: None });
                        },
                    )
                    .await
                }
            };
            match outcome {
                Ok(done) => {
                    let counter = match &done {
                        Processed::Stored { .. } => &counters.stored,
                        Processed::Unchanged => &counters.unchanged,
                        Processed::Stale { .. } => &counters.stale,
                        Processed::Deleted => &counters.deleted,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    emit(MessageSettled { outcome: &done });
                }
                Err(failure) => {
                    // A breaker refusal does not burn an attempt: the message waits in a
                    // delay tier with its count unchanged until the dependency is back.
                    let attempts = if failure.circuit_open { previous } else { attempts };
                    let retry = failure.circuit_open
                        || (failure.kind.is_transient() && attempts < u64::from(config.retry.max_attempts));
                    let queue = if retry {
                        topology.retry_queue(tier_delay(&config.retry, u32::try_from(attempts).unwrap_or(u32::MAX)))
                    } else {
                        topology.dlq()
                    };
                    if let Err(e) = republish_failed(&publish, &queue, &delivery.data, &delivery.properties, &failure, attempts).await {
                        // Not confirmed: leave the source with the broker so nothing is lost.
                        let _ = delivery
                            .acker
                            .nack(BasicNackOptions { multiple: false, requeue: true })
                            .await;
                        return Err(e);
                    }
                    if retry {
                        counters.retried.fetch_add(1, Ordering::Relaxed);
                        emit(MessageRetried { failure: &failure, attempts, delay: None, queue: Some(&queue) });
                    } else {
                        counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        emit(MessageDeadLettered { failure: &failure, attempts });
                    }
                }
            }
            // If the channel is gone the broker redelivers; the write is idempotent.
            settled(delivery.acker.ack(BasicAckOptions::default()).await).inspect_err(|e| {
                emit(SettleFailed { error: e, consequence: "the message will be redelivered" });
            })
        }
        .instrument(span)
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
    use crate::config::PipelineConfig;
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
