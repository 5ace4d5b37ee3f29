//! Change capture through the outbox (CHANGE_CAPTURE=outbox), for a PostgreSQL without
//! logical decoding: changes made in plain SQL by someone else, with no cache write and no
//! call to stalewatch, are checked within the settle delay. The worker runs with the sweep and
//! keyspace notifications off, so nothing but the outbox can find the divergence. No slot is
//! involved, so the tests use the shared PostgreSQL, a database each.

mod common;

use std::time::Duration;

use common::{
    capture::{App, Capture, ACCOUNTS},
    *,
};
use diesel_async::RunQueryDsl;
use stalewatch_testkit::{eventually, scaled, TestEnv};

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

impl App {
    /// The shared PostgreSQL, a database each: no slot is involved.
    async fn new() -> App {
        let env = TestEnv::new().await.unwrap();
        App::start(env, None, Capture::Outbox, ACCOUNTS).await
    }

    async fn count(&self, query: &str) -> i64 {
        let mut conn = self.env.pool.get().await.unwrap();
        let c: Count = diesel::sql_query(query)
            .get_result(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        c.n
    }

    async fn outbox_rows(&self) -> i64 {
        self.count("SELECT count(*) AS n FROM stalewatch_outbox")
            .await
    }

    /// Waits until the reader has deleted every outbox row.
    async fn outbox_emptied(&self) {
        eventually(
            Duration::from_secs(30),
            "the outbox to be emptied",
            || async { (self.outbox_rows().await == 0).then_some(()) },
        )
        .await;
    }
}

#[tokio::test]
async fn plain_sql_changes_are_detected_and_confirmed_without_any_cache_write() {
    let app = App::new().await;
    app.add_accounts(1..=3).await;
    let (w, port) = app.worker(&[]);
    app.reading(port, &w).await;
    let installed = app
        .count(
            "SELECT count(*) AS n FROM pg_trigger WHERE tgrelid = 'public.accounts'::regclass \
             AND tgname IN ('stalewatch_outbox_row', 'stalewatch_outbox_truncate')",
        )
        .await;
    assert_eq!(installed, 2, "the row and the TRUNCATE trigger");

    // Someone changes rows in plain SQL and never touches the cache.
    app.sql("UPDATE accounts SET balance = 50, version = version + 1 WHERE id = 1")
        .await;
    // Under write_through, a row with no cached copy is an inconsistency.
    app.sql("INSERT INTO accounts (id, email) VALUES (4, 'new@example.com')")
        .await;
    // The row goes, its key stays behind.
    app.sql("DELETE FROM accounts WHERE id = 3").await;
    // A rolled-back change leaves nothing to check.
    app.sql(
        "DO $$ BEGIN UPDATE accounts SET balance = 9 WHERE id = 2; \
         RAISE EXCEPTION 'rolled back'; EXCEPTION WHEN raise_exception THEN NULL; END $$",
    )
    .await;

    for (id, kind) in [
        (1, "stale"),
        (4, "missing_in_cache"),
        (3, "orphan_in_cache"),
    ] {
        let seen = app
            .until_state(id, "detected", Duration::from_secs(10))
            .await;
        assert_eq!(seen, kind, "account {id}");
    }
    for id in [1, 4, 3] {
        app.until_state(id, "confirmed", Duration::from_secs(15))
            .await;
    }
    assert_eq!(app.state_of(2).await, None, "untouched account 2");
    assert!(metric(port, "stalewatch_checks_total", &["source=\"cdc\""]).await >= 3.0);
    app.outbox_emptied().await;
}

#[tokio::test]
async fn a_change_the_application_caches_in_time_opens_no_incident() {
    let app = App::new().await;
    app.add_accounts(1..=2).await;
    let (w, port) = app.worker(&[("CHANGE_SETTLE_MS", "300")]);
    app.reading(port, &w).await;

    // The application's usual write: the row, then the cache, well within the settle delay.
    app.sql("UPDATE accounts SET balance = 7, version = 2 WHERE id = 1")
        .await;
    app.cache(&1, &1).await;
    // A change nobody caches, after it, as the witness that checks have run.
    app.sql("UPDATE accounts SET balance = 9, version = 2 WHERE id = 2")
        .await;
    app.until_state(2, "detected", Duration::from_secs(10))
        .await;
    eventually(Duration::from_secs(10), "both keys checked", || async {
        (metric(port, "stalewatch_checks_total", &["source=\"cdc\""]).await >= 2.0).then_some(())
    })
    .await;
    assert_eq!(app.state_of(1).await, None, "{}", w.output());
}

#[tokio::test]
async fn a_reader_killed_while_changes_settle_loses_none() {
    let app = App::new().await;
    app.add_accounts(1..=300).await;
    // A long settle delay: the kill lands while every change read is still waiting. Scaled
    // like the waits below, which at a high STALEWATCH_TEST_SCALE outlasted a fixed 5 s.
    let settle = scaled(Duration::from_secs(60)).as_millis().to_string();
    let (mut w, port) = app.worker(&[
        ("CHANGE_SETTLE_MS", &settle),
        ("RUST_LOG", "info,stalewatch_worker::outbox=debug"),
    ]);
    app.reading(port, &w).await;

    // 300 transactions, one row each, nobody caching.
    for id in 1..=300 {
        app.sql(&format!(
            "UPDATE accounts SET balance = 1, version = 2 WHERE id = {id}"
        ))
        .await;
    }
    eventually(
        Duration::from_secs(30),
        "the reader to have read every change",
        || async {
            (metric(port, "stalewatch_capture_changes_total", &[]).await >= 300.0).then_some(())
        },
    )
    .await;
    // Three flushes of the reader since it read the last change (each logs "outbox flush" at
    // debug): a reader that deleted what it read but had not handed over would have emptied
    // the outbox by now.
    let flushes = || w.output().matches("outbox flush").count();
    let read_by = flushes();
    eventually(
        Duration::from_secs(30),
        "three flushes after the last change was read",
        || async { (flushes() >= read_by + 3).then_some(()) },
    )
    .await;
    assert_eq!(
        metric(port, "stalewatch_capture_keys_total", &[]).await,
        0.0,
        "the kill must come before the settle delay is over"
    );
    assert_eq!(
        app.outbox_rows().await,
        300,
        "nothing deleted before it is queued"
    );
    w.kill9();

    // Another worker takes over once the dead one's lease expires, and reads the outbox again.
    let (w2, port2) = app.worker(&[("CHANGE_SETTLE_MS", "100")]);
    app.reading(port2, &w2).await;
    eventually(
        Duration::from_secs(60),
        "every changed account to have an incident",
        || async {
            let open = all_incidents(&app.env).await;
            (open.len() >= 300).then_some(())
        },
    )
    .await;
    let keys: std::collections::BTreeSet<String> = all_incidents(&app.env)
        .await
        .into_iter()
        .map(|i| i.cache_key)
        .collect();
    assert_eq!(keys.len(), 300, "one incident per changed key");
    app.outbox_emptied().await;
}

#[tokio::test]
async fn a_change_committed_while_no_reader_runs_is_read_at_start() {
    let app = App::new().await;
    app.add_accounts(1..=2).await;
    let (mut w, port) = app.worker(&[]);
    app.reading(port, &w).await;
    let triggers = "SELECT sum(oid::bigint)::bigint AS n FROM pg_trigger \
                    WHERE tgname LIKE 'stalewatch_outbox_%'";
    let installed = app.count(triggers).await;
    // The reader goes; the triggers stay and keep writing the outbox.
    w.kill9();
    app.sql("UPDATE accounts SET balance = 3, version = 5 WHERE id = 2")
        .await;
    assert_eq!(app.outbox_rows().await, 1);

    let (w2, port2) = app.worker(&[]);
    app.reading(port2, &w2).await;
    let kind = app
        .until_state(2, "detected", Duration::from_secs(15))
        .await;
    assert_eq!(kind, "stale");
    app.outbox_emptied().await;
    assert_eq!(
        app.count(triggers).await,
        installed,
        "triggers already right are left alone at start-up"
    );
}
