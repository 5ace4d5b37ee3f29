//! A row compared with each way an application may cache it in Redis.
//!
//! | representation | the key holds | compared with |
//! |---|---|---|
//! | JSON ([`compare_json`]) | a JSON object of the row's columns | the row, column by column |
//! | string ([`compare_string`]) | one column's value as text | that value |
//! | hash ([`compare_hash`]) | one field per column, values as text | the row, column by column |
//! | set ([`compare_set`]) | the values of a column over some rows | those values |
//!
//! Column values compare by type ([`value_eq`](super::value_eq),
//! [`text_eq`](super::text_eq)). Every comparison returns a [`Verdict`] whose diff is
//! capped at [`EntityOptions::max_diff_len`] bytes and never holds raw control characters
//! from the cache (they are escaped). Diffs name columns and paths, never values, except
//! versions and set members.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use serde_json::{Map, Value};

use super::typed::{self, cached_document, document_of_text};
use super::{cap, decode, escape, escape_bytes, CachePolicy, Kind, Verdict, Walk, DIFF_PATH_LIMIT};
use crate::column::{infer_version, version_of, ColumnType};

/// How one entity is compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityOptions {
    pub policy: CachePolicy,
    /// The version column, if any: an integer or timestamp column ordering the row's
    /// versions (see [`version_of`]).
    pub version: Option<String>,
    /// Ignored paths, dotted, the first segment a column: `"fetched_at"` ignores a column
    /// (present or not), `"payload.meta.etag"` or `"payload[0].etag"` a path inside a json
    /// column. For [`compare_string`] the paths are inside the value (no column segment).
    pub ignore: Vec<String>,
    /// Cap, in bytes, of [`Verdict::diff`].
    pub max_diff_len: usize,
}

impl Default for EntityOptions {
    /// Cache-aside, no version column, nothing ignored, diffs capped at 256 bytes.
    fn default() -> Self {
        EntityOptions {
            policy: CachePolicy::CacheAside,
            version: None,
            ignore: Vec::new(),
            max_diff_len: 256,
        }
    }
}

/// A DB row as PostgreSQL rendered it with `to_jsonb`/`jsonb_build_object` (column -> JSON
/// value), with each column's type. A column missing from `types` is
/// [`ColumnType::Other`].
#[derive(Debug, Clone, Copy)]
pub struct TypedRow<'a> {
    pub doc: &'a Map<String, Value>,
    pub types: &'a HashMap<String, ColumnType>,
}

impl TypedRow<'_> {
    /// The column's type ([`ColumnType::Other`] when unknown).
    pub fn type_of(&self, column: &str) -> ColumnType {
        self.types.get(column).copied().unwrap_or(ColumnType::Other)
    }
}

/// Compares a row with a key holding a JSON object of its columns.
///
/// Each column of the row is compared with the object's field of the same name by the
/// column's type (json columns path by path, with the ignore paths); a column missing from
/// the object, or a field that is not a column, is a difference. With a version column whose
/// value both sides have: cache older is [`Kind::Stale`], newer is [`Kind::Ahead`], equal but
/// content different is [`Kind::ValueMismatch`]; otherwise (no version column, or a side
/// without a readable version) any difference is [`Kind::ValueMismatch`].
///
/// No row and a key: [`Kind::OrphanInCache`]; a row and no key: [`Kind::Match`] under
/// cache-aside, [`Kind::MissingInCache`] under write-through; a key that is not a JSON
/// object: [`Kind::Undecodable`]. The versions of the verdict are [`version_of`] the version
/// column on each side (the cached one, without a row to give its type, an integer or a
/// timestamp, whichever it reads as).
pub fn compare_json(
    db: Option<TypedRow<'_>>,
    cached: Option<&[u8]>,
    opts: &EntityOptions,
) -> Verdict {
    let decoded = cached.map(decode);
    let fields: Option<BTreeMap<&str, Cached<'_>>> = match &decoded {
        Some(Ok(Value::Object(m))) => Some(
            m.iter()
                .map(|(k, v)| (k.as_str(), Cached::Json(v)))
                .collect(),
        ),
        _ => None,
    };
    let (db_version, cache_version) = versions(db, fields.as_ref(), opts);
    let (kind, diff) = match (db, &decoded, &fields) {
        (None, None, _) => (Kind::Match, String::new()),
        (None, Some(_), _) => orphan(),
        (Some(_), None, _) => absent(opts.policy),
        (Some(_), Some(Err(why)), _) => (Kind::Undecodable, why.clone()),
        (Some(row), Some(Ok(_)), Some(fields)) => {
            compare_columns(row, fields, &db_version, &cache_version, opts, false)
        }
        // `decode` only returns objects.
        (Some(_), Some(Ok(_)), None) => (
            Kind::Undecodable,
            "cached value is not a JSON object".to_owned(),
        ),
    };
    verdict(kind, db_version, cache_version, diff, opts)
}

/// Compares one column's value with a key holding it as text (a UTF-8 string).
///
/// The text is compared by the column's type ([`text_eq`](super::text_eq)): numbers,
/// booleans, uuids, timestamps and dates by value, json canonically (with the ignore paths,
/// here paths inside the value), text exactly; SQL NULL matches the empty string. Kinds as
/// for [`compare_json`], without versions; text that is not UTF-8, or a json column's text
/// that is not JSON, is [`Kind::Undecodable`].
pub fn compare_string(
    db: Option<(&Value, ColumnType)>,
    cached: Option<&[u8]>,
    opts: &EntityOptions,
) -> Verdict {
    let (kind, diff) = match (db, cached) {
        (None, None) => (Kind::Match, String::new()),
        (None, Some(_)) => orphan(),
        (Some(_), None) => absent(opts.policy),
        (Some((value, ty)), Some(bytes)) => match std::str::from_utf8(bytes) {
            Err(_) => (
                Kind::Undecodable,
                "cached value is not UTF-8 text".to_owned(),
            ),
            Ok(text) => compare_text(value, ty, text, opts),
        },
    };
    verdict(kind, None, None, diff, opts)
}

/// Compares a row with a hash holding one field per column, field values as text.
///
/// Fields compare by the column's type as in [`compare_string`]; a column that is SQL NULL
/// matches an absent field or an empty one. A non-null column without a field, or a field
/// that is not a column, is a difference; the diff names the differing fields. An empty hash
/// is no hash (Redis deletes empty hashes). Kinds and versions as for [`compare_json`]; a
/// compared field whose value is not UTF-8 is [`Kind::Undecodable`].
pub fn compare_hash(
    db: Option<TypedRow<'_>>,
    cached: Option<&HashMap<String, Vec<u8>>>,
    opts: &EntityOptions,
) -> Verdict {
    let cached = cached.filter(|h| !h.is_empty());
    let fields: Option<BTreeMap<&str, Cached<'_>>> = cached.map(|h| {
        h.iter()
            .map(|(k, b)| {
                let v = std::str::from_utf8(b).map_or(Cached::NotUtf8, Cached::Text);
                (k.as_str(), v)
            })
            .collect()
    });
    let (db_version, cache_version) = versions(db, fields.as_ref(), opts);
    let (kind, diff) = match (db, &fields) {
        (None, None) => (Kind::Match, String::new()),
        (None, Some(_)) => orphan(),
        (Some(_), None) => absent(opts.policy),
        (Some(row), Some(fields)) => {
            let not_utf8 = fields.iter().find(|(k, v)| {
                matches!(v, Cached::NotUtf8) && row.doc.contains_key(**k) && !ignored(k, opts)
            });
            match not_utf8 {
                Some((k, _)) => (
                    Kind::Undecodable,
                    format!("hash field {} is not UTF-8 text", escape(k)),
                ),
                None => compare_columns(row, fields, &db_version, &cache_version, opts, true),
            }
        }
    };
    verdict(kind, db_version, cache_version, diff, opts)
}

