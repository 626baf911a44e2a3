//! The in-flight byte budget (`worker.max_inflight_bytes`): the consume loop takes a
//! delivery only while the messages being processed are estimated to occupy less than the
//! budget, so the working set stays bounded whatever the documents' sizes, on top of the
//! message count bound (`worker.concurrency`).
//!
//! A message is counted at what it may occupy while it is processed, not at its body size:
//! its metadata is copied into every chunk, so a small body can expand a hundredfold. The
//! estimate ([`MessageFootprint::estimate_body`]) reads the body's content length and
//! metadata size (a parse of the body, before it is decoded for processing) and counts:
//!
//! - the body twice (the raw bytes and the parsed JSON tree);
//! - the content four times (the decoded document, the chunk texts with their overlap, the
//!   payload texts, their encoding for the store);
//! - one chunk per `chunking.max_tokens − chunking.overlap` bytes of content, plus one (as
//!   if every token were a single byte and every chunk full, which hostile text can come
//!   close to; ordinary text has about four bytes per token);
//! - per chunk: the metadata three times (the chunk's payload, its JSON value for the store,
//!   its encoding in the write request or WAL record), measured as `limits.max_metadata_bytes`
//!   counts it (compact JSON plus 32 bytes per key and value, about its size in memory); the
//!   vector three times (`dims` × 4 bytes each: the embedding, the stored copy, its
//!   encoding); and 512 bytes for the other payload fields.
//!
//! A body that is not a JSON object, or whose metadata is over the limit, is rejected at
//! decode before anything is chunked: it counts twice its size.
//! [`MessageFootprint::estimate`] is the same count for the worst body of a given size the
//! limits allow (as much content and metadata as fit).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::PipelineConfig;

/// What a message may occupy while it is processed, estimated from its body size and the
/// pipeline's limits (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageFootprint {
    /// `limits.max_document_bytes`.
    pub max_document_bytes: usize,
    /// `limits.max_metadata_bytes`.
    pub max_metadata_bytes: usize,
    /// Fewest content bytes per chunk assumed: `chunking.max_tokens − chunking.overlap`
    /// (at least 1).
    pub chunk_bytes: usize,
    /// Values per vector.
    pub dims: usize,
}

impl MessageFootprint {
    /// The footprint of messages of `config`'s pipeline, whose embedder makes vectors of
    /// `dims` values.
    pub fn new(config: &PipelineConfig, dims: usize) -> Self {
        MessageFootprint {
            max_document_bytes: config.limits.max_document_bytes,
            max_metadata_bytes: config.limits.max_metadata_bytes,
            chunk_bytes: config
                .chunking
                .max_tokens
                .saturating_sub(config.chunking.overlap)
                .max(1),
            dims,
        }
    }

    /// Chunks assumed for `content_bytes` of content.
    pub fn chunks(&self, content_bytes: usize) -> usize {
        (content_bytes.min(self.max_document_bytes) / self.chunk_bytes.max(1)).saturating_add(1)
    }

    /// Bytes a message with this body may occupy while it is processed (see the module
    /// documentation). Saturates instead of overflowing.
    pub fn estimate_body(&self, body: &[u8]) -> usize {
        let rejected = body.len().saturating_mul(2);
        let Ok(peek) = serde_json::from_slice::<Peek<'_>>(body) else {
            return rejected;
        };
        let metadata = match &peek.metadata {
            None | Some(serde_json::Value::Null) => 2,
            Some(serde_json::Value::Object(map)) => crate::message::metadata_size(map),
            Some(_) => return rejected,
        };
        if metadata > self.max_metadata_bytes {
            return rejected;
        }
        let content = peek.content.as_deref().map_or(0, str::len);
        self.count(body.len(), content, metadata)
    }

    /// Bytes the worst message with a body of `body_bytes` may occupy: as much content as
    /// the body and `max_document_bytes` allow, and metadata at its limit (or 17 times the
    /// body when that is less: a value takes at least 2 bytes of JSON and counts 32 more).
    /// Saturates instead of overflowing.
    pub fn estimate(&self, body_bytes: usize) -> usize {
        let content = body_bytes.min(self.max_document_bytes);
        let metadata = self.max_metadata_bytes.min(body_bytes.saturating_mul(17));
        self.count(body_bytes, content, metadata)
    }

    /// The count of the module documentation for a body of `body` bytes holding `content`
    /// bytes of content and metadata of size `metadata`.
    fn count(&self, body: usize, content: usize, metadata: usize) -> usize {
        let per_chunk = metadata
            .saturating_mul(3)
            .saturating_add(self.dims.saturating_mul(4 * 3))
            .saturating_add(512);
        body.saturating_mul(2)
            .saturating_add(content.saturating_mul(4))
            .saturating_add(self.chunks(content).saturating_mul(per_chunk))
    }
}

/// The fields of a message body the footprint depends on (unknown fields are skipped).
#[derive(serde::Deserialize)]
struct Peek<'a> {
    /// Borrowed from the body unless it holds escapes.
    #[serde(borrow, default)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

/// Bytes of the messages being processed, against a limit. Cloning shares the count.
#[derive(Debug, Clone)]
pub(crate) struct ByteBudget {
    limit: usize,
    used: Arc<AtomicUsize>,
    /// How a body size becomes the bytes counted; `None` counts the body itself.
    footprint: Option<MessageFootprint>,
}

