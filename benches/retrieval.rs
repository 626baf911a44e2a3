//! Retrieval quality on real public text: dense, keyword (BM25) and hybrid search, with and
//! without contextual chunk text (needs RabbitMQ; panics if it is unreachable):
//!
//! ```text
//! cargo bench --bench retrieval
//! ```
//!
//! The corpus is written by no one here: the READMEs of the crates in the local cargo
//! registry (`$CARGO_HOME/registry/src/*/`), one document per crate (its newest version).
//! Each crate's `description` (from its `Cargo.toml`) is the query, and its README the one
//! relevant document. Derived mechanically:
//! - a crate without a description of at least 20 characters or a README of at least 300
//!   bytes is left out, and so is a crate whose description or README a crate earlier by
//!   name has (workspace crates often share both: a query would have several answers);
//! - the description's exact text is removed from the README (many READMEs open with it,
//!   which would make the task a string match), and READMEs are cut at 16 KiB (at a line
//!   break);
//! - the title (`metadata.title`) is the crate name; the crates are taken in name order, at
//!   most `RETRIEVAL_DOCS` of them (default 600; the bench refuses to report on fewer than
//!   500). `RETRIEVAL_CONTEXTS` (default `none,headings`) picks the `chunking.context` values
//!   measured, and `RETRIEVAL_PRECISIONS` (say `f32,int8`; default: the pipeline file's
//!   `embedder.precision`) the embedder precisions, each with every context.
//!
//! Ingestion goes through the product: for each `chunking.context` (`none`, `headings`) a
//! fresh pipeline from `pipelines/docs.toml` (tenant `acme`, its own queues and Edge store),
//! the release `rag-ingest worker` binary, and the library's `Submitter`; the bench waits for
//! every document to be stored, stops the worker, and opens the store with the library's
//! `Searcher`. Each query asks for the 100 best chunks; documents are ranked by their best
//! chunk. Reported per context and mode: Recall@1 (the relevant README ranks first), MRR@10
//! (mean of 1/rank, 0 beyond rank 10) and nDCG@10 (one relevant document: 1/log2(rank + 1)),
//! and the median query time.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rag_ingest::message::Document;
use rag_ingest::queue::Submitter;
use rag_ingest::search::{Fusion, SearchMode, SearchOptions, Searcher};
use rag_ingest::tenant::TenantId;

#[path = "support/mod.rs"]
mod support;

use support::{BenchPipeline, WorkerBinary, WorkerProcess};

/// The tenant every document belongs to (one allowed by `pipelines/docs.toml`).
const TENANT: &str = "acme";
/// Documents below this count make the figures too noisy to report.
const MIN_DOCS: usize = 500;
/// READMEs shorter than this (after the description is removed) are left out.
const MIN_README_BYTES: usize = 300;
/// READMEs are cut at this many bytes.
const MAX_README_BYTES: usize = 16 * 1024;
/// Chunks asked for per query.
const TOP_CHUNKS: usize = 100;

/// One crate: its name, its description (the query) and its README (the document).
struct Item {
    name: String,
    description: String,
    readme: String,
}

/// Quality of one (context, mode) run.
#[derive(Default)]
struct Scores {
    recall_at_1: f64,
    mrr_at_10: f64,
    ndcg_at_10: f64,
    median_query: Duration,
}

