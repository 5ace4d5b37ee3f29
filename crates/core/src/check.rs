//! One check of a batch of items: one SQL query for the rows (with PostgreSQL's clock), one
//! MGET for the cached values, the comparator on each pair, the verdicts recorded through the
//! state machine, and a confirmation scheduled for every incident that opened.
//!
//! Also the one place that writes the cache from PostgreSQL for stalewatch's own sake:
//! a refresh asked for through the API, and repairs under `REPAIR_POLICY=confirmed`. Both use
//! the versioned write, so they never put an older version over a newer one.

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use diesel_async::AsyncPgConnection;
use redis::aio::ConnectionManager;
use uuid::Uuid;

use crate::cache::{Cache, CacheError};
use crate::compare::{self, CompareOptions, DbRow, Kind, Verdict};
use crate::config::{Config, RepairPolicy};
use crate::db::incidents::Evidence;
use crate::db::items::{self, Item, ItemRow};
use crate::db::{DbError, PgPool};
use crate::incident::{Cause, Source, State};
use crate::jobs::{ConfirmJob, ConfirmTarget, Job};
use crate::metrics::Metrics;
use crate::queue;
use crate::track::{self, Recorded};

/// The entity name stored with incidents about items.
pub const ITEM_ENTITY: &str = "item";

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Cache(#[from] CacheError),
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
    pub options: Arc<CompareOptions>,
    pub grace: Duration,
    pub repair: RepairPolicy,
    /// TTL of the cache writes of refreshes and repairs.
    pub ttl: Duration,
    /// Where confirmation jobs are pushed.
    pub queue: ConnectionManager,
}

/// Summary of one batch, for callers that count.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub recorded: Vec<Recorded>,
    pub verdicts: HashMap<Kind, u64>,
}

