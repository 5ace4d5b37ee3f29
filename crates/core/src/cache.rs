//! The Redis side: cached values, read and written under the configured key prefix, in the
//! application's cache (`CACHE_REDIS_URL`): one Redis, or a Redis Cluster (`crate::cluster`).
//!
//! Reads and writes go over one shared multiplexed connection: on this kind of machine it
//! served 3.2x the GET rate of checking a connection out of a pool for every command
//! (docs/redis.md), with the same consistency. A pool (deadpool-redis) is only worth having
//! for work that needs a connection to itself (blocking stream reads, MULTI); nothing here does
//! yet. Whether the cache is one node or a cluster is decided once, in [`CacheConn`]: callers
//! see the same commands, batches and scans either way.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    Cmd, ConnectionInfo, RedisFuture, Value,
};

pub use crate::cluster::{Keyed, Seeds, Timeouts};
use crate::{
    cluster::ClusterCache,
    keys::Keys,
    slots::{self, ScanAt},
};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("the watched cache is unavailable: {0} (is it running, and is CACHE_REDIS_URL, else REDIS_URL, right?)")]
    Redis(redis::RedisError),
    /// The cache's ACL refused a command (NOPERM): a user with too few rights.
    #[error("the watched cache refused a command: {0}; the user of CACHE_REDIS_URL (else REDIS_URL) needs read access to the watched keys for detection, and write access for refresh, repair, rebuild and invalidation (README, \"What each Redis needs\")")]
    Denied(redis::RedisError),
}

impl From<redis::RedisError> for CacheError {
    fn from(e: redis::RedisError) -> Self {
        if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) {
            CacheError::Denied(e)
        } else {
            CacheError::Redis(e)
        }
    }
}

impl From<redis::ParsingError> for CacheError {
    fn from(e: redis::ParsingError) -> Self {
        CacheError::Redis(e.into())
    }
}

/// Where the watched cache is (`Config::cache_redis`).
#[derive(Debug, Clone)]
pub enum Target {
    /// One Redis.
    Node(ConnectionInfo),
    /// A Redis Cluster, by its seed nodes.
    Cluster(Seeds),
}

/// The shared connection's: commands time out after 2 s, so a frozen Redis makes callers fall
/// back instead of hanging.
pub const SHARED: Timeouts = Timeouts {
    connect: Duration::from_secs(2),
    response: Duration::from_secs(2),
};

/// Opens the shared connection to one Redis (see [`SHARED`]); the manager reconnects by
/// itself. `redis` is a URL, or a [`redis::ConnectionInfo`] carrying TLS settings.
pub async fn connect(redis: impl crate::tls::RedisTarget) -> Result<CacheConn, CacheError> {
    let info = redis.connection_info()?;
    open(&Target::Node(info), SHARED).await
}

/// Opens a connection to `target` with `timeouts`.
pub async fn open(target: &Target, timeouts: Timeouts) -> Result<CacheConn, CacheError> {
    match target {
        Target::Node(info) => {
            let client = crate::tls::redis_client(info)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeouts.connect))
                .set_response_timeout(Some(timeouts.response))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            let conn = ConnectionManager::new_with_config(client, config).await?;
            Ok(CacheConn::Node(conn, Arc::new(info.clone())))
        }
        Target::Cluster(seeds) => Ok(CacheConn::Cluster(Arc::new(
            ClusterCache::connect(seeds, timeouts).await?,
        ))),
    }
}

/// A connection to the watched cache: one Redis, or a cluster. Cheap to clone. Commands on one
/// key go through [`ConnectionLike`] alike; batches through [`CacheConn::grouped`].
#[derive(Clone)]
pub enum CacheConn {
    Node(ConnectionManager, Arc<ConnectionInfo>),
    Cluster(Arc<ClusterCache>),
}

impl std::fmt::Debug for CacheConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheConn::Node(_, info) => write!(f, "CacheConn::Node({:?})", info.addr()),
            CacheConn::Cluster(_) => f.write_str("CacheConn::Cluster"),
        }
    }
}

