//! Rebuilding an entity's cache from PostgreSQL: every row, read in keyset pages, written to
//! Redis in one pipeline per page, under a per-entity lock.
//!
//! - Memory is one page: the rows come in `batch`-row keyset pages ([`Rows::page_raw`], the
//!   sweep's walk), and the next page is read while the last one's pipeline runs.
//! - What a key gets is what a refresh would write ([`repair::render`]); only the sending
//!   differs: many keys per round trip. Most JSON documents are written from the row's cells
//!   without decoding them into a map ([`repair::render_cells`]: the same bytes).
//! - Never an older value over a newer one: a JSON document with an integer version is
//!   written with `SET NX` where there is no key, and through the versioned compare-and-set
//!   ([`cache::SET_UNLESS_NEWER`], by its hash in the pipeline) where there is one, so an
//!   application write that lands while the rebuild runs wins over the row the rebuild read
//!   before it. Why this and not fencing: docs/rebuild.md.
//! - A hash or a set is replaced in one MULTI on its key (DEL, fill, expiry), so a reader sees
//!   the old value or the whole new one.
//! - Open incidents of the entity are marked as being rewritten by a repair first and checked
//!   again after the pass, so those the rebuild fixed resolve with cause `repair`.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};
use std::time::{Duration, Instant};

use diesel::sql_types::BigInt;
use diesel_async::RunQueryDsl;
use redis::{aio::ConnectionManager, Cmd, Value};

use crate::cache::{self, CacheConn, CacheError, Keyed};
use crate::check::{CheckError, Checker};
use crate::db::incidents::{self, ListQuery};
use crate::db::{DbError, PgPool};
use crate::entity::{quote_ident, Entity, Representation};
use crate::incident::{Cause, Source, State};
use crate::keys::Keys;
use crate::lease::Lease;
use crate::repair::{self, Outcome, Rendered};
use crate::rows::{PageRaw, Rows};

/// Open incidents checked again per batch after the pass.
const RECHECK_BATCH: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("no entity {0:?} in the ENTITIES file")]
    UnknownEntity(String),
    #[error("a rebuild of {entity:?} is already running: the lock {key} is held by {holder}")]
    Locked {
        entity: String,
        key: String,
        holder: String,
    },
    #[error("the rebuild lock of {0:?} was lost (expired or taken over); stopped")]
    LockLost(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Check(#[from] CheckError),
}

impl From<redis::RedisError> for RebuildError {
    fn from(e: redis::RedisError) -> Self {
        RebuildError::Cache(e.into())
    }
}

impl From<crate::db::PoolError> for RebuildError {
    fn from(e: crate::db::PoolError) -> Self {
        RebuildError::Db(e.into())
    }
}

/// How far a rebuild got.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Keys done (written, skipped, deleted or undecodable).
    pub done: u64,
    /// PostgreSQL's count of the keys, read before the pass (rows written meanwhile are not
    /// in it).
    pub estimated: u64,
    pub elapsed: Duration,
}

impl Progress {
    /// Keys per second so far.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        }
    }

    /// Time left at the rate so far; `None` before any rate is known.
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rate();
        (rate > 0.0).then(|| {
            Duration::from_secs_f64(self.estimated.saturating_sub(self.done) as f64 / rate)
        })
    }

    /// `12000/100000 keys (12%), 4000 keys/s, ETA 22 s`: one line, for a log or a terminal.
    pub fn line(&self) -> String {
        let percent = (self.done.min(self.estimated) * 100)
            .checked_div(self.estimated)
            .map_or_else(|| "?".to_string(), |p| p.to_string());
        let eta = match self.eta() {
            Some(eta) => format!("ETA {} s", eta.as_secs_f64().ceil() as u64),
            None => "ETA ?".to_string(),
        };
        format!(
            "{}/{} keys ({percent}%), {:.0} keys/s, {eta}",
            self.done,
            self.estimated,
            self.rate()
        )
    }
}

/// What a finished rebuild did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    pub entity: String,
    pub keys: u64,
    pub written: u64,
    /// The cache held a newer version, written while the rebuild ran: left as it was.
    pub skipped_newer: u64,
    pub deleted: u64,
    pub undecodable: u64,
    /// Open incidents checked again after the pass.
    pub rechecked: u64,
    pub seconds: f64,
    pub keys_per_second: f64,
}

