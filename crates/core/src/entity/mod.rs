//! What stalewatch watches: the application's tables and how their rows are cached, read from
//! the TOML file named by `ENTITIES` (default [`BUILTIN`], the demo table `items`).
//!
//! Pure: [`parse`] checks everything that can be checked without the database, [`validate`]
//! checks the model against the columns the database has ([`Catalog`]).
//!
//! ```toml
//! [[entity]]
//! name = "user"                  # [a-z0-9_]+, unique: the label in metrics, incidents, the API
//! table = "public.users"         # "users" is "public.users"; names as pg_catalog spells them
//! primary_key = ["id"]           # composite keys allowed: ["tenant_id", "id"]
//! key = "app:user:{id}"          # template over columns; {{ and }} are literal braces
//! representation = "json"        # json | string | hash | set (required)
//! columns = ["id", "email"]      # json, hash: the columns the document holds (default: all)
//! version = "updated_at"         # json, hash: grows on every write; omit to compare content only
//! policy = "cache_aside"         # or write_through (dual_write): a missing key is an incident
//! ignore = ["profile.last_login"]  # json, hash: paths left out of content comparison
//! on_change = "check"            # or invalidate: a change captured from PostgreSQL deletes
//!                                # the row's keys (old and new) before they are checked
//! ingest = false                 # true: the worker consumes the stream `<prefix>ingest:user`
//!                                # and writes each record to the table and the cache
//!                                # (`crate::ingest`); one ingesting entity per table
//!
//! [[entity]]                     # representation = "string": `value = "id"`, the column whose
//!                                # text the key holds; representation = "set": the key holds
//!                                # `member = "{user_id}"` (a template) for each of its rows
//!
//! [[invalidate]]                 # keys that are not entities, deleted on every change of
//! table = "public.products"      # the table (see the `rule` module)
//! keys = ["app:category:{category_id}:products:*"]
//! ```
//!
//! Every string value may use `${VAR}` for the variables the caller provides (the built-in
//! file uses `${KEY_PREFIX}`); an unknown variable is an error. `$$` before `{` is a `$` that
//! starts no variable (`$${X}` is the text `${X}`). In a template, a variable's value is
//! literal text: braces in it are not placeholders.
//!
//! How keys are read back into columns (the key-side pass) is described in [`Template`]'s
//! module: a placeholder's value never contains the characters next to it in the template.

mod rule;
mod template;

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::ops::Range;

use serde::Deserialize;
use toml::de::{DeTable, ValueDeserializer};
use toml::Spanned;

use crate::compare::CachePolicy;

pub use rule::{Rule, RuleKey};
pub use template::Template;

/// The built-in ENTITIES file: stalewatch's own `items` table, keyed `${KEY_PREFIX}item:{id}`.
pub const BUILTIN: &str = include_str!("../entities/items.toml");

/// A table, schema-qualified.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Table {
    pub schema: String,
    pub name: String,
}

impl Table {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Table {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// `"schema.name"` or `"name"` (schema `public`). Names are taken as written, as
    /// pg_catalog spells them (no case folding, no quotes).
    pub fn parse(s: &str) -> Result<Table, String> {
        let parts: Vec<&str> = s.split('.').collect();
        let (schema, name) = match parts.as_slice() {
            [name] => ("public", *name),
            [schema, name] => (*schema, *name),
            _ => return Err(format!("table {s:?} is not \"name\" or \"schema.name\"")),
        };
        if schema.is_empty() || name.is_empty() {
            return Err(format!("table {s:?} has an empty schema or table name"));
        }
        if s.contains('\0') {
            return Err(format!("table {s:?} contains a NUL character"));
        }
        Ok(Table::new(schema, name))
    }

    /// The table as an SQL identifier: `"schema"."name"`, each part double-quoted.
    pub fn sql(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// An SQL identifier, double-quoted, embedded `"` doubled: safe to splice into SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// How a row is held in its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Representation {
    /// The key holds a JSON document of the row: these columns, or every column (None).
    Json { columns: Option<Vec<String>> },
    /// The key holds one column's value as text.
    String { value: String },
    /// The key is a hash with one field per column: these, or every column (None).
    Hash { columns: Option<Vec<String>> },
    /// The key is a set holding `member` rendered for each of its rows.
    Set { member: Template },
}

impl Representation {
    /// `json`, `string`, `hash` or `set`, as written in the file.
    pub fn as_str(&self) -> &'static str {
        match self {
            Representation::Json { .. } => "json",
            Representation::String { .. } => "string",
            Representation::Hash { .. } => "hash",
            Representation::Set { .. } => "set",
        }
    }

    /// The columns of a JSON document or hash: Some(None) for every column, None when the
    /// key holds no document (string, set).
    pub fn document_columns(&self) -> Option<Option<&[String]>> {
        match self {
            Representation::Json { columns } | Representation::Hash { columns } => {
                Some(columns.as_deref())
            }
            Representation::String { .. } | Representation::Set { .. } => None,
        }
    }
}

/// What a change captured from PostgreSQL does to an entity's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnChange {
    /// Check them after the settle delay (detect only).
    #[default]
    Check,
    /// Delete them at once (through the invalidation stream), then check them after the
    /// settle delay.
    Invalidate,
}

impl std::str::FromStr for OnChange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "check" => Ok(OnChange::Check),
            "invalidate" => Ok(OnChange::Invalidate),
            _ => Err(format!("{s:?} is not check or invalidate")),
        }
    }
}

/// One watched table and the keys its rows are cached under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entity {
    pub name: String,
    pub table: Table,
    pub primary_key: Vec<String>,
    pub key: Template,
    pub representation: Representation,
    pub version: Option<String>,
    pub policy: CachePolicy,
    pub ignore: Vec<String>,
    /// The expiry a refresh or repair gives the keys it writes; `None`: a written key keeps
    /// the expiry it had (stalewatch does not know the application's).
    pub ttl: Option<std::time::Duration>,
    pub on_change: OnChange,
    /// `ingest = true`: the worker consumes the entity's ingest stream and writes every record
    /// to the table and then to the cache (`crate::ingest`). The one way stalewatch writes a
    /// tracked table.
    pub ingest: bool,
    /// 1-based line of the entity's `[[entity]]` header.
    pub line: usize,
}

impl Entity {
    /// Every column the entity names (primary key, templates, document columns, value,
    /// version), in that order, without repeats. Document columns left to the default
    /// ("every column") are not listed.
    pub fn named_columns(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for c in &self.primary_key {
            push_unique(&mut out, c);
        }
        for c in self.key.columns() {
            push_unique(&mut out, c);
        }
        match &self.representation {
            Representation::Json { columns } | Representation::Hash { columns } => {
                for c in columns.iter().flatten() {
                    push_unique(&mut out, c);
                }
            }
            Representation::String { value } => push_unique(&mut out, value),
            Representation::Set { member } => {
                for c in member.columns() {
                    push_unique(&mut out, c);
                }
            }
        }
        if let Some(v) = &self.version {
            push_unique(&mut out, v);
        }
        out
    }
}

fn push_unique<'a>(out: &mut Vec<&'a str>, c: &'a str) {
    if !out.contains(&c) {
        out.push(c);
    }
}

/// The parsed ENTITIES file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    pub entities: Vec<Entity>,
    /// The `[[invalidate]]` rules, in file order.
    pub rules: Vec<Rule>,
}

impl Model {
    /// The entity with this name.
    pub fn entity(&self, name: &str) -> Option<&Entity> {
        self.entities.iter().find(|e| e.name == name)
    }

