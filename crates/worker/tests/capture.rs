//! Change capture from a logical replication slot: changes made in plain SQL by someone else,
//! with no cache write and no call to stalewatch, are checked within the settle delay. Each
//! test runs a PostgreSQL of its own (`wal_level = logical`; slots there cannot outlive the
//! test) and the worker binary with the sweep and keyspace notifications off, so nothing but
//! the slot can find the divergence.

mod common;

use std::time::Duration;

use common::{
    capture::{App, Capture, ACCOUNTS},
    *,
};
use diesel_async::RunQueryDsl;
use stalewatch_testkit::{eventually, free_port, scaled, PgServer, TestEnv};

impl App {
    /// A PostgreSQL of the test's own (its slots cannot outlive the test), reading the slot.
    async fn new() -> App {
        App::with_entities(ACCOUNTS).await
    }

    async fn with_entities(text: &str) -> App {
        let pg = PgServer::start(free_port()).await;
        let url = pg.create_database("app").await.unwrap();
        let env = TestEnv::on_database(&url).await.unwrap();
        App::start(env, Some(pg), Capture::Logical, text).await
    }
}

#[tokio::test]
async fn plain_sql_changes_are_detected_and_confirmed_without_any_cache_write() {
    let app = App::new().await;
    app.add_accounts(1..=3).await;
    let (w, port) = app.worker(&[]);
    app.reading(port, &w).await;

    // Someone changes rows in plain SQL and never touches the cache.
    app.sql("UPDATE accounts SET balance = 50, version = version + 1 WHERE id = 1")
        .await;
    app.sql("INSERT INTO accounts (id, email) VALUES (4, 'new@example.com')")
        .await;
    app.sql("DELETE FROM accounts WHERE id = 3").await;

    // Detected long before any other path could see it (sweep and notifications are off).
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
async fn a_transaction_of_many_rows_makes_a_bounded_number_of_check_jobs() {
    let app = App::new().await;
    app.add_accounts(1..=5000).await;
    let (w, port) = app.worker(&[]);
    app.reading(port, &w).await;

    app.sql("UPDATE accounts SET balance = balance + 1, version = version + 1")
        .await;
    eventually(Duration::from_secs(60), "5,000 keys checked", || async {
        (metric(port, "stalewatch_checks_total", &["source=\"cdc\""]).await >= 5000.0).then_some(())
    })
    .await;
    // Counted once the push succeeded, with the jobs it pushed.
    assert_eq!(
        metric(port, "stalewatch_capture_keys_total", &[]).await,
        5000.0
    );
    // The time to read it from the slot is the transaction's, observed once.
    assert_eq!(
        metric(port, "stalewatch_capture_read_delay_seconds_count", &[]).await,
        1.0
    );
    let jobs = metric(
        port,
        "stalewatch_jobs_total",
        &["job=\"check\"", "outcome=\"pushed\""],
    )
    .await;
    assert!(
        (1.0..=10.0).contains(&jobs),
        "{jobs} check jobs for one transaction of 5,000 rows"
    );
}

#[tokio::test]
async fn a_reader_killed_mid_stream_loses_no_committed_change() {
    let app = App::new().await;
    app.add_accounts(1..=300).await;
    // A long settle delay: the kill lands while every change read is still waiting. Scaled
    // like the waits below, which on a busy machine outlasted a fixed 5 s.
    let settle = scaled(Duration::from_secs(60)).as_millis().to_string();
    let (mut w, port) = app.worker(&[("CHANGE_SETTLE_MS", &settle)]);
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
    // The reader has told the server its position since it read the last change (status
    // updates go out every second): a reader that acknowledged what it read but had not
    // handed over would lose those changes now.
    #[derive(diesel::QueryableByName)]
    struct Text {
        #[diesel(sql_type = diesel::sql_types::Text)]
        t: String,
    }
    let read_at: Text = diesel::sql_query("SELECT clock_timestamp()::text AS t")
        .get_result(&mut app.env.pool.get().await.unwrap())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "a status update after the last change was read",
        || async {
            let replied: Text = diesel::sql_query(
                "SELECT coalesce(bool_or(reply_time > $1::timestamptz), false)::text AS t \
                 FROM pg_stat_replication WHERE application_name = 'stalewatch-capture'",
            )
            .bind::<diesel::sql_types::Text, _>(&read_at.t)
            .get_result(&mut app.env.pool.get().await.unwrap())
            .await
            .unwrap();
            (replied.t == "true").then_some(())
        },
    )
    .await;
    assert_eq!(
        metric(port, "stalewatch_capture_keys_total", &[]).await,
        0.0,
        "the kill must come before the settle delay is over"
    );
    w.kill9();

    // Another worker takes over once the dead one's lease expires, and reads the slot again
    // from where it was acknowledged.
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
}

