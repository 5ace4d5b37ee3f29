//! Data for `scripts/bench`: fills the benchmark database and its cache, pushes check jobs,
//! and writes the raw Redis reads used as a floor. Not a benchmark itself.
//!
//! ```text
//! bench_seed seed <items> <stale-percent>   TRUNCATE, insert <items> rows, cache every one
//! bench_seed cache <stale-percent>          (re)write every row's cached copy
//! bench_seed push-checks <ids-per-job>      check jobs covering every item, in id order
//! bench_seed mget-resp <keys-per-mget>      MGET commands over every item key, as RESP on
//!                                           stdout (for `redis-cli --pipe`)
//! bench_seed read-keys <keys-per-batch>     every item key read from the watched cache by
//!                                           MGET as redis-rs sends it, then as stalewatch
//!                                           reads a batch; keys/s of each
//! bench_seed detect <k> <gap-ms> <wait-s> [api-url]
//!                                           k stale cache writes by "another client" and k
//!                                           plain-SQL changes nobody caches, gap-ms apart;
//!                                           prints the Detected and Confirmed latencies
//!                                           read from the incidents' timestamps and, with
//!                                           an API, as seen over HTTP by a client polling it
//! ```
//!
//! Reads DATABASE_URL, REDIS_URL, CACHE_REDIS_URL (and CACHE_REDIS_CLUSTER), KEY_PREFIX and
//! CACHE_TTL_SECS like the binaries; items are cached in the watched cache. It truncates
//! tables and writes keys, so it refuses to run unless the database name and the key prefix
//! both start with "bench" (scripts/bench uses `stalewatch_bench` and `bench:`).

use std::{collections::HashMap, io::Write, time::Instant};

use anyhow::{bail, Context};
use diesel::sql_types::BigInt;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use stalewatch_core::{
    cache::{self, Cache, CacheConn, Keyed},
    config::Config,
    db::{
        self,
        items::{self, Item},
    },
    incident::Source,
    jobs::CheckJob,
    keys::Keys,
    queue,
};
use tokio::sync::mpsc;
use uuid::Uuid;

/// Rows read per page and SETs per pipeline: big enough that round trips don't matter,
/// small enough (about 2.5 MB of values) not to stall Redis for other users.
const PAGE: i64 = 10_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let db_name = config.database_url.rsplit('/').next().unwrap_or_default();
    if !db_name.contains("bench") {
        bail!("refusing to touch database {db_name:?}: bench_seed only runs on a bench database");
    }
    if !config.key_prefix.starts_with("bench") {
        bail!(
            "refusing KEY_PREFIX={:?}: use a bench prefix",
            config.key_prefix
        );
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    db::migrate(&config.database_url).await?;
    match args.as_slice() {
        ["seed", n, pct] => {
            let n: i64 = n.parse().context("items")?;
            let pct: f64 = pct.parse().context("stale percent")?;
            seed_rows(&config, n).await?;
            write_cache(&config, pct).await
        }
        ["cache", pct] => write_cache(&config, pct.parse().context("stale percent")?).await,
        ["push-checks", per_job] => push_checks(&config, per_job.parse()?).await,
        ["mget-resp", per_cmd] => mget_resp(&config, per_cmd.parse()?).await,
        ["read-keys", per_batch] => read_keys(&config, per_batch.parse()?).await,
        ["detect", k, gap, wait] => {
            detect(&config, k.parse()?, gap.parse()?, wait.parse()?, None).await
        }
        ["detect", k, gap, wait, api] => {
            let api = Some(api.trim_end_matches('/').to_owned());
            detect(&config, k.parse()?, gap.parse()?, wait.parse()?, api).await
        }
        _ => bail!(
            "usage: bench_seed seed <items> <stale-percent> | cache <stale-percent> \
             | push-checks <ids-per-job> | mget-resp <keys-per-mget> | read-keys <keys-per-batch> \
             | detect <k> <gap-ms> <wait-s> [api-url]"
        ),
    }
}

async fn connect_pg(config: &Config) -> anyhow::Result<AsyncPgConnection> {
    use diesel_async::AsyncConnection;
    Ok(AsyncPgConnection::establish(&config.database_url).await?)
}

