//! `shadow` and `echo`.
//!
//! `shadow`: N devices doing report -> `update/accepted` round trips (QoS 1, each acknowledged
//! only once durable); a share of the rounds are operator-side desired updates over HTTP that
//! the device must receive on `shadow/update`. Then the same devices do a raw publish -> echo
//! round trip through the same broker in the same run, so the ratio is the figure.
//!
//! `echo`: only the raw round trip, through any broker (`--broker HOST:PORT`, e.g. a mosquitto
//! on loopback), so thinghub's echo can be put beside another broker's.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::v4::Packet as RawPacket;
use tokio::sync::{Barrier, Semaphore};

use crate::cpu::{pid_listening_on, CpuUse, CpuWindow};
use crate::device::{Endpoint, RawDevice};

use crate::mqtt::{create_bench_user, BENCH_USER};
use crate::register::register_things;
use crate::report::{progress, Report, Timeline};
use crate::target::{Target, TargetArgs};

/// Device handshakes in flight while a phase connects (a burst beyond the listen backlog turns
/// into SYN retries seconds apart).
const CONNECTS_IN_FLIGHT: usize = 200;
/// How long a phase's devices may take to connect and subscribe.
const CONNECT_ALL_MAX: Duration = Duration::from_secs(180);

/// What `shadow` runs.
pub struct ShadowRun {
    /// Simulated devices (each a connection and a Thing).
    pub devices: usize,
    /// Seconds per phase.
    pub seconds: u64,
    /// Most round trips per second per device (0 = as fast as the round trips go).
    pub rate: f64,
    /// Share of rounds that are operator desired updates (0..=1).
    pub desired_share: f64,
    /// Another broker (e.g. mosquitto on loopback) whose raw echo runs as a third phase.
    pub baseline_broker: Option<SocketAddr>,
    /// Run the shadow phase again with a webhook receiving every record.
    pub webhook: bool,
    /// The baseline broker's pid (else found by its port).
    pub baseline_pid: Option<u32>,
    /// Also run the shadow phase over the MQTT over TLS listener.
    pub tls: bool,
}

pub(crate) struct PhaseResult {
    pub(crate) round_trips: u64,
    operator_rounds: u64,
    pub(crate) seconds: f64,
    pub(crate) latencies: Histogram<u64>,
    timeline: Timeline,
    /// CPU the broker and this load generator spent while the devices ran.
    pub(crate) cpu: CpuUse,
}

/// Where every device of a phase records its round trips: one histogram and one timeline per
/// phase (one per device cost ~100 KiB each per second of slices: gigabytes at 10k devices).
#[derive(Clone)]
struct Recorder(Arc<std::sync::Mutex<(Histogram<u64>, Timeline)>>);

impl Recorder {
    fn new(timeline: Timeline) -> Recorder {
        Recorder(Arc::new(std::sync::Mutex::new((
            crate::histogram(),
            timeline,
        ))))
    }

    fn record(&self, at: Instant, latency_us: u64) {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        guard.0.saturating_record(latency_us);
        guard.1.record(at, latency_us);
    }

    fn take(&self) -> (Histogram<u64>, Timeline) {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let timeline = guard.1.sibling();
        (
            std::mem::replace(&mut guard.0, crate::histogram()),
            std::mem::replace(&mut guard.1, timeline),
        )
    }
}

/// What one device does per round.
#[derive(Clone)]
pub(crate) enum Work {
    /// Shadow report (and, every `operator_every` rounds, an operator desired update).
    Shadow {
        thing: String,
        http: Option<(Arc<Target>, u64)>,
    },
    /// Raw echo on `topic`.
    Echo { topic: String },
}

