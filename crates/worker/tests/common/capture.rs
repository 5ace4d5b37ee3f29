//! The application of the change-capture tests (capture.rs: a logical replication slot;
//! outbox.rs: the outbox table): accounts changed in plain SQL behind stalewatch's back, and
//! a worker with the sweep and keyspace notifications off, so that only the capture under test
//! can find a divergence.

use std::time::Duration;

use diesel_async::RunQueryDsl;
use stalewatch_testkit::{eventually, PgServer, Proc, TestEnv};

use super::{incidents_of, metric, sql, wait_http, worker, EntitiesFile};

pub const SCHEMA: &str = "
CREATE TABLE accounts (
    id      bigint PRIMARY KEY,
    email   text   NOT NULL,
    balance bigint NOT NULL DEFAULT 0,
    version bigint NOT NULL DEFAULT 1
)";

/// Each account cached whole under `acct:{id}`, written by the application itself.
pub const ACCOUNTS: &str = r#"
[[entity]]
name = "account"
table = "public.accounts"
primary_key = ["id"]
key = "${KEY_PREFIX}acct:{id}"
representation = "json"
columns = ["id", "email", "balance", "version"]
version = "version"
policy = "write_through"
"#;

/// How the worker learns of committed changes (its CHANGE_CAPTURE).
#[derive(Clone, Copy)]
pub enum Capture {
    /// A logical replication slot: needs `wal_level = logical`, a PostgreSQL of the test's own.
    Logical,
    /// Triggers writing an outbox table the worker reads: any PostgreSQL.
    Outbox,
}

impl Capture {
    fn setting(self) -> &'static str {
        match self {
            Capture::Logical => "logical",
            Capture::Outbox => "outbox",
        }
    }

    /// The name of the tests' ENTITIES files.
    fn file_name(self) -> &'static str {
        match self {
            Capture::Logical => "capture",
            Capture::Outbox => "outbox",
        }
    }

    /// What the worker reads, and the line it logs once it does.
    fn source(self) -> (&'static str, &'static str) {
        match self {
            Capture::Logical => ("the replication slot", "reading committed changes"),
            Capture::Outbox => ("the outbox", "reading the change outbox"),
        }
    }
}

pub struct App {
    // Field order is drop order: the environment's pool goes before its server.
    pub env: TestEnv,
    pub entities: EntitiesFile,
    capture: Capture,
    _server: Option<PgServer>,
}

impl App {
    /// The accounts table in `env`'s database and `entities` in a file; `server`, when the
    /// database is on a PostgreSQL of the test's own, is kept running as long as the app.
    pub async fn start(
        env: TestEnv,
        server: Option<PgServer>,
        capture: Capture,
        entities: &str,
    ) -> App {
        let file = EntitiesFile::write(capture.file_name(), entities);
        let app = App {
            env,
            entities: file,
            capture,
            _server: server,
        };
        app.sql(SCHEMA).await;
        app
    }

    pub async fn sql(&self, query: &str) {
        sql(&self.env, query).await;
    }

    pub fn key(&self, id: i64) -> String {
        format!("{}acct:{id}", self.env.prefix)
    }

    /// Accounts `ids`, each cached exactly as the row is (the application's own writes).
    pub async fn add_accounts(&self, ids: std::ops::RangeInclusive<i64>) {
        let (lo, hi) = (ids.start(), ids.end());
        self.sql(&format!(
            "INSERT INTO accounts (id, email) SELECT i, 'u' || i || '@example.com' \
             FROM generate_series({lo}, {hi}) i"
        ))
        .await;
        self.cache(lo, hi).await;
    }

    pub async fn cache(&self, lo: &i64, hi: &i64) {
        #[derive(diesel::QueryableByName)]
        struct Doc {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            id: i64,
            #[diesel(sql_type = diesel::sql_types::Text)]
            doc: String,
        }
        let mut conn = self.env.pool.get().await.unwrap();
        let docs: Vec<Doc> = diesel::sql_query(format!(
            "SELECT id, json_build_object('id', id, 'email', email, 'balance', balance, \
             'version', version)::text AS doc FROM accounts WHERE id BETWEEN {lo} AND {hi}"
        ))
        .load(&mut conn)
        .await
        .unwrap();
        let mut redis = self.env.cache.connection();
        for chunk in docs.chunks(500) {
            let mut cmd = redis::cmd("MSET");
            for d in chunk {
                cmd.arg(self.key(d.id)).arg(&d.doc);
            }
            cmd.query_async::<()>(&mut redis).await.unwrap();
        }
    }

    /// A worker on this app's capture, with `extra` settings after (and so over) its own.
    pub fn worker(&self, extra: &[(&str, &str)]) -> (Proc, u16) {
        let own = [
            self.entities.var(),
            ("CHANGE_CAPTURE", self.capture.setting()),
            ("SWEEP_INTERVAL_MS", "0"),
            ("KEYSPACE_NOTIFICATIONS", "off"),
            ("GRACE_PERIOD_MS", "1000"),
        ];
        worker(&self.env, &[&own[..], extra].concat())
    }

    /// Waits until the worker reads its source of changes (for the outbox: its triggers are
    /// on the table by then).
    pub async fn reading(&self, port: u16, w: &Proc) {
        let (source, line) = self.capture.source();
        wait_http(&format!("http://127.0.0.1:{port}/healthz")).await;
        eventually(
            Duration::from_secs(60),
            &format!("the worker to read {source}"),
            || async {
                (metric(port, "stalewatch_capture_active", &[]).await == 1.0).then_some(())
            },
        )
        .await;
        assert!(w.output().contains(line), "{}", w.output());
    }

    pub async fn state_of(&self, id: i64) -> Option<(String, String)> {
        incidents_of(&self.env, &self.key(id))
            .await
            .into_iter()
            .next()
            .map(|i| (i.state, i.kind))
    }

    /// Waits until `id`'s newest incident is in `state`, and returns its kind.
    pub async fn until_state(&self, id: i64, state: &str, within: Duration) -> String {
        eventually(within, &format!("account {id} to be {state}"), || async {
            self.state_of(id)
                .await
                .filter(|(s, _)| s == state)
                .map(|(_, k)| k)
        })
        .await
    }
}
