//! Rebuilding an entity's cache from the API: `POST /entities/{name}/rebuild` starts one in this
//! process (the same pass and lock as `stalewatch-worker rebuild`), `GET` reports how far it is.
//!
//! The lock is the deployment's (Redis), so a rebuild running anywhere (another API instance,
//! the command line) refuses a second one with 409 and names its holder. The progress is this
//! process's: a GET on another instance reports the lock's holder only.

use std::{
    collections::HashMap,
    sync::{atomic::AtomicBool, Arc, LazyLock, Mutex},
};

use actix_web::{get, post, web, HttpResponse};
use serde::Serialize;
use stalewatch_core::{
    lease::Lease,
    rebuild::{self, Progress, Rebuild, RebuildError, Summary},
};

use crate::{
    auth::Admin,
    error::{AdminErrors, ApiError, NotFoundError, StoreErrors},
    state::AppState,
};

/// A rebuild's state, as the routes report it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RebuildStatus {
    pub entity: String,
    /// `running`, `done` or `failed`; `elsewhere`: another process holds the lock.
    pub state: String,
    /// Keys done, and PostgreSQL's count of them before the pass.
    pub done: u64,
    pub estimated: u64,
    pub keys_per_second: f64,
    /// Seconds left at the rate so far.
    pub eta_seconds: Option<f64>,
    /// Who holds the entity's rebuild lock, if anyone.
    pub holder: Option<String>,
    /// The finished rebuild's summary.
    #[schema(value_type = Option<Object>)]
    pub summary: Option<serde_json::Value>,
    pub error: Option<String>,
}

impl RebuildStatus {
    fn new(entity: &str, state: &str) -> RebuildStatus {
        RebuildStatus {
            entity: entity.to_string(),
            state: state.to_string(),
            done: 0,
            estimated: 0,
            keys_per_second: 0.0,
            eta_seconds: None,
            holder: None,
            summary: None,
            error: None,
        }
    }

    fn progress(&mut self, p: &Progress) {
        self.done = p.done;
        self.estimated = p.estimated;
        self.keys_per_second = p.rate();
        self.eta_seconds = p.eta().map(|d| d.as_secs_f64());
    }

    fn finished(&mut self, result: Result<Summary, RebuildError>) {
        match result {
            Ok(summary) => {
                self.state = "done".into();
                self.done = summary.keys;
                self.keys_per_second = summary.keys_per_second;
                self.eta_seconds = Some(0.0);
                self.summary = serde_json::to_value(&summary).ok();
            }
            Err(e) => {
                self.state = "failed".into();
                self.error = Some(e.to_string());
            }
        }
        self.holder = None;
    }
}

/// The rebuilds this process started, by entity: the last one of each.
static STATUS: LazyLock<Mutex<HashMap<String, RebuildStatus>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn set(entity: &str, f: impl FnOnce(&mut RebuildStatus)) {
    let mut all = STATUS.lock().unwrap_or_else(|e| e.into_inner());
    let status = all
        .entry(entity.to_string())
        .or_insert_with(|| RebuildStatus::new(entity, "running"));
    f(status);
}

fn known(checker: &stalewatch_core::check::Checker, entity: &str) -> Result<(), ApiError> {
    if checker.watched.source(entity).is_none() {
        return Err(ApiError::NotFound(format!(
            "no entity {entity:?} in the ENTITIES file"
        )));
    }
    Ok(())
}

/// Starts a rebuild of the entity's keys from PostgreSQL in this process (REBUILD_BATCH,
/// REBUILD_LOCK_MS, REBUILD_PAUSE_MS), and answers at once with its status; 409 (with the
/// holder) if a rebuild of the entity is running anywhere.
#[utoipa::path(
    operation_id = "start_rebuild",
    tag = "operations",
    params(("name" = String, Path, description = "The entity, as named in the ENTITIES file")),
    security(("admin_token" = [])),
    responses(
        (status = 202, description = "Started", body = RebuildStatus),
        (status = 409, description = "A rebuild of the entity is running (the error names its holder)", body = crate::error::ErrorBody),
        AdminErrors, NotFoundError, StoreErrors,
    )
)]
#[post("/entities/{name}/rebuild")]
pub async fn start(
    _admin: Admin,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let entity = name.into_inner();
    let checker = state.checker().await?.clone();
    known(&checker, &entity)?;
    let holder = format!(
        "stalewatch-api pid {} since {}",
        std::process::id(),
        chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
    );
    let lease = match rebuild::lock(
        &state.queue_conn,
        checker.cache.keys(),
        &entity,
        state.config.rebuild_lock,
        &holder,
    )
    .await
    {
        Ok(lease) => lease,
        Err(e @ RebuildError::Locked { .. }) => return Err(ApiError::Conflict(e.to_string())),
        Err(e) => return Err(ApiError::Unavailable(e.to_string())),
    };
    let redis = match state.config.cache_redis() {
        Ok(target) => rebuild::connection(&target)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let redis = match redis {
        Ok(redis) => redis,
        Err(e) => {
            let _ = lease.release().await;
            return Err(ApiError::Unavailable(e));
        }
    };
    let mut status = RebuildStatus::new(&entity, "running");
    status.holder = Some(lease.token().to_string());
    STATUS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(entity.clone(), status.clone());

    let config = state.config.clone();
    tokio::spawn(async move {
        let lease = Arc::new(lease);
        let lost = Arc::new(AtomicBool::new(false));
        let renewer = tokio::spawn(rebuild::keep_renewed(lease.clone(), lost.clone()));
        let job = Rebuild {
            checker: &checker,
            entity: &entity,
            batch: config.rebuild_batch,
            pause: config.rebuild_pause,
            redis,
        };
        let result = job
            .run(&|| lost.load(std::sync::atomic::Ordering::Relaxed), |p| {
                set(&entity, |s| s.progress(p))
            })
            .await;
        if let Err(e) = &result {
            tracing::warn!(entity = %entity, error = %e, "rebuild failed");
        }
        renewer.abort();
        let _ = renewer.await;
        if let Ok(lease) = Arc::try_unwrap(lease) {
            let _ = lease.release().await;
        }
        set(&entity, |s| s.finished(result));
    });
    Ok(HttpResponse::Accepted().json(status))
}

/// How far the entity's rebuild is: this process's last one, and whoever holds the lock.
#[utoipa::path(
    operation_id = "rebuild_status",
    tag = "operations",
    params(("name" = String, Path, description = "The entity, as named in the ENTITIES file")),
    responses(
        (status = 200, description = "The last rebuild started here, or `elsewhere` / `none`", body = RebuildStatus),
        crate::error::AdminErrors, NotFoundError, StoreErrors,
    )
)]
#[get("/entities/{name}/rebuild")]
pub async fn progress(
    _reader: crate::auth::Reader,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let entity = name.into_inner();
    let checker = state.checker().await?;
    known(checker, &entity)?;
    let holder = Lease::holder(
        &state.queue_conn,
        &checker.cache.keys().rebuild_lock(&entity),
    )
    .await
    .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let mine = STATUS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&entity)
        .cloned();
    let status = match mine {
        Some(mut status) => {
            if status.state == "running" {
                status.holder = holder;
            }
            status
        }
        None => {
            let mut status = RebuildStatus::new(
                &entity,
                if holder.is_some() {
                    "elsewhere"
                } else {
                    "none"
                },
            );
            status.holder = holder;
            status
        }
    };
    Ok(HttpResponse::Ok().json(status))
}
