//! Command benchmarks.
//!
//! - `commands` (over the network): N connected simulated devices, each subscribed to its
//!   Thing's request topic and answering every request with SUCCEEDED; an operator sends
//!   commands over HTTP with C in flight. Measures commands/s and the latency from the HTTP send
//!   to the durable SUCCEEDED (seen on `.../response/accepted`).
//! - `deadlines` (in process): P pending commands across Things that are then passivated; the
//!   deadline timer must re-activate each Thing and time its command out. Measures the memory
//!   of pending deadlines and how late each fired (completedAt - expiresAt, from the state).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::{Event, MqttOptions};

use crate::device::{connect_all, RawDevice};
use crate::mqtt::{create_bench_user, BENCH_USER};
use crate::report::{progress, Report, Timeline};
use crate::target::{Target, TargetArgs};

/// What `commands` runs.
pub struct CommandsRun {
    /// Connected devices (each a Thing).
    pub devices: usize,
    /// Commands sent in total.
    pub commands: usize,
    /// HTTP sends in flight.
    pub concurrency: usize,
    /// Upper bound on the sending phase, seconds.
    pub max_seconds: u64,
}

/// One simulated device: connects as Thing `bench-{index}`, subscribes to its request topic,
/// and answers each request with SUCCEEDED (QoS 1). Runs until the connection closes.
async fn device(
    server: SocketAddr,
    index: usize,
    ready: tokio::sync::mpsc::Sender<()>,
) -> Result<()> {
    let thing = format!("bench-{index}");
    let mut device = RawDevice::connect(
        server,
        index,
        format!("cmd-dev-{index}"),
        vec![format!(
            "$emqx/commands/things/{thing}/executions/+/request"
        )],
    )
    .await?;
    let _ = ready.send(()).await;
    let mut out = BytesMut::new();
    while let Some(packet) = device.next().await? {
        let Packet::Publish(publish) = packet else {
            continue;
        };
        RawDevice::ack_into(&publish, &mut out)?;
        if let Some(base) = publish.topic.strip_suffix("/request") {
            device.publish_into(
                format!("{base}/response"),
                br#"{"status":"SUCCEEDED","result":{"ok":true}}"#.to_vec(),
                &mut out,
            )?;
        }
        device.send(&mut out).await?;
    }
    Ok(())
}

/// When each execution was sent and when its SUCCEEDED was seen (either may come first).
#[derive(Default)]
struct Timings {
    sent: HashMap<String, Instant>,
    done: HashMap<String, Instant>,
}

