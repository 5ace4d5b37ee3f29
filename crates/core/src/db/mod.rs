//! PostgreSQL access through diesel-async: the pool, embedded migrations, and one module per
//! table.

pub mod incidents;
pub mod items;
pub mod schema;

use std::time::Duration;

use diesel::sql_types::BigInt;
use diesel_async::{
    async_connection_wrapper::AsyncConnectionWrapper,
    pooled_connection::{
        deadpool::Pool, AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
    },
    AsyncConnection, AsyncPgConnection, RunQueryDsl,
};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

pub type PgPool = Pool<AsyncPgConnection>;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations");

/// Any advisory lock id works as long as every stalewatch process uses the same one.
const MIGRATION_LOCK_ID: i64 = 0x5741_4c45_5741_5443; // "WALEWATC"

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("PostgreSQL is unavailable: {0} (is it running, and is DATABASE_URL right?)")]
    Unavailable(String),
    #[error("query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("the incident of {0} kept changing under concurrent writers; retry the check")]
    Contended(String),
    #[error("migrations failed: {0}")]
    Migration(String),
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for DbError {
    fn from(e: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        DbError::Unavailable(e.to_string())
    }
}

impl From<diesel::ConnectionError> for DbError {
    fn from(e: diesel::ConnectionError) -> Self {
        DbError::Unavailable(e.to_string())
    }
}

/// A pool that fails fast (5 s) when PostgreSQL is down instead of queueing callers forever.
///
/// Connections are handed out without the default `SELECT 1` test: that doubled the round
/// trips of a PUT. A connection that died (server restart) fails its first query and is
/// dropped by the pool; the caller sees a 503 or a retried job, once per dead connection.
pub fn pool(database_url: &str, size: usize) -> Result<PgPool, DbError> {
    let mut config = ManagerConfig::default();
    config.recycling_method = RecyclingMethod::Fast;
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(database_url, config);
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| DbError::Unavailable(e.to_string()))
}

/// Applies pending migrations. Holds a PostgreSQL advisory lock meanwhile, so an API and a
/// worker starting together don't both try to create the same tables.
pub async fn migrate(database_url: &str) -> Result<Vec<String>, DbError> {
    let mut conn = AsyncPgConnection::establish(database_url).await?;
    diesel::sql_query("SELECT pg_advisory_lock($1)")
        .bind::<BigInt, _>(MIGRATION_LOCK_ID)
        .execute(&mut conn)
        .await?;
    // diesel's migration harness is synchronous; run it on a blocking thread over the same
    // connection so the lock and the migrations share one session.
    let (conn, applied) = tokio::task::spawn_blocking(move || {
        let mut wrapper: AsyncConnectionWrapper<AsyncPgConnection> = conn.into();
        let applied = wrapper
            .run_pending_migrations(MIGRATIONS)
            .map(|versions| versions.iter().map(|v| v.to_string()).collect::<Vec<_>>())
            .map_err(|e| DbError::Migration(e.to_string()));
        (wrapper.into_inner(), applied)
    })
    .await
    .map_err(|e| DbError::Migration(e.to_string()))?;
    let mut conn = conn;
    diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<BigInt, _>(MIGRATION_LOCK_ID)
        .execute(&mut conn)
        .await?;
    applied
}

/// Cheap liveness probe for /readyz.
pub async fn ping(pool: &PgPool) -> Result<(), DbError> {
    let mut conn = pool.get().await?;
    diesel::sql_query("SELECT 1").execute(&mut conn).await?;
    Ok(())
}
