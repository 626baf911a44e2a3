//! Per-message token metering: the model tokens a message's processing embedded, counted
//! from the very numbers `rag_ingest_tokens_embedded_total` adds up (the
//! [`ChunksEmbedded`](crate::telemetry::events::ChunksEmbedded) event records them here too),
//! so a tenant's budget is charged exactly what the metric shows.
//!
//! The worker runs each message inside [`metered`]; every embedding call made while it runs
//! (in-process retries included: their tokens were spent too) adds to its total.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

tokio::task_local! {
    static METER: Arc<AtomicU64>;
}

/// Runs `work` and returns its output with the model tokens embedded while it ran.
pub async fn metered<F: Future>(work: F) -> (F::Output, u64) {
    let meter = Arc::new(AtomicU64::new(0));
    let output = METER.scope(Arc::clone(&meter), work).await;
    (output, meter.load(Ordering::Relaxed))
}

/// Adds `tokens` to the meter of the calling task, if it runs inside [`metered`].
pub fn record(tokens: u64) {
    let _ = METER.try_with(|meter| meter.fetch_add(tokens, Ordering::Relaxed));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_recorded_inside_are_counted_and_outside_ignored() {
        record(5);
        let ((), tokens) = metered(async {
            record(3);
            tokio::task::yield_now().await;
            record(4);
        })
        .await;
        assert_eq!(tokens, 7);
    }
}
