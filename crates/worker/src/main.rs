//! stalewatch-worker: runs the check and confirm jobs, the backup sweep and queue upkeep.
//!
//! ```text
//! stalewatch-worker              run until SIGTERM
//! stalewatch-worker migrate      apply database migrations and exit
//! stalewatch-worker sweep --once compare every item once, print a summary, exit
//! ```

use anyhow::{bail, Context};
use stalewatch_core::{config::Config, db, logging, watch::Watched};
use stalewatch_worker::{app, sweep};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    logging::init(config.log_format);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let applied = db::migrate(&config.database_url)
        .await
        .context("applying migrations")?;
    match args.as_slice() {
        [] | ["run"] => app::run(config).await,
        ["migrate"] => {
            println!(
                "applied {} migration(s): {}",
                applied.len(),
                applied.join(", ")
            );
            Ok(())
        }
        ["sweep", "--once"] => {
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
        ["entities", "check", rest @ ..] => {
            // The file given, else ENTITIES, else the built-in one; checked against the live
            // tables. For a team's CI: exits non-zero on any mistake.
            let config = match rest {
                [] => config,
                [file] => Config {
                    entities: Some(file.into()),
                    ..config
                },
                _ => bail!("usage: stalewatch-worker entities check [FILE]"),
            };
            let pool = db::pool(&config.database_url, 1)?;
            match Watched::configured(&config, &pool).await {
                Ok(watched) => {
                    print!("{}", watched.describe());
                    Ok(())
                }
                Err(e) => bail!("{e}"),
            }
        }
        _ => {
            bail!("usage: stalewatch-worker [run | migrate | sweep --once | entities check [FILE]]")
        }
    }
}
