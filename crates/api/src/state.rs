//! What every handler shares.

use anyhow::Context;
use redis::aio::ConnectionManager;
use stalewatch_core::{
    cache::{self, Cache},
    check::Checker,
    config::Config,
    db::{self, PgPool},
    keys::Keys,
    metrics::Metrics,
};

use crate::{enqueue::CheckQueue, failure::Injector};

#[derive(Clone)]
pub struct AppState {
    pub config: Config,
    pub pool: PgPool,
    pub cache: Cache,
    pub metrics: Metrics,
    pub checker: Checker,
    pub checks: CheckQueue,
    pub injector: Injector,
    pub queue_conn: ConnectionManager,
}

impl AppState {
    pub async fn connect(config: Config) -> anyhow::Result<Self> {
        let pool = db::pool(&config.database_url, config.database_pool_size)?;
        let keys = Keys::new(config.key_prefix.clone());
        let cache = Cache::new(
            cache::connect(&config.redis_url)
                .await
                .with_context(|| format!("connecting to Redis at {}", config.redis_url))?,
            keys.clone(),
        );
        let queue_conn = stalewatch_core::queue::connect(&config.redis_url).await?;
        let metrics = Metrics::new();
        let checker = Checker::new(
            &config,
            pool.clone(),
            cache.clone(),
            metrics.clone(),
            queue_conn.clone(),
        );
        let checks = CheckQueue::start(
            queue_conn.clone(),
            keys,
            metrics.clone(),
            config.post_write_check,
        );
        let injector = Injector::new(
            config.failure_mode,
            config.failure_delay,
            cache.clone(),
            config.cache_ttl,
        );
        Ok(Self {
            config,
            pool,
            cache,
            metrics,
            checker,
            checks,
            injector,
            queue_conn,
        })
    }
}
