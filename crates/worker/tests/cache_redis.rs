//! The watched cache is the application's Redis (CACHE_REDIS_URL), apart from stalewatch's own
//! (REDIS_URL), and may be reachable only through a user with few rights: the README's ACL
//! lines, tried for real on the test Redis.

mod common;

use std::time::Duration;

use common::*;
use diesel_async::RunQueryDsl;
use stalewatch_core::{keys::Keys, queue};
use stalewatch_testkit::{eventually, free_port, redis_server, Proc, TestEnv};

const SCHEMA: &str = "CREATE TABLE users (
    id         bigint      PRIMARY KEY,
    email      text        NOT NULL,
    version    bigint      NOT NULL DEFAULT 1
)";

/// The application's users, cached as JSON under `<key_base>user:{id}`. An integer version:
/// a refresh then goes through the versioned write, a Lua script.
struct App<'a> {
    env: &'a TestEnv,
    key_base: String,
    entities: EntitiesFile,
}

impl<'a> App<'a> {
    async fn new(env: &'a TestEnv, key_base: &str) -> App<'a> {
        sql(env, SCHEMA).await;
        let entities = EntitiesFile::write(
            "entities",
            &format!(
                r#"
[[entity]]
name = "user"
table = "public.users"
primary_key = ["id"]
key = "{key_base}user:{{id}}"
representation = "json"
version = "version"
"#
            ),
        );
        App {
            env,
            key_base: key_base.to_string(),
            entities,
        }
    }

    fn key(&self, id: i64) -> String {
        format!("{}user:{id}", self.key_base)
    }

    /// The settings of the worker and the API: the app's entities, a sweep every 300 ms and
    /// a grace period of 1.5 s; then `extra`.
    fn vars<'b>(&'b self, extra: &[(&'b str, &'b str)]) -> Vec<(&'b str, &'b str)> {
        let own = [
            self.entities.var(),
            ("SWEEP_INTERVAL_MS", "300"),
            ("GRACE_PERIOD_MS", "1500"),
        ];
        [&own[..], extra].concat()
    }

    /// Users `ids`, each row with its cached copy as the application writes it.
    async fn seed(&self, ids: std::ops::RangeInclusive<i64>) {
        sql(
            self.env,
            &format!(
                "INSERT INTO users (id, email) SELECT i, 'u' || i || '@example.com' \
                 FROM generate_series({}, {}) AS i",
                ids.start(),
                ids.end()
            ),
        )
        .await;
        for id in ids {
            let doc = self.document(id).await;
            self.set(&self.key(id), &doc).await;
        }
    }

    /// The JSON document of user `id`, rendered by PostgreSQL.
    async fn document(&self, id: i64) -> String {
        #[derive(diesel::QueryableByName)]
        struct Doc {
            #[diesel(sql_type = diesel::sql_types::Text)]
            doc: String,
        }
        let mut conn = self.env.pool.get().await.unwrap();
        let row: Doc = diesel::sql_query(format!(
            "SELECT json_build_object('id', id, 'email', email, 'version', version)::text \
             AS doc FROM users WHERE id = {id}"
        ))
        .get_result(&mut conn)
        .await
        .unwrap();
        row.doc
    }

    async fn set(&self, key: &str, value: &str) {
        redis_cmd::<()>(self.env, &["SET", key, value]).await
    }

    async fn get(&self, key: &str) -> Option<String> {
        redis_cmd(self.env, &["GET", key]).await
    }

