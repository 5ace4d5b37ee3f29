//! Change-driven invalidation (`on_change = "invalidate"`): the capture reader publishes each
//! changed row's keys to the stream `<prefix>invalidations`; every worker consumes it in one
//! consumer group, UNLINKs the keys, then acknowledges (`stalewatch_core::invalidation` has
//! the contract).
//!
//! - The stream and its group are stalewatch's (REDIS_URL); the keys deleted are the watched
//!   cache's (CACHE_REDIS_URL, else the same Redis; on a cluster, one pipeline per primary and
//!   a pattern's SCAN on every primary), on a cache connection of the consumers' own.
//! - A blocking `XREADGROUP` holds its connection for up to a second, so consumers read on
//!   exclusive connections from a deadpool-redis pool, never on the shared multiplexed one
//!   that request paths use.
//! - Consumers run on threads of their own, with database connections of their own: on the
//!   worker's runtime they waited behind the check jobs that every change also queues (a
//!   batch of checks holds a thread for milliseconds), and an UPDATE of 100,000 rows was
//!   invalidated at about 25,000 changes/s instead of about 100,000 with the checks held off
//!   (docs/BENCHMARKS.md, invalidate). The capture reader moved off it for the same reason.
//! - The incident of each key is noted as rewritten by an invalidation before the UNLINK, so
//!   the check after the settle delay resolves it with cause `invalidation`.
//! - An entry's patterns (rules whose key ends in `*`) are deleted with `SCAN MATCH` and
//!   `UNLINK`, a page at a time, never `KEYS`: a scan does not block Redis, but it walks the
//!   whole keyspace, so a pattern costs about as much as the database is large. Repeats in
//!   one read are scanned once (a batched rule merges its changes' patterns too).
//! - An entry pending longer than `claim_idle` (its consumer died between reading and
//!   acknowledging) is claimed by another consumer; one delivered `MAX_DELIVERIES` times, or
//!   unreadable, goes to `<prefix>invalidations:dead` with the reason, so the group never
//!   sticks on it.

use std::time::{Duration, Instant};

use anyhow::Context;
use backon::Retryable;
use deadpool_redis::{Manager, Pool, Runtime};
use redis::{
    streams::{StreamId, StreamPendingCountReply, StreamReadOptions, StreamReadReply},
    AsyncCommands,
};
use stalewatch_core::{
    cache::{self, Cache},
    db::{self, incidents},
    incident::Cause,
    invalidation::{Entry, FIELD, GROUP, MAX_DELIVERIES, MAX_LEN},
    slots::ScanAt,
};
use tokio_util::sync::CancellationToken;

use crate::{handlers::Ctx, supervise};

/// Entries per read, and how long a read blocks. Under load a read takes up to this many at
/// once, and each read costs one database round trip and one Redis round trip whatever its
/// size: 100 held one consumer to about 19,000 changes/s (docs/BENCHMARKS.md, invalidate).
const READ_COUNT: usize = 1000;
const BLOCK: Duration = Duration::from_secs(1);
/// How often a consumer looks for entries left pending by others.
const CLAIM_EVERY: Duration = Duration::from_secs(2);
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
    let thread = std::thread::Builder::new()
        .name("invalidate".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(consumers.clamp(1, 4))
                .thread_name("invalidate")
                .enable_all()
                .build()
                .context("starting the invalidation runtime")?;
            runtime.block_on(async move {
                let mut ctx = ctx;
                // Connections made on this runtime are driven by it: the worker's pool is
                // driven by the worker's runtime, where the check jobs are.
                ctx.checker.pool = db::pool(&database_url, consumers)
                    .context("a database pool for the invalidation consumers")?;
                // The same for the watched cache, where the keys are deleted.
                let keys = ctx.keys().clone();
                let conn = cache::open(&cache, cache::SHARED)
                    .await
                    .context("a connection to the watched cache for the invalidation consumers")?;
                ctx.checker.cache = Cache::new(conn, keys);
                consume_all(ctx, redis, consumers, claim_idle, shutdown).await;
                anyhow::Ok(())
            })
        });
    let joined = match thread {
        Ok(thread) => tokio::task::spawn_blocking(move || thread.join()).await,
        Err(e) => {
            tracing::error!(error = %e, "invalidation consumers not started: no thread");
            return;
        }
    };
    match joined {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            tracing::error!(error = format!("{e:#}"), "invalidation consumers stopped")
        }
        Ok(Err(_)) | Err(_) => tracing::error!("invalidation consumers stopped: a panic"),
    }
}

