//! One check of a batch of one entity's cache keys: one SQL query for the rows behind them
//! (with PostgreSQL's clock), one Redis round trip for the cached values, the comparator on
//! each pair, the verdicts recorded through the state machine, and a confirmation scheduled
//! for every incident that opened.
//!
//! Also the one place that writes the cache from PostgreSQL for stalewatch's own sake: a
//! refresh asked for through the API, and repairs under `REPAIR_POLICY=confirmed`
//! (`repair.rs` does the writing).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use chrono::{DateTime, Utc};
use diesel_async::AsyncPgConnection;
use redis::aio::ConnectionManager;

use crate::cache::{Cache, CacheError, Cached};
use crate::compare::Kind;
use crate::config::{Config, RepairPolicy};
use crate::db::incidents::{self, Evidence, IncidentRow};
use crate::db::{self, DbError, PgPool};
use crate::incident::{Cause, Source, State};
use crate::jobs::{ConfirmJob, ConfirmTarget, Job};
use crate::keys::ITEM_ENTITY;
use crate::metrics::Metrics;
use crate::queue;
use crate::repair;
use crate::rows::{Found, Rows};
use crate::track::{self, Recorded};
use crate::watch::{self, Watched};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("no entity {0:?} in the ENTITIES file")]
    UnknownEntity(String),
    #[error("{key:?} is not a key of entity {entity:?} (it does not match its key template)")]
    ForeignKey { entity: String, key: String },
}

impl From<crate::db::PoolError> for CheckError {
    fn from(e: crate::db::PoolError) -> Self {
        CheckError::Db(e.into())
    }
}

/// What a check needs; cheap to clone.
#[derive(Clone)]
pub struct Checker {
    pub pool: PgPool,
    pub cache: Cache,
    pub metrics: Metrics,
    pub watched: Arc<Watched>,
    pub grace: Duration,
    pub repair: RepairPolicy,
    /// Where confirmation jobs are pushed: stalewatch's own Redis, which also holds the
    /// watermarks (`crate::watermark`).
    pub queue: ConnectionManager,
    /// `WATERMARK_MAX_LAG`: how far a watermark may trail its table before the cache is behind.
    pub watermark_max_lag: u64,
}

/// Summary of one batch, for callers that count.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub recorded: Vec<Recorded>,
    pub verdicts: HashMap<Kind, u64>,
}

impl Outcome {
    /// Adds `other`'s observations and verdicts to these.
    pub fn merge(&mut self, other: Outcome) {
        self.recorded.extend(other.recorded);
        for (kind, n) in other.verdicts {
            *self.verdicts.entry(kind).or_insert(0) += n;
        }
    }

    pub fn transitions(&self) -> u64 {
        self.recorded
            .iter()
            .filter(|r| r.transition.is_some())
            .count() as u64
    }
}

/// A sweep page as read: its rows with PostgreSQL's clock read in the same round trip, then
/// the cached values of their keys.
pub struct Page {
    at: DateTime<Utc>,
    keys: Vec<String>,
    found: Vec<Found>,
    cached: Vec<Cached>,
    /// The open incidents of `keys`, read with the cached values.
    open: HashMap<String, IncidentRow>,
    /// Rows read, with or without a key: fewer than asked for means the walk is over.
    pub len: usize,
    /// The walk columns' values of the last row read, where the next page starts.
    pub last: Option<Vec<String>>,
}

/// Whether a check may repair what it confirms (a repair's own check may not, so a key the
/// repair could not fix is not rewritten in a loop).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Repairs {
    Allowed,
    No,
}

impl Checker {
    pub fn new(
        config: &Config,
        pool: PgPool,
        cache: Cache,
        metrics: Metrics,
        queue: ConnectionManager,
        watched: Arc<Watched>,
    ) -> Self {
        Self {
            pool,
            cache,
            metrics,
            watched,
            grace: config.grace_period,
            repair: config.repair_policy,
            queue,
            watermark_max_lag: config.watermark_max_lag,
        }
    }

    fn rows(&self, entity: &str) -> Result<&Rows, CheckError> {
        self.watched
            .source(entity)
            .ok_or_else(|| CheckError::UnknownEntity(entity.to_string()))
    }