/// Compares the values a set should hold (the rows' values, as text) with the set's
/// members, exactly, as bytes.
///
/// No values (no rows for this set key) and a set: [`Kind::OrphanInCache`]; values and no
/// set: [`Kind::Match`] under cache-aside, [`Kind::MissingInCache`] under write-through; both:
/// [`Kind::Match`] when equal as sets, else [`Kind::ValueMismatch`] with a diff listing the
/// members missing from the cache and those that should not be there, e.g.
/// `missing: 17, 42; not in the table: 9` (at most 8 of each, then `+N more`). An empty set
/// on either side counts as none (Redis deletes empty sets). No versions.
pub fn compare_set(
    db_members: Option<&BTreeSet<String>>,
    cached: Option<&BTreeSet<Vec<u8>>>,
    opts: &EntityOptions,
) -> Verdict {
    let db = db_members.filter(|s| !s.is_empty());
    let cached = cached.filter(|s| !s.is_empty());
    let (kind, diff) = match (db, cached) {
        (None, None) => (Kind::Match, String::new()),
        (None, Some(_)) => (
            Kind::OrphanInCache,
            "no rows for this set, key still cached".to_owned(),
        ),
        (Some(_), None) => absent(opts.policy),
        (Some(db), Some(cached)) => {
            let missing = db.iter().filter(|m| !cached.contains(m.as_bytes()));
            let extra = cached
                .iter()
                .filter(|m| !std::str::from_utf8(m).is_ok_and(|s| db.contains(s)));
            let mut diff = String::new();
            list(
                &mut diff,
                "missing",
                missing.map(|m| escape(m).into_owned()),
            );
            list(
                &mut diff,
                "not in the table",
                extra.map(|m| escape_bytes(m)),
            );
            if diff.is_empty() {
                (Kind::Match, diff)
            } else {
                (Kind::ValueMismatch, diff)
            }
        }
    };
    verdict(kind, None, None, diff, opts)
}

/// A cached column: a JSON value, or text (a hash field), or bytes that are not text.
#[derive(Debug, Clone, Copy)]
enum Cached<'a> {
    Json(&'a Value),
    Text(&'a str),
    NotUtf8,
}

/// A version: the value for ordering, and how the diff shows it.
type Version = Option<(i64, String)>;

fn verdict(kind: Kind, db: Version, cache: Version, diff: String, opts: &EntityOptions) -> Verdict {
    Verdict {
        kind,
        db_version: db.map(|v| v.0),
        cache_version: cache.map(|v| v.0),
        diff: cap(diff, opts.max_diff_len),
    }
}

fn orphan() -> (Kind, String) {
    (
        Kind::OrphanInCache,
        "row absent from the database, key still cached".to_owned(),
    )
}

fn absent(policy: CachePolicy) -> (Kind, String) {
    match policy {
        CachePolicy::CacheAside => (Kind::Match, String::new()),
        CachePolicy::WriteThrough => (Kind::MissingInCache, "key absent from the cache".to_owned()),
    }
}

fn ignored(column: &str, opts: &EntityOptions) -> bool {
    opts.ignore.iter().any(|p| p == column)
}

/// The version on each side, when there is a version column.
fn versions(
    db: Option<TypedRow<'_>>,
    cached: Option<&BTreeMap<&str, Cached<'_>>>,
    opts: &EntityOptions,
) -> (Version, Version) {
    let Some(col) = opts.version.as_deref() else {
        return (None, None);
    };
    let ty = db.map(|row| row.type_of(col));
    let read = |v: &Value| -> Version {
        let n = match ty {
            Some(ty) => version_of(ty, v)?,
            None => infer_version(v)?,
        };
        let shown = match (v, ty) {
            (_, Some(ColumnType::Integer | ColumnType::Numeric)) => n.to_string(),
            (Value::String(s), _) if n.to_string() != *s => escape(s).into_owned(),
            _ => n.to_string(),
        };
        Some((n, shown))
    };
    let db_version = db.and_then(|row| read(row.doc.get(col)?));
    let cache_version = match cached.and_then(|c| c.get(col)) {
        Some(Cached::Json(v)) => read(v),
        Some(Cached::Text(t)) => read(&Value::String((*t).to_owned())),
        _ => None,
    };
    (db_version, cache_version)
}

/// A row against its cached columns (`text`: the cached columns are text, where SQL NULL
/// may be an absent field).
fn compare_columns(
    row: TypedRow<'_>,
    cached: &BTreeMap<&str, Cached<'_>>,
    db_version: &Version,
    cache_version: &Version,
    opts: &EntityOptions,
    text: bool,
) -> (Kind, String) {
    let mut diff = String::new();
    let mut kind = None;
    let mut skip = None;
    if let (Some((d, ds)), Some((c, cs))) = (db_version, cache_version) {
        if d != c {
            let _ = write!(diff, "version {ds} -> {cs}");
            kind = Some(if c < d { Kind::Stale } else { Kind::Ahead });
            skip = opts.version.as_deref();
        }
    }

    let mut diffs = Diffs::default();
    // Both sides are sorted by column (serde_json's Map is a BTreeMap without its
    // `preserve_order` feature, which nothing here enables): walk them together, in column
    // order, without collecting the union first.
    let mut db_cols = row.doc.iter().peekable();
    let mut cached_cols = cached.iter().peekable();
    loop {
        let (col, db, c) = match (db_cols.peek(), cached_cols.peek()) {
            (None, None) => break,
            (Some((d, _)), Some((c, _))) if d.as_str() == **c => {
                let (d, dv) = db_cols.next().unwrap();
                let (_, cv) = cached_cols.next().unwrap();
                (d.as_str(), Some(dv), Some(cv))
            }
            (Some((d, _)), c) if c.is_none_or(|(c, _)| d.as_str() < **c) => {
                let (d, dv) = db_cols.next().unwrap();
                (d.as_str(), Some(dv), None)
            }
            _ => {
                let (c, cv) = cached_cols.next().unwrap();
                (*c, None, Some(cv))
            }
        };
        if ignored(col, opts) || skip == Some(col) {
            continue;
        }
        match (db, c) {
            (Some(Value::Null), None) if text => {}
            (Some(_), None) => diffs.push(format!("{} (missing)", escape(col))),
            (None, Some(_)) => diffs.push(format!("{} (extra)", escape(col))),
            (Some(db), Some(c)) => {
                diff_column(col, row.type_of(col), db, *c, &opts.ignore, &mut diffs)
            }
            (None, None) => {}
        }
    }

    if diffs.total > 0 {
        if !diff.is_empty() {
            diff.push_str("; ");
        }
        diff.push_str("fields differ: ");
        diffs.write(&mut diff);
    }
    let kind = kind.unwrap_or(if diffs.total == 0 {
        Kind::Match
    } else {
        Kind::ValueMismatch
    });
    (kind, diff)
}

/// Records the column (or, for a json column, the paths inside it) when the values differ.
fn diff_column(
    col: &str,
    ty: ColumnType,
    db: &Value,
    cached: Cached<'_>,
    ignore: &[String],
    diffs: &mut Diffs,
) {
    let inner = inner_ignore(col, ignore);
    let same = match cached {
        Cached::Json(v) => typed::value_eq(ty, db, v, &inner),
        Cached::Text(t) => typed::text_eq(ty, db, t, &inner),
        Cached::NotUtf8 => false,
    };
    if same {
        return;
    }
    if ty.is_document() {
        let doc: Option<Cow<'_, Value>> = match cached {
            Cached::Json(v) => Some(cached_document(ty, db, v)),
            Cached::Text(t) => Some(Cow::Owned(document_of_text(t))),
            Cached::NotUtf8 => None,
        };
        if let Some(doc) = doc {
            let before = diffs.total;
            diffs.walk(col, db, &doc, ignore);
            if diffs.total > before {
                return;
            }
        }
    }
    diffs.push(escape(col).into_owned());
}

