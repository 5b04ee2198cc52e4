//! `/api/v1/things/{name}/certificates`: device certificates (X.509 client certificates) an
//! operator registers for a Thing, lists and revokes. Admin keys only: they are credentials.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use thinghub_actors::clock::{Clock, SystemClock};

use super::error::ApiError;
use super::extract::JsonBody;
use super::openapi::ErrorBody;
#[allow(unused_imports)]
use super::schema as s;
use super::AppState;
use crate::certificates::CertificateError;
use crate::users::UserError;

impl From<CertificateError> for ApiError {
    fn from(error: CertificateError) -> ApiError {
        match error {
            CertificateError::Invalid(_) => ApiError::bad_request(error.to_string()),
            CertificateError::Exists { .. } | CertificateError::Full(..) => {
                ApiError::new(StatusCode::CONFLICT, error.to_string())
            }
            CertificateError::NotFound { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, error.to_string())
            }
            CertificateError::Storage(_) => {
                tracing::error!(error = %error, "device certificate store failure");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }
}

/// Body of a certificate registration: the certificate itself (PEM), or its fingerprint.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(example = json!({"fingerprint": "ffe5440eefa5e5389213077a402cee785239387c5fa78ebd3d06de2b2b8b1db1"}))]
pub struct RegisterCertificate {
    /// The device certificate, PEM. Its name (CN or SAN, per `tls_client_identity`) must be
    /// the Thing's.
    #[serde(default)]
    certificate_pem: Option<String>,
    /// SHA-256 of the certificate's DER, 64 hex digits (`:` separators allowed), when the
    /// certificate itself is not at hand.
    #[serde(default)]
    fingerprint: Option<String>,
}

/// 404 unless `thing` is registered.
fn registered(state: &AppState, thing: &str) -> Result<(), ApiError> {
    match state.users.thing_registered(thing) {
        Ok(true) => Ok(()),
        Ok(false) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("thing '{thing}' not found"),
        )),
        Err(e) => {
            tracing::error!(%thing, error = %e, "cannot read the registry");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
            ))
        }
    }
}

#[utoipa::path(
    post,
    path = "/things/{name}/certificates",
    tag = "certificates",
    summary = "Register a device certificate for a Thing (admin)",
    params(("name" = String, Path, description = "Thing name", example = "sensor-1")),
    request_body = RegisterCertificate,
    responses(
        (status = 201, description = "Registered and active", body = crate::certificates::CertificateView),
        (status = 400, description = "Not a certificate or fingerprint, or the certificate names another Thing.", body = ErrorBody),
        (status = 404, description = "No such Thing.", body = ErrorBody),
        (status = 409, description = "Registered already (a revoked certificate stays revoked), or the Thing has as many as it may.", body = ErrorBody),
        (status = 500, description = "The store failed.", body = ErrorBody)
    )
)]
pub async fn register(
    State(state): State<AppState>,
    Path(thing): Path<String>,
    JsonBody(body): JsonBody<RegisterCertificate>,
) -> Result<Response, ApiError> {
    // The Thing is checked and the record written with no deletion of the Thing in between.
    let _edit = state.users.certificates().edit().await;
    registered(&state, &thing)?;
    let (fingerprint, subject_name) = match (body.certificate_pem, body.fingerprint) {
        (Some(pem), None) => {
            let der = crate::tls::certificate_der_from_pem(&pem)
                .map_err(|e| ApiError::bad_request(format!("certificatePem {e}")))?;
            if x509_parser::parse_x509_certificate(&der).is_err() {
                return Err(ApiError::bad_request(
                    "certificatePem is not an X.509 certificate",
                ));
            }
            let identity = state.transports.client_identity;
            let name = crate::tls::certificate_name(&der, identity);
            let field = match identity {
                crate::tls::ClientIdentity::Cn => "subject CN",
                crate::tls::ClientIdentity::San => "first DNS subject alternative name",
            };
            match name.as_deref() {
                Some(name) if name == thing => {}
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "the certificate's {field} is '{other}', not '{thing}': it could never connect as this Thing"
                    )))
                }
                None => {
                    return Err(ApiError::bad_request(format!(
                        "the certificate has no {field} (tls_client_identity), so it names no Thing"
                    )))
                }
            }
            (crate::tls::fingerprint(&der), name)
        }
        (None, Some(fingerprint)) => (fingerprint, None),
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of certificatePem and fingerprint",
            ))
        }
    };
    let view = state
        .users
        .certificates()
        .register(&thing, &fingerprint, subject_name, SystemClock.now_ms())
        .await?;
    tracing::info!(%thing, fingerprint = %view.fingerprint, "device certificate registered");
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[utoipa::path(
    get,
    path = "/things/{name}/certificates",
    tag = "certificates",
    summary = "List a Thing's device certificates, revoked ones included (admin)",
    params(("name" = String, Path, description = "Thing name", example = "sensor-1")),
    responses(
        (status = 200, description = "Certificates", body = s::CertificateList),
        (status = 404, description = "No such Thing.", body = ErrorBody),
        (status = 500, description = "The store failed.", body = ErrorBody)
    )
)]
pub async fn list(
    State(state): State<AppState>,
    Path(thing): Path<String>,
) -> Result<Json<Value>, ApiError> {
    registered(&state, &thing)?;
    Ok(Json(
        json!({"items": state.users.certificates().list(&thing)?}),
    ))
}

