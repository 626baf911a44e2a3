//! The command line as clap parses it: raw, validated values, no built objects.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use rag_ingest::queue::DlqFilter;
use rag_ingest::search::{Fusion, SearchMode};

/// `rag-ingest`: the whole command line.
#[derive(Parser)]
#[command(
    name = "rag-ingest",
    version,
    about = "Queue-driven RAG ingestion: RabbitMQ → chunk → embed → Qdrant"
)]
pub struct Cli {
    /// Log line format (logs go to stderr; filter with RUST_LOG).
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Text)]
    pub log_format: LogFormatArg,
    /// More log lines on stderr: -v shows progress (info), -vv debug. The worker logs at
    /// info level anyway; the other commands show only warnings and errors by default.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`.
#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `--pipeline`, shared by every subcommand.
#[derive(Args)]
pub struct PipelineArg {
    /// Pipeline config file.
    #[arg(long, default_value = "pipelines/docs.toml")]
    pub pipeline: PathBuf,
}

/// The selection of DLQ messages (`dlq show`, `reprocess`).
#[derive(Args)]
pub struct FilterArgs {
    /// Only messages of this tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only messages of this error kind (e.g. store_unavailable).
    #[arg(long)]
    pub kind: Option<String>,
    /// Only messages of this document id.
    #[arg(long)]
    pub document: Option<String>,
    /// At most this many messages.
    #[arg(long)]
    pub limit: Option<usize>,
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

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Consume the pipeline's queue: chunk, embed, store, ack.
    Worker(WorkerArgs),
    /// Publish documents (files, directories, or - for stdin) with publisher confirms.
    Submit(SubmitArgs),
    /// Publish confirmed delete messages for documents of one tenant.
    Delete(DeleteArgs),
    /// Search one tenant's documents.
    Search(SearchArgs),
    /// Delete every chunk of one tenant from the pipeline's store (irreversible).
    PurgeTenant(PurgeArgs),
    /// Copy another collection into the pipeline's, adding keyword vectors (migrates a
    /// collection created before hybrid search; no model call).
    Reindex(ReindexArgs),
    /// Print each text's embedding as one JSON array per line (- reads one text per stdin line).
    Embed(EmbedArgs),
    /// Check config, broker, model and store; exit non-zero if any check fails.
    Doctor(PipelineArg),
    /// Inspect the dead-letter queue (nothing is removed).
    Dlq {
        /// What to show.
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Move matching DLQ messages back to the main queue.
    Reprocess(ReprocessArgs),
    /// Each tenant's model tokens in the current budget window against its budget.
    Tenants(TenantsArgs),
}

/// `tenants`.
#[derive(Args)]
pub struct TenantsArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// Print JSON (one object per tenant in an array) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `worker`.
#[derive(Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// Exit once the queues are drained and nothing is in flight.
    #[arg(long)]
    pub exit_when_idle: bool,
    /// With --exit-when-idle: milliseconds without deliveries before checking the queues.
    #[arg(long, default_value_t = 1000)]
    pub idle_grace_ms: u64,
    /// host:port for /metrics, /healthz and /readyz (overrides metrics.address; "" = off).
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// The exit report: `text` (one line on stderr) or `json` (one JSON object on stdout:
    /// stored, unchanged, stale, deleted, retried, dead_lettered, reconnects).
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    pub report: ReportFormat,
}

/// `worker --report`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// `worker stopped: stored=N …` on stderr.
    Text,
    /// `{"stored":N,…}` on stdout.
    Json,
}

