//! stalewatch-api: the items API with cache-aside reads, and the incident API.

pub mod auth;
pub mod enqueue;
pub mod error;
pub mod failure;
pub mod routes;
pub mod state;

use actix_web::web;

/// Largest accepted JSON body.
pub const BODY_LIMIT: usize = 256 * 1024;

/// The whole application: routes, JSON error handling, shared state. Used by `main` and by
/// the in-process tests alike.
pub fn configure(state: state::AppState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::new(state))
            .app_data(
                web::JsonConfig::default()
                    .limit(BODY_LIMIT)
                    .error_handler(error::json_error),
            )
            .app_data(web::PathConfig::default().error_handler(error::path_error))
            .app_data(web::QueryConfig::default().error_handler(error::query_error))
            .configure(routes::configure)
            .default_service(web::to(error::not_found));
    }
}