impl ConnectionLike for CacheConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            CacheConn::Node(conn, _) => conn.req_packed_command(cmd),
            CacheConn::Cluster(c) => Box::pin(async move {
                let mut conn = c.connection();
                conn.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            CacheConn::Node(conn, _) => conn.req_packed_commands(pipeline, offset, count),
            CacheConn::Cluster(c) => Box::pin(async move {
                let mut conn = c.connection();
                conn.req_packed_commands(pipeline, offset, count).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            CacheConn::Node(conn, _) => conn.get_db(),
            CacheConn::Cluster(_) => 0,
        }
    }
}

impl CacheConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, CacheConn::Cluster(_))
    }

    /// Sends every group's commands in one round trip per node (one pipeline for a single
    /// Redis; one per primary, at once, for a cluster) and returns each group's replies, a
    /// refused command as its inline `Value::ServerError`.
    pub async fn grouped(&self, groups: &[Keyed]) -> redis::RedisResult<Vec<Vec<Value>>> {
        match self {
            CacheConn::Node(conn, _) => {
                let mut pipe = redis::pipe();
                for cmd in groups.iter().flat_map(|g| &g.commands) {
                    pipe.add_command(cmd.clone());
                }
                let n = groups.iter().map(|g| g.commands.len()).sum();
                let mut values = conn
                    .clone()
                    .req_packed_commands(&pipe, 0, n)
                    .await?
                    .into_iter();
                Ok(groups
                    .iter()
                    .map(|g| values.by_ref().take(g.commands.len()).collect())
                    .collect())
            }
            CacheConn::Cluster(c) => c.grouped(groups).await,
        }
    }

    /// Each node to subscribe to for keyspace notifications (node-local in a cluster: every
    /// primary), with how to connect to it by itself, named by its address (`""`: the one
    /// Redis).
    /// Primaries are read anew when `fresh` is asked for.
    pub async fn primaries(
        &self,
        fresh: bool,
    ) -> Result<Vec<(String, ConnectionInfo)>, CacheError> {
        match self {
            CacheConn::Node(_, info) => Ok(vec![(String::new(), (**info).clone())]),
            CacheConn::Cluster(c) => {
                let topology = c.topology(fresh).await?;
                Ok(topology
                    .primaries()
                    .into_iter()
                    .map(|(_, node)| (node.to_string(), c.node_info(&node)))
                    .collect())
            }
        }
    }

    /// One step of a walk over every key matching `pattern`: SCAN from `at` (from
    /// `ScanAt::default()` to begin), on one Redis or on each primary of a cluster in turn
    /// (`crate::slots::scan_from`). The keys found, and where to go on (`None`: done).
    pub async fn scan(
        &self,
        at: &ScanAt,
        pattern: &str,
        count: usize,
    ) -> Result<(Vec<String>, Option<ScanAt>), CacheError> {
        let scan = |cursor: u64| {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(count);
            cmd
        };
        match self {
            CacheConn::Node(conn, _) => {
                let cmd = scan(at.cursor);
                let mut conn = conn.clone();
                let (next, keys): (u64, Vec<String>) = match cmd.query_async(&mut conn).await {
                    Err(e) if connection_lost(&e) => cmd.query_async(&mut conn).await?,
                    other => other?,
                };
                let next = (next != 0).then(|| ScanAt {
                    cursor: next,
                    ..ScanAt::default()
                });
                Ok((keys, next))
            }
            CacheConn::Cluster(c) => {
                let mut topology = c.topology(false).await?;
                let mut primaries = topology.primaries();
                let here = match slots::scan_from(&primaries, &topology, at) {
                    Some(here) => here,
                    None => {
                        topology = c.topology(true).await?;
                        primaries = topology.primaries();
                        slots::scan_from(&primaries, &topology, at).ok_or_else(|| {
                            redis::RedisError::from((
                                redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
                                "no primary serves slot",
                                at.slot.to_string(),
                            ))
                        })?
                    }
                };
                if at.cursor != 0 && here.cursor == 0 {
                    tracing::info!(
                        from = %at.node,
                        to = %here.node,
                        "the primary being scanned changed (a failover or a resharding): scanning its slots again from the start"
                    );
                }
                let node = topology
                    .owner(here.slot)
                    .cloned()
                    .expect("scan_from found the slot's owner");
                let (next, keys): (u64, Vec<String>) = c.on_node(&node, &scan(here.cursor)).await?;
                let next = match next {
                    0 => slots::next_primary(&primaries, here.slot),
                    cursor => Some(ScanAt { cursor, ..here }),
                };
                Ok((keys, next))
            }
        }
    }
}