/// `submit`.
#[derive(Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// Tenant owning the documents.
    #[arg(long)]
    pub tenant: String,
    /// Document id (required for stdin; only with a single input).
    #[arg(long)]
    pub document_id: Option<String>,
    /// Content type (default: from the extension: .md/.markdown → text/markdown, .txt/.text →
    /// text/plain, .html/.htm → text/html, .pdf → application/pdf (sent base64), .rs .py .js
    /// .ts .go → source code; stdin defaults to text/plain).
    #[arg(long)]
    pub content_type: Option<String>,
    /// Document version (monotonic per document).
    #[arg(long)]
    pub version: Option<u64>,
    /// Metadata entries KEY=VALUE stored with every chunk (repeatable).
    #[arg(long = "meta", value_parser = parse_key_value)]
    pub metadata: Vec<(String, String)>,
    /// Report the chunks and model tokens the documents would embed; publish nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Publish to the bulk lane (backfills, re-imports): consumed at a bounded share, so
    /// live edits are not held back. Needs --version.
    #[arg(long)]
    pub bulk: bool,
    /// Files, directories (recursively: .md, .markdown, .txt, .text) or - for stdin.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

/// `delete`.
#[derive(Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// Tenant owning the documents.
    #[arg(long)]
    pub tenant: String,
    /// Document version of the delete (a newer stored version is kept).
    #[arg(long)]
    pub version: Option<u64>,
    /// Ids of the documents to delete.
    #[arg(required = true, value_name = "DOC_ID")]
    pub document_ids: Vec<String>,
}

/// `search`.
#[derive(Args)]
pub struct SearchArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// Tenant to search (required: searches never cross tenants).
    #[arg(long)]
    pub tenant: String,
    /// Number of results.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Only chunks whose metadata KEY equals VALUE exactly (repeatable; all must match).
    #[arg(long = "filter", value_parser = parse_key_value)]
    pub filters: Vec<(String, String)>,
    /// Only results scoring at least this much: cosine similarity (-1 to 1) in dense mode,
    /// BM25 score in sparse mode, fused reciprocal-rank score in hybrid mode.
    #[arg(long)]
    pub min_score: Option<f32>,
    /// Which vectors to compare: dense (embeddings), sparse (BM25 keywords) or hybrid (both,
    /// fused by reciprocal rank).
    #[arg(long, default_value = "hybrid", value_parser = parse_search_mode)]
    pub mode: SearchMode,
    /// How hybrid mode merges the branches: dbsf (distribution-based score fusion, the
    /// default), rrf (reciprocal rank fusion, k = 60) or rrf:K.
    #[arg(long, value_parser = parse_fusion)]
    pub fusion: Option<Fusion>,
    /// Print JSON instead of a table (each hit with its rank per branch).
    #[arg(long)]
    pub json: bool,
    /// The query text.
    pub query: String,
}

/// Parses `--fusion`: `rrf`, `rrf:K` or `dbsf`.
fn parse_fusion(value: &str) -> Result<Fusion, String> {
    value.parse()
}

/// Parses `--mode`: `dense`, `sparse` or `hybrid`.
fn parse_search_mode(value: &str) -> Result<SearchMode, String> {
    value.parse()
}

/// `purge-tenant`.
#[derive(Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// The tenant whose chunks are deleted (other tenants are never touched).
    #[arg(long)]
    pub tenant: String,
    /// Required: confirms that everything of this tenant is to be deleted.
    #[arg(long)]
    pub yes_delete_everything: bool,
}

/// `reindex`.
#[derive(Args)]
pub struct ReindexArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// The collection to copy from (same store, same embedder); the pipeline's
    /// `store.collection` is written to and created if missing.
    #[arg(long = "from", value_name = "COLLECTION")]
    pub from: String,
    /// Points read per request.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub page: u32,
}

/// `embed`.
#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// Texts to embed, or - for stdin.
    #[arg(required = true)]
    pub texts: Vec<String>,
}

/// `reprocess`.
#[derive(Args)]
pub struct ReprocessArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Report what would move without moving anything.
    #[arg(long)]
    pub dry_run: bool,
}

/// `dlq …`.
#[derive(Subcommand)]
pub enum DlqCommand {
    /// Counts by kind, tenant and stage; oldest and newest failure.
    List(PipelineArg),
    /// Full headers and body of selected messages.
    Show {
        #[command(flatten)]
        pipeline: PipelineArg,
        #[command(flatten)]
        filter: FilterArgs,
    },
}

/// Parses `KEY=VALUE` (a non-empty key).
fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}
