//! The application's tables, the source of truth: which columns they have, and the rows
//! behind cache keys, read in batches.
//!
//! stalewatch only reads these tables. A row arrives as one array of text, a cell per column
//! ([`Spelling`]): a column whose text is its JSON value as it is (integers, booleans, text,
//! uuids) sends that text, any other sends `to_json(column)` (timestamps in RFC 3339, nested
//! json, floats as PostgreSQL prints them). The document built from the cells is the one
//! PostgreSQL's `json_build_object` renders, which the comparator reads by the columns' types;
//! PostgreSQL does not build the JSON text itself, which cost it twice the CPU of the row's
//! cells. The cells are decoded row by row, so one value the parser refuses is that key's
//! verdict, not the batch's failure.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use diesel::deserialize::{self, FromSql};
use diesel::pg::{Pg, PgValue};
use diesel::sql_types::{Array, BigInt, Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde_json::{Map, Value};

use crate::column::ColumnType;
use crate::db::{self, DbError};
use crate::entity::{
    quote_ident as ident, Catalog, Column, Entity, Representation, Table, Template,
};

/// `json_build_object` takes at most 100 arguments: 50 columns per call.
const COLUMNS_PER_OBJECT: usize = 50;

/// Reads the columns of `tables` from the catalog, and whether this role may read them.
/// A table that does not exist is absent from the result; one that exists but may not be
/// read is an error naming the GRANT to give.
pub async fn catalog(conn: &mut AsyncPgConnection, tables: &[Table]) -> Result<Catalog, DbError> {
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        name: String,
        #[diesel(sql_type = Text)]
        type_name: String,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        readable: bool,
    }
    let mut catalog = Catalog {
        tables: HashMap::new(),
    };
    for table in tables {
        let rows: Vec<Row> = diesel::sql_query(
            "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS type_name, \
             has_table_privilege(a.attrelid, 'SELECT') AS readable \
             FROM pg_attribute a WHERE a.attrelid = to_regclass($1) \
             AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        )
        .bind::<Text, _>(table.sql())
        .load(conn)
        .await?;
        // (`<[_]>::first`: diesel's query DSL also has a `first`.)
        if <[Row]>::first(&rows).is_some_and(|r| !r.readable) {
            return Err(DbError::Rejected(format!(
                "this role may not read {table}: GRANT SELECT ON {} TO <stalewatch's role>",
                table.sql()
            )));
        }
        if !rows.is_empty() {
            let columns = rows
                .into_iter()
                .map(|r| Column {
                    name: r.name,
                    type_name: r.type_name,
                })
                .collect();
            catalog.tables.insert(table.clone(), columns);
        }
    }
    Ok(catalog)
}

/// What the database holds behind one cache key.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// A JSON object of the row's columns (json, hash and string representations).
    Doc(Map<String, Value>),
    /// The rendered members of a set key (every row behind it).
    Members(BTreeSet<String>),
}

/// A key's row: absent, present, or present but unreadable (why).
pub type Found = Result<Option<Row>, String>;

/// One row of a sweep page: the key it renders to, and what is behind it.
#[derive(Debug)]
pub struct PageRow {
    pub key: Option<String>,
    pub row: Found,
}

/// One row of a sweep page as PostgreSQL sent it: its key, and its document's cells.
#[derive(Debug)]
pub struct PageRaw {
    pub key: Option<String>,
    pub doc: RawRow,
}

/// A document's cells as PostgreSQL sent them, not yet decoded ([`Rows::decode`]): one text
/// per column ([`Rows::cells`]), or a set's one `json_agg` text. The row's cells from `from`
/// on (a sweep page's start with its key columns').
#[derive(Debug, Clone, PartialEq)]
pub struct RawRow {
    cells: Cells,
    from: usize,
}

impl RawRow {
    fn get(&self, i: usize) -> Option<&str> {
        self.cells.get(self.from + i)
    }

    fn len(&self) -> usize {
        self.cells.len().saturating_sub(self.from)
    }
}

/// A row's cells, read from PostgreSQL's binary form of a one-dimensional `text[]` into one
/// string. Reading the array as `Vec<Option<String>>` allocates a string per cell: these are
/// the rows of every check and sweep page, and allocation was the largest cost left in the
/// check path's profile.
#[derive(Debug, Clone, Default, PartialEq)]
struct Cells {
    text: String,
    /// Each cell's bytes in `text`; `None`: NULL.
    spans: Vec<Option<std::ops::Range<usize>>>,
}

