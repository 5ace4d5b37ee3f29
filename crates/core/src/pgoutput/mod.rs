//! A decoder for the messages of PostgreSQL's `pgoutput` logical decoding plugin,
//! protocol version 1 (PostgreSQL docs, "Logical Replication Message Formats").
//!
//! Pure: bytes in, [`Message`] out. The transport (replication connection, slot, feedback)
//! lives elsewhere; it hands over one message at a time, the payload of one `XLogData`,
//! which is what [`decode`] takes. [`Relations`] keeps the latest [`Relation`] of each id so
//! that a [`Tuple`] can be read as column -> value ([`Tuple::named`]).
//!
//! What the wire looks like (seen in the captured fixtures, PostgreSQL 15):
//!
//! * Every change is framed by `Begin` ... `Commit`; `Begin.final_lsn` equals
//!   `Commit.commit_lsn`. A transaction that changes nothing published (e.g. `ALTER TABLE`)
//!   is not sent at all, so xids have gaps. A non-transactional logical message
//!   ([`Message::Logical`] with `transactional == false`) comes on its own, outside any
//!   `Begin`/`Commit`.
//! * A `Relation` (preceded by a `Type` for each column of a user-defined type) comes before
//!   the first change of a relation in a transaction whenever the plugin's cache of it was
//!   invalidated, so it is re-sent unchanged from time to time (here: before each
//!   `TRUNCATE`), and re-sent with the new column list after `ALTER TABLE ... ADD COLUMN`.
//!   Treat it as an upsert ([`Relations::apply`]).
//! * With `REPLICA IDENTITY DEFAULT` the relation's key columns are flagged `key`; an
//!   `UPDATE` that keeps the key has no old tuple, one that changes it has a `'K'` old tuple,
//!   and a `DELETE` has a `'K'` old tuple. A `'K'` tuple has every column, the non-key
//!   ones as [`Value::Null`], so `Null` there means "not sent", not SQL NULL.
//! * With `REPLICA IDENTITY FULL` the relation's replica identity is `'f'` and *every*
//!   column is flagged `key`; `UPDATE` and `DELETE` have an `'O'` old tuple with every
//!   value, TOASTed ones included (de-TOASTed, in full).
//! * An `UPDATE` that leaves a TOASTed (out-of-line) value alone sends it as
//!   [`Value::Unchanged`] in the new tuple: the value is not in the stream; keep the old one.
//! * In a transaction replayed with a replication origin (`Origin` after `Begin`), the
//!   commit timestamp in `Begin` and `Commit` is the origin's, not the local commit time.
//! * Timestamps are microseconds since 2000-01-01 00:00:00 UTC ([`PG_EPOCH_UNIX_US`]).
//! * Values are text (`'t'`), PostgreSQL's output format, unless the slot was read with
//!   `binary 'true'`: then `'b'`, each type's binary send format (e.g. a big-endian int4,
//!   numeric as base-10000 digits).
//!
//! Protocol 2+ messages (streaming of in-progress transactions, two-phase commit) are not
//! decoded: they are reported as [`DecodeError::Unsupported`].
//!
//! # The fixtures
//!
//! `fixtures.txt` holds real messages, one a line, `<stream>|<lsn>|<hex>`, captured from a
//! throwaway PostgreSQL 15.20 cluster with `wal_level = logical` (started by hand, nothing
//! at test time needs it). To re-capture: `initdb`, add `wal_level = logical` to
//! `postgresql.conf`, start, and in database `postgres` run, each statement in its own
//! transaction unless inside `BEGIN`/`COMMIT`:
//!
//! ```sql
//! CREATE TYPE mood AS ENUM ('happy', 'sad');
//! CREATE TABLE items (id int PRIMARY KEY, name varchar(20) NOT NULL, price numeric(10,2), note text);
//! ALTER TABLE items ALTER COLUMN note SET STORAGE EXTERNAL;
//! CREATE TABLE docs (id int NOT NULL, mood mood, body text);
//! ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
//! ALTER TABLE docs REPLICA IDENTITY FULL;
//! -- before the slot: these rows are not in the stream, their big values are TOASTed
//! INSERT INTO items VALUES (3, 'big', 1, repeat('x', 3000));
//! INSERT INTO docs VALUES (1, 'happy', repeat('y', 2100));
//! CREATE PUBLICATION pub FOR ALL TABLES;
//! SELECT pg_create_logical_replication_slot('slot', 'pgoutput');
//! SELECT pg_replication_origin_create('upstream');
//!
//! INSERT INTO items VALUES (1, 'widget', 9.99, NULL);
//! UPDATE items SET price = 10.50 WHERE id = 1;
//! UPDATE items SET id = 2 WHERE id = 1;
//! UPDATE items SET name = 'big2' WHERE id = 3;
//! DELETE FROM items WHERE id = 2;
//! BEGIN;
//! INSERT INTO docs VALUES (2, 'happy', 'short');
//! UPDATE docs SET mood = 'sad' WHERE id = 1;
//! DELETE FROM docs WHERE id = 2;
//! COMMIT;
//! SELECT pg_logical_emit_message(true, 'stalewatch', 'in a transaction');
//! SELECT pg_logical_emit_message(false, 'stalewatch', E'\\x00ff'::bytea);
//! ALTER TABLE items ADD COLUMN tag text;
//! INSERT INTO items (id, name, tag) VALUES (4, 'tagged', 'blue');
//! SELECT pg_replication_origin_session_setup('upstream');
//! BEGIN;
//! SELECT pg_replication_origin_xact_setup('0/ABCDEF', '2024-01-02 03:04:05+00');
//! INSERT INTO items (id, name) VALUES (5, 'replicated');
//! COMMIT;
//! SELECT pg_replication_origin_session_reset();
//! TRUNCATE docs;
//! TRUNCATE items, docs RESTART IDENTITY CASCADE;
//! ```
//!
//! then dump the slot (peek: nothing is consumed), the `text` lines in full and the
//! `binary` lines for the first transaction only:
//!
//! ```sql
//! SELECT 'text', lsn, encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes('slot',
//!     NULL, NULL, 'proto_version', '1', 'publication_names', 'pub', 'messages', 'true');
//! SELECT 'binary', lsn, encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes('slot',
//!     NULL, NULL, 'proto_version', '1', 'publication_names', 'pub', 'binary', 'true') LIMIT 4;
//! ```
//!
//! (`psql -At` prints them `|`-separated.) Relation and type oids, LSNs, xids and
//! timestamps differ from one capture to the next; the tests pin those of this capture.

