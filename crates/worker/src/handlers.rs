//! The job handlers: thin, all logic lives in stalewatch-core.

use std::{collections::HashMap, sync::Arc};

use apalis::prelude::{BoxDynError, Data};
use chrono::Utc;
use stalewatch_core::{
    check::Checker,
    jobs::{CheckJob, ConfirmJob, Job, SloJob},
    keys::Keys,
    metrics::Metrics,
    queue, slo,
};
use tokio::sync::Semaphore;

/// What every handler shares.
#[derive(Clone)]
pub struct Ctx {
    pub checker: Checker,
    pub queue_conn: redis::aio::ConnectionManager,
    /// Jobs using PostgreSQL at once (`Config::job_db_slots`). A job waits here, in flight
    /// and heartbeating, rather than on the pool, whose time-out would fail it.
    pub db_slots: Arc<Semaphore>,
    /// Wakes this process's check worker at once, when this process queued checks (change
    /// capture) and the next poll would only add latency.
    pub check_wake: Arc<tokio::sync::Notify>,
    /// `SLO_WINDOWS`: the probes each captured change gets.
    pub slo_windows: Vec<std::time::Duration>,
}

impl Ctx {
    pub fn keys(&self) -> &Keys {
        self.checker.cache.keys()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.checker.metrics
    }

    fn count<J: Job>(&self, outcome: &str) {
        self.metrics()
            .jobs
            .with_label_values(&[J::NAME, outcome])
            .inc();
    }
}

pub async fn check(job: CheckJob, ctx: Data<Ctx>) -> Result<(), BoxDynError> {
    let _slot = ctx.db_slots.acquire().await?;
    match ctx
        .checker
        .check_keys(&job.entity, &job.keys, job.source, None)
        .await
    {
        Ok(_) => {
            ctx.count::<CheckJob>("ok");
            Ok(())
        }
        Err(e) => {
            ctx.count::<CheckJob>("error");
            // apalis retries it later; a DB or Redis outage is the usual cause.
            Err(e.into())
        }
    }
}

pub async fn confirm(job: ConfirmJob, ctx: Data<Ctx>) -> Result<(), BoxDynError> {
    // apalis schedules in whole seconds, rounding down: never confirm before the grace ends.
    if let Ok(early) = (job.due_at - Utc::now()).to_std() {
        tokio::time::sleep(early).await;
    }
    let expected: HashMap<String, i64> = job
        .targets
        .iter()
        .map(|t| (t.key.clone(), t.incident_id))
        .collect();
    let keys: Vec<String> = job.targets.iter().map(|t| t.key.clone()).collect();
    // Only now: a job waiting for its due time holds no slot.
    let _slot = ctx.db_slots.acquire().await?;
    match ctx.checker.confirm(&job.entity, &keys, &expected).await {
        Ok(_) => {
            ctx.count::<ConfirmJob>("ok");
            Ok(())
        }
        Err(e) => {
            ctx.count::<ConfirmJob>("error");
            Err(e.into())
        }
    }
}

pub async fn slo(job: SloJob, ctx: Data<Ctx>) -> Result<(), BoxDynError> {
    // apalis schedules in whole seconds, rounding down: never probe before the window ends.
    if let Ok(early) = (job.due_at - Utc::now()).to_std() {
        tokio::time::sleep(early).await;
    }
    let _slot = ctx.db_slots.acquire().await?;
    let probed = async {
        let agreement = slo::probe(&ctx.checker, &job.entity, &job.keys).await?;
        let (entity, window_ms) = (job.entity.clone(), job.window_ms);
        // Queued before anything is counted: if queueing fails the whole probe is retried,
        // and a window is never left out.
        if let Some(next) = job.into_next() {
            let due_at = next.due_at;
            let mut conn = ctx.queue_conn.clone();
            queue::push(&mut conn, ctx.keys(), vec![(next, Some(due_at))]).await?;
        }
        Ok::<_, BoxDynError>((entity, window_ms, agreement))
    };
    match probed.await {
        Ok((entity, window_ms, agreement)) => {
            let window = slo::window_label(std::time::Duration::from_millis(window_ms));
            let counter = &ctx.metrics().slo_changes;
            counter
                .with_label_values(&[entity.as_str(), &window, "consistent"])
                .inc_by(agreement.consistent);
            counter
                .with_label_values(&[entity.as_str(), &window, "inconsistent"])
                .inc_by(agreement.inconsistent);
            ctx.count::<SloJob>("ok");
            Ok(())
        }
        Err(e) => {
            ctx.count::<SloJob>("error");
            Err(e)
        }
    }
}
