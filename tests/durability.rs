//! Restarts, kill -9 and the audit CLI against the real server process and its data dir.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::{call, Server};
use reqwest::Method;
use serde_json::json;

/// thing -> (version, n) of every acknowledged update.
type Acked = HashMap<String, Vec<(u64, u64)>>;

async fn register(server: &Server, name: &str) {
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/things"),
        Some(json!({"thingName": name})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

async fn report(server: &Server, name: &str, n: u64) -> (u16, serde_json::Value) {
    call(
        Method::POST,
        &server.url("/api/v1/thing-datas/shadow/reported"),
        Some(json!({"thingName": name, "state": {"reported": {"n": n}}})),
    )
    .await
}

#[tokio::test]
async fn a_clean_restart_keeps_state_and_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    register(&server, "keeper").await;
    for n in 1..=7 {
        assert_eq!(report(&server, "keeper", n).await.0, 200);
    }
    call(
        Method::POST,
        &server.url("/api/v1/things/keeper/shadow"),
        Some(json!({"state":{"desired":{"n":9}}})),
    )
    .await;
    let (exit, logs) = server.stop();
    assert!(exit.success(), "clean exit on SIGTERM: {exit:?}");
    assert!(
        logs.iter().any(|l| l.contains("stopped cleanly")),
        "{logs:?}"
    );

    let server = Server::start(dir.path(), &[]);
    let (status, doc) = call(
        Method::GET,
        &server.url("/api/v1/things/keeper/shadow"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(doc["version"], 8);
    assert_eq!(doc["state"]["reported"], json!({"n": 7}));
    assert_eq!(doc["state"]["delta"], json!({"n": 9}));
    let (_, body) = report(&server, "keeper", 9).await;
    assert_eq!(body["version"], 9, "versions continue, never repeat");
}

/// Writers hammer several Things; the server is killed with SIGKILL while updates are in flight.
/// Every update that was acknowledged (200) must be in the log after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_update() {
    let dir = tempfile::tempdir().expect("tempdir");
    let start = || Server::start(dir.path(), &["--snapshot-every-events", "7"]);
    hammer_kill_9_and_verify(start).await;
}

/// The same with log epochs of 40 appends: the kill falls among epoch rolls, packs and swaps,
/// and the restart reads every Thing's history across the epochs. Then every sealed epoch gets
/// packed, and `check` finds every Thing's log consistent with its snapshot and indexes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_update_across_log_epochs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let start = || {
        Server::start_configured(
            dir.path(),
            "snapshot_every_events = 7\nstorage_epoch_appends_max = 40\n",
        )
    };
    hammer_kill_9_and_verify(start).await;
    let epochs = std::fs::read_dir(dir.path().join("data").join("log"))
        .expect("log dir")
        .count();
    assert!(epochs >= 5, "the log rolled over several epochs: {epochs}");

    let server = start();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, metrics) = call(Method::GET, &server.url("/api/v1/metrics"), None).await;
        assert_eq!(status, 200);
        let storage = &metrics["storage"];
        let epochs = storage["logEpochs"].as_u64().expect("logEpochs");
        let packed = storage["logEpochsPacked"]
            .as_u64()
            .expect("logEpochsPacked");
        if epochs >= 5 && packed + 1 == epochs {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sealed epochs not packed: {storage}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, logs) = server.stop();
    assert!(status.success(), "{logs:?}");
    common::assert_check_finds_no_problem(&dir.path().join("data"));
}

