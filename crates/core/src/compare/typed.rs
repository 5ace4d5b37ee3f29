//! Values compared by their column's type.
//!
//! The database side is a value as PostgreSQL's `to_jsonb` renders it; the cache side is a
//! value the application wrote, either inside a JSON document ([`value_eq`]) or as text, in
//! a hash field or a string key ([`text_eq`]). Per type:
//!
//! | type | equal when |
//! |---|---|
//! | integer, numeric, float | same number: `1`, `1.0`, `1e0`, `"1"`, `"1.00"`; integers and numeric strings exactly, JSON floats within a few ULPs; `"NaN"`, `"Infinity"`, `"-Infinity"` as themselves |
//! | boolean | JSON `true`/`false`; as text also `true`/`false`/`t`/`f`/`1`/`0`, any case |
//! | text | exactly the same string |
//! | uuid | same UUID, any case (and any form the `uuid` crate parses: hyphenated, simple, braced, urn) |
//! | timestamptz, timestamp | same instant, in any RFC 3339 spelling or PostgreSQL's text form (no offset counts as UTC) |
//! | date | same date (`2026-11-23`, or midnight UTC `2026-11-23T00:00:00Z`) |
//! | json | canonically ([`canonical_eq`]), ignore paths applying inside; a JSON document cached as a string holding its JSON text also matches |
//! | other | canonically |
//!
//! SQL NULL (JSON `null`) equals only `null` inside a JSON document, and only the empty
//! string as text. A value that does not parse as its type is compared as plain JSON (so a
//! text column's `"1"` never equals `1`).

use std::borrow::Cow;

use serde_json::Value;

use super::{canonical_eq, ulps_apart, FLOAT_ULPS};
use crate::column::{parse_bool, parse_date, ColumnType, DateTime, Decimal, Special};

/// Whether a column's value in a cached JSON document (`cached`) equals the database's
/// (`db`), by the column's type. `ignore` holds paths inside the value, as in
/// [`canonical_eq`] (`"meta.fetched_at"`, `"items[0].etag"`); only json and other columns
/// have any.
pub fn value_eq(ty: ColumnType, db: &Value, cached: &Value, ignore: &[String]) -> bool {
    // The same JSON value is the same column value for every type (ignore paths only ever
    // excuse differences), and it is the common case: no timestamp or uuid to parse.
    if db == cached {
        return true;
    }
    if db.is_null() || cached.is_null() {
        return db.is_null() && cached.is_null();
    }
    match ty {
        ColumnType::Integer | ColumnType::Numeric | ColumnType::Float => {
            match (Num::of_value(db), Num::of_value(cached)) {
                (Some(a), Some(b)) => a.same(&b),
                _ => canonical_eq(db, cached, &[]),
            }
        }
        ColumnType::Boolean | ColumnType::Text => canonical_eq(db, cached, &[]),
        ColumnType::Uuid => match (uuid_of(db.as_str()), uuid_of(cached.as_str())) {
            (Some(a), Some(b)) => a == b,
            _ => canonical_eq(db, cached, &[]),
        },
        ColumnType::Timestamptz | ColumnType::Timestamp => {
            match (instant_of(db.as_str()), instant_of(cached.as_str())) {
                (Some(a), Some(b)) => a == b,
                _ => canonical_eq(db, cached, &[]),
            }
        }
        ColumnType::Date => match (date_of(db.as_str()), date_of(cached.as_str())) {
            (Some(a), Some(b)) => a == b,
            _ => canonical_eq(db, cached, &[]),
        },
        ColumnType::Json | ColumnType::Other => {
            canonical_eq(db, &cached_document(ty, db, cached), ignore)
        }
    }
}

