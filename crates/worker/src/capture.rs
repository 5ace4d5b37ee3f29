//! Database-side detection in real time: committed changes of the watched tables, read from a
//! logical replication slot (pgoutput), each turned into a check of the keys it touches after
//! the settle delay (docs/change-capture.md).
//!
//! - One reader per slot: the worker holding the capture lease reads; the others wait to take
//!   over, and any number of workers run the checks it queues.
//! - At least once: the slot is acknowledged only up to the oldest change whose check is not
//!   queued yet, so a reader killed at any point leaves the rest for the next one.
//! - A slot that is dropped, lost or re-created loses changes; that is said loudly, counted
//!   (`stalewatch_capture_slot_lost_total`) and covered by starting a sweep pass at once.
//! - A slot holds WAL back while nobody reads it: `stalewatch_capture_retained_wal_bytes`.
//!   While every change is filtered out the reader acknowledges the server's keepalives, so
//!   an idle slot does not hold WAL either.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use backon::Retryable;
use diesel::{sql_types::Text, QueryableByName};
use diesel_async::RunQueryDsl;
use futures::FutureExt;
use pgwire_replication::{
    client::{ReplicationClient, ReplicationEvent},
    config::{ReplicationConfig, SslMode, TlsConfig},
    lsn::Lsn,
};
use redis::AsyncCommands;
use stalewatch_core::{
    capture::{Commit, Due, Router, Settle, Touched, Unmapped},
    config::Config,
    entity::quote_ident,
    incident::Source,
    invalidation::{Batcher, Entry, Mode, Strategy},
    jobs::{CheckJob, Job, SloJob},
    lease::Lease,
    pgoutput::{self, Message, Relations, PG_EPOCH_UNIX_US},
    queue,
};
use tokio_util::sync::CancellationToken;

use crate::{handlers::Ctx, supervise};

/// The lease outlives a reader that died by this much; renewed every `LEASE_RENEW`.
const LEASE_TTL: Duration = Duration::from_secs(5);
const LEASE_RENEW: Duration = Duration::from_secs(1);
/// How often a worker without the lease tries to take it, and everyone samples the slot.
const STANDBY_POLL: Duration = Duration::from_secs(1);
const SLOT_SAMPLE: Duration = Duration::from_secs(5);
/// Keys per check job: a transaction of many rows makes few, large jobs.
pub(crate) const KEYS_PER_JOB: usize = 1000;
/// Keys taken from the settle buffer per flush (bounds one push).
pub(crate) const FLUSH_LIMIT: usize = 50 * KEYS_PER_JOB;
/// Events taken without waiting, after one that was waited for, before the next flush.
const DRAIN_MAX: usize = 10_000;
/// The longest and the shortest wait for more keys to fall due before a push (see
/// `Reader::flush_every`). Even with no settle delay a millisecond's worth goes out together:
/// a push per transaction at 1,000 transactions/s queued the pushes behind each other.
const FLUSH_EVERY_MAX: Duration = Duration::from_millis(5);
const FLUSH_EVERY_MIN: Duration = Duration::from_millis(1);
/// How often the acknowledged position is written down and sent while busy.
const ACK_EVERY: Duration = Duration::from_millis(100);

/// Reads the slot whenever this worker holds the lease, until `shutdown`, on a thread and a
/// Redis connection of its own.
///
/// Why not a task like the others: the commit-to-queued latency is decided by how soon the
/// reader runs after a message arrives. On the worker's runtime it waited behind the very
/// check jobs it had just queued (a batch of checks holds a thread for a millisecond or
/// more), and its pushes queued behind their MGETs on the shared connection. On its own
/// thread the operating system, not the runtime's queue, decides when it runs.
pub async fn run(ctx: Ctx, config: Config, shutdown: CancellationToken) {
    let thread = std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the capture runtime")?;
            runtime.block_on(async move {
                let mut ctx = ctx;
                // Retried like any start-up failure of the reader would be.
                let redis = config.redis()?;
                let connect = || queue::connect(&redis);
                ctx.queue_conn = connect
                    .retry(supervise::restart_backoff())
                    .when(|_| !shutdown.is_cancelled())
                    .await
                    .context("connecting the capture reader to Redis")?;
                read_slot(ctx, config, shutdown).await;
                anyhow::Ok(())
            })
        });
    let joined = match thread {
        Ok(thread) => tokio::task::spawn_blocking(move || thread.join()).await,
        Err(e) => {
            tracing::error!(error = %e, "change capture is off: could not start its thread");
            return;
        }
    };
    match joined {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!(error = format!("{e:#}"), "change capture stopped"),
        Ok(Err(_)) | Err(_) => tracing::error!("change capture stopped: its thread panicked"),
    }
}

