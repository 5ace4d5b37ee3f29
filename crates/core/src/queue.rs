//! The apalis-redis queues: configuration, pushing jobs, and the upkeep apalis-redis 1.0 does
//! not do for itself (docs/apalis-redis.md):
//! - due jobs are promoted in bounded chunks, because its own fetch promotes every due job in
//!   one Lua `unpack` and fails once more than about 8,000 are due;
//! - finished jobs are deleted, because it keeps every one of them forever.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis::prelude::TaskBuilder;
use apalis_redis::{Config as QueueConfig, RedisTask};
use chrono::{DateTime, Utc};
use redis::{aio::ConnectionManager, Script};

use crate::jobs::Job;
use crate::keys::Keys;
use crate::metrics::Metrics;

/// How often a worker proves it is alive, and how many beats it may miss before its
/// in-flight jobs are handed to another worker (2 s x 3: a crashed worker's jobs run again
/// after about 6 s; apalis's defaults made that 5 minutes).
pub const HEARTBEAT: Duration = Duration::from_secs(2);
pub const MISSED_HEARTBEATS: usize = 3;

/// The most due jobs moved from the scheduled set to the active list in one script call.
const PROMOTE_CHUNK: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue Redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("could not push {job} jobs: {source}")]
    Push {
        job: &'static str,
        source: apalis_redis::Error,
    },
    #[error("could not encode a {job} job: {source}")]
    Encode {
        job: &'static str,
        source: serde_json::Error,
    },
}

/// The apalis-redis configuration of `J`'s queue.
pub fn config<J: Job>(keys: &Keys, batch_size: usize) -> QueueConfig {
    QueueConfig::default()
        .queue(keys.queue(J::QUEUE))
        .batch_size(batch_size)
        .heartbeat_interval(HEARTBEAT)
        .missed_heartbeats(MISSED_HEARTBEATS)
        // Nobody subscribes to the per-job pub/sub events; publishing them costs a command each.
        .emit_events(false)
}

/// A connection for apalis. Longer response timeout than the cache's: apalis-redis ends its
/// worker on any Redis error, and a 2 s pause already killed it with the default 500 ms.
/// `redis` as for `cache::connect`.
pub async fn connect(
    redis: impl crate::tls::RedisTarget,
) -> Result<ConnectionManager, redis::RedisError> {
    let client = crate::tls::redis_client(redis)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    ConnectionManager::new_with_config(client, config).await
}

/// Forgets worker `name` of the queue with namespace `ns` (`Keys::queue`). apalis-redis
/// registers every worker (a member of `{ns}:workers` scored by its last heartbeat, and a hash
/// `{ns}:workers:metadata:{name}`) and never removes either, so every restart of a worker and
/// every replica a deployment ever ran would stay in Redis for good.
pub async fn forget_worker(
    conn: &mut ConnectionManager,
    ns: &str,
    name: &str,
) -> Result<(), redis::RedisError> {
    redis::pipe()
        .zrem(format!("{ns}:workers"), name)
        .ignore()
        .del(format!("{ns}:workers:metadata:{name}"))
        .ignore()
        .query_async(conn)
        .await
}

/// Forgets the workers of `ns` not heard from for `idle`: the ones that died without
/// [`forget_worker`] (killed, or their host lost). Returns how many.
pub async fn forget_idle_workers(
    conn: &mut ConnectionManager,
    ns: &str,
    idle: Duration,
) -> Result<usize, redis::RedisError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let cutoff = now.saturating_sub(idle).as_secs();
    let workers = format!("{ns}:workers");
    let names: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(&workers)
        .arg("-inf")
        .arg(cutoff)
        .arg("LIMIT")
        .arg(0)
        .arg(1000)
        .query_async(conn)
        .await?;
    if names.is_empty() {
        return Ok(0);
    }
    let mut pipe = redis::pipe();
    pipe.zrem(&workers, &names).ignore();
    for name in &names {
        pipe.del(format!("{workers}:metadata:{name}")).ignore();
    }
    pipe.query_async::<()>(conn).await?;
    Ok(names.len())
}

/// apalis schedules at whole seconds, rounding down. Rounding down here too, a job runs at
/// most a second before `at`; handlers that must not run early wait out the rest.
pub fn run_at_secs(at: DateTime<Utc>) -> u64 {
    at.timestamp().max(0) as u64
}

