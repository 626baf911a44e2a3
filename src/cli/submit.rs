//! `rag-ingest submit` and `rag-ingest delete`: documents in, confirmed messages out.
//!
//! Every document is checked with the worker's own rules ([`Document::check`]) before
//! anything is published, so a user learns at once what a worker would dead-letter.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use rag_ingest::config::PipelineConfig;
use rag_ingest::embed::Embedder;
use rag_ingest::extract::{self, ContentKind, ExtractLimits};
use rag_ingest::lane::Lane;
use rag_ingest::message::{Document, Rules};
use rag_ingest::queue::Submitter;
use rag_ingest::setup;
use rag_ingest::tenant::TenantId;

use super::args::{DeleteArgs, SubmitArgs};
use super::progress;

/// At most this many skipped paths are listed one by one; the rest are counted.
const SKIPPED_SHOWN: usize = 20;

/// Collects the documents named by `args`, checks them, and publishes them (or, with
/// `--dry-run`, prints what they would cost to embed).
///
/// Fails, publishing nothing, on a bad config or tenant, an unreadable input, or any
/// document the worker would reject; exits non-zero if the broker did not confirm every
/// message.
pub async fn run(args: SubmitArgs) -> Result<ExitCode> {
    let config = super::load(&args.pipeline)?;
    let tenant = TenantId::new(args.tenant).context("--tenant")?;
    if args.bulk && args.version.is_none() {
        bail!(
            "--bulk needs --version: versions keep the newest edit of a document whatever \
             lane each message took (a worker dead-letters unversioned bulk messages)"
        );
    }
    let lane = if args.bulk { Lane::Bulk } else { Lane::Live };
    let rules = Rules::from_config(&config);
    let limits = ExtractLimits::from_config(&config);
    let inputs = Inputs {
        tenant: &tenant,
        document_id: args.document_id,
        content_type: args.content_type.as_deref(),
        max_bytes: rules.max_document_bytes,
    };
    let mut collected = inputs.collect(&args.paths)?;
    for doc in &mut collected.docs {
        doc.version = args.version;
        for (k, v) in &args.metadata {
            doc.metadata
                .insert(k.clone(), serde_json::Value::from(v.as_str()));
        }
        if let Err(rejection) = doc.check(&rules) {
            collected.problems.push(format!(
                "{}: {} ({})",
                doc.document_id, rejection.reason, rejection.kind
            ));
        } else if let Err(failure) = extract::preflight(doc, &limits) {
            collected.problems.push(format!(
                "{}: {} ({})",
                doc.document_id, failure.reason, failure.kind
            ));
        }
    }
    collected.report_skipped();
    if !collected.problems.is_empty() {
        bail!(
            "nothing was submitted; fix these inputs first:\n  {}",
            collected.problems.join("\n  ")
        );
    }
    if collected.docs.is_empty() {
        bail!(
            "no documents found in {}",
            args.paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if args.dry_run {
        dry_run_report(&config, &collected.docs)
    } else {
        publish(&config, &collected.docs, "document(s)", lane).await
    }
}

/// Publishes one confirmed delete message per document id.
///
/// Fails, publishing nothing, on a bad config, tenant or document id; exits non-zero if the
/// broker did not confirm every message.
pub async fn delete(args: DeleteArgs) -> Result<ExitCode> {
    let config = super::load(&args.pipeline)?;
    let tenant = TenantId::new(args.tenant).context("--tenant")?;
    let rules = Rules::from_config(&config);
    let mut problems = Vec::new();
    let docs: Vec<Document> = args
        .document_ids
        .into_iter()
        .map(|id| {
            let mut doc = Document::delete(tenant.clone(), id);
            doc.version = args.version;
            if let Err(rejection) = doc.check(&rules) {
                problems.push(format!(
                    "{:?}: {} ({})",
                    doc.document_id, rejection.reason, rejection.kind
                ));
            }
            doc
        })
        .collect();
    if !problems.is_empty() {
        bail!(
            "nothing was submitted; fix these document ids first:\n  {}",
            problems.join("\n  ")
        );
    }
    publish(&config, &docs, "delete(s)", Lane::Live).await
}

/// Where documents come from, and how they are named and typed.
struct Inputs<'a> {
    tenant: &'a TenantId,
    document_id: Option<String>,
    content_type: Option<&'a str>,
    /// `limits.max_document_bytes`: larger files are refused without being read whole.
    max_bytes: usize,
}

/// What [`Inputs::collect`] found.
#[derive(Default)]
struct Collected {
    docs: Vec<Document>,
    /// Inputs that make the whole submit fail (nothing is published).
    problems: Vec<String>,
    /// Paths left out of a directory walk, with why.
    skipped: Vec<(PathBuf, &'static str)>,
}

impl Collected {
    /// Lists the skipped paths on stderr (the first [`SKIPPED_SHOWN`], then a count).
    fn report_skipped(&self) {
        if self.skipped.is_empty() {
            return;
        }
        eprintln!("skipped {} path(s):", self.skipped.len());
        for (path, why) in self.skipped.iter().take(SKIPPED_SHOWN) {
            eprintln!("  {}: {why}", path.display());
        }
        if self.skipped.len() > SKIPPED_SHOWN {
            eprintln!("  … and {} more", self.skipped.len() - SKIPPED_SHOWN);
        }
    }
}

impl Inputs<'_> {
    /// Reads every input: `-` (stdin), files, and directories walked recursively (each
    /// directory once, whatever symlinks lead to it; hidden entries and files of other
    /// types are skipped and listed).
    ///
    /// Fails on `--document-id` with several inputs, stdin without `--document-id`, or a
    /// path that does not exist or cannot be listed.
    fn collect(&self, paths: &[PathBuf]) -> Result<Collected> {
        if self.document_id.is_some() && paths.len() != 1 {
            bail!("--document-id can only be used with a single input");
        }
        let mut out = Collected::default();
        let mut files: Vec<(PathBuf, String)> = Vec::new();
        let mut walk = Walk::default();
        for path in paths {
            if path == Path::new("-") {
                out.docs.push(self.stdin_document()?);
            } else if path.is_dir() {
                walk.dir(path, path, &mut files, &mut out.skipped)?;
            } else if path.is_file() {
                let id = self.document_id.clone().unwrap_or_else(|| slash_path(path));
                files.push((path.clone(), id));
            } else {
                bail!("{}: no such file or directory", path.display());
            }
        }
        for (path, id) in files {
            match self.read_file(&path, id) {
                Ok(doc) => out.docs.push(doc),
                Err(problem) => out.problems.push(problem),
            }
        }
        Ok(out)
    }

    /// The document read from stdin.
    fn stdin_document(&self) -> Result<Document> {
        let Some(id) = self.document_id.clone() else {
            bail!("reading from stdin (-) needs --document-id");
        };
        let mut bytes = Vec::new();
        std::io::stdin()
            .take(
                u64::try_from(self.max_bytes)
                    .unwrap_or(u64::MAX)
                    .saturating_add(1),
            )
            .read_to_end(&mut bytes)
            .context("reading stdin")?;
        if bytes.len() > self.max_bytes {
            bail!(
                "stdin holds more than limits.max_document_bytes ({} bytes)",
                self.max_bytes
            );
        }
        let content_type = self.content_type.unwrap_or("text/plain");
        document(self.tenant, id, content_type, bytes).map_err(|e| anyhow::anyhow!("stdin: {e}"))
    }

    /// The document in file `path`, or the problem that keeps it out.
    fn read_file(&self, path: &Path, id: String) -> Result<Document, String> {
        let shown = path.display();
        let Some(content_type) = self.content_type.or_else(|| content_type_for(path)) else {
            return Err(format!(
                "{shown}: unsupported extension (use one of {} or --content-type)",
                ContentKind::EXTENSIONS
            ));
        };
        let size = std::fs::metadata(path)
            .map_err(|e| format!("{shown}: {e}"))?
            .len();
        if size > u64::try_from(self.max_bytes).unwrap_or(u64::MAX) {
            return Err(format!(
                "{shown}: {size} bytes; limits.max_document_bytes is {} (content_too_large)",
                self.max_bytes
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("{shown}: {e}"))?;
        document(self.tenant, id, content_type, bytes).map_err(|e| format!("{shown}: {e}"))
    }
}

/// A recursive directory walk that visits each directory and file once, whatever symlinks
/// lead to them.
#[derive(Default)]
struct Walk {
    /// Canonical paths of the directories entered and files taken.
    seen: HashSet<PathBuf>,
}

impl Walk {
    /// Adds the supported files under `dir` to `out` (ids relative to `root`, in path
    /// order), and the paths left out to `skipped`.
    ///
    /// Fails if a directory cannot be listed.
    fn dir(
        &mut self,
        root: &Path,
        dir: &Path,
        out: &mut Vec<(PathBuf, String)>,
        skipped: &mut Vec<(PathBuf, &'static str)>,
    ) -> Result<()> {
        let canonical = std::fs::canonicalize(dir)
            .with_context(|| format!("resolving directory {}", dir.display()))?;
        if !self.seen.insert(canonical) {
            skipped.push((
                dir.to_path_buf(),
                "directory already walked (a symlink loop or a second link to it)",
            ));
            return Ok(());
        }
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("reading directory {}", dir.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading directory {}", dir.display()))?;
        entries.sort_by_key(|e| e.path());
        for entry in entries {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                skipped.push((path, "hidden"));
            } else if path.is_dir() {
                self.dir(root, &path, out, skipped)?;
            } else if !path.is_file() {
                skipped.push((path, "not a regular file (or a broken symlink)"));
            } else if content_type_for(&path).is_none() {
                skipped.push((path, "unsupported extension"));
            } else if std::fs::canonicalize(&path).is_ok_and(|c| !self.seen.insert(c)) {
                skipped.push((path, "same file as one already taken (a symlink)"));
            } else {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                out.push((path.clone(), slash_path(rel)));
            }
        }
        Ok(())
    }
}

/// Content type for a file extension, if the worker reads it
/// ([`ContentKind::content_type_for_extension`]).
fn content_type_for(path: &Path) -> Option<&'static str> {
    ContentKind::content_type_for_extension(path.extension()?.to_str()?)
}

/// The upsert of `bytes` as `content_type`: text travels as it is, binary content (PDF) in
/// base64.
///
/// Fails if the content type is not supported, or text content is not UTF-8.
fn document(
    tenant: &TenantId,
    id: String,
    content_type: &str,
    bytes: Vec<u8>,
) -> Result<Document, String> {
    let kind = ContentKind::from_content_type(content_type).map_err(|e| e.to_string())?;
    if kind.is_binary() {
        return Ok(Document::upsert_bytes(
            tenant.clone(),
            id,
            content_type,
            &bytes,
        ));
    }
    let content = String::from_utf8(bytes)
        .map_err(|_| format!("not valid UTF-8 (required for {content_type})"))?;
    let mut doc = Document::upsert(tenant.clone(), id, content);
    doc.content_type = content_type.to_string();
    Ok(doc)
}

/// `path` with forward slashes and without a leading `./`: the default document id.
fn slash_path(path: &Path) -> String {
    let s = path.to_string_lossy().replace('\\', "/");
    s.strip_prefix("./").unwrap_or(&s).to_string()
}

/// Chunks every document with the pipeline's chunker and prints what embedding it would cost.
fn dry_run_report(config: &PipelineConfig, docs: &[Document]) -> Result<ExitCode> {
    let embedder = setup::embedder(config)?;
    let chunker = setup::chunker_for(config, &embedder)?;
    let (mut chunks, mut tokens) = (0usize, 0usize);
    let limits = ExtractLimits::from_config(config);
    for doc in docs {
        let pieces = extract::chunk_document(&chunker, doc, &limits)
            .map_err(|e| anyhow::anyhow!("{}: {e}", doc.document_id))?
            .chunks;
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

/// Publishes `docs` to `lane` with confirms, showing progress; exits non-zero listing the
/// documents the broker did not confirm.
async fn publish(
    config: &PipelineConfig,
    docs: &[Document],
    what: &str,
    lane: Lane,
) -> Result<ExitCode> {
    let submitter = Submitter::connect(config).await?.with_lane(lane);
    let queue = submitter.queue();
    let bar = progress::bar(docs.len(), "confirmed");
    let results = submitter.submit_all(docs, |_, _| bar.inc(1)).await;
    bar.finish_and_clear();
    submitter.close().await;
    let failed: Vec<String> = docs
        .iter()
        .zip(&results)
        .filter_map(|(d, r)| r.as_ref().err().map(|e| format!("{}: {e}", d.document_id)))
        .collect();
    println!(
        "submitted {} of {} {what} to {} for tenant {}",
        docs.len() - failed.len(),
        docs.len(),
        queue,
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
