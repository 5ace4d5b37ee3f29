//! Storage against the real PostgreSQL and Redis, each test in its own database and prefix.

use std::time::Duration;

use chrono::Utc;
use stalewatch_core::{
    compare::Kind,
    db::{
        self,
        incidents::{self, Applied, Evidence},
        items::{self, ItemChanges},
    },
    incident::{self, Cause, Observation, Source, State, Verdict},
    metrics::Metrics,
    track,
};
use stalewatch_testkit::TestEnv;

/// Records a batch on a connection of its own, as one result.
async fn record_batch(
    pool: &stalewatch_core::db::PgPool,
    metrics: &stalewatch_core::metrics::Metrics,
    ctx: &track::Context<'_>,
    evidence: Vec<Evidence>,
) -> Result<Vec<track::Recorded>, stalewatch_core::db::DbError> {
    let mut conn = pool.get().await?;
    let batch = track::record_batch(&mut conn, metrics, ctx, evidence).await;
    match batch.error {
        Some(e) => Err(e),
        None => Ok(batch.recorded),
    }
}

fn evidence(key: &str, kind: Kind) -> Evidence {
    Evidence {
        cache_key: key.to_string(),
        entity: "item".into(),
        entity_id: key.rsplit(':').next().unwrap().to_string(),
        kind,
        db_version: Some(2),
        cache_version: Some(1),
        db_value: Some("{\"version\":2}".into()),
        cache_value: Some("{\"version\":1}".into()),
        diff: "version 2 -> 1".into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn migrations_apply_twice_without_error() {
    let env = TestEnv::new().await.unwrap();
    // The template already ran them; running again finds nothing pending, twice.
    assert!(db::migrate(&env.database_url).await.unwrap().is_empty());
    assert!(db::migrate(&env.database_url).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn migrations_started_together_do_not_race() {
    let env = TestEnv::new().await.unwrap();
    let mut conn = env.pool.get().await.unwrap();
    use diesel_async::RunQueryDsl;
    // Everything the migrations made, whatever a new one adds.
    for statement in ["DROP SCHEMA public CASCADE", "CREATE SCHEMA public"] {
        diesel::sql_query(statement)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    drop(conn);
    let runs = (0..4).map(|_| db::migrate(&env.database_url));
    let results = futures::future::join_all(runs).await;
    let applied: usize = results.into_iter().map(|r| r.unwrap().len()).sum();
    let all = diesel::migration::MigrationSource::<diesel::pg::Pg>::migrations(&db::MIGRATIONS)
        .unwrap()
        .len();
    assert_eq!(applied, all, "each migration applied exactly once");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_openers_make_exactly_one_incident() {
    let env = TestEnv::new().await.unwrap();
    let metrics = Metrics::new();
    let key = env.keys().item(&uuid::Uuid::now_v7());
    let at = Utc::now();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (pool, metrics, key) = (env.pool.clone(), metrics.clone(), key.clone());
            tokio::spawn(async move {
                let ctx = track::Context {
                    source: Source::WriteCheck,
                    cause: None,
                    at,
                    grace: Duration::from_secs(60),
                    confirming: None,
                };
                record_batch(&pool, &metrics, &ctx, vec![evidence(&key, Kind::Stale)])
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut opened = 0;
    for t in tasks {
        let recorded = t.await.unwrap();
        if recorded[0].transition.is_some() {
            opened += 1;
        }
    }
    assert_eq!(opened, 1, "exactly one observer opens the incident");
    let mut conn = env.pool.get().await.unwrap();
    let all = incidents::list(
        &mut conn,
        &incidents::ListQuery {
            key: Some(key.clone()),
            limit: 100,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].state, "detected");
    assert_eq!(all[0].observations, 32, "every observation counted once");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_transition_applied_concurrently_lands_once() {
    let env = TestEnv::new().await.unwrap();
    let key = env.keys().item(&uuid::Uuid::now_v7());
    let ev = evidence(&key, Kind::Stale);
    let t0 = Utc::now() - chrono::Duration::seconds(10);
    let grace = Duration::from_secs(2);
    let mismatch = |at| Observation {
        verdict: Verdict::Mismatch,
        at,
        db_version: None,
        source: Source::Confirm,
        cause: Cause::Natural,
    };
    let open = incident::step(None, &mismatch(t0), grace);
    let mut conn = env.pool.get().await.unwrap();
    let Applied::Stored(row) = incidents::apply(&mut conn, None, &open, &ev).await.unwrap() else {
        panic!("the first opener stores");
    };
    drop(conn);
    // Everyone read the same Detected row and computes the same Detected -> Confirmed step.
    let confirm = incident::step(Some(&row.incident()), &mismatch(Utc::now()), grace);
    assert_eq!(confirm.next.as_ref().unwrap().state, State::Confirmed);
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let (pool, row, confirm, ev) =
                (env.pool.clone(), row.clone(), confirm.clone(), ev.clone());
            tokio::spawn(async move {
                let mut conn = pool.get().await.unwrap();
                incidents::apply(&mut conn, Some(&row), &confirm, &ev)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut stored = 0;
    let mut conflicts = 0;
    for t in tasks {
        match t.await.unwrap() {
            Applied::Stored(_) => stored += 1,
            Applied::Conflict => conflicts += 1,
            Applied::Nothing => panic!("a confirmation is never a no-op"),
        }
    }
    assert_eq!((stored, conflicts), (1, 23));
    let mut conn = env.pool.get().await.unwrap();
    let now = incidents::by_id(&mut conn, row.id).await.unwrap().unwrap();
    assert_eq!(now.state, "confirmed");
    assert_eq!(now.observations, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resolved_key_opens_a_new_incident_on_the_next_mismatch() {
    let env = TestEnv::new().await.unwrap();
    let metrics = Metrics::new();
    let key = env.keys().item(&uuid::Uuid::now_v7());
    let grace = Duration::from_millis(0);
    let t = Utc::now();
    let record = |kind, at| {
        let ctx = track::Context {
            source: Source::Sweep,
            cause: None,
            at,
            grace,
            confirming: None,
        };
        let (pool, metrics, ev) = (env.pool.clone(), metrics.clone(), evidence(&key, kind));
        async move { record_batch(&pool, &metrics, &ctx, vec![ev]).await }
    };
    record(Kind::Stale, t).await.unwrap();
    let confirmed = record(Kind::Stale, t + chrono::Duration::milliseconds(1))
        .await
        .unwrap();
    assert_eq!(confirmed[0].transition.unwrap().to, State::Confirmed);
    let resolved = record(Kind::Match, t + chrono::Duration::milliseconds(2))
        .await
        .unwrap();
    assert_eq!(resolved[0].transition.unwrap().to, State::Resolved);
    assert_eq!(
        resolved[0].incident.as_ref().unwrap().resolution.as_deref(),
        Some("natural")
    );
    let again = record(Kind::ValueMismatch, t + chrono::Duration::milliseconds(3))
        .await
        .unwrap();
    let row = again[0].incident.as_ref().unwrap();
    assert_eq!((row.state.as_str(), row.observations), ("detected", 1));
    assert_ne!(row.id, resolved[0].incident.as_ref().unwrap().id);

    track::refresh_open_gauge(&env.pool, &metrics, &["item"])
        .await
        .unwrap();
    assert_eq!(
        metrics
            .open_incidents
            .with_label_values(&["item", "detected"])
            .get(),
        1
    );
    assert_eq!(
        metrics
            .open_incidents
            .with_label_values(&["item", "confirmed"])
            .get(),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_updates_raise_the_version_exactly_once_each() {
    let env = TestEnv::new().await.unwrap();
    let item = items::create(&env.pool, "counter", &serde_json::json!({"n": 0}))
        .await
        .unwrap();
    let n = 40;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let pool = env.pool.clone();
            tokio::spawn(async move {
                let changes = ItemChanges {
                    value: Some(serde_json::json!({ "n": i })),
                    ..Default::default()
                };
                // Half through each update path: both must queue on the row lock.
                if i % 2 == 0 {
                    items::update(&pool, item.id, changes)
                        .await
                        .unwrap()
                        .unwrap();
                } else {
                    let (before, after) = items::update_returning_previous(&pool, item.id, changes)
                        .await
                        .unwrap()
                        .unwrap();
                    assert_eq!(
                        after.version,
                        before.version + 1,
                        "before is the replaced row"
                    );
                    assert_ne!(before.value, after.value);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let now = items::get(&env.pool, item.id).await.unwrap().unwrap();
    assert_eq!(now.version, 1 + n as i64);
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_get_set_mget_stay_inside_the_prefix() {
    let a = TestEnv::new().await.unwrap();
    let b = TestEnv::new().await.unwrap();
    let id = uuid::Uuid::now_v7();
    let (ka, kb) = (a.keys().item(&id), b.keys().item(&id));
    assert_ne!(
        ka, kb,
        "the same item has a different key under each prefix"
    );
    let ttl = Duration::from_secs(30);
    a.cache.set(&ka, b"from-a", ttl).await.unwrap();
    assert_eq!(
        a.cache.get(&ka).await.unwrap().as_deref(),
        Some(&b"from-a"[..])
    );
    assert_eq!(
        b.cache.get(&kb).await.unwrap(),
        None,
        "b does not see a's key"
    );

    let other = a.keys().item(&uuid::Uuid::now_v7());
    a.cache.set(&other, b"second", ttl).await.unwrap();
    let missing = a.keys().item(&uuid::Uuid::now_v7());
    let got = a
        .cache
        .get_many(&[ka.clone(), missing.clone(), other.clone()])
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![Some(b"from-a".to_vec()), None, Some(b"second".to_vec())]
    );

    assert!(a.cache.delete(&ka).await.unwrap());
    assert!(!a.cache.delete(&ka).await.unwrap());
    assert_eq!(a.cache.get(&ka).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_values_expire_with_their_ttl() {
    let env = TestEnv::new().await.unwrap();
    let key = env.keys().item(&uuid::Uuid::now_v7());
    env.cache
        .set(&key, b"v", Duration::from_secs(7))
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut env.cache.connection())
        .await
        .unwrap();
    assert!((1..=7).contains(&ttl), "ttl {ttl}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_has_one_holder_and_only_the_holder_renews_or_releases_it() {
    use stalewatch_core::lease::Lease;
    let env = TestEnv::new().await.unwrap();
    let conn = env.own.clone();
    let key = format!("{}lease-test", env.prefix);
    let ttl = Duration::from_millis(300);
    let first = Lease::try_acquire(&conn, &key, ttl)
        .await
        .unwrap()
        .expect("free");
    assert!(
        Lease::try_acquire(&conn, &key, ttl)
            .await
            .unwrap()
            .is_none(),
        "one holder"
    );
    assert!(first.renew().await.unwrap());
    // After the TTL lapses without renewal another holder may take it, and the first can
    // neither renew nor release the second's lease.
    let second =
        stalewatch_testkit::eventually(Duration::from_secs(5), "the lease to expire", || {
            let (conn, key) = (conn.clone(), key.clone());
            async move {
                Lease::try_acquire(&conn, &key, Duration::from_secs(30))
                    .await
                    .unwrap()
            }
        })
        .await;
    assert!(!first.renew().await.unwrap());
    assert!(!first.release().await.unwrap());
    assert!(second.renew().await.unwrap());
    assert!(second.release().await.unwrap());
    assert!(Lease::try_acquire(&conn, &key, ttl)
        .await
        .unwrap()
        .is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_write_never_replaces_a_newer_version() {
    let env = TestEnv::new().await.unwrap();
    let key = env.keys().item(&uuid::Uuid::now_v7());
    let ttl = Duration::from_secs(60);
    let doc = |v: i64| serde_json::json!({ "version": v, "name": format!("v{v}") }).to_string();
    assert!(env
        .cache
        .set_unless_newer(&key, doc(3).as_bytes(), 3, ttl)
        .await
        .unwrap());
    assert!(!env
        .cache
        .set_unless_newer(&key, doc(2).as_bytes(), 2, ttl)
        .await
        .unwrap());
    assert_eq!(
        env.cache.get(&key).await.unwrap().unwrap(),
        doc(3).into_bytes()
    );
    // The same version is rewritten (a refresh repairs same-version content), a newer one too.
    assert!(env
        .cache
        .set_unless_newer(&key, doc(3).as_bytes(), 3, ttl)
        .await
        .unwrap());
    assert!(env
        .cache
        .set_unless_newer(&key, doc(4).as_bytes(), 4, ttl)
        .await
        .unwrap());
    // Whatever is cached, if it is not a versioned document it is replaced.
    env.cache.set(&key, b"not json", ttl).await.unwrap();
    assert!(env
        .cache
        .set_unless_newer(&key, doc(1).as_bytes(), 1, ttl)
        .await
        .unwrap());
}

/// One observer's batch of one key, made at `at`, that saw DB version `db_version`.
async fn observe(
    env: &TestEnv,
    key: &str,
    kind: Kind,
    at: chrono::DateTime<Utc>,
    db_version: i64,
) -> Vec<track::Recorded> {
    let ctx = track::Context {
        source: Source::Sweep,
        cause: None,
        at,
        grace: Duration::from_secs(2),
        confirming: None,
    };
    let ev = Evidence {
        db_version: Some(db_version),
        ..evidence(key, kind)
    };
    record_batch(&env.pool, &Metrics::new(), &ctx, vec![ev])
        .await
        .unwrap()
}

async fn latest(env: &TestEnv, key: &str) -> incidents::IncidentRow {
    let mut conn = env.pool.get().await.unwrap();
    incidents::latest_for_key(&mut conn, key)
        .await
        .unwrap()
        .expect("an incident")
}

/// Two observers in a forced order: A reads a consistent pair (version 1) at t0 and is slow;
/// meanwhile the row moves to version 2, the cache stays behind, and B detects it at t1.
/// A's late match must not close B's incident, neither while Detected nor once Confirmed.
#[tokio::test(flavor = "multi_thread")]
async fn a_late_match_does_not_close_a_newer_incident() {
    let env = TestEnv::new().await.unwrap();
    let key = env.keys().item(&uuid::Uuid::now_v7());
    // Whole milliseconds: PostgreSQL keeps microseconds.
    let t0 = chrono::SubsecRound::trunc_subsecs(Utc::now(), 3) - chrono::Duration::seconds(60);
    let ms = chrono::Duration::milliseconds;
    observe(&env, &key, Kind::Stale, t0 + ms(100), 2).await; // B
    observe(&env, &key, Kind::Match, t0, 1).await; // A, late
    assert_eq!(latest(&env, &key).await.state, "detected");
    // The same after the grace period: confirmed by a later mismatch, then A again.
    observe(&env, &key, Kind::Stale, t0 + ms(2_500), 2).await;
    assert_eq!(latest(&env, &key).await.state, "confirmed");
    observe(&env, &key, Kind::Match, t0 + ms(50), 1).await;
    assert_eq!(latest(&env, &key).await.state, "confirmed");
    // A match of the same row made after the newest evidence does close it.
    observe(&env, &key, Kind::Match, t0 + ms(3_000), 2).await;
    let row = latest(&env, &key).await;
    assert_eq!(row.state, "resolved");
    assert_eq!(row.resolved_at, Some(t0 + ms(3_000)));
}

/// A refresh resolved the key at t2; a mismatch read at t1 < t2 (before the refresh landed)
/// arrives afterwards and must not open a new incident. One read after t2 does.
#[tokio::test(flavor = "multi_thread")]
async fn a_mismatch_older_than_the_last_resolution_opens_nothing() {
    let env = TestEnv::new().await.unwrap();
    let key = env.keys().item(&uuid::Uuid::now_v7());
    let t0 = Utc::now() - chrono::Duration::seconds(60);
    let ms = chrono::Duration::milliseconds;
    observe(&env, &key, Kind::Stale, t0, 2).await;
    observe(&env, &key, Kind::Stale, t0 + ms(2_000), 2).await;
    observe(&env, &key, Kind::Match, t0 + ms(5_000), 2).await;
    let resolved = latest(&env, &key).await;
    assert_eq!(resolved.state, "resolved");
    let late = observe(&env, &key, Kind::Stale, t0 + ms(4_000), 2).await;
    assert_eq!(late[0].transition, None);
    assert_eq!(latest(&env, &key).await.id, resolved.id, "no new incident");
    let fresh = observe(&env, &key, Kind::Stale, t0 + ms(6_000), 2).await;
    assert_eq!(fresh[0].transition.map(|t| t.to), Some(State::Detected));
}

/// A batch whose second key fails to store still schedules the confirmation of the first:
/// the retry of the batch would find that incident open and schedule nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_that_fails_part_way_still_schedules_its_confirmations() {
    use diesel_async::RunQueryDsl;
    use stalewatch_core::{jobs::ConfirmJob, queue};
    let env = TestEnv::new().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..2 {
        let item = items::create(&env.pool, &format!("i{i}"), &serde_json::json!({ "i": i }))
            .await
            .unwrap();
        let stale = serde_json::json!({ "id": item.id, "version": 0 });
        env.cache
            .set(
                &env.keys().item(&item.id),
                stale.to_string().as_bytes(),
                Duration::from_secs(600),
            )
            .await
            .unwrap();
        ids.push(item.id);
    }
    ids.sort();
    // Ids are checked in order: storing the second one's incident fails.
    let mut conn = env.pool.get().await.unwrap();
    diesel::sql_query(
        "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN \
           RAISE EXCEPTION 'refused for the test'; END $$ LANGUAGE plpgsql",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    diesel::sql_query(format!(
        "CREATE TRIGGER refuse BEFORE INSERT ON inconsistencies FOR EACH ROW \
           WHEN (NEW.entity_id = '{}') EXECUTE FUNCTION refuse()",
        ids[1]
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    drop(conn);
    let queue_conn = queue::connect(&env.redis_url).await.unwrap();
    let checker = env.checker(&env.config()).await.unwrap();
    let err = checker.check_items(&ids, Source::WriteCheck, None).await;
    assert!(err.is_err(), "the second key fails");
    let first = latest(&env, &env.keys().item(&ids[0])).await;
    assert_eq!(first.state, "detected");
    let scheduled: Vec<String> = redis::cmd("ZRANGE")
        .arg(queue::config::<ConfirmJob>(env.keys(), 1).scheduled_jobs_set())
        .arg(0)
        .arg(-1)
        .query_async(&mut queue_conn.clone())
        .await
        .unwrap();
    assert_eq!(
        scheduled.len(),
        1,
        "one confirmation job for the committed incident"
    );
    let payload: Vec<u8> = redis::cmd("HGET")
        .arg(queue::config::<ConfirmJob>(env.keys(), 1).job_data_hash())
        .arg(&scheduled[0])
        .query_async(&mut queue_conn.clone())
        .await
        .unwrap();
    let job: ConfirmJob = serde_json::from_slice(&payload).unwrap();
    assert_eq!(job.targets.len(), 1);
    assert_eq!(job.targets[0].incident_id, first.id);
}

/// Refresh uses the versioned write: a refresh that read an older row than the one a
/// concurrent writer already cached leaves the newer copy in place.
#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_never_puts_back_an_older_version() {
    let env = TestEnv::new().await.unwrap();
    let item = items::create(&env.pool, "x", &serde_json::json!({ "a": 1 }))
        .await
        .unwrap();
    let key = env.keys().item(&item.id);
    let checker = env.checker(&env.config()).await.unwrap();
    // A newer version than the row holds is already cached (a writer that committed and
    // cached after the refresh read the row).
    let mut newer = item.clone();
    newer.version = 7;
    env.cache
        .set(&key, &newer.to_cache_bytes(), Duration::from_secs(600))
        .await
        .unwrap();
    checker
        .refresh(stalewatch_core::keys::ITEM_ENTITY, &key)
        .await
        .unwrap();
    let cached: serde_json::Value =
        serde_json::from_slice(&env.cache.get(&key).await.unwrap().unwrap()).unwrap();
    assert_eq!(cached["version"], 7);
}

/// PostgreSQL's plan for `statement` (EXPLAIN), one line per node.
async fn plan_of(conn: &mut diesel_async::AsyncPgConnection, statement: &str) -> String {
    use diesel::{sql_query, sql_types::Text};
    use diesel_async::RunQueryDsl;

    #[derive(diesel::QueryableByName)]
    struct Line {
        #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
        text: String,
    }
    let lines: Vec<Line> = sql_query(format!("EXPLAIN {statement}"))
        .load(conn)
        .await
        .unwrap();
    lines
        .into_iter()
        .map(|l| l.text)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A batch of new incidents costs index probes, not a pass over the incident history. Written
/// as `NOT EXISTS`, the check for "resolved since this observation" was planned as a hash
/// anti-join over every incident whenever the table's statistics were missing or behind: a
/// young table, or the middle of a storm of new incidents, before autovacuum's ANALYZE. Here
/// the rows go in without an ANALYZE, as in a storm.
#[tokio::test(flavor = "multi_thread")]
async fn opening_a_batch_of_incidents_does_not_read_the_whole_history() {
    use diesel::sql_query;
    use diesel_async::RunQueryDsl;

    let env = TestEnv::new().await.unwrap();
    let mut conn = env.pool.get().await.unwrap();
    sql_query(
        "INSERT INTO inconsistencies (cache_key, entity, entity_id, state, kind, diff, \
         first_seen_at, confirm_due_at, last_seen_at, observations, resolved_at, resolution) \
         SELECT 'history:' || g, 'item', g::text, 'resolved', 'stale', '', now(), now(), now(), \
                1, now(), 'natural' FROM generate_series(1, 20000) g",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sql_query(format!("PREPARE insert_many AS {}", incidents::INSERT_MANY))
        .execute(&mut conn)
        .await
        .unwrap();

    // A batch of 100 new keys, as a sweep or check job sends it.
    let keys: Vec<String> = (0..100).map(|i| format!("probe:{i}")).collect();
    let fill = |value: &str, ty: &str| format!("array_fill({value}::{ty}, ARRAY[100])");
    let args = [
        format!("'{{{}}}'::text[]", keys.join(",")),
        fill("'item'", "text"),
        fill("'1'", "text"),
        fill("'detected'", "text"),
        fill("'stale'", "text"),
        fill("2", "bigint"),
        fill("1", "bigint"),
        fill("'{}'", "text"),
        fill("'{}'", "text"),
        fill("''", "text"),
        fill("now()", "timestamptz"),
        fill("now()", "timestamptz"),
        fill("now()", "timestamptz"),
        fill("1", "bigint"),
    ];
    let plan = plan_of(
        &mut conn,
        &format!("EXECUTE insert_many({})", args.join(", ")),
    )
    .await;
    assert!(
        !plan.contains("Seq Scan on inconsistencies"),
        "the batch reads the whole history:\n{plan}"
    );
    assert!(
        plan.contains("Index") && plan.contains("on inconsistencies i"),
        "the history is probed by index:\n{plan}"
    );
}

#[tokio::test]
async fn open_incidents_of_a_batch_are_probed_by_index_when_most_incidents_are_open() {
    use diesel::sql_query;
    use diesel_async::RunQueryDsl;

    // A storm: 20,000 open incidents and nothing else, with fresh statistics. Each batch of
    // 1,000 keys asks which of them has one.
    let env = TestEnv::new().await.unwrap();
    let mut conn = env.pool.get().await.unwrap();
    sql_query(
        "INSERT INTO inconsistencies (cache_key, entity, entity_id, state, kind, diff, \
         first_seen_at, confirm_due_at, last_seen_at, observations) \
         SELECT 'storm:' || g, 'item', g::text, 'detected', 'stale', '', now(), now(), now(), 1 \
         FROM generate_series(1, 20000) g",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sql_query("ANALYZE inconsistencies")
        .execute(&mut conn)
        .await
        .unwrap();
    let keys: Vec<String> = (0..1000).map(|i| format!("storm:{}", i * 20 + 1)).collect();
    let batch = format!("'{{{}}}'::text[]", keys.join(","));
    let plan = plan_of(
        &mut conn,
        &incidents::OPEN_FOR_KEYS.replace("$1::text[]", &batch),
    )
    .await;
    assert!(
        !plan.contains("Seq Scan on inconsistencies"),
        "every open incident is read for each batch:\n{plan}"
    );
    assert!(
        plan.contains("Index Scan using inconsistencies_one_open_per_key"),
        "each key is probed in the open incidents' index:\n{plan}"
    );

    // And it reads what it should: the open incident of each key that has one.
    let mut asked = keys[..3].to_vec();
    asked.push("calm:1".into());
    let open = incidents::open_for_keys(&conn, &asked).await.unwrap();
    assert_eq!(open.len(), 3, "{open:?}");
    assert_eq!(open["storm:21"].entity_id, "21");
}

/// The backends of this test's database waiting for a lock.
async fn waiting_on_a_lock(env: &TestEnv) -> i64 {
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = env.pool.get().await.unwrap();
    diesel::sql_query(
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .get_result::<Count>(&mut conn)
    .await
    .unwrap()
    .n
}

/// An entity invalidated on change: a check after a change reads the cache first, and a key
/// still absent (deleted by the invalidation, not put back) is a match without its row being
/// read. The table is locked against every reader while those keys are checked and probed,
/// so a row read would wait; a key the application put back is still checked row first.
#[tokio::test(flavor = "multi_thread")]
async fn a_check_after_an_invalidation_reads_no_row_for_a_key_still_absent() {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    use stalewatch_core::{check::Checker, slo, watch::Watched};
    use stalewatch_testkit::{eventually, scaled};

    let env = TestEnv::new().await.unwrap();
    env.pool
        .get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE accounts (id bigint PRIMARY KEY, name text NOT NULL, version bigint NOT NULL);
             INSERT INTO accounts VALUES (1, 'a', 2), (2, 'b', 1), (3, 'c', 1)",
        )
        .await
        .unwrap();
    let model = format!(
        r#"
[[entity]]
name = "account"
table = "public.accounts"
primary_key = ["id"]
key = "{}acct:{{id}}"
representation = "json"
version = "version"
on_change = "invalidate"
"#,
        env.prefix
    );
    let watched = Watched::load(&env.pool, &model, &|_| None).await.unwrap();
    let queue = stalewatch_core::queue::connect(&env.redis_url)
        .await
        .unwrap();
    let checker = Checker::new(
        &env.config(),
        env.pool.clone(),
        env.cache.clone(),
        Metrics::new(),
        queue,
        std::sync::Arc::new(watched),
    );
    let key = |id: i64| format!("{}acct:{id}", env.prefix);
    let ttl = Duration::from_secs(600);

    // Account 1's cached copy is a version behind: a check of the change opens an incident.
    env.cache
        .set(&key(1), br#"{"id":1,"name":"a","version":1}"#, ttl)
        .await
        .unwrap();
    let seen = checker
        .check_keys("account", &[key(1)], Source::Cdc, None)
        .await
        .unwrap();
    assert_eq!(
        seen.verdicts.get(&Kind::Stale),
        Some(&1),
        "{:?}",
        seen.verdicts
    );
    assert_eq!(latest(&env, &key(1)).await.state, "detected");

    // The next change invalidates it; account 2 was never cached; account 3 was put back.
    env.cache.delete(&key(1)).await.unwrap();
    env.cache
        .set(&key(3), br#"{"id":3,"name":"c","version":1}"#, ttl)
        .await
        .unwrap();

    // Every reader of the table now waits behind this transaction's lock.
    let mut locker = diesel_async::AsyncPgConnection::establish(&env.database_url)
        .await
        .unwrap();
    locker
        .batch_execute("BEGIN; LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let absent = [key(1), key(2)];
    let outcome = tokio::time::timeout(
        scaled(Duration::from_secs(30)),
        checker.check_keys("account", &absent, Source::Cdc, None),
    )
    .await
    .expect("absent keys are checked without reading the locked table")
    .unwrap();
    assert_eq!(
        outcome.verdicts.get(&Kind::Match),
        Some(&2),
        "{:?}",
        outcome.verdicts
    );
    assert_eq!(
        latest(&env, &key(1)).await.state,
        "transient",
        "the invalidated key's incident closes"
    );
    let probed = tokio::time::timeout(
        scaled(Duration::from_secs(30)),
        slo::probe(&checker, "account", &absent),
    )
    .await
    .expect("absent keys are probed without reading the locked table")
    .unwrap();
    assert_eq!(
        probed,
        slo::Agreement {
            consistent: 2,
            inconsistent: 0
        }
    );

    // The key that is back is compared with its row: that check waits for the lock.
    let present = tokio::spawn({
        let checker = checker.clone();
        let keys = vec![key(3)];
        async move {
            checker
                .check_keys("account", &keys, Source::Cdc, None)
                .await
        }
    });
    eventually(
        Duration::from_secs(30),
        "the row read waiting on the lock",
        || async { (waiting_on_a_lock(&env).await > 0).then_some(()) },
    )
    .await;
    assert!(!present.is_finished());
    locker.batch_execute("COMMIT").await.unwrap();
    let outcome = present.await.unwrap().unwrap();
    assert_eq!(
        outcome.verdicts.get(&Kind::Match),
        Some(&1),
        "{:?}",
        outcome.verdicts
    );

    // A key put back stale is still found: only absence skips the row.
    env.cache
        .set(&key(2), br#"{"id":2,"name":"old","version":0}"#, ttl)
        .await
        .unwrap();
    let outcome = checker
        .check_keys("account", &[key(1), key(2)], Source::Cdc, None)
        .await
        .unwrap();
    assert_eq!(
        outcome.verdicts.get(&Kind::Match),
        Some(&1),
        "{:?}",
        outcome.verdicts
    );
    assert_eq!(
        outcome.verdicts.get(&Kind::Stale),
        Some(&1),
        "{:?}",
        outcome.verdicts
    );
    assert_eq!(latest(&env, &key(2)).await.kind, "stale");
}
