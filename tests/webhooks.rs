//! Webhooks against the real server and a real HTTP receiver on 127.0.0.1: records of every
//! kind in order, signed; retries through a failing receiver; a kill -9 during delivery loses
//! nothing; a refused batch goes to the dead-letter list and replays.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::device::Device;
use common::{call, create, Server};
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &str = "hook-secret";

/// What the receiver answers and what it accepted.
#[derive(Default)]
struct Receiver {
    /// Answer this status to the next `failures` requests, then 200.
    failures: AtomicUsize,
    failure_status: AtomicU16,
    /// Records of the requests answered 200, in arrival order.
    accepted: Mutex<Vec<Value>>,
    /// Requests with a wrong or missing signature.
    bad_signatures: AtomicUsize,
    requests: AtomicUsize,
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    receiver.requests.fetch_add(1, Ordering::SeqCst);
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(&body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let signature = headers
        .get("x-thinghub-signature")
        .and_then(|v| v.to_str().ok());
    if signature != Some(format!("sha256={expected}").as_str()) {
        receiver.bad_signatures.fetch_add(1, Ordering::SeqCst);
    }
    let failing = receiver
        .failures
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        return StatusCode::from_u16(receiver.failure_status.load(Ordering::SeqCst))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let records: Vec<Value> = serde_json::from_slice(&body).expect("a JSON array of records");
    receiver.accepted.lock().expect("lock").extend(records);
    StatusCode::OK
}

/// Starts a receiver on 127.0.0.1:0; returns it and its URL.
async fn receiver() -> (Arc<Receiver>, String) {
    let receiver = Arc::new(Receiver::default());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    (receiver, url)
}

fn accepted(receiver: &Receiver) -> Vec<Value> {
    receiver.accepted.lock().expect("lock").clone()
}

/// Waits (bounded) until the receiver accepted records of every kind in `kinds`.
async fn wait_for_kinds(receiver: &Receiver, kinds: &[&str]) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let records = accepted(receiver);
        let seen: HashSet<&str> = records.iter().filter_map(|r| r["kind"].as_str()).collect();
        if kinds.iter().all(|k| seen.contains(k)) {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "kinds {kinds:?} not all delivered; got {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn webhook(server: &Server, url: &str) -> String {
    let created = create(
        server,
        "/api/v1/webhooks",
        json!({"url": url, "secret": SECRET, "batchMax": 3}),
    )
    .await;
    assert_eq!(created["hasSecret"], true, "{created}");
    assert!(created.get("secret").is_none(), "the secret is never shown");
    created["id"].as_str().expect("id").to_owned()
}

/// A device's life: registered, connected, a shadow update, an event, a command answered.
async fn traffic(server: &Server) {
    common::register_device(server, "lamp", "pw").await;
    let (mut lamp, _) = Device::connect(server, "lamp", ("lamp", "pw"), true).await;
    lamp.subscribe("$emqx/commands/things/lamp/executions/+/request")
        .await;
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things/lamp/shadow"),
        Some(json!({"state": {"desired": {"on": true}}})),
    )
    .await;
    assert_eq!(status, 200);
    create(
        server,
        "/api/v1/thing-datas/events",
        json!({"thingName": "lamp", "eventType": "boot", "severity": "info"}),
    )
    .await;
    let sent = create(
        server,
        "/api/v1/things/lamp/commands",
        json!({"action": "blink", "ttl": 60}),
    )
    .await;
    let id = sent["executionId"].as_str().expect("id");
    lamp.next().await;
    lamp.publish(
        &format!("$emqx/commands/things/lamp/executions/{id}/response"),
        json!({"status": "SUCCEEDED"}).to_string(),
    )
    .await;
    // Durable once the execution shows it (only then is it an acknowledged change).
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, execution) = call(
            Method::GET,
            &server.url(&format!("/api/v1/things/lamp/commands/{id}")),
            None,
        )
        .await;
        if execution["status"] == "SUCCEEDED" {
            break;
        }
        assert!(Instant::now() < deadline, "answered: {execution}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const KINDS: [&str; 6] = [
    "thing.registered",
    "thing.connected",
    "shadow.updated",
    "event.ingested",
    "command.sent",
    "command.answered",
];