/// The reader's life on its thread: waits for the lease, reads, restarts after failures.
async fn read_slot(ctx: Ctx, config: Config, shutdown: CancellationToken) {
    match wal_level(&ctx).await {
        Ok(level) if level == "logical" => {}
        Ok(level) => {
            tracing::error!(
                wal_level = %level,
                "change capture is off: PostgreSQL has wal_level={level}; set wal_level=logical \
                 (a restart) or CHANGE_CAPTURE=off. Until then only the sweep sees changes made \
                 outside stalewatch"
            );
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not read wal_level; trying change capture anyway")
        }
    }
    let sampler = tokio::spawn(sample_slot(ctx.clone(), config.clone(), shutdown.clone()));
    let once = || {
        let (ctx, config, shutdown) = (ctx.clone(), config.clone(), shutdown.clone());
        async move { lead(&ctx, &config, &shutdown).await }
    };
    let result = once
        .retry(supervise::restart_backoff())
        .when(|_| !shutdown.is_cancelled())
        .notify(|e, after| {
            ctx.metrics().capture_active.set(0);
            tracing::warn!(
                error = format!("{e:#}"),
                ?after,
                "change capture stopped; restarting"
            );
        })
        .await;
    ctx.metrics().capture_active.set(0);
    if let Err(e) = result {
        tracing::debug!(error = %e, "change capture stopped during shutdown");
    }
    let _ = sampler.await;
}

/// Waits for the lease, then reads the slot until shutdown (Ok) or a failure (Err).
async fn lead(ctx: &Ctx, config: &Config, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let key = ctx.keys().capture_lease(&config.capture_slot);
    let Some(lease) = wait_for_lease(ctx, &key, shutdown).await? else {
        return Ok(());
    };
    let result = match Reader::start(ctx, config).await {
        Ok(reader) => reader.read(&lease, shutdown).await,
        Err(e) => Err(e),
    };
    let _ = lease.release().await;
    result
}

/// Takes the reader lease `key` as soon as nobody holds it; None at shutdown. (Shared with the
/// outbox reader: one reader at a time, whichever way changes are captured.)
pub(crate) async fn wait_for_lease(
    ctx: &Ctx,
    key: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Lease>> {
    loop {
        if let Some(lease) = Lease::try_acquire(&ctx.queue_conn, key, LEASE_TTL).await? {
            return Ok(Some(lease));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(STANDBY_POLL) => {}
        }
    }
}

/// One open replication stream and what it has read but not yet handed over.
struct Reader<'a> {
    ctx: &'a Ctx,
    config: &'a Config,
    router: Router,
    client: ReplicationClient,
    relations: Relations,
    settle: Settle,
    /// The keys of the transaction being read.
    txn: Option<Vec<Touched>>,
    /// The commit LSN and time (PostgreSQL epoch) of the transaction being read.
    begin: (u64, i64),
    /// Invalidation entries of the transaction being read (with their rule's strategy), then
    /// of every committed one not yet in the stream; batched rules' changes wait in `batcher`.
    txn_invalidations: Vec<(Entry, Strategy)>,
    invalidations: Vec<Entry>,
    batcher: Batcher,
    /// Rules whose key a change could not name, per rule: changes, missing columns.
    rules_unmapped: BTreeMap<usize, (u64, Vec<String>)>,
    unmapped: Vec<Unmapped>,
    /// Last position written down and sent.
    acked: u64,
    acked_at: Instant,
    /// Keys falling due within this of each other go out in one push: at 1,000 changes/s
    /// one push per key would be 1,000 pushes (and jobs) a second. A twentieth of the settle
    /// delay, from 1 to 5 ms.
    flush_every: Duration,
    flushed_at: Instant,
}