#[utoipa::path(
    get,
    path = "/things/{name}/certificates/{fingerprint}",
    tag = "certificates",
    summary = "Get a device certificate (admin)",
    params(
        ("name" = String, Path, description = "Thing name", example = "sensor-1"),
        ("fingerprint" = String, Path, description = "SHA-256 fingerprint, hex", example = "ffe5440eefa5e5389213077a402cee785239387c5fa78ebd3d06de2b2b8b1db1")
    ),
    responses(
        (status = 200, description = "The certificate", body = crate::certificates::CertificateView),
        (status = 400, description = "Not a fingerprint.", body = ErrorBody),
        (status = 404, description = "No such Thing or certificate.", body = ErrorBody),
        (status = 500, description = "The store failed.", body = ErrorBody)
    )
)]
pub async fn get(
    State(state): State<AppState>,
    Path((thing, fingerprint)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    registered(&state, &thing)?;
    Ok(Json(json!(state
        .users
        .certificates()
        .get(&thing, &fingerprint)?)))
}

#[utoipa::path(
    post,
    path = "/things/{name}/certificates/{fingerprint}/revoke",
    tag = "certificates",
    summary = "Revoke a device certificate: refused from now on, live connections closed (admin)",
    params(
        ("name" = String, Path, description = "Thing name", example = "sensor-1"),
        ("fingerprint" = String, Path, description = "SHA-256 fingerprint, hex", example = "ffe5440eefa5e5389213077a402cee785239387c5fa78ebd3d06de2b2b8b1db1")
    ),
    responses(
        (status = 200, description = "Revoked (the record stays, status REVOKED)", body = crate::certificates::CertificateView),
        (status = 400, description = "Not a fingerprint.", body = ErrorBody),
        (status = 404, description = "No such Thing or certificate.", body = ErrorBody),
        (status = 500, description = "The store failed.", body = ErrorBody)
    )
)]
pub async fn revoke(
    State(state): State<AppState>,
    Path((thing, fingerprint)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    // Not between a Thing's deletion and the removal of its certificates (it would put one back).
    let _edit = state.users.certificates().edit().await;
    registered(&state, &thing)?;
    let (view, revoked) = state
        .users
        .certificates()
        .revoke(&thing, &fingerprint, SystemClock.now_ms())
        .await?;
    if revoked {
        tracing::info!(%thing, fingerprint = %view.fingerprint, "device certificate revoked");
        crate::mqtt::revoke_certificate(
            &state.broker,
            &state.acl,
            &state.users,
            &thing,
            &view.fingerprint,
        );
    }
    Ok(Json(json!(view)))
}

impl From<UserError> for CertificateError {
    fn from(error: UserError) -> CertificateError {
        match error {
            UserError::Storage(e) => CertificateError::Storage(e),
            other => CertificateError::Invalid(other.to_string()),
        }
    }
}
