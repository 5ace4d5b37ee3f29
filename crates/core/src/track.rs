//! Recording observations: the comparator's verdicts go through the state machine and land
//! in PostgreSQL, with one log line and one metric update per transition.
//!
//! Every source (write checks, confirmations, the sweep, CDC, manual refresh) comes through
//! here, so they all behave the same way.
//!
//! A storm (a bad deploy or a restored snapshot leaves every key divergent) would make one
//! log line per key; past `LOGGED_PER_BATCH` transitions of one kind, a batch logs one
//! summary line instead. The metrics count every transition either way.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use chrono::{DateTime, Utc};
use diesel_async::{AsyncConnection, AsyncPgConnection};

use crate::db::incidents::{self, Applied, Evidence, IncidentRow};
use crate::db::{DbError, PgPool};
use crate::incident::{self, Cause, Observation, Source, State, Transition, Verdict};
use crate::metrics::Metrics;

/// Rounds of the locked slow path before giving up on a key; two suffice in practice (see
/// `settle`), the bound only guards against a bug looping forever.
const MAX_RETRIES: usize = 8;
/// Transitions of one kind (entity, from, to) that one batch logs line by line; the rest of
/// the batch's are summarised in one line.
const LOGGED_PER_BATCH: usize = 5;

/// What recording one key's observation did.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub cache_key: String,
    pub transition: Option<Transition>,
    /// Set when a confirmation job must be scheduled for this key at this time.
    pub confirm_at: Option<DateTime<Utc>>,
    /// The incident as stored, when anything was stored.
    pub incident: Option<IncidentRow>,
}

/// What a batch recorded, and the error that stopped it part-way, if one did. Whatever is in
/// `recorded` is committed, so its confirmations must be scheduled either way.
#[derive(Debug, Default)]
pub struct Batch {
    pub recorded: Vec<Recorded>,
    pub error: Option<DbError>,
}

/// How a batch of observations was made.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub source: Source,
    /// Why a match closes an incident; by default the source's own cause.
    pub cause: Option<Cause>,
    /// When the observations were made (PostgreSQL's clock, read with the rows).
    pub at: DateTime<Utc>,
    pub grace: Duration,
    /// Confirmations only: for each key, the Detected incident this confirmation was scheduled
    /// for. A key whose open incident is another one, or no longer Detected, is left alone,
    /// so a confirmation delivered twice counts once.
    pub confirming: Option<&'a HashMap<String, i64>>,
}

impl Context<'_> {
    fn allows(&self, key: &str, current: Option<&IncidentRow>) -> bool {
        match self.confirming {
            None => true,
            Some(expected) => matches!(
                (expected.get(key), current),
                (Some(id), Some(row)) if *id == row.id && row.state == State::Detected.as_str()
            ),
        }
    }

    fn observation(&self, ev: &Evidence) -> Observation {
        Observation {
            verdict: if ev.kind.is_match() {
                Verdict::Match
            } else {
                Verdict::Mismatch
            },
            at: self.at,
            db_version: ev.db_version,
            source: self.source,
            cause: self.cause.unwrap_or(Cause::for_source(self.source)),
        }
    }
}

/// Records what was seen for a batch of keys: one query reads their open incidents, one more
/// the last resolution of the keys that would open a new one, one statement counts every
/// further mismatch of a Persistent incident, and two more store every other change (the
/// incidents that open, the ones that move). Only a key whose incident changed under it since
/// it was read is written on its own. A batch where everything matches and nothing is open
/// costs the one read.
pub async fn record_batch(
    conn: &mut AsyncPgConnection,
    metrics: &Metrics,
    ctx: &Context<'_>,
    evidence: Vec<Evidence>,
) -> Batch {
    let mut batch = Batch::default();
    let mut log = TransitionLog::default();
    if let Err(e) = record_into(&mut batch, &mut log, conn, metrics, ctx, evidence, None).await {
        batch.error = Some(e);
    }
    log.summarise();
    batch
}

