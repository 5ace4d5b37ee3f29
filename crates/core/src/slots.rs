//! Redis Cluster's key space, as plain data: which of the 16,384 slots a key hashes to, which
//! primary serves a slot (`CLUSTER SLOTS`, read into a [`Topology`]), how a batch of keys splits
//! into one group per primary, and the order in which a walk over every primary's keys (SCAN
//! is per node) visits them and resumes.
//!
//! The I/O is in `crate::cluster`; everything here is pure and tested without a server.

use std::{collections::BTreeMap, fmt};

/// Slots of a Redis Cluster.
pub const SLOTS: u16 = 16_384;

/// CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, as Redis Cluster hashes keys.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The part of `key` that is hashed: the text between the first `{` and the first `}` after
/// it, when that is not empty (a hash tag), else the whole key.
pub fn hashed_part(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The slot of `key`.
pub fn slot(key: &[u8]) -> u16 {
    crc16(hashed_part(key)) % SLOTS
}

/// A node of the cluster, as `CLUSTER SLOTS` names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Which primary serves each slot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topology {
    /// `(first slot, last slot, primary)`, by first slot, not overlapping.
    ranges: Vec<(u16, u16, Node)>,
}

impl Topology {
    pub fn new(mut ranges: Vec<(u16, u16, Node)>) -> Topology {
        ranges.sort_by_key(|r| r.0);
        Topology { ranges }
    }

    /// Reads a `CLUSTER SLOTS` reply: `[[first, last, [host, port, id, ...], replica...], ...]`.
    /// A primary announced without a host (`""`, or `?`) is at `default_host`, the node that
    /// answered, as the command's documentation says.
    pub fn from_cluster_slots(
        reply: &redis::Value,
        default_host: &str,
    ) -> Result<Topology, String> {
        use redis::Value;
        let int = |v: &Value| match v {
            Value::Int(n) => u16::try_from(*n).ok(),
            _ => None,
        };
        let text = |v: &Value| match v {
            Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        };
        let Value::Array(entries) = reply else {
            return Err(format!("CLUSTER SLOTS answered {reply:?}, not an array"));
        };
        let mut ranges = Vec::with_capacity(entries.len());
        for entry in entries {
            let parsed = (|| {
                let Value::Array(parts) = entry else {
                    return None;
                };
                let (first, last) = (int(parts.first()?)?, int(parts.get(1)?)?);
                let Value::Array(primary) = parts.get(2)? else {
                    return None;
                };
                let host = text(primary.first()?)?;
                let port = int(primary.get(1)?)?;
                let host = match host.as_str() {
                    "" | "?" => default_host.to_string(),
                    _ => host,
                };
                (first <= last && last < SLOTS).then_some((first, last, Node { host, port }))
            })();
            ranges.push(parsed.ok_or_else(|| format!("a CLUSTER SLOTS entry {entry:?}"))?);
        }
        Ok(Topology::new(ranges))
    }

    /// The primary serving `slot`, if any does.
    pub fn owner(&self, slot: u16) -> Option<&Node> {
        let i = self.ranges.partition_point(|r| r.0 <= slot);
        let (_, last, node) = self.ranges.get(i.checked_sub(1)?)?;
        (slot <= *last).then_some(node)
    }

    /// Whether every slot has a primary (a cluster that serves all of its keys).
    pub fn is_complete(&self) -> bool {
        let mut next: u32 = 0;
        for (first, last, _) in &self.ranges {
            if u32::from(*first) != next {
                return false;
            }
            next = u32::from(*last) + 1;
        }
        next == u32::from(SLOTS)
    }

    /// Every primary with the lowest slot it serves, by that slot: the order in which a walk
    /// over every primary visits them. A failover keeps a primary's slots, so its place too.
    pub fn primaries(&self) -> Vec<(u16, Node)> {
        let mut lowest: BTreeMap<&Node, u16> = BTreeMap::new();
        for (first, _, node) in &self.ranges {
            let at = lowest.entry(node).or_insert(*first);
            *at = (*at).min(*first);
        }
        let mut out: Vec<(u16, Node)> = lowest.into_iter().map(|(n, s)| (s, n.clone())).collect();
        out.sort();
        out
    }

