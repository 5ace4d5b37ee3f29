//! Incidents, as the prototype listed them and with filters, all with keyset pagination.

use actix_web::{get, post, web, HttpResponse};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::json;
use stalewatch_core::{
    db::{
        self,
        incidents::{self, IncidentRow, ListQuery},
    },
    incident::State,
};
use utoipa::{IntoParams, ToSchema};

use crate::{
    auth::{Admin, Reader},
    error::{AdminErrors, ApiError, BadRequest, NotFoundError, StoreErrors},
    openapi::IncidentDoc,
    state::AppState,
};

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

/// One incident as the API shows it: the row (its serde attributes name `cache_key` `key` and
/// show the snapshots as JSON documents) and how long it has been open.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IncidentView {
    #[serde(flatten)]
    row: IncidentRow,
    /// From detection to closure, or to now while open.
    duration_ms: i64,
}

impl IncidentView {
    pub fn id(&self) -> i64 {
        self.row.id
    }
}

impl From<IncidentRow> for IncidentView {
    fn from(row: IncidentRow) -> Self {
        let end = row.resolved_at.unwrap_or_else(Utc::now);
        let duration_ms = (end - row.first_seen_at).num_milliseconds().max(0);
        Self { row, duration_ms }
    }
}

/// Pagination, shared by every listing.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Page size, 50 unless given.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// The `next` value of the previous page.
    after: Option<i64>,
}

/// A page of a listing, newest first.
#[derive(ToSchema)]
#[allow(dead_code)] // A description only: built with json!.
pub struct IncidentPage {
    data: Vec<IncidentDoc>,
    /// The `after` of the next page; null on the last one.
    next: Option<i64>,
}

/// A page of a listing of the prototype's shape.
#[derive(ToSchema)]
#[allow(dead_code)] // A description only: built with json!.
pub struct CountedPage {
    /// Every incident the listing holds, not only this page's.
    count: i64,
    data: Vec<IncidentDoc>,
    /// The `after` of the next page; null on the last one.
    next: Option<i64>,
}

fn page_size(limit: Option<i64>) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    Ok(limit)
}

/// One page, newest first, and the `after` of the next page: `None` on the last one.
/// Asks for one row more than the page to know whether another page follows.
struct Page {
    data: Vec<IncidentView>,
    next: Option<i64>,
    /// All incidents matching the filters, when asked for.
    total: Option<i64>,
}

async fn page(state: &AppState, query: ListQuery, with_total: bool) -> Result<Page, ApiError> {
    let size = query.limit;
    let probe = ListQuery {
        limit: size + 1,
        ..query
    };
    let (mut rows, total) = db::idempotent(&state.pool, async |conn| {
        let rows = incidents::list(conn, &probe).await?;
        let total = if with_total {
            Some(incidents::count(conn, &probe).await?)
        } else {
            None
        };
        Ok((rows, total))
    })
    .await?;
    let next = if rows.len() as i64 > size {
        rows.truncate(size as usize);
        rows.last().map(|r| r.id)
    } else {
        None
    };
    Ok(Page {
        data: rows.into_iter().map(IncidentView::from).collect(),
        next,
        total,
    })
}

/// A listing of the prototype's shape, `{count, data}`, plus `next`: `count` is every
/// incident in `states`, not the page.
async fn counted(
    state: &AppState,
    states: Vec<State>,
    params: PageParams,
) -> Result<HttpResponse, ApiError> {
    let query = ListQuery {
        states,
        before_id: params.after,
        limit: page_size(params.limit)?,
        ..Default::default()
    };
    let page = page(state, query, true).await?;
    Ok(HttpResponse::Ok().json(json!({
        "count": page.total,
        "data": page.data,
        "next": page.next,
    })))
}