/// [`record_batch`] for keys whose open incidents the caller read already, with
/// [`incidents::open_for_keys`], any time after the rows: a sweep reads them with the cached
/// values, while it records the page before. Reading them earlier changes nothing: every
/// write is conditional on the incident as read, and one that changed since takes the
/// locked slow path, however long ago it was read.
pub async fn record_batch_with_open(
    conn: &mut AsyncPgConnection,
    metrics: &Metrics,
    ctx: &Context<'_>,
    evidence: Vec<Evidence>,
    open: HashMap<String, IncidentRow>,
) -> Batch {
    let mut batch = Batch::default();
    let mut log = TransitionLog::default();
    let open = Some(open);
    if let Err(e) = record_into(&mut batch, &mut log, conn, metrics, ctx, evidence, open).await {
        batch.error = Some(e);
    }
    log.summarise();
    batch
}

async fn record_into(
    batch: &mut Batch,
    log: &mut TransitionLog,
    conn: &mut AsyncPgConnection,
    metrics: &Metrics,
    ctx: &Context<'_>,
    evidence: Vec<Evidence>,
    open: Option<HashMap<String, IncidentRow>>,
) -> Result<(), DbError> {
    // Only a mismatch without an open incident needs the key's history: it may not open one
    // if it was made before the last resolution.
    let mismatched = |open: Option<&HashMap<String, IncidentRow>>| -> Vec<String> {
        evidence
            .iter()
            .filter(|e| !e.kind.is_match() && open.is_none_or(|o| !o.contains_key(&e.cache_key)))
            .map(|e| e.cache_key.clone())
            .collect()
    };
    let (mut open, mut closed) = match open {
        Some(open) => {
            let closed = incidents::latest_closed_for_keys(conn, &mismatched(Some(&open))).await?;
            (open, closed)
        }
        None => {
            // Both reads in one round trip, so the last resolution is read for every
            // mismatch, open incident or not.
            let keys: Vec<String> = evidence.iter().map(|e| e.cache_key.clone()).collect();
            let mismatched = mismatched(None);
            let conn: &AsyncPgConnection = conn;
            futures::try_join!(
                incidents::open_for_keys(conn, &keys),
                incidents::latest_closed_for_keys(conn, &mismatched)
            )?
        }
    };

    let mut fold: Vec<(i64, &Evidence)> = Vec::new();
    let mut one_by_one: Vec<(&Evidence, Option<IncidentRow>)> = Vec::new();
    for ev in &evidence {
        metrics
            .checks
            .with_label_values(&[&ev.entity, ctx.source.as_str(), ev.kind.as_str()])
            .inc();
        let current = open.remove(&ev.cache_key);
        match current {
            Some(row)
                if !ev.kind.is_match()
                    && row.state == State::Persistent.as_str()
                    && ctx.allows(&ev.cache_key, Some(&row)) =>
            {
                fold.push((row.id, ev))
            }
            Some(row) => one_by_one.push((ev, Some(row))),
            None => one_by_one.push((ev, closed.remove(&ev.cache_key))),
        }
    }

    let folded = incidents::fold_persistent(conn, ctx.at, &fold).await?;
    for (id, ev) in &fold {
        if folded.contains(id) {
            batch.recorded.push(Recorded::nothing(&ev.cache_key));
        } else {
            // Left Persistent since it was read: through the state machine like the rest.
            one_by_one.push((ev, incidents::latest_for_key(conn, &ev.cache_key).await?));
        }
    }

    // Every key's step from what was read, then all the writes at once; only a key whose
    // write found its incident changed meanwhile goes on alone, through the locked slow path.
    let mut steps: Vec<(
        &Evidence,
        Observation,
        Option<IncidentRow>,
        Option<incident::Step>,
    )> = Vec::with_capacity(one_by_one.len());
    for (ev, current) in one_by_one {
        let obs = ctx.observation(ev);
        let step = ctx
            .allows(&ev.cache_key, current.as_ref().filter(|c| c.is_open()))
            .then(|| step_for(current.as_ref(), &obs, ctx.grace));
        steps.push((ev, obs, current, step));
    }
    let writes: Vec<incidents::Write> = steps
        .iter()
        .filter_map(|(ev, _, current, step)| {
            step.as_ref().map(|step| incidents::Write {
                current: current.as_ref(),
                step,
                evidence: ev,
            })
        })
        .collect();
    let mut answers = if writes.iter().any(|w| !w.step.is_noop()) {
        incidents::apply_many(conn, &writes).await
    } else {
        vec![Some(Applied::Nothing); writes.len()]
    }
    .into_iter();
    for (ev, obs, current, step) in steps {
        let recorded = match step {
            None => Recorded::nothing(&ev.cache_key),
            Some(step) => {
                let applied = match answers.next().expect("one answer per write") {
                    Some(applied) => applied,
                    // Its batched statement failed: alone, so the keys before one the
                    // database refuses are stored, and its error is this batch's.
                    None => incidents::apply(conn, current.as_ref(), &step, ev).await?,
                };
                let (step, applied) = settle(conn, ctx, &obs, ev, step, applied).await?;
                finish(metrics, log, ev, step, applied)
            }
        };
        batch.recorded.push(recorded);
    }
    Ok(())
}