/// The versioned compare-and-set: KEYS[1] the key; ARGV the document, its version, the TTL
/// in seconds (empty: keep the key's expiry) and the document's version field. Sets the key
/// unless it holds a document with a newer version; returns 1 when it did. Shared by
/// [`Cache::set_unless_newer_field`] and the rebuild, which sends it by hash in pipelines.
pub static SET_UNLESS_NEWER: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"local cur = redis.call('GET', KEYS[1])
          if cur then
              local ok, doc = pcall(cjson.decode, cur)
              if ok and type(doc) == 'table' and tonumber(doc[ARGV[4]])
                  and tonumber(doc[ARGV[4]]) > tonumber(ARGV[2]) then
                  return 0
              end
          end
          if ARGV[3] == '' then
              redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
          else
              redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
          end
          return 1",
    )
});

/// Whole seconds, at least one (Redis refuses `EX 0`).
pub fn secs(ttl: Duration) -> u64 {
    ttl.as_secs().max(1)
}

fn expire(pipe: &mut redis::Pipeline, key: &str, millis: Option<u64>) {
    if let Some(ms) = millis {
        pipe.cmd("PEXPIRE").arg(key).arg(ms.max(1)).ignore();
    }
}

/// A connection that died under a command (a Redis restart: the first command on the old
/// socket fails with "broken pipe" while the manager reconnects).
fn connection_lost(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() || e.is_io_error() || e.is_connection_refusal()
}

/// How a representation is read from Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A string value (JSON documents and single values).
    String,
    Hash,
    Set,
}

/// What a key holds. Redis deletes empty hashes and sets, so empty reads as `Missing`.
#[derive(Debug, Clone, PartialEq)]
pub enum Cached {
    Missing,
    Bytes(Vec<u8>),
    Hash(HashMap<String, Vec<u8>>),
    Set(BTreeSet<Vec<u8>>),
    /// The key exists but cannot be read as its representation (another type): why.
    Unreadable(String),
}

fn read_collection(shape: Shape, value: redis::Value) -> Cached {
    let read = match shape {
        Shape::Hash => redis::from_redis_value::<HashMap<String, Vec<u8>>>(value)
            .map(|h| (!h.is_empty()).then_some(Cached::Hash(h))),
        _ => redis::from_redis_value::<BTreeSet<Vec<u8>>>(value)
            .map(|s| (!s.is_empty()).then_some(Cached::Set(s))),
    };
    match read {
        Ok(found) => found.unwrap_or(Cached::Missing),
        Err(e) => Cached::Unreadable(e.to_string()),
    }
}

/// Cached values by full key. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct Cache {
    conn: CacheConn,
    keys: Keys,
}

impl Cache {
    pub fn new(conn: CacheConn, keys: Keys) -> Self {
        Self { conn, keys }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn connection(&self) -> CacheConn {
        self.conn.clone()
    }

    /// Runs an idempotent command, and once more when the connection turned out to be dead,
    /// so a Redis restart costs no failed request.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, CacheError> {
        let mut conn = self.conn.clone();
        match cmd.query_async(&mut conn).await {
            Err(e) if connection_lost(&e) => {
                tracing::debug!(error = %e, "Redis connection lost; retrying once");
                Ok(cmd.query_async(&mut conn).await?)
            }
            other => Ok(other?),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        self.query(redis::cmd("GET").arg(key)).await
    }

    /// Writes `value` with a TTL (whole seconds, at least one).
    pub async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
        self.query(
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("EX")
                .arg(ttl.as_secs().max(1)),
        )
        .await
    }

