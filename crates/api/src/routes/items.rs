//! Items: cache-aside reads, writes that commit to PostgreSQL first, then the cache, then ask
//! for checks.

use actix_web::{delete, get, post, put, web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use stalewatch_core::{
    config::FailureMode,
    db::items::{self, Item, ItemChanges},
    keys::ITEM_ENTITY,
};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::Admin,
    error::{
        AdminErrors, ApiError, BadRequest, BodyErrors, ConflictError, NotFoundError, StoreErrors,
    },
    openapi::{IncidentDoc, ItemDoc},
    state::AppState,
};

const MAX_NAME_LEN: usize = 200;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateItem {
    /// Not blank, at most 200 characters, no NUL.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000]*\S[^\u0000]*$"
    )]
    name: String,
    #[schema(value_type = crate::openapi::JsonValue)]
    value: Value,
}

/// Give `name`, `value` or both.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
pub struct UpdateItem {
    /// Not blank, at most 200 characters, no NUL. Not null: leave it out to keep the name.
    #[serde(default, deserialize_with = "present")]
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000]*\S[^\u0000]*$",
        nullable = false
    )]
    name: Option<String>,
    /// `"value": null` sets the value to JSON null; only a missing field leaves it alone.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = crate::openapi::JsonValue)]
    value: Option<Value>,
}

/// Where a read was served from.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // A description only.
pub enum ReadSource {
    Cache,
    Db,
}

/// An item read (the `X-Cache` header says hit, miss or bypass).
#[derive(ToSchema)]
#[allow(dead_code)] // A description only: built with json! below.
pub struct ItemRead {
    source: ReadSource,
    data: ItemDoc,
}

#[derive(ToSchema)]
#[allow(dead_code)] // A description only.
pub struct Deleted {
    deleted: bool,
    id: Uuid,
}

/// An item's key rewritten from PostgreSQL, and its incident if it had one.
#[derive(ToSchema)]
#[allow(dead_code)] // A description only.
pub struct Refreshed {
    refreshed: bool,
    data: ItemDoc,
    incident: Option<IncidentDoc>,
}

/// A field that was given, null included when its type takes null: `#[serde(default)]` makes
/// a missing one `None`.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A request body that must be a JSON object. serde's derived structs also take an array of
/// the fields in order (`[null, null]` for an update), which no client means and the OpenAPI
/// document does not allow.
#[derive(Debug)]
pub struct Object<T>(T);

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, Unexpected};
        let value = Value::deserialize(d)?;
        let unexpected = match &value {
            Value::Object(_) => return T::deserialize(value).map(Object).map_err(D::Error::custom),
            Value::Array(_) => Unexpected::Seq,
            Value::String(s) => Unexpected::Str(s),
            Value::Bool(b) => Unexpected::Bool(*b),
            Value::Null => Unexpected::Unit,
            Value::Number(_) => Unexpected::Other("a number"),
        };
        Err(D::Error::invalid_type(unexpected, &"a JSON object"))
    }
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() {
        return Err(ApiError::Invalid("name must not be empty".into()));
    }
    if name.chars().count() > MAX_NAME_LEN {
        return Err(ApiError::Invalid(format!(
            "name must be at most {MAX_NAME_LEN} characters"
        )));
    }
    if name.contains('\0') {
        return Err(ApiError::Invalid(
            "name must not contain the NUL character (U+0000): PostgreSQL text cannot store it"
                .into(),
        ));
    }
    Ok(())
}

/// PostgreSQL's jsonb refuses `\u0000` in any string or object key, so a value holding one
/// is refused here, saying where it is (a JSON pointer), before PostgreSQL sees it.
fn check_value(value: &Value) -> Result<(), ApiError> {
    match find_nul(value) {
        None => Ok(()),
        Some((what, path)) => {
            let at = if path.is_empty() {
                "the top level".to_string()
            } else {
                format!("{path:?}")
            };
            Err(ApiError::Invalid(format!(
                "value must not contain the NUL character (U+0000): found in {what} at {at} \
                 (PostgreSQL jsonb cannot store it)"
            )))
        }
    }
}

/// The first NUL in `value`: whether in a string or a key, and its JSON pointer. Recursive:
/// a request's JSON is at most 128 levels deep (serde_json's limit), and the path is only
/// built on the way back from a find.
fn find_nul(value: &Value) -> Option<(&'static str, String)> {
    let token = |t: &str| format!("/{}", t.replace('~', "~0").replace('/', "~1"));
    match value {
        Value::String(s) if s.contains('\0') => Some(("a string", String::new())),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| find_nul(item).map(|(what, rest)| (what, format!("/{i}{rest}")))),
        Value::Object(fields) => fields.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                return Some(("an object key", token(key)));
            }
            find_nul(item).map(|(what, rest)| (what, format!("{}{rest}", token(key))))
        }),
        _ => None,
    }
}