impl Outcome {
    pub fn transitions(&self) -> u64 {
        self.recorded
            .iter()
            .filter(|r| r.transition.is_some())
            .count() as u64
    }
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
    ) -> Self {
        let options = CompareOptions {
            policy: config.cache_policy,
            ignore_fields: config.ignore_fields.clone(),
            ..CompareOptions::default()
        };
        Self {
            pool,
            cache,
            metrics,
            options: Arc::new(options),
            grace: config.grace_period,
            repair: config.repair_policy,
            ttl: config.cache_ttl,
            queue,
        }
    }

    /// Checks items by id, reading their rows.
    pub async fn check_ids(
        &self,
        ids: &[Uuid],
        source: Source,
        cause: Option<Cause>,
    ) -> Result<Outcome, CheckError> {
        self.check_ids_with(ids, source, cause, None, Repairs::Allowed)
            .await
    }

    /// Confirms incidents: `expected` maps each key to the Detected incident the confirmation
    /// was scheduled for (see `track::Context::confirming`).
    pub async fn confirm(
        &self,
        ids: &[Uuid],
        expected: &HashMap<String, i64>,
    ) -> Result<Outcome, CheckError> {
        self.check_ids_with(ids, Source::Confirm, None, Some(expected), Repairs::Allowed)
            .await
    }

    /// Checks rows the caller already read at `at` (the sweep reads them in pages).
    pub async fn check_rows(
        &self,
        conn: &mut AsyncPgConnection,
        at: DateTime<Utc>,
        rows: Vec<(Uuid, Option<ItemRow>)>,
        source: Source,
    ) -> Result<Outcome, CheckError> {
        let outcome = self.check(conn, at, rows, source, None, None).await?;
        self.repair_confirmed(&outcome).await;
        Ok(outcome)
    }

    async fn check_ids_with(
        &self,
        ids: &[Uuid],
        source: Source,
        cause: Option<Cause>,
        confirming: Option<&HashMap<String, i64>>,
        repairs: Repairs,
    ) -> Result<Outcome, CheckError> {
        // A key listed twice must be observed once: the second copy would find no row left
        // and report an orphan that does not exist.
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut conn = self.pool.get().await?;
        let (at, rows) = items::get_many_at(&mut conn, &ids).await?;
        let mut by_id: HashMap<Uuid, ItemRow> = rows.into_iter().map(|r| (r.id, r)).collect();
        let pairs = ids.iter().map(|id| (*id, by_id.remove(id))).collect();
        let outcome = self
            .check(&mut conn, at, pairs, source, cause, confirming)
            .await?;
        // A repair takes connections of its own: give this one back first, so a job never
        // holds more than one.
        drop(conn);
        if repairs == Repairs::Allowed {
            self.repair_confirmed(&outcome).await;
        }
        Ok(outcome)
    }

    async fn check(
        &self,
        conn: &mut AsyncPgConnection,
        at: DateTime<Utc>,
        rows: Vec<(Uuid, Option<ItemRow>)>,
        source: Source,
        cause: Option<Cause>,
        confirming: Option<&HashMap<String, i64>>,
    ) -> Result<Outcome, CheckError> {
        let keys: Vec<String> = rows
            .iter()
            .map(|(id, _)| self.cache.keys().item(id))
            .collect();
        let cached = self.cache.get_many(&keys).await?;
        let mut verdicts = HashMap::new();
        let evidence: Vec<Evidence> = rows
            .into_iter()
            .zip(keys)
            .zip(cached)
            .map(|(((id, row), key), cached)| {
                let ev = self.evidence(key, id, row, cached.as_deref());
                *verdicts.entry(ev.kind).or_insert(0) += 1;
                ev
            })
            .collect();
        let ctx = track::Context {
            source,
            cause,
            at,
            grace: self.grace,
            confirming,
        };
        let batch = track::record_batch(conn, &self.metrics, &ctx, evidence).await;
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

    /// Compares one row (or its absence) with the cached bytes.
    fn evidence(
        &self,
        key: String,
        id: Uuid,
        row: Option<ItemRow>,
        cached: Option<&[u8]>,
    ) -> Evidence {
        let db_version = row.as_ref().map(|r| r.version);
        let (verdict, doc) = match row.map(ItemRow::decode) {
            // The row itself is unreadable: this key's verdict, not the batch's failure.
            Some(Err(reason)) => (
                Verdict {
                    kind: Kind::Undecodable,
                    db_version,
                    cache_version: None,
                    diff: format!("the database row cannot be decoded: {reason}"),
                },
                None,
            ),
            Some(Ok(item)) => {
                let doc = serde_json::to_value(&item).expect("items serialise");
                let verdict = compare::compare(Some(DbRow { doc: &doc }), cached, &self.options);
                (verdict, Some(doc))
            }
            None => (compare::compare(None, cached, &self.options), None),
        };
        // Values are only worth storing when they differ; a match stores nothing anyway.
        let (db_value, cache_value) = if verdict.kind.is_match() {
            (None, None)
        } else {
            (
                doc.map(|d| d.to_string()),
                cached.map(|c| String::from_utf8_lossy(c).into_owned()),
            )
        };
        Evidence {
            cache_key: key,
            entity: ITEM_ENTITY.to_string(),
            entity_id: id.to_string(),
            kind: verdict.kind,
            db_version: verdict.db_version.or(db_version),
            cache_version: verdict.cache_version,
            db_value,
            cache_value,
            diff: verdict.diff,
        }
    }

    /// One confirmation job for every incident these observations opened, due when the last
    /// of them is. A push that fails is not fatal: the backstop confirms overdue incidents.
    async fn schedule_confirmations(&self, recorded: &[Recorded]) {
        let targets: Vec<(ConfirmTarget, DateTime<Utc>)> = recorded
            .iter()
            .filter_map(|r| {
                let at = r.confirm_at?;
                let incident = r.incident.as_ref()?;
                let item_id = self.cache.keys().parse_item(&r.cache_key)?;
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

    /// Rewrites the key of `id` from PostgreSQL (or deletes it when the row is gone) and
    /// checks it, so that its open incident resolves with cause `refresh`. Returns the row.
    pub async fn refresh(&self, id: Uuid) -> Result<(Option<Item>, Outcome), CheckError> {
        let item = items::get(&self.pool, id).await?;
        self.write_back(id, item.as_ref()).await?;
        let outcome = self
            .check_ids_with(
                &[id],
                Source::Manual,
                Some(Cause::Refresh),
                None,
                Repairs::No,
            )
            .await?;
        Ok((item, outcome))
    }

    /// REPAIR_POLICY=confirmed: every key whose incident this batch confirmed (or, if the
    /// repair at confirmation could not fix it, turned Persistent) is rewritten from
    /// PostgreSQL and checked again; a match resolves it with cause `repair`. Failures are
    /// logged and counted, never the batch's: the incident stays open for people to see.
    async fn repair_confirmed(&self, outcome: &Outcome) {
        if self.repair != RepairPolicy::Confirmed {
            return;
        }
        let ids: Vec<Uuid> = outcome
            .recorded
            .iter()
            .filter(|r| {
                r.transition
                    .is_some_and(|t| matches!(t.to, State::Confirmed | State::Persistent))
            })
            .filter_map(|r| self.cache.keys().parse_item(&r.cache_key))
            .collect();
        if ids.is_empty() {
            return;
        }
        if let Err(e) = Box::pin(self.repair_ids(&ids)).await {
            self.metrics.repairs.with_label_values(&["error"]).inc();
            tracing::warn!(error = %e, keys = ids.len(), "repair failed; the incidents stay open");
        }
    }

    async fn repair_ids(&self, ids: &[Uuid]) -> Result<(), CheckError> {
        let mut conn = self.pool.get().await?;
        let (_, rows) = items::get_many_at(&mut conn, ids).await?;
        drop(conn);
        let mut by_id: HashMap<Uuid, ItemRow> = rows.into_iter().map(|r| (r.id, r)).collect();
        for id in ids {
            match by_id.remove(id).map(ItemRow::decode) {
                Some(Err(_)) => {
                    // Nothing sound to write; the incident says why.
                    self.metrics
                        .repairs
                        .with_label_values(&["undecodable"])
                        .inc();
                }
                Some(Ok(item)) => self.write_back(*id, Some(&item)).await?,
                None => self.write_back(*id, None).await?,
            }
        }
        self.check_ids_with(ids, Source::Repair, Some(Cause::Repair), None, Repairs::No)
            .await?;
        Ok(())
    }

    /// The versioned write (or a delete for a row that is gone), counted by outcome.
    async fn write_back(&self, id: Uuid, item: Option<&Item>) -> Result<(), CacheError> {
        let key = self.cache.keys().item(&id);
        let outcome = match item {
            Some(item) => {
                let written = self
                    .cache
                    .set_unless_newer(&key, &item.to_cache_bytes(), item.version, self.ttl)
                    .await?;
                if written {
                    "written"
                } else {
                    "skipped_newer"
                }
            }
            None => {
                self.cache.delete(&key).await?;
                "deleted"
            }
        };
        self.metrics.repairs.with_label_values(&[outcome]).inc();
        Ok(())
    }
}
