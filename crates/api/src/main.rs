//! stalewatch-api: the demo items API with cache-aside reads, and the incident API.
//!
//! Every setting is a flag or an environment variable (`--help` lists them with their
//! defaults). Exit codes: 1 a runtime error, 2 a usage error (ADMIN_TOKEN unset included).

use std::process::ExitCode;

use actix_web::{App, HttpServer};
use anyhow::Context;
use clap::Parser;
use stalewatch_api::{configure, deadline, state::AppState};
use stalewatch_core::{
    cli,
    config::{Config, Settings},
    db, logging,
};

const BIN: &str = "stalewatch-api";

/// mimalloc, not glibc's malloc: see the workspace Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Serves the items API (cache-aside reads, writes that ask for checks) and the incident API
/// of stalewatch, which finds divergences between PostgreSQL rows and their Redis copies.
#[derive(Parser)]
#[command(name = BIN, version)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
}

fn main() -> ExitCode {
    let cli: Cli = cli::parse();
    let secrets = cli.settings.secrets();
    let config = match cli
        .settings
        .config()
        .and_then(|c| c.require_admin_token().map(|()| c))
    {
        Ok(config) => config,
        Err(e) => return cli::fail(BIN, cli::USAGE, &e.to_string(), &secrets),
    };
    if let Some(filter) = cli.settings.get("RUST_LOG") {
        // `--rust-log`: read by the log filter. No other thread runs yet.
        std::env::set_var("RUST_LOG", filter);
    }
    logging::init(config.log_format);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %cli.settings.effective(),
        "stalewatch-api configuration"
    );
    match actix_web::rt::System::new().block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => cli::fail(BIN, cli::RUNTIME, &format!("{e:#}"), &secrets),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    db::migrate(&config.database_url)
        .await
        .context("applying migrations")?;
    let addr = config.http_addr.clone();
    let state = AppState::connect(config).await?;
    let failure_mode = state.config.failure_mode;
    let client_timeout = state.config.http_client_timeout;
    // actix's defaults leave a request head 5 s and an idle connection 5 s; HTTP_CLIENT_TIMEOUT_MS
    // sets both, and the body's time (`deadline::BodyDeadline`, in `configure`).
    let server = HttpServer::new(move || App::new().configure(configure(state.clone())))
        .client_request_timeout(client_timeout)
        .keep_alive(client_timeout)
        .client_disconnect_timeout(deadline::DISCONNECT_TIMEOUT)
        .bind(&addr)
        .with_context(|| format!("binding HTTP_ADDR={addr}"))?;
    tracing::info!(addr = ?server.addrs(), ?failure_mode, "stalewatch-api listening");
    server.run().await?;
    Ok(())
}
