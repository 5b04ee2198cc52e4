//! Bounds against exhaustion and abuse, against the real server: MQTT sessions, queued and
//! retained bytes, slow consumers, HTTP header/idle/body timeouts and connection cap, JSON
//! errors, and throttled authentication on both channels.

mod common;

use std::time::Duration;

use common::mqtt::{Client, Client5, Raw, WAIT};
use common::{call, create, Server, ADMIN_KEY};
use reqwest::Method;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as Code5, Packet as P5, PubAckReason};
use rumqttc::{ConnectReturnCode, ConnectionError, QoS};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USER: (&str, &str) = common::BACKEND;

async fn start(toml: &str) -> (tempfile::TempDir, Server) {
    common::start_with_backend(toml).await
}

async fn backend(server: &Server, id: &str, persistent: bool) -> Client {
    Client::connect(server, id, Some(USER), |o| {
        o.set_clean_session(!persistent);
    })
    .await
    .expect("connect")
    .0
}

async fn client_view(server: &Server, id: &str) -> serde_json::Value {
    let (status, body) = call(
        Method::GET,
        &server.url(&format!("/api/v1/clients/{id}")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn metrics(server: &Server) -> serde_json::Value {
    call(Method::GET, &server.url("/api/v1/metrics"), None)
        .await
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_past_the_bound_are_refused_and_existing_ones_still_resume() {
    let (_dir, server) = start("mqtt_sessions_max = 2\n").await;
    let first = backend(&server, "s1", true).await;
    let _second = backend(&server, "s2", true).await;
    match Client::connect(&server, "s3", Some(USER), |_| {}).await {
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::ServiceUnavailable)
        }
        other => panic!("expected a refusal, got {:?}", other.err()),
    }
    match Client5::connect(Client5::options(&server, "s3", USER)).await {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, Code5::QuotaExceeded)
        }
        other => panic!("expected quota exceeded, got {:?}", other.err()),
    }
    first.kill();
    let (_again, present) = Client::connect(&server, "s1", Some(USER), |o| {
        o.set_clean_session(false);
    })
    .await
    .expect("an existing session resumes");
    assert!(present);
    assert_eq!(metrics(&server).await["mqtt"]["sessionsRefused"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_may_own_only_so_many_sessions() {
    let (_dir, server) = start("mqtt_user_sessions_max = 2\n").await;
    create(
        &server,
        "/api/v1/authentication/users",
        json!({"username":"app","password":"pw"}),
    )
    .await;
    let app = |id: &'static str| {
        let server = &server;
        async move {
            Client::connect(server, id, Some(("app", "pw")), |o| {
                o.set_clean_session(false);
            })
            .await
        }
    };
    let _a = app("u1").await.expect("first");
    let _b = app("u2").await.expect("second");
    match app("u3").await {
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::ServiceUnavailable)
        }
        other => panic!("expected a refusal, got {:?}", other.err()),
    }
    for id in ["b1", "b2", "b3"] {
        backend(&server, id, true).await;
    }
    // (superusers, backend applications, are not counted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_holds_only_so_many_subscriptions_over_mqtt_and_by_proxy() {
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as Sub5;
    let (_dir, server) = start("mqtt_session_subscriptions_max = 2\n").await;
    let mut v5 = Client5::connect(Client5::options(&server, "subs5", USER))
        .await
        .expect("connect");
    for filter in ["a", "b"] {
        assert!(matches!(v5.subscribe(filter).await[..], [Sub5::Success(_)]));
    }
    assert_eq!(v5.subscribe("c").await, vec![Sub5::QuotaExceeded]);
    assert!(
        matches!(v5.subscribe("a").await[..], [Sub5::Success(_)]),
        "resubscribing to a held filter is no new subscription"
    );
    let mut v4 = backend(&server, "subs4", false).await;
    v4.subscribe("a", QoS::AtMostOnce).await;
    v4.subscribe("b", QoS::AtMostOnce).await;
    assert_eq!(
        v4.subscribe("c", QoS::AtMostOnce).await,
        vec![rumqttc::SubscribeReasonCode::Failure]
    );
    // The operator's proxy subscription counts against the same bound.
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/clients/subs5/subscribe"),
        Some(json!({"topic": "c", "qos": 0})),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("mqtt_session_subscriptions_max")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_bytes_are_bounded_per_session_and_in_total() {
    // 1,000-byte payloads on 6-byte topics: 1,006 bytes each.
    let (_dir, server) =
        start("mqtt_session_queue_bytes_max = 10000\nmqtt_queued_bytes_max = 15000\n").await;
    for id in ["q1", "q2"] {
        let mut c = backend(&server, id, true).await;
        c.subscribe(&format!("box/{id}"), QoS::AtLeastOnce).await;
        c.kill();
    }
    // Until the server has seen both go, a message may still be sent to the dead connection
    // (then held in flight for the resume, neither queued nor dropped).
    let deadline = tokio::time::Instant::now() + WAIT;
    for id in ["q1", "q2"] {
        while client_view(&server, id).await["connected"] != false {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} still connected"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let publisher = backend(&server, "pub", false).await;
    for id in ["q1", "q2"] {
        for _ in 0..20 {
            publisher
                .client
                .publish(
                    format!("box/{id}"),
                    QoS::AtLeastOnce,
                    false,
                    vec![b'x'; 1000],
                )
                .await
                .expect("publish");
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        while client_view(&server, id).await["dropped"].as_u64() < Some(1) {
            assert!(tokio::time::Instant::now() < deadline, "drops counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    let (q1, q2) = loop {
        let (q1, q2) = (
            client_view(&server, "q1").await,
            client_view(&server, "q2").await,
        );
        if q1["dropped"].as_u64().unwrap_or(0) + q1["queued"].as_u64().unwrap_or(0) == 20
            && q2["dropped"].as_u64().unwrap_or(0) + q2["queued"].as_u64().unwrap_or(0) == 20
        {
            break (q1, q2);
        }
        assert!(tokio::time::Instant::now() < deadline, "{q1} {q2}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Half the total bound (7,500 bytes) is shared: q1 takes it, 7 messages (7,042 bytes).
    // The other half is every session's fair share (7,500 / 3 sessions = 2,500 bytes), so q2
    // still gets 2 messages, however much q1 holds.
    assert_eq!(q1["queued"], 7, "{q1}");
    assert_eq!(q1["queuedBytes"], 7042);
    assert_eq!(q2["queued"], 2, "{q2}");
    let m = metrics(&server).await;
    assert_eq!(m["mqtt"]["queuedBytes"], 7042 + 2012, "{m}");
    assert!(m["mqtt"]["messagesDropped"].as_u64() >= Some(31), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_publish_past_the_bound_gets_puback_0x97_and_is_not_kept() {
    let (_dir, server) = start("mqtt_retained_bytes_max = 2000\n").await;
    let mut v5 = Client5::connect(Client5::options(&server, "retainer", USER))
        .await
        .expect("connect");
    let mut results = Vec::new();
    for (topic, size) in [("keep/a", 1500), ("keep/b", 1000), ("keep/a", 1900)] {
        v5.client
            .publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                true,
                vec![b'x'; size],
            )
            .await
            .expect("publish");
        results.push(
            v5.expect("PUBACK", |p| match p {
                P5::PubAck(ack) => Some(ack.reason),
                _ => None,
            })
            .await,
        );
    }
    assert_eq!(
        results,
        [
            PubAckReason::Success,
            PubAckReason::QuotaExceeded,
            PubAckReason::Success
        ],
        "a new topic does not fit; replacing one that fits does"
    );
    let mut late = backend(&server, "late", false).await;
    late.subscribe("keep/#", QoS::AtLeastOnce).await;
    let publish = late.publish_on("keep/a").await;
    assert_eq!(publish.payload.len(), 1900);
    let m = metrics(&server).await;
    assert_eq!(m["mqtt"]["retainedMessages"], 1, "{m}");
    assert_eq!(m["mqtt"]["retainedBytes"], 1906, "{m}");
    assert_eq!(m["mqtt"]["retainedRefused"], 1, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_disconnected_and_its_history_says_so() {
    let (_dir, server) = start("mqtt_outbound_queue_max = 8\n").await;
    create(&server, "/api/v1/things", json!({"thingName":"slow"})).await;
    create(
        &server,
        "/api/v1/authentication/users",
        json!({"username":"slow","password":"pw","thingName":"slow"}),
    )
    .await;
    // A device that subscribes, then never reads again.
    let mut raw = Raw::open_slow_reader(&server).await;
    raw.send_connect_v311("slow", ("slow", "pw")).await;
    raw.send_subscribe_v311("$emqx/things/slow/#").await;
    let online = || async {
        call(Method::GET, &server.url("/api/v1/things/slow"), None)
            .await
            .1
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while online().await["online"] != true {
        assert!(tokio::time::Instant::now() < deadline, "connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (publisher, _) = Client::connect(&server, "flood", Some(USER), |o| {
        o.set_max_packet_size(1 << 20, 1 << 20);
    })
    .await
    .expect("connect");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        for _ in 0..50 {
            publisher
                .client
                .publish(
                    "$emqx/things/slow/telemetry",
                    QoS::AtMostOnce,
                    false,
                    vec![b'x'; 60_000],
                )
                .await
                .expect("publish");
        }
        let thing = online().await;
        if thing["online"] == false {
            assert_eq!(thing["lastDisconnectReason"], "slow_consumer", "{thing}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "disconnected as slow: {thing}"
        );
    }
    assert_eq!(metrics(&server).await["mqtt"]["slowConsumers"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_when_writes_stall() {
    // A large outbound queue, so the stall, not the queue, is what ends it.
    let (_dir, server) =
        start("mqtt_outbound_queue_max = 100000\nmqtt_write_stall_max_ms = 300\n").await;
    let mut raw = Raw::open_slow_reader(&server).await;
    raw.send_connect_v311("reader", USER).await;
    raw.send_subscribe_v311("big").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, view) = call(Method::GET, &server.url("/api/v1/clients/reader"), None).await;
        if view["subscriptions"] == json!(["big"]) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "subscribed: {view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (publisher, _) = Client::connect(&server, "flood", Some(USER), |o| {
        o.set_max_packet_size(1 << 20, 1 << 20);
    })
    .await
    .expect("connect");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        for _ in 0..50 {
            publisher
                .client
                .publish("big", QoS::AtMostOnce, false, vec![b'x'; 60_000])
                .await
                .expect("publish");
        }
        let (status, _) = call(Method::GET, &server.url("/api/v1/clients/reader"), None).await;
        if status == 404 {
            break; // closed, and its clean session gone
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "closed once its writes stalled"
        );
    }
    assert!(metrics(&server).await["mqtt"]["slowConsumers"].as_u64() >= Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_upload_that_stalls_is_ended_with_an_error_line() {
    let (_dir, server) = start("http_body_read_timeout_ms = 300\n").await;
    let mut socket = tokio::net::TcpStream::connect(server.http)
        .await
        .expect("tcp");
    let line = "{\"thingName\":\"first\"}\n";
    let request = format!(
        "POST /api/v1/things/bulk HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{line}\r\n",
        base64_basic(),
        line.len()
    );
    socket.write_all(request.as_bytes()).await.expect("write");
    // ... and then nothing more: the run stops with an error line and a summary.
    let mut answer = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut buffer = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, socket.read(&mut buffer))
            .await
            .expect("answered in time")
            .expect("read");
        answer.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&answer);
        if n == 0 || text.contains("\"summary\"") {
            assert!(text.contains("\"code\":201"), "{text}");
            assert!(
                text.contains("no part of the request body arrived"),
                "{text}"
            );
            break;
        }
    }
}

/// Sends raw bytes over HTTP/1.1 and reads until the server closes (bounded).
async fn raw_http(server: &Server, request: &[u8]) -> Result<String, &'static str> {
    let mut socket = tokio::net::TcpStream::connect(server.http)
        .await
        .expect("tcp");
    socket.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    match tokio::time::timeout(WAIT, socket.read_to_end(&mut answer)).await {
        Err(_) => Err("still open"),
        Ok(_) => Ok(String::from_utf8_lossy(&answer).into_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_and_idle_http_connections_are_closed() {
    let (_dir, server) = start(
        "http_header_read_timeout_ms = 300\nhttp_keep_alive_idle_ms = 300\nhttp_body_read_timeout_ms = 300\n",
    )
    .await;
    let half = raw_http(&server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
    assert_eq!(half, Ok(String::new()), "a half-sent request is dropped");
    let silent = raw_http(&server, b"").await;
    assert_eq!(silent, Ok(String::new()), "a silent connection is dropped");
    let idle = raw_http(&server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(idle.starts_with("HTTP/1.1 200"), "{idle}");
    // Headers in time, the body not: 408 with a JSON body.
    let auth = base64_basic();
    let slow_body = format!(
        "POST /api/v1/things HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\nContent-Length: 100\r\n\r\n{{\"thing"
    );
    let answer = raw_http(&server, slow_body.as_bytes())
        .await
        .expect("answered");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":408"#), "{answer}");
}

fn base64_basic() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .encode(format!("{ADMIN_KEY}:{}", common::ADMIN_SECRET))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connections_past_the_cap_get_503_json_and_the_server_recovers() {
    let (_dir, server) = start("http_connections_max = 2\n").await;
    // Hold both connections (the set-up's own connection may take a moment to be released).
    let mut held = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while held.len() < 2 {
        let mut socket = tokio::net::TcpStream::connect(server.http)
            .await
            .expect("tcp");
        socket
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buffer = [0u8; 512];
        let n = tokio::time::timeout_at(deadline, socket.read(&mut buffer))
            .await
            .expect("answer")
            .expect("read");
        let answer = String::from_utf8_lossy(&buffer[..n]).into_owned();
        if answer.starts_with("HTTP/1.1 200") {
            held.push(socket);
        } else {
            assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "two connections held"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let refused = raw_http(&server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("answered and closed");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains(r#""code":503"#), "{refused}");
    drop(held);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let answer = raw_http(
            &server,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("answered");
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "serving again: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_error_has_a_json_body() {
    let (_dir, server) = start("").await;
    let auth = base64_basic();
    let request = format!(
        "GET /api/v1/things/%FF/shadow HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\nConnection: close\r\n\r\n"
    );
    let answer = raw_http(&server, request.as_bytes())
        .await
        .expect("answered");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{answer}"
    );
    assert!(
        answer.contains(r#""code":400"#) && answer.contains("UTF-8"),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_wrong_admin_secrets_are_throttled_but_the_right_key_still_works() {
    let (_dir, server) = start("auth_failures_free = 2\nauth_backoff_base_ms = 5000\n").await;
    let url = server.url("/api/v1/things");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = common::client()
            .get(&url)
            .basic_auth(ADMIN_KEY, Some("wrong"))
            .send()
            .await
            .expect("request");
        statuses.push(response.status().as_u16());
        if response.status() == 429 {
            assert!(response.headers().contains_key("retry-after"));
            let body: serde_json::Value = response.json().await.expect("JSON");
            assert_eq!(body["code"], 429);
        }
    }
    assert_eq!(statuses, [401, 401, 401, 429]);
    let (status, _) = call(Method::GET, &url, None).await;
    assert_eq!(status, 200, "the holder of the secret is not locked out");
    let m = metrics(&server).await;
    assert_eq!(m["auth"]["httpFailures"], 3, "{m}");
    assert_eq!(m["auth"]["throttled"], 1, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_wrong_mqtt_passwords_are_throttled() {
    let (_dir, server) = start("auth_failures_free = 2\nauth_backoff_base_ms = 5000\n").await;
    let mut codes = Vec::new();
    for _ in 0..3 {
        match Client::connect(&server, "guess", Some(("backend", "guess")), |_| {}).await {
            Err(ConnectionError::ConnectionRefused(code)) => codes.push(code),
            other => panic!("expected a refusal, got {:?}", other.err()),
        }
    }
    assert_eq!(
        codes,
        [
            ConnectReturnCode::BadUserNamePassword,
            ConnectReturnCode::BadUserNamePassword,
            ConnectReturnCode::BadUserNamePassword
        ]
    );
    match Client5::connect(Client5::options(&server, "guess", ("backend", "guess"))).await {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, Code5::ConnectionRateExceeded)
        }
        other => panic!("expected 0x9F, got {:?}", other.err()),
    }
    // An unknown username from the same address is throttled too (the address is blocked).
    match Client::connect(&server, "guess", Some(("nobody", "x")), |_| {}).await {
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::ServiceUnavailable)
        }
        other => panic!("expected a refusal, got {:?}", other.err()),
    }
    let m = metrics(&server).await;
    assert_eq!(m["auth"]["mqttFailures"], 3, "{m}");
    assert_eq!(m["auth"]["throttled"], 2, "{m}");
}