impl Cells {
    fn get(&self, i: usize) -> Option<&str> {
        Some(&self.text[self.spans.get(i)?.clone()?])
    }

    fn len(&self) -> usize {
        self.spans.len()
    }
}

impl FromSql<Array<Nullable<Text>>, Pg> for Cells {
    /// `array_send`'s layout: the number of dimensions, a has-nulls flag and the element type,
    /// then each dimension's length and lower bound, then each element as its length (-1:
    /// NULL) and its bytes.
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        fn int(bytes: &mut &[u8]) -> deserialize::Result<i32> {
            let (head, rest) = bytes
                .split_first_chunk::<4>()
                .ok_or("a text array ends early")?;
            *bytes = rest;
            Ok(i32::from_be_bytes(*head))
        }
        let mut bytes = value.as_bytes();
        let dimensions = int(&mut bytes)?;
        let _has_nulls = int(&mut bytes)?;
        let _element_type = int(&mut bytes)?;
        match dimensions {
            0 => return Ok(Cells::default()),
            1 => {}
            n => return Err(format!("a row's cells come in one dimension, not {n}").into()),
        }
        let count = usize::try_from(int(&mut bytes)?)?;
        let _lower_bound = int(&mut bytes)?;
        let mut cells = Cells {
            text: String::with_capacity(bytes.len()),
            spans: Vec::with_capacity(count),
        };
        for _ in 0..count {
            let Ok(len) = usize::try_from(int(&mut bytes)?) else {
                cells.spans.push(None);
                continue;
            };
            let (cell, rest) = bytes
                .split_at_checked(len)
                .ok_or("a text array's element runs past its end")?;
            bytes = rest;
            let start = cells.text.len();
            cells.text.push_str(std::str::from_utf8(cell)?);
            cells.spans.push(Some(start..cells.text.len()));
        }
        Ok(cells)
    }
}

/// How one column's value travels from PostgreSQL, by its SQL type: as its own text where
/// that text is exactly the value `json_build_object` renders (the digits of an integer, the
/// characters of a string), else as `to_json(column)`, parsed by the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spelling {
    /// `bigint`, `integer`, `smallint`: the digits are the JSON number.
    Integer,
    /// `boolean`: `true` or `false`, as its text cast prints it.
    Boolean,
    /// `text`, `character varying`, `name`, `uuid`: the text is the JSON string's value.
    Text,
    /// Any other type, arrays included: the JSON text PostgreSQL renders for the value.
    Json,
}

impl Spelling {
    /// By the column's type, as `format_type()` names it ([`ColumnType::from_pg`]).
    fn of(type_name: &str) -> Spelling {
        // `character(n)`'s cast to text drops the padding `json_build_object` keeps.
        let padded = || {
            let bare = type_name.split('(').next().unwrap_or_default().trim();
            matches!(bare, "character" | "char" | "bpchar")
        };
        match ColumnType::from_pg(type_name) {
            ColumnType::Integer => Spelling::Integer,
            ColumnType::Boolean => Spelling::Boolean,
            ColumnType::Uuid => Spelling::Text,
            ColumnType::Text if !padded() => Spelling::Text,
            _ => Spelling::Json,
        }
    }

    /// The array element PostgreSQL sends for column `name` (of table alias `t`).
    fn cell(self, name: &str) -> String {
        match self {
            Spelling::Json => format!("to_json(t.{})::text", ident(name)),
            _ => format!("t.{}::text", ident(name)),
        }
    }

    /// The JSON value of a cell: what `json_build_object` would have rendered for it.
    fn value(self, text: Option<&str>) -> Result<Value, String> {
        let Some(text) = text else {
            return Ok(Value::Null);
        };
        match self {
            Spelling::Integer => text
                .parse::<i64>()
                .map(Value::from)
                .map_err(|e| format!("an integer column holds {text:?} ({e})")),
            Spelling::Boolean => Ok(Value::Bool(text == "true")),
            Spelling::Text => Ok(Value::String(text.to_string())),
            Spelling::Json => serde_json::from_str(text)
                .map_err(|e| format!("the row is not JSON this service can read ({e})")),
        }
    }
}

