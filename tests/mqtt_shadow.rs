//! The device shadow over MQTT (the per-Thing fast path), against the real server.

mod common;

use std::time::Duration;

use common::device::{Device, WAIT};
use common::{call, create, Server};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::mpsc;

async fn setup() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    create(&server, "/api/v1/things", json!({"thingName":"lamp"})).await;
    for user in [
        json!({"username":"lamp","password":"pw"}),
        json!({"username":"ops","password":"ops-pw","superuser":true}),
    ] {
        create(&server, "/api/v1/authentication/users", user).await;
    }
    (dir, server)
}

const T: &str = "$emqx/things/lamp/shadow";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_desire_delta_conflict_get_over_mqtt() {
    let (_dir, server) = setup().await;
    let (mut lamp, _) = Device::connect(&server, "lamp", ("lamp", "pw"), true).await;
    for tail in [
        "update",
        "update/accepted",
        "update/rejected",
        "update/delta",
        "get/accepted",
        "get/rejected",
    ] {
        lamp.subscribe(&format!("{T}/{tail}")).await;
    }
    let (mut backend, _) = Device::connect(&server, "backend", ("ops", "ops-pw"), true).await;
    backend
        .subscribe("$emqx/things/+/shadow/update/documents")
        .await;

    // Report -> accepted (with the token), and nothing echoed back on shadow/update.
    lamp.publish(
        &format!("{T}/update"),
        r#"{"state":{"reported":{"on":false,"level":3}},"clientToken":"r1"}"#,
    )
    .await;
    let (topic, accepted) = lamp.next().await;
    assert_eq!(topic, format!("{T}/update/accepted"));
    assert_eq!(
        (
            accepted["version"].as_u64(),
            accepted["clientToken"].as_str()
        ),
        (Some(1), Some("r1"))
    );
    let (topic, documents) = backend.next().await;
    assert_eq!(topic, format!("{T}/update/documents"));
    assert_eq!(documents["previous"], Value::Null);
    assert_eq!(
        documents["current"]["state"]["reported"],
        json!({"on":false,"level":3})
    );

    // The operator wants it on: the device gets the desired change and the delta.
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things/lamp/shadow"),
        Some(json!({"state":{"desired":{"on":true,"level":3}}})),
    )
    .await;
    assert_eq!(status, 200);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(lamp.next().await);
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got[0].0, format!("{T}/update"));
    assert_eq!(got[0].1["state"]["desired"], json!({"on":true,"level":3}));
    assert_eq!(got[0].1["version"], 2);
    assert_eq!(got[1].0, format!("{T}/update/accepted"));
    assert_eq!(got[2].0, format!("{T}/update/delta"));
    assert_eq!(
        got[2].1["state"],
        json!({"on":true}),
        "level agrees, only 'on' differs"
    );

    // A stale version is rejected with 409 and the token; bad JSON with 400.
    lamp.publish(
        &format!("{T}/update"),
        r#"{"state":{"reported":{"on":true}},"version":1,"clientToken":"r2"}"#,
    )
    .await;
    let (topic, rejected) = lamp.next().await;
    assert_eq!(topic, format!("{T}/update/rejected"));
    assert_eq!(
        (rejected["code"].as_u64(), rejected["clientToken"].as_str()),
        (Some(409), Some("r2"))
    );
    lamp.publish(&format!("{T}/update"), "{not json").await;
    let (topic, rejected) = lamp.next().await;
    assert_eq!(
        (topic.as_str(), rejected["code"].as_u64()),
        (format!("{T}/update/rejected").as_str(), Some(400))
    );

    // Report the desired value with the right version: accepted, no delta.
    lamp.publish(
        &format!("{T}/update"),
        r#"{"state":{"reported":{"on":true}},"version":2}"#,
    )
    .await;
    let (topic, accepted) = lamp.next().await;
    assert_eq!(
        (topic.as_str(), accepted["version"].as_u64()),
        (format!("{T}/update/accepted").as_str(), Some(3))
    );

    // get -> the whole document, with the token.
    lamp.publish(&format!("{T}/get"), r#"{"clientToken":"g1"}"#)
        .await;
    let (topic, document) = lamp.next().await;
    assert_eq!(topic, format!("{T}/get/accepted"));
    assert_eq!(document["clientToken"], "g1");
    assert_eq!(document["version"], 3);
    assert!(document["state"].get("delta").is_none(), "{document}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_with_a_persistent_session_gets_the_delta_on_reconnect() {
    let (_dir, server) = setup().await;
    let (mut lamp, _) = Device::connect(&server, "lamp", ("lamp", "pw"), false).await;
    lamp.subscribe(&format!("{T}/update/delta")).await;
    lamp.client.disconnect().await.expect("disconnect");
    // Wait (bounded) until the server has seen it go.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, body) = call(Method::GET, &server.url("/api/v1/things/lamp"), None).await;
        if body["online"] == false && body["lastDisconnectReason"] == "normal" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things/lamp/shadow"),
        Some(json!({"state":{"desired":{"on":true}}})),
    )
    .await;
    assert_eq!(status, 200);
    let (mut lamp, present) = Device::connect(&server, "lamp", ("lamp", "pw"), false).await;
    assert!(present);
    let (topic, delta) = lamp.next().await;
    assert_eq!(topic, format!("{T}/update/delta"));
    assert_eq!(delta["state"], json!({"on":true}));
}

