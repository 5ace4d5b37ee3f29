//! The HTTP routes. The item routes keep the Node prototype's paths and body shapes, so its
//! clients work unchanged.

pub mod incidents;
pub mod items;
pub mod ops;

use actix_web::web;

/// Registers every route. The fixed `/items/...` paths come before `/items/{id}` so that
/// `inconsistencies` is never read as an item id.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(incidents::all)
        .service(incidents::active)
        .service(items::refresh_debug)
        .service(items::create)
        .service(items::get)
        .service(items::update)
        .service(items::delete)
        .service(items::refresh)
        .service(incidents::list)
        .service(incidents::refresh)
        .service(incidents::one)
        .service(ops::healthz)
        .service(ops::readyz)
        .service(ops::metrics)
        .service(ops::stats);
}
