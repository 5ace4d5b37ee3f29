//! Writing a key from PostgreSQL in its entity's representation: what a refresh and a repair
//! do. stalewatch never writes a key for any other reason.
//!
//! A JSON document whose entity has an integer version is written with the versioned
//! compare-and-set, so a refresh or repair racing the application's own write never puts
//! an older version back. Other representations have no version to compare and are
//! replaced whole, atomically (MULTI): a reader sees the old value or the new one.

use serde_json::Value;

use crate::cache::{Cache, CacheError};
use crate::column::ColumnType;
use crate::entity::Representation;
use crate::rows::{RawRow, Row, Rows, Spelling};

/// What writing one key did, for `stalewatch_repairs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Written,
    /// The cache already held a newer version.
    SkippedNewer,
    /// No row behind the key: the key was deleted.
    Deleted,
    /// The row cannot be decoded: nothing sound to write.
    Undecodable,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Written => "written",
            Outcome::SkippedNewer => "skipped_newer",
            Outcome::Deleted => "deleted",
            Outcome::Undecodable => "undecodable",
        }
    }
}

/// A column's value as the text a string key or a hash field holds.
pub fn text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// What to write for one key, decided from its row alone: the one place that maps a row to
/// its representation's value, shared by a refresh or repair (one key, [`write`]) and a
/// rebuild (many keys per pipeline, `crate::rebuild`).
#[derive(Debug, Clone, PartialEq)]
pub enum Rendered {
    /// A JSON document that carries an integer version: written unless the cache holds a
    /// newer one.
    Versioned {
        bytes: Vec<u8>,
        field: String,
        version: i64,
    },
    /// A value with no version to compare: written as it is.
    Plain(Vec<u8>),
    /// A hash, replaced whole.
    Hash(Vec<(String, String)>),
    /// A set, replaced whole.
    Set(Vec<String>),
    /// Nothing behind the key (no row, or a string entity's value is NULL): delete it.
    Delete,
    /// A row of the wrong shape for its representation (cannot come out of `Rows`).
    Undecodable,
}

/// What `row` (`None`: no row behind the key) is in `rows`' entity's representation.
pub fn render(rows: &Rows, row: Option<&Row>) -> Rendered {
    let entity = &rows.entity;
    match (&entity.representation, row) {
        (_, None) => Rendered::Delete,
        (Representation::Json { .. }, Some(Row::Doc(doc))) => {
            // Serialised from the borrowed map: no copy of the document to throw away.
            let bytes = serde_json::to_vec(doc).expect("a JSON map serialises");
            let version = entity.version.as_ref().and_then(|column| {
                let integer = rows.types.get(column) == Some(&ColumnType::Integer);
                Some((column, doc.get(column)?.as_i64().filter(|_| integer)?))
            });
            match version {
                Some((field, version)) => Rendered::Versioned {
                    bytes,
                    field: field.clone(),
                    version,
                },
                None => Rendered::Plain(bytes),
            }
        }
        (Representation::String { value }, Some(Row::Doc(doc))) => {
            match doc.get(value).and_then(text) {
                Some(text) => Rendered::Plain(text.into_bytes()),
                None => Rendered::Delete,
            }
        }
        (Representation::Hash { .. }, Some(Row::Doc(doc))) => Rendered::Hash(
            doc.iter()
                .filter_map(|(k, v)| Some((k.clone(), text(v)?)))
                .collect(),
        ),
        (Representation::Set { .. }, Some(Row::Members(members))) => {
            Rendered::Set(members.iter().cloned().collect())
        }
        (_, Some(_)) => Rendered::Undecodable,
    }
}