/// Confirmed incidents, open or closed: what the prototype called inconsistencies.
///
/// By state alone: an incident is confirmed (`confirmed_at` set) exactly when it is
/// Confirmed, Persistent or Resolved, because only a Confirmed or Persistent incident closes
/// as Resolved; a Detected one closes as Transient (`stalewatch_core::incident::step`).
#[utoipa::path(
    operation_id = "list_confirmed_incidents",
    tag = "incidents",
    params(PageParams),
    responses(
        (status = 200, description = "A page", body = CountedPage),
        BadRequest, AdminErrors, StoreErrors,
    )
)]
#[get("/items/inconsistencies/all")]
pub async fn all(
    _reader: Reader,
    state: web::Data<AppState>,
    params: web::Query<PageParams>,
) -> Result<HttpResponse, ApiError> {
    let states = vec![State::Confirmed, State::Persistent, State::Resolved];
    counted(&state, states, params.into_inner()).await
}

/// Confirmed incidents not yet resolved.
#[utoipa::path(
    operation_id = "list_active_incidents",
    tag = "incidents",
    params(PageParams),
    responses(
        (status = 200, description = "A page", body = CountedPage),
        BadRequest, AdminErrors, StoreErrors,
    )
)]
#[get("/items/inconsistencies/active")]
pub async fn active(
    _reader: Reader,
    state: web::Data<AppState>,
    params: web::Query<PageParams>,
) -> Result<HttpResponse, ApiError> {
    let states = vec![State::Confirmed, State::Persistent];
    counted(&state, states, params.into_inner()).await
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Comma-separated states: detected, confirmed, persistent, resolved, transient.
    #[param(
        pattern = r"^ *((detected|confirmed|persistent|resolved|transient) *(, *(detected|confirmed|persistent|resolved|transient) *)*)?$"
    )]
    state: Option<String>,
    /// A Redis key, exactly.
    #[param(pattern = r"^[^\u0000]*$")]
    key: Option<String>,
    /// An entity's name in the ENTITIES file.
    #[param(pattern = r"^[^\u0000]*$")]
    entity: Option<String>,
    /// Page size, 50 unless given.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// The `next` value of the previous page.
    after: Option<i64>,
}

/// Every incident, Detected and Transient included, newest first.
#[utoipa::path(
    operation_id = "list_incidents",
    tag = "incidents",
    params(ListParams),
    responses(
        (status = 200, description = "A page", body = IncidentPage),
        BadRequest, AdminErrors, StoreErrors,
    )
)]
#[get("/inconsistencies")]
pub async fn list(
    _reader: Reader,
    state: web::Data<AppState>,
    params: web::Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let p = params.into_inner();
    // PostgreSQL text cannot hold NUL: it would refuse the query, not match nothing.
    for (name, value) in [("key", &p.key), ("entity", &p.entity)] {
        if value.as_deref().is_some_and(|v| v.contains('\0')) {
            return Err(ApiError::BadRequest(format!(
                "{name} must not contain the NUL character (U+0000)"
            )));
        }
    }
    let states = match p.state.as_deref().map(str::trim) {
        None | Some("") => Vec::new(),
        Some(s) => s
            .split(',')
            .map(|s| {
                State::parse(s.trim()).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "unknown state {s:?}: use detected, confirmed, persistent, resolved or transient"
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let query = ListQuery {
        states,
        key: p.key,
        entity: p.entity,
        before_id: p.after,
        limit: page_size(p.limit)?,
    };
    let page = page(&state, query, false).await?;
    Ok(HttpResponse::Ok().json(json!({ "data": page.data, "next": page.next })))
}

/// Rewrites the incident's key from PostgreSQL, in its entity's representation, and checks
/// it: a match resolves the incident with cause `refresh`. Returns the incident as it then is.
#[utoipa::path(
    operation_id = "refresh_incident",
    tag = "incidents",
    params(("id" = i64, Path, description = "The incident's id")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The incident after the refresh", body = IncidentDoc),
        BadRequest, AdminErrors, NotFoundError, StoreErrors,
    )
)]
#[post("/inconsistencies/{id}/refresh")]
pub async fn refresh(
    _admin: Admin,
    state: web::Data<AppState>,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let find = async || {
        db::idempotent(&state.pool, async |conn| incidents::by_id(conn, id).await)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no incident {id}")))
    };
    let row = find().await?;
    state
        .checker()
        .await?
        .refresh(&row.entity, &row.cache_key)
        .await?;
    Ok(HttpResponse::Ok().json(IncidentView::from(find().await?)))
}

/// One incident.
#[utoipa::path(
    operation_id = "get_incident",
    tag = "incidents",
    params(("id" = i64, Path, description = "The incident's id")),
    responses(
        (status = 200, description = "The incident", body = IncidentDoc),
        BadRequest, AdminErrors, NotFoundError, StoreErrors,
    )
)]
#[get("/inconsistencies/{id}")]
pub async fn one(
    _reader: Reader,
    state: web::Data<AppState>,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let row = db::idempotent(&state.pool, async |conn| incidents::by_id(conn, id).await)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no incident {id}")))?;
    Ok(HttpResponse::Ok().json(IncidentView::from(row)))
}

