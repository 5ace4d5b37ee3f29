use actix_web::{App, HttpServer};
use anyhow::Context;
use stalewatch_api::{configure, state::AppState};
use stalewatch_core::{config::Config, db, logging};

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    logging::init(config.log_format);
    db::migrate(&config.database_url)
        .await
        .context("applying migrations")?;
    let addr = config.http_addr;
    let state = AppState::connect(config).await?;
    tracing::info!(%addr, failure_mode = ?state.config.failure_mode, "stalewatch-api listening");
    HttpServer::new(move || App::new().configure(configure(state.clone())))
        .bind(addr)
        .with_context(|| format!("binding HTTP_ADDR={addr}"))?
        .run()
        .await?;
    Ok(())
}