    /// A readable summary, one block per entity, for `stalewatch-worker entities check`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let n = self.entities.len();
        let _ = writeln!(out, "{n} {}", if n == 1 { "entity" } else { "entities" });
        for e in &self.entities {
            let _ = writeln!(out);
            let _ = writeln!(out, "{} (line {})", e.name, e.line);
            let _ = writeln!(
                out,
                "  table    {}, primary key ({})",
                e.table,
                e.primary_key.join(", ")
            );
            let _ = writeln!(
                out,
                "  key      {}  (SCAN MATCH {})",
                e.key,
                e.key.pattern()
            );
            let holds = match &e.representation {
                Representation::Json { columns: None } => {
                    "a JSON document of every column".to_string()
                }
                Representation::Json { columns: Some(c) } => {
                    format!("a JSON document of {}", c.join(", "))
                }
                Representation::Hash { columns: None } => {
                    "a hash, one field per column".to_string()
                }
                Representation::Hash { columns: Some(c) } => {
                    format!("a hash of the fields {}", c.join(", "))
                }
                Representation::String { value } => format!("the text of column {value}"),
                Representation::Set { member } => {
                    format!("a set, the member {member} for each of its rows")
                }
            };
            let _ = writeln!(out, "  holds    {holds} ({})", e.representation.as_str());
            if e.representation.document_columns().is_some() {
                match &e.version {
                    Some(v) => {
                        let _ = writeln!(out, "  version  {v}");
                    }
                    None => {
                        let _ = writeln!(out, "  version  none: content is compared");
                    }
                }
            }
            let policy = match e.policy {
                CachePolicy::CacheAside => "a missing key is normal",
                CachePolicy::WriteThrough => "a missing key is an incident",
            };
            let _ = writeln!(out, "  policy   {}: {policy}", e.policy);
            if !e.ignore.is_empty() {
                let _ = writeln!(out, "  ignore   {}", e.ignore.join(", "));
            }
            if e.ingest {
                let _ = writeln!(
                    out,
                    "  ingest   records of the stream KEY_PREFIX + ingest:{} are upserted into \
                     the table, then written to the cache",
                    e.name
                );
            }
        }
        for r in &self.rules {
            let _ = writeln!(out);
            let _ = writeln!(out, "invalidate {} (line {})", r.name, r.line);
            let _ = writeln!(out, "  table    {}", r.table);
            for k in &r.keys {
                let how = if k.pattern {
                    "every key with this prefix (SCAN, UNLINK)"
                } else {
                    "this key"
                };
                let _ = writeln!(out, "  deletes  {k}  ({how})");
            }
            let strategy = match r.strategy {
                crate::invalidation::Strategy::Immediate => "immediate".to_string(),
                crate::invalidation::Strategy::Batched { count, within } => format!(
                    "batched: up to {count} changes or {} ms; deletes at once",
                    within.as_millis()
                ),
            };
            let _ = writeln!(out, "  strategy {strategy}");
        }
        out
    }
}

/// A problem with the ENTITIES file, located as precisely as known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelError {
    /// 1-based line in the file.
    pub line: Option<usize>,
    pub entity: Option<String>,
    pub reason: String,
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ENTITIES")?;
        if let Some(line) = self.line {
            write!(f, " line {line}")?;
        }
        if let Some(entity) = &self.entity {
            write!(f, ", entity {entity:?}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for ModelError {}

/// Columns of each table as the database has them (read from pg_catalog).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    pub tables: HashMap<Table, Vec<Column>>,
}

/// A column and its type as PostgreSQL's `format_type()` prints it ("bigint",
/// "timestamp with time zone", "character varying(255)").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Column {
    pub name: String,
    pub type_name: String,
}

impl Column {
    pub fn new(name: impl Into<String>, type_name: impl Into<String>) -> Self {
        Column {
            name: name.into(),
            type_name: type_name.into(),
        }
    }
}

/// One `[[entity]]` as written; everything optional so that missing fields are reported
/// together, with the entity's name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntity {
    name: Option<Spanned<String>>,
    table: Option<Spanned<String>>,
    primary_key: Option<Spanned<Vec<Spanned<String>>>>,
    key: Option<Spanned<String>>,
    representation: Option<Spanned<String>>,
    columns: Option<Spanned<Vec<Spanned<String>>>>,
    value: Option<Spanned<String>>,
    member: Option<Spanned<String>>,
    version: Option<Spanned<String>>,
    policy: Option<Spanned<String>>,
    ignore: Option<Spanned<Vec<Spanned<String>>>>,
    ttl: Option<Spanned<String>>,
    on_change: Option<Spanned<String>>,
    ingest: Option<Spanned<bool>>,
}

/// Parses an ENTITIES file and checks everything that needs no database. `vars` gives the
/// values of `${VAR}`. Errors are in file order.
pub fn parse(text: &str, vars: &dyn Fn(&str) -> Option<String>) -> Result<Model, Vec<ModelError>> {
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            return Err(vec![ModelError {
                line: e.span().map(|s| line_of(text, s.start)),
                entity: None,
                reason: format!("not valid TOML: {}", e.message().trim_end()),
            }])
        }
    };
    let mut errors = Vec::new();
    let mut entities: Vec<Entity> = Vec::new();
    let mut rules: Vec<Rule> = Vec::new();
    for (key, value) in root.get_ref().iter() {
        let line = Some(line_of(text, key.span().start));
        let top = key.get_ref().as_ref();
        if top != "entity" && top != "invalidate" {
            errors.push(ModelError {
                line,
                entity: None,
                reason: format!(
                    "unknown top-level key {top:?}: the file holds [[entity]] and \
                     [[invalidate]] tables only"
                ),
            });
            continue;
        }
        let what = if top == "entity" {
            "an entity"
        } else {
            "an invalidation rule"
        };
        let Some(array) = value.get_ref().as_array() else {
            errors.push(ModelError {
                line,
                entity: None,
                reason: if top == "entity" {
                    "entities are written as [[entity]] tables".into()
                } else {
                    "invalidation rules are written as [[invalidate]] tables".into()
                },
            });
            continue;
        };
        for item in array.iter() {
            let header = line_of(text, item.span().start);
            let Some(table) = item.get_ref().as_table() else {
                errors.push(ModelError {
                    line: Some(header),
                    entity: None,
                    reason: format!("{what} is a table, not {}", item.get_ref().type_str()),
                });
                continue;
            };
            let name = table
                .get("name")
                .and_then(|v| v.get_ref().as_str())
                .map(String::from);
            let deserialize_error = |e: toml::de::Error, name: Option<String>| ModelError {
                line: Some(e.span().map_or(header, |s| line_of(text, s.start))),
                entity: name,
                reason: e.message().trim_end().to_string(),
            };
            let mut b = Builder {
                text,
                vars,
                header,
                name: name.clone(),
                errors: &mut errors,
            };
            if top == "entity" {
                match RawEntity::deserialize(ValueDeserializer::from(item.clone())) {
                    Err(e) => b.errors.push(deserialize_error(e, name)),
                    Ok(raw) => entities.extend(b.build(raw)),
                }
            } else {
                match rule::RawRule::deserialize(ValueDeserializer::from(item.clone())) {
                    Err(e) => b.errors.push(deserialize_error(e, name)),
                    Ok(raw) => rules.extend(b.build_rule(raw)),
                }
            }
        }
    }
    cross_check(&entities, &mut errors);
    for (i, r) in rules.iter().enumerate() {
        let first = entities
            .iter()
            .map(|e| (&e.name, e.line))
            .chain(rules[..i].iter().map(|f| (&f.name, f.line)))
            .find(|(name, _)| **name == r.name);
        if let Some((_, line)) = first {
            errors.push(ModelError {
                line: Some(r.line),
                entity: Some(r.name.clone()),
                reason: format!("the name is already used on line {line}"),
            });
        }
    }
    if entities.is_empty() && errors.is_empty() {
        errors.push(ModelError {
            line: None,
            entity: None,
            reason: "no [[entity]]: nothing to watch".into(),
        });
    }
    if errors.is_empty() {
        Ok(Model { entities, rules })
    } else {
        errors.sort_by_key(|e| e.line);
        Err(errors)
    }
}