impl<'a> Reader<'a> {
    async fn start(ctx: &'a Ctx, config: &'a Config) -> anyhow::Result<Reader<'a>> {
        let router = watched_router(ctx);
        publish(ctx, config, &router).await?;
        let start = ensure_slot(ctx, config).await?;
        let connect = replication_config(config)?;
        let client = ReplicationClient::connect(connect)
            .await
            .with_context(|| format!("starting replication from slot {}", config.capture_slot))?;
        ctx.metrics().capture_active.set(1);
        tracing::info!(
            slot = %config.capture_slot,
            publication = %config.capture_publication,
            from = %Lsn::from_u64(start),
            settle_ms = config.change_settle.as_millis() as u64,
            "reading committed changes"
        );
        Ok(Reader {
            ctx,
            config,
            router,
            client,
            relations: Relations::new(),
            settle: Settle::new(config.change_settle),
            txn: None,
            begin: (0, 0),
            txn_invalidations: Vec::new(),
            invalidations: Vec::new(),
            batcher: Batcher::new(),
            rules_unmapped: BTreeMap::new(),
            unmapped: Vec::new(),
            acked: start,
            acked_at: Instant::now(),
            flush_every: (config.change_settle / 20).clamp(FLUSH_EVERY_MIN, FLUSH_EVERY_MAX),
            flushed_at: Instant::now(),
        })
    }

    async fn read(mut self, lease: &Lease, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut renew = tokio::time::interval(LEASE_RENEW);
        loop {
            let next = match (self.settle.next_due(), self.batcher.next_due()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let wake = next.map_or_else(
                || tokio::time::Instant::now() + ACK_EVERY,
                |due| due.max(self.flushed_at + self.flush_every).into(),
            );
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.client.stop();
                    return Ok(());
                }
                _ = renew.tick() => {
                    if !lease.renew().await? {
                        bail!("the capture lease was lost (another worker took it over)");
                    }
                }
                event = self.client.recv() => {
                    let Some(event) = event.context("reading the replication stream")? else {
                        bail!("the replication stream ended");
                    };
                    self.on_event(event).await?;
                    // Under load, take what has already arrived before flushing: one push
                    // and one acknowledgement for many transactions instead of one each.
                    for _ in 0..DRAIN_MAX {
                        let Some(next) = self.client.recv().now_or_never() else {
                            break;
                        };
                        let Some(event) = next.context("reading the replication stream")? else {
                            bail!("the replication stream ended");
                        };
                        self.on_event(event).await?;
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
            self.flush().await?;
        }
    }

    async fn on_event(&mut self, event: ReplicationEvent) -> anyhow::Result<()> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                self.txn = Some(Vec::new());
                self.begin = (final_lsn.as_u64(), commit_time_micros);
            }
            ReplicationEvent::XLogData { data, .. } => {
                let message = pgoutput::decode(&data)
                    .map_err(|e| anyhow::anyhow!("undecodable pgoutput message: {e}"))?;
                self.on_message(message).await;
            }
            ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            } => {
                self.ctx
                    .metrics()
                    .capture_read_delay
                    .observe(since_commit(now_us(), commit_time_micros));
                let keys = self.txn.take().unwrap_or_default();
                let txn = std::mem::take(&mut self.txn_invalidations);
                let now = self.batcher.add(lsn.as_u64(), txn, Instant::now());
                self.invalidations.extend(now);
                self.report_rules_unmapped();
                self.report_unmapped();
                self.settle.add(
                    keys.into_iter().map(|t| (t.entity, t.key)),
                    Commit {
                        lsn: lsn.as_u64(),
                        end_lsn: end_lsn.as_u64(),
                        time_us: commit_time_micros,
                    },
                    Instant::now(),
                );
            }
            // Nothing read is waiting: everything up to the server's end can go, so a slot
            // whose every change is filtered out does not hold WAL back.
            ReplicationEvent::KeepAlive { wal_end, .. }
                if self.txn.is_none()
                    && self.settle.is_idle()
                    && self.invalidations.is_empty()
                    && self.batcher.is_empty() =>
            {
                self.ack(wal_end.as_u64(), true).await?;
            }
            _ => {}
        }
        Ok(())
    }

    async fn on_message(&mut self, message: Message) {
        let (relation, old, new, op) = match message {
            Message::Relation(r) => {
                self.relations.apply(r);
                return;
            }
            Message::Insert { relation, new } => (relation, None, Some(new), "insert"),
            Message::Update {
                relation, old, new, ..
            } => (relation, old, Some(new), "update"),
            Message::Delete { relation, old, .. } => (relation, Some(old), None, "delete"),
            Message::Truncate { relations, .. } => {
                let names: Vec<String> = relations
                    .iter()
                    .filter_map(|id| self.relations.get(*id))
                    .map(|r| format!("{}.{}", r.namespace, r.name))
                    .collect();
                tracing::warn!(tables = ?names, "TRUNCATE of a watched table: its cached keys cannot be named one by one; starting a sweep pass");
                request_sweep(self.ctx).await;
                return;
            }
            _ => return,
        };
        let Some(rel) = self.relations.get(relation) else {
            tracing::warn!(
                relation,
                "a change of a relation never described; skipped, the sweep covers it"
            );
            return;
        };
        let txn = self.txn.get_or_insert_with(Vec::new);
        let first = txn.len();
        self.router
            .change(rel, old.as_ref(), new.as_ref(), txn, &mut self.unmapped);
        // Keys of entities that invalidate: one stream entry per entity of this row.
        let mut by_entity: Vec<(usize, Vec<String>)> = Vec::new();
        for t in &txn[first..] {
            if !self.router.invalidates(t.entity) {
                continue;
            }
            match by_entity.iter_mut().find(|(e, _)| *e == t.entity) {
                Some((_, keys)) => keys.push(t.key.clone()),
                None => by_entity.push((t.entity, vec![t.key.clone()])),
            }
        }
        let (commit_lsn, commit_time_us) = self.begin;
        let entry = |entity: &str, primary_key, keys, patterns| Entry {
            table: format!("{}.{}", rel.namespace, rel.name),
            op: op.to_string(),
            entity: entity.to_string(),
            primary_key,
            keys,
            patterns,
            strategy: Mode::Immediate,
            commit_lsn: Lsn::from_u64(commit_lsn).to_pg_string(),
            commit_time_us: commit_time_us + PG_EPOCH_UNIX_US,
        };
        for (entity, keys) in by_entity {
            let primary_key = self
                .router
                .primary_key(entity, rel, old.as_ref(), new.as_ref());
            let e = entry(self.router.entity(entity), primary_key, keys, Vec::new());
            self.txn_invalidations.push((e, Strategy::Immediate));
        }
        // The `[[invalidate]]` rules on this table: their keys and patterns, one entry each.
        let mut hits = Vec::new();
        self.router
            .rule_change(rel, old.as_ref(), new.as_ref(), &mut hits);
        for hit in hits {
            if !hit.missing.is_empty() {
                let seen = self.rules_unmapped.entry(hit.rule).or_default();
                seen.0 += 1;
                for m in hit.missing {
                    if !seen.1.contains(&m) {
                        seen.1.push(m);
                    }
                }
            }
            if hit.keys.is_empty() && hit.patterns.is_empty() {
                continue;
            }
            let e = entry(
                self.router.rule(hit.rule),
                Vec::new(),
                hit.keys,
                hit.patterns,
            );
            self.txn_invalidations
                .push((e, self.router.rule_strategy(hit.rule)));
        }
        for &entity in self.router.entities_of(rel) {
            self.ctx
                .metrics()
                .capture_changes
                .with_label_values(&[self.router.entity(entity)])
                .inc();
        }
    }

    fn report_unmapped(&mut self) {
        report_unmapped(self.ctx, &self.router, &mut self.unmapped);
    }

    /// One log line per rule for the changes whose rule keys could not all be named.
    fn report_rules_unmapped(&mut self) {
        for (rule, (n, missing)) in std::mem::take(&mut self.rules_unmapped) {
            let name = self.router.rule(rule);
            self.ctx
                .metrics()
                .capture_unmapped
                .with_label_values(&[name])
                .inc_by(n);
            tracing::warn!(
                rule = name,
                changes = n,
                ?missing,
                "changes whose invalidation rule keys the stream does not name (REPLICA \
                 IDENTITY FULL on the table names them); those keys were not deleted"
            );
        }
    }

    /// Queues the checks that are due, then acknowledges what is handed over.
    async fn flush(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        // Invalidations go out on every pass, not every `flush_every`: their commit-to-UNLINK
        // time is what the application waits on, and under load a pass already carries
        // everything drained since the last one (one pipeline for many transactions).
        // Batches that are full or old enough go with them.
        self.invalidations.extend(self.batcher.due(now));
        if !self.invalidations.is_empty() {
            let entries = std::mem::take(&mut self.invalidations);
            crate::invalidate::publish(self.ctx, &entries).await?;
        }
        if now < self.flushed_at + self.flush_every {
            return Ok(());
        }
        self.flushed_at = now;
        loop {
            let due = self.settle.due(now, FLUSH_LIMIT);
            if due.is_empty() {
                break;
            }
            self.push(due).await?;
        }
        if let Some(safe) = self.settle.safe_lsn() {
            // Never past a transaction whose invalidations still wait in a batch.
            let safe = self
                .batcher
                .oldest_lsn()
                .map_or(safe, |held| safe.min(held));
            self.ack(safe, false).await?;
        }
        Ok(())
    }

    async fn push(&mut self, due: Due) -> anyhow::Result<()> {
        push_due(self.ctx, &self.router, due).await
    }

    /// Writes `lsn` down, then lets the server release WAL up to it. Written first, so the
    /// slot is never confirmed beyond what Redis says: a slot found further along was
    /// re-created or read by someone else.
    async fn ack(&mut self, lsn: u64, idle: bool) -> anyhow::Result<()> {
        if lsn <= self.acked || (!idle && self.acked_at.elapsed() < ACK_EVERY) {
            return Ok(());
        }
        let mut conn = self.ctx.queue_conn.clone();
        let key = self.ctx.keys().capture_position(&self.config.capture_slot);
        let _: () = conn
            .set(&key, Lsn::from_u64(lsn).to_pg_string())
            .await
            .context("recording the capture position")?;
        self.client.update_applied_lsn(Lsn::from_u64(lsn));
        self.acked = lsn;
        self.acked_at = Instant::now();
        Ok(())
    }
}