/// Writes the item to the cache unless a newer version is already there (writers finishing
/// out of order must not regress it). A Redis failure is logged and counted, never fatal:
/// the row is committed and the sweep heals the cache later.
async fn write_cache(state: &AppState, item: &Item) {
    let key = state.cache.keys().item(&item.id);
    if let Err(e) = state
        .cache
        .set_unless_newer(
            &key,
            &item.to_cache_bytes(),
            item.version,
            state.config.cache_ttl,
        )
        .await
    {
        state
            .metrics
            .cache_requests
            .with_label_values(&["error"])
            .inc();
        tracing::warn!(key, error = %e, "cache write failed");
    }
}

/// Creates an item: PostgreSQL first, then the cache, then checks are asked for.
#[utoipa::path(
    operation_id = "create_item",
    tag = "items",
    request_body = CreateItem,
    responses(
        (status = 201, description = "Created", body = ItemDoc),
        BadRequest, BodyErrors, ConflictError, StoreErrors,
    )
)]
#[post("/items")]
pub async fn create(
    state: web::Data<AppState>,
    body: web::Json<Object<CreateItem>>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner().0;
    check_name(&body.name)?;
    check_value(&body.value)?;
    let item = items::create(&state.pool, &body.name, &body.value).await?;
    write_cache(&state, &item).await;
    state.checks.request(item.id);
    Ok(HttpResponse::Created().json(item))
}

/// Reads an item: from the cache, else from PostgreSQL (which fills the cache).
#[utoipa::path(
    operation_id = "get_item",
    tag = "items",
    params(("id" = Uuid, Path, description = "The item's id")),
    responses(
        (status = 200, description = "The item", body = ItemRead,
            headers(("X-Cache" = String, description = "hit, miss or bypass (Redis unavailable)"))),
        BadRequest, NotFoundError, StoreErrors,
    )
)]
#[get("/items/{id}")]
pub async fn get(
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let key = state.cache.keys().item(&id);
    let requests = &state.metrics.cache_requests;
    match state.cache.get(&key).await {
        Ok(Some(bytes)) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(data) => {
                requests.with_label_values(&["hit"]).inc();
                return Ok(HttpResponse::Ok()
                    .insert_header(("X-Cache", "hit"))
                    .json(json!({ "source": "cache", "data": data })));
            }
            // Garbage in the cache: serve from the DB and overwrite it below.
            Err(_) => requests.with_label_values(&["miss"]).inc(),
        },
        Ok(None) => requests.with_label_values(&["miss"]).inc(),
        Err(e) => {
            requests.with_label_values(&["error"]).inc();
            tracing::warn!(key, error = %e, "cache read failed; serving from PostgreSQL");
            let item = items::get(&state.pool, id)
                .await?
                .ok_or_else(|| not_found(id))?;
            return Ok(HttpResponse::Ok()
                .insert_header(("X-Cache", "bypass"))
                .json(json!({ "source": "db", "data": item })));
        }
    }
    let item = items::get(&state.pool, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    if state.injector.mode == FailureMode::StaleRead {
        // The classic race: the fill lands after a concurrent write and puts back what was
        // read before it. A plain SET, as a naive cache-aside client would do.
        let (state, stale) = (state.clone(), item.clone());
        tokio::spawn(async move {
            tokio::time::sleep(state.injector.delay).await;
            let _ = state
                .cache
                .set(&key, &stale.to_cache_bytes(), state.config.cache_ttl)
                .await;
        });
    } else {
        write_cache(&state, &item).await;
    }
    Ok(HttpResponse::Ok()
        .insert_header(("X-Cache", "miss"))
        .json(json!({ "source": "db", "data": item })))
}