impl Summary {
    fn count(&mut self, outcome: Outcome) {
        self.keys += 1;
        match outcome {
            Outcome::Written => self.written += 1,
            Outcome::SkippedNewer => self.skipped_newer += 1,
            Outcome::Deleted => self.deleted += 1,
            Outcome::Undecodable => self.undecodable += 1,
        }
    }
}

/// The entity's rebuild lock, taken as `holder`; if someone else holds it, who.
pub async fn lock(
    conn: &ConnectionManager,
    keys: &Keys,
    entity: &str,
    ttl: Duration,
    holder: &str,
) -> Result<Lease, RebuildError> {
    let key = keys.rebuild_lock(entity);
    loop {
        if let Some(lease) = Lease::try_acquire_as(conn, &key, ttl, holder).await? {
            return Ok(lease);
        }
        // Released between the two commands: try again.
        if let Some(holder) = Lease::holder(conn, &key).await? {
            return Err(RebuildError::Locked {
                entity: entity.to_string(),
                key,
                holder,
            });
        }
    }
}

/// Renews `lease` every third of its TTL until dropped (abort the task); sets `lost` when it
/// was lost, or could not be renewed for a whole TTL (it may have expired and been taken).
/// The rebuild checks `lost` before each page.
pub async fn keep_renewed(lease: Arc<Lease>, lost: Arc<AtomicBool>) {
    let ttl = lease.ttl();
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(ttl / 3).await;
        match lease.renew().await {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => {
                lost.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not renew the rebuild lock");
                if renewed.elapsed() >= ttl {
                    lost.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

/// How one key's reply in the pipeline is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reply {
    /// The versioned compare-and-set's 1 (written) or 0 (skipped: newer).
    Versioned,
    /// `SET NX`'s OK (written: there was no key) or nil (there is a key: the compare-and-set
    /// decides, in a second round trip).
    IfAbsent,
    /// No reply: the outcome is known when the pipeline succeeds.
    Known(Outcome),
}

/// How a versioned document is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Versioned {
    /// Through the compare-and-set script, always.
    Script,
    /// `SET NX` first; only the keys that exist go through the script. The same outcome as the
    /// script (with no key, the script writes too), at the cost of a plain `SET` for the keys
    /// a flushed or lost cache no longer has, which is what most rebuilds write: the script
    /// costs about 2.5x a `SET` in Redis (docs/rebuild.md).
    AbsentFirst,
}

/// The commands that write `rendered` at `key`: the same values a refresh writes, sent
/// without waiting. `sha` is [`cache::SET_UNLESS_NEWER`]'s hash. Keys are given `ttl`, or none:
/// a rebuilt cache is one the application keeps whole (write-through), where keys do not
/// expire. A hash or a set is replaced in one MULTI (DEL, fill, expiry) on the key itself, so
/// a reader sees the old value or the whole new one, and the transaction touches one key (one
/// slot of a cluster).
pub(crate) fn commands(
    key: &str,
    rendered: &Rendered,
    ttl: Option<Duration>,
    sha: &str,
    versioned: Versioned,
) -> (Vec<Cmd>, Reply) {
    let expire = |key: &str| match ttl {
        Some(ttl) => redis::cmd("PEXPIRE")
            .arg(key)
            .arg(ttl.as_millis().max(1) as u64)
            .clone(),
        None => redis::cmd("PERSIST").arg(key).clone(),
    };
    let replace = |fill: Cmd| {
        vec![
            redis::cmd("MULTI"),
            redis::cmd("DEL").arg(key).clone(),
            fill,
            expire(key),
            redis::cmd("EXEC"),
        ]
    };
    match rendered {
        Rendered::Versioned { bytes, .. } if versioned == Versioned::AbsentFirst => {
            let mut cmd = redis::cmd("SET");
            cmd.arg(key).arg(bytes).arg("NX");
            if let Some(ttl) = ttl {
                cmd.arg("EX").arg(cache::secs(ttl));
            }
            (vec![cmd], Reply::IfAbsent)
        }
        Rendered::Versioned {
            bytes,
            field,
            version,
        } => (
            vec![redis::cmd("EVALSHA")
                .arg(sha)
                .arg(1)
                .arg(key)
                .arg(bytes)
                .arg(*version)
                .arg(ttl.map(|t| cache::secs(t).to_string()).unwrap_or_default())
                .arg(field)
                .clone()],
            Reply::Versioned,
        ),
        Rendered::Plain(bytes) => {
            let mut cmd = redis::cmd("SET");
            cmd.arg(key).arg(bytes);
            if let Some(ttl) = ttl {
                cmd.arg("EX").arg(cache::secs(ttl));
            }
            (vec![cmd], Reply::Known(Outcome::Written))
        }
        Rendered::Hash(fields) if !fields.is_empty() => (
            replace(redis::cmd("HSET").arg(key).arg(fields).clone()),
            Reply::Known(Outcome::Written),
        ),
        Rendered::Set(members) if !members.is_empty() => (
            replace(redis::cmd("SADD").arg(key).arg(members).clone()),
            Reply::Known(Outcome::Written),
        ),
        // An empty hash or set is no key at all in Redis.
        Rendered::Hash(_) | Rendered::Set(_) | Rendered::Delete => (
            vec![redis::cmd("UNLINK").arg(key).clone()],
            Reply::Known(Outcome::Deleted),
        ),
        Rendered::Undecodable => (Vec::new(), Reply::Known(Outcome::Undecodable)),
    }
}

/// A page's keys, each with what it is written with (`None`: nothing sound to write: no key
/// renders from the row, a NULL in the template, or the row cannot be read).
type Prepared = Vec<(Option<String>, Option<Rendered>)>;

/// What each row of `page` is written with, and for an entity whose watermark is kept
/// (`watermarked`), the highest version among the rows, as [`crate::column::version_of`]
/// reads it. Most documents are written from their cells ([`repair::render_cells`]); the
/// others are decoded first. A row that does not decode is not written, and its version does
/// not count.
fn prepare(rows: &Rows, page: Vec<PageRaw>, watermarked: bool) -> (Prepared, Option<i64>) {
    let version = rows
        .entity
        .version
        .as_ref()
        .filter(|_| watermarked)
        .and_then(|v| Some((v, *rows.types.get(v)?)));
    let mut highest = None;
    let prepared = page
        .into_iter()
        .map(|raw| {
            let seen = version.and_then(|(column, ty)| {
                let value = rows.field(&raw.doc, column)?.ok()?;
                crate::column::version_of(ty, &value)
            });
            let rendered = match repair::render_cells(rows, &raw.doc) {
                Some(rendered) => Some(rendered),
                None => rows
                    .decode(&raw.doc)
                    .ok()
                    .map(|row| repair::render(rows, Some(&row))),
            };
            if rendered.is_some() {
                highest = highest.max(seen);
            }
            (raw.key, rendered)
        })
        .collect();
    (prepared, highest)
}

/// Chooses, page by page, how versioned documents are sent: `SET NX` first while most keys are
/// missing (a flushed or lost cache), the script alone once a page finds most of them there (a
/// cache that is only behind), where `SET NX` would be a wasted round. Every
/// [`Sending::PROBE_EVERY`]th page tries `SET NX` again, so a rebuild that reaches a missing
/// stretch of keys goes back to it.
#[derive(Debug, Default)]
struct Sending {
    script: bool,
    pages: u64,
}

impl Sending {
    const PROBE_EVERY: u64 = 8;

    fn next(&mut self) -> Versioned {
        self.pages += 1;
        if self.script && !self.pages.is_multiple_of(Self::PROBE_EVERY) {
            Versioned::Script
        } else {
            Versioned::AbsentFirst
        }
    }

    /// A page of `n` rows was sent as `versioned`, and `existing` of its `SET NX` found a key.
    fn saw(&mut self, versioned: Versioned, existing: usize, n: usize) {
        if versioned == Versioned::AbsentFirst {
            self.script = existing * 2 > n;
        }
    }
}

/// How many keys `entity` has: its rows, or a set's distinct keys. For the progress only.
pub async fn estimate(pool: &PgPool, entity: &Entity) -> Result<u64, RebuildError> {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let table = entity.table.sql();
    let sql = match &entity.representation {
        Representation::Set { .. } => {
            let columns: Vec<String> = entity.key.columns().into_iter().map(quote_ident).collect();
            format!(
                "SELECT count(*) AS n FROM (SELECT DISTINCT {} FROM {table}) AS k",
                columns.join(", ")
            )
        }
        _ => format!("SELECT count(*) AS n FROM {table}"),
    };
    let mut conn = pool.get().await?;
    let count = diesel::sql_query(sql)
        .get_result::<Count>(&mut conn)
        .await
        .map_err(DbError::from)?;
    Ok(count.n.max(0) as u64)
}

/// One rebuild of one entity. The caller holds the entity's lock ([`lock`]) and renews it;
/// `lost` says it was lost, and the rebuild stops at the next batch.
pub struct Rebuild<'a> {
    pub checker: &'a Checker,
    pub entity: &'a str,
    pub batch: usize,
    /// Pause between batches.
    pub pause: Duration,
    /// A connection of its own to the watched cache ([`connection`]): a pipeline of a large
    /// batch takes longer than the shared connection's 2 s response timeout allows.
    pub redis: CacheConn,
}

/// A connection to the watched cache for rebuild pipelines: as the shared one, with a response
/// timeout for a whole batch.
pub async fn connection(target: &cache::Target) -> Result<CacheConn, RebuildError> {
    Ok(cache::open(
        target,
        cache::Timeouts {
            connect: Duration::from_secs(2),
            response: Duration::from_secs(120),
        },
    )
    .await?)
}

impl Rebuild<'_> {
    /// Runs the pass, calling `progress` after every batch.
    pub async fn run(
        &self,
        lost: &(dyn Fn() -> bool + Sync),
        mut progress: impl FnMut(&Progress),
    ) -> Result<Summary, RebuildError> {
        let checker = self.checker;
        let rows = checker
            .watched
            .source(self.entity)
            .ok_or_else(|| RebuildError::UnknownEntity(self.entity.to_string()))?;
        let metrics = &checker.metrics;
        let started = Instant::now();
        let mut summary = Summary {
            entity: self.entity.to_string(),
            ..Summary::default()
        };
        let estimated = estimate(&checker.pool, &rows.entity).await?;
        metrics
            .rebuild_progress
            .with_label_values(&[self.entity, "estimated"])
            .set(estimated as i64);
        metrics
            .rebuild_progress
            .with_label_values(&[self.entity, "done"])
            .set(0);

        // The open incidents, credited to this rewrite when next seen agreeing.
        let open = self.open_incidents().await?;
        if !open.is_empty() {
            let mut conn = checker.pool.get().await?;
            for chunk in open.chunks(RECHECK_BATCH) {
                incidents::mark_rewrite(&mut conn, chunk, Cause::Repair).await?;
            }
        }

        let mut redis = self.redis.clone();
        let sha: String = cache::SET_UNLESS_NEWER
            .prepare_invoke()
            .load_async(&mut redis)
            .await?;
        let mut reader = checker.pool.get().await?;
        let limit = self.batch as i64;
        let mut cursor: Option<Vec<String>> = None;
        let mut more = true;
        let mut pending: Option<Prepared> = None;
        // The highest version written, for the entity's watermark (only an ingesting entity
        // keeps one).
        let watermarked = crate::watermark::tracked(&rows.entity);
        let mut highest: Option<i64> = None;
        let mut sending = Sending::default();
        loop {
            if lost() {
                return Err(RebuildError::LockLost(self.entity.to_string()));
            }
            // The next page is read while the last one's pipeline runs.
            let read = async {
                if !more {
                    return Ok::<_, RebuildError>(None);
                }
                let (_, page, last) = rows
                    .page_raw(&mut reader, cursor.as_deref(), None, limit)
                    .await?;
                Ok(Some((page, last)))
            };
            // Chosen only for a page that is written, so the probes fall every eighth page.
            let versioned = pending.as_ref().map(|_| sending.next());
            let write = async {
                match (pending.take(), versioned) {
                    (Some(page), Some(versioned)) => {
                        let n = page.len();
                        let (outcomes, existing) =
                            self.write(rows, &redis, &sha, page, versioned).await?;
                        Ok(Some((outcomes, existing, n, versioned)))
                    }
                    _ => Ok(None),
                }
            };
            let (read, written) = futures::try_join!(read, write)?;
            if let Some((outcomes, existing, n, versioned)) = written {
                sending.saw(versioned, existing, n);
                for outcome in outcomes {
                    summary.count(outcome);
                    metrics
                        .rebuild_keys
                        .with_label_values(&[self.entity, outcome.as_str()])
                        .inc();
                }
                metrics
                    .rebuild_progress
                    .with_label_values(&[self.entity, "done"])
                    .set(summary.keys as i64);
                progress(&Progress {
                    done: summary.keys,
                    estimated,
                    elapsed: started.elapsed(),
                });
                if !self.pause.is_zero() {
                    tokio::time::sleep(self.pause).await;
                }
            }
            if let Some((page, last)) = read {
                // A short page is the last one.
                more = page.len() as i64 == limit && last.is_some();
                cursor = last;
                let (page, seen) = prepare(rows, page, watermarked);
                highest = highest.max(seen);
                if !page.is_empty() {
                    pending = Some(page);
                }
            }
            if pending.is_none() && !more {
                break;
            }
        }
        drop(reader);
        if let (true, Some(highest)) = (watermarked, highest) {
            let mut own = checker.queue.clone();
            crate::watermark::advance_cmd(&checker.cache.keys().watermark(self.entity), highest)
                .query_async::<i64>(&mut own)
                .await?;
        }

        summary.rechecked = open.len() as u64;
        for chunk in open.chunks(RECHECK_BATCH) {
            checker
                .check_keys(self.entity, chunk, Source::Repair, Some(Cause::Repair))
                .await?;
        }
        if watermarked {
            // The entity's own `cache_behind`, if one is open, is checked again too.
            crate::watermark::observe(
                checker,
                self.entity,
                Source::Repair,
                Some(Cause::Repair),
                None,
            )
            .await?;
        }
        summary.seconds = started.elapsed().as_secs_f64();
        summary.keys_per_second = if summary.seconds > 0.0 {
            summary.keys as f64 / summary.seconds
        } else {
            0.0
        };
        Ok(summary)
    }

    async fn open_incidents(&self) -> Result<Vec<String>, RebuildError> {
        let mut conn = self.checker.pool.get().await?;
        let open = incidents::list(
            &mut conn,
            &ListQuery {
                states: State::ALL.into_iter().filter(|s| s.is_open()).collect(),
                entity: Some(self.entity.to_string()),
                limit: i64::MAX,
                ..ListQuery::default()
            },
        )
        .await?;
        let mut keys: Vec<String> = open.into_iter().map(|i| i.cache_key).collect();
        keys.sort_unstable();
        keys.dedup();
        Ok(keys)
    }

    /// One page in one round trip per node (a pipeline; one per primary of a cluster), plus
    /// one more for the keys that existed when `versioned` is [`Versioned::AbsentFirst`]; each
    /// row's outcome, and how many of its versioned documents found a key already there.
    async fn write(
        &self,
        rows: &Rows,
        redis: &CacheConn,
        sha: &str,
        page: Prepared,
        versioned: Versioned,
    ) -> Result<(Vec<Outcome>, usize), RebuildError> {
        let ttl = rows.entity.ttl;
        let rendered: Vec<Option<(&str, &Rendered)>> = page
            .iter()
            .map(|(key, rendered)| Some((key.as_deref()?, rendered.as_ref()?)))
            .collect();
        let all = rendered.iter().copied();
        let first = write_rendered(redis, sha, ttl, versioned, all).await?;
        let existing: Vec<usize> = first
            .iter()
            .enumerate()
            .filter_map(|(i, outcome)| outcome.is_none().then_some(i))
            .collect();
        let mut outcomes: Vec<Outcome> = first
            .iter()
            .map(|o| o.unwrap_or(Outcome::SkippedNewer))
            .collect();
        if !existing.is_empty() {
            let again = existing.iter().map(|&i| rendered[i]);
            let second = write_rendered(redis, sha, ttl, Versioned::Script, again).await?;
            for (&i, outcome) in existing.iter().zip(second) {
                outcomes[i] = outcome.unwrap_or(Outcome::SkippedNewer);
            }
        }
        Ok((outcomes, existing.len()))
    }
}

