//! `GET /api/v1/stats`: every metric now and the rate of every counter over one and five
//! minutes, from the sampler's history.

mod common;

use std::time::{Duration, Instant};

use common::{call, start_with_backend};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_show_current_values_and_rates_of_the_counters() {
    let (_dir, server) = start_with_backend("stats_sample_interval_ms = 100\n").await;
    let (status, first) = call(Method::GET, &server.url("/api/v1/stats"), None).await;
    assert_eq!(status, 200, "{first}");
    assert!(
        first["current"]["process"]["rssBytes"].as_u64().is_some(),
        "{first}"
    );
    assert!(first["current"]["mqtt"]["connections"].is_u64(), "{first}");

    // Messages in: their rate shows up (the window is what the server has lived so far).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for n in 0..20 {
            call(
                Method::POST,
                &server.url("/api/v1/publish"),
                Some(json!({"topic": format!("load/{n}"), "payload": "x"})),
            )
            .await;
        }
        let (_, stats) = call(Method::GET, &server.url("/api/v1/stats"), None).await;
        let minute = &stats["rates"]["oneMinute"];
        let rate = minute["mqtt"]["messagesIn"].as_f64().unwrap_or(0.0);
        if rate > 0.0 {
            let window = minute["windowSeconds"].as_f64().expect("window");
            assert!(window > 0.0 && window <= 60.5, "{minute}");
            assert!(
                stats["rates"]["fiveMinutes"]["mqtt"]["messagesIn"]
                    .as_f64()
                    .is_some_and(|r| r > 0.0),
                "{stats}"
            );
            assert!(
                minute
                    .get("process")
                    .is_none_or(|p| p.get("rssBytes").is_none()),
                "gauges have no rate: {minute}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no rate ever: {stats}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_packets_bytes_qos_subscriptions_and_persistent_sessions() {
    use common::mqtt::Client;
    use rumqttc::QoS;
    let (_dir, server) = start_with_backend("").await;
    let metrics = || async {
        let (status, body) = call(Method::GET, &server.url("/api/v1/metrics"), None).await;
        assert_eq!(status, 200, "{body}");
        body
    };
    let before = metrics().await;
    assert_eq!(before["mqtt"]["subscriptions"], 0, "{before}");
    assert_eq!(before["mqttPacketsReceived"]["publish"], 0, "{before}");

    // Given a persistent backend client with a plain and a shared subscription...
    let mut client = Client::connect(&server, "counted", Some(common::BACKEND), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("connect")
    .0;
    client.subscribe("plain/#", QoS::AtLeastOnce).await;
    client.subscribe("$share/g/shared/#", QoS::AtMostOnce).await;
    // ...when it publishes at QoS 1 to its own subscription...
    client
        .client
        .publish("plain/x", QoS::AtLeastOnce, false, b"hello".to_vec())
        .await
        .expect("publish");
    client.publish_on("plain/x").await;

    // ...then the packets both ways, the bytes, the QoS and the subscriptions are counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let now = loop {
        let now = metrics().await;
        if now["mqttPacketsSent"]["puback"].as_u64() >= Some(1)
            && now["mqttPublishSent"]["qos1"].as_u64() >= Some(1)
        {
            break now;
        }
        assert!(Instant::now() < deadline, "counted in time: {now}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let received = &now["mqttPacketsReceived"];
    assert_eq!(received["connect"], 1, "{now}");
    assert_eq!(received["subscribe"], 2, "{now}");
    assert_eq!(received["publish"], 1, "{now}");
    assert_eq!(now["mqttPacketsSent"]["connack"], 1, "{now}");
    assert_eq!(now["mqttPacketsSent"]["suback"], 2, "{now}");
    assert_eq!(now["mqttPublishReceived"]["qos1"], 1, "{now}");
    assert_eq!(now["mqttPublishReceived"]["qos0"], 0, "{now}");
    assert!(now["mqtt"]["bytesIn"].as_u64() > Some(20), "{now}");
    assert!(now["mqtt"]["bytesOut"].as_u64() > Some(10), "{now}");
    assert_eq!(now["mqtt"]["subscriptions"], 2, "{now}");
    assert_eq!(now["mqtt"]["sharedSubscriptions"], 1, "{now}");
    assert_eq!(now["mqtt"]["sessionsPersistent"], 1, "{now}");

    // Prometheus: one family per name, a sample per label.
    let text = reqwest::Client::new()
        .get(server.url("/metrics"))
        .basic_auth(common::ADMIN_KEY, Some(common::ADMIN_SECRET))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("text");
    assert_eq!(
        text.matches("# TYPE thinghub_mqtt_packets_received_total counter")
            .count(),
        1,
        "{text}"
    );
    assert!(
        text.contains("thinghub_mqtt_packets_received_total{type=\"publish\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("thinghub_mqtt_publish_received_total{qos=\"1\"} 1\n"),
        "{text}"
    );
}

/// Polls `/api/v1/metrics` (bounded) until `ready` holds; returns that body.
async fn metrics_when(
    server: &common::Server,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = call(Method::GET, &server.url("/api/v1/metrics"), None).await;
        assert_eq!(status, 200, "{body}");
        if ready(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "metrics never got there: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_things_online_shadow_updates_events_and_commands_by_outcome() {
    use common::device::Device;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = common::Server::start(dir.path(), &[]);
    for name in ["lamp", "fan"] {
        common::register_device(&server, name, "pw").await;
    }
    let (mut lamp, _) = Device::connect(&server, "lamp", ("lamp", "pw"), true).await;
    lamp.subscribe("$emqx/commands/things/lamp/executions/+/request")
        .await;
    let shadow = |body: serde_json::Value| {
        let server = &server;
        async move {
            call(
                Method::POST,
                &server.url("/api/v1/things/lamp/shadow"),
                Some(body),
            )
            .await
            .0
        }
    };
    assert_eq!(
        shadow(json!({"state": {"desired": {"on": true}}})).await,
        200
    );
    assert_eq!(
        shadow(json!({"state": {"desired": {"on": false}}, "version": 7})).await,
        409
    );
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/thing-datas/events"),
        Some(json!({"thingName": "lamp", "eventType": "boot", "severity": "info"})),
    )
    .await;
    assert_eq!(status, 201);
    let send = || async {
        let (status, body) = call(
            Method::POST,
            &server.url("/api/v1/things/lamp/commands"),
            Some(json!({"action": "blink", "ttl": 60})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        body["executionId"].as_str().expect("id").to_owned()
    };
    let answered = send().await;
    let (topic, _) = lamp.next().await;
    assert!(topic.contains(&answered), "{topic}");
    lamp.publish(
        &format!("$emqx/commands/things/lamp/executions/{answered}/response"),
        json!({"status": "SUCCEEDED"}).to_string(),
    )
    .await;
    let canceled = send().await;
    let (status, _) = call(
        Method::POST,
        &server.url(&format!("/api/v1/things/lamp/commands/{canceled}/cancel")),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things/nobody/commands"),
        Some(json!({"action": "blink"})),
    )
    .await;
    assert_eq!(status, 404);

    let now = metrics_when(&server, |m| {
        m["commands"]["succeeded"] == 1 && m["things"]["registered"] == 2
    })
    .await;
    let things = &now["things"];
    assert_eq!(things["registrations"], 2, "{now}");
    assert_eq!(things["online"], 1, "{now}");
    assert_eq!(things["connectionsTotal"], 1, "{now}");
    assert_eq!(things["shadowUpdates"], 1, "{now}");
    assert_eq!(things["shadowRefused"], 1, "{now}");
    assert_eq!(things["eventsIngested"], 1, "{now}");
    let commands = &now["commands"];
    assert_eq!(commands["sent"], 2, "{now}");
    assert_eq!(commands["canceled"], 1, "{now}");
    assert_eq!(commands["failed"], 0, "{now}");
    // (The unknown Thing is refused by the registry before any Thing decides.)

    // A deletion lowers the gauge; after a restart the gauge is counted again from the index.
    let (status, _) = call(Method::DELETE, &server.url("/api/v1/things/fan"), None).await;
    assert_eq!(status, 204);
    metrics_when(&server, |m| m["things"]["registered"] == 1).await;
    drop(lamp);
    drop(server);
    let server = common::Server::start(dir.path(), &[]);
    let after = metrics_when(&server, |m| m["things"]["registered"].is_u64()).await;
    assert_eq!(after["things"]["registered"], 1, "{after}");
    assert_eq!(after["things"]["registrations"], 0, "{after}");
}
