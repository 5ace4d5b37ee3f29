//! The `items` table: the application data whose cached copies stalewatch watches.

use chrono::{DateTime, Utc};
use diesel::deserialize::{self, FromSql};
use diesel::pg::{Pg, PgValue};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Json, Jsonb, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{schema::items, DbError, PgPool};

/// One row, and also exactly the JSON document cached under the item's key.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Queryable,
    QueryableByName,
    Selectable,
    Insertable,
    Serialize,
    Deserialize,
)]
#[diesel(table_name = items, check_for_backend(diesel::pg::Pg))]
pub struct Item {
    pub id: Uuid,
    pub name: String,
    pub value: serde_json::Value,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Item {
    /// The cached representation: the same bytes the API writes to Redis.
    pub fn to_cache_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an Item always serialises")
    }
}

/// A jsonb value as PostgreSQL sent it, not yet parsed. Reading rows this way lets one value
/// the parser refuses (jsonb nested deeper than serde_json's recursion limit, written straight
/// in SQL: PostgreSQL accepts it) fail only its own row instead of the whole query.
#[derive(Debug, Clone, PartialEq)]
pub struct RawJson(Vec<u8>);

impl RawJson {
    /// The document's text, unparsed.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl FromSql<Jsonb, Pg> for RawJson {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        // jsonb's binary form is a version byte (1) followed by the document's text.
        match value.as_bytes().split_first() {
            Some((1, text)) => Ok(RawJson(text.to_vec())),
            _ => Err("unsupported jsonb version".into()),
        }
    }
}

/// A json value's binary form is its text: a row rendered with `json_build_object`.
impl FromSql<Json, Pg> for RawJson {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        Ok(RawJson(value.as_bytes().to_vec()))
    }
}

impl diesel::Queryable<Json, Pg> for RawJson {
    type Row = RawJson;
    fn build(row: RawJson) -> deserialize::Result<Self> {
        Ok(row)
    }
}

impl diesel::Queryable<Jsonb, Pg> for RawJson {
    type Row = RawJson;
    fn build(row: RawJson) -> deserialize::Result<Self> {
        Ok(row)
    }
}

