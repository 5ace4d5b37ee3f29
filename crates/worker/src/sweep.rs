//! The backup sweep: walks every entity's rows in primary-key order (a set entity's keys in
//! their columns' order), compares them with their cached values in batches (one SQL page,
//! one Redis round trip), and feeds the verdicts to the state machine. It catches
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
use serde::{Deserialize, Serialize};
use stalewatch_core::{
    check::{Checker, Outcome},
    compare::Kind,
    keys::Keys,
    lease::Lease,
    rows::Rows,
};
use tokio_util::sync::CancellationToken;

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
    /// Of `seconds`, the time spent walking rows and walking keys.
    pub rows_seconds: f64,
    pub keys_seconds: f64,
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

    /// One pass over every entity: its rows, then its keys. With `resume`, starts from and
    /// saves the stored position.
    async fn pass(
        &self,
        lease: &Lease,
        resume: bool,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Summary> {
        let started = Instant::now();
        let metrics = &self.checker().metrics;
        let position_key = self.keys().sweep_cursor();
        let mut conn = self.conn.clone();
        let saved: Option<Position> = if resume {
            let stored: Option<String> = redis::cmd("GET")
                .arg(&position_key)
                .query_async(&mut conn)
                .await?;
            // A position this version cannot read (written by an older one) starts over.
            stored.and_then(|s| serde_json::from_str(&s).ok())
        } else {
            None
        };
        if saved.is_none() {
            metrics.sweep_position.set(0);
        }
        let mut summary = Summary::default();
        let watched = self.checker().watched.clone();
        let sources = watched.sources();
        // Entities before the saved one are done for this pass.
        let first = saved
            .as_ref()
            .and_then(|p| sources.iter().position(|s| s.entity.name == p.entity))
            .unwrap_or(0);
        let mut saved = saved.filter(|p| {
            sources
                .get(first)
                .is_some_and(|s| s.entity.name == p.entity)
        });
        for rows in &sources[first..] {
            let mut at = saved
                .take()
                .unwrap_or_else(|| Position::start(&rows.entity.name));
            let phase = Instant::now();
            let done = if at.phase == Phase::Rows {
                let done = self
                    .row_pass(rows, lease, resume, shutdown, &mut at, &mut summary)
                    .await?;
                summary.rows_seconds += phase.elapsed().as_secs_f64();
                done && {
                    at = Position::keys(&rows.entity.name);
                    self.save(resume, &at).await?;
                    true
                }
            } else {
                true
            };
            if !done {
                return Ok(self.finish(summary, started, false));
            }
            let phase = Instant::now();
            let done = self
                .orphan_pass(rows, lease, resume, shutdown, &mut at, &mut summary)
                .await?;
            summary.keys_seconds += phase.elapsed().as_secs_f64();
            if !done {
                return Ok(self.finish(summary, started, false));
            }
        }
        if resume {
            redis::cmd("DEL")
                .arg(&position_key)
                .query_async::<()>(&mut conn)
                .await?;
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
        Ok(self.finish(summary, started, true))
    }

    /// Walks the entity's rows from `at`. False when it stopped early (shutdown, lost lease).
    ///
    /// The next page (its rows, then its cached values) is read while this one is compared
    /// and recorded: the two halves wait on different servers, and one at a time left both
    /// PostgreSQL and the worker idle half the time. The position saved is always the last
    /// page recorded, never the one read ahead.
    async fn row_pass(
        &self,
        rows: &Rows,
        lease: &Lease,
        resume: bool,
        shutdown: &CancellationToken,
        at: &mut Position,
        summary: &mut Summary,
    ) -> anyhow::Result<bool> {
        let checker = self.checker();
        let limit = self.batch as i64;
        let mut reader = checker.pool.get().await?;
        let cursor = (!at.cursor.is_empty()).then_some(at.cursor.as_slice());
        let mut page = checker.read_page(&mut reader, rows, cursor, limit).await?;
        loop {
            if shutdown.is_cancelled() || !lease.renew().await? {
                return Ok(false);
            }
            let n = page.len;
            let last = page.last.take();
            let ahead = async {
                match &last {
                    Some(cursor) if n == self.batch => Some(
                        checker
                            .read_page(&mut reader, rows, Some(cursor), limit)
                            .await,
                    ),
                    _ => None,
                }
            };
            let (outcome, next) = tokio::join!(checker.check_page(rows, page), ahead);
            let outcome = outcome?;
            summary.items += n as u64;
            self.count(&rows.entity.name, summary, &outcome);
            checker.metrics.sweep_position.add(n as i64);
            let Some(next) = next else {
                return Ok(true);
            };
            at.cursor = last.unwrap_or_default();
            self.save(resume, at).await?;
            page = next?;
        }
    }

    /// The key-side pass over the entity's keys: SCANs them and checks those with no row, so
    /// a key whose row is gone is reported as an orphan. False when it stopped early. The
    /// next SCAN runs while this batch is checked, as pages do in the row pass.
    async fn orphan_pass(
        &self,
        rows: &Rows,
        lease: &Lease,
        resume: bool,
        shutdown: &CancellationToken,
        at: &mut Position,
        summary: &mut Summary,
    ) -> anyhow::Result<bool> {
        let pattern = rows.entity.key.pattern();
        let conn = self.checker().cache.connection();
        let scan = |cursor: u64| {
            let mut conn = conn.clone();
            let pattern = &pattern;
            async move {
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(self.batch)
                    .query_async::<(u64, Vec<String>)>(&mut conn)
                    .await
            }
        };
        let (mut next, mut keys) = scan(at.scan).await?;
        loop {
            if shutdown.is_cancelled() || !lease.renew().await? {
                return Ok(false);
            }
            summary.keys_scanned += keys.len() as u64;
            let ahead = async {
                match next {
                    0 => None,
                    cursor => Some(scan(cursor).await),
                }
            };
            let (outcome, following) =
                tokio::join!(self.checker().check_orphans(rows, keys), ahead);
            let outcome = outcome?;
            self.count(&rows.entity.name, summary, &outcome);
            let Some(following) = following else {
                return Ok(true);
            };
            at.scan = next;
            self.save(resume, at).await?;
            (next, keys) = following?;
        }
    }

    async fn save(&self, resume: bool, at: &Position) -> anyhow::Result<()> {
        if resume {
            redis::cmd("SET")
                .arg(self.keys().sweep_cursor())
                .arg(serde_json::to_string(at)?)
                .query_async::<()>(&mut self.conn.clone())
                .await?;
        }
        Ok(())
    }

    fn count(&self, entity: &str, summary: &mut Summary, outcome: &Outcome) {
        summary.transitions += outcome.transitions();
        for (kind, count) in &outcome.verdicts {
            *summary.verdicts.entry(kind.as_str()).or_default() += count;
            self.checker()
                .metrics
                .sweep_items
                .with_label_values(&[entity, kind.as_str()])
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

/// Where a pass is: which entity, which of its two walks, and how far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub entity: String,
    pub phase: Phase,
    /// Rows: the walk columns' values of the last row done, as text (empty: from the start).
    #[serde(default)]
    pub cursor: Vec<String>,
    /// Keys: the SCAN cursor (0: from the start).
    #[serde(default)]
    pub scan: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Rows,
    Keys,
}

impl Position {
    fn start(entity: &str) -> Position {
        Position {
            entity: entity.to_string(),
            phase: Phase::Rows,
            cursor: Vec::new(),
            scan: 0,
        }
    }

    fn keys(entity: &str) -> Position {
        Position {
            phase: Phase::Keys,
            ..Position::start(entity)
        }
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
