//! The backup sweep: walks every item in id order, compares each with its cached value in
//! batches (one SQL page, one MGET), and feeds the verdicts to the state machine. It catches
//! what the write checks cannot see: a flushed Redis, a change made straight in SQL, a check
//! job lost with its queue.
//!
//! A row pass cannot see a cached key whose row is gone (deleted in plain SQL), so each pass
//! ends with a key-side pass: SCAN the item keys in batches and check them, which reports
//! `orphan_in_cache` for keys without a row.
//!
//! Both positions (the last id, the SCAN cursor) are kept in Redis after every batch, so a
//! restarted worker goes on from there; a lease makes sure only one worker sweeps at a time,
//! and after a complete pass the deployment rests for SWEEP_INTERVAL_MS, however many workers
//! take turns.

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

use crate::handlers::Ctx;

/// Lease time; renewed after every batch, so it only has to outlast one batch.
const LEASE_TTL: Duration = Duration::from_secs(30);

/// How often an idle worker looks whether the deployment's rest is over.
const POLL: Duration = Duration::from_millis(500);

pub struct Sweeper {
    pub ctx: Ctx,
    pub conn: ConnectionManager,
    pub batch: usize,
}

/// What a pass saw.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub items: u64,
    /// Keys the key-side pass looked at.
    pub keys_scanned: u64,
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

    /// Sweeps until `shutdown`: a pass whenever the deployment is not resting and no other
    /// worker holds the lease; after a complete pass, a rest of `interval` for everyone.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        loop {
            match self.resume(interval, &shutdown).await {
                Ok(Some(s)) if s.complete => {
                    tracing::debug!(items = s.items, seconds = s.seconds, "sweep pass done")
                }
                Ok(Some(_)) => {}
                Ok(None) => tracing::trace!("resting, or another worker is sweeping"),
                Err(e) => tracing::warn!(error = %e, "sweep pass failed; will retry"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL.min(interval)) => {}
            }
        }
    }

    /// One pass from the saved position, unless the deployment is resting or another worker
    /// holds the lease (`None` then). A complete pass starts the rest of `interval`.
    pub async fn resume(
        &self,
        interval: Duration,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Summary>> {
        let mut conn = self.conn.clone();
        let resting: bool = redis::cmd("EXISTS")
            .arg(self.keys().sweep_rest())
            .query_async(&mut conn)
            .await?;
        if resting {
            return Ok(None);
        }
        let Some(lease) =
            Lease::try_acquire(&self.conn, &self.keys().sweep_lease(), LEASE_TTL).await?
        else {
            return Ok(None);
        };
        let summary = self.pass(&lease, true, shutdown).await;
        if !interval.is_zero() && matches!(&summary, Ok(s) if s.complete) {
            // Rest before the lease goes, so no other worker slips a pass in between.
            redis::pipe()
                .cmd("SET")
                .arg(self.keys().sweep_rest())
                .arg(1)
                .arg("PX")
                .arg(interval.as_millis().max(1) as u64)
                .ignore()
                .query_async::<()>(&mut conn)
                .await?;
        }
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
            let (at, page) = items::page_after(&mut db, cursor, self.batch as i64).await?;
            let last = page.last().map(|i| i.id);
            let n = page.len();
            let rows = page.into_iter().map(|i| (i.id, Some(i))).collect();
            let outcome = self
                .checker()
                .check_rows(&mut db, at, rows, Source::Sweep)
                .await?;
            summary.items += n as u64;
            self.count(&mut summary, &outcome);
            metrics.sweep_position.add(n as i64);
            if n < self.batch {
                // End of the table: the next pass starts from the beginning.
                if resume {
                    redis::cmd("DEL")
                        .arg(&cursor_key)
                        .query_async::<()>(&mut conn)
                        .await?;
                }
                drop(db);
                if !self
                    .orphan_pass(lease, resume, shutdown, &mut summary)
                    .await?
                {
                    return Ok(self.finish(summary, started, false));
                }
                metrics
                    .sweep_duration
                    .observe(started.elapsed().as_secs_f64());
                let now_ms = chrono::Utc::now().timestamp_millis();
                redis::cmd("SET")
                    .arg(self.keys().sweep_done_at())
                    .arg(now_ms)
                    .query_async::<()>(&mut conn)
                    .await?;
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

    /// The key-side pass: SCANs the item keys and checks them, so a key whose row is gone is
    /// reported as an orphan. Resumes from the saved SCAN cursor with `resume`. False when it
    /// stopped early (shutdown, lost lease).
    async fn orphan_pass(
        &self,
        lease: &Lease,
        resume: bool,
        shutdown: &CancellationToken,
        summary: &mut Summary,
    ) -> anyhow::Result<bool> {
        let cursor_key = self.keys().orphan_cursor();
        let pattern = self.keys().item_pattern();
        let mut conn = self.conn.clone();
        let mut cursor: u64 = if resume {
            let stored: Option<u64> = redis::cmd("GET")
                .arg(&cursor_key)
                .query_async(&mut conn)
                .await?;
            stored.unwrap_or(0)
        } else {
            0
        };
        loop {
            if shutdown.is_cancelled() || !lease.renew().await? {
                return Ok(false);
            }
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(self.batch)
                .query_async(&mut conn)
                .await?;
            let ids: Vec<Uuid> = keys
                .iter()
                .filter_map(|k| self.keys().parse_item(k))
                .collect();
            summary.keys_scanned += keys.len() as u64;
            // Keys with a row were compared by the row pass; only the others need a check.
            let existing = {
                let mut db = self.checker().pool.get().await?;
                items::existing(&mut db, &ids).await?
            };
            let orphans: Vec<Uuid> = ids
                .into_iter()
                .filter(|id| !existing.contains(id))
                .collect();
            if !orphans.is_empty() {
                let outcome = self
                    .checker()
                    .check_ids(&orphans, Source::Sweep, None)
                    .await?;
                self.count(summary, &outcome);
            }
            if next == 0 {
                if resume {
                    redis::cmd("DEL")
                        .arg(&cursor_key)
                        .query_async::<()>(&mut conn)
                        .await?;
                }
                return Ok(true);
            }
            cursor = next;
            if resume {
                redis::cmd("SET")
                    .arg(&cursor_key)
                    .arg(cursor)
                    .query_async::<()>(&mut conn)
                    .await?;
            }
        }
    }

    fn count(&self, summary: &mut Summary, outcome: &stalewatch_core::check::Outcome) {
        summary.transitions += outcome.transitions();
        for (kind, count) in &outcome.verdicts {
            *summary.verdicts.entry(kind.as_str()).or_default() += count;
            self.checker()
                .metrics
                .sweep_items
                .with_label_values(&[kind.as_str()])
                .inc_by(*count);
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
