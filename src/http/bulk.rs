//! `POST /api/v1/things/bulk`: register many Things from NDJSON, streaming both ways.
//!
//! Each request line is `{"thingName","mqttClientId"?,"thingType"?,"attributes"?,"password"?}`
//! (`password` also creates the Thing's MQTT user, bound to it). The body is read as it
//! arrives and each line is registered (durably) with a bounded number in flight; the answer is
//! NDJSON too, one line per input line as it completes (`{"line","thingName","code":201}` or
//! `{"line","code","message"}`), then `{"summary":{"lines","created","failed"}}`. A bad line
//! never stops the others.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use thinghub_actors::clock::{Clock, SystemClock};
use thinghub_actors::thing::RegisterThing;
use tokio::sync::{mpsc, Semaphore};

use super::error::ApiError;
use super::extract::parse_json;
use super::listener::BodyReadTimeout;
use super::ndjson::{Line, LineSplitter};
#[allow(unused_imports)]
use super::schema as s;
use super::AppState;
use crate::auth::{Principal, Role};

/// Registrations in flight per bulk request.
const BULK_IN_FLIGHT_MAX: usize = 64;
/// Result lines buffered toward a slow reader before registration pauses.
const BULK_RESULTS_BUFFERED_MAX: usize = 1024;
/// How long the body or the reader may stall when the request did not come through the
/// listener (which sets `http_body_read_timeout_ms`).
const BULK_STALL_DEFAULT: Duration = Duration::from_secs(30);

/// One line of a bulk registration.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BulkThing {
    thing_name: String,
    #[serde(default)]
    mqtt_client_id: Option<String>,
    #[serde(default)]
    thing_type: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    #[serde(default)]
    password: Option<String>,
}

fn error_line(line: u64, error: &ApiError) -> Value {
    json!({"line": line, "code": error.status.as_u16(), "message": error.message})
}

/// Parses one line of a bulk registration (the contract's 400/415 errors).
pub fn parse_line(bytes: &[u8]) -> Result<BulkThing, ApiError> {
    parse_json(bytes)
}

async fn register_one(state: &AppState, may_create_users: bool, line: u64, bytes: &[u8]) -> Value {
    let thing: BulkThing = match parse_line(bytes) {
        Ok(thing) => thing,
        Err(error) => return error_line(line, &error),
    };
    // A password creates an MQTT user: only admin keys manage users (an operator could
    // otherwise make a user that an authorization rule written for that name empowers).
    if thing.password.is_some() && !may_create_users {
        let refused = ApiError::new(
            StatusCode::FORBIDDEN,
            "this API key's role may not create MQTT users: register without \"password\", or use an admin key",
        );
        let mut answer = error_line(line, &refused);
        answer["thingName"] = thing.thing_name.into();
        return answer;
    }
    // Credentials that could not be created must not leave a Thing behind with a 201.
    if let Some(password) = &thing.password {
        if let Err(error) = state.users.check_new(&thing.thing_name, password) {
            let mut answer = error_line(line, &ApiError::from(error));
            answer["thingName"] = thing.thing_name.into();
            return answer;
        }
    }
    let registered = state
        .things
        .register(
            &thing.thing_name,
            RegisterThing {
                mqtt_client_id: thing.mqtt_client_id,
                thing_type: thing.thing_type,
                attributes: thing.attributes,
            },
        )
        .await;
    if let Err(rejection) = registered {
        let mut answer = error_line(line, &ApiError::from(rejection));
        answer["thingName"] = thing.thing_name.into();
        return answer;
    }
    // Registered and durable: its actor need not stay in memory until it idles out.
    state.things.release(&thing.thing_name);
    let mut answer = json!({"line": line, "thingName": thing.thing_name, "code": 201});
    if let Some(password) = thing.password {
        let users = state.users.clone();
        let name = thing.thing_name.clone();
        // argon2 is CPU-heavy by design: off the async workers.
        let created = tokio::task::spawn_blocking(move || {
            tokio::runtime::Handle::current().block_on(users.create(
                &name,
                &password,
                Some(name.clone()),
                false,
                SystemClock.now_ms(),
            ))
        })
        .await;
        let failed = match created {
            Ok(Ok(_)) => None,
            Ok(Err(error)) => Some(ApiError::from(error)),
            Err(_) => Some(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
            )),
        };
        match failed {
            None => answer["credentials"] = "created".into(),
            // Checked above, so only a race or a storage failure lands here: the Thing exists,
            // its credentials do not, and the line says so with the failure's code.
            Some(error) => {
                answer = error_line(line, &error);
                answer["thingName"] = thing.thing_name.into();
                answer["message"] = format!(
                    "the Thing was registered but its credentials were not: {}",
                    error.message
                )
                .into();
            }
        }
    }
    answer
}

/// The `thingName` a line names, if it is JSON that names one.
fn thing_name_of(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        #[serde(rename = "thingName")]
        thing_name: String,
    }
    serde_json::from_slice::<Named>(bytes)
        .ok()
        .map(|n| n.thing_name)
}

