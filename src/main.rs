//! The `rag-ingest` command line: worker, submit, search, embed, dlq and reprocess.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use rag_ingest::config::PipelineConfig;
use rag_ingest::embed::Embedder;
use rag_ingest::health::{self, Health};
use rag_ingest::message::Document;
use rag_ingest::queue::{DlqFilter, RunOptions, Submitter, Worker, inspect_dlq, reprocess};
use rag_ingest::search::{SearchOptions, Searcher};
use rag_ingest::store::VectorStore;
use rag_ingest::tenant::TenantId;
use rag_ingest::{setup, telemetry};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "rag-ingest",
    version,
    about = "Queue-driven RAG ingestion: RabbitMQ → chunk → embed → Qdrant"
)]
struct Cli {
    /// Log line format (logs go to stderr; filter with RUST_LOG).
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Text)]
    log_format: LogFormatArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(clap::Args)]
struct PipelineArg {
    /// Pipeline config file.
    #[arg(long, default_value = "pipelines/docs.toml")]
    pipeline: PathBuf,
}

#[derive(clap::Args)]
struct FilterArgs {
    /// Only messages of this tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// Only messages of this error kind (e.g. store_unavailable).
    #[arg(long)]
    kind: Option<String>,
    /// Only messages of this document id.
    #[arg(long)]
    document: Option<String>,
    /// At most this many messages.
    #[arg(long)]
    limit: Option<usize>,
}

