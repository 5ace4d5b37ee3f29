//! TLS to PostgreSQL and Redis, against servers of the test's own whose certificates the test
//! makes: a CA, and server certificates it signs.

use std::path::Path;

use diesel::{sql_types::Bool, QueryableByName};
use diesel_async::RunQueryDsl;
use stalewatch_core::{
    cache, config::Config, db, incident::Source, jobs::CheckJob, keys::Keys, queue,
};
use stalewatch_testkit::{free_port, tls::Pki, PgServer};

fn config(vars: &[(&str, &str)]) -> Config {
    Config::from_lookup(|k| {
        vars.iter()
            .find(|(var, _)| *var == k)
            .map(|(_, v)| v.to_string())
    })
    .unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[derive(QueryableByName)]
struct Encrypted {
    #[diesel(sql_type = Bool)]
    ssl: bool,
}

#[tokio::test]
async fn postgres_over_tls_is_checked_against_the_given_ca() {
    // Named `localhost` only: `127.0.0.1` passes `verify-ca` but not `verify-full`.
    let pki = Pki::new(&["localhost"]);
    let pg = PgServer::start(free_port()).await;
    pg.use_tls(&pki.cert, &pki.key).await;
    let url = |host: &str, query: &str| {
        format!("postgres://postgres@{host}:{}/postgres?{query}", pg.port())
    };

    // sslmode=require with a CA file (libpq: checked as verify-ca): migrations, a query.
    let require = url(
        "127.0.0.1",
        &format!("sslmode=require&sslrootcert={}", path(&pki.ca)),
    );
    db::migrate(&require).await.unwrap();
    let pool = db::pool(&require, 2).unwrap();
    db::ping(&pool).await.unwrap();
    let mut conn = pool.get().await.unwrap();
    let row: Encrypted =
        diesel::sql_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .get_result(&mut conn)
            .await
            .unwrap();
    assert!(row.ssl, "the pool's connection is not encrypted");

    // verify-full by host name, the CA given as DATABASE_CA_FILE.
    let full = config(&[
        ("DATABASE_URL", &url("localhost", "sslmode=verify-full")),
        ("DATABASE_CA_FILE", path(&pki.ca)),
    ]);
    db::ping(&db::pool(&full.database_url, 1).unwrap())
        .await
        .unwrap();
    // verify-ca accepts a certificate that does not name the host; verify-full does not.
    let ca = format!("sslrootcert={}", path(&pki.ca));
    db::establish(&url("127.0.0.1", &format!("sslmode=verify-ca&{ca}")))
        .await
        .unwrap();
    let wrong_name = db::establish(&url("127.0.0.1", &format!("sslmode=verify-full&{ca}")))
        .await
        .err()
        .expect("verify-full accepted a certificate for another name")
        .to_string();
    assert!(wrong_name.contains("not valid for name"), "{wrong_name}");

    // Without the CA (the system's roots), or with another CA: refused, saying why.
    for query in [
        "sslmode=verify-full".to_string(),
        format!("sslmode=verify-full&sslrootcert={}", path(&pki.other_ca)),
    ] {
        let e = db::establish(&url("localhost", &query))
            .await
            .err()
            .expect("an untrusted certificate was accepted")
            .to_string();
        assert!(
            e.contains("UnknownIssuer") && e.contains("DATABASE_CA_FILE"),
            "{query}: {e}"
        );
    }
    // sslmode=require without a CA encrypts without checking; disable does not encrypt.
    db::establish(&url("localhost", "sslmode=require"))
        .await
        .unwrap();
    let mut plain = db::establish(&url("127.0.0.1", "sslmode=disable"))
        .await
        .unwrap();
    let row: Encrypted =
        diesel::sql_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .get_result(&mut plain)
            .await
            .unwrap();
    assert!(!row.ssl);
}

#[tokio::test]
async fn rediss_is_checked_against_the_given_ca() {
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    let port = free_port();
    let _server = stalewatch_testkit::tls::redis_server(port, &pki).await;
    let url = format!("rediss://127.0.0.1:{port}");

    let config = config(&[("REDIS_URL", &url), ("REDIS_CA_FILE", path(&pki.ca))]);
    let redis = config.redis().unwrap();
    let mut conn = cache::connect(&redis).await.unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");

    // The queues (apalis-redis) over the same kind of connection.
    let keys = Keys::new("tls-test:");
    let mut queue_conn = queue::connect(&redis).await.unwrap();
    let job = CheckJob::for_items(&keys, &[uuid::Uuid::new_v4()], Source::Manual);
    queue::push(&mut queue_conn, &keys, vec![(job, None)])
        .await
        .unwrap();
    // The server is the test's own: any key is the queue's.
    let queued: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!queued.is_empty(), "the job was not queued");

    // Without the CA (the system's roots), or with another CA: refused, saying why.
    for ca in [None, Some(pki.other_ca.as_path())] {
        let untrusted = stalewatch_core::tls::redis(&url, ca).unwrap();
        let e = cache::connect(&untrusted)
            .await
            .expect_err("an untrusted certificate was accepted")
            .to_string();
        assert!(e.contains("UnknownIssuer"), "{ca:?}: {e}");
    }
}
