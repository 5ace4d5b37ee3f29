//! Dual-write ingestion (`ingest = true`): every worker consumes the ingest stream of each such
//! entity (`<prefix>ingest:<entity>`) in one consumer group and writes each batch to
//! PostgreSQL, then to the cache, then acknowledges it. `stalewatch_core::ingest` has the
//! contract (the record, the statement, the cache writes); this is the consumer.
//!
//! - One consumer reads every ingest stream at once (one `XREADGROUP` naming them all), up to
//!   `INGEST_BATCH` records of each; reading, claiming what a dead consumer left pending and
//!   dead-lettering are the shared stream mechanics (`crate::stream`), on a thread and
//!   database connections of the consumers' own.
//! - A batch: its records checked (a malformed one dead-lettered at once, with the reason),
//!   one upsert statement, one cache pipeline (through the cache's connection), then one
//!   pipeline on stalewatch's own Redis: `XACK` and the watermark. The stream, its group,
//!   the dead letters and the watermark live in stalewatch's Redis; only the values go to
//!   the cache.
//! - A batch that fails (PostgreSQL or a Redis unreachable) stays pending and is retried in
//!   place with backoff; after that the consumer restarts, and its records are claimed
//!   after `INGEST_CLAIM_IDLE_MS` by whichever consumer looks first. Each failure's reason is
//!   kept per entry (`<prefix>ingest:<entity>:errors`), so the dead letter of a record
//!   delivered `MAX_DELIVERIES` times says what kept failing.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use anyhow::Context;
use backon::{BackoffBuilder, ExponentialBuilder};
use deadpool_redis::{Connection, Pool};
use redis::{streams::StreamId, AsyncCommands};
use stalewatch_core::{
    cache,
    ingest::{self, Plan, FIELD, GROUP, MAX_DELIVERIES},
    rows::Rows,
    watermark,
};
use tokio_util::sync::CancellationToken;

use crate::{
    handlers::Ctx,
    hooks,
    stream::{self, Counters, Group},
};

/// What the consumers are told by the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Consumers in this process.
    pub consumers: usize,
    /// Records per stream per read.
    pub batch: usize,
    pub claim_idle: Duration,
}

/// Runs `settings.consumers` consumers of every ingest stream until `shutdown`, on a thread
/// of their own with a database pool of their own on `database_url`.
pub async fn run(
    ctx: Ctx,
    redis: redis::ConnectionInfo,
    database_url: String,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let n = settings.consumers;
    stream::on_own_runtime("ingest", ctx, database_url, n, n, move |ctx| {
        consume_all(ctx, redis, settings, shutdown)
    })
    .await
}

/// The ingest stream of `entity`, and its metrics.
fn group(ctx: &Ctx, entity: &str, claim_idle: Duration) -> Group {
    let m = ctx.metrics();
    Group {
        what: "ingest record",
        stream: ctx.keys().ingest(entity),
        dead: ctx.keys().ingest_dead(entity),
        group: GROUP,
        field: FIELD,
        max_deliveries: MAX_DELIVERIES,
        claim_idle,
        counters: Counters {
            reclaimed: m.ingest_reclaimed.with_label_values(&[entity]),
            dead: m.ingest_dead.with_label_values(&[entity]),
            length: m.ingest_stream_length.with_label_values(&[entity]),
            pending: m.ingest_pending.with_label_values(&[entity]),
        },
    }
}

async fn consume_all(
    ctx: Ctx,
    redis: redis::ConnectionInfo,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let pool = match stream::pool(redis, settings.consumers) {
        Ok(pool) => pool,
        Err(e) => {
            tracing::error!(error = %e, "ingest consumers not started: bad REDIS_URL");
            return;
        }
    };
    let groups: Vec<(String, Group)> = ctx
        .checker
        .watched
        .ingest_plans()
        .iter()
        .map(|p| {
            (
                p.entity.clone(),
                group(&ctx, &p.entity, settings.claim_idle),
            )
        })
        .collect();
    tracing::info!(
        streams = ?groups.iter().map(|(_, g)| g.stream.as_str()).collect::<Vec<_>>(),
        consumers = settings.consumers,
        "consuming ingest streams"
    );
    let stop = shutdown.clone();
    stream::supervise("ingest", settings.consumers, shutdown, move || {
        let (ctx, pool, groups, stop) = (ctx.clone(), pool.clone(), groups.clone(), stop.clone());
        async move { consume(ctx, &pool, &groups, settings.batch, stop).await }
    })
    .await
}

