//! The OpenAPI 3.1 document of the API, served at `/openapi.json`.
//!
//! The operations come from the handlers' `#[utoipa::path]` attributes, and the list of
//! them from the same macro call that registers the routes ([`crate::routes`]): a route
//! cannot be served without being documented. The bodies of this crate's own types are
//! derived from them; the two that core defines (an item, an incident) are described here,
//! and a test holds each description to the JSON the real type serialises to.

use std::sync::OnceLock;

use actix_web::{get, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::{
    openapi::{
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
        OpenApi as Document,
    },
    Modify, OpenApi, ToSchema,
};
use uuid::Uuid;

use crate::error::{ErrorBody, ErrorDetail};

/// The name of the admin token's security scheme.
pub const ADMIN_TOKEN: &str = "admin_token";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "stalewatch",
        description = "The demo items API (cache-aside reads, writes that ask for checks) and the \
            incident API of stalewatch, which finds divergences between PostgreSQL rows and \
            their Redis copies. Every error is `{\"error\": {\"code\", \"message\"}}` JSON, \
            except the empty 400, 431 and 408 that the HTTP parser writes for a request it \
            cannot read."
    ),
    components(schemas(ErrorBody, ErrorDetail, ItemDoc, IncidentDoc, JsonValue)),
    modifiers(&AdminTokenScheme),
    tags(
        (name = "items", description = "The demo application: cache-aside reads and writes"),
        (name = "incidents", description = "Divergences found, and their refresh"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    )
)]
struct Info;

/// The whole document: [`Info`] and every route's operation.
pub fn document() -> &'static Document {
    static DOC: OnceLock<Document> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = Info::openapi();
        doc.merge(crate::routes::Operations::openapi());
        doc
    })
}

/// The methods the document lists for `path` (whose segments match its templates', a
/// `{parameter}` matching any one segment), upper case. What a 405 answers with.
pub fn methods_of(path: &str) -> Vec<&'static str> {
    type Templates = Vec<(Vec<String>, Vec<&'static str>)>;
    static TEMPLATES: OnceLock<Templates> = OnceLock::new();
    let templates = TEMPLATES.get_or_init(|| {
        let doc = serde_json::to_value(document()).expect("the document serialises");
        let paths = doc["paths"].as_object().cloned().unwrap_or_default();
        paths
            .into_iter()
            .map(|(template, item)| {
                let segments = template.split('/').map(String::from).collect();
                let methods = ["get", "put", "post", "delete", "patch"]
                    .into_iter()
                    .filter(|m| item.get(*m).is_some())
                    .map(|m| match m {
                        "get" => "GET",
                        "put" => "PUT",
                        "post" => "POST",
                        "delete" => "DELETE",
                        _ => "PATCH",
                    })
                    .collect();
                (segments, methods)
            })
            .collect()
    });
    let segments: Vec<&str> = path.split('/').collect();
    let mut allowed: Vec<&'static str> = templates
        .iter()
        .filter(|(template, _)| {
            template.len() == segments.len()
                && template.iter().zip(&segments).all(|(t, s)| {
                    t == s || (t.starts_with('{') && t.ends_with('}') && !s.is_empty())
                })
        })
        .flat_map(|(_, methods)| methods.iter().copied())
        .collect();
    allowed.sort_unstable();
    allowed.dedup();
    allowed
}

/// This document.
#[utoipa::path(
    operation_id = "openapi",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json"))
)]
#[get("/openapi.json")]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(document())
}

/// The bearer token of the mutating routes (`ADMIN_TOKEN`).
struct AdminTokenScheme;

impl Modify for AdminTokenScheme {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            ADMIN_TOKEN,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "ADMIN_TOKEN. Not required when the server runs with ADMIN_TOKEN=disabled (a demo).",
                    ))
                    .build(),
            ),
        );
    }
}

/// Any JSON value PostgreSQL's jsonb can store: no NUL character (U+0000) in a string or an
/// object key, at any depth. What an item's `value` may be.
pub struct JsonValue;

impl utoipa::PartialSchema for JsonValue {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let no_nul = serde_json::json!({ "type": "string", "pattern": "^[^\\u0000]*$" });
        let itself = serde_json::json!({ "$ref": "#/components/schemas/JsonValue" });
        let schema = serde_json::json!({
            "description": "Any JSON value without a NUL character (U+0000) in a string or a key",
            "anyOf": [
                { "type": "null" },
                { "type": "boolean" },
                { "type": "number" },
                no_nul,
                { "type": "array", "items": itself },
                { "type": "object", "propertyNames": no_nul, "additionalProperties": itself },
            ]
        });
        utoipa::openapi::RefOr::T(serde_json::from_value(schema).expect("a valid schema"))
    }
}

