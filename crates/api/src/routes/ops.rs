//! Health, readiness, metrics.

use actix_web::{get, web, HttpResponse};
use serde_json::json;
use stalewatch_core::{
    db,
    jobs::{CheckJob, ConfirmJob},
    queue, track,
};

use crate::{
    error::{ApiError, StoreErrors},
    state::AppState,
};

/// The process is up.
#[utoipa::path(
    operation_id = "healthz",
    tag = "operations",
    responses((status = 200, description = "Up", body = inline(Health)))
)]
#[get("/healthz")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// `{"status": "ok"}`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // A description only.
pub struct Health {
    status: String,
}

/// Each store: `ok`, or why not.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // A description only.
pub struct Readiness {
    postgres: String,
    /// stalewatch's own Redis (REDIS_URL): the queues.
    redis: String,
    /// The watched cache (CACHE_REDIS_URL, else REDIS_URL).
    cache: String,
}

/// PostgreSQL, stalewatch's Redis and the watched cache all answer.
#[utoipa::path(
    operation_id = "readyz",
    tag = "operations",
    responses(
        (status = 200, description = "All answer", body = inline(Readiness)),
        (status = 503, description = "One does not", body = inline(Readiness)),
    )
)]
#[get("/readyz")]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let own = async {
        redis::cmd("PING")
            .query_async::<String>(&mut state.queue_conn.clone())
            .await
            .map_err(|e| format!("stalewatch's Redis (REDIS_URL) is unavailable: {e}"))
    };
    let (pg, redis, cache) = tokio::join!(db::ping(&state.pool), own, state.cache.ping());
    let body = json!({
        "postgres": pg.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into()),
        "redis": redis.as_ref().map_or_else(|e| e.clone(), |_| "ok".into()),
        "cache": cache.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into()),
    });
    if pg.is_ok() && redis.is_ok() && cache.is_ok() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Refreshes the gauges that are read from the stores rather than counted in-process.
async fn refresh_gauges(state: &AppState) {
    let entities = match state.checker().await {
        Ok(checker) => checker.watched.names(),
        Err(_) => Vec::new(),
    };
    if let Err(e) = track::refresh_open_gauge(&state.pool, &state.metrics, &entities).await {
        tracing::debug!(error = %e, "open-incident gauge not refreshed");
    }
    let mut conn = state.queue_conn.clone();
    let keys = state.cache.keys();
    let _ = queue::report_depth::<CheckJob>(&mut conn, keys, &state.metrics).await;
    let _ = queue::report_depth::<ConfirmJob>(&mut conn, keys, &state.metrics).await;
}

/// The API process's metrics, in Prometheus's text format.
#[utoipa::path(
    operation_id = "metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text", body = String,
        content_type = "text/plain; version=0.0.4"))
)]
#[get("/metrics")]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    refresh_gauges(&state).await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

/// The deployment at a glance, read from the shared stores: open incidents by state and
/// entity, closures in the last hour and day, time to confirm, queue depths, the sweep's
/// rounds, and this API process's cache hit ratio. The per-process counters are on
/// `/metrics`.
#[utoipa::path(
    operation_id = "stats",
    tag = "operations",
    responses(
        (status = 200, description = "The summary", body = crate::summary::Summary),
        crate::error::AdminErrors, StoreErrors,
    )
)]
#[get("/stats")]
pub async fn stats(
    _reader: crate::auth::Reader,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(crate::summary::read(&state).await?))
}
