//! `thinghub-loadtest`: benchmarks and load scenarios for thinghub.
//!
//! In-process scenarios (they drive the storage and actor crates directly):
//! - `commit`: group-commit throughput, durable appends/s with 1, 100 and 1,000 writers.
//! - `actors`: Things registered, active and passivated: activations/s, updates/s, RSS per
//!   active and per passivated Thing, replay time after a restart.
//!
//! Over the network (a thinghub it starts in its own process):
//! - `mqtt`: idle connections (server RSS per connection) and QoS 1 publishers feeding one
//!   subscriber (messages/s, publish-to-receive latency).
//! - `shadow`: devices doing durable shadow update round trips, beside a raw echo.
//! - `commands`, `jobs`: command fan-out and one fleet-wide job run by connected devices.
//!
//! Every scenario is bounded by count and time and prints a table on stdout.

#![allow(clippy::print_stdout)] // a command-line report is this program's output

mod commands;
mod cpu;
mod crash;
mod cumulocity;
mod device;
mod jobs;
mod mqtt;
mod register;
mod report;
mod shadow;
mod target;
mod webhook;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use thinghub_actors::clock::SystemClock;
use thinghub_actors::thing::{
    Limits, Origin, RegisterThing, ShadowLimits, ShadowUpdate, ThingCommand,
};
use thinghub_actors::{Registry, RegistryConfig, Request, ThingContext};
use thinghub_storage::{AppendBatch, Envelope, Store, StoreConfig};