/// Writes `items` (each a key and its rendered value; `None`: nothing sound to write, counted
/// as undecodable) in one round trip per node and returns one outcome per item, in order;
/// `None` for a `SET NX` that found the key there.
async fn write_rendered<'r>(
    redis: &CacheConn,
    sha: &str,
    ttl: Option<Duration>,
    versioned: Versioned,
    items: impl Iterator<Item = Option<(&'r str, &'r Rendered)>>,
) -> Result<Vec<Option<Outcome>>, RebuildError> {
    let mut groups: Vec<Keyed> = Vec::new();
    let replies: Vec<(Reply, Option<usize>)> = items
        .map(|item| {
            let Some((key, rendered)) = item else {
                return (Reply::Known(Outcome::Undecodable), None);
            };
            let (cmds, reply) = commands(key, rendered, ttl, sha, versioned);
            if cmds.is_empty() {
                return (reply, None);
            }
            groups.push(Keyed {
                key: key.to_string(),
                commands: cmds,
            });
            (reply, Some(groups.len() - 1))
        })
        .collect();
    let answers = send(redis, &groups).await?;
    Ok(replies
        .into_iter()
        .map(|(reply, group)| {
            let answers = group.map(|g| answers[g].as_slice());
            match outcome(reply, answers) {
                // The key is there: the script decides, in the second round.
                Outcome::SkippedNewer if reply == Reply::IfAbsent => None,
                outcome => Some(outcome),
            }
        })
        .collect())
}

