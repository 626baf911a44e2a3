//! Per-tenant token budgets (`[tenants.budgets]`): the model tokens each listed tenant may
//! embed per window, counted in Redis across every worker of the pipeline.
//!
//! - **What is counted**: the tokens of `rag_ingest_tokens_embedded_total` (the provider's
//!   billed `prompt_tokens` for a remote embedder, the chunks' model tokens for the local
//!   one), recorded for the message's tenant when the message's processing ends
//!   ([`crate::meter`]), whatever its outcome: tokens spent by an attempt that failed later
//!   were spent all the same. Every tenant is counted (for `rag-ingest tenants`); only the
//!   listed ones are limited.
//! - **Windows** are aligned to the Unix epoch on the Redis server's clock, one counter per
//!   tenant and window (`<prefix>:<pipeline>:budget:<tenant>:<window>`, kept for two
//!   windows), so every worker agrees when a window rolls.
//! - **Admission**: before a message of a budgeted tenant is processed, its window's count is
//!   read; at or over the budget the message is deferred until the window rolls (the worker
//!   parks it: see `queue::topology`), without using an attempt. The check and the count are
//!   not one transaction: messages admitted while the tenant was under its budget may all
//!   finish, so a window's total stays below the budget plus the tokens of the messages in
//!   flight when it was crossed, at most `workers × worker.concurrency` messages
//!   (`tests/fairness.rs` checks it with two worker processes).
//! - **Redis failures**: reading the count fails closed by default (the message is deferred
//!   for [`UNKNOWN_RETRY`] and asked about again; nothing is spent that cannot be counted,
//!   and deferring loses nothing) or open with `on_redis_error = "open"` (processed
//!   unchecked). Tokens that could not be recorded are kept by the worker and added to the
//!   tenant's next successful count.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;

use super::{Redis, SharedError};
use crate::config::{PipelineConfig, RedisFailurePolicy};
use crate::telemetry::emit;
use crate::telemetry::events::{SharedStateUnavailable, TenantBudgetObserved};

/// How long a message waits before its tenant's budget is asked about again when Redis
/// could not answer (fail closed).
pub const UNKNOWN_RETRY: Duration = Duration::from_secs(10);

/// Reads a tenant's count in the current window: `{used, ms left in the window}`.
const USAGE: &str = r"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window_ms = tonumber(ARGV[2]) * 1000
local index = math.floor(now_ms / window_ms)
local key = ARGV[1] .. ':' .. string.format('%d', index)
local used = tonumber(redis.call('GET', key) or '0')
return {used, (index + 1) * window_ms - now_ms}
";

/// Adds `ARGV[3]` tokens to a tenant's count in the current window: `{used, ms left}`.
const RECORD: &str = r"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window_ms = tonumber(ARGV[2]) * 1000
local index = math.floor(now_ms / window_ms)
local key = ARGV[1] .. ':' .. string.format('%d', index)
local used = redis.call('INCRBY', key, ARGV[3])
redis.call('PEXPIRE', key, 2 * window_ms + 60000)
return {used, (index + 1) * window_ms - now_ms}
";

/// Whether a message may be processed now.
#[derive(Debug)]
pub enum Admission {
    /// Yes: the tenant has no budget, or tokens left in the window.
    Admitted,
    /// No: the tenant has used `used` of its `budget` in this window; the window rolls in
    /// `resume_in`.
    Exhausted {
        /// Tokens counted in the window.
        used: u64,
        /// The tenant's budget per window.
        budget: u64,
        /// Time until the window rolls.
        resume_in: Duration,
    },
    /// Not now: Redis could not be asked and budgets fail closed; ask again in `retry_in`.
    Unknown {
        /// Why Redis could not be asked.
        error: SharedError,
        /// When to ask again.
        retry_in: Duration,
    },
}

/// One tenant's use of its budget in the current window (`rag-ingest tenants`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TenantUsage {
    /// The tenant.
    pub tenant: String,
    /// Its budget per window (`None`: not limited).
    pub budget: Option<u64>,
    /// Tokens counted in the current window.
    pub used: u64,
    /// Tokens left (`None` without a budget).
    pub remaining: Option<u64>,
    /// Milliseconds until the window rolls.
    pub window_ends_in_ms: u64,
}