async fn hammer_kill_9_and_verify(start: impl Fn() -> Server) {
    let server = start();
    let things: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    for name in &things {
        register(&server, name).await;
    }
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let url = server.url("/api/v1/thing-datas/shadow/reported");
    let mut writers = Vec::new();
    for name in things.clone() {
        let acked = acked.clone();
        let url = url.clone();
        writers.push(tokio::spawn(async move {
            let client = common::client();
            for n in 1u64.. {
                let sent = client
                    .post(&url)
                    .basic_auth(common::ADMIN_KEY, Some(common::ADMIN_SECRET))
                    .json(&json!({"thingName": name, "state": {"reported": {"n": n}}}))
                    .send()
                    .await;
                let Ok(response) = sent else { return };
                if response.status() != 200 {
                    return;
                }
                let Ok(body) = response.json::<serde_json::Value>().await else {
                    return;
                };
                let version = body["version"].as_u64().expect("version");
                acked
                    .lock()
                    .expect("lock")
                    .entry(name.clone())
                    .or_default()
                    .push((version, n));
            }
        }));
    }
    // Kill once enough updates are acknowledged (bounded wait).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let total: usize = acked.lock().expect("lock").values().map(Vec::len).sum();
        if total >= 300 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "too few updates acknowledged: {total}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    server.kill9();
    for writer in writers {
        writer.await.expect("writer");
    }
    let acked = acked.lock().expect("lock").clone();
    let total: usize = acked.values().map(Vec::len).sum();

    let server = start();
    for name in &things {
        let mut history = Vec::new();
        let mut from = 1;
        loop {
            let (status, page) = call(
                Method::GET,
                &server.url(&format!(
                    "/api/v1/things/{name}/history?fromSeq={from}&limit=1000"
                )),
                None,
            )
            .await;
            assert_eq!(status, 200);
            history.extend(page["items"].as_array().expect("items").clone());
            match page["nextFromSeq"].as_u64() {
                Some(next) => from = next,
                None => break,
            }
        }
        let stored: HashMap<u64, u64> = history
            .iter()
            .filter(|e| e["type"] == "ShadowUpdated")
            .map(|e| {
                let updated = &e["event"]["ShadowUpdated"];
                (
                    updated["version"].as_u64().expect("version"),
                    updated["reported"]["merge"]["n"].as_u64().expect("n"),
                )
            })
            .collect();
        for (version, n) in acked.get(name).into_iter().flatten() {
            assert_eq!(
                stored.get(version),
                Some(n),
                "{name}: acknowledged v{version} (n={n}) lost"
            );
        }
        // Versions in the log are exactly 1..=max: none reused, none skipped.
        let max = stored.keys().copied().max().unwrap_or(0);
        assert_eq!(
            stored.len() as u64,
            max,
            "{name}: versions 1..={max} each once"
        );
        let (_, doc) = call(
            Method::GET,
            &server.url(&format!("/api/v1/things/{name}/shadow")),
            None,
        )
        .await;
        assert_eq!(
            doc["version"].as_u64(),
            Some(max),
            "{name}: the live version is the log's last"
        );
    }
    assert!(total >= 300, "verified {total} acknowledged updates");
}

#[tokio::test]
async fn audit_prints_the_history_and_refuses_a_locked_data_dir_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    register(&server, "audited").await;
    report(&server, "audited", 1).await;
    let audit = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_thinghub"))
            .args(["audit", "audited", "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .output()
            .expect("run audit")
    };
    let locked = audit(&[]);
    assert!(!locked.status.success());
    let stderr = String::from_utf8_lossy(&locked.stderr);
    assert!(stderr.contains("locked"), "{stderr}");

    let (exit, _) = server.stop();
    assert!(exit.success());
    let table = audit(&[]);
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    let text = String::from_utf8_lossy(&table.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[1].contains("ThingRegistered") && lines[2].contains("ShadowUpdated"),
        "{text}"
    );

    let json_lines = audit(&["--json"]);
    let parsed: Vec<serde_json::Value> = String::from_utf8_lossy(&json_lines.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(
        parsed
            .iter()
            .map(|e| e["seq"].as_u64().expect("seq"))
            .collect::<Vec<_>>(),
        [1, 2]
    );

    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_thinghub"))
        .args(["audit", "nobody", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no history"));
}
