//! Cumulocity devices (`--cumulocity`) with a plain MQTT client speaking SmartREST CSV: rows
//! on `s/us` land in the device's Thing (inventory in the shadow, events), children created
//! with 101 take rows on `s/us/{child}`, every refused row is answered on the device's own
//! `s/e`, and no device can read or write another's topics.

mod common;

use std::time::{Duration, Instant};

use common::device::{Device, WAIT};
use common::{call, Server};
use reqwest::Method;
use rumqttc::{Packet, QoS};
use serde_json::Value;

/// The next message on `topic` (bounded wait), as text.
async fn next_on(device: &mut Device, topic: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let packet = tokio::time::timeout_at(deadline, device.events.recv())
            .await
            .unwrap_or_else(|_| panic!("nothing on {topic} in time"))
            .expect("connection open");
        if let Packet::Publish(publish) = packet {
            if publish.topic == topic {
                return String::from_utf8_lossy(&publish.payload).into_owned();
            }
        }
    }
}

/// Whatever arrives within `window` (nothing expected).
async fn nothing_within(device: &mut Device, window: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + window;
    while let Ok(Some(packet)) = tokio::time::timeout_at(until, device.events.recv()).await {
        if let Packet::Publish(publish) = packet {
            got.push(format!(
                "{}: {}",
                publish.topic,
                String::from_utf8_lossy(&publish.payload)
            ));
        }
    }
    got
}

async fn subscribe_ack(device: &mut Device, filter: &str) -> rumqttc::SubscribeReasonCode {
    device
        .client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, device.events.recv())
            .await
            .expect("SUBACK in time")
        {
            Some(Packet::SubAck(ack)) => return ack.return_codes[0],
            Some(_) => continue,
            None => panic!("connection closed"),
        }
    }
}

async fn send(device: &Device, topic: &str, rows: &str) {
    device
        .client
        .publish(topic, QoS::AtLeastOnce, false, rows.as_bytes().to_vec())
        .await
        .expect("publish");
}

/// A server with `--cumulocity` and the device `id` (its user's password `pw1`) connected in
/// the `d:` form, subscribed to `filters`.
async fn c8y_device(
    dir: &std::path::Path,
    id: &str,
    clean: bool,
    filters: &[&str],
) -> (Server, Device) {
    let server = Server::start(dir, &["--cumulocity"]);
    common::register_device(&server, id, "pw1").await;
    let (mut device, _) = Device::connect(&server, &format!("d:{id}"), (id, "pw1"), clean).await;
    for filter in filters {
        subscribe_ack(&mut device, filter).await;
    }
    (server, device)
}