/// One INSERT ... SELECT generate_series: the server builds the rows, nothing crosses the
/// wire per row. Ids are UUIDv7-shaped (48-bit millisecond prefix, increasing with the row
/// number) like the API's `Uuid::now_v7()`, so id order is insertion order as in real data.
async fn seed_rows(config: &Config, n: i64) -> anyhow::Result<()> {
    let mut conn = connect_pg(config).await?;
    let started = Instant::now();
    diesel::sql_query("TRUNCATE items, inconsistencies RESTART IDENTITY")
        .execute(&mut conn)
        .await?;
    diesel::sql_query(
        "INSERT INTO items (id, name, value, version, created_at, updated_at) \
         SELECT (lpad(to_hex(t0 + g), 12, '0') || '7' || substr(h, 1, 3) || '8' \
                 || substr(h, 4, 15))::uuid, \
                'item-' || g, \
                jsonb_build_object('n', g, 'color', (ARRAY['red', 'green', 'blue'])[1 + g % 3], \
                                   'size', 1 + g % 40, 'tags', jsonb_build_array('bench', 'seed')), \
                2, now(), now() \
         FROM (SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint AS t0) s, \
              generate_series(1, $1::bigint) AS g, \
              LATERAL md5(g::text) AS h",
    )
    .bind::<BigInt, _>(n)
    .execute(&mut conn)
    .await?;
    diesel::sql_query("ANALYZE items")
        .execute(&mut conn)
        .await?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "seed: inserted {n} rows in {secs:.2} s ({:.0} rows/s)",
        n as f64 / secs
    );
    Ok(())
}

/// The cached copy of a stale item: one version older, with another value, as a writer that
/// lost a race would have left it.
fn stale_copy(item: &Item) -> Vec<u8> {
    let mut old = item.clone();
    old.version = item.version - 1;
    old.value = serde_json::json!({ "n": -1, "color": "stale" });
    old.updated_at = item.created_at;
    old.to_cache_bytes()
}

/// Writes every row's exact cached bytes (`Item::to_cache_bytes`, what the API writes) with
/// pipelined SETs; every `100 / stale_pct`-th row in id order gets a stale copy instead.
/// A reader task pages through the table while the writer pipelines the previous page.
async fn write_cache(config: &Config, stale_pct: f64) -> anyhow::Result<()> {
    let started = Instant::now();
    let every = if stale_pct > 0.0 {
        (100.0 / stale_pct).round().max(1.0) as u64
    } else {
        0
    };
    let keys = Keys::new(config.key_prefix.clone());
    let ttl = config.cache_ttl.as_secs().max(1);
    let (tx, mut rx) = mpsc::channel::<Vec<Item>>(2);
    let mut conn = connect_pg(config).await?;
    let reader = tokio::spawn(async move {
        let mut cursor: Option<Uuid> = None;
        loop {
            let (_, rows) = items::page_after(&mut conn, cursor, PAGE).await?;
            // The bench seeds its own rows, all decodable.
            let page: Vec<Item> = rows.into_iter().filter_map(|r| r.decode().ok()).collect();
            let Some(last) = page.last() else { break };
            cursor = Some(last.id);
            let short = (page.len() as i64) < PAGE;
            if tx.send(page).await.is_err() || short {
                break;
            }
        }
        anyhow::Ok(())
    });
    // The watched cache (CACHE_REDIS_URL, else REDIS_URL; a cluster's pages go one pipeline
    // per primary).
    let redis = cache_connection(config).await?;
    let (mut written, mut stale) = (0u64, 0u64);
    while let Some(page) = rx.recv().await {
        let mut groups = Vec::with_capacity(page.len());
        for item in &page {
            let bytes = if every > 0 && written.is_multiple_of(every) {
                stale += 1;
                stale_copy(item)
            } else {
                item.to_cache_bytes()
            };
            let key = keys.item(&item.id);
            groups.push(Keyed::one(
                key.clone(),
                redis::cmd("SET")
                    .arg(key)
                    .arg(bytes)
                    .arg("EX")
                    .arg(ttl)
                    .clone(),
            ));
            written += 1;
        }
        for reply in redis.grouped(&groups).await?.into_iter().flatten() {
            if let redis::Value::ServerError(e) = reply {
                bail!("caching the items: {e}");
            }
        }
    }
    reader.await??;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "seed: cached {written} items ({stale} stale) in {secs:.2} s ({:.0} keys/s)",
        written as f64 / secs
    );
    Ok(())
}

