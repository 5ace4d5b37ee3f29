//! The sharded sweep's pure half: how a round splits each entity's rows into ranges of its
//! walk columns (the primary key, or a set's key columns), and what a round's record in Redis
//! says about who swept what, how far, and how many rows. The worker does the I/O
//! (`stalewatch_worker::round`).
//!
//! A round is a list of shards, each leased to one worker at a time. A shard's progress (its
//! cursor, and how many rows it has counted) is written in one atomic step per page, and only
//! by the lease's holder, so a worker that takes over a dead worker's shard resumes after the
//! last page the dead one recorded: each row is counted once per round, whoever swept it.
//!
//! The ranges only decide how evenly the work is spread, never whether it is all done: any
//! increasing list of boundaries splits the walk order into ranges that cover every row once.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// One unit of a round, swept by one worker at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub entity: String,
    pub part: Part,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "walk", rename_all = "snake_case")]
pub enum Part {
    /// The rows whose walk columns are above `after` (none: from the first row) and at most
    /// `until` (none: to the last), as text in walk-column order.
    Rows {
        after: Option<Vec<String>>,
        until: Option<Vec<String>>,
    },
    /// The key-side pass (SCAN) over the entity's keys. A SCAN cursor covers the whole
    /// keyspace, so this pass is not split: it is one shard of its own.
    Keys,
}

impl Part {
    /// Where a row walk of this part goes on from checkpoint `at`: after its last recorded
    /// page, or after the part's own start (none: from the first row).
    pub fn rows_from(&self, at: &Checkpoint) -> Option<Vec<String>> {
        if !at.cursor.is_empty() {
            return Some(at.cursor.clone());
        }
        match self {
            Part::Rows { after, .. } => after.clone(),
            Part::Keys => None,
        }
    }
}

/// Sampled rows per wanted shard. `TABLESAMPLE SYSTEM` takes whole table pages, and where
/// ids grow with insertion (serials, UUIDv7) a page's rows are neighbours in key order, so a
/// page counts as one point, not 60: 200 rows a shard left 1M rows split 30k to 310k into 8
/// ranges. 5,000 (about 80 pages) keeps ranges within some 10% of each other, and sorting
/// 40,000 sampled keys once a round costs PostgreSQL tens of milliseconds.
const SAMPLE_PER_SHARD: u64 = 5_000;

/// How many rows the planner samples for `shards` ranges.
pub fn sample_size(shards: usize) -> u64 {
    (shards as u64 * SAMPLE_PER_SHARD).max(20_000)
}

/// The `TABLESAMPLE SYSTEM` percentage that yields about `wanted` rows from a table of about
/// `rows` rows (PostgreSQL's estimate; negative when the table was never analysed, and then
/// the planner counts). Small tables are read whole.
pub fn sample_percent(rows: f64, wanted: u64) -> f64 {
    if rows.is_nan() || rows <= wanted as f64 {
        return 100.0;
    }
    (wanted as f64 * 100.0 / rows).clamp(0.000_1, 100.0)
}

/// Up to `shards - 1` boundaries that split `sample` (walk-column values, sorted in walk
/// order) into ranges of about equal size: the values at the quantiles, each once.
pub fn boundaries(sample: &[Vec<String>], shards: usize) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    if sample.is_empty() {
        return out;
    }
    for i in 1..shards {
        let at = &sample[i * sample.len() / shards];
        if out.last() != Some(at) {
            out.push(at.clone());
        }
    }
    out
}

/// One entity's shards: the ranges between `bounds` (increasing), then its key-side pass.
pub fn entity_shards(entity: &str, bounds: Vec<Vec<String>>) -> Vec<Shard> {
    let mut shards = Vec::with_capacity(bounds.len() + 2);
    let mut after = None;
    for bound in bounds {
        shards.push(Shard {
            entity: entity.to_string(),
            part: Part::Rows {
                after: after.replace(bound.clone()),
                until: Some(bound),
            },
        });
    }
    shards.push(Shard {
        entity: entity.to_string(),
        part: Part::Rows { after, until: None },
    });
    shards.push(Shard {
        entity: entity.to_string(),
        part: Part::Keys,
    });
    shards
}

/// How far a shard's walk got: the last recorded row's walk-column values (rows), or the
/// SCAN cursor (keys) and, on a cluster, the primary it belongs to (`crate::slots::ScanAt`:
/// the lowest slot the primary serves and its address). Empty/zero: not started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cursor: Vec<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub scan: u64,
    #[serde(default, skip_serializing_if = "is_zero_slot")]
    pub scan_slot: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scan_node: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_slot(n: &u16) -> bool {
    *n == 0
}

impl Checkpoint {
    /// Where a key-side walk goes on from.
    pub fn scan_at(&self) -> crate::slots::ScanAt {
        crate::slots::ScanAt {
            slot: self.scan_slot,
            node: self.scan_node.clone(),
            cursor: self.scan,
        }
    }

    /// The checkpoint of a key-side walk about to go on at `at`.
    pub fn scanning(at: &crate::slots::ScanAt) -> Checkpoint {
        Checkpoint {
            scan: at.cursor,
            scan_slot: at.slot,
            scan_node: at.node.clone(),
            ..Checkpoint::default()
        }
    }
}

