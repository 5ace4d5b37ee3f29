//! The watermark drift check, every `WATERMARK_CHECK_MS`, of every entity that has a
//! watermark (`stalewatch_core::watermark`: ingesting, with a version); and, with
//! `WATERMARK_REBUILD=on`, a rebuild of an entity once its `cache_behind` incident is
//! confirmed.
//!
//! Every worker runs it: an observation is one indexed read of the table and two Redis
//! reads, and concurrent observers of one incident are what the state machine's conditional
//! writes are for. A rebuild runs once per incident in the process that saw it confirmed (or
//! persistent) first; the rebuild lock turns away the others, and the rebuild's own check at
//! its end resolves the incident with cause `repair`.

use std::collections::HashSet;

use stalewatch_core::{
    config::Config,
    db::incidents,
    incident::{Source, State},
    watermark,
};
use tokio_util::sync::CancellationToken;

use crate::{handlers::Ctx, rebuild};

/// Until `shutdown`.
pub async fn run(ctx: Ctx, config: Config, shutdown: CancellationToken) {
    let entities: Vec<String> = ctx
        .checker
        .watched
        .sources()
        .iter()
        .filter(|rows| watermark::tracked(&rows.entity))
        .map(|rows| rows.entity.name.clone())
        .collect();
    if entities.is_empty() {
        return;
    }
    let mut ticks = tokio::time::interval(config.watermark_check);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The incidents this process started a rebuild for.
    let mut rebuilt: HashSet<i64> = HashSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        for entity in &entities {
            let observed =
                watermark::observe(&ctx.checker, entity, Source::Watermark, None, None).await;
            if let Err(e) = observed {
                tracing::warn!(entity, error = %e, "watermark check failed; retrying next round");
                continue;
            }
            if config.watermark_rebuild {
                if let Err(e) = maybe_rebuild(&ctx, &config, entity, &mut rebuilt).await {
                    tracing::warn!(entity, error = %e, "could not look at the entity's incident");
                }
            }
        }
    }
}

/// Starts a rebuild of `entity` when its `cache_behind` incident is confirmed (or persistent)
/// and this process has not started one for that incident yet.
async fn maybe_rebuild(
    ctx: &Ctx,
    config: &Config,
    entity: &str,
    rebuilt: &mut HashSet<i64>,
) -> anyhow::Result<()> {
    let key = ctx.keys().watermark(entity);
    let open = {
        let conn = ctx.checker.pool.get().await?;
        incidents::open_for_keys(&conn, std::slice::from_ref(&key)).await?
    };
    let Some(incident) = open.get(&key) else {
        return Ok(());
    };
    let confirmed = [State::Confirmed, State::Persistent]
        .iter()
        .any(|s| s.as_str() == incident.state);
    if !confirmed || !rebuilt.insert(incident.id) {
        return Ok(());
    }
    tracing::info!(
        entity,
        incident = incident.id,
        diff = %incident.diff,
        "the cache is behind; rebuilding it (WATERMARK_REBUILD=on)"
    );
    let (ctx, config, entity) = (ctx.clone(), config.clone(), entity.to_string());
    tokio::spawn(async move {
        match rebuild::run_logged(&ctx, &config, &entity).await {
            Ok(summary) => tracing::info!(
                entity,
                keys = summary.keys,
                written = summary.written,
                seconds = summary.seconds,
                "rebuild done"
            ),
            Err(e) => tracing::warn!(entity, error = format!("{e:#}"), "rebuild not done"),
        }
    });
    Ok(())
}
