//! Consuming a Redis Stream in a consumer group: the mechanics change-driven invalidation
//! (`invalidate`) and dual-write ingestion (`ingest`) share. What an entry means, and what
//! is done with it, is theirs; reading, claiming, dead-lettering and counting are here.
//!
//! - A blocking `XREADGROUP` holds its connection for up to [`BLOCK`], so consumers read on
//!   exclusive connections from a deadpool-redis pool ([`pool`]), never on the shared
//!   multiplexed one that request paths use.
//! - Consumers run on a thread of their own ([`on_own_runtime`]), with database connections of
//!   their own: on the worker's runtime they waited behind the check jobs (a batch of checks
//!   holds a thread for milliseconds), and an UPDATE of 100,000 rows was invalidated at about
//!   25,000 changes/s instead of about 100,000 with the checks held off (docs/BENCHMARKS.md,
//!   invalidate).
//! - An entry pending longer than the group's `claim_idle` (its consumer died between reading
//!   and acknowledging) is claimed by another consumer ([`reclaim`]): `XPENDING ... IDLE`, then
//!   `XCLAIM` with the same minimum idle time, so two consumers never both take it. One
//!   delivered `max_deliveries` times goes to the dead-letter stream with the reason
//!   ([`dead_letter`]), so the group never sticks on it. (Not `XAUTOCLAIM`: it does not
//!   report delivery counts, which the dead-lettering needs; docs/change-capture.md.)

use std::{future::Future, time::Duration};

use anyhow::Context;
use backon::Retryable;
use deadpool_redis::{Connection, Manager, Pool, Runtime};
use prometheus::{IntCounter, IntGauge};
use redis::{
    streams::{
        StreamClaimReply, StreamId, StreamPendingCountReply, StreamPendingReply, StreamRangeReply,
        StreamReadOptions, StreamReadReply,
    },
    AsyncCommands,
};
use stalewatch_core::db;
use tokio_util::sync::CancellationToken;

use crate::{handlers::Ctx, supervise};

/// How long a read blocks waiting for entries.
pub const BLOCK: Duration = Duration::from_secs(1);
/// How often a consumer looks for entries left pending by others.
pub const CLAIM_EVERY: Duration = Duration::from_secs(2);
/// Dead-letter streams are trimmed to about this many entries (`MAXLEN ~`).
const DEAD_MAX_LEN: usize = 1_000_000;

/// One stream consumed by a group, and what is counted of it.
#[derive(Clone)]
pub struct Group {
    /// What its entries are, for log lines: "invalidation", "ingest record".
    pub what: &'static str,
    pub stream: String,
    /// Where entries that cannot be handled go, with the reason.
    pub dead: String,
    pub group: &'static str,
    /// The entry's field holding its payload.
    pub field: &'static str,
    /// An entry delivered this many times without being acknowledged is dead-lettered.
    pub max_deliveries: u64,
    /// How long an entry stays pending with its consumer before another claims it.
    pub claim_idle: Duration,
    pub counters: Counters,
}

/// The metrics of one group.
#[derive(Clone)]
pub struct Counters {
    pub reclaimed: IntCounter,
    pub dead: IntCounter,
    pub length: IntGauge,
    pub pending: IntGauge,
}

/// Runs `consumers(ctx)` on a thread of its own, with a runtime of up to `threads` threads
/// and a database pool of `pool_size` connections on `database_url` in `ctx`, until it
/// returns. `name` names the thread and the log lines.
pub async fn on_own_runtime<F, Fut>(
    name: &'static str,
    ctx: Ctx,
    database_url: String,
    threads: usize,
    pool_size: usize,
    consumers: F,
) where
    F: FnOnce(Ctx) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.clamp(1, 4))
                .thread_name(name)
                .enable_all()
                .build()
                .with_context(|| format!("starting the {name} runtime"))?;
            runtime.block_on(async move {
                let mut ctx = ctx;
                // Connections made on this runtime are driven by it: the worker's pool is
                // driven by the worker's runtime, where the check jobs are.
                ctx.checker.pool = db::pool(&database_url, pool_size)
                    .with_context(|| format!("a database pool for the {name} consumers"))?;
                consumers(ctx).await;
                anyhow::Ok(())
            })
        });
    let joined = match thread {
        Ok(thread) => tokio::task::spawn_blocking(move || thread.join()).await,
        Err(e) => {
            tracing::error!(error = %e, "{name} consumers not started: no thread");
            return;
        }
    };
    match joined {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            tracing::error!(error = format!("{e:#}"), "{name} consumers stopped")
        }
        Ok(Err(_)) | Err(_) => tracing::error!("{name} consumers stopped: a panic"),
    }
}

