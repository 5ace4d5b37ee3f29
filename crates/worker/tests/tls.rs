//! The worker binary with every connection over TLS checked against a CA the test makes:
//! PostgreSQL with `sslmode=verify-full` (migrations, the pool, change capture's replication
//! connection) and Redis over `rediss://` (cache, queues, keyspace notifications), and the
//! API beside it.

mod common;

use std::time::Duration;

use common::{api, metric, wait_http, worker};
use diesel::{sql_types::BigInt, QueryableByName};
use diesel_async::RunQueryDsl;
use stalewatch_testkit::{eventually, free_port, tls, tls::Pki, PgServer, TestEnv};

#[derive(QueryableByName)]
struct Sessions {
    #[diesel(sql_type = BigInt)]
    plain: i64,
    #[diesel(sql_type = BigInt)]
    walsenders: i64,
}

#[tokio::test]
async fn the_worker_runs_over_verified_tls_and_stops_on_an_untrusted_certificate() {
    let pki = Pki::new(&["localhost"]);
    let pg = PgServer::start(free_port()).await;
    pg.use_tls(&pki.cert, &pki.key).await;
    let env = TestEnv::on_database(&pg.create_database("app").await.unwrap())
        .await
        .unwrap();
    let redis_port = free_port();
    let _redis = tls::redis_server(redis_port, &pki).await;

    let database_url = format!(
        "postgres://postgres@localhost:{}/app?sslmode=verify-full",
        pg.port()
    );
    let redis_url = format!("rediss://localhost:{redis_port}");
    let ca = pki.ca.display().to_string();
    let (w, port) = worker(
        &env,
        &[
            ("DATABASE_URL", &database_url),
            ("DATABASE_CA_FILE", &ca),
            ("REDIS_URL", &redis_url),
            ("REDIS_CA_FILE", &ca),
            ("CHANGE_CAPTURE", "logical"),
            ("KEYSPACE_NOTIFICATIONS", "on"),
        ],
    );
    wait_http(&format!("http://127.0.0.1:{port}/healthz")).await;
    eventually(
        Duration::from_secs(60),
        "the worker to read the replication slot",
        || async { (metric(port, "stalewatch_capture_active", &[]).await == 1.0).then_some(()) },
    )
    .await;
    // The API over the same connections: /readyz asks both stores.
    let (api, api_url) = api(
        &env,
        &[
            ("DATABASE_URL", &database_url),
            ("DATABASE_CA_FILE", &ca),
            ("REDIS_URL", &redis_url),
            ("REDIS_CA_FILE", &ca),
        ],
    );
    wait_http(&format!("{api_url}/readyz")).await;

    let mut conn = env.pool.get().await.unwrap();
    let sessions: Sessions = diesel::sql_query(
        "SELECT count(*) FILTER (WHERE NOT s.ssl) AS plain, \
         count(*) FILTER (WHERE a.backend_type = 'walsender') AS walsenders \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.backend_type IN ('client backend', 'walsender')",
    )
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        sessions.plain,
        0,
        "a session without TLS:\n{}\n{}",
        w.output(),
        api.output()
    );
    assert!(sessions.walsenders >= 1, "no replication session");
    drop((w, api));

    // The server's certificate without its CA: the worker stops at once, saying why, and
    // without the password.
    let untrusted = format!(
        "postgres://postgres:pw-not-shown@localhost:{}/app?sslmode=verify-full",
        pg.port()
    );
    let (mut w, _) = worker(&env, &[("DATABASE_URL", &untrusted)]);
    let status = eventually(Duration::from_secs(30), "the worker to stop", || {
        let status = w.child.try_wait().unwrap();
        async move { status }
    })
    .await;
    let output = w.output();
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("UnknownIssuer") && output.contains("DATABASE_CA_FILE"),
        "{output}"
    );
    assert!(!output.contains("pw-not-shown"), "{output}");
}