use std::collections::HashMap;

/// The PostgreSQL epoch (2000-01-01 00:00:00 UTC) in microseconds since the Unix epoch:
/// add it to a `commit_time_us` to get Unix microseconds.
pub const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Start of a transaction. `final_lsn` is the LSN of its commit record (the
    /// `commit_lsn` of the matching [`Message::Commit`]).
    Begin {
        final_lsn: u64,
        commit_time_us: i64,
        xid: u32,
    },
    /// End of a transaction. `end_lsn` is the LSN just past the commit record: the position
    /// to confirm as flushed once the transaction is applied. (The message's flags byte is
    /// unused, always 0, and not kept.)
    Commit {
        commit_lsn: u64,
        end_lsn: u64,
        commit_time_us: i64,
    },
    /// The transaction was replayed from replication origin `name`; `commit_lsn` is the
    /// commit's LSN on the origin server.
    Origin {
        commit_lsn: u64,
        name: String,
    },
    /// A relation's description, sent before its first change (and again after changes).
    Relation(Relation),
    /// A user-defined data type used by a relation about to be sent. `namespace` is empty
    /// for `pg_catalog`.
    Type {
        id: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Tuple,
    },
    /// `old` is the old row's replica identity (`key_only`, a `'K'` tuple: key columns
    /// only, the others `Null`) or the whole old row (`'O'`, REPLICA IDENTITY FULL); `None`
    /// when the replica identity did not change. `key_only` is false when `old` is `None`.
    Update {
        relation: u32,
        old: Option<Tuple>,
        key_only: bool,
        new: Tuple,
    },
    /// `old` is as in [`Message::Update`]: `key_only` for a `'K'` tuple, false for `'O'`.
    Delete {
        relation: u32,
        old: Tuple,
        key_only: bool,
    },
    Truncate {
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// A logical decoding message (`pg_logical_emit_message`; only sent when the slot is
    /// read with `messages 'true'`). A non-transactional one comes outside `Begin`/`Commit`.
    Logical {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Vec<u8>,
    },
}

/// A relation as described by a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The relation's oid.
    pub id: u32,
    /// Schema name; empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    /// `relreplident`: `b'd'` default (primary key), `b'n'` nothing, `b'f'` full,
    /// `b'i'` index.
    pub replica_identity: u8,
    pub columns: Vec<RelColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelColumn {
    /// Part of the replica identity (with REPLICA IDENTITY FULL: every column).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod`: -1 when the type has none (e.g. `varchar(20)` is 24, `numeric(10,2)`
    /// is `(10 << 16 | 2) + 4`).
    pub type_modifier: i32,
}

/// One column's value in a [`Tuple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL, or (in a `'K'` old tuple) a column that is not part of the key.
    Null,
    /// A TOASTed value the change left alone: not sent, the previous value still holds.
    Unchanged,
    /// The value in PostgreSQL's text output format.
    Text(String),
    /// The value in its type's binary send format (slot read with `binary 'true'`).
    Binary(Vec<u8>),
}