/// A pool of `size` exclusive connections to `redis`, for blocking reads.
pub fn pool(redis: redis::ConnectionInfo, size: usize) -> anyhow::Result<Pool> {
    // A blocking read waits up to BLOCK for an entry: the connection's response time-out
    // must outlast it (the default, 500 ms, ended every idle read with an error).
    let connection = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(BLOCK + Duration::from_secs(5)));
    let manager = Manager::new_with_config(redis, connection)?;
    Ok(Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .build()?)
}

/// Runs `consumers` copies of `consume` until `shutdown`, each restarted with backoff when it
/// fails (a Redis or database outage).
pub async fn supervise<F, Fut>(
    what: &'static str,
    consumers: usize,
    shutdown: CancellationToken,
    consume: F,
) where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..consumers {
        let (consume, shutdown) = (consume.clone(), shutdown.clone());
        tasks.spawn(async move {
            let result = consume
                .retry(supervise::restart_backoff())
                .when(|_| !shutdown.is_cancelled())
                .notify(|e, after| {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        ?after,
                        "{what} consumer stopped; restarting"
                    );
                })
                .await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "{what} consumer stopped during shutdown");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// A consumer name no other consumer has used: the process and a random part.
pub fn consumer_name() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Creates the group (and the stream) unless it exists; a new group starts at the stream's
/// first entry, so entries appended before any worker ran are consumed too.
pub async fn create_group(conn: &mut Connection, group: &Group) -> anyhow::Result<()> {
    let created: redis::RedisResult<()> = conn
        .xgroup_create_mkstream(&group.stream, group.group, "0")
        .await;
    match created {
        Err(e) if e.code() != Some("BUSYGROUP") => Err(e).with_context(|| {
            format!(
                "creating the consumer group {} of {}",
                group.group, group.stream
            )
        }),
        _ => Ok(()),
    }
}

/// New entries of `groups` (streams read by one group name), up to `count` of each, waiting
/// up to [`BLOCK`] for the first: each stream's entries with the index of its group.
pub async fn read(
    conn: &mut Connection,
    groups: &[&Group],
    consumer: &str,
    count: usize,
) -> anyhow::Result<Vec<(usize, Vec<StreamId>)>> {
    let Some(first) = groups.first() else {
        return Ok(Vec::new());
    };
    let options = StreamReadOptions::default()
        .group(first.group, consumer)
        .count(count)
        .block(BLOCK.as_millis() as usize);
    let streams: Vec<&str> = groups.iter().map(|g| g.stream.as_str()).collect();
    let news: Vec<&str> = vec![">"; groups.len()];
    let reply: StreamReadReply = conn
        .xread_options(&streams, &news, &options)
        .await
        .with_context(|| format!("reading {}", streams.join(", ")))?;
    Ok(reply
        .keys
        .into_iter()
        .filter_map(|k| {
            let i = groups.iter().position(|g| g.stream == k.key)?;
            Some((i, k.ids))
        })
        .collect())
}

/// What [`reclaim`] found pending for longer than the group's `claim_idle`.
pub struct Reclaimed {
    /// Claimed by this consumer: to be handled as new ones.
    pub claimed: Vec<StreamId>,
    /// Delivered `max_deliveries` times already, with that count: to be dead-lettered.
    pub exhausted: Vec<(StreamId, usize)>,
}

/// Entries of `group` pending for longer than its `claim_idle`, up to `count`: those
/// delivered too often to be dead-lettered, the others claimed by `consumer`.
pub async fn reclaim(
    conn: &mut Connection,
    group: &Group,
    consumer: &str,
    count: usize,
) -> anyhow::Result<Reclaimed> {
    let idle_ms = group.claim_idle.as_millis() as u64;
    let pending: StreamPendingCountReply = redis::cmd("XPENDING")
        .arg(&group.stream)
        .arg(group.group)
        .arg("IDLE")
        .arg(idle_ms)
        .arg("-")
        .arg("+")
        .arg(count)
        .query_async(&mut **conn)
        .await
        .with_context(|| format!("listing pending entries of {}", group.stream))?;
    let mut claim = Vec::new();
    let mut exhausted = Vec::new();
    for p in pending.ids {
        if p.times_delivered as u64 >= group.max_deliveries {
            let range: StreamRangeReply = conn.xrange(&group.stream, &p.id, &p.id).await?;
            match range.ids.into_iter().next() {
                Some(record) => exhausted.push((record, p.times_delivered)),
                None => {
                    // Trimmed away meanwhile: nothing left to handle or keep.
                    let _: () = conn.xack(&group.stream, group.group, &[&p.id]).await?;
                }
            }
        } else {
            claim.push(p.id);
        }
    }
    let mut claimed = Vec::new();
    if !claim.is_empty() {
        let reply: StreamClaimReply = conn
            .xclaim(&group.stream, group.group, consumer, idle_ms, &claim)
            .await
            .with_context(|| format!("claiming pending entries of {}", group.stream))?;
        group.counters.reclaimed.inc_by(reply.ids.len() as u64);
        if !reply.ids.is_empty() {
            tracing::info!(
                entries = reply.ids.len(),
                stream = %group.stream,
                "claimed {} entries a consumer left pending",
                group.what
            );
        }
        claimed = reply.ids;
    }
    Ok(Reclaimed { claimed, exhausted })
}

/// Samples the stream's length and the group's pending count into the group's gauges.
pub async fn sample(conn: &mut Connection, group: &Group) -> anyhow::Result<()> {
    let length: u64 = conn.xlen(&group.stream).await?;
    let summary: StreamPendingReply = conn.xpending(&group.stream, group.group).await?;
    group.counters.length.set(length as i64);
    group.counters.pending.set(summary.count() as i64);
    Ok(())
}

/// The payload of `record`: its group's field, as bytes.
pub fn payload<'r>(group: &Group, record: &'r StreamId) -> Result<&'r [u8], String> {
    match record.map.get(group.field) {
        Some(redis::Value::BulkString(bytes)) => Ok(bytes),
        _ => Err(format!("no {:?} field", group.field)),
    }
}

/// Moves `record` to the group's dead-letter stream with `reason` (fields `id`, `reason` and
/// the payload's), and acknowledges it.
pub async fn dead_letter(
    conn: &mut Connection,
    group: &Group,
    record: &StreamId,
    reason: &str,
) -> anyhow::Result<()> {
    let original = match record.map.get(group.field) {
        Some(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
        other => format!("{other:?}"),
    };
    let mut pipe = redis::pipe();
    pipe.cmd("XADD")
        .arg(&group.dead)
        .arg("MAXLEN")
        .arg("~")
        .arg(DEAD_MAX_LEN)
        .arg("*")
        .arg("id")
        .arg(&record.id)
        .arg("reason")
        .arg(reason)
        .arg(group.field)
        .arg(original)
        .ignore();
    pipe.cmd("XACK")
        .arg(&group.stream)
        .arg(group.group)
        .arg(&record.id)
        .ignore();
    pipe.query_async::<()>(&mut **conn)
        .await
        .with_context(|| format!("dead-lettering an entry of {}", group.stream))?;
    group.counters.dead.inc();
    tracing::warn!(id = %record.id, stream = %group.stream, reason, "{} dead-lettered", group.what);
    Ok(())
}
