//! Each scenario runs end to end at a tiny size, so the harness cannot rot between benchmarks.

use std::process::Command;

fn run(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_thinghub-loadtest"))
        .args(args)
        .output()
        .expect("run thinghub-loadtest");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn commit_scenario_reports_a_row_per_writer_count() {
    let out = run(&["commit", "--writers", "1,8", "--seconds", "1"]);
    for writers in [1, 8] {
        assert!(
            value(&out, &format!("{writers} writers: durable appends/s")) > 0.0,
            "{out}"
        );
    }
}

#[test]
fn actors_scenario_measures_in_a_fresh_process() {
    let out = run(&[
        "actors",
        "--things",
        "60",
        "--active",
        "40",
        "--updates",
        "200",
        "--concurrency",
        "8",
    ]);
    for metric in [
        "RSS per active thing, bytes",
        "durable shadow updates/s",
        "restart: re-activate all active things, s",
    ] {
        assert!(out.contains(metric), "missing {metric}:\n{out}");
    }
}

/// The number in the table row whose metric is exactly `metric`.
fn value(out: &str, metric: &str) -> f64 {
    out.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(metric)?;
            rest.starts_with("  ")
                .then(|| rest.split_whitespace().last()?.parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no row '{metric}':\n{out}"))
}

#[test]
fn mqtt_scenario_reports_idle_memory_and_throughput() {
    let out = run(&[
        "mqtt",
        "--idle-connections",
        "50",
        "--publishers",
        "2",
        "--seconds",
        "2",
    ]);
    assert!(value(&out, "server RSS per idle connection, bytes") >= 0.0);
    assert!(
        value(&out, "QoS 1 messages/s delivered to the subscriber") > 0.0,
        "{out}"
    );
}

#[test]
fn shadow_scenario_reports_durable_updates_operator_rounds_and_writes_a_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("out");
    let out = run(&[
        "shadow",
        "--devices",
        "4",
        "--duration",
        "2s",
        "--desired-share",
        "0.25",
        "--report",
        report.to_str().expect("utf-8 path"),
    ]);
    assert!(value(&out, "durable shadow round trips/s") > 0.0, "{out}");
    assert!(
        value(&out, "  of which operator desired -> device") > 0.0,
        "{out}"
    );
    assert!(
        value(&out, "raw echo round trips/s (same broker, same run)") > 0.0,
        "{out}"
    );
    assert!(
        value(&out, "durable shadow / raw echo (ratio)") > 0.0,
        "{out}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("report.json")).expect("report.json"))
            .expect("JSON");
    assert_eq!(json["scenario"], "shadow");
    assert!(json["latency_over_time"]
        .as_array()
        .is_some_and(|s| !s.is_empty()));
    let md = std::fs::read_to_string(report.join("report.md")).expect("report.md");
    assert!(md.contains("| durable shadow round trips/s |"), "{md}");
    let svg = std::fs::read_to_string(report.join("latency.svg")).expect("latency.svg");
    assert!(svg.starts_with("<svg") && svg.contains("latency over time"));
}

#[test]
fn register_scenario_uses_the_bulk_endpoint_and_reports_rate_and_disk() {
    let out = run(&["register", "--things", "200", "--credentials", "2"]);
    assert_eq!(value(&out, "Things registered now"), 200.0, "{out}");
    assert!(value(&out, "Things/s (durable)") > 0.0);
    assert!(value(&out, "disk per Thing, bytes") > 0.0);
}

#[test]
fn connect_scenario_opens_every_connection() {
    let out = run(&["connect", "--devices", "40", "--rate", "200"]);
    assert_eq!(value(&out, "connected"), 40.0, "{out}");
    assert_eq!(value(&out, "failures"), 0.0, "{out}");
    assert_eq!(value(&out, "server connections (metrics)"), 40.0, "{out}");
}

#[test]
fn echo_scenario_runs_through_thinghub() {
    let out = run(&["echo", "--devices", "4", "--duration", "1s"]);
    assert!(value(&out, "raw echo round trips/s (QoS 1)") > 0.0, "{out}");
}

/// mosquitto as the baseline broker (installed by `.ci/run`; required there).
#[test]
fn echo_scenario_runs_through_another_broker() {
    let mosquitto = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(mosquitto) = mosquitto else {
        assert!(
            std::env::var_os("THINGHUB_REQUIRE_INTEROP").is_none(),
            "mosquitto is required (THINGHUB_REQUIRE_INTEROP is set) but not installed"
        );
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut broker = Command::new(mosquitto)
        .args(["-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start mosquitto");
    // Bounded wait for it to listen.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "mosquitto did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let address = format!("127.0.0.1:{port}");
    let out = run(&[
        "echo",
        "--devices",
        "4",
        "--duration",
        "1s",
        "--broker",
        &address,
    ]);
    let _ = broker.kill();
    let _ = broker.wait();
    assert!(value(&out, "raw echo round trips/s (QoS 1)") > 0.0, "{out}");
}

#[test]
fn commands_scenario_reaches_succeeded_for_every_command() {
    let out = run(&[
        "commands",
        "--devices",
        "5",
        "--commands",
        "20",
        "--concurrency",
        "4",
    ]);
    assert!(out.contains("commands SUCCEEDED"), "{out}");
    assert!(out.lines().any(|l| l.ends_with("20 of 20")), "{out}");
}

#[test]
fn deadlines_scenario_times_out_every_pending_command() {
    let out = run(&[
        "deadlines",
        "--pending",
        "50",
        "--ttl-s",
        "1",
        "--concurrency",
        "8",
    ]);
    assert_eq!(value(&out, "timed out"), 50.0, "{out}");
    assert_eq!(value(&out, "not TIMED_OUT when read back"), 0.0, "{out}");
    assert_eq!(value(&out, "deadline index entries after"), 0.0, "{out}");
}

#[test]
fn crash_scenario_verifies_every_acknowledged_change() {
    let out = run(&[
        "crash",
        "--cycles",
        "2",
        "--things",
        "3",
        "--writers",
        "4",
        "--load-ms-max",
        "300",
    ]);
    assert_eq!(value(&out, "cycles passed"), 2.0, "{out}");
    assert_eq!(value(&out, "losses"), 0.0, "{out}");
    assert!(
        value(&out, "acknowledged changes verified in the log") > 0.0,
        "{out}"
    );
}

#[test]
fn restart_scenario_serves_after_a_restart_on_a_filled_log() {
    let out = run(&[
        "restart",
        "--events",
        "2000",
        "--things",
        "20",
        "--restarts",
        "1",
    ]);
    assert!(
        value(&out, "process start -> listening p50 ms") > 0.0,
        "{out}"
    );
    assert!(
        value(
            &out,
            "process start -> first Thing served (its replay included) p50 ms"
        ) > 0.0,
        "{out}"
    );
}