/// A shard's record in its round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub at: Checkpoint,
    /// Rows (keys, for a key-side shard) counted so far, one page at a time with `at`.
    pub items: u64,
    pub done: bool,
    /// The worker that recorded the last page.
    pub by: Option<String>,
}

/// A round as its Redis hash holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    pub id: u64,
    /// Unix milliseconds.
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub shards: Vec<Shard>,
    pub progress: Vec<Progress>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoundError {
    #[error("the sweep round record has no {0}")]
    Missing(String),
    #[error("the sweep round record's {field} cannot be read: {why}")]
    Unreadable { field: String, why: String },
}

/// The hash fields of shard `i`: its checkpoint, count, end and last writer.
pub fn at_field(i: usize) -> String {
    format!("s{i}:at")
}
pub fn items_field(i: usize) -> String {
    format!("s{i}:items")
}
pub fn done_field(i: usize) -> String {
    format!("s{i}:done")
}
pub fn by_field(i: usize) -> String {
    format!("s{i}:by")
}

impl Round {
    /// The fields a new round is written with.
    pub fn fields(id: u64, started_ms: i64, shards: &[Shard]) -> Vec<(String, String)> {
        vec![
            ("id".into(), id.to_string()),
            ("started_ms".into(), started_ms.to_string()),
            ("shards".into(), shards.len().to_string()),
            ("done".into(), "0".into()),
            (
                "plan".into(),
                serde_json::to_string(shards).expect("shards serialise"),
            ),
        ]
    }

    /// Reads a round back from its hash (`HGETALL`).
    pub fn parse(fields: &HashMap<String, String>) -> Result<Round, RoundError> {
        let get = |f: &str| fields.get(f).ok_or_else(|| RoundError::Missing(f.into()));
        let bad = |f: &str, why: String| RoundError::Unreadable {
            field: f.into(),
            why,
        };
        let number = |f: &str| -> Result<i64, RoundError> {
            get(f)?.parse().map_err(|e| bad(f, format!("{e}")))
        };
        let shards: Vec<Shard> =
            serde_json::from_str(get("plan")?).map_err(|e| bad("plan", e.to_string()))?;
        let progress = (0..shards.len())
            .map(|i| {
                let at = match fields.get(&at_field(i)) {
                    Some(s) => {
                        serde_json::from_str(s).map_err(|e| bad(&at_field(i), e.to_string()))?
                    }
                    None => Checkpoint::default(),
                };
                let items = match fields.get(&items_field(i)) {
                    Some(s) => s
                        .parse()
                        .map_err(|e| bad(&items_field(i), format!("{e}")))?,
                    None => 0,
                };
                Ok(Progress {
                    at,
                    items,
                    done: fields.contains_key(&done_field(i)),
                    by: fields.get(&by_field(i)).cloned(),
                })
            })
            .collect::<Result<Vec<_>, RoundError>>()?;
        Ok(Round {
            id: number("id")? as u64,
            started_ms: number("started_ms")?,
            ended_ms: fields
                .contains_key("ended_ms")
                .then(|| number("ended_ms"))
                .transpose()?,
            shards,
            progress,
        })
    }

    /// Rows counted so far, over every entity's row shards.
    pub fn rows(&self) -> u64 {
        self.shards
            .iter()
            .zip(&self.progress)
            .filter(|(s, _)| matches!(s.part, Part::Rows { .. }))
            .map(|(_, p)| p.items)
            .sum()
    }

    pub fn done(&self) -> usize {
        self.progress.iter().filter(|p| p.done).count()
    }

    /// The share of shards finished, 0 to 1.
    pub fn coverage(&self) -> f64 {
        if self.shards.is_empty() {
            1.0
        } else {
            self.done() as f64 / self.shards.len() as f64
        }
    }

