//! Watching an application stalewatch did not create: its own tables (users with a unique
//! email, campaign_members), created and written by the test with plain SQL and plain Redis
//! commands, never through stalewatch's API. Each representation gets the faults real
//! applications make; each is detected, confirmed after the grace period, and resolved by a
//! refresh (or, under REPAIR_POLICY=confirmed, by a repair).

mod common;

use std::time::Duration;

use common::*;
use diesel_async::RunQueryDsl;
use serde_json::Value;
use stalewatch_testkit::{eventually, TestEnv};

const SCHEMA: &str = "
CREATE TABLE users (
    id         bigint      PRIMARY KEY,
    email      text        NOT NULL UNIQUE,
    profile    jsonb       NOT NULL DEFAULT '{}',
    plan       text        NOT NULL DEFAULT 'free',
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE campaign_members (
    campaign_id bigint NOT NULL,
    user_id     bigint NOT NULL,
    PRIMARY KEY (campaign_id, user_id)
);";

/// The application's key formats, under the test's prefix so tests stay apart.
const ENTITIES: &str = r#"
[[entity]]
name = "user"
table = "public.users"
primary_key = ["id"]
key = "${KEY_PREFIX}app:user:{id}"
representation = "json"
columns = ["id", "email", "profile", "updated_at"]
version = "updated_at"
ignore = ["profile.last_login"]

[[entity]]
name = "user_by_email"
table = "public.users"
primary_key = ["id"]
key = "${KEY_PREFIX}app:user:email:{email}"
representation = "string"
value = "id"
policy = "write_through"

[[entity]]
name = "user_hash"
table = "public.users"
primary_key = ["id"]
key = "${KEY_PREFIX}app:userh:{id}"
representation = "hash"
columns = ["email", "plan"]

[[entity]]
name = "campaign_members"
table = "public.campaign_members"
primary_key = ["campaign_id", "user_id"]
key = "${KEY_PREFIX}app:campaign:{campaign_id}:members"
representation = "set"
member = "{user_id}"
policy = "write_through"
"#;

struct App<'a> {
    env: &'a TestEnv,
    entities: EntitiesFile,
}

