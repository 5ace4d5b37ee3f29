//! Change capture without logical decoding (CHANGE_CAPTURE=outbox): a trigger on each watched
//! table writes every changed row to `stalewatch_outbox` in the writer's own transaction, and
//! NOTIFY wakes the reader at commit (docs/change-capture.md, "Outbox fallback").
//!
//! The same events and guarantees as the slot reader (`capture`):
//!
//! - One reader: the worker holding the outbox lease reads; the others wait to take over.
//! - Only committed changes: a row of the outbox exists once its transaction commits, and a
//!   rolled-back transaction leaves none.
//! - At least once: a row is deleted only once the checks of the keys it names are queued
//!   (or another row still in the outbox names the same waiting key), so a reader killed at
//!   any point leaves the rest for the next one.
//! - A lost NOTIFY loses nothing: the outbox is also polled every `POLL`.
//!
//! Ids are given out at insert time, not at commit, so a row can commit after rows with
//! larger ids were read. The reader therefore never reads "past a position": it reads every
//! row it does not hold yet, and deletes exactly the rows it read.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context};
use backon::Retryable;
use futures::StreamExt;
use stalewatch_core::{
    capture::{Commit, Router, Settle, Touched, Unmapped},
    config::Config,
    entity::{quote_ident, Table},
    lease::Lease,
    pgoutput::{RelColumn, Relation, Tuple, Value},
};
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::{
    capture::{
        push_due, report_unmapped, request_sweep, wait_for_lease, watched_router, FLUSH_LIMIT,
    },
    handlers::Ctx,
    supervise,
};

/// The channel the trigger function notifies (migrations/*_change_outbox).
pub const CHANNEL: &str = "stalewatch_outbox";
/// The names of the triggers this worker installs on each watched table.
pub const ROW_TRIGGER: &str = "stalewatch_outbox_row";
pub const TRUNCATE_TRIGGER: &str = "stalewatch_outbox_truncate";

/// Renewed well within the reader lease's time (`capture::wait_for_lease`).
const LEASE_RENEW: Duration = Duration::from_secs(1);
/// The outbox is read at least this often, notified or not.
const POLL: Duration = Duration::from_secs(1);
/// Rows per read.
const BATCH: i64 = 1000;
/// Rows per DELETE.
const DELETE_CHUNK: usize = 10_000;

/// One outbox row's columns as text, in PostgreSQL's text form for strings and numbers
/// (`t`/`f` for booleans, as `bool::text`); objects and arrays as JSON text; JSON null as NULL.
const READ: &str = "
SELECT o.id, o.table_schema, o.table_name, o.op::text AS op,
       o.old_row IS NOT NULL AS has_old, o.new_row IS NOT NULL AS has_new,
       ARRAY(SELECT e.key FROM jsonb_each(o.old_row) e ORDER BY e.key) AS old_names,
       ARRAY(SELECT CASE jsonb_typeof(e.value)
                        WHEN 'string' THEN e.value #>> '{}'
                        WHEN 'boolean' THEN left(e.value::text, 1)
                        WHEN 'null' THEN NULL
                        ELSE e.value::text END
             FROM jsonb_each(o.old_row) e ORDER BY e.key) AS old_values,
       ARRAY(SELECT e.key FROM jsonb_each(o.new_row) e ORDER BY e.key) AS new_names,
       ARRAY(SELECT CASE jsonb_typeof(e.value)
                        WHEN 'string' THEN e.value #>> '{}'
                        WHEN 'boolean' THEN left(e.value::text, 1)
                        WHEN 'null' THEN NULL
                        ELSE e.value::text END
             FROM jsonb_each(o.new_row) e ORDER BY e.key) AS new_values,
       (extract(epoch FROM o.changed_at) * 1000000)::bigint - 946684800000000 AS time_us
FROM stalewatch_outbox o
WHERE NOT (o.id = ANY($1))
ORDER BY o.id
LIMIT $2";

