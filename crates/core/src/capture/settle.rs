//! Holding changed keys back for the settle delay, and how far the slot may be acknowledged.
//!
//! A key is due `delay` after its latest change, so a burst of writes to one key makes one
//! check after the burst; a key written without pause is still checked `MAX_POSTPONE` delays
//! after its first pending change, so it cannot starve.
//!
//! Positions are LSNs of commit records (`Begin.final_lsn`). PostgreSQL skips, on restart, the
//! transactions whose commit record starts before the slot's confirmed position, so
//! acknowledging the commit LSN of the oldest transaction that still has a key waiting keeps
//! that transaction (and everything after it) for the next reader.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A key written without pause is checked at most this many delays after its first change.
const MAX_POSTPONE: u32 = 10;

#[derive(Debug)]
pub struct Settle {
    delay: Duration,
    /// Pending keys: (entity, key) -> state.
    pending: HashMap<(usize, String), Pending>,
    /// Every (due, entity, key) in the order they were added; a key postponed later has a
    /// newer entry, and its older ones are skipped.
    queue: VecDeque<(Instant, usize, String)>,
    /// The commit LSNs of the pending keys' oldest changes, counted.
    oldest: BTreeMap<u64, usize>,
    /// The end of the last transaction added (the position to acknowledge when nothing
    /// waits).
    processed: Option<u64>,
}

#[derive(Debug)]
struct Pending {
    due: Instant,
    first_seen: Instant,
    first_lsn: u64,
    first_commit_us: i64,
}

/// A committed transaction's position and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// The LSN of its commit record.
    pub lsn: u64,
    /// The position just past the commit record.
    pub end_lsn: u64,
    /// Microseconds since the PostgreSQL epoch.
    pub time_us: i64,
}

/// Keys whose delay is over, per entity, in the order they were first changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    pub by_entity: BTreeMap<usize, Vec<String>>,
    /// The commit time of each key's oldest change (any order), to measure the delay.
    pub commit_us: Vec<i64>,
}

impl Due {
    pub fn is_empty(&self) -> bool {
        self.by_entity.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_entity.values().map(Vec::len).sum()
    }
}

impl Settle {
    pub fn new(delay: Duration) -> Settle {
        Settle {
            delay,
            pending: HashMap::new(),
            queue: VecDeque::new(),
            oldest: BTreeMap::new(),
            processed: None,
        }
    }

    /// Records the keys of one committed transaction: `commit_lsn` is its commit record's
    /// LSN, `end_lsn` the position just past it, `commit_us` its commit time.
    pub fn add(
        &mut self,
        keys: impl IntoIterator<Item = (usize, String)>,
        commit: Commit,
        now: Instant,
    ) {
        let Commit {
            lsn: commit_lsn,
            end_lsn,
            time_us,
        } = commit;
        for (entity, key) in keys {
            let id = (entity, key);
            let due = match self.pending.get_mut(&id) {
                Some(p) => {
                    let cap = p.first_seen + self.delay * MAX_POSTPONE;
                    p.due = (now + self.delay).min(cap).max(p.due);
                    p.due
                }
                None => {
                    let due = now + self.delay;
                    *self.oldest.entry(commit_lsn).or_default() += 1;
                    self.pending.insert(
                        id.clone(),
                        Pending {
                            due,
                            first_seen: now,
                            first_lsn: commit_lsn,
                            first_commit_us: time_us,
                        },
                    );
                    due
                }
            };
            self.queue.push_back((due, id.0, id.1));
        }
        self.processed = Some(self.processed.map_or(end_lsn, |p| p.max(end_lsn)));
    }

    /// Takes the keys due at `now`, at most `limit` of them.
    pub fn due(&mut self, now: Instant, limit: usize) -> Due {
        let mut out = Due::default();
        let mut taken = 0;
        while taken < limit {
            let Some((due, _, _)) = self.queue.front() else {
                break;
            };
            if *due > now {
                break;
            }
            let (due, entity, key) = self.queue.pop_front().expect("front exists");
            let id = (entity, key);
            // An older entry of a key that was postponed (or already taken): skip it.
            let Some(p) = self.pending.get(&id) else {
                continue;
            };
            if p.due != due {
                continue;
            }
            let p = self.pending.remove(&id).expect("present");
            if let Some(n) = self.oldest.get_mut(&p.first_lsn) {
                *n -= 1;
                if *n == 0 {
                    self.oldest.remove(&p.first_lsn);
                }
            }
            out.by_entity.entry(id.0).or_default().push(id.1);
            out.commit_us.push(p.first_commit_us);
            taken += 1;
        }
        out
    }