/// [`render`] of a JSON entity's row straight from its cells as PostgreSQL sent them
/// ([`Rows::cells`]), without building a map of values: the same bytes [`render`] writes once
/// the cells are decoded (fields by name, no spaces). An integer's or a boolean's text is its
/// JSON, a string is escaped as serde_json escapes it, and a value PostgreSQL rendered as JSON
/// is copied when serde_json writes it back as it is (a string, an integer, a boolean or a
/// null). `None` for any other entity or row (a float, a nested document, a json string with
/// an escape serde_json writes differently): [`render`] takes those, from the decoded row. A
/// rebuild writes most rows this way; parsing and serialising each document again was a fifth
/// of its CPU.
pub fn render_cells(rows: &Rows, raw: &RawRow) -> Option<Rendered> {
    if !matches!(rows.entity.representation, Representation::Json { .. }) {
        return None;
    }
    let version_column = rows
        .entity
        .version
        .as_deref()
        .filter(|column| rows.types.get(*column) == Some(&ColumnType::Integer));
    let mut version = None;
    let mut bytes = Vec::with_capacity(256);
    bytes.push(b'{');
    for (i, (name, spelling, text)) in rows.cells(raw)?.enumerate() {
        if i > 0 {
            bytes.push(b',');
        }
        serde_json::to_writer(&mut bytes, name).expect("a string serialises");
        bytes.push(b':');
        let Some(text) = text else {
            bytes.extend_from_slice(b"null");
            continue;
        };
        match spelling {
            Spelling::Integer | Spelling::Boolean => bytes.extend_from_slice(text.as_bytes()),
            Spelling::Text => serde_json::to_writer(&mut bytes, text).expect("a string serialises"),
            Spelling::Json if serialises_as_parsed(text) => {
                bytes.extend_from_slice(text.as_bytes())
            }
            Spelling::Json => return None,
        }
        if Some(name) == version_column {
            version = text.parse::<i64>().ok();
        }
    }
    bytes.push(b'}');
    Some(match (version_column, version) {
        (Some(field), Some(version)) => Rendered::Versioned {
            bytes,
            field: field.to_string(),
            version,
        },
        _ => Rendered::Plain(bytes),
    })
}

/// Whether serde_json writes `raw` (one JSON value's text) back byte for byte after parsing
/// it: a string whose escapes are the ones serde_json writes, `true`, `false`, `null`, or an
/// integer of at most 18 digits without a sign on zero (which `i64` and `u64` hold exactly;
/// serde_json reads `-0` as a float). A json column's string may hold other escapes.
fn serialises_as_parsed(raw: &str) -> bool {
    match raw.as_bytes() {
        [b'"', body @ ..] => escapes_as_serde(body),
        b"true" | b"false" | b"null" => true,
        [b'-', b'1'..=b'9', rest @ ..] | [b'1'..=b'9', rest @ ..] => {
            rest.len() < 18 && rest.iter().all(u8::is_ascii_digit)
        }
        b"0" => true,
        _ => false,
    }
}

/// Whether every escape in a JSON string's text is the one serde_json writes for its
/// character: `\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, and `\u00xx` (lowercase) for the
/// other control characters. PostgreSQL escapes exactly so; a json column's text may hold
/// others (`\/`, `\u0041`), which serde_json would write differently.
fn escapes_as_serde(text: &[u8]) -> bool {
    let mut i = 0;
    while let Some(at) = text[i..].iter().position(|&b| b == b'\\') {
        let escape = &text[i + at + 1..];
        i += at + 2;
        match escape {
            [b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't', ..] => {}
            [b'u', b'0', b'0', high @ (b'0' | b'1'), low, ..] => {
                let code = (high - b'0') * 16
                    + match low {
                        b'0'..=b'9' => low - b'0',
                        b'a'..=b'f' => low - b'a' + 10,
                        _ => return false,
                    };
                if matches!(code, 0x08 | 0x09 | 0x0a | 0x0c | 0x0d) {
                    return false;
                }
                i += 4;
            }
            _ => return false,
        }
    }
    true
}

/// Writes what PostgreSQL holds behind `key` (`row`; `None`: nothing) to the cache.
pub async fn write(
    cache: &Cache,
    rows: &Rows,
    key: &str,
    row: Option<&Row>,
) -> Result<Outcome, CacheError> {
    let ttl = rows.entity.ttl;
    let written = match render(rows, row) {
        Rendered::Delete => {
            cache.delete(key).await?;
            return Ok(Outcome::Deleted);
        }
        Rendered::Undecodable => return Ok(Outcome::Undecodable),
        Rendered::Versioned {
            bytes,
            field,
            version,
        } => {
            cache
                .set_unless_newer_field(key, &bytes, &field, version, ttl)
                .await?
        }
        Rendered::Plain(bytes) => {
            cache.set_keeping_ttl(key, &bytes, ttl).await?;
            true
        }
        Rendered::Hash(fields) => {
            cache.replace_hash(key, &fields, ttl).await?;
            true
        }
        Rendered::Set(members) => {
            let members: Vec<&String> = members.iter().collect();
            cache.replace_set(key, &members, ttl).await?;
            true
        }
    };
    Ok(if written {
        Outcome::Written
    } else {
        Outcome::SkippedNewer
    })
}
