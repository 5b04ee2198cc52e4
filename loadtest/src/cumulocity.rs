//! `cumulocity`: N simulated Cumulocity devices (raw MQTT 3.1.1, client id `d:c8y-{i}`, the
//! benchmark superuser, so each device's Thing is created by its first row) each publishing
//! SmartREST measurement rows on `s/us` at QoS 1; a row counts once its PUBACK is in, which the
//! server sends only after the row is durable in the Thing's log. Then the shadow phase of the
//! same devices' count, in the same run, for the ratio.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::v4::Packet;
use tokio::sync::{Barrier, Semaphore};

use crate::device::RawDevice;
use crate::mqtt::create_bench_user;
use crate::register::register_things;
use crate::report::Report;
use crate::shadow::{phase, Work};
use crate::target::{Target, TargetArgs};

/// Device handshakes in flight while connecting.
const CONNECTS_IN_FLIGHT: usize = 200;
/// Rows per message.
const ROWS_PER_MESSAGE: usize = 1;

async fn device(
    target: Arc<Target>,
    index: usize,
    connecting: Arc<Semaphore>,
    start: Arc<Barrier>,
    duration: Duration,
) -> Result<(u64, Histogram<u64>)> {
    let mut device = {
        let _permit = connecting.acquire().await?;
        RawDevice::connect(
            target.mqtt,
            index,
            format!("d:c8y-{index}"),
            vec!["s/e".to_owned()],
        )
        .await?
    };
    start.wait().await;
    let until = Instant::now() + duration;
    let mut latencies = crate::histogram();
    let mut out = BytesMut::with_capacity(256);
    let mut rows = 0u64;
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let payload: Vec<String> = (0..ROWS_PER_MESSAGE)
            .map(|r| format!("200,c8y_Temperature,T,{}.{r},C", n % 100))
            .collect();
        device.publish_into("s/us".into(), payload.join("\n").into_bytes(), &mut out)?;
        let sent = Instant::now();
        device.send(&mut out).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(30), device.next())
                .await
                .context("no PUBACK within 30 s")??
            {
                Some(Packet::PubAck(_)) => break,
                Some(Packet::Publish(publish)) => {
                    // Something refused: the run is wrong, not slow.
                    bail!(
                        "device {index}: s/e {}",
                        String::from_utf8_lossy(&publish.payload)
                    );
                }
                Some(_) => {}
                None => bail!("device {index}: connection closed"),
            }
        }
        latencies.saturating_record(sent.elapsed().as_micros() as u64);
        rows += ROWS_PER_MESSAGE as u64;
    }
    Ok((rows, latencies))
}

/// Runs the scenario.
pub async fn run(
    target_args: &TargetArgs,
    devices: usize,
    seconds: u64,
    report_dir: Option<&Path>,
) -> Result<()> {
    crate::mqtt::raise_open_files_limit(devices);
    // A server this run starts serves the Cumulocity topics (read by `server`).
    std::env::set_var("THINGHUB_CUMULOCITY", "true");
    let target = Arc::new(Target::open(target_args).await?);
    create_bench_user(&target).await?;
    register_things(&target, devices, 0).await?;
    let start = Arc::new(Barrier::new(devices + 1));
    let connecting = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
    let duration = Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..devices {
        tasks.spawn(device(
            target.clone(),
            i,
            connecting.clone(),
            start.clone(),
            duration,
        ));
    }
    crate::shadow::all_connected(&start, &mut tasks).await?;
    let started = Instant::now();
    let mut rows = 0u64;
    let mut latencies = crate::histogram();
    while let Some(done) = tasks.join_next().await {
        let (count, histogram) = done??;
        rows += count;
        latencies.add(&histogram).context("merge")?;
    }
    let c8y_seconds = started.elapsed().as_secs_f64();
    let shadow = {
        let target = target.clone();
        phase(
            target.mqtt,
            Some((
                crate::mqtt::BENCH_USER.0.to_owned(),
                crate::mqtt::BENCH_USER.1.to_owned(),
            )),
            devices,
            seconds,
            0.0,
            "shadow",
            move |i| Work::Shadow {
                thing: format!("bench-{i}"),
                http: None,
            },
            None,
            target.server_pid(),
        )
        .await?
    };
    let c8y_rate = rows as f64 / c8y_seconds;
    let shadow_rate = shadow.round_trips as f64 / shadow.seconds;
    let mut report = Report::new("cumulocity");
    report
        .param("devices", devices)
        .param("seconds", seconds)
        .param("rows_per_message", ROWS_PER_MESSAGE)
        .number("SmartREST rows/s stored durably (200, QoS 1)", c8y_rate, 0)
        .latencies("row publish -> PUBACK", &latencies)
        .number("durable shadow round trips/s (same run)", shadow_rate, 0)
        .latencies("shadow", &shadow.latencies)
        .number("rows / shadow (ratio)", c8y_rate / shadow_rate.max(1e-9), 2)
        .number(
            "server RSS after, MiB",
            target.rss_bytes().await? as f64 / 1048576.0,
            1,
        );
    report.finish(report_dir)
}