/// Publishes `payload` on `request` and expects `{request}/rejected` with `code`.
async fn expect_rejected(device: &mut Device, request: &str, payload: &str, code: u64) {
    device.publish(request, payload).await;
    let (topic, rejected) = device.next().await;
    assert_eq!(topic, format!("{request}/rejected"));
    assert_eq!(
        rejected["code"].as_u64(),
        Some(code),
        "{request}: {rejected}"
    );
    assert!(rejected["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_requests_for_unknown_things_and_bad_payloads_are_rejected_on_the_reply_topic() {
    let (_dir, server) = setup().await;
    let (mut ops, _) = Device::connect(&server, "ops", ("ops", "ops-pw"), true).await;
    ops.subscribe("$emqx/things/+/shadow/+/rejected").await;
    expect_rejected(&mut ops, "$emqx/things/ghost/shadow/get", "", 404).await;
    // No shadow document yet.
    expect_rejected(&mut ops, "$emqx/things/lamp/shadow/get", "", 404).await;
    expect_rejected(
        &mut ops,
        "$emqx/things/lamp/shadow/update",
        r#"{"state":{"reported":{"a":[1,null]}}}"#,
        400,
    )
    .await;
    expect_rejected(&mut ops, "$emqx/things/lamp/shadow/delete", "", 404).await;
    expect_rejected(&mut ops, "$emqx/things/lamp/shadow/get", "[1,2]", 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_stored_listed_newest_first_and_invalid_ones_rejected() {
    let (_dir, server) = setup().await;
    let (mut lamp, _) = Device::connect(&server, "lamp", ("lamp", "pw"), true).await;
    lamp.subscribe("$emqx/things/lamp/events/+/rejected").await;
    lamp.subscribe("$emqx/things/lamp/events/+/accepted").await;
    let e = "$emqx/things/lamp/events";

    lamp.publish(
        &format!("{e}/overheat"),
        r#"{"eventType":"overheat","severity":"warn","data":{"t":71.5}}"#,
    )
    .await;
    let (topic, accepted) = lamp.next().await;
    assert_eq!(topic, format!("{e}/overheat/accepted"));
    assert_eq!(accepted["data"], json!({"t":71.5}));
    for (payload, reason) in [
        (
            r#"{"eventType":"other","severity":"warn"}"#,
            "does not match",
        ),
        (r#"{"eventType":"overheat","severity":"fatal"}"#, "severity"),
        ("not json", "invalid json"),
    ] {
        lamp.publish(&format!("{e}/overheat"), payload).await;
        let (topic, rejected) = lamp.next().await;
        assert_eq!(topic, format!("{e}/overheat/rejected"));
        assert_eq!(rejected["code"], 400);
        assert!(
            rejected["message"].as_str().unwrap_or("").contains(reason),
            "{rejected}"
        );
    }
    lamp.publish(
        &format!("{e}/boot"),
        r#"{"eventType":"boot","severity":"info","timestamp":1700000000000}"#,
    )
    .await;
    lamp.next().await;

    // Over HTTP too.
    let (status, stored) = call(
        Method::POST,
        &server.url("/api/v1/thing-datas/events"),
        Some(json!({"thingName":"lamp","eventType":"overheat","severity":"error","data":{"t":90}})),
    )
    .await;
    assert_eq!(status, 201, "{stored}");
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/thing-datas/events"),
        Some(json!({"thingName":"lamp","eventType":"x","severity":"loud"})),
    )
    .await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(400)));

    // Newest first; only the three valid events were stored.
    let (status, page) = call(Method::GET, &server.url("/api/v1/things/lamp/events"), None).await;
    assert_eq!(status, 200);
    let types: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["eventType"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(types, ["overheat", "boot", "overheat"]);
    assert_eq!(
        page["items"][1]["timestamp"], 1_700_000_000_000u64,
        "the device's timestamp is kept"
    );

    // Filters and paging.
    let (_, filtered) = call(
        Method::GET,
        &server.url("/api/v1/things/lamp/events?type=overheat&limit=1"),
        None,
    )
    .await;
    assert_eq!(filtered["items"][0]["data"], json!({"t":90}));
    let cursor = filtered["nextCursor"].as_u64().expect("more pages");
    let (_, next) = call(
        Method::GET,
        &server.url(&format!(
            "/api/v1/things/lamp/events?type=overheat&limit=1&cursor={cursor}"
        )),
        None,
    )
    .await;
    assert_eq!(next["items"][0]["data"], json!({"t":71.5}));
    let (_, old) = call(
        Method::GET,
        &server.url("/api/v1/things/lamp/events?until=1700000000001"),
        None,
    )
    .await;
    assert_eq!(old["items"].as_array().map(Vec::len), Some(1));
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(String, Value)>) -> (String, Value) {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a publish in time")
        .expect("open")
}

/// A v5 client on `$aws/...`, as firmware built on the AWS IoT Device SDK would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_compat_mode_serves_the_shadow_on_aws_topics_to_a_v5_device() {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient as C5, Event as E5, MqttOptions as O5};
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["--aws-compat"]);
    create(&server, "/api/v1/things", json!({"thingName":"lamp"})).await;
    create(
        &server,
        "/api/v1/authentication/users",
        json!({"username":"lamp","password":"pw"}),
    )
    .await;

    let mut options = O5::new("lamp", server.mqtt.ip().to_string(), server.mqtt.port());
    // The AWS SDKs append ?SDK=... to the username; it is stripped before authentication.
    options.set_credentials("lamp?SDK=Python&Version=1.0", "pw");
    let (client, mut eventloop) = C5::new(options, 32);
    let a = "$aws/things/lamp/shadow";
    for tail in [
        "update/accepted",
        "update/rejected",
        "update/delta",
        "get/accepted",
    ] {
        client
            .subscribe(format!("{a}/{tail}"), Q5::AtLeastOnce)
            .await
            .expect("subscribe");
    }
    let mut subacks = 0;
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Value)>();
    while subacks < 4 {
        match tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .expect("in time")
            .expect("connected")
        {
            E5::Incoming(P5::SubAck(ack)) => {
                assert!(
                    ack.return_codes.iter().all(|c| matches!(
                        c,
                        rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                    )),
                    "{ack:?}"
                );
                subacks += 1;
            }
            _ => continue,
        }
    }
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let E5::Incoming(P5::Publish(p)) = event {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                let body = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                if tx.send((topic, body)).is_err() {
                    return;
                }
            }
        }
    });
    client
        .publish(
            format!("{a}/update"),
            Q5::AtLeastOnce,
            false,
            r#"{"state":{"reported":{"on":false}},"clientToken":"aws-1"}"#,
        )
        .await
        .expect("publish");
    let (topic, accepted) = next(&mut rx).await;
    assert_eq!(
        (
            topic.as_str(),
            accepted["clientToken"].as_str(),
            accepted["version"].as_u64()
        ),
        (
            format!("{a}/update/accepted").as_str(),
            Some("aws-1"),
            Some(1)
        )
    );

    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things/lamp/shadow"),
        Some(json!({"state":{"desired":{"on":true}}})),
    )
    .await;
    assert_eq!(status, 200);
    let mut got = [next(&mut rx).await, next(&mut rx).await];
    got.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(got[0].0, format!("{a}/update/accepted"));
    assert_eq!(
        (got[1].0.as_str(), &got[1].1["state"]),
        (format!("{a}/update/delta").as_str(), &json!({"on":true}))
    );

    client
        .publish(
            format!("{a}/update"),
            Q5::AtLeastOnce,
            false,
            r#"{"state":{"reported":{"on":true}},"version":1,"clientToken":"aws-2"}"#,
        )
        .await
        .expect("publish");
    let (topic, rejected) = next(&mut rx).await;
    assert_eq!(
        (
            topic.as_str(),
            rejected["code"].as_u64(),
            rejected["clientToken"].as_str()
        ),
        (
            format!("{a}/update/rejected").as_str(),
            Some(409),
            Some("aws-2")
        )
    );

    client
        .publish(
            format!("{a}/get"),
            Q5::AtLeastOnce,
            false,
            r#"{"clientToken":"aws-3"}"#,
        )
        .await
        .expect("publish");
    let (topic, document) = next(&mut rx).await;
    assert_eq!(topic, format!("{a}/get/accepted"));
    assert_eq!(
        (document["version"].as_u64(), &document["state"]["delta"]),
        (Some(2), &json!({"on":true}))
    );
}
