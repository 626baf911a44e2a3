//! Header names and helpers for reading and writing AMQP header tables.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Taxonomy kind of the failure that dead-lettered a message.
pub const H_ERROR_KIND: &str = "x-error-kind";
/// Human-readable cause.
pub const H_ERROR: &str = "x-error";
/// Stage at which it failed.
pub const H_ERROR_STAGE: &str = "x-error-stage";
/// Attempts made so far (deliveries that failed).
pub const H_ATTEMPTS: &str = "x-attempts";
/// RFC 3339 time of the first failure.
pub const H_FIRST_FAILED_AT: &str = "x-first-failed-at";
/// RFC 3339 time of the latest failure.
pub const H_LAST_FAILED_AT: &str = "x-last-failed-at";
/// How many times the message was replayed from the DLQ.
pub const H_REPROCESSED: &str = "x-reprocessed";
/// How many times processing this message panicked (set by the worker when it hands a
/// panicked delivery back; see `worker::delivery::give_up_on_panic`).
pub const H_PANICS: &str = "x-panics";
/// Tenant of the document (set by the submitter).
pub const H_TENANT: &str = "x-tenant-id";
/// The lane a message was published to, `bulk` for the bulk lane (set by the submitter, and
/// by the worker on the DLQ copy of a bulk message, so `reprocess` puts it back there).
/// Routing is by routing key; the header only records it.
pub const H_LANE: &str = "x-lane";
/// Unix time in milliseconds when the producer published the message (set by the
/// submitter): the start of the queue wait (`rag_ingest_queue_wait_seconds`).
pub const H_PUBLISHED_AT_MS: &str = "x-published-at-ms";

/// Reads header `name` as a string (short or long string), if present.
pub(crate) fn get_str(headers: &Option<FieldTable>, name: &str) -> Option<String> {
    let value = headers.as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Reads header `name` as a non-negative integer of any AMQP integer width, if present.
pub(crate) fn get_u64(headers: &Option<FieldTable>, name: &str) -> Option<u64> {
    let value = headers.as_ref()?.inner().get(name)?;
    let n: i128 = match value {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => (*v).into(),
        AMQPValue::Timestamp(v) => (*v).into(),
        _ => return None,
    };
    u64::try_from(n).ok()
}

/// Sets header `name` to a string value.
pub(crate) fn set_str(table: &mut FieldTable, name: &str, value: &str) {
    table.insert(
        ShortString::from(name),
        AMQPValue::LongString(LongString::from(value.to_string())),
    );
}

/// Sets header `name` to an integer value.
pub(crate) fn set_u64(table: &mut FieldTable, name: &str, value: u64) {
    table.insert(
        ShortString::from(name),
        AMQPValue::LongLongInt(i64::try_from(value).unwrap_or(i64::MAX)),
    );
}

/// The `reason` of the first `x-death` entry, as RabbitMQ records it when it dead-letters
/// a message itself (e.g. `delivery_limit`, `expired`, `rejected`).
pub(crate) fn death_reason(headers: &Option<FieldTable>) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = headers.as_ref()?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    get_str(&Some(first.clone()), "reason")
}

/// The `queue` of every `x-death` entry (the queues the broker dead-lettered the message
/// from, most recent first).
pub(crate) fn death_queues(headers: &Option<FieldTable>) -> Vec<String> {
    let Some(AMQPValue::FieldArray(deaths)) =
        headers.as_ref().and_then(|h| h.inner().get("x-death"))
    else {
        return Vec::new();
    };
    deaths
        .as_slice()
        .iter()
        .filter_map(|d| match d {
            AMQPValue::FieldTable(entry) => get_str(&Some(entry.clone()), "queue"),
            _ => None,
        })
        .collect()
}
