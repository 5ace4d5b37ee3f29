//! The incident state machine: one incident per cache key at a time.
//!
//! This module is deliberately pure. Callers load the key's current incident,
//! feed one [`Observation`] to [`step`], and store whatever [`Step::next`] says.
//! Keeping I/O out means every edge can be tested exhaustively, and every
//! producer of observations (write checks, confirm jobs, sweeps, CDC, manual
//! checks) goes through exactly the same rules.
//!
//! The edges are:
//!
//! ```text
//! (none)     --mismatch--> Detected
//! Detected   --match-----> Transient
//! Detected   --mismatch--> Detected   (before confirm_due_at)
//! Detected   --mismatch--> Confirmed  (at or after confirm_due_at)
//! Confirmed  --mismatch--> Persistent
//! Persistent --mismatch--> Persistent
//! Confirmed  --match-----> Resolved
//! Persistent --match-----> Resolved
//! ```
//!
//! A closed incident (Resolved or Transient) counts as no incident at all, except that it
//! dates the key's last resolution.
//!
//! Observations arrive late and out of order (a slow batch, a pool wait, a retried job), so
//! each one carries when it was made and which DB version it saw, and [`step`] refuses the
//! ones that would rewrite history:
//! - a match older than the incident's newest evidence, or that saw an older DB version than
//!   the incident did, does not close it (the cache may still be stale);
//! - a mismatch older than the key's last resolution does not open a new incident (it may
//!   have seen the cache before the refresh that resolved it).

use chrono::{DateTime, Utc};
use std::time::Duration;

/// Lifecycle state of an incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Detected,
    Confirmed,
    Persistent,
    Resolved,
    Transient,
}

impl State {
    /// Every state, so callers (metrics, storage checks) can enumerate them
    /// without a hand-written list that silently goes stale.
    pub const ALL: [State; 5] = [
        State::Detected,
        State::Confirmed,
        State::Persistent,
        State::Resolved,
        State::Transient,
    ];

    /// Open incidents still block a new one from being opened for the key.
    pub fn is_open(self) -> bool {
        matches!(self, State::Detected | State::Confirmed | State::Persistent)
    }

    /// Stable name used in storage and metric labels; matches the serde form.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Detected => "detected",
            State::Confirmed => "confirmed",
            State::Persistent => "persistent",
            State::Resolved => "resolved",
            State::Transient => "transient",
        }
    }

    /// Inverse of [`State::as_str`]; `None` for anything else so bad rows are
    /// surfaced instead of guessed at.
    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Who made the observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    WriteCheck,
    Confirm,
    Sweep,
    Cdc,
    Manual,
    /// The check after a repair (REPAIR_POLICY=confirmed).
    Repair,
    /// A Redis keyspace notification: some client wrote, deleted or expired the key.
    Notification,
    /// The periodic watermark drift check of an entity (`crate::watermark`).
    Watermark,
}

impl Source {
    /// Every source, for enumerating metric labels up front.
    pub const ALL: [Source; 8] = [
        Source::WriteCheck,
        Source::Confirm,
        Source::Sweep,
        Source::Cdc,
        Source::Manual,
        Source::Repair,
        Source::Notification,
        Source::Watermark,
    ];

    /// Stable name used in storage and metric labels; matches the serde form.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::WriteCheck => "write_check",
            Source::Confirm => "confirm",
            Source::Sweep => "sweep",
            Source::Cdc => "cdc",
            Source::Manual => "manual",
            Source::Repair => "repair",
            Source::Notification => "notification",
            Source::Watermark => "watermark",
        }
    }

    /// Inverse of [`Source::as_str`].
    pub fn parse(s: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Why an open incident closed as Resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    Write,
    Refresh,
    Repair,
    Invalidation,
    Natural,
}

impl Cause {
    /// Every cause, for enumerating metric labels up front.
    pub const ALL: [Cause; 5] = [
        Cause::Write,
        Cause::Refresh,
        Cause::Repair,
        Cause::Invalidation,
        Cause::Natural,
    ];

    /// Stable name used in storage and metric labels; matches the serde form.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Write => "write",
            Cause::Refresh => "refresh",
            Cause::Repair => "repair",
            Cause::Invalidation => "invalidation",
            Cause::Natural => "natural",
        }
    }

    /// Inverse of [`Cause::as_str`].
    pub fn parse(s: &str) -> Option<Cause> {
        Cause::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Default cause for a match seen by this source.
    ///
    /// A match seen right after a write was most likely fixed by that write,
    /// one seen by CDC by the invalidation it triggered, and a manual check by
    /// the operator's refresh; when a periodic check sees it, nothing we know
    /// of fixed it, so it counts as natural expiry.
    pub fn for_source(source: Source) -> Cause {
        match source {
            // A notification is a write to the key: that write is what made it agree. A
            // watermark that caught up was moved by the ingester's writes.
            Source::WriteCheck | Source::Notification | Source::Watermark => Cause::Write,
            Source::Cdc => Cause::Invalidation,
            Source::Manual => Cause::Refresh,
            Source::Repair => Cause::Repair,
            Source::Confirm | Source::Sweep => Cause::Natural,
        }
    }
}

