//! `rag-ingest tenants`: each allowed tenant's model tokens in the current budget window
//! against its budget, read from the shared counters in Redis.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use rag_ingest::shared::Redis;
use rag_ingest::shared::budget::TenantBudgets;

use super::args::TenantsArgs;

/// Prints one row (or JSON object) per tenant of `tenants.allowed`: its budget, the tokens
/// counted in the current window, what is left and when the window rolls.
///
/// Fails on a bad config, a pipeline without `[tenants.budgets]` and `[redis]`, or a Redis
/// server that cannot be asked.
pub async fn run(args: TenantsArgs) -> Result<ExitCode> {
    let config = super::load(&args.pipeline)?;
    let redis = Redis::from_config(&config)?.map(Arc::new);
    let Some(budgets) = TenantBudgets::from_config(&config, redis) else {
        anyhow::bail!(
            "{} has no [tenants.budgets] with [redis]: nothing is counted, every tenant is unlimited",
            args.pipeline.pipeline.display()
        );
    };
    let usage = budgets
        .usage(&config.tenants.allowed)
        .await
        .context("reading the budget counters")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&usage)?);
        return Ok(ExitCode::SUCCESS);
    }
    let window = budgets.window().as_secs();
    println!("budget window: {window} s (aligned to the Unix epoch, Redis clock)");
    println!(
        "{:<24} {:>14} {:>14} {:>14} {:>16}",
        "tenant", "budget", "used", "remaining", "window ends in"
    );
    let show = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |n| n.to_string());
    for row in &usage {
        println!(
            "{:<24} {:>14} {:>14} {:>14} {:>15}s",
            row.tenant,
            show(row.budget),
            row.used,
            show(row.remaining),
            row.window_ends_in_ms.div_ceil(1000)
        );
    }
    Ok(ExitCode::SUCCESS)
}
