//! Store and model administration: `purge-tenant`, `embed` and `doctor`.

use std::io::Read;
use std::process::ExitCode;

use anyhow::{Context, Result};
use rag_ingest::embed::Embedder;
use rag_ingest::setup;
use rag_ingest::store::VectorStore;
use rag_ingest::tenant::TenantId;

use super::args::{EmbedArgs, PipelineArg, PurgeArgs};

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