/// Checks between entities: unique names, no two entities on the same keys.
fn cross_check(entities: &[Entity], errors: &mut Vec<ModelError>) {
    for (i, e) in entities.iter().enumerate() {
        let earlier = &entities[..i];
        if let Some(first) = earlier.iter().find(|f| f.name == e.name) {
            errors.push(ModelError {
                line: Some(e.line),
                entity: Some(e.name.clone()),
                reason: format!(
                    "the name is already used by the entity on line {}",
                    first.line
                ),
            });
        }
        if let Some(first) = earlier
            .iter()
            .find(|f| e.ingest && f.ingest && f.table == e.table)
        {
            errors.push(ModelError {
                line: Some(e.line),
                entity: Some(e.name.clone()),
                reason: format!(
                    "entity {:?} (line {}) already ingests {}: one ingesting entity per table, \
                     since a record is a row and its stream names one entity",
                    first.name, first.line, e.table
                ),
            });
        }
        if let Some(first) = earlier.iter().find(|f| f.key.shape() == e.key.shape()) {
            errors.push(ModelError {
                line: Some(e.line),
                entity: Some(e.name.clone()),
                reason: format!(
                    "key {} makes the same keys as entity {:?} (line {}), key {}",
                    e.key, first.name, first.line, first.key
                ),
            });
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

struct Builder<'a> {
    text: &'a str,
    vars: &'a dyn Fn(&str) -> Option<String>,
    header: usize,
    name: Option<String>,
    errors: &'a mut Vec<ModelError>,
}

impl Builder<'_> {
    fn error(&mut self, span: Option<Range<usize>>, reason: String) {
        let line = span.map_or(self.header, |s| line_of(self.text, s.start));
        self.errors.push(ModelError {
            line: Some(line),
            entity: self.name.clone(),
            reason,
        });
    }

    fn missing(&mut self, field: &str, why: &str) {
        self.error(None, format!("{field} is missing{why}"));
    }

    fn not_allowed(&mut self, field: &str, span: Range<usize>, representation: &str) {
        let why = match (field, representation) {
            ("version", "string") => "a string key holds no version",
            ("version", _) => "a set holds no version",
            ("ignore", _) => "only a JSON document or hash has fields to ignore",
            ("columns", _) => "only a JSON document or hash has columns",
            ("value", _) => "only representation = \"string\" holds one column's value",
            _ => "only representation = \"set\" has members",
        };
        self.error(
            Some(span),
            format!("{field} does not apply to representation = \"{representation}\": {why}"),
        );
    }

    /// Replaces `${VAR}`; in a template, the values' braces are escaped.
    /// An entity's or a rule's `name`: `[a-z0-9_]+`. Also names the errors that follow.
    fn name(&mut self, s: &Spanned<String>) -> Option<String> {
        let name = self.expand("name", s, false)?;
        self.name = Some(name.clone());
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if valid {
            Some(name)
        } else {
            self.error(
                Some(s.span()),
                "name must be lower-case letters, digits and '_' ([a-z0-9_]+)".into(),
            );
            None
        }
    }

    /// An entity's or a rule's `table`, `schema.table` or `table`.
    fn table(&mut self, s: &Spanned<String>) -> Option<Table> {
        let t = self.expand("table", s, false)?;
        match Table::parse(&t) {
            Ok(t) => Some(t),
            Err(e) => {
                self.error(Some(s.span()), e);
                None
            }
        }
    }

    fn expand(&mut self, field: &str, s: &Spanned<String>, template: bool) -> Option<String> {
        match expand(s.get_ref(), self.vars, template) {
            Ok(v) => Some(v),
            Err(e) => {
                self.error(Some(s.span()), format!("{field}: {e}"));
                None
            }
        }
    }

    /// A list of column names: not empty, no empty name, no repeats.
    fn columns(
        &mut self,
        field: &str,
        list: &Spanned<Vec<Spanned<String>>>,
    ) -> Option<Vec<String>> {
        if list.get_ref().is_empty() {
            self.error(Some(list.span()), format!("{field} is empty"));
            return None;
        }
        let mut out: Vec<String> = Vec::new();
        let mut ok = true;
        for item in list.get_ref() {
            let Some(c) = self.expand(field, item, false) else {
                ok = false;
                continue;
            };
            if c.is_empty() {
                self.error(
                    Some(item.span()),
                    format!("{field} has an empty column name"),
                );
                ok = false;
            } else if out.contains(&c) {
                self.error(Some(item.span()), format!("{field} names {c:?} twice"));
                ok = false;
            } else {
                out.push(c);
            }
        }
        ok.then_some(out)
    }

    fn template(&mut self, field: &str, s: &Spanned<String>) -> Option<Template> {
        let text = self.expand(field, s, true)?;
        match Template::parse(&text) {
            Ok(t) => Some(t),
            Err(e) => {
                self.error(
                    Some(s.span()),
                    format!("{field} template {:?}: {e}", s.get_ref()),
                );
                None
            }
        }
    }

    fn column(&mut self, field: &str, s: &Spanned<String>) -> Option<String> {
        let c = self.expand(field, s, false)?;
        if c.is_empty() {
            self.error(Some(s.span()), format!("{field} is empty"));
            return None;
        }
        Some(c)
    }

    fn build(&mut self, raw: RawEntity) -> Option<Entity> {
        let before = self.errors.len();

        let name = match &raw.name {
            None => {
                self.missing("name", "");
                None
            }
            Some(s) => self.name(s),
        };

        let table = match &raw.table {
            None => {
                self.missing("table", "");
                None
            }
            Some(s) => self.table(s),
        };

        let primary_key = match &raw.primary_key {
            None => {
                self.missing("primary_key", ": the columns that identify a row");
                None
            }
            Some(list) => self.columns("primary_key", list),
        };

        let key = match &raw.key {
            None => {
                self.missing(
                    "key",
                    ": the template of the cache key, e.g. \"app:user:{id}\"",
                );
                None
            }
            Some(s) => self.template("key", s),
        };

        let ttl = match &raw.ttl {
            None => Some(None),
            Some(s) => self.expand("ttl", s, false).and_then(|t| {
                match humantime::parse_duration(t.trim()) {
                    Ok(d) if !d.is_zero() => Some(Some(d)),
                    _ => {
                        self.error(
                            Some(s.span()),
                            format!("ttl: {t:?} is not a duration such as \"1h\" or \"3600s\""),
                        );
                        None
                    }
                }
            }),
        };
        let policy = match &raw.policy {
            None => Some(CachePolicy::default()),
            Some(s) => self
                .expand("policy", s, false)
                .and_then(|p| match p.parse() {
                    Ok(p) => Some(p),
                    Err(e) => {
                        self.error(Some(s.span()), format!("policy: {e}"));
                        None
                    }
                }),
        };

        let on_change = match &raw.on_change {
            None => Some(OnChange::default()),
            Some(s) => self
                .expand("on_change", s, false)
                .and_then(|v| match v.parse() {
                    Ok(v) => Some(v),
                    Err(e) => {
                        self.error(Some(s.span()), format!("on_change: {e}"));
                        None
                    }
                }),
        };

        let ingest = raw.ingest.as_ref().is_some_and(|i| *i.get_ref());
        if let (Some(span), Some(OnChange::Invalidate)) = (
            raw.ingest.as_ref().filter(|_| ingest).map(|i| i.span()),
            on_change,
        ) {
            self.error(
                Some(span),
                "ingest = true writes the entity's keys, and on_change = \"invalidate\" would \
                 delete each one again as its row's change is captured: use one or the other"
                    .into(),
            );
        }

        let representation = self.representation(&raw);
        // The kind as written, even when the representation has errors of its own.
        let kind = raw
            .representation
            .as_ref()
            .map(|s| s.get_ref().as_str())
            .filter(|k| matches!(*k, "json" | "string" | "hash" | "set"));
        let has_document = |kind: Option<&str>| !matches!(kind, Some("string" | "set"));

        let version = match (&raw.version, &representation) {
            (None, _) => None,
            (Some(s), _) if !has_document(kind) => {
                self.not_allowed("version", s.span(), kind.unwrap_or_default());
                None
            }
            (Some(s), r) => {
                let v = self.column("version", s);
                if let (Some(v), Some(Some(columns))) =
                    (&v, r.as_ref().and_then(|r| r.document_columns()))
                {
                    if !columns.contains(v) {
                        self.error(
                            Some(s.span()),
                            format!("version {v:?} is not one of the document's columns"),
                        );
                    }
                }
                v
            }
        };

        let mut ignore = Vec::new();
        match (&raw.ignore, &representation) {
            (None, _) => {}
            (Some(list), _) if !has_document(kind) => {
                self.not_allowed("ignore", list.span(), kind.unwrap_or_default());
            }
            (Some(list), r) => {
                let hash = matches!(r, Some(Representation::Hash { .. }));
                let columns = r.as_ref().and_then(|r| r.document_columns()).flatten();
                for item in list.get_ref() {
                    let Some(path) = self.expand("ignore", item, false) else {
                        continue;
                    };
                    match path_head(&path) {
                        Err(e) => self.error(Some(item.span()), format!("ignore {path:?}: {e}")),
                        Ok(_) if hash && path.contains(['.', '[']) => self.error(
                            Some(item.span()),
                            format!(
                                "ignore {path:?}: a hash field is plain text, with no paths inside"
                            ),
                        ),
                        Ok(head) if columns.is_some_and(|c| !c.iter().any(|c| c == head)) => self
                            .error(
                                Some(item.span()),
                                format!(
                                    "ignore {path:?} starts with {head:?}, which is not one of \
                                     the document's columns"
                                ),
                            ),
                        Ok(_) => ignore.push(path),
                    }
                }
            }
        }

        if self.errors.len() > before {
            return None;
        }
        Some(Entity {
            name: name?,
            table: table?,
            primary_key: primary_key?,
            key: key?,
            representation: representation?,
            version,
            policy: policy?,
            ignore,
            ttl: ttl?,
            on_change: on_change?,
            ingest,
            line: self.header,
        })
    }

    fn representation(&mut self, raw: &RawEntity) -> Option<Representation> {
        let Some(s) = &raw.representation else {
            self.missing(
                "representation",
                ": one of json, string, hash, set (how the key holds the row)",
            );
            return None;
        };
        let kind = self.expand("representation", s, false)?;
        let needs = |field: &str| match field {
            "columns" => matches!(kind.as_str(), "json" | "hash"),
            "value" => kind == "string",
            _ => kind == "set",
        };
        if !matches!(kind.as_str(), "json" | "string" | "hash" | "set") {
            self.error(
                Some(s.span()),
                format!("representation {kind:?} is not one of json, string, hash, set"),
            );
            return None;
        }
        let mut ok = true;
        for (field, span) in [
            ("columns", raw.columns.as_ref().map(|c| c.span())),
            ("value", raw.value.as_ref().map(|c| c.span())),
            ("member", raw.member.as_ref().map(|c| c.span())),
        ] {
            if let Some(span) = span {
                if !needs(field) {
                    self.not_allowed(field, span, &kind);
                    ok = false;
                }
            }
        }
        let columns = match &raw.columns {
            Some(list) if needs("columns") => {
                let c = self.columns("columns", list);
                ok &= c.is_some();
                c
            }
            _ => None,
        };
        let r = match kind.as_str() {
            "json" => Representation::Json { columns },
            "hash" => Representation::Hash { columns },
            "string" => match &raw.value {
                None => {
                    self.missing("value", ": the column whose text the key holds");
                    return None;
                }
                Some(s) => Representation::String {
                    value: self.column("value", s)?,
                },
            },
            _ => match &raw.member {
                None => {
                    self.missing(
                        "member",
                        ": the template of each row's member, e.g. \"{id}\"",
                    );
                    return None;
                }
                Some(s) => Representation::Set {
                    member: self.template("member", s)?,
                },
            },
        };
        ok.then_some(r)
    }
}

/// The column an ignore path starts with: `profile` of `profile.last_login` or
/// `items[0].etag`. Errors on an empty segment.
fn path_head(path: &str) -> Result<&str, String> {
    if path.split('.').any(str::is_empty) {
        return Err("a path has no empty segments".into());
    }
    let head = path.split(['.', '[']).next().unwrap_or("");
    if head.is_empty() {
        return Err("a path starts with a column name".into());
    }
    Ok(head)
}

/// Replaces each `${VAR}` of `s`; `$${` is a `$` and a `{` that starts no variable. With
/// `template`, the braces of a variable's value are doubled: the template parser takes them
/// as text.
fn expand(
    s: &str,
    vars: &dyn Fn(&str) -> Option<String>,
    template: bool,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if after.starts_with("${") {
            // `$${`: a `$` that starts no variable; the `{` is left to what follows.
            out.push('$');
            rest = &after[1..];
            continue;
        }
        let Some(body) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let Some(end) = body.find('}') else {
            return Err(format!("\"${{{body}\" is never closed"));
        };
        let var = &body[..end];
        let well_formed = var
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !well_formed {
            return Err(format!(
                "\"${{{var}}}\" is not a variable name (letters, digits, '_'); write $${{ for a \
                 literal ${{"
            ));
        }
        let Some(value) = vars(var) else {
            return Err(format!("unknown variable ${{{var}}}"));
        };
        if template {
            out.push_str(&value.replace('{', "{{").replace('}', "}}"));
        } else {
            out.push_str(&value);
        }
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks the model against the database's columns: every table exists, every column named
/// exists, versions are integers or timestamps, ignore paths start with a document column.
pub fn validate(model: &Model, catalog: &Catalog) -> Result<(), Vec<ModelError>> {
    let mut errors = Vec::new();
    for e in &model.entities {
        let mut error = |reason: String| {
            errors.push(ModelError {
                line: Some(e.line),
                entity: Some(e.name.clone()),
                reason,
            })
        };
        let Some(columns) = catalog.tables.get(&e.table) else {
            let hint = suggest(
                &e.table.to_string(),
                catalog.tables.keys().map(|t| t.to_string()),
            );
            error(format!(
                "table {} does not exist, or the database user cannot see it{hint}",
                e.table
            ));
            continue;
        };
        let names = || columns.iter().map(|c| c.name.clone());
        let check = |what: &str, c: &str, error: &mut dyn FnMut(String)| -> bool {
            if columns.iter().any(|col| col.name == c) {
                return true;
            }
            let hint = suggest(c, names());
            error(format!(
                "{what} column {c:?}, which {} does not have{hint}",
                e.table
            ));
            false
        };
        for c in &e.primary_key {
            check("primary_key names", c, &mut error);
        }
        for c in e.key.columns() {
            check("key template names", c, &mut error);
        }
        match &e.representation {
            Representation::Json { columns: Some(cs) }
            | Representation::Hash { columns: Some(cs) } => {
                for c in cs {
                    check("columns names", c, &mut error);
                }
            }
            Representation::Json { columns: None } | Representation::Hash { columns: None } => {}
            Representation::String { value } => {
                check("value names", value, &mut error);
            }
            Representation::Set { member } => {
                for c in member.columns() {
                    check("member template names", c, &mut error);
                }
            }
        }
        if let Some(v) = &e.version {
            if check("version names", v, &mut error) {
                let ty = &columns
                    .iter()
                    .find(|c| &c.name == v)
                    .expect("checked")
                    .type_name;
                if !is_version_type(ty) {
                    error(format!(
                        "version column {v:?} is {ty}; a version is an integer (smallint, \
                         integer, bigint) or a timestamp"
                    ));
                }
            }
        }
        if let Some(None) = e.representation.document_columns() {
            for path in &e.ignore {
                let Ok(head) = path_head(path) else { continue };
                if !columns.iter().any(|c| c.name == head) {
                    let hint = suggest(head, names());
                    error(format!(
                        "ignore {path:?} starts with {head:?}, which is not a column of {}{hint}",
                        e.table
                    ));
                }
            }
        }
    }
    for r in &model.rules {
        let mut error = |reason: String| {
            errors.push(ModelError {
                line: Some(r.line),
                entity: Some(r.name.clone()),
                reason,
            })
        };
        let Some(columns) = catalog.tables.get(&r.table) else {
            let hint = suggest(
                &r.table.to_string(),
                catalog.tables.keys().map(|t| t.to_string()),
            );
            error(format!(
                "table {} does not exist, or the database user cannot see it{hint}",
                r.table
            ));
            continue;
        };
        for c in r.named_columns() {
            if !columns.iter().any(|col| col.name == c) {
                let hint = suggest(c, columns.iter().map(|c| c.name.clone()));
                error(format!(
                    "keys template names column {c:?}, which {} does not have{hint}",
                    r.table
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn is_version_type(type_name: &str) -> bool {
    matches!(type_name, "smallint" | "integer" | "bigint") || type_name.starts_with("timestamp")
}

/// `" (did you mean \"email\"?)"` for the closest candidate within two edits of `wrong`,
/// or that `wrong` begins (`campaign` for `campaign_id`).
fn suggest(wrong: &str, candidates: impl Iterator<Item = String>) -> String {
    candidates
        .map(|c| (edit_distance(wrong, &c), !c.starts_with(wrong), c))
        .filter(|(d, longer, _)| *d <= 2 || !longer)
        .min()
        .map(|(_, _, c)| format!(" (did you mean {c:?}?)"))
        .unwrap_or_default()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invalidation::Strategy;

    const EXAMPLE: &str = r#"[[entity]]
name = "user"                       # label in metrics, incidents and the API
table = "public.users"              # schema optional: "users" means "public.users"
primary_key = ["id"]                # composite keys allowed: ["tenant_id", "id"]
key = "app:user:{id}"               # template over columns
representation = "json"             # the key holds a JSON document of the row
columns = ["id", "email", "profile", "updated_at"]   # which columns the document holds (default: all)
version = "updated_at"              # a column that grows on every write; omit to compare content only
policy = "cache_aside"              # or "write_through"
ignore = ["profile.last_login"]     # dotted paths left out of content comparison

[[entity]]
name = "user_by_email"
table = "public.users"
primary_key = ["id"]
key = "app:user:email:{email}"
representation = "string"           # the key holds one column's value as text
value = "id"

[[entity]]
name = "user_hash"
table = "public.users"
primary_key = ["id"]
key = "app:userh:{id}"
representation = "hash"             # one hash field per column
columns = ["email", "plan"]

[[entity]]
name = "campaign_members"
table = "public.campaign_members"
primary_key = ["campaign_id", "user_id"]
key = "app:campaign:{campaign_id}:members"
representation = "set"              # the key is a set holding {member} for every row
member = "{user_id}"
policy = "write_through"
"#;

    fn no_vars(_: &str) -> Option<String> {
        None
    }

    /// The variables the built-in file uses, as the configuration gives them.
    fn prefix_vars(prefix: &'static str) -> impl Fn(&str) -> Option<String> {
        move |v| match v {
            "KEY_PREFIX" => Some(prefix.to_string()),
            "CACHE_POLICY" => Some("cache_aside".to_string()),
            "CACHE_TTL_SECS" => Some("3600".to_string()),
            _ => None,
        }
    }

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    fn tpl(s: &str) -> Template {
        Template::parse(s).unwrap()
    }

    fn ok(text: &str) -> Model {
        parse(text, &no_vars).unwrap_or_else(|e| panic!("{e:#?}"))
    }

    /// The errors of `text`, as (line, entity, reason).
    fn errs(text: &str) -> Vec<ModelError> {
        parse(text, &no_vars).expect_err("an error")
    }

    /// Asserts the single error of `text`: its line and a fragment of its reason.
    fn one_error(text: &str, line: usize, fragment: &str) -> ModelError {
        let errors = errs(text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        let e = errors.into_iter().next().unwrap();
        assert_eq!(e.line, Some(line), "{e}");
        assert!(e.reason.contains(fragment), "{e}");
        e
    }

    /// A minimal valid entity, with `extra` lines added (line 1 is the header).
    fn entity(extra: &str) -> String {
        format!(
            "[[entity]]\nname = \"user\"\ntable = \"users\"\nprimary_key = [\"id\"]\n\
             key = \"app:user:{{id}}\"\n{extra}"
        )
    }

    /// The minimal entity with `representation = "json"` (lines 1 to 6), one field's line
    /// replaced.
    fn swap(field: &str, line: &str) -> String {
        let field = format!("{field} =");
        entity("representation = \"json\"\n")
            .lines()
            .map(|l| if l.starts_with(&field) { line } else { l })
            .fold(String::new(), |text, l| text + l + "\n")
    }

    #[test]
    fn the_example_parses_into_the_model() {
        let model = ok(EXAMPLE);
        let users = Table::new("public", "users");
        assert_eq!(
            model.entities,
            vec![
                Entity {
                    name: "user".into(),
                    table: users.clone(),
                    primary_key: strings(&["id"]),
                    key: tpl("app:user:{id}"),
                    representation: Representation::Json {
                        columns: Some(strings(&["id", "email", "profile", "updated_at"])),
                    },
                    version: Some("updated_at".into()),
                    policy: CachePolicy::CacheAside,
                    ignore: strings(&["profile.last_login"]),
                    ttl: None,
                    on_change: OnChange::Check,
                    ingest: false,
                    line: 1,
                },
                Entity {
                    name: "user_by_email".into(),
                    table: users.clone(),
                    primary_key: strings(&["id"]),
                    key: tpl("app:user:email:{email}"),
                    representation: Representation::String { value: "id".into() },
                    version: None,
                    policy: CachePolicy::CacheAside,
                    ignore: vec![],
                    ttl: None,
                    on_change: OnChange::Check,
                    ingest: false,
                    line: 12,
                },
                Entity {
                    name: "user_hash".into(),
                    table: users,
                    primary_key: strings(&["id"]),
                    key: tpl("app:userh:{id}"),
                    representation: Representation::Hash {
                        columns: Some(strings(&["email", "plan"])),
                    },
                    version: None,
                    policy: CachePolicy::CacheAside,
                    ignore: vec![],
                    ttl: None,
                    on_change: OnChange::Check,
                    ingest: false,
                    line: 20,
                },
                Entity {
                    name: "campaign_members".into(),
                    table: Table::new("public", "campaign_members"),
                    primary_key: strings(&["campaign_id", "user_id"]),
                    key: tpl("app:campaign:{campaign_id}:members"),
                    representation: Representation::Set {
                        member: tpl("{user_id}"),
                    },
                    version: None,
                    policy: CachePolicy::WriteThrough,
                    ignore: vec![],
                    ttl: None,
                    on_change: OnChange::Check,
                    ingest: false,
                    line: 28,
                },
            ]
        );
        assert_eq!(model.entity("user_hash").unwrap().line, 20);
        assert!(model.entity("nobody").is_none());
    }

    #[test]
    fn the_example_keys_do_not_claim_each_other() {
        let model = ok(EXAMPLE);
        let key_of = |name: &str| &model.entity(name).unwrap().key;
        // SCAN MATCH app:user:* also returns user_by_email's keys: they must not parse.
        assert_eq!(key_of("user").pattern(), "app:user:*");
        assert_eq!(
            key_of("user").parse_key("app:user:email:ann@example.com"),
            None
        );
        assert_eq!(
            key_of("user_by_email").parse_key("app:user:email:ann@example.com"),
            Some(vec![("email".into(), "ann@example.com".into())])
        );
        assert_eq!(key_of("user").parse_key("app:userh:7"), None);
        let members = key_of("campaign_members");
        assert_eq!(
            members.parse_key("app:campaign:12:members"),
            Some(vec![("campaign_id".into(), "12".into())])
        );
    }

    #[test]
    fn defaults_composite_keys_and_schemas() {
        let model = ok(r#"
[[entity]]
name = "membership_2"
table = "tenants"
primary_key = ["tenant_id", "id"]
key = "app:{tenant_id}:membership:{id}"
representation = "json"

[[entity]]
name = "audit"
table = "audit.events"
primary_key = ["id"]
key = "audit:{id}"
representation = "hash"
version = "seq"
policy = "dual-write"
"#);
        let m = &model.entities[0];
        assert_eq!(m.line, 2);
        assert_eq!(m.table, Table::new("public", "tenants"));
        assert_eq!(m.primary_key, strings(&["tenant_id", "id"]));
        assert_eq!(m.key.columns(), vec!["tenant_id", "id"]);
        assert_eq!(m.representation, Representation::Json { columns: None });
        assert_eq!(m.version, None);
        assert_eq!(m.policy, CachePolicy::CacheAside);
        assert_eq!(m.named_columns(), vec!["tenant_id", "id"]);
        let key = m
            .key
            .render(|c| Some(if c == "id" { "7" } else { "acme" }.to_string()))
            .unwrap();
        assert_eq!(key, "app:acme:membership:7");
        assert_eq!(
            m.key.parse_key(&key),
            Some(vec![
                ("tenant_id".into(), "acme".into()),
                ("id".into(), "7".into())
            ])
        );
        let a = &model.entities[1];
        assert_eq!(a.table, Table::new("audit", "events"));
        assert_eq!(a.representation, Representation::Hash { columns: None });
        assert_eq!(a.version.as_deref(), Some("seq"));
        assert_eq!(a.policy, CachePolicy::WriteThrough);
    }

    #[test]
    fn tables_print_and_quote() {
        let t = Table::parse("users").unwrap();
        assert_eq!(t.to_string(), "public.users");
        assert_eq!(t.sql(), "\"public\".\"users\"");
        let odd = Table::parse("My Schema.we\"ird").unwrap();
        assert_eq!(odd.sql(), "\"My Schema\".\"we\"\"ird\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        for bad in ["", "a.b.c", ".users", "public.", "a\0b"] {
            assert!(Table::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_error_message_names_file_line_and_entity() {
        let e = ModelError {
            line: Some(12),
            entity: Some("user".into()),
            reason: "template names column \"emial\", which public.users does not have".into(),
        };
        assert_eq!(
            e.to_string(),
            "ENTITIES line 12, entity \"user\": template names column \"emial\", which \
             public.users does not have"
        );
        let bare = ModelError {
            line: None,
            entity: None,
            reason: "x".into(),
        };
        assert_eq!(bare.to_string(), "ENTITIES: x");
        let line_only = ModelError {
            line: Some(3),
            ..bare
        };
        assert_eq!(line_only.to_string(), "ENTITIES line 3: x");
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let e = one_error("[[entity]]\nname = \"user\nkey = 1\n", 2, "not valid TOML");
        assert_eq!(e.entity, None);
        one_error(
            "[[entity]]\nname = \"a\"\nname = \"b\"\n",
            3,
            "duplicate key",
        );
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_line() {
        let e = one_error(
            &entity("representation = \"json\"\nexpiry = 60\n"),
            7,
            "unknown field `expiry`",
        );
        assert_eq!(e.entity.as_deref(), Some("user"));
        one_error(
            &entity("representation = \"json\"\n[entity.extra]\nx = 1\n"),
            7,
            "unknown field `extra`",
        );
        one_error("title = \"x\"\n", 1, "unknown top-level key \"title\"");
        one_error("[entity]\nname = \"x\"\n", 1, "[[entity]] tables");
        one_error("entity = [1]\n", 1, "not integer");
    }

    #[test]
    fn wrong_types_have_their_line() {
        let e = one_error(
            "[[entity]]\ntable = \"t\"\nname = 5\n",
            3,
            "expected a string",
        );
        assert_eq!(e.entity, None);
        one_error(
            &entity("representation = \"json\"\ncolumns = [\"a\", 2]\n"),
            7,
            "expected a string",
        );
        one_error(
            "[[entity]]\nname = \"user\"\nprimary_key = \"id\"\n",
            3,
            "expected a sequence",
        );
    }

    #[test]
    fn missing_fields_are_reported_together_on_the_header() {
        let errors = errs("# a comment\n\n[[entity]]\nname = \"user\"\n");
        let reasons: Vec<&str> = errors.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(errors.len(), 4, "{reasons:?}");
        for (e, field) in errors
            .iter()
            .zip(["table", "primary_key", "key", "representation"])
        {
            assert_eq!(e.line, Some(3));
            assert_eq!(e.entity.as_deref(), Some("user"));
            assert!(e.reason.starts_with(&format!("{field} is missing")), "{e}");
        }
        let e = one_error(&swap("name", "# no name"), 1, "name is missing");
        assert_eq!(e.entity, None);
        one_error(
            &entity("representation = \"string\"\n"),
            1,
            "value is missing",
        );
        one_error(
            &entity("representation = \"set\"\n"),
            1,
            "member is missing",
        );
    }

    #[test]
    fn field_values_are_checked() {
        for (field, line, at, fragment) in [
            ("name", "name = 'User'", 2, "[a-z0-9_]+"),
            ("name", "name = ''", 2, "[a-z0-9_]+"),
            ("table", "table = 'a.b.c'", 3, "\"schema.name\""),
            ("primary_key", "primary_key = []", 4, "primary_key is empty"),
            (
                "primary_key",
                "primary_key = ['id', 'id']",
                4,
                "names \"id\" twice",
            ),
            ("primary_key", "primary_key = ['']", 4, "empty column name"),
            ("key", "key = 'k:id'", 5, "no {column} placeholder"),
            ("key", "key = 'k:{id'", 5, "never closed"),
            ("key", "key = 'k:{a}{b}'", 5, "no text between"),
            ("key", "key = 'k:{}'", 5, "empty placeholder"),
            (
                "representation",
                "representation = 'xml'",
                6,
                "not one of json, string, hash",
            ),
        ] {
            let e = one_error(&swap(field, line), at, fragment);
            let name = match field {
                "name" => line.trim_start_matches("name = ").trim_matches('\''),
                _ => "user",
            };
            assert_eq!(e.entity.as_deref(), Some(name));
        }
        one_error(
            &entity("representation = \"json\"\npolicy = \"sometimes\"\n"),
            7,
            "unknown cache policy",
        );
        one_error(
            &entity("representation = \"json\"\ncolumns = []\n"),
            7,
            "columns is empty",
        );
        one_error(
            &entity("representation = \"json\"\ncolumns = [\"id\", \"id\"]\n"),
            7,
            "twice",
        );
        one_error(
            &entity("representation = \"string\"\nvalue = \"\"\n"),
            7,
            "value is empty",
        );
        one_error(
            &entity("representation = \"set\"\nmember = \"all\"\n"),
            7,
            "member template \"all\"",
        );
    }

    #[test]
    fn fields_that_do_not_fit_the_representation() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "representation = 'json'\nvalue = 'id'",
                7,
                "value does not apply to representation = \"json\"",
            ),
            (
                "representation = 'hash'\nmember = '{id}'",
                7,
                "member does not apply",
            ),
            (
                "representation = 'string'\nvalue = 'id'\ncolumns = ['id']",
                8,
                "columns does not apply",
            ),
            (
                "representation = 'string'\nvalue = 'id'\nversion = 'v'",
                8,
                "a string key holds no version",
            ),
            (
                "representation = 'set'\nmember = '{id}'\nversion = 'v'",
                8,
                "a set holds no version",
            ),
            (
                "representation = 'set'\nmember = '{id}'\nignore = ['a']",
                8,
                "ignore does not apply",
            ),
            (
                "representation = 'json'\ncolumns = ['id']\nversion = 'v'",
                8,
                "not one of the document's",
            ),
            (
                "representation = 'json'\ncolumns = ['id', 'p']\nignore = ['p.x', 'q.x']",
                8,
                "with \"q\"",
            ),
            (
                "representation = 'json'\nignore = ['p..x']",
                7,
                "empty segments",
            ),
            (
                "representation = 'json'\nignore = ['[0]']",
                7,
                "starts with a column",
            ),
            (
                "representation = 'hash'\nignore = ['p.x']",
                7,
                "no paths inside",
            ),
        ];
        for (extra, line, fragment) in cases {
            one_error(&entity(extra), *line, fragment);
        }
        // Fields that do not fit are reported even when the representation has errors.
        let errors = errs(&entity(
            "representation = 'set'\nversion = 'v'\nignore = ['a']\n",
        ));
        let got: Vec<(Option<usize>, &str)> = errors
            .iter()
            .map(|e| (e.line, e.reason.split(':').next().unwrap()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(1), "member is missing"),
                (
                    Some(7),
                    "version does not apply to representation = \"set\""
                ),
                (Some(8), "ignore does not apply to representation = \"set\""),
            ]
        );
        // Ignore paths may index arrays and reach into documents.
        let m = ok(&entity(
            "representation = \"json\"\nignore = [\"items[0].etag\", \"meta.a.b\"]\n",
        ));
        assert_eq!(
            m.entities[0].ignore,
            strings(&["items[0].etag", "meta.a.b"])
        );
    }

    #[test]
    fn names_and_keys_are_unique_across_entities() {
        let text = format!(
            "{}representation = \"json\"\n\n{}representation = \"json\"\n",
            entity(""),
            entity("").replace("app:user:{id}", "app:other:{id}")
        );
        let e = one_error(&text, 8, "already used by the entity on line 1");
        assert_eq!(e.entity.as_deref(), Some("user"));

        let text = format!(
            "{}representation = \"json\"\n\n{}representation = \"json\"\n",
            entity(""),
            entity("")
                .replace("\"user\"", "\"user2\"")
                .replace("{id}", "{uid}")
        );
        let e = one_error(&text, 8, "makes the same keys as entity \"user\" (line 1)");
        assert_eq!(e.entity.as_deref(), Some("user2"));
    }

    #[test]
    fn every_error_is_reported_in_file_order() {
        let text = "\
[[entity]]
name = \"a\"
table = \"t\"
primary_key = [\"id\"]
key = \"k:{id}\"
representation = \"json\"
bogus = 1

[[entity]]
name = \"B\"
table = \"t\"
primary_key = []
key = \"b:{id}\"
representation = \"json\"
";
        let errors = errs(text);
        let got: Vec<(Option<usize>, Option<&str>)> = errors
            .iter()
            .map(|e| (e.line, e.entity.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(7), Some("a")),
                (Some(10), Some("B")),
                (Some(12), Some("B"))
            ],
            "{errors:#?}"
        );
    }

    #[test]
    fn an_empty_file_watches_nothing() {
        let errors = errs("# nothing here\n");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, None);
        assert!(errors[0].reason.contains("no [[entity]]"));
    }

    #[test]
    fn variables_are_expanded() {
        let text = entity("representation = \"json\"\n")
            .replace("app:user:{id}", "${KEY_PREFIX}user:{id}")
            .replace("\"users\"", "\"${SCHEMA}.users\"");
        let vars = |v: &str| match v {
            "KEY_PREFIX" => Some("sw:".to_string()),
            "SCHEMA" => Some("app".to_string()),
            _ => None,
        };
        let model = parse(&text, &vars).unwrap();
        let e = &model.entities[0];
        assert_eq!(e.key.source(), "sw:user:{id}");
        assert_eq!(e.table, Table::new("app", "users"));

        // A prefix's braces and glob characters are text.
        let odd = |_: &str| Some("a{b}*[".to_string());
        let model = parse(&text, &odd).unwrap();
        let key = &model.entities[0].key;
        assert_eq!(key.columns(), vec!["id"]);
        assert_eq!(key.render(|_| Some("1".into())).unwrap(), "a{b}*[user:1");
        assert_eq!(key.pattern(), "a{b}\\*\\[user:*");
        assert_eq!(
            key.parse_key("a{b}*[user:1"),
            Some(vec![("id".into(), "1".into())])
        );

        // `$${` starts no variable; a lone `$` is text.
        let text = entity("representation = \"json\"\n")
            .replace("app:user:{id}", "$a:${KEY_PREFIX}$$x:{id}")
            .replace("\"users\"", "\"$${X}\"");
        let model = parse(&text, &prefix_vars("p:")).unwrap();
        assert_eq!(model.entities[0].key.source(), "$a:p:$$x:{id}");
        assert_eq!(model.entities[0].table.name, "${X}");
        let text = entity("representation = \"json\"\n").replace("app:user:{id}", "u$${id}");
        let model = parse(&text, &no_vars).unwrap();
        assert_eq!(
            model.entities[0].key.render(|_| Some("5".into())).unwrap(),
            "u$5"
        );
    }

    #[test]
    fn unknown_or_malformed_variables_are_errors() {
        let text =
            entity("representation = \"json\"\n").replace("app:user:{id}", "${PREFIX}user:{id}");
        let errors = parse(&text, &prefix_vars("p:")).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, Some(5));
        assert_eq!(errors[0].entity.as_deref(), Some("user"));
        assert!(
            errors[0].reason.contains("unknown variable ${PREFIX}"),
            "{}",
            errors[0]
        );
        for (bad, fragment) in [
            ("${KEY_PREFIX", "never closed"),
            ("${1X}", "not a variable name"),
            ("${}", "not a variable name"),
        ] {
            let text =
                entity("representation = \"json\"\n").replace("\"users\"", &format!("\"{bad}\""));
            let errors = parse(&text, &prefix_vars("p:")).unwrap_err();
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0].line, Some(3));
            assert!(errors[0].reason.contains(fragment), "{}", errors[0]);
        }
    }

    fn items_catalog() -> Catalog {
        let columns = [
            ("id", "uuid"),
            ("name", "text"),
            ("value", "jsonb"),
            ("version", "bigint"),
            ("created_at", "timestamp with time zone"),
            ("updated_at", "timestamp with time zone"),
        ];
        Catalog {
            tables: HashMap::from([(
                Table::new("public", "items"),
                columns.iter().map(|(n, t)| Column::new(*n, *t)).collect(),
            )]),
        }
    }

    #[test]
    fn the_builtin_file_describes_the_items_table() {
        let model = parse(BUILTIN, &prefix_vars("stalewatch:")).unwrap();
        assert_eq!(model.entities.len(), 1);
        let item = &model.entities[0];
        assert_eq!(item.name, "item");
        assert_eq!(item.table, Table::new("public", "items"));
        assert_eq!(item.table.sql(), "\"public\".\"items\"");
        assert_eq!(item.primary_key, strings(&["id"]));
        assert_eq!(item.key.source(), "stalewatch:item:{id}");
        assert_eq!(
            item.representation,
            Representation::Json {
                columns: Some(strings(&[
                    "id",
                    "name",
                    "value",
                    "version",
                    "created_at",
                    "updated_at"
                ])),
            }
        );
        assert_eq!(item.version.as_deref(), Some("version"));
        assert_eq!(item.policy, CachePolicy::CacheAside);
        assert!(item.ignore.is_empty());
        assert_eq!(validate(&model, &items_catalog()), Ok(()));

        // The same keys as crate::keys makes.
        let keys = crate::keys::Keys::new("sw_test:ab12:");
        let model = parse(BUILTIN, &prefix_vars("sw_test:ab12:")).unwrap();
        let key = &model.entities[0].key;
        let id = uuid::Uuid::now_v7();
        let rendered = key.render(|_| Some(id.to_string())).unwrap();
        assert_eq!(rendered, keys.item(&id));
        assert_eq!(key.pattern(), keys.item_pattern());
        assert_eq!(key.pattern(), "sw_test:ab12:item:*");
        assert_eq!(
            key.parse_key(&rendered),
            Some(vec![("id".into(), id.to_string())])
        );

        // Without KEY_PREFIX the built-in file does not parse.
        let errors = parse(BUILTIN, &no_vars).unwrap_err();
        assert!(errors[0].reason.contains("unknown variable ${KEY_PREFIX}"));
    }

    fn users_catalog() -> Catalog {
        let users = [
            ("id", "bigint"),
            ("email", "character varying(255)"),
            ("profile", "jsonb"),
            ("plan", "text"),
            ("updated_at", "timestamp(3) without time zone"),
        ];
        let members = [("campaign_id", "integer"), ("user_id", "bigint")];
        let cols = |c: &[(&str, &str)]| c.iter().map(|(n, t)| Column::new(*n, *t)).collect();
        Catalog {
            tables: HashMap::from([
                (Table::new("public", "users"), cols(&users)),
                (Table::new("public", "campaign_members"), cols(&members)),
            ]),
        }
    }

    #[test]
    fn the_example_validates() {
        assert_eq!(validate(&ok(EXAMPLE), &users_catalog()), Ok(()));
    }

    #[test]
    fn validation_names_line_entity_and_column() {
        let model = ok(&EXAMPLE
            .replace("app:user:{id}", "app:user:{emial}")
            .replace("value = \"id\"", "value = \"uid\"")
            .replace("[\"email\", \"plan\"]", "[\"email\", \"tier\"]")
            .replace("member = \"{user_id}\"", "member = \"{member_id}\"")
            .replace(
                "[\"campaign_id\", \"user_id\"]",
                "[\"campaign\", \"user_id\"]",
            ));
        let errors = validate(&model, &users_catalog()).unwrap_err();
        let got: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            got,
            vec![
                "ENTITIES line 1, entity \"user\": key template names column \"emial\", which \
                 public.users does not have (did you mean \"email\"?)",
                "ENTITIES line 12, entity \"user_by_email\": value names column \"uid\", which \
                 public.users does not have (did you mean \"id\"?)",
                "ENTITIES line 20, entity \"user_hash\": columns names column \"tier\", which \
                 public.users does not have",
                "ENTITIES line 28, entity \"campaign_members\": primary_key names column \
                 \"campaign\", which public.campaign_members does not have (did you mean \
                 \"campaign_id\"?)",
                "ENTITIES line 28, entity \"campaign_members\": member template names column \
                 \"member_id\", which public.campaign_members does not have",
            ]
        );
    }

    #[test]
    fn validation_of_tables_versions_and_ignore_paths() {
        let model = ok(&format!(
            "{}\n{}\n{}\n{}",
            entity("representation = \"json\"\nversion = \"profile\"\n"),
            entity("representation = 'json'\nversion = 'plan'\nignore = ['profile.a', 'prof.b']\n")
                .replace("\"user\"", "\"u2\"")
                .replace("app:user:", "app:u2:"),
            entity("representation = \"hash\"\nversion = \"updated_at\"\n")
                .replace("\"user\"", "\"u3\"")
                .replace("app:user:", "app:u3:")
                .replace("\"users\"", "\"user\""),
            entity("representation = \"json\"\nversion = \"stamp\"\n")
                .replace("\"user\"", "\"u4\"")
                .replace("app:user:", "app:u4:"),
        ));
        let errors = validate(&model, &users_catalog()).unwrap_err();
        let got: Vec<(Option<usize>, &str, String)> = errors
            .iter()
            .map(|e| (e.line, e.entity.as_deref().unwrap(), e.reason.clone()))
            .collect();
        let not_a_version = "; a version is an integer (smallint, integer, bigint) or a timestamp";
        assert_eq!(
            got,
            vec![
                (
                    Some(1),
                    "user",
                    format!("version column \"profile\" is jsonb{not_a_version}")
                ),
                (
                    Some(9),
                    "u2",
                    format!("version column \"plan\" is text{not_a_version}")
                ),
                (
                    Some(9),
                    "u2",
                    "ignore \"prof.b\" starts with \"prof\", which is not a column of \
                     public.users (did you mean \"profile\"?)"
                        .into()
                ),
                (
                    Some(18),
                    "u3",
                    "table public.user does not exist, or the database user cannot see it \
                     (did you mean \"public.users\"?)"
                        .into()
                ),
                (
                    Some(26),
                    "u4",
                    "version names column \"stamp\", which public.users does not have".into()
                ),
            ]
        );

        let mut catalog = users_catalog();
        let users = Table::new("public", "users");
        for ty in [
            "smallint",
            "integer",
            "bigint",
            "timestamp with time zone",
            "timestamp(6) without time zone",
        ] {
            catalog.tables.get_mut(&users).unwrap()[2].type_name = ty.to_string();
            let model = ok(&entity(
                "representation = \"json\"\nversion = \"profile\"\n",
            ));
            assert_eq!(validate(&model, &catalog), Ok(()), "{ty}");
        }
    }

    #[test]
    fn describe_summarises_each_entity() {
        let text = ok(EXAMPLE).describe();
        for fragment in [
            "4 entities",
            "user (line 1)",
            "  table    public.users, primary key (id)",
            "  key      app:user:{id}  (SCAN MATCH app:user:*)",
            "  holds    a JSON document of id, email, profile, updated_at (json)",
            "  version  updated_at",
            "  policy   cache_aside: a missing key is normal",
            "  ignore   profile.last_login",
            "  holds    the text of column id (string)",
            "  holds    a hash of the fields email, plan (hash)",
            "  version  none: content is compared",
            "campaign_members (line 28)",
            "  table    public.campaign_members, primary key (campaign_id, user_id)",
            "  holds    a set, the member {user_id} for each of its rows (set)",
            "  policy   write_through: a missing key is an incident",
        ] {
            assert!(text.contains(fragment), "{fragment:?} not in\n{text}");
        }
        let one = parse(BUILTIN, &prefix_vars("stalewatch:"))
            .unwrap()
            .describe();
        assert!(one.starts_with("1 entity\n"), "{one}");
    }

    /// The minimal entity, then `rule` (line 7 on).
    fn with_rule(rule: &str) -> String {
        entity("representation = \"json\"\n") + rule
    }

    #[test]
    fn invalidation_rules_parse_with_keys_patterns_and_strategies() {
        let model = ok(&with_rule(
            "[[invalidate]]\ntable = \"products\"\n\
             keys = [\"app:product:{id}:html\", \"app:category:{category_id}:products:*\", \
             \"app:products:count\"]\n\
             \n[[invalidate]]\nname = \"lists\"\ntable = \"shop.products\"\n\
             keys = [\"app:list:*\"]\nstrategy = \"batched\"\nbatch_time = \"20ms\"\n",
        ));
        assert_eq!(model.entities.len(), 1);
        let [a, b] = &model.rules[..] else {
            panic!("{:?}", model.rules)
        };
        assert_eq!((a.name.as_str(), a.line), ("invalidate_7", 7));
        assert_eq!(a.table, Table::new("public", "products"));
        assert_eq!(a.strategy, Strategy::Immediate);
        let shown: Vec<String> = a.keys.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            vec![
                "app:product:{id}:html",
                "app:category:{category_id}:products:*",
                "app:products:count"
            ]
        );
        assert_eq!(
            a.keys.iter().map(|k| k.pattern).collect::<Vec<_>>(),
            vec![false, true, false]
        );
        assert_eq!(a.named_columns(), vec!["id", "category_id"]);
        // A pattern's values are glob-escaped, so one category's pattern is not another's.
        let values = |c: &str| Some(if c == "category_id" { "1*" } else { "5" }.to_string());
        assert_eq!(
            a.keys[1].render(values).as_deref(),
            Some("app:category:1\\*:products:*")
        );
        assert_eq!(
            a.keys[2].render(|_| None).as_deref(),
            Some("app:products:count")
        );
        assert_eq!((b.name.as_str(), b.line), ("lists", 11));
        assert_eq!(
            b.strategy,
            Strategy::Batched {
                count: 1000,
                within: std::time::Duration::from_millis(20)
            }
        );
        let text = model.describe();
        assert!(text.contains("invalidate lists (line 11)"), "{text}");
        assert!(
            text.contains("batched: up to 1000 changes or 20 ms"),
            "{text}"
        );
    }

    #[test]
    fn invalidation_rule_mistakes_have_their_line_and_reason() {
        let rule = |body: &str| with_rule(&format!("[[invalidate]]\n{body}"));
        one_error(&rule("keys = [\"a:{id}\"]\n"), 7, "table is missing");
        one_error(&rule("table = \"t\"\n"), 7, "keys is missing");
        one_error(&rule("table = \"t\"\nkeys = []\n"), 9, "keys is empty");
        one_error(
            &rule("table = \"t\"\nkeys = [\"*\"]\n"),
            9,
            "would delete every key",
        );
        one_error(
            &rule("table = \"t\"\nkeys = [\"a:*:{id}\"]\n"),
            9,
            "may only end a key",
        );
        one_error(
            &rule("table = \"t\"\nkeys = [\"cat:{id}*\"]\n"),
            9,
            "between the last placeholder and '*'",
        );
        one_error(
            &rule("table = \"t\"\nkeys = [\"ok:{id}\", \"a:{id\"]\n"),
            9,
            "never closed",
        );
        one_error(
            &rule("table = \"t\"\nkeys = [\"a:{id}\"]\nstrategy = \"lazy\"\n"),
            10,
            "not immediate or batched",
        );
        one_error(
            &rule("table = \"t\"\nkeys = [\"a:{id}\"]\nbatch_count = 5\n"),
            10,
            "applies to strategy = \"batched\" only",
        );
        one_error(
            &rule("table = \"t\"\nkeys = [\"a:{id}\"]\nstrategy = \"batched\"\nbatch_count = 0\n"),
            11,
            "at least 1",
        );
        one_error(
            &rule(
                "table = \"t\"\nkeys = [\"a:{id}\"]\nstrategy = \"batched\"\nbatch_time = \"0s\"\n",
            ),
            11,
            "from 1ms to 60s",
        );
        one_error(
            &rule("table = \"t\"\nkeys = [\"a:{id}\"]\nttl = \"1h\"\n"),
            10,
            "ttl",
        );
        one_error(
            &rule("name = \"user\"\ntable = \"t\"\nkeys = [\"a:{id}\"]\n"),
            7,
            "already used on line 1",
        );
        one_error(
            &format!("invalidate = 3\n{}", entity("representation = \"json\"\n")),
            1,
            "written as [[invalidate]] tables",
        );
    }

    #[test]
    fn invalidation_rules_are_validated_against_the_table() {
        let model = ok(&with_rule(
            "[[invalidate]]\ntable = \"users\"\nkeys = [\"app:plan:{plann}:*\", \"x:{id}\"]\n\
             \n[[invalidate]]\ntable = \"products\"\nkeys = [\"p:{id}\"]\n",
        ));
        let errors = validate(&model, &users_catalog()).unwrap_err();
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            vec![
                "ENTITIES line 7, entity \"invalidate_7\": keys template names column \"plann\", \
                 which public.users does not have (did you mean \"plan\"?)",
                "ENTITIES line 11, entity \"invalidate_11\": table public.products does not \
                 exist, or the database user cannot see it",
            ]
        );
    }

    #[test]
    fn ingest_is_a_boolean_off_by_default_and_one_entity_per_table() {
        let model = ok(&entity("representation = \"json\"\ningest = true\n"));
        assert!(model.entities[0].ingest);
        assert!(model.describe().contains("ingest:user are upserted"));
        assert!(!ok(&entity("representation = \"json\"\n")).entities[0].ingest);
        one_error(
            &entity("representation = \"json\"\ningest = \"yes\"\n"),
            7,
            "boolean",
        );
        one_error(
            &entity("representation = \"json\"\ningest = true\non_change = \"invalidate\"\n"),
            7,
            "use one or the other",
        );
        // Two entities of one table: only one may ingest its records.
        let second = "\n[[entity]]\nname = \"by_email\"\ntable = \"public.users\"\n\
                      primary_key = [\"id\"]\nkey = \"app:email:{email}\"\n\
                      representation = \"string\"\nvalue = \"id\"\n";
        let both = entity("representation = \"json\"\ningest = true\n") + second;
        assert!(ok(&both).entities[0].ingest);
        one_error(
            &(both.clone() + "ingest = true\n"),
            9,
            "already ingests public.users",
        );
    }
}
