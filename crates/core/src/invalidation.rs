//! Change-driven invalidation: an entity with `on_change = "invalidate"` has the keys of every
//! captured change deleted at once, through a Redis Stream that any number of workers consume
//! as one group. This module is the stream's contract: the entry, and the names.
//!
//! The capture reader appends one entry per changed row (`XADD ... MAXLEN ~`), all of a flush
//! in one pipeline, before it acknowledges the slot: nothing committed is skipped across a
//! crash of the reader. Consumers read with `XREADGROUP`, `UNLINK` the keys, then `XACK`; an
//! entry left pending by a dead consumer is claimed by another after an idle time, and one
//! delivered too often, or unreadable, goes to the dead-letter stream with the reason.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The consumer group every worker joins.
pub const GROUP: &str = "stalewatch";
/// The stream's field holding the entry's JSON.
pub const FIELD: &str = "change";
/// The stream is trimmed to about this many entries (`MAXLEN ~`): far more than consumers
/// ever lag by, and a bound on memory if none runs.
pub const MAX_LEN: usize = 1_000_000;
/// An entry delivered this many times without being acknowledged is dead-lettered.
pub const MAX_DELIVERIES: u64 = 5;

/// A batched rule's defaults: a batch goes out once it holds this many changes, or once its
/// oldest change has waited this long.
pub const BATCH_COUNT: usize = 1000;
pub const BATCH_WITHIN: Duration = Duration::from_millis(50);

/// How an entry reached the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each transaction's entries as soon as it commits.
    #[default]
    Immediate,
    /// Changes collected per rule, merged into one entry.
    Batched,
}

/// When an invalidation rule's entries go to the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    #[default]
    Immediate,
    /// Collected until `count` changes or until the oldest has waited `within`; a
    /// transaction is never split, and a delete is never held.
    Batched { count: usize, within: Duration },
}

/// One changed row's keys to delete (or, batched, the merged keys of a rule's changes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// `schema.table`.
    pub table: String,
    /// `insert`, `update` or `delete`; `batch` for a batched rule's merged changes.
    pub op: String,
    /// The entity whose keys these are, or the `[[invalidate]]` rule's name.
    pub entity: String,
    /// The changed row's primary key, in the entity's `primary_key` order (the new row's
    /// values, the old row's for a delete). Empty for rules, which name no primary key, and
    /// for a batch.
    #[serde(default)]
    pub primary_key: Vec<String>,
    pub keys: Vec<String>,
    /// Redis globs whose every key is deleted (`SCAN MATCH`, then `UNLINK`), for rules whose
    /// key templates end in `*`. Absent in entries written before rules had patterns.
    #[serde(default)]
    pub patterns: Vec<String>,
    #[serde(default)]
    pub strategy: Mode,
    /// The transaction's commit record, as PostgreSQL prints LSNs (`16/B374D848`); of a
    /// batch, its oldest transaction's.
    pub commit_lsn: String,
    /// Commit time, microseconds since the Unix epoch; of a batch, its oldest transaction's,
    /// so the measured delay includes the time spent waiting in the batch.
    pub commit_time_us: i64,
}

impl Entry {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an entry is plain data")
    }

    /// The entry of a stream record's field, or why it is not one.
    pub fn from_json(text: &[u8]) -> Result<Entry, String> {
        serde_json::from_slice(text).map_err(|e| format!("not an invalidation entry: {e}"))
    }
}

/// The capture reader's batches of batched rules, one per rule: pure, the reader gives the
/// clock. Whole transactions go in, so a batch never splits one; the reader acknowledges the
/// slot no further than [`Batcher::oldest_lsn`], so a batch lost in a crash is read again.
#[derive(Debug, Default)]
pub struct Batcher {
    held: Vec<Held>,
}

#[derive(Debug)]
struct Held {
    entry: Entry,
    count: usize,
    within: Duration,
    changes: usize,
    since: Instant,
    first_lsn: u64,
    keys: HashSet<String>,
    patterns: HashSet<String>,
}

impl Batcher {
    pub fn new() -> Batcher {
        Batcher::default()
    }

    /// Takes one committed transaction's entries (commit record at `commit_lsn`), each with
    /// its rule's strategy. Returns the entries to publish now: immediate ones, and deletes,
    /// which are never held (a row that is gone should not be served from cache a moment
    /// longer). The rest join their rule's batch.
    pub fn add(
        &mut self,
        commit_lsn: u64,
        txn: Vec<(Entry, Strategy)>,
        now: Instant,
    ) -> Vec<Entry> {
        let mut now_out = Vec::new();
        for (entry, strategy) in txn {
            let (count, within) = match strategy {
                Strategy::Batched { count, within } if entry.op != "delete" => (count, within),
                _ => {
                    now_out.push(entry);
                    continue;
                }
            };
            let held = match self
                .held
                .iter_mut()
                .position(|h| h.entry.entity == entry.entity)
            {
                Some(i) => &mut self.held[i],
                None => {
                    self.held.push(Held {
                        entry: Entry {
                            op: "batch".into(),
                            primary_key: Vec::new(),
                            keys: Vec::new(),
                            patterns: Vec::new(),
                            strategy: Mode::Batched,
                            ..entry.clone()
                        },
                        count,
                        within,
                        changes: 0,
                        since: now,
                        first_lsn: commit_lsn,
                        keys: HashSet::new(),
                        patterns: HashSet::new(),
                    });
                    self.held.last_mut().expect("just pushed")
                }
            };
            held.changes += 1;
            for k in entry.keys {
                if held.keys.insert(k.clone()) {
                    held.entry.keys.push(k);
                }
            }
            for p in entry.patterns {
                if held.patterns.insert(p.clone()) {
                    held.entry.patterns.push(p);
                }
            }
        }
        now_out
    }