/// A connection to the watched cache for whole pages (a long response timeout).
async fn cache_connection(config: &Config) -> anyhow::Result<CacheConn> {
    Ok(cache::open(
        &config.cache_redis()?,
        cache::Timeouts {
            connect: std::time::Duration::from_secs(2),
            response: std::time::Duration::from_secs(60),
        },
    )
    .await?)
}

/// Reads every item key, `per_batch` at a time in id order, from the watched cache twice: with
/// one `MGET` per batch as redis-rs sends it (on a cluster its client splits it by slot and
/// sends the parts to their nodes), and as stalewatch reads a batch (`Cache::get_many`: one
/// MGET on a single node, one pipeline of GETs per primary on a cluster). Both must read the
/// same values; prints their keys per second.
async fn read_keys(config: &Config, per_batch: usize) -> anyhow::Result<()> {
    let ids = all_ids(config).await?;
    let keys = Keys::new(config.key_prefix.clone());
    let conn = cache_connection(config).await?;
    let reader = Cache::new(conn.clone(), keys.clone());
    let batches: Vec<Vec<String>> = ids
        .chunks(per_batch.max(1))
        .map(|c| c.iter().map(|id| keys.item(id)).collect())
        .collect();
    let started = Instant::now();
    let mut by_mget = Vec::with_capacity(ids.len());
    for batch in &batches {
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(batch)
            .query_async(&mut conn.clone())
            .await?;
        by_mget.extend(values);
    }
    let mget_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut grouped = Vec::with_capacity(ids.len());
    for batch in &batches {
        grouped.extend(reader.get_many(batch).await?);
    }
    let grouped_s = started.elapsed().as_secs_f64();
    if by_mget != grouped {
        bail!("MGET and stalewatch's batched read disagree");
    }
    let found = grouped.iter().filter(|v| v.is_some()).count();
    eprintln!(
        "read-keys: {} keys ({found} cached) in batches of {per_batch}: MGET {mget_s:.2} s, batched {grouped_s:.2} s",
        ids.len()
    );
    println!(
        "RESULT mget_keys_per_s={:.0} grouped_keys_per_s={:.0}",
        ids.len() as f64 / mget_s,
        ids.len() as f64 / grouped_s
    );
    Ok(())
}

/// Every item id in id order.
async fn all_ids(config: &Config) -> anyhow::Result<Vec<Uuid>> {
    use diesel::{ExpressionMethods, QueryDsl};
    use stalewatch_core::db::schema::items::dsl;
    let mut conn = connect_pg(config).await?;
    Ok(dsl::items
        .select(dsl::id)
        .order(dsl::id.asc())
        .load(&mut conn)
        .await?)
}

/// Check jobs of `per_job` ids each, covering every item, pushed as ready now (the worker is
/// expected to be stopped, so they wait in the queue). At most 1,000 jobs per push.
async fn push_checks(config: &Config, per_job: usize) -> anyhow::Result<()> {
    let ids = all_ids(config).await?;
    let started = Instant::now();
    let keys = Keys::new(config.key_prefix.clone());
    let mut conn = queue::connect(&config.redis_url).await?;
    let jobs: Vec<CheckJob> = ids
        .chunks(per_job.max(1))
        .map(|c| CheckJob::for_items(&keys, c, Source::WriteCheck))
        .collect();
    for chunk in jobs.chunks(1000) {
        let batch = chunk.iter().cloned().map(|j| (j, None)).collect();
        queue::push(&mut conn, &keys, batch).await?;
    }
    eprintln!(
        "push-checks: {} jobs covering {} ids in {:.2} s",
        jobs.len(),
        ids.len(),
        started.elapsed().as_secs_f64()
    );
    // The one line scripts/bench reads.
    println!("jobs={} ids={}", jobs.len(), ids.len());
    Ok(())
}

/// RESP-encoded `MGET` commands over every item key in id order, `per_cmd` keys each.
async fn mget_resp(config: &Config, per_cmd: usize) -> anyhow::Result<()> {
    let ids = all_ids(config).await?;
    let keys = Keys::new(config.key_prefix.clone());
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    let mut commands = 0;
    for chunk in ids.chunks(per_cmd.max(1)) {
        write!(out, "*{}\r\n$4\r\nMGET\r\n", chunk.len() + 1)?;
        for id in chunk {
            let key = keys.item(id);
            write!(out, "${}\r\n{}\r\n", key.len(), key)?;
        }
        commands += 1;
    }
    out.flush()?;
    eprintln!(
        "mget-resp: {commands} MGET commands over {} keys",
        ids.len()
    );
    Ok(())
}

