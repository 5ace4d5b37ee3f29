//! The test fixture every crate's tests share: a fresh PostgreSQL database cloned from a
//! migrated template, and a Redis key prefix of its own, both removed when the test ends.
//!
//! Tests therefore run in parallel (nextest runs each in its own process) without touching
//! each other's data or anyone else's.
//!
//! `TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432`) and `TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`) say where the servers are.
//!
//! Deadlines: every timeout a test waits on (`eventually`, `wait_port`, `Proc::terminate`,
//! `PgServer`) is multiplied by `STALEWATCH_TEST_SCALE` (default 1; see [`scale`]). The
//! timeouts written in the tests are already generous for a busy 2-core machine; a slower
//! one (a sanitizer build, an emulated CPU, a loaded laptop) sets e.g.
//! `STALEWATCH_TEST_SCALE=3` rather than every test growing its own margins. A deadline only
//! bounds how long a failing test takes, so a larger one never hides a bug.

use std::{sync::OnceLock, time::Duration};

use anyhow::{Context, Result};
use diesel::{sql_types::BigInt, QueryableByName};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use stalewatch_core::{
    cache::{self, Cache},
    config::Config,
    db::{self, PgPool},
    keys::Keys,
};
use uuid::Uuid;

mod pg_server;
mod redis_cluster;
mod tcp_proxy;
pub mod tls;
pub use pg_server::PgServer;
pub use redis_cluster::{ClusterNode, RedisCluster};
pub use tcp_proxy::TcpProxy;

const TEMPLATE_LOCK_ID: i64 = 0x5357_5445_5354_4b54; // "SWTESTKT"

