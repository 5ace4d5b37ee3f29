//! Column types, and how the values of each are spelled.
//!
//! The database side of a comparison is a row rendered by PostgreSQL (`to_jsonb`,
//! `jsonb_build_object`); the cache side is whatever the application wrote. Both spell the
//! same value in many ways (`2026-11-23T20:53:24.927197+00:00`, `...Z`,
//! `2026-11-23 20:53:24.927197+00`; `42`, `42.0`, `"42"`), so values are compared by their
//! column's type: this module knows the types and parses the spellings; the comparison
//! itself is [`crate::compare::value_eq`] and friends.

use std::fmt;

use chrono::NaiveDate;
use serde_json::Value;

/// The type of a column, as far as comparing its values is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnType {
    /// `bigint`, `integer`, `smallint` (and their serial aliases).
    Integer,
    /// `numeric`, `decimal`, with or without precision and scale.
    Numeric,
    /// `real`, `double precision`.
    Float,
    Boolean,
    /// `text`, `character varying(n)`, `character(n)`, `name`: compared exactly.
    Text,
    Uuid,
    /// `timestamp with time zone`.
    Timestamptz,
    /// `timestamp without time zone`.
    Timestamp,
    Date,
    /// `json`, `jsonb`: compared canonically.
    Json,
    /// Anything else (arrays, enums, intervals, ...): compared as its JSON value, canonically.
    Other,
}

impl ColumnType {
    /// The type named by PostgreSQL's `format_type()` (or `information_schema`'s
    /// `data_type`, or a common alias such as `int8`, `timestamptz`, `varchar`).
    /// Type modifiers (`numeric(10,2)`, `timestamp(3) with time zone`) do not matter;
    /// arrays (`integer[]`) and unknown names are [`ColumnType::Other`].
    /// Whether `text` (a value parsed out of a cache key) reads as this type, so it can be
    /// cast in SQL without failing the whole statement.
    pub fn accepts_text(self, text: &str) -> bool {
        match self {
            ColumnType::Integer => text.parse::<i64>().is_ok(),
            ColumnType::Numeric | ColumnType::Float => text.parse::<f64>().is_ok(),
            ColumnType::Boolean => {
                matches!(
                    text.to_ascii_lowercase().as_str(),
                    "true" | "false" | "t" | "f" | "1" | "0"
                )
            }
            ColumnType::Uuid => uuid::Uuid::parse_str(text).is_ok(),
            ColumnType::Timestamptz | ColumnType::Timestamp | ColumnType::Date => {
                version_of(self, &serde_json::Value::String(text.to_string())).is_some()
            }
            ColumnType::Text | ColumnType::Json | ColumnType::Other => true,
        }
    }