/// Sends `groups` in one round trip per node ([`CacheConn::grouped`]) and returns each
/// group's replies. A Redis that restarted (or a replica that took over) without the
/// versioned write's script gets it loaded again and the whole batch sent again: every command
/// is idempotent. A refused command fails the batch, as a pipeline's error would. Shared by a
/// rebuild's pages and ingestion's batches.
pub(crate) async fn send(
    redis: &CacheConn,
    groups: &[Keyed],
) -> Result<Vec<Vec<Value>>, redis::RedisError> {
    let no_script = |answers: &[Vec<Value>]| {
        answers.iter().flatten().any(|v| {
            matches!(v, Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::NoScript))
        })
    };
    let answers = match redis.grouped(groups).await {
        Ok(answers) if !no_script(&answers) => answers,
        Ok(_) => reload_and_send(redis, groups).await?,
        Err(e) if e.is_connection_dropped() => reload_and_send(redis, groups).await?,
        Err(e) => return Err(e),
    };
    for value in answers.iter().flatten() {
        if let Value::ServerError(e) = value {
            return Err(redis::RedisError::from(e.clone()));
        }
    }
    Ok(answers)
}

async fn reload_and_send(
    redis: &CacheConn,
    groups: &[Keyed],
) -> Result<Vec<Vec<Value>>, redis::RedisError> {
    cache::SET_UNLESS_NEWER
        .prepare_invoke()
        .load_async(&mut redis.clone())
        .await?;
    redis.grouped(groups).await
}

