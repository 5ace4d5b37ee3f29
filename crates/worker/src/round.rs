//! A sweep round's record in Redis: starting one, reading it, leasing a shard, and recording
//! a page's progress with the lease checked in the same step. What a round is and how it is
//! split is decided in `stalewatch_core::shards`; this is only the I/O.
//!
//! Exactly once: a page's row count and the cursor after it are written by one script, and
//! only while the writer still holds the shard's lease. A worker killed between comparing a
//! page and recording it leaves the cursor before that page, so the worker that takes the
//! shard over compares it again (the state machine takes a repeated verdict as a no-op) and
//! counts it once; a worker whose lease expired while it was still busy is refused and stops.

use std::{collections::HashMap, sync::LazyLock, time::Duration};

use redis::{aio::ConnectionManager, Script};
use stalewatch_core::{
    keys::Keys,
    shards::{Checkpoint, Round, Shard},
};
use uuid::Uuid;

/// Writes a new round unless one is in progress.
static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
          redis.call('HSET', KEYS[1], unpack(ARGV))
          return 1",
    )
});

/// Records one page of shard ARGV[4]: its checkpoint, its count, who swept it; renews the
/// lease, or, on the shard's last page, marks it done and frees the lease. The page that
/// finishes the round's last shard also completes the round: it is renamed to the last
/// round, the completion time set, and the deployment's rest begun, all in this one step,
/// so no worker can start the next round in between.
///
/// KEYS: round, shard lease, last round, done_at, rest.
/// ARGV: token, lease ms, round id, shard, checkpoint, count, worker, finished (1/0), now ms,
/// rest ms. Returns -1 (lease or round lost: nothing written), 0 (going on), 1 (shard done),
/// 2 (round done).
static RECORD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
          if redis.call('HGET', KEYS[1], 'id') ~= ARGV[3] then return -1 end
          local s = 's' .. ARGV[4]
          if redis.call('HEXISTS', KEYS[1], s .. ':done') == 1 then return -1 end
          redis.call('HSET', KEYS[1], s .. ':at', ARGV[5], s .. ':by', ARGV[7])
          redis.call('HINCRBY', KEYS[1], s .. ':items', ARGV[6])
          if ARGV[8] ~= '1' then
            redis.call('PEXPIRE', KEYS[2], ARGV[2])
            return 0
          end
          redis.call('HSET', KEYS[1], s .. ':done', ARGV[9])
          redis.call('DEL', KEYS[2])
          local done = redis.call('HINCRBY', KEYS[1], 'done', 1)
          if done < tonumber(redis.call('HGET', KEYS[1], 'shards')) then return 1 end
          redis.call('HSET', KEYS[1], 'ended_ms', ARGV[9])
          redis.call('RENAME', KEYS[1], KEYS[3])
          redis.call('SET', KEYS[4], ARGV[9])
          if tonumber(ARGV[10]) > 0 then redis.call('SET', KEYS[5], '1', 'PX', ARGV[10]) end
          return 2",
    )
});

static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
              return redis.call('DEL', KEYS[1])
          end
          return 0",
    )
});

/// What recording a page did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Going,
    ShardDone,
    RoundDone,
    /// The lease expired and another worker may hold the shard, or the round is over:
    /// nothing was written, and the caller stops.
    Lost,
}

/// One worker's hold on one shard of one round.
#[derive(Debug)]
pub struct ShardLease {
    pub round: u64,
    pub shard: usize,
    key: String,
    token: String,
    ttl: Duration,
}

async fn read(conn: &mut ConnectionManager, key: &str) -> anyhow::Result<Option<Round>> {
    let fields: HashMap<String, String> = redis::cmd("HGETALL").arg(key).query_async(conn).await?;
    if fields.is_empty() {
        return Ok(None);
    }
    Ok(Some(Round::parse(&fields)?))
}

/// The round in progress, if any.
pub async fn current(conn: &mut ConnectionManager, keys: &Keys) -> anyhow::Result<Option<Round>> {
    read(conn, &keys.sweep_round()).await
}

/// The last completed round, if any.
pub async fn last(conn: &mut ConnectionManager, keys: &Keys) -> anyhow::Result<Option<Round>> {
    read(conn, &keys.sweep_last_round()).await
}

/// Starts a round of `shards` unless one is in progress; either way, the round in progress.
pub async fn start(
    conn: &mut ConnectionManager,
    keys: &Keys,
    shards: &[Shard],
    now_ms: i64,
) -> anyhow::Result<Option<Round>> {
    let id: u64 = redis::cmd("INCR")
        .arg(keys.sweep_rounds())
        .query_async(conn)
        .await?;
    let mut create = CREATE.key(keys.sweep_round());
    for (field, value) in Round::fields(id, now_ms, shards) {
        create.arg(field).arg(value);
    }
    let _: i64 = create.invoke_async(conn).await?;
    current(conn, keys).await
}

/// Leases shard `shard` of round `round` if nobody holds it.
pub async fn take(
    conn: &mut ConnectionManager,
    keys: &Keys,
    round: u64,
    shard: usize,
    ttl: Duration,
) -> anyhow::Result<Option<ShardLease>> {
    let key = keys.sweep_shard_lease(round, shard);
    let token = Uuid::new_v4().to_string();
    let ok: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(ttl.as_millis() as u64)
        .query_async(conn)
        .await?;
    Ok(ok.map(|_| ShardLease {
        round,
        shard,
        key,
        token,
        ttl,
    }))
}

/// Gives a shard up without recording anything, if still ours.
pub async fn release(conn: &mut ConnectionManager, lease: ShardLease) -> anyhow::Result<()> {
    let _: i64 = RELEASE
        .key(&lease.key)
        .arg(&lease.token)
        .invoke_async(conn)
        .await?;
    Ok(())
}

/// One page's progress, see [`RECORD`].
pub struct Page<'a> {
    pub at: &'a Checkpoint,
    pub count: u64,
    pub by: &'a str,
    pub finished: bool,
    /// The deployment's rest, should this page complete the round.
    pub rest: Duration,
}

pub async fn record(
    conn: &mut ConnectionManager,
    keys: &Keys,
    lease: &ShardLease,
    page: Page<'_>,
) -> anyhow::Result<Recorded> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let n: i64 = RECORD
        .key(keys.sweep_round())
        .key(&lease.key)
        .key(keys.sweep_last_round())
        .key(keys.sweep_done_at())
        .key(keys.sweep_rest())
        .arg(&lease.token)
        .arg(lease.ttl.as_millis() as u64)
        .arg(lease.round)
        .arg(lease.shard)
        .arg(serde_json::to_string(page.at)?)
        .arg(page.count)
        .arg(page.by)
        .arg(if page.finished { 1 } else { 0 })
        .arg(now_ms)
        .arg(page.rest.as_millis() as u64)
        .invoke_async(conn)
        .await?;
    Ok(match n {
        0 => Recorded::Going,
        1 => Recorded::ShardDone,
        2 => Recorded::RoundDone,
        _ => Recorded::Lost,
    })
}
