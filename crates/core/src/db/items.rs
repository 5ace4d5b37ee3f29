//! The `items` table: the application data whose cached copies stalewatch watches.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{schema::items, DbError, PgPool};

/// One row, and also exactly the JSON document cached under the item's key.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Insertable, Serialize, Deserialize)]
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

pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<Item>, DbError> {
    let mut conn = pool.get().await?;
    Ok(items::table
        .find(id)
        .select(Item::as_select())
        .first(&mut conn)
        .await
        .optional()?)
}

/// Many rows in one query; absent ids are simply missing from the result.
pub async fn get_many(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<Item>, DbError> {
    let mut conn = pool.get().await?;
    Ok(items::table
        .filter(items::id.eq_any(ids))
        .select(Item::as_select())
        .load(&mut conn)
        .await?)
}

/// Applies `changes` and bumps the version by one, returning the row before and after.
///
/// The row is locked (`FOR UPDATE`) for the transaction, so concurrent updates of one item
/// queue up and each one raises the version exactly once: no lost updates.
pub async fn update(
    pool: &PgPool,
    id: Uuid,
    changes: ItemChanges,
) -> Result<Option<(Item, Item)>, DbError> {
    let mut conn = pool.get().await?;
    let result = conn
        .transaction::<_, diesel::result::Error, _>(async |conn| {
            let Some(before) = items::table
                .find(id)
                .select(Item::as_select())
                .for_update()
                .first(conn)
                .await
                .optional()?
            else {
                return Ok(None);
            };
            let after = diesel::update(items::table.find(id))
                .set((
                    &changes,
                    items::version.eq(items::version + 1),
                    items::updated_at.eq(diesel::dsl::now),
                ))
                .returning(Item::as_returning())
                .get_result(conn)
                .await?;
            Ok(Some((before, after)))
        })
        .await?;
    Ok(result)
}

pub async fn delete(pool: &PgPool, id: Uuid) -> Result<bool, DbError> {
    let mut conn = pool.get().await?;
    let n = diesel::delete(items::table.find(id))
        .execute(&mut conn)
        .await?;
    Ok(n > 0)
}

/// The next `limit` rows in id order after `after`: the sweep's walk over the table.
pub async fn page_after(
    conn: &mut AsyncPgConnection,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Item>, DbError> {
    let mut query = items::table
        .select(Item::as_select())
        .order(items::id.asc())
        .limit(limit)
        .into_boxed();
    if let Some(after) = after {
        query = query.filter(items::id.gt(after));
    }
    Ok(query.load(conn).await?)
}