#[tokio::test]
async fn a_dropped_slot_is_reported_and_the_sweep_covers_the_gap() {
    let app = App::new().await;
    app.add_accounts(1..=3).await;
    // The sweep runs once at start-up, then rests for an hour: only a pass started on
    // purpose can find what follows.
    let (w, port) = app.worker(&[("SWEEP_INTERVAL_MS", "3600000")]);
    app.reading(port, &w).await;
    eventually(Duration::from_secs(30), "a first sweep pass", || async {
        (metric(port, "stalewatch_sweep_duration_seconds_count", &[]).await >= 1.0).then_some(())
    })
    .await;

    // A divergence that makes no change in PostgreSQL (notifications are off): only a sweep
    // can find it.
    let mut redis = app.env.cache.connection();
    redis::cmd("SET")
        .arg(app.key(2))
        .arg(r#"{"id": 2, "email": "u2@example.com", "balance": 0, "version": 0}"#)
        .query_async::<()>(&mut redis)
        .await
        .unwrap();

    // The slot goes away under the reader (an operator, a failover).
    eventually(Duration::from_secs(30), "the slot dropped", || async {
        let mut conn = app.env.pool.get().await.unwrap();
        let _ = diesel::sql_query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = 'stalewatch' AND active_pid IS NOT NULL",
        )
        .execute(&mut conn)
        .await;
        diesel::sql_query("SELECT pg_drop_replication_slot('stalewatch')")
            .execute(&mut conn)
            .await
            .ok()
    })
    .await;

    eventually(Duration::from_secs(30), "the loss reported", || async {
        (metric(port, "stalewatch_capture_slot_lost_total", &[]).await >= 1.0).then_some(())
    })
    .await;
    assert!(
        w.output().contains("does not exist any more"),
        "{}",
        w.output()
    );
    let kind = app
        .until_state(2, "detected", Duration::from_secs(30))
        .await;
    assert_eq!(kind, "stale");
    // Reading goes on from the new slot.
    app.reading(port, &w).await;
    app.sql("UPDATE accounts SET balance = 5, version = 9 WHERE id = 1")
        .await;
    app.until_state(1, "detected", Duration::from_secs(10))
        .await;
}

#[tokio::test]
async fn a_slot_whose_changes_are_all_filtered_out_holds_no_wal_back() {
    let app = App::new().await;
    app.add_accounts(1..=1).await;
    let (w, port) = app.worker(&[]);
    app.reading(port, &w).await;

    // Writes to a table nobody watches: the publication filters every one of them out, so
    // only the server's keepalives tell the reader how far it may acknowledge.
    app.sql("CREATE TABLE audit (id bigserial PRIMARY KEY, note text)")
        .await;
    app.sql("INSERT INTO audit (note) SELECT repeat('x', 200) FROM generate_series(1, 20000)")
        .await;
    #[derive(diesel::QueryableByName)]
    struct Lsn {
        #[diesel(sql_type = diesel::sql_types::Text)]
        lsn: String,
    }
    let after: Lsn = diesel::sql_query("SELECT pg_current_wal_lsn()::text AS lsn")
        .get_result(&mut app.env.pool.get().await.unwrap())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the slot to be confirmed past the unwatched writes",
        || async {
            let confirmed: Lsn = diesel::sql_query(
                "SELECT (confirmed_flush_lsn >= $1::pg_lsn)::text AS lsn \
                 FROM pg_replication_slots WHERE slot_name = 'stalewatch'",
            )
            .bind::<diesel::sql_types::Text, _>(&after.lsn)
            .get_result(&mut app.env.pool.get().await.unwrap())
            .await
            .unwrap();
            (confirmed.lsn == "true").then_some(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the retained WAL to be reported",
        || async {
            // Present and not -1 (no slot): an absent metric would sum to -0.0, which is
            // not below 0.0 either, so its line is looked for.
            let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let value: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("stalewatch_capture_retained_wal_bytes "))?
                .trim()
                .parse()
                .ok()?;
            (value >= 0.0).then_some(())
        },
    )
    .await;
}

