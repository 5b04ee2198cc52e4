//! The OpenAPI document (`GET /api/v1/openapi.json`) against the real server: it covers every
//! operation with its security and errors, and schemathesis (PyPI), driven from it with the
//! admin key, finds no 5xx and no response that breaks its documented status, content type,
//! headers or schema.
//!
//! `.ci/run` installs schemathesis and sets `THINGHUB_SCHEMATHESIS` to its `st` and
//! `THINGHUB_REQUIRE_INTEROP=1`, so CI always runs it. On a machine without it the fuzzing test
//! says so and does not run.

mod common;

use std::process::Command;

use common::mqtt::Client;
use common::{call, create, Server, ADMIN_KEY, ADMIN_SECRET};
use reqwest::Method;
use serde_json::{json, Value};

/// Operations the router serves (each path's methods), the document's own route included.
const OPERATIONS: usize = 99;

async fn document(server: &Server) -> Value {
    let response = reqwest::get(server.url("/api/v1/openapi.json"))
        .await
        .expect("GET openapi.json");
    assert_eq!(response.status(), 200, "served without a key");
    response.json().await.expect("JSON")
}

fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            if ["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                out.push((method.clone(), path.clone(), operation.clone()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_covers_every_operation_with_its_security_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let doc = document(&server).await;
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["components"]["securitySchemes"]["apiKey"]["scheme"],
        "basic"
    );
    let operations = operations(&doc);
    assert_eq!(operations.len(), OPERATIONS, "{:?}", {
        let mut names: Vec<String> = operations
            .iter()
            .map(|(m, p, _)| format!("{m} {p}"))
            .collect();
        names.sort();
        names
    });
    for (method, path, operation) in &operations {
        let what = format!("{method} {path}");
        let responses = operation["responses"].as_object().expect("responses");
        assert!(
            responses.keys().any(|status| status.starts_with('2')),
            "{what}: a success response"
        );
        assert!(responses.contains_key("400"), "{what}: 400");
        if path == "/api/v1/openapi.json" || path == "/healthz" {
            assert!(operation.get("security").is_none(), "{what}: public");
            continue;
        }
        assert_eq!(operation["security"], json!([{"apiKey": []}]), "{what}");
        for status in ["401", "403", "429"] {
            assert!(responses.contains_key(status), "{what}: {status}");
            assert_eq!(
                responses[status]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "{what}: {status} body"
            );
        }
        if operation.get("requestBody").is_some() {
            for status in ["408", "413", "415"] {
                assert!(responses.contains_key(status), "{what}: {status}");
            }
        }
    }
    // What the document says is what the server does: a documented route needs the key.
    let (status, _) = call(Method::GET, &server.url("/api/v1/things"), None).await;
    assert_eq!(status, 200);
    let anonymous = reqwest::get(server.url("/api/v1/things"))
        .await
        .expect("GET");
    assert_eq!(anonymous.status(), 401);
}

/// The `st` executable, or `None` (with a note) where schemathesis is not installed.
fn schemathesis() -> Option<String> {
    let st = std::env::var("THINGHUB_SCHEMATHESIS").unwrap_or_else(|_| "st".to_owned());
    let found = Command::new(&st).arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("THINGHUB_REQUIRE_INTEROP").is_none(),
            "THINGHUB_REQUIRE_INTEROP is set but schemathesis ({st}) is not installed (.ci/run installs it)"
        );
        eprintln!("schemathesis not installed: OpenAPI fuzzing NOT run (CI installs it)");
        return None;
    }
    Some(st)
}

/// Data the document's examples name, so generated requests reach the handlers, not only 404.
async fn fixtures(server: &Server) -> Client {
    create(
        server,
        "/api/v1/things",
        json!({"thingName": "sensor-1", "thingType": "thermostat"}),
    )
    .await;
    create(
        server,
        "/api/v1/authentication/users",
        json!({"username": "sensor-1", "password": "pw", "thingName": "sensor-1"}),
    )
    .await;
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/things/sensor-1/shadow"),
        Some(json!({"state": {"desired": {"fan": "on"}, "reported": {"fan": "off"}}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    create(
        server,
        "/api/v1/things/sensor-1/commands",
        json!({"action": "reboot", "ttl": 600}),
    )
    .await;
    create(
        server,
        "/api/v1/thing-datas/events",
        json!({"thingName": "sensor-1", "eventType": "boot", "severity": "info", "data": {"n": 1}}),
    )
    .await;
    create(
        server,
        "/api/v1/thing-groups",
        json!({"groupName": "floor-1"}),
    )
    .await;
    create(
        server,
        "/api/v1/thing-groups/floor-1/things",
        json!({"thingName": "sensor-1"}),
    )
    .await;
    create(
        server,
        "/api/v1/jobs",
        json!({"jobId": "job-1", "document": {"operation": "update"}, "targets": {"thingNames": ["sensor-1"]}}),
    )
    .await;
    let device = Client::connect(server, "sensor-1", Some(("sensor-1", "pw")), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("the device connects")
    .0;
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/publish"),
        Some(json!({"topic": "alerts/floor-1", "payload": "smoke", "retain": true})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    device
}

/// The number after `label` in schemathesis' summary.
fn count(stdout: &str, label: &str) -> usize {
    stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix(label))
        .and_then(|rest| rest.split('/').next())
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no '{label}' in schemathesis' output:\n{stdout}"))
}

/// One schemathesis run over the operations `filter` selects; fails the test on any finding.
async fn run_schemathesis(
    st: &str,
    server: &Server,
    work: &std::path::Path,
    filter_flag: &str,
    filter: &str,
) -> String {
    let hooks = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis_hooks.py");
    let mut command = Command::new(st);
    command
        .current_dir(work)
        .env("SCHEMATHESIS_HOOKS", hooks)
        .env("NO_COLOR", "1")
        .args(["run", &server.url("/api/v1/openapi.json")])
        .args(["--url", &server.url("")])
        .args(["--auth", &format!("{ADMIN_KEY}:{ADMIN_SECRET}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
        ])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", "25", "--workers", "2"])
        .args(["--request-timeout", "20", "--seed", "1"])
        .args([filter_flag, filter]);
    let output = tokio::task::spawn_blocking(move || command.output().expect("run schemathesis"))
        .await
        .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let summary: Vec<&str> = stdout
        .lines()
        .skip_while(|line| !line.contains("SUMMARY"))
        .collect();
    eprintln!(
        "schemathesis {filter_flag} {filter}:\n{}",
        summary.join("\n")
    );
    assert!(
        output.status.success(),
        "schemathesis failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        count(&stdout, "Tested:"),
        count(&stdout, "Selected:"),
        "every selected operation tested"
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_response_off_the_document() {
    let Some(st) = schemathesis() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let _device = fixtures(&server).await;
    // Deletions last, so the other operations find the fixtures their examples name.
    let mut tested = 0;
    for (pass, filter) in [
        ("--exclude-method", "DELETE"),
        ("--include-method", "DELETE"),
    ] {
        let stdout = run_schemathesis(&st, &server, dir.path(), pass, filter).await;
        tested += count(&stdout, "Tested:");
    }
    // (A run that loads the document from the server does not always count the operation
    // serving it; every other one must be tested.)
    assert!(tested >= OPERATIONS - 1, "every operation tested: {tested}");
    // The server kept serving.
    let (status, _) = call(Method::GET, &server.url("/api/v1/things/sensor-1"), None).await;
    assert!(status == 200 || status == 404, "{status}");
}