impl Value {
    /// The text, for a [`Value::Text`].
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// A row: one value per column of the relation, in the relation's column order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple(pub Vec<Value>);

impl Tuple {
    /// Each value with its column of `rel`. Stops at the shorter of the two, should the
    /// tuple and the relation disagree (a relation cache out of date).
    pub fn columns<'a>(
        &'a self,
        rel: &'a Relation,
    ) -> impl Iterator<Item = (&'a RelColumn, &'a Value)> + 'a {
        rel.columns.iter().zip(self.0.iter())
    }

    /// Each value with its column's name; as [`Tuple::columns`].
    pub fn named<'a>(&'a self, rel: &'a Relation) -> impl Iterator<Item = (&'a str, &'a Value)> {
        self.columns(rel).map(|(c, v)| (c.name.as_str(), v))
    }

    /// The value of column `name` of `rel`.
    pub fn get<'a>(&'a self, rel: &'a Relation, name: &str) -> Option<&'a Value> {
        self.named(rel).find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// Relation cache: maps a relation id to its latest [`Relation`], so tuples can be read as
/// column -> value.
#[derive(Debug, Clone, Default)]
pub struct Relations {
    by_id: HashMap<u32, Relation>,
}

impl Relations {
    pub fn new() -> Relations {
        Relations::default()
    }

    /// Records `r`, replacing any earlier description of the same id.
    pub fn apply(&mut self, r: Relation) {
        self.by_id.insert(r.id, r);
    }

    pub fn get(&self, id: u32) -> Option<&Relation> {
        self.by_id.get(&id)
    }
}

/// What was malformed, and where: offsets are byte offsets into the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error("unknown pgoutput message type 0x{tag:02x}")]
    UnknownTag { tag: u8 },
    #[error(
        "pgoutput {name} message (0x{tag:02x}) needs protocol version 2 or later: not decoded"
    )]
    Unsupported { tag: u8, name: &'static str },
    #[error("{message} message truncated at offset {offset}: {what} needs {needed} bytes, {available} left")]
    Truncated {
        message: &'static str,
        what: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("{message} message: {what} at offset {offset} has no terminating NUL")]
    Unterminated {
        message: &'static str,
        what: &'static str,
        offset: usize,
    },
    #[error("{message} message: {what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        message: &'static str,
        what: &'static str,
        offset: usize,
    },
    #[error("{message} message: byte 0x{byte:02x} at offset {offset}, expected {expected}")]
    Unexpected {
        message: &'static str,
        offset: usize,
        byte: u8,
        expected: &'static str,
    },
    #[error("{message} message: negative {what} {value} at offset {offset}")]
    Negative {
        message: &'static str,
        what: &'static str,
        offset: usize,
        value: i32,
    },
    #[error("{message} message: {count} unexpected trailing bytes at offset {offset}")]
    Trailing {
        message: &'static str,
        offset: usize,
        count: usize,
    },
}

