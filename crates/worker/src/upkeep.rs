//! Upkeep apalis-redis 1.0 leaves to us, retention of old incidents, and the gauges read from
//! the shared stores (so every worker reports the same numbers, right after any restart).

use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use stalewatch_core::{
    config::Config,
    db::{incidents, PgPool},
    jobs::{CheckJob, ConfirmJob, Job, SloJob},
    keys::Keys,
    metrics::Metrics,
    queue, track,
};
use tokio_util::sync::CancellationToken;

use crate::round;

const TICK: Duration = Duration::from_millis(250);
/// Finished jobs deleted per queue per tick: far more than a worker finishes in a tick.
const DONE_PER_TICK: usize = 5000;
/// Dead jobs removed per queue per round.
const DEAD_PER_ROUND: usize = 1000;
/// Closed incidents deleted per statement; a round repeats up to `DELETE_ROUNDS` times.
const DELETE_BATCH: i64 = 5000;
const DELETE_ROUNDS: usize = 20;
/// A worker registration without a heartbeat for this long belongs to a worker that died
/// without removing it (a live one beats every 2 s).
const WORKER_GONE_AFTER: Duration = Duration::from_secs(3600);

pub struct Upkeep {
    pub conn: ConnectionManager,
    pub keys: Keys,
    pub pool: PgPool,
    pub metrics: Metrics,
    pub incident_retention: Duration,
    pub dead_job_retention: Duration,
    /// The watched entities, for the open-incident gauge.
    pub entities: Vec<String>,
}

impl Upkeep {
    pub fn new(
        config: &Config,
        conn: ConnectionManager,
        keys: Keys,
        pool: PgPool,
        metrics: Metrics,
        entities: Vec<String>,
    ) -> Self {
        Self {
            conn,
            keys,
            pool,
            metrics,
            incident_retention: config.incident_retention,
            dead_job_retention: config.dead_job_retention,
            entities,
        }
    }

    /// Every tick: promote due jobs in bounded chunks, delete finished ones. Every second:
    /// gauges. Every ten seconds: dead jobs and incidents past their retention.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let started = Instant::now();
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            n += 1;
            for result in [
                self.tend::<CheckJob>().await,
                self.tend::<ConfirmJob>().await,
                self.tend::<SloJob>().await,
            ] {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "queue upkeep failed; retrying next tick");
                }
            }
            if n.is_multiple_of(4) {
                let entities: Vec<&str> = self.entities.iter().map(String::as_str).collect();
                if let Err(e) =
                    track::refresh_open_gauge(&self.pool, &self.metrics, &entities).await
                {
                    tracing::debug!(error = %e, "open-incident gauge not refreshed");
                }
                if let Err(e) = self.sweep_age(started).await {
                    tracing::debug!(error = %e, "sweep-age gauge not refreshed");
                }
                if let Err(e) = self.sweep_round().await {
                    tracing::debug!(error = %e, "sweep-round gauges not refreshed");
                }
            }
            if n % 40 == 1 {
                for result in [
                    self.dead::<CheckJob>().await,
                    self.dead::<ConfirmJob>().await,
                    self.dead::<SloJob>().await,
                ] {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "dead-job upkeep failed");
                    }
                }
                for queue in [CheckJob::QUEUE, ConfirmJob::QUEUE, SloJob::QUEUE] {
                    let ns = self.keys.queue(queue);
                    match queue::forget_idle_workers(&mut self.conn, &ns, WORKER_GONE_AFTER).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(queue, workers = n, "forgot workers gone for an hour")
                        }
                        Err(e) => tracing::debug!(error = %e, "worker registrations not tended"),
                    }
                }
                if let Err(e) = self.retention().await {
                    tracing::warn!(error = %e, "deleting old incidents failed; retrying later");
                }
            }
        }
    }

    async fn tend<J: Job>(&mut self) -> Result<(), queue::QueueError> {
        let config = queue::config::<J>(&self.keys, 1);
        queue::promote_due(&mut self.conn, &config).await?;
        queue::delete_done(&mut self.conn, &config, DONE_PER_TICK).await?;
        queue::report_depth::<J>(&mut self.conn, &self.keys, &self.metrics).await?;
        Ok(())
    }

    async fn dead<J: Job>(&mut self) -> Result<(), queue::QueueError> {
        let config = queue::config::<J>(&self.keys, 1);
        let seen = self.keys.dead_seen(J::QUEUE);
        let dead = queue::tend_dead(
            &mut self.conn,
            &config,
            &seen,
            self.dead_job_retention,
            DEAD_PER_ROUND,
        )
        .await?;
        self.metrics
            .dead_jobs
            .with_label_values(&[J::QUEUE])
            .set(dead.remaining as i64);
        if dead.removed > 0 {
            tracing::info!(
                queue = J::QUEUE,
                removed = dead.removed,
                "removed dead jobs past their retention"
            );
        }
        Ok(())
    }

    /// Deletes closed incidents past INCIDENT_RETENTION, in bounded batches. Safe with any
    /// number of workers: each DELETE takes what is left.
    async fn retention(&self) -> anyhow::Result<()> {
        let mut conn = self.pool.get().await?;
        for _ in 0..DELETE_ROUNDS {
            let n =
                incidents::delete_closed_before(&mut conn, self.incident_retention, DELETE_BATCH)
                    .await?;
            self.metrics.incidents_deleted.inc_by(n as u64);
            if (n as i64) < DELETE_BATCH {
                break;
            }
        }
        Ok(())
    }

    /// Seconds since the deployment's last complete sweep pass; from this worker's start
    /// while no pass has completed.
    async fn sweep_age(&mut self, started: Instant) -> Result<(), redis::RedisError> {
        let done_at: Option<i64> = redis::cmd("GET")
            .arg(self.keys.sweep_done_at())
            .query_async(&mut self.conn)
            .await?;
        let age = match done_at {
            Some(ms) => (chrono::Utc::now().timestamp_millis() - ms).max(0) / 1000,
            None => started.elapsed().as_secs() as i64,
        };
        self.metrics.sweep_age.set(age);
        Ok(())
    }

    /// The deployment's sweep round in progress (start, shards done of total, rows so far)
    /// and the last completed round's rows.
    async fn sweep_round(&mut self) -> anyhow::Result<()> {
        let m = &self.metrics;
        let current = round::current(&mut self.conn, &self.keys).await?;
        let (started, total, done, rows) = match &current {
            Some(r) => (r.started_ms / 1000, r.shards.len(), r.done(), r.rows()),
            None => (0, 0, 0, 0),
        };
        m.sweep_round_started.set(started);
        m.sweep_round_shards
            .with_label_values(&["total"])
            .set(total as i64);
        m.sweep_round_shards
            .with_label_values(&["done"])
            .set(done as i64);
        m.sweep_position.set(rows as i64);
        if let Some(last) = round::last(&mut self.conn, &self.keys).await? {
            m.sweep_last_round_items.set(last.rows() as i64);
        }
        Ok(())
    }
}