#[cfg(test)]
pub(crate) mod tests {
    use chrono::{TimeZone, Utc};
    use serde_json::Value;

    use super::*;

    /// A view of a resolved incident, for other modules' tests.
    pub(crate) fn view() -> IncidentView {
        IncidentView::from(row())
    }

    fn row() -> IncidentRow {
        let at = |s: i64| Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap();
        IncidentRow {
            id: 7,
            cache_key: "app:item:1".into(),
            entity: "item".into(),
            entity_id: "1".into(),
            state: "resolved".into(),
            kind: "stale".into(),
            db_version: Some(2),
            cache_version: Some(1),
            db_value: Some(r#"{"name":"new","version":2}"#.into()),
            cache_value: Some(r#"{"name":"old","version":1}"#.into()),
            diff: "version: 1 -> 2".into(),
            first_seen_at: at(0),
            confirm_due_at: at(5),
            confirmed_at: Some(at(5)),
            last_seen_at: at(6),
            resolved_at: Some(at(10)),
            resolution: Some("refresh".into()),
            observations: 2,
            rewritten_at: None,
            rewrite_cause: None,
        }
    }

    #[test]
    fn the_view_keeps_the_names_and_shows_snapshots_as_json() {
        let view = serde_json::to_value(IncidentView::from(row())).unwrap();
        let mut names: Vec<&str> = view
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "cache_value",
                "cache_version",
                "confirm_due_at",
                "confirmed_at",
                "db_value",
                "db_version",
                "diff",
                "duration_ms",
                "entity",
                "entity_id",
                "first_seen_at",
                "id",
                "key",
                "kind",
                "last_seen_at",
                "observations",
                "resolution",
                "resolved_at",
                "state",
            ],
            "the same 19 fields as before: {view}"
        );
        assert_eq!(view["key"], "app:item:1");
        assert_eq!(view["db_value"], json!({ "name": "new", "version": 2 }));
        assert_eq!(view["cache_value"], json!({ "name": "old", "version": 1 }));
        assert_eq!(view["diff"], "version: 1 -> 2");
        assert_eq!(view["duration_ms"], 10_000);
        assert_eq!(view["confirmed_at"], "2023-11-14T22:13:25Z");
    }

    #[test]
    fn snapshots_that_are_not_json_stay_text_and_absent_ones_null() {
        let mut r = row();
        let cut = format!("{{\"value\":\"{}", "x".repeat(incidents::SNAPSHOT_CAP));
        r.db_value = Some(incidents::cap(cut.clone(), incidents::SNAPSHOT_CAP));
        r.cache_value = Some("not json \u{fffd}".into());
        let view = serde_json::to_value(IncidentView::from(r)).unwrap();
        assert_eq!(view["db_value"], json!(&cut[..incidents::SNAPSHOT_CAP]));
        assert_eq!(view["cache_value"], "not json \u{fffd}");

        let mut r = row();
        (r.db_value, r.cache_value) = (None, Some("42".into()));
        let view = serde_json::to_value(IncidentView::from(r)).unwrap();
        assert_eq!(view["db_value"], Value::Null);
        assert_eq!(view["cache_value"], 42);
    }
}