    pub fn from_pg(type_name: &str) -> ColumnType {
        let lower = type_name.trim().to_ascii_lowercase();
        if lower.ends_with(']') {
            return ColumnType::Other;
        }
        // Drop "(...)" modifiers wherever they are, then normalise spaces.
        let mut bare = String::with_capacity(lower.len());
        let mut depth = 0usize;
        for c in lower.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                _ if depth == 0 => bare.push(c),
                _ => {}
            }
        }
        let bare = bare.split_whitespace().collect::<Vec<_>>().join(" ");
        match bare.as_str() {
            "bigint" | "integer" | "smallint" | "int" | "int2" | "int4" | "int8" | "bigserial"
            | "serial" | "smallserial" | "serial2" | "serial4" | "serial8" => ColumnType::Integer,
            "numeric" | "decimal" => ColumnType::Numeric,
            "real" | "double precision" | "float" | "float4" | "float8" => ColumnType::Float,
            "boolean" | "bool" => ColumnType::Boolean,
            "text" | "character varying" | "varchar" | "character" | "char" | "bpchar" | "name" => {
                ColumnType::Text
            }
            "uuid" => ColumnType::Uuid,
            "timestamp with time zone" | "timestamptz" => ColumnType::Timestamptz,
            "timestamp without time zone" | "timestamp" => ColumnType::Timestamp,
            "date" => ColumnType::Date,
            "json" | "jsonb" => ColumnType::Json,
            _ => ColumnType::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ColumnType::Integer => "integer",
            ColumnType::Numeric => "numeric",
            ColumnType::Float => "float",
            ColumnType::Boolean => "boolean",
            ColumnType::Text => "text",
            ColumnType::Uuid => "uuid",
            ColumnType::Timestamptz => "timestamptz",
            ColumnType::Timestamp => "timestamp",
            ColumnType::Date => "date",
            ColumnType::Json => "json",
            ColumnType::Other => "other",
        }
    }

    /// True for the types whose values are JSON documents compared canonically, path by path.
    pub fn is_document(self) -> bool {
        matches!(self, ColumnType::Json | ColumnType::Other)
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The value of a version column as one `i64`, for ordering.
///
/// - integer and numeric columns: the integer, from a JSON number (`3`, `3.0`) or a numeric
///   string (`"3"`); not an integer, or outside `i64`: `None`;
/// - timestamp (with or without time zone) and date columns: microseconds since the Unix
///   epoch, from any RFC 3339 spelling or PostgreSQL's text form (a time without an offset
///   counts as UTC; digits beyond the microsecond are dropped);
/// - other columns: an integer if the value is one, else a timestamp if it is one;
/// - float, boolean, text, uuid and json columns: `None` (they do not order versions).
pub fn version_of(ty: ColumnType, v: &Value) -> Option<i64> {
    match ty {
        ColumnType::Integer | ColumnType::Numeric => integer_of(v),
        ColumnType::Timestamptz | ColumnType::Timestamp => DateTime::parse(v.as_str()?)?.micros(),
        ColumnType::Date => date_micros(v.as_str()?),
        ColumnType::Other => infer_version(v),
        ColumnType::Float
        | ColumnType::Boolean
        | ColumnType::Text
        | ColumnType::Uuid
        | ColumnType::Json => None,
    }
}

/// A version of unknown type (the cached side of a row that is gone): an integer if the
/// value is one, else a timestamp's microseconds.
pub fn infer_version(v: &Value) -> Option<i64> {
    integer_of(v).or_else(|| DateTime::parse(v.as_str()?)?.micros())
}

fn integer_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                return Some(i);
            }
            if n.is_u64() {
                return None;
            }
            let f = n.as_f64()?;
            // Integral and inside i64 (±2^63 are exact as f64s); `as` is then exact.
            const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
            (f.fract() == 0.0 && (-TWO_POW_63..TWO_POW_63).contains(&f)).then_some(f as i64)
        }
        Value::String(s) => Decimal::parse(s)?.to_i64(),
        _ => None,
    }
}

fn date_micros(s: &str) -> Option<i64> {
    let date = match parse_date(s) {
        Some(d) => d,
        None => DateTime::parse(s)?.as_date()?,
    };
    days_since_epoch(date)?.checked_mul(86_400_000_000)
}

// ---- numbers ----

/// An exact decimal number: `(-1)^neg × digits × 10^exp`, `digits` without leading or
/// trailing zeros (empty for zero, which is never negative). Equal values are equal structs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decimal {
    neg: bool,
    digits: String,
    exp: i64,
}