/// What a row's cells hold, past the key columns a sweep page starts with.
#[derive(Debug, Clone)]
enum Document {
    /// One cell per column, in this order (json, hash and string representations), and the
    /// cells' positions in the order of the columns' names (a JSON map's order).
    Columns {
        columns: Vec<(String, Spelling)>,
        by_name: Vec<usize>,
    },
    /// One cell: the set's rows, as `json_agg` text, each rendered to a member by `.0`.
    Members(Template),
}

/// One entity's way to its rows: the statements, built once from the model and the catalog.
#[derive(Debug, Clone)]
pub struct Rows {
    pub entity: Entity,
    /// Every column of the table, by name.
    pub types: HashMap<String, ColumnType>,
    /// The key template's columns with their SQL types, in template order.
    key_columns: Vec<(String, String)>,
    /// The key columns a page's cells start with, in their order: the walk columns, then the
    /// template's others. The document's cells follow.
    keyed_by: Vec<String>,
    document: Document,
    /// The columns a sweep walks in order: the primary key, or a set's key columns.
    walk_columns: Vec<(String, String)>,
    by_key: String,
    /// Which keys have no row: the key-side sweep needs no documents.
    missing: String,
    /// Sweep pages: `[after a cursor][up to a bound]` in the four combinations, indexed by
    /// `(cursor.is_some(), until.is_some())`.
    pages: [[String; 2]; 2],
    /// A sample of the walk columns' values, sorted, to split the table into shards.
    sample: String,
    /// The row with the highest version, with PostgreSQL's clock: for entities with a version
    /// (the watermark check, `crate::watermark`).
    newest: Option<String>,
}

pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl Rows {
    /// Builds the statements of a validated entity. `catalog` must hold its table.
    pub fn new(entity: &Entity, catalog: &Catalog) -> Rows {
        let columns = &catalog.tables[&entity.table];
        let sql_type: HashMap<&str, &str> = columns
            .iter()
            .map(|c| (c.name.as_str(), c.type_name.as_str()))
            .collect();
        let typed = |names: &[&str]| -> Vec<(String, String)> {
            names
                .iter()
                .map(|n| (n.to_string(), sql_type[n].to_string()))
                .collect()
        };
        let key_columns = typed(&entity.key.columns());
        let pk: Vec<&str> = entity.primary_key.iter().map(String::as_str).collect();
        let all: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        let table = entity.table.sql();

        // What the document holds, cell by cell, and the columns a sweep page renders its
        // key from.
        let spelled = |names: &[&str]| -> Document {
            let columns: Vec<(String, Spelling)> = names
                .iter()
                .map(|n| (n.to_string(), Spelling::of(sql_type[n])))
                .collect();
            let mut by_name: Vec<usize> = (0..columns.len()).collect();
            by_name.sort_by(|&a, &b| columns[a].0.cmp(&columns[b].0));
            Document::Columns { columns, by_name }
        };
        let (document, grouped) = match &entity.representation {
            Representation::Json { columns } | Representation::Hash { columns } => {
                let names: Vec<&str> = match columns {
                    Some(c) => c.iter().map(String::as_str).collect(),
                    None => all.clone(),
                };
                (spelled(&names), false)
            }
            Representation::String { value } => (spelled(&[value.as_str()]), false),
            Representation::Set { member } => (Document::Members(member.clone()), true),
        };
        let doc_cells: Vec<String> = match &document {
            Document::Columns { columns, .. } => columns
                .iter()
                .map(|(name, spelling)| spelling.cell(name))
                .collect(),
            Document::Members(member) => {
                vec![format!(
                    "json_agg({})::text",
                    object(&member.columns(), true)
                )]
            }
        };
        let walk: Vec<&str> = if grouped {
            entity.key.columns()
        } else {
            let mut walk = pk.clone();
            walk.extend(entity.key.columns().into_iter().filter(|c| !pk.contains(c)));
            walk
        };
        let walk_columns = typed(if grouped { &walk } else { &pk });
        let doc = cells(&[], &doc_cells);
        let keys_doc = cells(&walk, &doc_cells);

        // By key: the template's values come in as text arrays, one per column, cast to the
        // column's type so the table's indexes apply.
        let unnest_args: Vec<String> = (1..=key_columns.len())
            .map(|i| format!("${i}::text[]"))
            .collect();
        let aliases: Vec<String> = (0..key_columns.len()).map(|i| format!("c{i}")).collect();
        let join: Vec<String> = key_columns
            .iter()
            .zip(&aliases)
            .map(|((name, ty), alias)| format!("t.{} = k.{alias}::{ty}", ident(name)))
            .collect();
        let keys = format!(
            "unnest({}) WITH ORDINALITY AS k({}, ord)",
            unnest_args.join(", "),
            aliases.join(", "),
        );
        let join = join.join(" AND ");
        let from = format!("FROM {keys} JOIN {table} AS t ON {join}");
        let by_key = format!(
            "SELECT k.ord, {doc} AS cells {from}{}",
            if grouped { " GROUP BY k.ord" } else { "" },
        );
        // The keys without a row, not those with one: in a sweep nearly every key has its row,
        // and PostgreSQL then returns nothing instead of every key's position, deduplicated.
        let missing = format!(
            "SELECT k.ord FROM {keys} WHERE NOT EXISTS (SELECT FROM {table} AS t WHERE {join})"
        );

        // Sweep pages, in the walk columns' order.
        let order: Vec<String> = walk_columns
            .iter()
            .map(|(n, _)| format!("t.{}", ident(n)))
            .collect();
        let cursor: Vec<String> = walk_columns
            .iter()
            .enumerate()
            .map(|(i, (_, ty))| format!("${}::{ty}", i + 2))
            .collect();
        let group = if grouped {
            format!(" GROUP BY {}", order.join(", "))
        } else {
            String::new()
        };
        // $1 the limit, then the cursor's values, then the bound's: a shard's range is
        // (after, until] in walk order, and its pages go on from the cursor within it.
        let bound = |first: usize| -> String {
            walk_columns
                .iter()
                .enumerate()
                .map(|(i, (_, ty))| format!("${}::{ty}", i + first))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let page = |after: bool, until: bool| {
            let mut filters = Vec::new();
            if after {
                filters.push(format!("({}) > ({})", order.join(", "), cursor.join(", ")));
            }
            if until {
                let first = 2 + if after { walk_columns.len() } else { 0 };
                filters.push(format!("({}) <= ({})", order.join(", "), bound(first)));
            }
            let filter = if filters.is_empty() {
                String::new()
            } else {
                format!(" WHERE {}", filters.join(" AND "))
            };
            format!(
                "SELECT {keys_doc} AS cells FROM {table} AS t{filter}{group} \
                 ORDER BY {} LIMIT $1",
                order.join(", ")
            )
        };
        let pages = [
            [page(false, false), page(false, true)],
            [page(true, false), page(true, true)],
        ];
        // Whole pages of the table at random (SYSTEM), so a large table is not read; the
        // sort is PostgreSQL's, the one the pages walk in.
        let walked: Vec<&str> = walk_columns.iter().map(|(n, _)| n.as_str()).collect();
        let sample = format!(
            "SELECT {} AS keys FROM {table} AS t TABLESAMPLE SYSTEM ($1) ORDER BY {}",
            cells(&walked, &[]),
            order.join(", ")
        );
        // One row even on an empty table, so the clock is always read.
        let newest = entity.version.as_ref().filter(|_| !grouped).map(|v| {
            format!(
                "SELECT now() AS at, n.cells FROM (SELECT 1) AS one LEFT JOIN LATERAL \
                 (SELECT {keys_doc} AS cells FROM {table} AS t WHERE t.{v} IS NOT NULL \
                 ORDER BY t.{v} DESC LIMIT 1) AS n ON true",
                v = ident(v),
            )
        });
        let types = columns
            .iter()
            .map(|c| (c.name.clone(), ColumnType::from_pg(&c.type_name)))
            .collect();
        Rows {
            entity: entity.clone(),
            types,
            key_columns,
            walk_columns,
            keyed_by: walk.iter().map(|c| c.to_string()).collect(),
            document,
            by_key,
            missing,
            pages,
            sample,
            newest,
        }
    }

    /// The row with the highest version and its key (`None`: no rows; an entity without a
    /// version, or a set, is never asked), with PostgreSQL's clock read in the same statement,
    /// before the row. Needs an index on the version column to stay cheap on a large table.
    pub async fn newest(
        &self,
        conn: &mut AsyncPgConnection,
    ) -> Result<(DateTime<Utc>, Option<PageRow>), DbError> {
        #[derive(diesel::QueryableByName)]
        struct Raw {
            #[diesel(sql_type = diesel::sql_types::Timestamptz)]
            at: DateTime<Utc>,
            #[diesel(sql_type = Nullable<Array<Nullable<Text>>>)]
            cells: Option<Cells>,
        }
        let Some(statement) = &self.newest else {
            return Err(DbError::Rejected(format!(
                "entity {} has no version to order its rows by",
                self.entity.name
            )));
        };
        let raw: Raw = diesel::sql_query(statement).get_result(conn).await?;
        let row = raw.cells.map(|cells| PageRow {
            key: self.entity.key.render(|c| self.key_text(&cells, c)),
            row: self.decode(&self.document_of(cells)).map(Some),
        });
        Ok((raw.at, row))
    }

    /// The template values of `key` if it is one of this entity's keys: it matches the
    /// template, and each value reads as its column's type (a key of another entity that
    /// happens to match the pattern, `user:email:x` for `user:{id}` with a uuid id, is not).
    pub fn key_values(&self, key: &str) -> Option<Vec<String>> {
        let parsed = self.entity.key.parse_key(key)?;
        self.key_columns
            .iter()
            .map(|(name, _)| {
                let value = parsed.iter().find(|(c, _)| c == name)?.1.clone();
                self.types[name].accepts_text(&value).then_some(value)
            })
            .collect()
    }

    /// The rows behind `keys` (each one of this entity's keys, see [`Rows::key_values`]),
    /// in the order given, with PostgreSQL's clock read in the same round trip.
    pub async fn by_keys(
        &self,
        conn: &mut AsyncPgConnection,
        keys: &[Vec<String>],
    ) -> Result<(DateTime<Utc>, Vec<Found>), DbError> {
        #[derive(diesel::QueryableByName)]
        struct Hit {
            #[diesel(sql_type = BigInt)]
            ord: i64,
            #[diesel(sql_type = Array<Nullable<Text>>)]
            cells: Cells,
        }
        let mut query = diesel::sql_query(&self.by_key).into_boxed();
        for i in 0..self.key_columns.len() {
            let column: Vec<&str> = keys.iter().map(|k| k[i].as_str()).collect();
            query = query.bind::<Array<Text>, _>(column);
        }
        let conn: &AsyncPgConnection = conn;
        let mut c = conn;
        let hits = query.load::<Hit>(&mut c);
        let (at, hits) = futures::try_join!(db::now(conn), async { Ok(hits.await?) })?;
        let mut found: Vec<Found> = vec![Ok(None); keys.len()];
        for hit in hits {
            // Several rows behind one key (a template over a column that is not unique): the
            // first one stands for the key.
            let slot = &mut found[(hit.ord - 1) as usize];
            if matches!(slot, Ok(None)) {
                *slot = self
                    .decode(&RawRow {
                        cells: hit.cells,
                        from: 0,
                    })
                    .map(Some);
            }
        }
        Ok((at, found))
    }

    /// Which of `keys` (as for [`Rows::by_keys`]) have at least one row behind them.
    pub async fn exist(
        &self,
        conn: &mut AsyncPgConnection,
        keys: &[Vec<String>],
    ) -> Result<Vec<bool>, DbError> {
        #[derive(diesel::QueryableByName)]
        struct Miss {
            #[diesel(sql_type = BigInt)]
            ord: i64,
        }
        let mut query = diesel::sql_query(&self.missing).into_boxed();
        for i in 0..self.key_columns.len() {
            let column: Vec<&str> = keys.iter().map(|k| k[i].as_str()).collect();
            query = query.bind::<Array<Text>, _>(column);
        }
        let mut found = vec![true; keys.len()];
        for miss in query.load::<Miss>(conn).await? {
            found[(miss.ord - 1) as usize] = false;
        }
        Ok(found)
    }

    /// The walk columns' values of a sample of the table's rows, in walk order: about
    /// `wanted` rows, from PostgreSQL's estimate of the table's size (counted when it has
    /// none, as before a first ANALYZE).
    pub async fn sample(
        &self,
        conn: &mut AsyncPgConnection,
        wanted: u64,
    ) -> Result<Vec<Vec<String>>, DbError> {
        #[derive(diesel::QueryableByName)]
        struct Estimate {
            #[diesel(sql_type = diesel::sql_types::Double)]
            rows: f64,
        }
        #[derive(diesel::QueryableByName)]
        struct Raw {
            #[diesel(sql_type = Array<Nullable<Text>>)]
            keys: Vec<Option<String>>,
        }
        let table = self.entity.table.sql();
        let estimate = diesel::sql_query(format!(
            "SELECT reltuples::float8 AS rows FROM pg_class WHERE oid = {}::regclass",
            literal(&table)
        ))
        .get_result::<Estimate>(conn)
        .await?;
        let rows = if estimate.rows >= 0.0 {
            estimate.rows
        } else {
            diesel::sql_query(format!("SELECT count(*)::float8 AS rows FROM {table}"))
                .get_result::<Estimate>(conn)
                .await?
                .rows
        };
        let percent = crate::shards::sample_percent(rows, wanted);
        let raws = diesel::sql_query(&self.sample)
            .bind::<diesel::sql_types::Double, _>(percent)
            .load::<Raw>(conn)
            .await?;
        Ok(raws
            .into_iter()
            // The sample's array holds the walk columns, in their order; a NULL leaves its row out.
            .filter_map(|raw| raw.keys.into_iter().collect())
            .collect())
    }

    /// The next `limit` keys of a sweep after `cursor` (the walk columns' values of the last
    /// row of the previous page, as text) and up to `until` (a shard's last values), and the
    /// cursor of this page's last row.
    pub async fn page(
        &self,
        conn: &mut AsyncPgConnection,
        cursor: Option<&[String]>,
        until: Option<&[String]>,
        limit: i64,
    ) -> Result<(DateTime<Utc>, Vec<PageRow>, Option<Vec<String>>), DbError> {
        let (at, raws, last) = self.page_raw(conn, cursor, until, limit).await?;
        let rows = raws
            .into_iter()
            .map(|raw| PageRow {
                key: raw.key,
                row: self.decode(&raw.doc).map(Some),
            })
            .collect();
        Ok((at, rows, last))
    }

    /// [`Rows::page`] with each row's document as PostgreSQL sent it, not yet decoded
    /// ([`Rows::decode`]): a rebuild writes most documents from their cells.
    pub async fn page_raw(
        &self,
        conn: &mut AsyncPgConnection,
        cursor: Option<&[String]>,
        until: Option<&[String]>,
        limit: i64,
    ) -> Result<(DateTime<Utc>, Vec<PageRaw>, Option<Vec<String>>), DbError> {
        #[derive(diesel::QueryableByName)]
        struct Raw {
            #[diesel(sql_type = Array<Nullable<Text>>)]
            cells: Cells,
        }
        let statement = &self.pages[cursor.is_some() as usize][until.is_some() as usize];
        let mut query = diesel::sql_query(statement).into_boxed();
        query = query.bind::<BigInt, _>(limit);
        for value in cursor
            .unwrap_or_default()
            .iter()
            .chain(until.unwrap_or_default())
        {
            query = query.bind::<Text, _>(value.clone());
        }
        let conn: &AsyncPgConnection = conn;
        let mut c = conn;
        let raws = query.load::<Raw>(&mut c);
        let (at, raws) = futures::try_join!(db::now(conn), async { Ok(raws.await?) })?;
        // The cursor is the last row's walk columns: read once, not for every row.
        let last = raws.last().and_then(|raw| {
            self.walk_columns
                .iter()
                .map(|(name, _)| self.key_text(&raw.cells, name))
                .collect::<Option<Vec<String>>>()
        });
        let rows = raws
            .into_iter()
            .map(|raw| PageRaw {
                key: self.entity.key.render(|c| self.key_text(&raw.cells, c)),
                doc: self.document_of(raw.cells),
            })
            .collect();
        Ok((at, rows, last))
    }

    /// Column `name`'s value among a page row's key cells ([`Rows::keyed_by`] order).
    fn key_text(&self, cells: &Cells, name: &str) -> Option<String> {
        let at = self.keyed_by.iter().position(|c| c == name)?;
        cells.get(at).map(str::to_string)
    }

    /// A page row's document: its cells past the key columns'.
    fn document_of(&self, cells: Cells) -> RawRow {
        RawRow {
            cells,
            from: self.keyed_by.len(),
        }
    }

    /// A row's document as [`Rows::page_raw`] and the other reads return it, decoded; why
    /// not, when a value does not read as its column's type.
    pub fn decode(&self, raw: &RawRow) -> Result<Row, String> {
        match &self.document {
            Document::Columns { columns, by_name } => {
                if raw.len() != columns.len() {
                    return Err(format!(
                        "the row has {} columns where {} were asked for",
                        raw.len(),
                        columns.len()
                    ));
                }
                // In the map's order, so building it sorts nothing.
                by_name
                    .iter()
                    .map(|&i| {
                        let (name, spelling) = &columns[i];
                        Ok((name.clone(), spelling.value(raw.get(i))?))
                    })
                    .collect::<Result<Map<String, Value>, String>>()
                    .map(Row::Doc)
            }
            Document::Members(member) => {
                let text = raw.get(0).unwrap_or_default();
                let value: Value = serde_json::from_str(text)
                    .map_err(|e| format!("the row is not JSON this service can read ({e})"))?;
                match value {
                    Value::Array(rows) => Ok(Row::Members(
                        rows.iter()
                            .filter_map(|r| {
                                member.render(|c| {
                                    r.get(c).and_then(Value::as_str).map(str::to_string)
                                })
                            })
                            .collect(),
                    )),
                    other => Err(format!("unexpected row shape: {other}")),
                }
            }
        }
    }

    /// A document's cells in the order serde_json writes a map's fields (by name), each with
    /// its column's name and spelling; `None` for a set's rows, which are one JSON text.
    pub fn cells<'a>(
        &'a self,
        raw: &'a RawRow,
    ) -> Option<impl Iterator<Item = (&'a str, Spelling, Option<&'a str>)> + 'a> {
        let Document::Columns { columns, by_name } = &self.document else {
            return None;
        };
        if raw.len() != columns.len() {
            return None;
        }
        Some(by_name.iter().map(|&i| {
            let (name, spelling) = &columns[i];
            (name.as_str(), *spelling, raw.get(i))
        }))
    }

    /// Column `name`'s value in a document's cells, decoded alone (`None`: not one of them).
    pub fn field(&self, raw: &RawRow, name: &str) -> Option<Result<Value, String>> {
        let Document::Columns { columns, .. } = &self.document else {
            return None;
        };
        let at = columns.iter().position(|(n, _)| n == name)?;
        Some(columns[at].1.value(raw.get(at)))
    }
}

