//! Every error leaves the API as JSON `{"error": {"code", "message"}}`.
//!
//! Client input gets a 4xx; a store that is down or busy a 503. A 500 is never the client's
//! fault: either a stored row this service cannot read (`undecodable_row`, which names the
//! row), or a fault of ours (`internal`), logged at ERROR with an `error_id` that the
//! response carries too, so a report can be matched to its log line without the response
//! showing SQL or server internals.

use actix_web::{
    error::{JsonPayloadError, PathError, QueryPayloadError},
    http::{header, StatusCode},
    HttpRequest, HttpResponse, ResponseError,
};
use serde::Serialize;
use stalewatch_core::{cache::CacheError, check::CheckError, db::DbError};
use utoipa::ToSchema;
use uuid::Uuid;

/// How long a client should wait before retrying a 503, in seconds.
const RETRY_AFTER_SECS: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// A path that exists, with a method it does not take: the methods it takes.
    #[error("{} takes {}", .path, .allowed.join(", "))]
    MethodNotAllowed {
        path: String,
        allowed: Vec<&'static str>,
    },
    /// A mutating route without the admin token (or with a wrong one).
    #[error("{0}")]
    Unauthorized(String),
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// The client did not send its whole body in time (`crate::deadline`).
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Invalid(String),
    /// The write collides with an existing row.
    #[error("{0}")]
    Conflict(String),
    /// PostgreSQL or Redis cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// Concurrent writers kept changing the same record; retrying is expected to succeed.
    #[error("{0}")]
    Contended(String),
    /// A stored row this service cannot decode: data written straight into PostgreSQL.
    #[error("{0}; it was stored by something other than this service and must be fixed in PostgreSQL (the request itself is fine)")]
    UndecodableRow(String),
    /// A fault of ours. `detail` goes to the log only, never to the client.
    #[error("internal error {error_id}: the server log has the details under this error_id")]
    Internal { error_id: Uuid, detail: String },
}

impl ApiError {
    /// A fresh internal error, with its own id.
    pub fn internal(detail: impl Into<String>) -> Self {
        ApiError::Internal {
            error_id: Uuid::new_v4(),
            detail: detail.into(),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::Timeout(_) => "request_timeout",
            ApiError::Invalid(_) => "invalid",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Contended(_) => "contended",
            ApiError::UndecodableRow(_) => "undecodable_row",
            ApiError::Internal { .. } => "internal",
        }
    }

    /// The body of the response.
    pub fn body(&self) -> serde_json::Value {
        let error_id = match self {
            ApiError::Internal { error_id, .. } => Some(*error_id),
            _ => None,
        };
        serde_json::to_value(ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
                error_id,
            },
        })
        .expect("an error body always serialises")
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// What kind of error, for programs.
    #[schema(value_type = ErrorCode)]
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// Only on `internal` errors: the server log has the details under this id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_id: Option<Uuid>,
}

/// The values of [`ApiError::code`], for the OpenAPI document (a test holds them together).
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // A description only.
pub enum ErrorCode {
    BadRequest,
    NotFound,
    MethodNotAllowed,
    Unauthorized,
    PayloadTooLarge,
    RequestTimeout,
    Invalid,
    Conflict,
    Unavailable,
    Contended,
    UndecodableRow,
    Internal,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) | ApiError::Contended(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UndecodableRow(_) | ApiError::Internal { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            ApiError::Internal { error_id, detail } => {
                tracing::error!(%error_id, error = %detail, "internal error");
            }
            ApiError::UndecodableRow(message) => {
                tracing::error!(error = %message, "stored row cannot be decoded");
            }
            _ => {}
        }
        let mut response = HttpResponse::build(self.status_code());
        if self.status_code() == StatusCode::SERVICE_UNAVAILABLE {
            response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS));
        }
        match self {
            ApiError::Unauthorized(_) => {
                response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            ApiError::MethodNotAllowed { allowed, .. } => {
                response.insert_header((header::ALLOW, allowed.join(", ")));
            }
            // The rest of the body may still be on its way: the connection cannot be reused.
            ApiError::Timeout(_) => {
                response.insert_header((header::CONNECTION, "close"));
            }
            _ => {}
        }
        response.json(self.body())
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
            DbError::Contended(_) => ApiError::Contended(e.to_string()),
            DbError::Conflict(_) => ApiError::Conflict(e.to_string()),
            DbError::Rejected(_) => ApiError::Invalid(e.to_string()),
            DbError::Undecodable { .. } => ApiError::UndecodableRow(e.to_string()),
            // The text may quote SQL: it goes to the log only.
            DbError::Query(_) | DbError::Migration(_) => ApiError::internal(e.to_string()),
        }
    }
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl From<CheckError> for ApiError {
    fn from(e: CheckError) -> Self {
        match e {
            CheckError::Db(e) => e.into(),
            CheckError::Cache(e) => e.into(),
            CheckError::UnknownEntity(_) | CheckError::ForeignKey { .. } => {
                ApiError::NotFound(e.to_string())
            }
        }
    }
}