fn main() {
    let limit: usize = std::env::var("RETRIEVAL_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let registry = registry_dir();
    let corpus = corpus(&registry, limit);
    let bytes: usize = corpus.iter().map(|i| i.readme.len()).sum();
    eprintln!(
        "retrieval: {} documents ({bytes} bytes) from {}",
        corpus.len(),
        registry.display()
    );
    assert!(
        corpus.len() >= MIN_DOCS,
        "BENCH FAILED: only {} usable crate READMEs under {} (at least {MIN_DOCS} needed); \
         fetch more crates (cargo fetch in a larger project) or point CARGO_HOME elsewhere",
        corpus.len(),
        registry.display()
    );

    let rt = support::runtime();
    rt.block_on(support::require_broker());
    let binary = WorkerBinary::snapshot();
    let mut table = Vec::new();
    let contexts: Vec<String> = std::env::var("RETRIEVAL_CONTEXTS")
        .unwrap_or_else(|_| "none,headings".to_owned())
        .split(',')
        .map(|c| c.trim().to_owned())
        .collect();
    let precisions: Vec<Option<String>> = match std::env::var("RETRIEVAL_PRECISIONS") {
        Ok(list) => list.split(',').map(|p| Some(p.trim().to_owned())).collect(),
        Err(_) => vec![None],
    };
    for precision in &precisions {
        for context in contexts.iter().map(String::as_str) {
            let name = match precision {
                Some(p) => format!("retrieval-{p}-{context}"),
                None => format!("retrieval-{context}"),
            };
            let pipeline = BenchPipeline::new(&name, |t| {
                support::set(t, "chunking.context", context);
                if let Some(p) = precision {
                    support::set(t, "embedder.precision", p.as_str());
                }
            });
            let precision = precision.clone().unwrap_or_else(|| "(pipeline)".to_owned());
            let started = Instant::now();
            ingest(&rt, &binary, &pipeline, &corpus);
            eprintln!(
                "retrieval: precision={precision} context={context}: {} documents ingested in {:.0} s",
                corpus.len(),
                started.elapsed().as_secs_f64()
            );
            let searcher = rt
                .block_on(Searcher::open(&pipeline.config))
                .expect("the store opens after the worker exited");
            for (label, options) in variants() {
                let scores = rt.block_on(evaluate(&searcher, &corpus, &options));
                eprintln!(
                    "retrieval: precision={precision} context={context} {label}: Recall@1 {:.3} MRR@10 {:.3} nDCG@10 {:.3}",
                    scores.recall_at_1, scores.mrr_at_10, scores.ndcg_at_10
                );
                table.push((precision.clone(), context, label, scores));
            }
        }
    }

    println!();
    println!(
        "Retrieval on {} crate READMEs (query: the crate's description; relevant: its README)",
        corpus.len()
    );
    println!();
    println!(
        "| embedder.precision | chunking.context | mode | Recall@1 | MRR@10 | nDCG@10 | median query |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (precision, context, label, s) in &table {
        println!(
            "| {precision} | {context} | {label} | {:.3} | {:.3} | {:.3} | {:.1} ms |",
            s.recall_at_1,
            s.mrr_at_10,
            s.ndcg_at_10,
            s.median_query.as_secs_f64() * 1000.0
        );
    }
    let measured: Vec<(&str, &str)> =
        table
            .iter()
            .map(|(p, c, _, _)| (p.as_str(), *c))
            .fold(Vec::new(), |mut seen, key| {
                if !seen.contains(&key) {
                    seen.push(key);
                }
                seen
            });
    for (precision, context) in measured {
        let get = |label: &str| {
            table
                .iter()
                .find(|(p, c, l, _)| *p == precision && *c == context && l == label)
                .map(|(_, _, _, s)| s)
        };
        let (Some(d), Some(s)) = (get("dense"), get("sparse")) else {
            continue;
        };
        for (label, _) in variants().into_iter().skip(2) {
            let Some(h) = get(&label) else {
                continue;
            };
            let wins = h.recall_at_1 > d.recall_at_1.max(s.recall_at_1)
                && h.mrr_at_10 > d.mrr_at_10.max(s.mrr_at_10)
                && h.ndcg_at_10 > d.ndcg_at_10.max(s.ndcg_at_10);
            println!(
                "precision={precision} context={context}: {label} {} the better of dense and sparse on every metric",
                if wins { "beats" } else { "does NOT beat" }
            );
        }
    }
}

/// What is measured: dense, sparse, then hybrid with each fusion (the default first), each
/// with its label.
fn variants() -> Vec<(String, SearchOptions)> {
    let base = SearchOptions::new(TOP_CHUNKS);
    let mut variants = vec![
        ("dense".to_owned(), base.clone().mode(SearchMode::Dense)),
        ("sparse".to_owned(), base.clone().mode(SearchMode::Sparse)),
    ];
    let default = Fusion::default();
    for fusion in [default, Fusion::Rrf { k: 2 }, Fusion::Dbsf] {
        if fusion == default && variants.len() > 2 {
            continue;
        }
        let label = if fusion == default {
            format!("hybrid ({fusion}, default)")
        } else {
            format!("hybrid ({fusion})")
        };
        variants.push((label, base.clone().mode(SearchMode::Hybrid).fusion(fusion)));
    }
    variants
}

/// `$CARGO_HOME/registry/src` (`~/.cargo` without `CARGO_HOME`).
fn registry_dir() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("CARGO_HOME or HOME is set");
    home.join("registry/src")
}

/// The usable crates under `registry` (see the module documentation), at most `limit`, in
/// name order.
fn corpus(registry: &Path, limit: usize) -> Vec<Item> {
    // Newest version of each crate: name -> (version numbers, description, readme path).
    let mut newest: HashMap<String, (Vec<u64>, String, PathBuf)> = HashMap::new();
    let indexes = std::fs::read_dir(registry)
        .unwrap_or_else(|e| panic!("BENCH FAILED: cannot read {}: {e}", registry.display()));
    for index in indexes.flatten() {
        let Ok(crates) = std::fs::read_dir(index.path()) else {
            continue;
        };
        for dir in crates.flatten().map(|e| e.path()) {
            let Some((name, version, description, readme)) = describe(&dir) else {
                continue;
            };
            let newer = newest.get(&name).is_none_or(|(have, _, _)| version > *have);
            if newer {
                newest.insert(name, (version, description, readme));
            }
        }
    }
    let mut items: Vec<Item> = newest
        .into_iter()
        .filter_map(|(name, (_, description, path))| {
            let readme = std::fs::read_to_string(&path).ok()?;
            Some(Item {
                name,
                description,
                readme,
            })
        })
        .collect();
    // A description or README shared by several crates (a workspace's crates often share
    // both) would give a query several answers: only the first crate by name keeps it.
    items.sort_by(|a, b| a.name.cmp(&b.name));
    let mut descriptions = HashSet::new();
    let mut readmes = HashSet::new();
    items.retain(|item| {
        descriptions.insert(item.description.to_lowercase()) && readmes.insert(item.readme.clone())
    });
    for item in &mut items {
        item.readme = prepare_readme(&item.readme, &item.description);
    }
    items.retain(|item| item.readme.trim().len() >= MIN_README_BYTES);
    items.truncate(limit);
    items
}

