//! API keys with roles, end to end: each role allowed and refused on representative routes, a
//! device key scoped to one Thing refused on another, revocation and expiry taking effect at
//! once, and specific errors for bad key requests.

mod common;

use std::time::{Duration, Instant};

use common::{call, call_as, create, Server};
use reqwest::Method;
use serde_json::{json, Value};

/// Makes a key; returns (key, secret) after checking the answer shows the secret once.
async fn make_key(server: &Server, body: Value) -> (String, String) {
    let made = create(server, "/api/v1/api-keys", body).await;
    let key = made["key"].as_str().expect("key").to_owned();
    let secret = made["secret"].as_str().expect("secret").to_owned();
    let (status, shown) = call(
        Method::GET,
        &server.url(&format!("/api/v1/api-keys/{key}")),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        shown.get("secret").is_none(),
        "the secret is shown once: {shown}"
    );
    (key, secret)
}

async fn status_as(
    server: &Server,
    (key, secret): (&str, &str),
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    call_as((key, secret), method, &server.url(path), body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_reaches_its_routes_and_is_refused_elsewhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    for name in ["pump-1", "pump-2"] {
        create(&server, "/api/v1/things", json!({"thingName": name})).await;
    }
    let (op, op_secret) = make_key(&server, json!({"name": "ops team", "role": "operator"})).await;
    let (viewer, viewer_secret) =
        make_key(&server, json!({"name": "dashboard", "role": "viewer"})).await;
    let operator = (op.as_str(), op_secret.as_str());
    let viewer = (viewer.as_str(), viewer_secret.as_str());

    // An operator runs the fleet but cannot touch keys, MQTT users or rules.
    let (status, _) = status_as(
        &server,
        operator,
        Method::POST,
        "/api/v1/things",
        Some(json!({"thingName": "pump-3"})),
    )
    .await;
    assert_eq!(status, 201);
    for (method, path, body) in [
        (Method::GET, "/api/v1/api-keys", None),
        (
            Method::POST,
            "/api/v1/api-keys",
            Some(json!({"name": "x", "role": "admin"})),
        ),
        (Method::GET, "/api/v1/authentication/users", None),
        (Method::GET, "/api/v1/authorization/rules", None),
    ] {
        let (status, answer) = status_as(&server, operator, method.clone(), path, body).await;
        assert_eq!(status, 403, "{method} {path}: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains("operator")),
            "{answer}"
        );
    }

    // A viewer reads.
    for path in [
        "/api/v1/things/pump-1",
        "/api/v1/jobs",
        "/api/v1/metrics",
        "/metrics",
    ] {
        let (status, answer) = status_as(&server, viewer, Method::GET, path, None).await;
        assert_eq!(status, 200, "{path}: {answer}");
    }
    let (status, answer) = status_as(
        &server,
        viewer,
        Method::POST,
        "/api/v1/things/pump-1/shadow",
        Some(json!({"state": {"desired": {"on": true}}})),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer["message"]
        .as_str()
        .is_some_and(|m| m.contains("only read")));
    let (status, _) = status_as(
        &server,
        viewer,
        Method::DELETE,
        "/api/v1/things/pump-3",
        None,
    )
    .await;
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_key_reaches_only_the_device_api_of_its_things() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    for name in ["pump-1", "pump-2"] {
        create(&server, "/api/v1/things", json!({"thingName": name})).await;
    }
    let (key, secret) = make_key(
        &server,
        json!({"name": "pump-1 firmware", "role": "device", "things": ["pump-1"]}),
    )
    .await;
    let pump1 = (key.as_str(), secret.as_str());
    let report =
        |thing: &str| Some(json!({"thingName": thing, "state": {"reported": {"rpm": 1200}}}));
    let event =
        |thing: &str| Some(json!({"thingName": thing, "eventType": "boot", "severity": "info"}));

    // Its own Thing, through every device route.
    let own = [
        (
            Method::POST,
            "/api/v1/thing-datas/shadow/reported",
            report("pump-1"),
            200,
        ),
        (
            Method::POST,
            "/api/v1/thing-datas/events",
            event("pump-1"),
            201,
        ),
        (Method::GET, "/api/v1/thing-datas/pump-1/shadow", None, 200),
        (Method::GET, "/api/v1/thing-datas/pump-1/jobs", None, 200),
        (
            Method::POST,
            "/api/v1/thing-datas/pump-1/jobs/start-next",
            Some(json!({})),
            200,
        ),
        // No such job: the request got through to the Thing.
        (Method::GET, "/api/v1/thing-datas/pump-1/jobs/fw", None, 404),
        (
            Method::POST,
            "/api/v1/thing-datas/pump-1/jobs/fw/update",
            Some(json!({"status": "SUCCEEDED"})),
            404,
        ),
    ];
    for (method, path, body, want) in own {
        let (status, answer) = status_as(&server, pump1, method.clone(), path, body).await;
        assert_eq!(status, want, "{method} {path}: {answer}");
    }
    // Another Thing, through the same routes: 403 before anything is read or written.
    let other = [
        (
            Method::POST,
            "/api/v1/thing-datas/shadow/reported",
            report("pump-2"),
        ),
        (Method::POST, "/api/v1/thing-datas/events", event("pump-2")),
        (Method::GET, "/api/v1/thing-datas/pump-2/shadow", None),
        (Method::GET, "/api/v1/thing-datas/pump-2/jobs", None),
        (
            Method::POST,
            "/api/v1/thing-datas/pump-2/jobs/start-next",
            Some(json!({})),
        ),
        (Method::GET, "/api/v1/thing-datas/pump-2/jobs/fw", None),
        (
            Method::POST,
            "/api/v1/thing-datas/pump-2/jobs/fw/update",
            Some(json!({"status": "SUCCEEDED"})),
        ),
    ];
    for (method, path, body) in other {
        let (status, answer) = status_as(&server, pump1, method.clone(), path, body).await;
        assert_eq!(status, 403, "{method} {path}: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains("pump-2")),
            "{answer}"
        );
    }
    let (_, shadow) = call(
        Method::GET,
        &server.url("/api/v1/things/pump-2/shadow"),
        None,
    )
    .await;
    assert!(
        shadow["state"]["reported"].is_null(),
        "nothing written: {shadow}"
    );
    // And nothing of the management API.
    for path in [
        "/api/v1/things/pump-1",
        "/api/v1/things/pump-1/shadow",
        "/metrics",
    ] {
        let (status, _) = status_as(&server, pump1, Method::GET, path, None).await;
        assert_eq!(status, 403, "{path}");
    }
    // A device key without Things acts for any Thing (a gateway).
    let (key, secret) = make_key(&server, json!({"name": "gateway", "role": "device"})).await;
    let (status, _) = status_as(
        &server,
        (&key, &secret),
        Method::POST,
        "/api/v1/thing-datas/shadow/reported",
        report("pump-2"),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_expired_key_is_refused_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let (key, secret) = make_key(&server, json!({"name": "temp", "role": "viewer"})).await;
    let viewer = (key.as_str(), secret.as_str());
    // Verified once (so its secret is in the cache), then deleted: the next request fails.
    let (status, _) = status_as(&server, viewer, Method::GET, "/api/v1/things", None).await;
    assert_eq!(status, 200);
    let (status, _) = call(
        Method::DELETE,
        &server.url(&format!("/api/v1/api-keys/{key}")),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, answer) = status_as(&server, viewer, Method::GET, "/api/v1/things", None).await;
    assert_eq!(status, 401, "{answer}");
    let (status, _) = call(
        Method::DELETE,
        &server.url(&format!("/api/v1/api-keys/{key}")),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // An expiring key works until its time, then is refused with a reason.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let (key, secret) = make_key(
        &server,
        json!({"name": "short", "role": "viewer", "expiresAt": now_ms + 1_500}),
    )
    .await;
    let short = (key.as_str(), secret.as_str());
    let (status, _) = status_as(&server, short, Method::GET, "/api/v1/things", None).await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, answer) = status_as(&server, short, Method::GET, "/api/v1/things", None).await;
        if status == 401 {
            assert!(
                answer["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("expired")),
                "{answer}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_requests_get_specific_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let cases = [
        json!({"role": "viewer"}),
        json!({"name": "", "role": "viewer"}),
        json!({"name": "x"}),
        json!({"name": "x", "role": "root"}),
        json!({"name": "x", "role": "viewer", "things": ["t1"]}),
        json!({"name": "x", "role": "device", "things": []}),
        json!({"name": "x", "role": "device", "things": ["bad name"]}),
        json!({"name": "x", "role": "viewer", "expiresAt": 1}),
        json!({"name": "x", "role": "viewer", "expiresAt": "tomorrow"}),
        json!({"name": "x", "role": "viewer", "secret": "mine"}),
        json!(["x"]),
    ];
    for body in cases {
        let (status, answer) = call(
            Method::POST,
            &server.url("/api/v1/api-keys"),
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert!(
            answer["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
    }
    let (status, _) = call(Method::GET, &server.url("/api/v1/api-keys/k-nope"), None).await;
    assert_eq!(status, 404);
    let (key, _) = make_key(&server, json!({"name": "listed", "role": "operator"})).await;
    let (status, listed) = call(Method::GET, &server.url("/api/v1/api-keys?limit=10"), None).await;
    assert_eq!(status, 200);
    let items = listed["items"].as_array().expect("items");
    assert!(items
        .iter()
        .any(|k| k["key"] == key.as_str() && k["role"] == "operator"));
    assert!(items.iter().all(|k| k.get("secret").is_none()), "{listed}");
}

/// A password in a bulk registration line creates an MQTT user: only admin keys may, so an
/// operator cannot make a user that an authorization rule written for its name empowers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_admin_key_creates_mqtt_users_through_bulk_registration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let (key, secret) = make_key(&server, json!({"name": "ops", "role": "operator"})).await;
    let response = common::client()
        .post(server.url("/api/v1/things/bulk"))
        .basic_auth(&key, Some(&secret))
        .body("{\"thingName\":\"backend\",\"password\":\"pw-123456\"}\n{\"thingName\":\"plain\"}\n")
        .send()
        .await
        .expect("bulk");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("body");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines[0]["code"], 403, "{text}");
    assert_eq!(lines[1]["code"], 201, "{text}");
    let (status, _) = call(
        Method::GET,
        &server.url("/api/v1/authentication/users/backend"),
        None,
    )
    .await;
    assert_eq!(status, 404, "no user was made");
    let (status, _) = call(Method::GET, &server.url("/api/v1/things/backend"), None).await;
    assert_eq!(status, 404, "nor the Thing");
}
