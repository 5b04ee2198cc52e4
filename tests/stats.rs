//! `GET /api/v1/stats`: every metric now and the rate of every counter over one and five
//! minutes, from the sampler's history.

mod common;

use std::time::{Duration, Instant};

use common::{call, start_with_backend};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_show_current_values_and_rates_of_the_counters() {
    let (_dir, server) = start_with_backend("stats_sample_interval_ms = 100\n").await;
    let (status, first) = call(Method::GET, &server.url("/api/v1/stats"), None).await;
    assert_eq!(status, 200, "{first}");
    assert!(
        first["current"]["process"]["rssBytes"].as_u64().is_some(),
        "{first}"
    );
    assert!(first["current"]["mqtt"]["connections"].is_u64(), "{first}");

    // Messages in: their rate shows up (the window is what the server has lived so far).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for n in 0..20 {
            call(
                Method::POST,
                &server.url("/api/v1/publish"),
                Some(json!({"topic": format!("load/{n}"), "payload": "x"})),
            )
            .await;
        }
        let (_, stats) = call(Method::GET, &server.url("/api/v1/stats"), None).await;
        let minute = &stats["rates"]["oneMinute"];
        let rate = minute["mqtt"]["messagesIn"].as_f64().unwrap_or(0.0);
        if rate > 0.0 {
            let window = minute["windowSeconds"].as_f64().expect("window");
            assert!(window > 0.0 && window <= 60.5, "{minute}");
            assert!(
                stats["rates"]["fiveMinutes"]["mqtt"]["messagesIn"]
                    .as_f64()
                    .is_some_and(|r| r > 0.0),
                "{stats}"
            );
            assert!(
                minute
                    .get("process")
                    .is_none_or(|p| p.get("rssBytes").is_none()),
                "gauges have no rate: {minute}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no rate ever: {stats}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}
