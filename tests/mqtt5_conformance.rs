//! MQTT 5 behaviours a strict client relies on, and protocol violations that must close the
//! connection: receive maximum, session expiry at DISCONNECT, will delay, subscription
//! identifiers, server topic aliases, fixed-header flags and the CONNECT reserved flag.

mod common;

use std::time::{Duration, Instant};

use common::mqtt::{connect5, Client5, Raw, WAIT};
use common::{call, Server};
use reqwest::Method;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode as Code5, Disconnect, DisconnectProperties, DisconnectReasonCode, LastWill,
    LastWillProperties, Packet as P5, Publish, PublishProperties, SubscribeProperties,
};
use rumqttc::v5::mqttbytes::QoS;

const USER: (&str, &str) = common::BACKEND;

async fn start(toml: &str) -> (tempfile::TempDir, Server) {
    common::start_with_backend(toml).await
}

async fn client(server: &Server, id: &str) -> Client5 {
    Client5::connect(Client5::options(server, id, USER))
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_announces_the_receive_maximum_and_a_lowered_session_expiry() {
    let (_dir, server) =
        start("mqtt_session_expiry_max_s = 60\nmqtt_inbound_inflight_max = 4\n").await;
    let mut options = Client5::options(&server, "c1", USER);
    options.set_session_expiry_interval(Some(3600));
    let c1 = Client5::connect(options).await.expect("connect");
    let properties = c1.connack.properties.clone().expect("CONNACK properties");
    assert_eq!(properties.receive_max, Some(4));
    assert_eq!(
        properties.session_expiry_interval,
        Some(60),
        "lowered to the server's bound"
    );
    let mut options = Client5::options(&server, "c2", USER);
    options.set_session_expiry_interval(Some(30));
    let c2 = Client5::connect(options).await.expect("connect");
    assert_eq!(
        c2.connack
            .properties
            .expect("properties")
            .session_expiry_interval,
        None,
        "not lowered: not sent"
    );
}

fn qos2_publish(pkid: u16) -> P5 {
    let mut publish = Publish::new("rm/t", QoS::ExactlyOnce, "x", None);
    publish.pkid = pkid;
    P5::Publish(publish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_unacknowledged_publishes_than_the_receive_maximum_get_disconnect_0x93() {
    let (_dir, server) = start("mqtt_inbound_inflight_max = 3\n").await;
    let (mut raw, ack) = Raw::connect_v5(&server, connect5("greedy", true, None), Some(USER)).await;
    assert_eq!(ack.code, Code5::Success);
    // QoS 2 publishes stay unacknowledged until PUBREL, which this client never sends.
    for pkid in 1..=4 {
        raw.send5(qos2_publish(pkid)).await;
    }
    let mut pubrecs = 0;
    loop {
        match raw.recv5().await {
            Some(P5::PubRec(_)) => pubrecs += 1,
            Some(P5::Disconnect(disconnect)) => {
                assert_eq!(
                    disconnect.reason_code,
                    DisconnectReasonCode::ReceiveMaximumExceeded
                );
                break;
            }
            other => panic!("expected PUBREC or DISCONNECT, got {other:?}"),
        }
    }
    assert_eq!(pubrecs, 3);
    assert!(raw.closed_by_server().await);
}

fn disconnect_with_expiry(seconds: u32) -> P5 {
    P5::Disconnect(Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
        properties: Some(DisconnectProperties {
            session_expiry_interval: Some(seconds),
            reason_string: None,
            user_properties: vec![],
            server_reference: None,
        }),
    })
}

async fn session_expiry(server: &Server, client_id: &str) -> Option<u64> {
    let (status, body) = call(
        Method::GET,
        &server.url(&format!("/api/v1/clients/{client_id}")),
        None,
    )
    .await;
    (status == 200).then(|| body["sessionExpiryInterval"].as_u64().expect("expiry"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_expiry_sent_at_disconnect_replaces_the_one_from_connect() {
    let (_dir, server) = start("").await;
    let (mut raw, _) = Raw::connect_v5(&server, connect5("mover", true, Some(1)), Some(USER)).await;
    raw.send5(disconnect_with_expiry(5)).await;
    assert!(raw.closed_by_server().await);
    let left = Instant::now();
    assert_eq!(session_expiry(&server, "mover").await, Some(5));
    // Past the 1 s it connected with (and the 1 s sweep after it), the session is still there.
    while left.elapsed() < Duration::from_millis(2500) {
        assert_eq!(
            session_expiry(&server, "mover").await,
            Some(5),
            "kept after {:?}",
            left.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_raw, ack) = Raw::connect_v5(&server, connect5("mover", false, Some(5)), Some(USER)).await;
    assert!(ack.session_present, "found 2.5 s later");

    // A session that was not persistent may not become one at DISCONNECT: protocol error.
    let (mut raw, _) = Raw::connect_v5(&server, connect5("sneaky", true, None), Some(USER)).await;
    raw.send5(disconnect_with_expiry(5)).await;
    match raw.recv5().await {
        Some(P5::Disconnect(d)) => assert_eq!(d.reason_code, DisconnectReasonCode::ProtocolError),
        other => panic!("expected DISCONNECT 0x82, got {other:?}"),
    }
    assert_eq!(session_expiry(&server, "sneaky").await, None);
}

fn will(topic: &str, delay_s: u32) -> LastWill {
    LastWill::new(
        topic,
        "gone",
        QoS::AtLeastOnce,
        false,
        Some(LastWillProperties {
            delay_interval: Some(delay_s),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: vec![],
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_will_is_published_when_the_session_ends_first() {
    let (_dir, server) = start("").await;
    let mut watcher = client(&server, "watcher").await;
    watcher.subscribe("wills/#").await;
    // Session expiry 0: the session ends with the connection, long before the 600 s delay.
    let mut options = Client5::options(&server, "short-lived", USER);
    options.set_last_will(will("wills/short-lived", 600));
    let dying = Client5::connect(options).await.expect("connect");
    dying.task.abort();
    let publish = watcher.next_publish("the will").await;
    assert_eq!(&publish.topic[..], b"wills/short-lived");

    // Session expiry 600 s and a delay of 1 s: the delay passes first.
    let mut options = Client5::options(&server, "delayed", USER);
    options.set_session_expiry_interval(Some(600));
    options.set_last_will(will("wills/delayed", 1));
    let dying = Client5::connect(options).await.expect("connect");
    let lost_at = Instant::now();
    dying.task.abort();
    let publish = watcher.next_publish("the delayed will").await;
    assert_eq!(&publish.topic[..], b"wills/delayed");
    assert!(
        lost_at.elapsed() >= Duration::from_secs(1),
        "not before its delay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_carries_the_identifier_of_every_matching_subscription() {
    let (_dir, server) = start("").await;
    let mut c = client(&server, "ids").await;
    for (filter, id) in [("ids/+", 1), ("ids/#", 2)] {
        c.client
            .subscribe_with_properties(
                filter,
                QoS::AtLeastOnce,
                SubscribeProperties {
                    id: Some(id),
                    user_properties: vec![],
                },
            )
            .await
            .expect("subscribe");
        c.expect("SUBACK", |p| matches!(p, P5::SubAck(_)).then_some(()))
            .await;
    }
    c.client
        .publish("ids/x", QoS::AtLeastOnce, false, "x")
        .await
        .expect("publish");
    let publish = c.next_publish("the message").await;
    let mut ids = publish
        .properties
        .expect("properties")
        .subscription_identifiers;
    ids.sort_unstable();
    assert_eq!(ids, [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_sends_topic_aliases_to_clients_that_accept_them() {
    let (_dir, server) = start("").await;
    let mut options = Client5::options(&server, "aliased", USER);
    options.set_topic_alias_max(Some(2));
    let mut c = Client5::connect(options).await.expect("connect");
    c.subscribe("alias/#").await;
    let publisher = client(&server, "publisher").await;
    for topic in ["alias/a", "alias/a", "alias/b", "alias/c", "alias/b"] {
        publisher
            .client
            .publish(topic, QoS::AtLeastOnce, false, "x")
            .await
            .expect("publish");
    }
    let mut seen = Vec::new();
    for _ in 0..5 {
        let publish = c.next_publish("a message").await;
        let alias = publish.properties.and_then(|p| p.topic_alias);
        seen.push((String::from_utf8_lossy(&publish.topic).into_owned(), alias));
    }
    let expected = [
        ("alias/a", Some(1)),
        ("", Some(1)),
        ("alias/b", Some(2)),
        ("alias/c", None),
        ("", Some(2)),
    ];
    let expected: Vec<(String, Option<u16>)> =
        expected.iter().map(|(t, a)| (t.to_string(), *a)).collect();
    assert_eq!(seen, expected, "at most 2 aliases, reused for known topics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_fixed_header_flags_and_the_connect_reserved_flag_close_the_connection() {
    let (_dir, server) = start("").await;
    let subscribe_flags_0 = [0x80, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x00];
    let unsubscribe_flags_0 = [0xa0, 0x06, 0x00, 0x01, 0x00, 0x00, 0x01, b'a'];
    let pubrel_flags_0 = [0x60, 0x02, 0x00, 0x01];
    for packet in [
        &subscribe_flags_0[..],
        &unsubscribe_flags_0[..],
        &pubrel_flags_0[..],
    ] {
        let (mut raw, _) =
            Raw::connect_v5(&server, connect5("flags", true, None), Some(USER)).await;
        raw.send_bytes(packet).await;
        assert!(raw.closed_by_server().await, "{packet:02x?}");
    }
    // CONNECT with the reserved flag (bit 0) set: 3.1.1 is closed without CONNACK, 5.0 gets
    // "malformed packet" first.
    let v311 = [
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x03, 0x00, 0x3c, 0x00, 0x01, b'r',
    ];
    let mut raw = Raw::open(&server).await;
    raw.send_bytes(&v311).await;
    let mut rest = Vec::new();
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(WAIT, raw.stream.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("read");
    assert!(rest.is_empty(), "no CONNACK: {rest:02x?}");
    let v5 = [
        0x10, 0x0e, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x03, 0x00, 0x3c, 0x00, 0x00, 0x01,
        b'r',
    ];
    let mut raw = Raw::open(&server).await;
    raw.send_bytes(&v5).await;
    match raw.recv5().await {
        Some(P5::ConnAck(ack)) => assert_eq!(ack.code, Code5::MalformedPacket),
        other => panic!("expected CONNACK 0x81, got {other:?}"),
    }
    // The server keeps serving.
    client(&server, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_with_properties_round_trips_after_these_checks() {
    // Guards the fixed-header checks against refusing valid traffic: QoS 0/1/2, retained,
    // with properties, from rumqttc v5.
    let (_dir, server) = start("").await;
    let mut c = client(&server, "valid").await;
    c.subscribe("valid/#").await;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let properties = PublishProperties {
            content_type: Some("text/plain".into()),
            ..PublishProperties::default()
        };
        c.client
            .publish_with_properties("valid/t", qos, true, "x", properties)
            .await
            .expect("publish");
        let publish = c.next_publish("the message").await;
        assert_eq!(&publish.topic[..], b"valid/t");
    }
}
