//! Client-side rate limits of a remote embedder: requests per minute and tokens per minute,
//! shared by every request of the worker process, so that requests wait for budget instead
//! of collecting 429 answers from the provider.
//!
//! Each limit is a GCRA token bucket ([`governor`]) refilled continuously at the configured
//! rate. The request bucket holds one request, so requests are evenly spaced; the token
//! bucket holds a tenth of a second's tokens (at least one), and a request costing more is
//! charged in bucket-sized parts, waiting for each. A request is charged its model tokens
//! (the count the embedder's tokenizer made) and one request. Over any interval `T` at most
//! `rate × T` plus one bucket is sent, so a provider's per-minute and per-second limits
//! both hold when the configured rate is at or below them.
//!
//! The limits are per worker process: with several workers, give each its share of the
//! provider's limit (the provider's limit divided by the number of workers), or share one
//! bucket through Redis (`embedder.rate_limit_shared`, [`crate::shared::rate`]): the limits
//! then hold for all workers together, and these buckets only serve while Redis cannot be
//! asked.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::shared::rate::SharedRateLimit;
use crate::telemetry::emit;
use crate::telemetry::events::SharedStateUnavailable;

/// The configured limits (0 = no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// Requests per minute (`embedder.max_requests_per_minute`).
    pub requests_per_minute: u32,
    /// Model tokens per minute (`embedder.max_tokens_per_minute`).
    pub tokens_per_minute: u32,
}

/// The buckets of one embedder.
pub struct RateLimiters {
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<(DefaultDirectRateLimiter, NonZeroU32)>,
    shared: Option<SharedRateLimit>,
}

impl std::fmt::Debug for RateLimiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiters")
            .field("requests", &self.requests.is_some())
            .field(
                "tokens",
                &self.tokens.as_ref().map(|(_, burst)| burst.get()),
            )
            .field("shared", &self.shared)
            .finish()
    }
}

/// A bucket of `per_minute` cells, refilled continuously, holding `per_minute / divisor`
/// cells (at least one); `None` for 0 (no limit).
fn bucket(per_minute: u32, divisor: u32) -> Option<(DefaultDirectRateLimiter, NonZeroU32)> {
    let rate = NonZeroU32::new(per_minute)?;
    let burst = NonZeroU32::new(per_minute / divisor.max(1)).unwrap_or(NonZeroU32::MIN);
    let period = Duration::from_secs(60) / rate.get();
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_minute(rate))
        .allow_burst(burst);
    Some((RateLimiter::direct(quota), burst))
}

impl RateLimiters {
    /// Buckets for `limits`.
    pub fn new(limits: RateLimits) -> Self {
        RateLimiters {
            requests: bucket(limits.requests_per_minute, u32::MAX).map(|(limiter, _)| limiter),
            tokens: bucket(limits.tokens_per_minute, 600),
            shared: None,
        }
    }

    /// These limits, enforced for all workers together by `shared` when it is `Some` (this
    /// worker's own buckets then serve only while Redis cannot be asked).
    pub fn with_shared(mut self, shared: Option<SharedRateLimit>) -> Self {
        self.shared = shared;
        self
    }

    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.requests.is_some() || self.tokens.is_some()
    }

    /// Waits until one request of `tokens` model tokens fits both limits, and takes it from
    /// them. Returns how long it waited. Never fails: a request larger than the token burst
    /// is charged in parts, and if the shared buckets cannot be asked this worker's own
    /// are used ([`SharedStateUnavailable`] is emitted).
    pub async fn acquire(&self, tokens: u64) -> Duration {
        let started = tokio::time::Instant::now();
        if let Some(shared) = &self.shared {
            match shared.acquire(tokens).await {
                Ok(waited) => return waited,
                Err(error) => emit(SharedStateUnavailable {
                    component: "rate_limit",
                    error: &error,
                    consequence: "this worker's own bucket limits the request",
                }),
            }
        }
        if let Some((limiter, burst)) = &self.tokens {
            let mut left = tokens.max(1);
            while left > 0 {
                let part = u32::try_from(left.min(u64::from(burst.get()))).unwrap_or(burst.get());
                let n = NonZeroU32::new(part).unwrap_or(NonZeroU32::MIN);
                // `n` is at most the burst, so the bucket can always take it.
                let _ = limiter.until_n_ready(n).await;
                left -= u64::from(n.get());
            }
        }
        if let Some(limiter) = &self.requests {
            limiter.until_ready().await;
        }
        started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_no_limit() {
        assert!(!RateLimiters::new(RateLimits::default()).is_limited());
        assert!(
            RateLimiters::new(RateLimits {
                requests_per_minute: 1,
                tokens_per_minute: 0
            })
            .is_limited()
        );
    }

    #[tokio::test]
    async fn requests_are_spaced_at_the_rate() {
        // 600 per minute: one at once, then one every 100 ms.
        let limits = RateLimiters::new(RateLimits {
            requests_per_minute: 600,
            tokens_per_minute: 0,
        });
        let started = std::time::Instant::now();
        for _ in 0..6 {
            limits.acquire(1).await;
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(490), "{elapsed:?}");
    }

    #[tokio::test]
    async fn a_request_larger_than_the_burst_is_charged_in_full() {
        // 6,000 tokens per minute: 100 per second, a bucket of 10. 300 tokens: 10 at once,
        // then 290 more at 100 per second.
        let limits = RateLimiters::new(RateLimits {
            requests_per_minute: 0,
            tokens_per_minute: 6_000,
        });
        let waited = limits.acquire(300).await;
        assert!(waited >= Duration::from_millis(2_800), "{waited:?}");
    }
}
