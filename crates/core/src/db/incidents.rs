//! The `inconsistencies` table: one row per incident.
//!
//! Writes are conditional on the state the writer read, so when two workers observe the same
//! key at once exactly one of them applies its transition; the other gets
//! [`Applied::Conflict`] and re-reads.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use super::{schema::inconsistencies as t, DbError};
use crate::compare::Kind;
use crate::incident::{Cause, Incident, State, Step};

/// Longest snapshot of a DB or cached value kept with an incident.
pub const SNAPSHOT_CAP: usize = 2048;

/// The open-state filter written exactly as the partial unique index's predicate. As a
/// literal (not a bound array) the planner can use that index at all; a batch of keys is
/// still looked up one probe per key ([`OPEN_FOR_KEYS`]), since with most incidents open
/// the planner may prefer a scan for a long `ANY` list. With a bound array, a prepared statement
/// planned while the table was empty kept scanning every open incident for each batch:
/// 125 ms per batch at 10,000 open incidents, and a first sweep of 1M items ran at a
/// quarter of its steady speed (docs/BENCHMARKS.md).
fn is_open() -> diesel::expression::SqlLiteral<diesel::sql_types::Bool> {
    diesel::dsl::sql("state IN ('detected', 'confirmed', 'persistent')")
}

/// One incident as stored. Its JSON form is the API's: the key is `key`, and the snapshots
/// are shown as the JSON documents they hold (as text when they hold none).
#[derive(Debug, Clone, PartialEq, Queryable, QueryableByName, Selectable, Serialize)]
#[diesel(table_name = t, check_for_backend(diesel::pg::Pg))]
pub struct IncidentRow {
    pub id: i64,
    #[serde(rename = "key")]
    pub cache_key: String,
    pub entity: String,
    pub entity_id: String,
    pub state: String,
    pub kind: String,
    pub db_version: Option<i64>,
    pub cache_version: Option<i64>,
    #[serde(serialize_with = "snapshot")]
    pub db_value: Option<String>,
    #[serde(serialize_with = "snapshot")]
    pub cache_value: Option<String>,
    pub diff: String,
    pub first_seen_at: DateTime<Utc>,
    pub confirm_due_at: DateTime<Utc>,
    pub confirmed_at: Option<DateTime<Utc>>,
    pub last_seen_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolution: Option<String>,
    pub observations: i64,
    /// When a refresh or repair last rewrote the key of this (open) incident, and which.
    #[serde(skip)]
    pub rewritten_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    pub rewrite_cause: Option<String>,
}

/// A stored snapshot as the JSON document it holds, or as a string when it holds none (an
/// undecodable cached value, or a document cut at [`SNAPSHOT_CAP`] bytes).
fn snapshot<S: serde::Serializer>(text: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match text
        .as_deref()
        .map(serde_json::from_str::<serde_json::Value>)
    {
        None => s.serialize_none(),
        Some(Ok(doc)) => doc.serialize(s),
        Some(Err(_)) => s.serialize_some(text),
    }
}

impl IncidentRow {
    /// The state-machine view of this row. The CHECK constraints keep `state` and
    /// `resolution` to known words, so an unknown one means a newer schema: treat it as closed.
    pub fn incident(&self) -> Incident {
        Incident {
            state: State::parse(&self.state).unwrap_or(State::Resolved),
            first_seen_at: self.first_seen_at,
            confirm_due_at: self.confirm_due_at,
            confirmed_at: self.confirmed_at,
            last_seen_at: self.last_seen_at,
            resolved_at: self.resolved_at,
            resolution: self.resolution.as_deref().and_then(Cause::parse),
            observations: self.observations,
            db_version: self.db_version,
            rewrite: self
                .rewrite_cause
                .as_deref()
                .and_then(Cause::parse)
                .zip(self.rewritten_at),
        }
    }

    pub fn is_open(&self) -> bool {
        State::parse(&self.state).is_some_and(State::is_open)
    }
}