/// The router of the watched entities. (Shared with the outbox reader.)
pub(crate) fn watched_router(ctx: &Ctx) -> Router {
    Router::new(
        &ctx.checker
            .watched
            .sources()
            .iter()
            .map(|rows| rows.entity.clone())
            .collect::<Vec<_>>(),
    )
    .with_rules(ctx.checker.watched.rules())
}

/// One log line per entity for the changes whose key could not be named (drains
/// `unmapped`). (Shared with the outbox reader.)
pub(crate) fn report_unmapped(ctx: &Ctx, router: &Router, unmapped: &mut Vec<Unmapped>) {
    if unmapped.is_empty() {
        return;
    }
    let mut by_entity: BTreeMap<usize, (u64, Vec<String>)> = BTreeMap::new();
    for u in unmapped.drain(..) {
        let e = by_entity.entry(u.entity).or_default();
        e.0 += 1;
        for m in u.missing {
            if !e.1.contains(&m) {
                e.1.push(m);
            }
        }
    }
    for (entity, (n, missing)) in by_entity {
        let name = router.entity(entity);
        ctx.metrics()
            .capture_unmapped
            .with_label_values(&[name])
            .inc_by(n);
        tracing::warn!(
            entity = name,
            changes = n,
            ?missing,
            "changes whose cache key the stream does not name (REPLICA IDENTITY FULL on the \
             table names it); the sweep's key pass finds keys left behind"
        );
    }
}