/// One consumer: reads new records of every stream (`groups`: each entity's), and now and
/// then claims records others left pending.
async fn consume(
    ctx: Ctx,
    pool: &Pool,
    groups: &[(String, Group)],
    batch: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = stream::consumer_name();
    let mut conn = pool.get().await.context("a connection for the consumer")?;
    for (_, g) in groups {
        stream::create_group(&mut conn, g).await?;
    }
    let mut cache = ctx.checker.cache.connection();
    let sha: String = cache::SET_UNLESS_NEWER
        .prepare_invoke()
        .load_async(&mut cache)
        .await
        .context("loading the versioned write into the cache's Redis")?;
    let mut writer = Writer {
        ctx,
        cache,
        sha,
        shutdown,
    };
    let refs: Vec<&Group> = groups.iter().map(|(_, g)| g).collect();
    // A consumer that starts looks for orphaned records at once: it may be the restart of one
    // that died holding some.
    let mut claimed_at: Option<Instant> = None;
    loop {
        if writer.shutdown.is_cancelled() {
            return Ok(());
        }
        for (i, records) in stream::read(&mut conn, &refs, &name, batch).await? {
            let (entity, group) = &groups[i];
            writer.batch(&mut conn, entity, group, records).await?;
        }
        if claimed_at.is_none_or(|at| at.elapsed() >= stream::CLAIM_EVERY) {
            claimed_at = Some(Instant::now());
            for (entity, group) in groups {
                writer
                    .reclaim(&mut conn, entity, group, &name, batch)
                    .await?;
                stream::sample(&mut conn, group).await?;
            }
        }
    }
}

/// What a consumer writes with.
struct Writer {
    ctx: Ctx,
    /// The cache's connection (`Cache::connection`): where the values go.
    cache: stalewatch_core::cache::CacheConn,
    /// [`cache::SET_UNLESS_NEWER`]'s hash, loaded in the cache's Redis.
    sha: String,
    shutdown: CancellationToken,
}

impl Writer {
    /// Writes one read's `records` of `group`'s entity: malformed ones dead-lettered, the rest
    /// written to both stores and acknowledged, retried in place with backoff while a store
    /// fails. An error leaves them pending, for a restarted or another consumer.
    async fn batch(
        &mut self,
        conn: &mut Connection,
        entity: &str,
        group: &Group,
        records: Vec<StreamId>,
    ) -> anyhow::Result<()> {
        let watched = self.ctx.checker.watched.clone();
        let (Some(plan), Some(rows)) = (
            watched.ingest_plans().iter().find(|p| p.entity == entity),
            watched.source(entity),
        ) else {
            anyhow::bail!("no ingesting entity {entity:?}: a bug");
        };
        let mut good = Vec::with_capacity(records.len());
        for record in records {
            match stream::payload(group, &record).and_then(|bytes| plan.parse(bytes)) {
                Ok(_) => good.push(record),
                Err(reason) => stream::dead_letter(conn, group, &record, &reason).await?,
            }
        }
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(5)
            .with_jitter()
            .build();
        while !good.is_empty() {
            let failed = match self.write(conn, group, plan, rows, &mut good).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            self.ctx
                .metrics()
                .ingest_batches
                .with_label_values(&[entity, "failed"])
                .inc();
            self.remember(conn, entity, &good, &failed).await;
            match backoff.next() {
                Some(after) if !self.shutdown.is_cancelled() => {
                    tracing::warn!(
                        error = format!("{failed:#}"),
                        ?after,
                        entity,
                        records = good.len(),
                        "ingest batch failed; retrying"
                    );
                    tokio::time::sleep(after).await;
                }
                _ => {
                    return Err(failed.context(format!(
                        "writing {} records of {}; they stay pending",
                        good.len(),
                        group.stream
                    )))
                }
            }
        }
        Ok(())
    }

