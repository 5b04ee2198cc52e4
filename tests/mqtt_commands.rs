//! Commands end to end: the management API sends, a real MQTT device receives and answers,
//! deadlines time out (also across a kill -9), cancel, refusals, and the AWS compatible topics.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::device::{Device, WAIT};
use common::{call, Server};
use reqwest::Method;
use serde_json::{json, Value};

const REQUESTS: &str = "$emqx/commands/things/lamp/executions/+/request";

async fn setup(extra_args: &[&str]) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), extra_args);
    register(&server).await;
    (dir, server)
}

async fn register(server: &Server) {
    common::register_device(server, "lamp", "pw").await;
}

async fn send(server: &Server, body: Value) -> (u16, Value) {
    call(
        Method::POST,
        &server.url("/api/v1/things/lamp/commands"),
        Some(body),
    )
    .await
}

async fn execution(server: &Server, id: &str) -> Value {
    let (status, body) = call(
        Method::GET,
        &server.url(&format!("/api/v1/things/lamp/commands/{id}")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Polls (bounded) until the execution has `status`.
async fn wait_for_status(server: &Server, id: &str, status: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let body = execution(server, id).await;
        if body["status"] == status {
            return body;
        }
        assert!(Instant::now() < deadline, "still {body}, expected {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn response_topic(id: &str) -> String {
    format!("$emqx/commands/things/lamp/executions/{id}/response")
}

async fn device(server: &Server) -> Device {
    let (mut lamp, _) = Device::connect(server, "lamp", ("lamp", "pw"), true).await;
    lamp.subscribe(REQUESTS).await;
    lamp.subscribe("$emqx/commands/things/lamp/executions/+/response/+")
        .await;
    lamp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_receive_answer_succeeded_and_later_answers_are_refused_and_recorded() {
    let (_dir, server) = setup(&[]).await;
    let mut lamp = device(&server).await;

    let (status, created) = send(
        &server,
        json!({"action":"setTemperature","params":{"value":24},"ttl":30}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["status"], "SENT");
    let id = created["executionId"]
        .as_str()
        .expect("executionId")
        .to_owned();
    assert_eq!(
        created["expiresAt"].as_u64().expect("expiresAt"),
        created["createdAt"].as_u64().expect("createdAt") + 30_000
    );

    let (topic, request) = lamp.next().await;
    assert_eq!(
        topic,
        format!("$emqx/commands/things/lamp/executions/{id}/request")
    );
    assert_eq!(request["action"], "setTemperature");
    assert_eq!(request["params"], json!({"value": 24}));
    assert_eq!(request["ttl"], 30);
    assert_eq!(request["commandId"], created["commandId"]);
    assert_eq!(
        request["timestamp"].as_u64(),
        created["createdAt"].as_u64().map(|ms| ms / 1000),
        "timestamp in seconds"
    );

    lamp.publish(
        &response_topic(&id),
        json!({"status":"SUCCEEDED","result":{"currentTemperature":24}}).to_string(),
    )
    .await;
    let (topic, accepted) = lamp.next().await;
    assert_eq!(topic, format!("{}/accepted", response_topic(&id)));
    assert_eq!(accepted["status"], "SUCCEEDED");
    let done = execution(&server, &id).await;
    assert_eq!(done["status"], "SUCCEEDED");
    assert_eq!(done["result"], json!({"currentTemperature": 24}));
    assert!(done["completedAt"].as_u64().is_some());

    // A second (terminal) answer is refused, recorded, and changes nothing.
    lamp.publish(&response_topic(&id), json!({"status":"FAILED"}).to_string())
        .await;
    let (topic, rejected) = lamp.next().await;
    assert_eq!(topic, format!("{}/rejected", response_topic(&id)));
    assert_eq!(rejected["code"], 409);
    assert_eq!(
        rejected["message"],
        format!("execution '{id}' is already SUCCEEDED")
    );
    assert_eq!(execution(&server, &id).await["status"], "SUCCEEDED");
    let (_, history) = call(
        Method::GET,
        &server.url("/api/v1/things/lamp/history"),
        None,
    )
    .await;
    let types: Vec<&str> = history["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["type"].as_str())
        .filter(|t| t.starts_with("Command"))
        .collect();
    assert_eq!(
        types,
        ["CommandSent", "CommandResponded", "CommandResponseRefused"]
    );

    let (status, page) = call(
        Method::GET,
        &server.url("/api/v1/things/lamp/commands?status=SUCCEEDED"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(page["items"][0]["executionId"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_times_out_at_the_deadline_and_a_late_answer_is_refused() {
    let (_dir, server) = setup(&[]).await;
    let mut lamp = device(&server).await;
    let (status, created) = send(&server, json!({"action":"reboot","ttl":1})).await;
    assert_eq!(status, 201, "{created}");
    let id = created["executionId"].as_str().expect("id").to_owned();
    let (_, request) = lamp.next().await;
    assert_eq!(request["action"], "reboot");

    let timed_out = wait_for_status(&server, &id, "TIMED_OUT").await;
    let expires = timed_out["expiresAt"].as_u64().expect("expiresAt");
    let completed = timed_out["completedAt"].as_u64().expect("completedAt");
    assert!(completed >= expires, "not before the deadline: {timed_out}");

    lamp.publish(
        &response_topic(&id),
        json!({"status":"SUCCEEDED"}).to_string(),
    )
    .await;
    let (topic, rejected) = lamp.next().await;
    assert_eq!(topic, format!("{}/rejected", response_topic(&id)));
    assert_eq!(rejected["code"], 409);
    assert!(
        rejected["message"]
            .as_str()
            .is_some_and(|m| m.contains("TIMED_OUT")),
        "{rejected}"
    );
    assert_eq!(execution(&server, &id).await["status"], "TIMED_OUT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_a_pending_execution_once() {
    let (_dir, server) = setup(&[]).await;
    let mut lamp = device(&server).await;
    let (_, created) = send(&server, json!({"action":"reboot","ttl":60})).await;
    let id = created["executionId"].as_str().expect("id").to_owned();
    let _ = lamp.next().await;
    let cancel = server.url(&format!("/api/v1/things/lamp/commands/{id}/cancel"));
    let (status, canceled) = call(Method::POST, &cancel, None).await;
    assert_eq!(status, 200, "{canceled}");
    assert_eq!(canceled["status"], "CANCELED");
    let (status, again) = call(Method::POST, &cancel, None).await;
    assert_eq!(status, 409);
    assert!(again["message"]
        .as_str()
        .is_some_and(|m| m.contains("already CANCELED")));
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things/lamp/commands/no-such-id/cancel"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    lamp.publish(
        &response_topic(&id),
        json!({"status":"SUCCEEDED"}).to_string(),
    )
    .await;
    let (_, rejected) = lamp.next().await;
    assert_eq!(rejected["code"], 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_and_bad_answers_get_specific_errors() {
    let (_dir, server) = setup(&[]).await;
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/things/ghost/commands"),
        Some(json!({"action":"x"})),
    )
    .await;
    assert_eq!(
        (status, body["message"].clone()),
        (404, json!("Thing 'ghost' not found"))
    );
    for (body, code, fragment) in [
        (json!({}), 400, "Missing required field: action"),
        (json!({"action": ""}), 400, "action must be 1..="),
        (json!({"action":"x","ttl":0}), 400, "out of range"),
        (json!({"action":"x","ttl":999_999_999}), 400, "out of range"),
        (json!({"action":"x","ttl":"soon"}), 400, "ttl must be"),
        (
            json!({"action":"x","params":[1]}),
            400,
            "params must be a JSON object",
        ),
        (
            json!({"action":"x","params":{"blob":"y".repeat(9000)}}),
            413,
            "params is",
        ),
    ] {
        let (status, answer) = send(&server, body.clone()).await;
        assert_eq!(status, code, "{body} -> {answer}");
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains(fragment)),
            "{body} -> {answer}"
        );
    }
    let (status, _) = call(
        Method::GET,
        &server.url("/api/v1/things/lamp/commands?status=DONE"),
        None,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = call(
        Method::GET,
        &server.url("/api/v1/things/lamp/commands/nope"),
        None,
    )
    .await;
    assert_eq!(status, 404);

    let mut lamp = device(&server).await;
    let (_, created) = send(&server, json!({"action":"reboot"})).await;
    let id = created["executionId"].as_str().expect("id").to_owned();
    let _ = lamp.next().await;
    for (payload, code) in [
        (b"{not json".to_vec(), 400),
        (json!({"status":"DONE"}).to_string().into_bytes(), 400),
        (json!({"result":{}}).to_string().into_bytes(), 400),
    ] {
        lamp.publish(&response_topic(&id), payload).await;
        let (_, rejected) = lamp.next().await;
        assert_eq!(rejected["code"], code, "{rejected}");
    }
    lamp.publish(
        &response_topic("unknown-execution"),
        json!({"status":"SUCCEEDED"}).to_string(),
    )
    .await;
    let (_, rejected) = lamp.next().await;
    assert_eq!(rejected["code"], 404);
    // Still pending: none of that changed it.
    assert_eq!(execution(&server, &id).await["status"], "SENT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_with_a_persistent_session_gets_the_request_on_reconnect() {
    let (_dir, server) = setup(&[]).await;
    {
        let (mut lamp, _) = Device::connect(&server, "lamp", ("lamp", "pw"), false).await;
        lamp.subscribe(REQUESTS).await;
        lamp.client.disconnect().await.expect("disconnect");
    }
    // Wait (bounded) until the server has seen the disconnect.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, thing) = call(Method::GET, &server.url("/api/v1/things/lamp"), None).await;
        if thing["online"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "still online: {thing}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, created) = send(&server, json!({"action":"reboot","ttl":60})).await;
    let (mut lamp, present) = Device::connect(&server, "lamp", ("lamp", "pw"), false).await;
    assert!(present, "session kept");
    let (topic, request) = lamp.next().await;
    assert!(topic.ends_with("/request"), "{topic}");
    assert_eq!(request["commandId"], created["commandId"]);
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_during_a_kill_9_fires_right_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    register(&server).await;
    let (status, created) = send(&server, json!({"action":"reboot","ttl":2})).await;
    assert_eq!(status, 201);
    let id = created["executionId"].as_str().expect("id").to_owned();
    let expires = created["expiresAt"].as_u64().expect("expiresAt");
    server.kill9();
    // Stay down until the deadline has passed (bounded: the ttl is 2 s).
    while now_ms() <= expires + 200 {
        assert!(now_ms() < expires + 10_000, "clock did not advance");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let restarting = now_ms();
    let server = Server::start(dir.path(), &[]);
    let timed_out = wait_for_status(&server, &id, "TIMED_OUT").await;
    let completed = timed_out["completedAt"].as_u64().expect("completedAt");
    assert!(
        completed >= restarting,
        "fired after the restart: {timed_out}"
    );
    let (_, history) = call(
        Method::GET,
        &server.url("/api/v1/things/lamp/history"),
        None,
    )
    .await;
    assert!(history["items"]
        .as_array()
        .expect("items")
        .iter()
        .any(|e| e["type"] == "CommandTimedOut"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_compat_devices_use_the_aws_commands_topics_and_errors() {
    let (_dir, server) = setup(&["--aws-compat"]).await;
    let (mut lamp, _) = Device::connect(&server, "lamp", ("lamp", "pw"), true).await;
    lamp.subscribe("$aws/commands/things/lamp/executions/+/request/json")
        .await;
    lamp.subscribe("$aws/commands/things/lamp/executions/+/response/+/json")
        .await;
    let (_, created) = send(&server, json!({"action":"unlock","params":{"door":1}})).await;
    let id = created["executionId"].as_str().expect("id").to_owned();
    let (topic, request) = lamp.next().await;
    assert_eq!(
        topic,
        format!("$aws/commands/things/lamp/executions/{id}/request/json")
    );
    assert_eq!(request["action"], "unlock");
    let response = format!("$aws/commands/things/lamp/executions/{id}/response/json");
    lamp.publish(
        &response,
        json!({"status":"FAILED","statusReason":{"reasonCode":"DOOR_JAMMED","reasonDescription":"stuck"}})
            .to_string(),
    )
    .await;
    let (topic, accepted) = lamp.next().await;
    assert_eq!(
        topic,
        format!("$aws/commands/things/lamp/executions/{id}/response/accepted/json")
    );
    assert_eq!(accepted, json!({"executionId": id}));
    let failed = execution(&server, &id).await;
    assert_eq!(failed["status"], "FAILED");
    assert_eq!(failed["statusReason"]["reasonCode"], "DOOR_JAMMED");

    lamp.publish(&response, json!({"status":"SUCCEEDED"}).to_string())
        .await;
    let (topic, rejected) = lamp.next().await;
    assert!(topic.ends_with("/response/rejected/json"), "{topic}");
    assert_eq!(rejected["error"], "TerminalStateReached");
    assert_eq!(rejected["executionId"], id.as_str());
}