    /// When the next key falls due, if any waits.
    pub fn next_due(&self) -> Option<Instant> {
        // Skipped entries may be at the front; their time is earlier than any real one, so
        // at worst this wakes the caller early once.
        self.queue.front().map(|(due, _, _)| *due)
    }

    pub fn waiting(&self) -> usize {
        self.pending.len()
    }

    /// How far the slot may be acknowledged: the commit LSN of the oldest transaction with a
    /// key still waiting, else the end of the last transaction added.
    pub fn safe_lsn(&self) -> Option<u64> {
        match self.oldest.keys().next() {
            Some(&lsn) => Some(lsn),
            None => self.processed,
        }
    }

    /// Nothing waits: every transaction added is handed over.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_millis(100);

    fn at(lsn: u64, end_lsn: u64) -> Commit {
        Commit {
            lsn,
            end_lsn,
            time_us: 0,
        }
    }

    fn keys(entity: usize, names: &[&str]) -> Vec<(usize, String)> {
        names.iter().map(|n| (entity, n.to_string())).collect()
    }

    #[test]
    fn a_key_is_due_after_the_delay_and_only_once() {
        let t0 = Instant::now();
        let mut s = Settle::new(D);
        s.add(keys(0, &["a", "b"]), at(10, 20), t0);
        assert!(s.due(t0 + D / 2, 100).is_empty());
        let due = s.due(t0 + D, 100);
        assert_eq!(due.by_entity[&0], ["a", "b"]);
        assert!(s.due(t0 + D * 5, 100).is_empty());
        assert!(s.is_idle());
    }

    #[test]
    fn many_changes_to_one_key_within_the_delay_make_one_check() {
        let t0 = Instant::now();
        let mut s = Settle::new(D);
        for i in 0..5u32 {
            let lsn = 10 + u64::from(i) * 10;
            s.add(keys(0, &["a"]), at(lsn, lsn + 5), t0 + D / 10 * i);
        }
        // Postponed to 100 ms after the last change.
        assert!(s.due(t0 + D, 100).is_empty());
        let due = s.due(t0 + D / 10 * 4 + D, 100);
        assert_eq!(due.len(), 1);
        assert!(s.is_idle());
    }

    #[test]
    fn a_key_written_without_pause_is_still_checked() {
        let t0 = Instant::now();
        let mut s = Settle::new(D);
        let mut checked = 0;
        for i in 0..100u32 {
            let now = t0 + D / 2 * i;
            s.add(
                keys(0, &["hot"]),
                at(u64::from(i) * 10 + 1, u64::from(i) * 10 + 5),
                now,
            );
            checked += s.due(now, 100).len();
        }
        assert!(checked >= 4, "checked {checked} times in 50 delays");
    }

    #[test]
    fn the_slot_is_acknowledged_only_up_to_the_oldest_waiting_change() {
        let t0 = Instant::now();
        let mut s = Settle::new(D);
        assert_eq!(s.safe_lsn(), None);
        s.add(keys(0, &["a"]), at(100, 110), t0);
        s.add(keys(1, &["b"]), at(200, 210), t0 + D / 2);
        assert_eq!(s.safe_lsn(), Some(100), "a's transaction must be re-read");
        s.due(t0 + D, 100);
        assert_eq!(s.safe_lsn(), Some(200));
        // A later change to a waiting key keeps its oldest position.
        s.add(keys(1, &["b"]), at(300, 310), t0 + D);
        assert_eq!(s.safe_lsn(), Some(200));
        s.due(t0 + D * 3, 100);
        assert_eq!(s.safe_lsn(), Some(310), "all handed over: the last end");
    }

    #[test]
    fn due_keys_come_out_in_bounded_batches() {
        let t0 = Instant::now();
        let mut s = Settle::new(D);
        let names: Vec<String> = (0..2500).map(|i| format!("k{i}")).collect();
        s.add(names.iter().map(|n| (0, n.clone())), at(1, 2), t0);
        assert_eq!(s.due(t0 + D, 1000).len(), 1000);
        assert_eq!(s.due(t0 + D, 1000).len(), 1000);
        assert_eq!(s.due(t0 + D, 1000).len(), 500);
        assert_eq!(s.waiting(), 0);
    }
}