impl From<FilterArgs> for DlqFilter {
    fn from(a: FilterArgs) -> Self {
        DlqFilter {
            tenant: a.tenant,
            kind: a.kind,
            document: a.document,
            limit: a.limit,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Consume the pipeline's queue: chunk, embed, store, ack.
    Worker {
        #[command(flatten)]
        pipeline: PipelineArg,
        /// Exit once the queues are drained and nothing is in flight.
        #[arg(long)]
        exit_when_idle: bool,
        /// With --exit-when-idle: milliseconds without deliveries before checking the queues.
        #[arg(long, default_value_t = 1000)]
        idle_grace_ms: u64,
        /// host:port for /metrics, /healthz and /readyz (overrides metrics.address; "" = off).
        #[arg(long)]
        metrics_addr: Option<String>,
    },
    /// Publish documents (files, directories, or - for stdin) with publisher confirms.
    Submit {
        #[command(flatten)]
        pipeline: PipelineArg,
        /// Tenant owning the documents.
        #[arg(long)]
        tenant: String,
        /// Document id (required for stdin; only with a single input).
        #[arg(long)]
        document_id: Option<String>,
        /// Content type (default: from the extension; .md → text/markdown, else text/plain).
        #[arg(long)]
        content_type: Option<String>,
        /// Document version (monotonic per document).
        #[arg(long)]
        version: Option<u64>,
        /// Metadata entries KEY=VALUE stored with every chunk (repeatable).
        #[arg(long = "meta", value_parser = parse_key_value)]
        metadata: Vec<(String, String)>,
        /// Report the chunks and model tokens the documents would embed; publish nothing.
        #[arg(long)]
        dry_run: bool,
        /// Files, directories (recursively: .md, .markdown, .txt, .text) or - for stdin.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Search one tenant's documents.
    Search {
        #[command(flatten)]
        pipeline: PipelineArg,
        /// Tenant to search (required: searches never cross tenants).
        #[arg(long)]
        tenant: String,
        /// Number of results.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// Only chunks whose metadata KEY equals VALUE exactly (repeatable; all must match).
        #[arg(long = "filter", value_parser = parse_key_value)]
        filters: Vec<(String, String)>,
        /// Only results with at least this cosine similarity (-1 to 1).
        #[arg(long)]
        min_score: Option<f32>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The query text.
        query: String,
    },
    /// Delete every chunk of one tenant from the pipeline's store (irreversible).
    PurgeTenant {
        #[command(flatten)]
        pipeline: PipelineArg,
        /// The tenant whose chunks are deleted (other tenants are never touched).
        #[arg(long)]
        tenant: String,
        /// Required: confirms that everything of this tenant is to be deleted.
        #[arg(long)]
        yes_delete_everything: bool,
    },
    /// Print each text's embedding as one JSON array per line (- reads one text per stdin line).
    Embed {
        #[command(flatten)]
        pipeline: PipelineArg,
        /// Texts to embed, or - for stdin.
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// Check config, broker, model and store; exit non-zero if any check fails.
    Doctor {
        #[command(flatten)]
        pipeline: PipelineArg,
    },
    /// Inspect the dead-letter queue (nothing is removed).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Move matching DLQ messages back to the main queue.
    Reprocess {
        #[command(flatten)]
        pipeline: PipelineArg,
        #[command(flatten)]
        filter: FilterArgs,
        /// Report what would move without moving anything.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Counts by kind, tenant and stage; oldest and newest failure.
    List {
        #[command(flatten)]
        pipeline: PipelineArg,
    },
    /// Full headers and body of selected messages.
    Show {
        #[command(flatten)]
        pipeline: PipelineArg,
        #[command(flatten)]
        filter: FilterArgs,
    },
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

fn load(arg: &PipelineArg) -> Result<PipelineConfig> {
    Ok(PipelineConfig::load(&arg.pipeline)?)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(match cli.log_format {
        LogFormatArg::Text => telemetry::LogFormat::Text,
        LogFormatArg::Json => telemetry::LogFormat::Json,
    });
    match run(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Worker {
            pipeline,
            exit_when_idle,
            idle_grace_ms,
            metrics_addr,
        } => worker(&pipeline, exit_when_idle, idle_grace_ms, metrics_addr).await,
        Command::Submit {
            pipeline,
            tenant,
            document_id,
            content_type,
            version,
            metadata,
            dry_run,
            paths,
        } => {
            let config = load(&pipeline)?;
            let tenant = TenantId::new(tenant).context("--tenant")?;
            let mut docs =
                collect_documents(&paths, &tenant, document_id, content_type.as_deref())?;
            for doc in &mut docs {
                doc.version = version;
                for (k, v) in &metadata {
                    doc.metadata
                        .insert(k.clone(), serde_json::Value::from(v.as_str()));
                }
            }
            if dry_run {
                dry_run_report(&config, &docs)
            } else {
                submit(&config, docs).await
            }
        }
        Command::Search {
            pipeline,
            tenant,
            top_k,
            filters,
            min_score,
            json,
            query,
        } => {
            let config = load(&pipeline)?;
            let searcher = Searcher::open(&config).await?;
            let mut options = SearchOptions::new(top_k);
            for (key, value) in filters {
                options = options.metadata_eq(key, value);
            }
            options.min_score = min_score;
            let hits = searcher.search_with(&tenant, &query, &options).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&hits)?);
            } else if hits.is_empty() {
                println!("no results for tenant {tenant}");
            } else {
                for (i, h) in hits.iter().enumerate() {
                    let snippet: String = h.text.split_whitespace().collect::<Vec<_>>().join(" ");
                    let snippet: String = snippet.chars().take(160).collect();
                    let version = h.version.map(|v| format!(" v{v}")).unwrap_or_default();
                    println!(
                        "{:>2}. {:.3}  {}{} #{} [{}..{}]  {}",
                        i + 1,
                        h.score,
                        h.document_id,
                        version,
                        h.chunk_index,
                        h.byte_range.start,
                        h.byte_range.end,
                        snippet
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::PurgeTenant {
            pipeline,
            tenant,
            yes_delete_everything,
        } => {
            let tenant = TenantId::new(tenant).context("--tenant")?;
            if !yes_delete_everything {
                eprintln!(
                    "refusing to purge tenant {tenant}: this deletes every chunk of the tenant \
                     and cannot be undone; add --yes-delete-everything to confirm"
                );
                return Ok(ExitCode::FAILURE);
            }
            let config = load(&pipeline)?;
            let embedder = setup::embedder(&config)?;
            let store = setup::open_vector_store(&config, embedder.fingerprint()).await?;
            let before = store.count(&tenant, None).await?;
            store.purge_tenant(&tenant).await?;
            let after = store.count(&tenant, None).await?;
            println!(
                "purged tenant {tenant} from {} collection {}: {} point(s) before, {after} after",
                store.kind(),
                config.store.collection,
                before
            );
            Ok(if after == 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!("{after} point(s) of tenant {tenant} remain (written concurrently?)");
                ExitCode::FAILURE
            })
        }
        Command::Embed { pipeline, texts } => {
            let config = load(&pipeline)?;
            let embedder = setup::embedder(&config)?;
            let texts = if texts == ["-"] {
                let mut input = String::new();
                std::io::stdin()
                    .read_to_string(&mut input)
                    .context("reading stdin")?;
                input.lines().map(str::to_owned).collect()
            } else {
                texts
            };
            for v in embedder.embed(texts).await? {
                println!("{}", serde_json::to_string(&v)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor { pipeline } => {
            let checks = rag_ingest::doctor::run(&pipeline.pipeline).await;
            for check in &checks {
                println!("{}", check.line());
            }
            Ok(if checks.iter().all(|c| c.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Dlq { command } => match command {
            DlqCommand::List { pipeline } => {
                let config = load(&pipeline)?;
                let (summary, _) = inspect_dlq(
                    &config,
                    &DlqFilter {
                        limit: Some(0),
                        ..DlqFilter::default()
                    },
                )
                .await?;
                println!(
                    "rag-ingest.{}.dlq: {} message(s)",
                    config.name, summary.total
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
            DlqCommand::Show { pipeline, filter } => {
                let config = load(&pipeline)?;
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
        },
        Command::Reprocess {
            pipeline,
            filter,
            dry_run,
        } => {
            let config = load(&pipeline)?;
            let bar = spinner("reading the DLQ");
            let report = reprocess(&config, &filter.into(), dry_run, |n| {
                bar.set_position(n as u64)
            })
            .await?;
            bar.finish_and_clear();
            let verb = if dry_run { "would move" } else { "moved" };
            println!(
                "{verb} {} message(s) to rag-ingest.{}; {} left in the DLQ",
                report.moved.total, config.name, report.kept
            );
            for (k, n) in &report.moved.by_kind {
                println!("  kind   {k:<28}{n:>8}");
            }
            for (t, n) in &report.moved.by_tenant {
                println!("  tenant {t:<28}{n:>8}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn worker(
    pipeline: &PipelineArg,
    exit_when_idle: bool,
    idle_grace_ms: u64,
    metrics_addr: Option<String>,
) -> Result<ExitCode> {
    // Listen for signals before the (slow) start-up, so SIGTERM then is a clean exit too.
    let mut shutdown = Box::pin(shutdown_signal()?);
    let mut config = load(pipeline)?;
    if let Some(addr) = metrics_addr {
        config.metrics.address = addr;
    }
    let health = Health::new();
    if !config.metrics.address.is_empty() {
        let addr: std::net::SocketAddr = config.metrics.address.parse().with_context(|| {
            format!(
                "--metrics-addr {:?} is not host:port",
                config.metrics.address
            )
        })?;
        let handle = telemetry::metrics_handle(&config.name)?;
        let bound = health::serve(addr, Arc::clone(&health), handle)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(address = %bound, "serving /metrics, /healthz and /readyz");
    }
    let components = tokio::select! {
        built = setup::pipeline(&config) => built?,
        () = &mut shutdown => {
            eprintln!("worker stopped during start-up: nothing was consumed");
            return Ok(ExitCode::SUCCESS);
        }
    };
    health.set_model_loaded(true);
    let store = Arc::clone(components.store());
    health.set_store_probe(Arc::new(move || {
        let store = Arc::clone(&store);
        Box::pin(async move {
            let probe = TenantId::new("readyz-probe").map_err(|e| e.to_string())?;
            store
                .count(&probe, None)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }));
    let worker = Worker::new(config, components).with_health(health);
    let options = RunOptions {
        exit_when_idle,
        idle_grace: Duration::from_millis(idle_grace_ms),
    };
    let report = worker.run(options, shutdown).await?;
    eprintln!(
        "worker stopped: stored={} unchanged={} stale={} deleted={} retried={} dead_lettered={} reconnects={}",
        report.stored,
        report.unchanged,
        report.stale,
        report.deleted,
        report.retried,
        report.dead_lettered,
        report.reconnects
    );
    Ok(ExitCode::SUCCESS)
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

fn spinner(message: &'static str) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {pos}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message);
    bar
}

/// Content type for a file extension, if the chunker supports it.
fn content_type_for(path: &Path) -> Option<&'static str> {
    match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "md" | "markdown" => Some("text/markdown"),
        "txt" | "text" => Some("text/plain"),
        _ => None,
    }
}

fn collect_documents(
    paths: &[PathBuf],
    tenant: &TenantId,
    document_id: Option<String>,
    content_type: Option<&str>,
) -> Result<Vec<Document>> {
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    let mut docs = Vec::new();
    let single = paths.len() == 1;
    if document_id.is_some() && !single {
        bail!("--document-id can only be used with a single input");
    }
    for path in paths {
        if path == Path::new("-") {
            let Some(id) = document_id.clone() else {
                bail!("reading from stdin (-) needs --document-id");
            };
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("reading stdin")?;
            let content = String::from_utf8(bytes).context("stdin is not valid UTF-8")?;
            let mut doc = Document::upsert(tenant.clone(), id, content);
            doc.content_type = content_type.unwrap_or("text/plain").to_string();
            docs.push(doc);
        } else if path.is_dir() {
            walk(path, path, &mut files)?;
        } else if path.is_file() {
            let id = document_id.clone().unwrap_or_else(|| slash_path(path));
            files.push((path.clone(), id));
        } else {
            bail!("{}: no such file or directory", path.display());
        }
    }
    let mut problems = Vec::new();
    for (path, id) in files {
        let ct = match content_type.or_else(|| content_type_for(&path)) {
            Some(ct) => ct,
            None => {
                problems.push(format!(
                    "{}: unsupported extension (use .md, .txt or --content-type)",
                    path.display()
                ));
                continue;
            }
        };
        match std::fs::read(&path).map(String::from_utf8) {
            Ok(Ok(content)) => {
                let mut doc = Document::upsert(tenant.clone(), id, content);
                doc.content_type = ct.to_string();
                docs.push(doc);
            }
            Ok(Err(_)) => problems.push(format!("{}: not valid UTF-8", path.display())),
            Err(e) => problems.push(format!("{}: {e}", path.display())),
        }
    }
    if !problems.is_empty() {
        bail!(
            "nothing was submitted; fix these inputs first:\n  {}",
            problems.join("\n  ")
        );
    }
    if docs.is_empty() {
        bail!(
            "no documents found in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(docs)
}

fn slash_path(path: &Path) -> String {
    let s = path.to_string_lossy().replace('\\', "/");
    s.strip_prefix("./").unwrap_or(&s).to_string()
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading directory {}", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading directory {}", dir.display()))?;
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            walk(root, &path, out)?;
        } else if content_type_for(&path).is_some() {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            out.push((path.clone(), slash_path(rel)));
        }
    }
    Ok(())
}

/// Chunks every document with the pipeline's chunker and prints what embedding it would cost.
fn dry_run_report(config: &PipelineConfig, docs: &[Document]) -> Result<ExitCode> {
    let embedder = setup::embedder(config)?;
    let chunker = setup::chunker_for(config, &embedder)?;
    let (mut chunks, mut tokens) = (0usize, 0usize);
    for doc in docs {
        let format = doc.format().with_context(|| {
            format!(
                "{}: content type {} is not supported",
                doc.document_id, doc.content_type
            )
        })?;
        let pieces = chunker.split(&doc.content, format);
        let doc_tokens: usize = pieces.iter().map(|c| c.tokens).sum();
        println!(
            "{}\t{} chunk(s)\t{} token(s)",
            doc.document_id,
            pieces.len(),
            doc_tokens
        );
        chunks += pieces.len();
        tokens += doc_tokens;
    }
    println!(
        "dry run: {} document(s) for tenant {} would embed {chunks} chunk(s), {tokens} token(s) with {}; nothing was published",
        docs.len(),
        docs.first().map(|d| d.tenant.as_str()).unwrap_or("-"),
        embedder.fingerprint().model
    );
    Ok(ExitCode::SUCCESS)
}

async fn submit(config: &PipelineConfig, docs: Vec<Document>) -> Result<ExitCode> {
    let submitter = Submitter::connect(config).await?;
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(docs.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} documents confirmed {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let results = submitter.submit_all(&docs, |_, _| bar.inc(1)).await;
    bar.finish_and_clear();
    submitter.close().await;
    let failed: Vec<String> = docs
        .iter()
        .zip(&results)
        .filter_map(|(d, r)| r.as_ref().err().map(|e| format!("{}: {e}", d.document_id)))
        .collect();
    println!(
        "submitted {} of {} document(s) to rag-ingest.{} for tenant {}",
        docs.len() - failed.len(),
        docs.len(),
        config.name,
        docs.first().map(|d| d.tenant.as_str()).unwrap_or("-")
    );
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "not confirmed by the broker (submit them again):\n  {}",
            failed.join("\n  ")
        );
        Ok(ExitCode::FAILURE)
    }
}