    /// Checks `keys` of `entity`, reading their rows.
    pub async fn check_keys(
        &self,
        entity: &str,
        keys: &[String],
        source: Source,
        cause: Option<Cause>,
    ) -> Result<Outcome, CheckError> {
        self.check_keys_with(entity, keys, source, cause, None, Repairs::Allowed)
            .await
    }

    /// Checks items of the built-in entity, the demo API's table, by id.
    pub async fn check_items(
        &self,
        ids: &[uuid::Uuid],
        source: Source,
        cause: Option<Cause>,
    ) -> Result<Outcome, CheckError> {
        let keys: Vec<String> = ids.iter().map(|id| self.cache.keys().item(id)).collect();
        self.check_keys(ITEM_ENTITY, &keys, source, cause).await
    }

    /// Confirms incidents: `expected` maps each key to the Detected incident the confirmation
    /// was scheduled for (see `track::Context::confirming`). The entity's watermark key stands
    /// for a `cache_behind` incident of the whole entity: it is confirmed by checking the
    /// watermark again.
    pub async fn confirm(
        &self,
        entity: &str,
        keys: &[String],
        expected: &HashMap<String, i64>,
    ) -> Result<Outcome, CheckError> {
        let watermark = self.cache.keys().watermark(entity);
        let (entity_level, keys): (Vec<&String>, Vec<&String>) =
            keys.iter().partition(|k| **k == watermark);
        let keys: Vec<String> = keys.into_iter().cloned().collect();
        let mut outcome = self
            .check_keys_with(
                entity,
                &keys,
                Source::Confirm,
                None,
                Some(expected),
                Repairs::Allowed,
            )
            .await?;
        if !entity_level.is_empty() {
            let behind =
                crate::watermark::observe(self, entity, Source::Confirm, None, Some(expected))
                    .await?;
            outcome.merge(behind);
        }
        Ok(outcome)
    }

    async fn check_keys_with(
        &self,
        entity: &str,
        keys: &[String],
        source: Source,
        cause: Option<Cause>,
        confirming: Option<&HashMap<String, i64>>,
        repairs: Repairs,
    ) -> Result<Outcome, CheckError> {
        let rows = self.rows(entity)?;
        // A key listed twice is observed once: the second copy would count twice. A key that
        // is not this entity's is not checked at all.
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        keys.dedup();
        let (keys, values): (Vec<String>, Vec<Vec<String>>) = keys
            .into_iter()
            .filter_map(|k| rows.key_values(&k).map(|v| (k, v)))
            .unzip();
        if keys.is_empty() {
            return Ok(Outcome::default());
        }
        let mut conn = self.pool.get().await?;
        let outcome = if source == Source::Cdc && self.watched.invalidated_and_aside(rows) {
            self.check_absent_first(&mut conn, rows, keys, values, cause)
                .await?
        } else {
            let (at, found) = rows.by_keys(&mut conn, &values).await?;
            let pairs = keys.into_iter().zip(found).collect();
            self.check(&mut conn, rows, at, pairs, source, cause, confirming)
                .await?
        };
        // A repair takes connections of its own: give this one back first, so a job never
        // holds more than one.
        drop(conn);
        if repairs == Repairs::Allowed {
            self.repair_confirmed(rows, &outcome).await;
        }
        Ok(outcome)
    }

    /// Reads the next sweep page of `rows` after `cursor` (see [`Rows::page`]) and the cached
    /// values of its keys, on the caller's connection: everything [`Checker::check_page`]
    /// needs, so a sweep can read one page while it checks the one before.
    pub async fn read_page(
        &self,
        conn: &mut AsyncPgConnection,
        rows: &Rows,
        cursor: Option<&[String]>,
        until: Option<&[String]>,
        limit: i64,
    ) -> Result<Page, CheckError> {
        let (at, page, last) = rows.page(conn, cursor, until, limit).await?;
        let len = page.len();
        let (keys, found): (Vec<String>, Vec<Found>) = page
            .into_iter()
            .filter_map(|r| r.key.map(|k| (k, r.row)))
            .unzip();
        // The cached values and the keys' open incidents, in one round trip each, at once.
        let conn: &AsyncPgConnection = conn;
        let (cached, open) = futures::try_join!(
            async {
                let shape = watch::shape(&rows.entity.representation);
                Ok::<_, CheckError>(self.cache.read_many(shape, &keys).await?)
            },
            async { Ok(incidents::open_for_keys(conn, &keys).await?) },
        )?;
        Ok(Page {
            at,
            keys,
            found,
            cached,
            open,
            len,
            last,
        })
    }

