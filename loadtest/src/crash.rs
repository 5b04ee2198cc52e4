//! `crash`: start thinghub on a data dir, load it with shadow updates, `kill -9` it at a random
//! moment, restart it on the same dir and verify that every acknowledged update is in the log
//! with the value that was acknowledged, and that no shadow version was reused or skipped.
//! Repeat. Exits non-zero on any loss.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::mqtt::{ChildServer, ADMIN};
use crate::report::{progress, Report};

/// What `crash` runs.
pub struct CrashRun {
    /// Kill/restart cycles.
    pub cycles: usize,
    /// Things written to.
    pub things: usize,
    /// Concurrent HTTP writers.
    pub writers: usize,
    /// The kill comes at a random moment within this many milliseconds of load.
    pub load_ms_max: u64,
}

/// What the verifier knows of one Thing.
#[derive(Default)]
struct Known {
    /// Acknowledged versions not verified yet, with their values.
    acked: HashMap<u64, String>,
    /// Highest shadow version verified so far (versions must continue from it).
    version: u64,
    /// Log sequence number verified so far.
    seq: u64,
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// A small xorshift generator seeded from the clock (the kill moment needs no more).
struct Random(u64);

impl Random {
    fn new() -> Random {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Random(seed | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Writes desired updates until the server dies; records each acknowledged (version, value).
async fn writer(
    server: std::net::SocketAddr,
    cycle: usize,
    writer: usize,
    things: usize,
    known: Arc<Vec<Mutex<Known>>>,
) -> u64 {
    let client = http();
    let mut acked = 0;
    for k in 0u64.. {
        let thing = (writer + k as usize * 7) % things;
        let value = format!("c{cycle}-w{writer}-{k}");
        let response = client
            .post(format!(
                "http://{server}/api/v1/things/crash-{thing}/shadow"
            ))
            .basic_auth(ADMIN.0, Some(ADMIN.1))
            .json(&serde_json::json!({"state": {"desired": {"v": value}}}))
            .send()
            .await;
        let Ok(response) = response else { return acked };
        if !response.status().is_success() {
            return acked;
        }
        let Ok(body) = response.json::<serde_json::Value>().await else {
            return acked;
        };
        let Some(version) = body["version"].as_u64() else {
            return acked;
        };
        known[thing]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .acked
            .insert(version, value);
        acked += 1;
    }
    acked
}

/// Reads the new part of each Thing's log and checks it against what was acknowledged.
async fn verify(server: &ChildServer, known: &[Mutex<Known>]) -> Result<u64> {
    let client = http();
    let mut verified = 0;
    for (thing, shared) in known.iter().enumerate() {
        // The writers have stopped: work on a copy, put it back at the end.
        let mut known = std::mem::take(&mut *shared.lock().unwrap_or_else(|p| p.into_inner()));
        let mut found: HashMap<u64, String> = HashMap::new();
        loop {
            let url = format!(
                "http://{}/api/v1/things/crash-{thing}/history?fromSeq={}&limit=1000",
                server.http,
                known.seq + 1
            );
            let page: serde_json::Value = client
                .get(url)
                .basic_auth(ADMIN.0, Some(ADMIN.1))
                .send()
                .await?
                .json()
                .await?;
            let items = page["items"].as_array().context("history items")?;
            for item in items {
                known.seq = item["seq"].as_u64().context("seq")?;
                if item["type"] != "ShadowUpdated" {
                    continue;
                }
                let event = &item["event"]["ShadowUpdated"];
                let version = event["version"].as_u64().context("version")?;
                if version != known.version + 1 {
                    bail!(
                        "crash-{thing}: shadow version {version} follows {} (reused or skipped) at seq {}",
                        known.version,
                        known.seq
                    );
                }
                known.version = version;
                let value = event["desired"]["merge"]["v"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                found.insert(version, value);
            }
            if page["nextFromSeq"].is_null() {
                break;
            }
        }
        for (version, value) in std::mem::take(&mut known.acked) {
            match found.get(&version) {
                Some(stored) if *stored == value => verified += 1,
                Some(stored) => bail!(
                    "crash-{thing}: acknowledged version {version} = {value} but the log has {stored}"
                ),
                None => bail!(
                    "LOST: crash-{thing} version {version} ({value}) was acknowledged but is not in the log"
                ),
            }
        }
        *shared.lock().unwrap_or_else(|p| p.into_inner()) = known;
    }
    Ok(verified)
}

/// Runs `crash`.
pub async fn run(run: CrashRun, report_dir: Option<&Path>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let known: Arc<Vec<Mutex<Known>>> =
        Arc::new((0..run.things).map(|_| Mutex::default()).collect());
    let mut random = Random::new();
    let bar = progress(run.cycles as u64, "cycles");
    let (mut verified_total, mut acked_total) = (0u64, 0u64);
    let mut startups = crate::histogram();
    let mut server = ChildServer::start_in(dir.path()).await?;
    let client = http();
    for thing in 0..run.things {
        let response = client
            .post(format!("http://{}/api/v1/things", server.http))
            .basic_auth(ADMIN.0, Some(ADMIN.1))
            .json(&serde_json::json!({"thingName": format!("crash-{thing}")}))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("register crash-{thing}: {}", response.status());
        }
    }
    for cycle in 0..run.cycles {
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..run.writers {
            writers.spawn(writer(server.http, cycle, w, run.things, known.clone()));
        }
        let load_ms = 50 + random.below(run.load_ms_max.max(51) - 50);
        tokio::time::sleep(Duration::from_millis(load_ms)).await;
        server.kill9().await?;
        while let Some(acked) = writers.join_next().await {
            acked_total += acked.unwrap_or(0);
        }
        server = ChildServer::start_in(dir.path()).await?;
        startups.saturating_record(server.startup().as_micros() as u64);
        let verified = verify(&server, &known).await.with_context(|| {
            format!("cycle {} of {}: verification failed", cycle + 1, run.cycles)
        })?;
        verified_total += verified;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut report = Report::new("crash");
    report
        .param("cycles", run.cycles)
        .param("things", run.things)
        .param("writers", run.writers)
        .param("load_ms_max", run.load_ms_max)
        .number("cycles passed", run.cycles as f64, 0)
        .number("acknowledged changes", acked_total as f64, 0)
        .number(
            "acknowledged changes verified in the log",
            verified_total as f64,
            0,
        )
        .number("losses", (acked_total - verified_total) as f64, 0)
        .latencies("restart to listening", &startups);
    report.finish(report_dir)?;
    if verified_total != acked_total {
        bail!(
            "{} acknowledged changes were not verified",
            acked_total - verified_total
        );
    }
    Ok(())
}
