//! What every handler shares.

use std::sync::Arc;

use anyhow::Context;
use redis::aio::ConnectionManager;
use stalewatch_core::{
    cache::{self, Cache},
    check::Checker,
    config::Config,
    db::{self, PgPool},
    keys::Keys,
    metrics::Metrics,
    watch::{WatchError, Watched},
};

use crate::{enqueue::CheckQueue, error::ApiError, failure::Injector};

#[derive(Clone)]
pub struct AppState {
    pub config: Config,
    pub pool: PgPool,
    pub cache: Cache,
    pub metrics: Metrics,
    /// Built once the entity model is loaded: see [`AppState::checker`].
    checker: Arc<tokio::sync::OnceCell<Checker>>,
    pub checks: CheckQueue,
    pub injector: Injector,
    pub queue_conn: ConnectionManager,
}

impl AppState {
    /// Connects to PostgreSQL and Redis and loads the watched entities. Refuses a
    /// configuration without ADMIN_TOKEN (a token, or `disabled` said explicitly).
    pub async fn connect(config: Config) -> anyhow::Result<Self> {
        config.require_admin_token()?;
        let pool = db::pool(&config.database_url, config.database_pool_size)?;
        let keys = Keys::new(config.key_prefix.clone());
        // The application's cache (the demo's items, the watched keys) and stalewatch's own
        // Redis (queues, the rebuild lock, the sweep's rounds): one Redis unless
        // CACHE_REDIS_URL says otherwise.
        let cache = Cache::new(
            cache::open(&config.cache_redis()?, cache::SHARED)
                .await
                .with_context(|| {
                    format!(
                        "connecting to the watched cache at {}",
                        stalewatch_core::redact::url(config.cache_redis_url())
                    )
                })?,
            keys.clone(),
        );
        let queue_conn = stalewatch_core::queue::connect(config.redis()?)
            .await
            .with_context(|| {
                format!(
                    "connecting to stalewatch's Redis at {}",
                    stalewatch_core::redact::url(&config.redis_url)
                )
            })?;
        let metrics = Metrics::new();

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
        let state = Self {
            config,
            pool,
            cache,
            metrics,
            checker: Arc::default(),
            checks,
            injector,
            queue_conn,
        };
        // A mistake in the ENTITIES file stops the API at start-up. PostgreSQL being down
        // does not: the API answers 503 meanwhile, and loads the model on first need.
        match state.checker().await {
            Err(ApiError::Unavailable(e)) => {
                tracing::warn!(error = %e, "entity model not loaded yet: PostgreSQL is unavailable")
            }
            Err(e) => return Err(e).context("reading the watched entities (ENTITIES)"),
            Ok(_) => {}
        }
        Ok(state)
    }

    /// The checker, once the watched entities are loaded and checked against the live tables.
    pub async fn checker(&self) -> Result<&Checker, ApiError> {
        self.checker
            .get_or_try_init(|| async {
                let watched = Watched::configured(&self.config, &self.pool)
                    .await
                    .map_err(|e| match e {
                        WatchError::Db(e) => ApiError::from(e),
                        other => ApiError::internal(other.to_string()),
                    })?;
                Ok(Checker::new(
                    &self.config,
                    self.pool.clone(),
                    self.cache.clone(),
                    self.metrics.clone(),
                    self.queue_conn.clone(),
                    Arc::new(watched),
                ))
            })
            .await
    }
}