impl Decimal {
    /// `[+-]digits[.digits][(e|E)[+-]digits]`, also `.5` and `5.` (PostgreSQL's numeric
    /// input); no spaces, no `NaN`/`Infinity` (see [`Special`]).
    pub(crate) fn parse(s: &str) -> Option<Decimal> {
        let b = s.as_bytes();
        let mut i = 0;
        let neg = match b.first() {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let int_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let int_part = &s[int_start..i];
        let mut frac_part = "";
        if i < b.len() && b[i] == b'.' {
            i += 1;
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            frac_part = &s[start..i];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return None;
        }
        let mut exp: i64 = 0;
        if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
            i += 1;
            let start = i;
            if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
                i += 1;
            }
            let digits_start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            if i == digits_start || i - digits_start > 15 {
                return None;
            }
            exp = s[start..i].parse().ok()?;
        }
        if i != b.len() {
            return None;
        }
        let all = format!("{int_part}{frac_part}");
        let trimmed_start = all.trim_start_matches('0');
        let digits = trimmed_start.trim_end_matches('0');
        if digits.is_empty() {
            return Some(Decimal {
                neg: false,
                digits: String::new(),
                exp: 0,
            });
        }
        let trailing = (trimmed_start.len() - digits.len()) as i64;
        let exp = exp - frac_part.len() as i64 + trailing;
        Some(Decimal {
            neg,
            digits: digits.to_owned(),
            exp,
        })
    }

    /// The value when it is an integer inside `i64`.
    pub(crate) fn to_i64(&self) -> Option<i64> {
        if self.digits.is_empty() {
            return Some(0);
        }
        if self.exp < 0 || self.digits.len() as i64 + self.exp > 19 {
            return None;
        }
        let mut n: i128 = self.digits.parse().ok()?;
        for _ in 0..self.exp {
            n = n.checked_mul(10)?;
        }
        i64::try_from(if self.neg { -n } else { n }).ok()
    }

    /// The nearest f64 (infinite when out of range).
    pub(crate) fn to_f64(&self) -> f64 {
        if self.digits.is_empty() {
            return 0.0;
        }
        let sign = if self.neg { "-" } else { "" };
        format!("{sign}{}e{}", self.digits, self.exp)
            .parse()
            .unwrap_or(f64::NAN)
    }
}

/// The non-finite values PostgreSQL spells as strings (`"NaN"`, `"Infinity"`,
/// `"-Infinity"`), case-insensitively, also `inf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Special {
    NaN,
    Infinity,
    NegInfinity,
}

impl Special {
    pub(crate) fn parse(s: &str) -> Option<Special> {
        match s.to_ascii_lowercase().as_str() {
            "nan" => Some(Special::NaN),
            "infinity" | "+infinity" | "inf" | "+inf" => Some(Special::Infinity),
            "-infinity" | "-inf" => Some(Special::NegInfinity),
            _ => None,
        }
    }
}

// ---- booleans ----

/// A boolean as text: `true`/`false`, `t`/`f`, `1`/`0`, ASCII case-insensitive.
pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "t" | "1" => Some(true),
        "false" | "f" | "0" => Some(false),
        _ => None,
    }
}

// ---- dates and times ----

/// A date and time as written, with its offset if it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DateTime {
    date: NaiveDate,
    /// Seconds into the day, up to 86,400 (a leap second, 23:59:60).
    secs_of_day: u32,
    /// The fraction of a second, in units of 10^-18 s.
    atto: u64,
    /// Seconds east of UTC; `None` when the text has no offset.
    offset: Option<i32>,
}

impl DateTime {
    /// RFC 3339 (`2026-11-23T20:53:24.927197Z`, `+00:00`, `-05:30`, `t`/`z` in lower
    /// case) and PostgreSQL's text form (`2026-11-23 20:53:24.927197+00`, offsets with
    /// seconds such as `+00:53:28`). Also accepted: no offset, no seconds, a space before
    /// the offset, `+0000`, `UTC`/`GMT`. Up to 18 fractional digits; years of 4 to 6
    /// digits; not `BC`, not `infinity`.
    pub(crate) fn parse(s: &str) -> Option<DateTime> {
        let b = s.as_bytes();
        let mut i = 0;
        let date = date_prefix(b, &mut i)?;
        match b.get(i) {
            Some(b'T' | b't' | b' ') => i += 1,
            _ => return None,
        }
        let h = two_digits(b, &mut i)?;
        expect(b, &mut i, b':')?;
        let m = two_digits(b, &mut i)?;
        let mut sec = 0;
        let mut atto = 0u64;
        if b.get(i) == Some(&b':') {
            i += 1;
            sec = two_digits(b, &mut i)?;
            if b.get(i) == Some(&b'.') {
                i += 1;
                let start = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                let frac = &s[start..i];
                if frac.is_empty() || frac.len() > 18 {
                    return None;
                }
                atto = frac.parse::<u64>().ok()? * 10u64.pow(18 - frac.len() as u32);
            }
        }
        if h > 23 || m > 59 || sec > 60 {
            return None;
        }
        let rest = &s[i..];
        let offset = if rest.is_empty() {
            None
        } else {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            Some(parse_offset(rest)?)
        };
        Some(DateTime {
            date,
            secs_of_day: h * 3600 + m * 60 + sec,
            atto,
            offset,
        })
    }