/// Whether a column's value cached as text (a hash field, a string key) equals the
/// database's, by the column's type. `ignore` as in [`value_eq`]; a json (or other) column's
/// text is parsed as JSON, unless it is exactly the database's string.
pub fn text_eq(ty: ColumnType, db: &Value, text: &str, ignore: &[String]) -> bool {
    if db.is_null() {
        return text.is_empty();
    }
    match ty {
        ColumnType::Integer | ColumnType::Numeric | ColumnType::Float => {
            match (Num::of_value(db), Num::of_text(text)) {
                (Some(a), Some(b)) => a.same(&b),
                (Some(_), None) => false,
                (None, _) => plain_text_eq(db, text),
            }
        }
        ColumnType::Boolean => match db {
            Value::Bool(b) => parse_bool(text) == Some(*b),
            _ => plain_text_eq(db, text),
        },
        ColumnType::Text => plain_text_eq(db, text),
        ColumnType::Uuid => match (uuid_of(db.as_str()), uuid_of(Some(text))) {
            (Some(a), Some(b)) => a == b,
            _ => plain_text_eq(db, text),
        },
        ColumnType::Timestamptz | ColumnType::Timestamp => {
            match (instant_of(db.as_str()), instant_of(Some(text))) {
                (Some(a), Some(b)) => a == b,
                _ => plain_text_eq(db, text),
            }
        }
        ColumnType::Date => match (date_of(db.as_str()), date_of(Some(text))) {
            (Some(a), Some(b)) => a == b,
            _ => plain_text_eq(db, text),
        },
        ColumnType::Json | ColumnType::Other => {
            if db.as_str() == Some(text) {
                return true;
            }
            serde_json::from_str::<Value>(text).is_ok_and(|v| canonical_eq(db, &v, ignore))
        }
    }
}

/// The cached value of a json column as the document to compare: a string holding JSON
/// text is that JSON when the database's value is not a string itself (an application that
/// encoded the column twice). Other values, and other types, as they are.
pub(super) fn cached_document<'a>(ty: ColumnType, db: &Value, cached: &'a Value) -> Cow<'a, Value> {
    if ty == ColumnType::Json && !db.is_string() {
        if let Value::String(s) = cached {
            if let Ok(v) = serde_json::from_str::<Value>(s) {
                return Cow::Owned(v);
            }
        }
    }
    Cow::Borrowed(cached)
}

