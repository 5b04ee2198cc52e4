//! Offline alarms end to end: a rule, a device that goes away, the alarm raised by a durable
//! deadline (across a kill -9), acknowledged, cleared when the device is back; a rule created
//! while Things are already offline; refusals.

mod common;

use std::time::{Duration, Instant};

use common::device::{Device, WAIT};
use common::{call, create, Server};
use reqwest::Method;
use serde_json::{json, Value};

async fn get(server: &Server, path: &str) -> Value {
    let (status, body) = call(Method::GET, &server.url(path), None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// Waits (bounded) until `GET path` answers a body `done` accepts.
async fn until(server: &Server, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let body = get(server, path).await;
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "GET {path}: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn alarm_of<'a>(page: &'a Value, thing: &str) -> Option<&'a Value> {
    page["items"]
        .as_array()?
        .iter()
        .find(|a| a["thingName"] == thing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_alarm_is_raised_across_a_restart_acknowledged_and_cleared_on_reconnect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let rule = create(
        &server,
        "/api/v1/alarm-rules",
        json!({"name": "offline-2s", "offlineForSeconds": 2, "severity": "MAJOR"}),
    )
    .await;
    assert_eq!(rule["offlineForSeconds"], 2, "{rule}");
    common::register_device(&server, "lamp", "pw").await;
    common::register_device(&server, "stays", "pw").await;

    let (device, _) = Device::connect(&server, "lamp", ("lamp", "pw"), true).await;
    let (_stays, _) = Device::connect(&server, "stays", ("stays", "pw"), true).await;
    device.client.disconnect().await.expect("disconnect");
    // The watch is durable once the disconnect is: kill -9 before the deadline.
    until(&server, "/api/v1/things/lamp", |t| t["online"] == false).await;
    let started = Instant::now();
    server.kill9();

    let server = Server::start(dir.path(), &[]);
    // "stays" comes back at once: a restart gives every device the rule's time, so no alarm.
    let (_stays, _) = Device::connect(&server, "stays", ("stays", "pw"), true).await;
    let page = until(&server, "/api/v1/alarms?status=ACTIVE", |page| {
        alarm_of(page, "lamp").is_some()
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "not before its time"
    );
    let alarm = alarm_of(&page, "lamp").expect("lamp's alarm");
    assert_eq!(alarm["type"], "offline-2s", "{alarm}");
    assert_eq!(alarm["severity"], "MAJOR");
    assert!(alarm["offlineSince"].as_u64() < alarm["raisedAt"].as_u64());
    assert!(
        alarm["text"].as_str().unwrap_or("").contains("offline-2s"),
        "{alarm}"
    );
    assert!(alarm_of(&page, "stays").is_none(), "back in time: {page}");
    // Audit: the raise is in the Thing's history.
    let history = get(&server, "/api/v1/things/lamp/history?limit=100").await;
    assert!(history.to_string().contains("AlarmRaised"), "{history}");

    let (status, acked) = call(
        Method::POST,
        &server.url("/api/v1/things/lamp/alarms/offline-2s/acknowledge"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{acked}");
    assert_eq!(acked["status"], "ACKNOWLEDGED");
    assert_eq!(acked["acknowledgedBy"], common::ADMIN_KEY);
    let acknowledged = get(&server, "/api/v1/alarms?status=ACKNOWLEDGED&severity=MAJOR").await;
    assert!(alarm_of(&acknowledged, "lamp").is_some(), "{acknowledged}");
    let none = get(&server, "/api/v1/alarms?status=ACTIVE").await;
    assert!(alarm_of(&none, "lamp").is_none(), "{none}");

    let (_back, _) = Device::connect(&server, "lamp", ("lamp", "pw"), true).await;
    let cleared = until(&server, "/api/v1/things/lamp/alarms", |body| {
        body["items"][0]["status"] == "CLEARED"
    })
    .await;
    assert_eq!(
        cleared["items"][0]["clearedReason"], "reconnected",
        "{cleared}"
    );
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/things/lamp/alarms/offline-2s/acknowledge"),
        None,
    )
    .await;
    assert_eq!(status, 409, "a cleared alarm: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_reaches_things_already_offline_by_type_and_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    for (name, thing_type) in [("pump-1", "pump"), ("pump-2", "pump"), ("fan-1", "fan")] {
        create(
            &server,
            "/api/v1/things",
            json!({"thingName": name, "thingType": thing_type}),
        )
        .await;
        create(
            &server,
            "/api/v1/authentication/users",
            json!({"username": name, "password": "pw"}),
        )
        .await;
        let (device, _) = Device::connect(&server, name, (name, "pw"), true).await;
        device.client.disconnect().await.expect("disconnect");
        until(&server, &format!("/api/v1/things/{name}"), |t| {
            t["online"] == false
        })
        .await;
    }
    create(
        &server,
        "/api/v1/thing-groups",
        json!({"groupName": "hall"}),
    )
    .await;
    create(
        &server,
        "/api/v1/thing-groups/hall/things",
        json!({"thingName": "fan-1"}),
    )
    .await;

    create(
        &server,
        "/api/v1/alarm-rules",
        json!({"name": "pumps", "offlineForSeconds": 1, "thingType": "pump", "severity": "CRITICAL"}),
    )
    .await;
    create(
        &server,
        "/api/v1/alarm-rules",
        json!({"name": "hall", "offlineForSeconds": 1, "thingGroup": "hall", "severity": "MINOR"}),
    )
    .await;
    // The name of a device's own required-interval alarm is not a rule's to take.
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/alarm-rules"),
        Some(
            json!({"name": "c8y_UnavailabilityAlarm", "offlineForSeconds": 1, "severity": "MAJOR"}),
        ),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // (its alarm is still an alarm operators act on: none here, so 404, not a refused name)
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/things/fan-1/alarms/c8y_UnavailabilityAlarm/acknowledge"),
        None,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let page = until(&server, "/api/v1/alarms", |page| {
        page["items"].as_array().map(Vec::len) == Some(3)
    })
    .await;
    let kinds: Vec<(String, String)> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|a| {
            (
                a["thingName"].as_str().unwrap_or("").to_owned(),
                a["type"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [("fan-1", "hall"), ("pump-1", "pumps"), ("pump-2", "pumps")]
            .map(|(a, b)| (a.to_owned(), b.to_owned())),
        "{page}"
    );
    // Paged one at a time, the cursor walks the same list.
    let first = get(&server, "/api/v1/alarms?limit=1").await;
    let cursor = first["nextCursor"].as_str().expect("cursor").to_owned();
    let second = get(&server, &format!("/api/v1/alarms?limit=1&cursor={cursor}")).await;
    assert_eq!(second["items"][0]["thingName"], "pump-1", "{second}");
    let critical = get(&server, "/api/v1/alarms?severity=CRITICAL").await;
    assert_eq!(critical["items"].as_array().map(Vec::len), Some(2));

    // A Thing that joins the group while offline is watched by the group's rule at once.
    create(
        &server,
        "/api/v1/thing-groups/hall/things",
        json!({"thingName": "pump-1"}),
    )
    .await;
    let page = until(&server, "/api/v1/things/pump-1/alarms", |body| {
        body["items"].as_array().map(Vec::len) == Some(2)
    })
    .await;
    assert_eq!(page["items"][0]["type"], "hall", "{page}");

    let rules = get(&server, "/api/v1/alarm-rules").await;
    assert_eq!(rules["items"][0]["name"], "hall", "{rules}");
    let (status, _) = call(
        Method::DELETE,
        &server.url("/api/v1/alarm-rules/hall"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = call(Method::GET, &server.url("/api/v1/alarm-rules/hall"), None).await;
    assert_eq!(status, 404);
    // Deleting the Thing takes its alarms out of the listing.
    let (status, _) = call(Method::DELETE, &server.url("/api/v1/things/pump-2"), None).await;
    assert_eq!(status, 204);
    let page = get(&server, "/api/v1/alarms").await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(3), "{page}");

    // `thinghub check` knows every record alarms (and webhooks) store.
    create(
        &server,
        "/api/v1/webhooks",
        json!({"url": "http://127.0.0.1:9/hook", "enabled": false}),
    )
    .await;
    let (exit, _) = server.stop();
    assert!(exit.success());
    common::assert_check_finds_no_problem(dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_and_filters_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let cases = [
        (
            json!({"offlineForSeconds": 60, "severity": "MAJOR"}),
            "name",
        ),
        (
            json!({"name": "r", "severity": "MAJOR"}),
            "offlineForSeconds",
        ),
        (json!({"name": "r", "offlineForSeconds": 60}), "severity"),
        (
            json!({"name": "r", "offlineForSeconds": 60, "severity": "LOUD"}),
            "severity",
        ),
        (
            json!({"name": "r", "offlineForSeconds": 0, "severity": "MAJOR"}),
            "offlineForSeconds",
        ),
        (
            json!({"name": "r", "offlineForSeconds": -5, "severity": "MAJOR"}),
            "offlineForSeconds",
        ),
        (
            json!({"name": "a/b", "offlineForSeconds": 60, "severity": "MAJOR"}),
            "name",
        ),
        (
            json!({"name": "r", "offlineForSeconds": 60, "severity": "MAJOR", "colour": 1}),
            "colour",
        ),
        (json!([1]), "JSON object"),
    ];
    for (body, names) in cases {
        let (status, answer) = call(
            Method::POST,
            &server.url("/api/v1/alarm-rules"),
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert!(answer.to_string().contains(names), "{body} -> {answer}");
    }
    let rule = json!({"name": "r", "offlineForSeconds": 60, "severity": "WARNING"});
    create(&server, "/api/v1/alarm-rules", rule.clone()).await;
    let (status, _) = call(Method::POST, &server.url("/api/v1/alarm-rules"), Some(rule)).await;
    assert_eq!(status, 409);
    for query in ["status=OPEN", "severity=LOUD", "limit=0", "colour=red"] {
        let (status, answer) = call(
            Method::GET,
            &server.url(&format!("/api/v1/alarms?{query}")),
            None,
        )
        .await;
        assert_eq!(status, 400, "{query} -> {answer}");
    }
    common::register_device(&server, "lamp", "pw").await;
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things/lamp/alarms/r/acknowledge"),
        None,
    )
    .await;
    assert_eq!(status, 404, "no alarm of that type");
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things/nobody/alarms/r/clear"),
        None,
    )
    .await;
    assert_eq!(status, 404, "no such Thing");
}

/// A device still connected when the server is killed is offline after the restart (its
/// connection is recorded as ended, reason server_restart), so its offline alarm comes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_connected_through_a_crash_is_offline_after_the_restart_and_alarmed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    create(
        &server,
        "/api/v1/alarm-rules",
        json!({"name": "gone", "offlineForSeconds": 1, "severity": "CRITICAL"}),
    )
    .await;
    common::register_device(&server, "lamp", "pw").await;
    let (_device, _) = Device::connect(&server, "lamp", ("lamp", "pw"), true).await;
    until(&server, "/api/v1/things/lamp", |t| t["online"] == true).await;
    server.kill9();

    let server = Server::start(dir.path(), &[]);
    let thing = until(&server, "/api/v1/things/lamp", |t| t["online"] == false).await;
    assert_eq!(thing["lastDisconnectReason"], "server_restart", "{thing}");
    let page = until(&server, "/api/v1/alarms?status=ACTIVE", |page| {
        alarm_of(page, "lamp").is_some()
    })
    .await;
    assert_eq!(alarm_of(&page, "lamp").expect("alarm")["type"], "gone");
    let history = get(&server, "/api/v1/things/lamp/connectivity").await;
    assert_eq!(history["items"][0]["reason"], "server_restart", "{history}");
}