impl<'a> App<'a> {
    async fn new(env: &'a TestEnv) -> App<'a> {
        sql_script(env, SCHEMA).await;
        App {
            env,
            entities: EntitiesFile::write("entities", ENTITIES),
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}app:{rest}", self.env.prefix)
    }

    /// A user as the application writes it: the row, then every key that derives from it,
    /// the JSON document with timestamps spelled `...Z` (PostgreSQL's own JSON says
    /// `+00:00`: the comparator must read both as the same instant).
    async fn add_user(&self, id: i64, email: &str) {
        sql(
            self.env,
            &format!("INSERT INTO users (id, email, profile) VALUES ({id}, '{email}', '{{\"name\": \"u{id}\", \"last_login\": 1}}')"),
        )
        .await;
        self.cache_user(id).await;
    }

    async fn cache_user(&self, id: i64) {
        #[derive(diesel::QueryableByName)]
        struct Doc {
            #[diesel(sql_type = diesel::sql_types::Text)]
            doc: String,
            #[diesel(sql_type = diesel::sql_types::Text)]
            email: String,
            #[diesel(sql_type = diesel::sql_types::Text)]
            plan: String,
        }
        let mut conn = self.env.pool.get().await.unwrap();
        let row: Doc = diesel::sql_query(format!(
            "SELECT json_build_object('id', id, 'email', email, 'profile', profile, \
             'updated_at', to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))::text AS doc, \
             email, plan FROM users WHERE id = {id}"
        ))
        .get_result(&mut conn)
        .await
        .unwrap();
        let id_text = id.to_string();
        redis_cmd::<redis::Value>(
            self.env,
            &["SET", &self.key(&format!("user:{id}")), &row.doc],
        )
        .await;
        redis_cmd::<redis::Value>(
            self.env,
            &[
                "SET",
                &self.key(&format!("user:email:{}", row.email)),
                &id_text,
            ],
        )
        .await;
        redis_cmd::<redis::Value>(
            self.env,
            &[
                "HSET",
                &self.key(&format!("userh:{id}")),
                "email",
                &row.email,
                "plan",
                &row.plan,
            ],
        )
        .await;
    }

    async fn add_member(&self, campaign: i64, user: i64) {
        sql(
            self.env,
            &format!("INSERT INTO campaign_members VALUES ({campaign}, {user})"),
        )
        .await;
        redis_cmd::<redis::Value>(
            self.env,
            &[
                "SADD",
                &self.key(&format!("campaign:{campaign}:members")),
                &user.to_string(),
            ],
        )
        .await;
    }

    /// Users 1-6 and campaigns 10 and 11, every key consistent.
    async fn seed(&self) {
        for id in 1..=6 {
            self.add_user(id, &format!("u{id}@example.com")).await;
        }
        for (campaign, user) in [(10, 1), (10, 2), (11, 3), (11, 4)] {
            self.add_member(campaign, user).await;
        }
    }

    /// The faults of the issue, each on its own keys. Returns (key, expected verdict).
    async fn break_things(&self) -> Vec<(String, &'static str)> {
        // 1. A stale JSON document: the row moved on, the cache did not.
        sql(
            self.env,
            "UPDATE users SET profile = '{\"name\": \"renamed\"}', updated_at = now() + interval '1 second' WHERE id = 1",
        )
        .await;
        // 2. A hash with one stale field.
        sql(self.env, "UPDATE users SET plan = 'pro' WHERE id = 2").await;
        // 3. A set missing a member, and 4. one with a member no longer in the table.
        sql(self.env, "INSERT INTO campaign_members VALUES (10, 3)").await;
        sql(
            self.env,
            "DELETE FROM campaign_members WHERE campaign_id = 11 AND user_id = 4",
        )
        .await;
        // 5. An email changed in SQL: the old email key left behind, the new one missing.
        sql(
            self.env,
            "UPDATE users SET email = 'new5@example.com' WHERE id = 5",
        )
        .await;
        // 6. A row deleted in SQL while its keys stay.
        sql(self.env, "DELETE FROM users WHERE id = 6").await;
        vec![
            (self.key("user:1"), "stale"),
            (self.key("userh:2"), "value_mismatch"),
            (self.key("campaign:10:members"), "value_mismatch"),
            (self.key("campaign:11:members"), "value_mismatch"),
            (self.key("user:email:u5@example.com"), "orphan_in_cache"),
            (self.key("user:email:new5@example.com"), "missing_in_cache"),
            (self.key("user:6"), "orphan_in_cache"),
            (self.key("userh:6"), "orphan_in_cache"),
        ]
    }
}

/// The settings of the worker and the API: the app's entities, a sweep every 300 ms and a
/// grace period of 1.5 s, so that a fault is confirmed within seconds; then `extra`.
fn worker_settings<'a>(app: &'a App<'_>, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let own = [
        app.entities.var(),
        ("SWEEP_INTERVAL_MS", "300"),
        ("GRACE_PERIOD_MS", "1500"),
    ];
    [&own[..], extra].concat()
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_in_every_representation_are_detected_confirmed_and_resolved_by_refresh() {
    let env = TestEnv::new().await.unwrap();
    let app = App::new(&env).await;
    app.seed().await;
    let vars = worker_settings(&app, &[]);
    let (_w, _) = worker(&env, &vars);
    let (_a, api_url) = api(&env, &vars);
    wait_http(&format!("{api_url}/healthz")).await;

    // A consistent application: a whole sweep pass opens nothing.
    eventually(Duration::from_secs(30), "a complete sweep pass", || async {
        let age: Option<i64> = redis::cmd("GET")
            .arg(env.keys().sweep_done_at())
            .query_async(&mut env.cache.connection())
            .await
            .ok()?;
        age.map(|_| ())
    })
    .await;
    assert!(
        all_incidents(&env).await.is_empty(),
        "no incident on a consistent application: {:?}",
        all_incidents(&env).await
    );

    let faults = app.break_things().await;
    for (key, kind) in &faults {
        let row = confirmed(&env, key).await;
        assert_eq!(&row.kind, kind, "{key}: {}", row.diff);
        assert!(
            row.confirmed_at.unwrap() >= row.first_seen_at + chrono::Duration::milliseconds(1500)
        );
    }
    // The set diff says which members.
    let missing = latest(&env, &app.key("campaign:10:members")).await.unwrap();
    assert!(
        missing.diff.contains("missing") && missing.diff.contains('3'),
        "{}",
        missing.diff
    );
    let extra_member = latest(&env, &app.key("campaign:11:members")).await.unwrap();
    assert!(extra_member.diff.contains('4'), "{}", extra_member.diff);
    // The JSON entity ignored the profile's last_login, and read `...Z` and `+00:00` alike:
    // user 3's document, untouched, never diverged.
    assert!(latest(&env, &app.key("user:3")).await.is_none());

    // The incidents API filters by entity.
    let listed: Value = reqwest::get(format!("{api_url}/inconsistencies?entity=user_hash"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let keys: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap())
        .collect();
    assert!(
        !keys.is_empty() && keys.iter().all(|k| k.contains("app:userh:")),
        "{keys:?}"
    );

    // A refresh of each incident's key resolves it with cause `refresh`, with the worker's
    // sweep (every 300 ms) and notifications running: whichever sees the key agree first
    // credits the refresh.
    let client = reqwest::Client::new();
    for (key, _) in &faults {
        let incident = latest(&env, key).await.unwrap();
        let reply = client
            .post(format!("{api_url}/inconsistencies/{}/refresh", incident.id))
            .send()
            .await
            .unwrap();
        assert!(
            reply.status().is_success(),
            "{key}: {}",
            reply.text().await.unwrap()
        );
        let row = latest(&env, key).await.unwrap();
        assert_eq!(row.state, "resolved", "{key}: {row:?}");
        assert_eq!(row.resolution.as_deref(), Some("refresh"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn under_repair_policy_confirmed_every_fault_is_repaired() {
    let env = TestEnv::new().await.unwrap();
    let app = App::new(&env).await;
    app.seed().await;
    let vars = worker_settings(&app, &[("REPAIR_POLICY", "confirmed")]);
    let (_w, _) = worker(&env, &vars);
    let faults = app.break_things().await;
    for (key, _) in &faults {
        let row = eventually(
            Duration::from_secs(60),
            &format!("{key} repaired"),
            || async { latest(&env, key).await.filter(|r| r.state == "resolved") },
        )
        .await;
        assert_eq!(row.resolution.as_deref(), Some("repair"), "{key}: {row:?}");
    }
    // The cache now says what the table says.
    let mut conn = env.cache.connection();
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(app.key("campaign:10:members"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut members = members;
    members.sort();
    assert_eq!(members, ["1", "2", "3"]);
    let plan: String = redis::cmd("HGET")
        .arg(app.key("userh:2"))
        .arg("plan")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(plan, "pro");
    let orphan: Option<String> = redis::cmd("GET")
        .arg(app.key("user:6"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(orphan, None);
    let doc: String = redis::cmd("GET")
        .arg(app.key("user:1"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let doc: Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(doc["profile"]["name"], "renamed");
}

#[tokio::test(flavor = "multi_thread")]
async fn entities_check_reports_each_mistake_with_its_line() {
    let env = TestEnv::new().await.unwrap();
    let app = App::new(&env).await;
    let bin = stalewatch_testkit::bin_path("stalewatch-worker");
    let run = |file: &std::path::Path| {
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["entities", "check"]).arg(file);
        for (k, v) in env.env_vars() {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let ok = run(app.entities.path());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let printed = String::from_utf8_lossy(&ok.stdout);
    for name in ["user", "user_by_email", "user_hash", "campaign_members"] {
        assert!(printed.contains(name), "{printed}");
    }
    let bad = ENTITIES.replace("value = \"id\"", "value = \"identifier\"");
    let out = run(EntitiesFile::write("bad", &bad).path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("identifier") && err.contains("user_by_email") && err.contains("line 12"),
        "{err}"
    );
}