/// Updates an item's name, value or both; raises its version.
#[utoipa::path(
    operation_id = "update_item",
    tag = "items",
    params(("id" = Uuid, Path, description = "The item's id")),
    request_body = UpdateItem,
    responses(
        (status = 200, description = "The item as updated", body = ItemDoc),
        BadRequest, BodyErrors, NotFoundError, ConflictError, StoreErrors,
    )
)]
#[put("/items/{id}")]
pub async fn update(
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
    body: web::Json<Object<UpdateItem>>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let body = body.into_inner().0;
    if body.name.is_none() && body.value.is_none() {
        return Err(ApiError::Invalid("give name, value or both".into()));
    }
    if let Some(name) = &body.name {
        check_name(name)?;
    }
    if let Some(value) = &body.value {
        check_value(value)?;
    }
    let changes = ItemChanges {
        name: body.name,
        value: body.value,
    };
    let key = state.cache.keys().item(&id);
    let after = if state.injector.mode == FailureMode::Delay {
        let (before, after) = items::update_returning_previous(&state.pool, id, changes)
            .await?
            .ok_or_else(|| not_found(id))?;
        write_cache(&state, &after).await;
        state
            .injector
            .overwrite_later(key, before.to_cache_bytes())
            .await;
        after
    } else {
        let after = items::update(&state.pool, id, changes)
            .await?
            .ok_or_else(|| not_found(id))?;
        match state.injector.mode {
            FailureMode::Drop => tracing::debug!(key, "FAILURE_MODE=drop: cache write skipped"),
            _ => write_cache(&state, &after).await,
        }
        after
    };
    state.checks.request(id);
    Ok(HttpResponse::Ok().json(after))
}

/// Deletes an item, and its cache key.
#[utoipa::path(
    operation_id = "delete_item",
    tag = "items",
    params(("id" = Uuid, Path, description = "The item's id")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        BadRequest, NotFoundError, StoreErrors,
    )
)]
#[delete("/items/{id}")]
pub async fn delete(
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    if !items::delete(&state.pool, id).await? {
        return Err(not_found(id));
    }
    let key = state.cache.keys().item(&id);
    state.injector.cancel(&key).await;
    if let Err(e) = state.cache.delete(&key).await {
        tracing::warn!(key, error = %e, "cache delete failed; the check will report the orphan");
    }
    state.checks.request(id);
    Ok(HttpResponse::Ok().json(json!({ "deleted": true, "id": id })))
}

/// Rewrites the cache from PostgreSQL with the versioned write (so a refresh racing a PUT
/// never puts back the older value) and resolves the key's open incident (cause: refresh).
async fn refresh_item(state: &AppState, id: Uuid) -> Result<HttpResponse, ApiError> {
    // A pending injected overwrite would undo the refresh.
    state.injector.cancel(&state.cache.keys().item(&id)).await;
    let item = items::get(&state.pool, id).await?;
    let key = state.cache.keys().item(&id);
    let outcome = state.checker().await?.refresh(ITEM_ENTITY, &key).await?;
    let incident = outcome
        .recorded
        .into_iter()
        .find_map(|r| r.incident)
        .map(crate::routes::incidents::IncidentView::from);
    let item = item.ok_or_else(|| not_found(id))?;
    Ok(HttpResponse::Ok().json(json!({
        "refreshed": true,
        "data": item,
        "incident": incident,
    })))
}

/// The prototype's path of [`refresh`].
#[utoipa::path(
    operation_id = "refresh_item_prototype",
    tag = "items",
    params(("id" = Uuid, Path, description = "The item's id")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Refreshed", body = Refreshed),
        BadRequest, AdminErrors, NotFoundError, StoreErrors,
    )
)]
#[post("/items/debug/refresh/{id}")]
pub async fn refresh_debug(
    _admin: Admin,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    refresh_item(&state, id.into_inner()).await
}

/// Rewrites the item's cache key from PostgreSQL and resolves its open incident (cause
/// `refresh`). Takes no body: one, if sent, must be declared JSON.
#[utoipa::path(
    operation_id = "refresh_item",
    tag = "items",
    params(("id" = Uuid, Path, description = "The item's id")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Refreshed", body = Refreshed),
        BadRequest, AdminErrors, NotFoundError, StoreErrors,
    )
)]
#[post("/items/{id}/refresh")]
pub async fn refresh(
    _admin: Admin,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    refresh_item(&state, id.into_inner()).await
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("no item {id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PostgreSQL's numeric prints a large float's every digit: `1.7976931348623155e308`
    /// comes back as 309 of them, and must read back as the same number.
    #[test]
    fn the_largest_floats_read_back_as_postgresql_prints_them() {
        for f in [1.7976931348623155e308_f64, f64::MAX, 1e308, 2.5e300] {
            let printed = format!("{f:.0}");
            let read: Value = serde_json::from_str(&printed)
                .unwrap_or_else(|e| panic!("{f:e} printed as {} digits: {e}", printed.len()));
            assert_eq!(read.as_f64(), Some(f), "{f:e}");
        }
    }
}