/// A document column's text as a JSON value (the text as a JSON string when it is not JSON).
pub(super) fn document_of_text(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// Text against a value that did not parse as its type: a string exactly, anything else as
/// the JSON the text holds.
fn plain_text_eq(db: &Value, text: &str) -> bool {
    match db {
        Value::String(s) => s == text,
        other => serde_json::from_str::<Value>(text).is_ok_and(|v| canonical_eq(other, &v, &[])),
    }
}

fn uuid_of(s: Option<&str>) -> Option<uuid::Uuid> {
    uuid::Uuid::try_parse(s?).ok()
}

fn instant_of(s: Option<&str>) -> Option<(i64, u64)> {
    DateTime::parse(s?)?.instant()
}

fn date_of(s: Option<&str>) -> Option<chrono::NaiveDate> {
    let s = s?;
    parse_date(s).or_else(|| DateTime::parse(s)?.as_date())
}

/// A number as spelled on either side.
#[derive(Debug, Clone, PartialEq)]
enum Num {
    /// A JSON integer or a numeric string: exact.
    Exact(Decimal),
    /// A JSON number with a fraction or an exponent, or beyond 64 bits: already an f64.
    Float(f64),
    /// `"NaN"`, `"Infinity"`, `"-Infinity"`.
    Special(Special),
}

impl Num {
    fn of_value(v: &Value) -> Option<Num> {
        match v {
            Value::Number(n) if n.is_i64() || n.is_u64() => {
                Decimal::parse(&n.to_string()).map(Num::Exact)
            }
            Value::Number(n) => n.as_f64().map(Num::Float),
            Value::String(s) => Num::of_text(s),
            _ => None,
        }
    }

    fn of_text(s: &str) -> Option<Num> {
        match Special::parse(s) {
            Some(sp) => Some(Num::Special(sp)),
            None => Decimal::parse(s).map(Num::Exact),
        }
    }

    /// Exact values exactly; when either is an f64 already, as f64s within
    /// [`FLOAT_ULPS`] (the JSON parser's rounding).
    fn same(&self, other: &Num) -> bool {
        match (self, other) {
            (Num::Exact(a), Num::Exact(b)) => a == b,
            (Num::Special(a), Num::Special(b)) => a == b,
            (Num::Special(_), _) | (_, Num::Special(_)) => false,
            _ => {
                let (a, b) = (self.to_f64(), other.to_f64());
                a == b || (a.is_finite() && b.is_finite() && ulps_apart(a, b) <= FLOAT_ULPS)
            }
        }
    }

    fn to_f64(&self) -> f64 {
        match self {
            Num::Exact(d) => d.to_f64(),
            Num::Float(f) => *f,
            Num::Special(_) => f64::NAN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use ColumnType::*;

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    /// value_eq both ways, and text_eq of the cached value's text when it is a string.
    fn eq(ty: ColumnType, db: &Value, cached: &Value) -> bool {
        let forward = value_eq(ty, db, cached, &[]);
        assert_eq!(
            forward,
            value_eq(ty, cached, db, &[]),
            "{ty}: {db} / {cached} not symmetric"
        );
        forward
    }

    #[test]
    fn timestamptz_any_spelling_of_the_instant() {
        let db = json!("2026-11-23T20:53:24.927197+00:00");
        for same in [
            "2026-11-23T20:53:24.927197Z",
            "2026-11-23T20:53:24.927197+00:00",
            "2026-11-23T20:53:24.927197000Z",
            "2026-11-23T20:53:24.9271970+00:00",
            "2026-11-23 20:53:24.927197+00",
            "2026-11-23 20:53:24.927197+00:00",
            "2026-11-23t20:53:24.927197z",
            "2026-11-23T21:53:24.927197+01:00",
            "2026-11-23T15:53:24.927197-05:00",
            "2026-11-24T02:23:24.927197+05:30",
        ] {
            assert!(eq(Timestamptz, &db, &json!(same)), "{same}");
            assert!(text_eq(Timestamptz, &db, same, &[]), "{same}");
            assert!(eq(Timestamp, &db, &json!(same)), "{same}");
        }
        for differs in [
            "2026-11-23T20:53:24.927198Z",
            "2026-11-23T20:53:24.9271971Z",
            "2026-11-23T20:53:24.927Z",
            "2026-11-23T20:53:24Z",
            "2026-11-23T20:53:24.927197+01:00",
            "2026-11-23 20:53:24.927197+01",
            "2026-11-22T20:53:24.927197Z",
            "not a time",
            "",
        ] {
            assert!(!eq(Timestamptz, &db, &json!(differs)), "{differs}");
            assert!(!text_eq(Timestamptz, &db, differs, &[]), "{differs}");
        }
        assert!(!eq(Timestamptz, &db, &json!(1795467204)));
        assert!(!eq(Timestamptz, &db, &Value::Null));
        // Whole seconds: no fraction, ".0", ".000000".
        let whole = json!("2026-11-23 20:53:24+00");
        for same in [
            "2026-11-23T20:53:24Z",
            "2026-11-23T20:53:24.0Z",
            "2026-11-23T20:53:24.000000+00:00",
        ] {
            assert!(eq(Timestamptz, &whole, &json!(same)), "{same}");
        }
        // Values that are not timestamps compare as they are.
        assert!(eq(Timestamptz, &json!("infinity"), &json!("infinity")));
        assert!(!eq(Timestamptz, &json!("infinity"), &json!("-infinity")));
    }

    #[test]
    fn timestamp_without_zone_counts_as_utc() {
        let db = json!("2026-11-23T20:53:24.927197");
        assert!(eq(Timestamp, &db, &json!("2026-11-23 20:53:24.927197")));
        assert!(eq(Timestamp, &db, &json!("2026-11-23T20:53:24.927197Z")));
        assert!(!eq(
            Timestamp,
            &db,
            &json!("2026-11-23T20:53:24.927197+02:00")
        ));
    }

    #[test]
    fn dates() {
        let db = json!("2026-11-23");
        assert!(eq(Date, &db, &json!("2026-11-23")));
        assert!(eq(Date, &db, &json!("2026-11-23T00:00:00Z")));
        assert!(eq(Date, &db, &json!("2026-11-23T00:00:00.000")));
        assert!(!eq(Date, &db, &json!("2026-11-23T00:00:00+02:00")));
        assert!(!eq(Date, &db, &json!("2026-11-23T00:00:01Z")));
        assert!(!eq(Date, &db, &json!("2026-11-24")));
        assert!(text_eq(Date, &db, "2026-11-23", &[]));
        assert!(!text_eq(Date, &db, "23/11/2026", &[]));
    }

    #[test]
    fn integers_by_value_in_any_spelling() {
        for ty in [Integer, Numeric, Float] {
            for same in [
                json!(1),
                json!(1.0),
                parse("1e0"),
                parse("1.000"),
                json!("1"),
                json!("1.0"),
                json!("+1"),
                json!("01"),
            ] {
                assert!(eq(ty, &json!(1), &same), "{ty} {same}");
            }
            for differs in [
                json!(2),
                json!(1.5),
                json!("2"),
                json!("one"),
                json!(""),
                json!(true),
                json!([1]),
                Value::Null,
            ] {
                assert!(!eq(ty, &json!(1), &differs), "{ty} {differs}");
            }
            for same in ["1", "1.0", "1e0", "+1", "1."] {
                assert!(text_eq(ty, &json!(1), same, &[]), "{ty} {same}");
            }
            for differs in ["2", " 1", "1 ", "", "one", "0x1"] {
                assert!(!text_eq(ty, &json!(1), differs, &[]), "{ty} {differs:?}");
            }
        }
        assert!(eq(Integer, &json!(0), &json!("-0")));
        assert!(eq(Integer, &json!(-7), &json!("-7")));
    }

    #[test]
    fn text_is_exact() {
        assert!(!eq(Text, &json!("1"), &json!(1)));
        assert!(!eq(Text, &json!("1"), &json!("1.0")));
        assert!(!eq(Text, &json!("abc"), &json!("ABC")));
        assert!(!eq(Text, &json!("abc"), &json!("abc ")));
        assert!(!eq(Text, &json!("true"), &json!(true)));
        assert!(eq(Text, &json!("héllo\n"), &json!("héllo\n")));
        assert!(text_eq(Text, &json!("1"), "1", &[]));
        assert!(!text_eq(Text, &json!("1"), "1.0", &[]));
        assert!(!text_eq(Text, &json!("1"), "\"1\"", &[]));
        assert!(text_eq(Text, &json!(""), "", &[]));
    }

    #[test]
    fn bigints_beyond_2_pow_53_compare_exactly() {
        let db = parse("9007199254740993");
        assert!(eq(Integer, &db, &json!("9007199254740993")));
        assert!(eq(Integer, &db, &parse("9007199254740993")));
        assert!(!eq(Integer, &db, &json!("9007199254740992")));
        assert!(!eq(Integer, &db, &parse("9007199254740992")));
        assert!(!eq(Integer, &db, &json!("9007199254740994")));
        assert!(text_eq(Integer, &db, "9007199254740993", &[]));
        assert!(!text_eq(Integer, &db, "9007199254740992", &[]));
        let max = json!(i64::MAX);
        assert!(eq(Integer, &max, &json!("9223372036854775807")));
        assert!(!eq(Integer, &max, &json!("9223372036854775806")));
        assert!(!eq(Integer, &max, &json!("9223372036854775808")));
        assert!(eq(
            Integer,
            &json!(i64::MIN),
            &json!("-9223372036854775808")
        ));
        assert!(eq(
            Numeric,
            &json!(u64::MAX),
            &json!("18446744073709551615")
        ));
        assert!(!eq(
            Numeric,
            &json!(u64::MAX),
            &json!("18446744073709551614")
        ));
        // Numeric strings beyond 64 bits are still exact against each other.
        assert!(eq(
            Numeric,
            &json!("123456789012345678901234567890.10"),
            &json!("123456789012345678901234567890.1")
        ));
        assert!(!eq(
            Numeric,
            &json!("123456789012345678901234567890"),
            &json!("123456789012345678901234567891")
        ));
    }

    #[test]
    fn numerics_and_floats() {
        // PostgreSQL keeps numeric's scale: 1.50.
        let db = parse("1.50");
        for same in [json!(1.5), json!("1.5"), json!("1.50"), json!("15e-1")] {
            assert!(eq(Numeric, &db, &same), "{same}");
        }
        assert!(!eq(Numeric, &db, &json!("1.51")));
        assert!(!eq(Numeric, &db, &json!(1.51)));
        assert!(text_eq(Numeric, &db, "1.5", &[]));
        assert!(text_eq(Numeric, &json!(0.1), "0.1", &[]));
        assert!(!text_eq(Numeric, &json!(0.1), "0.10000001", &[]));
        // Parser rounding of floats is tolerated, real changes are not.
        let x = 95436449.86251687_f64;
        assert!(eq(
            Float,
            &json!(x),
            &json!(f64::from_bits(x.to_bits() + 1))
        ));
        assert!(eq(Float, &json!(x), &json!(x.to_string())));
        assert!(!eq(Float, &json!(x), &json!(x * (1.0 + 1e-12))));
        assert!(eq(Float, &json!(-0.0), &json!(0)));
        // Non-finite values are spelled as strings by PostgreSQL.
        assert!(eq(Float, &json!("NaN"), &json!("NaN")));
        assert!(eq(Float, &json!("Infinity"), &json!("infinity")));
        assert!(!eq(Float, &json!("Infinity"), &json!("-Infinity")));
        assert!(!eq(Float, &json!("NaN"), &json!(0)));
        assert!(!eq(Float, &json!("Infinity"), &json!(f64::MAX)));
        assert!(text_eq(Numeric, &json!("NaN"), "NaN", &[]));
    }

    #[test]
    fn uuids_ignore_case() {
        let db = json!("0190d5a4-6f2e-7c3b-9a1d-3e5f7a9b1c2d");
        for same in [
            "0190d5a4-6f2e-7c3b-9a1d-3e5f7a9b1c2d",
            "0190D5A4-6F2E-7C3B-9A1D-3E5F7A9B1C2D",
            "0190d5a46f2e7c3b9a1d3e5f7a9b1c2d",
            "{0190d5a4-6f2e-7c3b-9a1d-3e5f7a9b1c2d}",
            "urn:uuid:0190d5a4-6f2e-7c3b-9a1d-3e5f7a9b1c2d",
        ] {
            assert!(eq(Uuid, &db, &json!(same)), "{same}");
            assert!(text_eq(Uuid, &db, same, &[]), "{same}");
        }
        for differs in ["0190d5a4-6f2e-7c3b-9a1d-3e5f7a9b1c2e", "0190d5a4", ""] {
            assert!(!eq(Uuid, &db, &json!(differs)), "{differs}");
            assert!(!text_eq(Uuid, &db, differs, &[]), "{differs}");
        }
        // A text column holding a UUID is still text.
        assert!(!eq(
            Text,
            &db,
            &json!("0190D5A4-6F2E-7C3B-9A1D-3E5F7A9B1C2D")
        ));
    }

    #[test]
    fn booleans_per_representation() {
        // In a JSON document: JSON booleans only.
        assert!(eq(Boolean, &json!(true), &json!(true)));
        assert!(eq(Boolean, &json!(false), &json!(false)));
        assert!(!eq(Boolean, &json!(true), &json!(false)));
        for not_bool in [json!("true"), json!("t"), json!(1), json!("1"), Value::Null] {
            assert!(!eq(Boolean, &json!(true), &not_bool), "{not_bool}");
        }
        // As text (hash fields, string keys).
        for (text, b) in [
            ("true", true),
            ("True", true),
            ("TRUE", true),
            ("t", true),
            ("1", true),
            ("false", false),
            ("False", false),
            ("f", false),
            ("0", false),
        ] {
            assert!(text_eq(Boolean, &json!(b), text, &[]), "{text}");
            assert!(!text_eq(Boolean, &json!(!b), text, &[]), "{text}");
        }
        for junk in ["", "yes", "2", " true"] {
            assert!(!text_eq(Boolean, &json!(true), junk, &[]), "{junk:?}");
            assert!(!text_eq(Boolean, &json!(false), junk, &[]), "{junk:?}");
        }
    }

    #[test]
    fn json_columns_canonically_with_ignore_paths() {
        let db = json!({"color": "red", "sizes": [1, 2.5], "meta": {"etag": "a", "n": 1}});
        let same = parse(r#"{"meta":{"n":1.0,"etag":"a"},"sizes":[1.0,25e-1],"color":"red"}"#);
        let etag = json!({"color": "red", "sizes": [1, 2.5], "meta": {"etag": "b", "n": 1}});
        for ty in [Json, Other] {
            assert!(eq(ty, &db, &same));
            assert!(!eq(ty, &db, &etag));
            assert!(value_eq(ty, &db, &etag, &strs(&["meta.etag"])));
            assert!(!value_eq(ty, &db, &etag, &strs(&["meta.n"])));
            assert!(value_eq(ty, &db, &etag, &strs(&["meta"])));
            assert!(text_eq(ty, &db, &etag.to_string(), &strs(&["meta.etag"])));
            assert!(!text_eq(ty, &db, &etag.to_string(), &[]));
            assert!(text_eq(
                ty,
                &db,
                " {\"color\":\"red\", \"meta\":{\"n\":1,\"etag\":\"a\"},\"sizes\":[1,2.5]}",
                &[]
            ));
            assert!(!text_eq(ty, &db, "{not json", &[]));
        }
        // Array elements by index.
        let arr = json!([{"id": 1, "at": "x"}, {"id": 2, "at": "y"}]);
        let arr2 = json!([{"id": 1, "at": "z"}, {"id": 2, "at": "y"}]);
        assert!(value_eq(Json, &arr, &arr2, &strs(&["[0].at"])));
        assert!(!value_eq(Json, &arr, &arr2, &strs(&["[1].at"])));
        // A json column the application encoded twice (a string holding the JSON text).
        assert!(value_eq(Json, &db, &json!(same.to_string()), &[]));
        assert!(value_eq(
            Json,
            &db,
            &json!(etag.to_string()),
            &strs(&["meta.etag"])
        ));
        assert!(!value_eq(Json, &db, &json!(etag.to_string()), &[]));
        assert!(!value_eq(Other, &db, &json!(same.to_string()), &[]));
        // A json string value: as a JSON string or as its raw text.
        assert!(eq(Json, &json!("abc"), &json!("abc")));
        assert!(!eq(Json, &json!("abc"), &json!("\"abc\"")));
        assert!(text_eq(Json, &json!("abc"), "abc", &[]));
        assert!(text_eq(Json, &json!("abc"), "\"abc\"", &[]));
        assert!(text_eq(Json, &json!("123"), "123", &[]));
        assert!(!text_eq(Json, &json!(123), "\"123\"", &[]));
        assert!(text_eq(Json, &json!(123), "123.0", &[]));
    }

    #[test]
    fn nulls() {
        for ty in [
            Integer,
            Numeric,
            Float,
            Boolean,
            Text,
            Uuid,
            Timestamptz,
            Timestamp,
            Date,
            Json,
            Other,
        ] {
            assert!(eq(ty, &Value::Null, &Value::Null), "{ty}");
            assert!(!eq(ty, &Value::Null, &json!("")), "{ty}");
            assert!(!eq(ty, &Value::Null, &json!(0)), "{ty}");
            assert!(!eq(ty, &Value::Null, &json!("null")), "{ty}");
            assert!(text_eq(ty, &Value::Null, "", &[]), "{ty}");
            assert!(!text_eq(ty, &Value::Null, "null", &[]), "{ty}");
            assert!(!text_eq(ty, &Value::Null, "0", &[]), "{ty}");
        }
        assert!(!text_eq(Text, &json!("x"), "", &[]));
        assert!(text_eq(Text, &json!(""), "", &[]));
    }
}
