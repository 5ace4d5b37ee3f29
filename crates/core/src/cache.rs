//! The Redis side: cached values, read and written under the configured key prefix.
//!
//! Reads and writes go over one shared multiplexed `ConnectionManager`: on this kind of machine
//! it served 3.2x the GET rate of checking a connection out of a pool for every command
//! (docs/redis.md), with the same consistency. A pool (deadpool-redis) is
//! only worth having for work that needs a connection to itself (blocking stream reads, MULTI);
//! nothing here does yet.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::keys::Keys;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("Redis is unavailable: {0} (is it running, and is REDIS_URL right?)")]
    Redis(#[from] redis::RedisError),
}

/// Opens the shared connection. Commands time out after 2 s so a frozen Redis makes callers
/// fall back instead of hanging; the manager reconnects by itself.
pub async fn connect(redis_url: &str) -> Result<ConnectionManager, CacheError> {
    let client = redis::Client::open(redis_url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    Ok(ConnectionManager::new_with_config(client, config).await?)
}

/// A connection that died under a command (a Redis restart: the first command on the old
/// socket fails with "broken pipe" while the manager reconnects).
fn connection_lost(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() || e.is_io_error() || e.is_connection_refusal()
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
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"local cur = redis.call('GET', KEYS[1])
                  if cur then
                      local ok, doc = pcall(cjson.decode, cur)
                      if ok and type(doc) == 'table' and tonumber(doc.version)
                          and tonumber(doc.version) > tonumber(ARGV[2]) then
                          return 0
                      end
                  end
                  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
                  return 1",
            )
        });
        let mut invocation = SCRIPT.key(key);
        invocation.arg(value).arg(version).arg(ttl.as_secs().max(1));
        let mut conn = self.conn.clone();
        let written: i64 = match invocation.invoke_async(&mut conn).await {
            Err(e) if connection_lost(&e) => invocation.invoke_async(&mut conn).await?,
            other => other?,
        };
        Ok(written == 1)
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

    pub async fn ping(&self) -> Result<(), CacheError> {
        self.query::<String>(&redis::cmd("PING")).await?;
        Ok(())
    }
}
