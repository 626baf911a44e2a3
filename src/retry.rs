//! Retry policy for transient failures: bounded in-process retries with exponential backoff
//! and jitter (`backon`), and the choice of delayed-retry tier once those are spent.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use crate::config::RetryConfig;
use crate::process::Failure;

/// The in-process backoff for one attempt: `in_process_retries` retries starting at
/// `backoff_min_ms`, doubling with jitter, capped at `backoff_max_ms`.
pub fn backoff(config: &RetryConfig) -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_jitter()
        .with_min_delay(Duration::from_millis(config.backoff_min_ms))
        .with_max_delay(Duration::from_millis(config.backoff_max_ms))
        .with_max_times(config.in_process_retries as usize)
}

/// Runs `op`, retrying it in process while it fails transiently, as `config` allows.
///
/// Returns the first success, the first permanent failure, or the last transient failure
/// once the retries are spent. `on_retry` is told of every failure that will be retried.
pub async fn with_retries<T, F, Fut>(
    config: &RetryConfig,
    op: F,
    mut on_retry: impl FnMut(&Failure, Duration),
) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    op.retry(backoff(config))
        .sleep(tokio::time::sleep)
        .when(|f: &Failure| f.kind.is_transient())
        .notify(|f: &Failure, d: Duration| on_retry(f, d))
        .await
}

/// The delayed-retry tier (its delay in milliseconds) for a message that has failed
/// `attempts` times (1-based): tier `attempts - 1`, the last tier once past the end.
pub fn tier_delay(config: &RetryConfig, attempts: u32) -> u64 {
    let index = (attempts.saturating_sub(1) as usize).min(config.delays_ms.len().saturating_sub(1));
    config.delays_ms.get(index).copied().unwrap_or(1_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorKind, Stage};
    use std::sync::atomic::{AtomicU32, Ordering};

    fn config() -> RetryConfig {
        RetryConfig {
            in_process_retries: 2,
            backoff_min_ms: 1,
            backoff_max_ms: 2,
            ..RetryConfig::default()
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_the_limit() {
        let calls = AtomicU32::new(0);
        let mut notified = 0;
        let result: Result<(), Failure> = with_retries(
            &config(),
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Failure::new(
                    ErrorKind::StoreUnavailable,
                    Stage::Store,
                    "down",
                ))
            },
            |_, _| notified += 1,
        )
        .await;
        assert_eq!(result.map_err(|f| f.kind), Err(ErrorKind::StoreUnavailable));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(notified, 2);
    }

    #[tokio::test]
    async fn permanent_failures_are_not_retried() {
        let calls = AtomicU32::new(0);
        let result: Result<(), Failure> = with_retries(
            &config(),
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Failure::new(ErrorKind::StoreRejected, Stage::Store, "no"))
            },
            |_, _| {},
        )
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn tiers_climb_then_stay_on_the_last() {
        let c = RetryConfig {
            delays_ms: vec![10, 20],
            ..RetryConfig::default()
        };
        assert_eq!(tier_delay(&c, 1), 10);
        assert_eq!(tier_delay(&c, 2), 20);
        assert_eq!(tier_delay(&c, 9), 20);
    }
}
