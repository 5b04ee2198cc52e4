//! The MQTT broker benchmark: idle connections (RSS per connection, with its session) and QoS 1
//! publishers feeding one subscriber (msgs/s, latency), against a thinghub in its own process.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Source addresses idle connections are spread over (each has its own ephemeral port range).
const SOURCE_ADDRESSES: u8 = 8;
/// Admin credentials of a server this benchmark starts itself.
pub const ADMIN: (&str, &str) = ("bench", "bench-secret");
/// The benchmark's MQTT superuser.
pub const BENCH_USER: (&str, &str) = ("bench-user", "bench-pw");
/// Where a started server finds the certificates of its MQTT over TLS listener.
pub const TLS_DIR_ENV: &str = "THINGHUB_LOADTEST_TLS_DIR";

/// What to run.
pub struct MqttRun {
    /// Idle connections to hold open.
    pub idle_connections: usize,
    /// Publishing clients.
    pub publishers: usize,
    /// Seconds of publishing.
    pub seconds: u64,
    /// QoS 1 messages in flight per publisher.
    pub inflight: u16,
}

/// A thinghub started for the run (killed on drop).
pub struct ChildServer {
    child: tokio::process::Child,
    /// HTTP address.
    pub http: SocketAddr,
    /// MQTT address.
    pub mqtt: SocketAddr,
    /// MQTT over TLS address, and the CA (PEM) its certificate chains to.
    pub mqtt_tls: Option<(SocketAddr, std::path::PathBuf)>,
    data_dir: std::path::PathBuf,
    _temp: Option<tempfile::TempDir>,
    _certs: Option<tempfile::TempDir>,
    startup: Duration,
}

impl ChildServer {
    /// Its process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Starts `thinghub-loadtest server` (the real server code) with a temporary data dir.
    pub async fn start() -> Result<ChildServer> {
        let temp = tempfile::tempdir()?;
        let mut server = ChildServer::start_in(temp.path()).await?;
        server._temp = Some(temp);
        Ok(server)
    }

    /// Starts a server on `data_dir` (kept after the run).
    pub async fn start_in(data_dir: &std::path::Path) -> Result<ChildServer> {
        use tokio::io::AsyncBufReadExt;
        // A TLS listener too, for the scenarios' `--tls` (idle unless used).
        let certs = tempfile::tempdir()?;
        thinghub::tls::init_certificates(
            certs.path(),
            &["localhost".to_owned(), "127.0.0.1".to_owned()],
            "device-1",
        )
        .map_err(|e| anyhow::anyhow!("certificates for the TLS listener: {e}"))?;
        let started = Instant::now();
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("server")
            .arg(data_dir)
            .env(TLS_DIR_ENV, certs.path())
            .env("THINGHUB_ADMIN_KEY", format!("{}:{}", ADMIN.0, ADMIN.1))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("start the server process")?;
        let stderr = child.stderr.take().context("server stderr")?;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let listening = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if value["fields"]["message"] == "listening" {
                    return Ok::<_, anyhow::Error>(value);
                }
            }
            bail!("the server exited before listening")
        })
        .await
        .context("the server did not start within 30 s")??;
        let startup = started.elapsed();
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let addr = |key: &str| -> Result<SocketAddr> {
            Ok(listening["fields"][key]
                .as_str()
                .context("address")?
                .parse()?)
        };
        Ok(ChildServer {
            http: addr("http")?,
            mqtt: addr("mqtt")?,
            mqtt_tls: Some((addr("mqtt_tls")?, certs.path().join("ca.pem"))),
            child,
            data_dir: data_dir.to_owned(),
            _temp: None,
            _certs: Some(certs),
            startup,
        })
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// How long it took from spawning to its listening line.
    pub fn startup(&self) -> Duration {
        self.startup
    }

    /// SIGKILL, then reap: no shutdown code runs in the server.
    pub async fn kill9(mut self) -> Result<()> {
        self.child.start_kill().context("kill -9")?;
        self.child.wait().await.context("reap")?;
        Ok(())
    }
}

/// Creates the benchmark's MQTT superuser (409 = it exists already: fine).
pub async fn create_bench_user(target: &crate::target::Target) -> Result<()> {
    let response = target
        .request(reqwest::Method::POST, "/api/v1/authentication/users")
        .json(&serde_json::json!({"username": BENCH_USER.0, "password": BENCH_USER.1, "superuser": true}))
        .send()
        .await?;
    if !response.status().is_success() && response.status() != reqwest::StatusCode::CONFLICT {
        bail!("creating the benchmark user failed: {}", response.status());
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

/// An idle 3.1.1 client: CONNECT (keep-alive 0, persistent session) + one QoS 1 subscription.
async fn idle_connection(
    server: crate::device::Endpoint,
    index: usize,
) -> Result<(crate::device::Reader, crate::device::Writer)> {
    let (mut reader, mut writer) = server.open(index).await?;
    let client_id = format!("idle-{index}");
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0b1100_0000, 0, 0];
    put_str(&mut body, &client_id);
    put_str(&mut body, BENCH_USER.0);
    put_str(&mut body, BENCH_USER.1);
    let mut packet = vec![0x10];
    put_remaining_length(&mut packet, body.len());
    packet.extend_from_slice(&body);
    let mut sub_body = vec![0, 1];
    put_str(&mut sub_body, &format!("idle/{index}/inbox"));
    sub_body.push(1);
    packet.push(0x82);
    put_remaining_length(&mut packet, sub_body.len());
    packet.extend_from_slice(&sub_body);
    writer.write_all(&packet).await?;
    // CONNACK (4 bytes) + SUBACK (5 bytes).
    let mut acks = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(30), reader.read_exact(&mut acks)).await??;
    if acks[3] != 0 || acks[4] != 0x90 || acks[8] != 1 {
        bail!("idle connection {index} refused: {acks:?}");
    }
    Ok((reader, writer))
}