    /// Compares and records a page [`Checker::read_page`] read. Takes a connection of its own
    /// and gives it back before any repair, so a sweep holds at most two: its reader's and
    /// this one or a repair's.
    pub async fn check_page(&self, rows: &Rows, page: Page) -> Result<Outcome, CheckError> {
        let mut conn = self.pool.get().await?;
        let outcome = self
            .record(
                &mut conn,
                rows,
                page.keys,
                page.found,
                page.cached,
                Some(page.open),
                &track::Context {
                    source: Source::Sweep,
                    cause: None,
                    at: page.at,
                    grace: self.grace,
                    confirming: None,
                },
            )
            .await?;
        drop(conn);
        self.repair_confirmed(rows, &outcome).await;
        Ok(outcome)
    }

    /// The key-side sweep: of these scanned keys of `rows`' entity, checks those with no row
    /// behind them (the others were compared by the row pass), which reports orphans.
    pub async fn check_orphans(
        &self,
        rows: &Rows,
        keys: Vec<String>,
    ) -> Result<Outcome, CheckError> {
        let (keys, values): (Vec<String>, Vec<Vec<String>>) = keys
            .into_iter()
            .filter_map(|k| self.watched.owned(rows, &k).map(|v| (k, v)))
            .unzip();
        if keys.is_empty() {
            return Ok(Outcome::default());
        }
        let mut conn = self.pool.get().await?;
        let exist = rows.exist(&mut conn, &values).await?;
        let (keys, values): (Vec<String>, Vec<Vec<String>>) = keys
            .into_iter()
            .zip(values)
            .zip(exist)
            .filter(|(_, exists)| !exists)
            .map(|(pair, _)| pair)
            .unzip();
        if keys.is_empty() {
            return Ok(Outcome::default());
        }
        // Read again, dated: a row may have appeared since (then it is compared as usual).
        let (at, found) = rows.by_keys(&mut conn, &values).await?;
        let orphans: Vec<(String, Found)> = keys.into_iter().zip(found).collect();
        let outcome = self
            .check(&mut conn, rows, at, orphans, Source::Sweep, None, None)
            .await?;
        drop(conn);
        self.repair_confirmed(rows, &outcome).await;
        Ok(outcome)
    }

    /// The check of captured changes to an entity invalidated on change: its keys were just
    /// deleted, and under cache-aside an absent key agrees with its row whatever the row
    /// holds. So the cache is read first, and only the keys the application has put back
    /// since are checked as usual, row first; the others are recorded as matches without
    /// reading their rows. PostgreSQL's clock is read before the cache, so those matches are
    /// dated no later than what they saw, as every observation is (its rows' clock, read
    /// before its cached values).
    async fn check_absent_first(
        &self,
        conn: &mut AsyncPgConnection,
        rows: &Rows,
        keys: Vec<String>,
        values: Vec<Vec<String>>,
        cause: Option<Cause>,
    ) -> Result<Outcome, CheckError> {
        let at = db::now(conn).await?;
        let (absent, present) = self.split_absent(rows, keys, values).await?;
        let absent: Vec<Evidence> = absent
            .into_iter()
            .map(|key| self.watched.absent(rows, key))
            .collect();
        let ctx = track::Context {
            source: Source::Cdc,
            cause,
            at,
            grace: self.grace,
            confirming: None,
        };
        let mut outcome = Outcome::default();
        if !absent.is_empty() {
            outcome.merge(self.record_evidence(conn, absent, None, &ctx).await?);
        }
        let (keys, values) = present;
        if !keys.is_empty() {
            let (at, found) = rows.by_keys(conn, &values).await?;
            let pairs = keys.into_iter().zip(found).collect();
            outcome.merge(
                self.check(conn, rows, at, pairs, Source::Cdc, cause, None)
                    .await?,
            );
        }
        Ok(outcome)
    }

