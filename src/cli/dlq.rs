//! The dead-letter queue: `dlq list`, `dlq show` and `reprocess`.

use std::process::ExitCode;

use anyhow::Result;
use rag_ingest::queue::{DlqFilter, Topology, inspect_dlq, reprocess as replay};

use super::args::{FilterArgs, PipelineArg, ReprocessArgs};
use super::progress::spinner;

/// Prints the DLQ's counts by kind, tenant and stage, and its oldest and newest failure.
///
/// Fails on a bad config or an unreachable broker.
pub async fn list(pipeline: PipelineArg) -> Result<ExitCode> {
    let config = super::load(&pipeline)?;
    let everything = DlqFilter {
        limit: Some(0),
        ..DlqFilter::default()
    };
    let (summary, _) = inspect_dlq(&config, &everything).await?;
    println!(
        "{}: {} message(s)",
        Topology::new(&config).dlq(),
        summary.total
    );
    for (title, map) in [
        ("kind", &summary.by_kind),
        ("tenant", &summary.by_tenant),
        ("stage", &summary.by_stage),
    ] {
        for (k, n) in map {
            println!("  {title:<7}{k:<28}{n:>8}");
        }
    }
    if let (Some(o), Some(n)) = (&summary.oldest, &summary.newest) {
        println!("  oldest failure {o}\n  newest failure {n}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the headers and body of every selected DLQ message (nothing is removed).
///
/// Fails on a bad config or an unreachable broker.
pub async fn show(pipeline: PipelineArg, filter: FilterArgs) -> Result<ExitCode> {
    let config = super::load(&pipeline)?;
    let (_, entries) = inspect_dlq(&config, &filter.into()).await?;
    for e in &entries {
        println!("--- {} {}", e.kind, e.document_id.as_deref().unwrap_or("-"));
        for (k, v) in &e.headers {
            println!("{k}: {v}");
        }
        println!("\n{}\n", String::from_utf8_lossy(&e.body));
    }
    println!("{} message(s) shown", entries.len());
    Ok(ExitCode::SUCCESS)
}

/// Moves the selected DLQ messages back to the main queue (or, with `--dry-run`, reports
/// what would move).
///
/// Fails on a bad config or an unreachable broker; a message is moved only once its copy
/// is confirmed.
pub async fn reprocess(args: ReprocessArgs) -> Result<ExitCode> {
    let config = super::load(&args.pipeline)?;
    let bar = spinner("reading the DLQ");
    let report = replay(&config, &args.filter.into(), args.dry_run, |n| {
        bar.set_position(n as u64)
    })
    .await?;
    bar.finish_and_clear();
    let verb = if args.dry_run { "would move" } else { "moved" };
    println!(
        "{verb} {} message(s) to {}; {} left in the DLQ",
        report.moved.total,
        Topology::new(&config).main_queue(),
        report.kept
    );
    for (k, n) in &report.moved.by_kind {
        println!("  kind   {k:<28}{n:>8}");
    }
    for (t, n) in &report.moved.by_tenant {
        println!("  tenant {t:<28}{n:>8}");
    }
    Ok(ExitCode::SUCCESS)
}