    /// The batches that are full or have waited long enough at `now`, taken.
    pub fn due(&mut self, now: Instant) -> Vec<Entry> {
        let (due, keep): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| h.changes >= h.count || now >= h.since + h.within);
        self.held = keep;
        due.into_iter().map(|h| h.entry).collect()
    }

    /// When the next batch falls due by time, if any is held.
    pub fn next_due(&self) -> Option<Instant> {
        self.held.iter().map(|h| h.since + h.within).min()
    }

    /// The commit LSN of the oldest transaction held: the slot may not be acknowledged past
    /// it.
    pub fn oldest_lsn(&self) -> Option<u64> {
        self.held.iter().map(|h| h.first_lsn).min()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reads_back_and_junk_is_refused() {
        let e = Entry {
            table: "public.users".into(),
            op: "update".into(),
            entity: "user_by_email".into(),
            primary_key: vec!["7".into()],
            keys: vec!["app:user:email:a@x".into(), "app:user:email:b@x".into()],
            patterns: vec!["app:cat:1:products:*".into()],
            strategy: Mode::Immediate,
            commit_lsn: "0/16B3748".into(),
            commit_time_us: 1_700_000_000_000_000,
        };
        assert_eq!(Entry::from_json(e.to_json().as_bytes()), Ok(e));
        assert!(Entry::from_json(b"{\"table\": 1}").is_err());
        assert!(Entry::from_json(b"\xff").is_err());
    }

    #[test]
    fn an_entry_of_before_patterns_still_reads() {
        let old = br#"{"table":"public.users","op":"update","entity":"u","keys":["k"],
            "commit_lsn":"0/1","commit_time_us":1}"#;
        let e = Entry::from_json(old).unwrap();
        assert!(e.patterns.is_empty());
        assert_eq!(e.strategy, Mode::Immediate);
        assert!(e.to_json().contains("\"strategy\":\"immediate\""));
    }

    fn change(rule: &str, op: &str, key: &str, pattern: &str) -> Entry {
        Entry {
            table: "public.products".into(),
            op: op.into(),
            entity: rule.into(),
            primary_key: Vec::new(),
            keys: vec![key.into()],
            patterns: vec![pattern.into()],
            strategy: Mode::Immediate,
            commit_lsn: "0/1".into(),
            commit_time_us: 7,
        }
    }

    const BATCHED: Strategy = Strategy::Batched {
        count: 3,
        within: Duration::from_millis(50),
    };

    #[test]
    fn a_batch_goes_out_when_full_merged_and_whole_transactions_at_a_time() {
        let t0 = Instant::now();
        let mut b = Batcher::new();
        let now = b.add(
            10,
            vec![(change("r", "update", "k1", "c:1:*"), BATCHED)],
            t0,
        );
        assert!(now.is_empty());
        assert_eq!(b.oldest_lsn(), Some(10));
        assert!(b.due(t0).is_empty());
        // A transaction of three rows takes the batch past its count: it goes in whole.
        let txn = (2..=4)
            .map(|i| (change("r", "update", &format!("k{i}"), "c:1:*"), BATCHED))
            .collect();
        assert!(b.add(20, txn, t0).is_empty());
        let due = b.due(t0);
        assert_eq!(due.len(), 1);
        let e = &due[0];
        assert_eq!(e.keys, vec!["k1", "k2", "k3", "k4"]);
        // The same pattern four times is scanned once.
        assert_eq!(e.patterns, vec!["c:1:*"]);
        assert_eq!((e.op.as_str(), e.strategy), ("batch", Mode::Batched));
        assert!(b.is_empty());
        assert_eq!(b.oldest_lsn(), None);
    }

    #[test]
    fn a_batch_goes_out_on_time_and_a_delete_or_an_immediate_rule_is_never_held() {
        let t0 = Instant::now();
        let mut b = Batcher::new();
        let out = b.add(
            10,
            vec![
                (change("r", "update", "k1", "c:1:*"), BATCHED),
                (change("r", "delete", "k2", "c:2:*"), BATCHED),
                (change("s", "update", "k3", "c:3:*"), Strategy::Immediate),
            ],
            t0,
        );
        assert_eq!(
            out.iter().map(|e| e.keys[0].as_str()).collect::<Vec<_>>(),
            vec!["k2", "k3"]
        );
        assert_eq!(b.next_due(), Some(t0 + Duration::from_millis(50)));
        assert!(b.due(t0 + Duration::from_millis(49)).is_empty());
        let due = b.due(t0 + Duration::from_millis(50));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].keys, vec!["k1"]);
        assert_eq!(b.next_due(), None);
    }

    #[test]
    fn each_rule_has_its_own_batch() {
        let t0 = Instant::now();
        let mut b = Batcher::new();
        b.add(10, vec![(change("r", "update", "k1", "p"), BATCHED)], t0);
        let slow = Strategy::Batched {
            count: 100,
            within: Duration::from_secs(1),
        };
        b.add(20, vec![(change("s", "update", "k2", "p"), slow)], t0);
        let due = b.due(t0 + Duration::from_millis(60));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].entity, "r");
        // The slot stays behind the transaction still held.
        assert_eq!(b.oldest_lsn(), Some(20));
    }
}