    /// The instant, as (seconds since the Unix epoch, attoseconds); no offset counts as UTC.
    pub(crate) fn instant(&self) -> Option<(i64, u64)> {
        let secs = days_since_epoch(self.date)?
            .checked_mul(86_400)?
            .checked_add(i64::from(self.secs_of_day))?
            .checked_sub(i64::from(self.offset.unwrap_or(0)))?;
        Some((secs, self.atto))
    }

    /// Microseconds since the Unix epoch (sub-microsecond digits dropped).
    pub(crate) fn micros(&self) -> Option<i64> {
        let (secs, atto) = self.instant()?;
        secs.checked_mul(1_000_000)?
            .checked_add((atto / 1_000_000_000_000) as i64)
    }

    /// The date, when this is midnight exactly, without an offset or at UTC.
    pub(crate) fn as_date(&self) -> Option<NaiveDate> {
        (self.secs_of_day == 0 && self.atto == 0 && self.offset.unwrap_or(0) == 0)
            .then_some(self.date)
    }
}

/// `YYYY-MM-DD` (4 to 6 year digits), a valid date, nothing else.
pub(crate) fn parse_date(s: &str) -> Option<NaiveDate> {
    let mut i = 0;
    let d = date_prefix(s.as_bytes(), &mut i)?;
    (i == s.len()).then_some(d)
}

fn days_since_epoch(d: NaiveDate) -> Option<i64> {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1)?;
    Some(d.signed_duration_since(epoch).num_days())
}

fn date_prefix(b: &[u8], i: &mut usize) -> Option<NaiveDate> {
    let start = *i;
    while *i < b.len() && b[*i].is_ascii_digit() {
        *i += 1;
    }
    let len = *i - start;
    if !(4..=6).contains(&len) {
        return None;
    }
    let year: i32 = std::str::from_utf8(&b[start..*i]).ok()?.parse().ok()?;
    expect(b, i, b'-')?;
    let month = two_digits(b, i)?;
    expect(b, i, b'-')?;
    let day = two_digits(b, i)?;
    NaiveDate::from_ymd_opt(year, month, day)
}

fn two_digits(b: &[u8], i: &mut usize) -> Option<u32> {
    match b.get(*i..*i + 2)? {
        [x @ b'0'..=b'9', y @ b'0'..=b'9'] => {
            *i += 2;
            Some(u32::from(x - b'0') * 10 + u32::from(y - b'0'))
        }
        _ => None,
    }
}

fn expect(b: &[u8], i: &mut usize, c: u8) -> Option<()> {
    (b.get(*i) == Some(&c)).then(|| *i += 1)
}

