//! The comparator: decides whether a cached value agrees with its database row.
//!
//! Pure, no I/O. The DB side is the row rendered as the JSON document the
//! application caches; the cache side is the raw bytes read from Redis.
//! Equality is canonical: object key order, whitespace and number spelling
//! (`1`, `1.0`, `1e0`) do not matter.
//!
//! [`compare`] compares a whole document canonically. For an existing application's tables,
//! [`typed`] compares values by their column's type ([`value_eq`], [`text_eq`]) and
//! [`representation`] compares a row with each way it may be cached in Redis: a JSON
//! document ([`compare_json`]), one column as a string ([`compare_string`]), a hash of
//! columns ([`compare_hash`]), a set of values ([`compare_set`]).

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::str::FromStr;

use serde_json::{Number, Value};

pub mod representation;
pub mod typed;

pub use representation::{
    compare_hash, compare_json, compare_set, compare_string, EntityOptions, TypedRow,
};
pub use typed::{text_eq, value_eq};

/// How many differing paths a verdict's diff names before saying "+N more".
const DIFF_PATH_LIMIT: usize = 8;

/// How the application keeps this entity in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CachePolicy {
    /// The application fills the cache on read; a missing key is normal.
    #[default]
    CacheAside,
    /// The application writes the cache with the database (also covers dual-write);
    /// a missing key is an inconsistency.
    WriteThrough,
}

impl CachePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            CachePolicy::CacheAside => "cache_aside",
            CachePolicy::WriteThrough => "write_through",
        }
    }
}