/// Outcome of comparing the cached value with the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Match,
    Mismatch,
}

/// One comparison result for a key, as fed to [`step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    pub verdict: Verdict,
    /// When the observation was made: PostgreSQL's clock when its reads began, a lower bound
    /// of the moment of everything it saw.
    pub at: DateTime<Utc>,
    /// The DB version it saw; `None` for a missing row or an entity without versions.
    pub db_version: Option<i64>,
    pub source: Source,
    /// Only used when a match closes a Confirmed/Persistent incident; a
    /// Transient close has no cause because nothing needed fixing.
    pub cause: Cause,
}

/// The stored record of one incident on one key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Incident {
    pub state: State,
    pub first_seen_at: DateTime<Utc>,
    /// `first_seen_at + grace`, fixed at detection. It never moves, so a key
    /// that keeps mismatching cannot postpone its own confirmation forever.
    pub confirm_due_at: DateTime<Utc>,
    pub confirmed_at: Option<DateTime<Utc>>,
    pub last_seen_at: DateTime<Utc>,
    /// Set for Resolved and Transient.
    pub resolved_at: Option<DateTime<Utc>>,
    /// Set for Resolved only.
    pub resolution: Option<Cause>,
    /// Number of mismatch observations; starts at 1.
    pub observations: i64,
    /// The DB version of the newest evidence, when the entity has versions.
    pub db_version: Option<i64>,
    /// A refresh or repair that rewrote the key, and when: a match seen around then closes
    /// the incident with that cause, whoever sees it first.
    #[serde(default)]
    pub rewrite: Option<(Cause, DateTime<Utc>)>,
}

impl Incident {
    /// How long the incident was open; `None` while it still is.
    pub fn duration(&self) -> Option<chrono::Duration> {
        self.resolved_at.map(|r| r - self.first_seen_at)
    }

    /// How long it took to confirm; `None` if it never was confirmed.
    pub fn time_to_confirm(&self) -> Option<chrono::Duration> {
        self.confirmed_at.map(|c| c - self.first_seen_at)
    }
}

/// A change of state; `from: None` means a new incident was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: Option<State>,
    pub to: State,
}

/// Why an observation was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// A match made before the open incident's newest evidence.
    OlderThanEvidence,
    /// A match that saw an older DB version than the open incident did.
    OlderDbVersion,
    /// A mismatch made before the key's last incident closed.
    BeforeResolution,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [
        Refusal::OlderThanEvidence,
        Refusal::OlderDbVersion,
        Refusal::BeforeResolution,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::OlderThanEvidence => "older_than_evidence",
            Refusal::OlderDbVersion => "older_db_version",
            Refusal::BeforeResolution => "before_resolution",
        }
    }
}

/// What the caller must do after one observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The incident to store; None when there is nothing to store (a match with no open incident).
    pub next: Option<Incident>,
    /// Some exactly when the state changed (or an incident opened).
    pub transition: Option<Transition>,
    /// Some(at) when a confirmation job must be scheduled at `at` (only on opening: at = first_seen + grace).
    pub schedule_confirm_at: Option<DateTime<Utc>>,
    /// Some when the observation was out of order and changed nothing.
    pub refused: Option<Refusal>,
}

impl Step {
    /// True when the caller has nothing to write, so it can skip the round trip.
    pub fn is_noop(&self) -> bool {
        self.next.is_none()
    }

    /// Nothing to store, nothing to report.
    pub fn noop() -> Step {
        Step {
            next: None,
            transition: None,
            schedule_confirm_at: None,
            refused: None,
        }
    }

    fn refused(why: Refusal) -> Step {
        Step {
            refused: Some(why),
            ..Step::noop()
        }
    }
}

/// Advances the incident for one key by one observation.
///
/// `current` is the key's open incident or, when it has none, its latest closed one (or
/// `None` when it never had any): a closed incident counts as no incident, but an
/// observation made before it closed cannot open a new one.
pub fn step(current: Option<&Incident>, obs: &Observation, grace: Duration) -> Step {
    match (current, obs.verdict) {
        (Some(inc), Verdict::Match) if inc.state.is_open() => close(inc, obs),
        (Some(inc), Verdict::Mismatch) if inc.state.is_open() => record_mismatch(inc, obs),
        (_, Verdict::Match) => Step::noop(),
        (Some(closed), Verdict::Mismatch) if closed.resolved_at.is_some_and(|r| obs.at < r) => {
            Step::refused(Refusal::BeforeResolution)
        }
        (_, Verdict::Mismatch) => open_incident(obs, grace),
    }
}

