//! `/stats`: the state of the whole deployment, read from the stores every process shares.
//!
//! Detection happens in the workers, so the API process's own counters (on `/metrics`) say
//! little about it. This reads what the workers leave behind: the incidents table in
//! PostgreSQL, the queues and the sweep round's record in Redis. Only `api_cache` is this
//! process's own.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use diesel::{
    sql_query,
    sql_types::{BigInt, Double, Nullable, Text},
    QueryableByName,
};
use diesel_async::RunQueryDsl;
use serde::Serialize;
use stalewatch_core::{
    db::{self, incidents},
    jobs::{CheckJob, ConfirmJob, Job, SloJob},
    queue,
    shards::Round,
};
use utoipa::ToSchema;

use crate::{error::ApiError, state::AppState};

/// How many of the most recently detected confirmed incidents time to confirm is taken over.
pub const RECENT_CONFIRMED: i64 = 1000;

#[derive(Debug, Serialize, ToSchema)]
pub struct Summary {
    pub open: Open,
    /// Incidents closed in the last hour and the last day, by how they closed: `resolved`
    /// (the key was fixed) or `transient` (it healed within the grace period).
    pub closed: Closed,
    pub time_to_confirm: TimeToConfirm,
    /// Jobs by queue.
    pub queues: BTreeMap<String, QueueDepth>,
    pub sweep: Sweep,
    pub api_cache: ApiCache,
}

#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Open {
    pub total: i64,
    /// By state: detected, confirmed, persistent.
    pub by_state: BTreeMap<String, i64>,
    /// By entity, then state.
    pub by_entity: BTreeMap<String, BTreeMap<String, i64>>,
}

#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Closed {
    pub last_hour: BTreeMap<String, i64>,
    pub last_day: BTreeMap<String, i64>,
}

/// From detection to confirmation, over the most recently detected confirmed incidents.
#[derive(Debug, Serialize, ToSchema)]
pub struct TimeToConfirm {
    /// How many incidents the figures are over (at most 1,000).
    pub incidents: i64,
    /// Null without incidents.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueDepth {
    /// Due and waiting for a worker.
    pub pending: u64,
    /// Waiting for their time (confirmations inside their grace period, retries).
    pub scheduled: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Sweep {
    /// The round in progress; null between rounds or with the sweep off.
    pub current_round: Option<RoundView>,
    /// The last round completed; null before the first.
    pub last_round: Option<RoundView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RoundView {
    pub id: u64,
    pub started_at: DateTime<Utc>,
    /// Null while in progress.
    pub ended_at: Option<DateTime<Utc>>,
    /// Each entity's primary-key ranges (and key-side parts): what workers sweep in parallel.
    pub shards: usize,
    pub shards_done: usize,
    /// Rows compared so far.
    pub rows: u64,
}

impl From<Round> for RoundView {
    fn from(r: Round) -> Self {
        let at = |ms: i64| Utc.timestamp_millis_opt(ms).single().unwrap_or_default();
        RoundView {
            id: r.id,
            started_at: at(r.started_ms),
            ended_at: r.ended_ms.map(at),
            shards: r.shards.len(),
            shards_done: r.done(),
            rows: r.rows(),
        }
    }
}

/// This API process's cache-aside reads since it started (each API process has its own).
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiCache {
    pub hit: u64,
    pub miss: u64,
    /// Redis failed; served from PostgreSQL.
    pub error: u64,
    /// hit / (hit + miss + error); null before the first read.
    pub hit_ratio: Option<f64>,
}

#[derive(QueryableByName)]
struct Closures {
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = BigInt)]
    last_hour: i64,
    #[diesel(sql_type = BigInt)]
    last_day: i64,
}

#[derive(QueryableByName)]
struct Percentiles {
    #[diesel(sql_type = BigInt)]
    incidents: i64,
    #[diesel(sql_type = Nullable<Double>)]
    p50: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    p99: Option<f64>,
}