/// Waits (bounded) until `GET path` answers a body `done` accepts.
async fn until(server: &Server, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = call(Method::GET, &server.url(path), None).await;
        if status == 200 && done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "GET {path}: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smartrest_rows_land_in_the_thing_and_refusals_come_back_on_the_devices_own_s_e() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["--cumulocity"]);
    common::register_device(&server, "pump-1", "pw1").await;
    common::register_device(&server, "pump-2", "pw2").await;

    // The tenant prefix and the `d:` client id form, as Cumulocity devices connect.
    let (mut pump1, _) =
        Device::connect(&server, "d:pump-1", ("thinghub/pump-1", "pw1"), true).await;
    let (mut pump2, _) = Device::connect(&server, "pump-2", ("pump-2", "pw2"), true).await;
    for device in [&mut pump1, &mut pump2] {
        assert!(matches!(
            subscribe_ack(device, "s/e").await,
            rumqttc::SubscribeReasonCode::Success(_)
        ));
        assert!(matches!(
            subscribe_ack(device, "s/ds").await,
            rumqttc::SubscribeReasonCode::Success(_)
        ));
    }
    // Another device's topics cannot be named.
    assert_eq!(
        subscribe_ack(&mut pump2, "$c8y/pump-1/s/e").await,
        rumqttc::SubscribeReasonCode::Failure
    );
    assert_eq!(
        subscribe_ack(&mut pump2, "s/dcr").await,
        rumqttc::SubscribeReasonCode::Failure,
        "the bootstrap user's alone"
    );

    send(
        &pump1,
        "s/us",
        "100,Pump One,c8y_Pump\n110,SN-1,M1,\"rev, 2\"\n400,c8y_Boot,\"Booted \"\"ok\"\"\"\n999,x\n200,c8y_T,T,warm",
    )
    .await;
    let errors = next_on(&mut pump1, "s/e").await;
    let rows: Vec<&str> = errors.lines().collect();
    assert_eq!(rows[0], "41,100,Device already existing", "{errors}");
    assert_eq!(rows[1], "40,999,unknown template '999'", "{errors}");
    assert!(
        rows[2].starts_with("41,200,") && rows[2].contains("'warm' is not a number"),
        "{errors}"
    );
    assert_eq!(rows.len(), 3, "{errors}");
    let shadow = until(&server, "/api/v1/things/pump-1/shadow", |s| {
        s["state"]["reported"]["c8y_Hardware"].is_object()
    })
    .await;
    assert_eq!(
        shadow["state"]["reported"]["c8y_Hardware"],
        serde_json::json!({"serialNumber": "SN-1", "model": "M1", "revision": "rev, 2"})
    );
    let events = until(&server, "/api/v1/things/pump-1/events", |e| {
        e["items"].as_array().is_some_and(|items| !items.is_empty())
    })
    .await;
    assert_eq!(events["items"][0]["eventType"], "c8y_Boot", "{events}");
    assert_eq!(
        events["items"][0]["data"]["text"], "Booted \"ok\"",
        "{events}"
    );

    // A child: created by its parent, fed through s/us/{child}; nobody else may write for it.
    send(&pump1, "s/us", "101,valve-1,Valve,c8y_Valve").await;
    until(&server, "/api/v1/things/pump-1:valve-1", |t| {
        t["thingType"] == "c8y_Valve"
    })
    .await;
    send(&pump1, "s/us/valve-1", "110,V-SN").await;
    until(&server, "/api/v1/things/pump-1:valve-1/shadow", |s| {
        s["state"]["reported"]["c8y_Hardware"]["serialNumber"] == "V-SN"
    })
    .await;
    send(&pump2, "s/us/valve-1", "110,STOLEN").await;
    let refused = next_on(&mut pump2, "s/e").await;
    // Its children are its own names (`pump-2:valve-1`): pump-1's is not one of them.
    assert!(refused.starts_with("45,110,"), "{refused}");
    send(&pump1, "s/us/ghost", "110,X").await;
    let missing = next_on(&mut pump1, "s/e").await;
    assert!(missing.starts_with("45,110,"), "{missing}");
    send(&pump1, "s/us", "\"open").await;
    let broken = next_on(&mut pump1, "s/e").await;
    assert!(broken.starts_with("44,0,"), "{broken}");
    // A device may not publish on its s/ds (only the server does): answered on s/e.
    send(&pump1, "s/ds", "510,pump-2").await;
    let refused = next_on(&mut pump1, "s/e").await;
    assert!(
        refused.starts_with("43,0,") && refused.contains("'s/ds'"),
        "{refused}"
    );

    // pump-2 saw none of pump-1's answers.
    let leaked: Vec<String> = nothing_within(&mut pump2, Duration::from_millis(300))
        .await
        .into_iter()
        .filter(|m| !m.starts_with("s/e: 45"))
        .collect();
    assert!(leaked.is_empty(), "{leaked:?}");
    let shadow = until(&server, "/api/v1/things/pump-1:valve-1/shadow", |_| true).await;
    assert_eq!(
        shadow["state"]["reported"]["c8y_Hardware"]["serialNumber"], "V-SN",
        "{shadow}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_is_refused_and_without_the_switch_s_topics_are_plain_topics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["--cumulocity", "--cumulocity-tenant", "acme"]);
    common::register_device(&server, "pump-1", "pw1").await;
    let mut options =
        rumqttc::MqttOptions::new("d:pump-1", server.mqtt.ip().to_string(), server.mqtt.port());
    options.set_credentials("other/pump-1", "pw1");
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 8);
    let refused = tokio::time::timeout(WAIT, eventloop.poll())
        .await
        .expect("an answer in time");
    assert!(
        matches!(refused, Err(rumqttc::ConnectionError::ConnectionRefused(_))),
        "{refused:?}"
    );
    let (_ok, _) = Device::connect(&server, "d:pump-1", ("acme/pump-1", "pw1"), true).await;
    drop(server);

    // Without --cumulocity, `s/us` is an ordinary topic (routed, not interpreted).
    let (_dir, server) = common::start_with_backend("").await;
    let (mut app, _) = Device::connect(&server, "app", common::BACKEND, true).await;
    subscribe_ack(&mut app, "s/us").await;
    send(&app, "s/us", "100,x").await;
    assert_eq!(next_on(&mut app, "s/us").await, "100,x");
}

