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
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use rumqttc::{Event, MqttOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::mqtt::{create_bench_user, BENCH_USER};
use crate::report::{progress, Report, Timeline};
use crate::target::{Target, TargetArgs};

/// Source addresses the devices are spread over.
const SOURCE_ADDRESSES: u8 = 8;
/// Largest packet a simulated device reads.
const PACKET_BYTES_MAX: usize = 64 * 1024;

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

fn encode(packet: &Packet) -> Result<BytesMut> {
    let mut out = BytesMut::new();
    packet
        .write(&mut out, PACKET_BYTES_MAX)
        .map_err(|e| anyhow::anyhow!("encode: {e:?}"))?;
    Ok(out)
}

/// One simulated device: connects as Thing `bench-{index}`, subscribes to its request topic,
/// and answers each request with SUCCEEDED (QoS 1). Runs until the connection closes.
async fn device(
    server: SocketAddr,
    index: usize,
    ready: tokio::sync::mpsc::Sender<()>,
) -> Result<()> {
    let source = IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        1 + (index % SOURCE_ADDRESSES as usize) as u8,
    ));
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = stream.into_split();
    let mut connect = Connect::new(format!("cmd-dev-{index}"));
    connect.keep_alive = 0;
    connect.set_login(BENCH_USER.0, BENCH_USER.1);
    writer
        .write_all(&encode(&Packet::Connect(connect))?)
        .await?;
    let thing = format!("bench-{index}");
    let mut subscribe = Subscribe::new(
        format!("$emqx/commands/things/{thing}/executions/+/request"),
        QoS::AtLeastOnce,
    );
    subscribe.pkid = 1;
    writer
        .write_all(&encode(&Packet::Subscribe(subscribe))?)
        .await?;
    let mut buffer = BytesMut::with_capacity(4096);
    let mut next_pkid: u16 = 1;
    let mut subscribed = false;
    loop {
        let packet = match Packet::read(&mut buffer, PACKET_BYTES_MAX) {
            Ok(packet) => packet,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                if reader.read_buf(&mut buffer).await? == 0 {
                    return Ok(());
                }
                continue;
            }
            Err(e) => bail!("device {index}: bad packet: {e:?}"),
        };
        match packet {
            Packet::SubAck(_) if !subscribed => {
                subscribed = true;
                let _ = ready.send(()).await;
            }
            Packet::Publish(publish) => {
                let mut out = BytesMut::new();
                if publish.qos == QoS::AtLeastOnce {
                    PubAck::new(publish.pkid)
                        .write(&mut out)
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                }
                let topic = publish.topic.clone();
                if let Some(base) = topic.strip_suffix("/request") {
                    next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                    let mut response = Publish::new(
                        format!("{base}/response"),
                        QoS::AtLeastOnce,
                        br#"{"status":"SUCCEEDED","result":{"ok":true}}"#.to_vec(),
                    );
                    response.pkid = next_pkid;
                    response
                        .write(&mut out)
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                }
                writer.write_all(&out).await?;
            }
            _ => {}
        }
    }
}

/// Device handshakes in flight while connecting.
const CONNECTS_IN_FLIGHT: usize = 200;

async fn wait_ready(
    ready: &mut tokio::sync::mpsc::Receiver<()>,
    by: Instant,
    connected: usize,
    devices: usize,
) -> Result<()> {
    tokio::time::timeout_at(by.into(), ready.recv())
        .await
        .with_context(|| format!("only {connected} of {devices} devices connected in time"))?
        .context("a device failed before subscribing")
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

    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(run.devices.max(1));
    let mut devices = tokio::task::JoinSet::new();
    let connected_by = Instant::now() + Duration::from_secs(120);
    let mut connected = 0;
    for index in 0..run.devices {
        devices.spawn(device(server.mqtt, index, ready_tx.clone()));
        // At most CONNECTS_IN_FLIGHT handshakes at once: a burst beyond the listen backlog
        // turns into SYN retries seconds apart.
        if index + 1 - connected >= CONNECTS_IN_FLIGHT {
            wait_ready(&mut ready_rx, connected_by, connected, run.devices).await?;
            connected += 1;
        }
    }
    drop(ready_tx);
    while connected < run.devices {
        wait_ready(&mut ready_rx, connected_by, connected, run.devices).await?;
        connected += 1;
    }
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
