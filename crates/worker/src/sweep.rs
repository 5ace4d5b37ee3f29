//! The backup sweep: walks every entity's rows in primary-key order (a set entity's keys in
//! their columns' order), compares them with their cached values in batches (one SQL page,
//! one Redis round trip), and feeds the verdicts to the state machine. It catches
//! what the write checks cannot see: a flushed Redis, a change made straight in SQL, a check
//! job lost with its queue.
//!
//! A row pass cannot see a cached key whose row is gone (deleted in plain SQL), so each
//! entity also gets a key-side pass: SCAN its keys in batches and check them, which reports
//! `orphan_in_cache` for keys without a row.
//!
//! The periodic sweep goes in rounds (`stalewatch_core::shards`): the first worker to find no
//! round in progress plans one, splitting each entity's rows into SWEEP_SHARDS primary-key
//! ranges plus its key-side pass, and every worker then leases SWEEP_CONCURRENCY shards at a
//! time, so N workers sweep N times as many shards at once. Each page's count and the cursor
//! after it are recorded together under the shard's lease (`crate::round`), so a shard whose
//! worker died is taken over where it stopped once its lease expires, and every row is
//! counted once per round.
//! After a complete round the deployment rests for SWEEP_INTERVAL_MS, however many workers
//! take part.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use futures::StreamExt;
use redis::aio::ConnectionManager;
use serde::Serialize;
use stalewatch_core::{
    check::{Checker, Outcome},
    compare::Kind,
    keys::Keys,
    lease::Lease,
    rows::Rows,
    shards::{self, Checkpoint, Part, Round, RoundError, Shard},
    slots::ScanAt,
};
use tokio_util::sync::CancellationToken;

use crate::{
    handlers::Ctx,
    round::{self, Recorded, ShardLease},
};

/// The planning lease (and `sweep --once`'s): renewed after every batch by `once`, so it only
/// has to outlast one batch, or the planning of a round.
const LEASE_TTL: Duration = Duration::from_secs(30);

/// How often an idle worker looks whether the deployment's rest is over, or a shard is free.
const POLL: Duration = Duration::from_millis(500);

pub struct Sweeper {
    pub ctx: Ctx,
    /// stalewatch's own Redis: the rounds, the shards' leases, the rest between passes.
    pub conn: ConnectionManager,
    pub batch: usize,
    /// Row ranges per entity in a round.
    pub shards: usize,
    /// Shards this worker sweeps at once, and the row ranges of `once`.
    pub concurrency: usize,
    /// A shard's lease: how long a dead worker's shard waits before another takes it.
    pub lease_ttl: Duration,
    /// This worker, as recorded with every page it records (process id and a random part).
    pub name: String,
}

/// What one worker saw: a whole pass (`once`), or its part of a round.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    /// Rows compared.
    pub items: u64,
    /// Keys the key-side pass looked at.
    pub keys_scanned: u64,
    pub verdicts: BTreeMap<&'static str, u64>,
    pub transitions: u64,
    pub seconds: f64,
    /// The time spent walking rows and walking keys, summed over the walks: they run at once
    /// (row ranges beside the key-side pass), so either may exceed `seconds`.
    pub rows_seconds: f64,
    pub keys_seconds: f64,
    pub items_per_second: f64,
    /// The round swept in (periodic sweep), and how many of its shards this worker finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round: Option<u64>,
    pub shards: u64,
    /// `once`: the pass went through; a round: this worker completed the round.
    pub complete: bool,
}

impl Summary {
    /// Adds what another walk of the same pass saw.
    fn add(&mut self, other: Summary) {
        self.items += other.items;
        self.keys_scanned += other.keys_scanned;
        for (kind, n) in other.verdicts {
            *self.verdicts.entry(kind).or_default() += n;
        }
        self.transitions += other.transitions;
        self.rows_seconds += other.rows_seconds;
        self.keys_seconds += other.keys_seconds;
    }
}

/// How a walk records each page: under `once`'s lease (no position kept), or as a round's
/// shard.
enum Mode<'a> {
    Once(&'a Lease),
    Shard {
        lease: &'a ShardLease,
        rest: Duration,
    },
}