/// Decodes one pgoutput message (protocol version 1). Never panics.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let (&tag, _) = bytes.split_first().ok_or(DecodeError::Empty)?;
    let message = match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        _ => {
            return Err(match unsupported_name(tag) {
                Some(name) => DecodeError::Unsupported { tag, name },
                None => DecodeError::UnknownTag { tag },
            })
        }
    };
    let mut r = Reader {
        buf: bytes,
        pos: 1,
        message,
    };
    let decoded = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64("final LSN")?,
            commit_time_us: r.i64("commit timestamp")?,
            xid: r.u32("xid")?,
        },
        b'C' => {
            let _flags = r.u8("flags")?;
            Message::Commit {
                commit_lsn: r.u64("commit LSN")?,
                end_lsn: r.u64("end LSN")?,
                commit_time_us: r.i64("commit timestamp")?,
            }
        }
        b'O' => Message::Origin {
            commit_lsn: r.u64("origin commit LSN")?,
            name: r.string("origin name")?,
        },
        b'R' => Message::Relation(relation(&mut r)?),
        b'Y' => Message::Type {
            id: r.u32("type oid")?,
            namespace: r.string("type namespace")?,
            name: r.string("type name")?,
        },
        b'I' => {
            let relation = r.u32("relation id")?;
            r.expect(b'N', "'N' (new tuple)")?;
            Message::Insert {
                relation,
                new: tuple(&mut r)?,
            }
        }
        b'U' => {
            let relation = r.u32("relation id")?;
            let (old, key_only) = match r.peek_u8("tuple kind")? {
                b'N' => (None, false),
                b'K' | b'O' => {
                    let kind = r.u8("tuple kind")?;
                    (Some(tuple(&mut r)?), kind == b'K')
                }
                byte => return Err(r.unexpected(byte, "'K', 'O' or 'N'")),
            };
            r.expect(b'N', "'N' (new tuple)")?;
            Message::Update {
                relation,
                old,
                key_only,
                new: tuple(&mut r)?,
            }
        }
        b'D' => {
            let relation = r.u32("relation id")?;
            let key_only = match r.peek_u8("tuple kind")? {
                b'K' => true,
                b'O' => false,
                byte => return Err(r.unexpected(byte, "'K' or 'O'")),
            };
            r.pos += 1;
            Message::Delete {
                relation,
                old: tuple(&mut r)?,
                key_only,
            }
        }
        b'T' => {
            let count = r.count32("relation count")?;
            let options = r.u8("options")?;
            // Bounded by what is left, not by an untrusted count.
            let mut relations = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                relations.push(r.u32("relation id")?);
            }
            Message::Truncate {
                relations,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
            }
        }
        b'M' => {
            let flags = r.u8("flags")?;
            let lsn = r.u64("LSN")?;
            let prefix = r.string("prefix")?;
            let len = r.count32("content length")?;
            Message::Logical {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.take(len, "content")?.to_vec(),
            }
        }
        // Every other tag was turned away above.
        _ => return Err(DecodeError::UnknownTag { tag }),
    };
    if r.remaining() > 0 {
        return Err(DecodeError::Trailing {
            message,
            offset: r.pos,
            count: r.remaining(),
        });
    }
    Ok(decoded)
}

/// Names of the messages of protocol versions 2 (streaming) and 3 (two-phase commit).
fn unsupported_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        b'b' => "Begin Prepare",
        b'P' => "Prepare",
        b'K' => "Commit Prepared",
        b'r' => "Rollback Prepared",
        b'p' => "Stream Prepare",
        _ => return None,
    })
}

fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = r.u32("relation id")?;
    let namespace = r.string("namespace")?;
    let name = r.string("relation name")?;
    let replica_identity = r.u8("replica identity")?;
    let count = r.count16("column count")?;
    // Each column takes at least 10 bytes.
    let mut columns = Vec::with_capacity(count.min(r.remaining() / 10));
    for _ in 0..count {
        columns.push(RelColumn {
            key: r.u8("column flags")? & 1 != 0,
            name: r.string("column name")?,
            type_oid: r.u32("column type oid")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

/// TupleData: Int16 column count, then per column a kind byte and, for 't' and 'b', an
/// Int32 length and that many bytes.
fn tuple(r: &mut Reader<'_>) -> Result<Tuple, DecodeError> {
    let count = r.count16("tuple column count")?;
    let mut values = Vec::with_capacity(count.min(r.remaining()));
    for _ in 0..count {
        let value = match r.peek_u8("column kind")? {
            b'n' => Value::Null,
            b'u' => Value::Unchanged,
            b't' => {
                r.pos += 1;
                let len = r.count32("text value length")?;
                let at = r.pos;
                let raw = r.take(len, "text value")?;
                let text = std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8 {
                    message: r.message,
                    what: "text value",
                    offset: at,
                })?;
                values.push(Value::Text(text.to_owned()));
                continue;
            }
            b'b' => {
                r.pos += 1;
                let len = r.count32("binary value length")?;
                values.push(Value::Binary(r.take(len, "binary value")?.to_vec()));
                continue;
            }
            byte => return Err(r.unexpected(byte, "column kind 'n', 'u', 't' or 'b'")),
        };
        r.pos += 1;
        values.push(value);
    }
    Ok(Tuple(values))
}

/// Big-endian reads with bounds checks; every error names the message and the offset.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self, what: &'static str, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
            what,
            offset: self.pos,
            needed,
            available: self.remaining(),
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(self.truncated(what, n));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn peek_u8(&self, what: &'static str) -> Result<u8, DecodeError> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or_else(|| self.truncated(what, 1))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        self.array(what).map(i16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_be_bytes)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    /// An Int16 count, which must not be negative.
    fn count16(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.i16(what)?;
        usize::try_from(n).map_err(|_| self.negative(what, at, n.into()))
    }

    /// An Int32 count or length, which must not be negative.
    fn count32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.i32(what)?;
        usize::try_from(n).map_err(|_| self.negative(what, at, n))
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let at = self.pos;
        let rest = &self.buf[self.pos..];
        let Some(len) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::Unterminated {
                message: self.message,
                what,
                offset: at,
            });
        };
        let s = std::str::from_utf8(&rest[..len]).map_err(|_| DecodeError::InvalidUtf8 {
            message: self.message,
            what,
            offset: at,
        })?;
        self.pos += len + 1;
        Ok(s.to_owned())
    }

    /// Consumes one byte, which must be `want`.
    fn expect(&mut self, want: u8, expected: &'static str) -> Result<(), DecodeError> {
        match self.peek_u8(expected)? {
            byte if byte == want => {
                self.pos += 1;
                Ok(())
            }
            byte => Err(self.unexpected(byte, expected)),
        }
    }

    /// The error for `byte`, found at the current offset.
    fn unexpected(&self, byte: u8, expected: &'static str) -> DecodeError {
        DecodeError::Unexpected {
            message: self.message,
            offset: self.pos,
            byte,
            expected,
        }
    }

    fn negative(&self, what: &'static str, offset: usize, value: i32) -> DecodeError {
        DecodeError::Negative {
            message: self.message,
            what,
            offset,
            value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FIXTURES: &str = include_str!("fixtures.txt");

    // Oids of this capture.
    const ITEMS: u32 = 16389;
    const DOCS: u32 = 16396;
    const MOOD: u32 = 16385;
    const INT4: u32 = 23;
    const VARCHAR: u32 = 1043;
    const NUMERIC: u32 = 1700;
    const TEXT: u32 = 25;

    /// One captured message: which stream (`text` or `binary`), the slot's lsn column, the
    /// bytes.
    struct Captured {
        stream: &'static str,
        lsn: u64,
        bytes: Vec<u8>,
    }

    fn captured(stream: &str) -> Vec<Captured> {
        FIXTURES
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let mut parts = l.split('|');
                let (s, lsn, hex) = (
                    parts.next().unwrap(),
                    parts.next().unwrap(),
                    parts.next().unwrap(),
                );
                Captured {
                    stream: s,
                    lsn: parse_lsn(lsn),
                    bytes: unhex(hex),
                }
            })
            .filter(|c| c.stream == stream)
            .collect()
    }

    fn parse_lsn(s: &str) -> u64 {
        let (hi, lo) = s.split_once('/').unwrap();
        (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn all_bytes() -> Vec<Vec<u8>> {
        let mut all: Vec<Vec<u8>> = captured("text").into_iter().map(|c| c.bytes).collect();
        all.extend(captured("binary").into_iter().map(|c| c.bytes));
        all
    }

    fn t(s: &str) -> Value {
        Value::Text(s.to_owned())
    }

    fn tuple(values: &[Value]) -> Tuple {
        Tuple(values.to_vec())
    }

    fn col(key: bool, name: &str, type_oid: u32, type_modifier: i32) -> RelColumn {
        RelColumn {
            key,
            name: name.to_owned(),
            type_oid,
            type_modifier,
        }
    }

    fn items_relation(with_tag: bool) -> Message {
        let mut columns = vec![
            col(true, "id", INT4, -1),
            col(false, "name", VARCHAR, 24),
            col(false, "price", NUMERIC, (10 << 16 | 2) + 4),
            col(false, "note", TEXT, -1),
        ];
        if with_tag {
            columns.push(col(false, "tag", TEXT, -1));
        }
        Message::Relation(Relation {
            id: ITEMS,
            namespace: "public".into(),
            name: "items".into(),
            replica_identity: b'd',
            columns,
        })
    }

    fn docs_relation() -> Message {
        Message::Relation(Relation {
            id: DOCS,
            namespace: "public".into(),
            name: "docs".into(),
            replica_identity: b'f',
            // REPLICA IDENTITY FULL: every column is flagged part of the key.
            columns: vec![
                col(true, "id", INT4, -1),
                col(true, "mood", MOOD, -1),
                col(true, "body", TEXT, -1),
            ],
        })
    }

    fn mood_type() -> Message {
        Message::Type {
            id: MOOD,
            namespace: "public".into(),
            name: "mood".into(),
        }
    }

    /// What each captured text message must decode to; `Begin` and `Commit` are checked
    /// apart (their LSNs, times and xids are pinned for two transactions, and checked for
    /// consistency for all).
    enum Expect {
        Begin,
        Commit,
        Is(Message),
    }
    use Expect::{Begin, Commit, Is};

    fn expected_text_stream() -> Vec<Expect> {
        let (n, u) = (Value::Null, Value::Unchanged);
        vec![
            // INSERT INTO items VALUES (1, 'widget', 9.99, NULL)
            Begin,
            Is(items_relation(false)),
            Is(Message::Insert {
                relation: ITEMS,
                new: tuple(&[t("1"), t("widget"), t("9.99"), n.clone()]),
            }),
            Commit,
            // UPDATE items SET price = 10.50 WHERE id = 1: the key is unchanged, no old tuple
            Begin,
            Is(Message::Update {
                relation: ITEMS,
                old: None,
                key_only: false,
                new: tuple(&[t("1"), t("widget"), t("10.50"), n.clone()]),
            }),
            Commit,
            // UPDATE items SET id = 2 WHERE id = 1: the old key, the other columns null
            Begin,
            Is(Message::Update {
                relation: ITEMS,
                old: Some(tuple(&[t("1"), n.clone(), n.clone(), n.clone()])),
                key_only: true,
                new: tuple(&[t("2"), t("widget"), t("10.50"), n.clone()]),
            }),
            Commit,
            // UPDATE items SET name = 'big2' WHERE id = 3: the TOASTed note is not sent
            Begin,
            Is(Message::Update {
                relation: ITEMS,
                old: None,
                key_only: false,
                new: tuple(&[t("3"), t("big2"), t("1.00"), u.clone()]),
            }),
            Commit,
            // DELETE FROM items WHERE id = 2
            Begin,
            Is(Message::Delete {
                relation: ITEMS,
                old: tuple(&[t("2"), n.clone(), n.clone(), n.clone()]),
                key_only: true,
            }),
            Commit,
            // BEGIN; INSERT, UPDATE, DELETE on docs (REPLICA IDENTITY FULL); COMMIT
            Begin,
            Is(mood_type()),
            Is(docs_relation()),
            Is(Message::Insert {
                relation: DOCS,
                new: tuple(&[t("2"), t("happy"), t("short")]),
            }),
            Is(Message::Update {
                relation: DOCS,
                // The whole old row, the TOASTed body in full...
                old: Some(tuple(&[t("1"), t("happy"), t(&"y".repeat(2100))])),
                key_only: false,
                // ...but not in the new one.
                new: tuple(&[t("1"), t("sad"), u.clone()]),
            }),
            Is(Message::Delete {
                relation: DOCS,
                old: tuple(&[t("2"), t("happy"), t("short")]),
                key_only: false,
            }),
            Commit,
            // pg_logical_emit_message(true, ...)
            Begin,
            Is(Message::Logical {
                transactional: true,
                lsn: 0x0154_3208,
                prefix: "stalewatch".into(),
                content: b"in a transaction".to_vec(),
            }),
            Commit,
            // pg_logical_emit_message(false, ...): no Begin/Commit around it
            Is(Message::Logical {
                transactional: false,
                lsn: 0x0154_3278,
                prefix: "stalewatch".into(),
                content: vec![0x00, 0xff],
            }),
            // ALTER TABLE items ADD COLUMN tag text (no message); INSERT with the new column
            Begin,
            Is(items_relation(true)),
            Is(Message::Insert {
                relation: ITEMS,
                new: tuple(&[t("4"), t("tagged"), n.clone(), n.clone(), t("blue")]),
            }),
            Commit,
            // An INSERT replayed from origin 'upstream'
            Begin,
            Is(Message::Origin {
                commit_lsn: 0xAB_CDEF,
                name: "upstream".into(),
            }),
            Is(Message::Insert {
                relation: ITEMS,
                new: tuple(&[t("5"), t("replicated"), n.clone(), n.clone(), n.clone()]),
            }),
            Commit,
            // TRUNCATE docs: docs is described again first
            Begin,
            Is(mood_type()),
            Is(docs_relation()),
            Is(Message::Truncate {
                relations: vec![DOCS],
                cascade: false,
                restart_identity: false,
            }),
            Commit,
            // TRUNCATE items, docs RESTART IDENTITY CASCADE
            Begin,
            Is(items_relation(true)),
            Is(mood_type()),
            Is(docs_relation()),
            Is(Message::Truncate {
                relations: vec![ITEMS, DOCS],
                cascade: true,
                restart_identity: true,
            }),
            Commit,
        ]
    }

    #[test]
    fn decodes_the_captured_text_stream_exactly() {
        let stream = captured("text");
        let expected = expected_text_stream();
        assert_eq!(stream.len(), expected.len(), "messages in the fixture");

        // (final LSN, commit time, xid) of the open transaction's Begin; the last xid seen.
        let mut open: Option<(u64, i64, u32)> = None;
        let mut last_xid = 0;
        let mut transactions = Vec::new();
        for (i, (c, want)) in stream.iter().zip(expected).enumerate() {
            let got = decode(&c.bytes).unwrap_or_else(|e| panic!("message {i}: {e}"));
            match (want, got) {
                (
                    Begin,
                    Message::Begin {
                        final_lsn,
                        commit_time_us,
                        xid,
                    },
                ) => {
                    assert!(open.is_none(), "message {i}: Begin inside a transaction");
                    assert!(xid > last_xid, "message {i}: xids increase");
                    last_xid = xid;
                    open = Some((final_lsn, commit_time_us, xid));
                }
                (
                    Commit,
                    Message::Commit {
                        commit_lsn,
                        end_lsn,
                        commit_time_us,
                    },
                ) => {
                    let (final_lsn, begin_time, xid) =
                        open.take().expect("a Commit without a Begin");
                    assert_eq!(commit_lsn, final_lsn, "message {i}: Begin.final_lsn");
                    assert_eq!(commit_time_us, begin_time, "message {i}: commit time");
                    assert!(end_lsn > commit_lsn, "message {i}");
                    // The slot reports a commit at the end of its record.
                    assert_eq!(end_lsn, c.lsn, "message {i}: the slot's lsn");
                    transactions.push((xid, final_lsn, end_lsn, commit_time_us));
                }
                (Is(want), got) => assert_eq!(got, want, "message {i}"),
                (_, got) => panic!("message {i}: got {got:?}"),
            }
        }
        assert!(open.is_none(), "the last transaction is committed");
        assert_eq!(transactions.len(), 11);

        // Pinned from the bytes: the first transaction...
        assert_eq!(
            transactions[0],
            (0x2de, 0x0154_2548, 0x0154_2578, 0x0003_03f7_5980_6ddd)
        );
        let local_time = transactions[0].3;
        assert_eq!(
            (local_time + PG_EPOCH_UNIX_US) / 1_000_000,
            1_795_470_623, // 2026-11-23 21:50:23 UTC, when the fixtures were captured
        );
        // ...and the replicated one, which carries the origin's commit time (the one given
        // to pg_replication_origin_xact_setup), not the local one.
        let (_, _, _, origin_time) = transactions[8];
        assert_eq!(
            (origin_time + PG_EPOCH_UNIX_US) / 1_000_000,
            1_704_164_645, // 2024-01-02 03:04:05 UTC
        );
        assert!(transactions
            .iter()
            .enumerate()
            .all(|(i, tx)| i == 8 || tx.3 >= local_time));
    }

    #[test]
    fn decodes_binary_values() {
        let got: Vec<Message> = captured("binary")
            .iter()
            .map(|c| decode(&c.bytes).unwrap())
            .collect();
        assert_eq!(got.len(), 4);
        assert!(matches!(got[0], Message::Begin { xid: 0x2de, .. }));
        assert_eq!(got[1], items_relation(false));
        assert_eq!(
            got[2],
            Message::Insert {
                relation: ITEMS,
                new: Tuple(vec![
                    Value::Binary(1_i32.to_be_bytes().to_vec()),
                    Value::Binary(b"widget".to_vec()),
                    // numeric 9.99: 2 base-10000 digits, weight 0, sign +, dscale 2: 9 9900
                    Value::Binary(vec![0, 2, 0, 0, 0, 0, 0, 2, 0, 9, 0x26, 0xac]),
                    Value::Null,
                ]),
            }
        );
        assert!(matches!(got[3], Message::Commit { .. }));
    }

    #[test]
    fn relations_name_the_values_and_follow_added_columns() {
        let mut relations = Relations::new();
        let mut rows = Vec::new();
        for c in captured("text") {
            match decode(&c.bytes).unwrap() {
                Message::Relation(r) => relations.apply(r),
                Message::Insert { relation, new } => {
                    let rel = relations.get(relation).expect("described before use");
                    rows.push(
                        new.named(rel)
                            .map(|(k, v)| format!("{k}={v:?}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                    );
                }
                Message::Delete { relation, old, .. } => {
                    let rel = relations.get(relation).unwrap();
                    let key: Vec<_> = old
                        .columns(rel)
                        .filter(|(c, _)| c.key)
                        .map(|(c, v)| (c.name.as_str(), v.as_text()))
                        .collect();
                    if relation == ITEMS {
                        assert_eq!(key, [("id", Some("2"))]);
                        assert_eq!(old.get(rel, "name"), Some(&Value::Null));
                    } else {
                        assert_eq!(
                            key,
                            [
                                ("id", Some("2")),
                                ("mood", Some("happy")),
                                ("body", Some("short"))
                            ]
                        );
                    }
                }
                _ => {}
            }
        }
        assert_eq!(
            rows,
            [
                r#"id=Text("1") name=Text("widget") price=Text("9.99") note=Null"#,
                r#"id=Text("2") mood=Text("happy") body=Text("short")"#,
                r#"id=Text("4") name=Text("tagged") price=Null note=Null tag=Text("blue")"#,
                r#"id=Text("5") name=Text("replicated") price=Null note=Null tag=Null"#,
            ]
        );
        let items = relations.get(ITEMS).unwrap();
        assert_eq!(items.columns.len(), 5, "the latest description wins");
        assert!(relations.get(1).is_none());
    }

    #[test]
    fn names_what_is_malformed_and_where() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(b"Z"), Err(DecodeError::UnknownTag { tag: b'Z' }));
        assert_eq!(
            decode(b"S\0\0\0\x01\x01"),
            Err(DecodeError::Unsupported {
                tag: b'S',
                name: "Stream Start"
            })
        );
        // A Begin cut inside its xid.
        let begin = &captured("text")[0].bytes;
        assert_eq!(
            decode(&begin[..19]),
            Err(DecodeError::Truncated {
                message: "Begin",
                what: "xid",
                offset: 17,
                needed: 4,
                available: 2
            })
        );
        let mut longer = begin.clone();
        longer.push(0);
        assert_eq!(
            decode(&longer),
            Err(DecodeError::Trailing {
                message: "Begin",
                offset: 21,
                count: 1
            })
        );
        // Insert of (1, 'widget', 9.99, NULL) with its first column kind 't' made 'x'.
        let mut insert = captured("text")[2].bytes.clone();
        assert_eq!(insert[8], b't');
        insert[8] = b'x';
        let err = decode(&insert).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Unexpected {
                message: "Insert",
                offset: 8,
                byte: b'x',
                expected: "column kind 'n', 'u', 't' or 'b'"
            }
        );
        assert_eq!(
            err.to_string(),
            "Insert message: byte 0x78 at offset 8, expected column kind 'n', 'u', 't' or 'b'"
        );
        // ... and with a negative length for it.
        let mut insert = captured("text")[2].bytes.clone();
        insert[9] = 0xff;
        assert!(matches!(
            decode(&insert),
            Err(DecodeError::Negative {
                offset: 9,
                what: "text value length",
                ..
            })
        ));
        // A Relation whose namespace has no NUL: the rest of the message is one string.
        let relation = &captured("text")[1].bytes;
        assert_eq!(&relation[5..12], b"public\0");
        assert!(matches!(
            decode(&relation[..11]),
            Err(DecodeError::Unterminated {
                message: "Relation",
                what: "namespace",
                offset: 5
            })
        ));
        // Invalid UTF-8 in a text value.
        let mut insert = captured("text")[2].bytes.clone();
        assert_eq!(&insert[19..25], b"widget");
        insert[19] = 0xff;
        assert!(matches!(
            decode(&insert),
            Err(DecodeError::InvalidUtf8 {
                what: "text value",
                offset: 19,
                ..
            })
        ));
    }

    #[test]
    fn every_cut_of_a_captured_message_is_an_error() {
        for bytes in all_bytes() {
            assert!(decode(&bytes).is_ok());
            for len in 0..bytes.len() {
                assert!(decode(&bytes[..len]).is_err(), "{bytes:02x?} cut at {len}");
            }
            let mut longer = bytes.clone();
            longer.push(b'n');
            assert!(matches!(
                decode(&longer),
                Err(DecodeError::Trailing { count: 1, .. })
            ));
        }
    }

    #[test]
    fn corrupting_any_byte_of_a_captured_message_does_not_panic() {
        for bytes in all_bytes() {
            for i in 0..bytes.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut bad = bytes.clone();
                    bad[i] ^= flip;
                    let _ = decode(&bad);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn never_panics_on_random_input(
            tag in prop::sample::select(b"BCORYIUDTMSxn".to_vec()),
            body in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut bytes = vec![tag];
            bytes.extend(body);
            let _ = decode(&bytes);
        }

        #[test]
        fn never_panics_on_spliced_captures(
            (a, b) in (0..46usize, 0..46usize),
            (cut_a, cut_b) in (any::<prop::sample::Index>(), any::<prop::sample::Index>()),
        ) {
            let text = captured("text");
            let (a, b) = (&text[a].bytes, &text[b].bytes);
            let mut bytes = a[..cut_a.index(a.len() + 1)].to_vec();
            bytes.extend_from_slice(&b[cut_b.index(b.len() + 1)..]);
            let _ = decode(&bytes);
        }
    }
}