/// One device: a raw MQTT 3.1.1 connection (rumqttc's codec, no client event loop, so ten
/// thousand of them cost the load generator little), connected and subscribed while holding a
/// `connecting` permit; waits at `start` for every other device, then does rounds until
/// `duration` has passed. A PUBACK the device owes goes out with its next request.
#[allow(clippy::too_many_arguments)]
async fn device(
    mqtt: Endpoint,
    credentials: Option<(String, String)>,
    index: usize,
    id: String,
    work: Work,
    rate: f64,
    connecting: Arc<Semaphore>,
    start: Arc<Barrier>,
    duration: Duration,
    recorder: Recorder,
) -> Result<(u64, u64)> {
    let filters: Vec<String> = match &work {
        Work::Shadow { thing, .. } => vec![
            format!("$emqx/things/{thing}/shadow/update/accepted"),
            format!("$emqx/things/{thing}/shadow/update"),
        ],
        Work::Echo { topic } => vec![topic.clone()],
    };
    let mut device = {
        let _permit = connecting.acquire().await?;
        RawDevice::connect_as(
            mqtt,
            index,
            id.clone(),
            filters,
            credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
        )
        .await
        .with_context(|| format!("device {id}"))?
    };
    // The clock starts when every device is connected and subscribed.
    start.wait().await;
    let began = Instant::now();
    let until = began + duration;
    let (mut count, mut operator_rounds) = (0u64, 0u64);
    let pace = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    // Paced devices are spread over the period (golden-ratio offsets), not all sent at once:
    // the server sees an even rate, not a burst per period.
    let offset = pace.map_or(Duration::ZERO, |pace| {
        pace.mul_f64((index as f64 * 0.618_033_988_75).fract())
    });
    tokio::time::sleep_until((began + offset).into()).await;
    let mut out = BytesMut::with_capacity(256);
    while Instant::now() < until {
        let token = format!("{id}-{count}");
        let sent = Instant::now();
        let reply_topic = match &work {
            Work::Shadow {
                thing,
                http: Some((target, every)),
            } if count % every == every - 1 => {
                // The operator changes desired over HTTP; the device must receive it.
                device.send(&mut out).await?;
                operator_rounds += 1;
                let response = target
                    .request(
                        reqwest::Method::POST,
                        &format!("/api/v1/things/{thing}/shadow"),
                    )
                    .json(&serde_json::json!({"state": {"desired": {"op": token}}}))
                    .send()
                    .await?;
                if !response.status().is_success() {
                    bail!("operator update of {thing}: {}", response.status());
                }
                format!("$emqx/things/{thing}/shadow/update")
            }
            Work::Shadow { thing, .. } => {
                let payload = format!(
                    r#"{{"state":{{"reported":{{"temperature":21.5,"n":{count}}}}},"clientToken":"{token}"}}"#
                );
                let topic = format!("$emqx/things/{thing}/shadow/update");
                device.publish_into(topic.clone(), payload.into_bytes(), &mut out)?;
                device.send(&mut out).await?;
                format!("{topic}/accepted")
            }
            Work::Echo { topic } => {
                device.publish_into(
                    topic.clone(),
                    format!(r#"{{"clientToken":"{token}"}}"#).into_bytes(),
                    &mut out,
                )?;
                device.send(&mut out).await?;
                topic.clone()
            }
        };
        loop {
            let packet = tokio::time::timeout(Duration::from_secs(30), device.next())
                .await
                .context("no reply within 30 s")??
                .with_context(|| format!("device {id}: the server closed the connection"))?;
            if let RawPacket::Publish(publish) = packet {
                RawDevice::ack_into(&publish, &mut out)?;
                if publish.topic == reply_topic && contains(&publish.payload, token.as_bytes()) {
                    break;
                }
            }
        }
        let now = Instant::now();
        let latency_us = now.duration_since(sent).as_micros() as u64;
        recorder.record(now, latency_us);
        count += 1;
        if let Some(pace) = pace {
            device.send(&mut out).await?;
            let next = began + offset + pace.mul_f64(count as f64);
            tokio::time::sleep_until(next.into()).await;
        }
    }
    device.send(&mut out).await?;
    Ok((count, operator_rounds))
}

/// The echo over MQTT 5 with server topic aliases: the device announces a Topic Alias Maximum
/// of `alias_max`, so every echo after the first comes back as an empty topic and an alias.
#[allow(clippy::too_many_arguments)]
async fn echo_device_v5(
    mqtt: SocketAddr,
    credentials: Option<(String, String)>,
    id: String,
    topic: String,
    alias_max: u16,
    start: Arc<Barrier>,
    duration: Duration,
    recorder: Recorder,
) -> Result<(u64, u64)> {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient, Event as E5, MqttOptions as O5};
    let mut options = O5::new(&id, mqtt.ip().to_string(), mqtt.port());
    if let Some((user, password)) = &credentials {
        options.set_credentials(user, password);
    }
    options.set_keep_alive(Duration::from_secs(60));
    options.set_topic_alias_max(Some(alias_max));
    // As for the 3.1.1 clients: without TCP_NODELAY every round trip waits out Nagle.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client.subscribe(&topic, Q5::AtLeastOnce).await?;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await??;
        if let E5::Incoming(P5::SubAck(_)) = event {
            break;
        }
    }
    start.wait().await;
    let began = Instant::now();
    let until = began + duration;
    let mut aliases: std::collections::HashMap<u16, bytes::Bytes> = Default::default();
    let mut count = 0u64;
    while Instant::now() < until {
        let token = format!("{id}-{count}");
        let sent = Instant::now();
        client
            .publish(
                &topic,
                Q5::AtLeastOnce,
                false,
                format!(r#"{{"clientToken":"{token}"}}"#),
            )
            .await?;
        loop {
            let event = tokio::time::timeout(Duration::from_secs(30), eventloop.poll())
                .await
                .context("no reply within 30 s")??;
            let E5::Incoming(P5::Publish(publish)) = event else {
                continue;
            };
            // rumqttc hands over aliased publishes unresolved: resolve them here.
            let alias = publish.properties.as_ref().and_then(|p| p.topic_alias);
            let name = match (publish.topic.is_empty(), alias) {
                (false, Some(alias)) => {
                    aliases.insert(alias, publish.topic.clone());
                    publish.topic.clone()
                }
                (true, Some(alias)) => aliases.get(&alias).cloned().unwrap_or_default(),
                _ => publish.topic.clone(),
            };
            if name == topic.as_bytes() && contains(&publish.payload, token.as_bytes()) {
                break;
            }
        }
        let now = Instant::now();
        let latency_us = now.duration_since(sent).as_micros() as u64;
        recorder.record(now, latency_us);
        count += 1;
    }
    let _ = client.disconnect().await;
    Ok((count, 0))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Runs one phase: `devices` devices doing `work(i)` for `seconds` (the echo over MQTT 5 with
/// server topic aliases when `v5_aliases` is set), measuring the CPU that `cpu_pid` (the
/// broker) and this process spend while the devices run.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn phase(
    mqtt: impl Into<Endpoint>,
    credentials: Option<(String, String)>,
    devices: usize,
    seconds: u64,
    rate: f64,
    label: &str,
    work: impl Fn(usize) -> Work,
    v5_aliases: Option<u16>,
    cpu_pid: Option<u32>,
) -> Result<PhaseResult> {
    let mqtt: Endpoint = mqtt.into();
    let start = Arc::new(Barrier::new(devices + 1));
    let connecting = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
    let duration = Duration::from_secs(seconds);
    let recorder = Recorder::new(Timeline::new(Duration::from_secs(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..devices {
        let id = format!("bench-{label}-{i}");
        match (work(i), v5_aliases) {
            (Work::Echo { topic }, Some(alias_max)) => tasks.spawn(echo_device_v5(
                mqtt.addr,
                credentials.clone(),
                id,
                topic,
                alias_max,
                start.clone(),
                duration,
                recorder.clone(),
            )),
            (work, _) => tasks.spawn(device(
                mqtt.clone(),
                credentials.clone(),
                i,
                id,
                work,
                rate,
                connecting.clone(),
                start.clone(),
                duration,
                recorder.clone(),
            )),
        };
    }
    all_connected(&start, &mut tasks).await?;
    let started = Instant::now();
    let cpu = CpuWindow::start(cpu_pid);
    let bar = progress(seconds, label);
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            for _ in 0..seconds {
                tokio::time::sleep(Duration::from_secs(1)).await;
                bar.inc(1);
            }
        })
    };
    let mut result = PhaseResult {
        round_trips: 0,
        operator_rounds: 0,
        seconds: 0.0,
        latencies: crate::histogram(),
        timeline: Timeline::new(Duration::from_secs(1)),
        cpu: CpuUse::default(),
    };
    while let Some(done) = tasks.join_next().await {
        let (count, operator) = done??;
        result.round_trips += count;
        result.operator_rounds += operator;
    }
    result.cpu = cpu.finish();
    ticker.abort();
    bar.finish_and_clear();
    result.seconds = started.elapsed().as_secs_f64();
    (result.latencies, result.timeline) = recorder.take();
    Ok(result)
}

/// Waits until every device of a phase is connected (at `start`), bounded: a device that
/// cannot connect fails its task and never reaches the barrier.
pub(crate) async fn all_connected<T: 'static>(
    start: &Barrier,
    tasks: &mut tokio::task::JoinSet<Result<T>>,
) -> Result<()> {
    tokio::select! {
        waited = tokio::time::timeout(CONNECT_ALL_MAX, start.wait()) => {
            waited.with_context(|| format!("devices did not all connect within {CONNECT_ALL_MAX:?}"))?;
        }
        Some(failed) = tasks.join_next() => {
            failed??;
            bail!("a device ended before the phase started");
        }
    }
    Ok(())
}

