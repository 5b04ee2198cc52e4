//! The MQTT broker layer against the real server, driven by rumqttc (v3.1.1 and v5) over TCP.

mod common;

use std::time::Duration;

use common::mqtt::{Client, WAIT};
use common::{call, Server};
use reqwest::Method;
use rumqttc::{ConnectReturnCode, ConnectionError, LastWill, MqttOptions, QoS};
use serde_json::json;

async fn create_user(server: &Server, body: serde_json::Value) {
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/authentication/users"),
        Some(body),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

async fn backend(server: &Server, id: &str) -> Client {
    Client::connect(server, id, Some(("backend", "backend-pw")), |_| {})
        .await
        .expect("backend connects")
        .0
}

async fn start() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    create_user(
        &server,
        json!({"username":"backend","password":"backend-pw","superuser":true}),
    )
    .await;
    (dir, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_credentials_are_refused_with_the_right_connack_code() {
    let (_dir, server) = start().await;
    let wrong = Client::connect(&server, "c1", Some(("backend", "nope")), |_| {}).await;
    assert!(
        matches!(
            wrong,
            Err(ConnectionError::ConnectionRefused(
                ConnectReturnCode::BadUserNamePassword
            ))
        ),
        "{:?}",
        wrong.err()
    );
    let anonymous = Client::connect(&server, "c2", None, |_| {}).await;
    assert!(
        matches!(
            anonymous,
            Err(ConnectionError::ConnectionRefused(
                ConnectReturnCode::NotAuthorized
            ))
        ),
        "{:?}",
        anonymous.err()
    );
    // v5 gets the v5 reason code.
    let mut options =
        rumqttc::v5::MqttOptions::new("c3", server.mqtt.ip().to_string(), server.mqtt.port());
    options.set_credentials("backend", "wrong");
    let (_client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 8);
    let refused = tokio::time::timeout(WAIT, eventloop.poll())
        .await
        .expect("answer in time");
    assert!(
        matches!(
            refused,
            Err(rumqttc::v5::ConnectionError::ConnectionRefused(
                rumqttc::v5::mqttbytes::v5::ConnectReturnCode::BadUserNamePassword
            ))
        ),
        "{refused:?}"
    );
    // And the server still serves good clients.
    backend(&server, "ok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_and_1_flow_at_the_lower_qos_and_retained_messages_reach_late_subscribers() {
    let (_dir, server) = start().await;
    let mut sub1 = backend(&server, "sub1").await;
    let mut sub0 = backend(&server, "sub0").await;
    assert_eq!(
        sub1.subscribe("app/+/temp", QoS::AtLeastOnce).await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    sub0.subscribe("app/#", QoS::AtMostOnce).await;
    let publisher = backend(&server, "pub").await;
    publisher
        .client
        .publish("app/k1/temp", QoS::AtLeastOnce, false, "21.5")
        .await
        .expect("publish");
    let got = sub1.publish_on("app/k1/temp").await;
    assert_eq!(
        (got.qos, &got.payload[..]),
        (QoS::AtLeastOnce, &b"21.5"[..])
    );
    let got = sub0.publish_on("app/k1/temp").await;
    assert_eq!(
        got.qos,
        QoS::AtMostOnce,
        "delivered at min(publish, subscription) QoS"
    );

    publisher
        .client
        .publish("app/k1/config", QoS::AtLeastOnce, true, "v2")
        .await
        .expect("retained");
    sub0.publish_on("app/k1/config").await;
    let mut late = backend(&server, "late").await;
    late.subscribe("app/k1/config", QoS::AtLeastOnce).await;
    let retained = late.publish_on("app/k1/config").await;
    assert!(
        retained.retain,
        "a retained message is flagged retained to a new subscriber"
    );
    assert_eq!(&retained.payload[..], b"v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_2_is_delivered_exactly_once() {
    let (_dir, server) = start().await;
    let mut subscriber = backend(&server, "s2").await;
    subscriber.subscribe("q2/t", QoS::ExactlyOnce).await;
    let publisher = backend(&server, "p2").await;
    for n in 0..5 {
        publisher
            .client
            .publish("q2/t", QoS::ExactlyOnce, false, format!("m{n}"))
            .await
            .expect("publish");
    }
    for n in 0..5 {
        let got = subscriber.publish_on("q2/t").await;
        assert_eq!(
            (got.qos, got.payload.to_vec()),
            (QoS::ExactlyOnce, format!("m{n}").into_bytes())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_publishes_its_will_and_a_clean_disconnect_does_not() {
    let (_dir, server) = start().await;
    let mut watcher = backend(&server, "watcher").await;
    watcher.subscribe("status/#", QoS::AtLeastOnce).await;
    let (dying, _) = Client::connect(&server, "dying", Some(("backend", "backend-pw")), |o| {
        o.set_last_will(LastWill::new(
            "status/dying",
            "offline",
            QoS::AtLeastOnce,
            false,
        ));
    })
    .await
    .expect("connect");
    dying.kill();
    assert_eq!(
        &watcher.publish_on("status/dying").await.payload[..],
        b"offline"
    );

    let (polite, _) = Client::connect(&server, "polite", Some(("backend", "backend-pw")), |o| {
        o.set_last_will(LastWill::new(
            "status/polite",
            "offline",
            QoS::AtLeastOnce,
            false,
        ));
    })
    .await
    .expect("connect");
    polite.client.disconnect().await.expect("disconnect");
    // A marker published afterwards arrives first if no will was sent.
    let marker = backend(&server, "marker").await;
    marker
        .client
        .publish("status/marker", QoS::AtLeastOnce, false, "m")
        .await
        .expect("publish");
    let next = watcher.next_topic("the marker").await;
    assert_eq!(next, "status/marker", "no will after a clean DISCONNECT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_gets_what_was_published_while_it_was_offline() {
    let (_dir, server) = start().await;
    let persistent = |o: &mut MqttOptions| {
        o.set_clean_session(false);
    };
    let (mut device, present) = Client::connect(
        &server,
        "sleepy",
        Some(("backend", "backend-pw")),
        persistent,
    )
    .await
    .expect("connect");
    assert!(!present);
    device.subscribe("inbox/sleepy", QoS::AtLeastOnce).await;
    device.client.disconnect().await.expect("disconnect");
    assert!(device.closed_by_server().await);

    let publisher = backend(&server, "sender").await;
    for n in 0..3 {
        publisher
            .client
            .publish("inbox/sleepy", QoS::AtLeastOnce, false, format!("{n}"))
            .await
            .expect("publish");
    }
    // Wait (bounded) until the broker has routed them: a QoS 1 round trip of our own.
    let mut probe = backend(&server, "probe").await;
    probe.subscribe("probe", QoS::AtLeastOnce).await;
    publisher
        .client
        .publish("probe", QoS::AtLeastOnce, false, "x")
        .await
        .expect("probe");
    probe.publish_on("probe").await;

    let (mut device, present) = Client::connect(
        &server,
        "sleepy",
        Some(("backend", "backend-pw")),
        persistent,
    )
    .await
    .expect("reconnect");
    assert!(present, "the session was kept");
    for n in 0..3 {
        assert_eq!(
            device.publish_on("inbox/sleepy").await.payload.to_vec(),
            format!("{n}").into_bytes()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_client_id_takes_over() {
    let (_dir, server) = start().await;
    let mut first = backend(&server, "twin").await;
    let mut second = backend(&server, "twin").await;
    assert!(
        first.closed_by_server().await,
        "the old connection is closed"
    );
    second.subscribe("twin/x", QoS::AtMostOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let (_dir, server) = start().await;
    let mut all = backend(&server, "all").await;
    all.subscribe("#", QoS::AtMostOnce).await;
    let mut system = backend(&server, "system").await;
    system
        .subscribe("$emqx/things/+/telemetry", QoS::AtMostOnce)
        .await;
    let publisher = backend(&server, "p").await;
    publisher
        .client
        .publish("$emqx/things/t1/telemetry", QoS::AtLeastOnce, false, "{}")
        .await
        .expect("publish");
    publisher
        .client
        .publish("plain/after", QoS::AtLeastOnce, false, "x")
        .await
        .expect("publish");
    system.publish_on("$emqx/things/t1/telemetry").await;
    let first_seen = all.next_topic("a publish").await;
    assert_eq!(first_seen, "plain/after", "# must not match a $ topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thing_may_use_only_its_own_topics() {
    let (_dir, server) = start().await;
    for name in ["t1", "t2"] {
        let (status, _) = call(
            Method::POST,
            &server.url("/api/v1/things"),
            Some(json!({"thingName": name})),
        )
        .await;
        assert_eq!(status, 201);
    }
    // Bound by name: the username equals a registered Thing.
    create_user(&server, json!({"username":"t1","password":"pw"})).await;
    let (mut t1, _) = Client::connect(&server, "t1", Some(("t1", "pw")), |_| {})
        .await
        .expect("connect");
    let own = t1
        .subscribe("$emqx/things/t1/shadow/update/delta", QoS::AtLeastOnce)
        .await;
    assert_eq!(
        own,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let other = t1
        .subscribe("$emqx/things/t2/shadow/update/delta", QoS::AtLeastOnce)
        .await;
    assert_eq!(other, [rumqttc::SubscribeReasonCode::Failure]);
    let wildcard = t1
        .subscribe("$emqx/things/+/shadow/update/delta", QoS::AtLeastOnce)
        .await;
    assert_eq!(wildcard, [rumqttc::SubscribeReasonCode::Failure]);

    // A denied publish is dropped (and acknowledged in 3.1.1).
    let mut spy = backend(&server, "spy").await;
    spy.subscribe("$emqx/things/#", QoS::AtLeastOnce).await;
    t1.client
        .publish("$emqx/things/t2/telemetry", QoS::AtLeastOnce, false, "{}")
        .await
        .expect("publish");
    t1.client
        .publish("$emqx/things/t1/telemetry", QoS::AtLeastOnce, false, "{}")
        .await
        .expect("publish");
    let seen = spy.next_topic("a publish").await;
    assert_eq!(seen, "$emqx/things/t1/telemetry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_split_messages_between_members() {
    let (_dir, server) = start().await;
    let mut a = backend(&server, "worker-a").await;
    let mut b = backend(&server, "worker-b").await;
    a.subscribe("$share/workers/jobs/+", QoS::AtLeastOnce).await;
    b.subscribe("$share/workers/jobs/+", QoS::AtLeastOnce).await;
    let publisher = backend(&server, "boss").await;
    for n in 0..4 {
        publisher
            .client
            .publish(format!("jobs/{n}"), QoS::AtLeastOnce, false, "x")
            .await
            .expect("publish");
    }
    let mut topics = Vec::new();
    for worker in [&mut a, &mut b] {
        for _ in 0..2 {
            topics.push(worker.next_topic("a job").await);
        }
    }
    topics.sort();
    assert_eq!(
        topics,
        ["jobs/0", "jobs/1", "jobs/2", "jobs/3"],
        "each job exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_close_only_that_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dir, server) = start().await;
    let mut healthy = backend(&server, "healthy").await;
    healthy.subscribe("still/here", QoS::AtLeastOnce).await;
    for garbage in [
        vec![0xff, 0xff, 0xff, 0xff, 0xff], // not a CONNECT
        vec![0x10, 0x03, 0x00, 0x04, b'X'], // truncated CONNECT, then EOF
        vec![
            0x10, 0x0c, 0x00, 0x04, b'X', b'Y', b'Z', b'W', 4, 2, 0, 60, 0, 0,
        ], // wrong protocol name
    ] {
        let mut socket = tokio::net::TcpStream::connect(server.mqtt)
            .await
            .expect("tcp");
        socket.write_all(&garbage).await.expect("write");
        socket.shutdown().await.expect("shutdown write");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, socket.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the server closes the connection");
    }
    // A valid CONNECT followed by a packet with an impossible remaining length.
    let mut socket = tokio::net::TcpStream::connect(server.mqtt)
        .await
        .expect("tcp");
    let connect = [
        0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0,
    ];
    socket.write_all(&connect).await.expect("write");
    socket
        .write_all(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f])
        .await
        .expect("write");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, socket.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "closed after the malformed packet");

    let publisher = backend(&server, "after").await;
    publisher
        .client
        .publish("still/here", QoS::AtLeastOnce, false, "yes")
        .await
        .expect("publish");
    healthy.publish_on("still/here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_is_accepted_and_an_empty_client_id_gets_one_assigned() {
    let (_dir, server) = start().await;
    let (mut quiet, _) = Client::connect(&server, "quiet", Some(("backend", "backend-pw")), |o| {
        o.set_keep_alive(Duration::ZERO);
    })
    .await
    .expect("keep-alive 0 connects");
    quiet.subscribe("k/0", QoS::AtMostOnce).await;

    let mut options =
        rumqttc::v5::MqttOptions::new("", server.mqtt.ip().to_string(), server.mqtt.port());
    options.set_credentials("backend", "backend-pw");
    let (_client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 8);
    let assigned = loop {
        match tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .expect("in time")
            .expect("connects")
        {
            rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(ack)) => {
                break ack.properties.and_then(|p| p.assigned_client_identifier);
            }
            _ => continue,
        }
    };
    assert!(assigned.is_some_and(|id| id.starts_with("thinghub-")));
}

async fn describe(server: &Server, name: &str) -> serde_json::Value {
    let (status, body) = call(
        Method::GET,
        &server.url(&format!("/api/v1/things/{name}")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Polls (bounded) until the Thing's description satisfies `done`.
async fn wait_for_thing(
    server: &Server,
    name: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = describe(server, name).await;
        if done(&body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_and_disconnects_of_a_thing_are_in_its_status_and_history() {
    let (_dir, server) = start().await;
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things"),
        Some(json!({"thingName":"pump-9","mqttClientId":"pump-9-client"})),
    )
    .await;
    assert_eq!(status, 201);
    create_user(
        &server,
        json!({"username":"dev9","password":"pw","thingName":"pump-9"}),
    )
    .await;
    assert_eq!(describe(&server, "pump-9").await["online"], false);

    let (first, _) = Client::connect(&server, "pump-9-client", Some(("dev9", "pw")), |_| {})
        .await
        .expect("connect");
    wait_for_thing(&server, "pump-9", "online", |b| b["online"] == true).await;

    // A takeover: the old connection's disconnect is recorded but the Thing stays online.
    let (second, _) = Client::connect(&server, "pump-9-client", Some(("dev9", "pw")), |o| {
        o.set_keep_alive(Duration::from_secs(1));
    })
    .await
    .expect("takeover");
    drop(first);
    // Stop the second client's pings: the server ends it after 1.5 x keep-alive.
    second.kill();
    let body = wait_for_thing(&server, "pump-9", "offline", |b| b["online"] == false).await;
    assert!(
        ["keepalive_timeout", "connection_lost"]
            .contains(&body["lastDisconnectReason"].as_str().unwrap_or("")),
        "{body}"
    );
    assert!(body["lastSeenAt"].is_u64());

    let (_, history) = call(
        Method::GET,
        &server.url("/api/v1/things/pump-9/history"),
        None,
    )
    .await;
    let summaries: Vec<String> = history["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["type"].as_str().unwrap_or(""),
                e["summary"].as_str().unwrap_or("")
            )
        })
        .collect();
    let mut types: Vec<&str> = summaries
        .iter()
        .map(|s| s.split(' ').next().unwrap_or(""))
        .collect();
    // The successor's connect and the predecessor's takeover disconnect are recorded by two
    // connections concurrently: either order is right.
    types[1..4].sort_unstable();
    assert_eq!(
        types,
        [
            "ThingRegistered",
            "ThingConnected",
            "ThingConnected",
            "ThingDisconnected",
            "ThingDisconnected"
        ],
        "{summaries:#?}"
    );
    assert!(
        summaries[1..4]
            .iter()
            .any(|s| s.contains("reason=takeover")),
        "{summaries:#?}"
    );
    assert!(!summaries[4].contains("reason=takeover"), "{summaries:#?}");

    // A client that goes silent with its socket open is ended after 1.5 x keep-alive.
    let mut silent = raw_connect(&server, "pump-9-client", "dev9", "pw", 1).await;
    wait_for_thing(&server, "pump-9", "online again", |b| b["online"] == true).await;
    let body = wait_for_thing(&server, "pump-9", "keep-alive expiry", |b| {
        b["online"] == false
    })
    .await;
    assert_eq!(body["lastDisconnectReason"], "keepalive_timeout", "{body}");
    let mut rest = Vec::new();
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(WAIT, silent.read_to_end(&mut rest))
        .await
        .expect("closed")
        .expect("read");
}

/// A hand-written MQTT 3.1.1 CONNECT (clean session, username + password); returns the socket
/// after a successful CONNACK.
async fn raw_connect(
    server: &Server,
    client_id: &str,
    username: &str,
    password: &str,
    keep_alive_s: u16,
) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0b1100_0010];
    body.extend_from_slice(&keep_alive_s.to_be_bytes());
    for field in [client_id, username, password] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    assert!(body.len() < 128, "single-byte remaining length");
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    let mut socket = tokio::net::TcpStream::connect(server.mqtt)
        .await
        .expect("tcp");
    socket.write_all(&packet).await.expect("write CONNECT");
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, socket.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .expect("read");
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "accepted");
    socket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_acl_rules_override_the_defaults_in_order() {
    let (_dir, server) = start().await;
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things"),
        Some(json!({"thingName":"t7"})),
    )
    .await;
    assert_eq!(status, 201);
    create_user(&server, json!({"username":"t7","password":"pw"})).await;
    let rules = server.url("/api/v1/authorization/rules");
    let (status, deny) = call(
        Method::POST,
        &rules,
        Some(json!({"permission":"deny","action":"subscribe","topic":"$emqx/things/${username}/jobs/#"})),
    )
    .await;
    assert_eq!(status, 201, "{deny}");
    let (status, _) = call(
        Method::POST,
        &rules,
        Some(
            json!({"username":"t7","permission":"allow","action":"all","topic":"fleet/broadcast"}),
        ),
    )
    .await;
    assert_eq!(status, 201);
    let (status, body) = call(
        Method::POST,
        &rules,
        Some(json!({"permission":"allow","action":"all","topic":"a/#/b"})),
    )
    .await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(400)), "{body}");
    let (_, listed) = call(Method::GET, &rules, None).await;
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(2));

    let (mut t7, _) = Client::connect(&server, "t7", Some(("t7", "pw")), |_| {})
        .await
        .expect("connect");
    assert_eq!(
        t7.subscribe("$emqx/things/t7/jobs/notify", QoS::AtLeastOnce)
            .await,
        [rumqttc::SubscribeReasonCode::Failure]
    );
    assert_eq!(
        t7.subscribe("fleet/broadcast", QoS::AtLeastOnce).await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)],
        "outside its namespace, allowed by a rule"
    );
    assert_eq!(
        t7.subscribe("$emqx/things/t7/shadow/update/delta", QoS::AtLeastOnce)
            .await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)],
        "no rule matches: the default applies"
    );
    let id = deny["id"].as_str().expect("id");
    let (status, _) = call(Method::DELETE, &format!("{rules}/{id}"), None).await;
    assert_eq!(status, 204);
    assert_eq!(
        t7.subscribe("$emqx/things/t7/jobs/notify", QoS::AtLeastOnce)
            .await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)],
        "allowed again once the rule is deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_properties_and_expiry_are_forwarded_and_oversize_packets_withheld() {
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient as C5, Event as E5, MqttOptions as O5};
    let (_dir, server) = start().await;
    let options = |id: &str, max_packet: Option<u32>| {
        let mut o = O5::new(id, server.mqtt.ip().to_string(), server.mqtt.port());
        o.set_credentials("backend", "backend-pw");
        o.set_max_packet_size(max_packet);
        o
    };
    let (subscriber, mut sub_loop) = C5::new(options("v5-sub", Some(512)), 16);
    subscriber
        .subscribe("v5/#", Q5::AtLeastOnce)
        .await
        .expect("subscribe");
    // Run the subscriber until it holds its SUBACK.
    loop {
        match tokio::time::timeout(WAIT, sub_loop.poll())
            .await
            .expect("in time")
            .expect("connected")
        {
            E5::Incoming(P5::SubAck(_)) => break,
            _ => continue,
        }
    }
    let (publisher, mut pub_loop) = C5::new(options("v5-pub", None), 16);
    tokio::spawn(async move { while pub_loop.poll().await.is_ok() {} });
    let properties = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        topic_alias: None,
        response_topic: Some("v5/replies".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"req-1")),
        user_properties: vec![("k".into(), "v".into())],
        subscription_identifiers: vec![],
        content_type: Some("application/json".into()),
    };
    publisher
        .publish_with_properties("v5/a", Q5::AtLeastOnce, false, "{}", properties)
        .await
        .expect("publish");
    publisher
        .publish("v5/big", Q5::AtLeastOnce, false, vec![b'x'; 2000])
        .await
        .expect("publish big");
    publisher
        .publish("v5/small", Q5::AtLeastOnce, false, "ok")
        .await
        .expect("publish small");

    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < 2 {
        let event = tokio::time::timeout_at(deadline, sub_loop.poll())
            .await
            .expect("in time")
            .expect(
                "the subscriber stays connected (nothing over its maximum packet size arrives)",
            );
        if let E5::Incoming(P5::Publish(publish)) = event {
            seen.push((
                String::from_utf8_lossy(&publish.topic).into_owned(),
                publish.properties,
            ));
        }
    }
    assert_eq!(seen[0].0, "v5/a");
    let forwarded = seen[0].1.clone().expect("properties forwarded");
    assert_eq!(forwarded.content_type.as_deref(), Some("application/json"));
    assert_eq!(forwarded.response_topic.as_deref(), Some("v5/replies"));
    assert_eq!(forwarded.correlation_data.as_deref(), Some(&b"req-1"[..]));
    assert_eq!(
        forwarded.user_properties,
        [("k".to_string(), "v".to_string())]
    );
    assert_eq!(forwarded.payload_format_indicator, Some(1));
    let expiry = forwarded.message_expiry_interval.expect("remaining expiry");
    assert!((3590..=3600).contains(&expiry), "{expiry}");
    assert_eq!(
        seen[1].0, "v5/small",
        "the 2 KB message was withheld from a 512-byte client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_inspect_and_kick_clients() {
    let (_dir, server) = start().await;
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things"),
        Some(json!({"thingName":"k1","mqttClientId":"k1-client"})),
    )
    .await;
    assert_eq!(status, 201);
    create_user(&server, json!({"username":"k1","password":"pw"})).await;
    let (mut device, _) = Client::connect(&server, "k1-client", Some(("k1", "pw")), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("connect");
    device
        .subscribe("$emqx/things/k1/shadow/update/delta", QoS::AtLeastOnce)
        .await;

    let (status, page) = call(Method::GET, &server.url("/api/v1/clients"), None).await;
    assert_eq!(status, 200);
    let listed = page["items"].as_array().expect("items");
    assert!(
        listed.iter().any(|c| c["clientId"] == "k1-client"),
        "{page}"
    );
    let (status, client) = call(Method::GET, &server.url("/api/v1/clients/k1-client"), None).await;
    assert_eq!(status, 200);
    assert_eq!(client["connected"], true);
    assert_eq!(client["thingName"], "k1");
    assert_eq!(client["protocol"], "3.1.1");
    assert_eq!(client["persistent"], true);
    assert_eq!(
        client["subscriptions"],
        json!(["$emqx/things/k1/shadow/update/delta"])
    );

    let (status, _) = call(
        Method::DELETE,
        &server.url("/api/v1/clients/k1-client"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    assert!(device.closed_by_server().await, "kicked");
    let body = wait_for_thing(&server, "k1", "kicked", |b| b["online"] == false).await;
    assert_eq!(body["lastDisconnectReason"], "kicked");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _) = call(Method::GET, &server.url("/api/v1/clients/k1-client"), None).await;
        if status == 404 {
            break; // the session was discarded
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "session still present"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = call(Method::DELETE, &server.url("/api/v1/clients/nobody"), None).await;
    assert_eq!((status, body["code"].as_u64()), (404, Some(404)));
}