    /// Writes `value` (a JSON document carrying `version`) unless the cache already holds a
    /// newer version of it. Two writers finishing out of order (a slow PUT, a cache-aside fill
    /// that read before a write) then cannot put an older version over a newer one.
    /// Returns false when the write was skipped.
    pub async fn set_unless_newer(
        &self,
        key: &str,
        value: &[u8],
        version: i64,
        ttl: Duration,
    ) -> Result<bool, CacheError> {
        self.set_unless_newer_field(key, value, "version", version, Some(ttl))
            .await
    }

    /// [`Cache::set_unless_newer`] for a document whose version is in `field`. Without a
    /// `ttl` the key keeps the expiry it has (none for a new key): stalewatch does not know
    /// the application's.
    pub async fn set_unless_newer_field(
        &self,
        key: &str,
        value: &[u8],
        field: &str,
        version: i64,
        ttl: Option<Duration>,
    ) -> Result<bool, CacheError> {
        let mut invocation = SET_UNLESS_NEWER.key(key);
        invocation
            .arg(value)
            .arg(version)
            // Empty, not 0, for "keep the expiry": `SET ... EX 0` is an error.
            .arg(ttl.map(|t| secs(t).to_string()).unwrap_or_default())
            .arg(field);
        let mut conn = self.conn.clone();
        let written: i64 = match invocation.invoke_async(&mut conn).await {
            Err(e) if connection_lost(&e) => invocation.invoke_async(&mut conn).await?,
            other => other?,
        };
        Ok(written == 1)
    }

