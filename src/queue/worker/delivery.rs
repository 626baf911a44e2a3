//! One delivery, from decoding to settlement: the message is processed (with in-process
//! retries of transient failures) under its document's lock, then acked, sent to a delay
//! tier or dead-lettered, exactly once; a panic hands the delivery back with a count.
//!
//! Before processing, two rules of fairness apply:
//! - a message on the bulk lane must carry a `version`; one without is dead-lettered as
//!   `invalid_field`. Versioned messages are ordered by the store whatever lane they took
//!   (newest wins), while unversioned ones are ordered by when they are processed ("last
//!   processed wins"), so an unversioned backfill processed late would overwrite the live
//!   edits published after it (see [`crate::lane`]);
//! - a message of a tenant at or over its token budget is deferred: a confirmed copy goes to
//!   its lane's parked queue with the rest of the budget window as its expiration, and the
//!   original is acked; its attempts are untouched. With Redis unavailable and budgets
//!   failing closed it is parked for a short while instead.
//!
//! The tokens its processing embedded ([`crate::meter`]) are then charged to its tenant.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures_lite::FutureExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::FieldTable;
use tracing::{Instrument, info_span};

use super::{Counters, Worker};
use crate::config::PipelineConfig;
use crate::embed::Embedder;
use crate::error::{ErrorKind, Stage};
use crate::lane::Lane;
use crate::message::{Document, Op, Rules, decode, peek_tenant};
use crate::process::{Failure, Pipeline, Processed};
use crate::queue::dlq::republish_failed;
use crate::queue::headers::{
    H_ATTEMPTS, H_LANE, H_PANICS, H_PUBLISHED_AT_MS, H_TENANT, death_queues, get_str, get_u64,
    set_str, set_u64,
};
use crate::queue::publish::Publisher;
use crate::queue::{EXCHANGE, QueueError, Topology};
use crate::retry::{tier_delay, with_retries};
use crate::shared::budget::{Admission, TenantBudgets};
use crate::store::VectorStore;
use crate::telemetry::emit;
use crate::telemetry::events::{
    MessageAbandoned, MessageDeadLettered, MessageDeferred, MessagePanicked, MessageRetried,
    MessageSettled, MessageStarted, SettleFailed, SharedStateUnavailable, TenantBudgetExhausted,
    TenantInFlight, UntrustedAttempts,
};

/// How long after its budget window rolls a deferred message comes back: enough that the
/// broker's timer firing a little early does not find the old window still current.
const WINDOW_ROLL_MARGIN: std::time::Duration = std::time::Duration::from_millis(250);

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
        publish: Publisher,
        lane: Lane,
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
            lane = lane.as_str(),
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
            budgets: self.budgets.clone(),
            delivery,
            publish,
            lane,
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
    budgets: Option<Arc<TenantBudgets>>,
    delivery: Arc<Delivery>,
    publish: Publisher,
    lane: Lane,
}

/// Counts a message of a tenant as in flight (`rag_ingest_tenant_in_flight_messages`) until
/// dropped.
struct TenantSlot<'a> {
    tenant: &'a str,
    lane: Lane,
}

impl<'a> TenantSlot<'a> {
    fn take(tenant: &'a str, lane: Lane) -> Self {
        emit(TenantInFlight {
            tenant,
            lane: lane.as_str(),
            delta: 1.0,
        });
        TenantSlot { tenant, lane }
    }
}