/// `Z`, `z`, `UTC`, `GMT`, or `±HH`, `±HH:MM`, `±HHMM`, `±HH:MM:SS`, `±HHMMSS`.
fn parse_offset(s: &str) -> Option<i32> {
    if matches!(s, "Z" | "z" | "UTC" | "GMT") {
        return Some(0);
    }
    let b = s.as_bytes();
    let sign = match b.first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let mut i = 1;
    let h = two_digits(b, &mut i)?;
    let mut parts = [0u32; 2];
    for part in &mut parts {
        if i == b.len() {
            break;
        }
        if b[i] == b':' {
            i += 1;
        }
        *part = two_digits(b, &mut i)?;
    }
    if i != b.len() || h > 23 || parts[0] > 59 || parts[1] > 59 {
        return None;
    }
    Some(sign * (h * 3600 + parts[0] * 60 + parts[1]) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn types_from_format_type() {
        use ColumnType::*;
        for (name, ty) in [
            ("bigint", Integer),
            ("integer", Integer),
            ("smallint", Integer),
            ("int8", Integer),
            ("numeric", Numeric),
            ("numeric(10,2)", Numeric),
            ("NUMERIC (10, 2)", Numeric),
            ("real", Float),
            ("double precision", Float),
            ("boolean", Boolean),
            ("text", Text),
            ("character varying(255)", Text),
            ("character varying", Text),
            ("character(3)", Text),
            ("uuid", Uuid),
            ("timestamp with time zone", Timestamptz),
            ("timestamp(3) with time zone", Timestamptz),
            ("timestamptz", Timestamptz),
            ("timestamp without time zone", Timestamp),
            ("timestamp(6) without time zone", Timestamp),
            ("date", Date),
            ("json", Json),
            ("jsonb", Json),
            (" jsonb ", Json),
            ("integer[]", Other),
            ("text[]", Other),
            ("time with time zone", Other),
            ("interval", Other),
            ("bytea", Other),
            ("public.mood", Other),
            ("", Other),
        ] {
            assert_eq!(ColumnType::from_pg(name), ty, "{name:?}");
        }
        assert_eq!(Timestamptz.to_string(), "timestamptz");
        assert!(Json.is_document() && Other.is_document() && !Text.is_document());
    }

    #[test]
    fn integer_versions() {
        use ColumnType::{Integer, Numeric};
        for (v, want) in [
            (json!(3), Some(3)),
            (json!(-3), Some(-3)),
            (json!(3.0), Some(3)),
            (json!("3"), Some(3)),
            (json!("+3"), Some(3)),
            (json!("0003.000"), Some(3)),
            (json!("30e-1"), Some(3)),
            (json!("1e3"), Some(1000)),
            (json!(i64::MAX), Some(i64::MAX)),
            (json!(i64::MIN), Some(i64::MIN)),
            (json!("9223372036854775807"), Some(i64::MAX)),
            (json!("-9223372036854775808"), Some(i64::MIN)),
            (json!("9223372036854775808"), None),
            (json!(u64::MAX), None),
            (json!(1e19), None),
            (json!(3.5), None),
            (json!("3.5"), None),
            (json!("three"), None),
            (json!(""), None),
            (json!(" 3"), None),
            (json!(true), None),
            (Value::Null, None),
        ] {
            assert_eq!(version_of(Integer, &v), want, "{v}");
            assert_eq!(version_of(Numeric, &v), want, "{v}");
        }
        let big: Value = serde_json::from_str("9007199254740993").unwrap();
        assert_eq!(version_of(Integer, &big), Some(9_007_199_254_740_993));
        assert_eq!(
            version_of(Integer, &json!("9007199254740993")),
            Some(9_007_199_254_740_993)
        );
    }

    #[test]
    fn timestamp_versions_are_microseconds() {
        let want = Some(1_795_467_204_927_197);
        for s in [
            "2026-11-23T20:53:24.927197Z",
            "2026-11-23T20:53:24.927197z",
            "2026-11-23t20:53:24.927197+00:00",
            "2026-11-23T20:53:24.927197-00:00",
            "2026-11-23T20:53:24.927197000Z",
            "2026-11-23T20:53:24.9271979Z",
            "2026-11-23 20:53:24.927197+00",
            "2026-11-23 20:53:24.927197 +0000",
            "2026-11-23 20:53:24.927197 UTC",
            "2026-11-23T21:53:24.927197+01:00",
            "2026-11-23T16:23:24.927197-04:30",
            "2026-11-23T21:46:52.927197+00:53:28",
            "2026-11-23T20:53:24.927197",
        ] {
            for ty in [
                ColumnType::Timestamptz,
                ColumnType::Timestamp,
                ColumnType::Other,
            ] {
                assert_eq!(version_of(ty, &json!(s)), want, "{s} {ty}");
            }
        }
        assert_eq!(
            version_of(ColumnType::Timestamptz, &json!("1970-01-01T00:00:00Z")),
            Some(0)
        );
        assert_eq!(
            version_of(ColumnType::Timestamptz, &json!("1969-12-31T23:59:59.5Z")),
            Some(-500_000)
        );
        assert_eq!(
            version_of(ColumnType::Date, &json!("1970-01-02")),
            Some(86_400_000_000)
        );
        assert_eq!(
            version_of(ColumnType::Date, &json!("1970-01-02T00:00:00Z")),
            Some(86_400_000_000)
        );
        for bad in [
            json!("2026-11-23"),
            json!("2026-13-23T20:53:24Z"),
            json!("2026-02-30T20:53:24Z"),
            json!("2026-11-23T24:00:00Z"),
            json!("2026-11-23T20:53:24.Z"),
            json!("2026-11-23T20:53:24.927197+0"),
            json!("2026-11-23T20:53:24.927197+00:0"),
            json!("2026-11-23T20:53:24.927197 "),
            json!("2026-11-23T20:53:24.927197Zjunk"),
            json!("0044-03-15 12:00:00+00 BC"),
            json!("infinity"),
            json!(1795466004),
        ] {
            assert_eq!(version_of(ColumnType::Timestamptz, &bad), None, "{bad}");
        }
        // Ordering follows the instant, not the text.
        let a = version_of(ColumnType::Timestamptz, &json!("2026-11-23T20:53:24+01:00"));
        let b = version_of(ColumnType::Timestamptz, &json!("2026-11-23T20:00:00Z"));
        assert!(a < b);
    }

    #[test]
    fn non_version_types() {
        for ty in [
            ColumnType::Float,
            ColumnType::Boolean,
            ColumnType::Text,
            ColumnType::Uuid,
            ColumnType::Json,
        ] {
            assert_eq!(version_of(ty, &json!(3)), None, "{ty}");
            assert_eq!(version_of(ty, &json!("2026-11-23T20:53:24Z")), None);
        }
        assert_eq!(infer_version(&json!(7)), Some(7));
        assert_eq!(infer_version(&json!("7")), Some(7));
        assert_eq!(
            infer_version(&json!("1970-01-01T00:00:01Z")),
            Some(1_000_000)
        );
        assert_eq!(infer_version(&json!("x")), None);
    }

    #[test]
    fn decimals_are_canonical() {
        let d = |s: &str| Decimal::parse(s);
        assert_eq!(d("1"), d("1.0"));
        assert_eq!(d("1"), d("001.000"));
        assert_eq!(d("1"), d("0.1e1"));
        assert_eq!(d("100"), d("1E2"));
        assert_eq!(d("0"), d("-0.000"));
        assert_eq!(d("0"), d("0e99"));
        assert_eq!(d(".5"), d("0.5"));
        assert_eq!(d("5."), d("5"));
        assert_eq!(d("-1.50"), d("-1.5"));
        assert_ne!(d("1"), d("-1"));
        assert_ne!(d("9007199254740993"), d("9007199254740992"));
        for bad in [
            "",
            "-",
            ".",
            "e1",
            "1e",
            "1e+",
            "1.2.3",
            " 1",
            "1 ",
            "0x10",
            "NaN",
            "1e1234567890123456",
        ] {
            assert_eq!(d(bad), None, "{bad:?}");
        }
        assert_eq!(d("1.5").unwrap().to_f64(), 1.5);
        assert_eq!(d("-0").unwrap().to_f64(), 0.0);
        assert_eq!(Special::parse("-Infinity"), Some(Special::NegInfinity));
        assert_eq!(Special::parse("NaN"), Some(Special::NaN));
        assert_eq!(Special::parse("nope"), None);
    }

    #[test]
    fn booleans_as_text() {
        for (s, b) in [
            ("true", true),
            ("TRUE", true),
            ("True", true),
            ("t", true),
            ("1", true),
            ("false", false),
            ("F", false),
            ("0", false),
        ] {
            assert_eq!(parse_bool(s), Some(b), "{s}");
        }
        for s in ["", "yes", "2", " true", "tru"] {
            assert_eq!(parse_bool(s), None, "{s}");
        }
    }
}