    /// Splits `keys` by the primary serving each: one group per primary, each with the indexes
    /// of its keys (in order), and the keys whose slot has no primary under `None`.
    pub fn group<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k [u8]>,
    ) -> Vec<(Option<Node>, Vec<usize>)> {
        let mut groups: BTreeMap<Option<&Node>, Vec<usize>> = BTreeMap::new();
        for (i, key) in keys.into_iter().enumerate() {
            groups.entry(self.owner(slot(key))).or_default().push(i);
        }
        groups
            .into_iter()
            .map(|(node, idx)| (node.cloned(), idx))
            .collect()
    }
}

/// Where a walk over every primary's keys stands: the primary it is on, named by the lowest
/// slot it serves and by its address when `cursor` was read from it, and the SCAN cursor there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanAt {
    pub slot: u16,
    pub node: String,
    pub cursor: u64,
}

/// What to SCAN next, from `at`: the primary serving `at.slot`, from `at.cursor` if the
/// cursor was read from that same node, else from 0 (after a failover or a resharding a cursor
/// of another node means nothing: the node is scanned again whole, which may repeat keys but
/// skips none of its own). `None`: no primary serves that slot.
pub fn scan_from(primaries: &[(u16, Node)], topology: &Topology, at: &ScanAt) -> Option<ScanAt> {
    let node = topology.owner(at.slot)?;
    let lowest = primaries.iter().find(|(_, n)| n == node)?.0;
    let same = node.to_string() == at.node;
    Some(ScanAt {
        slot: lowest,
        node: node.to_string(),
        cursor: if same { at.cursor } else { 0 },
    })
}