/// A command whose action is a Cumulocity operation goes down on the device's s/ds as its row
/// (queued while the device is away) and the device's 501/502/503 rows answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_go_down_on_s_ds_and_status_rows_answer_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, mut pump) = c8y_device(dir.path(), "pump-1", false, &["s/ds", "s/e"]).await;

    let command = |action: &str, params: Value| serde_json::json!({"action": action, "ttl": 120, "params": params});
    let path = |id: &str| format!("/api/v1/things/pump-1/commands/{id}");
    // An operation a device would not understand, or without its parameters, is refused.
    for (body, why) in [
        (command("c8y_Command", serde_json::json!({})), "'text'"),
        (
            command("c8y_Teleport", serde_json::json!({})),
            "c8y_Teleport",
        ),
    ] {
        let (status, answer) = call(
            Method::POST,
            &server.url("/api/v1/things/pump-1/commands"),
            Some(body),
        )
        .await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer.to_string().contains(why), "{answer}");
    }
    let sent = common::create(
        &server,
        "/api/v1/things/pump-1/commands",
        command("c8y_Restart", serde_json::json!({})),
    )
    .await;
    let restart = sent["executionId"].as_str().expect("id").to_owned();
    assert_eq!(next_on(&mut pump, "s/ds").await, "510,pump-1");
    // 500: the pending operations again.
    send(&pump, "s/us", "500").await;
    assert_eq!(next_on(&mut pump, "s/ds").await, "510,pump-1");
    send(&pump, "s/us", "501,c8y_Restart").await;
    until(&server, &path(&restart), |e| e["status"] == "IN_PROGRESS").await;
    send(&pump, "s/us", "503,c8y_Restart,done").await;
    let execution = until(&server, &path(&restart), |e| e["status"] == "SUCCEEDED").await;
    assert_eq!(
        execution["result"]["parameters"],
        serde_json::json!(["done"]),
        "{execution}"
    );
    // Nothing pending of that fragment any more.
    send(&pump, "s/us", "503,c8y_Restart").await;
    let none = next_on(&mut pump, "s/e").await;
    assert!(none.starts_with("45,503,"), "{none}");

    // Away (its session kept): the operation waits for it.
    pump.client.disconnect().await.expect("disconnect");
    until(&server, "/api/v1/things/pump-1", |t| t["online"] == false).await;
    let sent = common::create(
        &server,
        "/api/v1/things/pump-1/commands",
        command("c8y_Command", serde_json::json!({"text": "reboot, now"})),
    )
    .await;
    let shell = sent["executionId"].as_str().expect("id").to_owned();
    let (mut pump, present) = Device::connect(&server, "d:pump-1", ("pump-1", "pw1"), false).await;
    assert!(present, "session kept");
    assert_eq!(
        next_on(&mut pump, "s/ds").await,
        "511,pump-1,\"reboot, now\""
    );
    send(&pump, "s/us", "502,c8y_Command,no shell").await;
    let execution = until(&server, &path(&shell), |e| e["status"] == "FAILED").await;
    assert_eq!(
        execution["statusReason"]["reasonDescription"], "no shell",
        "{execution}"
    );
}