/// Reads the summary. PostgreSQL or Redis unavailable: a 503, as on every route.
pub async fn read(state: &AppState) -> Result<Summary, ApiError> {
    let (open, closures, percentiles) = db::idempotent(&state.pool, async |conn| {
        let open = incidents::count_open(conn).await?;
        // resolved_at is indexed; a day of closures is what the count walks.
        let closures: Vec<Closures> = sql_query(
            "SELECT state, \
                count(*) FILTER (WHERE resolved_at > now() - interval '1 hour') AS last_hour, \
                count(*) AS last_day \
             FROM inconsistencies WHERE resolved_at > now() - interval '1 day' \
             GROUP BY state",
        )
        .load(conn)
        .await?;
        // Newest first by id (detection order), bounded: the primary key walked backwards.
        let percentiles: Percentiles = sql_query(
            "SELECT count(*) AS incidents, \
                percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50, \
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99 \
             FROM (SELECT (extract(epoch FROM confirmed_at - first_seen_at) * 1000)::float8 AS ms \
                   FROM inconsistencies WHERE confirmed_at IS NOT NULL \
                   ORDER BY id DESC LIMIT $1) recent",
        )
        .bind::<BigInt, _>(RECENT_CONFIRMED)
        .get_result(conn)
        .await?;
        Ok((open, closures, percentiles))
    })
    .await?;

    let mut summary_open = Open::default();
    for ((entity, st), n) in open {
        summary_open.total += n;
        *summary_open.by_state.entry(st.clone()).or_default() += n;
        *summary_open
            .by_entity
            .entry(entity)
            .or_default()
            .entry(st)
            .or_default() += n;
    }
    let mut closed = Closed::default();
    for c in closures {
        closed.last_hour.insert(c.state.clone(), c.last_hour);
        closed.last_day.insert(c.state, c.last_day);
    }

    let keys = state.cache.keys();
    let mut conn = state.queue_conn.clone();
    let mut queues = BTreeMap::new();
    for (name, config) in [
        (CheckJob::QUEUE, queue::config::<CheckJob>(keys, 1)),
        (ConfirmJob::QUEUE, queue::config::<ConfirmJob>(keys, 1)),
        (SloJob::QUEUE, queue::config::<SloJob>(keys, 1)),
    ] {
        let d = queue::depth(&mut conn, &config)
            .await
            .map_err(|e| ApiError::Unavailable(format!("reading the {name} queue: {e}")))?;
        queues.insert(
            name.to_string(),
            QueueDepth {
                pending: d.pending,
                scheduled: d.scheduled,
            },
        );
    }
    let sweep = Sweep {
        current_round: round(&mut conn, &keys.sweep_round()).await?,
        last_round: round(&mut conn, &keys.sweep_last_round()).await?,
    };

    let requests = &state.metrics.cache_requests;
    let count = |result: &str| requests.with_label_values(&[result]).get();
    let (hit, miss, error) = (count("hit"), count("miss"), count("error"));
    let reads = hit + miss + error;
    Ok(Summary {
        open: summary_open,
        closed,
        time_to_confirm: TimeToConfirm {
            incidents: percentiles.incidents,
            p50_ms: percentiles.p50,
            p99_ms: percentiles.p99,
        },
        queues,
        sweep,
        api_cache: ApiCache {
            hit,
            miss,
            error,
            hit_ratio: (reads > 0).then(|| hit as f64 / reads as f64),
        },
    })
}

/// A sweep round's record. One this version cannot read (another version's) shows as none:
/// the workers replace it the same way.
async fn round(
    conn: &mut redis::aio::ConnectionManager,
    key: &str,
) -> Result<Option<RoundView>, ApiError> {
    let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(key)
        .query_async(conn)
        .await
        .map_err(|e| ApiError::Unavailable(format!("reading the sweep round: {e}")))?;
    if fields.is_empty() {
        return Ok(None);
    }
    Ok(Round::parse(&fields).ok().map(RoundView::from))
}
