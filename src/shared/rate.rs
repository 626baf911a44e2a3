//! The provider rate limit shared by every worker of a pipeline
//! (`embedder.rate_limit_shared`): `embedder.max_requests_per_minute` and
//! `max_tokens_per_minute` are the limits of all workers together, enforced by one GCRA
//! bucket per limit in Redis (`<prefix>:<pipeline>:rate:requests` and `…:tokens`).
//!
//! Each request reserves its cost (one request, its model tokens) in one script call, which
//! moves the bucket's theoretical arrival time on and answers how long the caller must wait
//! before sending; callers wait in the order they reserved. The buckets hold what the
//! worker's own buckets hold ([`crate::embed::rate`]): one request, and a tenth of a
//! second's tokens. So over any interval `T` all workers together send at most `rate × T`
//! plus one bucket.
//!
//! If Redis cannot be asked, the worker falls back to its own bucket at the same rate (fail
//! open): with N workers up to N times the rate may be sent until Redis answers again, and
//! the provider's 429 answers are retried as usual. Stopping every worker because the
//! limiter's store is down would turn a Redis outage into an ingestion outage, while the
//! provider enforces its limit anyway.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;

use super::{Redis, SharedError};

/// Reserves `ARGV[3]` cells of bucket `ARGV[1]` (a cell every `ARGV[2]` µs, `ARGV[4]` µs
/// of burst; 0 µs per cell: no bucket) and `ARGV[7]` cells of bucket `ARGV[5]` (likewise
/// `ARGV[6]`, `ARGV[8]`); answers the µs to wait before sending.
const RESERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait = 0
for i = 0, 1 do
  local key = ARGV[1 + 4 * i]
  local per_cell = tonumber(ARGV[2 + 4 * i])
  local cost = tonumber(ARGV[3 + 4 * i])
  local burst = tonumber(ARGV[4 + 4 * i])
  if per_cell > 0 then
    local tat = tonumber(redis.call('GET', key) or '0')
    if tat < now then tat = now end
    local new_tat = tat + per_cell * cost
    local ready = new_tat - burst - now
    if ready > wait then wait = ready end
    local ttl_ms = math.floor((new_tat - now) / 1000) + 60000
    redis.call('SET', key, string.format('%d', new_tat), 'PX', ttl_ms)
  end
end
return math.floor(wait)
";

/// One bucket: µs per cell and µs of burst (0 µs per cell: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    per_cell_us: u64,
    burst_us: u64,
}

impl Bucket {
    /// `per_minute` cells per minute holding `per_minute / divisor` cells (at least one).
    fn new(per_minute: u32, divisor: u32) -> Self {
        if per_minute == 0 {
            return Bucket {
                per_cell_us: 0,
                burst_us: 0,
            };
        }
        let per_cell_us = 60_000_000 / u64::from(per_minute);
        let cells = u64::from((per_minute / divisor.max(1)).max(1));
        Bucket {
            per_cell_us: per_cell_us.max(1),
            burst_us: per_cell_us.max(1).saturating_mul(cells),
        }
    }
}

/// The shared buckets of one pipeline (see the module documentation). Cloning shares them.
#[derive(Clone)]
pub struct SharedRateLimit {
    redis: Arc<Redis>,
    requests: Bucket,
    tokens: Bucket,
    script: Arc<Script>,
}

impl std::fmt::Debug for SharedRateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRateLimit")
            .field("redis", &self.redis.url())
            .field("requests", &self.requests)
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl SharedRateLimit {
    /// Buckets of `requests_per_minute` requests and `tokens_per_minute` model tokens (0: no
    /// limit) for all workers sharing `redis`'s pipeline keys.
    pub fn new(redis: Arc<Redis>, requests_per_minute: u32, tokens_per_minute: u32) -> Self {
        SharedRateLimit {
            redis,
            requests: Bucket::new(requests_per_minute, u32::MAX),
            tokens: Bucket::new(tokens_per_minute, 600),
            script: Arc::new(Script::new(RESERVE)),
        }
    }

    /// The server URL, password redacted.
    pub fn url(&self) -> &str {
        self.redis.url()
    }

    /// Reserves one request of `tokens` model tokens and waits until it may be sent; returns
    /// how long it waited.
    ///
    /// Fails with [`SharedError`] (before waiting) if Redis cannot be asked; the caller
    /// then uses its own bucket.
    pub async fn acquire(&self, tokens: u64) -> Result<Duration, SharedError> {
        let requests_key = self.redis.key("rate:requests");
        let tokens_key = self.redis.key("rate:tokens");
        let wait_us: u64 = self
            .redis
            .run(
                &self.script,
                &[
                    &requests_key,
                    &self.requests.per_cell_us,
                    &1u64,
                    &self.requests.burst_us,
                    &tokens_key,
                    &self.tokens.per_cell_us,
                    &tokens.max(1),
                    &self.tokens.burst_us,
                ],
            )
            .await?;
        let wait = Duration::from_micros(wait_us);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_one_request_and_a_tenth_of_a_second_of_tokens() {
        let requests = Bucket::new(600, u32::MAX);
        assert_eq!(requests.per_cell_us, 100_000);
        assert_eq!(requests.burst_us, 100_000, "one request");
        let tokens = Bucket::new(60_000, 600);
        assert_eq!(tokens.per_cell_us, 1_000);
        assert_eq!(tokens.burst_us, 100_000, "100 tokens: a tenth of a second");
        assert_eq!(Bucket::new(0, 600).per_cell_us, 0, "no limit");
    }
}
