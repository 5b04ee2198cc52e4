//! `jobs`: one job to a group of T registered Things, D of them connected simulated devices that
//! run it the way a device SDK does (notify-next -> start-next -> update SUCCEEDED). Measures
//! the time until every execution is QUEUED (from the job's counts, which follow the change
//! feed), notifications/s, executions completed/s, end-to-end latencies and server RSS.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::v4::Packet;
use serde_json::{json, Value};

use crate::device::{connect_all, RawDevice};
use crate::mqtt::create_bench_user;
use crate::report::{progress, Report, Timeline};
use crate::target::{Target, TargetArgs};

/// The group every target joins.
const GROUP: &str = "bench-jobs";
/// Membership requests in flight.
const MEMBERSHIP_REQUESTS_IN_FLIGHT: usize = 64;
/// How often the job's counts are read while it runs.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// What `jobs` runs.
pub struct JobsRun {
    /// Registered Things, all targets of the job (through the group).
    pub things: usize,
    /// How many of them (the first ones) are connected devices that run it.
    pub devices: usize,
    /// `rollout.maximumPerMinute` of the job (none: as fast as the server queues).
    pub maximum_per_minute: Option<u32>,
    /// Upper bound on the job's run, seconds.
    pub max_seconds: u64,
}

/// What the devices saw.
struct Seen {
    /// When the job was posted (set once, before the POST).
    created: OnceLock<Instant>,
    notifications: AtomicU64,
    last_notification: Mutex<Option<Instant>>,
    completed: AtomicU64,
    last_completed: Mutex<Option<Instant>>,
    refused: AtomicU64,
    /// Job posted -> the device's SUCCEEDED accepted, µs.
    end_to_end: Mutex<Histogram<u64>>,
    /// The device's own run: notify-next -> SUCCEEDED accepted, µs.
    device_run: Mutex<Histogram<u64>>,
    timeline: Mutex<Timeline>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One device running its jobs: starts the next one when notify-next names it, finishes it with
/// SUCCEEDED at the version it was given.
async fn device(
    server: SocketAddr,
    index: usize,
    seen: Arc<Seen>,
    ready: tokio::sync::mpsc::Sender<()>,
) -> Result<()> {
    let base = format!("$emqx/things/bench-{index}/jobs");
    let mut device = RawDevice::connect(
        server,
        index,
        format!("job-dev-{index}"),
        vec![
            format!("{base}/notify"),
            format!("{base}/notify-next"),
            format!("{base}/start-next/+"),
            format!("{base}/+/update/+"),
        ],
    )
    .await?;
    let _ = ready.send(()).await;
    let mut out = BytesMut::new();
    let mut notified: Option<Instant> = None;
    while let Some(packet) = device.next().await? {
        let Packet::Publish(publish) = packet else {
            continue;
        };
        RawDevice::ack_into(&publish, &mut out)?;
        let now = Instant::now();
        let Some(tail) = publish.topic.strip_prefix(base.as_str()) else {
            continue;
        };
        let body: Value = serde_json::from_slice(&publish.payload).unwrap_or(Value::Null);
        match tail {
            "/notify" | "/notify-next" => {
                seen.notifications.fetch_add(1, Ordering::Relaxed);
                *lock(&seen.last_notification) = Some(now);
                if tail == "/notify-next" && notified.is_none() && body.get("execution").is_some() {
                    notified = Some(now);
                    device.publish_into(
                        format!("{base}/start-next"),
                        br#"{"statusDetails":{"step":"downloading"},"clientToken":"bench"}"#
                            .to_vec(),
                        &mut out,
                    )?;
                }
            }
            "/start-next/accepted" => {
                let execution = &body["execution"];
                if let (Some(job), Some(version)) = (
                    execution["jobId"].as_str(),
                    execution["versionNumber"].as_u64(),
                ) {
                    let update = json!({
                        "status": "SUCCEEDED",
                        "expectedVersion": version,
                        "statusDetails": {"step": "installed"},
                    });
                    device.publish_into(
                        format!("{base}/{job}/update"),
                        serde_json::to_vec(&update)?,
                        &mut out,
                    )?;
                }
            }
            tail if tail.ends_with("/update/accepted") => {
                seen.completed.fetch_add(1, Ordering::Relaxed);
                *lock(&seen.last_completed) = Some(now);
                if let Some(created) = seen.created.get() {
                    let us = now.saturating_duration_since(*created).as_micros() as u64;
                    lock(&seen.end_to_end).saturating_record(us);
                    lock(&seen.timeline).record(now, us);
                }
                if let Some(notified) = notified {
                    let us = now.saturating_duration_since(notified).as_micros() as u64;
                    lock(&seen.device_run).saturating_record(us);
                }
            }
            // The first few refusals are logged; all are counted.
            tail if tail.ends_with("/rejected")
                && seen.refused.fetch_add(1, Ordering::Relaxed) < 5 =>
            {
                tracing::warn!(device = index, topic = %publish.topic, %body, "a job request was refused");
            }
            _ => {}
        }
        device.send(&mut out).await?;
    }
    Ok(())
}

/// Puts `bench-0..things` in [`GROUP`] (already members count as done).
async fn fill_group(target: &Target, things: usize) -> Result<()> {
    let response = target
        .request(reqwest::Method::POST, "/api/v1/thing-groups")
        .json(&json!({"groupName": GROUP, "description": "thinghub-loadtest jobs"}))
        .send()
        .await?;
    if !response.status().is_success() && response.status() != reqwest::StatusCode::CONFLICT {
        bail!("creating the group: {}", response.status());
    }
    let bar = progress(things as u64, "joining the group");
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    let path = format!("/api/v1/thing-groups/{GROUP}/things");
    let target = Arc::new(target.requester());
    for _ in 0..MEMBERSHIP_REQUESTS_IN_FLIGHT {
        let (next, target, path, bar) = (next.clone(), target.clone(), path.clone(), bar.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= things {
                    return Ok::<_, anyhow::Error>(());
                }
                let response = target
                    .request(reqwest::Method::POST, &path)
                    .json(&json!({"thingName": format!("bench-{i}")}))
                    .send()
                    .await?;
                if !response.status().is_success() {
                    bail!("bench-{i} joining {GROUP}: {}", response.status());
                }
                bar.inc(1);
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    bar.finish_and_clear();
    Ok(())
}

/// The job's counts: (executions with a status, SUCCEEDED).
fn counted(job: &Value) -> (u64, u64) {
    let details = &job["jobProcessDetails"];
    let with_status = [
        "numberOfQueuedThings",
        "numberOfInProgressThings",
        "numberOfSucceededThings",
        "numberOfFailedThings",
        "numberOfRejectedThings",
        "numberOfTimedOutThings",
        "numberOfCanceledThings",
        "numberOfRemovedThings",
    ]
    .iter()
    .map(|key| details[*key].as_u64().unwrap_or(0))
    .sum();
    (
        with_status,
        details["numberOfSucceededThings"].as_u64().unwrap_or(0),
    )
}

/// Runs `jobs` and prints its table.
pub async fn run(
    target_args: &TargetArgs,
    run: JobsRun,
    report_dir: Option<&std::path::Path>,
) -> Result<()> {
    if run.devices > run.things {
        bail!(
            "--devices ({}) cannot exceed --things ({})",
            run.devices,
            run.things
        );
    }
    crate::mqtt::raise_open_files_limit(run.devices);
    let server = Target::open(target_args).await?;
    create_bench_user(&server).await?;
    let started = Instant::now();
    crate::register::register_things(&server, run.things, 0).await?;
    let registered_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    fill_group(&server, run.things).await?;
    let grouped_s = started.elapsed().as_secs_f64();

    let seen = Arc::new(Seen {
        created: OnceLock::new(),
        notifications: AtomicU64::new(0),
        last_notification: Mutex::new(None),
        completed: AtomicU64::new(0),
        last_completed: Mutex::new(None),
        refused: AtomicU64::new(0),
        end_to_end: Mutex::new(crate::histogram()),
        device_run: Mutex::new(crate::histogram()),
        timeline: Mutex::new(Timeline::new(Duration::from_secs(1))),
    });
    let mut devices = tokio::task::JoinSet::new();
    let mqtt = server.mqtt;
    {
        let seen = seen.clone();
        connect_all(run.devices, &mut devices, move |index, ready| {
            device(mqtt, index, seen.clone(), ready)
        })
        .await?;
    }
    let rss_before = server.rss_bytes().await?;

    // The job.
    let job_id = format!(
        "bench-job-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let mut body = json!({
        "jobId": job_id,
        "description": "thinghub-loadtest",
        "document": {"operation": "firmware-update", "version": "2.0.0",
                     "url": "https://firmware.example/2.0.0.bin", "sha256": "0".repeat(64)},
        "targets": {"thingGroupNames": [GROUP]},
    });
    if let Some(rate) = run.maximum_per_minute {
        body["rollout"] = json!({"maximumPerMinute": rate});
    }
    let created = Instant::now();
    let _ = seen.created.set(created);
    let response = server
        .request(reqwest::Method::POST, "/api/v1/jobs")
        .json(&body)
        .send()
        .await?;
    if response.status() != reqwest::StatusCode::CREATED {
        let status = response.status();
        bail!("POST /api/v1/jobs: {status}: {}", response.text().await?);
    }
    let create_s = created.elapsed().as_secs_f64();
    let targets = response.json::<Value>().await?["targets"]
        .as_u64()
        .context("the job's targets")?;

    // Watch it run.
    let bar = progress(targets, "executions with a status");
    let deadline = created + Duration::from_secs(run.max_seconds);
    let job_path = format!("/api/v1/jobs/{job_id}");
    let mut all_queued: Option<(Instant, u64)> = None;
    let mut converged: Option<Instant> = None;
    let mut job = Value::Null;
    while Instant::now() < deadline {
        job = server
            .request(reqwest::Method::GET, &job_path)
            .send()
            .await?
            .json()
            .await?;
        let (with_status, succeeded) = counted(&job);
        bar.set_position(with_status);
        let now = Instant::now();
        if all_queued.is_none() && with_status >= targets {
            all_queued = Some((now, server.rss_bytes().await?));
        }
        let completed = seen.completed.load(Ordering::Relaxed);
        if all_queued.is_some() && completed >= run.devices as u64 && succeeded >= completed {
            converged = Some(now);
            break;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    bar.finish_and_clear();
    let rss_after = server.rss_bytes().await?;
    devices.abort_all();

    let completed = seen.completed.load(Ordering::Relaxed);
    let notifications = seen.notifications.load(Ordering::Relaxed);
    let since =
        |at: Option<Instant>| at.map(|at| at.saturating_duration_since(created).as_secs_f64());
    let last_notification = since(*lock(&seen.last_notification));
    let last_completed = since(*lock(&seen.last_completed));
    let mut report = Report::new("jobs");
    report
        .param("things (targets)", run.things)
        .param("connected devices", run.devices)
        .param(
            "rollout.maximumPerMinute",
            run.maximum_per_minute
                .map_or("none".to_owned(), |r| r.to_string()),
        )
        .number("registering the Things, s", registered_s, 1)
        .number("filling the group, s", grouped_s, 1)
        .number("POST /api/v1/jobs -> 201, s", create_s, 2);
    match all_queued {
        Some((at, _)) => {
            let seconds = at.saturating_duration_since(created).as_secs_f64();
            report
                .number(
                    "job created -> every execution QUEUED (counted), s",
                    seconds,
                    1,
                )
                .number("executions queued/s", targets as f64 / seconds, 0);
        }
        None => {
            report.text(
                "every execution QUEUED",
                format!("not within {} s", run.max_seconds),
            );
        }
    }
    report
        .text(
            "notifications received (notify + notify-next)",
            notifications,
        )
        .number(
            "notifications/s (job created -> last one)",
            notifications as f64 / last_notification.unwrap_or(f64::INFINITY),
            0,
        )
        .text(
            "executions SUCCEEDED (device side)",
            format!("{completed} of {}", run.devices),
        )
        .number(
            "executions completed/s (job created -> last SUCCEEDED)",
            completed as f64 / last_completed.unwrap_or(f64::INFINITY),
            0,
        )
        .latencies(
            "job created -> device's SUCCEEDED accepted",
            &lock(&seen.end_to_end),
        )
        .latencies(
            "device: notify-next -> SUCCEEDED accepted",
            &lock(&seen.device_run),
        )
        .text("job requests refused", seen.refused.load(Ordering::Relaxed))
        .text(
            "job counts after the run",
            job["jobProcessDetails"].to_string(),
        )
        .number(
            "server RSS before the job, MiB",
            rss_before as f64 / 1048576.0,
            1,
        );
    if let Some((_, rss)) = all_queued {
        report
            .number("server RSS when all QUEUED, MiB", rss as f64 / 1048576.0, 1)
            .number(
                "server RSS per queued execution, bytes",
                rss.saturating_sub(rss_before) as f64 / targets.max(1) as f64,
                0,
            );
    }
    report.number("server RSS after, MiB", rss_after as f64 / 1048576.0, 1);
    report.latency_over_time = lock(&seen.timeline).slices();
    report.finish(report_dir)?;
    if converged.is_none() {
        bail!(
            "the job did not converge within {} s: {completed} of {} devices SUCCEEDED, counts {}",
            run.max_seconds,
            run.devices,
            job["jobProcessDetails"]
        );
    }
    Ok(())
}
