//! The outbox: what a committed change causes for others leaves its Thing here, in step with
//! the change feed (the log is the outbox).
//!
//! The live path: a Thing actor appends (durable, with its feed position), applies, derives
//! the change's effects ([`crate::thing::effects`]) and hands them to the [`EffectSink`] the
//! server provides, before it replies; the position is then marked handled.
//!
//! The durable path: the node's keeper ([`crate::node`]) keeps the consumer's cursor (`effects`) at the highest position
//! below which every position is handled. Before moving it, it asks the sink to make what it
//! was given durable ([`EffectSink::checkpoint`]), so the cursor never passes an effect that a
//! crash could still lose. A position not handled in time (a crash between the commit and the
//! delivery, before a restart; an append that failed after taking its position; a straggler)
//! is recovered: its Thing is asked to deliver again what it owes for those events
//! ([`crate::thing::effects::for_recovery`]). So every effect of a durable change is delivered
//! at least once; duplicates are allowed (effects carry versions and execution ids).
//!
//! **Architecture invariant:** frontends never publish what a change causes for others; only
//! the sink does, from effects derived on the actor side.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thinghub_storage::Store;

use crate::thing::effects::Effect;

/// The name of the effects consumer's cursor in storage.
pub const CONSUMER: &str = "effects";

/// Where effects go: the server's frontends (MQTT) implement it.
pub trait EffectSink: Send + Sync + 'static {
    /// Whether rendering `update/documents` for `thing` is worth it (it copies the whole
    /// document twice): whether anyone listens.
    fn wants_documents(&self, thing: &str) -> bool;

    /// Delivers `effects` of `thing` (called after they are durable). Never blocks.
    fn deliver(&self, thing: &str, effects: &[Effect]);

    /// Writes everything delivered so far to storage on the sink's side (queued messages in
    /// stored sessions, say); the outbox then makes it durable with one group commit before
    /// its cursor moves past it. Returns whether anything was written.
    fn checkpoint(&self) -> Result<bool, String>;

    /// What the checkpoints wrote so far is durable now (a group commit succeeded after them).
    fn synced(&self) {}

    /// Whether a checkpoint wrote something that no group commit has covered yet (its sync
    /// failed): the keeper then syncs even when the next checkpoint writes nothing.
    fn unsynced(&self) -> bool {
        false
    }

    /// Notified when someone waits for the sink's state to be durable (the keeper then runs a
    /// round at once instead of at its next interval).
    fn hurry(&self) -> Arc<tokio::sync::Notify> {
        Arc::new(tokio::sync::Notify::new())
    }
}

/// A sink that drops every effect: for stores used without a frontend (in-process benchmarks
/// and tests of the actors alone).
#[derive(Debug, Default)]
pub struct NoFrontend;

impl EffectSink for NoFrontend {
    fn wants_documents(&self, _thing: &str) -> bool {
        false
    }

    fn deliver(&self, _thing: &str, _effects: &[Effect]) {}

    fn checkpoint(&self) -> Result<bool, String> {
        Ok(false)
    }
}

/// Positions handled: everything up to `through`, plus some beyond it out of order.
#[derive(Debug)]
struct Handled {
    through: u64,
    ahead: BTreeSet<u64>,
    /// When `through` last moved (a position stuck longer than the grace is recovered).
    moved_at: Instant,
}

/// A Thing the keeper recovers (see [`crate::node`]).
#[derive(Debug)]
pub(crate) struct Recovering {
    /// Failed attempts in a row (time-outs not counted: the request still runs).
    pub(crate) attempts: u32,
    /// A request is out.
    pub(crate) in_flight: bool,
    /// Not asked again before this.
    pub(crate) next_try: Instant,
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Positions whose effects were delivered by their Thing as it committed them.
    pub delivered: AtomicU64,
    /// Positions recovered by asking their Thing again.
    pub recovered: AtomicU64,
    /// Cursor saves.
    pub checkpoints: AtomicU64,
    /// Sink checkpoints that wrote something and were then made durable.
    pub sink_writes_synced: AtomicU64,
    /// Positions whose effects were given up: their Thing failed to deliver them again
    /// `recover_attempts_max` times in a row (each one logged with the Thing and its events).
    pub abandoned: AtomicU64,
}

/// The outbox (one per node, shared by every Thing actor through their context).
pub struct Outbox {
    pub(crate) sink: Arc<dyn EffectSink>,
    handled: Mutex<Handled>,
    /// Things being asked to deliver again, or waiting to be asked again after a failure.
    pub(crate) recovering: Mutex<std::collections::HashMap<String, Recovering>>,
    /// Notified when a recovery answer marked positions (start-up recovery waits on it).
    pub(crate) recovered: tokio::sync::Notify,
    /// Positions below this were written before this process started: nothing will deliver
    /// them live, so they are recovered at once.
    pub(crate) started_at: u64,
    /// Counters.
    pub stats: OutboxStats,
}