fn open_incident(obs: &Observation, grace: Duration) -> Step {
    let confirm_due_at = add_saturating(obs.at, grace);
    let incident = Incident {
        state: State::Detected,
        first_seen_at: obs.at,
        confirm_due_at,
        confirmed_at: None,
        last_seen_at: obs.at,
        resolved_at: None,
        resolution: None,
        observations: 1,
        db_version: obs.db_version,
        rewrite: None,
    };
    Step {
        next: Some(incident),
        transition: Some(Transition {
            from: None,
            to: State::Detected,
        }),
        schedule_confirm_at: Some(confirm_due_at),
        refused: None,
    }
}

fn close(inc: &Incident, obs: &Observation) -> Step {
    // A match made before the newest mismatch, or of an older row, says nothing about the
    // cache now: it may have been read before the divergence this incident is about.
    if obs.at < inc.last_seen_at {
        return Step::refused(Refusal::OlderThanEvidence);
    }
    if let (Some(seen), Some(evidence)) = (obs.db_version, inc.db_version) {
        if seen < evidence {
            return Step::refused(Refusal::OlderDbVersion);
        }
    }
    let mut next = inc.clone();
    next.resolved_at = Some(obs.at);
    if inc.state == State::Detected {
        // Never confirmed, so there was nothing to fix and no cause to credit.
        next.state = State::Transient;
        next.resolution = None;
    } else {
        next.state = State::Resolved;
        next.resolution = Some(match inc.rewrite {
            Some((cause, at)) if (obs.at - at).abs() <= REWRITE_WINDOW => cause,
            _ => obs.cause,
        });
    }
    changed(inc.state, next)
}

fn record_mismatch(inc: &Incident, obs: &Observation) -> Step {
    let mut next = inc.clone();
    next.observations = inc.observations.saturating_add(1);
    next.last_seen_at = inc.last_seen_at.max(obs.at);
    next.db_version = inc.db_version.max(obs.db_version);
    match inc.state {
        // Any source may confirm once the due time has passed, so a lost or
        // late confirm job cannot leave an incident stuck in Detected.
        State::Detected if obs.at >= inc.confirm_due_at => {
            next.state = State::Confirmed;
            next.confirmed_at = Some(obs.at);
        }
        State::Confirmed => next.state = State::Persistent,
        _ => {}
    }
    changed(inc.state, next)
}

/// How close to a rewrite a match must be seen to be credited to it: a refresh or repair
/// checks its own write within milliseconds; a sweep page read just before the write, or a
/// notification just after, falls well inside.
const REWRITE_WINDOW: chrono::TimeDelta = chrono::TimeDelta::seconds(10);

/// Builds the step for an existing incident; the transition is derived from
/// the states so it cannot disagree with what is stored.
fn changed(from: State, next: Incident) -> Step {
    let transition = (from != next.state).then_some(Transition {
        from: Some(from),
        to: next.state,
    });
    Step {
        next: Some(next),
        transition,
        schedule_confirm_at: None,
        refused: None,
    }
}