/// What the comparator saw for one key: stored with the incident for people to read.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    pub cache_key: String,
    pub entity: String,
    /// The key's template values joined with ':'; empty for a match, which never opens an
    /// incident (the only place it is stored).
    pub entity_id: String,
    pub kind: Kind,
    pub db_version: Option<i64>,
    pub cache_version: Option<i64>,
    pub db_value: Option<String>,
    pub cache_value: Option<String>,
    pub diff: String,
}

/// Cuts `s` to at most `cap` bytes on a char boundary.
pub fn cap(mut s: String, cap: usize) -> String {
    if s.len() > cap {
        let mut end = cap;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The step needed no write.
    Nothing,
    /// Written; the row as it now is.
    Stored(Box<IncidentRow>),
    /// Someone else changed this key's incident first: re-read and step again.
    Conflict,
}

/// The open incident of each of `$1`'s keys, one index probe per key.
///
/// A LATERAL subquery with a LIMIT cannot be flattened into a join, so PostgreSQL runs it
/// per key, and for one key the partial unique index is always the cheaper plan. Written as
/// `cache_key = ANY($1) AND state IN (...)`, it was planned afresh for each batch (diesel
/// does not cache a statement with an SQL literal in it) and, once most incidents were open
/// (a storm: 20,000 open of 20,000), as a scan of the whole table: 5 ms a batch of 1,000
/// keys, growing with the table, against 2 ms by index. (The LIMIT loses nothing: one open
/// incident per key at most, by that same index.)
pub const OPEN_FOR_KEYS: &str = "SELECT i.* FROM unnest($1::text[]) AS k(key) \
     CROSS JOIN LATERAL (SELECT * FROM inconsistencies AS o WHERE o.cache_key = k.key \
     AND o.state IN ('detected', 'confirmed', 'persistent') LIMIT 1) AS i";

/// The open incident of each key that has one.
/// Takes a shared connection, so it can go out in one round trip with other reads.
pub async fn open_for_keys(
    mut conn: &AsyncPgConnection,
    keys: &[String],
) -> Result<HashMap<String, IncidentRow>, DbError> {
    let rows: Vec<IncidentRow> = diesel::sql_query(OPEN_FOR_KEYS)
        .bind::<Array<Text>, _>(keys)
        .load(&mut conn)
        .await?;
    Ok(rows.into_iter().map(|r| (r.cache_key.clone(), r)).collect())
}

/// The latest incident of `key`, open or closed.
pub async fn latest_for_key(
    conn: &mut AsyncPgConnection,
    key: &str,
) -> Result<Option<IncidentRow>, DbError> {
    Ok(t::table
        .filter(t::cache_key.eq(key))
        .order(t::id.desc())
        .select(IncidentRow::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// The latest closed incident of each of these keys that has one: it dates the key's last
/// resolution, before which no observation may open a new incident. Takes a shared
/// connection, as [`open_for_keys`] does.
pub async fn latest_closed_for_keys(
    mut conn: &AsyncPgConnection,
    keys: &[String],
) -> Result<HashMap<String, IncidentRow>, DbError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<IncidentRow> = t::table
        .filter(t::cache_key.eq_any(keys))
        .filter(t::state.eq_any([State::Resolved.as_str(), State::Transient.as_str()]))
        .order((t::cache_key, t::id.desc()))
        .distinct_on(t::cache_key)
        .select(IncidentRow::as_select())
        .load(&mut conn)
        .await?;
    Ok(rows.into_iter().map(|r| (r.cache_key.clone(), r)).collect())
}

/// The latest incident of `key`, open or closed, locked until the end of the caller's
/// transaction: the slow path for a key that many writers observe at once. Locking the
/// latest row, not only an open one, makes an opener wait for a concurrent closer and then
/// see the resolution it wrote.
pub async fn latest_for_key_locked(
    conn: &mut AsyncPgConnection,
    key: &str,
) -> Result<Option<IncidentRow>, DbError> {
    Ok(t::table
        .filter(t::cache_key.eq(key))
        .order(t::id.desc())
        .select(IncidentRow::as_select())
        .for_update()
        .first(conn)
        .await
        .optional()?)
}

pub async fn by_id(conn: &mut AsyncPgConnection, id: i64) -> Result<Option<IncidentRow>, DbError> {
    Ok(t::table
        .find(id)
        .select(IncidentRow::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// Writes `step` for a key whose open incident (as read) is `current`.
pub async fn apply(
    conn: &mut AsyncPgConnection,
    current: Option<&IncidentRow>,
    step: &Step,
    evidence: &Evidence,
) -> Result<Applied, DbError> {
    let Some(next) = &step.next else {
        return Ok(Applied::Nothing);
    };
    let open_current = current.filter(|c| c.is_open());
    let row = match open_current {
        None => insert_open(conn, next, evidence).await?,
        Some(cur) => update_expected(conn, cur, next, evidence).await?,
    };
    Ok(row.map_or(Applied::Conflict, |r| Applied::Stored(Box::new(r))))
}

/// One key's write for [`apply_many`]: its open incident as read (or its latest closed one,
/// or none), and the step to store.
pub struct Write<'a> {
    pub current: Option<&'a IncidentRow>,
    pub step: &'a Step,
    pub evidence: &'a Evidence,
}

/// [`apply`] for many keys in two statements, one INSERT of every incident that opens and one
/// UPDATE of every open one that moves, each row under exactly the condition [`apply`] writes
/// it under. What a batch writes is then one commit, not one per key: each commit waits for
/// the WAL to reach the disk, which made a sweep spend most of its time on 1% of stale keys.
/// The answer lines up with `writes`; a key whose condition failed is a `Conflict`, for the
/// caller's locked slow path, as with [`apply`]. A step with nothing to store is `Nothing`.
///
/// None for the writes of a statement that failed: nothing of it is stored, and the caller
/// writes those keys one at a time with [`apply`], so that one key the database refuses
/// does not keep the keys before it from being stored (nor their confirmations from being
/// scheduled), as it would not if each had its own statement.
pub async fn apply_many(conn: &AsyncPgConnection, writes: &[Write<'_>]) -> Vec<Option<Applied>> {
    let mut inserts: Vec<(usize, &Incident, &Evidence)> = Vec::new();
    let mut updates: Vec<(usize, &IncidentRow, &Incident, &Evidence)> = Vec::new();
    for (i, w) in writes.iter().enumerate() {
        let Some(next) = &w.step.next else { continue };
        match w.current.filter(|c| c.is_open()) {
            None => inserts.push((i, next, w.evidence)),
            Some(cur) => updates.push((i, cur, next, w.evidence)),
        }
    }
    let mut applied = vec![Some(Applied::Nothing); writes.len()];
    // Different keys, so the two statements go out together; each commits on its own.
    let (inserted, updated) =
        futures::join!(insert_many(conn, &inserts), update_many(conn, &updates));
    // A key twice in one batch (a SCAN may return a key twice): the first copy gets the row,
    // the second conflicts and goes through the slow path, as it would one statement each.
    match inserted {
        Ok(rows) => {
            let mut rows: HashMap<String, IncidentRow> =
                rows.into_iter().map(|r| (r.cache_key.clone(), r)).collect();
            for (i, _, ev) in &inserts {
                applied[*i] = Some(stored(rows.remove(&ev.cache_key)));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, keys = inserts.len(), "batched INSERT failed; one key at a time");
            for (i, ..) in &inserts {
                applied[*i] = None;
            }
        }
    }
    match updated {
        Ok(rows) => {
            let mut rows: HashMap<i64, IncidentRow> = rows.into_iter().map(|r| (r.id, r)).collect();
            for (i, cur, ..) in &updates {
                applied[*i] = Some(stored(rows.remove(&cur.id)));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, keys = updates.len(), "batched UPDATE failed; one key at a time");
            for (i, ..) in &updates {
                applied[*i] = None;
            }
        }
    }
    applied
}

/// A conditional write's answer: its row, or no row because its condition failed.
fn stored(row: Option<IncidentRow>) -> Applied {
    row.map_or(Applied::Conflict, |r| Applied::Stored(Box::new(r)))
}

/// The statement of `insert_many`, public so that a test can read its plan.
///
/// "No resolution after this observation" is a scalar subquery on purpose. Written as
/// `NOT EXISTS`, PostgreSQL planned it as a hash anti-join whenever the table's statistics
/// were missing or behind (a young table, a storm of new incidents before autovacuum's
/// ANALYZE) and read the whole incident table into a hash for every batch: 14 ms a batch of
/// 100 at 20,000 incidents, growing with the table. The subquery is one index probe per key.
pub const INSERT_MANY: &str = "INSERT INTO inconsistencies (cache_key, entity, entity_id, state, \
     kind, db_version, cache_version, db_value, cache_value, diff, first_seen_at, confirm_due_at, \
     last_seen_at, observations) \
     SELECT u.* FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                            $6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::text[], \
                            $11::timestamptz[], $12::timestamptz[], $13::timestamptz[], \
                            $14::bigint[]) \
          AS u(cache_key, entity, entity_id, state, kind, db_version, cache_version, \
               db_value, cache_value, diff, first_seen_at, confirm_due_at, last_seen_at, \
               observations) \
     WHERE (SELECT 1 FROM inconsistencies AS i \
            WHERE i.cache_key = u.cache_key AND i.resolved_at > u.first_seen_at LIMIT 1) IS NULL \
     ORDER BY u.cache_key \
     ON CONFLICT (cache_key) WHERE state IN ('detected', 'confirmed', 'persistent') \
     DO NOTHING RETURNING *";

/// `insert_open` for many keys. Rows go in in key order, so two batches that open some of the
/// same keys at once wait for each other in the same order instead of deadlocking.
async fn insert_many(
    mut conn: &AsyncPgConnection,
    inserts: &[(usize, &Incident, &Evidence)],
) -> Result<Vec<IncidentRow>, DbError> {
    if inserts.is_empty() {
        return Ok(Vec::new());
    }
    let evs = || inserts.iter().map(|(_, _, e)| *e);
    let nexts = || inserts.iter().map(|(_, n, _)| *n);
    let snapshot = |v: &Option<String>| v.clone().map(|v| cap(v, SNAPSHOT_CAP));
    Ok(diesel::sql_query(INSERT_MANY)
        .bind::<Array<Text>, _>(evs().map(|e| e.cache_key.as_str()).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(evs().map(|e| e.entity.as_str()).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(evs().map(|e| e.entity_id.as_str()).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(nexts().map(|n| n.state.as_str()).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(evs().map(|e| e.kind.as_str()).collect::<Vec<_>>())
        .bind::<Array<Nullable<BigInt>>, _>(evs().map(|e| e.db_version).collect::<Vec<_>>())
        .bind::<Array<Nullable<BigInt>>, _>(evs().map(|e| e.cache_version).collect::<Vec<_>>())
        .bind::<Array<Nullable<Text>>, _>(evs().map(|e| snapshot(&e.db_value)).collect::<Vec<_>>())
        .bind::<Array<Nullable<Text>>, _>(
            evs().map(|e| snapshot(&e.cache_value)).collect::<Vec<_>>(),
        )
        .bind::<Array<Text>, _>(evs().map(|e| e.diff.as_str()).collect::<Vec<_>>())
        .bind::<Array<Timestamptz>, _>(nexts().map(|n| n.first_seen_at).collect::<Vec<_>>())
        .bind::<Array<Timestamptz>, _>(nexts().map(|n| n.confirm_due_at).collect::<Vec<_>>())
        .bind::<Array<Timestamptz>, _>(nexts().map(|n| n.last_seen_at).collect::<Vec<_>>())
        .bind::<Array<BigInt>, _>(nexts().map(|n| n.observations).collect::<Vec<_>>())
        .load(&mut conn)
        .await?)
}

/// `update_expected` for many incidents: each row only if it still has the state and count
/// its writer read. A step that stays open stores the new evidence; one that closes keeps the
/// divergence's. Rows are taken in id order, for the reason `insert_many` takes keys in order.
async fn update_many(
    mut conn: &AsyncPgConnection,
    updates: &[(usize, &IncidentRow, &Incident, &Evidence)],
) -> Result<Vec<IncidentRow>, DbError> {
    if updates.is_empty() {
        return Ok(Vec::new());
    }
    let curs = || updates.iter().map(|(_, c, _, _)| *c);
    let nexts = || updates.iter().map(|(_, _, n, _)| *n);
    let evs = || updates.iter().map(|(_, _, _, e)| *e);
    let snapshot = |v: &Option<String>| v.clone().map(|v| cap(v, SNAPSHOT_CAP));
    Ok(diesel::sql_query(
        "UPDATE inconsistencies AS i SET state = u.state, confirmed_at = u.confirmed_at, \
         last_seen_at = u.last_seen_at, resolved_at = u.resolved_at, \
         resolution = u.resolution, observations = u.observations, \
         kind = CASE WHEN u.evidence THEN u.kind ELSE i.kind END, \
         db_version = CASE WHEN u.evidence THEN u.db_version ELSE i.db_version END, \
         cache_version = CASE WHEN u.evidence THEN u.cache_version ELSE i.cache_version END, \
         db_value = CASE WHEN u.evidence THEN u.db_value ELSE i.db_value END, \
         cache_value = CASE WHEN u.evidence THEN u.cache_value ELSE i.cache_value END, \
         diff = CASE WHEN u.evidence THEN u.diff ELSE i.diff END \
         FROM (SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], \
                                    $5::timestamptz[], $6::timestamptz[], $7::timestamptz[], \
                                    $8::text[], $9::bigint[], $10::bool[], $11::text[], \
                                    $12::bigint[], $13::bigint[], $14::text[], $15::text[], \
                                    $16::text[]) \
                    AS v(id, was_state, was_observations, state, confirmed_at, last_seen_at, \
                         resolved_at, resolution, observations, evidence, kind, db_version, \
                         cache_version, db_value, cache_value, diff) \
               ORDER BY v.id) AS u \
         WHERE i.id = u.id AND i.state = u.was_state AND i.observations = u.was_observations \
         RETURNING i.*",
    )
    .bind::<Array<BigInt>, _>(curs().map(|c| c.id).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(curs().map(|c| c.state.as_str()).collect::<Vec<_>>())
    .bind::<Array<BigInt>, _>(curs().map(|c| c.observations).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(nexts().map(|n| n.state.as_str()).collect::<Vec<_>>())
    .bind::<Array<Nullable<Timestamptz>>, _>(nexts().map(|n| n.confirmed_at).collect::<Vec<_>>())
    .bind::<Array<Timestamptz>, _>(nexts().map(|n| n.last_seen_at).collect::<Vec<_>>())
    .bind::<Array<Nullable<Timestamptz>>, _>(nexts().map(|n| n.resolved_at).collect::<Vec<_>>())
    .bind::<Array<Nullable<Text>>, _>(
        nexts()
            .map(|n| n.resolution.map(|c| c.as_str()))
            .collect::<Vec<_>>(),
    )
    .bind::<Array<BigInt>, _>(nexts().map(|n| n.observations).collect::<Vec<_>>())
    .bind::<Array<diesel::sql_types::Bool>, _>(
        nexts().map(|n| n.state.is_open()).collect::<Vec<_>>(),
    )
    .bind::<Array<Text>, _>(evs().map(|e| e.kind.as_str()).collect::<Vec<_>>())
    .bind::<Array<Nullable<BigInt>>, _>(evs().map(|e| e.db_version).collect::<Vec<_>>())
    .bind::<Array<Nullable<BigInt>>, _>(evs().map(|e| e.cache_version).collect::<Vec<_>>())
    .bind::<Array<Nullable<Text>>, _>(evs().map(|e| snapshot(&e.db_value)).collect::<Vec<_>>())
    .bind::<Array<Nullable<Text>>, _>(evs().map(|e| snapshot(&e.cache_value)).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(evs().map(|e| e.diff.as_str()).collect::<Vec<_>>())
    .load(&mut conn)
    .await?)
}

async fn insert_open(
    conn: &mut AsyncPgConnection,
    next: &Incident,
    ev: &Evidence,
) -> Result<Option<IncidentRow>, DbError> {
    // ON CONFLICT on the partial unique index: a second opener for the same key inserts
    // nothing. NOT EXISTS: nor does an observation made before the key's last resolution
    // that committed since the opener read it.
    let row = diesel::sql_query(
        "INSERT INTO inconsistencies (cache_key, entity, entity_id, state, kind, db_version, \
         cache_version, db_value, cache_value, diff, first_seen_at, confirm_due_at, last_seen_at, \
         observations) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14 \
         WHERE NOT EXISTS (SELECT 1 FROM inconsistencies \
                           WHERE cache_key = $1 AND resolved_at > $11) \
         ON CONFLICT (cache_key) WHERE state IN ('detected', 'confirmed', 'persistent') \
         DO NOTHING RETURNING *",
    )
    .bind::<Text, _>(&ev.cache_key)
    .bind::<Text, _>(&ev.entity)
    .bind::<Text, _>(&ev.entity_id)
    .bind::<Text, _>(next.state.as_str())
    .bind::<Text, _>(ev.kind.as_str())
    .bind::<Nullable<BigInt>, _>(ev.db_version)
    .bind::<Nullable<BigInt>, _>(ev.cache_version)
    .bind::<Nullable<Text>, _>(ev.db_value.clone().map(|v| cap(v, SNAPSHOT_CAP)))
    .bind::<Nullable<Text>, _>(ev.cache_value.clone().map(|v| cap(v, SNAPSHOT_CAP)))
    .bind::<Text, _>(&ev.diff)
    .bind::<Timestamptz, _>(next.first_seen_at)
    .bind::<Timestamptz, _>(next.confirm_due_at)
    .bind::<Timestamptz, _>(next.last_seen_at)
    .bind::<BigInt, _>(next.observations)
    .get_result::<IncidentRow>(conn)
    .await
    .optional()?;
    Ok(row)
}

async fn update_expected(
    conn: &mut AsyncPgConnection,
    cur: &IncidentRow,
    next: &Incident,
    ev: &Evidence,
) -> Result<Option<IncidentRow>, DbError> {
    // Only the writer that read this exact state and count gets a row back: any observation
    // applied since (a mismatch adds one) makes this one re-read and step again.
    let target = t::table
        .filter(t::id.eq(cur.id))
        .filter(t::state.eq(&cur.state))
        .filter(t::observations.eq(cur.observations));
    let lifecycle = (
        t::state.eq(next.state.as_str()),
        t::confirmed_at.eq(next.confirmed_at),
        t::last_seen_at.eq(next.last_seen_at),
        t::resolved_at.eq(next.resolved_at),
        t::resolution.eq(next.resolution.map(|c| c.as_str())),
        t::observations.eq(next.observations),
    );
    let query = diesel::update(target);
    let row = if next.state.is_open() {
        // Still diverged: keep the latest evidence.
        query
            .set((
                lifecycle,
                t::kind.eq(ev.kind.as_str()),
                t::db_version.eq(ev.db_version),
                t::cache_version.eq(ev.cache_version),
                t::db_value.eq(ev.db_value.clone().map(|v| cap(v, SNAPSHOT_CAP))),
                t::cache_value.eq(ev.cache_value.clone().map(|v| cap(v, SNAPSHOT_CAP))),
                t::diff.eq(&ev.diff),
            ))
            .returning(IncidentRow::as_returning())
            .get_result(conn)
            .await
            .optional()?
    } else {
        // Closed by a match: keep the evidence of the divergence, not of the match.
        query
            .set(lifecycle)
            .returning(IncidentRow::as_returning())
            .get_result(conn)
            .await
            .optional()?
    };
    Ok(row)
}

/// Notes on the open incidents of `keys` that a refresh or repair (`cause`) is about to
/// rewrite them, so the observer that then sees them agree credits that cause.
pub async fn mark_rewrite(
    conn: &mut AsyncPgConnection,
    keys: &[String],
    cause: Cause,
) -> Result<(), DbError> {
    diesel::update(t::table.filter(t::cache_key.eq_any(keys)).filter(is_open()))
        .set((
            t::rewritten_at.eq(diesel::dsl::now),
            t::rewrite_cause.eq(cause.as_str()),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// One more mismatch for each of these Persistent incidents, in one statement: the common
/// case of a sweep over a cache with many known divergences. A Persistent incident only
/// counts and keeps the newest evidence, so the increments commute and need no read first.
/// Returns the ids updated; an incident that left Persistent meanwhile is not among them
/// and goes through the state machine instead.
pub async fn fold_persistent(
    conn: &mut AsyncPgConnection,
    at: DateTime<Utc>,
    updates: &[(i64, &Evidence)],
) -> Result<Vec<i64>, DbError> {
    if updates.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = updates.iter().map(|(id, _)| *id).collect();
    let kinds: Vec<&str> = updates.iter().map(|(_, e)| e.kind.as_str()).collect();
    let db_versions: Vec<Option<i64>> = updates.iter().map(|(_, e)| e.db_version).collect();
    let cache_versions: Vec<Option<i64>> = updates.iter().map(|(_, e)| e.cache_version).collect();
    let snapshot = |v: &Option<String>| v.clone().map(|v| cap(v, SNAPSHOT_CAP));
    let db_values: Vec<Option<String>> =
        updates.iter().map(|(_, e)| snapshot(&e.db_value)).collect();
    let cache_values: Vec<Option<String>> = updates
        .iter()
        .map(|(_, e)| snapshot(&e.cache_value))
        .collect();
    let diffs: Vec<&str> = updates.iter().map(|(_, e)| e.diff.as_str()).collect();

    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let rows: Vec<Id> = diesel::sql_query(
        "UPDATE inconsistencies AS i SET observations = i.observations + 1, \
         last_seen_at = GREATEST(i.last_seen_at, $1), \
         db_version = GREATEST(i.db_version, u.db_version), kind = u.kind, \
         cache_version = u.cache_version, db_value = u.db_value, cache_value = u.cache_value, \
         diff = u.diff \
         FROM unnest($2, $3, $4, $5, $6, $7, $8) \
              AS u(id, kind, db_version, cache_version, db_value, cache_value, diff) \
         WHERE i.id = u.id AND i.state = 'persistent' RETURNING i.id",
    )
    .bind::<Timestamptz, _>(at)
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<Text>, _>(kinds)
    .bind::<Array<Nullable<BigInt>>, _>(db_versions)
    .bind::<Array<Nullable<BigInt>>, _>(cache_versions)
    .bind::<Array<Nullable<Text>>, _>(db_values)
    .bind::<Array<Nullable<Text>>, _>(cache_values)
    .bind::<Array<Text>, _>(diffs)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

/// A Detected incident whose confirmation is overdue.
#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub struct Overdue {
    pub id: i64,
    pub cache_key: String,
    pub entity: String,
}

/// Detected incidents whose `confirm_due_at` passed more than `slack` ago (PostgreSQL's
/// clock), oldest first: what the confirmation backstop re-checks. One index scan
/// (`inconsistencies_detected_due`).
pub async fn overdue(
    conn: &mut AsyncPgConnection,
    slack: Duration,
    limit: i64,
) -> Result<Vec<Overdue>, DbError> {
    let slack = chrono::Duration::from_std(slack).unwrap_or(chrono::Duration::MAX);
    let now = super::now(conn).await?;
    Ok(t::table
        .filter(t::state.eq(State::Detected.as_str()))
        .filter(t::confirm_due_at.lt(now - slack))
        .order(t::confirm_due_at.asc())
        .limit(limit)
        .select((t::id, t::cache_key, t::entity))
        .load(conn)
        .await?)
}

/// Deletes up to `limit` incidents that closed more than `retention` ago (PostgreSQL's
/// clock). Returns how many went; callers repeat while it is `limit`.
pub async fn delete_closed_before(
    conn: &mut AsyncPgConnection,
    retention: Duration,
    limit: i64,
) -> Result<usize, DbError> {
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let now = super::now(conn).await?;
    let cutoff = now
        .checked_sub_signed(retention)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    // The partial index on resolved_at finds them; the LIMIT keeps each transaction short.
    Ok(diesel::sql_query(
        "DELETE FROM inconsistencies WHERE id IN \
         (SELECT id FROM inconsistencies WHERE resolved_at < $1 LIMIT $2)",
    )
    .bind::<Timestamptz, _>(cutoff)
    .bind::<BigInt, _>(limit)
    .execute(conn)
    .await?)
}

/// Filters for listing incidents, newest first.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub states: Vec<State>,
    pub key: Option<String>,
    pub entity: Option<String>,
    /// Keyset pagination: only ids below this one.
    pub before_id: Option<i64>,
    pub limit: i64,
}

pub async fn list(
    conn: &mut AsyncPgConnection,
    q: &ListQuery,
) -> Result<Vec<IncidentRow>, DbError> {
    let mut query = t::table
        .select(IncidentRow::as_select())
        .order(t::id.desc())
        .limit(q.limit)
        .into_boxed();
    if !q.states.is_empty() {
        query =
            query.filter(t::state.eq_any(q.states.iter().map(|s| s.as_str()).collect::<Vec<_>>()));
    }
    if let Some(key) = &q.key {
        query = query.filter(t::cache_key.eq(key.clone()));
    }
    if let Some(entity) = &q.entity {
        query = query.filter(t::entity.eq(entity.clone()));
    }
    if let Some(before) = q.before_id {
        query = query.filter(t::id.lt(before));
    }
    Ok(query.load(conn).await?)
}

/// Open incidents by (entity, state), read from the table so the gauge is right after a
/// restart.
pub async fn count_open(
    conn: &mut AsyncPgConnection,
) -> Result<HashMap<(String, String), i64>, DbError> {
    let rows: Vec<(String, String, i64)> = t::table
        .filter(is_open())
        .group_by((t::entity, t::state))
        .select((t::entity, t::state, diesel::dsl::count_star()))
        .load(conn)
        .await?;
    Ok(rows.into_iter().map(|(e, s, n)| ((e, s), n)).collect())
}

/// How many incidents match `q`'s filters (`states`, `key`, `entity`) in all, whatever page
/// (`before_id`, `limit`) it asks for: the total a paginated listing reports.
pub async fn count(conn: &mut AsyncPgConnection, q: &ListQuery) -> Result<i64, DbError> {
    let mut query = t::table.select(diesel::dsl::count_star()).into_boxed();
    if !q.states.is_empty() {
        query =
            query.filter(t::state.eq_any(q.states.iter().map(|s| s.as_str()).collect::<Vec<_>>()));
    }
    if let Some(key) = &q.key {
        query = query.filter(t::cache_key.eq(key.clone()));
    }
    if let Some(entity) = &q.entity {
        query = query.filter(t::entity.eq(entity.clone()));
    }
    Ok(query.get_result(conn).await?)
}
