//! From a changed row to the cache keys it touches.

use std::collections::HashMap;

use crate::entity::{Entity, OnChange, Rule, RuleKey, Table, Template};
use crate::invalidation::Strategy;
use crate::pgoutput::{Relation, Tuple, Value};

/// The entities of each watched table, by table.
#[derive(Debug, Clone)]
pub struct Router {
    by_table: HashMap<Table, Vec<usize>>,
    targets: Vec<Target>,
    rules_by_table: HashMap<Table, Vec<usize>>,
    rules: Vec<RuleTarget>,
}

#[derive(Debug, Clone)]
struct RuleTarget {
    name: String,
    keys: Vec<RuleKey>,
    strategy: Strategy,
}

/// What a change means for one `[[invalidate]]` rule: `rule` indexes [`Router::rule`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleHit {
    pub rule: usize,
    /// Keys to delete, and globs of keys to delete, from the old row and the new one.
    pub keys: Vec<String>,
    pub patterns: Vec<String>,
    /// Columns a template needed that the stream did not carry (as for [`Unmapped`]).
    pub missing: Vec<String>,
}

#[derive(Debug, Clone)]
struct Target {
    entity: String,
    primary_key: Vec<String>,
    key: Template,
    on_change: OnChange,
}

/// A cache key a change touched: `entity` indexes [`Router::entity`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Touched {
    pub entity: usize,
    pub key: String,
}

/// A change whose key could not be rendered: a column of the key template was in neither
/// the old row nor the new one (a delete whose old row holds only the primary key, under
/// `REPLICA IDENTITY DEFAULT`, of an entity keyed by another column). The sweep's key-side
/// pass finds what it leaves behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmapped {
    pub entity: usize,
    pub missing: Vec<String>,
}

/// Where a column's value comes from when rendering one side of a change.
enum Side {
    Old,
    New,
}

impl Router {
    pub fn new(entities: &[Entity]) -> Router {
        let mut by_table: HashMap<Table, Vec<usize>> = HashMap::new();
        let targets = entities
            .iter()
            .enumerate()
            .map(|(i, e)| {
                by_table.entry(e.table.clone()).or_default().push(i);
                Target {
                    entity: e.name.clone(),
                    primary_key: e.primary_key.clone(),
                    key: e.key.clone(),
                    on_change: e.on_change,
                }
            })
            .collect();
        Router {
            by_table,
            targets,
            rules_by_table: HashMap::new(),
            rules: Vec::new(),
        }
    }

    /// The router with the `[[invalidate]]` rules too.
    pub fn with_rules(mut self, rules: &[Rule]) -> Router {
        for (i, r) in rules.iter().enumerate() {
            self.rules_by_table
                .entry(r.table.clone())
                .or_default()
                .push(self.rules.len() + i);
        }
        self.rules.extend(rules.iter().map(|r| RuleTarget {
            name: r.name.clone(),
            keys: r.keys.clone(),
            strategy: r.strategy,
        }));
        self
    }

    /// The name of rule `i`.
    pub fn rule(&self, i: usize) -> &str {
        &self.rules[i].name
    }

    pub fn rule_strategy(&self, i: usize) -> Strategy {
        self.rules[i].strategy
    }

    /// The keys and patterns each rule on `rel`'s table deletes for an insert (`old` None),
    /// update or delete (`new` None): rendered from both rows, repeats removed. Pushes one
    /// hit per rule that names anything (or misses a column) to `out`.
    pub fn rule_change(
        &self,
        rel: &Relation,
        old: Option<&Tuple>,
        new: Option<&Tuple>,
        out: &mut Vec<RuleHit>,
    ) {
        let table = Table::new(rel.namespace.as_str(), rel.name.as_str());
        for &rule in self
            .rules_by_table
            .get(&table)
            .map_or(&[][..], Vec::as_slice)
        {
            let mut hit = RuleHit {
                rule,
                keys: Vec::new(),
                patterns: Vec::new(),
                missing: Vec::new(),
            };
            for key in &self.rules[rule].keys {
                for (side, present) in [(Side::Old, old.is_some()), (Side::New, new.is_some())] {
                    if !present {
                        continue;
                    }
                    let rendered =
                        key.render(|column| match value_of(rel, &side, old, new, column) {
                            Lookup::Text(s) => Some(s),
                            Lookup::Null => None,
                            Lookup::Missing => {
                                if !hit.missing.iter().any(|m| m == column) {
                                    hit.missing.push(column.to_string());
                                }
                                None
                            }
                        });
                    let list = if key.pattern {
                        &mut hit.patterns
                    } else {
                        &mut hit.keys
                    };
                    if let Some(k) = rendered {
                        if !list.contains(&k) {
                            list.push(k);
                        }
                    }
                }
            }
            if !(hit.keys.is_empty() && hit.patterns.is_empty() && hit.missing.is_empty()) {
                out.push(hit);
            }
        }
    }

