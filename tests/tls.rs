//! TLS, WebSocket and X.509 device identity end to end: the real binary with certificates from
//! its own `thinghub certs init`, real clients (rumqttc over TLS, WebSocket and secure
//! WebSocket; reqwest over HTTPS with rustls; mosquitto_pub over TLS in `mqtt_interop.rs`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::mqtt::{Client, WAIT};
use common::{Server, ADMIN_KEY, ADMIN_SECRET};
use rumqttc::{ConnectReturnCode, ConnectionError, QoS, TlsConfiguration, Transport};
use serde_json::{json, Value};

/// rustls's process-wide provider for the clients (two are built into the test binary, so
/// none is chosen by itself).
fn crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A certificate set written by `thinghub certs init`.
struct Certs {
    dir: PathBuf,
    /// The device certificate's fingerprint, as the command printed it.
    device_fingerprint: String,
}

impl Certs {
    fn init(dir: &Path, device: &str) -> Certs {
        crypto();
        let output = Command::new(env!("CARGO_BIN_EXE_thinghub"))
            .args([
                "certs",
                "init",
                "--hosts",
                "localhost,127.0.0.1",
                "--device",
                device,
            ])
            .arg("--dir")
            .arg(dir)
            .output()
            .expect("run thinghub certs init");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "certs init: {stdout}");
        let marker = "\"fingerprint\": \"";
        let at = stdout.find(marker).expect("the fingerprint is printed") + marker.len();
        Certs {
            dir: dir.to_owned(),
            device_fingerprint: stdout[at..at + 64].to_owned(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().expect("UTF-8 path").to_owned()
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(name)).expect("read a certificate file")
    }

    /// rumqttc TLS trusting this set's CA, with its device certificate or none.
    fn client_tls(&self, with_device_certificate: bool) -> TlsConfiguration {
        TlsConfiguration::Simple {
            ca: self.read("ca.pem"),
            alpn: None,
            client_auth: with_device_certificate
                .then(|| (self.read("device.pem"), self.read("device.key"))),
        }
    }

    /// A reqwest client trusting only this set's CA.
    fn https(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(&self.read("ca.pem")).expect("CA");
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("HTTPS client")
    }
}