impl Drop for TenantSlot<'_> {
    fn drop(&mut self) {
        emit(TenantInFlight {
            tenant: self.tenant,
            lane: self.lane.as_str(),
            delta: -1.0,
        });
    }
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
            Ok(doc) => {
                if let Some((resume_in, reason)) = self.deferral(&doc).await {
                    return self.defer(resume_in, reason).await;
                }
                let tenant = doc.tenant.as_str();
                emit(MessageStarted {
                    tenant,
                    lane: self.lane.as_str(),
                    queue_wait: queue_wait(headers, self.delivery.properties.timestamp()),
                });
                let _slot = TenantSlot::take(tenant, self.lane);
                let work = crate::lane::scope(self.lane, self.process(&doc, attempts));
                let (outcome, tokens) = crate::meter::metered(work).await;
                if let Some(budgets) = &self.budgets {
                    budgets.record(tenant, tokens).await;
                }
                outcome
            }
        };
        match outcome {
            Ok(Processed::Abandoned) => {
                emit(MessageAbandoned);
                // Not acked (it cannot be): the broker redelivers the message.
                return settled(Ok(false));
            }
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
            })
            .and_then(|doc| {
                if self.lane == Lane::Bulk && doc.version.is_none() {
                    return Err(Failure::new(
                        ErrorKind::InvalidField,
                        Stage::Decode,
                        "`version` is required on the bulk lane: without one, a backfill                          processed after newer live edits would overwrite them; submit it                          with a version (or to the live lane)",
                    ));
                }
                Ok(doc)
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

    /// Whether `doc` must wait instead of being processed: its tenant is over its budget
    /// (`Some` with the time until the window rolls), or the budget could not be checked and
    /// budgets fail closed (`Some` with a short wait). A delete embeds nothing and is never
    /// deferred: a tenant over its budget can still remove its documents.
    async fn deferral(&self, doc: &Document) -> Option<(std::time::Duration, &'static str)> {
        if doc.op == Op::Delete {
            return None;
        }
        let budgets = self.budgets.as_ref()?;
        let tenant = doc.tenant.as_str();
        match budgets.admit(tenant).await {
            Admission::Admitted => None,
            Admission::Exhausted {
                used,
                budget,
                resume_in,
            } => {
                emit(TenantBudgetExhausted {
                    tenant,
                    used,
                    budget,
                    resume_in,
                });
                Some((resume_in + WINDOW_ROLL_MARGIN, "budget_exhausted"))
            }
            Admission::Unknown { error, retry_in } => {
                emit(SharedStateUnavailable {
                    component: "budget",
                    error: &error,
                    consequence: "message deferred (on_redis_error = closed)",
                });
                Some((retry_in, "budget_unknown"))
            }
        }
    }

    /// Parks the delivery for `resume_in`: a confirmed copy (attempts untouched) goes to the
    /// lane's parked queue, expiring back to the lane after `resume_in`, then the original
    /// is acked.
    ///
    /// Fails when the copy is not confirmed (the delivery is then nacked with requeue, so
    /// the broker keeps it) or the ack cannot be sent.
    async fn defer(
        &self,
        resume_in: std::time::Duration,
        reason: &'static str,
    ) -> Result<(), QueueError> {
        let queue = self.topology.parked_queue(self.lane);
        // At least 1 ms: an expiration of 0 would bounce straight back.
        let ms = resume_in.as_millis().clamp(1, u128::from(u32::MAX));
        let properties =
            handed_back_properties(&self.delivery).with_expiration(ms.to_string().into());
        self.move_to("", &queue, properties).await?;
        emit(MessageDeferred {
            reason,
            queue: &queue,
            resume_in,
        });
        self.counters.deferred.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Publishes a confirmed copy of the delivery's body with `properties` to
    /// `exchange`/`key`, then acks the delivery; if the copy is not confirmed the delivery
    /// is nacked with requeue (the broker keeps it).
    async fn move_to(
        &self,
        exchange: &str,
        key: &str,
        properties: lapin::BasicProperties,
    ) -> Result<(), QueueError> {
        let delivery = &self.delivery;
        settleable(delivery)?;
        if let Err(e) = self
            .publish
            .publish(exchange, key, &delivery.data, properties)
            .await
        {
            let _ = requeue(delivery).await;
            return Err(e);
        }
        settled(delivery.acker.ack(BasicAckOptions::default()).await).inspect_err(|e| {
            emit(SettleFailed {
                error: e,
                consequence: "the message will be redelivered (its copy is queued too)",
            });
        })
    }

    /// Processes `doc` under its document lock, retrying transient failures in process.
    async fn process(&self, doc: &Document, attempts: u64) -> Result<Processed, Failure> {
        let lock = self
            .locks
            .get(format!("{}/{}", doc.tenant, doc.document_id));
        let _guard = lock.lock().await;
        with_retries(
            &self.config.retry,
            // Nothing is written once the delivery can no longer be settled: the broker
            // redelivers the message, perhaps to a worker that settles the document first.
            || {
                self.pipeline
                    .process_while(doc, || self.delivery.acker.usable())
            },
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
    /// Fails when the delivery can no longer be settled (nothing is published: the broker
    /// redelivers it), or when the copy is not confirmed; the delivery is then nacked with
    /// requeue so the broker keeps it.
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
                .lane_retry_queue(self.lane, tier_delay(&self.config.retry, tier))
        } else {
            self.topology.dlq()
        };
        let delivery = &self.delivery;
        settleable(delivery)?;
        let republished = republish_failed(
            &self.publish,
            &queue,
            &delivery.data,
            &lane_marked(&delivery.properties, self.lane),
            failure,
            attempts,
        )
        .await;
        if let Err(e) = republished {
            // Not confirmed: leave the source with the broker so nothing is lost.
            let _ = requeue(delivery).await;
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

/// Fails like an ack on a closed channel ([`settled`]) when `delivery` can no longer be
/// settled: a copy published now (to a delay tier, the DLQ or the parked queue) would be a
/// duplicate, since the broker redelivers the original. A message that finishes after its
/// session was lost (see the session module) stops here instead of copying itself.
fn settleable(delivery: &Delivery) -> Result<(), QueueError> {
    if delivery.acker.usable() {
        Ok(())
    } else {
        settled(Ok(false))
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

/// The properties of `properties`' message marked with its lane (`x-lane: bulk` for the
/// bulk lane; a live message is left as it is), so a DLQ replay returns it to its lane.
fn lane_marked(properties: &lapin::BasicProperties, lane: Lane) -> lapin::BasicProperties {
    if lane == Lane::Live {
        return properties.clone();
    }
    let mut headers = properties.headers().clone().unwrap_or_default();
    set_str(&mut headers, H_LANE, lane.as_str());
    properties.clone().with_headers(headers)
}

/// The properties of a copy of `delivery` handed back without counting a redelivery: the
/// same, minus the broker's `x-delivery-count`.
fn handed_back_properties(delivery: &Delivery) -> lapin::BasicProperties {
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
    properties
}

/// How long a message waited since its producer published it (`x-published-at-ms`, else
/// the AMQP `timestamp` in seconds), for a first delivery only: `None` for a message that
/// came back from a retry tier or a parked queue (it carries `x-death`), or without a
/// publish time. A publish time in the future (clock skew) counts as no wait.
fn queue_wait(
    headers: &Option<FieldTable>,
    timestamp: &Option<u64>,
) -> Option<std::time::Duration> {
    if headers
        .as_ref()
        .is_some_and(|h| h.inner().contains_key("x-death"))
    {
        return None;
    }
    let published_ms = get_u64(headers, H_PUBLISHED_AT_MS)
        .or_else(|| timestamp.map(|secs| secs.saturating_mul(1000)))?;
    let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
    Some(std::time::Duration::from_millis(
        now_ms.saturating_sub(published_ms),
    ))
}

/// Hands a delivery that was taken but not processed back to the queue of its `lane`
/// without a redelivery: publishes a copy (same body and properties, minus the broker's
/// `x-delivery-count`) to the tail of the lane's queue, waits for the confirm, then acks the
/// original.
///
/// Requeueing instead (`basic.nack`/`basic.reject` with requeue, a consumer-channel close)
/// increments a quorum queue's delivery count on RabbitMQ 3.x (checked on 3.10.8), so a long
/// outage would dead-letter healthy messages as `delivery_limit`; a confirmed copy plus ack
/// counts nothing. The copy keeps `x-attempts` and `x-death`, so its retry budget is the
/// original's. Fails with [`QueueError`] if the copy is not confirmed or the ack cannot be
/// sent; the original then stays with the broker.
pub(super) async fn park(
    publish: &Publisher,
    topology: &Topology,
    lane: Lane,
    delivery: &Delivery,
) -> Result<(), QueueError> {
    publish
        .publish(
            EXCHANGE,
            &topology.lane_routing_key(lane),
            &delivery.data,
            handed_back_properties(delivery),
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
    let prefixes = topology.retry_queue_prefixes();
    if death_queues(headers)
        .iter()
        .any(|q| prefixes.iter().any(|p| q.starts_with(p.as_str())))
    {
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
    publish: Publisher,
    topology: Topology,
    lane: Lane,
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
    // A delivery that can no longer be settled publishes no copy: the broker redelivers it
    // (and the copy would come on top of the redelivered original).
    settleable(&delivery)?;
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    set_u64(&mut headers, H_PANICS, panics);
    let properties = lane_marked(&delivery.properties.clone().with_headers(headers), lane);
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
        publish
            .publish(
                EXCHANGE,
                &topology.lane_routing_key(lane),
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
            // Requeued, the session goes on; not even the nack went out: it ends.
            requeue(&delivery).await.unwrap_or(Err(e))
        }
    }
}

/// Nacks `delivery` with requeue, waiting at most [`CLOSE_TIMEOUT`](crate::queue::CLOSE_TIMEOUT)
/// for the frame to go out: on a connection the broker has blocked (a memory or disk alarm)
/// it may never be sent. Returns the nack's settlement ([`settled`]), or `None` if it did
/// not go out in time. Nothing is lost either way: a caller that gets `None` ends the
/// session, and the broker requeues every unacked delivery of a connection that closes.
async fn requeue(delivery: &Delivery) -> Option<Result<(), QueueError>> {
    let nack = delivery.acker.nack(BasicNackOptions {
        multiple: false,
        requeue: true,
    });
    tokio::time::timeout(crate::queue::CLOSE_TIMEOUT, nack)
        .await
        .ok()
        .map(settled)
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
        let bulk_tier = t.lane_retry_queue(Lane::Bulk, 1_000);
        assert_eq!(trusted_attempts(&headers(3, Some(&bulk_tier)), &t, 5), 3);
        assert_eq!(
            trusted_attempts(&headers(3, Some(&t.parked_queue(Lane::Live))), &t, 5),
            0,
            "a parked queue is not a retry tier"
        );
        assert_eq!(trusted_attempts(&headers(i64::MAX, Some(&tier)), &t, 5), 5);
        assert_eq!(
            trusted_attempts(&headers(i64::MAX, Some(&tier)), &t, 5).saturating_add(1),
            6,
            "no overflow"
        );
    }

    #[test]
    fn queue_wait_counts_first_deliveries_from_their_publish_time() {
        let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
        let mut h = FieldTable::default();
        set_u64(&mut h, H_PUBLISHED_AT_MS, now_ms.saturating_sub(1_500));
        let wait = queue_wait(&Some(h.clone()), &None).expect("a publish time");
        assert!(wait >= std::time::Duration::from_millis(1_500), "{wait:?}");
        assert!(wait < std::time::Duration::from_secs(60), "{wait:?}");
        // The AMQP timestamp (seconds) when the header is missing.
        let secs = now_ms / 1000 - 10;
        let wait = queue_wait(&None, &Some(secs)).expect("a timestamp");
        assert!(wait >= std::time::Duration::from_secs(9), "{wait:?}");
        // A publish time in the future is no wait; none at all is no figure.
        let mut future = FieldTable::default();
        set_u64(&mut future, H_PUBLISHED_AT_MS, now_ms + 60_000);
        assert_eq!(
            queue_wait(&Some(future), &None),
            Some(std::time::Duration::ZERO)
        );
        assert_eq!(queue_wait(&None, &None), None);
        // Back from a retry tier: not a queue wait.
        let retried = headers(1, Some("rag-ingest.p.retry.1000"));
        assert_eq!(queue_wait(&retried, &Some(secs)), None);
    }

    #[test]
    fn a_poisoned_acker_is_a_lost_channel_not_a_settlement() {
        assert!(settled(Ok(true)).is_ok());
        assert!(matches!(settled(Ok(false)), Err(QueueError::Closed { .. })));
    }
}