// The error responses of the OpenAPI document, in groups that routes share.

/// A client error in the path, the query or the body.
#[derive(utoipa::IntoResponses)]
pub enum BadRequest {
    /// A path or query parameter that does not parse, an unknown query parameter, malformed
    /// JSON, or a body without `Content-Type: application/json`.
    #[response(status = 400)]
    BadRequest(ErrorBody),
}

/// What a route reading a JSON body adds.
#[derive(utoipa::IntoResponses)]
pub enum BodyErrors {
    /// The body did not arrive within HTTP_CLIENT_TIMEOUT_MS.
    #[response(status = 408)]
    Timeout(ErrorBody),
    /// The body is larger than 256 KiB.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// Well-formed JSON of the wrong shape, or values refused (an empty name, a NUL character).
    #[response(status = 422)]
    Invalid(ErrorBody),
}

#[derive(utoipa::IntoResponses)]
pub enum NotFoundError {
    /// No such item or incident.
    #[response(status = 404)]
    NotFound(ErrorBody),
}

#[derive(utoipa::IntoResponses)]
pub enum AdminErrors {
    /// No `Authorization: Bearer <ADMIN_TOKEN>`, or a wrong one (the mutating routes always;
    /// the read routes under `READ_ACCESS=token`).
    #[response(status = 401, headers(("WWW-Authenticate" = String)))]
    Unauthorized(ErrorBody),
}

#[derive(utoipa::IntoResponses)]
pub enum ConflictError {
    /// The write collides with an existing row.
    #[response(status = 409)]
    Conflict(ErrorBody),
}

/// What any route that reads the stores may answer.
#[derive(utoipa::IntoResponses)]
pub enum StoreErrors {
    /// A stored row this service cannot decode (`undecodable_row`), or a fault of ours
    /// (`internal`, with an `error_id` the server log has too).
    #[response(status = 500)]
    Internal(ErrorBody),
    /// PostgreSQL or Redis cannot be reached (`unavailable`), or concurrent writers kept
    /// colliding (`contended`): retry after Retry-After seconds.
    #[response(status = 503, headers(("Retry-After" = String, description = "seconds")))]
    Unavailable(ErrorBody),
}

/// Malformed JSON is a 400, well-formed JSON of the wrong shape a 422, too big a 413.
pub fn json_error(err: JsonPayloadError, _req: &HttpRequest) -> actix_web::Error {
    let api = match &err {
        JsonPayloadError::OverflowKnownLength { limit, .. } => ApiError::TooLarge(*limit),
        JsonPayloadError::Overflow { limit } => ApiError::TooLarge(*limit),
        JsonPayloadError::ContentType => {
            ApiError::BadRequest("expected Content-Type: application/json".into())
        }
        JsonPayloadError::Payload(e) if crate::deadline::is_timeout(e) => {
            ApiError::Timeout(e.to_string())
        }
        JsonPayloadError::Deserialize(e) if e.is_data() => ApiError::Invalid(e.to_string()),
        JsonPayloadError::Deserialize(e) => ApiError::BadRequest(format!("malformed JSON: {e}")),
        other => ApiError::BadRequest(other.to_string()),
    };
    api.into()
}

pub fn path_error(err: PathError, _req: &HttpRequest) -> actix_web::Error {
    ApiError::BadRequest(format!("bad path parameter: {err}")).into()
}