impl ByteBudget {
    /// A budget of `limit` bytes, none in use, counting each message at its body size.
    pub(crate) fn new(limit: usize) -> Self {
        ByteBudget {
            limit,
            used: Arc::new(AtomicUsize::new(0)),
            footprint: None,
        }
    }

    /// This budget, counting each message at `footprint`'s estimate instead of its body size.
    pub(crate) fn with_footprint(mut self, footprint: MessageFootprint) -> Self {
        self.footprint = Some(footprint);
        self
    }

    /// Whether another delivery may be taken: the messages in flight are counted at less than
    /// the limit. So in-flight bytes stay below the limit plus one message, and a message
    /// counted at more than the limit is still taken, when nothing else is in flight.
    pub(crate) fn has_room(&self) -> bool {
        self.in_flight() < self.limit
    }

    /// Bytes counted as in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Counts a message with this body as in flight (at its footprint's
    /// [`MessageFootprint::estimate_body`] if the budget has one, else at its size) until the
    /// returned guard is dropped (when the message's task ends, however it ends).
    pub(crate) fn admit_body(&self, body: &[u8]) -> Admitted {
        let bytes = self
            .footprint
            .map_or(body.len(), |footprint| footprint.estimate_body(body));
        self.admit(bytes)
    }

    /// Counts `bytes` as in flight until the returned guard is dropped.
    pub(crate) fn admit(&self, bytes: usize) -> Admitted {
        self.used.fetch_add(bytes, Ordering::AcqRel);
        Admitted {
            used: Arc::clone(&self.used),
            bytes,
        }
    }
}

/// One message's bytes in a [`ByteBudget`]; dropping it gives them back.
#[derive(Debug)]
pub(crate) struct Admitted {
    used: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_while_below_the_limit_and_gives_back_on_drop() {
        let budget = ByteBudget::new(5_000);
        assert!(budget.has_room());
        let a = budget.admit(2_000);
        let b = budget.admit(2_000);
        assert!(budget.has_room(), "4,000 of 5,000 in flight");
        let c = budget.admit(2_000);
        assert_eq!(budget.in_flight(), 6_000);
        assert!(!budget.has_room(), "6,000 of 5,000 in flight");
        drop(b);
        assert_eq!(budget.in_flight(), 4_000);
        assert!(budget.has_room());
        drop((a, c));
        assert_eq!(budget.in_flight(), 0);
    }

    #[test]
    fn a_body_over_the_limit_is_taken_alone() {
        let budget = ByteBudget::new(100);
        let big = budget.admit(1_000);
        assert!(
            !budget.has_room(),
            "nothing else while the big body is in flight"
        );
        drop(big);
        assert!(budget.has_room());
    }

    #[test]
    fn messages_are_counted_at_their_estimated_footprint() {
        let footprint = MessageFootprint {
            max_document_bytes: 1_000_000,
            max_metadata_bytes: 16 * 1024,
            chunk_bytes: 100,
            dims: 384,
        };
        let vectors = 3 * 384 * 4 + 512;
        // 1,000 bytes of content (11 chunks) and metadata {"t":"x"}: 9 bytes + 2 × 32.
        let body = format!(
            r#"{{"schema":1,"content":"{}","metadata":{{"t":"x"}}}}"#,
            "a".repeat(1_000)
        );
        assert_eq!(
            footprint.estimate_body(body.as_bytes()),
            2 * body.len() + 4 * 1_000 + 11 * (3 * 73 + vectors)
        );
        // The same content with 10,000 bytes of metadata counts far more.
        let heavy = format!(
            r#"{{"schema":1,"content":"{}","metadata":{{"t":"{}"}}}}"#,
            "a".repeat(1_000),
            "x".repeat(10_000)
        );
        assert_eq!(
            footprint.estimate_body(heavy.as_bytes()),
            2 * heavy.len() + 4 * 1_000 + 11 * (3 * (10_008 + 64) + vectors)
        );
        // Not JSON, or metadata over the limit: rejected at decode, counted at twice the body.
        assert_eq!(footprint.estimate_body(b"nope"), 8);
        let over = format!(
            r#"{{"content":"a","metadata":{{"t":"{}"}}}}"#,
            "x".repeat(20_000)
        );
        assert_eq!(footprint.estimate_body(over.as_bytes()), 2 * over.len());
        // The worst body of a size: metadata at its limit, content filling the body.
        assert_eq!(
            footprint.estimate(10_000),
            2 * 10_000 + 4 * 10_000 + 101 * (3 * 16 * 1024 + vectors)
        );
        assert_eq!(footprint.estimate(usize::MAX), usize::MAX);

        let budget = ByteBudget::new(1_000_000).with_footprint(footprint);
        let held = budget.admit_body(heavy.as_bytes());
        assert_eq!(
            budget.in_flight(),
            footprint.estimate_body(heavy.as_bytes())
        );
        drop(held);
        assert_eq!(budget.in_flight(), 0);
    }

    #[test]
    fn clones_share_the_count() {
        let budget = ByteBudget::new(10);
        let clone = budget.clone();
        let held = clone.admit(10);
        assert!(!budget.has_room());
        drop(held);
        assert!(budget.has_room());
    }
}
