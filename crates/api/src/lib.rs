//! stalewatch-api: the items API with cache-aside reads, and the incident API.

pub mod auth;
pub mod deadline;
pub mod enqueue;
pub mod error;
pub mod failure;
pub mod openapi;
pub mod routes;
pub mod state;
pub mod summary;

use actix_web::{middleware::from_fn, web};

/// Largest accepted JSON body.
pub const BODY_LIMIT: usize = 256 * 1024;

/// The whole application: routes, JSON error handling, shared state. Used by `main` and by
/// the in-process tests alike.
pub fn configure(state: state::AppState) -> impl FnOnce(&mut web::ServiceConfig) {
    let body_deadline = deadline::BodyDeadline(state.config.http_client_timeout);
    move |cfg| {
        cfg.app_data(web::Data::new(state))
            .app_data(
                web::JsonConfig::default()
                    .limit(BODY_LIMIT)
                    .error_handler(error::json_error),
            )
            .app_data(web::PathConfig::default().error_handler(error::path_error))
            .app_data(web::QueryConfig::default().error_handler(error::query_error))
            // A scope so that middleware can wrap the routes; unmatched paths still reach the
            // default service below.
            .service(
                web::scope("")
                    .wrap(from_fn(move |req, next| body_deadline.apply(req, next)))
                    .configure(routes::configure),
            )
            .default_service(web::to(error::not_found));
    }
}