pub fn query_error(err: QueryPayloadError, _req: &HttpRequest) -> actix_web::Error {
    ApiError::BadRequest(format!("bad query string: {err}")).into()
}

/// Longest part of a path quoted back in a 404: a 20 KB URL is not echoed whole.
const QUOTED_PATH: usize = 200;

/// Unknown routes answer in the same JSON shape: a 405 with `Allow` for a path that takes
/// other methods, else a 404.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    let path = req.path();
    let quoted = match path.char_indices().nth(QUOTED_PATH) {
        Some((cut, _)) => format!("{}... ({} bytes)", &path[..cut], path.len()),
        None => path.to_string(),
    };
    let allowed = crate::openapi::methods_of(path);
    if !allowed.is_empty() {
        return ApiError::MethodNotAllowed {
            path: quoted,
            allowed,
        }
        .error_response();
    }
    ApiError::NotFound(format!("no route for {} {quoted}", req.method())).error_response()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use actix_web::body::MessageBody;
    use diesel::result::{DatabaseErrorInformation, DatabaseErrorKind, Error as DieselError};
    use serde_json::Value;
    use tracing::{
        field::{Field, Visit},
        span, Event, Level, Metadata, Subscriber,
    };

    use super::*;

    /// A database error as diesel reports a server's ERROR message.
    #[derive(Debug)]
    struct Info(&'static str);

    impl DatabaseErrorInformation for Info {
        fn message(&self) -> &str {
            self.0
        }
        fn details(&self) -> Option<&str> {
            None
        }
        fn hint(&self) -> Option<&str> {
            None
        }
        fn table_name(&self) -> Option<&str> {
            None
        }
        fn column_name(&self) -> Option<&str> {
            None
        }
        fn constraint_name(&self) -> Option<&str> {
            None
        }
        fn statement_position(&self) -> Option<i32> {
            None
        }
    }

    fn database_error(kind: DatabaseErrorKind, message: &'static str) -> DbError {
        DbError::from(DieselError::DatabaseError(kind, Box::new(Info(message))))
    }

    /// Status, body and Retry-After of the response an error becomes.
    fn respond(e: ApiError) -> (StatusCode, Value, Option<String>) {
        let response = e.error_response();
        let status = response.status();
        let retry = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = response
            .into_body()
            .try_into_bytes()
            .expect("a complete body");
        (status, serde_json::from_slice(&bytes).unwrap(), retry)
    }

    #[test]
    fn each_database_error_class_has_its_own_status_and_code() {
        let undecodable = DbError::Undecodable {
            what: "item 0197c5a4-0000-7000-8000-000000000000".into(),
            reason: "its value is not JSON this service can read (recursion limit exceeded)".into(),
        };
        let cases: Vec<(&str, DbError, StatusCode, &str)> = vec![
            (
                "pool timeout",
                DbError::Unavailable("timed out waiting for a connection".into()),
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
            (
                "lost connection",
                database_error(
                    DatabaseErrorKind::ClosedConnection,
                    "server closed the connection",
                ),
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
            (
                "admin shutdown",
                database_error(
                    DatabaseErrorKind::Unknown,
                    "terminating connection due to administrator command",
                ),
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
            (
                "contended",
                DbError::Contended("item:1".into()),
                StatusCode::SERVICE_UNAVAILABLE,
                "contended",
            ),
            (
                "serialization failure",
                database_error(
                    DatabaseErrorKind::SerializationFailure,
                    "could not serialize access due to concurrent update",
                ),
                StatusCode::SERVICE_UNAVAILABLE,
                "contended",
            ),
            (
                "unique violation",
                database_error(
                    DatabaseErrorKind::UniqueViolation,
                    "duplicate key value violates unique constraint \"items_pkey\"",
                ),
                StatusCode::CONFLICT,
                "conflict",
            ),
            (
                "check violation",
                database_error(
                    DatabaseErrorKind::CheckViolation,
                    "new row for relation \"items\" violates check constraint",
                ),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
            ),
            (
                "NUL in jsonb",
                database_error(
                    DatabaseErrorKind::Unknown,
                    "unsupported Unicode escape sequence",
                ),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
            ),
            (
                "NUL in text",
                database_error(
                    DatabaseErrorKind::Unknown,
                    "invalid byte sequence for encoding \"UTF8\": 0x00",
                ),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
            ),
            (
                "undecodable row",
                undecodable,
                StatusCode::INTERNAL_SERVER_ERROR,
                "undecodable_row",
            ),
            (
                "unclassified server error",
                database_error(
                    DatabaseErrorKind::Unknown,
                    "syntax error at or near \"SELEC\"",
                ),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
            ),
            (
                "diesel fault",
                DbError::from(DieselError::QueryBuilderError("bad query".into())),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
            ),
            (
                "migration",
                DbError::Migration("relation \"items\" already exists".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
            ),
        ];
        for (what, db, status, code) in cases {
            let connection_level = matches!(db, DbError::Unavailable(_));
            let (got, body, retry) = respond(db.into());
            assert_eq!(
                (got, body["error"]["code"].as_str()),
                (status, Some(code)),
                "{what}: {body}"
            );
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{what}: {body}"
            );
            assert_eq!(
                code == "unavailable",
                connection_level,
                "{what}: only a connection-level error is `unavailable`"
            );
            assert_eq!(
                retry.is_some(),
                status == StatusCode::SERVICE_UNAVAILABLE,
                "{what}"
            );
            assert_eq!(
                body["error"].get("error_id").is_some(),
                code == "internal",
                "{what}: {body}"
            );
        }
    }

    #[test]
    fn an_undecodable_row_is_named_and_not_blamed_on_the_request() {
        let (_, body, _) = respond(
            DbError::Undecodable {
                what: "item 0197c5a4-0000-7000-8000-000000000000".into(),
                reason: "its value is not JSON this service can read (recursion limit exceeded)"
                    .into(),
            }
            .into(),
        );
        let message = body["error"]["message"].as_str().unwrap();
        for part in [
            "item 0197c5a4-0000-7000-8000-000000000000",
            "recursion limit exceeded",
            "PostgreSQL",
            "request itself is fine",
        ] {
            assert!(message.contains(part), "{part:?} missing from {message:?}");
        }
    }

    #[test]
    fn cache_errors_are_unavailable() {
        let e = CacheError::from(redis::RedisError::from((
            redis::ErrorKind::Io,
            "connection refused",
        )));
        let (status, body, _) = respond(e.into());
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"]["code"], "unavailable");
    }

    /// Collects the fields of ERROR events.
    #[derive(Default, Clone)]
    struct Capture(Arc<Mutex<Vec<String>>>);

    struct Fields(String);

    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.push_str(&format!(" {}={:?}", field.name(), value));
        }
    }

    impl Subscriber for Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
            span::Id::from_u64(1)
        }
        fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
        fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
        fn event(&self, event: &Event<'_>) {
            if *event.metadata().level() == Level::ERROR {
                let mut fields = Fields(String::new());
                event.record(&mut fields);
                self.0.lock().unwrap().push(fields.0);
            }
        }
        fn enter(&self, _: &span::Id) {}
        fn exit(&self, _: &span::Id) {}
    }

    #[test]
    fn an_internal_error_shows_an_id_that_is_in_the_log_and_no_sql() {
        let db = database_error(
            DatabaseErrorKind::Unknown,
            "column \"secret_column\" does not exist",
        );
        let capture = Capture::default();
        let (status, body, _) =
            tracing::subscriber::with_default(capture.clone(), || respond(db.into()));
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"]["code"], "internal");
        let id: Uuid = body["error"]["error_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no UUID error_id: {body}"));
        assert_eq!(id.get_version_num(), 4);
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(&id.to_string()), "{message}");
        assert!(
            !message.contains("secret_column"),
            "leaks the server's text: {message}"
        );

        let logged = capture.0.lock().unwrap().clone();
        assert_eq!(logged.len(), 1, "one ERROR line: {logged:?}");
        assert!(logged[0].contains(&id.to_string()), "{logged:?}");
        assert!(
            logged[0].contains("secret_column"),
            "the log has the detail: {logged:?}"
        );

        // Every internal error gets an id of its own.
        let again = ApiError::from(DbError::Migration("x".into())).body();
        assert_ne!(again["error"]["error_id"], body["error"]["error_id"]);
    }
}
