//! The backup sweep: walks every item in id order, compares each with its cached value in
//! batches (one SQL page, one MGET), and feeds the verdicts to the state machine. It catches
//! what the write checks cannot see: a flushed Redis, a change made straight in SQL, a check
//! job lost with its queue.
//!
//! The position is kept in Redis after every batch, so a restarted worker goes on from there,
//! and a lease makes sure only one worker sweeps at a time.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use redis::aio::ConnectionManager;
use serde::Serialize;
use stalewatch_core::{
    check::Checker, compare::Kind, db::items, incident::Source, keys::Keys, lease::Lease,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::handlers::{schedule_confirmations, Ctx};

/// Lease time; renewed after every batch, so it only has to outlast one batch.
const LEASE_TTL: Duration = Duration::from_secs(30);

pub struct Sweeper {
    pub ctx: Ctx,
    pub conn: ConnectionManager,
    pub batch: usize,
}

/// What a pass saw.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub items: u64,
    pub verdicts: BTreeMap<&'static str, u64>,
    pub transitions: u64,
    pub seconds: f64,
    pub items_per_second: f64,
    /// False when the pass stopped early (shutdown, lost lease).
    pub complete: bool,
}

impl Sweeper {
    fn keys(&self) -> &Keys {
        self.ctx.keys()
    }

    fn checker(&self) -> &Checker {
        &self.ctx.checker
    }

    /// Sweeps every `interval` until `shutdown`, whenever no other worker holds the lease.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        loop {
            match self.resume(&shutdown).await {
                Ok(Some(s)) if s.complete => {
                    tracing::debug!(items = s.items, seconds = s.seconds, "sweep pass done")
                }
                Ok(Some(_)) => {}
                Ok(None) => tracing::trace!("another worker is sweeping"),
                Err(e) => tracing::warn!(error = %e, "sweep pass failed; will retry"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// One pass from the saved position, if no other worker holds the lease (`None` then).
    pub async fn resume(&self, shutdown: &CancellationToken) -> anyhow::Result<Option<Summary>> {
        let Some(lease) =
            Lease::try_acquire(&self.conn, &self.keys().sweep_lease(), LEASE_TTL).await?
        else {
            return Ok(None);
        };
        let summary = self.pass(&lease, true, shutdown).await;
        let _ = lease.release().await;
        summary.map(Some)
    }

    /// Sweeps everything once from the start, at full speed, without touching the periodic
    /// sweep's position. Waits up to a minute for a running pass to finish.
    pub async fn once(&self) -> anyhow::Result<Summary> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(lease) =
                Lease::try_acquire(&self.conn, &self.keys().sweep_lease(), LEASE_TTL).await?
            {
                let summary = self.pass(&lease, false, &CancellationToken::new()).await;
                let _ = lease.release().await;
                return summary;
            }
            if Instant::now() > deadline {
                anyhow::bail!("another sweep held the lease for a minute; try again later");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One pass over the table. With `resume`, starts from and saves the stored position.
    async fn pass(
        &self,
        lease: &Lease,
        resume: bool,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Summary> {
        let started = Instant::now();
        let metrics = &self.checker().metrics;
        let cursor_key = self.keys().sweep_cursor();
        let mut conn = self.conn.clone();
        let mut cursor: Option<Uuid> = if resume {
            let stored: Option<String> = redis::cmd("GET")
                .arg(&cursor_key)
                .query_async(&mut conn)
                .await?;
            stored.and_then(|s| s.parse().ok())
        } else {
            None
        };
        if cursor.is_none() {
            metrics.sweep_position.set(0);
        }
        let mut summary = Summary::default();
        let mut db = self.checker().pool.get().await?;
        loop {
            if shutdown.is_cancelled() || !lease.renew().await? {
                return Ok(self.finish(summary, started, false));
            }
            let page = items::page_after(&mut db, cursor, self.batch as i64).await?;
            let last = page.last().map(|i| i.id);
            let n = page.len();
            let rows = page.into_iter().map(|i| (i.id, Some(i))).collect();
            let outcome = self.checker().check_rows(rows, Source::Sweep).await?;
            schedule_confirmations(&self.ctx, &outcome).await;
            summary.items += n as u64;
            summary.transitions += outcome
                .recorded
                .iter()
                .filter(|r| r.transition.is_some())
                .count() as u64;
            for (kind, count) in &outcome.verdicts {
                *summary.verdicts.entry(kind.as_str()).or_default() += count;
                metrics
                    .sweep_items
                    .with_label_values(&[kind.as_str()])
                    .inc_by(*count);
            }
            metrics.sweep_position.add(n as i64);
            if n < self.batch {
                // End of the table: the next pass starts from the beginning.
                if resume {
                    redis::cmd("DEL")
                        .arg(&cursor_key)
                        .query_async::<()>(&mut conn)
                        .await?;
                }
                metrics
                    .sweep_duration
                    .observe(started.elapsed().as_secs_f64());
                return Ok(self.finish(summary, started, true));
            }
            cursor = last;
            if resume {
                redis::cmd("SET")
                    .arg(&cursor_key)
                    .arg(cursor.map(|c| c.to_string()))
                    .query_async::<()>(&mut conn)
                    .await?;
            }
        }
    }

    fn finish(&self, mut s: Summary, started: Instant, complete: bool) -> Summary {
        s.seconds = started.elapsed().as_secs_f64();
        s.items_per_second = if s.seconds > 0.0 {
            s.items as f64 / s.seconds
        } else {
            0.0
        };
        s.complete = complete;
        s
    }
}

/// Mismatch verdicts of a summary, for the printed line.
pub fn mismatches(s: &Summary) -> u64 {
    s.verdicts
        .iter()
        .filter(|(k, _)| Kind::parse(k).is_some_and(|k| !k.is_match()))
        .map(|(_, n)| n)
        .sum()
}
