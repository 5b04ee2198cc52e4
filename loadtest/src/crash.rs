//! `crash`: start thinghub on a data dir, load it with desired changes and commands, `kill -9` it
//! at a random moment, restart it on the same dir and verify that every acknowledged change is
//! in the log with the value that was acknowledged, that no shadow version was reused or
//! skipped, and that every acknowledged change reached its device: each Thing has a device
//! (MQTT, persistent session, subscribed once in the first cycle) that must receive a delta of
//! at least every acknowledged desired version and the request of every acknowledged command,
//! across the kills. Repeat. Exits non-zero on any loss.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

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

/// Every this many operations a writer sends a command instead of a desired change.
const COMMAND_EVERY: u64 = 4;
/// Longest wait for the devices to receive what was acknowledged, after a restart.
const EFFECTS_WAIT: Duration = Duration::from_secs(60);
const DEVICE_PASSWORD: &str = "crash-device-pw";

/// What the verifier knows of one Thing.
#[derive(Default)]
struct Known {
    /// Acknowledged versions not verified yet, with their values.
    acked: HashMap<u64, String>,
    /// Highest desired version acknowledged (its device must get a delta of at least it).
    desired_acked: u64,
    /// Acknowledged commands whose request the device has not been seen to receive.
    commands_owed: std::collections::HashSet<String>,
    /// Commands acknowledged in total.
    commands_acked: u64,
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
        if k % COMMAND_EVERY == COMMAND_EVERY - 1 {
            let response = client
                .post(format!(
                    "http://{server}/api/v1/things/crash-{thing}/commands"
                ))
                .basic_auth(ADMIN.0, Some(ADMIN.1))
                .json(&serde_json::json!({"action": "crash-test", "ttl": 86_400}))
                .send()
                .await;
            let Ok(response) = response else { return acked };
            if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
                continue; // the Thing's pending-command bound: not acknowledged, go on
            }
            if !response.status().is_success() {
                return acked;
            }
            let Ok(body) = response.json::<serde_json::Value>().await else {
                return acked;
            };
            let Some(id) = body["executionId"].as_str() else {
                return acked;
            };
            let mut known = known[thing].lock().unwrap_or_else(|p| p.into_inner());
            known.commands_owed.insert(id.to_owned());
            known.commands_acked += 1;
            acked += 1;
            continue;
        }
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
        let mut known = known[thing].lock().unwrap_or_else(|p| p.into_inner());
        known.acked.insert(version, value);
        known.desired_acked = known.desired_acked.max(version);
        acked += 1;
    }
    acked
}

/// What one Thing's device has received (across every cycle).
#[derive(Default)]
struct Received {
    /// Highest delta version.
    delta_version: u64,
    /// Command requests (execution ids).
    requests: std::collections::HashSet<String>,
    /// Publications received in total (duplicates included).
    publishes: u64,
}

/// Connects the device of Thing `thing` (persistent session; it subscribes only when `first`)
/// and records what it receives until the connection ends. Returns once connected (and
/// subscribed).
async fn device(
    mqtt: std::net::SocketAddr,
    thing: usize,
    first: bool,
    received: Arc<Vec<Mutex<Received>>>,
) -> Result<tokio::task::JoinHandle<()>> {
    let name = format!("crash-{thing}");
    let mut options = MqttOptions::new(&name, mqtt.ip().to_string(), mqtt.port());
    options.set_credentials(&name, DEVICE_PASSWORD);
    options.set_clean_session(false);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(64);
    let (client, mut events) = AsyncClient::new(options, 256);
    let wait = Duration::from_secs(10);
    let present = loop {
        match tokio::time::timeout(wait, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => break ack.session_present,
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => bail!("{name}: connect: {e}"),
            Err(_) => bail!("{name}: no CONNACK within {wait:?}"),
        }
    };
    if first {
        for filter in [
            format!("$emqx/things/{name}/shadow/update/delta"),
            format!("$emqx/commands/things/{name}/executions/+/request"),
        ] {
            client.subscribe(filter, QoS::AtLeastOnce).await?;
        }
        let mut acks = 0;
        while acks < 2 {
            match tokio::time::timeout(wait, events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => acks += 1,
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => bail!("{name}: subscribe: {e}"),
                Err(_) => bail!("{name}: no SUBACK within {wait:?}"),
            }
        }
    } else if !present {
        bail!("{name}: the persistent session was not present after the restart");
    }
    Ok(tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            let Event::Incoming(Packet::Publish(publish)) = event else {
                continue;
            };
            let mut received = received[thing].lock().unwrap_or_else(|p| p.into_inner());
            received.publishes += 1;
            if publish.topic.ends_with("/shadow/update/delta") {
                let version = serde_json::from_slice::<serde_json::Value>(&publish.payload)
                    .ok()
                    .and_then(|v| v["version"].as_u64())
                    .unwrap_or(0);
                received.delta_version = received.delta_version.max(version);
            } else if let Some(id) = publish
                .topic
                .strip_suffix("/request")
                .and_then(|t| t.rsplit('/').next())
            {
                received.requests.insert(id.to_owned());
                // Answer, as a device does (a repeat is refused and recorded: harmless). Not
                // awaited: this task is the one that drives the client's event loop.
                let topic = format!("{}/response", publish.topic.trim_end_matches("/request"));
                let _ =
                    client.try_publish(topic, QoS::AtLeastOnce, false, r#"{"status":"SUCCEEDED"}"#);
            }
        }
    }))
}

