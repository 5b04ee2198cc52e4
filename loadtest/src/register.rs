//! `register`: Things registered through the streaming bulk endpoint (`POST /api/v1/things/bulk`,
//! NDJSON), optionally with credentials; reports Things/s, server RSS and disk use after.
//! Other scenarios use [`register_things`] to create their fleet.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::report::{progress, Report};
use crate::target::{Target, TargetArgs};

/// Lines per bulk request (each request streams; several run one after another).
const BULK_REQUEST_LINES: usize = 50_000;

/// Registers `bench-{i}` for `i` in `0..things` (the first `credentials` of them with an MQTT
/// user `bench-{i}` / `pw-{i}` bound to the Thing). Already registered Things count as done.
/// Returns how many were created now.
pub async fn register_things(target: &Target, things: usize, credentials: usize) -> Result<usize> {
    let bar = progress(things as u64, "registering");
    let mut created = 0;
    let mut start = 0;
    while start < things {
        let end = (start + BULK_REQUEST_LINES).min(things);
        let mut body = String::with_capacity((end - start) * 32);
        for i in start..end {
            if i < credentials {
                body.push_str(&format!(
                    "{{\"thingName\":\"bench-{i}\",\"password\":\"pw-{i}\"}}\n"
                ));
            } else {
                body.push_str(&format!("{{\"thingName\":\"bench-{i}\"}}\n"));
            }
        }
        let response = target
            .request(reqwest::Method::POST, "/api/v1/things/bulk")
            .body(body)
            .send()
            .await
            .context("bulk registration")?;
        if !response.status().is_success() {
            bail!("POST /api/v1/things/bulk: {}", response.status());
        }
        let text = response.text().await?;
        for line in text.lines() {
            let answer: serde_json::Value = serde_json::from_str(line)?;
            if answer.get("summary").is_some() {
                continue;
            }
            match answer["code"].as_u64() {
                Some(201) => created += 1,
                Some(409) => {}
                _ => bail!("bulk registration refused a line: {answer}"),
            }
            if answer.get("credentials").is_some_and(|c| {
                c != "created" && !c.as_str().is_some_and(|c| c.contains("exists"))
            }) {
                bail!("credentials not created: {answer}");
            }
            bar.inc(1);
        }
        start = end;
    }
    bar.finish_and_clear();
    Ok(created)
}

/// Runs `register`.
pub async fn run(
    target_args: &TargetArgs,
    things: usize,
    credentials: usize,
    report_dir: Option<&Path>,
) -> Result<()> {
    let target = Target::open(target_args).await?;
    let rss_before = target.rss_bytes().await?;
    let disk_before = target.disk_bytes();
    let started = Instant::now();
    let created = register_things(&target, things, credentials).await?;
    let seconds = started.elapsed().as_secs_f64();
    let rss_after = target.rss_bytes().await?;
    let mut report = Report::new("register");
    report
        .param("things", things)
        .param("credentials", credentials)
        .number("Things registered now", created as f64, 0)
        .number("Things/s (durable)", things as f64 / seconds, 0)
        .number("seconds", seconds, 1)
        .number("server RSS before, MiB", rss_before as f64 / 1048576.0, 1)
        .number("server RSS after, MiB", rss_after as f64 / 1048576.0, 1);
    if let (Some(before), Some(after)) = (disk_before, target.disk_bytes()) {
        report
            .number("disk used after, MiB", after as f64 / 1048576.0, 1)
            .number(
                "disk per Thing, bytes",
                after.saturating_sub(before) as f64 / things.max(1) as f64,
                0,
            );
    } else {
        report.text("disk used", "n/a (server not started by this run)");
    }
    report.finish(report_dir)
}