/// What one key's write did, from its [`Reply`] and its group's replies (`None`: nothing was
/// sent for it).
pub(crate) fn outcome(reply: Reply, answers: Option<&[Value]>) -> Outcome {
    match reply {
        Reply::Known(outcome) => outcome,
        Reply::Versioned => match answers.and_then(<[Value]>::first) {
            Some(Value::Int(1)) => Outcome::Written,
            _ => Outcome::SkippedNewer,
        },
        // Not written because the key exists: the rebuild sends it again through the script.
        Reply::IfAbsent => match answers.and_then(<[Value]>::first) {
            Some(Value::Okay) => Outcome::Written,
            _ => Outcome::SkippedNewer,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(key: &str, rendered: &Rendered, ttl: Option<Duration>, sha: &str) -> (String, Reply) {
        let (cmds, reply) = commands(key, rendered, ttl, sha, Versioned::Script);
        let mut pipe = redis::pipe();
        for cmd in cmds {
            pipe.add_command(cmd);
        }
        (
            String::from_utf8_lossy(&pipe.get_packed_pipeline()).replace("\r\n", " "),
            reply,
        )
    }

    #[test]
    fn a_set_is_replaced_on_its_key_in_one_transaction() {
        let members = Rendered::Set(vec!["1".into(), "2".into()]);
        let (text, reply) = packed("k", &members, None, "sha");
        assert_eq!(reply, Reply::Known(Outcome::Written));
        let order: Vec<&str> = ["MULTI", "DEL", "SADD", "PERSIST", "EXEC"].into();
        let mut at = 0;
        for word in order {
            let found = text[at..]
                .find(&format!(" {word} "))
                .unwrap_or_else(|| panic!("{word} missing or out of order in {text}"));
            at += found + 1;
        }
        // One key only: a cluster runs a transaction on one slot.
        assert!(!text.contains("RENAME"), "{text}");
        assert_eq!(text.matches("$1 k ").count(), 3, "{text}");
    }

    #[test]
    fn a_versioned_document_goes_through_the_script_and_keeps_the_expiry_without_a_ttl() {
        let doc = Rendered::Versioned {
            bytes: b"{}".to_vec(),
            field: "version".into(),
            version: 7,
        };
        let (text, reply) = packed("k", &doc, None, "abc");
        assert_eq!(reply, Reply::Versioned);
        assert!(text.contains("EVALSHA"), "{text}");
        // An empty TTL argument (keep the expiry), not 0 (`SET EX 0` is an error).
        assert!(text.contains("$1 7 $0  $7 version"), "{text}");
        let (text, _) = packed("k", &doc, Some(Duration::from_secs(60)), "abc");
        assert!(text.contains("$2 60 $7 version"), "{text}");
    }

    #[test]
    fn absent_first_sends_a_versioned_document_as_set_nx_keeping_the_ttl() {
        let doc = Rendered::Versioned {
            bytes: b"{}".to_vec(),
            field: "version".into(),
            version: 7,
        };
        for (ttl, tail) in [
            (None, "$2 NX "),
            (Some(Duration::from_secs(60)), "$2 NX $2 EX $2 60 "),
        ] {
            let (cmds, reply) = commands("k", &doc, ttl, "abc", Versioned::AbsentFirst);
            assert_eq!(reply, Reply::IfAbsent);
            let text = String::from_utf8_lossy(&cmds[0].get_packed_command()).replace("\r\n", " ");
            assert!(
                text.starts_with("*") && text.contains("$3 SET $1 k $2 {} "),
                "{text}"
            );
            assert!(text.ends_with(tail), "{text}");
        }
        // Anything without a version is sent as before.
        let (_, reply) = commands(
            "k",
            &Rendered::Plain(b"x".to_vec()),
            None,
            "s",
            Versioned::AbsentFirst,
        );
        assert_eq!(reply, Reply::Known(Outcome::Written));
    }

    #[test]
    fn the_script_takes_over_when_most_keys_exist_and_set_nx_is_tried_again_now_and_then() {
        let mut sending = Sending::default();
        // A flushed cache: SET NX page after page.
        for _ in 0..20 {
            let v = sending.next();
            assert_eq!(v, Versioned::AbsentFirst);
            sending.saw(v, 10, 1000);
        }
        // Page 21 finds most keys there: the script alone from page 22 on, but for a probe
        // every 8th page (24 and 32) that finds them there still.
        let v = sending.next();
        sending.saw(v, 900, 1000);
        let probes = (22..=32)
            .filter(|_| {
                let v = sending.next();
                sending.saw(v, 1000, 1000);
                v == Versioned::AbsentFirst
            })
            .count();
        assert_eq!(probes, 2);
        for _ in 33..40 {
            assert_eq!(sending.next(), Versioned::Script);
        }
        // The probe of page 40 finds the keys missing again: back to SET NX.
        let v = sending.next();
        assert_eq!(v, Versioned::AbsentFirst);
        sending.saw(v, 0, 1000);
        assert_eq!(sending.next(), Versioned::AbsentFirst);
        // A page of the script tells nothing about which keys exist.
        let mut script = Sending {
            script: true,
            pages: 1,
        };
        script.saw(Versioned::Script, 0, 1000);
        assert!(script.script);
    }

    #[test]
    fn an_empty_set_or_missing_value_deletes_the_key() {
        for rendered in [
            Rendered::Set(vec![]),
            Rendered::Hash(vec![]),
            Rendered::Delete,
        ] {
            let (text, reply) = packed("k", &rendered, None, "s");
            assert_eq!(reply, Reply::Known(Outcome::Deleted));
            assert!(text.contains("UNLINK"), "{text}");
        }
        let (text, reply) = packed("k", &Rendered::Undecodable, None, "s");
        assert_eq!(reply, Reply::Known(Outcome::Undecodable));
        assert!(text.is_empty(), "{text}");
    }

    #[test]
    fn progress_reads_as_rate_and_eta() {
        let p = Progress {
            done: 2_000,
            estimated: 10_000,
            elapsed: Duration::from_secs(2),
        };
        assert_eq!(p.rate(), 1000.0);
        assert_eq!(p.eta(), Some(Duration::from_secs(8)));
        assert_eq!(p.line(), "2000/10000 keys (20%), 1000 keys/s, ETA 8 s");
        let start = Progress {
            done: 0,
            estimated: 0,
            elapsed: Duration::ZERO,
        };
        assert_eq!(start.line(), "0/0 keys (?%), 0 keys/s, ETA ?");
    }
}
