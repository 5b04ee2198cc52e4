//! Effects survive what used to lose them: a crash between a change's commit and its
//! publication (fault injection: the server aborts right there), an HTTP client that hangs up
//! after sending, and a restart with devices away (stored persistent sessions, subscriptions
//! and retained messages; MQTT 3.1.1 and 5.0).

mod common;

use std::time::{Duration, Instant};

use common::device::{Device, WAIT};
use common::mqtt::{Client, Client5};
use common::{call, create, start_with_backend, Server, BACKEND};
use reqwest::Method;
use rumqttc::v5::mqttbytes::v5::Packet as P5;
use rumqttc::{Packet, QoS};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

const FAULT: &str = "THINGHUB_FAULT_ABORT_BEFORE_EFFECT";
const REQUESTS: &str = "$emqx/commands/things/lamp/executions/+/request";
const DELTA: &str = "$emqx/things/lamp/shadow/update/delta";

async fn register_lamp(server: &Server) {
    common::register_device(server, "lamp", "pw").await;
}

async fn metrics(server: &Server) -> Value {
    call(Method::GET, &server.url("/api/v1/metrics"), None)
        .await
        .1
}

/// Waits (bounded) until the MQTT state is durable: nothing changed since the last checkpoint
/// and every checkpoint that wrote was synced.
async fn stored(server: &Server) {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = metrics(server).await;
        if m["mqtt"]["unstoredChanges"] == 0
            && m["mqtt"]["checkpointsWritten"] == m["effects"]["sinkWritesSynced"]
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the MQTT state was not stored in time: {m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A request whose connection is cut by the server aborting: an error, or no answer.
async fn post_into_a_crash(server: &Server, path: &str, body: Value) {
    let sent = common::client()
        .post(server.url(path))
        .basic_auth(common::ADMIN_KEY, Some(common::ADMIN_SECRET))
        .json(&body)
        .send()
        .await;
    assert!(
        sent.is_err(),
        "the server answered although it should have aborted: {sent:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_request_lost_in_a_crash_reaches_the_device_after_the_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start_with_env(dir.path(), &[], &[(FAULT, "command-requested")]);
    register_lamp(&server).await;
    let (mut lamp, _) = Device::connect(&server, "lamp", ("lamp", "pw"), false).await;
    lamp.subscribe(REQUESTS).await;
    stored(&server).await;

    // CommandSent is durable, then the server dies before the request is published.
    post_into_a_crash(
        &server,
        "/api/v1/things/lamp/commands",
        json!({"action":"reboot","params":{"delay":1},"ttl":300}),
    )
    .await;
    assert!(server.exited(), "the fault injection aborted the server");

    let server = Server::start(dir.path(), &[]);
    let (status, page) = call(
        Method::GET,
        &server.url("/api/v1/things/lamp/commands"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let execution_id = page["items"][0]["executionId"]
        .as_str()
        .expect("the command was durable before the crash")
        .to_owned();
    assert_eq!(page["items"][0]["status"], "SENT");

    // The device comes back to its stored session and gets the request it missed.
    let (mut lamp, present) = Device::connect(&server, "lamp", ("lamp", "pw"), false).await;
    assert!(present, "the persistent session survived the crash");
    let (topic, request) = lamp.next().await;
    assert_eq!(
        topic,
        format!("$emqx/commands/things/lamp/executions/{execution_id}/request")
    );
    assert_eq!(request["action"], "reboot");
    assert_eq!(request["params"], json!({"delay":1}));
    lamp.publish(
        &format!("$emqx/commands/things/lamp/executions/{execution_id}/response"),
        json!({"status":"SUCCEEDED"}).to_string(),
    )
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, execution) = call(
            Method::GET,
            &server.url(&format!("/api/v1/things/lamp/commands/{execution_id}")),
            None,
        )
        .await;
        if execution["status"] == "SUCCEEDED" {
            break;
        }
        assert!(Instant::now() < deadline, "still {execution}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = metrics(&server).await["effects"]["recovered"]
        .as_u64()
        .expect("recovered");
    assert!(recovered >= 1, "counted as recovered: {recovered}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desired_change_lost_in_a_crash_reaches_the_device_as_a_delta_after_the_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start_with_env(dir.path(), &[], &[(FAULT, "delta")]);
    register_lamp(&server).await;
    let (mut lamp, _) = Device::connect(&server, "lamp", ("lamp", "pw"), false).await;
    lamp.subscribe(DELTA).await;
    stored(&server).await;

    post_into_a_crash(
        &server,
        "/api/v1/things/lamp/shadow",
        json!({"state":{"desired":{"speed":5}}}),
    )
    .await;
    assert!(server.exited(), "the fault injection aborted the server");

    let server = Server::start(dir.path(), &[]);
    let (mut lamp, present) = Device::connect(&server, "lamp", ("lamp", "pw"), false).await;
    assert!(present);
    let (topic, delta) = lamp.next().await;
    assert_eq!(topic, DELTA);
    assert_eq!(delta["state"], json!({"speed":5}));
    assert_eq!(
        delta["version"], 1,
        "the version of the change that was lost"
    );
}

/// The commands of `lamp` listed by the API, once at least `count` are (bounded wait).
async fn listed(server: &Server, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, page) = call(
            Method::GET,
            &server.url("/api/v1/things/lamp/commands"),
            None,
        )
        .await;
        // 503 while the Thing holds a reply.
        let items = page["items"].as_array().cloned().unwrap_or_default();
        if items.len() >= count {
            return items;
        }
        assert!(Instant::now() < deadline, "commands not made: {page}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Thing holds its reply to a sent command for 3 s after the command is durable: the HTTP
/// client hangs up meanwhile (axum drops the handler), or its request times out (503). Before
/// effects came from the Thing, the handler published the request after the reply, so in both
/// cases the device never got it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_reaches_the_device_when_the_http_client_hangs_up_or_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("thinghub.toml"),
        "request_timeout_ms = 1000\n",
    )
    .expect("config");
    let config = dir.path().join("thinghub.toml");
    let server = Server::start_with_env(
        &dir.path().join("data"),
        &["--config", config.to_str().expect("UTF-8")],
        &[("THINGHUB_FAULT_HOLD_COMMAND_REPLY_MS", "3000")],
    );
    register_lamp(&server).await;
    let (mut lamp, _) = Device::connect(&server, "lamp", ("lamp", "pw"), true).await;
    lamp.subscribe(REQUESTS).await;

    // Hang up once the command is durable, before the (held) answer.
    let body = json!({"action":"blink","ttl":60}).to_string();
    let credentials = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            common::ADMIN_KEY,
            common::ADMIN_SECRET
        ))
    };
    let mut socket = tokio::net::TcpStream::connect(server.http)
        .await
        .expect("connect");
    let request = format!(
        "POST /api/v1/things/lamp/commands HTTP/1.1\r\nHost: thinghub\r\nAuthorization: Basic {credentials}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let delivered = |m: &Value| m["effects"]["delivered"].as_u64().expect("delivered");
    let before = delivered(&metrics(&server).await);
    socket
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    // The Thing's actor is holding its reply now (and answers nothing else meanwhile): the
    // metrics show when the command is durable.
    let deadline = Instant::now() + WAIT;
    while delivered(&metrics(&server).await) == before {
        assert!(
            Instant::now() < deadline,
            "the command was not made durable"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(socket);
    let (topic, request) = lamp.next().await;
    assert!(
        topic.starts_with("$emqx/commands/things/lamp/executions/"),
        "{topic}"
    );
    assert_eq!(request["action"], "blink");

    // Time out: 503 for the client, and the command is made all the same.
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/things/lamp/commands"),
        Some(json!({"action":"reboot","ttl":60})),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    let (_, request) = lamp.next().await;
    assert_eq!(request["action"], "reboot");
    let actions: Vec<Value> = listed(&server, 2)
        .await
        .iter()
        .map(|e| e["action"].clone())
        .collect();
    assert_eq!(actions, [json!("reboot"), json!("blink")], "newest first");
}

/// What a persistent subscriber left behind before a restart: three QoS 1 messages queued for
/// it, and a retained message.
/// Waits (bounded) until the server has closed `client_id`'s connection (its session kept).
async fn until_offline(server: &Server, client_id: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, client) = common::call(
            reqwest::Method::GET,
            &server.url(&format!("/api/v1/clients/{client_id}")),
            None,
        )
        .await;
        if status == 200 && client["connected"] == false {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{client_id} still connected: {client}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn leave_messages(server: &Server) {
    let (mut publisher, _) = Client::connect(server, "publisher", Some(BACKEND), |_| {})
        .await
        .expect("publisher");
    for n in 1..=3 {
        publisher
            .client
            .publish("fleet/a/cmd", QoS::AtLeastOnce, false, format!("m{n}"))
            .await
            .expect("publish");
        publisher
            .expect("PUBACK", |p| matches!(p, Packet::PubAck(_)).then_some(()))
            .await;
    }
    publisher
        .client
        .publish("fleet/a/state", QoS::AtLeastOnce, true, "on")
        .await
        .expect("publish");
    publisher
        .expect("PUBACK", |p| matches!(p, Packet::PubAck(_)).then_some(()))
        .await;
    publisher.client.disconnect().await.expect("disconnect");
}

/// After the restart: a new message on a topic only the restored subscription matches, and
/// the retained message for a new subscriber.
async fn check_after_restart(server: &Server) {
    let (publisher, _) = Client::connect(server, "publisher", Some(BACKEND), |_| {})
        .await
        .expect("publisher");
    let (mut fresh, _) = Client::connect(server, "fresh", Some(BACKEND), |_| {})
        .await
        .expect("fresh");
    fresh.subscribe("fleet/+/state", QoS::AtLeastOnce).await;
    let retained = fresh.publish_on("fleet/a/state").await;
    assert!(retained.retain, "the retained message survived the restart");
    assert_eq!(&retained.payload[..], b"on");
    publisher
        .client
        .publish("fleet/b/cmd", QoS::AtLeastOnce, false, "after")
        .await
        .expect("publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v311_persistent_session_survives_a_kill_9_with_its_queue_and_subscriptions() {
    let (dir, server) = start_with_backend("").await;
    let (mut subscriber, _) = Client::connect(&server, "sub-311", Some(BACKEND), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("subscriber");
    subscriber.subscribe("fleet/+/cmd", QoS::AtLeastOnce).await;
    subscriber.client.disconnect().await.expect("disconnect");
    // Offline before anything is published: a message the still-open connection received
    // (and acknowledged) would never be queued for the session.
    until_offline(&server, "sub-311").await;
    leave_messages(&server).await;
    stored(&server).await;
    server.kill9();

    let server = Server::start_configured(dir.path(), "");
    let (mut subscriber, present) = Client::connect(&server, "sub-311", Some(BACKEND), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("subscriber again");
    assert!(present, "session present after the restart");
    for n in 1..=3 {
        let message = subscriber.publish_on("fleet/a/cmd").await;
        assert_eq!(message.payload, format!("m{n}").as_bytes(), "in order");
    }
    check_after_restart(&server).await;
    let message = subscriber.publish_on("fleet/b/cmd").await;
    assert_eq!(
        &message.payload[..],
        b"after",
        "the subscription was restored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_persistent_session_survives_a_restart_with_its_queue_and_subscriptions() {
    let (dir, server) = start_with_backend("").await;
    let options = |server: &Server| {
        let mut options = Client5::options(server, "sub-5", BACKEND);
        options.set_clean_start(false);
        let mut properties = rumqttc::v5::mqttbytes::v5::ConnectProperties::new();
        properties.session_expiry_interval = Some(3600);
        options.set_connect_properties(properties);
        options
    };
    let mut subscriber = Client5::connect(options(&server))
        .await
        .expect("subscriber");
    subscriber.subscribe("fleet/+/cmd").await;
    subscriber.client.disconnect().await.expect("disconnect");
    // Offline before anything is published: a message the still-open connection received
    // (and acknowledged) would never be queued for the session.
    until_offline(&server, "sub-5").await;
    leave_messages(&server).await;
    let (exit, _) = server.stop();
    assert!(exit.success());

    let server = Server::start_configured(dir.path(), "");
    let mut subscriber = Client5::connect(options(&server))
        .await
        .expect("subscriber again");
    assert!(subscriber.connack.session_present, "session present");
    for n in 1..=3 {
        let message = subscriber.next_publish("a queued message").await;
        assert_eq!(&message.topic[..], b"fleet/a/cmd");
        assert_eq!(message.payload, format!("m{n}").as_bytes(), "in order");
    }
    check_after_restart(&server).await;
    let message = subscriber
        .expect("the new message", |p| match p {
            P5::Publish(p) if &p.topic[..] == b"fleet/b/cmd" => Some(p.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        &message.payload[..],
        b"after",
        "the subscription was restored"
    );
}

/// A Thing deleted in a crash (after `ThingDeleted` is durable, before its session is closed):
/// its stored session must not come back. Before the deletion's effect was re-derived and the
/// restore checked that a Thing's session still holds a client id its Thing reserves, the
/// deleted device's session (with its queued command requests) was restored and held the freed
/// client id: anyone else connecting with it was refused as a takeover, for as long as the
/// session lived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_of_a_thing_deleted_in_a_crash_is_not_restored_for_anyone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start_with_env(dir.path(), &[], &[(FAULT, "thing-deleted")]);
    create(&server, "/api/v1/things", json!({"thingName":"lamp"})).await;
    for (username, thing) in [("lamp-user", Some("lamp")), ("other", None)] {
        let mut user = json!({"username": username, "password": "pw"});
        if let Some(thing) = thing {
            user["thingName"] = thing.into();
        }
        create(&server, "/api/v1/authentication/users", user).await;
    }
    let (mut lamp, _) = Device::connect(&server, "lamp", ("lamp-user", "pw"), false).await;
    lamp.subscribe(REQUESTS).await;
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things/lamp/commands"),
        Some(json!({"action":"reboot","ttl":300})),
    )
    .await;
    assert_eq!(status, 201);
    lamp.next().await;
    stored(&server).await;

    let gone = common::client()
        .delete(server.url("/api/v1/things/lamp"))
        .basic_auth(common::ADMIN_KEY, Some(common::ADMIN_SECRET))
        .send()
        .await;
    assert!(gone.is_err(), "the server aborted: {gone:?}");
    assert!(server.exited(), "the fault injection aborted the server");

    let server = Server::start(dir.path(), &[]);
    let (_, present) = Device::connect(&server, "lamp", ("other", "pw"), false).await;
    assert!(
        !present,
        "the freed client id is usable and nothing of the deleted Thing's session is left"
    );
}

/// When storage cannot make a persistent session's subscriptions durable within
/// `mqtt_subscribe_durable_wait_ms` (fault injection: the sink's checkpoints fail), the new
/// filters are refused and removed; a filter the session already had, durably, is subscribed
/// again and must stay (it used to be removed with the new ones, silently ending a subscription
/// the device relied on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_not_durable_in_time_is_refused_without_removing_one_already_held() {
    let (dir, server) = start_with_backend("").await;
    let (mut subscriber, _) = Client::connect(&server, "sub", Some(BACKEND), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("subscriber");
    subscriber.subscribe("held/#", QoS::AtLeastOnce).await;
    subscriber.client.disconnect().await.expect("disconnect");
    let (exit, _) = server.stop();
    assert!(exit.success());

    let config = dir.path().join("failing.toml");
    std::fs::write(&config, "mqtt_subscribe_durable_wait_ms = 300\n").expect("config");
    let server = Server::start_with_env(
        &dir.path().join("data"),
        &["--config", config.to_str().expect("UTF-8")],
        &[("THINGHUB_FAULT_SINK_CHECKPOINT_FAILS", "1")],
    );
    let (mut subscriber, present) = Client::connect(&server, "sub", Some(BACKEND), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("subscriber again");
    assert!(present);
    let codes = subscriber.subscribe("new/#", QoS::AtLeastOnce).await;
    assert_eq!(
        codes,
        [rumqttc::SubscribeReasonCode::Failure],
        "not durable"
    );
    let codes = subscriber.subscribe("held/#", QoS::AtMostOnce).await;
    assert!(
        matches!(codes[..], [rumqttc::SubscribeReasonCode::Success(_)]),
        "{codes:?}"
    );
    let (publisher, _) = Client::connect(&server, "publisher", Some(BACKEND), |_| {})
        .await
        .expect("publisher");
    for topic in ["new/1", "held/1"] {
        publisher
            .client
            .publish(topic, QoS::AtLeastOnce, false, topic)
            .await
            .expect("publish");
    }
    let first = subscriber
        .expect("a publish", |p| match p {
            Packet::Publish(publish) => Some(publish.topic.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        first, "held/1",
        "new/1 was published first and must not be delivered"
    );
}
