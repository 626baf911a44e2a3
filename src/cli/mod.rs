//! The subcommands of the `rag-ingest` binary, one module per concern.

pub mod admin;
pub mod args;
pub mod dlq;
pub mod progress;
pub mod search;
pub mod submit;
pub mod tenants;
pub mod worker;

use anyhow::Result;
use rag_ingest::config::PipelineConfig;

use args::PipelineArg;

/// Loads and validates the `--pipeline` file.
pub fn load(arg: &PipelineArg) -> Result<PipelineConfig> {
    Ok(PipelineConfig::load(&arg.pipeline)?)
}