fn echo_work(i: usize) -> Work {
    Work::Echo {
        topic: format!("bench/echo/{i}"),
    }
}

/// Runs `shadow` (shadow phase, then echo phase through the same broker).
pub async fn run(
    target_args: &TargetArgs,
    run: ShadowRun,
    report_dir: Option<&Path>,
) -> Result<()> {
    if !(0.0..=1.0).contains(&run.desired_share) {
        bail!("--desired-share must be within 0..=1");
    }
    // A server this run starts inherits the limit too.
    crate::mqtt::raise_open_files_limit(run.devices);
    let target = Arc::new(Target::open(target_args).await?);
    create_bench_user(&target).await?;
    register_things(&target, run.devices, 0).await?;
    let bench = Some((BENCH_USER.0.to_owned(), BENCH_USER.1.to_owned()));
    let operator_every =
        (run.desired_share > 0.0).then(|| (1.0 / run.desired_share).round().max(1.0) as u64);
    let server_pid = target.server_pid();
    let shadow_phase = |endpoint: Endpoint, label: &'static str| {
        let target = target.clone();
        phase(
            endpoint,
            bench.clone(),
            run.devices,
            run.seconds,
            run.rate,
            label,
            move |i| Work::Shadow {
                thing: format!("bench-{i}"),
                http: operator_every.map(|every| (target.clone(), every)),
            },
            None,
            server_pid,
        )
    };
    let shadow = shadow_phase(target.mqtt.into(), "shadow").await?;
    let over_tls = if run.tls {
        Some(shadow_phase(target.endpoint(true)?, "shadow-tls").await?)
    } else {
        None
    };
    let echo = phase(
        target.mqtt,
        bench,
        run.devices,
        run.seconds,
        run.rate,
        "echo",
        echo_work,
        None,
        server_pid,
    )
    .await?;
    let baseline = match run.baseline_broker {
        Some(broker) if !broker.ip().is_loopback() => {
            bail!("{broker} is not a loopback address: load tests target 127.0.0.0/8 only")
        }
        Some(broker) => Some(
            phase(
                broker,
                None,
                run.devices,
                run.seconds,
                run.rate,
                "baseline",
                echo_work,
                None,
                run.baseline_pid.or_else(|| pid_listening_on(broker.port())),
            )
            .await?,
        ),
        None => None,
    };
    let with_webhook = if run.webhook {
        Some(webhook_phase(&target, &run, operator_every).await?)
    } else {
        None
    };
    let rate = |p: &PhaseResult| p.round_trips as f64 / p.seconds;
    let mut report = Report::new("shadow");
    report
        .param("devices", run.devices)
        .param("seconds", run.seconds)
        .param("rate_per_device", run.rate)
        .param("desired_share", run.desired_share)
        .number("durable shadow round trips/s", rate(&shadow), 0)
        .number(
            "  of which operator desired -> device",
            shadow.operator_rounds as f64 / shadow.seconds,
            0,
        )
        .latencies("shadow", &shadow.latencies)
        .number(
            "raw echo round trips/s (same broker, same run)",
            rate(&echo),
            0,
        )
        .latencies("echo", &echo.latencies)
        .number(
            "durable shadow / raw echo (ratio)",
            rate(&shadow) / rate(&echo).max(1e-9),
            2,
        )
        .number(
            "server RSS after, MiB",
            target.rss_bytes().await? as f64 / 1048576.0,
            1,
        );
    cpu_rows(&mut report, "shadow", &shadow);
    if let Some(over_tls) = &over_tls {
        report
            .number("durable shadow round trips/s over TLS", rate(over_tls), 0)
            .latencies("shadow over TLS", &over_tls.latencies)
            .number(
                "over TLS / over TCP (ratio)",
                rate(over_tls) / rate(&shadow).max(1e-9),
                2,
            );
        cpu_rows(&mut report, "shadow over TLS", over_tls);
    }
    cpu_rows(&mut report, "echo", &echo);
    if let (Some(baseline), Some(broker)) = (&baseline, run.baseline_broker) {
        report
            .param("baseline_broker", broker)
            .number("baseline broker raw echo round trips/s", rate(baseline), 0)
            .latencies("baseline echo", &baseline.latencies)
            .number(
                "durable shadow / baseline echo (ratio)",
                rate(&shadow) / rate(baseline).max(1e-9),
                2,
            )
            .number(
                "thinghub echo / baseline echo (ratio)",
                rate(&echo) / rate(baseline).max(1e-9),
                2,
            );
        cpu_rows(&mut report, "baseline echo", baseline);
        if let (Some(ours), Some(theirs)) = (
            shadow.cpu.server_us_per(shadow.round_trips),
            baseline.cpu.server_us_per(baseline.round_trips),
        ) {
            report.number(
                "server CPU: durable shadow / baseline echo, per round trip (ratio)",
                ours / theirs.max(1e-9),
                2,
            );
        }
    }
    if let Some(webhook) = &with_webhook {
        report
            .param("webhook", "every kind, batchMax = webhook_batch_max")
            .number(
                "durable shadow round trips/s with the webhook",
                rate(&webhook.shadow),
                0,
            )
            .latencies("shadow with the webhook", &webhook.shadow.latencies)
            .number(
                "with / without the webhook (ratio)",
                rate(&webhook.shadow) / rate(&shadow).max(1e-9),
                2,
            )
            .number(
                "webhook records/s during the phase",
                webhook.records_in_phase as f64 / webhook.shadow.seconds,
                0,
            )
            .number(
                "webhook records/s, phase and catch-up",
                webhook.records as f64 / (webhook.shadow.seconds + webhook.catch_up_s),
                0,
            )
            .number("webhook catch-up after the phase, s", webhook.catch_up_s, 1)
            .latencies("webhook lag (arrival - record time)", &webhook.lag);
    }
    report.latency_over_time = shadow.timeline.slices();
    report.finish(report_dir)
}

