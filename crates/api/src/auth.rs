//! The admin token of the mutating routes (the refreshes: they rewrite cache keys), and of
//! the read routes under `READ_ACCESS=token` ([`Reader`]).
//!
//! A handler takes [`Admin`] as its first argument: the request must carry
//! `Authorization: Bearer <ADMIN_TOKEN>`, compared in constant time, or it gets a 401 in the
//! API's error format before anything else of it is read. Under `ADMIN_TOKEN=disabled` (a
//! demo) anyone may. Either way a body, if the request has one, must be declared JSON: the
//! refreshes take none, and this refuses a cross-site `text/plain` form post even with the
//! token disabled (with the token required, a cross-site form cannot set the Authorization
//! header at all).

use std::future::{ready, Ready};

use actix_web::{dev::Payload, http::header, web, FromRequest, HttpRequest};
use stalewatch_core::config::{AdminToken, ReadAccess};
use subtle::ConstantTimeEq;

use crate::{error::ApiError, state::AppState};

/// Proof that the request may use a mutating route.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Admin, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(check(req))
    }
}

/// Proof that the request may read incidents, stats and rebuild progress: anyone under
/// `READ_ACCESS=open` (the default), the admin token's holder under `READ_ACCESS=token`.
#[derive(Debug, Clone, Copy)]
pub struct Reader;

impl FromRequest for Reader {
    type Error = ApiError;
    type Future = Ready<Result<Reader, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(state(req).and_then(|state| match state.config.read_access {
            ReadAccess::Open => Ok(Reader),
            ReadAccess::Token => authorize(req, &state.config.admin_token).map(|()| Reader),
        }))
    }
}

fn state(req: &HttpRequest) -> Result<&web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::internal("no AppState registered"))
}

fn check(req: &HttpRequest) -> Result<Admin, ApiError> {
    authorize(req, &state(req)?.config.admin_token)?;
    if let Some(content_type) = req.headers().get(header::CONTENT_TYPE) {
        let json = content_type
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::BadRequest(
                "expected no body, or Content-Type: application/json".into(),
            ));
        }
    }
    Ok(Admin)
}

/// The bearer token, compared in constant time; anyone under `ADMIN_TOKEN=disabled`.
fn authorize(req: &HttpRequest, token: &AdminToken) -> Result<(), ApiError> {
    match token {
        AdminToken::Disabled => {}
        // Fail closed: a library user who built the state without a token gets no access.
        AdminToken::Unset => {
            return Err(ApiError::Unauthorized(
                "this route needs ADMIN_TOKEN, which is not configured on the server".into(),
            ))
        }
        AdminToken::Bearer(token) => {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes())
                .and_then(bearer);
            match given {
                None => {
                    return Err(ApiError::Unauthorized(
                        "this route needs an Authorization: Bearer <ADMIN_TOKEN> header".into(),
                    ))
                }
                // Constant time over the bytes: how much of a guess matches is not timed.
                // (Slices of different lengths compare unequal at once; the length is not
                // the secret.)
                Some(given) if bool::from(given.ct_eq(token.expose().as_bytes())) => {}
                Some(_) => return Err(ApiError::Unauthorized("wrong admin token".into())),
            }
        }
    }
    Ok(())
}

/// The token of an `Authorization: Bearer <token>` header (the scheme case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_token_is_read() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bear"), None);
    }
}
