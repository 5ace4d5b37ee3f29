//! The watermark drift check: does an ingesting entity's cache keep up with its table?
//!
//! Every cache write of an ingesting entity (`ingest = true`, with a `version`) by the
//! ingester or a rebuild advances the entity's watermark, `<prefix>watermark:<entity>` in
//! stalewatch's own Redis: the highest version written, set by [`ADVANCE`] atomically and
//! never backwards. A periodic check ([`observe`]) reads PostgreSQL's newest row (the highest
//! version, and its key), then the watermark and that key's cached value, and finds the cache
//! behind when
//!
//! - the table has rows but there is no watermark (a flush of a Redis holding both, or a
//!   cache never written by ingestion or a rebuild),
//! - the watermark trails the highest version by more than `WATERMARK_MAX_LAG` (versions, or
//!   milliseconds for a timestamp version): writes reached PostgreSQL and not the cache,
//! - or the newest row's key does not agree with it. This is what sees a flush of the cache
//!   when the watermark lives in another Redis (separate roles: the watermark survives the
//!   flush, the keys do not).
//!
//! That verdict, `cache_behind`, goes through the same state machine as a key's, as an
//! incident of the whole entity keyed by the watermark's own key: detected, confirmed after
//! the grace period (by a confirm job like any other, or the next check), resolved when the
//! watermark catches up (cause `write`) or a rebuild repairs it (cause `repair`).

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::Script;
use serde_json::json;

use crate::check::{CheckError, Checker, Outcome};
use crate::column::{self, ColumnType};
use crate::compare::Kind;
use crate::db::incidents::Evidence;
use crate::entity::Entity;
use crate::incident::{Cause, Source};
use crate::rows::Row;
use crate::track;
use crate::watch;

/// Sets KEYS[1] to ARGV[1] unless it already holds a higher number (or one as high); returns
/// 1 when it moved. A value that is not a number is replaced. Versions are compared as Lua
/// numbers, exact up to 2^53 (timestamps in microseconds reach 2^51 in the year 2041).
pub const ADVANCE_LUA: &str = r"local cur = tonumber(redis.call('GET', KEYS[1]))
local new = tonumber(ARGV[1])
if cur == nil or new > cur then
    redis.call('SET', KEYS[1], ARGV[1])
    return 1
end
return 0";

/// [`ADVANCE_LUA`] as a script.
pub static ADVANCE: LazyLock<Script> = LazyLock::new(|| Script::new(ADVANCE_LUA));

/// The `EVAL` of [`ADVANCE_LUA`], for a pipeline: the script's text travels with it, so a
/// Redis that restarted and forgot its scripts needs no second round trip.
pub fn advance_cmd(key: &str, version: i64) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(ADVANCE_LUA).arg(1).arg(key).arg(version);
    cmd
}

/// Whether `entity` has a watermark and is checked: it ingests, and has a version to order
/// its writes by.
pub fn tracked(entity: &Entity) -> bool {
    entity.ingest && entity.version.is_some()
}

/// What one check read: PostgreSQL first, then Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The highest version in the table (`column::version_of`'s number); `None`: no rows.
    pub highest: Option<i64>,
    /// The watermark; `None`: no key.
    pub watermark: Option<i64>,
    /// The newest row's key, and how its cached value compares with the row (`None`: no
    /// rows, or no key renders from the row).
    pub newest: Option<(String, Kind, String)>,
}