/// The budgets of one pipeline's tenants (see the module documentation).
pub struct TenantBudgets {
    redis: Arc<Redis>,
    window_secs: u64,
    budgets: BTreeMap<String, u64>,
    policy: RedisFailurePolicy,
    usage: Script,
    record: Script,
    /// Tokens spent while Redis could not be told, per tenant.
    unrecorded: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for TenantBudgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantBudgets")
            .field("redis", &self.redis)
            .field("window_secs", &self.window_secs)
            .field("budgets", &self.budgets)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl TenantBudgets {
    /// The budgets of `config` (`[tenants.budgets]`), counted in `redis`; `None` without
    /// that section or without Redis (which the config check rejects when tenants are listed).
    pub fn from_config(config: &PipelineConfig, redis: Option<Arc<Redis>>) -> Option<Self> {
        let budgets = config.tenants.budgets.as_ref()?;
        Some(TenantBudgets {
            redis: redis?,
            window_secs: budgets.window_secs.max(1),
            budgets: budgets.tokens.clone(),
            policy: budgets.on_redis_error,
            usage: Script::new(USAGE),
            record: Script::new(RECORD),
            unrecorded: Mutex::new(HashMap::new()),
        })
    }

    /// The budget of `tenant` per window, if it has one.
    pub fn budget_of(&self, tenant: &str) -> Option<u64> {
        self.budgets.get(tenant).copied()
    }

    /// The window length.
    pub fn window(&self) -> Duration {
        Duration::from_secs(self.window_secs)
    }

    fn key(&self, tenant: &str) -> String {
        self.redis.key(&format!("budget:{tenant}"))
    }

    /// Whether a message of `tenant` may be processed now (see [`Admission`]). Tenants
    /// without a budget are admitted without asking Redis.
    pub async fn admit(&self, tenant: &str) -> Admission {
        let Some(budget) = self.budget_of(tenant) else {
            return Admission::Admitted;
        };
        match self.read(tenant).await {
            Ok((used, left)) => {
                emit(TenantBudgetObserved {
                    tenant,
                    remaining: budget.saturating_sub(used),
                });
                if used >= budget {
                    Admission::Exhausted {
                        used,
                        budget,
                        resume_in: left,
                    }
                } else {
                    Admission::Admitted
                }
            }
            Err(error) => match self.policy {
                RedisFailurePolicy::Open => {
                    emit(SharedStateUnavailable {
                        component: "budget",
                        error: &error,
                        consequence: "processed without checking the budget (on_redis_error = open)",
                    });
                    Admission::Admitted
                }
                RedisFailurePolicy::Closed => Admission::Unknown {
                    error,
                    retry_in: UNKNOWN_RETRY.min(self.window()),
                },
            },
        }
    }

    /// Adds `tokens` to `tenant`'s count in the current window, with whatever could not be
    /// recorded before. If Redis cannot be told, the tokens are kept for the next call
    /// ([`SharedStateUnavailable`] is emitted).
    pub async fn record(&self, tenant: &str, tokens: u64) {
        let carried = self
            .unrecorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant)
            .unwrap_or(0);
        let total = tokens.saturating_add(carried);
        if total == 0 {
            return;
        }
        let key = self.key(tenant);
        let counted: Result<(u64, u64), SharedError> = self
            .redis
            .run(&self.record, &[&key, &self.window_secs, &total])
            .await;
        match counted {
            Ok((used, _)) => {
                if let Some(budget) = self.budget_of(tenant) {
                    emit(TenantBudgetObserved {
                        tenant,
                        remaining: budget.saturating_sub(used),
                    });
                }
            }
            Err(error) => {
                let mut unrecorded = self.unrecorded.lock().unwrap_or_else(|p| p.into_inner());
                let kept = unrecorded.entry(tenant.to_owned()).or_insert(0);
                *kept = kept.saturating_add(total);
                emit(SharedStateUnavailable {
                    component: "budget",
                    error: &error,
                    consequence: "tokens kept by this worker and counted once Redis answers",
                });
            }
        }
    }

    /// `tenant`'s count in the current window and the time until the window rolls.
    ///
    /// Fails with [`SharedError`] if Redis cannot be asked.
    async fn read(&self, tenant: &str) -> Result<(u64, Duration), SharedError> {
        let key = self.key(tenant);
        let (used, left_ms): (u64, u64) = self
            .redis
            .run(&self.usage, &[&key, &self.window_secs])
            .await?;
        Ok((used, Duration::from_millis(left_ms)))
    }

    /// The usage of each of `tenants` in the current window.
    ///
    /// Fails with [`SharedError`] if Redis cannot be asked.
    pub async fn usage(&self, tenants: &[String]) -> Result<Vec<TenantUsage>, SharedError> {
        let mut out = Vec::with_capacity(tenants.len());
        for tenant in tenants {
            let (used, left) = self.read(tenant).await?;
            let budget = self.budget_of(tenant);
            out.push(TenantUsage {
                tenant: tenant.clone(),
                budget,
                used,
                remaining: budget.map(|b| b.saturating_sub(used)),
                window_ends_in_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
            });
        }
        Ok(out)
    }
}
