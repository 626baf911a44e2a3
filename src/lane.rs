//! Lanes: live traffic and bulk traffic (backfills) travel separate queues, so that a
//! tenant's backfill cannot hold back anyone's fresh edits.
//!
//! - [`Lane::Live`] is the pipeline's main queue, as before: edits as they happen.
//! - [`Lane::Bulk`] is a second quorum queue, `rag-ingest.<P>.bulk` (routing key `<P>.bulk`),
//!   for backfills and re-imports (`rag-ingest submit --bulk`, or a producer publishing with
//!   that routing key). A worker consumes both, but bulk messages may take at most
//!   `worker.bulk_concurrency` of its `worker.concurrency` slots (and a matching share of
//!   `worker.max_inflight_bytes`), so live messages always find a free slot; inside the
//!   embedder their chunks queue behind every live chunk ([`current`] tells the embedder
//!   which lane the calling message came from).
//!
//! **Order per document across lanes.** Versioned messages are ordered by the store
//! whatever lane each took: a write replaces only older versions, so a backfill's version 1
//! processed after a live version 2 is skipped as stale (see `docs/storage.md`, "newest
//! wins"). Unversioned messages are ordered by when they are processed ("last processed
//! wins"), which would let a backfill processed late overwrite the live edits published
//! after it; so the bulk lane takes versioned messages only: a worker dead-letters a bulk
//! message without a `version` as `invalid_field`, and `submit --bulk` refuses to publish
//! without `--version`.
//!
//! The lane of the message being processed is a task-local value set by the worker around
//! each message ([`scope`]); code outside such a scope sees [`Lane::Live`].

use std::future::Future;

/// Which lane a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Lane {
    /// Live traffic: the pipeline's main queue.
    #[default]
    Live,
    /// Bulk traffic (backfills): a queue of its own, consumed at a bounded share.
    Bulk,
}

impl Lane {
    /// Both lanes, live first.
    pub const ALL: [Lane; 2] = [Lane::Live, Lane::Bulk];

    /// `live` or `bulk` (metric label, header value).
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Live => "live",
            Lane::Bulk => "bulk",
        }
    }

    /// The lane named `name` (`live` or `bulk`, ASCII case ignored), if any.
    pub fn parse(name: &str) -> Option<Lane> {
        if name.eq_ignore_ascii_case("live") {
            Some(Lane::Live)
        } else if name.eq_ignore_ascii_case("bulk") {
            Some(Lane::Bulk)
        } else {
            None
        }
    }
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

tokio::task_local! {
    static CURRENT: Lane;
}

/// Runs `work` with `lane` as the [`current`] lane (for every await inside it).
pub async fn scope<F: Future>(lane: Lane, work: F) -> F::Output {
    CURRENT.scope(lane, work).await
}

/// The lane of the message the calling task is processing; [`Lane::Live`] outside a
/// [`scope`].
pub fn current() -> Lane {
    CURRENT.try_with(|lane| *lane).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_lane_is_seen_inside_its_scope_only() {
        assert_eq!(current(), Lane::Live);
        let inside = scope(Lane::Bulk, async {
            tokio::task::yield_now().await;
            current()
        })
        .await;
        assert_eq!(inside, Lane::Bulk);
        assert_eq!(current(), Lane::Live);
        assert_eq!(Lane::parse("BULK"), Some(Lane::Bulk));
        assert_eq!(Lane::parse("x"), None);
    }
}