/// Whether `reading` says the cache is behind, and why. `max_lag` is in the version's units
/// ([`lag_units`]).
pub fn judge(reading: &Reading, max_lag: i64) -> (Kind, String) {
    let Some(highest) = reading.highest else {
        // An empty table: nothing to be behind.
        return (Kind::Match, String::new());
    };
    match reading.watermark {
        None => {
            return (
                Kind::CacheBehind,
                format!(
                    "no watermark while the table has rows (highest version {highest}): the \
                     cache was flushed, or nothing was written by ingestion or a rebuild since"
                ),
            )
        }
        Some(w) if highest.saturating_sub(w) > max_lag => {
            return (
                Kind::CacheBehind,
                format!(
                    "watermark {w} is {} behind the table's highest version {highest} \
                     (WATERMARK_MAX_LAG {max_lag})",
                    highest.saturating_sub(w)
                ),
            )
        }
        Some(_) => {}
    }
    match &reading.newest {
        Some((key, kind, diff)) if !kind.is_match() => (
            Kind::CacheBehind,
            format!("the newest row's key {key} is {kind}: {diff}"),
        ),
        _ => (Kind::Match, String::new()),
    }
}

/// `WATERMARK_MAX_LAG` in a version column's units: versions for integers, milliseconds
/// (given) as microseconds for timestamps and dates.
pub fn lag_units(ty: ColumnType, max_lag: u64) -> i64 {
    let lag = i64::try_from(max_lag).unwrap_or(i64::MAX);
    match ty {
        ColumnType::Timestamptz | ColumnType::Timestamp | ColumnType::Date => {
            lag.saturating_mul(1000)
        }
        _ => lag,
    }
}