/// Alarms from a device (301-306) are the alarm model operators list, acknowledge and clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_alarms_are_raised_changed_and_cleared_in_the_alarm_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, mut pump) = c8y_device(dir.path(), "pump-1", true, &["s/e"]).await;

    send(
        &pump,
        "s/us",
        "302,c8y_Overheat,Too hot\n302,c8y_Overheat,Still hot",
    )
    .await;
    let page = until(&server, "/api/v1/things/pump-1/alarms", |body| {
        body["items"][0]["status"] == "ACTIVE"
    })
    .await;
    let alarm = &page["items"][0];
    assert_eq!(alarm["type"], "c8y_Overheat", "{page}");
    assert_eq!(alarm["severity"], "MAJOR");
    assert_eq!(alarm["text"], "Too hot", "one open alarm per type: {page}");
    send(&pump, "s/us", "305,c8y_Overheat,CRITICAL").await;
    until(&server, "/api/v1/alarms?severity=CRITICAL", |body| {
        body["items"][0]["thingName"] == "pump-1"
    })
    .await;
    send(&pump, "s/us", "306,c8y_Overheat").await;
    let page = until(&server, "/api/v1/things/pump-1/alarms", |body| {
        body["items"][0]["status"] == "CLEARED"
    })
    .await;
    assert_eq!(
        page["items"][0]["clearedReason"], "cleared by device",
        "{page}"
    );
    send(
        &pump,
        "s/us",
        "306,c8y_Unknown\n307,c8y_Overheat,c8y_X\n305,c8y_Overheat,MAJOR",
    )
    .await;
    let errors = next_on(&mut pump, "s/e").await;
    let codes: Vec<&str> = errors.lines().map(|l| &l[..6]).collect();
    assert_eq!(codes, ["45,306", "45,307", "41,305"], "{errors}");
}

/// Measurements (200, 201, 210-212) are stored in the Thing's log and listed newest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measurements_are_stored_and_queried_by_fragment_series_and_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, mut pump) = c8y_device(dir.path(), "pump-1", true, &["s/e"]).await;
    send(
        &pump,
        "s/us",
        "200,c8y_Temperature,T,25.5,C,2026-12-03T10:00:00Z\n\
         201,c8y_Env,2026-12-03T10:01:00Z,c8y_T,T,21,C,c8y_H,H,40,%\n\
         212,87\n\
         200,c8y_Temperature,T,1e999",
    )
    .await;
    let errors = next_on(&mut pump, "s/e").await;
    assert!(errors.starts_with("41,200,"), "not finite: {errors}");
    let page = until(&server, "/api/v1/things/pump-1/measurements", |body| {
        body["items"].as_array().map(Vec::len) == Some(3)
    })
    .await;
    assert_eq!(page["items"][0]["type"], "c8y_Battery", "{page}");
    assert_eq!(page["items"][1]["values"].as_array().map(Vec::len), Some(2));
    assert_eq!(page["items"][2]["time"], 1_796_292_000_000u64, "{page}");
    let humidity = until(
        &server,
        "/api/v1/things/pump-1/measurements?fragment=c8y_H",
        |_| true,
    )
    .await;
    assert_eq!(
        humidity["items"][0]["values"],
        serde_json::json!([{"fragment": "c8y_H", "series": "H", "value": 40.0, "unit": "%"}]),
        "{humidity}"
    );
    let early = until(
        &server,
        "/api/v1/things/pump-1/measurements?until=1796292030000",
        |_| true,
    )
    .await;
    assert_eq!(early["items"].as_array().map(Vec::len), Some(1), "{early}");
}

