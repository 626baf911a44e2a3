//! The `rag-ingest` command line: parses the arguments and runs one subcommand. Each
//! subcommand lives in its own module under `cli/`; the work itself is the library's.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use rag_ingest::telemetry::{self, LogFormat};

use cli::args::{Cli, Command, DlqCommand, LogFormatArg};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match cli.log_format {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    };
    // The worker is a service: it logs what it does. The other commands print their
    // results on stdout and keep stderr for problems unless asked for more.
    let level = match (&cli.command, cli.verbose) {
        (_, 2..) => "debug",
        (Command::Worker(_), _) | (_, 1) => "info",
        _ => "warn",
    };
    telemetry::init_with_level(format, level);
    match run(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `command`.
async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Worker(args) => cli::worker::run(args).await,
        Command::Submit(args) => cli::submit::run(args).await,
        Command::Delete(args) => cli::submit::delete(args).await,
        Command::Search(args) => cli::search::run(args).await,
        Command::PurgeTenant(args) => cli::admin::purge_tenant(args).await,
        Command::Reindex(args) => cli::admin::reindex(args).await,
        Command::Embed(args) => cli::admin::embed(args).await,
        Command::Doctor(args) => cli::admin::doctor(args).await,
        Command::Dlq { command } => match command {
            DlqCommand::List(pipeline) => cli::dlq::list(pipeline).await,
            DlqCommand::Show { pipeline, filter } => cli::dlq::show(pipeline, filter).await,
        },
        Command::Reprocess(args) => cli::dlq::reprocess(args).await,
        Command::Tenants(args) => cli::tenants::run(args).await,
    }
}