#[derive(diesel::QueryableByName)]
struct Latency {
    #[diesel(sql_type = diesel::sql_types::Text)]
    cache_key: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
    detected_ms: Option<f64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
    confirmed_ms: Option<f64>,
}

/// Divergences made the way they happen in production, one every `gap_ms`, alternating: a
/// stale SET by another Redis client (the cached copy one version old), and a plain-SQL
/// UPDATE whose cache write never comes. Each one's start (the client's clock before the SET;
/// PostgreSQL's clock inside the UPDATE, just before its commit; one host, one clock) is kept
/// in `bench_t0`; after `wait_s` the incidents' own timestamps give the latencies. With an
/// API, a client polls it meanwhile, and what it saw gives the same latencies black box.
async fn detect(
    config: &Config,
    k: usize,
    gap_ms: u64,
    wait_s: u64,
    api: Option<String>,
) -> anyhow::Result<()> {
    use diesel::sql_types::{Text, Uuid as SqlUuid};
    let mut conn = connect_pg(config).await?;
    diesel::sql_query(
        "CREATE TABLE IF NOT EXISTS bench_t0 (cache_key text PRIMARY KEY, class text, t0 timestamptz)",
    )
    .execute(&mut conn)
    .await?;
    diesel::sql_query("TRUNCATE bench_t0")
        .execute(&mut conn)
        .await?;
    let ids = all_ids(config).await?;
    if ids.len() < 2 * k {
        bail!("detect needs {} items, the table has {}", 2 * k, ids.len());
    }
    // Spread over the table, away from anything a previous run touched.
    let step = ids.len() / (2 * k);
    let keys = Keys::new(config.key_prefix.clone());
    let pool = db::pool(&config.database_url, 2)?;
    let client = redis::Client::open(config.redis_url.as_str())?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let watcher = api.map(|api| tokio::spawn(watch_http(api, stopped)));
    for i in 0..k {
        let cached = ids[2 * i * step];
        let item = items::get(&pool, cached).await?.context("item")?;
        let t0 = chrono::Utc::now();
        redis::cmd("SET")
            .arg(keys.item(&item.id))
            .arg(stale_copy(&item))
            .query_async::<()>(&mut redis)
            .await?;
        diesel::sql_query("INSERT INTO bench_t0 VALUES ($1, 'cache_write', $2)")
            .bind::<Text, _>(keys.item(&item.id))
            .bind::<diesel::sql_types::Timestamptz, _>(t0)
            .execute(&mut conn)
            .await?;
        tokio::time::sleep(std::time::Duration::from_millis(gap_ms)).await;

        let changed = ids[(2 * i + 1) * step];
        diesel::sql_query(
            "WITH u AS (UPDATE items SET version = version + 1, name = name || '!' \
                        WHERE id = $1 RETURNING id) \
             INSERT INTO bench_t0 SELECT $2, 'sql_change', clock_timestamp() FROM u",
        )
        .bind::<SqlUuid, _>(changed)
        .bind::<Text, _>(keys.item(&changed))
        .execute(&mut conn)
        .await?;
        tokio::time::sleep(std::time::Duration::from_millis(gap_ms)).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(wait_s)).await;
    let _ = stop.send(());
    let seen = match watcher {
        Some(w) => Some(w.await??),
        None => None,
    };
    let rows: Vec<Latency> = diesel::sql_query(
        "SELECT t.cache_key, \
                extract(epoch FROM min(i.first_seen_at) - t.t0)::float8 * 1000 AS detected_ms, \
                extract(epoch FROM min(i.confirmed_at) - t.t0)::float8 * 1000 AS confirmed_ms \
         FROM bench_t0 t LEFT JOIN inconsistencies i ON i.cache_key = t.cache_key \
         GROUP BY t.cache_key, t.t0 ORDER BY t.cache_key",
    )
    .load(&mut conn)
    .await?;
    let classes: Vec<(String, String, chrono::DateTime<chrono::Utc>)> = {
        #[derive(diesel::QueryableByName)]
        struct Class {
            #[diesel(sql_type = Text)]
            cache_key: String,
            #[diesel(sql_type = Text)]
            class: String,
            #[diesel(sql_type = diesel::sql_types::Timestamptz)]
            t0: chrono::DateTime<chrono::Utc>,
        }
        let c: Vec<Class> = diesel::sql_query("SELECT cache_key, class, t0 FROM bench_t0")
            .load(&mut conn)
            .await?;
        c.into_iter()
            .map(|c| (c.cache_key, c.class, c.t0))
            .collect()
    };
    let q = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            f64::NAN
        } else {
            v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
        }
    };
    for class in ["cache_write", "sql_change"] {
        let of_class: Vec<&Latency> = rows
            .iter()
            .filter(|r| {
                classes
                    .iter()
                    .any(|(k, c, _)| k == &r.cache_key && c == class)
            })
            .collect();
        let mut detected: Vec<f64> = of_class.iter().filter_map(|r| r.detected_ms).collect();
        let mut confirmed: Vec<f64> = of_class.iter().filter_map(|r| r.confirmed_ms).collect();
        print!(
            "detect class={class} n={} detected={} confirmed={} detected_p50_ms={:.0} detected_p99_ms={:.0} confirmed_p50_ms={:.0} confirmed_p99_ms={:.0}",
            of_class.len(),
            detected.len(),
            confirmed.len(),
            q(&mut detected, 0.5),
            q(&mut detected, 0.99),
            q(&mut confirmed, 0.5),
            q(&mut confirmed, 0.99),
        );
        if let Some(seen) = &seen {
            let since = |at: &HashMap<String, chrono::DateTime<chrono::Utc>>| -> Vec<f64> {
                classes
                    .iter()
                    .filter(|(_, c, _)| c == class)
                    .filter_map(|(k, _, t0)| at.get(k).map(|t| (*t - *t0).as_seconds_f64() * 1e3))
                    .collect()
            };
            let (mut detected, mut confirmed) = (since(&seen.detected), since(&seen.confirmed));
            print!(
                " http_detected={} http_confirmed={} http_detected_p50_ms={:.0} http_detected_p99_ms={:.0} http_confirmed_p50_ms={:.0} http_confirmed_p99_ms={:.0} http_polls={} http_poll_p50_ms={:.1}",
                detected.len(),
                confirmed.len(),
                q(&mut detected, 0.5),
                q(&mut detected, 0.99),
                q(&mut confirmed, 0.5),
                q(&mut confirmed, 0.99),
                seen.polls.len(),
                q(&mut seen.polls.clone(), 0.5),
            );
        }
        println!();
    }
    Ok(())
}