    /// Reads the cached values of `keys` (with their template `values`) and splits them: the
    /// keys absent from the cache, and the others with their values, in order. The first step
    /// of a check or an SLO probe of an entity that [`Watched::invalidated_and_aside`]; the
    /// present keys' cached values are read again after their rows.
    pub(crate) async fn split_absent(
        &self,
        rows: &Rows,
        keys: Vec<String>,
        values: Vec<Vec<String>>,
    ) -> Result<(Vec<String>, (Vec<String>, Vec<Vec<String>>)), CheckError> {
        let shape = watch::shape(&rows.entity.representation);
        let cached = self.cache.read_many(shape, &keys).await?;
        let mut absent = Vec::new();
        let mut present = (Vec::new(), Vec::new());
        for ((key, values), cached) in keys.into_iter().zip(values).zip(cached) {
            if matches!(cached, Cached::Missing) {
                absent.push(key);
            } else {
                present.0.push(key);
                present.1.push(values);
            }
        }
        Ok((absent, present))
    }

    #[allow(clippy::too_many_arguments)]
    async fn check(
        &self,
        conn: &mut AsyncPgConnection,
        rows: &Rows,
        at: DateTime<Utc>,
        pairs: Vec<(String, Found)>,
        source: Source,
        cause: Option<Cause>,
        confirming: Option<&HashMap<String, i64>>,
    ) -> Result<Outcome, CheckError> {
        let (keys, found): (Vec<String>, Vec<Found>) = pairs.into_iter().unzip();
        let shape = watch::shape(&rows.entity.representation);
        let cached = self.cache.read_many(shape, &keys).await?;
        let ctx = track::Context {
            source,
            cause,
            at,
            grace: self.grace,
            confirming,
        };
        self.record(conn, rows, keys, found, cached, None, &ctx)
            .await
    }