/// The name, version numbers, one-line description and README path of the crate in `dir`,
/// if it has a description of at least 20 characters and a README.
fn describe(dir: &Path) -> Option<(String, Vec<u64>, String, PathBuf)> {
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).ok()?;
    let table: toml::Table = manifest.parse().ok()?;
    let package = table.get("package")?.as_table()?;
    let name = package.get("name")?.as_str()?.to_owned();
    let version = package
        .get("version")?
        .as_str()?
        .split(['.', '-', '+'])
        .map(|part| part.parse().unwrap_or(0))
        .collect();
    let description = package
        .get("description")?
        .as_str()?
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if description.len() < 20 {
        return None;
    }
    let readme = match package.get("readme") {
        Some(toml::Value::String(path)) => Some(dir.join(path)),
        Some(toml::Value::Boolean(false)) => None,
        _ => std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    let n = n.to_ascii_lowercase();
                    n == "readme.md" || n == "readme" || n == "readme.txt"
                })
            }),
    }?;
    readme
        .is_file()
        .then_some((name, version, description, readme))
}

/// `readme` without the exact text of `description` (wherever it appears), cut at
/// [`MAX_README_BYTES`] at a line break.
fn prepare_readme(readme: &str, description: &str) -> String {
    let mut text = readme.replace(description, "");
    if text.len() > MAX_README_BYTES {
        let cut = text.floor_char_boundary(MAX_README_BYTES);
        let cut = text[..cut].rfind('\n').unwrap_or(cut);
        text.truncate(cut);
    }
    text
}

/// Publishes every README through the real broker to a worker of `pipeline` and waits until
/// all are stored; the worker is stopped and must exit cleanly.
fn ingest(
    rt: &tokio::runtime::Runtime,
    binary: &WorkerBinary,
    pipeline: &BenchPipeline,
    corpus: &[Item],
) {
    let tenant = TenantId::new(TENANT).expect("valid tenant");
    let docs: Vec<Document> = corpus
        .iter()
        .map(|item| {
            let mut doc = Document::upsert(tenant.clone(), item.name.clone(), item.readme.clone());
            doc.content_type = "text/markdown".into();
            doc.metadata
                .insert("title".into(), serde_json::json!(item.name));
            doc
        })
        .collect();
    let mut worker = WorkerProcess::start(binary, &pipeline.file, &[]);
    worker.wait_for(&support::CONSUMING, 1, Duration::from_secs(120));
    let submitter = rt
        .block_on(Submitter::connect(&pipeline.config))
        .expect("the submitter connects");
    let results = rt.block_on(submitter.submit_all(&docs, |_, _| {}));
    for (doc, result) in docs.iter().zip(&results) {
        if let Err(e) = result {
            panic!(
                "BENCH FAILED: the broker did not confirm {}: {e}",
                doc.document_id
            );
        }
    }
    worker.wait_for(&support::STORED, docs.len(), Duration::from_secs(3600));
    rt.block_on(submitter.close());
    worker.signal("TERM");
    let (status, log) = worker.wait_exit_blocking(Duration::from_secs(120));
    support::check_clean_exit(status, &log, docs.len() as u64);
}

/// Recall@1, MRR@10, nDCG@10 and the median query time of searches with `options` over every
/// description.
async fn evaluate<E, S>(
    searcher: &Searcher<E, S>,
    corpus: &[Item],
    options: &SearchOptions,
) -> Scores
where
    E: rag_ingest::embed::Embedder,
    S: rag_ingest::store::VectorStore,
{
    let mode = options.mode;
    let mut scores = Scores::default();
    let mut times = Vec::with_capacity(corpus.len());
    for item in corpus {
        let started = Instant::now();
        let hits = searcher
            .search_with(TENANT, &item.description, options)
            .await
            .unwrap_or_else(|e| panic!("BENCH FAILED: {mode} search for {}: {e}", item.name));
        times.push(started.elapsed());
        let mut seen = HashSet::new();
        let ranking: Vec<&str> = hits
            .iter()
            .map(|hit| hit.document_id.as_str())
            .filter(|id| seen.insert(*id))
            .collect();
        if let Some(rank) = ranking
            .iter()
            .position(|id| *id == item.name)
            .map(|i| i + 1)
        {
            if rank == 1 {
                scores.recall_at_1 += 1.0;
            }
            if rank <= 10 {
                scores.mrr_at_10 += 1.0 / rank as f64;
                scores.ndcg_at_10 += 1.0 / ((rank + 1) as f64).log2();
            }
        }
    }
    let n = corpus.len().max(1) as f64;
    scores.recall_at_1 /= n;
    scores.mrr_at_10 /= n;
    scores.ndcg_at_10 /= n;
    scores.median_query = support::median(&times).unwrap_or_default();
    scores
}
