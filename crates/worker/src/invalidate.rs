//! Change-driven invalidation (`on_change = "invalidate"`): the capture reader publishes each
//! changed row's keys to the stream `<prefix>invalidations`; every worker consumes it in one
//! consumer group, UNLINKs the keys, then acknowledges (`stalewatch_core::invalidation` has
//! the contract).
//!
//! - The stream and its group are stalewatch's (REDIS_URL); the keys deleted are the watched
//!   cache's (CACHE_REDIS_URL, else the same Redis; on a cluster, one pipeline per primary and
//!   a pattern's SCAN on every primary), on a cache connection of the consumers' own.
//! - Reading, claiming what a dead consumer left pending, and dead-lettering are the shared
//!   stream mechanics (`crate::stream`): exclusive connections for the blocking reads, a
//!   thread and database connections of the consumers' own (on the worker's runtime they
//!   waited behind the check jobs that every change also queues). The capture reader moved
//!   off it for the same reason.
//! - The incident of each key is noted as rewritten by an invalidation before the UNLINK, so
//!   the check after the settle delay resolves it with cause `invalidation`.
//! - An entry's patterns (rules whose key ends in `*`) are deleted with `SCAN MATCH` and
//!   `UNLINK`, a page at a time, never `KEYS`: a scan does not block Redis, but it walks the
//!   whole keyspace, so a pattern costs about as much as the database is large. Repeats in
//!   one read are scanned once (a batched rule merges its changes' patterns too).
//! - An entry pending longer than `claim_idle` (its consumer died between reading and
//!   acknowledging) is claimed by another consumer; one delivered `MAX_DELIVERIES` times, or
//!   unreadable, goes to `<prefix>invalidations:dead` with the reason (`crate::stream`).

use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_redis::Pool;
use redis::{streams::StreamId, AsyncCommands};
use stalewatch_core::{
    cache::{self, Cache},
    db::incidents,
    incident::Cause,
    invalidation::{Entry, FIELD, GROUP, MAX_DELIVERIES, MAX_LEN},
    slots::ScanAt,
};
use tokio_util::sync::CancellationToken;

use crate::{
    handlers::Ctx,
    stream::{self, Counters, Group},
};

/// Entries per read. Under load a read takes up to this many at
/// once, and each read costs one database round trip and one Redis round trip whatever its
/// size: 100 held one consumer to about 19,000 changes/s (docs/BENCHMARKS.md, invalidate).
const READ_COUNT: usize = 1000;
/// Keys a pattern delete asks SCAN for per call (a hint; it is also the most UNLINKed at once).
const SCAN_COUNT: usize = 1000;

/// Appends `entries` to the stream in one pipeline. Called by the capture reader before it
/// acknowledges the slot.
pub async fn publish(ctx: &Ctx, entries: &[Entry]) -> anyhow::Result<()> {
    let stream = ctx.keys().invalidations();
    let mut pipe = redis::pipe();
    for e in entries {
        pipe.cmd("XADD")
            .arg(&stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(MAX_LEN)
            .arg("*")
            .arg(FIELD)
            .arg(e.to_json())
            .ignore();
    }
    let mut conn = ctx.queue_conn.clone();
    pipe.query_async::<()>(&mut conn)
        .await
        .context("publishing invalidations")?;
    ctx.metrics()
        .invalidations_published
        .inc_by(entries.len() as u64);
    Ok(())
}

/// Runs `consumers` consumers until `shutdown`, each restarted with backoff on failure, on
/// threads of their own (up to 4) with a database pool of their own on `database_url`.
pub async fn run(
    ctx: Ctx,
    redis: redis::ConnectionInfo,
    cache: cache::Target,
    database_url: String,
    consumers: usize,
    claim_idle: Duration,
    shutdown: CancellationToken,
) {
    stream::on_own_runtime(
        "invalidate",
        ctx,
        database_url,
        consumers,
        consumers,
        move |mut ctx| async move {
            // The watched cache, where the keys are deleted, on a connection this runtime
            // drives too.
            let keys = ctx.keys().clone();
            match cache::open(&cache, cache::SHARED).await {
                Ok(conn) => ctx.checker.cache = Cache::new(conn, keys),
                Err(e) => {
                    tracing::error!(error = %e, "invalidation consumers not started: no connection to the watched cache");
                    return;
                }
            }
            consume_all(ctx, redis, consumers, claim_idle, shutdown).await
        },
    )
    .await
}

/// The invalidation stream's group, and its metrics.
fn group(ctx: &Ctx, claim_idle: Duration) -> Group {
    let metrics = ctx.metrics();
    Group {
        what: "invalidation",
        stream: ctx.keys().invalidations(),
        dead: ctx.keys().invalidations_dead(),
        group: GROUP,
        field: FIELD,
        max_deliveries: MAX_DELIVERIES,
        claim_idle,
        counters: Counters {
            reclaimed: metrics.invalidations_reclaimed.clone(),
            dead: metrics.invalidations_dead.clone(),
            length: metrics.invalidation_stream_length.clone(),
            pending: metrics.invalidations_pending.clone(),
        },
    }
}

async fn consume_all(
    ctx: Ctx,
    redis: redis::ConnectionInfo,
    consumers: usize,
    claim_idle: Duration,
    shutdown: CancellationToken,
) {
    let pool = match stream::pool(redis, consumers) {
        Ok(pool) => pool,
        Err(e) => {
            tracing::error!(error = %e, "invalidation consumers not started: bad REDIS_URL");
            return;
        }
    };
    let group = group(&ctx, claim_idle);
    let stop = shutdown.clone();
    stream::supervise("invalidation", consumers, shutdown, move || {
        let (ctx, pool, group, stop) = (ctx.clone(), pool.clone(), group.clone(), stop.clone());
        async move { consume(&ctx, &pool, &group, &stop).await }
    })
    .await
}

/// One consumer: reads new entries, and now and then claims entries others left pending.
async fn consume(
    ctx: &Ctx,
    pool: &Pool,
    group: &Group,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let name = stream::consumer_name();
    let mut conn = pool.get().await.context("a connection for the consumer")?;
    stream::create_group(&mut conn, group).await?;
    let mut claimed_at = Instant::now();
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        for (_, records) in stream::read(&mut conn, &[group], &name, READ_COUNT).await? {
            handle(ctx, &mut conn, group, records).await?;
        }
        if claimed_at.elapsed() >= stream::CLAIM_EVERY {
            claimed_at = Instant::now();
            let found = stream::reclaim(&mut conn, group, &name, READ_COUNT).await?;
            for (record, times) in found.exhausted {
                let reason = format!("delivered {times} times without being acknowledged");
                stream::dead_letter(&mut conn, group, &record, &reason).await?;
            }
            if !found.claimed.is_empty() {
                handle(ctx, &mut conn, group, found.claimed).await?;
            }
            stream::sample(&mut conn, group).await?;
        }
    }
}