impl Sweeper {
    fn keys(&self) -> &Keys {
        self.ctx.keys()
    }

    fn checker(&self) -> &Checker {
        &self.ctx.checker
    }

    /// Sweeps until `shutdown`: shards of the round in progress whenever there are free ones
    /// (a round is started when none is in progress and the deployment is not resting).
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        loop {
            match self.resume(interval, &shutdown).await {
                // "sweep pass done" with `seconds`: what scripts/bench soak reads.
                Ok(Some(s)) if s.complete => {
                    tracing::debug!(items = s.items, seconds = s.seconds, round = ?s.round, "sweep pass done")
                }
                Ok(Some(s)) => tracing::debug!(items = s.items, shards = s.shards, "swept shards"),
                Ok(None) => tracing::trace!("resting, or every shard is taken"),
                Err(e) => tracing::warn!(error = %e, "sweep pass failed; will retry"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL.min(interval)) => {}
            }
        }
    }

    /// Sweeps free shards of the round in progress, `concurrency` at a time, starting a round if
    /// none is in progress, until no shard is left free. `None` when the deployment is
    /// resting, another worker is planning, or every open shard is held by another worker.
    /// The page that completes a round starts the rest of `interval`.
    pub async fn resume(
        &self,
        interval: Duration,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Summary>> {
        let mut conn = self.conn.clone();
        let keys = self.keys();
        let resting: bool = redis::cmd("EXISTS")
            .arg(keys.sweep_rest())
            .query_async(&mut conn)
            .await?;
        if resting {
            return Ok(None);
        }
        let current = match round::current(&mut conn, keys).await {
            Err(e) if e.downcast_ref::<RoundError>().is_some() => {
                // Written by another version, or damaged: a record no worker can read would
                // stop the sweep for good, so it is dropped and a new round starts.
                tracing::warn!(error = %e, "unreadable sweep round record; starting a new round");
                redis::cmd("DEL")
                    .arg(keys.sweep_round())
                    .query_async::<()>(&mut conn)
                    .await?;
                None
            }
            other => other?,
        };
        let round = match current {
            Some(round) => round,
            None => match self.start_round().await? {
                Some(round) => round,
                None => return Ok(None),
            },
        };
        let started = Instant::now();
        let mut summary = Summary {
            round: Some(round.id),
            ..Summary::default()
        };
        let offset = self.name.bytes().map(usize::from).sum();
        // Set by a shard that ends the worker's part of the round (lost, or the round is
        // over): the shards not started yet are skipped, the ones under way finish.
        let stop = AtomicBool::new(false);
        let mut steps = futures::stream::iter(round.open(offset))
            .map(|i| self.take_and_sweep(&round, i, interval, shutdown, &stop))
            .buffer_unordered(self.concurrency);
        let (mut took, mut complete, mut failed) = (false, false, None);
        while let Some(step) = steps.next().await {
            match step {
                Ok(None) => {}
                Ok(Some((recorded, part))) => {
                    took = true;
                    summary.add(part);
                    match recorded {
                        Recorded::Going | Recorded::Lost => stop.store(true, Ordering::Relaxed),
                        Recorded::ShardDone => summary.shards += 1,
                        Recorded::RoundDone => {
                            summary.shards += 1;
                            complete = true;
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                }
                // The others under way still finish and release their leases.
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if complete {
            self.round_done(&round);
        }
        Ok(took.then(|| self.finish(summary, started, complete)))
    }

    /// Takes shard `i` of `round` and sweeps it to its end, unless `stop` is set, another
    /// worker holds it, or it is done (`None`). Releases the lease when the walk stops early.
    async fn take_and_sweep(
        &self,
        round: &Round,
        i: usize,
        interval: Duration,
        shutdown: &CancellationToken,
        stop: &AtomicBool,
    ) -> anyhow::Result<Option<(Recorded, Summary)>> {
        if stop.load(Ordering::Relaxed) || shutdown.is_cancelled() {
            return Ok(None);
        }
        let mut conn = self.conn.clone();
        let keys = self.keys();
        let Some(lease) = round::take(&mut conn, keys, round.id, i, self.lease_ttl).await? else {
            return Ok(None);
        };
        // Read again under the lease: the shard may have been finished since the list was
        // read, and a checkpoint recorded since is where to go on from.
        let now = round::current(&mut conn, keys).await?;
        let Some(now) = now.filter(|r| r.id == round.id) else {
            // Completed by another worker meanwhile.
            round::release(&mut conn, lease).await?;
            stop.store(true, Ordering::Relaxed);
            return Ok(None);
        };
        if now.progress[i].done {
            round::release(&mut conn, lease).await?;
            return Ok(None);
        }
        let mode = Mode::Shard {
            lease: &lease,
            rest: interval,
        };
        let mut summary = Summary::default();
        let recorded = self.shard(&now, i, &mode, shutdown, &mut summary).await?;
        if matches!(recorded, Recorded::Going | Recorded::Lost) {
            round::release(&mut conn, lease).await?;
        }
        Ok(Some((recorded, summary)))
    }

    /// Plans and writes a round, unless another worker is planning one (`None`) or has
    /// started one meanwhile (that one, then).
    async fn start_round(&self) -> anyhow::Result<Option<Round>> {
        let Some(lease) =
            Lease::try_acquire(&self.conn, &self.keys().sweep_lease(), LEASE_TTL).await?
        else {
            return Ok(None);
        };
        let started = async {
            let mut conn = self.conn.clone();
            // The round may have been completed, and the rest begun, since this worker looked.
            let resting: bool = redis::cmd("EXISTS")
                .arg(self.keys().sweep_rest())
                .query_async(&mut conn)
                .await?;
            if resting {
                return Ok(None);
            }
            let plan = self.plan().await?;
            let now_ms = chrono::Utc::now().timestamp_millis();
            let round = round::start(&mut conn, self.keys(), &plan, now_ms).await?;
            if let Some(r) = &round {
                tracing::info!(round = r.id, shards = r.shards.len(), "sweep round started");
            }
            anyhow::Ok(round)
        }
        .await;
        let _ = lease.release().await;
        started
    }

    /// Every entity's shards: its rows split at the quantiles of a sample, then its keys.
    async fn plan(&self) -> anyhow::Result<Vec<Shard>> {
        let mut plan = Vec::new();
        for rows in self.checker().watched.sources() {
            let bounds = self.bounds(rows, self.shards).await?;
            plan.extend(shards::entity_shards(&rows.entity.name, bounds));
        }
        Ok(plan)
    }

    /// Where to split `rows` into `ranges` ranges of about equal size (none for one range).
    async fn bounds(&self, rows: &Rows, ranges: usize) -> anyhow::Result<Vec<Vec<String>>> {
        if ranges <= 1 {
            return Ok(Vec::new());
        }
        let mut conn = self.checker().pool.get().await?;
        let sample = rows.sample(&mut conn, shards::sample_size(ranges)).await?;
        Ok(shards::boundaries(&sample, ranges))
    }

    fn round_done(&self, round: &Round) {
        let metrics = &self.checker().metrics;
        metrics.sweep_rounds.inc();
        let seconds = (chrono::Utc::now().timestamp_millis() - round.started_ms).max(0) as f64;
        metrics.sweep_duration.observe(seconds / 1000.0);
        tracing::info!(round = round.id, "sweep round completed");
    }

    /// Sweeps everything once from the start, at full speed, outside the rounds (no shard is
    /// taken, no position kept). Holds the planning lease meanwhile, so no round starts
    /// during it; waits up to a minute for one being planned.
    pub async fn once(&self) -> anyhow::Result<Summary> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(lease) =
                Lease::try_acquire(&self.conn, &self.keys().sweep_lease(), LEASE_TTL).await?
            {
                let summary = self.pass(&lease).await;
                let _ = lease.release().await;
                return summary;
            }
            if Instant::now() > deadline {
                anyhow::bail!("another sweep held the lease for a minute; try again later");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One pass over every entity: its rows in SWEEP_CONCURRENCY ranges and its keys, all at
    /// once, as a round's shards would be but without leases or positions. The walks wait on
    /// different statements, and one walk at a time left the machine a third idle.
    async fn pass(&self, lease: &Lease) -> anyhow::Result<Summary> {
        let started = Instant::now();
        let mut summary = Summary::default();
        let watched = self.checker().watched.clone();
        let mode = Mode::Once(lease);
        let none = CancellationToken::new();
        for rows in watched.sources() {
            let bounds = self.bounds(rows, self.concurrency).await?;
            let parts = shards::entity_shards(&rows.entity.name, bounds);
            let (mode, none) = (&mode, &none);
            let walks = parts.iter().map(|shard| async move {
                let mut part = Summary::default();
                let start = Checkpoint::default();
                let done = self
                    .walk(rows, &shard.part, &start, mode, none, &mut part)
                    .await;
                (done, part)
            });
            let mut complete = true;
            for (done, part) in futures::future::join_all(walks).await {
                summary.add(part);
                complete &= done? == Recorded::ShardDone;
            }
            if !complete {
                return Ok(self.finish(summary, started, false));
            }
        }
        self.checker()
            .metrics
            .sweep_duration
            .observe(started.elapsed().as_secs_f64());
        redis::cmd("SET")
            .arg(self.keys().sweep_done_at())
            .arg(chrono::Utc::now().timestamp_millis())
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(self.finish(summary, started, true))
    }

    /// Sweeps shard `i` of `round` from its checkpoint to its end, or until stopped.
    async fn shard(
        &self,
        round: &Round,
        i: usize,
        mode: &Mode<'_>,
        shutdown: &CancellationToken,
        summary: &mut Summary,
    ) -> anyhow::Result<Recorded> {
        let shard = &round.shards[i];
        let Some(rows) = self.checker().watched.source(&shard.entity) else {
            // An entity no longer watched (the round was planned before a reconfiguration):
            // nothing to sweep, but the round must still end.
            return self.record(mode, &Checkpoint::default(), 0, true).await;
        };
        let at = &round.progress[i].at;
        self.walk(rows, &shard.part, at, mode, shutdown, summary)
            .await
    }

    /// Walks `part` of `rows` from checkpoint `at` (the default: from its start) to its end,
    /// timing the walk in `summary`.
    async fn walk(
        &self,
        rows: &Rows,
        part: &Part,
        at: &Checkpoint,
        mode: &Mode<'_>,
        shutdown: &CancellationToken,
        summary: &mut Summary,
    ) -> anyhow::Result<Recorded> {
        let phase = Instant::now();
        match part {
            Part::Rows { until, .. } => {
                let from = part.rows_from(at);
                let done = self
                    .row_walk(rows, from, until.as_deref(), mode, shutdown, summary)
                    .await;
                summary.rows_seconds += phase.elapsed().as_secs_f64();
                done
            }
            Part::Keys => {
                let done = self
                    .key_walk(rows, at.scan_at(), mode, shutdown, summary)
                    .await;
                summary.keys_seconds += phase.elapsed().as_secs_f64();
                done
            }
        }
    }

    /// Records a page as `mode` says: `once` only renews its lease; a shard's page is
    /// written with its count and checkpoint (see `crate::round`).
    async fn record(
        &self,
        mode: &Mode<'_>,
        at: &Checkpoint,
        count: u64,
        finished: bool,
    ) -> anyhow::Result<Recorded> {
        match mode {
            Mode::Once(lease) => Ok(if !lease.renew().await? {
                Recorded::Lost
            } else if finished {
                Recorded::ShardDone
            } else {
                Recorded::Going
            }),
            Mode::Shard { lease, rest } => {
                let page = round::Page {
                    at,
                    count,
                    by: &self.name,
                    finished,
                    rest: *rest,
                };
                Ok(round::record(&mut self.conn.clone(), self.keys(), lease, page).await?)
            }
        }
    }

    /// Walks the entity's rows after `from` and up to `until` (none: from the first row, to
    /// the last), recording each page. Ends with the last page's [`Recorded`], or `Lost`
    /// when it stopped early (shutdown, lost lease).
    ///
    /// The next page (its rows, then its cached values) is read while this one is compared
    /// and recorded: the two halves wait on different servers, and one at a time left both
    /// PostgreSQL and the worker idle half the time. The position recorded is always the
    /// last page compared, never the one read ahead.
    async fn row_walk(
        &self,
        rows: &Rows,
        from: Option<Vec<String>>,
        until: Option<&[String]>,
        mode: &Mode<'_>,
        shutdown: &CancellationToken,
        summary: &mut Summary,
    ) -> anyhow::Result<Recorded> {
        let checker = self.checker();
        let limit = self.batch as i64;
        let mut reader = checker.pool.get().await?;
        let mut at = Checkpoint {
            cursor: from.unwrap_or_default(),
            ..Checkpoint::default()
        };
        let cursor = (!at.cursor.is_empty()).then_some(at.cursor.as_slice());
        let mut page = checker
            .read_page(&mut reader, rows, cursor, until, limit)
            .await?;
        loop {
            if shutdown.is_cancelled() {
                return Ok(Recorded::Lost);
            }
            let n = page.len;
            let last = page.last.take();
            let ahead = async {
                match &last {
                    Some(cursor) if n == self.batch => Some(
                        checker
                            .read_page(&mut reader, rows, Some(cursor), until, limit)
                            .await,
                    ),
                    _ => None,
                }
            };
            let (outcome, next) = tokio::join!(checker.check_page(rows, page), ahead);
            let outcome = outcome?;
            summary.items += n as u64;
            self.count(&rows.entity.name, summary, &outcome);
            if let Some(last) = last {
                at.cursor = last;
            }
            let recorded = self.record(mode, &at, n as u64, next.is_none()).await?;
            match (recorded, next) {
                (Recorded::Going, Some(next)) => page = next?,
                (recorded, _) => return Ok(recorded),
            }
        }
    }

    /// The key-side pass over the entity's keys from SCAN position `from` (on a cluster, a
    /// primary and a cursor there: every primary is scanned in turn): SCANs them and checks
    /// those with no row, so a key whose row is gone is reported as an orphan. The next SCAN
    /// runs while this batch is checked, as pages do in the row walk.
    async fn key_walk(
        &self,
        rows: &Rows,
        from: ScanAt,
        mode: &Mode<'_>,
        shutdown: &CancellationToken,
        summary: &mut Summary,
    ) -> anyhow::Result<Recorded> {
        let pattern = rows.entity.key.pattern();
        let cache = &self.checker().cache;
        let scan = |at: ScanAt| {
            let pattern = &pattern;
            async move { cache.scan(&at, pattern, self.batch).await }
        };
        let (mut keys, mut next) = scan(from).await?;
        loop {
            if shutdown.is_cancelled() {
                return Ok(Recorded::Lost);
            }
            let n = keys.len() as u64;
            summary.keys_scanned += n;
            let ahead = async {
                match &next {
                    None => None,
                    Some(at) => Some(scan(at.clone()).await),
                }
            };
            let (outcome, following) =
                tokio::join!(self.checker().check_orphans(rows, keys), ahead);
            let outcome = outcome?;
            self.count(&rows.entity.name, summary, &outcome);
            let at = next.as_ref().map(Checkpoint::scanning).unwrap_or_default();
            let recorded = self.record(mode, &at, n, following.is_none()).await?;
            match (recorded, following) {
                (Recorded::Going, Some(following)) => (keys, next) = following?,
                (recorded, _) => return Ok(recorded),
            }
        }
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

/// Mismatch verdicts of a summary, for the printed line.
pub fn mismatches(s: &Summary) -> u64 {
    s.verdicts
        .iter()
        .filter(|(k, _)| Kind::parse(k).is_some_and(|k| !k.is_match()))
        .map(|(_, n)| n)
        .sum()
}