/// The primary after the one whose lowest slot is `slot`, from its start; `None` after the last.
pub fn next_primary(primaries: &[(u16, Node)], slot: u16) -> Option<ScanAt> {
    primaries
        .iter()
        .find(|(lowest, _)| *lowest > slot)
        .map(|(lowest, node)| ScanAt {
            slot: *lowest,
            node: node.to_string(),
            cursor: 0,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    fn node(port: u16) -> Node {
        Node {
            host: "127.0.0.1".into(),
            port,
        }
    }

    fn three() -> Topology {
        Topology::new(vec![
            (10_923, 16_383, node(7002)),
            (0, 5_460, node(7000)),
            (5_461, 10_922, node(7001)),
        ])
    }

    #[test]
    fn slots_are_redis_clusters() {
        // The check value of CRC16/XMODEM, and slots Redis itself reports (CLUSTER KEYSLOT).
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12_182);
        assert_eq!(slot(b"bar"), 5_061);
        assert_eq!(slot(b""), 0);
        // A hash tag: only the text in the first {...} counts, unless it is empty.
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"{user1000}.followers"), slot(b"{user1000}.following"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
        assert_eq!(hashed_part(b"no-tag}{"), b"no-tag}{");
    }

    #[test]
    fn a_cluster_slots_reply_is_read_with_the_answering_host_for_an_unnamed_primary() {
        let entry = |first: i64, last: i64, host: &str, port: i64| {
            Value::Array(vec![
                Value::Int(first),
                Value::Int(last),
                Value::Array(vec![
                    Value::BulkString(host.as_bytes().to_vec()),
                    Value::Int(port),
                    Value::BulkString(b"id".to_vec()),
                ]),
                // A replica: not a primary.
                Value::Array(vec![
                    Value::BulkString(b"10.0.0.9".to_vec()),
                    Value::Int(7100),
                ]),
            ])
        };
        let reply = Value::Array(vec![
            entry(5_461, 16_383, "10.0.0.2", 7001),
            entry(0, 5_460, "", 7000),
        ]);
        let t = Topology::from_cluster_slots(&reply, "seed.example").unwrap();
        assert!(t.is_complete());
        assert_eq!(
            t.owner(0),
            Some(&Node {
                host: "seed.example".into(),
                port: 7000
            })
        );
        assert_eq!(t.owner(16_383).unwrap().to_string(), "10.0.0.2:7001");
        assert_eq!(t.primaries().len(), 2);
        assert!(Topology::from_cluster_slots(&Value::Nil, "x").is_err());
        let bad = Value::Array(vec![Value::Array(vec![Value::Int(9), Value::Int(1)])]);
        assert!(Topology::from_cluster_slots(&bad, "x").is_err());
    }

    #[test]
    fn every_slot_has_its_owner_and_gaps_have_none() {
        let t = three();
        assert!(t.is_complete());
        assert_eq!(t.owner(0), Some(&node(7000)));
        assert_eq!(t.owner(5_460), Some(&node(7000)));
        assert_eq!(t.owner(5_461), Some(&node(7001)));
        assert_eq!(t.owner(16_383), Some(&node(7002)));
        assert_eq!(t.owner(16_384), None);
        let gap = Topology::new(vec![(0, 99, node(7000)), (200, 16_383, node(7001))]);
        assert!(!gap.is_complete());
        assert_eq!(gap.owner(150), None);
        assert_eq!(gap.owner(99), Some(&node(7000)));
        assert!(!Topology::default().is_complete());
    }

    #[test]
    fn keys_are_grouped_by_primary_keeping_their_order() {
        let t = three();
        let keys: Vec<String> = (0..200).map(|i| format!("app:user:{i}")).collect();
        let groups = t.group(keys.iter().map(|k| k.as_bytes()));
        assert_eq!(groups.len(), 3, "200 keys reach every primary");
        let mut seen: Vec<usize> = Vec::new();
        for (node, idx) in &groups {
            let node = node.as_ref().unwrap();
            assert!(idx.windows(2).all(|w| w[0] < w[1]));
            for &i in idx {
                assert_eq!(t.owner(slot(keys[i].as_bytes())), Some(node));
            }
            seen.extend(idx);
        }
        seen.sort();
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
        // Keys of a slot nobody serves are set apart.
        let gap = Topology::new(vec![(0, 10, node(7000))]);
        let groups = gap.group([b"foo".as_slice()]);
        assert_eq!(groups, vec![(None, vec![0])]);
    }

    #[test]
    fn a_walk_visits_each_primary_once_in_slot_order_and_restarts_a_node_that_changed() {
        let t = three();
        let primaries = t.primaries();
        assert_eq!(
            primaries.iter().map(|p| p.0).collect::<Vec<_>>(),
            [0, 5_461, 10_923]
        );
        let start = scan_from(&primaries, &t, &ScanAt::default()).unwrap();
        assert_eq!(start.node, "127.0.0.1:7000");
        assert_eq!(start.cursor, 0);
        let mid = ScanAt {
            slot: 5_461,
            node: "127.0.0.1:7001".into(),
            cursor: 42,
        };
        assert_eq!(scan_from(&primaries, &t, &mid), Some(mid.clone()));
        let second = next_primary(&primaries, 0).unwrap();
        assert_eq!((second.slot, second.cursor), (5_461, 0));
        assert_eq!(next_primary(&primaries, 10_923), None);
        // After a failover 7001's slots are served by 7101: its cursor is not 7101's.
        let failed_over = Topology::new(vec![
            (0, 5_460, node(7000)),
            (5_461, 10_922, node(7101)),
            (10_923, 16_383, node(7002)),
        ]);
        let again = scan_from(&failed_over.primaries(), &failed_over, &mid).unwrap();
        assert_eq!(again.node, "127.0.0.1:7101");
        assert_eq!((again.slot, again.cursor), (5_461, 0));
        assert_eq!(
            scan_from(&primaries, &Topology::default(), &ScanAt::default()),
            None
        );
    }
}
