//! `rag-ingest search`: one tenant's nearest chunks, as a table or JSON.

use std::process::ExitCode;

use anyhow::Result;
use rag_ingest::search::{SearchHit, SearchOptions, Searcher};

use super::args::SearchArgs;

/// Searches `args.tenant`'s documents and prints the hits on stdout.
///
/// Fails on a bad config, an invalid tenant or filter key, a model or store that cannot be
/// opened, or a failed search.
pub async fn run(args: SearchArgs) -> Result<ExitCode> {
    let config = super::load(&args.pipeline)?;
    let searcher = Searcher::open(&config).await?;
    let mut options = SearchOptions::new(args.top_k);
    for (key, value) in args.filters {
        options = options.metadata_eq(key, value);
    }
    options.min_score = args.min_score;
    options.mode = args.mode;
    if let Some(fusion) = args.fusion {
        options.fusion = fusion;
    }
    let hits = searcher
        .search_with(&args.tenant, &args.query, &options)
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&hits)?);
    } else if hits.is_empty() {
        println!("no results for tenant {}", args.tenant);
    } else {
        for (i, hit) in hits.iter().enumerate() {
            println!("{}", table_row(i + 1, hit));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line of the table: rank, score, ranks per branch, document, version, PDF page, chunk,
/// byte range, snippet.
fn table_row(rank: usize, h: &SearchHit) -> String {
    let snippet: String = h.text.split_whitespace().collect::<Vec<_>>().join(" ");
    let snippet: String = snippet.chars().take(160).collect();
    let version = h.version.map(|v| format!(" v{v}")).unwrap_or_default();
    let page = h.page.map(|p| format!(" p.{p}")).unwrap_or_default();
    let branch = |rank: Option<usize>| rank.map_or("-".to_owned(), |r| r.to_string());
    format!(
        "{rank:>2}. {:.3} (dense {}, sparse {})  {}{}{} #{} [{}..{}]  {}",
        h.score,
        branch(h.ranks.dense),
        branch(h.ranks.sparse),
        h.document_id,
        version,
        page,
        h.chunk_index,
        h.byte_range.start,
        h.byte_range.end,
        snippet
    )
}