/// Reads the outbox whenever this worker holds the lease, until `shutdown`.
pub async fn run(ctx: Ctx, config: Config, shutdown: CancellationToken) {
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
                "outbox capture stopped; restarting"
            );
        })
        .await;
    ctx.metrics().capture_active.set(0);
    if let Err(e) = result {
        tracing::debug!(error = %e, "outbox capture stopped during shutdown");
    }
}

/// Waits for the lease, then reads the outbox until shutdown (Ok) or a failure (Err).
async fn lead(ctx: &Ctx, config: &Config, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let key = ctx.keys().outbox_lease();
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

/// The listening connection, what has been read and not yet deleted.
struct Reader<'a> {
    ctx: &'a Ctx,
    router: Router,
    client: tokio_postgres::Client,
    /// Drives the connection; woken by each notification.
    driver: tokio::task::JoinHandle<()>,
    notified: Arc<Notify>,
    settle: Settle,
    /// Ids read and not deleted yet.
    held: BTreeSet<i64>,
    unmapped: Vec<Unmapped>,
    /// The column list of each table's rows, rebuilt when a row has other columns.
    relations: HashMap<Table, Relation>,
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl<'a> Reader<'a> {
    async fn start(ctx: &'a Ctx, config: &'a Config) -> anyhow::Result<Reader<'a>> {
        let router = watched_router(ctx);
        let (pg, tls) = stalewatch_core::tls::postgres(&config.database_url)?;
        let (client, mut connection) = pg
            .connect(tls)
            .await
            .context("connecting to PostgreSQL to LISTEN for the outbox")?;
        let notified = Arc::new(Notify::new());
        let driver = {
            let notified = notified.clone();
            tokio::spawn(async move {
                let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(AsyncMessage::Notification(_)) => notified.notify_one(),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "the outbox connection failed");
                            break;
                        }
                    }
                }
                // The client's next query fails, and the reader restarts.
            })
        };
        let reader = Reader {
            ctx,
            router,
            client,
            driver,
            notified,
            settle: Settle::new(config.change_settle),
            held: BTreeSet::new(),
            unmapped: Vec::new(),
            relations: HashMap::new(),
        };
        reader.install().await?;
        reader
            .client
            .batch_execute(&format!("LISTEN {}", quote_ident(CHANNEL)))
            .await
            .context("LISTEN for the outbox")?;
        ctx.metrics().capture_active.set(1);
        tracing::info!(
            tables = ?reader.router.tables().iter().map(|t| t.to_string()).collect::<Vec<_>>(),
            settle_ms = config.change_settle.as_millis() as u64,
            "reading the change outbox"
        );
        Ok(reader)
    }

    /// Puts the triggers on every watched table that lacks them, and takes them off the
    /// tables no longer watched. Idempotent, and touches nothing already right: dropping a
    /// trigger locks its table against reads, so a trigger that is right stays.
    async fn install(&self) -> anyhow::Result<()> {
        let tables = self.router.tables();
        // Each trigger of ours, and whether it calls our function on the right events
        // (tgtype: AFTER ROW INSERT|DELETE|UPDATE = 1|4|8|16; AFTER STATEMENT TRUNCATE = 32).
        let rows = self
            .client
            .query(
                "SELECT n.nspname::text, c.relname::text, g.tgname::text, \
                        g.tgfoid = 'stalewatch_outbox_capture()'::regprocedure \
                        AND g.tgqual IS NULL \
                        AND g.tgtype = CASE g.tgname WHEN $1 THEN 29 ELSE 32 END AS right, \
                        g.tgenabled = 'D' AS disabled \
                 FROM pg_trigger g \
                 JOIN pg_class c ON c.oid = g.tgrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE g.tgname IN ($1, $2) AND NOT g.tgisinternal",
                &[&ROW_TRIGGER, &TRUNCATE_TRIGGER],
            )
            .await
            .context("listing the outbox triggers")?;
        let mut found: HashMap<(Table, String), bool> = HashMap::new();
        let mut sql = String::new();
        for row in rows {
            let table = Table::new(row.get::<_, String>(0), row.get::<_, String>(1));
            let name: String = row.get(2);
            if row.get::<_, bool>(4) {
                tracing::warn!(table = %table, trigger = %name, "an outbox trigger is disabled: changes of this table are not captured");
            }
            if !tables.contains(&&table) {
                tracing::info!(table = %table, trigger = %name, "taking an outbox trigger off a table no longer watched");
                sql.push_str(&format!(
                    "DROP TRIGGER IF EXISTS {} ON {};\n",
                    quote_ident(&name),
                    table.sql()
                ));
            }
            found.insert((table, name), row.get(3));
        }
        for table in &tables {
            let t = table.sql();
            for (name, when) in [
                (ROW_TRIGGER, "AFTER INSERT OR UPDATE OR DELETE"),
                (TRUNCATE_TRIGGER, "AFTER TRUNCATE"),
            ] {
                let each = if name == ROW_TRIGGER {
                    "ROW"
                } else {
                    "STATEMENT"
                };
                match found.get(&((*table).clone(), name.to_string())) {
                    Some(true) => continue,
                    Some(false) => sql.push_str(&format!("DROP TRIGGER {name} ON {t};\n")),
                    None => {}
                }
                sql.push_str(&format!(
                    "CREATE TRIGGER {name} {when} ON {t} FOR EACH {each} \
                     EXECUTE FUNCTION stalewatch_outbox_capture();\n"
                ));
            }
        }
        if sql.is_empty() {
            return Ok(());
        }
        if let Err(e) = self
            .client
            .batch_execute(&format!("BEGIN;\n{sql}COMMIT;"))
            .await
        {
            let _ = self.client.batch_execute("ROLLBACK").await;
            return Err(e).context(
                "installing the outbox triggers on the watched tables (the role needs to own \
                 the tables, or hold TRIGGER on them)",
            );
        }
        tracing::info!("installed the outbox triggers");
        Ok(())
    }

    async fn read(mut self, lease: &Lease, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut renew = tokio::time::interval(LEASE_RENEW);
        let mut poll_at = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= poll_at {
                self.read_outbox().await?;
                poll_at = tokio::time::Instant::now() + POLL;
            }
            self.flush().await?;
            let wake = self
                .settle
                .next_due()
                .map_or(poll_at, |due| poll_at.min(due.into()));
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = renew.tick() => {
                    if !lease.renew().await? {
                        bail!("the outbox lease was lost (another worker took it over)");
                    }
                }
                _ = self.notified.notified() => poll_at = tokio::time::Instant::now(),
                _ = tokio::time::sleep_until(wake) => {}
            }
            if self.driver.is_finished() {
                bail!("the outbox connection closed");
            }
        }
    }

    /// Reads every row not held yet, in id order, a batch at a time.
    async fn read_outbox(&mut self) -> anyhow::Result<()> {
        loop {
            let held: Vec<i64> = self.held.iter().copied().collect();
            let rows = self
                .client
                .query(READ, &[&held, &BATCH])
                .await
                .context("reading the outbox")?;
            let n = rows.len();
            let now = std::time::Instant::now();
            for row in rows {
                let id: i64 = row.get("id");
                let table = Table::new(
                    row.get::<_, String>("table_schema"),
                    row.get::<_, String>("table_name"),
                );
                let op: String = row.get("op");
                let side = |has: &str,
                            names: &str,
                            values: &str|
                 -> Option<Vec<(String, Option<String>)>> {
                    row.get::<_, bool>(has).then(|| {
                        let names: Vec<String> = row.get(names);
                        let values: Vec<Option<String>> = row.get(values);
                        names.into_iter().zip(values).collect()
                    })
                };
                let old = side("has_old", "old_names", "old_values");
                let new = side("has_new", "new_names", "new_values");
                let time_us: i64 = row.get("time_us");
                let mut keys: Vec<Touched> = Vec::new();
                if op == "T" {
                    tracing::warn!(table = %table, "TRUNCATE of a watched table: its cached keys cannot be named one by one; starting a sweep pass");
                    request_sweep(self.ctx).await;
                } else {
                    self.change(table, old, new, &mut keys);
                }
                self.held.insert(id);
                let position = id as u64;
                self.settle.add(
                    keys.into_iter().map(|t| (t.entity, t.key)),
                    Commit {
                        lsn: position,
                        end_lsn: position + 1,
                        time_us,
                    },
                    now,
                );
            }
            report_unmapped(self.ctx, &self.router, &mut self.unmapped);
            if n < BATCH as usize {
                return Ok(());
            }
            // A backlog: hand over what is due before reading on.
            self.flush().await?;
        }
    }

    /// The keys one outbox row names, as the slot reader would for the same change.
    fn change(
        &mut self,
        table: Table,
        old: Option<Vec<(String, Option<String>)>>,
        new: Option<Vec<(String, Option<String>)>>,
        keys: &mut Vec<Touched>,
    ) {
        let names: Vec<&str> = new
            .as_ref()
            .or(old.as_ref())
            .map(|cols| cols.iter().map(|(n, _)| n.as_str()).collect())
            .unwrap_or_default();
        let rel = self
            .relations
            .entry(table.clone())
            .or_insert_with(|| Relation {
                id: 0,
                namespace: table.schema.clone(),
                name: table.name.clone(),
                replica_identity: b'f',
                columns: Vec::new(),
            });
        if rel.columns.len() != names.len()
            || rel.columns.iter().zip(&names).any(|(c, n)| c.name != *n)
        {
            // The whole row is in the outbox: every column is "key", as under REPLICA
            // IDENTITY FULL, so an old row's NULL is a real NULL.
            rel.columns = names
                .iter()
                .map(|n| RelColumn {
                    key: true,
                    name: n.to_string(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect();
        }
        let tuple = |side: Option<Vec<(String, Option<String>)>>| {
            side.map(|cols| {
                let mut by_name: HashMap<String, Option<String>> = cols.into_iter().collect();
                Tuple(
                    rel.columns
                        .iter()
                        .map(|c| match by_name.remove(&c.name) {
                            Some(Some(s)) => Value::Text(s),
                            Some(None) => Value::Null,
                            // Not in this side's row (a column added in between).
                            None => Value::Unchanged,
                        })
                        .collect(),
                )
            })
        };
        let (old, new) = (tuple(old), tuple(new));
        self.router
            .change(rel, old.as_ref(), new.as_ref(), keys, &mut self.unmapped);
        for &entity in self.router.entities_of(rel) {
            self.ctx
                .metrics()
                .capture_changes
                .with_label_values(&[self.router.entity(entity)])
                .inc();
        }
    }

    /// Queues the checks that are due, then deletes the rows handed over: those below the
    /// oldest row with a key still waiting. (A held row below it whose key still waits
    /// names that key, and so does the row the key waits for, which stays.)
    async fn flush(&mut self) -> anyhow::Result<()> {
        let now = std::time::Instant::now();
        loop {
            let due = self.settle.due(now, FLUSH_LIMIT);
            if due.is_empty() {
                break;
            }
            push_due(self.ctx, &self.router, due).await?;
        }
        let Some(safe) = self.settle.safe_lsn() else {
            return Ok(());
        };
        let keep = self
            .held
            .split_off(&i64::try_from(safe).unwrap_or(i64::MAX));
        let done: Vec<i64> = std::mem::replace(&mut self.held, keep)
            .into_iter()
            .collect();
        tracing::debug!(
            safe,
            deleting = done.len(),
            held = self.held.len(),
            waiting = self.settle.waiting(),
            "outbox flush"
        );
        for chunk in done.chunks(DELETE_CHUNK) {
            self.client
                .execute(
                    "DELETE FROM stalewatch_outbox WHERE id = ANY($1)",
                    &[&chunk],
                )
                .await
                .context("deleting handed-over outbox rows")?;
        }
        Ok(())
    }
}
