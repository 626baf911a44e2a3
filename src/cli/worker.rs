//! `rag-ingest worker`: consume the pipeline's queue until stopped (or idle).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rag_ingest::health::{self, Health};
use rag_ingest::queue::{RunOptions, Worker, WorkerReport};
use rag_ingest::setup;
use rag_ingest::telemetry::{self, emit, events::MetricsServing};

use super::args::{ReportFormat, WorkerArgs};

/// Runs the worker: serves metrics and health if configured, builds the pipeline, consumes
/// until SIGTERM/SIGINT (or until idle with `--exit-when-idle`), then prints the report.
///
/// Fails on a bad config, a metrics address that cannot be bound, a component that cannot
/// be built, or a broker that stays unreachable past `worker.reconnect_give_up_secs`.
pub async fn run(args: WorkerArgs) -> Result<ExitCode> {
    // Listen for signals before the (slow) start-up, so SIGTERM then is a clean exit too.
    let mut shutdown = Box::pin(shutdown_signal()?);
    let mut config = super::load(&args.pipeline)?;
    if let Some(addr) = args.metrics_addr {
        config.metrics.address = addr;
    }
    let health = Health::new();
    if !config.metrics.address.is_empty() {
        let addr: std::net::SocketAddr = config.metrics.address.parse().with_context(|| {
            format!(
                "--metrics-addr / metrics.address {:?} is not host:port",
                config.metrics.address
            )
        })?;
        let handle = telemetry::metrics_handle(&config.name)?;
        telemetry::metrics::register_tenants(config.tenants.allowed.iter().map(String::as_str));
        let bound = health::serve(addr, Arc::clone(&health), handle)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        emit(MetricsServing {
            address: &bound.to_string(),
        });
    }
    let components = tokio::select! {
        built = setup::pipeline(&config) => built?,
        () = &mut shutdown => {
            report(args.report, &WorkerReport::default(), "stopped during start-up: nothing was consumed")?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    health.set_model_loaded(true);
    health.set_store_probe(health::store_probe(Arc::clone(components.store())));
    let worker = Worker::new(config, components).with_health(health);
    let options = RunOptions {
        exit_when_idle: args.exit_when_idle,
        idle_grace: Duration::from_millis(args.idle_grace_ms),
    };
    let done = worker.run(options, shutdown).await?;
    report(args.report, &done, "stopped")?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the exit report: one `worker <how>: stored=N …` line on stderr, or one JSON object
/// on stdout.
fn report(format: ReportFormat, r: &WorkerReport, how: &str) -> Result<()> {
    match format {
        ReportFormat::Json => println!("{}", serde_json::to_string(r)?),
        ReportFormat::Text => eprintln!(
            "worker {how}: stored={} unchanged={} stale={} deleted={} retried={} dead_lettered={} reconnects={} deferred={}",
            r.stored,
            r.unchanged,
            r.stale,
            r.deleted,
            r.retried,
            r.dead_lettered,
            r.reconnects,
            r.deferred
        ),
    }
    Ok(())
}

/// Completes on the first SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
