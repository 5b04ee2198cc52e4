//! `GET /api/v1/stats`: a view for a dashboard: every metric now, and the rate of every counter
//! over the last minute and the last five, from samples a background task takes every
//! `stats_sample_interval_ms` (kept for five minutes, so memory is bounded).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::metrics;
#[allow(unused_imports)]
use super::schema as s;
use super::AppState;

/// The longest window a rate is computed over.
const LONGEST_WINDOW: Duration = Duration::from_secs(300);

type Sample = (Instant, Vec<(&'static str, &'static str, f64)>);

/// Counter samples, oldest first.
#[derive(Default)]
pub struct StatsHistory {
    samples: Mutex<VecDeque<Sample>>,
}

impl StatsHistory {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a sample taken now; forgets those older than the longest window (one older is
    /// kept so a full window can be measured).
    fn record(&self, sample: Sample) {
        let mut samples = self.lock();
        samples.push_back(sample);
        let now = Instant::now();
        while samples.len() > 2
            && samples
                .get(1)
                .is_some_and(|(at, _)| now.duration_since(*at) >= LONGEST_WINDOW)
        {
            samples.pop_front();
        }
    }

    /// One counter's rate per second between consecutive samples, oldest first, as (seconds
    /// before now, rate): the console's charts.
    pub fn series(&self, group: &str, key: &str) -> Vec<(f64, f64)> {
        let samples = self.lock();
        let now = Instant::now();
        let value = |sample: &Sample| {
            sample
                .1
                .iter()
                .find(|(g, k, _)| *g == group && *k == key)
                .map(|(_, _, v)| *v)
        };
        samples
            .iter()
            .zip(samples.iter().skip(1))
            .filter_map(|(before, after)| {
                let seconds = after.0.duration_since(before.0).as_secs_f64();
                let (v0, v1) = (value(before)?, value(after)?);
                (seconds > 0.0).then(|| {
                    (
                        now.duration_since(after.0).as_secs_f64(),
                        (v1 - v0).max(0.0) / seconds,
                    )
                })
            })
            .collect()
    }

    /// The oldest sample no older than `window` (the oldest there is if none is that old).
    fn since(&self, window: Duration) -> Option<Sample> {
        let samples = self.lock();
        let now = Instant::now();
        samples
            .iter()
            .find(|(at, _)| now.duration_since(*at) <= window)
            .or_else(|| samples.front())
            .cloned()
    }
}

/// Takes a sample every `interval` until `stop`.
pub async fn run_sampler(
    state: AppState,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        state
            .stats
            .record((Instant::now(), metrics::counters(&state)));
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

fn rates(state: &AppState, now: &[(&'static str, &'static str, f64)], window: Duration) -> Value {
    let Some((at, then)) = state.stats.since(window) else {
        return json!({"windowSeconds": 0});
    };
    let seconds = at.elapsed().as_secs_f64();
    let mut body = json!({"windowSeconds": (seconds * 10.0).round() / 10.0});
    if seconds <= 0.0 {
        return body;
    }
    for ((group, key, value), (_, _, before)) in now.iter().zip(then.iter()) {
        let per_second = (value - before).max(0.0) / seconds;
        body[*group][*key] = json!((per_second * 1000.0).round() / 1000.0);
    }
    body
}

/// `GET /api/v1/stats`: `{current: {group: {key}}, rates: {oneMinute, fiveMinutes}}`, each rate
/// per second over `windowSeconds` (shorter than its name while the server is young).
#[utoipa::path(
    get,
    path = "/stats",
    tag = "metrics",
    summary = "The metrics now and rates over one and five minutes",
    responses(
        (status = 200, description = "Statistics", body = s::Stats)
    )
)]
pub async fn stats(State(state): State<AppState>) -> Json<Value> {
    let now = metrics::counters(&state);
    Json(json!({
        "current": metrics::current(&state),
        "rates": {
            "oneMinute": rates(&state, &now, Duration::from_secs(60)),
            "fiveMinutes": rates(&state, &now, LONGEST_WINDOW),
        },
    }))
}