/// Checks `entity`'s watermark and records the verdict through the state machine, as an
/// incident of the whole entity keyed by its watermark key. `confirming`, as for a key's
/// confirmation: only the Detected incident a confirm job was scheduled for is confirmed.
pub async fn observe(
    checker: &Checker,
    entity: &str,
    source: Source,
    cause: Option<Cause>,
    confirming: Option<&HashMap<String, i64>>,
) -> Result<Outcome, CheckError> {
    let rows = checker
        .watched
        .source(entity)
        .ok_or_else(|| CheckError::UnknownEntity(entity.to_string()))?;
    let Some(version) = rows
        .entity
        .version
        .clone()
        .filter(|_| tracked(&rows.entity))
    else {
        return Ok(Outcome::default());
    };
    let ty = rows
        .types
        .get(&version)
        .copied()
        .unwrap_or(ColumnType::Other);
    let mut conn = checker.pool.get().await?;
    let (at, newest) = rows.newest(&mut conn).await?;

    // Redis after PostgreSQL: a write in flight between the two reads makes the cache look
    // behind (a Detected incident that closes as transient), never ahead.
    let key = checker.cache.keys().watermark(entity);
    let watermark: Option<String> = {
        let mut own = checker.queue.clone();
        redis::cmd("GET")
            .arg(&key)
            .query_async(&mut own)
            .await
            .map_err(crate::cache::CacheError::from)?
    };
    let watermark = watermark.and_then(|w| w.trim().parse::<i64>().ok());
    let mut highest = None;
    let mut probe = None;
    if let Some(row) = newest {
        if let Ok(Some(Row::Doc(doc))) = &row.row {
            highest = doc.get(&version).and_then(|v| column::version_of(ty, v));
        }
        if let Some(k) = row.key {
            let shape = watch::shape(&rows.entity.representation);
            let cached = checker
                .cache
                .read_many(shape, std::slice::from_ref(&k))
                .await?
                .pop()
                .unwrap_or(crate::cache::Cached::Missing);
            let ev = checker.watched.evidence(rows, k.clone(), row.row, cached);
            probe = Some((k, ev.kind, ev.diff));
        }
    }
    let reading = Reading {
        highest,
        watermark,
        newest: probe,
    };
    let (kind, diff) = judge(&reading, lag_units(ty, checker.watermark_max_lag));
    checker
        .metrics
        .watermark_lag
        .with_label_values(&[entity])
        .set(match (highest, watermark) {
            (Some(h), Some(w)) => h.saturating_sub(w).max(0),
            (Some(_), None) => -1,
            (None, _) => 0,
        });
    let behind = !kind.is_match();
    let evidence = Evidence {
        cache_key: key,
        entity: entity.to_string(),
        entity_id: String::new(),
        kind,
        db_version: highest,
        cache_version: watermark,
        db_value: behind.then(|| {
            json!({
                "highest_version": highest,
                "newest_key": reading.newest.as_ref().map(|(k, _, _)| k),
            })
            .to_string()
        }),
        cache_value: behind.then(|| {
            json!({
                "watermark": watermark,
                "newest_key": reading.newest.as_ref().map(|(_, kind, _)| kind.as_str()),
            })
            .to_string()
        }),
        diff,
    };
    let ctx = track::Context {
        source,
        cause,
        at,
        grace: checker.grace,
        confirming,
    };
    let batch = track::record_batch(&mut conn, &checker.metrics, &ctx, vec![evidence]).await;
    drop(conn);
    checker.schedule_confirmations(&batch.recorded).await;
    if let Some(e) = batch.error {
        return Err(e.into());
    }
    let mut verdicts = HashMap::new();
    verdicts.insert(kind, 1);
    Ok(Outcome {
        recorded: batch.recorded,
        verdicts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(highest: Option<i64>, watermark: Option<i64>, newest: Option<Kind>) -> Reading {
        Reading {
            highest,
            watermark,
            newest: newest.map(|k| ("acct:9".to_string(), k, "version 9 -> 8".to_string())),
        }
    }

    #[test]
    fn an_empty_table_is_never_behind() {
        assert_eq!(judge(&reading(None, None, None), 0).0, Kind::Match);
        assert_eq!(judge(&reading(None, Some(5), None), 0).0, Kind::Match);
    }

    #[test]
    fn a_missing_watermark_while_the_table_has_rows_is_behind() {
        let (kind, diff) = judge(&reading(Some(9), None, Some(Kind::Match)), 100);
        assert_eq!(kind, Kind::CacheBehind);
        assert!(diff.contains("no watermark"), "{diff}");
    }

    #[test]
    fn a_watermark_trailing_by_more_than_the_lag_is_behind() {
        let m = |w, lag| judge(&reading(Some(100), Some(w), Some(Kind::Match)), lag).0;
        assert_eq!(m(100, 0), Kind::Match);
        assert_eq!(m(120, 0), Kind::Match, "ahead: rows were deleted");
        assert_eq!(m(99, 0), Kind::CacheBehind);
        assert_eq!(m(90, 10), Kind::Match);
        assert_eq!(m(89, 10), Kind::CacheBehind);
        let (_, diff) = judge(&reading(Some(100), Some(89), None), 10);
        assert!(diff.contains("watermark 89 is 11 behind"), "{diff}");
    }

    #[test]
    fn the_newest_rows_key_not_agreeing_is_behind_even_with_the_watermark_up_to_date() {
        // A flushed cache whose watermark lives in another Redis.
        let (kind, diff) = judge(&reading(Some(9), Some(9), Some(Kind::MissingInCache)), 0);
        assert_eq!(kind, Kind::CacheBehind);
        assert!(diff.contains("acct:9 is missing_in_cache"), "{diff}");
        assert_eq!(
            judge(&reading(Some(9), Some(9), Some(Kind::Match)), 0).0,
            Kind::Match
        );
    }

    #[test]
    fn the_lag_is_in_versions_or_in_milliseconds_of_a_timestamp() {
        assert_eq!(lag_units(ColumnType::Integer, 5), 5);
        assert_eq!(lag_units(ColumnType::Timestamptz, 5), 5_000);
        assert_eq!(lag_units(ColumnType::Integer, u64::MAX), i64::MAX);
    }

    #[test]
    fn the_advance_command_carries_its_script() {
        let packed =
            String::from_utf8_lossy(&advance_cmd("w", 7).get_packed_command()).replace("\r\n", " ");
        assert!(packed.contains("EVAL"), "{packed}");
        assert!(packed.contains("$1 w $1 7"), "{packed}");
    }
}