/// A row as read, before its value is parsed.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = items, check_for_backend(diesel::pg::Pg))]
pub struct ItemRow {
    pub id: Uuid,
    pub name: String,
    pub value: RawJson,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl ItemRow {
    /// The item, or why its value cannot be read.
    pub fn decode(self) -> Result<Item, String> {
        let value = serde_json::from_slice(&self.value.0)
            .map_err(|e| format!("its value is not JSON this service can read ({e})"))?;
        Ok(Item {
            id: self.id,
            name: self.name,
            value,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// The item of a row read by id, or [`DbError::Undecodable`] naming it.
fn decoded(id: Uuid, row: Option<ItemRow>) -> Result<Option<Item>, DbError> {
    row.map(|r| {
        r.decode().map_err(|reason| DbError::Undecodable {
            what: format!("item {id}"),
            reason,
        })
    })
    .transpose()
}

/// A partial update; `None` leaves the field as it is.
#[derive(Debug, Clone, Default, AsChangeset)]
#[diesel(table_name = items)]
pub struct ItemChanges {
    pub name: Option<String>,
    pub value: Option<serde_json::Value>,
}

pub async fn create(pool: &PgPool, name: &str, value: &serde_json::Value) -> Result<Item, DbError> {
    let now = Utc::now();
    let item = Item {
        id: Uuid::now_v7(),
        name: name.to_string(),
        value: value.clone(),
        version: 1,
        created_at: now,
        updated_at: now,
    };
    let mut conn = pool.get().await?;
    Ok(diesel::insert_into(items::table)
        .values(&item)
        .returning(Item::as_returning())
        .get_result(&mut conn)
        .await?)
}

/// One item. Idempotent, so a connection lost to a server restart is retried once on a
/// fresh one; a stored value this service cannot parse is [`DbError::Undecodable`].
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<Item>, DbError> {
    let row: Option<ItemRow> = super::idempotent(pool, async |conn| {
        Ok(items::table
            .find(id)
            .select(ItemRow::as_select())
            .first(conn)
            .await
            .optional()?)
    })
    .await?;
    decoded(id, row)
}

/// Applies `changes` and bumps the version by one, returning the new row.
///
/// One UPDATE: concurrent updates of an item queue on its row lock and each raises the
/// version exactly once (no lost updates). Built with the DSL so the connection caches the
/// prepared statement.
pub async fn update(
    pool: &PgPool,
    id: Uuid,
    changes: ItemChanges,
) -> Result<Option<Item>, DbError> {
    let mut conn = pool.get().await?;
    let row: Option<ItemRow> = diesel::update(items::table.find(id))
        .set((
            &changes,
            items::version.eq(items::version + 1),
            items::updated_at.eq(diesel::dsl::now),
        ))
        .returning(ItemRow::as_returning())
        .get_result(&mut conn)
        .await
        .optional()?;
    // A name-only update of a row whose value this service cannot read commits, then says so.
    decoded(id, row)
}

/// Like [`update`], also returning the row as it was before (FAILURE_MODE=delay writes that
/// back to the cache).
///
/// One statement: the sub-select locks the row (`FOR UPDATE`) and reads it as it was, so the
/// "before" is the version this update replaced, whatever ran concurrently.
pub async fn update_returning_previous(
    pool: &PgPool,
    id: Uuid,
    changes: ItemChanges,
) -> Result<Option<(Item, Item)>, DbError> {
    let mut conn = pool.get().await?;
    let row: Option<UpdatedRow> = diesel::sql_query(
        "UPDATE items SET name = COALESCE($2, items.name), value = COALESCE($3, items.value),          version = items.version + 1, updated_at = now()          FROM (SELECT * FROM items WHERE id = $1 FOR UPDATE) AS old          WHERE items.id = old.id          RETURNING items.id, items.name, items.value, items.version, items.created_at,          items.updated_at, old.name AS old_name, old.value AS old_value,          old.version AS old_version, old.updated_at AS old_updated_at",
    )
    .bind::<diesel::sql_types::Uuid, _>(id)
    .bind::<Nullable<Text>, _>(changes.name)
    .bind::<Nullable<Jsonb>, _>(changes.value)
    .get_result(&mut conn)
    .await
    .optional()?;
    Ok(row.map(UpdatedRow::split))
}

/// What the single-statement update returns: the new row and the old one's changing columns.
#[derive(QueryableByName)]
struct UpdatedRow {
    #[diesel(embed)]
    after: Item,
    #[diesel(sql_type = Text)]
    old_name: String,
    #[diesel(sql_type = Jsonb)]
    old_value: serde_json::Value,
    #[diesel(sql_type = BigInt)]
    old_version: i64,
    #[diesel(sql_type = Timestamptz)]
    old_updated_at: DateTime<Utc>,
}

impl UpdatedRow {
    fn split(self) -> (Item, Item) {
        let before = Item {
            name: self.old_name,
            value: self.old_value,
            version: self.old_version,
            updated_at: self.old_updated_at,
            ..self.after.clone()
        };
        (before, self.after)
    }
}

pub async fn delete(pool: &PgPool, id: Uuid) -> Result<bool, DbError> {
    let mut conn = pool.get().await?;
    let n = diesel::delete(items::table.find(id))
        .execute(&mut conn)
        .await?;
    Ok(n > 0)
}

/// The next `limit` rows in id order after `after`, with PostgreSQL's clock read in the same
/// round trip (the benchmark's seeding walks the table with it).
pub async fn page_after(
    conn: &mut AsyncPgConnection,
    after: Option<Uuid>,
    limit: i64,
) -> Result<(DateTime<Utc>, Vec<ItemRow>), DbError> {
    let mut query = items::table
        .select(ItemRow::as_select())
        .order(items::id.asc())
        .limit(limit)
        .into_boxed();
    if let Some(after) = after {
        query = query.filter(items::id.gt(after));
    }
    let conn: &AsyncPgConnection = conn;
    let mut c = conn;
    let rows = query.load(&mut c);
    let (at, rows) = futures::try_join!(super::now(conn), async { Ok(rows.await?) })?;
    Ok((at, rows))
}