impl ToSchema for JsonValue {}

/// An item (`stalewatch_core::db::items::Item`).
#[derive(Serialize, ToSchema)]
#[schema(as = Item)]
#[allow(dead_code)] // A description only: never built.
pub struct ItemDoc {
    id: Uuid,
    name: String,
    /// Any JSON value.
    #[schema(value_type = Value)]
    value: Value,
    /// Raised by one with every update.
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// An incident (`stalewatch_core::db::incidents::IncidentRow` with `duration_ms`,
/// `crate::routes::incidents::IncidentView`).
#[derive(Serialize, ToSchema)]
#[schema(as = Incident)]
#[allow(dead_code)] // A description only: never built.
pub struct IncidentDoc {
    id: i64,
    /// The Redis key.
    key: String,
    /// The entity's name in the ENTITIES file.
    entity: String,
    entity_id: String,
    /// detected, confirmed, persistent, resolved or transient.
    state: String,
    /// What was found: stale, missing, orphan, ...
    kind: String,
    db_version: Option<i64>,
    cache_version: Option<i64>,
    /// The row as PostgreSQL had it: a JSON document, a string when the snapshot holds none
    /// (cut at its cap, or not JSON), null when there was no row.
    #[schema(value_type = Option<Value>)]
    db_value: Option<Value>,
    /// The cached value, as `db_value`.
    #[schema(value_type = Option<Value>)]
    cache_value: Option<Value>,
    /// What differs, one line per difference, control characters escaped.
    diff: String,
    first_seen_at: DateTime<Utc>,
    confirm_due_at: DateTime<Utc>,
    confirmed_at: Option<DateTime<Utc>>,
    last_seen_at: DateTime<Utc>,
    resolved_at: Option<DateTime<Utc>>,
    /// How it closed: write, refresh, repair, invalidation or natural.
    resolution: Option<String>,
    observations: i64,
    /// From detection to closure, or to now while open.
    duration_ms: i64,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;

    use super::*;

    /// The property names of a component schema, and which of them are required.
    fn properties(name: &str) -> (BTreeSet<String>, BTreeSet<String>) {
        let doc = serde_json::to_value(document()).unwrap();
        let schema = &doc["components"]["schemas"][name];
        let names = schema["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no schema {name}: {schema}"))
            .keys()
            .cloned()
            .collect();
        let required = schema["required"]
            .as_array()
            .map(|r| r.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        (names, required)
    }

    fn keys(v: &Value) -> BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    #[test]
    fn the_item_schema_names_the_fields_an_item_serialises_to() {
        let item = stalewatch_core::db::items::Item {
            id: Uuid::now_v7(),
            name: "a".into(),
            value: json!({ "n": 1 }),
            version: 1,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        };
        let (names, required) = properties("Item");
        let serialised = keys(&serde_json::to_value(&item).unwrap());
        assert_eq!(names, serialised);
        assert_eq!(required, serialised, "every field is always present");
    }

    #[test]
    fn the_incident_schema_names_the_fields_an_incident_serialises_to() {
        let view = crate::routes::incidents::tests::view();
        let (names, _) = properties("Incident");
        assert_eq!(names, keys(&serde_json::to_value(&view).unwrap()));
    }

    /// Every `#[get("...")]`-style route attribute in the route modules (every file under
    /// `src/routes`, a new one included) and here, as (method, path).
    fn declared_routes() -> Vec<(String, String)> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![src.join("openapi.rs")];
        for entry in std::fs::read_dir(src.join("routes")).unwrap() {
            files.push(entry.unwrap().path());
        }
        let mut routes = Vec::new();
        for file in files {
            let source = std::fs::read_to_string(&file).unwrap();
            for line in source.lines().map(str::trim) {
                for method in ["get", "post", "put", "delete", "patch", "head", "route"] {
                    let Some(rest) = line.strip_prefix(&format!("#[{method}(\"")) else {
                        continue;
                    };
                    let path = rest.split('"').next().unwrap().to_string();
                    routes.push((method.to_string(), path));
                }
            }
        }
        routes
    }