/// Connects every device.
async fn devices(
    mqtt: std::net::SocketAddr,
    things: usize,
    first: bool,
    received: &Arc<Vec<Mutex<Received>>>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::with_capacity(things);
    for thing in 0..things {
        tasks.push(device(mqtt, thing, first, received.clone()).await?);
    }
    Ok(tasks)
}

/// Waits (bounded) until every device has what was acknowledged for its Thing: a delta of at
/// least the highest acknowledged desired version, and every acknowledged command's request.
/// Returns the commands verified.
async fn verify_effects(known: &[Mutex<Known>], received: &[Mutex<Received>]) -> Result<u64> {
    let deadline = tokio::time::Instant::now() + EFFECTS_WAIT;
    loop {
        let mut missing = Vec::new();
        for (thing, (known, received)) in known.iter().zip(received).enumerate() {
            let known = known.lock().unwrap_or_else(|p| p.into_inner());
            let received = received.lock().unwrap_or_else(|p| p.into_inner());
            if received.delta_version < known.desired_acked {
                missing.push(format!(
                    "crash-{thing}: desired version {} acknowledged, device has delta version {}",
                    known.desired_acked, received.delta_version
                ));
            }
            let owed = known
                .commands_owed
                .iter()
                .filter(|id| !received.requests.contains(*id))
                .count();
            if owed > 0 {
                missing.push(format!(
                    "crash-{thing}: {owed} acknowledged command requests not received"
                ));
            }
        }
        if missing.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "LOST EFFECTS after {EFFECTS_WAIT:?}: {}",
                missing.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut verified = 0;
    for known in known {
        let mut known = known.lock().unwrap_or_else(|p| p.into_inner());
        verified += known.commands_owed.len() as u64;
        known.commands_owed.clear();
    }
    Ok(verified)
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
    let mut commands_verified = 0u64;
    let received: Arc<Vec<Mutex<Received>>> =
        Arc::new((0..run.things).map(|_| Mutex::default()).collect());
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
        let response = client
            .post(format!("http://{}/api/v1/authentication/users", server.http))
            .basic_auth(ADMIN.0, Some(ADMIN.1))
            .json(&serde_json::json!({"username": format!("crash-{thing}"), "password": DEVICE_PASSWORD}))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("create the user of crash-{thing}: {}", response.status());
        }
    }
    let mut device_tasks = devices(server.mqtt, run.things, true, &received).await?;
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
        for task in device_tasks.drain(..) {
            let _ = task.await;
        }
        server = ChildServer::start_in(dir.path()).await?;
        startups.saturating_record(server.startup().as_micros() as u64);
        let failed = || format!("cycle {} of {}: verification failed", cycle + 1, run.cycles);
        let verified = verify(&server, &known).await.with_context(failed)?;
        verified_total += verified;
        device_tasks = devices(server.mqtt, run.things, false, &received)
            .await
            .with_context(failed)?;
        commands_verified += verify_effects(&known, &received)
            .await
            .with_context(failed)?;
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
        .number(
            "losses",
            (acked_total - verified_total - commands_verified) as f64,
            0,
        )
        .number(
            "acknowledged commands whose request reached the device",
            commands_verified as f64,
            0,
        )
        .number(
            "device publications received (duplicates included)",
            received
                .iter()
                .map(|r| r.lock().unwrap_or_else(|p| p.into_inner()).publishes)
                .sum::<u64>() as f64,
            0,
        )
        .latencies("restart to listening", &startups);
    report.finish(report_dir)?;
    if verified_total + commands_verified != acked_total {
        bail!(
            "{} acknowledged changes were not verified",
            acked_total - verified_total - commands_verified
        );
    }
    Ok(())
}
