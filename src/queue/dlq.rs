//! The dead-letter queue: putting failed messages there (with their reason), inspecting it
//! without losing anything, and replaying matching messages to the main queue.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

use super::headers::{
    H_ATTEMPTS, H_ERROR, H_ERROR_KIND, H_ERROR_STAGE, H_FIRST_FAILED_AT, H_LANE, H_LAST_FAILED_AT,
    H_PANICS, H_REPROCESSED, death_queues, death_reason, get_str, get_u64, set_str, set_u64,
};
use super::publish::{Publisher, open_channel};
use super::topology::queue_len;
use super::{DLX, EXCHANGE, QueueError, Topology};
use crate::config::PipelineConfig;
use crate::error::ErrorKind;
use crate::lane::Lane;
use crate::message::peek_tenant;
use crate::process::Failure;

/// Publishes a copy of a failed message (original body and properties, plus the failure
/// headers) straight to `queue` and waits for the confirm.
///
/// Used for the DLQ and for delayed-retry tiers. Fails with [`QueueError`]; the caller must
/// then leave the source delivery unacked.
pub(crate) async fn republish_failed(
    publisher: &Publisher,
    queue: &str,
    body: &[u8],
    properties: &BasicProperties,
    failure: &Failure,
    attempts: u64,
) -> Result<(), QueueError> {
    let now = chrono::Utc::now().to_rfc3339();
    let old = properties.headers();
    let mut headers = old.clone().unwrap_or_default();
    if get_str(old, H_FIRST_FAILED_AT).is_none() {
        set_str(&mut headers, H_FIRST_FAILED_AT, &now);
    }
    set_str(&mut headers, H_LAST_FAILED_AT, &now);
    set_str(&mut headers, H_ERROR_KIND, failure.kind.as_str());
    set_str(&mut headers, H_ERROR, &failure.reason);
    set_str(&mut headers, H_ERROR_STAGE, failure.stage.as_str());
    set_u64(&mut headers, H_ATTEMPTS, attempts);
    let props = properties.clone().with_headers(headers);
    publisher.publish("", queue, body, props).await
}

/// Which DLQ messages an operation applies to. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct DlqFilter {
    /// Only this tenant's messages.
    pub tenant: Option<String>,
    /// Only this error kind (`x-error-kind`, or `delivery_limit` for broker dead letters).
    pub kind: Option<String>,
    /// Only this document id.
    pub document: Option<String>,
    /// At most this many matching messages.
    pub limit: Option<usize>,
}

/// One dead-lettered message, as read from the DLQ.
#[derive(Debug, Clone)]
pub struct DlqEntry {
    /// Error kind (`unknown` if the message carries none).
    pub kind: String,
    /// Tenant from the body (`tenant_id`), if it can be read; never the `x-tenant-id`
    /// header, which a producer sets as it likes.
    pub tenant: Option<String>,
    /// Document id from the body, if it can be read.
    pub document_id: Option<String>,
    /// Failure stage.
    pub stage: Option<String>,
    /// Failure reason.
    pub error: Option<String>,
    /// Attempts made.
    pub attempts: Option<u64>,
    /// First failure time.
    pub first_failed_at: Option<String>,
    /// Last failure time.
    pub last_failed_at: Option<String>,
    /// Every header, rendered for display.
    pub headers: BTreeMap<String, String>,
    /// The original body.
    pub body: Vec<u8>,
}

