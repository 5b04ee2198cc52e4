//! The deadline timer: one task per node fires every Thing's deadlines from the storage
//! `deadlines` index.
//!
//! Each Thing with pending command executions keeps exactly one entry in the index: its
//! earliest deadline (the actor keeps it in step; see `thing_actor`). The timer reads the index
//! in order, sends `FireDeadline` to each Thing whose entry is due (activating a passivated
//! Thing), and sleeps until the next entry or until an actor schedules an earlier one.
//!
//! Because the index is durable, nothing needs re-arming at start-up: the first scan finds every
//! pending deadline, and those that passed while the server was down fire at once. Memory is
//! bounded by the fires in flight, not by the number of pending deadlines.
//!
//! **Architecture invariant:** the timer decides nothing. It only says "your deadline at T is
//! due" to the Thing; the Thing's `decide` finds what has expired by its own clock reading.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::registry::Registry;
use crate::thing_actor::{Request, Response};

/// Timer bounds.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineConfig {
    /// Things being fired at once (each is one request to a Thing actor).
    pub fire_concurrency_max: usize,
    /// Longest sleep between index scans (bounds the delay if a wake-up is ever missed, and
    /// lets a clock jump be noticed).
    pub scan_interval_max_ms: u64,
    /// Wait before retrying a Thing whose fire failed (busy, unavailable).
    pub retry_after_ms: u64,
}

impl Default for DeadlineConfig {
    fn default() -> Self {
        DeadlineConfig {
            fire_concurrency_max: 512,
            scan_interval_max_ms: 1_000,
            retry_after_ms: 1_000,
        }
    }
}

type Firing = Arc<Mutex<HashSet<(u64, String)>>>;

/// Runs the timer until `stop` turns true (fires already started finish on their own).
pub async fn run(registry: Registry, config: DeadlineConfig, mut stop: watch::Receiver<bool>) {
    let firing: Firing = Arc::default();
    let wake = registry.context().deadlines.clone();
    loop {
        let sleep_ms = scan_once(&registry, &firing, &config);
        let now_ms = registry.context().clock.now_ms();
        wake.next_scan_ms
            .store(now_ms.saturating_add(sleep_ms), Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
            _ = wake.notify.notified() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

/// Fires what is due (up to the concurrency bound); returns how long to sleep.
fn scan_once(registry: &Registry, firing: &Firing, config: &DeadlineConfig) -> u64 {
    let context = registry.context();
    let now_ms = context.clock.now_ms();
    let busy = lock(firing).len();
    let free = config.fire_concurrency_max.saturating_sub(busy);
    // Entries being fired are still in the index; read past them.
    let entries = match context.store.first_deadlines(busy + free.max(1)) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the deadline index");
            return config.scan_interval_max_ms;
        }
    };
    let mut started = 0;
    for entry in entries {
        if entry.at_ms > now_ms {
            return (entry.at_ms - now_ms).min(config.scan_interval_max_ms);
        }
        if started >= free {
            // Due but over the bound: a finishing fire pokes the timer.
            return config.scan_interval_max_ms;
        }
        let key = (entry.at_ms, entry.thing.clone());
        if !lock(firing).insert(key.clone()) {
            continue;
        }
        // The entries were read before fires that finished during this scan removed theirs.
        if !context
            .store
            .has_deadline(&entry.thing, entry.at_ms)
            .unwrap_or(true)
        {
            lock(firing).remove(&key);
            continue;
        }
        started += 1;
        fire(registry.clone(), firing.clone(), key, config.retry_after_ms);
    }
    config.scan_interval_max_ms
}

fn fire(registry: Registry, firing: Firing, key: (u64, String), retry_after_ms: u64) {
    let counters = &registry.context().deadlines.counters;
    counters.fires.fetch_add(1, Ordering::Relaxed);
    counters.in_flight.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        let (at_ms, thing) = &key;
        let answer = registry
            .request(thing, Request::FireDeadline { at_ms: *at_ms })
            .await;
        let counters = &registry.context().deadlines.counters;
        match answer {
            Ok(Response::Fired { timed_out }) => {
                counters
                    .timed_out
                    .fetch_add(timed_out as u64, Ordering::Relaxed);
            }
            Ok(other) => {
                tracing::error!(thing = %thing, ?other, "unexpected answer to a deadline fire");
            }
            Err(rejection) => {
                counters.retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(thing = %thing, at_ms, error = %rejection, retry_after_ms, "deadline fire failed; retrying");
                tokio::time::sleep(Duration::from_millis(retry_after_ms)).await;
            }
        }
        lock(&firing).remove(&key);
        counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        registry.context().deadlines.poke();
    });
}

fn lock(firing: &Firing) -> std::sync::MutexGuard<'_, HashSet<(u64, String)>> {
    firing.lock().unwrap_or_else(|p| p.into_inner())
}
