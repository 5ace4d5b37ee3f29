//! The Redis side: cached values, read and written under the configured key prefix.
//!
//! Reads and writes go over one shared multiplexed `ConnectionManager`: on this kind of machine
//! it served 3.2x the GET rate of checking a connection out of a pool for every command
//! (docs/redis.md), with the same consistency. A pool (deadpool-redis) is
//! only worth having for work that needs a connection to itself (blocking stream reads, MULTI);
//! nothing here does yet.

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::keys::Keys;

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

/// Opens the shared connection. Commands time out after 2 s so a frozen Redis makes callers
/// fall back instead of hanging; the manager reconnects by itself. `redis` is a URL, or
/// `Config::redis()` (`rediss://` with `REDIS_CA_FILE`).
pub async fn connect(redis: impl crate::tls::RedisTarget) -> Result<ConnectionManager, CacheError> {
    let client = crate::tls::redis_client(redis)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    Ok(ConnectionManager::new_with_config(client, config).await?)
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
    conn: ConnectionManager,
    keys: Keys,
}

impl Cache {
    pub fn new(conn: ConnectionManager, keys: Keys) -> Self {
        Self { conn, keys }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn connection(&self) -> ConnectionManager {
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

    /// UNLINKs `keys`, 1,000 to a command, in one round trip; how many existed.
    pub async fn unlink_many(&self, keys: &[String]) -> Result<u64, CacheError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for chunk in keys.chunks(1000) {
            pipe.cmd("UNLINK").arg(chunk);
        }
        let mut conn = self.conn.clone();
        let counts: Vec<u64> = match pipe.query_async(&mut conn).await {
            Err(e) if connection_lost(&e) => pipe.query_async(&mut conn).await?,
            other => other?,
        };
        Ok(counts.into_iter().sum())
    }

    /// One `SCAN cursor MATCH pattern COUNT count`: the next cursor (0: done) and the keys.
    pub async fn scan(
        &self,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> Result<(u64, Vec<String>), CacheError> {
        self.query(
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(count),
        )
        .await
    }

    pub async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        let n: u64 = self.query(redis::cmd("DEL").arg(key)).await?;
        Ok(n > 0)
    }

    /// One MGET for a whole batch; the result lines up with `keys`.
    pub async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, CacheError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.query(redis::cmd("MGET").arg(keys)).await
    }

    /// What each of `keys` holds, read as `shape` says: one MGET for strings, one pipeline of
    /// HGETALL or SMEMBERS for hashes and sets. A key of another type is `Unreadable` for
    /// hashes and sets (WRONGTYPE); MGET answers nothing for it, so it reads as `Missing`.
    pub async fn read_many(
        &self,
        shape: Shape,
        keys: &[String],
    ) -> Result<Vec<Cached>, CacheError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        match shape {
            Shape::String => Ok(self
                .get_many(keys)
                .await?
                .into_iter()
                .map(|v| v.map_or(Cached::Missing, Cached::Bytes))
                .collect()),
            Shape::Hash | Shape::Set => {
                let command = if shape == Shape::Hash {
                    "HGETALL"
                } else {
                    "SMEMBERS"
                };
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for key in keys {
                    pipe.cmd(command).arg(key);
                }
                let mut conn = self.conn.clone();
                let replies: Vec<redis::RedisResult<redis::Value>> =
                    match pipe.query_async(&mut conn).await {
                        Err(e) if connection_lost(&e) => pipe.query_async(&mut conn).await?,
                        other => other?,
                    };
                Ok(replies
                    .into_iter()
                    .map(|reply| match reply {
                        Err(e) => Cached::Unreadable(e.to_string()),
                        Ok(value) => read_collection(shape, value),
                    })
                    .collect())
            }
        }
    }

    pub async fn ping(&self) -> Result<(), CacheError> {
        self.query::<String>(&redis::cmd("PING")).await?;
        Ok(())
    }
}