/// The CPU rows of a phase: the broker's CPU per round trip and the cores it and this load
/// generator kept busy (a load generator near its cores' limit is the bottleneck, not the
/// broker). Absent when the broker's pid is unknown.
fn cpu_rows(report: &mut Report, what: &str, phase: &PhaseResult) {
    if let Some(us) = phase.cpu.server_us_per(phase.round_trips) {
        report.number(&format!("{what}: server CPU per round trip, µs"), us, 1);
    }
    if let Some(cores) = phase.cpu.server_cores() {
        report.number(&format!("{what}: server cores busy"), cores, 2);
    }
    if let Some(cores) = phase.cpu.own_cores() {
        report.number(&format!("{what}: load generator cores busy"), cores, 2);
    }
}

/// What the phase with a webhook measured.
struct WebhookPhase {
    shadow: PhaseResult,
    records_in_phase: u64,
    records: u64,
    catch_up_s: f64,
    lag: Histogram<u64>,
}

/// Longest the webhook may take to catch up after its phase.
const WEBHOOK_CATCH_UP_MAX: Duration = Duration::from_secs(300);

/// Creates a webhook for every record, runs the shadow phase again, then waits (bounded) for
/// the webhook to receive everything committed.
async fn webhook_phase(
    target: &Arc<Target>,
    run: &ShadowRun,
    operator_every: Option<u64>,
) -> Result<WebhookPhase> {
    let receiver = crate::webhook::Receiver::start().await?;
    let response = target
        .request(reqwest::Method::POST, "/api/v1/webhooks")
        .json(&serde_json::json!({"url": receiver.url}))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("creating the webhook: {}", response.status());
    }
    let created: serde_json::Value = response.json().await?;
    let id = created["id"].as_str().context("webhook id")?.to_owned();
    let shadow = {
        let pid = target.server_pid();
        let target = target.clone();
        phase(
            target.mqtt,
            Some((BENCH_USER.0.to_owned(), BENCH_USER.1.to_owned())),
            run.devices,
            run.seconds,
            run.rate,
            "shadow + webhook",
            move |i| Work::Shadow {
                thing: format!("bench-{i}"),
                http: operator_every.map(|every| (target.clone(), every)),
            },
            None,
            pid,
        )
        .await?
    };
    let records_in_phase = receiver.records();
    let ended = Instant::now();
    loop {
        let status: serde_json::Value = target
            .request(reqwest::Method::GET, &format!("/api/v1/webhooks/{id}"))
            .send()
            .await?
            .json()
            .await?;
        if status["status"]["lagEntries"].as_u64() == Some(0) {
            break;
        }
        if ended.elapsed() > WEBHOOK_CATCH_UP_MAX {
            bail!("the webhook did not catch up within {WEBHOOK_CATCH_UP_MAX:?}: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let catch_up_s = ended.elapsed().as_secs_f64();
    let (records, lag) = receiver.snapshot();
    Ok(WebhookPhase {
        shadow,
        records_in_phase,
        records,
        catch_up_s,
        lag,
    })
}

/// Runs `echo` against thinghub (the target) or any broker (`broker`).
pub async fn run_echo(
    target_args: &TargetArgs,
    broker: Option<SocketAddr>,
    devices: usize,
    seconds: u64,
    v5_aliases: Option<u16>,
    report_dir: Option<&Path>,
) -> Result<()> {
    crate::mqtt::raise_open_files_limit(devices);
    let mut report = Report::new("echo");
    if let Some(alias_max) = v5_aliases {
        report.param("mqtt", format!("5.0, Topic Alias Maximum {alias_max}"));
    }
    let (mqtt, credentials, pid, _target) = match broker {
        Some(broker) => {
            if !broker.ip().is_loopback() {
                bail!("{broker} is not a loopback address: load tests target 127.0.0.0/8 only");
            }
            report.param("broker", broker);
            (broker, None, pid_listening_on(broker.port()), None)
        }
        None => {
            let target = Target::open(target_args).await?;
            create_bench_user(&target).await?;
            report.param("broker", format!("thinghub {}", target.mqtt));
            let credentials = Some((BENCH_USER.0.to_owned(), BENCH_USER.1.to_owned()));
            (target.mqtt, credentials, target.server_pid(), Some(target))
        }
    };
    let echo = phase(
        mqtt,
        credentials,
        devices,
        seconds,
        0.0,
        "echo",
        echo_work,
        v5_aliases,
        pid,
    )
    .await?;
    report
        .param("devices", devices)
        .param("seconds", seconds)
        .number(
            "raw echo round trips/s (QoS 1)",
            echo.round_trips as f64 / echo.seconds,
            0,
        )
        .latencies("echo", &echo.latencies);
    cpu_rows(&mut report, "echo", &echo);
    report.latency_over_time = echo.timeline.slices();
    report.finish(report_dir)
}