    /// The name of entity `i`.
    pub fn entity(&self, i: usize) -> &str {
        &self.targets[i].entity
    }

    /// Entity `i`'s primary key values of a change: the new row's, or the old row's for a
    /// delete; a value the stream did not carry is empty.
    pub fn primary_key(
        &self,
        i: usize,
        rel: &Relation,
        old: Option<&Tuple>,
        new: Option<&Tuple>,
    ) -> Vec<String> {
        self.targets[i]
            .primary_key
            .iter()
            .map(|c| match value_of(rel, &Side::New, old, new, c) {
                Lookup::Text(s) => s,
                Lookup::Null | Lookup::Missing => String::new(),
            })
            .collect()
    }

    /// Whether a change deletes entity `i`'s keys (`on_change = "invalidate"`).
    pub fn invalidates(&self, i: usize) -> bool {
        self.targets[i].on_change == OnChange::Invalidate
    }

    pub fn entity_count(&self) -> usize {
        self.targets.len()
    }

    /// Every watched table, in a stable order (for the publication).
    pub fn tables(&self) -> Vec<&Table> {
        let mut tables: Vec<&Table> = self
            .by_table
            .keys()
            .chain(self.rules_by_table.keys())
            .collect();
        tables.sort();
        tables.dedup();
        tables
    }

    /// The columns of `table` a change is read for: every entity's primary key and key
    /// template, and every `[[invalidate]]` rule's templates, sorted. A publication that
    /// carries only these (and the table's replica identity) spares PostgreSQL rendering the
    /// rest of every changed row.
    pub fn columns(&self, table: &Table) -> Vec<String> {
        let entities = self
            .by_table
            .get(table)
            .into_iter()
            .flatten()
            .flat_map(|&i| {
                let t = &self.targets[i];
                t.primary_key
                    .iter()
                    .map(String::as_str)
                    .chain(t.key.columns())
            });
        let rules = self
            .rules_by_table
            .get(table)
            .into_iter()
            .flatten()
            .flat_map(|&i| self.rules[i].keys.iter().flat_map(|k| k.template.columns()));
        let mut columns: Vec<String> = entities.chain(rules).map(str::to_string).collect();
        columns.sort();
        columns.dedup();
        columns
    }

    /// The entities on the relation's table; empty when it is not watched.
    pub fn entities_of(&self, rel: &Relation) -> &[usize] {
        // pgoutput leaves the namespace empty for pg_catalog, where nobody keeps rows.
        let table = Table::new(rel.namespace.as_str(), rel.name.as_str());
        self.by_table.get(&table).map_or(&[], Vec::as_slice)
    }

    /// The keys an insert (`old` None), update or delete (`new` None) of a row of `rel`
    /// touches, every entity on the table: the old row's key and, when a templated column
    /// changed, the new row's too. Pushes to `out` (repeats removed per call) and `unmapped`.
    pub fn change(
        &self,
        rel: &Relation,
        old: Option<&Tuple>,
        new: Option<&Tuple>,
        out: &mut Vec<Touched>,
        unmapped: &mut Vec<Unmapped>,
    ) {
        // Repeats are looked for among this change's keys only: a transaction of many rows
        // appends to one `out`, and Settle merges repeats across changes anyway.
        let first = out.len();
        for &entity in self.entities_of(rel) {
            let template = &self.targets[entity].key;
            let mut missing: Vec<String> = Vec::new();
            for (side, present) in [(Side::Old, old.is_some()), (Side::New, new.is_some())] {
                if !present {
                    continue;
                }
                let key = template.render(|column| match value_of(rel, &side, old, new, column) {
                    Lookup::Text(s) => Some(s),
                    Lookup::Null => None,
                    Lookup::Missing => {
                        if !missing.iter().any(|m| m == column) {
                            missing.push(column.to_string());
                        }
                        None
                    }
                });
                if let Some(key) = key {
                    let touched = Touched { entity, key };
                    if !out[first..].contains(&touched) {
                        out.push(touched);
                    }
                }
            }
            if !missing.is_empty() {
                unmapped.push(Unmapped { entity, missing });
            }
        }
    }
}

enum Lookup {
    Text(String),
    /// SQL NULL: no key, as the application cannot have cached one under it.
    Null,
    /// Not in the stream.
    Missing,
}