impl Recorded {
    fn nothing(key: &str) -> Recorded {
        Recorded {
            cache_key: key.to_string(),
            transition: None,
            confirm_at: None,
            incident: None,
        }
    }
}

/// A key whose conditional write conflicted (someone else changed its incident first): lock
/// the key's latest incident so concurrent observers queue up instead of retrying in lockstep,
/// and step again from what it now is. Only an INSERT racing another INSERT can still
/// conflict here, and the next round finds that row and locks it.
async fn settle(
    conn: &mut AsyncPgConnection,
    ctx: &Context<'_>,
    obs: &Observation,
    ev: &Evidence,
    mut step: incident::Step,
    mut applied: Applied,
) -> Result<(incident::Step, Applied), DbError> {
    let mut tries = 0;
    while applied == Applied::Conflict {
        tries += 1;
        if tries > MAX_RETRIES {
            return Err(DbError::Contended(ev.cache_key.clone()));
        }
        (step, applied) = conn
            .transaction::<_, DbError, _>(async |conn| {
                let current = incidents::latest_for_key_locked(conn, &ev.cache_key).await?;
                if !ctx.allows(&ev.cache_key, current.as_ref().filter(|c| c.is_open())) {
                    return Ok((incident::Step::noop(), Applied::Nothing));
                }
                let step = step_for(current.as_ref(), obs, ctx.grace);
                let applied = incidents::apply(conn, current.as_ref(), &step, ev).await?;
                Ok((step, applied))
            })
            .await?;
    }
    Ok((step, applied))
}

/// What a key's stored step did: its log line and metrics, and the confirmation to schedule.
fn finish(
    metrics: &Metrics,
    log: &mut TransitionLog,
    ev: &Evidence,
    step: incident::Step,
    applied: Applied,
) -> Recorded {
    if let Some(why) = step.refused {
        metrics.refused.with_label_values(&[why.as_str()]).inc();
        tracing::debug!(key = %ev.cache_key, reason = why.as_str(), "out-of-order observation ignored");
    }
    let incident = match applied {
        Applied::Stored(row) => {
            if let Some(t) = step.transition {
                report(metrics, log, &row, t, ev);
            }
            Some(*row)
        }
        Applied::Nothing | Applied::Conflict => None,
    };
    Recorded {
        cache_key: ev.cache_key.clone(),
        transition: incident.as_ref().and(step.transition),
        confirm_at: incident.as_ref().and(step.schedule_confirm_at),
        incident,
    }
}

fn step_for(current: Option<&IncidentRow>, obs: &Observation, grace: Duration) -> incident::Step {
    incident::step(current.map(|c| c.incident()).as_ref(), obs, grace)
}

/// The one log line (unless the batch is a storm, see [`TransitionLog`]) and the metrics of a
/// transition.
fn report(
    metrics: &Metrics,
    log: &mut TransitionLog,
    row: &IncidentRow,
    t: Transition,
    ev: &Evidence,
) {
    let from = t.from.map_or("none", State::as_str);
    metrics
        .transitions
        .with_label_values(&[&row.entity, from, t.to.as_str()])
        .inc();
    let incident = row.incident();
    match t.to {
        State::Confirmed => {
            if let Some(d) = incident.time_to_confirm() {
                metrics.time_to_confirm.observe(seconds(d));
            }
        }
        State::Resolved | State::Transient => {
            if let Some(d) = incident.duration() {
                metrics
                    .incident_duration
                    .with_label_values(&[t.to.as_str()])
                    .observe(seconds(d));
            }
        }
        State::Detected | State::Persistent => {}
    }
    // Transient closures are the normal life of an in-flight write: not worth an info line.
    if t.to == State::Transient {
        tracing::debug!(key = %row.cache_key, incident = row.id, from, to = t.to.as_str(),
            verdict = %row.kind, "incident closed as transient");
    } else if log.admit(&row.entity, from, t.to.as_str()) {
        tracing::info!(key = %row.cache_key, incident = row.id, from, to = t.to.as_str(),
            verdict = ev.kind.as_str(), diff = %row.diff, observations = row.observations,
            resolution = row.resolution.as_deref().unwrap_or(""), "incident transition");
    }
}

