//! A Redis lease: one holder at a time, expiring by itself if the holder dies, renewed and
//! released only by the holder that took it (its random token must match).
//!
//! A one-key lease on one Redis is all the sweep and the rebuild need; Redlock-style crates
//! bring their own `redis` version and multi-server quorum we don't use.

use std::{sync::LazyLock, time::Duration};

use redis::{aio::ConnectionManager, Script};
use uuid::Uuid;

static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
              return redis.call('PEXPIRE', KEYS[1], ARGV[2])
          end
          return 0",
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

#[derive(Debug)]
pub struct Lease {
    key: String,
    token: String,
    ttl: Duration,
    conn: ConnectionManager,
}

impl Lease {
    /// Takes the lease if nobody holds it.
    pub async fn try_acquire(
        conn: &ConnectionManager,
        key: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, redis::RedisError> {
        Self::acquire(conn, key, ttl, Uuid::new_v4().to_string()).await
    }

    /// Takes the lease if nobody holds it, as `holder` (who, for whoever finds it taken:
    /// [`Lease::holder`]). The token is `holder` with a random suffix, so two holders that
    /// describe themselves alike still tell their leases apart.
    pub async fn try_acquire_as(
        conn: &ConnectionManager,
        key: &str,
        ttl: Duration,
        holder: &str,
    ) -> Result<Option<Lease>, redis::RedisError> {
        let token = format!("{holder} #{}", Uuid::new_v4().simple());
        Self::acquire(conn, key, ttl, token).await
    }

    async fn acquire(
        conn: &ConnectionManager,
        key: &str,
        ttl: Duration,
        token: String,
    ) -> Result<Option<Lease>, redis::RedisError> {
        let ok: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut conn.clone())
            .await?;
        Ok(ok.map(|_| Lease {
            key: key.to_string(),
            token,
            ttl,
            conn: conn.clone(),
        }))
    }

    /// Who holds the lease at `key` (its token), if anyone does.
    pub async fn holder(
        conn: &ConnectionManager,
        key: &str,
    ) -> Result<Option<String>, redis::RedisError> {
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn.clone())
            .await
    }

    /// This lease's token.
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Extends the lease by its TTL. False when it was lost (expired, taken by another).
    pub async fn renew(&self) -> Result<bool, redis::RedisError> {
        let n: i64 = RENEW
            .key(&self.key)
            .arg(&self.token)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(n == 1)
    }

    /// Gives the lease up, if still ours.
    pub async fn release(self) -> Result<bool, redis::RedisError> {
        let n: i64 = RELEASE
            .key(&self.key)
            .arg(&self.token)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(n == 1)
    }
}
