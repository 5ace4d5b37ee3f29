//! One check of a batch of items: one SQL query for the rows, one MGET for the cached values,
//! the comparator on each pair, and the verdicts recorded through the state machine.

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::Utc;
use uuid::Uuid;

use crate::cache::{Cache, CacheError};
use crate::compare::{self, CompareOptions, DbRow, Kind, Verdict};
use crate::config::Config;
use crate::db::incidents::Evidence;
use crate::db::items::{self, Item};
use crate::db::{DbError, PgPool};
use crate::incident::{Cause, Source};
use crate::metrics::Metrics;
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

/// What a check needs; cheap to clone.
#[derive(Clone)]
pub struct Checker {
    pub pool: PgPool,
    pub cache: Cache,
    pub metrics: Metrics,
    pub options: Arc<CompareOptions>,
    pub grace: Duration,
}

/// Summary of one batch, for callers that count.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub recorded: Vec<Recorded>,
    pub verdicts: HashMap<Kind, u64>,
}

impl Checker {
    pub fn new(config: &Config, pool: PgPool, cache: Cache, metrics: Metrics) -> Self {
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
        }
    }

    /// Checks items by id, reading their rows.
    pub async fn check_ids(
        &self,
        ids: &[Uuid],
        source: Source,
        cause: Option<Cause>,
    ) -> Result<Outcome, CheckError> {
        self.check_ids_with(ids, source, cause, None).await
    }

    /// Confirms incidents: `expected` maps each key to the Detected incident the confirmation
    /// was scheduled for (see `track::Context::confirming`).
    pub async fn confirm(
        &self,
        ids: &[Uuid],
        expected: &HashMap<String, i64>,
    ) -> Result<Outcome, CheckError> {
        self.check_ids_with(ids, Source::Confirm, None, Some(expected))
            .await
    }

    async fn check_ids_with(
        &self,
        ids: &[Uuid],
        source: Source,
        cause: Option<Cause>,
        confirming: Option<&HashMap<String, i64>>,
    ) -> Result<Outcome, CheckError> {
        let rows = items::get_many(&self.pool, ids).await?;
        let mut by_id: HashMap<Uuid, Item> = rows.into_iter().map(|r| (r.id, r)).collect();
        let pairs = ids.iter().map(|id| (*id, by_id.remove(id))).collect();
        self.check(pairs, source, cause, confirming).await
    }

    /// Checks items whose rows the caller already read (the sweep reads them in pages).
    pub async fn check_rows(
        &self,
        rows: Vec<(Uuid, Option<Item>)>,
        source: Source,
    ) -> Result<Outcome, CheckError> {
        self.check(rows, source, None, None).await
    }

    async fn check(
        &self,
        rows: Vec<(Uuid, Option<Item>)>,
        source: Source,
        cause: Option<Cause>,
        confirming: Option<&HashMap<String, i64>>,
    ) -> Result<Outcome, CheckError> {
        let keys: Vec<String> = rows
            .iter()
            .map(|(id, _)| self.cache.keys().item(id))
            .collect();
        let cached = self.cache.get_many(&keys).await?;
        // Read the clock after both reads: an observation is never dated before what it saw.
        let at = Utc::now();
        let mut verdicts = HashMap::new();
        let evidence: Vec<Evidence> = rows
            .into_iter()
            .zip(keys)
            .zip(cached)
            .map(|(((id, row), key), cached)| {
                let doc = row
                    .as_ref()
                    .map(|r| serde_json::to_value(r).expect("items serialise"));
                let verdict = compare::compare(
                    doc.as_ref().map(|doc| DbRow { doc }),
                    cached.as_deref(),
                    &self.options,
                );
                *verdicts.entry(verdict.kind).or_insert(0) += 1;
                evidence_for(key, id, &verdict, doc.as_ref(), cached.as_deref())
            })
            .collect();
        let ctx = track::Context {
            source,
            cause,
            at,
            grace: self.grace,
            confirming,
        };
        let recorded = track::record_batch(&self.pool, &self.metrics, &ctx, evidence).await?;
        Ok(Outcome { recorded, verdicts })
    }
}

fn evidence_for(
    key: String,
    id: Uuid,
    verdict: &Verdict,
    doc: Option<&serde_json::Value>,
    cached: Option<&[u8]>,
) -> Evidence {
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
        db_version: verdict.db_version,
        cache_version: verdict.cache_version,
        db_value,
        cache_value,
        diff: verdict.diff.clone(),
    }
}