    /// A plain write, with `ttl` or keeping the key's expiry.
    pub async fn set_keeping_ttl(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), CacheError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        match ttl {
            Some(ttl) => cmd.arg("EX").arg(secs(ttl)),
            None => cmd.arg("KEEPTTL"),
        };
        self.query(&cmd).await
    }

    /// Replaces a hash whole, atomically, keeping its expiry unless `ttl` is given.
    pub async fn replace_hash(
        &self,
        key: &str,
        fields: &[(String, String)],
        ttl: Option<Duration>,
    ) -> Result<(), CacheError> {
        let fill = (!fields.is_empty()).then(|| redis::cmd("HSET").arg(key).arg(fields).clone());
        self.replace(key, fill, ttl).await
    }

    /// Replaces a set whole, atomically, keeping its expiry unless `ttl` is given.
    pub async fn replace_set(
        &self,
        key: &str,
        members: &[&String],
        ttl: Option<Duration>,
    ) -> Result<(), CacheError> {
        let fill = (!members.is_empty()).then(|| redis::cmd("SADD").arg(key).arg(members).clone());
        self.replace(key, fill, ttl).await
    }

    /// DEL, then `fill` (nothing: the key stays deleted), then the expiry, in one MULTI: a
    /// reader sees the old value or the new one, never half of it.
    async fn replace(
        &self,
        key: &str,
        fill: Option<redis::Cmd>,
        ttl: Option<Duration>,
    ) -> Result<(), CacheError> {
        let kept = self.ttl_of(key, ttl).await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("DEL").arg(key).ignore();
        if let Some(fill) = fill {
            pipe.add_command(fill).ignore();
        }
        expire(&mut pipe, key, kept);
        self.run(&pipe).await
    }

    /// `ttl`, or the key's remaining time to live in milliseconds when none is given.
    async fn ttl_of(&self, key: &str, ttl: Option<Duration>) -> Result<Option<u64>, CacheError> {
        if let Some(ttl) = ttl {
            return Ok(Some(ttl.as_millis() as u64));
        }
        let left: i64 = self.query(redis::cmd("PTTL").arg(key)).await?;
        Ok((left > 0).then_some(left as u64))
    }

    async fn run(&self, pipe: &redis::Pipeline) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        match pipe.query_async::<()>(&mut conn).await {
            Err(e) if connection_lost(&e) => Ok(pipe.query_async::<()>(&mut conn).await?),
            other => Ok(other?),
        }
    }

    /// UNLINKs `keys` in one round trip per node; how many existed.
    pub async fn unlink_many(&self, keys: &[String]) -> Result<u64, CacheError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let groups: Vec<Keyed> = if self.conn.is_cluster() {
            // A cluster refuses keys of several slots in one command.
            keys.iter()
                .map(|k| Keyed::one(k, redis::cmd("UNLINK").arg(k).clone()))
                .collect()
        } else {
            keys.chunks(1000)
                .map(|chunk| Keyed::one(&chunk[0], redis::cmd("UNLINK").arg(chunk).clone()))
                .collect()
        };
        let mut removed = 0;
        for reply in self.grouped(&groups).await?.into_iter().flatten() {
            removed += redis::from_redis_value::<u64>(reply)?;
        }
        Ok(removed)
    }

    /// One step of a SCAN of every key matching `pattern`, on every primary of a cluster:
    /// see [`CacheConn::scan`].
    pub async fn scan(
        &self,
        at: &ScanAt,
        pattern: &str,
        count: usize,
    ) -> Result<(Vec<String>, Option<ScanAt>), CacheError> {
        self.conn.scan(at, pattern, count).await
    }

    /// [`CacheConn::grouped`], sent once more when the connection turned out to be dead.
    async fn grouped(&self, groups: &[Keyed]) -> Result<Vec<Vec<Value>>, CacheError> {
        match self.conn.grouped(groups).await {
            Err(e) if connection_lost(&e) => Ok(self.conn.grouped(groups).await?),
            other => Ok(other?),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        let n: u64 = self.query(redis::cmd("DEL").arg(key)).await?;
        Ok(n > 0)
    }

    /// The values of a batch of keys, lined up with `keys`: one MGET on one Redis; on a
    /// cluster one pipeline of GETs per primary (see [`Cache::read_many`]).
    pub async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, CacheError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        if !self.conn.is_cluster() {
            return self.query(redis::cmd("MGET").arg(keys)).await;
        }
        let groups: Vec<Keyed> = keys
            .iter()
            .map(|k| Keyed::one(k, redis::cmd("GET").arg(k).clone()))
            .collect();
        self.grouped(&groups)
            .await?
            .into_iter()
            .map(|replies| match replies.into_iter().next() {
                // As MGET answers for a key of another type.
                Some(Value::ServerError(e)) if e.code() == "WRONGTYPE" => Ok(None),
                Some(Value::ServerError(e)) => Err(redis::RedisError::from(e).into()),
                Some(value) => Ok(redis::from_redis_value(value)?),
                None => Ok(None),
            })
            .collect()
    }

    /// What each of `keys` holds, read as `shape` says: one MGET for strings (on a cluster, a
    /// GET each), HGETALL or SMEMBERS each for hashes and sets, in one round trip per node
    /// (a pipeline; on a cluster one per primary, at once). A key of another type is
    /// `Unreadable` for hashes and sets (WRONGTYPE); MGET answers nothing for it, so it reads
    /// as `Missing`.
    pub async fn read_many(
        &self,
        shape: Shape,
        keys: &[String],
    ) -> Result<Vec<Cached>, CacheError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let command = match shape {
            Shape::String => {
                return Ok(self
                    .get_many(keys)
                    .await?
                    .into_iter()
                    .map(|v| v.map_or(Cached::Missing, Cached::Bytes))
                    .collect())
            }
            Shape::Hash => "HGETALL",
            Shape::Set => "SMEMBERS",
        };
        let groups: Vec<Keyed> = keys
            .iter()
            .map(|k| Keyed::one(k, redis::cmd(command).arg(k).clone()))
            .collect();
        Ok(self
            .grouped(&groups)
            .await?
            .into_iter()
            .map(|replies| match replies.into_iter().next() {
                Some(Value::ServerError(e)) => {
                    Cached::Unreadable(redis::RedisError::from(e).to_string())
                }
                Some(value) => read_collection(shape, value),
                None => Cached::Missing,
            })
            .collect())
    }

    pub async fn ping(&self) -> Result<(), CacheError> {
        self.query::<String>(&redis::cmd("PING")).await?;
        Ok(())
    }
}
