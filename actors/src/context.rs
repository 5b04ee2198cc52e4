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
    /// What Things did since start (metrics).
    pub counters: Arc<ThingCounters>,
    /// The offline alarm rules in force.
    pub alarm_rules: Arc<crate::alarms::AlarmRuleSet>,
}

/// What the Things did since start: their durable events by kind and outcome, and the
/// requests they refused. Counted by the actor after the append, so a refused or failed write
/// is never counted as done.
#[derive(Debug, Default)]
pub struct ThingCounters {
    /// Things registered.
    pub registered: AtomicU64,
    /// Things deleted.
    pub deleted: AtomicU64,
    /// Device connections recorded.
    pub connected: AtomicU64,
    /// Device disconnections recorded.
    pub disconnected: AtomicU64,
    /// Shadow updates accepted.
    pub shadow_updates: AtomicU64,
    /// Shadows deleted.
    pub shadow_deletes: AtomicU64,
    /// Shadow updates and deletions refused (version conflict, invalid, too large, unknown).
    pub shadow_refused: AtomicU64,
    /// Device events stored.
    pub events_ingested: AtomicU64,
    /// Device events refused by a Thing (unknown Thing; invalid ones are refused before).
    pub events_refused: AtomicU64,
    /// Commands sent.
    pub commands_sent: AtomicU64,
    /// Commands refused when sent (unknown Thing, too many pending).
    pub commands_refused: AtomicU64,
    /// Commands the device reported in progress.
    pub commands_in_progress: AtomicU64,
    /// Commands that succeeded.
    pub commands_succeeded: AtomicU64,
    /// Commands that failed.
    pub commands_failed: AtomicU64,
    /// Commands the device rejected.
    pub commands_rejected: AtomicU64,
    /// Commands whose time to live ran out.
    pub commands_timed_out: AtomicU64,
    /// Commands canceled by an operator.
    pub commands_canceled: AtomicU64,
    /// Alarms raised.
    pub alarms_raised: AtomicU64,
    /// Alarms cleared.
    pub alarms_cleared: AtomicU64,
    /// Device measurements stored.
    pub measurements_recorded: AtomicU64,
}

impl ThingCounters {
    /// Counts an event made durable.
    pub(crate) fn durable(&self, event: &crate::thing::ThingEvent) {
        use crate::thing::{AlarmEvent, CommandEvent, CommandStatus, ThingEvent};
        let counter = match event {
            ThingEvent::Registered(_) => &self.registered,
            ThingEvent::Deleted(_) => &self.deleted,
            ThingEvent::Connected(_) => &self.connected,
            ThingEvent::Disconnected(_) => &self.disconnected,
            ThingEvent::ShadowUpdated(_) => &self.shadow_updates,
            ThingEvent::ShadowDeleted(_) => &self.shadow_deletes,
            ThingEvent::EventIngested(_) => &self.events_ingested,
            ThingEvent::Command(CommandEvent::Sent(_)) => &self.commands_sent,
            ThingEvent::Command(CommandEvent::Responded(responded)) => match responded.status {
                CommandStatus::InProgress => &self.commands_in_progress,
                CommandStatus::Succeeded => &self.commands_succeeded,
                CommandStatus::Failed => &self.commands_failed,
                CommandStatus::Rejected => &self.commands_rejected,
                _ => return,
            },
            ThingEvent::Command(CommandEvent::TimedOut(_)) => &self.commands_timed_out,
            ThingEvent::Command(CommandEvent::Canceled(_)) => &self.commands_canceled,
            ThingEvent::Alarm(AlarmEvent::Raised(_)) => &self.alarms_raised,
            ThingEvent::Alarm(AlarmEvent::Cleared(_)) => &self.alarms_cleared,
            ThingEvent::MeasurementsRecorded(_) => &self.measurements_recorded,
            ThingEvent::Command(CommandEvent::ResponseRefused(_))
            | ThingEvent::Job(_)
            | ThingEvent::Alarm(_) => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request a Thing refused.
    pub(crate) fn refused(&self, command: &crate::thing::ThingCommand) {
        use crate::thing::ThingCommand;
        let counter = match command {
            ThingCommand::UpdateShadow { .. } | ThingCommand::DeleteShadow { .. } => {
                &self.shadow_refused
            }
            ThingCommand::IngestEvent(_) => &self.events_refused,
            ThingCommand::SendCommand(_) => &self.commands_refused,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
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
