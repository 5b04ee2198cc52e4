//! What every Thing actor shares with the node's background tasks: storage, the clock, the
//! bounds, the deadline timer's handle and the outbox.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thinghub_storage::Store;
use tokio::sync::Notify;

use crate::clock::SharedClock;
use crate::outbox::Outbox;
use crate::thing::Limits;

/// What every Thing actor shares: storage, the clock and the bounds.
pub struct ThingContext {
    /// The event store.
    pub store: Store,
    /// The clock.
    pub clock: SharedClock,
    /// Domain bounds.
    pub limits: Limits,
    /// Write a snapshot after this many events since the last one.
    pub snapshot_every_events: u64,
    /// Tells the deadline timer about new deadlines.
    pub deadlines: Arc<DeadlineWake>,
    /// Where the effects of committed changes go (see [`crate::outbox`]).
    pub outbox: Arc<Outbox>,
}

/// How actors tell the timer that a deadline was added (shared through the Thing context).
#[derive(Debug)]
pub struct DeadlineWake {
    pub(crate) notify: Notify,
    /// When the timer will next look at the index, Unix ms.
    pub(crate) next_scan_ms: AtomicU64,
    /// The timer's counters.
    pub(crate) counters: TimerCounters,
}

impl Default for DeadlineWake {
    fn default() -> Self {
        DeadlineWake {
            notify: Notify::new(),
            next_scan_ms: AtomicU64::new(0),
            counters: TimerCounters::default(),
        }
    }
}

impl DeadlineWake {
    /// A new handle.
    pub fn new() -> Arc<DeadlineWake> {
        Arc::new(DeadlineWake::default())
    }

    /// A deadline at `at_ms` is now durable in the index: wake the timer if it would sleep past it.
    pub fn scheduled(&self, at_ms: u64) {
        if at_ms < self.next_scan_ms.load(Ordering::Relaxed) {
            self.notify.notify_one();
        }
    }

    pub(crate) fn poke(&self) {
        self.notify.notify_one();
    }

    /// The timer's counters.
    pub fn stats(&self) -> DeadlineStats {
        self.counters.snapshot()
    }
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeadlineStats {
    /// Fire requests sent to Things.
    pub fires: u64,
    /// Executions timed out by them.
    pub timed_out: u64,
    /// Fire requests that failed and were retried.
    pub retries: u64,
    /// Fires in flight now.
    pub in_flight: u64,
}

#[derive(Debug, Default)]
pub(crate) struct TimerCounters {
    pub(crate) fires: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) in_flight: AtomicU64,
}

impl TimerCounters {
    pub(crate) fn snapshot(&self) -> DeadlineStats {
        DeadlineStats {
            fires: self.fires.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }
}
