//! What the workers of one pipeline share, kept in Redis (`[redis]`): tenant token budgets
//! ([`budget`]) and the provider rate limit when `embedder.rate_limit_shared` is set
//! ([`rate`]).
//!
//! Every operation is one Lua script run atomically by the server, with the server's clock
//! (`TIME`), so workers on machines with different clocks still agree on budget windows and
//! on the rate bucket. Keys are `<redis.key_prefix>:<pipeline>:…`. Each call, connecting
//! included, has a deadline (`redis.timeout_ms`); a failed call drops the connection and the
//! next one reconnects. What a failure means is up to the caller: see
//! [`budget::TenantBudgets`] (fail closed or open, `tenants.budgets.on_redis_error`) and
//! [`rate::SharedRateLimit`] (falls back to the worker's own bucket).

pub mod budget;
pub mod rate;

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, FromRedisValue, Script, ToRedisArgs};

use crate::config::{PipelineConfig, RedisConfig};
use crate::validate::redact_url;

/// Why a shared-state call failed.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// Redis could not be reached, did not answer within `redis.timeout_ms`, or answered
    /// with an error.
    #[error("Redis at {url} is unavailable: {reason}")]
    Unavailable {
        /// The server URL, password redacted.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// A connection to the pipeline's Redis server, reconnecting after a failure.
pub struct Redis {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    timeout: Duration,
    prefix: String,
    url: String,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// A client for `config.redis` with keys under `<key_prefix>:<pipeline>`; `None` without
    /// `[redis]`. Connects on first use.
    ///
    /// Fails with [`SharedError::Unavailable`] if the URL cannot be used (checked at config
    /// load already).
    pub fn from_config(config: &PipelineConfig) -> Result<Option<Self>, SharedError> {
        config
            .redis
            .as_ref()
            .map(|redis| Self::new(redis, &config.name))
            .transpose()
    }

    /// A client for `redis` with keys under `<key_prefix>:<pipeline>`. Connects on first use.
    ///
    /// Fails with [`SharedError::Unavailable`] if the URL cannot be used.
    pub fn new(redis: &RedisConfig, pipeline: &str) -> Result<Self, SharedError> {
        let url = redact_url(&redis.url);
        let client =
            redis::Client::open(redis.url.as_str()).map_err(|e| SharedError::Unavailable {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        Ok(Redis {
            client,
            conn: tokio::sync::Mutex::new(None),
            timeout: Duration::from_millis(redis.timeout_ms.max(1)),
            prefix: format!("{}:{pipeline}", redis.key_prefix),
            url,
        })
    }

    /// The server URL, password redacted.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The key `<prefix>:<pipeline>:<suffix>`.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.prefix)
    }

    /// Runs `script` with `args` (no declared keys: the scripts build their keys from
    /// arguments, so a standalone server or a primary is needed, not a cluster).
    ///
    /// Fails with [`SharedError::Unavailable`] if Redis cannot be reached, does not answer
    /// within the deadline, or the script fails; the connection is dropped then.
    pub(crate) async fn run<T: FromRedisValue>(
        &self,
        script: &Script,
        args: &[&dyn ToRedisArgsDyn],
    ) -> Result<T, SharedError> {
        let call = async {
            let mut conn = self.connection().await?;
            let mut invocation = script.prepare_invoke();
            for arg in args {
                arg.push_to(&mut invocation);
            }
            invocation.invoke_async::<T>(&mut conn).await
        };
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        *self.conn.lock().await = None;
        Err(SharedError::Unavailable {
            url: self.url.clone(),
            reason: result,
        })
    }

    /// The open connection, or a new one.
    async fn connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }
}

/// A script argument of any type (the arguments of one call differ in type).
pub(crate) trait ToRedisArgsDyn: Sync {
    /// Appends this argument to `invocation`.
    fn push_to(&self, invocation: &mut redis::ScriptInvocation<'_>);
}

impl<T: ToRedisArgs + Sync> ToRedisArgsDyn for T {
    fn push_to(&self, invocation: &mut redis::ScriptInvocation<'_>) {
        invocation.arg(self);
    }
}