/// Deletes the keys of `records`, then acknowledges them. Unreadable records go to the
/// dead-letter stream.
async fn handle(
    ctx: &Ctx,
    conn: &mut deadpool_redis::Connection,
    group: &Group,
    records: Vec<StreamId>,
) -> anyhow::Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let mut entries = Vec::new();
    let mut ids = Vec::new();
    for record in records {
        match stream::payload(group, &record).and_then(Entry::from_json) {
            Ok(entry) => entries.push(entry),
            Err(reason) => stream::dead_letter(conn, group, &record, &reason).await?,
        }
        ids.push(record.id);
    }
    let mut keys: Vec<String> = entries.iter().flat_map(|e| e.keys.clone()).collect();
    keys.sort_unstable();
    keys.dedup();
    if !keys.is_empty() {
        // Noted first, so whichever check sees the key gone credits the invalidation.
        let mut db = ctx.checker.pool.get().await?;
        incidents::mark_rewrite(&mut db, &keys, Cause::Invalidation).await?;
    }
    let mut patterns: Vec<&str> = entries
        .iter()
        .flat_map(|e| e.patterns.iter().map(String::as_str))
        .collect();
    patterns.sort_unstable();
    patterns.dedup();
    // The keys are the watched cache's, the stream stalewatch's own Redis's (one Redis
    // unless CACHE_REDIS_URL says otherwise): the UNLINKs, then the XACK, in that order.
    if !keys.is_empty() {
        ctx.checker
            .cache
            .unlink_many(&keys)
            .await
            .context("deleting invalidated keys")?;
    }
    for pattern in patterns {
        delete_matching(ctx, pattern).await?;
    }
    // The keys are gone now, which is what the delay measures; the acknowledgement below
    // only tells the group.
    let deleted_us = chrono::Utc::now().timestamp_micros();
    let _: () = conn
        .xack(&group.stream, GROUP, &ids)
        .await
        .context("acknowledging invalidations")?;
    let metrics = ctx.metrics();
    metrics.keys_invalidated.inc_by(keys.len() as u64);
    for e in &entries {
        let delay = (deleted_us - e.commit_time_us).max(0) as f64 / 1e6;
        metrics.invalidation_delay.observe(delay);
    }
    Ok(())
}

/// Deletes every key matching `pattern` in the watched cache (on every primary of a cluster):
/// `SCAN MATCH` a page at a time,
/// each page's keys noted on their open incidents (a pattern may cover tracked keys too) and
/// `UNLINK`ed.
async fn delete_matching(ctx: &Ctx, pattern: &str) -> anyhow::Result<()> {
    let cache = &ctx.checker.cache;
    let mut at = ScanAt::default();
    let mut removed: u64 = 0;
    loop {
        let (found, next) = cache
            .scan(&at, pattern, SCAN_COUNT)
            .await
            .with_context(|| format!("scanning for {pattern}"))?;
        if !found.is_empty() {
            let mut db = ctx.checker.pool.get().await?;
            incidents::mark_rewrite(&mut db, &found, Cause::Invalidation).await?;
            drop(db);
            removed += cache
                .unlink_many(&found)
                .await
                .with_context(|| format!("deleting the keys of {pattern}"))?;
        }
        match next {
            Some(next) => at = next,
            None => break,
        }
    }
    let metrics = ctx.metrics();
    metrics.invalidation_pattern_scans.inc();
    metrics.invalidation_pattern_keys.inc_by(removed);
    metrics.keys_invalidated.inc_by(removed);
    Ok(())
}
