//! Background jobs: each one's contract (name, queue, dedup policy, payload) declared in one
//! place, the way crates.io's `BackgroundJob` carries it as associated consts.
//!
//! Jobs carry batches of keys, never one key each: apalis-redis tops out at a few thousand
//! jobs per second and wedges when more than about 8,000 fall due at once
//! (docs/apalis-redis.md), so fewer, bigger jobs keep it in its comfort zone.

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use uuid::Uuid;

use crate::incident::Source;
use crate::keys::{Keys, ITEM_ENTITY};

/// How a job avoids doing the same work twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dedup {
    /// Duplicates are harmless: the handler re-reads the DB and the cache and feeds the state
    /// machine, whose conditional writes make a repeated observation count at most once more.
    Reobserve,
    /// At most one per incident: only the observer whose INSERT opened the incident (unique
    /// index, one open incident per key) schedules it, and the handler acts only while that
    /// incident is still Detected, so a re-delivered job is a no-op.
    PerIncident,
    /// A duplicate (a job re-run after its worker died mid-way) counts twice; rare, and it
    /// moves a ratio of thousands of samples by nothing visible.
    Tolerated,
}

pub trait Job: Serialize + DeserializeOwned + Send + Sync + Unpin + 'static {
    /// Name in logs and metrics.
    const NAME: &'static str;
    /// apalis queue name, under the key prefix (see `Keys::queue`).
    const QUEUE: &'static str;
    /// How duplicates are avoided.
    const DEDUP: Dedup;
}

/// Compare these cache keys of one entity with the rows behind them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckJob {
    /// The entity's name in the ENTITIES file.
    pub entity: String,
    pub keys: Vec<String>,
    pub source: Source,
}

impl CheckJob {
    /// A check of items of the built-in entity, the demo API's table, by id.
    pub fn for_items(keys: &Keys, ids: &[Uuid], source: Source) -> CheckJob {
        CheckJob {
            entity: ITEM_ENTITY.to_string(),
            keys: ids.iter().map(|id| keys.item(id)).collect(),
            source,
        }
    }
}

impl Job for CheckJob {
    const NAME: &'static str = "check";
    const QUEUE: &'static str = "check";
    const DEDUP: Dedup = Dedup::Reobserve;
}

/// Re-check incidents at the end of their grace period: still diverged means Confirmed,
/// consistent again means Transient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmJob {
    pub entity: String,
    pub targets: Vec<ConfirmTarget>,
    /// The latest confirm_due_at of the targets: the handler never checks before it.
    pub due_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmTarget {
    pub incident_id: i64,
    pub key: String,
}

impl Job for ConfirmJob {
    const NAME: &'static str = "confirm";
    const QUEUE: &'static str = "confirm";
    const DEDUP: Dedup = Dedup::PerIncident;
}

/// Probe keys for the consistency SLO (`crate::slo`) `window` after they changed: count
/// whether the cache agrees with the database, record nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SloJob {
    pub entity: String,
    pub keys: Vec<String>,
    /// The window, in milliseconds: the label the result is counted under.
    pub window_ms: u64,
    /// The latest commit of the keys' changes plus the window: the handler never probes
    /// before it.
    pub due_at: DateTime<Utc>,
    /// The windows still to probe after this one (milliseconds after the commit, ascending).
    /// The handler queues the next once this one is probed, so a change costs the capture
    /// reader one probe job rather than one per window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub later_ms: Vec<u64>,
}

impl SloJob {
    /// The probe of the next window, if one is left: the same keys, due that long after the
    /// same commit.
    pub fn into_next(self) -> Option<SloJob> {
        let (&window_ms, rest) = self.later_ms.split_first()?;
        let committed = self.due_at - chrono::Duration::milliseconds(self.window_ms as i64);
        Some(SloJob {
            due_at: committed + chrono::Duration::milliseconds(window_ms as i64),
            later_ms: rest.to_vec(),
            window_ms,
            entity: self.entity,
            keys: self.keys,
        })
    }
}

impl Job for SloJob {
    const NAME: &'static str = "slo";
    const QUEUE: &'static str = "slo";
    const DEDUP: Dedup = Dedup::Tolerated;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap()
    }

    #[test]
    fn an_slo_probe_hands_each_later_window_on_due_from_the_same_commit() {
        let first = SloJob {
            entity: "account".into(),
            keys: vec!["acct:1".into(), "acct:2".into()],
            window_ms: 1_000,
            due_at: at(1_000),
            later_ms: vec![10_000, 60_000],
        };
        let second = first.clone().into_next().expect("a second window");
        assert_eq!(
            (second.window_ms, second.due_at, &second.later_ms[..]),
            (10_000, at(10_000), &[60_000][..])
        );
        assert_eq!((&second.entity, &second.keys), (&first.entity, &first.keys));
        let third = second.into_next().expect("a third window");
        assert_eq!((third.window_ms, third.due_at), (60_000, at(60_000)));
        assert!(third.later_ms.is_empty());
        assert_eq!(third.into_next(), None);
    }

    #[test]
    fn an_slo_job_queued_before_later_windows_existed_still_reads_as_a_single_window() {
        let queued = r#"{"entity":"account","keys":["acct:1"],"window_ms":10000,
                         "due_at":"2026-11-24T12:00:10Z"}"#;
        let job: SloJob = serde_json::from_str(queued).unwrap();
        assert_eq!((job.window_ms, job.later_ms.len()), (10_000, 0));
        assert_eq!(job.into_next(), None);
    }
}
