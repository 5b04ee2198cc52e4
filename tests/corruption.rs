//! Damaged data, as an operator meets it: a Thing whose log cannot be read answers 503 on
//! every route, `thinghub check` names what is wrong per Thing, and a damaged sled file stops
//! the server with the file's name and what to do.

mod common;

use std::path::Path;
use std::process::Command;

use common::{call, create, Server};
use reqwest::Method;
use serde_json::json;
use thinghub_storage::{Store, StoreConfig};

/// Runs `thinghub check` on `data_dir`; returns (exit code, stdout, stderr).
fn check(data_dir: &Path) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_thinghub"))
        .args(["check", "--data-dir"])
        .arg(data_dir)
        .env_remove("THINGHUB_CONFIG")
        .output()
        .expect("run thinghub check");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `thinghub serve` on `data_dir`, which must refuse to start; returns its stderr.
fn serve_refused(data_dir: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_thinghub"))
        .args(["serve", "--data-dir"])
        .arg(data_dir)
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ])
        .env("THINGHUB_ADMIN_KEY", "ops:secret")
        .env_remove("THINGHUB_CONFIG")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "it started: {stderr}");
    stderr
}

async fn fill(server: &Server) {
    for name in ["bad", "aged", "good"] {
        create(server, "/api/v1/things", json!({"thingName": name})).await;
        for speed in 0..3 {
            let (status, _) = call(
                Method::POST,
                &server.url(&format!("/api/v1/things/{name}/shadow")),
                Some(json!({"state":{"desired":{"speed": speed}}})),
            )
            .await;
            assert_eq!(status, 200);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thing_whose_log_cannot_be_read_answers_503_everywhere_and_check_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    fill(&server).await;
    let (code, _, stderr) = check(dir.path());
    assert_eq!(code, 2, "refused while the server runs: {stderr}");
    assert!(stderr.contains("locked"), "{stderr}");
    let (status, _) = server.stop();
    assert!(status.success());

    let (code, stdout, _) = check(dir.path());
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("checked 3 things (12 events, 3 snapshots)")
            && stdout.contains("no problems"),
        "{stdout}"
    );

    // seq 2 of "bad" and of "aged" become bytes no decoder accepts. "bad" has no snapshot, so
    // its state cannot be rebuilt; "aged" keeps the snapshot written when it was passivated.
    {
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        for name in ["bad", "aged"] {
            store
                .inject_raw_event(name, 2, &[0xc1, 0xff, 0x00])
                .await
                .expect("inject");
        }
        store.delete_snapshot("bad").expect("delete snapshot");
        store.sync().await.expect("sync");
    }
    let (code, stdout, _) = check(dir.path());
    assert_eq!(code, 1, "{stdout}");
    for name in ["bad", "aged"] {
        assert!(
            stdout.contains(&format!(
                "PROBLEM thing '{name}': seq 2: the record does not decode"
            )),
            "{stdout}"
        );
    }
    assert!(!stdout.contains("thing 'good'"), "{stdout}");
    assert!(stdout.contains("2 problems"), "{stdout}");

    let server = Server::start(dir.path(), &[]);
    for (method, path, body) in [
        (Method::GET, "/api/v1/things/bad", None),
        (Method::GET, "/api/v1/things/bad/shadow", None),
        (Method::GET, "/api/v1/things/bad/history", None),
        (Method::GET, "/api/v1/things/bad/events", None),
        (Method::GET, "/api/v1/things/bad/commands", None),
        (Method::GET, "/api/v1/thing-datas/bad/shadow", None),
        (
            Method::POST,
            "/api/v1/things/bad/shadow",
            Some(json!({"state":{"desired":{"x":1}}})),
        ),
        (
            Method::POST,
            "/api/v1/things/bad/commands",
            Some(json!({"action":"reboot"})),
        ),
    ] {
        let (status, answer) = call(method.clone(), &server.url(path), body).await;
        assert_eq!(
            (status, answer["code"].clone()),
            (503, json!(503)),
            "{method} {path}: {answer}"
        );
    }
    let (status, _) = call(
        Method::GET,
        &server.url("/api/v1/things/good/history"),
        None,
    )
    .await;
    assert_eq!(status, 200, "the other Things are served");
    // Damage older than a Thing's snapshot leaves its state intact: the device keeps being
    // served, while its history answers 503 (and `check` reports it).
    let (status, answer) = call(
        Method::GET,
        &server.url("/api/v1/things/aged/history"),
        None,
    )
    .await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["message"].as_str().unwrap_or("").contains("seq 2"),
        "{answer}"
    );
    let (status, _) = call(Method::GET, &server.url("/api/v1/things/aged/shadow"), None).await;
    assert_eq!(status, 200);
}

#[test]
fn a_damaged_snapshot_file_stops_the_server_with_its_name_and_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Two opens: sled writes its snapshot file when it opens a database with a log.
    for _ in 0..2 {
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        drop(store);
    }
    let snapshot = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("snap."))
        })
        .expect("sled wrote snap.*");
    let mut bytes = std::fs::read(&snapshot).expect("read");
    bytes[0] ^= 0xff;
    std::fs::write(&snapshot, bytes).expect("write");

    let stderr = serve_refused(dir.path());
    let name = snapshot.file_name().and_then(|n| n.to_str()).expect("name");
    assert!(stderr.contains(name), "names the file: {stderr}");
    assert!(
        stderr.contains("move every snap.* file"),
        "says what to do: {stderr}"
    );
    assert!(!stderr.contains("file offset None"), "{stderr}");

    let (code, _, stderr) = check(dir.path());
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(name),
        "check names the original file: {stderr}"
    );
}

/// A stored persistent session is verified against its user at start-up. When the user's
/// record cannot be read, the start fails naming why, and the session stays stored (it used to
/// count as revoked and be deleted for good at the next checkpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_session_that_cannot_be_verified_stops_the_start_and_stays_stored() {
    let (dir, server) = common::start_with_backend("").await;
    let (mut subscriber, _) =
        common::mqtt::Client::connect(&server, "kept", Some(common::BACKEND), |o| {
            o.set_clean_session(false);
        })
        .await
        .expect("subscriber");
    subscriber
        .subscribe("fleet/#", rumqttc::QoS::AtLeastOnce)
        .await;
    subscriber.client.disconnect().await.expect("disconnect");
    let (exit, _) = server.stop();
    assert!(exit.success());

    let data = dir.path().join("data");
    {
        let store = Store::open(&StoreConfig::new(&data)).expect("open");
        store
            .kv_put(
                &format!("mqttuser/{}", common::BACKEND.0),
                b"\xc1 damaged".to_vec(),
            )
            .await
            .expect("damage the user");
    }
    let stderr = serve_refused(&data);
    assert!(stderr.contains("stored MQTT sessions"), "{stderr}");
    let store = Store::open(&StoreConfig::new(&data)).expect("open");
    let sessions = store
        .read_records(thinghub_storage::RecordSet::MqttSessions)
        .expect("read");
    assert!(
        sessions.iter().any(|(key, _)| key == b"kept"),
        "the session is still stored"
    );
}
