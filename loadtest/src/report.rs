//! What a scenario produces: a table on stdout and, with `--report DIR`, `report.json`,
//! `report.md` and `latency.svg` (latency percentiles over time, for a person to open).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

/// One row of the final table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What it measures, with its unit.
    pub metric: String,
    /// The value as printed.
    pub value: String,
    /// The value as a number, when it is one.
    pub number: Option<f64>,
}

/// Latency percentiles of one time slice.
#[derive(Debug, Clone, Serialize)]
pub struct Slice {
    /// Seconds since the measured phase started (end of the slice).
    pub t_s: f64,
    /// Operations completed in the slice.
    pub count: u64,
    /// Percentiles, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
}

/// A scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// The command-line parameters that matter.
    pub parameters: Vec<(String, String)>,
    /// The final table.
    pub rows: Vec<Row>,
    /// Latency over time (may be empty).
    pub latency_over_time: Vec<Slice>,
    /// Unix seconds at the end of the run.
    pub finished_at_s: u64,
}

impl Report {
    /// An empty report for `scenario`.
    pub fn new(scenario: &str) -> Report {
        Report {
            scenario: scenario.to_owned(),
            parameters: Vec::new(),
            rows: Vec::new(),
            latency_over_time: Vec::new(),
            finished_at_s: 0,
        }
    }

    /// Records a parameter.
    pub fn param(&mut self, name: &str, value: impl ToString) -> &mut Report {
        self.parameters.push((name.to_owned(), value.to_string()));
        self
    }

    /// A numeric row printed with `decimals` decimals.
    pub fn number(&mut self, metric: &str, value: f64, decimals: usize) -> &mut Report {
        self.rows.push(Row {
            metric: metric.to_owned(),
            value: format!("{value:.decimals$}"),
            number: Some(value),
        });
        self
    }

    /// A text row.
    pub fn text(&mut self, metric: &str, value: impl ToString) -> &mut Report {
        self.rows.push(Row {
            metric: metric.to_owned(),
            value: value.to_string(),
            number: None,
        });
        self
    }

    /// p50/p90/p99/p999/max rows of `histogram` (recorded in microseconds).
    pub fn latencies(&mut self, what: &str, histogram: &Histogram<u64>) -> &mut Report {
        for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)] {
            let ms = histogram.value_at_quantile(q) as f64 / 1000.0;
            self.number(&format!("{what} {name} ms"), ms, 2);
        }
        self.number(
            &format!("{what} max ms"),
            histogram.max() as f64 / 1000.0,
            2,
        )
    }

    /// Prints the table and, with `dir`, writes the report files there.
    pub fn finish(&mut self, dir: Option<&Path>) -> Result<()> {
        self.finished_at_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let parameters: Vec<String> = self
            .parameters
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("{}: {}", self.scenario, parameters.join(" "));
        let width = self.rows.iter().map(|r| r.metric.len()).max().unwrap_or(0);
        for row in &self.rows {
            println!("{:<width$}  {:>14}", row.metric, row.value);
        }
        let Some(dir) = dir else { return Ok(()) };
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        if !self.latency_over_time.is_empty() {
            self.plot(&dir.join("latency.svg"))?;
        }
        println!("report written to {}", dir.display());
        Ok(())
    }

    fn markdown(&self) -> String {
        let mut md = format!("# thinghub-loadtest {}\n\n", self.scenario);
        md.push_str("| parameter | value |\n|---|---|\n");
        for (k, v) in &self.parameters {
            md.push_str(&format!("| {k} | {v} |\n"));
        }
        md.push_str("\n| metric | value |\n|---|---:|\n");
        for row in &self.rows {
            md.push_str(&format!("| {} | {} |\n", row.metric, row.value));
        }
        if !self.latency_over_time.is_empty() {
            md.push_str("\n![latency over time](latency.svg)\n\n");
            md.push_str("| t (s) | ops | p50 ms | p90 ms | p99 ms | p99.9 ms |\n|---:|---:|---:|---:|---:|---:|\n");
            for s in &self.latency_over_time {
                md.push_str(&format!(
                    "| {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                    s.t_s, s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms
                ));
            }
        }
        md
    }

    fn plot(&self, path: &Path) -> Result<()> {
        use plotters::prelude::*;
        let slices = &self.latency_over_time;
        let t_max = slices.iter().map(|s| s.t_s).fold(1.0, f64::max);
        let y_max = slices.iter().map(|s| s.p999_ms).fold(1.0, f64::max) * 1.1;
        let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("thinghub-loadtest {}: latency over time", self.scenario),
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("latency, ms")
            .draw()
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        type Series = (&'static str, fn(&Slice) -> f64, RGBColor);
        let series: [Series; 4] = [
            ("p50", |s| s.p50_ms, BLUE),
            ("p90", |s| s.p90_ms, GREEN),
            ("p99", |s| s.p99_ms, RGBColor(230, 140, 0)),
            ("p99.9", |s| s.p999_ms, RED),
        ];
        for (name, value, color) in series {
            chart
                .draw_series(LineSeries::new(
                    slices.iter().map(|s| (s.t_s, value(s))),
                    color.stroke_width(2),
                ))
                .map_err(|e| anyhow::anyhow!("plot: {e}"))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        Ok(())
    }
}

/// Collects latencies into one-second (or `slice`) buckets for the over-time plot.
pub struct Timeline {
    started: Instant,
    slice: Duration,
    buckets: Vec<Histogram<u64>>,
}

impl Timeline {
    /// A timeline starting now.
    pub fn new(slice: Duration) -> Timeline {
        Timeline {
            started: Instant::now(),
            slice,
            buckets: Vec::new(),
        }
    }

    /// Records a latency (µs) of an operation that completed at `at`.
    pub fn record(&mut self, at: Instant, latency_us: u64) {
        let index = (at.saturating_duration_since(self.started).as_secs_f64()
            / self.slice.as_secs_f64()) as usize;
        // Bounded: a run is bounded in time, and so is the number of slices.
        if index >= 100_000 {
            return;
        }
        while self.buckets.len() <= index {
            self.buckets.push(crate::histogram());
        }
        self.buckets[index].saturating_record(latency_us.max(1));
    }

    /// A copy that starts at the same instant and is empty.
    pub fn sibling(&self) -> Timeline {
        Timeline {
            started: self.started,
            slice: self.slice,
            buckets: Vec::new(),
        }
    }

    /// The slices, for a report.
    pub fn slices(&self) -> Vec<Slice> {
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_empty())
            .map(|(i, h)| Slice {
                t_s: (i + 1) as f64 * self.slice.as_secs_f64(),
                count: h.len(),
                p50_ms: ms(h, 0.5),
                p90_ms: ms(h, 0.9),
                p99_ms: ms(h, 0.99),
                p999_ms: ms(h, 0.999),
            })
            .collect()
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_owned());
    bar
}