impl DlqEntry {
    /// The entry for a message read from the DLQ; `exchange` is the exchange it was
    /// delivered through: [`DLX`] when the broker dead-lettered it itself (its latest
    /// `x-death` reason is then the kind, whatever `x-error-kind` an earlier delayed retry
    /// left), the default exchange when a worker put it there (its `x-error-kind`).
    pub(crate) fn from_parts(exchange: &str, properties: &BasicProperties, body: &[u8]) -> Self {
        let h = properties.headers();
        let broker_kind = || {
            death_reason(h).map(|r| match r.as_str() {
                "delivery_limit" => ErrorKind::DeliveryLimit.as_str().to_string(),
                other => other.to_string(),
            })
        };
        let kind = if exchange == DLX {
            broker_kind().or_else(|| get_str(h, H_ERROR_KIND))
        } else {
            get_str(h, H_ERROR_KIND).or_else(broker_kind)
        }
        .unwrap_or_else(|| "unknown".into());
        let document_id = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("document_id")?.as_str().map(str::to_owned));
        let headers = h
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), render(v)))
                    .collect()
            })
            .unwrap_or_default();
        DlqEntry {
            kind,
            // The body's tenant: the `x-tenant-id` header is the producer's claim, and the
            // DLQ also holds messages rejected because the two disagree.
            tenant: peek_tenant(body),
            document_id,
            stage: get_str(h, H_ERROR_STAGE),
            error: get_str(h, H_ERROR),
            attempts: get_u64(h, H_ATTEMPTS),
            first_failed_at: get_str(h, H_FIRST_FAILED_AT),
            last_failed_at: get_str(h, H_LAST_FAILED_AT),
            headers,
            body: body.to_vec(),
        }
    }

    fn matches(&self, filter: &DlqFilter) -> bool {
        filter
            .tenant
            .as_ref()
            .is_none_or(|t| self.tenant.as_ref() == Some(t))
            && filter.kind.as_ref().is_none_or(|k| &self.kind == k)
            && filter
                .document
                .as_ref()
                .is_none_or(|d| self.document_id.as_ref() == Some(d))
    }
}

fn render(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        other => format!("{other:?}"),
    }
}

/// Counts of DLQ messages by kind, tenant and stage.
#[derive(Debug, Clone, Default)]
pub struct DlqSummary {
    /// Messages read.
    pub total: usize,
    /// Count per error kind.
    pub by_kind: BTreeMap<String, usize>,
    /// Count per tenant (`-` for none).
    pub by_tenant: BTreeMap<String, usize>,
    /// Count per stage (`-` for none).
    pub by_stage: BTreeMap<String, usize>,
    /// Earliest `x-last-failed-at` seen.
    pub oldest: Option<String>,
    /// Latest `x-last-failed-at` seen.
    pub newest: Option<String>,
}

impl DlqSummary {
    fn add(&mut self, e: &DlqEntry) {
        self.total += 1;
        *self.by_kind.entry(e.kind.clone()).or_default() += 1;
        *self
            .by_tenant
            .entry(e.tenant.clone().unwrap_or_else(|| "-".into()))
            .or_default() += 1;
        *self
            .by_stage
            .entry(e.stage.clone().unwrap_or_else(|| "-".into()))
            .or_default() += 1;
        if let Some(t) = &e.last_failed_at {
            if self.oldest.as_ref().is_none_or(|o| t < o) {
                self.oldest = Some(t.clone());
            }
            if self.newest.as_ref().is_none_or(|n| t > n) {
                self.newest = Some(t.clone());
            }
        }
    }
}

/// Reads every message the DLQ holds when the call starts and returns the summary plus the
/// entries matching `filter` (up to its limit). Nothing is removed: the messages are fetched
/// unacknowledged and handed back to the broker (in the order read) before the channel
/// closes. Messages dead-lettered while it runs are left alone.
///
/// Fails with [`QueueError`] if the broker cannot be reached.
pub async fn inspect_dlq(
    config: &PipelineConfig,
    filter: &DlqFilter,
) -> Result<(DlqSummary, Vec<DlqEntry>), QueueError> {
    let topology = Topology::new(config);
    let (conn, channel) = open_channel(config, &topology).await?;
    let present = queue_len(&channel, &topology.dlq()).await?;
    let mut summary = DlqSummary::default();
    let mut selected = Vec::new();
    let mut held = Vec::new();
    while let Some(msg) = next_present(&channel, &topology, present, held.len()).await? {
        let entry = DlqEntry::from_parts(
            msg.delivery.exchange.as_str(),
            &msg.delivery.properties,
            &msg.delivery.data,
        );
        summary.add(&entry);
        if entry.matches(filter) && filter.limit.is_none_or(|l| selected.len() < l) {
            selected.push(entry);
        }
        held.push(msg.delivery.delivery_tag);
    }
    release(&channel, &topology.dlq(), &held, present as usize).await;
    super::close_channel(&channel, "inspected").await;
    super::close_connection(&conn, "inspected").await;
    Ok((summary, selected))
}

