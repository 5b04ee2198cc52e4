//! A device's connection history from its Thing's log: newest first, with reasons and
//! durations, paged and windowed.

mod common;

use std::time::{Duration, Instant};

use common::device::{Device, WAIT};
use common::{call, Server};
use reqwest::Method;
use serde_json::Value;

async fn history(server: &Server, query: &str) -> Value {
    let (status, body) = call(
        Method::GET,
        &server.url(&format!("/api/v1/things/lamp/connectivity{query}")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits (bounded) until the history holds `n` connections, the newest ended.
async fn until_ended(server: &Server, n: usize) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let body = history(server, "").await;
        let items = body["items"].as_array().expect("items");
        if items.len() >= n && items[0]["reason"].is_string() {
            return body;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_listed_newest_first_with_reasons_and_durations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    common::register_device(&server, "lamp", "pw").await;

    // A clean disconnect, then a connection the operator kicks.
    let (first, _) = Device::connect(&server, "lamp", ("lamp", "pw"), true).await;
    first.client.disconnect().await.expect("disconnect");
    until_ended(&server, 1).await;
    let (_second, _) = Device::connect(&server, "lamp", ("lamp", "pw"), true).await;
    let (status, _) = call(Method::DELETE, &server.url("/api/v1/clients/lamp"), None).await;
    assert_eq!(status, 204);
    let body = until_ended(&server, 2).await;
    let items = body["items"].as_array().expect("items");
    assert_eq!(items.len(), 2, "{body}");
    assert_eq!(items[0]["reason"], "kicked", "{body}");
    assert_eq!(items[1]["reason"], "normal", "{body}");
    for item in items {
        assert_eq!(item["clientId"], "lamp");
        let (at, end) = (
            item["connectedAt"].as_u64().expect("connectedAt"),
            item["disconnectedAt"].as_u64().expect("disconnectedAt"),
        );
        assert_eq!(item["durationMs"].as_u64(), Some(end - at), "{item}");
    }
    assert!(items[0]["seq"].as_u64() > items[1]["seq"].as_u64());
    assert_eq!(body["nextCursor"], Value::Null);

    // Paged: one at a time.
    let page = history(&server, "?limit=1").await;
    assert_eq!(page["items"][0]["reason"], "kicked");
    let cursor = page["nextCursor"].as_u64().expect("a next page");
    let next = history(&server, &format!("?limit=1&cursor={cursor}")).await;
    assert_eq!(next["items"][0]["reason"], "normal", "{next}");

    // Windowed: nothing began before the first connection.
    let first_at = items[1]["connectedAt"].as_u64().expect("at");
    let before = history(&server, &format!("?until={}", first_at - 1)).await;
    assert_eq!(before["items"], serde_json::json!([]), "{before}");
    let since = history(&server, &format!("?since={}", items[0]["connectedAt"])).await;
    assert_eq!(since["items"].as_array().map(Vec::len), Some(1), "{since}");

    let (status, _) = call(
        Method::GET,
        &server.url("/api/v1/things/nobody/connectivity"),
        None,
    )
    .await;
    assert_eq!(status, 404);
}
