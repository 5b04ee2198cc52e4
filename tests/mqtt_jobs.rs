//! The device Jobs API over MQTT (AWS IoT Jobs payloads) as far as it exists without the
//! operator's job routes: requests are answered on their `accepted`/`rejected` topics with
//! the client token, AWS error codes name what is wrong, and a Thing with nothing pending says
//! so.

mod common;

use common::device::Device;
use common::{register_device, Server};
use serde_json::json;

const JOBS: &str = "$emqx/things/lamp/jobs";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_no_jobs_gets_empty_answers_and_specific_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    register_device(&server, "lamp", "pw").await;
    let (mut lamp, _) = Device::connect(&server, "lamp", ("lamp", "pw"), true).await;
    lamp.subscribe(&format!("{JOBS}/#")).await;

    lamp.publish(
        &format!("{JOBS}/get"),
        json!({"clientToken": "c1"}).to_string(),
    )
    .await;
    let (topic, body) = lamp.next().await;
    assert_eq!(topic, format!("{JOBS}/get/accepted"));
    assert_eq!(body["inProgressJobs"], json!([]));
    assert_eq!(body["queuedJobs"], json!([]));
    assert_eq!(body["clientToken"], "c1");
    assert!(body["timestamp"].is_u64());

    lamp.publish(&format!("{JOBS}/start-next"), "").await;
    let (topic, body) = lamp.next().await;
    assert_eq!(topic, format!("{JOBS}/start-next/accepted"));
    assert!(body.get("execution").is_none(), "nothing pending: {body}");

    let cases = [
        (
            "fw-1/update",
            json!({"status": "SUCCEEDED", "clientToken": "c2"}).to_string(),
            "ResourceNotFound",
        ),
        (
            "fw-1/get",
            json!({"clientToken": "c2"}).to_string(),
            "ResourceNotFound",
        ),
        ("fw-1/update", "{not json".to_owned(), "InvalidJson"),
        (
            "fw-1/update",
            json!({"clientToken": "c2"}).to_string(),
            "InvalidRequest",
        ),
        (
            "fw-1/update",
            json!({"status": 3, "clientToken": "c2"}).to_string(),
            "InvalidRequest",
        ),
        (
            "start-next",
            json!({"stepTimeoutInMinutes": 0, "clientToken": "c2"}).to_string(),
            "InvalidRequest",
        ),
        (
            "start-next",
            json!({"statusDetails": {"p": 1}, "clientToken": "c2"}).to_string(),
            "InvalidRequest",
        ),
    ];
    for (path, payload, code) in cases {
        lamp.publish(&format!("{JOBS}/{path}"), payload.clone())
            .await;
        let (topic, body) = lamp.next().await;
        assert_eq!(topic, format!("{JOBS}/{path}/rejected"), "{payload}");
        assert_eq!(body["code"], code, "{payload}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
        if payload.contains("c2") {
            assert_eq!(body["clientToken"], "c2", "{payload}");
        }
    }
}
