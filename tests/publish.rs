//! Messaging over HTTP: `POST /api/v1/publish` reaches MQTT subscribers (QoS 0/1, retained, v5
//! properties, a persistent session's queue), the bulk form answers each item in order, and a
//! Thing's request and reply topics are refused (never device input, never a forged reply).

mod common;

use common::mqtt::{Client, Client5};
use common::{call, call_as, create, start_with_backend, BACKEND};
use reqwest::Method;
use rumqttc::QoS;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_publish_reaches_subscribers_with_qos_retain_and_v5_properties() {
    let (_dir, server) = start_with_backend("").await;
    let (mut sub, _) = Client::connect(&server, "sub4", Some(BACKEND), |_| {})
        .await
        .expect("connect");
    sub.subscribe("plant/#", QoS::AtLeastOnce).await;

    let (status, answer) = call(
        Method::POST,
        &server.url("/api/v1/publish"),
        Some(json!({"topic": "plant/a", "payload": "hello", "qos": 1})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["subscribers"], 1);
    let got = sub.publish_on("plant/a").await;
    assert_eq!(&got.payload[..], b"hello");
    assert_eq!(got.qos, QoS::AtLeastOnce);

    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/publish"),
        Some(json!({"topic": "plant/b", "payload": "AAEC/w==", "payloadEncoding": "base64"})),
    )
    .await;
    assert_eq!(status, 200);
    let got = sub.publish_on("plant/b").await;
    assert_eq!(&got.payload[..], &[0u8, 1, 2, 255]);
    assert_eq!(got.qos, QoS::AtMostOnce);

    // Retained: a later subscriber gets it, flagged.
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/publish"),
        Some(json!({"topic": "plant/status", "payload": "up", "retain": true, "qos": 1})),
    )
    .await;
    assert_eq!(status, 200);
    let (mut late, _) = Client::connect(&server, "late", Some(BACKEND), |_| {})
        .await
        .expect("connect");
    late.subscribe("plant/status", QoS::AtLeastOnce).await;
    let retained = late.publish_on("plant/status").await;
    assert!(retained.retain);
    assert_eq!(&retained.payload[..], b"up");

    // v5 properties reach a v5 subscriber.
    let mut v5 = Client5::connect(Client5::options(&server, "sub5", BACKEND))
        .await
        .expect("connect");
    v5.subscribe("plant/v5").await;
    let (status, answer) = call(
        Method::POST,
        &server.url("/api/v1/publish"),
        Some(json!({"topic": "plant/v5", "payload": "{\"on\":true}", "qos": 1,
                    "properties": {"contentType": "application/json", "payloadFormatIndicator": 1,
                                   "messageExpiryInterval": 60, "responseTopic": "plant/reply",
                                   "correlationData": "req-7", "userProperties": {"origin": "ops"}}})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let got = v5.next_publish("the v5 publish").await;
    let properties = got.properties.expect("properties");
    assert_eq!(properties.content_type.as_deref(), Some("application/json"));
    assert_eq!(properties.payload_format_indicator, Some(1));
    assert_eq!(properties.response_topic.as_deref(), Some("plant/reply"));
    assert_eq!(properties.correlation_data.as_deref(), Some(&b"req-7"[..]));
    assert_eq!(
        properties.user_properties,
        vec![("origin".to_owned(), "ops".to_owned())]
    );
    assert!(
        properties
            .message_expiry_interval
            .is_some_and(|s| (1..=60).contains(&s)),
        "{properties:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_publish_is_queued_for_a_persistent_session_and_bulk_answers_in_order() {
    let (_dir, server) = start_with_backend("").await;
    let (mut keeper, _) = Client::connect(&server, "keeper", Some(BACKEND), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("connect");
    keeper.subscribe("queue/#", QoS::AtLeastOnce).await;
    keeper.kill();

    let (status, answer) = call(
        Method::POST,
        &server.url("/api/v1/publish/bulk"),
        Some(json!([
            {"topic": "queue/a", "payload": "1", "qos": 1},
            {"topic": "queue/#", "payload": "2"},
            {"topic": "queue/b", "payload": "3", "qos": 3},
            {"topic": "queue/c", "payload": "4", "qos": 1, "bogus": true},
            {"topic": "queue/d", "payload": "5", "qos": 1},
        ])),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        common::codes(&answer),
        vec![200, 400, 400, 400, 200],
        "{answer}"
    );
    assert_eq!(
        answer[0]["subscribers"], 1,
        "queued for the offline session"
    );
    assert!(answer[1]["message"]
        .as_str()
        .is_some_and(|m| m.contains("queue/#")));

    let (mut keeper, session_present) = Client::connect(&server, "keeper", Some(BACKEND), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("reconnect");
    assert!(session_present);
    assert_eq!(&keeper.publish_on("queue/a").await.payload[..], b"1");
    assert_eq!(&keeper.publish_on("queue/d").await.payload[..], b"5");

    for bad in [
        json!([]),
        json!({"topic": "x"}),
        json!(vec![json!({"topic": "x"}); 101]),
    ] {
        let (status, answer) =
            call(Method::POST, &server.url("/api/v1/publish/bulk"), Some(bad)).await;
        assert_eq!(status, 400, "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_publish_on_a_thing_request_or_reply_topic_is_refused_and_needs_an_operator() {
    let (_dir, server) = start_with_backend("").await;
    create(&server, "/api/v1/things", json!({"thingName": "t1"})).await;
    // A Thing's request topics are not the operator's: refused, nothing recorded.
    for topic in [
        "$emqx/things/t1/shadow/update",
        "$emqx/things/t1/events/alarm",
        "$emqx/commands/things/t1/executions/e1/response",
        "$emqx/things/t1/jobs/start-next",
    ] {
        let (status, answer) = call(
            Method::POST,
            &server.url("/api/v1/publish"),
            Some(json!({"topic": topic, "qos": 1, "retain": true,
                        "payload": "{\"state\":{\"reported\":{\"forged\":1}}}"})),
        )
        .await;
        assert_eq!(status, 403, "{topic}: {answer}");
        assert!(answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("request topic")));
    }
    let (_, shadow) = call(Method::GET, &server.url("/api/v1/things/t1/shadow"), None).await;
    assert!(
        shadow["state"]["reported"]["forged"].is_null(),
        "not device input: {shadow}"
    );
    let (_, topics) = call(Method::GET, &server.url("/api/v1/topics"), None).await;
    assert_eq!(topics["items"], json!([]), "nothing retained: {topics}");

    // Nobody but the server publishes on its reply topics, the operator included.
    let (status, answer) = call(
        Method::POST,
        &server.url("/api/v1/publish"),
        Some(json!({"topic": "$emqx/things/t1/shadow/update/accepted", "payload": "{}"})),
    )
    .await;
    assert_eq!(status, 403, "{answer}");

    let viewer = create(
        &server,
        "/api/v1/api-keys",
        json!({"name": "viewer", "role": "viewer"}),
    )
    .await;
    let key = viewer["key"].as_str().expect("key");
    let secret = viewer["secret"].as_str().expect("secret");
    let (status, _) = call_as(
        (key, secret),
        Method::POST,
        &server.url("/api/v1/publish"),
        Some(json!({"topic": "a", "payload": "b"})),
    )
    .await;
    assert_eq!(status, 403);
    for bad in [
        json!({"payload": "no topic"}),
        json!({"topic": "a/+", "payload": "x"}),
        json!({"topic": "a", "payload": "x", "payloadEncoding": "hex"}),
        json!({"topic": "a", "payload": "%%", "payloadEncoding": "base64"}),
        json!({"topic": "a", "retain": "yes"}),
        json!({"topic": "a", "properties": {"messageExpiryInterval": -1}}),
        json!({"topic": "a", "properties": {"responseTopic": "r/#"}}),
        json!({"topic": "a", "properties": {"colour": "red"}}),
        json!({"topic": "a", "payload": "AP8=", "payloadEncoding": "base64",
               "properties": {"payloadFormatIndicator": 1}}),
    ] {
        let (status, answer) = call(
            Method::POST,
            &server.url("/api/v1/publish"),
            Some(bad.clone()),
        )
        .await;
        assert_eq!(status, 400, "{bad} -> {answer}");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}
