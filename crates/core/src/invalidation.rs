//! Change-driven invalidation: an entity with `on_change = "invalidate"` has the keys of every
//! captured change deleted at once, through a Redis Stream that any number of workers consume
//! as one group. This module is the stream's contract: the entry, and the names.
//!
//! The capture reader appends one entry per changed row (`XADD ... MAXLEN ~`), all of a flush
//! in one pipeline, before it acknowledges the slot: nothing committed is skipped across a
//! crash of the reader. Consumers read with `XREADGROUP`, `UNLINK` the keys, then `XACK`; an
//! entry left pending by a dead consumer is claimed by another after an idle time, and one
//! delivered too often, or unreadable, goes to the dead-letter stream with the reason.

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

/// One changed row's keys to delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// `schema.table`.
    pub table: String,
    /// `insert`, `update` or `delete`.
    pub op: String,
    /// The entity whose keys these are.
    pub entity: String,
    pub keys: Vec<String>,
    /// The transaction's commit record, as PostgreSQL prints LSNs (`16/B374D848`).
    pub commit_lsn: String,
    /// Commit time, microseconds since the Unix epoch.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reads_back_and_junk_is_refused() {
        let e = Entry {
            table: "public.users".into(),
            op: "update".into(),
            entity: "user_by_email".into(),
            keys: vec!["app:user:email:a@x".into(), "app:user:email:b@x".into()],
            commit_lsn: "0/16B3748".into(),
            commit_time_us: 1_700_000_000_000_000,
        };
        assert_eq!(Entry::from_json(e.to_json().as_bytes()), Ok(e));
        assert!(Entry::from_json(b"{\"table\": 1}").is_err());
        assert!(Entry::from_json(b"\xff").is_err());
    }
}