/// What a reprocess run did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default)]
pub struct ReprocessReport {
    /// Messages moved (or that would be moved) back to the main queue.
    pub moved: DlqSummary,
    /// Messages left in the DLQ.
    pub kept: usize,
}

/// Moves DLQ messages matching `filter` back to the main queue: attempts and failure
/// headers are cleared, `x-reprocessed` is incremented, body and other properties are kept.
/// Each message is acked from the DLQ only after its copy is confirmed. With `dry_run`
/// nothing changes. `on_progress` is called after each message read.
///
/// Only the messages the DLQ holds when the call starts are considered, so a message that
/// fails again and is dead-lettered anew while this runs (a worker is consuming) is not
/// replayed a second time — without that bound the call never ends while a worker keeps
/// failing the replayed messages.
///
/// Fails with [`QueueError`]; a message whose copy was not confirmed stays in the DLQ.
pub async fn reprocess(
    config: &PipelineConfig,
    filter: &DlqFilter,
    dry_run: bool,
    mut on_progress: impl FnMut(usize),
) -> Result<ReprocessReport, QueueError> {
    let topology = Topology::new(config);
    let (conn, channel) = open_channel(config, &topology).await?;
    let publisher = Publisher::new(channel.clone(), config.broker.confirm_timeout());
    let mut report = ReprocessReport::default();
    let mut held = Vec::new();
    let mut seen = 0usize;
    let mut present = 0u32;
    let result: Result<(), QueueError> = async {
        present = queue_len(&channel, &topology.dlq()).await?;
        while let Some(msg) = next_present(&channel, &topology, present, seen).await? {
            seen += 1;
            on_progress(seen);
            let d = msg.delivery;
            let entry = DlqEntry::from_parts(d.exchange.as_str(), &d.properties, &d.data);
            let wanted =
                entry.matches(filter) && filter.limit.is_none_or(|l| report.moved.total < l);
            if !wanted || dry_run {
                if wanted {
                    report.moved.add(&entry);
                } else {
                    report.kept += 1;
                }
                held.push(d.delivery_tag);
                continue;
            }
            let key = topology.lane_routing_key(replay_lane(&d.properties, &topology));
            let props = replay_properties(&d.properties);
            publisher.publish(EXCHANGE, &key, &d.data, props).await?;
            channel
                .basic_ack(d.delivery_tag, BasicAckOptions::default())
                .await?;
            report.moved.add(&entry);
        }
        Ok(())
    }
    .await;
    // Ready again afterwards: the held messages plus those never read.
    let unread = (present as usize).saturating_sub(seen);
    release(&channel, &topology.dlq(), &held, held.len() + unread).await;
    super::close_channel(&channel, "reprocessed").await;
    super::close_connection(&conn, "reprocessed").await;
    result.map(|()| report)
}

/// The next DLQ message, unless `read` of the `present` messages (the DLQ's length when
/// the operation started) have been read already.
async fn next_present(
    channel: &Channel,
    topology: &Topology,
    present: u32,
    read: usize,
) -> Result<Option<lapin::message::BasicGetMessage>, QueueError> {
    if read >= present as usize {
        return Ok(None);
    }
    Ok(channel
        .basic_get(topology.dlq().into(), BasicGetOptions { no_ack: false })
        .await?)
}

/// The lane a DLQ message is replayed to: the bulk lane for a message the worker marked
/// `x-lane: bulk` or that the broker dead-lettered from a bulk-lane queue, else the live
/// lane.
fn replay_lane(properties: &BasicProperties, topology: &Topology) -> Lane {
    let headers = properties.headers();
    if get_str(headers, H_LANE).as_deref().and_then(Lane::parse) == Some(Lane::Bulk) {
        return Lane::Bulk;
    }
    let bulk = format!("{}.", topology.lane_queue(Lane::Bulk));
    let bulk_queue = topology.lane_queue(Lane::Bulk);
    if death_queues(headers)
        .iter()
        .any(|q| *q == bulk_queue || q.starts_with(&bulk))
    {
        Lane::Bulk
    } else {
        Lane::Live
    }
}

