//! Store and model administration: `purge-tenant`, `reindex`, `embed` and `doctor`.

use std::io::Read;
use std::process::ExitCode;

use anyhow::{Context, Result};
use rag_ingest::embed::{Embedder, Fingerprint};
use rag_ingest::setup;
use rag_ingest::store::VectorStore;
use rag_ingest::tenant::TenantId;

use super::args::{EmbedArgs, PipelineArg, PurgeArgs, ReindexArgs};

/// Deletes every point of one tenant, after the explicit confirmation flag; exits non-zero
/// if points remain (written concurrently).
///
/// Fails on an invalid tenant, a bad config, or a store that cannot be opened or answers
/// with an error.
pub async fn purge_tenant(args: PurgeArgs) -> Result<ExitCode> {
    let tenant = TenantId::new(args.tenant).context("--tenant")?;
    if !args.yes_delete_everything {
        eprintln!(
            "refusing to purge tenant {tenant}: this deletes every chunk of the tenant \
             and cannot be undone; add --yes-delete-everything to confirm"
        );
        return Ok(ExitCode::FAILURE);
    }
    let config = super::load(&args.pipeline)?;
    let embedder = setup::embedder(&config)?;
    let store = setup::open_vector_store(&config, embedder.fingerprint()).await?;
    let before = store.count(&tenant, None).await?;
    store.purge_tenant(&tenant).await?;
    let after = store.count(&tenant, None).await?;
    println!(
        "purged tenant {tenant} from {} collection {}: {before} point(s) before, {after} after",
        store.kind(),
        config.store.collection,
    );
    if after == 0 {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{after} point(s) of tenant {tenant} remain (written concurrently?)");
        Ok(ExitCode::FAILURE)
    }
}

/// Copies the collection `args.from` into the pipeline's collection with keyword vectors
/// (see [`rag_ingest::reindex`]), showing progress on a terminal.
///
/// Fails on a bad config, a source that does not exist, is the target itself or holds
/// vectors of another embedder, or a store error (re-running the command resumes the copy).
pub async fn reindex(args: ReindexArgs) -> Result<ExitCode> {
    let config = super::load(&args.pipeline)?;
    if args.from == config.store.collection {
        anyhow::bail!(
            "--from {} is the pipeline's own collection (store.collection): set \
             store.collection to the new collection's name and pass the old one to --from",
            args.from
        );
    }
    let embedder = setup::embedder(&config)?;
    let (source, recorded) = setup::open_existing_store(&config, &args.from)
        .await
        .with_context(|| format!("--from {}", args.from))?;
    let dense = Fingerprint {
        sparse: None,
        ..recorded.clone()
    };
    if dense != *embedder.fingerprint() {
        anyhow::bail!(
            "collection {} holds vectors of {}, the pipeline's embedder makes {}: reindex copies \
             vectors and cannot change the model; re-ingest the documents instead",
            args.from,
            recorded.id(),
            embedder.fingerprint().id()
        );
    }
    let target = setup::open_vector_store(&config, embedder.fingerprint()).await?;
    let bar = super::progress::spinner("points copied");
    let sparse = rag_ingest::sparse::SparseEncoder::bm25();
    let report = rag_ingest::reindex::copy_collection(
        &source,
        &target,
        &sparse,
        args.page as usize,
        |report| {
            if report.checked > 0 {
                bar.set_message("documents checked for writes made meanwhile");
                bar.set_position(report.checked);
            } else {
                bar.set_position(report.points);
            }
        },
    )
    .await?;
    bar.finish_and_clear();
    println!(
        "copied {} point(s) ({} tombstone(s)) from {} collection {} into {}, with keyword \
         vectors; {} document(s) written by a worker meanwhile kept only their newest revision",
        report.points,
        report.tombstones,
        source.kind(),
        args.from,
        config.store.collection,
        report.settled
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints one JSON vector per text (`-`: one text per stdin line).
///
/// Fails on a bad config, a model that cannot be loaded, unreadable stdin or a failed
/// embedding call.
pub async fn embed(args: EmbedArgs) -> Result<ExitCode> {
    let config = super::load(&args.pipeline)?;
    let embedder = setup::embedder(&config)?;
    let texts = if args.texts == ["-"] {
        let mut input = String::new();
        std::io::stdin()
            .read_to_string(&mut input)
            .context("reading stdin")?;
        input.lines().map(str::to_owned).collect()
    } else {
        args.texts
    };
    for vector in embedder.embed(texts).await? {
        println!("{}", serde_json::to_string(&vector)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs every check and prints one line per check; exits non-zero if any failed.
pub async fn doctor(args: PipelineArg) -> Result<ExitCode> {
    let checks = rag_ingest::doctor::run(&args.pipeline).await;
    for check in &checks {
        println!("{}", check.line());
    }
    Ok(if checks.iter().all(|c| c.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