    /// Compares what was read for each key (its rows as of `ctx.at`, then its cached value)
    /// and records the verdicts; `open`: the keys' open incidents, when already read.
    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        conn: &mut AsyncPgConnection,
        rows: &Rows,
        keys: Vec<String>,
        found: Vec<Found>,
        cached: Vec<Cached>,
        open: Option<HashMap<String, IncidentRow>>,
        ctx: &track::Context<'_>,
    ) -> Result<Outcome, CheckError> {
        let evidence: Vec<Evidence> = keys
            .into_iter()
            .zip(found)
            .zip(cached)
            .map(|((key, found), cached)| self.watched.evidence(rows, key, found, cached))
            .collect();
        self.record_evidence(conn, evidence, open, ctx).await
    }

    /// Records `evidence` through the state machine and schedules the confirmations of the
    /// incidents it opened.
    async fn record_evidence(
        &self,
        conn: &mut AsyncPgConnection,
        evidence: Vec<Evidence>,
        open: Option<HashMap<String, IncidentRow>>,
        ctx: &track::Context<'_>,
    ) -> Result<Outcome, CheckError> {
        let mut verdicts = HashMap::new();
        for ev in &evidence {
            *verdicts.entry(ev.kind).or_insert(0) += 1;
        }
        let batch = match open {
            Some(open) => {
                track::record_batch_with_open(conn, &self.metrics, ctx, evidence, open).await
            }
            None => track::record_batch(conn, &self.metrics, ctx, evidence).await,
        };
        // Whatever committed gets its confirmation, even when a later key failed: the retry
        // of this batch would find those incidents already open and schedule nothing.
        self.schedule_confirmations(&batch.recorded).await;
        if let Some(e) = batch.error {
            return Err(e.into());
        }
        Ok(Outcome {
            recorded: batch.recorded,
            verdicts,
        })
    }

    /// One confirmation job per entity for every incident these observations opened, due
    /// when the last of them is. A push that fails is not fatal: the backstop confirms
    /// overdue incidents.
    pub(crate) async fn schedule_confirmations(&self, recorded: &[Recorded]) {
        let mut by_entity: BTreeMap<&str, Vec<(ConfirmTarget, DateTime<Utc>)>> = BTreeMap::new();
        for r in recorded {
            let (Some(at), Some(incident)) = (r.confirm_at, r.incident.as_ref()) else {
                continue;
            };
            by_entity.entry(&incident.entity).or_default().push((
                ConfirmTarget {
                    incident_id: incident.id,
                    key: r.cache_key.clone(),
                },
                at,
            ));
        }
        for (entity, targets) in by_entity {
            let due_at = targets.iter().map(|(_, at)| *at).max().expect("not empty");
            let job = ConfirmJob {
                entity: entity.to_string(),
                targets: targets.into_iter().map(|(t, _)| t).collect(),
                due_at,
            };
            let mut conn = self.queue.clone();
            let jobs = &self.metrics.jobs;
            match queue::push(&mut conn, self.cache.keys(), vec![(job, Some(due_at))]).await {
                Ok(()) => jobs.with_label_values(&[ConfirmJob::NAME, "pushed"]).inc(),
                Err(e) => {
                    jobs.with_label_values(&[ConfirmJob::NAME, "push_error"])
                        .inc();
                    tracing::warn!(error = %e, "could not schedule confirmations; the backstop will confirm");
                }
            }
        }
    }

    /// Rewrites `key` of `entity` from PostgreSQL (or deletes it when no row is behind it)
    /// and checks it, so that its open incident resolves with cause `refresh`.
    pub async fn refresh(&self, entity: &str, key: &str) -> Result<Outcome, CheckError> {
        let rows = self.rows(entity)?;
        if key == self.cache.keys().watermark(entity) {
            // A whole entity's `cache_behind`: a rebuild rewrites it; a refresh checks again.
            return crate::watermark::observe(
                self,
                entity,
                Source::Manual,
                Some(Cause::Refresh),
                None,
            )
            .await;
        }
        self.write_back(rows, &[key.to_string()], Cause::Refresh)
            .await?;
        self.check_keys_with(
            entity,
            &[key.to_string()],
            Source::Manual,
            Some(Cause::Refresh),
            None,
            Repairs::No,
        )
        .await
    }

    /// REPAIR_POLICY=confirmed: every key whose incident this batch confirmed (or, if the
    /// repair at confirmation could not fix it, turned Persistent) is rewritten from
    /// PostgreSQL and checked again; a match resolves it with cause `repair`. Failures are
    /// logged and counted, never the batch's: the incident stays open for people to see.
    async fn repair_confirmed(&self, rows: &Rows, outcome: &Outcome) {
        if self.repair != RepairPolicy::Confirmed {
            return;
        }
        let keys: Vec<String> = outcome
            .recorded
            .iter()
            .filter(|r| {
                r.transition
                    .is_some_and(|t| matches!(t.to, State::Confirmed | State::Persistent))
            })
            .map(|r| r.cache_key.clone())
            .collect();
        if keys.is_empty() {
            return;
        }
        let repaired = async {
            self.write_back(rows, &keys, Cause::Repair).await?;
            Box::pin(self.check_keys_with(
                &rows.entity.name,
                &keys,
                Source::Repair,
                Some(Cause::Repair),
                None,
                Repairs::No,
            ))
            .await
        };
        if let Err(e) = repaired.await {
            self.metrics.repairs.with_label_values(&["error"]).inc();
            tracing::warn!(error = %e, keys = keys.len(), "repair failed; the incidents stay open");
        }
    }

    /// Writes what PostgreSQL holds behind `keys` to the cache, counted by outcome.
    async fn write_back(
        &self,
        rows: &Rows,
        keys: &[String],
        cause: Cause,
    ) -> Result<(), CheckError> {
        let values = keys
            .iter()
            .map(|k| {
                rows.key_values(k).ok_or_else(|| CheckError::ForeignKey {
                    entity: rows.entity.name.clone(),
                    key: k.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let found = {
            let mut conn = self.pool.get().await?;
            rows.by_keys(&mut conn, &values).await?.1
        };
        // Whoever sees the rewritten key agree first (this rewrite's own check, the sweep, a
        // keyspace notification of this very write) credits the rewrite.
        {
            let mut conn = self.pool.get().await?;
            incidents::mark_rewrite(&mut conn, keys, cause).await?;
        }
        for (key, found) in keys.iter().zip(found) {
            let outcome = match found {
                // Nothing sound to write; the incident says why.
                Err(_) => repair::Outcome::Undecodable,
                Ok(row) => repair::write(&self.cache, rows, key, row.as_ref()).await?,
            };
            self.metrics
                .repairs
                .with_label_values(&[outcome.as_str()])
                .inc();
        }
        Ok(())
    }
}
