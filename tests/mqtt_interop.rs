//! Interoperability with an independent MQTT implementation: the mosquitto command-line clients
//! (libmosquitto), at MQTT 3.1.1 and 5.0.
//!
//! `.ci/run` installs `mosquitto-clients` and sets `THINGHUB_REQUIRE_INTEROP=1`, so CI always
//! runs these. On a machine without the clients the test says so and does not run them.

mod common;

use std::process::Command;

use common::{call, Server};
use reqwest::Method;
use serde_json::json;

fn clients_available() -> bool {
    let found = Command::new("mosquitto_pub").arg("--help").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("THINGHUB_REQUIRE_INTEROP").is_none(),
            "THINGHUB_REQUIRE_INTEROP is set but mosquitto_pub is not installed (apt-get install mosquitto-clients)"
        );
        eprintln!("mosquitto-clients not installed: interop test NOT run (CI installs them)");
    }
    found
}

fn mosquitto(tool: &str, server: &Server, version: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool)
        .args([
            "-h",
            &server.mqtt.ip().to_string(),
            "-p",
            &server.mqtt.port().to_string(),
        ])
        .args(["-V", version])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_publish_subscribe_and_are_refused_with_bad_credentials() {
    if !clients_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/authentication/users"),
        Some(json!({"username":"app","password":"app-pw","superuser":true})),
    )
    .await;
    assert_eq!(status, 201);
    let auth = ["-u", "app", "-P", "app-pw"];

    for (version, qos) in [("mqttv311", "1"), ("mqttv5", "2")] {
        let topic = format!("interop/{version}");
        let published = mosquitto(
            "mosquitto_pub",
            &server,
            version,
            &[&auth[..], &["-t", &topic, "-m", "hello", "-q", qos, "-r"]].concat(),
        );
        assert!(
            published.status.success(),
            "{version} publish: {}",
            String::from_utf8_lossy(&published.stderr)
        );
        // The retained message is delivered at once to a new subscriber (-C 1: exit after one).
        let received = mosquitto(
            "mosquitto_sub",
            &server,
            version,
            &[
                &auth[..],
                &["-t", &topic, "-q", qos, "-C", "1", "-W", "10", "-v"],
            ]
            .concat(),
        );
        assert!(
            received.status.success(),
            "{version} subscribe: {}",
            String::from_utf8_lossy(&received.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&received.stdout).trim(),
            format!("{topic} hello")
        );

        let refused = mosquitto(
            "mosquitto_pub",
            &server,
            version,
            &["-u", "app", "-P", "wrong", "-t", &topic, "-m", "x"],
        );
        assert!(
            !refused.status.success(),
            "{version}: wrong password must be refused"
        );
        let stderr = String::from_utf8_lossy(&refused.stderr).to_lowercase();
        assert!(
            stderr.contains("bad user name or password"),
            "{version}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_over_tls_with_a_password_and_with_a_device_certificate() {
    if !clients_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let init = Command::new(env!("CARGO_BIN_EXE_thinghub"))
        .args(["certs", "init", "--device", "dev-1", "--dir"])
        .arg(&certs)
        .output()
        .expect("certs init");
    assert!(init.status.success());
    let file = |name: &str| certs.join(name).to_str().expect("path").to_owned();
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--mqtt-tls-listen",
            "127.0.0.1:0",
            "--tls-cert-file",
            &file("server.pem"),
            "--tls-key-file",
            &file("server.key"),
            "--tls-client-ca-file",
            &file("ca.pem"),
            "--tls-client-auth",
            "optional",
        ],
    );
    for (path, body) in [
        ("/api/v1/things", json!({"thingName": "dev-1"})),
        (
            "/api/v1/authentication/users",
            json!({"username": "app", "password": "app-pw", "superuser": true}),
        ),
        (
            "/api/v1/things/dev-1/certificates",
            json!({"certificatePem": std::fs::read_to_string(file("device.pem")).expect("PEM")}),
        ),
    ] {
        let (status, answer) = call(Method::POST, &server.url(path), Some(body)).await;
        assert_eq!(status, 201, "{path}: {answer}");
    }
    let tls = server.listener("mqtt_tls");
    let over_tls = |tool: &str, args: &[&str]| {
        Command::new(tool)
            .args(["-h", "localhost", "-p", &tls.port().to_string()])
            .args(["--cafile", &file("ca.pem")])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"))
    };
    // The backend subscribes over TLS with a password...
    let accepted = "$emqx/things/dev-1/shadow/update/accepted";
    let subscriber = over_tls(
        "mosquitto_sub",
        &[
            "-u", "app", "-P", "app-pw", "-t", accepted, "-q", "1", "-C", "1", "-W", "10",
        ],
    );
    // ...once its subscription is in place (bounded polling of the client list).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, clients) = call(Method::GET, &server.url("/api/v1/clients"), None).await;
        let subscribed = clients["items"].as_array().is_some_and(|items| {
            items
                .iter()
                .any(|c| c["subscriptions"].as_array().is_some_and(|s| !s.is_empty()))
        });
        if subscribed {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no subscription: {clients}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // ...and the device publishes with its certificate alone (no username or password).
    let published = over_tls(
        "mosquitto_pub",
        &[
            "--cert",
            &file("device.pem"),
            "--key",
            &file("device.key"),
            "-i",
            "dev-1",
            "-t",
            "$emqx/things/dev-1/shadow/update",
            "-q",
            "1",
            "-m",
            r#"{"state":{"reported":{"on":true}}}"#,
        ],
    )
    .wait_with_output()
    .expect("mosquitto_pub");
    assert!(
        published.status.success(),
        "device publish over TLS: {}",
        String::from_utf8_lossy(&published.stderr)
    );
    let received = subscriber.wait_with_output().expect("mosquitto_sub");
    assert!(
        received.status.success(),
        "subscribe over TLS: {}",
        String::from_utf8_lossy(&received.stderr)
    );
    let answer: serde_json::Value =
        serde_json::from_slice(&received.stdout).expect("the accepted document");
    assert_eq!(answer["state"]["reported"]["on"], true, "{answer}");
    // Without the device certificate or a password: not authorized.
    let anonymous = over_tls("mosquitto_pub", &["-i", "dev-1", "-t", "x", "-m", "x"])
        .wait_with_output()
        .expect("mosquitto_pub");
    assert!(!anonymous.status.success());
}