    /// The shards still to sweep, in the order a worker tries to lease them: those that were
    /// started first (their worker may be gone, and the round waits on them), then the rest
    /// from `offset` on, so workers that arrive together spread instead of all asking for
    /// the same shard.
    pub fn open(&self, offset: usize) -> Vec<usize> {
        let n = self.shards.len();
        let (started, fresh): (Vec<usize>, Vec<usize>) = (0..n)
            .map(|i| (i + offset) % n.max(1))
            .filter(|&i| !self.progress[i].done)
            .partition(|&i| self.progress[i].by.is_some());
        started.into_iter().chain(fresh).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(n: u32) -> Vec<String> {
        vec![format!("{n:04}")]
    }

    #[test]
    fn boundaries_split_a_sample_into_about_equal_ranges() {
        let sample: Vec<Vec<String>> = (0..1000).map(v).collect();
        assert_eq!(boundaries(&sample, 4), vec![v(250), v(500), v(750)]);
        assert_eq!(boundaries(&sample, 1), Vec::<Vec<String>>::new());
        assert!(boundaries(&[], 4).is_empty(), "an empty table is one range");
    }

    #[test]
    fn repeated_sample_values_give_fewer_ranges_never_empty_duplicates() {
        let sample: Vec<Vec<String>> = [1, 1, 1, 1, 1, 1, 2, 3].into_iter().map(v).collect();
        assert_eq!(boundaries(&sample, 4), vec![v(1), v(2)]);
        // More shards than sampled rows.
        let small: Vec<Vec<String>> = (0..3).map(v).collect();
        assert_eq!(boundaries(&small, 8), vec![v(0), v(1), v(2)]);
    }

    #[test]
    fn an_entity_s_ranges_chain_and_cover_everything_then_its_keys() {
        let shards = entity_shards("item", vec![v(10), v(20)]);
        let parts: Vec<Part> = shards.into_iter().map(|s| s.part).collect();
        assert_eq!(
            parts,
            vec![
                Part::Rows {
                    after: None,
                    until: Some(v(10))
                },
                Part::Rows {
                    after: Some(v(10)),
                    until: Some(v(20))
                },
                Part::Rows {
                    after: Some(v(20)),
                    until: None
                },
                Part::Keys,
            ]
        );
        let alone: Vec<Part> = entity_shards("item", vec![])
            .into_iter()
            .map(|s| s.part)
            .collect();
        assert_eq!(
            alone,
            vec![
                Part::Rows {
                    after: None,
                    until: None
                },
                Part::Keys
            ]
        );
    }

    #[test]
    fn the_sample_rate_aims_at_the_wanted_rows() {
        assert_eq!(sample_percent(500.0, 1000), 100.0);
        assert_eq!(sample_percent(f64::NAN, 1000), 100.0);
        assert!((sample_percent(1_000_000.0, 1000) - 0.1).abs() < 1e-9);
        assert_eq!(sample_percent(1e15, 1000), 0.000_1);
        assert_eq!(sample_size(2), 20_000);
        assert_eq!(sample_size(8), 40_000);
    }

    fn round() -> (HashMap<String, String>, Vec<Shard>) {
        let shards = entity_shards("item", vec![v(10)]);
        let fields: HashMap<String, String> =
            Round::fields(7, 1_000, &shards).into_iter().collect();
        (fields, shards)
    }

    #[test]
    fn a_round_reads_back_with_its_progress() {
        // Where a worker that takes shard `i` starts, as the sweep's walk works it out.
        let resume_at = |r: &Round, i: usize| r.shards[i].part.rows_from(&r.progress[i].at);
        let (mut fields, shards) = round();
        let r = Round::parse(&fields).unwrap();
        assert_eq!((r.id, r.started_ms, r.ended_ms), (7, 1_000, None));
        assert_eq!(r.shards, shards);
        assert_eq!(r.rows(), 0);
        assert_eq!(r.open(0), vec![0, 1, 2]);
        assert_eq!(
            resume_at(&r, 1),
            Some(v(10)),
            "a fresh shard starts at its bound"
        );

        fields.insert(at_field(1), r#"{"cursor":["0015"]}"#.into());
        fields.insert(items_field(1), "5".into());
        fields.insert(by_field(1), "w1".into());
        fields.insert(at_field(0), r#"{"cursor":["0010"]}"#.into());
        fields.insert(items_field(0), "10".into());
        fields.insert(done_field(0), "2000".into());
        fields.insert(items_field(2), "40".into());
        fields.insert("ended_ms".into(), "3000".into());
        let r = Round::parse(&fields).unwrap();
        assert_eq!(r.rows(), 15, "keys scanned are not rows");
        assert_eq!(r.done(), 1);
        assert!((r.coverage() - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(r.ended_ms, Some(3000));
        assert_eq!(resume_at(&r, 1), Some(vec!["0015".to_string()]));
        assert_eq!(
            r.open(2),
            vec![1, 2],
            "the started shard first: its worker may be gone"
        );
    }

    #[test]
    fn a_damaged_round_says_which_field() {
        let (mut fields, _) = round();
        fields.insert(items_field(0), "many".into());
        assert!(matches!(
            Round::parse(&fields),
            Err(RoundError::Unreadable { field, .. }) if field == "s0:items"
        ));
        fields.remove("plan");
        assert_eq!(
            Round::parse(&fields),
            Err(RoundError::Missing("plan".into()))
        );
    }

    #[test]
    fn checkpoints_serialise_compactly() {
        assert_eq!(serde_json::to_string(&Checkpoint::default()).unwrap(), "{}");
        let c: Checkpoint = serde_json::from_str(r#"{"scan":12}"#).unwrap();
        assert_eq!(c.scan, 12);
        assert_eq!(c.scan_at().slot, 0);
        // A cluster's: the primary too, and back.
        let at = crate::slots::ScanAt {
            slot: 5461,
            node: "10.0.0.2:7001".into(),
            cursor: 99,
        };
        let c = Checkpoint::scanning(&at);
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(
            text,
            r#"{"scan":99,"scan_slot":5461,"scan_node":"10.0.0.2:7001"}"#
        );
        let back: Checkpoint = serde_json::from_str(&text).unwrap();
        assert_eq!(back.scan_at(), at);
    }
}