/// Starts a server with the TLS files of `certs` and the given listeners (`127.0.0.1:0`).
fn start(dir: &Path, certs: &Certs, listeners: &[&str], client_auth: &str) -> Server {
    let mut args = vec![
        "--tls-cert-file".to_owned(),
        certs.path("server.pem"),
        "--tls-key-file".to_owned(),
        certs.path("server.key"),
        "--tls-client-ca-file".to_owned(),
        certs.path("ca.pem"),
        "--tls-client-auth".to_owned(),
        client_auth.to_owned(),
    ];
    for listener in listeners {
        args.push(format!("--{listener}"));
        args.push("127.0.0.1:0".to_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&dir.join("data"), &args)
}

/// An admin request over HTTPS; returns (status, JSON or Null).
async fn https_call(
    http: &reqwest::Client,
    server: &Server,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!(
        "https://127.0.0.1:{}{path}",
        server.listener("https").port()
    );
    let mut request = http
        .request(method, url)
        .basic_auth(ADMIN_KEY, Some(ADMIN_SECRET));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("HTTPS request");
    let status = response.status().as_u16();
    let json = response.json().await.unwrap_or(Value::Null);
    (status, json)
}

/// An MQTT client over TLS to `listener`.
async fn tls_client(
    server: &Server,
    id: &str,
    credentials: Option<(&str, &str)>,
    tls: TlsConfiguration,
) -> Result<Client, ConnectionError> {
    let addr = server.listener("mqtt_tls");
    Client::connect_to("127.0.0.1", addr.port(), id, credentials, |options| {
        options.set_transport(Transport::tls_with_config(tls));
    })
    .await
    .map(|(client, _)| client)
}

/// dev-1 over TLS with its password (user `dev-1`, `dev-pw`) and no client certificate.
async fn password_device(server: &Server, certs: &Certs) -> Client {
    tls_client(
        server,
        "dev-1",
        Some(("dev-1", "dev-pw")),
        certs.client_tls(false),
    )
    .await
    .expect("TLS connect with a password")
}

fn refused_with(result: Result<Client, ConnectionError>, code: ConnectReturnCode) {
    match result {
        Err(ConnectionError::ConnectionRefused(got)) => assert_eq!(got, code),
        Err(other) => panic!("expected CONNACK {code:?}, got {other}"),
        Ok(_) => panic!("expected CONNACK {code:?}, got connected"),
    }
}

/// Every metric now.
async fn metrics(server: &Server) -> Value {
    let (status, body) =
        common::call(reqwest::Method::GET, &server.url("/api/v1/metrics"), None).await;
    assert_eq!(status, 200);
    body
}

/// Polls the metrics (bounded) until `ready` holds; returns them.
async fn metrics_until(server: &Server, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = metrics(server).await;
        if ready(&now) {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never showed {what}: {now}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes a reported update for `thing` and waits for its `update/accepted`.
async fn shadow_round_trip(client: &mut Client, thing: &str, value: u64) {
    let accepted = format!("$emqx/things/{thing}/shadow/update/accepted");
    client.subscribe(&accepted, QoS::AtLeastOnce).await;
    client
        .client
        .publish(
            format!("$emqx/things/{thing}/shadow/update"),
            QoS::AtLeastOnce,
            false,
            json!({"state": {"reported": {"level": value}}}).to_string(),
        )
        .await
        .expect("publish");
    let answer = client.publish_on(&accepted).await;
    let body: Value = serde_json::from_slice(&answer.payload).expect("JSON");
    assert_eq!(body["state"]["reported"]["level"], value, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_https_and_websocket_listeners_serve_one_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Certs::init(&dir.path().join("certs"), "dev-1");
    let server = start(
        dir.path(),
        &certs,
        &[
            "mqtt-tls-listen",
            "http-tls-listen",
            "mqtt-ws-listen",
            "mqtt-wss-listen",
        ],
        "optional",
    );
    // HTTPS, verified against the CA: the management API as over plain HTTP.
    let https = certs.https();
    for (path, body) in [
        ("/api/v1/things", json!({"thingName": "dev-1"})),
        (
            "/api/v1/authentication/users",
            json!({"username": "dev-1", "password": "dev-pw"}),
        ),
        (
            "/api/v1/authentication/users",
            json!({"username": "app", "password": "app-pw", "superuser": true}),
        ),
    ] {
        let (status, answer) =
            https_call(&https, &server, reqwest::Method::POST, path, Some(body)).await;
        assert_eq!(status, 201, "{path}: {answer}");
    }

    // A device over TLS with a password (no client certificate: optional).
    let mut device = password_device(&server, &certs).await;
    // The backend over WebSocket sees what the TLS device does (one broker).
    let ws = server.listener("mqtt_ws");
    let (mut app, _) = Client::connect_to(
        &format!("ws://127.0.0.1:{}/mqtt", ws.port()),
        ws.port(),
        "app-ws",
        Some(("app", "app-pw")),
        |options| {
            options.set_transport(Transport::Ws);
        },
    )
    .await
    .expect("WebSocket connect");
    app.subscribe(
        "$emqx/things/dev-1/shadow/update/accepted",
        QoS::AtLeastOnce,
    )
    .await;
    shadow_round_trip(&mut device, "dev-1", 7).await;
    let seen = app
        .publish_on("$emqx/things/dev-1/shadow/update/accepted")
        .await;
    assert!(String::from_utf8_lossy(&seen.payload).contains("\"level\":7"));

    // Secure WebSocket, verified against the CA.
    let wss = server.listener("mqtt_wss");
    let (mut app_wss, _) = Client::connect_to(
        &format!("wss://127.0.0.1:{}/mqtt", wss.port()),
        wss.port(),
        "app-wss",
        Some(("app", "app-pw")),
        |options| {
            options.set_transport(Transport::Wss(certs.client_tls(false)));
        },
    )
    .await
    .expect("secure WebSocket connect");
    app_wss
        .subscribe(
            "$emqx/things/dev-1/shadow/update/accepted",
            QoS::AtLeastOnce,
        )
        .await;
    shadow_round_trip(&mut device, "dev-1", 8).await;
    app_wss
        .publish_on("$emqx/things/dev-1/shadow/update/accepted")
        .await;

    // The client list names each connection's listener.
    for (client_id, listener) in [("dev-1", "tls"), ("app-ws", "ws"), ("app-wss", "wss")] {
        let (status, view) = https_call(
            &https,
            &server,
            reqwest::Method::GET,
            &format!("/api/v1/clients/{client_id}"),
            None,
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(view["listener"], listener, "{view}");
    }

    // A client that does not trust the server's CA refuses it (an alert to the server).
    let other = Certs::init(&dir.path().join("other"), "dev-1");
    let refused = tls_client(
        &server,
        "dev-x",
        Some(("dev-1", "dev-pw")),
        other.client_tls(false),
    )
    .await;
    assert!(
        matches!(refused, Err(ConnectionError::Tls(_))),
        "a wrong CA must fail the handshake: {:?}",
        refused.err()
    );
    // A WebSocket request for another path, or without the mqtt subprotocol, is refused.
    let wrong_path = Client::connect_to(
        &format!("ws://127.0.0.1:{}/elsewhere", ws.port()),
        ws.port(),
        "app-ws2",
        Some(("app", "app-pw")),
        |options| {
            options.set_transport(Transport::Ws);
        },
    )
    .await;
    assert!(wrong_path.is_err(), "a WebSocket on another path must fail");
    let raw = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/mqtt", ws.port()))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("upgrade request");
    assert_eq!(raw.status(), 400, "no subprotocol");
    assert!(raw.text().await.expect("body").contains("subprotocol"));

    let now = metrics_until(&server, "the refusals", |m| {
        m["tlsHandshakeFailures"]["alert"].as_u64() >= Some(1)
            && m["mqtt"]["wsUpgradesRefused"].as_u64() >= Some(2)
    })
    .await;
    assert!(now["tls"]["handshakes"].as_u64() >= Some(3), "{now}");
    assert!(
        now["mqttListenerConnections"]["tls"].as_u64() >= Some(1),
        "{now}"
    );
    assert!(
        now["mqttListenerConnections"]["ws"].as_u64() >= Some(1),
        "{now}"
    );
    assert!(
        now["mqttListenerConnections"]["wss"].as_u64() >= Some(1),
        "{now}"
    );
    assert!(
        now["httpListenerConnections"]["https"].as_u64() >= Some(1),
        "{now}"
    );
    // The plain listeners still serve.
    let (status, _) = common::call(
        reqwest::Method::GET,
        &server.url("/api/v1/things/dev-1"),
        None,
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_certificate_is_its_things_identity_until_revoked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Certs::init(&dir.path().join("certs"), "dev-1");
    let server = start(
        dir.path(),
        &certs,
        &["mqtt-tls-listen", "http-tls-listen", "mqtt-wss-listen"],
        "optional",
    );
    let https = certs.https();
    for thing in ["dev-1", "dev-2"] {
        let (status, _) = https_call(
            &https,
            &server,
            reqwest::Method::POST,
            "/api/v1/things",
            Some(json!({"thingName": thing})),
        )
        .await;
        assert_eq!(status, 201);
    }
    let certificates = "/api/v1/things/dev-1/certificates";

    // Verified by the CA but not registered: refused, not authorized.
    refused_with(
        tls_client(&server, "dev-1", None, certs.client_tls(true)).await,
        ConnectReturnCode::NotAuthorized,
    );

    // Registration checks what the certificate names.
    let pem = String::from_utf8(certs.read("device.pem")).expect("PEM");
    let (status, answer) = https_call(
        &https,
        &server,
        reqwest::Method::POST,
        "/api/v1/things/dev-2/certificates",
        Some(json!({"certificatePem": pem})),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .expect("message")
            .contains("'dev-1'"),
        "{answer}"
    );
    for bad in [
        json!({}),
        json!({"fingerprint": "abc"}),
        json!({"certificatePem": "nope"}),
    ] {
        let (status, _) = https_call(
            &https,
            &server,
            reqwest::Method::POST,
            certificates,
            Some(bad),
        )
        .await;
        assert_eq!(status, 400);
    }
    let (status, registered) = https_call(
        &https,
        &server,
        reqwest::Method::POST,
        certificates,
        Some(json!({"certificatePem": pem})),
    )
    .await;
    assert_eq!(status, 201, "{registered}");
    assert_eq!(registered["fingerprint"], certs.device_fingerprint.as_str());
    assert_eq!(registered["status"], "ACTIVE");
    assert_eq!(registered["subjectName"], "dev-1");

    // Over secure WebSocket too, but not from a browser page of an origin not allowed: a
    // browser shows its certificate to any page.
    let wss = server.listener("mqtt_wss");
    let over_wss = |origin: Option<&'static str>| {
        let tls = certs.client_tls(true);
        async move {
            Client::connect_to(
                &format!("wss://127.0.0.1:{}/mqtt", wss.port()),
                wss.port(),
                "dev-1",
                None,
                move |options| {
                    options.set_transport(Transport::Wss(tls));
                    if let Some(origin) = origin {
                        options.set_request_modifier(move |mut request| async move {
                            request.headers_mut().insert(
                                "origin",
                                tokio_tungstenite::tungstenite::http::HeaderValue::from_static(
                                    origin,
                                ),
                            );
                            request
                        });
                    }
                },
            )
            .await
            .map(|(client, _)| client)
        }
    };
    refused_with(
        over_wss(Some("https://elsewhere.example")).await,
        ConnectReturnCode::NotAuthorized,
    );
    over_wss(None)
        .await
        .expect("the certificate over secure WebSocket")
        .kill();

    // Now the certificate is the device: no password, its Thing's topics only.
    let mut device = tls_client(&server, "dev-1", None, certs.client_tls(true))
        .await
        .expect("connect with the device certificate");
    shadow_round_trip(&mut device, "dev-1", 1).await;
    let codes = device
        .subscribe(
            "$emqx/things/dev-2/shadow/update/accepted",
            QoS::AtLeastOnce,
        )
        .await;
    assert_eq!(
        codes,
        vec![rumqttc::SubscribeReasonCode::Failure],
        "another Thing's topic"
    );
    // Another Thing's client id, or a username naming someone else: refused.
    refused_with(
        tls_client(&server, "dev-2", None, certs.client_tls(true)).await,
        ConnectReturnCode::BadClientId,
    );
    refused_with(
        tls_client(
            &server,
            "dev-1b",
            Some(("dev-2", "x")),
            certs.client_tls(true),
        )
        .await,
        ConnectReturnCode::NotAuthorized,
    );
    let (status, view) = common::call(
        reqwest::Method::GET,
        &server.url("/api/v1/clients/dev-1"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        view["certificateFingerprint"],
        certs.device_fingerprint.as_str()
    );
    assert_eq!(view["username"], "x509/dev-1");

    // A certificate from a CA the server does not trust fails the handshake.
    let foreign = Certs::init(&dir.path().join("foreign"), "dev-1");
    let refused = tls_client(
        &server,
        "dev-1",
        None,
        TlsConfiguration::Simple {
            ca: certs.read("ca.pem"),
            alpn: None,
            client_auth: Some((foreign.read("device.pem"), foreign.read("device.key"))),
        },
    )
    .await;
    assert!(
        refused.is_err(),
        "a foreign device certificate must be refused"
    );
    metrics_until(&server, "a bad certificate", |m| {
        m["tlsHandshakeFailures"]["bad_certificate"].as_u64() >= Some(1)
    })
    .await;

    // Only admin keys manage certificates.
    let (status, key) = https_call(
        &https,
        &server,
        reqwest::Method::POST,
        "/api/v1/api-keys",
        Some(json!({"name": "ops team", "role": "operator"})),
    )
    .await;
    assert_eq!(status, 201, "{key}");
    let (status, _) = common::call_as(
        (
            key["key"].as_str().expect("key"),
            key["secret"].as_str().expect("secret"),
        ),
        reqwest::Method::GET,
        &server.url(certificates),
        None,
    )
    .await;
    assert_eq!(status, 403);

    // Revoking another of the Thing's certificates leaves this connection alone.
    let other = "ab".repeat(32);
    let (status, _) = https_call(
        &https,
        &server,
        reqwest::Method::POST,
        certificates,
        Some(json!({"fingerprint": other})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, _) = https_call(
        &https,
        &server,
        reqwest::Method::POST,
        &format!("{certificates}/{other}/revoke"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    shadow_round_trip(&mut device, "dev-1", 2).await;

    // Revocation: the live connection closes, and the certificate is refused from then on.
    let fingerprint = certs.device_fingerprint.clone();
    let (status, revoked) = https_call(
        &https,
        &server,
        reqwest::Method::POST,
        &format!("{certificates}/{fingerprint}/revoke"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["status"], "REVOKED");
    assert!(
        device.closed_by_server().await,
        "revocation closes the connection"
    );
    refused_with(
        tls_client(&server, "dev-1", None, certs.client_tls(true)).await,
        ConnectReturnCode::NotAuthorized,
    );
    let (status, _) = https_call(
        &https,
        &server,
        reqwest::Method::POST,
        certificates,
        Some(json!({"fingerprint": fingerprint})),
    )
    .await;
    assert_eq!(status, 409, "a revoked certificate stays revoked");
    let (status, list) =
        https_call(&https, &server, reqwest::Method::GET, certificates, None).await;
    assert_eq!(status, 200);
    let statuses: Vec<&Value> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|c| &c["status"])
        .collect();
    assert_eq!(statuses, vec!["REVOKED", "REVOKED"], "{list}");

    // Deleting the Thing removes its certificates: a new Thing of that name has none.
    let (status, _) = https_call(
        &https,
        &server,
        reqwest::Method::DELETE,
        "/api/v1/things/dev-1",
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = https_call(
        &https,
        &server,
        reqwest::Method::POST,
        "/api/v1/things",
        Some(json!({"thingName": "dev-1"})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, list) =
        https_call(&https, &server, reqwest::Method::GET, certificates, None).await;
    assert_eq!(
        (status, list["items"].as_array().map(Vec::len)),
        (200, Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_and_a_reload_that_keeps_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Certs::init(&dir.path().join("first"), "dev-1");
    // The server reads its files from `served`, which the test later overwrites.
    let served = dir.path().join("served");
    std::fs::create_dir(&served).expect("mkdir");
    for name in ["server.pem", "server.key", "ca.pem"] {
        std::fs::copy(first.dir.join(name), served.join(name)).expect("copy");
    }
    let served_certs = Certs {
        dir: served.clone(),
        device_fingerprint: first.device_fingerprint.clone(),
    };
    let server = start(
        dir.path(),
        &served_certs,
        &["mqtt-tls-listen", "http-tls-listen"],
        "required",
    );
    common::register_device(&server, "dev-1", "dev-pw").await;
    // HTTPS never asks for a client certificate: an operator's API key is enough.
    let (status, _) = https_call(
        &first.https(),
        &server,
        reqwest::Method::GET,
        "/api/v1/things/dev-1",
        None,
    )
    .await;
    assert_eq!(status, 200, "HTTPS without a client certificate");

    // Required: a client without a certificate fails the handshake, whatever its password.
    let refused = tls_client(
        &server,
        "dev-1",
        Some(("dev-1", "dev-pw")),
        first.client_tls(false),
    )
    .await;
    assert!(refused.is_err(), "no client certificate");
    metrics_until(&server, "a missing certificate", |m| {
        m["tlsHandshakeFailures"]["no_certificate"].as_u64() >= Some(1)
    })
    .await;
    let (status, _) = common::call(
        reqwest::Method::POST,
        &server.url("/api/v1/things/dev-1/certificates"),
        Some(json!({"fingerprint": first.device_fingerprint})),
    )
    .await;
    assert_eq!(status, 201);
    let mut before = tls_client(&server, "dev-1", None, first.client_tls(true))
        .await
        .expect("connect with the first set");

    // New files, then SIGHUP: new handshakes use them; the open connection keeps working.
    let second = Certs::init(&dir.path().join("second"), "dev-1");
    for name in ["server.pem", "server.key", "ca.pem"] {
        std::fs::copy(second.dir.join(name), served.join(name)).expect("copy");
    }
    server.hangup();
    metrics_until(&server, "a reload", |m| {
        m["tls"]["reloads"].as_u64() >= Some(1)
    })
    .await;
    // The second set's device certificate passes the handshake now (and, unregistered, is
    // refused by MQTT); the first set's CA no longer verifies the server.
    refused_with(
        tls_client(&server, "dev-1", None, second.client_tls(true)).await,
        ConnectReturnCode::NotAuthorized,
    );
    assert!(
        matches!(
            tls_client(&server, "dev-1", None, first.client_tls(true)).await,
            Err(ConnectionError::Tls(_))
        ),
        "the old CA no longer verifies the new server certificate"
    );
    shadow_round_trip(&mut before, "dev-1", 3).await;
}

#[test]
fn a_bad_tls_file_fails_start_up_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Certs::init(&dir.path().join("certs"), "dev-1");
    let missing = dir.path().join("missing.key");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").expect("write");
    for (cert, key, named) in [
        (
            certs.path("server.pem"),
            missing.to_str().expect("path").to_owned(),
            missing.clone(),
        ),
        (
            garbage.to_str().expect("path").to_owned(),
            certs.path("server.key"),
            garbage.clone(),
        ),
        // A key that is not the certificate's.
        (
            certs.path("server.pem"),
            certs.path("device.key"),
            certs.dir.join("server.pem"),
        ),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_thinghub"))
            .args([
                "serve",
                "--http-listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
            ])
            .args(["--mqtt-tls-listen", "127.0.0.1:0"])
            .args(["--tls-cert-file", &cert, "--tls-key-file", &key])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("THINGHUB_ADMIN_KEY", format!("{ADMIN_KEY}:{ADMIN_SECRET}"))
            .env_remove("THINGHUB_CONFIG")
            .output()
            .expect("run thinghub");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "start-up must fail: {stderr}");
        assert!(
            stderr.contains(named.to_str().expect("path")),
            "the message names {}: {stderr}",
            named.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_is_bounded_and_established_connections_keep_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Certs::init(&dir.path().join("certs"), "dev-1");
    let server = Server::start_configured(
        dir.path(),
        &format!(
            "http_listen = \"127.0.0.1:0\"\nmqtt_listen = \"127.0.0.1:0\"\n\
             mqtt_tls_listen = \"127.0.0.1:0\"\nhttp_tls_listen = \"127.0.0.1:0\"\n\
             tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n\
             tls_handshakes_max = 4\ntls_handshake_timeout_ms = 5000\n",
            certs.path("server.pem"),
            certs.path("server.key"),
        ),
    );
    common::register_device(&server, "dev-1", "dev-pw").await;
    let mut device = password_device(&server, &certs).await;
    // Sockets that open and never say hello: four hold every device handshake slot (for 5 s),
    // the rest are closed at once, and the four are dropped at the handshake timeout.
    let tls = server.listener("mqtt_tls");
    let mut silent = Vec::new();
    for _ in 0..12 {
        silent.push(tokio::net::TcpStream::connect(tls).await.expect("connect"));
    }
    metrics_until(&server, "the busy refusals", |m| {
        m["tlsHandshakeFailures"]["busy"].as_u64() >= Some(8)
    })
    .await;
    // The established connection is served meanwhile, and HTTPS has handshakes of its own.
    shadow_round_trip(&mut device, "dev-1", 5).await;
    let (status, _) = https_call(
        &certs.https(),
        &server,
        reqwest::Method::GET,
        "/api/v1/things/dev-1",
        None,
    )
    .await;
    assert_eq!(status, 200, "HTTPS during a device handshake flood");
    metrics_until(&server, "the handshake timeouts", |m| {
        m["tlsHandshakeFailures"]["timeout"].as_u64() >= Some(4)
    })
    .await;
    // With the slots free again, a new client gets through (refused by MQTT, as its user is
    // bound to dev-1: the handshake passed).
    refused_with(
        tls_client(
            &server,
            "dev-2",
            Some(("dev-1", "dev-pw")),
            certs.client_tls(false),
        )
        .await,
        ConnectReturnCode::BadClientId,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hangup_without_tls_is_logged_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    server.hangup();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !server
        .logs()
        .iter()
        .any(|line| line.contains("nothing to reload"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no log of the SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = common::call(reqwest::Method::GET, &server.url("/healthz"), None).await;
    assert_eq!(status, 200);
}

/// An MQTT 3.1.1 packet: fixed header byte, remaining length (< 128 here), body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut out = vec![first, body.len() as u8];
    out.extend_from_slice(body);
    out
}

/// A length-prefixed MQTT string.
fn mqtt_str(text: &str) -> Vec<u8> {
    let mut out = (text.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_framing_packets_across_and_within_messages() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["--mqtt-ws-listen", "127.0.0.1:0"]);
    common::create(
        &server,
        "/api/v1/authentication/users",
        json!({"username": "app", "password": "app-pw", "superuser": true}),
    )
    .await;
    let ws = server.listener("mqtt_ws");
    let connect_ws = || async {
        let mut request = format!("ws://127.0.0.1:{}/mqtt", ws.port())
            .into_client_request()
            .expect("request");
        request.headers_mut().insert(
            "sec-websocket-protocol",
            tokio_tungstenite::tungstenite::http::HeaderValue::from_static("mqtt"),
        );
        let stream = tokio::net::TcpStream::connect(ws).await.expect("connect");
        let (socket, response) = tokio_tungstenite::client_async(request, stream)
            .await
            .expect("upgrade");
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            "mqtt",
            "the subprotocol is echoed"
        );
        socket
    };
    let mut socket = connect_ws().await;
    // CONNECT (3.1.1, clean, username + password) split over two binary messages.
    let mut body = mqtt_str("MQTT");
    body.extend_from_slice(&[4, 0b1100_0010, 0, 30]);
    body.extend(mqtt_str("raw-ws"));
    body.extend(mqtt_str("app"));
    body.extend(mqtt_str("app-pw"));
    let connect = packet(0x10, &body);
    let (first, second) = connect.split_at(7);
    for part in [first, second] {
        socket
            .send(Message::Binary(part.to_vec().into()))
            .await
            .expect("send");
    }
    // Then SUBSCRIBE and PINGREQ in one message.
    let mut subscribe = vec![0, 1];
    subscribe.extend(mqtt_str("raw/ws"));
    subscribe.push(1);
    let mut both = packet(0x82, &subscribe);
    both.extend(packet(0xC0, &[]));
    socket
        .send(Message::Binary(both.into()))
        .await
        .expect("send");
    // CONNACK, SUBACK and PINGRESP arrive, however the server frames them.
    let mut received = Vec::new();
    let want = [0x20, 2, 0, 0, 0x90, 3, 0, 1, 1, 0xD0, 0];
    while received.len() < want.len() {
        match tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Binary(bytes))) => received.extend_from_slice(&bytes),
            Some(Ok(_)) => {}
            other => panic!("connection ended: {other:?}"),
        }
    }
    assert_eq!(received, want);
    // A text message is not MQTT: the server closes the connection.
    socket
        .send(Message::Text("hello".into()))
        .await
        .expect("send");
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a text message closes the connection");
}