pub fn pg_base_url() -> String {
    let url = std::env::var("TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    // Keep scheme and authority; the database name is ours to choose.
    match url.find("://").map(|i| i + 3) {
        Some(start) => match url[start..].find('/') {
            Some(slash) => url[..start + slash].to_string(),
            None => url,
        },
        None => url,
    }
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn template_name() -> String {
    format!("stalewatch_tpl_{}", env!("MIGRATIONS_HASH"))
}

/// The admin token of the API under test (`TestEnv::config`, `TestEnv::env_vars`).
pub const ADMIN_TOKEN: &str = "stalewatch-test-admin-token";

/// One test's private database and Redis prefix.
pub struct TestEnv {
    /// The database on the shared server this test made and drops; None for a database on
    /// a test's own server (`TestEnv::on_database`), which goes with that server.
    pub db_name: Option<String>,
    pub database_url: String,
    /// stalewatch's own Redis (REDIS_URL).
    pub redis_url: String,
    /// The watched cache (CACHE_REDIS_URL): `redis_url` unless the test gave another
    /// ([`TestEnv::with_cache`]), or a cluster's seed nodes ([`TestEnv::with_cache_cluster`]).
    pub cache_redis_url: String,
    /// CACHE_REDIS_CLUSTER.
    pub cache_cluster: bool,
    pub prefix: String,
    pub pool: PgPool,
    /// The watched cache.
    pub cache: Cache,
    /// stalewatch's own Redis: its rounds, leases, locks and queues.
    pub own: redis::aio::ConnectionManager,
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn admin() -> Result<AsyncPgConnection> {
    let url = format!("{}/postgres", pg_base_url());
    AsyncPgConnection::establish(&url).await.with_context(|| {
        format!("connecting to {url}: is PostgreSQL running? (scripts/test starts it)")
    })
}

async fn database_exists(conn: &mut AsyncPgConnection, name: &str) -> Result<bool> {
    let row: Exists = diesel::sql_query("SELECT count(*) AS n FROM pg_database WHERE datname = $1")
        .bind::<diesel::sql_types::Text, _>(name)
        .get_result(conn)
        .await?;
    Ok(row.n > 0)
}

/// Creates and migrates the template once; every later test clones it.
async fn ensure_template(conn: &mut AsyncPgConnection) -> Result<String> {
    let template = template_name();
    diesel::sql_query("SELECT pg_advisory_lock($1)")
        .bind::<BigInt, _>(TEMPLATE_LOCK_ID)
        .execute(conn)
        .await?;
    let result = async {
        if !database_exists(conn, &template).await? {
            // Migrate under a temporary name and rename: a crash half-way never leaves a
            // half-migrated template behind.
            let building = format!("{template}_building");
            diesel::sql_query(format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
                .execute(conn)
                .await?;
            diesel::sql_query(format!("CREATE DATABASE {building}"))
                .execute(conn)
                .await?;
            db::migrate(&format!("{}/{building}", pg_base_url())).await?;
            diesel::sql_query(format!("ALTER DATABASE {building} RENAME TO {template}"))
                .execute(conn)
                .await?;
        }
        anyhow::Ok(())
    }
    .await;
    diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<BigInt, _>(TEMPLATE_LOCK_ID)
        .execute(conn)
        .await?;
    result.map(|()| template)
}

impl TestEnv {
    pub async fn new() -> Result<Self> {
        Self::with_redis(&redis_url()).await
    }

    /// A fresh database, and a prefix on the Redis at `redis_url` (a test's own server).
    pub async fn with_redis(redis_url: &str) -> Result<Self> {
        let mut conn = admin().await?;
        let template = ensure_template(&mut conn).await?;
        let id = Uuid::new_v4().simple().to_string();
        let db_name = format!("sw_test_{id}");
        diesel::sql_query(format!("CREATE DATABASE {db_name} TEMPLATE {template}"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating {db_name} from {template}"))?;
        let database_url = format!("{}/{db_name}", pg_base_url());
        let redis_url = redis_url.to_string();
        Self::connect(
            Some(db_name),
            database_url,
            redis_url.clone(),
            redis_url,
            id,
        )
        .await
    }

    /// A fresh database, stalewatch's own keys on the shared Redis, and the watched cache
    /// on the Redis at `cache_redis_url` (a test's own server): CACHE_REDIS_URL.
    pub async fn with_cache(cache_redis_url: &str) -> Result<Self> {
        let mut env = Self::new().await?;
        env.cache_redis_url = cache_redis_url.to_string();
        let conn = cache::connect(cache_redis_url)
            .await
            .with_context(|| format!("connecting to {cache_redis_url}: is it running?"))?;
        env.cache = Cache::new(conn, env.cache.keys().clone());
        Ok(env)
    }

    /// As [`TestEnv::with_cache`], the watched cache a Redis Cluster with seed nodes `seeds`
    /// (comma-separated URLs, [`RedisCluster::seeds`]).
    pub async fn with_cache_cluster(seeds: &str) -> Result<Self> {
        let mut env = Self::new().await?;
        env.cache_redis_url = seeds.to_string();
        env.cache_cluster = true;
        let target = stalewatch_core::tls::redis_cluster(("CACHE_REDIS_URL", ""), seeds, None)?;
        let conn = cache::open(&cache::Target::Cluster(target), cache::SHARED)
            .await
            .with_context(|| format!("connecting to the cluster {seeds}"))?;
        env.cache = Cache::new(conn, env.cache.keys().clone());
        Ok(env)
    }

    /// A prefix on the shared Redis over `database_url`, a database the caller made on a
    /// server of its own (`PgServer::create_database`).
    pub async fn on_database(database_url: &str) -> Result<Self> {
        let id = Uuid::new_v4().simple().to_string();
        Self::connect(None, database_url.to_string(), redis_url(), redis_url(), id).await
    }

    async fn connect(
        db_name: Option<String>,
        database_url: String,
        redis_url: String,
        cache_redis_url: String,
        id: String,
    ) -> Result<Self> {
        let prefix = format!("sw_test:{}:", &id[..12]);
        let pool = db::pool(&database_url, 8)?;
        let conn = cache::connect(&cache_redis_url)
            .await
            .with_context(|| format!("connecting to {cache_redis_url}: is Redis running?"))?;
        let cache = Cache::new(conn, Keys::new(prefix.clone()));
        let own = stalewatch_core::queue::connect(&redis_url)
            .await
            .with_context(|| format!("connecting to {redis_url}: is Redis running?"))?;
        Ok(Self {
            db_name,
            database_url,
            redis_url,
            cache_redis_url,
            cache_cluster: false,
            prefix,
            pool,
            cache,
            own,
        })
    }

    /// The configuration a binary under test should run with. The API's mutating routes
    /// need [`ADMIN_TOKEN`] (`Authorization: Bearer ...`).
    pub fn config(&self) -> Config {
        Config {
            admin_token: stalewatch_core::config::AdminToken::Bearer(
                stalewatch_core::config::Secret::new(ADMIN_TOKEN),
            ),
            database_url: self.database_url.clone(),
            redis_url: self.redis_url.clone(),
            cache_redis_url: self.separate_cache().map(String::from),
            cache_redis_cluster: self.cache_cluster,
            key_prefix: self.prefix.clone(),
            // Slots on the shared server would outlive a killed test and hold its WAL:
            // capture is tested on servers of the tests' own.
            change_capture: stalewatch_core::config::ChangeCapture::Off,
            ..Config::default()
        }
    }

    /// The watched cache's URL when it is not stalewatch's own Redis.
    fn separate_cache(&self) -> Option<&str> {
        (self.cache_redis_url != self.redis_url).then_some(self.cache_redis_url.as_str())
    }

    /// Environment variables for a child process (api or worker) using this test's data.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let mut vars = vec![
            ("DATABASE_URL".into(), self.database_url.clone()),
            ("REDIS_URL".into(), self.redis_url.clone()),
            ("KEY_PREFIX".into(), self.prefix.clone()),
            // As in `config`: a test that captures changes sets CHANGE_CAPTURE=logical.
            ("CHANGE_CAPTURE".into(), "off".into()),
            ("ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        ];
        if let Some(cache) = self.separate_cache() {
            vars.push(("CACHE_REDIS_URL".into(), cache.to_string()));
        }
        if self.cache_cluster {
            vars.push(("CACHE_REDIS_CLUSTER".into(), "true".into()));
        }
        vars
    }

    pub fn keys(&self) -> &Keys {
        self.cache.keys()
    }

    /// A checker on this test's data, watching what `config` says (the built-in entity
    /// unless it names an ENTITIES file), pushing confirmations to this test's queues.
    pub async fn checker(&self, config: &Config) -> Result<stalewatch_core::check::Checker> {
        let watched = stalewatch_core::watch::Watched::configured(config, &self.pool).await?;
        let queue = stalewatch_core::queue::connect(&self.redis_url).await?;
        Ok(stalewatch_core::check::Checker::new(
            config,
            self.pool.clone(),
            self.cache.clone(),
            stalewatch_core::metrics::Metrics::new(),
            queue,
            std::sync::Arc::new(watched),
        ))
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let db_name = self.db_name.clone();
        let prefix = self.prefix.clone();
        let redis_url = self.redis_url.clone();
        // A cluster is the test's own, gone with it.
        let cache_url = self
            .separate_cache()
            .filter(|_| !self.cache_cluster)
            .map(String::from);
        // Drop runs inside the test's runtime; clean up on a thread with a runtime of its own.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup");
            rt.block_on(async move {
                if let Some(cache_url) = cache_url {
                    let _ = delete_prefix(&cache_url, &prefix).await;
                }
                let Some(db_name) = db_name else {
                    let _ = delete_prefix(&redis_url, &prefix).await;
                    return;
                };
                if let Ok(mut conn) = admin().await {
                    let _ = diesel::sql_query(format!(
                        "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
                    ))
                    .execute(&mut conn)
                    .await;
                }
                let _ = delete_prefix(&redis_url, &prefix).await;
            });
        });
        let _ = cleanup.join();
    }
}

async fn delete_prefix(redis_url: &str, prefix: &str) -> Result<()> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    // apalis queue names come from the prefix, spelled without ':' (Keys::queue).
    let queue_base = Keys::new(prefix).queue("");
    for pattern in [format!("{prefix}*"), format!("{queue_base}*")] {
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}

const SCALE_VAR: &str = "STALEWATCH_TEST_SCALE";

/// The factor every test deadline is multiplied by: `STALEWATCH_TEST_SCALE`, default 1.0.
///
/// Panics on a value that is not a finite number above zero: a typo silently meaning 1.0
/// would bring back exactly the flaky timeouts the variable was set to avoid.
pub fn scale() -> f64 {
    static SCALE: OnceLock<f64> = OnceLock::new();
    *SCALE.get_or_init(|| parse_scale(std::env::var(SCALE_VAR)))
}

fn parse_scale(var: Result<String, std::env::VarError>) -> f64 {
    match var {
        Err(std::env::VarError::NotPresent) => 1.0,
        Ok(v) if v.trim().is_empty() => 1.0,
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => f,
            _ => panic!("{SCALE_VAR}={v:?}: expected a number above 0, such as 1.5 or 3"),
        },
        Err(e) => panic!("{SCALE_VAR}: {e}"),
    }
}

/// `d` multiplied by [`scale`]: use it for any deadline a test waits on by other means than
/// [`eventually`] (which scales its own).
pub fn scaled(d: Duration) -> Duration {
    d.mul_f64(scale())
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `timeout`.
///
/// `timeout` is scaled here (`scaled(timeout)`, see [`scale`]), so callers pass the
/// unscaled deadline and must not scale it again.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let timeout = scaled(timeout);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} ({SCALE_VAR}={}) waiting for {what}",
                scale()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Path of a workspace binary (`scripts/test` builds them before the tests run).
pub fn bin_path(name: &str) -> std::path::PathBuf {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run the tests through scripts/test (or `cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// Waits until something listens on `port` (30 s at most, scaled by `eventually`).
pub async fn wait_port(port: u16) {
    eventually(
        Duration::from_secs(30),
        &format!("port {port} to listen"),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await
}

/// A Redis server of the test's own on `port` (no persistence), for tests that stop or
/// restart Redis without disturbing anyone else. Returns once it accepts connections.
pub async fn redis_server(port: u16) -> Proc {
    let port_arg = port.to_string();
    let args = [
        "--port",
        &port_arg,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ];
    let proc = Proc::spawn(std::path::Path::new("redis-server"), &args, &[]);
    wait_port(port).await;
    proc
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A child process (api, worker, redis-server) killed when the test ends. Its output goes to
/// a file so tests can read the log lines it wrote.
pub struct Proc {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
}

impl Proc {
    pub fn spawn(program: &std::path::Path, args: &[&str], env: &[(String, String)]) -> Proc {
        let log = std::env::temp_dir().join(format!(
            "stalewatch-{}-{}.log",
            program.file_name().unwrap().to_string_lossy(),
            Uuid::new_v4().simple()
        ));
        let out = std::fs::File::create(&log).expect("log file");
        let child = std::process::Command::new(program)
            .args(args)
            // The default first, so a test that sets RUST_LOG itself gets its own.
            .env(
                "RUST_LOG",
                std::env::var("TEST_CHILD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        Proc { child, log }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status (None if it had to be killed after `timeout`, which is
    /// scaled like every test deadline: a slow machine is not a shutdown that hung).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + scaled(timeout);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("--- log of the child process: {}", self.log.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_defaults_to_one_and_parses_factors() {
        assert_eq!(parse_scale(Err(std::env::VarError::NotPresent)), 1.0);
        assert_eq!(parse_scale(Ok(" ".into())), 1.0);
        assert_eq!(parse_scale(Ok("2.5".into())), 2.5);
        assert_eq!(parse_scale(Ok(" 3 ".into())), 3.0);
    }

    #[test]
    fn scale_refuses_what_is_not_a_positive_number() {
        for bad in ["0", "-1", "abc", "NaN", "inf", "1,5"] {
            let result = std::panic::catch_unwind(|| parse_scale(Ok(bad.into())));
            let message = result
                .expect_err(bad)
                .downcast::<String>()
                .map(|m| *m)
                .unwrap_or_default();
            assert!(message.contains(SCALE_VAR), "{bad}: {message}");
        }
    }
}
