//! Redis key names. Every key stalewatch touches starts with the configured prefix, so one
//! Redis can hold several deployments (or test runs) side by side.

use uuid::Uuid;

/// A cache key template with one `{id}` placeholder, e.g. `item:{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    before: String,
    after: String,
}

impl KeyTemplate {
    /// Panics on a template without exactly one `{id}`: templates are constants in code.
    pub fn new(template: &str) -> Self {
        let (before, after) = template
            .split_once("{id}")
            .expect("a key template has an {id} placeholder");
        assert!(!after.contains("{id}"), "one {{id}} per template");
        Self {
            before: before.to_string(),
            after: after.to_string(),
        }
    }

    pub fn render(&self, prefix: &str, id: &str) -> String {
        format!("{prefix}{}{id}{}", self.before, self.after)
    }

    /// The id inside `key`, when `key` was made by `render` with this prefix.
    pub fn parse<'k>(&self, prefix: &str, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(prefix)?
            .strip_prefix(self.before.as_str())?
            .strip_suffix(self.after.as_str())
            .filter(|id| !id.is_empty())
    }

    /// A SCAN/KEYS pattern matching every key of this template under `prefix`.
    pub fn pattern(&self, prefix: &str) -> String {
        format!("{prefix}{}*{}", self.before, self.after)
    }
}

/// The name of the built-in entity that describes the demo `items` table (its keys are
/// [`Keys::item`]).
pub const ITEM_ENTITY: &str = "item";

/// The names stalewatch uses under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
    item: KeyTemplate,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            item: KeyTemplate::new("item:{id}"),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn item(&self, id: &Uuid) -> String {
        self.item.render(&self.prefix, &id.to_string())
    }

    pub fn parse_item(&self, key: &str) -> Option<Uuid> {
        self.item.parse(&self.prefix, key)?.parse().ok()
    }

    pub fn item_pattern(&self) -> String {
        self.item.pattern(&self.prefix)
    }

    /// The sweep round in progress (a hash, `crate::shards::Round`): its plan, and each
    /// shard's cursor and row count, so a worker that takes a shard over goes on from there.
    pub fn sweep_round(&self) -> String {
        format!("{}sweep:round", self.prefix)
    }

    /// The last completed round, renamed from [`Keys::sweep_round`] as it completes.
    pub fn sweep_last_round(&self) -> String {
        format!("{}sweep:round:last", self.prefix)
    }

    /// The counter that numbers rounds.
    pub fn sweep_rounds(&self) -> String {
        format!("{}sweep:rounds", self.prefix)
    }

    /// The lease of shard `shard` of round `round`: one worker sweeps it at a time.
    pub fn sweep_shard_lease(&self, round: u64, shard: usize) -> String {
        format!("{}sweep:round:{round}:shard:{shard}", self.prefix)
    }

    /// The lease held while a round is planned (and by `sweep --once`), so one worker
    /// plans it.
    pub fn sweep_lease(&self) -> String {
        format!("{}sweep:lease", self.prefix)
    }

    /// Exists while the deployment rests between sweep passes: set by the worker that
    /// finished a pass, expiring after SWEEP_INTERVAL_MS, so the pause is the deployment's,
    /// however many workers take turns.
    pub fn sweep_rest(&self) -> String {
        format!("{}sweep:rest", self.prefix)
    }

    /// Held by the worker that reads replication slot `slot`: one reader per slot.
    pub fn capture_lease(&self, slot: &str) -> String {
        format!("{}capture:{slot}:lease", self.prefix)
    }

    /// Held while entity `entity` is rebuilt: one rebuild per entity at a time.
    pub fn rebuild_lock(&self, entity: &str) -> String {
        format!("{}rebuild:{entity}:lock", self.prefix)
    }

    /// Held by the worker that reads the change outbox (CHANGE_CAPTURE=outbox): one reader.
    pub fn outbox_lease(&self) -> String {
        format!("{}outbox:lease", self.prefix)
    }

    /// The position up to which slot `slot` was acknowledged, written before each
    /// acknowledgement: a slot found confirmed beyond it was re-created by someone else.
    pub fn capture_position(&self, slot: &str) -> String {
        format!("{}capture:{slot}:position", self.prefix)
    }

    /// The invalidation stream (`crate::invalidation`).
    pub fn invalidations(&self) -> String {
        format!("{}invalidations", self.prefix)
    }

    /// Where unreadable or undeliverable invalidation entries go, with the reason.
    pub fn invalidations_dead(&self) -> String {
        format!("{}invalidations:dead", self.prefix)
    }

    /// The ingest stream of `entity` (`crate::ingest`): the application appends records, the
    /// workers write them to the table and the cache.
    pub fn ingest(&self, entity: &str) -> String {
        format!("{}ingest:{entity}", self.prefix)
    }

    /// Where records of `entity`'s ingest stream that cannot be written go, with the reason.
    pub fn ingest_dead(&self, entity: &str) -> String {
        format!("{}ingest:{entity}:dead", self.prefix)
    }

    /// The last error of each entry of `entity`'s ingest stream that failed to be written (a
    /// hash by entry id), so the dead letter of one delivered too often says why.
    pub fn ingest_errors(&self, entity: &str) -> String {
        format!("{}ingest:{entity}:errors", self.prefix)
    }

    /// The highest version of `entity` written to the cache by ingestion or a rebuild
    /// (`crate::watermark`).
    pub fn watermark(&self, entity: &str) -> String {
        format!("{}watermark:{entity}", self.prefix)
    }

    /// When the last sweep pass completed (Unix milliseconds).
    pub fn sweep_done_at(&self) -> String {
        format!("{}sweep:done_at", self.prefix)
    }

    /// When each dead job of `queue` was first seen dead (a sorted set by Unix seconds), so
    /// dead jobs can be removed after their retention.
    pub fn dead_seen(&self, queue: &str) -> String {
        format!("{}dead_seen:{queue}", self.prefix)
    }

    /// An apalis queue name. apalis-redis builds keys like `{queue}:active`, so the name itself
    /// keeps to `[A-Za-z0-9_]`: the prefix with anything else turned into `_`.
    pub fn queue(&self, name: &str) -> String {
        let base: String = self
            .prefix
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("{base}{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_keys_round_trip() {
        let keys = Keys::new("sw:");
        let id = Uuid::now_v7();
        let key = keys.item(&id);
        assert_eq!(key, format!("sw:item:{id}"));
        assert_eq!(keys.parse_item(&key), Some(id));
        assert_eq!(keys.item_pattern(), "sw:item:*");
    }

    #[test]
    fn keys_of_another_prefix_or_shape_do_not_parse() {
        let keys = Keys::new("sw:");
        let id = Uuid::now_v7();
        assert_eq!(keys.parse_item(&format!("other:item:{id}")), None);
        assert_eq!(keys.parse_item("sw:item:"), None);
        assert_eq!(keys.parse_item("sw:item:not-a-uuid"), None);
        assert_eq!(keys.parse_item(&format!("sw:user:{id}")), None);
    }

    #[test]
    fn templates_with_a_suffix() {
        let t = KeyTemplate::new("user:{id}:profile");
        assert_eq!(t.render("p:", "7"), "p:user:7:profile");
        assert_eq!(t.parse("p:", "p:user:7:profile"), Some("7"));
        assert_eq!(t.parse("p:", "p:user:7:avatar"), None);
        assert_eq!(t.pattern("p:"), "p:user:*:profile");
    }

    #[test]
    fn queue_names_have_no_colons() {
        let keys = Keys::new("sw_test:1a2b:");
        assert_eq!(keys.queue("check"), "sw_test_1a2b_check");
    }
}