impl fmt::Display for CachePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error of [`CachePolicy::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown cache policy {0:?}: expected cache_aside, write_through or dual_write")]
pub struct ParseCachePolicyError(pub String);

impl FromStr for CachePolicy {
    type Err = ParseCachePolicyError;

    /// Accepts `cache_aside`, `write_through`, `dual_write`, with `-` or `_`,
    /// ASCII case-insensitive, surrounding whitespace ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "cache_aside" => Ok(CachePolicy::CacheAside),
            "write_through" | "dual_write" => Ok(CachePolicy::WriteThrough),
            _ => Err(ParseCachePolicyError(s.to_owned())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompareOptions {
    pub policy: CachePolicy,
    /// Name of the version field inside the JSON documents (e.g. "version"); None = compare
    /// by content only. A dotted path ("meta.version") reaches into nested objects.
    pub version_field: Option<String>,
    /// Top-level field names (or dotted paths like "meta.fetched_at") ignored when comparing
    /// content. Array elements are addressed as in [`differing_paths`] ("items[0].etag").
    pub ignore_fields: Vec<String>,
    /// Cap, in bytes, of [`Verdict::diff`].
    pub max_diff_len: usize,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            policy: CachePolicy::CacheAside,
            version_field: Some("version".to_owned()),
            ignore_fields: Vec::new(),
            max_diff_len: 256,
        }
    }
}

/// The DB side: the row rendered as the same JSON document the application caches.
#[derive(Debug, Clone, Copy)]
pub struct DbRow<'a> {
    pub doc: &'a Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Match,
    /// Both versioned, cache version lower than the DB's.
    Stale,
    /// Both versioned, cache version higher than the DB's.
    Ahead,
    /// Same (or no) version, different content.
    ValueMismatch,
    /// Row present, key absent, under write-through.
    MissingInCache,
    /// Row absent, key present.
    OrphanInCache,
    /// Row present, cached bytes not a JSON object.
    Undecodable,
    /// A whole entity: the cache's watermark (the highest version written to it) trails
    /// PostgreSQL's, or its newest row is not cached (`crate::watermark`).
    CacheBehind,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Match,
        Kind::Stale,
        Kind::Ahead,
        Kind::ValueMismatch,
        Kind::MissingInCache,
        Kind::OrphanInCache,
        Kind::Undecodable,
        Kind::CacheBehind,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Match => "match",
            Kind::Stale => "stale",
            Kind::Ahead => "ahead",
            Kind::ValueMismatch => "value_mismatch",
            Kind::MissingInCache => "missing_in_cache",
            Kind::OrphanInCache => "orphan_in_cache",
            Kind::Undecodable => "undecodable",
            Kind::CacheBehind => "cache_behind",
        }
    }

    /// Inverse of [`Kind::as_str`] (exact spelling only).
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn is_match(self) -> bool {
        self == Kind::Match
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub kind: Kind,
    pub db_version: Option<i64>,
    pub cache_version: Option<i64>,
    /// Short human-readable summary, e.g. "version 3 -> 2; fields differ: name, value.color";
    /// capped at max_diff_len bytes (cut on a char boundary, ending with "…" when cut).
    /// Empty for Match.
    pub diff: String,
}

/// Compares the DB row (or its absence) with the cached bytes (or their absence).
pub fn compare(db: Option<DbRow<'_>>, cache: Option<&[u8]>, opts: &CompareOptions) -> Verdict {
    let vf = opts.version_field.as_deref();
    let cached = cache.map(decode);
    let db_version = db.and_then(|row| read_version(row.doc, vf));
    let cache_version = match &cached {
        Some(Ok(doc)) => read_version(doc, vf),
        _ => None,
    };
    let (kind, diff) = match (db, cached) {
        (None, None) => (Kind::Match, String::new()),
        (None, Some(_)) => (
            Kind::OrphanInCache,
            "row absent from the database, key still cached".to_owned(),
        ),
        (Some(_), None) => match opts.policy {
            CachePolicy::CacheAside => (Kind::Match, String::new()),
            CachePolicy::WriteThrough => {
                (Kind::MissingInCache, "key absent from the cache".to_owned())
            }
        },
        (Some(_), Some(Err(why))) => (Kind::Undecodable, why),
        (Some(row), Some(Ok(doc))) => compare_docs(row.doc, &doc, db_version, cache_version, opts),
    };
    Verdict {
        kind,
        db_version,
        cache_version,
        diff: cap(diff, opts.max_diff_len),
    }
}

/// True when two JSON values are equal canonically: object key order irrelevant, numbers
/// equal by numeric value (1 == 1.0 == 1e0, -0.0 == 0), ignoring `ignore` paths.
///
/// Integers compare exactly; otherwise numbers compare as f64, equal when at most
/// 4 representable values (ULPs) apart: JSON parser rounding, not a real change.
pub fn canonical_eq(a: &Value, b: &Value, ignore: &[String]) -> bool {
    let mut walk = Walk::new(ignore, 0, Some(1));
    walk.visit(Some(a), Some(b));
    walk.total == 0
}

/// Paths of fields that differ, at most `limit` of them, skipping ignored paths.
///
/// Paths are dotted, array elements as `name[3]`; a difference at the root itself is `$`.
/// A key present on one side only, or an array element beyond the other's length, is a
/// differing path. Sorted by path segments: object keys in string order, array indices
/// numerically (so `a[2]` comes before `a[10]`).
pub fn differing_paths(a: &Value, b: &Value, ignore: &[String], limit: usize) -> Vec<String> {
    let mut walk = Walk::new(ignore, limit, Some(limit));
    walk.visit(Some(a), Some(b));
    walk.paths
}

/// Parses cached bytes; `Err` carries the reason they are not a JSON object.
fn decode(bytes: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(doc @ Value::Object(_)) => Ok(doc),
        Ok(other) => Err(format!(
            "cached value is a JSON {}, expected an object",
            type_name(&other)
        )),
        Err(e) => Err(format!("cached value is not valid JSON: {e}")),
    }
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The integer at `field` (a top-level key, else a dotted path); anything else is absent.
fn read_version(doc: &Value, field: Option<&str>) -> Option<i64> {
    let field = field?;
    let obj = doc.as_object()?;
    let found = match obj.get(field) {
        Some(v) => Some(v),
        None => field
            .split('.')
            .try_fold(doc, |v, seg| v.as_object()?.get(seg)),
    };
    found?.as_i64()
}

fn compare_docs(
    db: &Value,
    cache: &Value,
    db_version: Option<i64>,
    cache_version: Option<i64>,
    opts: &CompareOptions,
) -> (Kind, String) {
    let mut ignore = opts.ignore_fields.clone();
    ignore.extend(opts.version_field.iter().cloned());
    let mut walk = Walk::new(&ignore, DIFF_PATH_LIMIT, None);
    walk.visit(Some(db), Some(cache));

    let mut diff = String::new();
    let kind = match (db_version, cache_version) {
        (Some(d), Some(c)) if c != d => {
            let _ = write!(diff, "version {d} -> {c}");
            if c < d {
                Kind::Stale
            } else {
                Kind::Ahead
            }
        }
        _ if walk.total == 0 => Kind::Match,
        _ => Kind::ValueMismatch,
    };
    if walk.total > 0 {
        if !diff.is_empty() {
            diff.push_str("; ");
        }
        diff.push_str("fields differ: ");
        for (i, p) in walk.paths.iter().enumerate() {
            if i > 0 {
                diff.push_str(", ");
            }
            diff.push_str(&escape(p));
        }
        if walk.total > walk.paths.len() {
            let _ = write!(diff, ", +{} more", walk.total - walk.paths.len());
        }
    }
    (kind, diff)
}

/// Cuts `s` to at most `max` bytes on a char boundary, ending with "…" when cut.
fn cap(mut s: String, max: usize) -> String {
    const ELLIPSIS: &str = "…";
    if s.len() <= max {
        return s;
    }
    let keep = max.checked_sub(ELLIPSIS.len());
    let mut end = keep.unwrap_or(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    if keep.is_some() {
        s.push_str(ELLIPSIS);
    }
    s
}

/// `s` with control characters, invisible format characters (bidirectional overrides,
/// zero-width spaces, line separators) and backslashes escaped as Rust does (`\n`, `\u{1b}`,
/// `\\`): text from cached data must not put raw control characters into a diff, which is
/// logged and stored. Other characters, non-ASCII letters included, are kept.
fn escape(s: &str) -> Cow<'_, str> {
    fn needs(c: char) -> bool {
        c == '\\'
            || c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}')
    }
    if !s.chars().any(needs) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs(c) {
            if c.is_control() || c == '\\' {
                out.extend(c.escape_debug());
            } else {
                out.extend(c.escape_unicode());
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Bytes from the cache for a diff: UTF-8 runs as [`escape`], other bytes as `\xNN`.
fn escape_bytes(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        out.push_str(&escape(chunk.valid()));
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out
}

/// Depth-first walk of two documents in path order, recording differing paths.
struct Walk<'a> {
    ignore: &'a [String],
    /// Record at most this many paths.
    keep: usize,
    /// Stop walking once this many differences were counted.
    stop_after: Option<usize>,
    paths: Vec<String>,
    /// Number of differences seen (may exceed `paths.len()`).
    total: usize,
    path: String,
}

impl<'a> Walk<'a> {
    fn new(ignore: &'a [String], keep: usize, stop_after: Option<usize>) -> Self {
        Walk {
            ignore,
            keep,
            stop_after,
            paths: Vec::new(),
            total: 0,
            path: String::new(),
        }
    }

    fn done(&self) -> bool {
        self.stop_after.is_some_and(|n| self.total >= n)
    }

    fn visit(&mut self, a: Option<&Value>, b: Option<&Value>) {
        if self.done() || self.ignore.iter().any(|p| !p.is_empty() && *p == self.path) {
            return;
        }
        match (a, b) {
            (Some(Value::Object(x)), Some(Value::Object(y))) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort_unstable();
                keys.dedup();
                for k in keys {
                    let len = self.path.len();
                    if len > 0 {
                        self.path.push('.');
                    }
                    self.path.push_str(k);
                    self.visit(x.get(k), y.get(k));
                    self.path.truncate(len);
                }
            }
            (Some(Value::Array(x)), Some(Value::Array(y))) => {
                for i in 0..x.len().max(y.len()) {
                    let len = self.path.len();
                    let _ = write!(self.path, "[{i}]");
                    self.visit(x.get(i), y.get(i));
                    self.path.truncate(len);
                }
            }
            (Some(x), Some(y)) if scalar_eq(x, y) => {}
            _ => self.record(),
        }
    }

    fn record(&mut self) {
        self.total += 1;
        if self.paths.len() < self.keep {
            let p = if self.path.is_empty() {
                "$"
            } else {
                &self.path
            };
            self.paths.push(p.to_owned());
        }
    }
}

/// Equality of two values that are not both objects nor both arrays.
fn scalar_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => num_eq(x, y),
        _ => a == b,
    }
}

/// Floats at most this many representable values apart are equal: serde_json's default
/// (non-`float_roundtrip`) parser may land 1-2 ULPs off the value the text was printed
/// from, so the same number can decode differently on the DB and the cache side.
const FLOAT_ULPS: u64 = 4;

/// Integers exactly when both are integers, otherwise as f64 within [`FLOAT_ULPS`].
fn num_eq(x: &Number, y: &Number) -> bool {
    if let (Some(a), Some(b)) = (x.as_i64(), y.as_i64()) {
        return a == b;
    }
    if let (Some(a), Some(b)) = (x.as_u64(), y.as_u64()) {
        return a == b;
    }
    let is_int = |n: &Number| n.is_i64() || n.is_u64();
    if is_int(x) && is_int(y) {
        // One negative, the other above i64::MAX.
        return false;
    }
    match (x.as_f64(), y.as_f64()) {
        (Some(a), Some(b)) => a == b || ulps_apart(a, b) <= FLOAT_ULPS,
        _ => x == y,
    }
}

/// Distance between two finite floats counted in representable values (-0.0 == 0.0).
fn ulps_apart(a: f64, b: f64) -> u64 {
    fn ordinal(x: f64) -> i128 {
        let bits = x.to_bits() as i64;
        i128::from(if bits < 0 { i64::MIN - bits } else { bits })
    }
    u64::try_from((ordinal(a) - ordinal(b)).unsigned_abs()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn opts() -> CompareOptions {
        CompareOptions::default()
    }

    fn wt() -> CompareOptions {
        CompareOptions {
            policy: CachePolicy::WriteThrough,
            ..CompareOptions::default()
        }
    }

    fn run(db: &Value, cache: &str, o: &CompareOptions) -> Verdict {
        compare(Some(DbRow { doc: db }), Some(cache.as_bytes()), o)
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn nothing_on_either_side_is_match() {
        for o in [opts(), wt()] {
            let v = compare(None, None, &o);
            assert_eq!(v.kind, Kind::Match);
            assert_eq!((v.db_version, v.cache_version), (None, None));
            assert!(v.diff.is_empty());
        }
    }

    #[test]
    fn orphan_in_cache_reads_cache_version_when_decodable() {
        for o in [opts(), wt()] {
            let v = compare(None, Some(br#"{"id":1,"version":4}"#), &o);
            assert_eq!(v.kind, Kind::OrphanInCache);
            assert_eq!((v.db_version, v.cache_version), (None, Some(4)));
            assert!(!v.diff.is_empty());

            for junk in [&b"\xff\xfe"[..], b"{\"id\":", b"\"str\"", b""] {
                let v = compare(None, Some(junk), &o);
                assert_eq!(v.kind, Kind::OrphanInCache);
                assert_eq!(v.cache_version, None);
            }
        }
    }

    #[test]
    fn missing_key_depends_on_policy() {
        let db = json!({"id": 1, "version": 7});
        let v = compare(Some(DbRow { doc: &db }), None, &wt());
        assert_eq!(v.kind, Kind::MissingInCache);
        assert_eq!((v.db_version, v.cache_version), (Some(7), None));
        assert!(!v.diff.is_empty());

        let v = compare(Some(DbRow { doc: &db }), None, &opts());
        assert_eq!(v.kind, Kind::Match);
        assert_eq!((v.db_version, v.cache_version), (Some(7), None));
        assert!(v.diff.is_empty());
    }

    #[test]
    fn stale_and_ahead_by_version() {
        let db =
            json!({"id": 1, "version": 3, "name": "new", "value": {"color": "red", "size": 1}});
        let cache = r#"{"id":1,"version":2,"name":"old","value":{"color":"blue","size":1}}"#;
        for o in [opts(), wt()] {
            let v = run(&db, cache, &o);
            assert_eq!(v.kind, Kind::Stale);
            assert_eq!((v.db_version, v.cache_version), (Some(3), Some(2)));
            assert_eq!(v.diff, "version 3 -> 2; fields differ: name, value.color");
        }

        let v = run(
            &db,
            r#"{"id":1,"version":5,"name":"new","value":{"size":1,"color":"red"}}"#,
            &opts(),
        );
        assert_eq!(v.kind, Kind::Ahead);
        assert_eq!((v.db_version, v.cache_version), (Some(3), Some(5)));
        assert_eq!(v.diff, "version 3 -> 5");
    }

    #[test]
    fn same_version_different_content_is_value_mismatch() {
        let db = json!({"id": 1, "version": 3, "name": "a", "tags": ["x", "y"]});
        let v = run(
            &db,
            r#"{"id":1,"version":3,"name":"b","tags":["x","y","z"]}"#,
            &opts(),
        );
        assert_eq!(v.kind, Kind::ValueMismatch);
        assert_eq!((v.db_version, v.cache_version), (Some(3), Some(3)));
        assert_eq!(v.diff, "fields differ: name, tags[2]");

        let v = run(
            &db,
            r#"{"id":1,"version":3,"name":"a","tags":["x","y"]}"#,
            &opts(),
        );
        assert_eq!(v.kind, Kind::Match);
        assert!(v.diff.is_empty());
    }

    #[test]
    fn unversioned_documents_compare_by_content() {
        let db = json!({"id": 1, "name": "a"});
        assert_eq!(
            run(&db, r#"{"name":"a","id":1}"#, &opts()).kind,
            Kind::Match
        );
        let v = run(&db, r#"{"name":"a","id":2}"#, &opts());
        assert_eq!(v.kind, Kind::ValueMismatch);
        assert_eq!(v.diff, "fields differ: id");
        assert_eq!(v.cache_version, None);
    }

    #[test]
    fn without_version_field_versions_are_plain_content() {
        let o = CompareOptions {
            version_field: None,
            ..opts()
        };
        let db = json!({"id": 1, "version": 3});
        let v = run(&db, r#"{"id":1,"version":2}"#, &o);
        assert_eq!(v.kind, Kind::ValueMismatch);
        assert_eq!((v.db_version, v.cache_version), (None, None));
        assert_eq!(v.diff, "fields differ: version");
        assert_eq!(run(&db, r#"{"id":1,"version":3.0}"#, &o).kind, Kind::Match);
    }

    #[test]
    fn non_integer_or_one_sided_version_is_absent_and_ignored_in_content() {
        let db = json!({"id": 1, "version": 3});
        for cache in [
            r#"{"id":1,"version":"2"}"#,
            r#"{"id":1,"version":2.5}"#,
            r#"{"id":1,"version":null}"#,
            r#"{"id":1,"version":18446744073709551615}"#,
            r#"{"id":1}"#,
        ] {
            let v = run(&db, cache, &opts());
            assert_eq!(v.kind, Kind::Match, "{cache}");
            assert_eq!((v.db_version, v.cache_version), (Some(3), None), "{cache}");
        }
        let v = run(&db, r#"{"id":2,"version":"3"}"#, &opts());
        assert_eq!(v.kind, Kind::ValueMismatch);
        assert_eq!(v.diff, "fields differ: id");
    }

    #[test]
    fn nested_version_field() {
        let o = CompareOptions {
            version_field: Some("meta.rev".into()),
            ..opts()
        };
        let db = json!({"id": 1, "meta": {"rev": 9}});
        let v = run(&db, r#"{"id":1,"meta":{"rev":8}}"#, &o);
        assert_eq!(v.kind, Kind::Stale);
        assert_eq!(v.diff, "version 9 -> 8");
    }

    #[test]
    fn key_order_whitespace_and_number_spelling_do_not_matter() {
        let db = json!({"a": 1, "b": {"x": [1, 2.5, -0.0], "y": null}, "c": true, "version": 1});
        let cache = "{\n  \"version\" : 1e0,\n\t\"c\":true , \"b\":{ \"y\":null,\"x\":[ 1.0 , 25e-1, 0 ] },\"a\":1E0 }";
        let v = run(&db, cache, &wt());
        assert_eq!(v.kind, Kind::Match, "{}", v.diff);
        // 1e0 is a float, so not an integer version: absent on the cache side.
        assert_eq!((v.db_version, v.cache_version), (Some(1), None));
        assert!(canonical_eq(&json!(1), &json!(1.0), &[]));
        assert!(canonical_eq(&json!(-0.0), &json!(0), &[]));
        assert!(!canonical_eq(&json!(1), &json!(1.5), &[]));
        assert!(!canonical_eq(&json!(1), &json!("1"), &[]));
    }

    #[test]
    fn floats_tolerate_parser_rounding_only() {
        let x = 95436449.86251687_f64;
        let next = f64::from_bits(x.to_bits() + 1);
        let far = f64::from_bits(x.to_bits() + 100);
        assert!(canonical_eq(&json!(x), &json!(next), &[]));
        assert!(!canonical_eq(&json!(x), &json!(far), &[]));
        assert!(!canonical_eq(&json!(x), &json!(x * (1.0 + 1e-12)), &[]));
        assert!(!canonical_eq(&json!(1e-300), &json!(-1e-300), &[]));
        assert!(!canonical_eq(&json!(f64::MAX), &json!(-f64::MAX), &[]));
        assert_eq!(ulps_apart(-0.0, 0.0), 0);
        assert_eq!(
            ulps_apart(-f64::MIN_POSITIVE, f64::MIN_POSITIVE),
            2 * (1 << 52)
        );
    }

    #[test]
    fn integers_compare_exactly() {
        let a: Value = serde_json::from_str("9007199254740993").unwrap();
        let b: Value = serde_json::from_str("9007199254740992").unwrap();
        assert!(!canonical_eq(&a, &b, &[]));
        assert!(!canonical_eq(&json!(u64::MAX), &json!(u64::MAX - 1), &[]));
        assert!(canonical_eq(&json!(u64::MAX), &json!(u64::MAX), &[]));
        assert!(!canonical_eq(&json!(-1), &json!(u64::MAX), &[]));
        assert!(canonical_eq(&json!(i64::MIN), &json!(i64::MIN), &[]));
    }

    #[test]
    fn ignored_fields_top_level_and_dotted() {
        let o = CompareOptions {
            ignore_fields: strs(&["updated_at", "meta.fetched_at", "items[0].etag"]),
            ..opts()
        };
        let db = json!({"id": 1, "updated_at": "t1", "meta": {"fetched_at": 1, "src": "db"},
                        "items": [{"etag": "a", "n": 1}, {"etag": "b"}]});
        let same = r#"{"id":1,"updated_at":"t2","meta":{"fetched_at":2,"src":"db"},
                       "items":[{"etag":"z","n":1},{"etag":"b"}]}"#;
        assert_eq!(run(&db, same, &o).kind, Kind::Match);
        // Ignored fields may also be missing on one side.
        let missing = r#"{"id":1,"meta":{"src":"db"},"items":[{"n":1},{"etag":"b"}]}"#;
        assert_eq!(run(&db, missing, &o).kind, Kind::Match);
        // Siblings of ignored paths still count.
        let sibling = r#"{"id":1,"updated_at":"t2","meta":{"fetched_at":2,"src":"cache"},
                          "items":[{"etag":"a","n":1},{"etag":"c"}]}"#;
        let v = run(&db, sibling, &o);
        assert_eq!(v.kind, Kind::ValueMismatch);
        assert_eq!(v.diff, "fields differ: items[1].etag, meta.src");
        // Ignoring a parent ignores its subtree.
        assert!(canonical_eq(
            &json!({"meta": {"a": 1}}),
            &json!({"meta": [2]}),
            &strs(&["meta"])
        ));
    }

    #[test]
    fn nested_arrays_differing() {
        let a = json!({"m": [[1, 2], [3, 4]], "t": [{"k": [true]}]});
        let b = json!({"m": [[1, 2], [3, 5], [6]], "t": [{"k": [false, null]}]});
        assert!(!canonical_eq(&a, &b, &[]));
        assert_eq!(
            differing_paths(&a, &b, &[], 10),
            ["m[1][1]", "m[2]", "t[0].k[0]", "t[0].k[1]"]
        );
        assert_eq!(differing_paths(&a, &b, &[], 2), ["m[1][1]", "m[2]"]);
        assert!(differing_paths(&a, &b, &[], 0).is_empty());
        assert!(differing_paths(&a, &a, &[], 10).is_empty());
        assert_eq!(differing_paths(&json!(1), &json!(2), &[], 10), ["$"]);
        assert_eq!(differing_paths(&json!([1]), &json!([2]), &[], 10), ["[0]"]);
    }

    #[test]
    fn paths_sorted_by_segments() {
        let a = json!({"b": 1, "a": {"z": 1, "y": 1}, "l": (0..12).collect::<Vec<_>>()});
        let b = json!({"b": 2, "a": {"z": 2, "y": 2}, "l": (1..13).collect::<Vec<_>>()});
        let p = differing_paths(&a, &b, &[], 100);
        assert_eq!(&p[..4], ["a.y", "a.z", "b", "l[0]"]);
        assert_eq!(p[5], "l[2]");
        assert_eq!(p.last().unwrap(), "l[11]");
        assert_eq!(p.len(), 15);
    }

    fn wide(n: usize, tag: &str) -> Value {
        let m: serde_json::Map<String, Value> = (0..n)
            .map(|i| (format!("fïeld_{i:04}_ünïcode"), json!(format!("{tag}{i}"))))
            .collect();
        Value::Object(m)
    }

    #[test]
    fn diff_names_at_most_eight_then_more() {
        let db = wide(1000, "a");
        let cache = serde_json::to_string(&wide(1000, "b")).unwrap();
        let v = run(
            &db,
            &cache,
            &CompareOptions {
                max_diff_len: 10_000,
                ..opts()
            },
        );
        assert_eq!(v.kind, Kind::ValueMismatch);
        assert!(v
            .diff
            .starts_with("fields differ: fïeld_0000_ünïcode, fïeld_0001_ünïcode"));
        assert!(v.diff.ends_with(", +992 more"), "{}", v.diff);
        assert_eq!(v.diff.matches(", ").count(), 8);
    }

    #[test]
    fn diff_is_capped_on_char_boundary() {
        let db = wide(1000, "a");
        let cache = serde_json::to_string(&wide(1000, "b")).unwrap();
        let full = run(
            &db,
            &cache,
            &CompareOptions {
                max_diff_len: 10_000,
                ..opts()
            },
        )
        .diff;
        let v = run(&db, &cache, &opts());
        assert!(v.diff.len() <= 256);
        for max in 0..=full.len() + 1 {
            let v = run(
                &db,
                &cache,
                &CompareOptions {
                    max_diff_len: max,
                    ..opts()
                },
            );
            assert!(v.diff.len() <= max, "{max}: {}", v.diff);
            if max >= full.len() {
                assert_eq!(v.diff, full);
            } else if max >= 3 {
                assert!(v.diff.ends_with('…'));
                assert!(full.starts_with(v.diff.trim_end_matches('…')));
            }
        }
        assert_eq!(cap("héllo".into(), 2), "h");
        assert_eq!(cap("héllo".into(), 5), "h…");
        assert_eq!(cap("héllo".into(), 6), "héllo");
    }

    #[test]
    fn undecodable_cache_bytes() {
        let db = json!({"id": 1, "version": 2});
        let cases: [&[u8]; 8] = [
            b"{\"id\":1,\"version\":2,\"n\":\"\xff\"}",
            b"\xc3\x28",
            b"{\"id\":1,\"version\":",
            b"",
            b"\"a json string\"",
            b"[1,2]",
            b"42",
            b"null",
        ];
        for bytes in cases {
            for o in [opts(), wt()] {
                let v = compare(Some(DbRow { doc: &db }), Some(bytes), &o);
                assert_eq!(v.kind, Kind::Undecodable, "{bytes:?}");
                assert_eq!((v.db_version, v.cache_version), (Some(2), None));
                assert!(!v.diff.is_empty());
            }
        }
        let v = run(&db, "\"x\"", &opts());
        assert_eq!(v.diff, "cached value is a JSON string, expected an object");
    }

    #[test]
    fn kind_names_round_trip() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
            assert_eq!(k.to_string(), k.as_str());
            assert_eq!(serde_json::to_value(k).unwrap(), json!(k.as_str()));
            assert_eq!(k.is_match(), k == Kind::Match);
        }
        assert_eq!(Kind::parse("Match"), None);
        assert_eq!(Kind::parse(""), None);
    }

    #[test]
    fn cache_policy_parsing() {
        for (s, p) in [
            ("cache_aside", CachePolicy::CacheAside),
            ("cache-aside", CachePolicy::CacheAside),
            ("write_through", CachePolicy::WriteThrough),
            ("write-through", CachePolicy::WriteThrough),
            ("dual_write", CachePolicy::WriteThrough),
            ("dual-write", CachePolicy::WriteThrough),
            (" Write-Through ", CachePolicy::WriteThrough),
        ] {
            assert_eq!(s.parse::<CachePolicy>(), Ok(p), "{s}");
        }
        assert!("write".parse::<CachePolicy>().is_err());
        assert_eq!(CachePolicy::default(), CachePolicy::CacheAside);
        assert_eq!(
            serde_json::to_value(CachePolicy::WriteThrough).unwrap(),
            json!("write_through")
        );
        assert_eq!(
            serde_json::from_value::<CachePolicy>(json!("cache_aside")).unwrap(),
            CachePolicy::CacheAside
        );
        let d = CompareOptions::default();
        assert_eq!(d.version_field.as_deref(), Some("version"));
        assert!(d.ignore_fields.is_empty());
        assert_eq!(d.max_diff_len, 256);
    }

    // ---- property tests ----

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            (-1.0e9f64..1.0e9).prop_map(|f| json!(f)),
            "[a-z é\"\\\\]{0,8}".prop_map(Value::String),
        ]
    }

    /// Keys never spell "version" (the default version field) nor contain '.'.
    fn json_value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{1,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn json_object() -> impl Strategy<Value = Value> {
        prop::collection::btree_map("[a-z_]{1,6}", json_value(), 0..8)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    fn mix(seed: u64, salt: u64) -> u64 {
        let mut x = seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^ (x >> 33)
    }

    /// Pretty-prints with keys in a seed-dependent order and small integers spelled
    /// as `n`, `n.0` or `ne0`.
    fn render(v: &Value, seed: u64, depth: usize, out: &mut String) {
        let pad = "  ".repeat(depth + 1);
        match v {
            Value::Object(m) => {
                let mut entries: Vec<_> = m.iter().collect();
                entries.sort_by_key(|(k, _)| {
                    mix(
                        seed,
                        k.len() as u64 * 131 + k.bytes().map(u64::from).sum::<u64>(),
                    )
                });
                out.push_str("{\n");
                for (i, (k, val)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(",\n");
                    }
                    out.push_str(&pad);
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push_str(" :\t");
                    render(val, mix(seed, i as u64 + 1), depth + 1, out);
                }
                out.push_str(" }");
            }
            Value::Array(a) => {
                out.push_str("[ ");
                for (i, val) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(" ,\n");
                        out.push_str(&pad);
                    }
                    render(val, mix(seed, i as u64 + 7), depth + 1, out);
                }
                out.push_str(" ]");
            }
            Value::Number(n) => match n.as_i64() {
                Some(i) if i.unsigned_abs() < (1 << 53) => {
                    let _ = match seed % 3 {
                        0 => write!(out, "{i}"),
                        1 => write!(out, "{i}.0"),
                        _ => write!(out, "{i}e0"),
                    };
                }
                _ => out.push_str(&n.to_string()),
            },
            other => out.push_str(&serde_json::to_string(other).unwrap()),
        }
    }

    /// JSON pointers of all leaves (scalars and empty containers).
    fn leaves(v: &Value, at: String, out: &mut Vec<String>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, c) in m {
                    leaves(c, format!("{at}/{k}"), out);
                }
            }
            Value::Array(a) if !a.is_empty() => {
                for (i, c) in a.iter().enumerate() {
                    leaves(c, format!("{at}/{i}"), out);
                }
            }
            _ => out.push(at),
        }
    }

    /// Replaces one leaf by a value of another type (or adds a key to an empty object).
    fn mutate(v: &Value, pick: prop::sample::Index) -> Value {
        let mut out = v.clone();
        let mut ls = Vec::new();
        leaves(&out, String::new(), &mut ls);
        let ptr = &ls[pick.index(ls.len())];
        let slot = out.pointer_mut(ptr).unwrap();
        *slot = match slot {
            Value::Object(m) if ptr.is_empty() => {
                let mut m = m.clone();
                m.insert("added".into(), json!(1));
                Value::Object(m)
            }
            Value::String(_) => json!(12345),
            _ => json!("changed"),
        };
        out
    }

    proptest! {
        #[test]
        fn reserialised_object_matches(doc in json_object(), seed in any::<u64>()) {
            let mut text = String::new();
            render(&doc, seed, 0, &mut text);
            let reparsed: Value = serde_json::from_str(&text).unwrap();
            prop_assert!(canonical_eq(&doc, &reparsed, &[]));
            for o in [opts(), wt()] {
                let v = run(&doc, &text, &o);
                prop_assert_eq!(v.kind, Kind::Match, "{} / {}", text, v.diff);
                prop_assert!(v.diff.is_empty());
            }
        }

        #[test]
        fn changing_one_leaf_is_not_match(doc in json_object(), pick in any::<prop::sample::Index>(), seed in any::<u64>()) {
            let changed = mutate(&doc, pick);
            let mut text = String::new();
            render(&changed, seed, 0, &mut text);
            let v = run(&doc, &text, &opts());
            prop_assert_eq!(v.kind, Kind::ValueMismatch);
            prop_assert!(!canonical_eq(&doc, &changed, &[]));
            prop_assert_eq!(differing_paths(&doc, &changed, &[], 100).len(), 1);
        }

        #[test]
        fn canonical_eq_is_symmetric(a in json_value(), b in json_value(), pick in any::<prop::sample::Index>()) {
            prop_assert_eq!(canonical_eq(&a, &b, &[]), canonical_eq(&b, &a, &[]));
            let a2 = mutate(&a, pick);
            prop_assert_eq!(canonical_eq(&a, &a2, &[]), canonical_eq(&a2, &a, &[]));
            prop_assert!(canonical_eq(&a, &a, &[]));
            prop_assert_eq!(
                differing_paths(&a, &b, &[], 50).len(),
                differing_paths(&b, &a, &[], 50).len()
            );
        }

        #[test]
        fn compare_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256), db in json_object(), cut in any::<prop::sample::Index>(), max in 0usize..64) {
            let text = serde_json::to_vec(&db).unwrap();
            let truncated = &text[..cut.index(text.len() + 1)];
            for o in [CompareOptions { max_diff_len: max, ..opts() }, CompareOptions { max_diff_len: max, ..wt() }] {
                for b in [&bytes[..], truncated] {
                    let v = compare(Some(DbRow { doc: &db }), Some(b), &o);
                    prop_assert!(v.diff.len() <= max);
                    prop_assert!(v.kind.is_match() == v.diff.is_empty() || max == 0);
                    let v = compare(None, Some(b), &o);
                    prop_assert_eq!(v.kind, Kind::OrphanInCache);
                }
            }
        }
    }
}