    /// One attempt at `records` (checked already): the upsert, the cache pipeline, then the
    /// acknowledgement. Records PostgreSQL refuses are dead-lettered and taken out of
    /// `records`, so a retry does not meet them again.
    async fn write(
        &mut self,
        conn: &mut Connection,
        group: &Group,
        plan: &Plan,
        rows: &Rows,
        records: &mut Vec<StreamId>,
    ) -> anyhow::Result<()> {
        let entity = plan.entity.as_str();
        let (written, refused) = {
            let payloads: Vec<&[u8]> = records
                .iter()
                .map(|r| stream::payload(group, r).unwrap_or_default())
                .collect();
            let mut db = self.ctx.checker.pool.get().await?;
            let (written, refused) = plan
                .upsert_isolating(&mut db, &payloads)
                .await
                .context("upserting into PostgreSQL")?;
            (written, refused)
        };
        if !refused.is_empty() {
            for r in &refused {
                stream::dead_letter(conn, group, &records[r.index], &r.reason).await?;
            }
            let gone: HashSet<usize> = refused.iter().map(|r| r.index).collect();
            let mut i = 0;
            records.retain(|_| {
                i += 1;
                !gone.contains(&(i - 1))
            });
        }

        // Written to PostgreSQL, not yet to the cache: where a crash leaves the two apart
        // until the records are delivered again (a test kills the process here).
        hooks::pause(hooks::INGEST_BETWEEN_STORES).await;

        let writes = ingest::render(rows, &written);
        ingest::write_cache(&self.cache, &writes, rows.entity.ttl, &self.sha)
            .await
            .context("writing the cache")?;

        if !records.is_empty() {
            let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
            let mut pipe = redis::pipe();
            // The watermark first: once these are acknowledged, nothing would move it.
            if let Some(highest) = plan.highest_version(&written) {
                pipe.add_command(watermark::advance_cmd(
                    &self.ctx.keys().watermark(entity),
                    highest,
                ))
                .ignore();
            }
            pipe.cmd("XACK")
                .arg(&group.stream)
                .arg(GROUP)
                .arg(&ids)
                .ignore();
            pipe.cmd("HDEL")
                .arg(self.ctx.keys().ingest_errors(entity))
                .arg(&ids)
                .ignore();
            pipe.query_async::<()>(&mut **conn)
                .await
                .context("acknowledging ingest records")?;
        }
        let m = self.ctx.metrics();
        m.ingest_records
            .with_label_values(&[entity])
            .inc_by(records.len() as u64);
        m.ingest_batches
            .with_label_values(&[entity, "written"])
            .inc();
        records.clear();
        Ok(())
    }

    /// Keeps why `records` failed, for their dead letter if they never succeed. Best effort:
    /// the Redis it goes to may be what failed.
    async fn remember(
        &self,
        conn: &mut Connection,
        entity: &str,
        records: &[StreamId],
        error: &anyhow::Error,
    ) {
        let reason = format!("{error:#}");
        let fields: Vec<(&str, &str)> = records
            .iter()
            .map(|r| (r.id.as_str(), reason.as_str()))
            .collect();
        let kept: redis::RedisResult<()> = conn
            .hset_multiple(self.ctx.keys().ingest_errors(entity), &fields)
            .await;
        if let Err(e) = kept {
            tracing::debug!(error = %e, "could not keep the reason of a failed ingest batch");
        }
    }

    /// Records of `group` pending longer than its claim time: those delivered too often are
    /// dead-lettered with the last error seen, the others claimed and written.
    async fn reclaim(
        &mut self,
        conn: &mut Connection,
        entity: &str,
        group: &Group,
        name: &str,
        batch: usize,
    ) -> anyhow::Result<()> {
        let found = stream::reclaim(conn, group, name, batch).await?;
        let errors = self.ctx.keys().ingest_errors(entity);
        for (record, times) in found.exhausted {
            let last: Option<String> = conn.hget(&errors, &record.id).await?;
            let reason = match last {
                Some(last) => {
                    format!("delivered {times} times without being written; last error: {last}")
                }
                None => format!("delivered {times} times without being written"),
            };
            stream::dead_letter(conn, group, &record, &reason).await?;
            let _: () = conn.hdel(&errors, &record.id).await?;
        }
        if !found.claimed.is_empty() {
            self.batch(conn, entity, group, found.claimed).await?;
        }
        Ok(())
    }
}
