//! Incidents, as the prototype listed them and with filters and keyset pagination.

use actix_web::{get, web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use stalewatch_core::{
    db::incidents::{self, IncidentRow, ListQuery},
    incident::State,
};

use crate::{error::ApiError, state::AppState};

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

/// One incident as the API shows it.
#[derive(Debug, Serialize)]
pub struct IncidentView {
    pub id: i64,
    pub state: String,
    pub key: String,
    pub entity: String,
    pub entity_id: String,
    pub kind: String,
    pub db_version: Option<i64>,
    pub cache_version: Option<i64>,
    pub db_value: Option<String>,
    pub cache_value: Option<String>,
    pub diff: String,
    pub observations: i64,
    pub first_seen_at: DateTime<Utc>,
    pub confirm_due_at: DateTime<Utc>,
    pub confirmed_at: Option<DateTime<Utc>>,
    pub last_seen_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolution: Option<String>,
    /// From detection to closure, or to now while open.
    pub duration_ms: i64,
}

impl From<IncidentRow> for IncidentView {
    fn from(r: IncidentRow) -> Self {
        let end = r.resolved_at.unwrap_or_else(Utc::now);
        Self {
            duration_ms: (end - r.first_seen_at).num_milliseconds().max(0),
            id: r.id,
            state: r.state,
            key: r.cache_key,
            entity: r.entity,
            entity_id: r.entity_id,
            kind: r.kind,
            db_version: r.db_version,
            cache_version: r.cache_version,
            db_value: r.db_value,
            cache_value: r.cache_value,
            diff: r.diff,
            observations: r.observations,
            first_seen_at: r.first_seen_at,
            confirm_due_at: r.confirm_due_at,
            confirmed_at: r.confirmed_at,
            last_seen_at: r.last_seen_at,
            resolved_at: r.resolved_at,
            resolution: r.resolution,
        }
    }
}

async fn fetch(state: &AppState, query: ListQuery) -> Result<Vec<IncidentView>, ApiError> {
    let mut conn = state
        .pool
        .get()
        .await
        .map_err(stalewatch_core::db::DbError::from)?;
    let rows = incidents::list(&mut conn, &query).await?;
    Ok(rows.into_iter().map(IncidentView::from).collect())
}

/// Confirmed incidents, open or closed: what the prototype called inconsistencies.
#[get("/items/inconsistencies/all")]
pub async fn all(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let mut rows = fetch(
        &state,
        ListQuery {
            states: vec![State::Confirmed, State::Persistent, State::Resolved],
            limit: MAX_LIMIT,
            ..Default::default()
        },
    )
    .await?;
    // Resolved incidents that were never confirmed don't exist (Detected closes as
    // Transient), so this keeps exactly the confirmed ones.
    rows.retain(|r| r.confirmed_at.is_some());
    Ok(HttpResponse::Ok().json(json!({ "count": rows.len(), "data": rows })))
}

/// Confirmed incidents not yet resolved.
#[get("/items/inconsistencies/active")]
pub async fn active(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let rows = fetch(
        &state,
        ListQuery {
            states: vec![State::Confirmed, State::Persistent],
            limit: MAX_LIMIT,
            ..Default::default()
        },
    )
    .await?;
    Ok(HttpResponse::Ok().json(json!({ "count": rows.len(), "data": rows })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Comma-separated states.
    state: Option<String>,
    key: Option<String>,
    limit: Option<i64>,
    /// The `next` value of the previous page.
    after: Option<i64>,
}

/// Every incident, Detected and Transient included, newest first.
#[get("/inconsistencies")]
pub async fn list(
    state: web::Data<AppState>,
    params: web::Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let p = params.into_inner();
    let states = match p.state.as_deref() {
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
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let rows = fetch(
        &state,
        ListQuery {
            states,
            key: p.key,
            before_id: p.after,
            limit,
        },
    )
    .await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    Ok(HttpResponse::Ok().json(json!({ "data": rows, "next": next })))
}

#[get("/inconsistencies/{id}")]
pub async fn one(state: web::Data<AppState>, id: web::Path<i64>) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let mut conn = state
        .pool
        .get()
        .await
        .map_err(stalewatch_core::db::DbError::from)?;
    let row = incidents::by_id(&mut conn, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no incident {id}")))?;
    Ok(HttpResponse::Ok().json(IncidentView::from(row)))
}