/// How often the black-box client asks: a user's dashboard would poll far less often, but the
/// point is to see the detection latency, not the poll interval.
const HTTP_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// What a client polling the API saw: when each key's open incident first appeared, and when
/// it first appeared Confirmed (the client's clock when the answer arrived, an upper bound),
/// plus each poll's round trip.
struct Seen {
    detected: HashMap<String, chrono::DateTime<chrono::Utc>>,
    confirmed: HashMap<String, chrono::DateTime<chrono::Utc>>,
    polls: Vec<f64>,
}

/// Polls `GET /inconsistencies` for open incidents, newest first, until `stop`.
async fn watch_http(
    api: String,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<Seen> {
    let client = reqwest::Client::new();
    let url = format!("{api}/inconsistencies?state=detected,confirmed,persistent&limit=500");
    let mut seen = Seen {
        detected: HashMap::new(),
        confirmed: HashMap::new(),
        polls: Vec::new(),
    };
    loop {
        let asked = Instant::now();
        let body: serde_json::Value = client
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let now = chrono::Utc::now();
        seen.polls.push(asked.elapsed().as_secs_f64() * 1e3);
        for incident in body["data"].as_array().context("no data in the listing")? {
            let (Some(key), Some(state)) = (incident["key"].as_str(), incident["state"].as_str())
            else {
                bail!("an incident without key or state: {incident}");
            };
            seen.detected.entry(key.to_owned()).or_insert(now);
            if state != "detected" {
                seen.confirmed.entry(key.to_owned()).or_insert(now);
            }
        }
        tokio::select! {
            _ = &mut stop => return Ok(seen),
            _ = tokio::time::sleep(HTTP_POLL) => {}
        }
    }
}