fn replay_properties(properties: &BasicProperties) -> BasicProperties {
    let old = properties.headers();
    let reprocessed = get_u64(old, H_REPROCESSED).unwrap_or(0).saturating_add(1);
    let mut headers = FieldTable::default();
    if let Some(table) = old {
        for (k, v) in table.inner() {
            let drop = matches!(
                k.as_str(),
                H_ATTEMPTS
                    | H_ERROR
                    | H_ERROR_KIND
                    | H_ERROR_STAGE
                    | H_FIRST_FAILED_AT
                    | H_LAST_FAILED_AT
                    | H_REPROCESSED
                    | H_PANICS
                    | "x-death"
                    | "x-first-death-exchange"
                    | "x-first-death-queue"
                    | "x-first-death-reason"
                    | "x-last-death-exchange"
                    | "x-last-death-queue"
                    | "x-last-death-reason"
                    | "x-delivery-count"
            );
            if !drop {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
    set_u64(&mut headers, H_REPROCESSED, reprocessed);
    properties.clone().with_headers(headers)
}

/// Hands held deliveries back to the broker (requeue, in the order read, so the DLQ keeps
/// its order) and waits until `dlq` has at least `ready` ready messages again, for at most
/// 5 s. A quorum queue applies returns asynchronously: without the wait, a caller reading
/// the queue length (or inspecting again) right after this returns could see fewer messages
/// than the DLQ holds, and a following inspection would read them in another order.
///
/// The nacks get at most [`CLOSE_TIMEOUT`](super::CLOSE_TIMEOUT) and the wait its 5 s, each
/// await included: on a connection the broker has blocked (a memory or disk alarm, after a
/// replay's publish) neither a nack nor the length query goes out. Nothing is lost then: the
/// caller closes the connection, and the broker requeues what it held.
async fn release(channel: &Channel, dlq: &str, tags: &[u64], ready: usize) {
    let nacks = async {
        for tag in tags {
            let _ = channel
                .basic_nack(
                    *tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await;
        }
    };
    if tokio::time::timeout(super::CLOSE_TIMEOUT, nacks)
        .await
        .is_err()
    {
        return;
    }
    let settled = async {
        loop {
            match queue_len(channel, dlq).await {
                Ok(n) if n as usize >= ready => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), settled).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::H_TENANT;
    use lapin::types::{FieldArray, LongString};

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.to_string()))
    }

    fn properties(pairs: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut h = FieldTable::default();
        for (k, v) in pairs {
            h.insert((*k).into(), v.clone());
        }
        BasicProperties::default().with_headers(h)
    }

    fn death(reason: &str, queue: &str) -> AMQPValue {
        let mut d = FieldTable::default();
        d.insert("reason".into(), long(reason));
        d.insert("queue".into(), long(queue));
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(d)]))
    }

    const BODY: &[u8] = br#"{"schema":1,"tenant_id":"acme","document_id":"d","content":"x"}"#;

    #[test]
    fn a_broker_dead_letter_shows_its_death_reason_over_a_stale_error_kind() {
        let p = properties(&[
            (H_ERROR_KIND, long("embedder_unavailable")),
            ("x-death", death("delivery_limit", "rag-ingest.p")),
        ]);
        assert_eq!(DlqEntry::from_parts(DLX, &p, BODY).kind, "delivery_limit");
        // Put there by a worker (default exchange): its own kind.
        assert_eq!(
            DlqEntry::from_parts("", &p, BODY).kind,
            "embedder_unavailable"
        );
    }

    #[test]
    fn the_tenant_is_the_bodys_never_the_header() {
        let p = properties(&[(H_TENANT, long("globex"))]);
        let e = DlqEntry::from_parts("", &p, BODY);
        assert_eq!(e.tenant.as_deref(), Some("acme"));
        let filter = DlqFilter {
            tenant: Some("globex".into()),
            ..DlqFilter::default()
        };
        assert!(!e.matches(&filter));
    }

    #[test]
    fn replay_counts_saturate() {
        let p = properties(&[(H_REPROCESSED, AMQPValue::LongLongInt(i64::MAX))]);
        let out = replay_properties(&p);
        assert_eq!(get_u64(out.headers(), H_REPROCESSED), Some(i64::MAX as u64));
    }
}