/// `stalewatch_slo_changes_total` of the account entity in one window and result.
async fn slo_count(port: u16, window: &str, result: &str) -> f64 {
    let labels = [
        "entity=\"account\"".to_string(),
        format!("window=\"{window}\""),
        format!("result=\"{result}\""),
    ];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    metric(port, "stalewatch_slo_changes_total", &labels).await
}

#[tokio::test]
async fn each_captured_change_is_counted_for_the_consistency_slo_in_every_window() {
    let app = App::new().await;
    app.add_accounts(1..=2).await;
    let (w, port) = app.worker(&[("SLO_WINDOWS", "1s,2s")]);
    app.reading(port, &w).await;

    // One change the application caches at once, one it never caches.
    app.sql("UPDATE accounts SET balance = 7, version = 2 WHERE id = 1")
        .await;
    app.cache(&1, &1).await;
    app.sql("UPDATE accounts SET balance = 9, version = 2 WHERE id = 2")
        .await;

    for window in ["1s", "2s"] {
        let (consistent, inconsistent) = eventually(
            Duration::from_secs(20),
            &format!("both changes probed in the {window} window"),
            || async {
                let (c, i) = (
                    slo_count(port, window, "consistent").await,
                    slo_count(port, window, "inconsistent").await,
                );
                (c + i >= 2.0).then_some((c, i))
            },
        )
        .await;
        assert_eq!((consistent, inconsistent), (1.0, 1.0), "window {window}");
    }
}

