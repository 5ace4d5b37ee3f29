//! The confirmation backstop: confirm jobs live in Redis and can be lost with it (a flushed
//! or restored Redis, a push that failed), so every `CONFIRM_BACKSTOP_MS` the worker looks up
//! Detected incidents whose confirmation is overdue, in PostgreSQL, and confirms them through
//! the same state machine as a confirm job would.
//!
//! Safe with any number of workers: a confirmation acts only while its incident is still the
//! key's Detected one, so two workers confirming the same incident count it once.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use stalewatch_core::{check::CheckError, db::incidents, metrics::Metrics};
use tokio_util::sync::CancellationToken;

use crate::handlers::Ctx;

/// The most incidents one round confirms; the next round takes the rest.
const BATCH: i64 = 1000;

/// How late a confirmation must be before the backstop takes it: the confirm job's own
/// chance first (it runs within a second of the due time when the queue is healthy).
const SLACK: Duration = Duration::from_secs(2);

/// Every `every`, until `shutdown`.
pub async fn run(ctx: Ctx, every: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match once(&ctx).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(incidents = n, "backstop confirmed overdue incidents"),
            Err(e) => {
                tracing::warn!(error = %e, "confirmation backstop failed; retrying next round")
            }
        }
    }
}

/// One round: confirms up to `BATCH` overdue incidents. Returns how many it looked at.
pub async fn once(ctx: &Ctx) -> anyhow::Result<usize> {
    let overdue = {
        let mut conn = ctx.checker.pool.get().await?;
        incidents::overdue(&mut conn, SLACK, BATCH).await?
    };
    if overdue.is_empty() {
        return Ok(0);
    }
    count(ctx.metrics(), overdue.len());
    let mut by_entity: BTreeMap<&str, HashMap<String, i64>> = BTreeMap::new();
    for o in &overdue {
        by_entity
            .entry(&o.entity)
            .or_default()
            .insert(o.cache_key.clone(), o.id);
    }
    for (entity, expected) in by_entity {
        let keys: Vec<String> = expected.keys().cloned().collect();
        match ctx.checker.confirm(entity, &keys, &expected).await {
            // An entity no longer in the ENTITIES file: nothing can confirm its incidents.
            Err(CheckError::UnknownEntity(e)) => {
                tracing::debug!(
                    entity = e,
                    "overdue incidents of an entity no longer watched"
                )
            }
            other => {
                other?;
            }
        }
    }
    Ok(overdue.len())
}

fn count(metrics: &Metrics, n: usize) {
    metrics
        .jobs
        .with_label_values(&["confirm_backstop", "overdue"])
        .inc_by(n as u64);
}
