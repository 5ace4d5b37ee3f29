//! PostgreSQL access through diesel-async: the pool, embedded migrations, and one module per
//! table.

pub mod incidents;
pub mod items;
pub mod schema;

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool::managed::{self, Metrics, Object, RecycleResult};
use diesel::sql_types::{BigInt, Timestamptz};
use diesel_async::{
    async_connection_wrapper::AsyncConnectionWrapper,
    pooled_connection::{
        AsyncDieselConnectionManager, ManagerConfig, PoolError as ConnError, RecyclingMethod,
    },
    AsyncPgConnection, RunQueryDsl,
};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

pub type PgPool = managed::Pool<Manager>;
pub type PoolError = managed::PoolError<ConnError>;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations");

/// Any advisory lock id works as long as every stalewatch process uses the same one.
const MIGRATION_LOCK_ID: i64 = 0x5741_4c45_5741_5443; // "WALEWATC"

/// What can go wrong talking to PostgreSQL, in classes a caller can act on: retry later
/// (`Unavailable`, `Contended`), the data was refused (`Conflict`, `Rejected`), a stored row
/// this service cannot read (`Undecodable`), or a fault of ours (`Query`, `Migration`).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("PostgreSQL is unavailable: {0} (is it running, and is DATABASE_URL right?)")]
    Unavailable(String),
    /// A unique or exclusion constraint refused the write.
    #[error("conflicts with an existing row: {0}")]
    Conflict(String),
    /// PostgreSQL refused the values themselves (a CHECK, NOT NULL or foreign key constraint,
    /// or a value it cannot store).
    #[error("PostgreSQL refused the values: {0}")]
    Rejected(String),
    /// A stored row that this service cannot decode (for example jsonb nested deeper than
    /// the JSON parser's recursion limit, written straight in SQL).
    #[error("{what} cannot be decoded: {reason}")]
    Undecodable { what: String, reason: String },
    #[error("query failed: {0}")]
    Query(diesel::result::Error),
    #[error("the incident of {0} kept changing under concurrent writers; retry the check")]
    Contended(String),
    #[error("migrations failed: {0}")]
    Migration(String),
}

impl DbError {
    /// True when the same operation may succeed on another connection or a little later.
    pub fn is_transient(&self) -> bool {
        matches!(self, DbError::Unavailable(_) | DbError::Contended(_))
    }
}

impl From<diesel::result::Error> for DbError {
    fn from(e: diesel::result::Error) -> Self {
        classify(e)
    }
}

/// Sorts diesel's errors into [`DbError`]'s classes. diesel-async reports a lost connection
/// as `UnableToSendCommand` and keeps SQLSTATE codes to itself for everything outside its
/// short list of kinds, so the few server messages that mean "this session is gone or the
/// server is not accepting work" are recognised by their text.
fn classify(e: diesel::result::Error) -> DbError {
    use diesel::result::{DatabaseErrorKind as K, Error as E};
    match e {
        E::DatabaseError(kind, info) => {
            let message = info.message().to_string();
            match kind {
                K::UnableToSendCommand | K::ClosedConnection | K::ReadOnlyTransaction => {
                    DbError::Unavailable(message)
                }
                K::SerializationFailure => DbError::Contended(message),
                K::UniqueViolation | K::ExclusionViolation => DbError::Conflict(message),
                K::CheckViolation
                | K::NotNullViolation
                | K::ForeignKeyViolation
                | K::RestrictViolation => DbError::Rejected(message),
                _ if is_unavailable_message(&message) => DbError::Unavailable(message),
                _ if is_data_exception(&message) => DbError::Rejected(message),
                _ => DbError::Query(E::DatabaseError(kind, info)),
            }
        }
        E::DeserializationError(reason) => DbError::Undecodable {
            what: "a row".into(),
            reason: reason.to_string(),
        },
        other => DbError::Query(other),
    }
}

/// Server messages of SQLSTATE classes 08 (connection), 53 (resources) and 57 (operator
/// intervention): the session or the server is going away, not the statement's fault.
fn is_unavailable_message(message: &str) -> bool {
    const MARKERS: [&str; 6] = [
        "terminating connection",
        "the database system is",
        "too many clients",
        "server closed the connection",
        "connection closed",
        "canceling statement due to conflict with recovery",
    ];
    MARKERS.iter().any(|m| message.contains(m))
}

/// Messages of SQLSTATE class 22 (data exception) that a request's values can cause.
fn is_data_exception(message: &str) -> bool {
    const MARKERS: [&str; 5] = [
        "invalid byte sequence",
        "unsupported Unicode escape sequence",
        "invalid input syntax",
        "out of range",
        "value too long",
    ];
    MARKERS.iter().any(|m| message.contains(m))
}

impl From<PoolError> for DbError {
    fn from(e: PoolError) -> Self {
        DbError::Unavailable(e.to_string())
    }
}

impl From<diesel::ConnectionError> for DbError {
    fn from(e: diesel::ConnectionError) -> Self {
        DbError::Unavailable(e.to_string())
    }
}

/// Connections idle longer than this are tested (`SELECT 1`) before they are handed out.
const VERIFY_AFTER_IDLE: Duration = Duration::from_secs(1);