/// Reads lines from `body` and registers each; sends one result line per input line. A body
/// that stops arriving, or a client that stops reading the answers, for `stall` ends the run.
async fn run(
    state: AppState,
    may_create_users: bool,
    body: Body,
    results: mpsc::Sender<Value>,
    stall: Duration,
) {
    let lines_max = state.limits.bulk_lines_max as u64;
    let permits = Arc::new(Semaphore::new(BULK_IN_FLIGHT_MAX));
    let mut tasks = tokio::task::JoinSet::new();
    let mut stream = body.into_data_stream();
    let mut splitter = LineSplitter::new(state.limits.body_bytes_max);
    let mut lines = Vec::new();
    let mut entries: u64 = 0;
    let mut read_error = None;
    let mut finished = false;
    // Set when an answer could not be delivered in time: the client stopped reading, so no
    // more lines are registered (each would be a change it never hears about).
    let reader_gone = Arc::new(AtomicBool::new(false));
    // One lock per Thing name seen in this request (at most `bulk_lines_max`).
    let mut names: std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>> =
        std::collections::HashMap::new();
    while !finished {
        if reader_gone.load(Ordering::Relaxed) || results.is_closed() {
            tracing::warn!(
                line = splitter.line_number(),
                "bulk registration stopped: its answers are not being read"
            );
            return;
        }
        match tokio::time::timeout(stall, stream.next()).await {
            Ok(Some(Ok(chunk))) => splitter.push(&chunk, &mut lines),
            Ok(Some(Err(e))) => {
                read_error = Some(format!("the request body could not be read: {e}"));
                break;
            }
            Ok(None) => {
                finished = true;
                splitter.finish(&mut lines);
            }
            Err(_) => {
                read_error = Some(format!(
                    "no part of the request body arrived for {} ms after line {}; stopped",
                    stall.as_millis(),
                    splitter.line_number()
                ));
                break;
            }
        }
        for line in lines.drain(..) {
            entries += 1;
            if entries > lines_max {
                let number = match &line {
                    Line::Entry { number, .. } | Line::TooLong { number } => *number,
                };
                read_error = Some(format!(
                    "at most {lines_max} lines per request; line {number} and later were not read"
                ));
                finished = true;
                break;
            }
            match line {
                Line::TooLong { number } => {
                    let error = ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("line is longer than {} bytes", state.limits.body_bytes_max),
                    );
                    if results
                        .send_timeout(error_line(number, &error), stall)
                        .await
                        .is_err()
                    {
                        reader_gone.store(true, Ordering::Relaxed);
                    }
                }
                Line::Entry { number, bytes } => {
                    // Lines naming the same Thing run one after another, in line order (the
                    // first one registers it, a later one gets 409), whatever else runs at once.
                    let same_name = match thing_name_of(&bytes) {
                        Some(name) => {
                            Some(names.entry(name).or_default().clone().lock_owned().await)
                        }
                        None => None,
                    };
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        return;
                    };
                    if reader_gone.load(Ordering::Relaxed) {
                        break;
                    }
                    let (state, results, gone) =
                        (state.clone(), results.clone(), reader_gone.clone());
                    tasks.spawn(async move {
                        let answer = register_one(&state, may_create_users, number, &bytes).await;
                        // A client that stops reading the answers ends the run (bounded); the
                        // permit is held until the answer is handed over, so registration
                        // waits for a slow reader instead of running ahead of it.
                        if results.send_timeout(answer, stall).await.is_err() {
                            gone.store(true, Ordering::Relaxed);
                        }
                        drop(permit);
                        drop(same_name);
                    });
                    while tasks.try_join_next().is_some() {}
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    if let Some(message) = read_error {
        tracing::warn!(%message, "bulk registration stopped early");
        let _ = results
            .send_timeout(json!({"code": 400, "message": message}), stall)
            .await;
    }
}

/// `POST /api/v1/things/bulk` (NDJSON in, NDJSON out).
#[utoipa::path(
    post,
    path = "/things/bulk",
    tag = "things",
    summary = "Register Things in bulk (NDJSON, one Thing per line; a password also creates its MQTT user, admin keys only)",
    request_body(content = String, content_type = "application/x-ndjson", example = json!("{\"thingName\": \"sensor-3\"}\n{\"thingName\": \"sensor-4\", \"attributes\": {\"room\": \"7\"}}\n")),
    responses(
        (status = 200, description = "One result line per input line (in completion order), then a summary line", body = String, content_type = "application/x-ndjson")
    )
)]
pub async fn register(
    State(state): State<AppState>,
    axum::Extension(principal): axum::Extension<Principal>,
    timeout: Option<axum::Extension<BodyReadTimeout>>,
    body: Body,
) -> Response {
    let stall = timeout.map_or(BULK_STALL_DEFAULT, |t| t.0 .0);
    let may_create_users = principal.role == Role::Admin;
    let (tx, rx) = mpsc::channel::<Value>(BULK_RESULTS_BUFFERED_MAX);
    let (summary_tx, summary_rx) = mpsc::channel::<Value>(BULK_RESULTS_BUFFERED_MAX);
    tokio::spawn(run(state, may_create_users, body, tx, stall));
    // Counts results on their way out and appends the summary.
    tokio::spawn(async move {
        let mut rx = rx;
        let (mut lines, mut created, mut failed) = (0u64, 0u64, 0u64);
        while let Some(result) = rx.recv().await {
            if result.get("line").is_some() {
                lines += 1;
                if result["code"] == 201 {
                    created += 1;
                } else {
                    failed += 1;
                }
            }
            if summary_tx.send_timeout(result, stall).await.is_err() {
                return;
            }
        }
        let _ = summary_tx
            .send_timeout(
                json!({"summary": {"lines": lines, "created": created, "failed": failed}}),
                stall,
            )
            .await;
    });
    let stream = futures_util::stream::unfold(summary_rx, |mut rx| async move {
        let value = rx.recv().await?;
        let mut line = value.to_string();
        line.push('\n');
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(line)), rx))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}
