//! stalewatch-worker: runs the check and confirm jobs, the backup sweep and queue upkeep.
//!
//! ```text
//! stalewatch-worker [run]                  run until SIGTERM
//! stalewatch-worker migrate                apply database migrations and exit
//! stalewatch-worker sweep --once           compare every item once, print a summary, exit
//! stalewatch-worker entities check [FILE]  check an entities file against the live tables
//! stalewatch-worker rebuild --entity NAME  rewrite every key of an entity from PostgreSQL
//! ```
//!
//! Every setting is a flag or an environment variable (`--help` lists them with their
//! defaults). Exit codes: 0 done, 1 a runtime error, 2 a usage error.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use stalewatch_core::{
    cli,
    config::{Config, Settings},
    db, logging,
    watch::{WatchError, Watched},
};
use stalewatch_worker::{app, rebuild, sweep};

const BIN: &str = "stalewatch-worker";

/// mimalloc, not glibc's malloc: see the workspace Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Finds divergences between PostgreSQL rows and their Redis copies: runs the check and
/// confirm jobs, change capture, the backup sweep and the queue upkeep.
#[derive(Parser)]
#[command(name = BIN, version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Subcommand)]
enum Command {
    /// Run until SIGTERM or Ctrl-C (the default).
    Run,
    /// Apply the database migrations and exit.
    Migrate,
    /// Compare every watched row and key once at full speed, print a summary, exit.
    Sweep {
        /// Required: one pass, then exit (the periodic sweep runs under `run`).
        #[arg(long, required = true)]
        once: bool,
    },
    /// Rewrite every key of an entity from PostgreSQL, in large pipelined batches
    /// (REBUILD_BATCH), never over a newer version written meanwhile. One rebuild per entity
    /// at a time: a second one names the holder of the lock and exits 1.
    Rebuild {
        /// The entity, by its name in the ENTITIES file.
        #[arg(long)]
        entity: String,
    },
    /// The entities file.
    Entities {
        #[command(subcommand)]
        command: EntitiesCommand,
    },
}

#[derive(Subcommand)]
enum EntitiesCommand {
    /// Check FILE (else ENTITIES, else the built-in file) against the live tables: prints the
    /// model, or every mistake and exit code 1. For a team's CI.
    Check { file: Option<PathBuf> },
}

fn main() -> ExitCode {
    let cli: Cli = cli::parse();
    let secrets = cli.settings.secrets();
    let config = match cli.settings.config() {
        Ok(config) => config,
        Err(e) => return cli::fail(BIN, cli::USAGE, &e.to_string(), &secrets),
    };
    if let Some(filter) = cli.settings.get("RUST_LOG") {
        // `--rust-log`: read by the log filter. No other thread runs yet.
        std::env::set_var("RUST_LOG", filter);
    }
    logging::init(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return cli::fail(BIN, cli::RUNTIME, &format!("starting tokio: {e}"), &[]),
    };
    let command = cli.command.unwrap_or(Command::Run);
    match runtime.block_on(run(command, config, &cli.settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => cli::fail(BIN, cli::RUNTIME, &format!("{e:#}"), &secrets),
    }
}

async fn run(command: Command, config: Config, settings: &Settings) -> anyhow::Result<()> {
    if let Command::Run = command {
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            config = %settings.effective(),
            "stalewatch-worker configuration"
        );
    }
    let applied = db::migrate(&config.database_url)
        .await
        .context("applying migrations")?;
    match command {
        Command::Run => app::run(config).await,
        Command::Migrate => {
            println!(
                "applied {} migration(s): {}",
                applied.len(),
                applied.join(", ")
            );
            Ok(())
        }
        Command::Sweep { .. } => {
            let ctx = app::connect(&config).await?;
            let summary = app::sweeper(&ctx, &config).once().await?;
            println!(
                "swept {} items in {:.2} s ({:.0} items/s): {} mismatched, {} transitions",
                summary.items,
                summary.seconds,
                summary.items_per_second,
                sweep::mismatches(&summary),
                summary.transitions
            );
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Command::Rebuild { entity } => {
            let ctx = app::connect(&config).await?;
            let summary = rebuild::run(&ctx, &config, &entity).await?;
            println!(
                "rebuilt {} keys of {} in {:.2} s ({:.0} keys/s): {} written, {} skipped (newer in the cache), {} deleted, {} undecodable; {} open incidents checked again",
                summary.keys,
                summary.entity,
                summary.seconds,
                summary.keys_per_second,
                summary.written,
                summary.skipped_newer,
                summary.deleted,
                summary.undecodable,
                summary.rechecked
            );
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Command::Entities {
            command: EntitiesCommand::Check { file },
        } => {
            // The file given, else ENTITIES, else the built-in one.
            let config = Config {
                entities: file.or(config.entities),
                ..config
            };
            let pool = db::pool(&config.database_url, 1)?;
            match Watched::configured(&config, &pool).await {
                Ok(watched) if !watched.ingest_grants_missing().is_empty() => {
                    let mistakes = watched.ingest_grants_missing();
                    for mistake in &mistakes {
                        eprintln!("{mistake}");
                    }
                    bail!("the entities file has {} mistake(s)", mistakes.len())
                }
                Ok(watched) => {
                    print!("{}", watched.describe());
                    Ok(())
                }
                // The report: every mistake on a line of its own, then the one-line error.
                Err(WatchError::Model(mistakes)) => {
                    for mistake in &mistakes {
                        eprintln!("{mistake}");
                    }
                    bail!("the entities file has {} mistake(s)", mistakes.len())
                }
                Err(e) => bail!("{e}"),
            }
        }
    }
}