fn open_files_max() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(1024)
}

/// A client with TCP_NODELAY: rumqttc leaves Nagle on by default, which puts a ~40 ms floor
/// under every request/reply round trip (measured: p50 44 ms for both shadow and echo).
pub fn client(options: MqttOptions, capacity: usize) -> (AsyncClient, rumqttc::EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// Runs the benchmark and prints its table.
pub async fn run(
    target_args: &crate::target::TargetArgs,
    run: MqttRun,
    report_dir: Option<&std::path::Path>,
) -> Result<()> {
    raise_open_files_limit(run.idle_connections);
    let server = crate::target::Target::open(target_args).await?;
    create_bench_user(&server).await?;
    let limit = open_files_max().saturating_sub(200);
    if run.idle_connections > limit {
        bail!(
            "--idle-connections {} exceeds this process's open-file limit ({limit} usable)",
            run.idle_connections
        );
    }
    // Warm up: the first CONNECT runs argon2 (~19 MiB the allocator keeps afterwards), which
    // is not a per-connection cost.
    drop(idle_connection(server.mqtt.into(), usize::MAX / 2).await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = server.rss_bytes().await?;
    let started = Instant::now();
    let mut idle = Vec::with_capacity(run.idle_connections);
    let mut pending = tokio::task::JoinSet::new();
    for index in 0..run.idle_connections {
        pending.spawn(idle_connection(server.mqtt.into(), index));
        if pending.len() >= 200 {
            if let Some(joined) = pending.join_next().await {
                idle.push(joined??);
            }
        }
    }
    while let Some(joined) = pending.join_next().await {
        idle.push(joined??);
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = server.rss_bytes().await?;

    // Throughput: publishers -> one subscriber, QoS 1, payload carries the send time.
    let epoch = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (sub_client, mut sub_loop) = client(options(server.mqtt, "bench-sub", 1000), 10_000);
    sub_client.subscribe("bench/#", QoS::AtLeastOnce).await?;
    let latencies = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut histogram =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            loop {
                match sub_loop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        if let Ok(bytes) =
                            <[u8; 8]>::try_from(&publish.payload[..8.min(publish.payload.len())])
                        {
                            let sent_us = u64::from_be_bytes(bytes);
                            let now_us = epoch.elapsed().as_micros() as u64;
                            histogram.saturating_record(now_us.saturating_sub(sent_us));
                        }
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::Disconnect)) | Err(_) => return histogram,
                    Ok(_) => {}
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut publishers = Vec::new();
    for p in 0..run.publishers {
        // A request channel no deeper than the window: publish() then waits for the broker, so
        // the timestamp measures the broker, not a queue inside the client.
        let window = usize::from(run.inflight.max(1));
        let (client, mut eventloop) = client(
            options(server.mqtt, &format!("bench-pub-{p}"), run.inflight),
            window,
        );
        let stop = stop.clone();
        tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        publishers.push(tokio::spawn(async move {
            let topic = format!("bench/{p}");
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut payload = (epoch.elapsed().as_micros() as u64).to_be_bytes().to_vec();
                payload.extend_from_slice(&[0u8; 56]);
                if client
                    .publish(&topic, QoS::AtLeastOnce, false, Bytes::from(payload))
                    .await
                    .is_err()
                {
                    break;
                }
                sent += 1;
            }
            sent
        }));
    }
    let window_start = received.load(Ordering::Relaxed);
    let measured_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(run.seconds)).await;
    let window_received = received.load(Ordering::Relaxed) - window_start;
    let window_seconds = measured_from.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for publisher in publishers {
        sent += publisher.await.unwrap_or(0);
    }
    sub_client.disconnect().await.ok();
    let histogram = tokio::time::timeout(Duration::from_secs(10), latencies)
        .await
        .ok()
        .and_then(|h| h.ok());
    drop(idle);

    let per_idle =
        (rss_idle.saturating_sub(rss_before)) as f64 / run.idle_connections.max(1) as f64;
    let ms = |q: f64| {
        histogram
            .as_ref()
            .map(|h| h.value_at_quantile(q) as f64 / 1000.0)
            .unwrap_or(f64::NAN)
    };
    let mut report = crate::report::Report::new("mqtt");
    report
        .param("idle_connections", run.idle_connections)
        .param("source_addresses", SOURCE_ADDRESSES)
        .param("publishers", run.publishers)
        .param("seconds", run.seconds)
        .number(
            "idle connections opened/s (CONNECT+SUBSCRIBE)",
            run.idle_connections as f64 / connect_seconds,
            0,
        )
        .number("server RSS per idle connection, bytes", per_idle, 0)
        .number(
            "server RSS before idle, MiB",
            rss_before as f64 / 1048576.0,
            1,
        )
        .number("server RSS with idle, MiB", rss_idle as f64 / 1048576.0, 1)
        .number(
            "QoS 1 messages/s delivered to the subscriber",
            window_received as f64 / window_seconds,
            0,
        )
        .number("messages published (total)", sent as f64, 0)
        .number("publish -> receive p50 ms", ms(0.5), 2)
        .number("publish -> receive p99 ms", ms(0.99), 2)
        .number(
            "server RSS after the run, MiB",
            server.rss_bytes().await? as f64 / 1048576.0,
            1,
        );
    report.finish(report_dir)
}