async fn consume_all(
    ctx: Ctx,
    redis: redis::ConnectionInfo,
    consumers: usize,
    claim_idle: Duration,
    shutdown: CancellationToken,
) {
    // A blocking read waits up to BLOCK for an entry: the connection's response time-out
    // must outlast it (the default, 500 ms, ended every idle read with an error).
    let connection = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(BLOCK + Duration::from_secs(5)));
    let pool = Manager::new_with_config(redis, connection)
        .map_err(anyhow::Error::from)
        .and_then(|manager| {
            Pool::builder(manager)
                .max_size(consumers)
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(anyhow::Error::from)
        });
    let pool = match pool {
        Ok(pool) => pool,
        Err(e) => {
            tracing::error!(error = %e, "invalidation consumers not started: bad REDIS_URL");
            return;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..consumers {
        let (ctx, pool, shutdown) = (ctx.clone(), pool.clone(), shutdown.clone());
        tasks.spawn(async move {
            let once = || {
                let (ctx, pool, shutdown) = (ctx.clone(), pool.clone(), shutdown.clone());
                async move { consume(&ctx, &pool, claim_idle, &shutdown).await }
            };
            let result = once
                .retry(supervise::restart_backoff())
                .when(|_| !shutdown.is_cancelled())
                .notify(|e, after| {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        ?after,
                        "invalidation consumer stopped; restarting"
                    );
                })
                .await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "invalidation consumer stopped during shutdown");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// One consumer: reads new entries, and now and then claims entries others left pending.
async fn consume(
    ctx: &Ctx,
    pool: &Pool,
    claim_idle: Duration,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let stream = ctx.keys().invalidations();
    let name = format!(
        "{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut conn = pool.get().await.context("a connection for the consumer")?;
    let created: redis::RedisResult<()> = conn.xgroup_create_mkstream(&stream, GROUP, "0").await;
    if let Err(e) = created {
        if e.code() != Some("BUSYGROUP") {
            return Err(e).context("creating the invalidation consumer group");
        }
    }
    let options = StreamReadOptions::default()
        .group(GROUP, &name)
        .count(READ_COUNT)
        .block(BLOCK.as_millis() as usize);
    let mut claimed_at = Instant::now();
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let reply: StreamReadReply = conn
            .xread_options(&[&stream], &[">"], &options)
            .await
            .context("reading the invalidation stream")?;
        for key in reply.keys {
            handle(ctx, &mut conn, &stream, key.ids).await?;
        }
        if claimed_at.elapsed() >= CLAIM_EVERY {
            claimed_at = Instant::now();
            reclaim(ctx, &mut conn, &stream, &name, claim_idle).await?;
        }
    }
}

/// Deletes the keys of `records`, then acknowledges them. Unreadable records go to the
/// dead-letter stream.
async fn handle(
    ctx: &Ctx,
    conn: &mut deadpool_redis::Connection,
    stream: &str,
    records: Vec<StreamId>,
) -> anyhow::Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let mut entries = Vec::new();
    let mut ids = Vec::new();
    for record in records {
        let parsed = match record.map.get(FIELD) {
            Some(redis::Value::BulkString(bytes)) => Entry::from_json(bytes),
            _ => Err(format!("no {FIELD:?} field")),
        };
        match parsed {
            Ok(entry) => entries.push(entry),
            Err(reason) => dead_letter(ctx, conn, stream, &record, &reason).await?,
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
    let _: () = conn
        .xack(stream, GROUP, &ids)
        .await
        .context("acknowledging invalidations")?;
    let metrics = ctx.metrics();
    metrics.keys_invalidated.inc_by(keys.len() as u64);
    let now_us = chrono::Utc::now().timestamp_micros();
    for e in &entries {
        let delay = (now_us - e.commit_time_us).max(0) as f64 / 1e6;
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

/// Entries pending for longer than `claim_idle`: dead-lettered after `MAX_DELIVERIES`,
/// otherwise claimed by this consumer and handled. Also samples the stream's length and
/// pending count.
async fn reclaim(
    ctx: &Ctx,
    conn: &mut deadpool_redis::Connection,
    stream: &str,
    name: &str,
    claim_idle: Duration,
) -> anyhow::Result<()> {
    let idle_ms = claim_idle.as_millis() as u64;
    let pending: StreamPendingCountReply = redis::cmd("XPENDING")
        .arg(stream)
        .arg(GROUP)
        .arg("IDLE")
        .arg(idle_ms)
        .arg("-")
        .arg("+")
        .arg(READ_COUNT)
        .query_async(&mut **conn)
        .await
        .context("listing pending invalidations")?;
    let mut claim = Vec::new();
    for p in pending.ids {
        if p.times_delivered as u64 >= MAX_DELIVERIES {
            let records: Vec<StreamId> = {
                let range: redis::streams::StreamRangeReply =
                    conn.xrange(stream, &p.id, &p.id).await?;
                range.ids
            };
            let reason = format!(
                "delivered {} times without being acknowledged",
                p.times_delivered
            );
            match records.into_iter().next() {
                Some(record) => dead_letter(ctx, conn, stream, &record, &reason).await?,
                None => {
                    // Trimmed away meanwhile: nothing left to delete or keep.
                    let _: () = conn.xack(stream, GROUP, &[&p.id]).await?;
                }
            }
        } else {
            claim.push(p.id);
        }
    }
    if !claim.is_empty() {
        let claimed: redis::streams::StreamClaimReply = conn
            .xclaim(stream, GROUP, name, idle_ms, &claim)
            .await
            .context("claiming pending invalidations")?;
        ctx.metrics()
            .invalidations_reclaimed
            .inc_by(claimed.ids.len() as u64);
        tracing::info!(
            entries = claimed.ids.len(),
            "claimed invalidations a consumer left pending"
        );
        handle(ctx, conn, stream, claimed.ids).await?;
    }
    let length: u64 = conn.xlen(stream).await?;
    let summary: redis::streams::StreamPendingReply = conn.xpending(stream, GROUP).await?;
    ctx.metrics().invalidation_stream_length.set(length as i64);
    ctx.metrics()
        .invalidations_pending
        .set(summary.count() as i64);
    Ok(())
}

/// Moves `record` to the dead-letter stream with `reason`, and acknowledges it.
async fn dead_letter(
    ctx: &Ctx,
    conn: &mut deadpool_redis::Connection,
    stream: &str,
    record: &StreamId,
    reason: &str,
) -> anyhow::Result<()> {
    let original = match record.map.get(FIELD) {
        Some(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
        other => format!("{other:?}"),
    };
    let _: () = redis::cmd("XADD")
        .arg(ctx.keys().invalidations_dead())
        .arg("MAXLEN")
        .arg("~")
        .arg(MAX_LEN)
        .arg("*")
        .arg("id")
        .arg(&record.id)
        .arg("reason")
        .arg(reason)
        .arg(FIELD)
        .arg(original)
        .query_async(&mut **conn)
        .await
        .context("dead-lettering an invalidation")?;
    let _: () = conn.xack(stream, GROUP, &[&record.id]).await?;
    ctx.metrics().invalidations_dead.inc();
    tracing::warn!(id = %record.id, reason, "invalidation entry dead-lettered");
    Ok(())
}