/// diesel-async's pool manager, testing only connections that may be dead: those that sat
/// idle, and, once one connection was found dead, every connection last handed out before.
///
/// Testing every checkout doubled the round trips of a PUT; testing none handed out
/// connections that had died without the client noticing (a failover, a dropped NAT entry),
/// each failing one request. A busy connection was just used successfully, so only idle ones
/// are worth a test. When a connection turns out dead, its siblings most likely died with
/// it (a failover kills them all): [`idempotent`] marks them suspect before it retries, so
/// the retry gets a tested or a new connection, not another dead one.
pub struct Manager {
    inner: AsyncDieselConnectionManager<AsyncPgConnection>,
    /// Connections last handed out before this instant are tested before reuse.
    suspect_before: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Manager {
    /// Marks every connection handed out until now as possibly dead.
    pub fn suspect_all(&self) {
        *self.suspect_before.lock().expect("not poisoned") = Some(std::time::Instant::now());
    }
}

impl managed::Manager for Manager {
    type Type = AsyncPgConnection;
    type Error = ConnError;

    async fn create(&self) -> Result<AsyncPgConnection, ConnError> {
        self.inner.create().await
    }

    async fn recycle(
        &self,
        conn: &mut AsyncPgConnection,
        metrics: &Metrics,
    ) -> RecycleResult<ConnError> {
        // Fast: drops connections whose socket is known closed or whose transaction broke.
        self.inner.recycle(conn, metrics).await?;
        let handed_out = metrics.recycled.unwrap_or(metrics.created);
        let suspect = self
            .suspect_before
            .lock()
            .expect("not poisoned")
            .is_some_and(|before| handed_out < before);
        if suspect || metrics.last_used() > VERIFY_AFTER_IDLE {
            diesel::sql_query("SELECT 1")
                .execute(conn)
                .await
                .map_err(ConnError::QueryError)?;
        }
        Ok(())
    }
}

/// One connection to `database_url`, over TLS as its `sslmode` and `sslrootcert` ask
/// (`crate::tls`). Every PostgreSQL session of stalewatch but the replication one is opened
/// here.
pub async fn establish(database_url: &str) -> diesel::ConnectionResult<AsyncPgConnection> {
    use diesel::ConnectionError::BadConnection;
    let (config, tls) =
        crate::tls::postgres(database_url).map_err(|e| BadConnection(e.to_string()))?;
    let (client, connection) = config.connect(tls).await.map_err(|e| {
        // tokio-postgres keeps the cause (the server's message, the certificate's fault) out
        // of its own message: the whole chain is what tells an operator what to fix.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            message = format!("{message}: {cause}");
            source = cause.source();
        }
        let message = crate::redact::url(&message);
        BadConnection(if message.contains("invalid peer certificate") {
            format!("{message} (the server's certificate is not trusted for this host name: set DATABASE_CA_FILE, or sslrootcert in DATABASE_URL, to the PEM file of its CA)")
        } else {
            message
        })
    })?;
    AsyncPgConnection::try_from_client_and_connection(client, connection).await
}

/// A pool that fails fast (5 s) when PostgreSQL is down instead of queueing callers forever.
/// A `DATABASE_URL` whose TLS settings cannot work (a bad `sslmode`, an unreadable CA file)
/// fails here, before any connection is tried.
pub fn pool(database_url: &str, size: usize) -> Result<PgPool, DbError> {
    crate::tls::postgres(database_url).map_err(|e| DbError::Unavailable(e.to_string()))?;
    let mut config = ManagerConfig::default();
    config.recycling_method = RecyclingMethod::Fast;
    config.custom_setup = Box::new(|url| Box::pin(establish(url)));
    let inner =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(database_url, config);
    managed::Pool::builder(Manager {
        inner,
        suspect_before: std::sync::Mutex::new(None),
    })
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
    let mut conn = establish(database_url).await?;
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

/// Runs an operation that is safe to repeat, retrying it once on a fresh connection when the
/// first one turns out to be dead (a server restart, a failover). The dead connection is
/// taken out of the pool rather than returned to it.
pub async fn idempotent<T>(
    pool: &PgPool,
    op: impl AsyncFn(&mut AsyncPgConnection) -> Result<T, DbError>,
) -> Result<T, DbError> {
    let mut conn = pool.get().await?;
    match op(&mut conn).await {
        Err(DbError::Unavailable(reason)) => {
            tracing::debug!(%reason, "PostgreSQL connection lost; retrying once on a fresh one");
            drop(Object::take(conn));
            pool.manager().suspect_all();
            let mut conn = pool.get().await?;
            op(&mut conn).await
        }
        other => other,
    }
}

/// PostgreSQL's clock: the one clock of every incident time, whichever process observes.
/// Takes a shared reference so that it can be pipelined with the query it dates.
pub async fn now(mut conn: &AsyncPgConnection) -> Result<DateTime<Utc>, DbError> {
    Ok(diesel::select(diesel::dsl::sql::<Timestamptz>("now()"))
        .get_result(&mut conn)
        .await?)
}

/// Cheap liveness probe for /readyz.
pub async fn ping(pool: &PgPool) -> Result<(), DbError> {
    let mut conn = pool.get().await?;
    diesel::sql_query("SELECT 1").execute(&mut conn).await?;
    Ok(())
}