/// The ignore paths inside `col`, relative to its value (`col.a.b` -> `a.b`,
/// `col[0].x` -> `[0].x`).
fn inner_ignore(col: &str, ignore: &[String]) -> Vec<String> {
    ignore
        .iter()
        .filter_map(|p| {
            let rest = p.strip_prefix(col)?;
            if let Some(r) = rest.strip_prefix('.') {
                Some(r.to_owned())
            } else if rest.starts_with('[') {
                Some(rest.to_owned())
            } else {
                None
            }
        })
        .collect()
}

/// One column's value against its text (a string key).
fn compare_text(db: &Value, ty: ColumnType, text: &str, opts: &EntityOptions) -> (Kind, String) {
    if typed::text_eq(ty, db, text, &opts.ignore) {
        return (Kind::Match, String::new());
    }
    if !ty.is_document() {
        return (Kind::ValueMismatch, "value differs".to_owned());
    }
    let parsed = match serde_json::from_str::<Value>(text) {
        Ok(v) => v,
        Err(e) if ty == ColumnType::Json && !db.is_string() && !db.is_null() => {
            return (
                Kind::Undecodable,
                format!("cached value is not valid JSON: {e}"),
            );
        }
        Err(_) => Value::String(text.to_owned()),
    };
    let mut walk = Walk::new(&opts.ignore, DIFF_PATH_LIMIT, None);
    walk.visit(Some(db), Some(&parsed));
    if walk.paths.is_empty() || walk.paths == ["$"] {
        return (Kind::ValueMismatch, "value differs".to_owned());
    }
    let mut diffs = Diffs::default();
    diffs.add(walk);
    let mut diff = "value differs at: ".to_owned();
    diffs.write(&mut diff);
    (Kind::ValueMismatch, diff)
}

/// Differences found, the first [`DIFF_PATH_LIMIT`] of them named.
#[derive(Default)]
struct Diffs {
    shown: Vec<String>,
    total: usize,
}

impl Diffs {
    fn push(&mut self, s: String) {
        self.total += 1;
        if self.shown.len() < DIFF_PATH_LIMIT {
            self.shown.push(s);
        }
    }

    /// The differing paths of a json column, named from the column.
    fn walk(&mut self, col: &str, db: &Value, cached: &Value, ignore: &[String]) {
        let mut walk = Walk::new(ignore, DIFF_PATH_LIMIT, None);
        walk.path = col.to_owned();
        walk.visit(Some(db), Some(cached));
        self.add(walk);
    }

    fn add(&mut self, walk: Walk<'_>) {
        let unnamed = walk.total - walk.paths.len();
        for p in walk.paths {
            self.push(escape(&p).into_owned());
        }
        self.total += unnamed;
    }

    fn write(&self, out: &mut String) {
        out.push_str(&self.shown.join(", "));
        if self.total > self.shown.len() {
            let _ = write!(out, ", +{} more", self.total - self.shown.len());
        }
    }
}