/// How many transitions of each kind a batch logged and left out: the first
/// `LOGGED_PER_BATCH` of a kind get their own line, the rest one summary line at the end.
#[derive(Debug, Default)]
struct TransitionLog {
    /// (entity, from, to) -> (logged, left out).
    kinds: BTreeMap<(String, &'static str, &'static str), (usize, usize)>,
}

impl TransitionLog {
    /// Whether this transition gets a line of its own.
    fn admit(&mut self, entity: &str, from: &'static str, to: &'static str) -> bool {
        let (logged, left_out) = self
            .kinds
            .entry((entity.to_string(), from, to))
            .or_default();
        if *logged < LOGGED_PER_BATCH {
            *logged += 1;
            true
        } else {
            *left_out += 1;
            false
        }
    }

    /// (entity, from, to, logged, left out) of every kind with transitions left out.
    fn left_out(&self) -> impl Iterator<Item = (&str, &str, &str, usize, usize)> {
        self.kinds
            .iter()
            .filter(|(_, (_, left_out))| *left_out > 0)
            .map(|((entity, from, to), (logged, left_out))| {
                (entity.as_str(), *from, *to, *logged, *left_out)
            })
    }

    fn summarise(&self) {
        for (entity, from, to, logged, left_out) in self.left_out() {
            tracing::info!(
                entity,
                from,
                to,
                logged,
                not_logged = left_out,
                "incident storm: {} transitions {from} -> {to} of entity {entity} in one batch; \
                 {left_out} not logged one by one (stalewatch_incident_transitions_total counts them all)",
                logged + left_out
            );
        }
    }
}

fn seconds(d: chrono::Duration) -> f64 {
    d.num_milliseconds().max(0) as f64 / 1000.0
}

/// Sets the open-incidents gauge from the table, so it is right whichever process changed
/// what, and after any restart. Every open state of every entity is set, zero included, so
/// a series that drops to zero says so instead of keeping its last value.
pub async fn refresh_open_gauge(
    pool: &PgPool,
    metrics: &Metrics,
    entities: &[&str],
) -> Result<(), DbError> {
    let mut conn = pool.get().await?;
    let counts = incidents::count_open(&mut conn).await?;
    for ((entity, state), n) in &counts {
        metrics
            .open_incidents
            .with_label_values(&[entity, state])
            .set(*n);
    }
    for entity in entities {
        for state in State::ALL.into_iter().filter(|s| s.is_open()) {
            let n = counts
                .get(&(entity.to_string(), state.as_str().to_string()))
                .copied()
                .unwrap_or(0);
            metrics
                .open_incidents
                .with_label_values(&[entity, state.as_str()])
                .set(n);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_logs_a_few_lines_per_kind_and_summarises_the_rest() {
        let mut log = TransitionLog::default();
        let admitted = (0..1000)
            .filter(|_| log.admit("item", "none", "detected"))
            .count();
        assert_eq!(admitted, LOGGED_PER_BATCH);
        // Another kind, or another entity, has its own allowance.
        assert!(log.admit("item", "detected", "confirmed"));
        assert!(log.admit("user", "none", "detected"));
        let left_out: Vec<_> = log.left_out().collect();
        assert_eq!(
            left_out,
            [(
                "item",
                "none",
                "detected",
                LOGGED_PER_BATCH,
                1000 - LOGGED_PER_BATCH
            )]
        );
    }

    #[test]
    fn a_quiet_batch_leaves_nothing_out() {
        let mut log = TransitionLog::default();
        assert!((0..LOGGED_PER_BATCH).all(|_| log.admit("item", "none", "detected")));
        assert_eq!(log.left_out().count(), 0);
    }
}