fn assert_in_order_without_duplicates(records: &[Value]) {
    let ids: Vec<&str> = records.iter().filter_map(|r| r["id"].as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no record twice: {ids:?}");
    let positions: Vec<u64> = records
        .iter()
        .filter_map(|r| r["position"].as_u64())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] <= w[1]),
        "feed order: {positions:?}"
    );
    let seqs: Vec<u64> = records
        .iter()
        .filter(|r| r["thingName"] == "lamp")
        .filter_map(|r| r["seq"].as_u64())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "per-Thing order: {seqs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_gets_every_kind_in_order_signed_through_a_failing_receiver() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_configured(
        dir.path(),
        "webhook_retry_base_ms = 20\nwebhook_retry_max_ms = 200\n",
    );
    let (receiver, url) = receiver().await;
    receiver.failure_status.store(500, Ordering::SeqCst);
    receiver.failures.store(4, Ordering::SeqCst);
    let id = webhook(&server, &url).await;

    traffic(&server).await;
    let records = wait_for_kinds(&receiver, &KINDS).await;
    assert_in_order_without_duplicates(&records);
    let connected = records
        .iter()
        .find(|r| r["kind"] == "thing.connected")
        .expect("connected");
    assert_eq!(connected["clientId"], "lamp", "{connected}");
    // The shadow record carries the change, the version and the delta after it.
    let updated = records
        .iter()
        .find(|r| r["kind"] == "shadow.updated")
        .expect("updated");
    let event = &updated["data"]["ShadowUpdated"];
    assert_eq!(event["desired"]["merge"], json!({"on": true}), "{updated}");
    assert_eq!(event["delta"], json!({"on": true}), "{updated}");
    assert_eq!(event["version"], 1, "{updated}");
    assert_eq!(receiver.bad_signatures.load(Ordering::SeqCst), 0);

    let (status, view) = call(
        Method::GET,
        &server.url(&format!("/api/v1/webhooks/{id}")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{view}");
    let delivery = &view["status"];
    assert!(delivery["retried"].as_u64() >= Some(4), "{view}");
    assert!(
        delivery["delivered"].as_u64() >= Some(KINDS.len() as u64),
        "{view}"
    );
    assert!(
        delivery["lastError"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("500")),
        "{view}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_during_delivery_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = "webhook_retry_base_ms = 20\nwebhook_retry_max_ms = 100\n";
    let server = Server::start_configured(dir.path(), toml);
    let (receiver, url) = receiver().await;
    // The receiver refuses everything (retried) while the server is killed.
    receiver.failure_status.store(503, Ordering::SeqCst);
    receiver.failures.store(usize::MAX, Ordering::SeqCst);
    webhook(&server, &url).await;
    traffic(&server).await;
    let deadline = Instant::now() + WAIT;
    while receiver.requests.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "delivery attempted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill9();
    receiver.failures.store(0, Ordering::SeqCst);
    let server = Server::start_configured(dir.path(), toml);
    let records = wait_for_kinds(&receiver, &KINDS).await;
    assert_in_order_without_duplicates(&records);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_batches_go_to_the_dead_letters_and_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let (receiver, url) = receiver().await;
    receiver.failure_status.store(400, Ordering::SeqCst);
    receiver.failures.store(usize::MAX, Ordering::SeqCst);
    let id = webhook(&server, &url).await;
    common::register_device(&server, "lamp", "pw").await;

    let letters_url = server.url(&format!("/api/v1/webhooks/{id}/dead-letters"));
    let deadline = Instant::now() + WAIT;
    let letters = loop {
        let (status, body) = call(Method::GET, &letters_url, None).await;
        assert_eq!(status, 200, "{body}");
        if body["items"]
            .as_array()
            .is_some_and(|items| !items.is_empty())
        {
            break body;
        }
        assert!(Instant::now() < deadline, "dead-lettered in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let letter = &letters["items"][0];
    assert_eq!(letter["status"], 400, "{letter}");
    // Paged: a full page names the next one.
    let (_, first) = call(Method::GET, &format!("{letters_url}?limit=1"), None).await;
    let cursor = first["nextCursor"]
        .as_str()
        .expect("a full page has a cursor");
    let (_, rest) = call(
        Method::GET,
        &format!("{letters_url}?limit=1&cursor={cursor}"),
        None,
    )
    .await;
    assert!(
        rest["items"]
            .as_array()
            .is_some_and(|items| items.iter().all(|l| l["id"] != letter["id"])),
        "{rest}"
    );
    assert_eq!(letter["records"][0]["kind"], "thing.registered", "{letter}");
    assert!(accepted(&receiver).is_empty());

    receiver.failures.store(0, Ordering::SeqCst);
    let (status, replay) = call(
        Method::POST,
        &server.url(&format!("/api/v1/webhooks/{id}/dead-letters/replay")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{replay}");
    assert_eq!(replay["left"], 0, "{replay}");
    assert!(replay["replayed"].as_u64() >= Some(1), "{replay}");
    assert_eq!(accepted(&receiver)[0]["kind"], "thing.registered");
    let (_, after) = call(Method::GET, &letters_url, None).await;
    assert_eq!(after["items"], json!([]));

    // Bad input is refused with what is wrong.
    for (body, needle) in [
        (json!({"url": "ftp://x/y"}), "http or https"),
        (json!({"url": url, "kinds": ["nope"]}), "unknown kind"),
        (json!({"url": url, "batchMax": 0}), "batchMax"),
        (
            json!({"url": url, "headers": {"Content-Type": "x"}}),
            "set by the server",
        ),
    ] {
        let (status, error) = call(Method::POST, &server.url("/api/v1/webhooks"), Some(body)).await;
        assert_eq!(status, 400, "{error}");
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains(needle)),
            "{error}"
        );
    }
    let (status, _) = call(
        Method::DELETE,
        &server.url(&format!("/api/v1/webhooks/{id}")),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = call(Method::GET, &letters_url, None).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_dead_letter_delivery_goes_on_with_the_next_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let (receiver, url) = receiver().await;
    receiver.failure_status.store(400, Ordering::SeqCst);
    receiver.failures.store(1, Ordering::SeqCst);
    let created = create(
        &server,
        "/api/v1/webhooks",
        json!({"url": url, "secret": SECRET, "batchMax": 1, "kinds": ["thing.registered"]}),
    )
    .await;
    let id = created["id"].as_str().expect("id");
    create(&server, "/api/v1/things", json!({"thingName": "first"})).await;
    create(&server, "/api/v1/things", json!({"thingName": "second"})).await;
    let deadline = Instant::now() + WAIT;
    while !accepted(&receiver)
        .iter()
        .any(|r| r["thingName"] == "second")
    {
        assert!(Instant::now() < deadline, "the next record is delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, letters) = call(
        Method::GET,
        &server.url(&format!("/api/v1/webhooks/{id}/dead-letters")),
        None,
    )
    .await;
    let items = letters["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{letters}");
    assert_eq!(items[0]["records"][0]["thingName"], "first");
    assert_eq!(items[0]["records"][0]["id"], "first:1");
    assert_eq!(
        receiver.requests.load(Ordering::SeqCst),
        2,
        "the refused batch is not sent again"
    );
}

/// Broker events (in no Thing's log): subscriptions made and removed, and the messages on the
/// webhook's topic filters, from a client and from the HTTP publish API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_events_reach_a_webhook_by_kind_and_topic_filter() {
    let (_dir, server) = common::start_with_backend("").await;
    let (receiver, url) = receiver().await;
    for (body, why) in [
        (
            json!({"url": &url, "kinds": ["message.published"]}),
            "needs topicFilters",
        ),
        (
            json!({"url": &url, "kinds": ["thing.connected"], "topicFilters": ["a/#"]}),
            "add 'message.published'",
        ),
        (
            json!({"url": &url, "topicFilters": ["a/#/b"]}),
            "topic filter 'a/#/b'",
        ),
        (
            json!({"url": &url, "topicFilters": ["$share/g/a"]}),
            "shared subscription",
        ),
        (
            json!({"url": &url, "kinds": ["client.connected"]}),
            "unknown kind",
        ),
    ] {
        let (status, answer) =
            call(Method::POST, &server.url("/api/v1/webhooks"), Some(body)).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer.to_string().contains(why), "{why}: {answer}");
    }
    let created = create(
        &server,
        "/api/v1/webhooks",
        json!({"url": url, "secret": SECRET,
               "kinds": ["client.subscribed", "client.unsubscribed", "message.published"],
               "topicFilters": ["plant/+/temp"]}),
    )
    .await;
    assert_eq!(
        created["topicFilters"],
        json!(["plant/+/temp"]),
        "{created}"
    );
    let id = created["id"].as_str().expect("id").to_owned();

    let (mut app, _) = Device::connect(&server, "app", common::BACKEND, true).await;
    app.subscribe("plant/#").await;
    app.publish("plant/1/temp", "21.5").await;
    app.publish("plant/1/humidity", "40").await;
    // The app receives both (they were routed); the webhook only the temperature.
    app.next().await;
    app.next().await;
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/publish"),
        Some(json!({"topic": "plant/2/temp", "payload": "19", "qos": 1})),
    )
    .await;
    assert_eq!(status, 200);
    app.client
        .unsubscribe("plant/#")
        .await
        .expect("unsubscribe");

    wait_for_kinds(
        &receiver,
        &[
            "client.subscribed",
            "message.published",
            "client.unsubscribed",
        ],
    )
    .await;
    let deadline = Instant::now() + WAIT;
    let records = loop {
        let now = accepted(&receiver);
        let messages = now
            .iter()
            .filter(|r| r["kind"] == "message.published")
            .count();
        if messages >= 2 || Instant::now() >= deadline {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let messages: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "message.published")
        .collect();
    assert_eq!(messages.len(), 2, "{records:?}");
    assert_eq!(messages[0]["clientId"], "app");
    assert_eq!(messages[0]["data"]["topic"], "plant/1/temp");
    assert_eq!(messages[0]["data"]["payload"], "21.5");
    assert_eq!(messages[0]["data"]["username"], common::BACKEND.0);
    assert_eq!(messages[1]["data"]["via"], "http");
    assert!(messages[1].get("clientId").is_none(), "{}", messages[1]);
    let subscribed = records
        .iter()
        .find(|r| r["kind"] == "client.subscribed")
        .expect("subscribed");
    assert_eq!(subscribed["data"]["filter"], "plant/#");
    assert_eq!(subscribed["data"]["qos"], 1);
    let ids: HashSet<&str> = records.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(ids.len(), records.len(), "distinct ids");
    assert!(records
        .iter()
        .all(|r| r["id"].as_str().is_some_and(|id| id.starts_with("mqtt:"))));
    assert_eq!(receiver.bad_signatures.load(Ordering::SeqCst), 0);

    let (_, status) = call(
        Method::GET,
        &server.url(&format!("/api/v1/webhooks/{id}")),
        None,
    )
    .await;
    assert_eq!(status["status"]["brokerDropped"], 0, "{status}");
    assert_eq!(status["status"]["brokerQueued"], 0, "{status}");

    // Kinds without messages: the topic filters go with them.
    let (code, changed) = call(
        Method::PUT,
        &server.url(&format!("/api/v1/webhooks/{id}")),
        Some(json!({"kinds": ["client.subscribed"]})),
    )
    .await;
    assert_eq!(code, 200, "{changed}");
    assert_eq!(changed["topicFilters"], Value::Null, "{changed}");
}