/// Appends `label: a, b, +N more` (after a `; ` when `out` is not empty); nothing when
/// `items` is empty.
fn list(out: &mut String, label: &str, items: impl Iterator<Item = String>) {
    let mut diffs = Diffs::default();
    for item in items {
        diffs.push(item);
    }
    if diffs.total == 0 {
        return;
    }
    if !out.is_empty() {
        out.push_str("; ");
    }
    out.push_str(label);
    out.push_str(": ");
    diffs.write(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;
    use ColumnType::*;

    fn types(pairs: &[(&str, ColumnType)]) -> HashMap<String, ColumnType> {
        pairs.iter().map(|(k, t)| (k.to_string(), *t)).collect()
    }

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn opts() -> EntityOptions {
        EntityOptions::default()
    }

    fn wt() -> EntityOptions {
        EntityOptions {
            policy: CachePolicy::WriteThrough,
            ..opts()
        }
    }

    fn with_version(col: &str) -> EntityOptions {
        EntityOptions {
            version: Some(col.to_owned()),
            ..opts()
        }
    }

    /// No raw control (or invisible format) characters.
    fn clean(diff: &str) -> bool {
        !diff.chars().any(|c| {
            c.is_control() || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}')
        })
    }

    /// An `items` row of an existing application, as `to_jsonb` renders it.
    fn item_types() -> HashMap<String, ColumnType> {
        types(&[
            ("id", Integer),
            ("owner", Uuid),
            ("name", Text),
            ("price", Numeric),
            ("score", Float),
            ("active", Boolean),
            ("born", Date),
            ("updated_at", Timestamptz),
            ("payload", Json),
            ("tags", Other),
        ])
    }

    fn item_doc() -> Map<String, Value> {
        obj(serde_json::from_str(
            r#"{"id": 9007199254740993, "owner": "0190d5a4-6f2e-7c3b-9a1d-3e5f7a9b1c2d",
                "name": "Widget", "price": 1.50, "score": 0.1, "active": true,
                "born": "2026-11-23", "updated_at": "2026-11-23T20:53:24.927197+00:00",
                "payload": {"color": "red", "meta": {"etag": "a", "src": "db"}, "sizes": [1, 2]},
                "tags": ["x", "y"]}"#,
        )
        .unwrap())
    }

    const ITEM_CACHED: &str = r#"{"id": "9007199254740993", "owner": "0190D5A4-6F2E-7C3B-9A1D-3E5F7A9B1C2D",
        "name": "Widget", "price": "1.5", "score": 1e-1, "active": true,
        "born": "2026-11-23", "updated_at": "2026-11-23T20:53:24.927197Z",
        "payload": {"sizes": [1.0, 2], "meta": {"src": "db", "etag": "a"}, "color": "red"},
        "tags": ["x", "y"]}"#;

    fn json_run(
        doc: &Map<String, Value>,
        ty: &HashMap<String, ColumnType>,
        cached: &str,
        o: &EntityOptions,
    ) -> Verdict {
        compare_json(
            Some(TypedRow { doc, types: ty }),
            Some(cached.as_bytes()),
            o,
        )
    }

    fn edit(cached: &str, f: impl FnOnce(&mut Map<String, Value>)) -> String {
        let mut m = obj(serde_json::from_str(cached).unwrap());
        f(&mut m);
        serde_json::to_string(&m).unwrap()
    }

    // ---- JSON documents ----

    #[test]
    fn json_plus_zero_offset_and_z_are_the_same_instant() {
        let (doc, ty) = (item_doc(), item_types());
        for o in [opts(), wt(), with_version("updated_at"), with_version("id")] {
            let v = json_run(&doc, &ty, ITEM_CACHED, &o);
            assert_eq!(v.kind, Kind::Match, "{}", v.diff);
            assert!(v.diff.is_empty());
        }
        for spelling in [
            "2026-11-23T20:53:24.927197000Z",
            "2026-11-23 20:53:24.927197+00",
            "2026-11-23T21:53:24.927197+01:00",
        ] {
            let cached = edit(ITEM_CACHED, |m| {
                m.insert("updated_at".into(), json!(spelling));
            });
            assert_eq!(
                json_run(&doc, &ty, &cached, &opts()).kind,
                Kind::Match,
                "{spelling}"
            );
        }
        let cached = edit(ITEM_CACHED, |m| {
            m.insert("updated_at".into(), json!("2026-11-23T20:53:24.927198Z"));
        });
        let v = json_run(&doc, &ty, &cached, &opts());
        assert_eq!(v.kind, Kind::ValueMismatch);
        assert_eq!(v.diff, "fields differ: updated_at");
    }

    #[test]
    fn json_each_column_by_its_type() {
        let (doc, ty) = (item_doc(), item_types());
        for (col, value) in [
            ("id", json!("9007199254740992")),
            ("id", json!(9007199254740992u64)),
            ("owner", json!("0190d5a4-6f2e-7c3b-9a1d-3e5f7a9b1c2e")),
            ("name", json!("widget")),
            ("price", json!("1.51")),
            ("score", json!(0.2)),
            ("active", json!("true")),
            ("active", json!(false)),
            ("born", json!("2026-11-24")),
            ("tags", json!(["y", "x"])),
        ] {
            let cached = edit(ITEM_CACHED, |m| {
                m.insert(col.into(), value.clone());
            });
            let v = json_run(&doc, &ty, &cached, &opts());
            assert_eq!(v.kind, Kind::ValueMismatch, "{col} {value}");
            if col == "tags" {
                assert_eq!(v.diff, "fields differ: tags[0], tags[1]");
            } else {
                assert_eq!(v.diff, format!("fields differ: {col}"), "{value}");
            }
        }
        // A text column's "1" is not 1; an integer column's is.
        let ty2 = types(&[("code", Text), ("n", Integer)]);
        let doc2 = obj(json!({"code": "1", "n": 1}));
        assert_eq!(
            json_run(&doc2, &ty2, r#"{"code":"1","n":"1"}"#, &opts()).kind,
            Kind::Match
        );
        assert_eq!(
            json_run(&doc2, &ty2, r#"{"code":"1","n":1.0}"#, &opts()).kind,
            Kind::Match
        );
        let v = json_run(&doc2, &ty2, r#"{"code":1,"n":1}"#, &opts());
        assert_eq!(
            (v.kind, v.diff.as_str()),
            (Kind::ValueMismatch, "fields differ: code")
        );
    }

    #[test]
    fn json_missing_and_extra_fields() {
        let (doc, ty) = (item_doc(), item_types());
        let cached = edit(ITEM_CACHED, |m| {
            m.remove("name");
            m.insert("zz".into(), json!(1));
            m.insert("aa".into(), Value::Null);
        });
        let v = json_run(&doc, &ty, &cached, &opts());
        assert_eq!(v.kind, Kind::ValueMismatch);
        assert_eq!(
            v.diff,
            "fields differ: aa (extra), name (missing), zz (extra)"
        );
        // Ignored columns may be missing, extra or different.
        let o = EntityOptions {
            ignore: strs(&["name", "zz", "aa"]),
            ..opts()
        };
        assert_eq!(json_run(&doc, &ty, &cached, &o).kind, Kind::Match);
        // In a JSON document, null is a value: not the same as absent.
        let doc2 = obj(json!({"id": 1, "note": null}));
        let ty2 = types(&[("id", Integer), ("note", Text)]);
        assert_eq!(
            json_run(&doc2, &ty2, r#"{"id":1,"note":null}"#, &opts()).kind,
            Kind::Match
        );
        let v = json_run(&doc2, &ty2, r#"{"id":1}"#, &opts());
        assert_eq!(v.diff, "fields differ: note (missing)");
        let v = json_run(&doc2, &ty2, r#"{"id":1,"note":""}"#, &opts());
        assert_eq!(v.diff, "fields differ: note");
        // A column without a type is compared canonically.
        let doc3 = obj(json!({"x": {"a": 1}}));
        assert_eq!(
            json_run(&doc3, &HashMap::new(), r#"{"x":{"a":1.0}}"#, &opts()).kind,
            Kind::Match
        );
    }

    #[test]
    fn json_columns_with_ignore_paths() {
        let (doc, ty) = (item_doc(), item_types());
        let cached = edit(ITEM_CACHED, |m| {
            m["payload"]["meta"]["etag"] = json!("b");
            m["payload"]["sizes"][1] = json!(3);
        });
        let v = json_run(&doc, &ty, &cached, &opts());
        assert_eq!(v.kind, Kind::ValueMismatch);
        assert_eq!(v.diff, "fields differ: payload.meta.etag, payload.sizes[1]");
        let o = EntityOptions {
            ignore: strs(&["payload.meta.etag", "payload.sizes[1]"]),
            ..opts()
        };
        assert_eq!(json_run(&doc, &ty, &cached, &o).kind, Kind::Match);
        let o = EntityOptions {
            ignore: strs(&["payload.meta"]),
            ..opts()
        };
        assert_eq!(
            json_run(&doc, &ty, &cached, &o).diff,
            "fields differ: payload.sizes[1]"
        );
        // An ignore path of another column that starts with the same letters does not apply.
        let o = EntityOptions {
            ignore: strs(&["pay.meta.etag", "payloadx.meta.etag"]),
            ..opts()
        };
        assert_eq!(json_run(&doc, &ty, &cached, &o).kind, Kind::ValueMismatch);
        // The whole json column differs in kind: named as the column.
        let cached = edit(ITEM_CACHED, |m| {
            m.insert("payload".into(), json!([1]));
        });
        assert_eq!(
            json_run(&doc, &ty, &cached, &opts()).diff,
            "fields differ: payload"
        );
        // A json column cached as a string holding its JSON.
        let cached = edit(ITEM_CACHED, |m| {
            let text = m["payload"].to_string();
            m.insert("payload".into(), json!(text));
        });
        assert_eq!(json_run(&doc, &ty, &cached, &opts()).kind, Kind::Match);
    }

    #[test]
    fn json_integer_versions() {
        let ty = types(&[("id", Integer), ("version", Integer), ("name", Text)]);
        let doc = obj(json!({"id": 1, "version": 3, "name": "new"}));
        let o = with_version("version");
        for (cached, kind, versions, diff) in [
            (
                r#"{"id":1,"version":2,"name":"old"}"#,
                Kind::Stale,
                (Some(3), Some(2)),
                "version 3 -> 2; fields differ: name",
            ),
            (
                r#"{"id":1,"version":"2","name":"new"}"#,
                Kind::Stale,
                (Some(3), Some(2)),
                "version 3 -> 2",
            ),
            (
                r#"{"id":1,"version":5,"name":"newer"}"#,
                Kind::Ahead,
                (Some(3), Some(5)),
                "version 3 -> 5; fields differ: name",
            ),
            (
                r#"{"id":1,"version":"3","name":"other"}"#,
                Kind::ValueMismatch,
                (Some(3), Some(3)),
                "fields differ: name",
            ),
            (
                r#"{"id":1,"version":3.0,"name":"new"}"#,
                Kind::Match,
                (Some(3), Some(3)),
                "",
            ),
            (
                r#"{"id":1,"name":"new"}"#,
                Kind::ValueMismatch,
                (Some(3), None),
                "fields differ: version (missing)",
            ),
            (
                r#"{"id":1,"version":"x","name":"new"}"#,
                Kind::ValueMismatch,
                (Some(3), None),
                "fields differ: version",
            ),
        ] {
            let v = json_run(&doc, &ty, cached, &o);
            assert_eq!(v.kind, kind, "{cached}");
            assert_eq!((v.db_version, v.cache_version), versions, "{cached}");
            assert_eq!(v.diff, diff, "{cached}");
        }
        // Without a version column, a different version is a different value.
        let v = json_run(&doc, &ty, r#"{"id":1,"version":2,"name":"new"}"#, &opts());
        assert_eq!(
            (v.kind, v.diff.as_str()),
            (Kind::ValueMismatch, "fields differ: version")
        );
        assert_eq!((v.db_version, v.cache_version), (None, None));
        // Big versions order exactly.
        let doc = obj(
            serde_json::from_str(r#"{"id":1,"version":9007199254740993,"name":"new"}"#).unwrap(),
        );
        let v = json_run(
            &doc,
            &ty,
            r#"{"id":1,"version":"9007199254740992","name":"new"}"#,
            &o,
        );
        assert_eq!(v.kind, Kind::Stale);
        assert_eq!(v.diff, "version 9007199254740993 -> 9007199254740992");
    }

    #[test]
    fn json_timestamp_versions() {
        let ty = types(&[("id", Integer), ("updated_at", Timestamptz), ("name", Text)]);
        let doc =
            obj(json!({"id": 1, "updated_at": "2026-11-23T20:53:24.927197+00:00", "name": "a"}));
        let o = with_version("updated_at");
        let db_us = 1_795_467_204_927_197;
        let v = json_run(
            &doc,
            &ty,
            r#"{"id":1,"updated_at":"2026-11-23 21:53:24.927197+01","name":"a"}"#,
            &o,
        );
        assert_eq!(v.kind, Kind::Match, "{}", v.diff);
        assert_eq!((v.db_version, v.cache_version), (Some(db_us), Some(db_us)));

        let v = json_run(
            &doc,
            &ty,
            r#"{"id":1,"updated_at":"2026-11-23T20:53:24.927196Z","name":"b"}"#,
            &o,
        );
        assert_eq!(v.kind, Kind::Stale);
        assert_eq!(
            (v.db_version, v.cache_version),
            (Some(db_us), Some(db_us - 1))
        );
        assert_eq!(
            v.diff,
            "version 2026-11-23T20:53:24.927197+00:00 -> 2026-11-23T20:53:24.927196Z; fields differ: name"
        );
        // Later instant with an earlier wall clock (another offset): ahead.
        let v = json_run(
            &doc,
            &ty,
            r#"{"id":1,"updated_at":"2026-11-23T18:00:00-05:00","name":"a"}"#,
            &o,
        );
        assert_eq!(v.kind, Kind::Ahead);
        // Same microsecond, a nanosecond apart: same version, different value.
        let v = json_run(
            &doc,
            &ty,
            r#"{"id":1,"updated_at":"2026-11-23T20:53:24.927197001Z","name":"a"}"#,
            &o,
        );
        assert_eq!(v.kind, Kind::ValueMismatch);
        assert_eq!(v.diff, "fields differ: updated_at");
    }

    #[test]
    fn json_every_kind_without_content() {
        let ty = types(&[("id", Integer), ("version", Integer)]);
        let doc = obj(json!({"id": 1, "version": 7}));
        let row = Some(TypedRow {
            doc: &doc,
            types: &ty,
        });
        let o = with_version("version");
        for p in [opts(), wt()] {
            let v = compare_json(None, None, &p);
            assert_eq!((v.kind, v.diff.as_str()), (Kind::Match, ""));
        }
        let v = compare_json(row, None, &o);
        assert_eq!(
            (v.kind, v.db_version, v.cache_version),
            (Kind::Match, Some(7), None)
        );
        assert!(v.diff.is_empty());
        let v = compare_json(
            row,
            None,
            &EntityOptions {
                policy: CachePolicy::WriteThrough,
                ..o.clone()
            },
        );
        assert_eq!(
            (v.kind, v.diff.as_str()),
            (Kind::MissingInCache, "key absent from the cache")
        );
        assert_eq!(v.db_version, Some(7));

        // Orphans: the cached version's type is guessed.
        let v = compare_json(None, Some(br#"{"id":1,"version":4}"#), &o);
        assert_eq!(
            (v.kind, v.db_version, v.cache_version),
            (Kind::OrphanInCache, None, Some(4))
        );
        assert_eq!(v.diff, "row absent from the database, key still cached");
        let v = compare_json(
            None,
            Some(br#"{"version":"1970-01-01T00:00:01+00:00"}"#),
            &o,
        );
        assert_eq!(v.cache_version, Some(1_000_000));
        let v = compare_json(None, Some(b"\xff"), &o);
        assert_eq!((v.kind, v.cache_version), (Kind::OrphanInCache, None));

        for bytes in [
            &b"\xff"[..],
            b"",
            b"{\"id\":",
            b"[1]",
            b"\"s\"",
            b"null",
            b"{\"id\":\"\xc3\x28\"}",
        ] {
            let v = compare_json(row, Some(bytes), &o);
            assert_eq!(v.kind, Kind::Undecodable, "{bytes:?}");
            assert_eq!((v.db_version, v.cache_version), (Some(7), None));
            assert!(!v.diff.is_empty() && clean(&v.diff));
        }
        assert_eq!(
            compare_json(row, Some(b"[1]"), &o).diff,
            "cached value is a JSON array, expected an object"
        );
    }

    #[test]
    fn json_diff_is_named_then_counted_then_capped() {
        let n = 40;
        let ty: HashMap<String, ColumnType> =
            (0..n).map(|i| (format!("fïeld_{i:02}"), Integer)).collect();
        let doc: Map<String, Value> = (0..n)
            .map(|i| (format!("fïeld_{i:02}"), json!(i)))
            .collect();
        let cached: Map<String, Value> = (0..n)
            .map(|i| (format!("fïeld_{i:02}"), json!(i + 1)))
            .collect();
        let cached = serde_json::to_string(&cached).unwrap();
        let full = json_run(
            &doc,
            &ty,
            &cached,
            &EntityOptions {
                max_diff_len: 10_000,
                ..opts()
            },
        )
        .diff;
        assert!(
            full.starts_with("fields differ: fïeld_00, fïeld_01,"),
            "{full}"
        );
        assert!(full.ends_with("fïeld_07, +32 more"), "{full}");
        for max in 0..full.len() + 2 {
            let v = json_run(
                &doc,
                &ty,
                &cached,
                &EntityOptions {
                    max_diff_len: max,
                    ..opts()
                },
            );
            assert_eq!(v.kind, Kind::ValueMismatch);
            assert!(v.diff.len() <= max);
            if max >= full.len() {
                assert_eq!(v.diff, full);
            } else if max >= 3 {
                assert!(full.starts_with(v.diff.trim_end_matches('…')));
            }
        }
    }

    #[test]
    fn json_control_characters_are_escaped() {
        let ty = types(&[("id", Integer), ("payload", Json)]);
        let doc = obj(json!({"id": 1, "payload": {"a": 1}}));
        let cached = json!({
            "id": 1,
            "payload": {"a": 1, "b\u{1b}[31m\nred": 2},
            "evil\r\n\u{7}\u{202e}x\\y": true,
        })
        .to_string();
        let v = json_run(
            &doc,
            &ty,
            &cached,
            &EntityOptions {
                max_diff_len: 10_000,
                ..opts()
            },
        );
        assert_eq!(v.kind, Kind::ValueMismatch);
        assert!(clean(&v.diff), "{:?}", v.diff);
        assert_eq!(
            v.diff,
            r"fields differ: evil\r\n\u{7}\u{202e}x\\y (extra), payload.b\u{1b}[31m\nred"
        );
    }

    // ---- string keys ----

    fn string_run(db: &Value, ty: ColumnType, cached: &[u8], o: &EntityOptions) -> Verdict {
        compare_string(Some((db, ty)), Some(cached), o)
    }

    #[test]
    fn string_values_by_type() {
        let o = opts();
        for (db, ty, cached) in [
            (
                json!("2026-11-23T20:53:24.927197+00:00"),
                Timestamptz,
                "2026-11-23T20:53:24.927197Z",
            ),
            (
                json!("2026-11-23T20:53:24.927197+00:00"),
                Timestamptz,
                "2026-11-23 20:53:24.927197+00",
            ),
            (json!(42), Integer, "42"),
            (json!(42), Integer, "42.0"),
            (
                serde_json::from_str("9007199254740993").unwrap(),
                Integer,
                "9007199254740993",
            ),
            (json!(1.5), Float, "1.50"),
            (json!(true), Boolean, "t"),
            (json!(true), Boolean, "True"),
            (json!(false), Boolean, "0"),
            (
                json!("0190d5a4-6f2e-7c3b-9a1d-3e5f7a9b1c2d"),
                Uuid,
                "0190D5A4-6F2E-7C3B-9A1D-3E5F7A9B1C2D",
            ),
            (json!("hello"), Text, "hello"),
            (json!({"a": [1, 2]}), Json, "{ \"a\" : [1.0, 2] }"),
            (Value::Null, Text, ""),
            (Value::Null, Integer, ""),
        ] {
            let v = string_run(&db, ty, cached.as_bytes(), &o);
            assert_eq!(v.kind, Kind::Match, "{ty} {db} {cached}");
            assert!(v.diff.is_empty());
            assert_eq!((v.db_version, v.cache_version), (None, None));
        }
        for (db, ty, cached) in [
            (
                json!("2026-11-23T20:53:24.927197+00:00"),
                Timestamptz,
                "2026-11-23T20:53:24.927197+01:00",
            ),
            (json!(42), Integer, "43"),
            (
                serde_json::from_str("9007199254740993").unwrap(),
                Integer,
                "9007199254740992",
            ),
            (json!("1"), Text, "1.0"),
            (json!("1"), Text, "\"1\""),
            (json!(true), Boolean, "yes"),
            (json!(true), Boolean, "false"),
            (Value::Null, Text, "null"),
        ] {
            let v = string_run(&db, ty, cached.as_bytes(), &o);
            assert_eq!(
                (v.kind, v.diff.as_str()),
                (Kind::ValueMismatch, "value differs"),
                "{ty} {db} {cached}"
            );
        }
    }

    #[test]
    fn string_json_values_name_paths() {
        let db = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        let v = string_run(&db, Json, br#"{"a":{"b":1,"c":3},"l":[1]}"#, &opts());
        assert_eq!(
            (v.kind, v.diff.as_str()),
            (Kind::ValueMismatch, "value differs at: a.c, l[1]")
        );
        // Ignore paths are inside the value for a string key.
        let o = EntityOptions {
            ignore: strs(&["a.c", "l[1]"]),
            ..opts()
        };
        assert_eq!(
            string_run(&db, Json, br#"{"a":{"b":1,"c":3},"l":[1]}"#, &o).kind,
            Kind::Match
        );
        let v = string_run(&db, Json, b"[]", &opts());
        assert_eq!(
            (v.kind, v.diff.as_str()),
            (Kind::ValueMismatch, "value differs")
        );
        let v = string_run(
            &db,
            Json,
            br#"{"a":{"b":1,"c":2},"l":[1,2],"k\u0000":1}"#,
            &opts(),
        );
        assert_eq!(v.diff, r"value differs at: k\0");
        let v = string_run(&db, Json, b"{not json", &opts());
        assert_eq!(v.kind, Kind::Undecodable);
        assert!(
            v.diff.starts_with("cached value is not valid JSON"),
            "{}",
            v.diff
        );
        // A json string value may be stored raw; other types' junk is just a different value.
        assert_eq!(
            string_run(&json!("raw"), Json, b"raw", &opts()).kind,
            Kind::Match
        );
        assert_eq!(
            string_run(&json!([1]), Other, b"{x", &opts()).kind,
            Kind::ValueMismatch
        );
    }

    #[test]
    fn string_every_kind() {
        let db = json!(5);
        assert_eq!(compare_string(None, None, &wt()).kind, Kind::Match);
        let v = compare_string(None, Some(b"5"), &opts());
        assert_eq!(
            (v.kind, v.diff.as_str()),
            (
                Kind::OrphanInCache,
                "row absent from the database, key still cached"
            )
        );
        assert_eq!(
            compare_string(Some((&db, Integer)), None, &opts()).kind,
            Kind::Match
        );
        assert_eq!(
            compare_string(Some((&db, Integer)), None, &wt()).kind,
            Kind::MissingInCache
        );
        assert_eq!(string_run(&db, Integer, b"5", &opts()).kind, Kind::Match);
        assert_eq!(
            string_run(&db, Integer, b"6", &opts()).kind,
            Kind::ValueMismatch
        );
        let v = string_run(&db, Integer, b"\xff5", &opts());
        assert_eq!(
            (v.kind, v.diff.as_str()),
            (Kind::Undecodable, "cached value is not UTF-8 text")
        );
        // Versions are not read from a single value.
        let v = string_run(&db, Integer, b"4", &with_version("version"));
        assert_eq!(
            (v.kind, v.db_version, v.cache_version),
            (Kind::ValueMismatch, None, None)
        );
    }

    // ---- hashes ----

    fn hash(pairs: &[(&str, &[u8])]) -> HashMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    fn hash_run(
        doc: &Map<String, Value>,
        ty: &HashMap<String, ColumnType>,
        h: &HashMap<String, Vec<u8>>,
        o: &EntityOptions,
    ) -> Verdict {
        compare_hash(Some(TypedRow { doc, types: ty }), Some(h), o)
    }

    fn item_hash() -> HashMap<String, Vec<u8>> {
        hash(&[
            ("id", b"9007199254740993"),
            ("owner", b"0190D5A4-6F2E-7C3B-9A1D-3E5F7A9B1C2D"),
            ("name", b"Widget"),
            ("price", b"1.5"),
            ("score", b"0.1"),
            ("active", b"t"),
            ("born", b"2026-11-23"),
            ("updated_at", b"2026-11-23 20:53:24.927197+00"),
            (
                "payload",
                br#"{"color":"red","meta":{"etag":"a","src":"db"},"sizes":[1,2.0]}"#,
            ),
            ("tags", br#"["x","y"]"#),
        ])
    }

    #[test]
    fn hash_fields_by_type() {
        let (doc, ty) = (item_doc(), item_types());
        for o in [opts(), wt(), with_version("updated_at")] {
            let v = hash_run(&doc, &ty, &item_hash(), &o);
            assert_eq!(v.kind, Kind::Match, "{}", v.diff);
        }
        for (field, value) in [
            ("active", &b"1"[..]),
            ("active", b"true"),
            ("active", b"TRUE"),
            ("updated_at", b"2026-11-23T20:53:24.927197Z"),
            ("updated_at", b"2026-11-23T20:53:24.927197000+00:00"),
            ("id", b"9007199254740993.0"),
        ] {
            let mut h = item_hash();
            h.insert(field.into(), value.to_vec());
            assert_eq!(
                hash_run(&doc, &ty, &h, &opts()).kind,
                Kind::Match,
                "{field}"
            );
        }
        for (field, value) in [
            ("active", &b"f"[..]),
            ("active", b"yes"),
            ("id", b"9007199254740992"),
            ("name", b"widget"),
            ("updated_at", b"2026-11-23T20:53:24.927197+01:00"),
            ("born", b""),
        ] {
            let mut h = item_hash();
            h.insert(field.into(), value.to_vec());
            let v = hash_run(&doc, &ty, &h, &opts());
            assert_eq!(
                (v.kind, v.diff.clone()),
                (Kind::ValueMismatch, format!("fields differ: {field}"))
            );
        }
        // JSON columns: paths inside, ignore paths apply.
        let mut h = item_hash();
        h.insert(
            "payload".into(),
            br#"{"color":"red","meta":{"etag":"b","src":"db"},"sizes":[1,2]}"#.to_vec(),
        );
        assert_eq!(
            hash_run(&doc, &ty, &h, &opts()).diff,
            "fields differ: payload.meta.etag"
        );
        let o = EntityOptions {
            ignore: strs(&["payload.meta.etag"]),
            ..opts()
        };
        assert_eq!(hash_run(&doc, &ty, &h, &o).kind, Kind::Match);
        h.insert("payload".into(), b"{broken".to_vec());
        assert_eq!(
            hash_run(&doc, &ty, &h, &opts()).diff,
            "fields differ: payload"
        );
    }

    #[test]
    fn hash_missing_extra_and_null_fields() {
        let ty = types(&[("id", Integer), ("note", Text), ("email", Text)]);
        let doc = obj(json!({"id": 1, "note": null, "email": "a@b"}));
        // NULL: an absent or empty field.
        for h in [
            hash(&[("id", b"1"), ("email", b"a@b")]),
            hash(&[("id", b"1"), ("note", b""), ("email", b"a@b")]),
        ] {
            assert_eq!(hash_run(&doc, &ty, &h, &opts()).kind, Kind::Match);
        }
        let v = hash_run(
            &doc,
            &ty,
            &hash(&[("id", b"1"), ("note", b"null"), ("email", b"a@b")]),
            &opts(),
        );
        assert_eq!(v.diff, "fields differ: note");
        let v = hash_run(
            &doc,
            &ty,
            &hash(&[("id", b"1"), ("zz", b"\xff\x00"), ("a\tb", b"1")]),
            &opts(),
        );
        assert_eq!(v.kind, Kind::ValueMismatch);
        assert_eq!(
            v.diff,
            r"fields differ: a\tb (extra), email (missing), zz (extra)"
        );
        let o = EntityOptions {
            ignore: strs(&["email", "zz", "a\tb"]),
            ..opts()
        };
        assert_eq!(
            hash_run(
                &doc,
                &ty,
                &hash(&[("id", b"1"), ("zz", b"1"), ("a\tb", b"1")]),
                &o
            )
            .kind,
            Kind::Match
        );
    }

    #[test]
    fn hash_every_kind() {
        let ty = types(&[("id", Integer), ("version", Integer), ("name", Text)]);
        let doc = obj(json!({"id": 1, "version": 3, "name": "a"}));
        let row = Some(TypedRow {
            doc: &doc,
            types: &ty,
        });
        let o = with_version("version");
        let h = |version: &[u8], name: &[u8]| {
            hash(&[("id", b"1"), ("version", version), ("name", name)])
        };

        assert_eq!(compare_hash(None, None, &wt()).kind, Kind::Match);
        assert_eq!(
            compare_hash(None, Some(&HashMap::new()), &wt()).kind,
            Kind::Match
        );
        let v = compare_hash(None, Some(&h(b"2", b"a")), &o);
        assert_eq!((v.kind, v.cache_version), (Kind::OrphanInCache, Some(2)));
        assert_eq!(compare_hash(row, None, &o).kind, Kind::Match);
        assert_eq!(
            compare_hash(row, Some(&HashMap::new()), &o).kind,
            Kind::Match
        );
        let v = compare_hash(
            row,
            Some(&HashMap::new()),
            &EntityOptions {
                policy: CachePolicy::WriteThrough,
                ..o.clone()
            },
        );
        assert_eq!((v.kind, v.db_version), (Kind::MissingInCache, Some(3)));

        let v = compare_hash(row, Some(&h(b"3", b"a")), &o);
        assert_eq!(
            (v.kind, v.db_version, v.cache_version),
            (Kind::Match, Some(3), Some(3))
        );
        let v = compare_hash(row, Some(&h(b"2", b"b")), &o);
        assert_eq!(
            (v.kind, v.diff.as_str()),
            (Kind::Stale, "version 3 -> 2; fields differ: name")
        );
        let v = compare_hash(row, Some(&h(b"4", b"a")), &o);
        assert_eq!((v.kind, v.diff.as_str()), (Kind::Ahead, "version 3 -> 4"));
        let v = compare_hash(row, Some(&h(b"3", b"b")), &o);
        assert_eq!(
            (v.kind, v.diff.as_str()),
            (Kind::ValueMismatch, "fields differ: name")
        );

        let v = compare_hash(row, Some(&h(b"3", b"\xffa\x1b")), &o);
        assert_eq!(
            (v.kind, v.diff.as_str()),
            (Kind::Undecodable, "hash field name is not UTF-8 text")
        );
        assert_eq!(v.db_version, Some(3));
        // ... unless that field is ignored.
        let ignoring = EntityOptions {
            ignore: strs(&["name"]),
            ..o.clone()
        };
        assert_eq!(
            compare_hash(row, Some(&h(b"3", b"\xff")), &ignoring).kind,
            Kind::Match
        );
    }

    #[test]
    fn hash_timestamp_versions() {
        let ty = types(&[("id", Integer), ("updated_at", Timestamptz)]);
        let doc = obj(json!({"id": 1, "updated_at": "2026-11-23T20:53:24.927197+00:00"}));
        let o = with_version("updated_at");
        let run = |at: &[u8]| hash_run(&doc, &ty, &hash(&[("id", b"1"), ("updated_at", at)]), &o);
        assert_eq!(run(b"2026-11-23 20:53:24.927197+00").kind, Kind::Match);
        let v = run(b"2026-11-23 20:53:24+00");
        assert_eq!(v.kind, Kind::Stale);
        assert_eq!(
            v.diff,
            "version 2026-11-23T20:53:24.927197+00:00 -> 2026-11-23 20:53:24+00"
        );
        assert_eq!(run(b"2026-11-24 00:00:00+00").kind, Kind::Ahead);
    }

    // ---- sets ----

    fn members(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn cached_members(v: &[&[u8]]) -> BTreeSet<Vec<u8>> {
        v.iter().map(|s| s.to_vec()).collect()
    }

    #[test]
    fn set_every_kind() {
        let db = members(&["17", "42", "5"]);
        let same = cached_members(&[b"5", b"17", b"42"]);
        for o in [opts(), wt()] {
            assert_eq!(compare_set(None, None, &o).kind, Kind::Match);
            assert_eq!(compare_set(Some(&db), Some(&same), &o).kind, Kind::Match);
            let v = compare_set(None, Some(&same), &o);
            assert_eq!(
                (v.kind, v.diff.as_str()),
                (
                    Kind::OrphanInCache,
                    "no rows for this set, key still cached"
                )
            );
            assert_eq!(
                compare_set(Some(&BTreeSet::new()), Some(&same), &o).kind,
                Kind::OrphanInCache
            );
            assert_eq!(
                compare_set(None, Some(&BTreeSet::new()), &o).kind,
                Kind::Match
            );
            assert_eq!(
                compare_set(Some(&BTreeSet::new()), None, &o).kind,
                Kind::Match
            );
        }
        assert_eq!(compare_set(Some(&db), None, &opts()).kind, Kind::Match);
        let v = compare_set(Some(&db), None, &wt());
        assert_eq!(
            (v.kind, v.diff.as_str()),
            (Kind::MissingInCache, "key absent from the cache")
        );
        assert_eq!(
            compare_set(Some(&db), Some(&BTreeSet::new()), &wt()).kind,
            Kind::MissingInCache
        );

        let v = compare_set(Some(&db), Some(&cached_members(&[b"5", b"9"])), &opts());
        assert_eq!(
            (v.kind, v.diff.as_str()),
            (Kind::ValueMismatch, "missing: 17, 42; not in the table: 9")
        );
        assert_eq!((v.db_version, v.cache_version), (None, None));
        let v = compare_set(Some(&db), Some(&cached_members(&[b"5"])), &opts());
        assert_eq!(v.diff, "missing: 17, 42");
        let v = compare_set(
            Some(&db),
            Some(&cached_members(&[b"5", b"17", b"42", b"042"])),
            &opts(),
        );
        assert_eq!(v.diff, "not in the table: 042");
    }

    #[test]
    fn set_diffs_are_capped_and_escaped() {
        let db: BTreeSet<String> = (100..130).map(|i| i.to_string()).collect();
        let cached: BTreeSet<Vec<u8>> = (120..150).map(|i| i.to_string().into_bytes()).collect();
        let big = EntityOptions {
            max_diff_len: 10_000,
            ..opts()
        };
        let v = compare_set(Some(&db), Some(&cached), &big);
        assert_eq!(
            v.diff,
            "missing: 100, 101, 102, 103, 104, 105, 106, 107, +12 more; \
             not in the table: 130, 131, 132, 133, 134, 135, 136, 137, +12 more"
        );
        for max in 0..v.diff.len() + 2 {
            let c = compare_set(
                Some(&db),
                Some(&cached),
                &EntityOptions {
                    max_diff_len: max,
                    ..opts()
                },
            );
            assert!(c.diff.len() <= max);
            assert!(v.diff.starts_with(c.diff.trim_end_matches('…')));
        }
        let cached = cached_members(&[b"ok", b"\x1b[2J\r\n", b"\xff\xfe", b"bidi\xe2\x80\xaeevil"]);
        let v = compare_set(Some(&members(&["ok", "tab\there"])), Some(&cached), &big);
        assert!(clean(&v.diff), "{:?}", v.diff);
        assert_eq!(
            v.diff,
            r"missing: tab\there; not in the table: \u{1b}[2J\r\n, bidi\u{202e}evil, \xff\xfe"
        );
    }

    proptest! {
        #[test]
        fn never_panics_diff_capped_and_clean(bytes in prop::collection::vec(any::<u8>(), 0..128), max in 0usize..80, text in "\\PC{0,8}[\u{0}-\u{1f}]{0,3}") {
            let ty = item_types();
            let doc = item_doc();
            let row = Some(TypedRow { doc: &doc, types: &ty });
            let mut o = wt();
            o.max_diff_len = max;
            o.version = Some("updated_at".into());
            let mut with_key = obj(serde_json::from_str(ITEM_CACHED).unwrap());
            with_key.insert(text.clone(), json!(text.clone()));
            let with_key = serde_json::to_vec(&with_key).unwrap();
            for cached in [&bytes[..], &with_key[..]] {
                let v = compare_json(row, Some(cached), &o);
                prop_assert!(v.diff.len() <= max && clean(&v.diff), "{:?}", v.diff);
                prop_assert!(v.kind.is_match() == v.diff.is_empty() || max == 0);
                for (col, cty) in [("id", Integer), ("payload", Json), ("updated_at", Timestamptz), ("name", Text)] {
                    let v = compare_string(Some((&doc[col], cty)), Some(cached), &o);
                    prop_assert!(v.diff.len() <= max && clean(&v.diff));
                }
                let mut h = item_hash();
                h.insert(text.clone(), cached.to_vec());
                h.insert("name".into(), cached.to_vec());
                let v = compare_hash(row, Some(&h), &o);
                prop_assert!(v.diff.len() <= max && clean(&v.diff), "{:?}", v.diff);
                let set: BTreeSet<Vec<u8>> = [cached.to_vec(), text.clone().into_bytes()].into();
                let v = compare_set(Some(&members(&["1", &text])), Some(&set), &o);
                prop_assert!(v.diff.len() <= max && clean(&v.diff), "{:?}", v.diff);
            }
        }
    }
}