impl Outbox {
    /// An outbox over `store`'s feed (resuming from its cursor), delivering to `sink`.
    pub fn new(
        store: &Store,
        sink: Arc<dyn EffectSink>,
    ) -> Result<Outbox, thinghub_storage::StorageError> {
        let through = store.cursor(CONSUMER)?;
        Ok(Outbox {
            sink,
            handled: Mutex::new(Handled {
                through,
                ahead: BTreeSet::new(),
                moved_at: Instant::now(),
            }),
            recovering: Mutex::new(std::collections::HashMap::new()),
            recovered: tokio::sync::Notify::new(),
            started_at: store.feed_next_position(),
            stats: OutboxStats::default(),
        })
    }

    /// An outbox whose effects go nowhere ([`NoFrontend`]): for the actors without a server.
    pub fn without_frontend(store: &Store) -> Result<Arc<Outbox>, thinghub_storage::StorageError> {
        Outbox::new(store, Arc::new(NoFrontend)).map(Arc::new)
    }

    /// The sink.
    pub fn sink(&self) -> &dyn EffectSink {
        &*self.sink
    }

    /// Delivers the effects of the change at `position` and marks it handled.
    pub fn deliver(&self, thing: &str, position: u64, effects: &[Effect]) {
        #[cfg(feature = "test-util")]
        crate::fault::before_effects(thing, effects);
        if !effects.is_empty() {
            self.sink.deliver(thing, effects);
        }
        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        self.mark(position);
    }

    pub(crate) fn recovering(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Recovering>> {
        self.recovering.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Handled> {
        self.handled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `position` handled.
    pub fn mark(&self, position: u64) {
        let mut handled = self.lock();
        if position <= handled.through {
            return;
        }
        if position == handled.through + 1 {
            handled.through = position;
            loop {
                let next = handled.through + 1;
                if !handled.ahead.remove(&next) {
                    break;
                }
                handled.through = next;
            }
            handled.moved_at = Instant::now();
        } else {
            handled.ahead.insert(position);
        }
    }

    /// Every position up to this one is handled.
    pub fn handled_through(&self) -> u64 {
        self.lock().through
    }

    /// Positions after `through` that are not handled yet, up to `limit` of them below `end`,
    /// if they are due for recovery: written before this process started, or stuck for
    /// longer than `grace`.
    pub(crate) fn due(&self, end: u64, grace: Duration, limit: usize) -> Vec<u64> {
        let handled = self.lock();
        let first = handled.through + 1;
        let stuck = handled.moved_at.elapsed() >= grace;
        if first >= end || !(stuck || first < self.started_at) {
            return Vec::new();
        }
        (first..end)
            .filter(|p| !handled.ahead.contains(p))
            .filter(|p| *p < self.started_at || stuck)
            .take(limit)
            .collect()
    }
}

/// How the outbox keeper runs.
#[derive(Debug, Clone, Copy)]
pub struct OutboxConfig {
    /// How often the cursor is saved (and the sink checkpointed).
    pub checkpoint_interval: Duration,
    /// How long a position may stay unhandled before its Thing is asked again.
    pub straggler_grace: Duration,
    /// Positions recovered per round.
    pub recover_batch_max: usize,
    /// Feed entries trimmed per round.
    pub trim_batch_max: usize,
    /// Failed recoveries in a row before a Thing's owed effects are given up (the wait before
    /// the next attempt doubles from `checkpoint_interval`, up to 256 times it).
    pub recover_attempts_max: u32,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            checkpoint_interval: Duration::from_millis(200),
            straggler_grace: Duration::from_secs(10),
            recover_batch_max: 1024,
            trim_batch_max: 50_000,
            recover_attempts_max: 20,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handled_mark_moves_over_out_of_order_positions_and_stops_at_a_gap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&thinghub_storage::StoreConfig::new(dir.path())).expect("open");
        let outbox = Outbox::new(&store, Arc::new(NoFrontend)).expect("outbox");
        for position in [2, 3, 5] {
            outbox.mark(position);
        }
        assert_eq!(outbox.handled_through(), 0, "1 is missing");
        outbox.mark(1);
        assert_eq!(outbox.handled_through(), 3, "4 is missing");
        assert_eq!(
            outbox.due(6, Duration::from_secs(3600), 10),
            Vec::<u64>::new(),
            "not due yet"
        );
        assert_eq!(
            outbox.due(6, Duration::ZERO, 10),
            [4],
            "stuck: 4 is due, 5 is handled"
        );
        outbox.mark(4);
        assert_eq!(outbox.handled_through(), 5);
    }
}