/// The value of `column` on one side of a change. The side's own value when it was sent;
/// otherwise the other side's: an update's new row omits an unchanged TOASTed value (the old
/// one still holds), and a `'K'` old row carries only the key columns (the rest are usually
/// the same in the new row; if not, the sweep's key-side pass finds the key left behind).
fn value_of(
    rel: &Relation,
    side: &Side,
    old: Option<&Tuple>,
    new: Option<&Tuple>,
    column: &str,
) -> Lookup {
    let (first, second) = match side {
        Side::Old => (old, new),
        Side::New => (new, old),
    };
    let from = |t: Option<&Tuple>, old_side: bool| match t.and_then(|t| t.get(rel, column)) {
        None | Some(Value::Unchanged) | Some(Value::Binary(_)) => Lookup::Missing,
        Some(Value::Null) if old_side && key_only_gap(rel, column) => Lookup::Missing,
        Some(Value::Null) => Lookup::Null,
        Some(Value::Text(s)) => Lookup::Text(s.clone()),
    };
    let old_first = matches!(side, Side::Old);
    match from(first, old_first) {
        Lookup::Missing => from(second, !old_first),
        found => found,
    }
}

/// A `'K'` old tuple sends non-key columns as NULL meaning "not sent": for such a column the
/// old side's NULL says nothing.
fn key_only_gap(rel: &Relation, column: &str) -> bool {
    rel.columns.iter().any(|c| c.name == column && !c.key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::RelColumn;

    fn entity(name: &str, table: &str, key: &str) -> Entity {
        let text = format!(
            "[[entity]]\nname = \"{name}\"\ntable = \"{table}\"\nprimary_key = [\"id\"]\n\
             key = \"{key}\"\nrepresentation = \"json\"\n"
        );
        crate::entity::parse(&text, &|_| None)
            .expect("entity parses")
            .entities
            .remove(0)
    }

    fn users() -> Relation {
        Relation {
            id: 1,
            namespace: "public".into(),
            name: "users".into(),
            replica_identity: b'd',
            columns: ["id", "email", "bio"]
                .iter()
                .map(|n| RelColumn {
                    key: *n == "id",
                    name: n.to_string(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn row(values: &[Option<&str>]) -> Tuple {
        Tuple(
            values
                .iter()
                .map(|v| v.map_or(Value::Null, |s| Value::Text(s.into())))
                .collect(),
        )
    }

    fn router() -> Router {
        Router::new(&[
            entity("user", "public.users", "app:user:{id}"),
            entity("user_by_email", "public.users", "app:user:email:{email}"),
            entity("order", "public.orders", "app:order:{id}"),
        ])
    }

    fn keys(old: Option<&Tuple>, new: Option<&Tuple>) -> (Vec<String>, Vec<Unmapped>) {
        let (mut out, mut unmapped) = (Vec::new(), Vec::new());
        router().change(&users(), old, new, &mut out, &mut unmapped);
        (out.into_iter().map(|t| t.key).collect(), unmapped)
    }

    #[test]
    fn an_insert_touches_every_entity_on_its_table() {
        let new = row(&[Some("7"), Some("a@x"), None]);
        let (keys, unmapped) = keys(None, Some(&new));
        assert_eq!(keys, ["app:user:7", "app:user:email:a@x"]);
        assert!(unmapped.is_empty());
    }

    #[test]
    fn an_update_without_old_row_touches_the_new_keys() {
        let new = row(&[Some("7"), Some("a@x"), Some("hi")]);
        let (keys, _) = keys(None, Some(&new));
        assert_eq!(keys, ["app:user:7", "app:user:email:a@x"]);
    }

    #[test]
    fn an_email_change_touches_the_old_and_the_new_email_key() {
        // REPLICA IDENTITY FULL: the old row is whole.
        let old = row(&[Some("7"), Some("old@x"), None]);
        let new = row(&[Some("7"), Some("new@x"), None]);
        let mut rel = users();
        rel.columns.iter_mut().for_each(|c| c.key = true);
        let (mut out, mut unmapped) = (Vec::new(), Vec::new());
        router().change(&rel, Some(&old), Some(&new), &mut out, &mut unmapped);
        let keys: Vec<_> = out.into_iter().map(|t| t.key).collect();
        assert_eq!(
            keys,
            ["app:user:7", "app:user:email:old@x", "app:user:email:new@x"]
        );
        assert!(unmapped.is_empty());
        assert_eq!(router().primary_key(1, &rel, Some(&old), Some(&new)), ["7"]);
        assert_eq!(router().primary_key(0, &rel, Some(&old), None), ["7"]);
    }

    #[test]
    fn a_primary_key_change_touches_both_ids() {
        // 'K' old tuple: the key column, the rest NULL meaning "not sent".
        let old = row(&[Some("7"), None, None]);
        let new = row(&[Some("8"), Some("a@x"), None]);
        let (keys, unmapped) = keys(Some(&old), Some(&new));
        assert_eq!(keys, ["app:user:7", "app:user:8", "app:user:email:a@x"]);
        assert!(unmapped.is_empty());
    }

    #[test]
    fn an_unchanged_toasted_column_is_taken_from_the_old_row() {
        let old = row(&[Some("7"), Some("a@x"), None]);
        let mut new = row(&[Some("7"), None, None]);
        new.0[1] = Value::Unchanged;
        let mut rel = users();
        rel.columns.iter_mut().for_each(|c| c.key = true);
        let (mut out, mut unmapped) = (Vec::new(), Vec::new());
        router().change(&rel, Some(&old), Some(&new), &mut out, &mut unmapped);
        let keys: Vec<_> = out.into_iter().map(|t| t.key).collect();
        assert_eq!(keys, ["app:user:7", "app:user:email:a@x"]);
    }

    #[test]
    fn a_delete_with_only_the_key_cannot_name_the_email_key() {
        let old = row(&[Some("7"), None, None]);
        let (keys, unmapped) = keys(Some(&old), None);
        assert_eq!(keys, ["app:user:7"]);
        assert_eq!(
            unmapped,
            [Unmapped {
                entity: 1,
                missing: vec!["email".into()]
            }]
        );
    }

    #[test]
    fn a_null_templated_value_renders_no_key() {
        let new = row(&[Some("7"), None, None]);
        let (keys, unmapped) = keys(None, Some(&new));
        assert_eq!(keys, ["app:user:7"]);
        assert!(
            unmapped.is_empty(),
            "NULL is a value, not a gap: {unmapped:?}"
        );
    }

    #[test]
    fn another_table_touches_nothing() {
        let mut rel = users();
        rel.name = "audit".into();
        let new = row(&[Some("7"), Some("a@x"), None]);
        let (mut out, mut unmapped) = (Vec::new(), Vec::new());
        router().change(&rel, None, Some(&new), &mut out, &mut unmapped);
        assert!(out.is_empty() && unmapped.is_empty());
        assert_eq!(
            router()
                .tables()
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>(),
            ["public.orders", "public.users"]
        );
    }

    fn products() -> Relation {
        Relation {
            id: 2,
            namespace: "public".into(),
            name: "products".into(),
            replica_identity: b'f',
            columns: ["id", "category_id"]
                .iter()
                .map(|n| RelColumn {
                    key: true,
                    name: n.to_string(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn rule_router() -> Router {
        let text = "[[entity]]\nname = \"user\"\ntable = \"users\"\nprimary_key = [\"id\"]\n\
                    key = \"app:user:{id}\"\nrepresentation = \"json\"\n\
                    [[invalidate]]\nname = \"pages\"\ntable = \"products\"\n\
                    keys = [\"app:product:{id}:html\", \"app:cat:{category_id}:products:*\", \
                    \"app:products:count\"]\nstrategy = \"batched\"\n";
        let model = crate::entity::parse(text, &|_| None).expect("parses");
        Router::new(&model.entities).with_rules(&model.rules)
    }

    #[test]
    fn a_rule_names_keys_and_patterns_of_the_old_and_the_new_row() {
        let router = rule_router();
        let old = row(&[Some("5"), Some("1")]);
        let new = row(&[Some("5"), Some("2")]);
        let mut out = Vec::new();
        router.rule_change(&products(), Some(&old), Some(&new), &mut out);
        assert_eq!(
            out,
            [RuleHit {
                rule: 0,
                keys: vec!["app:product:5:html".into(), "app:products:count".into()],
                patterns: vec!["app:cat:1:products:*".into(), "app:cat:2:products:*".into()],
                missing: vec![],
            }]
        );
        assert_eq!(router.rule(0), "pages");
        assert!(matches!(router.rule_strategy(0), Strategy::Batched { .. }));
        // The rule's table is published too; entities see nothing of it.
        let tables: Vec<String> = router.tables().iter().map(|t| t.to_string()).collect();
        assert_eq!(tables, ["public.products", "public.users"]);
        assert!(router.entities_of(&products()).is_empty());
        let mut none = Vec::new();
        router.rule_change(&users(), None, Some(&row(&[Some("7")])), &mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn a_table_is_read_for_its_entities_keys_and_its_rules_templates_only() {
        let t = |name: &str| Table::new("public", name);
        assert_eq!(router().columns(&t("users")), ["email", "id"]);
        assert_eq!(router().columns(&t("orders")), ["id"]);
        assert_eq!(rule_router().columns(&t("products")), ["category_id", "id"]);
        assert!(router().columns(&t("elsewhere")).is_empty());
    }

    #[test]
    fn a_rule_reports_the_columns_a_delete_did_not_carry() {
        let router = rule_router();
        let mut rel = products();
        rel.columns[1].key = false;
        let old = row(&[Some("5"), None]);
        let mut out = Vec::new();
        router.rule_change(&rel, Some(&old), None, &mut out);
        assert_eq!(out[0].keys, ["app:product:5:html", "app:products:count"]);
        assert!(out[0].patterns.is_empty());
        assert_eq!(out[0].missing, ["category_id"]);
    }
}
