//! The broker as an attacker meets it: session takeover by another device or user, ACL
//! placeholder injection, forged server replies, and revocation that must bite at once.

mod common;

use std::time::Duration;

use common::mqtt::{Client, Client5, WAIT};
use common::{call, create, Server};
use reqwest::Method;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as Code5, Packet as P5, PubAckReason};
use rumqttc::{ConnectReturnCode, ConnectionError, QoS};
use serde_json::json;

async fn start() -> (tempfile::TempDir, Server) {
    common::start_with_backend("").await
}

/// Registers a Thing and its bound user (username = thing name, password "pw").
async fn device(server: &Server, name: &str) {
    create(server, "/api/v1/things", json!({"thingName": name})).await;
    create(
        server,
        "/api/v1/authentication/users",
        json!({"username": name, "password": "pw", "thingName": name}),
    )
    .await;
}

fn refused_with(result: Result<(Client, bool), ConnectionError>, code: ConnectReturnCode) {
    match result {
        Err(ConnectionError::ConnectionRefused(got)) => assert_eq!(got, code),
        Err(other) => panic!("expected a refusal with {code:?}, got {other:?}"),
        Ok(_) => panic!("expected a refusal with {code:?}, got a connection"),
    }
}

async fn send_command(server: &Server, thing: &str, action: &str) -> String {
    let created = create(
        server,
        &format!("/api/v1/things/{thing}/commands"),
        json!({"action": action, "ttl": 60}),
    )
    .await;
    created["executionId"].as_str().expect("id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_take_over_read_or_kick_another_devices_session() {
    let (_dir, server) = start().await;
    device(&server, "dev-a").await;
    device(&server, "dev-b").await;
    let requests = "$emqx/commands/things/dev-b/executions/+/request";

    // B has a persistent session with a command queued while it is away.
    let (mut b, _) = Client::connect(&server, "dev-b", Some(("dev-b", "pw")), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("B connects");
    b.subscribe(requests, QoS::AtLeastOnce).await;
    b.kill();
    let queued = send_command(&server, "dev-b", "unlock").await;

    // A, with B's client id, is refused whatever it asks for: 3.1.1 and 5.0, clean or not.
    for clean in [false, true] {
        let attempt = Client::connect(&server, "dev-b", Some(("dev-a", "pw")), |o| {
            o.set_clean_session(clean);
        })
        .await;
        refused_with(attempt, ConnectReturnCode::BadClientId);
    }
    let mut v5 = Client5::options(&server, "dev-b", ("dev-a", "pw"));
    v5.set_clean_start(false);
    match Client5::connect(v5).await {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, Code5::ClientIdentifierNotValid)
        }
        other => panic!("expected 0x85, got {:?}", other.err()),
    }
    // Nor a superuser: a Thing's client id is its users' alone.
    for clean in [false, true] {
        let attempt = Client::connect(&server, "dev-b", Some(("backend", "backend-pw")), |o| {
            o.set_clean_session(clean);
        })
        .await;
        refused_with(attempt, ConnectReturnCode::BadClientId);
    }
    // And any session belongs to its owner: a superuser may not resume or discard a plain
    // user's either.
    create(
        &server,
        "/api/v1/authentication/users",
        json!({"username":"app","password":"pw"}),
    )
    .await;
    let (app, _) = Client::connect(&server, "app-1", Some(("app", "pw")), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("app");
    app.kill();
    for clean in [false, true] {
        let attempt = Client::connect(&server, "app-1", Some(("backend", "backend-pw")), |o| {
            o.set_clean_session(clean);
        })
        .await;
        refused_with(attempt, ConnectReturnCode::NotAuthorized);
    }
    // A's own id works.
    Client::connect(&server, "dev-a", Some(("dev-a", "pw")), |_| {})
        .await
        .expect("A with its own id");

    // B comes back to its session and the queued command, and is not kicked by later attempts.
    let (mut b, present) = Client::connect(&server, "dev-b", Some(("dev-b", "pw")), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("B reconnects");
    assert!(present, "B's session survived the attempts");
    let topic = b.next_topic("the queued command").await;
    assert!(topic.contains(&queued), "{topic}");
    refused_with(
        Client::connect(&server, "dev-b", Some(("dev-a", "pw")), |_| {}).await,
        ConnectReturnCode::BadClientId,
    );
    let later = send_command(&server, "dev-b", "lock").await;
    let topic = b.next_topic("a command after the attempt").await;
    assert!(topic.contains(&later), "B is still connected: {topic}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_things_user_must_use_the_things_client_id_and_the_thing_must_exist() {
    let (_dir, server) = start().await;
    create(
        &server,
        "/api/v1/things",
        json!({"thingName":"meter","mqttClientId":"meter-0042"}),
    )
    .await;
    create(
        &server,
        "/api/v1/authentication/users",
        json!({"username":"meter-user","password":"pw","thingName":"meter"}),
    )
    .await;
    refused_with(
        Client::connect(&server, "meter", Some(("meter-user", "pw")), |_| {}).await,
        ConnectReturnCode::BadClientId,
    );
    Client::connect(&server, "meter-0042", Some(("meter-user", "pw")), |_| {})
        .await
        .expect("the registered mqttClientId");
    // A user bound to a Thing that is not registered has no client id to use.
    create(
        &server,
        "/api/v1/authentication/users",
        json!({"username":"orphan","password":"pw","thingName":"ghost"}),
    )
    .await;
    refused_with(
        Client::connect(&server, "ghost", Some(("orphan", "pw")), |_| {}).await,
        ConnectReturnCode::NotAuthorized,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_but_a_things_user_may_use_its_client_id() {
    let (_dir, server) = start().await;
    create(
        &server,
        "/api/v1/things",
        json!({"thingName":"valve","mqttClientId":"valve-7"}),
    )
    .await;
    create(
        &server,
        "/api/v1/authentication/users",
        json!({"username":"app","password":"pw"}),
    )
    .await;
    // A plain user or a superuser squatting the device's client id (to hold its session and
    // lock it out) is refused, whether the id is the registered one or not.
    for user in [("app", "pw"), ("backend", "backend-pw")] {
        refused_with(
            Client::connect(&server, "valve-7", Some(user), |o| {
                o.set_clean_session(false);
            })
            .await,
            ConnectReturnCode::BadClientId,
        );
    }
    // Another Thing may not be registered with it either.
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/things"),
        Some(json!({"thingName":"copycat","mqttClientId":"valve-7"})),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap_or("").contains("valve"),
        "{body}"
    );
    // A bulk body naming one client id twice registers one Thing with it, not two.
    let body = "{\"thingName\":\"twin-a\",\"mqttClientId\":\"twin\"}\n{\"thingName\":\"twin-b\",\"mqttClientId\":\"twin\"}\n";
    let answer = common::client()
        .post(server.url("/api/v1/things/bulk"))
        .basic_auth(common::ADMIN_KEY, Some(common::ADMIN_SECRET))
        .body(body)
        .send()
        .await
        .expect("bulk")
        .text()
        .await
        .expect("answer");
    assert!(
        answer.contains(r#""summary":{"created":1,"failed":1,"lines":2}"#),
        "{answer}"
    );
    // Once the Thing is deleted, the id is free again.
    let (status, _) = call(Method::DELETE, &server.url("/api/v1/things/valve"), None).await;
    assert_eq!(status, 204);
    Client::connect(&server, "valve-7", Some(("app", "pw")), |_| {})
        .await
        .expect("free once the Thing is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_a_thing_takes_its_client_id_back_from_an_earlier_squatter() {
    let (_dir, server) = start().await;
    create(
        &server,
        "/api/v1/authentication/users",
        json!({"username":"app","password":"pw"}),
    )
    .await;
    // Before the Thing exists, its future client id is free: someone takes it.
    let (mut squatter, _) = Client::connect(&server, "gate-1", Some(("app", "pw")), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("free for now");
    device(&server, "gate-1").await;
    assert!(squatter.closed_by_server().await, "closed at registration");
    let (_gate, present) = Client::connect(&server, "gate-1", Some(("gate-1", "pw")), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("the device gets in");
    assert!(!present, "nothing of the squatter's session is left");
}

async fn history_types(server: &Server, thing: &str) -> Vec<String> {
    let (_, history) = call(
        Method::GET,
        &server.url(&format!("/api/v1/things/{thing}/history")),
        None,
    )
    .await;
    history["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| format!("{} {}", e["type"], e["summary"]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_or_changing_a_user_closes_its_connections_at_once() {
    let (_dir, server) = start().await;
    device(&server, "lamp").await;
    let users = server.url("/api/v1/authentication/users");

    // Deleted while connected (v5): DISCONNECT "not authorized", recorded as revoked.
    let mut lamp = Client5::connect(Client5::options(&server, "lamp", ("lamp", "pw")))
        .await
        .expect("lamp");
    let (status, _) = call(Method::DELETE, &format!("{users}/lamp"), None).await;
    assert_eq!(status, 204);
    let ended = lamp.ended().await.expect("closed by the server");
    assert!(ended.contains("NotAuthorized"), "{ended}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !history_types(&server, "lamp")
        .await
        .iter()
        .any(|e| e.contains("ThingDisconnected") && e.contains("reason=revoked"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "revocation recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    refused_with(
        Client::connect(&server, "lamp", Some(("lamp", "pw")), |_| {}).await,
        ConnectReturnCode::BadUserNamePassword,
    );

    // A new password: the old connection goes.
    create(
        &server,
        "/api/v1/authentication/users",
        json!({"username":"lamp","password":"pw","thingName":"lamp"}),
    )
    .await;
    let (mut lamp, _) = Client::connect(&server, "lamp", Some(("lamp", "pw")), |_| {})
        .await
        .expect("lamp again");
    let (status, _) = call(
        Method::PUT,
        &format!("{users}/lamp"),
        Some(json!({"password":"new-pw"})),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        lamp.closed_by_server().await,
        "closed after the password change"
    );

    // A superuser demoted: its connection closes and its session loses what it may no longer
    // read.
    let (mut boss, _) = Client::connect(&server, "boss-1", Some(("backend", "backend-pw")), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("backend");
    boss.subscribe("$emqx/things/+/telemetry", QoS::AtLeastOnce)
        .await;
    boss.subscribe("plain/#", QoS::AtLeastOnce).await;
    let (status, _) = call(
        Method::PUT,
        &format!("{users}/backend"),
        Some(json!({"superuser":false})),
    )
    .await;
    assert_eq!(status, 200);
    assert!(boss.closed_by_server().await, "closed after the demotion");
    let (status, client) = call(Method::GET, &server.url("/api/v1/clients/boss-1"), None).await;
    assert_eq!(status, 200);
    assert_eq!(client["subscriptions"], json!(["plain/#"]), "{client}");
    let (mut boss, present) =
        Client::connect(&server, "boss-1", Some(("backend", "backend-pw")), |o| {
            o.set_clean_session(false);
        })
        .await
        .expect("reconnects as a plain user");
    assert!(present);
    assert_eq!(
        boss.subscribe("$emqx/things/+/telemetry", QoS::AtLeastOnce)
            .await,
        [rumqttc::SubscribeReasonCode::Failure]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_change_removes_subscriptions_it_no_longer_allows() {
    let (_dir, server) = start().await;
    create(
        &server,
        "/api/v1/authentication/users",
        json!({"username":"app","password":"pw"}),
    )
    .await;
    let (mut app, _) = Client::connect(&server, "app-1", Some(("app", "pw")), |_| {})
        .await
        .expect("app");
    app.subscribe("fleet/#", QoS::AtLeastOnce).await;
    create(
        &server,
        "/api/v1/authorization/rules",
        json!({"permission":"deny","action":"subscribe","topic":"fleet/secrets/#"}),
    )
    .await;
    let (_, client) = call(Method::GET, &server.url("/api/v1/clients/app-1"), None).await;
    assert_eq!(
        client["subscriptions"],
        json!([]),
        "fleet/# reaches fleet/secrets: {client}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholders_filled_with_wildcards_or_separators_grant_nothing() {
    let (_dir, server) = start().await;
    let rules = "/api/v1/authorization/rules";
    create(
        &server,
        rules,
        json!({"permission":"allow","action":"all","topic":"devices/${clientid}/#"}),
    )
    .await;
    create(
        &server,
        rules,
        json!({"permission":"deny","action":"all","topic":"devices/#"}),
    )
    .await;
    create(
        &server,
        "/api/v1/authentication/users",
        json!({"username":"plain","password":"pw"}),
    )
    .await;
    for evil in ["#", "+", "x/y"] {
        let (mut attacker, _) = Client::connect(&server, evil, Some(("plain", "pw")), |_| {})
            .await
            .expect("connects");
        for filter in ["devices/#", "devices/+/#", "devices/x/y/#"] {
            assert_eq!(
                attacker.subscribe(filter, QoS::AtLeastOnce).await,
                [rumqttc::SubscribeReasonCode::Failure],
                "client id {evil:?} must not get {filter}"
            );
        }
    }
    let (mut honest, _) = Client::connect(&server, "d7", Some(("plain", "pw")), |_| {})
        .await
        .expect("connects");
    assert_eq!(
        honest.subscribe("devices/d7/#", QoS::AtLeastOnce).await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    for bad in ["a/b", "#", "dev+"] {
        let (status, body) = call(
            Method::POST,
            &server.url("/api/v1/authentication/users"),
            Some(json!({"username": bad, "password":"pw"})),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reply_topics_cannot_be_forged_by_devices_or_backends() {
    let (_dir, server) = start().await;
    device(&server, "lamp").await;
    let mut spy = Client::connect(&server, "spy", Some(("backend", "backend-pw")), |_| {})
        .await
        .expect("spy")
        .0;
    spy.subscribe("$emqx/things/lamp/#", QoS::AtLeastOnce).await;
    spy.subscribe("$emqx/commands/things/lamp/#", QoS::AtLeastOnce)
        .await;

    let mut lamp = Client5::connect(Client5::options(&server, "lamp", ("lamp", "pw")))
        .await
        .expect("lamp");
    for forged in [
        "$emqx/things/lamp/shadow/update/accepted",
        "$emqx/things/lamp/shadow/update/delta",
        "$emqx/things/lamp/jobs/notify-next",
    ] {
        lamp.client
            .publish(
                forged,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                r#"{"state":{"desired":{"unlock":true}}}"#,
            )
            .await
            .expect("publish");
        let reason = lamp
            .expect("PUBACK", |p| match p {
                P5::PubAck(ack) => Some(ack.reason),
                _ => None,
            })
            .await;
        assert_eq!(reason, PubAckReason::NotAuthorized, "{forged}");
    }
    let backend = Client::connect(&server, "b1", Some(("backend", "backend-pw")), |_| {})
        .await
        .expect("backend")
        .0;
    backend
        .client
        .publish(
            "$emqx/commands/things/lamp/executions/x1/request",
            QoS::AtLeastOnce,
            false,
            "{}",
        )
        .await
        .expect("publish");
    // The first thing the spy sees is the real reply to a real update.
    lamp.client
        .publish(
            "$emqx/things/lamp/shadow/update",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            r#"{"state":{"reported":{"on":true}}}"#,
        )
        .await
        .expect("publish");
    let seen = spy.next_topic("the real accepted").await;
    assert_eq!(seen, "$emqx/things/lamp/shadow/update/accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_outside_the_server_namespaces_are_ordinary_topics() {
    let (_dir, server) = start().await;
    create(
        &server,
        "/api/v1/authentication/users",
        json!({"username":"app","password":"pw"}),
    )
    .await;
    let (mut app, _) = Client::connect(&server, "app-1", Some(("app", "pw")), |_| {})
        .await
        .expect("app");
    assert_eq!(
        app.subscribe("$app/alerts/#", QoS::AtLeastOnce).await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    for reserved in ["$emqx/things/#", "$SYS/#", "$aws/things/+/shadow/#"] {
        assert_eq!(
            app.subscribe(reserved, QoS::AtLeastOnce).await,
            [rumqttc::SubscribeReasonCode::Failure],
            "{reserved}"
        );
    }
    app.client
        .publish("$app/alerts/fire", QoS::AtLeastOnce, false, "x")
        .await
        .expect("publish");
    assert_eq!(app.next_topic("its own $ topic").await, "$app/alerts/fire");
}