/// Pushes jobs in one script call; `None` runs as soon as possible.
pub async fn push<J: Job>(
    conn: &mut ConnectionManager,
    keys: &Keys,
    jobs: Vec<(J, Option<DateTime<Utc>>)>,
) -> Result<(), QueueError> {
    if jobs.is_empty() {
        return Ok(());
    }
    let tasks = jobs
        .into_iter()
        .map(|(job, at)| {
            let bytes = serde_json::to_vec(&job).map_err(|source| QueueError::Encode {
                job: J::NAME,
                source,
            })?;
            let mut task = TaskBuilder::new(bytes);
            if let Some(at) = at {
                task = task.run_at_timestamp(run_at_secs(at));
            }
            Ok(task.build())
        })
        .collect::<Result<Vec<RedisTask>, QueueError>>()?;
    let config = config::<J>(keys, 1);
    apalis_redis::queries::push_tasks(conn, &config, &tasks)
        .await
        .map_err(|source| QueueError::Push {
            job: J::NAME,
            source,
        })?;
    Ok(())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Moves every due job to the active list, `PROMOTE_CHUNK` at a time. After this, apalis's
/// own promotion in its fetch finds at most the few jobs that fell due since.
pub async fn promote_due(
    conn: &mut ConnectionManager,
    config: &QueueConfig,
) -> Result<u64, QueueError> {
    static SCRIPT: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
        Script::new(
            r"
            local ids = redis.call('ZRANGEBYSCORE', KEYS[1], 0, ARGV[1], 'LIMIT', 0, ARGV[2])
            if #ids > 0 then
                redis.call('RPUSH', KEYS[2], unpack(ids))
                redis.call('ZREM', KEYS[1], unpack(ids))
                redis.call('DEL', KEYS[3])
                redis.call('LPUSH', KEYS[3], 1)
            end
            return #ids",
        )
    });
    let mut total = 0;
    loop {
        let moved: u64 = SCRIPT
            .key(config.scheduled_jobs_set())
            .key(config.active_jobs_list())
            .key(config.signal_list())
            .arg(now_secs())
            .arg(PROMOTE_CHUNK)
            .invoke_async(conn)
            .await?;
        total += moved;
        if moved < PROMOTE_CHUNK as u64 {
            return Ok(total);
        }
    }
}

/// Deletes finished jobs' payloads and metadata, up to `limit` of them. Dead jobs are kept
/// for people to look at.
pub async fn delete_done(
    conn: &mut ConnectionManager,
    config: &QueueConfig,
    limit: usize,
) -> Result<u64, QueueError> {
    static SCRIPT: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
        Script::new(
            r"
            local ids = redis.call('SPOP', KEYS[1], ARGV[2])
            for _, id in ipairs(ids) do
                redis.call('HDEL', KEYS[2], id)
                redis.call('DEL', ARGV[1] .. ':' .. id)
            end
            return #ids",
        )
    });
    Ok(SCRIPT
        .key(config.done_jobs_set())
        .key(config.job_data_hash())
        .arg(config.job_meta_hash())
        .arg(limit)
        .invoke_async(conn)
        .await?)
}

/// Dead jobs (every attempt failed): how many there are, and how many were removed because
/// they had been dead longer than `retention`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dead {
    pub remaining: u64,
    pub removed: u64,
}

/// Dates newly dead jobs (apalis keeps only their ids, in a set) in a sorted set of our own,
/// and removes those dead longer than `retention`, at most `limit` per call.
pub async fn tend_dead(
    conn: &mut ConnectionManager,
    config: &QueueConfig,
    seen_key: &str,
    retention: Duration,
    limit: usize,
) -> Result<Dead, QueueError> {
    static SCRIPT: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
        Script::new(
            r"
            for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
                redis.call('ZADD', KEYS[2], 'NX', ARGV[2], id)
            end
            local old = redis.call('ZRANGEBYSCORE', KEYS[2], 0, ARGV[3], 'LIMIT', 0, ARGV[4])
            for _, id in ipairs(old) do
                redis.call('SREM', KEYS[1], id)
                redis.call('HDEL', KEYS[3], id)
                redis.call('DEL', ARGV[1] .. ':' .. id)
                redis.call('ZREM', KEYS[2], id)
            end
            return {redis.call('SCARD', KEYS[1]), #old}",
        )
    });
    let now = now_secs();
    let cutoff = now.saturating_sub(retention.as_secs());
    let (remaining, removed): (u64, u64) = SCRIPT
        .key(config.dead_jobs_set())
        .key(seen_key)
        .key(config.job_data_hash())
        .arg(config.job_meta_hash())
        .arg(now)
        .arg(cutoff)
        .arg(limit)
        .invoke_async(conn)
        .await?;
    Ok(Dead { remaining, removed })
}

/// Jobs waiting in one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Depth {
    /// Due and waiting for a worker.
    pub pending: u64,
    /// Waiting for their time.
    pub scheduled: u64,
}

pub async fn depth(
    conn: &mut ConnectionManager,
    config: &QueueConfig,
) -> Result<Depth, QueueError> {
    let (pending, scheduled): (u64, u64) = redis::pipe()
        .cmd("LLEN")
        .arg(config.active_jobs_list())
        .cmd("ZCARD")
        .arg(config.scheduled_jobs_set())
        .query_async(conn)
        .await?;
    Ok(Depth { pending, scheduled })
}

/// Updates the queue-depth gauge of `J`'s queue.
pub async fn report_depth<J: Job>(
    conn: &mut ConnectionManager,
    keys: &Keys,
    metrics: &Metrics,
) -> Result<Depth, QueueError> {
    let d = depth(conn, &config::<J>(keys, 1)).await?;
    metrics
        .queue_depth
        .with_label_values(&[J::QUEUE, "pending"])
        .set(d.pending as i64);
    metrics
        .queue_depth
        .with_label_values(&[J::QUEUE, "scheduled"])
        .set(d.scheduled as i64);
    Ok(d)
}