/// `at + grace` without panicking: a misconfigured, absurdly long grace just
/// means "never due" rather than taking the worker down.
fn add_saturating(at: DateTime<Utc>, grace: Duration) -> DateTime<Utc> {
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    at.checked_add_signed(grace)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    const GRACE: Duration = Duration::from_secs(5);

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap()
    }

    fn at_ms(ms: i64) -> DateTime<Utc> {
        t0() + chrono::Duration::milliseconds(ms)
    }

    fn obs(verdict: Verdict, ms: i64, source: Source) -> Observation {
        Observation {
            verdict,
            at: at_ms(ms),
            db_version: None,
            source,
            cause: Cause::for_source(source),
        }
    }

    fn of_version(o: Observation, v: i64) -> Observation {
        Observation {
            db_version: Some(v),
            ..o
        }
    }

    fn mismatch(ms: i64) -> Observation {
        obs(Verdict::Mismatch, ms, Source::WriteCheck)
    }

    fn matched(ms: i64) -> Observation {
        obs(Verdict::Match, ms, Source::Sweep)
    }

    fn stored(s: Step) -> Incident {
        s.next.expect("step should store an incident")
    }

    /// Opens at 0 ms with a 5 s grace.
    fn detected() -> Incident {
        stored(step(None, &mismatch(0), GRACE))
    }

    /// Detected at 0 ms, confirmed at 6 s.
    fn confirmed() -> Incident {
        let inc = stored(step(Some(&detected()), &mismatch(6_000), GRACE));
        assert_eq!(inc.state, State::Confirmed);
        inc
    }

    /// Confirmed at 6 s, persistent at 7 s.
    fn persistent() -> Incident {
        let inc = stored(step(Some(&confirmed()), &mismatch(7_000), GRACE));
        assert_eq!(inc.state, State::Persistent);
        inc
    }

    fn transition(from: Option<State>, to: State) -> Option<Transition> {
        Some(Transition { from, to })
    }

    #[test]
    fn no_open_incident_plus_match_is_noop() {
        let s = step(None, &matched(0), GRACE);
        assert!(s.is_noop());
        assert_eq!(s, Step::noop());
    }

    #[test]
    fn no_open_incident_plus_mismatch_opens_detected() {
        let s = step(None, &mismatch(1_000), GRACE);
        assert_eq!(s.transition, transition(None, State::Detected));
        assert_eq!(s.schedule_confirm_at, Some(at_ms(6_000)));
        let inc = stored(s);
        assert_eq!(
            inc,
            Incident {
                state: State::Detected,
                first_seen_at: at_ms(1_000),
                confirm_due_at: at_ms(6_000),
                confirmed_at: None,
                last_seen_at: at_ms(1_000),
                resolved_at: None,
                resolution: None,
                observations: 1,
                db_version: None,
                rewrite: None,
            }
        );
    }

    #[test]
    fn detected_plus_match_becomes_transient() {
        let cur = stored(step(Some(&detected()), &mismatch(2_000), GRACE));
        let s = step(Some(&cur), &obs(Verdict::Match, 3_000, Source::Cdc), GRACE);
        assert_eq!(
            s.transition,
            transition(Some(State::Detected), State::Transient)
        );
        assert_eq!(s.schedule_confirm_at, None);
        let inc = stored(s);
        assert_eq!(inc.state, State::Transient);
        assert_eq!(inc.resolved_at, Some(at_ms(3_000)));
        assert_eq!(inc.resolution, None);
        assert_eq!(inc.observations, 2);
        assert_eq!(inc.last_seen_at, at_ms(2_000));
        assert_eq!(inc.duration(), Some(chrono::Duration::seconds(3)));
    }

    #[test]
    fn detected_plus_mismatch_before_due_stays_detected() {
        let cur = detected();
        let s = step(Some(&cur), &mismatch(4_999), GRACE);
        assert_eq!(s.transition, None);
        assert_eq!(s.schedule_confirm_at, None);
        let inc = stored(s);
        assert_eq!(inc.state, State::Detected);
        assert_eq!(inc.observations, 2);
        assert_eq!(inc.last_seen_at, at_ms(4_999));
        assert_eq!(inc.confirm_due_at, cur.confirm_due_at);
        assert_eq!(inc.confirmed_at, None);
    }

    #[test]
    fn detected_plus_mismatch_at_due_confirms() {
        // Exactly at the due time counts as due.
        let s = step(Some(&detected()), &mismatch(5_000), GRACE);
        assert_eq!(
            s.transition,
            transition(Some(State::Detected), State::Confirmed)
        );
        let inc = stored(s);
        assert_eq!(inc.state, State::Confirmed);
        assert_eq!(inc.confirmed_at, Some(at_ms(5_000)));
        assert_eq!(inc.observations, 2);
        assert_eq!(inc.last_seen_at, at_ms(5_000));
        assert_eq!(inc.time_to_confirm(), Some(chrono::Duration::seconds(5)));
    }

    #[test]
    fn detected_plus_mismatch_after_due_confirms_from_any_source() {
        for source in Source::ALL {
            let s = step(
                Some(&detected()),
                &obs(Verdict::Mismatch, 9_000, source),
                GRACE,
            );
            let inc = stored(s);
            assert_eq!(inc.state, State::Confirmed, "source {source:?}");
            assert_eq!(inc.confirmed_at, Some(at_ms(9_000)));
        }
    }

    #[test]
    fn confirmed_plus_mismatch_becomes_persistent() {
        let cur = confirmed();
        let s = step(Some(&cur), &mismatch(7_000), GRACE);
        assert_eq!(
            s.transition,
            transition(Some(State::Confirmed), State::Persistent)
        );
        assert_eq!(s.schedule_confirm_at, None);
        let inc = stored(s);
        assert_eq!(inc.state, State::Persistent);
        assert_eq!(inc.observations, cur.observations + 1);
        assert_eq!(inc.last_seen_at, at_ms(7_000));
        assert_eq!(inc.confirmed_at, cur.confirmed_at);
    }

    #[test]
    fn persistent_plus_mismatch_stays_persistent_and_counts() {
        let cur = persistent();
        let s = step(Some(&cur), &mismatch(8_000), GRACE);
        assert_eq!(s.transition, None);
        assert!(!s.is_noop(), "counters must still be stored");
        let inc = stored(s);
        assert_eq!(inc.state, State::Persistent);
        assert_eq!(inc.observations, cur.observations + 1);
        assert_eq!(inc.last_seen_at, at_ms(8_000));
    }

    #[test]
    fn confirmed_plus_match_resolves_with_cause() {
        let cur = confirmed();
        let o = Observation {
            cause: Cause::Repair,
            ..obs(Verdict::Match, 6_500, Source::Manual)
        };
        let s = step(Some(&cur), &o, GRACE);
        assert_eq!(
            s.transition,
            transition(Some(State::Confirmed), State::Resolved)
        );
        let inc = stored(s);
        assert_eq!(inc.state, State::Resolved);
        assert_eq!(inc.resolved_at, Some(at_ms(6_500)));
        assert_eq!(inc.resolution, Some(Cause::Repair));
        assert_eq!(inc.observations, cur.observations);
    }

    #[test]
    fn persistent_plus_match_resolves_with_cause() {
        let cur = persistent();
        let s = step(Some(&cur), &obs(Verdict::Match, 10_000, Source::Cdc), GRACE);
        assert_eq!(
            s.transition,
            transition(Some(State::Persistent), State::Resolved)
        );
        let inc = stored(s);
        assert_eq!(inc.resolved_at, Some(at_ms(10_000)));
        assert_eq!(inc.resolution, Some(Cause::Invalidation));
        assert_eq!(inc.duration(), Some(chrono::Duration::seconds(10)));
    }

    #[test]
    fn closed_incident_plus_match_is_noop() {
        let resolved = stored(step(Some(&confirmed()), &matched(8_000), GRACE));
        let transient = stored(step(Some(&detected()), &matched(1_000), GRACE));
        for cur in [resolved, transient] {
            assert!(!cur.state.is_open());
            assert!(step(Some(&cur), &matched(20_000), GRACE).is_noop());
        }
    }

    #[test]
    fn mismatch_after_resolved_or_transient_opens_new_incident() {
        let resolved = stored(step(Some(&persistent()), &matched(8_000), GRACE));
        let transient = stored(step(Some(&detected()), &matched(1_000), GRACE));
        for cur in [resolved, transient] {
            let s = step(Some(&cur), &mismatch(20_000), GRACE);
            assert_eq!(s, step(None, &mismatch(20_000), GRACE));
            assert_eq!(s.transition, transition(None, State::Detected));
            assert_eq!(s.schedule_confirm_at, Some(at_ms(25_000)));
            let inc = stored(s);
            assert_eq!(inc.observations, 1);
            assert_eq!(inc.first_seen_at, at_ms(20_000));
            assert_eq!(inc.confirmed_at, None);
            assert_eq!(inc.resolved_at, None);
            assert_eq!(inc.resolution, None);
        }
    }

    #[test]
    fn confirmation_time_does_not_move_under_repeated_mismatches() {
        let mut inc = detected();
        for ms in (500..5_000).step_by(500) {
            inc = stored(step(Some(&inc), &mismatch(ms), GRACE));
            assert_eq!(inc.state, State::Detected);
            assert_eq!(inc.confirm_due_at, at_ms(5_000));
        }
        inc = stored(step(Some(&inc), &mismatch(5_000), GRACE));
        assert_eq!(inc.state, State::Confirmed);
        assert_eq!(inc.confirm_due_at, at_ms(5_000));
        assert_eq!(inc.observations, 11);
    }

    #[test]
    fn out_of_order_mismatch_does_not_move_last_seen_backwards() {
        let cur = stored(step(Some(&detected()), &mismatch(3_000), GRACE));
        let inc = stored(step(Some(&cur), &mismatch(1_000), GRACE));
        assert_eq!(inc.last_seen_at, at_ms(3_000));
        assert_eq!(inc.observations, 3);
    }

    #[test]
    fn a_match_older_than_the_newest_evidence_closes_nothing() {
        // Detected at 0 s and seen again at 3 s; a match read at 2 s arrives late.
        let cur = stored(step(Some(&detected()), &mismatch(3_000), GRACE));
        let s = step(Some(&cur), &matched(2_000), GRACE);
        assert_eq!(s.refused, Some(Refusal::OlderThanEvidence));
        assert!(s.is_noop());
        // After the grace period too: a confirmed incident stays open.
        let s = step(Some(&persistent()), &matched(2_000), GRACE);
        assert_eq!(s.refused, Some(Refusal::OlderThanEvidence));
        // A match made at the newest evidence's time or later closes it.
        let inc = stored(step(Some(&persistent()), &matched(7_000), GRACE));
        assert_eq!(inc.state, State::Resolved);
        assert_eq!(inc.resolved_at, Some(at_ms(7_000)));
    }

    #[test]
    fn a_match_of_an_older_row_closes_nothing() {
        let cur = stored(step(None, &of_version(mismatch(0), 5), GRACE));
        assert_eq!(cur.db_version, Some(5));
        let s = step(Some(&cur), &of_version(matched(1_000), 4), GRACE);
        assert_eq!(s.refused, Some(Refusal::OlderDbVersion));
        let inc = stored(step(Some(&cur), &of_version(matched(1_000), 5), GRACE));
        assert_eq!(inc.state, State::Transient);
        // Mismatches keep the newest version seen, whatever order they come in.
        let inc = stored(step(Some(&cur), &of_version(mismatch(500), 3), GRACE));
        assert_eq!(inc.db_version, Some(5));
    }

    #[test]
    fn a_match_around_a_rewrite_is_credited_to_it_whoever_sees_it() {
        let mut cur = persistent(); // last seen at 7 s
        cur.rewrite = Some((Cause::Repair, at_ms(8_000)));
        // The sweep sees the repaired key agree before the repair's own check does.
        let inc = stored(step(Some(&cur), &matched(8_100), GRACE));
        assert_eq!(inc.resolution, Some(Cause::Repair));
        // Long after the rewrite, a match is the observer's own.
        let inc = stored(step(Some(&cur), &matched(60_000), GRACE));
        assert_eq!(inc.resolution, Some(Cause::Natural));
    }

    #[test]
    fn a_mismatch_older_than_the_last_resolution_opens_nothing() {
        let resolved = stored(step(Some(&persistent()), &matched(9_000), GRACE));
        let s = step(Some(&resolved), &mismatch(8_000), GRACE);
        assert_eq!(s.refused, Some(Refusal::BeforeResolution));
        assert!(s.is_noop());
        // One made at or after the resolution is a new divergence.
        let s = step(Some(&resolved), &mismatch(9_000), GRACE);
        assert_eq!(s.transition, transition(None, State::Detected));
    }

    #[test]
    fn huge_grace_saturates_instead_of_panicking() {
        let s = step(None, &mismatch(0), Duration::MAX);
        assert_eq!(s.schedule_confirm_at, Some(DateTime::<Utc>::MAX_UTC));
        let inc = stored(s);
        let inc = stored(step(Some(&inc), &mismatch(1_000_000), Duration::MAX));
        assert_eq!(inc.state, State::Detected);
    }

    #[test]
    fn names_round_trip_and_match_serde() {
        fn check<T>(all: &[T], as_str: fn(T) -> &'static str, parse: fn(&str) -> Option<T>)
        where
            T: Copy + PartialEq + std::fmt::Debug + serde::Serialize,
        {
            let mut seen = std::collections::HashSet::new();
            for &v in all {
                let name = as_str(v);
                assert!(seen.insert(name), "duplicate name {name}");
                assert_eq!(parse(name), Some(v));
                assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{name}\""));
            }
            assert_eq!(parse("nope"), None);
        }
        check(&State::ALL, State::as_str, State::parse);
        check(&Source::ALL, Source::as_str, Source::parse);
        check(&Cause::ALL, Cause::as_str, Cause::parse);
        assert_eq!(State::parse("Detected"), None);
    }

    #[test]
    fn only_detected_confirmed_persistent_are_open() {
        let open: Vec<State> = State::ALL.into_iter().filter(|s| s.is_open()).collect();
        assert_eq!(open, [State::Detected, State::Confirmed, State::Persistent]);
    }

    #[test]
    fn cause_for_source_defaults() {
        assert_eq!(Cause::for_source(Source::WriteCheck), Cause::Write);
        assert_eq!(Cause::for_source(Source::Cdc), Cause::Invalidation);
        assert_eq!(Cause::for_source(Source::Manual), Cause::Refresh);
        assert_eq!(Cause::for_source(Source::Confirm), Cause::Natural);
        assert_eq!(Cause::for_source(Source::Sweep), Cause::Natural);
    }

    #[test]
    fn incident_serde_round_trip() {
        let inc = stored(step(Some(&persistent()), &matched(9_000), GRACE));
        let json = serde_json::to_string(&inc).unwrap();
        assert!(json.contains("\"state\":\"resolved\""), "{json}");
        assert_eq!(serde_json::from_str::<Incident>(&json).unwrap(), inc);
    }

    // ---- property tests -------------------------------------------------

    const ALLOWED_EDGES: [(Option<State>, State); 6] = [
        (None, State::Detected),
        (Some(State::Detected), State::Transient),
        (Some(State::Detected), State::Confirmed),
        (Some(State::Confirmed), State::Persistent),
        (Some(State::Confirmed), State::Resolved),
        (Some(State::Persistent), State::Resolved),
    ];

    /// What a caller would persist: at most one open incident plus history.
    #[derive(Default)]
    struct Store {
        open: Option<Incident>,
        closed: Vec<Incident>,
    }

    impl Store {
        /// The key's latest row, open or not, the way a caller would load it;
        /// passing closed rows exercises the "closed counts as none" rule.
        fn current(&self) -> Option<&Incident> {
            self.open.as_ref().or(self.closed.last())
        }

        fn apply(&mut self, next: Incident) {
            if next.state.is_open() {
                self.open = Some(next);
            } else {
                self.open = None;
                self.closed.push(next);
            }
        }
    }

    #[derive(Debug, Clone)]
    struct Event {
        mismatch: bool,
        source: Source,
        cause: Cause,
        gap_ms: i64,
        back_ms: i64,
        /// Versions behind the newest row: a reader that saw an older row.
        version_lag: i64,
    }

    fn event() -> impl Strategy<Value = Event> {
        (
            any::<bool>(),
            prop::sample::select(Source::ALL.to_vec()),
            prop::sample::select(Cause::ALL.to_vec()),
            0i64..5_000,
            prop_oneof![9 => Just(0i64), 1 => 1i64..1_000],
            prop_oneof![9 => Just(0i64), 1 => 1i64..3],
        )
            .prop_map(
                |(mismatch, source, cause, gap_ms, back_ms, version_lag)| Event {
                    mismatch,
                    source,
                    cause,
                    gap_ms,
                    back_ms,
                    version_lag,
                },
            )
    }

    fn observations(events: &[Event]) -> Vec<Observation> {
        let mut clock = t0();
        events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                clock += chrono::Duration::milliseconds(e.gap_ms);
                Observation {
                    verdict: if e.mismatch {
                        Verdict::Mismatch
                    } else {
                        Verdict::Match
                    },
                    // Occasionally a little in the past: late delivery.
                    at: clock - chrono::Duration::milliseconds(e.back_ms),
                    db_version: Some(i as i64 - e.version_lag),
                    source: e.source,
                    cause: e.cause,
                }
            })
            .collect()
    }

    fn check_one(
        store: &Store,
        o: &Observation,
        grace: Duration,
        s: &Step,
    ) -> Result<(), TestCaseError> {
        let grace_c = chrono::Duration::from_std(grace).unwrap();
        let prev = store.open.as_ref();
        let prev_state = prev.map(|p| p.state);
        let last_resolution = store.closed.last().and_then(|c| c.resolved_at);

        // Out-of-order observations are refused exactly when the rules say so.
        let older_match = prev.is_some_and(|p| {
            o.at < p.last_seen_at
                || matches!((o.db_version, p.db_version), (Some(a), Some(b)) if a < b)
        });
        let should_refuse = match o.verdict {
            Verdict::Match => older_match,
            Verdict::Mismatch => prev.is_none() && last_resolution.is_some_and(|r| o.at < r),
        };
        prop_assert_eq!(s.refused.is_some(), should_refuse);
        if s.refused.is_some() {
            prop_assert!(s.is_noop());
            prop_assert_eq!(s.transition, None);
            prop_assert_eq!(s.schedule_confirm_at, None);
            return Ok(());
        }

        let Some(next) = &s.next else {
            prop_assert!(prev.is_none() && o.verdict == Verdict::Match);
            prop_assert_eq!(s.transition, None);
            prop_assert_eq!(s.schedule_confirm_at, None);
            return Ok(());
        };

        // Transition is present exactly when the stored state changed.
        let opened = prev.is_none();
        let state_changed = opened || prev_state != Some(next.state);
        prop_assert_eq!(s.transition.is_some(), state_changed);
        if let Some(t) = s.transition {
            prop_assert_eq!(t.from, prev_state);
            prop_assert_eq!(t.to, next.state);
            prop_assert!(
                ALLOWED_EDGES.contains(&(t.from, t.to)),
                "edge {:?} -> {:?} not allowed",
                t.from,
                t.to
            );
        }
        // Staying put is only allowed for Detected (before due) and Persistent.
        if !state_changed {
            prop_assert!(matches!(next.state, State::Detected | State::Persistent));
            prop_assert_eq!(o.verdict, Verdict::Mismatch);
        }
        // Verdicts drive the direction: matches close, mismatches keep open.
        prop_assert_eq!(next.state.is_open(), o.verdict == Verdict::Mismatch);

        // Confirmation is scheduled only when opening.
        prop_assert_eq!(s.schedule_confirm_at.is_some(), opened);

        match prev {
            None => {
                prop_assert_eq!(next.state, State::Detected);
                prop_assert_eq!(next.observations, 1);
                prop_assert_eq!(next.first_seen_at, o.at);
                prop_assert_eq!(next.last_seen_at, o.at);
                prop_assert_eq!(next.confirm_due_at, o.at + grace_c);
                prop_assert_eq!(s.schedule_confirm_at, Some(next.confirm_due_at));
            }
            Some(p) => {
                prop_assert_eq!(next.first_seen_at, p.first_seen_at);
                prop_assert_eq!(next.confirm_due_at, p.confirm_due_at);
                prop_assert!(next.last_seen_at >= p.last_seen_at);
                let expected = match o.verdict {
                    Verdict::Mismatch => p.observations + 1,
                    Verdict::Match => p.observations,
                };
                prop_assert_eq!(next.observations, expected);
                if p.state == State::Detected && o.verdict == Verdict::Mismatch {
                    prop_assert_eq!(next.state == State::Confirmed, o.at >= p.confirm_due_at);
                }
                if p.confirmed_at.is_some() {
                    prop_assert_eq!(next.confirmed_at, p.confirmed_at);
                }
            }
        }

        prop_assert!(next.last_seen_at >= next.first_seen_at);
        prop_assert_eq!(
            next.confirmed_at.is_some(),
            matches!(
                next.state,
                State::Confirmed | State::Persistent | State::Resolved
            )
        );
        if let Some(c) = next.confirmed_at {
            prop_assert!(c >= next.confirm_due_at);
            prop_assert!(c >= next.first_seen_at + grace_c);
        }
        prop_assert_eq!(next.resolved_at.is_some(), !next.state.is_open());
        prop_assert_eq!(next.resolution.is_some(), next.state == State::Resolved);
        if let Some(r) = next.resolved_at {
            prop_assert!(r >= next.first_seen_at);
            prop_assert!(r >= next.last_seen_at);
            prop_assert_eq!(r, o.at);
            prop_assert!(next.duration().unwrap() >= chrono::Duration::zero());
        }
        if next.state == State::Resolved {
            prop_assert_eq!(next.resolution, Some(o.cause));
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn random_sequences_respect_the_state_machine(
            events in prop::collection::vec(event(), 0..80),
            grace_ms in 0u64..5_000,
        ) {
            let grace = Duration::from_millis(grace_ms);
            let mut store = Store::default();
            let mut mismatches = 0i64;
            for o in observations(&events) {
                let s = step(store.current(), &o, grace);
                check_one(&store, &o, grace, &s)?;
                if o.verdict == Verdict::Mismatch && s.refused.is_none() {
                    mismatches += 1;
                }
                if let Some(next) = s.next {
                    store.apply(next);
                }
                prop_assert!(store.closed.iter().all(|c| !c.state.is_open()));
            }
            // Every applied mismatch is counted in exactly one incident.
            let counted: i64 = store
                .closed
                .iter()
                .chain(store.open.as_ref())
                .map(|i| i.observations)
                .sum();
            prop_assert_eq!(counted, mismatches);
        }

        #[test]
        fn closed_current_behaves_like_none(
            events in prop::collection::vec(event(), 1..40),
            grace_ms in 0u64..5_000,
            probe in event(),
        ) {
            let grace = Duration::from_millis(grace_ms);
            let mut store = Store::default();
            for o in observations(&events) {
                if let Some(next) = step(store.current(), &o, grace).next {
                    store.apply(next);
                }
            }
            // A probe made after everything so far: the closed history changes nothing.
            let mut probe = observations(&[probe])[0];
            probe.at = t0() + chrono::Duration::days(1);
            if store.open.is_none() {
                prop_assert_eq!(
                    step(store.current(), &probe, grace),
                    step(None, &probe, grace)
                );
            }
        }

        /// Two or more observers watch one key whose cache is stale over some stretches of
        /// time; their observations are delivered in any order. Whenever the newest
        /// observation delivered so far saw the divergence, an incident is open: no late
        /// match, whatever its order, closes it.
        #[test]
        fn no_interleaving_closes_an_incident_on_a_divergence_seen_last(
            truth in prop::collection::vec(any::<bool>(), 1..30),
            order in prop::collection::vec(any::<prop::sample::Index>(), 30),
            grace_ms in 0u64..5_000,
        ) {
            let grace = Duration::from_millis(grace_ms);
            // Observation i is made at i seconds and sees DB version i / 3.
            let mut pending: Vec<Observation> = truth
                .iter()
                .enumerate()
                .map(|(i, &stale)| Observation {
                    verdict: if stale { Verdict::Mismatch } else { Verdict::Match },
                    at: at_ms(i as i64 * 1_000),
                    db_version: Some(i as i64 / 3),
                    source: Source::Sweep,
                    cause: Cause::Natural,
                })
                .collect();
            let mut store = Store::default();
            let mut newest: Option<Observation> = None;
            for pick in order.iter().take(pending.len()) {
                let o = pending.remove(pick.index(pending.len()));
                if newest.is_none_or(|n| o.at > n.at) {
                    newest = Some(o);
                }
                if let Some(next) = step(store.current(), &o, grace).next {
                    store.apply(next);
                }
                if newest.is_some_and(|n| n.verdict == Verdict::Mismatch) {
                    prop_assert!(store.open.is_some(), "the newest observation saw a divergence");
                }
            }
        }
    }
}