/// Raises this process's soft open-file limit toward the hard one (a server this run starts
/// inherits it); says so when the hard limit is below what `connections` needs.
pub fn raise_open_files_limit(connections: usize) {
    let wanted = connections as u64 + 1024;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(got) if got < wanted => tracing::warn!(
            hard_limit = got,
            "the hard open-file limit caps this run at about {} connections",
            got.saturating_sub(1024)
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// Runs `connect`: `devices` idle MQTT connections (CONNECT + one subscription each) at up to
/// `rate` connects/s, spread over 127.0.0.x source addresses.
pub async fn run_connect(
    target_args: &crate::target::TargetArgs,
    devices: usize,
    rate: f64,
    tls: bool,
    report_dir: Option<&std::path::Path>,
) -> Result<()> {
    raise_open_files_limit(devices);
    let server = crate::target::Target::open(target_args).await?;
    create_bench_user(&server).await?;
    let limit = open_files_max().saturating_sub(200);
    if devices > limit {
        bail!("--devices {devices} exceeds this process's open-file limit ({limit} usable)");
    }
    let endpoint = server.endpoint(tls)?;
    // Warm up the credential cache (the first CONNECT runs argon2).
    drop(idle_connection(endpoint.clone(), usize::MAX / 2).await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = server.rss_bytes().await?;
    let bar = crate::report::progress(devices as u64, "connecting");
    let started = Instant::now();
    let mut open = Vec::with_capacity(devices);
    let mut failures: Vec<String> = Vec::new();
    let mut pending = tokio::task::JoinSet::new();
    let mut latencies = crate::histogram();
    for index in 0..devices {
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(index as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let endpoint = endpoint.clone();
        pending.spawn(async move {
            let began = Instant::now();
            (idle_connection(endpoint, index).await, began.elapsed())
        });
        // At most 200 handshakes in flight; after the last spawn, wait for all of them.
        let in_flight_max = if index + 1 == devices { 0 } else { 200 };
        while pending.len() > in_flight_max {
            let Some(joined) = pending.join_next().await else {
                break;
            };
            let (result, took) = joined?;
            bar.inc(1);
            match result {
                Ok(stream) => {
                    latencies.saturating_record(took.as_micros() as u64);
                    open.push(stream);
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics = server.metrics().await?;
    let rss_after = metrics["process"]["rssBytes"].as_u64().unwrap_or(0);
    let mut report = crate::report::Report::new("connect");
    report
        .param("devices", devices)
        .param("rate", rate)
        .param("transport", endpoint.transport())
        .param("source_addresses", SOURCE_ADDRESSES)
        .number("connected", open.len() as f64, 0)
        .number("failures", failures.len() as f64, 0)
        .number(
            "connects/s (CONNECT+SUBACK)",
            open.len() as f64 / seconds,
            0,
        )
        .latencies("connect", &latencies)
        .number(
            "server connections (metrics)",
            metrics["mqtt"]["connections"].as_f64().unwrap_or(0.0),
            0,
        )
        .number(
            "server RSS per connection, bytes",
            rss_after.saturating_sub(rss_before) as f64 / open.len().max(1) as f64,
            0,
        )
        .number("server RSS after, MiB", rss_after as f64 / 1048576.0, 1);
    if let Some(first) = failures.first() {
        report.text("first failure", first);
    }
    drop(open);
    report.finish(report_dir)
}

fn options(server: SocketAddr, id: &str, inflight: u16) -> MqttOptions {
    let mut options = MqttOptions::new(id, server.ip().to_string(), server.port());
    options.set_credentials(BENCH_USER.0, BENCH_USER.1);
    options.set_keep_alive(Duration::from_secs(60));
    options.set_inflight(inflight.max(1));
    options
}