    /// Two faults: user 1's row moves on in SQL (the cache is stale), and another client
    /// writes a wrong document for user 2 (seen by its keyspace notification).
    async fn break_two(&self) -> [(String, &'static str); 2] {
        sql(
            self.env,
            "UPDATE users SET email = 'moved@example.com', \
             version = version + 1 WHERE id = 1",
        )
        .await;
        let wrong = self.document(2).await.replace("u2@", "someone-else@");
        self.set(&self.key(2), &wrong).await;
        [(self.key(1), "stale"), (self.key(2), "value_mismatch")]
    }
}

/// The worker and the API, both with `vars`.
fn start(env: &TestEnv, vars: &[(&str, &str)]) -> ((Proc, u16), (Proc, String)) {
    (worker(env, vars), api(env, vars))
}

/// The API's refresh of an incident: its status and body.
async fn refresh(api_url: &str, incident: i64) -> (reqwest::StatusCode, serde_json::Value) {
    let reply = reqwest::Client::new()
        .post(format!("{api_url}/inconsistencies/{incident}/refresh"))
        .send()
        .await
        .unwrap();
    let status = reply.status();
    (status, reply.json().await.unwrap())
}

/// Every key of a Redis (a test's own server: KEYS is fine there).
async fn all_keys(url: &str) -> Vec<String> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_apart_from_stalewatchs_redis_is_watched_and_holds_none_of_stalewatchs_keys() {
    let port = free_port();
    let _cache = redis_server(port).await;
    let cache_url = format!("redis://127.0.0.1:{port}");
    let env = TestEnv::with_cache(&cache_url).await.unwrap();
    assert_ne!(env.redis_url, env.cache_redis_url);
    let app = App::new(&env, "app:").await;
    app.seed(1..=20).await;
    let ((w, metrics_port), (_a, api_url)) = start(&env, &app.vars(&[]));
    wait_http(&format!("{api_url}/healthz")).await;
    let ready: serde_json::Value = reqwest::get(format!("{api_url}/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        ready,
        serde_json::json!({ "postgres": "ok", "redis": "ok", "cache": "ok" })
    );

    // A whole round over a consistent cache: its record is in stalewatch's Redis.
    let mut own = queue::connect(&env.redis_url).await.unwrap();
    eventually(Duration::from_secs(30), "a completed sweep round", || {
        let mut own = own.clone();
        let key = env.keys().sweep_last_round();
        async move {
            let exists: bool = redis::cmd("EXISTS")
                .arg(key)
                .query_async(&mut own)
                .await
                .ok()?;
            exists.then_some(())
        }
    })
    .await;
    assert!(all_incidents(&env).await.is_empty());
    subscribed(&w, 1).await;

    let faults = app.break_two().await;
    for (key, kind) in &faults {
        let row = confirmed(&env, key).await;
        assert_eq!(&row.kind, kind, "{key}: {}", row.diff);
    }
    // The wrong write was seen by a keyspace notification of the cache's Redis.
    let notified = metric(metrics_port, "stalewatch_notifications_total", &[]).await;
    assert!(notified >= 1.0, "{notified}");

    // A refresh writes the application's cache.
    let incident = latest(&env, &faults[0].0).await.unwrap();
    let (status, body) = refresh(&api_url, incident.id).await;
    assert!(status.is_success(), "{status}: {body}");
    assert_eq!(body["state"], "resolved", "{body}");
    assert!(app
        .get(&app.key(1))
        .await
        .unwrap()
        .contains("moved@example.com"));

    // The cache holds the application's keys, nothing of stalewatch's (no prefix, no queue,
    // no apalis registry); the rounds, leases and queues are in stalewatch's Redis.
    let cache_keys = all_keys(&cache_url).await;
    assert_eq!(cache_keys.len(), 20, "{cache_keys:?}");
    assert!(
        cache_keys.iter().all(|k| k.starts_with("app:user:")),
        "{cache_keys:?}"
    );
    let exists: bool = redis::cmd("EXISTS")
        .arg(env.keys().sweep_last_round())
        .query_async(&mut own)
        .await
        .unwrap();
    assert!(exists, "the sweep's record is in stalewatch's Redis");
}

/// The README's ACL lines (section "What each Redis needs"), for the test's key names: the
/// watched keys under `<prefix>app:`, stalewatch's own under the test's prefix.
fn reader_acl(user: &str, password: &str, prefix: &str) -> Vec<String> {
    acl(&format!(
        "ACL SETUSER {user} on >{password} resetkeys %R~{prefix}app:* \
         resetchannels &__keyspace@0__:{prefix}app:user:* \
         -@all +ping +get +mget +hgetall +smembers +scan +psubscribe +punsubscribe"
    ))
}

fn writer_acl(user: &str, password: &str, prefix: &str) -> Vec<String> {
    acl(&format!(
        "ACL SETUSER {user} on >{password} resetkeys %RW~{prefix}app:* \
         resetchannels &__keyspace@0__:{prefix}app:user:* \
         -@all +ping +get +mget +hgetall +smembers +scan +psubscribe +punsubscribe \
         +set +del +unlink +hset +sadd +pexpire +persist +pttl +multi +exec +discard \
         +evalsha +script|load"
    ))
}

fn own_acl(user: &str, password: &str, prefix: &str) -> Vec<String> {
    let queues = Keys::new(prefix).queue("");
    acl(&format!(
        "ACL SETUSER {user} on >{password} resetkeys ~{prefix}* ~{queues}* ~core:apalis:* \
         resetchannels +@all -@dangerous"
    ))
}

fn acl(line: &str) -> Vec<String> {
    line.split_whitespace().map(String::from).collect()
}

/// ACL users made for one test on the shared Redis, deleted when it ends (pass or fail).
struct AclUsers {
    url: String,
    names: Vec<String>,
}

impl AclUsers {
    async fn create(url: &str, lines: Vec<Vec<String>>) -> AclUsers {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let mut names = Vec::new();
        for line in lines {
            let mut cmd = redis::cmd(&line[0]);
            for arg in &line[1..] {
                cmd.arg(arg);
            }
            cmd.query_async::<()>(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", line.join(" ")));
            names.push(line[2].clone());
        }
        AclUsers {
            url: url.to_string(),
            names,
        }
    }
}

impl Drop for AclUsers {
    fn drop(&mut self) {
        let (url, names) = (self.url.clone(), self.names.clone());
        let _ = std::thread::spawn(move || {
            let client = redis::Client::open(url.as_str())?;
            let mut conn = client.get_connection()?;
            redis::cmd("ACL")
                .arg("DELUSER")
                .arg(&names)
                .query::<()>(&mut conn)
        })
        .join();
    }
}

/// `redis://user:password@host:port` of the shared test Redis.
fn as_user(url: &str, user: &str, password: &str) -> String {
    url.replacen("redis://", &format!("redis://{user}:{password}@"), 1)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_cache_user_detects_and_refuses_a_refresh_clearly_and_a_writer_refreshes_and_rebuilds(
) {
    let env = TestEnv::new().await.unwrap();
    let app = App::new(&env, &format!("{}app:", env.prefix)).await;
    app.seed(1..=10).await;
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let password = uuid::Uuid::new_v4().simple().to_string();
    let (reader, writer, own) = (
        format!("sw-reader-{id}"),
        format!("sw-writer-{id}"),
        format!("sw-own-{id}"),
    );
    let _users = AclUsers::create(
        &env.redis_url,
        vec![
            reader_acl(&reader, &password, &env.prefix),
            writer_acl(&writer, &password, &env.prefix),
            own_acl(&own, &password, &env.prefix),
        ],
    )
    .await;
    // The reader may not change the server's configuration: notifications are turned on by
    // the operator, as the README says.
    let mut admin = queue::connect(&env.redis_url).await.unwrap();
    let flags: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query_async(&mut admin)
        .await
        .unwrap();
    let flags = flags.get(1).cloned().unwrap_or_default();
    if !flags.contains('A') || !flags.contains('K') {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg(format!("{flags}Kg$hsxe"))
            .query_async::<()>(&mut admin)
            .await
            .unwrap();
    }

    let reader_url = as_user(&env.redis_url, &reader, &password);
    let own_url = as_user(&env.redis_url, &own, &password);
    let vars = app.vars(&[
        ("CACHE_REDIS_URL", reader_url.as_str()),
        ("REDIS_URL", own_url.as_str()),
    ]);
    let ((w, metrics_port), (a, api_url)) = start(&env, &vars);
    wait_http(&format!("{api_url}/healthz")).await;
    subscribed(&w, 1).await;

    // Detection and confirmation through the reader: the sweep and the notifications.
    let faults = app.break_two().await;
    for (key, kind) in &faults {
        let row = confirmed(&env, key).await;
        assert_eq!(&row.kind, kind, "{key}: {}", row.diff);
    }
    let notified = metric(metrics_port, "stalewatch_notifications_total", &[]).await;
    assert!(notified >= 1.0, "{notified}");
    // Nothing else the worker does was refused: its only complaint is the one the README
    // tells the operator about (CONFIG SET of the notification classes).
    let log = w.output();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
        .filter(|l| !l.contains("could not enable keyspace notifications"))
        .collect();
    assert!(complaints.is_empty(), "{complaints:#?}");
    assert!(
        log.contains("could not enable keyspace notifications"),
        "the reader may not run CONFIG: {log}"
    );

    // A refresh needs write access: refused, saying why and what to do.
    let incident = latest(&env, &faults[0].0).await.unwrap();
    let (status, body) = refresh(&api_url, incident.id).await;
    assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("refused")
            && message.to_lowercase().contains("noperm")
            && message.contains("write access"),
        "{message}"
    );
    assert!(!message.contains(&password), "{message}");
    drop(a);

    // The writer's line is enough for a refresh (the versioned write: a Lua script).
    let writer_url = as_user(&env.redis_url, &writer, &password);
    let (_a, api_url) = api(
        &env,
        &[
            app.entities.var(),
            ("CACHE_REDIS_URL", writer_url.as_str()),
            ("REDIS_URL", own_url.as_str()),
        ],
    );
    wait_http(&format!("{api_url}/healthz")).await;
    for (key, _) in &faults {
        let incident = latest(&env, key).await.unwrap();
        let (status, body) = refresh(&api_url, incident.id).await;
        assert!(status.is_success(), "{key}: {status}: {body}");
        assert_eq!(body["state"], "resolved", "{body}");
        assert_eq!(body["resolution"], "refresh", "{body}");
    }
    assert!(app
        .get(&app.key(1))
        .await
        .unwrap()
        .contains("moved@example.com"));

    // And for a rebuild: the script loaded, then run in one pipeline per page.
    let client = reqwest::Client::new();
    let status = rebuild_through_api(&client, &api_url, "user", Duration::from_secs(30)).await;
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["summary"]["keys"], 10, "{status}");
}
