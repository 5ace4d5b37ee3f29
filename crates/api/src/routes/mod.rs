//! The HTTP routes. The item routes keep the Node prototype's paths and body shapes, so its
//! clients work unchanged.

pub mod incidents;
pub mod items;
pub mod ops;
pub mod rebuild;

use actix_web::web;

/// Registers the routes in order and lists them in the OpenAPI document, both from one list:
/// a route cannot be served without being documented (and one without `#[utoipa::path]`
/// does not compile).
macro_rules! routes {
    ($($route:path),* $(,)?) => {
        /// Registers every route.
        pub fn configure(cfg: &mut web::ServiceConfig) {
            $(cfg.service($route);)*
        }

        /// Every route's operation, for [`crate::openapi::document`].
        #[derive(utoipa::OpenApi)]
        #[openapi(paths($($route),*))]
        pub struct Operations;
    };
}

// The fixed `/items/...` paths come before `/items/{id}` so that `inconsistencies` is never
// read as an item id.
routes![
    incidents::all,
    incidents::active,
    items::refresh_debug,
    items::create,
    items::get,
    items::update,
    items::delete,
    items::refresh,
    incidents::list,
    incidents::refresh,
    incidents::one,
    ops::healthz,
    ops::readyz,
    ops::metrics,
    ops::stats,
    rebuild::start,
    rebuild::progress,
    crate::openapi::openapi_json,
];
