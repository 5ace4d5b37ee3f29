//! The job handlers: thin, all logic lives in stalewatch-core.

use std::collections::HashMap;

use apalis::prelude::{BoxDynError, Data};
use chrono::Utc;
use stalewatch_core::{
    check::{Checker, Outcome},
    jobs::{CheckJob, ConfirmJob, ConfirmTarget, Job},
    keys::Keys,
    metrics::Metrics,
    queue,
    track::Recorded,
};

/// What every handler shares.
#[derive(Clone)]
pub struct Ctx {
    pub checker: Checker,
    pub queue_conn: redis::aio::ConnectionManager,
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
    let outcome = match ctx.checker.check_ids(&job.ids, job.source, None).await {
        Ok(o) => o,
        Err(e) => {
            ctx.count::<CheckJob>("error");
            // apalis retries it later; a DB or Redis outage is the usual cause.
            return Err(e.into());
        }
    };
    schedule_confirmations(&ctx, &outcome).await;
    ctx.count::<CheckJob>("ok");
    Ok(())
}

/// One confirmation job for every incident this batch opened, due when the last of them is.
pub async fn schedule_confirmations(ctx: &Ctx, outcome: &Outcome) {
    let targets: Vec<(ConfirmTarget, chrono::DateTime<Utc>)> = outcome
        .recorded
        .iter()
        .filter_map(|r: &Recorded| {
            let at = r.confirm_at?;
            let incident = r.incident.as_ref()?;
            let item_id = ctx.keys().parse_item(&r.cache_key)?;
            Some((
                ConfirmTarget {
                    incident_id: incident.id,
                    item_id,
                },
                at,
            ))
        })
        .collect();
    let Some(due_at) = targets.iter().map(|(_, at)| *at).max() else {
        return;
    };
    let job = ConfirmJob {
        targets: targets.into_iter().map(|(t, _)| t).collect(),
        due_at,
    };
    let mut conn = ctx.queue_conn.clone();
    if let Err(e) = queue::push(&mut conn, ctx.keys(), vec![(job, Some(due_at))]).await {
        // The incidents are stored as Detected; the sweep's next mismatch after the grace
        // period confirms them anyway (any late enough mismatch does).
        ctx.count::<ConfirmJob>("push_error");
        tracing::warn!(error = %e, "could not schedule confirmations; the sweep will confirm");
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
        .map(|t| (ctx.keys().item(&t.item_id), t.incident_id))
        .collect();
    let ids: Vec<_> = job.targets.iter().map(|t| t.item_id).collect();
    match ctx.checker.confirm(&ids, &expected).await {
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
