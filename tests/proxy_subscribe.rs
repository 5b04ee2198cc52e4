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
    assert_eq!(common::codes(&answer), vec![200, 400, 400], "{answer}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_and_topics_are_listed_fleet_wide_in_pages() {
    let (_dir, server) = start_with_backend("").await;
    let mut clients = Vec::new();
    for id in ["c1", "c2", "c3"] {
        let (mut client, _) = Client::connect(&server, id, Some(BACKEND), |_| {})
            .await
            .expect("connect");
        client.subscribe("site/+/temp", QoS::AtLeastOnce).await;
        client
            .subscribe(&format!("own/{id}"), QoS::AtMostOnce)
            .await;
        clients.push(client);
    }
    post(
        &server,
        "/api/v1/publish",
        json!({"topic": "site/a/status", "payload": "up", "retain": true}),
    )
    .await;

    // Every subscription, two at a time, in (client id, filter) order.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/subscriptions?limit=2&cursor={c}"),
            None => "/api/v1/subscriptions?limit=2".to_owned(),
        };
        let (status, page) = call(Method::GET, &server.url(&path), None).await;
        assert_eq!(status, 200, "{page}");
        for item in page["items"].as_array().expect("items") {
            seen.push(format!(
                "{}:{}:{}",
                item["clientId"].as_str().expect("id"),
                item["topic"].as_str().expect("topic"),
                item["qos"]
            ));
        }
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        seen,
        vec![
            "c1:own/c1:0",
            "c1:site/+/temp:1",
            "c2:own/c2:0",
            "c2:site/+/temp:1",
            "c3:own/c3:0",
            "c3:site/+/temp:1"
        ]
    );
    let (_, one) = call(
        Method::GET,
        &server.url("/api/v1/subscriptions?clientId=c2"),
        None,
    )
    .await;
    assert_eq!(one["items"].as_array().map(Vec::len), Some(2), "{one}");
    let (_, matching) = call(
        Method::GET,
        &server.url("/api/v1/subscriptions?match=site/x/temp"),
        None,
    )
    .await;
    assert_eq!(
        matching["items"].as_array().map(Vec::len),
        Some(3),
        "{matching}"
    );
    for bad in [
        "/api/v1/subscriptions?match=site/%2B",
        "/api/v1/subscriptions?cursor=@@",
        "/api/v1/subscriptions?colour=red",
    ] {
        let (status, answer) = call(Method::GET, &server.url(bad), None).await;
        assert_eq!(status, 400, "{bad}: {answer}");
    }

    let (status, topics) = call(Method::GET, &server.url("/api/v1/topics"), None).await;
    assert_eq!(status, 200);
    let listed: Vec<(String, bool, u64)> = topics["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|t| {
            (
                t["topic"].as_str().expect("topic").to_owned(),
                t["retained"].as_bool().expect("retained"),
                t["subscriptions"].as_u64().expect("subscriptions"),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            ("own/c1".to_owned(), false, 1),
            ("own/c2".to_owned(), false, 1),
            ("own/c3".to_owned(), false, 1),
            ("site/+/temp".to_owned(), false, 3),
            ("site/a/status".to_owned(), true, 0),
        ]
    );
}
