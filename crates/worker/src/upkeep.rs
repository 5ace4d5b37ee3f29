//! Queue upkeep apalis-redis 1.0 leaves to us, and the gauges read from the stores.

use std::time::Duration;

use redis::aio::ConnectionManager;
use stalewatch_core::{
    db::PgPool,
    jobs::{CheckJob, ConfirmJob, Job},
    keys::Keys,
    metrics::Metrics,
    queue, track,
};
use tokio_util::sync::CancellationToken;

const TICK: Duration = Duration::from_millis(250);
/// Finished jobs deleted per queue per tick: far more than a worker finishes in a tick.
const DONE_PER_TICK: usize = 5000;

/// Every tick: promote due jobs in bounded chunks, delete finished ones, refresh gauges.
pub async fn run(
    mut conn: ConnectionManager,
    keys: Keys,
    pool: PgPool,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        n += 1;
        if let Err(e) = tend::<CheckJob>(&mut conn, &keys, &metrics).await {
            tracing::debug!(error = %e, "queue upkeep failed; retrying next tick");
        }
        if let Err(e) = tend::<ConfirmJob>(&mut conn, &keys, &metrics).await {
            tracing::debug!(error = %e, "queue upkeep failed; retrying next tick");
        }
        // Once a second is plenty for a gauge.
        if n.is_multiple_of(4) {
            if let Err(e) = track::refresh_open_gauge(&pool, &metrics).await {
                tracing::debug!(error = %e, "open-incident gauge not refreshed");
            }
        }
    }
}

async fn tend<J: Job>(
    conn: &mut ConnectionManager,
    keys: &Keys,
    metrics: &Metrics,
) -> Result<(), queue::QueueError> {
    let config = queue::config::<J>(keys, 1);
    queue::promote_due(conn, &config).await?;
    queue::delete_done(conn, &config, DONE_PER_TICK).await?;
    queue::report_depth::<J>(conn, keys, metrics).await?;
    Ok(())
}