/// `ARRAY[t."a"::text, ..., <doc>...]`: the text of the columns a key is rendered from (and
/// a sweep's cursor), in `keys`' order, then the document's cells. One array of text, not a
/// JSON object: PostgreSQL builds it without rendering JSON, and the client reads it without
/// parsing.
fn cells(keys: &[&str], doc: &[String]) -> String {
    let cells: Vec<String> = keys
        .iter()
        .map(|n| format!("t.{}::text", ident(n)))
        .chain(doc.iter().cloned())
        .collect();
    format!("ARRAY[{}]::text[]", cells.join(", "))
}

/// `json_build_object('a', t."a", ...)` over `names`, as text when `as_text`.
///
/// json, not jsonb: PostgreSQL concatenates a json object's text as it goes, where jsonb
/// converts every value and sorts the keys, only for the client to read the text back (a sweep
/// page of the demo table cost it about a fifth more). The comparator reads values by their
/// columns' types, so key order and spacing do not matter. jsonb only for a table of more than
/// 50 compared columns: json objects have no `||`.
pub(crate) fn object(names: &[&str], as_text: bool) -> String {
    let chunk = |function: &str, chunk: &[&str]| {
        let args: Vec<String> = chunk
            .iter()
            .map(|n| {
                let cast = if as_text { "::text" } else { "" };
                format!("{}, t.{}{cast}", literal(n), ident(n))
            })
            .collect();
        format!("{function}({})", args.join(", "))
    };
    match names.len() {
        0 => "'{}'::json".to_string(),
        n if n <= COLUMNS_PER_OBJECT => chunk("json_build_object", names),
        _ => {
            let parts: Vec<String> = names
                .chunks(COLUMNS_PER_OBJECT)
                .map(|c| chunk("jsonb_build_object", c))
                .collect();
            format!("({})::json", parts.join(" || "))
        }
    }
}