/// Runs `commands` and prints its table.
pub async fn run(
    target_args: &TargetArgs,
    run: CommandsRun,
    report_dir: Option<&std::path::Path>,
) -> Result<()> {
    crate::mqtt::raise_open_files_limit(run.devices);
    let server = Target::open(target_args).await?;
    create_bench_user(&server).await?;
    crate::register::register_things(&server, run.devices, 0).await?;
    let rss_before = server.rss_bytes().await?;

    let mut devices = tokio::task::JoinSet::new();
    let mqtt = server.mqtt;
    connect_all(run.devices, &mut devices, |index, ready| {
        device(mqtt, index, ready)
    })
    .await?;
    let rss_connected = server.rss_bytes().await?;

    // The operator side watches every durable answer.
    let mut options = MqttOptions::new(
        "cmd-monitor",
        server.mqtt.ip().to_string(),
        server.mqtt.port(),
    );
    options.set_credentials(BENCH_USER.0, BENCH_USER.1);
    options.set_keep_alive(Duration::from_secs(60));
    options.set_inflight(1000);
    let (monitor, mut monitor_loop) = crate::mqtt::client(options, 10_000);
    monitor
        .subscribe(
            "$emqx/commands/things/+/executions/+/response/accepted",
            rumqttc::QoS::AtMostOnce,
        )
        .await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), monitor_loop.poll()).await?? {
            Event::Incoming(rumqttc::Packet::SubAck(_)) => break,
            _ => continue,
        }
    }
    let timings = Arc::new(Mutex::new(Timings::default()));
    let latencies = Arc::new(Mutex::new(crate::histogram()));
    let timeline = Arc::new(Mutex::new(Timeline::new(Duration::from_secs(1))));
    let bar = progress(run.commands as u64, "commands");
    let succeeded = Arc::new(AtomicU64::new(0));
    let record = {
        let timings = timings.clone();
        let latencies = latencies.clone();
        let timeline = timeline.clone();
        let bar = bar.clone();
        let succeeded = succeeded.clone();
        move |id: String, sent: Option<Instant>, done: Option<Instant>| {
            let mut t = timings.lock().unwrap_or_else(|p| p.into_inner());
            let (sent, done) = match (sent, done) {
                (Some(sent), None) => match t.done.remove(&id) {
                    Some(done) => (sent, done),
                    None => {
                        t.sent.insert(id, sent);
                        return;
                    }
                },
                (None, Some(done)) => match t.sent.remove(&id) {
                    Some(sent) => (sent, done),
                    None => {
                        t.done.insert(id, done);
                        return;
                    }
                },
                _ => return,
            };
            succeeded.fetch_add(1, Ordering::Relaxed);
            bar.inc(1);
            let latency_us = done.saturating_duration_since(sent).as_micros() as u64;
            latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .saturating_record(latency_us);
            timeline
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(done, latency_us);
        }
    };
    let record = Arc::new(record);
    {
        let record = record.clone();
        tokio::spawn(async move {
            while let Ok(event) = monitor_loop.poll().await {
                if let Event::Incoming(rumqttc::Packet::Publish(publish)) = event {
                    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&publish.payload)
                    else {
                        continue;
                    };
                    if body["status"] == "SUCCEEDED" {
                        if let Some(id) = body["executionId"].as_str() {
                            record(id.to_owned(), None, Some(Instant::now()));
                        }
                    }
                }
            }
        });
    }

    // Send.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(run.concurrency)
        .build()?;
    let next = Arc::new(AtomicU64::new(0));
    let send_latencies = Arc::new(Mutex::new(crate::histogram()));
    let started = Instant::now();
    let stop_at = started + Duration::from_secs(run.max_seconds);
    let mut senders = tokio::task::JoinSet::new();
    let admin = Arc::new(server.admin.clone());
    for _ in 0..run.concurrency.max(1) {
        let http = http.clone();
        let admin = admin.clone();
        let next = next.clone();
        let record = record.clone();
        let send_latencies = send_latencies.clone();
        let (devices, commands, base) = (run.devices as u64, run.commands as u64, server.http);
        senders.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= commands || Instant::now() > stop_at {
                    return Ok::<_, anyhow::Error>(());
                }
                let thing = n % devices;
                let sent = Instant::now();
                let response = http
                    .post(format!(
                        "http://{base}/api/v1/things/bench-{thing}/commands"
                    ))
                    .basic_auth(&admin.0, Some(&admin.1))
                    .json(&serde_json::json!({"action": "ping", "params": {"n": n}, "ttl": 60}))
                    .send()
                    .await?;
                if response.status() != reqwest::StatusCode::CREATED {
                    bail!("send to bench-{thing}: {}", response.status());
                }
                send_latencies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .saturating_record(sent.elapsed().as_micros() as u64);
                let body: serde_json::Value = response.json().await?;
                let id = body["executionId"]
                    .as_str()
                    .context("executionId")?
                    .to_owned();
                record(id, Some(sent), None);
            }
        });
    }
    while let Some(done) = senders.join_next().await {
        done??;
    }
    let sent = next.load(Ordering::Relaxed).min(run.commands as u64);
    // Wait (bounded) for the last answers.
    let drain_until = Instant::now() + Duration::from_secs(30);
    while succeeded.load(Ordering::Relaxed) < sent && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let done = succeeded.load(Ordering::Relaxed);
    let rss_after = server.rss_bytes().await?;
    devices.abort_all();

    bar.finish_and_clear();
    let latencies = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let send_latencies = send_latencies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut report = Report::new("commands");
    report
        .param("devices", run.devices)
        .param("commands", sent)
        .param("concurrency", run.concurrency)
        .text("commands SUCCEEDED", format!("{done} of {sent}"))
        .number(
            "commands/s (send -> durable SUCCEEDED)",
            done as f64 / seconds,
            0,
        )
        .latencies("send -> SUCCEEDED", &latencies)
        .latencies("HTTP 201", &send_latencies)
        .number(
            "server RSS per connected device, bytes",
            rss_connected.saturating_sub(rss_before) as f64 / run.devices.max(1) as f64,
            0,
        )
        .number("server RSS after, MiB", rss_after as f64 / 1048576.0, 1);
    report.latency_over_time = timeline.lock().unwrap_or_else(|p| p.into_inner()).slices();
    report.finish(report_dir)?;
    if done < sent {
        bail!("{} commands did not reach SUCCEEDED", sent - done);
    }
    Ok(())
}