    /// The (method, path) of every operation in the document.
    fn documented() -> BTreeSet<(String, String)> {
        let doc = serde_json::to_value(document()).unwrap();
        let mut ops = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                ops.insert((method.clone(), path.clone()));
            }
        }
        ops
    }

    #[test]
    fn every_route_is_in_the_document_and_nothing_else() {
        let declared = declared_routes();
        assert!(
            declared.len() >= 16,
            "the source scan finds the routes: {declared:?}"
        );
        let documented = documented();
        for route in &declared {
            assert!(
                documented.contains(route),
                "{route:?} is served but not in /openapi.json"
            );
        }
        let declared: BTreeSet<_> = declared.into_iter().collect();
        assert_eq!(
            documented, declared,
            "documented operations that are not served"
        );
    }

    #[actix_web::test]
    async fn every_documented_operation_reaches_its_handler() {
        use actix_web::{http::Method, test, web, App};
        // No AppState: a handler that is reached fails its extractor with a 500; only a
        // request no route matches gets the 418 of this default service.
        let app = test::init_service(
            App::new()
                .configure(crate::routes::configure)
                .default_service(web::to(|| async { HttpResponse::ImATeapot().finish() })),
        )
        .await;
        for (method, path) in documented() {
            let uri = path.replace(
                "{id}",
                &match path.starts_with("/items/") {
                    true => Uuid::now_v7().to_string(),
                    false => "1".to_string(),
                },
            );
            let req = test::TestRequest::default()
                .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
                .uri(&uri)
                .to_request();
            let status = test::call_service(&app, req).await.status();
            assert_ne!(status.as_u16(), 418, "{method} {uri} reaches no handler");
        }
    }

    #[test]
    fn a_json_value_excludes_nul_at_any_depth() {
        let doc = serde_json::to_value(document()).unwrap();
        let schema = &doc["components"]["schemas"]["JsonValue"];
        let text = schema.to_string();
        assert!(text.contains("propertyNames"), "{schema}");
        assert!(text.contains("#/components/schemas/JsonValue"), "{schema}");
        assert_eq!(
            schema["anyOf"].as_array().map(Vec::len),
            Some(6),
            "{schema}"
        );
        assert_eq!(schema["anyOf"][3]["pattern"], "^[^\\u0000]*$", "{schema}");
    }

    #[test]
    fn a_path_that_exists_tells_its_methods() {
        assert_eq!(methods_of("/items"), ["POST"]);
        assert_eq!(methods_of("/items/x"), ["DELETE", "GET", "PUT"]);
        assert_eq!(methods_of("/items/inconsistencies/all"), ["GET"]);
        assert_eq!(methods_of("/items/x/refresh"), ["POST"]);
        assert!(methods_of("/items/x/y").is_empty());
        assert!(methods_of("/items/").is_empty());
        assert!(methods_of("/nothing").is_empty());
    }

    #[test]
    fn operation_ids_are_unique_and_error_codes_listed() {
        let doc = serde_json::to_value(document()).unwrap();
        let mut ids = BTreeSet::new();
        for item in doc["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                let id = op["operationId"].as_str().unwrap().to_string();
                assert!(ids.insert(id.clone()), "operationId {id} twice");
            }
        }
        let codes = &doc["components"]["schemas"]["ErrorCode"]["enum"];
        use crate::error::ApiError;
        for e in [
            ApiError::BadRequest(String::new()),
            ApiError::NotFound(String::new()),
            ApiError::MethodNotAllowed {
                path: String::new(),
                allowed: vec![],
            },
            ApiError::Unauthorized(String::new()),
            ApiError::TooLarge(1),
            ApiError::Timeout(String::new()),
            ApiError::Invalid(String::new()),
            ApiError::Conflict(String::new()),
            ApiError::Unavailable(String::new()),
            ApiError::Contended(String::new()),
            ApiError::UndecodableRow(String::new()),
            ApiError::internal(""),
        ] {
            assert!(
                codes.as_array().unwrap().contains(&json!(e.code())),
                "{} not in {codes}",
                e.code()
            );
        }
    }

    #[test]
    fn the_error_schema_is_what_errors_serialise_to() {
        let (names, _) = properties("ErrorBody");
        assert_eq!(names, ["error".to_string()].into());
        let (names, required) = properties("ErrorDetail");
        let body = crate::error::ApiError::internal("x").body();
        assert_eq!(names, keys(&body["error"]));
        assert_eq!(required, ["code".to_string(), "message".to_string()].into());
    }
}
