//! Proxy subscriptions: the operator subscribes a connected or persistent session as its own
//! SUBSCRIBE would, under its user's ACL.

mod common;

use common::device::Device;
use common::mqtt::Client;
use common::{call, create, register_device, start_with_backend, BACKEND};
use reqwest::Method;
use rumqttc::QoS;
use serde_json::{json, Value};

async fn post(server: &common::Server, path: &str, body: Value) -> (u16, Value) {
    call(Method::POST, &server.url(path), Some(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_subscription_delivers_to_an_online_and_an_offline_persistent_session() {
    let (_dir, server) = start_with_backend("").await;
    let (mut online, _) = Client::connect(&server, "online", Some(BACKEND), |_| {})
        .await
        .expect("connect");
    let (status, answer) = post(
        &server,
        "/api/v1/clients/online/subscribe",
        json!({"topic": "news/#", "qos": 1}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["new"], true);
    let (_, published) = post(
        &server,
        "/api/v1/publish",
        json!({"topic": "news/a", "payload": "extra", "qos": 1}),
    )
    .await;
    assert_eq!(published["subscribers"], 1);
    let got = online.publish_on("news/a").await;
    assert_eq!(&got.payload[..], b"extra");
    assert_eq!(got.qos, QoS::AtLeastOnce);

    // Offline and persistent: subscribed now, queued, delivered on return.
    let (keeper, _) = Client::connect(&server, "keeper", Some(BACKEND), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("connect");
    keeper.kill();
    let (status, answer) = post(
        &server,
        "/api/v1/clients/keeper/subscribe/bulk",
        json!([{"topic": "later/#", "qos": 1}, {"topic": "bad/#/x"}, {"topic": "later/#", "qos": 9}]),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let codes: Vec<u64> = answer
        .as_array()
        .expect("answers")
        .iter()
        .map(|a| a["code"].as_u64().expect("code"))
        .collect();
    assert_eq!(codes, vec![200, 400, 400], "{answer}");
    let (_, published) = post(
        &server,
        "/api/v1/publish",
        json!({"topic": "later/x", "payload": "kept", "qos": 1}),
    )
    .await;
    assert_eq!(
        published["subscribers"], 1,
        "queued for the offline session"
    );
    let (mut keeper, present) = Client::connect(&server, "keeper", Some(BACKEND), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("reconnect");
    assert!(present);
    assert_eq!(&keeper.publish_on("later/x").await.payload[..], b"kept");

    // Unsubscribed: nothing matches any more; a second time is 404.
    let (status, _) = post(
        &server,
        "/api/v1/clients/online/unsubscribe",
        json!({"topic": "news/#"}),
    )
    .await;
    assert_eq!(status, 200);
    let (_, published) = post(
        &server,
        "/api/v1/publish",
        json!({"topic": "news/b", "payload": "none"}),
    )
    .await;
    assert_eq!(published["subscribers"], 0);
    let (status, answer) = post(
        &server,
        "/api/v1/clients/online/unsubscribe",
        json!({"topic": "news/#"}),
    )
    .await;
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = post(
        &server,
        "/api/v1/clients/nobody/subscribe",
        json!({"topic": "a"}),
    )
    .await;
    assert_eq!(status, 404, "{answer}");
    for bad in [
        json!({"qos": 1}),
        json!({"topic": "a", "qos": "1"}),
        json!({"topic": "a", "colour": 1}),
    ] {
        let (status, answer) = post(&server, "/api/v1/clients/online/subscribe", bad).await;
        assert_eq!(status, 400, "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_subscription_cannot_grant_what_the_device_could_not_subscribe_to() {
    let (_dir, server) = start_with_backend("").await;
    register_device(&server, "lamp", "pw").await;
    create(&server, "/api/v1/things", json!({"thingName": "other"})).await;
    let (mut lamp, _) = Device::connect(&server, "lamp", ("lamp", "pw"), true).await;
    let (status, answer) = post(
        &server,
        "/api/v1/clients/lamp/subscribe",
        json!({"topic": "$emqx/things/other/shadow/#", "qos": 1}),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer["message"]
        .as_str()
        .is_some_and(|m| m.contains("not authorized")));
    // Its own Thing's topics: allowed, and delivered.
    let (status, answer) = post(
        &server,
        "/api/v1/clients/lamp/subscribe",
        json!({"topic": "$emqx/things/lamp/shadow/update/delta", "qos": 1}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things/lamp/shadow"),
        Some(json!({"state": {"desired": {"on": true}}})),
    )
    .await;
    assert_eq!(status, 200);
    let (topic, delta) = lamp.next().await;
    assert_eq!(topic, "$emqx/things/lamp/shadow/update/delta");
    assert_eq!(delta["state"]["on"], true, "{delta}");
}