/// Waits (bounded) until the server has logged a line holding `needle`: it has served the
/// request that logs it. Every line read is kept in `seen`.
async fn until_logged(server: &Server, seen: &mut Vec<String>, needle: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let fresh = server.logs();
        let found = fresh.iter().any(|line| line.contains(needle));
        seen.extend(fresh);
        if found {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server never logged {needle:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `device` asks for `id`'s credentials and the server logs `needle` serving it: nothing
/// comes, nothing is issued.
async fn asks_in_vain(
    server: &Server,
    seen: &mut Vec<String>,
    device: &mut Device,
    id: &str,
    needle: &str,
) {
    send(device, "s/ucr", "").await;
    until_logged(server, seen, needle).await;
    assert_eq!(
        nothing_within(device, Duration::from_millis(100)).await,
        Vec::<String>::new()
    );
    let path = format!("/api/v1/device-registrations/{id}");
    let (_, registration) = call(Method::GET, &server.url(&path), None).await;
    assert_eq!(
        registration["credentialsIssuedAt"],
        Value::Null,
        "{registration}"
    );
}

/// A CONNECT that must be refused.
async fn refused(server: &Server, client_id: &str, (user, password): (&str, &str)) {
    let mut options =
        rumqttc::MqttOptions::new(client_id, server.mqtt.ip().to_string(), server.mqtt.port());
    options.set_credentials(user, password);
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 8);
    let answer = tokio::time::timeout(WAIT, eventloop.poll())
        .await
        .expect("an answer in time");
    assert!(
        matches!(answer, Err(rumqttc::ConnectionError::ConnectionRefused(_))),
        "{client_id} as {user}: {answer:?}"
    );
}

/// Step 0: an operator registers a device id; the device, connected with the bootstrap user,
/// asks on `s/ucr` and gets nothing until the operator accepts; then `70,...` once on its
/// `s/dcr`, and it connects with those credentials as its Thing. The bootstrap user can do
/// nothing else, and never reaches the device's own session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_gets_its_credentials_once_through_the_bootstrap_after_acceptance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        dir.path(),
        &[
            "--cumulocity",
            "--cumulocity-bootstrap-username",
            "devbootstrap",
            "--cumulocity-bootstrap-password",
            "boot-secret",
        ],
    );
    let registrations = server.url("/api/v1/device-registrations");
    let bootstrap = ("thinghub/devbootstrap", "boot-secret");
    // Every server log line read on the way (the password must be in none).
    let mut seen: Vec<String> = Vec::new();

    // Given a registered device id
    let (status, body) = call(
        Method::POST,
        &registrations,
        Some(serde_json::json!({"id": "sn-0001"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "WAITING_FOR_CONNECTION");
    for (bad, expected) in [("sn-0001", 409), ("no/slash", 400), ("", 400)] {
        let (status, body) = call(
            Method::POST,
            &registrations,
            Some(serde_json::json!({"id": bad})),
        )
        .await;
        assert_eq!(status, expected, "{bad:?}: {body}");
    }
    let accept = server.url("/api/v1/device-registrations/sn-0001/accept");
    let (status, body) = call(Method::POST, &accept, None).await;
    assert_eq!(status, 409, "not asked yet: {body}");

    // When the device connects with the bootstrap user and asks
    let (mut boot, _) = Device::connect(&server, "d:sn-0001", bootstrap, true).await;
    assert!(matches!(
        subscribe_ack(&mut boot, "s/dcr").await,
        rumqttc::SubscribeReasonCode::Success(_)
    ));
    // (the bootstrap user can subscribe to nothing else, nor write rows)
    for filter in ["s/ds", "s/e", "#", "$c8y/sn-0001/s/ds", "$c8y/+/s/dcr"] {
        assert_eq!(
            subscribe_ack(&mut boot, filter).await,
            rumqttc::SubscribeReasonCode::Failure,
            "{filter}"
        );
    }
    let denied = || async {
        call(Method::GET, &server.url("/api/v1/metrics"), None)
            .await
            .1["mqtt"]["aclDenied"]
            .as_u64()
            .expect("aclDenied")
    };
    let denied_before = denied().await;
    send(&boot, "s/us", "100,Mine,c8y_Hijack").await;
    send(&boot, "s/ucr", "").await;
    let registration = until(&server, "/api/v1/device-registrations/sn-0001", |r| {
        r["status"] == "PENDING_ACCEPTANCE"
    })
    .await;
    assert!(registration["requestedAt"].is_u64(), "{registration}");
    assert!(
        registration["requestedFrom"]
            .as_str()
            .is_some_and(|from| from.starts_with("127.0.0.1:")),
        "{registration}"
    );
    assert_eq!(
        denied().await,
        denied_before + 1,
        "the bootstrap user's 100 row was refused, not served"
    );
    // Then nothing is sent before an operator accepts
    send(&boot, "s/ucr", "").await;
    assert_eq!(
        nothing_within(&mut boot, Duration::from_millis(300)).await,
        Vec::<String>::new()
    );
    let (status, body) = call(
        Method::GET,
        &format!("{registrations}?status=PENDING_ACCEPTANCE"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["items"][0]["id"], "sn-0001", "{body}");
    let (status, body) = call(Method::POST, &accept, None).await;
    assert_eq!((status, &body["status"]), (200, &Value::from("ACCEPTED")));

    // A request from a connection not subscribed to s/dcr gets nothing issued (Cumulocity's
    // own tenant name for the bootstrap user works too)
    let (mut deaf, _) = Device::connect(
        &server,
        "d:sn-0001",
        ("management/devbootstrap", "boot-secret"),
        true,
    )
    .await;
    asks_in_vain(
        &server,
        &mut seen,
        &mut deaf,
        "sn-0001",
        "not subscribed to s/dcr",
    )
    .await;
    drop(deaf);
    let (mut boot, _) = Device::connect(&server, "d:sn-0001", bootstrap, true).await;
    subscribe_ack(&mut boot, "s/dcr").await;

    // And the next request gets the credentials, once
    send(&boot, "s/ucr", "").await;
    let row = next_on(&mut boot, "s/dcr").await;
    let fields: Vec<&str> = row.split(',').collect();
    assert_eq!(fields.len(), 4, "{row}");
    assert_eq!(fields[..3], ["70", "thinghub", "device_sn-0001"], "{row}");
    let password = fields[3].to_owned();
    assert!(
        password.len() >= 32 && password.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{password}"
    );
    send(&boot, "s/ucr", "").await;
    until_logged(&server, &mut seen, "issued once already").await;
    assert_eq!(
        nothing_within(&mut boot, Duration::from_millis(300)).await,
        Vec::<String>::new(),
        "issued once"
    );
    let registration = until(&server, "/api/v1/device-registrations/sn-0001", |r| {
        r["credentialsIssuedAt"].is_u64()
    })
    .await;
    assert_eq!(registration["username"], "device_sn-0001");
    let (status, user) = call(
        Method::GET,
        &server.url("/api/v1/authentication/users/device_sn-0001"),
        None,
    )
    .await;
    assert_eq!((status, &user["thingName"]), (200, &Value::from("sn-0001")));

    // The device connects with them, as its Thing (registered when they were issued)
    let username = "thinghub/device_sn-0001";
    let (mut device, _) = Device::connect(&server, "d:sn-0001", (username, &password), true).await;
    subscribe_ack(&mut device, "s/e").await;
    send(&device, "s/us", "100,Sensor,c8y_Sensor\n110,SN-1,M1,1.0").await;
    assert_eq!(
        next_on(&mut device, "s/e").await,
        "41,100,Device already existing"
    );
    until(&server, "/api/v1/things/sn-0001/shadow", |s| {
        s["state"]["reported"]["c8y_Hardware"]["serialNumber"] == "SN-1"
    })
    .await;

    // The bootstrap user connecting with the device's client id does not take its session
    let (_boot_again, _) = Device::connect(&server, "sn-0001", bootstrap, true).await;
    send(&device, "s/us", "999").await;
    assert!(next_on(&mut device, "s/e").await.starts_with("40,999,"));
    // Nobody may connect in the bootstrap connections' namespace; the wrong password fails
    refused(&server, "$c8y-bootstrap/sn-0001", (username, &password)).await;
    refused(&server, "$c8y-bootstrap/sn-0001", bootstrap).await;
    refused(&server, "sn-0002", ("devbootstrap", "wrong")).await;
    refused(&server, "not a device id", bootstrap).await;
    refused(&server, "sn-unregistered", bootstrap).await;
    // The bootstrap user is not managed over the users API
    let (status, body) = call(
        Method::PUT,
        &server.url("/api/v1/authentication/users/devbootstrap"),
        Some(serde_json::json!({"superuser": true})),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/authentication/users"),
        Some(serde_json::json!({"username": "devbootstrap", "password": "x"})),
    )
    .await;
    assert_eq!(status, 409);

    // A child device gets no credentials of its own (its gateway speaks for it), and a child
    // cannot have children here
    send(&device, "s/us", "101,c1").await;
    until(&server, "/api/v1/things/sn-0001:c1", |_| true).await;
    send(&device, "s/us/c1", "101,c2").await;
    assert!(next_on(&mut device, "s/e").await.starts_with("43,101,"));
    let (status, _) = call(
        Method::POST,
        &registrations,
        Some(serde_json::json!({"id": "sn-0001:c1"})),
    )
    .await;
    assert_eq!(status, 201);
    let (mut squat, _) = Device::connect(&server, "sn-0001:c1", bootstrap, true).await;
    subscribe_ack(&mut squat, "s/dcr").await;
    send(&squat, "s/ucr", "").await;
    until(&server, "/api/v1/device-registrations/sn-0001:c1", |r| {
        r["status"] == "PENDING_ACCEPTANCE"
    })
    .await;
    let child_accept = server.url("/api/v1/device-registrations/sn-0001:c1/accept");
    assert_eq!(call(Method::POST, &child_accept, None).await.0, 200);
    asks_in_vain(
        &server,
        &mut seen,
        &mut squat,
        "sn-0001:c1",
        "gets no credentials of its own",
    )
    .await;

    // An operator removes the registration: the credentials stay valid
    let one = server.url("/api/v1/device-registrations/sn-0001");
    assert_eq!(call(Method::DELETE, &one, None).await.0, 204);
    assert_eq!(call(Method::GET, &one, None).await.0, 404);
    drop((boot, device, _boot_again, squat));
    let (_again, _) = Device::connect(&server, "sn-0001", (username, &password), true).await;
    let (status, logs) = server.stop();
    assert!(status.success(), "{logs:?}");
    seen.extend(logs);
    assert!(
        !seen.iter().any(|line| line.contains(&password)),
        "the issued password is never logged"
    );
    common::assert_check_finds_no_problem(dir.path());
}

/// A gateway's children: listed (105 and the API), their operations go down on the gateway's
/// own `s/ds` naming the child, and the gateway answers them on `s/us/{child}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_lists_its_children_and_carries_their_operations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, mut gateway) = c8y_device(dir.path(), "gw-1", true, &["s/ds", "s/e"]).await;

    // Given two children (101 again for one changes nothing)
    send(
        &gateway,
        "s/us",
        "101,valve-2,Valve 2\n101,valve-1,Valve 1\n101,valve-2",
    )
    .await;
    until(&server, "/api/v1/things/gw-1:valve-1", |_| true).await;
    until(&server, "/api/v1/things/gw-1:valve-2", |_| true).await;
    // Then 105 lists them on s/ds, and the API too
    send(&gateway, "s/us", "105").await;
    assert_eq!(next_on(&mut gateway, "s/ds").await, "106,valve-1,valve-2");
    let (status, children) = call(
        Method::GET,
        &server.url("/api/v1/things/gw-1/children?limit=1"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{children}");
    assert_eq!(
        children["items"],
        serde_json::json!([{"id": "valve-1", "thingName": "gw-1:valve-1"}])
    );
    let cursor = children["nextCursor"].as_str().expect("more").to_owned();
    let (_, rest) = call(
        Method::GET,
        &server.url(&format!("/api/v1/things/gw-1/children?cursor={cursor}")),
        None,
    )
    .await;
    assert_eq!(rest["items"][0]["id"], "valve-2", "{rest}");
    assert_eq!(rest["nextCursor"], Value::Null);
    let (status, _) = call(
        Method::GET,
        &server.url("/api/v1/things/nobody/children"),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // When an operator restarts a child, the gateway gets it on its s/ds, naming the child
    let sent = common::create(
        &server,
        "/api/v1/things/gw-1:valve-1/commands",
        serde_json::json!({"action": "c8y_Restart", "ttl": 120}),
    )
    .await;
    let id = sent["executionId"].as_str().expect("id").to_owned();
    assert_eq!(next_on(&mut gateway, "s/ds").await, "510,valve-1");
    send(&gateway, "s/us/valve-1", "500").await;
    assert_eq!(
        next_on(&mut gateway, "s/ds").await,
        "510,valve-1",
        "pending again"
    );
    // And answers it for the child
    send(&gateway, "s/us/valve-1", "501,c8y_Restart\n503,c8y_Restart").await;
    let path = format!("/api/v1/things/gw-1:valve-1/commands/{id}");
    until(&server, &path, |e| e["status"] == "SUCCEEDED").await;

    // A deleted child is no longer listed
    let (status, _) = call(
        Method::DELETE,
        &server.url("/api/v1/things/gw-1:valve-2"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    send(&gateway, "s/us", "105").await;
    assert_eq!(next_on(&mut gateway, "s/ds").await, "106,valve-1");

    // 307 on an open alarm is served (alarms carry no custom fragments); on none, 45
    send(&gateway, "s/us", "301,c8y_Fire,Hot\n307,c8y_Fire,c8y_Extra").await;
    until(&server, "/api/v1/things/gw-1/alarms", |a| {
        a["items"][0]["type"] == "c8y_Fire"
    })
    .await;
    send(&gateway, "s/us", "307,c8y_Flood,c8y_Extra").await;
    let none = next_on(&mut gateway, "s/e").await;
    assert!(
        none.starts_with("45,307,"),
        "only the unknown alarm is refused: {none}"
    );
}