#[tokio::test]
async fn each_slo_window_is_probed_at_its_own_time_after_the_commit() {
    let app = App::new().await;
    app.add_accounts(1..=1).await;
    let (w, port) = app.worker(&[("SLO_WINDOWS", "1s,10s")]);
    app.reading(port, &w).await;

    app.sql("UPDATE accounts SET balance = 7, version = 2 WHERE id = 1")
        .await;
    app.cache(&1, &1).await;
    eventually(Duration::from_secs(20), "the 1 s probe", || async {
        (slo_count(port, "1s", "consistent").await == 1.0).then_some(())
    })
    .await;
    // A slow reader puts the old version back after the first probe: the 10 s window, probed
    // at its own time (not answered by the first probe), sees it.
    app.set(&app.key(1), r#"{"id":1,"version":1}"#).await;
    eventually(Duration::from_secs(30), "the 10 s probe", || async {
        (slo_count(port, "10s", "inconsistent").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(slo_count(port, "10s", "consistent").await, 0.0);
    assert_eq!(slo_count(port, "1s", "inconsistent").await, 0.0);
}

/// The accounts again, with a second entity keyed by email that a change invalidates.
const INVALIDATING: &str = r#"
[[entity]]
name = "account"
table = "public.accounts"
primary_key = ["id"]
key = "${KEY_PREFIX}acct:{id}"
representation = "json"
columns = ["id", "email", "balance", "version"]
version = "version"

[[entity]]
name = "account_by_email"
table = "public.accounts"
primary_key = ["id"]
key = "${KEY_PREFIX}acct:email:{email}"
representation = "string"
value = "id"
on_change = "invalidate"
"#;

impl App {
    fn email_key(&self, email: &str) -> String {
        format!("{}acct:email:{email}", self.env.prefix)
    }

    async fn set(&self, key: &str, value: &str) {
        redis_cmd::<()>(&self.env, &["SET", key, value]).await
    }

    async fn exists(&self, key: &str) -> bool {
        redis_cmd::<i64>(&self.env, &["EXISTS", key]).await == 1
    }

    async fn until_gone(&self, key: &str) {
        eventually(
            Duration::from_secs(20),
            &format!("{key} to be invalidated"),
            || async { (!self.exists(key).await).then_some(()) },
        )
        .await;
    }

    async fn stream(&self, args: &[&str]) -> redis::Value {
        redis_cmd(&self.env, args).await
    }
}

#[tokio::test]
async fn a_change_invalidates_the_old_and_the_new_keys_of_an_invalidating_entity() {
    let app = App::with_entities(INVALIDATING).await;
    // The old row whole in the stream: an email change names the old email's key.
    app.sql("ALTER TABLE accounts REPLICA IDENTITY FULL").await;
    app.add_accounts(1..=3).await;
    for id in 1..=3 {
        app.set(
            &app.email_key(&format!("u{id}@example.com")),
            &id.to_string(),
        )
        .await;
    }
    // A key some reader put back for the new email already (it will be stale too).
    app.set(&app.email_key("new@example.com"), "1").await;
    let (w, port) = app.worker(&[]);
    app.reading(port, &w).await;

    app.sql("UPDATE accounts SET email = 'new@example.com', version = 2 WHERE id = 1")
        .await;
    app.until_gone(&app.email_key("u1@example.com")).await;
    app.until_gone(&app.email_key("new@example.com")).await;
    app.sql("DELETE FROM accounts WHERE id = 2").await;
    app.until_gone(&app.email_key("u2@example.com")).await;
    app.set(&app.email_key("late@example.com"), "9").await;
    app.sql("INSERT INTO accounts (id, email) VALUES (9, 'late@example.com')")
        .await;
    app.until_gone(&app.email_key("late@example.com")).await;

    // Nothing else: account 3's keys and every id key stay.
    assert!(app.exists(&app.email_key("u3@example.com")).await);
    assert!(app.exists(&app.key(3)).await);
    assert!(metric(port, "stalewatch_keys_invalidated_total", &[]).await >= 4.0);
}

/// The publication carries what a change is read for (the key templates' columns) and the
/// replica identity, not the whole row: the application's UPDATEs and DELETEs still work (a
/// list without the identity would make PostgreSQL refuse them), and still invalidate.
#[tokio::test]
async fn the_publication_carries_the_keys_columns_and_the_identity_not_the_whole_row() {
    #[derive(diesel::QueryableByName)]
    struct Published {
        #[diesel(sql_type = diesel::sql_types::Array<diesel::sql_types::Text>)]
        columns: Vec<String>,
    }
    let app = App::with_entities(INVALIDATING).await;
    app.add_accounts(1..=3).await;
    for id in 1..=3 {
        app.set(&app.email_key(&format!("u{id}@example.com")), "x")
            .await;
    }
    let (w, port) = app.worker(&[]);
    app.reading(port, &w).await;

    let mut conn = app.env.pool.get().await.unwrap();
    let published: Vec<Published> = diesel::sql_query(
        "SELECT attnames::text[] AS columns FROM pg_publication_tables WHERE tablename = 'accounts'",
    )
    .load(&mut conn)
    .await
    .unwrap();
    assert_eq!(published.len(), 1);
    let mut columns = published[0].columns.clone();
    columns.sort();
    // `id`: the primary key and replica identity; `email`: a key template's. Not `balance`
    // or `version`, which no key is made of.
    assert_eq!(columns, ["email", "id"]);

    app.sql("UPDATE accounts SET balance = 7 WHERE id = 1")
        .await;
    app.until_gone(&app.email_key("u1@example.com")).await;
    // Refused by PostgreSQL if the list left the identity out. (Under REPLICA IDENTITY
    // DEFAULT a delete names only the id: the email key is the sweep's to find, as before.)
    app.sql("DELETE FROM accounts WHERE id = 2").await;
    assert!(app.exists(&app.email_key("u3@example.com")).await);
}

#[tokio::test]
async fn a_poison_entry_is_dead_lettered_and_the_group_goes_on() {
    let app = App::with_entities(INVALIDATING).await;
    app.add_accounts(1..=2).await;
    app.set(&app.email_key("u2@example.com"), "2").await;
    let (w, port) = app.worker(&[]);
    app.reading(port, &w).await;
    let stream = format!("{}invalidations", app.env.prefix);
    let dead = format!("{}invalidations:dead", app.env.prefix);
    app.stream(&["XADD", &stream, "*", "change", "{not json"])
        .await;

    eventually(Duration::from_secs(20), "the dead letter", || async {
        match app.stream(&["XLEN", &dead]).await {
            redis::Value::Int(n) if n >= 1 => Some(()),
            _ => None,
        }
    })
    .await;
    // The group is not stuck behind it.
    app.sql("UPDATE accounts SET balance = 3 WHERE id = 2")
        .await;
    app.until_gone(&app.email_key("u2@example.com")).await;
    assert_eq!(
        metric(port, "stalewatch_invalidations_dead_total", &[]).await,
        1.0
    );
}

#[tokio::test]
async fn entries_a_dead_consumer_left_pending_are_claimed_by_another() {
    let app = App::with_entities(INVALIDATING).await;
    app.add_accounts(1..=5).await;
    for id in 1..=5 {
        app.set(
            &app.email_key(&format!("u{id}@example.com")),
            &id.to_string(),
        )
        .await;
    }
    // A worker that publishes but consumes nothing.
    let (w, port) = app.worker(&[("INVALIDATION_CONSUMERS", "0")]);
    app.reading(port, &w).await;
    let stream = format!("{}invalidations", app.env.prefix);
    app.stream(&["XGROUP", "CREATE", &stream, "stalewatch", "0", "MKSTREAM"])
        .await;
    app.sql("UPDATE accounts SET balance = balance + 1").await;
    eventually(Duration::from_secs(20), "5 entries published", || async {
        (metric(port, "stalewatch_invalidations_published_total", &[]).await >= 5.0).then_some(())
    })
    .await;
    // A consumer reads them all and dies before acknowledging any.
    app.stream(&[
        "XREADGROUP",
        "GROUP",
        "stalewatch",
        "ghost",
        "COUNT",
        "100",
        "STREAMS",
        &stream,
        ">",
    ])
    .await;
    for id in 1..=5 {
        assert!(
            app.exists(&app.email_key(&format!("u{id}@example.com")))
                .await
        );
    }

    // A worker with a consumer takes them over once they are idle long enough.
    let (_w2, port2) = app.worker(&[("INVALIDATION_CLAIM_IDLE_MS", "500")]);
    wait_http(&format!("http://127.0.0.1:{port2}/healthz")).await;
    for id in 1..=5 {
        app.until_gone(&app.email_key(&format!("u{id}@example.com")))
            .await;
    }
    assert!(metric(port2, "stalewatch_invalidations_reclaimed_total", &[]).await >= 5.0);
}

#[tokio::test]
async fn an_invalidation_resolves_the_open_incident_of_its_key() {
    let app = App::with_entities(INVALIDATING).await;
    app.add_accounts(1..=1).await;
    let (w, port) = app.worker(&[("KEYSPACE_NOTIFICATIONS", "on")]);
    app.reading(port, &w).await;
    // A wrong value for the email key, seen at once by the keyspace notification.
    let key = app.email_key("u1@example.com");
    eventually(
        Duration::from_secs(20),
        "the wrong value detected",
        || async {
            app.set(&key, "99").await;
            let open = incidents_of(&app.env, &key).await;
            open.into_iter().next().map(|_| ())
        },
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "the incident confirmed",
        || async {
            let newest = incidents_of(&app.env, &key).await.into_iter().next()?;
            (newest.state == "confirmed").then_some(())
        },
    )
    .await;

    app.sql("UPDATE accounts SET balance = 5, version = 2 WHERE id = 1")
        .await;
    let resolution = eventually(Duration::from_secs(20), "the incident resolved", || async {
        let newest = incidents_of(&app.env, &key).await.into_iter().next()?;
        (newest.state == "resolved").then_some(newest.resolution)
    })
    .await;
    assert_eq!(resolution.as_deref(), Some("invalidation"));
    assert!(!app.exists(&key).await);
}

/// Products, whose pages and lists are cached under keys that are no entity's.
const PRODUCTS: &str = "
CREATE TABLE products (
    id          bigint PRIMARY KEY,
    category_id bigint NOT NULL,
    name        text   NOT NULL
)";

/// The accounts, and `[[invalidate]]` rules on the products: a pattern, a key per row, a
/// batched rule that waits for 3 changes or a minute, and one that waits for 1,000 or 400 ms.
const RULES: &str = r#"
[[entity]]
name = "account"
table = "public.accounts"
primary_key = ["id"]
key = "${KEY_PREFIX}acct:{id}"
representation = "json"

[[invalidate]]
name = "category_pages"
table = "public.products"
keys = ["${KEY_PREFIX}category:{category_id}:products:*", "${KEY_PREFIX}product:{id}:html"]

[[invalidate]]
name = "by_count"
table = "public.products"
keys = ["${KEY_PREFIX}count:{id}"]
strategy = "batched"
batch_count = 3
batch_time = "60s"

[[invalidate]]
name = "by_time"
table = "public.products"
keys = ["${KEY_PREFIX}time:{id}"]
strategy = "batched"
batch_time = "400ms"
"#;

impl App {
    async fn with_products() -> App {
        let app = App::with_entities(RULES).await;
        app.sql(PRODUCTS).await;
        // The old row whole in the stream: a product moved out of a category names it.
        app.sql("ALTER TABLE products REPLICA IDENTITY FULL").await;
        app.sql(
            "INSERT INTO products (id, category_id, name) \
             SELECT i, i % 3, 'p' || i FROM generate_series(1, 9) i",
        )
        .await;
        app
    }

    fn p(&self, key: &str) -> String {
        format!("{}{key}", self.env.prefix)
    }

    /// The keys the stream's entries name, every entry.
    async fn streamed(&self) -> Vec<stalewatch_core::invalidation::Entry> {
        let mut redis = self.env.cache.connection();
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(format!("{}invalidations", self.env.prefix))
            .arg("-")
            .arg("+")
            .query_async(&mut redis)
            .await
            .unwrap();
        reply
            .ids
            .iter()
            .filter_map(|r| match r.map.get("change") {
                Some(redis::Value::BulkString(b)) => {
                    stalewatch_core::invalidation::Entry::from_json(b).ok()
                }
                _ => None,
            })
            .collect()
    }
}

#[tokio::test]
async fn a_pattern_rule_removes_every_matching_key_and_nothing_else() {
    let app = App::with_products().await;
    // Category 1's pages (three of them), and keys that must survive: another category's
    // pages, a category whose id begins the same way, a key that only looks similar.
    let doomed = [
        "category:1:products:page:1",
        "category:1:products:page:2",
        "category:1:products:sorted:price",
    ];
    let survivors = [
        "category:2:products:page:1",
        "category:12:products:page:1",
        "category:1:product_count",
        "category:1:products",
    ];
    for k in doomed.iter().chain(&survivors) {
        app.set(&app.p(k), "x").await;
    }
    app.set(&app.p("product:4:html"), "<p>").await;
    let (w, port) = app.worker(&[]);
    app.reading(port, &w).await;

    // Product 4 is in category 1 (4 % 3).
    app.sql("UPDATE products SET name = 'renamed' WHERE id = 4")
        .await;
    for k in doomed {
        app.until_gone(&app.p(k)).await;
    }
    app.until_gone(&app.p("product:4:html")).await;
    for k in survivors {
        assert!(app.exists(&app.p(k)).await, "{k} must survive");
    }
    // Counted after the UNLINK that the loops above saw land: poll, never just read.
    eventually(
        Duration::from_secs(10),
        "the pattern's three keys counted",
        || async {
            let n = metric(port, "stalewatch_invalidation_pattern_keys_total", &[]).await;
            (n >= 3.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        metric(port, "stalewatch_invalidation_pattern_keys_total", &[]).await,
        3.0
    );
    assert!(metric(port, "stalewatch_invalidation_pattern_scans_total", &[]).await >= 1.0);
    let entry = app
        .streamed()
        .await
        .into_iter()
        .find(|e| e.entity == "category_pages")
        .expect("the rule's entry");
    assert_eq!(
        entry.patterns,
        vec![app.p("category:1:products:*")],
        "{entry:?}"
    );

    // A product moved to another category drops both categories' pages.
    app.set(&app.p("category:1:products:page:1"), "x").await;
    app.sql("UPDATE products SET category_id = 2 WHERE id = 4")
        .await;
    app.until_gone(&app.p("category:1:products:page:1")).await;
    app.until_gone(&app.p("category:2:products:page:1")).await;
    assert!(app.exists(&app.p("category:12:products:page:1")).await);
}

#[tokio::test]
async fn a_batched_rule_flushes_on_count_and_on_time_and_never_holds_a_delete() {
    let app = App::with_products().await;
    for id in 1..=9 {
        app.set(&app.p(&format!("product:{id}:html")), "x").await;
        app.set(&app.p(&format!("count:{id}")), "x").await;
        app.set(&app.p(&format!("time:{id}")), "x").await;
    }
    let (w, port) = app.worker(&[]);
    app.reading(port, &w).await;

    // Two changes of 3: the immediate rule's key, the witness that they were read and
    // published, goes; the batch of 3 waits (its time is a minute).
    for id in [1, 2] {
        app.sql(&format!("UPDATE products SET name = 'a' WHERE id = {id}"))
            .await;
    }
    app.until_gone(&app.p("product:2:html")).await;
    assert!(app.exists(&app.p("count:1")).await);
    assert!(app.exists(&app.p("count:2")).await);

    // The third change fills it: the three go together, as one merged entry.
    app.sql("UPDATE products SET name = 'a' WHERE id = 3").await;
    for id in [1, 2, 3] {
        app.until_gone(&app.p(&format!("count:{id}"))).await;
    }
    let merged: Vec<_> = app
        .streamed()
        .await
        .into_iter()
        .filter(|e| e.entity == "by_count")
        .collect();
    assert_eq!(merged.len(), 1, "{merged:?}");
    assert_eq!(merged[0].op, "batch");
    assert_eq!(merged[0].keys.len(), 3);

    // The by_time batch went out on time: it held changes 1 to 3 for 400 ms at least, and
    // the delay measured from the oldest commit says so.
    for id in [1, 2, 3] {
        app.until_gone(&app.p(&format!("time:{id}"))).await;
    }
    let timed: Vec<_> = app
        .streamed()
        .await
        .into_iter()
        .filter(|e| e.entity == "by_time")
        .collect();
    assert!(!timed.is_empty() && timed.iter().all(|e| e.op == "batch"));
    assert_eq!(
        timed.iter().map(|e| e.keys.len()).sum::<usize>(),
        3,
        "{timed:?}"
    );
    let slow = metric(
        port,
        "stalewatch_invalidation_delay_seconds_bucket",
        &["le=\"0.25\""],
    )
    .await;
    let all = metric(port, "stalewatch_invalidation_delay_seconds_count", &[]).await;
    assert!(
        all - slow >= 1.0,
        "a batch held 400 ms: {slow} of {all} within 250 ms"
    );

    // A delete is never held, not even by a rule that waits a minute.
    app.sql("DELETE FROM products WHERE id = 9").await;
    app.until_gone(&app.p("count:9")).await;
    assert!(app.exists(&app.p("count:8")).await);
}

#[tokio::test]
async fn a_capture_process_killed_mid_stream_publishes_every_commit_at_least_once() {
    const N: i64 = 600;
    let app = App::with_entities(INVALIDATING).await;
    app.add_accounts(1..=N).await;
    // Nobody consumes: the stream keeps every entry, to be counted.
    let consumers = [("INVALIDATION_CONSUMERS", "0")];
    let (mut w, port) = app.worker(&consumers);
    app.reading(port, &w).await;

    // N single-row transactions, paced so that the kill lands among them.
    let pool = app.env.pool.clone();
    let writer = tokio::spawn(async move {
        for id in 1..=N {
            let mut conn = pool.get().await.unwrap();
            diesel::sql_query(format!(
                "UPDATE accounts SET balance = balance + 1 WHERE id = {id}"
            ))
            .execute(&mut conn)
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    eventually(
        Duration::from_secs(30),
        "a first hundred entries published",
        || async {
            (metric(port, "stalewatch_invalidations_published_total", &[]).await >= 100.0)
                .then_some(())
        },
    )
    .await;
    assert!(!writer.is_finished(), "the kill must come mid-stream");
    w.kill9();
    writer.await.unwrap();

    // The next reader goes on from the slot's acknowledged position.
    let (w2, port2) = app.worker(&consumers);
    app.reading(port2, &w2).await;
    let wanted: std::collections::BTreeSet<String> = (1..=N)
        .map(|id| app.email_key(&format!("u{id}@example.com")))
        .collect();
    let entries = eventually(
        Duration::from_secs(60),
        "an entry for every commit",
        || async {
            let entries = app.streamed().await;
            let seen: std::collections::BTreeSet<String> =
                entries.iter().flat_map(|e| e.keys.clone()).collect();
            wanted.is_subset(&seen).then_some(entries)
        },
    )
    .await;
    // At least once: a commit published by the dead reader after its last acknowledgement
    // is published again, never lost.
    let per_commit: std::collections::BTreeSet<&str> =
        entries.iter().map(|e| e.commit_lsn.as_str()).collect();
    assert_eq!(per_commit.len() as i64, N, "one commit LSN per transaction");
    // Each entry names its row by primary key, and the row's key.
    for e in &entries {
        let [id] = &e.primary_key[..] else {
            panic!("{e:?}")
        };
        assert_eq!(e.keys, vec![app.email_key(&format!("u{id}@example.com"))]);
    }
    eprintln!(
        "{} entries for {N} commits ({} published twice)",
        entries.len(),
        entries.len() as i64 - N
    );
}

#[tokio::test]
async fn a_consumer_process_killed_between_read_and_ack_is_taken_over_by_another() {
    let app = App::with_entities(INVALIDATING).await;
    app.add_accounts(1..=5).await;
    for id in 1..=5 {
        app.set(
            &app.email_key(&format!("u{id}@example.com")),
            &id.to_string(),
        )
        .await;
    }
    let claim = [("INVALIDATION_CLAIM_IDLE_MS", "500")];
    let (mut a, port) = app.worker(&claim);
    app.reading(port, &a).await;

    // The consumer's first step after reading is noting the invalidation on the incidents:
    // with their table locked it reads, then waits there, before the UNLINK and the XACK.
    let mut lock = app.env.pool.get().await.unwrap();
    for q in ["BEGIN", "LOCK TABLE inconsistencies IN EXCLUSIVE MODE"] {
        diesel::sql_query(q).execute(&mut lock).await.unwrap();
    }
    app.sql("UPDATE accounts SET balance = balance + 1").await;
    let stream = format!("{}invalidations", app.env.prefix);
    let pending = eventually(
        Duration::from_secs(20),
        "entries read and not acknowledged",
        || async {
            match app.stream(&["XPENDING", &stream, "stalewatch"]).await {
                redis::Value::Array(v) => match v.as_slice() {
                    [redis::Value::Int(n), ..] if *n >= 1 => Some(*n),
                    _ => None,
                },
                _ => None,
            }
        },
    )
    .await;
    for id in 1..=5 {
        assert!(
            app.exists(&app.email_key(&format!("u{id}@example.com")))
                .await
        );
    }
    // SIGKILL while it waits: the entries stay pending under a consumer that is gone.
    a.kill9();
    diesel::sql_query("ROLLBACK")
        .execute(&mut lock)
        .await
        .unwrap();
    drop(lock);

    let (_b, port_b) = app.worker(&claim);
    wait_http(&format!("http://127.0.0.1:{port_b}/healthz")).await;
    for id in 1..=5 {
        app.until_gone(&app.email_key(&format!("u{id}@example.com")))
            .await;
    }
    eventually(
        Duration::from_secs(20),
        "the dead consumer's entries claimed",
        || async {
            (metric(port_b, "stalewatch_invalidations_reclaimed_total", &[]).await
                >= pending as f64)
                .then_some(())
        },
    )
    .await;
    match app.stream(&["XPENDING", &stream, "stalewatch"]).await {
        redis::Value::Array(v) => {
            assert!(matches!(v.as_slice(), [redis::Value::Int(0), ..]), "{v:?}")
        }
        other => panic!("{other:?}"),
    }
}

/// An account cached whole, invalidated on change (cache-aside).
const INVALIDATED_ACCOUNTS: &str = r#"
[[entity]]
name = "account"
table = "public.accounts"
primary_key = ["id"]
key = "${KEY_PREFIX}acct:{id}"
representation = "json"
columns = ["id", "email", "balance", "version"]
version = "version"
on_change = "invalidate"
"#;

#[tokio::test]
async fn with_invalidation_on_a_slow_reader_putting_back_an_old_value_is_still_detected() {
    let app = App::with_entities(INVALIDATED_ACCOUNTS).await;
    app.add_accounts(1..=1).await;
    let (w, port) = app.worker(&[("KEYSPACE_NOTIFICATIONS", "on")]);
    app.reading(port, &w).await;

    // A slow reader has read the row (version 1) for a cache-aside fill ...
    let mut redis = app.env.cache.connection();
    let copy: String = redis::cmd("GET")
        .arg(app.key(1))
        .query_async(&mut redis)
        .await
        .unwrap();
    // ... the row changes, and the invalidation deletes the key ...
    app.sql("UPDATE accounts SET balance = 50, version = 2 WHERE id = 1")
        .await;
    app.until_gone(&app.key(1)).await;
    assert!(metric(port, "stalewatch_keys_invalidated_total", &[]).await >= 1.0);
    // ... and then the reader writes its copy: the old version is back, after the
    // invalidation. Invalidation cannot prevent this; detection sees it.
    app.set(&app.key(1), &copy).await;
    let kind = app
        .until_state(1, "detected", Duration::from_secs(20))
        .await;
    assert_eq!(kind, "stale");
}
