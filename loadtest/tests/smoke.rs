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
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    for row in rows {
        let appends_per_s: f64 = row
            .split_whitespace()
            .nth(1)
            .expect("rate")
            .parse()
            .expect("number");
        assert!(appends_per_s > 0.0, "{row}");
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
    for metric in [
        "server RSS per idle connection, bytes",
        "QoS 1 messages/s delivered to the subscriber",
    ] {
        assert!(out.contains(metric), "missing {metric}:\n{out}");
    }
    let delivered: f64 = out
        .lines()
        .find(|l| l.starts_with("QoS 1 messages/s"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .expect("a rate");
    assert!(delivered > 0.0, "{out}");
}

#[test]
fn shadow_scenario_reports_durable_updates_beside_the_echo() {
    let out = run(&["shadow", "--devices", "4", "--seconds", "1"]);
    let row = out
        .lines()
        .find(|l| l.starts_with("round trips/s"))
        .unwrap_or_else(|| panic!("no rates:\n{out}"));
    let rates: Vec<f64> = row
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    assert_eq!(rates.len(), 2, "{row}");
    assert!(
        rates.iter().all(|r| *r > 0.0),
        "both phases made round trips: {row}"
    );
    assert!(
        out.contains("durable shadow updates / raw echo (ratio)"),
        "{out}"
    );
}