/// Queues the checks of keys whose settle delay is over, as `Source::Cdc` check jobs of at
/// most `KEYS_PER_JOB` keys, and records the capture delay. (Shared with the outbox reader.)
pub(crate) async fn push_due(ctx: &Ctx, router: &Router, due: Due) -> anyhow::Result<()> {
    // The SLO probes of the same keys, due the first window after the latest commit among
    // them (keys pushed together committed within the settle delay); each probe queues the
    // next window's. Queued with the checks, before the slot is acknowledged: a change is
    // probed at least once.
    let probe = match (due.commit_us.iter().max(), ctx.slo_windows.split_first()) {
        (Some(&latest_us), Some((first, later))) => {
            let committed = chrono::DateTime::from_timestamp_micros(latest_us + PG_EPOCH_UNIX_US)
                .unwrap_or_else(chrono::Utc::now);
            let due_at = committed + chrono::Duration::from_std(*first).unwrap_or_default();
            let later_ms: Vec<u64> = later.iter().map(|w| w.as_millis() as u64).collect();
            Some((first.as_millis() as u64, due_at, later_ms))
        }
        _ => None,
    };
    let mut jobs = Vec::new();
    let mut probes = Vec::new();
    let mut counts = Vec::new();
    for (entity, keys) in due.by_entity {
        let name = router.entity(entity);
        counts.push((name, keys.len() as u64));
        let mut keys = keys.into_iter();
        loop {
            let chunk: Vec<String> = keys.by_ref().take(KEYS_PER_JOB).collect();
            if chunk.is_empty() {
                break;
            }
            if let Some((window_ms, due_at, later_ms)) = &probe {
                let job = SloJob {
                    entity: name.to_string(),
                    keys: chunk.clone(),
                    window_ms: *window_ms,
                    due_at: *due_at,
                    later_ms: later_ms.clone(),
                };
                probes.push((job, Some(*due_at)));
            }
            let job = CheckJob {
                entity: name.to_string(),
                keys: chunk,
                source: Source::Cdc,
            };
            jobs.push((job, None));
        }
    }
    let pushed = jobs.len() as u64;
    // Both at once on the multiplexed connection: one round trip's wait, not two.
    let (mut checks_conn, mut probes_conn) = (ctx.queue_conn.clone(), ctx.queue_conn.clone());
    let (checks, probed) = tokio::join!(
        queue::push(&mut checks_conn, ctx.keys(), jobs),
        queue::push(&mut probes_conn, ctx.keys(), probes),
    );
    checks.context("queueing checks of captured changes")?;
    probed.context("queueing SLO probes of captured changes")?;
    // Counted once queued, so a reader that died before this counted nothing.
    let metrics = ctx.metrics();
    metrics
        .jobs
        .with_label_values(&[CheckJob::NAME, "pushed"])
        .inc_by(pushed);
    for (name, n) in counts {
        metrics.capture_keys.with_label_values(&[name]).inc_by(n);
    }
    // This worker's own check worker need not wait for its next poll.
    ctx.check_wake.notify_one();
    let now = now_us();
    for commit_us in due.commit_us {
        ctx.metrics()
            .capture_delay
            .observe(since_commit(now, commit_us));
    }
    Ok(())
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Seconds from a commit time (microseconds since the PostgreSQL epoch) to `now_us` (since
/// the Unix epoch); never negative, should the two clocks disagree.
fn since_commit(now_us: i64, commit_us: i64) -> f64 {
    (now_us - (commit_us + PG_EPOCH_UNIX_US)).max(0) as f64 / 1e6
}

/// The replication connection's settings, from DATABASE_URL.
fn replication_config(config: &Config) -> anyhow::Result<ReplicationConfig> {
    let (pg, tls) = stalewatch_core::tls::postgres_settings(&config.database_url)
        .context("reading DATABASE_URL for the replication connection")?;
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "127.0.0.1".to_string(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let user = pg.get_user().unwrap_or("postgres").to_string();
    let database = pg.get_dbname().unwrap_or(&user).to_string();
    let tls = replication_tls(&tls, &host);
    Ok(ReplicationConfig::new(
        host,
        user,
        password,
        database,
        config.capture_slot.clone(),
        config.capture_publication.clone(),
    )
    .with_port(port)
    .with_tls(tls)
    .with_status_interval(Duration::from_secs(1))
    .with_wakeup_interval(Duration::from_secs(1))
    .with_application_name("stalewatch-capture"))
}

/// `sslmode` and `sslrootcert` for pgwire-replication's own TLS (`stalewatch_core::tls`).
fn replication_tls(tls: &stalewatch_core::tls::PgTls, host: &str) -> TlsConfig {
    use stalewatch_core::tls::SslMode as Mode;
    let settings = stalewatch_core::tls::replication(tls);
    let mode = match settings.mode {
        Mode::Disable => SslMode::Disable,
        Mode::Prefer => SslMode::Prefer,
        Mode::Require => SslMode::Require,
        Mode::VerifyCa => SslMode::VerifyCa,
        Mode::VerifyFull => SslMode::VerifyFull,
    };
    let config = TlsConfig {
        mode,
        ca_pem_path: settings.ca,
        ..TlsConfig::default()
    };
    // pgwire-replication refuses verify-full to an IP address without a name to check; the
    // address itself is the name the other connections check (an IP SAN).
    if mode == SslMode::VerifyFull && host.parse::<std::net::IpAddr>().is_ok() {
        config.with_sni_hostname(host)
    } else {
        config
    }
}

#[derive(QueryableByName)]
struct OneText {
    #[diesel(sql_type = Text)]
    value: String,
}

async fn wal_level(ctx: &Ctx) -> anyhow::Result<String> {
    let mut conn = ctx.checker.pool.get().await?;
    let row: OneText = diesel::sql_query("SELECT current_setting('wal_level') AS value")
        .get_result(&mut conn)
        .await?;
    Ok(row.value)
}

/// Creates the publication of the watched tables, or sets its tables to them.
async fn publish(ctx: &Ctx, config: &Config, router: &Router) -> anyhow::Result<()> {
    let name = quote_ident(&config.capture_publication);
    let mut conn = ctx.checker.pool.get().await?;
    let mut tables = Vec::new();
    for table in router.tables() {
        tables.push(match published_columns(&mut conn, table, router).await? {
            Some(columns) => {
                let columns: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
                format!("{} ({})", table.sql(), columns.join(", "))
            }
            None => table.sql(),
        });
    }
    let exists: Vec<OneText> =
        diesel::sql_query("SELECT pubname::text AS value FROM pg_publication WHERE pubname = $1")
            .bind::<Text, _>(&config.capture_publication)
            .load(&mut conn)
            .await?;
    let sql = if exists.is_empty() {
        format!("CREATE PUBLICATION {name} FOR TABLE {}", tables.join(", "))
    } else {
        format!("ALTER PUBLICATION {name} SET TABLE {}", tables.join(", "))
    };
    diesel::sql_query(&sql)
        .execute(&mut conn)
        .await
        .with_context(|| format!("{sql} (the role needs to own the tables, or be superuser)"))?;
    warn_unnamed_deletes(ctx, &mut conn).await;
    Ok(())
}

/// The columns the publication carries of `table`: those a change is read for
/// ([`Router::columns`]) and the table's replica identity, which PostgreSQL requires of a
/// publication of updates and deletes (without it the application's own UPDATEs would fail).
/// `None`, every column, under `REPLICA IDENTITY FULL` or `NOTHING`, for a table without the
/// index its identity names, and on a server before 15 (no column lists). Rendering a row's
/// other columns (a jsonb document, timestamps) for every change was most of the walsender's
/// work: it decoded an UPDATE of 100,000 items in 73-114 ms with a column list of the key,
/// 177-237 ms without.
async fn published_columns(
    conn: &mut diesel_async::AsyncPgConnection,
    table: &stalewatch_core::entity::Table,
    router: &Router,
) -> anyhow::Result<Option<Vec<String>>> {
    #[derive(QueryableByName)]
    struct Replica {
        #[diesel(sql_type = Text)]
        identity: String,
        #[diesel(sql_type = diesel::sql_types::Array<Text>)]
        columns: Vec<String>,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        lists: bool,
    }
    let replica: Vec<Replica> = diesel::sql_query(
        "SELECT c.relreplident::text AS identity, \
           coalesce((SELECT array_agg(a.attname::text) FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
             WHERE i.indrelid = c.oid AND CASE c.relreplident WHEN 'd' THEN i.indisprimary \
               WHEN 'i' THEN i.indisreplident ELSE false END), '{}') AS columns, \
           current_setting('server_version_num')::int >= 150000 AS lists \
         FROM pg_class c WHERE c.oid = to_regclass($1)",
    )
    .bind::<Text, _>(table.sql())
    .load(conn)
    .await?;
    let Some(replica) = replica.into_iter().next() else {
        return Ok(None);
    };
    if !replica.lists
        || !matches!(replica.identity.as_str(), "d" | "i")
        || replica.columns.is_empty()
    {
        return Ok(None);
    }
    let mut columns = router.columns(table);
    columns.extend(replica.columns);
    columns.sort();
    columns.dedup();
    Ok(Some(columns))
}

#[derive(QueryableByName)]
struct Identity {
    #[diesel(sql_type = Text)]
    schema: String,
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    identity: String,
}

/// Under REPLICA IDENTITY DEFAULT a deleted row arrives as its primary key only: an entity
/// keyed by another column cannot be told which key went stale. Said once at start-up.
async fn warn_unnamed_deletes(ctx: &Ctx, conn: &mut diesel_async::AsyncPgConnection) {
    let rows: Vec<Identity> = match diesel::sql_query(
        "SELECT n.nspname::text AS schema, c.relname::text AS name, c.relreplident::text AS identity \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p')",
    )
    .load(conn)
    .await
    {
        Ok(rows) => rows,
        Err(_) => return,
    };
    for source in ctx.checker.watched.sources() {
        let e = &source.entity;
        let full = rows
            .iter()
            .any(|r| r.schema == e.table.schema && r.name == e.table.name && r.identity == "f");
        let beyond_key: Vec<&str> = e
            .key
            .columns()
            .into_iter()
            .filter(|c| !e.primary_key.iter().any(|k| k == c))
            .collect();
        if !full && !beyond_key.is_empty() {
            tracing::warn!(
                entity = %e.name,
                table = %e.table,
                columns = ?beyond_key,
                "a deleted row of this table arrives as its primary key only, so a delete cannot                  name this entity's key; ALTER TABLE ... REPLICA IDENTITY FULL fixes that, else                  the sweep's key pass finds the key left behind"
            );
        }
    }
}

#[derive(QueryableByName)]
struct SlotRow {
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    confirmed: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    wal_status: Option<String>,
    #[diesel(sql_type = Text)]
    database: String,
    #[diesel(sql_type = Text)]
    plugin: String,
}

/// Makes sure the slot exists and was not lost or re-created since this deployment last read
/// it; returns the position reading starts from. Any gap is said loudly, counted, and covered
/// by a sweep pass started at once.
async fn ensure_slot(ctx: &Ctx, config: &Config) -> anyhow::Result<u64> {
    let slot = &config.capture_slot;
    let mut conn = ctx.checker.pool.get().await?;
    let found: Vec<SlotRow> = diesel::sql_query(
        "SELECT confirmed_flush_lsn::text AS confirmed, wal_status::text AS wal_status,          coalesce(database::text, '') AS database, coalesce(plugin::text, '') AS plugin          FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind::<Text, _>(slot)
    .load(&mut conn)
    .await?;
    let current: OneText = diesel::sql_query("SELECT current_database()::text AS value")
        .get_result(&mut conn)
        .await?;
    let mut redis = ctx.queue_conn.clone();
    let position_key = ctx.keys().capture_position(slot);
    let recorded: Option<String> = redis.get(&position_key).await?;
    let recorded = recorded.and_then(|s| Lsn::parse(&s).ok()).map(Lsn::as_u64);

    if let Some(row) = found.into_iter().next() {
        if row.database != current.value || row.plugin != "pgoutput" {
            bail!(
                "replication slot {slot} belongs to database {:?} with plugin {:?}; set                  CAPTURE_SLOT to a name of this deployment's own",
                row.database,
                row.plugin
            );
        }
        if row.wal_status.as_deref() == Some("lost") {
            lost(
                ctx,
                slot,
                recorded,
                "was invalidated (wal_status lost: max_slot_wal_keep_size)",
            )
            .await;
            diesel::sql_query("SELECT pg_drop_replication_slot($1)")
                .bind::<Text, _>(slot)
                .execute(&mut conn)
                .await?;
        } else {
            let confirmed = row
                .confirmed
                .as_deref()
                .and_then(|s| Lsn::parse(s).ok())
                .map_or(0, Lsn::as_u64);
            if let Some(recorded) = recorded {
                if confirmed > recorded {
                    lost(ctx, slot, Some(recorded), "is further along than stalewatch acknowledged: it was re-created or read by someone else").await;
                    let _: () = redis
                        .set(&position_key, Lsn::from_u64(confirmed).to_pg_string())
                        .await?;
                }
            }
            return Ok(confirmed);
        }
    } else if recorded.is_some() {
        lost(ctx, slot, recorded, "does not exist any more (dropped)").await;
    }
    let created: OneText = diesel::sql_query(
        "SELECT lsn::text AS value FROM pg_create_logical_replication_slot($1, 'pgoutput')",
    )
    .bind::<Text, _>(slot)
    .get_result(&mut conn)
    .await
    .with_context(|| format!("creating replication slot {slot} (the role needs REPLICATION)"))?;
    let at = Lsn::parse(&created.value).map_or(0, Lsn::as_u64);
    let _: () = redis.set(&position_key, &created.value).await?;
    tracing::info!(slot, at = %created.value, "created the replication slot");
    Ok(at)
}

/// A gap in the change stream: loud, counted, and covered by a sweep pass now.
async fn lost(ctx: &Ctx, slot: &str, since: Option<u64>, what: &str) {
    ctx.metrics().capture_slot_lost.inc();
    tracing::error!(
        slot,
        since = %since.map(|l| Lsn::from_u64(l).to_pg_string()).unwrap_or_default(),
        "replication slot {slot} {what}: changes committed since the last acknowledged position          were not seen; starting a sweep pass to cover them"
    );
    request_sweep(ctx).await;
}

/// Ends the deployment's rest between sweep passes, so a pass starts within a poll.
pub(crate) async fn request_sweep(ctx: &Ctx) {
    let mut conn = ctx.queue_conn.clone();
    let result: redis::RedisResult<()> = conn.del(ctx.keys().sweep_rest()).await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not start a sweep pass early");
    }
}

#[derive(QueryableByName)]
struct Retained {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    bytes: Option<i64>,
}

/// Reports how much WAL the slot holds back, on every worker (the reader may be the one that
/// is down).
async fn sample_slot(ctx: Ctx, config: Config, shutdown: CancellationToken) {
    loop {
        let sample = async {
            let mut conn = ctx.checker.pool.get().await?;
            let rows: Vec<Retained> = diesel::sql_query(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS bytes                  FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind::<Text, _>(&config.capture_slot)
            .load(&mut conn)
            .await?;
            anyhow::Ok(rows.into_iter().next().and_then(|r| r.bytes).unwrap_or(-1))
        };
        match sample.await {
            Ok(bytes) => ctx.metrics().capture_retained_wal.set(bytes),
            Err(e) => tracing::debug!(error = %e, "could not sample the replication slot"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SLOT_SAMPLE) => {}
        }
    }
}
