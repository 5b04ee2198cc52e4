//! The OpenAPI 3.1 document of the HTTP API, `GET /api/v1/openapi.json`.
//!
//! It is built from the code: each handler carries a `#[utoipa::path]` annotation, the router
//! is assembled from those same annotations ([`utoipa_axum::routes!`]), so a route cannot be
//! served without being documented, and the bodies' schemas derive from the Rust types that
//! serialize them. What every route shares (the security scheme, the error body, the errors the
//! authentication layer and the extractors answer) is added here once.

use std::sync::Arc;

use axum::response::Response;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};
use utoipa::ToSchema;

/// Every error's body.
#[derive(Debug, serde::Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// The HTTP status again.
    pub code: u16,
    /// What went wrong, specifically.
    pub message: String,
    /// The request's client token, echoed when it had one (device API).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// The name of the security scheme: an API key as HTTP Basic `key:secret`.
pub const SECURITY: &str = "apiKey";

/// The document's frame: title, version, security scheme, shared schemas.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "thinghub",
        description = "Management API, device ThingDatas API and operator messaging of a thinghub \
                       server. Authenticate with an API key: HTTP Basic with the key as user name \
                       and its secret as password (or `Authorization: Bearer key:secret`).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(document, super::healthz),
    components(schemas(ErrorBody))
)]
pub struct ApiDoc;

fn error_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

/// The routes served without a key (outside the authentication layer in `app`).
const PUBLIC_PATHS: [&str; 2] = ["/healthz", "/api/v1/openapi.json"];

/// The errors any route can answer before or besides its handler.
fn shared_errors(public: bool, has_body: bool) -> Vec<(u16, &'static str)> {
    let mut errors = vec![(
        400,
        "The request is malformed: a path or query parameter, or the body.",
    )];
    if !public {
        errors.push((
            401,
            "No valid API key (missing, malformed, unknown, revoked or expired).",
        ));
        errors.push((
            403,
            "The key's role (or a device key's Things) does not allow this.",
        ));
        errors.push((
            429,
            "Too many failed authentications from this address or for this key; see Retry-After.",
        ));
    }
    if has_body {
        errors.push((408, "The request body did not arrive in time."));
        errors.push((413, "The request body is larger than http_body_bytes_max."));
        errors.push((415, "The request body is not UTF-8."));
    }
    errors
}

/// Adds what every route shares, once the routes are in the document.
pub fn finish(openapi: &mut OpenApi) {
    let components = openapi.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        SECURITY,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Basic)
                .description(Some("API key as user name, its secret as password."))
                .build(),
        ),
    );
    for (path, item) in openapi.paths.paths.iter_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            let has_body = operation.request_body.is_some();
            let public = PUBLIC_PATHS.contains(&path.as_str());
            if !public {
                operation.security =
                    Some(vec![utoipa::openapi::security::SecurityRequirement::new::<
                        &str,
                        [&str; 0],
                        &str,
                    >(SECURITY, [])]);
            }
            for (status, description) in shared_errors(public, has_body) {
                operation
                    .responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| error_response(description).into());
            }
        }
    }
}

/// `GET /api/v1/openapi.json`: this document (no key needed; it holds no data).
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of this server.", content_type = "application/json", body = Object)),
)]
pub async fn document(doc: Arc<str>) -> Response {
    super::json_text(&doc)
}
