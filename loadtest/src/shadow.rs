//! The shadow benchmark: N devices doing report -> update/accepted round trips (QoS 1, each
//! acknowledged only once durable), beside a raw publish -> echo round trip through the same
//! broker with the same devices in the same run, so the ratio is the figure.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use rumqttc::{Event, MqttOptions, Packet, QoS};
use tokio::sync::Barrier;

use crate::mqtt::{create_bench_user, ChildServer, ADMIN, BENCH_USER};

/// What to run.
pub struct ShadowRun {
    /// Simulated devices (each a connection and a Thing).
    pub devices: usize,
    /// Seconds per phase.
    pub seconds: u64,
}

struct PhaseResult {
    round_trips: u64,
    seconds: f64,
    latencies: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

pub(crate) async fn register_things(http: SocketAddr, devices: usize) -> Result<()> {
    let client = reqwest::Client::new();
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..devices {
        let client = client.clone();
        pending.spawn(async move {
            let response = client
                .post(format!("http://{http}/api/v1/things"))
                .basic_auth(ADMIN.0, Some(ADMIN.1))
                .json(&serde_json::json!({"thingName": format!("bench-{i}")}))
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("registering bench-{i}: {}", response.status());
            }
            Ok(())
        });
        if pending.len() >= 64 {
            if let Some(done) = pending.join_next().await {
                done??;
            }
        }
    }
    while let Some(done) = pending.join_next().await {
        done??;
    }
    Ok(())
}

/// One device: connects and subscribes, waits at `start` for every other device, then
/// publishes on `request_topic` and waits for its token on `reply_topic`, for `duration`.
async fn device(
    mqtt: SocketAddr,
    id: String,
    request_topic: String,
    reply_topic: String,
    shadow: bool,
    start: Arc<Barrier>,
    duration: Duration,
) -> Result<(u64, Histogram<u64>)> {
    let mut options = MqttOptions::new(&id, mqtt.ip().to_string(), mqtt.port());
    options.set_credentials(BENCH_USER.0, BENCH_USER.1);
    options.set_keep_alive(Duration::from_secs(60));
    let (client, mut eventloop) = crate::mqtt::client(options, 16);
    client.subscribe(&reply_topic, QoS::AtLeastOnce).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await?? {
            Event::Incoming(Packet::SubAck(_)) => break,
            _ => continue,
        }
    }
    // The clock starts when every device is connected and subscribed, so connection setup is
    // not measured (and a short phase cannot end before any round trip).
    start.wait().await;
    let until = Instant::now() + duration;
    let mut latencies = histogram();
    let mut count = 0u64;
    while Instant::now() < until {
        let token = format!("{id}-{count}");
        let payload = if shadow {
            format!(
                r#"{{"state":{{"reported":{{"temperature":21.5,"n":{count}}}}},"clientToken":"{token}"}}"#
            )
        } else {
            format!(r#"{{"clientToken":"{token}"}}"#)
        };
        let sent = Instant::now();
        client
            .publish(&request_topic, QoS::AtLeastOnce, false, payload)
            .await?;
        loop {
            let event = tokio::time::timeout(Duration::from_secs(30), eventloop.poll())
                .await
                .context("no reply within 30 s")??;
            if let Event::Incoming(Packet::Publish(publish)) = event {
                if publish.topic == reply_topic
                    && memchr_contains(&publish.payload, token.as_bytes())
                {
                    break;
                }
            }
        }
        latencies.saturating_record(sent.elapsed().as_micros() as u64);
        count += 1;
    }
    let _ = client.disconnect().await;
    Ok((count, latencies))
}

fn memchr_contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn phase(
    mqtt: SocketAddr,
    devices: usize,
    seconds: u64,
    shadow: bool,
) -> Result<PhaseResult> {
    let start = Arc::new(Barrier::new(devices + 1));
    let duration = Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..devices {
        let (request, reply) = if shadow {
            let base = format!("$emqx/things/bench-{i}/shadow/update");
            (base.clone(), format!("{base}/accepted"))
        } else {
            let topic = format!("bench/echo/{i}");
            (topic.clone(), topic)
        };
        let kind = if shadow { "s" } else { "e" };
        tasks.spawn(device(
            mqtt,
            format!("bench-{kind}-{i}"),
            request,
            reply,
            shadow,
            start.clone(),
            duration,
        ));
    }
    // Bounded: a device that cannot connect fails its task and never reaches the barrier.
    tokio::time::timeout(Duration::from_secs(60), start.wait())
        .await
        .context("devices did not all connect within 60 s")?;
    let started = Instant::now();
    let mut round_trips = 0;
    let mut latencies = histogram();
    while let Some(done) = tasks.join_next().await {
        let (count, histogram) = done??;
        round_trips += count;
        latencies.add(&histogram).context("merge")?;
    }
    Ok(PhaseResult {
        round_trips,
        seconds: started.elapsed().as_secs_f64(),
        latencies,
    })
}

/// Runs both phases and prints the table.
pub async fn run(run: ShadowRun) -> Result<()> {
    let server = ChildServer::start().await?;
    create_bench_user(server.http).await?;
    register_things(server.http, run.devices).await?;
    let shadow = phase(server.mqtt, run.devices, run.seconds, true).await?;
    let echo = phase(server.mqtt, run.devices, run.seconds, false).await?;
    let rate = |p: &PhaseResult| p.round_trips as f64 / p.seconds;
    let ms = |p: &PhaseResult, q: f64| p.latencies.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "shadow: {} devices, QoS 1, one request in flight per device, {} s per phase",
        run.devices, run.seconds
    );
    println!("{:<46} {:>12} {:>12}", "metric", "shadow", "echo");
    println!(
        "{:<46} {:>12.0} {:>12.0}",
        "round trips/s",
        rate(&shadow),
        rate(&echo)
    );
    println!(
        "{:<46} {:>12.2} {:>12.2}",
        "p50 ms",
        ms(&shadow, 0.5),
        ms(&echo, 0.5)
    );
    println!(
        "{:<46} {:>12.2} {:>12.2}",
        "p99 ms",
        ms(&shadow, 0.99),
        ms(&echo, 0.99)
    );
    println!(
        "{:<46} {:>12.2}",
        "durable shadow updates / raw echo (ratio)",
        rate(&shadow) / rate(&echo).max(1e-9)
    );
    println!(
        "{:<46} {:>12.1}",
        "server RSS after, MiB",
        server.rss_bytes() as f64 / 1048576.0
    );
    Ok(())
}