/// mimalloc: glibc malloc's arena contention was a third of CPU under load (perf), and it
/// holds freed memory back from the OS.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "thinghub-loadtest",
    about = "Benchmarks and load scenarios for thinghub"
)]
struct Cli {
    /// Also write report.json, report.md and latency.svg to this directory.
    #[arg(long, global = true)]
    report: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

/// `10`, `10s`, `2m` or `500ms`.
fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration '{text}': expected e.g. 10s, 2m, 500ms"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("invalid duration unit in '{text}': use ms, s or m")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Durable appends/s through the group commit, per number of concurrent writers.
    Commit {
        /// Comma-separated writer counts.
        #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
        writers: Vec<usize>,
        /// Seconds per writer count.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Payload bytes per event.
        #[arg(long, default_value_t = 200)]
        event_bytes: usize,
        /// Data directory (default: a temporary one, removed afterwards).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Thing actors at scale: registration, activation, updates, passivation, replay.
    Actors {
        /// Things registered.
        #[arg(long, default_value_t = 100_000)]
        things: usize,
        /// Things made active at once (≤ things).
        #[arg(long, default_value_t = 100_000)]
        active: usize,
        /// Shadow updates spread over the active Things.
        #[arg(long, default_value_t = 200_000)]
        updates: usize,
        /// Requests in flight.
        #[arg(long, default_value_t = 1000)]
        concurrency: usize,
        /// Upper bound on the whole run, seconds.
        #[arg(long, default_value_t = 600)]
        max_seconds: u64,
        /// sled's page cache, bytes (the server's `storage_cache_bytes`; default: its default).
        #[arg(long)]
        storage_cache_bytes: Option<u64>,
        /// Data directory (default: a temporary one, removed afterwards).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// The MQTT broker: idle connections and QoS 1 throughput against a thinghub it starts.
    Mqtt {
        /// Idle connections held open (each with a persistent session and one subscription).
        #[arg(long, default_value_t = 10_000)]
        idle_connections: usize,
        /// QoS 1 publishing clients.
        #[arg(long, default_value_t = 4)]
        publishers: usize,
        /// Seconds of publishing.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// QoS 1 messages in flight per publisher.
        #[arg(long, default_value_t = 100)]
        inflight: u16,
        #[command(flatten)]
        target: target::TargetArgs,
    },
    /// Register Things through the streaming bulk endpoint; Things/s, server RSS and disk after.
    Register {
        /// Things to register (`bench-0` ...).
        #[arg(long, default_value_t = 100_000)]
        things: usize,
        /// How many of them also get MQTT credentials (argon2id each: slow by design).
        #[arg(long, default_value_t = 0)]
        credentials: usize,
        #[command(flatten)]
        target: target::TargetArgs,
    },
    /// Idle MQTT connections over several 127.0.0.x sources: connect rate, failures, RSS each.
    Connect {
        /// Connections.
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Connects per second (0 = as fast as 200 handshakes in flight allow).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Over the MQTT over TLS listener of the server this run starts.
        #[arg(long)]
        tls: bool,
        #[command(flatten)]
        target: target::TargetArgs,
    },
    /// Raw publish -> echo -> reply round trips (QoS 1) through thinghub or any broker.
    Echo {
        /// Simulated devices.
        #[arg(long, default_value_t = 200)]
        devices: usize,
        /// How long.
        #[arg(long, alias = "seconds", value_parser = parse_duration, default_value = "10s")]
        duration: Duration,
        /// Any MQTT broker on loopback (e.g. mosquitto); without it, thinghub.
        #[arg(long)]
        broker: Option<std::net::SocketAddr>,
        /// Echo over MQTT 5, each device announcing this Topic Alias Maximum (the broker then
        /// sends every echo after the first as an empty topic and an alias).
        #[arg(long)]
        v5_topic_alias_max: Option<u16>,
        #[command(flatten)]
        target: target::TargetArgs,
    },
    /// Cumulocity devices sending SmartREST measurement rows (QoS 1, acknowledged once
    /// durable), then the shadow round trip of as many devices in the same run.
    Cumulocity {
        /// Simulated devices.
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// How long each phase runs.
        #[arg(long, alias = "seconds", value_parser = parse_duration, default_value = "10s")]
        duration: Duration,
        #[command(flatten)]
        target: target::TargetArgs,
    },
    /// kill -9 at random moments under load; every acknowledged change must survive.
    Crash {
        /// Kill/restart cycles.
        #[arg(long, default_value_t = 10)]
        cycles: usize,
        /// Things written to.
        #[arg(long, default_value_t = 20)]
        things: usize,
        /// Concurrent HTTP writers.
        #[arg(long, default_value_t = 16)]
        writers: usize,
        /// Longest load before the kill, milliseconds (the moment is random).
        #[arg(long, default_value_t = 1500)]
        load_ms_max: u64,
    },
    /// Shadow updates over MQTT (report -> accepted, durable) beside a raw echo in the same run.
    Shadow {
        /// Simulated devices.
        #[arg(long, default_value_t = 200)]
        devices: usize,
        /// How long each phase runs (shadow, then echo).
        #[arg(long, alias = "seconds", value_parser = parse_duration, default_value = "10s")]
        duration: Duration,
        /// Most round trips per second per device (0 = unpaced).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Share of rounds that are operator desired updates over HTTP (0..=1).
        #[arg(long, default_value_t = 0.0)]
        desired_share: f64,
        /// Another broker on loopback (e.g. `mosquitto -p 18830`) whose raw echo runs as a
        /// third phase of the same run, for the ratio.
        #[arg(long)]
        baseline_broker: Option<std::net::SocketAddr>,
        /// The baseline broker's pid, for its CPU per round trip (default: the process
        /// listening on its port).
        #[arg(long, requires = "baseline_broker")]
        baseline_pid: Option<u32>,
        /// Also run the shadow phase again with a webhook subscribed to every record (a
        /// receiver in this process on loopback): records/s, lag, and the shadow rate beside
        /// the phase without it.
        #[arg(long)]
        webhook: bool,
        /// Also run the shadow phase over MQTT over TLS (the server this run starts), beside
        /// the one over TCP.
        #[arg(long)]
        tls: bool,
        #[command(flatten)]
        target: target::TargetArgs,
    },
    /// Command fan-out: connected devices answer every command; commands/s and send->SUCCEEDED.
    Commands {
        /// Connected simulated devices (each a Thing).
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Commands sent in total (spread round-robin over the devices).
        #[arg(long, default_value_t = 50_000)]
        commands: usize,
        /// HTTP sends in flight.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Upper bound on the sending phase, seconds.
        #[arg(long, default_value_t = 120)]
        max_seconds: u64,
        #[command(flatten)]
        target: target::TargetArgs,
    },
    /// One job to a group of Things, some of them connected devices that run it: time until
    /// every execution is QUEUED, notifications/s, executions completed/s, latencies, RSS.
    Jobs {
        /// Registered Things, every one a target (through a group).
        #[arg(long, default_value_t = 100_000)]
        things: usize,
        /// How many of them are connected simulated devices that run the job.
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// The job's `rollout.maximumPerMinute` (default: none, as fast as the server queues).
        #[arg(long)]
        maximum_per_minute: Option<u32>,
        /// Upper bound on the job's run, seconds.
        #[arg(long, default_value_t = 600)]
        max_seconds: u64,
        #[command(flatten)]
        target: target::TargetArgs,
    },
    /// Timer cost: P pending command deadlines on passivated Things; memory and fire accuracy.
    Deadlines {
        /// Pending commands (one per Thing).
        #[arg(long, default_value_t = 100_000)]
        pending: usize,
        /// TTL of every command, seconds (the fires come this long after the sends).
        #[arg(long, default_value_t = 10)]
        ttl_s: u64,
        /// Requests in flight while registering and sending.
        #[arg(long, default_value_t = 1000)]
        concurrency: usize,
        /// Upper bound on the whole run, seconds.
        #[arg(long, default_value_t = 300)]
        max_seconds: u64,
    },
    /// Restart to serving with a big log: fill a data dir with N events, then time a server's
    /// start to its listening line and to the first Thing served.
    Restart {
        /// Events in the log.
        #[arg(long, default_value_t = 10_000_000)]
        events: u64,
        /// Things they are spread over.
        #[arg(long, default_value_t = 10_000)]
        things: usize,
        /// Restarts measured.
        #[arg(long, default_value_t = 3)]
        restarts: usize,
        /// Data directory (default: a temporary one, removed afterwards).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Internal: a thinghub server on 127.0.0.1 port 0 (used by `mqtt`).
    #[command(hide = true)]
    Server {
        /// Data directory.
        data_dir: PathBuf,
    },
    /// Internal: the measuring half of `actors`, run in a fresh process so that memory freed by
    /// earlier phases cannot hide what active Things cost. Prints one JSON object.
    #[command(hide = true)]
    ActorsMeasure {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        active: usize,
        #[arg(long)]
        updates: usize,
        #[arg(long)]
        concurrency: usize,
        #[arg(long)]
        max_seconds: u64,
        #[arg(long)]
        storage_cache_bytes: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = match cli.scenario {
        // The parent reads the server's "listening" line.
        Scenario::Server { .. } => "info",
        _ => "warn",
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr);
    match cli.scenario {
        Scenario::Server { .. } => logs.json().init(),
        _ => logs.init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    let report_dir = cli.report.as_deref();
    match cli.scenario {
        Scenario::Commit {
            writers,
            seconds,
            event_bytes,
            data_dir,
        } => runtime.block_on(commit(writers, seconds, event_bytes, data_dir, report_dir)),
        Scenario::Actors {
            things,
            active,
            updates,
            concurrency,
            max_seconds,
            storage_cache_bytes,
            data_dir,
        } => runtime.block_on(actors(
            ActorsRun {
                things,
                active,
                updates,
                concurrency,
                max_seconds,
                storage_cache_bytes,
                data_dir,
            },
            report_dir,
        )),
        Scenario::Mqtt {
            idle_connections,
            publishers,
            seconds,
            inflight,
            target,
        } => runtime.block_on(mqtt::run(
            &target,
            mqtt::MqttRun {
                idle_connections,
                publishers,
                seconds,
                inflight,
            },
            report_dir,
        )),
        Scenario::Register {
            things,
            credentials,
            target,
        } => runtime.block_on(register::run(&target, things, credentials, report_dir)),
        Scenario::Connect {
            devices,
            rate,
            tls,
            target,
        } => runtime.block_on(mqtt::run_connect(&target, devices, rate, tls, report_dir)),
        Scenario::Echo {
            devices,
            duration,
            broker,
            v5_topic_alias_max,
            target,
        } => runtime.block_on(shadow::run_echo(
            &target,
            broker,
            devices,
            duration.as_secs().max(1),
            v5_topic_alias_max,
            report_dir,
        )),
        Scenario::Cumulocity {
            devices,
            duration,
            target,
        } => runtime.block_on(cumulocity::run(
            &target,
            devices,
            duration.as_secs().max(1),
            report_dir,
        )),
        Scenario::Crash {
            cycles,
            things,
            writers,
            load_ms_max,
        } => runtime.block_on(crash::run(
            crash::CrashRun {
                cycles,
                things,
                writers,
                load_ms_max,
            },
            report_dir,
        )),
        Scenario::Commands {
            devices,
            commands,
            concurrency,
            max_seconds,
            target,
        } => runtime.block_on(commands::run(
            &target,
            commands::CommandsRun {
                devices,
                commands,
                concurrency,
                max_seconds,
            },
            report_dir,
        )),
        Scenario::Jobs {
            things,
            devices,
            maximum_per_minute,
            max_seconds,
            target,
        } => runtime.block_on(jobs::run(
            &target,
            jobs::JobsRun {
                things,
                devices,
                maximum_per_minute,
                max_seconds,
            },
            report_dir,
        )),
        Scenario::Restart {
            events,
            things,
            restarts,
            data_dir,
        } => runtime.block_on(restart(events, things, restarts, data_dir, report_dir)),
        Scenario::Deadlines {
            pending,
            ttl_s,
            concurrency,
            max_seconds,
        } => runtime.block_on(deadlines(
            pending,
            ttl_s,
            concurrency,
            max_seconds,
            report_dir,
        )),
        Scenario::Shadow {
            devices,
            duration,
            rate,
            desired_share,
            baseline_broker,
            baseline_pid,
            webhook,
            tls,
            target,
        } => runtime.block_on(shadow::run(
            &target,
            shadow::ShadowRun {
                devices,
                seconds: duration.as_secs().max(1),
                rate,
                desired_share,
                baseline_broker,
                webhook,
                baseline_pid,
                tls,
            },
            report_dir,
        )),
        Scenario::Server { data_dir } => {
            // Server settings to try come from a TOML file named by THINGHUB_CONFIG (as for
            // `thinghub serve`); the data dir and the loopback listeners stay this run's.
            let base = match std::env::var_os("THINGHUB_CONFIG") {
                Some(path) => thinghub::config::Config::from_file(std::path::Path::new(&path))?,
                None => thinghub::config::Config::default(),
            };
            let mut config = thinghub::config::Config {
                data_dir,
                http_listen: "127.0.0.1:0".parse()?,
                mqtt_listen: "127.0.0.1:0".parse()?,
                ..base
            };
            // As `thinghub serve` reads it (the `cumulocity` scenario sets it).
            if std::env::var("THINGHUB_CUMULOCITY").is_ok_and(|v| v == "true") {
                config.cumulocity = true;
            }
            // An MQTT over TLS listener beside the plain one, with the certificates
            // `thinghub certs init` wrote into this directory (`connect --tls`, `shadow --tls`).
            if let Some(certs) = std::env::var_os(crate::mqtt::TLS_DIR_ENV) {
                let certs = PathBuf::from(certs);
                config.mqtt_tls_listen = Some("127.0.0.1:0".parse()?);
                config.tls_cert_file = Some(certs.join("server.pem"));
                config.tls_key_file = Some(certs.join("server.key"));
            }
            let admin_key = std::env::var("THINGHUB_ADMIN_KEY").ok();
            runtime.block_on(thinghub::server::serve(
                config,
                admin_key,
                thinghub::server::shutdown_signal(),
            ))?;
            Ok(())
        }
        Scenario::ActorsMeasure {
            data_dir,
            active,
            updates,
            concurrency,
            max_seconds,
            storage_cache_bytes,
        } => runtime.block_on(actors_measure(
            StoreConfig {
                cache_bytes: storage_cache_bytes,
                ..StoreConfig::new(data_dir)
            },
            active,
            updates,
            concurrency,
            Instant::now() + Duration::from_secs(max_seconds),
        )),
    }
}

/// A data directory that is removed afterwards unless the user named one.
struct DataDir {
    path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

fn data_dir(requested: Option<PathBuf>) -> Result<DataDir> {
    Ok(match requested {
        Some(path) => DataDir { path, _temp: None },
        None => {
            let temp = tempfile::tempdir().context("tempdir")?;
            DataDir {
                path: temp.path().to_owned(),
                _temp: Some(temp),
            }
        }
    })
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Resident set size of this process, bytes (Linux `/proc/self/statm`).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn commit(
    writer_counts: Vec<usize>,
    seconds: u64,
    event_bytes: usize,
    requested_dir: Option<PathBuf>,
    report_dir: Option<&std::path::Path>,
) -> Result<()> {
    let dir = data_dir(requested_dir)?;
    let store = Store::open(&StoreConfig::new(&dir.path))?;
    let payload = vec![0x5au8; event_bytes];
    let mut report = report::Report::new("commit");
    report
        .param("event_bytes", event_bytes)
        .param("seconds_per_writer_count", seconds);
    for (round, &writers) in writer_counts.iter().enumerate() {
        let before = store.commit_stats();
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(writers);
        for writer in 0..writers {
            let store = store.clone();
            let payload = payload.clone();
            tasks.push(tokio::spawn(async move {
                let mut latencies = histogram();
                let thing = format!("r{round}w{writer}");
                let mut seq = 1u64;
                while Instant::now() < deadline {
                    let envelope =
                        Envelope::new("BenchAppended", 1, 0, &serde_bytes_wrapper(&payload))?;
                    let sent = Instant::now();
                    store
                        .append(AppendBatch {
                            thing: thing.clone(),
                            first_seq: seq,
                            events: vec![envelope],
                            index: vec![],
                        })
                        .await?;
                    latencies.saturating_record(sent.elapsed().as_micros() as u64);
                    seq += 1;
                }
                Ok::<_, anyhow::Error>((seq - 1, latencies))
            }));
        }
        let mut appended = 0u64;
        let mut latencies = histogram();
        for task in tasks {
            let (count, histogram) = task.await??;
            appended += count;
            latencies.add(&histogram).context("merge histograms")?;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let after = store.commit_stats();
        let flushes = (after.batches - before.batches).max(1);
        report
            .number(
                &format!("{writers} writers: durable appends/s"),
                appended as f64 / elapsed,
                0,
            )
            .number(
                &format!("{writers} writers: appends per flush"),
                (after.waiters - before.waiters) as f64 / flushes as f64,
                1,
            )
            .number(
                &format!("{writers} writers: p50 ms"),
                latencies.value_at_quantile(0.5) as f64 / 1000.0,
                2,
            )
            .number(
                &format!("{writers} writers: p99 ms"),
                latencies.value_at_quantile(0.99) as f64 / 1000.0,
                2,
            );
    }
    report.finish(report_dir)
}

fn serde_bytes_wrapper(bytes: &[u8]) -> &serde_bytes::Bytes {
    serde_bytes::Bytes::new(bytes)
}

struct ActorsRun {
    things: usize,
    active: usize,
    updates: usize,
    concurrency: usize,
    max_seconds: u64,
    storage_cache_bytes: Option<u64>,
    data_dir: Option<PathBuf>,
}

/// A node on `store` (the registry with its background tasks: the deadline timer, the outbox
/// keeper; effects go nowhere). Keep it alive for the scenario.
async fn start_node(store: &Store, shards: usize) -> Result<thinghub_actors::Node> {
    let context = Arc::new(ThingContext {
        store: store.clone(),
        clock: Arc::new(SystemClock),
        limits: Limits::default(),
        deadlines: thinghub_actors::context::DeadlineWake::new(),
        outbox: thinghub_actors::outbox::Outbox::without_frontend(store)
            .map_err(|e| anyhow::anyhow!("outbox: {e}"))?,
        counters: Default::default(),
        alarm_rules: Default::default(),
        snapshot_every_events: 500,
    });
    thinghub_actors::Node::start(
        context,
        thinghub_actors::NodeConfig {
            registry: RegistryConfig {
                shards,
                // Passivation is driven explicitly by the scenario.
                thing_idle_ms: 24 * 3600 * 1000,
                request_timeout_ms: 60_000,
                requests_in_flight_max: 10,
            },
            ..thinghub_actors::NodeConfig::default()
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("node: {e}"))
}

/// Runs `count` requests built by `make` with `concurrency` in flight; returns (seconds, latencies).
async fn drive(
    registry: &Registry,
    count: usize,
    concurrency: usize,
    deadline: Instant,
    make: impl Fn(usize) -> (String, Request) + Send + Sync + 'static,
) -> Result<(f64, Histogram<u64>)> {
    let make = Arc::new(make);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // One histogram for all workers: one per worker (139 KiB each at these bounds) made the
    // scenario's own RSS 139 MiB larger at 1,000 in flight, counted as the Things' memory.
    let latencies = Arc::new(std::sync::Mutex::new(histogram()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let registry = registry.clone();
        let make = make.clone();
        let next = next.clone();
        let latencies = latencies.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the run exceeded its time bound");
                }
                let (name, request) = make(i);
                let sent = Instant::now();
                registry
                    .request(&name, request)
                    .await
                    .map_err(|r| anyhow::anyhow!("{name}: {r}"))?;
                let micros = sent.elapsed().as_micros() as u64;
                latencies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .saturating_record(micros);
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let latencies = std::mem::replace(
        &mut *latencies.lock().unwrap_or_else(|p| p.into_inner()),
        histogram(),
    );
    Ok((started.elapsed().as_secs_f64(), latencies))
}

async fn wait_passivated(registry: &Registry, deadline: Instant) -> Result<()> {
    registry.passivate_idle(Duration::ZERO);
    while registry.stats().active_things > 0 {
        if Instant::now() > deadline {
            bail!("things did not passivate in time");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn thing_name(i: usize) -> String {
    format!("thing-{i:08}")
}

fn update(n: usize) -> Request {
    let body = serde_json::json!({"state": {"reported": {"n": n, "temperature": 21.5, "firmware": "1.4.2"}}});
    let update = ShadowUpdate::from_json(&body, &ShadowLimits::default()).expect("valid update");
    Request::Command(ThingCommand::UpdateShadow {
        update,
        origin: Origin::Device,
        want_documents: false,
    })
}

fn ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

async fn actors(run: ActorsRun, report_dir: Option<&std::path::Path>) -> Result<()> {
    if run.active > run.things {
        bail!("--active must not exceed --things");
    }
    let deadline = Instant::now() + Duration::from_secs(run.max_seconds);
    let dir = data_dir(run.data_dir.clone())?;
    let defaults = StoreConfig::new(&dir.path);
    let store_config = StoreConfig {
        cache_bytes: run.storage_cache_bytes.unwrap_or(defaults.cache_bytes),
        ..defaults
    };
    let register_rate = {
        let store = Store::open(&store_config)?;
        let node = start_node(&store, 64).await?;
        let registry = node.registry().clone();
        let (seconds, _) = drive(&registry, run.things, run.concurrency, deadline, |i| {
            (
                thing_name(i),
                Request::Command(ThingCommand::Register(RegisterThing {
                    mqtt_client_id: None,
                    thing_type: Some("bench".into()),
                    attributes: Default::default(),
                })),
            )
        })
        .await?;
        node.shutdown(Duration::from_secs(60)).await?;
        run.things as f64 / seconds
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .as_secs()
        .max(1);
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .arg("actors-measure")
        .arg("--data-dir")
        .arg(&dir.path)
        .args(["--active", &run.active.to_string()])
        .args(["--updates", &run.updates.to_string()])
        .args(["--concurrency", &run.concurrency.to_string()])
        .args(["--max-seconds", &left.to_string()])
        .args([
            "--storage-cache-bytes",
            &store_config.cache_bytes.to_string(),
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .context("run the measuring process")?;
    if !output.status.success() {
        bail!("the measuring process failed: {}", output.status);
    }
    let m: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("measurement JSON")?;
    let num = |key: &str| m[key].as_f64().unwrap_or(0.0);
    let mib = |key: &str| num(key) / 1048576.0;
    let per_active = |a: &str, b: &str| (num(a) - num(b)) / run.active.max(1) as f64;
    let rows: Vec<(&str, String)> = vec![
        (
            "registrations/s (spawn + durable append)",
            format!("{register_rate:.0}"),
        ),
        (
            "activations/s (spawn + replay), fresh process",
            format!("{:.0}", num("activation_rate")),
        ),
        (
            "activation p99 ms",
            format!("{:.2}", num("activation_p99_ms")),
        ),
        (
            "RSS per active thing, bytes",
            format!("{:.0}", per_active("rss_active", "rss_start")),
        ),
        (
            "durable shadow updates/s",
            format!("{:.0}", num("update_rate")),
        ),
        ("update p50 ms", format!("{:.2}", num("update_p50_ms"))),
        ("update p99 ms", format!("{:.2}", num("update_p99_ms"))),
        (
            "RSS per active thing after updates, bytes",
            format!("{:.0}", per_active("rss_after_updates", "rss_start")),
        ),
        // Not returned to the OS: the allocator keeps it and the next activations reuse it.
        (
            "RSS per thing once passivated, bytes",
            format!("{:.0}", per_active("rss_passivated", "rss_start")),
        ),
        (
            "RSS: storage + registry open, MiB",
            format!("{:.1}", mib("rss_start")),
        ),
        ("RSS: all active, MiB", format!("{:.1}", mib("rss_active"))),
        (
            "RSS: after updates, MiB",
            format!("{:.1}", mib("rss_after_updates")),
        ),
        (
            "RSS: all passivated again, MiB",
            format!("{:.1}", mib("rss_passivated")),
        ),
        ("disk use, MiB", format!("{:.1}", mib("disk_bytes"))),
        (
            "restart: open storage + registry, s",
            format!("{:.3}", num("open_seconds")),
        ),
        (
            "restart: re-activate all active things, s",
            format!("{:.2}", num("reactivate_seconds")),
        ),
    ];
    let mut report = report::Report::new("actors");
    report
        .param("things", run.things)
        .param("active", run.active)
        .param("updates", run.updates)
        .param("in_flight", run.concurrency)
        .param("storage_cache_bytes", store_config.cache_bytes);
    for (name, value) in rows {
        match value.parse::<f64>() {
            Ok(number) => {
                report.rows.push(report::Row {
                    metric: name.to_owned(),
                    value,
                    number: Some(number),
                });
            }
            Err(_) => {
                report.text(name, value);
            }
        }
    }
    report.finish(report_dir)
}

async fn actors_measure(
    store_config: StoreConfig,
    active: usize,
    updates: usize,
    concurrency: usize,
    deadline: Instant,
) -> Result<()> {
    let store = Store::open(&store_config)?;
    let node = start_node(&store, 64).await?;
    let registry = node.registry().clone();
    let rss_start = rss_bytes();
    let (seconds, activation) = drive(&registry, active, concurrency, deadline, |i| {
        (thing_name(i), Request::Describe)
    })
    .await?;
    let activation_rate = active as f64 / seconds;
    let rss_active = rss_bytes();
    let active_things = registry.stats().active_things;
    if active_things != active as u64 {
        bail!("expected {active} active things, the registry has {active_things}");
    }
    let modulo = active.max(1);
    let (seconds, update_latency) = drive(&registry, updates, concurrency, deadline, move |i| {
        (thing_name(i % modulo), update(i))
    })
    .await?;
    let update_rate = updates as f64 / seconds;
    let rss_after_updates = rss_bytes();
    wait_passivated(&registry, deadline).await?;
    let rss_passivated = rss_bytes();
    node.shutdown(Duration::from_secs(60)).await?;
    drop(registry);
    let disk_bytes = store.size_on_disk_bytes()?;
    drop(store);

    let reopened = Instant::now();
    let store = Store::open(&store_config)?;
    let node = start_node(&store, 64).await?;
    let registry = node.registry().clone();
    let open_seconds = reopened.elapsed().as_secs_f64();
    let (reactivate_seconds, _) = drive(&registry, active, concurrency, deadline, |i| {
        (thing_name(i), Request::Describe)
    })
    .await?;
    node.shutdown(Duration::from_secs(60)).await?;
    let report = serde_json::json!({
        "activation_rate": activation_rate,
        "activation_p99_ms": ms(&activation, 0.99),
        "update_rate": update_rate,
        "update_p50_ms": ms(&update_latency, 0.5),
        "update_p99_ms": ms(&update_latency, 0.99),
        "rss_start": rss_start,
        "rss_active": rss_active,
        "rss_after_updates": rss_after_updates,
        "rss_passivated": rss_passivated,
        "disk_bytes": disk_bytes,
        "open_seconds": open_seconds,
        "reactivate_seconds": reactivate_seconds,
    });
    println!("{report}");
    Ok(())
}

/// The deadline timer under load: `pending` commands with the same TTL on Things that are all
/// passivated before their deadlines; each fire re-activates its Thing.
async fn deadlines(
    pending: usize,
    ttl_s: u64,
    concurrency: usize,
    max_seconds: u64,
    report_dir: Option<&std::path::Path>,
) -> Result<()> {
    use thinghub_actors::thing::{CommandStatus, SendCommand};
    let deadline = Instant::now() + Duration::from_secs(max_seconds);
    let dir = data_dir(None)?;
    let store = Store::open(&StoreConfig::new(&dir.path))?;
    let node = start_node(&store, 64).await?;
    let registry = node.registry().clone();
    let name = |i: usize| format!("timer-{i:08}");
    drive(&registry, pending, concurrency, deadline, move |i| {
        (
            name(i),
            Request::Command(ThingCommand::Register(RegisterThing {
                mqtt_client_id: None,
                thing_type: None,
                attributes: Default::default(),
            })),
        )
    })
    .await?;
    wait_passivated(&registry, deadline).await?;
    let rss_registered = rss_bytes();
    let (send_seconds, _) = drive(&registry, pending, concurrency, deadline, move |i| {
        (
            name(i),
            Request::Command(ThingCommand::SendCommand(SendCommand {
                execution_id: format!("ex-{i}"),
                command_id: "bench".into(),
                action: "reboot".into(),
                params: None,
                ttl_s: Some(ttl_s),
            })),
        )
    })
    .await?;
    let rss_active = rss_bytes();
    wait_passivated(&registry, deadline).await?;
    let rss_passivated = rss_bytes();
    let index_entries = store.count_deadlines();
    let waiting_since = Instant::now();
    let mut first_fire = None;
    while (registry.deadline_stats().timed_out as usize) < pending {
        if first_fire.is_none() && registry.deadline_stats().timed_out > 0 {
            first_fire = Some(Instant::now());
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {pending} deadlines fired in time",
                registry.deadline_stats().timed_out
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all_fired = Instant::now();
    let fire_window = all_fired
        .duration_since(first_fire.unwrap_or(waiting_since))
        .as_secs_f64();
    let stats = registry.deadline_stats();
    // How late each fired: completedAt - expiresAt, read back from each Thing.
    let lateness = Arc::new(std::sync::Mutex::new(histogram()));
    let wrong = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency.clamp(1, 256) {
        let (registry, lateness, wrong) = (registry.clone(), lateness.clone(), wrong.clone());
        tasks.spawn(async move {
            let mut i = worker;
            while i < pending {
                let request = Request::GetCommand {
                    execution_id: format!("ex-{i}"),
                };
                match registry.request(&name(i), request).await {
                    Ok(thinghub_actors::Response::Execution(e))
                        if e.status == CommandStatus::TimedOut =>
                    {
                        let late_ms = e
                            .completed_at_ms
                            .unwrap_or(0)
                            .saturating_sub(e.expires_at_ms);
                        lateness
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .saturating_record(late_ms.max(1) * 1000);
                    }
                    _ => {
                        wrong.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                i += 256;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done?;
    }
    let lateness = lateness.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let ms = |q: f64| lateness.value_at_quantile(q) as f64 / 1000.0;
    let per = |after: u64, before: u64| after.saturating_sub(before) as f64 / pending as f64;
    let mut report = report::Report::new("deadlines");
    report
        .param("pending", pending)
        .param("ttl_s", ttl_s)
        .param("things", "one per command, passivated before the deadlines")
        .number(
            "commands sent/s (durable, with index entry)",
            pending as f64 / send_seconds,
            0,
        )
        .number(
            "deadline index entries while pending",
            index_entries as f64,
            0,
        )
        .number(
            "RSS per pending command, Thing active, bytes",
            per(rss_active, rss_registered),
            0,
        )
        .number(
            "RSS per pending command, Thing passivated, bytes",
            per(rss_passivated, rss_registered),
            0,
        )
        .number(
            "fires (Thing activations by the timer)",
            stats.fires as f64,
            0,
        )
        .number("timed out", stats.timed_out as f64, 0)
        .number("fire retries", stats.retries as f64, 0)
        .number("fire window (first to last), s", fire_window, 2)
        .number(
            "fires/s over the window",
            pending as f64 / fire_window.max(1e-9),
            0,
        )
        .number("lateness p50 ms (completedAt - expiresAt)", ms(0.5), 0)
        .number("lateness p99 ms", ms(0.99), 0)
        .number("lateness max ms", lateness.max() as f64 / 1000.0, 0)
        .number(
            "not TIMED_OUT when read back",
            wrong.load(std::sync::atomic::Ordering::Relaxed) as f64,
            0,
        )
        .number(
            "deadline index entries after",
            store.count_deadlines() as f64,
            0,
        );
    report.finish(report_dir)?;
    if wrong.load(std::sync::atomic::Ordering::Relaxed) > 0 {
        bail!("some executions did not time out");
    }
    node.shutdown(Duration::from_secs(30)).await?;
    Ok(())
}

/// Fills a data dir with `events` real domain events (registrations and shadow updates, with
/// the registry index), then times restarts of the real server on it.
async fn restart(
    events: u64,
    things: usize,
    restarts: usize,
    requested_dir: Option<PathBuf>,
    report_dir: Option<&std::path::Path>,
) -> Result<()> {
    use thinghub_actors::codec;
    use thinghub_actors::thing::shadow::{SectionPatch, ShadowUpdated};
    use thinghub_actors::thing::{ThingEvent, ThingRegistered};
    use thinghub_storage::IndexOp;
    let dir = data_dir(requested_dir)?;
    let things = things.max(1);
    let per_thing = (events / things as u64).max(1);
    let filled = {
        let store = Store::open(&StoreConfig::new(&dir.path))?;
        let already = store.count_things();
        let bar = report::progress(things as u64 * per_thing, "writing");
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        // One writer per Thing slice; each appends its Thing's events in order.
        let writers = 1000.min(things);
        for writer in 0..writers {
            let (store, bar) = (store.clone(), bar.clone());
            tasks.spawn(async move {
                let mut thing = writer;
                while thing < things {
                    let name = format!("restart-{thing:06}");
                    let first = store.last_seq(&name)?;
                    for seq in first + 1..=per_thing {
                        let (event, index) = if seq == 1 {
                            let registered = ThingRegistered {
                                mqtt_client_id: name.clone(),
                                thing_type: None,
                                attributes: Default::default(),
                                created_at_ms: 1_700_000_000_000,
                            };
                            let record = codec::ThingIndexRecord {
                                mqtt_client_id: name.clone(),
                                thing_type: None,
                                created_at_ms: registered.created_at_ms,
                            };
                            (
                                ThingEvent::Registered(registered),
                                vec![IndexOp::PutThing(codec::encode_index_record(&record)?)],
                            )
                        } else {
                            let mut merge = serde_json::Map::new();
                            merge.insert("n".into(), seq.into());
                            merge.insert("temperature".into(), 21.5.into());
                            (
                                ThingEvent::ShadowUpdated(ShadowUpdated {
                                    desired: None,
                                    reported: Some(SectionPatch::Merge(merge)),
                                    version: seq - 1,
                                    timestamp_s: 1_700_000_000 + seq,
                                    client_token: None,
                                    origin: thinghub_actors::thing::Origin::Device,
                                    delta: None,
                                }),
                                Vec::new(),
                            )
                        };
                        store
                            .append(AppendBatch {
                                thing: name.clone(),
                                first_seq: seq,
                                events: vec![codec::encode_event(&event, 1_700_000_000_000)?],
                                index,
                            })
                            .await?;
                        bar.inc(1);
                    }
                    thing += writers;
                }
                Ok::<_, anyhow::Error>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        bar.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        store.sync().await?;
        caught_up_effects(&store).await?;
        (already, seconds, store.log_epochs().len() - 1)
    };
    let disk = target::dir_bytes(&dir.path);
    let mut to_listening = histogram();
    let mut to_served = histogram();
    let client = reqwest::Client::new();
    for round in 0..restarts.max(1) {
        let spawned = Instant::now();
        let server = mqtt::ChildServer::start_in(&dir.path).await?;
        to_listening.saturating_record(server.startup().as_micros() as u64);
        let name = format!("restart-{:06}", (round * 7919) % things);
        let response = client
            .get(format!(
                "http://{}/api/v1/things/{name}/shadow",
                server.http
            ))
            .basic_auth(mqtt::ADMIN.0, Some(mqtt::ADMIN.1))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("GET {name}/shadow after restart: {}", response.status());
        }
        to_served.saturating_record(spawned.elapsed().as_micros() as u64);
        server.kill9().await?;
    }
    let (packed_disk, pack_wait) = settled_disk(&client, &dir.path).await?;
    let mut report = report::Report::new("restart");
    report
        .param("events", things as u64 * per_thing)
        .param("things", things)
        .param("restarts", restarts)
        .text(
            "log written now",
            if filled.0 >= things {
                "no (reused)".to_owned()
            } else {
                format!(
                    "{:.0} events/s",
                    (things as u64 * per_thing) as f64 / filled.1
                )
            },
        )
        .number("data dir on disk, MiB", disk as f64 / 1048576.0, 0)
        .number("log epochs (sled databases under log/)", filled.2 as f64, 0)
        .number(
            "bytes on disk per event, as written",
            disk as f64 / (things as u64 * per_thing).max(1) as f64,
            0,
        )
        .number(
            "data dir on disk once every sealed epoch is packed, MiB",
            packed_disk as f64 / 1048576.0,
            0,
        )
        .number(
            "bytes on disk per event, packed",
            packed_disk as f64 / (things as u64 * per_thing).max(1) as f64,
            0,
        )
        .number("wait for packing, s", pack_wait.as_secs_f64(), 1)
        .latencies("process start -> listening", &to_listening)
        .latencies(
            "process start -> first Thing served (its replay included)",
            &to_served,
        );
    report.finish(report_dir)
}

/// How long the restart scenario waits for a server to pack its sealed log epochs.
const PACK_WAIT_SECS_MAX: u64 = 1800;

/// Starts the server on `data_dir` once more, waits until every sealed log epoch is packed (and
/// the unpacked copies are removed), stops it and returns the data dir's size then, with the
/// time the wait took.
async fn settled_disk(
    client: &reqwest::Client,
    data_dir: &std::path::Path,
) -> Result<(u64, Duration)> {
    let server = mqtt::ChildServer::start_in(data_dir).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(PACK_WAIT_SECS_MAX);
    loop {
        let metrics: serde_json::Value = client
            .get(format!("http://{}/api/v1/metrics", server.http))
            .basic_auth(mqtt::ADMIN.0, Some(mqtt::ADMIN.1))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let storage = &metrics["storage"];
        let (epochs, packed) = (
            storage["logEpochs"].as_u64().unwrap_or(0),
            storage["logEpochsPacked"].as_u64().unwrap_or(0),
        );
        let aside = std::fs::read_dir(data_dir.join("log"))?
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains('.'));
        // Every epoch but the current one.
        if packed + 1 >= epochs && !aside {
            break;
        }
        if Instant::now() > deadline {
            bail!("{packed} of {epochs} log epochs packed after {PACK_WAIT_SECS_MAX} s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let waited = started.elapsed();
    server.kill9().await?;
    Ok((target::dir_bytes(data_dir), waited))
}

/// Leaves the data as a server that kept up with its effects would (the effects cursor at the
/// durable end, the feed trimmed behind it), so a restart measures the history on disk, not
/// the re-delivery of effects for changes no server ever saw. (Written straight through the
/// storage crate, these events have no handled effects; a server would re-deliver all of them
/// at start-up.)
async fn caught_up_effects(store: &Store) -> Result<()> {
    let end = store.feed_durable_end();
    let consumer = thinghub_actors::outbox::CONSUMER;
    if store.cursor(consumer)?.saturating_add(1) < end {
        store.set_cursor(consumer, end.saturating_sub(1))?;
        while store.trim_feed(10_000)? > 0 {}
        store.sync().await?;
    }
    Ok(())
}
